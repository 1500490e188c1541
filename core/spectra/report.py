"""The spectra report: RLRR's spectral viewpoint, measured for every method, as tidy tables.

For each adapted matrix W0 (out x in, PyTorch layout) and its update dW, with the tuned matrix W1 = W0 + dW:

* spectra: all singular values of W0, W1 and dW, and the relative change (s1_i - s0_i) / s0_i of each one that
  is resolved (NaN below s0_max * sqrt(n * eps64 / 2e-4), ~2e-5 s0_max, where it would be rounding);
* rotation: principal angles between the top-k left (output side) and right (input side) singular subspaces of
  W0 and W1, and their overlap ||U0_k^T U1_k||_F^2 / k (1: same subspace, 0: orthogonal);
* intruder dimensions (Shuttleworth et al. 2024, "LoRA vs Full Fine-tuning: An Illusion of Equivalence"): top-k
  left singular vectors of W1 whose largest |cosine| with *every* left singular vector of W0 is below eps;
* the update itself: numerical rank, effective rank (Roy & Vetterli 2007), stable rank, ||dW||_F / ||W0||_F.

The decompositions come from ``core.spectra.engine``, the metrics from ``core.spectra.metrics``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from core.spectra.engine import MatrixSVD, pair_spectra, parallel_map
from core.spectra.metrics import effective_rank, intruders_from_cosines, principal_angles, relative_change, stable_rank

_BLOCK = re.compile(r"(?:^|\.)blocks\.(\d+)(?:\.|$)")


def parse_matrix_name(name: str) -> tuple[int | None, str]:
    """Block index and matrix kind of a name: ``blocks.3.attn.qkv.q`` -> (3, "q"), ``blocks.0.mlp.fc1`` ->
    (0, "fc1"). The kind is the last dotted component; the block is None outside ``blocks.N``."""
    match = _BLOCK.search(name)
    return (int(match.group(1)) if match else None), name.rsplit(".", 1)[-1]


@dataclass(frozen=True)
class SpectraReport:
    """Tidy tables of a spectra analysis, one row per observation, in the order of the input mapping.

    Attributes:
        summary: one row per matrix: name, block (nullable Int64), kind, out_features, in_features,
            pretrained_sigma_max, tuned_sigma_max, rel_change_max_abs, rel_change_mean_abs, update_fro_ratio
            (||dW||_F / ||W0||_F), update_rank, update_effective_rank, update_stable_rank, and with vectors
            left_overlap, right_overlap, left_max_angle_deg, right_max_angle_deg, intruders (count); those are
            NaN / <NA> without vectors.
        values: name, block, kind, which (pretrained | tuned | update), index (0-based, descending order), value.
        changes: name, block, kind, index, pretrained, tuned, relative_change.
        angles: name, block, kind, side (left | right), index, angle_deg (empty without vectors).
        intruders: every top-k tuned left vector: name, block, kind, index, sigma, max_cos, is_intruder
            (empty without vectors); ``intruders[intruders.is_intruder]`` lists the intruder dimensions.
        k: size of the top subspaces compared.
        intruder_threshold: eps of the intruder test.
    """

    summary: pd.DataFrame
    values: pd.DataFrame
    changes: pd.DataFrame
    angles: pd.DataFrame
    intruders: pd.DataFrame
    k: int
    intruder_threshold: float


_VECTOR_FLOAT_COLUMNS = ["left_overlap", "left_max_angle_deg", "right_overlap", "right_max_angle_deg"]
_SUMMARY_COLUMNS = [
    "name",
    "block",
    "kind",
    "out_features",
    "in_features",
    "pretrained_sigma_max",
    "tuned_sigma_max",
    "rel_change_max_abs",
    "rel_change_mean_abs",
    "update_fro_ratio",
    "update_rank",
    "update_effective_rank",
    "update_stable_rank",
    *_VECTOR_FLOAT_COLUMNS,
    "intruders",
]


class _Table:
    """Columns of a long table gathered matrix by matrix, each block of rows tagged with name, block and kind.

    Text columns (name, kind, which, side) become categoricals: a ViT-B report has ~170k value rows, and codes
    cost nothing where strings would cost a tenth of a second.
    """

    def __init__(self, columns: list[str]) -> None:
        self.columns = columns
        self.parts: dict[str, list[np.ndarray]] = {c: [] for c in columns}
        self.categories: dict[str, dict[str, int]] = {}

    def add(self, name: str, **columns: np.ndarray | str) -> None:
        n = len(next(v for v in columns.values() if not isinstance(v, str)))
        block, kind = parse_matrix_name(name)
        tags = {"name": name, "block": -1 if block is None else block, "kind": kind}
        for c in self.columns:
            value = columns.get(c, tags.get(c))
            if isinstance(value, str):
                codes = self.categories.setdefault(c, {})
                value = codes.setdefault(value, len(codes))
            self.parts[c].append(np.full(n, value) if np.ndim(value) == 0 else np.asarray(value))

    def frame(self) -> pd.DataFrame:
        data: dict[str, object] = {c: np.concatenate(p) if p else np.array([]) for c, p in self.parts.items()}
        for c, codes in self.categories.items():
            data[c] = pd.Categorical.from_codes(np.asarray(data[c], dtype=np.int64), categories=list(codes))
        block = np.asarray(data["block"], dtype=np.int64)
        data["block"] = pd.arrays.IntegerArray(block, block < 0)  # -1 stood for "outside blocks.N": <NA>
        return pd.DataFrame(data, columns=self.columns)


class _MatrixResult(NamedTuple):
    """Everything the report keeps of one matrix."""

    row: dict[str, object]
    s0: np.ndarray
    s1: np.ndarray
    sd: np.ndarray
    rel: np.ndarray
    angles: dict[str, np.ndarray]  # side -> principal angles (degrees); empty without vectors
    max_cos: np.ndarray | None  # of each leading tuned left vector with every pretrained one
    is_intruder: np.ndarray | None


def _analyse_matrix(
    name: str,
    pair: tuple[Tensor, Tensor],
    cached: MatrixSVD | None,
    k: int,
    intruder_threshold: float,
    with_vectors: bool,
) -> _MatrixResult:
    """The spectra of one (W0, dW): see ``spectra_report``."""
    w0, dw = pair
    spectra = pair_spectra(name, w0, dw, cached, k if with_vectors else 0)
    s0_t, s1_t, sd_t = (torch.from_numpy(s) for s in (spectra.s0, spectra.s1, spectra.sd))
    rel = relative_change(s0_t, s1_t)
    rel[s0_t < spectra.resolved_floor] = math.nan  # below it the change would be rounding
    w0_norm, d_norm = spectra.pretrained_norm, spectra.update_norm
    block, kind = parse_matrix_name(name)
    row: dict[str, object] = {
        "name": name,
        "block": block,
        "kind": kind,
        "out_features": w0.shape[0],
        "in_features": w0.shape[1],
        "pretrained_sigma_max": float(spectra.s0[0]),
        "tuned_sigma_max": float(spectra.s1[0]),
        "rel_change_max_abs": float(rel.abs().nan_to_num(nan=0.0).amax()),
        "rel_change_mean_abs": float(rel.abs().nanmean()) if bool((~rel.isnan()).any()) else math.nan,
        "update_fro_ratio": d_norm / w0_norm if w0_norm > 0 else (0.0 if d_norm == 0 else math.inf),
        "update_rank": spectra.update_rank,
        "update_effective_rank": float(effective_rank(sd_t)),
        "update_stable_rank": float(stable_rank(sd_t)),
    }
    if spectra.sides is None or spectra.left_max_cos is None:
        return _MatrixResult(row, spectra.s0, spectra.s1, spectra.sd, rel.numpy(), {}, None, None)
    angles = {}
    for side, (pretrained_vectors, tuned_vectors) in spectra.sides.items():
        angle, overlap = principal_angles(pretrained_vectors, tuned_vectors, k)
        row[f"{side}_overlap"] = overlap
        row[f"{side}_max_angle_deg"] = float(angle.max())
        angles[side] = angle.astype(np.float32)
    found = intruders_from_cosines(torch.from_numpy(spectra.left_max_cos), s1_t, intruder_threshold)
    row["intruders"] = found.count
    flags = np.zeros(len(found.max_cos), dtype=bool)
    flags[found.indices.numpy()] = True
    return _MatrixResult(row, spectra.s0, spectra.s1, spectra.sd, rel.numpy(), angles, found.max_cos.numpy(), flags)


def spectra_report(
    updates: Mapping[str, tuple[Tensor, Tensor]],
    k: int = 10,
    intruder_threshold: float = 0.5,
    with_vectors: bool = True,
    pretrained: Mapping[str, MatrixSVD] | None = None,
) -> SpectraReport:
    """Compare the SVDs of pretrained and tuned weights, and look at the updates, for every matrix.

    Args:
        updates: name -> (W0, dW), both out x in (``core.methods.weight_updates(model)``).
        k: size of the top singular subspaces compared (rotation) and tested (intruders); capped at min(shape).
        intruder_threshold: eps of the intruder test (Shuttleworth et al. use 0.5 and k = 10).
        with_vectors: compute singular vectors for rotation and intruders; False gives values only (faster).
        pretrained: decompositions of the W0 from ``decompose`` (any ``keep``), e.g. cached per backbone: they
            save more than half the work and, with vectors, let low-rank updates be decomposed in the pretrained
            basis. Missing names, and ones without vectors when vectors are needed, are computed here.

    Returns:
        A SpectraReport of tidy DataFrames (see its docstring).
    """
    if with_vectors and k < 1:
        raise ValueError(f"k must be at least 1 (the size of the top subspaces compared), got {k}")
    for name, (w0, dw) in updates.items():
        if w0.ndim != 2 or w0.shape != dw.shape:
            raise ValueError(f"{name}: W0 {tuple(w0.shape)} and dW {tuple(dw.shape)} must be matrices of one shape")
        if 0 in w0.shape:
            raise ValueError(f"{name}: W0 {tuple(w0.shape)} is empty")

    cache = pretrained or {}
    results = parallel_map(
        lambda item: _analyse_matrix(*item, cache.get(item[0]), k, intruder_threshold, with_vectors),
        list(updates.items()),
    )
    rows = [r.row for r in results]
    values = _Table(["name", "block", "kind", "which", "index", "value"])
    changes = _Table(["name", "block", "kind", "index", "pretrained", "tuned", "relative_change"])
    angles = _Table(["name", "block", "kind", "side", "index", "angle_deg"])
    intruders = _Table(["name", "block", "kind", "index", "sigma", "max_cos", "is_intruder"])
    for name, r in zip(updates, results, strict=True):
        index = np.arange(len(r.s0))
        for which, s in (("pretrained", r.s0), ("tuned", r.s1), ("update", r.sd)):
            values.add(name, which=which, index=index, value=s)
        changes.add(name, index=index, pretrained=r.s0, tuned=r.s1, relative_change=r.rel)
        for side, angle in r.angles.items():
            angles.add(name, side=side, index=np.arange(len(angle)), angle_deg=angle)
        if r.max_cos is not None:
            top = len(r.max_cos)
            intruders.add(name, index=np.arange(top), sigma=r.s1[:top], max_cos=r.max_cos, is_intruder=r.is_intruder)

    summary = pd.DataFrame(rows, columns=_SUMMARY_COLUMNS)
    summary = summary.astype({"block": "Int64", "intruders": "Int64"} | {c: float for c in _VECTOR_FLOAT_COLUMNS})
    return SpectraReport(
        summary=summary,
        values=values.frame(),
        changes=changes.frame(),
        angles=angles.frame(),
        intruders=intruders.frame(),
        k=k,
        intruder_threshold=intruder_threshold,
    )
