"""BatchNorm bookkeeping for multi-pass steps.

Running statistics must change only in the step's one full-batch pass at w. For the other
passes we turn ``track_running_stats`` off: in train mode the layer still normalizes with
the batch's own statistics but neither reads nor writes ``running_mean``, ``running_var``
or ``num_batches_tracked``. That is exact for ``momentum=None`` (cumulative average) and for
SyncBatchNorm too, where the common trick of setting momentum to 0 is not.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm


class BatchNormGuard:
    def __init__(self, model: nn.Module) -> None:
        self.layers = [
            m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats
        ]
        self.buffers: list[Tensor] = [
            b for m in self.layers for b in (m.running_mean, m.running_var, m.num_batches_tracked)
            if b is not None
        ]
        self._saved: list[Tensor] | None = None

    @contextmanager
    def frozen(self, freeze: bool = True) -> Iterator[None]:
        """Within the block, BatchNorm layers leave their running statistics alone."""
        if not freeze or not self.layers:
            yield
            return
        for m in self.layers:
            m.track_running_stats = False
        try:
            yield
        finally:
            for m in self.layers:
                m.track_running_stats = True

    def save(self) -> None:
        """Snapshot the running statistics (into buffers allocated once)."""
        if not self.buffers:
            return
        if self._saved is None:
            self._saved = [torch.empty_like(b) for b in self.buffers]
        torch._foreach_copy_(self._saved, self.buffers)

    def restore(self, where: Tensor | None = None) -> None:
        """Copy the snapshot back; with ``where`` (a bool tensor) only if it is true, on the
        device without a host sync."""
        if not self.buffers or self._saved is None:
            return
        if where is None:
            torch._foreach_copy_(self.buffers, self._saved)
            return
        for buf, old in zip(self.buffers, self._saved):
            buf.copy_(torch.where(where, old, buf))
