"""What a task builder returns (:class:`TaskData`); its own module so that builders in
sub-modules (``text``) import it without importing the package that registers them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from . import data as _data

Augment = Callable[[Tensor, "torch.Generator | None"], Tensor]


@dataclass
class TaskData:
    """What a task builder returns: raw arrays (see :mod:`ksam.tasks.data`) plus metadata.

    Images are uint8 (scaled to [0, 1] then normalized with ``mean``/``std`` per channel on
    the device) or float already normalized (``mean``/``std`` None).
    """

    splits: _data.RawSplits
    num_classes: int
    make_model: Callable[[], nn.Module]
    defaults: dict[str, Any]
    description: str
    augment: Augment | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
