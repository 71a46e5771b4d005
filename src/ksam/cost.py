r"""What a step costs, in example passes, read from a method's rules.

A *pass* here counts examples: a forward of one example through the model is 1, its
backward 2 (the usual estimate: a backward does about twice a forward's arithmetic). A step
of SGD on a batch of B costs 3B; SAM's 6B. The count is derived from the engine's
:class:`ksam.plan.StepPlan`, pass by pass as :func:`ksam.core.compute` runs them, so it
is deterministic and the same on any machine:

- the scoring forward over the batch, when a rule reads losses at w and no full-batch pass
  at w gives them (K-SAM, Ordered SGD); none with remembered scores (``scores="memory"``);
- the ascent pass over the ascent rule's rows (forward and backward), on sharp steps;
  none for a perturbation from the optimizer's state (Momentum-SAM);
- the descent pass over the descent rule's rows at the step (:meth:`size_at`: K-SAM's
  descent warm-up starts at the whole batch), or on the schedule's plain steps over the
  plan's plain rows;
- ESAM's descent: one forward with gradient over the whole batch at w+eps and a backward
  through it (the gradient flows from the selected rows, through the whole batch's graph);
  with ``micro_batch_size`` below the batch, a forward without gradient over the batch and
  a pass over the selected rows;
- a loss term's forwards of another model over each gradient pass's rows
  (:attr:`ksam.memory.LossTerm.extra_forwards`: MESA's average model, from its start).

ESAM's ascent is counted as a full backward; on the rare step whose random weight mask
leaves every parameter out (probability :math:`(1-\beta)^{\text{tensors}}`) it runs none.

Which steps are sharp is the schedule's decision (:class:`ksam.schedule.Schedule`):
:func:`sharp_steps` tells them before a run where that is possible.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import torch

from .plan import StepPlan

__all__ = ["StepRows", "step_rows", "sharp_steps", "run_passes", "steps_within"]


class StepRows(NamedTuple):
    """Examples through a forward and through a backward in one step."""

    forward: int
    backward: int

    @property
    def passes(self) -> int:
        """Example passes: a forward 1, a backward 2."""
        return self.forward + 2 * self.backward


def step_rows(plan: StepPlan, batch_size: int, step: int, sharp: bool, *,
              micro_batch_size: int | None = None) -> StepRows:
    """The forward and backward rows of step ``step`` (0-based, the engine's step counter)
    on a batch of ``batch_size``, sharp or plain (the schedule's decision), for an engine
    with ``plan`` and ``micro_batch_size`` (see the module docstring)."""
    n = batch_size
    forward = backward = grad_forward = 0
    if plan.scores_first(sharp) and plan.remembered is None:
        forward += n  # the scoring forward
    if sharp and plan.ascent is not None:
        rows = plan.ascent.size_at(n, step)
        forward, backward, grad_forward = forward + rows, backward + rows, grad_forward + rows
    rule = plan.descent_rule(sharp)
    rows = rule.size_at(n, step)
    if rule.needs_perturbed_losses and not (micro_batch_size is not None
                                            and n > micro_batch_size):
        forward, backward, grad_forward = forward + n, backward + n, grad_forward + n
    else:
        if rule.needs_perturbed_losses:
            forward += n  # the losses at w+eps without gradient, then the selected rows
        forward, backward, grad_forward = forward + rows, backward + rows, grad_forward + rows
    term = plan.term_at(step)
    if term is not None:
        forward += term.extra_forwards * grad_forward
    return StepRows(forward, backward)


def sharp_steps(plan: StepPlan, steps: int, seed: int) -> Iterator[bool] | None:
    """The schedule's decisions for steps ``0 .. steps-1`` of an engine built with ``seed``,
    where they are known before the run: always for a schedule that draws nothing
    (``p`` 0 or 1), and for one that draws (``0 < p < 1``) when its draws are the only ones
    from the engine's generator (no rule of the plan draws on the host). None otherwise."""
    schedule = plan.schedule
    draws = 0.0 < schedule.p < 1.0
    if draws and plan.host_randomness is not None:
        return None
    generator = torch.Generator().manual_seed(int(seed)) if draws else None
    return (schedule.is_sharp(t, generator) for t in range(steps))


def _costs(plan: StepPlan, batch_size: int, seed: int,
           micro_batch_size: int | None) -> Iterator[float]:
    """The example passes of steps 0, 1, 2, ... (exact where :func:`sharp_steps` knows the
    schedule's decisions, else each step's expected passes)."""
    schedule = plan.schedule
    known = sharp_steps(plan, 1 << 62, seed)
    step = 0
    while True:
        if known is not None:
            yield step_rows(plan, batch_size, step, next(known),
                            micro_batch_size=micro_batch_size).passes
        else:
            eligible = step >= schedule.start_step \
                and (step - schedule.start_step) % schedule.interval == 0
            plain = step_rows(plan, batch_size, step, False,
                              micro_batch_size=micro_batch_size).passes
            sharp = step_rows(plan, batch_size, step, True,
                              micro_batch_size=micro_batch_size).passes
            yield schedule.p * sharp + (1 - schedule.p) * plain if eligible else plain
        step += 1


def run_passes(plan: StepPlan, batch_size: int, steps: int, *, seed: int = 0,
               micro_batch_size: int | None = None) -> float:
    """Example passes of a run of ``steps`` steps (see :func:`_costs`)."""
    total = 0.0
    for _, cost in zip(range(steps), _costs(plan, batch_size, seed, micro_batch_size)):
        total += cost
    return total


def steps_within(plan: StepPlan, batch_size: int, budget: float, *, seed: int = 0,
                 micro_batch_size: int | None = None) -> int:
    """The most steps whose example passes stay within ``budget``: the run of the result
    costs at most ``budget``, one more step would cost more."""
    total, steps = 0.0, 0
    for cost in _costs(plan, batch_size, seed, micro_batch_size):
        if total + cost > budget:
            return steps
        total += cost
        steps += 1
    raise AssertionError("unreachable")  # pragma: no cover
