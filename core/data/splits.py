"""Seeded, stratified train / validation / test partitions and the caps on each split."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from core.data.spec import SPLITS, DataSpec


def stratified_split(labels: npt.ArrayLike, sizes: Sequence[int], seed: int) -> list[npt.NDArray[np.int64]]:
    """Draw disjoint index sets of the given sizes, each with the class proportions of ``labels``.

    Each part is drawn from what the earlier parts left, by scikit-learn's ``train_test_split(stratify=...)``:
    each class's share is rounded by largest remainder, ties broken at random. Scikit-learn cannot stratify a
    draw that leaves a class with one item, or where the part or what remains after it is smaller than the
    number of classes; such a part is drawn uniformly at random instead. Indices come back sorted.

    Args:
        labels: Class of each item, shape (N,).
        sizes: Size of each part; their sum may not exceed N.
        seed: Decides which items of each class go where (for a given scikit-learn version).
    """
    from sklearn.model_selection import train_test_split  # on use, so that `import core.data` stays light

    labels = np.asarray(labels, dtype=np.int64)
    if sum(sizes) > len(labels) or min(sizes, default=0) < 0:
        raise ValueError(f"cannot draw parts of sizes {list(sizes)} from {len(labels)} items")
    random_state = np.random.RandomState(seed)  # one stream for all parts: each draw continues it
    remaining = np.arange(len(labels))
    parts: list[npt.NDArray[np.int64]] = []
    for size in sizes:
        if size in (0, len(remaining)):  # train_test_split refuses an empty part or an empty rest
            part, remaining = remaining[:size], remaining[size:]
        else:
            part, remaining = train_test_split(
                remaining,
                train_size=size,
                random_state=random_state,
                stratify=_strata(labels[remaining], size),
            )
        parts.append(np.sort(part))
    return parts


def _strata(labels: npt.NDArray[np.int64], size: int) -> npt.NDArray[np.int64] | None:
    """labels when scikit-learn can stratify a draw of size items from them, else None (a uniform draw)."""
    counts = np.unique(labels, return_counts=True)[1]
    return labels if counts.min() >= 2 and min(size, len(labels) - size) >= len(counts) else None


def part_sizes(n: int, spec: DataSpec) -> tuple[int, int, int]:
    """(train, val, test) sizes of the fraction partition of n items; each part gets at least one."""
    n_val = max(1, round(n * spec.val_fraction))
    n_test = max(1, round(n * spec.test_fraction))
    n_train = n - n_val - n_test
    if n_train < 1:
        raise ValueError(f"only {n} images: too few for non-empty train, val and test splits")
    return n_train, n_val, n_test


def partition(labels: npt.NDArray[np.int64], spec: DataSpec) -> dict[str, npt.NDArray[np.int64]]:
    """Seeded stratified train/val/test partition of all items, each part then capped by n_train etc."""
    parts = dict(zip(SPLITS, stratified_split(labels, part_sizes(len(labels), spec), spec.seed), strict=True))
    return {split: cap_split(idx, labels, getattr(spec, f"n_{split}"), spec.seed) for split, idx in parts.items()}


def cap_split(
    idx: npt.NDArray[np.int64], labels: npt.NDArray[np.int64], cap: int | None, seed: int
) -> npt.NDArray[np.int64]:
    """Stratified subsample of idx down to cap items (all of them when cap is None or not smaller)."""
    if cap is None or cap >= len(idx):
        return idx
    return idx[stratified_split(labels[idx], [cap], seed + 1)[0]]
