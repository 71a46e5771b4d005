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

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .params import Scratch
from .validate import check_fraction, check_number

if TYPE_CHECKING:
    from .params import ParameterSet

_EPS = 1e-12


def step_along_(params: list[Tensor], directions: list[Tensor],
                scale: Tensor | float) -> None:
    """``w <- w + scale * d`` for every parameter, ``d`` overwritten with ``scale * d`` (the
    perturbation eps, in place: nothing allocated)."""
    torch._foreach_mul_(directions, scale)
    torch._foreach_add_(params, directions)


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
        self.rho = check_number("rho", rho, low=0)

    def perturb_(self, params: list[Tensor], grads: list[Tensor],
                 space: ParameterSet) -> Tensor:
        norm = space.norm(grads)
        step_along_(params, grads, self.rho / (norm + _EPS))
        return norm

    def __repr__(self) -> str:
        return f"GradientNormPerturbation(rho={self.rho})"


class AdaptivePerturbation(PerturbationRule):
    """ASAM's rule (Kwon et al. 2021): the SAM step in the scale-invariant metric T_w.

    T_w is computed into scratch buffers allocated once (again only when the parameters'
    shapes change); they hold nothing from one step to the next."""

    def __init__(self, rho: float = 0.5, eta: float = 0.01) -> None:
        self.rho = check_number("rho", rho, low=0)
        self.eta = check_number("eta", eta, low=0)
        self._scratch = Scratch()

    def perturb_(self, params: list[Tensor], grads: list[Tensor],
                 space: ParameterSet) -> Tensor:
        scale = self._scratch.like(params)
        torch._foreach_copy_(scale, params)
        torch._foreach_abs_(scale)
        torch._foreach_add_(scale, self.eta)
        torch._foreach_mul_(grads, scale)  # T g
        norm = space.norm(grads)
        torch._foreach_mul_(grads, scale)  # T^2 g
        step_along_(params, grads, self.rho / (norm + _EPS))
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
        self.beta = check_fraction("beta", beta, low_open=True)

    def ascent_mask(self, num_params: int, generator: torch.Generator | None) -> list[bool]:
        draws = torch.rand(num_params, generator=generator)
        return (draws < self.beta).tolist()

    def perturb_(self, params: list[Tensor], grads: list[Tensor],
                 space: ParameterSet) -> Tensor:
        norm = space.norm(grads)
        step_along_(params, grads, self.rho / (self.beta * (norm + _EPS)))
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
        self.rho = check_number("rho", rho, low=0)
        self._scratch = Scratch()

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
        eps = self._scratch.like(grads, keys=params)
        torch._foreach_copy_(eps, grads)
        step_along_(params, eps, -self.rho / (norm + _EPS))
        return norm

    def __repr__(self) -> str:
        return f"MomentumPerturbation(rho={self.rho})"
