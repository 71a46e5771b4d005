r"""The method object: a choice of rules bound to a model and an existing optimizer.

:class:`Method` checks its options once, holds the rules (its :attr:`~Method.plan`), the
step counter and the method's generator, and runs each step through an executor
(:mod:`ksam.executor`, :mod:`ksam.fast`) of the functional core (:mod:`ksam.core`, where
the step reads top to bottom). Every method of ksam (:mod:`ksam.methods`) is a
:class:`Method` with one choice of rules. Its state (:meth:`Method.state_dict`) holds
everything needed to resume exactly: counters, generator, the state of every part with
state (:meth:`ksam.plan.StepPlan.stateful`) and the base optimizer's.
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Callable
from numbers import Real
from typing import Any

import torch
from torch import Tensor, nn

from .batch import Batch, batch_index, batch_labels, batch_size
from .core import Runtime, StepResult
from .executor import EagerExecutor
from .fast import SyncFreeExecutor
from .memory import LossTerm, RememberedLosses
from .params import ParameterSet, all_ranks_true, is_ddp
from .passes import LossFn, Passes
from .perturbation import PerturbationRule
from .plan import StepPlan
from .schedule import Schedule
from .selection import SelectionRule
from .transform import GradientTransform
from .validate import check_bool, check_callable, check_int, check_number

__all__ = ["Method", "StepResult", "LossFn", "compile_backend"]

#: ``finite_reducer``: combines this process's 0-d bool "the step is finite" with the other
#: processes' verdicts (DDP, FSDP2: all ranks skip together).
FiniteReducer = Callable[[Tensor], Tensor]
#: The largest seed of the engine's generator (``torch.Generator.manual_seed`` takes 64 bits).
MAX_GENERATOR_SEED = 2**64 - 1


class Method:
    """A method of the two-pass family bound to a model and an existing optimizer: one
    :meth:`step` per batch does all the method's passes and the optimizer's update.

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

    The rules and what follows from them are the method's :attr:`plan` (a
    :class:`ksam.plan.StepPlan`); a step runs the functions of :mod:`ksam.core` through an
    executor (:class:`ksam.executor.EagerExecutor`, or :class:`ksam.fast.SyncFreeExecutor`
    with ``fast_path``).
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
        #: the model and the base optimizer the method steps
        self.model = model
        self.optimizer = optimizer
        #: the torch.compile backend of the passes (None: no compile)
        self.compile = backend
        params = ParameterSet(model, optimizer)
        ddp = is_ddp(model)
        sync = _check_sync_perturbation(sync_perturbation, params)
        if ddp and not sync:  # the replicas' ascent gradients differ
            params.replica_group = getattr(model, "process_group", None)
        if ddp and sync and perturbation is not None and perturbation.masks_ascent \
                and not getattr(model, "find_unused_parameters", False):
            raise ValueError(f"{perturbation!r} with sync_perturbation=True leaves parameters "
                             "without an ascent gradient, which DDP's all-reduce cannot "
                             "bucket: build DDP with find_unused_parameters=True (and the "
                             "same seed on all ranks), or keep the per-rank perturbation")
        memory = self.plan.memory
        group = getattr(model, "process_group", None) if ddp else None
        if memory is not None and (ddp or params.sharded):  # one memory on all ranks
            memory.replicated, memory.group = True, group
        if finite_reducer is None and (ddp or params.sharded):
            finite_reducer = functools.partial(all_ranks_true, group=group)
        passes = Passes(model, compile_backend=backend, autocast_dtype=autocast_dtype,
                        grad_scaler=grad_scaler, micro_batch_size=self.micro_batch_size)
        if transform is not None:
            transform.bind(params.local(params.params))
        if seed is None:
            seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
        #: the method's own generator (random subsets, ESAM's mask, the schedule's draws)
        self.generator = torch.Generator().manual_seed(seed)
        #: steps taken, skipped ones included: written only by :meth:`step` (and
        #: :meth:`load_state_dict`)
        self.steps = 0
        self._rt = Runtime(plan=self.plan, model=model, optimizer=optimizer, params=params,
                           passes=passes, generator=self.generator, sync_perturbation=sync,
                           compiled=backend is not None, finite_reducer=finite_reducer,
                           max_grad_norm=self.max_grad_norm)
        #: runs the steps: :class:`SyncFreeExecutor` with ``fast_path``, else eager
        self._executor: EagerExecutor | SyncFreeExecutor = (
            SyncFreeExecutor(self._rt) if fast_path else EagerExecutor(self._rt))

    # ----------------------------------------------------------------------------- API
    @property
    def plan(self) -> StepPlan:
        """The method's rules and the facts derived from them (:class:`ksam.plan.StepPlan`)."""
        return self._plan

    @plan.setter
    def plan(self, plan: StepPlan) -> None:
        self._plan = plan
        rt = getattr(self, "_rt", None)
        if rt is not None:
            rt.plan = plan

    def step(self, batch: Batch, loss_fn: LossFn) -> StepResult:
        """One optimizer step on ``batch``; ``loss_fn(model, batch)`` returns per-sample
        losses of shape [n] (or :class:`ksam.LossOutput` ``(losses, logits)``).

        The step first takes in the optimizer's current param groups
        (:meth:`follow_optimizer`). A step that raises (bad input, a ``loss_fn`` that
        returns no per-sample losses, a failing optimizer) changes nothing: weights,
        BatchNorm statistics, optimizer and rule state, the step counter, and the method's
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
            result = self._executor.step(batch, loss_fn, n, self.steps, sharp)
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
        look per group); :meth:`step`, :meth:`state_dict` and :meth:`load_state_dict` call
        it. ValueError, nothing changed, when the new parameters are refused (not the
        model's, all frozen)."""
        old = self._rt.params
        if old.follows(self.optimizer):
            return
        params = ParameterSet(self.model, self.optimizer, replica_group=old.replica_group)
        if params.sharded != old.sharded:
            raise ValueError("the optimizer's new parameters are sharded differently from "
                             "those the method was built with: build a new method")
        transform = self.plan.transform
        if transform is not None:  # refuses before it changes anything
            transform.bind(params.local(params.params))
        self._rt.params = params
        self._executor.optimizer_changed()

    def check_batch(self, n: int) -> None:
        """Raise ValueError if a batch of ``n`` examples cannot be stepped on."""
        self.plan.check_batch(n)

    def use_rules(self, **rules: SelectionRule | Schedule | None) -> None:
        """Replace rules of the plan (``ascent=``, ``descent=``, ``schedule=``, ...): a new
        plan is built and checked, and every fact derived from the rules with it."""
        self.plan = self.plan.replace(**rules)

    # Read-only views of the plan's rules.
    ascent = property(lambda self: self.plan.ascent)
    perturbation = property(lambda self: self.plan.perturbation)
    descent = property(lambda self: self.plan.descent)
    schedule = property(lambda self: self.plan.schedule)
    transform = property(lambda self: self.plan.transform)
    grad_scaler = property(lambda self: self._rt.passes.grad_scaler)
    autocast_dtype = property(lambda self: self._rt.passes.autocast_dtype)
    sync_perturbation = property(lambda self: self._rt.sync_perturbation)

    @property
    def fast_path(self) -> bool:
        """Whether the method was built with ``fast_path=True``."""
        return self._executor.fast_path

    @property
    def fast_path_active(self) -> bool:
        """Whether steps run on the fast path (False once it fell back to eager steps)."""
        return self._executor.fast_path and self._executor.reason is None

    @property
    def fast_path_off_reason(self) -> str | None:
        """Why a ``fast_path=True`` method steps eagerly (None: it does not)."""
        return self._executor.reason

    @property
    def sharp_steps(self) -> int:
        """Sharpness-aware steps applied (a skipped step is not counted); the schedule's
        plain steps are the others (host sync on the fast path)."""
        rt = self._rt
        extra = 0 if rt.sharp_on_device is None else int(rt.sharp_on_device)
        return rt.sharp_applied + extra

    @property
    def skipped_steps(self) -> int:
        """Steps skipped because a loss or gradient was not finite."""
        return self._executor.skipped_steps

    def zero_grad(self) -> None:
        """Drop the gradients of every trainable parameter of the model."""
        self._rt.zero_grad()

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
            "ascent": {},
            **{key: part.state_dict() for key, part in plan.stateful()},
        }
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
        if "optimizer" in state:
            self.optimizer.load_state_dict(state["optimizer"])
        applied = int(state["steps"]) > int(state["skipped_steps"])
        for key, part in self.plan.stateful():
            part.load_state_dict(state.get(key, {}), applied=applied)
        if self.grad_scaler is not None and "grad_scaler" in state:
            self.grad_scaler.load_state_dict(state["grad_scaler"])
        self.generator.set_state(state["generator"])
        self.steps = int(state["steps"])
        # States that predate the engine's count kept it in the schedule's entry.
        rt = self._rt
        rt.sharp_applied = int(state.get("sharp_steps",
                                         state.get("schedule", {}).get("sharp_steps", 0)))
        if rt.sharp_on_device is not None:
            rt.sharp_on_device.zero_()
        self._executor.reset(int(state["skipped_steps"]))

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
                hint = ""
                if key == "rules" and isinstance(state[key], dict) \
                        and state[key].get("descent") == "TopLoss" \
                        and mine[key].get("descent") in ("AutoBand", "AutoMarginBand"):
                    # K-SAM's default rule was top-K before 0.2.0
                    hint = ("; a K-SAM state saved with the default rule before ksam 0.2.0 "
                            "is top-K's: build the method with select='top'")
                raise ValueError(f"this state_dict is of another {what}: {key} "
                                 f"{state[key]!r}, this engine has {mine[key]!r}{hint}")
        if "fast_path" in state and bool(state["fast_path"]) != self.fast_path:
            raise ValueError(f"this state_dict was saved with fast_path={state['fast_path']}, "
                             f"this engine has fast_path={self.fast_path}: the two step the "
                             "optimizer with different kernels; keep the setting to resume")
        generator = state["generator"]
        if not isinstance(generator, Tensor) or generator.dtype != torch.uint8:
            raise ValueError("not a ksam state_dict: 'generator' is not a generator state")
        self._check_counters(state)
        lacking = [key for key, part in self.plan.stateful()
                   if part.required and key not in state]
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


def __getattr__(name: str) -> Any:
    if name == "SharpnessAwareOptimizer":  # the name before 0.2
        import warnings

        warnings.warn("ksam.engine.SharpnessAwareOptimizer is deprecated and goes in 0.3: "
                      "use ksam.Method", DeprecationWarning, stacklevel=2)
        return Method
    raise AttributeError(f"module 'ksam.engine' has no attribute {name!r}")


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
    return None if value is None else check_int("micro_batch_size", value, low=1)


def _check_max_grad_norm(value: float | None) -> float | None:
    return None if value is None else check_number("max_grad_norm", value, low=0,
                                                   low_open=True)
