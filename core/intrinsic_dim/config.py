"""The settings of an intrinsic-dimension measurement."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class IntrinsicDimConfig:
    """How to measure; JSON-serialisable.

    Attributes:
        steps: Adam steps per trial (each trial starts from theta_d = 0 and the same fresh head).
        batch_size: samples per step.
        lr: Adam learning rate of theta_d. P has unit-norm columns, so one step moves the weights by about
            ``lr * sqrt(d)`` in norm: the subspace needs a larger rate than the whole group.
        full_lr: Adam learning rate of the group's weights in the full-training baseline.
        head_lr: Adam learning rate of the fresh head (both kinds).
        cosine: decay the learning rates to 0 over the steps (cosine); otherwise constant. Decaying makes the
            end-of-trial accuracy less noisy, which matters when trials are compared against a threshold.
        seed: seeds the head, P, and the batch order (the same in every trial).
        threshold: d90 is the smallest d whose trials reach ``threshold`` x the full-training accuracy.
        d_min: first d of the half-octave grid ``d_min * 2**(i/2)`` the search bisects.
        d_max: last d of the grid (capped at the group's size D, which is added to the grid when it is smaller).
        max_trials: subspace trials per group, re-runs included; the full baseline is one more training, so a
            group costs at most ``max_trials + 1`` trainings. 11 lets the search over the default range survive one
            bad trial and still resolve d90 to within a factor 2**(1/4).
        max_dense_elements: the largest D * d for which P is a dense matrix; Fastfood above it.
        cache_block_inputs: train from the cached input tokens of a group's first block (exact for a frozen model
            in eval mode and deterministic data: no random augmentation) instead of from images each step.
        cache_bytes: memory bound of that cache (train and validation together); beyond it, no cache.
        select: how the recommended targets are chosen: the ``top_k`` lowest d90, or every group ``within`` a factor
            of the lowest d90.
        top_k: groups kept by ``select="top_k"``.
        within: factor of ``select="within"``.
    """

    steps: int = 100
    batch_size: int = 32
    lr: float = 1e-2
    full_lr: float = 1e-4
    head_lr: float = 1e-2
    cosine: bool = True
    seed: int = 0
    threshold: float = 0.9
    d_min: int = 8
    d_max: int = 8192
    max_trials: int = 11
    max_dense_elements: int = 2**24
    cache_block_inputs: bool = True
    cache_bytes: int = 2**30
    select: Literal["top_k", "within"] = "within"
    top_k: int = 1
    within: float = 2.0

    def __post_init__(self) -> None:
        checks = [
            (self.steps >= 1, f"steps={self.steps} must be at least 1"),
            (self.batch_size >= 1, f"batch_size={self.batch_size} must be at least 1"),
            (min(self.lr, self.full_lr, self.head_lr) > 0, "lr, full_lr and head_lr must be positive"),
            (0 < self.threshold <= 1, f"threshold={self.threshold} must be in (0, 1]"),
            (1 <= self.d_min <= self.d_max, f"need 1 <= d_min <= d_max, got d_min={self.d_min}, d_max={self.d_max}"),
            (self.max_trials >= 1, f"max_trials={self.max_trials} must be at least 1"),
            (self.max_dense_elements >= 0, "max_dense_elements must be >= 0"),
            (self.cache_bytes >= 0, "cache_bytes must be >= 0"),
            (self.select in ("top_k", "within"), f"select={self.select!r} must be 'top_k' or 'within'"),
            (self.top_k >= 1, f"top_k={self.top_k} must be at least 1"),
            (self.within >= 1, f"within={self.within} must be >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
