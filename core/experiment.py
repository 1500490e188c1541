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
from collections.abc import Callable, Iterator, Mapping, Sequence
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


# The default demo of the CLI and the app: under 2 minutes on 2 cores through the embedded Ray, its test accuracy
# above the converged linear probe's (bench/bench_default_train.py measures both).
DEMO = Experiment(
    data=DataSpec(name="mnist5k", img_size=112, n_train=2000, n_val=200, n_test=1000),
    method="fact",
    options={"variant": "tt", "rank": 8, "scale": 1.0},
    train=TrainConfig(steps=120, batch_size=16, lr=5e-3, warmup_steps=10, eval_every=60),
)


# The classroom demo: a finished run with a test accuracy far above chance (10%) in about a minute on a 2-core
# laptop: sklearn's 8 x 8 digits at 28 px (4 patches of the offline DINOv2-S), few steps. `classroom` gives it for
# any method; the learning rate follows how far each kind of method moves the weights.
CLASSROOM = Experiment(
    data=DataSpec(name="digits", img_size=28, n_train=1000, n_val=180, n_test=360),
    method="fact",
    options={"variant": "tt", "rank": 8, "scale": 1.0},
    train=TrainConfig(steps=60, batch_size=32, lr=5e-3, warmup_steps=5, eval_every=15),
    label="classroom demo",
)
CLASSROOM_OPTIONS: dict[str, dict[str, Any]] = {
    "fact": {"variant": "tt", "rank": 8, "scale": 1.0},
    "lora": {"rank": 8},
}
CLASSROOM_LR = {"full": 5e-5, "rlrr": 1e-3, "ssf": 1e-3, "bitfit": 1e-3}

PRESETS: dict[str, Experiment] = {"classroom": CLASSROOM, "demo": DEMO}
"""Named starting points of the app and the command line: ``classroom`` (about a minute on a 2-core laptop) and
``demo`` (the default run of ``python -m core train``, a few minutes)."""


def classroom(method: str) -> Experiment:
    """The classroom demo for ``method`` (registered): `CLASSROOM` with that method and its classroom options.

    Raises:
        ValueError: an unknown method.
    """
    methods.get_method(method)
    train = dataclasses.replace(CLASSROOM.train, lr=CLASSROOM_LR.get(method, CLASSROOM.train.lr))
    label = f"classroom demo: {method}"
    return dataclasses.replace(
        CLASSROOM, method=method, options=dict(CLASSROOM_OPTIONS.get(method, {})), train=train, label=label
    )


class StoreLogger(Callback):
    """Writes the metric history and the step reached to the run store in small batches, one write each, and keeps
    the heartbeat fresh: every ``every`` steps, and also whenever ``every_s`` seconds have passed, so the first
    steps show at once. (On a job's worker each write is a message to the job manager; fewer of them leave the
    CPUs to the training.)"""

    def __init__(self, store: RunStore, run_id: str, every: int = 10, every_s: float = 2.0) -> None:
        self.store, self.run_id, self.every, self.every_s = store, run_id, every, every_s
        self.rows: list[dict[str, Any]] = []
        self.last = 0.0

    def on_step(self, info: StepInfo) -> None:
        now = time.time()
        for name in ("loss", "lr", "images_per_s"):
            row = {"step": info.step, "split": "train", "name": name, "value": getattr(info, name), "time": now}
            self.rows.append(row)
        if info.step % self.every == 0 or now - self.last >= self.every_s:
            self.last = now
            self.flush(steps=info.step)

    def on_eval(self, step: int, split: str, metrics: dict[str, float]) -> None:
        self.rows += [{"step": step, "split": split, "name": k, "value": v} for k, v in metrics.items()]
        self.flush()

    def on_end(self, result: TrainResult) -> None:
        self.flush()

    def flush(self, steps: int | None = None) -> None:
        if self.rows:
            self.store.log_metrics(self.run_id, self.rows, steps=steps)
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


SNAPSHOT_MAX_BYTES = 8 * 2**20
"""Snapshots are kept only for adapters up to this size (FacT's are kilobytes; never full fine-tuning's)."""


def adapter_bytes(model: torch.nn.Module) -> bytes:
    """The model's adapter file (`methods.save_adapter`: trainable tensors only) as bytes, for the store."""
    with tempfile.TemporaryDirectory() as folder:
        return Path(methods.save_adapter(model, Path(folder) / "adapter.safetensors")).read_bytes()


class SnapshotWriter(Callback):
    """Keeps the adapter before training (step 0) and at every validation point, through the store
    (`RunStore.write_snapshot`), so the spectra can be followed over training."""

    def __init__(self, store: RunStore, run_id: str, model: torch.nn.Module) -> None:
        self.store, self.run_id, self.model = store, run_id, model

    @staticmethod
    def wanted(model: torch.nn.Module) -> bool:
        """Whether snapshots of this model say something and are small: a weight update, a small adapter."""
        trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
        return trainable <= SNAPSHOT_MAX_BYTES and bool(methods.weight_updates(model))

    def on_start(self, total_steps: int, device: str) -> None:
        self.store.write_snapshot(self.run_id, 0, adapter_bytes(self.model))

    def on_eval(self, step: int, split: str, metrics: dict[str, float]) -> None:
        if split == "val":
            self.store.write_snapshot(self.run_id, step, adapter_bytes(self.model))


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


def import_on_use() -> None:
    """Import what a fine-tune or a measurement imports only when it first needs it (scikit-learn, for the data
    splits: about a second), so that a job's worker can do it before its job arrives (`core.jobs`)."""
    import sklearn.model_selection  # noqa: F401 - `core.data.splits` imports it on use


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
        loggers: list[Callback] = [StoreLogger(store, run_id), CancelWatch(store, run_id, cancel)]
        if SnapshotWriter.wanted(model):
            loggers.append(SnapshotWriter(store, run_id, model))
        result = train(model, bundle, experiment.train, [*loggers, *callbacks], cancel)
        if result.status == "completed":
            store.write_adapter(run_id, adapter_bytes(model.cpu()))
    except BaseException as exc:
        store.finish_run(run_id, *failure(exc, with_traceback=True))
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


def failure(exc: BaseException, with_traceback: bool = False) -> tuple[str, str]:
    """(status, message) of a run that raised: ``cancelled`` for an interrupt, else ``failed``. The message's first
    line is for people (a ValueError's text says what to change); an unexpected error adds its type and, with
    ``with_traceback``, where it happened, on the lines below."""
    if isinstance(exc, KeyboardInterrupt):
        return "cancelled", "cancelled: the process was interrupted"
    first = str(exc).strip() or "the run stopped with an error"
    if isinstance(exc, ValueError):
        return "failed", first
    details = f"\n{type(exc).__name__}" + (f"\n{traceback.format_exc(limit=5)}" if with_traceback else "")
    return "failed", first + details


def load_run_model(store: RunStore, run_id: str, step: int | None = None) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The (tuned, pretrained) models of a completed run: the recorded backbone rebuilt, its adapter loaded (or its
    snapshot after ``step`` training steps, `RunStore.snapshot_paths`).

    Raises:
        ValueError: the run has no adapter file (it did not complete), no snapshot at ``step``, or its backbone
            cannot be rebuilt here.
    """
    run = store.get_run(run_id)
    pretrained = _pretrained(store, run)
    tuned = methods.load_adapter(copy.deepcopy(pretrained), _adapter_file(store, run, step))
    return tuned.eval(), pretrained


def _adapter_file(store: RunStore, run: dict[str, Any], step: int | None) -> Path:
    if step is not None:
        snapshots = store.snapshot_paths(run["id"])
        if step not in snapshots:
            raise ValueError(f"run {run['id']} kept no snapshot at step {step}; it has {list(snapshots) or 'none'}")
        return snapshots[step]
    path = store.adapter_path(run["id"])
    if not path.exists():
        raise ValueError(f"run {run['id']} ({run['status']}) has no adapter file: only completed runs can be analysed")
    return path


def _pretrained(store: RunStore, run: dict[str, Any]) -> torch.nn.Module:
    """The run's backbone rebuilt with its pretrained weights and its head's class count, in eval mode."""
    meta = methods.read_adapter_metadata(_adapter_file(store, run, None))
    spec = BackboneSpec(
        **{**run["backbone"], "num_classes": meta["arch"]["num_classes"], "img_size": run["dataset"]["img_size"]}
    )
    # A weights file was checked to lie in the data root when the run was submitted (that root may have been
    # widened with --data-root): the recorded run is trusted to read it again.
    weights = Path(str(spec.weights)).expanduser()
    return build_backbone(spec, weights.parent if weights.is_file() else None)[0].eval()


def run_weight_updates(
    store: RunStore, run_id: str, step: int | None = None
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(W0, dW) of every adapted matrix of a run (or of its snapshot after ``step`` steps), from the method's
    delta_weight; for full fine-tuning, from the tuned minus the pretrained weights (q, k, v split). Empty for
    methods without a weight update."""
    return _weight_updates(*load_run_model(store, run_id, step))


def snapshot_weight_updates(
    store: RunStore, run_id: str
) -> Iterator[tuple[int, dict[str, tuple[torch.Tensor, torch.Tensor]]]]:
    """(step, (W0, dW) of every adapted matrix) of each snapshot of a completed run, in step order; the backbone
    is rebuilt once. A generator: analyse each step before the next is loaded (the updates are weight-sized)."""
    run = store.get_run(run_id)
    pretrained = _pretrained(store, run)
    for step, path in store.snapshot_paths(run["id"]).items():
        yield step, _weight_updates(methods.load_adapter(copy.deepcopy(pretrained), path).eval(), pretrained)


def _weight_updates(
    tuned: torch.nn.Module, pretrained: torch.nn.Module
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
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


MEASUREMENT_PRESETS: dict[str, IntrinsicDimRequest] = {
    "quick": IntrinsicDimRequest(
        data=DataSpec(name="digits", img_size=28, n_train=300, n_val=100),
        groups="attn-mlp",
        config=IntrinsicDimConfig(steps=30, batch_size=32, d_min=8, d_max=256, max_trials=4),
        label="quick measurement",
    ),
    "standard": IntrinsicDimRequest(label="standard measurement"),
    "thorough": IntrinsicDimRequest(
        data=DataSpec(name="digits", img_size=56, n_train=1000, n_val=300),
        groups="matrices",
        config=IntrinsicDimConfig(steps=200),
        label="thorough measurement",
    ),
}
"""Named measurements, from a look at how d90 works (quick) to a per-matrix comparison (thorough)."""

STEP_SECONDS_PER_IMAGE_TOKEN = 0.0022
"""The CPU time of one training step per image and token of a ViT-S (width 384, 12 blocks), measured with one
thread on subspace trials at 28 px (the offline default, batch 32): the unit of `estimate_seconds`."""


def planned_trials(request: IntrinsicDimRequest, depth: int) -> int:
    """The most trials a measurement runs: per group its full-training baseline and ``max_trials`` subspace trials
    (the search often stops earlier); the head-alone trial first is not counted."""
    return len(resolve_groups(request.group_list(), depth)) * (1 + request.config.max_trials)


def estimate_seconds(request: IntrinsicDimRequest, threads: int = 2) -> tuple[int, float]:
    """(planned trials, the most seconds they take on ``threads`` CPU cores): every trial's steps at
    `STEP_SECONDS_PER_IMAGE_TOKEN`, scaled by the backbone's width and depth. An upper bound before it starts;
    the measured pace replaces it once trials finish.

    Raises:
        ValueError: a bad backbone, size or group.
    """
    spec = dataclasses.replace(request.backbone, img_size=request.data.img_size)
    model = skeleton(spec)
    arch = methods.inspect_vit(model)
    tokens = (request.data.img_size // arch.patch_size) ** 2 + arch.num_prefix_tokens
    size = (arch.embed_dim / 384) ** 2 * arch.depth / 12
    per_step = STEP_SECONDS_PER_IMAGE_TOKEN * request.config.batch_size * tokens * size / max(threads, 1)
    trials = planned_trials(request, arch.depth)
    return trials, (trials + 1) * request.config.steps * per_step


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
        progress = {"phase": "measuring", "started": time.time(), "planned": planned_trials(request, len(model.blocks))}
        store.update_run(run_id, weights=info.to_dict(), result={"trials": trials, **progress})

        def trial_done(trial: Trial) -> None:
            trials.append({**dataclasses.asdict(trial), "time": time.time()})
            store.update_run(run_id, steps=len(trials), result={"trials": trials, **progress})
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
        store.finish_run(run_id, *failure(exc), result={"trials": trials})
        raise
    status = "cancelled" if result.cancelled else "completed"
    message = f"recommended targets: {result.recommended}" if result.recommended else "no group reached its target"
    if result.cancelled:
        message = f"cancelled after {len(trials)} trials; the groups it did not measure say so"
    store.finish_run(
        run_id,
        status,
        message,
        result={"trials": trials, **progress, "phase": "done", **summary},
        steps=len(trials),
        wall_time_s=time.perf_counter() - started,
        device=str(next(model.parameters()).device),
    )
    return run_id
