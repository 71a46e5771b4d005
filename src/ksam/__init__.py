"""ksam: sharpness-aware training at SGD's cost.

K-SAM and the methods it is measured against, all on one two-pass step engine::

    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ksam_opt = ksam.KSAM(model, opt, rho=0.05, k=0.25)
    result = ksam_opt.step((x, y), lambda m, b: F.cross_entropy(m(b[0]), b[1], reduction="none"))

and the comparison of methods on your own data and model (``ksam compare`` from Python)::

    summary = ksam.compare({"train_x": x, "train_y": y, "test_x": xt, "test_y": yt,
                            "make_model": make_model}, ["sgd", "sam", "ksam"], seeds=2)

``ksam.compare`` is imported on first use: ``import ksam`` loads the library alone, not the
command's harness (tasks, training loop, reports).
"""

from .batch import IndexedBatch
from .engine import ComputedStep, SharpnessAwareOptimizer, StepResult, Verdict
from .memory import ExampleMemory, LossOutput
from .methods import (
    ESAM,
    KSAM,
    MESA,
    METHODS,
    MSAM,
    SAF,
    SAM,
    SGD,
    LookSAM,
    OrderedSGD,
    RandomSubsetSAM,
    create,
)
from .perturbation import (
    AdaptivePerturbation,
    GradientNormPerturbation,
    MomentumPerturbation,
    PerturbationRule,
    StochasticWeightPerturbation,
)
from .plan import StepPlan
from .schedule import Schedule
from .selection import (
    LargestLossIncrease,
    RandomSubset,
    Selection,
    SelectionContext,
    SelectionRule,
    TopLoss,
    WholeBatch,
)
from .transform import GradientTransform, LookSAMRule

__version__ = "0.1.0"

__all__ = [
    "SharpnessAwareOptimizer", "StepPlan", "StepResult", "ComputedStep", "Verdict", "create",
    "METHODS", "IndexedBatch", "LossOutput", "ExampleMemory",
    "SGD", "SAM", "KSAM", "RandomSubsetSAM", "ESAM", "OrderedSGD", "MSAM", "LookSAM",
    "SAF", "MESA",
    "SelectionRule", "Selection", "SelectionContext", "WholeBatch", "TopLoss", "RandomSubset",
    "LargestLossIncrease", "PerturbationRule", "GradientNormPerturbation",
    "AdaptivePerturbation", "StochasticWeightPerturbation", "MomentumPerturbation",
    "Schedule", "GradientTransform", "LookSAMRule",
]


def __getattr__(name: str):
    # The harness's module ksam.compare, imported on first use; calling it runs
    # ksam.compare.compare_task (a module imported as ksam.compare is this package's attribute
    # `compare` from then on, so the name must work both before and after).
    if name == "compare":
        import importlib

        return importlib.import_module(".compare", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
