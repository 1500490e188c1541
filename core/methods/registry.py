"""The method registry and the public API over it: apply, count, merge, weight updates, adapter files.

Each method file ends with ``register(Method(...))``; the UI, the CLI and the tests discover methods from here.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from core.methods.base import (
    QKV_SLICES,
    AdapterModule,
    AdapterState,
    Arch,
    LinearWrapper,
    MethodConfig,
    ScaleShift,
    inspect_vit,
    mark_trainable,
    merge_wrappers,
    wrappers,
)

ADAPTER_FORMAT = "petlab-adapter/1"


@dataclass(frozen=True)
class Method:
    """One registered PETL method.

    Attributes:
        name: registry key (``fact``, ``lora``, ...).
        config: the option dataclass.
        inject: ``inject(model, config, arch, state)`` wraps children / adds modules; freezes nothing.
        backbone: which pretrained parameters train: ``none``, ``biases`` or ``all``.
        mergeable: whether ``merge`` can fold it into a plain ViT.
        identity_at_init: whether the adapted model equals the pretrained one at step 0, for a given config.
        summary: one line for menus and ``--help``.
        paper: citation of the method.
        differs_from_official: where PETLab departs from the method's official code and why (Markdown, shown on
            the Methods page); empty where it follows that code.
    """

    name: str
    config: type[MethodConfig]
    inject: Callable[[nn.Module, Any, Arch, AdapterState], None]
    backbone: Literal["none", "biases", "all"]
    mergeable: bool
    identity_at_init: Callable[[Any], bool]
    summary: str
    paper: str
    differs_from_official: str = ""


_REGISTRY: dict[str, Method] = {}


def register(method: Method) -> None:
    if method.name in _REGISTRY:
        raise ValueError(f"method {method.name!r} is registered twice")
    _REGISTRY[method.name] = method


def list_methods() -> list[str]:
    """Names of every registered method, in registration order."""
    return list(_REGISTRY)


def get_method(name: str) -> Method:
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def make_config(name: str, **options: Any) -> MethodConfig:
    """The validated-by-type config of method ``name`` from keyword options."""
    return get_method(name).config.from_options(**options)


def adapter_state(model: nn.Module) -> AdapterState | None:
    state = getattr(model, "petl", None)
    return state if isinstance(state, AdapterState) else None


def apply(model: nn.Module, name: str, **options: Any) -> nn.Module:
    """Inject method ``name`` into a timm ViT (in place), freeze everything else, return the model.

    Raises:
        ValueError: unknown method or option, an out-of-range option, a model that is not a timm ViT, or a model
            that already carries an adapter.
    """
    method = get_method(name)
    existing = adapter_state(model)
    if existing is not None or any(isinstance(m, AdapterModule) for m in model.modules()):
        already = existing.method if existing is not None else "an adapter"
        raise ValueError(
            f"this model already carries {already}; merge it (methods.merge) or start from a fresh backbone "
            "before applying another method"
        )
    arch = inspect_vit(model)
    config = method.config.from_options(**options)
    config.check(arch)
    state = AdapterState(method.name, config, arch)
    model.petl = state
    method.inject(model, config, arch, state)
    mark_trainable(model, method.backbone)
    return model


def count_trainable(model: nn.Module, include_head: bool) -> int:
    """Trainable parameters (``requires_grad``), shared tensors counted once; with or without the classifier."""
    total = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if not include_head:
        total -= sum(p.numel() for p in model.get_classifier().parameters() if p.requires_grad)
    return total


def merge(model: nn.Module) -> nn.Module:
    """Fold the adapter into the backbone (in place) and return a plain timm ViT of the same class.

    Raises:
        ValueError: if the model has no adapter or its method cannot be merged (VPT, bottleneck adapters).
    """
    state = adapter_state(model)
    if state is None:
        raise ValueError("this model carries no PETLab adapter to merge")
    method = get_method(state.method)
    if not method.mergeable:
        raise ValueError(
            f"{method.name} cannot be merged into the backbone: its modules are not a weight update "
            "(prompt tokens or a nonlinear bottleneck); keep the adapter and run the adapted model instead"
        )
    merge_wrappers(model)
    del model.petl
    return model


def weight_updates(model: nn.Module) -> dict[str, tuple[Tensor, Tensor]]:
    """Every adapted weight matrix as (pretrained W0, update dW), both out x in, from each wrapper's delta_weight.

    The fused qkv is split into ``...attn.qkv.q``/``.k``/``.v`` entries for the slices a method adapts (all three
    for a method that adapts the whole matrix). Methods without a weight update (VPT, bottleneck adapters, BitFit,
    linear probing) give an empty dict; compare against the pretrained backbone for full fine-tuning instead.
    """
    out: dict[str, tuple[Tensor, Tensor]] = {}
    with torch.no_grad():
        for name, wrapper in wrappers(model):
            if not isinstance(wrapper.base, nn.Linear) or not isinstance(wrapper, LinearWrapper | ScaleShift):
                continue
            w0 = wrapper.base.weight.detach()
            dw = wrapper.delta_weight().detach().to(w0.dtype)
            kept = tuple(wrapper.parts) if isinstance(wrapper, LinearWrapper) else QKV_SLICES
            out.update(matrix_entries(name, w0, dw, kept))
    return out


def matrix_entries(
    name: str, w0: Tensor, dw: Tensor, slices: tuple[str, ...] = QKV_SLICES
) -> dict[str, tuple[Tensor, Tensor]]:
    """``{name: (W0, dW)}``, with a fused ``attn.qkv`` split into its ``.q``/``.k``/``.v`` row slices (those in
    ``slices``)."""
    if not name.endswith("attn.qkv"):
        return {name: (w0, dw)}
    width = w0.shape[0] // len(QKV_SLICES)
    rows = {part: slice(i * width, (i + 1) * width) for i, part in enumerate(QKV_SLICES)}
    return {f"{name}.{part}": (w0[rows[part]], dw[rows[part]]) for part in QKV_SLICES if part in slices}


# ----------------------------------------------------------------------------------------------------------------
# Adapter files: the trainable tensors only, as safetensors with JSON metadata; never pickle.
# ----------------------------------------------------------------------------------------------------------------
def save_adapter(model: nn.Module, path: str | Path) -> Path:
    """Write the trainable tensors (head included) and what is needed to rebuild the adapter."""
    state = adapter_state(model)
    if state is None:
        raise ValueError("this model carries no PETLab adapter; apply a method before saving an adapter")
    tensors = {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}
    meta = {
        "format": ADAPTER_FORMAT,
        "method": state.method,
        "config": json.dumps(state.config.to_dict()),
        "arch": json.dumps(state.arch.to_dict()),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=meta)
    return path


def read_adapter_metadata(path: str | Path) -> dict[str, Any]:
    """The method, options and backbone shape a PETLab adapter file was made for."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except FileNotFoundError:
        raise ValueError(f"adapter file {path} does not exist") from None
    except Exception as exc:  # safetensors raises its own error types for a file that is not safetensors
        raise ValueError(f"{path} is not a safetensors adapter file ({exc})") from None
    if meta.get("format") != ADAPTER_FORMAT:
        raise ValueError(f"{path} is not a PETLab adapter file (format {meta.get('format')!r})")
    return {"method": meta["method"], "config": json.loads(meta["config"]), "arch": json.loads(meta["arch"])}


def load_adapter(model: nn.Module, path: str | Path) -> nn.Module:
    """Load an adapter file into ``model`` (a plain ViT, or one carrying the same method and options).

    Raises:
        ValueError: the file is not a PETLab adapter, or was made for another method, options, backbone shape or
            class count than ``model``.
    """
    meta = read_adapter_metadata(path)
    state = adapter_state(model)
    arch = state.arch if state is not None else inspect_vit(model)
    saved_arch = Arch(**meta["arch"])
    if saved_arch != arch:
        diffs = [
            f"{k} {getattr(saved_arch, k)} (file) vs {getattr(arch, k)} (model)"
            for k in arch.to_dict()
            if getattr(saved_arch, k) != getattr(arch, k)
        ]
        kind = "class count" if [d.split()[0] for d in diffs] == ["num_classes"] else "backbone shape"
        raise ValueError(f"adapter {path} was made for another {kind}: {'; '.join(diffs)}")
    if state is None:
        apply(model, meta["method"], **meta["config"])
    elif state.method != meta["method"] or state.config.to_dict() != meta["config"]:
        raise ValueError(
            f"adapter {path} holds {meta['method']} {meta['config']}, but the model carries "
            f"{state.method} {state.config.to_dict()}; load it into a fresh backbone instead"
        )
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        if keys != set(params):
            missing, extra = sorted(set(params) - keys), sorted(keys - set(params))
            raise ValueError(f"adapter {path} does not fit this model: missing {missing[:5]}, unexpected {extra[:5]}")
        with torch.no_grad():
            for name in keys:
                tensor = f.get_tensor(name)
                if tensor.shape != params[name].shape:
                    raise ValueError(
                        f"adapter {path}: {name} has shape {tuple(tensor.shape)}, the model expects "
                        f"{tuple(params[name].shape)}"
                    )
                params[name].copy_(tensor)
    return model
