"""Property: the eager and the sync-free executor make the same steps, bit for bit.

Random sequences of steps (methods, batch sizes with a short last batch, NaN injections, a
state_dict save and load into fresh objects mid-run, LR scheduler steps) run through an
eager engine and a ``fast_path=True`` one on the CPU. The fast path steps the optimizer
with torch's fused kernel, which rounds differently from the default one, so the eager
engine here is given a ``fused=True`` optimizer: with the same kernel the two executors
must agree exactly - weights, BatchNorm statistics, momentum, losses, selections, skips.
"""

from __future__ import annotations

import copy
import random

import pytest
import torch
from conftest import ce
from torch import nn

import ksam

METHODS = {
    "sgd": {},
    "sam": {"rho": 0.1},
    "asam": {"rho": 0.5},
    "ksam": {"k": 0.5, "k_warmup": 1},
    "osgd": {"k": 0.5},
}


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


class Run:
    """One engine with its model, optimizer and scheduler, rebuilt from a saved state."""

    def __init__(self, method: str, fast: bool, schedule: str, state: dict | None = None):
        self.method, self.fast, self.schedule = method, fast, schedule
        self.model = net()
        # eager: the fused kernel the fast path switches to; fast: the default optimizer
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.2, momentum=0.9,
                                   weight_decay=1e-3, **({} if fast else {"fused": True}))
        self.engine = ksam.create(method, self.model, self.opt, seed=3, fast_path=fast,
                                  **METHODS[method])
        if schedule == "step":
            self.sched = torch.optim.lr_scheduler.StepLR(self.opt, step_size=2, gamma=0.5)
        elif schedule == "cosine":
            self.sched = torch.optim.lr_scheduler.CosineAnnealingLR(self.opt, T_max=7)
        else:
            self.sched = None
        if state is not None:
            self.model.load_state_dict(state["model"])
            self.engine.load_state_dict(state["engine"])
            if self.sched is not None:
                self.sched.load_state_dict(state["sched"])

    def save(self) -> dict:
        return copy.deepcopy({"model": self.model.state_dict(),
                              "engine": self.engine.state_dict(),
                              "sched": self.sched.state_dict() if self.sched else None})

    def step(self, batch):
        result = self.engine.step(batch, ce)
        if self.sched is not None:
            self.sched.step()
        return (repr(result.loss), result.skipped, result.ascent_indices.tolist(),
                result.descent_indices.tolist())

    def reload(self) -> Run:
        return Run(self.method, self.fast, self.schedule, self.save())


def batches(sizes: list[int], nan_at: set[int], seed: int):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, n in enumerate(sizes):
        x, y = torch.randn(n, 5, generator=g), torch.randint(0, 3, (n,), generator=g)
        if i in nan_at:
            x[int(torch.randint(0, n, (), generator=g))] = float("nan")
        out.append((x, y))
    return out


def sequence(seed: int) -> dict:
    """A random step sequence, drawn from ``seed``."""
    r = random.Random(seed)
    steps = r.randint(3, 6)
    full = r.choice([8, 12, 16])
    sizes = [full] * (steps - 1) + [r.randint(4, full - 1)]  # an epoch's short last batch
    return {
        "method": r.choice(sorted(METHODS)),
        "schedule": r.choice(["none", "step", "cosine"]),
        "sizes": sizes,
        "nan_at": set(r.sample(range(steps), r.randint(0, 2))),
        "reload_at": r.choice([None] + list(range(1, steps))),
        "seed": r.randrange(2**16),
    }


CASES = 25


def test_the_cases_cover_every_method_and_event():
    cases = [sequence(i) for i in range(CASES)]
    assert {c["method"] for c in cases} == set(METHODS)
    assert {c["schedule"] for c in cases} == {"none", "step", "cosine"}
    assert sum(c["reload_at"] is not None for c in cases) >= 5
    assert sum(bool(c["nan_at"]) for c in cases) >= 5


@pytest.mark.parametrize("seed", range(CASES))
def test_eager_and_fast_path_make_the_same_steps(seed):
    case = sequence(seed)
    eager = Run(case["method"], False, case["schedule"])
    fast = Run(case["method"], True, case["schedule"])
    for i, batch in enumerate(batches(case["sizes"], case["nan_at"], case["seed"])):
        if i == case["reload_at"]:
            eager, fast = eager.reload(), fast.reload()
        a, b = eager.step(batch), fast.step(batch)
        assert a == b, (i, a, b)
        assert a[1] == (i in case["nan_at"])  # exactly the poisoned steps are skipped
    assert fast.engine.fast_path_active
    assert eager.engine.steps == fast.engine.steps == len(case["sizes"])
    assert eager.engine.skipped_steps == fast.engine.skipped_steps == len(case["nan_at"])
    for (k, v), w in zip(eager.model.state_dict().items(), fast.model.state_dict().values()):
        assert torch.equal(v, w), k
    for p, q in zip(eager.model.parameters(), fast.model.parameters()):
        assert torch.equal(eager.opt.state[p]["momentum_buffer"],
                           fast.opt.state[q]["momentum_buffer"])
    lr = fast.opt.param_groups[0]["lr"]
    assert lr.dtype == torch.float64 and float(lr) == eager.opt.param_groups[0]["lr"]
