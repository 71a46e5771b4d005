"""Methods x seeds on one task, and a report a person can read: table, CSV, JSON, plot."""

from __future__ import annotations

import csv
import inspect
import io
import json
import math
import platform
import statistics
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from .methods import METHODS
from .train import TrainConfig, atomic_write_bytes, atomic_write_text, train

ENGINE_OPTIONS = {"grad_scaler", "autocast_dtype", "fast_path", "seed", "sync_perturbation",
                  "compile"}
#: Options of the run rather than the method, allowed in every spec ("sgd:lr=0.2"): each
#: method can be compared at its own learning rate (docs/collapse.md section 5: at one shared
#: lr a method that enlarges its effective step can look better than it is).
RUN_OPTIONS = {"lr"}
COLLAPSE_MARGIN = 10.0  # points of test accuracy below SGD's mean that count as a collapse


def method_options(name: str) -> set[str]:
    """The options a method takes (besides model, optimizer and the engine's)."""
    factory = METHODS[name]
    target = factory.__init__ if inspect.isclass(factory) else factory
    params = inspect.signature(target).parameters
    options = {p for p, v in params.items()
               if v.kind == v.KEYWORD_ONLY and p not in ENGINE_OPTIONS}
    if "start_step" in options:  # the CLI also says it as a fraction of the run (start=0.8)
        options.add("start")
    return options


def _parse_value(text: str) -> Any:
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_method_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"ksam:k=16,rho=0.1"`` -> ``("ksam", {"k": 16, "rho": 0.1})``."""
    name, _, rest = spec.partition(":")
    name = name.strip().lower()
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of: {', '.join(METHODS)}")
    options: dict[str, Any] = {}
    allowed = method_options(name) | RUN_OPTIONS
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not eq:
            raise ValueError(f"method option {item!r} in {spec!r} is not of the form key=value")
        if key not in allowed:
            raise ValueError(f"method {name!r} takes no option {key!r} "
                             f"(it takes: {', '.join(sorted(allowed)) or 'none'})")
        options[key] = _parse_value(value.strip())
    return name, options


def method_config(spec: str, shared: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """Method name and options: the spec's own, then the shared ones (--k, --rho) that the
    method takes."""
    name, options = parse_method_spec(spec)
    allowed = method_options(name)
    for key, value in shared.items():
        if value is not None and key in allowed and key not in options:
            options[key] = value
    return name, options


def split_run_options(options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the method's options, the run's: :data:`RUN_OPTIONS` given in the spec)."""
    method = {k: v for k, v in options.items() if k not in RUN_OPTIONS}
    run = {k: v for k, v in options.items() if k in RUN_OPTIONS}
    return method, run


def _mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(runs: list[dict[str, Any]], reference: str) -> list[dict[str, Any]]:
    """One row per method label: accuracy over seeds, time, time relative to the reference,
    steps/s and the collapse count (final accuracy > 10 points below the reference's mean)."""
    labels = list(dict.fromkeys(r["label"] for r in runs))
    by_label = {lab: [r for r in runs if r["label"] == lab] for lab in labels}
    ref_runs = by_label.get(reference, [])
    ref_time = statistics.fmean(r["final"]["train_time"] for r in ref_runs) if ref_runs \
        else math.nan
    ref_acc = statistics.fmean(r["final"]["test_acc"] for r in ref_runs) if ref_runs \
        else math.nan
    rows = []
    for lab in labels:
        finals = [r["final"] for r in by_label[lab]]
        accs = [f["test_acc"] for f in finals]
        times = [f["train_time"] for f in finals]
        mean, std = _mean_std(accs)
        t = statistics.fmean(times)
        rows.append({
            "method": lab,
            "seeds": len(finals),
            "test_acc_mean": mean,
            "test_acc_std": std,
            "test_acc_min": min(accs),
            "test_acc_all": accs,
            "collapsed": sum(a < ref_acc - COLLAPSE_MARGIN for a in accs)
            if not math.isnan(ref_acc) else None,
            "train_time_s": t,
            "time_vs_ref": t / ref_time if ref_time and not math.isnan(ref_time) else math.nan,
            "steps_per_s": statistics.fmean(f["steps"] / f["train_time"] for f in finals),
            "step_ms_median": 1000 * statistics.fmean(f["step_time_median"] for f in finals),
            "skipped_steps": sum(f["skipped_steps"] for f in finals),
        })
    return rows


def markdown_table(rows: list[dict[str, Any]], reference: str) -> str:
    lines = [
        f"| method | test acc % (mean ± std) | min | collapsed | train time s "
        f"| time / {reference} | steps/s | step ms (median) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        collapsed = "-" if r["collapsed"] is None else f"{r['collapsed']}/{r['seeds']}"
        lines.append(
            f"| {r['method']} | {r['test_acc_mean']:.2f} ± {r['test_acc_std']:.2f} "
            f"| {r['test_acc_min']:.2f} | {collapsed} | {r['train_time_s']:.1f} "
            f"| {r['time_vs_ref']:.2f}x | {r['steps_per_s']:.1f} | {r['step_ms_median']:.2f} |"
        )
    return "\n".join(lines)


def plot_accuracy_vs_time(runs: list[dict[str, Any]], path: Path, title: str) -> bool:
    """Test accuracy against training wall-clock: per method the mean over seeds and the
    min-max band.
    Returns False (and writes nothing) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    labels = list(dict.fromkeys(r["label"] for r in runs))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, lab in enumerate(labels):
        # Mean over seeds per epoch (x: mean wall-clock at that epoch), min-max band.
        group = [r["epochs"] for r in runs if r["label"] == lab]
        n = min(len(g) for g in group)
        ts = [statistics.fmean(g[e]["train_time"] for g in group) for e in range(n)]
        accs = [[g[e]["test_acc"] for g in group] for e in range(n)]
        colour = colours[i % len(colours)]
        ax.plot(ts, [statistics.fmean(a) for a in accs], color=colour, lw=1.5,
                label=f"{lab} ({len(group)} seeds)")
        if len(group) > 1:
            ax.fill_between(ts, [min(a) for a in accs], [max(a) for a in accs],
                            color=colour, alpha=0.15, lw=0)
    ax.set_xlabel("training wall-clock (s, evaluation excluded)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    finals = [e["test_acc"] for r in runs for e in r["epochs"][-1:]]
    if finals:
        ax.set_ylim(max(0.0, min(finals) - 10), min(100.0, max(finals) + 2))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
    return True


def environment() -> dict[str, Any]:
    info = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": f"{platform.machine()} / {torch.get_num_threads()} threads",
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def compare(base: TrainConfig, specs: list[str], seeds: list[int], out_dir: Path | None, *,
            shared: dict[str, Any] | None = None, task: Any = None,
            progress: Callable[[str, dict[str, Any]], None] | None = None,
            is_main: bool = True, dist_info: Any = None,
            resume: bool = False) -> dict[str, Any]:
    """Train every method spec with every seed; write the report to ``out_dir``.

    Runs are interleaved (seed by seed, all methods) so machine noise hits all methods alike.
    Everything is validated before the first file is written. ``resume``: a run whose
    checkpoint is in ``out_dir`` continues from it (a finished one is only re-read), after
    the checkpoint's configuration is checked against this one.
    """
    from .tasks import get_task
    from .train import resolve_device

    base.validate()
    configs = [(spec, *method_config(spec, shared or {})) for spec in specs]
    if len({spec for spec, _, _ in configs}) != len(configs):
        raise ValueError("the same method spec is given twice")
    if not seeds:
        raise ValueError("give at least one seed")
    if task is None:
        task = get_task(base.task, device=resolve_device(base.device), seed=seeds[0],
                        **base.task_options)
    resolved = base.resolved(task.defaults)
    _dry_run(resolved, configs, task)
    if resume:  # every checkpoint is checked before any run continues
        _check_checkpoints(resolved, configs, seeds, out_dir)

    if out_dir is not None and is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out_dir / "config.json", json.dumps({
            "base": resolved.to_dict(), "methods": specs, "seeds": seeds,
            "environment": environment(), "task": task.description}, indent=2))

    runs = []
    for seed in seeds:
        for spec, name, options in configs:
            cfg = _run_config(base, name, options, seed)
            run_dir = out_dir / "runs" / f"{_slug(spec)}-seed{seed}" if out_dir else None
            again = resume and run_dir is not None and (run_dir / "checkpoint.pt").exists()
            result = train(cfg, out_dir=run_dir, task=task, dist_info=dist_info, resume=again,
                           on_epoch=(lambda row, s=spec: progress(s, row)) if progress else None)
            result.pop("model")
            result["label"] = spec
            result["seed"] = seed
            runs.append(result)

    reference = "sgd" if "sgd" in specs else specs[0]
    rows = summarize(runs, reference)
    table = markdown_table(rows, reference)
    report = {"rows": rows, "table": table, "reference": reference, "runs": runs,
              "task_name": task.name,
              "split": "validation" if base.task_options.get("validation_split") else "test",
              "config": resolved.to_dict(), "environment": environment()}
    if out_dir is not None and is_main:
        _write_report(out_dir, report, task.description, seeds)
    return report


def _dry_run(cfg: TrainConfig, configs: list[tuple[str, str, dict[str, Any]]], task: Any) -> None:
    """Build every method once on a throw-away model so bad options fail before any run."""
    from .train import build_engine

    for spec, name, options in configs:
        model = task.make_model()
        method_options, run_options = split_run_options(options)
        try:
            run_cfg = replace(cfg, method_options=method_options, fast=False, device="cpu",
                              **run_options)
            run_cfg.validate()
            engine, _ = build_engine(name, model, run_cfg, 1)
            engine.check_batch(cfg.batch_size)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"method {spec!r}: {exc}") from None


def _run_config(cfg: TrainConfig, name: str, options: dict[str, Any], seed: int) -> TrainConfig:
    method_options, run_options = split_run_options(options)
    return replace(cfg, method=name, method_options=method_options, seed=seed, **run_options)


def _check_checkpoints(cfg: TrainConfig, configs: list[tuple[str, str, dict[str, Any]]],
                       seeds: list[int], out_dir: Path | None) -> None:
    from .train import check_resumable

    if out_dir is None or not out_dir.is_dir():
        raise ValueError(f"resume: no earlier comparison in {out_dir}")
    for seed in seeds:
        for spec, name, options in configs:
            path = out_dir / "runs" / f"{_slug(spec)}-seed{seed}" / "checkpoint.pt"
            if path.exists():
                saved = torch.load(path, map_location="cpu", weights_only=False)["config"]
                check_resumable(_run_config(cfg, name, options, seed), saved, path)


def _slug(spec: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in spec)


def _write_report(out_dir: Path, report: dict[str, Any], description: str,
                  seeds: list[int]) -> None:
    env = report["environment"]
    cfg = report["config"]
    own_lr = any("lr" in split_run_options(parse_method_spec(r["method"])[1])[1]
                 for r in report["rows"])
    header = (
        f"# ksam compare: {report['task_name']}\n\n{description}\n\n"
        f"{len(seeds)} seeds ({', '.join(map(str, seeds))}); {cfg['epochs']} epochs, "
        f"batch {cfg['batch_size']}, lr {cfg['lr']}"
        f"{' (where a method sets no lr of its own)' if own_lr else ''} ({cfg['schedule']}), "
        f"momentum "
        f"{cfg['momentum']}, weight decay {cfg['weight_decay']}, {cfg['precision']}, "
        f"device {cfg['device']}{' (fast path)' if cfg['fast'] else ''}"
        f"{' (torch.compile: ' + cfg['compile'] + ')' if cfg.get('compile') else ''}.\n"
        f"torch {env['torch']}, {env.get('gpu', env['machine'])}, {env['date']}.\n\n"
        f"{report['split'].capitalize()} accuracy at the end of training (the 'test acc' "
        f"column); train time is the wall-clock of the training "
        f"steps only (evaluation excluded), mean over seeds; 'collapsed' counts runs ending "
        f"more than {COLLAPSE_MARGIN:.0f} points below {report['reference']}'s mean.\n\n"
    )
    atomic_write_text(out_dir / "summary.md", header + report["table"] + "\n")
    slim = {k: v for k, v in report.items() if k != "runs"}
    slim["runs"] = [{k: r[k] for k in ("label", "seed", "final")} for r in report["runs"]]
    atomic_write_text(out_dir / "summary.json", json.dumps(slim, indent=2, default=str))
    buffer = io.StringIO()
    fields = ["method", "seed", "epoch", "train_loss", "test_loss", "test_acc", "epoch_time",
              "train_time", "step_time_median", "steps", "skipped_steps", "lr"]
    writer = csv.DictWriter(buffer, fieldnames=fields)
    writer.writeheader()
    for r in report["runs"]:
        for e in r["epochs"]:
            writer.writerow({"method": r["label"], "seed": r["seed"],
                             **{k: e[k] for k in fields[2:]}})
    atomic_write_text(out_dir / "metrics.csv", buffer.getvalue())
    plot_accuracy_vs_time(report["runs"], out_dir / "accuracy_vs_time.png",
                          f"{cfg['task']}: test accuracy vs training time")


def with_lr(spec: str, lr: float) -> str:
    """``spec`` with ``lr=`` appended: ``ksam:k=32`` -> ``ksam:k=32,lr=0.2``."""
    name, sep, rest = spec.partition(":")
    return f"{name}:{rest},lr={lr:g}" if rest.strip() else f"{name}:lr={lr:g}"


def sweep_lr(base: TrainConfig, specs: list[str], seeds: list[int], lrs: list[float],
             out_dir: Path | None, *, validation_split: float = 0.2,
             shared: dict[str, Any] | None = None,
             progress: Callable[[str, dict[str, Any]], None] | None = None,
             is_main: bool = True, dist_info: Any = None,
             resume: bool = False) -> dict[str, Any]:
    """Each method's learning rate, chosen on a held-out split of the training set.

    For every lr in ``lrs``: :func:`compare` of all ``specs`` with ``validation_split`` of
    the training set held out as the evaluation set (the test set is not touched); a
    method's lr is the one with the best mean final validation accuracy (the first one on a
    tie). Returns ``{"chosen": {spec: lr}, "specs": [spec with lr=...], "table": markdown,
    "validation": {spec: {lr: mean acc}}}`` and writes each sweep run under
    ``out_dir/lr-sweep/`` and the table to ``out_dir/lr_sweep.md``.
    """
    if not lrs:
        raise ValueError("give at least one learning rate to sweep")
    for lr in lrs:
        replace(base, lr=lr).validate()
    for spec in specs:
        _, options = parse_method_spec(spec)
        if "lr" in options:
            raise ValueError(f"method {spec!r} sets its own lr; the lr sweep chooses it")
    if len(set(lrs)) != len(lrs):
        raise ValueError("the same learning rate is given twice")
    held_out = replace(base, task_options={**base.task_options,
                                           "validation_split": validation_split})
    held_out.validate()
    scores: dict[str, dict[float, float]] = {spec: {} for spec in specs}
    collapsed: dict[str, dict[float, int]] = {spec: {} for spec in specs}
    for lr in lrs:
        sub = out_dir / "lr-sweep" / f"lr-{lr:g}" if out_dir is not None else None
        report = compare(replace(held_out, lr=lr), specs, seeds, sub, shared=shared,
                         progress=progress, is_main=is_main, dist_info=dist_info,
                         resume=resume and sub is not None and sub.is_dir())
        for row in report["rows"]:
            scores[row["method"]][lr] = row["test_acc_mean"]
            collapsed[row["method"]][lr] = row["collapsed"] or 0
    chosen = {spec: max(lrs, key=lambda lr, s=spec: (scores[s][lr], -lrs.index(lr)))
              for spec in specs}
    header = "| method | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " | chosen |"
    lines = [header, "|---|" + "---|" * (len(lrs) + 1)]
    for spec in specs:
        cells = []
        for lr in lrs:
            cell = f"{scores[spec][lr]:.2f}"
            if collapsed[spec][lr]:
                cell += f" ({collapsed[spec][lr]}/{len(seeds)} collapsed)"
            cells.append(f"**{cell}**" if lr == chosen[spec] else cell)
        lines.append(f"| {spec} | " + " | ".join(cells) + f" | {chosen[spec]:g} |")
    table = "\n".join(lines)
    result = {"chosen": chosen, "specs": [with_lr(s, chosen[s]) for s in specs],
              "table": table, "validation": scores, "validation_split": validation_split}
    if out_dir is not None and is_main:
        text = (f"# Learning rate per method, chosen on a held-out split\n\n"
                f"Final validation accuracy % (mean over {len(seeds)} seeds) with "
                f"{validation_split:g} of the training set held out; the test set is not "
                f"used. Each method then runs on the test set at its chosen lr.\n\n"
                f"{table}\n")
        atomic_write_text(out_dir / "lr_sweep.md", text)
        atomic_write_text(out_dir / "lr_sweep.json", json.dumps(result, indent=2))
    return result
