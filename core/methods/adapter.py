"""Bottleneck adapters: sequential (Houlsby-style as in NOAH's "Adapter") and parallel (AdaptFormer).

``sequential``: after the MLP, ``y = mlp(x); y + s * up(gelu(down(y)))`` (NOAH's Adapter, 156,768 parameters on
ViT-B/16 for bottleneck 8). ``parallel``: beside the MLP, ``mlp(x) + s * up(relu(down(x)))`` with x the MLP's input
(AdaptFormer, scale 0.1). The up-projection is zero-initialised, so the model starts as the pretrained one. The
bottleneck is nonlinear, so these adapters cannot be merged into the weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import Tensor, nn

from core.methods.base import AdapterState, Arch, MethodConfig, Targets, Wrapper, replace_child
from core.methods.registry import Method, register


@dataclass(frozen=True)
class AdapterConfig(MethodConfig):
    """Adapter options.

    Attributes:
        bottleneck: hidden width h of each adapter.
        position: ``sequential`` (after the MLP) or ``parallel`` (beside it, AdaptFormer).
        scale: s on the adapter's output; None gives 1.0 for sequential and 0.1 for parallel (AdaptFormer).
        blocks: which blocks get an adapter, in the targets block syntax (``0-5,8``); None means all.
    """

    bottleneck: int = 8
    position: Literal["sequential", "parallel"] = "sequential"
    scale: float | None = None
    blocks: str | None = None

    def check(self, arch: Arch) -> None:
        if not 1 <= self.bottleneck <= arch.embed_dim:
            raise ValueError(f"adapter bottleneck={self.bottleneck} is out of range; use 1 to {arch.embed_dim}")
        self.block_indices(arch.depth)

    def block_indices(self, depth: int) -> list[int]:
        return list(Targets.parse(f"mlp:{self.blocks}" if self.blocks else "mlp").resolve(depth))


class MLPAdapter(Wrapper):
    """A bottleneck adapter around a block's MLP."""

    def __init__(self, mlp: nn.Module, dim: int, config: AdapterConfig) -> None:
        super().__init__(mlp)
        ref = mlp.fc1.weight
        self.down = nn.Linear(dim, config.bottleneck, device=ref.device, dtype=ref.dtype)
        self.up = nn.Linear(config.bottleneck, dim, device=ref.device, dtype=ref.dtype)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.sequential = config.position == "sequential"
        self.act = nn.GELU() if self.sequential else nn.ReLU()
        self.scale = config.scale if config.scale is not None else (1.0 if self.sequential else 0.1)

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)
        return y + self.scale * self.up(self.act(self.down(y if self.sequential else x)))


def inject(model: nn.Module, config: AdapterConfig, arch: Arch, state: AdapterState) -> None:
    for b in config.block_indices(arch.depth):
        replace_child(model.blocks[b], "mlp", MLPAdapter(model.blocks[b].mlp, arch.embed_dim, config))


register(
    Method(
        name="adapter",
        config=AdapterConfig,
        inject=inject,
        backbone="none",
        mergeable=False,
        identity_at_init=lambda c: True,
        summary="Adapter: a small bottleneck MLP after (sequential) or beside (parallel, AdaptFormer) each MLP",
        paper="Houlsby et al., ICML 2019; Chen et al., AdaptFormer, NeurIPS 2022",
    )
)
