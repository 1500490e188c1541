"""core.config: help text from config docstrings and values from text, the one reading the CLI and the app share."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest

from core.config import coerce, coerce_fields, field_docs, unwrap_optional
from core.intrinsic_dim import IntrinsicDimConfig
from core.methods import Targets
from core.train import TrainConfig


@dataclass(frozen=True)
class Example:
    """Something configurable.

    Attributes:
        rank: the rank r.
        scale (float): a factor that takes
            two lines to explain.
        clip: an optional bound.
        mode: how.
        flag: on or off.
        targets: which matrices.
        not_a_field: documented but absent.

    This paragraph is not part of any attribute: not_a_field: nor is this.
    """

    rank: int = 8
    scale: float = 1.0
    clip: float | None = None
    mode: Literal["tt", "tk"] = "tt"
    flag: bool = False
    targets: Targets = field(default_factory=lambda: Targets.parse("q,v"))
    undocumented: str = ""


def test_field_docs_reads_the_attributes_section() -> None:
    assert field_docs(Example) == {
        "rank": "the rank r.",
        "scale": "a factor that takes two lines to explain.",
        "clip": "an optional bound.",
        "mode": "how.",
        "flag": "on or off.",
        "targets": "which matrices.",
    }
    assert field_docs(TrainConfig)["weight_decay"].startswith("AdamW decay, applied to matrices only")
    assert "lr * sqrt(d)" in field_docs(IntrinsicDimConfig)["lr"]  # a continuation line
    assert field_docs(dataclass(type("Bare", (), {"__annotations__": {"x": int}, "x": 0}))) == {}


@pytest.mark.parametrize(
    ("name", "text", "value"),
    [
        ("rank", "4", 4),
        ("rank", 4.0, 4),
        ("scale", "0.5", 0.5),
        ("clip", "none", None),
        ("clip", "None", None),
        ("clip", None, None),
        ("clip", "2", 2.0),
        ("mode", "tk", "tk"),
        ("flag", "yes", True),
        ("flag", "False", False),
        ("flag", 1, True),
        ("targets", "attn:0-1", Targets.parse("attn:0-1")),
        ("undocumented", "kept as given", "kept as given"),
    ],
)
def test_coerce_reads_text_as_the_field_type(name: str, text: object, value: object) -> None:
    assert coerce(Example, name, text) == value
    assert type(coerce(Example, name, text)) is type(value)


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("rank", "four", r"rank='four' must be of type int$"),
        ("rank", 2.5, r"rank=2.5 must be of type int"),
        ("rank", "none", r"rank='none' must be of type int"),  # not optional
        ("clip", "big", r"clip='big' must be of type float or none"),
        ("mode", "cp", r"mode='cp' is not allowed; choose one of tt, tk"),
        ("flag", "maybe", r"flag='maybe' must be of type bool"),
        ("targets", "qq", r"unknown target matrix 'qq'"),
    ],
)
def test_coerce_names_the_field_and_what_it_must_be(name: str, text: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        coerce(Example, name, text)


def test_coerce_fields_and_unwrap_optional() -> None:
    assert coerce_fields(Example, {"rank": "2", "clip": "none"}) == {"rank": 2, "clip": None}
    assert unwrap_optional(float | None) == (float, True)
    assert unwrap_optional(int) == (int, False)
    assert unwrap_optional(int | str | None) == (int | str | None, False)
