"""``ksam compare --ray``: every run of a comparison grid as one Ray task.

:class:`RayRunner` is the runner :func:`ksam.lab.compare.compare` and
:func:`ksam.lab.compare.sweep_lr` hand their list of runs to, instead of the
:class:`ksam.lab.compare.SerialRunner`. Each run is one task asking for one run's resources
(``cpus_per_run``, ``gpus_per_run``); a worker builds the task's data from the run's
configuration, trains with :func:`ksam.lab.compare.run_one` and returns the result (no model).

- Shared file system: a worker that sees the probe file the driver wrote in the output
  folder trains straight into the run's folder, as the serial command does. One that does
  not trains into a scratch folder of its machine and returns the run folder's files; the
  driver writes them through the output folder API.
- A task whose worker dies is retried (Ray's ``max_retries``, :data:`MAX_RETRIES`) and
  continues from the last checkpoint its earlier attempt wrote.
- A run that raises a user error (a bad value, a missing file or package) cancels the
  other runs and the error is raised on the driver as it was raised on the worker.

Ray is imported only here, and only when a :class:`RayRunner` is made.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

from .outputs import PROBE_PREFIX, folder_contents, open_output
from .progress import RunProgress
from .runs import GridRun, is_resumable, run_one, run_slug, task_for_run
from .tasks.data import MissingDependencyError

__all__ = ["MAX_RETRIES", "SHARED_FS_ENV", "RayRunner", "RunProgress", "import_ray"]

#: How often a task whose worker died is started again (from its last checkpoint).
MAX_RETRIES = 3
#: Set to ``0`` on the driver: the workers' results come back through Ray even where the
#: workers see the output folder (the path taken without a shared file system).
SHARED_FS_ENV = "KSAM_RAY_SHARED_FS"
#: Seconds to wait for the head node's port before calling the cluster unreachable (Ray
#: itself keeps retrying for minutes).
CONNECT_TIMEOUT = 5.0
_DEFAULT_PORT = 6379
#: Errors of the user that a run raises on a worker: raised on the driver as they are
#: (``ksam compare`` reports them in one line), not as Ray's wrapper.
_USER_ERRORS = (ValueError, OSError, MissingDependencyError)


def import_ray() -> Any:
    """The ``ray`` module; MissingDependencyError (saying how to install it) without it."""
    # Ray replaces builtins.print in the driver once it relays a worker's output (to keep
    # its own progress bars intact); ksam prints its own progress and leaves print alone.
    os.environ.setdefault("RAY_TQDM_PATCH_PRINT", "0")
    try:
        import ray
    except ImportError:
        raise MissingDependencyError('--ray needs Ray: pip install "ksam[ray]" '
                                     '(or pip install "ray>=2.40")') from None
    return ray


def _probe_address(address: str) -> None:
    """ValueError unless something listens at ``address`` (``host:port``, or ``ray://``
    ``host:port``; the port defaults to Ray's 6379) within :data:`CONNECT_TIMEOUT`."""
    hostport = address.split("://", 1)[-1]
    host, colon, port = hostport.rpartition(":")
    if not colon:
        host, port = hostport, str(_DEFAULT_PORT)
    if not host or not port.isdigit():
        raise ValueError(f"--ray {address}: give the head node's HOST:PORT, 'auto', or no "
                         "address (a local Ray instance)")
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT).close()
    except OSError as exc:
        raise ValueError(f"--ray {address}: no Ray cluster reachable there ({exc}); start "
                         "one with `ray start --head` and give its address") from None


def _connect(ray: Any, address: str | None, gpus_per_run: float | None) -> bool:
    """Join the cluster at ``address`` (``"auto"``: the one ``ray start`` left on this
    machine or ``RAY_ADDRESS``; None: start a local instance sized to this machine).
    Returns whether this call started Ray (and so shuts it down later). A process already
    connected to Ray keeps that connection."""
    if address not in (None, "auto"):
        _probe_address(address)
    if ray.is_initialized():
        return False
    if address is None:
        import torch

        if gpus_per_run and torch.cuda.device_count() < gpus_per_run:
            raise ValueError(f"--gpus-per-run {gpus_per_run:g}: this machine has "
                             f"{torch.cuda.device_count()} GPU(s) for its local Ray instance")
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=False,
                 logging_level="WARNING")
    except ConnectionError as exc:
        raise ValueError(f"--ray {address}: {exc}") from None
    return True


def _resources(total: dict[str, float], cpus: float | None,
               gpus: float | None) -> tuple[float, float]:
    """One run's CPUs and GPUs: the given ones (ValueError beyond the cluster's), else 1
    GPU where the cluster has GPUs and 1 CPU."""
    have_cpus, have_gpus = total.get("CPU", 0.0), total.get("GPU", 0.0)
    gpus = (1.0 if have_gpus else 0.0) if gpus is None else gpus
    cpus = 1.0 if cpus is None else cpus
    if gpus > have_gpus:
        raise ValueError(f"--gpus-per-run {gpus:g}: the Ray cluster has {have_gpus:g} GPU(s)")
    if cpus > have_cpus:
        raise ValueError(f"--cpus-per-run {cpus:g}: the Ray cluster has {have_cpus:g} CPU(s)")
    return cpus, gpus


def _slots(total: dict[str, float], cpus: float, gpus: float) -> int:
    """How many runs of this size the cluster holds at once."""
    fits = [total.get("CPU", 0.0) // cpus] if cpus else []
    if gpus:
        fits.append(total.get("GPU", 0.0) // gpus)
    return max(1, int(min(fits))) if fits else 1


class RayRunner:
    """Runs a grid's runs as Ray tasks, one task per run.

    ``address``: None starts a local Ray instance sized to this machine; ``"auto"`` or
    ``HOST:PORT`` joins a running cluster (ValueError if none is reachable); a process
    already connected to Ray uses that connection. ``cpus_per_run`` / ``gpus_per_run``:
    each task's resources (default 1 CPU, and 1 GPU where the cluster has GPUs; ValueError
    beyond the cluster's). ``total_runs``: the runs of the whole command, for the ETA.
    Progress (``quiet`` False): one display over all runs, on stdout. :meth:`close` ends
    the Ray instance this runner started.
    """

    def __init__(self, address: str | None = None, *, cpus_per_run: float | None = None,
                 gpus_per_run: float | None = None, quiet: bool = False,
                 total_runs: int | None = None) -> None:
        self.ray = import_ray()
        if address == "local":
            address = None
        self.owned = _connect(self.ray, address, gpus_per_run)
        try:
            total = self.ray.cluster_resources()
            self.cpus, self.gpus = _resources(total, cpus_per_run, gpus_per_run)
        except BaseException:
            self.close()
            raise
        self.token = secrets.token_hex(8)
        self.shared_fs = os.environ.get(SHARED_FS_ENV, "1") != "0"
        self.progress = RunProgress(total_runs, _slots(total, self.cpus, self.gpus), quiet)
        self._task = self.ray.remote(num_cpus=self.cpus, num_gpus=self.gpus,
                                     max_retries=MAX_RETRIES)(_run_task)

    @property
    def device(self) -> str:
        """The device a run's ``device="auto"`` becomes on the workers."""
        return "cuda" if self.gpus else "cpu"

    def execute(self, runs: list[GridRun]) -> list[dict[str, Any]]:
        """Each run's result (as :func:`ksam.lab.compare.run_one`'s), in the order of ``runs``;
        all runs are submitted at once and the results collected as they finish."""
        if not runs:
            return []
        probe = self._write_probe(runs)
        threads = max(1, int(self.cpus))
        refs = {self._task.remote(replace(run, task=None), probe, _files_to_send(run),
                                  threads): i for i, run in enumerate(runs)}
        self.progress.submitted(len(refs))
        results: list[Any] = [None] * len(runs)
        pending = list(refs)
        try:
            while pending:
                done, pending = self.ray.wait(pending, num_returns=1)
                for ref in done:
                    i = refs[ref]
                    results[i] = self._collect(runs[i], ref)
                    self.progress.finished(runs[i].title, results[i])
        except BaseException:
            for ref in pending:
                self.ray.cancel(ref, force=True)
            raise
        finally:
            if probe[0] is not None:
                Path(probe[0]).unlink(missing_ok=True)
        return results

    def _write_probe(self, runs: list[GridRun]) -> tuple[str | None, str]:
        """(path, token): a file in the runs' common folder holding the token, which a
        worker on the same file system reads back (no file without output folders or with
        :data:`SHARED_FS_ENV` ``=0``). The token also names the workers' scratch folders."""
        dirs = [str(run.out_dir.parent) for run in runs if run.out_dir is not None]
        if not dirs or not self.shared_fs:
            return None, self.token
        folder = Path(os.path.commonpath(dirs))
        while not folder.is_dir():  # runs/ is made by the first run
            folder = folder.parent
        path = folder / f"{PROBE_PREFIX}{self.token}"
        path.write_text(self.token)
        return str(path), self.token

    def _collect(self, run: GridRun, ref: Any) -> dict[str, Any]:
        try:
            result = self.ray.get(ref)
        except self.ray.exceptions.RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            if isinstance(cause, _USER_ERRORS):
                raise cause from None
            raise
        files = result.pop("files", None)
        if files is not None and run.out_dir is not None:
            _write_files(run.out_dir, files)
        return result

    def close(self) -> None:
        """End the progress display and the Ray instance this runner started."""
        progress = getattr(self, "progress", None)
        if progress is not None:
            progress.close()
        if self.owned and self.ray.is_initialized():
            self.ray.shutdown()
        self.owned = False

    def __enter__(self) -> RayRunner:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# --------------------------------------------------------------------------- the driver's side

def _run_files(folder: Path) -> dict[str, bytes]:
    """The files ksam wrote in a run's folder (its manifest's order), by name."""
    _, names = folder_contents(folder)
    return {name: (folder / name).read_bytes() for name in names if (folder / name).is_file()}


def _files_to_send(run: GridRun) -> dict[str, bytes] | None:
    """The files of a run to continue, for a worker that does not see the output folder
    (None for a run that starts afresh)."""
    if run.resume and run.out_dir is not None and is_resumable(run.out_dir):
        return _run_files(run.out_dir)
    return None


def _write_files(run_dir: Path, files: dict[str, bytes]) -> None:
    """Write a run's returned files into its folder (atomically, through the manifest);
    a file that is already there with the same bytes is left as it is."""
    with open_output(run_dir, "train", resume=True) as folder:
        for name, data in files.items():
            path = run_dir / name
            if not (path.is_file() and path.read_bytes() == data):
                folder.write_bytes(name, data)


# --------------------------------------------------------------------------- the worker's side

def _sees(probe: tuple[str | None, str]) -> bool:
    if probe[0] is None:
        return False
    try:
        return Path(probe[0]).read_text() == probe[1]
    except OSError:
        return False


def _attempt(run: GridRun) -> GridRun:
    """The run as this attempt trains it: one whose folder holds a run (an earlier attempt's
    checkpoint, or the interrupted run ``--resume`` continues) continues it."""
    if run.out_dir is not None and is_resumable(run.out_dir):
        return replace(run, resume=True, overwrite=False)
    return run


def _in_scratch(run: GridRun, task: Any, files: dict[str, bytes] | None,
                token: str) -> dict[str, Any]:
    """Train ``run`` in a scratch folder of this machine (kept for a retry on it, removed
    once the run is done); the result carries the run folder's files."""
    scratch = Path(tempfile.gettempdir()) / f"ksam-ray-{token}" / run_slug(str(run.out_dir))
    if files and not is_resumable(scratch):  # the driver's copy of the run to continue
        with open_output(scratch, "train", resume=True) as folder:
            for name, data in files.items():
                folder.write_bytes(name, data)
    result = run_one(_attempt(replace(run, out_dir=scratch, overwrite=False)), task=task)
    result["files"] = _run_files(scratch)
    shutil.rmtree(scratch, ignore_errors=True)
    try:
        scratch.parent.rmdir()  # the command's scratch root, once no run of it is left here
    except OSError:
        pass
    return result


def _run_task(run: GridRun, probe: tuple[str | None, str], files: dict[str, bytes] | None,
              threads: int) -> dict[str, Any]:
    """One run on a Ray worker (see :class:`RayRunner`)."""
    import ray
    import torch

    torch.set_num_threads(threads)  # the run's CPUs, not the machine's
    task = task_for_run(run)
    if run.out_dir is None or _sees(probe):
        result = run_one(_attempt(run), task=task)
    else:
        result = _in_scratch(run, task, files, probe[1])
    result["node_id"] = ray.get_runtime_context().get_node_id()
    return result
