"""core.experiment: the weightless parameter count and the one validation of a run, against closed-form counts."""

from __future__ import annotations

from pathlib import Path

import pytest

import core.experiment
from core.backbone import BackboneSpec
from core.data import DataSpec
from core.experiment import CheckedExperiment, Experiment, count_params, native_img_size, run_experiment, validate
from core.runs import RunStore
from core.train import TrainConfig

VIT_S = BackboneSpec(name="vit_small_patch14_dinov2", weights="none", img_size=28, num_classes=10)  # d 384, depth 12
TINY = Experiment(
    data=DataSpec(name="digits", img_size=28, n_train=16, n_val=16, n_test=16),
    method="lora",
    options={"rank": 2},
    train=TrainConfig(steps=1, batch_size=8, warmup_steps=0, eval_every=1),
)


def test_count_params_in_closed_form() -> None:
    count = count_params(VIT_S, "lora", {"rank": 2})
    assert count.without_head == 2 * 2 * 2 * 384 * 12  # q and v: (A + B) * r * d, in each of 12 blocks
    assert count.with_head == count.without_head + 10 * (384 + 1)
    assert count.width == 384
    assert count.options == {"rank": 2, "alpha": 8.0, "dropout": 0.0, "targets": "q,v"}
    assert count_params(VIT_S, "linear").without_head == 0
    # Full fine-tuning counts the position embedding, whose length follows the image size.
    at_native = BackboneSpec(name=VIT_S.name, weights="none", img_size=native_img_size(VIT_S.name), num_classes=10)
    grown = count_params(at_native, "full").without_head - count_params(VIT_S, "full").without_head
    assert grown == ((518 // 14) ** 2 - (28 // 14) ** 2) * 384


def test_native_img_size_follows_timms_config() -> None:
    assert native_img_size("vit_small_patch14_dinov2") == 518
    assert native_img_size("vit_base_patch16_224.augreg_in1k") == 224


def test_count_params_refuses_bad_options_and_backbones() -> None:
    with pytest.raises(ValueError, match="rank=0"):
        count_params(VIT_S, "lora", {"rank": 0})
    with pytest.raises(ValueError, match="unknown method"):
        count_params(VIT_S, "dora")
    with pytest.raises(ValueError, match="timm has no model"):
        count_params(BackboneSpec(name="vit_nonexistent", weights="none"), "lora")


def test_validate_resolves_the_options() -> None:
    checked = validate(TINY)
    assert checked.experiment.options == {"rank": 2, "alpha": 8.0, "dropout": 0.0, "targets": "q,v"}
    assert checked.experiment.data == TINY.data and checked.params.without_head == 2 * 2 * 2 * 384 * 12
    with pytest.raises(ValueError, match="unknown option"):
        validate(Experiment(method="lora", options={"rnk": 2}))


def test_a_run_is_validated_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    counted = core.experiment.count_params
    monkeypatch.setattr(core.experiment, "count_params", lambda *a, **k: calls.append(a[1]) or counted(*a, **k))
    store = RunStore(tmp_path)
    checked = validate(TINY)
    assert isinstance(checked, CheckedExperiment) and calls == ["lora"]
    run_id = run_experiment(checked, store)  # already checked: no second weightless model
    assert calls == ["lora"]
    run = store.get_run(run_id)
    assert run["status"] == "completed" and run["method_options"] == checked.experiment.options
    with pytest.raises(ValueError, match="rank=0"):  # a plain experiment is checked first, before it is recorded
        run_experiment(Experiment(data=TINY.data, method="lora", options={"rank": 0}, train=TINY.train), store)
    assert calls == ["lora", "lora"] and len(store.list_runs()) == 1


def test_a_run_is_the_same_in_every_process(tmp_path) -> None:
    """The seed fixes the new head and the method's initial factors too, not only the training order: two
    processes that draw different random numbers before the run still record the same run."""
    import dataclasses

    import torch

    from core.backbone import BackboneSpec
    from core.data import DataSpec
    from core.experiment import Experiment, run_experiment
    from core.runs import RunStore
    from core.train import TrainConfig

    experiment = Experiment(
        data=DataSpec(name="digits", img_size=32, n_train=32, n_val=16, n_test=16),
        backbone=BackboneSpec(name="test_vit", weights="none"),
        method="lora",
        options={"rank": 2},
        train=dataclasses.replace(TrainConfig(), steps=3, batch_size=8, eval_every=3, warmup_steps=0),
    )
    store = RunStore(tmp_path)
    results = []
    for draw in (1, 1000):
        torch.rand(draw)  # another process's random state
        run_id = run_experiment(experiment, store)
        results.append(store.metrics(run_id, split="train", name="loss")["value"].tolist())
    assert results[0] == results[1]
