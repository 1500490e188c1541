"""The d90 search: the smallest subspace dimension d at which random projections reach a target accuracy.

A trial's accuracy depends on its random projection as well as on d: one unlucky projection can fail at a d where
others pass, and a search that trusts each trial alone then jumps past the answer. So every decision here rests on a
monotone fit over all the trials so far. Each trial is a vote, pass (accuracy >= target) or fail; the isotonic fit
of the votes against d (the non-decreasing fit closest to them) gives each tried d a pass rate, and d passes when
its rate is above one half. The search

1. bisects a half-octave grid of d (`d_grid`) by those rates;
2. runs each end of the bracket it finds once more, with a new projection; when the two runs disagree a third
   settles it, and an end that flips reopens the bisection;
3. refines between the ends by their geometric mean until they are a factor ``resolution`` apart (or adjacent
   integers), running each new end once more as in 2 while the budget allows.

One bad trial anywhere cannot hide from step 2: everything the search tries after it lies on the far side of it and
agrees with the truth, so the bad trial ends up as an end of the bracket, where its re-run contradicts it. Over the
default range (d from 8 to 8192) and budget (11 trials), one bad trial at any position still leaves d90 within a
factor 1.5 of the truth (tests/test_intrinsic_dim.py tries every position).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

Evaluate = Callable[[int, int], float]
"""``evaluate(d, repeat)``: the accuracy of a trial of d random directions, with the ``repeat``-th projection of that
d (0 for its first trial; each repeat a different random projection)."""

_HALF = 0.5
_TIE_TOLERANCE = 1e-9  # pass rates are means of 0/1 votes; a rate this close to one half is a tie


def d_grid(d_min: int, d_max: int) -> list[int]:
    """The half-octave grid ``round(d_min * 2**(i / 2))`` up to ``d_max`` (distinct integers), plus ``d_max``."""
    grid: list[int] = []
    step = 0
    while (d := round(d_min * 2 ** (step / 2))) <= d_max:
        if not grid or d > grid[-1]:
            grid.append(d)
        step += 1
    if not grid or grid[-1] != d_max:
        grid.append(d_max)
    return grid


def pass_rates(trials: Sequence[tuple[int, float]], target: float) -> dict[int, float]:
    """The isotonic (non-decreasing in d) least-squares fit of the pass votes ``accuracy >= target`` of ``(d,
    accuracy)`` trials, at each tried d (ascending). Trials repeated at one d count once each."""
    from sklearn.isotonic import IsotonicRegression  # imported here: it takes seconds, and only a search needs it

    if not trials:
        return {}
    ds = [float(d) for d, _ in trials]
    votes = [float(accuracy >= target) for _, accuracy in trials]
    tried = sorted({d for d, _ in trials})
    fit = IsotonicRegression(increasing=True).fit(ds, votes).predict([float(d) for d in tried])
    return dict(zip(tried, (float(rate) for rate in fit), strict=True))


@dataclass(frozen=True)
class D90Search:
    """The outcome of `search_d90`.

    Attributes:
        d90: the smallest tried d whose fitted pass rate is above one half, or None.
        trials: (d, accuracy) in the order evaluated; a d tried again appears again.
        reason: why d90 is None, or what limits it (an upper bound when the budget cut the search short).
    """

    d90: int | None
    trials: tuple[tuple[int, float], ...]
    reason: str


def search_d90(
    evaluate: Evaluate,
    target: float,
    *,
    d_min: int,
    d_max: int,
    max_trials: int,
    resolution: float = 2**0.25,
) -> D90Search:
    """Find the smallest d whose random projections reach ``target``, robust to one bad trial.

    The steps are in the module docstring. At most ``max_trials`` calls of ``evaluate``; a re-run of an end (step 2)
    or a refinement (step 3) is started only while at least two calls are left, so that a disagreement can still be
    settled. The reported d90 was tried and passes: the true d90 lies between the largest failing tried d below it
    and itself.
    """
    grid = d_grid(d_min, d_max)
    trials: list[tuple[int, float]] = []

    def run(d: int) -> None:
        trials.append((d, evaluate(d, sum(1 for tried, _ in trials if tried == d))))

    while len(trials) < max_trials:
        next_d = _next_d(trials, target, grid, resolution, max_trials - len(trials))
        if next_d is None:
            break
        run(next_d)
    return _outcome(trials, target, d_min, d_max, max_trials, resolution)


def _bracket(rates: dict[int, float]) -> tuple[int | None, int | None]:
    """(largest failing tried d, smallest passing tried d); either None when there is none."""
    failing = [d for d, rate in rates.items() if rate < _HALF - _TIE_TOLERANCE]
    passing = [d for d, rate in rates.items() if rate > _HALF + _TIE_TOLERANCE]
    return max(failing, default=None), min(passing, default=None)


def _next_d(
    trials: Sequence[tuple[int, float]], target: float, grid: Sequence[int], resolution: float, left: int
) -> int | None:
    """The d of the next trial, or None when the search is done."""
    rates = pass_rates(trials, target)
    runs = {d: sum(1 for tried, _ in trials if tried == d) for d in rates}
    ties = [d for d, rate in rates.items() if abs(rate - _HALF) <= _TIE_TOLERANCE]
    if ties:  # trials disagree there: one more vote settles it
        return min(ties, key=lambda d: (runs[d], d))
    low, high = _bracket(rates)
    inside = [d for d in grid if (low is None or d > low) and (high is None or d < high)]
    if inside:  # 1. bisect the grid
        return inside[len(inside) // 2]
    once = [d for d in (low, high) if d is not None and runs[d] == 1]
    if once and left >= 2:  # 2. re-run an end, the failing one first; one more call is left to settle a tie
        return once[0]
    if low is not None and high is not None and high - low > 1 and high > resolution * low:
        return min(high - 1, max(low + 1, round(math.sqrt(low * high))))  # 3. refine
    return None


def _outcome(
    trials: Sequence[tuple[int, float]], target: float, d_min: int, d_max: int, max_trials: int, resolution: float
) -> D90Search:
    low, high = _bracket(pass_rates(trials, target))  # a d whose votes are tied counts as failing
    if high is None:
        best_d, best = max(trials, key=lambda t: t[1])
        if low == d_max:
            why = f"no d up to {d_max} reached the target {target:.3f}"
        else:
            why = f"the trial budget ({max_trials}) ran out before the target {target:.3f} was reached"
        return D90Search(None, tuple(trials), f"{why} (best {best:.3f} at d={best_d})")
    if low is None and high == d_min:
        return D90Search(high, tuple(trials), f"reached at the smallest d tried (d_min={d_min}): d90 <= {d_min}")
    if low is None or (high - low > 1 and high > resolution * low):
        interval = f"[{d_min}, {high}]" if low is None else f"({low}, {high}]"
        return D90Search(high, tuple(trials), f"the trial budget ran out: d90 is in {interval}, reported {high}")
    return D90Search(high, tuple(trials), "")
