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
=============== =============== ============================== ======================

BatchNorm running statistics change only in the step's first full-batch pass (at w, but for
random-subset SAM whose only full-batch pass is the perturbed descent); the others run
with them frozen (see :mod:`ksam.batchnorm`). A step whose losses or gradients are not finite
is skipped: weights, BatchNorm statistics and optimizer state stay exactly as they were.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .batch import Batch, batch_device, batch_labels, batch_size, index_batch
from .batchnorm import BatchNormGuard
from .executor import ComputedStep, EagerExecutor, LossFn, StepResult
from .fast import SyncFreeExecutor
from .perturbation import PerturbationRule
from .selection import SelectionContext, SelectionRule, WholeBatch

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

    One step is two public stages, which the executors (:class:`ksam.executor.EagerExecutor`,
    :class:`ksam.fast.SyncFreeExecutor`) run: :meth:`compute` (the passes, in the phases
    :meth:`_score`, :meth:`_ascend`, :meth:`_descend`, :meth:`_restore`) and
    :meth:`finite` + :meth:`apply` (the optimizer step or the skip).
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
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        if (ascent is None) != (perturbation is None):
            raise ValueError("ascent and perturbation rules come together: give both or neither")
        if autocast_dtype not in (None, torch.bfloat16, torch.float16):
            raise ValueError(f"autocast_dtype must be None, torch.bfloat16 or torch.float16, "
                             f"got {autocast_dtype!r}")
        backend = compile_backend(compile)
        self.model = model
        self.compile = backend
        # What the passes call: the model itself, or torch.compile's wrapper of it.
        self._forward_model = model if backend is None else torch.compile(model, backend=backend)
        self.optimizer = optimizer
        self.ascent = ascent
        self.perturbation = perturbation
        self.descent = descent
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
        self._saved_w: dict[int, Tensor] = {}
        self._row_cache: dict[tuple[int, torch.device], Tensor] = {}
        self._bn = BatchNormGuard(model)

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
        return self.executor.step(batch, loss_fn, n)

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
        }
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
    def compute(self, batch: Batch, loss_fn: LossFn, n: int | None = None) -> ComputedStep:
        """The passes of one step, up to (not including) the optimizer step: the phases
        :meth:`_score`, :meth:`_ascend` (ascent pass and perturbation), :meth:`_descend`
        and :meth:`_restore` (w put back bit for bit). The descent gradient is left in the
        parameters' ``.grad``.

        Branches only on the rules (static), never on tensor values: the same code runs
        eagerly and inside a CUDA graph capture. On an exception the gradients are cleared,
        the BatchNorm statistics and the weights put back, and it propagates.
        """
        n = batch_size(batch) if n is None else n
        self.zero_grad()
        self._bn.save()
        step = _Step(self, batch, loss_fn, n)
        try:
            self._score(step)
            if self.ascent is not None:
                self._ascend(step)
            try:
                self._descend(step)
            finally:
                self._restore(step)
        except BaseException:
            self._bn.restore()
            self.zero_grad()
            raise
        return step.result()

    def _score(self, step: _Step) -> None:
        """Phase 1: per-sample losses at w without gradient, when a rule reads them and no
        full-batch pass at w comes first."""
        if self._needs_scoring:
            step.ctx.scores = step.forward(None, grad=False).detach().float()

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
                    losses = step.forward(selection.index, grad=False)
                else:
                    losses = step.forward(selection.index, grad=True)
                    self._backward(self.ascent.reduce(losses, selection))
                    for p in frozen:
                        p.grad = None
        finally:
            for p in switched:
                p.requires_grad_(True)
        if selection.index is None and step.ctx.scores is None:
            step.ctx.scores = losses.detach().float()
        self._perturb(step)
        self.zero_grad()

    def _perturb(self, step: _Step) -> None:
        """w <- w + eps from the ascent gradients in ``.grad`` (saving w first)."""
        assert self.perturbation is not None
        perturbed = [p for p in self._params if p.grad is not None and p.requires_grad]
        if not perturbed:  # ESAM's mask can leave every parameter unperturbed
            return
        torch._foreach_copy_(self._saved_buffers(perturbed), perturbed)
        step.perturbed = perturbed
        with torch.no_grad():
            norm = self.perturbation.perturb_(perturbed, [p.grad for p in perturbed])
        step.checks.append(norm)
        # Under fp16 the gradients were scaled: report the norm of the true gradient.
        step.ascent_grad_norm = norm if self.grad_scaler is None \
            else norm / self.grad_scaler._get_scale_async()

    def _descend(self, step: _Step) -> None:
        """Phase 3: the descent gradient on the descent rule's rows (at w + eps when
        perturbed), left in ``.grad``."""
        ctx = step.ctx
        if self.descent.needs_perturbed_losses:
            # ESAM: one full forward at w+eps; the gradient flows from the selected rows.
            losses = step.forward(None, grad=True)
            ctx.perturbed_losses = losses.detach().float()
            selection = self.descent.select(ctx)
            assert selection.index is not None
            self._backward(self.descent.reduce(losses.index_select(0, selection.index),
                                               selection))
        else:
            selection = self.descent.select(ctx)
            losses = step.forward(selection.index, grad=True)
            self._backward(self.descent.reduce(losses, selection))
        step.descent_index = selection.index
        if selection.index is None and ctx.scores is None and not step.perturbed:
            ctx.scores = losses.detach().float()  # SGD: its one pass is at w
        step.loss = ctx.scores.mean() if ctx.scores is not None \
            else losses.detach().float().mean()
        step.checks.append(step.loss)

    def _restore(self, step: _Step) -> None:
        """Phase 4: w copied back bit for bit (never eps subtracted: it would not
        round-trip)."""
        if step.perturbed:
            with torch.no_grad():
                torch._foreach_copy_(step.perturbed, self._saved_buffers(step.perturbed))

    # ------------------------------------------------------------------- stage 2: apply
    def finite(self, computed: ComputedStep) -> Tensor:
        """0-d bool on the device: the step's losses and descent gradients are finite (and,
        with ``finite_reducer``, every rank's). Unscales the gradients first with a
        GradScaler."""
        if self.grad_scaler is not None:
            self.grad_scaler.unscale_(self.optimizer)
        # Cast only what is not fp32: each no-op .float() is still a trip through the dispatcher.
        values = [_fp32(c).reshape(()) for c in computed.checks]
        grads = [p.grad for p in self._params if p.grad is not None]
        if grads:
            values.extend(_fp32(n) for n in torch._foreach_norm(grads))
        finite = torch.isfinite(torch.stack(values)).all()
        if self.finite_reducer is not None:
            finite = self.finite_reducer(finite)
        return finite

    def apply(self, computed: ComputedStep, skip: bool | Tensor) -> None:
        """The update after :meth:`compute`.

        ``skip`` a Python bool: the optimizer steps (through the GradScaler, if any), or on
        a skip the BatchNorm statistics are put back and nothing else changes. ``skip`` a
        0-d bool tensor (no host sync): the optimizer steps and must itself leave weights
        and state alone where ``skip`` is true - the executor arranged that (a fused kernel
        reading ``found_inf``) - and the BatchNorm statistics are put back where it is
        true. Then the gradients are cleared and the step count advances. If the optimizer
        raises, the BatchNorm statistics are put back and the exception propagates.
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

    def _backward(self, loss: Tensor) -> None:
        if self.grad_scaler is not None:
            loss = self.grad_scaler.scale(loss)
        loss.backward()

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
        self.has_ascent = e.ascent is not None
        labels = batch_labels(self.batch, self.n) if e._needs_labels else None
        self.ctx = SelectionContext(batch_size=self.n, device=self.device,
                                    generator=e.generator, step=e.steps, labels=labels)

    def forward(self, index: Tensor | None, *, grad: bool) -> Tensor:
        """Per-sample losses of the rows ``index`` (None: all), checked for shape."""
        e = self.engine
        update_bn = index is None and self.bn_pending
        expected = self.n if index is None else index.numel()
        sub = index_batch(self.batch, index)
        with e._bn.frozen(not update_bn), e._autocast(self.device), \
                torch.set_grad_enabled(grad):
            losses = self.loss_fn(e._forward_model, sub)
        _check_losses(losses, expected)
        if update_bn:
            self.bn_pending = False
        return losses

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
