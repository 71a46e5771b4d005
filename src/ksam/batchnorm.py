"""BatchNorm bookkeeping for multi-pass steps.

Running statistics must change only in the step's one full-batch pass at w. For the other
passes ``track_running_stats`` is off: in train mode the layer still normalizes with
the batch's own statistics but neither reads nor writes ``running_mean``, ``running_var``
or ``num_batches_tracked``. That is exact for ``momentum=None`` (cumulative average) and for
SyncBatchNorm too, where the common trick of setting momentum to 0 is not.

**Chunked passes** (the engine's ``micro_batch_size``): every chunk runs with
``track_running_stats`` off, so each chunk is normalized with *its own* batch statistics (as
in ghost batch normalization; the forward thus differs from one over the whole batch, whose
statistics no chunk sees). The running statistics of the full-batch pass are then updated
once, as one forward over the concatenated inputs would: :meth:`BatchNormGuard.accumulated`
gathers each layer's per-channel input mean and variance over the chunks (Chan's parallel
combination) and applies one momentum (or cumulative-average) update with the unbiased
variance over all rows. For a BatchNorm layer whose input does not depend on an earlier
BatchNorm layer this equals the unchunked step's running statistics up to float error;
deeper layers see inputs normalized per chunk.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

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

    def check_chunkable(self, compiled: bool) -> None:
        """ValueError if chunked passes cannot keep the BatchNorm rule on this model:
        SyncBatchNorm (a chunk's statistics would be gathered across ranks chunk by chunk)
        and a compiled model (the statistics are gathered by forward hooks)."""
        if any(isinstance(m, nn.SyncBatchNorm) for m in self.layers):
            raise ValueError("micro_batch_size does not support SyncBatchNorm layers")
        if compiled and self.layers:
            raise ValueError("micro_batch_size with compile does not support BatchNorm layers "
                             "(their chunked statistics are gathered by forward hooks)")

    @contextmanager
    def accumulated(self) -> Iterator[None]:
        """Within the block, BatchNorm layers in training mode record the per-channel mean
        and variance of every input (the forwards must run them frozen); on leaving it
        without an exception, the running statistics get one update from all of them
        together."""
        if not self.layers:
            yield
            return
        stats: dict[int, list[Any]] = {}  # layer -> [rows, mean, M2]

        def record(module: nn.Module, args: tuple) -> None:
            if not module.training:
                return
            x = args[0].detach()
            dims = [d for d in range(x.dim()) if d != 1]
            rows = x.numel() // x.shape[1]
            var, mean = torch.var_mean(x.float(), dim=dims, unbiased=False)
            entry = stats.get(id(module))
            if entry is None:
                stats[id(module)] = [rows, mean, var * rows]
                return
            n, mu, m2 = entry
            total = n + rows
            delta = mean - mu
            entry[0] = total
            entry[1] = mu + delta * (rows / total)
            entry[2] = m2 + var * rows + delta.square() * (n * rows / total)

        handles = [m.register_forward_pre_hook(record) for m in self.layers]
        try:
            yield
        finally:
            for h in handles:
                h.remove()
        with torch.no_grad():
            for m in self.layers:
                entry = stats.get(id(m))
                if entry is not None:
                    _update_running(m, *entry)

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


def _update_running(m: _BatchNorm, rows: int, mean: Tensor, m2: Tensor) -> None:
    """``m``'s running statistics after a training-mode forward over ``rows`` rows with
    per-channel ``mean`` and sum of squared deviations ``m2`` (as ``F.batch_norm`` does it)."""
    assert m.num_batches_tracked is not None and m.running_mean is not None \
        and m.running_var is not None
    m.num_batches_tracked.add_(1)
    factor: float | Tensor = m.momentum if m.momentum is not None \
        else (1.0 / m.num_batches_tracked).to(m.running_mean.dtype)  # cumulative average
    var = m2 / max(rows - 1, 1)  # unbiased, as the running variance is
    m.running_mean.lerp_(mean.to(m.running_mean.dtype), factor)
    m.running_var.lerp_(var.to(m.running_var.dtype), factor)
