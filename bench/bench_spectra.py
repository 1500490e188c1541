"""Time ``core.spectra.spectra_report`` on random ViT-B-shaped weights with low-rank (LoRA-like) updates.

Usage: python bench/bench_spectra.py [--repeats 3] [--depth 12] [--width 768] [--rank 8] [--threads 2]

Every block contributes q, k, v, proj (width x width), fc1 (4 width x width) and fc2 (width x 4 width): 72
matrices for ViT-B, each with a rank-``rank`` update. Prints the median wall time (time.perf_counter) of each
mode over ``repeats`` runs; writes nothing.

Modes:
    values: singular values of W0, W1 and dW only (``with_vectors=False``), from scratch.
    vectors: the full report (rotation and intruders need the singular vectors of W0 and W1), from scratch.
    values, pretrained cached / vectors, pretrained cached: the same with ``pretrained=decompose(W0s)``
        computed beforehand (the decompositions of a backbone are the same for all its runs; the app keeps them).
    vectors, full-rank updates, cached: every dW of full rank (full fine-tuning, RLRR), so no low-rank shortcut.
    decompose W0 (vectors): the cost of that cache, paid once per backbone.
    vectors, disk cache: what ``python -m core spectra RUN`` pays once the decompositions are on disk: reading
        them (``core.spectra.cached_decompositions``, here from a temporary folder) and the full report.

Targets for ViT-B on 2 cores: the full report (vectors) in <= 3 s from scratch and <= 1.5 s with the pretrained
decompositions cached. On a machine shared with other CPU-bound work, absolute times drift: compare two versions
by running them alternately and reading the ratio.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from core.spectra import cached_decompositions, decompose, spectra_report  # noqa: E402


def vit_updates(
    depth: int, width: int, rank: int | None, seed: int = 0
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Random W0 (scaled like a trained layer) and a rank-``rank`` dW (None: full rank) for every matrix of a ViT."""
    g = torch.Generator().manual_seed(seed)
    shapes = {
        "attn.qkv.q": (width, width),
        "attn.qkv.k": (width, width),
        "attn.qkv.v": (width, width),
        "attn.proj": (width, width),
        "mlp.fc1": (4 * width, width),
        "mlp.fc2": (width, 4 * width),
    }
    out = {}
    for block in range(depth):
        for name, (o, i) in shapes.items():
            w0 = torch.randn(o, i, generator=g) / i**0.5
            dw = torch.randn(o, rank, generator=g) @ torch.randn(rank, i, generator=g) * (0.01 / i**0.5)
            out[f"blocks.{block}.{name}"] = (w0, dw)
    return out


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--depth", type=int, default=12)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    updates = vit_updates(args.depth, args.width, args.rank)
    w0s = {name: w0 for name, (w0, _) in updates.items()}
    cache = decompose(w0s, with_vectors=True, keep=0)
    g = torch.Generator().manual_seed(1)
    dense = {name: (w0, torch.randn(w0.shape, generator=g) * (0.01 / w0.shape[1] ** 0.5)) for name, w0 in w0s.items()}
    spectra_report(dict(list(updates.items())[:6]), with_vectors=True)  # warm-up: LAPACK and thread pools
    disk = Path(tempfile.mkdtemp(prefix="bench_spectra_"))
    backbone = {"name": f"random_vit_{args.depth}x{args.width}", "weights": "none"}
    cached_decompositions(backbone, w0s, folder=disk)  # computed and written once
    modes: dict[str, Callable[[], object]] = {
        "values": lambda: spectra_report(updates, with_vectors=False),
        "vectors": lambda: spectra_report(updates, with_vectors=True),
        "values, pretrained cached": lambda: spectra_report(updates, with_vectors=False, pretrained=cache),
        "vectors, pretrained cached": lambda: spectra_report(updates, with_vectors=True, pretrained=cache),
        "vectors, full-rank updates, cached": lambda: spectra_report(dense, with_vectors=True, pretrained=cache),
        "decompose W0 (vectors)": lambda: decompose(w0s, with_vectors=True, keep=0),
        "read the disk cache": lambda: cached_decompositions(backbone, w0s, folder=disk),
        "vectors, disk cache": lambda: spectra_report(
            updates, with_vectors=True, pretrained=cached_decompositions(backbone, w0s, folder=disk)
        ),
    }
    print(
        f"spectra_report: {len(updates)} matrices (depth {args.depth}, width {args.width}), rank-{args.rank} "
        f"updates, {torch.get_num_threads()} threads, median of {args.repeats}"
    )
    try:
        for name, fn in modes.items():
            print(f"  {name:<36s} {median_seconds(fn, args.repeats):7.3f} s")
    finally:
        shutil.rmtree(disk, ignore_errors=True)


if __name__ == "__main__":
    main()
