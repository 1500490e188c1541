"""Known-answer tests: our LoRA against PEFT's, our FacT against per-slice formulas written out by hand, the
targets syntax."""

from __future__ import annotations

import copy

import peft
import pytest
import torch

from core import methods
from core.methods import Targets
from tests.conftest import tiny_vit


def _lora_and_peft(dropout: float) -> tuple[torch.nn.Module, torch.nn.Module, torch.nn.Module]:
    """(pretrained, ours, PEFT's): LoRA r3 on every proj and fc1, the same random factors and head in both."""
    base = tiny_vit("vit")
    ours = methods.apply(copy.deepcopy(base), "lora", rank=3, alpha=6.0, targets="proj,fc1", dropout=dropout)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in ours.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    config = peft.LoraConfig(r=3, lora_alpha=6, target_modules=["attn.proj", "mlp.fc1"], lora_dropout=dropout)
    theirs = peft.get_peft_model(copy.deepcopy(base), config)
    with torch.no_grad():
        for b, block in enumerate(ours.blocks):
            for path in ("attn.proj", "mlp.fc1"):
                mine = block.get_submodule(path)
                peft_layer = theirs.base_model.model.blocks[b].get_submodule(path)
                peft_layer.lora_A["default"].weight.copy_(mine.lora_A[0])
                peft_layer.lora_B["default"].weight.copy_(mine.lora_B[0])
        theirs.base_model.model.head.load_state_dict(ours.head.state_dict())
    return base, ours, theirs


def test_lora_matches_peft_on_whole_matrices() -> None:
    base, ours, theirs = _lora_and_peft(0.0)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = theirs.eval()(x), ours.eval()(x)
    assert (expected - base(x)).abs().max() > 1e-3  # the update matters
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_lora_dropout_matches_peft_in_training() -> None:
    """PEFT's lora_dropout drops the input of the low-rank path only; ours draws the same masks for the same seed,
    so outputs and the factors' gradients agree."""
    _, ours, theirs = _lora_and_peft(0.3)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    results = []
    for model, names in ((ours, ("lora_A", "lora_B")), (theirs, ("lora_A.default", "lora_B.default"))):
        torch.manual_seed(2)
        y = model.train()(x)
        factors = [model.blocks[0].mlp.fc1.get_parameter(f"{name}.weight" if "." in name else name) for name in names]
        results.append((y, *torch.autograd.grad(y.square().sum(), factors)))
    (y_ours, grad_a, grad_b), (y_peft, peft_a, peft_b) = results
    with torch.no_grad():
        assert (y_ours - ours.eval()(x)).abs().max() > 1e-3  # the dropout matters
    torch.testing.assert_close(y_ours, y_peft, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_a[0], peft_a, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_b[0], peft_b, rtol=1e-5, atol=1e-6)


def _fact_reference_model(model: torch.nn.Module, base: torch.nn.Module, variant: str, layout: str) -> torch.nn.Module:
    """FacT's per-slice updates as the official code forms them (TT: one r x r core per slice; TK: cores from
    C x_3 P^T, with the code's fc1/fc2 reshape or the per-slice Tucker form), written out with explicit loops and
    folded into a copy of the pretrained model. Slices are numbered per block q, k, v, o, fc1 x 4, fc2 x 4 (the
    official order)."""
    f = model.petl.shared["fact"]
    U, V, s = f.U.detach(), f.V.detach(), f.scale  # U: r x d (FacTu.weight), V: d x r (FacTv.weight)
    r, d = U.shape
    ref = copy.deepcopy(base)
    for j, block in enumerate(model.blocks):
        if variant == "tt":
            S = block.attn.qkv.S.detach()
            mids = {"q": S[0], "k": S[1], "v": S[2], "o": block.attn.proj.S.detach()[0]}
            F1, F2 = (
                block.mlp.fc1.S.detach(),
                block.mlp.fc2.S.detach(),
            )  # fc1_FacTs (4r x r), fc2_FacTs (r x 4r)
        else:
            P, C = f.P.detach(), f.C.detach()
            M = torch.zeros(r, r, 12)
            for k in range(12):  # M = C x_3 P^T on the block's 12 columns
                for c in range(r):
                    M[:, :, k] += C[:, :, c] * P[c, 12 * j + k]
            mids = {m: M[:, :, i].T for i, m in enumerate("qkvo")}  # code: u(x) @ M[:, :, m]
            if layout == "official":
                fc1c, fc2c = torch.zeros(r, 4 * r), torch.zeros(r, 4 * r)
                for a in range(r):
                    for b in range(r):
                        for k in range(4):
                            fc1c[a, 4 * b + k] = M[a, b, 4 + k]
                            fc2c[a, 4 * b + k] = M[a, b, 8 + k]
                F1 = torch.cat([fc1c[:, k * r : (k + 1) * r].T for k in range(4)])  # G_k stacked
                F2 = fc2c
            else:
                F1 = torch.cat([M[:, :, 4 + k].T for k in range(4)])
                F2 = torch.cat([M[:, :, 8 + k].T for k in range(4)], dim=1)
        with torch.no_grad():
            qkv = ref.blocks[j].attn.qkv.weight
            for i, m in enumerate("qkv"):
                qkv[i * d : (i + 1) * d] += s * V @ mids[m] @ U
            ref.blocks[j].attn.proj.weight += s * V @ mids["o"] @ U
            for k in range(4):
                ref.blocks[j].mlp.fc1.weight[k * d : (k + 1) * d] += s * V @ F1[k * r : (k + 1) * r] @ U
                ref.blocks[j].mlp.fc2.weight[:, k * d : (k + 1) * d] += s * V @ F2[:, k * r : (k + 1) * r] @ U
    ref.head.load_state_dict(model.head.state_dict())
    return ref


@pytest.mark.parametrize(("variant", "layout"), [("tt", "official"), ("tk", "official"), ("tk", "tucker")])
def test_fact_forward_equals_the_per_slice_formulas(variant: str, layout: str) -> None:
    base = tiny_vit("vit")
    model = methods.apply(copy.deepcopy(base), "fact", variant=variant, rank=3, scale=3.0, tk_layout=layout).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    ref = _fact_reference_model(model, base, variant, layout).eval()
    x = torch.randn(3, 3, 32, 32, generator=gen)
    with torch.no_grad():
        got, expected = model(x), ref(x)
    assert (expected - base(x)).abs().max() > 1e-3
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_tk_official_layout_differs_from_tucker() -> None:
    """The official code's fc1/fc2 reshape of the TK cores is not the per-slice Tucker form."""
    base = tiny_vit("vit")
    outs = []
    for layout in ("official", "tucker"):
        torch.manual_seed(5)
        m = methods.apply(copy.deepcopy(base), "fact", variant="tk", rank=3, tk_layout=layout)
        with torch.no_grad():
            m.petl.shared["fact"].V.normal_()
        outs.append(m.blocks[0].mlp.fc1.delta_weight())
    assert not torch.allclose(outs[0], outs[1])


@pytest.mark.parametrize(
    ("text", "depth", "expected", "canonical"),
    [
        ("q,v", 2, {0: ("q", "v"), 1: ("q", "v")}, "q,v"),
        ("v , q", 1, {0: ("q", "v")}, "q,v"),
        ("all", 1, {0: ("q", "k", "v", "proj", "fc1", "fc2")}, "all"),
        (
            "attn:0-1;mlp:2",
            3,
            {0: ("q", "k", "v", "proj"), 1: ("q", "k", "v", "proj"), 2: ("fc1", "fc2")},
            "attn:0-1;mlp:2",
        ),
        ("q:0;v:0,2", 3, {0: ("q", "v"), 2: ("v",)}, "q:0;v:0,2"),
        ("fc1,q,k,v", 1, {0: ("q", "k", "v", "fc1")}, "q,k,v,fc1"),
    ],
)
def test_targets_parse_resolve_and_round_trip(text: str, depth: int, expected: dict, canonical: str) -> None:
    t = Targets.parse(text)
    assert t.resolve(depth) == expected
    assert str(t) == canonical
    assert Targets.parse(str(t)).resolve(depth) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "non-empty"),
        ("qq", "unknown target matrix 'qq'"),
        ("q:3-1", "end is before"),
        ("q:a", "bad block list"),
    ],
)
def test_targets_refuse_bad_text(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Targets.parse(text)
