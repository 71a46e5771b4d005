"""The command line's configuration: where method specs, presets and flags meet.

A :class:`CliConfig` is built from layers of *partial* configurations (mappings from field
names to values), later layers winning: the command's defaults, then a preset
(:mod:`ksam.presets`), then the flags the user typed (argparse keeps only those, see
:func:`ksam.cli.build_parser`). An explicit flag therefore always wins, also when it equals a
default. A method spec (``"ksam:k=16,rho=0.1"``) is parsed once, into a :class:`MethodSpec`,
where it enters a layer.

Spec options are the keyword-only parameters of the method's factory in
:data:`ksam.methods.METHODS` (besides the engine's), plus the run options of
:data:`RUN_OPTIONS` (``lr``) that every method takes.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .methods import METHODS

__all__ = ["CliConfig", "MethodSpec", "RUN_OPTIONS", "method_options", "parse_seeds",
           "parse_value"]

#: Engine options set by the run, never by a spec (an option relative to the run's length,
#: ``start=0.8``, is turned into steps by :func:`ksam.schedule.schedule_options`).
ENGINE_OPTIONS = {"grad_scaler", "autocast_dtype", "fast_path", "seed", "sync_perturbation",
                  "compile"}
#: Options of the run rather than the method, allowed in every spec ("sgd:lr=0.2"): each
#: method can be compared at its own learning rate (docs/collapse.md section 5: at one shared
#: lr a method that enlarges its effective step can look better than it is).
RUN_OPTIONS = {"lr"}
#: Options the user may give once for every method that takes them (``--k``, ``--rho``).
SHARED_OPTIONS = ("k", "rho")


def _keyword_only(name: str) -> set[str]:
    factory = METHODS[name]
    target = factory.__init__ if inspect.isclass(factory) else factory
    params = inspect.signature(target).parameters
    return {p for p, v in params.items() if v.kind == v.KEYWORD_ONLY}


def method_options(name: str) -> set[str]:
    """The options a method takes (besides model, optimizer and the engine's): its
    factory's keyword-only parameters; ``start`` (a fraction of the run) too where it takes
    ``start_step``."""
    options = _keyword_only(name) - ENGINE_OPTIONS
    if "start_step" in options:  # the CLI also says it as a fraction of the run (start=0.8)
        options.add("start")
    return options



def parse_value(text: str) -> Any:
    """``"true"``/``"false"`` -> bool, then int, then float, else the text itself. A
    non-finite number (``inf``, ``nan``) is refused: no option of ksam takes one."""
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for kind in (int, float):
        try:
            value = kind(text)
        except ValueError:
            continue
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{text!r} is not a finite number")
        return value
    return text


@dataclass(frozen=True)
class MethodSpec:
    """A parsed method spec: ``ksam:k=16,lr=0.2`` -> name ``ksam``, options ``{"k": 16}``,
    lr ``0.2``. ``items`` keeps each option's text as written, so the label (the spec as the
    report shows it) is rebuilt without formatting numbers anew."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)
    lr: float | None = None
    items: tuple[tuple[str, str], ...] = ()

    @classmethod
    def parse(cls, spec: str | MethodSpec) -> MethodSpec:
        """Parse ``spec``; ValueError for an unknown method, an option the method does not
        take, an item that is not ``key=value`` or a non-finite number."""
        if isinstance(spec, MethodSpec):
            return spec
        name, _, rest = str(spec).partition(":")
        name = name.strip().lower()
        if name not in METHODS:
            raise ValueError(f"unknown method {name!r}; choose one of: {', '.join(METHODS)}")
        allowed = method_options(name) | RUN_OPTIONS
        options: dict[str, Any] = {}
        items: list[tuple[str, str]] = []
        for item in filter(None, (s.strip() for s in rest.split(","))):
            key, eq, text = item.partition("=")
            key = key.strip().replace("-", "_")
            if not eq:
                raise ValueError(f"method option {item!r} in {spec!r} is not of the form "
                                 "key=value")
            if key not in allowed:
                raise ValueError(f"method {name!r} takes no option {key!r} "
                                 f"(it takes: {', '.join(sorted(allowed)) or 'none'})")
            try:
                options[key] = parse_value(text.strip())
            except ValueError as exc:
                raise ValueError(f"method option {key} in {spec!r}: {exc}") from None
            items.append((key, text.strip()))
        lr = options.pop("lr", None)
        if lr is not None and (isinstance(lr, (bool, str)) or lr < 0):
            raise ValueError(f"method {spec!r}: lr must be a finite number >= 0, got {lr!r}")
        return cls(name, options, lr, tuple(items))

    @property
    def label(self) -> str:
        if not self.items:
            return self.name
        return f"{self.name}:" + ",".join(f"{k}={v}" for k, v in self.items)

    def __str__(self) -> str:
        return self.label

    def without(self, keys: Iterable[str]) -> MethodSpec:
        """This spec with the options ``keys`` (and ``lr`` if named) removed."""
        keys = set(keys)
        return MethodSpec(self.name, {k: v for k, v in self.options.items() if k not in keys},
                          None if "lr" in keys else self.lr,
                          tuple(item for item in self.items if item[0] not in keys))

    def with_lr(self, lr: float) -> MethodSpec:
        """This spec at learning rate ``lr``: ``ksam:k=32`` -> ``ksam:k=32,lr=0.2``."""
        items = tuple(item for item in self.items if item[0] != "lr")
        return MethodSpec(self.name, dict(self.options), float(lr),
                          (*items, ("lr", f"{lr:g}")))

    def method_options(self, shared: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The options passed to the method: the spec's own, then the ``shared`` ones
        (``--k``, ``--rho``) that the method takes and the spec does not set."""
        out = dict(self.options)
        allowed = method_options(self.name)
        for key, value in (shared or {}).items():
            if value is not None and key in allowed and key not in out:
                out[key] = value
        return out


def parse_seeds(value: str | int | Iterable[int]) -> list[int]:
    """A count (``3`` = seeds 0, 1, 2), a list (``0,4,7``) or a range (``0-4``).
    ValueError for anything else, a negative seed or a seed given twice."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        seeds = [int(v) for v in value]
    else:
        text = value.strip()
        bad = ValueError(f"seeds must be a count (3), a list (0,1,2) or a range (0-4), "
                         f"got {text!r}")
        try:
            if text.isdigit():
                if int(text) < 1:
                    raise bad
                seeds = list(range(int(text)))
            elif "-" in text and "," not in text:
                lo, hi = (int(v) for v in text.split("-"))
                if hi < lo:
                    raise bad
                seeds = list(range(lo, hi + 1))
            else:
                seeds = [int(s) for s in text.split(",") if s.strip()]
        except ValueError:
            raise bad from None
    if not seeds:
        raise ValueError("give at least one seed")
    if any(s < 0 for s in seeds):
        raise ValueError(f"seeds must be >= 0, got {seeds}")
    twice = sorted({s for s in seeds if seeds.count(s) > 1})
    if twice:
        raise ValueError(f"seed {', '.join(map(str, twice))} given twice: each seed is one run "
                         "per method, and repeating it would count the same run twice")
    return seeds


#: The methods of ``ksam compare`` without ``--methods`` or a preset.
DEFAULT_METHODS = ("sgd", "sam", "ksam")
#: Learning rates the default ``ksam compare`` chooses each method's lr from (on a held-out
#: split). On MNIST-1D (the default task) every method's best lr is 0.1 or 0.2 and 0.05 is
#: never the best (docs/results.md); three values keep the default run within 5 minutes
#: on a 2-core CPU. Other tasks: give ``--lr-sweep``.
DEFAULT_LR_SWEEP = (0.1, 0.2, 0.4)
#: Held-out fraction of the training set the lr sweep scores on.
DEFAULT_SWEEP_SPLIT = 0.2


@dataclass
class CliConfig:
    """Everything a ``ksam compare`` or ``ksam train`` command runs with.

    ``None`` for a training hyper-parameter means the task's default. ``lr_sweep`` is the
    list of learning rates each method's lr is chosen from; ``None`` means: see
    :attr:`sweep_lrs`.
    """

    task: str = "mnist1d"
    data_dir: str | None = None
    model: str | None = None
    train_subset: int | None = None
    label_noise: float = 0.0
    validation_split: float = 0.0
    task_options: dict[str, Any] = field(default_factory=dict)
    k: int | float | None = None
    rho: float | None = None
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    momentum: float | None = None
    weight_decay: float | None = None
    schedule: str = "cosine"
    device: str = "auto"
    precision: str = "fp32"
    fast: bool | None = None
    compile: str | None = None
    selection: str = "local"
    sync_perturbation: bool = False
    micro_batch_size: int | None = None
    max_grad_norm: float | None = None
    fsdp: bool = False
    eval_every: int = 1
    methods: list[MethodSpec] = field(default_factory=lambda: [
        MethodSpec.parse(m) for m in DEFAULT_METHODS])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    seed: int = 0
    lr_sweep: list[float] | None = None
    no_lr_sweep: bool = False
    resume: bool = False
    overwrite: bool = False
    out: Path | None = None
    quiet: bool = False
    preset: str | None = None

    @classmethod
    def from_layers(cls, *layers: Mapping[str, Any]) -> CliConfig:
        """Merge partial configurations, later ones winning; ``task_options`` merge key by
        key. Values are normalized on the way in (specs parsed, seeds expanded, paths
        made strings). ValueError for an unknown field or a bad value."""
        names = {f.name for f in dataclasses.fields(cls)}
        merged: dict[str, Any] = {}
        task_options: dict[str, Any] = {}
        for layer in layers:
            unknown = sorted(set(layer) - names)
            if unknown:
                raise ValueError(f"unknown configuration field(s): {', '.join(unknown)}")
            for key, value in layer.items():
                if key == "task_options":
                    task_options.update(value)
                else:
                    merged[key] = value
        merged["task_options"] = task_options
        cfg = cls(**merged)
        cfg._normalize()
        return cfg

    def _normalize(self) -> None:
        self.methods = [MethodSpec.parse(m) for m in self.methods]
        labels = [m.label for m in self.methods]
        twice = sorted({x for x in labels if labels.count(x) > 1})
        if twice:
            raise ValueError(f"method spec {', '.join(twice)} given twice")
        self.seeds = parse_seeds(self.seeds)
        if self.data_dir is not None:
            self.data_dir = os.fspath(self.data_dir)
        if self.out is not None:
            self.out = Path(self.out)
        if self.lr_sweep is not None:
            self.lr_sweep = [float(x) for x in self.lr_sweep]
        for name in ("k", "rho", "lr", "momentum", "weight_decay", "label_noise",
                     "validation_split", "max_grad_norm"):
            value = getattr(self, name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{name.replace('_', '-')} must be a finite number, "
                                 f"got {value}")
        for key, value in self.task_options.items():
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"task option {key} must be a finite number, got {value}")

    @property
    def shared(self) -> dict[str, Any]:
        """The options given once for every method that takes them (``--k``, ``--rho``)."""
        return {"k": self.k, "rho": self.rho}

    @property
    def sweep_lrs(self) -> list[float] | None:
        """The learning rates to choose each method's lr from, or None for no sweep: the
        default sweep when no lr is given anywhere, ``--no-lr-sweep`` is not set and the
        comparison is on the test set (a ``--validation-split`` comparison without
        ``--lr-sweep`` is itself a tuning run, at one shared lr)."""
        if self.lr_sweep is not None:
            return list(self.lr_sweep)
        if self.no_lr_sweep or self.validation_split or self.lr is not None \
                or any(m.lr is not None for m in self.methods):
            return None
        return list(DEFAULT_LR_SWEEP)

    def task_kwargs(self, *, with_validation: bool = True) -> dict[str, Any]:
        """Keyword arguments of :func:`ksam.tasks.get_task` (besides name, device, seed)."""
        opts: dict[str, Any] = dict(self.task_options)
        if self.data_dir is not None:
            opts["data_dir"] = self.data_dir
        if self.model is not None:
            opts["model"] = self.model
        if self.train_subset is not None:
            opts["train_subset"] = self.train_subset
        if self.label_noise:
            opts["label_noise"] = self.label_noise
        if self.validation_split and with_validation:
            opts["validation_split"] = self.validation_split
        return opts

    def train_config(self, *, with_validation: bool = True) -> Any:
        """The :class:`ksam.train.TrainConfig` shared by every run of the command (method
        and seed still at their defaults)."""
        from .train import TrainConfig

        return TrainConfig(
            task=self.task, epochs=self.epochs, batch_size=self.batch_size, lr=self.lr,
            momentum=self.momentum, weight_decay=self.weight_decay, schedule=self.schedule,
            device=self.device, precision=self.precision, fast=self.fast,
            compile=self.compile, task_options=self.task_kwargs(with_validation=with_validation),
            selection=self.selection, sync_perturbation=self.sync_perturbation,
            micro_batch_size=self.micro_batch_size, max_grad_norm=self.max_grad_norm,
            fsdp=self.fsdp, eval_every=self.eval_every)
