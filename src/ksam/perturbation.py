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

``m_i`` is drawn per parameter tensor; parameters outside the mask get no ascent gradient at
all (the engine turns their ``requires_grad`` off for the ascent pass, which is where ESAM's
saving comes from).
"""

from __future__ import annotations

import math
from numbers import Real

import torch
from torch import Tensor

_EPS = 1e-12


def _check_nonneg(value: float, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) \
            or not (math.isfinite(float(value)) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def global_norm(tensors: list[Tensor]) -> Tensor:
    """L2 norm over a list of tensors, on their device, without a host sync."""
    if not tensors:
        return torch.zeros(())
    norms = torch._foreach_norm(tensors)
    return torch.linalg.vector_norm(torch.stack(norms))


class PerturbationRule:
    """Base class. ``ascent_mask`` may choose the parameters that need an ascent gradient."""

    def ascent_mask(self, num_params: int, generator: torch.Generator | None) -> list[bool] | None:
        """Which parameters need an ascent gradient; ``None`` means all of them."""
        return None

    def perturb_(self, params: list[Tensor], grads: list[Tensor]) -> Tensor:
        """Overwrite ``grads`` with eps, add eps to ``params``; return the ascent grad norm."""
        raise NotImplementedError


class GradientNormPerturbation(PerturbationRule):
    """SAM's rule (Foret et al. 2021): a step of length rho along the normalized gradient."""

    def __init__(self, rho: float = 0.05) -> None:
        self.rho = _check_nonneg(rho, "rho")

    def perturb_(self, params: list[Tensor], grads: list[Tensor]) -> Tensor:
        norm = global_norm(grads)
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

    def perturb_(self, params: list[Tensor], grads: list[Tensor]) -> Tensor:
        scale = self._buffers(params)
        torch._foreach_copy_(scale, params)
        torch._foreach_abs_(scale)
        torch._foreach_add_(scale, self.eta)
        torch._foreach_mul_(grads, scale)  # T g
        norm = global_norm(grads)
        torch._foreach_mul_(grads, scale)  # T^2 g
        torch._foreach_mul_(grads, self.rho / (norm + _EPS))
        torch._foreach_add_(params, grads)
        return norm

    def __repr__(self) -> str:
        return f"AdaptivePerturbation(rho={self.rho}, eta={self.eta})"


class StochasticWeightPerturbation(GradientNormPerturbation):
    """ESAM's stochastic weight perturbation (Du et al. 2022): each parameter tensor is
    perturbed with probability beta, and eps is scaled by 1/beta to stay unbiased."""

    def __init__(self, rho: float = 0.05, beta: float = 0.6) -> None:
        super().__init__(rho)
        if isinstance(beta, bool) or not isinstance(beta, Real) or not 0.0 < beta <= 1.0:
            raise ValueError(f"beta must be a probability in (0, 1], got {beta!r}")
        self.beta = float(beta)

    def ascent_mask(self, num_params: int, generator: torch.Generator | None) -> list[bool]:
        draws = torch.rand(num_params, generator=generator)
        return (draws < self.beta).tolist()

    def perturb_(self, params: list[Tensor], grads: list[Tensor]) -> Tensor:
        norm = global_norm(grads)
        torch._foreach_mul_(grads, self.rho / (self.beta * (norm + _EPS)))
        torch._foreach_add_(params, grads)
        return norm

    def __repr__(self) -> str:
        return f"StochasticWeightPerturbation(rho={self.rho}, beta={self.beta})"
