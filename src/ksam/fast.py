"""The fast path: a step with no host-device synchronization, captured as one CUDA graph.

Why: at the batch sizes of the SAM literature a K-SAM step is a chain of small kernels
(three forwards, two backwards on B/8 examples, a sort, a gather, foreach updates), and on a
modern GPU their launch latency, not their arithmetic, sets its time: eager K-SAM with
K=B/8 measured slower than SAM on an H200 in a prototype. Replaying the whole step as one
CUDA graph removes the launches.

What makes a step capturable, and how this module gets it:

- no ``.item()`` or branch on a tensor value: :mod:`ksam.core` branches only on the
  (static) rules, and subset sizes depend only on the batch size;
- the skip rule decided on the device: the step's finiteness flag is handed to a *fused*
  optimizer as ``found_inf`` (the same mechanism GradScaler uses), which then leaves
  weights and state untouched; BatchNorm statistics are put back with ``torch.where``;
- a learning rate a scheduler can still change: the param groups' ``lr`` becomes a
  0-d device tensor, which torch's LR schedulers update in place (``fill_``);
- static inputs: each batch is copied into buffers the graph reads.

What the fast path does to your optimizer, at its first step (and again after
``load_state_dict`` or a change of its param groups, which also drops the captured graphs):
every param group gets ``fused=True``, ``foreach=False``,
``capturable=True`` where the optimizer has that option (Adam, AdamW), and its ``lr``
becomes a 0-d tensor on the device (float64 on the CPU, so that schedulers round as with a
float). The optimizer must therefore support ``fused=True``
(torch's SGD, Adam, AdamW). These settings stay in the optimizer and so in its
``state_dict``; on the CPU too, where the fused kernel rounds differently from the default
one (about 1e-7 per step): the two paths are bit-identical for an optimizer built with
``fused=True`` (SGD; tested on random step sequences), and equal to that precision else.
A method's state records ``fast_path`` and :meth:`ksam.Method.load_state_dict` refuses a
state saved with the other setting. The skip flag reaches the
optimizer that holds the parameters through the integrations' proxy optimizers
(:class:`ksam.integrations.ProxyOptimizer` forwards ``found_inf``).

Until one step has been applied (again after ``load_state_dict`` or a change of the
param groups) the steps run eagerly:
the optimizer creates its state at its first step, and a fused kernel told to skip that
step would leave SGD's new momentum buffers uninitialized.

Graphs are keyed by the batch's shapes, the subset sizes and the ``loss_fn`` object (by
equality: the same function, or a bound method of the same object): a ``loss_fn`` built
anew for every step never replays another's graph, it is captured again, and after
``MAX_GRAPHS`` graphs the steps run eagerly; build it once. A :class:`StepResult`'s index
tensors are copies, which later steps do not overwrite.

:class:`SyncFreeExecutor` runs a step with the core's functions
(:func:`ksam.core.compute`, ``verdict``, ``apply``; see :mod:`ksam.executor`) and owns
what is its own: the optimizer's preparation, the ``found_inf`` flag and the skipped-step
count on the device. A short last batch or a K schedule gets a graph of its own. It steps
eagerly instead, by itself and with the same results, for rules that draw random numbers
on the host (random-subset SAM, ESAM), with a GradScaler, a DistributedDataParallel model
or an optimizer without a fused kernel, and after a failed capture;
``SyncFreeExecutor.reason`` says why. On the CPU there is no graph: the sync-free step
runs eagerly, which is how the tests check that it equals the eager step.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

from .batch import Batch, batch_device, map_tree, tensor_leaves, tensors
from .core import ComputedStep, Runtime, StepResult, Verdict, apply, compute, verdict
from .executor import EagerExecutor
from .params import is_ddp
from .passes import LossFn

__all__ = ["SyncFreeExecutor", "STEPS_BEFORE_CAPTURE", "MAX_GRAPHS"]

STEPS_BEFORE_CAPTURE = 3  # sync-free steps run eagerly on a side stream before a capture
MAX_GRAPHS = 8  # distinct (shape, subset size, loss_fn) graphs kept before stepping eagerly


def _signature(batch: Batch) -> tuple:
    return tuple((path, t.shape, t.dtype, t.device) for path, t in tensor_leaves(batch))


def _copy_tree_(dst: Batch, src: Batch) -> None:
    for d, s in zip(tensors(dst), tensors(src)):
        d.copy_(s, non_blocking=True)


@dataclass
class _Captured:
    eager_left: int
    graph: torch.cuda.CUDAGraph | None = None
    static_batch: Batch = None
    static_out: ComputedStep | None = None
    static_verdict: Verdict | None = None
    static_skip: Tensor | None = None


class SyncFreeExecutor:
    """Runs a step with no host sync (see the module docstring); steps eagerly, with the
    same results, where it cannot."""

    #: what :meth:`ksam.Method.state_dict` records as ``fast_path``
    fast_path = True

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.reason: str | None = self._unsupported()
        self._warned = False
        self._eager = EagerExecutor(rt)
        self._skipped_base = 0
        self.reset()

    def reset(self, skipped_steps: int = 0) -> None:
        """Start over from a loaded state: graphs forgotten, the optimizer prepared again
        at the next step (a loaded optimizer state brings back its own settings)."""
        self._entries: dict[tuple, _Captured] = {}
        self._stream: torch.cuda.Stream | None = None
        self._prepared_for: torch.device | None = None
        self._skipped_device: Tensor | None = None
        self._found_inf: Tensor | None = None
        self._state_ready = False
        self._skipped_base = int(skipped_steps)
        self._eager.reset()

    def optimizer_changed(self) -> None:
        """The optimizer's parameters changed (a param group added): the captured graphs
        step the old parameter list, so they are dropped and captured anew; the new groups
        are prepared (fused kernel, lr on the device) at the next step, which runs eagerly
        until one is applied (the new parameters have no optimizer state yet); the count of
        skipped steps is kept."""
        if self.reason is None:
            self.reason = self._unsupported()
        self.reset(self.skipped_steps)

    @property
    def skipped_steps(self) -> int:
        extra = int(self._skipped_device) if self._skipped_device is not None else 0
        return self._skipped_base + extra + self._eager.skipped_steps

    # ---------------------------------------------------------------------- checks
    def _unsupported(self) -> str | None:
        e = self.rt
        if e.grad_scaler is not None:
            return "a GradScaler is in use (use bf16 autocast on the fast path)"
        if e.plan.host_randomness is not None:
            return e.plan.host_randomness
        if is_ddp(e.model):
            return "DistributedDataParallel models run eagerly"
        if e.params.sharded:
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
            warnings.warn(f"ksam fast path off, stepping eagerly: {why}", stacklevel=4)
            self._warned = True

    def _prepare(self, device: torch.device) -> None:
        """Fused kernel (device-side skip via found_inf) and a device-tensor learning rate;
        the skip flag and the skipped-step counter on the device. On the CPU the learning
        rate is a float64 tensor: LR schedulers that compute from the group's current lr
        (cosine annealing) then round exactly as with a Python float."""
        lr_dtype = torch.float64 if device.type == "cpu" else torch.float32
        for group in self.rt.optimizer.param_groups:
            group["fused"] = True
            if "capturable" in group:  # Adam/AdamW: step counters on the device
                group["capturable"] = True
            if "foreach" in group:
                group["foreach"] = False
            lr = group["lr"]
            if not isinstance(lr, Tensor):
                group["lr"] = torch.tensor(float(lr), dtype=lr_dtype, device=device)
            elif lr.device != device or lr.dtype != lr_dtype:
                group["lr"] = lr.to(device=device, dtype=lr_dtype)
        if self._skipped_device is not None:  # the device moved: keep the count
            self._skipped_base += int(self._skipped_device)
        self._skipped_device = torch.zeros((), dtype=torch.long, device=device)
        self._found_inf = torch.zeros((), dtype=torch.float32, device=device)
        self._prepared_for = device

    # ----------------------------------------------------------------------- steps
    def _sync_free(self, batch: Batch, loss_fn: LossFn, n: int, step: int,
                   sharp: bool) -> tuple[ComputedStep, Verdict, Tensor]:
        """One step without a host sync: the engine's stages, the skip flag handed to the
        fused optimizer as ``found_inf`` (the attribute torch's fused kernels read, as
        GradScaler sets it). Returns the computed step, its verdict and the skip flag."""
        rt = self.rt
        computed = compute(rt, batch, loss_fn, n, step, sharp)
        judged = verdict(rt, computed)
        skip = ~judged.finite
        found_inf = self._found_inf
        assert found_inf is not None and self._skipped_device is not None
        found_inf.copy_(skip)
        opt = rt.optimizer
        opt.found_inf = found_inf
        try:
            apply(rt, computed, judged, skip)
        finally:
            del opt.found_inf
        self._skipped_device.add_(skip)
        return computed, judged, skip

    def step(self, batch: Batch, loss_fn: LossFn, n: int, step: int,
             sharp: bool) -> StepResult:
        """Step number ``step``; ``sharp`` is the schedule's decision for it (host-side)."""
        if self.reason is not None:
            self._fall_back(self.reason)
            return self._eager.step(batch, loss_fn, n, step, sharp)
        device = batch_device(batch)
        if self._prepared_for != device:
            self._prepare(device)
        if not self._state_ready:
            # The optimizer creates its state at its first step, and a fused kernel told to
            # skip that step leaves the new buffers uninitialized (SGD's momentum): until a
            # step has been applied (again after load_state_dict), steps run eagerly, where
            # a skipped step does not call the optimizer at all.
            result = self._eager.step(batch, loss_fn, n, step, sharp)
            self._state_ready = not result.skipped
            return result
        if device.type != "cuda":
            computed, judged, skip = self._sync_free(batch, loss_fn, n, step, sharp)
            return StepResult.of(computed, judged, computed.loss, skip)
        return self._graph_step(batch, loss_fn, n, step, sharp)

    def _key(self, batch: Batch, loss_fn: LossFn, n: int, step: int, sharp: bool) -> tuple:
        """Which graph a step replays: one per batch signature, per subset sizes (a short
        last batch or a K schedule gets its own) and rule phases
        (:meth:`ksam.selection.SelectionRule.graph_key`), per kind of step (the schedule's
        sharp or plain steps; Momentum-SAM before and after its buffer exists) and per
        ``loss_fn`` - by equality, not by its code: a closure's captured values are baked
        into its graph, and two closures of the same code may capture different ones. The
        key holds ``loss_fn`` itself, so its id cannot be reused by another function while
        the graph exists."""
        return (_signature(batch), self.rt.graph_key(n, step, sharp), loss_fn)

    def _graph_step(self, batch: Batch, loss_fn: LossFn, n: int, step: int,
                    sharp: bool) -> StepResult:
        rt = self.rt
        key = self._key(batch, loss_fn, n, step, sharp)
        entry = self._entries.get(key)
        if entry is None:
            if len(self._entries) >= MAX_GRAPHS:  # shapes keep changing: same results
                return self._eager.step(batch, loss_fn, n, step, sharp)
            entry = self._entries[key] = _Captured(STEPS_BEFORE_CAPTURE if not self._entries else 1)
        if entry.graph is None and entry.eager_left > 0:
            entry.eager_left -= 1
            return self._side_stream_step(batch, loss_fn, n, step, sharp)
        if entry.graph is None:
            try:
                self._capture(entry, batch, loss_fn, n, step, sharp)
            except Exception as exc:  # a loss_fn that syncs, an uncapturable op, ...
                self._entries.clear()
                rt.zero_grad()
                self._fall_back(f"capture failed: {type(exc).__name__}: {exc}")
                return self._eager.step(batch, loss_fn, n, step, sharp)
        _copy_tree_(entry.static_batch, batch)
        entry.graph.replay()
        out, judged, skip = entry.static_out, entry.static_verdict, entry.static_skip
        assert out is not None and judged is not None and skip is not None
        # The graph's outputs are overwritten by the next replay: copy them out.
        scalars = torch.stack([out.loss.float(), skip.float()])
        copied = ComputedStep(
            loss=scalars[0], ascent_indices=out.ascent_indices.clone(),
            descent_indices=out.descent_indices.clone(),
            losses=None if out.losses is None else out.losses.clone(),
            ascent_grad_norm=None if out.ascent_grad_norm is None
            else out.ascent_grad_norm.clone(),
            checks=[], sharp=out.sharp)
        norm = judged.descent_grad_norm
        copied_verdict = Verdict(finite=~scalars[1].bool(),
                                 descent_grad_norm=None if norm is None else norm.clone())
        return StepResult.of(copied, copied_verdict, scalars[0], scalars[1].bool())

    def _side_stream_step(self, batch: Batch, loss_fn: LossFn, n: int, step: int,
                sharp: bool) -> StepResult:
        """An eager sync-free step on a side stream (optimizer state, cuDNN autotuning and
        the autograd streams must exist before capture)."""
        if self._stream is None:
            self._stream = torch.cuda.Stream()
        self._stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self._stream):
            computed, judged, skip = self._sync_free(batch, loss_fn, n, step, sharp)
        torch.cuda.current_stream().wait_stream(self._stream)
        return StepResult.of(computed, judged, computed.loss, skip)

    def _capture(self, entry: _Captured, batch: Batch, loss_fn: LossFn, n: int, step: int,
                 sharp: bool) -> None:
        entry.static_batch = map_tree(batch, Tensor.clone)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        self.rt.zero_grad()  # gradients are allocated inside the graph's pool
        with torch.cuda.graph(graph):
            entry.static_out, entry.static_verdict, entry.static_skip = self._sync_free(
                entry.static_batch, loss_fn, n, step, sharp)
        entry.graph = graph
