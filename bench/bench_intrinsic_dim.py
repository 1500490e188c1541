"""Benchmarks of `core.intrinsic_dim`: the cost of one subspace-training step, and the d90 search against a dense sweep.

Not a test: prints measured numbers.

``steps``: one training step (forward + backward) on vit_small-sized matrices, dense vs Fastfood P. Each step is
what a trial repeats: theta_d -> P theta_d -> rebuild the group's weights -> ``functional_call`` of the ViT ->
cross-entropy -> backward to theta_d. Beside it, the projection alone (P theta_d forward + backward) and two
references: the frozen backbone with only the head training, and the whole group training normally (the "full"
baseline). Medians over ``--repeats``.

``search``: planted problems of known k (``known_k_problem`` of the tests: a linear model whose inputs span a
k-dimensional subspace of its D weights, so a random d-dimensional subspace can fit the target only when d >= k; a
sample counts as correct within 0.05).
For each k: d90 of a dense sweep (every d from k/2 to 2k, step k/40 at least 1, one projection each; the smallest
d where the isotonic fit of their accuracies reaches the target), the search's d90 and trainings with the default
settings, the worst d90 when any one of its trials is made to score 0, and the same for a plain bisection that
trusts every trial (the search this package used before: the grid d_min * 2**i, then integer bisection, 16 trials).

    python bench/bench_intrinsic_dim.py [--only steps|search] [--img-size 112] [--batch 8] [--repeats 5]
        [--threads 1] [--ks 10 20 40 80]
"""

from __future__ import annotations

import argparse
import functools
import itertools
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from sklearn.isotonic import IsotonicRegression
from torch import Tensor
from torch.func import functional_call

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from core.intrinsic_dim import (  # noqa: E402
    DenseProjection,
    IdentityProjection,
    IntrinsicDimConfig,
    Projection,
    Reparam,
    Slot,
    group_slots,
    make_projection,
    search_d90,
    subspace_trial,
)
from core.intrinsic_dim.search import Evaluate  # noqa: E402
from tests.test_intrinsic_dim import known_k_problem, mse, within_tolerance  # noqa: E402 (the planted problems)

DENSE_LIMIT = 2**26  # elements of a dense P this bench is willing to allocate (256 MB)


def median_seconds(step: Callable[[], None], repeats: int) -> float:
    step()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def subspace_step(
    model: torch.nn.Module, reparam: Reparam, projection: Projection, head: dict[str, Tensor], x: Tensor, y: Tensor
) -> Callable[[], None]:
    """One training step of theta_d (and the head): project, rebuild the group, forward, backward."""
    theta = torch.zeros(projection.d, requires_grad=True)

    def step() -> None:
        weights = reparam(projection(theta)) | head
        F.cross_entropy(functional_call(model, weights, (x,)), y).backward()

    return step


def bench_steps(args: argparse.Namespace) -> None:
    """Milliseconds per subspace-training step on vit_small matrices, against the head-only step."""
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_224", pretrained=False, img_size=args.img_size, num_classes=10)
    model.eval().requires_grad_(False)
    x = torch.randn(args.batch, 3, args.img_size, args.img_size)
    y = torch.randint(0, 10, (args.batch,))
    params = dict(model.named_parameters())
    head = {name: params[name].clone().requires_grad_(True) for name in ("head.weight", "head.bias")}
    print(f"vit_small (width 384, 12 blocks), img {args.img_size}, batch {args.batch}, {args.threads} threads")

    def head_only() -> None:
        out = functional_call(model, head, (x,))
        F.cross_entropy(out, y).backward()

    base = median_seconds(head_only, args.repeats)
    print(f"{'frozen backbone, head only':44s} {base * 1e3:9.1f} ms/step   1.00x")

    for group in ("q:0", "attn:11", "attn"):
        slots = group_slots(model, group)
        reparam = Reparam(params, slots)
        D = reparam.D

        full = median_seconds(subspace_step(model, reparam, IdentityProjection(D), head, x, y), args.repeats)
        print(f"{group + f' (D={D:,}) full training':44s} {full * 1e3:9.1f} ms/step {full / base:6.2f}x")
        for d in (16, 256, 4096):
            projections: dict[str, Projection | None] = {
                "dense": DenseProjection(D, d, seed=0) if D * d <= DENSE_LIMIT else None,
                "fastfood": make_projection(D, d, seed=0, max_dense_elements=0),
            }
            for kind, projection in projections.items():
                label = f"{group} d={d} {kind}"
                if projection is None:
                    print(f"{label:44s} {'skipped':>9s}    (a dense P would hold {D * d * 4 / 2**30:.1f} GiB)")
                    continue
                theta = torch.zeros(d, requires_grad=True)
                probe = torch.randn(D)

                def project(p: Projection = projection, t: Tensor = theta, v: Tensor = probe) -> None:
                    (p(t) @ v).backward()

                alone = median_seconds(project, args.repeats)
                step = median_seconds(subspace_step(model, reparam, projection, head, x, y), args.repeats)
                timing = f"{step * 1e3:9.1f} ms/step {step / base:6.2f}x"
                print(f"{label:44s} {timing}   (P alone fwd+bwd {alone * 1e3:.1f} ms)")


def plain_bisection(evaluate: Evaluate, target: float, d_min: int, d_max: int, max_trials: int = 16) -> int | None:
    """The earlier search, which trusts every trial: walk ``d_min * 2**i`` up to the first pass, then bisect."""
    trials = 0

    def passes(d: int) -> bool:
        nonlocal trials
        trials += 1
        return evaluate(d, 0) >= target

    octaves = [d_min * 2**i for i in range(64) if d_min * 2**i <= d_max]
    low, high = None, None
    for d in octaves + ([d_max] if octaves[-1] != d_max else []):
        if trials == max_trials:
            break
        if passes(d):
            high = d
            break
        low = d
    if high is None or low is None:
        return high
    while high - low > 1 and trials < max_trials:
        mid = (low + high) // 2
        low, high = (low, mid) if passes(mid) else (mid, high)
    return high


def with_one_bad_trial(evaluate: Evaluate, bad: int) -> Evaluate:
    """``evaluate``, except that its call number ``bad`` (from 0) scores 0: an unlucky projection."""
    calls = itertools.count()
    return lambda d, repeat: 0.0 if next(calls) == bad else evaluate(d, repeat)


def ratio_range(d90s: list[int | None], reference: int | None) -> str:
    if reference is None or any(d is None for d in d90s):
        return "none"
    ratios = [d / reference for d in d90s if d is not None]
    return f"{min(ratios):.2f}-{max(ratios):.2f}x"


def planted_row(k: int, D: int, config: IntrinsicDimConfig) -> str:
    """One line of the search benchmark: the planted problem of dimension k, D weights."""
    start = time.perf_counter()
    defaults = IntrinsicDimConfig()
    model, train, val = known_k_problem(k, D)

    @functools.cache
    def accuracy(d: int | None, repeat: int = 0) -> float:
        trial = subspace_trial(
            model, [Slot("weight")], d, train, val, config, repeat=repeat, loss_fn=mse, score_fn=within_tolerance
        )
        return trial.accuracy

    target = defaults.threshold * accuracy(None)
    sweep = list(range(max(1, k // 2), 2 * k + 1, max(1, k // 40)))
    fit = IsotonicRegression().fit(sweep, [accuracy(d) for d in sweep]).predict(sweep)
    dense = next((d for d, value in zip(sweep, fit, strict=True) if value >= target), None)

    def search(evaluate: Evaluate) -> tuple[int | None, int]:
        found = search_d90(evaluate, target, d_min=defaults.d_min, d_max=D, max_trials=defaults.max_trials)
        return found.d90, len(found.trials)

    d90, trials = search(accuracy)
    robust = [search(with_one_bad_trial(accuracy, bad))[0] for bad in range(defaults.max_trials)]
    plain = plain_bisection(accuracy, target, defaults.d_min, D)
    plain_bad = [plain_bisection(with_one_bad_trial(accuracy, bad), target, defaults.d_min, D) for bad in range(16)]
    ratio = f"{d90 / dense:.2f}x" if d90 and dense else "-"
    return (
        f"{k:>5} {dense!s:>9} {d90!s:>10} {ratio:>6} {trials + 1:>9} {ratio_range(robust, dense):>12} {plain!s:>9} "
        f"{ratio_range(plain_bad, dense):>12} {accuracy.cache_info().currsize:>13} {time.perf_counter() - start:>8.0f}"
    )


def bench_search(args: argparse.Namespace) -> None:
    """d90 of the search and of a plain bisection against a dense sweep, on planted problems of known k."""
    defaults = IntrinsicDimConfig()
    config = IntrinsicDimConfig(steps=300, batch_size=128, lr=0.3, full_lr=0.05)
    D = args.planted_size
    print(
        f"planted problems: D = {D}, {config.steps} Adam steps per training, default search (d from {defaults.d_min} "
        f"to {min(defaults.d_max, D)}, at most {defaults.max_trials} subspace trials + 1 full baseline per group)"
    )
    print(
        f"{'k':>5} {'dense d90':>9} {'search d90':>10} {'ratio':>6} {'trainings':>9} {'worst, 1 bad':>12} "
        f"{'plain d90':>9} {'worst, 1 bad':>12} {'trainings run':>13} {'seconds':>8}"
    )
    for k in args.ks:
        print(planted_row(k, D, config), flush=True)
    print("ratio: search d90 / dense d90. worst, 1 bad: the range of that ratio over every position of one trial made")
    print("to score 0. trainings: per group with the default search, the full baseline included. plain: the earlier")
    print("search (up to 16 trainings). trainings run: distinct (d, projection) pairs this row trained.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["steps", "search"], default=None, help="run one of the two benchmarks")
    parser.add_argument("--img-size", type=int, default=112, help="input size (vit_small matrices at any size)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="1: stable on a shared 2-core box")
    parser.add_argument("--ks", type=int, nargs="+", default=[10, 20, 40, 80], help="planted intrinsic dimensions")
    parser.add_argument("--planted-size", type=int, default=1024, help="D, the weights of the planted problems")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.only in (None, "steps"):
        bench_steps(args)
    if args.only in (None, "search"):
        bench_search(args)


if __name__ == "__main__":
    main()
