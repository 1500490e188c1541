"""SVD analysis of pretrained vs tuned weights: RLRR's spectral viewpoint, measured for every method.

For each adapted matrix W0 (out x in, PyTorch layout) and its update dW, with the tuned matrix W1 = W0 + dW:

* spectra: all singular values of W0, W1 and dW, and the relative change (s1_i - s0_i) / s0_i of each one;
* rotation: principal angles between the top-k left (output side) and right (input side) singular subspaces of
  W0 and W1, and their overlap ||U0_k^T U1_k||_F^2 / k (1: same subspace, 0: orthogonal);
* intruder dimensions (Shuttleworth et al. 2024, "LoRA vs Full Fine-tuning: An Illusion of Equivalence"): top-k
  left singular vectors of W1 whose largest |cosine| with *every* left singular vector of W0 is below eps;
* the update itself: numerical rank, effective rank (Roy & Vetterli 2007), stable rank, ||dW||_F / ||W0||_F.

Read in this order:
    1. Names: block index and matrix kind parsed from a name such as ``blocks.3.attn.qkv.q``.
    2. Decompositions: batched SVDs of many matrices (``singular_values``, ``decompose``).
    3. Metrics on one decomposition or a pair (``subspace_rotation``, ``intruder_dimensions``, ranks).
    4. The report over a model's updates (``spectra_report``) and its tidy DataFrames.

Speed and precision. Everything runs in float32 (bf16/fp16 inputs are cast; float64 stays float64) on the
inputs' device. Matrices are oriented tall (wide ones transposed, left and right swapped back afterwards) and
matrices of the same shape go through one batched LAPACK call. LAPACK SVD in float32 is kept on purpose: the
faster eigen-decomposition of W^T W squares the condition number, and its error in the small singular values
(relative eps * (s_max / s_i)^2) is larger than the relative changes a PETL method makes. Two exact shortcuts
make the common cases cheaper: a matrix whose dW is exactly zero reuses the pretrained decomposition, and a dW of
low rank (LoRA, FacT, KAdaptation) is detected with a seeded random range finder and decomposed in its range.
The pretrained decompositions are the same for every run on a backbone: compute them once with ``decompose``
and pass them as ``pretrained=`` to skip half the work.
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

# ----------------------------------------------------------------------------------------------------------------
# 1. Names
# ----------------------------------------------------------------------------------------------------------------
_BLOCK = re.compile(r"(?:^|\.)blocks\.(\d+)(?:\.|$)")


def parse_matrix_name(name: str) -> tuple[int | None, str]:
    """Block index and matrix kind of a name: ``blocks.3.attn.qkv.q`` -> (3, "q"), ``blocks.0.mlp.fc1`` ->
    (0, "fc1"). The kind is the last dotted component; the block is None outside ``blocks.N``."""
    match = _BLOCK.search(name)
    return (int(match.group(1)) if match else None), name.rsplit(".", 1)[-1]


# ----------------------------------------------------------------------------------------------------------------
# 2. Decompositions
# ----------------------------------------------------------------------------------------------------------------
def _as_float(t: Tensor) -> Tensor:
    """Detached float32 (float64 stays float64): LAPACK has no half-precision SVD."""
    t = t.detach()
    return t if t.dtype in (torch.float32, torch.float64) else t.to(torch.float32)


def singular_values(mats: Tensor) -> Tensor:
    """All singular values, descending, of a matrix or a batch (..., m, n) -> (..., min(m, n)).

    Wide matrices are transposed first (same values, LAPACK's tall path is faster).
    """
    mats = _as_float(mats)
    if mats.shape[-2] < mats.shape[-1]:
        mats = mats.mT
    return torch.linalg.svdvals(mats)


@dataclass(frozen=True)
class MatrixSVD:
    """Thin SVD of one matrix W (out x in) = U diag(S) V^T.

    Attributes:
        S: all min(out, in) singular values, descending.
        U: left (output side) singular vectors, out x r, or None when only values were computed.
        V: right (input side) singular vectors, in x r (not V^T), or None. ``r`` is the number of vectors kept:
            all of them, or the leading ``keep`` (see ``decompose``).
    """

    S: Tensor
    U: Tensor | None = None
    V: Tensor | None = None

    @property
    def has_vectors(self) -> bool:
        return self.U is not None and self.V is not None


def decompose(
    matrices: Mapping[str, Tensor], with_vectors: bool = True, keep: int | None = None
) -> dict[str, MatrixSVD]:
    """Thin SVDs of many matrices, batched by shape.

    Args:
        matrices: name -> matrix (out x in).
        with_vectors: also return singular vectors (about twice the cost of values alone).
        keep: keep only the leading ``keep`` singular vectors on each side (all singular values are always
            returned); None keeps all. Truncated vectors are copied, so the full batch can be freed.

    Returns:
        name -> MatrixSVD, in the order of ``matrices``.
    """
    groups: dict[tuple[int, ...], list[str]] = {}
    for name, w in matrices.items():
        if w.ndim != 2:
            raise ValueError(f"{name}: expected a matrix, got shape {tuple(w.shape)}")
        groups.setdefault(tuple(sorted(w.shape, reverse=True)), []).append(name)
    out: dict[str, MatrixSVD] = {}
    for names in groups.values():
        wide = [matrices[n].shape[0] < matrices[n].shape[1] for n in names]
        stack = torch.stack(
            [_as_float(matrices[n]).mT if w else _as_float(matrices[n]) for n, w in zip(names, wide, strict=True)]
        )
        if not with_vectors:  # (B, m, n) tall -> (B, n)
            for n, s in zip(names, torch.linalg.svdvals(stack), strict=True):
                out[n] = MatrixSVD(S=s)
            continue
        u_t, s_t, vh_t = torch.linalg.svd(stack, full_matrices=False)  # (B, m, n), (B, n), (B, n, n)
        for i, (n, w) in enumerate(zip(names, wide, strict=True)):
            u, v = (vh_t[i].mT, u_t[i]) if w else (u_t[i], vh_t[i].mT)
            if keep is not None:
                u, v = u[:, :keep].clone(), v[:, :keep].clone()
            out[n] = MatrixSVD(S=s_t[i], U=u, V=v)
    return {n: out[n] for n in matrices}


_RANGE_PROBE = 64  # columns of the random range finder: updates of rank below this take the cheap path


def _update_singular_values(updates: Mapping[str, Tensor], probe: int = _RANGE_PROBE) -> dict[str, Tensor]:
    """All singular values of each update, exploiting exact low rank.

    A seeded Gaussian probe Y = D @ Omega (``probe`` columns) spans range(D) when rank(D) < probe. If the
    residual ||D - Q Q^T D||_F is within rounding (16 sqrt(n) eps ||D||_F), the values of the small Q^T D are
    those of D and the rest are zero; otherwise D takes the full SVD. Any value reported as zero is below
    that residual, i.e. at the level of float32 rounding.
    """
    out: dict[str, Tensor] = {}
    full: dict[str, Tensor] = {}
    groups: dict[tuple[int, ...], list[str]] = {}
    for name, d in updates.items():
        groups.setdefault(tuple(sorted(d.shape, reverse=True)), []).append(name)
    for (_, n), names in groups.items():
        if n < 2 * probe:  # too small for the shortcut to pay
            full.update({nm: updates[nm] for nm in names})
            continue
        tall = [_as_float(updates[nm]) for nm in names]
        stack = torch.stack([d if d.shape[0] >= d.shape[1] else d.mT for d in tall])  # (B, m, n)
        gen = torch.Generator(device=stack.device).manual_seed(0)
        omega = torch.randn(n, probe, generator=gen, device=stack.device, dtype=stack.dtype)
        q = torch.linalg.qr(stack @ omega).Q  # (B, m, probe), orthonormal
        small = q.mT @ stack  # (B, probe, n)
        resid = torch.linalg.matrix_norm(stack - q @ small)
        tol = 16 * math.sqrt(n) * torch.finfo(stack.dtype).eps * torch.linalg.matrix_norm(stack)
        low = resid <= tol
        if low.any():
            s_small = torch.linalg.svdvals(small[low].mT)  # (b, probe)
            s_all = torch.cat([s_small, s_small.new_zeros(s_small.shape[0], n - probe)], dim=-1)
            kept = [nm for nm, ok in zip(names, low.tolist(), strict=True) if ok]
            out.update(zip(kept, s_all, strict=True))
        full.update({nm: updates[nm] for nm, ok in zip(names, low.tolist(), strict=True) if not ok})
    out.update({nm: svd.S for nm, svd in decompose(full, with_vectors=False).items()})
    return {nm: out[nm] for nm in updates}


# ----------------------------------------------------------------------------------------------------------------
# 3. Metrics
# ----------------------------------------------------------------------------------------------------------------
class Rotation(NamedTuple):
    """Principal angles (degrees, ascending, shape (..., k)) and overlap ||A^T B||_F^2 / k (shape (...))."""

    angles_deg: Tensor
    overlap: Tensor


def subspace_rotation(U0: Tensor, U1: Tensor, k: int) -> Rotation:
    """How far span(U1[:, :k]) is rotated from span(U0[:, :k]); both have orthonormal columns, batches allowed.

    Small angles come from the sines (singular values of the part of U1_k outside span(U0_k)), large ones from
    the cosines (singular values of U0_k^T U1_k), in float64: arccos alone loses small angles to rounding
    (Knyazev & Argentati 2002). The top-k subspace is only defined up to ties: if s_k = s_{k+1}, any rotation
    within the tie is legitimate and will show up here.
    """
    k = min(k, U0.shape[-1], U1.shape[-1])
    a = torch.linalg.qr(U0[..., :k].double()).Q  # (..., m, k); re-orthonormalised so that equal inputs give
    b = torch.linalg.qr(U1[..., :k].double()).Q  # angles of 1e-14 degrees, not float32 rounding
    cross = a.mT @ b  # (..., k, k)
    cos = torch.linalg.svdvals(cross).clamp(0.0, 1.0)  # descending -> angles ascending
    sin = torch.linalg.svdvals(b - a @ cross).clamp(0.0, 1.0).flip(-1)  # ascending -> angles ascending
    angles = torch.where(cos.square() < 0.5, torch.arccos(cos), torch.arcsin(sin))
    overlap = (cross.square().sum((-2, -1)) / k).clamp(0.0, 1.0)
    return Rotation(torch.rad2deg(angles).float(), overlap.float())


def max_cosine(U0: Tensor, U1: Tensor, k: int) -> Tensor:
    """For each of the first k columns of U1, the largest |cosine| with any column of U0: (..., k)."""
    return (U0.mT @ U1[..., :k].to(U0.dtype)).abs().amax(dim=-2)


class Intruders(NamedTuple):
    """Intruder dimensions of one tuned matrix: positions among its top-k singular vectors (0-based), their
    singular values, and the largest |cosine| of every top-k vector with the pretrained vectors (k,)."""

    indices: Tensor
    values: Tensor
    max_cos: Tensor

    @property
    def count(self) -> int:
        return int(self.indices.numel())


def intruder_dimensions(U0: Tensor, U1: Tensor, S1: Tensor, k: int, eps: float = 0.5) -> Intruders:
    """Top-k singular vectors of the tuned matrix that resemble no pretrained singular vector.

    Args:
        U0: pretrained singular vectors, *all* of them (d x r0): a vector is an intruder only if it is far
            from every one. Left vectors (output side) by convention, as Shuttleworth et al.; pass V0/V1 for
            the input side.
        U1: tuned singular vectors, leading columns first (d x >=k).
        S1: tuned singular values, descending.
        k: how many leading tuned vectors to test.
        eps: a vector is an intruder when max_i |cos(u1_j, u0_i)| < eps.
    """
    k = min(k, U1.shape[-1])
    cos = max_cosine(U0, U1, k)
    idx = torch.nonzero(cos < eps).flatten()
    return Intruders(indices=idx, values=S1[idx], max_cos=cos)


def relative_change(s0: Tensor, s1: Tensor) -> Tensor:
    """(s1 - s0) / s0 elementwise; 0 where both are 0, NaN where only s0 is 0 (no relative scale)."""
    safe = torch.where(s0 == 0, torch.ones_like(s0), s0)
    rel = (s1 - s0) / safe
    return torch.where(s0 == 0, torch.where(s1 == 0, 0.0, torch.nan), rel)


def effective_rank(s: Tensor) -> Tensor:
    """Roy & Vetterli (2007): exp(entropy of p = s / sum(s)) over the last dim; 0 for an all-zero spectrum.

    Equals r for r equal non-zero values; lies in [1, r] for r non-zero values otherwise.
    """
    total = s.sum(-1, keepdim=True)
    p = s / torch.where(total > 0, total, torch.ones_like(total))
    erank = torch.exp(-torch.special.xlogy(p, p).sum(-1))
    return torch.where(total.squeeze(-1) > 0, erank, torch.zeros_like(erank))


def stable_rank(s: Tensor) -> Tensor:
    """||D||_F^2 / ||D||_2^2 = sum(s^2) / max(s)^2 over the last dim; 0 for an all-zero spectrum."""
    top = s.amax(-1)
    return torch.where(top > 0, s.square().sum(-1) / torch.where(top > 0, top, 1.0).square(), 0.0)


def numerical_rank(s: Tensor, shape: tuple[int, int]) -> Tensor:
    """Count of values above max(shape) * eps * max(s), the tolerance of ``torch.linalg.matrix_rank``."""
    tol = max(shape) * torch.finfo(s.dtype).eps * s.amax(-1, keepdim=True)
    return ((s > tol) & (s > 0)).sum(-1)


# ----------------------------------------------------------------------------------------------------------------
# 4. The report
# ----------------------------------------------------------------------------------------------------------------
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


def _long(name: str, columns: dict[str, np.ndarray]) -> pd.DataFrame:
    """A long frame for one matrix: its name, block and kind repeated along the given columns."""
    n = len(next(iter(columns.values())))
    block, kind = parse_matrix_name(name)
    head = {"name": [name] * n, "block": pd.array([block] * n, dtype="Int64"), "kind": [kind] * n}
    return pd.DataFrame(head | columns)


def _concat(frames: list[pd.DataFrame], columns: list[str]) -> pd.DataFrame:
    if not frames:
        return pd.DataFrame({c: pd.Series(dtype="Int64" if c == "block" else object) for c in columns})
    return pd.concat(frames, ignore_index=True)


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
        pretrained: decompositions of the W0 from ``decompose(..., with_vectors)`` (all vectors kept), e.g.
            cached per backbone; missing names, and names without all vectors when vectors are needed, are
            computed here.

    Returns:
        A SpectraReport of tidy DataFrames (see its docstring).
    """
    names = list(updates)
    for name in names:
        w0, dw = updates[name]
        if w0.ndim != 2 or w0.shape != dw.shape:
            raise ValueError(f"{name}: W0 {tuple(w0.shape)} and dW {tuple(dw.shape)} must be matrices of one shape")
    w0s = {n: _as_float(updates[n][0]) for n in names}
    dws = {n: _as_float(updates[n][1]).to(w0s[n].dtype) for n in names}
    changed = [n for n in names if bool(dws[n].any())]

    def usable(svd: MatrixSVD) -> bool:  # intruders need every pretrained vector, not a truncated set
        return not with_vectors or (svd.U is not None and svd.V is not None and svd.U.shape[-1] == svd.S.shape[-1])

    pre = {n: svd for n, svd in (pretrained or {}).items() if n in updates and usable(svd)}
    for n, svd in pre.items():
        if svd.S.shape[-1] != min(w0s[n].shape):
            raise ValueError(f"{n}: the pretrained decomposition does not match W0 {tuple(w0s[n].shape)}")
    pre |= decompose({n: w0s[n] for n in names if n not in pre}, with_vectors)
    tuned = {n: pre[n] for n in names} | decompose({n: w0s[n] + dws[n] for n in changed}, with_vectors, keep=k)
    upd_s = {n: torch.zeros_like(pre[n].S) for n in names} | _update_singular_values({n: dws[n] for n in changed})

    rows: list[dict[str, object]] = []
    values, changes, angles, intruders = [], [], [], []
    for n in names:
        s0, s1, sd = pre[n].S, tuned[n].S, upd_s[n]
        rel = relative_change(s0, s1)
        w0_norm = float(torch.linalg.matrix_norm(w0s[n]))
        d_norm = float(torch.linalg.matrix_norm(dws[n]))
        block, kind = parse_matrix_name(n)
        row: dict[str, object] = {
            "name": n,
            "block": block,
            "kind": kind,
            "out_features": w0s[n].shape[0],
            "in_features": w0s[n].shape[1],
            "pretrained_sigma_max": float(s0[0]),
            "tuned_sigma_max": float(s1[0]),
            "rel_change_max_abs": float(rel.abs().nan_to_num(nan=0.0).amax()),
            "rel_change_mean_abs": float(rel.abs().nanmean()) if bool((~rel.isnan()).any()) else math.nan,
            "update_fro_ratio": d_norm / w0_norm if w0_norm > 0 else (0.0 if d_norm == 0 else math.inf),
            "update_rank": int(numerical_rank(sd, tuple(w0s[n].shape))),
            "update_effective_rank": float(effective_rank(sd)),
            "update_stable_rank": float(stable_rank(sd)),
        }
        index = np.arange(s0.shape[-1])
        for which, s in (("pretrained", s0), ("tuned", s1), ("update", sd)):
            values.append(_long(n, {"which": np.full(index.shape, which), "index": index, "value": s.cpu().numpy()}))
        changes.append(
            _long(
                n,
                {
                    "index": index,
                    "pretrained": s0.cpu().numpy(),
                    "tuned": s1.cpu().numpy(),
                    "relative_change": rel.cpu().numpy(),
                },
            )
        )
        if with_vectors:
            p, t = pre[n], tuned[n]
            assert p.U is not None and p.V is not None and t.U is not None and t.V is not None
            for side, a, b in (("left", p.U, t.U), ("right", p.V, t.V)):
                rot = subspace_rotation(a, b, k)
                row[f"{side}_overlap"] = float(rot.overlap)
                row[f"{side}_max_angle_deg"] = float(rot.angles_deg.amax())
                ang = rot.angles_deg.cpu().numpy()
                angles.append(
                    _long(n, {"side": np.full(ang.shape, side), "index": np.arange(len(ang)), "angle_deg": ang})
                )
            intr = intruder_dimensions(p.U, t.U, s1, k, intruder_threshold)
            row["intruders"] = intr.count
            kk = intr.max_cos.shape[-1]
            flags = np.zeros(kk, dtype=bool)
            flags[intr.indices.cpu().numpy()] = True
            intruders.append(
                _long(
                    n,
                    {
                        "index": np.arange(kk),
                        "sigma": s1[:kk].cpu().numpy(),
                        "max_cos": intr.max_cos.cpu().numpy(),
                        "is_intruder": flags,
                    },
                )
            )
        rows.append(row)

    summary = pd.DataFrame(rows, columns=_SUMMARY_COLUMNS)
    summary = summary.astype({"block": "Int64", "intruders": "Int64"} | {c: float for c in _VECTOR_FLOAT_COLUMNS})
    return SpectraReport(
        summary=summary,
        values=_concat(values, ["name", "block", "kind", "which", "index", "value"]),
        changes=_concat(changes, ["name", "block", "kind", "index", "pretrained", "tuned", "relative_change"]),
        angles=_concat(angles, ["name", "block", "kind", "side", "index", "angle_deg"]),
        intruders=_concat(intruders, ["name", "block", "kind", "index", "sigma", "max_cos", "is_intruder"]),
        k=k,
        intruder_threshold=intruder_threshold,
    )
