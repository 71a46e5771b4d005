"""Stress test of K-SAM's collapse guard: plain K-SAM vs the default, SGD and SAM beside.

Grid: MNIST-1D CNN and MLP, K in {B/4, B/8, B/16}, lr in {0.1, 0.2, 0.4}. A run *collapses*
when its final test accuracy is more than 10 points below SGD's mean for the same (model, lr).
Runs are appended to ``<out>/runs.jsonl`` as they finish (re-running skips finished ones), so
the grid can be spread over several sessions; ``--budget-min`` stops launching new runs.

    OMP_NUM_THREADS=1 python experiments/scripts/stress.py --seeds 0 1 --cnn-epochs 20 \
        --mlp-epochs 40 --out runs/stress --table runs/stress/table.md
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from ksam.lab.compare import COLLAPSE_MARGIN
from ksam.lab.tasks import get_task
from ksam.lab.train import TrainConfig, train

BATCH = 128


def cells(models: list[str], lrs: list[float], ks: list[int]) -> list[tuple[str, float, str]]:
    """(model, lr, method spec) in the order they run: references first."""
    out = []
    for model in models:
        for lr in lrs:
            out += [(model, lr, "sgd"), (model, lr, "sam")]
            for k in ks:
                out += [(model, lr, f"ksam-plain:k={k}"), (model, lr, f"ksam:k={k}")]
    return out


def run_one(model: str, lr: float, spec: str, seed: int, epochs: int,
            tasks: dict[tuple[str, int], Any]) -> dict[str, Any]:
    name, _, rest = spec.partition(":")
    opts = {kv.split("=")[0]: int(kv.split("=")[1]) for kv in rest.split(",") if kv}
    if (model, seed) not in tasks:
        tasks[(model, seed)] = get_task("mnist1d", model=model, device="cpu", seed=seed)
    cfg = TrainConfig(task="mnist1d", method=name, method_options=opts, epochs=epochs,
                      batch_size=BATCH, lr=lr, device="cpu", seed=seed,
                      task_options={"model": model})
    t0 = time.perf_counter()
    r = train(cfg, task=tasks[(model, seed)])
    return {"model": model, "lr": lr, "method": spec, "seed": seed, "epochs": epochs,
            "test_acc": r["final"]["test_acc"], "train_time": r["final"]["train_time"],
            "wall_s": time.perf_counter() - t0}


def table(runs: list[dict[str, Any]]) -> str:
    """Markdown: one row per (model, lr, method); collapse count and accuracy."""
    lines = ["| model | lr | method | seeds | collapsed | acc mean ± std | acc min | "
             "acc of non-collapsed |",
             "|---|---|---|---|---|---|---|---|"]
    def order(key: tuple[str, float, str]) -> tuple:
        model, lr, method = key
        name, _, k = method.partition(":k=")
        rank = {"sgd": 0, "sam": 1}.get(name, 2)
        return (model, lr, rank, -int(k or 0), name != "ksam-plain")

    keys = sorted(dict.fromkeys((r["model"], r["lr"], r["method"]) for r in runs), key=order)
    for model, lr, method in keys:
        accs = [r["test_acc"] for r in runs
                if (r["model"], r["lr"], r["method"]) == (model, lr, method)]
        sgd = [r["test_acc"] for r in runs if (r["model"], r["lr"], r["method"]) ==
               (model, lr, "sgd")]
        ref = statistics.fmean(sgd) if sgd else math.nan
        bad = [a < ref - COLLAPSE_MARGIN for a in accs]
        ok = [a for a, b in zip(accs, bad) if not b]
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        ok_txt = f"{statistics.fmean(ok):.1f}" if ok else "-"
        lines.append(f"| {model} | {lr} | {method} | {len(accs)} | {sum(bad)}/{len(accs)} | "
                     f"{statistics.fmean(accs):.1f} ± {std:.1f} | {min(accs):.1f} | {ok_txt} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["cnn", "mlp"])
    ap.add_argument("--lrs", nargs="+", type=float, default=[0.1, 0.2, 0.4])
    ap.add_argument("--ks", nargs="+", type=int, default=[BATCH // 4, BATCH // 8, BATCH // 16])
    ap.add_argument("--seeds", nargs="+", type=int, default=list(range(10)))
    ap.add_argument("--cnn-epochs", type=int, default=30)
    ap.add_argument("--mlp-epochs", type=int, default=60)
    ap.add_argument("--budget-min", type=float, default=math.inf,
                    help="launch no new run after this many minutes")
    ap.add_argument("--out", default="runs/stress")
    ap.add_argument("--table", default=None, help="also write the Markdown table here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "runs.jsonl"
    runs = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    done = {(r["model"], r["lr"], r["method"], r["seed"], r["epochs"]) for r in runs}
    tasks: dict[tuple[str, int], Any] = {}
    start = time.perf_counter()
    for seed in args.seeds:
        for model, lr, spec in cells(args.models, args.lrs, args.ks):
            epochs = args.cnn_epochs if model == "cnn" else args.mlp_epochs
            if (model, lr, spec, seed, epochs) in done:
                continue
            if (time.perf_counter() - start) / 60 > args.budget_min:
                break
            r = run_one(model, lr, spec, seed, epochs, tasks)
            runs.append(r)
            with log.open("a") as f:
                f.write(json.dumps(r) + "\n")
            print(f"{model} lr={lr} {spec} seed={seed}: {r['test_acc']:.1f}% "
                  f"({r['wall_s']:.0f}s)", flush=True)
    text = table(runs)
    print(text)
    if args.table:
        Path(args.table).write_text(text)


if __name__ == "__main__":
    main()
