"""The machine's cores for ``ksam compare --jobs N`` and a run's torch threads.

:class:`ProcessRunner` runs a grid's runs in parallel worker processes of this machine,
one torch thread each (by default), as many processes as there are cores: each worker
builds the task from the run's configuration (a task of the user's own is imported by its
path or module) and trains the run into its folder, as the serial command does. A run's
result depends on its configuration and its thread count only, so the results are
bit-identical to the serial command's at the same number of threads.

A single run picks its threads from the cores not busy (:func:`choose_threads`): torch's
default, one thread per core, loses badly to a busy core (a step waits for its slowest
thread).
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import replace
from typing import Any

import torch

from .progress import RunProgress
from .runs import GridRun, run_one, task_for_run

__all__ = ["ProcessRunner", "available_cores", "choose_threads"]


def available_cores() -> int:
    """The cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def busy_cores() -> float:
    """The cores other processes keep busy: the 1-minute load average (0 where the system
    has none)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):  # pragma: no cover
        return 0.0


def choose_threads(requested: int | None) -> tuple[int, str]:
    """A single run's torch threads and why: ``requested`` (``--threads``), else what
    ``OMP_NUM_THREADS`` set, else the cores not busy (at least 1)."""
    if requested is not None:
        return requested, f"{requested} torch thread{'s' if requested != 1 else ''} (--threads)"
    if os.environ.get("OMP_NUM_THREADS"):
        n = torch.get_num_threads()
        return n, f"{n} torch thread{'s' if n != 1 else ''} (OMP_NUM_THREADS)"
    cores, busy = available_cores(), busy_cores()
    n = max(1, min(cores, cores - round(busy)))
    return n, (f"{n} torch thread{'s' if n != 1 else ''}: {cores} core"
               f"{'s' if cores != 1 else ''}, {busy:.1f} busy (load average); "
               "--threads N sets another number")


def _start_worker(threads: int) -> None:
    torch.set_num_threads(threads)


def _run_in_worker(run: GridRun) -> dict[str, Any]:
    return run_one(run, task=task_for_run(run))


class ProcessRunner:
    """Runs a grid's runs in ``jobs`` worker processes of this machine (started once, on the
    first grid with more than one run), ``threads`` torch threads each; a grid of one run
    trains in this process at ``threads``. ``progress``: a :class:`RunProgress` made here
    (``total_runs``, ``quiet``). A run that raises cancels the others and its error is
    raised here as it was raised in the worker. :meth:`close` ends the workers."""

    def __init__(self, jobs: int, *, threads: int = 1, quiet: bool = False,
                 total_runs: int | None = None) -> None:
        self.jobs, self.threads = jobs, threads
        self.progress = RunProgress(total_runs, jobs, quiet)
        self._pool: ProcessPoolExecutor | None = None

    def _workers(self) -> ProcessPoolExecutor:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(
                self.jobs, mp_context=multiprocessing.get_context("spawn"),
                initializer=_start_worker, initargs=(self.threads,))
        return self._pool

    def execute(self, runs: list[GridRun]) -> list[dict[str, Any]]:
        """Each run's result (as :func:`ksam.lab.compare.run_one`'s), in the order of
        ``runs``."""
        if len(runs) == 1 and self._pool is None:
            return self._here(runs[0])
        if not runs:
            return []
        pool = self._workers()
        futures: dict[Future, int] = {pool.submit(_run_in_worker, replace(run, task=None)): i
                                      for i, run in enumerate(runs)}
        self.progress.submitted(len(futures))
        results: list[Any] = [None] * len(runs)
        pending = set(futures)
        try:
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    i = futures[future]
                    results[i] = future.result()
                    self.progress.finished(runs[i].title, results[i])
        except BrokenProcessPool as exc:
            self._stop()
            raise RuntimeError(
                "a worker process of --jobs ended abruptly (killed, out of memory, or it "
                "could not start: a script that runs ksam.compare with jobs > 1 must call it "
                "under `if __name__ == \"__main__\":`, and code read from standard input "
                "cannot start workers; jobs=1 trains in this process)") from exc
        except BaseException:
            for future in pending:
                future.cancel()
            self._stop()
            raise
        return results

    def _here(self, run: GridRun) -> list[dict[str, Any]]:
        before = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        self.progress.submitted(1)
        try:
            result = run_one(run)
        finally:
            torch.set_num_threads(before)
        self.progress.finished(run.title, result)
        return [result]

    def _stop(self) -> None:
        """End the workers now, the runs they train with them."""
        pool, self._pool = self._pool, None
        if pool is None:
            return
        processes = list(getattr(pool, "_processes", {}).values())
        pool.shutdown(wait=False, cancel_futures=True)
        for process in processes:
            if process.is_alive():
                process.terminate()
        for process in processes:
            process.join(timeout=10)

    def close(self) -> None:
        """End the progress display and the workers."""
        self.progress.close()
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)

    def __enter__(self) -> ProcessRunner:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
