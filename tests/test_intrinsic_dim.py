"""Known-answer tests of core.intrinsic_dim: projections against dense references, subspace training on a problem
with a known intrinsic dimension, the ViT groups and d90 search, and TwoNN/MLE on a known linear manifold."""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Iterator

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from scipy.linalg import hadamard
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from core import intrinsic_dim as idim
from core.intrinsic_dim.search import Evaluate
from core.intrinsic_dim.subspace import trial_projection
from core.methods import Targets
from tests import conftest


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """These models are tiny: one thread is faster, and immune to a busy machine's oversubscription."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------------------------------------------
# Projections
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 2, 8, 64, 512])
@pytest.mark.parametrize("radix_bits", [1, 4])
def test_fwht_is_the_sylvester_hadamard_matrix(n: int, radix_bits: int) -> None:
    H = torch.tensor(hadamard(n), dtype=torch.float64)
    x = torch.randn(3, 5, n, dtype=torch.float64)
    torch.testing.assert_close(idim.fwht(torch.eye(n, dtype=torch.float64), radix_bits), H)
    torch.testing.assert_close(idim.fwht(x, radix_bits), x @ H)
    with pytest.raises(ValueError, match="power-of-two"):
        idim.fwht(torch.zeros(6))


def fastfood_reference(p: idim.FastfoodProjection) -> Tensor:
    """The D x d matrix sum_b scale_b (H G_b Pi_b H B_b)[:D] built from dense matrices, column block b of theta."""
    L = p.L
    H = torch.tensor(hadamard(L), dtype=torch.float64)
    cols = []
    for b in range(p.blocks):
        Pi = torch.zeros(L, L, dtype=torch.float64)
        Pi[torch.arange(L), p.perm[b]] = 1.0  # (Pi x)[i] = x[perm[i]]
        M = H @ torch.diag(p.gauss[b].double()) @ Pi @ H @ torch.diag(p.sign[b].double())
        cols.append(p.scale[b].double() * M[: p.D])
    return torch.cat(cols, dim=1)[:, : p.d]


@pytest.mark.parametrize(("D", "d"), [(20, 5), (7, 3), (32, 32), (16, 40), (1, 2)])
def test_fastfood_matches_dense_formula(D: int, d: int) -> None:
    p = idim.FastfoodProjection(D, d, seed=3)
    assert p.blocks == math.ceil(d / p.L) and p.L >= D
    torch.testing.assert_close(p.matrix().double(), fastfood_reference(p), rtol=1e-5, atol=1e-6)
    theta = torch.randn(d, requires_grad=True)
    v = torch.randn(D)
    (p(theta) @ v).backward()  # autograd through the butterflies: the gradient is P^T v
    torch.testing.assert_close(theta.grad.double(), fastfood_reference(p).T @ v.double(), rtol=1e-4, atol=1e-5)


def test_projection_columns_have_unit_norm() -> None:
    dense = idim.DenseProjection(3000, 40, seed=0).matrix().norm(dim=0)
    torch.testing.assert_close(dense, torch.ones(40))
    for D in (3000, 3 * 2**12 + 100):
        p = idim.make_projection(D, 300, seed=1, max_dense_elements=0)
        assert p.kind == "fastfood" and p.D == D
        norms = p.matrix().norm(dim=0)
        assert abs(float(norms.mean()) - 1) < 0.05
        assert float(norms.min()) > 0.7 and float(norms.max()) < 1.3
    # Chunked: every coordinate has about the same variance 1/D whatever its chunk's size, as with a dense P.
    p = idim.make_projection(2**13 + 300, 512, seed=2, max_dense_elements=0)
    assert isinstance(p, idim.ConcatProjection) and [q.D for q in p.parts] == [2**13, 300]
    rows = p.matrix().square().sum(dim=1) * p.D / p.d  # about 1 per coordinate
    assert abs(float(rows[: 2**13].mean()) - 1) < 0.1 and abs(float(rows[2**13 :].mean()) - 1) < 0.1


def test_fastfood_chunks_are_powers_of_two_and_a_small_remainder() -> None:
    assert idim.fastfood_chunks(147_456) == [2**17, 2**14]  # a ViT-S q slice: no padding at all
    assert idim.fastfood_chunks(1000) == [1000]
    for D in (1, 4095, 4096, 4097, 7_077_888, 12_345_678):
        chunks = idim.fastfood_chunks(D)
        assert sum(chunks) == D and all(c & (c - 1) == 0 for c in chunks[:-1]) and chunks[-1] > 0
        assert len(chunks) <= D.bit_length()


def test_make_projection_never_materialises_a_large_p() -> None:
    assert isinstance(idim.make_projection(100, 100, 0, max_dense_elements=10_000), idim.DenseProjection)
    big = idim.make_projection(4_000_000, 50_000, 0)  # D*d = 2e11: a dense P would take 800 GB
    assert isinstance(big, idim.ConcatProjection) and big.kind == "fastfood"
    # O(D + chunks * d) bytes (int8 signs, int32 permutation, float32 Gaussians), nothing of size D x d.
    assert big.nbytes <= 9 * (4_000_000 + len(big.parts) * 50_000)
    out = big(torch.randn(50_000))
    assert out.shape == (4_000_000,) and torch.isfinite(out).all()


def test_same_seed_same_projection() -> None:
    a = idim.make_projection(80, 7, seed=5, max_dense_elements=0)
    b = idim.make_projection(80, 7, seed=5, max_dense_elements=0)
    theta = torch.randn(7)
    assert torch.equal(a(theta), b(theta))
    assert not torch.equal(a(theta), idim.make_projection(80, 7, seed=6, max_dense_elements=0)(theta))


# ----------------------------------------------------------------------------------------------------------------
# The subspace trainer on a problem with a known intrinsic dimension
# ----------------------------------------------------------------------------------------------------------------
def known_k_problem(
    k: int, D: int = 32, seed: int = 0
) -> tuple[nn.Module, tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """Linear regression whose inputs span a k-dim subspace U of the D weights.

    The loss depends on the weights only through U^T w, and the target w* = w0 + U v differs from the start there:
    a random d-dim subspace reaches it exactly when d >= k (U^T P is then onto) and leaves an error for d < k.
    """
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(D, k, generator=g)).Q
    torch.manual_seed(seed)
    model = nn.Linear(D, 1, bias=False)
    v = torch.randn(k, generator=g)
    w_star = model.weight.detach().reshape(-1) + U @ (v / v.norm())

    def data(n: int, s: int) -> tuple[Tensor, Tensor]:
        x = torch.randn(n, k, generator=torch.Generator().manual_seed(s)) @ U.T
        return x, x @ w_star

    return model, data(128, seed + 1), data(128, seed + 2)


def mse(out: Tensor, y: Tensor) -> Tensor:
    return F.mse_loss(out.squeeze(-1), y)


def within_tolerance(out: Tensor, y: Tensor) -> Tensor:
    return ((out.squeeze(-1) - y).abs() < 0.05).float()


@pytest.mark.parametrize(("k", "seed"), [(3, 1), (5, 0)])
def test_d90_of_a_known_k_dimensional_problem_is_k(k: int, seed: int) -> None:
    model, train, val = known_k_problem(k, seed=seed)
    before = model.weight.detach().clone()
    config = idim.IntrinsicDimConfig(steps=300, batch_size=128, lr=0.3, full_lr=0.05)
    slots = [idim.Slot("weight")]

    def accuracy(d: int | None, repeat: int = 0) -> float:
        trial = idim.subspace_trial(
            model, slots, d, train, val, config, repeat=repeat, loss_fn=mse, score_fn=within_tolerance
        )
        return trial.accuracy

    full = accuracy(None)
    assert full == 1.0
    search = idim.search_d90(accuracy, 0.9 * full, d_min=1, d_max=32, max_trials=config.max_trials)
    assert search.d90 is not None and k <= search.d90 <= k + 1, search
    assert all(acc < 0.5 for d, acc in search.trials if d < k)  # below k the target is out of reach by construction
    assert torch.equal(model.weight, before)


DEFAULTS = idim.IntrinsicDimConfig()


def search_with_defaults(evaluate: Evaluate, target: float = 1.0) -> idim.D90Search:
    return idim.search_d90(evaluate, target, d_min=DEFAULTS.d_min, d_max=DEFAULTS.d_max, max_trials=DEFAULTS.max_trials)


def with_one_bad_trial(evaluate: Evaluate, bad: int, corrupt: Callable[[float], float]) -> Evaluate:
    """``evaluate``, except that its call number ``bad`` (from 0) returns ``corrupt(accuracy)``."""
    calls = itertools.count()
    return lambda d, repeat: corrupt(evaluate(d, repeat)) if next(calls) == bad else evaluate(d, repeat)


def flip(accuracy: float) -> float:
    """A 0/1 accuracy turned over: a pass reported as a fail, or a fail as a pass."""
    return 1.0 - accuracy


def test_d_grid_is_half_octaves_and_pass_rates_a_monotone_fit() -> None:
    assert idim.d_grid(8, 100) == [8, 11, 16, 23, 32, 45, 64, 91, 100]
    assert idim.d_grid(1, 8) == [1, 2, 3, 4, 6, 8]
    assert idim.d_grid(5, 5) == [5]
    # Votes (accuracy >= 0.85): 8 passes; 16 fails, passes, fails; 32 passes. Non-decreasing fit: 8 and 16 pool.
    trials = [(8, 0.9), (16, 0.1), (32, 0.95), (16, 0.9), (16, 0.8)]
    assert idim.pass_rates(trials, 0.85) == pytest.approx({8: 0.5, 16: 0.5, 32: 1.0})
    assert idim.pass_rates([], 0.85) == {}


@pytest.mark.parametrize("true_d90", [8, 9, 10, 13, 100, 777, 5000, 8192])
def test_search_d90_resolves_a_step_to_a_quarter_octave(true_d90: int) -> None:
    search = search_with_defaults(lambda d, repeat: float(d >= true_d90))
    assert search.d90 is not None and true_d90 <= search.d90 <= 2**0.25 * true_d90, search
    assert search.reason == ("" if true_d90 > DEFAULTS.d_min else "reached at the smallest d tried (d_min=8): d90 <= 8")
    assert len(search.trials) <= DEFAULTS.max_trials


@pytest.mark.parametrize("true_d90", [8, 10, 23, 100, 1000, 3000, 8192])
def test_search_d90_survives_one_bad_trial_anywhere(true_d90: int) -> None:
    """Whichever trial lies, pass for fail or fail for pass, d90 stays within 1.5x, in at most max_trials trials."""
    assert DEFAULTS.max_trials <= 11  # with the full baseline, at most 12 trainings per group
    for bad in range(DEFAULTS.max_trials):
        search = search_with_defaults(with_one_bad_trial(lambda d, repeat: float(d >= true_d90), bad, flip))
        assert search.d90 is not None and true_d90 / 1.5 <= search.d90 <= 1.5 * true_d90, (bad, search)
        assert len(search.trials) <= DEFAULTS.max_trials


def test_search_d90_reports_what_limits_it() -> None:
    never = idim.search_d90(lambda d, repeat: 0.1, 1.0, d_min=1, d_max=8, max_trials=20)
    assert never.d90 is None and "no d up to 8" in never.reason
    assert [d for d, _ in never.trials].count(8) == 2  # d_max failed twice: once is not enough to give up
    first = idim.search_d90(lambda d, repeat: 1.0, 0.5, d_min=4, d_max=8, max_trials=20)
    assert first.d90 == 4 and "smallest d tried" in first.reason
    short = idim.search_d90(lambda d, repeat: float(d >= 13), 1.0, d_min=1, d_max=1024, max_trials=3)
    assert short.d90 is not None and short.d90 >= 13 and "budget" in short.reason  # an upper bound


@pytest.fixture(scope="module")
def planted_k10() -> tuple[int, Evaluate, float]:
    """The known-k problem with k = 10 (D = 64): its accuracy per (d, repeat), computed once per pair."""
    k = 10
    model, train, val = known_k_problem(k, D=64)
    config = idim.IntrinsicDimConfig(steps=300, batch_size=128, lr=0.3, full_lr=0.05)
    slots = [idim.Slot("weight")]

    @functools.cache
    def accuracy(d: int | None, repeat: int = 0) -> float:
        trial = idim.subspace_trial(
            model, slots, d, train, val, config, repeat=repeat, loss_fn=mse, score_fn=within_tolerance
        )
        return trial.accuracy

    return k, accuracy, DEFAULTS.threshold * accuracy(None)


@pytest.mark.parametrize("bad", [None, *range(DEFAULTS.max_trials)])
def test_planted_d90_survives_an_artificially_bad_trial(
    planted_k10: tuple[int, Evaluate, float], bad: int | None
) -> None:
    """Real subspace trainings with the default search settings; trial ``bad`` scores 0 whatever its d."""
    k, accuracy, target = planted_k10
    evaluate = accuracy if bad is None else with_one_bad_trial(accuracy, bad, lambda accuracy: 0.0)
    search = idim.search_d90(evaluate, target, d_min=DEFAULTS.d_min, d_max=64, max_trials=DEFAULTS.max_trials)
    assert search.d90 is not None and k / 1.5 <= search.d90 <= 1.5 * k, search
    assert len(search.trials) <= DEFAULTS.max_trials


# ----------------------------------------------------------------------------------------------------------------
# The tiny ViT
# ----------------------------------------------------------------------------------------------------------------
def tiny_vit() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=32,
        patch_size=8,
        embed_dim=48,
        depth=2,
        num_heads=3,
        num_classes=4,
    ).eval()


def colour_task(n: int, seed: int, amplitude: float = 0.1, size: int = 32) -> TensorDataset:
    """Noise images with a faint class colour: the head alone gets part of it, adapting the backbone more."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 4
    colours = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [-1.0, -1, -1]])
    x = torch.randn(n, 3, size, size, generator=g) + amplitude * colours[y][:, :, None, None]
    return TensorDataset(x, y)


def resolve(targets: str) -> list[tuple[int, tuple[str, ...]]]:
    return list(Targets.parse(targets).resolve(2).items())


def snapshot(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_groups_resolve_to_weight_slots() -> None:
    model = tiny_vit()
    assert idim.group_slots(model, "q:0") == [idim.Slot("blocks.0.attn.qkv.weight", (0, 48))]
    assert idim.group_slots(model, "k,v:1") == [
        idim.Slot("blocks.1.attn.qkv.weight", (48, 96)),
        idim.Slot("blocks.1.attn.qkv.weight", (96, 144)),
    ]
    mlp = idim.group_slots(model, "mlp")
    assert [s.param for s in mlp] == [f"blocks.{b}.mlp.{m}.weight" for b in (0, 1) for m in ("fc1", "fc2")]
    assert sum(idim.slot_sizes(model, idim.group_slots(model, "attn:1"))) == 4 * 48 * 48
    assert idim.resolve_groups("attn-mlp-blocks", 2) == ["attn:0", "mlp:0", "attn:1", "mlp:1"]
    assert idim.resolve_groups(["q, v", "fc1:1"], 2) == ["q,v", "fc1:1"]
    assert len(idim.resolve_groups("matrices-blocks", 2)) == 12
    with pytest.raises(ValueError, match="block 5"):
        idim.resolve_groups(["q:5"], 2)
    with pytest.raises(ValueError, match="unknown group scheme"):
        idim.resolve_groups("q,v", 2)


def test_subspace_training_changes_only_the_group() -> None:
    model = tiny_vit()
    model.train()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    before = snapshot(model)
    config = idim.IntrinsicDimConfig(steps=5, batch_size=32, lr=0.05)
    slots = idim.group_slots(model, "q:0")
    out = idim.subspace_trial(model, slots, 8, colour_task(64, 0), colour_task(32, 1), config, head="head")
    assert set(out.weights) == {"blocks.0.attn.qkv.weight", "head.weight", "head.bias"}
    assert out.projection == "dense" and 0.0 <= out.accuracy <= 1.0
    qkv, w0 = out.weights["blocks.0.attn.qkv.weight"], before["blocks.0.attn.qkv.weight"]
    assert not torch.equal(qkv[:48], w0[:48])  # the q rows moved
    assert torch.equal(qkv[48:], w0[48:])  # k and v rows are the model's own, bit for bit
    P = idim.make_projection(48 * 48, 8, config.seed).matrix()  # the trial's P (same seed)
    delta = (qkv[:48] - w0[:48]).reshape(-1, 1)
    theta = torch.linalg.lstsq(P, delta).solution
    torch.testing.assert_close(P @ theta, delta, rtol=1e-4, atol=1e-6)  # the move lies in the span of P
    after = snapshot(model)
    assert all(torch.equal(before[k], after[k]) for k in before)  # the model itself is never written to
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags and model.training


def test_cached_block_inputs_give_the_same_trials_as_images(shape: str) -> None:
    """Training from the cached tokens entering the group's first block is the same computation as from images
    (on both supported shapes: a plain ViT, and a DINOv2-like one with LayerScale and patch 14)."""
    model = conftest.tiny_vit(shape, num_classes=4)
    size = model.patch_embed.img_size[0]
    train, val = colour_task(96, 0, size=size), colour_task(48, 1, size=size)
    common = dict(steps=6, batch_size=32, lr=0.05, d_min=4, d_max=8, max_trials=2)
    cached, direct = (
        idim.measure_intrinsic_dimension(
            model, train, val, ["q,v:1", "fc2:1"], idim.IntrinsicDimConfig(cache_block_inputs=cache, **common)
        )
        for cache in (True, False)
    )
    assert not cached.notes  # the cache was used (and reproduced the model's logits)
    assert list(cached.curves["d"]) == list(direct.curves["d"])
    # Same batches in the same order; only float rounding of the cached tokens may differ (at most one sample).
    np.testing.assert_allclose(cached.curves["accuracy"], direct.curves["accuracy"], atol=1.01 / 48)
    assert abs(cached.head_only_accuracy - direct.head_only_accuracy) <= 1.01 / 48
    # In-memory tensors are batched exactly like a Dataset with the same seed.
    uncached = idim.IntrinsicDimConfig(cache_block_inputs=False, **common)
    tensors = idim.measure_intrinsic_dimension(model, train.tensors, val.tensors, ["q,v:1", "fc2:1"], uncached)
    np.testing.assert_allclose(tensors.curves["accuracy"], direct.curves["accuracy"])


def test_measure_d90_and_recommendation_on_a_tiny_vit() -> None:
    model = tiny_vit()
    before = snapshot(model)
    seen: list[idim.Trial] = []
    config = idim.IntrinsicDimConfig(
        steps=25, batch_size=32, lr=0.3, full_lr=1e-3, d_min=4, d_max=256, max_trials=6, threshold=0.8, top_k=2
    )
    result = idim.measure_intrinsic_dimension(
        model,
        colour_task(192, 0),
        colour_task(96, 1),
        ["attn", "mlp:1"],
        config,
        on_trial=seen.append,
    )
    curves = result.curves
    assert list(curves.columns) == ["group", "d", "accuracy", "kind", "projection", "diverged", "repeat"]
    assert [(t.group, t.d, t.accuracy, t.kind, t.repeat) for t in seen] == list(
        curves[["group", "d", "accuracy", "kind", "repeat"]].itertuples(index=False, name=None)
    )
    assert set(curves["kind"]) <= {"full", "subspace"}
    for g in result.groups:
        reported = [t for t in seen if t.group == g.group]  # the baseline first, then the subspace trials
        assert reported[0].kind == "full" and reported[0].d == g.size and reported[0].projection == "identity"
        assert all(t.kind == "subspace" for t in reported[1:]) and all(t.target == g.target for t in reported)
        rows = curves[curves["group"] == g.group]
        full = rows[rows["kind"] == "full"]
        assert len(full) == 1 and int(full["d"].iloc[0]) == g.size and g.full_accuracy == full["accuracy"].iloc[0]
        sub = rows[rows["kind"] == "subspace"]
        assert len(sub) == g.trials <= config.max_trials
        for _, runs in sub.groupby("d"):
            assert list(runs["repeat"]) == list(range(len(runs)))  # each re-run of a d has its own projection
        assert sub["d"].between(config.d_min, min(config.d_max, g.size)).all()
        if g.d90 is not None:
            assert g.target is not None
            rates = idim.pass_rates(list(zip(sub["d"], sub["accuracy"], strict=True)), g.target)
            assert g.d90 == min(d for d, rate in rates.items() if rate > 0.5)  # decided on the monotone fit
        else:
            assert g.reason
    assert result.head_only_accuracy is not None and 0.0 <= result.majority_rate <= 1.0
    if result.recommended is not None:
        reached = {(b, m) for g in result.groups if g.d90 is not None for b, ms in resolve(g.group) for m in ms}
        chosen = {(b, m) for b, ms in resolve(result.recommended) for m in ms}
        assert chosen and chosen <= reached
    assert "d90" in result.explanation and len(result.table()) == 2
    after = snapshot(model)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_group_costs_at_most_12_trainings_with_the_default_search() -> None:
    """The default d range and trial budget; few steps, so that the trials are noisy and the search re-runs some."""
    model = tiny_vit()
    config = idim.IntrinsicDimConfig(steps=4, batch_size=32)
    assert (config.d_min, config.d_max, config.max_trials) == (DEFAULTS.d_min, DEFAULTS.d_max, DEFAULTS.max_trials)
    result = idim.measure_intrinsic_dimension(model, colour_task(64, 0), colour_task(64, 1), ["attn", "q:1"], config)
    for g in result.groups:
        trainings = result.curves[result.curves["group"] == g.group]
        assert len(trainings) == g.trials + 1 <= 12 and (trainings["kind"] == "full").sum() == 1


def test_each_repeat_of_a_d_draws_another_projection() -> None:
    config = idim.IntrinsicDimConfig(max_dense_elements=0)  # Fastfood, whose seeds are derived per chunk
    first, again = (trial_projection(5000, 7, config, torch.device("cpu"), repeat) for repeat in (0, 1))
    assert torch.equal(first.matrix(), idim.make_projection(5000, 7, config.seed, max_dense_elements=0).matrix())
    assert not torch.allclose(first.matrix(), again.matrix())
    assert torch.equal(again.matrix(), trial_projection(5000, 7, config, torch.device("cpu"), 1).matrix())


def test_cancellation_returns_partial_results() -> None:
    model = tiny_vit()
    calls = {"n": 0}

    def stop() -> bool:
        calls["n"] += 1
        return calls["n"] > 12

    config = idim.IntrinsicDimConfig(steps=5, batch_size=32, d_min=4, d_max=16)
    result = idim.measure_intrinsic_dimension(
        model, colour_task(64, 0), colour_task(32, 1), "attn-mlp", config, should_stop=stop
    )
    assert result.cancelled and "cancelled" in result.explanation
    assert any("cancelled" in g.reason for g in result.groups)


def test_recommended_targets_are_a_valid_union() -> None:
    assert idim.union_targets(["attn:0", "attn:1"], 2) == "attn"
    assert idim.union_targets(["q:0", "v:0"], 2) == "q,v:0"
    text = idim.union_targets(["attn:0", "mlp:1", "q:1"], 4)
    assert Targets.parse(text).resolve(4) == {0: ("q", "k", "v", "proj"), 1: ("q", "fc1", "fc2")}
    groups = [
        idim.GroupResult("attn", 10, 0.9, 0.81, d90=8),
        idim.GroupResult("mlp", 20, 0.9, 0.81, d90=32),
        idim.GroupResult("q:1", 5, 0.9, 0.81, d90=12),
        idim.GroupResult("fc1:0", 5, 0.5, 0.45, d90=1, head_reaches_target=True),
    ]
    within, why = idim.recommend_targets(groups, 2, select="within", within=2.0)
    assert within == "attn" and "fc1:0" in why  # q:1 is inside attn; fc1:0 is left out (the head alone suffices)
    top, _ = idim.recommend_targets(groups, 2, select="top_k", top_k=2)
    assert Targets.parse(top).resolve(2) == {0: ("q", "k", "v", "proj"), 1: ("q", "k", "v", "proj")}
    none, why = idim.recommend_targets([idim.GroupResult("attn", 10)], 2)
    assert none is None and "nothing to recommend" in why


# ----------------------------------------------------------------------------------------------------------------
# Representation intrinsic dimension (the proxy)
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [3, 6])
def test_twonn_and_mle_recover_a_linear_manifold(k: int) -> None:
    g = torch.Generator().manual_seed(k)
    basis = torch.linalg.qr(torch.randn(100, k, generator=g)).Q  # a k-dim linear subspace of R^100
    points = torch.rand(1500, k, generator=g) @ basis.T + 5.0
    assert abs(idim.twonn_dimension(points) - k) <= 0.2 * k
    assert abs(idim.mle_dimension(points, k=10) - k) <= 0.2 * k


def test_representation_dimension_per_block() -> None:
    model = tiny_vit()
    table = idim.representation_dimension(model, colour_task(64, 0), max_images=64, max_points=256)
    assert list(table["block"]) == [0, 1] and (table["n_points"] == 256).all()
    assert ((table["twonn"] > 0) & (table["twonn"] <= 48 * 1.5)).all() and (table["mle"] > 0).all()
    assert "not the local intrinsic dimension" in table.attrs["quantity"]
    cls = idim.representation_dimension(model, colour_task(64, 0), points="cls", estimators=["twonn"])
    assert list(cls.columns) == ["block", "points", "n_points", "twonn"] and (cls["n_points"] == 64).all()
