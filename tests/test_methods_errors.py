"""Every bad input to the method API gets a ValueError that names the bad value and what is allowed."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from core import methods
from tests.conftest import tiny_vit


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("nope", {}, r"unknown method 'nope'; available: fact, rlrr"),
        ("fact", {"rnak": 4}, r"unknown option\(s\) rnak .*allowed: variant, rank"),
        ("fact", {"rank": 0}, r"FacT rank=0 is out of range; use 1 to the width 48"),
        ("lora", {"rank": 49}, r"LoRA rank=49 is out of range; use 1 to the width 48"),
        ("fact", {"variant": "cp"}, r"variant='cp' is not allowed; choose one of tt, tk"),
        ("fact", {"rank": "four"}, r"rank='four' must be of type int"),
        ("kadaptation", {"n": 5}, r"KAdaptation n=5 must divide the width 48"),
        ("lora", {"targets": "q:7"}, r"names block 7, but the model has blocks 0-1"),
        ("lora", {"targets": "query"}, r"unknown target matrix 'query'"),
        ("adapter", {"bottleneck": 0}, r"bottleneck=0 is out of range"),
        ("vpt", {"tokens": 0}, r"tokens=0 is out of range"),
        ("rlrr", {"init": "zeros"}, r"choose one of official, identity"),
    ],
)
def test_apply_refuses_bad_options(name: str, options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        methods.apply(tiny_vit("vit"), name, **options)


def test_apply_refuses_a_model_that_is_not_a_vit() -> None:
    with pytest.raises(ValueError, match="not a timm Vision Transformer"):
        methods.apply(nn.Sequential(nn.Linear(4, 4)), "lora")


def test_apply_refuses_a_model_that_already_carries_an_adapter() -> None:
    model = methods.apply(tiny_vit("vit"), "lora")
    with pytest.raises(ValueError, match="already carries lora"):
        methods.apply(model, "fact")


def test_kadaptation_picks_and_records_a_divisor_of_the_width() -> None:
    model = methods.apply(tiny_vit("vit"), "kadaptation")  # width 48: 32 does not divide it, 24 does
    assert methods.adapter_state(model).config.n == 24


def test_merge_refuses_prompts_and_plain_models() -> None:
    with pytest.raises(ValueError, match="vpt cannot be merged"):
        methods.merge(methods.apply(tiny_vit("vit"), "vpt"))
    with pytest.raises(ValueError, match="carries no PETLab adapter"):
        methods.merge(tiny_vit("vit"))


def test_load_adapter_refuses_other_method_shape_and_classes(tmp_path) -> None:
    path = methods.save_adapter(methods.apply(tiny_vit("vit"), "lora", rank=2), tmp_path / "a.safetensors")
    with pytest.raises(ValueError, match="another class count: num_classes 5 \\(file\\) vs 7 \\(model\\)"):
        methods.load_adapter(tiny_vit("vit", num_classes=7), path)
    with pytest.raises(ValueError, match="another backbone shape"):
        methods.load_adapter(tiny_vit("dinov2"), path)
    with pytest.raises(ValueError, match="holds lora .* but the model carries fact"):
        methods.load_adapter(methods.apply(tiny_vit("vit"), "fact"), path)
    with pytest.raises(ValueError, match="holds lora .*'rank': 2.* but the model carries lora .*'rank': 4"):
        methods.load_adapter(methods.apply(tiny_vit("vit"), "lora", rank=4), path)


def test_load_adapter_never_unpickles(tmp_path) -> None:
    class Boom:
        def __reduce__(self):
            return (exec, ("raise SystemExit('unpickled!')",))

    evil = tmp_path / "evil.safetensors"
    evil.write_bytes(pickle.dumps(Boom()))
    with pytest.raises(ValueError, match="not a safetensors adapter file"):
        methods.load_adapter(tiny_vit("vit"), evil)
    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(2)}, str(plain))
    with pytest.raises(ValueError, match="not a PETLab adapter file"):
        methods.load_adapter(tiny_vit("vit"), plain)
    with pytest.raises(ValueError, match="does not exist"):
        methods.load_adapter(tiny_vit("vit"), tmp_path / "missing.safetensors")


def test_weight_updates_split_the_fused_qkv() -> None:
    model = methods.apply(tiny_vit("vit"), "lora", rank=2, targets="q,v:0;fc1:1")
    updates = methods.weight_updates(model)
    assert sorted(updates) == ["blocks.0.attn.qkv.q", "blocks.0.attn.qkv.v", "blocks.1.mlp.fc1"]
    w0, dw = updates["blocks.0.attn.qkv.v"]
    assert w0.shape == dw.shape == (48, 48)
    assert torch.equal(w0, model.blocks[0].attn.qkv.base.weight[96:])
    assert methods.weight_updates(methods.apply(tiny_vit("vit"), "vpt")) == {}
    copy.deepcopy(model)  # wrappers with shared references survive a deep copy
