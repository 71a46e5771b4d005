"""Tasks of the user's own: a function in a file or a module, or a Python object.

``--task path/to/file.py:function`` or ``--task package.module:function`` names a function
that takes no required arguments and returns the task: a :class:`ksam.tasks.TaskData`, or a
plain dict (so that the file needs nothing from ksam) with

- ``train_x``, ``train_y``, ``test_x``, ``test_y``: tensors or numpy arrays, the labels
  integer classes. Floating-point inputs are used as they are (in float32), ``uint8``
  inputs are scaled to [0, 1] (images), other integer inputs stay integers (token ids);
- ``make_model``: a callable without arguments that returns a fresh ``nn.Module``, whose
  output for a batch of n inputs is ``[n, num_classes]`` logits;
- optional ``num_classes`` (default: one more than the largest label), ``augment``
  (``augment(x, generator) -> x`` on a training batch on the device, e.g.
  :class:`ksam.lab.tasks.RandomCropFlip`), ``defaults`` (training defaults among
  :data:`DEFAULT_KEYS`, the others :data:`DEFAULTS`) and ``description``.

The function's keyword parameters are the task's options (``--task-option key=value``, and
``--data-dir`` for a parameter ``data_dir``). A file is imported by its path, with its folder
on the import path as Python does for a script; a file already imported in this process (the
script that runs ``ksam.compare``) is not run again. Every generic option of
:func:`ksam.lab.tasks.get_task` (split, subset, label noise) applies as to a built-in task.

Everything is checked before any run: a missing file, module or function, a function that
raises, a result of the wrong kind, missing or unknown keys, ragged, empty or non-finite
arrays, labels that are not integers, arrays of different lengths, a model that is not a
fresh module or whose output does not match ``num_classes`` - each a ValueError naming it.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import inspect
import math
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .base import Builder, TaskData, TaskSpec
from .data import RawSplits

__all__ = ["DEFAULTS", "DEFAULT_KEYS", "KEYS", "check_model", "display_name", "is_spec",
           "load_function", "local_task", "normalize", "slug", "task_data", "task_spec"]

#: The keys of a task's dict: the required ones, then the optional ones.
REQUIRED_KEYS = ("train_x", "train_y", "test_x", "test_y", "make_model")
KEYS = (*REQUIRED_KEYS, "num_classes", "augment", "defaults", "description")
#: The training defaults of a task of the user's own that sets none (``defaults`` may set
#: any of them).
DEFAULTS: dict[str, Any] = {"epochs": 10, "batch_size": 128, "lr": 0.1, "momentum": 0.9,
                            "weight_decay": 5e-4}
DEFAULT_KEYS = tuple(DEFAULTS)
#: What the spec of a task of the user's own looks like, for messages.
SPEC_FORMS = "path/to/file.py:function or package.module:function"

#: Tasks given as Python objects (a function, a dict, a TaskData) in this process, by name:
#: :func:`ksam.compare` registers one for the duration of a call (:func:`local_task`).
_LOCAL: dict[str, Any] = {}


# --------------------------------------------------------------------------- specs

def is_spec(name: str) -> bool:
    """Whether ``name`` names a function (``target:function``) rather than a registered
    task."""
    target, sep, function = name.rpartition(":")
    return bool(sep and target and function)


def _is_file(target: str) -> bool:
    return target.endswith(".py") or "/" in target or os.sep in target


def normalize(name: str) -> str:
    """``name`` with a file's path made absolute (what a worker process imports, wherever
    it starts); other names as they are."""
    if not is_spec(name) or name in _LOCAL:
        return name
    target, _, function = name.rpartition(":")
    if not _is_file(target):
        return name
    return f"{os.path.abspath(os.path.expanduser(target))}:{function}"


def display_name(name: str) -> str:
    """``name`` as a report shows it: a file below the working folder by its relative
    path."""
    if not is_spec(name):
        return name
    target, _, function = name.rpartition(":")
    if _is_file(target) and os.path.isabs(target):
        relative = os.path.relpath(target)
        if not relative.startswith(".."):
            target = relative
    return f"{target}:{function}"


def slug(name: str) -> str:
    """A short folder-name part for task ``name``: ``file-function`` for a task of the
    user's own, else the name."""
    if not is_spec(name):
        return name
    target, _, function = name.rpartition(":")
    stem = Path(target).stem if _is_file(target) else target.rpartition(".")[2]
    return f"{stem}-{function}"


# --------------------------------------------------------------------------- loading

def _loaded(path: Path) -> ModuleType | None:
    """A module of this process imported from ``path`` (the running script too)."""
    for module in list(sys.modules.values()):
        file = getattr(module, "__file__", None)
        if file and not file.endswith((".pyc", ".so")):
            try:
                if Path(file).resolve() == path:
                    return module
            except OSError:
                continue
    return None


def _import_file(path: Path, shown: str) -> ModuleType:
    """The module of the Python file ``path`` (imported once per process)."""
    path = path.resolve()
    module = _loaded(path)
    if module is not None:
        return module
    name = "_ksam_task_" + hashlib.sha1(str(path).encode()).hexdigest()[:12]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ValueError(f"--task {shown}: {path} cannot be imported as a Python file")
    module = importlib.util.module_from_spec(spec)
    folder = str(path.parent)
    if folder not in sys.path:  # as for a script: it may import modules next to it
        sys.path.insert(0, folder)
    sys.modules[name] = module  # classes defined there pickle by this name
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[name]
        raise ValueError(f"--task {shown}: importing {path} raised {_one_line(exc)}") from None
    return module


def _import_module(target: str, shown: str) -> ModuleType:
    try:
        return importlib.import_module(target)
    except ModuleNotFoundError as exc:
        if exc.name and (target == exc.name or target.startswith(exc.name + ".")):
            raise ValueError(f"--task {shown}: no module named {target!r} (a file is "
                             "given by its path, ending in .py)") from None
        raise ValueError(f"--task {shown}: importing {target} raised {_one_line(exc)}") \
            from None
    except Exception as exc:
        raise ValueError(f"--task {shown}: importing {target} raised {_one_line(exc)}") \
            from None


def load_function(name: str) -> Callable[..., Any]:
    """The function that ``name`` (``path/to/file.py:function`` or
    ``package.module:function``) names; ValueError for a missing file, module or function
    and for a module that raises when imported."""
    target, sep, function = name.rpartition(":")
    if not (sep and target and function):
        raise ValueError(f"--task {name}: a task of your own is {SPEC_FORMS}")
    shown = display_name(name)
    if _is_file(target):
        path = Path(os.path.expanduser(target))
        if not path.is_file():
            raise ValueError(f"--task {shown}: the file {target} does not exist")
        module = _import_file(path, shown)
    else:
        module = _import_module(target, shown)
    where = getattr(module, "__file__", None) or target
    fn = getattr(module, function, None)
    if fn is None:
        raise ValueError(f"--task {shown}: {where} has no function {function!r}")
    if not callable(fn):
        raise ValueError(f"--task {shown}: {function} in {where} is a "
                         f"{type(fn).__name__}, not a function")
    return fn


@contextlib.contextmanager
def local_task(name: str, task: Any) -> Iterator[str]:
    """Within the block, :func:`ksam.lab.tasks.get_task` builds task ``name`` from ``task`` (a
    function, a dict or a TaskData) in this process."""
    before = _LOCAL.get(name)
    _LOCAL[name] = task
    try:
        yield name
    finally:
        if before is None:
            _LOCAL.pop(name, None)
        else:
            _LOCAL[name] = before


def task_spec(name: str) -> TaskSpec | None:
    """The :class:`TaskSpec` of ``name`` when it is a task of the user's own (a
    ``target:function`` spec or a :func:`local_task`), else None."""
    if name in _LOCAL:
        source = _LOCAL[name]
    elif is_spec(name):
        source = load_function(name)
    else:
        return None
    shown = display_name(name)
    if not callable(source):
        data = task_data(source, shown)
        return TaskSpec(name, lambda data_dir, need_test: data, f"the task {shown}", {},
                        check_model=True)
    options, takes_dir = _parameters(source, shown)
    return TaskSpec(name, _builder(source, shown, takes_dir), f"the task {shown}", options,
                    check_model=True)


def _parameters(fn: Callable[..., Any], shown: str) -> tuple[dict[str, Any], bool]:
    """The keyword parameters of ``fn`` and their defaults (without ``data_dir``), and
    whether it takes ``data_dir``; ValueError for a required parameter."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return {}, False
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    required = [p.name for p in params if p.kind in (*kinds, inspect.Parameter.POSITIONAL_ONLY)
                and p.default is inspect.Parameter.empty]
    if required:
        raise ValueError(f"--task {shown}: the function takes required argument(s) "
                         f"{', '.join(required)}; a task function takes none (give them "
                         "defaults: they become the task's options, --task-option KEY=VALUE)")
    options = {p.name: p.default for p in params if p.kind in kinds}
    takes_dir = "data_dir" in options
    options.pop("data_dir", None)
    return options, takes_dir


def _builder(fn: Callable[..., Any], shown: str, takes_dir: bool) -> Builder:
    def build(data_dir: Any, need_test: bool, **options: Any) -> TaskData:
        del need_test  # the function gives its test set; a validation split ignores it
        if data_dir is not None:
            if not takes_dir:
                raise ValueError(f"--task {shown}: --data-dir is given, but the function "
                                 "takes no data_dir argument")
            options["data_dir"] = data_dir
        try:
            result = fn(**options)
        except Exception as exc:
            raise ValueError(f"--task {shown}: the function raised {_one_line(exc)}") \
                from None
        return task_data(result, shown)

    return build


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# --------------------------------------------------------------------------- checking

def task_data(result: Any, shown: str) -> TaskData:
    """``result`` (a dict of the module docstring's keys, or a TaskData) as a checked
    :class:`TaskData`; ValueError naming the first problem."""
    where = f"--task {shown}"
    if isinstance(result, TaskData):
        return _checked_task_data(result, where)
    if not isinstance(result, Mapping):
        raise ValueError(f"{where}: the function returned a {type(result).__name__}, not a "
                         f"dict with keys {', '.join(REQUIRED_KEYS)} (or a ksam.tasks.TaskData)")
    missing = [k for k in REQUIRED_KEYS if k not in result]
    if missing:
        raise ValueError(f"{where}: the dict lacks {', '.join(missing)} (it needs "
                         f"{', '.join(REQUIRED_KEYS)}; optional: "
                         f"{', '.join(KEYS[len(REQUIRED_KEYS):])})")
    unknown = sorted(str(k) for k in result if k not in KEYS)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)} in the dict (keys: "
                         f"{', '.join(KEYS)})")
    splits = RawSplits(*(_array(result[k], k, where) for k in ("train_x", "train_y",
                                                                "test_x", "test_y")))
    num_classes = result.get("num_classes")
    if num_classes is None:
        num_classes = max(2, int(max(splits.train_y.max(), splits.test_y.max())) + 1) \
            if _labels_ok(splits) else 2
    description = result.get("description")
    if description is None:
        description = f"{shown} ({len(splits.train_y)} training, {len(splits.test_y)} test " \
                      f"examples, {num_classes} classes)"
    data = TaskData(splits=splits, num_classes=num_classes, make_model=result["make_model"],
                    defaults=result.get("defaults") or {}, description=str(description),
                    augment=result.get("augment"))
    return _checked_task_data(data, where)


def _labels_ok(splits: RawSplits) -> bool:
    return all(np.issubdtype(y.dtype, np.integer) and y.size for y in
               (splits.train_y, splits.test_y))


def _array(value: Any, key: str, where: str) -> np.ndarray:
    """``value`` (a tensor, an array or nested lists) as a numpy array; ValueError for a
    ragged or non-numeric one."""
    if isinstance(value, Tensor):
        value = value.detach().cpu()
        if value.dtype in (torch.bfloat16, torch.float16):
            value = value.float()
        return value.numpy()
    try:
        array = np.asarray(value)
    except ValueError as exc:
        raise ValueError(f"{where}: {key} is ragged or not an array ({_one_line(exc)})") \
            from None
    if array.dtype == object:
        raise ValueError(f"{where}: {key} is ragged or not numeric (numpy makes an array of "
                         "objects of it): give a tensor or a numeric array of one shape")
    return array


def _checked_task_data(data: TaskData, where: str) -> TaskData:
    s = data.splits
    if s.test_x is None or s.test_y is None:
        raise ValueError(f"{where}: the task has no test set (test_x, test_y)")
    arrays = {"train_x": s.train_x, "train_y": s.train_y, "test_x": s.test_x,
              "test_y": s.test_y}
    for key, array in arrays.items():
        array = arrays[key] = _array(array, key, where)
        if array.ndim == 0 or array.shape[0] == 0:
            raise ValueError(f"{where}: {key} is empty")
        kind = array.dtype.kind
        if kind not in "biuf":
            raise ValueError(f"{where}: {key} is of dtype {array.dtype}, not numbers")
        if kind == "f" and not np.isfinite(array).all():
            raise ValueError(f"{where}: {key} holds non-finite values (NaN or inf)")
    for key in ("train_y", "test_y"):
        y = arrays[key]
        if y.ndim != 1:
            raise ValueError(f"{where}: {key} must be one integer class per example (shape "
                             f"[n]), got shape {list(y.shape)}")
        if y.dtype.kind not in "iu":
            raise ValueError(f"{where}: {key} must be integer class labels, got dtype "
                             f"{y.dtype} (convert with .astype(int) / .long())")
    for split in ("train", "test"):
        x, y = arrays[f"{split}_x"], arrays[f"{split}_y"]
        if len(x) != len(y):
            raise ValueError(f"{where}: {split}_x has {len(x)} examples, {split}_y "
                             f"{len(y)} labels")
    if arrays["train_x"].shape[1:] != arrays["test_x"].shape[1:]:
        raise ValueError(f"{where}: a training example has shape "
                         f"{list(arrays['train_x'].shape[1:])}, a test example "
                         f"{list(arrays['test_x'].shape[1:])}")
    for key in ("train_x", "test_x"):
        if arrays[key].dtype.kind == "b":
            arrays[key] = arrays[key].astype(np.float32)
    num_classes = data.num_classes
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) \
            or num_classes < 2:
        raise ValueError(f"{where}: num_classes must be an int >= 2, got {num_classes!r}")
    if not callable(data.make_model):
        raise ValueError(f"{where}: make_model must be a callable that returns a fresh "
                         f"nn.Module, got a {type(data.make_model).__name__}")
    if data.augment is not None and not callable(data.augment):
        raise ValueError(f"{where}: augment must be None or a callable augment(x, generator)"
                         f", got a {type(data.augment).__name__}")
    defaults = _defaults(data.defaults, where)
    return TaskData(splits=RawSplits(arrays["train_x"], arrays["train_y"], arrays["test_x"],
                                     arrays["test_y"]),
                    num_classes=int(num_classes), make_model=data.make_model,
                    defaults=defaults, description=data.description, augment=data.augment,
                    mean=data.mean, std=data.std)


def _defaults(given: Any, where: str) -> dict[str, Any]:
    if not isinstance(given, Mapping):
        raise ValueError(f"{where}: defaults must be a dict, got a {type(given).__name__}")
    unknown = sorted(str(k) for k in given if k not in DEFAULTS)
    if unknown:
        raise ValueError(f"{where}: unknown default(s) {', '.join(unknown)} (defaults: "
                         f"{', '.join(DEFAULT_KEYS)})")
    out = {**DEFAULTS, **given}
    for key in ("epochs", "batch_size"):
        value = out[key]
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{where}: defaults: {key} must be an integer >= 1, got "
                             f"{value!r}")
        out[key] = int(value)
    for key in ("lr", "momentum", "weight_decay"):
        value = out[key]
        if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) \
                or not math.isfinite(value) or value < 0 \
                or (key == "momentum" and value >= 1):
            bound = "in [0, 1)" if key == "momentum" else ">= 0"
            raise ValueError(f"{where}: defaults: {key} must be a finite number {bound}, "
                             f"got {value!r}")
        out[key] = float(value)
    return out


def check_model(data: TaskData, x: Tensor, where: str) -> None:
    """Build the task's model twice (with torch's random state put back after) and run one
    on ``x``, two training examples as training sees them (on the CPU, in eval mode), after
    the augmentation if there is one; ValueError unless the models are distinct fresh
    modules and the output is ``[len(x), num_classes]`` logits."""
    with torch.random.fork_rng(devices=[]):
        try:
            first, second = data.make_model(), data.make_model()
        except Exception as exc:
            raise ValueError(f"{where}: make_model() raised {_one_line(exc)}") from None
        if not isinstance(first, nn.Module):
            raise ValueError(f"{where}: make_model() returned a {type(first).__name__}, not "
                             "an nn.Module")
        shared = {id(p) for p in first.parameters()} & {id(p) for p in second.parameters()}
        if first is second or shared:
            raise ValueError(f"{where}: make_model() returned the same module (or shared "
                             "parameters) twice: it must build a fresh model at each call")
        if data.augment is not None:
            try:
                augmented = data.augment(x.clone(), torch.Generator().manual_seed(0))
            except Exception as exc:
                raise ValueError(f"{where}: augment(x, generator) raised {_one_line(exc)}") \
                    from None
            if not isinstance(augmented, Tensor) or augmented.shape != x.shape:
                raise ValueError(f"{where}: augment(x, generator) must return a tensor of "
                                 f"the batch's shape {list(x.shape)}, got "
                                 f"{list(getattr(augmented, 'shape', [])) or type(augmented)}")
            x = augmented
        first.eval()
        try:
            with torch.no_grad():
                out = first(x)
        except Exception as exc:
            raise ValueError(f"{where}: the model's forward on {len(x)} training examples "
                             f"(shape {list(x.shape)}) raised {_one_line(exc)}") from None
    expected = [len(x), data.num_classes]
    if not isinstance(out, Tensor) or list(out.shape) != expected \
            or not out.is_floating_point():
        got = f"shape {list(out.shape)}" if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"{where}: the model's output for {len(x)} examples must be logits "
                         f"of shape {expected} (num_classes {data.num_classes}), got {got}")
