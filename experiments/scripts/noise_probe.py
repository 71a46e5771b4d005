"""Which examples a selection rule trains on under label noise
(docs/experiments/selection-rules.md).

Trains K-SAM (K = B/4, the default guard) on MNIST-1D (rho 0.02) or on the Fashion-MNIST CNN
setting of the ``fashion-cnn-*`` presets (``--task fashion-cnn``: 5000-image subset, no
augmentation, rho 0.1) with symmetric or pair label noise and prints, every few epochs, the
share of mislabelled examples in the batch (the noise rate) and in the descent subset, the
mean rank (in the batch's loss order, 0 = largest) of the subset's first row - the skip of
a band rule - and the test accuracy; with ``--per-class``, after the last epoch, each true
class's test accuracy and its share predicted as the pair label c+1. The extra rule variants of
``experiments/scripts/rule_variants.py`` are known by name too::

    PYTHONPATH=src OMP_NUM_THREADS=1 python experiments/scripts/noise_probe.py --noise 0.2 \\
        --select top band median
    PYTHONPATH=src OMP_NUM_THREADS=1 python experiments/scripts/noise_probe.py --noise 0 --lr 0.2 \\
        --select chance10 auto
    PYTHONPATH=src OMP_NUM_THREADS=1 python experiments/scripts/noise_probe.py --task fashion-cnn \\
        --noise 0.3 --noise-type pair --lr 0.025 --epochs 40 --select top stratified median \\
        --per-class
"""

from __future__ import annotations

import argparse

import rule_variants  # experiments/scripts/: the extra rule variants, by name
import torch
import torch.nn.functional as F

import ksam
from ksam.lab.tasks import get_task

# task name -> (get_task arguments, K-SAM's rho there)
SETTINGS = {
    "mnist1d": ({"name": "mnist1d"}, 0.02),
    "fashion-cnn": ({"name": "fashion-mnist", "model": "cnn", "augment": False,
                     "train_subset": 5000}, 0.1),
}


def per_class(model: torch.nn.Module, task) -> str:
    """Test accuracy of each true class, and how many of a class's test examples the model
    labels with its pair neighbour c+1 (the label pair noise gives it)."""
    model.eval()
    with torch.no_grad():
        pred = model(task.test_x).argmax(1)
    model.train()
    cells = []
    for c in range(task.num_classes):
        rows = task.test_y == c
        right = (pred[rows] == c).float().mean().item()
        pair = (pred[rows] == (c + 1) % task.num_classes).float().mean().item()
        cells.append(f"{c}: {100 * right:.0f} / {100 * pair:.0f}")
    return ", ".join(cells)


def probe(select: str, noise: float, epochs: int, lr: float, seed: int,
          setting: str = "mnist1d", noise_type: str = "symmetric",
          classes: bool = False) -> list[str]:
    options, rho = SETTINGS[setting]
    task = get_task(**options, label_noise=noise, label_noise_type=noise_type, seed=0)
    torch.manual_seed(seed)
    model = task.make_model()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    batch = 128
    per_epoch = task.num_train // batch
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * per_epoch)
    eng = ksam.KSAM(model, opt, k=32, rho=rho, select=select, seed=seed)
    order = torch.Generator().manual_seed(seed)
    noisy = task.noisy_mask if task.noisy_mask is not None \
        else torch.zeros(task.num_train, dtype=torch.bool)
    lines = []
    for epoch in range(epochs):
        perm = torch.randperm(task.num_train, generator=order)
        shares, firsts = [], []
        for i in range(per_epoch):
            rows = perm[i * batch:(i + 1) * batch]
            result = eng.step((task.train_x[rows], task.train_y[rows]),
                              lambda m, b: F.cross_entropy(m(b[0]), b[1], reduction="none"))
            sched.step()
            picked = rows[result.descent_indices]
            shares.append(noisy[picked].float().mean().item())
            # rank of every row in the batch's loss order at w (0 = largest loss)
            rank = torch.empty(batch, dtype=torch.long)
            rank[ksam.selection.descending_order(result.losses)] = torch.arange(batch)
            firsts.append(rank[result.descent_indices].min().item())
        if epoch % 5 == 4 or epoch == epochs - 1 or epoch == 6:
            model.eval()
            with torch.no_grad():
                acc = (model(task.test_x).argmax(1) == task.test_y).float().mean().item()
            model.train()
            lines.append(f"| {select} | {epoch + 1} | {100 * sum(shares) / len(shares):.0f} % "
                         f"| {sum(firsts) / len(firsts):.1f} | {100 * acc:.1f} |")
    if classes:
        lines.append(f"{select}, epoch {epochs}, test % per true class c "
                     f"(right / labelled c+1): {per_class(model, task)}")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", choices=sorted(SETTINGS), default="mnist1d")
    p.add_argument("--noise", type=float, default=0.2)
    p.add_argument("--noise-type", choices=["symmetric", "pair"], default="symmetric")
    p.add_argument("--select", nargs="+", default=["top", "band", "median"])
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--per-class", action="store_true",
                   help="after the last epoch, each true class's test accuracy and its share "
                        "labelled c+1 (the pair label)")
    args = p.parse_args()
    torch.set_num_threads(1)
    ksam.selection.RULES.update(rule_variants.EXTRA)
    print(f"{args.task}, {args.noise_type} noise {args.noise:g}: "
          f"mislabelled share of the batch = {args.noise:.0%}")
    print("| rule | epoch | mislabelled share of the descent subset | first rank | test acc % |")
    print("|---|---|---|---|---|")
    for select in args.select:
        for line in probe(select, args.noise, args.epochs, args.lr, args.seed, args.task,
                          args.noise_type, args.per_class):
            print(line, flush=True)


if __name__ == "__main__":
    main()
