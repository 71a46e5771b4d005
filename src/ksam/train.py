"""One training run: a task, a method, a seed; timed fairly, checkpointed atomically.

Fairness rules (what makes runs of different methods comparable):

- the same initial weights for a given seed, whatever the method (the model is built right
  after ``torch.manual_seed(seed)``), and the same data order and augmentation draws (a
  data generator seeded with the seed, separate from the method's own randomness);
- only training steps are timed, with the device synchronized at the edges of each epoch
  (CUDA events per step, so the pipeline is not stalled); evaluation is outside the clock;
- the data lives on the device and is augmented there on whole batches, so what is timed is
  the optimizer step, not an input pipeline.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .engine import SharpnessAwareOptimizer
from .methods import create
from .schedule import schedule_options

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
#: Config fields a resumed run may change: how it executes, not what it computes.
RESUME_MAY_CHANGE = {"fast", "compile", "eval_every"}


@dataclass
class TrainConfig:
    """Everything that defines a run. ``None`` means: the task's default."""

    task: str = "mnist1d"
    method: str = "ksam"
    method_options: dict[str, Any] = field(default_factory=dict)
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    momentum: float | None = None
    weight_decay: float | None = None
    schedule: str = "cosine"
    seed: int = 0
    device: str = "auto"
    precision: str = "fp32"
    fast: bool | None = None
    # torch.compile backend of the forward passes ("inductor", "aot_eager", ...); None: off.
    compile: str | None = None
    task_options: dict[str, Any] = field(default_factory=dict)
    # DistributedDataParallel (docs/distributed.md): local or global top-K, per-rank or
    # synchronized perturbation. Ignored in a single process.
    selection: str = "local"
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

    def resolved(self, defaults: dict[str, Any]) -> TrainConfig:
        """A copy with the task's defaults filled in."""
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

    def validate(self) -> None:
        def positive(name: str, integer: bool = False) -> None:
            value = getattr(self, name)
            if value is None:
                return
            if integer and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
            if not integer and not (isinstance(value, (int, float)) and math.isfinite(value)
                                    and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")

        positive("epochs", integer=True)
        positive("batch_size", integer=True)
        positive("micro_batch_size", integer=True)
        positive("eval_every", integer=True)
        if self.max_grad_norm is not None and not (
                isinstance(self.max_grad_norm, (int, float)) and self.max_grad_norm > 0
                and math.isfinite(self.max_grad_norm)):
            raise ValueError(f"max_grad_norm must be a finite number > 0, "
                             f"got {self.max_grad_norm!r}")
        for name in ("lr", "momentum", "weight_decay"):
            positive(name)
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, "
                             f"got {self.precision!r}")
        if self.compile is not None:
            from .engine import compile_backend

            compile_backend(self.compile)
        if self.selection not in ("local", "global"):
            raise ValueError(f"selection must be 'local' or 'global', got {self.selection!r}")
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"schedule must be 'cosine' or 'constant', got {self.schedule!r}")
        if self.device not in ("auto", "cpu") and not self.device.startswith("cuda"):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device {self.device!r} asked for, but CUDA is not available")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def resolve_device(name: str) -> str:
    """``auto`` is the GPU when there is one."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never a
    half-written one (write to a temporary file in the same folder, fsync, rename)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


#: First bytes of a ksam checkpoint file; then the SHA-256 of the payload (32 bytes), then
#: the payload (``torch.save`` of the state). The digest makes a garbled, truncated or foreign
#: file an error on read instead of NaN weights.
CHECKPOINT_MAGIC = b"KSAM-CHECKPOINT-1\n"
#: What ``train(out_dir=...)`` writes in its folder (``--overwrite`` removes these only).
TRAIN_OUTPUTS = ("config.json", "metrics.jsonl", "checkpoint.pt")


def checkpoint_path(out_dir: Path) -> Path:
    return Path(out_dir) / "checkpoint.pt"


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """Write ``state`` atomically with the SHA-256 of its bytes (see :data:`CHECKPOINT_MAGIC`)."""
    import io

    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    atomic_write_bytes(path, CHECKPOINT_MAGIC + hashlib.sha256(payload).digest() + payload)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`. ValueError for an empty,
    truncated, garbled or foreign file, or one whose weights are not all finite."""
    import io

    path = Path(path)
    raw = path.read_bytes()
    head = len(CHECKPOINT_MAGIC)
    if not raw.startswith(CHECKPOINT_MAGIC):
        raise ValueError(f"checkpoint {path} is not a ksam checkpoint"
                         f"{' (empty file)' if not raw else ''}")
    digest, payload = raw[head:head + 32], raw[head + 32:]
    if hashlib.sha256(payload).digest() != digest:
        raise ValueError(f"checkpoint {path} is damaged (truncated or garbled: its checksum "
                         "does not match)")
    try:
        state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as exc:  # a checksummed file that still fails to unpickle
        raise ValueError(f"checkpoint {path} cannot be read: {exc}") from None
    keys = ("config", "epoch", "model", "engine", "scheduler", "history")
    if not isinstance(state, dict) or any(k not in state for k in keys):
        raise ValueError(f"checkpoint {path} lacks some of {', '.join(keys)}")
    bad = [name for name, t in state["model"].items()
           if isinstance(t, Tensor) and t.is_floating_point() and not bool(t.isfinite().all())]
    if bad:
        raise ValueError(f"checkpoint {path} holds non-finite weights ({', '.join(bad[:3])})")
    return state


def check_resumable(cfg: TrainConfig, saved: dict[str, Any], path: Path) -> None:
    """ValueError unless a checkpoint saved with config ``saved`` continues run ``cfg``
    (resolved): everything that changes the run's math must match; how it executes
    (:data:`RESUME_MAY_CHANGE`) may differ."""
    now = cfg.to_dict()
    if {k: saved.get(k) for k in ("task", "method", "seed")} != \
            {k: now[k] for k in ("task", "method", "seed")}:
        raise ValueError(f"checkpoint {path} is of another run ({saved.get('task')}/"
                         f"{saved.get('method')}/seed {saved.get('seed')})")
    changed = [k for k in now if k not in RESUME_MAY_CHANGE and k in saved
               and saved[k] != now[k]]
    if changed:
        raise ValueError(f"checkpoint {path} was made with " + ", ".join(
            f"{k}={saved[k]!r} (now {now[k]!r})" for k in changed))


def build_engine(method: str, model: torch.nn.Module, cfg: TrainConfig,
                 steps_total: int) -> tuple[SharpnessAwareOptimizer, Any]:
    """The base optimizer (momentum SGD), the LR schedule and the method around them."""
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay, nesterov=False)
    if cfg.schedule == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(1, steps_total))
    else:
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    scaler = None
    if cfg.precision == "fp16":
        scaler = torch.amp.GradScaler(torch.device(cfg.device).type)
    options = dict(grad_scaler=scaler, autocast_dtype=PRECISIONS[cfg.precision],
                   fast_path=bool(cfg.fast), seed=cfg.seed, compile=cfg.compile or False,
                   micro_batch_size=cfg.micro_batch_size, max_grad_norm=cfg.max_grad_norm,
                   **schedule_options(method, cfg.method_options, steps_total))
    from . import distributed

    if hasattr(model, "no_sync") or distributed.is_fsdp(model):  # DDP or FSDP2
        sync = True if cfg.fsdp else cfg.sync_perturbation
        engine = distributed.create(method, model, optimizer, selection=cfg.selection,
                                    sync_perturbation=sync, **options)
    else:
        engine = create(method, model, optimizer, **options)
    return engine, scheduler


@torch.no_grad()
def evaluate(model: torch.nn.Module, x: Tensor, y: Tensor, batch_size: int,
             autocast_dtype: torch.dtype | None) -> tuple[float, float]:
    """Mean cross-entropy and accuracy (%) of ``model`` in eval mode."""
    model.eval()
    loss_sum = torch.zeros((), device=x.device)
    correct = torch.zeros((), device=x.device, dtype=torch.long)
    for i in range(0, len(x), batch_size):
        xb, yb = x[i:i + batch_size], y[i:i + batch_size]
        ctx = torch.autocast(x.device.type, dtype=autocast_dtype) if autocast_dtype \
            else torch.autocast(x.device.type, enabled=False)
        with ctx:
            logits = model(xb)
        loss_sum += torch.nn.functional.cross_entropy(logits.float(), yb, reduction="sum")
        correct += (logits.argmax(1) == yb).sum()
    model.train()
    n = max(1, len(x))
    return float(loss_sum) / n, 100.0 * float(correct) / n


class StepTimer:
    """Per-step wall-clock times; CUDA events on the GPU so timing does not stall it."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: list[Any] = []

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def step_times(self) -> list[float]:
        """Seconds per step between consecutive marks (syncs on the GPU)."""
        if len(self.marks) < 2:
            return []
        if self.cuda:
            self.marks[-1].synchronize()
            out = [a.elapsed_time(b) / 1000 for a, b in zip(self.marks, self.marks[1:])]
        else:
            out = [b - a for a, b in zip(self.marks, self.marks[1:])]
        self.marks = []
        return out


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class _Run:
    """One run's state between epochs: the resolved configuration, data, model, engine."""

    cfg: TrainConfig
    task: Any
    device: torch.device
    model: torch.nn.Module
    net: torch.nn.Module  # the model, or its DDP wrapper
    engine: SharpnessAwareOptimizer
    scheduler: Any
    data_gen: torch.Generator
    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    rank: int
    world: int
    steps_per_epoch: int


def _setup(cfg: TrainConfig, task: Any, dist_info: Any) -> _Run:
    """Resolve ``cfg`` against the task, then build the model (seeded: the same initial
    weights for every method), the engine and the data generator. Writes nothing."""
    cfg.validate()
    cfg = cfg.resolved(task.defaults)
    cfg.validate()
    device = torch.device(cfg.device)
    rank, world = (dist_info.rank, dist_info.world_size) if dist_info else (0, 1)
    train_x, train_y = task.train_x.to(device), task.train_y.to(device)
    steps_per_epoch = (len(train_x) // world) // cfg.batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"batch_size {cfg.batch_size} is larger than the training set "
                         f"({len(train_x) // world} examples per process)")
    torch.manual_seed(cfg.seed)  # same initial weights for every method
    model = task.make_model().to(device)
    if device.type == "cuda" and train_x.dim() == 4:
        model = model.to(memory_format=torch.channels_last)
    net = model
    if dist_info is not None and world > 1:
        from . import distributed

        # No buffer broadcast inside forwards (it would put a collective into the per-rank
        # ascent pass); BatchNorm statistics are averaged before evaluation instead.
        net = distributed.wrap(model, device, fsdp=cfg.fsdp)
    if cfg.compile:
        import torch._dynamo as dynamo

        # Each run compiles afresh: its time includes its own compilation (not a cache left by
        # the previous run of the same model class), and no run inherits another's
        # recompiles towards dynamo's limit (past it, dynamo silently runs eagerly).
        dynamo.reset()
    engine, scheduler = build_engine(cfg.method, net, cfg, steps_per_epoch * cfg.epochs)
    engine.check_batch(cfg.batch_size)
    return _Run(cfg, task, device, model, net, engine, scheduler,
                torch.Generator(device=device).manual_seed(cfg.seed + 1), train_x, train_y,
                task.test_x.to(device), task.test_y.to(device), rank, world, steps_per_epoch)


def _restore(run: _Run, ckpt: dict[str, Any]) -> None:
    if run.cfg.fsdp and run.world > 1:
        from . import distributed

        distributed.load_state_dict(run.engine, {
            "model": ckpt["model"], "optimizer": ckpt["fsdp_optimizer"],
            "engine": ckpt["engine"]})
    else:
        run.model.load_state_dict(ckpt["model"])
        run.engine.load_state_dict(ckpt["engine"])
    run.scheduler.load_state_dict(ckpt["scheduler"])
    run.data_gen.set_state(ckpt["data_generator"])
    torch.set_rng_state(ckpt["torch_rng"])
    if run.device.type == "cuda" and ckpt.get("cuda_rng") is not None:
        torch.cuda.set_rng_state(ckpt["cuda_rng"], run.device)


def _train_epoch(run: _Run, timer: StepTimer) -> tuple[Tensor, float, list[float]]:
    """One epoch of steps: (summed loss on the device, wall-clock, per-step times)."""
    from .tasks import per_sample_cross_entropy

    cfg, device = run.cfg, run.device
    order = torch.randperm(len(run.train_x), device=device, generator=run.data_gen)
    if run.world > 1:
        per_rank = len(run.train_x) // run.world
        order = order[run.rank:per_rank * run.world:run.world]
    loss_sum = torch.zeros((), device=device)
    _synchronize(device)
    t0 = time.perf_counter()
    timer.mark()
    for i in range(run.steps_per_epoch):
        idx = order[i * cfg.batch_size:(i + 1) * cfg.batch_size]
        xb, yb = run.train_x[idx], run.train_y[idx]
        if run.task.augment is not None:
            xb = run.task.augment(xb, run.data_gen)
        result = run.engine.step((xb, yb), per_sample_cross_entropy)
        loss_sum += result.raw_loss  # no host sync on the fast path
        run.scheduler.step()
        timer.mark()
    _synchronize(device)
    return loss_sum, time.perf_counter() - t0, timer.step_times()


def _epoch_row(run: _Run, epoch: int, loss_sum: Tensor, epoch_time: float,
               train_time: float, steps: list[float]) -> dict[str, Any]:
    """Evaluate (outside the clock; every ``eval_every`` epochs and after the last) and
    return the epoch's metrics."""
    test_loss = test_acc = None
    if (epoch + 1) % run.cfg.eval_every == 0 or epoch + 1 == run.cfg.epochs:
        if run.world > 1:  # DDP wraps the model, FSDP2 shards it in place: both sync buffers
            from . import distributed

            distributed.sync_buffers(run.net)
        test_loss, test_acc = evaluate(run.model, run.test_x, run.test_y, 1024,
                                       PRECISIONS[run.cfg.precision])
    return {
        "epoch": epoch + 1,
        "train_loss": float(loss_sum) / run.steps_per_epoch,
        "test_loss": test_loss,
        "test_acc": test_acc,
        "epoch_time": epoch_time,
        "train_time": train_time,
        "step_time_median": statistics.median(steps) if steps else float("nan"),
        "steps": (epoch + 1) * run.steps_per_epoch,
        "skipped_steps": run.engine.skipped_steps,
        "lr": float(run.scheduler.get_last_lr()[0]),
    }


def _gathered_state(run: _Run) -> dict[str, Any] | None:
    """FSDP2 across ranks: the whole tensors of model, optimizer and engine state, gathered
    through torch.distributed.checkpoint (a collective: every rank calls it). Else None."""
    if not (run.cfg.fsdp and run.world > 1):
        return None
    from . import distributed

    return distributed.state_dict(run.engine)


def _checkpoint_state(run: _Run, history: list[dict[str, Any]],
                      sharded: dict[str, Any] | None = None) -> dict[str, Any]:
    cuda = run.device.type == "cuda"
    return {
        "config": run.cfg.to_dict(), "epoch": history[-1]["epoch"],
        "model": run.model.state_dict() if sharded is None else sharded["model"],
        "engine": run.engine.state_dict() if sharded is None else sharded["engine"],
        "fsdp_optimizer": None if sharded is None else sharded["optimizer"],
        "scheduler": run.scheduler.state_dict(), "data_generator": run.data_gen.get_state(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state(run.device) if cuda else None,
        "history": history,
    }


def train(cfg: TrainConfig, *, out_dir: Path | None = None, resume: bool = False,
          task: Any = None, on_epoch: Callable[[dict[str, Any]], None] | None = None,
          dist_info: Any = None,
          before_write: Callable[[], None] | None = None) -> dict[str, Any]:
    """Train one run. Returns ``{"config", "epochs": [per-epoch metrics], "final": {...}}``.

    With ``out_dir``, writes ``metrics.jsonl`` (one line per epoch) and, at the end of every
    epoch, a checksummed ``checkpoint.pt`` atomically; ``resume=True`` continues from that
    checkpoint (verified first) and ends with the same weights as an uninterrupted run on
    the same device. Everything (data, configuration, checkpoint) is checked before the first
    write; ``before_write`` is called just before it (e.g. to clear old results).
    """
    from .tasks import get_task

    cfg.validate()
    if task is None:
        task = get_task(cfg.task, device=resolve_device(cfg.device), seed=cfg.seed,
                        **cfg.task_options)
    run = _setup(cfg, task, dist_info)
    is_main = run.rank == 0
    history: list[dict[str, Any]] = []
    ckpt_path = checkpoint_path(out_dir) if out_dir is not None else None
    if resume:
        if ckpt_path is None or not ckpt_path.exists():
            raise FileNotFoundError(f"no checkpoint to resume from at {ckpt_path}")
        ckpt = load_checkpoint(ckpt_path)
        check_resumable(run.cfg, ckpt["config"], ckpt_path)
        _restore(run, ckpt)
        history = ckpt["history"]
    elif out_dir is not None and is_main:
        config_text = json.dumps(run.cfg.to_dict(), indent=2)
        if before_write is not None:
            before_write()
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(out_dir) / "config.json", config_text)

    timer = StepTimer(run.device)
    train_time = history[-1]["train_time"] if history else 0.0
    for epoch in range(len(history), run.cfg.epochs):
        loss_sum, epoch_time, steps = _train_epoch(run, timer)
        train_time += epoch_time
        history.append(_epoch_row(run, epoch, loss_sum, epoch_time, train_time, steps))
        # FSDP2: every rank takes part in gathering the shards; rank 0 writes them.
        sharded = _gathered_state(run) if out_dir is not None else None
        if out_dir is not None and is_main:
            atomic_write_text(Path(out_dir) / "metrics.jsonl",
                              "".join(json.dumps(r) + "\n" for r in history))
            save_checkpoint(_checkpoint_state(run, history, sharded), ckpt_path)
        if on_epoch is not None:
            on_epoch(history[-1])
    final = dict(history[-1]) if history else {}
    final["fast_path"] = run.engine.fast_path_active
    return {"config": run.cfg.to_dict(), "epochs": history, "final": final,
            "model": run.model}
