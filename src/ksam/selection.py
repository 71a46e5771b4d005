"""Selection rules: which examples of the mini-batch a gradient pass uses.

A rule sees a :class:`SelectionContext` and returns a :class:`Selection`: the rows (a
LongTensor, or ``None`` for the whole batch) and the weight of the pass's mean loss. The
number of rows depends on the batch size only, never on tensor values, so a step has static
shapes and can be captured as a CUDA graph. Rules keep configuration (and resumable state)
on ``self``, never anything between :meth:`SelectionRule.select` and
:meth:`SelectionRule.reduce`: what ``reduce`` needs travels in the :class:`Selection`.

Rules:

- :class:`WholeBatch` - every example (SGD, SAM, the descent of random-subset SAM).
- :class:`TopLoss` - the K examples with the largest loss at w (K-SAM, Ordered SGD).
- :class:`RandomSubset` - K examples drawn uniformly without replacement (Bahri et al.).
- :class:`LargestLossIncrease` - the examples whose loss rises most from w to w+eps
  (ESAM's sharpness-sensitive data selection).

Rules for K-SAM and Ordered SGD that hold up under label noise (:data:`RULES`, chosen with
``KSAM(..., select=NAME)`` / ``OrderedSGD(..., select=NAME)``; docs/label_noise.md): once
the clean examples are fitted, the highest losses of a batch are mostly the mislabelled
examples, so these rules take K examples *below* the top of the loss order.

- :class:`LossBand` (``"band"``) - skip the ``skip`` fraction of largest losses, take the next K.
- :class:`MedianBand` (``"median"``) - the K examples around the median loss (Xia et al.).
- :class:`StratifiedLoss` (``"stratified"``) - K examples at evenly spaced ranks of the loss
  order.
- :class:`ClassBalancedTopLoss` (``"balanced"``) - top-K taken class by class in turn.
- :class:`AutoBand` (``"auto"``) - a band whose skip is estimated from the losses: the share
  of examples the model rates below chance, measured early in training, never raised after.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from numbers import Integral, Real
from typing import NamedTuple

import torch
from torch import Tensor

from .stateful import Stateful
from .validate import check_choice, check_fraction, check_int, check_number


def check_subset_size(k: float | int, name: str = "k") -> float | int:
    """Validate a subset size: a fraction in (0, 1] or an int >= 1. Returns it unchanged."""
    if isinstance(k, bool) or not isinstance(k, Real):
        raise ValueError(f"{name} must be a fraction in (0, 1] or an int >= 1, got {k!r}")
    if isinstance(k, Integral):
        if k < 1:
            raise ValueError(f"{name} must be >= 1 when given as an int, got {k}")
        return int(k)
    k = float(k)
    if not math.isfinite(k) or not 0.0 < k <= 1.0:
        raise ValueError(
            f"{name} must be a fraction in (0, 1] (or an int >= 1 for a count), got {k!r}"
        )
    return k


def resolve_subset_size(k: float | int, batch_size: int, name: str = "k") -> int:
    """Number of examples that ``k`` selects from a batch of ``batch_size``.

    A float is a fraction of the batch, rounded to the nearest int and at least 1; an int is
    a count and must not exceed the batch.
    """
    if isinstance(k, int):
        if k > batch_size:
            raise ValueError(f"{name}={k} is larger than the batch ({batch_size} examples)")
        return k
    return max(1, min(batch_size, round(k * batch_size)))


class Selection(NamedTuple):
    """What a rule picked: ``index``, a LongTensor of rows on the batch's device (``None``:
    the whole batch), and ``scale``, a 0-d float tensor multiplying the pass's mean loss
    (``None``: 1)."""

    index: Tensor | None
    scale: Tensor | None = None


@dataclass
class SelectionContext:
    """What a rule may look at. ``scores`` are per-sample losses at w (detached);
    ``perturbed_losses`` are per-sample losses at w+eps (detached); ``cache`` is scratch
    space the rules of one step share (e.g. the all-gathered scores of
    :class:`ksam.distributed.GlobalTopLoss`, gathered once for both passes); ``labels`` are
    the batch's integer class labels, filled by the engine only for a rule with
    ``needs_labels``."""

    batch_size: int
    device: torch.device
    scores: Tensor | None = None
    perturbed_losses: Tensor | None = None
    labels: Tensor | None = None
    generator: torch.Generator | None = None
    step: int = 0
    cache: dict = field(default_factory=dict)
    #: the scoring pass's logits at w (detached), filled only for a rule with
    #: ``needs_logits`` (from a ``loss_fn`` that returns :class:`ksam.memory.LossOutput`)
    logits: Tensor | None = None
    #: the rows' example ids (an :class:`ksam.batch.IndexedBatch`'s), filled only for a
    #: plan with a per-example memory
    ids: Tensor | None = None


def top_indices(values: Tensor, count: int) -> Tensor:
    """Indices of the ``count`` largest values, ties broken by the lower index.

    A stable descending sort is deterministic where ``torch.topk`` is not (it does not
    promise an order for ties); for a mini-batch the sort is negligible next to a forward.
    """
    return descending_order(values)[:count]


def descending_order(values: Tensor) -> Tensor:
    """All indices, largest value first, ties by the lower index (see :func:`top_indices`)."""
    return torch.sort(values, descending=True, stable=True).indices


class SelectionRule(Stateful):
    """Base class. ``needs_scores``: the rule reads per-sample losses at w, so the engine
    runs a gradient-free forward over the batch first (or reuses a full-batch pass at w).
    ``needs_perturbed_losses``: the rule reads losses at w+eps (ESAM). ``needs_labels``:
    the rule reads the batch's class labels (the batch must be ``(inputs, labels)``).
    ``draws_on_host``: the rule draws random numbers on the host (the fast path then steps
    eagerly).

    A rule with state (:class:`AutoBand`'s estimate) is a :class:`ksam.stateful.Stateful`:
    it *stages* its update in :meth:`select`, and :meth:`commit` makes it its state once the
    step is applied, so a skipped step leaves it as it was."""

    needs_scores: bool = False
    needs_perturbed_losses: bool = False
    needs_labels: bool = False
    needs_logits: bool = False
    draws_on_host: bool = False
    #: a per-example memory the rule reads and writes (:class:`ksam.memory.ExampleMemory`;
    #: the batch must carry example ids), or None
    memory = None

    def size(self, batch_size: int) -> int:
        """How many examples the rule selects from a batch of ``batch_size``."""
        raise NotImplementedError

    def select(self, ctx: SelectionContext) -> Selection:
        raise NotImplementedError

    def size_at(self, batch_size: int, step: int) -> int:
        """How many examples the rule selects at optimizer step ``step``: ``size`` for every
        rule but a scheduled one (:class:`TopLoss` with ``warmup``), whose size changes a
        few times early in training (the fast path re-captures its graph each time)."""
        return self.size(batch_size)

    def reduce(self, losses: Tensor, selection: Selection) -> Tensor:
        """The scalar whose gradient the pass takes, from the selected rows' losses: their
        mean, times ``selection.scale`` when there is one."""
        mean = losses.float().mean()
        return mean if selection.scale is None else mean * selection.scale

    def check_batch(self, batch_size: int) -> None:
        """Raise ValueError if the rule cannot select from a batch of this size."""
        self.size(batch_size)

    def graph_key(self, step: int) -> object:
        """What, besides :meth:`size_at`, makes the rule's work at optimizer step ``step``
        differ from other steps (a rule with phases returns its phase): a captured CUDA
        graph is replayed only for steps with the same key. ``None``: every step alike."""
        return None

    def share_state(self, other: SelectionRule) -> None:
        """Keep one state with ``other``, a rule of the same step that estimates the same
        quantity (K-SAM's ascent and descent rules); nothing for a rule without state."""


class WholeBatch(SelectionRule):
    """Every example: the pass runs on the whole batch."""

    def size(self, batch_size: int) -> int:
        return batch_size

    def select(self, ctx: SelectionContext) -> Selection:
        return Selection(None)

    def __repr__(self) -> str:
        return "WholeBatch()"


class TopLoss(SelectionRule):
    r"""The ``k`` examples with the largest loss at w (Kawaguchi & Lu; Ni et al.).

    ``warmup`` (steps, default 0 = off) shrinks the subset from the whole batch to ``k`` in
    halvings, one every ``warmup`` steps, as Ordered SGD's schedule does:

    .. math:: K_t = \max\bigl(K,\ \lceil B / 2^{\lfloor t / \text{warmup} \rfloor}\rceil\bigr)

    Why (docs/collapse.md): at initialization the per-sample losses are all close to
    :math:`\ln C`, so the top-K are just the examples of the classes the random network
    under-predicts; a full step on them makes the network predict one class, the next top-K
    are again all of other classes, and within ~20 steps most ReLUs are dead - the run never
    recovers. Full-batch steps first, until the losses carry information, prevent it.
    """

    needs_scores = True

    def __init__(self, k: float | int, name: str = "k", warmup: int = 0,
                 rescale: bool | float = False, loss_kind: str = "ce") -> None:
        self.k = check_subset_size(k, name)
        self.name = name
        self.warmup = check_int("warmup", warmup)
        self.rescale = _check_rescale(rescale)
        self.loss_kind = check_loss_kind(loss_kind)
        if self.rescale and self.loss_kind not in RESCALE_KINDS:
            raise ValueError(f"rescale needs losses of a kind it can estimate gradients from "
                             f"({', '.join(RESCALE_KINDS)}), got loss_kind={loss_kind!r}; "
                             "pass rescale=False")
        self._power = float(self.rescale)  # True: 1.0, False: 0.0 (off)

    def size(self, batch_size: int) -> int:
        return resolve_subset_size(self.k, batch_size, self.name)

    def size_at(self, batch_size: int, step: int) -> int:
        k = self.size(batch_size)
        if self.warmup <= 0:
            return k
        halvings = min(step // self.warmup, batch_size.bit_length())
        return max(k, -(-batch_size // (1 << halvings)))

    def select(self, ctx: SelectionContext) -> Selection:
        """The top rows of ``ctx.scores``; with ``rescale``, ``scale`` is
        :func:`subset_gradient_scale` (to the power ``rescale``)."""
        assert ctx.scores is not None
        idx = self.pick(ctx, loss_order(ctx), self.size_at(ctx.batch_size, ctx.step))
        if not self._power:
            return Selection(idx)
        scale = subset_gradient_scale(ctx.scores, idx, self.loss_kind)
        return Selection(idx, scale if self._power == 1.0 else scale.pow(self._power))

    def pick(self, ctx: SelectionContext, order: Tensor, count: int) -> Tensor:
        """The ``count`` rows this rule takes, given ``order`` (every row, largest loss at w
        first, ties by the lower index): here the first ``count``. Subclasses take other
        rows of the same order; ``count`` is static, so the shapes are."""
        return order[:count]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._repr_options()})"

    def _repr_options(self) -> str:
        extra = f", warmup={self.warmup}" if self.warmup else ""
        extra += f", rescale={self.rescale}" if self.rescale else ""
        extra += f", loss_kind={self.loss_kind!r}" if self.loss_kind != "ce" else ""
        return f"{self.name}={self.k}{extra}"


def loss_order(ctx: SelectionContext) -> Tensor:
    """Every row, largest score first, ties by the lower index; sorted once per step and
    shared through ``ctx.cache`` (K-SAM's ascent and descent rules pick from the same
    losses)."""
    assert ctx.scores is not None
    cached = ctx.cache.get("top_loss_order")
    if cached is None or cached[0] is not ctx.scores:
        cached = ctx.cache["top_loss_order"] = (ctx.scores, descending_order(ctx.scores))
    return cached[1]


def _check_rescale(rescale: bool | float) -> bool | float:
    """``rescale``: True (the full estimated scale), False (none) or a power in [0, 1] of it
    (a step between the plain top-K step and the full-batch-sized one)."""
    if isinstance(rescale, bool):
        return rescale
    try:
        return check_fraction("rescale", rescale)
    except ValueError:
        raise ValueError(f"rescale must be True, False or a power in [0, 1], got "
                         f"{rescale!r}") from None


#: Kinds of per-sample loss :class:`TopLoss` knows (``loss_kind``): ``"ce"`` cross-entropy
#: of one prediction (softmax or sigmoid), ``"mse"`` a squared error, ``"other"`` anything
#: else (a mean over tokens or labels, a label-smoothed or shifted loss, ...).
LOSS_KINDS = ("ce", "mse", "other")
#: The kinds :func:`subset_gradient_scale` has an estimate for.
RESCALE_KINDS = ("ce", "mse")


def check_loss_kind(kind: str) -> str:
    """Validate a ``loss_kind``: one of :data:`LOSS_KINDS`. Returns it unchanged."""
    if kind not in LOSS_KINDS:
        raise ValueError(f"loss_kind must be one of {', '.join(LOSS_KINDS)}, got {kind!r}")
    return kind


def subset_gradient_scale(scores: Tensor, index: Tensor, kind: str = "ce") -> Tensor:
    r"""Estimated ratio of the full batch's gradient norm to the subset's, from losses alone.

    Each example's gradient w.r.t. the model's output has an estimated size :math:`m(l)`
    given its loss: for cross-entropy (``kind="ce"``) it is :math:`p - e_y`, of size about
    :math:`1 - p_y = 1 - e^{-l}`; for a squared error :math:`l = r^2` (``kind="mse"``) it
    is :math:`2r`, proportional to :math:`\sqrt{l}`. If the examples' gradients pointed the
    same way, the full-batch mean gradient would be the subset's mean times

    .. math:: s = rac{\operatorname{mean}_{i \in B}\, m(l_i)}
                      {\operatorname{mean}_{i \in S}\, m(l_i)} \in (0, 1].

    Scaling the top-K step by s keeps its size that of a full-batch step: s = 1 while all
    examples are hard (early training), s ~ error rate once most are fitted, when plain
    top-K steps are B/K times larger than SGD's and can kill the network (docs/collapse.md).

    Losses of both kinds are >= 0: a negative loss means the losses are of another kind,
    and the scale is then NaN, so the engine skips the step as non-finite (and counts it)
    rather than apply a made-up scale. Computed on the device, no host sync, detached.
    """
    if kind not in RESCALE_KINDS:
        raise ValueError(f"no gradient-size estimate for loss_kind={kind!r} "
                         f"(known: {', '.join(RESCALE_KINDS)})")
    losses = scores.detach().float()
    mass = -torch.expm1(-losses) if kind == "ce" else losses.sqrt()
    mass = torch.where(losses >= 0, mass, torch.nan)  # sqrt gives NaN already; expm1 not
    whole = mass.mean()
    sub = mass.index_select(0, index).mean()
    return (whole / sub.clamp_min(1e-12)).clamp(max=1.0)


class RandomSubset(SelectionRule):
    """``k`` examples drawn uniformly without replacement (Bahri et al.), in index order.

    Draws come from the engine's generator (on the CPU, saved in its state_dict) so runs
    are reproducible and resumable.
    """

    draws_on_host = True

    def __init__(self, k: float | int, name: str = "k") -> None:
        self.k = check_subset_size(k, name)
        self.name = name

    def size(self, batch_size: int) -> int:
        return resolve_subset_size(self.k, batch_size, self.name)

    def select(self, ctx: SelectionContext) -> Selection:
        count = self.size(ctx.batch_size)
        gen = ctx.generator
        perm = torch.randperm(ctx.batch_size, generator=gen, device=gen.device if gen else "cpu")
        return Selection(perm[:count].sort().values.to(ctx.device, non_blocking=True))

    def __repr__(self) -> str:
        return f"RandomSubset({self.name}={self.k})"


class LargestLossIncrease(SelectionRule):
    """ESAM's sharpness-sensitive selection: the ``fraction`` of examples whose loss rises
    most from w to w+eps (Du et al. 2022)."""

    needs_scores = True
    needs_perturbed_losses = True

    def __init__(self, fraction: float) -> None:
        self.fraction = check_fraction("gamma", fraction, low_open=True)

    def size(self, batch_size: int) -> int:
        return resolve_subset_size(self.fraction, batch_size, "gamma")

    def select(self, ctx: SelectionContext) -> Selection:
        assert ctx.scores is not None and ctx.perturbed_losses is not None
        increase = ctx.perturbed_losses - ctx.scores
        return Selection(top_indices(increase, self.size(ctx.batch_size)))

    def __repr__(self) -> str:
        return f"LargestLossIncrease(gamma={self.fraction})"


# ------------------------------------------------------------- rules for noisy labels

#: Default ``skip`` of :class:`LossBand`: the share of largest losses it leaves out.
BAND_SKIP = 0.3


def _check_share(value: float, name: str) -> float:
    return check_fraction(name, value, high_open=True)


class LossBand(TopLoss):
    """The K examples that follow the ``skip`` fraction of largest losses at w.

    Rows ``s .. s+K-1`` of the loss order, with ``s = round(skip * B)`` capped at ``B - K``
    (a subset as large as the batch skips nothing). Once the clean examples are fitted the
    mislabelled ones hold the top of the order; a ``skip`` at or above the noise rate
    leaves them out and keeps the hardest of the rest. ``warmup`` and ``rescale`` act as in
    :class:`TopLoss`.
    """

    def __init__(self, k: float | int, name: str = "k", warmup: int = 0,
                 rescale: bool | float = False, loss_kind: str = "ce",
                 skip: float = BAND_SKIP) -> None:
        super().__init__(k, name, warmup=warmup, rescale=rescale, loss_kind=loss_kind)
        self.skip = _check_share(skip, "skip")

    def pick(self, ctx: SelectionContext, order: Tensor, count: int) -> Tensor:
        start = min(round(self.skip * ctx.batch_size), ctx.batch_size - count)
        return order[start:start + count]

    def _repr_options(self) -> str:
        return f"{super()._repr_options()}, skip={self.skip:g}"


class MedianBand(TopLoss):
    """The K examples around the median loss at w: rows ``(B-K)//2 .. (B-K)//2+K-1`` of the
    loss order (the "moderate" coreset of Xia et al., ICLR 2023, per batch). ``warmup`` and
    ``rescale`` as in :class:`TopLoss`."""

    def pick(self, ctx: SelectionContext, order: Tensor, count: int) -> Tensor:
        start = (ctx.batch_size - count) // 2
        return order[start:start + count]


class StratifiedLoss(TopLoss):
    """K rows at evenly spaced ranks of the loss order, ranks ``floor(i * B / K)`` for
    ``i < K`` (with B = 4K: ranks 0, 4, 8, ...): every part of the loss distribution in
    proportion, the hardest example included. The subset's share of mislabelled examples
    is the batch's, as for a full-batch step, wherever they sit in the order. ``warmup``
    and ``rescale`` as in :class:`TopLoss`."""

    def pick(self, ctx: SelectionContext, order: Tensor, count: int) -> Tensor:
        return _spread_rows(order, ctx.batch_size, count)


def class_round_robin(order: Tensor, labels: Tensor) -> Tensor:
    """Every row, reordered class by class in turn: each class's largest loss first, then
    each class's second largest, and so on; within a round, classes by their loss.

    ``order`` is the loss order (largest first, ties by the lower index), ``labels`` the
    rows' integer labels. The first K rows of the result are the top-K per class, about
    K/C of each class present. Sorts only, no host sync.
    """
    n = order.numel()
    lab = labels.index_select(0, order)  # labels in loss order
    by_class = torch.sort(lab, stable=True).indices  # grouped by class, loss order inside
    grouped = lab.index_select(0, by_class)
    pos = torch.arange(n, device=order.device)
    starts = torch.ones(n, dtype=torch.bool, device=order.device)
    starts[1:] = grouped[1:] != grouped[:-1]
    first = torch.where(starts, pos, torch.zeros_like(pos)).cummax(0).values
    rank_in_class = torch.empty_like(pos).index_copy_(0, by_class, pos - first)
    # Unique keys: within-class rank first, then the global loss rank.
    return order.index_select(0, torch.sort(rank_in_class * n + pos).indices)


class ClassBalancedTopLoss(TopLoss):
    """Top-K by loss at w, taken class by class in turn (:func:`class_round_robin`): the
    hardest example of every class in the batch, then the second hardest of every class,
    until K rows. No class can fill the subset alone, which removes the one-sided subsets
    that start collapses (docs/collapse.md). Reads the labels: batches are
    ``(inputs, labels)``. ``warmup`` and ``rescale`` as in :class:`TopLoss`."""

    needs_labels = True

    def pick(self, ctx: SelectionContext, order: Tensor, count: int) -> Tensor:
        if ctx.labels is None:
            raise ValueError(f"{self!r} needs the batch's labels: give batches as "
                             "(inputs, labels)")
        cached = ctx.cache.get("class_round_robin")
        if cached is None or cached[0] is not order:
            labels = ctx.labels.to(order.device, non_blocking=True)
            cached = ctx.cache["class_round_robin"] = (order, class_round_robin(order, labels))
        return cached[1][:count]


#: Defaults of :class:`AutoBand`: the estimate's margin over the measured share, the steps
#: it is measured over (K-SAM's guard halves the subset at steps 100 and 200 for K = B/4),
#: the decay of its running mean afterwards, and the largest skip (a share of the batch).
AUTO_MARGIN = 1.25
AUTO_ESTIMATE_STEPS = (100, 200)
AUTO_DECAY = 0.95
AUTO_MAX_SKIP = 0.5
#: A fraction F of the run for the CLI's ``estimate=F`` (:func:`auto_window`): F = 0.1 puts
#: the window at steps 96-191 of the 960-step MNIST-1D run the step defaults were chosen on.
AUTO_ESTIMATE_FRACTION = 0.1


#: What :class:`AutoBand` counts (``criterion``): ``"chance"`` the rows below chance,
#: ``"either"`` also the rows the model confidently contradicts (reads the logits).
CRITERIA = ("chance", "either")


def auto_window(fraction: float, steps_total: int) -> tuple[int, int]:
    """:class:`AutoBand`'s ``estimate_steps`` for a run of ``steps_total`` steps when the CLI
    says ``estimate=FRACTION``: steps ``[round(F*T), round(2*F*T))``, at least one step."""
    if isinstance(fraction, bool) or not isinstance(fraction, Real) \
            or not math.isfinite(float(fraction)) or not 0.0 < float(fraction) <= 0.5:
        raise ValueError(f"estimate must be a fraction of the run in (0, 0.5], got "
                         f"{fraction!r}")
    start = round(float(fraction) * steps_total)
    return start, max(start + 1, round(2 * float(fraction) * steps_total))


def rule_options(options: dict, steps_total: int) -> dict:
    """A method's options with the CLI's ``estimate=F`` (``select="auto"`` only) turned into
    an :class:`AutoBand` that measures over :func:`auto_window` of a run of ``steps_total``
    steps; without it the rule keeps its step window (:data:`AUTO_ESTIMATE_STEPS`).
    ``estimate`` with another rule is a ValueError."""
    out = dict(options)
    fraction = out.pop("estimate", None)
    if fraction is None:
        return out
    if out.get("select") != "auto":
        raise ValueError(f"estimate is an option of select='auto', not of select="
                         f"{out.get('select', 'top')!r}")
    out["select"] = functools.partial(AutoBand, estimate_steps=auto_window(fraction,
                                                                           steps_total))
    return out


class AutoBand(TopLoss):
    r"""A :class:`LossBand` whose skip is estimated from the losses, with no noise rate to set.

    An example is *below chance* when its loss exceeds :math:`\ln C` (cross-entropy of a
    uniform guess over C classes): the model rates its label less likely than a guess. Once
    the clean examples are fitted, these are mostly the mislabelled ones (docs/label_noise.md).

    - Steps ``< estimate_until``: K rows at evenly spaced ranks, as :class:`StratifiedLoss`
      (every part of the loss order: the model learns from the whole batch, noisy rows at
      the batch's rate). Over steps ``estimate_from .. estimate_until-1`` the rule averages
      :math:`f_t`, the share of the batch below chance.
    - Afterwards: rows ``s .. s+K-1`` of the loss order with

      .. math:: s = \min\bigl(\lceil \text{margin} \cdot \hat f \cdot B \rceil,\
                \text{max\_skip} \cdot B,\ B - K\bigr), \qquad
                \hat f_t = \min_{u \le t} m_u,

      where :math:`m` starts at the window's mean and is then a running mean
      (:math:`m_t = \text{decay} \cdot m_{t-1} + (1 - \text{decay}) f_t`; ``decay=1``
      keeps the window's mean for the rest of the run). The estimate
      can fall, never rise: the examples a band skips are not trained on and stay above
      chance, so an estimate allowed to rise would feed itself (on clean data it grows until
      the run collapses). The margin keeps the partly fitted mislabelled examples out of
      the top rows of the band.

    C is ``classes`` or, by default, one more than the largest label of the batch (the rule
    then reads the labels: batches are ``(inputs, labels)``). Cross-entropy losses only.
    The estimate lives on the device (no host sync) and in :meth:`state_dict`; a step
    stages its update, which becomes the estimate only when the engine applies the step
    (:meth:`commit`): a skipped step leaves it as it was. K-SAM's ascent and descent rules
    share one estimate (:meth:`share_state`). ``warmup`` and ``rescale`` act as in
    :class:`TopLoss`.
    """

    def __init__(self, k: float | int, name: str = "k", warmup: int = 0,
                 rescale: bool | float = False, loss_kind: str = "ce",
                 margin: float = AUTO_MARGIN,
                 estimate_steps: tuple[int, int] = AUTO_ESTIMATE_STEPS,
                 decay: float = AUTO_DECAY, max_skip: float = AUTO_MAX_SKIP,
                 classes: int | None = None, criterion: str = "chance") -> None:
        super().__init__(k, name, warmup=warmup, rescale=rescale, loss_kind=loss_kind)
        self.criterion = check_choice("criterion", criterion, CRITERIA)
        self.needs_logits = criterion != "chance"
        if self.loss_kind != "ce":
            raise ValueError(f"{type(self).__name__} compares losses with chance level ln C: "
                             f"it needs cross-entropy losses, got loss_kind={loss_kind!r}")
        self.margin = check_number("margin", margin, low=0, low_open=True)
        self.estimate_from, self.estimate_until = _check_window(estimate_steps)
        self.decay = check_fraction("decay", decay)
        self.max_skip = _check_share(max_skip, "max_skip")
        self.classes = None if classes is None else check_int("classes", classes, low=2)
        self.needs_labels = classes is None or criterion != "chance"
        self._estimate = _Estimate()

    def graph_key(self, step: int) -> object:
        if step < self.estimate_from:
            return "stratified"
        return "measure" if step < self.estimate_until else "band"

    def share_state(self, other: SelectionRule) -> None:
        if isinstance(other, AutoBand):
            self._estimate = other._estimate

    def pick(self, ctx: SelectionContext, order: Tensor, count: int) -> Tensor:
        """The rows of this step's phase; the estimate's update is staged (see
        :meth:`commit`)."""
        n = ctx.batch_size
        if ctx.step < self.estimate_from:
            return _spread_rows(order, n, count)
        est = self._estimate
        (total, steps, mean, low, started), new = est.views(order.device)
        below = self.flagged(ctx).float().mean()
        new_total, new_steps, new_mean, new_low, new_started = new
        est.pending = True
        if ctx.step < self.estimate_until:
            new_total.copy_(total + below)
            new_steps.copy_(steps + 1.0)
            new_mean.copy_(mean)
            new_low.copy_(low)
            new_started.copy_(started)
            return _spread_rows(order, n, count)
        # The first band step starts from the window's mean; later ones update it.
        new_total.copy_(total)
        new_steps.copy_(steps)
        new_mean.copy_(torch.where(started > 0, self.decay * mean + (1 - self.decay) * below,
                                   total / steps.clamp_min(1.0)))
        new_low.copy_(torch.where(started > 0, torch.minimum(low, new_mean), new_mean))
        new_started.fill_(1.0)
        cap = min(round(self.max_skip * n), n - count)
        skip = torch.ceil(self.margin * new_low * n).clamp(0, cap).long()
        return order.index_select(0, torch.arange(count, device=order.device) + skip)

    def commit(self, keep: bool | Tensor, sharp: bool = True) -> None:
        self._estimate.commit(keep)

    def flagged(self, ctx: SelectionContext) -> Tensor:
        """Per row, whether it counts towards the measured share: below chance (loss >
        ln C), or with ``criterion="either"`` also confidently contradicted
        (:func:`confidently_contradicted`)."""
        below = ctx.scores.float() > self._chance_loss(ctx)
        if self.criterion == "chance":
            return below
        return below | confidently_contradicted(ctx)

    def estimate(self) -> float | None:
        """The current (committed) estimate of the share to skip, before the margin (host
        sync); None before the first applied band step."""
        state = self._estimate.state
        if state is None or not bool(state[4] > 0):
            return None
        return float(state[3])

    def _chance_loss(self, ctx: SelectionContext) -> Tensor:
        if self.classes is not None:  # a fill, not a host-to-device copy: capturable
            return ctx.scores.new_full((), math.log(self.classes), dtype=torch.float32)
        if ctx.labels is None:
            raise ValueError(f"{self!r} needs the batch's labels (or classes=C): give "
                             "batches as (inputs, labels)")
        top = ctx.labels.to(ctx.scores.device, non_blocking=True).max()
        return torch.log(top.float() + 1)

    def state_dict(self) -> dict:
        state = self._estimate.state
        return {} if state is None else {"estimate": state.detach().cpu().clone()}

    def load_state_dict(self, state: dict, *, applied: bool = False) -> None:
        saved = state.get("estimate")
        if saved is not None and (not isinstance(saved, Tensor) or saved.shape != (5,)
                                  or not bool(saved.isfinite().all())):
            raise ValueError(f"not a state of {type(self).__name__}: {state!r}")
        self._estimate.load(saved)

    def _repr_options(self) -> str:
        extra = "" if self.classes is None else f", classes={self.classes}"
        return f"{super()._repr_options()}, margin={self.margin:g}{extra}"


class _Estimate:
    """:class:`AutoBand`'s estimate on the device: the committed state (share summed over
    the window, window steps, running mean, its minimum, started) and the update staged by
    the current step, one buffer each, made before any capture and updated in place through
    views (a captured graph keeps reading the same buffers). One estimate may serve two
    rules (:meth:`AutoBand.share_state`): both stage the same update from the same losses."""

    def __init__(self) -> None:
        self.state: Tensor | None = None
        self.staged: Tensor | None = None
        self.pending = False  # staged by the current step, not yet committed or dropped
        self._views: tuple[tuple[Tensor, ...], tuple[Tensor, ...]] | None = None

    def views(self, device: torch.device) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
        if self.state is None or self.state.device != device or self._views is None:
            self.state = torch.zeros(5, device=device) if self.state is None \
                else self.state.to(device)
            self.staged = torch.zeros(5, device=device)
            self._views = (self.state.unbind(), self.staged.unbind())
        assert self._views is not None
        return self._views

    def commit(self, keep: bool | Tensor, sharp: bool = True) -> None:
        if not self.pending:
            return
        self.pending = False
        assert self.state is not None and self.staged is not None
        if isinstance(keep, Tensor):
            self.state.copy_(torch.where(keep, self.staged, self.state))
        elif keep:
            self.state.copy_(self.staged)

    def load(self, saved: Tensor | None) -> None:
        self.pending = False
        if saved is None:
            self.state = self.staged = self._views = None
        elif self.state is not None:  # in place: a captured graph keeps reading this buffer
            self.state.copy_(saved)
        else:
            self.state = saved.float().clone()


def _check_window(steps: tuple[int, int]) -> tuple[int, int]:
    ok = isinstance(steps, (tuple, list)) and len(steps) == 2 and all(
        isinstance(x, Integral) and not isinstance(x, bool) for x in steps)
    if not ok or not 0 <= steps[0] < steps[1]:
        raise ValueError(f"estimate_steps must be two ints 0 <= start < stop, got {steps!r}")
    return int(steps[0]), int(steps[1])


def _spread_rows(order: Tensor, n: int, count: int) -> Tensor:
    """Rows at evenly spaced ranks ``floor(i * n / count)`` of ``order``."""
    return order.index_select(0, torch.arange(count, device=order.device) * n // count)


# ----------------------------------------------- rules that read logits, memory or noise

def label_margins(ctx: SelectionContext) -> Tensor:
    r"""Per row, the labelled class's logit minus the largest other logit at w
    (:math:`z_y - \max_{c \ne y} z_c`; negative: the model contradicts the label), fp32,
    from the scoring pass's logits; computed once per step (``ctx.cache``)."""
    cached = ctx.cache.get("label_margins")
    if cached is not None:
        return cached
    if ctx.logits is None or ctx.labels is None:
        raise ValueError("this selection rule reads the logits and the labels: give batches "
                         "as (inputs, labels) and a loss_fn that returns "
                         "ksam.LossOutput(losses, logits)")
    z = ctx.logits.detach().float()
    y = ctx.labels.to(z.device, non_blocking=True).long().unsqueeze(1)
    labelled = z.gather(1, y).squeeze(1)
    other = z.scatter(1, y, -math.inf).amax(1)
    margins = ctx.cache["label_margins"] = labelled - other
    return margins


def _kept_first(order: Tensor, dropped: Tensor) -> Tensor:
    """``order`` with the rows not ``dropped`` first, each group in its order (a stable
    sort on the group: static shapes, no host sync)."""
    key = dropped.index_select(0, order).to(torch.uint8)
    return order.index_select(0, torch.sort(key, stable=True).indices)


class TopLossUncontradicted(TopLoss):
    r"""Top-K among the rows the model does not *confidently contradict*, then the others,
    each group largest loss first.

    A row is confidently contradicted at w when the model's most likely class is not the
    label and has probability at least 1/2 (:math:`\arg\max_c z_c \ne y` and
    :math:`\max_c \operatorname{softmax}(z)_c \ge 1/2`). A mislabelled example - symmetric
    noise, or a class flipped to a fixed other class - is one the model predicts as its
    true class once it has learned that class from the correctly labelled majority: it is
    confidently contradicted, whatever the noise structure, and left out. A hard clean
    example, and every example early in training, gets a spread-out prediction (no class
    at 1/2) and stays in: the rule is top-K until the model is sure of something. No
    state, no estimate, no window. Reads the labels and the logits of the scoring pass.
    ``warmup`` and ``rescale`` as in :class:`TopLoss`."""

    needs_labels = True
    needs_logits = True

    def pick(self, ctx: SelectionContext, order: Tensor, count: int) -> Tensor:
        cached = ctx.cache.get("uncontradicted_order")
        if cached is None or cached[0] is not order:
            cached = ctx.cache["uncontradicted_order"] = (
                order, _kept_first(order, confidently_contradicted(ctx)))
        return cached[1][:count]


def confidently_contradicted(ctx: SelectionContext) -> Tensor:
    """Per row: the model's most likely class is not the label and has probability >= 1/2
    (see :class:`TopLossUncontradicted`)."""
    probs = torch.softmax(ctx.logits.detach().float(), dim=1)
    return (label_margins(ctx) < 0) & (probs.amax(1) >= 0.5)


class FitGated(TopLoss):
    r"""A rule of two phases, switched by the model's fit, not by a step count: K rows at
    evenly spaced ranks of the loss order (as :class:`StratifiedLoss`: the model learns
    from every part of the batch, mislabelled rows at the batch's rate) while :math:`g_t`,
    the running mean (``decay``) of the share of the batch the model misclassifies, is
    above ``gate`` (1/2); from the first step with :math:`g_t \le \text{gate}` on, the rows
    of :meth:`filtered`. Reads the labels and the scoring pass's logits."""

    needs_labels = True
    needs_logits = True

    def __init__(self, k: float | int, name: str = "k", warmup: int = 0,
                 rescale: bool | float = False, loss_kind: str = "ce",
                 gate: float = 0.5, decay: float = AUTO_DECAY) -> None:
        super().__init__(k, name, warmup=warmup, rescale=rescale, loss_kind=loss_kind)
        self.gate = _check_share(gate, "gate")
        self.decay = check_fraction("decay", decay, high_open=True)
        self._estimate = _Estimate()

    def share_state(self, other: SelectionRule) -> None:
        if isinstance(other, FitGated):
            self._estimate = other._estimate

    def commit(self, keep: bool | Tensor, sharp: bool = True) -> None:
        self._estimate.commit(keep)

    def pick(self, ctx: SelectionContext, order: Tensor, count: int) -> Tensor:
        (fit, measured, _, _, opened), new = self._estimate.views(order.device)
        new_fit, new_measured, _, _, new_opened = new
        self._estimate.pending = True
        wrong = (label_margins(ctx) < 0).float().mean()
        new_fit.copy_(torch.where(measured > 0, self.decay * fit + (1 - self.decay) * wrong,
                                  wrong))
        new_measured.fill_(1.0)
        new_opened.copy_(torch.maximum(opened, (new_fit <= self.gate).float()))
        filtered = self.filtered(ctx, order, count)
        return torch.where(new_opened > 0, filtered,
                           _spread_rows(order, ctx.batch_size, count))

    def filtered(self, ctx: SelectionContext, order: Tensor, count: int) -> Tensor:
        raise NotImplementedError

    def state_dict(self) -> dict:
        state = self._estimate.state
        return {} if state is None else {"estimate": state.detach().cpu().clone()}

    def load_state_dict(self, state: dict, *, applied: bool = False) -> None:
        self._estimate.load(state.get("estimate"))


class GatedUncontradicted(FitGated):
    """:class:`FitGated`, then top-K among the rows the model does not confidently
    contradict (:func:`confidently_contradicted`), then the others."""

    def filtered(self, ctx: SelectionContext, order: Tensor, count: int) -> Tensor:
        return _kept_first(order, confidently_contradicted(ctx))[:count]


class GatedAreaUnderMargin(FitGated):
    """:class:`FitGated`, then top-K among the examples whose remembered label margin (a
    running mean over visits, ``visit_decay``, kept in a per-example memory from the first
    step on) is at least ``threshold``, then the others."""

    def __init__(self, k: float | int, name: str = "k", warmup: int = 0,
                 rescale: bool | float = False, loss_kind: str = "ce", *,
                 num_examples: int, gate: float = 0.5, decay: float = AUTO_DECAY,
                 visit_decay: float = 0.5, threshold: float = 0.0) -> None:
        from .memory import ExampleMemory

        super().__init__(k, name, warmup=warmup, rescale=rescale, loss_kind=loss_kind,
                         gate=gate, decay=decay)
        self.visit_decay, self.threshold = float(visit_decay), float(threshold)
        self.memory = ExampleMemory(num_examples)

    def share_state(self, other: SelectionRule) -> None:
        super().share_state(other)
        if isinstance(other, GatedAreaUnderMargin):
            self.memory = other.memory

    def remembered(self, ctx: SelectionContext) -> Tensor:
        cached = ctx.cache.get("gated_aum")
        if cached is None:
            if ctx.ids is None:
                raise ValueError(f"{self!r} needs the batch's example ids: give batches as "
                                 "ksam.IndexedBatch(batch, index)")
            margins = label_margins(ctx)
            mem = self.memory
            mean = mem.table("aum", (), torch.float32, margins.device).index_select(0, ctx.ids)
            visits = mem.table("aum_visits", (), torch.long, margins.device).index_select(
                0, ctx.ids)
            d = self.visit_decay
            cached = torch.where(visits > 0, d * mean + (1 - d) * margins, margins)
            mem.stage(ctx.ids, aum=cached, aum_visits=visits + 1)
            ctx.cache["gated_aum"] = cached
        return cached

    def pick(self, ctx: SelectionContext, order: Tensor, count: int) -> Tensor:
        self.remembered(ctx)
        return super().pick(ctx, order, count)

    def filtered(self, ctx: SelectionContext, order: Tensor, count: int) -> Tensor:
        return _kept_first(order, self.remembered(ctx) < self.threshold)[:count]


#: Default of :class:`FitGatedBand`'s ``gate``: the band starts once the running mean of
#: the share of the batch the model misclassifies is at most 1/2.
GATE_SHARE = 0.5


class FitGatedBand(AutoBand):
    r""":class:`AutoBand` with its estimate window set by the model's fit instead of step
    counts: K rows at evenly spaced ranks while :math:`g_t`, the running mean (``decay``)
    of the share of the batch the model misclassifies, is above ``gate`` (1/2); from the
    first step with :math:`g_t \le \text{gate}` on, the band, whose skip follows the
    running mean of the measured share (:meth:`AutoBand.flagged`) started at that step,
    downwards only. Reads the labels and the scoring pass's logits."""

    def __init__(self, k: float | int, name: str = "k", warmup: int = 0,
                 rescale: bool | float = False, loss_kind: str = "ce",
                 margin: float = AUTO_MARGIN, decay: float = AUTO_DECAY,
                 max_skip: float = AUTO_MAX_SKIP, criterion: str = "chance",
                 gate: float = GATE_SHARE) -> None:
        super().__init__(k, name, warmup=warmup, rescale=rescale, loss_kind=loss_kind,
                         margin=margin, decay=decay, max_skip=max_skip, criterion=criterion)
        self.gate = _check_share(gate, "gate")
        self.needs_labels = self.needs_logits = True

    def graph_key(self, step: int) -> object:
        return None

    def pick(self, ctx: SelectionContext, order: Tensor, count: int) -> Tensor:
        n = ctx.batch_size
        # state: (gate's running mean, measured, running mean, its minimum, open)
        (fit, measured, mean, low, opened), new = self._estimate.views(order.device)
        new_fit, new_measured, new_mean, new_low, new_opened = new
        self._estimate.pending = True
        wrong = (label_margins(ctx) < 0).float().mean()
        new_fit.copy_(torch.where(measured > 0, self.decay * fit + (1 - self.decay) * wrong,
                                  wrong))
        new_measured.fill_(1.0)
        new_opened.copy_(torch.maximum(opened, (new_fit <= self.gate).float()))
        share = self.flagged(ctx).float().mean()
        new_mean.copy_(torch.where(opened > 0, self.decay * mean + (1 - self.decay) * share,
                                   share))
        new_low.copy_(torch.where(opened > 0, torch.minimum(low, new_mean), new_mean))
        cap = min(round(self.max_skip * n), n - count)
        skip = torch.ceil(self.margin * new_low * n).clamp(0, cap).long()
        band = order.index_select(0, torch.arange(count, device=order.device) + skip)
        return torch.where(new_opened > 0, band, _spread_rows(order, n, count))


#: Default of :class:`AreaUnderMargin`'s ``threshold``: a remembered margin below -ln 2
#: means the model rates another class at least twice as likely as the label, on average
#: over the example's visits.
AUM_THRESHOLD = -math.log(2.0)
#: Default of :class:`AreaUnderMargin`'s ``decay``: the weight of an example's earlier
#: visits in its remembered margin.
AUM_DECAY = 0.5


class AreaUnderMargin(TopLoss):
    r"""Top-K among the examples whose *remembered* label margin is at least ``threshold``
    (-ln 2), then the others, each group largest loss first (after Pleiss et al. 2020,
    "area under the margin"): per example, a running mean over its visits of
    :func:`label_margins`, :math:`a \leftarrow \text{decay}\cdot a + (1-\text{decay})
    \cdot\text{margin}` (the first visit's margin as it is), this visit included.
    Examples the model persistently rates another class above their label, by more than
    twice the odds, are left out, whatever the noise structure; early in training every
    margin is near 0 and the rule is top-K. Keeps one fp32 value and a visit count per
    example (``num_examples`` rows; batches given as :class:`ksam.IndexedBatch`), in the
    engine's :meth:`state_dict`; a skipped step leaves it as it was. Reads the labels and
    the logits of the scoring pass."""

    needs_labels = True
    needs_logits = True

    def __init__(self, k: float | int, name: str = "k", warmup: int = 0,
                 rescale: bool | float = False, loss_kind: str = "ce", *,
                 num_examples: int, threshold: float = AUM_THRESHOLD,
                 decay: float = AUM_DECAY) -> None:
        from .memory import ExampleMemory

        super().__init__(k, name, warmup=warmup, rescale=rescale, loss_kind=loss_kind)
        self.decay = check_fraction("decay", decay, high_open=True)
        self.threshold = check_number("threshold", threshold)
        self.memory = ExampleMemory(num_examples)

    def share_state(self, other: SelectionRule) -> None:
        if isinstance(other, AreaUnderMargin):
            self.memory = other.memory

    def pick(self, ctx: SelectionContext, order: Tensor, count: int) -> Tensor:
        cached = ctx.cache.get("aum_order")
        if cached is None or cached[0] is not order:
            if ctx.ids is None:
                raise ValueError(f"{self!r} needs the batch's example ids: give batches as "
                                 "ksam.IndexedBatch(batch, index)")
            margins = label_margins(ctx)
            mem = self.memory
            mean = mem.table("aum", (), torch.float32, margins.device).index_select(0, ctx.ids)
            visits = mem.table("aum_visits", (), torch.long, margins.device).index_select(
                0, ctx.ids)
            new = torch.where(visits > 0, self.decay * mean + (1 - self.decay) * margins,
                              margins)
            mem.stage(ctx.ids, aum=new, aum_visits=visits + 1)
            cached = ctx.cache["aum_order"] = (order, _kept_first(order, new < self.threshold))
        return cached[1][:count]

    def _repr_options(self) -> str:
        return f"{super()._repr_options()}, num_examples={self.memory.num_examples}"


#: Default of :class:`LossSampled`'s ``uniform``: the share of the sampling weight spread
#: evenly over the batch, so that no example can own the subset.
SAMPLE_UNIFORM = 0.5


class LossSampled(TopLoss):
    r"""K rows drawn without replacement with probability growing with the loss at w
    (AUSAM, Zhao et al. 2025, samples by a remembered score; here the step's own losses),

    .. math:: p_i \propto (1 - u)\,\frac{l_i}{\sum_j l_j} + \frac{u}{B},

    ``u`` = ``uniform``: every example keeps at least :math:`u/B` of the weight, so no
    example can own the subset. One draw a step (Gumbel top-K over the whole batch, from
    the engine's generator on the host), shared by K-SAM's ascent and descent rules:
    the ascent takes the first K1 rows of the drawn order, the descent the first K2.
    """

    draws_on_host = True

    def __init__(self, k: float | int, name: str = "k", warmup: int = 0,
                 rescale: bool | float = False, loss_kind: str = "ce",
                 uniform: float = SAMPLE_UNIFORM) -> None:
        super().__init__(k, name, warmup=warmup, rescale=rescale, loss_kind=loss_kind)
        self.uniform = _check_share(uniform, "uniform") if uniform != 1 else 1.0

    def pick(self, ctx: SelectionContext, order: Tensor, count: int) -> Tensor:
        cached = ctx.cache.get("sampled_order")
        if cached is None or cached[0] is not ctx.scores:
            losses = ctx.scores.detach().float().clamp_min(0)
            total = losses.sum().clamp_min(1e-12)
            weights = (1 - self.uniform) * losses / total + self.uniform / ctx.batch_size
            gen = ctx.generator
            u = torch.rand(ctx.batch_size, generator=gen,
                           device=gen.device if gen is not None else "cpu")
            gumbel = -torch.log(-torch.log(u.clamp(1e-12, 1 - 1e-7)))
            keys = weights.log() + gumbel.to(weights.device, non_blocking=True)
            cached = ctx.cache["sampled_order"] = (ctx.scores, descending_order(keys))
        return cached[1][:count]


class LargestIncreaseTop(TopLoss):
    """The K rows whose loss rises most from w to w+eps (ESAM's and AUSAM's sharpness
    score) for K-SAM's descent; a full forward at w+eps gives the losses. K-SAM's ascent
    with this rule takes evenly spaced ranks of the loss order (as :class:`StratifiedLoss`):
    the score exists only once eps does. ``warmup`` and ``rescale`` as in :class:`TopLoss`
    (the rescale reads the losses at w)."""

    def __init__(self, k: float | int, name: str = "k", warmup: int = 0,
                 rescale: bool | float = False, loss_kind: str = "ce",
                 descent: bool = True) -> None:
        super().__init__(k, name, warmup=warmup, rescale=rescale, loss_kind=loss_kind)
        self.needs_perturbed_losses = bool(descent)

    def pick(self, ctx: SelectionContext, order: Tensor, count: int) -> Tensor:
        if not self.needs_perturbed_losses:
            return _spread_rows(order, ctx.batch_size, count)
        assert ctx.perturbed_losses is not None
        return top_indices(ctx.perturbed_losses - ctx.scores.float(), count)


#: What makes a rule of the top-K family: ``factory(k, name, warmup=, rescale=, loss_kind=)``.
RuleFactory = Callable[..., TopLoss]

#: Selection rules by name, for ``KSAM(..., select=NAME)`` and ``OrderedSGD(..., select=NAME)``.
#: Each factory takes ``(k, name="k", warmup=0, rescale=False, loss_kind="ce")``; its own
#: options have defaults. ``"top"`` is the paper's top-K (:class:`TopLoss`).
RULES: dict[str, RuleFactory] = {
    "top": TopLoss,
    "band": LossBand,
    "median": MedianBand,
    "stratified": StratifiedLoss,
    "balanced": ClassBalancedTopLoss,
    "auto": AutoBand,
}


def build_rule(select: str | RuleFactory, k: float | int, name: str = "k",
               **options) -> TopLoss:
    """``RULES[select](k, name, **options)``; ValueError naming the known rules otherwise.

    ``select`` may also be a factory with the signature of :data:`RULES`' values, e.g.
    ``functools.partial(AutoBand, estimate_steps=(2000, 4000))`` for a rule's own options.
    """
    factory = RULES.get(select) if isinstance(select, str) else None
    if factory is None and callable(select):
        rule = select(k, name, **options)
        if not isinstance(rule, TopLoss):
            raise ValueError(f"select={select!r} made {rule!r}, not a selection rule of the "
                             "top-K family (a ksam.selection.TopLoss)")
        return rule
    if factory is None:
        raise ValueError(f"unknown selection rule {select!r}; choose one of: "
                         f"{', '.join(RULES)}")
    return factory(k, name, **options)
