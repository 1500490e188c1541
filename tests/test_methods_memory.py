"""What the adapted linears keep for the backward: no activation beyond the frozen backbone's where their input can
be rebuilt from its producer (a LayerNorm or a GELU), and the same gradients as when the input is kept."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core import methods
from core.methods.base import LowRankProduct
from core.methods.fact import FacTLinear
from core.methods.kadaptation import KronLinear, UpdatedRowsLinear
from core.methods.lora import LoRALinear
from tests.conftest import tiny_vit


def _with_token_shift(model: nn.Module) -> nn.Module:
    """A trainable zero shift after the patch embedding, so that every block's backward runs (as the bench's
    floor does); the head trains."""
    model.token_shift = nn.Parameter(torch.zeros(model.embed_dim))
    model.patch_embed.register_forward_hook(lambda module, inputs, out: out + model.token_shift)
    model.get_classifier().requires_grad_(True)
    return model


def _saved_bytes(run: Callable[[], object]) -> tuple[int, set[int]]:
    """(bytes, addresses) of the distinct storages autograd keeps for the backward of ``run()``."""
    storages: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return sum(storages.values()), set(storages)


def _kept_per_sample(model: nn.Module) -> float:
    """Bytes kept for the backward per image: the difference between two batch sizes, so that weights and other
    batch-independent tensors cancel."""
    size = model.patch_embed.img_size
    kept = [_saved_bytes(lambda n=n: model(torch.randn(n, 3, *size)))[0] for n in (2, 6)]
    return (kept[1] - kept[0]) / 4


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("fact", dict(variant="tt", rank=4)),
        ("fact", dict(variant="tk", rank=2, dropout=0.0)),
        ("kadaptation", {}),
        ("kadaptation", dict(dropout=0.0, rank=2)),
        ("lora", dict(rank=2, targets="all")),
    ],
    ids=["fact-tt", "fact-tk-no-dropout", "kadaptation", "kadaptation-no-dropout", "lora-all"],
)
def test_adapted_linears_keep_no_activation_beyond_the_frozen_backbone(shape: str, name: str, options: dict) -> None:
    """Per image, FacT, LoRA and KAdaptation without dropout keep the frozen backbone's activations plus their codes
    (and FacT's dropout masks), KAdaptation with DropConnect the frozen backbone's alone: the inputs of qkv, fc1 and
    fc2 are rebuilt from norm1, norm2 and the activation, and proj's is a view of the attention output, which
    attention keeps."""
    base = tiny_vit(shape)
    floor = _with_token_shift(copy.deepcopy(base).requires_grad_(False)).train()
    model = _with_token_shift(methods.apply(copy.deepcopy(base), name, **options)).train()
    tokens = base.patch_embed.num_patches + base.num_prefix_tokens
    code_bytes = 0  # per image
    for module in model.modules():
        if isinstance(module, FacTLinear):
            per_code = 4 + (module.shared.dropout.p > 0)  # fp32 code, bool mask
            code_bytes += tokens * len(module.out_blocks) * module.shared.U.shape[0] * per_code
        if isinstance(module, LoRALinear):
            code_bytes += tokens * module.lora_A.shape[0] * module.lora_A.shape[1] * 4
        if isinstance(module, KronLinear) and module.dropout == 0:
            parts, n, _, r = module.fast_u.shape
            code_bytes += tokens * parts * n * r * 4
    assert (name == "kadaptation" and options.get("dropout") != 0) == (code_bytes == 0)
    assert _kept_per_sample(model) - _kept_per_sample(floor) == code_bytes


PRODUCERS: dict[str, Callable[[Tensor], Tensor]] = {
    "layer_norm": lambda x: F.layer_norm(x, x.shape[-1:], torch.linspace(0.5, 2, x.shape[-1]), torch.ones(x.shape[-1])),
    "layer_norm-no-affine": lambda x: F.layer_norm(x, x.shape[-1:]),
    "gelu": F.gelu,
    "gelu-tanh": lambda x: F.gelu(x, approximate="tanh"),
}


def _low_rank_product(per_block: bool, code_dropout: float, input_dropout: float) -> Callable:
    """A LowRankProduct on the q and v blocks of a qkv-shaped linear: one shared expansion or one per block, and
    the dropouts given (the same masks for a rebuilt and a kept input)."""

    def product(x: Tensor, gen: torch.Generator) -> tuple[Tensor, tuple[Tensor, ...]]:
        d, r = x.shape[-1], 2
        expand = torch.randn(2, r, d, generator=gen) if per_block else torch.randn(r, d, generator=gen)
        leaves = (torch.randn(3 * d, d, generator=gen), torch.randn(3 * d, generator=gen))
        leaves = tuple(t.requires_grad_() for t in (*leaves, torch.randn(2 * r, d, generator=gen), expand))
        torch.manual_seed(5)
        return LowRankProduct.apply(x, *leaves, (0, 2), code_dropout, input_dropout), leaves

    return product


def _updated_rows_product(x: Tensor, gen: torch.Generator) -> tuple[Tensor, tuple[Tensor, ...]]:
    d = x.shape[-1]
    weight = torch.randn(3 * d, d, generator=gen)
    bias, update = torch.randn(3 * d, generator=gen).requires_grad_(), torch.randn(2, d, d, generator=gen)
    update.requires_grad_()
    return UpdatedRowsLinear.apply(x, weight, bias, update, ((0, d), (2 * d, 3 * d))), (bias, update)


@pytest.mark.parametrize("producer", list(PRODUCERS))
@pytest.mark.parametrize(
    "product",
    # FacT: one expansion, dropout on the code; LoRA: one expansion per part, dropout on the input
    [_low_rank_product(False, 0.5, 0.0), _updated_rows_product, _low_rank_product(True, 0.0, 0.5)],
    ids=["fact", "kadaptation", "lora"],
)
def test_a_rebuilt_input_gives_the_gradients_of_a_kept_one(producer: str, product: Callable) -> None:
    """The same product on a producer's output (rebuilt in the backward, not kept) and on a copy of it (kept):
    same output and gradients; the first keeps no tensor of the input's storage, the second does."""
    source = torch.randn(2, 7, 12, generator=torch.Generator().manual_seed(0)).requires_grad_()
    results = []
    for copied in (False, True):
        x = PRODUCERS[producer](source)
        x = x.clone() if copied else x
        gen = torch.Generator().manual_seed(1)
        out: list[tuple[Tensor, tuple[Tensor, ...]]] = []
        _, addresses = _saved_bytes(lambda x=x, gen=gen, out=out: out.append(product(x, gen)))
        y, leaves = out[0]
        assert (x.untyped_storage().data_ptr() in addresses) == copied
        grad_y = torch.randn(y.shape, generator=gen)
        results.append((y, *torch.autograd.grad(y, (source, *leaves), grad_y)))
    for rebuilt, kept in zip(*results, strict=True):
        torch.testing.assert_close(rebuilt, kept)
