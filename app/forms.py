"""Widget groups the pages share: a form generated from any config dataclass, and the data and backbone pickers.

Every widget is keyed, and its default is written to ``st.session_state`` before it is drawn (never passed as
``value=`` too), so another page may pre-fill a value by setting the key first.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Mapping
from typing import Any

import pandas as pd
import streamlit as st

from core.backbone import HUB, NO_WEIGHTS, OFFLINE_DEFAULT, OFFLINE_DEFAULT_ARCH, OFFLINE_DEFAULT_DESCRIPTION
from core.config import coerce_fields, field_docs, unwrap_optional
from core.data import NORMALIZATIONS, DataSpec, default_data_root, list_datasets

_FOLDER_SOURCES = {"folder:": "your images: one subfolder per class", "vtab:": "a VTAB-1k task folder"}
_WEIGHTS = {
    OFFLINE_DEFAULT: "offline default (ships with PETLab)",
    HUB: "timm's pretrained weights (hub cache or download)",
    NO_WEIGHTS: "random initialisation",
    "file": "a local .safetensors / .pth state dict",
}


def _float_step(value: float) -> float:
    return 10.0 ** (math.floor(math.log10(abs(value))) - 1) if value else 0.01


def _preset(key: str, value: Any) -> None:
    if key not in st.session_state:
        st.session_state[key] = value


def field_input(name: str, hint: Any, default: Any, key: str, help: str | None = None) -> Any:
    """One widget for one typed field: a selectbox for a Literal, a checkbox for a bool, a number input for an int
    or float, and a text input for anything else (targets, paths, and optional numbers: empty means None)."""
    label = name.replace("_", " ")
    inner, optional = unwrap_optional(hint)
    if typing.get_origin(inner) is typing.Literal and not optional:
        _preset(key, default)
        return st.selectbox(label, typing.get_args(inner), key=key, help=help)
    if inner is bool and not optional:
        _preset(key, bool(default))
        return st.checkbox(label, key=key, help=help)
    if inner is int and not optional:
        _preset(key, int(default))
        return int(st.number_input(label, step=1, key=key, help=help))
    if inner is float and not optional:
        _preset(key, float(default))
        return float(st.number_input(label, step=_float_step(float(default)), format="%g", key=key, help=help))
    _preset(key, "" if default is None else str(default))
    text = st.text_input(label, key=key, help=help, placeholder="empty: None" if optional else None).strip()
    return text or None


def field_default(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    raise ValueError(f"field {f.name} has no default")


def dataclass_form(
    cls: type, key: str, defaults: Any = None, columns: int = 3, exclude: tuple[str, ...] = ()
) -> dict[str, Any]:
    """Widgets for every field of a config dataclass, typed from its annotations and documented from its
    docstring's Attributes; returns name -> value (optional numbers and other text fields as strings or None,
    see `coerce`)."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    chosen = [f for f in dataclasses.fields(cls) if f.name not in exclude]
    if not chosen:
        st.caption("This method has no options.")
        return {}
    cells = st.columns(columns)
    values: dict[str, Any] = {}
    for i, f in enumerate(chosen):
        default = getattr(defaults, f.name) if defaults is not None else field_default(f)
        with cells[i % columns]:
            values[f.name] = field_input(f.name, hints[f.name], default, f"{key}.{f.name}", docs.get(f.name))
    return values


def coerce(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """The form's values as the field types (``core.config.coerce``): text of optional numbers becomes a number
    or None.

    Raises:
        ValueError: a text that is not of the field's type, naming the field.
    """
    return coerce_fields(cls, values)


def data_inputs(key: str, defaults: DataSpec) -> dict[str, Any]:
    """Dataset source, image size, normalisation and split caps; returns `DataSpec` keyword arguments."""
    sources = [*list_datasets(), *_FOLDER_SOURCES]
    _preset(f"{key}.name", defaults.name if defaults.name in sources else sources[0])
    left, right = st.columns(2)
    with left:
        source = st.selectbox(
            "Dataset",
            sources,
            key=f"{key}.name",
            format_func=lambda s: f"{s} {_FOLDER_SOURCES[s]}" if s in _FOLDER_SOURCES else s,
            help="The offline datasets ship with PETLab's dependencies; folder: and vtab: read your own images.",
        )
        name = source
        if source in _FOLDER_SOURCES:
            _preset(f"{key}.path", "")
            path = st.text_input(
                "Folder", key=f"{key}.path", help=f"must lie inside the data root {default_data_root()}"
            ).strip()
            name = source + path
        _preset(f"{key}.img_size", defaults.img_size)
        img_size = int(
            st.number_input(
                "Image size (px)",
                min_value=8,
                max_value=1024,
                step=14,
                key=f"{key}.img_size",
                help="A multiple of the backbone's patch size (14 for DINOv2, 16 for vit_*_patch16). Cost grows with "
                "(size / patch)^2.",
            )
        )
        _preset(f"{key}.normalization", defaults.normalization)
        normalization = st.selectbox(
            "Normalisation",
            list(NORMALIZATIONS),
            key=f"{key}.normalization",
            help="imagenet for the offline default and timm's ImageNet weights",
        )
    with right:
        caps = {}
        for split in ("train", "val", "test"):
            _preset(f"{key}.n_{split}", getattr(defaults, f"n_{split}"))
            caps[f"n_{split}"] = st.number_input(
                f"Cap on {split} images",
                min_value=1,
                step=100,
                key=f"{key}.n_{split}",
                placeholder="all",
                help="a stratified subsample; empty keeps the whole split",
            )
    return {"name": name, "img_size": img_size, "normalization": normalization, **caps}


def backbone_inputs(key: str) -> dict[str, Any]:
    """timm model name and weight source; returns `BackboneSpec` keyword arguments (name, weights)."""
    left, right = st.columns(2)
    _preset(f"{key}.name", OFFLINE_DEFAULT_ARCH)
    name = left.text_input("timm model", key=f"{key}.name", help="a timm ViT name, e.g. vit_base_patch16_224").strip()
    _preset(f"{key}.weights", OFFLINE_DEFAULT)
    weights = right.selectbox("Weights", list(_WEIGHTS), key=f"{key}.weights", format_func=lambda w: _WEIGHTS[w])
    if weights == "file":
        _preset(f"{key}.file", "")
        weights = st.text_input("Weights file", key=f"{key}.file").strip()
    if weights == OFFLINE_DEFAULT:
        st.caption(f"{OFFLINE_DEFAULT_DESCRIPTION}. It fits only {OFFLINE_DEFAULT_ARCH}.")
    return {"name": name, "weights": weights}


def run_labels(runs: pd.DataFrame, with_status: bool = True) -> dict[str, str]:
    """Run id -> one line for a run selectbox: id, method, status and label."""
    labels = {}
    for _, r in runs.iterrows():
        parts = [r["id"], r["method"], r["status"] if with_status else None]
        label = r.get("label")
        parts.append(f"({label})" if isinstance(label, str) and label else None)
        labels[r["id"]] = "  ".join(str(p) for p in parts if p)
    return labels


def options_text(options: Mapping[str, Any] | None) -> str:
    """A method's options as one readable line (``rank 8, alpha 8, targets q,v``), never a raw dict."""
    if not options:
        return "no options"
    shown = []
    for name, value in options.items():
        if isinstance(value, float):
            value = f"{value:g}"
        elif isinstance(value, list | tuple):
            value = groups_text(value)
        shown.append(f"{name.replace('_', ' ')} {'none' if value is None else value}")
    return ", ".join(shown)


def groups_text(groups: Any) -> str:
    """Intrinsic-dimension groups as text: a scheme name, or the targets strings separated by ``|``."""
    return " | ".join(map(str, groups)) if isinstance(groups, list | tuple) else str(groups)


def duration(seconds: float) -> str:
    """A duration as people say it: ``45 s``, ``3 min 20 s``, ``1 h 5 min``."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        minutes, rest = divmod(seconds, 60)
        return f"{minutes} min {rest} s" if rest and minutes < 10 else f"{minutes} min"
    hours, rest = divmod(seconds, 3600)
    return f"{hours} h {rest // 60} min"


def show_failure(message: str | None, prefix: str = "") -> None:
    """A run's failure message: its first line as an error, the rest (error type, traceback) folded away."""
    first, _, details = (message or "failed without a message").partition("\n")
    st.error(f"{prefix}{first}")
    if details.strip():
        with st.expander("Details"):
            st.code(details.strip(), language=None)
