r"""The two-pass step engine that every method of ksam runs on.

One step, for a mini-batch B and weights w:

1. *scoring* (only if a selection rule needs losses at w and no full-batch pass at w comes
   first): one gradient-free forward over B gives per-sample losses :math:`l = L_B(w)`;
2. *ascent subset* :math:`A` = ascent rule (e.g. top-K1 of l);
   ascent gradient :math:`g = \nabla_w \frac{1}{|A|}\sum_{i\in A} l_i(w)`;
3. *perturbation* :math:`\epsilon` = perturbation rule applied to g (e.g.
   :math:`\rho g/\lVert g\rVert`), :math:`w \leftarrow w + \epsilon`;
4. *descent subset* :math:`D` = descent rule (e.g. top-K2 of the same l);
   descent gradient :math:`\nabla \frac{1}{|D|}\sum_{i\in D} l_i(w+\epsilon)`;
5. *restore* w bit-for-bit (copy back, never subtract eps), then the base optimizer steps
   with the descent gradient.

A method is a choice of ascent rule (or none), perturbation rule and descent rule:

=============== =============== ============================== ======================
method          ascent subset   perturbation                   descent subset
=============== =============== ============================== ======================
SGD             (no ascent)     -                              whole batch
SAM / ASAM      whole batch     rho g/|g|  /  rho T^2 g/|Tg|   whole batch
K-SAM           top-K1 of l     rho g/|g|                      top-K2 of l
random-SAM      random K        rho g/|g|                      whole batch
ESAM            whole batch     stochastic weights, 1/beta     largest loss increase
Ordered SGD     (no ascent)     -                              top-K of l
Momentum-SAM    (no ascent)     -rho v/|v|, v the momentum     whole batch
=============== =============== ============================== ======================

A *schedule* (:mod:`ksam.schedule`) decides per step whether the step is sharpness-aware;
on the other steps a method runs one plain pass over its descent subset at w (late-phase
SAM, RST, LookSAM's interval). A *transform* (:mod:`ksam.transform`) may rewrite the descent
gradient before the optimizer step (LookSAM).

BatchNorm running statistics change only in the step's first full-batch pass (at w, but for
random-subset SAM whose only full-batch pass is the perturbed descent); the others run
with them frozen (see :mod:`ksam.batchnorm`). A step whose losses or gradients are not finite
is skipped: weights, BatchNorm statistics and optimizer state stay exactly as they were.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from numbers import Real
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .batch import Batch, batch_device, batch_labels, batch_size, index_batch
from .batchnorm import BatchNormGuard
from .executor import ComputedStep, EagerExecutor, LossFn, StepResult
from .fast import SyncFreeExecutor
from .perturbation import PerturbationRule, over_shards
from .schedule import Schedule
from .selection import SelectionContext, SelectionRule, WholeBatch
from .sharded import Sharding
from .transform import GradientTransform

__all__ = ["SharpnessAwareOptimizer", "StepResult", "ComputedStep", "LossFn",
           "compile_backend"]

#: ``finite_reducer``: combines this process's 0-d bool "the step is finite" with the other
#: processes' verdicts (DDP: all ranks skip together); see :mod:`ksam.distributed`.
FiniteReducer = Callable[[Tensor], Tensor]


class SharpnessAwareOptimizer:
    """Runs any method of the two-pass family on a model and an existing optimizer.

    Args:
        model: the model (or a DistributedDataParallel wrapper of it).
        optimizer: a built ``torch.optim`` optimizer over (some of) the model's parameters;
            LR schedulers attach to it as usual. Only its parameters are perturbed.
        ascent: selection rule of the ascent pass, or ``None`` for no ascent (and no
            perturbation): SGD and Ordered SGD.
        perturbation: how the ascent gradient becomes eps (required with ``ascent``).
        descent: selection rule of the descent pass.
        grad_scaler: a ``torch.amp.GradScaler`` for fp16 training; a step whose gradients
            overflow is then skipped and the scale backs off.
        autocast_dtype: run the forward passes under ``torch.autocast`` with this dtype
            (``torch.bfloat16`` or ``torch.float16``); ``None`` leaves precision to you.
        fast_path: ``True`` captures whole steps as CUDA graphs where possible (see
            :mod:`ksam.fast`); it falls back to the eager step by itself when it cannot.
        compile: run the forward passes through ``torch.compile`` of the model: ``True``
            for the inductor backend or a backend name (``"aot_eager"``, ...). The model
            you passed stays as it is (its ``state_dict`` keys unchanged); only the passes
            of the step go through the compiled wrapper. Dynamic shapes keep the subset
            passes to a couple of graphs; ESAM computes (and drops) the gradients its
            weight mask leaves out rather than recompile for every mask.
        seed: seed of the engine's own generator (random subsets, ESAM's weight mask).
            Defaults to a draw from torch's global generator, so ``torch.manual_seed``
            makes runs reproducible.
        sync_perturbation: with DistributedDataParallel, average the ascent gradient
            across ranks (default False: each rank perturbs with its own ascent gradient,
            and the ascent pass sends nothing).
        finite_reducer: ``fn(finite) -> finite``, applied to the step's 0-d bool verdict
            "losses and gradients are finite" before the skip decision. Required for a
            DistributedDataParallel model, so that all ranks skip a step together;
            :func:`ksam.distributed.create` passes it.
        schedule: which steps are sharpness-aware (:class:`ksam.schedule.Schedule`); the
            others run one plain pass over the descent subset at w. Default: every step.
        transform: a :class:`ksam.transform.GradientTransform` that rewrites the descent
            gradient before the optimizer step (LookSAM).
        micro_batch_size: run every forward of a step in chunks of at most this many rows:
            gradient-free passes (K-SAM's scoring) chunk by chunk, gradient passes
            accumulating each chunk's share of the pass's loss (a rule's ``reduce`` is a
            mean times a scale, linear in the losses), so the step equals the unchunked one
            up to float summation order. Selection still sees the whole batch. BatchNorm
            layers normalize each chunk with that chunk's statistics; the running statistics
            still change once per step, by the statistics of the full-batch pass's inputs
            over all its chunks (see :class:`ksam.batchnorm.BatchNormGuard`). ``None``
            (default): no chunking.
        max_grad_norm: clip the descent gradient to this global L2 norm right before the
            optimizer step (after a GradScaler's unscale), on the device without a host sync;
            the ascent gradient is not clipped (the perturbation normalizes it).
            ``StepResult.descent_grad_norm`` is the norm before clipping. ``None``: no clip.

    One step is two public stages, which the executors (:class:`ksam.executor.EagerExecutor`,
    :class:`ksam.fast.SyncFreeExecutor`) run: :meth:`compute` (the passes, in the phases
    :meth:`_score`, :meth:`_ascend` or :meth:`_perturb_from_state`, :meth:`_descend`,
    :meth:`_restore`, :meth:`_transform`) and :meth:`finite` + :meth:`apply` (the optimizer
    step or the skip).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        ascent: SelectionRule | None,
        perturbation: PerturbationRule | None,
        descent: SelectionRule,
        grad_scaler: torch.amp.GradScaler | None = None,
        autocast_dtype: torch.dtype | None = None,
        fast_path: bool = False,
        seed: int | None = None,
        sync_perturbation: bool = False,
        compile: bool | str = False,
        finite_reducer: FiniteReducer | None = None,
        schedule: Schedule | None = None,
        transform: GradientTransform | None = None,
        micro_batch_size: int | None = None,
        max_grad_norm: float | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        if ascent is not None and perturbation is None:
            raise ValueError("an ascent rule needs a perturbation rule")
        if perturbation is not None and (ascent is None) == perturbation.needs_ascent:
            raise ValueError(f"{perturbation!r} " + (
                "needs an ascent rule" if ascent is None else "takes no ascent pass"))
        schedule = Schedule() if schedule is None else schedule
        if ascent is None and not schedule.always:
            raise ValueError("a schedule of sharpness-aware steps needs a method with an "
                             "ascent pass")
        if autocast_dtype not in (None, torch.bfloat16, torch.float16):
            raise ValueError(f"autocast_dtype must be None, torch.bfloat16 or torch.float16, "
                             f"got {autocast_dtype!r}")
        backend = compile_backend(compile)
        self.micro_batch_size = _check_micro_batch_size(micro_batch_size)
        self.max_grad_norm = _check_max_grad_norm(max_grad_norm)
        self.model = model
        self.compile = backend
        # What the passes call: the model itself, or torch.compile's wrapper of it.
        self._forward_model = model if backend is None else torch.compile(model, backend=backend)
        self.optimizer = optimizer
        self.ascent = ascent
        self.perturbation = perturbation
        self.descent = descent
        #: which steps are sharpness-aware; the others are one pass over
        #: :attr:`plain_descent` at w
        self.schedule = schedule
        # A plain step's rows: the descent rule's, but the whole batch for a rule defined
        # only under a perturbation (ESAM's largest loss increase).
        self.plain_descent = WholeBatch() if descent.needs_perturbed_losses else descent
        self.transform = transform
        self.grad_scaler = grad_scaler
        self.autocast_dtype = autocast_dtype
        self.sync_perturbation = bool(sync_perturbation)

        if hasattr(model, "no_sync") and finite_reducer is None:
            raise ValueError("a DistributedDataParallel model needs its ranks to skip steps "
                             "together: build the engine with ksam.distributed.create(...) "
                             "or pass finite_reducer=ksam.distributed.all_ranks_true")
        self.finite_reducer = finite_reducer
        model_params = [p for p in model.parameters()]
        known = {id(p) for p in model_params}
        self._params: list[Tensor] = [p for g in optimizer.param_groups for p in g["params"]]
        if not self._params:
            raise ValueError("the optimizer holds no parameters")
        if not any(p.requires_grad for p in self._params):
            raise ValueError(f"all {len(self._params)} parameter(s) of the optimizer are frozen "
                             "(requires_grad=False): there is nothing to train")
        foreign = [p for p in self._params if id(p) not in known]
        if foreign:
            raise ValueError(
                f"the optimizer holds {len(foreign)} parameter(s) that are not the model's: "
                "build it over model.parameters()"
            )
        self._model_params = [p for p in model_params if p.requires_grad]
        #: FSDP2 (``fully_shard``): the parameters' sharding; the engine's arithmetic then runs
        #: on their local shards, norms summed over the shards (:mod:`ksam.sharded`)
        self.sharding = Sharding.of(self._params)
        if self.sharding is not None and finite_reducer is None:
            raise ValueError("an FSDP-sharded model needs its ranks to skip steps together: "
                             "build the engine with ksam.distributed.create(...) or pass "
                             "finite_reducer=ksam.distributed.finite_reducer()")
        self._saved_w: dict[int, Tensor] = {}
        self._row_cache: dict[tuple[int, torch.device], Tensor] = {}
        self._bn = BatchNormGuard(model)
        if self.micro_batch_size is not None:
            self._bn.check_chunkable(compiled=backend is not None)

        # A rule that reads losses at w needs a scoring forward unless the ascent pass is a
        # full-batch pass at w (ESAM) that yields them anyway.
        ascent_is_full = isinstance(ascent, WholeBatch)
        self._needs_scoring = bool(
            (ascent is not None and ascent.needs_scores)
            or (descent.needs_scores and not ascent_is_full)
        )
        # Rules that read class labels (class-balanced selection) get the batch's second
        # element; the batch is checked before the step starts.
        self._needs_labels = bool((ascent is not None and ascent.needs_labels)
                                  or descent.needs_labels)
        if descent.needs_perturbed_losses and ascent is None:
            raise ValueError(f"{descent!r} needs a perturbation: give an ascent rule")
        self._plain_needs_scoring = self.plain_descent.needs_scores
        if transform is not None:
            transform.bind(self._params)

        if seed is None:
            seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
        self.generator = torch.Generator().manual_seed(int(seed))
        self.steps = 0
        #: runs the steps: :class:`SyncFreeExecutor` with ``fast_path``, else eager
        self.executor: EagerExecutor | SyncFreeExecutor = (
            SyncFreeExecutor(self) if fast_path else EagerExecutor(self))

    # ----------------------------------------------------------------------------- API
    def step(self, batch: Batch, loss_fn: LossFn) -> StepResult:
        """One optimizer step on ``batch``; ``loss_fn(model, batch)`` returns per-sample
        losses of shape [n]."""
        n = batch_size(batch)
        self.check_batch(n)
        if self._needs_labels:
            batch_labels(batch, n)
        sharp = self.schedule.next(self.steps, self.generator)
        try:
            return self.executor.step(batch, loss_fn, n, sharp)
        except BaseException:
            self.schedule.sharp_steps -= sharp  # the step did not happen
            raise

    def step_kind(self, sharp: bool) -> tuple:
        """What makes steps differ in the work they do, beyond shapes: sharp or plain and,
        for a perturbation without an ascent pass, how many parameters it moves (none before
        the optimizer has momentum). Host-side; the fast path keeps one graph per kind."""
        moved = 0
        if self.perturbation is not None and not self.perturbation.needs_ascent:
            moved = len(self.perturbation.directions(self._params, self.optimizer)[0])
        return (bool(sharp), moved)

    def check_batch(self, n: int) -> None:
        """Raise ValueError if a batch of ``n`` examples cannot be stepped on."""
        if n < 1:
            raise ValueError("the batch is empty")
        if self.ascent is not None:
            self.ascent.check_batch(n)
        self.descent.check_batch(n)

    @property
    def fast_path(self) -> bool:
        """Whether the engine was built with ``fast_path=True``."""
        return self.executor.fast_path

    @property
    def fast_path_active(self) -> bool:
        """Whether steps run on the fast path (False once it fell back to eager steps)."""
        return self.executor.fast_path and self.executor.reason is None

    @property
    def skipped_steps(self) -> int:
        """Steps skipped because a loss or gradient was not finite."""
        return self.executor.skipped_steps

    def zero_grad(self) -> None:
        for p in self._model_params:
            p.grad = None

    def identity(self) -> dict[str, Any]:
        """What a state of this engine records about the method: its class and the kinds of
        its rules (a state of another method is refused by :meth:`load_state_dict`)."""
        return {
            "method": type(self).__name__,
            "rules": {"ascent": _kind(self.ascent), "perturbation": _kind(self.perturbation),
                      "descent": _kind(self.descent)},
        }

    def state_dict(self, include_optimizer: bool = True) -> dict[str, Any]:
        """Everything needed to resume exactly: the base optimizer's state included, unless
        ``include_optimizer=False`` (a trainer that saves the optimizer on its own)."""
        state = {
            **self.identity(),
            "fast_path": self.fast_path,
            "steps": self.steps,
            "skipped_steps": self.skipped_steps,
            "generator": self.generator.get_state(),
            "ascent": self.ascent.state_dict() if self.ascent is not None else {},
            "descent": self.descent.state_dict(),
            "schedule": self.schedule.state_dict(),
        }
        if self.transform is not None:
            state["transform"] = self.transform.state_dict()
        if include_optimizer:
            state["optimizer"] = self.optimizer.state_dict()
        if self.grad_scaler is not None:
            state["grad_scaler"] = self.grad_scaler.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; one saved without the optimizer leaves the base
        optimizer's state as it is.

        Refused (ValueError, nothing changed): a state of another method or with other
        kinds of rules, and one saved with the other ``fast_path`` setting (the fast path
        steps with the optimizer's fused kernel, the eager path with the kernel you chose,
        so a run would not continue exactly)."""
        self._check_state(state)
        if "optimizer" in state:
            self.optimizer.load_state_dict(state["optimizer"])
        self.steps = int(state["steps"])
        self.generator.set_state(state["generator"])
        if self.ascent is not None:
            self.ascent.load_state_dict(state.get("ascent", {}))
        self.descent.load_state_dict(state.get("descent", {}))
        self.schedule.load_state_dict(state.get("schedule", {}))
        if self.transform is not None:
            self.transform.load_state_dict(state.get("transform", {}))
        if self.grad_scaler is not None and "grad_scaler" in state:
            self.grad_scaler.load_state_dict(state["grad_scaler"])
        self.executor.reset(int(state["skipped_steps"]))

    def _check_state(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict):
            raise TypeError(f"not a ksam state_dict: a {type(state).__name__}")
        missing = {"steps", "skipped_steps", "generator"} - set(state)
        if missing:
            raise KeyError(f"not a ksam state_dict: missing {sorted(missing)}")
        mine = self.identity()
        for key in ("method", "rules"):  # states saved before they were recorded lack them
            if key in state and state[key] != mine[key]:
                raise ValueError(f"this state_dict is of another method: {key} "
                                 f"{state[key]!r}, this engine has {mine[key]!r}")
        if "fast_path" in state and bool(state["fast_path"]) != self.fast_path:
            raise ValueError(f"this state_dict was saved with fast_path={state['fast_path']}, "
                             f"this engine has fast_path={self.fast_path}: the two step the "
                             "optimizer with different kernels; keep the setting to resume")
        generator = state["generator"]
        if not isinstance(generator, Tensor) or generator.dtype != torch.uint8:
            raise ValueError("not a ksam state_dict: 'generator' is not a generator state")

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(ascent={self.ascent!r}, "
                f"perturbation={self.perturbation!r}, descent={self.descent!r})")

    # ----------------------------------------------------------------- stage 1: compute
    def compute(self, batch: Batch, loss_fn: LossFn, n: int | None = None,
                sharp: bool = True) -> ComputedStep:
        """The passes of one step, up to (not including) the optimizer step: the phases
        :meth:`_score`, :meth:`_ascend` (ascent pass and perturbation) or
        :meth:`_perturb_from_state` (a perturbation without ascent pass), :meth:`_descend`,
        :meth:`_restore` (w put back bit for bit) and :meth:`_transform` (the descent
        gradient rewritten). The descent gradient is left in the parameters' ``.grad``.
        ``sharp=False`` (the schedule's plain steps): no ascent, no perturbation, one pass
        over :attr:`plain_descent` at w.

        Branches only on the rules and ``sharp`` (static), never on tensor values: the same
        code runs eagerly and inside a CUDA graph capture. On an exception the gradients
        are cleared, the BatchNorm statistics and the weights put back, and it propagates.
        """
        n = batch_size(batch) if n is None else n
        self.zero_grad()
        self._bn.save()
        step = _Step(self, batch, loss_fn, n, sharp)
        try:
            self._score(step)
            if step.has_ascent:
                self._ascend(step)
            elif sharp and self.perturbation is not None:
                self._perturb_from_state(step)
            try:
                self._descend(step)
            finally:
                self._restore(step)
            self._transform(step)
        except BaseException:
            self._bn.restore()
            self.zero_grad()
            raise
        return step.result()

    def _score(self, step: _Step) -> None:
        """Phase 1: per-sample losses at w without gradient, when a rule reads them and no
        full-batch pass at w comes first."""
        if self._needs_scoring if step.sharp else self._plain_needs_scoring:
            step.ctx.scores = step.run(None).float()

    def _ascend(self, step: _Step) -> None:
        """Phase 2: the ascent gradient on the ascent rule's rows, then the perturbation
        w <- w + eps (w saved first, for :meth:`_restore`)."""
        assert self.ascent is not None and self.perturbation is not None
        selection = self.ascent.select(step.ctx)
        step.ascent_index = selection.index
        mask = self.perturbation.ascent_mask(len(self._params), self.generator)
        frozen = [p for p, m in zip(self._params, mask) if not m] if mask else []
        # ESAM's mask: unmasked parameters get no gradient. Switching requires_grad off saves
        # their backward, but a compiled model recompiles for every new pattern, so with
        # compile their gradients are computed and dropped instead.
        switched = frozen if self.compile is None else []
        for p in switched:
            p.requires_grad_(False)
        try:
            with self._ascent_context():
                if len(frozen) == len(self._params):  # nothing to perturb this step
                    losses = step.run(selection.index)
                else:
                    ascent = self.ascent
                    losses = step.run(selection.index,
                                      lambda part: ascent.reduce(part, selection))
                    for p in frozen:
                        p.grad = None
        finally:
            for p in switched:
                p.requires_grad_(True)
        if selection.index is None and step.ctx.scores is None:
            step.ctx.scores = losses.float()
        self._perturb(step)
        self.zero_grad()

    def _perturb(self, step: _Step) -> None:
        """w <- w + eps from the ascent gradients in ``.grad`` (saving w first)."""
        assert self.perturbation is not None
        perturbed = [p for p in self._params if p.grad is not None and p.requires_grad]
        if not perturbed:  # ESAM's mask can leave every parameter unperturbed
            return
        grads = self._local([p.grad for p in perturbed])
        perturbed = self._local(perturbed)
        torch._foreach_copy_(self._saved_buffers(perturbed), perturbed)
        step.perturbed = perturbed
        with torch.no_grad(), over_shards(self.sharding):
            norm = self.perturbation.perturb_(perturbed, grads)
        step.checks.append(norm)
        # Under fp16 the gradients were scaled: report the norm of the true gradient.
        step.ascent_grad_norm = norm if self.grad_scaler is None \
            else norm / self.grad_scaler._get_scale_async()

    def _perturb_from_state(self, step: _Step) -> None:
        """Phase 2 of a perturbation without ascent pass (Momentum-SAM): w <- w + eps from
        the optimizer's state (w saved first); nothing when it has no state to use yet."""
        assert self.perturbation is not None
        perturbed, directions = self.perturbation.directions(self._params, self.optimizer)
        if not perturbed:
            return
        torch._foreach_copy_(self._saved_buffers(perturbed), perturbed)
        step.perturbed = perturbed
        with torch.no_grad():
            step.checks.append(self.perturbation.perturb_(perturbed, directions))

    def _descend(self, step: _Step) -> None:
        """Phase 3: the descent gradient on the descent rule's rows (at w + eps when
        perturbed; on a plain step, :attr:`plain_descent`'s rows at w), left in ``.grad``."""
        ctx = step.ctx
        rule = self.descent if step.sharp else self.plain_descent
        if rule.needs_perturbed_losses and not step.chunked(step.n):
            # ESAM: one full forward at w+eps; the gradient flows from the selected rows.
            losses = step.forward(None, grad=True)
            ctx.perturbed_losses = losses.detach().float()
            selection = rule.select(ctx)
            assert selection.index is not None
            self._backward(rule.reduce(losses.index_select(0, selection.index), selection))
            losses = losses.detach()
        else:
            if rule.needs_perturbed_losses:
                # ESAM in chunks: the losses at w+eps without gradient (a graph over the
                # whole batch is what chunking avoids), then the selected rows' gradient.
                ctx.perturbed_losses = step.run(None).float()
            selection = rule.select(ctx)
            losses = step.run(selection.index, lambda part: rule.reduce(part, selection))
        step.descent_index = selection.index
        if selection.index is None and ctx.scores is None and not step.perturbed:
            ctx.scores = losses.float()  # SGD: its one pass is at w
        step.loss = ctx.scores.mean() if ctx.scores is not None else losses.float().mean()
        step.checks.append(step.loss)

    def _restore(self, step: _Step) -> None:
        """Phase 4: w copied back bit for bit (never eps subtracted: it would not
        round-trip)."""
        if step.perturbed:
            with torch.no_grad():
                torch._foreach_copy_(step.perturbed, self._saved_buffers(step.perturbed))

    def _transform(self, step: _Step) -> None:
        """Phase 5: the descent-gradient transform (LookSAM), at w, before the finiteness
        check and the optimizer step; its new state is kept by :meth:`apply`."""
        if self.transform is None:
            return
        with_grad = [p for p in self._params if p.grad is not None]
        with torch.no_grad():
            self.transform.transform_(with_grad, [p.grad for p in with_grad], step.sharp)

    # ------------------------------------------------------------------- stage 2: apply
    def finite(self, computed: ComputedStep) -> Tensor:
        """0-d bool on the device: the step's losses and descent gradients are finite (and,
        with ``finite_reducer``, every rank's). Unscales the gradients first with a
        GradScaler."""
        if self.grad_scaler is not None:
            self.grad_scaler.unscale_(self.optimizer)
        # Cast only what is not fp32: each no-op .float() is still a trip through the dispatcher.
        values = [_fp32(c).reshape(()) for c in computed.checks]
        grads = self._local([p.grad for p in self._params if p.grad is not None])
        norms = torch._foreach_norm(grads) if grads else []
        values.extend(_fp32(n) for n in norms)
        stacked = torch.stack(values)
        if norms:  # one stack serves the finiteness check and the global norm
            computed.descent_grad_norm = self._total_norm(
                norms, stacked[len(computed.checks):])
        finite = torch.isfinite(stacked).all()
        if self.finite_reducer is not None:
            finite = self.finite_reducer(finite)
        if grads and self.max_grad_norm is not None:
            self._clip(grads, computed.descent_grad_norm)
        return finite

    def _total_norm(self, norms: list[Tensor], stacked: Tensor) -> Tensor:
        """The global L2 norm from per-tensor norms (``stacked``: the same, as one fp32
        tensor); over all shards under FSDP."""
        if self.sharding is not None:
            return self.sharding.norm(norms)
        return torch.linalg.vector_norm(stacked)

    def _clip(self, grads: list[Tensor], norm: Tensor) -> None:
        """Descent-gradient transform: scale to at most ``max_grad_norm`` (on the device, no
        sync; ``torch.nn.utils.clip_grad_norm_``'s rule and epsilon). A non-finite norm
        makes the gradients non-finite too, but that step is skipped anyway."""
        assert self.max_grad_norm is not None
        coef = torch.clamp(self.max_grad_norm / (norm + 1e-6), max=1.0)
        torch._foreach_mul_(grads, coef)  # a 0-d fp32 factor keeps each gradient's dtype

    def apply(self, computed: ComputedStep, skip: bool | Tensor) -> None:
        """The update after :meth:`compute`.

        ``skip`` a Python bool: the optimizer steps (through the GradScaler, if any), or on
        a skip the BatchNorm statistics are put back and nothing else changes. ``skip`` a
        0-d bool tensor (no host sync): the optimizer steps and must itself leave weights
        and state alone where ``skip`` is true - the executor arranged that (a fused kernel
        reading ``found_inf``) - and the BatchNorm statistics are put back where it is
        true. A transform's new state (LookSAM's v) is kept unless the step is skipped. Then
        the gradients are cleared and the step count advances. If the optimizer raises, the
        BatchNorm statistics are put back and the exception propagates.
        """
        scaler = self.grad_scaler
        try:
            if isinstance(skip, Tensor):
                self.optimizer.step()
                self._bn.restore(where=skip)
            elif skip:
                self._bn.restore()
            elif scaler is not None:
                scaler.step(self.optimizer)
            else:
                self.optimizer.step()
        except BaseException:
            self._bn.restore()
            self.zero_grad()
            raise
        if self.transform is not None:
            self.transform.commit(~skip if isinstance(skip, Tensor) else not skip,
                                  computed.sharp)
        if scaler is not None:
            scaler.update()
        self.zero_grad()
        self.steps += 1

    # ------------------------------------------------------------------------ internals
    def _autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        # No weight-cast cache: each forward casts a weight once anyway, and the cache does not
        # survive CUDA graph capture.
        return torch.autocast(device.type, dtype=self.autocast_dtype, cache_enabled=False)

    def _ascent_context(self) -> contextlib.AbstractContextManager:
        """DDP: the ascent pass (forward and backward) runs without gradient all-reduce
        unless the perturbation is synchronized across ranks."""
        no_sync = getattr(self.model, "no_sync", None)
        if no_sync is not None and not self.sync_perturbation:
            return no_sync()
        return contextlib.nullcontext()

    def _accumulating(self) -> contextlib.AbstractContextManager:
        """A gradient pass's chunks but the last: DDP keeps their gradients local (the last
        chunk's backward all-reduces the sum)."""
        no_sync = getattr(self.model, "no_sync", None)
        return no_sync() if no_sync is not None else contextlib.nullcontext()

    def _backward(self, loss: Tensor) -> None:
        if self.grad_scaler is not None:
            loss = self.grad_scaler.scale(loss)
        loss.backward()

    def _local(self, tensors: list[Tensor]) -> list[Tensor]:
        """The local shards of FSDP2's DTensors (the tensors themselves when unsharded)."""
        return tensors if self.sharding is None else self.sharding.local(tensors)

    def _saved_buffers(self, params: list[Tensor]) -> list[Tensor]:
        out = []
        for p in params:
            buf = self._saved_w.get(id(p))
            if buf is None or buf.shape != p.shape or buf.device != p.device:
                buf = self._saved_w[id(p)] = torch.empty_like(p)
            out.append(buf)
        return out

    def _rows(self, n: int, device: torch.device) -> Tensor:
        """``arange(n)`` on the device, made once per size: the indices of a whole-batch pass
        (no allocation or launch per step; shared between results, do not modify)."""
        rows = self._row_cache.get((n, device))
        if rows is None:
            rows = self._row_cache[(n, device)] = torch.arange(n, device=device)
        return rows


@dataclass
class _Step:
    """The working state of one :meth:`SharpnessAwareOptimizer.compute`, passed from phase
    to phase."""

    engine: SharpnessAwareOptimizer
    batch: Batch
    loss_fn: LossFn
    n: int
    #: the schedule's decision: a sharpness-aware step, or a plain one
    sharp: bool = True
    ctx: SelectionContext = field(init=False)
    device: torch.device = field(init=False)
    #: the step's first full-batch pass updates BatchNorm statistics (at w for every method
    #: but random-subset SAM, whose only full-batch pass is the perturbed descent)
    bn_pending: bool = True
    ascent_index: Tensor | None = None
    descent_index: Tensor | None = None
    has_ascent: bool = False
    perturbed: list[Tensor] = field(default_factory=list)
    ascent_grad_norm: Tensor | None = None
    checks: list[Tensor] = field(default_factory=list)
    loss: Tensor | None = None

    def __post_init__(self) -> None:
        e = self.engine
        self.device = batch_device(self.batch)
        self.has_ascent = e.ascent is not None and self.sharp
        labels = batch_labels(self.batch, self.n) if e._needs_labels else None
        self.ctx = SelectionContext(batch_size=self.n, device=self.device,
                                    generator=e.generator, step=e.steps, labels=labels)

    def forward(self, index: Tensor | None, *, grad: bool) -> Tensor:
        """Per-sample losses of the rows ``index`` (None: all) in one forward, checked for
        shape; the step's first full-batch pass updates the BatchNorm statistics."""
        update_bn = index is None and self.bn_pending
        expected = self.n if index is None else index.numel()
        losses = self._call(index_batch(self.batch, index), expected, grad=grad,
                            freeze_bn=not update_bn)
        if update_bn:
            self.bn_pending = False
        return losses

    def _call(self, sub: Batch, expected: int, *, grad: bool, freeze_bn: bool) -> Tensor:
        e = self.engine
        with e._bn.frozen(freeze_bn), e._autocast(self.device), torch.set_grad_enabled(grad):
            losses = self.loss_fn(e._forward_model, sub)
        _check_losses(losses, expected)
        return losses

    def chunked(self, rows: int) -> bool:
        """Whether a pass over ``rows`` rows runs in more than one chunk."""
        m = self.engine.micro_batch_size
        return m is not None and rows > m

    def run(self, index: Tensor | None,
            objective: Callable[[Tensor], Tensor] | None = None) -> Tensor:
        """A pass over the rows ``index`` (None: all): their detached per-sample losses, and
        with ``objective`` (the rule's reduce) the backward of ``objective(losses)``.

        With ``micro_batch_size`` the rows run in chunks of at most that many. Chunk c's
        backward takes ``objective`` of the pass's losses with every other chunk's entries
        zero: for an objective linear in the losses (a mean times a scale) the chunks'
        gradients add up to the unchunked one, and each chunk's graph is freed before the
        next is built."""
        e = self.engine
        total = self.n if index is None else index.numel()
        if not self.chunked(total):
            losses = self.forward(index, grad=objective is not None)
            if objective is not None:
                e._backward(objective(losses))
            return losses.detach()
        assert e.micro_batch_size is not None
        update_bn = index is None and self.bn_pending
        starts = range(0, total, e.micro_batch_size)
        parts = []
        with e._bn.accumulated() if update_bn else contextlib.nullcontext():
            for start in starts:
                stop = min(start + e.micro_batch_size, total)
                rows = slice(start, stop) if index is None else index[start:stop]
                last = stop == total
                with e._accumulating() if objective is not None and not last \
                        else contextlib.nullcontext():
                    losses = self._call(index_batch(self.batch, rows), stop - start,
                                        grad=objective is not None, freeze_bn=True)
                    if objective is not None:
                        e._backward(objective(F.pad(losses, (start, total - stop))))
                parts.append(losses.detach())
        if update_bn:
            self.bn_pending = False
        return torch.cat(parts)

    def result(self) -> ComputedStep:
        e = self.engine
        assert self.loss is not None
        ascent = self.ascent_index if self.has_ascent else e._rows(0, self.device)
        return ComputedStep(
            loss=self.loss,
            ascent_indices=e._rows(self.n, self.device) if ascent is None else ascent,
            descent_indices=e._rows(self.n, self.device) if self.descent_index is None
            else self.descent_index,
            losses=self.ctx.scores,
            ascent_grad_norm=self.ascent_grad_norm,
            checks=self.checks,
            sharp=self.sharp,
        )


def _kind(rule: object) -> str | None:
    return None if rule is None else type(rule).__name__


def compile_backend(compile: bool | str | None) -> str | None:
    """The torch.compile backend an engine's ``compile`` option names (None: no compile);
    ValueError for a name torch does not know."""
    if compile is None or compile is False:
        return None
    if compile is True:
        return "inductor"
    if not isinstance(compile, str):
        raise ValueError(f"compile must be True, False or a backend name, got {compile!r}")
    import torch._dynamo as dynamo

    known = dynamo.list_backends(exclude_tags=())
    if compile not in known:
        raise ValueError(f"compile: unknown torch.compile backend {compile!r} "
                         f"(known: {', '.join(sorted(known))})")
    return compile


def _check_micro_batch_size(value: int | None) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"micro_batch_size must be an integer >= 1 or None, got {value!r}")
    return value


def _check_max_grad_norm(value: float | None) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, Real) \
            or not (math.isfinite(float(value)) and value > 0):
        raise ValueError(f"max_grad_norm must be a finite number > 0 or None, got {value!r}")
    return float(value)


def _fp32(t: Tensor) -> Tensor:
    return t if t.dtype == torch.float32 else t.float()


def _check_losses(losses: Any, expected: int) -> None:
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
