"""VPT: Visual Prompt Tuning (Jia et al., ECCV 2022).

Learnable prompt tokens join the sequence after the class (and register) tokens. ``deep=False`` (shallow) inserts
them once before the first block; ``deep=True`` replaces them with fresh ones before every block. Counts tokens x d
(x depth for deep): 92,160 for 10 deep tokens on ViT-B/16. Prompts change the output from step 0 (they join the
attention) and are not a weight update, so VPT neither claims the identity nor merges. With ``global_pool="avg"``
timm averages the prompts with the patch tokens; the default class-token pooling ignores them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from core.methods.base import AdapterState, Arch, MethodConfig, Wrapper, replace_child
from core.methods.registry import Method, register


@dataclass(frozen=True)
class VPTConfig(MethodConfig):
    """VPT options.

    Attributes:
        tokens: prompt tokens per block (VPT's default for VTAB varies 1-200; 10 here).
        deep: fresh prompts before every block (VPT-Deep) or only before the first (VPT-Shallow).
    """

    tokens: int = 10
    deep: bool = True

    def check(self, arch: Arch) -> None:
        if not 1 <= self.tokens <= 1000:
            raise ValueError(f"VPT tokens={self.tokens} is out of range; use 1 to 1000")


class PromptedBlock(Wrapper):
    """Inserts (first block) or replaces (deeper blocks) the prompt tokens, then runs the block."""

    def __init__(self, block: nn.Module, arch: Arch, tokens: int, insert: bool) -> None:
        super().__init__(block)
        ref = block.attn.qkv.weight
        self.prompts = nn.Parameter(torch.empty(tokens, arch.embed_dim, device=ref.device, dtype=ref.dtype))
        bound = math.sqrt(6.0 / (3 * arch.patch_size**2 + arch.embed_dim))  # VPT's xavier-style init
        nn.init.uniform_(self.prompts, -bound, bound)
        self.insert, self.prefix = insert, arch.num_prefix_tokens

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        p = self.prompts.expand(x.shape[0], -1, -1)
        rest = x[:, self.prefix :] if self.insert else x[:, self.prefix + p.shape[1] :]
        return self.base(torch.cat([x[:, : self.prefix], p, rest], dim=1), *args, **kwargs)


def inject(model: nn.Module, config: VPTConfig, arch: Arch, state: AdapterState) -> None:
    for b in range(arch.depth if config.deep else 1):
        replace_child(model.blocks, str(b), PromptedBlock(model.blocks[b], arch, config.tokens, insert=b == 0))


register(
    Method(
        name="vpt",
        config=VPTConfig,
        inject=inject,
        backbone="none",
        mergeable=False,
        identity_at_init=lambda c: False,
        summary="VPT: learnable prompt tokens in the input (shallow) or before every block (deep)",
        paper="Jia et al., Visual Prompt Tuning, ECCV 2022",
    )
)
