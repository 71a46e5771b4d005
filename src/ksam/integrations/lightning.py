"""Any ksam method inside a Lightning ``LightningModule`` (manual optimization).

A ksam step runs several forward/backward passes and one optimizer step, which is exactly
what Lightning's manual optimization hands to the module::

    class Model(KSAMMixin, L.LightningModule):          # the mixin first
        def __init__(self):
            super().__init__()
            self.net = ...
            self.configure_ksam("ksam", rho=0.05, k=0.25)  # also sets manual optimization

        def training_step(self, batch, batch_idx):
            result = self.ksam_step(batch, lambda m, b: F.cross_entropy(
                m(b[0]), b[1], reduction="none"))          # logs "train_loss"
            return None

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

What the helper takes care of:

- the optimizer: the engine steps the real optimizer *through* ``self.optimizers()`` (the
  ``LightningOptimizer``), so Lightning still counts ``global_step`` (``max_steps`` works),
  runs ``on_before_optimizer_step`` and profiles the step; state_dicts go to the real one;
- precision: ``bf16-mixed`` runs the passes under bfloat16 autocast; ``16-mixed`` is refused
  (Lightning's GradScaler unscales and steps on its own, which would unscale twice), use
  ``bf16-mixed`` or ``32-true``; ``*-true`` precisions need nothing;
- logging: ``self.log(log_name, result.loss)`` (the batch's mean per-sample loss at w);
- gradient clipping and large batches are engine options: ``configure_ksam(...,
  max_grad_norm=1.0)`` clips the descent gradient right before the optimizer step (the
  step's pre-clip norm is ``result.descent_grad_norm``), ``micro_batch_size=64`` runs
  every forward in chunks of at most 64 examples. (Lightning's own ``gradient_clip_val`` and
  ``accumulate_grad_batches`` are refused by Lightning under manual optimization.)
- checkpoints: the engine's own state (step count, random generator, per-example memory)
  rides in the checkpoint under ``"ksam_state"``; the optimizer state is Lightning's usual
  one.

Example ids and logits (SAF, MESA, K-SAM / Ordered SGD with ``scores="memory"``): give
``num_examples`` (the training set's size) in ``configure_ksam``, have the dataset return
each example's position in it, and hand ``ksam_step`` a :class:`ksam.IndexedBatch`; the
``loss_fn`` of SAF and MESA returns :class:`ksam.LossOutput` (it still gets ``(x, y)``)::

    def loss_fn(model, batch):
        x, y = batch
        logits = model(x)
        return ksam.LossOutput(F.cross_entropy(logits, y, reduction="none"), logits)

    class Model(KSAMMixin, L.LightningModule):
        def __init__(self, train_size):
            super().__init__()
            self.net = ...
            self.configure_ksam("saf", num_examples=train_size)

        def training_step(self, batch, batch_idx):             # the dataset gives (x, y, i)
            x, y, index = batch
            self.ksam_step(ksam.IndexedBatch((x, y), index), loss_fn)

A method that keeps a memory refuses ``configure_ksam`` without ``num_examples``
(``ValueError``) and a batch that is not an ``IndexedBatch`` (``ValueError`` at that
``ksam_step``, nothing changed). MESA's average is a ``copy.deepcopy`` of the whole module
(its attributes too; Lightning leaves the trainer out), made when the engine is built at
the first ``ksam_step``, and ``loss_fn`` is called with that copy as ``model``.

Limits: one optimizer; a single device (under DDP the bare module would not all-reduce its
gradients, so more than one process is refused); LR schedulers are stepped by you, as with
any manual optimization (``self.lr_schedulers().step()``); a step skipped for non-finite
losses does not advance ``global_step``; the backward passes call ``Tensor.backward``
directly, so ``on_before_backward``/``on_after_backward`` hooks do not run.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch

from ..batch import Batch, batch_size, loss_batch
from ..engine import Method, StepResult
from ..methods import create, takes_num_examples
from ..passes import LossFn
from . import ProxyOptimizer

__all__ = ["KSAMMixin"]

KSAM_CHECKPOINT_KEY = "ksam_state"


class _LightningStepOptimizer(ProxyOptimizer):
    """The real optimizer for the engine, whose ``step`` goes through the LightningOptimizer
    (precision plugin, hooks, step counting)."""

    def __init__(self, base: torch.optim.Optimizer, lightning_optimizer: Any) -> None:
        super().__init__(base)
        self.lightning_optimizer = lightning_optimizer

    def step(self, closure: Callable[[], float] | None = None) -> Any:
        return self.lightning_optimizer.step(closure)


class KSAMMixin:
    """Adds :meth:`ksam_step` to a ``LightningModule`` (list it before ``LightningModule``)."""

    ksam_method: str = "ksam"
    ksam_kwargs: dict[str, Any] = {}  # replaced by configure_ksam, never mutated

    def configure_ksam(self, method: str = "ksam", **kwargs: Any) -> None:
        """Choose the method and its options (those of :func:`ksam.create`); switches the
        module to manual optimization, which a ksam step needs. ValueError for a method
        with a per-example memory (:func:`ksam.methods.takes_num_examples`) without
        ``num_examples``, the size of the training set."""
        if "num_examples" not in kwargs and takes_num_examples(method, kwargs):
            raise ValueError(f"method {method!r} keeps a per-example memory: give "
                             f"configure_ksam(..., num_examples=N), N the size of the training "
                             f"set, and batches as ksam.IndexedBatch(batch, index)")
        self.ksam_method = method
        self.ksam_kwargs = dict(kwargs)
        self.automatic_optimization = False  # type: ignore[attr-defined]
        self._ksam_engine = None
        self._ksam_pending: dict[str, Any] | None = None

    @property
    def ksam(self) -> Method | None:
        """The engine (built at the first :meth:`ksam_step`)."""
        return getattr(self, "_ksam_engine", None)

    def ksam_step(self, batch: Batch, loss_fn: LossFn, *, log_name: str | None = "train_loss",
                  **log_kwargs: Any) -> StepResult:
        """One ksam step on ``batch`` (all passes, one optimizer step); ``loss_fn(module,
        batch)`` returns per-sample losses ``[n]`` (or :class:`ksam.LossOutput`). ``batch``
        may be an :class:`ksam.IndexedBatch`, whose ``batch`` is what ``loss_fn`` gets.
        Logs the loss as ``log_name`` (None: no logging; ``log_kwargs`` go to
        ``self.log``; ``batch_size`` defaults to the number of examples)."""
        engine = self._ksam_get_engine()
        result = engine.step(batch, loss_fn)
        if log_name:
            log_kwargs.setdefault("prog_bar", True)
            log_kwargs.setdefault("batch_size", batch_size(loss_batch(batch)))
            self.log(log_name, result.loss, **log_kwargs)  # type: ignore[attr-defined]
        return result

    # -- internals --------------------------------------------------------------------
    def _ksam_get_engine(self) -> Method:
        module: pl.LightningModule = self  # type: ignore[assignment]
        if module.automatic_optimization:
            raise RuntimeError("ksam_step needs manual optimization: call self.configure_ksam() "
                               "in __init__ (or set self.automatic_optimization = False)")
        trainer = module.trainer
        if trainer.world_size > 1:
            raise RuntimeError("ksam_step supports a single device: under DDP the bare module "
                               "would not all-reduce its gradients")
        precision = str(trainer.precision)
        if precision in ("16-mixed", "16"):
            raise RuntimeError("ksam_step does not support precision='16-mixed' (Lightning's "
                               "GradScaler would unscale the gradients a second time); use "
                               "'bf16-mixed' or '32-true'")
        lightning_opt = module.optimizers()
        if isinstance(lightning_opt, (list, tuple)):
            if len(lightning_opt) != 1:
                raise RuntimeError(f"ksam_step needs exactly one optimizer, "
                                   f"configure_optimizers returned {len(lightning_opt)}")
            lightning_opt = lightning_opt[0]
        engine = self.ksam
        if engine is not None and getattr(engine.optimizer, "lightning_optimizer",
                                          None) is lightning_opt:
            return engine
        real = getattr(lightning_opt, "optimizer", lightning_opt)  # unwrap LightningOptimizer
        kwargs = dict(self.ksam_kwargs)
        if precision in ("bf16-mixed", "bf16"):
            kwargs.setdefault("autocast_dtype", torch.bfloat16)
        new = create(self.ksam_method, module, _LightningStepOptimizer(real, lightning_opt),
                     **kwargs)
        # A new fit (new LightningOptimizer) keeps the engine's state; a restored checkpoint
        # brings its own.
        carried = _extras(engine) if engine is not None else getattr(self, "_ksam_pending", None)
        if carried is not None:
            new.load_state_dict({**carried, "optimizer": real.state_dict()})
        self._ksam_pending = None
        self._ksam_engine = new
        return new

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)  # type: ignore[misc]
        extras = _extras(self.ksam) if self.ksam is not None \
            else getattr(self, "_ksam_pending", None)
        if extras is not None:
            checkpoint[KSAM_CHECKPOINT_KEY] = extras

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)  # type: ignore[misc]
        extras = checkpoint.get(KSAM_CHECKPOINT_KEY)
        if extras is None:
            return
        # Lightning restores the optimizer after this hook: apply at the next ksam_step.
        self._ksam_engine = None
        self._ksam_pending = extras


def _extras(engine: Method) -> dict[str, Any]:
    """The engine's state without the optimizer's (Lightning saves that one)."""
    state = engine.state_dict()
    state.pop("optimizer")
    return state
