"""Time ``core.spectra.spectra_report`` on random ViT-B-shaped weights with low-rank (LoRA-like) updates.

Usage: python bench/bench_spectra.py [--repeats 3] [--depth 12] [--width 768] [--rank 8] [--update-scale 1]
                                     [--threads 2] [--against PATH]

Every block contributes q, k, v, proj (width x width), fc1 (4 width x width) and fc2 (width x 4 width): 72
matrices for ViT-B, each with a rank-``rank`` update of ||dW||_F / ||W0||_F about 0.01 sqrt(rank) times
``update-scale`` (0.03 by default; one mini-benchmark run each on DINOv2-S had 0.05 to 0.19 with LoRA, 0.09 to 2.2
with FacT). Large updates bring new leading directions (intruders): from scratch, their cosines with every
pretrained direction cost all the pretrained singular vectors, which small updates do without. The header says
how many intruders the report finds.

Prints the median wall time (time.perf_counter) and process CPU time (time.process_time, all threads: less
sensitive to other work on the machine) of each mode over ``repeats`` runs; writes nothing. With ``--against
PATH`` (another checkout's root) the two versions of ``core.spectra`` run alternately, and the median of the
per-round ratios (this / other) is printed too.

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
import importlib
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import core.spectra  # noqa: E402


def vit_updates(
    depth: int, width: int, rank: int, seed: int = 0, scale: float = 1.0
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Random W0 (scaled like a trained layer) and a rank-``rank`` dW (``scale`` times 0.01 sqrt(rank) ||W0||_F)
    for every matrix of a ViT."""
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
            dw = torch.randn(o, rank, generator=g) @ torch.randn(rank, i, generator=g) * (0.01 * scale / i**0.5)
            out[f"blocks.{block}.{name}"] = (w0, dw)
    return out


def timed(fn: Callable[[], object]) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def spectra_from(root: Path) -> ModuleType:
    """``core.spectra`` of another checkout, imported beside this one's (its modules are kept out of sys.modules)."""
    ours = {name: sys.modules.pop(name) for name in list(sys.modules) if name == "core" or name.startswith("core.")}
    sys.path.insert(0, str(root))
    try:
        return importlib.import_module("core.spectra")
    finally:
        sys.path.remove(str(root))
        for name in [n for n in sys.modules if n == "core" or n.startswith("core.")]:
            del sys.modules[name]
        sys.modules.update(ours)


def modes_of(
    spectra: ModuleType, updates: dict, dense: dict, w0s: dict, folder: Path, depth: int, width: int
) -> dict[str, Callable[[], object]]:
    """Every mode timed, for one version of ``core.spectra`` (its own pretrained caches computed here)."""
    cache = spectra.decompose(w0s, with_vectors=True, keep=0)
    spectra.spectra_report(dict(list(updates.items())[:6]), with_vectors=True)  # warm-up: LAPACK and thread pools
    backbone = {"name": f"random_vit_{depth}x{width}", "weights": "none"}
    spectra.cached_decompositions(backbone, w0s, folder=folder)  # computed and written once
    report = spectra.spectra_report
    return {
        "values": lambda: report(updates, with_vectors=False),
        "vectors": lambda: report(updates, with_vectors=True),
        "values, pretrained cached": lambda: report(updates, with_vectors=False, pretrained=cache),
        "vectors, pretrained cached": lambda: report(updates, with_vectors=True, pretrained=cache),
        "vectors, full-rank updates, cached": lambda: report(dense, with_vectors=True, pretrained=cache),
        "decompose W0 (vectors)": lambda: spectra.decompose(w0s, with_vectors=True, keep=0),
        "read the disk cache": lambda: spectra.cached_decompositions(backbone, w0s, folder=folder),
        "vectors, disk cache": lambda: report(
            updates, with_vectors=True, pretrained=spectra.cached_decompositions(backbone, w0s, folder=folder)
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--depth", type=int, default=12)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--update-scale", type=float, default=1.0, help="scale of every update (see above)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--against", type=Path, help="another checkout's root: time both versions alternately")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    updates = vit_updates(args.depth, args.width, args.rank, scale=args.update_scale)
    w0s = {name: w0 for name, (w0, _) in updates.items()}
    g = torch.Generator().manual_seed(1)
    dense = {name: (w0, torch.randn(w0.shape, generator=g) * (0.01 / w0.shape[1] ** 0.5)) for name, w0 in w0s.items()}
    versions = {"this": core.spectra} | ({} if args.against is None else {"other": spectra_from(args.against)})
    folders = {name: Path(tempfile.mkdtemp(prefix=f"bench_spectra_{name}_")) for name in versions}
    summary = core.spectra.spectra_report(updates).summary
    print(
        f"spectra_report: {len(updates)} matrices (depth {args.depth}, width {args.width}), rank-{args.rank} "
        f"updates (||dW||_F / ||W0||_F {summary['update_fro_ratio'].mean():.3f} on average, "
        f"{int(summary['intruders'].sum())} intruders among the top 10 of {int((summary['intruders'] > 0).sum())} "
        f"matrices), {torch.get_num_threads()} threads, median of {args.repeats}"
        + ("" if args.against is None else f"; this checkout and {args.against} alternately")
    )
    try:
        modes = {
            name: modes_of(spectra, updates, dense, w0s, folders[name], args.depth, args.width)
            for name, spectra in versions.items()
        }
        for mode in modes["this"]:
            times: dict[str, list[tuple[float, float]]] = {name: [] for name in versions}
            for round_ in range(args.repeats):
                order = list(versions) if round_ % 2 == 0 else list(reversed(versions))
                for name in order:
                    times[name].append(timed(modes[name][mode]))
            line = f"  {mode:<36s}"
            for name, pairs in times.items():
                wall, cpu = (statistics.median(x) for x in zip(*pairs, strict=True))
                line += f" {name}: {wall:7.3f} s wall {cpu:7.3f} s CPU"
            if "other" in times:
                ratio = [
                    [t / o for t, o in zip(this, other, strict=True)]
                    for this, other in zip(times["this"], times["other"], strict=True)
                ]
                wall_ratio, cpu_ratio = (statistics.median(x) for x in zip(*ratio, strict=True))
                line += f" | this/other {wall_ratio:.3f} wall {cpu_ratio:.3f} CPU"
            print(line)
    finally:
        for folder in folders.values():
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
