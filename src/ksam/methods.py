"""The methods: each is the two-pass engine with one choice of rules, nothing more.

All take ``(model, optimizer, **options)`` and share :class:`ksam.Method`'s
engine options (``grad_scaler``, ``autocast_dtype``, ``fast_path``, ``seed``,
``sync_perturbation``).

Every method with an ascent pass also takes the schedule keywords ``start_step`` (plain
steps before it) and ``p`` (probability that a step is sharpness-aware), see
:mod:`ksam.schedule`; ``sam-late`` and ``rst`` are SAM with one of them set.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch
from torch import nn

from .engine import Method
from .memory import EMAKL, RememberedLosses, TrajectoryKL
from .perturbation import (
    AdaptivePerturbation,
    GradientNormPerturbation,
    MomentumPerturbation,
    PerturbationRule,
    StochasticWeightPerturbation,
)
from .schedule import Schedule
from .selection import (
    RESCALE_KINDS,
    RULES,
    LargestLossIncrease,
    RandomSubset,
    RuleFactory,
    WholeBatch,
    build_rule,
    check_loss_kind,
)
from .transform import LookSAMRule
from .validate import check_bool, check_number


class Plain(Method):
    """Every step a plain step: the base optimizer on the whole batch's gradient (the
    reference every method is compared with; ``"sgd"`` in :data:`METHODS`)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, **engine: Any):
        super().__init__(model, optimizer, ascent=None, perturbation=None,
                         descent=WholeBatch(), **engine)


def sam_perturbation(rho: float, adaptive: bool, eta: float) -> PerturbationRule:
    """SAM's perturbation, or ASAM's with ``adaptive=True`` (a bool). ``eta`` is checked
    either way: an option is refused when it is bad, not only when it is used."""
    check_bool("adaptive", adaptive)
    check_number("eta", eta, low=0)
    return AdaptivePerturbation(rho, eta) if adaptive else GradientNormPerturbation(rho)


class SAM(Method):
    """Sharpness-aware minimization (Foret et al. 2021); ``adaptive=True`` is ASAM (Kwon et
    al. 2021) with its ``eta``. Both gradients over the whole batch."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *,
                 rho: float = 0.05, adaptive: bool = False, eta: float = 0.01,
                 start_step: int = 0, p: float = 1.0, **engine: Any):
        rule = sam_perturbation(rho, adaptive, eta)
        super().__init__(model, optimizer, ascent=WholeBatch(), perturbation=rule,
                         descent=WholeBatch(), schedule=Schedule(start_step, p), **engine)


#: K-SAM's selection rule when none is given, for a cross-entropy loss scored by a forward
#: pass: chosen by the decision rule of docs/experiments/default-rule.md.
DEFAULT_SELECT = "auto"
#: Default of K-SAM's ``k_warmup`` (steps per halving of the descent subset, B -> K); the
#: stress test in docs/experiments/collapse.md supports it. 0 is the paper's plain K-SAM.
K_WARMUP = 100
#: Default of K-SAM's ``rescale`` (descent step scaled to a full-batch step's estimated
#: size, :func:`ksam.selection.subset_gradient_scale`); False is the paper's plain K-SAM.
RESCALE = True


class KSAM(Method):
    """K-SAM (Ni et al. 2022): both SAM gradients on the examples of largest loss.

    One gradient-free forward over the batch gives per-sample losses l at w; the ascent
    gradient uses the top-``k_ascent`` (K1) examples of l, the descent gradient the
    top-``k_descent`` (K2) of the same l. ``k`` (a fraction in (0, 1] or an int count)
    sets both unless overridden. Three forward passes (B, K1, K2), two backward passes
    (K1, K2), none over the whole batch.

    Two guards against collapse (docs/experiments/collapse.md), both on the descent rule:
    ``k_warmup`` starts the descent subset at the whole batch and halves it every ``k_warmup`` steps
    down to K2 (:class:`TopLoss`'s ``warmup``); ``rescale`` scales the descent step to a
    full-batch step's estimated size. ``k_warmup=0, rescale=False`` is the paper's plain
    K-SAM (also ``create("ksam-plain")``).

    ``loss_kind`` says what ``loss_fn`` returns, which the rescale estimate depends on
    (:func:`ksam.selection.subset_gradient_scale`): ``"ce"`` (default) cross-entropy,
    ``"mse"`` a squared error, ``"other"`` anything else (a mean over tokens or labels, a
    label-smoothed loss, ...), for which there is no estimate: ``rescale`` then defaults
    to off, and an explicit ``rescale`` is refused.

    ``select`` names the rule of both passes in :data:`ksam.selection.RULES`. The default
    (``None``) is :data:`DEFAULT_SELECT`, ``"auto"`` (:class:`ksam.selection.AutoBand`),
    chosen among the measured candidates by the rule of docs/experiments/default-rule.md:
    it skips the share of the batch the model rates below chance (estimated over steps
    100-199, allowed only to fall afterwards) and takes the next K; it reads the labels of
    ``(inputs, labels)`` batches (or a mapping's ``"labels"``). For a loss without a chance
    level (``loss_kind="mse"`` or ``"other"``) and with ``scores="memory"`` the default is
    the paper's ``"top"``. ``"top"`` is the paper's top-K, ``"stratified"`` K examples
    spread evenly over the loss order, ``"auto-margin"`` the band that also skips the rows
    the model confidently contradicts (reads the logits of a ``loss_fn`` that returns
    :class:`ksam.LossOutput`). A factory such as
    ``functools.partial(ksam.selection.AutoBand, estimate_steps=(2000, 4000))`` sets a
    rule's own options.

    ``scores="memory"`` (with ``num_examples=N``, the size of the training set, and batches
    given as :class:`ksam.IndexedBatch`) ranks the batch by the loss each example had the
    last time a pass at w computed it (:class:`ksam.memory.RememberedLosses`) instead of a
    scoring forward: two forwards (K1, K2) and two backwards a step. The ascent pass's
    losses refresh the memory; an example not scored yet ranks first. It takes the rules
    that read only the order of the scores and always take the first-ranked row,
    ``select="top"`` (its default there) or ``"stratified"`` (:data:`MEMORY_RULES`), and no
    ``rescale``: ``auto``, ``auto-margin`` and ``rescale`` read the losses' values, which a
    memory has only stale. ``scores="forward"`` (default) is the paper's scoring pass.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *,
                 rho: float = 0.05, k: float | int = 0.25, k_ascent: float | int | None = None,
                 k_descent: float | int | None = None, adaptive: bool = False,
                 eta: float = 0.01, k_warmup: int = K_WARMUP,
                 rescale: bool | float | None = None, loss_kind: str = "ce",
                 start_step: int = 0, p: float = 1.0, select: str | RuleFactory | None = None,
                 scores: str = "forward", num_examples: int | None = None, **engine: Any):
        if select is None:
            select = DEFAULT_SELECT if scores == "forward" and loss_kind == "ce" else "top"
        rule_memory = select in RULES_WITH_MEMORY
        remembered = remembered_scores(scores, None if rule_memory else num_examples, select)
        if rule_memory:
            if num_examples is None:
                raise ValueError(f"select={select!r} keeps a per-example memory: it needs "
                                 "num_examples=N, the size of the training set")
            select = functools.partial(RULES[select], num_examples=num_examples)
        if remembered is not None and rescale:
            raise ValueError("scores='memory' takes no rescale (its estimate reads the "
                             "batch's losses at w, which the memory has only stale)")
        if remembered is not None:
            rescale = False
        if rescale is None:  # the default: on where the loss kind has an estimate
            rescale = RESCALE if check_loss_kind(loss_kind) in RESCALE_KINDS else False
        rule = sam_perturbation(rho, adaptive, eta)
        ascent = build_rule(select, k if k_ascent is None else k_ascent,
                            "k" if k_ascent is None else "k_ascent").as_ascent()
        descent = build_rule(select, k if k_descent is None else k_descent,
                             "k" if k_descent is None else "k_descent", warmup=k_warmup,
                             rescale=rescale, loss_kind=loss_kind)
        descent.share_state(ascent)  # one estimate of what both rules measure (AutoBand)
        super().__init__(model, optimizer, ascent=ascent, perturbation=rule,
                         descent=descent, schedule=Schedule(start_step, p),
                         remembered=remembered, **engine)


#: The selection rules that keep a per-example memory of their own (they take
#: ``num_examples`` and batches given as :class:`ksam.IndexedBatch`).
RULES_WITH_MEMORY: set[str] = set()

#: The rules that may rank by remembered losses (``scores="memory"``): both read only the
#: order of the scores and take its first row, so a batch with examples not scored yet
#: (they rank first) scores at least one of them; ``stratified`` takes one in every B/K.
MEMORY_RULES = ("top", "stratified")

_NOT_FROM_MEMORY = {
    "auto": "it compares the losses' values with chance, and a memory has them only stale",
    "auto-margin": "it compares the losses' values with chance, and a memory has them only "
                   "stale",
}


def remembered_scores(scores: str, num_examples: int | None,
                      select: object) -> RememberedLosses | None:
    """The memory of K-SAM's / Ordered SGD's ``scores="memory"`` (None for
    ``"forward"``); ValueError for another value, a missing ``num_examples`` or a
    ``select`` not in :data:`MEMORY_RULES`."""
    if scores == "forward":
        if num_examples is not None:
            raise ValueError("num_examples is for scores='memory'")
        return None
    if scores != "memory":
        raise ValueError(f"scores must be 'forward' or 'memory', got {scores!r}")
    if num_examples is None:
        raise ValueError("scores='memory' needs num_examples=N, the size of the training set")
    if select not in MEMORY_RULES:
        why = _NOT_FROM_MEMORY.get(select, "it is not one of them") if isinstance(select, str) \
            else "a rule factory is not one of them"
        taken = " or ".join(repr(name) for name in MEMORY_RULES)
        raise ValueError(f"scores='memory' takes select={taken}, got {select!r}: {why}")
    return RememberedLosses(num_examples)


class RandomSubsetSAM(Method):
    """SAM with the ascent gradient on a random subset of the batch (Bahri et al. 2022);
    the descent gradient uses the whole batch."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *,
                 rho: float = 0.05, k_ascent: float | int = 0.25, start_step: int = 0,
                 p: float = 1.0, **engine: Any):
        super().__init__(model, optimizer, ascent=RandomSubset(k_ascent, "k_ascent"),
                         perturbation=GradientNormPerturbation(rho), descent=WholeBatch(),
                         schedule=Schedule(start_step, p), **engine)


class ESAM(Method):
    """Efficient SAM (Du et al. 2022): stochastic weight perturbation (each parameter
    tensor perturbed with probability ``beta``, eps scaled by 1/beta) and sharpness-
    sensitive data selection (the descent uses the ``gamma`` fraction of examples whose
    loss rises most under eps). A step the schedule leaves plain is a whole-batch step: the
    selection is defined only under a perturbation."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *,
                 rho: float = 0.05, beta: float = 0.6, gamma: float = 0.5,
                 start_step: int = 0, p: float = 1.0, **engine: Any):
        super().__init__(model, optimizer, ascent=WholeBatch(),
                         perturbation=StochasticWeightPerturbation(rho, beta),
                         descent=LargestLossIncrease(gamma), schedule=Schedule(start_step, p),
                         **engine)


class OrderedSGD(Method):
    """Ordered SGD (Kawaguchi & Lu 2020): one plain step on the top-``k`` loss examples.
    ``k_warmup``, ``select``, ``scores`` and ``num_examples`` as in :class:`KSAM` (default 0
    and ``"top"``: the paper's plain rule); with ``scores="memory"`` one forward and one
    backward over K a step, the descent pass's losses refreshing the memory."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *,
                 k: float | int = 0.25, k_warmup: int = 0, select: str | RuleFactory = "top",
                 scores: str = "forward", num_examples: int | None = None, **engine: Any):
        super().__init__(model, optimizer, ascent=None, perturbation=None,
                         descent=build_rule(select, k, warmup=k_warmup),
                         remembered=remembered_scores(scores, num_examples, select), **engine)


class SAF(Method):
    r"""Sharpness-Aware Training for Free (Du et al., NeurIPS 2022): one pass a step over
    the whole batch, whose loss adds to each example's loss
    ``lam`` :math:`\tau^2` KL(softmax(m/:math:`\tau`) || softmax(z/:math:`\tau`)), z its logits
    now and m its logits ``delay`` visits before, remembered
    (:class:`ksam.memory.TrajectoryKL`), from the example's visit ``start_epoch + 1`` on.
    Defaults are the reference code's (``SAF_train.py``): ``lam=0.16`` (``--reinforce``),
    ``temperature=5``, ``delay=3`` (``--minus_epoch``), ``start_epoch=5``
    (``--kl_start_epoch``). Needs ``num_examples=N``, batches given as
    :class:`ksam.IndexedBatch`, and a ``loss_fn`` that returns
    :class:`ksam.LossOutput` ``(losses, logits)``. The memory holds ``(delay + 1) * C``
    fp32 logits and a visit count per example."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *,
                 num_examples: int, lam: float = 0.16, temperature: float = 5.0,
                 delay: int = 3, start_epoch: int = 5, **engine: Any):
        term = TrajectoryKL(num_examples, lam=lam, temperature=temperature, delay=delay,
                            start_epoch=start_epoch)
        super().__init__(model, optimizer, ascent=None, perturbation=None,
                         descent=WholeBatch(), term=term, **engine)


class MESA(Method):
    r"""Memory-Efficient Sharpness-Aware training (Du et al., NeurIPS 2022): SAF's KL with
    the logits of an exponential moving average of the model (``decay``) in place of the
    remembered ones (:class:`ksam.memory.EMAKL`): one extra forward without gradient a
    step, no per-example memory, no example ids. Defaults are the reference code's
    (``MESA_train.py``): ``lam=0.3``, ``temperature=5``, ``decay=0.9998``
    (``--model-ema-decay``); the reference starts the KL at epoch 5, here at optimizer
    step ``start_step`` (the CLI's ``start=FRACTION``). Needs a ``loss_fn`` that returns
    :class:`ksam.LossOutput`. The average is in :meth:`state_dict`; an FSDP-sharded model
    is refused (the average would be a full copy)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *,
                 lam: float = 0.3, temperature: float = 5.0, decay: float = 0.9998,
                 start_step: int = 0, **engine: Any):
        from .params import ParameterSet, is_ddp

        if ParameterSet(model, optimizer).sharded:
            raise ValueError("MESA keeps a full copy of the model as its average: an "
                             "FSDP-sharded model is not supported")
        inner = getattr(model, "module", model) if is_ddp(model) else model
        term = EMAKL(inner, lam=lam, temperature=temperature, decay=decay,
                     start_step=start_step)
        super().__init__(model, optimizer, ascent=None, perturbation=None,
                         descent=WholeBatch(), term=term, **engine)


class MSAM(Method):
    """Momentum-SAM (Becker et al. 2024): the whole batch's gradient at
    w - rho v/||v||, v the base optimizer's momentum buffer (SGD) or first moment
    (Adam/AdamW) before the step; w restored bit-for-bit, then the base optimizer steps with
    that gradient. One forward and one backward per step, no ascent pass; without a buffer
    yet (first step, no momentum) the step is plain. ``rho=0.3`` is the default of the
    authors' SGD implementation (their CIFAR/ImageNet runs use 3)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *,
                 rho: float = 0.3, **engine: Any):
        super().__init__(model, optimizer, ascent=None, perturbation=MomentumPerturbation(rho),
                         descent=WholeBatch(), **engine)


class LookSAM(Method):
    """LookSAM (Liu et al. 2022): SAM on steps t with t % ``interval`` == 0, storing the
    unit component v of the SAM gradient orthogonal to the plain one; on the other steps
    one pass and the step descends with g + ``alpha`` ||g|| v (:class:`LookSAMRule`).
    ``interval=1`` is SAM."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *,
                 rho: float = 0.05, interval: int = 5, alpha: float = 0.7, **engine: Any):
        rule = LookSAMRule(rho, alpha)
        super().__init__(model, optimizer, ascent=WholeBatch(), perturbation=rule,
                         descent=WholeBatch(), schedule=Schedule(interval=interval),
                         transform=rule, **engine)


def _ksam_plain(model: nn.Module, optimizer: torch.optim.Optimizer, *, rho: float = 0.05,
                k: float | int = 0.25, k_ascent: float | int | None = None,
                k_descent: float | int | None = None, adaptive: bool = False,
                eta: float = 0.01, loss_kind: str = "ce", start_step: int = 0,
                p: float = 1.0, **engine: Any) -> KSAM:
    """The paper's K-SAM: top-K selection without the collapse guard (``KSAM(...,
    select="top", k_warmup=0, rescale=False)``)."""
    return KSAM(model, optimizer, rho=rho, k=k, k_ascent=k_ascent, k_descent=k_descent,
                adaptive=adaptive, eta=eta, k_warmup=0, rescale=False, loss_kind=loss_kind,
                start_step=start_step, p=p, select="top", **engine)


def _asam(model: nn.Module, optimizer: torch.optim.Optimizer, *, rho: float = 0.5,
          eta: float = 0.01, start_step: int = 0, p: float = 1.0, **engine: Any) -> SAM:
    """ASAM with its paper's CIFAR default rho=0.5."""
    return SAM(model, optimizer, rho=rho, adaptive=True, eta=eta, start_step=start_step, p=p,
               **engine)


def _sam_late(model: nn.Module, optimizer: torch.optim.Optimizer, *, start_step: int,
              rho: float = 0.05, adaptive: bool = False, eta: float = 0.01,
              **engine: Any) -> SAM:
    """Late-phase SAM (Zhou et al., ICLR 2025): plain steps until ``start_step``, SAM from
    it on. The CLI's ``start=FRACTION`` gives it as a fraction of the run."""
    return SAM(model, optimizer, rho=rho, adaptive=adaptive, eta=eta, start_step=start_step,
               **engine)


def _rst(model: nn.Module, optimizer: torch.optim.Optimizer, *, p: float = 0.5,
         rho: float = 0.05, adaptive: bool = False, eta: float = 0.01, **engine: Any) -> SAM:
    """Randomized sharpness-aware training (RST, Zhou et al. 2023): each step is SAM with
    probability ``p`` and a plain step otherwise, drawn from the engine's seeded generator."""
    return SAM(model, optimizer, rho=rho, adaptive=adaptive, eta=eta, p=p, **engine)


METHODS = {
    "sgd": Plain,
    "sam": SAM,
    "asam": _asam,
    "ksam": KSAM,
    "ksam-plain": _ksam_plain,
    "random-sam": RandomSubsetSAM,
    "esam": ESAM,
    "osgd": OrderedSGD,
    "msam": MSAM,
    "looksam": LookSAM,
    "sam-late": _sam_late,
    "rst": _rst,
    "saf": SAF,
    "mesa": MESA,
}


def takes_num_examples(name: str, options: dict[str, Any]) -> bool:
    """Whether method ``name`` with ``options`` keeps a per-example memory and so takes
    ``num_examples`` (SAF; K-SAM and Ordered SGD with ``scores="memory"``)."""
    return name.lower() == "saf" or options.get("scores") == "memory" \
        or options.get("select") in RULES_WITH_MEMORY


def __getattr__(name: str) -> Any:
    if name == "method_options":  # the name before 0.2
        import warnings

        warnings.warn("ksam.methods.method_options is deprecated and goes in 0.3: use "
                      "ksam.methods.option_names", DeprecationWarning, stacklevel=2)
        return option_names
    if name == "SGD":  # the name before 0.2
        import warnings

        warnings.warn("ksam.methods.SGD is deprecated and goes in 0.3: use "
                      "ksam.methods.Plain", DeprecationWarning, stacklevel=2)
        return Plain
    raise AttributeError(f"module 'ksam.methods' has no attribute {name!r}")


def create(name: str, model: nn.Module, optimizer: torch.optim.Optimizer,
           **kwargs: Any) -> Method:
    """Build a method by name: one of ``sgd, sam, asam, ksam, ksam-plain, random-sam, esam,
    osgd, msam, looksam, sam-late, rst, saf, mesa``. ValueError for an unknown name, and for
    an option the method does not take (naming the options it takes)."""
    try:
        factory = METHODS[name.lower()]
    except (KeyError, AttributeError):
        raise ValueError(
            f"unknown method {name!r}; choose one of: {', '.join(METHODS)}"
        ) from None
    unknown = sorted(set(kwargs) - option_names(name.lower()) - ENGINE_KEYWORDS)
    if unknown:
        raise ValueError(
            f"method {name!r} takes no option {', '.join(map(repr, unknown))}; its options: "
            f"{', '.join(sorted(option_names(name.lower())))}; engine options: "
            f"{', '.join(sorted(ENGINE_KEYWORDS))}")
    return factory(model, optimizer, **kwargs)


#: The options every method passes to the engine (:class:`Method`).
ENGINE_KEYWORDS = frozenset(
    p.name for p in inspect.signature(Method.__init__).parameters.values()
    if p.kind == p.KEYWORD_ONLY) - {"ascent", "perturbation", "descent", "schedule",
                                    "transform", "term", "remembered"}


def option_names(name: str) -> set[str]:
    """The options of method ``name`` of :data:`METHODS` besides the engine's: its
    factory's keyword-only parameters."""
    factory = METHODS[name]
    target = factory.__init__ if inspect.isclass(factory) else factory
    params = inspect.signature(target).parameters.values()
    return {p.name for p in params if p.kind == p.KEYWORD_ONLY}
