r"""Perturbation rules: how the ascent gradient g at w becomes the perturbation eps.

Each rule turns the ascent gradients *in place* into eps and adds eps to the weights, so a
step allocates nothing per parameter: the engine has already saved w and copies it back
bit-for-bit after the descent pass (it never subtracts eps, which would not round-trip).

.. math::
    \text{SAM:}\quad \epsilon = \rho\, \frac{g}{\lVert g \rVert_2}
    \qquad
    \text{ASAM:}\quad \epsilon = \rho\, \frac{T_w^2\, g}{\lVert T_w\, g \rVert_2},\;
    T_w = |w| + \eta
    \qquad
    \text{ESAM (SWP):}\quad \epsilon_i = \frac{m_i}{\beta}\, \rho\,
    \frac{g_i}{\lVert m \odot g \rVert_2},\; m_i \sim \text{Bernoulli}(\beta)
    \qquad
    \text{MSAM:}\quad \epsilon = -\rho\, \frac{v}{\lVert v \rVert_2}

``m_i`` is drawn per parameter tensor; parameters outside the mask get no ascent gradient at
all (the engine turns their ``requires_grad`` off for the ascent pass, which is where ESAM's
saving comes from).

Momentum-SAM's rule needs no ascent gradient: v is the base optimizer's momentum buffer
(``momentum_buffer`` of SGD, ``exp_avg`` of Adam/AdamW) as it stands before the step, which
points along +g, so w - rho v/|v| is an ascent-free estimate of SAM's w + rho g/|g| with the
sign of the last steps' descent (Becker et al. 2024).
"""

from __future__ import annotations

import math
from numbers import Real
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .params import ParameterSet

_EPS = 1e-12


def _check_nonneg(value: float, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) \
            or not (math.isfinite(float(value)) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


class PerturbationRule:
    """Base class. ``ascent_mask`` may choose the parameters that need an ascent gradient.
    ``needs_ascent``: False for a rule that perturbs from the optimizer's state instead of
    an ascent gradient (:class:`MomentumPerturbation`); the engine then runs no ascent pass
    and calls :meth:`perturb_` with :meth:`directions`. ``draws_on_host``: the rule draws
    random numbers on the host every step (the fast path then steps eagerly).
    ``masks_ascent``: :meth:`ascent_mask` may leave parameters without an ascent gradient.

    :meth:`perturb_` takes its norms from ``space`` (:meth:`ksam.params.ParameterSet.norm`),
    so that under FSDP2 they are norms over all shards."""

    needs_ascent: bool = True
    draws_on_host: bool = False
    masks_ascent: bool = False

    def ascent_mask(self, num_params: int, generator: torch.Generator | None) -> list[bool] | None:
        """Which parameters need an ascent gradient; ``None`` means all of them."""
        return None

    def perturb_(self, params: list[Tensor], grads: list[Tensor],
                 space: ParameterSet) -> Tensor:
        """Overwrite ``grads`` with eps, add eps to ``params`` (local tensors, see
        :class:`ksam.params.ParameterSet`); return the ascent gradient's norm."""
        raise NotImplementedError

    def directions(self, params: list[Tensor], optimizer: torch.optim.Optimizer
                   ) -> tuple[list[Tensor], list[Tensor]]:
        """For a rule without an ascent pass: (the parameters to perturb, the tensors
        :meth:`perturb_` takes for them in place of ascent gradients and leaves as they
        are). Host-side lookups only."""
        raise NotImplementedError


class GradientNormPerturbation(PerturbationRule):
    """SAM's rule (Foret et al. 2021): a step of length rho along the normalized gradient."""

    def __init__(self, rho: float = 0.05) -> None:
        self.rho = _check_nonneg(rho, "rho")

    def perturb_(self, params: list[Tensor], grads: list[Tensor],
                 space: ParameterSet) -> Tensor:
        norm = space.norm(grads)
        torch._foreach_mul_(grads, self.rho / (norm + _EPS))
        torch._foreach_add_(params, grads)
        return norm

    def __repr__(self) -> str:
        return f"GradientNormPerturbation(rho={self.rho})"


class AdaptivePerturbation(PerturbationRule):
    """ASAM's rule (Kwon et al. 2021): the SAM step in the scale-invariant metric T_w.

    T_w is computed into scratch buffers allocated once (again only when the parameters'
    shapes change); they hold nothing from one step to the next."""

    def __init__(self, rho: float = 0.5, eta: float = 0.01) -> None:
        self.rho = _check_nonneg(rho, "rho")
        self.eta = _check_nonneg(eta, "eta")
        self._scratch: list[Tensor] = []

    def _buffers(self, params: list[Tensor]) -> list[Tensor]:
        same = len(self._scratch) == len(params) and all(
            b.shape == p.shape and b.dtype == p.dtype and b.device == p.device
            for b, p in zip(self._scratch, params))
        if not same:
            self._scratch = [torch.empty_like(p) for p in params]
        return self._scratch

    def perturb_(self, params: list[Tensor], grads: list[Tensor],
                 space: ParameterSet) -> Tensor:
        scale = self._buffers(params)
        torch._foreach_copy_(scale, params)
        torch._foreach_abs_(scale)
        torch._foreach_add_(scale, self.eta)
        torch._foreach_mul_(grads, scale)  # T g
        norm = space.norm(grads)
        torch._foreach_mul_(grads, scale)  # T^2 g
        torch._foreach_mul_(grads, self.rho / (norm + _EPS))
        torch._foreach_add_(params, grads)
        return norm

    def __repr__(self) -> str:
        return f"AdaptivePerturbation(rho={self.rho}, eta={self.eta})"


class StochasticWeightPerturbation(GradientNormPerturbation):
    """ESAM's stochastic weight perturbation (Du et al. 2022): each parameter tensor is
    perturbed with probability beta, and eps is scaled by 1/beta to stay unbiased."""

    draws_on_host = True  # the mask, one draw per parameter tensor and step
    masks_ascent = True

    def __init__(self, rho: float = 0.05, beta: float = 0.6) -> None:
        super().__init__(rho)
        if isinstance(beta, bool) or not isinstance(beta, Real) or not 0.0 < beta <= 1.0:
            raise ValueError(f"beta must be a probability in (0, 1], got {beta!r}")
        self.beta = float(beta)

    def ascent_mask(self, num_params: int, generator: torch.Generator | None) -> list[bool]:
        draws = torch.rand(num_params, generator=generator)
        return (draws < self.beta).tolist()

    def perturb_(self, params: list[Tensor], grads: list[Tensor],
                 space: ParameterSet) -> Tensor:
        norm = space.norm(grads)
        torch._foreach_mul_(grads, self.rho / (self.beta * (norm + _EPS)))
        torch._foreach_add_(params, grads)
        return norm

    def __repr__(self) -> str:
        return f"StochasticWeightPerturbation(rho={self.rho}, beta={self.beta})"


#: Optimizer state entries that hold a first moment pointing along +g, in order of preference.
MOMENTUM_KEYS = ("momentum_buffer", "exp_avg")


class MomentumPerturbation(PerturbationRule):
    """Momentum-SAM's rule (Becker et al. 2024): eps = -rho v/||v|| with v the base
    optimizer's momentum buffer (SGD) or first moment (Adam/AdamW) as it stands before the
    step, the norm global over all parameters. No ascent pass. Parameters without a buffer
    (the first step, an optimizer without momentum) are not moved; when none has one the step
    is the base optimizer's plain step."""

    needs_ascent = False

    def __init__(self, rho: float = 0.3) -> None:
        self.rho = _check_nonneg(rho, "rho")
        self._scratch: dict[int, Tensor] = {}

    def directions(self, params: list[Tensor], optimizer: torch.optim.Optimizer
                   ) -> tuple[list[Tensor], list[Tensor]]:
        """(the parameters that have a momentum buffer, their buffers): host-side lookups in
        the optimizer's state, no device work."""
        moved, bufs = [], []
        for p in params:
            state = optimizer.state.get(p)
            if not state:
                continue
            for key in MOMENTUM_KEYS:
                buf = state.get(key)
                if isinstance(buf, Tensor):
                    moved.append(p)
                    bufs.append(buf)
                    break
        return moved, bufs

    def perturb_(self, params: list[Tensor], grads: list[Tensor],
                 space: ParameterSet) -> Tensor:
        """``grads`` are the momentum buffers of :meth:`directions`: left unchanged."""
        norm = space.norm(grads)
        # eps goes through a scratch buffer kept per parameter: the optimizer's buffer must
        # stay as it is, and the engine's step allocates nothing per parameter.
        eps = [self._scratch_like(p, b) for p, b in zip(params, grads)]
        torch._foreach_copy_(eps, grads)
        torch._foreach_mul_(eps, -self.rho / (norm + _EPS))
        torch._foreach_add_(params, eps)
        return norm

    def _scratch_like(self, param: Tensor, buf: Tensor) -> Tensor:
        out = self._scratch.get(id(param))
        if out is None or out.shape != buf.shape or out.device != buf.device \
                or out.dtype != buf.dtype:
            out = self._scratch[id(param)] = torch.empty_like(buf)
        return out

    def __repr__(self) -> str:
        return f"MomentumPerturbation(rho={self.rho})"
