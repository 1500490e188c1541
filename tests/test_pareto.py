"""Known-answer tests of core.pareto: hand-made tables, hand-computed scores, the papers' printed averages."""

from __future__ import annotations

import importlib.util
import itertools
import json
import math
import re
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import numpy as np
import pandas as pd
import pytest

from core.pareto import (
    MINI_BENCHMARK,
    MINI_BENCHMARK_NAME,
    POINT_COLUMNS,
    REFERENCE_COLUMNS,
    combine_points,
    fronts_by_kind,
    load_mini_benchmark,
    load_reference_results,
    mini_benchmark_results,
    pareto_front,
    ppt_score,
    reference_points,
)
from core.sweeps import load_grid

# ----------------------------------------------------------------------------------------------------------------
# Pareto front
# ----------------------------------------------------------------------------------------------------------------
TABLE = pd.DataFrame(
    {
        "label": ["A", "B", "C", "D", "E", "F", "G", "H", "I"],
        "params": [1.0, 2.0, 2.0, 3.0, 4.0, 0.5, 5.0, np.nan, 3.0],
        "accuracy": [50.0, 60.0, 55.0, 60.0, 70.0, 40.0, 65.0, 99.0, np.nan],
    },
    index=[10, 11, 12, 13, 14, 15, 16, 17, 18],  # a non-default index must be kept
)


def front_labels(mask: pd.Series, table: pd.DataFrame = TABLE) -> set[str]:
    return set(table.loc[mask, "label"])


@pytest.mark.parametrize(
    ("minimize_x", "maximize_y", "expected"),
    [
        (True, True, {"F", "A", "B", "E"}),  # few params, high accuracy: C and D lose to B, G to E
        (False, False, {"G", "D", "C", "A", "F"}),  # many params, low "accuracy" (read: error)
        (True, False, {"F"}),  # F has both the fewest params and the lowest y
        (False, True, {"E", "G"}),  # E the highest y, G the most params
    ],
)
def test_pareto_front_on_a_hand_made_table(minimize_x: bool, maximize_y: bool, expected: set[str]) -> None:
    mask = pareto_front(TABLE, minimize_x=minimize_x, maximize_y=maximize_y)
    assert mask.dtype == bool and mask.name == "pareto"
    assert list(mask.index) == list(TABLE.index)
    assert front_labels(mask) == expected
    assert not mask.loc[[17, 18]].any()  # NaN rows: never on the front, and H's 99% removed nobody


def test_exact_duplicates_stay_together() -> None:
    table = pd.DataFrame({"label": list("abcde"), "p": [1, 1, 2, 3, 3], "acc": [80, 80, 90, 85, 85]})
    mask = pareto_front(table, x="p", y="acc")
    assert front_labels(mask, table) == {"a", "b", "c"}  # both copies of the front point; d and e lose to c


def test_ties_on_one_axis() -> None:
    table = pd.DataFrame({"label": list("abcd"), "params": [1, 1, 2, 3], "accuracy": [70, 75, 75, 80]})
    # a loses to b (same params, better accuracy); c loses to b (same accuracy, fewer params)
    assert front_labels(pareto_front(table), table) == {"b", "d"}


def test_degenerate_tables() -> None:
    empty = pd.DataFrame({"params": [], "accuracy": []})
    assert pareto_front(empty).empty
    only_nan = pd.DataFrame({"params": [np.nan, 1.0], "accuracy": [1.0, np.nan]})
    assert not pareto_front(only_nan).any()
    one = pd.DataFrame({"params": [5], "accuracy": [1]})
    assert pareto_front(one).tolist() == [True]


def brute_force_front(a: np.ndarray, b: np.ndarray, minimize_x: bool, maximize_y: bool) -> np.ndarray:
    """The definition, O(n^2): dominated if another row is >= on both and > on one (NaN rows excluded)."""
    a = a if minimize_x else -a
    b = -b if maximize_y else b
    ok = ~(np.isnan(a) | np.isnan(b))
    out = np.zeros(len(a), dtype=bool)
    for i in np.flatnonzero(ok):
        others = ok & (a <= a[i]) & (b <= b[i]) & ((a < a[i]) | (b < b[i]))
        out[i] = not others.any()
    return out


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize(("minimize_x", "maximize_y"), [(True, True), (False, True), (True, False), (False, False)])
def test_pareto_front_matches_the_definition_on_random_tables_with_ties(
    seed: int, minimize_x: bool, maximize_y: bool
) -> None:
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 8, 60).astype(float)  # few distinct values: many ties and duplicates
    y = rng.integers(0, 8, 60).astype(float)
    x[rng.random(60) < 0.1] = np.nan
    y[rng.random(60) < 0.1] = np.nan
    table = pd.DataFrame({"params": x, "accuracy": y})
    got = pareto_front(table, minimize_x=minimize_x, maximize_y=maximize_y).to_numpy()
    np.testing.assert_array_equal(got, brute_force_front(x, y, minimize_x, maximize_y))
    assert got.any()


# ----------------------------------------------------------------------------------------------------------------
# PPT
# ----------------------------------------------------------------------------------------------------------------
def test_ppt_by_hand() -> None:
    assert ppt_score(80.0, 0.0) == pytest.approx(0.8)
    assert ppt_score(80.0, 9e7) == pytest.approx(0.8 / math.e)  # log10(10) = 1
    assert ppt_score(80.0, 1e7) == pytest.approx(0.8 * math.exp(-math.log10(2)))  # 0.592044
    assert ppt_score(80.0, 1e7) == pytest.approx(0.592044, abs=1e-6)
    accs = pd.Series([80.0, 50.0, np.nan], index=["x", "y", "z"])
    got = ppt_score(accs, pd.Series([9e7, 0.0, 1.0], index=["x", "y", "z"]))
    assert isinstance(got, pd.Series) and list(got.index) == ["x", "y", "z"]
    assert got.iloc[:2].tolist() == pytest.approx([0.8 / math.e, 0.5]) and math.isnan(got.iloc[2])
    np.testing.assert_allclose(ppt_score(np.array([100.0, 100.0]), np.array([0.0, 9.9e8])), [1.0, math.exp(-2)])
    np.testing.assert_allclose(ppt_score([100.0], [9e7]), [math.exp(-1)])


# ----------------------------------------------------------------------------------------------------------------
# Reference points
# ----------------------------------------------------------------------------------------------------------------
# (mean19, mean of the 3 group means) as recomputed in the spec, methods.md section 4.2.
VTAB_AVERAGES = {
    ("Full", "FacT paper Table 1"): (65.57, 68.97),
    ("Linear", "FacT paper Table 1"): (52.99, 57.68),
    ("BitFit", "FacT paper Table 1"): (62.05, 65.22),
    ("VPT-Shallow", "FacT paper Table 1"): (64.85, 67.82),
    ("VPT-Deep", "FacT paper Table 1"): (69.43, 71.97),
    ("Adapter h=8", "FacT paper Table 1"): (71.44, 73.86),
    ("AdaptFormer", "FacT paper Table 1"): (72.32, 74.75),
    ("LoRA r=8", "FacT paper Table 1"): (72.25, 74.60),
    ("NOAH", "FacT paper Table 1"): (73.25, 75.48),
    ("FacT-TT4", "FacT paper Table 1"): (70.94, 73.46),
    ("FacT-TT<=16", "FacT paper Table 1"): (73.04, 75.34),
    ("FacT-TK8", "FacT paper Table 1"): (71.54, 73.98),
    ("FacT-TK<=32", "FacT paper Table 1"): (73.23, 75.55),
    ("Linear", "RLRR paper Table 2"): (52.94, 57.64),
    ("Adapter(VPT)", "RLRR paper Table 2"): (55.82, 59.95),
    ("ARC", "RLRR paper Table 2"): (73.37, 75.78),
    ("RLRR", "RLRR paper Table 2"): (74.54, 76.75),
    ("SSF*", "RLRR paper Table 2"): (73.10, 75.69),
    ("ARC*", "RLRR paper Table 2"): (74.27, 76.70),
    ("RLRR*", "RLRR paper Table 2"): (75.11, 77.50),
}
FGVC_MEANS = {"Full": 88.54, "Linear": 79.32, "LoRA": 89.46, "RLRR": 90.50, "SSF*": 90.72, "RLRR*": 91.02}


@pytest.mark.parametrize(("average", "position"), [("mean19", 0), ("groups", 1)])
def test_vtab_averages_match_the_spec(average: str, position: int) -> None:
    points = reference_points("VTAB-1k", average=average)  # type: ignore[arg-type]
    got = {(m, s): a for m, s, a in points[["method", "source", "accuracy"]].itertuples(index=False)}
    assert set(got) == set(VTAB_AVERAGES)
    for key, expected in VTAB_AVERAGES.items():
        assert got[key] == pytest.approx(expected[position], abs=0.005), key
    assert (points["n_tasks"] == 19).all() and (points["average"] == average).all()


def test_reference_points_params_conventions_and_backbones() -> None:
    points = reference_points("VTAB-1k").set_index("label")
    fact = points.loc["FacT-TK<=32 [FacT paper Table 1]"]
    assert fact["params"] == pytest.approx(69_000) and fact["params_without_head"] == pytest.approx(69_000)
    assert math.isnan(fact["params_with_head"]) and fact["params_convention"] == "without head"
    rlrr = points.loc["RLRR [RLRR paper Table 2]"]
    assert rlrr["params"] == pytest.approx(330_000) and rlrr["params_convention"] == "with head"
    assert math.isnan(rlrr["params_without_head"])
    assert rlrr["ppt"] == pytest.approx(0.7454 * math.exp(-math.log10(0.033 + 1)), abs=1e-4)
    augreg = points[points["method"].str.contains("*", regex=False)]
    assert len(augreg) == 3 and augreg["backbone"].str.endswith("AugReg").all()
    assert not points.loc[~points.index.isin(augreg.index), "backbone"].str.contains("AugReg").any()
    assert list(reference_points("VTAB-1k", prefer="with").columns) == list(points.reset_index().columns)


def test_fgvc_is_a_plain_mean_in_both_conventions() -> None:
    for average in ("mean19", "groups"):
        points = reference_points("FGVC", average=average)  # type: ignore[arg-type]
        got = dict(zip(points["method"], points["accuracy"], strict=True))
        for method, expected in FGVC_MEANS.items():
            assert got[method] == pytest.approx(expected, abs=0.005), method
        assert (points["n_tasks"] == 5).all() and (points["params_convention"] == "with head").all()


def test_reference_errors() -> None:
    with pytest.raises(ValueError, match="average"):
        reference_points(average="median")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no reference results"):
        reference_points("ImageNet")
    frame = load_reference_results()
    assert {"benchmark", "params_include_head"} <= set(frame.columns) and frame["params_include_head"].dtype == bool


# ----------------------------------------------------------------------------------------------------------------
# Runs and references together
# ----------------------------------------------------------------------------------------------------------------
def test_combine_points_runs_and_references() -> None:
    runs = pd.DataFrame(
        {
            "id": ["r1", "r2", "r3"],
            "label": ["mine", None, "no params"],
            "method": ["lora", "fact", "rlrr"],
            "test_acc": [71.0, 73.5, 60.0],
            "trainable_params": pd.array([294_912, 86_528, pd.NA], dtype="Int64"),
            "trainable_params_with_head": pd.array([296_450, 88_066, 290_306], dtype="Int64"),
            "dataset.name": ["cifar100", "cifar100", "cifar100"],
        }
    )
    refs = reference_points("VTAB-1k")
    both = combine_points(runs, refs)
    assert list(both.columns[: len(POINT_COLUMNS)]) == list(POINT_COLUMNS)
    assert both["kind"].tolist() == ["run"] * 3 + ["reference"] * len(refs)
    assert both.loc[1, "label"] == "fact r2"
    assert both.loc[0, "params"] == 294_912 and both.loc[0, "params_convention"] == "without head"
    assert both.loc[2, "params"] == 290_306 and both.loc[2, "params_convention"] == "with head"  # fallback
    assert both.loc[0, "ppt"] == pytest.approx(0.71 * math.exp(-math.log10(0.0294912 + 1)))
    assert both.loc[0, "dataset"] == "cifar100" and pd.isna(both.loc[0, "backbone"])
    assert both.loc[3:, "average"].eq("mean19").all() and both.loc[:2, "average"].isna().all()
    with_head = combine_points(runs, None, prefer="with")
    assert with_head["params"].tolist() == [296_450, 88_066, 290_306]
    front = pareto_front(both)
    assert front.loc[3:].any()  # reference rows compete on the same axes
    assert list(combine_points(None, None).columns) == list(POINT_COLUMNS)
    assert combine_points(pd.DataFrame(), refs)["kind"].eq("reference").all()


def test_each_kind_has_its_own_front() -> None:
    runs = pd.DataFrame(
        {
            "id": ["small", "big", "worse"],
            "method": ["lora", "full", "adapter"],
            "test_acc": [40.0, 50.0, 45.0],
            "trainable_params": [1_000, 80_000_000, 90_000_000],
        }
    )
    refs = pd.DataFrame(  # dominates every run: fewer parameters, higher accuracy
        {"label": ["ref", "ref dominated"], "method": ["x", "y"], "accuracy": [99.0, 90.0], "params": [10.0, 20.0]}
    )
    points = combine_points(runs, refs)
    front = fronts_by_kind(points)
    assert front.name == "front" and front.index.equals(points.index)
    assert front.tolist() == [True, True, False, True, False]
    assert not pareto_front(points).iloc[:3].any()  # one front over both kinds would drop every run
    assert fronts_by_kind(combine_points(None, None)).empty


# ----------------------------------------------------------------------------------------------------------------
# The measured mini-benchmark (bench/mini_vtab)
# ----------------------------------------------------------------------------------------------------------------
BENCH = Path(__file__).resolve().parents[1] / "bench" / "mini_vtab"


def grid_points_of(path: Path) -> set[tuple[str, str, str, int]]:
    """Every (task, method, options the grid sets, seed) of a grid file, expanded here by hand."""
    spec = load_grid(path)
    return {
        (dataset["name"], grid.name, json.dumps(dict(zip(grid.options, values, strict=True)), sort_keys=True), seed)
        for seed in spec.seeds
        for dataset in spec.datasets
        for grid in spec.methods
        for values in itertools.product(*grid.options.values())
    }


def test_the_committed_mini_benchmark_covers_exactly_what_it_claims() -> None:
    rows, info = load_mini_benchmark()
    assert (BENCH / "results.csv").read_bytes() == MINI_BENCHMARK.read_bytes()  # the package ships the committed file
    assert json.loads((BENCH / "results.json").read_text()) == info
    assert info["benchmark"] == MINI_BENCHMARK_NAME and info["command"].startswith("python bench/mini_vtab/run.py")
    expected = grid_points_of(BENCH / "grid.toml")
    assert len(expected) == info["points"] == 6 * 13 * 3  # six tasks, ten methods (FacT at 2 x 2 ranks), 3 seeds
    measured = list(zip(rows["task"], rows["method"], rows["options"], rows["seed"], strict=True))
    missing = [(m["task"], m["method"], m["options"], m["seed"]) for m in info["missing"]]
    assert len(set(measured)) == len(measured) and len(set(missing)) == len(missing)  # no point twice
    assert set(measured).isdisjoint(missing) and set(measured) | set(missing) == expected
    assert info["measured"] == len(measured) and info["complete"] == (not missing)
    assert set(rows["status"]) <= {"completed", "diverged"}
    assert rows.loc[rows["status"] == "completed", ["val_acc", "test_acc"]].notna().all().all()
    assert ((rows["params_with_head"] > rows["params_without_head"]) & rows["wall_time_s"].gt(0)).all()
    assert (rows.loc[rows["method"] == "linear", "params_without_head"] == 0).all()


def test_the_committed_mini_benchmark_is_what_reference_points_returns() -> None:
    rows, _ = load_mini_benchmark()
    benchmarks = set(load_reference_results()["benchmark"])
    assert {"VTAB-1k", "FGVC"} <= benchmarks
    if rows["test_acc"].isna().all():  # nothing measured yet: the page does not offer it
        assert MINI_BENCHMARK_NAME not in benchmarks
        return
    points = reference_points(MINI_BENCHMARK_NAME).set_index("method")
    measured = rows[rows["test_acc"].notna()]
    per_task = measured.groupby(["name", "task"])["test_acc"].agg(["mean", "std"])
    assert set(points.index) == set(measured["name"])
    for name, point in points.iterrows():
        assert point["accuracy"] == pytest.approx(per_task.loc[name, "mean"].mean())
        assert point["accuracy_std"] == pytest.approx(per_task.loc[name, "std"].mean(), nan_ok=True)
        assert point["n_tasks"] == measured.loc[measured["name"] == name, "task"].nunique()
        first = measured[measured["name"] == name].iloc[0]
        assert point["params_without_head"] == first["params_without_head"]


def test_mini_benchmark_averages_by_hand() -> None:
    rows = pd.DataFrame(
        {
            "task": ["digits"] * 4 + ["count"] * 3 + ["location"],
            "name": ["LoRA r=8 q,v", "LoRA r=8 q,v", "Linear probe", "Linear probe", "LoRA r=8 q,v", "LoRA r=8 q,v"]
            + ["Linear probe", "LoRA r=8 q,v"],
            "seed": [0, 1, 0, 1, 0, 1, 0, 0],
            "test_acc": [90.0, 94.0, 80.0, np.nan, 50.0, 60.0, 30.0, 20.0],  # a diverged point: no test accuracy
            "params_without_head": [100] * 2 + [0] * 2 + [100] * 2 + [0, 100],
            "params_with_head": [3_950] * 2 + [3_850] * 2 + [2_410] * 2 + [2_310, 6_260],  # 10, 6 and 16 classes
            "img_size": 56,
        }
    )
    results = mini_benchmark_results(rows)
    assert list(results.columns[: len(REFERENCE_COLUMNS)]) == list(REFERENCE_COLUMNS)
    lora = reference_points(MINI_BENCHMARK_NAME, results=results).set_index("method").loc["LoRA r=8 q,v"]
    assert lora["accuracy"] == pytest.approx((92 + 55 + 20) / 3)  # tasks weigh alike, whatever their seed count
    assert lora["accuracy_std"] == pytest.approx((math.sqrt(8) + math.sqrt(50)) / 2)  # location's one seed: none
    assert lora["params"] == 100 and lora["params_with_head"] == pytest.approx((3_950 + 2_410 + 6_260) / 3)
    assert lora["n_tasks"] == 3 and lora["backbone"] == "DINOv2 ViT-S/14 (offline), 56 px"
    grouped = reference_points(MINI_BENCHMARK_NAME, "groups", results=results).set_index("method")
    assert grouped.loc["LoRA r=8 q,v", "accuracy"] == pytest.approx((92 + (55 + 20) / 2) / 2)  # natural, structured
    with_head = reference_points(MINI_BENCHMARK_NAME, results=results, prefer="with").set_index("method")
    probe = with_head.loc["Linear probe"]
    assert probe["accuracy"] == pytest.approx((80 + 30) / 2) and math.isnan(probe["accuracy_std"])
    assert probe["params"] == pytest.approx((3_850 + 2_310) / 2) and probe["params_convention"] == "with head"


def _mini_vtab_script() -> Any:
    spec = importlib.util.spec_from_file_location("mini_vtab_run", BENCH / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_mini_benchmark_figure_draws_each_method_and_its_front() -> None:
    svg = _mini_vtab_script().pareto_svg(
        pd.DataFrame(
            {
                "task": ["digits"] * 4 + ["count"] * 3,
                "name": ["LoRA r=8 q,v", "Linear probe", "BitFit", "SSF"] + ["LoRA r=8 q,v", "Linear probe", "BitFit"],
                "seed": 0,
                "test_acc": [90.0, 80.0, 70.0, 99.0, 60.0, 50.0, 99.0],
                "params_without_head": [100, 0, 50, 40, 100, 0, 50],
                "params_with_head": [3_950, 3_850, 3_900, 3_890, 2_410, 2_310, 2_360],
                "img_size": 56,
            }
        )
    )
    ElementTree.fromstring(svg)  # well-formed
    labels = re.findall(r">([^<>]+)</text>", svg)
    assert {"LoRA r=8 q,v", "Linear probe", "BitFit"} <= set(labels) and "SSF" not in labels  # SSF: one task of two
    circles = re.findall(r'<circle [^>]*fill="([^"]+)"', svg)
    # means over the two tasks: BitFit 84.5 on 50 parameters, LoRA 75 on 100 (behind BitFit), the probe 65 on 0
    assert sorted(circles) == ["#1f77b4"] + ["#d62728"] * 2
    assert _mini_vtab_script().pareto_svg(pd.DataFrame(columns=["task", "name", "seed", "test_acc"])) == ""


def test_the_committed_mini_benchmark_figure_is_drawn_from_the_committed_results() -> None:
    rows, _ = load_mini_benchmark()
    figure = BENCH / "pareto.svg"
    assert (figure.read_text() if figure.is_file() else "") == _mini_vtab_script().pareto_svg(rows)


def test_the_mini_benchmark_takes_one_thread_per_point_on_this_cpu_only(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    choose = _mini_vtab_script().one_cpu_per_point
    monkeypatch.delenv("PETLAB_RAY_ADDRESS", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert (choose("auto", None), choose("cpu", None)) == (1, 1)
    assert choose("auto", "10.0.0.1:6379") is None and choose("cuda", None) is None  # a cluster's node, a GPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert choose("auto", None) is None and choose("cpu", None) == 1  # auto runs on the GPU: one GPU per point
    monkeypatch.setenv("PETLAB_RAY_ADDRESS", "10.0.0.1:6379")
    assert choose("cpu", None) is None  # the cluster's nodes may have more cores than this machine
