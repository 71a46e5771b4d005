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
from typing import Any

import torch
from torch import Tensor, nn

from .batch import Batch, batch_device, batch_labels, batch_size, index_batch
from .batchnorm import BatchNormGuard
from .perturbation import PerturbationRule
from .selection import SelectionContext, SelectionRule, WholeBatch

LossFn = Callable[[nn.Module, Batch], Tensor]


class StepResult:
    """What one step did. ``loss`` and ``skipped`` are Python values; on the fast path they
    are read from the device only when first accessed, so a step itself never syncs."""

    __slots__ = ("_loss", "_skipped", "ascent_indices", "descent_indices", "losses",
                 "ascent_grad_norm")

    def __init__(self, loss: float | Tensor, skipped: bool | Tensor,
                 ascent_indices: Tensor, descent_indices: Tensor,
                 losses: Tensor | None = None, ascent_grad_norm: Tensor | None = None) -> None:
        self._loss = loss
        self._skipped = skipped
        #: rows of the batch used for the ascent / descent gradient (empty: no ascent pass)
        self.ascent_indices = ascent_indices
        self.descent_indices = descent_indices
        #: detached per-sample losses at w over the whole batch (None when not computed)
        self.losses = losses
        #: L2 norm of the ascent gradient (None without an ascent pass)
        self.ascent_grad_norm = ascent_grad_norm

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

        model_params = [p for p in model.parameters()]
        known = {id(p) for p in model_params}
        self._params: list[Tensor] = [p for g in optimizer.param_groups for p in g["params"]]
        if not self._params:
            raise ValueError("the optimizer holds no parameters")
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
        self._skipped_eager = 0
        self._skipped_device: Tensor | None = None

        self._fast = None
        if fast_path:
            from .fast import FastStep

            self._fast = FastStep(self)

    # ----------------------------------------------------------------------------- API
    def step(self, batch: Batch, loss_fn: LossFn) -> StepResult:
        """One optimizer step on ``batch``; ``loss_fn(model, batch)`` returns per-sample
        losses of shape [n]."""
        n = batch_size(batch)
        self.check_batch(n)
        if self._needs_labels:
            batch_labels(batch, n)
        if self._fast is not None:
            result = self._fast.step(batch, loss_fn, n)
            if result is not None:
                return result
        return self._eager_step(batch, loss_fn, n)

    def check_batch(self, n: int) -> None:
        """Raise ValueError if a batch of ``n`` examples cannot be stepped on."""
        if n < 1:
            raise ValueError("the batch is empty")
        if self.ascent is not None:
            self.ascent.check_batch(n)
        self.descent.check_batch(n)

    @property
    def skipped_steps(self) -> int:
        """Steps skipped because a loss or gradient was not finite."""
        extra = int(self._skipped_device) if self._skipped_device is not None else 0
        return self._skipped_eager + extra

    def zero_grad(self) -> None:
        for p in self._model_params:
            p.grad = None

    def state_dict(self, include_optimizer: bool = True) -> dict[str, Any]:
        """Everything needed to resume exactly: the base optimizer's state included, unless
        ``include_optimizer=False`` (a trainer that saves the optimizer on its own)."""
        state = {
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
        optimizer's state as it is."""
        missing = {"steps", "skipped_steps", "generator"} - set(state)
        if missing:
            raise KeyError(f"not a ksam state_dict: missing {sorted(missing)}")
        if "optimizer" in state:
            self.optimizer.load_state_dict(state["optimizer"])
        self.steps = int(state["steps"])
        self._skipped_eager = int(state["skipped_steps"])
        self._skipped_device = None
        self.generator.set_state(state["generator"])
        if self.ascent is not None:
            self.ascent.load_state_dict(state.get("ascent", {}))
        self.descent.load_state_dict(state.get("descent", {}))
        if self.grad_scaler is not None and "grad_scaler" in state:
            self.grad_scaler.load_state_dict(state["grad_scaler"])
        if self._fast is not None:
            self._fast.reset()

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(ascent={self.ascent!r}, "
                f"perturbation={self.perturbation!r}, descent={self.descent!r})")

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

    def _two_pass(self, batch: Batch, loss_fn: LossFn, n: int) -> dict[str, Any]:
        """Steps 1-5 of the module docstring, up to (not including) the optimizer step.

        Branches only on the rules (static), never on tensor values: the same code runs
        eagerly and inside a CUDA graph capture.
        """
        model = self._forward_model
        device = batch_device(batch)
        # The step's first full-batch pass updates BatchNorm statistics. It is at w for every
        # method but random-subset SAM, whose only full-batch pass is the perturbed descent.
        bn_pending = True

        def forward(index: Tensor | None, *, grad: bool) -> Tensor:
            nonlocal bn_pending
            update_bn = index is None and bn_pending
            expected = n if index is None else index.numel()
            sub = index_batch(batch, index)
            with self._bn.frozen(not update_bn), self._autocast(device), \
                    torch.set_grad_enabled(grad):
                losses = loss_fn(model, sub)
            _check_losses(losses, expected)
            if update_bn:
                bn_pending = False
            return losses

        ctx = SelectionContext(batch_size=n, device=device, generator=self.generator,
                               step=self.steps,
                               labels=batch_labels(batch, n) if self._needs_labels else None)
        checks: list[Tensor] = []
        ascent_norm = None
        perturbed: list[Tensor] = []

        if self._needs_scoring:
            ctx.scores = forward(None, grad=False).detach().float()

        ascent_idx: Tensor | None = self._rows(0, device)  # no ascent pass
        if self.ascent is not None:
            assert self.perturbation is not None
            ascent_idx = self.ascent.select(ctx)
            mask = self.perturbation.ascent_mask(len(self._params), self.generator)
            frozen = [p for p, m in zip(self._params, mask) if not m] if mask else []
            # ESAM's mask: unmasked parameters get no gradient. Switching requires_grad off
            # saves their backward, but a compiled model recompiles for every new pattern,
            # so with compile their gradients are computed and dropped instead.
            switched = frozen if self.compile is None else []
            for p in switched:
                p.requires_grad_(False)
            try:
                with self._ascent_context():
                    if len(frozen) == len(self._params):  # nothing to perturb this step
                        losses = forward(ascent_idx, grad=False)
                    else:
                        losses = forward(ascent_idx, grad=True)
                        self._backward(self.ascent.reduce(losses))
                        for p in frozen:
                            p.grad = None
            finally:
                for p in switched:
                    p.requires_grad_(True)
            if ascent_idx is None and ctx.scores is None:
                ctx.scores = losses.detach().float()
            perturbed = [p for p in self._params if p.grad is not None]
            if perturbed:  # ESAM's mask can leave every parameter unperturbed
                torch._foreach_copy_(self._saved_buffers(perturbed), perturbed)
                with torch.no_grad():
                    ascent_norm = self.perturbation.perturb_(
                        perturbed, [p.grad for p in perturbed])
                checks.append(ascent_norm)
            self.zero_grad()

        try:
            at_w = not perturbed
            if self.descent.needs_perturbed_losses:
                # ESAM: one full forward at w+eps; the gradient flows from the selected rows.
                losses = forward(None, grad=True)
                ctx.perturbed_losses = losses.detach().float()
                descent_idx = self.descent.select(ctx)
                self._backward(self.descent.reduce(losses.index_select(0, descent_idx)))
            else:
                descent_idx = self.descent.select(ctx)
                losses = forward(descent_idx, grad=True)
                self._backward(self.descent.reduce(losses))
            if descent_idx is None and ctx.scores is None and at_w:
                ctx.scores = losses.detach().float()  # SGD: its one pass is at w
            full_loss = ctx.scores.mean() if ctx.scores is not None \
                else losses.detach().float().mean()
        finally:
            if perturbed:
                with torch.no_grad():
                    torch._foreach_copy_(perturbed, self._saved_buffers(perturbed))

        checks.append(full_loss)
        return {
            "loss": full_loss,
            "scores": ctx.scores,
            "ascent_idx": self._rows(n, device) if ascent_idx is None else ascent_idx,
            "descent_idx": self._rows(n, device) if descent_idx is None else descent_idx,
            "ascent_norm": ascent_norm,
            "checks": checks,
        }

    def _rows(self, n: int, device: torch.device) -> Tensor:
        """``arange(n)`` on the device, made once per size: the indices of a whole-batch pass
        (no allocation or launch per step; shared between results, do not modify)."""
        rows = self._row_cache.get((n, device))
        if rows is None:
            rows = self._row_cache[(n, device)] = torch.arange(n, device=device)
        return rows

    def _descent_grads(self) -> list[Tensor]:
        return [p.grad for p in self._params if p.grad is not None]

    def _all_finite(self, checks: list[Tensor], grads: list[Tensor]) -> Tensor:
        # Cast only what is not fp32: each no-op .float() is still a trip through the dispatcher.
        values = [_fp32(c).reshape(()) for c in checks]
        if grads:
            values.extend(_fp32(n) for n in torch._foreach_norm(grads))
        return torch.isfinite(torch.stack(values)).all()

    def _eager_step(self, batch: Batch, loss_fn: LossFn, n: int) -> StepResult:
        self.zero_grad()
        self._bn.save()
        try:
            out = self._two_pass(batch, loss_fn, n)
        except BaseException:
            self._bn.restore()
            self.zero_grad()
            raise
        scaler = self.grad_scaler
        if scaler is not None:
            scaler.unscale_(self.optimizer)
        finite = self._all_finite(out["checks"], self._descent_grads())
        if hasattr(self.model, "no_sync"):  # DDP: losses are checked per rank; skip together
            from .distributed import all_ranks_true

            finite = all_ranks_true(finite, getattr(self.model, "process_group", None))
        loss, ok = torch.stack([out["loss"].float(), finite.float()]).tolist()  # one sync
        if ok:
            if scaler is not None:
                scaler.step(self.optimizer)
            else:
                self.optimizer.step()
        else:
            self._bn.restore()
            self._skipped_eager += 1
        if scaler is not None:
            scaler.update()
        self.zero_grad()
        self.steps += 1
        return _result(out, loss, not ok)


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


def _result(out: dict[str, Any], loss: float | Tensor, skipped: bool | Tensor) -> StepResult:
    return StepResult(loss, skipped, out["ascent_idx"], out["descent_idx"], out["scores"],
                      out["ascent_norm"])


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
