"""Comparisons at equal cost (``ksam compare --budget``): every method gets the compute of
SGD's run of ``epochs`` epochs and trains for as many steps as that buys, its lr schedule
fitted to its own length.

- ``passes``: the budget is SGD's example passes (:mod:`ksam.cost`: a forward over one
  example 1, a backward 2; 3B a step), deterministic and the same on any machine. A
  method's steps are the most whose passes, read from its plan step by step (its warm-up,
  schedule, scoring forward, loss term), stay within it: it gets SGD's passes within one
  of its steps. Where the plan depends on the run's length (``start=FRACTION``,
  ``estimate=FRACTION``) the length and the plan are solved for together.
- ``time``: the budget is SGD's measured training time (mean over seeds) in the
  equal-epochs grid of the same command, and a method's steps are that time over its own
  measured time per step there (mean over seeds): equal time on this machine, as
  measured; the time each run then takes is reported beside it.

A run whose steps are whole epochs of the equal-epochs grid (SGD's, and any method whose
steps cost what SGD's do) is that grid's run, not run again.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import replace
from typing import Any

import torch

from ..cost import run_passes, steps_within
from ..plan import StepPlan
from ..selection import WholeBatch
from .config import BUDGETS, TrainConfig

__all__ = ["BUDGETS", "budget_config", "budget_table", "passes_budget", "passes_steps",
           "time_steps"]

#: How many times the run's length and its plan are solved for together (a plan that
#: depends on the length: ``sam-late``'s start, AutoBand's window); they settle in a few.
_ROUNDS = 32
#: What each budget counts, in the report.
WORDS = {"passes": "example passes (a forward over one example 1, a backward 2)",
         "time": "training time measured on this machine"}


def steps_per_epoch(num_train: int, batch_size: int, world: int = 1) -> int:
    """Optimizer steps of an epoch (as :mod:`ksam.lab.train` takes them)."""
    return (num_train // world) // batch_size


def passes_budget(cfg: TrainConfig, spe: int) -> float:
    """SGD's example passes over ``cfg.epochs`` epochs of ``spe`` steps of batch
    ``cfg.batch_size``."""
    return run_passes(StepPlan(None, None, WholeBatch()), cfg.batch_size, spe * cfg.epochs)


def passes_steps(cfg: TrainConfig, task: Any, spe: int) -> int:
    """The steps of the run ``cfg`` (resolved; its method, options and seed) that SGD's
    passes over ``cfg.epochs`` epochs buy: its plan is built on a throw-away model (torch's
    random state put back after) for a run of that length."""
    from .train import build_engine

    budget = passes_budget(cfg, spe)
    probe = replace(cfg, fast=False, device="cpu", compile=None)
    with torch.random.fork_rng(devices=[]):
        model = task.make_model()

    def plan_for(steps: int) -> StepPlan:
        engine, _ = build_engine(cfg.method, model, probe, steps, num_examples=task.num_train)
        return engine.plan

    def within(plan: StepPlan) -> int:
        return max(1, steps_within(plan, cfg.batch_size, budget, seed=cfg.seed,
                                   micro_batch_size=cfg.micro_batch_size))

    steps, seen = spe * cfg.epochs, {}
    for _ in range(_ROUNDS):
        plan = seen[steps] = plan_for(steps)
        buys = within(plan)
        if buys == steps:
            return steps
        if buys in seen:
            break
        steps = buys
    fits = [s for s, plan in seen.items()
            if run_passes(plan, cfg.batch_size, s, seed=cfg.seed,
                          micro_batch_size=cfg.micro_batch_size) <= budget]
    return max(fits) if fits else min(seen)


def time_steps(results: list[dict[str, Any]], budget_s: float) -> int:
    """The steps that ``budget_s`` seconds buy at the time per step of ``results`` (a
    method's equal-epochs runs: mean over them of training time / steps)."""
    per_step = statistics.fmean(r["final"]["train_time"] / r["final"]["steps"]
                                for r in results)
    # floor, but not below a whole step lost to rounding (t / (t / n) may be n - 1e-15)
    return max(1, math.floor(budget_s / per_step * (1 + 1e-12))) if per_step > 0 else 1


def budget_config(cfg: TrainConfig, steps: int, spe: int) -> TrainConfig:
    """The run ``cfg`` for ``steps`` steps of ``spe`` an epoch: whole epochs as they are,
    else ``steps`` set and ``epochs`` the epochs they start."""
    if steps == spe * cfg.epochs:
        return cfg
    whole = steps % spe == 0
    return replace(cfg, steps=None if whole else steps, epochs=-(-steps // spe))


def budget_rows(rows: list[dict[str, Any]], runs: list[dict[str, Any]], spe: int,
                passes: float, time_s: float | None) -> list[dict[str, Any]]:
    """The summary ``rows`` of an equal-budget grid with, per method, its epochs and steps
    (mean over seeds) and the budget its runs used: passes / SGD's and time / SGD's (time
    None: the reference's mean time of the grid's rows)."""
    out = []
    for row in rows:
        mine = [r["final"] for r in runs if r["label"] == row["method"]]
        steps = statistics.fmean(f["steps"] for f in mine)
        used = [f.get("passes") for f in mine]
        out.append({**row, "epochs_run": steps / spe, "steps": steps,
                    "passes_vs_sgd": statistics.fmean(used) / passes
                    if None not in used else None,
                    "time_vs_sgd": statistics.fmean(f["train_time"] for f in mine) / time_s
                    if time_s else row["time_vs_ref"]})
    return out


def budget_table(rows: list[dict[str, Any]], split: str = "test") -> str:
    """The equal-budget table: each method's epochs, steps, the budget used (passes and
    time, each / SGD's) and its accuracy at that cost (no 'collapsed' column: at equal cost
    a method with fewer steps may end lower without collapsing)."""
    lines = [f"| method | lr | epochs | steps | passes / sgd | time / sgd | {split} acc % "
             "(mean ± std) | min | train time s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lr = "-" if r.get("lr") is None else f"{r['lr']:g}"
        passes = "-" if r.get("passes_vs_sgd") is None else f"{r['passes_vs_sgd']:.3f}x"
        lines.append(
            f"| {r['method']} | {lr} | {r['epochs_run']:.2f} | {r['steps']:.0f} | {passes} "
            f"| {r['time_vs_sgd']:.2f}x | {r['test_acc_mean']:.2f} ± {r['test_acc_std']:.2f} "
            f"| {r['test_acc_min']:.2f} | {r['train_time_s']:.1f} |")
    return "\n".join(lines)


def budget_text(mode: str, epochs: int, steps: int, budget: float) -> str:
    """What the equal-budget grid gave each method, in words."""
    amount = f"{budget:,.0f} example passes" if mode == "passes" \
        else f"{budget:.1f} s of training"
    return (f"Equal budget ({mode}): every method trains for as many steps as SGD's run of "
            f"{epochs} epochs ({steps} steps) buys in {WORDS[mode]}, {amount}, its lr "
            "schedule over its own steps; 'passes / sgd' and 'time / sgd' are the budget "
            "each method used.")
