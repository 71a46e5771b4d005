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


def _of_base(name: str) -> property:
    """An attribute that reads, writes and deletes ``self.base``'s attribute ``name``."""
    return property(lambda self: getattr(self.base, name),
                    lambda self, value: setattr(self.base, name, value),
                    lambda self: delattr(self.base, name),
                    doc=f"The base optimizer's ``{name}``.")


class ProxyOptimizer(torch.optim.Optimizer):
    """An optimizer that *is* ``base`` (same param_groups, state, defaults, state_dict) except
    for ``step``, which subclasses redirect (a no-op for the Trainer, a step through
    Lightning, a clip before the step...).

    ``Optimizer.__init__`` is not called on purpose: it would copy the param groups, and an
    LR scheduler built on the proxy must set the real learning rates.
    """

    def __init__(self, base: torch.optim.Optimizer) -> None:
        self.base = base

    param_groups = _of_base("param_groups")  # type: ignore[assignment]
    state = _of_base("state")  # type: ignore[assignment]
    defaults = _of_base("defaults")  # type: ignore[assignment]
    # The device-side skip flags a fused kernel reads (``getattr(opt, "found_inf", None)``),
    # which ksam's fast path and GradScaler set on the optimizer they step: they must reach
    # the optimizer that holds the parameters, or a skipped step would be applied.
    found_inf = _of_base("found_inf")
    grad_scale = _of_base("grad_scale")

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
