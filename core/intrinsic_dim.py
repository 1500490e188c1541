"""Local intrinsic dimension of parameter groups (random-subspace training) and d90 submodule selection.

Li et al. (2018), "Measuring the Intrinsic Dimension of Objective Landscapes": freeze the model, re-parameterise one
group of D weights as ``theta = theta_0 + P theta_d`` with a fixed random projection P (D x d), train only
``theta_d`` (and a fresh classifier head), and call *d90* the smallest d whose validation accuracy reaches 90% of
training the whole group normally (all D weights plus the head). KAdaptation uses it to decide which submodules to
adapt: a group with a low d90 adapts with few degrees of freedom. The exact protocol of the KAdaptation paper is
unverified (spec, "Intrinsic dimension"); this module implements Li et al.'s definition.

Read in this order:
    1. Projections: the fast Walsh-Hadamard transform, dense Gaussian P (small D*d) and Fastfood P (large D*d).
    2. Groups: which (block, matrix) pairs a group holds, written as a ``Targets`` string, and its weight slots.
    3. One trial: train ``theta_d`` (or the whole group) and a fresh head through ``torch.func.functional_call``.
    4. The d90 search: a log grid of d, then integer bisection, within a trial budget.
    5. The measurement over groups, its result, and the recommended ``targets`` string.
    6. A cheap proxy of a *different* quantity: the intrinsic dimension of each block's output representation
       (TwoNN, Facco et al. 2017; MLE, Levina and Bickel 2004).

The model is never copied and never written to: every trial passes the group's re-parameterised weights (and the
head) to ``functional_call``; every other parameter is the model's own tensor, bit for bit. Everything runs on the
device the model's parameters are on. The model is put in eval mode (no dropout) for the measurement and its
``requires_grad`` flags and training mode are restored afterwards.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils.data import DataLoader, Dataset

from core.methods.base import MATRICES, MATRIX_LINEAR, QKV_SLICES, Targets, inspect_vit

Data = Dataset | DataLoader | tuple[Tensor, Tensor]
"""Training or validation data yielding ``(input, label)``: a Dataset, a DataLoader, or ``(inputs, labels)`` tensors
already in memory (batched by slicing: the fastest for small problems)."""
LossFn = Callable[[Tensor, Tensor], Tensor]
ScoreFn = Callable[[Tensor, Tensor], Tensor]
"""``score(outputs, labels)``: one score in [0, 1] per sample; the validation accuracy is their mean."""
OnTrial = Callable[[str, int, float], None]
"""``on_trial(group, d, accuracy)``; the full-training baseline of a group is reported with ``d`` = its size D."""
ShouldStop = Callable[[], bool]

REPRESENTATION_ID_LABEL = (
    "intrinsic dimension of the block's output representation (a property of the data manifold as the frozen model "
    "embeds it), not the local intrinsic dimension d90 of the loss landscape"
)


# ----------------------------------------------------------------------------------------------------------------
# 1. Projections P: R^d -> R^D
# ----------------------------------------------------------------------------------------------------------------
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
    m = 16, n = 2**22 takes 6 passes over memory instead of 22, about 3x faster on a CPU than the textbook
    add/subtract butterfly (``radix_bits=1``). O(n log n) either way, and differentiable by autograd: it is linear,
    made of matmuls, reshapes and transposes.
    """
    n = x.shape[-1]
    if n < 1 or n & (n - 1):
        raise ValueError(f"fwht needs a power-of-two length, got {n}")
    lead = x.shape[:-1]
    bits = n.bit_length() - 1
    digits = [radix_bits] * (bits // radix_bits) + ([bits % radix_bits] if bits % radix_bits else [])
    kernels: dict[int, Tensor] = {}
    for b in digits:
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
        nb, L = self.blocks, self.L
        self.sign = (torch.randint(0, 2, (nb, L), generator=generator, dtype=torch.int8) * 2 - 1).to(device)
        perm = torch.stack([torch.randperm(L, generator=generator) for _ in range(nb)])
        self.gauss = torch.randn(nb, L, generator=generator).to(device)
        self.scale = 1.0 / torch.sqrt(D * self.gauss.square().sum(dim=-1))
        # Pi of every block as one flat gather (int32 halves the index memory; index_select accepts it).
        index_dtype = torch.int32 if nb * L < 2**31 else torch.int64
        self._flat_perm = (perm + torch.arange(nb)[:, None] * L).reshape(-1).to(device=device, dtype=index_dtype)

    def __call__(self, theta: Tensor) -> Tensor:
        lead = theta.shape[:-1]
        nb, L = self.blocks, self.L
        x = F.pad(theta, (0, nb * L - self.d)).reshape(*lead, nb, L)
        x = fwht(x * self.sign)  # H B theta_b
        x = x.reshape(*lead, nb * L).index_select(-1, self._flat_perm).reshape(*lead, nb, L)  # Pi
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


# ----------------------------------------------------------------------------------------------------------------
# 2. Groups and their weight slots
# ----------------------------------------------------------------------------------------------------------------
GROUP_SCHEMES: dict[str, str] = {
    "attn-mlp": "attention (q, k, v, proj) vs MLP (fc1, fc2), all blocks together",
    "matrices": "each matrix type (q, k, v, proj, fc1, fc2) across all blocks",
    "blocks": "each block, all six matrices",
    "attn-mlp-blocks": "attention and MLP of each block",
    "matrices-blocks": "each matrix of each block (6 x depth groups)",
}


def scheme_groups(scheme: str, depth: int) -> list[str]:
    """The groups of a named scheme (`GROUP_SCHEMES`) as ``Targets`` strings, e.g. ``["attn", "mlp"]``."""
    blocks = range(depth)
    table: dict[str, list[str]] = {
        "attn-mlp": ["attn", "mlp"],
        "matrices": list(MATRICES),
        "blocks": [f"all:{b}" for b in blocks],
        "attn-mlp-blocks": [f"{g}:{b}" for b in blocks for g in ("attn", "mlp")],
        "matrices-blocks": [f"{m}:{b}" for b in blocks for m in MATRICES],
    }
    if scheme not in table:
        raise ValueError(
            f"unknown group scheme {scheme!r}; choose one of {', '.join(GROUP_SCHEMES)} or pass a list of "
            "targets strings (one group each, e.g. ['q,v', 'fc1,fc2'])"
        )
    return table[scheme]


def resolve_groups(groups: str | Sequence[str], depth: int) -> list[str]:
    """Groups as canonical ``Targets`` strings: a scheme name, or a list of targets strings (one group each)."""
    texts = scheme_groups(groups, depth) if isinstance(groups, str) else list(groups)
    if not texts:
        raise ValueError("no groups to measure")
    out = []
    for text in texts:
        targets = Targets.parse(text)
        targets.resolve(depth)  # raises on an out-of-range block
        out.append(str(targets))
    if len(set(out)) != len(out):
        raise ValueError(f"groups {out} name the same group twice")
    return out


@dataclass(frozen=True)
class Slot:
    """One re-parameterised piece of a group: rows ``rows`` (start, end) of parameter ``param``, or all of it.

    A q, k or v matrix is a row slice of the fused ``attn.qkv.weight``; proj, fc1 and fc2 are whole weights.
    Biases are not part of a group.
    """

    param: str
    rows: tuple[int, int] | None = None


def group_slots(model: nn.Module, targets: str | Targets) -> list[Slot]:
    """The weight slots of a group of a timm ViT, in block then ``MATRICES`` order."""
    arch = inspect_vit(model)
    width = arch.embed_dim
    slots = []
    for b, mats in Targets.parse(targets).resolve(arch.depth).items():
        for m in mats:
            name = f"blocks.{b}.{MATRIX_LINEAR[m]}.weight"
            if m in QKV_SLICES:
                i = QKV_SLICES.index(m)
                slots.append(Slot(name, (i * width, (i + 1) * width)))
            else:
                slots.append(Slot(name))
    return slots


def slot_sizes(model: nn.Module, slots: Sequence[Slot]) -> list[int]:
    """How many weights each slot holds."""
    params = dict(model.named_parameters())
    sizes = []
    for s in slots:
        w = params[s.param]
        sizes.append(w.numel() if s.rows is None else (s.rows[1] - s.rows[0]) * w[0].numel())
    return sizes


def classifier_path(model: nn.Module) -> str:
    """The module path of ``model.get_classifier()`` (``"head"`` for timm ViTs)."""
    head = model.get_classifier()
    if not any(p.numel() for p in head.parameters()):
        raise ValueError("the model has no classifier head (num_classes=0); create it with the task's class count")
    return next(name for name, module in model.named_modules() if module is head)


class Reparam:
    """Builds a group's parameters from a flat update: ``theta_0 + delta``, delta laid out slot after slot.

    ``Reparam(dict(model.named_parameters()), slots)(delta)`` is the ``{name: tensor}`` dict to pass to
    ``functional_call`` (with ``prefix`` when the called module holds the model under that name).

    For a row slice of a fused weight the whole weight is rebuilt as the concatenation of its slices, the frozen
    ones being the model's own tensors (so they stay bit-identical and get no gradient).
    """

    def __init__(self, params: dict[str, Tensor], slots: Sequence[Slot], prefix: str = "") -> None:
        self.base: dict[str, Tensor] = {}
        self.pieces: dict[str, list[tuple[tuple[int, int] | None, int, int]]] = {}  # name -> (rows, offset, size)
        self.sizes: list[int] = []
        offset = 0
        for s in slots:
            name = prefix + s.param
            if name not in params:
                raise ValueError(f"the model has no parameter {s.param!r}")
            w = params[name].detach()
            size = w.numel() if s.rows is None else (s.rows[1] - s.rows[0]) * w[0].numel()
            if s.rows is not None and not 0 <= s.rows[0] < s.rows[1] <= w.shape[0]:
                raise ValueError(f"rows {s.rows} are outside {s.param} ({w.shape[0]} rows)")
            self.base[name] = w
            self.pieces.setdefault(name, []).append((s.rows, offset, size))
            self.sizes.append(size)
            offset += size
        for name, pieces in self.pieces.items():
            ranges = sorted((r if r is not None else (0, self.base[name].shape[0])) for r, _, _ in pieces)
            if any(a[1] > b[0] for a, b in zip(ranges, ranges[1:], strict=False)) or (
                len(pieces) > 1 and any(r is None for r, _, _ in pieces)
            ):
                raise ValueError(f"slots overlap in {name}")
            pieces.sort(key=lambda p: p[0][0] if p[0] is not None else 0)
        self.D = offset

    def __call__(self, delta: Tensor) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for name, pieces in self.pieces.items():
            w = self.base[name]
            if pieces[0][0] is None:
                _, offset, size = pieces[0]
                out[name] = w + delta[offset : offset + size].view_as(w)
                continue
            parts, row = [], 0
            for rows, offset, size in pieces:
                start, end = rows  # type: ignore[misc]
                if row < start:
                    parts.append(w[row:start])
                parts.append(w[start:end] + delta[offset : offset + size].view(end - start, *w.shape[1:]))
                row = end
            if row < w.shape[0]:
                parts.append(w[row:])
            out[name] = torch.cat(parts)
        return out


# ----------------------------------------------------------------------------------------------------------------
# 3. One trial
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class IntrinsicDimConfig:
    """How to measure; JSON-serialisable.

    Attributes:
        steps: Adam steps per trial (each trial starts from theta_d = 0 and the same fresh head).
        batch_size: samples per step.
        lr: Adam learning rate of theta_d. P has unit-norm columns, so one step moves the weights by about
            ``lr * sqrt(d)`` in norm: the subspace needs a larger rate than the whole group.
        full_lr: Adam learning rate of the group's weights in the full-training baseline.
        head_lr: Adam learning rate of the fresh head (both kinds).
        cosine: decay the learning rates to 0 over the steps (cosine); otherwise constant. Decaying makes the
            end-of-trial accuracy less noisy, which matters when trials are compared against a threshold.
        seed: seeds the head, P, and the batch order (the same in every trial).
        threshold: d90 is the smallest d whose accuracy reaches ``threshold`` x the full-training accuracy.
        d_min: first d of the grid ``d_min * 2**i``.
        d_max: last d of the grid (capped at the group's size D, which is added to the grid when it is smaller).
        max_trials: subspace trials per group (grid and bisection together; the baseline is not counted).
        max_dense_elements: the largest D * d for which P is a dense matrix; Fastfood above it.
        cache_block_inputs: train from the cached input tokens of a group's first block (exact for a frozen model
            in eval mode and deterministic data: no random augmentation) instead of from images each step.
        cache_bytes: memory bound of that cache (train and validation together); beyond it, no cache.
        select: how the recommended targets are chosen: the ``top_k`` lowest d90, or every group ``within`` a factor
            of the lowest d90.
        top_k: groups kept by ``select="top_k"``.
        within: factor of ``select="within"``.
    """

    steps: int = 100
    batch_size: int = 32
    lr: float = 1e-2
    full_lr: float = 1e-4
    head_lr: float = 1e-2
    cosine: bool = True
    seed: int = 0
    threshold: float = 0.9
    d_min: int = 8
    d_max: int = 8192
    max_trials: int = 16
    max_dense_elements: int = 2**24
    cache_block_inputs: bool = True
    cache_bytes: int = 2**30
    select: Literal["top_k", "within"] = "within"
    top_k: int = 1
    within: float = 2.0

    def __post_init__(self) -> None:
        checks = [
            (self.steps >= 1, f"steps={self.steps} must be at least 1"),
            (self.batch_size >= 1, f"batch_size={self.batch_size} must be at least 1"),
            (min(self.lr, self.full_lr, self.head_lr) > 0, "lr, full_lr and head_lr must be positive"),
            (0 < self.threshold <= 1, f"threshold={self.threshold} must be in (0, 1]"),
            (1 <= self.d_min <= self.d_max, f"need 1 <= d_min <= d_max, got d_min={self.d_min}, d_max={self.d_max}"),
            (self.max_trials >= 1, f"max_trials={self.max_trials} must be at least 1"),
            (self.max_dense_elements >= 0, "max_dense_elements must be >= 0"),
            (self.cache_bytes >= 0, "cache_bytes must be >= 0"),
            (self.select in ("top_k", "within"), f"select={self.select!r} must be 'top_k' or 'within'"),
            (self.top_k >= 1, f"top_k={self.top_k} must be at least 1"),
            (self.within >= 1, f"within={self.within} must be >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


class Cancelled(Exception):
    """Raised inside a trial when ``should_stop()`` returns True; `measure_intrinsic_dimension` catches it."""


def accuracy_score(outputs: Tensor, labels: Tensor) -> Tensor:
    """Top-1 correctness per sample."""
    return (outputs.argmax(dim=-1) == labels).float()


class _Batches:
    """Batches of ``(input, label)`` on a device: from the user's data, or from cached tensors."""

    def __init__(
        self,
        data: Data | None,
        batch_size: int,
        shuffle: bool,
        device: torch.device,
        tensors: tuple[Tensor, Tensor] | None = None,
    ) -> None:
        if isinstance(data, tuple):
            tensors, data = (data[0].to(device), torch.as_tensor(data[1]).to(device)), None
        self.data, self.batch_size, self.shuffle, self.device, self.tensors = data, batch_size, shuffle, device, tensors

    def unshuffled(self) -> _Batches:
        return _Batches(self.data, self.batch_size, False, self.device, self.tensors)

    def epoch(self, seed: int) -> Iterator[tuple[Tensor, Tensor]]:
        """One pass; shuffled by ``seed`` unless this is validation data or the user's own DataLoader.

        Datasets and tensors are shuffled by the same permutation for the same seed, so a trial on cached block
        inputs sees exactly the batches a trial on the images would.
        """
        n = len(self.tensors[1]) if self.tensors is not None else None
        if self.tensors is None and not isinstance(self.data, DataLoader):
            n = len(self.data)  # type: ignore[arg-type]
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)) if self.shuffle and n else None
        if self.tensors is not None:
            x, y = self.tensors
            for i in range(0, len(y), self.batch_size):
                idx = order[i : i + self.batch_size] if order is not None else slice(i, i + self.batch_size)
                yield x[idx], y[idx]
            return
        loader = self.data
        if not isinstance(loader, DataLoader):
            sampler = order.tolist() if order is not None else None
            loader = DataLoader(loader, batch_size=self.batch_size, sampler=sampler)
        for batch in loader:
            x, y = batch[0], batch[1]
            yield x.to(self.device), torch.as_tensor(y).to(self.device)

    def steps(self, count: int, seed: int) -> Iterator[tuple[Tensor, Tensor]]:
        """``count`` batches, epoch after epoch (epoch e shuffled by ``seed + e``)."""
        done, epoch = 0, 0
        while done < count:
            empty = True
            for batch in self.epoch(seed + epoch):
                empty = False
                yield batch
                done += 1
                if done == count:
                    return
            if empty:
                raise ValueError("the training data is empty")
            epoch += 1


@dataclass
class TrialOutcome:
    """One trained trial.

    Attributes:
        accuracy: mean validation score.
        projection: ``dense``, ``fastfood``, ``identity`` (full training) or ``none`` (head only).
        weights: the trained group parameters (whole tensors, rebuilt from their slots) and head, by parameter name
            of the model, detached. Everything not in it is the model's own tensor.
        diverged: the loss became non-finite and training stopped early.
    """

    accuracy: float
    projection: str
    weights: dict[str, Tensor]
    diverged: bool = False


def _run_trial(
    runner: nn.Module,
    reparam: Reparam,
    projection: Projection | None,
    head_init: dict[str, Tensor],
    train: _Batches,
    val: _Batches,
    config: IntrinsicDimConfig,
    lr: float,
    loss_fn: LossFn,
    score_fn: ScoreFn,
    should_stop: ShouldStop | None,
) -> TrialOutcome:
    """Train theta (the projection's d coordinates) and the head from their initial values, then validate."""
    device = projection.device if projection is not None else next(runner.parameters()).device
    theta = torch.zeros(projection.d if projection is not None else 0, device=device, requires_grad=True)
    head = {name: t.clone().requires_grad_(True) for name, t in head_init.items()}
    groups = [{"params": [theta], "lr": lr}] if projection is not None else []
    if head:
        groups.append({"params": list(head.values()), "lr": config.head_lr})
    if not groups:
        raise ValueError("nothing to train: no group and no head")
    optimizer = torch.optim.Adam(groups)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / config.steps)) if config.cosine else 1.0
    )

    def params() -> dict[str, Tensor]:
        group = reparam(projection(theta)) if projection is not None else {}
        return group | head

    diverged = False
    for x, y in train.steps(config.steps, config.seed):
        if should_stop is not None and should_stop():
            raise Cancelled
        loss = loss_fn(functional_call(runner, params(), (x,)), y)
        if not torch.isfinite(loss):
            diverged = True
            break
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    with torch.no_grad():
        final = params()
        total, count = 0.0, 0
        for x, y in val.epoch(0):
            scores = score_fn(functional_call(runner, final, (x,)), y)
            total += float(scores.sum())
            count += scores.numel()
    if count == 0:
        raise ValueError("the validation data is empty")
    prefix_len = len(_prefix(runner))
    weights = {name[prefix_len:]: t.detach() for name, t in final.items()}
    kind = projection.kind if projection is not None else "none"
    return TrialOutcome(total / count, kind, weights, diverged)


def _prefix(runner: nn.Module) -> str:
    return "model." if isinstance(runner, _FromBlock) else ""


@contextlib.contextmanager
def _frozen(model: nn.Module) -> Iterator[None]:
    """No parameter requires grad and the model is in eval mode inside; both restored on exit."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    modes = [(m, m.training) for m in model.modules()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        model.eval()
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        for m, mode in modes:
            m.training = mode


def fresh_head(model: nn.Module, path: str, seed: int, prefix: str = "") -> dict[str, Tensor]:
    """A newly initialised copy of the head's parameters (timm's init: trunc-normal std .02 weights, zero biases).

    The same seed gives the same head, so every trial starts from the same one.
    """
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for name, p in model.get_submodule(path).named_parameters():
        t = torch.zeros(p.shape)
        if p.dim() >= 2:
            nn.init.trunc_normal_(t, std=0.02, generator=generator)
        out[f"{prefix}{path}.{name}"] = t.to(device=p.device, dtype=p.dtype)
    return out


def subspace_trial(
    model: nn.Module,
    slots: Sequence[Slot],
    d: int | None,
    train: Data,
    val: Data,
    config: IntrinsicDimConfig | None = None,
    *,
    head: str | None = None,
    loss_fn: LossFn = F.cross_entropy,
    score_fn: ScoreFn = accuracy_score,
    should_stop: ShouldStop | None = None,
) -> TrialOutcome:
    """Train the slots of any module in a random d-dimensional subspace (``d=None``: all their weights), and score it.

    The generic core under `measure_intrinsic_dimension`, usable on any ``nn.Module`` whose forward takes the
    inputs: ``theta = theta_0 + P theta_d`` with P from `make_projection` (seeded by ``config.seed``), Adam on
    theta_d (``config.lr``; ``config.full_lr`` when ``d`` is None) for ``config.steps`` steps.

    Args:
        head: module path of a classifier to re-initialise (`fresh_head`) and train beside the slots, or None.
        loss_fn: training loss of ``(outputs, labels)``.
        score_fn: per-sample validation score in [0, 1] (accuracy by default).

    Raises:
        Cancelled: when ``should_stop()`` returns True.
    """
    config = config or IntrinsicDimConfig()
    device = next(model.parameters()).device
    with _frozen(model):
        reparam = Reparam(dict(model.named_parameters()), slots)
        if d is None:
            projection: Projection = IdentityProjection(reparam.D, device)
        else:
            projection = make_projection(
                reparam.D, d, config.seed, max_dense_elements=config.max_dense_elements, device=device
            )
        head_init = fresh_head(model, head, config.seed) if head is not None else {}
        return _run_trial(
            model,
            reparam,
            projection,
            head_init,
            _Batches(train, config.batch_size, True, device),
            _Batches(val, config.batch_size, False, device),
            config,
            config.full_lr if d is None else config.lr,
            loss_fn,
            score_fn,
            should_stop,
        )


# ----------------------------------------------------------------------------------------------------------------
# 4. The d90 search
# ----------------------------------------------------------------------------------------------------------------
def d_grid(d_min: int, d_max: int) -> list[int]:
    """``d_min * 2**i`` up to ``d_max``, plus ``d_max`` itself when it is not on the grid."""
    grid = []
    d = d_min
    while d <= d_max:
        grid.append(d)
        d *= 2
    if grid[-1] != d_max:
        grid.append(d_max)
    return grid


@dataclass(frozen=True)
class D90Search:
    """The outcome of `search_d90`.

    Attributes:
        d90: the smallest d found to reach the target, or None.
        trials: (d, accuracy) in the order evaluated.
        reason: why d90 is None, or what limits it (an upper bound when the budget cut the bisection short).
    """

    d90: int | None
    trials: tuple[tuple[int, float], ...]
    reason: str


def search_d90(
    evaluate: Callable[[int], float],
    target: float,
    *,
    d_min: int,
    d_max: int,
    max_trials: int,
) -> D90Search:
    """Find the smallest d with ``evaluate(d) >= target``, assuming accuracy grows with d.

    Walks the grid `d_grid` upwards and stops at the first passing point; then bisects on integers between the last
    failing and the first passing grid points. At most ``max_trials`` calls of ``evaluate``.
    """
    trials: list[tuple[int, float]] = []

    def run(d: int) -> bool:
        acc = evaluate(d)
        trials.append((d, acc))
        return acc >= target

    lo: int | None = None
    hi: int | None = None
    for d in d_grid(d_min, d_max):
        if len(trials) >= max_trials:
            break
        if run(d):
            hi = d
            break
        lo = d
    if hi is None:
        best_d, best = max(trials, key=lambda t: t[1])
        if lo == d_max:
            why = f"no d up to {d_max} reached the target {target:.3f}"
        else:
            why = f"the trial budget ({max_trials}) ran out at d={lo} before the target {target:.3f} was reached"
        return D90Search(None, tuple(trials), f"{why} (best {best:.3f} at d={best_d})")
    if lo is None:
        return D90Search(hi, tuple(trials), f"reached at the smallest d tried (d_min={d_min}): d90 <= {d_min}")
    while hi - lo > 1:
        if len(trials) >= max_trials:
            return D90Search(
                hi, tuple(trials), f"the trial budget ran out during bisection: d90 is in ({lo}, {hi}], reported {hi}"
            )
        mid = (lo + hi) // 2
        if run(mid):
            hi = mid
        else:
            lo = mid
    return D90Search(hi, tuple(trials), "")


# ----------------------------------------------------------------------------------------------------------------
# 5. The measurement over groups
# ----------------------------------------------------------------------------------------------------------------
class _FromBlock(nn.Module):
    """Runs a timm ViT from the tokens entering block ``start`` (after the last block when ``start == depth``).

    ``start=None`` runs the whole model from images. Parameter names are the model's with a ``model.`` prefix.
    """

    def __init__(self, model: nn.Module, start: int | None) -> None:
        super().__init__()
        self.model = model
        self.start = start

    def forward(self, x: Tensor) -> Tensor:
        if self.start is None:
            return self.model(x)
        for block in list(self.model.blocks)[self.start :]:
            x = block(x)
        return self.model.forward_head(self.model.norm(x))


class _Captured(Exception):
    """Stops a forward pass once the hook has the tokens it wanted."""


def _block_inputs(
    model: nn.Module, data: _Batches, start: int, budget: int
) -> tuple[tuple[Tensor, Tensor] | None, str]:
    """The tokens entering block ``start`` for every sample of ``data`` (one ordered pass), with their labels.

    Returns (None, why) when they exceed ``budget`` bytes or when running the model from those tokens does not
    reproduce its logits (a ViT whose forward does more than blocks -> norm -> forward_head).
    """
    blocks = model.blocks
    captured: list[Tensor] = []

    def keep(tokens: Tensor) -> None:
        captured.append(tokens.detach())
        raise _Captured

    if start < len(blocks):
        handle = blocks[start].register_forward_pre_hook(lambda module, args: keep(args[0]))
    else:
        handle = blocks[-1].register_forward_hook(lambda module, args, output: keep(output))
    xs, ys, used = [], [], 0
    first: Tensor | None = None
    try:
        with torch.no_grad():
            # In dataset order (unshuffled), so that batching the cache with a seed gives the batches a DataLoader
            # over the same Dataset gives with that seed.
            for x, y in data.unshuffled().epoch(0):
                first = x if first is None else first
                with contextlib.suppress(_Captured):
                    model(x)
                if not captured:
                    return None, "the model never called its blocks"
                tokens = captured.pop()
                used += tokens.numel() * tokens.element_size()
                if used > budget:
                    return None, f"the block inputs exceed the cache bound ({budget / 2**20:.0f} MiB)"
                xs.append(tokens)
                ys.append(y)
    finally:
        handle.remove()
    if first is None:
        return None, "the data is empty"
    x = torch.cat(xs)
    with torch.no_grad():
        expected = model(first)
        got = _FromBlock(model, start)(x[: len(first)])
    if not torch.allclose(got, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()) + 1e-6):
        return None, "running the model from cached block inputs does not reproduce its logits"
    return (x, torch.cat(ys)), ""


class _Sources:
    """Train/validation batches and the runner for a start block, cached for one start block at a time."""

    def __init__(self, model: nn.Module, train: Data, val: Data, config: IntrinsicDimConfig) -> None:
        self.model, self.config = model, config
        self.device = next(model.parameters()).device
        self.raw = (
            _Batches(train, config.batch_size, True, self.device),
            _Batches(val, config.batch_size, False, self.device),
        )
        self.key: int | None = None
        self.cached: tuple[nn.Module, _Batches, _Batches] | None = None
        self.notes: list[str] = []

    def get(self, start: int) -> tuple[nn.Module, _Batches, _Batches]:
        if not self.config.cache_block_inputs:
            return _FromBlock(self.model, None), *self.raw
        if self.key == start and self.cached is not None:
            return self.cached
        self.cached = None  # free the previous cache before building the next
        train, why = _block_inputs(self.model, self.raw[0], start, self.config.cache_bytes)
        val = None
        if train is not None:
            used = train[0].numel() * train[0].element_size()
            val, why = _block_inputs(self.model, self.raw[1], start, self.config.cache_bytes - used)
        if train is None or val is None:
            self.notes.append(f"block {start}: trained from images ({why})")
            return _FromBlock(self.model, None), *self.raw
        bs = self.config.batch_size
        self.key = start
        self.cached = (
            _FromBlock(self.model, start),
            _Batches(None, bs, True, self.device, train),
            _Batches(None, bs, False, self.device, val),
        )
        return self.cached


@dataclass
class GroupResult:
    """The measurement of one group.

    Attributes:
        group: the group as a ``Targets`` string (``"attn"``, ``"q:3"``, ...).
        size: D, its number of weights.
        full_accuracy: validation accuracy of training all D weights and the head (None if not measured).
        target: ``threshold * full_accuracy``.
        d90: the smallest d reaching the target, or None (see ``reason``).
        reason: why d90 is None, or a caveat about it; empty when there is none.
        trials: subspace trials run.
        head_reaches_target: the head alone (d = 0) already reaches ``target``, so d90 carries little information.
    """

    group: str
    size: int
    full_accuracy: float | None = None
    target: float | None = None
    d90: int | None = None
    reason: str = ""
    trials: int = 0
    head_reaches_target: bool = False


@dataclass
class IntrinsicDimResult:
    """Everything a measurement found.

    Attributes:
        curves: one row per trial: group, d, accuracy, kind (``subspace`` or ``full``; ``full`` rows have d = D),
            projection (``dense``, ``fastfood``, ``identity``) and diverged.
        groups: per-group results, in the order measured.
        head_only_accuracy: the fresh head trained alone on the frozen model (d = 0): the floor every group starts
            from. When it already reaches a group's target, that group's d90 says little.
        majority_rate: the validation share of the most frequent class (chance level).
        recommended: the selection as a ``Targets`` string `core.methods` accepts, or None when no group has a d90.
        explanation: a plain-text account of the numbers and the choice.
        config: the settings used.
        depth: the model's block count (what ``recommended`` resolves against).
        cancelled: the measurement stopped early; unmeasured groups say so in their reason.
        notes: remarks on how it ran (e.g. where the block-input cache was not used).
    """

    curves: pd.DataFrame
    groups: list[GroupResult]
    head_only_accuracy: float | None
    majority_rate: float
    recommended: str | None
    explanation: str
    config: IntrinsicDimConfig
    depth: int
    cancelled: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def d90(self) -> dict[str, int | None]:
        return {g.group: g.d90 for g in self.groups}

    @property
    def full_accuracy(self) -> dict[str, float | None]:
        return {g.group: g.full_accuracy for g in self.groups}

    def table(self) -> pd.DataFrame:
        """One row per group, with the fields of `GroupResult`."""
        cols = ["group", "size", "full_accuracy", "target", "d90", "trials", "head_reaches_target", "reason"]
        return pd.DataFrame([{c: getattr(g, c) for c in cols} for g in self.groups], columns=cols)


def union_targets(groups: Sequence[str], depth: int) -> str:
    """The union of groups as one compact ``Targets`` string, checked to parse and resolve to exactly that union."""
    union: dict[int, set[str]] = {}
    for g in groups:
        for b, mats in Targets.parse(g).resolve(depth).items():
            union.setdefault(b, set()).update(mats)
    by_mats: dict[tuple[str, ...], list[int]] = {}
    for b in sorted(union):
        by_mats.setdefault(tuple(m for m in MATRICES if m in union[b]), []).append(b)
    terms = tuple((mats, None if blocks == list(range(depth)) else tuple(blocks)) for mats, blocks in by_mats.items())
    text = str(Targets(terms))
    resolved = Targets.parse(text).resolve(depth)
    if {b: set(m) for b, m in resolved.items()} != union:
        raise AssertionError(f"targets {text!r} do not resolve to the union of {list(groups)}")
    return text


def recommend_targets(
    groups: Sequence[GroupResult],
    depth: int,
    *,
    select: Literal["top_k", "within"] = "within",
    top_k: int = 1,
    within: float = 2.0,
) -> tuple[str | None, str]:
    """The groups to adapt, from their d90 (lower is better; ties go to the higher full accuracy).

    Groups whose target the head alone already reaches are left out when any other group has a d90: their low d90
    says the group barely matters for this task, not that it adapts cheaply.

    Returns:
        (targets, explanation): targets a string ``core.methods`` accepts (None when no group has a d90).
    """
    ranked = sorted((g for g in groups if g.d90 is not None), key=lambda g: (g.d90, -(g.full_accuracy or 0.0)))
    if not ranked:
        return None, "No group reached its target accuracy, so there is nothing to recommend."
    informative = [g for g in ranked if not g.head_reaches_target]
    caveat = ""
    if not informative:
        informative = ranked
        caveat = " Caveat: the head alone reaches every group's target, so these d90 values carry little information."
    elif len(informative) < len(ranked):
        skipped = ", ".join(g.group for g in ranked if g.head_reaches_target)
        caveat = f" Left out because the head alone already reaches their target: {skipped}."
    best = informative[0].d90
    assert best is not None
    if select == "top_k":
        chosen = informative[:top_k]
        rule = f"the {top_k} group(s) with the lowest d90"
    else:
        chosen = [g for g in informative if g.d90 is not None and g.d90 <= within * best]
        rule = f"every group whose d90 is within {within:g}x of the lowest ({best})"
    targets = union_targets([g.group for g in chosen], depth)
    names = ", ".join(f"{g.group} (d90={g.d90})" for g in chosen)
    return targets, f"Recommended targets {targets!r}: {rule}: {names}.{caveat}"


def measure_intrinsic_dimension(
    model: nn.Module,
    train: Data,
    val: Data,
    groups: str | Sequence[str] = "attn-mlp",
    config: IntrinsicDimConfig | None = None,
    *,
    on_trial: OnTrial | None = None,
    should_stop: ShouldStop | None = None,
) -> IntrinsicDimResult:
    """Measure d90 of each group of a timm ViT classifier, and recommend which groups to adapt.

    Per group: the full-training baseline (all its weights and a fresh head), then `search_d90` over subspace
    trials at ``threshold`` x that accuracy. Each trial starts from the pretrained weights and the same fresh head.
    With ``config.cache_block_inputs``, the tokens entering the group's first block are computed once (they do not
    depend on the group's weights) and each step runs only the blocks from there on. Once, before the groups, the
    head alone is trained (`IntrinsicDimResult.head_only_accuracy`).

    Args:
        model: a timm ViT with a classifier head for the task's classes; never modified.
        train: training data yielding ``(image, label)``; a Dataset is shuffled by ``config.seed``, a DataLoader is
            used as it is (keep its order deterministic for comparable trials).
        val: validation data; accuracies are measured on it.
        groups: a scheme of `GROUP_SCHEMES` or a list of ``Targets`` strings, one group each.
        on_trial: called after every trial with (group, d, accuracy); the full baseline reports d = D.
        should_stop: polled before every training step; when it returns True the measurement stops and returns
            what it has, with ``cancelled=True``.
    """
    config = config or IntrinsicDimConfig()
    arch = inspect_vit(model)
    results = [GroupResult(g, 0) for g in resolve_groups(groups, arch.depth)]
    slots = {r.group: group_slots(model, r.group) for r in results}
    for r in results:
        r.size = sum(slot_sizes(model, slots[r.group]))
    head_only: float | None = None
    cancelled = False
    with _frozen(model):
        trials = _Trials(model, train, val, config, on_trial, should_stop)
        majority = trials.majority_rate()
        try:
            head_only = trials.run("", [], None).accuracy
            for result in results:
                _measure_group(result, slots[result.group], trials, config, head_only, majority)
        except Cancelled:
            cancelled = True
            for result in results:
                if result.d90 is None and not result.reason:
                    result.reason = "cancelled before its measurement finished"
    curves = pd.DataFrame(trials.rows, columns=["group", "d", "accuracy", "kind", "projection", "diverged"])
    recommended, why = recommend_targets(
        results, arch.depth, select=config.select, top_k=config.top_k, within=config.within
    )
    explanation = _explain(results, head_only, majority, config, why, cancelled)
    return IntrinsicDimResult(
        curves,
        results,
        head_only,
        majority,
        recommended,
        explanation,
        config,
        arch.depth,
        cancelled,
        trials.sources.notes,
    )


class _Trials:
    """Runs the trials of one measurement on a ViT: the runner and batches of the group's first block, the same
    fresh head every time, and a record of every trial (``rows``) reported through ``on_trial``."""

    def __init__(
        self,
        model: nn.Module,
        train: Data,
        val: Data,
        config: IntrinsicDimConfig,
        on_trial: OnTrial | None,
        should_stop: ShouldStop | None,
    ) -> None:
        self.model, self.config, self.on_trial, self.should_stop = model, config, on_trial, should_stop
        self.depth = len(model.blocks)
        self.head_path = classifier_path(model)
        self.sources = _Sources(model, train, val, config)
        self.rows: list[dict[str, object]] = []

    def majority_rate(self) -> float:
        """The validation share of the most frequent label."""
        counts: dict[int, int] = {}
        for _, y in self.sources.get(self.depth)[2].epoch(0):
            for label in y.reshape(-1).tolist():
                counts[int(label)] = counts.get(int(label), 0) + 1
        return max(counts.values()) / sum(counts.values()) if counts else 0.0

    def run(self, group: str, slots: Sequence[Slot], d: int | None) -> TrialOutcome:
        """One trial of ``group``: ``d`` random directions, all its weights (``d=None``), or the head alone (no
        slots)."""
        config, device = self.config, self.sources.device
        start = min((int(s.param.split(".")[1]) for s in slots), default=self.depth)  # slots are blocks.<i>....
        runner, train, val = self.sources.get(start)
        prefix = _prefix(runner)
        reparam = Reparam(dict(runner.named_parameters()), slots, prefix)
        projection: Projection | None = None
        if slots and d is None:
            projection = IdentityProjection(reparam.D, device)
        elif slots and d is not None:
            projection = make_projection(
                reparam.D, d, config.seed, max_dense_elements=config.max_dense_elements, device=device
            )
        head = fresh_head(self.model, self.head_path, config.seed, prefix)
        lr = config.full_lr if d is None else config.lr
        outcome = _run_trial(
            runner, reparam, projection, head, train, val, config, lr, F.cross_entropy, accuracy_score, self.should_stop
        )
        if slots:
            shown = reparam.D if d is None else d
            self.rows.append(
                dict(
                    group=group,
                    d=shown,
                    accuracy=outcome.accuracy,
                    kind="full" if d is None else "subspace",
                    projection=outcome.projection,
                    diverged=outcome.diverged,
                )
            )
            if self.on_trial is not None:
                self.on_trial(group, shown, outcome.accuracy)
        return outcome


def _measure_group(
    result: GroupResult,
    slots: Sequence[Slot],
    trials: _Trials,
    config: IntrinsicDimConfig,
    head_only: float,
    majority: float,
) -> None:
    """The full-training baseline of one group, then its d90 search; fills ``result`` in."""
    full = trials.run(result.group, slots, None)
    result.full_accuracy = full.accuracy
    result.target = config.threshold * full.accuracy
    if full.accuracy <= majority:
        result.reason = (
            f"training the whole group reached {full.accuracy:.3f}, not above the majority-class rate "
            f"{majority:.3f}: there is no accuracy to reach (more steps or another full_lr may help)"
        )
        return
    search = search_d90(
        lambda d: trials.run(result.group, slots, d).accuracy,
        result.target,
        d_min=min(config.d_min, result.size),
        d_max=min(config.d_max, result.size),
        max_trials=config.max_trials,
    )
    result.d90, result.trials = search.d90, len(search.trials)
    result.head_reaches_target = head_only >= result.target
    notes = [search.reason]
    if result.head_reaches_target:
        notes.append("the head alone already reaches the target")
    if full.accuracy < head_only:
        notes.append(
            f"training the whole group scored below the head alone ({head_only:.3f}): the baseline is unreliable "
            "(try a lower full_lr or more steps)"
        )
    result.reason = "; ".join(n for n in notes if n)


def _explain(
    groups: Sequence[GroupResult],
    head_only: float | None,
    majority: float,
    config: IntrinsicDimConfig,
    choice: str,
    cancelled: bool,
) -> str:
    pct = f"{config.threshold:.0%}"
    lines = [
        f"Local intrinsic dimension d90 (Li et al. 2018): the smallest d such that training only d random directions "
        f"of a group's weights (plus a fresh head) reaches {pct} of the validation accuracy of training all of the "
        f"group's weights. A lower d90 means the group adapts with fewer degrees of freedom.",
        f"Head alone: {head_only:.3f}; majority-class rate: {majority:.3f}." if head_only is not None else "",
    ]
    for g in groups:
        full = f"{g.full_accuracy:.3f}" if g.full_accuracy is not None else "-"
        d90 = g.d90 if g.d90 is not None else "not reached"
        note = f" ({g.reason})" if g.reason else ""
        lines.append(f"- {g.group}: D={g.size:,}, full training {full}, d90 = {d90}{note}")
    lines.append(choice)
    if cancelled:
        lines.append("The measurement was cancelled; the numbers above are partial.")
    return "\n".join(line for line in lines if line)


# ----------------------------------------------------------------------------------------------------------------
# 6. Proxy: intrinsic dimension of each block's output representation (a different quantity)
# ----------------------------------------------------------------------------------------------------------------
def _neighbour_distances(x: Tensor, k: int, chunk: int = 1024) -> Tensor:
    """Distances to the k nearest other points, ascending, shape (N, k); computed in float64, chunked."""
    x = x.to(torch.float64)
    out = []
    for i in range(0, len(x), chunk):
        dist = torch.cdist(x[i : i + chunk], x)
        rows = torch.arange(i, min(i + chunk, len(x)))
        dist[rows - i, rows] = float("inf")  # not its own neighbour
        out.append(dist.topk(k, dim=1, largest=False).values)
    return torch.cat(out)


def twonn_dimension(x: Tensor, discard: float = 0.1) -> float:
    """TwoNN estimate (Facco et al. 2017) of the intrinsic dimension of points ``x`` (N, features).

    mu = r2 / r1 (second over first nearest-neighbour distance) follows a Pareto law with exponent the dimension;
    fit ``-log(1 - F(mu)) = dim * log(mu)`` through the origin on the empirical CDF, dropping the largest
    ``discard`` fraction of mu (noise-dominated). Points with a duplicate (r1 = 0) are left out.
    """
    r = _neighbour_distances(x, 2)
    r = r[r[:, 0] > 0]
    if len(r) < 3:
        raise ValueError("TwoNN needs at least 3 distinct points")
    mu = (r[:, 1] / r[:, 0]).sort().values
    n = len(mu)
    keep = max(2, int(n * (1 - discard)))
    cdf = torch.arange(n, dtype=torch.float64)[:keep] / n
    xs, ys = mu[:keep].log(), -torch.log1p(-cdf)
    return float((xs * ys).sum() / (xs * xs).sum())


def mle_dimension(x: Tensor, k: int = 10) -> float:
    """Levina-Bickel maximum-likelihood estimate with k neighbours, averaged as MacKay and Ghahramani suggest
    (the mean of the per-point inverse estimates, inverted)."""
    r = _neighbour_distances(x, k)
    r = r[r[:, 0] > 0]
    if len(r) < 2 or k < 2:
        raise ValueError("the MLE estimate needs at least 2 distinct points and k >= 2")
    inverse = torch.log(r[:, -1:] / r[:, :-1]).sum(dim=1) / (k - 1)  # 1 / m_k(x) per point
    return float(1.0 / inverse.mean())


def representation_dimension(
    model: nn.Module,
    data: Data,
    *,
    points: Literal["tokens", "cls", "mean"] = "tokens",
    estimators: Sequence[Literal["twonn", "mle"]] = ("twonn", "mle"),
    max_images: int = 256,
    max_points: int = 2000,
    k: int = 10,
    seed: int = 0,
    batch_size: int = 64,
) -> pd.DataFrame:
    """Intrinsic dimension of each block's output representation: a fast proxy, NOT the local intrinsic dimension.

    This measures the data manifold as the frozen model embeds it after each block (forward hooks on
    ``model.blocks[i]``), not how many directions of a group's weights training needs; the two can disagree.

    Args:
        points: what one point is: ``tokens`` (random tokens of each image, the same tokens at every block, about
            ``max_points`` in all), ``cls`` (the first prefix token per image) or ``mean`` (the mean of the patch
            tokens per image).
        max_images: images read from ``data`` (in order).

    Returns:
        One row per block: block, points, n_points, and one column per estimator; ``attrs["quantity"]`` says what
        it measures.
    """
    arch = inspect_vit(model)
    if points == "cls" and arch.num_prefix_tokens < 1:
        raise ValueError("points='cls' needs a model with a class token; use 'mean' or 'tokens'")
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    per_image = max(1, -(-max_points // max_images))
    outputs: list[list[Tensor]] = [[] for _ in range(arch.depth)]
    chosen: list[Tensor | None] = [None]  # token indices of the current batch, shared by every block

    def pick(tokens: Tensor) -> Tensor:
        if points == "cls":
            return tokens[:, 0]
        if points == "mean":
            return tokens[:, arch.num_prefix_tokens :].mean(dim=1)
        if chosen[0] is None:
            scores = torch.rand(tokens.shape[0], tokens.shape[1], generator=generator)
            chosen[0] = scores.argsort(dim=1)[:, : min(per_image, tokens.shape[1])].to(tokens.device)
        idx = chosen[0]
        return tokens.gather(1, idx[..., None].expand(-1, -1, tokens.shape[-1])).reshape(-1, tokens.shape[-1])

    def hook(i: int) -> Callable[[nn.Module, tuple[Tensor, ...], Tensor], None]:
        return lambda module, args, output: outputs[i].append(pick(output.detach()).float().cpu())

    handles = [block.register_forward_hook(hook(i)) for i, block in enumerate(model.blocks)]
    seen = 0
    try:
        with _frozen(model), torch.no_grad():
            for x, _ in _Batches(data, batch_size, False, device).epoch(seed):
                x = x[: max_images - seen]
                chosen[0] = None
                model(x)
                seen += len(x)
                if seen >= max_images:
                    break
    finally:
        for h in handles:
            h.remove()
    rows = []
    for i, chunks in enumerate(outputs):
        feats = torch.cat(chunks)[:max_points]
        row: dict[str, object] = {"block": i, "points": points, "n_points": len(feats)}
        for name in estimators:
            row[name] = twonn_dimension(feats) if name == "twonn" else mle_dimension(feats, k)
        rows.append(row)
    table = pd.DataFrame(rows)
    table.attrs["quantity"] = REPRESENTATION_ID_LABEL
    return table


__all__ = [
    "GROUP_SCHEMES",
    "REPRESENTATION_ID_LABEL",
    "Cancelled",
    "ConcatProjection",
    "D90Search",
    "DenseProjection",
    "FastfoodProjection",
    "GroupResult",
    "IdentityProjection",
    "IntrinsicDimConfig",
    "IntrinsicDimResult",
    "Projection",
    "Reparam",
    "Slot",
    "TrialOutcome",
    "accuracy_score",
    "classifier_path",
    "d_grid",
    "fresh_head",
    "fastfood_chunks",
    "fwht",
    "group_slots",
    "make_projection",
    "measure_intrinsic_dimension",
    "mle_dimension",
    "recommend_targets",
    "representation_dimension",
    "resolve_groups",
    "scheme_groups",
    "search_d90",
    "slot_sizes",
    "subspace_trial",
    "twonn_dimension",
    "union_targets",
]
