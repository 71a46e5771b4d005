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
- ``max_grad_norm > 0`` becomes the engine's ``max_grad_norm``: the *descent* gradient (the
  one the optimizer applies) is clipped to that norm right before the optimizer step, as the
  plain Trainer clips its gradient; the ascent gradient is normalized by the method anyway.
  The logged ``grad_norm`` is the pre-clip norm of the descent gradient
  (``StepResult.descent_grad_norm``; on transformers < 5 it is logged as 0: the loop
  measures the gradients after ksam has already cleared them).
- ``gradient_accumulation_steps = G > 1`` becomes the engine's ``micro_batch_size``: the G
  micro-batches of one optimizer step are gathered (sequences padded to the longest, labels
  with -100, attention masks with 0) and stepped as one batch of G x
  ``per_device_train_batch_size`` examples whose forwards run in chunks of
  ``per_device_train_batch_size``. K-SAM thus ranks all G micro-batches together, and no
  forward is larger than without accumulation. The first G-1 ``training_step`` calls of an
  optimizer step return 0 and the last one the whole batch's mean loss, so the logged loss
  is the mean over the G micro-batches.
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

- ``fp16=True``: the engine owns the GradScaler (``KSAMTrainer.grad_scaler``) and runs the
  passes under float16 autocast; it scales every backward, unscales the descent gradient
  once before clipping and the optimizer step, skips a step whose gradients overflow and
  backs the scale off. Accelerate's own scaler is removed (``accelerator.scaler = None``):
  it would unscale and step the optimizer the Trainer holds, which has no gradients by then
  (ksam has stepped the real optimizer already). The scaler's state rides in
  ``ksam_state.pt``.

Refused at construction (clear ``ValueError``): DeepSpeed and the Trainer's FSDP (the
engine runs on FSDP2 models through :mod:`ksam.distributed`, not through accelerate's
wrapper).

Per-sample losses (:func:`per_sample_loss`): ksam ranks the examples of a batch, so the
Trainer's batch-mean loss cannot be used; the losses are rebuilt from the model's logits and
the labels, see that function for the rules.

Example ids and logits (SAF, MESA, K-SAM / Ordered SGD with ``scores="memory"``):

- ids: each example of ``train_dataset`` carries its position in it in the column
  :data:`INDEX_COLUMN` (``"ksam_index"``); :func:`with_example_index` adds it to a
  ``datasets.Dataset`` or wraps a torch dataset of dicts. The column is kept by
  ``remove_unused_columns``, merged with the rest of a gradient accumulation's
  micro-batches, and taken out of the batch before the model sees it: the engine gets
  ``ksam.IndexedBatch(inputs, index)`` (also for a method that reads no ids; evaluation
  drops the column). A method that needs the ids refuses a dataset without the column
  (``ValueError`` at construction for a ``datasets.Dataset``, else at the first training
  step, before any weight changes). ``num_examples`` defaults to ``len(train_dataset)``
  for the methods that take it (:func:`ksam.methods.takes_num_examples`).
- logits: for SAF and MESA the default loss returns ``ksam.LossOutput(losses, logits)``
  (:class:`HFPerSampleLoss` ``return_logits``); they need one logit vector per example, so
  token-level models are refused for them. A ``per_sample_loss_fn`` of your own returns
  ``LossOutput`` for these methods itself.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
import transformers
from torch import Tensor, nn

from ..batch import IndexedBatch
from ..engine import Method, StepResult
from ..memory import LossOutput
from ..methods import create, takes_num_examples
from ..params import is_ddp
from . import ProxyOptimizer as _ProxyOptimizer

__all__ = ["INDEX_COLUMN", "ExampleIndexed", "HFPerSampleLoss", "KSAMTrainer", "logits_of",
           "per_sample_loss", "with_example_index"]

KSAM_STATE_NAME = "ksam_state.pt"
IGNORE_INDEX = -100
#: The dataset column holding each training example's position in ``train_dataset``: the
#: example ids of methods with a per-example memory (see the module docstring).
INDEX_COLUMN = "ksam_index"

PerSampleLossFn = Callable[[nn.Module, dict[str, Any]], "Tensor | LossOutput"]


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
    model does not also compute its own batch-mean loss), then :func:`per_sample_loss`.

    ``return_logits=True`` returns ``ksam.LossOutput(losses, logits)`` instead of the losses
    (for SAF and MESA, which read the logits); ValueError then for token-level logits
    ``[n, T, C]`` (those methods need one logit vector ``[n, C]`` per example)."""

    def __init__(self, label_name: str = "labels", problem_type: str | None = None,
                 shift_labels: bool = False, ignore_index: int = IGNORE_INDEX,
                 return_logits: bool = False) -> None:
        self.label_name = label_name
        self.problem_type = problem_type
        self.shift_labels = shift_labels
        self.ignore_index = ignore_index
        self.return_logits = return_logits

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

    def __call__(self, model: nn.Module, inputs: Mapping[str, Any]) -> Tensor | LossOutput:
        if self.label_name not in inputs:
            raise KeyError(f"the batch has no {self.label_name!r} (keys: {', '.join(inputs)})")
        labels = inputs[self.label_name]
        features = {k: v for k, v in inputs.items() if k != self.label_name}
        logits = logits_of(model(**features))
        if self.return_logits and logits.dim() != 2:
            raise ValueError(f"this method reads one logit vector [n, C] per example; the "
                             f"model gives logits of shape {list(logits.shape)}: token-level "
                             "models are not supported by SAF and MESA")
        losses = per_sample_loss(logits, labels, problem_type=self.problem_type,
                                 shift_labels=self.shift_labels,
                                 ignore_index=self.ignore_index)
        return LossOutput(losses, logits) if self.return_logits else losses


# ----------------------------------------------------------------------- example ids


def with_example_index(dataset: Any, column: str = INDEX_COLUMN) -> Any:
    """``dataset`` with each example's position in it under ``column`` (an int), the
    example ids :class:`KSAMTrainer` reads: a ``datasets.Dataset`` gets a new column
    (``add_column``), any other map-style dataset of dict examples is wrapped
    (:class:`ExampleIndexed`). Add the column to the dataset given as ``train_dataset``,
    after any filtering or selection, so that the ids are positions in it. ValueError if
    ``dataset`` already has ``column``."""
    names = getattr(dataset, "column_names", None)
    if callable(getattr(dataset, "add_column", None)) and isinstance(names, list):
        if column in names:
            raise ValueError(f"the dataset already has a column {column!r}")
        return dataset.add_column(column, list(range(len(dataset))))
    return ExampleIndexed(dataset, column)


class ExampleIndexed(torch.utils.data.Dataset):
    """A map-style dataset of dict examples with each example's position ``i`` added under
    ``column`` (see :func:`with_example_index`). TypeError for an example that is not a
    mapping, ValueError for one that already has ``column``."""

    def __init__(self, dataset: Any, column: str = INDEX_COLUMN) -> None:
        self.dataset = dataset
        self.column = column

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = self.dataset[i]
        if not isinstance(item, Mapping):
            raise TypeError(f"with_example_index needs examples that are dicts, got "
                            f"{type(item).__name__}")
        if self.column in item:
            raise ValueError(f"the example already has a {self.column!r}")
        return {**item, self.column: int(i)}


# ----------------------------------------------------------------------- optimizer proxies


class _TrainerOptimizer(_ProxyOptimizer):
    """What the Trainer sees: its ``optimizer.step()`` is a no-op, the ksam engine has
    already stepped the real optimizer inside ``training_step``."""

    def step(self, closure: Callable[[], float] | None = None) -> None:
        return None


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
            osgd, saf, mesa``, ...); those with a per-example memory need
            :data:`INDEX_COLUMN` in ``train_dataset`` (see the module docstring).
        ksam_kwargs: options of that method and of the engine (``rho``, ``k``, ``seed``,
            ...). ``autocast_dtype`` defaults to bfloat16 when ``args.bf16``;
            ``num_examples`` to ``len(train_dataset)`` for the methods that take it.
        per_sample_loss_fn: ``fn(model, inputs) -> [n]`` to replace the default loss built
            from logits and labels (:class:`HFPerSampleLoss`); needed e.g. for question
            answering (several label tensors). It returns ``ksam.LossOutput(losses,
            logits)`` for SAF and MESA. ``inputs`` never holds :data:`INDEX_COLUMN`.
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
        #: fp16: the engine's GradScaler (accelerate's is removed; see the module docstring)
        self.grad_scaler: torch.amp.GradScaler | None = None
        if self.args.fp16:
            # accelerate's AMP off altogether: no scaler to step or unscale (transformers < 5
            # clips through accelerator.clip_grad_norm_, which unscales when native_amp is
            # on), no autocast wrapper around the model's forward (the engine autocasts).
            self.accelerator.scaler = None
            self.accelerator.native_amp = False
            self.grad_scaler = torch.amp.GradScaler(self.args.device.type)
        self._ksam: Method | None = None
        self._engine_optimizer: torch.optim.Optimizer | None = None
        self._micro_batches: list[dict[str, Any]] = []  # gradient accumulation's, so far
        self._pending_ksam_state: dict[str, Any] | None = None
        self.last_step_result: StepResult | None = None
        # Fail on a bad method name or option now rather than at the first step; the probe
        # also says whether the method reads example ids (a memory) or logits (a loss term).
        probe = nn.Linear(1, 1)
        plan = create(ksam_method, probe, torch.optim.SGD(probe.parameters(), lr=0.0),
                      **self._engine_kwargs()).plan
        #: the method keeps a per-example memory: every batch must carry INDEX_COLUMN
        self.needs_example_ids = plan.memory is not None
        #: the method reads the logits (a loss term, a rule of the label margin): the
        #: per-sample loss returns ksam.LossOutput
        self.needs_logits = plan.term is not None or plan.needs_logits
        if per_sample_loss_fn is None:
            per_sample_loss_fn = self._default_loss_fn(problem_type, shift_labels)
        self.per_sample_loss_fn = per_sample_loss_fn
        names = getattr(self.train_dataset, "column_names", None)
        if self.needs_example_ids and isinstance(names, list) and INDEX_COLUMN not in names:
            raise ValueError(self._missing_index_message())

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
        return HFPerSampleLoss(label_name, problem_type, bool(shift_labels),
                               return_logits=self.needs_logits)

    def _missing_index_message(self) -> str:
        return (f"ksam_method={self.ksam_method!r} keeps a per-example memory and reads each "
                f"example's id from the train_dataset column {INDEX_COLUMN!r}, which it does "
                f"not have: add it with ksam.integrations.transformers.with_example_index("
                f"train_dataset)")

    def _default_num_examples(self) -> int:
        """``len(train_dataset)`` (ValueError where there is none)."""
        try:
            return len(self.train_dataset)  # type: ignore[arg-type]
        except TypeError:
            raise ValueError(f"ksam_method={self.ksam_method!r} keeps a per-example memory "
                             f"of the training set: give ksam_kwargs['num_examples'] (the "
                             f"train_dataset has no length)") from None

    def _engine_kwargs(self) -> dict[str, Any]:
        kw = dict(self.ksam_kwargs)
        # A fixed default seed: drawing one from torch's global RNG (the engine's default)
        # would shift the Trainer's random stream and break exact resumption.
        kw.setdefault("seed", self.args.seed)
        if self.args.bf16:
            kw.setdefault("autocast_dtype", torch.bfloat16)
        if self.grad_scaler is not None:
            kw.setdefault("autocast_dtype", torch.float16)
            kw["grad_scaler"] = self.grad_scaler
        if self.args.max_grad_norm and self.args.max_grad_norm > 0:
            kw.setdefault("max_grad_norm", self.args.max_grad_norm)
        if self.args.gradient_accumulation_steps > 1:
            kw.setdefault("micro_batch_size", self.args.per_device_train_batch_size)
        if "num_examples" not in kw and takes_num_examples(self.ksam_method, kw):
            # The ids are positions in train_dataset (global ones under DDP: the sampler's).
            kw["num_examples"] = self._default_num_examples()
        return kw

    def _set_signature_columns_if_needed(self) -> None:
        # remove_unused_columns keeps the columns named by the model's forward signature
        # (datasets.Dataset columns, and dict keys through the Trainer's collator wrapper):
        # the example ids must survive it to reach training_step.
        super()._set_signature_columns_if_needed()
        if INDEX_COLUMN not in self._signature_columns:
            self._signature_columns.append(INDEX_COLUMN)

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """Build the base optimizer as the Trainer would (or take the one passed in
        ``optimizers``) and hide it behind a proxy whose ``step`` is a no-op."""
        existing = _find_trainer_optimizer(self.optimizer)
        if existing is not None:  # a later train() call: same optimizer, fresh wrappers
            self.optimizer = existing
            return existing
        base = super().create_optimizer() if model is None else super().create_optimizer(model)
        self._engine_optimizer = base
        self.optimizer = _TrainerOptimizer(base)
        self._ksam = None
        return self.optimizer

    @property
    def base_optimizer(self) -> torch.optim.Optimizer | None:
        """The real optimizer that ksam steps (None before ``create_optimizer``)."""
        return self._engine_optimizer

    @property
    def ksam(self) -> Method | None:
        """The ksam engine (built at the first training step of each ``train()`` call)."""
        return self._ksam

    def _engine(self, model: nn.Module, inputs: Mapping[str, Any]) -> Method:
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
        if is_ddp(model):  # DDP: every rank skips a non-finite step together
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

    def train(self, *args: Any, **kwargs: Any) -> Any:
        self._micro_batches = []  # an accumulation cut short by the last run is dropped
        return super().train(*args, **kwargs)

    # -- the step -------------------------------------------------------------------
    def training_step(self, model: nn.Module, inputs: dict[str, Any],
                      num_items_in_batch: Any = None) -> Tensor:
        """One ksam step on ``inputs``: all passes and the optimizer step. Returns the batch's
        mean per-sample loss (at w) for logging; nothing is left for the Trainer to do."""
        del num_items_in_batch  # each example weighs the same in a ksam step
        if self.needs_example_ids and INDEX_COLUMN not in inputs:
            raise ValueError(self._missing_index_message())
        if self.args.gradient_accumulation_steps > 1:
            # The loop calls this once per micro-batch and steps the optimizer after the
            # last one (sync_gradients): gather them, and step once on all of them.
            self._micro_batches.append(inputs)
            if not self.accelerator.sync_gradients:
                return torch.zeros((), device=self.args.device)
            inputs = merge_batches(self._micro_batches, self._pad_token_id(),
                                   self._padding_side())
            self._micro_batches = []
        model.train()
        if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
            self.optimizer.train()
        inputs = self._prepare_inputs(inputs)
        # _prepare_inputs returns a new mapping: taking the ids out leaves the caller's whole.
        index = inputs.pop(INDEX_COLUMN, None)
        engine = self._engine(model, inputs)
        batch = inputs if index is None else IndexedBatch(inputs, index)
        result = engine.step(batch, self.per_sample_loss_fn)
        self.last_step_result = result
        return torch.tensor(result.loss, device=self.args.device)

    def prediction_step(self, model: nn.Module, inputs: dict[str, Any],
                        prediction_loss_only: bool, ignore_keys: list[str] | None = None,
                        ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """The Trainer's evaluation step on ``inputs`` without :data:`INDEX_COLUMN`, which
        ``remove_unused_columns`` keeps but the model does not take."""
        if INDEX_COLUMN in inputs:
            inputs = {k: v for k, v in inputs.items() if k != INDEX_COLUMN}
        return super().prediction_step(model, inputs, prediction_loss_only,
                                       ignore_keys=ignore_keys)

    def _pad_token_id(self) -> int:
        config = getattr(self.model, "config", None)
        pad = getattr(config, "pad_token_id", None) if config is not None else None
        return int(pad) if pad is not None else 0

    def _padding_side(self) -> str:
        tokenizer = getattr(self, "processing_class", None) or getattr(self, "tokenizer", None)
        return getattr(tokenizer, "padding_side", "right") or "right"

    # -- grad-norm logging (transformers >= 5 calls these; older versions log 0) -------
    def _clip_grad_norm(self, model: nn.Module) -> Any:
        return self._get_grad_norm(model)

    def _get_grad_norm(self, model: nn.Module, grad_norm: Any = None) -> Any:
        result = self.last_step_result
        if result is None or result.descent_grad_norm is None:
            return 0.0
        return result.descent_grad_norm

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
    if getattr(args, "deepspeed", None):
        raise ValueError("KSAMTrainer does not support DeepSpeed")
    if getattr(args, "fsdp", None):
        raise ValueError("KSAMTrainer does not support FSDP")
    if args.gradient_accumulation_steps > 1 and "micro_batch_size" in ksam_kwargs:
        raise ValueError("gradient_accumulation_steps sets the engine's micro_batch_size "
                         "(per_device_train_batch_size): do not set it in ksam_kwargs too")
    for key in ("grad_scaler", "model", "optimizer"):
        if key in ksam_kwargs:
            raise ValueError(f"ksam_kwargs must not set {key!r}: the Trainer provides it")


def _engine_extras(engine: Method) -> dict[str, Any]:
    """The engine's state without the base optimizer's (that one is in optimizer.pt)."""
    return engine.state_dict(include_optimizer=False)


def _load_engine_extras(engine: Method, extras: dict[str, Any]) -> None:
    engine.load_state_dict(extras)


def merge_batches(batches: list[Mapping[str, Any]], pad_token_id: int = 0,
                  padding_side: str = "right") -> dict[str, Any]:
    """One batch from several (a gradient accumulation's micro-batches): tensors concatenated
    along the batch dimension; sequences of different lengths first padded to the longest
    (on ``padding_side``), ``labels`` with -100, ``attention_mask`` / ``token_type_ids``
    with 0 and anything else (``input_ids``) with ``pad_token_id``, as a padding collator
    would have done for the whole batch. Non-tensor values come from the first batch."""
    if len(batches) == 1:
        return dict(batches[0])
    out: dict[str, Any] = {}
    for key, first in batches[0].items():
        if not isinstance(first, Tensor):
            out[key] = first
            continue
        parts = [b[key] for b in batches]
        if first.dim() >= 2 and len({p.shape[1] for p in parts}) > 1:
            length = max(p.shape[1] for p in parts)
            value = -100 if key == "labels" else (
                0 if key in ("attention_mask", "token_type_ids") else pad_token_id)
            padded = []
            for p in parts:
                extra = length - p.shape[1]
                widths = [0, 0] * (p.dim() - 2)  # F.pad lists the last dimension first
                widths += [extra, 0] if padding_side == "left" else [0, extra]
                padded.append(F.pad(p, widths, value=value))
            parts = padded
        out[key] = torch.cat(parts)
    return out
