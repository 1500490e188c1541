"""The app: every page through streamlit's AppTest (no browser), on an empty run store and with one tiny completed
run, and the pages' jobs on a local Ray (the ``ray_local`` fixture).

AppTest runs the scripts in this process, so ``PETLAB_HOME`` is set (monkeypatch) before each run and every page
reads the store it names. Training here is tiny: the offline backbone at 28 px (4 patches), 2 steps.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from streamlit.testing.v1 import AppTest

from app import charts, forms, state
from core import jobs, methods
from core.backbone import BackboneSpec
from core.data import DataSpec
from core.experiment import (
    MEASUREMENT_PRESETS,
    Experiment,
    IntrinsicDimRequest,
    StoreLogger,
    classroom,
    count_params,
    failure,
    load_run_model,
    measurement_record,
    run_experiment,
    run_weight_updates,
    validate,
)
from core.intrinsic_dim import IntrinsicDimConfig
from core.methods import explain
from core.pareto import ppt_score
from core.runs import RunStore
from core.train import TrainConfig
from tests.conftest import open_app

PAGES = ["app_pages/train.py", "app_pages/runs.py", "app_pages/spectra.py", "app_pages/pareto.py"]
PAGES += ["app_pages/intrinsic_dim.py", "app_pages/learn.py"]  # Methods: the first test
TINY_DATA = DataSpec(name="digits", img_size=28, n_train=32, n_val=16, n_test=16)


def tiny_experiment(steps: int = 2) -> Experiment:
    train = TrainConfig(steps=steps, eval_every=2, warmup_steps=0, batch_size=16)
    return Experiment(data=TINY_DATA, method="lora", options={"rank": 2}, train=train)


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """One intra-op thread: the SVDs and tiny steps are faster so, and other tests on this machine keep theirs."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A run store holding one tiny completed LoRA run (recorded once for the module)."""
    root = tmp_path_factory.mktemp("recorded")
    torch.set_num_threads(1)
    run_id = run_experiment(tiny_experiment(), RunStore(root))
    return root, run_id


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty run store for the app."""
    monkeypatch.setenv("PETLAB_HOME", str(tmp_path))
    return tmp_path


@pytest.fixture
def home_with_run(recorded: tuple[Path, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, str]:
    """A private copy of the recorded store (tests may delete from it), as the app's store."""
    root = tmp_path / "home"
    shutil.copytree(recorded[0], root)
    monkeypatch.setenv("PETLAB_HOME", str(root))
    return root, recorded[1]


def frame(at: AppTest, column: str) -> pd.DataFrame:
    """The first rendered dataframe with this column (AppTest gives dataframes no keys)."""
    return next(d.value for d in at.dataframe if column in d.value.columns)


def metric(at: AppTest, label: str) -> str:
    return next(m.value for m in at.metric if m.label == label)


def shown_run(at: AppTest) -> str:
    """The full id of the run the Fine-tune page's progress panel shows."""
    return next(c.value.split("`")[1] for c in at.caption if c.value.startswith("Run `"))


def wait_for(condition: object, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


# ----------------------------------------------------------------------------------------------------------------
# Every page, empty store
# ----------------------------------------------------------------------------------------------------------------
def test_methods_page_lists_every_method_with_counts_and_the_learn_section(home: Path) -> None:
    at = open_app()
    table = at.dataframe[0].value
    assert list(table["method"]) == methods.list_methods()
    assert int(table.loc[table["method"] == "linear", "trainable (no head)"].iloc[0]) == 0
    assert any("Learn" in h.value for h in at.header)
    assert any("RLRR" in m.value and "not** the identity" in m.value for m in at.markdown)
    noted = [n for n in methods.list_methods() if methods.get_method(n).differs_from_official]
    assert {"fact", "rlrr", "kadaptation", "ssf"} <= set(noted)  # the notes come from each method's registration
    learn = next(m.value for m in at.markdown if "not** the identity" in m.value)
    assert all(methods.get_method(n).differs_from_official in learn for n in noted)


@pytest.mark.parametrize("page", PAGES)
def test_every_page_renders_on_an_empty_store(home: Path, page: str) -> None:
    at = open_app(page)
    if page.endswith(("runs.py", "spectra.py")):
        assert at.info and "No " in at.info[0].value
    if page.endswith("pareto.py"):
        table = frame(at, "ppt")
        assert set(table["kind"]) == {"reference"} and table["ppt"].notna().all()
        assert any("not results on your dataset" in w.value for w in at.warning)


# ----------------------------------------------------------------------------------------------------------------
# The pages show a completed run
# ----------------------------------------------------------------------------------------------------------------
def test_runs_page_shows_the_run_and_deletes_it_after_confirmation(home_with_run: tuple[Path, str]) -> None:
    root, run_id = home_with_run
    at = open_app("app_pages/runs.py")
    table = frame(at, "trainable_params")
    assert list(table["id"]) == [run_id] and list(table["status"]) == ["completed"]
    assert metric(at, "Status") == "completed"
    assert metric(at, "Trainable (no head)") == f"{RunStore(root).get_run(run_id)['trainable_params']:,}"
    csv = pd.read_csv(io.BytesIO(state.export_csv(RunStore(root))))
    assert list(csv["id"]) == [run_id]

    at.button(key="runs.delete").click().run()
    assert any("cannot be undone" in w.value for w in at.warning)
    assert len(RunStore(root).list_runs()) == 1  # nothing deleted before the confirmation
    at.button(key="runs.delete.yes").click().run()
    assert RunStore(root).list_runs().empty
    assert at.info and "No runs" in at.info[0].value


def test_spectra_page_shows_the_runs_matrices(home_with_run: tuple[Path, str]) -> None:
    root, run_id = home_with_run
    at = open_app("app_pages/spectra.py")
    summary = frame(at, "update_fro_ratio")
    depth = 12  # the offline DINOv2 ViT-S/14
    assert sorted(summary["name"]) == sorted(f"blocks.{b}.attn.qkv.{m}" for b in range(depth) for m in "qv")
    assert (summary["update_fro_ratio"] > 0).all()
    assert any(f"{len(summary)} adapted matrices" in c.value for c in at.caption)
    assert at.selectbox(key="spectra.metric").options[0].startswith("update_fro_ratio")


def test_relative_change_chart_plots_one_matrix_and_leaves_unresolved_values_out() -> None:
    changes = pd.DataFrame(
        {
            "name": ["a"] * 3 + ["b"] * 2,
            "index": [0, 1, 2, 0, 1],
            "pretrained": [3.0, 2.0, 1e-9, 5.0, 4.0],
            "tuned": [3.3, 2.0, 2e-9, 5.0, 4.4],
            "relative_change": [0.1, 0.0, float("nan"), 0.0, 0.1],
        }
    )
    fig = charts.relative_changes(changes, "a")
    (trace,) = fig.data
    assert list(trace.x) == [0, 1, 2]
    assert trace.y[:2].tolist() == [0.1, 0.0] and pd.isna(trace.y[2])


def test_pareto_page_plots_the_run_beside_the_references(home_with_run: tuple[Path, str]) -> None:
    root, run_id = home_with_run
    run = RunStore(root).get_run(run_id)
    at = open_app("app_pages/pareto.py")
    table = frame(at, "ppt")
    mine = table[table["kind"] == "run"]
    assert len(mine) == 1 and (table["kind"] == "reference").any()
    assert mine["accuracy"].iloc[0] == pytest.approx(run["test_acc"])
    assert mine["params"].iloc[0] == run["trainable_params"]
    assert mine["ppt"].iloc[0] == pytest.approx(ppt_score(run["test_acc"], run["trainable_params"]))
    assert bool(mine["front"].iloc[0])  # a single run is its own front
    at.checkbox(key="pareto.refs").uncheck().run()
    assert set(frame(at, "ppt")["kind"]) == {"run"}


# ----------------------------------------------------------------------------------------------------------------
# Fine-tune: the method form follows the registry
# ----------------------------------------------------------------------------------------------------------------
def meta_count(method: str, img_size: int = 112, **options: object) -> int:
    spec = BackboneSpec(name="vit_small_patch14_dinov2", weights="none", img_size=img_size, num_classes=2)
    return count_params(spec, method, options).without_head  # tests/test_experiment.py checks it in closed form


def test_fine_tune_form_follows_the_method_and_counts_live(home: Path) -> None:
    at = open_app("app_pages/train.py")
    label = "Trainable parameters (without head)"
    assert at.selectbox(key="ft.method").value == "fact"
    assert at.selectbox(key="ft.method.fact.variant").options == ["tt", "tk"]
    assert metric(at, label) == f"{meta_count('fact'):,}"

    at.selectbox(key="ft.method").set_value("lora").run()
    keys = {w.key for w in [*at.number_input, *at.selectbox, *at.text_input]}
    assert {"ft.method.lora.rank", "ft.method.lora.alpha", "ft.method.lora.targets"} <= keys
    assert "ft.method.fact.variant" not in keys
    assert metric(at, label) == f"{meta_count('lora'):,}"

    at.number_input(key="ft.method.lora.rank").set_value(4)
    at.text_input(key="ft.method.lora.targets").input("q,k,v").run()
    assert metric(at, label) == f"{meta_count('lora', rank=4, targets='q,k,v'):,}"

    at.number_input(key="ft.method.lora.rank").set_value(0).run()
    assert any("rank=0 is out of range" in e.value for e in at.error)
    assert at.button(key="ft.start").disabled
    assert RunStore(home).list_runs().empty


# ----------------------------------------------------------------------------------------------------------------
# Jobs: submitted to a local Ray, followed through the run store
# ----------------------------------------------------------------------------------------------------------------
def test_the_fine_tune_page_follows_its_job_and_cancels_it(home: Path, ray_local: None) -> None:
    store = RunStore(home)
    done = state.submit("finetune", tiny_experiment(), root=home)
    assert jobs.wait(store, done, timeout=300)["status"] == "completed"
    at = open_app("app_pages/train.py", session={"run": done})  # the job this session started
    assert any("completed" in s.value for s in at.success)
    assert shown_run(at) == done
    assert not [b for b in at.button if b.key == "ft.cancel"]

    long = state.submit("finetune", tiny_experiment(steps=100_000), root=home)
    wait_for(lambda: (store.get_run(long)["steps"] or 0) >= 10, timeout=300)
    elsewhere = open_app("app_pages/train.py")  # another browser: sees the job live, cannot cancel it
    assert shown_run(elsewhere) == long and metric(elsewhere, "Status") == "running"
    assert not [b for b in elsewhere.button if b.key == "ft.cancel"]

    # A reload keeps the page's address, and with it the job it started.
    reloaded = open_app("app_pages/train.py", query={"run": long})
    assert shown_run(reloaded) == long
    reloaded.button(key="ft.cancel").click().run()
    assert not reloaded.exception
    run = jobs.wait(store, long, timeout=60)
    assert run["status"] == "cancelled" and 10 <= run["steps"] < 100_000
    reloaded.run()
    assert any(w.value.startswith("You cancelled it after") for w in reloaded.warning)  # says what happened


def test_start_button_submits_the_form_and_says_where_it_queues(home: Path, ray_local: None) -> None:
    store = RunStore(home)
    at = open_app("app_pages/train.py")
    assert at.button(key="ft.start").label == "Start"
    ahead = state.submit("finetune", tiny_experiment(steps=100_000), root=home)  # someone else's long job
    wait_for(lambda: store.get_run(ahead)["status"] == "running", timeout=300)
    at.run()
    assert at.button(key="ft.start").label == "Start (queues behind 1 job)"

    at.selectbox(key="ft.data.name").set_value("digits")
    for key, value in {"img_size": 28, "n_train": 32, "n_val": 16, "n_test": 16}.items():
        at.number_input(key=f"ft.data.{key}").set_value(value)
    at.selectbox(key="ft.method").set_value("lora").run()
    at.number_input(key="ft.method.lora.rank").set_value(2)
    for key, value in {"steps": 2, "eval_every": 2, "warmup_steps": 0, "batch_size": 16}.items():
        at.number_input(key=f"ft.train.{key}").set_value(value)
    at.text_input(key="ft.label").input("from the form")
    at.button(key="ft.start").click().run()
    assert not at.exception and not at.error
    run_id = at.session_state["run"]
    assert store.get_run(run_id)["status"] == "queued" and store.queue_position(run_id) == 1
    assert any("Queued: number 1 in the queue" in i.value for i in at.info)
    store.request_cancel(ahead)
    run = jobs.wait(store, run_id, timeout=300)
    assert run["status"] == "completed", run["message"]
    assert (run["label"], run["method"], run["method_options"]["rank"]) == ("from the form", "lora", 2)
    assert run["dataset"]["img_size"] == 28 and run["train_config"]["steps"] == 2
    at.run()
    assert any("completed" in s.value for s in at.success)
    assert at.button(key="ft.start").label == "Start"


def test_spectra_page_says_when_a_method_has_no_weight_update(home: Path) -> None:
    experiment = dataclasses.replace(tiny_experiment(), method="linear", options={})
    run_experiment(experiment, RunStore(home))
    at = open_app("app_pages/spectra.py")
    assert any("makes no weight update" in i.value for i in at.info)


def test_bad_options_start_nothing(home: Path) -> None:
    bad = Experiment(data=TINY_DATA, method="lora", options={"rank": 0})
    with pytest.raises(ValueError, match="rank=0"):
        state.submit("finetune", bad, root=home)
    assert RunStore(home).list_runs(kind=None).empty


def test_intrinsic_dimension_job_and_its_targets_reach_the_fine_tune_page(home: Path, ray_local: None) -> None:
    config = IntrinsicDimConfig(steps=8, batch_size=16, d_min=4, d_max=8, max_trials=2)
    request = IntrinsicDimRequest(
        data=DataSpec(name="digits", img_size=28, n_train=48, n_val=48),
        backbone=BackboneSpec(),
        groups=("q,v:11", "fc2:11"),
        config=config,
    )
    run_id = state.submit("intrinsic_dim", request, root=home)
    run = jobs.wait(RunStore(home), run_id, timeout=300)
    assert run["status"] == "completed", run["message"]
    trials = run["result"]["trials"]
    assert {t["group"] for t in trials} == {"q,v:11", "fc2:11"}
    assert [t["kind"] for t in trials if t["group"] == "fc2:11"][0] == "full"

    at = open_app("app_pages/intrinsic_dim.py")  # a new session (a reload) lists the stored measurement
    assert at.selectbox(key="id.selected").value == run_id
    table = frame(at, "d90")
    assert list(table["group"]) == ["q,v:11", "fc2:11"]
    assert any("d90" in t.value for t in at.text)
    recommended = run["result"]["recommended"]
    assert recommended is not None, run["result"]["explanation"]  # seeded: this measurement reaches its targets
    assert any(recommended in s.value for s in at.success)
    at.button(key="id.use").click().run()
    assert not at.exception
    assert [t.value for t in at.title] == ["Fine-tune"]
    assert at.selectbox(key="ft.method").value == "kadaptation"
    assert at.text_input(key="ft.method.kadaptation.targets").value == recommended
    assert at.selectbox(key="ft.data.name").value == "digits"  # the data it was measured on comes along
    assert at.number_input(key="ft.data.img_size").value == 28
    count = meta_count("kadaptation", img_size=28, targets=recommended)
    assert metric(at, "Trainable parameters (without head)") == f"{count:,}"


# ----------------------------------------------------------------------------------------------------------------
# Teaching: the Learn page, the classroom presets, spectra over training, two runs side by side
# ----------------------------------------------------------------------------------------------------------------
def test_learn_page_explains_each_method_with_its_live_count(home: Path) -> None:
    at = open_app("app_pages/learn.py")
    for name in methods.list_methods():
        at.selectbox(key="learn.method").set_value(name).run()
        assert not at.exception and not at.error, name
        entry = explain.explain(name)
        latex = [element.value.strip("$\n") for element in at.latex]
        assert latex[: len(entry.update) + 1] == [*entry.update, entry.count]
        spec = BackboneSpec(name="vit_small_patch14_dinov2", weights="none", img_size=518, num_classes=100)
        count = count_params(spec, name).without_head
        assert metric(at, "Trainable (no head)") == f"{count:,}"
        assert latex[len(entry.update) + 1].endswith(explain.number(count))  # the worked closed form
        assert any("agrees with the code's count" in c.value for c in at.caption), name
        assert any(entry.spectrum in m.value for m in at.markdown)
    at.selectbox(key="learn.method").set_value("lora").run()
    at.number_input(key="learn.lora.rank").set_value(4).run()
    spec = BackboneSpec(name="vit_small_patch14_dinov2", weights="none", img_size=518, num_classes=100)
    assert metric(at, "Trainable (no head)") == f"{count_params(spec, 'lora', {'rank': 4}).without_head:,}"
    at.number_input(key="learn.lora.rank").set_value(0).run()
    assert any("rank=0" in e.value for e in at.error)


def test_the_fine_tune_presets_fill_the_form(home: Path) -> None:
    at = open_app("app_pages/train.py")
    assert at.selectbox(key="ft.preset").value == "classroom"
    at.button(key="ft.fill").click().run()
    assert not at.exception
    preset = classroom("fact")
    assert at.selectbox(key="ft.data.name").value == preset.data.name
    assert at.number_input(key="ft.data.img_size").value == preset.data.img_size
    assert at.number_input(key="ft.train.steps").value == preset.train.steps
    assert at.text_input(key="ft.label").value == "classroom demo"
    count = meta_count("fact", img_size=preset.data.img_size, **preset.options)
    assert metric(at, "Trainable parameters (without head)") == f"{count:,}"
    assert at.button(key="ft.classroom").label == "Run the classroom demo (fact)"


def test_classroom_presets_are_valid_for_every_method() -> None:
    for name in methods.list_methods():
        experiment = classroom(name)
        checked = validate(experiment)  # the options fit the offline backbone at the demo's size
        assert checked.experiment.method == name and experiment.data == classroom("fact").data
        assert name in (experiment.label or "")
    assert classroom("full").train.lr < classroom("fact").train.lr  # full fine-tuning moves every weight
    with pytest.raises(ValueError, match="unknown method"):
        classroom("dora")


def test_snapshots_are_kept_at_step_zero_and_every_validation(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    experiment = dataclasses.replace(tiny_experiment(steps=4), train=TrainConfig(steps=4, eval_every=2, warmup_steps=0))
    run_id = run_experiment(experiment, store)
    snapshots = store.snapshot_paths(run_id)
    assert list(snapshots) == [0, 2, 4]
    assert all(path.stat().st_size < 200_000 for path in snapshots.values())  # kilobytes, not the backbone
    at_start, at_end = run_weight_updates(store, run_id, step=0), run_weight_updates(store, run_id, step=4)
    assert set(at_start) == set(at_end) and len(at_start) == 24  # q and v of 12 blocks
    assert all(not dw.any() for _, dw in at_start.values())  # LoRA starts at B = 0: no update yet
    assert all(dw.any() for _, dw in at_end.values())
    with pytest.raises(ValueError, match="no snapshot at step 3"):
        load_run_model(store, run_id, step=3)
    full = dataclasses.replace(tiny_experiment(steps=1), method="full", options={})
    assert store.snapshot_paths(run_experiment(full, store)) == {}  # too large to keep at every validation


def test_spectra_page_steps_through_the_snapshots_on_fixed_scales(home_with_run: tuple[Path, str]) -> None:
    root, run_id = home_with_run
    at = open_app("app_pages/spectra.py")
    slider = at.select_slider(key="spectra.step")
    assert list(slider.options) == ["step 0", "step 2"] and slider.value == 2
    sizes_at_end = chart(at, "spectra.step.heatmap")
    slider.set_value(0).run()
    assert not at.exception
    start = chart(at, "spectra.step.heatmap")
    assert start["data"][0]["zmin"] == sizes_at_end["data"][0]["zmin"] == 0.0  # one colour scale for every step
    assert start["data"][0]["zmax"] == sizes_at_end["data"][0]["zmax"] > 0
    assert not array(start["data"][0]["z"]).any()  # LoRA's B starts at zero: no update yet
    assert array(sizes_at_end["data"][0]["z"]).all()
    assert chart(at, "spectra.step.values")["layout"]["yaxis"]["range"] is not None


def test_spectra_page_compares_two_runs_on_one_scale(home_with_run: tuple[Path, str]) -> None:
    root, lora = home_with_run
    fact = run_experiment(dataclasses.replace(tiny_experiment(), method="fact", options={"rank": 2}), RunStore(root))
    at = open_app("app_pages/spectra.py", query={"compare": f"{fact},{lora}"})  # the address the compare button leaves
    assert at.radio(key="spectra.mode").value == "compare"
    assert (at.selectbox(key="spectra.left").value, at.selectbox(key="spectra.right").value) == (fact, lora)
    left, right = chart(at, "spectra.left.heatmap"), chart(at, "spectra.right.heatmap")
    assert left["data"][0]["zmax"] == right["data"][0]["zmax"] and left["data"][0]["zmin"] == right["data"][0]["zmin"]
    assert at.selectbox(key="spectra.compare.matrix").value.endswith(".q")  # adapted in both: q and v of LoRA
    assert (
        chart(at, "spectra.left.values")["layout"]["yaxis"]["range"]
        == chart(at, "spectra.right.values")["layout"]["yaxis"]["range"]
    )
    assert any("rank 2" in m.value and fact in m.value for m in at.markdown)  # options as text, full run id


def array(value: object) -> np.ndarray:
    """A plotly JSON array: a list, or plotly's typed form ``{"dtype", "bdata", "shape"}``."""
    if isinstance(value, dict):
        flat = np.frombuffer(base64.b64decode(value["bdata"]), dtype=value["dtype"])
        shape = value.get("shape")
        return flat.reshape([int(n) for n in str(shape).split(",")]) if shape else flat
    return np.asarray(value, dtype=float)


def chart(at: AppTest, key: str) -> dict:
    """The plotly figure (as JSON) of the chart with this key."""
    import json

    element = next(e for e in at.get("plotly_chart") if e.proto.id and key in e.proto.id)
    return json.loads(element.proto.spec)


def test_the_learn_pages_demo_button_starts_the_classroom_run_on_the_fine_tune_page(
    home: Path, ray_local: None
) -> None:
    at = open_app("app_pages/learn.py")
    at.selectbox(key="learn.method").set_value("lora").run()
    at.button(key="learn.demo").click().run()
    assert not at.exception
    assert [t.value for t in at.title] == ["Fine-tune"]
    run_id = at.session_state["run"]
    store = RunStore(home)
    run = store.get_run(run_id)
    assert run["label"] == "classroom demo: lora" and run["dataset"] == classroom("lora").data.to_dict()
    assert shown_run(at) == run_id
    store.request_cancel(run_id)
    assert jobs.wait(store, run_id, timeout=300)["status"] == "cancelled"


# ----------------------------------------------------------------------------------------------------------------
# Easier to read
# ----------------------------------------------------------------------------------------------------------------
def test_intrinsic_dimension_presets_fill_the_advanced_settings_and_estimate_the_time(home: Path) -> None:
    at = open_app("app_pages/intrinsic_dim.py")
    quick = MEASUREMENT_PRESETS["quick"]
    assert at.radio(key="id.preset").value == "quick"
    assert at.number_input(key="id.config.steps").value == quick.config.steps
    assert at.number_input(key="id.data.img_size").value == quick.data.img_size
    assert any(f"up to {2 * (1 + quick.config.max_trials)} trials" in c.value for c in at.caption)
    at.radio(key="id.preset").set_value("thorough").run()
    assert at.selectbox(key="id.scheme").value == "matrices"
    assert at.number_input(key="id.config.steps").value == MEASUREMENT_PRESETS["thorough"].config.steps
    planned = 6 * (1 + MEASUREMENT_PRESETS["thorough"].config.max_trials)  # 6 matrices, each baseline + trials
    assert any(f"up to {planned} trials" in c.value for c in at.caption)
    assert all(e.label.startswith("Advanced") for e in at.expander)


def test_a_cancelled_measurement_names_what_it_did_not_measure_and_recommends_nothing(home: Path) -> None:
    store = RunStore(home)
    request = IntrinsicDimRequest(data=TINY_DATA, groups=("q,v", "fc1"))
    run_id = store.create_run(measurement_record(request))
    groups = [
        {"group": "q,v", "size": 10, "full_accuracy": 0.9, "target": 0.81, "d90": 8, "trials": 2,
         "head_reaches_target": False, "reason": ""},
        {"group": "fc1", "size": 20, "full_accuracy": None, "target": None, "d90": None, "trials": 0,
         "head_reaches_target": False, "reason": "cancelled before its measurement finished"},
    ]  # fmt: skip
    result = {
        "trials": [], "backbone": "b", "curves": [], "groups": groups, "head_only_accuracy": 0.5, "majority_rate": 0.1,
        "recommended": "q,v", "explanation": "partial", "notes": [], "cancelled": True, "depth": 12,
        "representation": None,
    }  # fmt: skip
    store.finish_run(run_id, "cancelled", "cancelled after 2 trials", result=result)
    at = open_app("app_pages/intrinsic_dim.py")
    assert not at.success and not [b for b in at.button if b.key == "id.use"]
    (warning,) = [w.value for w in at.warning]
    assert "Not measured: fc1" in warning and "not a recommendation" in warning


def test_failures_read_as_sentences() -> None:
    assert failure(ValueError("rank=0 is out of range")) == ("failed", "rank=0 is out of range")
    status, message = failure(RuntimeError("CUDA out of memory"))
    assert status == "failed" and message.splitlines() == ["CUDA out of memory", "RuntimeError"]
    assert failure(KeyboardInterrupt())[0] == "cancelled"
    assert forms.options_text({"rank": 8, "alpha": 8.0, "targets": "q,v", "n": None}) == (
        "rank 8, alpha 8, targets q,v, n none"
    )
    assert [forms.duration(s) for s in (4.6, 200, 3 * 3600 + 300)] == ["5 s", "3 min 20 s", "3 h 5 min"]


def test_time_left_follows_the_pace_of_the_recorded_steps() -> None:
    rows = [{"step": s, "split": "train", "name": "loss", "value": 1.0, "time": 100.0 + 2 * s} for s in (1, 2, 5)]
    assert state.time_left(pd.DataFrame(rows), total_steps=20) == pytest.approx(30.0)  # 15 steps at 2 s
    assert state.time_left(pd.DataFrame(rows[:1]), total_steps=20) is None


def test_store_logger_shows_the_first_steps_at_once() -> None:
    class Store:
        def __init__(self) -> None:
            self.steps: list[int] = []
            self.progress: list[int | None] = []

        def log_metrics(self, run_id: str, rows: list[dict], steps: int | None = None) -> None:
            self.steps += sorted({r["step"] for r in rows})
            self.progress.append(steps)

    from core.train import StepInfo

    store = Store()
    logger = StoreLogger(store, "r", every=10, every_s=3600.0)  # type: ignore[arg-type]
    for step in range(1, 12):
        logger.on_step(StepInfo(step=step, total=20, loss=1.0, lr=0.1, images_per_s=1.0))
    assert store.steps == [1, *range(2, 11)]  # step 1 at once, then the batch of ten
    assert store.progress == [1, 10]  # the step reached goes with each batch, in the same write


def test_pareto_colours_and_labels_runs_by_method_and_names_references_on_demand() -> None:
    from core.pareto import combine_points, fronts_by_kind, reference_points

    runs = pd.DataFrame(
        {"id": ["a", "b", "c"], "method": ["fact", "lora", "fact"], "label": [None] * 3, "test_acc": [90.0, 91, 92],
         "trainable_params": [1e4, 1e5, 2e4], "dataset.name": ["digits"] * 3, "backbone.name": ["x"] * 3}
    )  # fmt: skip
    points = combine_points(runs, reference_points("VTAB-1k"))
    points["front"] = fronts_by_kind(points)
    colors = charts.method_colors(methods.list_methods())
    fig = charts.pareto(points, colors)
    mine = {t.name: t for t in fig.data if t.name.startswith("your runs")}
    assert set(mine) == {"your runs: fact", "your runs: lora"}
    assert mine["your runs: fact"].marker.color == colors["fact"] != colors["lora"]
    assert list(mine["your runs: fact"].text) == ["fact", "fact"]
    assert all(t.text is None for t in fig.data if t.name.startswith("papers' points"))  # hover only
    labelled = charts.pareto(points, colors, label_references=True, highlight=("FacT-TT4",))
    assert any(t.text is not None for t in labelled.data if t.name.startswith("papers' points"))
    (marked,) = [t for t in labelled.data if t.name == "this method in the papers"]
    assert list(marked.text) == ["FacT-TT4"]


def test_intruder_heatmap_uses_whole_number_steps() -> None:
    summary = pd.DataFrame({"name": ["a", "b"], "block": [0, 1], "kind": ["q", "q"], "intruders": [0, 3]})
    trace = charts.spectra_heatmap(summary, "intruders").data[0]
    assert list(trace.colorbar.tickvals) == [0, 1, 2, 3] and (trace.zmin, trace.zmax) == (-0.5, 3.5)
