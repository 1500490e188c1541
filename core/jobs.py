"""Long work on Ray: fine-tunes and intrinsic-dimension measurements run in worker processes, never in the caller.

Read in this order:
    1. Connecting: an embedded local Ray started on first use (no dashboard, one CPU per core), or an existing
       cluster given by ``address`` / ``$PETLAB_RAY_ADDRESS`` (``ray start --head`` on a GPU box).
    2. The job manager: one Ray actor per run store, on the node that holds the store. It is the store's single
       writer for Ray work: it records each job ``queued``, submits it as a Ray task that reserves the job's
       resources, writes what workers send back (progress, metrics, the adapter's bytes), and notices workers that
       died. On an external cluster it is detached, so jobs go on while the app or the command restarts.
    3. The worker: the same ``run_experiment`` / ``run_intrinsic_dim`` the in-process path runs, with a store proxy
       that forwards every write to the manager, so a worker on another node needs no shared disk.
    4. The caller's side: ``submit``, ``cancel``, ``wait``, the queue position; pages and the command line poll the
       run store, which stays the single source of truth.

Work that does not fit the free resources waits in Ray's queue; its run is ``queued`` in the store meanwhile. A CPU
job reserves the CPUs its torch threads use (by default every core of one machine, so a 2-core laptop trains one
fine-tune at a time); a GPU job reserves one GPU. Cancelling goes through the store (`RunStore.request_cancel`), so
the command line, any browser session and a restarted app can cancel any job: a queued one ends at once, a running
one stops before its next training step.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import pickle
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from core.runs import FINISHED_STATUSES, RunStore, default_root

if TYPE_CHECKING:
    from core.experiment import CheckedExperiment, Experiment, IntrinsicDimRequest

ADDRESS_ENV = "PETLAB_RAY_ADDRESS"
NAMESPACE = "petlab"
SYSTEM_CONFIG = {"worker_niceness": 0}
"""Settings of a Ray started here. Ray runs its workers at niceness 15 by default: a fine-tune the user waits for
would then get almost no CPU beside any other busy process (a browser, the app, another engineer's tests)."""
POLL_S = 0.5
"""How often the manager looks for finished or dead workers and for cancelled queued jobs."""

JobKind = Literal["finetune", "intrinsic_dim"]
_connect_lock = threading.Lock()


# ----------------------------------------------------------------------------------------------------------------
# 1. Connecting
# ----------------------------------------------------------------------------------------------------------------
def connect(address: str | None = None, num_cpus: int | None = None, persistent: bool = False) -> str:
    """Connect this process to Ray once; later calls return at once. Returns the cluster's address.

    Ray is started from a thread that lives as long as this process: Ray's local processes get Linux's
    parent-death signal, which kills them when the *thread* that started them ends, and callers such as Streamlit
    run each script run in a thread of its own.

    Args:
        address: An existing cluster (``HOST:PORT`` of ``ray start --head``, or ``auto`` for the one running on
            this machine); None means ``$PETLAB_RAY_ADDRESS``, and when that is unset an embedded local Ray that
            lives as long as this process.
        num_cpus: CPUs of a Ray started here (default: this machine's cores); ignored for an existing cluster.
        persistent: With no address, use a local cluster that outlives this process (jobs that must go on after
            the command returns): the one running on this machine, else one started with ``ray start --head``.
    """
    global _connecting
    with _connect_lock:  # once connected, the same future; after ``ray.shutdown`` a call connects afresh
        if _connecting is None or (_connecting.done() and (_connecting.exception() or not _ray_initialized())):
            _connecting = Future()
            arguments = (_connecting, address, num_cpus, persistent)
            threading.Thread(target=_connect_and_stay, args=arguments, name="petlab-ray", daemon=True).start()
        connecting = _connecting
    return connecting.result()


_connecting: Future[str] | None = None


def _ray_initialized() -> bool:
    import ray

    return ray.is_initialized()


def _connect_and_stay(outcome: Future[str], address: str | None, num_cpus: int | None, persistent: bool) -> None:
    """Connect (see `connect`), hand the address to ``outcome``, and stay alive while the process lives."""
    try:
        outcome.set_result(_connect(address, num_cpus, persistent))
    except BaseException as exc:  # noqa: BLE001 - handed to whoever waits on the future
        outcome.set_exception(exc)
        return
    threading.Event().wait()  # Ray's local processes live as long as this thread


def _connect(address: str | None, num_cpus: int | None, persistent: bool) -> str:
    if address or os.environ.get(ADDRESS_ENV) or persistent:
        _send_token_if_any()  # before Ray is imported: it reads the mode then
    import ray

    if ray.is_initialized():
        return ray.get_runtime_context().gcs_address
    address = address or os.environ.get(ADDRESS_ENV) or None
    quiet = dict(logging_level=logging.ERROR, log_to_driver=False, namespace=NAMESPACE)
    cpus = num_cpus or os.cpu_count() or 1
    if address is None and persistent:
        try:
            ray.init(address="auto", **quiet)
        except ConnectionError:
            _start_local_cluster(cpus)
            ray.init(address="auto", **quiet)
        _connection["cluster"] = True
    elif address:
        ray.init(address=address, **quiet)
        _connection["cluster"] = True
    else:  # "local" starts a new Ray even if another one runs on this machine
        ray.init(address="local", num_cpus=cpus, include_dashboard=False, _system_config=SYSTEM_CONFIG, **quiet)
    return ray.get_runtime_context().gcs_address


def _send_token_if_any() -> None:
    """``ray start`` turns token authentication on by default, but a driver sends its token (``$RAY_AUTH_TOKEN`` or
    ``~/.ray/auth_token``) only when ``RAY_AUTH_MODE=token``, read when Ray is imported: with the mode unset and a
    token at hand, send it (a cluster without authentication ignores it)."""
    has_token = os.environ.get("RAY_AUTH_TOKEN") or (Path.home() / ".ray" / "auth_token").is_file()
    if os.environ.get("RAY_AUTH_MODE") is None and has_token:
        os.environ["RAY_AUTH_MODE"] = "token"


def _start_local_cluster(num_cpus: int) -> None:
    """``ray start --head`` on this machine: a Ray that runs until ``ray stop``."""
    command = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", f"--num-cpus={num_cpus}"]
    command += ["--include-dashboard=false", "--disable-usage-stats", f"--system-config={json.dumps(SYSTEM_CONFIG)}"]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"could not start a local Ray cluster ({' '.join(command)}):\n{done.stderr[-2000:]}")


def on_cluster() -> bool:
    """Whether `connect` joined an existing cluster (jobs outlive this process) rather than the embedded Ray."""
    return _connection["cluster"]


_connection = {"cluster": False}


@dataclass(frozen=True)
class Resources:
    """What a job reserves. ``cpus`` None means every CPU of one node (the torch threads it runs)."""

    cpus: int | None = None
    gpus: int = 0

    def resolved(self) -> dict[str, float]:
        import ray

        if self.gpus:
            return {"CPU": float(self.cpus or 1), "GPU": float(self.gpus)}
        if self.cpus is not None:
            return {"CPU": float(self.cpus)}
        per_node = [n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n.get("Alive")]
        return {"CPU": max(per_node, default=1.0)}


def default_resources(device: str = "auto") -> Resources:
    """One GPU when the job asks for CUDA, or asks for ``auto`` and the cluster has a GPU; else one node's CPUs."""
    import ray

    has_gpu = ray.cluster_resources().get("GPU", 0) > 0
    if device.startswith("cuda") or (device == "auto" and has_gpu):
        return Resources(cpus=1, gpus=1)
    return Resources()


# ----------------------------------------------------------------------------------------------------------------
# 2. The job manager
# ----------------------------------------------------------------------------------------------------------------
class _Manager:
    """The run store's writer for Ray work (a Ray actor; see the module docstring)."""

    def __init__(self, root: str, warm_up: list[Any]) -> None:
        """``warm_up``: [the ObjectRef of a `_warm_up` task its creator started] (in a list, so that Ray does not
        wait for it before creating the manager)."""
        self.store = RunStore(root)
        self.pending: dict[str, Any] = {}  # run id -> the ObjectRef of its Ray task
        self.lock = threading.Lock()
        self.warmed = warm_up[0]
        threading.Thread(target=self._watch, name="petlab-job-watch", daemon=True).start()

    def ping(self) -> str:
        return str(self.store.root)

    def submit(self, kind: str, job: bytes, record: dict[str, Any], resources: dict[str, float]) -> str:
        """Record the job ``queued`` and hand it to Ray; returns the run id at once. ``job`` stays pickled here:
        unpickling it would import torch into the manager."""
        import ray

        run_id = self.store.create_run({**record, "kind": kind, "resources": resources}, status="queued")
        # While the warm-up runs, a job waits for it (an argument) and then takes its worker, already warm.
        warm = [] if ray.wait([self.warmed], timeout=0)[0] else [self.warmed]
        task = _remote_function(_execute).options(
            num_cpus=resources.get("CPU", 1.0),
            num_gpus=resources.get("GPU", 0.0),
            max_retries=0,
            name=f"petlab-{kind}-{run_id}",
        )
        with self.lock:
            self.pending[run_id] = task.remote(kind, job, run_id, ray.get_runtime_context().current_actor, *warm)
        return run_id

    def store_call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """A store method, for a worker (`RemoteStore`)."""
        if name not in RemoteStore.FORWARDED:
            raise ValueError(f"workers may not call RunStore.{name}")
        return getattr(self.store, name)(*args, **kwargs)

    def _watch(self) -> None:
        import ray

        while True:
            time.sleep(POLL_S)
            with self.lock:
                pending = dict(self.pending)
            if not pending:
                continue
            done, _ = ray.wait(list(pending.values()), num_returns=len(pending), timeout=0)
            statuses = self.store.statuses(pending)  # one read for all (a sweep has hundreds pending)
            for run_id, ref in pending.items():
                if ref in done:
                    self._finished(run_id, ref)
                elif statuses.get(run_id) == "cancelled":  # cancelled while it waited
                    ray.cancel(ref, force=False)
                    self._forget(run_id)

    def _finished(self, run_id: str, ref: Any) -> None:
        """A task returned or died: a run it left unfinished (a killed worker) ends ``interrupted``."""
        import ray

        try:
            ray.get(ref)
            problem = None
        except Exception as exc:  # noqa: BLE001 - any failure of the task
            problem = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        run = self.store.get_run(run_id)
        if run["status"] not in FINISHED_STATUSES:
            why = problem or "its worker ended without finishing the run"
            self.store.finish_run(run_id, "interrupted", f"interrupted: its worker died ({why})")
        self._forget(run_id)

    def _forget(self, run_id: str) -> None:
        with self.lock:
            self.pending.pop(run_id, None)


def manager(root: Path | str | None = None, address: str | None = None, persistent: bool = False) -> Any:
    """The job manager of the run store under ``root`` (created on this node on first use), connecting first
    (`connect`'s arguments)."""
    connect(address, persistent=persistent)
    folder = str(Path(root).expanduser().resolve() if root is not None else default_root().resolve())
    with _manager_lock:  # one creation at a time: `prepare`'s thread may be creating this very manager
        if folder not in _managers:
            _managers[folder] = _create_manager(folder)
        return _managers[folder]


def _create_manager(folder: str) -> Any:
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    name = "petlab-jobs-" + hashlib.sha1(f"{socket.gethostname()}:{folder}".encode()).hexdigest()[:16]
    options: dict[str, Any] = dict(
        name=name,
        namespace=NAMESPACE,
        get_if_exists=True,
        num_cpus=0,
        max_concurrency=64,
        scheduling_strategy=NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False),
    )
    if on_cluster():
        options["lifetime"] = "detached"  # jobs on a cluster outlive the app or command that started them
    # an idle worker imports the training stack meanwhile, before the first job
    warm_up = _remote_function(_warm_up, num_cpus=0, max_retries=0).remote()
    handle = ray.remote(_Manager).options(**options).remote(folder, [warm_up])
    ray.get(handle.ping.remote())
    return handle


_managers: dict[str, Any] = {}
"""This process's manager handles by store folder: an embedded Ray's manager lives while a handle does."""
_manager_lock = threading.Lock()


def prepare(root: Path | str | None = None, address: str | None = None) -> None:
    """Start connecting and the store's job manager (`manager`'s arguments) in the background, and return at once.

    A command that is going to submit a job calls this first: Ray starts, and the manager's warm-up imports the
    training stack in a worker, while the command itself imports torch and checks the job's options. A failure
    here is left to the `submit` that follows, which tries again and reports it."""

    def run() -> None:
        with contextlib.suppress(Exception):
            manager(root, address)

    threading.Thread(target=run, name="petlab-prepare", daemon=True).start()


def forget_managers() -> None:
    """Drop this process's manager handles (before ``ray.shutdown``, so a later `connect` starts afresh)."""
    _managers.clear()
    _connection["cluster"] = False


# ----------------------------------------------------------------------------------------------------------------
# 3. The worker
# ----------------------------------------------------------------------------------------------------------------
class RemoteStore:
    """What a worker sees of the run store: each write goes to the job manager, which owns the store.

    Progress (``log_metrics``, ``update_run``) is written behind: the call is sent and training goes on, without
    waiting a round trip to the manager each time. One such write is in flight at a time, and every other call
    waits for it first, so writes stay in order and a failed one raises at the next call."""

    FORWARDED = frozenset(
        {
            "start_run",
            "update_run",
            "log_metrics",
            "finish_run",
            "write_adapter",
            "write_snapshot",
            "cancel_requested",
            "get_run",
        }
    )
    WRITTEN_BEHIND = frozenset({"log_metrics", "update_run"})

    def __init__(self, handle: Any) -> None:
        self.handle = handle
        self.in_flight: Any = None  # the future of the write sent last, if it was written behind

    def _call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """Call the manager; wait for its answer unless ``name`` is written behind."""
        previous, self.in_flight = self.in_flight, None
        self._wait(previous)  # the previous write first: in order, and its failure raises here (once)
        answer = self.handle.store_call.remote(name, *args, **kwargs).future()
        if name in self.WRITTEN_BEHIND:
            self.in_flight = answer
            return None
        return self._wait(answer)

    @staticmethod
    def _wait(answer: Any) -> Any:
        """An answer, waited for without ``ray.get``: a task blocked in ``ray.get`` or ``ray.wait`` lends its
        CPUs back to Ray, which would start a queued job beside this one."""
        if answer is None:
            return None
        while not answer.done():
            time.sleep(0.002)
        return answer.result()

    def start_run(self, run_id: str) -> None:
        import ray

        node = ray.get_runtime_context().get_node_id()
        self._call("start_run", run_id, pid=os.getpid(), hostname=socket.gethostname(), node=node)

    def __getattr__(self, name: str) -> Callable[..., Any]:
        if name not in self.FORWARDED:
            raise AttributeError(name)
        return lambda *args, **kwargs: self._call(name, *args, **kwargs)


def _execute(kind: str, job: bytes, run_id: str, handle: Any, warmed: None = None) -> None:
    """A Ray task: run one job (``{"spec": ..., "data_root": ...}`` pickled), with the worker's torch threads set
    to the CPUs it reserved. ``warmed`` is the manager's warm-up, finished before the task starts."""
    import ray
    import torch

    from core import experiment

    job = pickle.loads(job)
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
    torch.set_num_threads(max(1, int(cpus)))
    store = RemoteStore(handle)
    try:
        store.start_run(run_id)
    except ValueError:
        return  # cancelled while it waited
    run = experiment.run_experiment if kind == "finetune" else experiment.run_intrinsic_dim
    run(job["spec"], store, data_root=job["data_root"], run_id=run_id)


def _warm_up() -> None:
    """A Ray task on no CPU: import what a job needs (`core.experiment.import_on_use`), so the worker Ray gives the
    first job next has done it while the caller was still checking the job's options."""
    with contextlib.suppress(Exception):  # the job itself reports what fails to import
        from core import experiment

        experiment.import_on_use()


_remote: dict[Callable[..., Any], Any] = {}


def _remote_function(function: Callable[..., Any], **options: Any) -> Any:
    """``function`` as a Ray remote function with ``options`` (made once per process, after Ray is imported)."""
    import ray

    if function not in _remote:
        _remote[function] = ray.remote(**options)(function) if options else ray.remote(function)
    return _remote[function]


# ----------------------------------------------------------------------------------------------------------------
# 4. The caller's side
# ----------------------------------------------------------------------------------------------------------------
def submit(
    kind: JobKind,
    spec: Experiment | CheckedExperiment | IntrinsicDimRequest,
    root: Path | str | None = None,
    *,
    address: str | None = None,
    persistent: bool = False,
    resources: Resources | None = None,
    data_root: Path | None = None,
    owner: str | None = None,
    sweep_id: str | None = None,
) -> str:
    """Validate a fine-tune (``Experiment``; a ``CheckedExperiment`` from `validate` is not checked again) or a
    measurement (``IntrinsicDimRequest``), record it ``queued`` and hand it to Ray; returns its run id at once. It
    starts when its resources are free.

    Args:
        kind: ``finetune`` or ``intrinsic_dim``.
        spec: What to run.
        root: The run store folder (default `default_root`).
        address: A Ray cluster (default ``$PETLAB_RAY_ADDRESS``, else the embedded local Ray).
        persistent: Run it on a Ray that outlives this process even without an address (`connect`).
        resources: What the job reserves (default `default_resources` for the spec's device).
        data_root: Folder that ``folder:`` and ``vtab:`` paths must lie in, on the worker's node.
        owner: Who starts it (recorded; the app lets only its owner cancel it when sign-in is configured).
        sweep_id: The sweep it is a point of.

    Raises:
        ValueError: a bad option, or a data folder or weights file that is missing or outside the data root (the
            message says which); nothing is recorded or submitted.
    """
    from core import experiment

    if kind == "finetune":
        if not isinstance(spec, experiment.CheckedExperiment):  # a sweep passes its points checked already
            spec = experiment.validate(spec, data_root)  # the worker does not check it again
        record = experiment.experiment_record(spec.experiment)
        device = spec.experiment.train.device
    elif kind == "intrinsic_dim":
        record = experiment.measurement_record(spec, data_root)  # type: ignore[arg-type]
        device = "auto"  # the measurement runs where its worker's model is: on its GPU when it has one
    else:
        raise ValueError(f"a job is a 'finetune' or an 'intrinsic_dim' measurement, not {kind!r}")
    handle = manager(root, address, persistent)
    reserved = (resources or default_resources(device)).resolved()
    job = pickle.dumps({"spec": spec, "data_root": data_root})  # unpickled by the worker only
    record = {**record, "owner": owner, "sweep_id": sweep_id}
    import ray  # once `manager` has connected

    return ray.get(handle.submit.remote(kind, job, record, reserved))


def wait(
    store: RunStore,
    run_id: str,
    timeout: float | None = None,
    on_update: Callable[[dict[str, Any]], None] | None = None,
    poll_s: float = 0.5,
) -> dict[str, Any]:
    """Poll the store until the run ends; returns its record. ``on_update`` sees the record at every poll.

    Raises:
        TimeoutError: it did not end within ``timeout`` seconds (it goes on).
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        run = store.get_run(run_id)
        if on_update is not None:
            on_update(run)
        if run["status"] in FINISHED_STATUSES:
            return run
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"run {run_id} is still {run['status']} after {timeout:.0f} s")
        time.sleep(poll_s)
