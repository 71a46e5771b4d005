"""The passes layer: "run a pass of the model over these rows of the batch, with or without
a gradient", and nothing about which rows or why.

What a pass involves, and only here:

- the forward through the model or through ``torch.compile``'s wrapper of it, under
  ``torch.autocast`` when the engine has an ``autocast_dtype``;
- the BatchNorm rule (:mod:`ksam.batchnorm`): only the step's first full-batch pass updates
  the running statistics, every other pass runs with them frozen; the statistics of the step
  are saved first, so that a skipped or failed step can put them back;
- chunking (``micro_batch_size``): a pass over more rows runs chunk by chunk, a gradient
  pass accumulating each chunk's share of the objective, DDP's gradient all-reduce held back
  (``no_sync``) until the last chunk;
- the backward, through a GradScaler's scale when there is one; DDP's ``no_sync`` for a pass
  whose gradient stays on its rank (a per-rank ascent);
- what ``loss_fn`` returns: per-sample losses, or a :class:`ksam.memory.LossOutput` of losses
  and logits; a step's :class:`ksam.memory.LossTerm` (SAF, MESA) turns the losses and logits
  of each gradient pass into the per-sample objective, the losses reported stay ``loss_fn``'s.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .batch import Batch, batch_device, batch_index, index_batch, loss_batch
from .batchnorm import BatchNormGuard
from .memory import LossOutput, LossTerm

__all__ = ["Passes", "StepPasses", "LossFn", "Objective"]

#: ``loss_fn(model, batch)``: the per-sample losses ``[n]`` of the batch, or a
#: :class:`ksam.LossOutput` of the losses and the logits they came from.
LossFn = Callable[[nn.Module, Batch], "Tensor | LossOutput"]
#: what a gradient pass differentiates: a scalar from the pass's per-sample losses, linear in
#: them (a mean times a scale), so that chunks' gradients add up to the whole pass's
Objective = Callable[[Tensor], Tensor]


class Passes:
    """Runs the forward and backward passes of an engine's steps (see the module docstring).

    Args:
        model: the model (or its DDP / FSDP2 wrapper); its ``state_dict`` is never touched.
        compile_backend: a ``torch.compile`` backend name for the passes' forward, or None.
        autocast_dtype: ``torch.bfloat16`` / ``torch.float16`` for ``torch.autocast``, or
            None.
        grad_scaler: a ``torch.amp.GradScaler`` that scales every backward, or None.
        micro_batch_size: the most rows one forward takes, or None.
    """

    def __init__(self, model: nn.Module, *, compile_backend: str | None,
                 autocast_dtype: torch.dtype | None,
                 grad_scaler: torch.amp.GradScaler | None,
                 micro_batch_size: int | None) -> None:
        self.model = model
        # What the passes call: the model itself, or torch.compile's wrapper of it.
        self.forward_model = model if compile_backend is None \
            else torch.compile(model, backend=compile_backend)
        self.autocast_dtype = autocast_dtype
        self.grad_scaler = grad_scaler
        self.micro_batch_size = micro_batch_size
        self.batchnorm = BatchNormGuard(model)
        if micro_batch_size is not None:
            self.batchnorm.check_chunkable(compiled=compile_backend is not None)
        self._no_sync = getattr(model, "no_sync", None)

    def begin(self, batch: Batch, loss_fn: LossFn, n: int, *, term: LossTerm | None = None,
              subset_updates_batchnorm: bool = False) -> StepPasses:
        """The passes of one step over ``batch`` (BatchNorm statistics saved first), with
        ``term`` added to the objective of its gradient passes;
        ``subset_updates_batchnorm``: the step's first pass updates the BatchNorm
        statistics even over a subset (a step with no full-batch pass at w)."""
        self.batchnorm.save()
        return StepPasses(self, batch, loss_fn, n, term, subset_updates_batchnorm)

    def restore_batchnorm(self, where: Tensor | None = None) -> None:
        """Put the step's saved BatchNorm statistics back (where ``where``, a 0-d bool
        tensor, is true: on the device, no host sync)."""
        self.batchnorm.restore(where)

    def local_gradients(self) -> contextlib.AbstractContextManager:
        """Within the block, DDP keeps gradients on their rank (no all-reduce)."""
        return self._no_sync() if self._no_sync is not None else contextlib.nullcontext()

    def backward(self, objective: Tensor) -> None:
        if self.grad_scaler is not None:
            objective = self.grad_scaler.scale(objective)
        objective.backward()

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        # No weight-cast cache: each forward casts a weight once anyway, and the cache does not
        # survive CUDA graph capture.
        return torch.autocast(device.type, dtype=self.autocast_dtype, cache_enabled=False)


class StepPasses:
    """The passes of one step over one batch of ``n`` rows."""

    def __init__(self, passes: Passes, batch: Batch, loss_fn: LossFn, n: int,
                 term: LossTerm | None = None, subset_updates_batchnorm: bool = False) -> None:
        self.passes = passes
        self.batch = batch
        self.loss_fn = loss_fn
        self.n = n
        self.term = term
        self.subset_updates_batchnorm = subset_updates_batchnorm
        self.device = batch_device(batch)
        #: the step's first full-batch pass has not run yet (it updates BatchNorm statistics)
        self._batchnorm_pending = True

    def chunked(self, rows: int) -> bool:
        """Whether a pass over ``rows`` rows runs in more than one chunk."""
        m = self.passes.micro_batch_size
        return m is not None and rows > m

    def forward(self, index: Tensor | None, *, grad: bool) -> Tensor:
        """Per-sample losses of the rows ``index`` (None: all) in one forward, with their
        graph when ``grad`` (with the step's loss term added)."""
        return self._forward(index, grad)[0]

    def _forward(self, index: Tensor | None, grad: bool) -> tuple[Tensor, Tensor]:
        update = self._updates_batchnorm(index)
        expected = self.n if index is None else index.numel()
        out = self._call(index_batch(self.batch, index), expected, grad=grad,
                         freeze=not update)
        if update:
            self._batchnorm_pending = False
        return out

    def run(self, index: Tensor | None, objective: Objective | None = None) -> Tensor:
        """A pass over the rows ``index`` (None: all): their detached per-sample losses and,
        with ``objective``, the backward of ``objective(losses)``.

        In chunks (``micro_batch_size``), chunk c's backward takes ``objective`` of the
        pass's losses with every other chunk's entries zero: for an objective linear in the
        losses the chunks' gradients add up to the unchunked one, and each chunk's graph is
        freed before the next is built."""
        p = self.passes
        total = self.n if index is None else index.numel()
        if not self.chunked(total):
            trained, losses = self._forward(index, objective is not None)
            if objective is not None:
                p.backward(objective(trained))
            return losses.detach()
        assert p.micro_batch_size is not None
        update = self._updates_batchnorm(index)
        parts = []
        with p.batchnorm.accumulated() if update else contextlib.nullcontext():
            for start in range(0, total, p.micro_batch_size):
                stop = min(start + p.micro_batch_size, total)
                rows = slice(start, stop) if index is None else index[start:stop]
                held = objective is not None and stop < total
                with p.local_gradients() if held else contextlib.nullcontext():
                    trained, losses = self._call(index_batch(self.batch, rows), stop - start,
                                                 grad=objective is not None, freeze=True)
                    if objective is not None:
                        p.backward(objective(F.pad(trained, (start, total - stop))))
                parts.append(losses.detach())
        if update:
            self._batchnorm_pending = False
        return torch.cat(parts)

    def score(self) -> tuple[Tensor, Tensor | None]:
        """A gradient-free pass over the whole batch: its per-sample losses and the logits
        ``loss_fn`` returned with them (None when it returns none), chunk by chunk with
        ``micro_batch_size``."""
        p = self.passes
        step = p.micro_batch_size if self.chunked(self.n) else self.n
        update = self._updates_batchnorm(None)
        losses, logits = [], []
        with p.batchnorm.accumulated() if update and step < self.n \
                else contextlib.nullcontext():
            for start in range(0, self.n, step):
                stop = min(start + step, self.n)
                rows = None if step == self.n else slice(start, stop)
                inner = loss_batch(index_batch(self.batch, rows))
                with p.batchnorm.frozen(not update or step < self.n), \
                        p.autocast(self.device), torch.no_grad():
                    part, part_logits = split_output(self.loss_fn(p.forward_model, inner),
                                                     stop - start)
                losses.append(part.detach())
                if part_logits is not None:
                    logits.append(part_logits.detach())
        if update:
            self._batchnorm_pending = False
        if len(losses) == 1:
            return losses[0], logits[0] if logits else None
        return torch.cat(losses), torch.cat(logits) if logits else None

    def _updates_batchnorm(self, index: Tensor | None) -> bool:
        return self._batchnorm_pending and (index is None or self.subset_updates_batchnorm)

    def _call(self, sub: Batch, expected: int, *, grad: bool,
              freeze: bool) -> tuple[Tensor, Tensor]:
        """``(objective, losses)`` of the rows ``sub``: ``loss_fn``'s per-sample losses, and
        the per-sample objective a gradient pass differentiates (the losses plus the step's
        loss term)."""
        p = self.passes
        inner = loss_batch(sub)
        with p.batchnorm.frozen(freeze), p.autocast(self.device), torch.set_grad_enabled(grad):
            out = self.loss_fn(p.forward_model, inner)
            losses, logits = split_output(out, expected)
            if grad and not losses.requires_grad:
                # A loss term would still give a gradient through the logits: refuse it
                # here, for every method alike, rather than train on the term alone.
                raise ValueError("loss_fn returned losses that do not require grad in a "
                                 "gradient pass (detached, or computed under "
                                 "torch.no_grad()): return the losses of the model's "
                                 "forward as they are")
            if self.term is None or not grad:
                return losses, losses
            if logits is None:
                raise TypeError(f"{self.term!r} needs the logits: loss_fn must return "
                                "ksam.LossOutput(losses, logits)")
            return self.term.objective(losses, logits, batch_index(sub),
                                       lambda model: self.loss_fn(model, inner)), losses


def split_output(out: Any, expected: int) -> tuple[Tensor, Tensor | None]:
    """``(losses, logits)`` of what ``loss_fn`` returned (logits None for a plain tensor of
    losses), checked (:func:`check_losses`)."""
    logits = None
    if isinstance(out, LossOutput):
        out, logits = out.losses, out.logits
        if not isinstance(logits, Tensor) or logits.dim() < 2 \
                or logits.shape[0] != expected or not logits.is_floating_point():
            raise ValueError(f"LossOutput.logits must be floating-point logits of shape "
                             f"[{expected}, C], got "
                             f"{getattr(logits, 'dtype', type(logits).__name__)} of shape "
                             f"{list(getattr(logits, 'shape', []))}")
    check_losses(out, expected)
    return out, logits


def check_losses(losses: Any, expected: int) -> None:
    """TypeError / ValueError unless ``losses`` are ``expected`` floating-point per-sample
    losses."""
    if not isinstance(losses, Tensor):
        raise TypeError(
            f"loss_fn must return a tensor of per-sample losses, got {type(losses).__name__}"
        )
    if losses.dim() != 1 or losses.shape[0] != expected:
        hint = " (a scalar: use reduction='none')" if losses.dim() == 0 else ""
        raise ValueError(
            f"loss_fn must return per-sample losses of shape [{expected}], "
            f"got shape {list(losses.shape)}{hint}"
        )
    if not losses.is_floating_point():
        raise TypeError(f"loss_fn must return floating-point losses, got {losses.dtype}")
