"""Batches as nested structures of tensors that share a leading batch dimension.

A batch may be a tensor, or a (nested) tuple / list / dict of tensors. Non-tensor leaves
(strings, ints, None) are carried along unchanged, so that e.g. a Hugging Face batch with a
``return_loss`` flag still works.

*Example identity*: a batch says which training examples it holds by being an
:class:`IndexedBatch` ``(batch, index)``: ``index`` a 1-D integer tensor of the examples'
positions in the training set (0 <= id < N; under DDP the global position, not the rank's).
The engine slices it with every other tensor (subsets, micro-batches,
:func:`ksam.distributed.shard`) and unwraps it before calling ``loss_fn``, which sees only
``batch``; methods with a per-example memory (SAF, K-SAM with ``scores="memory"``) read it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor

Batch = Any  # Tensor | tuple | list | dict of those


class IndexedBatch(NamedTuple):
    """A batch and the dataset positions of its examples (see the module docstring):
    ``loss_fn`` gets ``batch``; ``index[i]`` is the training-set id of row i."""

    batch: Batch
    index: Tensor


def batch_index(batch: Batch) -> Tensor | None:
    """The example ids of an :class:`IndexedBatch` (None for any other batch)."""
    return batch.index if isinstance(batch, IndexedBatch) else None


def loss_batch(batch: Batch) -> Batch:
    """What ``loss_fn`` sees: the batch without its example ids."""
    return batch.batch if isinstance(batch, IndexedBatch) else batch


def tensor_leaves(batch: Batch, path: str = "batch") -> list[tuple[str, Tensor]]:
    """Every tensor of ``batch`` with its path (``batch[0]``, ``batch['input_ids']``), in
    order."""
    if isinstance(batch, Tensor):
        return [(path, batch)]
    if isinstance(batch, Mapping):
        out: list[tuple[str, Tensor]] = []
        for key, value in batch.items():
            out.extend(tensor_leaves(value, f"{path}[{key!r}]"))
        return out
    if isinstance(batch, (tuple, list)):
        out = []
        for i, value in enumerate(batch):
            out.extend(tensor_leaves(value, f"{path}[{i}]"))
        return out
    return []


def batch_size(batch: Batch) -> int:
    """Leading size shared by every tensor of ``batch``; raises ValueError if there is none."""
    leaves = tensor_leaves(batch)
    if not leaves:
        raise ValueError("batch holds no tensor: pass a tensor or a tuple/list/dict of tensors")
    sizes = {}
    for path, tensor in leaves:
        if tensor.dim() == 0:
            raise ValueError(f"{path} is a 0-d tensor: every batch tensor needs a batch dimension")
        sizes.setdefault(tensor.shape[0], path)
    if len(sizes) > 1:
        listing = ", ".join(f"{path} has {n}" for n, path in sizes.items())
        raise ValueError(f"batch tensors have different leading sizes: {listing}")
    return next(iter(sizes))


def batch_device(batch: Batch) -> torch.device:
    return tensor_leaves(batch)[0][1].device


def map_tree(batch: Batch, fn: Callable[[Tensor], Tensor]) -> Batch:
    """``batch`` with ``fn`` applied to every tensor, of the same structure: mappings (a
    Hugging Face ``BatchEncoding``) and namedtuples keep their type where their constructor
    allows (a plain dict otherwise); non-tensor leaves are kept as they are."""
    if isinstance(batch, Tensor):
        return fn(batch)
    if isinstance(batch, Mapping):
        items = {k: map_tree(v, fn) for k, v in batch.items()}
        if type(batch) is dict:
            return items
        try:
            return type(batch)(items)
        except TypeError:
            return items
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(map_tree(v, fn) for v in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(map_tree(v, fn) for v in batch)
    return batch


def index_batch(batch: Batch, index: Tensor | slice | None) -> Batch:
    """The sub-batch at ``index`` (a LongTensor of rows, or a slice of them: views, no copy);
    ``None`` means the whole batch."""
    if index is None:
        return batch

    def rows(t: Tensor) -> Tensor:
        if isinstance(index, slice):
            return t[index]
        return t.index_select(0, index if index.device == t.device
                              else index.to(t.device, non_blocking=True))

    return map_tree(batch, rows)


def tensors(batch: Batch) -> list[Tensor]:
    """The batch's tensors, in order."""
    return [t for _, t in tensor_leaves(batch)]


def batch_labels(batch: Batch, n: int) -> Tensor:
    """The class labels of a batch: the second element of an ``(inputs, labels)`` batch, or
    the ``"labels"`` entry of a mapping (a Hugging Face batch), a 1-D integer tensor of
    ``n`` rows (inside an :class:`IndexedBatch` too). ValueError for any other batch (for
    the rules that read labels)."""
    batch = loss_batch(batch)
    labels = None
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        labels = batch[1]
    elif isinstance(batch, Mapping):
        labels = batch.get("labels")
    if isinstance(labels, Tensor) and labels.dim() == 1 and labels.shape[0] == n \
            and not labels.is_floating_point() and not labels.is_complex() \
            and labels.dtype != torch.bool:
        return labels
    raise ValueError("this selection rule reads class labels: give batches as "
                     "(inputs, labels), or a mapping with a 'labels' entry, with labels a "
                     "1-D integer tensor, one per example (or choose select='top' or "
                     "'stratified', which read no labels)")
