"""What a step costs (:mod:`ksam.cost`): for every method, the forward and backward rows
:func:`ksam.cost.step_rows` reads from the plan equal the rows the engine's passes run,
counted step by step on the model; the schedule's decisions known before a run; the most
steps a budget of example passes buys."""

from __future__ import annotations

import pytest
import torch
from conftest import ce, ce_logits, sgd
from torch import nn

import ksam
from ksam.cost import run_passes, sharp_steps, step_rows, steps_within
from ksam.plan import StepPlan
from ksam.selection import WholeBatch

#: rows through the model's forward and backward, counted by :class:`Counted`
ROWS = {"forward": 0, "backward": 0}


class _CountBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        ROWS["backward"] += grad.shape[0]
        return grad


class Counted(nn.Module):
    """A model that counts the rows of every forward through it and of every backward into
    its output (a copy of it, MESA's average, counts into the same place)."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        # 8 parameter tensors: ESAM's mask leaves all of them out with probability 0.4^8
        self.inner = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(),
                                   nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4))

    def forward(self, x):
        ROWS["forward"] += x.shape[0]
        out = self.inner(x)
        return _CountBackward.apply(out) if torch.is_grad_enabled() else out


N, STEPS, EXAMPLES = 16, 8, 64

#: every method, with options that exercise its schedule, warm-up, term or memory in 8 steps
CASES = [
    ("sgd", {}),
    ("sam", {}),
    ("asam", {}),
    ("ksam", {"k": 4, "k_warmup": 2}),
    ("ksam-plain", {"k": 4}),
    ("random-sam", {"k_ascent": 4}),
    ("esam", {}),
    ("esam", {"micro_batch_size": 8}),
    ("osgd", {"k": 4}),
    ("osgd", {"k": 4, "k_warmup": 3}),
    ("msam", {}),
    ("looksam", {"interval": 3}),
    ("sam-late", {"start_step": 5}),
    ("rst", {"p": 0.5}),
    ("ksam", {"k": 4, "p": 0.5, "start_step": 2}),
    ("saf", {"start_epoch": 0, "delay": 1}),
    ("mesa", {"start_step": 3}),
    ("ksam", {"k": 4, "k_warmup": 2, "scores": "memory"}),
    ("ksam", {"k": 4, "k_ascent": 2, "scores": "memory", "select": "stratified"}),
    ("osgd", {"k": 4, "scores": "memory"}),
]


def _id(case) -> str:
    name, options = case
    return name + "".join(f"-{k}={v}" for k, v in options.items())


def _batches():
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(EXAMPLES, 6, generator=g), torch.randint(0, 4, (EXAMPLES,), generator=g)
    for step in range(STEPS):
        idx = torch.arange(step * N, (step + 1) * N) % EXAMPLES
        yield ksam.IndexedBatch((x[idx], y[idx]), idx)


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_step_rows_are_the_rows_the_engine_runs(case):
    name, options = case
    model = Counted()
    if name == "saf" or options.get("scores") == "memory":
        options = {**options, "num_examples": EXAMPLES}
    eng = ksam.create(name, model, sgd(model), seed=3, **options)
    loss_fn = ce_logits if eng.plan.term is not None else ce
    counted, told, decisions = [], [], []
    for step, batch in enumerate(_batches()):
        before = dict(ROWS)
        result = eng.step(batch, loss_fn)
        counted.append((ROWS["forward"] - before["forward"],
                        ROWS["backward"] - before["backward"]))
        rows = step_rows(eng.plan, N, step, result.sharp,
                         micro_batch_size=options.get("micro_batch_size"))
        told.append((rows.forward, rows.backward))
        decisions.append(result.sharp)
    assert told == counted
    known = sharp_steps(eng.plan, STEPS, seed=3)
    assert known is not None and list(known) == decisions
    assert run_passes(eng.plan, N, STEPS, seed=3,
                      micro_batch_size=options.get("micro_batch_size")) == \
        sum(f + 2 * b for f, b in counted)


def test_what_the_methods_cost_in_passes():
    def passes(name, step=10, sharp=True, **options):
        model = Counted()
        if name == "saf" or options.get("scores") == "memory":
            options["num_examples"] = EXAMPLES
        plan = ksam.create(name, model, sgd(model), **options).plan
        return step_rows(plan, 32, step, sharp).passes

    assert passes("sgd") == 3 * 32 and passes("msam") == 3 * 32 and passes("saf") == 3 * 32
    assert passes("sam") == 6 * 32 and passes("esam") == 6 * 32
    assert passes("mesa") == 4 * 32 and passes("mesa", step=0, start_step=1) == 3 * 32
    assert passes("ksam-plain", k=8) == 32 + 3 * 8 + 3 * 8
    assert passes("ksam", k=8, step=0) == 32 + 3 * 8 + 3 * 32  # the descent's warm-up
    assert passes("ksam", k=8, step=100) == 32 + 3 * 8 + 3 * 16
    assert passes("ksam", k=8, step=200) == 32 + 3 * 8 + 3 * 8
    assert passes("ksam", k=8, step=200, scores="memory") == 3 * 8 + 3 * 8
    assert passes("osgd", k=8) == 32 + 3 * 8
    assert passes("random-sam", k_ascent=8) == 3 * 8 + 3 * 32
    assert passes("looksam", sharp=False) == 3 * 32
    assert passes("ksam", k=8, step=200, sharp=False) == 32 + 3 * 8  # a plain step


def test_a_budget_buys_the_most_steps_that_fit_it():
    sgd_plan = StepPlan(None, None, WholeBatch())
    model = Counted()
    sam = ksam.create("sam", model, sgd(model)).plan
    budget = run_passes(sgd_plan, 32, 100)
    assert budget == 100 * 3 * 32
    assert steps_within(sgd_plan, 32, budget) == 100
    assert steps_within(sam, 32, budget) == 50
    assert steps_within(sam, 32, budget - 1) == 49
    late = ksam.create("sam-late", model, sgd(model), start_step=40).plan
    # 40 plain steps (3B) then sharp ones (6B): 40 * 96 + 30 * 192 = 9600
    assert steps_within(late, 32, budget) == 70
    for plan in (sam, late):
        steps = steps_within(plan, 32, budget)
        used = run_passes(plan, 32, steps)
        assert used <= budget < run_passes(plan, 32, steps + 1)


def test_a_schedule_drawn_with_other_draws_has_an_expected_cost():
    model = Counted()
    plan = ksam.create("random-sam", model, sgd(model), k_ascent=8, p=0.5).plan
    assert sharp_steps(plan, 4, seed=0) is None  # its subsets draw from the same generator
    sharp = step_rows(plan, 32, 0, True).passes
    plain = step_rows(plan, 32, 0, False).passes
    assert run_passes(plan, 32, 10) == 10 * (sharp + plain) / 2
