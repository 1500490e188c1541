"""The job engine on a real local Ray (num_cpus=2): queueing by resources, cancelling, killed workers, restarts,
and intrinsic-dimension measurements kept in the run store."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest

from core import jobs
from core.backbone import BackboneSpec
from core.data import DataSpec
from core.experiment import Experiment, IntrinsicDimRequest
from core.intrinsic_dim import IntrinsicDimConfig
from core.runs import RunStore
from core.train import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
TINY_BACKBONE = BackboneSpec(name="vit_tiny_patch16_224", weights="none")
TINY_DATA = DataSpec(name="digits", img_size=32, n_train=64, n_val=32, n_test=32)
TWO_CPUS = jobs.Resources(cpus=2)


def tiny_experiment(steps: int, eval_every: int = 10) -> Experiment:
    return Experiment(
        data=TINY_DATA,
        backbone=TINY_BACKBONE,
        method="fact",
        options={"rank": 2},
        train=TrainConfig(steps=steps, batch_size=16, warmup_steps=1, eval_every=eval_every),
    )


@pytest.fixture
def store(tmp_path: Path, ray_local: None) -> RunStore:
    return RunStore(tmp_path / "home")


def until(predicate, timeout: float = 120.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def test_a_workers_progress_is_written_behind_in_order_and_a_failed_write_raises_once(store: RunStore) -> None:
    run_id = store.create_run({"method": "fact"})
    remote = jobs.RemoteStore(jobs.manager(store.root))  # what a worker writes through, on the real manager
    for step in range(1, 41):
        assert remote.log_metrics(run_id, [{"step": step, "split": "train", "name": "loss", "value": 1 / step}]) is None
        remote.update_run(run_id, steps=step)
    assert remote.get_run(run_id)["steps"] == 40  # the writes before it arrived, the last one last
    assert list(store.metrics(run_id)["step"]) == list(range(1, 41))
    remote.log_metrics(run_id, [{"step": 41, "split": "train", "name": "loss"}])  # no value: refused by the store
    with pytest.raises(ValueError, match="value"):
        remote.get_run(run_id)  # the next call reports the refused write
    assert remote.get_run(run_id)["steps"] == 40 and len(store.metrics(run_id)) == 40  # reported once, nothing kept


def test_two_jobs_on_a_two_cpu_reservation_run_one_at_a_time(store: RunStore) -> None:
    first = jobs.submit("finetune", tiny_experiment(steps=60), store.root, resources=TWO_CPUS)
    second = jobs.submit("finetune", tiny_experiment(steps=20), store.root, resources=TWO_CPUS)
    until(lambda: store.get_run(first)["status"] == "running", what="the first job to start")
    run = store.get_run(second)
    assert run["status"] == "queued" and store.queue_position(second) == 1
    assert run["resources"] == {"CPU": 2.0}
    for run_id in (first, second):
        run = jobs.wait(store, run_id, timeout=300)
        assert run["status"] == "completed", run["message"]
        assert run["node"] and run["hostname"] and run["device"] == "cpu"
        assert store.adapter_path(run_id).is_file()  # the worker sent its bytes back
    # One after the other: the second trained only once the first had finished (a worker waiting for the job
    # manager must not lend its CPUs to the queued job).
    assert store.metrics(second)["time"].min() >= store.metrics(first)["time"].max()
    assert store.get_run(first)["steps"] == 60 and store.get_run(second)["steps"] == 20


def test_cancel_a_queued_and_a_running_job(store: RunStore) -> None:
    running = jobs.submit(
        "finetune", tiny_experiment(steps=100_000, eval_every=100_000), store.root, resources=TWO_CPUS
    )
    queued = jobs.submit("finetune", tiny_experiment(steps=20), store.root, resources=TWO_CPUS)
    until(lambda: (store.get_run(running)["steps"] or 0) >= 10, what="the first job to train 10 steps")
    # at the priority of the process that started Ray, not Ray's default niceness 15 for workers
    assert psutil.Process(store.get_run(running)["pid"]).nice() == psutil.Process().nice()
    assert store.request_cancel(queued) == "cancelled"
    assert store.request_cancel(running) == "running"
    run = jobs.wait(store, running, timeout=60)
    assert run["status"] == "cancelled" and 10 <= run["steps"] < 100_000
    assert f"after {run['steps']} of 100000 steps" in run["message"]
    assert not store.adapter_path(running).exists()
    run = store.get_run(queued)
    assert (run["status"], run["steps"], run["message"]) == ("cancelled", 0, "cancelled while queued")
    time.sleep(2 * jobs.POLL_S + 1)  # the cancelled queued task must not start afterwards
    assert store.get_run(queued)["status"] == "cancelled" and store.metrics(queued).empty


def test_a_killed_worker_leaves_its_run_interrupted_and_the_store_intact(store: RunStore) -> None:
    victim = jobs.submit("finetune", tiny_experiment(steps=100_000, eval_every=100_000), store.root)
    until(lambda: (store.get_run(victim)["steps"] or 0) >= 10, what="the job to train 10 steps")
    os.kill(store.get_run(victim)["pid"], signal.SIGKILL)
    run = until(lambda: (r := store.get_run(victim))["status"] != "running" and r, timeout=60, what="the run to end")
    assert run["status"] == "interrupted" and "worker died" in run["message"]
    assert len(store.metrics(victim)) > 0  # its history is kept
    after = jobs.submit("finetune", tiny_experiment(steps=10), store.root)  # the engine goes on
    assert jobs.wait(store, after, timeout=300)["status"] == "completed"
    assert set(store.list_runs()["id"]) == {victim, after}


def test_an_intrinsic_dimension_measurement_is_stored_and_read_back(store: RunStore) -> None:
    config = IntrinsicDimConfig(steps=3, batch_size=16, d_min=4, d_max=16, max_trials=3)
    request = IntrinsicDimRequest(data=TINY_DATA, backbone=TINY_BACKBONE, groups=("q,v:0", "fc2:0"), config=config)
    run_id = jobs.submit("intrinsic_dim", request, store.root)
    run = jobs.wait(store, run_id, timeout=300)
    assert run["kind"] == "intrinsic_dim" and run["status"] == "completed", run["message"]
    result = run["result"]
    assert [g["group"] for g in result["groups"]] == ["q,v:0", "fc2:0"]
    assert len(result["trials"]) == run["steps"] == len(result["curves"])
    assert {t["kind"] for t in result["trials"]} == {"full", "subspace"}
    assert result["explanation"] and "recommended" in result
    assert list(store.list_runs(kind="intrinsic_dim")["id"]) == [run_id]
    assert run_id not in set(store.list_runs()["id"])  # the default listing is fine-tunes
    reopened = RunStore(store.root).get_run(run_id)  # what a reloaded page reads
    assert reopened["result"] == result


def test_bad_options_are_refused_before_anything_is_recorded(store: RunStore) -> None:
    bad = Experiment(data=TINY_DATA, backbone=TINY_BACKBONE, method="fact", options={"rank": 0})
    with pytest.raises(ValueError, match="rank"):
        jobs.submit("finetune", bad, store.root)
    with pytest.raises(ValueError, match="group"):
        jobs.submit(
            "intrinsic_dim", IntrinsicDimRequest(data=TINY_DATA, backbone=TINY_BACKBONE, groups=("zz",)), store.root
        )
    assert store.list_runs(kind=None).empty


STOPPED_APP = """
import sys, time
from core import jobs
from core.runs import RunStore
from tests.test_jobs import TWO_CPUS, tiny_experiment
store = RunStore(sys.argv[1])
running = jobs.submit("finetune", tiny_experiment(100_000, 100_000), store.root, resources=TWO_CPUS)
queued = jobs.submit("finetune", tiny_experiment(10), store.root, resources=TWO_CPUS)
while (store.get_run(running)["steps"] or 0) < 10:
    time.sleep(0.2)
print(running, queued, flush=True)
"""


def test_stopping_the_embedded_ray_marks_its_jobs_interrupted_at_the_next_start(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", STOPPED_APP, str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    running, queued = done.stdout.split()
    store = RunStore(tmp_path)  # the next start: its embedded Ray, manager and worker are gone
    for run_id in (running, queued):
        run = store.get_run(run_id)
        assert run["status"] == "interrupted" and "is gone" in run["message"], run


RUN_ID = re.compile(r"\d{8}-\d{6}-[0-9a-f]{6}")
TINY_CLI = ["--dataset", "digits", "--img-size", "32", "--n-train", "64", "--n-val", "32", "--n-test", "32"]
TINY_CLI += ["--backbone", "vit_tiny_patch16_224", "--weights", "none", "--batch-size", "16", "--warmup-steps", "1"]


def test_command_line_detach_list_cancel_wait(store: RunStore, capsys: pytest.CaptureFixture[str]) -> None:
    from core.__main__ import main as cli

    home = ["--home", str(store.root)]
    assert cli([*home, "train", "--detach", *TINY_CLI, "--steps", "100000", "--eval-every", "100000"]) == 0
    run_id = RUN_ID.search(capsys.readouterr().out).group(0)
    until(lambda: store.get_run(run_id)["status"] == "running", what="the detached job to start")
    assert cli([*home, "train", "--detach", *TINY_CLI, "--steps", "5", "fact", "--rank", "2"]) == 0
    queued = RUN_ID.search(capsys.readouterr().out).group(0)

    assert cli([*home, "runs", "list", "--json"]) == 0
    listed = {run["id"]: run for run in json.loads(capsys.readouterr().out)}
    assert listed[run_id]["status"] == "running" and listed[run_id]["queue_position"] is None
    assert listed[queued]["status"] == "queued" and listed[queued]["queue_position"] == 1
    assert listed[queued]["method_options"]["rank"] == 2 and listed[queued]["kind"] == "finetune"

    assert cli([*home, "runs", "cancel", run_id[:-2]]) == 0  # a unique prefix will do
    assert capsys.readouterr().out.strip().endswith(f"run {run_id}: cancelled")
    assert cli([*home, "runs", "wait", queued]) == 0
    assert f"run {queued}: completed" in capsys.readouterr().out
    assert cli([*home, "runs", "wait", run_id]) == 1  # it ended, but not completed


def test_command_line_intrinsic_dimension_is_recorded(store: RunStore, tmp_path: Path, capsys) -> None:
    from core.__main__ import main as cli

    args = ["--home", str(store.root), "intrinsic-dim", "--dataset", "digits", "--img-size", "32", "--n-train", "64"]
    args += ["--n-val", "32", "--backbone", "vit_tiny_patch16_224", "--weights", "none", "--groups", "q,v:0|fc2:0"]
    args += ["--steps", "3", "--batch-size", "16", "--d-min", "4", "--d-max", "8", "--max-trials", "2"]
    cli([*args, "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out
    (measurement,) = store.list_runs(kind="intrinsic_dim")["id"]
    assert f"measurement {measurement}:" in out and "  q,v:0 " in out  # the trials were printed as they came
    result = store.get_run(measurement)["result"]
    assert json.loads((tmp_path / "out" / "result.json").read_text())["run_id"] == measurement
    assert len(pd.read_csv(tmp_path / "out" / "curves.csv")) == len(result["curves"])


@pytest.mark.parametrize(
    ("argv", "prepared"),
    [
        (["train"], [(None, None)]),
        (["--home", "/tmp/h", "--address", "auto", "train", "--steps", "3", "lora"], [(Path("/tmp/h"), "auto")]),
        (["intrinsic-dim", "--dataset", "digits"], [(None, None)]),
        (["sweep", "run", "--grid", "g.toml"], [(None, None)]),
        (["sweep", "--grid", "g.toml"], [(None, None)]),
        (["sweep", "--grid", "g.toml", "--address", "head:6379"], [(None, "head:6379")]),  # the form
        (["--address", "a:1", "train", "--address=b:2"], [(None, "b:2")]),  # the later one, as the parser reads it
        (["sweep", "resume", "sweep-1"], [(None, None)]),
        (["train", "--detach"], []),  # may start a lasting local Ray: only once the options are checked
        (["train", "lora", "--help"], []),
        (["sweep", "run", "--grid", "g.toml", "--dry-run"], []),
        (["sweep", "list"], []),
        (["runs", "wait", "abc"], []),
        (["--home"], []),  # malformed: the full parser says what is wrong
    ],
)
def test_command_line_starts_ray_before_importing_torch_for_job_commands(argv, prepared, monkeypatch) -> None:
    """`python -m core` starts Ray and the job manager (`jobs.prepare`) before the command's modules import torch,
    for the commands that submit a job and follow it, and for no others."""
    import core.cli

    calls: list[tuple] = []
    monkeypatch.setattr(jobs, "prepare", lambda root=None, address=None: calls.append((root, address)))
    core.cli._prepare_jobs(core.cli._with_default_subcommand(argv))
    assert calls == prepared


@pytest.mark.parametrize(
    ("argv", "meant"),
    [
        (["sweep", "--grid", "g.toml"], ["sweep", "run", "--grid", "g.toml"]),
        (["--home", "h", "sweep", "--method", "fact"], ["--home", "h", "sweep", "run", "--method", "fact"]),
        (["--address", "auto", "sweep", "--grid", "g"], ["--address", "auto", "sweep", "run", "--grid", "g"]),
        (["sweep", "run", "--grid", "g.toml"], ["sweep", "run", "--grid", "g.toml"]),
        (["sweep", "list", "--json"], ["sweep", "list", "--json"]),
        (["sweep", "--help"], ["sweep", "--help"]),
        (["sweep"], ["sweep"]),
        (["train", "--steps", "3"], ["train", "--steps", "3"]),
        (["--home"], ["--home"]),
    ],
)
def test_sweep_followed_by_options_runs_a_sweep(argv, meant) -> None:
    """``python -m core sweep --grid FILE`` (the issue's form) is ``sweep run --grid FILE``; nothing else moves."""
    import core.cli

    assert core.cli._with_default_subcommand(argv) == meant


@pytest.mark.parametrize(
    ("argv", "address"),
    [
        (["sweep", "run", "--grid", "g.toml", "--address", "head:6379"], "head:6379"),
        (["--address", "a:1", "train", "--address", "b:2"], "b:2"),
        (["--address", "a:1", "intrinsic-dim"], "a:1"),
        (["sweep", "resume", "s", "--address=c:3"], "c:3"),
        (["train"], None),
    ],
)
def test_address_is_read_before_or_after_the_command(argv, address) -> None:
    """The full parser and the early reader that prepares Ray agree on which cluster a command means."""
    import core.cli

    assert core.cli.build_parser().parse_args(argv).address == address
    assert core.cli._early(argv).address == address


def test_command_line_module_imports_neither_torch_nor_timm() -> None:
    """So that Ray starts while they import (above); the command modules import them once the parser is built."""
    code = "import sys, core.cli; print(sorted(m for m in ('torch', 'timm', 'ray') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
