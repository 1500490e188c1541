"""SVD analysis of pretrained vs tuned weights: RLRR's spectral viewpoint, measured for every method.

Modules, in reading order:
    engine: the numerical engine, float64 on the CPU (Gram route, low-rank shortcuts, threads, ``decompose``).
    metrics: relative changes, principal angles, intruder dimensions, effective and stable rank.
    report: ``spectra_report`` over a model's updates, and its tidy DataFrames (``SpectraReport``).
    cache: pretrained decompositions kept on disk per backbone and weights (``cached_decompositions``).
"""

from core.spectra.cache import cached_decompositions, weights_key
from core.spectra.engine import MatrixSVD, decompose, singular_values
from core.spectra.metrics import (
    Intruders,
    Rotation,
    effective_rank,
    intruder_dimensions,
    max_cosine,
    relative_change,
    stable_rank,
    subspace_rotation,
)
from core.spectra.report import SpectraReport, parse_matrix_name, spectra_report

__all__ = [
    "Intruders",
    "MatrixSVD",
    "Rotation",
    "SpectraReport",
    "cached_decompositions",
    "decompose",
    "effective_rank",
    "intruder_dimensions",
    "max_cosine",
    "parse_matrix_name",
    "relative_change",
    "singular_values",
    "spectra_report",
    "stable_rank",
    "subspace_rotation",
    "weights_key",
]
