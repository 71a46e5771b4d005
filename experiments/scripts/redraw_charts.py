"""Redraw the accuracy-vs-cost charts of docs/experiments/img/ from the stored results of the
comparisons they show (experiments/runs/), with the plotting of ``ksam compare``
(:func:`ksam.lab.compare.plot_accuracy_vs_cost`: methods by name, the data set in the title,
a broken axis where a collapsed method would squeeze the others)::

    python experiments/scripts/redraw_charts.py            # every chart
    python experiments/scripts/redraw_charts.py mnist1d-lr-cost.png

Each chart reads its comparison's ``summary.json`` (the ``accuracy_vs_cost`` points, or
the runs' final accuracies and times where an older summary has no points); the preset
``mnist1d-noise30`` kept only ``runs.csv`` (spec, seed, final accuracy, training time).

These runs ran when K-SAM's selection rule defaulted to ``top``: a K-SAM spec without
``select`` is drawn as ``select=top`` (:func:`as_run`), not as today's default rule.

The accuracy-vs-time charts (mnist1d.png, label-noise-n0.png, label-noise-n20.png) need
each epoch's accuracy, which the stored summaries do not keep: they are not redrawn here.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Any

from ksam.lab.compare import (
    COLLAPSE_MARGIN,
    accuracy_vs_cost,
    chart_title,
    collapse_marks,
    plot_accuracy_vs_cost,
)
from ksam.lab.config import MethodSpec

ROOT = Path(__file__).resolve().parents[2]
RUNS = ROOT / "experiments" / "runs"
IMG = ROOT / "docs" / "experiments" / "img"
WHAT = "final test accuracy vs training time"
SECOND_VM = f"{WHAT} (second VM)"

#: png -> (folder under experiments/runs, the title's second line): from the image's
#: paragraph in docs/experiments/*.md.
CHARTS: dict[str, tuple[str, str]] = {
    "mnist1d-lr-cost.png": ("mnist1d-lr", WHAT),
    "mnist1d-noise30-cost.png": ("mnist1d-noise30", WHAT),
    "mnist1d-noise30-memory-cost.png": ("mnist1d-noise30-memory", WHAT),
    "fashion-cnn-clean-cost.png": ("label-noise/fashion-cnn-n0-second-vm", SECOND_VM),
    "fashion-cnn-noise20-cost.png": ("label-noise/fashion-cnn-n20-second-vm", SECOND_VM),
    "fashion-cnn-noise40-cost.png": ("label-noise/fashion-cnn-n40-second-vm", SECOND_VM),
    "fashion-cnn-pair30-cost.png": ("label-noise/fashion-cnn-pair30-second-vm", SECOND_VM),
    "fashion-cnn-clean-field-cost.png": ("label-noise/fashion-cnn-clean-field", WHAT),
    "fashion-cnn-noise20-field-cost.png": ("label-noise/fashion-cnn-n20-field", WHAT),
    "fashion-cnn-noise40-field-cost.png": ("label-noise/fashion-cnn-n40-field", WHAT),
    "fashion-cnn-pair30-field-cost.png": ("label-noise/fashion-cnn-pair30-field", WHAT),
}

#: The config of the preset ``mnist1d-noise30`` (its folder has no summary.json): MNIST-1D,
#: the 1-D CNN, 30 % symmetric label noise, 80 epochs, SGD at its own lr as the reference.
MNIST1D_NOISE30 = {"task": "mnist1d", "task_options": {"model": "cnn", "label_noise": 0.3},
                   "epochs": 80}
MNIST1D_NOISE30_REFERENCE = "sgd:lr=0.4"


def as_run(spec: str) -> str:
    """``spec`` as it ran: K-SAM without ``select`` ran the then default, ``top``."""
    parsed = MethodSpec.parse(spec)
    if parsed.name != "ksam" or "select" in parsed.options:
        return spec
    return MethodSpec.parse(f"ksam:select=top,{spec.partition(':')[2]}").label


def _runs_csv(folder: Path) -> list[dict[str, Any]]:
    with (folder / "runs.csv").open(newline="") as f:
        return [{"label": row["spec"], "seed": int(row["seed"]),
                 "final": {"train_time": float(row["train_time_s"]),
                           "test_acc": float(row["final_acc"])}}
                for row in csv.DictReader(f)]


def _rows(runs: list[dict[str, Any]], reference: str) -> list[dict[str, Any]]:
    """What the chart reads of :func:`ksam.lab.compare.summarize`'s rows (method, seeds,
    collapsed), from runs that kept only their final accuracy and time."""
    accs = {r["label"]: [] for r in runs}
    for r in runs:
        accs[r["label"]].append(r["final"]["test_acc"])
    bar = sum(accs[reference]) / len(accs[reference]) - COLLAPSE_MARGIN
    return [{"method": label, "seeds": len(a), "collapsed": sum(x < bar for x in a)}
            for label, a in accs.items()]


def chart_data(folder: Path) -> tuple[dict[str, Any], list[dict[str, Any]],
                                      list[dict[str, Any]], str]:
    """The config, the summary rows (method, seeds, lr, collapsed), the accuracy-vs-cost
    points and the reference of the comparison stored in ``folder``; specs as they ran."""
    if (folder / "summary.json").exists():
        summary = json.loads((folder / "summary.json").read_text())
        config, rows, reference = summary["config"], summary["rows"], summary["reference"]
        points = summary.get("accuracy_vs_cost") or accuracy_vs_cost(summary["runs"], reference)
    else:
        runs, reference = _runs_csv(folder), MNIST1D_NOISE30_REFERENCE
        config, rows = MNIST1D_NOISE30, _rows(runs, reference)
        points = accuracy_vs_cost(runs, reference)
    rows = [{**r, "method": as_run(r["method"])} for r in rows]
    points = [{**p, "method": as_run(p["method"])} for p in points]
    return config, rows, points, as_run(reference)


def redraw(png: str) -> Path:
    source, what = CHARTS[png]
    config, rows, points, reference = chart_data(RUNS / source)
    lrs = [r["lr"] if r.get("lr") is not None else MethodSpec.parse(r["method"]).lr
           for r in rows]
    title = chart_title(config, what, seeds=max(p["seeds"] for p in points), lrs=lrs)
    marks, caption = collapse_marks(rows, reference)
    target = IMG / png
    if not plot_accuracy_vs_cost(points, reference, target, title, marks=marks,
                                 caption=caption):
        raise SystemExit("matplotlib is not installed")
    return target


def main(names: list[str]) -> None:
    unknown = [n for n in names if n not in CHARTS]
    if unknown:
        raise SystemExit(f"no chart {', '.join(unknown)}; known: {', '.join(CHARTS)}")
    for png in names or CHARTS:
        print(redraw(png).relative_to(ROOT))


if __name__ == "__main__":
    main(sys.argv[1:])
