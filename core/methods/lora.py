"""LoRA (Hu et al., ICLR 2022): dW = (alpha / r) * B @ A per adapted matrix.

A (r x d_in) is kaiming-uniform as PEFT's, B (d_out x r) zero, so the model equals the pretrained one at step 0.
Default targets are the q and v slices of timm's fused qkv (the paper's and NOAH's ViT setting: r = 8 gives
294,912 trainable parameters on ViT-B/16). The training forward acts on the activations through
``core.methods.base.LowRankProduct``: the codes of every adapted part of a linear in one product, each part's
expansion added to its own slice of the output. ``dropout`` acts on the input the code reads, as PEFT's
``lora_dropout``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from core.methods.base import (
    AdapterState,
    Arch,
    LinearWrapper,
    LowRankProduct,
    MethodConfig,
    Targets,
    inject_per_linear,
)
from core.methods.registry import Method, register


@dataclass(frozen=True)
class LoRAConfig(MethodConfig):
    """LoRA options.

    Attributes:
        rank: r of every adapted part.
        alpha: the update is scaled by alpha / r (PEFT's convention; default 8).
        dropout: on the input of the low-rank path during training (PEFT's lora_dropout).
        targets: matrices and blocks to adapt (default the q and v slices of every block).
    """

    rank: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    targets: Targets = field(default_factory=lambda: Targets.parse("q,v"))

    def check(self, arch: Arch) -> None:
        if not 1 <= self.rank <= arch.embed_dim:
            raise ValueError(f"LoRA rank={self.rank} is out of range; use 1 to the width {arch.embed_dim}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout={self.dropout} must be in [0, 1)")
        self.targets.resolve(arch.depth)


class LoRALinear(LinearWrapper):
    """LoRA on one linear, or on some of the q/k/v slices of a fused qkv (A: n x r x in, B: n x out x r)."""

    def __init__(self, base: nn.Linear, mats: tuple[str, ...], config: LoRAConfig) -> None:
        super().__init__(base, mats)
        n, r = len(self.parts), config.rank
        out = next(iter(self.parts.values()))
        kw = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(n, r, base.in_features, **kw))
        self.lora_B = nn.Parameter(torch.zeros(n, out[1] - out[0], r, **kw))
        bound = 1 / math.sqrt(base.in_features)  # kaiming_uniform(a=sqrt(5)) on each r x in matrix, as PEFT
        nn.init.uniform_(self.lora_A, -bound, bound)
        self.scaling = config.alpha / config.rank
        self.dropout = config.dropout

    def forward(self, x: Tensor) -> Tensor:
        # The code A_i x of every part in one product; part i's slice of the output gains (alpha/r) B_i (code_i).
        dropout = self.dropout if self.training else 0.0
        reduce, expand = self.lora_A.flatten(0, 1), self.scaling * self.lora_B.mT
        return LowRankProduct.apply(x, self.base.weight, self.base.bias, reduce, expand, self.part_blocks, 0.0, dropout)

    def delta_weight(self) -> Tensor:
        dw = self.scaling * self.lora_B @ self.lora_A  # (n, out, in)
        return self.place({m: dw[i] for i, m in enumerate(self.parts)}, dim=0)


def inject(model: nn.Module, config: LoRAConfig, arch: Arch, state: AdapterState) -> None:
    inject_per_linear(model, config.targets, arch.depth, lambda base, mats: LoRALinear(base, mats, config))


register(
    Method(
        name="lora",
        config=LoRAConfig,
        inject=inject,
        backbone="none",
        mergeable=True,
        identity_at_init=lambda c: True,
        summary="LoRA: a rank-r additive update B A on the chosen matrices (default q and v)",
        paper="Hu et al., LoRA: Low-Rank Adaptation of Large Language Models, ICLR 2022",
    )
)
