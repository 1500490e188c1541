"""PETL methods for timm ViTs: one file per method, discovered through the registry.

Public API::

    from core import methods
    methods.list_methods()
    methods.apply(model, "fact", variant="tt", rank=8)
    methods.count_trainable(model, include_head=False)
    methods.merge(model)
    methods.save_adapter(model, path); methods.load_adapter(model, path)
"""

# isort: off
# Importing a method file registers it; this order is the order users see.
from core.methods import fact, rlrr, kadaptation  # noqa: F401
from core.methods import lora, adapter, vpt, ssf, baselines  # noqa: F401

# isort: on
from core.methods.base import MATRICES, Arch, Targets, inspect_vit
from core.methods.registry import (
    Method,
    adapter_state,
    apply,
    count_trainable,
    get_method,
    list_methods,
    load_adapter,
    make_config,
    matrix_entries,
    merge,
    read_adapter_metadata,
    save_adapter,
    weight_updates,
)

__all__ = [
    "MATRICES",
    "Arch",
    "Method",
    "Targets",
    "adapter_state",
    "apply",
    "count_trainable",
    "get_method",
    "inspect_vit",
    "list_methods",
    "load_adapter",
    "make_config",
    "matrix_entries",
    "merge",
    "read_adapter_metadata",
    "save_adapter",
    "weight_updates",
]
