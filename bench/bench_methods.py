"""Training-step cost of every method relative to the frozen backbone's own forward + backward.

The design target: a PETL step costs about what the frozen backbone's forward and backward cost (the backward
to the input is needed anyway as soon as anything below the head trains). Prints medians over a few steps and
the ratio to that baseline. Run: ``python bench/bench_methods.py [--img-size 112] [--batch 32] [--steps 5]``.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F

from core import methods
from core.backbone import BackboneSpec, build_backbone


def median_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, input_grad: bool) -> float:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4) if params else None
    times = []
    for _ in range(steps + 1):  # the first step warms up
        start = time.perf_counter()
        inp = x.clone().requires_grad_(input_grad)
        loss = F.cross_entropy(model(inp), y)
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--img-size", type=int, default=112)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, info = build_backbone(BackboneSpec(img_size=args.img_size, num_classes=10))
    model.train()
    x = torch.randn(args.batch, 3, args.img_size, args.img_size)
    y = torch.randint(0, 10, (args.batch,))
    frozen = copy.deepcopy(model).requires_grad_(False)
    base = median_step(frozen, x, y, args.steps, input_grad=True)
    print(
        f"{info.description}; {args.img_size} px ({info.num_tokens} tokens), batch {args.batch}, "
        f"{args.threads} threads, median of {args.steps} steps"
    )
    print(f"{'frozen forward+backward':<28}{base:8.3f} s   1.00x")
    for name in methods.list_methods():
        adapted = methods.apply(copy.deepcopy(model), name)
        t = median_step(adapted, x, y, args.steps, input_grad=False)
        n = methods.count_trainable(adapted, include_head=False)
        print(f"{name:<28}{t:8.3f} s  {t / base:5.2f}x   trainable {n:,}")


if __name__ == "__main__":
    main()
