"""How the training losses of clean and mislabelled examples separate during SGD training
(docs/experiments/selection-rules.md, "The auto band").

Trains plain SGD (momentum 0.9, weight decay 5e-4, cosine schedule, batch 128) on MNIST-1D
with label noise and prints after every epoch the test accuracy and, over the whole training
set, the share of examples whose loss is above each threshold (ln 2: label probability below
1/2; ln 10: below chance for 10 classes), for all examples, the clean ones and the
mislabelled ones::

    PYTHONPATH=src OMP_NUM_THREADS=1 python experiments/scripts/noise_losses.py --noise 0.2
    PYTHONPATH=src OMP_NUM_THREADS=1 python experiments/scripts/noise_losses.py --noise 0.3 --pair
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F

import ksam
from ksam.lab.tasks import get_task

THRESHOLDS = (math.log(2), 1.5, math.log(10), 3.0)


def shares(losses: torch.Tensor, mask: torch.Tensor) -> str:
    if not bool(mask.any()):
        return " ".join("    -" for _ in THRESHOLDS)
    return " ".join(f"{100 * (losses[mask] > t).float().mean().item():5.0f}" for t in THRESHOLDS)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--noise", type=float, default=0.2)
    p.add_argument("--pair", action="store_true", help="pair noise (c -> c+1) instead of "
                                                       "symmetric")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(1)
    options = {"label_noise": args.noise} if args.noise else {}
    if args.pair:
        options["label_noise_type"] = "pair"
    task = get_task("mnist1d", seed=0, **options)
    torch.manual_seed(args.seed)
    model = task.make_model()
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    batch = 128
    per_epoch = task.num_train // batch
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.epochs * per_epoch)
    engine = ksam.Plain(model, opt)
    noisy = task.noisy_mask if task.noisy_mask is not None \
        else torch.zeros(task.num_train, dtype=torch.bool)
    order = torch.Generator().manual_seed(args.seed)
    names = " ".join(f"{t:5.2f}" for t in THRESHOLDS)
    print(f"share (%) of training examples with a loss above {names}")
    print("| epoch | step | test acc % | all | clean | mislabelled |")
    print("|---|---|---|---|---|---|")
    for epoch in range(args.epochs):
        perm = torch.randperm(task.num_train, generator=order)
        for i in range(per_epoch):
            rows = perm[i * batch:(i + 1) * batch]
            engine.step((task.train_x[rows], task.train_y[rows]),
                        lambda m, b: F.cross_entropy(m(b[0]), b[1], reduction="none"))
            sched.step()
        model.eval()
        with torch.no_grad():
            losses = F.cross_entropy(model(task.train_x), task.train_y, reduction="none")
            acc = (model(task.test_x).argmax(1) == task.test_y).float().mean().item()
        model.train()
        everyone = torch.ones_like(noisy)
        print(f"| {epoch + 1} | {(epoch + 1) * per_epoch} | {100 * acc:.1f} | "
              f"{shares(losses, everyone)} | {shares(losses, ~noisy)} | {shares(losses, noisy)} |",
              flush=True)


if __name__ == "__main__":
    main()
