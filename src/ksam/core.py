r"""One step of any method, top to bottom: the functions the executors run.

A step on a mini-batch B at weights w (:func:`sharp_passes`):

1. *score*: per-sample losses :math:`l = L_B(w)` without gradient, when a rule reads them
   and no full-batch pass at w gives them first (or from a per-example memory);
2. *ascent*: rows :math:`A` = ascent rule (e.g. top-K1 of l), gradient
   :math:`g = \nabla_w \frac{1}{|A|}\sum_{i\in A} l_i(w)`;
3. *perturb*: :math:`\epsilon` = perturbation rule of g (e.g. :math:`\rho g/\lVert g\rVert`),
   :math:`w \leftarrow w + \epsilon` (w saved first);
4. *descent*: rows :math:`D` = descent rule (e.g. top-K2 of the same l), gradient
   :math:`\nabla \frac{1}{|D|}\sum_{i\in D} l_i(w+\epsilon)`;
5. *restore* w bit for bit (a copy, never :math:`w - \epsilon`);
6. *update* (:func:`apply`): when every loss and gradient is finite (:func:`verdict`), the
   base optimizer steps with the descent gradient; else nothing changes.

A method is a choice of rules (its :class:`ksam.plan.StepPlan`):

=============== =============== ============================== ======================
method          ascent rows     perturbation                   descent rows
=============== =============== ============================== ======================
SGD             (no ascent)     -                              whole batch
SAM / ASAM      whole batch     rho g/|g|  /  rho T^2 g/|Tg|   whole batch
K-SAM           top-K1 of l     rho g/|g|                      top-K2 of l
random-SAM      random K        rho g/|g|                      whole batch
ESAM            whole batch     stochastic weights, 1/beta     largest loss increase
Ordered SGD     (no ascent)     -                              top-K of l
Momentum-SAM    (no ascent)     -rho v/|v|, v the momentum     whole batch
=============== =============== ============================== ======================

A *plain* step (:func:`plain_passes`: SGD, Ordered SGD, SAF, MESA, and the steps a schedule
leaves plain) is one gradient pass over the descent rows at w. A loss *term* (SAF, MESA)
is added to the gradient passes' losses; remembered scores (``scores="memory"``) replace
the scoring pass; a *transform* (LookSAM) rewrites the descent gradient at w.

What a pass involves - chunks, autocast, the BatchNorm rule, DDP's ``no_sync``, a
GradScaler - is :mod:`ksam.passes`; what a norm over FSDP2 shards is, :mod:`ksam.params`.
The functions here branch only on the rules and on ``sharp`` (host-side, static), never on
a tensor's value, so the same code runs eagerly and inside a CUDA graph capture
(:mod:`ksam.fast`). They take a :class:`Runtime` and never call back into an executor.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .batch import Batch, IndexedBatch, batch_index, batch_labels
from .memory import RememberedLosses
from .params import ParameterSet
from .passes import LossFn, Passes, StepPasses
from .plan import StepPlan
from .selection import SelectionContext, SelectionRule

__all__ = ["Runtime", "ComputedStep", "Verdict", "StepResult", "compute", "sharp_passes",
           "plain_passes", "verdict", "apply"]

#: Combines this process's 0-d bool "the step is finite" with the other processes'.
FiniteReducer = Callable[[Tensor], Tensor]


@dataclass
class Runtime:
    """What a method's steps read and keep besides the batch: its rules, the model and its
    parameters, the passes, the base optimizer, the method's generator and the runtime
    options (built once by :class:`ksam.engine.Method`)."""

    plan: StepPlan
    model: nn.Module
    optimizer: torch.optim.Optimizer
    params: ParameterSet
    passes: Passes
    generator: torch.Generator
    #: the ascent gradient is averaged over the ranks (else each rank perturbs alone)
    sync_perturbation: bool
    #: the passes run through ``torch.compile`` (ESAM then drops gradients, see _ascend)
    compiled: bool
    finite_reducer: FiniteReducer | None
    max_grad_norm: float | None
    #: sharpness-aware steps applied: on the host, plus a device counter where the skip is
    #: decided on the device
    sharp_applied: int = 0
    sharp_on_device: Tensor | None = None
    _rows: dict[tuple[int, torch.device], Tensor] = field(default_factory=dict)

    @property
    def grad_scaler(self) -> torch.amp.GradScaler | None:
        return self.passes.grad_scaler

    def zero_grad(self) -> None:
        self.params.zero_grad()

    def rows(self, n: int, device: torch.device) -> Tensor:
        """``arange(n)`` on the device, made once per size: a whole-batch pass's rows (no
        allocation or launch per step; shared between results, never written)."""
        rows = self._rows.get((n, device))
        if rows is None:
            rows = self._rows[(n, device)] = torch.arange(n, device=device)
        return rows

    def graph_key(self, n: int, step: int, sharp: bool) -> tuple:
        """What makes step ``step`` on a batch of ``n`` do other work than another step of
        the same shapes (:meth:`ksam.plan.StepPlan.graph_key`) and, for a perturbation from
        the optimizer's state, how many parameters it moves (none before the optimizer has
        momentum). Host-side; the fast path keeps one graph per key."""
        moved = 0
        if sharp and self.plan.perturbs_from_state:
            moved = len(self.plan.perturbation.directions(self.params.params,
                                                          self.optimizer)[0])
        return (*self.plan.graph_key(n, step, sharp), moved)


@dataclass
class ComputedStep:
    """What :func:`compute` hands to :func:`verdict` and :func:`apply`: device tensors
    only, none read by the host; the descent gradient is in the parameters' ``.grad``."""

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
    """What :func:`verdict` says of a computed step."""

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


# ------------------------------------------------------------------------ one step
@dataclass
class _Step:
    """One step in progress: its runtime, passes and rules' view of the batch."""

    rt: Runtime
    passes: StepPasses
    ctx: SelectionContext
    sharp: bool
    #: the rules' scores come from this memory instead of a scoring pass
    remembered: RememberedLosses | None
    #: the batch's example ids, guarded (out of range: the memory's spare row), and the
    #: check that makes such a step skipped
    ids: Tensor | None
    id_checks: list[Tensor]


@dataclass(frozen=True)
class _Ascent:
    """What the ascent phase of a step did."""

    #: the rows of the ascent gradient (None: the whole batch, or no ascent pass)
    index: Tensor | None
    #: an ascent pass ran
    ran: bool = False
    #: w was moved to w + eps (and is restored after the descent)
    perturbed: bool = False
    #: the ascent gradient's norm, unscaled (None without an ascent gradient)
    grad_norm: Tensor | None = None
    #: 0-d values that must be finite for the step to be applied
    checks: tuple[Tensor, ...] = ()
    #: the ascent pass's per-sample losses at w (detached; None without an ascent pass)
    losses: Tensor | None = None


_NO_ASCENT = _Ascent(None)


def compute(rt: Runtime, batch: Batch, loss_fn: LossFn, n: int, step: int,
            sharp: bool) -> ComputedStep:
    """The passes of step number ``step``, up to (not including) the update: the descent
    gradient is left, unscaled, in the parameters' ``.grad``. A sharp step of a method with
    an ascent (or a perturbation from the optimizer's state) runs :func:`sharp_passes`,
    any other step :func:`plain_passes`. On an exception the gradients are cleared, the
    BatchNorm statistics, the weights and the memory's staged rows put back, and it
    propagates."""
    rt.zero_grad()
    s = _begin(rt, batch, loss_fn, n, step, sharp)
    plan = rt.plan
    try:
        if sharp and (plan.ascent is not None or plan.perturbs_from_state):
            return sharp_passes(s)
        return plain_passes(s)
    except BaseException:
        rt.passes.restore_batchnorm()
        rt.zero_grad()
        if plan.memory is not None:
            plan.memory.discard()
        raise


def sharp_passes(s: _Step) -> ComputedStep:
    """A sharpness-aware step: score, ascend and perturb, descend, restore."""
    plan, params = s.rt.plan, s.rt.params
    _score(s)                                   # 1. losses at w, without gradient
    if plan.ascent is not None:
        ascent = _ascend(s, plan.ascent)        # 2. ascent gradient, 3. w <- w + eps
    else:
        ascent = _perturb_from_state(s)         # 3. eps from the optimizer's momentum (MSAM)
    try:
        rows, losses = _descend(s, plan.descent)  # 4. descent gradient at w + eps
    finally:
        params.restore()                        # 5. w back, bit for bit
    _finish_gradient(s)                         # unscaled; LookSAM's transform at w
    return _result(s, ascent, rows, losses)


def plain_passes(s: _Step) -> ComputedStep:
    """A plain step: one gradient pass at w over the descent rows (chosen from the losses
    at w where the rule reads them)."""
    _score(s)
    rows, losses = _descend(s, s.rt.plan.descent_rule(s.sharp))
    _finish_gradient(s)
    return _result(s, _NO_ASCENT, rows, losses)


def _begin(rt: Runtime, batch: Batch, loss_fn: LossFn, n: int, step: int,
           sharp: bool) -> _Step:
    """The step's passes (BatchNorm statistics saved) and the rules' view of the batch;
    ids out of range of a memory are sent to its spare row and make the step skipped."""
    plan = rt.plan
    memory, ids, id_checks = plan.memory, None, []
    if memory is not None:
        memory.discard()
        raw = batch_index(batch)
        if raw is None:
            memory.check_ids(raw, n)
        ids, valid = memory.guard(raw)
        batch, id_checks = IndexedBatch(batch.batch, ids), [valid]
    remembered = plan.remembered if plan.scores_first(sharp) else None
    passes = rt.passes.begin(batch, loss_fn, n, term=plan.term_at(step),
                             subset_updates_batchnorm=remembered is not None)
    ctx = SelectionContext(
        batch_size=n, device=passes.device, generator=rt.generator, step=step,
        labels=batch_labels(batch, n) if plan.needs_labels else None, ids=ids)
    return _Step(rt, passes, ctx, sharp, remembered, ids, id_checks)


def _score(s: _Step) -> None:
    """``ctx.scores``: the losses at w the rules read, from the memory or from one forward
    without gradient (with its logits for a rule that reads them)."""
    plan, ctx = s.rt.plan, s.ctx
    if s.remembered is not None:
        ctx.scores = s.remembered.read(s.ids)
    elif plan.scores_first(s.sharp) and plan.needs_logits:
        scores, ctx.logits = s.passes.score()
        ctx.scores = scores.float()
    elif plan.scores_first(s.sharp):
        ctx.scores = s.passes.run(None).float()


def _ascend(s: _Step, rule: SelectionRule) -> _Ascent:
    """The ascent gradient on the rule's rows, then w <- w + eps (w saved first)."""
    rt, ctx, perturbation = s.rt, s.ctx, s.rt.plan.perturbation
    assert perturbation is not None
    selection = rule.select(ctx)
    trainable = rt.params.trainable()
    mask = perturbation.ascent_mask(len(trainable), rt.generator)
    unmasked = [p for p, m in zip(trainable, mask) if not m] if mask else []
    # ESAM's mask: unmasked parameters get no gradient. Switching requires_grad off saves
    # their backward, but a compiled model recompiles for every new pattern, so with
    # compile their gradients are computed and dropped instead.
    switched = [] if rt.compiled else unmasked
    for p in switched:
        p.requires_grad_(False)
    try:
        with contextlib.nullcontext() if rt.sync_perturbation \
                else rt.passes.local_gradients():
            if len(unmasked) == len(trainable):  # nothing to perturb this step
                losses = s.passes.run(selection.index)
            else:
                losses = s.passes.run(selection.index,
                                      lambda part: rule.reduce(part, selection))
    finally:
        for p in switched:
            p.requires_grad_(True)
    for p in unmasked:
        p.grad = None
    if selection.index is None and ctx.scores is None:
        ctx.scores = losses.float()  # a full-batch ascent at w gives the scores
    params, grads = rt.params.with_grad()
    if not params:  # ESAM's mask can leave every parameter unperturbed
        return _Ascent(selection.index, ran=True, losses=losses)
    rt.params.save(params)
    with torch.no_grad():
        norm = perturbation.perturb_(params, grads, rt.params)
    rt.zero_grad()
    # Under fp16 the gradients were scaled: report the norm of the true gradient.
    scaler = rt.grad_scaler
    reported = norm if scaler is None else norm / scaler._get_scale_async()
    return _Ascent(selection.index, ran=True, perturbed=True, grad_norm=reported,
                   checks=(norm,), losses=losses)


def _perturb_from_state(s: _Step) -> _Ascent:
    """w <- w + eps from the optimizer's state (Momentum-SAM); nothing when it has no
    state to use yet."""
    rt, perturbation = s.rt, s.rt.plan.perturbation
    assert perturbation is not None
    params, directions = perturbation.directions(rt.params.params, rt.optimizer)
    if not params:
        return _NO_ASCENT
    params, directions = rt.params.local(params), rt.params.local(directions)
    rt.params.save(params)
    with torch.no_grad():
        norm = perturbation.perturb_(params, directions, rt.params)
    return _Ascent(None, perturbed=True, checks=(norm,))


def _descend(s: _Step, rule: SelectionRule) -> tuple[Tensor | None, Tensor]:
    """The descent gradient on the rule's rows, left in ``.grad``: (the rows, None for
    all; their detached per-sample losses)."""
    passes, ctx = s.passes, s.ctx
    if rule.needs_perturbed_losses and not passes.chunked(passes.n):
        # ESAM: one full forward at w+eps; the gradient flows from the selected rows.
        losses = passes.forward(None, grad=True)
        ctx.perturbed_losses = losses.detach().float()
        selection = rule.select(ctx)
        assert selection.index is not None
        s.rt.passes.backward(rule.reduce(losses.index_select(0, selection.index),
                                         selection))
        return selection.index, losses.detach()
    if rule.needs_perturbed_losses:
        # ESAM in chunks: the losses at w+eps without gradient (a graph over the whole
        # batch is what chunking avoids), then the selected rows' gradient.
        ctx.perturbed_losses = passes.run(None).float()
    selection = rule.select(ctx)
    losses = passes.run(selection.index, lambda part: rule.reduce(part, selection))
    return selection.index, losses


def _finish_gradient(s: _Step) -> None:
    """The descent gradient unscaled (GradScaler) and rewritten by the transform, at w;
    the transform's new state is kept by :func:`apply`."""
    rt = s.rt
    if rt.grad_scaler is not None:
        rt.grad_scaler.unscale_(rt.optimizer)
    transform = rt.plan.transform
    if transform is not None:
        params, grads = rt.params.with_grad()
        with torch.no_grad():
            transform.transform_(params, grads, s.sharp, rt.params)


def _result(s: _Step, ascent: _Ascent, rows: Tensor | None, losses: Tensor) -> ComputedStep:
    """The step's :class:`ComputedStep`; with remembered scores, the losses at w this
    step computed are staged into the memory, and they are the step's loss."""
    ctx = s.ctx
    if s.remembered is not None:
        fresh_rows, fresh = (ascent.index, ascent.losses) if ascent.ran else (rows, losses)
        assert fresh is not None and s.ids is not None
        s.remembered.refresh(s.ids if fresh_rows is None
                             else s.ids.index_select(0, fresh_rows), fresh)
        loss, ctx.scores = fresh.float().mean(), None
    else:
        if ctx.scores is None and rows is None and not ascent.perturbed:
            ctx.scores = losses.float()  # a plain whole-batch pass at w (SGD)
        loss = ctx.scores.mean() if ctx.scores is not None else losses.float().mean()
    whole = s.rt.rows(ctx.batch_size, s.passes.device)
    return ComputedStep(
        loss=loss,
        ascent_indices=ascent.index if ascent.index is not None
        else (whole if ascent.ran else s.rt.rows(0, s.passes.device)),
        descent_indices=whole if rows is None else rows,
        losses=ctx.scores,
        ascent_grad_norm=ascent.grad_norm,
        checks=[loss, *ascent.checks, *s.id_checks],
        sharp=s.sharp)


# ----------------------------------------------------------------------- the update
def verdict(rt: Runtime, computed: ComputedStep) -> Verdict:
    """Whether the step may be applied: its losses and descent gradients are finite (and,
    with a ``finite_reducer``, every rank's), as a 0-d bool on the device, and the descent
    gradient's global norm. Reads the step; changes nothing."""
    _, grads = rt.params.with_grad()
    norms = torch._foreach_norm(grads) if grads else []
    values = [_fp32(c).reshape(()) for c in computed.checks]
    values.extend(_fp32(n) for n in norms)
    stacked = torch.stack(values)  # one stack serves the check and the global norm
    finite = torch.isfinite(stacked).all()
    if rt.finite_reducer is not None:
        finite = rt.finite_reducer(finite)
    grad_norm = rt.params.norm_of(norms, stacked[len(computed.checks):]) if norms else None
    return Verdict(finite=finite, descent_grad_norm=grad_norm)


def apply(rt: Runtime, computed: ComputedStep, verdict: Verdict, skip: bool | Tensor) -> None:
    """The update after :func:`compute`: the descent gradient clipped
    (``max_grad_norm``), the optimizer step, the rules' staged state committed.

    ``skip`` a Python bool: the optimizer steps (through the GradScaler, if any), or on a
    skip the BatchNorm statistics are put back and nothing else changes. ``skip`` a 0-d
    bool tensor (no host sync): the optimizer steps and must itself leave weights and
    state alone where ``skip`` is true - the executor arranged that (a fused kernel reading
    ``found_inf``) - and the BatchNorm statistics are put back where it is true. The
    staged state of the method's parts (:meth:`ksam.plan.StepPlan.commit`) is kept unless
    the step is skipped. Then the gradients are cleared. If the optimizer raises, the
    BatchNorm statistics are put back and the exception propagates."""
    scaler = rt.grad_scaler
    device_skip = isinstance(skip, Tensor)
    try:
        if rt.max_grad_norm is not None and verdict.descent_grad_norm is not None \
                and (device_skip or not skip):
            _, grads = rt.params.with_grad()
            rt.params.clip_(grads, verdict.descent_grad_norm, rt.max_grad_norm)
        if device_skip:
            rt.optimizer.step()
            rt.passes.restore_batchnorm(where=skip)
        elif skip:
            rt.passes.restore_batchnorm()
        elif scaler is not None:
            scaler.step(rt.optimizer)
        else:
            rt.optimizer.step()
    except BaseException:
        rt.passes.restore_batchnorm()
        rt.zero_grad()
        raise
    rt.plan.commit(~skip if device_skip else not skip, computed.sharp)
    if computed.sharp:
        _count_sharp(rt, skip)
    if scaler is not None:
        scaler.update()
    rt.zero_grad()


def _count_sharp(rt: Runtime, skip: bool | Tensor) -> None:
    if not isinstance(skip, Tensor):
        rt.sharp_applied += not skip
        return
    counter = rt.sharp_on_device
    if counter is None or counter.device != skip.device:
        if counter is not None:  # the device moved: keep the count
            rt.sharp_applied += int(counter)
        counter = rt.sharp_on_device = torch.zeros((), dtype=torch.long, device=skip.device)
    counter.add_(~skip)


def _fp32(t: Tensor) -> Tensor:
    # Cast only what is not fp32: each no-op .float() is still a trip through the dispatcher.
    return t if t.dtype == torch.float32 else t.float()
