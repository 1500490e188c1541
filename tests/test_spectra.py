"""Known-answer tests of core.spectra: matrices built from chosen singular values and vectors."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import Tensor

from core.spectra import (
    MatrixSVD,
    _lapack,
    cached_decompositions,
    decompose,
    effective_rank,
    intruder_dimensions,
    parse_matrix_name,
    relative_change,
    singular_values,
    spectra_report,
    stable_rank,
    subspace_rotation,
    weights_key,
)
from core.spectra import cache as spectra_cache
from core.spectra.engine import PretrainedBasis, eigh_descending


def orthonormal(rows: int, cols: int, seed: int) -> Tensor:
    """A random rows x cols matrix with orthonormal columns (QR of a Gaussian), float64."""
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(rows, cols, generator=g, dtype=torch.float64)).Q


def with_spectrum(s: Tensor, rows: int, cols: int, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """W = U diag(s) V^T with random orthonormal U, V; returns (W, U, V) in float64."""
    u, v = orthonormal(rows, len(s), seed), orthonormal(cols, len(s), seed + 1)
    return u @ torch.diag(s.double()) @ v.T, u, v


def spread(n: int, top: float = 10.0, bottom: float = 1.0) -> Tensor:
    """n well-separated singular values from top down to bottom (geometric)."""
    return torch.logspace(math.log10(top), math.log10(bottom), n, dtype=torch.float64)


# ----------------------------------------------------------------------------------------------------------------
# Names and singular values
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("blocks.3.attn.qkv.q", (3, "q")),
        ("blocks.11.mlp.fc2", (11, "fc2")),
        ("model.blocks.0.attn.proj", (0, "proj")),
        ("patch_embed.proj", (None, "proj")),
        ("myblocks.2.fc", (None, "fc")),
    ],
)
def test_parse_matrix_name(name: str, expected: tuple[int | None, str]) -> None:
    assert parse_matrix_name(name) == expected


@pytest.mark.parametrize(("rows", "cols"), [(24, 24), (40, 16), (16, 40)])
def test_singular_values_match_the_chosen_ones(rows: int, cols: int) -> None:
    s = torch.tensor([9.0, 7.5, 4.0, 2.0, 1.0, 0.5, 0.25, 0.0] + [0.0] * (min(rows, cols) - 8), dtype=torch.float64)
    w, _, _ = with_spectrum(s, rows, cols)
    got = singular_values(w.float())
    assert got.dtype == torch.float64 and got.shape == (min(rows, cols),)
    torch.testing.assert_close(got, s, atol=1e-5, rtol=1e-5)
    svd = decompose({"w": w.float()})["w"]
    torch.testing.assert_close(svd.S, s, atol=1e-5, rtol=1e-5)
    assert svd.U is not None and svd.V is not None and svd.basis is not None
    r = min(rows, cols)
    assert svd.U.shape == (rows, r) and svd.V.shape == (cols, r) and svd.basis.shape == (r, r)
    for q in (svd.U, svd.V):  # orthonormal, the completion of the null directions included
        torch.testing.assert_close(q.T @ q, torch.eye(r, dtype=torch.float64), atol=1e-9, rtol=0)
    torch.testing.assert_close(svd.U @ torch.diag(svd.S) @ svd.V.T, w.float().double(), atol=1e-5, rtol=0)
    torch.testing.assert_close(svd.basis, svd.U if rows <= cols else svd.V)


def test_batched_singular_values_equal_one_by_one() -> None:
    mats = torch.stack([with_spectrum(spread(12, 5.0 + i), 20, 12, seed=i)[0].float() for i in range(4)])
    batched = singular_values(mats)
    for i in range(4):
        torch.testing.assert_close(batched[i], singular_values(mats[i]), atol=1e-6, rtol=1e-6)


def test_half_precision_inputs_are_analysed_in_float64() -> None:
    w, _, _ = with_spectrum(torch.tensor([4.0, 2.0, 1.0], dtype=torch.float64), 16, 8)
    s = singular_values(w.to(torch.bfloat16))
    assert s.dtype == torch.float64
    torch.testing.assert_close(s[:3], torch.tensor([4.0, 2.0, 1.0], dtype=torch.float64), atol=0.05, rtol=0.02)


# ----------------------------------------------------------------------------------------------------------------
# Rotation, intruders, ranks on hand-made inputs
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("theta", [1e-3, 0.5, 17.0, 45.0, 80.0, 90.0])
def test_rotation_in_one_plane_gives_one_principal_angle(theta: float) -> None:
    basis = orthonormal(30, 6, seed=3)
    u0, w = basis[:, :4], basis[:, 5]
    u1 = u0.clone()
    t = math.radians(theta)
    u1[:, 2] = math.cos(t) * u0[:, 2] + math.sin(t) * w  # rotate one basis vector out of the subspace
    rot = subspace_rotation(u0, u1, k=4)
    assert rot.angles_deg.shape == (4,)
    torch.testing.assert_close(rot.angles_deg[:3], torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(rot.angles_deg[3], torch.tensor(theta, dtype=torch.float32), atol=1e-4, rtol=1e-5)
    assert float(rot.overlap) == pytest.approx((3 + math.cos(t) ** 2) / 4, abs=1e-6)


def test_rotation_within_the_subspace_is_no_rotation() -> None:
    u0 = orthonormal(30, 5, seed=4)
    mix = orthonormal(5, 5, seed=5)  # any orthogonal mixing of the same 5 vectors spans the same subspace
    rot = subspace_rotation(u0, u0 @ mix, k=5)
    assert float(rot.angles_deg.abs().max()) < 1e-5
    assert float(rot.overlap) == pytest.approx(1.0, abs=1e-7)


def test_rotation_is_batched() -> None:
    u0 = torch.stack([orthonormal(20, 3, seed=i) for i in range(3)])
    u1 = torch.stack([orthonormal(20, 3, seed=10 + i) for i in range(3)])
    rot = subspace_rotation(u0, u1, k=3)
    assert rot.angles_deg.shape == (3, 3) and rot.overlap.shape == (3,)
    for i in range(3):
        single = subspace_rotation(u0[i], u1[i], k=3)
        torch.testing.assert_close(rot.angles_deg[i], single.angles_deg)


def test_intruder_dimensions_on_hand_made_vectors() -> None:
    u0 = torch.eye(8, dtype=torch.float64)  # pretrained basis: the axes
    u1 = torch.eye(8, dtype=torch.float64)[:, [0, 1, 2]].clone()
    u1[:, 1] = torch.tensor([0, 1, 1, 1, 1, 0, 0, 0], dtype=torch.float64) / 2  # cos 0.5 with four axes
    u1[:, 2] = torch.tensor([0, 0, 0, 0, 0, 1, 1, 1], dtype=torch.float64) / math.sqrt(3)  # cos 0.577
    s1 = torch.tensor([3.0, 2.0, 1.0])
    intr = intruder_dimensions(u0, u1, s1, k=3, eps=0.55)
    assert intr.count == 1 and intr.indices.tolist() == [1] and intr.values.tolist() == [2.0]
    torch.testing.assert_close(intr.max_cos, torch.tensor([1.0, 0.5, 1 / math.sqrt(3)], dtype=torch.float64))
    assert intruder_dimensions(u0, u1, s1, k=3, eps=0.6).indices.tolist() == [1, 2]
    assert intruder_dimensions(u0, u1, s1, k=1, eps=0.6).count == 0


def test_effective_and_stable_rank_by_hand() -> None:
    s = torch.tensor([3.0, 2.0, 1.0, 0.0, 0.0])
    # p = (1/2, 1/3, 1/6): H = ln2/2 + ln3/3 + ln6/6 = 1.011404, exp(H) = 2.749459
    assert float(effective_rank(s)) == pytest.approx(2.749459, abs=1e-5)
    assert float(stable_rank(s)) == pytest.approx(14 / 9, abs=1e-6)
    assert float(effective_rank(torch.tensor([2.0, 2.0, 2.0, 2.0, 0.0]))) == pytest.approx(4.0, abs=1e-5)
    zero = torch.zeros(5)
    assert float(effective_rank(zero)) == 0.0 and float(stable_rank(zero)) == 0.0
    batched = effective_rank(torch.stack([s, zero]))
    assert batched.shape == (2,) and not bool(batched.isnan().any())


def test_relative_change_handles_zero_pretrained_values() -> None:
    rel = relative_change(torch.tensor([2.0, 4.0, 0.0, 0.0]), torch.tensor([3.0, 3.0, 0.0, 1.0]))
    assert rel[:3].tolist() == [0.5, -0.25, 0.0] and math.isnan(float(rel[3]))


# ----------------------------------------------------------------------------------------------------------------
# The low-rank shortcut for updates
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("rows", "cols", "rank"), [(256, 256, 5), (512, 128, 64), (128, 512, 3), (256, 256, 100)])
def test_update_singular_values_equal_the_full_svd(rows: int, cols: int, rank: int) -> None:
    g = torch.Generator().manual_seed(rank)
    d = torch.randn(rows, rank, generator=g) @ torch.randn(rank, cols, generator=g) * 1e-3
    w0 = torch.randn(rows, cols, generator=g)
    values = spectra_report({"w": (w0, d)}, with_vectors=False).values
    got = torch.tensor(values.loc[values["which"] == "update", "value"].to_numpy())
    ref = torch.linalg.svdvals(d.double())  # LAPACK's SVD: an independent reference
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, atol=5e-6 * float(ref[0]), rtol=0)
    assert int((got > 1e-4 * ref[0]).sum()) == rank


# ----------------------------------------------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------------------------------------------
def vit_like_updates(seed: int = 0, width: int = 16) -> dict[str, tuple[Tensor, Tensor]]:
    """A two-block ViT-shaped set of (W0, dW): q/k/v/proj square, fc1 tall, fc2 wide, low-rank updates; k's is 0."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"attn.qkv.q": (width, width), "attn.qkv.k": (width, width), "attn.qkv.v": (width, width),
              "attn.proj": (width, width), "mlp.fc1": (4 * width, width), "mlp.fc2": (width, 4 * width)}  # fmt: skip
    out = {}
    for block in range(2):
        for name, (o, i) in shapes.items():
            w0 = torch.randn(o, i, generator=g)
            dw = (
                torch.zeros(o, i)
                if name.endswith(".k")
                else torch.randn(o, 2, generator=g) @ torch.randn(2, i, generator=g) * 0.1
            )
            out[f"blocks.{block}.{name}"] = (w0, dw)
    return out


def test_report_tables_have_the_documented_shape() -> None:
    updates = vit_like_updates()
    report = spectra_report(updates, k=4)
    s = report.summary
    assert s["name"].tolist() == list(updates)
    assert s["block"].tolist() == [0] * 6 + [1] * 6
    assert s["kind"].tolist()[:6] == ["q", "k", "v", "proj", "fc1", "fc2"]
    assert s.loc[4, ["out_features", "in_features"]].tolist() == [64, 16]
    n_values = sum(min(w.shape) for w, _ in updates.values())
    assert len(report.values) == 3 * n_values and set(report.values["which"]) == {"pretrained", "tuned", "update"}
    assert len(report.changes) == n_values
    assert len(report.angles) == 12 * 2 * 4 and set(report.angles["side"]) == {"left", "right"}
    assert len(report.intruders) == 12 * 4 and report.intruders["is_intruder"].dtype == bool
    assert (s["update_rank"] == [2, 0, 2, 2, 2, 2] * 2).all()
    assert not s.drop(columns=["block"]).isna().any().any()
    first = report.values[(report.values["name"] == "blocks.0.attn.qkv.q") & (report.values["which"] == "tuned")]
    w0, dw = updates["blocks.0.attn.qkv.q"]
    np.testing.assert_allclose(first["value"].to_numpy(), singular_values(w0 + dw).numpy(), rtol=1e-5, atol=1e-5)


def test_values_only_report_leaves_vector_metrics_empty() -> None:
    report = spectra_report(vit_like_updates(), k=4, with_vectors=False)
    assert report.summary["left_overlap"].isna().all() and report.summary["intruders"].isna().all()
    assert report.angles.empty and report.intruders.empty
    full = spectra_report(vit_like_updates(), k=4)
    pd.testing.assert_frame_equal(report.values, full.values, atol=1e-5, rtol=1e-5)


def test_zero_update_gives_no_change_no_rotation_no_intruders() -> None:
    w0, _, _ = with_spectrum(spread(12), 20, 12)
    report = spectra_report({"blocks.0.mlp.fc1": (w0.float(), torch.zeros(20, 12))}, k=5)
    row = report.summary.iloc[0]
    assert row["intruders"] == 0 and row["update_rank"] == 0
    assert row["rel_change_max_abs"] == 0.0 and row["rel_change_mean_abs"] == 0.0
    assert row["update_fro_ratio"] == 0.0 and row["update_effective_rank"] == 0.0 and row["update_stable_rank"] == 0.0
    assert row["left_max_angle_deg"] < 1e-6 and row["right_max_angle_deg"] < 1e-6
    assert row["left_overlap"] == pytest.approx(1.0, abs=1e-7)
    assert not report.summary.drop(columns=["block"]).isna().any().any()
    assert (report.values.loc[report.values["which"] == "update", "value"] == 0).all()
    assert (report.changes["relative_change"] == 0).all()


def test_rotating_the_left_vectors_is_seen_on_the_left_only() -> None:
    s = spread(10)
    w0, u0, _ = with_spectrum(s, 10, 10, seed=7)
    theta = math.radians(25.0)
    a, b = u0[:, 1], u0[:, 7]  # rotate in the plane of the 2nd (inside top-4) and 8th (outside) left vectors
    rot = torch.eye(10, dtype=torch.float64) + (math.cos(theta) - 1) * (torch.outer(a, a) + torch.outer(b, b))
    rot += math.sin(theta) * (torch.outer(b, a) - torch.outer(a, b))
    w1 = rot @ w0  # same singular values and right vectors, left vectors rotated
    report = spectra_report({"w": (w0.float(), (w1 - w0).float())}, k=4)
    row = report.summary.iloc[0]
    assert row["left_max_angle_deg"] == pytest.approx(25.0, abs=1e-3)
    assert row["left_overlap"] == pytest.approx((3 + math.cos(theta) ** 2) / 4, abs=1e-5)
    assert row["right_max_angle_deg"] < 1e-2
    assert row["rel_change_max_abs"] < 1e-5
    assert row["update_rank"] == 2  # R - I acts on a plane


@pytest.mark.parametrize(("rows", "cols"), [(24, 24), (48, 16), (96, 40), (40, 96)])
def test_a_new_big_direction_is_exactly_one_intruder(rows: int, cols: int) -> None:
    r = min(rows, cols)
    s0 = spread(r, 10.0, 1.0)
    w0, u0, v0 = with_spectrum(s0, rows, cols, seed=11)
    k = 6
    # x: an even mix of the 16 last left vectors (|cos| 1/4 with each) or, for a tall matrix, outside span(U0);
    # y: an even mix of right vectors outside the top k. Both orthogonal to every top-k pretrained vector.
    if rows <= cols:
        x = u0[:, r - 16 :].sum(1) / 4
    else:
        x = torch.linalg.qr(torch.cat([u0, torch.randn(rows, 1, dtype=torch.float64)], 1)).Q[:, -1]
    y = v0[:, k:].sum(1) / math.sqrt(r - k)
    dw = 30.0 * torch.outer(x, y)
    report = spectra_report({"w": (w0.float(), dw.float())}, k=k, intruder_threshold=0.5)
    row = report.summary.iloc[0]
    assert row["intruders"] == 1 and row["update_rank"] == 1
    hits = report.intruders[report.intruders["is_intruder"]]
    assert hits["index"].tolist() == [0]
    assert float(hits["sigma"].iloc[0]) == pytest.approx(float(torch.linalg.svdvals(w0 + dw)[0]), rel=1e-5)
    assert float(hits["sigma"].iloc[0]) > 30.0 > float(s0[0])
    assert (report.intruders.loc[~report.intruders["is_intruder"], "max_cos"] > 0.99).all()
    # the intruder's cosines are largest far below the top 4 k pretrained vectors (or spread over all of them):
    # the cosines are then computed with every pretrained vector, and they are the dense SVD's
    expected = dense_reference(w0.float().double(), dw.float().double(), k)["max_cos"]
    torch.testing.assert_close(torch.tensor(report.intruders["max_cos"].to_numpy()), expected, atol=1e-6, rtol=0)


def test_rank_r_update_summaries_by_hand() -> None:
    w0, _, _ = with_spectrum(spread(20), 30, 20, seed=2)
    d, _, _ = with_spectrum(torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64), 30, 20, seed=5)
    row = spectra_report({"w": (w0.float(), d.float())}, k=3, with_vectors=False).summary.iloc[0]
    assert row["update_rank"] == 3
    assert row["update_stable_rank"] == pytest.approx(14 / 9, abs=1e-4)
    assert row["update_effective_rank"] == pytest.approx(2.749459, abs=1e-4)
    assert row["update_fro_ratio"] == pytest.approx(math.sqrt(14) / float(spread(20).square().sum().sqrt()), rel=1e-5)


def test_batched_report_equals_one_by_one() -> None:
    updates = vit_like_updates(seed=3)
    together = spectra_report(updates, k=4)
    for i, (name, pair) in enumerate(updates.items()):
        alone = spectra_report({name: pair}, k=4).summary.iloc[0]
        got = together.summary.iloc[i]
        for col in together.summary.columns:
            if isinstance(got[col], float):
                assert got[col] == pytest.approx(alone[col], rel=1e-4, abs=1e-3 if "angle" in col else 1e-5), col
            else:
                assert got[col] == alone[col], col


def test_wide_and_tall_give_the_same_values_with_sides_swapped() -> None:
    g = torch.Generator().manual_seed(9)
    w0 = torch.randn(12, 40, generator=g)
    dw = torch.randn(12, 3, generator=g) @ torch.randn(3, 40, generator=g) * 0.2
    wide = spectra_report({"w": (w0, dw)}, k=4)
    tall = spectra_report({"w": (w0.T, dw.T)}, k=4)
    pd.testing.assert_frame_equal(wide.values, tall.values, atol=1e-5, rtol=1e-5)
    a, b = wide.summary.iloc[0], tall.summary.iloc[0]
    assert (a["out_features"], a["in_features"]) == (b["in_features"], b["out_features"])
    for col in ["rel_change_max_abs", "update_fro_ratio", "update_effective_rank", "update_stable_rank"]:
        assert a[col] == pytest.approx(b[col], rel=1e-5)
    assert a["left_overlap"] == pytest.approx(b["right_overlap"], abs=1e-6)
    assert a["right_max_angle_deg"] == pytest.approx(b["left_max_angle_deg"], abs=1e-3)


def test_cached_pretrained_decompositions_give_the_same_report() -> None:
    updates = vit_like_updates(seed=4)
    cache = decompose({n: w0 for n, (w0, _) in updates.items()})
    fresh = spectra_report(updates, k=4)
    cached = spectra_report(updates, k=4, pretrained=cache)
    pd.testing.assert_frame_equal(fresh.summary, cached.summary)
    # values-only caches are recomputed when vectors are needed; a decomposition of the wrong size is refused
    values_only = decompose({n: w0 for n, (w0, _) in updates.items()}, with_vectors=False)
    pd.testing.assert_frame_equal(fresh.summary, spectra_report(updates, k=4, pretrained=values_only).summary)
    truncated = decompose({n: w0 for n, (w0, _) in updates.items()}, keep=2)
    pd.testing.assert_frame_equal(fresh.summary, spectra_report(updates, k=4, pretrained=truncated).summary)
    name = "blocks.0.attn.qkv.q"
    other = {name: cache["blocks.1.attn.qkv.q"]}  # right shape, other weights: a stale cache is refused
    with pytest.raises(ValueError, match="computed from other weights"):
        spectra_report({name: updates[name]}, pretrained=other)
    with pytest.raises(ValueError, match="does not match"):
        spectra_report({name: updates[name]}, pretrained={name: MatrixSVD(S=torch.ones(3))}, with_vectors=False)


def test_mismatched_shapes_are_refused() -> None:
    with pytest.raises(ValueError, match="one shape"):
        spectra_report({"w": (torch.zeros(4, 3), torch.zeros(3, 4))})


# ----------------------------------------------------------------------------------------------------------------
# The numerical engine: GIL-free LAPACK, the Gram route, the low-rank shortcuts, threads
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(params=["fast", "fallback"])
def lapack_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test through the ctypes fast path (where this machine passes its checks) and through scipy's
    wrappers, as on a platform where the checks fail."""
    if request.param == "fallback":
        monkeypatch.setattr(_lapack, "_FAST", None)
    return request.param


def test_this_machine_takes_the_fast_path() -> None:
    """The development and CI machines (Linux, scipy's LP64 OpenBLAS) must pass every signature check."""
    assert _lapack.fast_path(), _lapack.FALLBACK_REASON


def test_signature_check_refuses_what_ctypes_would_misread(monkeypatch: pytest.MonkeyPatch) -> None:
    d = "__pyx_t_5scipy_6linalg_13cython_lapack_d *"
    argtypes = _lapack._ROUTINE_ARGUMENTS["dsterf"][1]
    assert _lapack.signature_matches(f"void (int *, {d}, {d}, int *)", argtypes)
    assert not _lapack.signature_matches(f"void (long *, {d}, {d}, long *)", argtypes)  # ILP64 integers
    assert not _lapack.signature_matches(f"void (int *, {d}, {d})", argtypes)  # an argument fewer
    assert not _lapack.signature_matches(f"void (int *, {d}, {d}, {d})", argtypes)  # a double for the int
    assert not _lapack.signature_matches(f"int (int *, {d}, {d}, int *)", argtypes)
    s = d.replace("_d *", "_s *")  # float32
    assert not _lapack.signature_matches(f"void (int *, {s}, {s}, int *)", argtypes)
    monkeypatch.setattr(_lapack, "_ROUTINE_ARGUMENTS", {"dsterf": ("lapack", (_lapack._INT,) * 4)})
    routines, reason = _lapack._load_fast_routines()
    assert routines is None and reason is not None and "dsterf's signature" in reason
    monkeypatch.setattr(_lapack.sys, "platform", "win32")
    routines, reason = _lapack._load_fast_routines()
    assert routines is None and reason is not None and "win32" in reason


def test_lapack_products_match_numpy_for_every_memory_layout(lapack_path: str) -> None:
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((7, 5)), rng.standard_normal((5, 3))
    views = {"C": lambda a: a, "F": np.asfortranarray, "T": lambda a: np.ascontiguousarray(a.T).T,
             "strided": lambda a: np.repeat(a, 2, axis=1)[:, ::2]}  # fmt: skip
    for fx in views.values():
        for fy in views.values():
            np.testing.assert_allclose(_lapack.matmul(fx(x), fy(y)), x @ y, rtol=1e-12, atol=1e-12)
    for f in views.values():
        g = _lapack.gram_lower(f(x))
        np.testing.assert_allclose(np.tril(g), np.tril(x.T @ x), rtol=1e-12, atol=1e-12)
        assert not np.triu(g, 1).any()  # only the lower triangle is written
    z = rng.standard_normal((7, 5))
    for fw in views.values():
        for fz in views.values():
            sym = _lapack.symmetric_rank_2k_lower(fw(x), fz(z))
            np.testing.assert_allclose(sym, np.tril(x @ z.T + z @ x.T), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="cannot multiply"):
        _lapack.matmul(x, x)


@pytest.mark.parametrize("n", [1, 2, 33, 80])
def test_tridiagonal_reduction_reproduces_the_matrix_and_its_eigenvalues(n: int, lapack_path: str) -> None:
    rng = np.random.default_rng(n)
    a = rng.standard_normal((n, n))
    g = a + a.T
    tri = _lapack.Tridiagonal(np.tril(g))  # the upper triangle is never read
    t = np.diag(tri.d) + np.diag(tri.e, 1) + np.diag(tri.e, -1)
    q = tri.apply_q(np.eye(n))
    np.testing.assert_allclose(q.T @ q, np.eye(n), atol=1e-12)
    np.testing.assert_allclose(q @ t @ q.T, g, atol=1e-11)
    np.testing.assert_allclose(tri.eigenvalues(), np.linalg.eigvalsh(g), atol=1e-11)
    w, z = _lapack.eigh(np.tril(g))
    np.testing.assert_allclose(w, np.linalg.eigvalsh(g), atol=1e-11)
    np.testing.assert_allclose(z @ np.diag(w) @ z.T, g, atol=1e-11)
    np.testing.assert_allclose(tri.apply_q(np.eye(n), transpose=True), q.T, atol=1e-12)
    w, z = tri.eigenvectors()  # of T, by divide and conquer (the fast path) or MRRR (scipy's eigh_tridiagonal)
    np.testing.assert_allclose(w, np.linalg.eigvalsh(g), atol=1e-11)
    np.testing.assert_allclose(z.T @ z, np.eye(n), atol=1e-12)
    np.testing.assert_allclose(t @ z, z * w, atol=1e-11)


@pytest.mark.parametrize("n", [1, 40])
def test_a_basis_kept_as_its_reduction_acts_as_the_explicit_one(n: int, lapack_path: str) -> None:
    """V0 = Q Z applied through Q's reflectors equals numpy's eigenvectors, up to each column's sign."""
    rng = np.random.default_rng(n)
    a = rng.standard_normal((n + 7, n))
    g = a.T @ a
    implicit = PretrainedBasis(reduction=_lapack.Tridiagonal(np.tril(g)))
    explicit = PretrainedBasis(explicit=np.linalg.eigh(g)[1][:, ::-1].copy())
    x, y = rng.standard_normal((n, 3)), rng.standard_normal((n, 2))
    k = min(n, 2)
    leading = implicit.leading(k)  # by inverse iteration, before T's eigenvectors are computed
    np.testing.assert_allclose(np.abs(leading.T @ explicit.leading(k)), np.eye(k), atol=1e-8)
    v = implicit.coordinates(np.eye(n)).T  # V0 = (V0^T I)^T, from all of T's eigenvectors
    np.testing.assert_allclose(v.T @ v, np.eye(n), atol=1e-12)
    np.testing.assert_allclose(np.abs(v[:, :k].T @ leading), np.eye(k), atol=1e-8)
    np.testing.assert_allclose(np.abs(v.T @ explicit.vectors(np.eye(n))), np.eye(n), atol=1e-8)
    np.testing.assert_allclose(implicit.coordinates(x), v.T @ x, atol=1e-12)
    both = explicit.vectors(y, leading=k)
    np.testing.assert_allclose(both, np.hstack([explicit.vectors(np.eye(n)[:, :k]), explicit.vectors(y)]), atol=1e-12)
    with pytest.raises(ValueError, match="explicit basis"):
        implicit.vectors(y)


@pytest.mark.parametrize("vectors", [0, 1, 6, 30, 64])
def test_every_eigen_route_gives_numpys_answer(vectors: int, lapack_path: str) -> None:
    """0: values only; 1 and 6: one tridiagonalisation, bisection and back-transformation; 30, 64: dsyevd."""
    rng = np.random.default_rng(1)
    a = rng.standard_normal((90, 64))
    g = a.T @ a
    ref_w, ref_z = np.linalg.eigh(g)
    w, z = eigh_descending(np.tril(g), vectors)
    np.testing.assert_allclose(w, ref_w[::-1], rtol=1e-11, atol=1e-10)
    if vectors == 0:
        assert z is None
        return
    assert z is not None and z.shape == (64, vectors)
    np.testing.assert_allclose(np.abs(np.sum(z * ref_z[:, ::-1][:, :vectors], axis=0)), 1.0, atol=1e-9)


@pytest.mark.parametrize("split", [False, True])
def test_leading_vectors_by_inverse_iteration_are_numpys(split: bool, lapack_path: str) -> None:
    """dstein at dsterf's values on an unreduced T; bisection first where T falls apart into blocks (two blocks
    here, from a block-diagonal g, with the largest eigenvalues in both)."""
    rng = np.random.default_rng(4)
    a, b = rng.standard_normal((50, 30)), rng.standard_normal((40, 20))
    if split:
        g = np.zeros((50, 50))
        g[:30, :30], g[30:, 30:] = a.T @ a, b.T @ b
    else:
        c = rng.standard_normal((60, 50))
        g = c.T @ c
    tri = _lapack.Tridiagonal(np.tril(g))
    assert tri.splits() == split
    ref_w, ref_z = np.linalg.eigh(g)
    z = tri.leading_vectors(7)
    assert z.shape == (50, 7)
    np.testing.assert_allclose(np.abs(np.sum(z * ref_z[:, ::-1][:, :7], axis=0)), 1.0, atol=1e-9)
    np.testing.assert_allclose(z.T @ z, np.eye(7), atol=1e-12)
    assert tri.leading_vectors(0).shape == (50, 0)


def test_small_singular_values_keep_their_relative_precision() -> None:
    """The Gram route squares the condition number, in float64: a spread of 1e4 still gives ~1e-8 relative."""
    s = spread(60, 1.0, 1e-4)
    w, _, _ = with_spectrum(s, 90, 60, seed=21)
    np.testing.assert_allclose(singular_values(w).numpy(), s.numpy(), rtol=1e-7)
    np.testing.assert_allclose(singular_values(w.T).numpy(), s.numpy(), rtol=1e-7)


def dense_reference(w0: Tensor, dw: Tensor, k: int) -> dict[str, Tensor]:
    """What the report must find, from LAPACK's SVD of the dense float64 matrices (an independent route)."""
    u0, s0, v0h = torch.linalg.svd(w0.double(), full_matrices=False)
    u1, s1, v1h = torch.linalg.svd((w0.double() + dw.double()), full_matrices=False)
    left, right = subspace_rotation(u0, u1, k), subspace_rotation(v0h.T, v1h.T, k)
    return {"s0": s0, "s1": s1, "sd": torch.linalg.svdvals(dw.double()), "left": left.angles_deg,
            "right": right.angles_deg, "max_cos": (u0.T @ u1[:, :k]).abs().amax(0)}  # fmt: skip


@pytest.mark.parametrize(("rows", "cols"), [(96, 64), (64, 96), (80, 80)])
@pytest.mark.parametrize("route", ["fresh", "cached", "values"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_low_rank_updates_give_the_dense_svds_answer(rows: int, cols: int, route: str, dtype: torch.dtype) -> None:
    """Every route of a low-rank update (pretrained basis, pretrained Gram reuse, a cache) against dense SVDs.

    float64 inputs test the algebra to 1e-10; with float32 ones the update is used at its numerical rank, so its
    rounding noise (~1e-7 of its norm) is dropped and the tuned values agree to that level.
    """
    g = torch.Generator().manual_seed(rows + cols)
    w0 = with_spectrum(spread(min(rows, cols), 8.0, 0.05), rows, cols, seed=3)[0].to(dtype)
    dw = (
        torch.randn(rows, 3, generator=g, dtype=torch.float64)
        @ torch.randn(3, cols, generator=g, dtype=torch.float64)
        * 0.05
    ).to(dtype)
    k = 5
    tol = 1e-10 if dtype == torch.float64 else 1e-7
    cache = decompose({"w": w0}, keep=0) if route == "cached" else None
    report = spectra_report({"w": (w0, dw)}, k=k, with_vectors=route != "values", pretrained=cache)
    ref = dense_reference(w0, dw, k)
    got = {which: torch.tensor(part["value"].to_numpy()) for which, part in report.values.groupby("which")}
    torch.testing.assert_close(got["pretrained"], ref["s0"], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got["tuned"], ref["s1"], rtol=0, atol=tol * float(ref["s1"][0]))
    torch.testing.assert_close(got["update"][:3], ref["sd"][:3], rtol=tol, atol=0)
    assert int(report.summary["update_rank"].iloc[0]) == 3
    if route == "values":
        return
    for side in ("left", "right"):
        angles = torch.tensor(report.angles.loc[report.angles["side"] == side, "angle_deg"].to_numpy())
        torch.testing.assert_close(angles, ref[side], atol=1e-3, rtol=0)
    torch.testing.assert_close(torch.tensor(report.intruders["max_cos"].to_numpy()), ref["max_cos"], atol=1e-6, rtol=0)


def test_a_full_rank_update_takes_the_dense_route_and_agrees() -> None:
    g = torch.Generator().manual_seed(5)
    w0 = torch.randn(72, 48, generator=g)
    dw = 0.01 * torch.randn(72, 48, generator=g)
    report = spectra_report({"w": (w0, dw)}, k=4)
    ref = dense_reference(w0, dw, 4)
    tuned = torch.tensor(report.values.loc[report.values["which"] == "tuned", "value"].to_numpy())
    update = torch.tensor(report.values.loc[report.values["which"] == "update", "value"].to_numpy())
    torch.testing.assert_close(tuned, ref["s1"], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(update, ref["sd"], rtol=1e-8, atol=1e-10)
    assert int(report.summary["update_rank"].iloc[0]) == 48


def test_the_fallback_routines_give_the_fast_paths_report_and_the_dense_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    """A report through scipy's wrappers (as where the fast path's checks fail) equals the fast path's, and both
    agree with dense SVDs."""
    updates = vit_like_updates(seed=8, width=40)
    g = torch.Generator().manual_seed(9)
    updates["dense"] = (updates["blocks.0.mlp.fc1"][0], 0.01 * torch.randn(160, 40, generator=g))  # full rank
    fast = spectra_report(updates, k=4)
    monkeypatch.setattr(_lapack, "_FAST", None)
    fallback = spectra_report(updates, k=4)
    for name in ("summary", "values", "angles", "intruders"):
        pd.testing.assert_frame_equal(getattr(fast, name), getattr(fallback, name), rtol=1e-9, atol=1e-9)
    for name, (w0, dw) in updates.items():
        ref = dense_reference(w0, dw, 4)
        rows = fallback.values[fallback.values["name"] == name]
        tuned = torch.tensor(rows.loc[rows["which"] == "tuned", "value"].to_numpy())
        torch.testing.assert_close(tuned, ref["s1"], rtol=0, atol=1e-7 * float(ref["s1"][0]))  # float32 inputs


def test_threads_do_not_change_the_report() -> None:
    updates = vit_like_updates(seed=6, width=40)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = spectra_report(updates, k=4)
        torch.set_num_threads(2)
        two = spectra_report(updates, k=4)
    finally:
        torch.set_num_threads(threads)
    for name in ("summary", "values", "angles", "intruders"):
        pd.testing.assert_frame_equal(getattr(one, name), getattr(two, name), rtol=1e-9, atol=1e-9)


def test_non_finite_weights_are_refused() -> None:
    w0 = torch.randn(8, 8)
    w0[2, 3] = torch.nan
    with pytest.raises(ValueError, match="NaN or infinite"):
        spectra_report({"w": (w0, torch.zeros(8, 8))})


def test_relative_changes_of_unresolved_values_are_left_out() -> None:
    """A pretrained value at 1e-9 of the largest is below what float64 Gram matrices resolve: no relative change."""
    s = torch.cat([spread(39, 5.0, 0.5), torch.tensor([5e-9], dtype=torch.float64)])
    w0, u0, v0 = with_spectrum(s, 60, 40, seed=8)
    dw = 1e-3 * torch.outer(u0[:, 0], v0[:, 0])  # moves the top value only, by 1e-3 / 5
    report = spectra_report({"w": (w0, dw)}, with_vectors=False)
    rel = report.changes["relative_change"].to_numpy()
    assert np.isnan(rel[-1]) and not np.isnan(rel[:-1]).any()
    assert rel[0] == pytest.approx(1e-3 / 5.0, rel=1e-6)
    row = report.summary.iloc[0]
    assert row["rel_change_max_abs"] == pytest.approx(1e-3 / 5.0, rel=1e-6)
    assert row["rel_change_mean_abs"] == pytest.approx(1e-3 / 5.0 / 39, rel=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rank", [4, None])
def test_half_precision_updates_are_analysed_exactly(dtype: torch.dtype, rank: int | None) -> None:
    """Half-precision entries take the Gram route (their rounding is too coarse for the low-rank test)."""
    g = torch.Generator().manual_seed(3)
    w0 = torch.randn(192, 128, generator=g).to(dtype)
    if rank is None:
        dw = (0.1 * torch.randn(192, 128, generator=g)).to(dtype)
    else:
        dw = (torch.randn(192, rank, generator=g) @ torch.randn(rank, 128, generator=g)).to(dtype)
    report = spectra_report({"w": (w0, dw)}, k=4)
    ref = dense_reference(w0.double(), dw.double(), 4)
    tuned = torch.tensor(report.values.loc[report.values["which"] == "tuned", "value"].to_numpy())
    torch.testing.assert_close(tuned, ref["s1"], rtol=1e-9, atol=1e-9)
    assert int(report.summary["update_rank"].iloc[0]) == (128 if rank is None else rank)


def test_update_rank_ignores_the_gram_routes_noise_floor() -> None:
    """A float64 update of rank 80 (above the probes) goes through the Gram route; its zeros read ~1e-8 s_max."""
    g = torch.Generator().manual_seed(4)
    dw = torch.randn(200, 80, generator=g, dtype=torch.float64) @ torch.randn(80, 140, generator=g, dtype=torch.float64)
    row = spectra_report({"w": (torch.randn(200, 140, generator=g, dtype=torch.float64), dw)}, k=3).summary.iloc[0]
    assert row["update_rank"] == int(torch.linalg.matrix_rank(dw)) == 80


@pytest.mark.parametrize(("rows", "cols"), [(60, 40), (40, 60)])
def test_a_zero_pretrained_matrix_makes_every_tuned_direction_new(rows: int, cols: int) -> None:
    g = torch.Generator().manual_seed(5)
    dw = torch.randn(rows, 2, generator=g) @ torch.randn(2, cols, generator=g)
    report = spectra_report({"w": (torch.zeros(rows, cols), dw)}, k=3)
    assert report.summary["intruders"].iloc[0] == 3 and (report.intruders["max_cos"] == 0).all()


def test_impossible_requests_are_refused() -> None:
    with pytest.raises(ValueError, match="k must be at least 1"):
        spectra_report({"w": (torch.ones(4, 3), torch.zeros(4, 3))}, k=0)
    with pytest.raises(ValueError, match="is empty"):
        spectra_report({"w": (torch.ones(0, 3), torch.zeros(0, 3))})
    with pytest.raises(ValueError, match="non-empty"):
        decompose({"w": torch.ones(3, 0)})


# ----------------------------------------------------------------------------------------------------------------
# The disk cache of pretrained decompositions
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture
def counted_decompositions(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the matrices the disk cache decomposes, call after call."""
    decomposed: list[str] = []

    def counting(matrices: Mapping[str, Tensor], **options: object) -> dict[str, MatrixSVD]:
        decomposed.extend(matrices)
        return decompose(matrices, **options)  # type: ignore[arg-type]

    monkeypatch.setattr(spectra_cache, "decompose", counting)
    return decomposed


def pretrained_of(updates: dict[str, tuple[Tensor, Tensor]]) -> dict[str, Tensor]:
    return {name: w0 for name, (w0, _) in updates.items()}


def assert_same_decompositions(got: dict[str, MatrixSVD], want: dict[str, MatrixSVD]) -> None:
    assert list(got) == list(want)
    for name in want:
        torch.testing.assert_close(got[name].S, want[name].S, rtol=0, atol=0)
        torch.testing.assert_close(got[name].basis, want[name].basis, rtol=0, atol=0)


def test_the_second_call_reads_the_disk_cache(tmp_path: Path, counted_decompositions: list[str]) -> None:
    updates = vit_like_updates(seed=10, width=24)
    backbone = {"name": "vit_tiny", "weights": "none"}
    first = cached_decompositions(backbone, pretrained_of(updates), folder=tmp_path)
    assert sorted(counted_decompositions) == sorted(updates)
    assert [p.suffix for p in tmp_path.iterdir()] == [".safetensors"]  # no temporary file left behind
    second = cached_decompositions(backbone, pretrained_of(updates), folder=tmp_path)
    assert sorted(counted_decompositions) == sorted(updates)  # nothing decomposed again
    assert_same_decompositions(second, first)
    assert_same_decompositions(second, decompose(pretrained_of(updates), keep=0))
    report = spectra_report(updates, k=4, pretrained=second)
    pd.testing.assert_frame_equal(report.summary, spectra_report(updates, k=4).summary, rtol=1e-9, atol=1e-9)
    other = cached_decompositions({"name": "vit_tiny", "weights": "hub"}, pretrained_of(updates), folder=tmp_path)
    assert len(counted_decompositions) == 2 * len(updates)  # other weights: another file
    assert_same_decompositions(other, first)
    assert len(list(tmp_path.iterdir())) == 2


def test_a_stale_entry_is_recomputed_and_the_file_rewritten(tmp_path: Path, counted_decompositions: list[str]) -> None:
    updates = vit_like_updates(seed=11, width=24)
    backbone = {"name": "vit_tiny", "weights": "none"}
    cached_decompositions(backbone, pretrained_of(updates), folder=tmp_path)
    changed = dict(pretrained_of(updates))
    changed["blocks.1.mlp.fc2"] = 2 * changed["blocks.1.mlp.fc2"]  # same key, other weights
    counted_decompositions.clear()
    got = cached_decompositions(backbone, changed, folder=tmp_path)
    assert counted_decompositions == ["blocks.1.mlp.fc2"]
    assert_same_decompositions(got, decompose(changed, keep=0))
    counted_decompositions.clear()
    cached_decompositions(backbone, changed, folder=tmp_path)
    assert counted_decompositions == []  # the rewritten file holds the fresh entry


def test_a_weights_file_is_keyed_by_its_size_and_time(tmp_path: Path) -> None:
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"1234")
    backbone = {"name": "vit_small_patch16_224", "weights": str(weights)}
    before = weights_key(backbone)
    assert before.startswith("vit_small_patch16_224|") and before == weights_key(backbone)
    weights.write_bytes(b"12345")
    assert weights_key(backbone) != before
    assert weights_key({"name": "vit_small_patch16_224", "weights": "hub"}) == "vit_small_patch16_224|hub"


@pytest.mark.parametrize("damage", ["garbage", "truncated", "other key", "float32"])
def test_a_corrupt_cache_file_is_refused_and_recomputed(
    tmp_path: Path,
    counted_decompositions: list[str],
    damage: str,
) -> None:
    updates = vit_like_updates(seed=12, width=24)
    backbone = {"name": "vit_tiny", "weights": "none"}
    want = cached_decompositions(backbone, pretrained_of(updates), folder=tmp_path)
    (path,) = tmp_path.iterdir()
    if damage == "garbage":
        path.write_bytes(b"\x00not a safetensors file" * 10)
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:-100])
    else:
        from safetensors.numpy import save_file

        arrays = {f"{n}:{part}": getattr(svd, attr).numpy() for n, svd in want.items()
                  for part, attr in (("values", "S"), ("basis", "basis"))}  # fmt: skip
        key = weights_key(backbone)
        if damage == "other key":
            key = "another|model"
        else:
            arrays = {name: a.astype(np.float32) for name, a in arrays.items()}
        save_file(arrays, str(path), metadata={"key": key, "format": spectra_cache._FORMAT})
    counted_decompositions.clear()
    got = cached_decompositions(backbone, pretrained_of(updates), folder=tmp_path)
    assert sorted(counted_decompositions) == sorted(updates)
    assert_same_decompositions(got, want)
    counted_decompositions.clear()
    cached_decompositions(backbone, pretrained_of(updates), folder=tmp_path)
    assert counted_decompositions == []  # rewritten whole
