"""What the multi-process tests share: spawning ranks, the model they train, the methods.

Each multi-process test spawns its ranks with torch.multiprocessing (spawn) on a free port of
127.0.0.1; a rank writes its result (or its error) to a file that the test then reads, and a
rank that outlives the test's deadline is killed and fails the test instead of hanging it.

A plain module (not a test file): the test modules import it, and the spawned ranks import
it again by name, which is why everything a rank runs lives at module level.
"""

from __future__ import annotations

import os
import socket
import sys
import time
import traceback
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import ce, data, mlp, params
from torch import nn

from ksam import distributed as kd
from ksam.selection import RULES

__all__ = ["WORLD", "DEADLINE_S", "spawn", "start", "join", "kill", "free_port", "ce", "data",
           "mlp", "params", "bn_net", "full_params", "SCHEDULE", "method_cases"]

WORLD = 2
DEADLINE_S = 90.0  # hang guard for a whole multi-process test (start-up included)


# ----------------------------------------------------------------------------- harness
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn: Callable, rank: int, world: int, port: int, outdir: str, pg_timeout: float,
           kwargs: dict) -> None:
    """A rank: torchrun's environment, kd.setup(), ``fn(info, **kwargs)``, result to a file."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    out = os.path.join(outdir, f"rank{rank}.pt")
    try:
        info = kd.setup(timeout=pg_timeout, device="cpu")
        result = fn(info, **kwargs)
    except BaseException as exc:
        torch.save({"error": f"{type(exc).__name__}: {exc}",
                    "traceback": traceback.format_exc()}, out)
        raise  # the process exits with an error, as a real training script would
    torch.save({"result": result}, out)
    kd.barrier()  # no rank tears its process group down while the other still uses it
    kd.cleanup()
    sys.stdout.flush()
    # Skip interpreter teardown: with FSDP2 on gloo, destructors of background threads at
    # exit can abort a rank ("terminate called without an active exception") after its
    # result is saved; the exit code then says nothing about the test.
    os._exit(0)


def start(fn: Callable, tmp_path: Path, pg_timeout: float = 30.0, **kwargs: Any) -> list:
    ctx = torch.multiprocessing.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_entry, daemon=True,
                         args=(fn, r, WORLD, port, str(tmp_path), pg_timeout, kwargs))
             for r in range(WORLD)]
    for p in procs:
        p.start()
    return procs


def join(procs: list, deadline: float) -> None:
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))


def kill(procs: list) -> None:
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(5)


def spawn(fn: Callable, tmp_path: Path, deadline_s: float = DEADLINE_S, **kwargs: Any) -> list:
    """Run ``fn`` on WORLD ranks; return each rank's result (fails on error or hang)."""
    procs = start(fn, tmp_path, **kwargs)
    join(procs, time.monotonic() + deadline_s)
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    kill(procs)
    if hung:
        pytest.fail(f"rank(s) {hung} still running after {deadline_s}s")
    results = []
    for r in range(WORLD):
        path = tmp_path / f"rank{r}.pt"
        if not path.exists():
            pytest.fail(f"rank {r} exited with code {procs[r].exitcode} and no result")
        rec = torch.load(path, weights_only=False)
        if "error" in rec:
            pytest.fail(f"rank {r} failed:\n{rec['traceback']}")
        results.append(rec["result"])
    for r, p in enumerate(procs):
        assert p.exitcode == 0, f"rank {r} exit code {p.exitcode}"
    return results


# --------------------------------------------------------------------------- the model
def bn_net(seed: int) -> nn.Module:
    """6 inputs, 4 classes, a BatchNorm over a length-3 axis: a rank whose global top-K
    leaves it a single row (or a weight-0 stand-in row) still has 3 values per channel."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Unflatten(1, (2, 3)), nn.Conv1d(2, 8, 1), nn.BatchNorm1d(8),
                         nn.ReLU(), nn.Flatten(), nn.Linear(24, 4))


def full_params(model: nn.Module) -> list[torch.Tensor]:
    """The whole parameters, FSDP2's DTensors gathered from all shards."""
    return [p.full_tensor().detach().clone() if hasattr(p, "full_tensor")
            else p.detach().clone() for p in model.parameters()]


# ------------------------------------------------------------------------- the methods
#: Size of the data set the cases cycle through (2 steps of WORLD ranks x 16 rows): ids are
#: global dataset positions, and every example comes back, so the memory methods use it.
NUM_EXAMPLES = 2 * WORLD * 16
#: The schedule a scheduled case adds: plain steps 0 and 1, then each step sharp with
#: probability 1/2 (drawn from the engine's generator, seeded alike on every rank).
SCHEDULE: dict[str, Any] = dict(start_step=2, p=0.5)

# Options per method of ksam.METHODS: momentum SGD gives MSAM its buffer, LookSAM reuses its
# direction on every second step, sam-late and rst carry their own schedule.
_OPTIONS: dict[str, dict[str, Any]] = {
    "sgd": {},
    "sam": dict(rho=0.1),
    "asam": dict(rho=0.5),
    "ksam": dict(k=0.25, k_warmup=2, rho=0.1),
    "ksam-plain": dict(k=0.25, rho=0.1),
    "random-sam": dict(rho=0.1, k_ascent=0.5),
    "esam": dict(rho=0.1),
    "osgd": dict(k=0.5),
    "msam": dict(rho=0.3),
    "looksam": dict(rho=0.1, interval=2, alpha=0.7),
    "sam-late": dict(rho=0.1, start_step=3),
    "rst": dict(rho=0.1, p=0.5),
    # the per-example memory: every example of the cycled data set is seen every 2nd step
    "saf": dict(num_examples=NUM_EXAMPLES, delay=1, start_epoch=1),
    "mesa": dict(decay=0.9, start_step=2),
}
#: Cases of the remembered scores (K-SAM and Ordered SGD with scores="memory").
MEMORY_CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "ksam:scores=memory": ("ksam", dict(k=0.25, k_warmup=2, rho=0.1, scores="memory",
                                        num_examples=NUM_EXAMPLES)),
    "osgd:scores=memory": ("osgd", dict(k=0.5, scores="memory", num_examples=NUM_EXAMPLES)),
    "ksam:stratified+scores=memory": ("ksam", dict(
        k=0.25, k_warmup=2, rho=0.1, select="stratified", scores="memory",
        num_examples=NUM_EXAMPLES)),
}
#: The methods that take the schedule keywords start_step and p (run without and with them).
SCHEDULED = ("sam", "asam", "ksam", "ksam-plain", "random-sam", "esam")
#: The methods whose top-K selection can be global across the ranks (selection="global").
GLOBAL = ("ksam", "ksam-plain", "osgd")


def _select(rule: str) -> Any:
    # AutoBand estimates over steps 100-199 by default; a window of steps 2-3 makes an
    # 8-step run take all three of its phases (spread rows, measuring, band).
    return partial(RULES[rule], estimate_steps=(2, 4)) if rule == "auto" else rule


def method_cases() -> dict[str, tuple[str, dict[str, Any]]]:
    """``{case: (method, options)}``: every method of ``ksam.METHODS`` (K-SAM with every rule
    of ``ksam.selection.RULES``), the scheduled ones without and with :data:`SCHEDULE`, the
    global top-K ones also with ``selection="global"`` (and K-SAM's global k=1, where on every
    step one rank holds no row of the cut and runs a weight-0 stand-in)."""
    cases: dict[str, tuple[str, dict[str, Any]]] = {}
    for method, opts in _OPTIONS.items():
        selects = RULES if method == "ksam" else (None,)
        for rule in selects:
            base = f"{method}:{rule}" if rule is not None else method
            options = dict(opts) if rule is None else dict(opts, select=_select(rule))
            cases[base] = (method, options)
            if method in SCHEDULED:
                cases[base + "+schedule"] = (method, dict(options, **SCHEDULE))
    for method in GLOBAL:
        opts = dict(_OPTIONS[method], selection="global")
        cases[method + "-global"] = (method, opts)
        if method in SCHEDULED:
            cases[method + "-global+schedule"] = (method, dict(opts, **SCHEDULE))
    cases["ksam-global-k1"] = ("ksam", dict(k=1, k_warmup=0, rho=0.1, selection="global"))
    cases.update(MEMORY_CASES)
    return cases
