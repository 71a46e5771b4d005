"""The ``ksam`` command: ``compare``, ``train``, ``bench``, ``tasks``.

Bad input gives one ``ksam: error: ...`` line and exit code 2, before anything is written
(:data:`USER_ERRORS`); any other error is a bug and shows its traceback.
The flags of ``compare`` and ``train`` have no argparse defaults: the parsed namespace holds
exactly what the user typed, which is merged over a preset and the command's defaults into
one :class:`ksam.lab.config.CliConfig` (:func:`config_from_args`).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..methods import METHODS
from .config import (
    BUDGETS,
    DEFAULT_LR_SWEEP,
    DEFAULT_METHODS,
    LR_SCHEDULES,
    SELECTION_SCOPES,
    CliConfig,
    MethodSpec,
    RunConfig,
    parse_seeds,
    parse_value,
)
from .presets import DEFAULT_COMPARE, PRESETS, preset_layer
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

#: The task of ``ksam compare`` and ``ksam train`` without ``--task``.
DEFAULT_TASK = RunConfig.__dataclass_fields__["task"].default


def _task_default(key: str) -> str:
    """How a help text names "the task's default" of ``key``: with the default task's
    value."""
    from .tasks import TASKS

    spec = TASKS.get(DEFAULT_TASK)
    example = None if spec is None else spec.defaults.get(key)
    if example is None:
        return "default: the task's (`ksam tasks` lists every task's)"
    return f"default: the task's ({DEFAULT_TASK}: {example:g}; `ksam tasks` lists every task's)"


def _add_task(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("task and data")
    g.add_argument("--task", help=f"a task of `ksam tasks` (default {DEFAULT_TASK}), or a "
                                  "function of "
                                  "yours that returns its data and model: "
                                  "path/to/file.py:function or package.module:function "
                                  "(docs/guide/compare.md)")
    g.add_argument("--data-dir", help="where the task's data files are")
    g.add_argument("--model", help="model variant of the task (e.g. cnn, mlp, resnet18)")
    g.add_argument("--train-subset", type=int, help="train on the first N examples only")
    g.add_argument("--label-noise", type=_FLOAT,
                   help="fraction of training labels replaced by another class")
    g.add_argument("--validation-split", type=_FLOAT,
                   help="hold out this fraction of the training set as the test set "
                        "(for tuning without touching the test set)")
    g.add_argument("--task-option", action="append", metavar="KEY=VALUE",
                   help="extra task option (of a function of yours: its keyword arguments), "
                        "repeatable")


def _add_training(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--k", type=_NUMBER, help="K-SAM / Ordered SGD subset: fraction or count")
    g.add_argument("--rho", type=_FLOAT, help="perturbation radius")
    g.add_argument("--epochs", type=int, help=f"training epochs; {_task_default('epochs')}")
    g.add_argument("--batch-size", type=int,
                   help=f"examples per step; {_task_default('batch_size')}")
    g.add_argument("--lr", type=_FLOAT,
                   help=f"learning rate, one for every method; {_task_default('lr')} "
                        "(`ksam compare` without it chooses each method's own)")
    g.add_argument("--momentum", type=_FLOAT,
                   help=f"SGD momentum in [0, 1); {_task_default('momentum')}")
    g.add_argument("--weight-decay", type=_FLOAT,
                   help=f"SGD weight decay; {_task_default('weight_decay')}")
    g.add_argument("--schedule", dest="lr_schedule", choices=LR_SCHEDULES,
                   help="learning-rate schedule, default cosine")
    g.add_argument("--device", help="auto (default), cpu, cuda or cuda:N")
    g.add_argument("--precision", choices=["fp32", "bf16", "fp16"], help="default fp32")
    fast = g.add_mutually_exclusive_group()
    fast.add_argument("--fast", dest="fast", action="store_true",
                      help="whole-step CUDA graphs (default on CUDA)")
    fast.add_argument("--no-fast", dest="fast", action="store_false",
                      help="eager steps (default on the CPU)")
    g.add_argument("--compile", nargs="?", const="inductor", metavar="BACKEND",
                   help="run the forward passes through torch.compile (default backend "
                        "inductor); compile time counts in the first epoch")
    g.add_argument("--micro-batch-size", type=int, metavar="M",
                   help="run every forward of a step in chunks of at most M examples (same "
                        "step up to float rounding; BatchNorm normalizes per chunk)")
    g.add_argument("--max-grad-norm", type=_FLOAT, metavar="X",
                   help="clip the descent gradient to global L2 norm X before each step")
    g.add_argument("--eval-every", type=int, metavar="N",
                   help="evaluate after every N-th epoch and after the last (default 1); "
                        "the final accuracy is the same whatever N")


def _add_processes(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--selection", dest="selection_scope", choices=SELECTION_SCOPES,
                   help="under torchrun: each rank's own top-K (default) or the global top-K")
    g.add_argument("--sync-perturbation", action="store_true",
                   help="under torchrun: average the ascent gradient across ranks")
    g.add_argument("--fsdp", action="store_true",
                   help="under torchrun: shard the model with FSDP2 instead of DDP "
                        "(the perturbation is then always synchronized)")


def _add_output(p: argparse.ArgumentParser, default: str, resume_help: str) -> None:
    g = p.add_argument_group("output")
    g.add_argument("--out", type=Path,
                   help=f"output directory, new or empty (default {default})")
    again = g.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help=resume_help)
    again.add_argument("--overwrite", action="store_true",
                       help="replace the results already in --out")
    g.add_argument("--quiet", action="store_true",
                   help="no plan and no progress (a bar on a terminal, else one line per "
                        "finished run)")


def _add_ray(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                   help="run every run of the grid as a Ray task (pip install \"ksam[ray]\"):"
                        " alone, on a Ray instance started on this machine; with the head "
                        "node's HOST:PORT or 'auto', on that running cluster "
                        "(docs/guide/distributed.md)")
    g.add_argument("--cpus-per-run", type=_FLOAT, metavar="N",
                   help="with --ray: CPUs each run's task asks for (default 1)")
    g.add_argument("--gpus-per-run", type=_FLOAT, metavar="N",
                   help="with --ray: GPUs each run's task asks for (default 1 where the "
                        "cluster has GPUs, else 0)")


COMPARE_DESCRIPTION = (
    "Train several methods with several seeds on one task (the same initial weights and "
    "data order per seed for every method, runs interleaved) and write a report: accuracy, "
    "training time and time relative to SGD, per method; with --budget also accuracy at "
    "equal cost. Without an lr, each method's lr is first chosen on a held-out part of the "
    "training set. The task may be a function of yours (--task path/to/file.py:function). "
    "The plan (runs, sweep, where results go) is printed before the first run. "
    "Guide: docs/guide/compare.md.")
TRAIN_DESCRIPTION = (
    "Train one method once, with a checkpoint after every epoch (--resume continues it). "
    "On the CPU the run takes as many torch threads as there are cores not busy, and says "
    "so (--threads sets them).")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="ksam", description="Sharpness-aware training at SGD's cost (K-SAM and friends).")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("compare", help="train several methods x seeds and compare them",
                       description=COMPARE_DESCRIPTION, argument_default=argparse.SUPPRESS)
    g = p.add_argument_group("methods and seeds")
    g.add_argument("--methods", nargs="+", type=_SPEC, metavar="SPEC",
                   help="method specs, e.g. sgd sam ksam ksam:k=16 osgd:k=16 sgd:lr=0.2 "
                        f"(methods: {', '.join(METHODS)}); default: "
                        f"{' '.join(DEFAULT_METHODS)}")
    g.add_argument("--seeds", type=_SEEDS,
                   help="a count (3 = seeds 0,1,2; the default), a list (0,4,7) or a range "
                        "(0-4)")
    g.add_argument("--preset", help=f"a named configuration: {', '.join(PRESETS)} "
                                    "(docs/experiments/results.md)")
    _add_task(p)
    _add_training(p)
    g = p.add_argument_group("learning rate per method")
    sweep = g.add_mutually_exclusive_group()
    sweep.add_argument("--lr-sweep", nargs="+", type=_FLOAT, metavar="LR",
                       help="choose each method's lr among these on a held-out split of the "
                            "training set (--validation-split, default 0.2), then compare "
                            "every method at its own lr on the test set; the default when "
                            "no lr is given: "
                            f"{' '.join(f'{lr:g}' for lr in DEFAULT_LR_SWEEP)}")
    sweep.add_argument("--no-lr-sweep", action="store_true",
                       help="no lr sweep: every method at one shared lr (--lr, else the "
                            "task's default)")
    g = p.add_argument_group("equal budget")
    g.add_argument("--budget", choices=BUDGETS,
                   help="also compare at equal cost: every method trains for as many steps "
                        "as SGD's run of --epochs epochs buys, in example passes (forward 1, "
                        "backward 2 per example; deterministic) or in training time measured "
                        "in the equal-epochs grid; its lr schedule over its own steps")
    g = p.add_argument_group("where the runs run")
    g.add_argument("--jobs", type=int, metavar="N",
                   help="on the CPU, run the grid's runs in N parallel worker processes "
                        "(default: one per core; 1: one after the other in this process); "
                        "results are the same bit for bit")
    g.add_argument("--threads", type=int, metavar="N",
                   help="torch threads of each run (default 1)")
    _add_ray(g)
    _add_processes(g)
    _add_output(p, "runs/compare-TASK-DATE-TIME",
                "continue in --out: finished runs are kept, interrupted ones resume from "
                "their checkpoints, missing ones run")

    p = sub.add_parser("train", help="train one method once (checkpoints every epoch)",
                       description=TRAIN_DESCRIPTION, argument_default=argparse.SUPPRESS)
    g = p.add_argument_group("method and seed")
    g.add_argument("--method", type=_SPEC, help="method spec, e.g. ksam:k=16 (default ksam)")
    g.add_argument("--seed", type=int, help="default 0")
    _add_task(p)
    _add_training(p)
    g = p.add_argument_group("processes and threads")
    g.add_argument("--threads", type=int, metavar="N",
                   help="torch threads (default: the cores not busy, from the load average; "
                        "or what OMP_NUM_THREADS says)")
    _add_processes(g)
    _add_output(p, "runs/train-TASK-METHOD-seedN", "continue from OUT/checkpoint.pt")

    p = sub.add_parser("bench", help="time optimizer steps of every method side by side")
    from .bench import add_arguments

    add_arguments(p)

    sub.add_parser("tasks", help="list the tasks and their training defaults")
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
    preset = user.get("preset")
    if preset is None and args.command == "compare" and user.get("task") is None:
        preset = DEFAULT_COMPARE.name  # the main job's built-in default
    if preset is not None:
        layers.append(preset_layer(preset, user))
    return CliConfig.from_layers(*layers, user)


def cmd_compare(cfg: CliConfig) -> int:
    from .compare import run_comparison

    run_comparison(cfg)
    return 0


def cmd_train(cfg: CliConfig) -> int:
    from .compare import check_out_dir, default_out, join_processes, world_size
    from .config import resolve_device
    from .train import resume_point, train

    spec = cfg.methods[0]
    base = cfg.train_config()
    base.method, base.method_options = spec.name, spec.run_options(cfg.shared)
    if spec.lr is not None:
        base.lr = spec.lr
    out = cfg.out or default_out("train", base.task, spec.name, f"seed{cfg.seed}")
    check_out_dir(out, "train", resume=cfg.resume, overwrite=cfg.overwrite)
    if cfg.resume:
        resume_point(out)
    world = world_size()
    base.check_processes(world)
    threads = None
    if cfg.threads is not None or (world == 1 and resolve_device(base.device) == "cpu"):
        from .pool import choose_threads

        threads, why = choose_threads(cfg.threads)
    dist_info = join_processes(world)
    if dist_info is not None:
        base.device = str(dist_info.device)
    is_main = dist_info is None or dist_info.rank == 0
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
        if is_main and not cfg.quiet:
            print(f"threads: {why}", flush=True)

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
            from .. import distributed

            distributed.cleanup()
    if is_main:
        final = result["final"]
        print(json.dumps({k: final[k] for k in ("epoch", "test_acc", "train_time",
                                                 "skipped_steps")}))
    return 0


def _defaults_text(defaults: dict[str, Any]) -> str:
    names = {"epochs": "epochs", "batch_size": "batch", "lr": "lr", "momentum": "momentum",
             "weight_decay": "weight decay"}
    return ", ".join(f"{names.get(k, k)} {v:g}" for k, v in defaults.items())


def cmd_tasks() -> int:
    from .tasks import TASKS
    from .tasks.user import DEFAULTS

    for name, spec in TASKS.items():
        doc = getattr(spec, "description", None) or (spec.__doc__ or "").strip()
        print(f"{name:16s} {doc.splitlines()[0] if doc else ''}")
        if spec.defaults:
            note = f" ({spec.defaults_note})" if spec.defaults_note else ""
            print(f"{'':16s} defaults: {_defaults_text(spec.defaults)}{note}")
    print(f"\n{'FILE.py:FUNCTION':16s} a task of your own: a function that returns its data "
          "and model (docs/guide/compare.md)")
    print(f"{'':16s} defaults: {_defaults_text(DEFAULTS)} (its dict's 'defaults' set others)")
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
