"""Training-step time and peak memory of every method, against the floor of what a PETL step can cost.

The floor: every backbone weight frozen, a zero shift added to the tokens after the patch embedding as the only
trainable tensor besides the head, so the backward runs through every block but not into the image. Beside it, in
the same process: PEFT's LoRA (rank 8 on the fused qkv), full fine-tuning, and every registered method at its
defaults (FacT in both variants). A step is forward, backward and an AdamW update on one fixed batch. The models
are timed round by round (one step of each per round), so a machine's changing load hits all of them alike; each
ratio is the median over the rounds of that round's ratio. On a machine shared with other work,
``OMP_NUM_THREADS=1 ... --clock cpu`` times the process's CPU time, which counts the work and not the waiting.
Inference of merged models (eval forward, no grad) is timed in the same rounds against the pretrained model's.

Peak memory: on CUDA, ``torch.cuda.max_memory_allocated`` over one step; on the CPU, the bytes resident before the
step (weights, buffers, optimizer state) plus the peak of the step's own allocations as torch's profiler records
them op by op.

Run: ``python bench/bench_methods.py`` (DINOv2-S, 112 px, batch 32), or the ViT-B case with
``--model vit_base_patch16_224 --img-size 224 --batch 8``. ``--inputs-kept`` adds, to the same rounds, FacT-TT,
KAdaptation and LoRA with every adapted linear keeping its input for the backward instead of rebuilding it from
the LayerNorm or GELU that made it (``core.methods.base.save_input``): what that rebuild costs in time and saves
in memory. ``--same-coverage`` adds rank-8 LoRA on FacT's six matrices of every block (q, k, v, proj, fc1, fc2):
PEFT's (on the fused qkv, proj, fc1 and fc2) and PETLab's (``targets="all"``), the cost of a rank-8 path on as
many linears as FacT adapts. ``--bounds`` adds what bounds the seeds' cost from below: FacT-TT at rank 1 (an
eighth of rank 8's arithmetic: what is left is the passes over the activations, which do not shrink with the rank)
and without its dropout, KAdaptation without DropConnect (its rank-n r path alone), and a dense trainable update of
the q and v slices added to the frozen weight (``dense q,v update``), which is the arithmetic DropConnect on dW
needs whatever dW is: a random mask on the update's entries leaves no low-rank form, so the gradient of the kept
entries is that of the q and v rows of the weight. Timing does not depend on the weights, so the backbone is
weightless unless ``--weights`` says otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import peft
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing it

from core import methods  # noqa: E402
from core.backbone import BackboneSpec, build_backbone  # noqa: E402
from core.methods import base as method_base  # noqa: E402
from core.methods.kadaptation import UpdatedRowsLinear  # noqa: E402

SIX = r"blocks\.\d+\.(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)"  # PEFT's regular expression: not patch_embed.proj
FLOOR, PEFT_LORA, FULL = "floor (frozen, token shift)", "PEFT LoRA r8 (qkv)", "full"
PRETRAINED = "pretrained"
SEED_METHODS = ("fact", "rlrr", "kadaptation")


@dataclass
class Timed:
    """One model in the race: a callable that runs one step, and what it measured."""

    name: str
    run: Callable[[], None]
    trainable: int | None = None
    times: list[float] = field(default_factory=list)
    peak_bytes: int | None = None


def add_token_shift(model: nn.Module) -> nn.Module:
    """The floor: freeze everything but the head, add a trainable zero shift to the patch embedding's output."""
    model.requires_grad_(False)
    model.get_classifier().requires_grad_(True)
    model.token_shift = nn.Parameter(torch.zeros(model.embed_dim))
    model.patch_embed.register_forward_hook(lambda module, inputs, out: out + model.token_shift)
    return model


def peft_lora(model: nn.Module, targets: str | list[str] = ["qkv"]) -> nn.Module:  # noqa: B006 (never mutated)
    """PEFT's LoRA, rank 8 and alpha 8 on every fused qkv (or the modules ``targets`` names, PEFT's form), with the
    head trained."""
    config = peft.LoraConfig(r=8, lora_alpha=8, target_modules=targets, lora_dropout=0.0)
    wrapped = peft.get_peft_model(model, config)
    wrapped.base_model.model.get_classifier().requires_grad_(True)
    return wrapped


class DenseRowsUpdate(nn.Module):
    """A linear whose row blocks ``rows`` get a dense trainable update (zero at first), as one product with the
    updated weight and the weight gradient of those rows only: KAdaptation's training product, minus the Kronecker
    factors and the mask."""

    def __init__(self, base: nn.Linear, rows: tuple[tuple[int, int], ...]) -> None:
        super().__init__()
        self.base, self.rows = base, rows
        height = rows[0][1] - rows[0][0]
        self.update = nn.Parameter(base.weight.new_zeros(len(rows), height, base.in_features))

    def forward(self, x: Tensor) -> Tensor:
        return UpdatedRowsLinear.apply(x, self.base.weight, self.base.bias, self.update, self.rows)


def dense_qv_update(model: nn.Module) -> nn.Module:
    """Frozen backbone, trained head, and a dense update of every block's q and v slices."""
    model.requires_grad_(False)
    model.get_classifier().requires_grad_(True)
    d = model.embed_dim
    for block in model.blocks:
        block.attn.qkv = DenseRowsUpdate(block.attn.qkv, ((0, d), (2 * d, 3 * d)))
    return model


def trainable_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def autocast(device: torch.device) -> contextlib.AbstractContextManager[object]:
    """bf16 autocast on CUDA, as the trainer runs there; nothing on the CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def training_step(model: nn.Module, x: Tensor, y: Tensor) -> Callable[[], None]:
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        with autocast(x.device):
            logits = model(x)
        F.cross_entropy(logits.float(), y).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step.optimizer = optimizer  # type: ignore[attr-defined]
    return step


def inputs_kept(step: Callable[[], None]) -> Callable[[], None]:
    """``step`` with no input rebuilt from its producer: every adapted linear keeps its input (``save_input``'s
    table of rebuildable producers emptied for the step)."""
    rebuilds = method_base._REBUILDS  # private: a measurement of its own effect

    def run() -> None:
        saved = dict(rebuilds)
        rebuilds.clear()
        try:
            step()
        finally:
            rebuilds.update(saved)

    run.optimizer = step.optimizer  # type: ignore[attr-defined]
    return run


def inference_step(model: nn.Module, x: Tensor) -> Callable[[], None]:
    model.eval()

    @torch.no_grad()
    def step() -> None:
        with autocast(x.device):
            model(x)

    return step


def resident_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> int:
    tensors = [*model.parameters(), *model.buffers()]
    if optimizer is not None:
        tensors += [t for state in optimizer.state.values() for t in state.values() if isinstance(t, Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors)


def peak_step_bytes(timed: Timed, model: nn.Module, device: torch.device) -> int:
    """Peak memory over one step (run after warm-up, so the optimizer state exists)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        timed.run()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device))
    before = resident_bytes(model, getattr(timed.run, "optimizer", None))
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        timed.run()
    current = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        current += event.self_cpu_memory_usage
        peak = max(peak, current)
    return before + peak


def timed_once(timed: Timed, device: torch.device, clock: Callable[[], float]) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = clock()
    timed.run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    timed.times.append(clock() - start)


def median_ratio(a: Timed, b: Timed) -> float:
    return statistics.median(ta / tb for ta, tb in zip(a.times, b.times, strict=True))


def build_models(
    base: nn.Module,
    x: Tensor,
    y: Tensor,
    device: torch.device,
    only: set[str] | None,
    kept: bool = False,
    same_coverage: bool = False,
    bounds: bool = False,
) -> tuple[list[tuple[Timed, nn.Module]], list[tuple[Timed, nn.Module]]]:
    """(training steps, inference steps): the references, then every registered method at its defaults (and with
    ``kept`` the `inputs_kept` variants, with ``same_coverage`` LoRA on all six matrices, with ``bounds`` the
    seeds' lower bounds)."""
    makers: list[tuple[str, Callable[[nn.Module], nn.Module]]] = [
        (FLOOR, add_token_shift),
        (PEFT_LORA, peft_lora),
        (FULL, lambda model: methods.apply(model, "full")),
    ]
    for name in methods.list_methods():
        if name == "full" or (only is not None and name not in only):
            continue
        variants = {"fact": [("fact-tt r8", {"variant": "tt"}), ("fact-tk r8", {"variant": "tk"})]}.get(
            name, [("lora r8 (q,v)" if name == "lora" else name, {})]
        )
        if name == "lora" and same_coverage:
            variants.append(("lora r8 (all six)", {"targets": "all"}))
        if name == "fact" and bounds:
            variants += [("fact-tt r1", {"variant": "tt", "rank": 1}), ("fact-tt r8, no dropout", {"dropout": 0.0})]
        if name == "kadaptation" and bounds:
            variants.append(("kadaptation, no dropout", {"dropout": 0.0}))
        for label, options in variants:
            makers.append((label, lambda model, name=name, options=options: methods.apply(model, name, **options)))
    if same_coverage:
        makers.append(("PEFT LoRA r8 (all six)", lambda model: peft_lora(model, SIX)))
    if bounds:
        makers.append(("dense q,v update", dense_qv_update))
    training = []
    for label, make in makers:
        model = make(copy.deepcopy(base)).to(device)
        training.append((Timed(label, training_step(model, x, y), trainable_count(model)), model))
        if kept and label in ("fact-tt r8", "kadaptation", "lora r8 (q,v)"):
            model = make(copy.deepcopy(base)).to(device)
            step = inputs_kept(training_step(model, x, y))
            training.append((Timed(f"{label}, inputs kept", step, trainable_count(model)), model))
    inference = [(Timed(PRETRAINED, inference_step(base, x)), base)]
    for name in (*SEED_METHODS, "lora"):
        if only is None or name in only:
            merged = methods.merge(methods.apply(copy.deepcopy(base), name))
            inference.append((Timed(f"merged {name}", inference_step(merged, x)), merged))
    return training, inference


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="vit_small_patch14_dinov2", help="timm model name")
    parser.add_argument("--weights", default="none", help="none (default), offline-default, hub or a file")
    parser.add_argument("--img-size", type=int, default=112)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (median over them)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (CUDA runs under bf16 autocast)")
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall time, or this process's CPU time: with one thread on a busy CPU, CPU time counts the work done "
        "and not the waiting",
    )
    parser.add_argument("--methods", default=None, help="comma list of method names to include (default: all)")
    parser.add_argument(
        "--inputs-kept", action="store_true", help="also FacT-TT, KAdaptation and LoRA keeping their inputs"
    )
    parser.add_argument("--same-coverage", action="store_true", help="also LoRA on FacT's six matrices of every block")
    parser.add_argument(
        "--bounds",
        action="store_true",
        help="also FacT-TT at rank 1 and without dropout, KAdaptation without DropConnect, and a dense q,v update",
    )
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    torch.manual_seed(0)
    spec = BackboneSpec(name=args.model, weights=args.weights, img_size=args.img_size, num_classes=10)
    base, info = build_backbone(spec)
    base = base.to(device)
    x = torch.randn(args.batch, 3, args.img_size, args.img_size, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)
    only = set(args.methods.split(",")) if args.methods else None
    training, inference = build_models(base, x, y, device, only, args.inputs_kept, args.same_coverage, args.bounds)
    everything = training + inference

    for _ in range(args.warmup):
        for timed, _ in everything:
            timed.run()
    for timed, model in training:
        timed.peak_bytes = peak_step_bytes(timed, model, device)
    for round_index in range(args.rounds):
        for timed, _ in everything:
            timed_once(timed, device, clock)
        print(f"round {round_index + 1} of {args.rounds} done", file=sys.stderr, flush=True)

    print(
        f"{info.description}; {args.img_size} px ({info.num_tokens} tokens), batch {args.batch}, {device}, "
        f"{torch.get_num_threads()} threads, {args.clock} clock; {args.rounds} interleaved rounds after "
        f"{args.warmup} warm-up, ratios are medians of per-round ratios"
    )
    by_name = {timed.name: timed for timed, _ in training}
    floor, lora, full = by_name[FLOOR], by_name[PEFT_LORA], by_name[FULL]
    header = f"{'training step':<28}{'trainable':>12}{'median s':>10}{'img/s':>8}{'x floor':>9}{'x PEFT':>8}"
    print(header + f"{'x full':>8}{'peak MiB':>10}{'x floor':>9}")
    for timed, _ in training:
        median = statistics.median(timed.times)
        print(
            f"{timed.name:<28}{timed.trainable:>12,}{median:>10.3f}{args.batch / median:>8.1f}"
            f"{median_ratio(timed, floor):>9.2f}{median_ratio(timed, lora):>8.2f}{median_ratio(timed, full):>8.2f}"
            f"{timed.peak_bytes / 2**20:>10.0f}{timed.peak_bytes / floor.peak_bytes:>9.2f}"
        )
    pretrained = inference[0][0]
    print(f"\n{'inference (eval, no grad)':<28}{'median s':>10}{'img/s':>8}{'x pretrained':>14}")
    for timed, _ in inference:
        median = statistics.median(timed.times)
        print(f"{timed.name:<28}{median:>10.3f}{args.batch / median:>8.1f}{median_ratio(timed, pretrained):>14.3f}")


if __name__ == "__main__":
    main()
