"""ksam: sharpness-aware training at SGD's cost.

K-SAM and the methods it is measured against, all on one two-pass step engine::

    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ksam_opt = ksam.KSAM(model, opt, rho=0.05, k=0.25)
    result = ksam_opt.step((x, y), lambda m, b: F.cross_entropy(m(b[0]), b[1], reduction="none"))
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
