"""Training tasks: a dataset on the device, a model factory, augmentation and defaults.

A :class:`Task` keeps the whole dataset as tensors on the training device, because K-SAM
and friends rank the examples of a batch by loss, which is cheap only if batches are
sliced on the device instead of coming from a CPU data loader.

>>> task = get_task("mnist1d", device="cpu", train_subset=1000, label_noise=0.2, seed=0)
>>> model = task.make_model()

Adding a task takes a few lines: decorate a builder with :func:`register_task`, returning a
:class:`TaskData` of raw arrays; :func:`get_task` does the rest (split, subset, label noise,
transfer, normalization) identically for every task.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...memory import LossOutput
from . import data as _data
from . import models as _models
from . import user
from .augment import RandomCropFlip, random_crop_flip
from .base import Augment, Builder, TaskData, TaskSpec

__all__ = [
    "TASKS",
    "RandomCropFlip",
    "Task",
    "TaskData",
    "TaskSpec",
    "available_tasks",
    "get_task",
    "per_sample_cross_entropy",
    "cross_entropy_output",
    "random_crop_flip",
    "register_task",
    "task_spec",
]

@dataclass(eq=False, repr=False)
class Task:
    """A ready-to-train task: tensors already on the device, normalized, labels int64."""

    name: str
    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    num_classes: int
    make_model: Callable[[], nn.Module]
    augment: Augment | None = None
    defaults: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    # Which training examples got a noisy label (bool [n_train]); None without label noise.
    # Lets analyses check e.g. how often K-SAM's top-K examples are the mislabelled ones.
    noisy_mask: Tensor | None = None

    @property
    def num_train(self) -> int:
        return int(self.train_y.shape[0])

    @property
    def num_test(self) -> int:
        return int(self.test_y.shape[0])

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train_x.shape[1:])

    def __repr__(self) -> str:
        return (
            f"Task(name={self.name!r}, train={tuple(self.train_x.shape)}, "
            f"test={tuple(self.test_x.shape)}, num_classes={self.num_classes}, "
            f"device={self.train_x.device}, augment={self.augment!r})"
        )


def per_sample_cross_entropy(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    """Unreduced cross-entropy ``[n]``: the per-example losses K-SAM ranks to pick its top-K."""
    x, y = batch
    return F.cross_entropy(model(x), y, reduction="none")


def cross_entropy_output(model: nn.Module, batch: tuple[Tensor, Tensor]) -> LossOutput:
    """:func:`per_sample_cross_entropy` with the logits (what SAF and MESA read)."""
    x, y = batch
    logits = model(x)
    return LossOutput(F.cross_entropy(logits, y, reduction="none"), logits)


TASKS: dict[str, TaskSpec] = {}


def register_task(
    name: str, description: str, options: dict[str, Any] | None = None,
    defaults: dict[str, Any] | None = None, defaults_note: str = "",
) -> Callable[[Builder], Builder]:
    """Decorator registering ``build(data_dir, need_test, **options) -> TaskData`` as ``name``.

    ``options`` lists the task-specific options and their defaults; any other option passed
    to :func:`get_task` is rejected, so typos fail instead of being ignored. ``defaults``:
    the training defaults the builder sets with the default options (``ksam tasks`` lists
    them), ``defaults_note`` where an option changes them.
    """

    def deco(build: Builder) -> Builder:
        if name in TASKS:
            raise ValueError(f"task {name!r} is already registered")
        if user.is_spec(name):
            raise ValueError(f"task name {name!r}: a name with ':' is a function "
                             f"({user.SPEC_FORMS})")
        TASKS[name] = TaskSpec(name, build, description, dict(options or {}),
                               dict(defaults or {}), defaults_note)
        return build

    return deco


def task_spec(name: str) -> TaskSpec:
    """The task ``name``: a registered one, or one of the user's own
    (:mod:`ksam.lab.tasks.user`: ``path/to/file.py:function``, ``package.module:function``).
    ValueError for an unknown name, or a function that cannot be found."""
    if name in TASKS:
        return TASKS[name]
    spec = user.task_spec(name) if isinstance(name, str) else None
    if spec is None:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(available_tasks())};"
                         f" or a task of your own: {user.SPEC_FORMS}")
    return spec


def available_tasks() -> list[str]:
    """Names accepted by :func:`get_task`, sorted."""
    return sorted(TASKS)


# --------------------------------------------------------------------------- get_task

# Independent random streams per selection step, so that e.g. the validation set does not
# change when train_subset or label_noise change.
_STREAM_SPLIT, _STREAM_SUBSET, _STREAM_NOISE, _STREAM_VALIDATION_NOISE = 1, 2, 3, 4
#: Kinds of label noise: "symmetric" replaces a label by one of the other classes drawn
#: uniformly; "pair" replaces class c by its fixed neighbour c+1 (mod C).
LABEL_NOISE_TYPES = ("symmetric", "pair")


def _rng(seed: int, stream: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, stream]))


def _check_fraction(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a float in [0, 1), got {value!r}")
    value = float(value)
    if not (0.0 <= value < 1.0) or math.isnan(value):
        raise ValueError(f"{name} must be in [0, 1), got {value}")
    return value


def _to_device(
    x: np.ndarray,
    device: torch.device,
    mean: tuple[float, ...] | None,
    std: tuple[float, ...] | None,
) -> Tensor:
    """Transfer (as uint8 when possible, 4x less traffic) then scale and normalize there."""
    t = torch.from_numpy(np.ascontiguousarray(x)).to(device)
    if t.dtype == torch.uint8:
        t = t.float().div_(255.0)
    elif not t.is_floating_point() and mean is None:
        return t.long()  # token ids stay integers
    else:
        t = t.float()
    if mean is not None and std is not None:
        shape = (1, -1) + (1,) * (t.dim() - 2)
        m = torch.tensor(mean, dtype=t.dtype, device=device).view(shape)
        s = torch.tensor(std, dtype=t.dtype, device=device).view(shape)
        t = t.sub_(m).div_(s)
    return t


def _check_arguments(spec: TaskSpec, train_subset: Any, label_noise: Any, seed: Any,
                     validation_split: Any, options: dict[str, Any]) -> tuple[float, float]:
    """ValueError for a bad general option or an option the task does not take; returns
    (label_noise, validation_split) as floats."""
    if train_subset is not None and (
        isinstance(train_subset, bool) or not isinstance(train_subset, (int, np.integer))
        or train_subset <= 0
    ):
        raise ValueError(f"train_subset must be a positive int or None, got {train_subset!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    unknown = sorted(set(options) - set(spec.options))
    if unknown:
        accepted = ", ".join(sorted(spec.options)) or "none"
        raise ValueError(
            f"unknown option(s) {', '.join(unknown)} for task {spec.name!r}; accepted options: "
            f"{accepted}; and for every task: {', '.join(COMMON_OPTIONS)}"
        )
    return (_check_fraction("label_noise", label_noise),
            _check_fraction("validation_split", validation_split))


def _check_labels(name: str, raw: _data.RawSplits, num_classes: int) -> None:
    """Every label in [0, num_classes): a wrong label file fails here, before any run, not
    as an index error inside the first training step."""
    for split, y in (("training", raw.train_y), ("test", raw.test_y)):
        if y is None or len(y) == 0:
            continue
        lo, hi = int(np.min(y)), int(np.max(y))
        if lo < 0 or hi >= num_classes:
            raise ValueError(f"task {name!r}: {split} labels range over [{lo}, {hi}], outside "
                             f"the {num_classes} classes [0, {num_classes - 1}]")


def _split(raw: _data.RawSplits, name: str, validation_split: float,
           seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """(training indices into ``raw.train_*``, test images, test labels, task name): the
    real test set, or a held-out part of the training set as the test set."""
    n = len(raw.train_y)
    if validation_split == 0:
        assert raw.test_x is not None and raw.test_y is not None
        return np.arange(n), raw.test_x, raw.test_y, name
    n_val = round(validation_split * n)
    if n_val < 1 or n_val >= n:
        raise ValueError(
            f"validation_split={validation_split} leaves {n_val} of {n} training examples "
            "for validation; need at least one on each side"
        )
    perm = _rng(seed, _STREAM_SPLIT).permutation(n)
    train_idx, test_idx = np.sort(perm[n_val:]), np.sort(perm[:n_val])
    return (train_idx, raw.train_x[test_idx], raw.train_y[test_idx],
            f"{name}-val{validation_split:g}")


def _subset(train_idx: np.ndarray, train_subset: int | None, seed: int,
            task_name: str) -> np.ndarray:
    if train_subset is None:
        return train_idx
    if train_subset > len(train_idx):
        raise ValueError(
            f"train_subset={train_subset} exceeds the {len(train_idx)} training examples "
            f"of task {task_name!r}"
        )
    return train_idx[_rng(seed, _STREAM_SUBSET).permutation(len(train_idx))][:train_subset]


def _check_noise_options(label_noise_type: Any, noisy_validation: Any) -> None:
    if label_noise_type not in LABEL_NOISE_TYPES:
        raise ValueError(f"label_noise_type must be one of {', '.join(LABEL_NOISE_TYPES)}, "
                         f"got {label_noise_type!r}")
    if not isinstance(noisy_validation, bool):
        raise ValueError(f"noisy_validation must be True or False, got {noisy_validation!r}")


def _noisy_labels(train_y: np.ndarray, label_noise: float, kind: str, num_classes: int,
                  seed: int, name: str, held_out: np.ndarray | None = None) -> np.ndarray | None:
    """Label noise of ``kind`` on ``round(label_noise * n)`` training labels, in place (and,
    with ``held_out``, the same noise drawn independently on those labels); returns the mask
    of noisy training examples (None without noise)."""
    if label_noise == 0:
        return None
    if num_classes < 2:
        raise ValueError(f"label_noise needs at least 2 classes, task {name!r} has "
                         f"{num_classes}")
    mask = _add_label_noise(train_y, label_noise, kind, num_classes, _rng(seed, _STREAM_NOISE))
    if held_out is not None:
        _add_label_noise(held_out, label_noise, kind, num_classes,
                         _rng(seed, _STREAM_VALIDATION_NOISE))
    return mask


#: The options of :func:`get_task` that every task takes (besides its own, device and seed).
COMMON_OPTIONS = ("data_dir", "train_subset", "label_noise", "validation_split",
                  "label_noise_type", "noisy_validation")


def get_task(
    name: str,
    *,
    device: str | torch.device = "cpu",
    data_dir: str | os.PathLike[str] | None = None,
    train_subset: int | None = None,
    label_noise: float = 0.0,
    seed: int = 0,
    validation_split: float = 0.0,
    label_noise_type: str = "symmetric",
    noisy_validation: bool = False,
    **options: Any,
) -> Task:
    """Load task ``name`` onto ``device``.

    Args:
        name: one of :func:`available_tasks`.
        device: where the tensors go.
        data_dir: where the task looks for its files (task-specific default otherwise).
        train_subset: keep only the first N training examples after a shuffle seeded by
            ``seed`` (nested: a smaller N gives a subset of a larger N's examples).
        label_noise: fraction of TRAINING examples whose label is replaced by one drawn
            uniformly from the other classes (exactly ``round(fraction * n_train)`` of them,
            chosen with ``seed``); the test labels are never touched.
        seed: seeds the split, subset and noise (not the model: seed torch before
            ``make_model``).
        validation_split: hold out this fraction of the training set and use it as the test
            set (to tune hyperparameters without seeing the test set). The real test set is
            then not loaded, and ``Task.name`` gets a ``-val<fraction>`` suffix.
        label_noise_type: ``"symmetric"`` (default: the new label is uniform over the other
            classes) or ``"pair"`` (class c becomes c+1 mod C, asymmetric noise).
        noisy_validation: with ``validation_split`` and ``label_noise``, the held-out labels
            carry the same noise (same rate and type, drawn independently), as a held-out
            part of a noisy training set does; default False keeps them clean.
        **options: task-specific options, see ``TASKS[name].options``.

    ``name`` may also name a task of the user's own (:mod:`ksam.lab.tasks.user`): a function
    ``path/to/file.py:function`` or ``package.module:function`` returning a dict of arrays
    and a model factory, or a TaskData; its keyword parameters are its options. Its data
    are checked, and its model is built and run on two training examples, before anything
    is moved to the device.

    Raises ValueError for a bad option, and for data whose labels are outside the task's
    classes, before anything is moved to the device.
    """
    spec = task_spec(name)
    label_noise, validation_split = _check_arguments(spec, train_subset, label_noise, seed,
                                                     validation_split, options)
    _check_noise_options(label_noise_type, noisy_validation)
    td = spec.build(data_dir=data_dir, need_test=validation_split == 0.0,
                    **{**spec.options, **options})
    shown = user.display_name(name)
    _check_labels(shown, td.splits, td.num_classes)
    if spec.check_model:
        user.check_model(td, _to_device(td.splits.train_x[:2], torch.device("cpu"), td.mean,
                                        td.std), f"--task {shown}")
    train_idx, test_x, test_y, task_name = _split(td.splits, shown, validation_split, seed)
    train_idx = _subset(train_idx, train_subset, seed, task_name)
    train_y = td.splits.train_y[train_idx].astype(np.int64)  # a copy, safe to edit
    test_y = np.array(test_y, dtype=np.int64)  # a copy: the held-out labels may get noise
    mask = _noisy_labels(train_y, label_noise, label_noise_type, td.num_classes, seed, name,
                         held_out=test_y if noisy_validation and validation_split > 0
                         else None)

    dev = torch.device(device)
    return Task(
        name=task_name,
        train_x=_to_device(td.splits.train_x[train_idx], dev, td.mean, td.std),
        train_y=torch.from_numpy(train_y).to(dev),
        test_x=_to_device(test_x, dev, td.mean, td.std),
        test_y=torch.from_numpy(test_y).to(dev),
        num_classes=td.num_classes,
        make_model=td.make_model,
        augment=td.augment,
        defaults=dict(td.defaults),
        description=td.description,
        noisy_mask=None if mask is None else torch.from_numpy(mask).to(dev),
    )


def _add_label_noise(labels: np.ndarray, rate: float, kind: str, num_classes: int,
                     rng: np.random.Generator) -> np.ndarray:
    """Replace the labels of exactly ``round(rate * n)`` examples drawn with ``rng``, in
    place; returns the bool mask of the changed ones."""
    n_noisy = round(rate * len(labels))
    idx = rng.choice(len(labels), size=n_noisy, replace=False)
    if kind == "pair":
        labels[idx] = (labels[idx] + 1) % num_classes
    else:  # adding 1..c-1 modulo c gives a label uniform over the other classes
        labels[idx] = (labels[idx] + rng.integers(1, num_classes, size=n_noisy)) % num_classes
    mask = np.zeros(len(labels), dtype=bool)
    mask[idx] = True
    return mask


# --------------------------------------------------------------------------- built-in tasks

FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2860,), (0.3530,)
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)

# The training hyper-parameters a run takes from its task when the command line sets none
# (ksam.lab.train.TrainConfig.resolved reads exactly these five).
_COMMON_DEFAULTS = {"momentum": 0.9, "weight_decay": 5e-4}


class _ModelFactory:
    """Picklable ``make_model``: calls ``fn(*args, **kwargs)``; a readable repr for logs."""

    def __init__(self, fn: Callable[..., nn.Module], *args: Any, **kwargs: Any) -> None:
        self.fn, self.args, self.kwargs = fn, args, kwargs

    def __call__(self) -> nn.Module:
        return self.fn(*self.args, **self.kwargs)

    def __repr__(self) -> str:
        parts = [repr(a) for a in self.args] + [f"{k}={v!r}" for k, v in self.kwargs.items()]
        return f"{getattr(self.fn, '__name__', self.fn)}({', '.join(parts)})"


MNIST1D_DEFAULTS = {"epochs": 50, "batch_size": 128, "lr": 0.1, **_COMMON_DEFAULTS}
#: MNIST-1D's lr with model=mlp
MNIST1D_MLP_LR = 0.2
FASHION_MNIST_DEFAULTS = {"epochs": 10, "batch_size": 128, "lr": 0.05, **_COMMON_DEFAULTS}
CIFAR_DEFAULTS = {"epochs": 200, "batch_size": 128, "lr": 0.1, **_COMMON_DEFAULTS}


@register_task(
    "mnist1d",
    "MNIST-1D (Greydanus 2020): 1-D digit signals of length 40, generated locally; "
    "the built-in default, trains in seconds on a CPU",
    options={"num_samples": 5000, "model": "cnn", "data_seed": 42},
    defaults=MNIST1D_DEFAULTS, defaults_note=f"lr {MNIST1D_MLP_LR:g} with model=mlp",
)
def _build_mnist1d(
    data_dir: str | os.PathLike[str] | None,
    need_test: bool,
    num_samples: int,
    model: str,
    data_seed: int,
) -> TaskData:
    del data_dir, need_test  # generated, nothing to read
    if model not in ("cnn", "mlp"):
        raise ValueError(f"mnist1d model must be 'cnn' or 'mlp', got {model!r}")
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 20:
        raise ValueError(f"mnist1d num_samples must be an int >= 20, got {num_samples!r}")
    builder = _models.mnist1d_cnn if model == "cnn" else _models.mnist1d_mlp
    return TaskData(
        splits=_data.make_mnist1d(num_samples, data_seed),
        num_classes=10,
        make_model=_ModelFactory(builder, 10),
        defaults={**MNIST1D_DEFAULTS, "lr": MNIST1D_DEFAULTS["lr"] if model == "cnn"
                  else MNIST1D_MLP_LR},
        description=f"MNIST-1D ({num_samples} samples, 80/20 split, {model})",
    )


@register_task(
    "fashion-mnist",
    "Fashion-MNIST 28x28 grayscale clothing: a small 3-stage ResNet (default) or a small CNN "
    "(model=cnn), crop+flip augmentation (augment=false: none)",
    options={"width": 1.0, "model": "resnet", "augment": True},
    defaults=FASHION_MNIST_DEFAULTS,
)
def _build_fashion_mnist(
    data_dir: str | os.PathLike[str] | None, need_test: bool, width: float, model: str,
    augment: bool,
) -> TaskData:
    if isinstance(width, bool) or not isinstance(width, (int, float)) or width <= 0:
        raise ValueError(f"fashion-mnist width must be a positive number, got {width!r}")
    if model not in ("resnet", "cnn"):
        raise ValueError(f"fashion-mnist model must be 'resnet' or 'cnn', got {model!r}")
    if model == "cnn" and width != 1.0:
        raise ValueError("fashion-mnist width applies to model=resnet only")
    if not isinstance(augment, bool):
        raise ValueError(f"fashion-mnist augment must be true or false, got {augment!r}")
    if model == "cnn":
        make_model, name = _ModelFactory(_models.fashion_cnn, 10), "CNN (conv 8-16, fc 64)"
    else:
        make_model = _ModelFactory(_models.FashionResNet, 10, width=float(width))
        name = f"ResNet (widths x{width:g})"
    return TaskData(
        splits=_data.load_fashion_mnist(data_dir, need_test=need_test),
        num_classes=10,
        make_model=make_model,
        defaults=dict(FASHION_MNIST_DEFAULTS),
        description=f"Fashion-MNIST, {name}, "
                    + ("random crop 2 + flip" if augment else "no augmentation"),
        augment=RandomCropFlip(padding=2, flip=True) if augment else None,
        mean=FASHION_MNIST_MEAN,
        std=FASHION_MNIST_STD,
    )


def _cifar_builder(num_classes: int) -> Builder:
    mean, std = (CIFAR10_MEAN, CIFAR10_STD) if num_classes == 10 else (CIFAR100_MEAN, CIFAR100_STD)

    def build(
        data_dir: str | os.PathLike[str] | None, need_test: bool, model: str, download: bool
    ) -> TaskData:
        if model not in _models.CIFAR_MODELS:
            raise ValueError(
                f"cifar{num_classes} model must be one of {', '.join(_models.CIFAR_MODELS)}, "
                f"got {model!r}"
            )
        return TaskData(
            splits=_data.load_cifar(num_classes, data_dir, download=download, need_test=need_test),
            num_classes=num_classes,
            make_model=_ModelFactory(_models.build_cifar_model, model, num_classes),
            defaults=dict(CIFAR_DEFAULTS),
            description=f"CIFAR-{num_classes}, {model}, random crop 4 + flip",
            augment=RandomCropFlip(padding=4, flip=True),
            mean=mean,
            std=std,
        )

    return build


for _c in (10, 100):
    register_task(
        f"cifar{_c}",
        f"CIFAR-{_c} 32x32 colour images (python release, optional download), "
        "ResNet-18 / WRN-16-8 / WRN-28-10, crop+flip augmentation",
        options={"model": "resnet18", "download": False},
        defaults=CIFAR_DEFAULTS,
    )(_cifar_builder(_c))
del _c

# GLUE-style text classification (SST-2 shape): synthetic sentiment data generated locally,
# a small transformer in plain torch; any Hugging Face model/data set when online.
from .text import (  # noqa: E402
    TEXT_HF_DEFAULTS,
    TEXT_TASK_DEFAULTS,
    TEXT_TASK_DESCRIPTION,
    TEXT_TASK_OPTIONS,
    make_text_task,
)

register_task("text", TEXT_TASK_DESCRIPTION, options=TEXT_TASK_OPTIONS,
              defaults=TEXT_TASK_DEFAULTS,
              defaults_note="with hf_dataset: " + ", ".join(
                  f"{k} {v:g}" for k, v in TEXT_HF_DEFAULTS.items()))(make_text_task)
