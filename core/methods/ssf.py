"""SSF: Scaling & Shifting your Features (Lian et al., NeurIPS 2022).

A per-channel ``y * gamma + beta`` after every op it names: the qkv, proj, fc1 and fc2 linears and norm1, norm2 of
every block, the final norm and the patch embedding. It folds into the preceding op, so it merges. ``init="official"``
draws gamma ~ N(1, .02), beta ~ N(0, .02) as SSF's code (not the identity at step 0); ``identity`` starts at 1 and 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import nn

from core.methods.base import AdapterState, Arch, MethodConfig, ScaleShift, replace_child, scale_shift_norms
from core.methods.registry import Method, register


@dataclass(frozen=True)
class SSFConfig(MethodConfig):
    """SSF options.

    Attributes:
        init: ``official`` (N(1, .02) / N(0, .02), SSF's code) or ``identity`` (exactly 1 and 0).
    """

    init: Literal["official", "identity"] = "official"


def inject(model: nn.Module, config: SSFConfig, arch: Arch, state: AdapterState) -> None:
    for block in model.blocks:
        for path in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"):
            layer = block.get_submodule(path)
            replace_child(block, path, ScaleShift(layer, layer.out_features, config.init))
    scale_shift_norms(model, list(range(arch.depth)), arch.embed_dim, config.init)


register(
    Method(
        name="ssf",
        config=SSFConfig,
        inject=inject,
        backbone="none",
        mergeable=True,
        identity_at_init=lambda c: c.init == "identity",
        summary="SSF: per-channel scale and shift after every linear, norm and the patch embedding",
        paper="Lian et al., Scaling & Shifting Your Features, NeurIPS 2022",
        differs_from_official=(
            "**SSF**'s official initialisation is not the identity: the scale and shift start at N(1, .02) / "
            'N(0, .02); `init="identity"` starts them at exactly 1 and 0.'
        ),
    )
)
