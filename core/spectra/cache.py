"""A disk cache of pretrained decompositions, so that every spectra report on a backbone reuses them.

The decompositions of a backbone's pretrained matrices are the same for all its runs and are more than half the
work of a report. They are kept in one safetensors file per backbone and weights under ``<PETLab cache>/spectra/``:
every singular value and every singular vector of each matrix's short side (``MatrixSVD.S`` and ``basis``), in
float64 (rounding the vectors to float32 would halve the file but moves the relative changes of small singular values by
more than the 1e-4 the report resolves). A ViT-B's file holds about 340 MB, a ViT-S's 85 MB; deleting one costs
only its recomputation.

An entry is used only if it still belongs to its matrix, checked as ``spectra_report`` checks any pretrained
decomposition (its squared singular values must sum to ||W0||_F^2); a stale entry or an unreadable file is
recomputed and the file rewritten, atomically (a temporary file renamed over it), so readers never see half a file.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.numpy import save_file
from torch import Tensor

from core.spectra.engine import MatrixSVD, check_pretrained, decompose

_FORMAT = "1"  # bump when the file's layout changes: older files are then recomputed


def weights_key(backbone: Mapping[str, Any]) -> str:
    """What identifies a backbone's pretrained matrices: its model name and weights, a weights file also by its
    size and modification time.

    Args:
        backbone: a run's backbone record, with ``name`` and ``weights`` (a source such as "hub" or a file path).
    """
    key = f"{backbone['name']}|{backbone['weights']}"
    path = Path(str(backbone["weights"])).expanduser()
    if path.is_file():
        stat = path.stat()
        key += f"|{stat.st_size}|{stat.st_mtime_ns}"
    return key


def cache_file(key: str, folder: Path | None = None) -> Path:
    """The file that holds the decompositions for ``key`` (``weights_key``), under ``folder`` (default: the
    ``spectra`` folder of ``core.backbone.petlab_cache_dir()``)."""
    if folder is None:
        from core.backbone import petlab_cache_dir

        folder = petlab_cache_dir() / "spectra"
    return Path(folder) / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.safetensors"


def cached_decompositions(
    backbone: Mapping[str, Any], pretrained: Mapping[str, Tensor], folder: Path | None = None
) -> dict[str, MatrixSVD]:
    """Decompositions of a backbone's pretrained matrices for ``spectra_report(pretrained=...)``, from the disk
    cache where they are still valid, computed (and stored) otherwise.

    Args:
        backbone: the run's backbone record (``weights_key``).
        pretrained: name -> W0 (out x in) of every matrix wanted.
        folder: where the cache files live (default: see ``cache_file``).

    Returns:
        name -> MatrixSVD with ``S`` and ``basis`` (no ``U``/``V``), float64, in the order of ``pretrained``.
    """
    key = weights_key(backbone)
    path = cache_file(key, folder)
    stored = _read(path, key)
    found: dict[str, MatrixSVD] = {}
    for name, w0 in pretrained.items():
        entry = stored.get(name)
        if entry is None:
            continue
        w0_norm = float(torch.linalg.vector_norm(w0.detach().cpu(), dtype=torch.float64))
        try:
            check_pretrained(name, entry, min(w0.shape), w0_norm)
        except ValueError:
            continue  # stale: recomputed below
        found[name] = entry
    missing = {name: w0 for name, w0 in pretrained.items() if name not in found}
    if missing:
        computed = {
            name: MatrixSVD(S=svd.S, basis=svd.basis)
            for name, svd in decompose(missing, with_vectors=True, keep=0).items()
        }
        found.update(computed)
        _write(path, key, {**stored, **computed})
    return {name: found[name] for name in pretrained}


def _read(path: Path, key: str) -> dict[str, MatrixSVD]:
    """Every entry of a cache file, or none when it is missing, unreadable or written for another key or format."""
    try:
        with safe_open(str(path), framework="np") as file:
            metadata = file.metadata() or {}
            if metadata.get("key") != key or metadata.get("format") != _FORMAT:
                return {}
            arrays = {tensor: file.get_tensor(tensor) for tensor in file.keys()}  # noqa: SIM118 (not a dict)
    except Exception:  # missing, truncated, corrupt or foreign: recompute rather than fail the report
        return {}
    names = {tensor.rsplit(":", 1)[0] for tensor in arrays}
    if any(a.dtype != np.float64 for a in arrays.values()) or len(arrays) != 2 * len(names):
        return {}
    try:
        return {
            name: MatrixSVD(
                S=torch.from_numpy(arrays[f"{name}:values"]), basis=torch.from_numpy(arrays[f"{name}:basis"])
            )
            for name in names
        }
    except KeyError:
        return {}


def _write(path: Path, key: str, entries: Mapping[str, MatrixSVD]) -> None:
    """Write every entry to ``path`` atomically: a temporary file in the same folder, renamed over it."""
    tensors: dict[str, np.ndarray] = {}
    for name, svd in entries.items():
        assert svd.basis is not None
        tensors[f"{name}:values"] = np.ascontiguousarray(svd.S.numpy(), dtype=np.float64)
        tensors[f"{name}:basis"] = np.ascontiguousarray(svd.basis.numpy(), dtype=np.float64)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
    os.close(handle)
    try:
        save_file(tensors, temporary, metadata={"key": key, "format": _FORMAT})
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
