"""The Sweeps page through streamlit's AppTest: the form's point count and estimate, a sweep started from it on a
local Ray (the ``ray_local`` fixture) followed to its end and opened on the Pareto page, and cancelling a sweep from
the browser that started it only. Training is tiny: the offline backbone at 28 px (4 patches), 2 steps."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from core import sweeps
from core.runs import RunStore
from tests.conftest import open_app

PAGE = "app_pages/sweeps.py"
TINY = {"img_size": 28, "n_train": 32, "n_val": 16, "n_test": 16, "batch_size": 16}


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("PETLAB_HOME", str(tmp_path))
    return tmp_path


def metric(at: AppTest, label: str) -> str:
    return next(m.value for m in at.metric if m.label == label)


def fill(at: AppTest, methods: list[str], ranks: str, seeds: str, steps: int) -> None:
    at.multiselect(key="sw.methods").set_value(methods)
    at.text_input(key="sw.ranks").input(ranks)
    at.multiselect(key="sw.datasets").set_value(["digits"])
    at.text_input(key="sw.seeds").input(seeds)
    for key, value in {**TINY, "steps": steps}.items():
        at.number_input(key=f"sw.{key}").set_value(value)
    at.run()
    assert not at.exception and not at.error, (at.exception, [e.value for e in at.error])


def test_the_form_counts_points_and_refuses_a_bad_grid(home: Path) -> None:
    at = open_app(PAGE, timeout=120)
    assert metric(at, "Points") == "4"  # the defaults: LoRA and FacT at ranks 4 and 8, on digits, seed 0
    fill(at, ["lora", "bitfit"], "2,4", "0,1", steps=2)
    assert metric(at, "Points") == "6"  # (LoRA at two ranks + BitFit) x one dataset x two seeds
    assert metric(at, "Estimated time").endswith(" min") and not at.button(key="sw.start").disabled
    at.text_input(key="sw.ranks").input("0").run()
    assert at.error and "rank" in at.error[0].value and at.button(key="sw.start").disabled


def test_a_sweep_started_here_runs_and_opens_on_the_pareto_page(home: Path, ray_local: None) -> None:
    at = open_app(PAGE, timeout=120)
    fill(at, ["lora", "bitfit"], "2", "0", steps=2)
    at.button(key="sw.start").click().run()
    assert not at.exception
    sweep_id = at.session_state["sweep"]
    assert at.query_params["sweep"] == sweep_id  # the page address keeps it for a reload
    summary = sweeps.wait_sweep(RunStore(home), sweep_id, timeout=300)
    assert (summary.points, summary.done) == (2, 2)
    at.run()
    table = next(d.value for d in at.dataframe if "status" in d.value.columns)
    assert sorted(table["status"]) == ["completed", "completed"] and table["test_acc"].notna().all()
    assert any("2 of 2 points done" in p.proto.text for p in at.get("progress"))
    single = RunStore(home).create_run({"method": "bitfit", "dataset": {"name": "digits"}})  # not in the sweep
    RunStore(home).finish_run(single, "completed", "done", test_acc=50.0, trainable_params=10)
    at.button(key="sw.pareto").click().run()
    assert not at.exception
    assert at.title[0].value == "Accuracy versus trainable parameters"
    assert at.selectbox(key="pareto.sweep").value == sweep_id

    def shown_runs() -> list[str]:
        table = next(d.value for d in at.dataframe if "kind" in d.value.columns)
        return sorted(table.loc[table["kind"] == "run", "method"])

    assert shown_runs() == ["bitfit", "lora"]  # the sweep's two points, not the single run
    at.switch_page("app_pages/pareto.py")  # AppTest reruns the page it opened unless told: the one now shown
    at.selectbox(key="pareto.sweep").select(at.selectbox(key="pareto.sweep").options[0]).run()
    assert shown_runs() == ["bitfit", "bitfit", "lora"]  # every completed run


def test_only_the_browser_that_started_a_sweep_cancels_it(home: Path, ray_local: None) -> None:
    store = RunStore(home)
    at = open_app(PAGE, timeout=120)
    fill(at, ["lora"], "2", "0,1", steps=100_000)  # two long points: one runs, one waits
    at.button(key="sw.start").click().run()
    sweep_id = at.session_state["sweep"]
    deadline = time.monotonic() + 300
    while sweeps.summarize(store, sweep_id).running == 0:
        assert time.monotonic() < deadline, "the first point never started"
        time.sleep(0.2)

    elsewhere = open_app(PAGE, timeout=120)  # another browser: sees the sweep live, without a Cancel button
    assert elsewhere.selectbox(key="sw.shown").value == sweep_id
    assert not [b for b in elsewhere.button if b.key == "sw.cancel"]

    # A reload keeps the page's address, and with it the sweep it started.
    reloaded = open_app(PAGE, query={"sweep": sweep_id}, timeout=120)
    reloaded.button(key="sw.cancel").click().run()
    assert not reloaded.exception
    summary = sweeps.wait_sweep(store, sweep_id, timeout=120)
    assert (summary.cancelled, summary.done, summary.status) == (2, 0, "cancelled")
