"""Intrinsic dimension as a representation property: a cheap proxy of a *different* quantity than d90.

TwoNN (Facco et al. 2017) and the maximum-likelihood estimate (Levina and Bickel 2004) of the dimension of each
block's output tokens: the data manifold as the frozen model embeds it, not how many directions of a group's
weights training needs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import pandas as pd
import torch
from torch import Tensor, nn

from core.intrinsic_dim.subspace import Batches, LabelledData, frozen
from core.methods.base import inspect_vit

REPRESENTATION_ID_LABEL = (
    "intrinsic dimension of the block's output representation (a property of the data manifold as the frozen model "
    "embeds it), not the local intrinsic dimension d90 of the loss landscape"
)


def _neighbour_distances(x: Tensor, k: int, chunk: int = 1024) -> Tensor:
    """Distances to the k nearest other points, ascending, shape (N, k); computed in float64, chunked."""
    x = x.to(torch.float64)
    out = []
    for i in range(0, len(x), chunk):
        dist = torch.cdist(x[i : i + chunk], x)
        rows = torch.arange(i, min(i + chunk, len(x)))
        dist[rows - i, rows] = float("inf")  # not its own neighbour
        out.append(dist.topk(k, dim=1, largest=False).values)
    return torch.cat(out)


def twonn_dimension(x: Tensor, discard: float = 0.1) -> float:
    """TwoNN estimate (Facco et al. 2017) of the intrinsic dimension of points ``x`` (N, features).

    mu = r2 / r1 (second over first nearest-neighbour distance) follows a Pareto law with exponent the dimension;
    fit ``-log(1 - F(mu)) = dim * log(mu)`` through the origin on the empirical CDF, dropping the largest
    ``discard`` fraction of mu (noise-dominated). Points with a duplicate (r1 = 0) are left out.
    """
    r = _neighbour_distances(x, 2)
    r = r[r[:, 0] > 0]
    if len(r) < 3:
        raise ValueError("TwoNN needs at least 3 distinct points")
    mu = (r[:, 1] / r[:, 0]).sort().values
    n = len(mu)
    keep = max(2, int(n * (1 - discard)))
    cdf = torch.arange(n, dtype=torch.float64)[:keep] / n
    xs, ys = mu[:keep].log(), -torch.log1p(-cdf)
    return float((xs * ys).sum() / (xs * xs).sum())


def mle_dimension(x: Tensor, k: int = 10) -> float:
    """Levina-Bickel maximum-likelihood estimate with k neighbours, averaged as MacKay and Ghahramani suggest
    (the mean of the per-point inverse estimates, inverted)."""
    r = _neighbour_distances(x, k)
    r = r[r[:, 0] > 0]
    if len(r) < 2 or k < 2:
        raise ValueError("the MLE estimate needs at least 2 distinct points and k >= 2")
    inverse = torch.log(r[:, -1:] / r[:, :-1]).sum(dim=1) / (k - 1)  # 1 / m_k(x) per point
    return float(1.0 / inverse.mean())


def representation_dimension(
    model: nn.Module,
    data: LabelledData,
    *,
    points: Literal["tokens", "cls", "mean"] = "tokens",
    estimators: Sequence[Literal["twonn", "mle"]] = ("twonn", "mle"),
    max_images: int = 256,
    max_points: int = 2000,
    k: int = 10,
    seed: int = 0,
    batch_size: int = 64,
) -> pd.DataFrame:
    """Intrinsic dimension of each block's output representation: a fast proxy, NOT the local intrinsic dimension.

    This measures the data manifold as the frozen model embeds it after each block (forward hooks on
    ``model.blocks[i]``), not how many directions of a group's weights training needs; the two can disagree.

    Args:
        points: what one point is: ``tokens`` (random tokens of each image, the same tokens at every block, about
            ``max_points`` in all), ``cls`` (the first prefix token per image) or ``mean`` (the mean of the patch
            tokens per image).
        max_images: images read from ``data`` (in order).

    Returns:
        One row per block: block, points, n_points, and one column per estimator; ``attrs["quantity"]`` says what
        it measures.
    """
    arch = inspect_vit(model)
    if points == "cls" and arch.num_prefix_tokens < 1:
        raise ValueError("points='cls' needs a model with a class token; use 'mean' or 'tokens'")
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    per_image = max(1, -(-max_points // max_images))
    outputs: list[list[Tensor]] = [[] for _ in range(arch.depth)]
    chosen: list[Tensor | None] = [None]  # token indices of the current batch, shared by every block

    def pick(tokens: Tensor) -> Tensor:
        if points == "cls":
            return tokens[:, 0]
        if points == "mean":
            return tokens[:, arch.num_prefix_tokens :].mean(dim=1)
        if chosen[0] is None:
            scores = torch.rand(tokens.shape[0], tokens.shape[1], generator=generator)
            chosen[0] = scores.argsort(dim=1)[:, : min(per_image, tokens.shape[1])].to(tokens.device)
        idx = chosen[0]
        return tokens.gather(1, idx[..., None].expand(-1, -1, tokens.shape[-1])).reshape(-1, tokens.shape[-1])

    def hook(i: int) -> Callable[[nn.Module, tuple[Tensor, ...], Tensor], None]:
        return lambda module, args, output: outputs[i].append(pick(output.detach()).float().cpu())

    handles = [block.register_forward_hook(hook(i)) for i, block in enumerate(model.blocks)]
    seen = 0
    try:
        with frozen(model), torch.no_grad():
            for x, _ in Batches(data, batch_size, False, device).epoch(seed):
                x = x[: max_images - seen]
                chosen[0] = None
                model(x)
                seen += len(x)
                if seen >= max_images:
                    break
    finally:
        for h in handles:
            h.remove()
    rows = []
    for i, chunks in enumerate(outputs):
        feats = torch.cat(chunks)[:max_points]
        row: dict[str, object] = {"block": i, "points": points, "n_points": len(feats)}
        for name in estimators:
            row[name] = twonn_dimension(feats) if name == "twonn" else mle_dimension(feats, k)
        rows.append(row)
    table = pd.DataFrame(rows)
    table.attrs["quantity"] = REPRESENTATION_ID_LABEL
    return table
