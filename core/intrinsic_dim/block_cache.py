"""Running a timm ViT from the tokens entering one block, and caching those tokens for a whole measurement.

The tokens entering a group's first block do not depend on the group's weights (the model is frozen, in eval mode,
and the data has no random augmentation), so they are computed once and each training step runs only the blocks
from there on. The cache is checked against the model's own logits before it is used.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn

from core.intrinsic_dim.config import IntrinsicDimConfig
from core.intrinsic_dim.subspace import Batches, LabelledData


class FromBlock(nn.Module):
    """Runs a timm ViT from the tokens entering block ``start`` (after the last block when ``start == depth``).

    ``start=None`` runs the whole model from images. Parameter names are the model's with the prefix ``PREFIX``.
    """

    PREFIX = "model."

    def __init__(self, model: nn.Module, start: int | None) -> None:
        super().__init__()
        self.model = model
        self.start = start

    def forward(self, x: Tensor) -> Tensor:
        if self.start is None:
            return self.model(x)
        for block in list(self.model.blocks)[self.start :]:
            x = block(x)
        return self.model.forward_head(self.model.norm(x))


class _Captured(Exception):
    """Stops a forward pass once the hook has the tokens it wanted."""


def block_inputs(model: nn.Module, data: Batches, start: int, budget: int) -> tuple[tuple[Tensor, Tensor] | None, str]:
    """The tokens entering block ``start`` for every sample of ``data`` (one ordered pass), with their labels.

    Returns (None, why) when they exceed ``budget`` bytes or when running the model from those tokens does not
    reproduce its logits (a ViT whose forward does more than blocks -> norm -> forward_head).
    """
    blocks = model.blocks
    captured: list[Tensor] = []

    def keep(tokens: Tensor) -> None:
        captured.append(tokens.detach())
        raise _Captured

    if start < len(blocks):
        handle = blocks[start].register_forward_pre_hook(lambda module, args: keep(args[0]))
    else:
        handle = blocks[-1].register_forward_hook(lambda module, args, output: keep(output))
    xs, ys, used = [], [], 0
    first: Tensor | None = None
    try:
        with torch.no_grad():
            # In dataset order (unshuffled), so that batching the cache with a seed gives the batches a DataLoader
            # over the same Dataset gives with that seed.
            for x, y in data.unshuffled().epoch(0):
                first = x if first is None else first
                with contextlib.suppress(_Captured):
                    model(x)
                if not captured:
                    return None, "the model never called its blocks"
                tokens = captured.pop()
                used += tokens.numel() * tokens.element_size()
                if used > budget:
                    return None, f"the block inputs exceed the cache bound ({budget / 2**20:.0f} MiB)"
                xs.append(tokens)
                ys.append(y)
    finally:
        handle.remove()
    if first is None:
        return None, "the data is empty"
    x = torch.cat(xs)
    with torch.no_grad():
        expected = model(first)
        got = FromBlock(model, start)(x[: len(first)])
    if not torch.allclose(got, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()) + 1e-6):
        return None, "running the model from cached block inputs does not reproduce its logits"
    return (x, torch.cat(ys)), ""


class BlockInputCache:
    """Train/validation batches and the runner for a start block, cached for one start block at a time.

    Attributes:
        notes: where the cache was not used, and why (the trials then run from images).
    """

    def __init__(self, model: nn.Module, train: LabelledData, val: LabelledData, config: IntrinsicDimConfig) -> None:
        self.model, self.config = model, config
        self.device = next(model.parameters()).device
        self.from_images = (
            Batches(train, config.batch_size, True, self.device),
            Batches(val, config.batch_size, False, self.device),
        )
        self.cached_start: int | None = None
        self.cached: tuple[nn.Module, Batches, Batches] | None = None
        self.notes: list[str] = []

    def get(self, start: int) -> tuple[nn.Module, Batches, Batches]:
        """(runner, train batches, validation batches) for trials whose first adapted block is ``start``."""
        if not self.config.cache_block_inputs:
            return FromBlock(self.model, None), *self.from_images
        if self.cached_start == start and self.cached is not None:
            return self.cached
        self.cached = None  # free the previous cache before building the next
        train, why = block_inputs(self.model, self.from_images[0], start, self.config.cache_bytes)
        val = None
        if train is not None:
            used = train[0].numel() * train[0].element_size()
            val, why = block_inputs(self.model, self.from_images[1], start, self.config.cache_bytes - used)
        if train is None or val is None:
            self.notes.append(f"block {start}: trained from images ({why})")
            return FromBlock(self.model, None), *self.from_images
        batch_size = self.config.batch_size
        self.cached_start = start
        self.cached = (
            FromBlock(self.model, start),
            Batches(None, batch_size, True, self.device, train),
            Batches(None, batch_size, False, self.device, val),
        )
        return self.cached
