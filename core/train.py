"""The trainer: ``train(model, data, config, callbacks)``.

It knows nothing about PETL methods: it trains whatever has ``requires_grad`` (the method library decided that),
reports through callbacks, stops within one step when cancelled, and stops with a clear record when the loss stops
being finite. Model selection is on the validation split; the test split is evaluated once, at the end, with the
best validation state. When only the classifier trains (linear probing) it caches the frozen backbone's features
once and trains the head on them: a head-only step would otherwise cost a whole forward pass.

Device: ``"auto"`` picks CUDA when there is one (with bf16 autocast) and the CPU otherwise (fp32).
"""

from __future__ import annotations

import contextlib
import math
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from timm.optim import param_groups_weight_decay
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from core.data import DataBundle, make_loader

try:
    import resource  # POSIX only
except ImportError:  # Windows
    resource = None  # type: ignore[assignment]

Status = Literal["completed", "cancelled", "diverged"]


@dataclass(frozen=True)
class TrainConfig:
    """How to train; JSON-serialisable and recorded with every run.

    Attributes:
        steps: optimiser steps in total (the schedule's length).
        batch_size: images per step.
        lr: peak learning rate (AdamW).
        weight_decay: AdamW decay, applied to matrices only: biases, norms, scales and other 1-D tensors, position
            embeddings and class tokens get none.
        warmup_steps: linear warm-up from 0 before the cosine decay.
        min_lr: floor of the cosine decay.
        label_smoothing: cross-entropy label smoothing.
        grad_clip: clip the global gradient norm to this value (None: no clipping).
        eval_every: evaluate on validation every this many steps (and at the end).
        seed: seeds the shuffling and any dropout.
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``.
        cache_features: for head-only training, train the head on cached backbone features.
    """

    steps: int = 300
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 20
    min_lr: float = 1e-5
    label_smoothing: float = 0.0
    grad_clip: float | None = None
    eval_every: int = 50
    seed: int = 0
    device: str = "auto"
    cache_features: bool = True

    def __post_init__(self) -> None:
        checks = [
            (self.steps >= 1, f"steps={self.steps} must be at least 1"),
            (self.batch_size >= 1, f"batch_size={self.batch_size} must be at least 1"),
            (self.lr > 0 and math.isfinite(self.lr), f"lr={self.lr} must be a positive number"),
            (self.weight_decay >= 0, f"weight_decay={self.weight_decay} must be >= 0"),
            (0 <= self.warmup_steps < self.steps, f"warmup_steps={self.warmup_steps} must be in [0, steps)"),
            (0 <= self.min_lr <= self.lr, f"min_lr={self.min_lr} must be in [0, lr]"),
            (0 <= self.label_smoothing < 1, f"label_smoothing={self.label_smoothing} must be in [0, 1)"),
            (self.grad_clip is None or self.grad_clip > 0, f"grad_clip={self.grad_clip} must be positive or None"),
            (self.eval_every >= 1, f"eval_every={self.eval_every} must be at least 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ----------------------------------------------------------------------------------------------------------------
# Callbacks and cancellation
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StepInfo:
    step: int
    total: int
    loss: float
    lr: float
    images_per_s: float


@dataclass
class TrainResult:
    """What a finished (or stopped) training reports."""

    status: Status
    message: str
    steps: int
    best_val_acc: float | None
    best_step: int | None
    test_acc: float | None
    test_loss: float | None
    wall_s: float
    steps_per_s: float
    peak_memory_bytes: int | None
    device: str
    history: list[dict[str, Any]] = field(default_factory=list)


class Callback:
    """Receives progress; override what you need. Exceptions raised here stop the training."""

    def on_start(self, total_steps: int, device: str) -> None: ...

    def on_step(self, info: StepInfo) -> None: ...

    def on_eval(self, step: int, split: str, metrics: dict[str, float]) -> None: ...

    def on_end(self, result: TrainResult) -> None: ...


class CancelToken:
    """Thread-safe flag: ``cancel()`` from the UI or a signal handler; the trainer stops before its next step."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()


# ----------------------------------------------------------------------------------------------------------------
# Pieces
# ----------------------------------------------------------------------------------------------------------------
def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; refuses CUDA when there is none, saying so."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was asked for, but this machine has no CUDA GPU; use 'auto' or 'cpu'")
    return device


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups over the trainable parameters, by timm's rule (`timm.optim.param_groups_weight_decay`).

    Decay applies to matrices only; biases and 1-D tensors (norms, scales, shifts) get none, and neither do the
    tensors the model names in ``no_weight_decay()`` (a timm ViT: position embeddings and class / register tokens),
    as in timm's and the papers' training recipes. Tensors a method adds (VPT's prompts, low-rank factors) decay
    when they are matrices.
    """
    no_decay_names = model.no_weight_decay() if hasattr(model, "no_weight_decay") else ()
    return param_groups_weight_decay(model, weight_decay, no_weight_decay_list=no_decay_names)


def lr_at(step: int, config: TrainConfig) -> float:
    """Linear warm-up to ``lr`` then cosine decay to ``min_lr`` at ``steps`` (step counts from 0)."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / (config.warmup_steps + 1)
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return config.min_lr + 0.5 * (config.lr - config.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def _autocast(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _batches(loader: DataLoader[Any]) -> Iterator[tuple[Tensor, Tensor]]:
    """Endless iteration over a loader (a new shuffle each pass)."""
    while True:
        yield from loader


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader[Any], device: torch.device) -> dict[str, float]:
    """Accuracy (%) and mean cross-entropy of ``model`` over a loader, in eval mode."""
    was_training = model.training
    model.eval()
    correct, total, loss_sum = 0, 0, 0.0
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with _autocast(device):
            logits = model(x).float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(-1) == y).sum().item()
        total += y.numel()
    model.train(was_training)
    if total == 0:
        raise ValueError("cannot evaluate on an empty split")
    return {"acc": 100.0 * correct / total, "loss": loss_sum / total}


def only_head_trains(model: nn.Module) -> bool:
    head = {id(p) for p in model.get_classifier().parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    return bool(trainable) and all(id(p) in head for p in trainable)


@torch.no_grad()
def backbone_features(model: nn.Module, dataset: Dataset[Any], device: torch.device, batch_size: int = 64) -> Tensor:
    """Pre-logits features of the frozen backbone (what the classifier sees), in eval mode."""
    model.eval()
    features = []
    for x, _ in make_loader(dataset, batch_size):
        with _autocast(device):
            features.append(model.forward_head(model.forward_features(x.to(device)), pre_logits=True).float().cpu())
    return torch.cat(features)


def _feature_datasets(model: nn.Module, data: DataBundle, device: torch.device) -> list[TensorDataset]:
    out = []
    for split in (data.train, data.val, data.test):
        out.append(TensorDataset(backbone_features(model, split, device), torch.as_tensor(split.labels)))
    return out


def peak_memory_bytes(device: torch.device) -> int | None:
    """Peak GPU memory allocated on CUDA; the process's peak resident memory on the CPU.

    On the CPU this reads ``getrusage`` where the ``resource`` module exists (POSIX), else the peak working set
    from psutil (Windows); None when neither is available.
    """
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    if resource is not None:
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # bytes on macOS, KiB elsewhere
        return int(rss if sys.platform == "darwin" else rss * 1024)
    try:
        import psutil
    except ImportError:
        return None
    peak = getattr(psutil.Process().memory_info(), "peak_wset", None)  # psutil reports a peak on Windows only
    return None if peak is None else int(peak)


# ----------------------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------------------
def train(
    model: nn.Module,
    data: DataBundle,
    config: TrainConfig,
    callbacks: Sequence[Callback] = (),
    cancel: CancelToken | None = None,
) -> TrainResult:
    """Train the trainable parameters of ``model`` on ``data.train``, select on ``data.val``, test once.

    The model is trained in place and holds the best validation state when this returns (unless no evaluation
    happened). Returns a `TrainResult`; a cancelled or diverged run is a result, not an exception.
    """
    device = resolve_device(config.device)
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("nothing to train: no parameter of the model requires grad (apply a method first)")
    torch.manual_seed(config.seed)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model.to(device)
    start = time.perf_counter()  # wall time includes caching features: it is part of what a probe costs
    cached = config.cache_features and only_head_trains(model)
    if cached:  # linear probing: features once, then the head alone
        train_set, val_set, test_set = _feature_datasets(model, data, device)
        net: nn.Module = model.get_classifier()
    else:
        train_set, val_set, test_set = data.train, data.val, data.test
        net = model
    train_loader = make_loader(train_set, config.batch_size, shuffle=True, seed=config.seed, drop_last=False)
    val_loader = make_loader(val_set, max(config.batch_size, 64))
    optimizer = torch.optim.AdamW(parameter_groups(net, config.weight_decay), lr=config.lr)
    trainable = [p for p in net.parameters() if p.requires_grad]
    for cb in callbacks:
        cb.on_start(config.steps, str(device))

    history: list[dict[str, Any]] = []
    best: tuple[float, int, dict[str, Tensor]] | None = None
    status: Status = "completed"
    message = "completed"
    step = 0
    tick, tick_step = time.perf_counter(), 0

    def run_eval() -> None:
        nonlocal best
        metrics = evaluate(net, val_loader, device)
        history.append({"step": step, "split": "val", **metrics})
        for cb in callbacks:
            cb.on_eval(step, "val", metrics)
        if best is None or metrics["acc"] > best[0]:
            state = {n: p.detach().clone() for n, p in net.named_parameters() if p.requires_grad}
            best = (metrics["acc"], step, state)

    net.train()
    batches = _batches(train_loader)
    while step < config.steps:
        if cancel is not None and cancel.cancelled:
            status, message = "cancelled", f"cancelled by the user after {step} of {config.steps} steps"
            break
        x, y = next(batches)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        lr = lr_at(step, config)
        for group in optimizer.param_groups:
            group["lr"] = lr
        with _autocast(device):
            logits = net(x)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=config.label_smoothing)
        if not torch.isfinite(loss):
            status = "diverged"
            message = f"diverged at step {step + 1}: the loss is {loss.item()}; try a lower learning rate"
            break
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(trainable, config.grad_clip)
        optimizer.step()
        step += 1
        now = time.perf_counter()
        images_per_s = (step - tick_step) * config.batch_size / max(now - tick, 1e-9)
        info = StepInfo(step=step, total=config.steps, loss=loss.item(), lr=lr, images_per_s=images_per_s)
        history.append({"step": step, "split": "train", "loss": info.loss, "lr": lr, "images_per_s": images_per_s})
        tick, tick_step = now, step
        for cb in callbacks:
            cb.on_step(info)
        if step % config.eval_every == 0 or step == config.steps:
            run_eval()

    wall = time.perf_counter() - start
    test_metrics: dict[str, float] | None = None
    if best is not None:
        with torch.no_grad():
            named = dict(net.named_parameters())
            for n, value in best[2].items():
                named[n].copy_(value)
    if status == "completed" and best is not None:
        test_metrics = evaluate(net, make_loader(test_set, max(config.batch_size, 64)), device)
        history.append({"step": step, "split": "test", **test_metrics})
        for cb in callbacks:
            cb.on_eval(step, "test", test_metrics)
        message = (
            f"completed {step} steps; best validation accuracy {best[0]:.2f}% at step {best[1]}, "
            f"test accuracy {test_metrics['acc']:.2f}%"
        )
    result = TrainResult(
        status=status,
        message=message,
        steps=step,
        best_val_acc=best[0] if best else None,
        best_step=best[1] if best else None,
        test_acc=test_metrics["acc"] if test_metrics else None,
        test_loss=test_metrics["loss"] if test_metrics else None,
        wall_s=wall,
        steps_per_s=step / wall if wall > 0 else 0.0,
        peak_memory_bytes=peak_memory_bytes(device),
        device=str(device),
        history=history,
    )
    for cb in callbacks:
        cb.on_end(result)
    return result
