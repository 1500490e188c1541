"""Metrics on singular values and vectors: relative changes, principal angles, intruder dimensions, ranks.

Pure functions of tensors (batches allowed where stated); the report applies them to the engine's decompositions.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import scipy.linalg
import torch
from torch import Tensor

from core.spectra._lapack import matmul
from core.spectra.engine import numpy64, qr


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
    u0, u1 = numpy64(U0), numpy64(U1)
    batch = u0.shape[:-2]
    flat0, flat1 = u0.reshape(-1, *u0.shape[-2:]), u1.reshape(-1, *u1.shape[-2:])
    pairs = [principal_angles(a, b, k) for a, b in zip(flat0, flat1, strict=True)]
    angles = np.stack([a for a, _ in pairs]).reshape(*batch, -1)
    overlap = np.array([o for _, o in pairs]).reshape(batch)
    return Rotation(torch.from_numpy(angles).float(), torch.from_numpy(overlap).float())


def principal_angles(u0: np.ndarray, u1: np.ndarray, k: int) -> tuple[np.ndarray, float]:
    """``subspace_rotation`` of two float64 matrices: (angles in degrees, overlap)."""
    k = min(k, u0.shape[-1], u1.shape[-1])
    a = qr(u0[:, :k])[0]  # re-orthonormalised so that equal inputs give angles of 1e-14 degrees
    b = qr(u1[:, :k])[0]
    cross = matmul(a.T, b)  # (k, k)
    cos = np.clip(scipy.linalg.svdvals(cross, check_finite=False), 0.0, 1.0)  # descending -> angles ascending
    sin = np.clip(scipy.linalg.svdvals(b - matmul(a, cross), check_finite=False), 0.0, 1.0)[::-1]  # ascending
    angles = np.where(np.square(cos) < 0.5, np.arccos(cos), np.arcsin(sin))
    return np.degrees(angles), float(np.clip(np.square(cross).sum() / k, 0.0, 1.0))


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
    return intruders_from_cosines(max_cosine(U0, U1, min(k, U1.shape[-1])), S1, eps)


def intruders_from_cosines(max_cos: Tensor, S1: Tensor, eps: float) -> Intruders:
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
