"""The d90 search: the smallest subspace dimension d whose trial reaches a target accuracy, within a trial budget."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


def d_grid(d_min: int, d_max: int) -> list[int]:
    """``d_min * 2**i`` up to ``d_max``, plus ``d_max`` itself when it is not on the grid."""
    grid = []
    d = d_min
    while d <= d_max:
        grid.append(d)
        d *= 2
    if grid[-1] != d_max:
        grid.append(d_max)
    return grid


@dataclass(frozen=True)
class D90Search:
    """The outcome of `search_d90`.

    Attributes:
        d90: the smallest d found to reach the target, or None.
        trials: (d, accuracy) in the order evaluated.
        reason: why d90 is None, or what limits it (an upper bound when the budget cut the bisection short).
    """

    d90: int | None
    trials: tuple[tuple[int, float], ...]
    reason: str


def search_d90(
    evaluate: Callable[[int], float],
    target: float,
    *,
    d_min: int,
    d_max: int,
    max_trials: int,
) -> D90Search:
    """Find the smallest d with ``evaluate(d) >= target``, assuming accuracy grows with d.

    Walks the grid `d_grid` upwards and stops at the first passing point; then bisects on integers between the last
    failing and the first passing grid points. At most ``max_trials`` calls of ``evaluate``.
    """
    trials: list[tuple[int, float]] = []

    def run(d: int) -> bool:
        acc = evaluate(d)
        trials.append((d, acc))
        return acc >= target

    lo: int | None = None
    hi: int | None = None
    for d in d_grid(d_min, d_max):
        if len(trials) >= max_trials:
            break
        if run(d):
            hi = d
            break
        lo = d
    if hi is None:
        best_d, best = max(trials, key=lambda t: t[1])
        if lo == d_max:
            why = f"no d up to {d_max} reached the target {target:.3f}"
        else:
            why = f"the trial budget ({max_trials}) ran out at d={lo} before the target {target:.3f} was reached"
        return D90Search(None, tuple(trials), f"{why} (best {best:.3f} at d={best_d})")
    if lo is None:
        return D90Search(hi, tuple(trials), f"reached at the smallest d tried (d_min={d_min}): d90 <= {d_min}")
    while hi - lo > 1:
        if len(trials) >= max_trials:
            return D90Search(
                hi, tuple(trials), f"the trial budget ran out during bisection: d90 is in ({lo}, {hi}], reported {hi}"
            )
        mid = (lo + hi) // 2
        if run(mid):
            hi = mid
        else:
            lo = mid
    return D90Search(hi, tuple(trials), "")
