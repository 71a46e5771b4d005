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

The rules of K-SAM and Ordered SGD by name (:data:`RULES`, ``KSAM(..., select=NAME)``):
once the clean examples are fitted, the highest losses of a batch are mostly mislabelled
examples (docs/experiments/label-noise.md), so all but ``top`` take K examples from *below*
the top of the loss order or spread over it.

- :class:`TopLoss` (``"top"``) - the paper's rule.
- :class:`StratifiedLoss` (``"stratified"``) - K examples at evenly spaced ranks of the loss
  order.
- :class:`AutoBand` (``"auto"``) - a band whose skip is estimated from the losses: the share
  of examples the model rates below chance, measured early in training, never raised after.
- :class:`AutoMarginBand` (``"auto-margin"``, K-SAM's default) - :class:`AutoBand` that also
  counts the examples the model confidently contradicts (it reads the logits).
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from numbers import Integral, Real
from typing import NamedTuple

import torch
from torch import Tensor

from .stateful import Stateful
from .validate import check_fraction, check_int, check_number


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

    def as_ascent(self) -> SelectionRule:
        """The rule as K-SAM's ascent rule: itself, but for a rule defined only at w+eps
        (which takes other rows for the ascent, where eps does not exist yet)."""
        return self


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

    Why (docs/experiments/collapse.md): at initialization the per-sample losses are all close to
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
    top-K steps are B/K times larger than SGD's and can kill the network
    (docs/experiments/collapse.md).

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

def _check_share(value: float, name: str) -> float:
    return check_fraction(name, value, high_open=True)


class StratifiedLoss(TopLoss):
    """K rows at evenly spaced ranks of the loss order, ranks ``floor(i * B / K)`` for
    ``i < K`` (with B = 4K: ranks 0, 4, 8, ...): every part of the loss distribution in
    proportion, the hardest example included. The subset's share of mislabelled examples
    is the batch's, as for a full-batch step, wherever they sit in the order. ``warmup``
    and ``rescale`` as in :class:`TopLoss`."""

    def pick(self, ctx: SelectionContext, order: Tensor, count: int) -> Tensor:
        return _spread_rows(order, ctx.batch_size, count)


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


def auto_window(fraction: float, steps_total: int) -> tuple[int, int]:
    """:class:`AutoBand`'s ``estimate_steps`` for a run of ``steps_total`` steps when the CLI
    says ``estimate=FRACTION``: steps ``[round(F*T), round(2*F*T))``, at least one step."""
    if isinstance(fraction, bool) or not isinstance(fraction, Real) \
            or not math.isfinite(float(fraction)) or not 0.0 < float(fraction) <= 0.5:
        raise ValueError(f"estimate must be a fraction of the run in (0, 0.5], got "
                         f"{fraction!r}")
    start = round(float(fraction) * steps_total)
    return start, max(start + 1, round(2 * float(fraction) * steps_total))


def rule_options(options: dict, steps_total: int, default_select: str = "top") -> dict:
    """A method's options with the CLI's ``estimate=F`` (for ``select="auto"`` and
    ``"auto-margin"``; ``default_select`` is the method's rule when the options name none)
    turned into that rule measuring over :func:`auto_window` of a run of ``steps_total``
    steps; without it the rule keeps its step window (:data:`AUTO_ESTIMATE_STEPS`).
    ``estimate`` with another rule is a ValueError."""
    out = dict(options)
    fraction = out.pop("estimate", None)
    if fraction is None:
        return out
    select = out.get("select") or default_select
    if select not in ("auto", "auto-margin"):
        raise ValueError(f"estimate is an option of select='auto' and 'auto-margin', not of "
                         f"select={select!r}")
    out["select"] = functools.partial(RULES[select],
                                      estimate_steps=auto_window(fraction, steps_total))
    return out


class AutoBand(TopLoss):
    r"""A band of the loss order (skip the largest losses, take the next K) whose skip is
    estimated from the losses, with no noise rate to set.

    An example is *below chance* when its loss exceeds :math:`\ln C` (cross-entropy of a
    uniform guess over C classes): the model rates its label less likely than a guess. Once
    the clean examples are fitted, these are mostly the mislabelled ones
    (docs/experiments/label-noise.md).

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
                 classes: int | None = None) -> None:
        super().__init__(k, name, warmup=warmup, rescale=rescale, loss_kind=loss_kind)
        if self.loss_kind != "ce":
            raise ValueError(f"{type(self).__name__} compares losses with chance level ln C: "
                             f"it needs cross-entropy losses, got loss_kind={loss_kind!r}")
        self.margin = check_number("margin", margin, low=0, low_open=True)
        self.estimate_from, self.estimate_until = _check_window(estimate_steps)
        self.decay = check_fraction("decay", decay)
        self.max_skip = _check_share(max_skip, "max_skip")
        self.classes = None if classes is None else check_int("classes", classes, low=2)
        self.needs_labels = classes is None
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
        ln C)."""
        return ctx.scores.float() > self._chance_loss(ctx)

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


def confidently_contradicted(ctx: SelectionContext) -> Tensor:
    """Per row: the model's most likely class is not the label and has probability >= 1/2:
    a confident prediction of another class, which under pair noise marks the flipped
    labels that are still above chance (:class:`AutoMarginBand`)."""
    probs = torch.softmax(ctx.logits.detach().float(), dim=1)
    return (label_margins(ctx) < 0) & (probs.amax(1) >= 0.5)



class AutoMarginBand(AutoBand):
    r""":class:`AutoBand` that also counts the rows the model *confidently contradicts*:
    its most likely class is not the label and has probability at least 1/2
    (:func:`confidently_contradicted`).

    Under noise that maps a class to a fixed other class, a model trained on the batch
    learns the mix: for an image of class c whose label is c+1 it predicts c, with c+1 as a
    strong second. The flipped label is then above chance (its loss is below ln C), so
    :class:`AutoBand` does not count the example, but it is contradicted by a confident
    prediction of another class, so this rule does; under symmetric noise both counts
    agree. Everything else - the window, the running minimum, the margin, the band - is
    :class:`AutoBand`'s.

    Reads the labels and the logits of the scoring pass (a ``loss_fn`` that returns
    :class:`ksam.LossOutput`). Without logits it counts the rows below chance only, as
    :class:`AutoBand`, and says so once (a UserWarning): noise of the second kind is then
    not covered.
    """

    needs_logits = True

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.needs_labels = True
        self._said = {"no logits": False}  # shared by K-SAM's two rules: one warning

    def share_state(self, other: SelectionRule) -> None:
        super().share_state(other)
        if isinstance(other, AutoMarginBand):
            self._said = other._said

    def pick(self, ctx: SelectionContext, order: Tensor, count: int) -> Tensor:
        if ctx.logits is None and not self._said["no logits"]:
            self._said["no logits"] = True
            warnings.warn(f"{self!r} counts the rows the model confidently contradicts "
                          "from the logits, and loss_fn returns none: it counts the rows "
                          "below chance only (label noise that maps a class to a fixed "
                          "other class is then not covered); return "
                          "ksam.LossOutput(losses, logits) from loss_fn", stacklevel=2)
        return super().pick(ctx, order, count)

    def flagged(self, ctx: SelectionContext) -> Tensor:
        below = super().flagged(ctx)
        return below if ctx.logits is None else below | confidently_contradicted(ctx)


#: What makes a rule of the top-K family: ``factory(k, name, warmup=, rescale=, loss_kind=)``.
RuleFactory = Callable[..., TopLoss]

#: Selection rules by name, for ``KSAM(..., select=NAME)`` and ``OrderedSGD(..., select=NAME)``.
#: Each factory takes ``(k, name="k", warmup=0, rescale=False, loss_kind="ce")``; its own
#: options have defaults. ``"top"`` is the paper's top-K (:class:`TopLoss`).
RULES: dict[str, RuleFactory] = {
    "top": TopLoss,
    "stratified": StratifiedLoss,
    "auto": AutoBand,
    "auto-margin": AutoMarginBand,
}


#: Rules that left :data:`RULES` (they fail on clean labels or under noise); the scripts of
#: the experiment pages register them again.
RETIRED_RULES = ("band", "median", "balanced")


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
        retired = (f" ({select!r} left the library in 0.2.0: it fails on clean labels or "
                   "under label noise, docs/experiments/selection-rules.md; "
                   "experiments/scripts/rule_variants.py registers it)"
                   if select in RETIRED_RULES else "")
        raise ValueError(f"unknown selection rule {select!r}; choose one of: "
                         f"{', '.join(RULES)}{retired}")
    return factory(k, name, **options)
