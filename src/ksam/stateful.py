"""The protocol of a method's parts that keep state from one step to the next.

A selection rule's estimate (:class:`ksam.selection.AutoBand`), LookSAM's stored direction
(:class:`ksam.transform.LookSAMRule`), SAF's and K-SAM-from-memory's per-example memory
(:class:`ksam.memory.ExampleMemory`), MESA's averaged model (:class:`ksam.memory.EMAKL`):
each is a :class:`Stateful`. A step *stages* what it computes for them; the method
*commits* it once the step is applied, so a skipped step leaves every state as it was; and
the method's ``state_dict`` holds each part's state under its key in
:meth:`ksam.plan.StepPlan.stateful`. A new part with state implements these three methods
and nothing else changes.
"""

from __future__ import annotations

from torch import Tensor

__all__ = ["Stateful"]


class Stateful:
    """A part of a method with state of its own (see the module docstring)."""

    #: The method's ``state_dict`` must hold this part's state to be loaded (a state
    #: without it would leave the part's own and the run would not continue exactly).
    #: False for selection rules, whose state older states may lack (then empty).
    required: bool = False

    def commit(self, keep: bool | Tensor, sharp: bool) -> None:
        """Make what the step staged the part's state where ``keep`` (a bool, or on the
        fast path a 0-d bool device tensor), else drop it; ``sharp``: the step was
        sharpness-aware. Nothing by default."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict, *, applied: bool = False) -> None:
        """Restore :meth:`state_dict`; ``applied``: the state's run had applied steps (a
        part may then require all of its state). ValueError, nothing changed, for a state
        that does not fit."""
