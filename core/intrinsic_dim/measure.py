"""The measurement over the groups of a timm ViT: each group's full-training baseline and d90 search, the result,
and the recommended ``targets`` string.

Li et al. (2018), "Measuring the Intrinsic Dimension of Objective Landscapes": freeze the model, re-parameterise one
group of D weights as ``theta = theta_0 + P theta_d`` with a fixed random projection P (D x d), train only
``theta_d`` (and a fresh classifier head), and call *d90* the smallest d whose validation accuracy reaches 90% of
training the whole group normally (all D weights plus the head). KAdaptation (He et al. 2023) uses it to decide which
submodules to adapt: a group with a low d90 adapts with few degrees of freedom. Its paper does not spell out its
exact protocol; this module implements Li et al.'s definition.

The model is put in eval mode (no dropout) for the measurement, and its ``requires_grad`` flags and training mode are
restored afterwards.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Literal

import pandas as pd
import torch.nn.functional as F
from torch import nn

from core.intrinsic_dim.block_cache import BlockInputCache, FromBlock
from core.intrinsic_dim.config import IntrinsicDimConfig
from core.intrinsic_dim.groups import (
    Reparam,
    Slot,
    classifier_path,
    group_slots,
    resolve_groups,
    slot_sizes,
    union_targets,
)
from core.intrinsic_dim.search import search_d90
from core.intrinsic_dim.subspace import (
    Cancelled,
    LabelledData,
    ShouldStop,
    TrialOutcome,
    accuracy_score,
    fresh_head,
    frozen,
    train_and_score,
    trial_projection,
)
from core.methods.base import inspect_vit


@dataclass(frozen=True)
class Trial:
    """One training of a group, as reported to ``on_trial`` and recorded in `IntrinsicDimResult.curves`.

    Attributes:
        group: the group as a ``Targets`` string.
        d: the subspace dimension; the group's size D for the full baseline.
        accuracy: validation accuracy.
        kind: ``full`` (all D weights and the head: the group's baseline, trained first) or ``subspace``.
        target: the group's target accuracy, ``threshold`` x the full baseline's accuracy.
        projection: ``dense``, ``fastfood`` or ``identity`` (the full baseline).
        diverged: the loss became non-finite and training stopped early.
        repeat: 0 for the first trial of this d, 1, 2, ... for the search's re-runs with other projections.
    """

    group: str
    d: int
    accuracy: float
    kind: Literal["full", "subspace"]
    target: float
    projection: str
    diverged: bool = False
    repeat: int = 0


OnTrial = Callable[[Trial], None]
CURVE_COLUMNS = ["group", "d", "accuracy", "kind", "projection", "diverged", "repeat"]


@dataclass
class GroupResult:
    """The measurement of one group.

    Attributes:
        group: the group as a ``Targets`` string (``"attn"``, ``"q:3"``, ...).
        size: D, its number of weights.
        full_accuracy: validation accuracy of training all D weights and the head (None if not measured).
        target: ``threshold * full_accuracy``.
        d90: the smallest tried d whose random projections reach the target, decided on a monotone fit over all
            the group's trials (`search_d90`), or None (see ``reason``).
        reason: why d90 is None, or a caveat about it; empty when there is none.
        trials: subspace trials run, re-runs included (the full baseline is one more training).
        head_reaches_target: the head alone (d = 0) already reaches ``target``, so d90 carries little information.
    """

    group: str
    size: int
    full_accuracy: float | None = None
    target: float | None = None
    d90: int | None = None
    reason: str = ""
    trials: int = 0
    head_reaches_target: bool = False


@dataclass
class IntrinsicDimResult:
    """Everything a measurement found.

    Attributes:
        curves: one row per trial, the fields of `Trial` but its target: group, d, accuracy, kind (``subspace`` or
            ``full``; ``full`` rows have d = D), projection (``dense``, ``fastfood``, ``identity``), diverged and
            repeat (a d the search ran again has one row per run).
        groups: per-group results, in the order measured.
        head_only_accuracy: the fresh head trained alone on the frozen model (d = 0): the floor every group starts
            from. When it already reaches a group's target, that group's d90 says little.
        majority_rate: the validation share of the most frequent class (chance level).
        recommended: the selection as a ``Targets`` string `core.methods` accepts, or None when no group has a d90.
        explanation: a plain-text account of the numbers and the choice.
        config: the settings used.
        depth: the model's block count (what ``recommended`` resolves against).
        cancelled: the measurement stopped early; unmeasured groups say so in their reason.
        notes: remarks on how it ran (e.g. where the block-input cache was not used).
    """

    curves: pd.DataFrame
    groups: list[GroupResult]
    head_only_accuracy: float | None
    majority_rate: float
    recommended: str | None
    explanation: str
    config: IntrinsicDimConfig
    depth: int
    cancelled: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def d90(self) -> dict[str, int | None]:
        return {g.group: g.d90 for g in self.groups}

    @property
    def full_accuracy(self) -> dict[str, float | None]:
        return {g.group: g.full_accuracy for g in self.groups}

    def table(self) -> pd.DataFrame:
        """One row per group, with the fields of `GroupResult`."""
        cols = ["group", "size", "full_accuracy", "target", "d90", "trials", "head_reaches_target", "reason"]
        return pd.DataFrame([{c: getattr(g, c) for c in cols} for g in self.groups], columns=cols)


def recommend_targets(
    groups: Sequence[GroupResult],
    depth: int,
    *,
    select: Literal["top_k", "within"] = "within",
    top_k: int = 1,
    within: float = 2.0,
) -> tuple[str | None, str]:
    """The groups to adapt, from their d90 (lower is better; ties go to the higher full accuracy).

    Groups whose target the head alone already reaches are left out when any other group has a d90: their low d90
    says the group barely matters for this task, not that it adapts cheaply.

    Returns:
        (targets, explanation): targets a string ``core.methods`` accepts (None when no group has a d90).
    """
    ranked = sorted((g for g in groups if g.d90 is not None), key=lambda g: (g.d90, -(g.full_accuracy or 0.0)))
    if not ranked:
        return None, "No group reached its target accuracy, so there is nothing to recommend."
    informative = [g for g in ranked if not g.head_reaches_target]
    caveat = ""
    if not informative:
        informative = ranked
        caveat = " Caveat: the head alone reaches every group's target, so these d90 values carry little information."
    elif len(informative) < len(ranked):
        skipped = ", ".join(g.group for g in ranked if g.head_reaches_target)
        caveat = f" Left out because the head alone already reaches their target: {skipped}."
    best = informative[0].d90
    assert best is not None
    if select == "top_k":
        chosen = informative[:top_k]
        rule = f"the {top_k} group(s) with the lowest d90"
    else:
        chosen = [g for g in informative if g.d90 is not None and g.d90 <= within * best]
        rule = f"every group whose d90 is within {within:g}x of the lowest ({best})"
    targets = union_targets([g.group for g in chosen], depth)
    names = ", ".join(f"{g.group} (d90={g.d90})" for g in chosen)
    return targets, f"Recommended targets {targets!r}: {rule}: {names}.{caveat}"


def measure_intrinsic_dimension(
    model: nn.Module,
    train: LabelledData,
    val: LabelledData,
    groups: str | Sequence[str] = "attn-mlp",
    config: IntrinsicDimConfig | None = None,
    *,
    on_trial: OnTrial | None = None,
    should_stop: ShouldStop | None = None,
) -> IntrinsicDimResult:
    """Measure d90 of each group of a timm ViT classifier, and recommend which groups to adapt.

    Per group: the full-training baseline (all its weights and a fresh head), then `search_d90` over subspace
    trials at ``threshold`` x that accuracy. Each trial starts from the pretrained weights and the same fresh head.
    With ``config.cache_block_inputs``, the tokens entering the group's first block are computed once (they do not
    depend on the group's weights) and each step runs only the blocks from there on. Once, before the groups, the
    head alone is trained (`IntrinsicDimResult.head_only_accuracy`).

    Args:
        model: a timm ViT with a classifier head for the task's classes; never modified.
        train: training data yielding ``(image, label)``; a Dataset is shuffled by ``config.seed``, a DataLoader is
            used as it is (keep its order deterministic for comparable trials).
        val: validation data; accuracies are measured on it.
        groups: a scheme of `GROUP_SCHEMES` or a list of ``Targets`` strings, one group each.
        on_trial: called with each group's `Trial` as it finishes: first its full baseline (``kind="full"``,
            ``d`` = D), then its subspace trials.
        should_stop: polled before every training step; when it returns True the measurement stops and returns
            what it has, with ``cancelled=True``.
    """
    config = config or IntrinsicDimConfig()
    arch = inspect_vit(model)
    results = [GroupResult(g, 0) for g in resolve_groups(groups, arch.depth)]
    slots = {r.group: group_slots(model, r.group) for r in results}
    for r in results:
        r.size = sum(slot_sizes(model, slots[r.group]))
    head_only: float | None = None
    cancelled = False
    with frozen(model):
        trials = GroupTrials(model, train, val, config, on_trial, should_stop)
        majority = trials.majority_rate()
        try:
            head_only = trials.train([], None).accuracy
            for result in results:
                _measure_group(result, slots[result.group], trials, config, head_only, majority)
        except Cancelled:
            cancelled = True
            for result in results:
                if result.d90 is None and not result.reason:
                    result.reason = "cancelled before its measurement finished"
    curves = pd.DataFrame([asdict(t) for t in trials.done], columns=CURVE_COLUMNS)
    recommended, why = recommend_targets(
        results, arch.depth, select=config.select, top_k=config.top_k, within=config.within
    )
    explanation = _explain(results, head_only, majority, config, why, cancelled)
    return IntrinsicDimResult(
        curves,
        results,
        head_only,
        majority,
        recommended,
        explanation,
        config,
        arch.depth,
        cancelled,
        trials.inputs.notes,
    )


class GroupTrials:
    """Runs the trials of one measurement on a ViT: the runner and batches of the group's first block, the same
    fresh head every time, and a record of every group trial (``done``), each reported through ``on_trial``."""

    def __init__(
        self,
        model: nn.Module,
        train: LabelledData,
        val: LabelledData,
        config: IntrinsicDimConfig,
        on_trial: OnTrial | None,
        should_stop: ShouldStop | None,
    ) -> None:
        self.model, self.config, self.on_trial, self.should_stop = model, config, on_trial, should_stop
        self.depth = len(model.blocks)
        self.head_path = classifier_path(model)
        self.inputs = BlockInputCache(model, train, val, config)
        self.done: list[Trial] = []

    def majority_rate(self) -> float:
        """The validation share of the most frequent label."""
        counts: dict[int, int] = {}
        for _, y in self.inputs.get(self.depth)[2].epoch(0):
            for label in y.reshape(-1).tolist():
                counts[int(label)] = counts.get(int(label), 0) + 1
        return max(counts.values()) / sum(counts.values()) if counts else 0.0

    def train(self, slots: Sequence[Slot], d: int | None, repeat: int = 0) -> TrialOutcome:
        """Train ``d`` random directions of the slots (the ``repeat``-th projection of that d), all their weights
        (``d=None``), or the head alone (no slots), always with the same fresh head."""
        config, device = self.config, self.inputs.device
        start = min((int(s.param.split(".")[1]) for s in slots), default=self.depth)  # slots are blocks.<i>....
        runner, train, val = self.inputs.get(start)
        reparam = Reparam(dict(runner.named_parameters()), slots, FromBlock.PREFIX)
        projection = trial_projection(reparam.D, d, config, device, repeat) if slots else None
        head = fresh_head(self.model, self.head_path, config.seed, FromBlock.PREFIX)
        return train_and_score(
            runner,
            reparam,
            projection,
            head,
            train,
            val,
            config,
            F.cross_entropy,
            accuracy_score,
            self.should_stop,
            FromBlock.PREFIX,
        )

    def full(self, group: GroupResult, slots: Sequence[Slot]) -> Trial:
        """The group's baseline: all its weights and the head."""
        outcome = self.train(slots, None)
        target = self.config.threshold * outcome.accuracy
        return self._record(group, group.size, outcome, "full", target)

    def subspace(self, group: GroupResult, slots: Sequence[Slot], d: int, repeat: int) -> Trial:
        """A trial of ``d`` random directions of the group's weights; ``group.target`` must be set."""
        assert group.target is not None
        return self._record(group, d, self.train(slots, d, repeat), "subspace", group.target, repeat)

    def _record(
        self,
        group: GroupResult,
        d: int,
        outcome: TrialOutcome,
        kind: Literal["full", "subspace"],
        target: float,
        repeat: int = 0,
    ) -> Trial:
        trial = Trial(group.group, d, outcome.accuracy, kind, target, outcome.projection, outcome.diverged, repeat)
        self.done.append(trial)
        if self.on_trial is not None:
            self.on_trial(trial)
        return trial


def _measure_group(
    result: GroupResult,
    slots: Sequence[Slot],
    trials: GroupTrials,
    config: IntrinsicDimConfig,
    head_only: float,
    majority: float,
) -> None:
    """The full-training baseline of one group, then its d90 search; fills ``result`` in."""
    full = trials.full(result, slots)
    result.full_accuracy = full.accuracy
    result.target = full.target
    if full.accuracy <= majority:
        result.reason = (
            f"training the whole group reached {full.accuracy:.3f}, not above the majority-class rate "
            f"{majority:.3f}: there is no accuracy to reach (more steps or another full_lr may help)"
        )
        return
    search = search_d90(
        lambda d, repeat: trials.subspace(result, slots, d, repeat).accuracy,
        result.target,
        d_min=min(config.d_min, result.size),
        d_max=min(config.d_max, result.size),
        max_trials=config.max_trials,
    )
    result.d90, result.trials = search.d90, len(search.trials)
    result.head_reaches_target = head_only >= result.target
    notes = [search.reason]
    if result.head_reaches_target:
        notes.append("the head alone already reaches the target")
    if full.accuracy < head_only:
        notes.append(
            f"training the whole group scored below the head alone ({head_only:.3f}): the baseline is unreliable "
            "(try a lower full_lr or more steps)"
        )
    result.reason = "; ".join(n for n in notes if n)


def _explain(
    groups: Sequence[GroupResult],
    head_only: float | None,
    majority: float,
    config: IntrinsicDimConfig,
    choice: str,
    cancelled: bool,
) -> str:
    pct = f"{config.threshold:.0%}"
    lines = [
        f"Local intrinsic dimension d90 (Li et al. 2018): the smallest d such that training only d random directions "
        f"of a group's weights (plus a fresh head) reaches {pct} of the validation accuracy of training all of the "
        f"group's weights, decided on a monotone fit over all of the group's trials so that one unlucky projection "
        f"does not move it. A lower d90 means the group adapts with fewer degrees of freedom.",
        f"Head alone: {head_only:.3f}; majority-class rate: {majority:.3f}." if head_only is not None else "",
    ]
    for g in groups:
        full = f"{g.full_accuracy:.3f}" if g.full_accuracy is not None else "-"
        d90 = g.d90 if g.d90 is not None else "not reached"
        note = f" ({g.reason})" if g.reason else ""
        lines.append(f"- {g.group}: D={g.size:,}, full training {full}, d90 = {d90}{note}")
    lines.append(choice)
    if cancelled:
        lines.append("The measurement was cancelled; the numbers above are partial.")
    return "\n".join(line for line in lines if line)
