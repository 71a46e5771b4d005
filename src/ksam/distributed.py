r"""Data-parallel training with :class:`torch.nn.parallel.DistributedDataParallel` (DDP).

The step engine runs unchanged on a DDP-wrapped model; this module adds the launch
plumbing and the cross-rank selection rule. Two independent choices, with their defaults:

**Perturbation** (the engine's ``sync_perturbation``):

- *per-rank* (default, ``sync_perturbation=False``): each rank perturbs its weights with its
  own ascent gradient :math:`\epsilon_r = \rho\, g_r/\lVert g_r\rVert`, computed on its own
  subset. The ascent forward and backward run under ``model.no_sync()``, so the ascent pass
  sends nothing. This is SAM's *m-sharpness* with m = per-rank batch, the setting Foret et
  al. used and found to generalize better than a global perturbation.
- *synchronized* (``sync_perturbation=True``): DDP's bucketed all-reduce averages the ascent
  gradient too, so every rank applies the same :math:`\epsilon` - a single-process step on
  the global batch, at the price of one more all-reduce of the gradient per step.

**Selection** (K-SAM, Ordered SGD):

- *local top-K* (default, the stock :class:`~ksam.selection.TopLoss`): each rank takes the
  top-K of its own batch; no communication.
- *global top-K* (:class:`GlobalTopLoss`, or ``create(..., selection="global")``): the
  per-sample losses of all ranks are all-gathered (one all-gather of the global batch's B
  floats per step, shared by the ascent and descent rules), the top K of the global batch
  is taken (ties broken by the lower global index, rank-major), and every rank computes on
  its own rows that made the cut. Each rank's pass backpropagates
  :math:`\frac{W}{K}\sum_{i \in S_r} l_i` (W ranks, :math:`S_r` this rank's selected rows),
  so DDP's gradient *average* is the mean over the global selection:
  :math:`\frac{1}{W}\sum_r \frac{W}{K}\sum_{i\in S_r}\nabla l_i
  = \frac{1}{K}\sum_{i \in S}\nabla l_i`.

The descent gradient is always averaged by DDP's own all-reduce; nothing here loops over
parameters. With synchronized perturbation and global top-K, W ranks with batch b step
exactly as one process with batch W*b (up to float summation order).

**BatchNorm buffers.** By default DDP broadcasts rank 0's buffers at the start of a forward
(``broadcast_buffers=True``, ``forward_sync_buffers`` from torch 2.13), namely at the first
forward after a synchronized backward: for SAM that is the ascent forward, so per-rank
perturbation would no longer be communication-free. :func:`wrap` therefore builds DDP
without forward buffer sync; each rank keeps its own running statistics, and
:func:`sync_buffers` averages (or broadcasts) them in one collective before evaluation or a
checkpoint. ``SyncBatchNorm`` communicates in every training-mode forward, the ascent
included; use it only with synchronized perturbation, if at all.

**Skipped steps.** A step whose loss or gradient is not finite is skipped; under DDP and
FSDP2 the engine all-reduces that verdict (one float) so that all ranks skip together and
their weights never drift apart. Any engine built over a DDP or FSDP2 model does this
(``ksam.KSAM(DistributedDataParallel(model), optimizer)`` as well as :func:`create`).

**Rules with state** keep the replicas identical too: LookSAM's stored direction, derived
from each rank's own ascent gradient under the per-rank perturbation, is averaged over the
ranks on its SAM steps (:mod:`ksam.transform`).

**FSDP2.** :func:`wrap` with ``fsdp=True`` (or :func:`fully_shard`) shards the model with
``torch.distributed.fsdp.fully_shard`` instead; the engine then runs its elementwise
arithmetic on the local shards and sums every norm over the shards (:mod:`ksam.params`), so
the perturbation is the one a single process computes; the ascent gradient is always
synchronized (each rank holds only its shard of it). :func:`state_dict` /
:func:`load_state_dict` checkpoint through ``torch.distributed.checkpoint``.

Launch with ``torchrun`` (see ``docs/guide/distributed.md``)::

    info = ksam.distributed.setup()                 # reads RANK, WORLD_SIZE, LOCAL_RANK
    model = ksam.distributed.wrap(model, info.device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = ksam.distributed.create("ksam", model, opt, k=0.25, selection="global")
    for epoch in range(epochs):
        x, y = ksam.distributed.shard((x_all, y_all), seed=0, epoch=epoch)
        ...
    ksam.distributed.cleanup()
"""

from __future__ import annotations

import copy
import inspect
import math
import os
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from .batch import Batch, batch_device, batch_size, index_batch
from .engine import Method
from .methods import create as _create_method
from .params import all_ranks_true, is_dtensor
from .selection import (
    Selection,
    SelectionContext,
    SelectionRule,
    TopLoss,
    top_indices,
)

__all__ = [
    "DEFAULT_TIMEOUT", "DistInfo", "setup", "init_from_env", "cleanup", "barrier",
    "is_distributed", "is_main_process", "get_rank", "get_world_size", "wrap", "unwrap",
    "sync_buffers", "shard_indices", "shard", "GlobalTopLoss", "use_global_selection",
    "create", "all_ranks_true", "finite_reducer", "TIMEOUT_ENV", "resolve_timeout",
    "fsdp_available", "fully_shard", "is_fsdp", "state_dict", "load_state_dict",
]

#: Default time a collective may wait for the other ranks before failing.
DEFAULT_TIMEOUT = timedelta(minutes=10)
#: Environment variable with the default of :func:`setup`'s ``timeout``, in seconds.
TIMEOUT_ENV = "KSAM_DIST_TIMEOUT"


# ------------------------------------------------------------------------ process group
@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: its global rank, the world size, its rank on the node,
    the device it trains on and the backend (``None`` when running as a single process)."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(env: Mapping[str, str], name: str, default: int) -> int:
    value = env.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def resolve_timeout(timeout: float | timedelta | None,
                  env: Mapping[str, str] | None = None) -> timedelta:
    """``timeout`` as a timedelta; ``None``: the environment's :data:`TIMEOUT_ENV` (seconds)
    if set, else :data:`DEFAULT_TIMEOUT`."""
    if timeout is None:
        value = (env if env is not None else os.environ).get(TIMEOUT_ENV, "")
        if value.strip() == "":
            return DEFAULT_TIMEOUT
        try:
            seconds = float(value)
        except ValueError:
            raise ValueError(f"environment variable {TIMEOUT_ENV}={value!r} is not a number "
                             "of seconds") from None
        if not (math.isfinite(seconds) and seconds > 0):
            raise ValueError(f"environment variable {TIMEOUT_ENV}={value!r} must be a positive "
                             "number of seconds")
        return timedelta(seconds=seconds)
    if isinstance(timeout, timedelta):
        if not timeout.total_seconds() > 0:
            raise ValueError(f"timeout must be positive, got {timeout!r}")
        return timeout
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) \
            or not (math.isfinite(float(timeout)) and float(timeout) > 0):
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    return timedelta(seconds=float(timeout))


def setup(
    backend: str | None = None,
    *,
    timeout: float | timedelta | None = None,
    device: str | torch.device | None = None,
    env: Mapping[str, str] | None = None,
) -> DistInfo:
    """Initialize the default process group from torchrun's environment and pick a device.

    Reads ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` (and, through ``env://``,
    ``MASTER_ADDR`` / ``MASTER_PORT``). Without them, or with ``WORLD_SIZE=1``, nothing is
    initialized and a single-process :class:`DistInfo` comes back, so one script runs both
    ways.

    Args:
        backend: ``"nccl"`` or ``"gloo"``; default nccl when training on CUDA, else gloo.
        timeout: how long a collective waits for the other ranks before raising (seconds
            or a timedelta; default: the environment variable ``KSAM_DIST_TIMEOUT``
            (seconds) if set, else :data:`DEFAULT_TIMEOUT`, 10 minutes). A rank that
            crashes or stalls then makes the others fail instead of hanging. (NCCL honours
            it through its watchdog, on by default: ``TORCH_NCCL_ASYNC_ERROR_HANDLING``.)
        device: the training device; default ``cuda:LOCAL_RANK`` if CUDA is available
            (made the current CUDA device), else the CPU.
        env: the environment to read (default ``os.environ``).

    Idempotent: if the default group already exists, only the device is resolved.
    """
    env = os.environ if env is None else env
    timeout_td = resolve_timeout(timeout, env)
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        backend = str(dist.get_backend())
        local_rank = _env_int(env, "LOCAL_RANK", rank)
    else:
        world = _env_int(env, "WORLD_SIZE", 1)
        rank = _env_int(env, "RANK", 0)
        local_rank = _env_int(env, "LOCAL_RANK", 0)
        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"invalid RANK={rank} / WORLD_SIZE={world}")

    if device is None:
        wants_cuda = backend == "nccl" or (backend is None and torch.cuda.is_available())
        if wants_cuda:
            count = torch.cuda.device_count()
            if count == 0:
                raise RuntimeError("backend 'nccl' needs CUDA, but no GPU is visible")
            if local_rank >= count:
                raise RuntimeError(
                    f"LOCAL_RANK={local_rank} but only {count} GPU(s) are visible: "
                    "start at most one process per GPU (torchrun --nproc-per-node)"
                )
            dev = torch.device("cuda", local_rank)
        else:
            dev = torch.device("cpu")
    else:
        dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)

    if world == 1 or (dist.is_available() and dist.is_initialized()):
        return DistInfo(rank, world, local_rank, dev, backend if world > 1 else None)

    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not env.get(k)]
    if missing:
        raise RuntimeError(
            f"WORLD_SIZE={world} but {', '.join(missing)} is not set: launch with torchrun"
        )
    backend = backend or ("nccl" if dev.type == "cuda" else "gloo")
    kwargs: dict[str, Any] = {}
    if dev.type == "cuda" and "device_id" in inspect.signature(dist.init_process_group).parameters:
        kwargs["device_id"] = dev  # binds the rank to its GPU (eager NCCL init, clean barrier)
    init = f"tcp://{env['MASTER_ADDR']}:{env['MASTER_PORT']}" if env is not os.environ \
        else "env://"
    dist.init_process_group(backend, init_method=init, rank=rank, world_size=world,
                            timeout=timeout_td, **kwargs)
    return DistInfo(rank, world, local_rank, dev, backend)


def init_from_env(**kwargs: Any) -> DistInfo:
    """Alias of :func:`setup`."""
    return setup(**kwargs)


def is_distributed() -> bool:
    """True when a default process group with more than one rank is initialized."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank(group: Any = None) -> int:
    """This process's rank (0 when not distributed)."""
    return dist.get_rank(group) if dist.is_available() and dist.is_initialized() else 0


def get_world_size(group: Any = None) -> int:
    """Number of ranks (1 when not distributed)."""
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    """True on rank 0, and in a single process: the rank that logs and saves checkpoints."""
    return get_rank() == 0


def barrier() -> None:
    """Wait for every rank (no-op when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    if dist.get_backend() == "nccl" and torch.cuda.is_available():
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def cleanup() -> None:
    """Destroy the default process group, if any."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# ------------------------------------------------------------------------------- model
def wrap(model: nn.Module, device: str | torch.device | None = None, *,
         forward_sync_buffers: bool = False, fsdp: bool = False,
         **ddp_kwargs: Any) -> nn.Module:
    """Move ``model`` to ``device`` and wrap it in DDP (returned unwrapped when not
    distributed); with ``fsdp=True`` shard it with FSDP2 instead (:func:`fully_shard`,
    where the keywords go).

    ``forward_sync_buffers=False`` (the default here, not DDP's) keeps DDP from
    broadcasting buffers at the start of forwards, which would otherwise put a broadcast
    into SAM's ascent pass (see the module docstring); use :func:`sync_buffers` before
    evaluating or saving. Other keywords go to DDP (``find_unused_parameters``,
    ``gradient_as_bucket_view``, ``bucket_cap_mb``, ...).
    """
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    model = model.to(dev)
    if not is_distributed():
        if fsdp:
            warnings.warn("wrap(fsdp=True) without a process group of several ranks: the "
                          "model is returned unsharded", stacklevel=2)
        return model
    if fsdp:
        return fully_shard(model, **ddp_kwargs)
    params = inspect.signature(DistributedDataParallel.__init__).parameters
    if "forward_sync_buffers" in params:  # torch >= 2.13; broadcast_buffers is deprecated
        ddp_kwargs.setdefault("forward_sync_buffers", forward_sync_buffers)
    else:
        ddp_kwargs.setdefault("broadcast_buffers", forward_sync_buffers)
    if dev.type == "cuda":
        ddp_kwargs.setdefault("device_ids", [dev.index if dev.index is not None
                                             else torch.cuda.current_device()])
    return DistributedDataParallel(model, **ddp_kwargs)


def fsdp_available() -> bool:
    """Whether this torch has FSDP2 (``torch.distributed.fsdp.fully_shard``, torch >= 2.6)."""
    try:
        from torch.distributed.fsdp import fully_shard as _  # noqa: F401
    except ImportError:
        return False
    return True


def fully_shard(model: nn.Module, *, modules: list[nn.Module] | None = None,
                **fsdp_kwargs: Any) -> nn.Module:
    """Shard ``model`` in place with FSDP2 and return it.

    ``fully_shard`` is applied to each module of ``modules`` (default: every direct child
    that holds parameters; each then all-gathers its own parameters just before its forward
    and frees them after) and to ``model`` itself, which takes the parameters left over.
    Keywords (``mesh``, ``reshard_after_forward``, ``mp_policy``, ...) go to
    :func:`torch.distributed.fsdp.fully_shard`. Call it on every rank, after moving the
    model to its device and before building the optimizer. The engine then computes
    every norm over all shards (see :mod:`ksam.params`).
    """
    if not fsdp_available():
        raise RuntimeError(f"FSDP2 (torch.distributed.fsdp.fully_shard) needs torch >= 2.6, "
                           f"this is {torch.__version__}")
    from torch.distributed.fsdp import fully_shard as _fully_shard

    if modules is None:
        modules = [m for m in model.children() if any(True for _ in m.parameters())]
    for m in modules:
        _fully_shard(m, **fsdp_kwargs)
    return _fully_shard(model, **fsdp_kwargs)


def is_fsdp(model: nn.Module) -> bool:
    """True for a module sharded with FSDP2's ``fully_shard``."""
    if not fsdp_available():
        return False
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def state_dict(engine: Method, *, full: bool = True) -> dict[str, Any]:
    """Model, optimizer and engine state of a (possibly FSDP-sharded) run, through the
    distributed checkpoint API (:func:`torch.distributed.checkpoint.state_dict.get_state_dict`).

    ``{"model": ..., "optimizer": ..., "engine": engine.state_dict(include_optimizer=False)}``.
    ``full=True`` gathers whole tensors on every rank (parameter names as in the unsharded
    model), so the result loads into a single process or another world size; every rank must
    call it (it runs collectives), and one of them saves it. ``full=False`` keeps each
    rank's shards as DTensors, for :func:`torch.distributed.checkpoint.save`. Without
    sharding it is the model's and optimizer's own state_dict.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    model = unwrap(engine.model)
    # cpu_offload would leave the full state on rank 0 only; every rank keeps it here, so that
    # any rank (or all) can load what one of them saved.
    options = StateDictOptions(full_state_dict=full)
    model_state, optim_state = get_state_dict(model, engine.optimizer, options=options)
    return {"model": model_state, "optimizer": optim_state,
            "engine": engine.state_dict(include_optimizer=False)}


def load_state_dict(engine: Method, state: dict[str, Any]) -> None:
    """Load a :func:`state_dict` (full or sharded) into the engine's model and optimizer
    (:func:`torch.distributed.checkpoint.state_dict.set_state_dict`; every rank calls it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    missing = {"model", "optimizer", "engine"} - set(state)
    if missing:
        raise KeyError(f"not a ksam.distributed state_dict: missing {sorted(missing)}")
    full = not any(_has_dtensor(v) for v in state["model"].values())
    set_state_dict(unwrap(engine.model), engine.optimizer,
                   model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=StateDictOptions(full_state_dict=full))
    engine.load_state_dict(state["engine"])


def _has_dtensor(value: Any) -> bool:
    return is_dtensor(value)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (or ``model`` itself)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


@torch.no_grad()
def sync_buffers(model: nn.Module, op: str = "mean", src: int = 0, group: Any = None) -> None:
    """Make the model's buffers (BatchNorm running statistics) equal on all ranks.

    ``op="mean"`` averages floating-point buffers across ranks (integer ones, e.g.
    ``num_batches_tracked``, come from ``src``); ``op="broadcast"`` copies all of them from
    rank ``src``. One collective per dtype, over the flattened buffers. No-op when not
    distributed.
    """
    if op not in ("mean", "broadcast"):
        raise ValueError(f"op must be 'mean' or 'broadcast', got {op!r}")
    if not is_distributed():
        return
    world = dist.get_world_size(group)
    by_dtype: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
    for buf in unwrap(model).buffers():
        by_dtype.setdefault((buf.dtype, buf.device), []).append(buf)
    for (dtype, _), bufs in by_dtype.items():
        flat = torch.cat([b.reshape(-1) for b in bufs])
        if op == "mean" and dtype.is_floating_point:
            dist.all_reduce(flat, group=group)
            flat.div_(world)
        else:
            global_src = dist.get_global_rank(group, src) if group is not None else src
            dist.broadcast(flat, global_src, group=group)
        offset = 0
        for b in bufs:
            b.copy_(flat[offset:offset + b.numel()].view_as(b))
            offset += b.numel()


def finite_reducer(group: Any = None) -> Callable[[Tensor], Tensor]:
    """The engine's ``finite_reducer`` for DDP: :func:`all_ranks_true` over ``group``, so
    that all ranks skip a step together (:func:`create` passes it)."""

    def reduce(flag: Tensor) -> Tensor:
        return all_ranks_true(flag, group)

    return reduce


# -------------------------------------------------------------------------------- data
def shard_indices(n: int, rank: int | None = None, world_size: int | None = None,
                  seed: int = 0, epoch: int = 0, *, shuffle: bool = True,
                  drop_last: bool = False) -> Tensor:
    """This rank's example indices for one epoch, exactly as
    :class:`torch.utils.data.DistributedSampler` orders them.

    Every rank draws the same permutation of ``range(n)`` from ``seed + epoch`` (identity
    order if ``shuffle=False``), pads it to a multiple of the world size by wrapping around
    to its start (or, with ``drop_last``, cuts the tail), and takes the strided slice
    ``perm[rank::world_size]``. All ranks thus get ``ceil(n / W)`` (``floor`` with
    ``drop_last``) indices, each example lands on exactly one rank, and only the few
    padding examples appear twice per epoch. Returns a CPU LongTensor.
    """
    rank = get_rank() if rank is None else int(rank)
    world = get_world_size() if world_size is None else int(world_size)
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"invalid rank={rank} for world_size={world}")
    if n < 1:
        raise ValueError("cannot shard an empty dataset")
    if drop_last and n % world != 0:
        per_rank = math.ceil((n - world) / world)
    else:
        per_rank = math.ceil(n / world)
    total = per_rank * world
    if total == 0:
        raise ValueError(f"{n} examples cannot give every one of {world} ranks one "
                         "with drop_last=True")
    if shuffle:
        g = torch.Generator().manual_seed(int(seed) + int(epoch))
        order = torch.randperm(n, generator=g)
    else:
        order = torch.arange(n)
    if total > n:
        reps = math.ceil(total / n)
        order = order.repeat(reps)[:total]
    else:
        order = order[:total]
    return order[rank:total:world]


def shard(batch: Batch, rank: int | None = None, world_size: int | None = None,
          seed: int = 0, epoch: int = 0, *, shuffle: bool = True,
          drop_last: bool = False) -> Batch:
    """This rank's part of a device-resident dataset (a tensor or a tuple/list/dict of
    tensors sharing the first dimension), in this epoch's shuffled order.

    The rows are :func:`shard_indices` ``(n, rank, world_size, seed, epoch)``, so all ranks
    get the same number of examples (hence of batches: cut them in order, with the same
    batch size, and the last batch is equally short everywhere) and every example is used
    once per epoch up to the wrap padding. ``rank`` / ``world_size`` default to the
    current process group's.
    """
    n = batch_size(batch)
    idx = shard_indices(n, rank, world_size, seed, epoch, shuffle=shuffle,
                        drop_last=drop_last)
    return index_batch(batch, idx.to(batch_device(batch)))


# --------------------------------------------------------------------------- selection
def _all_gather_flat(out: Tensor, local: Tensor, group: Any) -> None:
    """``out = cat(local of every rank)``: ``dist.all_gather_into_tensor``, which torch 2.13
    renamed ``all_gather_single``."""
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, local, group=group)


class GlobalTopLoss(SelectionRule):
    r"""The top-``k`` examples by loss at w over the *global* batch of all ranks.

    Each rank all-gathers the per-sample losses (``dist.all_gather_into_tensor``; every
    rank must step with the same local batch size b, which :func:`shard` guarantees), takes
    the top K of the W*b global losses, ties broken by the lower global index (rank r's
    row i is global index r*b + i), and returns its own rows that made the cut. ``k`` is a
    fraction of the global batch or an int count of it; :meth:`size` is that global K.

    The global choice is made by a :class:`TopLoss` (``inner``, built from ``k``, ``name``
    and ``options`` such as ``warmup`` and ``rescale``) run on the gathered losses, so its
    schedule and its step rescaling apply to the global batch exactly as they would in one
    process on that batch. The selection's ``scale`` makes :meth:`reduce` return
    :math:`\frac{W}{K}\sum_{i\in S_r} l_i` (times ``inner``'s scale, if any), so that DDP's
    gradient average is the mean gradient over the K selected examples of all ranks:
    :math:`\frac{1}{W}\sum_r \frac{W}{K}\sum_{i\in S_r}\nabla l_i
    = \frac{1}{K}\sum_{i\in S}\nabla l_i`. A rank none of whose rows made the cut still
    runs its pass on one row (its local top-1) with weight 0: DDP's all-reduce then sees
    every parameter's gradient on every rank and cannot hang.

    The number of local rows depends on the losses (and reading it syncs with the device),
    unlike the stock rules whose sizes depend on the batch size only. The gathered losses
    are cached in the step's context, so the ascent and descent rules of K-SAM share one
    all-gather. Without an initialized process group the rule is ``inner`` itself.
    """

    needs_scores = True

    def __init__(self, k: float | int, name: str = "k", group: Any = None,
                 **options: Any) -> None:
        self.inner = TopLoss(k, name, **options)
        self.group = group

    @classmethod
    def from_local(cls, rule: TopLoss, group: Any = None) -> GlobalTopLoss:
        """The global counterpart of a :class:`TopLoss`, with all its options."""
        out = cls(rule.k, rule.name, group)
        out.inner = copy.copy(rule)
        return out

    @property
    def k(self) -> float | int:
        return self.inner.k

    @property
    def name(self) -> str:
        return self.inner.name

    def _world(self) -> tuple[int, int]:
        if dist.is_available() and dist.is_initialized():
            return dist.get_world_size(self.group), dist.get_rank(self.group)
        return 1, 0

    def size(self, batch_size: int) -> int:
        """The global K for a local batch of ``batch_size`` on each rank."""
        return self.inner.size(batch_size * self._world()[0])

    def size_at(self, batch_size: int, step: int) -> int:
        """The global K at optimizer step ``step`` (``inner``'s schedule)."""
        return self.inner.size_at(batch_size * self._world()[0], step)

    def _gathered(self, ctx: SelectionContext, world: int) -> Tensor:
        assert ctx.scores is not None
        key = ("ksam.distributed.scores", id(self.group))
        cached = ctx.cache.get(key)
        if cached is not None and cached[0] is ctx.scores:
            return cached[1]
        local = ctx.scores.detach().float().contiguous()
        out = torch.empty(world * local.numel(), dtype=local.dtype, device=local.device)
        _all_gather_flat(out, local, self.group)
        ctx.cache[key] = (ctx.scores, out)
        return out

    def select(self, ctx: SelectionContext) -> Selection:
        """This rank's rows of the global top K, with ``scale`` = ``inner``'s scale times
        ``|S_r| W / K`` (0 for a stand-in row), so that :meth:`reduce` weighs them for
        DDP's gradient average."""
        assert ctx.scores is not None
        n = ctx.batch_size
        world, rank = self._world()
        if world == 1:
            return self.inner.select(ctx)
        gathered = self._gathered(ctx, world)
        top = self.inner.select(SelectionContext(
            batch_size=n * world, device=ctx.device, scores=gathered,
            generator=ctx.generator, step=ctx.step, cache=ctx.cache))  # one sort a step
        lo = rank * n
        mine = top.index[(top.index >= lo) & (top.index < lo + n)] - lo
        if mine.numel() == 0:  # a stand-in row of weight 0 (see the class docstring)
            return Selection(top_indices(ctx.scores, 1),
                             torch.zeros((), dtype=torch.float32, device=ctx.device))
        weight = torch.tensor(mine.numel() * world / top.index.numel(),
                              dtype=torch.float32, device=ctx.device)
        return Selection(mine, weight if top.scale is None else weight * top.scale)

    def __repr__(self) -> str:
        return f"Global{self.inner!r}"


def use_global_selection(engine: Method,
                         group: Any = None) -> Method:
    """Replace the engine's :class:`TopLoss` rules (K-SAM's two, Ordered SGD's one) by
    :class:`GlobalTopLoss` with the same options, in a new step plan (so a plain step's rows
    come from the global rule too); returns the engine."""
    plan = engine.plan
    rules = {name: GlobalTopLoss.from_local(rule, group)
             for name, rule in (("ascent", plan.ascent), ("descent", plan.descent))
             if type(rule) is TopLoss}
    if not rules:
        raise ValueError(f"{engine!r} has no top-K selection to make global "
                         "(selection='global' applies to ksam, ksam-plain and osgd with "
                         "select='top')")
    if not (dist.is_available() and dist.is_initialized()):
        warnings.warn("selection='global' without a process group: one process's top-K is "
                      "the global one", stacklevel=3)
    engine.use_rules(**rules)
    return engine


def _syncs_buffers_in_forward(model: nn.Module) -> bool:
    if not isinstance(model, DistributedDataParallel):
        return False
    flag = getattr(model, "forward_sync_buffers", getattr(model, "broadcast_buffers", False))
    return bool(flag) and any(True for _ in model.module.buffers())


def create(name: str, model: nn.Module, optimizer: torch.optim.Optimizer, *,
           selection: str = "local", group: Any = None,
           **kwargs: Any) -> Method:
    """:func:`ksam.create` for DDP: the method ``name`` with ``selection="local"``
    (default: each rank's own selection) or ``"global"`` (:class:`GlobalTopLoss`: the
    top-K of the whole global batch; K-SAM without ``select`` then selects with ``"top"``,
    since its default rule, ``"auto"``, has no global form).

    Engine options (``sync_perturbation``, ``seed``, ...) pass through; the engine itself
    makes the ranks skip steps together and keeps the replicas identical. Warns when the
    DDP model broadcasts buffers in its forwards while the perturbation is per-rank.
    """
    if selection not in ("local", "global"):
        raise ValueError(f"selection must be 'local' or 'global', got {selection!r}")
    if is_fsdp(model) and selection == "global" and kwargs.get("micro_batch_size") is not None:
        raise ValueError("micro_batch_size with selection='global' is not possible on an "
                         "FSDP-sharded model: each chunk's forward all-gathers the "
                         "parameters, and ranks with different numbers of selected rows "
                         "would run different numbers of chunks")
    if not kwargs.get("sync_perturbation") and not is_fsdp(model) \
            and _syncs_buffers_in_forward(model):
        warnings.warn(
            "this DDP model broadcasts its buffers at the start of forwards, which puts a "
            "broadcast into the per-rank ascent pass; wrap it with "
            "ksam.distributed.wrap(...) (forward_sync_buffers=False) and call "
            "sync_buffers() before evaluation instead", stacklevel=2)
    if selection == "global" and name == "ksam" and kwargs.get("select") is None:
        kwargs["select"] = "top"
    engine = _create_method(name, model, optimizer, **kwargs)
    if selection == "global":
        use_global_selection(engine, group)
    return engine
