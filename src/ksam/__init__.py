"""ksam: sharpness-aware training at SGD's cost.

K-SAM and the methods it is measured against, each a :class:`Method` bound to your model
and optimizer; one :meth:`Method.step` per batch does all its passes and the update::

    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    method = ksam.KSAM(model, opt, rho=0.05, k=0.25)
    result = method.step((x, y), lambda m, b: F.cross_entropy(m(b[0]), b[1], reduction="none"))

The rules a method is made of live in :mod:`ksam.selection`, :mod:`ksam.perturbation`,
:mod:`ksam.schedule` and :mod:`ksam.transform`; multi-process training in
:mod:`ksam.distributed`; the step itself, top to bottom, in :mod:`ksam.core`.

and the comparison of methods on your own data and model (``ksam compare`` from Python)::

    summary = ksam.compare({"train_x": x, "train_y": y, "test_x": xt, "test_y": yt,
                            "make_model": make_model}, ["sgd", "sam", "ksam"], seeds=2)

``ksam.compare`` is imported on first use: ``import ksam`` loads the library alone, not the
command's harness (tasks, training loop, reports).
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any

from . import perturbation, schedule, selection, transform
from .batch import IndexedBatch
from .core import StepResult
from .engine import Method
from .memory import LossOutput
from .methods import (
    ESAM,
    KSAM,
    MESA,
    METHODS,
    MSAM,
    SAF,
    SAM,
    LookSAM,
    OrderedSGD,
    Plain,
    RandomSubsetSAM,
    create,
)

__version__ = "0.2.0"

__all__ = [
    "Method", "create", "METHODS", "compare",
    "Plain", "SAM", "KSAM", "OrderedSGD", "ESAM", "RandomSubsetSAM", "MSAM", "LookSAM", "SAF",
    "MESA",
    "IndexedBatch", "LossOutput", "StepResult",
    "selection", "perturbation", "schedule", "transform",
]

#: Names ``import ksam`` gave before 0.2, with where they live now: still given, with a
#: DeprecationWarning, until 0.3.
_MOVED = {
    "SharpnessAwareOptimizer": ("ksam.engine", "Method"),
    "SGD": ("ksam.methods", "Plain"),
    "StepPlan": ("ksam.plan", "StepPlan"),
    "ComputedStep": ("ksam.core", "ComputedStep"),
    "Verdict": ("ksam.core", "Verdict"),
    "ExampleMemory": ("ksam.memory", "ExampleMemory"),
    **{name: ("ksam.selection", name) for name in (
        "SelectionRule", "Selection", "SelectionContext", "WholeBatch", "TopLoss",
        "RandomSubset", "LargestLossIncrease")},
    **{name: ("ksam.perturbation", name) for name in (
        "PerturbationRule", "GradientNormPerturbation", "AdaptivePerturbation",
        "StochasticWeightPerturbation", "MomentumPerturbation")},
    "Schedule": ("ksam.schedule", "Schedule"),
    "GradientTransform": ("ksam.transform", "GradientTransform"),
    "LookSAMRule": ("ksam.transform", "LookSAMRule"),
}


def __getattr__(name: str) -> Any:
    if name == "compare":  # the comparison harness, imported only when asked for
        return importlib.import_module("ksam.lab.compare").compare_task
    if name == "distributed":
        return importlib.import_module("ksam.distributed")
    moved = _MOVED.get(name)
    if moved is None:
        raise AttributeError(f"module 'ksam' has no attribute {name!r}")
    module, attr = moved
    warnings.warn(f"ksam.{name} is deprecated and goes in 0.3: use {module}.{attr}",
                  DeprecationWarning, stacklevel=2)
    return getattr(importlib.import_module(module), attr)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
