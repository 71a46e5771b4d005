"""What crosses the boundary between the step engine and its executors.

The engine (:class:`ksam.engine.SharpnessAwareOptimizer`) has three public stages:

- :meth:`~ksam.engine.SharpnessAwareOptimizer.compute` runs the passes of a step (scoring,
  ascent, perturbation, descent, restore of w) and returns a :class:`ComputedStep`: device
  tensors only, no host sync; the descent gradient is left in the parameters' ``.grad``;
- :meth:`~ksam.engine.SharpnessAwareOptimizer.verdict` reads the step and says, in a
  :class:`Verdict`, whether it may be applied (it changes nothing);
- :meth:`~ksam.engine.SharpnessAwareOptimizer.apply` carries out the update: clipping, the
  optimizer step and the rules' commit, or the skip (BatchNorm statistics put back).

An *executor* runs a whole step with them and owns what differs between ways of running it:
the skip flag and the count of skipped steps, and any preparation of the optimizer. It
writes nothing on the engine (the engine's step counter is the engine's). Two exist,
interchangeable, both using only that public surface: :class:`EagerExecutor` (one host sync
per step, the optimizer as you built it) and :class:`ksam.fast.SyncFreeExecutor` (no host
sync, CUDA graphs).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .batch import Batch
from .passes import LossFn

if TYPE_CHECKING:  # the engine imports this module; a type-only import makes no cycle
    from .engine import SharpnessAwareOptimizer

__all__ = ["ComputedStep", "Verdict", "StepResult", "EagerExecutor", "LossFn"]


@dataclass
class ComputedStep:
    """What :meth:`~ksam.engine.SharpnessAwareOptimizer.compute` hands to the apply stage.

    All tensors live on the batch's device; nothing here was read by the host.
    """

    #: 0-d: mean per-sample loss of the whole batch at w (at w+eps for random-subset SAM)
    loss: Tensor
    #: rows of the batch of the ascent / descent gradient (empty: no ascent pass)
    ascent_indices: Tensor
    descent_indices: Tensor
    #: detached per-sample losses at w over the whole batch (None when not computed)
    losses: Tensor | None
    #: L2 norm of the ascent gradient, unscaled (None without an ascent pass)
    ascent_grad_norm: Tensor | None
    #: 0-d values that must be finite for the step to be applied (besides the gradients)
    checks: list[Tensor]
    #: the schedule's decision (host-side, static for the step): sharpness-aware or plain
    sharp: bool = True


@dataclass(frozen=True)
class Verdict:
    """What :meth:`~ksam.engine.SharpnessAwareOptimizer.verdict` says of a computed step."""

    #: 0-d bool on the device: losses and descent gradients finite (on every rank)
    finite: Tensor
    #: L2 norm of the descent gradient, unscaled and before clipping (None: no gradient)
    descent_grad_norm: Tensor | None


class StepResult:
    """What one step did. ``loss`` and ``skipped`` are Python values; on the fast path they
    are read from the device only when first accessed, so a step itself never syncs."""

    __slots__ = ("_loss", "_skipped", "ascent_indices", "descent_indices", "losses",
                 "ascent_grad_norm", "descent_grad_norm", "sharp")

    def __init__(self, loss: float | Tensor, skipped: bool | Tensor,
                 ascent_indices: Tensor, descent_indices: Tensor,
                 losses: Tensor | None = None, ascent_grad_norm: Tensor | None = None,
                 descent_grad_norm: Tensor | None = None, sharp: bool = True) -> None:
        self._loss = loss
        self._skipped = skipped
        #: rows of the batch used for the ascent / descent gradient (empty: no ascent pass)
        self.ascent_indices = ascent_indices
        self.descent_indices = descent_indices
        #: detached per-sample losses at w over the whole batch (None when not computed)
        self.losses = losses
        #: L2 norm of the ascent gradient (None without an ascent pass)
        self.ascent_grad_norm = ascent_grad_norm
        #: L2 norm of the descent gradient before ``max_grad_norm`` clipped it (unscaled)
        self.descent_grad_norm = descent_grad_norm
        #: the step was sharpness-aware (the schedule's decision); False: a plain step
        self.sharp = sharp

    @classmethod
    def of(cls, computed: ComputedStep, verdict: Verdict, loss: float | Tensor,
           skipped: bool | Tensor) -> StepResult:
        return cls(loss, skipped, computed.ascent_indices, computed.descent_indices,
                   computed.losses, computed.ascent_grad_norm, verdict.descent_grad_norm,
                   computed.sharp)

    @property
    def loss(self) -> float:
        """Mean per-sample loss of the whole batch at w (at w+eps for random-subset SAM,
        whose only full-batch pass is the perturbed one)."""
        if isinstance(self._loss, Tensor):
            self._loss = float(self._loss)
        return self._loss

    @property
    def raw_loss(self) -> float | Tensor:
        """The loss as computed: a float, or on the fast path a 0-d device tensor that can be
        accumulated without a host sync."""
        return self._loss

    @property
    def skipped(self) -> bool:
        if isinstance(self._skipped, Tensor):
            self._skipped = bool(self._skipped)
        return self._skipped

    def __repr__(self) -> str:
        return (f"StepResult(loss={self.loss:.6g}, skipped={self.skipped}, "
                f"ascent={self.ascent_indices.numel()}, descent={self.descent_indices.numel()})")


class EagerExecutor:
    """Runs a step with one host sync (the loss and the finite verdict read together); the
    optimizer steps as you built it, or not at all on a skipped step."""

    #: what :meth:`~ksam.engine.SharpnessAwareOptimizer.state_dict` records as ``fast_path``
    fast_path = False

    def __init__(self, engine: SharpnessAwareOptimizer) -> None:
        self.engine = engine
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

    def step(self, batch: Batch, loss_fn: LossFn, n: int, sharp: bool = True) -> StepResult:
        e = self.engine
        computed = e.compute(batch, loss_fn, n, sharp)
        verdict = e.verdict(computed)
        loss, ok = torch.stack([computed.loss.float(), verdict.finite.float()]).tolist()  # sync
        skip = not ok
        e.apply(computed, verdict, skip)
        self._skipped += skip
        return StepResult.of(computed, verdict, loss, skip)
