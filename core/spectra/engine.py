"""The numerical engine of the spectra: singular values and vectors of W0, W0 + dW and dW, in float64 on the CPU.

Read in this order:
    1. Precision and orientation: what the Gram route resolves, and matrices turned so that the short side is last.
    2. Decompositions of one matrix (``singular_values``, ``decompose`` and ``MatrixSVD``).
    3. Updates: low-rank detection, the pretrained basis, and the tuned decomposition built on the pretrained one
       (``pair_spectra``).
    4. Threads: one matrix per core (``parallel_map``).

How it is computed, and why (``bench/bench_spectra.py`` measures the choices on ViT-B's 72 matrices):

* The Gram route, in float64, on the CPU. A matrix is oriented so that its short side n comes last (out <= in is
  transposed; square ones too, so that their output side is the short one) and its singular values are the
  square roots of the eigenvalues of the n x n Gram matrix A^T A, formed and decomposed in float64. Squaring
  the condition number costs relative precision eps64 * n * (s_max / s_i)^2: 1e-8 for s_i = 1e-4 s_max, better
  than a float32 SVD (eps32 * s_max / s_i) and far below what a PETL update changes; values under about
  sqrt(n * eps64) s_max are not resolved (they read as ~1e-7 s_max). For a tall matrix (3072 x 768) this is
  several times cheaper than LAPACK's SVD, for a square one about as cheap, and it exposes the pieces reused
  below. Results are float64 on the CPU whatever the inputs' device (float64 is slow on most GPUs).
* All values and a few vectors for the price of the values: one Householder tridiagonalisation, all eigenvalues
  from it (dsterf), the leading k vectors by inverse iteration at those values, back-transformed alone.
* Low-rank updates, exactly. A seeded random range finder detects a float32 or float64 dW of rank r < 64 (LoRA,
  FacT, and most methods' per-matrix updates) up to the rounding a float32 product leaves (16 sqrt(n) eps
  ||dW||_F) and factors it dW = L R^T; its values come from an r-column problem. The tuned Gram matrix is then
  the pretrained one plus a rank-2r term, so it is never formed from scratch: the pretrained Gram matrix plus
  that term or, with a cached pretrained basis, diag(S0^2) plus that term in it. A dW that is exactly zero
  reuses the pretrained decomposition. That n x n problem is still reduced to tridiagonal form: solving it as 2r
  rank-one updates (secular equations) costs more at ViT sizes, each one O(n^2) per iteration outside BLAS,
  against the reduction's 4/3 n^3 in BLAS.
* The pretrained basis only as far as it is used. The report needs the leading right singular vectors of W0
  (rotation) and, for intruders, the cosines of k tuned vectors with every pretrained one. It keeps the basis as
  V0 = Q Z (Q the reflectors of the tridiagonal reduction, Z the tridiagonal's eigenvectors): the leading
  vectors come by inverse iteration, and when a tuned vector's largest cosine with them provably exceeds any
  other (the squared cosines sum to at most 1), no other is needed. Only tuned vectors far from the leading pretrained
  ones (intruders) need all of Z, by divide and conquer, and Q is applied by its reflectors to those few columns,
  skipping the 2 n^3 back-transformation of a full eigen-decomposition (``PretrainedBasis``). ``decompose``, whose
  vectors are stored, forms them.
* Pretrained decompositions are the same for every run on a backbone: ``decompose`` them once and pass them on
  (the app keeps them per backbone in memory, ``core.spectra.cache`` on disk); they are more than half the work
  of a report. With full-rank updates (full fine-tuning) no shortcut applies.
* Threads. Matrices are analysed on one thread per core (``torch.get_num_threads()``), each BLAS call
  single-threaded; the heavy LAPACK/BLAS calls go through ``core.spectra._lapack``, which releases the GIL. Only
  scipy's BLAS is used, never numpy's: with two OpenBLAS copies alternating, each one's idle threads spin
  against the other's work and slow it several times. Batching same-shape matrices into one LAPACK call, as
  torch does, was slower than one call per matrix on one thread each.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import NamedTuple, TypeVar

import numpy as np
import scipy.linalg
import torch
from threadpoolctl import threadpool_limits
from torch import Tensor

from core.spectra._lapack import Tridiagonal, eigh, gram_lower, matmul, symmetric_rank_2k_lower

# ----------------------------------------------------------------------------------------------------------------
# 1. Precision and orientation
# ----------------------------------------------------------------------------------------------------------------
EPS64 = float(np.finfo(np.float64).eps)
EPS32 = float(np.finfo(np.float32).eps)
RELATIVE_PRECISION = 1e-4  # a relative change is reported only for values known at least this well
_TRIDIAGONAL_MIN = 32  # below this size (or when most vectors are wanted) one LAPACK call for everything is faster


def resolved_floor(s: np.ndarray, n: int) -> float:
    """The smallest singular value that the Gram route gives to ``RELATIVE_PRECISION`` relative: its error is
    eps64 * n * (s_max / s_i)^2 / 2, so s_i >= s_max * sqrt(n * eps64 / (2 * precision))."""
    return float(s[0]) * math.sqrt(n * EPS64 / (2 * RELATIVE_PRECISION)) if len(s) else 0.0


def update_rank(sd: np.ndarray, shape: tuple[int, ...], eps: float) -> int:
    """Numerical rank of an update from its singular values (descending), ``eps`` that of its entries.

    Values count above max(shape) eps s_max (``torch.linalg.matrix_rank``'s rule) for float32 and float64
    entries; for coarser ones, whose rule would exceed s_max, above the size of their own rounding, eps ||dW||_F.
    Never below 4 sqrt(n eps64) s_max, where the Gram route puts values that are exactly zero.
    """
    if not len(sd) or not sd[0] > 0:
        return 0
    tol = eps * float(np.sqrt(np.square(sd).sum())) if eps > EPS32 else max(shape) * eps * float(sd[0])
    return int((sd > max(tol, 4.0 * math.sqrt(len(sd) * EPS64) * float(sd[0]))).sum())


def input_eps(t: Tensor) -> float:
    """Machine epsilon of the tensor's own precision: the rounding its entries already carry."""
    return float(torch.finfo(t.dtype).eps) if t.dtype.is_floating_point else EPS64


def numpy64(t: Tensor) -> np.ndarray:
    """A float64 numpy copy on the CPU, converted by numpy: a torch cast of a large tensor would start torch's
    thread pool, which then competes with the BLAS threads for the cores."""
    t = t.detach().cpu()
    if t.dtype not in (torch.float32, torch.float64):
        t = t.to(torch.float32)  # bf16/fp16 have no numpy view
    return t.numpy().astype(np.float64)


def frobenius_norm(x: np.ndarray) -> float:
    """Frobenius norm without a BLAS call (numpy's would wake the other BLAS)."""
    return float(np.sqrt(np.einsum("ij,ij->", x, x)))


def qr(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Thin QR through scipy's LAPACK."""
    return scipy.linalg.qr(x, mode="economic", check_finite=False)


class Oriented(NamedTuple):
    """A matrix as float64 numpy on the CPU, transposed when out <= in so that its right side is the short side
    (and for square matrices the output side), with its Frobenius norm."""

    a: np.ndarray
    transposed: bool
    norm: float


def orient(w: Tensor) -> Oriented:
    """Orient a matrix (see Oriented); a NaN or infinite entry is refused (its norm is not finite)."""
    a = numpy64(w)
    norm = frobenius_norm(a)
    if not math.isfinite(norm):
        raise ValueError(f"the matrix of shape {tuple(w.shape)} has NaN or infinite entries (or overflows float64)")
    return Oriented(a.T, True, norm) if a.shape[0] <= a.shape[1] else Oriented(a, False, norm)


# ----------------------------------------------------------------------------------------------------------------
# 2. Decompositions of one matrix
# ----------------------------------------------------------------------------------------------------------------
def eigh_descending(g: np.ndarray, vectors: int) -> tuple[np.ndarray, np.ndarray | None]:
    """All eigenvalues of the symmetric ``g`` (n x n, float64, lower triangle read), descending, and the
    eigenvectors of the leading ``vectors`` of them as columns (None for 0).

    For a few vectors the Householder tridiagonalisation (the cost that matters, about 4/3 n^3) is done once:
    every value comes from it by the root-free QR algorithm (dsterf), the leading vectors by inverse iteration
    at those values (``Tridiagonal.leading_vectors``). That costs about what the values alone cost, where asking
    LAPACK for all values and some vectors would run two reductions.
    """
    n = g.shape[0]
    if vectors > 0 and (n < _TRIDIAGONAL_MIN or 4 * vectors >= n):
        w, z = eigh(g)
        return w[::-1].copy(), np.ascontiguousarray(z[:, ::-1][:, :vectors])
    tri = Tridiagonal(g)
    values = tri.eigenvalues()[::-1].copy()
    return values, (tri.leading_vectors(vectors) if vectors else None)


def svd_of_gram(g: np.ndarray, vectors: int) -> tuple[np.ndarray, np.ndarray | None]:
    """All singular values (descending) and the leading ``vectors`` right singular vectors of a matrix A, from its
    Gram matrix g = A^T A (lower triangle read)."""
    lam, v = eigh_descending(g, vectors)
    return np.sqrt(np.clip(lam, 0.0, None)), v


def gram_svd(a: np.ndarray, vectors: int) -> tuple[np.ndarray, np.ndarray | None]:
    """``svd_of_gram`` of the tall ``a``."""
    return svd_of_gram(gram_lower(a), vectors)


def long_side(av: np.ndarray) -> np.ndarray:
    """Left singular vectors from A V = U diag(s) (m x r): the QR of A V, signs fixed so that u_j is a v_j / s_j.

    For a leading block this equals A v_j / s_j to rounding; columns with s_j = 0 get an orthonormal completion.
    """
    q, r = qr(av)
    return q * np.where(np.diagonal(r) < 0, -1.0, 1.0)


def singular_values(mats: Tensor) -> Tensor:
    """All singular values, descending, of a matrix or a batch (..., m, n) -> (..., min(m, n)), float64 on the CPU.

    Computed from the eigenvalues of the float64 Gram matrix of the short side (see the module docstring).
    """
    if mats.ndim < 2 or 0 in mats.shape[-2:]:
        raise ValueError(f"expected non-empty matrices (..., m, n), got shape {tuple(mats.shape)}")
    flat = mats.reshape(-1, *mats.shape[-2:])
    if flat.shape[0] == 0:
        return torch.zeros(*mats.shape[:-2], min(mats.shape[-2:]), dtype=torch.float64)
    out = torch.stack([torch.from_numpy(gram_svd(orient(m).a, 0)[0].copy()) for m in flat])
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
        a, transposed, _ = orient(w)
        n = a.shape[1]
        s, v = gram_svd(a, n if with_vectors else 0)
        if v is None:
            return MatrixSVD(S=torch.from_numpy(s.copy()))
        r = n if keep is None else min(keep, n)
        return _matrix_svd(s, v, long_side(matmul(a, v[:, :r])), transposed)

    return dict(zip(matrices, parallel_map(one, list(matrices.values())), strict=True))


def check_pretrained(name: str, cached: MatrixSVD, n: int, w0_norm: float) -> None:
    """Refuse a pretrained decomposition of another shape, or of other weights (its squared singular values must
    sum to ||W0||_F^2).

    Args:
        name: the matrix's name, for the message.
        cached: the decomposition to check.
        n: the short side of W0.
        w0_norm: ||W0||_F.

    Raises:
        ValueError: the decomposition does not belong to W0.
    """
    if cached.S.shape != (n,) or (cached.basis is not None and cached.basis.shape != (n, n)):
        raise ValueError(f"{name}: the pretrained decomposition does not match W0 (short side {n})")
    total = float(np.square(cached.S.numpy()).sum())
    if not math.isclose(total, w0_norm**2, rel_tol=1e-5):
        raise ValueError(
            f"{name}: the pretrained decomposition was computed from other weights (its squared singular values "
            f"sum to {total:.6g}, ||W0||_F^2 is {w0_norm**2:.6g}): recompute it"
        )


# ----------------------------------------------------------------------------------------------------------------
# 3. Updates
# ----------------------------------------------------------------------------------------------------------------
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
        if 2 * p > n or eps > EPS32:
            break
        q = qr(matmul(d, omega[:, :p]))[0]
        small = matmul(q.T, d)  # (p, n)
        exact = eps <= 1e-10  # float64 entries: the explicit difference
        resid = (
            frobenius_norm(d - matmul(q, small)) if exact else math.sqrt(max(norm**2 - frobenius_norm(small) ** 2, 0.0))
        )
        if resid <= tol:
            us, ss, vt = scipy.linalg.svd(small, full_matrices=False, check_finite=False)
            r = int((ss > tol).sum())
            values = np.concatenate([ss, np.zeros(n - p)])
            return _Update(values, (matmul(q, us[:, :r] * ss[:r]), np.ascontiguousarray(vt[:r].T)))
    return _Update(gram_svd(d, 0)[0], None)


class PretrainedBasis:
    """All right singular vectors V0 of the oriented A0 (n x n), explicit (a cached decomposition) or kept as the
    Householder reduction A0^T A0 = Q T Q^T, never formed: V0 = Q Z with Z the eigenvectors of T.

    A report needs V0 only through a few columns: the leading ones (``leading``), V0^T x for a few x
    (``coordinates``) and, with an explicit basis, V0 y (``vectors``). From the reduction the leading columns cost
    O(n^2) each (inverse iteration on T, then Q by its reflectors); V0^T x needs all of Z, found by divide and
    conquer only when first asked for (about as costly as the reduction itself). Forming Q Z, what dsyevd does
    after the same reduction, would cost 2 n^3 more.
    """

    def __init__(self, explicit: np.ndarray | None = None, reduction: Tridiagonal | None = None):
        if (explicit is None) == (reduction is None):
            raise ValueError("give either the explicit basis or the reduction")
        self.explicit, self.reduction = explicit, reduction
        self._z: np.ndarray | None = None  # T's eigenvectors, descending, once computed

    def _all_of_t(self) -> np.ndarray:
        assert self.reduction is not None
        if self._z is None:
            self._z = np.asfortranarray(self.reduction.eigenvectors()[1][:, ::-1])
        return self._z

    def leading(self, m: int) -> np.ndarray:
        """The first ``m`` columns of V0 (n x m)."""
        if self.explicit is not None:
            return self.explicit[:, :m]
        assert self.reduction is not None
        return self.reduction.leading_vectors(m)

    def coordinates(self, x: np.ndarray) -> np.ndarray:
        """V0^T x for x (n x k)."""
        if self.reduction is None:
            return matmul(self.explicit.T, x)
        return matmul(self._all_of_t().T, self.reduction.apply_q(x, transpose=True))

    def vectors(self, y: np.ndarray, leading: int = 0) -> np.ndarray:
        """V0 y for coordinates y (n x k), after the first ``leading`` columns of V0: n x (leading + k). For an
        explicit basis only: the tuned problem is posed in the pretrained basis only when that basis is cached."""
        if self.explicit is None:
            raise ValueError("vectors from coordinates need the explicit basis")
        return np.hstack([self.explicit[:, :leading], matmul(self.explicit, y)])


class _Pretrained(NamedTuple):
    """What the tuned decomposition reuses of the pretrained A0: all singular values, all right singular vectors
    (the short side; None when not wanted) and, when A0 was decomposed here, its Gram matrix A0^T A0 (lower
    triangle). A cached decomposition has its vectors explicit and no Gram matrix."""

    s: np.ndarray
    basis: PretrainedBasis | None
    gram: np.ndarray | None


def _pretrained(a0: np.ndarray, with_vectors: bool) -> _Pretrained:
    """A0's singular values from one tridiagonal reduction of its Gram matrix, kept with that reduction as its
    basis (see ``PretrainedBasis``) and with the Gram matrix."""
    g = gram_lower(a0)
    tri = Tridiagonal(g)
    s = np.sqrt(np.clip(tri.eigenvalues()[::-1], 0.0, None))
    return _Pretrained(s, PretrainedBasis(reduction=tri) if with_vectors else None, g)


class _Tuned(NamedTuple):
    """The decomposition of A1 = A0 + D: all singular values, and the leading right singular vectors either as
    their coordinates in the pretrained basis (a low-rank D there) or explicitly."""

    s: np.ndarray
    coordinates: np.ndarray | None  # V0^T V1
    v: np.ndarray | None


def _tuned_svd(a0: np.ndarray, d: np.ndarray, update: _Update, pre: _Pretrained, vectors: int) -> _Tuned:
    """Singular values of A1 = A0 + D (all) and its leading ``vectors`` right singular vectors.

    A low-rank D = L R^T changes the Gram matrix by a symmetric rank-2r term: with P = A0^T L and
    W = P + R (L^T L) / 2, A1^T A1 = A0^T A0 + P R^T + R P^T + R L^T L R^T = A0^T A0 + W R^T + R W^T, whose lower
    triangle one dsyr2k forms. The pretrained Gram matrix, when A0 was decomposed here, is reused; with a cached
    explicit basis V0 instead, A0^T A0 is diag(S0^2) in it and P, R become V0^T P, V0^T R. Either way O(n^2 r) work
    replaces a new O(m n^2) product; an update without low rank gets A1^T A1 formed directly. Same eigenvalues
    either way.
    """
    in_basis = pre.gram is None and pre.basis is not None
    if update.factors is not None and (in_basis or pre.gram is not None):
        left, right = update.factors
        r = right.shape[1]
        z = np.hstack([matmul(a0.T, left), right])  # n x 2r: [P, R]
        if in_basis:
            z = pre.basis.coordinates(z)
        p, q = z[:, :r], np.ascontiguousarray(z[:, r:])
        g = symmetric_rank_2k_lower(p + matmul(q, matmul(left.T, left)) / 2, q)
        if in_basis:
            g[np.diag_indices_from(g)] += np.square(pre.s)
        else:
            g += pre.gram  # its upper triangle is zero: only the lower one is read
        s, y = svd_of_gram(g, vectors)
        return _Tuned(s, y, None) if in_basis else _Tuned(s, None, y)
    s, v = gram_svd(a0 + d, vectors)
    return _Tuned(s, None, v)


def _pretrained_left_max_cos(
    a0: np.ndarray, s0: np.ndarray, basis: PretrainedBasis, v0: np.ndarray, y: np.ndarray, transposed: bool
) -> np.ndarray:
    """The largest |cos| of each tuned left vector (columns of y, unit) with every pretrained left singular vector,
    given the leading right singular vectors ``v0`` of A0 (as many as y has columns).

    When W was transposed its left vectors are the basis itself: the cosines are V0^T y. Otherwise they are
    u0_i = A0 v0_i / s0_i, and U0^T y = diag(1/s0) V0^T (A0^T y) without forming U0; directions with s0_i below
    the resolved floor (as for the relative changes) have no well-defined vector and are left out. A zero W0 has
    no singular directions at all: every tuned vector is then new (cosine 0).

    The cosines with the leading k pretrained vectors come first: the report has those vectors already. The
    pretrained vectors are orthonormal, so the squared cosines of y with all of them sum to at most 1: when the
    largest one found is at least the square root of what the others can still hold, it is the largest of all
    (a tuned vector that is mostly a mix of leading pretrained ones, as after a small update). Only otherwise (a
    tuned vector far from the leading pretrained ones, as an intruder is) are all cosines computed, which from a
    reduction costs all of V0.
    """
    k = y.shape[1]
    if not s0[0] > 0:
        return np.zeros(k)
    n = len(s0)
    x = y if transposed else matmul(a0.T, y)
    scale = np.ones(n) if transposed else np.where(s0 >= resolved_floor(s0, n), 1.0 / np.maximum(s0, 1e-300), 0.0)
    first = np.abs(matmul(v0.T, x)) * scale[:k, None]
    largest = first.max(axis=0)
    if k == n or bool(np.all(largest**2 >= 1.0 - np.square(first).sum(axis=0))):
        return largest
    return (np.abs(basis.coordinates(x)) * scale[:, None]).max(axis=0)


class PairSpectra(NamedTuple):
    """The decompositions of one pair (W0, dW), with W1 = W0 + dW, as the report needs them.

    Attributes:
        s0, s1, sd: all singular values of W0, W1 and dW, descending (min(out, in) each).
        pretrained_norm, update_norm: ||W0||_F and ||dW||_F.
        update_rank: numerical rank of dW (``update_rank``).
        resolved_floor: the smallest value of W0 known to ``RELATIVE_PRECISION`` relative.
        sides: with vectors, "left" (output side) and "right" (input side) -> (the leading ``top`` singular
            vectors of W0, those of W1), in W's own orientation; None without vectors.
        left_max_cos: with vectors, the largest |cos| of each leading left vector of W1 with every resolved left
            singular vector of W0; None without vectors.
    """

    s0: np.ndarray
    s1: np.ndarray
    sd: np.ndarray
    pretrained_norm: float
    update_norm: float
    update_rank: int
    resolved_floor: float
    sides: dict[str, tuple[np.ndarray, np.ndarray]] | None
    left_max_cos: np.ndarray | None


def pair_spectra(name: str, w0: Tensor, dw: Tensor, cached: MatrixSVD | None, top: int) -> PairSpectra:
    """Decompose W0, W1 = W0 + dW and dW, and with ``top`` > 0 the leading ``top`` singular vectors of W0 and W1.

    Args:
        name: the matrix's name, for messages.
        w0: pretrained matrix (out x in).
        dw: its update, same shape.
        cached: W0's decomposition from ``decompose`` (checked against W0), or None to compute it here. Without
            ``basis`` it serves only when no vectors are wanted.
        top: how many leading singular vectors to compare (capped at min(out, in)); 0 for values only.
    """
    a0, transposed, w0_norm = orient(w0)
    d, _, d_norm = orient(dw)
    n = a0.shape[1]
    top = min(top, n)
    if cached is not None:
        check_pretrained(name, cached, n, w0_norm)
    if cached is not None and (cached.basis is not None or top == 0):
        basis = None if cached.basis is None else PretrainedBasis(explicit=cached.basis.numpy())
        pre = _Pretrained(cached.S.numpy(), basis, None)
    else:
        pre = _pretrained(a0, top > 0)
    s0, basis = pre.s, pre.basis
    eps = input_eps(dw)
    if d_norm > 0:
        update = _analyse_update(d, d_norm, eps)
        tuned = _tuned_svd(a0, d, update, pre, top)
    else:  # W1 = W0
        update, tuned = _Update(np.zeros(n), None), _Tuned(s0, None, None)
    sides, left_max_cos = None, None
    if top > 0:
        assert basis is not None
        if tuned.coordinates is not None:  # one application of the basis for both
            v = basis.vectors(tuned.coordinates, leading=top)
        else:
            v0 = basis.leading(top)
            v = np.hstack([v0, v0 if tuned.v is None else tuned.v])
        v0, v1 = v[:, :top], v[:, top:]
        av = matmul(a0, v)  # A0 V0 and A1 V1 = A0 V1 + D V1 from one pass over A0
        a0v0, a1v1 = av[:, :top], av[:, top:]
        if update.factors is not None:
            left, right = update.factors
            a1v1 = a1v1 + matmul(left, matmul(right.T, v1))
        elif d_norm > 0:
            a1v1 = a1v1 + matmul(d, v1)
        u0, u1 = long_side(a0v0), long_side(a1v1)
        # W's left (output) side is the oriented matrix's right side when it was transposed
        short, long = (v0, v1), (u0, u1)
        sides = {"left": short, "right": long} if transposed else {"left": long, "right": short}
        left_max_cos = _pretrained_left_max_cos(a0, s0, basis, v0, sides["left"][1], transposed)
    return PairSpectra(
        s0=s0,
        s1=tuned.s,
        sd=update.values,
        pretrained_norm=w0_norm,
        update_norm=d_norm,
        update_rank=update_rank(update.values, tuple(w0.shape), eps),
        resolved_floor=resolved_floor(s0, n),
        sides=sides,
        left_max_cos=left_max_cos,
    )


# ----------------------------------------------------------------------------------------------------------------
# 4. Threads
# ----------------------------------------------------------------------------------------------------------------
T = TypeVar("T")
R = TypeVar("R")
_MAP_LOCK = threading.Lock()


def _workers(tasks: int) -> int:
    """Threads for per-matrix work: one per core torch may use (``torch.set_num_threads``), at most one per task."""
    return max(1, min(torch.get_num_threads(), tasks))


def parallel_map(fn: Callable[[T], R], items: list[T]) -> list[R]:
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
