"""The ``ksam`` command: ``compare``, ``train``, ``bench``, ``tasks``.

Bad input gives one ``ksam: error: ...`` line and exit code 2, before anything is written.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

from .methods import METHODS


def _task_options(args: argparse.Namespace) -> dict[str, Any]:
    opts: dict[str, Any] = {}
    if args.data_dir is not None:
        opts["data_dir"] = args.data_dir
    if args.train_subset is not None:
        opts["train_subset"] = args.train_subset
    if args.label_noise:
        opts["label_noise"] = args.label_noise
    if args.validation_split:
        opts["validation_split"] = args.validation_split
    if args.model is not None:
        opts["model"] = args.model
    for item in args.task_option or []:
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"--task-option {item!r} is not of the form key=value")
        from .compare import _parse_value

        opts[key.strip().replace("-", "_")] = _parse_value(value.strip())
    return opts


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", help="task name (see `ksam tasks`); default mnist1d")
    p.add_argument("--data-dir", type=Path, help="where the task's data files are")
    p.add_argument("--model", help="model variant of the task (e.g. cnn, mlp, resnet18)")
    p.add_argument("--train-subset", type=int, help="train on the first N examples only")
    p.add_argument("--label-noise", type=float,
                   help="fraction of training labels replaced by another class")
    p.add_argument("--validation-split", type=float,
                   help="hold out this fraction of the training set as the test set "
                        "(for tuning without touching the test set)")
    p.add_argument("--task-option", action="append", metavar="KEY=VALUE",
                   help="extra task option, repeatable")
    p.add_argument("--k", type=_number, help="K-SAM / Ordered SGD subset: fraction or count")
    p.add_argument("--rho", type=float, help="perturbation radius")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--momentum", type=float)
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--schedule", choices=["cosine", "constant"], help="default cosine")
    p.add_argument("--device", help="auto (default), cpu, cuda or cuda:N")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], help="default fp32")
    fast = p.add_mutually_exclusive_group()
    fast.add_argument("--fast", dest="fast", action="store_true", default=None,
                      help="whole-step CUDA graphs (default on CUDA)")
    fast.add_argument("--no-fast", dest="fast", action="store_false")
    p.add_argument("--compile", nargs="?", const="inductor", metavar="BACKEND",
                   help="run the forward passes through torch.compile (default backend "
                        "inductor); compile time counts in the first epoch")
    p.add_argument("--selection", choices=["local", "global"], default="local",
                   help="under torchrun: each rank's own top-K (default) or the global top-K")
    p.add_argument("--sync-perturbation", action="store_true",
                   help="under torchrun: average the ascent gradient across ranks")
    p.add_argument("--micro-batch-size", type=int, metavar="M",
                   help="run every forward of a step in chunks of at most M examples (same "
                        "step up to float rounding; BatchNorm normalizes per chunk)")
    p.add_argument("--max-grad-norm", type=float, metavar="X",
                   help="clip the descent gradient to global L2 norm X before each step")
    p.add_argument("--fsdp", action="store_true",
                   help="under torchrun: shard the model with FSDP2 instead of DDP "
                        "(the perturbation is then always synchronized)")
    p.add_argument("--out", type=Path, help="output directory")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _number(text: str) -> int | float:
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def parse_seeds(value: str | int | list[int]) -> list[int]:
    """A count (``3`` = seeds 0, 1, 2), a list (``0,4,7``) or a range (``0-4``)."""
    if isinstance(value, list):
        return [int(v) for v in value]
    text = str(value).strip()
    try:
        if text.isdigit():
            if int(text) < 1:
                raise ValueError
            return list(range(int(text)))
        if "-" in text and "," not in text:
            lo, hi = (int(v) for v in text.split("-"))
            if hi < lo:
                raise ValueError
            return list(range(lo, hi + 1))
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"seeds must be a count (3), a list (0,1,2) or a range (0-4), got {text!r}"
        ) from None


class _Parser(argparse.ArgumentParser):
    """One error line, no usage dump: ``ksam: error: ...`` and exit code 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"ksam: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="ksam", description="Sharpness-aware training at SGD's cost (K-SAM and friends).")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("compare", help="train several methods x seeds and compare them")
    _add_common(p)
    p.add_argument("--methods", nargs="+", default=None, metavar="SPEC",
                   help="method specs, e.g. sgd sam ksam ksam:k=16 osgd:k=16 "
                        f"(methods: {', '.join(METHODS)}); default: sgd sam ksam")
    p.add_argument("--seeds", type=parse_seeds, default=None,
                   help="a count (3 = seeds 0,1,2; the default), a list (0,4,7) or a range "
                        "(0-4)")
    p.add_argument("--preset", help="a named configuration (see docs/results.md)")
    p.add_argument("--resume", action="store_true",
                   help="continue in --out: finished runs are kept, interrupted ones resume "
                        "from their checkpoints, missing ones run")
    p.add_argument("--lr-sweep", nargs="+", type=float, metavar="LR",
                   help="choose each method's lr among these on a held-out split of the "
                        "training set (--validation-split, default 0.2), then compare every "
                        "method at its own lr on the test set")

    p = sub.add_parser("train", help="train one method once (checkpoints every epoch)")
    _add_common(p)
    p.add_argument("--method", default="ksam", help="method spec, e.g. ksam:k=16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")

    p = sub.add_parser("bench", help="time optimizer steps of every method side by side")
    from .bench import add_arguments

    add_arguments(p)

    sub.add_parser("tasks", help="list the tasks")
    return parser


def _base_config(args: argparse.Namespace):
    from .train import TrainConfig

    return TrainConfig(
        task=args.task or "mnist1d", epochs=args.epochs, batch_size=args.batch_size,
        lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay,
        schedule=args.schedule or "cosine", device=args.device or "auto",
        precision=args.precision or "fp32", fast=args.fast, compile=args.compile,
        task_options=_task_options(args), selection=args.selection,
        sync_perturbation=args.sync_perturbation, fsdp=args.fsdp,
        micro_batch_size=args.micro_batch_size, max_grad_norm=args.max_grad_norm)


class _Progress:
    """A tqdm bar over epochs of all runs; off with --quiet or when stdout is no terminal."""

    def __init__(self, total: int, quiet: bool) -> None:
        self.bar = None
        if not quiet and sys.stdout.isatty():
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, unit="epoch", dynamic_ncols=True)
            except ImportError:
                pass

    def __call__(self, label: str, row: dict[str, Any]) -> None:
        if self.bar is not None:
            self.bar.set_description(label)
            self.bar.set_postfix(acc=f"{row['test_acc']:.2f}", loss=f"{row['train_loss']:.3f}")
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _dist():
    """torchrun sets WORLD_SIZE; then every rank joins the process group."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from . import distributed

    return distributed.init_from_env()


def cmd_compare(args: argparse.Namespace) -> int:
    from .compare import compare
    from .tasks import get_task
    from .train import resolve_device

    if args.preset:
        from .presets import apply_preset

        apply_preset(args)
    base = _base_config(args)
    base.validate()
    seeds = parse_seeds(args.seeds if args.seeds is not None else 3)
    specs = args.methods or ["sgd", "sam", "ksam"]
    sweep = args.lr_sweep
    if sweep and args.lr is not None:
        raise ValueError("--lr and --lr-sweep exclude each other: the sweep sets every lr")
    if args.resume and args.out is None:
        raise ValueError("--resume needs --out: the comparison to continue")
    if sweep:  # the held-out split is for the sweep; the final comparison uses the test set
        held_out = base.task_options.pop("validation_split", None) or 0.2
    dist_info = _dist()
    device = resolve_device(base.device)
    if dist_info is not None:
        device = str(dist_info.device)
        base.device = device
    task = get_task(base.task, device=device, seed=seeds[0], **base.task_options)
    epochs = base.epochs or task.defaults["epochs"]
    out = args.out or Path("runs") / f"compare-{base.task}-{datetime.now():%Y%m%d-%H%M%S}"
    is_main = dist_info is None or dist_info.rank == 0
    rounds = 1 + (len(sweep) if sweep else 0)
    progress = _Progress(len(specs) * len(seeds) * epochs * rounds, args.quiet or not is_main)
    shared = {"k": args.k, "rho": args.rho}
    try:
        if sweep:
            from .compare import sweep_lr

            chosen = sweep_lr(base, specs, seeds, sweep, out, validation_split=held_out,
                              shared=shared, progress=progress, is_main=is_main,
                              dist_info=dist_info, resume=args.resume)
            specs = chosen["specs"]
        report = compare(base, specs, seeds, out, shared=shared, task=task, progress=progress,
                         is_main=is_main, dist_info=dist_info, resume=args.resume)
    finally:
        progress.close()
    if is_main and sweep:
        print(f"lr per method (validation accuracy, {held_out:g} of the training set held "
              f"out):\n{chosen['table']}\n")
    if is_main:
        print(f"{base.task}: {len(seeds)} seeds x {len(specs)} methods, results in {out}")
        print(report["table"])
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .compare import method_config, split_run_options
    from .train import train

    base = _base_config(args)
    name, options = method_config(args.method, {"k": args.k, "rho": args.rho})
    options, run_options = split_run_options(options)
    base.method, base.method_options, base.seed = name, options, args.seed
    if "lr" in run_options:
        base.lr = run_options["lr"]
    out = args.out or Path("runs") / f"train-{base.task}-{name}-seed{args.seed}"
    if args.resume and not (out / "checkpoint.pt").exists():
        raise FileNotFoundError(f"--resume: no checkpoint at {out / 'checkpoint.pt'}")
    dist_info = _dist()
    if dist_info is not None:
        base.device = str(dist_info.device)
    is_main = dist_info is None or dist_info.rank == 0

    def report(row: dict[str, Any]) -> None:
        if is_main and not args.quiet:
            print(f"epoch {row['epoch']:3d}  train loss {row['train_loss']:.4f}  "
                  f"test acc {row['test_acc']:6.2f}%  epoch {row['epoch_time']:.2f}s  "
                  f"step {1000 * row['step_time_median']:.2f} ms", flush=True)

    try:
        result = train(base, out_dir=out, resume=args.resume, on_epoch=report,
                       dist_info=dist_info)
    finally:
        if dist_info is not None:  # FSDP's process group aborts the process if left open
            from . import distributed

            distributed.cleanup()
    if is_main:
        final = result["final"]
        print(json.dumps({k: final[k] for k in ("epoch", "test_acc", "train_time",
                                                 "skipped_steps")}))
    return 0


def cmd_tasks(args: argparse.Namespace) -> int:
    from .tasks import TASKS

    for name, spec in TASKS.items():
        doc = getattr(spec, "description", None) or (spec.__doc__ or "").strip()
        print(f"{name:16s} {doc.splitlines()[0] if doc else ''}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handlers = {"compare": cmd_compare, "train": cmd_train, "tasks": cmd_tasks}
    try:
        if args.command == "bench":
            from .bench import run_from_args

            return run_from_args(args)
        return handlers[args.command](args)
    except (ValueError, FileNotFoundError, NotADirectoryError, ImportError, KeyError,
            argparse.ArgumentTypeError) as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"ksam: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ksam: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
