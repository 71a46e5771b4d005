"""One run of a comparison grid: what a process needs to build and train it
(:class:`GridRun`), training it (:func:`run_one`) and the task it trains on, built in the
process that trains it (:func:`task_for_run`). Every runner of a grid uses these: the
serial one (:mod:`ksam.lab.compare`), worker processes (:mod:`ksam.lab.pool`), Ray
(:mod:`ksam.lab.cluster`)."""

from __future__ import annotations

import json
import platform
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .train import TrainConfig, train

__all__ = ["GridRun", "is_resumable", "run_one", "run_place", "run_slug", "task_for_run"]

def is_resumable(run_dir: Path) -> bool:
    """Whether a resumed comparison continues the run in ``run_dir`` (else it runs anew):
    it holds a checkpoint (or a link to one), its ``config.json`` or its metrics (which
    :func:`ksam.lab.train.resume_point` then refuses without a checkpoint)."""
    from .outputs import checkpoint_path

    return checkpoint_path(run_dir).is_symlink() or any(
        (run_dir / name).exists() for name in ("checkpoint.pt", "config.json", "metrics.jsonl"))


def run_slug(spec: str) -> str:
    """``spec`` as a folder name: characters other than letters, digits, "-_." become "_"."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in spec)


@dataclass(frozen=True)
class GridRun:
    """One run of a comparison grid: all a process needs to build and train it. Small and
    picklable (a Ray task's argument) but for ``task``, the task object of the process that
    planned the run (never sent: a worker builds the task from ``cfg`` and ``task_seed``)."""

    cfg: TrainConfig  # the run's own: method, options, seed and lr set
    label: str  # the method spec's label
    seed: int
    task_seed: int  # the comparison builds its task with its first seed
    out_dir: Path | None  # the run's folder
    resume: bool  # continue the run in out_dir if it holds one
    overwrite: bool
    title: str  # how progress names the run
    task: Any = field(default=None, compare=False, repr=False)


def run_place(device: str) -> dict[str, Any]:
    """Where a run on ``device`` (resolved) trains: this machine's host name and the
    device's name (the GPU's, else the CPU model's)."""
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(torch.device(device))
    else:
        name = _cpu_model()
    return {"host": platform.node(), "device_name": name}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def run_one(run: GridRun, *, task: Any = None, dist_info: Any = None,
            on_epoch: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Train (or continue, or re-read) one run on ``task`` (default ``run.task``): the
    result of :func:`ksam.lab.train.train` without the model, with the run's ``label``,
    ``seed``, and where it ran (:func:`run_place`; ``node_id`` None outside Ray)."""
    resume = run.resume and run.out_dir is not None and is_resumable(run.out_dir)
    result = train(run.cfg, out_dir=run.out_dir, task=run.task if task is None else task,
                   dist_info=dist_info, resume=resume, overwrite=run.overwrite,
                   on_epoch=on_epoch)
    result.pop("model")
    result.update(label=run.label, seed=run.seed, node_id=None,
                  threads=torch.get_num_threads(), **run_place(result["config"]["device"]))
    return result


#: Tasks (their data) a worker process built, by configuration: a worker runs many runs of
#: one comparison, and building the data can take seconds. The two most recent are kept
#: (the sweep's held-out task and the comparison's).
_TASKS: OrderedDict[str, Any] = OrderedDict()


def task_for_run(run: GridRun) -> Any:
    """The task of ``run``, built in this process from its configuration (a worker's: the
    planning process's task is never sent), kept for the next runs of the same task."""
    from .config import resolve_device
    from .tasks import get_task

    device = resolve_device(run.cfg.device)
    key = json.dumps([run.cfg.task, run.task_seed, device, run.cfg.task_options],
                     sort_keys=True, default=str)
    if key not in _TASKS:
        _TASKS[key] = get_task(run.cfg.task, device=device, seed=run.task_seed,
                               **run.cfg.task_options)
        while len(_TASKS) > 2:
            _TASKS.popitem(last=False)
    _TASKS.move_to_end(key)
    return _TASKS[key]
