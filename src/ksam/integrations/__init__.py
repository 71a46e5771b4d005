"""Adapters that run any ksam method inside other training loops.

The submodules import their framework on import, so they stay opt-in extras:

- :mod:`ksam.integrations.transformers` - :class:`KSAMTrainer`, a Hugging Face
  ``transformers.Trainer`` whose steps are ksam steps (``pip install ksam[transformers]``);
- :mod:`ksam.integrations.lightning` - :class:`KSAMMixin`, manual-optimization helper for a
  Lightning ``LightningModule`` (``pip install ksam[lightning]``).

This package itself imports neither, so ``import ksam.integrations`` always works; it holds
the one piece both adapters share, :class:`ProxyOptimizer`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

__all__ = ["ProxyOptimizer"]


class ProxyOptimizer(torch.optim.Optimizer):
    """An optimizer that *is* ``base`` (same param_groups, state, defaults, state_dict) except
    for ``step``, which subclasses redirect (a no-op for the Trainer, a step through
    Lightning, a clip before the step...).

    ``Optimizer.__init__`` is not called on purpose: it would copy the param groups, and an
    LR scheduler built on the proxy must set the real learning rates.
    """

    def __init__(self, base: torch.optim.Optimizer) -> None:
        self.base = base

    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.base.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.base.param_groups = value

    @property
    def state(self) -> Any:  # type: ignore[override]
        return self.base.state

    @state.setter
    def state(self, value: Any) -> None:
        self.base.state = value

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self.base.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self.base.defaults = value

    # The device-side skip flags a fused kernel reads (``getattr(opt, "found_inf", None)``),
    # which ksam's fast path and GradScaler set on the optimizer they step: they must reach
    # the optimizer that holds the parameters, or a skipped step would be applied.
    @property
    def found_inf(self) -> Any:
        return self.base.found_inf

    @found_inf.setter
    def found_inf(self, value: Any) -> None:
        self.base.found_inf = value

    @found_inf.deleter
    def found_inf(self) -> None:
        del self.base.found_inf

    @property
    def grad_scale(self) -> Any:
        return self.base.grad_scale

    @grad_scale.setter
    def grad_scale(self, value: Any) -> None:
        self.base.grad_scale = value

    @grad_scale.deleter
    def grad_scale(self) -> None:
        del self.base.grad_scale

    def state_dict(self) -> dict[str, Any]:
        return self.base.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.base.load_state_dict(state_dict)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.base.add_param_group(param_group)

    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.base!r})"

    def step(self, closure: Callable[[], float] | None = None) -> Any:
        return self.base.step(closure)
