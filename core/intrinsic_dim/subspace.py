"""One trial: train a group's weights in a random d-dimensional subspace (or all of them) and a fresh head, then
score it on validation data.

Every trial passes the group's re-parameterised weights ``theta_0 + P theta_d`` (and the head) to
``torch.func.functional_call``: the model is never copied and never written to, and every other parameter is the
model's own tensor, bit for bit. Everything runs on the device the model's parameters are on.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils.data import DataLoader, Dataset

from core.intrinsic_dim.config import IntrinsicDimConfig
from core.intrinsic_dim.groups import Reparam, Slot
from core.intrinsic_dim.projections import IdentityProjection, Projection, make_projection

LabelledData = Dataset | DataLoader | tuple[Tensor, Tensor]
"""Training or validation data yielding ``(input, label)``: a Dataset, a DataLoader, or ``(inputs, labels)`` tensors
already in memory (batched by slicing: the fastest for small problems)."""
LossFn = Callable[[Tensor, Tensor], Tensor]
ScoreFn = Callable[[Tensor, Tensor], Tensor]
"""``score(outputs, labels)``: one score in [0, 1] per sample; the validation accuracy is their mean."""
ShouldStop = Callable[[], bool]


class Cancelled(Exception):
    """Raised inside a trial when ``should_stop()`` returns True; `measure_intrinsic_dimension` catches it."""


def accuracy_score(outputs: Tensor, labels: Tensor) -> Tensor:
    """Top-1 correctness per sample."""
    return (outputs.argmax(dim=-1) == labels).float()


class Batches:
    """Batches of ``(input, label)`` on a device: from the user's data, or from cached tensors."""

    def __init__(
        self,
        data: LabelledData | None,
        batch_size: int,
        shuffle: bool,
        device: torch.device,
        tensors: tuple[Tensor, Tensor] | None = None,
    ) -> None:
        if isinstance(data, tuple):
            tensors, data = (data[0].to(device), torch.as_tensor(data[1]).to(device)), None
        self.data, self.batch_size, self.shuffle, self.device, self.tensors = data, batch_size, shuffle, device, tensors

    def unshuffled(self) -> Batches:
        return Batches(self.data, self.batch_size, False, self.device, self.tensors)

    def epoch(self, seed: int) -> Iterator[tuple[Tensor, Tensor]]:
        """One pass; shuffled by ``seed`` unless this is validation data or the user's own DataLoader.

        Datasets and tensors are shuffled by the same permutation for the same seed, so a trial on cached block
        inputs sees exactly the batches a trial on the images would.
        """
        n = len(self.tensors[1]) if self.tensors is not None else None
        if self.tensors is None and not isinstance(self.data, DataLoader):
            n = len(self.data)  # type: ignore[arg-type]
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)) if self.shuffle and n else None
        if self.tensors is not None:
            x, y = self.tensors
            for start in range(0, len(y), self.batch_size):
                if order is None:
                    yield x[start : start + self.batch_size], y[start : start + self.batch_size]
                else:  # index_select, not x[rows]: advanced indexing spins threads, slow on a busy machine
                    rows = order[start : start + self.batch_size]
                    yield x.index_select(0, rows), y.index_select(0, rows)
            return
        loader = self.data
        if not isinstance(loader, DataLoader):
            sampler = order.tolist() if order is not None else None
            loader = DataLoader(loader, batch_size=self.batch_size, sampler=sampler)
        for batch in loader:
            x, y = batch[0], batch[1]
            yield x.to(self.device), torch.as_tensor(y).to(self.device)

    def steps(self, count: int, seed: int) -> Iterator[tuple[Tensor, Tensor]]:
        """``count`` batches, epoch after epoch (epoch e shuffled by ``seed + e``)."""
        done, epoch = 0, 0
        while done < count:
            empty = True
            for batch in self.epoch(seed + epoch):
                empty = False
                yield batch
                done += 1
                if done == count:
                    return
            if empty:
                raise ValueError("the training data is empty")
            epoch += 1


@dataclass
class TrialOutcome:
    """One trained trial.

    Attributes:
        accuracy: mean validation score.
        projection: ``dense``, ``fastfood``, ``identity`` (full training) or ``none`` (head only).
        weights: the trained group parameters (whole tensors, rebuilt from their slots) and head, by parameter name
            of the model, detached. Everything not in it is the model's own tensor.
        diverged: the loss became non-finite and training stopped early.
    """

    accuracy: float
    projection: str
    weights: dict[str, Tensor]
    diverged: bool = False


def train_and_score(
    runner: nn.Module,
    reparam: Reparam,
    projection: Projection | None,
    head_init: dict[str, Tensor],
    train: Batches,
    val: Batches,
    config: IntrinsicDimConfig,
    loss_fn: LossFn,
    score_fn: ScoreFn,
    should_stop: ShouldStop | None,
    prefix: str = "",
) -> TrialOutcome:
    """Train theta (the projection's d coordinates) and the head from their initial values, then validate.

    theta learns at ``config.lr``, or at ``config.full_lr`` when the projection is the identity (all the weights).

    ``prefix`` is what ``runner``'s parameter names put before the model's (``"model."`` when the runner holds the
    model as a submodule); the returned weights are named as in the model.
    """
    device = projection.device if projection is not None else next(runner.parameters()).device
    theta = torch.zeros(projection.d if projection is not None else 0, device=device, requires_grad=True)
    head = {name: t.clone().requires_grad_(True) for name, t in head_init.items()}
    lr = config.full_lr if isinstance(projection, IdentityProjection) else config.lr
    groups = [{"params": [theta], "lr": lr}] if projection is not None else []
    if head:
        groups.append({"params": list(head.values()), "lr": config.head_lr})
    if not groups:
        raise ValueError("nothing to train: no group and no head")
    optimizer = torch.optim.Adam(groups)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / config.steps)) if config.cosine else 1.0
    )

    def params() -> dict[str, Tensor]:
        group = reparam(projection(theta)) if projection is not None else {}
        return group | head

    diverged = False
    for x, y in train.steps(config.steps, config.seed):
        if should_stop is not None and should_stop():
            raise Cancelled
        loss = loss_fn(functional_call(runner, params(), (x,)), y)
        if not torch.isfinite(loss):
            diverged = True
            break
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    with torch.no_grad():
        final = params()
        total, count = 0.0, 0
        for x, y in val.epoch(0):
            scores = score_fn(functional_call(runner, final, (x,)), y)
            total += float(scores.sum())
            count += scores.numel()
    if count == 0:
        raise ValueError("the validation data is empty")
    weights = {name.removeprefix(prefix): t.detach() for name, t in final.items()}
    kind = projection.kind if projection is not None else "none"
    return TrialOutcome(total / count, kind, weights, diverged)


@contextlib.contextmanager
def frozen(model: nn.Module) -> Iterator[None]:
    """No parameter requires grad and the model is in eval mode inside; both restored on exit."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    modes = [(m, m.training) for m in model.modules()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        model.eval()
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        for m, mode in modes:
            m.training = mode


def fresh_head(model: nn.Module, path: str, seed: int, prefix: str = "") -> dict[str, Tensor]:
    """A newly initialised copy of the head's parameters (timm's init: trunc-normal std .02 weights, zero biases).

    The same seed gives the same head, so every trial starts from the same one.
    """
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for name, p in model.get_submodule(path).named_parameters():
        t = torch.zeros(p.shape)
        if p.dim() >= 2:
            nn.init.trunc_normal_(t, std=0.02, generator=generator)
        out[f"{prefix}{path}.{name}"] = t.to(device=p.device, dtype=p.dtype)
    return out


def trial_projection(
    D: int, d: int | None, config: IntrinsicDimConfig, device: torch.device, repeat: int = 0
) -> Projection:
    """P of a trial: the identity when ``d`` is None (all D weights), else `make_projection` seeded by ``config.seed``
    and ``repeat`` (a different P for each repeat of the same d)."""
    if d is None:
        return IdentityProjection(D, device)
    seed = config.seed + 1_000_003 * repeat  # repeats of one seed never meet the first P of a nearby seed
    return make_projection(D, d, seed, max_dense_elements=config.max_dense_elements, device=device)


def subspace_trial(
    model: nn.Module,
    slots: Sequence[Slot],
    d: int | None,
    train: LabelledData,
    val: LabelledData,
    config: IntrinsicDimConfig | None = None,
    *,
    repeat: int = 0,
    head: str | None = None,
    loss_fn: LossFn = F.cross_entropy,
    score_fn: ScoreFn = accuracy_score,
    should_stop: ShouldStop | None = None,
) -> TrialOutcome:
    """Train the slots of any module in a random d-dimensional subspace (``d=None``: all their weights), and score it.

    The generic core under `measure_intrinsic_dimension`, usable on any ``nn.Module`` whose forward takes the
    inputs: ``theta = theta_0 + P theta_d`` with P from `trial_projection`, Adam on theta_d (``config.lr``;
    ``config.full_lr`` when ``d`` is None) for ``config.steps`` steps.

    Args:
        repeat: which projection of this d (0, 1, ...): each repeat draws another P, with the same head and batches.
        head: module path of a classifier to re-initialise (`fresh_head`) and train beside the slots, or None.
        loss_fn: training loss of ``(outputs, labels)``.
        score_fn: per-sample validation score in [0, 1] (accuracy by default).

    Raises:
        Cancelled: when ``should_stop()`` returns True.
    """
    config = config or IntrinsicDimConfig()
    device = next(model.parameters()).device
    with frozen(model):
        reparam = Reparam(dict(model.named_parameters()), slots)
        head_init = fresh_head(model, head, config.seed) if head is not None else {}
        return train_and_score(
            model,
            reparam,
            trial_projection(reparam.D, d, config, device, repeat),
            head_init,
            Batches(train, config.batch_size, True, device),
            Batches(val, config.batch_size, False, device),
            config,
            loss_fn,
            score_fn,
            should_stop,
        )
