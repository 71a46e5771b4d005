r"""When a step is sharpness-aware: the per-step schedule of the two-pass engine.

A method with an ascent pass (SAM, ASAM, K-SAM, random-subset SAM, ESAM, LookSAM) runs its
full step only on the steps its :class:`Schedule` marks *sharp*; on the others it runs one
plain pass over its descent subset at w, with no ascent and no perturbation (for K-SAM the
descent subset still comes from the scoring forward; for ESAM, whose selection is defined
only under a perturbation, it is the whole batch).

Step t (the engine's step counter, 0-based, skipped steps included) is sharp when

.. math::
    t \ge S \quad\wedge\quad (t - S) \bmod n = 0 \quad\wedge\quad u_t < p,
    \qquad u_t \sim U[0, 1)

- ``start_step`` S: plain steps before S, sharpness-aware from S on (late-phase SAM, Zhou et
  al., ICLR 2025);
- ``p``: each eligible step is sharp with probability p (RST, Zhou et al. 2023). :math:`u_t`
  is drawn from the engine's seeded CPU generator - a host draw, no device sync - and only
  when 0 < p < 1, so ``p=1`` draws nothing and is exactly the unscheduled method;
- ``interval`` n: every n-th step (LookSAM's SAM steps, Liu et al. 2022).

The decision is made on the host before the step runs, so it is static for that step: the
fast path keeps one CUDA graph per kind of step. The schedule's position is the engine's
step counter and its draws come from the engine's generator, both in the engine's
``state_dict``; the schedule itself holds no state (the engine counts the sharp steps it
took, :attr:`ksam.Method.sharp_steps`).
"""

from __future__ import annotations

import math
from numbers import Real
from typing import Any

import torch

from .validate import check_fraction, check_int


class Schedule:
    """Which steps are sharpness-aware (see the module docstring).

    Args:
        start_step: first step that may be sharp (0: from the start).
        p: probability that an eligible step is sharp, in [0, 1].
        interval: only every ``interval``-th step from ``start_step`` on is eligible.
    """

    def __init__(self, start_step: int = 0, p: float = 1.0, interval: int = 1) -> None:
        self.start_step = check_int("start_step", start_step)
        self.p = check_fraction("p", p)
        self.interval = check_int("interval", interval, low=1)

    @property
    def always(self) -> bool:
        """True when every step is sharp: the schedule changes nothing."""
        return self.start_step == 0 and self.p == 1.0 and self.interval == 1

    def is_sharp(self, step: int, generator: torch.Generator | None) -> bool:
        """Whether step ``step`` is sharpness-aware; draws from ``generator`` only for an
        eligible step with 0 < p < 1. Pure host work: no device is touched."""
        if step < self.start_step or (step - self.start_step) % self.interval:
            return False
        if self.p >= 1.0:
            return True
        if self.p <= 0.0:
            return False
        return float(torch.rand((), generator=generator)) < self.p

    def __repr__(self) -> str:
        parts = []
        if self.start_step:
            parts.append(f"start_step={self.start_step}")
        if self.p != 1.0:
            parts.append(f"p={self.p}")
        if self.interval != 1:
            parts.append(f"interval={self.interval}")
        return f"Schedule({', '.join(parts)})"


def start_step_of(start: float, steps_total: int) -> int:
    """The step at which a run of ``steps_total`` steps turns sharpness-aware when the CLI
    says ``start=FRACTION`` (``start=0.8``: the last 20 % of the steps)."""
    if isinstance(start, bool) or not isinstance(start, Real) \
            or not math.isfinite(float(start)) or not 0.0 <= float(start) <= 1.0:
        raise ValueError(f"start must be a fraction of the run in [0, 1], got {start!r}")
    return min(steps_total, round(float(start) * steps_total))


#: The CLI's ``start`` of ``sam-late`` when the spec gives none: SAM in the last 20 % of steps.
SAM_LATE_START = 0.8


def schedule_options(method: str, options: dict[str, Any], steps_total: int) -> dict[str, Any]:
    """A method's options with the CLI's ``start=FRACTION`` turned into ``start_step`` for
    a run of ``steps_total`` steps (``sam-late`` without either starts at
    :data:`SAM_LATE_START`)."""
    out = dict(options)
    if "start" in out:
        if "start_step" in out:
            raise ValueError("give start (a fraction of the run) or start_step, not both")
        out["start_step"] = start_step_of(out.pop("start"), steps_total)
    elif method == "sam-late" and "start_step" not in out:
        out["start_step"] = start_step_of(SAM_LATE_START, steps_total)
    return out
