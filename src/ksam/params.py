r"""The parameter set: the tensors a step perturbs, restores, measures and clips.

:class:`ParameterSet` is the one place of the engine that knows how parameters are laid out
over processes:

- **Unsharded** (one process, or DistributedDataParallel): every tensor is whole.
- **FSDP2** (``torch.distributed.fsdp.fully_shard``): every parameter (and, after a
  backward, its gradient) is a :class:`~torch.distributed.tensor.DTensor` whose local tensor
  holds this rank's rows. Saving and restoring w, adding eps, scaling a gradient and the
  finiteness check are elementwise, so they run on the local tensors (plain tensors: torch's
  foreach kernels, no DTensor dispatch; ``_foreach_copy_`` has no DTensor rule at all). The
  only cross-shard quantity is a norm: the squared local norms are summed over the ranks that
  hold the shards (one all-reduce of one float), which is :math:`\lVert g\rVert_2` of the
  whole, unsharded gradient. The optimizer still steps on the DTensor parameters, so its
  state is sharded like them.

Every rule that takes a norm (SAM's, ASAM's, ESAM's, MSAM's perturbation, LookSAM's
transform) gets it from :meth:`ParameterSet.norm`, so under FSDP2 each is the norm over all
shards. Under DDP with a per-rank perturbation the ranks' ascent gradients differ; a rule
that keeps a vector derived from one (LookSAM's v) averages it over the replicas with
:meth:`ParameterSet.mean_over_replicas_` so that the replicas keep stepping alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

try:  # DTensor is public from torch 2.4 on
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # pragma: no cover - older torch or a build without distributed
    DTensor = Replicate = Shard = None  # type: ignore[assignment,misc]

__all__ = ["ParameterSet", "Sharding", "is_ddp", "is_dtensor", "local", "sharded_norm",
           "all_ranks_true"]


def is_dtensor(t: Any) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local(t: Tensor) -> Tensor:
    """The local shard of a DTensor (the same storage: in-place writes go to the parameter),
    or ``t`` itself."""
    return t._local_tensor if is_dtensor(t) else t


class Scratch:
    """Buffers shaped like given tensors, kept per key tensor and made again only when its
    shape, dtype or device changes: a step that needs room per parameter allocates
    nothing once the first step has made it."""

    def __init__(self) -> None:
        self._buffers: dict[int, Tensor] = {}

    def like(self, tensors: list[Tensor], keys: list[Tensor] | None = None) -> list[Tensor]:
        """One buffer per tensor of ``tensors``, of its shape, dtype and device, kept for
        the tensor of ``keys`` at the same position (by default, for the position)."""
        out = []
        for i, t in enumerate(tensors):
            key = i if keys is None else id(keys[i])
            buf = self._buffers.get(key)
            if buf is None or buf.shape != t.shape or buf.device != t.device \
                    or buf.dtype != t.dtype:
                buf = self._buffers[key] = torch.empty_like(t)
            out.append(buf)
        return out

    def __iter__(self):
        return iter(self._buffers.values())

    def __getitem__(self, key: Tensor) -> Tensor:
        return self._buffers[id(key)]


def is_ddp(model: nn.Module) -> bool:
    """Whether ``model`` is wrapped for DistributedDataParallel (it has ``no_sync``)."""
    return hasattr(model, "no_sync")


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def sharded_norm(local_norms: list[Tensor], group: Any = None) -> Tensor:
    r""":math:`\sqrt{\sum_r \sum_i \lVert t_{i,r}\rVert^2}` from this rank's
    :math:`\lVert t_{i,r}\rVert` (fp32, summed over ``group`` in one all-reduce)."""
    sq = torch.stack([n.float() for n in local_norms]).square().sum()
    if _initialized():
        dist.all_reduce(sq, group=group)
    return sq.sqrt()


def all_ranks_true(flag: Tensor, group: Any = None) -> Tensor:
    """Logical AND of a 0-d bool ``flag`` over all ranks of ``group`` (one all-reduce of one
    float); ``flag`` itself without a process group."""
    if not _initialized():
        return flag
    value = flag.detach().to(torch.float32).reshape(1)
    dist.all_reduce(value, op=dist.ReduceOp.MIN, group=group)
    return value[0] > 0.5


@dataclass(frozen=True)
class Sharding:
    """How FSDP2 shards a model's parameters: the process group of the mesh dimension they
    are sharded along (other dimensions, as in HSDP, hold replicas)."""

    group: Any

    @classmethod
    def of(cls, params: list[Tensor]) -> Sharding | None:
        """The sharding of ``params`` (None when none is a DTensor). ValueError when only some
        are, or when they are not sharded along exactly one mesh dimension of one mesh."""
        sharded = [p for p in params if is_dtensor(p)]
        if not sharded:
            return None
        if len(sharded) != len(params):
            raise ValueError(
                f"{len(params) - len(sharded)} of the optimizer's parameters are not sharded: "
                "call fully_shard on the root module too (ksam.distributed.wrap(..., "
                "fsdp=True) does)")
        mesh = sharded[0].device_mesh
        placements = sharded[0].placements
        for p in sharded:
            if p.device_mesh != mesh:
                raise ValueError("the parameters live on different device meshes")
            if len(p.placements) != len(placements) or any(
                    isinstance(a, Shard) != isinstance(b, Shard)
                    for a, b in zip(p.placements, placements)):
                raise ValueError("the parameters are sharded along different mesh dimensions")
        shard_dims = [i for i, pl in enumerate(placements) if isinstance(pl, Shard)]
        other = [pl for pl in placements if not isinstance(pl, (Shard, Replicate))]
        if len(shard_dims) != 1 or other:
            raise ValueError(f"ksam supports parameters sharded along one mesh dimension "
                             f"(FSDP2 / HSDP), got placements {placements}")
        return cls(mesh.get_group(shard_dims[0]))


class ParameterSet:
    """The optimizer's parameters (in its order), with the arithmetic a step does on them.

    Args:
        model: the model the optimizer's parameters must belong to.
        optimizer: the base optimizer.
        replica_group: the process group whose ranks hold replicas of the weights that may
            have perturbed differently (DDP with a per-rank perturbation); ``None``: the
            replicas' perturbations agree, or there are none.

    ValueError for an optimizer without parameters, with only frozen ones, or with
    parameters that are not the model's.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *,
                 replica_group: Any = None) -> None:
        params = [p for g in optimizer.param_groups for p in g["params"]]
        if not params:
            raise ValueError("the optimizer holds no parameters")
        if not any(p.requires_grad for p in params):
            raise ValueError(f"all {len(params)} parameter(s) of the optimizer are frozen "
                             "(requires_grad=False): there is nothing to train")
        known = {id(p) for p in model.parameters()}
        foreign = [p for p in params if id(p) not in known]
        if foreign:
            raise ValueError(
                f"the optimizer holds {len(foreign)} parameter(s) that are not the model's: "
                "build it over model.parameters()")
        #: the optimizer's parameters, in its order (DTensors under FSDP2)
        self.params: list[Tensor] = params
        # The groups' parameter lists as they were (held, so that no other list can take
        # one's id) and their lengths: what :meth:`follows` compares.
        self._lists = [(g["params"], len(g["params"])) for g in optimizer.param_groups]
        self._model = model
        #: FSDP2's sharding of the parameters (None: whole tensors)
        self.sharding = Sharding.of(params)
        self.replica_group = replica_group
        self._saved = Scratch()
        self._restore_to: list[Tensor] = []

    def follows(self, optimizer: torch.optim.Optimizer) -> bool:
        """Whether ``optimizer``'s param groups still hold the parameter lists this set was
        made from, of the same lengths (False after ``add_param_group``). One look per
        group: no walk over the parameters."""
        groups = optimizer.param_groups
        return len(groups) == len(self._lists) and all(
            g["params"] is held and len(held) == n for g, (held, n) in zip(groups, self._lists))

    # ------------------------------------------------------------------------ views
    @property
    def sharded(self) -> bool:
        return self.sharding is not None

    def local(self, tensors: list[Tensor]) -> list[Tensor]:
        """The local shards of FSDP2's DTensors (the tensors themselves when unsharded)."""
        return tensors if self.sharding is None else [local(t) for t in tensors]

    def trainable(self) -> list[Tensor]:
        """The parameters that take gradients now (``requires_grad``), in order."""
        return [p for p in self.params if p.requires_grad]

    def with_grad(self) -> tuple[list[Tensor], list[Tensor]]:
        """(local parameters, their local gradients) for every parameter with a gradient."""
        params = [p for p in self.params if p.grad is not None]
        return self.local(params), self.local([p.grad for p in params])

    def zero_grad(self) -> None:
        """Drop the gradients of every trainable parameter of the model."""
        for p in self._model.parameters():
            if p.requires_grad:
                p.grad = None

    # --------------------------------------------------------------------- save, restore
    def save(self, params: list[Tensor]) -> None:
        """Copy the local tensors ``params`` aside (into buffers made once) for
        :meth:`restore`."""
        torch._foreach_copy_(self._saved.like(params, keys=params), params)
        self._restore_to = params

    def restore(self) -> None:
        """Copy the last :meth:`save` back bit for bit (never eps subtracted: it would not
        round-trip); nothing when nothing was saved since the last restore."""
        if not self._restore_to:
            return
        params, self._restore_to = self._restore_to, []
        with torch.no_grad():
            torch._foreach_copy_(params, [self._saved[p] for p in params])

    # ------------------------------------------------------------------------- norms
    def norm(self, tensors: list[Tensor]) -> Tensor:
        """The L2 norm over local tensors ``tensors``, on their device, without a host sync;
        under FSDP2 over all shards (one all-reduce)."""
        if not tensors:
            zero = torch.zeros((), device=self._device())
            return zero if self.sharding is None else sharded_norm([zero], self.sharding.group)
        return self.norm_of(torch._foreach_norm(tensors))

    def norm_of(self, norms: list[Tensor], stacked: Tensor | None = None) -> Tensor:
        """The global L2 norm from per-tensor L2 norms of local tensors (``stacked``: the
        same norms as one fp32 tensor, when the caller has made it)."""
        if self.sharding is not None:
            return sharded_norm(norms, self.sharding.group)
        if stacked is None:
            stacked = torch.stack([_fp32(n) for n in norms])
        return torch.linalg.vector_norm(stacked)

    def sum_over_shards(self, value: Tensor) -> Tensor:
        """A 0-d sum of per-element terms of local tensors (a dot product), summed over all
        shards under FSDP2 (one all-reduce); ``value`` itself when unsharded."""
        if self.sharding is not None and _initialized():
            value = value.clone()
            dist.all_reduce(value, group=self.sharding.group)
        return value

    def mean_over_replicas_(self, tensor: Tensor) -> Tensor:
        """Average ``tensor`` in place over :attr:`replica_group`'s ranks (no-op without
        one): for state derived from a per-rank ascent gradient."""
        if self.replica_group is not None and _initialized():
            dist.all_reduce(tensor, group=self.replica_group)
            tensor.div_(dist.get_world_size(self.replica_group))
        return tensor

    @staticmethod
    def clip_(grads: list[Tensor], norm: Tensor, max_norm: float) -> None:
        """Scale ``grads`` to a global norm of at most ``max_norm`` (on the device, no sync;
        ``torch.nn.utils.clip_grad_norm_``'s rule and epsilon). A non-finite norm makes the
        gradients non-finite too; such a step is skipped anyway."""
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        torch._foreach_mul_(grads, coef)  # a 0-d fp32 factor keeps each gradient's dtype

    def _device(self) -> torch.device:
        return local(self.params[0]).device


def _fp32(t: Tensor) -> Tensor:
    # Cast only what is not fp32: each no-op .float() is still a trip through the dispatcher.
    return t if t.dtype == torch.float32 else t.float()
