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

import json
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..batch import IndexedBatch
from ..cost import step_rows
from ..engine import Method
from ..methods import DEFAULT_SELECT, create, takes_num_examples
from ..params import is_ddp
from ..schedule import schedule_options
from ..selection import rule_options
from .config import PRECISIONS, RENAMED_FIELDS, TrainConfig, resolve_device
from .outputs import (
    OutputFolder,
    WriteError,
    atomic_write_text,
    check_folder_command,
    check_own_outputs,
    checkpoint_path,
    load_checkpoint,
    open_output,
    save_checkpoint,
)

#: Config fields a resumed run may change: how it executes, not what it computes. Not
#: ``fast``: the fast path's fused optimizer kernel rounds differently, and the engine refuses
#: a state saved with the other ``fast_path`` setting.
RESUME_MAY_CHANGE = {"compile", "eval_every"}


def saved_config(saved: dict[str, Any]) -> dict[str, Any]:
    """A configuration read from a checkpoint or ``config.json``, its fields under their
    names (an earlier name, :data:`ksam.lab.config.RENAMED_FIELDS`, read as the name)."""
    out = dict(saved)
    for old, new in RENAMED_FIELDS.items():
        if old in out and new not in out:
            out[new] = out.pop(old)
    return out


def check_resumable(cfg: TrainConfig, saved: dict[str, Any], path: Path) -> None:
    """ValueError unless a run saved (in the checkpoint or ``config.json`` ``path``) with
    config ``saved`` continues run ``cfg`` (resolved): everything that changes the run's
    math must match; how it executes (:data:`RESUME_MAY_CHANGE`) may differ."""
    now, saved = cfg.to_dict(), saved_config(saved)
    if {k: saved.get(k) for k in ("task", "method", "seed")} != \
            {k: now[k] for k in ("task", "method", "seed")}:
        raise ValueError(f"{path} is of another run ({saved.get('task')}/"
                         f"{saved.get('method')}/seed {saved.get('seed')})")
    changed = [k for k in now if k not in RESUME_MAY_CHANGE and k in saved
               and saved[k] != now[k]]
    if changed:
        raise ValueError(f"{path} was made with " + ", ".join(
            f"{k}={saved[k]!r} (now {now[k]!r})" for k in changed))


def default_rule(method: str, options: dict[str, Any]) -> str:
    """The selection rule method ``method`` takes when ``options`` name none."""
    if method == "ksam" and options.get("scores", "forward") == "forward" \
            and options.get("loss_kind", "ce") == "ce":
        return DEFAULT_SELECT
    return "top"


def build_engine(method: str, model: torch.nn.Module, cfg: TrainConfig,
                 steps_total: int, num_examples: int | None = None
                 ) -> tuple[Method, Any]:
    """The base optimizer (momentum SGD), the LR schedule and the method around them;
    ``num_examples`` (the training set's size) for a method with a per-example memory
    (ValueError for method options that give it another)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay, nesterov=False)
    if cfg.lr_schedule == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(1, steps_total))
    else:
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    scaler = None
    if cfg.precision == "fp16":
        scaler = torch.amp.GradScaler(torch.device(cfg.device).type)
    options = dict(grad_scaler=scaler, autocast_dtype=PRECISIONS[cfg.precision],
                   fast_path=bool(cfg.fast), seed=cfg.seed, compile=cfg.compile or False,
                   micro_batch_size=cfg.micro_batch_size, max_grad_norm=cfg.max_grad_norm,
                   **rule_options(schedule_options(method, cfg.method_options, steps_total),
                                  steps_total, default_rule(method, cfg.method_options)))
    if num_examples is not None and takes_num_examples(method, options):
        given = options.setdefault("num_examples", num_examples)
        if given != num_examples:  # its ids would fail the first step, after writing
            raise ValueError(f"num_examples={given!r}, but the training set has "
                             f"{num_examples} examples: the run sets num_examples to the "
                             "training set's size itself; leave it out of the spec")
    from .. import distributed

    if is_ddp(model) or distributed.is_fsdp(model):  # DDP or FSDP2
        sync = True if cfg.fsdp else cfg.sync_perturbation
        engine = distributed.create(method, model, optimizer, selection=cfg.selection_scope,
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
    engine: Method
    scheduler: Any
    data_gen: torch.Generator
    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    rank: int
    world: int
    steps_per_epoch: int
    #: the run's optimizer steps: ``cfg.steps``, else ``epochs`` whole epochs
    total_steps: int
    #: example passes so far (:mod:`ksam.cost`; None in a run resumed from a checkpoint
    #: that did not count them)
    passes: int | None = 0

    def steps_in(self, epoch: int) -> int:
        """The steps of epoch ``epoch`` (0-based): a whole epoch, or the rest of the run."""
        return max(0, min(self.steps_per_epoch, self.total_steps - epoch * self.steps_per_epoch))


def _setup(cfg: TrainConfig, task: Any, dist_info: Any) -> _Run:
    """Resolve ``cfg`` against the task, then build the model (seeded: the same initial
    weights for every method), the engine and the data generator. Writes nothing."""
    cfg = cfg.resolved(task.defaults)
    cfg.validate()  # the task's defaults too
    rank, world = (dist_info.rank, dist_info.world_size) if dist_info else (0, 1)
    cfg.check_processes(world)
    device = torch.device(cfg.device)
    train_x, train_y = task.train_x.to(device), task.train_y.to(device)
    steps_per_epoch = (len(train_x) // world) // cfg.batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"batch_size {cfg.batch_size} is larger than the training set "
                         f"({len(train_x) // world} examples per process)")
    total_steps = steps_per_epoch * cfg.epochs if cfg.steps is None else cfg.steps
    if -(-total_steps // steps_per_epoch) != cfg.epochs:
        raise ValueError(f"steps={cfg.steps} take {-(-total_steps // steps_per_epoch)} epochs "
                         f"of {steps_per_epoch} steps, not epochs={cfg.epochs}")
    torch.manual_seed(cfg.seed)  # same initial weights for every method
    model = task.make_model().to(device)
    if device.type == "cuda" and train_x.dim() == 4:
        model = model.to(memory_format=torch.channels_last)
    net = model
    if dist_info is not None and world > 1:
        from .. import distributed

        # No buffer broadcast inside forwards (it would put a collective into the per-rank
        # ascent pass); BatchNorm statistics are averaged before evaluation instead.
        net = distributed.wrap(model, device, fsdp=cfg.fsdp)
    if cfg.compile:
        import torch._dynamo as dynamo

        # Each run compiles afresh: its time includes its own compilation (not a cache left by
        # the previous run of the same model class), and no run inherits another's
        # recompiles towards dynamo's limit (past it, dynamo silently runs eagerly).
        dynamo.reset()
    engine, scheduler = build_engine(cfg.method, net, cfg, total_steps,
                                     num_examples=len(train_x))
    engine.check_batch(cfg.batch_size)
    return _Run(cfg, task, device, model, net, engine, scheduler,
                torch.Generator(device=device).manual_seed(cfg.seed + 1), train_x, train_y,
                task.test_x.to(device), task.test_y.to(device), rank, world, steps_per_epoch,
                total_steps)


def _restore(run: _Run, ckpt: dict[str, Any]) -> None:
    if run.cfg.fsdp and run.world > 1:
        from .. import distributed

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


def _train_epoch(run: _Run, timer: StepTimer,
                 steps: int) -> tuple[Tensor, float, list[float]]:
    """One epoch of ``steps`` steps (a whole epoch, or the last one cut short): (summed loss
    on the device, wall-clock, per-step times). Counts the steps' example passes into
    ``run.passes``."""
    from .tasks import cross_entropy_output, per_sample_cross_entropy

    cfg, device = run.cfg, run.device
    # SAF, MESA and the rules of the label margin read the logits; a method with a memory,
    # the examples' ids (global positions in the training set, also under DDP).
    loss_fn = per_sample_cross_entropy if run.engine.plan.term is None \
        and not run.engine.plan.needs_logits else cross_entropy_output
    with_ids = run.engine.plan.memory is not None
    order = torch.randperm(len(run.train_x), device=device, generator=run.data_gen)
    if run.world > 1:
        per_rank = len(run.train_x) // run.world
        order = order[run.rank:per_rank * run.world:run.world]
    loss_sum = torch.zeros((), device=device)
    _synchronize(device)
    t0 = time.perf_counter()
    timer.mark()
    sharp = []
    for i in range(steps):
        idx = order[i * cfg.batch_size:(i + 1) * cfg.batch_size]
        xb, yb = run.train_x[idx], run.train_y[idx]
        if run.task.augment is not None:
            xb = run.task.augment(xb, run.data_gen)
        batch = IndexedBatch((xb, yb), idx) if with_ids else (xb, yb)
        result = run.engine.step(batch, loss_fn)
        loss_sum += result.raw_loss  # no host sync on the fast path
        sharp.append(result.sharp)
        run.scheduler.step()
        timer.mark()
    _synchronize(device)
    elapsed = time.perf_counter() - t0
    if run.passes is not None:  # outside the clock
        first = run.engine.steps - steps
        run.passes += sum(step_rows(run.engine.plan, cfg.batch_size, first + i, s,
                                    micro_batch_size=cfg.micro_batch_size).passes
                          for i, s in enumerate(sharp))
    return loss_sum, elapsed, timer.step_times()


def _epoch_row(run: _Run, epoch: int, loss_sum: Tensor, epoch_time: float,
               train_time: float, steps: list[float], count: int) -> dict[str, Any]:
    """Evaluate (outside the clock; every ``eval_every`` epochs and after the last) and
    return the epoch's metrics."""
    test_loss = test_acc = None
    if (epoch + 1) % run.cfg.eval_every == 0 or epoch + 1 == run.cfg.epochs:
        if run.world > 1:  # DDP wraps the model, FSDP2 shards it in place: both sync buffers
            from .. import distributed

            distributed.sync_buffers(run.net)
        test_loss, test_acc = evaluate(run.model, run.test_x, run.test_y, 1024,
                                       PRECISIONS[run.cfg.precision])
    return {
        "epoch": epoch + 1,
        "train_loss": float(loss_sum) / count,
        "test_loss": test_loss,
        "test_acc": test_acc,
        "epoch_time": epoch_time,
        "train_time": train_time,
        "step_time_median": statistics.median(steps) if steps else float("nan"),
        "steps": epoch * run.steps_per_epoch + count,
        "passes": run.passes,
        "skipped_steps": run.engine.skipped_steps,
        "lr": float(run.scheduler.get_last_lr()[0]),
    }


def _gathered_state(run: _Run) -> dict[str, Any] | None:
    """FSDP2 across ranks: the whole tensors of model, optimizer and engine state, gathered
    through torch.distributed.checkpoint (a collective: every rank calls it). Else None."""
    if not (run.cfg.fsdp and run.world > 1):
        return None
    from .. import distributed

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


def resume_point(out_dir: Path) -> Path:
    """What a resumed run in ``out_dir`` starts from: its checkpoint, else the
    ``config.json`` of a run interrupted before its first checkpoint (which then starts
    from scratch). FileNotFoundError when there is neither. ValueError when the checkpoint
    is missing but the folder shows that the run got further (``metrics.jsonl`` is
    written only after a checkpoint; a link to a checkpoint that is gone): starting from
    scratch would train those epochs again in silence."""
    ckpt, config = checkpoint_path(out_dir), Path(out_dir) / "config.json"
    metrics = Path(out_dir) / "metrics.jsonl"
    if ckpt.is_symlink() and not ckpt.exists():
        raise ValueError(f"{ckpt} is a link to {os.readlink(ckpt)}, which is gone: restore "
                         "the checkpoint to resume, or give --overwrite to start over")
    if ckpt.exists():
        return ckpt
    if metrics.exists() or metrics.is_symlink():
        raise ValueError(f"{ckpt} is missing, but {metrics} shows {_epochs_in(metrics)} "
                         "finished: resuming would train the run again from scratch; "
                         "restore the checkpoint, or give --overwrite to start over")
    if config.exists():
        return config
    raise FileNotFoundError(f"no checkpoint to resume from at {ckpt} (nor the config.json "
                            "of a run interrupted before its first checkpoint)")


def _epochs_in(metrics: Path) -> str:
    try:
        count = sum(1 for line in metrics.read_text().splitlines() if line.strip())
    except (OSError, UnicodeDecodeError):
        return "the run's progress"
    return f"{count} epoch{'s' if count != 1 else ''}"


#: Fields every ``config.json`` of a ksam run has.
_RUN_FIELDS = ("task", "method", "seed")


def saved_run_config(point: Path) -> dict[str, Any]:
    """The configuration a run was saved with, from its checkpoint (verified) or its
    ``config.json`` (a :func:`resume_point`). ValueError for a damaged file, or a
    ``config.json`` that is not a ksam run's."""
    point = Path(point)
    if point.name != "config.json":
        return load_checkpoint(point)["config"]
    try:
        saved = json.loads(point.read_text())
    except ValueError:
        saved = None
    if not isinstance(saved, dict) or any(k not in saved for k in _RUN_FIELDS):
        raise ValueError(f"{point} is not the configuration of a ksam run (it lacks "
                         f"{', '.join(_RUN_FIELDS)}): damaged, or not written by ksam")
    return saved


def _resume(run: _Run, out_dir: Path) -> list[dict[str, Any]]:
    """Check what ``out_dir`` holds against the run and restore it; the history so far.
    ValueError (nothing written) for a folder or checkpoint that does not continue the
    run."""
    check_folder_command(Path(out_dir), "train")
    check_own_outputs(Path(out_dir), "train")
    point = resume_point(out_dir)
    if point.name == "config.json":  # no checkpoint yet: the same run starts from scratch
        check_resumable(run.cfg, saved_run_config(point), point)
        return []
    ckpt = load_checkpoint(point)
    check_resumable(run.cfg, ckpt["config"], point)
    if ckpt["epoch"] > run.cfg.epochs:
        raise ValueError(f"{point} holds epoch {ckpt['epoch']} of a run of "
                         f"{run.cfg.epochs} epochs")
    _check_metrics(Path(out_dir) / "metrics.jsonl", ckpt["history"], point)
    _check_weights(run.model, ckpt["model"], point)
    try:
        _restore(run, ckpt)
    except (RuntimeError, KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{point} does not fit this run: {exc}") from None
    return ckpt["history"]


def _check_metrics(metrics: Path, history: list[dict[str, Any]], point: Path) -> None:
    """ValueError unless ``metrics.jsonl`` (when there) agrees with the checkpoint's
    history: the same rows, or all but the last (a run stopped between writing its
    checkpoint and its metrics)."""
    if not metrics.exists():
        return
    try:
        lines = [line for line in metrics.read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{metrics} cannot be read: {exc}") from None
    rows = [json.dumps(r) for r in history]
    if lines != rows[:len(lines)] or len(lines) < len(rows) - 1:
        raise ValueError(f"{metrics} ({len(lines)} epochs) does not agree with the history "
                         f"of {point} ({len(rows)} epochs): one of them is not this run's")


def _check_weights(model: torch.nn.Module, weights: dict[str, Any], point: Path) -> None:
    """ValueError unless ``weights`` has the entries of ``model``'s ``state_dict``, each
    with its shape and dtype."""
    mine = model.state_dict()
    if set(weights) != set(mine):
        odd = sorted(set(weights) ^ set(mine))[:3]
        raise ValueError(f"{point} holds the weights of another model ({', '.join(odd)})")
    for key, t in mine.items():
        saved = weights[key]
        if not isinstance(saved, Tensor) or saved.shape != t.shape or saved.dtype != t.dtype:
            raise ValueError(f"{point} holds the weights of another model: {key} is "
                             f"{list(getattr(saved, 'shape', []))} "
                             f"{getattr(saved, 'dtype', type(saved).__name__)}, the model's "
                             f"{list(t.shape)} {t.dtype}")


def train(cfg: TrainConfig, *, out_dir: Path | None = None, resume: bool = False,
          overwrite: bool = False, task: Any = None,
          on_epoch: Callable[[dict[str, Any]], None] | None = None,
          dist_info: Any = None) -> dict[str, Any]:
    """Train one run. Returns ``{"config", "epochs": [per-epoch metrics], "final": {...}}``.

    With ``out_dir``, writes ``config.json``, ``metrics.jsonl`` (one line per epoch) and, at
    the end of every epoch, a checksummed ``checkpoint.pt``, all atomically, holding the
    folder's lock meanwhile (:func:`open_output`). A folder with results is refused unless
    ``resume`` or ``overwrite`` (which removes what ksam wrote there first). ``resume=True``
    continues from the checkpoint (verified first) and ends with the same weights as an
    uninterrupted run on the same device; a run interrupted before its first checkpoint
    (its folder holds only its ``config.json``) starts from scratch. Resuming refuses
    another configuration, ``fast`` included (the engine refuses a state saved with the
    other ``fast_path``). Everything (data, configuration, checkpoint) is checked before the
    first write.
    """
    from .tasks import get_task

    if resume and overwrite:
        raise ValueError("resume and overwrite exclude each other")
    if resume and out_dir is None:
        raise ValueError("resume needs out_dir: the folder of the run to continue")
    cfg.validate()
    if task is None:
        task = get_task(cfg.task, device=resolve_device(cfg.device), seed=cfg.seed,
                        **cfg.task_options)
    run = _setup(cfg, task, dist_info)
    history = _resume(run, out_dir) if resume else []
    folder = _open_on_rank_zero(run, out_dir, resume, overwrite)
    try:
        if folder is not None and not history:
            folder.write_text("config.json", json.dumps(run.cfg.to_dict(), indent=2))
        try:
            _train_epochs(run, history, folder, on_epoch, saving=out_dir is not None)
        except WriteError as exc:
            raise exc.with_note(f"every file in {out_dir} is as it was before that write "
                                "(files are replaced atomically): make room and continue "
                                "the run with --resume (resume=True)") from exc
    finally:
        if folder is not None:
            folder.close()
    final = dict(history[-1]) if history else {}
    final["fast_path"] = run.engine.fast_path_active
    return {"config": run.cfg.to_dict(), "epochs": history, "final": final,
            "model": run.model}


def _open_on_rank_zero(run: _Run, out_dir: Path | None, resume: bool,
                       overwrite: bool) -> OutputFolder | None:
    """Rank 0 opens the output folder; under torchrun every rank learns whether it could, so
    that a refused folder fails all ranks at once instead of leaving the others waiting in
    the first collective."""
    if out_dir is None:
        return None
    folder, error = None, None
    if run.rank == 0:
        try:
            folder = open_output(out_dir, "train", resume=resume, overwrite=overwrite)
        except Exception as exc:  # re-raised below, after the other ranks heard of it
            error = exc
    if run.world > 1:
        from ..params import all_ranks_true

        ok = all_ranks_true(torch.tensor(error is None, device=run.device))
        if not bool(ok) and error is None:
            raise RuntimeError(f"rank 0 could not open the output folder {out_dir}")
    if error is not None:
        raise error
    return folder


def _train_epochs(run: _Run, history: list[dict[str, Any]], folder: OutputFolder | None,
                  on_epoch: Callable[[dict[str, Any]], None] | None, *, saving: bool) -> None:
    """The epochs after ``history`` (appended to it), written to ``folder`` (rank 0's) after
    each when ``saving``."""
    timer = StepTimer(run.device)
    train_time = history[-1]["train_time"] if history else 0.0
    if history:
        run.passes = history[-1].get("passes")
    for epoch in range(len(history), run.cfg.epochs):
        count = run.steps_in(epoch)
        loss_sum, epoch_time, steps = _train_epoch(run, timer, count)
        train_time += epoch_time
        history.append(_epoch_row(run, epoch, loss_sum, epoch_time, train_time, steps,
                                  count))
        # FSDP2: every rank takes part in gathering the shards; rank 0 writes them.
        sharded = _gathered_state(run) if saving else None
        if folder is not None:  # the checkpoint first: the metrics never run ahead of it
            metrics = folder.record("metrics.jsonl")
            save_checkpoint(_checkpoint_state(run, history, sharded),
                            folder.record("checkpoint.pt"))
            atomic_write_text(metrics, "".join(json.dumps(r) + "\n" for r in history))
        if on_epoch is not None:
            on_epoch(history[-1])
