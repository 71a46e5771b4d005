"""Why does top-K training collapse? Train with the engine and record, per step, what the
selection does to the network.

Per step it records: batch-mean loss vs the selected subset's mean loss at w, the ascent and
descent gradient norms, the fraction of selected examples that are misclassified, the share of
dead ReLU units (zero on every example of the batch), the fraction of the network's outputs
that predict one class, and per epoch the overlap of the selected examples with the previous
epoch's selection. Writes ``<out>/<label>.json`` and a PNG of the traces (its legend names
each method as the comparison charts do, :func:`ksam.lab.compare.short_label`; ``--replot``
redraws the PNG from the JSON files of an earlier run).

    OMP_NUM_THREADS=1 python experiments/scripts/collapse_probe.py --model mlp --lr 0.2 \
        --methods ksam-plain:k=16 sgd --epochs 100 --seeds 0 1 --out runs/probe
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import ksam
from ksam.lab.compare import parse_method_spec, short_labels, task_text
from ksam.lab.tasks import get_task


def probe(model_name: str, method: str, lr: float, epochs: int, seed: int,
          train_subset: int | None = None, wd: float = 5e-4) -> dict[str, Any]:
    """One run like :func:`ksam.train.train` (same init, data order, optimizer and cosine
    schedule), instrumented per step."""
    torch.manual_seed(seed)
    task = get_task("mnist1d", model=model_name, device="cpu", seed=seed,
                    train_subset=train_subset)
    torch.manual_seed(seed)
    model = task.make_model()
    name, opts = parse_method_spec(method)
    n, bs = task.num_train, 128
    steps_per_epoch = n // bs
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=wd)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps_per_epoch * epochs)
    engine = ksam.create(name, model, opt, seed=seed, **opts)
    data_gen = torch.Generator().manual_seed(seed + 1)

    relus = [m for m in model.modules() if isinstance(m, nn.ReLU)]
    acts: list[Tensor] = []
    hooks = [r.register_forward_hook(lambda _m, _i, out: acts.append(out.detach()))
             for r in relus]
    seen: dict[str, Any] = {}

    def loss_fn(m: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        acts.clear()
        logits = m(x)
        if not torch.is_grad_enabled() or len(x) == bs:  # a pass over the whole batch at w
            if "pred" not in seen:
                seen["pred"] = logits.detach().argmax(1)
                seen["dead"] = [float((a.flatten(2) if a.dim() > 2 else a).amax(0).le(0)
                                      .float().mean()) for a in acts]
        return F.cross_entropy(logits, y, reduction="none")

    descent_norm: list[float] = []
    base_step = opt.step

    def step_with_norm(*a: Any, **k: Any) -> Any:
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        descent_norm.append(float(torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))))
        return base_step(*a, **k)

    opt.step = step_with_norm  # type: ignore[method-assign]
    rows: list[dict[str, float]] = []
    epochs_out: list[dict[str, float]] = []
    prev_sel: set[int] | None = None
    for epoch in range(epochs):
        order = torch.randperm(n, generator=data_gen)
        sel_ids: list[int] = []
        for i in range(steps_per_epoch):
            idx = order[i * bs:(i + 1) * bs]
            xb, yb = task.train_x[idx], task.train_y[idx]
            seen.clear()
            res = engine.step((xb, yb), loss_fn)
            d = res.descent_indices
            losses = res.losses
            pred = seen.get("pred")
            wrong = (pred != yb).float() if pred is not None else torch.full_like(yb, math.nan,
                                                                                  dtype=torch.float)
            sel_ids += idx[d].tolist()
            rows.append({
                "step": len(rows), "lr": float(sched.get_last_lr()[0]),
                "loss_batch": float(losses.mean()) if losses is not None else res.loss,
                "loss_selected": float(losses[d].mean()) if losses is not None else res.loss,
                "loss_std": float(losses.std()) if losses is not None else math.nan,
                "ascent_norm": float(res.ascent_grad_norm)
                if res.ascent_grad_norm is not None else math.nan,
                "descent_norm": descent_norm[-1] if descent_norm else math.nan,
                "wrong_batch": float(wrong.mean()),
                "wrong_selected": float(wrong[d].mean()),
                "top_class_share": float(torch.bincount(pred, minlength=10).max()) / len(yb)
                if pred is not None else math.nan,
                "dead_relu": max(seen.get("dead", [math.nan])),
                "k": int(d.numel()),
            })
            sched.step()
        cur = set(sel_ids)
        model.eval()
        with torch.no_grad():
            acc = float((model(task.test_x).argmax(1) == task.test_y).float().mean()) * 100
        model.train()
        epochs_out.append({"epoch": epoch + 1, "test_acc": acc,
                           "distinct_selected": len(cur) / n,
                           "overlap_prev": len(cur & prev_sel) / max(1, len(cur))
                           if prev_sel is not None else math.nan})
        prev_sel = cur
    for h in hooks:
        h.remove()
    return {"model": model_name, "method": method, "lr": lr, "seed": seed,
            "steps": rows, "epochs": epochs_out, "final_acc": epochs_out[-1]["test_acc"]}


def plot(runs: list[dict[str, Any]], path: Path, title: str, window: int = 10) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [("test_acc", "test accuracy (%)"), ("loss_selected", "selected-subset loss"),
            ("loss_batch", "batch-mean loss"), ("descent_norm", "descent grad norm"),
            ("wrong_selected", "selected: misclassified"), ("dead_relu", "dead ReLU share"),
            ("top_class_share", "share predicted as top class"),
            ("overlap_prev", "selection overlap w/ prev epoch")]
    fig, axes = plt.subplots(2, 4, figsize=(16, 6.5))
    methods = list(dict.fromkeys(r["method"] for r in runs))
    names = dict(zip(methods, short_labels(methods)))
    for ax, (key, label) in zip(axes.flat, keys):
        for r in runs:
            lab = f"{names[r['method']]}, seed {r['seed']}: {r['final_acc']:.1f} %"
            if key in ("test_acc", "overlap_prev"):
                xs = [e["epoch"] * len(r["steps"]) / len(r["epochs"]) for e in r["epochs"]]
                ys = [e[key] for e in r["epochs"]]
            else:
                v = torch.tensor([s[key] for s in r["steps"]], dtype=torch.float64)
                if len(v) >= window:
                    v = v.unfold(0, window, 1).nanmean(1)
                xs, ys = list(range(window - 1, window - 1 + len(v))), v.tolist()
            ax.plot(xs, ys, label=lab, lw=1)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        if key == "descent_norm":
            ax.set_yscale("log")
    # Under the panels, not over a panel's lines.
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=9,
               title="final test accuracy", title_fontsize=9, frameon=False)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.04 + 0.035 * math.ceil(len(labels) / 4), 1, 1))
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="mlp", choices=["cnn", "mlp"])
    ap.add_argument("--methods", nargs="+", default=["ksam-plain:k=16"])
    ap.add_argument("--lr", type=float, default=0.2)
    ap.add_argument("--epochs", type=int, default=100)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--train-subset", type=int, default=None)
    ap.add_argument("--out", default="runs/probe")
    ap.add_argument("--png", default=None)
    ap.add_argument("--replot", action="store_true",
                    help="train nothing: redraw the PNG from the runs' JSON files in --out")
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = []
    for method in args.methods:
        for seed in args.seeds:
            label = f"{args.model}_lr{args.lr}_{method.replace(':', '_')}_s{seed}"
            if args.replot:
                r = json.loads((out / f"{label}.json").read_text())
            else:
                r = probe(args.model, method, args.lr, args.epochs, seed, args.train_subset)
                (out / f"{label}.json").write_text(json.dumps(r))
            print(f"{label}: final {r['final_acc']:.1f}%", flush=True)
            runs.append(r)
    png = Path(args.png) if args.png else out / f"{args.model}_lr{args.lr}.png"
    data = task_text({"task": "mnist1d", "task_options": {"model": args.model}})
    plot(runs, png, f"{data}: lr {args.lr}, batch 128, {len(args.seeds)} seed"
                    f"{'s' if len(args.seeds) != 1 else ''}, {args.epochs} epochs")


if __name__ == "__main__":
    main()
