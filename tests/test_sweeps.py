"""Sweeps: the grid's two forms, refusing a bad point, resuming, cancelling, and a whole sweep on a local Ray
(num_cpus=2) through the command line."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from core import jobs, sweeps
from core.cli import build_parser, main
from core.cli.sweep import sweep_spec
from core.experiment import experiment_record
from core.runs import RunStore
from tests.test_jobs import until

TINY = ["--backbone", "vit_tiny_patch16_224", "--weights", "none", "--img-size", "32"]
TINY += ["--n-train", "64", "--n-val", "32", "--n-test", "32", "--batch-size", "16", "--warmup-steps", "1"]

GRID_TOML = """
seeds = [0, 1]
datasets = ["digits"]

[backbone]
name = "vit_tiny_patch16_224"
weights = "none"

[data]
img_size = 32

[train]
steps = 100

[[method]]
name = "lora"
rank = [4, 8]

[[method]]
name = "fact"
rank = 8
"""


def flag_spec(*argv: str) -> sweeps.SweepSpec:
    return sweep_spec(build_parser().parse_args(["sweep", "run", *argv]))


def tiny_spec(methods: list[str], seeds: str = "0", steps: int = 5) -> sweeps.SweepSpec:
    argv = [arg for flag in methods for arg in ("--method", flag)]
    return flag_spec(*argv, "--dataset", "digits", "--seeds", seeds, "--steps", str(steps), *TINY)


def test_toml_and_flags_expand_to_the_same_points(tmp_path: Path) -> None:
    grid = tmp_path / "grid.toml"
    grid.write_text(GRID_TOML)
    from_file = sweeps.expand(sweeps.load_grid(grid))
    from_flags = sweeps.expand(
        flag_spec(
            *("--method", "lora:rank=4,8", "--method", "fact:rank=8", "--dataset", "digits", "--seeds", "0,1"),
            *("--steps", "100", "--backbone", "vit_tiny_patch16_224", "--weights", "none", "--img-size", "32"),
        )
    )
    assert [sweeps.point_key(p) for p in from_file] == [sweeps.point_key(p) for p in from_flags]
    points = {(p.method, p.options["rank"], p.train.seed) for p in from_file}
    assert points == {(m, r, s) for m, r in (("lora", 4), ("lora", 8), ("fact", 8)) for s in (0, 1)}
    assert len(from_file) == 6
    assert all(p.train.steps == 100 and p.data.img_size == 32 and p.data.name == "digits" for p in from_file)
    assert from_file[0].options == {"rank": 4, "alpha": 8.0, "dropout": 0.0, "targets": "q,v"}  # defaults resolved
    # The recorded form of the grid reads back as the same grid.
    spec = sweeps.load_grid(grid)
    assert sweeps.SweepSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


def test_flags_take_axes_and_targets_with_commas() -> None:
    spec = flag_spec(
        *("--method", "lora:rank=4,targets=q,v|all", "--dataset", "digits,count", "--lr", "1e-3,5e-3"),
        *("--backbone", "vit_tiny_patch16_224", "--weights", "none", "--img-size", "32"),
    )
    points = sweeps.expand(spec)
    assert {(p.options["targets"], p.data.name, p.train.lr) for p in points} == {
        (t, d, lr) for t in ("q,v", "all") for d in ("digits", "count") for lr in (1e-3, 5e-3)
    }
    assert len({p.label for p in points}) == len(points) == 8  # each label names what varies


def test_a_bad_point_refuses_the_whole_sweep_with_nothing_recorded(tmp_path: Path) -> None:
    store = RunStore(tmp_path / "home")
    with pytest.raises(ValueError, match=r"sweep point 2 of 3 \(lora rank=0 · digits · seed 0\).*rank=0"):
        sweeps.submit_sweep(tiny_spec(["lora:rank=4,0", "fact"]), store.root)
    with pytest.raises(ValueError, match="unknown dataset 'nope'"):
        sweeps.submit_sweep(flag_spec("--method", "fact", "--dataset", "digits,nope", *TINY), store.root)
    with pytest.raises(ValueError, match="unknown key.*seed.*seeds = "):
        sweeps.SweepSpec.from_dict({"method": [{"name": "fact"}], "datasets": ["digits"], "train": {"seed": 1}})
    assert store.list_runs(kind=None).empty
    assert sweeps.list_sweeps(store.root) == [] and not (store.root / sweeps.SWEEPS_DIR).exists()
    assert main(["--home", str(store.root), "sweep", "run", "--method", "lora:rank=0", "--dataset", "digits"]) == 2
    assert main(["--home", str(store.root), "sweep", "--method", "lora:rank=0", "--dataset", "digits"]) == 2


def test_resuming_submits_only_the_points_without_a_result(tmp_path: Path, monkeypatch) -> None:
    """The resume logic, with `jobs.submit` replaced by recording the run queued (what the job manager does)."""
    store = RunStore(tmp_path / "home")

    def record_queued(kind, point, root, *, sweep_id, **options):
        return store.create_run({**experiment_record(point.experiment), "sweep_id": sweep_id}, status="queued")

    monkeypatch.setattr(jobs, "submit", record_queued)
    spec = tiny_spec(["lora:rank=2,4", "fact:rank=2,4"], steps=5)  # 4 points
    sweep_id = sweeps.submit_sweep(spec, store.root)
    first = sweeps.load_sweep(store.root, sweep_id)["submissions"][-1]["submitted"]
    assert len(first) == 4 and sweeps.summarize(store, sweep_id).queued == 4
    for run_id, status in zip(first, ("completed", "diverged", "failed", "cancelled"), strict=True):
        store.start_run(run_id)
        store.finish_run(run_id, status)
    summary = sweeps.summarize(store, sweep_id)
    assert (summary.done, summary.diverged, summary.failed, summary.cancelled) == (1, 1, 1, 1)
    assert summary.status == "incomplete"

    assert sweeps.resume_sweep(sweep_id[:18], store.root) == sweep_id  # a prefix of the id will do
    again = sweeps.load_sweep(store.root, sweep_id)["submissions"][-1]
    assert again["skipped"] == 2 and len(again["submitted"]) == 2
    resubmitted = {sweeps.point_key(store.get_run(r)) for r in again["submitted"]}
    assert resubmitted == {sweeps.point_key(store.get_run(r)) for r in first[2:]}  # the failed and the cancelled
    summary = sweeps.summarize(store, sweep_id)
    assert (summary.done, summary.diverged, summary.failed, summary.cancelled, summary.queued) == (1, 1, 0, 0, 2)
    sweeps.resume_sweep(sweep_id, store.root)  # queued points are not submitted twice
    assert len(store.list_runs(sweep_id=sweep_id)) == 6


# ----------------------------------------------------------------------------------------------------------------
# On a local Ray
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.usefixtures("ray_local")
def test_a_four_point_sweep_completes_and_resuming_runs_nothing_new(tmp_path: Path, capsys) -> None:
    home = str(tmp_path / "home")
    argv = ["--home", home, "sweep", "run", "--method", "lora:rank=2,4", "--dataset", "digits", "--seeds", "0,1"]
    assert main([*argv, "--steps", "5", "--eval-every", "5", "--name", "tiny", *TINY]) == 0
    store = RunStore(home)
    runs = store.list_runs()
    assert len(runs) == 4 and set(runs["status"]) == {"completed"} and runs["sweep_id"].nunique() == 1
    sweep_id = runs["sweep_id"].iloc[0]
    assert set(runs["label"]) == {f"tiny: lora rank={r} · digits · seed {s}" for r in (2, 4) for s in (0, 1)}
    assert all(store.adapter_path(run_id).is_file() for run_id in runs["id"])
    capsys.readouterr()
    assert main(["--home", home, "sweep", "list", "--json"]) == 0
    (listed,) = json.loads(capsys.readouterr().out)
    assert (listed["id"], listed["points"], listed["done"], listed["failed"], listed["status"]) == (
        sweep_id,
        4,
        4,
        0,
        "completed",
    )

    assert main(["--home", home, "sweep", "resume", sweep_id]) == 0
    assert len(store.list_runs()) == 4  # nothing ran again
    submission = sweeps.load_sweep(home, sweep_id)["submissions"][-1]
    assert submission["submitted"] == [] and submission["skipped"] == 4

    # The estimate calibrates itself on these runs: for the same points it is their median wall time plus the start.
    points = sweeps.check_points(sweeps.SweepSpec.from_dict(sweeps.load_sweep(home, sweep_id)["spec"]))
    guess = sweeps.estimate(points, store, device="cpu")
    assert "calibrated by 4 recent completed runs on cpu" in guess.basis
    walls = store.list_runs()["wall_time_s"]
    for seconds in guess.seconds:
        assert seconds - sweeps.START_S == pytest.approx(statistics.median(walls), rel=1e-6)


@pytest.mark.usefixtures("ray_local")
def test_cancelling_a_sweep_cancels_its_queued_points(tmp_path: Path) -> None:
    store = RunStore(tmp_path / "home")
    spec = tiny_spec(["fact:rank=2,4,8"], steps=100_000)
    sweep_id = sweeps.submit_sweep(spec, store.root, resources=jobs.Resources(cpus=2))  # one point at a time
    points = list(store.list_runs(sweep_id=sweep_id)["id"])
    assert len(points) == 3
    running = until(
        lambda: next(iter(store.list_runs(sweep_id=sweep_id, status="running")["id"]), None),
        what="a point of the sweep to start",
    )
    summary = sweeps.summarize(store, sweep_id)
    assert (summary.running, summary.queued, summary.status) == (1, 2, "running")
    assert sweeps.cancel_sweep(sweep_id[:20], store.root) == {"cancelled": 2, "stopping": 1}
    for run_id in points:
        if run_id != running:  # a queued point ends at once
            run = store.get_run(run_id)
            assert (run["status"], run["message"]) == ("cancelled", "cancelled while queued")
    summary = sweeps.wait_sweep(store, sweep_id, timeout=60)
    assert (summary.cancelled, summary.done, summary.status) == (3, 0, "cancelled")
    assert store.get_run(running)["status"] == "cancelled"
