"""core.methods.explain: every registered method is explained, and its closed-form count is the code's count."""

from __future__ import annotations

import pytest

from core import methods
from core.backbone import BackboneSpec, skeleton
from core.experiment import count_params
from core.methods import explain

BACKBONES = {  # DINOv2 (patch 14, LayerScale) at a small size, and two plain ViTs at their native size
    "vit_small_patch14_dinov2": 56,
    "vit_tiny_patch16_224": 224,
    "vit_base_patch16_224": 224,
}
OPTIONS = {
    "fact": [{}, {"variant": "tk", "rank": 4}, {"rank": 3, "targets": "q,v:0-3;fc1"}],
    "rlrr": [{}, {"norms": False}, {"targets": "attn:0-5"}],
    "kadaptation": [{}, {"targets": "all", "rank": 2}, {"n": 8, "targets": "fc2:1"}],
    "lora": [{}, {"targets": "all", "rank": 3}],
    "adapter": [{}, {"blocks": "0-3", "bottleneck": 4}],
    "vpt": [{}, {"deep": False, "tokens": 3}],
    "ssf": [{}],
    "bitfit": [{}],
    "linear": [{}],
    "full": [{}],
}
CASES = [(b, m, o) for b in BACKBONES for m, options in OPTIONS.items() for o in options]


def test_every_registered_method_is_explained_and_has_count_cases() -> None:
    assert explain.unexplained() == []
    assert set(OPTIONS) == set(methods.list_methods())
    for name in methods.list_methods():
        entry = explain.explain(name)
        assert entry.update and entry.count and entry.spectrum and entry.changes


@pytest.mark.parametrize(("backbone", "method", "options"), CASES, ids=[f"{b}-{m}-{o}" for b, m, o in CASES])
def test_closed_form_count_is_the_codes_count(backbone: str, method: str, options: dict) -> None:
    spec = BackboneSpec(name=backbone, weights="none", img_size=BACKBONES[backbone], num_classes=7)
    closed = explain.closed_form(method, skeleton(spec), options)
    assert closed.value == count_params(spec, method, options).without_head
    assert closed.worked.endswith(explain.number(closed.value))


def test_published_counts_on_vit_base() -> None:
    model = skeleton(BackboneSpec(name="vit_base_patch16_224", weights="none", num_classes=10))
    assert explain.closed_form("fact", model, {"rank": 8}).worked == r"2 \cdot 768 \cdot 8 + 144 \cdot 8^2 = 21{,}504"
    assert explain.closed_form("rlrr", model).value == 288_768
    assert explain.closed_form("kadaptation", model).value == 50_176
    assert explain.closed_form("lora", model).value == 294_912


def test_every_reference_label_is_in_the_shipped_results() -> None:
    from core.pareto import load_reference_results

    shipped = set(load_reference_results()["method"])
    for name in methods.list_methods():
        assert set(explain.explain(name).references) <= shipped, name


def test_unknown_methods_and_bad_options_are_refused() -> None:
    model = skeleton(BackboneSpec(name="vit_tiny_patch16_224", weights="none"))
    with pytest.raises(ValueError, match="unknown method"):
        explain.explain("dora")
    with pytest.raises(ValueError, match="rank=0"):
        explain.closed_form("lora", model, {"rank": 0})
