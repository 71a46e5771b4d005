"""The eager executor: a step of :mod:`ksam.core` with one host sync.

An *executor* runs the core's functions for one step (:func:`ksam.core.compute`,
:func:`~ksam.core.verdict`, :func:`~ksam.core.apply`) and owns what differs between ways of
running them: the skip flag, the count of skipped steps, any preparation of the optimizer.
Two exist, interchangeable: :class:`EagerExecutor` (one host sync per step, the optimizer
as you built it) and :class:`ksam.fast.SyncFreeExecutor` (no host sync, CUDA graphs).
"""

from __future__ import annotations

import torch

from .batch import Batch
from .core import Runtime, StepResult, apply, compute, verdict
from .passes import LossFn

__all__ = ["EagerExecutor"]


class EagerExecutor:
    """Runs a step with one host sync (the loss and the finite verdict read together); the
    optimizer steps as you built it, or not at all on a skipped step."""

    #: what :meth:`ksam.Method.state_dict` records as ``fast_path``
    fast_path = False

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.reason: str | None = None
        self._skipped = 0

    @property
    def skipped_steps(self) -> int:
        return self._skipped

    def reset(self, skipped_steps: int = 0) -> None:
        """Start over from a loaded state with ``skipped_steps`` skipped so far."""
        self._skipped = int(skipped_steps)

    def optimizer_changed(self) -> None:
        """The optimizer's parameters changed: nothing of this executor depends on them."""

    def step(self, batch: Batch, loss_fn: LossFn, n: int, step: int,
             sharp: bool) -> StepResult:
        """Step number ``step`` on ``batch`` (``sharp``: the schedule's decision)."""
        rt = self.rt
        computed = compute(rt, batch, loss_fn, n, step, sharp)
        judged = verdict(rt, computed)
        loss, ok = torch.stack([computed.loss.float(), judged.finite.float()]).tolist()  # sync
        skip = not ok
        apply(rt, computed, judged, skip)
        self._skipped += skip
        return StepResult.of(computed, judged, loss, skip)
