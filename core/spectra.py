"""SVD analysis of pretrained vs tuned weights: RLRR's spectral viewpoint, measured for every method.

For each adapted matrix W0 (out x in, PyTorch layout) and its update dW, with the tuned matrix W1 = W0 + dW:

* spectra: all singular values of W0, W1 and dW, and the relative change (s1_i - s0_i) / s0_i of each one that
  is resolved (NaN below s0_max * sqrt(n * eps64 / 2e-4), ~2e-5 s0_max, where it would be rounding);
* rotation: principal angles between the top-k left (output side) and right (input side) singular subspaces of
  W0 and W1, and their overlap ||U0_k^T U1_k||_F^2 / k (1: same subspace, 0: orthogonal);
* intruder dimensions (Shuttleworth et al. 2024, "LoRA vs Full Fine-tuning: An Illusion of Equivalence"): top-k
  left singular vectors of W1 whose largest |cosine| with *every* left singular vector of W0 is below eps;
* the update itself: numerical rank, effective rank (Roy & Vetterli 2007), stable rank, ||dW||_F / ||W0||_F.

Read in this order:
    1. Names: block index and matrix kind parsed from a name such as ``blocks.3.attn.qkv.q``.
    2. Decompositions: the numerical engine (``singular_values``, ``decompose`` and the report's helpers).
    3. Metrics on one decomposition or a pair (``subspace_rotation``, ``intruder_dimensions``, ranks).
    4. The report over a model's updates (``spectra_report``) and its tidy DataFrames.

How it is computed, and why (measured on the 2-core CI machine, ViT-B: 72 matrices, ``bench/bench_spectra.py``).

* The Gram route, in float64, on the CPU. A matrix is oriented so that its short side n comes last (out <= in is
  transposed; square ones too, so that their output side is the short one) and its singular values are the
  square roots of the eigenvalues of the n x n Gram matrix A^T A, formed and decomposed in float64. Squaring
  the condition number costs relative precision eps64 * n * (s_max / s_i)^2: 1e-8 for s_i = 1e-4 s_max, better
  than a float32 SVD (eps32 * s_max / s_i) and far below what a PETL update changes; values under about
  sqrt(n * eps64) s_max are not resolved (they read as ~1e-7 s_max). For a 3072 x 768 MLP matrix this is 4-6
  times cheaper than LAPACK's SVD, for a square one about as cheap, and it exposes the pieces reused below.
  Results are float64 on the CPU whatever the inputs' device (float64 is slow on most GPUs, and at these sizes
  two CPU cores stay within a few seconds).
* All values and a few vectors for the price of the values: one Householder tridiagonalisation, all eigenvalues
  from it (dsterf), the leading k vectors by bisection and inverse iteration, back-transformed alone.
* Low-rank updates, exactly. A seeded random range finder detects a float32 or float64 dW of rank r < 64 (LoRA,
  FacT, and most methods' per-matrix updates) up to the rounding a float32 product leaves (16 sqrt(n) eps
  ||dW||_F) and factors it dW = L R^T; its values come from an r-column problem. The tuned Gram matrix is then
  the pretrained one plus a rank-2r term, so it is never formed from scratch: in the pretrained singular basis,
  when known, it is diag(S0^2) plus that term. A dW that is exactly zero reuses the pretrained decomposition.
* Pretrained decompositions are the same for every run on a backbone. ``decompose`` them once and pass them as
  ``pretrained=`` (the app keeps them per backbone): the report of a ViT-B run then takes 2.4 s with vectors and
  1.7 s values only; from scratch 6.2 s and 3.6 s (batched float32 SVDs took 25 s and 15 s). With full-rank
  updates (full fine-tuning) no shortcut applies: 5.4 s with the pretrained part cached.
* Threads. Matrices are analysed on one thread per core (``torch.get_num_threads()``), each BLAS call
  single-threaded; the heavy LAPACK/BLAS calls go through ``core._lapack``, which releases the GIL. Only
  scipy's BLAS is used, never numpy's: with two OpenBLAS copies alternating, each one's idle threads spin
  against the other's work and a 25 ms eigen-decomposition took 80 ms. Batching same-shape matrices into one
  LAPACK call, as torch does, was slower here (79 ms per 768 x 768 SVD batched vs 43 ms one at a time).
"""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import NamedTuple, TypeVar

import numpy as np
import pandas as pd
import scipy.linalg
import torch
from threadpoolctl import threadpool_limits
from torch import Tensor

from core import _lapack

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
_EPS64 = float(np.finfo(np.float64).eps)
_EPS32 = float(np.finfo(np.float32).eps)
_TRIDIAGONAL_MIN = 32  # below this size (or when most vectors are wanted) one LAPACK call for everything is faster


def _mm(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """x @ y in float64 by scipy's BLAS without the GIL (never numpy's BLAS: see "Threads" in the module docstring)."""
    return _lapack.matmul(x, y)


def _qr(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Thin QR through scipy's LAPACK."""
    return scipy.linalg.qr(x, mode="economic", check_finite=False)


def _norm(x: np.ndarray) -> float:
    """Frobenius norm without a BLAS call (numpy's would wake the other BLAS)."""
    return float(np.sqrt(np.einsum("ij,ij->", x, x)))


def _eigh_desc(g: np.ndarray, vectors: int) -> tuple[np.ndarray, np.ndarray | None]:
    """All eigenvalues of the symmetric ``g`` (n x n, float64, lower triangle read), descending, and the
    eigenvectors of the leading ``vectors`` of them as columns (None for 0).

    For a few vectors the Householder tridiagonalisation (the cost that matters, about 4/3 n^3) is done once:
    every value comes from it by the root-free QR algorithm (dsterf), the leading vectors by bisection and inverse
    iteration (dstebz/dstein), and the reflectors are applied to those vectors only (dormqr). That costs about
    what the values alone cost, where asking LAPACK for all values and some vectors would run two reductions.
    """
    n = g.shape[0]
    if vectors > 0 and (n < _TRIDIAGONAL_MIN or 4 * vectors >= n):
        w, z = _lapack.eigh(g)
        return w[::-1].copy(), np.ascontiguousarray(z[:, ::-1][:, :vectors])
    tri = _lapack.Tridiagonal(g)
    values = tri.eigenvalues()[::-1].copy()
    if vectors == 0:
        return values, None
    _, t = scipy.linalg.eigh_tridiagonal(
        tri.d, tri.e, select="i", select_range=(n - vectors, n - 1), check_finite=False
    )
    z = tri.apply_q(t[:, ::-1])  # g = Q T Q^T: eigenvectors of T -> of g
    return values, z


_RELATIVE_PRECISION = 1e-4  # a relative change is reported only for values known at least this well


def _resolved_floor(s: np.ndarray, n: int) -> float:
    """The smallest singular value that the Gram route gives to ``_RELATIVE_PRECISION`` relative: its error is
    eps64 * n * (s_max / s_i)^2 / 2, so s_i >= s_max * sqrt(n * eps64 / (2 * precision))."""
    return float(s[0]) * math.sqrt(n * _EPS64 / (2 * _RELATIVE_PRECISION)) if len(s) else 0.0


def _update_rank(sd: np.ndarray, shape: tuple[int, ...], eps: float) -> int:
    """Numerical rank of an update from its singular values (descending), ``eps`` that of its entries.

    Values count above max(shape) eps s_max (``torch.linalg.matrix_rank``'s rule) for float32 and float64
    entries; for coarser ones, whose rule would exceed s_max, above the size of their own rounding, eps ||dW||_F.
    Never below 4 sqrt(n eps64) s_max, where the Gram route puts values that are exactly zero.
    """
    if not len(sd) or not sd[0] > 0:
        return 0
    tol = eps * float(np.sqrt(np.square(sd).sum())) if eps > _EPS32 else max(shape) * eps * float(sd[0])
    return int((sd > max(tol, 4.0 * math.sqrt(len(sd) * _EPS64) * float(sd[0]))).sum())


class _Oriented(NamedTuple):
    """A matrix as float64 numpy on the CPU, transposed when out <= in so that its right side is the short side
    (and for square matrices the output side), with its Frobenius norm."""

    a: np.ndarray
    transposed: bool
    norm: float


def _orient(w: Tensor) -> _Oriented:
    """Orient a matrix (see _Oriented); a NaN or infinite entry is refused (its norm is not finite)."""
    a = _numpy64(w)
    norm = _norm(a)
    if not math.isfinite(norm):
        raise ValueError(f"the matrix of shape {tuple(w.shape)} has NaN or infinite entries (or overflows float64)")
    return _Oriented(a.T, True, norm) if a.shape[0] <= a.shape[1] else _Oriented(a, False, norm)


def _long_side(av: np.ndarray) -> np.ndarray:
    """Left singular vectors from A V = U diag(s) (m x r): the QR of A V, signs fixed so that u_j is a v_j / s_j.

    For a leading block this equals A v_j / s_j to rounding; columns with s_j = 0 get an orthonormal completion.
    """
    q, r = _qr(av)
    return q * np.where(np.diagonal(r) < 0, -1.0, 1.0)


def _svd_of_gram(g: np.ndarray, vectors: int) -> tuple[np.ndarray, np.ndarray | None]:
    """All singular values (descending) and the leading ``vectors`` right singular vectors of a matrix A, from its
    Gram matrix g = A^T A (lower triangle read)."""
    lam, v = _eigh_desc(g, vectors)
    return np.sqrt(np.clip(lam, 0.0, None)), v


def _gram_svd(a: np.ndarray, vectors: int) -> tuple[np.ndarray, np.ndarray | None]:
    """``_svd_of_gram`` of the tall ``a``."""
    return _svd_of_gram(_lapack.gram_lower(a), vectors)


def singular_values(mats: Tensor) -> Tensor:
    """All singular values, descending, of a matrix or a batch (..., m, n) -> (..., min(m, n)), float64 on the CPU.

    Computed from the eigenvalues of the float64 Gram matrix of the short side (see the module docstring).
    """
    if mats.ndim < 2 or 0 in mats.shape[-2:]:
        raise ValueError(f"expected non-empty matrices (..., m, n), got shape {tuple(mats.shape)}")
    flat = mats.reshape(-1, *mats.shape[-2:])
    if flat.shape[0] == 0:
        return torch.zeros(*mats.shape[:-2], min(mats.shape[-2:]), dtype=torch.float64)
    out = torch.stack([torch.from_numpy(_gram_svd(_orient(m).a, 0)[0].copy()) for m in flat])
    return out.reshape(*mats.shape[:-2], out.shape[-1])


@dataclass(frozen=True)
class MatrixSVD:
    """Thin SVD of one matrix W (out x in) = U diag(S) V^T, float64 on the CPU.

    Attributes:
        S: all min(out, in) singular values, descending.
        U: leading left (output side) singular vectors, out x r, or None when only values were computed.
        V: leading right (input side) singular vectors, in x r (not V^T), or None.
        basis: every singular vector of the short side, min x min: U when out <= in, else V (None without
            vectors). With S and W it determines the rest; the spectra report needs it (intruders compare with
            every pretrained vector, and tuned matrices with a low-rank update are decomposed in this basis).
    """

    S: Tensor
    U: Tensor | None = None
    V: Tensor | None = None
    basis: Tensor | None = None


def _matrix_svd(s: np.ndarray, v: np.ndarray, long: np.ndarray, transposed: bool) -> MatrixSVD:
    """Assemble a MatrixSVD from the oriented pieces: values, right vectors of the oriented matrix, its left ones."""
    u_w, v_w = (v, long) if transposed else (long, v)
    k = min(u_w.shape[1], v_w.shape[1])
    return MatrixSVD(
        S=torch.from_numpy(s.copy()),
        U=torch.from_numpy(u_w[:, :k].copy()),
        V=torch.from_numpy(v_w[:, :k].copy()),
        basis=torch.from_numpy(np.ascontiguousarray(v)),
    )


def decompose(
    matrices: Mapping[str, Tensor], with_vectors: bool = True, keep: int | None = None
) -> dict[str, MatrixSVD]:
    """Thin SVDs of many matrices (several at once, one per core), from the float64 Gram matrix of each one's
    short side.

    Args:
        matrices: name -> matrix (out x in).
        with_vectors: also return singular vectors (``basis`` always holds all of the short side's).
        keep: keep only the leading ``keep`` singular vectors in ``U`` and ``V`` (all singular values are always
            returned); None keeps all.

    Returns:
        name -> MatrixSVD, in the order of ``matrices``.
    """
    for name, w in matrices.items():
        if w.ndim != 2 or 0 in w.shape:
            raise ValueError(f"{name}: expected a non-empty matrix, got shape {tuple(w.shape)}")

    def one(w: Tensor) -> MatrixSVD:
        a, transposed, _ = _orient(w)
        n = a.shape[1]
        s, v = _gram_svd(a, n if with_vectors else 0)
        if v is None:
            return MatrixSVD(S=torch.from_numpy(s.copy()))
        r = n if keep is None else min(keep, n)
        return _matrix_svd(s, v, _long_side(_mm(a, v[:, :r])), transposed)

    return dict(zip(matrices, _parallel_map(one, list(matrices.values())), strict=True))


class _Update(NamedTuple):
    """An update D (oriented like its matrix, m x n), its singular values, and D = L R^T when it has low rank."""

    values: np.ndarray
    factors: tuple[np.ndarray, np.ndarray] | None


_PROBES = (16, 64)  # columns of the random range finder, tried in turn: updates of rank below 64 take the cheap path


def _analyse_update(d: np.ndarray, norm: float, eps: float) -> _Update:
    """All singular values of the oriented update ``d`` (m x n), and D = L R^T when D has low rank.

    A seeded Gaussian probe Y = D @ Omega (p columns) spans range(D) when rank(D) < p. When the part of D outside
    that range, ||D - Q Q^T D||_F, is below tol = 16 sqrt(n) eps ||D||_F (``eps`` of D's own dtype: about the
    rounding a float32 matrix product leaves), D is a rank-<p matrix up to rounding: its values are those of the
    small Q^T D padded with zeros, and D = L R^T keeps every component above tol. Otherwise D takes the Gram
    route, and so do half-precision entries, whose tol would approach ||D|| itself. For float32 entries the
    residual is ||D||^2 - ||Q^T D||^2 (Q is orthonormal), whose float64 cancellation error is far below tol;
    float64 entries need the explicit difference.
    """
    m, n = d.shape
    tol = 16.0 * math.sqrt(n) * eps * norm
    omega = np.random.default_rng(0).standard_normal((n, _PROBES[-1]))
    for p in _PROBES:
        if 2 * p > n or eps > _EPS32:
            break
        q = _qr(_mm(d, omega[:, :p]))[0]
        small = _mm(q.T, d)  # (p, n)
        exact = eps <= 1e-10  # float64 entries: the explicit difference
        resid = _norm(d - _mm(q, small)) if exact else math.sqrt(max(norm**2 - _norm(small) ** 2, 0.0))
        if resid <= tol:
            us, ss, vt = scipy.linalg.svd(small, full_matrices=False, check_finite=False)
            r = int((ss > tol).sum())
            values = np.concatenate([ss, np.zeros(n - p)])
            return _Update(values, (_mm(q, us[:, :r] * ss[:r]), np.ascontiguousarray(vt[:r].T)))
    return _Update(_gram_svd(d, 0)[0], None)


def _input_eps(t: Tensor) -> float:
    """Machine epsilon of the tensor's own precision: the rounding its entries already carry."""
    return float(torch.finfo(t.dtype).eps) if t.dtype.is_floating_point else _EPS64


class _Pretrained(NamedTuple):
    """What the tuned decomposition reuses of the pretrained A0: all singular values, and all right singular
    vectors (the short side) or, when those were not computed, the Gram matrix A0^T A0 (lower triangle)."""

    s: np.ndarray
    basis: np.ndarray | None
    gram: np.ndarray | None


def _pretrained(a0: np.ndarray, with_vectors: bool) -> _Pretrained:
    g = _lapack.gram_lower(a0)
    s, v = _svd_of_gram(g, a0.shape[1] if with_vectors else 0)
    return _Pretrained(s, v, g if v is None else None)


def _tuned_svd(
    a0: np.ndarray, d: np.ndarray, update: _Update, pre: _Pretrained, vectors: int
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Singular values of A1 = A0 + D (all) and its leading ``vectors`` right and left singular vectors.

    A low-rank D = L R^T changes the Gram matrix by a rank-2r term: A1^T A1 = A0^T A0 + Z M Z^T with
    Z = [A0^T L, R] and M = [[0, I], [I, L^T L]]. In the pretrained basis V0, when known, A0^T A0 is diag(S0^2)
    and Z becomes V0^T Z; otherwise the pretrained Gram matrix is reused. Either way O(n^2 r) work replaces a new
    O(m n^2) product; an update without low rank gets A1^T A1 formed directly. Same eigenvalues either way.
    """
    if update.factors is not None and (pre.basis is not None or pre.gram is not None):
        left, right = update.factors
        r = right.shape[1]
        z = np.hstack([_mm(a0.T, left), right])  # n x 2r
        if pre.basis is not None:
            z = _mm(pre.basis.T, z)
        mix = np.block([[np.zeros((r, r)), np.eye(r)], [np.eye(r), _mm(left.T, left)]])
        g = _mm(_mm(z, mix), z.T)
        if pre.basis is not None:
            g[np.diag_indices_from(g)] += np.square(pre.s)
        else:
            g += pre.gram  # its upper triangle is zero: only the lower one is read
        s, y = _svd_of_gram(g, vectors)
        v = y if y is None or pre.basis is None else _mm(pre.basis, y)
        av = None if v is None else _mm(a0, v) + _mm(left, _mm(right.T, v))
    else:
        a1 = a0 + d
        s, v = _gram_svd(a1, vectors)
        av = None if v is None else _mm(a1, v)
    return s, v, None if av is None else _long_side(av)


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
    u0, u1 = _numpy64(U0), _numpy64(U1)
    batch = u0.shape[:-2]
    flat0, flat1 = u0.reshape(-1, *u0.shape[-2:]), u1.reshape(-1, *u1.shape[-2:])
    pairs = [_rotation(a, b, k) for a, b in zip(flat0, flat1, strict=True)]
    angles = np.stack([a for a, _ in pairs]).reshape(*batch, -1)
    overlap = np.array([o for _, o in pairs]).reshape(batch)
    return Rotation(torch.from_numpy(angles).float(), torch.from_numpy(overlap).float())


def _rotation(u0: np.ndarray, u1: np.ndarray, k: int) -> tuple[np.ndarray, float]:
    """``subspace_rotation`` of two float64 matrices: (angles in degrees, overlap)."""
    k = min(k, u0.shape[-1], u1.shape[-1])
    a = _qr(u0[:, :k])[0]  # re-orthonormalised so that equal inputs give angles of 1e-14 degrees
    b = _qr(u1[:, :k])[0]
    cross = _mm(a.T, b)  # (k, k)
    cos = np.clip(scipy.linalg.svdvals(cross, check_finite=False), 0.0, 1.0)  # descending -> angles ascending
    sin = np.clip(scipy.linalg.svdvals(b - _mm(a, cross), check_finite=False), 0.0, 1.0)[::-1]  # ascending
    angles = np.where(np.square(cos) < 0.5, np.arccos(cos), np.arcsin(sin))
    return np.degrees(angles), float(np.clip(np.square(cross).sum() / k, 0.0, 1.0))


def _numpy64(t: Tensor) -> np.ndarray:
    """A float64 numpy copy on the CPU, converted by numpy: a torch cast of a large tensor would start torch's
    thread pool, which then competes with the BLAS threads for the two cores."""
    t = t.detach().cpu()
    if t.dtype not in (torch.float32, torch.float64):
        t = t.to(torch.float32)  # bf16/fp16 have no numpy view
    return t.numpy().astype(np.float64)


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
    return _intruders(max_cosine(U0, U1, min(k, U1.shape[-1])), S1, eps)


def _intruders(max_cos: Tensor, S1: Tensor, eps: float) -> Intruders:
    """The intruders among the leading tuned vectors, given each one's largest |cosine| with the pretrained ones."""
    idx = torch.nonzero(max_cos < eps).flatten()
    return Intruders(indices=idx, values=S1[idx], max_cos=max_cos)


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


def _check_cached(name: str, cached: MatrixSVD, n: int, w0_norm: float) -> None:
    """Refuse a pretrained decomposition of another shape, or of other weights (its squared singular values must
    sum to ||W0||_F^2)."""
    if cached.S.shape != (n,) or (cached.basis is not None and cached.basis.shape != (n, n)):
        raise ValueError(f"{name}: the pretrained decomposition does not match W0 (short side {n})")
    total = float(np.square(cached.S.numpy()).sum())
    if not math.isclose(total, w0_norm**2, rel_tol=1e-5):
        raise ValueError(
            f"{name}: the pretrained decomposition was computed from other weights (its squared singular values "
            f"sum to {total:.6g}, ||W0||_F^2 is {w0_norm**2:.6g}): recompute it"
        )


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
    a0, transposed, w0_norm = _orient(w0)
    d, _, d_norm = _orient(dw)
    n = a0.shape[1]
    kk = min(k, n) if with_vectors else 0
    if cached is not None:
        _check_cached(name, cached, n, w0_norm)
    if cached is not None and (cached.basis is not None or not with_vectors):
        pre = _Pretrained(cached.S.numpy(), None if cached.basis is None else cached.basis.numpy(), None)
    else:
        pre = _pretrained(a0, with_vectors)
    s0, basis = pre.s, pre.basis
    eps = _input_eps(dw)
    if d_norm > 0:
        update = _analyse_update(d, d_norm, eps)
        s1, v1, u1 = _tuned_svd(a0, d, update, pre, kk)
    else:
        update = _Update(np.zeros(n), None)
        s1, v1 = s0, None if basis is None else basis[:, :kk]
        u1 = None if v1 is None else _long_side(_mm(a0, v1))
    sd = update.values
    s0_t, s1_t, sd_t = torch.from_numpy(s0), torch.from_numpy(s1), torch.from_numpy(sd)
    rel = relative_change(s0_t, s1_t)
    rel[s0_t < _resolved_floor(s0, n)] = math.nan  # below it the change would be rounding
    block, kind = parse_matrix_name(name)
    row: dict[str, object] = {
        "name": name,
        "block": block,
        "kind": kind,
        "out_features": w0.shape[0],
        "in_features": w0.shape[1],
        "pretrained_sigma_max": float(s0[0]),
        "tuned_sigma_max": float(s1[0]),
        "rel_change_max_abs": float(rel.abs().nan_to_num(nan=0.0).amax()),
        "rel_change_mean_abs": float(rel.abs().nanmean()) if bool((~rel.isnan()).any()) else math.nan,
        "update_fro_ratio": d_norm / w0_norm if w0_norm > 0 else (0.0 if d_norm == 0 else math.inf),
        "update_rank": _update_rank(sd, tuple(w0.shape), eps),
        "update_effective_rank": float(effective_rank(sd_t)),
        "update_stable_rank": float(stable_rank(sd_t)),
    }
    if not with_vectors:
        return _MatrixResult(row, s0, s1, sd, rel.numpy(), {}, None, None)
    assert basis is not None and v1 is not None and u1 is not None
    u0 = _long_side(_mm(a0, basis[:, :kk]))
    # W's left (output) side is the oriented matrix's right side when it was transposed
    pairs = {"left": (basis[:, :kk], v1), "right": (u0, u1)} if transposed else {
        "left": (u0, u1), "right": (basis[:, :kk], v1)}  # fmt: skip
    angles = {}
    for side, (p, t) in pairs.items():
        angle, overlap = _rotation(p, t, kk)
        row[f"{side}_overlap"] = overlap
        row[f"{side}_max_angle_deg"] = float(angle.max())
        angles[side] = angle.astype(np.float32)
    cos = _left_cosines(a0, s0, basis, pairs["left"][1], transposed)
    found = _intruders(torch.from_numpy(cos.max(axis=0)), s1_t, intruder_threshold)
    row["intruders"] = found.count
    flags = np.zeros(kk, dtype=bool)
    flags[found.indices.numpy()] = True
    return _MatrixResult(row, s0, s1, sd, rel.numpy(), angles, found.max_cos.numpy(), flags)


T = TypeVar("T")
R = TypeVar("R")


def _workers(tasks: int) -> int:
    """Threads for per-matrix work: one per core torch may use (``torch.set_num_threads``), at most one per task."""
    return max(1, min(torch.get_num_threads(), tasks))


def _parallel_map(fn: Callable[[T], R], items: list[T]) -> list[R]:
    """``[fn(x) for x in items]`` on one thread per core, each BLAS call single-threaded (see "Threads")."""
    workers = _workers(len(items))
    if workers == 1:
        return [fn(x) for x in items]
    # One map at a time per process: the BLAS thread limit is process-wide, and two overlapping maps (two app
    # sessions) would restore each other's limits in the wrong order; they would only share the cores anyway.
    with (
        _MAP_LOCK,
        threadpool_limits(1, user_api="blas"),
        ThreadPoolExecutor(workers, thread_name_prefix="spectra") as pool,
    ):
        return list(pool.map(fn, items))


_MAP_LOCK = threading.Lock()


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
            halve the work and, with vectors, let low-rank updates be decomposed in the pretrained basis. Missing
            names, and ones without vectors when vectors are needed, are computed here.

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
    results = _parallel_map(
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
            kk = len(r.max_cos)
            intruders.add(name, index=np.arange(kk), sigma=r.s1[:kk], max_cos=r.max_cos, is_intruder=r.is_intruder)

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


def _left_cosines(a0: np.ndarray, s0: np.ndarray, basis: np.ndarray, y: np.ndarray, transposed: bool) -> np.ndarray:
    """|cos| of each tuned left vector (columns of y) with every pretrained left singular vector: (r0, k).

    When W was transposed its left vectors are the basis itself. Otherwise they are u0_i = A0 v0_i / s0_i, and
    U0^T y = diag(1/s0) V0^T (A0^T y) without forming U0; directions with s0_i below the resolved floor (as for
    the relative changes) have no well-defined vector and are left out. A zero W0 has no singular directions at
    all: every tuned vector is then new (cosine 0).
    """
    if not s0[0] > 0:
        return np.zeros((1, y.shape[1]))
    if transposed:
        return np.abs(_mm(basis.T, y))
    keep = s0 >= _resolved_floor(s0, a0.shape[1])
    return np.abs(_mm(basis[:, keep].T, _mm(a0.T, y)) / s0[keep, None])
