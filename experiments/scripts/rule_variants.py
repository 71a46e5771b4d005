"""``ksam compare`` with extra selection rules registered, for trying rule variants that
are not in :data:`ksam.selection.RULES` (docs/experiments/selection-rules.md, "Rules that did not
work").

Registers, for this process only:

- ``band`` (:class:`LossBand`: skip the 30 % largest losses, take the next K), ``median``
  (:class:`MedianBand`: the K around the median loss, Xia et al. 2023) and ``balanced``
  (:class:`ClassBalancedTopLoss`: top-K class by class), the rules of
  docs/experiments/label-noise.md that did not hold up;
- ``band10``, ``band20``, ``band30``, ``band40``: :class:`ksam.LossBand` with
  ``skip`` 0.1, 0.2, 0.3, 0.4 (``band`` is its default, 0.3);
- ``otsu``: a band whose skip is the high group of the best two-group split of the batch's
  losses (Otsu's criterion, a 1-D two-means), capped at half the batch;
- ``adaptive``: :class:`AdaptiveBand`, a band whose skip is the number of examples with a
  loss above ln 2 (not fitted), capped at half the batch; ``adaptive75`` and
  ``adaptive30`` capped at 0.75 and 0.3; ``adaptive1.5``, ``adaptive-ln10`` with the
  threshold 1.5 and ln 10 instead of ln 2;
- ``chance10``, ``chance15``, ``chance20``: :class:`ChanceBand`, a band whose skip is, at
  every step, ``margin`` (1.0, 1.5, 2.0) times the number of the batch's examples below
  chance (loss above ln C), evenly spaced ranks during K-SAM's warm-up; ``chance15-top``
  the same with the top-K during the warm-up;
- variants of :class:`ksam.selection.AutoBand` (``auto``: margin 1.25, running minimum):
  ``auto10``, ``auto15``, ``auto20`` (margin 1.0, 1.5, 2.0), ``auto15-slow`` (decay
  0.99), and the estimate frozen at the window's mean (``decay=1``): ``auto-frozen10``,
  ``auto-frozen125`` (margin 1.0, 1.25) and ``auto-frozen10-late`` (measured over steps
  200-399); ``auto-half`` (:class:`HalfBand`): half of K from ``auto``'s band, half at
  evenly spaced ranks of the other rows;
- one rule for K-SAM's ascent and another for its descent (:func:`per_pass`):
  ``auto/stratified``, ``stratified/auto``, ``top/stratified``, ``stratified/top``
  (ascent / descent).

Every other argument goes to ``ksam compare``::

    PYTHONPATH=src OMP_NUM_THREADS=1 python experiments/scripts/rule_variants.py \\
        --label-noise 0.2 --epochs 30 --seeds 2 --lr 0.1 \\
        --methods ksam:k=32,rho=0.02,select=otsu --out runs/x
"""

from __future__ import annotations

import functools
import math
import sys

import torch
from torch import Tensor

from ksam import selection
from ksam.lab.cli import main

#: Default ``skip`` of :class:`LossBand`: the share of largest losses it leaves out.
BAND_SKIP = 0.3


class LossBand(selection.TopLoss):
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
        self.skip = selection._check_share(skip, "skip")

    def pick(self, ctx: selection.SelectionContext, order: Tensor, count: int) -> Tensor:
        start = min(round(self.skip * ctx.batch_size), ctx.batch_size - count)
        return order[start:start + count]

    def _repr_options(self) -> str:
        return f"{super()._repr_options()}, skip={self.skip:g}"


class MedianBand(selection.TopLoss):
    """The K examples around the median loss at w: rows ``(B-K)//2 .. (B-K)//2+K-1`` of the
    loss order (the "moderate" coreset of Xia et al., ICLR 2023, per batch). ``warmup`` and
    ``rescale`` as in :class:`TopLoss`."""

    def pick(self, ctx: selection.SelectionContext, order: Tensor, count: int) -> Tensor:
        start = (ctx.batch_size - count) // 2
        return order[start:start + count]


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


class ClassBalancedTopLoss(selection.TopLoss):
    """Top-K by loss at w, taken class by class in turn (:func:`class_round_robin`): the
    hardest example of every class in the batch, then the second hardest of every class,
    until K rows. No class can fill the subset alone, which removes the one-sided subsets
    that start collapses (docs/experiments/collapse.md). Reads the labels: batches are
    ``(inputs, labels)``. ``warmup`` and ``rescale`` as in :class:`TopLoss`."""

    needs_labels = True

    def pick(self, ctx: selection.SelectionContext, order: Tensor, count: int) -> Tensor:
        if ctx.labels is None:
            raise ValueError(f"{self!r} needs the batch's labels: give batches as "
                             "(inputs, labels)")
        cached = ctx.cache.get("class_round_robin")
        if cached is None or cached[0] is not order:
            labels = ctx.labels.to(order.device, non_blocking=True)
            cached = ctx.cache["class_round_robin"] = (order, class_round_robin(order, labels))
        return cached[1][:count]


def high_loss_count(values: Tensor) -> Tensor:
    r"""For ``values`` sorted in descending order, the :math:`j` maximizing
    :math:`j (n-j) (\bar v_{1..j} - \bar v_{j+1..n})^2` (0 when all are equal)."""
    v = values.detach().float()
    n = v.numel()
    v = v[:1] - v  # shift-invariant; equal values give exact zeros
    sums = v.cumsum(0)
    j = torch.arange(1, n, device=v.device, dtype=v.dtype)
    between = j * (n - j) * (sums[:-1] / j - (sums[-1] - sums[:-1]) / (n - j)).square()
    return torch.cat([between.new_zeros(1), between]).argmax()


class OtsuBand(selection.TopLoss):
    """Skip the high group of the two-group split of the batch's losses, take the next K."""

    def pick(self, ctx: selection.SelectionContext, order: Tensor, count: int) -> Tensor:
        n = ctx.batch_size
        cap = min(n // 2, n - count)
        start = high_loss_count(ctx.scores.index_select(0, order)).clamp(max=cap)
        return order.index_select(0, torch.arange(count, device=order.device) + start)


#: Default ``threshold`` of :class:`AdaptiveBand`: a cross-entropy above ln 2 means the
#: model puts less than half its probability on the label (the example is not fitted).
MISFIT_LOSS = math.log(2.0)


class AdaptiveBand(selection.TopLoss):
    """Rows ``s .. s+K-1`` of the loss order, ``s`` = the number of examples with a loss
    at w above ``threshold`` (ln 2: the model gives the label less than half its
    probability), capped at ``max_skip * B`` and ``B - K``; ``s`` stays on the device.

    Measured (docs/experiments/selection-rules.md): the examples it skips are never trained
    on and stay unfitted, so the skip stays far above the noise rate (about 50 of 128 at 20 % noise,
    where 26 are mislabelled) and the model learns slowly.
    """

    def __init__(self, k: float | int, name: str = "k", warmup: int = 0,
                 rescale: bool | float = False, loss_kind: str = "ce",
                 max_skip: float = 0.5, threshold: float = MISFIT_LOSS) -> None:
        super().__init__(k, name, warmup=warmup, rescale=rescale, loss_kind=loss_kind)
        self.max_skip = float(max_skip)
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) \
                or not math.isfinite(threshold):
            raise ValueError(f"threshold must be a finite number, got {threshold!r}")
        self.threshold = float(threshold)

    def pick(self, ctx: selection.SelectionContext, order: Tensor, count: int) -> Tensor:
        n = ctx.batch_size
        assert ctx.scores is not None
        cap = min(round(self.max_skip * n), n - count)
        start = (ctx.scores > self.threshold).sum().clamp(max=cap)
        rows = torch.arange(count, device=order.device) + start
        return order.index_select(0, rows)

    def _repr_options(self) -> str:
        return (f"{super()._repr_options()}, max_skip={self.max_skip:g}, "
                f"threshold={self.threshold:.4g}")


class ChanceBand(selection.TopLoss):
    """Rows ``s .. s+K-1`` of the loss order, ``s`` = ``margin`` times the number of the
    batch's examples below chance (loss above ln C, C = 1 + the largest label), capped at
    half the batch, recomputed at every step; while the subset is larger than K (K-SAM's
    warm-up) evenly spaced ranks, or the top with ``warm="top"``.

    Measured (docs/experiments/selection-rules.md): on clean data the skip feeds itself - the
    examples it skips are not trained on and rise above chance, the skip grows, the run collapses.
    """

    needs_labels = True

    def __init__(self, k: float | int, name: str = "k", warmup: int = 0,
                 rescale: bool | float = False, loss_kind: str = "ce",
                 margin: float = 1.5, warm: str = "stratified") -> None:
        super().__init__(k, name, warmup=warmup, rescale=rescale, loss_kind=loss_kind)
        self.margin, self.warm = float(margin), warm

    def pick(self, ctx: selection.SelectionContext, order: Tensor, count: int) -> Tensor:
        n = ctx.batch_size
        assert ctx.scores is not None and ctx.labels is not None
        if count > self.size(n):  # the guard's warm-up
            if self.warm == "top":
                return order[:count]
            return order.index_select(0, torch.arange(count, device=order.device) * n // count)
        chance = torch.log(ctx.labels.to(order.device).max().float() + 1)
        skip = torch.ceil(self.margin * (ctx.scores > chance).sum())
        skip = skip.clamp(max=min(round(0.5 * n), n - count)).long()
        return order.index_select(0, torch.arange(count, device=order.device) + skip)


def per_pass(ascent: selection.RuleFactory, descent: selection.RuleFactory):
    """A factory that gives K-SAM's ascent pass one rule and its descent pass another.

    :class:`ksam.KSAM` builds its descent rule with the guard's ``warmup=`` (and
    ``rescale=``) and its ascent rule with ``(k, name)`` alone, which is how the factory
    tells them apart. Each rule keeps its own state (an :class:`ksam.selection.AutoBand`
    shares an estimate only with another one).
    """
    def make(k, name="k", **options):
        return descent(k, name, **options) if "warmup" in options else ascent(k, name)
    return make


class HalfBand(selection.AutoBand):
    """:class:`ksam.selection.AutoBand` with half its rows from the band: rows
    ``s .. s+h-1`` (h = ceil(K/2), s the band's skip) and K-h rows at evenly spaced ranks
    of the other B-h rows, the top included; evenly spaced ranks until the estimate's
    window has passed, as ``auto``. The band keeps the hard rows below the skip; the spread
    keeps the batch's easy rows in the subset."""

    def pick(self, ctx: selection.SelectionContext, order: Tensor, count: int) -> Tensor:
        band = super().pick(ctx, order, count)
        if ctx.step < self.estimate_until:
            return band
        n, h = ctx.batch_size, (count + 1) // 2
        skip = (order == band[0]).int().argmax()  # the band's first rank
        spread = torch.arange(count - h, device=order.device) * (n - h) // (count - h)
        spread = spread + h * (spread >= skip)  # ranks outside the band's first h rows
        return torch.cat([band[:h], order.index_select(0, spread)])


def _auto(**options) -> functools.partial:
    return functools.partial(selection.AutoBand, **options)


EXTRA = {
    "band": LossBand,
    "median": MedianBand,
    "balanced": ClassBalancedTopLoss,
    "band10": functools.partial(LossBand, skip=0.1),
    "band20": functools.partial(LossBand, skip=0.2),
    "band30": functools.partial(LossBand, skip=0.3),
    "band40": functools.partial(LossBand, skip=0.4),
    "otsu": OtsuBand,
    "adaptive": AdaptiveBand,
    "adaptive75": functools.partial(AdaptiveBand, max_skip=0.75),
    "adaptive30": functools.partial(AdaptiveBand, max_skip=0.3),
    "adaptive1.5": functools.partial(AdaptiveBand, threshold=1.5),
    "adaptive-ln10": functools.partial(AdaptiveBand, threshold=math.log(10)),
    "chance10": functools.partial(ChanceBand, margin=1.0),
    "chance15": ChanceBand,
    "chance20": functools.partial(ChanceBand, margin=2.0),
    "chance15-top": functools.partial(ChanceBand, warm="top"),
    "auto10": _auto(margin=1.0),
    "auto15": _auto(margin=1.5),
    "auto20": _auto(margin=2.0),
    "auto15-slow": _auto(margin=1.5, decay=0.99),
    "auto-frozen10": _auto(margin=1.0, decay=1.0),
    "auto-frozen125": _auto(margin=1.25, decay=1.0),
    "auto-frozen10-late": _auto(margin=1.0, decay=1.0, estimate_steps=(200, 400)),
    "auto-half": HalfBand,
    "auto/stratified": per_pass(selection.AutoBand, selection.StratifiedLoss),
    "stratified/auto": per_pass(selection.StratifiedLoss, selection.AutoBand),
    "top/stratified": per_pass(selection.TopLoss, selection.StratifiedLoss),
    "stratified/top": per_pass(selection.StratifiedLoss, selection.TopLoss),
}

if __name__ == "__main__":
    selection.RULES.update(EXTRA)
    sys.exit(main(["compare", *sys.argv[1:]]))
