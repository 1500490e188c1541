"""Seeded, stratified train / validation / test partitions and the caps on each split."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from core.data.spec import SPLITS, DataSpec


def stratified_split(labels: npt.ArrayLike, sizes: Sequence[int], seed: int) -> list[npt.NDArray[np.int64]]:
    """Draw disjoint index sets of the given sizes, each with the class proportions of ``labels``.

    Each class's share of a part is rounded by largest remainder (ties broken at random), within what is left
    of that class after the earlier parts. Indices come back sorted.

    Args:
        labels: Class of each item, shape (N,).
        sizes: Size of each part; their sum may not exceed N.
        seed: Decides which items of each class go where.
    """
    labels = np.asarray(labels, dtype=np.int64)
    if sum(sizes) > len(labels) or min(sizes, default=0) < 0:
        raise ValueError(f"cannot draw parts of sizes {list(sizes)} from {len(labels)} items")
    rng = np.random.default_rng([seed, 7])
    classes, counts = np.unique(labels, return_counts=True)
    pools = [rng.permutation(np.flatnonzero(labels == c)) for c in classes]  # what is left of each class
    share = counts / counts.sum()
    parts: list[npt.NDArray[np.int64]] = []
    for size in sizes:
        left = np.array([len(p) for p in pools])
        quota = size * share
        take = np.minimum(np.floor(quota).astype(np.int64), left)
        # Hand out the remaining units by largest fractional part, then round-robin to any class with room.
        order = np.lexsort((rng.random(len(classes)), -(quota - np.floor(quota))))
        while take.sum() < size:
            for c in order:
                if take.sum() < size and take[c] < left[c]:
                    take[c] += 1
        parts.append(np.sort(np.concatenate([p[:k] for p, k in zip(pools, take, strict=True)])))
        pools = [p[k:] for p, k in zip(pools, take, strict=True)]
    return parts


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
