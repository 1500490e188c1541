"""Random projections P: R^d -> R^D with (about) unit-norm columns, the re-parameterisation ``theta_0 + P theta_d``.

A dense Gaussian P (Li et al. 2018) for small D * d; above that, the Fastfood transform (Le et al. 2013, as
Aghajanyan et al. 2020 use it for intrinsic dimension), built on the fast Walsh-Hadamard transform, which needs
O(D) memory and O(D log D) time and never forms a D x d matrix.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def _hadamard(m: int, like: Tensor) -> Tensor:
    """Sylvester's m x m Hadamard matrix (natural order) on ``like``'s device and dtype."""
    h = torch.ones(1, 1, dtype=like.dtype, device=like.device)
    while h.shape[0] < m:
        h = torch.cat([torch.cat([h, h], dim=1), torch.cat([h, -h], dim=1)])
    return h


def fwht(x: Tensor, radix_bits: int = 4) -> Tensor:
    """Unnormalised fast Walsh-Hadamard transform along the last dimension (a power of two), ``x @ H``.

    H is Sylvester's Hadamard matrix in natural order (``scipy.linalg.hadamard``), so ``fwht(fwht(x)) = n x``.
    An iterative butterfly of radix ``m = 2**radix_bits``: write the index in base m (digits d_k ... d_1); since
    ``H_n = H_m kron ... kron H_m``, each pass mixes the lowest digit with one (n/m x m) @ (m x m) matmul, then
    rotates that digit to the top (a transpose), so after k passes every digit is mixed and back in place. With
    m = 16, n = 2**22 takes 6 passes over memory instead of the 22 of the textbook add/subtract butterfly
    (``radix_bits=1``). O(n log n) either way, and differentiable by autograd: it is linear, made of matmuls,
    reshapes and transposes.
    """
    n = x.shape[-1]
    if n < 1 or n & (n - 1):
        raise ValueError(f"fwht needs a power-of-two length, got {n}")
    lead = x.shape[:-1]
    bits = n.bit_length() - 1
    digit_bits = [radix_bits] * (bits // radix_bits) + ([bits % radix_bits] if bits % radix_bits else [])
    kernels: dict[int, Tensor] = {}
    for b in digit_bits:
        m = 1 << b
        if m not in kernels:
            kernels[m] = _hadamard(m, x)
        x = x.reshape(-1, m) @ kernels[m]  # mix the lowest digit (H_m is symmetric)
        x = x.reshape(*lead, n // m, m).transpose(-1, -2).reshape(*lead, n)  # rotate it to the top
    return x


class Projection:
    """A fixed linear map ``(..., d) -> (..., D)`` with (about) unit-norm columns. ``kind`` names it."""

    kind: str = ""
    D: int
    d: int

    def __call__(self, theta: Tensor) -> Tensor:
        raise NotImplementedError

    @property
    def nbytes(self) -> int:
        """Memory held by the projection's random tensors."""
        return 0

    def matrix(self) -> Tensor:
        """The explicit D x d matrix, by applying the map to the identity's columns (small sizes only: tests)."""
        eye = torch.eye(self.d, device=self.device, dtype=torch.float32)
        return self(eye).T

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")


class IdentityProjection(Projection):
    """P = I (d = D): training the group's weights directly, the "full" baseline."""

    kind = "identity"

    def __init__(self, D: int, device: torch.device | str = "cpu") -> None:
        self.D = self.d = D
        self._device = torch.device(device)

    def __call__(self, theta: Tensor) -> Tensor:
        return theta

    @property
    def device(self) -> torch.device:
        return self._device


class DenseProjection(Projection):
    """Dense Gaussian P with exactly unit-norm columns (Li et al. 2018). Holds D*d floats: small sizes only."""

    kind = "dense"

    def __init__(self, D: int, d: int, seed: int, device: torch.device | str = "cpu") -> None:
        generator = torch.Generator().manual_seed(seed)
        weight = torch.randn(D, d, generator=generator)
        self.weight = (weight / weight.norm(dim=0, keepdim=True)).to(device)  # (D, d)
        self.D, self.d = D, d

    def __call__(self, theta: Tensor) -> Tensor:
        return theta @ self.weight.T

    @property
    def nbytes(self) -> int:
        return self.weight.nbytes

    @property
    def device(self) -> torch.device:
        return self.weight.device


class FastfoodProjection(Projection):
    """The Fastfood transform (Le et al. 2013) as used for intrinsic dimension by Aghajanyan et al. (2020).

    ``P theta = sum_b scale_b * (H G_b Pi_b H B_b theta_b)[:D]``: theta is zero-padded to ``blocks * L`` with
    ``L = 2**ceil(log2 D)`` and cut into ``blocks = ceil(d / L)`` pieces ``theta_b`` (stacked blocks, each with its own
    random B, Pi, G, so d may exceed L); B is a random +-1 diagonal, Pi a random permutation, G a Gaussian diagonal
    and H the unnormalised Hadamard matrix. Each column of ``H G Pi H B`` has norm ``sqrt(L * sum G**2)``; keeping D
    of its L rows keeps about ``D / L`` of the squared norm, so ``scale_b = 1 / sqrt(D * sum G_b**2)`` gives columns
    of about unit norm. Memory is O(blocks * L), time O(blocks * L log L); no D x d matrix is ever formed.

    Attributes:
        L: the padded length, the power of two ``2**ceil(log2 D)``.
        blocks: how many stacked transforms, ``ceil(d / L)``.
        sign: B, shape (blocks, L), int8 +-1.
        perm: Pi as row gathers, shape (blocks, L): ``(Pi x)[i] = x[perm[i]]``.
        gauss: G, shape (blocks, L).
        scale: shape (blocks,).
    """

    kind = "fastfood"

    def __init__(self, D: int, d: int, seed: int, device: torch.device | str = "cpu") -> None:
        generator = torch.Generator().manual_seed(seed)
        self.D, self.d = D, d
        self.L = 1 << max(0, (D - 1).bit_length())
        self.blocks = -(-d // self.L)
        blocks, L = self.blocks, self.L
        self.sign = (torch.randint(0, 2, (blocks, L), generator=generator, dtype=torch.int8) * 2 - 1).to(device)
        perm = torch.stack([torch.randperm(L, generator=generator) for _ in range(blocks)])
        self.gauss = torch.randn(blocks, L, generator=generator).to(device)
        self.scale = 1.0 / torch.sqrt(D * self.gauss.square().sum(dim=-1))
        # Pi of every block as one flat gather (int32 halves the index memory; index_select accepts it).
        index_dtype = torch.int32 if blocks * L < 2**31 else torch.int64
        flat_perm = perm + torch.arange(blocks)[:, None] * L
        self._flat_perm = flat_perm.reshape(-1).to(device=device, dtype=index_dtype)

    def __call__(self, theta: Tensor) -> Tensor:
        lead = theta.shape[:-1]
        blocks, L = self.blocks, self.L
        x = F.pad(theta, (0, blocks * L - self.d)).reshape(*lead, blocks, L)
        x = fwht(x * self.sign)  # H B theta_b
        x = x.reshape(*lead, blocks * L).index_select(-1, self._flat_perm).reshape(*lead, blocks, L)  # Pi
        x = fwht(x * self.gauss)  # H G (...)
        return (x[..., : self.D] * self.scale[:, None]).sum(dim=-2)  # (..., D)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in (self.sign, self._flat_perm, self.gauss, self.scale))

    @property
    def perm(self) -> Tensor:
        offsets = torch.arange(self.blocks, device=self.device)[:, None] * self.L
        return self._flat_perm.view(self.blocks, self.L).long() - offsets

    @property
    def device(self) -> torch.device:
        return self.gauss.device


class ConcatProjection(Projection):
    """Independent projections of the same theta for consecutive chunks of theta's D coordinates.

    Chunk c (of size D_c) is weighted by ``sqrt(D_c / D)``: every coordinate then has the same variance 1/D, as with a
    dense Gaussian P, and whole columns keep about unit norm.
    """

    def __init__(self, parts: Sequence[Projection]) -> None:
        if not parts or len({p.d for p in parts}) != 1:
            raise ValueError("ConcatProjection needs at least one part, all with the same d")
        self.parts = list(parts)
        self.D = sum(p.D for p in parts)
        self.d = parts[0].d
        self.kind = parts[0].kind if len({p.kind for p in parts}) == 1 else "mixed"
        self.weights = [math.sqrt(p.D / self.D) for p in parts]

    def __call__(self, theta: Tensor) -> Tensor:
        return torch.cat([w * p(theta) for w, p in zip(self.weights, self.parts, strict=True)], dim=-1)

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)

    @property
    def device(self) -> torch.device:
        return self.parts[0].device


def fastfood_chunks(D: int, min_chunk: int = 2**12) -> list[int]:
    """Split D into power-of-two chunks (the binary digits of D that are at least ``min_chunk``) and a remainder.

    Padding each chunk to a power of two then costs nothing except in the remainder (below ``min_chunk``), where one
    Fastfood over the whole of D could waste up to half its length: a ViT-S q slice has D = 147,456 = 9 * 2**14,
    which one transform pads to 2**18 (1.8x), while the chunks 2**17 + 2**14 need no padding.
    """
    chunks = [1 << b for b in range(D.bit_length() - 1, -1, -1) if D >> b & 1 and 1 << b >= min_chunk]
    rest = D - sum(chunks)
    return chunks + ([rest] if rest else [])


def make_projection(
    D: int,
    d: int,
    seed: int,
    *,
    max_dense_elements: int = 2**24,
    device: torch.device | str = "cpu",
) -> Projection:
    """A random P of D rows and d columns with (about) unit-norm columns; the same ``seed`` gives the same P.

    Dense Gaussian when ``D * d <= max_dense_elements``; otherwise independent Fastfood transforms over the chunks
    of `fastfood_chunks` (Aghajanyan et al. likewise use one transform per weight matrix), combined by
    `ConcatProjection`. Memory and time stay O(D + d) and O((D + d) log D): no D x d matrix is ever formed.
    """
    if d < 1 or D < 1:
        raise ValueError(f"a projection needs d >= 1 and D >= 1, got d={d}, D={D}")
    if D * d <= max_dense_elements:
        return DenseProjection(D, d, seed, device)
    parts = [FastfoodProjection(n, d, seed * 7919 + i, device) for i, n in enumerate(fastfood_chunks(D))]
    return parts[0] if len(parts) == 1 else ConcatProjection(parts)
