"""RLRR: Residual-based Low-Rank Rescaling (Dong et al., CVPR 2024).

Each frozen weight is rescaled element-wise by a residual rank-1 matrix, per q/k/v slice of the fused qkv and per
proj/fc1/fc2: ``W' = W * (1 + l c^T)`` with l (out) and c (in), plus a bias shift ``b' = b + f``. SSF-style
scale/shift follows norm1, norm2, the final norm and the patch embedding. Per block 31d parameters; 376d = 288,768
on ViT-B/16 (head excluded).

The training forward builds the rescaled weight and makes one product with it, as full fine-tuning does; a custom
autograd function takes the gradients of l and c from the weight-sized gradient (which the rescaling needs, as
full fine-tuning does) and keeps the rescaled weight (in the product's precision) for the input gradient rather
than building it twice: one weight-sized tensor per layer between forward and backward, where full fine-tuning
holds a gradient and two optimizer moments per weight. The SSF scale/shift after a norm runs as the norm's affine.
``init="official"`` copies the released code (kaiming-uniform l and c,
SSF scale ~ N(1, .02) and shift ~ N(0, .02)): the model is NOT the pretrained one at step 0, each weight is scaled by
(1 + l_i c_j) with std about 0.07. ``init="identity"`` zeroes l (c stays random, so both receive gradients) and
starts SSF at exactly 1 and 0.

Recipe difference: the official code's per-task "drop_path" is element-wise ``nn.Dropout(p)`` on each residual
branch (p rising linearly from 0 over the blocks), not stochastic depth. PETLab's ``drop_path_rate`` is timm's
stochastic depth (whole samples dropped per branch), so that regularisation is not reproduced.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.methods.base import (
    AdapterState,
    Arch,
    LinearWrapper,
    MethodConfig,
    Targets,
    compute_dtype,
    inject_per_linear,
    scale_shift_norms,
)
from core.methods.registry import Method, register


@dataclass(frozen=True)
class RLRRConfig(MethodConfig):
    """RLRR options.

    Attributes:
        init: ``official`` (the released code, not the identity at step 0) or ``identity`` (l = 0, SSF at 1/0).
        targets: matrices and blocks to rescale (RLRR rescales all six of every block).
        norms: add the SSF scale/shift after norm1, norm2 (of the targeted blocks), the final norm and the patch
            embedding, as RLRR does.
    """

    init: Literal["official", "identity"] = "official"
    targets: Targets = field(default_factory=lambda: Targets.parse("all"))
    norms: bool = True

    def check(self, arch: Arch) -> None:
        self.targets.resolve(arch.depth)


def rescaled_weight(weight: Tensor, scale_line: Tensor, scale_col: Tensor, rows: list[tuple[int, int]]) -> Tensor:
    """``W * (1 + l_i c_i^T)`` on each row block ``rows[i]`` of ``weight``, the other rows unchanged (a new tensor)."""
    if rows[0][0] == 0 and rows[-1][1] == weight.shape[0] and len(rows) * scale_line.shape[1] == weight.shape[0]:
        factors = (scale_line[:, :, None] * scale_col[:, None, :]).view_as(weight)  # every row block: l_i c_i^T
        return torch.addcmul(weight, weight, factors)
    rescaled = weight.clone()
    for i, (lo, hi) in enumerate(rows):
        rescaled[lo:hi].addcmul_(weight[lo:hi], torch.outer(scale_line[i], scale_col[i]))
    return rescaled


class RescaledLinear(torch.autograd.Function):
    """``y = x @ (W * (1 + l c^T))^T + b`` per row block, with the backward written out.

    Autograd through ``rescaled_weight`` would keep the rescaled weight and the factor ``1 + l c^T`` for every layer
    until the backward. Here the backward uses the kept rescaled weight for the input gradient, forms the weight
    gradient ``G = grad_y^T x`` of the rescaled rows (in one product where they are adjacent), and reduces ``G * W``
    against c and l per row block: ``grad l_i = (G * W) c_i``, ``grad c_i = (G * W)^T l_i``. The frozen weight gets
    no gradient.
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        x: Tensor,
        weight: Tensor,
        bias: Tensor,
        scale_line: Tensor,
        scale_col: Tensor,
        rows: list[tuple[int, int]],
    ) -> Tensor:
        # In the product's precision (what autocast would cast it to), kept for the backward's input gradient.
        rescaled = rescaled_weight(weight, scale_line, scale_col, rows).to(compute_dtype(x))
        y = F.linear(x, rescaled, bias)
        ctx.save_for_backward(x, weight, rescaled, scale_line, scale_col)
        ctx.rows = rows
        return y

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_y: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, rescaled, scale_line, scale_col = ctx.saved_tensors
        grad_rows = grad_y.reshape(-1, grad_y.shape[-1])
        x_rows = x.reshape(-1, x.shape[-1]).to(grad_rows.dtype)
        grad_x = grad_bias = grad_line = grad_col = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad_rows @ rescaled.to(grad_rows.dtype)).view(x.shape)
        if ctx.needs_input_grad[2]:
            grad_bias = grad_rows.sum(0)
        if ctx.needs_input_grad[3] or ctx.needs_input_grad[4]:
            rows = ctx.rows
            if all(prev[1] == nxt[0] for prev, nxt in zip(rows, rows[1:], strict=False)):
                spans = [(rows[0][0], rows[-1][1])]  # adjacent row blocks (all of q, k, v; a whole matrix): one G
            else:
                spans = rows
            weighted = [(grad_rows[:, lo:hi].T @ x_rows).mul_(weight[lo:hi]) for lo, hi in spans]  # G * W
            weighted = (weighted[0] if len(spans) == 1 else torch.cat(weighted)).view(len(rows), -1, x_rows.shape[1])
            line, col = scale_line.to(weighted.dtype), scale_col.to(weighted.dtype)
            grad_line = torch.bmm(weighted, col.unsqueeze(-1)).squeeze(-1)  # per block: (G * W) c
            grad_col = torch.bmm(line.unsqueeze(1), weighted).squeeze(1)  # per block: l^T (G * W)
        return grad_x, None, grad_bias, grad_line, grad_col, None


class RLRRLinear(LinearWrapper):
    """``W' = W * (1 + l c^T)``, ``b' = b + f`` on a linear or on each adapted q/k/v slice (own l, c, f each)."""

    def __init__(self, base: nn.Linear, mats: tuple[str, ...], init: str) -> None:
        super().__init__(base, mats)
        n = len(self.parts)
        out = next(iter(self.parts.values()))
        kw = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.scale_col = nn.Parameter(torch.empty(n, base.in_features, **kw))  # c, input side
        self.scale_line = nn.Parameter(torch.zeros(n, out[1] - out[0], **kw))  # l, output side
        self.shift_bias = nn.Parameter(torch.zeros(n, out[1] - out[0], **kw))  # f
        # Official: kaiming_uniform on (1, in) -> U(+-sqrt(6/in)); on (out, 1) -> U(+-sqrt(6)).
        bound_c = math.sqrt(6 / base.in_features)
        nn.init.uniform_(self.scale_col, -bound_c, bound_c)
        if init == "official":
            nn.init.uniform_(self.scale_line, -math.sqrt(6), math.sqrt(6))

    def forward(self, x: Tensor) -> Tensor:
        rows = list(self.parts.values())
        return RescaledLinear.apply(x, self.base.weight, self.updated_bias(), self.scale_line, self.scale_col, rows)

    def delta_weight(self) -> Tensor:
        weight = self.base.weight
        parts = {
            m: weight[lo:hi] * torch.outer(self.scale_line[i], self.scale_col[i])
            for i, (m, (lo, hi)) in enumerate(self.parts.items())
        }
        return self.place(parts, dim=0)

    def delta_bias(self) -> Tensor:
        if self.shift_bias.numel() == self.base.out_features:  # every row adapted (all of q, k, v or a whole matrix)
            return self.shift_bias.flatten()
        return self.place({m: self.shift_bias[i] for i, m in enumerate(self.parts)}, dim=0)


def inject(model: nn.Module, config: RLRRConfig, arch: Arch, state: AdapterState) -> None:
    inject_per_linear(model, config.targets, arch.depth, lambda base, sl: RLRRLinear(base, sl, config.init))
    if config.norms:
        scale_shift_norms(model, list(config.targets.resolve(arch.depth)), arch.embed_dim, config.init)


register(
    Method(
        name="rlrr",
        config=RLRRConfig,
        inject=inject,
        backbone="none",
        mergeable=True,
        identity_at_init=lambda c: c.init == "identity",
        summary="RLRR: each weight rescaled by a residual rank-1 matrix, W * (1 + l c^T), plus SSF on the norms",
        paper="Dong et al., Low-Rank Rescaled Vision Transformer Fine-Tuning: A Residual Design Approach, CVPR 2024",
        differs_from_official=(
            "**RLRR**'s official initialisation is **not** the identity: l and c are kaiming-uniform and the SSF "
            "scale/shift start at N(1, .02) / N(0, .02), so each weight is scaled by (1 + l_i c_j) from the first "
            'step (std about 0.07). `init="official"` reproduces that; `init="identity"` zeroes l and starts '
            "SSF at exactly 1 and 0."
        ),
    )
)
