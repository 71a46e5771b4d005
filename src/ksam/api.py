"""``ksam compare`` from Python and from the command line: one function runs it.

:func:`compare` takes the task as Python (a function, a dict, a TaskData), a registered
name or a ``path/to/file.py:function`` spec, the methods and the options of the command,
and returns the summary the command writes. ``ksam compare`` parses its flags into a
:class:`ksam.config.CliConfig` and calls :func:`run_comparison`, as :func:`compare` does.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import sys
from collections.abc import Callable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from .config import DEFAULT_SWEEP_SPLIT, CliConfig

__all__ = ["compare", "run_comparison", "check_out_dir", "default_out", "world_size"]

Echo = Callable[[str], None] | None


def say(text: str) -> None:
    """Print ``text`` at once, also to a pipe or a file (the plan must not wait in a
    buffer until the first run ends)."""
    print(text, flush=True)


# --------------------------------------------------------------------------- shared checks

def check_out_dir(out: Path, command: str, *, resume: bool, overwrite: bool) -> None:
    """ValueError unless ``out`` can take ``command``'s results: a new or empty folder, or
    one with results under ``resume``/``overwrite`` (not another command's); never a file;
    writable."""
    from .outputs import check_folder_command

    existing = next(p for p in (out, *out.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise ValueError(f"--out {out}: {existing} is a file, not a folder")
    if existing == out and any(out.iterdir()):
        check_folder_command(out, command)  # another command's: --resume would not help
        if not (resume or overwrite):
            raise ValueError(f"--out {out} is not empty; give --resume to continue the "
                             "results there or --overwrite to replace them")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out}: {existing} is not writable")


def default_out(command: str, task: str, *parts: str) -> Path:
    """Where a command writes without ``--out``: ``runs/compare-TASK-DATE-TIME``,
    ``runs/train-TASK-METHOD-seedN``."""
    from .tasks.user import slug

    if command == "compare":
        return Path("runs") / f"compare-{slug(task)}-{datetime.now():%Y%m%d-%H%M%S}"
    return Path("runs") / "-".join(("train", slug(task), *parts))


def world_size() -> int:
    """The number of processes torchrun says there are (1 without torchrun)."""
    text = os.environ.get("WORLD_SIZE", "1")
    try:
        world = int(text)
    except ValueError:
        raise ValueError(f"WORLD_SIZE={text!r} is not a number of processes") from None
    if world < 1:
        raise ValueError(f"WORLD_SIZE={world}: need at least one process")
    if world > 1:
        missing = [v for v in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]
        if missing:
            raise ValueError(f"WORLD_SIZE={world} but {', '.join(missing)} not set: start "
                             "the processes with torchrun (which sets them all), or unset "
                             "WORLD_SIZE for one process")
    return world


def join_processes(world: int) -> Any:
    """Under torchrun (``world`` > 1) every rank joins the process group."""
    if world <= 1:
        return None
    from . import distributed

    return distributed.init_from_env()


# --------------------------------------------------------------------------- executors

def _jobs(cfg: CliConfig, device: str, world: int, importable: bool) -> int:
    """The worker processes of the grid (1: the runs train in this process); ValueError
    for ``--jobs`` where it cannot apply."""
    from .pool import available_cores

    given = cfg.jobs
    if given is not None and given > 1:
        if cfg.ray is not None:
            raise ValueError("--jobs and --ray exclude each other: --ray runs every run as "
                             "a Ray task")
        if world > 1:
            raise ValueError("--jobs runs the grid's runs in parallel processes of one "
                             "machine; under torchrun every rank takes part in each run")
        if device.startswith("cuda"):
            raise ValueError("--jobs runs the grid's runs in parallel on the CPU; on a GPU "
                             "they run one at a time (--ray spreads them over GPUs)")
        if not importable:
            raise ValueError("jobs > 1 starts worker processes that import the task: give "
                             "it as 'path/to/file.py:function' or as a function defined at "
                             "the top level of a file (a dict, a TaskData or a nested "
                             "function runs with jobs=1)")
        return given
    if given is not None or cfg.ray is not None or world > 1 or device.startswith("cuda") \
            or not importable:
        return 1
    return available_cores()


def _ray_executor(cfg: CliConfig, world: int, runs: int, base: Any, importable: bool) -> Any:
    """With ``--ray``: the :class:`ksam.cluster.RayExecutor` (connected, its task size
    checked against the cluster) and ``base``'s ``auto`` device set to the workers'; else
    None (and Ray is not imported)."""
    if cfg.ray is None:
        return None
    if world > 1:
        raise ValueError("--ray and torchrun exclude each other: under --ray every run is "
                         "one Ray task; start `ksam compare --ray` as one process")
    if cfg.threads is not None:
        raise ValueError("--threads and --ray exclude each other: with --ray a run's "
                         "threads are its --cpus-per-run")
    if not importable:
        raise ValueError("ray starts workers that import the task: give it as "
                         "'path/to/file.py:function' or as a function defined at the top "
                         "level of a file")
    from .cluster import RayExecutor

    executor = RayExecutor(None if cfg.ray == "local" else cfg.ray,
                           cpus_per_run=cfg.cpus_per_run, gpus_per_run=cfg.gpus_per_run,
                           quiet=cfg.quiet, total_runs=runs)
    if base.device == "auto":
        base.device = executor.device
    return executor


# --------------------------------------------------------------------------- the command

def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _check_budget(cfg: CliConfig, world: int) -> None:
    if cfg.budget != "time":
        return
    if not any(spec.name == "sgd" for spec in cfg.methods):
        raise ValueError("--budget time gives every method SGD's measured training time: "
                         "put sgd among --methods")
    if world > 1:
        raise ValueError("--budget time measures times, which differ between torchrun's "
                         "ranks; --budget passes is the same on every rank")


def _plan_text(cfg: CliConfig, resolved: Any, out: Path, sweep: list[float] | None,
               jobs: int, threads: int | None, budget_runs: int, total: int) -> str:
    """What the command is about to do, before its first run."""
    from .tasks.user import display_name

    methods = ", ".join(spec.label for spec in cfg.methods)
    runs = len(cfg.methods) * len(cfg.seeds)
    lines = [f"ksam compare: {display_name(cfg.task)}, {resolved.epochs} epochs of batch "
             f"{resolved.batch_size}; {_plural(len(cfg.methods), 'method')} ({methods}) x "
             f"{_plural(len(cfg.seeds), 'seed')} = {_plural(runs, 'run')}"]
    if sweep:
        split = cfg.validation_split or DEFAULT_SWEEP_SPLIT
        lines.append(f"  first the lr sweep: every method at lr "
                     f"{', '.join(f'{lr:g}' for lr in sweep)} on a held-out {split:g} of "
                     f"the training set, {_plural(runs * len(sweep), 'run')} (lr_sweep.md); "
                     "then each method at its best lr on the test set")
    if cfg.budget:
        lines.append(f"  then the equal-budget grid ({cfg.budget}): every method at the cost "
                     f"of SGD's {resolved.epochs} epochs, at most "
                     f"{_plural(budget_runs, 'more run')} (budget-{cfg.budget}/)")
    if cfg.ray is not None:
        where = "as Ray tasks"
    elif jobs > 1:
        where = (f"in {jobs} worker processes, {_plural(threads or 1, 'torch thread')} "
                 "each (--jobs, --threads)")
    else:
        where = "one after the other in this process" + (
            f", {_plural(threads, 'torch thread')} (--threads)" if threads else "")
    lines.append(f"  {_plural(total, 'run')} {where}; results in {out}")
    return "\n".join(lines)


def run_comparison(cfg: CliConfig, *, echo: Echo = say,
                   importable: bool = True) -> dict[str, Any]:
    """Run the comparison ``cfg`` describes (``ksam compare``): the lr sweep if any, the
    equal-epochs grid, the equal-budget grid if any; the report (:func:`ksam.compare.compare`'s,
    with ``out``, the folder, and ``sweep``, the sweep's result). ``echo`` prints the plan
    before the first run and the tables at the end (None: nothing). ``importable``: worker
    processes can build the task from its name (False for a Python object of this
    process: the runs then train here)."""
    # the module by its name: the package's attribute `compare` may be another object
    cmp = importlib.import_module(".compare", __package__)
    from .config import resolve_device
    from .outputs import open_output
    from .progress import EpochProgress
    from .tasks import get_task

    sweep = cfg.sweep_lrs
    if sweep and cfg.lr is not None:
        raise ValueError("--lr and --lr-sweep exclude each other: the sweep sets every lr")
    if cfg.resume and cfg.out is None:
        raise ValueError("--resume needs --out: the comparison to continue")
    out = cfg.out or default_out("compare", cfg.task)
    check_out_dir(out, "compare", resume=cfg.resume, overwrite=cfg.overwrite)
    # The held-out split is for the sweep; the final comparison uses the test set.
    base = cfg.train_config(with_validation=not sweep)
    if sweep:
        cmp.check_sweep(base, cfg.methods, sweep)
    world = world_size()
    base.check_processes(world)
    _check_budget(cfg, world)
    device = resolve_device(base.device)
    task = get_task(base.task, device=device, seed=cfg.seeds[0], **base.task_options)
    resolved = base.resolved(task.defaults)
    cmp.check_methods(resolved, cfg.methods, cfg.shared, task)
    runs = len(cfg.methods) * len(cfg.seeds)
    budget_runs = (len(cfg.methods) - sum(spec.name == "sgd" for spec in cfg.methods)) \
        * len(cfg.seeds) if cfg.budget else 0
    total = runs * (1 + (len(sweep) if sweep else 0)) + budget_runs
    jobs = _jobs(cfg, device, world, importable)
    threads = cfg.threads if cfg.threads is not None or device != "cpu" or world > 1 else 1
    executor = _ray_executor(cfg, world, total, base, importable)
    dist_info = join_processes(world)
    if dist_info is not None:
        base.device = str(dist_info.device)
    is_main = dist_info is None or dist_info.rank == 0
    quiet = cfg.quiet or not is_main
    if echo is not None and not quiet:
        echo(_plan_text(cfg, resolved, out, sweep, jobs, threads, budget_runs, total))
    progress = EpochProgress(total, quiet or executor is not None or jobs > 1)
    if executor is None and jobs > 1:
        from .pool import ProcessExecutor

        executor = ProcessExecutor(jobs, threads=threads or 1, quiet=quiet, total_runs=total)
    runner = executor or cmp.SerialExecutor(progress=progress, dist_info=dist_info,
                                            threads=threads)
    common = dict(shared=cfg.shared, progress=progress, is_main=is_main, dist_info=dist_info,
                  resume=cfg.resume, overwrite=cfg.overwrite, executor=runner)
    specs = cfg.methods
    lr_choice = cmp.describe_lrs(base, specs, default_lr=task.defaults.get("lr"))
    try:
        folder = open_output(out, "compare", resume=cfg.resume, overwrite=cfg.overwrite) \
            if is_main else None
    except BaseException:
        if executor is not None:
            executor.close()
        raise
    chosen = None
    try:
        if sweep:
            held_out = cfg.validation_split or DEFAULT_SWEEP_SPLIT
            chosen = cmp.sweep_lr(base, cfg.methods, cfg.seeds, sweep, out,
                                  validation_split=held_out, **common)
            specs, lr_choice = chosen["specs"], cmp.describe_lrs(base, specs, chosen)
        report = cmp.compare(base, specs, cfg.seeds, out, task=task, lr_choice=lr_choice,
                             budget=cfg.budget,
                             held_out_where=chosen["where"] if chosen else None, **common)
    finally:
        progress.close()
        if executor is not None:
            executor.close()
        if folder is not None:
            folder.close()
    if is_main and echo is not None:
        if chosen is not None:
            echo(f"lr per method (validation accuracy, {held_out:g} of the training set held "
                 f"out; the test set is not used):\n{chosen['table']}\n")
        echo(f"{report['task_name']}: {len(cfg.seeds)} seeds x {len(specs)} methods, "
             f"{lr_choice['text']}; results in {out}")
        echo(report["table"])
        echo(report["notes"])
        budget = report.get("budget")
        if budget is not None:
            echo(f"\n{budget['text']}\n{budget['table']}")
    report["out"] = str(out)
    report["sweep"] = chosen
    return report


# --------------------------------------------------------------------------- from Python

#: The name a task given as a dict or a TaskData (or a function workers cannot import) has
#: in the report and the runs' configurations, unless ``task_name`` says another.
PYTHON_TASK = "python-task"


def function_spec(fn: Callable[..., Any]) -> str | None:
    """``module:function`` or ``/path/file.py:function`` by which a worker process imports
    ``fn``: a function defined at the top level of an importable module or of a Python
    file; None for another (a lambda, a nested function, one of a notebook)."""
    name = getattr(fn, "__name__", None)
    module_name = getattr(fn, "__module__", None)
    if not name or getattr(fn, "__qualname__", None) != name or module_name is None:
        return None
    module = sys.modules.get(module_name)
    if module is None or getattr(module, name, None) is not fn:
        return None
    if module_name not in ("__main__", "__mp_main__") and not module_name.startswith(
            "_ksam_task_"):
        with contextlib.suppress(ImportError, ValueError):
            if importlib.util.find_spec(module_name) is not None:
                return f"{module_name}:{name}"
    file = getattr(module, "__file__", None)
    if file and file.endswith(".py") and os.path.isfile(file):
        return f"{os.path.abspath(file)}:{name}"
    return None


def compare(task: Any = "mnist1d", methods: list[str] | tuple[str, ...] | None = None, *,
            seeds: int | str | list[int] = 3, out: str | os.PathLike[str] | None = None,
            budget: str | None = None, jobs: int | None = None, threads: int | None = None,
            resume: bool = False, overwrite: bool = False, quiet: bool = False,
            task_name: str | None = None, **options: Any) -> dict[str, Any]:
    """Compare ``methods`` on ``task``: what ``ksam compare`` does, from Python.

    Args:
        task: a registered task's name (``"mnist1d"``), a spec
            (``"path/to/file.py:function"``, ``"package.module:function"``), a function
            taking no required arguments that returns the task, or the task itself: a dict
            with ``train_x``, ``train_y``, ``test_x``, ``test_y`` (tensors or arrays, integer
            labels) and ``make_model`` (returns a fresh ``nn.Module``), optional
            ``num_classes``, ``augment``, ``defaults``, ``description``
            (:mod:`ksam.tasks.user`), or a :class:`ksam.tasks.TaskData`.
        methods: method specs (``["sgd", "sam", "ksam:k=16"]``); default the command's.
        seeds: a count, a list or a range (``"0-4"``).
        out: the output folder, as the command's (default ``runs/compare-TASK-DATE-TIME``);
            ``resume``, ``overwrite`` as the flags.
        budget: ``"passes"`` or ``"time"``: an equal-budget grid beside the equal-epochs
            one (:mod:`ksam.budget`).
        jobs: worker processes for the runs on the CPU (default: one per core where
            workers can import the task, else 1). A task given as a dict, a TaskData or a
            function workers cannot import (a lambda, a nested function) trains in this
            process; a script that starts workers calls this under
            ``if __name__ == "__main__":``, as Python's multiprocessing requires.
        threads: torch threads of each run (default 1).
        quiet: print neither the plan, the progress nor the tables.
        task_name: the name of a task given as a dict, a TaskData or a function workers
            cannot import, in the report and the runs' configurations (default the
            function's name, or ``"python-task"``); resuming needs the same name.
        **options: any other field of :class:`ksam.config.CliConfig`, as the flags name
            them: ``epochs``, ``batch_size``, ``lr``, ``lr_sweep``, ``no_lr_sweep``,
            ``train_subset``, ``label_noise``, ``validation_split``, ``task_options``,
            ``device``, ``k``, ``rho``, ``preset``, ``ray``, ...

    Returns the summary the command writes to ``summary.json`` (with ``table`` and
    ``notes`` as printed, ``runs`` with every run's epochs, ``budget`` with the
    equal-budget grid's, ``out`` and ``sweep``). Bad input raises ValueError before
    anything is written.
    """
    from .presets import preset_layer
    from .tasks import TaskData
    from .tasks.user import local_task

    spec: str | None
    if isinstance(task, str):
        spec, local = task, None
    elif isinstance(task, (Mapping, TaskData)):
        spec, local = None, task
    elif callable(task):
        spec = function_spec(task)
        local = task if spec is None else None
    else:
        raise ValueError(f"task must be a name, a 'file.py:function' spec, a function, a dict "
                         f"or a TaskData, got a {type(task).__name__}")
    if spec is not None:
        name = spec
    elif task_name is not None:
        name = task_name
    else:
        own = getattr(local, "__name__", "") if callable(local) else ""
        name = own if own.isidentifier() else PYTHON_TASK
    from .tasks import TASKS

    if local is not None and name in TASKS:
        raise ValueError(f"task_name {name!r} is a registered task's; choose another")
    user = {"task": name, "seeds": seeds, "out": None if out is None else Path(out),
            "resume": resume, "overwrite": overwrite, "budget": budget, "jobs": jobs,
            "threads": threads, "quiet": quiet, **options}
    if methods is not None:
        user["methods"] = [methods] if isinstance(methods, str) else list(methods)
    user = {k: v for k, v in user.items() if v is not None}
    with local_task(name, local) if local is not None else contextlib.nullcontext():
        layers: list[Mapping[str, Any]] = []
        if user.get("preset") is not None:
            layers.append(preset_layer(user["preset"], user))
        cfg = CliConfig.from_layers(*layers, user)
        return run_comparison(cfg, echo=None if quiet else say, importable=local is None)
