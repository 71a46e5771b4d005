"""Looser collapse guards for K-SAM, tried against the default
(docs/experiments/collapse.md, section 5).

The default scales the top-K descent step by s, the estimated full-batch/subset gradient
ratio (``rescale=True``). Variants: ``rescale=0.5`` (s to the power 0.5), ``rescale=False``
(warm-up only), and a cap ``min(1, c*s)`` (at most c times a full-batch-sized step; not an
option of ksam, patched in here because it lost). MNIST-1D CNN (30 epochs, lr 0.1 and 0.2)
and MLP (40 epochs, lr 0.2), K in {32, 16}, batch 128. Runs append to ``--out``.

    OMP_NUM_THREADS=1 python experiments/scripts/guard_variants.py --seeds 0 1 2 3 4 \
        --out runs/g.jsonl
    OMP_NUM_THREADS=1 python experiments/scripts/guard_variants.py --cap 2 --seeds 0 1 2 3 4 ...
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import ksam.selection as selection
from ksam.lab.tasks import get_task
from ksam.lab.train import TrainConfig, train

GRID = (("cnn", (0.1, 0.2), 30), ("mlp", (0.2,), 40))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    ap.add_argument("--cap", type=float, help="run only the capped variant, min(1, cap*s)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.cap:
        full = selection.subset_gradient_scale
        selection.subset_gradient_scale = lambda s, i: (args.cap * full(s, i)).clamp(max=1.0)
    cells = []
    for model, lrs, epochs in GRID:
        for lr in lrs:
            if not args.cap:
                cells.append((model, lr, epochs, "sgd:", {}))
            for k in (32, 16):
                variants = [True] if args.cap else [True, 0.5, False]
                for r in variants:
                    tag = f"cap={args.cap:g}" if args.cap else f"rescale={r}"
                    cells.append((model, lr, epochs, f"ksam:k={k},{tag}",
                                  {"k": k, "rescale": r}))
    done = set()
    if args.out.exists():
        done = {(r["model"], r["lr"], r["spec"], r["seed"])
                for r in map(json.loads, args.out.read_text().splitlines())}
    tasks = {}
    for seed in args.seeds:
        for model, lr, epochs, spec, opts in cells:
            if (model, lr, spec, seed) in done:
                continue
            if (model, seed) not in tasks:
                tasks[(model, seed)] = get_task("mnist1d", model=model, device="cpu", seed=seed)
            cfg = TrainConfig(task="mnist1d", method=spec.split(":")[0], method_options=opts,
                              epochs=epochs, batch_size=128, lr=lr, device="cpu", seed=seed,
                              task_options={"model": model})
            t0 = time.perf_counter()
            acc = train(cfg, task=tasks[(model, seed)])["final"]["test_acc"]
            rec = {"model": model, "lr": lr, "spec": spec, "seed": seed, "acc": acc,
                   "wall": time.perf_counter() - t0}
            with args.out.open("a") as f:
                f.write(json.dumps(rec) + "\n")
            print(rec, flush=True)


if __name__ == "__main__":
    main()
