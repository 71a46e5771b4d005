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

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
#: Config fields a resumed run may change: how it executes, not what it computes.
RESUME_MAY_CHANGE = {"fast", "compile"}


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

    def resolved(self, defaults: dict[str, Any]) -> TrainConfig:
        """A copy with the task's defaults filled in."""
        out = dataclasses.replace(self, method_options=dict(self.method_options),
                                  task_options=dict(self.task_options))
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


def atomic_torch_save(obj: Any, path: Path) -> None:
    import io

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


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
                   **cfg.method_options)
    if hasattr(model, "no_sync"):  # DistributedDataParallel
        from . import distributed

        engine = distributed.create(method, model, optimizer, selection=cfg.selection,
                                    sync_perturbation=cfg.sync_perturbation, **options)
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


def train(cfg: TrainConfig, *, out_dir: Path | None = None, resume: bool = False,
          task: Any = None, on_epoch: Callable[[dict[str, Any]], None] | None = None,
          dist_info: Any = None) -> dict[str, Any]:
    """Train one run. Returns ``{"config", "epochs": [per-epoch metrics], "final": {...}}``.

    With ``out_dir``, writes ``metrics.jsonl`` (one line per epoch) and, at the end of every
    epoch, ``checkpoint.pt`` atomically; ``resume=True`` continues from that checkpoint and
    ends with the same weights as an uninterrupted run on the same device.
    """
    from .tasks import get_task, per_sample_cross_entropy

    cfg.validate()
    if task is None:
        task = get_task(cfg.task, device=resolve_device(cfg.device), seed=cfg.seed,
                        **cfg.task_options)
    cfg = cfg.resolved(task.defaults)
    cfg.validate()
    device = torch.device(cfg.device)
    rank, world = (dist_info.rank, dist_info.world_size) if dist_info else (0, 1)
    is_main = rank == 0

    train_x, train_y = task.train_x.to(device), task.train_y.to(device)
    test_x, test_y = task.test_x.to(device), task.test_y.to(device)
    n_train = len(train_x)
    per_rank = n_train // world
    steps_per_epoch = per_rank // cfg.batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"batch_size {cfg.batch_size} is larger than the training set "
                         f"({per_rank} examples per process)")

    torch.manual_seed(cfg.seed)  # same initial weights for every method
    model = task.make_model().to(device)
    if device.type == "cuda" and train_x.dim() == 4:
        model = model.to(memory_format=torch.channels_last)
    net = model
    if dist_info is not None and world > 1:
        from . import distributed

        # No buffer broadcast inside forwards (it would put a collective into the per-rank
        # ascent pass); BatchNorm statistics are averaged before evaluation instead.
        net = distributed.wrap(model, device)
    if cfg.compile:
        import torch._dynamo as dynamo

        # Each run compiles afresh: its time includes its own compilation (not a cache left by
        # the previous run of the same model class), and no run inherits another's
        # recompiles towards dynamo's limit (past it, dynamo silently runs eagerly).
        dynamo.reset()
    engine, scheduler = build_engine(cfg.method, net, cfg, steps_per_epoch * cfg.epochs)
    engine.check_batch(cfg.batch_size)
    data_gen = torch.Generator(device=device).manual_seed(cfg.seed + 1)

    history: list[dict[str, Any]] = []
    start_epoch = 0
    ckpt_path = Path(out_dir) / "checkpoint.pt" if out_dir is not None else None
    metrics_path = Path(out_dir) / "metrics.jsonl" if out_dir is not None else None
    if resume:
        if ckpt_path is None or not ckpt_path.exists():
            raise FileNotFoundError(f"no checkpoint to resume from at {ckpt_path}")
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        check_resumable(cfg, ckpt["config"], ckpt_path)
        model.load_state_dict(ckpt["model"])
        engine.load_state_dict(ckpt["engine"])
        scheduler.load_state_dict(ckpt["scheduler"])
        data_gen.set_state(ckpt["data_generator"])
        torch.set_rng_state(ckpt["torch_rng"])
        if device.type == "cuda" and ckpt.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(ckpt["cuda_rng"], device)
        history = ckpt["history"]
        start_epoch = ckpt["epoch"]
    elif out_dir is not None and is_main:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(out_dir) / "config.json", json.dumps(cfg.to_dict(), indent=2))

    timer = StepTimer(device)
    train_time = history[-1]["train_time"] if history else 0.0
    for epoch in range(start_epoch, cfg.epochs):
        order = torch.randperm(n_train, device=device, generator=data_gen)
        if world > 1:
            order = order[rank:per_rank * world:world]
        loss_sum = torch.zeros((), device=device)
        _synchronize(device)
        t0 = time.perf_counter()
        timer.mark()
        for i in range(steps_per_epoch):
            idx = order[i * cfg.batch_size:(i + 1) * cfg.batch_size]
            xb, yb = train_x[idx], train_y[idx]
            if task.augment is not None:
                xb = task.augment(xb, data_gen)
            result = engine.step((xb, yb), per_sample_cross_entropy)
            loss_sum += result.raw_loss  # no host sync on the fast path
            scheduler.step()
            timer.mark()
        _synchronize(device)
        epoch_time = time.perf_counter() - t0
        train_time += epoch_time
        steps = timer.step_times()
        if net is not model:
            from . import distributed

            distributed.sync_buffers(net)
        dtype = PRECISIONS[cfg.precision]
        test_loss, test_acc = evaluate(model, test_x, test_y, 1024, dtype)
        row = {
            "epoch": epoch + 1,
            "train_loss": float(loss_sum) / steps_per_epoch,
            "test_loss": test_loss,
            "test_acc": test_acc,
            "epoch_time": epoch_time,
            "train_time": train_time,
            "step_time_median": statistics.median(steps) if steps else float("nan"),
            "steps": (epoch + 1) * steps_per_epoch,
            "skipped_steps": engine.skipped_steps,
            "lr": float(scheduler.get_last_lr()[0]),
        }
        history.append(row)
        if out_dir is not None and is_main:
            atomic_write_text(metrics_path, "".join(json.dumps(r) + "\n" for r in history))
            atomic_torch_save({
                "config": cfg.to_dict(), "epoch": epoch + 1, "model": model.state_dict(),
                "engine": engine.state_dict(), "scheduler": scheduler.state_dict(),
                "data_generator": data_gen.get_state(), "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                "history": history,
            }, ckpt_path)
        if on_epoch is not None:
            on_epoch(row)
    final = dict(history[-1]) if history else {}
    final["fast_path"] = engine.fast_path_active
    return {"config": cfg.to_dict(), "epochs": history, "final": final, "model": model}
