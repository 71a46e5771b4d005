"""The ``ksam`` command: ``compare``, ``train``, ``bench``, ``tasks``.

Bad input gives one ``ksam: error: ...`` line and exit code 2, before anything is written
(:data:`USER_ERRORS`); any other error is a bug and shows its traceback.
The flags of ``compare`` and ``train`` have no argparse defaults: the parsed namespace holds
exactly what the user typed, which is merged over a preset and the command's defaults into
one :class:`ksam.config.CliConfig` (:func:`config_from_args`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from .config import (
    DEFAULT_SWEEP_SPLIT,
    LR_SCHEDULES,
    SELECTION_SCOPES,
    CliConfig,
    MethodSpec,
    parse_seeds,
    parse_value,
)
from .methods import METHODS
from .presets import PRESETS, preset_layer
from .tasks.data import MissingDependencyError

__all__ = ["build_parser", "config_from_args", "main", "parse_seeds"]


# --------------------------------------------------------------------------- argument types

def _typed(convert: Callable[[str], Any]) -> Callable[[str], Any]:
    """An argparse ``type`` whose ValueError message becomes the error line."""

    def parse(text: str) -> Any:
        try:
            return convert(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse.__name__ = convert.__name__
    return parse


def _finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"{text!r} is not a finite number")
    return value


def _number(text: str) -> int | float:
    try:
        return int(text)
    except ValueError:
        return _finite(text)


_FLOAT, _NUMBER = _typed(_finite), _typed(_number)
#: Errors that are the user's (a bad value, a missing or unusable path, a missing optional
#: package): one ``ksam: error:`` line. Any other error is a bug and shows its traceback.
USER_ERRORS = (ValueError, OSError, MissingDependencyError, argparse.ArgumentTypeError)
_SPEC, _SEEDS = _typed(MethodSpec.parse), _typed(parse_seeds)


class _Parser(argparse.ArgumentParser):
    """One error line, no usage dump: ``ksam: error: ...`` and exit code 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"ksam: error: {message}\n")


# --------------------------------------------------------------------------- the parser

def _add_task(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", help="task name (see `ksam tasks`); default mnist1d")
    p.add_argument("--data-dir", help="where the task's data files are")
    p.add_argument("--model", help="model variant of the task (e.g. cnn, mlp, resnet18)")
    p.add_argument("--train-subset", type=int, help="train on the first N examples only")
    p.add_argument("--label-noise", type=_FLOAT,
                   help="fraction of training labels replaced by another class")
    p.add_argument("--validation-split", type=_FLOAT,
                   help="hold out this fraction of the training set as the test set "
                        "(for tuning without touching the test set)")
    p.add_argument("--task-option", action="append", metavar="KEY=VALUE",
                   help="extra task option, repeatable")


def _add_training(p: argparse.ArgumentParser) -> None:
    p.add_argument("--k", type=_NUMBER, help="K-SAM / Ordered SGD subset: fraction or count")
    p.add_argument("--rho", type=_FLOAT, help="perturbation radius")
    p.add_argument("--epochs", type=int, help="training epochs (default: the task's)")
    p.add_argument("--batch-size", type=int, help="examples per step (default: the task's)")
    p.add_argument("--lr", type=_FLOAT,
                   help="learning rate, one for every method (default: the task's; "
                        "`ksam compare` without it chooses each method's own)")
    p.add_argument("--momentum", type=_FLOAT, help="SGD momentum in [0, 1) (default: the "
                                                   "task's)")
    p.add_argument("--weight-decay", type=_FLOAT, help="default: the task's")
    p.add_argument("--schedule", dest="lr_schedule", choices=LR_SCHEDULES,
                   help="learning-rate schedule, default cosine")
    p.add_argument("--device", help="auto (default), cpu, cuda or cuda:N")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], help="default fp32")
    fast = p.add_mutually_exclusive_group()
    fast.add_argument("--fast", dest="fast", action="store_true",
                      help="whole-step CUDA graphs (default on CUDA)")
    fast.add_argument("--no-fast", dest="fast", action="store_false",
                      help="eager steps (default on the CPU)")
    p.add_argument("--compile", nargs="?", const="inductor", metavar="BACKEND",
                   help="run the forward passes through torch.compile (default backend "
                        "inductor); compile time counts in the first epoch")
    p.add_argument("--selection", dest="selection_scope", choices=SELECTION_SCOPES,
                   help="under torchrun: each rank's own top-K (default) or the global top-K")
    p.add_argument("--sync-perturbation", action="store_true",
                   help="under torchrun: average the ascent gradient across ranks")
    p.add_argument("--micro-batch-size", type=int, metavar="M",
                   help="run every forward of a step in chunks of at most M examples (same "
                        "step up to float rounding; BatchNorm normalizes per chunk)")
    p.add_argument("--max-grad-norm", type=_FLOAT, metavar="X",
                   help="clip the descent gradient to global L2 norm X before each step")
    p.add_argument("--eval-every", type=int, metavar="N",
                   help="evaluate after every N-th epoch and after the last (default 1); "
                        "the final accuracy is the same whatever N")
    p.add_argument("--fsdp", action="store_true",
                   help="under torchrun: shard the model with FSDP2 instead of DDP "
                        "(the perturbation is then always synchronized)")


def _add_output(p: argparse.ArgumentParser, resume_help: str) -> None:
    p.add_argument("--out", type=Path, help="output directory (must be empty or new)")
    again = p.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help=resume_help)
    again.add_argument("--overwrite", action="store_true",
                       help="replace the results already in --out")
    p.add_argument("--quiet", action="store_true",
                   help="no progress (a bar on a terminal, else one line per finished run)")


def _add_ray(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                   help="run every run of the grid as a Ray task (pip install \"ksam[ray]\"):"
                        " alone, on a Ray instance started on this machine; with the head "
                        "node's HOST:PORT or 'auto', on that running cluster "
                        "(docs/distributed.md)")
    p.add_argument("--cpus-per-run", type=_FLOAT, metavar="N",
                   help="with --ray: CPUs each run's task asks for (default 1)")
    p.add_argument("--gpus-per-run", type=_FLOAT, metavar="N",
                   help="with --ray: GPUs each run's task asks for (default 1 where the "
                        "cluster has GPUs, else 0)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="ksam", description="Sharpness-aware training at SGD's cost (K-SAM and friends).")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("compare", help="train several methods x seeds and compare them",
                       argument_default=argparse.SUPPRESS)
    _add_task(p)
    _add_training(p)
    _add_output(p, "continue in --out: finished runs are kept, interrupted ones resume from "
                   "their checkpoints, missing ones run")
    p.add_argument("--methods", nargs="+", type=_SPEC, metavar="SPEC",
                   help="method specs, e.g. sgd sam ksam ksam:k=16 osgd:k=16 sgd:lr=0.2 "
                        f"(methods: {', '.join(METHODS)}); default: sgd sam ksam")
    p.add_argument("--seeds", type=_SEEDS,
                   help="a count (3 = seeds 0,1,2; the default), a list (0,4,7) or a range "
                        "(0-4)")
    p.add_argument("--preset", help=f"a named configuration: {', '.join(PRESETS)} "
                                    "(docs/results.md)")
    sweep = p.add_mutually_exclusive_group()
    sweep.add_argument("--lr-sweep", nargs="+", type=_FLOAT, metavar="LR",
                       help="choose each method's lr among these on a held-out split of the "
                            "training set (--validation-split, default 0.2), then compare "
                            "every method at its own lr on the test set; the default when "
                            "no lr is given: 0.1 0.2 0.4")
    sweep.add_argument("--no-lr-sweep", action="store_true",
                       help="no lr sweep: every method at one shared lr (--lr, else the "
                            "task's default)")
    _add_ray(p)

    p = sub.add_parser("train", help="train one method once (checkpoints every epoch)",
                       argument_default=argparse.SUPPRESS)
    _add_task(p)
    _add_training(p)
    _add_output(p, "continue from OUT/checkpoint.pt")
    p.add_argument("--method", type=_SPEC, help="method spec, e.g. ksam:k=16 (default ksam)")
    p.add_argument("--seed", type=int, help="default 0")

    p = sub.add_parser("bench", help="time optimizer steps of every method side by side")
    from .bench import add_arguments

    add_arguments(p)

    sub.add_parser("tasks", help="list the tasks")
    return parser


# --------------------------------------------------------------------------- configuration

def _task_options(items: list[str]) -> dict[str, Any]:
    opts: dict[str, Any] = {}
    for item in items:
        key, eq, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not eq:
            raise ValueError(f"--task-option {item!r} is not of the form key=value")
        if not key:
            raise ValueError(f"--task-option {item!r} names no option (key=value)")
        try:
            opts[key] = parse_value(value.strip())
        except ValueError as exc:
            raise ValueError(f"--task-option {item!r}: {exc}") from None
    return opts


def config_from_args(args: argparse.Namespace) -> CliConfig:
    """The command's defaults, then ``--preset``'s values, then the user's flags."""
    user = {k: v for k, v in vars(args).items() if k != "command"}
    if "task_option" in user:
        user["task_options"] = _task_options(user.pop("task_option"))
    if "method" in user:
        user["methods"] = [user.pop("method")]
    defaults: dict[str, Any] = {"methods": ["ksam"]} if args.command == "train" else {}
    layers = [defaults]
    if user.get("preset") is not None:
        layers.append(preset_layer(user["preset"], user))
    return CliConfig.from_layers(*layers, user)


def check_out_dir(out: Path, command: str, *, resume: bool, overwrite: bool) -> None:
    """ValueError unless ``out`` can take ``command``'s results: a new or empty folder, or
    one with results under ``resume``/``overwrite`` (not another command's, no file of the
    command's names that ksam did not write); never a file; writable; not in use by another
    command (its lock's message first: a busy folder is not empty either)."""
    from .outputs import check_folder_command, check_own_outputs, check_unlocked

    existing = next(p for p in (out, *out.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise ValueError(f"--out {out}: {existing} is a file, not a folder")
    if existing == out:
        check_unlocked(out)
    if existing == out and any(out.iterdir()):
        if not (resume or overwrite):
            raise ValueError(f"--out {out} is not empty; give --resume to continue the "
                             "results there or --overwrite to replace them")
        check_folder_command(out, command)
        check_own_outputs(out, command)
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out}: {existing} is not writable")


# --------------------------------------------------------------------------- commands

class _Progress:
    """Progress over all runs' epochs: a tqdm bar on a terminal, else one line per finished
    run; nothing with --quiet."""

    def __init__(self, total: int, epochs: int, quiet: bool) -> None:
        self.bar, self.quiet, self.epochs = None, quiet, epochs
        self.runs, self.done = max(1, total // max(1, epochs)), 0
        if not quiet and sys.stdout.isatty():
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, unit="epoch", dynamic_ncols=True)
            except ImportError:
                pass

    def __call__(self, label: str, row: dict[str, Any]) -> None:
        acc = "-" if row["test_acc"] is None else f"{row['test_acc']:.2f}"
        if self.bar is not None:
            self.bar.set_description(label)
            self.bar.set_postfix(acc=acc, loss=f"{row['train_loss']:.3f}")
            self.bar.update(1)
        elif not self.quiet and row["epoch"] == self.epochs:
            self.done += 1
            print(f"run {self.done}/{self.runs} done: {label}: accuracy {acc} %, train loss "
                  f"{row['train_loss']:.4f}, {row['train_time']:.1f} s", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _world_size() -> int:
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


def _dist(world: int):
    """Under torchrun (``world`` > 1) every rank joins the process group."""
    if world <= 1:
        return None
    from . import distributed

    return distributed.init_from_env()


def _ray_executor(cfg: CliConfig, world: int, runs: int, base: Any) -> Any:
    """With ``--ray``: the :class:`ksam.cluster.RayExecutor` (connected, its task size
    checked against the cluster) and ``base``'s ``auto`` device set to the workers'; else
    None (and Ray is not imported)."""
    if cfg.ray is None:
        return None
    if world > 1:
        raise ValueError("--ray and torchrun exclude each other: under --ray every run is "
                         "one Ray task; start `ksam compare --ray` as one process")
    from .cluster import RayExecutor

    executor = RayExecutor(None if cfg.ray == "local" else cfg.ray,
                           cpus_per_run=cfg.cpus_per_run, gpus_per_run=cfg.gpus_per_run,
                           quiet=cfg.quiet, total_runs=runs)
    if base.device == "auto":
        base.device = executor.device
    return executor


def cmd_compare(cfg: CliConfig) -> int:
    from . import compare as cmp
    from .outputs import open_output
    from .tasks import get_task
    from .train import resolve_device

    sweep = cfg.sweep_lrs
    if sweep and cfg.lr is not None:
        raise ValueError("--lr and --lr-sweep exclude each other: the sweep sets every lr")
    if cfg.resume and cfg.out is None:
        raise ValueError("--resume needs --out: the comparison to continue")
    out = cfg.out or Path("runs") / f"compare-{cfg.task}-{datetime.now():%Y%m%d-%H%M%S}"
    check_out_dir(out, "compare", resume=cfg.resume, overwrite=cfg.overwrite)
    # The held-out split is for the sweep; the final comparison uses the test set.
    base = cfg.train_config(with_validation=not sweep)
    if sweep:
        cmp.check_sweep(base, cfg.methods, sweep)
    world = _world_size()
    base.check_processes(world)
    task = get_task(base.task, device=resolve_device(base.device), seed=cfg.seeds[0],
                    **base.task_options)
    cmp.check_methods(base.resolved(task.defaults), cfg.methods, cfg.shared, task)
    rounds = 1 + (len(sweep) if sweep else 0)
    runs = len(cfg.methods) * len(cfg.seeds) * rounds
    executor = _ray_executor(cfg, world, runs, base)
    dist_info = _dist(world)
    if dist_info is not None:
        base.device = str(dist_info.device)
    is_main = dist_info is None or dist_info.rank == 0
    epochs = base.resolved(task.defaults).epochs
    progress = _Progress(runs * epochs, epochs, cfg.quiet or not is_main or executor is not None)
    common = dict(shared=cfg.shared, progress=progress, is_main=is_main, dist_info=dist_info,
                  resume=cfg.resume, overwrite=cfg.overwrite, executor=executor)
    specs, lr_choice = cfg.methods, cmp.describe_lrs(base, cfg.methods)
    try:
        folder = open_output(out, "compare", resume=cfg.resume, overwrite=cfg.overwrite) \
            if is_main else None
    except BaseException:
        if executor is not None:
            executor.close()
        raise
    try:
        if sweep:
            held_out = cfg.validation_split or DEFAULT_SWEEP_SPLIT
            chosen = cmp.sweep_lr(base, cfg.methods, cfg.seeds, sweep, out,
                                  validation_split=held_out, **common)
            specs, lr_choice = chosen["specs"], cmp.describe_lrs(base, specs, chosen)
        report = cmp.compare(base, specs, cfg.seeds, out, task=task, lr_choice=lr_choice,
                             **common)
    finally:
        progress.close()
        if executor is not None:
            executor.close()
        if folder is not None:
            folder.close()
    if is_main:
        if sweep:
            print(f"lr per method (validation accuracy, {held_out:g} of the training set held "
                  f"out; the test set is not used):\n{chosen['table']}\n")
        print(f"{base.task}: {len(cfg.seeds)} seeds x {len(specs)} methods, {lr_choice['text']}"
              f"; results in {out}")
        print(report["table"])
        print(report["notes"])
    return 0


def cmd_train(cfg: CliConfig) -> int:
    from .train import resume_point, train

    spec = cfg.methods[0]
    base = cfg.train_config()
    base.method, base.method_options = spec.name, spec.method_options(cfg.shared)
    if spec.lr is not None:
        base.lr = spec.lr
    out = cfg.out or Path("runs") / f"train-{base.task}-{spec.name}-seed{cfg.seed}"
    check_out_dir(out, "train", resume=cfg.resume, overwrite=cfg.overwrite)
    if cfg.resume:
        resume_point(out)
    world = _world_size()
    base.check_processes(world)
    dist_info = _dist(world)
    if dist_info is not None:
        base.device = str(dist_info.device)
    is_main = dist_info is None or dist_info.rank == 0

    def report(row: dict[str, Any]) -> None:
        if is_main and not cfg.quiet:
            acc = "     -" if row["test_acc"] is None else f"{row['test_acc']:6.2f}"
            print(f"epoch {row['epoch']:3d}  train loss {row['train_loss']:.4f}  "
                  f"test acc {acc}%  epoch {row['epoch_time']:.2f}s  "
                  f"step {1000 * row['step_time_median']:.2f} ms", flush=True)

    try:
        result = train(base, out_dir=out, resume=cfg.resume, overwrite=cfg.overwrite,
                       on_epoch=report, dist_info=dist_info)
    finally:
        if dist_info is not None:  # FSDP's process group aborts the process if left open
            from . import distributed

            distributed.cleanup()
    if is_main:
        final = result["final"]
        print(json.dumps({k: final[k] for k in ("epoch", "test_acc", "train_time",
                                                 "skipped_steps")}))
    return 0


def cmd_tasks() -> int:
    from .tasks import TASKS

    for name, spec in TASKS.items():
        doc = getattr(spec, "description", None) or (spec.__doc__ or "").strip()
        print(f"{name:16s} {doc.splitlines()[0] if doc else ''}")
    return 0


def _run(args: argparse.Namespace) -> int:
    if args.command == "bench":
        from .bench import run_from_args

        return run_from_args(args)
    if args.command == "tasks":
        return cmd_tasks()
    cfg = config_from_args(args)
    return cmd_compare(cfg) if args.command == "compare" else cmd_train(cfg)


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # a parse error (its line is printed) or --help
        return exc.code if isinstance(exc.code, int) else 2
    try:
        return _run(args)
    except USER_ERRORS as exc:
        print(f"ksam: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ksam: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
