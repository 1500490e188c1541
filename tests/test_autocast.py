"""The trainer's CUDA path (bf16 autocast) checked on the CPU: which context each device gets, and that every
method trains, evaluates and caches features under bf16 autocast with fp32 parameters and fp32 metrics.

The CPU run swaps in ``torch.autocast("cpu", dtype=torch.bfloat16)`` for the trainer's CUDA context: the same
mixed-precision rules (matmuls in bf16, parameters and their gradients in fp32) on hardware every machine has.
"""

from __future__ import annotations

import contextlib
import copy
import math
import warnings

import pytest
import torch

import core.train
from core import methods
from core.data import DataSpec, load_data
from core.train import TrainConfig, train
from tests.conftest import tiny_vit

DATA = DataSpec(name="digits", img_size=32, n_train=32, n_val=16, n_test=16)
STEPS = TrainConfig(steps=2, batch_size=8, warmup_steps=0, eval_every=2, lr=1e-2, device="cpu")
CASES = [(name, {}) for name in methods.list_methods()] + [("fact", {"variant": "tk"})]


def test_cuda_gets_bf16_autocast_and_the_cpu_runs_in_fp32() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns that CUDA is absent; the context's settings are what we check
        cuda = core.train._autocast(torch.device("cuda"))
    assert isinstance(cuda, torch.autocast)
    assert (cuda.device, cuda.fast_dtype) == ("cuda", torch.bfloat16)
    assert isinstance(core.train._autocast(torch.device("cpu")), contextlib.nullcontext)


@pytest.fixture(scope="module")
def bundle():
    return load_data(DATA)


@pytest.mark.parametrize(("name", "options"), CASES, ids=[f"{n}{o}" for n, o in CASES])
def test_every_method_trains_under_bf16_autocast(monkeypatch, bundle, name: str, options: dict) -> None:
    monkeypatch.setattr(core.train, "_autocast", lambda device: torch.autocast("cpu", dtype=torch.bfloat16))
    model = methods.apply(tiny_vit("vit", num_classes=bundle.num_classes), name, **options)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    logit_dtypes: set[torch.dtype] = set()
    model.get_classifier().register_forward_hook(lambda module, inputs, out: logit_dtypes.add(out.dtype))

    result = train(model, bundle, STEPS)

    assert result.status == "completed"
    assert logit_dtypes == {torch.bfloat16}  # the forward really ran under autocast
    assert all(p.dtype == torch.float32 for p in model.parameters())
    moved = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert moved and all(torch.isfinite(p).all() for p in model.parameters())
    losses = [h["loss"] for h in result.history if h["split"] == "train"]
    assert len(losses) == STEPS.steps and all(isinstance(v, float) and math.isfinite(v) for v in losses)
    assert result.test_acc is not None and 0.0 <= result.test_acc <= 100.0


def test_cached_features_are_fp32_under_bf16_autocast(monkeypatch, bundle) -> None:
    monkeypatch.setattr(core.train, "_autocast", lambda device: torch.autocast("cpu", dtype=torch.bfloat16))
    model = methods.apply(tiny_vit("vit", num_classes=bundle.num_classes), "linear")
    features = core.train.backbone_features(copy.deepcopy(model), bundle.val, torch.device("cpu"))
    assert features.dtype == torch.float32 and features.shape == (len(bundle.val), model.embed_dim)
    with torch.no_grad():
        reference = model.forward_head(model.forward_features(torch.stack([x for x, _ in bundle.val])), True)
    torch.testing.assert_close(features, reference, rtol=0.05, atol=0.05)  # bf16 matmuls, fp32 result
