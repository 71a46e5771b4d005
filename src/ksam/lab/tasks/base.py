"""What a task builder returns (:class:`TaskData`) and a registered task
(:class:`TaskSpec`); their own module so that builders in sub-modules (``text``, ``user``)
import them without importing the package that registers them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from . import data as _data

Augment = Callable[[Tensor, "torch.Generator | None"], Tensor]


@dataclass
class TaskData:
    """What a task builder returns: raw arrays (see :mod:`ksam.lab.tasks.data`) plus metadata.

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


Builder = Callable[..., TaskData]


@dataclass(frozen=True)
class TaskSpec:
    """A task: its builder ``build(data_dir, need_test, **options) -> TaskData``, a
    one-line description, its options' defaults and the training defaults it sets (for
    ``ksam tasks``; ``defaults_note`` says where an option changes them).
    ``check_model``: before any run, build the model and run it on two training examples
    (a task of the user's own, :mod:`ksam.lab.tasks.user`)."""

    name: str
    build: Builder
    description: str
    options: dict[str, Any]
    defaults: dict[str, Any] = field(default_factory=dict)
    defaults_note: str = ""
    check_model: bool = False
