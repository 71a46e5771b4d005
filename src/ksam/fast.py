"""The fast path: a step with no host-device synchronization, captured as one CUDA graph.

Why: at the batch sizes of the SAM literature a K-SAM step is a chain of small kernels
(three forwards, two backwards on B/8 examples, a sort, a gather, foreach updates), and on a
modern GPU their launch latency, not their arithmetic, sets its time: eager K-SAM with
K=B/8 measured slower than SAM on an H200 (../shared/anchors). Replaying the whole step as
one CUDA graph removes the launches.

What makes a step capturable, and how this module gets it:

- no ``.item()`` or branch on a tensor value: the engine's two-pass core branches only on
  its (static) rules, and subset sizes depend only on the batch size;
- the skip rule decided on the device: the step's finiteness flag is handed to a *fused*
  optimizer as ``found_inf`` (the same mechanism GradScaler uses), which then leaves
  weights and state untouched; BatchNorm statistics are put back with ``torch.where``;
- a learning rate a scheduler can still change: the param groups' ``lr`` becomes a
  0-d device tensor, which torch's LR schedulers update in place (``fill_``);
- static inputs: each batch is copied into buffers the graph reads.

The optimizer must therefore support ``fused=True`` (torch's SGD, Adam, AdamW); the
engine turns it on. The fast path falls back to the eager step, by itself and with the
same results, for a batch of another shape than the captured one (a short last batch), for
rules that draw random numbers on the host (random-subset SAM, ESAM), with a GradScaler, a
DistributedDataParallel model, or an optimizer without a fused kernel. ``FastStep.reason``
says why it fell back. On the CPU there is no graph: the sync-free step runs eagerly,
which is how the tests check that it equals the eager step.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .batch import Batch, _tensor_leaves
from .engine import LossFn, SharpnessAwareOptimizer, StepResult, _result
from .perturbation import StochasticWeightPerturbation
from .selection import RandomSubset

WARMUP_STEPS = 3  # eager sync-free steps on a side stream before capture (torch's recipe)
MAX_GRAPHS = 8  # distinct (shape, subset size) graphs kept before stepping eagerly


def _signature(batch: Batch) -> tuple:
    return tuple((path, t.shape, t.dtype, t.device) for path, t in _tensor_leaves(batch))


def _copy_tree_(dst: Batch, src: Batch) -> None:
    for (_, d), (_, s) in zip(_tensor_leaves(dst), _tensor_leaves(src)):
        d.copy_(s, non_blocking=True)


def _clone_tree(batch: Batch) -> Batch:
    if isinstance(batch, Tensor):
        return batch.clone()
    if isinstance(batch, dict):
        return {k: _clone_tree(v) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_clone_tree(v) for v in batch)
    return batch


@dataclass
class _Captured:
    warmup_left: int
    graph: torch.cuda.CUDAGraph | None = None
    static_batch: Batch = None
    static_out: dict[str, Any] | None = None


class FastStep:
    def __init__(self, engine: SharpnessAwareOptimizer) -> None:
        self.engine = engine
        self.reason: str | None = self._unsupported()
        self._prepared = False
        self._warned = False
        self.reset()

    def reset(self) -> None:
        """Forget the captured graphs (after load_state_dict, or to re-capture)."""
        self._entries: dict[tuple, _Captured] = {}
        self._stream: torch.cuda.Stream | None = None

    # ---------------------------------------------------------------------- checks
    def _unsupported(self) -> str | None:
        e = self.engine
        if e.grad_scaler is not None:
            return "a GradScaler is in use (use bf16 autocast on the fast path)"
        for rule in (e.ascent, e.descent):
            if isinstance(rule, RandomSubset):
                return "random subsets are drawn on the host"
        if isinstance(e.perturbation, StochasticWeightPerturbation):
            return "ESAM's weight mask is drawn on the host"
        if hasattr(e.model, "no_sync"):
            return "DistributedDataParallel models run eagerly"
        if e._sharding is not None:
            return "FSDP-sharded models run eagerly"
        for group in e.optimizer.param_groups:
            if "fused" not in group:
                name = type(e.optimizer).__name__
                return f"{name} has no fused kernel to skip steps on the device"
            if group.get("differentiable"):
                return "a differentiable optimizer cannot be fused"
        return None

    def _fall_back(self, why: str) -> None:
        """Step eagerly from now on; say why once."""
        self.reason = why
        if not self._warned:
            warnings.warn(f"ksam fast path off, stepping eagerly: {why}", stacklevel=3)
            self._warned = True

    def _prepare_optimizer(self, device: torch.device) -> None:
        """Fused kernel (device-side skip via found_inf) and a device-tensor learning rate."""
        opt = self.engine.optimizer
        for group in opt.param_groups:
            group["fused"] = True
            if "capturable" in group:  # Adam/AdamW: step counters on the device
                group["capturable"] = True
            if "foreach" in group:
                group["foreach"] = False
            if not isinstance(group["lr"], Tensor):
                group["lr"] = torch.tensor(float(group["lr"]), device=device)
            elif group["lr"].device != device:
                group["lr"] = group["lr"].to(device)
        self.engine._skipped_device = torch.zeros((), dtype=torch.long, device=device)
        self._found_inf = torch.zeros((), dtype=torch.float32, device=device)
        self._prepared = True

    # ----------------------------------------------------------------------- steps
    def _sync_free(self, batch: Batch, loss_fn: LossFn, n: int) -> dict[str, Any]:
        """One step without a host sync; returns the engine's outputs plus ``skip``."""
        e = self.engine
        e.zero_grad()
        e._bn.save()
        out = e._two_pass(batch, loss_fn, n)
        finite = e._all_finite(out["checks"], e._descent_grads())
        skip = ~finite
        self._found_inf.copy_(skip)
        e.optimizer.found_inf = self._found_inf
        try:
            e.optimizer.step()
        finally:
            del e.optimizer.found_inf
        e._bn.restore(where=skip)
        e._skipped_device.add_(skip)
        out["skip"] = skip
        return out

    def step(self, batch: Batch, loss_fn: LossFn, n: int) -> StepResult | None:
        """A fast step, or ``None`` when the caller must step eagerly."""
        if self.reason is not None:
            self._fall_back(self.reason)
            return None
        e = self.engine
        device = next(iter(_tensor_leaves(batch)))[1].device
        if not self._prepared:
            self._prepare_optimizer(device)
        if device.type != "cuda":
            out = self._sync_free(batch, loss_fn, n)
            e.steps += 1
            return _result(out, out["loss"], out["skip"])

        # One graph per batch signature and per subset sizes: a short last batch or a K
        # schedule (TopLoss warm-up) gets its own graph. The loss_fn is captured with the
        # graph; a lambda rebuilt each step has the same code.
        sizes = tuple(rule.size_at(n, e.steps) for rule in (e.ascent, e.descent)
                      if rule is not None)
        key = (_signature(batch), sizes, getattr(loss_fn, "__code__", loss_fn))
        entry = self._entries.get(key)
        if entry is None:
            if len(self._entries) >= MAX_GRAPHS:
                return None  # shapes keep changing: eager, same semantics
            entry = self._entries[key] = _Captured(WARMUP_STEPS if not self._entries else 1)
        if entry.graph is None and entry.warmup_left > 0:
            entry.warmup_left -= 1
            return self._warmup(batch, loss_fn, n)
        if entry.graph is None:
            try:
                self._capture(entry, batch, loss_fn, n)
            except Exception as exc:  # a loss_fn that syncs, an uncapturable op, ...
                self._entries.clear()
                e.zero_grad()
                self._fall_back(f"capture failed: {type(exc).__name__}: {exc}")
                return None
        _copy_tree_(entry.static_batch, batch)
        entry.graph.replay()
        e.steps += 1
        out = entry.static_out
        # The graph's outputs are overwritten by the next replay: keep the scalars (stack
        # copies them out of the graph's memory).
        scalars = torch.stack([out["loss"].float(), out["skip"].float()])
        return _result(out, scalars[0], scalars[1].bool())

    def _warmup(self, batch: Batch, loss_fn: LossFn, n: int) -> StepResult:
        """An eager sync-free step on a side stream (optimizer state, cuDNN autotuning and
        the autograd streams must exist before capture)."""
        if self._stream is None:
            self._stream = torch.cuda.Stream()
        self._stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self._stream):
            out = self._sync_free(batch, loss_fn, n)
        torch.cuda.current_stream().wait_stream(self._stream)
        self.engine.steps += 1
        return _result(out, out["loss"], out["skip"])

    def _capture(self, entry: _Captured, batch: Batch, loss_fn: LossFn, n: int) -> None:
        entry.static_batch = _clone_tree(batch)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        self.engine.zero_grad()  # gradients are allocated inside the graph's pool
        with torch.cuda.graph(graph):
            entry.static_out = self._sync_free(entry.static_batch, loss_fn, n)
        entry.graph = graph
