"""Models, data, loss functions and comparisons shared by the test modules.

The test modules import them as plain functions (``from conftest import ce, mlp``): pytest
puts this directory on ``sys.path`` and imports this file as the module ``conftest``.
Everything here is deterministic: a model from its seed, a batch from its seed.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ksam
from ksam.selection import SelectionContext


# ------------------------------------------------------------------- the machine
@pytest.fixture(autouse=True)
def one_core(monkeypatch):
    """The machine as the tests see it has one core: ``ksam compare``'s default
    ``--jobs`` (one worker per core) trains a grid in the test's own process, and ``ksam
    train`` takes one thread. A test of parallel workers gives ``--jobs``."""
    import ksam.lab.pool

    monkeypatch.setattr(ksam.lab.pool, "available_cores", lambda: 1)


# ------------------------------------------------------------------- loss, models, data
def ce(model: nn.Module, batch) -> torch.Tensor:
    """Per-sample cross-entropy of an ``(inputs, labels)`` batch, in float32 also when the
    forward ran in a lower precision."""
    x, y = batch
    return F.cross_entropy(model(x).float(), y, reduction="none")


def ce_logits(model: nn.Module, batch) -> ksam.LossOutput:
    """:func:`ce` with the logits it came from (for SAF and MESA, which read them)."""
    x, y = batch
    logits = model(x)
    return ksam.LossOutput(F.cross_entropy(logits.float(), y, reduction="none"), logits)


def mlp(seed: int = 0, hidden: int = 16) -> nn.Module:
    """6 inputs, ``hidden`` units, 4 classes, no BatchNorm."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, hidden), nn.Tanh(), nn.Linear(hidden, 4))


def bn_net(seed: int = 0, momentum: float | None = 0.1, sync: bool = False) -> nn.Module:
    """6 inputs, 4 classes, one BatchNorm layer on the first Linear's output (no BatchNorm
    before it); ``sync=True`` makes it a SyncBatchNorm."""
    torch.manual_seed(seed)
    norm = nn.SyncBatchNorm if sync else nn.BatchNorm1d
    return nn.Sequential(nn.Linear(6, 16), norm(16, momentum=momentum), nn.ReLU(),
                         nn.Linear(16, 4))


def data(n: int = 32, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of ``n`` rows for :func:`mlp` and :func:`bn_net`."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g), torch.randint(0, 4, (n,), generator=g)


def batches(steps: int, n: int = 32) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``steps`` batches, the s-th from seed s."""
    return [data(n, seed=s) for s in range(steps)]


def sgd(model: nn.Module, lr: float = 0.1, momentum: float = 0.9, **kw) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, **kw)


def ctx(scores, step: int = 0, labels=None) -> SelectionContext:
    """The selection context of one step with these per-sample losses (and labels)."""
    return SelectionContext(batch_size=len(scores), device=torch.device("cpu"),
                            scores=torch.as_tensor(scores, dtype=torch.float32), step=step,
                            labels=None if labels is None else torch.as_tensor(labels))


def run(method: str, model: nn.Module, batches_: list | None = None, *, steps: int = 3,
        seed: int = 0, opt: torch.optim.Optimizer | None = None, **kw):
    """``ksam.create(method, ...)`` stepped with :func:`ce` over ``batches_`` (default:
    :func:`batches` of ``steps``); returns the engine and its step results."""
    eng = ksam.create(method, model, opt or sgd(model), seed=seed, **kw)
    results = [eng.step(b, ce) for b in (batches(steps) if batches_ is None else batches_)]
    return eng, results


# ------------------------------------------------------------------------- comparisons
def params(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same(a, b, atol: float = 0.0) -> None:
    """Two sequences of tensors of the same length: equal bit for bit, or within ``atol``."""
    a, b = list(a), list(b)
    assert len(a) == len(b)
    for x, y in zip(a, b):
        if atol == 0:
            assert torch.equal(x, y)
        else:
            torch.testing.assert_close(x, y, atol=atol, rtol=0)


def assert_tree_equal(a, b) -> None:
    """Nested dicts / lists / tuples of tensors and plain values, equal exactly."""
    assert type(a) is type(b), (type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for key in a:
            assert_tree_equal(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_tree_equal(x, y)
    else:
        assert a == b


def snapshot(model: nn.Module, opt: torch.optim.Optimizer):
    """Weights, BatchNorm buffers and momentum buffers, copied."""
    momentum = [s["momentum_buffer"].clone() for s in opt.state.values()
                if s.get("momentum_buffer") is not None]
    return [t.detach().clone() for t in model.state_dict().values()], momentum


def assert_unchanged(before, model: nn.Module, opt: torch.optim.Optimizer) -> None:
    """Nothing in :func:`snapshot` changed since ``before`` was taken."""
    after = snapshot(model, opt)
    assert len(before[0]) == len(after[0]) and len(before[1]) == len(after[1])
    for a, b in zip(before[0] + before[1], after[0] + after[1]):
        assert torch.equal(a, b)


def bn_update_pattern(bn: nn.Module, step) -> list[bool]:
    """Runs ``step()`` and returns, per forward through ``bn`` in order, whether that pass
    changed one of its buffers."""
    log: list = []
    pre = bn.register_forward_pre_hook(
        lambda m, i: log.append([b.clone() for b in m.buffers()]))

    def after(m, i, o):
        old = log.pop()
        log.append(not all(torch.equal(a, b) for a, b in zip(old, m.buffers())))

    post = bn.register_forward_hook(after)
    try:
        step()
    finally:
        pre.remove()
        post.remove()
    return log


# ------------------------------------------------------------------------ data files
def write_idx(path: Path, array: np.ndarray, magic: int) -> None:
    """An IDX file (the format of MNIST and Fashion-MNIST) of ``array`` as uint8, gzipped if
    ``path`` ends in .gz; ``magic`` 2051 for images, 2049 for labels."""
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


# ----------------------------------------------------------------------- the command line
#: A short ``ksam train`` / ``compare`` on MNIST-1D: 240 training examples, batches of 32.
CLI_SMALL = ["--task", "mnist1d", "--task-option", "num_samples=300", "--batch-size", "32",
             "--quiet"]


def files_of(folder: Path) -> dict[str, bytes]:
    """Every file below ``folder`` (by its relative path) with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_one_error(capsys, code: int, needle: str) -> str:
    """The command exited 2 with exactly one ``ksam: error:`` line that holds ``needle``;
    returns the line."""
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("ksam: error:"), err
    assert needle in err[0], err[0]
    return err[0]


@contextlib.contextmanager
def lock_held(folder: Path):
    """Another process holds ``folder``'s lock (an exclusive flock, as a running ksam
    command does) until the block ends."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys, time; fd = os.open(sys.argv[1], "
         "os.O_RDONLY); fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); "
         "time.sleep(120)", str(folder)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        yield
    finally:
        holder.kill()
        holder.wait(timeout=30)


def copy_folder(source: Path, target: Path) -> Path:
    """A copy of the files of ``source`` in ``target`` (made)."""
    target.mkdir(parents=True)
    for name, content in files_of(source).items():
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        (target / name).write_bytes(content)
    return target


@pytest.fixture(scope="session")
def two_epoch_run(tmp_path_factory) -> Path:
    """The folder of a finished ``ksam train --method sgd --epochs 2`` (:data:`CLI_SMALL`);
    copy it (:func:`copy_folder`) before changing anything there."""
    from ksam.lab.cli import main

    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(["train", "--method", "sgd", "--epochs", "2", "--out", str(out),
                 *CLI_SMALL]) == 0
    assert [json.loads(x)["epoch"] for x in (out / "metrics.jsonl").read_text().splitlines()] \
        == [1, 2]
    return out


# ------------------------------------------------------------------- a task of the user's own
#: A task file as a user writes it: 4 classes of 6 features, an MLP; ``task()`` is the task,
#: the other functions each break one rule of a task.
TASK_FILE = '''
import numpy as np
import torch
from torch import nn


def make_model():
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 4))


def data(n, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 6)).astype("float32")
    y = (x[:, 0] > 0).astype(np.int64) + 2 * (x[:, 1] > 0).astype(np.int64)
    return x, y


def task(n=160):
    x, y = data(n, 0)
    xt, yt = data(64, 1)
    return {"train_x": x, "train_y": y, "test_x": xt, "test_y": yt, "make_model": make_model,
            "defaults": {"epochs": 2, "batch_size": 16, "lr": 0.1}}


def tensors():
    return {k: torch.as_tensor(v) if k.endswith(("_x", "_y")) else v
            for k, v in task().items()}


def raises():
    raise RuntimeError("the data server is down")


def not_a_dict():
    return [1, 2, 3]


def missing_key():
    d = task()
    del d["test_y"]
    return d


def unknown_key():
    return {**task(), "labels": 3}


def ragged():
    return {**task(), "train_x": [[1.0, 2.0], [3.0]]}


def nan_inputs():
    d = task()
    d["train_x"][3, 2] = float("nan")
    return d


def float_labels():
    d = task()
    d["train_y"] = d["train_y"].astype("float32")
    return d


def labels_outside():
    return {**task(), "num_classes": 3}


def wrong_output():
    return {**task(), "make_model": lambda: nn.Linear(6, 7)}


def same_model():
    model = make_model()
    return {**task(), "make_model": lambda: model}


def lengths():
    d = task()
    d["train_y"] = d["train_y"][:-1]
    return d


def shapes():
    d = task()
    d["test_x"] = d["test_x"][:, :5]
    return d


def bad_defaults():
    return {**task(), "defaults": {"epochs": 0}}


def needs(count):
    return task()


not_a_function = 3
'''


@pytest.fixture
def task_file(tmp_path) -> Path:
    """:data:`TASK_FILE` written as ``tmp_path/user_task.py``."""
    path = tmp_path / "user_task.py"
    path.write_text(TASK_FILE)
    return path
