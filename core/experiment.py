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
import tempfile
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from timm.models import get_pretrained_cfg

from core import methods
from core.backbone import BackboneSpec, build_backbone, skeleton, weights_file
from core.data import DataSpec, check_data, load_data
from core.intrinsic_dim import (
    IntrinsicDimConfig,
    IntrinsicDimResult,
    Trial,
    measure_intrinsic_dimension,
    representation_dimension,
    resolve_groups,
)
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


class CancelWatch(Callback):
    """Stops the training when someone asks the store to cancel the run (`RunStore.request_cancel`): from the
    command line, another browser session or the job engine. Looks at most every ``every_s`` seconds."""

    def __init__(self, store: RunStore, run_id: str, token: CancelToken, every_s: float = 1.0) -> None:
        self.store, self.run_id, self.token, self.every_s = store, run_id, token, every_s
        self.last = 0.0

    def on_step(self, info: StepInfo) -> None:
        self.check()

    def check(self) -> bool:
        """Whether the run is to stop (asking the store at most every ``every_s`` seconds)."""
        now = time.monotonic()
        if not self.token.cancelled and now - self.last >= self.every_s:
            self.last = now
            if self.store.cancel_requested(self.run_id):
                self.token.cancel()
        return self.token.cancelled


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


def check_inputs(data: DataSpec, backbone: BackboneSpec, data_root: Path | str | None = None) -> None:
    """Check where a run's images and weights file are, without reading them, so that a missing folder or a path
    outside the allowed folders fails before a run is recorded (`core.data.check_data`,
    `core.backbone.weights_file`). The job's worker reads them on its node, which is this one unless the job
    runs on another node of a cluster: data and weights files must then be at the same paths on both.

    Raises:
        ValueError: a data folder or weights file outside the data root (weights: or the PETLab cache), missing, or
            a VTAB folder without its lists.
    """
    check_data(data, data_root)
    if backbone.source == "file":
        weights_file(backbone.weights, data_root)


def validate(experiment: Experiment, data_root: Path | str | None = None) -> CheckedExperiment:
    """Check the method and its options against the backbone's shape on a weightless model, and where the data and
    a weights file are (`check_inputs`), so a bad option or path fails before anything is loaded or recorded.

    Raises:
        ValueError: a bad backbone name or size, an unknown method, a bad option, or a bad data or weights path.
    """
    params = count_params(experiment.backbone_spec(num_classes=2), experiment.method, experiment.options)
    check_inputs(experiment.data, experiment.backbone, data_root)
    return CheckedExperiment(dataclasses.replace(experiment, options=params.options), params)


def check_options(experiment: Experiment) -> dict[str, Any]:
    """The experiment's options with defaults filled in, once `validate` accepts them (raises ValueError if not)."""
    return validate(experiment).experiment.options


def experiment_record(experiment: Experiment) -> dict[str, Any]:
    """What the run store records of a (validated) fine-tune before it starts."""
    return {
        "kind": "finetune",
        "label": experiment.label,
        "method": experiment.method,
        "method_options": experiment.options,
        "backbone": dataclasses.asdict(experiment.backbone),
        "dataset": experiment.data.to_dict(),
        "normalization": experiment.data.normalization,
        "seed": experiment.train.seed,
        "train_config": experiment.train.to_dict(),
    }


def run_experiment(
    experiment: Experiment | CheckedExperiment,
    store: RunStore,
    callbacks: Sequence[Callback] = (),
    cancel: CancelToken | None = None,
    data_root: Path | None = None,
    run_id: str | None = None,
) -> str:
    """Run one fine-tune and record it; returns the run id (also for cancelled and diverged runs).

    A plain `Experiment` is validated first; a `CheckedExperiment` (from `validate`) is not checked again.
    ``store`` is a `RunStore`, or a worker's proxy of one (`core.jobs.RemoteStore`): everything goes through its
    methods, the adapter too (as bytes), so the worker needs no access to the store's disk. With ``run_id`` the
    run was recorded beforehand (queued, by the job engine) and started by the caller; a cancel asked of it in the
    store stops the training before its next step.

    Raises:
        ValueError: a bad method, option, data or weights path (before anything is recorded). Errors after the run
            was recorded are re-raised after the run is marked ``failed`` with the message.
    """
    checked = experiment if isinstance(experiment, CheckedExperiment) else validate(experiment, data_root)
    experiment = checked.experiment
    if run_id is None:
        run_id = store.create_run(experiment_record(experiment))
    cancel = cancel or CancelToken()
    try:
        bundle = load_data(experiment.data, data_root)
        store.update_run(run_id, skipped_files=bundle.skipped_report())
        torch.manual_seed(experiment.train.seed)  # the new head and the method's factors: the same in every process
        model, info = build_backbone(experiment.backbone_spec(bundle.num_classes), data_root)
        methods.apply(model, experiment.method, **experiment.options)
        store.update_run(
            run_id,
            weights=info.to_dict(),
            trainable_params=methods.count_trainable(model, include_head=False),
            trainable_params_with_head=methods.count_trainable(model, include_head=True),
        )
        loggers = [StoreLogger(store, run_id), CancelWatch(store, run_id, cancel)]
        result = train(model, bundle, experiment.train, [*loggers, *callbacks], cancel)
        if result.status == "completed":
            with tempfile.TemporaryDirectory() as folder:
                path = methods.save_adapter(model.cpu(), Path(folder) / "adapter.safetensors")
                store.write_adapter(run_id, Path(path).read_bytes())
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
    # A weights file was checked to lie in the data root when the run was submitted (that root may have been
    # widened with --data-root): the recorded run is trusted to read it again.
    weights = Path(str(spec.weights)).expanduser()
    pretrained, _ = build_backbone(spec, weights.parent if weights.is_file() else None)
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


# ----------------------------------------------------------------------------------------------------------------
# Intrinsic-dimension measurements, recorded in the run store as their own kind of record
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class IntrinsicDimRequest:
    """What to measure: the data, the backbone (built at the data's size and class count), the parameter groups
    (a scheme name or targets strings) and the measurement settings; optionally the representation-dimension proxy."""

    data: DataSpec = field(default_factory=lambda: DataSpec(name="digits", img_size=56, n_train=500, n_val=200))
    backbone: BackboneSpec = field(default_factory=BackboneSpec)
    groups: str | tuple[str, ...] = "attn-mlp"
    config: IntrinsicDimConfig = field(default_factory=IntrinsicDimConfig)
    representation: bool = False
    label: str | None = None

    def group_list(self) -> str | list[str]:
        return self.groups if isinstance(self.groups, str) else list(self.groups)


def measurement_record(request: IntrinsicDimRequest, data_root: Path | str | None = None) -> dict[str, Any]:
    """What the run store records of a measurement before it starts; checks the backbone, the groups and where the
    data and a weights file are (`check_inputs`) first.

    Raises:
        ValueError: a bad backbone, size, group, or data or weights path (nothing is recorded).
    """
    spec = dataclasses.replace(request.backbone, img_size=request.data.img_size)
    resolve_groups(request.group_list(), len(skeleton(spec).blocks))
    check_inputs(request.data, request.backbone, data_root)
    return {
        "kind": "intrinsic_dim",
        "label": request.label,
        "method": None,
        "method_options": {"groups": request.group_list(), "representation": request.representation},
        "backbone": dataclasses.asdict(request.backbone),
        "dataset": request.data.to_dict(),
        "normalization": request.data.normalization,
        "seed": request.config.seed,
        "train_config": dataclasses.asdict(request.config),
    }


def measurement_result(
    result: IntrinsicDimResult, representation: pd.DataFrame | None, backbone: str
) -> dict[str, Any]:
    """A finished measurement as the JSON the run store keeps (``result`` column); pages rebuild frames from it."""
    return {
        "backbone": backbone,
        "curves": result.curves.to_dict("records"),
        "groups": result.table().to_dict("records"),
        "head_only_accuracy": result.head_only_accuracy,
        "majority_rate": result.majority_rate,
        "recommended": result.recommended,
        "explanation": result.explanation,
        "notes": list(result.notes),
        "cancelled": result.cancelled,
        "depth": result.depth,
        "representation": None if representation is None else representation.to_dict("records"),
    }


def run_intrinsic_dim(
    request: IntrinsicDimRequest,
    store: RunStore,
    cancel: CancelToken | None = None,
    data_root: Path | None = None,
    run_id: str | None = None,
    on_trial: Callable[[dict[str, Any]], None] | None = None,
) -> str:
    """Measure d90 per group and record the measurement (``kind = intrinsic_dim``); returns its run id.

    Every trial is added to the record's ``result.trials`` as it finishes, so a page shows the curves live and a
    reload finds them. A cancel asked of it in the store stops it before the next training step of a trial; the
    groups it did not measure say so. ``store``, ``run_id`` and cancelling work as in `run_experiment`.

    Raises:
        ValueError: a bad backbone, group, or data or weights path (before anything is recorded).
    """
    if run_id is None:
        run_id = store.create_run(measurement_record(request, data_root))
    cancel = cancel or CancelToken()
    watch = CancelWatch(store, run_id, cancel)
    trials: list[dict[str, Any]] = []
    try:
        data = load_data(request.data, data_root)
        store.update_run(run_id, skipped_files=data.skipped_report())
        spec = dataclasses.replace(request.backbone, img_size=request.data.img_size, num_classes=data.num_classes)
        model, info = build_backbone(spec, data_root)
        model.to("cuda" if torch.cuda.is_available() else "cpu")
        store.update_run(run_id, weights=info.to_dict(), result={"trials": trials, "phase": "measuring"})

        def trial_done(trial: Trial) -> None:
            trials.append(dataclasses.asdict(trial))
            store.update_run(run_id, steps=len(trials), result={"trials": trials, "phase": "measuring"})
            if on_trial is not None:
                on_trial(trials[-1])

        started = time.perf_counter()
        result = measure_intrinsic_dimension(
            model,
            data.train,
            data.val,
            request.group_list(),
            request.config,
            on_trial=trial_done,
            should_stop=watch.check,
        )
        representation = None
        if request.representation and not result.cancelled:
            representation = representation_dimension(model, data.val, max_images=128, max_points=1000)
        summary = measurement_result(result, representation, info.description)
    except BaseException as exc:
        status = "cancelled" if isinstance(exc, KeyboardInterrupt) else "failed"
        store.finish_run(run_id, status, f"{type(exc).__name__}: {exc}", result={"trials": trials})
        raise
    status = "cancelled" if result.cancelled else "completed"
    message = f"recommended targets: {result.recommended}" if result.recommended else "no group reached its target"
    if result.cancelled:
        message = f"cancelled after {len(trials)} trials; the groups it did not measure say so"
    store.finish_run(
        run_id,
        status,
        message,
        result={"trials": trials, **summary},
        steps=len(trials),
        wall_time_s=time.perf_counter() - started,
        device=str(next(model.parameters()).device),
    )
    return run_id
