"""One fine-tuning run from specs to stored result: the path the CLI and the app share.

``run_experiment(Experiment(...), store)`` loads the data, builds the backbone at the data's size and class count,
applies the method, trains, saves the adapter beside the run and records everything in the run store. `validate`
checks the options once, on a weightless model, before anything heavy happens (the CLI and the app call it, then pass
the `CheckedExperiment` on); a failure after the run was recorded marks it ``failed`` with the error. `count_params`
is the one weightless parameter count the CLI, the app and the run check share.
"""

from __future__ import annotations

import copy
import dataclasses
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from timm.models import get_pretrained_cfg

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


# The default demo of the CLI and the app (bench/bench_default_train.py measures its time).
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


@dataclass(frozen=True)
class ParamCount:
    """What a method trains on a backbone, counted on a weightless (meta-device) copy.

    Attributes:
        without_head: trainable parameters of the backbone and the method (FacT's convention).
        with_head: the same plus the classifier head (RLRR's convention).
        width: the backbone's token width d (the head adds C x (d + 1) for C classes).
        options: the method's options with every default filled in, as recorded with a run.
    """

    without_head: int
    with_head: int
    width: int
    options: dict[str, Any]


def count_params(backbone: BackboneSpec, method: str, options: Mapping[str, Any] | None = None) -> ParamCount:
    """Apply ``method`` to a weightless copy of ``backbone`` (its weights are never read) and count what trains.

    This is also the check of a method's options against a backbone's shape: no memory, no initialisation cost.

    Raises:
        ValueError: a bad backbone name or size, an unknown method, or a bad option (the message says which).
    """
    model = skeleton(backbone)
    with torch.device("meta"):
        methods.apply(model, method, **(options or {}))
    state = methods.adapter_state(model)
    return ParamCount(
        without_head=methods.count_trainable(model, include_head=False),
        with_head=methods.count_trainable(model, include_head=True),
        width=state.arch.embed_dim,
        options=state.config.to_dict(),
    )


def native_img_size(name: str) -> int:
    """The input side of timm's pretrained config for model ``name`` (224 for ``vit_base_patch16_224``, 518 for
    ``vit_small_patch14_dinov2``); 224 for a name timm has no config for."""
    try:
        config = get_pretrained_cfg(name)
    except RuntimeError:  # an unknown pretrained tag: `skeleton` names the tags timm knows
        config = None
    return int(config.input_size[-1]) if config is not None else 224


@dataclass(frozen=True)
class CheckedExperiment:
    """An experiment whose method and options passed `validate`; `run_experiment` runs it without checking again.

    Attributes:
        experiment: the experiment with its options resolved (every default filled in).
        params: the trainable counts on a weightless copy of its backbone; ``with_head`` there is for a two-class
            head, since the class count is known only once the data is loaded.
    """

    experiment: Experiment
    params: ParamCount


def validate(experiment: Experiment) -> CheckedExperiment:
    """Check the method and its options against the backbone's shape on a weightless model, so a bad option fails
    before anything is loaded or recorded.

    Raises:
        ValueError: a bad backbone name or size, an unknown method, or a bad option.
    """
    params = count_params(experiment.backbone_spec(num_classes=2), experiment.method, experiment.options)
    return CheckedExperiment(dataclasses.replace(experiment, options=params.options), params)


def check_options(experiment: Experiment) -> dict[str, Any]:
    """The experiment's options with defaults filled in, once `validate` accepts them (raises ValueError if not)."""
    return validate(experiment).experiment.options


def run_experiment(
    experiment: Experiment | CheckedExperiment,
    store: RunStore,
    callbacks: Sequence[Callback] = (),
    cancel: CancelToken | None = None,
    data_root: Path | None = None,
) -> str:
    """Run one fine-tune and record it; returns the run id (also for cancelled and diverged runs).

    A plain `Experiment` is validated first; a `CheckedExperiment` (from `validate`) is not checked again.

    Raises:
        ValueError: a bad method or option (before anything is recorded). Errors after the run was recorded are
            re-raised after the run is marked ``failed`` with the message.
    """
    checked = experiment if isinstance(experiment, CheckedExperiment) else validate(experiment)
    experiment = checked.experiment
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
        store.update_run(
            run_id,
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
        for index, (pretrained_block, tuned_block) in enumerate(zip(pretrained.blocks, tuned.blocks, strict=True)):
            for path in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"):
                w0, w1 = pretrained_block.get_submodule(path).weight, tuned_block.get_submodule(path).weight
                updates.update(methods.matrix_entries(f"blocks.{index}.{path}", w0, w1 - w0))
    return updates
