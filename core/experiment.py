"""One fine-tuning run from specs to stored result: the path the CLI and the app share.

``run_experiment(Experiment(...), store)`` loads the data, builds the backbone at the data's size and class count,
applies the method, trains, saves the adapter beside the run and records everything in the run store. Options are
validated before anything heavy happens; a failure after the run was recorded marks it ``failed`` with the error.
"""

from __future__ import annotations

import copy
import dataclasses
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from core import methods
from core.backbone import BackboneSpec, build_backbone, skeleton
from core.data import DataSpec, load_data
from core.runs import RunStore
from core.train import Callback, CancelToken, StepInfo, TrainConfig, TrainResult, train


@dataclass(frozen=True)
class Experiment:
    """Everything that decides a run. The backbone is built at ``data.img_size`` with the data's class count."""

    data: DataSpec = field(default_factory=DataSpec)
    backbone: BackboneSpec = field(default_factory=BackboneSpec)
    method: str = "fact"
    options: dict[str, Any] = field(default_factory=dict)
    train: TrainConfig = field(default_factory=TrainConfig)
    label: str | None = None

    def backbone_spec(self, num_classes: int) -> BackboneSpec:
        """The backbone as built for this run: at the data's image size, with ``num_classes`` outputs."""
        return dataclasses.replace(self.backbone, img_size=self.data.img_size, num_classes=num_classes)


# The default demo of the CLI and the app: a few minutes on 2 CPU cores (bench/bench_default_train.py measures it).
DEMO = Experiment(
    data=DataSpec(name="mnist5k", img_size=112, n_train=2000, n_val=200, n_test=1000),
    method="fact",
    options={"variant": "tt", "rank": 8, "scale": 1.0},
    train=TrainConfig(steps=150, batch_size=16, lr=5e-3, warmup_steps=10, eval_every=75),
)


class StoreLogger(Callback):
    """Writes the metric history to the run store in small batches and keeps the heartbeat fresh."""

    def __init__(self, store: RunStore, run_id: str, every: int = 10) -> None:
        self.store, self.run_id, self.every = store, run_id, every
        self.rows: list[dict[str, Any]] = []

    def on_step(self, info: StepInfo) -> None:
        for name in ("loss", "lr", "images_per_s"):
            self.rows.append({"step": info.step, "split": "train", "name": name, "value": getattr(info, name)})
        if info.step % self.every == 0:
            self.flush()
            self.store.update_run(self.run_id, steps=info.step)

    def on_eval(self, step: int, split: str, metrics: dict[str, float]) -> None:
        self.rows += [{"step": step, "split": split, "name": k, "value": v} for k, v in metrics.items()]
        self.flush()

    def on_end(self, result: TrainResult) -> None:
        self.flush()

    def flush(self) -> None:
        if self.rows:
            self.store.log_metrics(self.run_id, self.rows)
            self.rows = []


def check_options(experiment: Experiment) -> dict[str, Any]:
    """Validate the method and its options against the backbone's shape, cheaply (a weightless meta-device
    model), so a bad option fails before anything is recorded or loaded. Returns the options with defaults."""
    model = skeleton(experiment.backbone_spec(num_classes=2))
    with torch.device("meta"):
        methods.apply(model, experiment.method, **experiment.options)
    return methods.adapter_state(model).config.to_dict()


def run_experiment(
    experiment: Experiment,
    store: RunStore,
    callbacks: Sequence[Callback] = (),
    cancel: CancelToken | None = None,
    data_root: Path | None = None,
) -> str:
    """Run one fine-tune and record it; returns the run id (also for cancelled and diverged runs).

    Raises:
        ValueError: a bad method or option (before anything is recorded). Errors after the run was recorded are
            re-raised after the run is marked ``failed`` with the message.
    """
    check_options(experiment)
    record = {
        "label": experiment.label,
        "method": experiment.method,
        "method_options": experiment.options,
        "backbone": dataclasses.asdict(experiment.backbone),
        "dataset": experiment.data.to_dict(),
        "normalization": experiment.data.normalization,
        "seed": experiment.train.seed,
        "train_config": experiment.train.to_dict(),
    }
    run_id = store.create_run(record)
    try:
        bundle = load_data(experiment.data, data_root)
        model, info = build_backbone(experiment.backbone_spec(bundle.num_classes))
        methods.apply(model, experiment.method, **experiment.options)
        state = methods.adapter_state(model)
        store.update_run(
            run_id,
            method_options=state.config.to_dict(),  # with defaults filled in and resolved (e.g. KAdaptation's n)
            weights=info.to_dict(),
            trainable_params=methods.count_trainable(model, include_head=False),
            trainable_params_with_head=methods.count_trainable(model, include_head=True),
        )
        result = train(model, bundle, experiment.train, [StoreLogger(store, run_id), *callbacks], cancel)
        if result.status == "completed":
            methods.save_adapter(model.cpu(), store.adapter_path(run_id))
    except BaseException as exc:
        message = f"{type(exc).__name__}: {exc}"
        if not isinstance(exc, ValueError | KeyboardInterrupt):
            message += "\n" + traceback.format_exc(limit=5)
        status = "cancelled" if isinstance(exc, KeyboardInterrupt) else "failed"
        store.finish_run(run_id, status, message)
        raise
    store.finish_run(
        run_id,
        result.status,
        result.message,
        best_val_acc=result.best_val_acc,
        test_acc=result.test_acc,
        steps=result.steps,
        wall_time_s=result.wall_s,
        steps_per_s=result.steps_per_s,
        peak_memory_bytes=result.peak_memory_bytes,
        device=result.device,
    )
    return run_id


def load_run_model(store: RunStore, run_id: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The (tuned, pretrained) models of a completed run: the recorded backbone rebuilt, its adapter loaded.

    Raises:
        ValueError: the run has no adapter file (it did not complete) or its backbone cannot be rebuilt here.
    """
    run = store.get_run(run_id)
    path = store.adapter_path(run["id"])
    if not path.exists():
        raise ValueError(f"run {run['id']} ({run['status']}) has no adapter file: only completed runs can be analysed")
    meta = methods.read_adapter_metadata(path)
    spec = BackboneSpec(
        **{**run["backbone"], "num_classes": meta["arch"]["num_classes"], "img_size": run["dataset"]["img_size"]}
    )
    pretrained, _ = build_backbone(spec)
    tuned = methods.load_adapter(copy.deepcopy(pretrained), path)
    return tuned.eval(), pretrained.eval()


def run_weight_updates(store: RunStore, run_id: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(W0, dW) of every adapted matrix of a run, from the method's delta_weight; for full fine-tuning, from the
    tuned minus the pretrained weights (q, k, v split). Empty for methods without a weight update."""
    tuned, pretrained = load_run_model(store, run_id)
    state = methods.adapter_state(tuned)
    if state.method != "full":
        return methods.weight_updates(tuned)
    updates: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    with torch.no_grad():
        for b, (block0, block1) in enumerate(zip(pretrained.blocks, tuned.blocks, strict=True)):
            for path in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"):
                w0, w1 = block0.get_submodule(path).weight, block1.get_submodule(path).weight
                updates.update(methods.matrix_entries(f"blocks.{b}.{path}", w0, w1 - w0))
    return updates
