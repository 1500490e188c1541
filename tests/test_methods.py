"""One table of every registered method and variant, run through the same generic checks."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.nn.functional as F

from core import methods
from core.methods.base import AdapterModule, LinearWrapper, LowRankProduct, ScaleShift, Wrapper, long_contraction
from core.methods.kadaptation import UpdatedRowsLinear, drop_connect
from core.methods.rlrr import RescaledLinear
from tests.conftest import tiny_vit

# (method, options). Every registered method must appear (guard test below).
CASES: list[tuple[str, dict]] = [
    ("fact", dict(variant="tt", rank=4, scale=2.0)),
    ("fact", dict(variant="tk", rank=4, scale=2.0)),
    ("fact", dict(variant="tk", rank=4, tk_layout="tucker")),
    ("fact", dict(variant="tt", rank=2, targets="attn:0;fc2:1")),
    ("rlrr", dict(init="official")),
    ("rlrr", dict(init="identity", targets="q,v,fc1")),
    ("kadaptation", dict()),
    ("kadaptation", dict(n=8, rank=2, dropout=0.0, targets="q,v,proj,fc1,fc2")),
    ("lora", dict(rank=4)),
    ("lora", dict(rank=2, alpha=4, targets="all:1")),
    ("adapter", dict(bottleneck=4, position="sequential")),
    ("adapter", dict(bottleneck=4, position="parallel", blocks="1")),
    ("vpt", dict(tokens=3, deep=True)),
    ("vpt", dict(tokens=3, deep=False)),
    ("ssf", dict(init="official")),
    ("ssf", dict(init="identity")),
    ("bitfit", dict()),
    ("linear", dict()),
    ("full", dict()),
]
IDS = [f"{m}-{'-'.join(f'{k}={v}' for k, v in o.items()) or 'default'}" for m, o in CASES]


def test_every_registered_method_is_in_the_table() -> None:
    assert set(methods.list_methods()) == {m for m, _ in CASES}


def _inputs(model: torch.nn.Module, n: int = 3) -> torch.Tensor:
    size = model.patch_embed.img_size
    return torch.randn(n, 3, *size, generator=torch.Generator().manual_seed(1))


def _perturb(model: torch.nn.Module, std: float = 0.05) -> None:
    """Move every trainable tensor off its initialisation (zero factors make several checks trivial)."""
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * std)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize(("name", "options"), CASES, ids=IDS)
def test_forward_shape_and_identity_at_init(shape: str, name: str, options: dict) -> None:
    base = tiny_vit(shape)
    x = _inputs(base)
    with torch.no_grad():
        reference = base(x)
        model = methods.apply(copy.deepcopy(base), name, **options).eval()
        out = model(x)
    assert out.shape == (3, 5) and torch.isfinite(out).all()
    claims = methods.get_method(name).identity_at_init(methods.adapter_state(model).config)
    if claims:
        torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-6)
    else:  # RLRR/SSF "official" init and VPT: documented non-identity at step 0
        assert _rel(out, reference) > 1e-3


def _trainable_pretrained_names(name: str, model: torch.nn.Module) -> set[str]:
    """What should train among the pretrained tensors, written independently of the library."""
    head = {n for n, _ in model.named_parameters() if n.startswith("head.")}
    if name == "full":
        return {n for n, _ in model.named_parameters()}
    if name == "bitfit":
        return head | {n for n, _ in model.named_parameters() if n.endswith(".bias")}
    return head


@pytest.mark.parametrize(("name", "options"), CASES, ids=IDS)
def test_only_intended_parameters_train_and_change(shape: str, name: str, options: dict) -> None:
    base = tiny_vit(shape)
    model = methods.apply(copy.deepcopy(base), name, **options).train()
    named = dict(model.named_parameters())
    # Wrappers keep the pretrained child under `.base`: find each pretrained tensor's new name.
    new_name_of = {}
    for n in dict(base.named_parameters()):
        parts = n.split(".")
        candidates = [n] + [".".join(parts[:i] + ["base"] + parts[i:]) for i in range(1, len(parts))]
        new_name_of[n] = next(c for c in candidates if c in named)
    expected = _trainable_pretrained_names(name, base)
    for n, new in new_name_of.items():
        assert named[new].requires_grad == (n in expected), n
    added = set(named) - set(new_name_of.values())
    assert all(named[n].requires_grad for n in added)
    before = {n: p.detach().clone() for n, p in named.items()}
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x, y = _inputs(model, 4), torch.tensor([0, 1, 2, 3])
    for _ in range(3):  # zero-initialised factors (FacT's V, LoRA's B) let the others move from step 2
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    for n, p in named.items():
        changed = not torch.equal(p.detach(), before[n])
        assert changed == p.requires_grad, f"{n}: requires_grad={p.requires_grad} but changed={changed}"


UPDATE_CASES = [(m, o) for m, o in CASES if m in ("fact", "rlrr", "kadaptation", "lora")]


@pytest.mark.parametrize(
    ("name", "options"), UPDATE_CASES, ids=[i for i, c in zip(IDS, CASES, strict=True) if c in UPDATE_CASES]
)
def test_delta_weight_matches_the_training_forward(shape: str, name: str, options: dict) -> None:
    """The activation-side forward of each update equals F.linear with its delta_weight (the merge/spectra path)."""
    model = methods.apply(tiny_vit(shape), name, **options).eval()
    _perturb(model)
    wrappers = [m for m in model.modules() if isinstance(m, LinearWrapper)]
    assert wrappers
    for wrapper in wrappers:
        x = torch.randn(2, 7, wrapper.base.in_features)
        with torch.no_grad():
            fast = wrapper(x) - wrapper.base(x)
            dense = F.linear(x, wrapper.delta_weight(), wrapper.delta_bias())
        torch.testing.assert_close(fast, dense, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("name", "options"), CASES, ids=IDS)
def test_merge_gives_same_logits_and_a_plain_model(shape: str, name: str, options: dict) -> None:
    base = tiny_vit(shape)
    model = methods.apply(copy.deepcopy(base), name, **options).eval()
    _perturb(model)
    x = _inputs(model)
    if not methods.get_method(name).mergeable:
        with pytest.raises(ValueError, match="cannot be merged"):
            methods.merge(model)
        return
    with torch.no_grad():
        adapted = model(x)
        merged = methods.merge(model)
        out = merged(x)
    assert _rel(out, adapted) <= 1e-5
    assert type(merged) is type(base)
    assert not any(isinstance(m, AdapterModule | Wrapper) for m in merged.modules())
    assert not hasattr(merged, "petl")
    assert set(merged.state_dict()) == set(base.state_dict())
    assert _rel(adapted, base(x)) > 1e-4  # the perturbed update changes the logits: matching them is not trivial


@pytest.mark.parametrize(("name", "options"), CASES, ids=IDS)
def test_adapter_file_round_trips(shape: str, name: str, options: dict, tmp_path) -> None:
    base = tiny_vit(shape)
    model = methods.apply(copy.deepcopy(base), name, **options).eval()
    _perturb(model)
    path = methods.save_adapter(model, tmp_path / "adapter.safetensors")
    restored = methods.load_adapter(copy.deepcopy(base), path).eval()
    x = _inputs(model)
    with torch.no_grad():
        assert torch.equal(restored(x), model(x))
    assert methods.read_adapter_metadata(path)["method"] == name
    n_trainable = methods.count_trainable(model, include_head=True)
    assert path.stat().st_size < 4 * n_trainable + 16_384  # trainable tensors only, fp32, plus header


# ----------------------------------------------------------------------------------------------------------------
# Published counts on ViT-B/16 (built on the meta device: shapes only, no memory, no time)
# ----------------------------------------------------------------------------------------------------------------
COUNTS = [
    ("fact", dict(variant="tt", rank=4), 8_448),
    ("fact", dict(variant="tt", rank=8), 21_504),
    ("fact", dict(variant="tt", rank=16), 61_440),
    ("fact", dict(variant="tk", rank=8), 13_952),
    ("fact", dict(variant="tk", rank=32), 86_528),
    ("rlrr", dict(), 288_768),
    ("kadaptation", dict(), 50_176),
    ("lora", dict(rank=8), 294_912),
    ("adapter", dict(bottleneck=8), 156_768),
    ("bitfit", dict(), 102_912),
    ("vpt", dict(tokens=10, deep=True), 92_160),
    ("linear", dict(), 0),
]


@pytest.mark.parametrize(("name", "options", "expected"), COUNTS, ids=[f"{m}-{e}" for m, _, e in COUNTS])
def test_trainable_counts_match_the_papers_on_vit_base(name: str, options: dict, expected: int) -> None:
    with torch.device("meta"):
        model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=100)
        methods.apply(model, name, **options)
    assert methods.count_trainable(model, include_head=False) == expected
    assert methods.count_trainable(model, include_head=True) == expected + 76_900


def test_rlrr_official_init_scales_weights_by_about_seven_percent() -> None:
    """The released RLRR code multiplies each weight by (1 + l_i c_j), std about 0.072 for in = 768."""
    with torch.device("meta"):
        model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=10)
    model = model.to_empty(device="cpu")
    torch.manual_seed(0)
    methods.apply(model, "rlrr", init="official")
    wrapper = model.blocks[0].attn.qkv
    factor = torch.outer(wrapper.scale_line[0], wrapper.scale_col[0])
    assert 0.06 < factor.std().item() < 0.085
    assert factor.abs().max().item() <= 6 / 768**0.5 + 1e-6  # sqrt(6) * sqrt(6 / 768)


@pytest.mark.parametrize("rows", [[(0, 4), (8, 12)], [(0, 4), (4, 8), (8, 12)]], ids=["q,v", "q,k,v"])
def test_rlrr_written_out_backward_matches_autograd(rows: list[tuple[int, int]]) -> None:
    """RLRR's backward, which takes grad l and grad c from the weight gradient, is the exact derivative."""
    gen = torch.Generator().manual_seed(0)

    def leaf(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64).requires_grad_()

    x, bias, line, col = leaf(2, 3, 5), leaf(12), leaf(len(rows), 4), leaf(len(rows), 5)
    weight = torch.randn(12, 5, generator=gen, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda *a: RescaledLinear.apply(*a[:1], weight, *a[1:], rows), (x, bias, line, col))


@pytest.mark.parametrize(
    "base", [torch.nn.LayerNorm(6), torch.nn.LayerNorm(6, bias=False), torch.nn.Linear(5, 6)], ids=str
)
def test_scale_shift_is_the_base_output_scaled_and_shifted(base: torch.nn.Module) -> None:
    """SSF's ``base(x) * gamma + beta``, also where it runs as a LayerNorm's folded affine: outputs and gradients."""
    torch.manual_seed(0)
    wrapper = ScaleShift(base, 6, "official")
    with torch.no_grad():
        for p in base.parameters():
            p.normal_()
    x = torch.randn(2, 3, base.weight.shape[-1])
    ours = wrapper(x)
    reference = base(x) * wrapper.scale + wrapper.shift
    torch.testing.assert_close(ours, reference)
    params = (wrapper.scale, wrapper.shift, *base.parameters())
    grads = [torch.autograd.grad(out.square().sum(), params) for out in (ours, reference)]
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("rows", [((0, 4), (8, 12)), ((0, 12),)], ids=["q,v", "whole"])
def test_kadaptation_written_out_backward_matches_autograd(rows: tuple[tuple[int, int], ...]) -> None:
    """The DropConnect product's backward (weight gradient of the updated rows only) is the exact derivative."""
    gen = torch.Generator().manual_seed(0)

    def leaf(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64).requires_grad_()

    weight = torch.randn(12, 5, generator=gen, dtype=torch.float64)
    x, bias, update = leaf(2, 3, 5), leaf(12), leaf(len(rows), rows[0][1] - rows[0][0], 5)
    assert torch.autograd.gradcheck(lambda *a: UpdatedRowsLinear.apply(a[0], weight, *a[1:], rows), (x, bias, update))


# (input chunks, output blocks, adapted blocks, one expansion per block): qkv with all slices, q and v only, fc1,
# fc2, and q and v with their own expansions (LoRA, KAdaptation).
PRODUCT_LAYOUTS = [
    (1, 3, (0, 1, 2), False),
    (1, 3, (0, 2), False),
    (1, 4, (0, 1, 2, 3), False),
    (4, 1, (0,), False),
    (1, 3, (2, 0), True),
]


def _low_rank_product_by_autograd(x, weight, bias, reduce, expand, blocks, code_dropout, input_dropout):
    """LowRankProduct's forward written with plain differentiable ops (the same dropout draws for the same seed)."""
    r, d = expand.shape[-2:]
    read = torch.native_dropout(x, input_dropout, True)[0] if input_dropout > 0 else x
    z = read @ reduce.T
    if code_dropout > 0:
        z = torch.native_dropout(z, code_dropout, True)[0]
    codes = z.unflatten(-1, (-1, r))
    update = codes @ expand if expand.dim() == 2 else torch.einsum("...kr,krd->...kd", codes, expand)
    out = F.linear(x, weight, bias).unflatten(-1, (-1, d))
    return (out + torch.zeros_like(out).index_add(-2, torch.tensor(blocks), update)).flatten(-2)


@pytest.mark.parametrize(
    ("chunks", "n_blocks", "blocks", "per_block"), PRODUCT_LAYOUTS, ids=["qkv", "q,v", "fc1", "fc2", "q,v-own"]
)
def test_low_rank_product_written_out_backward_matches_autograd(
    chunks: int, n_blocks: int, blocks: tuple[int, ...], per_block: bool
) -> None:
    gen = torch.Generator().manual_seed(0)
    r, d = 2, 4

    def leaf(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64).requires_grad_()

    x, weight, bias = leaf(2, 3, chunks * d), leaf(n_blocks * d, chunks * d), leaf(n_blocks * d)
    expand = leaf(len(blocks), r, d) if per_block else leaf(r, d)
    inputs = (x, weight, bias, leaf(len(blocks) * r, chunks * d), expand)
    assert torch.autograd.gradcheck(lambda *a: LowRankProduct.apply(*a, blocks, 0.0, 0.0), inputs)
    grad_y = torch.randn(2, 3, n_blocks * d, generator=gen, dtype=torch.float64)
    for dropouts in ((0.5, 0.0), (0.0, 0.5), (0.3, 0.5)):  # on the code (FacT), on the input (LoRA), both
        results = []
        for fn in (LowRankProduct.apply, _low_rank_product_by_autograd):
            torch.manual_seed(4)
            y = fn(*inputs, blocks, *dropouts)
            results.append((y, *torch.autograd.grad(y, inputs, grad_y)))
        for ours, reference in zip(*results, strict=True):
            torch.testing.assert_close(ours, reference)


def test_kadaptation_dropconnect_forward_is_the_frozen_output_plus_the_dropped_update() -> None:
    """Training with dropout adds the dropped update of the adapted slices to the frozen weight; same mask, same
    output, and the gradients are those of that dense product."""
    model = methods.apply(tiny_vit("vit"), "kadaptation", dropout=0.5).train()
    _perturb(model)
    wrapper = model.blocks[0].attn.qkv
    x = torch.randn(2, 7, wrapper.base.in_features)
    torch.manual_seed(3)
    fast = wrapper(x)
    fast_grads = torch.autograd.grad(fast.square().sum(), (wrapper.fast_u, wrapper.fast_v, wrapper.bias_shift))
    torch.manual_seed(3)
    P, Q = wrapper.low_rank_factors()
    dropped = drop_connect(wrapper.scale * torch.bmm(P, Q), 0.5)
    update = wrapper.place(dict(zip(wrapper.parts, dropped, strict=True)), dim=0)
    dense = wrapper.base(x) + F.linear(x, update, wrapper.delta_bias())
    dense_grads = torch.autograd.grad(dense.square().sum(), (wrapper.fast_u, wrapper.fast_v, wrapper.bias_shift))
    kept = dropped != 0
    assert 0.4 < kept.float().mean() < 0.6 and not torch.equal(fast, wrapper.eval()(x))  # the mask matters
    torch.testing.assert_close(dropped[kept], 2 * (wrapper.scale * torch.bmm(P, Q))[kept])  # kept entries: x 1/(1-p)
    torch.testing.assert_close(fast, dense, rtol=1e-5, atol=1e-6)
    for ours, reference in zip(fast_grads, dense_grads, strict=True):
        torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)


def test_drop_connect_keeps_each_entry_with_probability_1_minus_p_and_rescales_it() -> None:
    update = torch.randn(3, 40, 50, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(5)
    dropped = drop_connect(update, 0.3)
    torch.manual_seed(5)
    keep = torch.rand_like(update) >= 0.3  # the same draws
    assert 0.65 < keep.double().mean() < 0.75
    torch.testing.assert_close(dropped, torch.where(keep, update / 0.7, 0.0), rtol=1e-15, atol=0)
    (grad,) = torch.autograd.grad(dropped, update, torch.ones_like(update))
    torch.testing.assert_close(grad, keep.double() / 0.7, rtol=1e-15, atol=0)


@pytest.mark.parametrize("rows", [64, 63])  # splits into one chunk per thread / does not split evenly
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_long_contraction_is_the_transposed_product(rows: int, threads: int) -> None:
    g = torch.Generator().manual_seed(rows)
    a = torch.randn(rows, 5, generator=g, dtype=torch.float64)
    b = torch.randn(7, rows, generator=g, dtype=torch.float64).T  # not contiguous
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        got = long_contraction(a, b)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(got, a.T @ b, rtol=1e-12, atol=1e-12)
