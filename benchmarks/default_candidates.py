"""The candidate selection rules for K-SAM's default that are not in the library, and the
``ksam`` command line with them registered (docs/experiments/default-rule.md)::

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/default_candidates.py compare \\
        --task mnist1d --methods ksam:select=aum ksam:select=sample --out runs/x

Registered beside :data:`ksam.selection.RULES` (for this process only: give ``--jobs 1``):

- ``auto-either``: :class:`ksam.selection.AutoMarginBand` (``auto-margin``), the name the
  runs of the default-rule page were made under;
- ``fit-either``: :class:`FitGatedBand`, the same band with its estimate started by the
  model's fit instead of a step window;
- ``confident``: :class:`TopLossUncontradicted`, top-K among the rows the model does not
  confidently contradict;
- ``aum``: :class:`AreaUnderMargin`, top-K among the examples whose remembered label margin
  is at least -ln 2 (a per-example memory: ``num_examples``);
- ``sample``: :class:`LossSampled`, K rows drawn with probability growing with the loss;
- ``increase``: :class:`LargestIncreaseTop`, the descent on the rows whose loss rises most
  under the perturbation;
- ``fit-confident``, ``fit-aum``: :class:`GatedUncontradicted`, :class:`GatedAreaUnderMargin`.
"""

from __future__ import annotations

import copy
import math
import sys

import torch
from torch import Tensor

from ksam import methods, selection
from ksam.lab.cli import main
from ksam.memory import ExampleMemory
from ksam.selection import (
    AUTO_DECAY,
    AUTO_MARGIN,
    AUTO_MAX_SKIP,
    AutoMarginBand,
    SelectionContext,
    SelectionRule,
    TopLoss,
    _check_share,
    _Estimate,
    _spread_rows,
    confidently_contradicted,
    descending_order,
    label_margins,
    top_indices,
)
from ksam.validate import check_fraction, check_number


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


def _update_gate(rule, ctx: SelectionContext, old, new) -> Tensor:
    """The fit gate's staged update, state (gate's running mean, measured, ..., open): the
    running mean of the share of the batch the model misclassifies, and the gate open
    (for good) once that mean is at most ``rule.gate``. Returns the staged ``open``."""
    fit, measured, opened = old[0], old[1], old[-1]
    new_fit, new_measured, new_opened = new[0], new[1], new[-1]
    wrong = (label_margins(ctx) < 0).float().mean()
    new_fit.copy_(torch.where(measured > 0, rule.decay * fit + (1 - rule.decay) * wrong,
                              wrong))
    new_measured.fill_(1.0)
    new_opened.copy_(torch.maximum(opened, (new_fit <= rule.gate).float()))
    return new_opened


def _remembered_margins(rule, ctx: SelectionContext, decay: float) -> Tensor:
    """The batch's label margins averaged over each example's visits (``decay``: the
    running mean's weight on the past; the first visit as it is), staged in ``rule``'s
    per-example memory."""
    if ctx.ids is None:
        raise ValueError(f"{rule!r} needs the batch's example ids: give batches as "
                         "ksam.IndexedBatch(batch, index)")
    margins = label_margins(ctx)
    mem = rule.memory
    mean = mem.table("aum", (), torch.float32, margins.device).index_select(0, ctx.ids)
    visits = mem.table("aum_visits", (), torch.long, margins.device).index_select(0, ctx.ids)
    new = torch.where(visits > 0, decay * mean + (1 - decay) * margins, margins)
    mem.stage(ctx.ids, aum=new, aum_visits=visits + 1)
    return new


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
        old, new = self._estimate.views(order.device)
        self._estimate.pending = True
        new_opened = _update_gate(self, ctx, old, new)
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
            cached = ctx.cache["gated_aum"] = _remembered_margins(self, ctx,
                                                                  self.visit_decay)
        return cached

    def pick(self, ctx: SelectionContext, order: Tensor, count: int) -> Tensor:
        self.remembered(ctx)
        return super().pick(ctx, order, count)

    def filtered(self, ctx: SelectionContext, order: Tensor, count: int) -> Tensor:
        return _kept_first(order, self.remembered(ctx) < self.threshold)[:count]


#: Default of :class:`FitGatedBand`'s ``gate``: the band starts once the running mean of
#: the share of the batch the model misclassifies is at most 1/2.
GATE_SHARE = 0.5


class FitGatedBand(AutoMarginBand):
    r""":class:`AutoBand` with its estimate window set by the model's fit instead of step
    counts: K rows at evenly spaced ranks while :math:`g_t`, the running mean (``decay``)
    of the share of the batch the model misclassifies, is above ``gate`` (1/2); from the
    first step with :math:`g_t \le \text{gate}` on, the band, whose skip follows the
    running mean of the measured share (:meth:`AutoBand.flagged`) started at that step,
    downwards only. Reads the labels and the scoring pass's logits."""

    def __init__(self, k: float | int, name: str = "k", warmup: int = 0,
                 rescale: bool | float = False, loss_kind: str = "ce",
                 margin: float = AUTO_MARGIN, decay: float = AUTO_DECAY,
                 max_skip: float = AUTO_MAX_SKIP, gate: float = GATE_SHARE) -> None:
        super().__init__(k, name, warmup=warmup, rescale=rescale, loss_kind=loss_kind,
                         margin=margin, decay=decay, max_skip=max_skip)
        self.gate = _check_share(gate, "gate")
        self.needs_labels = self.needs_logits = True

    def graph_key(self, step: int) -> object:
        return None

    def pick(self, ctx: SelectionContext, order: Tensor, count: int) -> Tensor:
        n = ctx.batch_size
        # state: (gate's running mean, measured, running mean, its minimum, open)
        old, new = self._estimate.views(order.device)
        (_, _, mean, low, opened), (_, _, new_mean, new_low, _) = old, new
        self._estimate.pending = True
        new_opened = _update_gate(self, ctx, old, new)
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
            new = _remembered_margins(self, ctx, self.decay)
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

    needs_perturbed_losses = True

    def as_ascent(self) -> SelectionRule:
        ascent = copy.copy(self)
        ascent.needs_perturbed_losses = False
        return ascent

    def pick(self, ctx: SelectionContext, order: Tensor, count: int) -> Tensor:
        if not self.needs_perturbed_losses:
            return _spread_rows(order, ctx.batch_size, count)
        assert ctx.perturbed_losses is not None
        return top_indices(ctx.perturbed_losses - ctx.scores.float(), count)


CANDIDATES = {
    "auto-either": AutoMarginBand,
    "fit-either": FitGatedBand,
    "confident": TopLossUncontradicted,
    "aum": AreaUnderMargin,
    "sample": LossSampled,
    "increase": LargestIncreaseTop,
    "fit-confident": GatedUncontradicted,
    "fit-aum": GatedAreaUnderMargin,
}
#: The candidates that keep a per-example memory (they take ``num_examples``).
WITH_MEMORY = ("aum", "fit-aum")


def register() -> None:
    """Make the candidates names of :data:`ksam.selection.RULES` in this process."""
    for name, factory in CANDIDATES.items():
        selection.RULES.setdefault(name, factory)
    methods.RULES_WITH_MEMORY.update(WITH_MEMORY)


if __name__ == "__main__":
    register()
    sys.exit(main(sys.argv[1:]))
