r"""Descent-gradient transforms: a rule that rewrites the descent gradient before the base
optimizer steps with it, and may carry state from one step to the next.

:class:`LookSAMRule` (Liu et al., CVPR 2022) is SAM on every ``interval``-th step (the engine's
:class:`ksam.schedule.Schedule`) and, in between, the plain gradient corrected by the part of
the last SAM gradient that the plain gradient lacks. On a SAM step, with g the ascent
gradient at w and :math:`g_s` the SAM gradient at :math:`w + \rho g/\lVert g\rVert`:

.. math::
    g_v = g_s - \frac{g_s \cdot g}{\lVert g\rVert^2}\, g, \qquad
    v = \frac{g_v}{\lVert g_v\rVert}, \qquad \text{descend with } g_s;

on the other steps, one pass gives g at w and the step descends with
:math:`g + \alpha\,\lVert g\rVert\, v`.

The rule is both the perturbation (SAM's, recording the unit ascent direction) and the
transform. Its vectors live in flat buffers, one per rule, so the dot product and the norms
are single kernels; the per-parameter tensors are views into them.

Under DistributedDataParallel with a per-rank perturbation each rank's g is its own, and so
would be its :math:`g_v`; the rule averages :math:`g_v` over the replicas before
normalizing it (one all-reduce of the flat buffer on each SAM step), so that every rank
keeps the same v and the replicas stay identical. Under FSDP2 the buffers hold the local
shards, and the dot product and the norms are summed over all shards.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .perturbation import _EPS, GradientNormPerturbation, step_along_
from .stateful import Stateful
from .validate import check_number

if TYPE_CHECKING:
    from .params import ParameterSet


class GradientTransform(Stateful):
    """Base class of the engine's descent-gradient hook (a :class:`ksam.stateful.Stateful`
    whose state must be in a method's state).

    The engine calls :meth:`bind` with the optimizer's parameters (their local shards
    under FSDP2; again when they change), :meth:`transform_` with the descent gradient of
    every step (``sharp``: the step ran its ascent pass; ``space``, the
    :class:`ksam.params.ParameterSet`, gives norms and sums over all shards and averages
    over replicas), and
    :meth:`commit` once the step is known to be applied (``keep``: a bool, or on the fast
    path a 0-d bool device tensor), so a skipped step leaves the rule's state as it was.
    """

    def bind(self, params: list[Tensor]) -> None:
        """Called by the engine with the parameters it steps: before any step, and again
        when the optimizer's parameters change (a param group added); a rule keeps its
        state for the parameters it had."""

    def transform_(self, params: list[Tensor], grads: list[Tensor], sharp: bool,
                   space: ParameterSet) -> None:
        """Rewrite ``grads`` (the descent gradients of ``params``) in place."""
        raise NotImplementedError

    required = True


class LookSAMRule(GradientNormPerturbation, GradientTransform):
    """LookSAM's perturbation and descent transform (see the module docstring)."""

    def __init__(self, rho: float = 0.05, alpha: float = 0.7) -> None:
        super().__init__(rho)
        self.alpha = check_number("alpha", alpha, low=0)
        self._index: dict[int, int] = {}  # id(parameter) -> its position in bind()'s list
        self._offsets: list[int] = [0]
        self._shapes: list[torch.Size] = []
        self._all_views: dict[int, list[Tensor]] = {}
        self._bound: list[Tensor] = []  # the parameters of the last bind()
        self._unit: Tensor | None = None  # g/|g| of this step's ascent gradient
        self._v: Tensor | None = None  # the stored unit orthogonal component
        self._next: Tensor | None = None  # scratch: the new v, or alpha |g| v

    def bind(self, params: list[Tensor]) -> None:
        """The flat buffers for ``params``. Bound again (the optimizer's parameters changed),
        the stored direction v keeps its entries for the parameters it had and is zero on
        the new ones (its component along parameters no longer stepped is dropped)."""
        kinds = {(p.device, p.dtype) for p in params}
        if len(kinds) != 1:
            raise ValueError("LookSAM keeps its vectors in one flat buffer: all parameters "
                             f"must share one device and dtype, got {sorted(map(str, kinds))}")
        kept = {} if self._v is None else {
            id(p): v for p, v in zip(self._bound, self._views(self._v, self._bound))}
        total = sum(p.numel() for p in params)
        like = params[0]
        self._unit = like.new_zeros(total)
        self._v = like.new_zeros(total)
        self._next = like.new_zeros(total)
        self._bound = list(params)  # held: a kept entry's id is never another tensor's
        self._index = {id(p): i for i, p in enumerate(params)}
        self._offsets = [0]
        for p in params:
            self._offsets.append(self._offsets[-1] + p.numel())
        self._shapes = [p.shape for p in params]
        # Views over all parameters, made once: the usual step has a gradient for each.
        self._all_views = {id(f): self._views(f, params) for f in (self._unit, self._next)}
        for p, v in zip(params, self._views(self._v, params)):
            old = kept.get(id(p))
            if old is not None and old.shape == v.shape:
                v.copy_(old)

    def _views(self, flat: Tensor, params: list[Tensor]) -> list[Tensor]:
        """Views of ``flat`` shaped as ``params`` (all of bind()'s or a subset of them)."""
        cached = self._all_views.get(id(flat))
        if cached is not None and len(params) == len(self._index):
            return cached
        out = []
        for p in params:
            i = self._index[id(p)]
            out.append(flat[self._offsets[i]:self._offsets[i + 1]].view(self._shapes[i]))
        return out

    # -------------------------------------------------------------- SAM steps: perturbation
    def perturb_(self, params: list[Tensor], grads: list[Tensor],
                 space: ParameterSet) -> Tensor:
        """SAM's eps (bit-identical to :class:`GradientNormPerturbation`), after recording
        g/|g| for the orthogonal component."""
        assert self._unit is not None, "bind() first"
        norm = space.norm(grads)
        if len(params) != len(self._index):  # parameters without a gradient: zero there
            self._unit.zero_()
        unit = self._views(self._unit, params)
        torch._foreach_copy_(unit, grads)
        self._unit.div_(norm + _EPS)
        step_along_(params, grads, self.rho / (norm + _EPS))
        return norm

    # --------------------------------------------------------------------------- descent
    def transform_(self, params: list[Tensor], grads: list[Tensor], sharp: bool,
                   space: ParameterSet) -> None:
        assert self._next is not None and self._v is not None and self._unit is not None
        scratch = self._next
        if sharp:
            # v = g_v/|g_v|, g_v = g_s - (g_s . u) u with u = g/|g|; g_s itself is descended.
            if len(params) != len(self._index):
                scratch.zero_()
            torch._foreach_copy_(self._views(scratch, params), grads)
            dot = space.sum_over_shards(torch.dot(scratch, self._unit))
            scratch.addcmul_(self._unit, dot, value=-1.0)
            # Under DDP with a per-rank perturbation u is the rank's own: g_v is averaged
            # over the replicas, so that every rank keeps the same v and steps alike.
            space.mean_over_replicas_(scratch)
            scratch.div_(space.norm([scratch]) + _EPS)
            return
        norm = space.norm(grads)
        torch.mul(self._v, self.alpha * norm, out=scratch)
        torch._foreach_add_(grads, self._views(scratch, params))

    def commit(self, keep: bool | Tensor, sharp: bool) -> None:
        if not sharp:
            return
        assert self._v is not None and self._next is not None
        if isinstance(keep, Tensor):
            self._v.copy_(torch.where(keep, self._next, self._v))
        elif keep:
            self._v.copy_(self._next)

    def state_dict(self) -> dict:
        return {"v": None if self._v is None else self._v.detach().clone()}

    def load_state_dict(self, state: dict, *, applied: bool = False) -> None:
        """Restore :meth:`state_dict`: ValueError, nothing changed, unless it holds v, a
        finite vector with one entry per parameter entry, of the parameters' dtype."""
        assert self._v is not None, "bind() first"
        v = state.get("v") if isinstance(state, dict) else None
        if not isinstance(v, Tensor):
            raise ValueError("LookSAM's state lacks its stored direction v")
        if v.shape != self._v.shape or v.dtype != self._v.dtype:
            raise ValueError(f"LookSAM state: v has {v.numel()} entries of {v.dtype}, the "
                             f"parameters {self._v.numel()} of {self._v.dtype}")
        if not bool(v.isfinite().all()):
            raise ValueError("LookSAM state: v is not finite")
        self._v.copy_(v)

    def __repr__(self) -> str:
        return f"LookSAMRule(rho={self.rho}, alpha={self.alpha})"
