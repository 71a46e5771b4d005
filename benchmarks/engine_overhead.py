"""The engine's cost over a hand-written loop of the same algorithm, measured side by side.

For SGD, SAM and K-SAM (the paper's rule, K = B/4 and B/8) on the CPU bench cases of ``ksam bench``
(the 1-D CNN and the small ResNet, batch 128), each algorithm runs twice on copies of one
model: through ``ksam.create(...).step`` and as a plain PyTorch loop written out below
(BatchNorm statistics updated only in the first full-batch pass, as the engine does; one
host read of the loss per step, as the engine's one sync). The six loops are interleaved
round-robin, step by step, so a busy neighbour or a drifting clock hits all alike; the
figure is the median step time, and each row prints engine / hand-written.

    OMP_NUM_THREADS=1 python benchmarks/engine_overhead.py --steps 60 --warmup 5
"""

from __future__ import annotations

import argparse
import copy
import functools
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import ksam
from ksam.lab.bench import cases

RHO = 0.05
#: K-SAM's subset sizes, as fractions of the batch.
K_FRACTIONS = {"B/4": 1 / 4, "B/8": 1 / 8}


def per_sample(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y, reduction="none")


class FrozenBN:
    """BatchNorm layers normalize with the batch but leave their running statistics."""

    def __init__(self, model: nn.Module) -> None:
        self.layers = [m for m in model.modules() if isinstance(m, _BatchNorm)]

    def __enter__(self) -> None:
        for m in self.layers:
            m.track_running_stats = False

    def __exit__(self, *exc: object) -> None:
        for m in self.layers:
            m.track_running_stats = True


def hand_sgd(model, opt, batch, frozen):
    opt.zero_grad(set_to_none=True)
    loss = per_sample(model, batch).mean()
    loss.backward()
    opt.step()
    return loss.item()


def _sam_from(model, opt, params, frozen, sub, loss_at_w):
    """Ascent gradient in .grad -> eps, descent on ``sub`` at w+eps, restore, step."""
    grads = [p.grad for p in params]
    norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        torch._foreach_mul_(grads, RHO / (norm + 1e-12))
        torch._foreach_add_(params, grads)
    opt.zero_grad(set_to_none=True)
    with frozen:
        per_sample(model, sub).mean().backward()
    with torch.no_grad():
        torch._foreach_copy_(params, saved)
    opt.step()
    return loss_at_w.item()


def hand_sam(model, opt, batch, frozen):
    params = [p for p in model.parameters() if p.requires_grad]
    opt.zero_grad(set_to_none=True)
    loss = per_sample(model, batch).mean()
    loss.backward()
    return _sam_from(model, opt, params, frozen, batch, loss)


def hand_ksam(model, opt, batch, frozen, fraction):
    params = [p for p in model.parameters() if p.requires_grad]
    x, y = batch
    k = max(1, round(fraction * x.shape[0]))
    with torch.no_grad():
        scores = per_sample(model, batch)
    top = torch.sort(scores, descending=True, stable=True).indices[:k]
    sub = (x.index_select(0, top), y.index_select(0, top))
    opt.zero_grad(set_to_none=True)
    with frozen:
        per_sample(model, sub).mean().backward()
    return _sam_from(model, opt, params, frozen, sub, scores.mean())


#: Each algorithm of the table: its method name and options in ksam, and its loop by hand.
ALGORITHMS = {"sgd": ("sgd", {}, hand_sgd), "sam": ("sam", {"rho": RHO}, hand_sam)}
ALGORITHMS.update({f"ksam-plain {k}": ("ksam-plain", {"rho": RHO, "k": f},
                                       functools.partial(hand_ksam, fraction=f))
                   for k, f in K_FRACTIONS.items()})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cases", nargs="+", default=["mnist1d-cnn-b128", "fashion-resnet-b128"])
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    print(f"torch {torch.__version__}, CPU, {torch.get_num_threads()} thread(s), "
          f"median of {args.steps} steps after {args.warmup}, interleaved")
    print("| case | method | engine ms | hand-written ms | engine / hand | max weight diff |")
    print("|---|---|---|---|---|---|")
    for case in [c for c in cases(False, device) if c.name in args.cases]:
        torch.manual_seed(0)
        base = case.make_model().to(device)
        batch = case.make_batch(case.batch_size, device)
        loops, models = {}, {}
        for name, (method, kwargs, by_hand) in ALGORITHMS.items():
            m_engine, m_hand = copy.deepcopy(base), copy.deepcopy(base)
            o_engine = torch.optim.SGD(m_engine.parameters(), lr=0.01, momentum=0.9)
            o_hand = torch.optim.SGD(m_hand.parameters(), lr=0.01, momentum=0.9)
            engine = ksam.create(method, m_engine, o_engine, seed=0, **kwargs)
            hand = functools.partial(by_hand, m_hand, o_hand, batch, FrozenBN(m_hand))
            loops[(name, "engine")] = functools.partial(engine.step, batch, per_sample)
            loops[(name, "hand")] = hand
            models[name] = (m_engine, m_hand)
        times: dict = {key: [] for key in loops}
        for i in range(args.warmup + args.steps):
            for key, fn in loops.items():
                start = time.perf_counter()
                fn()
                if i >= args.warmup:
                    times[key].append(time.perf_counter() - start)
        for name in ALGORITHMS:
            e = statistics.median(times[(name, "engine")]) * 1e3
            h = statistics.median(times[(name, "hand")]) * 1e3
            # Both ran the same algorithm on the same batches: their weights agree up to
            # float summation order.
            diff = max(float((a - b).detach().abs().max()) for a, b in zip(
                models[name][0].parameters(), models[name][1].parameters()))
            print(f"| {case.name} | {name} | {e:.2f} | {h:.2f} | {e / h:.3f} | {diff:.1e} |",
                  flush=True)


if __name__ == "__main__":
    main()
