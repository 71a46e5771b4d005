"""Adapters that run any ksam method inside other training loops.

The submodules import their framework on import, so they stay opt-in extras:

- :mod:`ksam.integrations.transformers` - :class:`KSAMTrainer`, a Hugging Face
  ``transformers.Trainer`` whose steps are ksam steps (``pip install ksam[transformers]``);
- :mod:`ksam.integrations.lightning` - :class:`KSAMMixin`, manual-optimization helper for a
  Lightning ``LightningModule`` (``pip install ksam[lightning]``).

This package itself imports neither, so ``import ksam.integrations`` always works.
"""

from __future__ import annotations

__all__: list[str] = []
