"""FacT: Factor-Tuning (Jie & Deng, AAAI 2023), tensor-train (TT) and Tucker (TK) variants.

All adapted d x d slices of the encoder form one tensor dW of (4 + 2m)L slices (m = MLP ratio: q, k, v, proj, m row
blocks of fc1 and m column blocks of fc2 per block). FacT factorises it with U (r x d, input side) and V (d x r,
output side) shared by the whole model, and a small r x r core per slice:

    dW_slice = s * V @ S_slice @ U            (PyTorch layout, out x in)

TT learns every S_slice directly (2dr + (4+2m)L r^2 parameters). TK builds them from a shared core C (r x r x r) and
a slice matrix P (r x n_slices): M = C x_3 P^T, S_slice = M[:, :, j]^T (2dr + n_slices r + r^3).

As the official code: V is zero-initialised, so the model equals the pretrained one at step 0; dropout (default 0.1)
acts on the rank-r code just before V (the paper does not mention it). For TK the default ``tk_layout="official"``
copies the code's fc1/fc2 reshape, which is not the per-slice Tucker form: row j of fc1 block k reads core slice
(k r + j) mod m. ``tk_layout="tucker"`` gives the textbook per-slice form (same parameter count). The training
forward acts on the activations (x -> r codes -> d, the cores folded into U first), never on a d x d matrix.

Recipe difference: the official code trains with timm's stochastic depth at ``drop_path_rate=0.1``; PETLab's
backbone default is 0 (``BackboneSpec(drop_path_rate=0.1)`` or ``--drop-path-rate 0.1`` matches it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from core.methods.base import (
    QKV_SLICES,
    AdapterState,
    Arch,
    LinearWrapper,
    LowRankProduct,
    MethodConfig,
    Shared,
    Targets,
    inject_per_linear,
    share,
)
from core.methods.registry import Method, register


@dataclass(frozen=True)
class FacTConfig(MethodConfig):
    """FacT options.

    Attributes:
        variant: ``tt`` (tensor-train) or ``tk`` (Tucker).
        rank: r, the rank of the shared factors (paper searches TT 1-16, TK 2-32).
        scale: s, multiplies the update (the paper sweeps 0.01-100 per task).
        dropout: on the rank-r code before V during training (official code: 0.1).
        targets: which matrices and blocks form the tensor (FacT uses all six of every block).
        tk_layout: ``official`` fc1/fc2 core layout of the released code, or ``tucker`` per-slice form (TK only).
    """

    variant: Literal["tt", "tk"] = "tt"
    rank: int = 8
    scale: float = 1.0
    dropout: float = 0.1
    targets: Targets = field(default_factory=lambda: Targets.parse("all"))
    tk_layout: Literal["official", "tucker"] = "official"

    def check(self, arch: Arch) -> None:
        if not 1 <= self.rank <= arch.embed_dim:
            raise ValueError(f"FacT rank={self.rank} is out of range; use 1 to the width {arch.embed_dim}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"FacT dropout={self.dropout} must be in [0, 1)")
        arch.mlp_ratio  # noqa: B018 - raises for a non-integer MLP ratio
        self.targets.resolve(arch.depth)


class FacTFactors(Shared):
    """The factors shared by every slice: U (r x d), V (d x r), and for TK the core C and slice matrix P."""

    def __init__(self, config: FacTConfig, arch: Arch, n_slices: int, ref: Tensor) -> None:
        super().__init__()
        r, d = config.rank, arch.embed_dim
        kw = {"device": ref.device, "dtype": ref.dtype}
        self.variant, self.scale, self.tk_layout = config.variant, config.scale, config.tk_layout
        self.U = nn.Parameter(torch.empty(r, d, **kw))
        nn.init.kaiming_uniform_(self.U, a=math.sqrt(5))  # nn.Linear(d, r) default, as the code: U(+-1/sqrt(d))
        self.V = nn.Parameter(torch.zeros(d, r, **kw))  # zero: dW = 0 at step 0
        self.dropout = nn.Dropout(config.dropout)
        if config.variant == "tk":
            self.P = nn.Parameter(torch.empty(r, n_slices, **kw))  # P^T of the paper; column j is slice j
            self.C = nn.Parameter(torch.empty(r, r, r, **kw))
            nn.init.xavier_uniform_(self.P)
            nn.init.xavier_uniform_(self.C)

    def tk_cores(self, first: int, count: int) -> Tensor:
        """M[:, :, first:first+count] with M = C x_3 P^T, shape (r, r, count)."""
        return torch.einsum("abc,ck->abk", self.C, self.P[:, first : first + count])


class FacTLinear(LinearWrapper):
    """FacT on one linear: the q/k/v slices of a fused qkv, proj, fc1 (m row blocks) or fc2 (m column blocks).

    ``cores()`` returns the r x r middle matrices in one convention for both variants: for attention slices a
    (n, r, r) stack S with dW_n = s V S_n U; for fc1 an (m r x r) matrix F1 whose row block k gives fc1 rows block k;
    for fc2 an (r x m r) matrix F2 whose column block k gives fc2 columns block k.
    """

    def __init__(self, base: nn.Linear, mats: tuple[str, ...], shared: FacTFactors, first_slice: int, m: int) -> None:
        super().__init__(base, mats)
        share(self, shared)
        kind = mats[0] if mats[0] in ("fc1", "fc2") else "attn"
        self.kind, self.m, self.first = kind, m, first_slice
        self.n = len(self.parts) if kind == "attn" else m
        # The input's d-wide chunks that U reads (fc2: m) and the output's d-wide blocks that V writes.
        self.in_chunks = m if kind == "fc2" else 1
        if kind == "attn" and self.fused:
            self.out_blocks = tuple(i for i, name in enumerate(QKV_SLICES) if name in self.parts)
        else:
            self.out_blocks = tuple(range(m)) if kind == "fc1" else (0,)
        r = shared.U.shape[0]
        if shared.variant == "tt":
            kw = {"device": base.weight.device, "dtype": base.weight.dtype}
            shape = {"attn": (self.n, r, r), "fc1": (m * r, r), "fc2": (r, m * r)}[kind]
            self.S = nn.Parameter(torch.empty(shape, **kw))
            # nn.Linear(in, out) default init of the official per-slice cores: U(+-1/sqrt(in)).
            fan_in = m * r if kind == "fc2" else r
            nn.init.uniform_(self.S, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))

    def cores(self) -> Tensor:
        if self.shared.variant == "tt":
            return self.S
        r = self.shared.U.shape[0]
        M = self.shared.tk_cores(self.first, self.n)  # (r, r, n)
        if self.kind == "attn":
            return M.permute(2, 1, 0)  # S_n = M[:, :, n]^T (the code computes u(x) @ M[:, :, n])
        if self.shared.tk_layout == "tucker":
            blocks = M.permute(2, 1, 0)  # (m, r, r), block k = M[:, :, k]^T
            return blocks.reshape(self.m * r, r) if self.kind == "fc1" else blocks.permute(1, 0, 2).reshape(r, -1)
        flat = M.reshape(r, self.m * r)  # the code's reshape: flat[a, m*b + k] = M[a, b, k]
        return flat.T if self.kind == "fc1" else flat

    def reduction(self) -> Tensor:
        """R (k r x in) with ``x R^T = u C^T``: the cores C (k r x k_in r) applied to U on each d-wide input chunk
        (``u`` = U x_chunk for the k_in chunks), so the input is read once by one product."""
        r = self.shared.U.shape[0]
        cores = self.cores().reshape(len(self.out_blocks) * r, self.in_chunks, r)
        return (cores @ self.shared.U).flatten(1)

    def forward(self, x: Tensor) -> Tensor:
        f = self.shared
        return LowRankProduct.apply(
            x,
            self.base.weight,
            self.base.bias,
            self.reduction(),
            f.scale * f.V.T,  # (r, d): the scale folded into the small factor, not the output
            self.out_blocks,
            f.dropout.p if self.training else 0.0,
            0.0,
        )

    def delta_weight(self) -> Tensor:
        f, S = self.shared, self.cores()
        r, d, s = f.U.shape[0], f.U.shape[1], f.scale
        if self.kind == "attn":
            slices = s * f.V @ S @ f.U  # (n, d, d)
            return self.place({m: slices[i] for i, m in enumerate(self.parts)}, dim=0)
        if self.kind == "fc1":
            return (s * f.V @ S.reshape(self.m, r, r) @ f.U).reshape(self.m * d, d)  # row blocks
        blocks = s * f.V @ S.reshape(r, self.m, r).transpose(0, 1) @ f.U  # (m, d, d) column blocks
        return blocks.transpose(0, 1).reshape(d, self.m * d)


def inject(model: nn.Module, config: FacTConfig, arch: Arch, state: AdapterState) -> None:
    m = arch.mlp_ratio
    plan = config.targets.resolve(arch.depth)
    n_slices = sum(len(mats) + (m - 1) * (("fc1" in mats) + ("fc2" in mats)) for mats in plan.values())
    factors = FacTFactors(config, arch, n_slices, model.blocks[0].attn.qkv.weight)
    state.shared["fact"] = factors
    first = 0  # slices are numbered as in the official code: per block q, k, v, proj, then fc1 x m, fc2 x m

    def make(base: nn.Linear, mats: tuple[str, ...]) -> FacTLinear:
        nonlocal first
        wrapper = FacTLinear(base, mats, factors, first, m)
        first += wrapper.n
        return wrapper

    inject_per_linear(model, config.targets, arch.depth, make)


register(
    Method(
        name="fact",
        config=FacTConfig,
        inject=inject,
        backbone="none",
        mergeable=True,
        identity_at_init=lambda c: True,
        summary="FacT: the encoder's updates as one tensor, factorised (TT or Tucker) with shared U, V",
        paper="Jie & Deng, FacT: Factor-Tuning for Lightweight Adaptation on Vision Transformer, AAAI 2023",
        differs_from_official=(
            "**FacT** keeps two choices of the official code that the paper does not state: dropout (0.1) on the "
            'rank-r code just before V, and TK\'s fc1/fc2 core layout (`tk_layout="official"`), which is not the '
            'per-slice Tucker form. `tk_layout="tucker"` gives the textbook form with the same parameter count. V '
            "starts at zero, so the model equals the pretrained one at step 0."
        ),
    )
)
