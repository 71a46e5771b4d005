"""Any ksam method inside a Hugging Face ``transformers.Trainer`` loop.

>>> trainer = KSAMTrainer(model=model, args=args, train_dataset=ds,
...                       ksam_method="ksam", ksam_kwargs={"rho": 0.05, "k": 0.25})
>>> trainer.train()

How it fits the Trainer loop (tested with transformers 4.48 and 5.24, accelerate 0.26 and 1.15):

- :meth:`KSAMTrainer.training_step` hands the batch to the ksam engine, which runs every
  forward/backward pass of the method and steps the real optimizer once. It returns the mean
  per-sample loss of the whole batch at w (``StepResult.loss``), which the Trainer logs.
- The Trainer's ``self.optimizer`` is a proxy over the real optimizer whose ``step()`` does
  nothing, so the Trainer's own ``optimizer.step()`` after ``training_step`` cannot step twice.
  It shares ``param_groups`` and ``state`` with the real optimizer, so the LR scheduler sets
  the real learning rates and ``optimizer.pt`` holds the real optimizer's state.
- ``max_grad_norm > 0`` clips the *descent* gradient (the one the optimizer applies) to that
  norm right before the optimizer step, as the plain Trainer clips its gradient; the ascent
  gradient is normalized by the method anyway. The logged ``grad_norm`` is the pre-clip norm
  of the descent gradient (on transformers < 5 it is logged as 0: the loop measures the
  gradients after ksam has already cleared them).
- Checkpoints: ``optimizer.pt`` / ``scheduler.pt`` as usual, plus ``ksam_state.pt`` (engine
  step count, its random generator, rule state), so ``resume_from_checkpoint`` continues
  the run exactly.
- ``bf16=True`` runs the forward passes under bfloat16 autocast.
- K-SAM's ``rescale`` estimates gradient sizes from losses of a known kind: with the
  default per-sample loss, ``loss_kind`` is set from the batch (``"ce"`` single-label
  classification, ``"mse"`` regression, ``"other"`` - no rescale - for token-level and
  multi-label losses, which are means); set ``ksam_kwargs["loss_kind"]`` to override.
- A step that ksam skips (non-finite loss or gradient) leaves the weights alone, but the
  Trainer still counts it and steps the LR scheduler.

Refused at construction (clear ``ValueError``): ``gradient_accumulation_steps > 1`` (a ksam
step needs the whole batch's losses before any gradient, so it cannot be split into
micro-batches), ``fp16`` (accelerate's GradScaler would step an optimizer that has no
gradients; use ``bf16``), DeepSpeed and FSDP (sharded parameters are not supported by the
engine's perturbation).

Per-sample losses (:func:`per_sample_loss`): ksam ranks the examples of a batch, so the
Trainer's batch-mean loss cannot be used; the losses are rebuilt from the model's logits and
the labels, see that function for the rules.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
import transformers
from torch import Tensor, nn

from ..engine import SharpnessAwareOptimizer, StepResult
from ..methods import create
from . import ProxyOptimizer as _ProxyOptimizer

__all__ = ["HFPerSampleLoss", "KSAMTrainer", "logits_of", "per_sample_loss"]

KSAM_STATE_NAME = "ksam_state.pt"
IGNORE_INDEX = -100

PerSampleLossFn = Callable[[nn.Module, dict[str, Any]], Tensor]


# ----------------------------------------------------------------------- per-sample losses


def logits_of(outputs: Any) -> Tensor:
    """The logits of a model output: ``ModelOutput``/dict ``["logits"]``, a tuple's first
    element (HF models return ``(logits, ...)`` when called without labels), or a tensor."""
    if isinstance(outputs, Tensor):
        return outputs
    if isinstance(outputs, Mapping):
        if "logits" not in outputs:
            raise ValueError(f"the model output has no 'logits' (keys: {', '.join(outputs)})")
        return outputs["logits"]
    if isinstance(outputs, (tuple, list)) and outputs and isinstance(outputs[0], Tensor):
        return outputs[0]
    raise TypeError(f"cannot find logits in a model output of type {type(outputs).__name__}")


def per_sample_loss(
    logits: Tensor,
    labels: Tensor,
    *,
    problem_type: str | None = None,
    shift_labels: bool = False,
    ignore_index: int = IGNORE_INDEX,
) -> Tensor:
    """Per-example losses ``[n]`` with the conventions of Hugging Face's own model losses.

    - token level (logits ``[n, T, C]``, labels ``[n, T]``: token classification, LMs): the
      mean cross-entropy over the example's tokens whose label is not ``ignore_index``
      (``shift_labels=True`` first drops the last logit and the first label, as causal LMs
      do). An example with no valid token gets loss 0: it ranks last in a top-K selection
      and adds no gradient, but still counts in the denominator of the mean over the
      selected examples. Each example weighs the same whatever its number of tokens (HF's
      loss weighs tokens equally), because ksam ranks and averages examples.
    - sequence level (logits ``[n, C]``): ``problem_type`` ``"regression"`` - squared error
      (mean over outputs); ``"single_label_classification"`` - cross-entropy;
      ``"multi_label_classification"`` - binary cross-entropy with logits, mean over labels.
      ``None`` infers it as HF does: one output is regression, integer labels single-label,
      otherwise multi-label.

    Losses are computed in float32 whatever the logits' dtype (autocast).
    """
    n = logits.shape[0]
    logits = logits.float()
    if logits.dim() == 3:
        if labels.shape != logits.shape[:2]:
            raise ValueError(f"token-level logits {list(logits.shape)} need labels of shape "
                             f"{list(logits.shape[:2])}, got {list(labels.shape)}")
        if shift_labels:
            logits, labels = logits[:, :-1], labels[:, 1:]
        labels = labels.long()
        token = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=ignore_index,
                                reduction="none")  # [n, T]; 0 where ignored
        count = (labels != ignore_index).sum(1)
        return token.sum(1) / count.clamp(min=1)
    if logits.dim() != 2:
        raise ValueError(f"expected logits [n, C] or [n, T, C], got shape {list(logits.shape)}")
    if problem_type is None:
        if logits.shape[1] == 1:
            problem_type = "regression"
        elif not labels.is_floating_point():
            problem_type = "single_label_classification"
        else:
            problem_type = "multi_label_classification"
    if problem_type == "regression":
        diff = logits.reshape(n, -1) - labels.float().reshape(n, -1)
        return diff.pow(2).mean(1)
    if problem_type == "single_label_classification":
        return F.cross_entropy(logits, labels.reshape(n).long(), reduction="none")
    if problem_type == "multi_label_classification":
        return F.binary_cross_entropy_with_logits(
            logits, labels.float().reshape(logits.shape), reduction="none").mean(1)
    raise ValueError(f"unknown problem_type {problem_type!r}")


def _is_causal_lm(model: nn.Module) -> bool:
    """Whether HF's loss for ``model`` shifts the labels (what the Trainer itself checks)."""
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    except ImportError:  # pragma: no cover - very old or stripped-down transformers
        return False
    return model.__class__.__name__ in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()


class HFPerSampleLoss:
    """``loss_fn(model, inputs)`` for the engine: one forward without the labels (so the
    model does not also compute its own batch-mean loss), then :func:`per_sample_loss`."""

    def __init__(self, label_name: str = "labels", problem_type: str | None = None,
                 shift_labels: bool = False, ignore_index: int = IGNORE_INDEX) -> None:
        self.label_name = label_name
        self.problem_type = problem_type
        self.shift_labels = shift_labels
        self.ignore_index = ignore_index

    def loss_kind(self, inputs: Mapping[str, Any]) -> str:
        """What kind of loss this is for ``inputs`` (:data:`ksam.selection.LOSS_KINDS`, which
        K-SAM's ``rescale`` estimate depends on): ``"ce"`` for single-label
        classification, ``"mse"`` for regression, ``"other"`` for token-level losses (a
        mean over tokens) and multi-label ones (a mean over labels)."""
        labels = inputs.get(self.label_name)
        if self.shift_labels or (isinstance(labels, Tensor) and labels.dim() > 1):
            return "other"  # a mean over tokens (or, with float labels, over labels)
        kind = self.problem_type
        if kind is None and isinstance(labels, Tensor):
            kind = "regression" if labels.is_floating_point() else "single_label_classification"
        return {"single_label_classification": "ce", "regression": "mse"}.get(kind or "",
                                                                             "other")

    def __call__(self, model: nn.Module, inputs: Mapping[str, Any]) -> Tensor:
        if self.label_name not in inputs:
            raise KeyError(f"the batch has no {self.label_name!r} (keys: {', '.join(inputs)})")
        labels = inputs[self.label_name]
        features = {k: v for k, v in inputs.items() if k != self.label_name}
        return per_sample_loss(logits_of(model(**features)), labels,
                               problem_type=self.problem_type, shift_labels=self.shift_labels,
                               ignore_index=self.ignore_index)


# ----------------------------------------------------------------------- optimizer proxies


class _TrainerOptimizer(_ProxyOptimizer):
    """What the Trainer sees: its ``optimizer.step()`` is a no-op, the ksam engine has
    already stepped the real optimizer inside ``training_step``."""

    def step(self, closure: Callable[[], float] | None = None) -> None:
        return None


class _ClippingOptimizer(_ProxyOptimizer):
    """What the engine steps: measures (and with ``max_norm > 0`` clips) the descent
    gradient, then steps the real optimizer."""

    def __init__(self, base: torch.optim.Optimizer, max_norm: float) -> None:
        super().__init__(base)
        self.max_norm = float(max_norm)
        self.last_grad_norm: Tensor | None = None

    def step(self, closure: Callable[[], float] | None = None) -> Any:
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        if grads:
            norm = torch.linalg.vector_norm(
                torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
            if self.max_norm > 0:
                coef = (self.max_norm / (norm + 1e-6)).clamp(max=1.0)
                torch._foreach_mul_(grads, coef.to(grads[0].device))
            self.last_grad_norm = norm.detach()
        return self.base.step(closure)


def _find_trainer_optimizer(opt: Any) -> _TrainerOptimizer | None:
    """Our proxy under any wrappers (accelerate's ``AcceleratedOptimizer`` has ``.optimizer``)."""
    seen = 0
    while opt is not None and seen < 8:
        if isinstance(opt, _TrainerOptimizer):
            return opt
        opt = getattr(opt, "optimizer", None)
        seen += 1
    return None


# ----------------------------------------------------------------------- the Trainer


class KSAMTrainer(transformers.Trainer):
    """A ``transformers.Trainer`` whose every optimizer step is one ksam step.

    Args:
        ksam_method: a name of :func:`ksam.create` (``sgd, sam, asam, ksam, random-sam, esam,
            osgd``).
        ksam_kwargs: options of that method and of the engine (``rho``, ``k``, ``seed``,
            ...). ``autocast_dtype`` defaults to bfloat16 when ``args.bf16``.
        per_sample_loss_fn: ``fn(model, inputs) -> [n]`` to replace the default loss built
            from logits and labels (:class:`HFPerSampleLoss`); needed e.g. for question
            answering (several label tensors).
        problem_type: forces the sequence-level loss (see :func:`per_sample_loss`); default
            the model config's ``problem_type``, else inferred.
        shift_labels: shift token labels as causal LMs do; default: True for the model
            classes the Trainer itself treats as causal LMs.
        **kwargs: everything ``transformers.Trainer`` accepts (``optimizers=(opt, sched)``
            included: ``opt`` becomes the base optimizer).
    """

    def __init__(
        self,
        *args: Any,
        ksam_method: str = "ksam",
        ksam_kwargs: dict[str, Any] | None = None,
        per_sample_loss_fn: PerSampleLossFn | None = None,
        problem_type: str | None = None,
        shift_labels: bool | None = None,
        **kwargs: Any,
    ) -> None:
        self.ksam_method = ksam_method
        self.ksam_kwargs = dict(ksam_kwargs or {})
        # Refuse unsupported settings before the Trainer builds anything from them.
        training_args = kwargs.get("args", args[1] if len(args) > 1 else None)
        if training_args is not None:
            _check_supported(training_args, self.ksam_kwargs)
        super().__init__(*args, **kwargs)
        _check_supported(self.args, self.ksam_kwargs)
        if per_sample_loss_fn is None:
            per_sample_loss_fn = self._default_loss_fn(problem_type, shift_labels)
        self.per_sample_loss_fn = per_sample_loss_fn
        self._ksam: SharpnessAwareOptimizer | None = None
        self._engine_optimizer: _ClippingOptimizer | None = None
        self._pending_ksam_state: dict[str, Any] | None = None
        self.last_step_result: StepResult | None = None
        # Fail on a bad method name or option now rather than at the first step.
        probe = nn.Linear(1, 1)
        create(ksam_method, probe, torch.optim.SGD(probe.parameters(), lr=0.0),
               **self._engine_kwargs())

    # -- construction ---------------------------------------------------------------
    def _default_loss_fn(self, problem_type: str | None,
                         shift_labels: bool | None) -> HFPerSampleLoss:
        names = self.args.label_names
        if names is not None and len(names) != 1:
            raise ValueError(f"the default per-sample loss needs one label tensor, got "
                             f"label_names={names}; pass per_sample_loss_fn")
        label_name = names[0] if names else "labels"
        model = self.model
        config = getattr(model, "config", None)
        if problem_type is None and config is not None:
            problem_type = getattr(config, "problem_type", None)
        if shift_labels is None:
            shift_labels = _is_causal_lm(model)
        return HFPerSampleLoss(label_name, problem_type, bool(shift_labels))

    def _engine_kwargs(self) -> dict[str, Any]:
        kw = dict(self.ksam_kwargs)
        # A fixed default seed: drawing one from torch's global RNG (the engine's default)
        # would shift the Trainer's random stream and break exact resumption.
        kw.setdefault("seed", self.args.seed)
        if self.args.bf16:
            kw.setdefault("autocast_dtype", torch.bfloat16)
        return kw

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """Build the base optimizer as the Trainer would (or take the one passed in
        ``optimizers``) and hide it behind a proxy whose ``step`` is a no-op."""
        existing = _find_trainer_optimizer(self.optimizer)
        if existing is not None:  # a later train() call: same optimizer, fresh wrappers
            self.optimizer = existing
            return existing
        base = super().create_optimizer() if model is None else super().create_optimizer(model)
        self._engine_optimizer = _ClippingOptimizer(base, self.args.max_grad_norm or 0.0)
        self.optimizer = _TrainerOptimizer(base)
        self._ksam = None
        return self.optimizer

    @property
    def base_optimizer(self) -> torch.optim.Optimizer | None:
        """The real optimizer that ksam steps (None before ``create_optimizer``)."""
        return self._engine_optimizer.base if self._engine_optimizer is not None else None

    @property
    def ksam(self) -> SharpnessAwareOptimizer | None:
        """The ksam engine (built at the first training step of each ``train()`` call)."""
        return self._ksam

    def _engine(self, model: nn.Module, inputs: Mapping[str, Any]) -> SharpnessAwareOptimizer:
        """The engine over ``model`` (the wrapped one under DDP, so that the descent
        gradient is all-reduced), rebuilt when the Trainer hands over another wrapper;
        engine state carries over."""
        engine = self._ksam
        if engine is not None and engine.model is model:
            return engine
        if self._engine_optimizer is None:
            raise RuntimeError("create_optimizer() has not run")
        kwargs = self._engine_kwargs()
        # K-SAM's rescale estimate holds for the loss in use only (see HFPerSampleLoss).
        if self.ksam_method.lower() == "ksam" and isinstance(self.per_sample_loss_fn,
                                                             HFPerSampleLoss):
            kwargs.setdefault("loss_kind", self.per_sample_loss_fn.loss_kind(inputs))
        if hasattr(model, "no_sync"):  # DDP: every rank skips a non-finite step together
            from ..distributed import finite_reducer

            kwargs.setdefault("finite_reducer",
                              finite_reducer(getattr(model, "process_group", None)))
        new = create(self.ksam_method, model, self._engine_optimizer, **kwargs)
        carried = _engine_extras(engine) if engine is not None else self._pending_ksam_state
        if carried is not None:
            _load_engine_extras(new, carried)
        self._pending_ksam_state = None
        self._ksam = new
        return new

    # -- the step -------------------------------------------------------------------
    def training_step(self, model: nn.Module, inputs: dict[str, Any],
                      num_items_in_batch: Any = None) -> Tensor:
        """One ksam step on ``inputs``: all passes and the optimizer step. Returns the batch's
        mean per-sample loss (at w) for logging; nothing is left for the Trainer to do."""
        del num_items_in_batch  # each example weighs the same in a ksam step
        model.train()
        if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
            self.optimizer.train()
        inputs = self._prepare_inputs(inputs)
        engine = self._engine(model, inputs)
        result = engine.step(inputs, self.per_sample_loss_fn)
        self.last_step_result = result
        return torch.tensor(result.loss, device=self.args.device)

    # -- grad-norm logging (transformers >= 5 calls these; older versions log 0) -------
    def _clip_grad_norm(self, model: nn.Module) -> Any:
        return self._get_grad_norm(model)

    def _get_grad_norm(self, model: nn.Module, grad_norm: Any = None) -> Any:
        opt = self._engine_optimizer
        if opt is None or opt.last_grad_norm is None:
            return 0.0
        return opt.last_grad_norm

    # -- checkpoints ----------------------------------------------------------------
    def _ksam_state_file(self, folder: str) -> str:
        if self.args.world_size > 1:
            return os.path.join(folder, f"ksam_state_rank{self.args.process_index}.pt")
        return os.path.join(folder, KSAM_STATE_NAME)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        extras = _engine_extras(self._ksam) if self._ksam is not None \
            else self._pending_ksam_state
        if extras is not None:
            os.makedirs(output_dir, exist_ok=True)
            torch.save(extras, self._ksam_state_file(output_dir))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        path = self._ksam_state_file(checkpoint)
        if not os.path.isfile(path):
            return
        extras = torch.load(path, map_location="cpu", weights_only=True)
        if self._ksam is not None:
            _load_engine_extras(self._ksam, extras)
        else:
            self._pending_ksam_state = extras


def _check_supported(args: Any, ksam_kwargs: dict[str, Any]) -> None:
    """Raise ValueError for the Trainer settings a ksam step cannot honour."""
    if args.gradient_accumulation_steps != 1:
        raise ValueError(
            "KSAMTrainer does not support gradient_accumulation_steps > 1: a ksam step ranks "
            "the whole batch before any gradient, so it cannot be split into micro-batches; "
            "raise per_device_train_batch_size instead"
        )
    if args.fp16:
        raise ValueError("KSAMTrainer does not support fp16 (accelerate's GradScaler would step "
                         "an optimizer without gradients); use bf16=True or fp32")
    if getattr(args, "deepspeed", None):
        raise ValueError("KSAMTrainer does not support DeepSpeed")
    if getattr(args, "fsdp", None):
        raise ValueError("KSAMTrainer does not support FSDP")
    for key in ("grad_scaler", "model", "optimizer"):
        if key in ksam_kwargs:
            raise ValueError(f"ksam_kwargs must not set {key!r}: the Trainer provides it")


def _engine_extras(engine: SharpnessAwareOptimizer) -> dict[str, Any]:
    """The engine's state without the base optimizer's (that one is in optimizer.pt)."""
    return engine.state_dict(include_optimizer=False)


def _load_engine_extras(engine: SharpnessAwareOptimizer, extras: dict[str, Any]) -> None:
    engine.load_state_dict(extras)
