"""The confirmation of K-SAM's default rule (docs/experiments/default-rule.md): for one
data set and label setting, every method at its own lr and rho chosen on a held-out 20 % of
the training set whose labels carry the training noise (1 seed, the grid below), then 5
seeds at the chosen values on the clean test set, SGD and SAM in the same command::

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/default_confirm.py mnist1d n20 \\
        --out runs/default-confirm

Writes ``OUT/DATA-SETTING/held-out`` (the grid), ``.../choice.json`` (each method's
chosen spec and its validation accuracy) and ``.../test`` (the 5-seed comparison). Every
command is resumable: a rerun continues where it stopped. ``--epochs-scale 4`` runs the
test at 4x the epochs, at the lrs chosen for the normal length (the long-run check).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
CANDIDATES = [sys.executable, str(HERE / "default_candidates.py")]

#: The data sets as the label-noise pages run them: task flags, epochs, K and the grids.
DATA = {
    "mnist1d": {
        "flags": ["--task", "mnist1d", "--batch-size", "128"], "epochs": 30,
        "k": 32, "lrs": [0.05, 0.1, 0.2], "rhos": [0.05, 0.2],
    },
    "fashion": {
        "flags": ["--task", "fashion-mnist", "--model", "cnn", "--train-subset", "5000",
                  "--batch-size", "128", "--task-option", "augment=false"], "epochs": 40,
        "k": 32, "lrs": [0.0125, 0.025, 0.05], "rhos": [0.05, 0.2],
    },
}
SETTINGS = {
    "clean": [],
    "n5": ["--label-noise", "0.05"],
    "n20": ["--label-noise", "0.2"],
    "n40": ["--label-noise", "0.4"],
    "pair30": ["--label-noise", "0.3", "--task-option", "label_noise_type=pair"],
}


def grid(data: dict, rules: list[str], with_top: bool) -> dict[str, list[str]]:
    """Every method's specs to try on the held-out split, by method name."""
    lrs, rhos, k = data["lrs"], data["rhos"], data["k"]
    out = {"sgd": [f"sgd:lr={lr:g}" for lr in lrs],
           "sam": [f"sam:rho={r:g},lr={lr:g}" for r in rhos for lr in lrs]}
    for rule in (["top"] if with_top else []) + rules:
        out[rule] = [f"ksam:k={k},rho={r:g},select={rule},lr={lr:g}" for r in rhos
                     for lr in lrs]
    return out


def run(args: list[str]) -> None:
    print("+", " ".join(args), flush=True)
    subprocess.run(args, check=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", choices=DATA)
    parser.add_argument("setting", choices=SETTINGS)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rules", nargs="+", default=["stratified", "sample", "auto-either"])
    parser.add_argument("--jobs", type=int, default=1,
                        help="worker processes (the candidates are registered in this "
                        "process only: 1, and run two settings side by side instead)")
    parser.add_argument("--seeds", default="5")
    parser.add_argument("--epochs-scale", type=int, default=1)
    parser.add_argument("--k", type=int, help="K-SAM's K (default: the data set's, B/4)")
    parser.add_argument("--with-top", action="store_true",
                        help="K-SAM's top too (always on clean labels)")
    args = parser.parse_args()
    data, noise = DATA[args.data], SETTINGS[args.setting]
    if args.k is not None:
        data = {**data, "k": args.k}
    folder = args.out / f"{args.data}-{args.setting}"
    common = [*data["flags"], *noise, "--quiet", "--resume", "--jobs", str(args.jobs)]
    specs = grid(data, args.rules, with_top=args.with_top or args.setting == "clean")

    held_out = folder / "held-out"
    run([*CANDIDATES, "compare", *common, "--epochs", str(data["epochs"]),
         "--validation-split", "0.2", "--task-option", "noisy_validation=true",
         "--seeds", "1", "--out", str(held_out),
         "--methods", *[s for group in specs.values() for s in group]])
    rows = {r["method"]: r["test_acc_mean"]
            for r in json.loads((held_out / "summary.json").read_text())["rows"]}
    # The best validation accuracy per method; a tie goes to the first spec of the grid.
    choice = {name: max(group, key=lambda s: (rows[s], -group.index(s)))
              for name, group in specs.items()}
    (folder / "choice.json").write_text(json.dumps(
        {"choice": choice, "validation": {s: rows[s] for g in specs.values() for s in g}},
        indent=1) + "\n")

    test = folder / ("test" if args.epochs_scale == 1 else f"test-x{args.epochs_scale}")
    run([*CANDIDATES, "compare", *common, "--epochs", str(data["epochs"] * args.epochs_scale),
         "--seeds", args.seeds, "--out", str(test), "--methods", *choice.values()])
    return 0


if __name__ == "__main__":
    sys.exit(main())
