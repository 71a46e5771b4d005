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

A method may add a per-example *loss term* to its gradient passes (SAF, MESA: a KL to
remembered or averaged logits, from a ``loss_fn`` that returns
:class:`ksam.memory.LossOutput` ``(losses, logits)``), and K-SAM and Ordered SGD may take
their scores from a per-example memory instead of the scoring forward
(``scores="memory"``). Both read the example ids of an :class:`ksam.batch.IndexedBatch`
``(batch, index)``, ``index`` the examples' positions in the training set (global under
DDP); ``loss_fn`` sees only ``batch``. The memory (:class:`ksam.memory.ExampleMemory`, N rows
on the device) is written only by applied steps and is part of :meth:`state_dict`.

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
import copy
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from numbers import Real
from typing import Any

import torch
from torch import Tensor, nn

from .batch import Batch, IndexedBatch, batch_index, batch_labels, batch_size
from .executor import ComputedStep, EagerExecutor, StepResult, Verdict
from .fast import SyncFreeExecutor
from .memory import LossTerm, RememberedLosses
from .params import ParameterSet, all_ranks_true
from .passes import LossFn, Passes, StepPasses
from .perturbation import PerturbationRule
from .plan import StepPlan
from .schedule import Schedule
from .selection import SelectionContext, SelectionRule
from .transform import GradientTransform
from .validate import check_bool, check_callable, check_int

__all__ = ["SharpnessAwareOptimizer", "StepResult", "ComputedStep", "Verdict", "LossFn",
           "compile_backend"]

#: ``finite_reducer``: combines this process's 0-d bool "the step is finite" with the other
#: processes' verdicts (DDP, FSDP2: all ranks skip together).
FiniteReducer = Callable[[Tensor], Tensor]
#: The largest seed of the engine's generator (``torch.Generator.manual_seed`` takes 64 bits).
MAX_GENERATOR_SEED = 2**64 - 1


class SharpnessAwareOptimizer:
    """Runs any method of the two-pass family on a model and an existing optimizer.

    Args:
        model: the model, or its DistributedDataParallel wrapper, or an FSDP2-sharded model.
        optimizer: a built ``torch.optim`` optimizer over (some of) the model's parameters;
            LR schedulers attach to it as usual. Only its parameters are perturbed.
        ascent: selection rule of the ascent pass, or ``None`` for no ascent pass: SGD,
            Ordered SGD, and Momentum-SAM (whose perturbation comes from the optimizer).
        perturbation: how the ascent gradient becomes eps (required with ``ascent``).
        descent: selection rule of the descent pass.
        grad_scaler: a ``torch.amp.GradScaler`` for fp16 training (or None); a step whose
            gradients overflow is then skipped and the scale backs off.
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
        seed: seed of the engine's own generator (random subsets, ESAM's weight mask, the
            schedule's draws), an int in [0, 2**64 - 1]. Defaults to a draw from torch's
            global generator, so ``torch.manual_seed`` makes runs reproducible.
        sync_perturbation: with DistributedDataParallel, average the ascent gradient
            across ranks (``False``, the default for DDP: each rank perturbs with its own
            ascent gradient, and the ascent pass sends nothing). An FSDP2-sharded model's
            ascent gradient is always averaged (each rank holds only its shard of it):
            ``None`` (default) means that there, and ``False`` is refused.
        finite_reducer: ``fn(finite) -> finite``, applied to the step's 0-d bool verdict
            "losses and gradients are finite" before the skip decision. For a
            DistributedDataParallel or FSDP2 model the default is the logical AND over the
            ranks (:func:`ksam.params.all_ranks_true`), so that all ranks skip a step
            together.
        schedule: which steps are sharpness-aware (:class:`ksam.schedule.Schedule`); the
            others run one plain pass over the descent subset at w. Default: every step.
        transform: a :class:`ksam.transform.GradientTransform` that rewrites the descent
            gradient before the optimizer step (LookSAM).
        micro_batch_size: run every forward of a step in chunks of at most this many rows
            (:mod:`ksam.passes`): gradient-free passes chunk by chunk, gradient passes
            accumulating each chunk's share of the pass's loss (a rule's ``reduce`` is a
            mean times a scale, linear in the losses), so the step equals the unchunked one
            up to float summation order. Selection still sees the whole batch. BatchNorm
            layers normalize each chunk with that chunk's statistics; the running statistics
            still change once per step, by the statistics of the full-batch pass's inputs
            over all its chunks (see :class:`ksam.batchnorm.BatchNormGuard`). ``None``
            (default): no chunking.
        max_grad_norm: clip the descent gradient to this global L2 norm when the update is
            applied (after a GradScaler's unscale), on the device without a host sync; the
            ascent gradient is not clipped (the perturbation normalizes it).
            ``StepResult.descent_grad_norm`` is the norm before clipping. ``None``: no clip.
        term: a :class:`ksam.memory.LossTerm` added to the per-sample losses of the
            gradient passes (SAF, MESA).
        remembered: :class:`ksam.memory.RememberedLosses`: the rules' scores come from the
            memory instead of a scoring forward; the losses at w that the step's passes
            compute refresh it. The step's reported loss is then the mean over those rows,
            ``StepResult.losses`` None, and the step's first pass (a subset) updates the
            BatchNorm statistics.

    A method with a memory refuses a batch that is not an :class:`ksam.batch.IndexedBatch`
    or whose ids are not in [0, N) (ValueError, nothing changed; on the fast path on a GPU,
    where that check would sync, such a step is skipped instead). Under DDP every rank keeps
    all N rows and writes every rank's rows (:class:`ksam.memory.ExampleMemory`).

    **The optimizer's param groups are read at every step.** A group added after the engine
    was built (``optimizer.add_param_group(...)``: progressive unfreezing) is perturbed,
    restored, checked for non-finite gradients and stepped from the next step on, as if it
    had been there, frozen, from the start: the start of every step compares the groups'
    parameter lists with those it last saw (one look per group) and, when they changed,
    rebuilds what depends on them (:meth:`follow_optimizer`); LookSAM's stored direction
    keeps its entries and is zero on the new parameters, and the fast path drops its
    captured graphs and captures them anew.

    Options are checked once, at construction (ValueError): ``seed`` an int in
    [0, 2**64 - 1] (not a bool, float or string), ``fast_path`` a bool, ``grad_scaler`` a
    ``torch.amp.GradScaler`` or None, ``finite_reducer`` a function or None. A step that
    raises changes nothing, the engine's generator included (:meth:`step`).

    The rules and what follows from them are the engine's :attr:`plan` (a
    :class:`ksam.plan.StepPlan`). One step is three public stages, which the executors
    (:class:`ksam.executor.EagerExecutor`, :class:`ksam.fast.SyncFreeExecutor`) run:
    :meth:`compute` (the passes), :meth:`verdict` (may the step be applied?) and
    :meth:`apply` (the optimizer step, or the skip).
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
        sync_perturbation: bool | None = None,
        compile: bool | str = False,
        finite_reducer: FiniteReducer | None = None,
        schedule: Schedule | None = None,
        transform: GradientTransform | None = None,
        micro_batch_size: int | None = None,
        max_grad_norm: float | None = None,
        term: LossTerm | None = None,
        remembered: RememberedLosses | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        #: the method's rules and the facts derived from them
        self.plan = StepPlan(ascent, perturbation, descent,
                             Schedule() if schedule is None else schedule, transform,
                             term, remembered)
        if autocast_dtype not in (None, torch.bfloat16, torch.float16):
            raise ValueError(f"autocast_dtype must be None, torch.bfloat16 or torch.float16, "
                             f"got {autocast_dtype!r}")
        backend = compile_backend(compile)
        check_bool("fast_path", fast_path)
        if seed is not None:
            seed = check_int("seed", seed, high=MAX_GENERATOR_SEED)
        if grad_scaler is not None and not isinstance(grad_scaler, torch.amp.GradScaler):
            raise ValueError(f"grad_scaler must be a torch.amp.GradScaler or None, got "
                             f"{grad_scaler!r}")
        check_callable("finite_reducer", finite_reducer)
        self.micro_batch_size = _check_micro_batch_size(micro_batch_size)
        self.max_grad_norm = _check_max_grad_norm(max_grad_norm)
        self.model = model
        self.optimizer = optimizer
        self.compile = backend
        #: the optimizer's parameters and the arithmetic on them (the one place that knows
        #: FSDP2's shards)
        self.params = ParameterSet(model, optimizer)
        ddp = hasattr(model, "no_sync")
        self.sync_perturbation = _check_sync_perturbation(sync_perturbation, self.params)
        if ddp and not self.sync_perturbation:  # the replicas' ascent gradients differ
            self.params.replica_group = getattr(model, "process_group", None)
        if ddp and self.sync_perturbation and perturbation is not None \
                and perturbation.masks_ascent and not getattr(model, "find_unused_parameters",
                                                              False):
            raise ValueError(f"{perturbation!r} with sync_perturbation=True leaves parameters "
                             "without an ascent gradient, which DDP's all-reduce cannot "
                             "bucket: build DDP with find_unused_parameters=True (and the "
                             "same seed on all ranks), or keep the per-rank perturbation")
        memory = self.plan.memory
        if memory is not None and (ddp or self.params.sharded):  # one memory on all ranks
            memory.replicated = True
            memory.group = getattr(model, "process_group", None) if ddp else None
        if finite_reducer is None and (ddp or self.params.sharded):
            group = getattr(model, "process_group", None) if ddp else None
            finite_reducer = functools.partial(all_ranks_true, group=group)
        self.finite_reducer = finite_reducer
        #: runs the forward and backward passes
        self.passes = Passes(model, compile_backend=backend, autocast_dtype=autocast_dtype,
                             grad_scaler=grad_scaler, micro_batch_size=self.micro_batch_size)
        if transform is not None:
            transform.bind(self.params.local(self.params.params))
        if seed is None:
            seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
        self.generator = torch.Generator().manual_seed(seed)
        #: steps taken, skipped ones included: written only by :meth:`step` (and
        #: :meth:`load_state_dict`)
        self.steps = 0
        # Sharpness-aware steps applied (see sharp_steps): counted on the host, or on the
        # device where the skip is decided there.
        self._sharp_applied = 0
        self._sharp_on_device: Tensor | None = None
        self._row_cache: dict[tuple[int, torch.device], Tensor] = {}
        #: runs the steps: :class:`SyncFreeExecutor` with ``fast_path``, else eager
        self.executor: EagerExecutor | SyncFreeExecutor = (
            SyncFreeExecutor(self) if fast_path else EagerExecutor(self))

    # ----------------------------------------------------------------------------- API
    def step(self, batch: Batch, loss_fn: LossFn) -> StepResult:
        """One optimizer step on ``batch``; ``loss_fn(model, batch)`` returns per-sample
        losses of shape [n].

        The step first takes in the optimizer's current param groups
        (:meth:`follow_optimizer`). A step that raises (bad input, a ``loss_fn`` that
        returns no per-sample losses, a failing optimizer) changes nothing: weights,
        BatchNorm statistics, optimizer and rule state, the step counter, and the engine's
        generator, whose draws of the step are put back, so the next steps are those of a
        run without the failed call."""
        self.follow_optimizer()
        n = batch_size(batch)
        self.check_batch(n)
        if self.plan.needs_labels:
            batch_labels(batch, n)
        memory = self.plan.memory
        if memory is not None:
            ids = batch_index(batch)
            if ids is None or not (self.fast_path_active and ids.is_cuda):
                memory.check_ids(ids, n)
        # The schedule, random subsets and ESAM's mask draw from the generator before the
        # passes that may still refuse the step: its state is put back if they do.
        drawn = self.generator.get_state()
        try:
            sharp = self.plan.schedule.is_sharp(self.steps, self.generator)
            result = self.executor.step(batch, loss_fn, n, sharp)
        except BaseException:
            self.generator.set_state(drawn)
            raise
        self.steps += 1
        return result

    def follow_optimizer(self) -> None:
        """Take in the optimizer's current param groups if their parameter lists changed
        since the engine last looked (``optimizer.add_param_group(...)``, progressive
        unfreezing; a group's list grown or shrunk): everything that depends on the
        parameters is rebuilt for the new list (the parameter set the step perturbs,
        restores and checks for NaN, LookSAM's stored direction, which keeps its entries
        for the parameters it had and is zero on the new ones, and on the fast path the
        captured graphs and the optimizer's preparation). Cheap when nothing changed (one
        look per group); :meth:`step`, :meth:`compute`, :meth:`state_dict` and
        :meth:`load_state_dict` call it. ValueError, nothing changed, when the new
        parameters are refused (not the model's, all frozen)."""
        if self.params.follows(self.optimizer):
            return
        params = ParameterSet(self.model, self.optimizer,
                              replica_group=self.params.replica_group)
        if params.sharded != self.params.sharded:
            raise ValueError("the optimizer's new parameters are sharded differently from "
                             "those the engine was built with: build a new engine")
        transform = self.plan.transform
        if transform is not None:  # refuses before it changes anything
            transform.bind(params.local(params.params))
        self.params = params
        self.executor.optimizer_changed()

    def check_batch(self, n: int) -> None:
        """Raise ValueError if a batch of ``n`` examples cannot be stepped on."""
        self.plan.check_batch(n)

    def use_rules(self, **rules: SelectionRule | Schedule | None) -> None:
        """Replace rules of the plan (``ascent=``, ``descent=``, ``schedule=``, ...): a new
        plan is built and checked, and every fact derived from the rules with it."""
        self.plan = self.plan.replace(**rules)

    def graph_key(self, n: int, sharp: bool) -> tuple:
        """What makes this step on a batch of ``n`` do other work than another step of the
        same shapes (:meth:`ksam.plan.StepPlan.graph_key`) and, for a perturbation from the
        optimizer's state, how many parameters it moves (none before the optimizer has
        momentum). Host-side; the fast path keeps one graph per key."""
        moved = 0
        if sharp and self.plan.perturbs_from_state:
            moved = len(self.plan.perturbation.directions(self.params.params,
                                                          self.optimizer)[0])
        return (*self.plan.graph_key(n, self.steps, sharp), moved)

    # Read-only views of the plan's rules.
    ascent = property(lambda self: self.plan.ascent)
    perturbation = property(lambda self: self.plan.perturbation)
    descent = property(lambda self: self.plan.descent)
    schedule = property(lambda self: self.plan.schedule)
    transform = property(lambda self: self.plan.transform)
    grad_scaler = property(lambda self: self.passes.grad_scaler)
    autocast_dtype = property(lambda self: self.passes.autocast_dtype)

    @property
    def fast_path(self) -> bool:
        """Whether the engine was built with ``fast_path=True``."""
        return self.executor.fast_path

    @property
    def fast_path_active(self) -> bool:
        """Whether steps run on the fast path (False once it fell back to eager steps)."""
        return self.executor.fast_path and self.executor.reason is None

    @property
    def sharp_steps(self) -> int:
        """Sharpness-aware steps applied (a skipped step is not counted); the schedule's
        plain steps are the others (host sync on the fast path)."""
        extra = 0 if self._sharp_on_device is None else int(self._sharp_on_device)
        return self._sharp_applied + extra

    @property
    def skipped_steps(self) -> int:
        """Steps skipped because a loss or gradient was not finite."""
        return self.executor.skipped_steps

    def zero_grad(self) -> None:
        self.params.zero_grad()

    # ----------------------------------------------------------------------- state
    def identity(self) -> dict[str, Any]:
        """What a state of this engine records about the method: its class, the kinds of
        its rules and the optimizer's class (a state of another is refused by
        :meth:`load_state_dict`)."""
        return {"method": type(self).__name__, "rules": self.plan.identity(),
                "optimizer_class": type(self.optimizer).__name__}

    def state_dict(self, include_optimizer: bool = True) -> dict[str, Any]:
        """Everything needed to resume exactly: the base optimizer's state included, unless
        ``include_optimizer=False`` (a trainer that saves the optimizer on its own)."""
        self.follow_optimizer()
        plan = self.plan
        state = {
            **self.identity(),
            "fast_path": self.fast_path,
            "steps": self.steps,
            "sharp_steps": self.sharp_steps,
            "skipped_steps": self.skipped_steps,
            "generator": self.generator.get_state(),
            "ascent": plan.ascent.state_dict() if plan.ascent is not None else {},
            "descent": plan.descent.state_dict(),
        }
        if plan.transform is not None:
            state["transform"] = plan.transform.state_dict()
        if plan.term is not None:
            state["term"] = plan.term.state_dict()
        if plan.memory is not None:
            state["memory"] = plan.memory.state_dict()
        if include_optimizer:
            state["optimizer"] = self.optimizer.state_dict()
        if self.grad_scaler is not None:
            state["grad_scaler"] = self.grad_scaler.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; one saved without the optimizer leaves the base
        optimizer's state as it is.

        Refused (TypeError / ValueError, nothing changed): a state of another method, with
        other kinds of rules or of another optimizer class, one saved with the other
        ``fast_path`` setting (the fast path steps with the optimizer's fused kernel, the
        eager path with the kernel you chose, so a run would not continue exactly), and one
        that does not fit this engine or is not sound: step counters that are not integers
        >= 0 (or more skipped or sharp steps than steps), an optimizer state whose
        parameter tensors do not have the shapes and dtypes of the optimizer's parameters,
        whose hyper-parameters (``lr``, ``momentum``, ...) are not finite numbers >= 0 or
        whose tensors are not finite, a missing or incomplete state of the method's memory
        (its tables, with their shapes), LookSAM's transform (``v``) or MESA's term (the
        average model); and any state that fails to load part of the way: the engine is
        put back as it was."""
        self.follow_optimizer()
        self._check_state(state)
        before = copy.deepcopy(self.state_dict())
        try:
            self._load(state)
        except Exception as exc:
            self._load(before)
            raise ValueError(f"this state_dict does not fit this engine "
                             f"({type(exc).__name__}: {exc}); nothing was changed") from exc

    def _load(self, state: dict[str, Any]) -> None:
        plan = self.plan
        if "optimizer" in state:
            self.optimizer.load_state_dict(state["optimizer"])
        if plan.ascent is not None:
            plan.ascent.load_state_dict(state.get("ascent", {}))
        plan.descent.load_state_dict(state.get("descent", {}))
        if plan.transform is not None:
            plan.transform.load_state_dict(state["transform"])
        if plan.term is not None:
            plan.term.load_state_dict(state["term"])
        if plan.memory is not None:
            applied = int(state["steps"]) - int(state["skipped_steps"])
            plan.memory.load_state_dict(state["memory"], complete=applied > 0)
        if self.grad_scaler is not None and "grad_scaler" in state:
            self.grad_scaler.load_state_dict(state["grad_scaler"])
        self.generator.set_state(state["generator"])
        self.steps = int(state["steps"])
        # States that predate the engine's count kept it in the schedule's entry.
        self._sharp_applied = int(state.get("sharp_steps",
                                            state.get("schedule", {}).get("sharp_steps", 0)))
        if self._sharp_on_device is not None:
            self._sharp_on_device.zero_()
        self.executor.reset(int(state["skipped_steps"]))

    def _check_state(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict):
            raise TypeError(f"not a ksam state_dict: a {type(state).__name__}")
        missing = {"steps", "skipped_steps", "generator"} - set(state)
        if missing:
            raise ValueError(f"not a ksam state_dict: missing {sorted(missing)}")
        mine = self.identity()
        for key in ("method", "rules", "optimizer_class"):  # older states may lack them
            if key in state and state[key] != mine[key]:
                what = "optimizer" if key == "optimizer_class" else "method"
                raise ValueError(f"this state_dict is of another {what}: {key} "
                                 f"{state[key]!r}, this engine has {mine[key]!r}")
        if "fast_path" in state and bool(state["fast_path"]) != self.fast_path:
            raise ValueError(f"this state_dict was saved with fast_path={state['fast_path']}, "
                             f"this engine has fast_path={self.fast_path}: the two step the "
                             "optimizer with different kernels; keep the setting to resume")
        generator = state["generator"]
        if not isinstance(generator, Tensor) or generator.dtype != torch.uint8:
            raise ValueError("not a ksam state_dict: 'generator' is not a generator state")
        self._check_counters(state)
        parts = {"transform": self.plan.transform, "term": self.plan.term,
                 "memory": self.plan.memory}
        lacking = [key for key, part in parts.items() if part is not None and key not in state]
        if lacking:
            raise ValueError(f"this state_dict lacks the method's {', '.join(lacking)} state: "
                             "it would keep this engine's own, and the run would not "
                             "continue exactly")
        if "optimizer" in state:
            _check_optimizer_state(state["optimizer"], self.optimizer)

    @staticmethod
    def _check_counters(state: dict[str, Any]) -> None:
        """The step counters: integers >= 0, no more skipped or sharp steps than steps."""
        steps = check_int("state_dict 'steps'", state["steps"])
        for key in ("skipped_steps", "sharp_steps"):
            if key in state and check_int(f"state_dict {key!r}", state[key]) > steps:
                raise ValueError(f"this state_dict counts {state[key]} {key.replace('_', ' ')} "
                                 f"in {steps} steps")

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(ascent={self.ascent!r}, "
                f"perturbation={self.perturbation!r}, descent={self.descent!r})")

    # ------------------------------------------------------------- stage 1: compute
    def compute(self, batch: Batch, loss_fn: LossFn, n: int | None = None,
                sharp: bool = True) -> ComputedStep:
        """The passes of one step, up to (not including) the update; the descent gradient
        is left, unscaled, in the parameters' ``.grad``. ``sharp=False`` (the schedule's
        plain steps): no ascent, no perturbation, one pass over the plan's plain rows at w.

        Branches only on the plan and ``sharp`` (static), never on tensor values: the same
        code runs eagerly and inside a CUDA graph capture. On an exception the gradients
        are cleared, the BatchNorm statistics and the weights put back, and it propagates.
        """
        self.follow_optimizer()
        plan = self.plan
        n = batch_size(batch) if n is None else n
        self.zero_grad()
        memory, ids, id_checks = plan.memory, None, []
        if memory is not None:  # ids out of range: read and write the spare row, skip
            memory.discard()
            raw = batch_index(batch)
            if raw is None:
                memory.check_ids(raw, n)
            ids, valid = memory.guard(raw)
            batch, id_checks = IndexedBatch(batch.batch, ids), [valid]
        remembered = plan.remembered if plan.scores_first(sharp) else None
        passes = self.passes.begin(batch, loss_fn, n, term=plan.term_at(self.steps),
                                   subset_updates_batchnorm=remembered is not None)
        ctx = SelectionContext(
            batch_size=n, device=passes.device, generator=self.generator, step=self.steps,
            labels=batch_labels(batch, n) if plan.needs_labels else None, ids=ids)
        try:
            # 1. scoring: per-sample losses at w, without gradient
            if remembered is not None:
                ctx.scores = remembered.read(ids)
            elif plan.scores_first(sharp) and plan.needs_logits:
                scores, ctx.logits = passes.score()
                ctx.scores = scores.float()
            elif plan.scores_first(sharp):
                ctx.scores = passes.run(None).float()
            # 2. the ascent gradient and w <- w + eps (or eps from the optimizer's state)
            ascent = _NO_ASCENT
            if sharp and plan.ascent is not None:
                ascent = self._ascend(passes, ctx)
            elif sharp and plan.perturbs_from_state:
                ascent = self._perturb_from_state()
            # 3. the descent gradient on the descent rows; 4. w restored bit for bit
            try:
                rows, losses = self._descend(passes, ctx, plan.descent_rule(sharp))
            finally:
                self.params.restore()
            # 5. the descent gradient unscaled and transformed (LookSAM)
            self._finish_gradient(sharp)
            if remembered is not None:  # the losses at w this step computed refresh memory
                fresh_rows, fresh = (ascent.index, ascent.losses) if ascent.ran \
                    else (rows, losses)
                assert fresh is not None
                remembered.refresh(ids if fresh_rows is None
                                   else ids.index_select(0, fresh_rows), fresh)
        except BaseException:
            self.passes.restore_batchnorm()
            self.zero_grad()
            if memory is not None:
                memory.discard()
            raise
        if remembered is not None:  # the remembered scores are not this step's losses
            loss, ctx.scores = fresh.float().mean(), None
        else:
            if ctx.scores is None and rows is None and not ascent.perturbed:
                ctx.scores = losses.float()  # a plain whole-batch pass at w (SGD)
            loss = ctx.scores.mean() if ctx.scores is not None else losses.float().mean()
        whole = self._rows(n, passes.device)
        return ComputedStep(
            loss=loss,
            ascent_indices=ascent.index if ascent.index is not None
            else (whole if ascent.ran else self._rows(0, passes.device)),
            descent_indices=whole if rows is None else rows,
            losses=ctx.scores,
            ascent_grad_norm=ascent.grad_norm,
            checks=[loss, *ascent.checks, *id_checks],
            sharp=sharp)

    def _ascend(self, passes: StepPasses, ctx: SelectionContext) -> _Ascent:
        """The ascent gradient on the ascent rule's rows, then w <- w + eps."""
        rule, perturbation = self.plan.ascent, self.plan.perturbation
        assert rule is not None and perturbation is not None
        selection = rule.select(ctx)
        trainable = self.params.trainable()
        mask = perturbation.ascent_mask(len(trainable), self.generator)
        unmasked = [p for p, m in zip(trainable, mask) if not m] if mask else []
        # ESAM's mask: unmasked parameters get no gradient. Switching requires_grad off saves
        # their backward, but a compiled model recompiles for every new pattern, so with
        # compile their gradients are computed and dropped instead.
        switched = unmasked if self.compile is None else []
        for p in switched:
            p.requires_grad_(False)
        try:
            with contextlib.nullcontext() if self.sync_perturbation \
                    else self.passes.local_gradients():
                if len(unmasked) == len(trainable):  # nothing to perturb this step
                    losses = passes.run(selection.index)
                else:
                    losses = passes.run(selection.index,
                                        lambda part: rule.reduce(part, selection))
        finally:
            for p in switched:
                p.requires_grad_(True)
        for p in unmasked:
            p.grad = None
        if selection.index is None and ctx.scores is None:
            ctx.scores = losses.float()  # a full-batch ascent at w gives the scores
        params, grads = self.params.with_grad()
        if not params:  # ESAM's mask can leave every parameter unperturbed
            return _Ascent(selection.index, ran=True, losses=losses)
        self.params.save(params)
        with torch.no_grad():
            norm = perturbation.perturb_(params, grads, self.params)
        self.zero_grad()
        # Under fp16 the gradients were scaled: report the norm of the true gradient.
        scaler = self.grad_scaler
        reported = norm if scaler is None else norm / scaler._get_scale_async()
        return _Ascent(selection.index, ran=True, perturbed=True, grad_norm=reported,
                       checks=(norm,), losses=losses)

    def _perturb_from_state(self) -> _Ascent:
        """w <- w + eps from the optimizer's state (Momentum-SAM); nothing when it has no
        state to use yet."""
        perturbation = self.plan.perturbation
        assert perturbation is not None
        params, directions = perturbation.directions(self.params.params, self.optimizer)
        if not params:
            return _NO_ASCENT
        params, directions = self.params.local(params), self.params.local(directions)
        self.params.save(params)
        with torch.no_grad():
            norm = perturbation.perturb_(params, directions, self.params)
        return _Ascent(None, perturbed=True, checks=(norm,))

    def _descend(self, passes: StepPasses, ctx: SelectionContext,
                 rule: SelectionRule) -> tuple[Tensor | None, Tensor]:
        """The descent gradient on ``rule``'s rows, left in ``.grad``: (the rows, None for
        all; their detached per-sample losses)."""
        if rule.needs_perturbed_losses and not passes.chunked(passes.n):
            # ESAM: one full forward at w+eps; the gradient flows from the selected rows.
            losses = passes.forward(None, grad=True)
            ctx.perturbed_losses = losses.detach().float()
            selection = rule.select(ctx)
            assert selection.index is not None
            self.passes.backward(rule.reduce(losses.index_select(0, selection.index),
                                             selection))
            return selection.index, losses.detach()
        if rule.needs_perturbed_losses:
            # ESAM in chunks: the losses at w+eps without gradient (a graph over the whole
            # batch is what chunking avoids), then the selected rows' gradient.
            ctx.perturbed_losses = passes.run(None).float()
        selection = rule.select(ctx)
        losses = passes.run(selection.index, lambda part: rule.reduce(part, selection))
        return selection.index, losses

    def _finish_gradient(self, sharp: bool) -> None:
        """The descent gradient unscaled (GradScaler) and rewritten by the transform, at w;
        the transform's new state is kept by :meth:`apply`."""
        if self.grad_scaler is not None:
            self.grad_scaler.unscale_(self.optimizer)
        transform = self.plan.transform
        if transform is not None:
            params, grads = self.params.with_grad()
            with torch.no_grad():
                transform.transform_(params, grads, sharp, self.params)

    # -------------------------------------------------------- stages 2 and 3: apply
    def verdict(self, computed: ComputedStep) -> Verdict:
        """Whether the step may be applied: its losses and descent gradients are finite
        (and, with ``finite_reducer``, every rank's), as a 0-d bool on the device, and the
        descent gradient's global norm. Reads the step; changes nothing."""
        _, grads = self.params.with_grad()
        norms = torch._foreach_norm(grads) if grads else []
        values = [_fp32(c).reshape(()) for c in computed.checks]
        values.extend(_fp32(n) for n in norms)
        stacked = torch.stack(values)  # one stack serves the check and the global norm
        finite = torch.isfinite(stacked).all()
        if self.finite_reducer is not None:
            finite = self.finite_reducer(finite)
        grad_norm = self.params.norm_of(norms, stacked[len(computed.checks):]) if norms \
            else None
        return Verdict(finite=finite, descent_grad_norm=grad_norm)

    def apply(self, computed: ComputedStep, verdict: Verdict, skip: bool | Tensor) -> None:
        """The update after :meth:`compute`: the descent gradient clipped
        (``max_grad_norm``), the optimizer step, the rules' staged state committed.

        ``skip`` a Python bool: the optimizer steps (through the GradScaler, if any), or on
        a skip the BatchNorm statistics are put back and nothing else changes. ``skip`` a
        0-d bool tensor (no host sync): the optimizer steps and must itself leave weights
        and state alone where ``skip`` is true - the executor arranged that (a fused kernel
        reading ``found_inf``) - and the BatchNorm statistics are put back where it is
        true. The rules' staged updates (AutoBand's estimate, LookSAM's v) are committed
        unless the step is skipped. Then the gradients are cleared. If the optimizer
        raises, the BatchNorm statistics are put back and the exception propagates.
        """
        scaler = self.grad_scaler
        device_skip = isinstance(skip, Tensor)
        try:
            if self.max_grad_norm is not None and verdict.descent_grad_norm is not None \
                    and (device_skip or not skip):
                _, grads = self.params.with_grad()
                self.params.clip_(grads, verdict.descent_grad_norm, self.max_grad_norm)
            if device_skip:
                self.optimizer.step()
                self.passes.restore_batchnorm(where=skip)
            elif skip:
                self.passes.restore_batchnorm()
            elif scaler is not None:
                scaler.step(self.optimizer)
            else:
                self.optimizer.step()
        except BaseException:
            self.passes.restore_batchnorm()
            self.zero_grad()
            raise
        self.plan.commit(~skip if device_skip else not skip, computed.sharp)
        if computed.sharp:
            self._count_sharp(skip)
        if scaler is not None:
            scaler.update()
        self.zero_grad()

    def _count_sharp(self, skip: bool | Tensor) -> None:
        if not isinstance(skip, Tensor):
            self._sharp_applied += not skip
            return
        counter = self._sharp_on_device
        if counter is None or counter.device != skip.device:
            if counter is not None:  # the device moved: keep the count
                self._sharp_applied += int(counter)
            counter = self._sharp_on_device = torch.zeros((), dtype=torch.long,
                                                          device=skip.device)
        counter.add_(~skip)

    def _rows(self, n: int, device: torch.device) -> Tensor:
        """``arange(n)`` on the device, made once per size: the indices of a whole-batch pass
        (no allocation or launch per step; shared between results, do not modify)."""
        rows = self._row_cache.get((n, device))
        if rows is None:
            rows = self._row_cache[(n, device)] = torch.arange(n, device=device)
        return rows


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


#: Hyper-parameters of torch's optimizers that are numbers >= 0 (the others only finite).
_NON_NEGATIVE = ("lr", "momentum", "dampening", "weight_decay", "eps", "alpha")
#: Per-parameter state of torch's optimizers that has its parameter's shape and dtype (the
#: others, such as Adafactor's factored moments, are checked against the optimizer's own
#: state where it has one).
_PARAM_SHAPED = ("momentum_buffer", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "exp_inf",
                 "square_avg", "acc_delta", "sum", "ax", "grad_avg", "prev", "step_size")


def _check_optimizer_state(saved: Any, optimizer: torch.optim.Optimizer) -> None:
    """ValueError unless ``saved`` (an optimizer ``state_dict``) fits ``optimizer``: as many
    groups and parameters, finite hyper-parameters (those of :data:`_NON_NEGATIVE` >= 0),
    and per parameter finite state whose tensors have the shape and dtype of the
    parameter (:data:`_PARAM_SHAPED`) or of the optimizer's present state."""
    if not isinstance(saved, dict) or not isinstance(saved.get("state"), dict) \
            or not isinstance(saved.get("param_groups"), list):
        raise ValueError("the optimizer state is not an optimizer's state_dict")
    groups = saved["param_groups"]
    if len(groups) != len(optimizer.param_groups) or any(
            not isinstance(g, dict) or not isinstance(g.get("params"), list)
            or len(g["params"]) != len(mine["params"])
            for g, mine in zip(groups, optimizer.param_groups)):
        raise ValueError("the optimizer state has other param groups than this optimizer "
                         f"({[len(g['params']) for g in optimizer.param_groups]} parameters)")
    param_of = {key: p for g, mine in zip(groups, optimizer.param_groups)
                for key, p in zip(g["params"], mine["params"])}
    for i, group in enumerate(groups):
        for key, value in group.items():
            if key != "params":
                _check_hyper(f"param group {i} {key!r}", value, key in _NON_NEGATIVE)
    for key, entries in saved["state"].items():
        param = param_of.get(key)
        if param is None or not isinstance(entries, dict):
            raise ValueError(f"the optimizer state holds an entry {key!r} for no parameter "
                             "of this optimizer")
        present = optimizer.state.get(param, {})
        for name, value in entries.items():
            like = param if name in _PARAM_SHAPED else present.get(name)
            _check_param_state(f"the optimizer state's {name!r} of parameter {key}", value,
                               like if isinstance(like, Tensor) else None)


def _check_hyper(what: str, value: Any, non_negative: bool) -> None:
    if isinstance(value, (tuple, list)):
        for v in value:
            _check_hyper(what, v, non_negative)
        return
    if isinstance(value, Tensor) and value.numel() == 1 and value.is_floating_point():
        value = float(value)
    if isinstance(value, bool) or not isinstance(value, Real):
        return  # flags (nesterov, fused), None
    if not math.isfinite(float(value)) or (non_negative and value < 0):
        bound = "a finite number >= 0" if non_negative else "a finite number"
        raise ValueError(f"{what} must be {bound}, got {value!r}")


def _check_param_state(what: str, value: Any, like: Tensor | None) -> None:
    """``value`` finite and, where ``like`` is given, of its shape and dtype."""
    if isinstance(value, Tensor):
        if like is not None and (value.shape != like.shape or value.dtype != like.dtype):
            raise ValueError(f"{what} has shape {list(value.shape)} and dtype {value.dtype}, "
                             f"this optimizer's {list(like.shape)} and {like.dtype}")
        if value.is_floating_point() and not bool(value.isfinite().all()):
            raise ValueError(f"{what} is not finite")
    elif isinstance(value, Real) and not isinstance(value, bool) \
            and not math.isfinite(float(value)):
        raise ValueError(f"{what} is not finite")


def _check_sync_perturbation(value: bool | None, params: ParameterSet) -> bool:
    if value is not None and not isinstance(value, bool):
        raise ValueError(f"sync_perturbation must be True, False or None, got {value!r}")
    if params.sharded:
        if value is False:
            raise ValueError("an FSDP-sharded model's ascent gradient is always averaged "
                             "across ranks (each rank holds only its shard of it): "
                             "sync_perturbation=False is not possible")
        return True
    return bool(value)


def _fp32(t: Tensor) -> Tensor:
    # Cast only what is not fp32: each no-op .float() is still a trip through the dispatcher.
    return t if t.dtype == torch.float32 else t.float()


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


