"""Packaging: a built wheel (what ``pip install .`` installs) carries the data files the library reads."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = "core/assets/reference_results.csv"
MINI_BENCHMARK = ("core/assets/mini_benchmark.csv", "core/assets/mini_benchmark.json")


def test_the_wheel_ships_the_reference_results_and_reads_them_installed(tmp_path: Path) -> None:
    source = tmp_path / "source"  # a copy, so the build leaves no build/ or egg-info in the checkout
    source.mkdir()
    shutil.copy(ROOT / "pyproject.toml", source)
    for package in ("core", "app"):
        shutil.copytree(ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    build = [sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation", "-q", "-w", "../dist"]
    subprocess.run(build, cwd=source, check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("petlab-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        for name in (SHIPPED, *MINI_BENCHMARK):
            assert archive.read(name) == (ROOT / name).read_bytes()
        archive.extractall(tmp_path / "installed")

    # The installed copy, not this checkout, answers `import core`, and finds its reference results.
    script = (
        "import core, core.pareto as p; "
        "print(core.__file__); print(len(p.load_reference_results()), p.reference_points('VTAB-1k')['n_tasks'].max(), "
        "len(p.mini_benchmark_results()))"
    )
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "installed")}
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, check=True, capture_output=True, text=True, timeout=120
    ).stdout.split("\n")
    assert out[0].startswith(str(tmp_path / "installed"))
    rows, tasks, mini_rows = map(int, out[1].split())
    assert rows == sum(1 for _ in (ROOT / SHIPPED).open()) - 1 + mini_rows and tasks == 19
