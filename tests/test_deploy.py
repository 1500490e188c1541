"""A server safe to expose: paths confined to the data root (data folders and weights files), problems found before
a run is recorded, skipped files reported with the run and by the command line, the Procfile's folders, the
Streamlit settings, sign-in and what the app loads from elsewhere (nothing)."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import subprocess
import zipfile
from pathlib import Path
from typing import Any

import pytest
import tomllib
import torch
from PIL import Image
from safetensors.torch import save_file

from core import jobs
from core.backbone import BackboneSpec, WeightsFileError, build_backbone, weights_file
from core.data import DataSpec
from core.experiment import Experiment, IntrinsicDimRequest, experiment_record, run_experiment, validate
from core.runs import RunStore
from core.train import TrainConfig
from tests.conftest import open_app

ROOT = Path(__file__).resolve().parents[1]
TINY_BACKBONE = BackboneSpec(name="vit_tiny_patch16_224", weights="none")
TINY_TRAIN = TrainConfig(steps=1, batch_size=8, warmup_steps=0, eval_every=1)


def _png(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (8, 8), value).save(path)


@pytest.fixture
def data_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``$PETLAB_DATA_ROOT`` = tmp/root holding pets/{cats,dogs} (6 PNGs each) and 3 bad files; the PETLab cache in
    tmp/cache."""
    root = tmp_path / "root"
    for label, cls in enumerate(("cats", "dogs")):
        for i in range(6):
            _png(root / "pets" / cls / f"{i}.png", 60 + 120 * label)
    (root / "pets" / "cats" / "empty.png").write_bytes(b"")
    (root / "pets" / "dogs" / "broken.png").write_bytes(b"\x89PNG not really")
    (root / "pets" / "dogs" / "notes.txt").write_text("not an image")
    monkeypatch.setenv("PETLAB_DATA_ROOT", str(root))
    monkeypatch.setenv("PETLAB_CACHE", str(tmp_path / "cache"))
    return root


def _folder_experiment(path: str, **data: Any) -> Experiment:
    spec = DataSpec(name=f"folder:{path}", img_size=32, val_fraction=0.25, test_fraction=0.25, **data)
    return Experiment(data=spec, backbone=TINY_BACKBONE, method="lora", options={"rank": 2}, train=TINY_TRAIN)


# ----------------------------------------------------------------------------------------------------------------
# Weights files lie inside the data root or the PETLab cache
# ----------------------------------------------------------------------------------------------------------------
def test_weights_files_outside_the_data_root_and_the_cache_are_refused(data_root: Path, tmp_path: Path) -> None:
    state = {"w": torch.zeros(2)}
    inside, cached, outside = data_root / "w.safetensors", tmp_path / "cache" / "w.safetensors", tmp_path / "w.pth"
    for path in (inside, cached, outside):
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(state, path)
    (data_root / "link.safetensors").symlink_to(outside)
    assert weights_file(inside) == inside.resolve() and weights_file(cached) == cached.resolve()
    for escape in (outside, data_root / ".." / "w.pth", data_root / "link.safetensors", Path("/etc/passwd")):
        with pytest.raises(WeightsFileError, match="outside the data root .* and the PETLab cache"):
            weights_file(escape)
    assert weights_file(outside, data_root=tmp_path) == outside.resolve()  # --data-root widens it
    with pytest.raises(WeightsFileError, match="does not exist"):
        weights_file(data_root / "absent.safetensors")
    spec = dataclasses.replace(TINY_BACKBONE, weights="/etc/passwd", img_size=32)
    with pytest.raises(WeightsFileError, match="outside the data root"):
        build_backbone(spec)  # where the worker reads it, too


# ----------------------------------------------------------------------------------------------------------------
# A problem found before training starts leaves no run in the store
# ----------------------------------------------------------------------------------------------------------------
def test_bad_data_and_weights_paths_are_refused_before_anything_is_recorded(data_root: Path, tmp_path: Path) -> None:
    store = RunStore(tmp_path / "home")
    (tmp_path / "elsewhere" / "a").mkdir(parents=True)
    bad = {
        "nowhere": _folder_experiment("nowhere"),
        "outside": _folder_experiment(str(tmp_path / "elsewhere")),
        "a file": _folder_experiment("pets/cats/0.png"),
        "weights outside": dataclasses.replace(
            _folder_experiment("pets"), backbone=dataclasses.replace(TINY_BACKBONE, weights="/etc/passwd")
        ),
        "missing weights": dataclasses.replace(
            _folder_experiment("pets"), backbone=dataclasses.replace(TINY_BACKBONE, weights=str(data_root / "no.pth"))
        ),
    }
    messages = {
        "nowhere": "not an existing folder",
        "outside": "outside the allowed data root",
        "a file": r"not an existing folder \(a file\)",
        "weights outside": "outside the data root",
        "missing weights": "does not exist",
    }
    for name, experiment in bad.items():
        with pytest.raises(ValueError, match=messages[name]):
            validate(experiment)
        with pytest.raises(ValueError, match=messages[name]):
            run_experiment(experiment, store)  # in this process
        with pytest.raises(ValueError, match=messages[name]):
            jobs.submit("finetune", experiment, store.root)  # refused before Ray is asked for anything
    request = IntrinsicDimRequest(data=_folder_experiment("nowhere").data, backbone=TINY_BACKBONE)
    with pytest.raises(ValueError, match="not an existing folder"):
        jobs.submit("intrinsic_dim", request, store.root)
    assert store.list_runs(kind=None).empty
    assert validate(_folder_experiment("pets")).experiment.data.name == "folder:pets"  # relative to the data root


# ----------------------------------------------------------------------------------------------------------------
# Skipped files: recorded with the run, printed by the command line
# ----------------------------------------------------------------------------------------------------------------
def test_skipped_files_are_recorded_with_the_run(data_root: Path, tmp_path: Path) -> None:
    store = RunStore(tmp_path / "home")
    run = store.get_run(run_experiment(_folder_experiment("pets"), store))
    assert run["status"] == "completed", run["message"]
    skipped = run["skipped_files"]
    reasons = dict(skipped["first"])
    assert skipped["count"] == 3 and set(reasons) == {"cats/empty.png", "dogs/broken.png", "dogs/notes.txt"}
    assert "empty file" in reasons["cats/empty.png"] and "not an image file" in reasons["dogs/notes.txt"]
    assert store.list_runs()["skipped_files.count"].tolist() == [3]  # a column of the runs table too


def _in_process_submit(ns: Any, kind: str, spec: Any, title: str) -> dict[str, Any]:
    """The command line's `submit` without Ray: the worker's path, which records a failure and does not raise."""
    store = RunStore(ns.home)
    with contextlib.suppress(ValueError):
        run_experiment(spec, store, data_root=ns.data_root)
    return store.get_run(store.list_runs()["id"].iloc[0])


def test_command_line_prints_the_skipped_files_and_refuses_them_on_request(
    data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import core.cli as cli
    import core.cli.train

    monkeypatch.setattr(core.cli.train, "submit", _in_process_submit)
    for i in range(4):  # 7 bad files: 5 named, the others counted
        (data_root / "pets" / "cats" / f"empty{i}.jpg").write_bytes(b"")
    args = ["--home", str(tmp_path / "home"), "train", "--dataset", "folder:pets", "--img-size", "32"]
    args += ["--backbone", "vit_tiny_patch16_224", "--weights", "none", "--steps", "1", "--batch-size", "8"]
    args += ["--warmup-steps", "0", "--eval-every", "1"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "7 file(s) of folder:pets left out" in out
    named = [line for line in out.splitlines() if line.startswith("  ") and ": " in line and "/" in line]
    assert len(named) == 5 and "  dogs/notes.txt: not an image file (extension '.txt')" in out
    assert "... and 2 more" in out

    assert cli.main([*args, "--on-bad-file", "error"]) == 1
    out = capsys.readouterr().out
    assert "failed: 7 bad file(s)" in out and "left out" not in out
    runs = RunStore(tmp_path / "home").list_runs()
    assert runs["dataset.on_bad_file"].tolist() == ["error", "skip"]


# ----------------------------------------------------------------------------------------------------------------
# The Procfile's folders
# ----------------------------------------------------------------------------------------------------------------
def _procfile_environment(tmp_path: Path, **env: str) -> dict[str, str]:
    """What the Procfile's web command hands to streamlit: a fake ``streamlit`` on PATH prints its environment."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake = bin_dir / "streamlit"
    fake.write_text('#!/bin/sh\necho "DATA_ROOT=$PETLAB_DATA_ROOT"\necho "ARGS=$*"\n')
    fake.chmod(0o755)
    (line,) = [line for line in (ROOT / "Procfile").read_text().splitlines() if line.startswith("web:")]
    base = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path / "home"), "PORT": "8123"}
    done = subprocess.run(
        ["bash", "-c", line.removeprefix("web:")], env={**base, **env}, cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    return dict(row.split("=", 1) for row in done.stdout.splitlines())


def test_the_procfile_gives_the_deployment_its_own_data_root(tmp_path: Path) -> None:
    shown = _procfile_environment(tmp_path)
    home = tmp_path / "home"
    assert Path(shown["DATA_ROOT"]) == home / "petlab-data" and (home / "petlab-data").is_dir()
    assert "--server.port=8123" in shown["ARGS"] and "--server.headless=true" in shown["ARGS"]
    chosen = tmp_path / "chosen"
    assert Path(_procfile_environment(tmp_path, PETLAB_DATA_ROOT=str(chosen))["DATA_ROOT"]) == chosen
    assert chosen.is_dir()


def test_streamlit_settings_of_an_exposed_server() -> None:
    from streamlit import config as streamlit_config

    from core.data.uploads import UploadLimits

    config = tomllib.loads((ROOT / ".streamlit" / "config.toml").read_text())
    assert config["browser"]["gatherUsageStats"] is False
    assert config["server"]["maxUploadSize"] * 2**20 == UploadLimits().archive_bytes  # Streamlit counts MB of 2**20
    assert config["client"]["showErrorDetails"] in ("none", "type")  # no tracebacks for visitors
    assert not any("http" in str(value) for value in config.get("theme", {}).values())  # no remote fonts
    # A job's progress is polled every second: no full garbage collection and no source re-scan after each poll
    # (they kept a third of a core busy), under option names this Streamlit knows.
    assert config["runner"]["postScriptGC"] is False and config["server"]["fileWatcherType"] == "none"
    assert {"runner.postScriptGC", "server.fileWatcherType"} <= set(streamlit_config.get_config_options())


# ----------------------------------------------------------------------------------------------------------------
# The app: sign-in, uploads, refusals before Start, skipped files, nothing fetched from elsewhere
# ----------------------------------------------------------------------------------------------------------------
SIGNED_OUT = {"is_logged_in": False}  # what st.user holds when secrets.toml configures sign-in and nobody signed in


def _signed_in(email: str) -> dict[str, Any]:
    return {"is_logged_in": True, "email": email, "name": email.split("@")[0]}


@pytest.fixture
def app_home(data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> RunStore:
    """The app's run store in tmp/home, its data root the `data_root` fixture's."""
    monkeypatch.setenv("PETLAB_HOME", str(tmp_path / "home"))
    return RunStore(tmp_path / "home")


def _queued_run(store: RunStore, owner: str | None) -> str:
    record = experiment_record(validate(_folder_experiment("pets")).experiment)
    return store.create_run({**record, "owner": owner}, status="queued")


def test_signed_out_visitors_start_nothing_and_upload_nothing(app_home: RunStore) -> None:
    at = open_app("app_pages/train.py", user=SIGNED_OUT)
    assert [b.key for b in at.sidebar.button] == ["auth.login"]
    assert any("Sign in (in the sidebar) to upload" in i.value for i in at.info)
    assert not at.file_uploader
    at.button(key="ft.start").click().run()
    assert any("Sign in (in the sidebar) to start jobs" in e.value for e in at.error)
    assert app_home.list_runs(kind=None).empty


def test_a_signed_in_user_cancels_and_deletes_only_their_own_jobs(app_home: RunStore) -> None:
    theirs = _queued_run(app_home, "ann@example.org")
    at = open_app("app_pages/train.py", user=_signed_in("ann@example.org"))
    assert [b.key for b in at.sidebar.button] == ["auth.logout"]
    assert any("Signed in as ann@example.org" in c.value for c in at.sidebar.caption)
    assert at.button(key="ft.cancel")  # her job, started in another browser: she may cancel it
    other = open_app("app_pages/train.py", user=_signed_in("bob@example.org"))
    assert not [b for b in other.button if b.key == "ft.cancel"]
    signed_out = open_app("app_pages/train.py", user=SIGNED_OUT, query={"run": theirs})  # even with the job's address
    assert not [b for b in signed_out.button if b.key == "ft.cancel"]

    at.button(key="ft.cancel").click().run()
    assert app_home.get_run(theirs)["status"] == "cancelled"
    runs_page = open_app("app_pages/runs.py", user=_signed_in("bob@example.org"))
    assert runs_page.button(key="runs.delete").disabled
    assert not open_app("app_pages/runs.py", user=_signed_in("ann@example.org")).button(key="runs.delete").disabled


def test_an_open_server_keeps_the_browser_rules(app_home: RunStore) -> None:
    run_id = _queued_run(app_home, None)
    assert not [b for b in open_app("app_pages/train.py").button if b.key == "ft.cancel"]  # not started here
    at = open_app("app_pages/train.py", query={"run": run_id})  # the browser that started it
    assert at.button(key="ft.cancel") and not at.sidebar.button
    assert not open_app("app_pages/runs.py").button(key="runs.delete").disabled


def test_start_refuses_a_missing_folder_before_anything_is_recorded(app_home: RunStore) -> None:
    at = open_app("app_pages/train.py")
    at.selectbox(key="ft.data.name").set_value("folder:").run()
    at.text_input(key="ft.data.path").input("nowhere").run()
    at.button(key="ft.start").click().run()
    assert any("not an existing folder" in e.value for e in at.error)
    at.text_input(key="ft.data.path").input("/etc").run()
    at.button(key="ft.start").click().run()
    assert any("outside the allowed data root" in e.value for e in at.error)
    assert app_home.list_runs(kind=None).empty


def test_an_uploaded_zip_becomes_the_chosen_dataset(app_home: RunStore, data_root: Path) -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path in sorted((data_root / "pets").rglob("*.png")):
            archive.write(path, Path("my pets") / path.relative_to(data_root / "pets"))
        archive.writestr("../escape.png", b"x")
    at = open_app("app_pages/train.py", user=_signed_in("ann@example.org"))
    at.file_uploader(key="ft.data.upload.file").set_value(("bad.zip", buffer.getvalue(), "application/zip")).run()
    at.button(key="ft.data.upload.start").click().run()
    assert any("climbs out of its folder" in e.value for e in at.error)

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path in sorted((data_root / "pets").rglob("*.png")):
            archive.write(path, Path("my pets") / path.relative_to(data_root / "pets"))
    at.file_uploader(key="ft.data.upload.file").set_value(("My Pets.zip", buffer.getvalue(), "application/zip"))
    at.run()
    at.button(key="ft.data.upload.start").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert any("folder:uploads/My-Pets" in s.value for s in at.success)
    assert at.selectbox(key="ft.data.name").value == "folder:"
    assert at.text_input(key="ft.data.path").value == "uploads/My-Pets"
    assert sorted(p.name for p in (data_root / "uploads" / "My-Pets").iterdir()) == ["cats", "dogs"]
    assert not (data_root / "escape.png").exists() and not (data_root.parent / "escape.png").exists()


def test_the_run_views_list_the_skipped_files(app_home: RunStore) -> None:
    run_id = run_experiment(_folder_experiment("pets"), app_home)
    for page, query in (("app_pages/train.py", {"run": run_id}), ("app_pages/runs.py", {})):
        at = open_app(page, query=query)
        (notice,) = [e for e in at.expander if "3 file(s) of the dataset were left out" in e.label]
        table = notice.dataframe[0].value
        assert set(table["file"]) == {"cats/empty.png", "dogs/broken.png", "dogs/notes.txt"}


def test_nothing_the_app_shows_is_fetched_from_another_server(
    app_home: RunStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    import streamlit
    from streamlit.string_util import is_emoji

    icons: list[Any] = []
    original = streamlit.set_page_config
    monkeypatch.setattr(streamlit, "set_page_config", lambda **kw: icons.append(kw["page_icon"]) or original(**kw))
    open_app("app_pages/train.py")
    # A ":material/...:" page icon becomes a favicon URL on fonts.gstatic.com in Streamlit's frontend; an emoji is
    # drawn by the browser into a data: URL.
    assert icons and all(isinstance(icon, str) and is_emoji(icon) for icon in icons)
    # The Material Symbols font of the pages' icons ships inside Streamlit, served by the app's own server.
    static = Path(streamlit.__file__).parent / "static" / "static"
    assert list((static / "media").glob("MaterialSymbols-Rounded*.woff2"))
    assert any("MaterialSymbols" in css.read_text() for css in (static / "css").glob("*.css"))
