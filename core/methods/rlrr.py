"""RLRR: Residual-based Low-Rank Rescaling (Dong et al., CVPR 2024).

Each frozen weight is rescaled element-wise by a residual rank-1 matrix, per q/k/v slice of the fused qkv and per
proj/fc1/fc2: ``W' = W * (1 + l c^T)`` with l (out) and c (in), plus a bias shift ``b' = b + f``. SSF-style
scale/shift follows norm1, norm2, the final norm and the patch embedding. Per block 31d parameters; 376d = 288,768
on ViT-B/16 (head excluded).

The update ``dW = W * (l c^T)`` acts on the activations as ``l * ((x * c) @ W^T)``: one extra product with the
frozen weight, no weight-sized gradient. ``init="official"`` copies the released code (kaiming-uniform l and c,
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

    def _rows(self) -> list[Tensor]:
        return [self.base.weight[a:b] for a, b in self.parts.values()]

    def update(self, x: Tensor, y: Tensor) -> Tensor:
        parts = {
            m: self.scale_line[i] * F.linear(x * self.scale_col[i], w) + self.shift_bias[i]
            for i, (m, w) in enumerate(zip(self.parts, self._rows(), strict=True))
        }
        return self.place(parts)

    def delta_weight(self) -> Tensor:
        parts = {
            m: w * torch.outer(self.scale_line[i], self.scale_col[i])
            for i, (m, w) in enumerate(zip(self.parts, self._rows(), strict=True))
        }
        return self.place(parts, dim=0)

    def delta_bias(self) -> Tensor:
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
    )
)
