"""Methods x seeds on one task, and a report a person can read: table, CSV, JSON, plot.

The command's run (:func:`run_comparison`: the lr sweep, the equal-epochs grid, the
equal-budget grid) is here too, and :func:`compare_task`, the command from Python, which
``import ksam`` gives as ``ksam.compare`` (imported on first use).
"""

from __future__ import annotations

import contextlib
import csv
import importlib.util
import io
import json
import math
import os
import platform
import statistics
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from ..methods import DEFAULT_SELECT
from .config import DEFAULT_SWEEP_SPLIT, CliConfig, MethodSpec
from .outputs import atomic_write_bytes
from .runs import GridRun, is_resumable, run_one, run_place, run_slug, task_for_run
from .train import TrainConfig

__all__ = ["GridRun", "SerialRunner", "compare", "compare_task", "is_resumable", "run_one",
           "run_place", "run_slug", "run_comparison", "sweep_lr", "summarize", "task_for_run"]

COLLAPSE_MARGIN = 10.0  # points of test accuracy below SGD's mean that count as a collapse
#: The caption of accuracy_vs_cost.png.
FRONTIER_CAPTION = ("filled, '(frontier)': no other method is both faster and more accurate; "
                    "error bars: std over seeds")


def parse_method_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"ksam:k=16,rho=0.1"`` -> ``("ksam", {"k": 16, "rho": 0.1})`` (``lr`` included when
    the spec sets it)."""
    parsed = MethodSpec.parse(spec)
    return parsed.name, ({**parsed.options, "lr": parsed.lr} if parsed.lr is not None
                         else dict(parsed.options))


def _mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(runs: list[dict[str, Any]], reference: str) -> list[dict[str, Any]]:
    """One row per method label: accuracy over seeds, its lr, time, time relative to the
    reference, steps/s, the collapse count (final accuracy > 10 points below the
    reference's mean), the kinds of device its runs ran on (``devices``) and whether its
    time / reference compares runs on different kinds of device (``mixed_devices``)."""
    labels = list(dict.fromkeys(r["label"] for r in runs))
    by_label = {lab: [r for r in runs if r["label"] == lab] for lab in labels}
    ref_runs = by_label.get(reference, [])
    ref_time = statistics.fmean(r["final"]["train_time"] for r in ref_runs) if ref_runs \
        else math.nan
    ref_acc = statistics.fmean(r["final"]["test_acc"] for r in ref_runs) if ref_runs \
        else math.nan
    ref_devices = _devices(ref_runs)
    rows = []
    for lab in labels:
        finals = [r["final"] for r in by_label[lab]]
        devices = _devices(by_label[lab])
        accs = [f["test_acc"] for f in finals]
        times = [f["train_time"] for f in finals]
        mean, std = _mean_std(accs)
        t = statistics.fmean(times)
        rows.append({
            "method": lab,
            "lr": by_label[lab][0]["config"]["lr"] if "config" in by_label[lab][0] else None,
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
            "devices": devices,
            "mixed_devices": len(set(devices) | set(ref_devices)) > 1,
        })
    return rows


def _devices(runs: list[dict[str, Any]]) -> list[str]:
    """The kinds of device ``runs`` ran on, in order of first appearance."""
    return list(dict.fromkeys(r["device_name"] for r in runs if r.get("device_name")))


def places(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Where ``runs`` ran: one entry per host and device, with its number of runs."""
    counts: dict[tuple[str, str], int] = {}
    for r in runs:
        key = (r.get("host") or "?", r.get("device_name") or "?")
        counts[key] = counts.get(key, 0) + 1
    return [{"host": h, "device_name": d, "runs": n} for (h, d), n in counts.items()]


def markdown_table(rows: list[dict[str, Any]], reference: str, split: str = "test") -> str:
    """The comparison's table; ``split`` names the accuracy's data ("validation" for a
    held-out part of the training set)."""
    lines = [
        f"| method | lr | {split} acc % (mean ± std) | min | collapsed | train time s "
        f"| time / {reference} | steps/s | step ms (median) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        collapsed = "-" if r["collapsed"] is None else f"{r['collapsed']}/{r['seeds']}"
        lr = "-" if r.get("lr") is None else f"{r['lr']:g}"
        mark = "*" if r.get("mixed_devices") else ""
        lines.append(
            f"| {r['method']} | {lr} | {r['test_acc_mean']:.2f} ± {r['test_acc_std']:.2f} "
            f"| {r['test_acc_min']:.2f} | {collapsed} | {r['train_time_s']:.1f} "
            f"| {r['time_vs_ref']:.2f}x{mark} | {r['steps_per_s']:.1f} "
            f"| {r['step_ms_median']:.2f} |"
        )
    return "\n".join(lines)


def accuracy_vs_cost(runs: list[dict[str, Any]], reference: str) -> list[dict[str, Any]]:
    """One point per method: training time relative to the reference method's mean time
    (mean and sample std over seeds of each seed's time / that mean) and final test accuracy
    (mean and sample std over seeds); ``frontier`` marks the methods no other method beats
    on both axes (at most the time and at least the accuracy, one of them strictly)."""
    labels = list(dict.fromkeys(r["label"] for r in runs))
    ref_times = [r["final"]["train_time"] for r in runs if r["label"] == reference]
    ref_time = statistics.fmean(ref_times) if ref_times else math.nan
    points = []
    for lab in labels:
        finals = [r["final"] for r in runs if r["label"] == lab]
        cost_mean, cost_std = _mean_std([f["train_time"] / ref_time for f in finals])
        acc_mean, acc_std = _mean_std([f["test_acc"] for f in finals])
        points.append({"method": lab, "seeds": len(finals), "cost_mean": cost_mean,
                       "cost_std": cost_std, "acc_mean": acc_mean, "acc_std": acc_std})
    for p in points:
        p["frontier"] = not any(
            q is not p and q["cost_mean"] <= p["cost_mean"] and q["acc_mean"] >= p["acc_mean"]
            and (q["cost_mean"] < p["cost_mean"] or q["acc_mean"] > p["acc_mean"])
            for q in points)
    return points


def _pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend, or None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _save_png(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


#: Sixteen colours: matplotlib's ten, then six darker or stronger ones. No two of up to
#: 16 methods share a colour, nor two of up to 15 a marker (matplotlib's 15 that can be
#: drawn hollow).
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
           "#7f7f7f", "#bcbd22", "#17becf", "#000000", "#08306b", "#a50f15", "#ff00ff",
           "#00a087", "#8c6d31")
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "p", "h", "d", "8", "H")
_LINESTYLES = ("-", "--", ":", "-.")


def method_styles(count: int, colours: list[str] | tuple[str, ...] = PALETTE,
                  ) -> list[tuple[str, str, str]]:
    """(colour, marker, line style) for each of ``count`` methods. The first
    ``len(colours)`` methods get a colour each, the first 15 a marker each; past that the
    colours repeat, each time with the next marker and line style, so that the (colour,
    marker) pairs of the cost chart stay distinct while ``count <= len(colours) * 15`` and
    the (colour, line style) pairs of the time chart while ``count <= len(colours) * 4``."""
    styles = []
    for i in range(count):
        colour, rnd = i % len(colours), i // len(colours)
        styles.append((colours[colour], _MARKERS[(colour + rnd) % len(_MARKERS)],
                       _LINESTYLES[rnd % len(_LINESTYLES)]))
    return styles


#: The names charts give the methods (the CLI's names, as papers spell them).
METHOD_NAMES = {"sgd": "SGD", "sam": "SAM", "asam": "ASAM", "ksam": "K-SAM",
                "ksam-plain": "plain K-SAM", "random-sam": "RandomSubsetSAM", "esam": "ESAM",
                "osgd": "Ordered SGD", "msam": "MSAM", "looksam": "LookSAM",
                "sam-late": "late-phase SAM", "rst": "RST", "saf": "SAF", "mesa": "MESA"}
#: How a chart writes a method's option; those not here are written ``key=value``.
_OPTION_NAMES = {"k": "K", "k_ascent": "ascent K", "k_descent": "descent K", "rho": "ρ",
                 "lam": "λ"}
#: Options a chart leaves out of a method's name unless two methods differ only by them:
#: the lr is in the table, the others are details of a rule.
_DETAIL_OPTIONS = ("estimate", "k_warmup", "lr")


def _rule(spec: MethodSpec) -> str:
    """The selection rule K-SAM or Ordered SGD runs with: the spec's, else the default."""
    if "select" in spec.options:
        return str(spec.options["select"])
    if spec.name == "ksam" and spec.options.get("scores", "forward") == "forward" \
            and spec.options.get("loss_kind", "ce") == "ce":
        return DEFAULT_SELECT
    return "top"


def short_label(spec_label: str, details: tuple[str, ...] = ()) -> str:
    """A method's name on a chart, from its spec: ``ksam:k=32,select=auto,estimate=0.1,
    rho=0.1,lr=0.025`` -> ``K-SAM auto (K=32, ρ=0.1)``, ``sam:rho=0.2,lr=0.05`` -> ``SAM
    (ρ=0.2)``, ``sgd:lr=0.1`` -> ``SGD``. K-SAM and Ordered SGD name their selection rule
    (the default one where the spec sets none) and say ``from memory`` with
    ``scores=memory``; the lr, ``estimate`` and ``k_warmup`` are left out unless named in
    ``details``. A label that is not a method spec is returned as it is."""
    try:
        spec = MethodSpec.parse(spec_label)
    except ValueError:
        return spec_label
    name = METHOD_NAMES.get(spec.name, spec.name)
    if spec.name in ("ksam", "osgd"):
        name += f" {_rule(spec)}"
        if spec.options.get("scores") == "memory":
            name += " from memory"
    shown = [f"{_OPTION_NAMES.get(key, key)}={text}" for key, text in _spec_texts(spec).items()
             if key not in ("select", "scores")
             and (key not in _DETAIL_OPTIONS or key in details)]
    return f"{name} ({', '.join(shown)})" if shown else name


def short_labels(spec_labels: list[str]) -> list[str]:
    """:func:`short_label` of each spec, with the details (``estimate``, ``k_warmup``, the
    lr) added where two specs would otherwise get the same name, and the whole spec where
    even that does not tell them apart."""
    details: dict[str, tuple[str, ...]] = {s: () for s in spec_labels}
    names = [short_label(s) for s in spec_labels]
    for name in set(names):
        group = [s for s, n in zip(spec_labels, names) if n == name]
        if len(group) < 2:
            continue
        options = [_spec_texts(s) for s in group]
        differ = tuple(k for k in _DETAIL_OPTIONS
                       if len({o.get(k) for o in options}) > 1)
        for s in group:
            details[s] = differ
    out = [short_label(s, details[s]) for s in spec_labels]
    return [s if out.count(n) > 1 else n for s, n in zip(spec_labels, out)]


def _spec_texts(spec: str | MethodSpec) -> dict[str, str]:
    """A spec's options as written (the lr as ``%g``); none for a label that is not a
    method spec."""
    try:
        spec = MethodSpec.parse(spec)
    except ValueError:
        return {}
    texts = dict(spec.items)
    if spec.lr is not None:
        texts["lr"] = f"{spec.lr:g}"
    return texts


#: How a chart's title names a task, its models and one of its training examples.
_TASK_NAMES = {"mnist1d": "MNIST-1D", "fashion-mnist": "Fashion-MNIST",
               "cifar10": "CIFAR-10", "cifar100": "CIFAR-100"}
_MODEL_NAMES = {"mnist1d": {"cnn": "1-D CNN", "mlp": "MLP"},
                "fashion-mnist": {"cnn": "small CNN", "resnet": "small ResNet"},
                "cifar10": {"resnet18": "ResNet-18", "wrn16-8": "WRN-16-8",
                            "wrn28-10": "WRN-28-10"}}
_MODEL_NAMES["cifar100"] = _MODEL_NAMES["cifar10"]
_EXAMPLES = {"fashion-mnist": "image", "cifar10": "image", "cifar100": "image"}


def task_text(config: Mapping[str, Any]) -> str:
    """The data a comparison trained on, from its config: ``Fashion-MNIST (5000-image
    subset), small CNN, 40 % symmetric label noise``; the model where the task has one
    (its default where the run set none), ``clean labels`` without label noise."""
    task = str(config.get("task", ""))
    options = dict(config.get("task_options") or {})
    parts = [_TASK_NAMES.get(task, task)]
    if options.get("train_subset"):
        parts[0] += f" ({options['train_subset']}-{_EXAMPLES.get(task, 'example')} subset)"
    model = options.get("model")
    if model is None:
        from .tasks import TASKS

        model = TASKS[task].options.get("model") if task in TASKS else None
    if model is not None:
        parts.append(_MODEL_NAMES.get(task, {}).get(str(model), str(model)))
    noise = float(options.get("label_noise") or 0.0)
    if noise > 0:
        kind = options.get("label_noise_type", "symmetric")
        parts.append(f"{100 * noise:g} % {kind} label noise")
    else:
        parts.append("clean labels")
    return ", ".join(parts)


def _seeds_text(count: int) -> str:
    return f"{count} seed{'s' if count != 1 else ''}"


def chart_title(config: Mapping[str, Any], what: str, *, seeds: int | None = None,
                lrs: list[float | None] | None = None) -> str:
    """A chart's title: the data (:func:`task_text`) on the first line, then ``what`` with
    the seeds, the epochs and the lr (one shared lr, or each method's own)."""
    setup = []
    if seeds:
        setup.append(_seeds_text(seeds))
    if config.get("epochs"):
        setup.append(f"{config['epochs']} epochs")
    known = {lr for lr in (lrs or []) if lr is not None}
    if len(known) > 1:
        setup.append("each method at its own lr")
    elif known:
        setup.append(f"lr {known.pop():g}")
    return f"{task_text(config)}\n{what}" + (f": {', '.join(setup)}" if setup else "")


def _legend_outside(ax: Any, fig: Any = None, *, width: float = 6.5, **kwargs: Any) -> Any:
    """The legend beside the axes, not over them (a legend inside can hide a method's
    point), in a readable font; with ``fig``, the figure widens by the legend's width so
    that the axes keep ``width`` inches."""
    legend = ax.legend(fontsize=9, loc="upper left", bbox_to_anchor=(1.02, 1.0),
                       borderaxespad=0.0, **kwargs)
    if fig is not None:
        fig.canvas.draw()
        extra = legend.get_window_extent().width / fig.dpi
        fig.set_size_inches(width + 1.2 + extra, fig.get_size_inches()[1])
    return legend


def accuracy_axis(runs: list[dict[str, Any]]) -> tuple[float | None, float | None, str]:
    """The accuracy-vs-time plot's y range (from 10 points below the lowest final accuracy,
    so that the final accuracies are told apart, to above the highest accuracy of any
    epoch) and its label, which says where the axis starts when that cuts off lower
    (early) accuracies."""
    finals = [e["test_acc"] for r in runs for e in r["epochs"][-1:] if e["test_acc"] is not None]
    if not finals:
        return None, None, "test accuracy (%)"
    every = [e["test_acc"] for r in runs for e in r["epochs"] if e["test_acc"] is not None]
    low, high = max(0.0, min(finals) - 10), min(100.0, max(every) + 2)
    if min(every) >= low:
        return low, high, "test accuracy (%)"
    # Two lines: on one line the label is taller than the axes and the figure cuts it off.
    return low, high, f"test accuracy (%)\nthe axis starts at {low:.0f} %, lower points cut off"


def plot_accuracy_vs_time(runs: list[dict[str, Any]], path: Path, title: str) -> bool:
    """Test accuracy against training wall-clock: per method the mean over seeds and the
    min-max band; each method by its :func:`short_label` (with its number of seeds where
    the methods' numbers differ), a colour and line style of its own (:func:`method_styles`)
    and, every few epochs, its marker. The legend's title says what the line and the band
    are; the y axis is :func:`accuracy_axis`'.
    Returns False (and writes nothing) when matplotlib is missing."""
    plt = _pyplot()
    if plt is None:
        return False
    labels = list(dict.fromkeys(r["label"] for r in runs))
    names = short_labels(labels)
    counts = [sum(r["label"] == lab for r in runs) for lab in labels]
    fig, ax = plt.subplots(figsize=(10, 4.8), dpi=120)
    for lab, name, count, (colour, marker, linestyle) in zip(
            labels, names, counts, method_styles(len(labels))):
        # Mean over seeds per epoch (x: mean wall-clock at that epoch), min-max band.
        # Evaluated epochs only (--eval-every leaves the others without an accuracy).
        group = [[e for e in r["epochs"] if e["test_acc"] is not None]
                 for r in runs if r["label"] == lab]
        n = min(len(g) for g in group)
        ts = [statistics.fmean(g[e]["train_time"] for g in group) for e in range(n)]
        accs = [[g[e]["test_acc"] for g in group] for e in range(n)]
        ax.plot(ts, [statistics.fmean(a) for a in accs], color=colour, ls=linestyle, lw=1.5,
                marker=marker, ms=4, markevery=max(1, n // 6),
                label=name if len(set(counts)) == 1 else f"{name} ({_seeds_text(count)})")
        if len(group) > 1:
            ax.fill_between(ts, [min(a) for a in accs], [max(a) for a in accs],
                            color=colour, alpha=0.12, lw=0)
    ax.set_xlabel("training wall-clock (s, evaluation excluded)")
    low, high, label = accuracy_axis(runs)
    ax.set_ylabel(label)
    ax.set_title(title, fontsize=10)
    if low is not None:
        ax.set_ylim(low, high)
    ax.grid(alpha=0.3)
    several = max(counts, default=0) > 1
    _legend_outside(ax, fig, title="line: mean over seeds\nband: min-max" if several else None,
                    title_fontsize=8)
    fig.tight_layout()
    _save_png(fig, path)
    return True


#: The least gap (points of accuracy) that :func:`accuracy_ranges` breaks the axis at.
BREAK_GAP = 5.0


def accuracy_ranges(points: list[dict[str, Any]]) -> list[tuple[float, float]]:
    """The y range(s) of the cost chart, top first: one range over every point's mean ±
    std, or two when one gap splits them into a high cluster narrower than a third of the
    whole and the rest, the gap wider than a sixth of the whole and than
    :data:`BREAK_GAP` (a broken axis: one collapsed method would otherwise squeeze the
    close ones into a line). Padded, within 0-100 where the data is."""
    spans = sorted((p["acc_mean"] - (p["acc_std"] or 0), p["acc_mean"] + (p["acc_std"] or 0))
                   for p in points if not math.isnan(p["acc_mean"]))
    if not spans:
        return [(0.0, 100.0)]
    clusters: list[list[float]] = []
    for lo, hi in spans:
        if clusters and lo <= clusters[-1][1]:
            clusters[-1][1] = max(clusters[-1][1], hi)
        else:
            clusters.append([lo, hi])
    whole = max(hi for _, hi in spans) - spans[0][0]
    ranges = [(spans[0][0], max(hi for _, hi in spans))]
    if len(clusters) > 1 and whole > 0:
        i = max(range(1, len(clusters)), key=lambda j: clusters[j][0] - clusters[j - 1][1])
        top = (clusters[i][0], max(c[1] for c in clusters[i:]))
        gap = clusters[i][0] - clusters[i - 1][1]
        if top[1] - top[0] < whole / 3 and gap > max(whole / 6, BREAK_GAP):
            ranges = [top, (spans[0][0], clusters[i - 1][1])]

    def padded(lo: float, hi: float) -> tuple[float, float]:
        pad = max(0.4, 0.08 * (hi - lo))
        return (min(lo, max(0.0, lo - pad)), max(hi, min(100.0, hi + pad)))

    return [padded(lo, hi) for lo, hi in ranges]


def plot_accuracy_vs_cost(points: list[dict[str, Any]], reference: str, path: Path,
                          title: str, *, marks: Mapping[str, str] | None = None,
                          caption: str = "") -> bool:
    """The :func:`accuracy_vs_cost` points with their std over seeds as error bars; the
    frontier's points filled, the others hollow; each method by its :func:`short_label`
    and a colour and marker of its own (:func:`method_styles`). The y axis spans the data
    (:func:`accuracy_ranges`: broken in two where a gap leaves the close methods
    squeezed). ``marks``: text after a method's name (a footnote sign), ``caption``: a
    line under the chart's own (what the sign says). False (nothing written) without
    matplotlib."""
    plt = _pyplot()
    if plt is None:
        return False
    ranges = accuracy_ranges(points)
    if len(ranges) == 1:
        fig, ax = plt.subplots(figsize=(10, 4.8), dpi=120)
        axes = [ax]
    else:
        fig, axes = plt.subplots(2, 1, sharex=True, figsize=(10, 5.4), dpi=120,
                                 gridspec_kw={"height_ratios": (3, 1.4)})
    names = short_labels([p["method"] for p in points])
    by_method = dict(zip((p["method"] for p in points), names))
    counts = {p["seeds"] for p in points}
    for p, name, (colour, marker, _) in zip(points, names, method_styles(len(points))):
        seeds = "" if len(counts) == 1 else f" ({_seeds_text(p['seeds'])})"
        label = f"{name}{(marks or {}).get(p['method'], '')}{seeds}" \
                f"{' (frontier)' if p['frontier'] else ''}"
        for i, a in enumerate(axes):
            a.errorbar(p["cost_mean"], p["acc_mean"], xerr=p["cost_std"], yerr=p["acc_std"],
                       fmt=marker, color=colour, capsize=3, ms=8 if marker == "*" else 7,
                       mfc=colour if p["frontier"] else "white", mew=1.3, elinewidth=1.1,
                       label=label if i == 0 else None)
    reference_name = by_method.get(reference, short_label(reference))
    axes[-1].set_xlabel(f"training time / {reference_name}'s (evaluation excluded)")
    for a, (lo, hi) in zip(axes, ranges):
        a.set_ylim(lo, hi)
        a.grid(alpha=0.3)
    label = "final test accuracy (%)\nmean ± std over seeds"
    if len(axes) == 1:
        start = ranges[0][0]
        # Where the axis is cut well above 0, the points' heights do not compare to 0.
        axes[0].set_ylabel(f"{label}; axis from {start:.0f} %" if start >= 10 else label)
    else:
        _break_marks(axes)
        axes[0].set_ylabel(label)
        axes[1].set_ylabel(f"axis broken:\n{ranges[1][1]:.0f}-{ranges[0][0]:.0f} % left out",
                           fontsize=8)
    axes[0].set_title(title, fontsize=10)
    _legend_outside(axes[0], fig)
    text = FRONTIER_CAPTION if not caption else f"{FRONTIER_CAPTION}\n{caption}"
    fig.text(0.01, 0.01, text, fontsize=8, ha="left", va="bottom")
    lines = text.count("\n") + 1
    # h_pad: the broken axis' two panels close together (tight_layout sets their spacing).
    fig.tight_layout(rect=(0, 0.025 + 0.03 * lines, 1, 1), h_pad=0.6)
    _save_png(fig, path)
    return True


def collapse_marks(rows: list[dict[str, Any]], reference: str) -> tuple[dict[str, str], str]:
    """The cost chart's ``marks`` and ``caption`` for :func:`summarize`'s ``rows``: after
    each method with collapsed runs ``, 3/5 collapsed``, and a caption that says what
    counts as collapsed; none where no run collapsed."""
    marks = {r["method"]: f", {r['collapsed']}/{r['seeds']} collapsed" for r in rows
             if r.get("collapsed")}
    if not marks:
        return {}, ""
    return marks, (f"collapsed: runs ending more than {COLLAPSE_MARGIN:.0f} points below "
                   f"{short_label(reference)}'s mean accuracy")


def _break_marks(axes: list[Any]) -> None:
    """A broken y axis' two panels: no spine between them, short diagonal marks where
    the axis is cut."""
    upper, lower = axes
    upper.spines.bottom.set_visible(False)
    lower.spines.top.set_visible(False)
    upper.tick_params(bottom=False)
    kwargs = {"marker": [(-1, -0.5), (1, 0.5)], "markersize": 10, "linestyle": "none",
              "color": "k", "mec": "k", "mew": 1, "clip_on": False}
    upper.plot([0, 1], [0, 0], transform=upper.transAxes, **kwargs)
    lower.plot([0, 1], [1, 1], transform=lower.transAxes, **kwargs)


def environment() -> dict[str, Any]:
    info = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def describe_lrs(base: TrainConfig, specs: list[MethodSpec],
                 sweep: dict[str, Any] | None = None,
                 default_lr: float | None = None) -> dict[str, Any]:
    """How the comparison's learning rates were set, for the report: ``mode`` is
    ``"sweep"`` (each method's own, chosen on held-out data), ``"per-method"`` (set in the
    specs) or ``"shared"`` (one lr for all), and ``text`` says so in words (with
    ``default_lr``, the task's default lr, named where it is used)."""
    if sweep is not None:
        lrs = ", ".join(f"{lr:g}" for lr in sweep["lrs"])
        return {"mode": "sweep", "lrs": sweep["lrs"],
                "validation_split": sweep["validation_split"],
                "text": f"each method at its own lr, chosen among {lrs} by final accuracy on "
                        f"a held-out {sweep['validation_split']:g} of the training set "
                        "(lr_sweep.md)"}
    shared = f"{base.lr:g}" if base.lr is not None else "the task's default" + (
        "" if default_lr is None else f", {default_lr:g}")
    if any(spec.lr is not None for spec in specs):
        return {"mode": "per-method",
                "text": f"each method at the lr its spec sets (else {shared})"}
    return {"mode": "shared",
            "text": f"one shared lr ({shared}) for every method, not tuned per method"}


def check_methods(cfg: TrainConfig, specs: list[MethodSpec], shared: dict[str, Any] | None,
                  task: Any) -> None:
    """Build every method once on a throw-away model so bad options fail before any run.
    ``cfg`` is resolved against the task."""
    from .train import build_engine

    if task.num_train // cfg.batch_size < 1:
        raise ValueError(f"batch_size {cfg.batch_size} is larger than the training set "
                         f"({task.num_train} examples)")
    for spec in specs:
        model = task.make_model()
        try:
            run_cfg = replace(cfg, method_options=spec.run_options(shared), fast=False,
                              device="cpu", lr=cfg.lr if spec.lr is None else spec.lr)
            run_cfg.validate()
            steps = max(1, task.num_train // cfg.batch_size) * cfg.epochs
            engine, _ = build_engine(spec.name, model, run_cfg, steps,
                                     num_examples=task.num_train)
            engine.check_batch(cfg.batch_size)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"method {spec.label!r}: {exc}") from None


#: ``adjust(cfg, label) -> cfg``: a grid's change to each run's configuration (the steps of
#: an equal-budget grid)
Adjust = Callable[[TrainConfig, str], TrainConfig]


def _run_config(cfg: TrainConfig, spec: MethodSpec, shared: dict[str, Any] | None,
                seed: int, adjust: Adjust | None = None) -> TrainConfig:
    run = replace(cfg, method=spec.name, method_options=spec.run_options(shared),
                  seed=seed, lr=cfg.lr if spec.lr is None else spec.lr)
    return run if adjust is None else adjust(run, spec.label)


def _run_name(spec: MethodSpec, seed: int) -> str:
    """The folder of one run, relative to the comparison's."""
    return f"runs/{run_slug(spec.label)}-seed{seed}"




def _check_runs(cfg: TrainConfig, specs: list[MethodSpec], shared: dict[str, Any] | None,
                seeds: list[int], out_dir: Path | None, adjust: Adjust | None = None) -> None:
    """``out_dir`` holds a comparison, and every run there (its checkpoint, or the
    ``config.json`` of a run interrupted before its first one) is sound and continues its
    run (else ValueError)."""
    from .outputs import check_folder_command, check_own_outputs
    from .train import check_resumable, resume_point, saved_run_config

    if out_dir is None or not out_dir.is_dir():
        raise ValueError(f"resume: no earlier comparison in {out_dir}")
    check_folder_command(out_dir, "compare")
    for seed in seeds:
        for spec in specs:
            run_dir = out_dir / _run_name(spec, seed)
            if not is_resumable(run_dir):
                continue
            check_folder_command(run_dir, "train")
            check_own_outputs(run_dir, "train")
            point = resume_point(run_dir)
            check_resumable(_run_config(cfg, spec, shared, seed, adjust),
                            saved_run_config(point), point)


class SerialRunner:
    """Runs a grid's runs one after the other in this process (under torchrun: every rank
    takes part in each run). ``progress(title, row)`` is called after every epoch and, if
    it has one, ``progress.finished(title, result)`` after every run. ``threads``: torch's
    threads while the runs train (None: as they are)."""

    def __init__(self, *, progress: Callable[[str, dict[str, Any]], None] | None = None,
                 dist_info: Any = None, threads: int | None = None) -> None:
        self.progress, self.dist_info, self.threads = progress, dist_info, threads

    def execute(self, runs: list[GridRun]) -> list[dict[str, Any]]:
        """Each run's :func:`run_one` result, in the order of ``runs``."""
        before = torch.get_num_threads()
        if self.threads is not None:
            torch.set_num_threads(self.threads)
        try:
            results = []
            for run in runs:
                results.append(run_one(run, dist_info=self.dist_info,
                                       on_epoch=self._on_epoch(run)))
                finished = getattr(self.progress, "finished", None)
                if finished is not None:
                    finished(run.title, results[-1])
            return results
        finally:
            torch.set_num_threads(before)

    def _on_epoch(self, run: GridRun) -> Callable[[dict[str, Any]], None] | None:
        if self.progress is None:
            return None
        return lambda row: self.progress(run.title, row)


@dataclass
class _Grid:
    """A comparison ready to run: validated, its folder (rank 0's) open, its config.json
    written and its runs listed (seed by seed, all methods, so that machine noise hits
    all methods alike)."""

    parsed: list[MethodSpec]
    resolved: TrainConfig
    base: TrainConfig
    task: Any
    lr_choice: dict[str, Any]
    seeds: list[int]
    folder: Any
    runs: list[GridRun]
    #: runs of another grid that are runs of this one too (index -> their result)
    reused: dict[int, dict[str, Any]] = field(default_factory=dict)

    @property
    def todo(self) -> list[GridRun]:
        """The runs to train (not reused)."""
        return [run for i, run in enumerate(self.runs) if i not in self.reused]

    def merged(self, results: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Every run's result, in the order of :attr:`runs`, from :attr:`todo`'s
        ``results`` and the reused ones."""
        done = iter(results)
        return [self.reused[i] if i in self.reused else next(done)
                for i in range(len(self.runs))]

    def report(self, results: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        """The report of the runs' ``results`` (and ``extra`` entries), written to the
        folder."""
        report = {**_report(results, self.parsed, self.resolved, self.task, self.lr_choice,
                            self.base), **extra}
        if self.folder is not None:
            _write_report(self.folder, report, self.task.description, self.seeds)
        return report

    def close(self) -> None:
        if self.folder is not None:
            self.folder.close()


def _new_grid(base: TrainConfig, specs: list[str | MethodSpec], seeds: list[int],
              out_dir: Path | None, *, shared: dict[str, Any] | None, task: Any,
              is_main: bool, resume: bool, overwrite: bool,
              lr_choice: dict[str, Any] | None, title: str = "",
              adjust: Adjust | None = None,
              reuse: list[tuple[TrainConfig, dict[str, Any]]] | None = None,
              extra_config: dict[str, Any] | None = None) -> _Grid:
    """Validate a comparison, open its folder and list its runs (see :func:`compare`).
    ``adjust`` changes each run's configuration; a run whose configuration is one of
    ``reuse``'s (configuration, result) pairs is not trained: its result is reused and it
    gets no folder here. ``extra_config`` joins ``config.json``."""
    from .config import parse_seeds
    from .outputs import open_output
    from .tasks import get_task
    from .train import resolve_device

    base.validate()
    parsed = [MethodSpec.parse(spec) for spec in specs]
    if len({spec.label for spec in parsed}) != len(parsed):
        raise ValueError("the same method spec is given twice")
    seeds = parse_seeds(seeds)
    if task is None:
        task = get_task(base.task, device=resolve_device(base.device), seed=seeds[0],
                        **base.task_options)
    resolved = base.resolved(task.defaults)
    check_methods(resolved, parsed, shared, task)
    configs = [(spec, seed, _run_config(base, spec, shared, seed, adjust))
               for seed in seeds for spec in parsed]
    reused = {i: result for i, (_, _, cfg) in enumerate(configs)
              for other, result in (reuse or []) if cfg == other}
    if resume:  # every checkpoint is checked before any run continues
        _check_runs(resolved, parsed, shared, seeds, out_dir, adjust)
    lr_choice = lr_choice or describe_lrs(base, parsed, default_lr=task.defaults.get("lr"))
    folder = open_output(out_dir, "compare", resume=resume, overwrite=overwrite) \
        if out_dir is not None and is_main else None
    try:
        if folder is not None:
            folder.write_text("config.json", json.dumps({
                "base": _base_config(resolved, lr_choice),
                "methods": [spec.label for spec in parsed], "seeds": seeds,
                "lr_choice": lr_choice, **(extra_config or {}), "environment": environment(),
                "task": task.description}, indent=2))
        runs = [_grid_run(cfg, spec, seed, seeds[0], out_dir,
                          None if i in reused else folder, task=task, resume=resume,
                          overwrite=overwrite, title=title)
                for i, (spec, seed, cfg) in enumerate(configs)]
    except BaseException:
        if folder is not None:
            folder.close()
        raise
    return _Grid(parsed, resolved, base, task, lr_choice, seeds, folder, runs, reused)


def _base_config(resolved: TrainConfig, lr_choice: dict[str, Any]) -> dict[str, Any]:
    """What every run of a comparison shares, for its ``config.json``: no method (each
    run has its own), and no lr unless one lr is shared by all."""
    base = resolved.to_dict()
    for key in ("method", "method_options", "steps"):
        base.pop(key, None)
    if lr_choice.get("mode") != "shared":
        base["lr"] = None
    return base


def _grid_run(cfg: TrainConfig, spec: MethodSpec, seed: int, task_seed: int,
              out_dir: Path | None, folder: Any, *, task: Any, resume: bool,
              overwrite: bool, title: str) -> GridRun:
    name = _run_name(spec, seed)
    if folder is not None:
        folder.record(name)
    return GridRun(cfg, spec.label, seed, task_seed,
                   None if out_dir is None else Path(out_dir).absolute() / name, resume,
                   overwrite, f"{title}{spec.label} seed {seed}", task)


def _runner(runner: Any, progress: Callable[[str, dict[str, Any]], None] | None,
              dist_info: Any) -> Any:
    return runner if runner is not None else SerialRunner(progress=progress,
                                                                dist_info=dist_info)


def reference_label(labels: list[str], names: list[str]) -> str:
    """The reference of a comparison: the plain "sgd" spec, else the first SGD spec (e.g.
    at its own lr after a sweep), else the first method."""
    if "sgd" in labels:
        return "sgd"
    return next((label for label, name in zip(labels, names) if name == "sgd"), labels[0])


def compare(base: TrainConfig, specs: list[str | MethodSpec], seeds: list[int],
            out_dir: Path | None, *, shared: dict[str, Any] | None = None, task: Any = None,
            progress: Callable[[str, dict[str, Any]], None] | None = None,
            is_main: bool = True, dist_info: Any = None, resume: bool = False,
            overwrite: bool = False, lr_choice: dict[str, Any] | None = None,
            runner: Any = None, budget: str | None = None,
            held_out_where: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Train every method spec with every seed; write the report to ``out_dir``.

    Runs are interleaved (seed by seed, all methods) so machine noise hits all methods alike.
    Everything is validated before the first file is written; ``out_dir`` is locked while
    the comparison writes there (:func:`ksam.lab.outputs.open_output`) and refused if it holds
    results, unless ``resume`` or ``overwrite`` (which first removes what ksam wrote there).
    ``resume``: a run whose checkpoint is in ``out_dir`` continues from it (a finished one
    is only re-read), after every checkpoint is verified and its configuration checked
    against this one. ``progress(label, row)`` is called after every epoch, the label
    naming the method spec and the seed. ``lr_choice`` (see :func:`describe_lrs`) says in
    the report how the lrs were set. ``runner`` runs the list of runs (an object with
    ``execute(runs) -> results``, e.g. :class:`ksam.lab.cluster.RayRunner`); default: a
    :class:`SerialRunner` in this process (with ``progress`` and ``dist_info``).

    ``budget`` (``"passes"`` or ``"time"``, :mod:`ksam.lab.budget`): then an equal-budget grid
    in ``out_dir/budget-MODE``, every method at the cost of SGD's run of ``epochs``
    epochs; the report's ``budget`` entry holds its report, its table and the budget.
    ``held_out_where``: where the lr sweep's held-out runs ran, for the report.
    """
    grid = _new_grid(base, specs, seeds, out_dir, shared=shared, task=task, is_main=is_main,
                      resume=resume, overwrite=overwrite, lr_choice=lr_choice,
                      extra_config={"budget": budget} if budget else None)
    try:
        runner = _runner(runner, progress, dist_info)
        results = runner.execute(grid.runs)
        extra: dict[str, Any] = {"held_out_where": held_out_where}
        if budget is not None:
            extra["budget"] = _budget_grid(grid, results, budget, runner, out_dir,
                                           shared=shared, is_main=is_main, resume=resume,
                                           overwrite=overwrite, dist_info=dist_info,
                                           progress=progress)
        return grid.report(results, **extra)
    finally:
        grid.close()


def _budget_grid(epochs_grid: _Grid, results: list[dict[str, Any]], mode: str, runner: Any,
                 out_dir: Path | None, *, shared: dict[str, Any] | None, is_main: bool,
                 resume: bool, overwrite: bool, dist_info: Any,
                 progress: Any) -> dict[str, Any]:
    """The equal-budget grid beside the equal-epochs grid ``epochs_grid`` (whose runs gave
    ``results``), trained by ``runner`` into ``out_dir/budget-MODE``: its report, with
    the budget and its table (:mod:`ksam.lab.budget`)."""
    from . import budget as bud

    world = dist_info.world_size if dist_info is not None else 1
    resolved, task = epochs_grid.resolved, epochs_grid.task
    spe = bud.steps_per_epoch(task.num_train, resolved.batch_size, world)
    labels = [spec.label for spec in epochs_grid.parsed]
    reference = reference_label(labels, [spec.name for spec in epochs_grid.parsed])
    budget_s = None
    if mode == "time":
        budget_s = statistics.fmean(r["final"]["train_time"] for r in results
                                    if r["label"] == reference)
        steps_of = {label: bud.time_steps([r for r in results if r["label"] == label],
                                          budget_s) for label in labels}
        steps_of[reference] = spe * resolved.epochs  # the budget's own run, exactly

    solved: dict[tuple[str, int], int] = {}  # (label, seed) -> steps, solved once

    def adjust(cfg: TrainConfig, label: str) -> TrainConfig:
        if mode == "time":
            steps = steps_of[label]
        else:
            key = (label, cfg.seed)
            if key not in solved:
                solved[key] = bud.passes_steps(cfg.resolved(task.defaults), task, spe)
            steps = solved[key]
        if steps == spe * resolved.epochs:  # the equal-epochs run itself
            return cfg
        return bud.budget_config(replace(cfg, epochs=resolved.epochs), steps, spe)

    name = f"budget-{mode}"
    sub = Path(out_dir) / name if out_dir is not None else None
    if epochs_grid.folder is not None:
        epochs_grid.folder.record(name)
    passes = bud.passes_budget(resolved, spe)
    amount = passes if mode == "passes" else budget_s
    text = bud.budget_text(mode, resolved.epochs, spe * resolved.epochs, amount)
    grid = _new_grid(epochs_grid.base, epochs_grid.parsed, epochs_grid.seeds, sub,
                      shared=shared, task=task,
                      is_main=is_main, resume=resume and sub is not None and sub.is_dir(),
                      overwrite=overwrite, lr_choice=epochs_grid.lr_choice,
                      title=f"budget {mode}: ", adjust=adjust,
                      reuse=[(run.cfg, result)
                             for run, result in zip(epochs_grid.runs, results)],
                      extra_config={"budget": mode, "budget_amount": amount,
                                    "budget_text": text})
    try:
        shows = {id(p): p for p in (progress, getattr(runner, "progress", None))
                 if getattr(p, "total", None) is not None}
        saved = sum(grid.runs[i].cfg.method != "sgd" for i in grid.reused)
        for shown in shows.values():  # SGD's runs were never counted twice; other reused
            shown.total -= saved     # runs (a method at SGD's cost) are not trained again
        done = runner.execute(grid.todo)
        merged = grid.merged(done)
        report = _report(merged, grid.parsed, grid.resolved, task, grid.lr_choice, grid.base)
        rows = bud.budget_rows(report["rows"], merged, spe, passes, budget_s)
        frontier = table_notes(report["reference"]).splitlines()[-1]
        report.update(rows=rows, table=bud.budget_table(rows, report["split"]), mode=mode,
                      notes=frontier + device_note(rows, report["reference"]),
                      amount=amount, text=text, steps_per_epoch=spe,
                      reused=[merged[i]["label"] for i in sorted(grid.reused)])
        if grid.folder is not None:
            _write_report(grid.folder, report, f"{task.description}\n\n{text}", grid.seeds)
        return report
    finally:
        grid.close()


def _report(runs: list[dict[str, Any]], parsed: list[MethodSpec], resolved: TrainConfig,
            task: Any, lr_choice: dict[str, Any], base: TrainConfig) -> dict[str, Any]:
    labels = [spec.label for spec in parsed]
    reference = reference_label(labels, [spec.name for spec in parsed])
    rows = summarize(runs, reference)
    split = "validation" if base.task_options.get("validation_split") else "test"
    return {"rows": rows, "table": markdown_table(rows, reference, split),
            "reference": reference,
            "notes": table_notes(reference) + device_note(rows, reference),
            "reading": reading(rows, reference, split), "runs": runs,
            "where": places(runs), "task_name": task.name,
            "lr_choice": lr_choice, "accuracy_vs_cost": accuracy_vs_cost(runs, reference),
            "split": split,
            "config": resolved.to_dict(), "environment": environment()}




def _report_header(report: dict[str, Any], description: str, seeds: list[int]) -> str:
    env, cfg = report["environment"], report["config"]
    return (
        f"# ksam compare: {report['task_name']}\n\n{description}\n\n"
        f"{len(seeds)} seeds ({', '.join(map(str, seeds))}); {cfg['epochs']} epochs, "
        f"batch {cfg['batch_size']} ({cfg['lr_schedule']} lr schedule), momentum "
        f"{cfg['momentum']}, weight decay {cfg['weight_decay']}, {cfg['precision']}, "
        f"device {cfg['device']}{' (fast path)' if cfg['fast'] else ''}"
        f"{' (torch.compile: ' + cfg['compile'] + ')' if cfg.get('compile') else ''}.\n"
        f"torch {env['torch']}, {env.get('gpu', env['machine'])}, {env['date']}"
        f"{_threads_text(report['runs'])}.\n"
        f"Runs ran on: {_where_text(report.get('where', []))}"
        f"{_held_out_text(report.get('held_out_where'))}.\n\n"
        f"Learning rate: {report['lr_choice']['text']} (the 'lr' column).\n\n"
        f"{report['split'].capitalize()} accuracy at the end of training (the "
        f"'{report['split']} acc' column); train time is the wall-clock of the training "
        f"steps only (evaluation excluded), mean over seeds.\n\n"
    )


def _threads_text(runs: list[dict[str, Any]]) -> str:
    counts = sorted({r["threads"] for r in runs if r.get("threads")})
    if not counts:
        return ""
    return f"; {' or '.join(map(str, counts))} torch thread{'s' if counts[-1] > 1 else ''} a run"


def _held_out_text(where: list[dict[str, Any]] | None) -> str:
    if not where:
        return ""
    count = sum(p["runs"] for p in where)
    return (f"; before them, the lr sweep's {count} held-out run{'s' if count != 1 else ''} "
            f"(lr_sweep.md): {_where_text(where)}")


def _metrics_csv(runs: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    fields = ["method", "seed", "epoch", "train_loss", "test_loss", "test_acc", "epoch_time",
              "train_time", "step_time_median", "steps", "passes", "skipped_steps", "lr"]
    writer = csv.DictWriter(buffer, fieldnames=fields)
    writer.writeheader()
    for r in runs:
        for e in r["epochs"]:
            writer.writerow({"method": r["label"], "seed": r["seed"],
                             **{k: e.get(k) for k in fields[2:]}})
    return buffer.getvalue()


def _where_text(where: list[dict[str, Any]]) -> str:
    return "; ".join(f"{p['host']} ({p['device_name']}): {p['runs']} run"
                     f"{'s' if p['runs'] != 1 else ''}" for p in where) or "-"


def device_note(rows: list[dict[str, Any]], reference: str) -> str:
    """The note under the table for the methods marked '*' (time / reference across
    kinds of device); empty when every run ran on one kind of device."""
    mixed = [r["method"] for r in rows if r.get("mixed_devices")]
    if not mixed:
        return ""
    return (f"\n'*' after time / {reference}: {', '.join(mixed)} and {reference} did not all "
            "run on one kind of device, so the ratio mixes hardware (see summary.json's "
            "devices and 'Runs ran on').")


def table_notes(reference: str) -> str:
    """What the table's 'collapsed' column and the cost plot's '(frontier)' mean."""
    return (f"'collapsed' counts runs ending more than {COLLAPSE_MARGIN:.0f} points of test "
            f"accuracy below {reference}'s mean.\n"
            "'(frontier)' in accuracy_vs_cost.png marks the methods no other method beats "
            "on both time and accuracy (at most the time and at least the accuracy).")


def reading(rows: list[dict[str, Any]], reference: str, split: str = "test") -> str:
    """A few sentences under the table that read it: the most accurate method and its
    time against ``reference``'s, the methods without a collapsed run that a std's overlap
    does not tell apart from it (and which of those is cheapest), and each method with
    collapsed runs."""
    rows = [r for r in rows if not math.isnan(r["test_acc_mean"])]
    if not rows:
        return ""
    best = max(rows, key=lambda r: r["test_acc_mean"])

    def spread(r: dict[str, Any]) -> float:
        return r["test_acc_std"] if r["seeds"] > 1 and not math.isnan(r["test_acc_std"]) else 0

    def cost(r: dict[str, Any]) -> str:
        ratio = r["time_vs_ref"]
        return "" if math.isnan(ratio) else f", {ratio:.2f}x {reference}'s time"

    lines = [f"Reading: the most accurate method here is {best['method']} "
             f"({best['test_acc_mean']:.2f} % {split} accuracy{cost(best)})."]
    close = [r for r in rows if r is not best and not r["collapsed"]
             and r["test_acc_mean"] + spread(r) >= best["test_acc_mean"] - spread(best)]
    if close:
        names = ", ".join(f"{r['method']} ({r['test_acc_mean']:.2f} %{cost(r)})" for r in close)
        cheapest = min([best, *close], key=lambda r: r["train_time_s"])
        lines.append(f"Within one std of it (not told apart on these seeds): {names}; the "
                     f"cheapest of them is {cheapest['method']}.")
    for r in rows:
        if r["collapsed"]:
            lines.append(f"{r['method']} collapsed in {r['collapsed']} of {r['seeds']} runs: "
                         f"they ended more than {COLLAPSE_MARGIN:.0f} points below "
                         f"{reference}'s mean, runs that stopped learning (a step too large "
                         "for the run, or on noisy labels a method that fits the wrong "
                         "labels).")
    return "\n".join(lines)


def _write_report(folder: Any, report: dict[str, Any], description: str,
                  seeds: list[int]) -> None:
    """summary.md, summary.json, metrics.csv and the plots, into the comparison's
    :class:`ksam.lab.outputs.OutputFolder`."""
    # An equal-budget grid's methods ran for different numbers of steps: a method that ends
    # lower there did not collapse (budget.py's table has no 'collapsed' column either).
    marks, caption = ({}, "") if report.get("mode") else \
        collapse_marks(report["rows"], report["reference"])
    drawn = plot_accuracy_vs_cost(report["accuracy_vs_cost"], report["reference"],
                                  folder.record("accuracy_vs_cost.png"),
                                  _report_title(report, "final test accuracy vs training time",
                                                len(seeds)), marks=marks, caption=caption)
    note = "" if drawn else ("\n(matplotlib is not installed: no plots; the accuracy-vs-cost "
                             "points are in summary.json.)\n")
    budget = report.get("budget")
    extra = "" if budget is None else (f"\n## Equal budget: {budget['mode']}\n\n"
                                       f"{budget['text']} (budget-{budget['mode']}/)\n\n"
                                       f"{budget['table']}\n")
    heading = "## Equal epochs\n\n" if budget is not None else ""
    folder.write_text("summary.md", _report_header(report, description, seeds) + heading
                      + report["table"] + "\n\n" + report["notes"] + "\n"
                      + (f"\n{report['reading']}\n" if report.get("reading") else "")
                      + extra + note)
    slim = {k: v for k, v in report.items() if k not in ("runs", "budget")}
    slim["runs"] = _slim_runs(report["runs"])
    if budget is not None:
        slim["budget"] = {k: v for k, v in budget.items() if k != "runs"}
        slim["budget"]["runs"] = _slim_runs(budget["runs"])
    folder.write_text("summary.json", json.dumps(slim, indent=2, default=str))
    folder.write_text("metrics.csv", _metrics_csv(report["runs"]))
    plot_accuracy_vs_time(report["runs"], folder.record("accuracy_vs_time.png"),
                          _report_title(report, "test accuracy vs training time", len(seeds)))


def _report_title(report: dict[str, Any], what: str, seeds: int) -> str:
    """:func:`chart_title` of a comparison's report (an equal-budget grid's methods ran
    for different numbers of epochs: its title says the budget instead)."""
    config = dict(report["config"])
    if report.get("mode"):
        config["epochs"] = None
        what = f"{what}, equal budget ({report['mode']})"
    return chart_title(config, what, seeds=seeds,
                       lrs=[r.get("lr") for r in report.get("rows", [])])


def _slim_runs(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: r.get(k) for k in ("label", "seed", "final", "host", "node_id",
                                    "device_name", "threads")} for r in runs]


def check_sweep(base: TrainConfig, specs: list[MethodSpec], lrs: list[float]) -> None:
    """ValueError unless ``lrs`` can be swept for ``specs``."""
    if not lrs:
        raise ValueError("give at least one learning rate to sweep")
    for lr in lrs:
        replace(base, lr=lr).validate()
    for spec in specs:
        if spec.lr is not None:
            raise ValueError(f"method {spec.label!r} sets its own lr; the lr sweep chooses it")
    if len(set(lrs)) != len(lrs):
        raise ValueError("the same learning rate is given twice")


def _sweep_table(specs: list[MethodSpec], lrs: list[float], scores: dict[str, dict],
                 collapsed: dict[str, dict], chosen: dict[str, float], n_seeds: int) -> str:
    header = "| method | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " | chosen |"
    lines = [header, "|---|" + "---|" * (len(lrs) + 1)]
    for spec in specs:
        cells = []
        for lr in lrs:
            cell = f"{scores[spec.label][lr]:.2f}"
            if collapsed[spec.label][lr]:
                cell += f" ({collapsed[spec.label][lr]}/{n_seeds} collapsed)"
            cells.append(f"**{cell}**" if lr == chosen[spec.label] else cell)
        lines.append(f"| {spec.label} | " + " | ".join(cells) + f" | {chosen[spec.label]:g} |")
    return "\n".join(lines)


def sweep_lr(base: TrainConfig, specs: list[str | MethodSpec], seeds: list[int],
             lrs: list[float], out_dir: Path | None, *, validation_split: float = 0.2,
             shared: dict[str, Any] | None = None,
             progress: Callable[[str, dict[str, Any]], None] | None = None,
             is_main: bool = True, dist_info: Any = None,
             resume: bool = False, overwrite: bool = False, runner: Any = None
             ) -> dict[str, Any]:
    """Each method's learning rate, chosen on a held-out split of the training set.

    For every lr in ``lrs``: :func:`compare` of all ``specs`` with ``validation_split`` of
    the training set held out as the evaluation set (the test set is not touched); a
    method's lr is the one with the best mean final validation accuracy (the first one on a
    tie). Returns ``{"chosen": {label: lr}, "specs": [MethodSpec with lr], "table":
    markdown, "validation": {label: {lr: mean acc}}, "lrs", "validation_split"}`` and writes
    each sweep run under ``out_dir/lr-sweep/`` and the table to ``out_dir/lr_sweep.md``
    (``out_dir`` locked and checked as by :func:`compare`). Every lr's comparison is
    validated and planned first; then ``runner`` (as in :func:`compare`) runs all their
    runs as one list, lr by lr.
    """
    parsed = [MethodSpec.parse(spec) for spec in specs]
    check_sweep(base, parsed, lrs)
    held_out = replace(base, task_options={**base.task_options,
                                           "validation_split": validation_split})
    held_out.validate()
    from .outputs import open_output

    folder = open_output(out_dir, "compare", resume=resume, overwrite=overwrite) \
        if out_dir is not None and is_main else None
    grids: list[_Grid] = []
    try:
        for lr in lrs:
            name = f"lr-sweep/lr-{lr:g}"
            sub = out_dir / name if out_dir is not None else None
            if folder is not None:
                folder.record(name)
            grids.append(_new_grid(replace(held_out, lr=lr), parsed, seeds, sub, shared=shared,
                               task=None, is_main=is_main, overwrite=overwrite,
                               resume=resume and sub is not None and sub.is_dir(),
                               lr_choice=None, title=f"lr {lr:g} (held out) "))
        results = _runner(runner, progress, dist_info).execute(
            [run for grid in grids for run in grid.runs])
        reports = [grid.report(results[i * len(grid.runs):(i + 1) * len(grid.runs)])
                   for i, grid in enumerate(grids)]
        result = _sweep_result(parsed, lrs, reports, len(seeds), validation_split)
        result["where"] = places(results)
        if folder is not None:
            _write_sweep(folder, result, len(seeds))
    finally:
        for grid in grids:
            grid.close()
        if folder is not None:
            folder.close()
    return result


def _sweep_result(parsed: list[MethodSpec], lrs: list[float], reports: list[dict[str, Any]],
                  n_seeds: int, validation_split: float) -> dict[str, Any]:
    """The chosen lr per method from the held-out comparisons' ``reports`` (one per lr)."""
    scores: dict[str, dict[float, float]] = {spec.label: {} for spec in parsed}
    collapsed: dict[str, dict[float, int]] = {spec.label: {} for spec in parsed}
    for lr, report in zip(lrs, reports):
        for row in report["rows"]:
            scores[row["method"]][lr] = row["test_acc_mean"]
            collapsed[row["method"]][lr] = row["collapsed"] or 0
    chosen = {spec.label: max(lrs, key=lambda lr, s=spec.label: (scores[s][lr], -lrs.index(lr)))
              for spec in parsed}
    table = _sweep_table(parsed, lrs, scores, collapsed, chosen, n_seeds)
    return {"chosen": chosen, "specs": [s.with_lr(chosen[s.label]) for s in parsed],
            "table": table, "validation": scores, "validation_split": validation_split,
            "lrs": list(lrs)}


def _write_sweep(folder: Any, result: dict[str, Any], n_seeds: int) -> None:
    text = (f"# Learning rate per method, chosen on a held-out split\n\n"
            f"Final validation accuracy % (mean over {n_seeds} seeds) with "
            f"{result['validation_split']:g} of the training set held out; the test set is "
            f"not used. Each method then runs on the test set at its chosen lr.\n\n"
            f"{result['table']}\n")
    folder.write_text("lr_sweep.md", text)
    folder.write_text("lr_sweep.json", json.dumps(
        {**result, "specs": [s.label for s in result["specs"]]}, indent=2))


# ---------------------------------------------------------------- the command, and from Python

Echo = Callable[[str], None] | None


def say(text: str) -> None:
    """Print ``text`` at once, also to a pipe or a file (the plan must not wait in a
    buffer until the first run ends)."""
    print(text, flush=True)


# --------------------------------------------------------------------------- shared checks

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
        check_folder_command(out, command)  # another command's: --resume would not help
        if not (resume or overwrite):
            raise ValueError(f"--out {out} is not empty; give --resume to continue the "
                             "results there or --overwrite to replace them")
        check_own_outputs(out, command)
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
    from .. import distributed

    return distributed.init_from_env()


# --------------------------------------------------------------------------- runners

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


def _ray_runner(cfg: CliConfig, world: int, runs: int, base: Any, importable: bool) -> Any:
    """With ``--ray``: the :class:`ksam.lab.cluster.RayRunner` (connected, its task size
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
    from .cluster import RayRunner

    runner = RayRunner(None if cfg.ray == "local" else cfg.ray,
                           cpus_per_run=cfg.cpus_per_run, gpus_per_run=cfg.gpus_per_run,
                           quiet=cfg.quiet, total_runs=runs)
    if base.device == "auto":
        base.device = runner.device
    return runner


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
    equal-epochs grid, the equal-budget grid if any; the report (:func:`ksam.lab.compare.compare`'s,
    with ``out``, the folder, and ``sweep``, the sweep's result). ``echo`` prints the plan
    before the first run and the tables at the end (None: nothing). ``importable``: worker
    processes can build the task from its name (False for a Python object of this
    process: the runs then train here)."""
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
        check_sweep(base, cfg.methods, sweep)
    world = world_size()
    base.check_processes(world)
    _check_budget(cfg, world)
    device = resolve_device(base.device)
    task = get_task(base.task, device=device, seed=cfg.seeds[0], **base.task_options)
    resolved = base.resolved(task.defaults)
    check_methods(resolved, cfg.methods, cfg.shared, task)
    runs = len(cfg.methods) * len(cfg.seeds)
    budget_runs = (len(cfg.methods) - sum(spec.name == "sgd" for spec in cfg.methods)) \
        * len(cfg.seeds) if cfg.budget else 0
    total = runs * (1 + (len(sweep) if sweep else 0)) + budget_runs
    jobs = _jobs(cfg, device, world, importable)
    threads = cfg.threads if cfg.threads is not None or device != "cpu" or world > 1 else 1
    external = _ray_runner(cfg, world, total, base, importable)  # a runner to close
    dist_info = join_processes(world)
    if dist_info is not None:
        base.device = str(dist_info.device)
    is_main = dist_info is None or dist_info.rank == 0
    quiet = cfg.quiet or not is_main
    if echo is not None and not quiet:
        echo(_plan_text(cfg, resolved, out, sweep, jobs, threads, budget_runs, total))
    progress = EpochProgress(total, quiet or external is not None or jobs > 1)
    if external is None and jobs > 1:
        from .pool import ProcessRunner

        external = ProcessRunner(jobs, threads=threads or 1, quiet=quiet, total_runs=total)
    runner = external or SerialRunner(progress=progress, dist_info=dist_info,
                                      threads=threads)
    common = dict(shared=cfg.shared, progress=progress, is_main=is_main, dist_info=dist_info,
                  resume=cfg.resume, overwrite=cfg.overwrite, runner=runner)
    specs = cfg.methods
    lr_choice = describe_lrs(base, specs, default_lr=task.defaults.get("lr"))
    try:
        folder = open_output(out, "compare", resume=cfg.resume, overwrite=cfg.overwrite) \
            if is_main else None
    except BaseException:
        if external is not None:
            external.close()
        raise
    chosen = None
    try:
        if sweep:
            held_out = cfg.validation_split or DEFAULT_SWEEP_SPLIT
            chosen = sweep_lr(base, cfg.methods, cfg.seeds, sweep, out,
                              validation_split=held_out, **common)
            specs, lr_choice = chosen["specs"], describe_lrs(base, specs, chosen)
        report = compare(base, specs, cfg.seeds, out, task=task, lr_choice=lr_choice,
                         budget=cfg.budget,
                         held_out_where=chosen["where"] if chosen else None, **common)
    finally:
        progress.close()
        if external is not None:
            external.close()
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
        if report.get("reading"):
            echo(f"\n{report['reading']}")
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


def compare_task(task: Any = None, methods: list[str] | tuple[str, ...] | None = None, *,
                 seeds: int | str | list[int] = 3, out: str | os.PathLike[str] | None = None,
                 budget: str | None = None, jobs: int | None = None,
                 threads: int | None = None, resume: bool = False, overwrite: bool = False,
                 quiet: bool = False, task_name: str | None = None,
                 **options: Any) -> dict[str, Any]:
    """Compare ``methods`` on ``task``: what ``ksam compare`` does, from Python.

    Args:
        task: the command's default task (None), a registered task's name, a spec
            (``"path/to/file.py:function"``, ``"package.module:function"``), a function
            taking no required arguments that returns the task, or the task itself: a dict
            with ``train_x``, ``train_y``, ``test_x``, ``test_y`` (tensors or arrays, integer
            labels) and ``make_model`` (returns a fresh ``nn.Module``), optional
            ``num_classes``, ``augment``, ``defaults``, ``description``
            (:mod:`ksam.lab.tasks.user`), or a :class:`ksam.tasks.TaskData`.
        methods: method specs (``["sgd", "sam", "ksam:k=16"]``); default the command's.
        seeds: a count, a list or a range (``"0-4"``).
        out: the output folder, as the command's (default ``runs/compare-TASK-DATE-TIME``);
            ``resume``, ``overwrite`` as the flags.
        budget: ``"passes"`` or ``"time"``: an equal-budget grid beside the equal-epochs
            one (:mod:`ksam.lab.budget`).
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
        **options: any other field of :class:`ksam.lab.config.CliConfig`, as the flags name
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
    if task is None or isinstance(task, str):
        spec, local = task, None
    elif isinstance(task, (Mapping, TaskData)):
        spec, local = None, task
    elif callable(task):
        spec = function_spec(task)
        local = task if spec is None else None
    else:
        raise ValueError(f"task must be a name, a 'file.py:function' spec, a function, a dict "
                         f"or a TaskData, got a {type(task).__name__}")
    if local is None:
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
