"""The tables of docs/experiments/default-rule.md from the runs' summaries: the first pass
(benchmarks/default_screen.sh) and the confirmation (benchmarks/default_confirm.py), each
method's mean accuracy and its margin over the better of SGD and SAM in the same command,
and the decision rule applied to the confirmation::

    python benchmarks/default_tables.py --screen runs/default-screen \\
        --confirm runs/default-confirm --plot docs/experiments/img/default-rule.png
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

SETTINGS = ["clean", "n5", "n20", "n40", "pair30"]
NAMES = {"clean": "clean", "n5": "5 % sym.", "n20": "20 % sym.", "n40": "40 % sym.",
         "pair30": "30 % pair"}
DATA = {"mnist1d": "MNIST-1D", "fashion": "Fashion-MNIST"}
#: The candidates' names in ksam where they differ from the confirmation's registration
#: (benchmarks/default_candidates.py registers AutoMarginBand as auto-either).
SHOWN = {"auto-either": "auto-margin"}


def rule_of(label: str) -> str:
    """``sgd``, ``sam`` or the K-SAM rule of a spec label."""
    name = label.split(":", 1)[0]
    if name != "ksam":
        return name
    options = dict(part.split("=", 1) for part in label.split(":", 1)[1].split(","))
    return options.get("select", "top")


def read(folder: Path) -> dict[str, dict]:
    """Each method's row of a comparison's summary, by its rule."""
    rows = json.loads((folder / "summary.json").read_text())["rows"]
    return {rule_of(r["method"]): r for r in rows}


def margins(rows: dict[str, dict]) -> dict[str, float]:
    best = max(rows[m]["test_acc_mean"] for m in ("sgd", "sam") if m in rows)
    return {rule: r["test_acc_mean"] - best for rule, r in rows.items()
            if rule not in ("sgd", "sam")}


def table(results: dict[tuple[str, str], dict[str, dict]], rules: list[str],
          collapsed: bool) -> str:
    """One row per method, one column per (data set, setting): mean accuracy (margin)."""
    cols = [c for c in results]
    head = "| method | " + " | ".join(f"{DATA[d]} {NAMES[s]}" for d, s in cols) + " |"
    lines = [head, "|---" * (len(cols) + 1) + "|"]
    for rule in ["sgd", "sam", *rules]:
        cells = []
        for col in cols:
            row = results[col].get(rule)
            if row is None:
                cells.append("-")
                continue
            text = f"{row['test_acc_mean']:.2f}"
            if rule not in ("sgd", "sam"):
                text += f" ({margins(results[col])[rule]:+.2f})"
            if collapsed and row.get("collapsed"):
                text += f", {row['collapsed']}/{row['seeds']} coll."
            cells.append(text)
        lines.append(f"| {SHOWN.get(rule, rule)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def collect(root: Path, sub: str) -> dict[tuple[str, str], dict[str, dict]]:
    out = {}
    for data in DATA:
        for setting in SETTINGS:
            folder = root / f"{data}-{setting}" / sub
            if (folder / "summary.json").exists():
                out[(data, setting)] = read(folder)
    return out


def decide(results: dict[tuple[str, str], dict[str, dict]], rules: list[str]) -> str:
    """The decision rule of the page, applied: eligibility on clean labels (widened by 0.5
    point until a candidate other than top is eligible), then the highest worst margin."""
    clean = [results[(d, "clean")] for d in DATA if (d, "clean") in results]
    deficit = {rule: max(r["top"]["test_acc_mean"] - r[rule]["test_acc_mean"] for r in clean)
               for rule in rules if all(rule in r for r in clean)}
    worst = {rule: min(margins(r)[rule] for r in results.values() if rule in r)
             for rule in rules}
    width = 1.0
    while not any(d <= width for rule, d in deficit.items() if rule != "top"):
        width += 0.5
    eligible = [rule for rule, d in deficit.items() if d <= width]
    winner = max(eligible, key=lambda rule: worst[rule])
    lines = ["clean-label deficit to top (worst of the data sets): " + ", ".join(
        f"{SHOWN.get(rule, rule)} {d:.2f}" for rule, d in deficit.items()),
        f"eligible within {width:g} point(s) of top: "
        f"{', '.join(SHOWN.get(r, r) for r in eligible)}",
        "worst margin: " + ", ".join(f"{SHOWN.get(rule, rule)} {w:+.2f}"
                                    for rule, w in worst.items() if not math.isnan(w)),
        f"default: {SHOWN.get(winner, winner)}"]
    return "\n".join(lines)


#: The methods of the chart, in order, with their names there.
CHART = {"sgd": "SGD", "sam": "SAM", "auto": "K-SAM auto (default)", "top": "K-SAM top",
         "auto-either": "K-SAM auto-margin", "stratified": "K-SAM stratified",
         "sample": "K-SAM sample"}


def plot(results: dict[tuple[str, str], dict[str, dict]], path: Path) -> None:
    """One panel per data set and setting: each method's mean test accuracy with its
    min-max over seeds; a dashed line at the better of SGD and SAM."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = [d for d in DATA if any(k[0] == d for k in results)]
    fig, axes = plt.subplots(len(datasets), len(SETTINGS), figsize=(15, 3.6 * len(datasets)),
                             squeeze=False, dpi=110)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, data in enumerate(datasets):
        present = [st for st in SETTINGS if (data, st) in results]
        for ax in axes[i][len(present):]:  # fewer settings confirmed on this data set
            ax.axis("off")
        for j, setting in enumerate(present):
            ax = axes[i][j]
            rows = results[(data, setting)]
            ax.set_title(f"{DATA[data]}, {NAMES[setting]}", fontsize=10)
            shown = [m for m in CHART if m in rows]
            for x, method in enumerate(shown):
                accs = rows[method]["test_acc_all"]
                mean = rows[method]["test_acc_mean"]
                ax.errorbar([x], [mean], yerr=[[mean - min(accs)], [max(accs) - mean]],
                            fmt="o", color=colours[list(CHART).index(method)], capsize=3)
            best = max(rows[m]["test_acc_mean"] for m in ("sgd", "sam") if m in rows)
            ax.axhline(best, ls="--", lw=0.8, color="grey")
            ax.set_xticks(range(len(shown)))
            ax.set_xticklabels([CHART[m] for m in shown], rotation=60, ha="right", fontsize=8)
            ax.grid(axis="y", alpha=0.3)
        axes[i][0].set_ylabel(f"{DATA[data]}\ntest accuracy (%)")
    fig.suptitle("Test accuracy, mean and min-max over 5 seeds, each method at its own held-out "
                 "lr and rho (dashed: the better of SGD and SAM)\nMNIST-1D: 1-D CNN, 30 "
                 "epochs; Fashion-MNIST: small CNN, 5000 images, 40 epochs; K-SAM K = B/4",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--screen", type=Path)
    parser.add_argument("--confirm", type=Path)
    parser.add_argument("--plot", type=Path, help="draw the confirmation's chart here")
    args = parser.parse_args()
    if args.screen:
        results = {}
        for data in DATA:
            for setting in SETTINGS:
                folder = args.screen / f"{data}-{setting}"
                if (folder / "summary.json").exists():
                    results[(data, setting)] = read(folder)
        rules = sorted({r for rows in results.values() for r in rows} - {"sgd", "sam"},
                       key=lambda r: (r != "top", r))
        print("First pass (validation accuracy %, margin to the better of SGD and SAM):\n")
        print(table(results, rules, collapsed=False) + "\n")
    if args.confirm:
        results = collect(args.confirm, "test")
        rules = sorted({r for rows in results.values() for r in rows} - {"sgd", "sam"},
                       key=lambda r: (r != "top", r))
        print("Confirmation (test accuracy %, 5 seeds, margin to the better of SGD and "
              "SAM):\n")
        print(table(results, rules, collapsed=True) + "\n")
        print(decide(results, rules))
        if args.plot:
            plot(results, args.plot)
        long = {k: v for k, v in collect(args.confirm, "test-x4").items()}
        if long:
            print("\n4x the epochs (2 seeds, the lrs chosen for the normal length):\n")
            print(table(long, rules, collapsed=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
