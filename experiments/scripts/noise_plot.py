"""The label-noise grid in one figure (docs/experiments/label-noise.md): per data set and noise
setting, each method's test accuracy (mean and min-max over seeds) from the ``summary.json``
files of ``ksam compare``::

    python experiments/scripts/noise_plot.py experiments/runs/label-noise \\
        docs/experiments/img/label-noise-grid.png

Reads ``<root>/<setting>[-stratified|-extra|-auto|-memory-split]/summary.json`` for the
MNIST-1D settings ``n0 n20 n40 pair30`` and ``<root>/fashion-cnn-<setting>[-field|...]`` for
Fashion-MNIST (a setting without results says "not run"). K-SAM from memory is shown in one
configuration, ``select=stratified`` with 8 ascent / 24 descent rows, at its held-out radius.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

SETTINGS = [("n0", "clean"), ("n20", "20 % sym."), ("n40", "40 % sym."),
            ("pair30", "30 % pair")]
METHODS = ["SGD", "SAM", "K-SAM top", "K-SAM band", "K-SAM median", "K-SAM stratified",
           "K-SAM auto", "OSGD band", "OSGD auto", "K-SAM memory 8/24"]
MEMORY_SPLIT = "K-SAM memory 8/24"
#: The held-out radius of K-SAM from memory 8/24 on MNIST-1D, whose summaries hold every
#: radius of its grid (docs/experiments/label-noise-memory.md); Fashion-MNIST's hold the chosen
#: one only.
MNIST1D_MEMORY_SPLIT_RHO = {"n0": "0.05", "n20": "0.01", "n40": "0.01", "pair30": "0.01"}


def label(spec: str) -> str | None:
    """The figure's name for a method spec; None for a method the figure does not show
    (SAF, MESA, selection from remembered losses other than 8 / 24 rows)."""
    method, _, options = spec.partition(":")
    opts = dict(o.split("=", 1) for o in options.split(",") if "=" in o)
    if method in ("sgd", "sam"):
        return method.upper()
    if method == "ksam" and opts.get("scores") == "memory" and opts.get("k_ascent") == "8" \
            and opts.get("k_descent") == "24":
        return MEMORY_SPLIT
    if method not in ("ksam", "osgd") or "scores" in opts:
        return None
    return f"{'K-SAM' if method == 'ksam' else 'OSGD'} {opts.get('select', 'top')}"


def results(root: Path, prefix: str, setting: str) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    # The first summary with a method gives its row: the preset's, then a rule's own run,
    # then the field (Fashion-MNIST's ran as <setting>-field; clean: fashion-cnn-clean-field).
    field = f"{prefix}clean-field" if prefix and setting == "n0" else f"{prefix}{setting}-field"
    names = [f"{prefix}{setting}{suffix}" for suffix in ("", "-stratified")] + [field] + \
        [f"{prefix}{setting}{suffix}" for suffix in ("-extra", "-auto", "-memory-split")]
    for name in names:
        path = root / name / "summary.json"
        if path.exists():
            for row in json.loads(path.read_text())["rows"]:
                method = label(row["method"])
                chosen = f"rho={MNIST1D_MEMORY_SPLIT_RHO[setting]},"
                if method == MEMORY_SPLIT and not prefix and chosen not in row["method"]:
                    continue  # another radius of the MNIST-1D grid
                if method is not None and method not in out:
                    out[method] = row["test_acc_all"]
    return out


def main(root: Path, target: Path) -> None:
    data = [("MNIST-1D (1-D CNN, 30 epochs)", ""),
            ("Fashion-MNIST, 5000 images (CNN, 40 epochs)", "fashion-cnn-")]
    fig, axes = plt.subplots(len(data), len(SETTINGS), figsize=(14, 7), dpi=110,
                             sharey=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for r, (title, prefix) in enumerate(data):
        for c, (setting, name) in enumerate(SETTINGS):
            ax = axes[r][c]
            found = results(root, prefix, setting)
            if not found:
                ax.text(0.5, 0.5, "not run", ha="center", va="center", transform=ax.transAxes,
                        color="grey")
                ax.set_yticks([])
            for i, method in enumerate(METHODS):
                accs = found.get(method)
                if not accs:
                    continue
                mean = sum(accs) / len(accs)
                ax.errorbar([i], [mean], yerr=[[mean - min(accs)], [max(accs) - mean]],
                            fmt="o", color=colours[i % len(colours)], capsize=3)
            bar = max((sum(found[m]) / len(found[m]) for m in ("SGD", "SAM") if m in found),
                      default=None)
            if bar is not None:
                ax.axhline(bar, color="grey", lw=0.8, ls="--")
            ax.set_xticks(range(len(METHODS)))
            ax.set_xticklabels(METHODS, rotation=60, ha="right", fontsize=7)
            ax.set_title(f"{name}", fontsize=9)
            ax.grid(alpha=0.3, axis="y")
            if c == 0:
                ax.set_ylabel(f"{title.split(' (')[0].split(',')[0]}\ntest accuracy (%)")
    fig.suptitle("Test accuracy, mean and min-max over 5 seeds; dashed: the better of SGD "
                 "and SAM", fontsize=10)
    fig.tight_layout()
    fig.savefig(target)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
