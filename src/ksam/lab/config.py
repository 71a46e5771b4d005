"""The run configuration (:class:`RunConfig`) and the command line's (:class:`CliConfig`).

:class:`RunConfig` is the one definition of what every run of a command shares (task,
training hyper-parameters, how it executes) and the one place its values are checked
(:meth:`RunConfig.validate`). :class:`ksam.lab.train.TrainConfig` adds the method of one run;
:class:`CliConfig` adds the command line's own fields (method specs, seeds, output folder).

A :class:`CliConfig` is built from layers of *partial* configurations (mappings from field
names to values), later layers winning: the command's defaults, then a preset
(:mod:`ksam.lab.presets`), then the flags the user typed (argparse keeps only those, see
:func:`ksam.lab.cli.build_parser`). An explicit flag therefore always wins, also when it equals a
default. A method spec (``"ksam:k=16,rho=0.1"``) is parsed once, into a :class:`MethodSpec`,
where it enters a layer.

Spec options are the keyword-only parameters of the method's factory in
:data:`ksam.methods.METHODS` (besides the engine's), plus the run options of
:data:`RUN_OPTIONS` (``lr``) that every method takes.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..methods import METHODS
from ..methods import option_names as factory_options

__all__ = ["MAX_SEED", "PRECISIONS", "RENAMED_FIELDS", "CliConfig", "MethodSpec",
           "RUN_OPTIONS", "RunConfig", "spec_option_names", "parse_seeds", "parse_value"]

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
#: The largest seed: ``torch.manual_seed`` takes 64 bits, and a run's data order is seeded
#: with ``seed + 1``.
MAX_SEED = 2**64 - 2
#: Configuration fields under their earlier names, as saved ``config.json`` files and
#: presets may still spell them: the lr schedule was ``schedule`` (the engine's sharp-step
#: :class:`ksam.schedule.Schedule` is another thing), the DDP selection scope ``selection``
#: (the selection rule is the method option ``select``).
RENAMED_FIELDS = {"schedule": "lr_schedule", "selection": "selection_scope"}
#: Task options that are run options of their own (``--seed``, ``--device``, ``--task``).
_NOT_TASK_OPTIONS = ("name", "seed", "device")

#: Options of the run rather than the method, allowed in every spec ("sgd:lr=0.2"): each
#: method can be compared at its own learning rate (docs/experiments/collapse.md section 5:
#: at one shared lr a method that enlarges its effective step can look better than it is).
RUN_OPTIONS = {"lr"}
#: Options the user may give once for every method that takes them (``--k``, ``--rho``).
SHARED_OPTIONS = ("k", "rho")


def spec_option_names(name: str) -> set[str]:
    """The options a method spec may set: the method's own
    (:func:`ksam.methods.option_names`; the engine's are set by the run), and ``start``
    (a fraction of the run) too where it takes ``start_step``, and ``estimate`` (where
    ``select="auto"`` measures, a fraction of the run) where it takes ``select``."""
    options = factory_options(name)
    if "start_step" in options:  # the CLI also says it as a fraction of the run (start=0.8)
        options.add("start")
    if "select" in options:
        options.add("estimate")
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
        take or given twice, an item that is not ``key=value`` or a non-finite number."""
        if isinstance(spec, MethodSpec):
            return spec
        name, _, rest = str(spec).partition(":")
        name = name.strip().lower()
        if name not in METHODS:
            raise ValueError(f"unknown method {name!r}; choose one of: {', '.join(METHODS)}")
        allowed = spec_option_names(name) | RUN_OPTIONS
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
            if key in options:
                raise ValueError(f"method option {key} is given twice in {spec!r}")
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

    def run_options(self, shared: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The options passed to the method: the spec's own, then the ``shared`` ones
        (``--k``, ``--rho``) that the method takes and the spec does not set."""
        out = dict(self.options)
        allowed = spec_option_names(self.name)
        for key, value in (shared or {}).items():
            if value is not None and key in allowed and key not in out:
                out[key] = value
        return out


#: The most seeds one command takes (each is one run per method).
MAX_SEEDS = 10_000


def _seed_list(text: str) -> list[int]:
    """The seeds ``text`` names; bounds are checked before a count or a range is expanded."""
    bad = ValueError(f"seeds must be a count (3), a list (0,1,2) or a range (0-4), got {text!r}")
    try:
        if text.isdigit():
            lo, hi = 0, int(text) - 1
            if hi < lo:
                raise bad
        elif "-" in text and "," not in text:
            lo, hi = (int(v) for v in text.split("-"))
            if hi < lo:
                raise bad
        else:
            return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise bad from None
    _check_seeds(lo, hi, hi - lo + 1)
    return list(range(lo, hi + 1))


def _check_seeds(lo: int, hi: int, count: int) -> None:
    """ValueError unless ``count`` seeds between ``lo`` and ``hi`` are all usable."""
    if lo < 0:
        raise ValueError(f"seeds must be >= 0, got {lo}")
    if count > MAX_SEEDS:
        raise ValueError(f"{count} seeds asked for; at most {MAX_SEEDS} (each is one run per "
                         "method)")
    if hi > MAX_SEED:
        raise ValueError(f"seed {hi} is too large: a seed is at most {MAX_SEED} "
                         "(torch.manual_seed takes 64 bits; the data order uses seed + 1)")


def check_seed(seed: Any) -> int:
    """``seed`` if it is an int in [0, :data:`MAX_SEED`], else ValueError."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    _check_seeds(seed, seed, 1)
    return seed


def parse_seeds(value: str | int | Iterable[int]) -> list[int]:
    """A count (``3`` = seeds 0, 1, 2), a list (``0,4,7``) or a range (``0-4``).
    ValueError for anything else, a seed outside [0, :data:`MAX_SEED`] or given twice: every
    seed is checked before any run."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    seeds = _seed_list(value.strip()) if isinstance(value, str) else [int(v) for v in value]
    if not seeds:
        raise ValueError("give at least one seed")
    _check_seeds(min(seeds), max(seeds), len(seeds))
    counts = Counter(seeds)
    twice = sorted(s for s, n in counts.items() if n > 1)
    if twice:
        raise ValueError(f"seed {', '.join(map(str, twice))} given twice: each seed is one run "
                         "per method, and repeating it would count the same run twice")
    return seeds


#: The methods of ``ksam compare`` without ``--methods`` or a preset.
DEFAULT_METHODS = ("sgd", "sam", "ksam")
#: Learning rates the default ``ksam compare`` chooses each method's lr from (on a held-out
#: split). On MNIST-1D (the default task) every method's best lr is 0.1 or 0.2 and 0.05 is
#: never the best (docs/experiments/results.md); three values keep the default run within 5 minutes
#: on a 2-core CPU. Other tasks: give ``--lr-sweep``.
DEFAULT_LR_SWEEP = (0.1, 0.2, 0.4)
#: Held-out fraction of the training set the lr sweep scores on.
DEFAULT_SWEEP_SPLIT = 0.2
LR_SCHEDULES = ("cosine", "constant")
#: What ``--budget`` equalizes: example passes (deterministic) or training time (measured).
BUDGETS = ("passes", "time")
SELECTION_SCOPES = ("local", "global")


def check_count(name: str, value: Any) -> None:
    """ValueError unless ``value`` is None or an integer >= 1 (``name`` names it)."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                              or value < 1):
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def _check_number(name: str, value: Any, *, low: float = 0.0, above: bool = False,
                  below: float | None = None) -> None:
    """ValueError unless ``value`` is None or a finite number >= ``low`` (> with ``above``)
    and < ``below``."""
    if value is None:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) \
        and math.isfinite(value) and (value > low if above else value >= low) \
        and (below is None or value < below)
    if not ok:
        bound = f"{'>' if above else '>='} {low:g}" if below is None \
            else f"in [{low:g}, {below:g})"
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")


def _check_choice(name: str, value: Any, choices: Iterable[str]) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}")


@dataclass
class RunConfig:
    """What every run of a command shares. ``None`` for a training hyper-parameter means
    the task's default.

    ``selection_scope``, ``sync_perturbation`` and ``fsdp`` are for several processes
    (docs/guide/distributed.md: each rank's own top-K or the global one, per-rank or synchronized
    perturbation, FSDP2 instead of DDP); a single process refuses them
    (:meth:`check_processes`).
    """

    task: str = "mnist1d"
    task_options: dict[str, Any] = field(default_factory=dict)
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    momentum: float | None = None
    weight_decay: float | None = None
    lr_schedule: str = "cosine"
    seed: int = 0
    device: str = "auto"
    precision: str = "fp32"
    fast: bool | None = None
    # torch.compile backend of the forward passes ("inductor", "aot_eager", ...); None: off.
    compile: str | None = None
    selection_scope: str = "local"
    sync_perturbation: bool = False
    # FSDP2 (fully_shard) instead of DDP; its ascent gradient is always synchronized.
    fsdp: bool = False
    # Engine options: forwards in chunks of at most this many rows; descent-gradient clip.
    micro_batch_size: int | None = None
    max_grad_norm: float | None = None
    # Evaluate after every N-th epoch and after the last; the other epochs' rows carry
    # test_loss / test_acc None. Evaluation is outside the training clock and changes
    # nothing in training, so the final accuracy does not depend on it.
    eval_every: int = 1

    def validate(self) -> None:
        """ValueError for the first bad value, naming it (the one check of every field)."""
        for name in ("epochs", "batch_size", "micro_batch_size", "eval_every"):
            check_count(name, getattr(self, name))
        _check_number("lr", self.lr)
        _check_number("momentum", self.momentum, below=1.0)
        _check_number("weight_decay", self.weight_decay)
        _check_number("max_grad_norm", self.max_grad_norm, above=True)
        check_seed(self.seed)
        _check_choice("precision", self.precision, PRECISIONS)
        _check_choice("lr_schedule (--schedule)", self.lr_schedule, LR_SCHEDULES)
        _check_choice("selection_scope (--selection)", self.selection_scope, SELECTION_SCOPES)
        if not isinstance(self.device, str) or (
                self.device not in ("auto", "cpu") and not self.device.startswith("cuda")):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.compile is not None:
            from ..engine import compile_backend

            compile_backend(self.compile)
        self._check_task_options()

    def _check_task_options(self) -> None:
        for key, value in self.task_options.items():
            if not key:
                raise ValueError("a task option has an empty name")
            if key in _NOT_TASK_OPTIONS:
                raise ValueError(f"{key!r} is not a task option: give --{key} (or the "
                                 "configuration's own field)")
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"task option {key} must be a finite number, got {value}")

    def check_processes(self, world_size: int) -> None:
        """ValueError for an option of several processes in a run of one."""
        if world_size > 1:
            return
        given = [flag for flag, on in (("--fsdp", self.fsdp),
                                       ("--selection global", self.selection_scope == "global"),
                                       ("--sync-perturbation", self.sync_perturbation)) if on]
        if given:
            raise ValueError(f"{', '.join(given)} {'needs' if len(given) == 1 else 'need'} "
                             "several processes (torchrun, WORLD_SIZE > 1); this is one "
                             "process")


def resolve_device(name: str) -> str:
    """``auto`` is the GPU when there is one. ValueError for CUDA on a machine without."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but CUDA is not available")
    return name



@dataclass
class TrainConfig(RunConfig):
    """Everything that defines one run: the :class:`ksam.lab.config.RunConfig` and the method
    with its options. ``None`` means: the task's default."""

    method: str = "ksam"
    method_options: dict[str, Any] = field(default_factory=dict)
    #: optimizer steps of the run (None: ``epochs`` whole epochs). Set, the run takes
    #: ``epochs`` = ceil(steps / steps per epoch) epochs, the last one cut short after the
    #: remaining steps, and its lr schedule spans ``steps`` (an equal-budget comparison
    #: sets each method's)
    steps: int | None = None

    def validate(self) -> None:
        """:meth:`RunConfig.validate`, and ``steps`` None or an integer >= 1."""
        super().validate()
        check_count("steps", self.steps)

    @classmethod
    def of(cls, run: RunConfig, **changes: Any) -> TrainConfig:
        """The run configuration ``run`` (a copy) with the method fields ``changes``."""
        values = {f.name: getattr(run, f.name) for f in dataclasses.fields(RunConfig)}
        return cls(**values, **changes)

    def resolved(self, defaults: dict[str, Any]) -> TrainConfig:
        """A copy with the task's defaults filled in (and the device resolved: ValueError
        for a CUDA device on a machine without one)."""
        # Paths as strings: the configuration is written as JSON and compared on resume.
        task_options = {k: os.fspath(v) if isinstance(v, os.PathLike) else v
                        for k, v in self.task_options.items()}
        out = dataclasses.replace(self, method_options=dict(self.method_options),
                                  task_options=task_options)
        for name in ("epochs", "batch_size", "lr", "momentum", "weight_decay"):
            if getattr(out, name) is None:
                setattr(out, name, defaults[name])
        out.device = resolve_device(out.device)
        if out.fast is None:
            out.fast = out.device.startswith("cuda")
        return out

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class CliConfig(RunConfig):
    """Everything a ``ksam compare`` or ``ksam train`` command runs with: the
    :class:`RunConfig` every run shares, and the command line's own fields.

    The task options given as flags of their own (``data_dir``, ``model``,
    ``train_subset``, ``label_noise``, ``validation_split``) join ``task_options`` in
    :meth:`task_kwargs`. ``lr_sweep`` is the list of learning rates each method's lr is
    chosen from; ``None`` means: see :attr:`sweep_lrs`. ``ray`` (``--ray``) runs every run
    of the grid as a Ray task: ``"local"`` on a Ray instance started on this machine,
    ``"auto"`` or ``HOST:PORT`` on a running cluster; ``cpus_per_run`` / ``gpus_per_run``
    size each task (default 1 CPU, and 1 GPU where the cluster has GPUs).

    ``budget`` (:data:`BUDGETS`) adds a grid at equal cost beside the equal-epochs one:
    every method trains for as many steps as SGD's run of ``epochs`` epochs buys in example
    passes or in measured training time (:mod:`ksam.lab.budget`). ``jobs``: parallel worker
    processes for the grid's runs on the CPU (None: one per core); ``threads``: torch
    threads of a run (None: ``ksam compare`` 1 per run, ``ksam train`` the cores not busy).
    ``task`` may name a function of the user's (:mod:`ksam.lab.tasks.user`): a file's path is
    made absolute, so that worker processes import the same file.
    """

    data_dir: str | None = None
    model: str | None = None
    train_subset: int | None = None
    label_noise: float = 0.0
    validation_split: float = 0.0
    k: int | float | None = None
    rho: float | None = None
    methods: list[MethodSpec] = field(default_factory=lambda: [
        MethodSpec.parse(m) for m in DEFAULT_METHODS])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    lr_sweep: list[float] | None = None
    no_lr_sweep: bool = False
    resume: bool = False
    overwrite: bool = False
    out: Path | None = None
    quiet: bool = False
    preset: str | None = None
    ray: str | None = None
    cpus_per_run: float | None = None
    gpus_per_run: float | None = None
    budget: str | None = None
    jobs: int | None = None
    threads: int | None = None

    @classmethod
    def from_layers(cls, *layers: Mapping[str, Any]) -> CliConfig:
        """Merge partial configurations, later ones winning; ``task_options`` merge key by
        key; a field's earlier name (:data:`RENAMED_FIELDS`) is read as its name. Values are
        normalized on the way in (specs parsed, seeds expanded, paths made strings) and
        validated. ValueError for an unknown field or a bad value."""
        names = {f.name for f in dataclasses.fields(cls)}
        merged: dict[str, Any] = {}
        task_options: dict[str, Any] = {}
        for layer in layers:
            layer = {RENAMED_FIELDS.get(key, key): value for key, value in layer.items()}
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
        cfg.validate()
        return cfg

    def _normalize(self) -> None:
        from .tasks.user import normalize

        if isinstance(self.task, str):
            self.task = normalize(self.task)
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

    def validate(self) -> None:
        """:meth:`RunConfig.validate`, and the command line's own numbers finite."""
        super().validate()
        for name in ("k", "rho", "label_noise", "validation_split"):
            value = getattr(self, name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{name.replace('_', '-')} must be a finite number, "
                                 f"got {value}")
        self._check_ray()
        check_count("jobs (--jobs)", self.jobs)
        check_count("threads (--threads)", self.threads)
        if self.budget is not None:
            _check_choice("budget (--budget)", self.budget, BUDGETS)

    def _check_ray(self) -> None:
        """ValueError for a Ray task size without ``--ray``, or one that is not a number
        of CPUs > 0 / GPUs >= 0."""
        _check_number("--cpus-per-run", self.cpus_per_run, above=True)
        _check_number("--gpus-per-run", self.gpus_per_run)
        if self.ray is None:
            given = [flag for flag, value in (("--cpus-per-run", self.cpus_per_run),
                                              ("--gpus-per-run", self.gpus_per_run))
                     if value is not None]
            if given:
                raise ValueError(f"{' and '.join(given)} size{'s' if len(given) == 1 else ''}"
                                 " the Ray task of each run: give --ray too")
        elif not isinstance(self.ray, str) or not self.ray.strip():
            raise ValueError(f"--ray takes a cluster address, 'auto' or nothing, got "
                             f"{self.ray!r}")

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
        """Keyword arguments of :func:`ksam.lab.tasks.get_task` (besides name, device, seed)."""
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

    def run_config(self, *, with_validation: bool = True) -> RunConfig:
        """The :class:`RunConfig` part, its task options from :meth:`task_kwargs`."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(RunConfig)}
        values["task_options"] = self.task_kwargs(with_validation=with_validation)
        return RunConfig(**values)

    def train_config(self, *, with_validation: bool = True) -> TrainConfig:
        """The :class:`TrainConfig` shared by every run of the command (method still at its
        default)."""
        return TrainConfig.of(self.run_config(with_validation=with_validation))
