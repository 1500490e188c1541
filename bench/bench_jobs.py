"""The job engine, measured (not a test). Each figure is printed with how it was measured.

python bench/bench_jobs.py overhead [--rounds 2] [--steps N]
    Whole-process wall time of ``python -m core train`` (the default demo, through the embedded Ray: Ray start,
    job manager, worker import, training, adapter back to the store) against the same experiment trained in
    one process without Ray (``run_experiment``), interleaved round by round; the ratio of medians. Target:
    at most 1.05x. Also Ray's own floor: the same experiment as one bare Ray task from a fresh process that
    imports nothing but Ray (Ray starts at once, the worker imports the training stack and writes to the store
    itself; no job manager, no checking of options, no following), which any job on an embedded Ray pays.
python bench/bench_jobs.py latency
    First-job latency: from the start of a fresh process to its first job training (Ray start, job manager,
    worker start and import), and from submitting a second job to its training on a warm Ray.
python bench/bench_jobs.py loaded [--rounds 1] [--steps 40]
    The default demo's training in a fresh process on a quiet machine, then beside a CPU-bound process with two
    threads (the default), two threads and OMP_WAIT_POLICY=PASSIVE, and one thread, interleaved round by round:
    which thread settings hold up on a loaded machine?
python bench/bench_jobs.py app-cpu
    The Streamlit server's CPU use while a fine-tune started from its Fine-tune page trains (a headless
    Chromium clicks Start; needs playwright and /usr/bin/chromium): CPU seconds of the server's process over
    the wall seconds of the training. Target: under 5% of one core.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing it

from core.jobs import SYSTEM_CONFIG  # noqa: E402 - the bare Ray task starts Ray with the same settings

IN_PROCESS = """
import sys
from core.experiment import DEMO, run_experiment
from core.runs import RunStore
import dataclasses
steps = int(sys.argv[2])
experiment = DEMO if steps == 0 else dataclasses.replace(DEMO, train=dataclasses.replace(DEMO.train, steps=steps))
run_experiment(experiment, RunStore(sys.argv[1]))
"""

BARE_RAY = """
import os, sys, logging
import ray
cpus = os.cpu_count()
ray.init(address="local", num_cpus=cpus, include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False,
    _system_config=SYSTEM_CONFIG)  # as core.jobs starts it

@ray.remote(num_cpus=cpus, max_retries=0)
def job(home, steps):
    import torch
    torch.set_num_threads(cpus)  # as core.jobs does
    sys.argv = ["", home, str(steps)]
    exec(IN_PROCESS)

ray.get(job.remote(sys.argv[1], sys.argv[2]))
""".replace("IN_PROCESS", repr(IN_PROCESS)).replace("SYSTEM_CONFIG", repr(SYSTEM_CONFIG))


def timed(command: list[str], env: dict[str, str] | None = None) -> float:
    start = time.perf_counter()
    subprocess.run(command, cwd=ROOT, check=True, capture_output=True, env=env)
    return time.perf_counter() - start


def phases(command: list[str], home: str) -> dict[str, float]:
    """Run ``command`` (one fine-tune into the store at ``home``) and split its wall time by the run's metrics:
    ``start`` (process start to its first training step), ``train`` (first to last training step, with the
    validation passes between), ``end`` (last step to process exit: test pass, adapter, shutdown), ``total``, and
    ``images_per_s`` (median of the steps' throughput, which no validation pass dilutes)."""
    from core.runs import RunStore

    start = time.time()
    end = start + timed(command)
    store = RunStore(home)
    metrics = store.metrics(str(store.list_runs()["id"].iloc[0]))
    steps = metrics[metrics["split"].eq("train") & metrics["name"].eq("images_per_s")].sort_values("step")
    first, last = float(steps["time"].iloc[0]), float(steps["time"].iloc[-1])
    return {
        "start": first - start,
        "train": last - first,
        "end": end - last,
        "total": end - start,
        "images_per_s": float(steps["value"].iloc[1:].median()),  # the first step's includes its warm-up
    }


def load() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.1f} (1 min), {five:.1f} (5 min) on {os.cpu_count()} cores"


def overhead(rounds: int, steps: int) -> None:
    extra = [] if steps == 0 else ["--steps", str(steps)]
    commands = {
        "through Ray": lambda home: [sys.executable, "-m", "core", "--home", home, "train", "--quiet", *extra],
        "in one process": lambda home: [sys.executable, "-c", IN_PROCESS, home, str(steps)],
        "bare Ray task": lambda home: [sys.executable, "-c", BARE_RAY, home, str(steps)],
    }
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in commands}
    for index in range(rounds):
        for name, command in commands.items():
            with tempfile.TemporaryDirectory() as home:
                runs[name].append(phases(command(home), home))
        print(f"round {index + 1}: " + ", ".join(f"{name} {runs[name][-1]['total']:.1f} s" for name in runs))
    median = {
        name: {key: statistics.median(run[key] for run in each) for key in each[0]} for name, each in runs.items()
    }
    for name, parts in median.items():
        print(
            f"  {name}: {parts['total']:.1f} s = start to first step {parts['start']:.1f} s + training "
            f"{parts['train']:.1f} s + last step to exit {parts['end']:.1f} s; {parts['images_per_s']:.1f} images/s"
        )
    ratio = median["through Ray"]["total"] / median["in one process"]["total"]
    print(
        f"default demo{'' if steps == 0 else f' at {steps} steps'}, whole process, median of {rounds}: through Ray "
        f"{median['through Ray']['total']:.1f} s, in one process {median['in one process']['total']:.1f} s, ratio "
        f"{ratio:.3f} (target <= 1.05); {load()}"
    )
    bare = median["bare Ray task"]["total"]
    print(
        f"Ray's own floor: the demo as a bare Ray task {bare:.1f} s, {bare / median['in one process']['total']:.3f}x "
        f"in one process; PETLab's engine {median['through Ray']['total'] / bare:.3f}x the bare Ray task"
    )


LATENCY = """
import sys, time
t0 = float(sys.argv[2])
from core import jobs
from core.backbone import BackboneSpec
from core.data import DataSpec
from core.experiment import Experiment
from core.runs import RunStore
from core.train import TrainConfig
store = RunStore(sys.argv[1])
experiment = Experiment(data=DataSpec(name="digits", img_size=32, n_train=64, n_val=32, n_test=32),
    backbone=BackboneSpec(name="vit_tiny_patch16_224", weights="none"), method="fact",
    train=TrainConfig(steps=20, batch_size=16, warmup_steps=1, eval_every=20))
def first_step(run_id):
    while not len(store.metrics(run_id)) and store.get_run(run_id)["status"] in ("queued", "running"):
        time.sleep(0.02)
    return time.time()
run_id = jobs.submit("finetune", experiment, store.root)
cold = first_step(run_id) - t0
jobs.wait(store, run_id)
submitted = time.time()
warm = first_step(jobs.submit("finetune", experiment, store.root)) - submitted
print(f"{cold:.2f} {warm:.2f}")
"""


def latency() -> None:
    with tempfile.TemporaryDirectory() as home:
        command = [sys.executable, "-c", LATENCY, home, repr(time.time())]
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    cold, warm = map(float, done.stdout.split())
    print(
        f"first job: {cold:.1f} s from a fresh process to its first logged step (imports, Ray start, job manager, "
        f"worker start and import; its first 10 steps of a tiny ViT included); a second job: {warm:.1f} s from "
        f"submit to its first logged step; {load()}"
    )


LOADED_SETTINGS = {
    "2 threads": {},
    "2 threads, OMP_WAIT_POLICY=PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"},
    "1 thread": {"OMP_NUM_THREADS": "1"},
}
"""Thread settings compared beside a CPU-bound process: the default (torch's threads = the cores, OpenMP's
default waiting), passive waiting, and one thread."""


def loaded(rounds: int, steps: int) -> None:
    """The default demo's training (``steps`` steps in one process) on a quiet machine, then beside a CPU-bound
    process with each of `LOADED_SETTINGS`, interleaved round by round; medians."""
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    command = [sys.executable, "-c", IN_PROCESS]
    quiet: list[float] = []
    beside: dict[str, list[float]] = {name: [] for name in LOADED_SETTINGS}
    for index in range(rounds):
        with tempfile.TemporaryDirectory() as home:
            quiet.append(timed([*command, home, str(steps)], env=base))
        hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        try:
            for name, settings in LOADED_SETTINGS.items():
                with tempfile.TemporaryDirectory() as home:
                    beside[name].append(timed([*command, home, str(steps)], env=base | settings))
        finally:
            hog.kill()
        shown = ", ".join(f"{name} {times[-1]:.1f} s" for name, times in beside.items())
        print(f"round {index + 1}: quiet (2 threads) {quiet[-1]:.1f} s; beside a CPU-bound process: {shown}")
    reference = statistics.median(beside["2 threads"])
    print(f"{steps} steps of the default demo in one process, whole process, median of {rounds} ({load()}):")
    print(f"  quiet, 2 threads: {statistics.median(quiet):.1f} s")
    for name, times in beside.items():
        print(
            f"  beside a CPU-bound process, {name}: {statistics.median(times):.1f} s "
            f"({statistics.median(times) / reference:.3f}x the default's)"
        )


APP_CPU = textwrap.dedent(
    """
    import sys, time
    from playwright.sync_api import sync_playwright
    url = sys.argv[1]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium",
                                    args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        page = browser.new_page()
        page.goto(url + "/train", wait_until="networkidle")
        page.get_by_role("button", name="Start", exact=True).click()
        page.get_by_role("button", name="Cancel").wait_for(timeout=120_000)
        print("clicked", flush=True)
        page.wait_for_selector("text=completed:", timeout=1_200_000)
        print("done", flush=True)
        browser.close()
    """
)


def app_cpu() -> None:
    import psutil

    from core.runs import RunStore

    with tempfile.TemporaryDirectory() as home:
        env = {**os.environ, "PETLAB_HOME": home}
        port = "8599"
        server = subprocess.Popen(
            [sys.executable, "-m", "streamlit", "run", "app/streamlit_app.py", "--server.port", port],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            time.sleep(8)
            process = psutil.Process(server.pid)
            browser = subprocess.Popen(
                [sys.executable, "-c", APP_CPU, f"http://localhost:{port}"], stdout=subprocess.PIPE, text=True
            )
            assert browser.stdout is not None
            assert browser.stdout.readline().strip() == "clicked"
            store = RunStore(home)
            while store.list_runs(status="running").empty:
                time.sleep(0.2)
            cpu0, wall0 = sum(process.cpu_times()[:2]), time.perf_counter()
            browser.stdout.readline()
            cpu1, wall1 = sum(process.cpu_times()[:2]), time.perf_counter()
            browser.wait()
        finally:
            server.terminate()
            server.wait(30)
    share = (cpu1 - cpu0) / (wall1 - wall0)
    print(
        f"Streamlit server while the default demo trains from its Fine-tune page, with the page open and polling: "
        f"{cpu1 - cpu0:.1f} CPU s over {wall1 - wall0:.1f} s = {100 * share:.1f}% of one core (target < 5%); {load()}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=("overhead", "latency", "loaded", "app-cpu"))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--steps", type=int, default=0, help="steps of the demo (overhead: 0 = its own; loaded: 0 = 40)"
    )
    ns = parser.parse_args()
    if ns.what == "overhead":
        overhead(ns.rounds, ns.steps)
    elif ns.what == "latency":
        latency()
    elif ns.what == "loaded":
        loaded(ns.rounds, ns.steps or 40)
    else:
        app_cpu()


if __name__ == "__main__":
    main()
