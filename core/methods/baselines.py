"""The baselines that add no module: BitFit (every bias), linear probing (head only), full fine-tuning.

What trains is decided by ``mark_trainable`` from each method's ``backbone`` field; merging leaves the model as it is
(the trained tensors already live in the backbone).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from core.methods.base import AdapterState, Arch, MethodConfig
from core.methods.registry import Method, register


@dataclass(frozen=True)
class NoOptions(MethodConfig):
    """This method has no options."""


def _inject_nothing(model: nn.Module, config: NoOptions, arch: Arch, state: AdapterState) -> None:
    """These methods train existing tensors; ``mark_trainable`` selects them."""


for name, backbone, summary, paper in (
    (
        "bitfit",
        "biases",
        "BitFit: train every bias of the backbone (102,912 on ViT-B/16)",
        "Zaken et al., BitFit, ACL 2022",
    ),
    (
        "linear",
        "none",
        "Linear probe: train the classifier head only",
        "the standard linear-probing baseline",
    ),
    ("full", "all", "Full fine-tuning: train every parameter", "the standard full fine-tuning baseline"),
):
    register(
        Method(
            name=name,
            config=NoOptions,
            inject=_inject_nothing,
            backbone=backbone,
            mergeable=True,
            identity_at_init=lambda c: True,
            summary=summary,
            paper=paper,
        )
    )
