r"""Parameters sharded by FSDP2 (:func:`torch.distributed.fsdp.fully_shard`): the engine's
per-parameter arithmetic on the local shards, with global norms over all shards.

Under ``fully_shard`` every parameter (and, after a backward, its gradient) is a
:class:`~torch.distributed.tensor.DTensor` whose local tensor holds this rank's rows. Saving
and restoring w, adding eps, scaling a gradient and the finiteness check are elementwise, so
the engine runs them on the local tensors (plain tensors: torch's foreach kernels, no DTensor
dispatch; ``_foreach_copy_`` has no DTensor rule at all). The only cross-shard quantity is a
norm: the squared local norms are summed over the ranks that hold the shards (one
all-reduce of one float), which is :math:`\lVert g\rVert_2` of the whole, unsharded gradient.

The optimizer still steps on the DTensor parameters, so its state is sharded like them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

try:  # DTensor is public from torch 2.4 on
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # pragma: no cover - older torch or a build without distributed
    DTensor = Replicate = Shard = None  # type: ignore[assignment,misc]


def is_dtensor(t: Any) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local(t: Tensor) -> Tensor:
    """The local shard of a DTensor (the same storage: in-place writes go to the parameter),
    or ``t`` itself."""
    return t._local_tensor if is_dtensor(t) else t


@dataclass(frozen=True)
class Sharding:
    """How a model's trainable parameters are sharded: ``group`` is the process group over
    which their shards are spread (a norm sums its squares over it)."""

    group: Any

    @classmethod
    def of(cls, params: list[Tensor]) -> Sharding | None:
        """The sharding of ``params`` (None when none is a DTensor). ValueError when only some
        are, or when they are not sharded along exactly one mesh dimension of one mesh (other
        mesh dimensions, as in HSDP, must be replicas)."""
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

    def local(self, tensors: list[Tensor]) -> list[Tensor]:
        return [local(t) for t in tensors]

    def norm(self, local_norms: list[Tensor]) -> Tensor:
        """The global L2 norm from the L2 norms of the local shards: one all-reduce."""
        return sharded_norm(local_norms, self.group)


def sharded_norm(local_norms: list[Tensor], group: Any = None) -> Tensor:
    r""":math:`\sqrt{\sum_r \sum_i \lVert t_{i,r}\rVert^2}` from this rank's
    :math:`\lVert t_{i,r}\rVert` (fp32, summed over ``group`` in one all-reduce)."""
    sq = torch.stack([n.float() for n in local_norms]).square().sum()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(sq, group=group)
    return sq.sqrt()
