"""The trainer, the experiment path and the CLI: plumbing on a tiny random ViT, one run on the real backbone."""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest
import timm
import torch
from safetensors.torch import save_file

from core import methods
from core import train as train_module
from core.__main__ import main as cli
from core.backbone import BackboneSpec, build_backbone
from core.data import DataSpec, load_data
from core.experiment import Experiment, run_experiment
from core.runs import RunStore
from core.train import Callback, CancelToken, StepInfo, TrainConfig, lr_at, parameter_groups, train
from tests.conftest import tiny_vit

# timm's registered test model (width 64, depth 6, MLP ratio 3, patch 16), random: the plumbing needs no pretraining.
TINY_BACKBONE = BackboneSpec(name="test_vit", weights="none", img_size=32)
TINY_DEPTH = 6
TINY_DATA = DataSpec(name="digits", img_size=32, n_train=64, n_val=32, n_test=48)
REAL_DATA = dataclasses.replace(TINY_DATA, img_size=28)  # the offline default's patch is 14 px
FAST = TrainConfig(steps=4, batch_size=16, warmup_steps=1, eval_every=2, lr=1e-3)


@pytest.fixture(scope="module")
def bundle():
    return load_data(TINY_DATA)


@pytest.fixture(scope="module")
def tiny_model(bundle):
    model, _ = build_backbone(dataclasses.replace(TINY_BACKBONE, num_classes=bundle.num_classes))
    return model


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A headless state-dict file of the tiny ViT, so that rebuilding a run's backbone gives the same weights."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "test_vit.safetensors"
    save_file(timm.create_model(TINY_BACKBONE.name, img_size=TINY_BACKBONE.img_size, num_classes=0).state_dict(), path)
    return path


@pytest.fixture
def store(tmp_path: Path) -> RunStore:
    return RunStore(tmp_path / "home")


DEFAULT_CASES = [(name, {}) for name in methods.list_methods()] + [("fact", {"variant": "tk"})]


@pytest.mark.parametrize(("name", "options"), DEFAULT_CASES, ids=[f"{n}{o}" for n, o in DEFAULT_CASES])
def test_every_method_trains_a_few_steps(tiny_model, bundle, name, options) -> None:
    model = methods.apply(copy.deepcopy(tiny_model), name, **options)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    result = train(model, bundle, FAST)
    assert result.status == "completed" and result.steps == FAST.steps
    assert 0.0 <= result.test_acc <= 100.0 and result.best_val_acc is not None
    moved = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert moved  # training did something
    assert [h["step"] for h in result.history if h["split"] == "val"] == [2, 4]
    assert sum(h["split"] == "test" for h in result.history) == 1  # test evaluated exactly once


def test_best_validation_state_is_restored_and_tested_once(tiny_model, bundle) -> None:
    class Record(Callback):
        def __init__(self) -> None:
            self.evals: list[tuple[int, str, float]] = []

        def on_eval(self, step, split, metrics) -> None:
            self.evals.append((step, split, metrics["acc"]))

    rec = Record()
    model = methods.apply(copy.deepcopy(tiny_model), "lora", rank=2)
    result = train(model, bundle, TrainConfig(steps=6, batch_size=16, warmup_steps=1, eval_every=2, lr=5e-3), [rec])
    vals = [(s, a) for s, split, a in rec.evals if split == "val"]
    best_step, best_acc = max(vals, key=lambda t: (t[1], -t[0]))
    assert (result.best_step, result.best_val_acc) == (best_step, best_acc)
    from core.data import make_loader
    from core.train import evaluate

    again = evaluate(model, make_loader(bundle.val, 64), torch.device("cpu"))
    assert again["acc"] == pytest.approx(best_acc)  # the model holds the selected state
    assert [split for _, split, _ in rec.evals].count("test") == 1


def test_linear_probe_on_cached_features_equals_training_through_the_backbone(tiny_model, bundle) -> None:
    results = []
    for cache in (True, False):
        model = methods.apply(copy.deepcopy(tiny_model), "linear")
        results.append(train(model, bundle, TrainConfig(**{**FAST.to_dict(), "cache_features": cache})))
    cached, direct = results
    assert cached.best_val_acc == pytest.approx(direct.best_val_acc)
    assert cached.test_acc == pytest.approx(direct.test_acc)
    losses = [[h["loss"] for h in r.history if h["split"] == "train"] for r in results]
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)


def test_cancellation_stops_within_one_step(tiny_model, bundle) -> None:
    token = CancelToken()

    class CancelAt2(Callback):
        def on_step(self, info: StepInfo) -> None:
            if info.step == 2:
                token.cancel()

    model = methods.apply(copy.deepcopy(tiny_model), "fact")
    result = train(model, bundle, TrainConfig(steps=50, batch_size=16, eval_every=100), [CancelAt2()], token)
    assert result.status == "cancelled" and result.steps == 2
    assert "cancelled" in result.message and result.test_acc is None


def test_divergence_stops_with_a_clear_record(store) -> None:
    run_id = run_experiment(
        Experiment(
            data=TINY_DATA,
            backbone=TINY_BACKBONE,
            method="full",
            train=TrainConfig(steps=20, batch_size=16, lr=1e12, warmup_steps=0, min_lr=0.0, eval_every=100),
        ),
        store,
    )
    run = store.get_run(run_id)
    assert run["status"] == "diverged"
    assert run["message"].startswith("diverged at step ") and "try a lower learning rate" in run["message"]
    assert run["test_acc"] is None


def test_experiment_streams_metrics_to_the_store_while_training_and_records_a_cancel(store) -> None:
    token = CancelToken()
    seen: dict[str, object] = {}

    class CheckStoreAt10(Callback):  # runs after the experiment's own store logger
        def on_step(self, info: StepInfo) -> None:
            if info.step == 10:
                run = store.list_runs().iloc[0]
                seen.update(status=run["status"], steps=run["steps"], rows=len(store.metrics(run["id"])))
                token.cancel()

    config = TrainConfig(steps=1000, batch_size=8, warmup_steps=0, eval_every=1000)
    experiment = Experiment(data=TINY_DATA, backbone=TINY_BACKBONE, method="lora", train=config)
    run_id = run_experiment(experiment, store, [CheckStoreAt10()], token)
    assert seen == {"status": "running", "steps": 10, "rows": 30}  # loss, lr and images/s of 10 steps
    run = store.get_run(run_id)
    assert (run["status"], run["steps"], run["test_acc"]) == ("cancelled", 10, None)
    assert len(store.metrics(run_id)) == 30


@pytest.mark.slow
def test_experiment_on_the_offline_default_records_everything(store) -> None:
    run_id = run_experiment(Experiment(data=REAL_DATA, method="lora", options={"rank": 2}, train=FAST), store)
    run = store.get_run(run_id)
    assert run["status"] == "completed"
    assert run["method_options"] == {"rank": 2, "alpha": 8.0, "dropout": 0.0, "targets": "q,v"}
    assert run["trainable_params"] == 2 * 2 * 2 * 384 * 12  # q and v: (A + B) * r * d * depth
    assert run["trainable_params_with_head"] == run["trainable_params"] + 385 * 10
    assert run["normalization"] == "imagenet" and run["dataset"]["name"] == "digits"
    assert "third-party saliency fine-tune" in run["weights"]["description"]
    assert run["steps"] == 4 and run["wall_time_s"] > 0 and run["peak_memory_bytes"] > 0
    assert run["device"] == "cpu" and run["versions"]["torch"] in torch.__version__
    metrics = store.metrics(run_id)
    assert set(metrics["split"]) == {"train", "val", "test"}
    restored = methods.load_adapter(
        build_backbone(BackboneSpec(img_size=28, num_classes=10))[0], store.adapter_path(run_id)
    )
    assert methods.adapter_state(restored).method == "lora"


def test_bad_options_fail_before_anything_is_recorded(store) -> None:
    with pytest.raises(ValueError, match="FacT rank=0 is out of range"):
        run_experiment(Experiment(data=TINY_DATA, backbone=TINY_BACKBONE, options={"rank": 0}, train=FAST), store)
    assert store.list_runs().empty


def test_schedule_warms_up_then_decays_to_min_lr() -> None:
    config = TrainConfig(steps=100, lr=1.0, warmup_steps=10, min_lr=0.1)
    assert lr_at(0, config) == pytest.approx(1 / 11)
    assert lr_at(10, config) == pytest.approx(1.0)
    assert lr_at(55, config) == pytest.approx(0.55)
    assert lr_at(100, config) == pytest.approx(0.1)


def _group_names(model: torch.nn.Module, weight_decay: float) -> dict[float, set[str]]:
    names = {id(p): n for n, p in model.named_parameters()}
    groups = parameter_groups(model, weight_decay)
    assert len({g["weight_decay"] for g in groups}) == len(groups)  # one group per decay value
    return {g["weight_decay"]: {names[id(p)] for p in g["params"]} for g in groups}


def test_weight_decay_spares_biases_norms_position_embeddings_and_tokens(shape: str) -> None:
    model = methods.apply(tiny_vit(shape), "full")
    groups = _group_names(model, 0.1)
    shapes = {n: p.ndim for n, p in model.named_parameters()}
    spared = {n for n, ndim in shapes.items() if ndim == 1} | {"pos_embed", "cls_token"}
    assert groups[0.0] == spared
    assert groups[0.1] == set(shapes) - spared
    assert "blocks.0.attn.qkv.weight" in groups[0.1] and "blocks.0.norm1.weight" in groups[0.0]


def test_weight_decay_groups_hold_only_trainable_parameters_and_decay_method_matrices() -> None:
    model = methods.apply(tiny_vit("vit"), "vpt")
    groups = _group_names(model, 0.1)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert groups[0.0] | groups[0.1] == trainable and not groups[0.0] & groups[0.1]
    assert groups[0.0] == {"head.bias"}
    assert groups[0.1] == {"head.weight"} | {n for n in trainable if n.endswith("prompts")}
    assert _group_names(model, 0.0) == {0.0: trainable}


def _train_module_without_resource(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """A fresh copy of core/train.py imported where ``import resource`` fails, as on Windows."""
    monkeypatch.setitem(sys.modules, "resource", None)  # None in sys.modules makes the import raise ImportError
    spec = importlib.util.spec_from_file_location("train_without_resource", train_module.__file__)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module


def _fake_psutil(**memory_info: int) -> SimpleNamespace:
    """A psutil stand-in whose ``Process().memory_info()`` has the given fields."""
    return SimpleNamespace(Process=lambda: SimpleNamespace(memory_info=lambda: SimpleNamespace(**memory_info)))


def test_peak_memory_without_resource_falls_back_to_psutil_then_none(monkeypatch: pytest.MonkeyPatch) -> None:
    module = _train_module_without_resource(monkeypatch)
    assert module.resource is None
    cpu = torch.device("cpu")
    monkeypatch.setitem(sys.modules, "psutil", _fake_psutil(rss=1_000, peak_wset=123_456_789))  # as on Windows
    assert module.peak_memory_bytes(cpu) == 123_456_789
    monkeypatch.setitem(sys.modules, "psutil", _fake_psutil(rss=1_000))  # psutil reports no peak elsewhere
    assert module.peak_memory_bytes(cpu) is None
    monkeypatch.setitem(sys.modules, "psutil", None)  # not installed
    assert module.peak_memory_bytes(cpu) is None
    assert train_module.peak_memory_bytes(cpu) > 0  # this machine's own route still works


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [("steps", 0, "steps=0"), ("lr", -1.0, "lr=-1.0"), ("warmup_steps", 300, "warmup_steps=300")],
)
def test_train_config_refuses_bad_values(field, value, message) -> None:
    with pytest.raises(ValueError, match=message):
        TrainConfig(**{field: value})


def tiny_train_args(home: str, weights: Path, n_train: int) -> list[str]:
    """CLI arguments for a two-step run of the tiny ViT on a few digits at 32 px."""
    backbone = ["--backbone", TINY_BACKBONE.name, "--weights", str(weights), "--img-size", str(TINY_BACKBONE.img_size)]
    sizes = ["--n-train", str(n_train), "--n-val", "16", "--n-test", "16"]
    schedule = ["--steps", "2", "--eval-every", "2", "--warmup-steps", "0"]
    where = ["--data-root", str(weights.parent)]  # a weights file must lie in the data root
    return ["--home", home, "train", "--quiet", "--dataset", "digits", *backbone, *where, *sizes, *schedule]


def test_cli_train_runs_and_params(tiny_weights: Path, tmp_path: Path, capsys) -> None:
    home = str(tmp_path / "home")
    args = [*tiny_train_args(home, tiny_weights, n_train=48), "--batch-size", "16", "fact", "--variant", "tk"]
    assert cli([*args, "--rank", "4"]) == 0
    out = capsys.readouterr().out
    # FacT-TK: U and V (width x rank), one rank-vector per width-sized slice of each block (q, k, v, o and 2 x MLP
    # ratio), a rank^3 core: 2*64*4 + 6*(4 + 2*3)*4 + 4^3 on test_vit (width 64, depth 6, MLP ratio 3).
    assert "completed" in out and "trainable parameters 816" in out
    assert cli(["--home", home, "runs", "list"]) == 0
    assert "fact" in capsys.readouterr().out
    assert cli(["--home", home, "runs", "export", str(tmp_path / "runs.csv")]) == 0
    assert (tmp_path / "runs.csv").read_text().count("\n") == 2
    assert cli(["params", "--method", "fact:variant=tt,rank=4"]) == 0
    assert "8,448" in capsys.readouterr().out
    assert cli([*args, "--rank", "0"]) == 2
    assert "FacT rank=0 is out of range" in capsys.readouterr().err
    assert cli(["--home", home, "runs", "show", "nope"]) == 2


def test_cli_spectra_and_pareto_on_recorded_runs(tiny_weights: Path, tmp_path: Path, capsys) -> None:
    home = str(tmp_path / "home")
    common = tiny_train_args(home, tiny_weights, n_train=32)
    for method in (["lora", "--rank", "2", "--targets", "v:0"], ["full"], ["vpt"]):
        assert cli(common + method) == 0
    store = RunStore(home)
    ids = dict(zip(store.list_runs()["method"], store.list_runs()["id"], strict=True))
    capsys.readouterr()
    assert cli(["--home", home, "spectra", ids["lora"], "--out", str(tmp_path / "sp")]) == 0
    out = capsys.readouterr().out
    assert "blocks.0.attn.qkv.v" in out and "blocks.1" not in out  # only the adapted slice
    import pandas as pd

    summary = pd.read_csv(tmp_path / "sp" / "summary.csv")
    assert summary["update_stable_rank"].iloc[0] <= 2 + 1e-6  # a rank-2 LoRA update
    assert cli(["--home", home, "spectra", ids["full"]]) == 0
    assert capsys.readouterr().out.count("attn.qkv.") == 3 * TINY_DEPTH  # full fine-tuning: tuned minus pretrained
    assert cli(["--home", home, "spectra", ids["vpt"]]) == 0
    assert "no weight update" in capsys.readouterr().out
    assert cli(["--home", home, "pareto", "--out", str(tmp_path / "p")]) == 0
    points = pd.read_csv(tmp_path / "p" / "points.csv")
    assert set(points["kind"]) == {"run", "reference"} and (points["kind"] == "run").sum() == 3
    assert points.loc[points["kind"] == "run", "front"].any()
