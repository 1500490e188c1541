"""Time one subspace-training step (forward + backward) on vit_small-sized matrices, dense vs Fastfood P.

Not a test: prints medians. Each step is what a trial of `core.intrinsic_dim` repeats: theta_d -> P theta_d ->
rebuild the group's weights -> ``functional_call`` of the ViT -> cross-entropy -> backward to theta_d. Beside it,
the projection alone (P theta_d forward + backward) and two references: the frozen backbone with only the head
training, and the whole group training normally (the "full" baseline).

    python bench/bench_intrinsic_dim.py [--img-size 112] [--batch 8] [--repeats 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import timm
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call

from core.intrinsic_dim import (
    DenseProjection,
    IdentityProjection,
    Projection,
    Reparam,
    group_slots,
    make_projection,
)

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--img-size", type=int, default=112, help="input size (vit_small matrices at any size)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="1: stable on a shared 2-core box")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
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


if __name__ == "__main__":
    main()
