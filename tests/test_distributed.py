"""DistributedDataParallel support (ksam.distributed), on the CPU: gloo, 2 spawned processes.

Each multi-process test spawns its ranks with torch.multiprocessing (spawn) on a free port of
127.0.0.1; a rank writes its result (or its error) to a file that the test then reads, and a
rank that outlives the test's deadline is killed and fails the test instead of hanging it.
"""

from __future__ import annotations

import os
import socket
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import ksam
from ksam import distributed as kd

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed gloo"
)

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
    ctx = mp.get_context("spawn")
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


def spawn(fn: Callable, tmp_path: Path, **kwargs: Any) -> list:
    """Run ``fn`` on WORLD ranks; return each rank's result (fails on error or hang)."""
    procs = start(fn, tmp_path, **kwargs)
    join(procs, time.monotonic() + DEADLINE_S)
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    kill(procs)
    if hung:
        pytest.fail(f"rank(s) {hung} still running after {DEADLINE_S}s")
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


# ------------------------------------------------------------------------ model, data
def ce(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y, reduction="none")


def net(seed: int, bn: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    if bn:  # BatchNorm over a length-3 axis: a global top-K may leave a rank a single row
        return nn.Sequential(nn.Unflatten(1, (2, 3)), nn.Conv1d(2, 8, 1), nn.BatchNorm1d(8),
                             nn.ReLU(), nn.Flatten(), nn.Linear(24, 4))
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 4))


def dataset(n: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g), torch.randint(0, 4, (n,), generator=g)


def params(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


# ------------------------------------------------------------ identical weights on ranks
TRAIN_CONFIGS: dict[str, dict[str, Any]] = {
    "ksam": dict(method="ksam", k=0.25, rho=0.1),
    "sam": dict(method="sam", rho=0.1),
    "ksam-global": dict(method="ksam", k=0.25, rho=0.1, selection="global"),
    "ksam-global-sync": dict(method="ksam", k=0.25, rho=0.1, selection="global",
                             sync_perturbation=True),
    # k=1 over the global batch: every step one rank has no row in the cut (weight-0 stand-in)
    "ksam-global-k1": dict(method="ksam", k=1, k_warmup=0, rho=0.1, selection="global"),
    "ksam-global-k1-sync": dict(method="ksam", k=1, k_warmup=0, rho=0.1, selection="global",
                                sync_perturbation=True),
    "osgd-global": dict(method="osgd", k=0.5, selection="global"),
    "esam": dict(method="esam", rho=0.1),
}


def _recording_stand_ins(select: Callable, picks: list[bool]) -> Callable:
    def recorded(ctx: ksam.SelectionContext) -> ksam.selection.Selection:
        sel = select(ctx)
        picks.append(sel.scale is not None and float(sel.scale) == 0.0)
        return sel

    return recorded


def _train_ranks(info: kd.DistInfo, steps: int, batch: int) -> dict:
    x_all, y_all = dataset(WORLD * steps * batch)
    x, y = kd.shard((x_all, y_all), seed=0, epoch=0)
    out: dict[str, Any] = {}
    for name, cfg in TRAIN_CONFIGS.items():
        cfg = dict(cfg)
        method = cfg.pop("method")
        # a different init on each rank: DDP's construction-time broadcast must align them
        model = net(100 + info.rank, bn=True)
        ddp = kd.wrap(model, info.device)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
        eng = kd.create(method, ddp, opt, seed=0, **cfg)
        init = params(model)
        picks: list[bool] = []  # per selection: a weight-0 stand-in row
        for rule in (eng.ascent, eng.descent):
            if isinstance(rule, kd.GlobalTopLoss):
                rule.select = _recording_stand_ins(rule.select, picks)
        for s in range(steps):
            rows = slice(s * batch, (s + 1) * batch)
            eng.step((x[rows], y[rows]), ce)
        stand_ins = sum(picks)
        buffers_differ = any(not torch.equal(a, b) for a, b in zip(
            model.buffers(), net(0, bn=True).buffers()))
        kd.sync_buffers(ddp)
        out[name] = {"init": init, "params": params(model), "stand_ins": stand_ins,
                     "buffers": [b.clone() for b in model.buffers()],
                     "buffers_moved": buffers_differ, "skipped": eng.skipped_steps}
    return out


def test_ranks_hold_identical_weights(tmp_path):
    r0, r1 = spawn(_train_ranks, tmp_path, steps=4, batch=8)
    for name in TRAIN_CONFIGS:
        a, b = r0[name], r1[name]
        for p, q in zip(a["params"], b["params"]):
            assert torch.equal(p, q), f"{name}: ranks' weights differ"
        assert any(not torch.equal(p, q) for p, q in zip(a["init"], a["params"])), name
        for p, q in zip(a["buffers"], b["buffers"]):  # after kd.sync_buffers
            assert torch.equal(p, q), f"{name}: BatchNorm buffers differ after sync_buffers"
        assert a["buffers_moved"]
        assert a["skipped"] == b["skipped"] == 0
    # the k=1 global cut lies on one rank per step: the other ran its weight-0 stand-ins
    # (ascent and descent), through DDP's all-reduce in the synchronized configuration
    for name in ("ksam-global-k1", "ksam-global-k1-sync"):
        assert r0[name]["stand_ins"] + r1[name]["stand_ins"] == 2 * 4


# ---------------------------------------------- 2 ranks x b == 1 process x 2b (sync, global)
EQUIV_CONFIGS: dict[str, dict[str, Any]] = {
    "ksam": dict(method="ksam", k=0.25, k_warmup=0, rho=0.5),
    # descent subset schedule on the global batch: 20, 20, 10, 10 rows
    "ksam-warmup": dict(method="ksam", k=0.25, k_warmup=2, rho=0.5),
    "ksam-k-int": dict(method="ksam", k_ascent=3, k_descent=0.5, k_warmup=0, rho=0.5),
    "ksam-plain": dict(method="ksam-plain", k=0.25, rho=0.5),  # no warmup, no rescale
    "sam": dict(method="sam", rho=0.5),
    "osgd": dict(method="osgd", k=5),
}
EQUIV_STEPS, EQUIV_B = 4, 10
PER_RANK_TOO = ("ksam", "sam")  # also run with per-rank perturbation, which must differ


def _equiv_batches():
    x, y = dataset(EQUIV_STEPS * WORLD * EQUIV_B, seed=3)
    return [(x[s * WORLD * EQUIV_B:(s + 1) * WORLD * EQUIV_B],
             y[s * WORLD * EQUIV_B:(s + 1) * WORLD * EQUIV_B]) for s in range(EQUIV_STEPS)]


def _equiv_ranks(info: kd.DistInfo) -> dict:
    out = {}
    for name, cfg in EQUIV_CONFIGS.items():
        for sync in (True, False) if name in PER_RANK_TOO else (True,):
            opts = dict(cfg)
            method = opts.pop("method")
            model = net(0)
            ddp = kd.wrap(model, info.device)
            opt = torch.optim.SGD(ddp.parameters(), lr=0.2, momentum=0.9)
            selection = "global" if method != "sam" else "local"
            eng = kd.create(method, ddp, opt, seed=0, selection=selection,
                            sync_perturbation=sync, **opts)
            for xb, yb in _equiv_batches():
                rows = slice(info.rank * EQUIV_B, (info.rank + 1) * EQUIV_B)
                eng.step((xb[rows], yb[rows]), ce)
            out[name, sync] = params(model)
    return out


def test_sync_global_matches_single_process(tmp_path):
    ranks = spawn(_equiv_ranks, tmp_path)
    for name, cfg in EQUIV_CONFIGS.items():
        cfg = dict(cfg)
        method = cfg.pop("method")
        model = net(0)
        opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
        eng = ksam.create(method, model, opt, seed=0, **cfg)
        for batch in _equiv_batches():
            eng.step(batch, ce)
        single = params(model)
        for rank in ranks:
            for p, q in zip(rank[name, True], single):
                torch.testing.assert_close(p, q, atol=2e-6, rtol=1e-5, msg=name)
        if name in PER_RANK_TOO:  # per-rank perturbation is a different (m-sharpness) step
            gap = max((p - q).abs().max().item() for p, q in zip(ranks[0][name, False], single))
            assert gap > 1e-4, f"{name}: per-rank perturbation should differ from global"


# --------------------------------------------------- collectives per pass (counting group)
class CountingGroup(dist.ProcessGroup):
    """A process group that forwards every collective to gloo and logs it with the pass
    (``phase``) and step it happened in: DDP's bucket all-reduce, buffer broadcasts and the
    reducer's own internal messages all go through it."""

    def __init__(self, inner: dist.ProcessGroup) -> None:
        super().__init__(inner.rank(), inner.size())
        self.inner = inner
        self.phase = "init"
        self.step = -1
        self.calls: list[tuple[int, str, str]] = []

    def _log(self, name: str) -> None:
        self.calls.append((self.step, self.phase, name))

    def allreduce(self, tensors, opts=None):
        self._log("allreduce")
        return self.inner.allreduce(tensors, opts if opts is not None
                                    else dist.AllreduceOptions())

    def broadcast(self, tensors, opts=None):
        self._log("broadcast")
        return self.inner.broadcast(tensors, opts)

    def allgather(self, outputs, inputs, opts=None):
        self._log("allgather")
        return self.inner.allgather(outputs, inputs, opts)

    def _allgather_base(self, output, inp, opts=None):
        self._log("allgather")
        return self.inner._allgather_base(output, inp, opts)

    def barrier(self, opts=None):
        self._log("barrier")
        return self.inner.barrier(opts)

    def getBackendName(self) -> str:
        return "counting-gloo"


COUNT_CONFIGS: dict[str, dict[str, Any]] = {
    "ksam": dict(method="ksam", k=0.25),
    "sam": dict(method="sam"),
    "ksam-global": dict(method="ksam", k=0.25, selection="global"),
    "sam-sync": dict(method="sam", sync_perturbation=True),
    # DDP's own default: buffers broadcast at the first forward after a synced backward
    "sam-ddp-buffer-sync": dict(method="sam", ddp_buffer_sync=True),
}


# the all-gather that GlobalTopLoss calls (torch 2.13 renamed all_gather_into_tensor)
GATHER = "all_gather_single" if hasattr(dist, "all_gather_single") else "all_gather_into_tensor"


def _count_ranks(info: kd.DistInfo, steps: int) -> dict:
    x_all, y_all = dataset(WORLD * steps * 8)
    x, y = kd.shard((x_all, y_all), seed=0, epoch=0)
    out = {}
    real_all_gather = getattr(dist, GATHER)
    for name, cfg in COUNT_CONFIGS.items():
        cfg = dict(cfg)
        method = cfg.pop("method")
        group = CountingGroup(dist.group.WORLD)
        model = net(0, bn=True)
        if cfg.pop("ddp_buffer_sync", False):
            ddp = nn.parallel.DistributedDataParallel(model, process_group=group)
        else:
            ddp = kd.wrap(model, info.device, process_group=group)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            eng = kd.create(method, ddp, opt, seed=0, **cfg)
        warned = any("broadcasts its buffers" in str(w.message) for w in caught)

        sync = cfg.get("sync_perturbation", False)

        def loss_fn(m, batch, group=group, ddp=ddp, sync=sync):
            # the passes of a step: gradient-free scoring, then ascent, then descent
            if not torch.is_grad_enabled():
                group.phase = "scoring"
            else:
                group.phase = "ascent" if group.phase == "scoring" else "descent"
                if group.phase == "ascent":
                    # per-rank perturbation: the ascent runs inside model.no_sync()
                    assert ddp.require_backward_grad_sync == sync
            return ce(m, batch)

        def counted_all_gather(*args, group_=group, **kwargs):
            group_._log("allgather")  # GlobalTopLoss gathers on the default group
            return real_all_gather(*args, **kwargs)

        group.calls.clear()
        setattr(dist, GATHER, counted_all_gather)
        try:
            for s in range(steps):
                group.step, group.phase = s, "scoring"
                rows = slice(s * 8, (s + 1) * 8)
                eng.step((x[rows], y[rows]), loss_fn)
        finally:
            setattr(dist, GATHER, real_all_gather)
        out[name] = {"calls": list(group.calls), "warned": warned}
    return out


def _calls(record, step, phase):
    return [name for s, p, name in record["calls"] if s == step and p == phase]


def test_per_rank_ascent_sends_nothing(tmp_path):
    steps = 4
    ranks = spawn(_count_ranks, tmp_path, steps=steps)
    for rec in ranks:
        for name in ("ksam", "sam", "ksam-global"):
            r = rec[name]
            assert not r["warned"]
            for s in range(steps):
                ascent = _calls(r, s, "ascent")
                if s == 1:
                    # DDP re-buckets its parameters once, at the first forward with gradients
                    # after the first synchronized backward: a broadcast of bucket indices.
                    assert set(ascent) <= {"broadcast"}, (name, s, ascent)
                else:
                    assert ascent == [], (name, s, ascent)
                descent = _calls(r, s, "descent")
                assert "allreduce" in descent and set(descent) == {"allreduce"}, (name, descent)
                scoring = _calls(r, s, "scoring")
                # global top-K: one all-gather of the losses, shared by ascent and descent rules
                assert scoring == (["allgather"] if name == "ksam-global" else []), (name, s)
        # synchronized perturbation: DDP all-reduces the ascent gradient
        for s in range(steps):
            assert "allreduce" in _calls(rec["sam-sync"], s, "ascent")
        # DDP's default buffer sync would broadcast in SAM's ascent pass: kd.create warns
        r = rec["sam-ddp-buffer-sync"]
        assert r["warned"]
        assert all("broadcast" in _calls(r, s, "ascent") for s in range(steps))


# ------------------------------------------------------------ selection rule across ranks
def _helper_ranks(info: kd.DistInfo) -> dict:
    device = torch.device("cpu")
    gathers = []
    real = getattr(dist, GATHER)

    def counted(*args, **kwargs):
        gathers.append(1)
        return real(*args, **kwargs)

    setattr(dist, GATHER, counted)
    try:
        # ties: global scores [1 3 3 0 | 3 2 0 3]; top 3 = global rows 1, 2, 4 (lower index
        # wins a tie), i.e. rows [1, 2] of rank 0 and row [0] of rank 1
        scores = torch.tensor([[1.0, 3, 3, 0], [3, 2, 0, 3]])[info.rank]
        ctx = ksam.SelectionContext(batch_size=4, device=device, scores=scores)
        a, d = kd.GlobalTopLoss(3), kd.GlobalTopLoss(3)
        sel_a = a.select(ctx)
        ties = sel_a.index.tolist()
        assert d.select(ctx).index.tolist() == ties
        one_gather = len(gathers) == 1  # the second rule reused the step's gathered losses
        losses = torch.arange(1.0, len(ties) + 1, requires_grad=True)
        reduced = a.reduce(losses, sel_a).item()
        # k=1: the global top row is on rank 0; rank 1 runs a weight-0 stand-in
        scores = torch.tensor([[5.0, 0, 0, 0], [1, 4, 1, 1]])[info.rank]
        rule = kd.GlobalTopLoss(1)
        sel = rule.select(ksam.SelectionContext(batch_size=4, device=device, scores=scores))
        idx = sel.index
        loss = torch.tensor([2.0], requires_grad=True)
        red = rule.reduce(loss, sel)
        red.backward()
        size = kd.GlobalTopLoss(0.5).size(4)
    finally:
        setattr(dist, GATHER, real)
    out = {"ties": ties, "one_gather": one_gather, "reduced": reduced,
           "k1": idx.tolist(), "k1_reduced": red.item(), "k1_grad": loss.grad.item(),
           "size": size}

    # sync_buffers: mean of floating buffers, broadcast of integer ones / of everything
    model = net(0, bn=True)
    bn = model[2]
    bn.running_mean.fill_(info.rank + 1.0)
    bn.num_batches_tracked.fill_(10 * (info.rank + 1))
    kd.sync_buffers(model)
    out["mean"] = (bn.running_mean.tolist(), int(bn.num_batches_tracked))
    bn.running_mean.fill_(info.rank + 1.0)
    kd.sync_buffers(model, op="broadcast")
    out["broadcast"] = bn.running_mean.tolist()
    out["main"] = kd.is_main_process()
    kd.barrier()

    # a step whose loss is not finite on rank 0 only (gradients finite): all ranks skip it
    for agree in (True, False):
        if not agree:
            kd.all_ranks_true, saved = (lambda flag, group=None: flag), kd.all_ranks_true
        try:
            model = net(0)
            ddp = kd.wrap(model)
            eng = kd.create("ksam", ddp, torch.optim.SGD(ddp.parameters(), lr=0.1), k=0.5)
            x, y = dataset(8)

            def poisoned(m, batch, rank=info.rank):
                losses = ce(m, batch)
                if rank == 0 and not torch.is_grad_enabled():  # rank 0's scoring pass only
                    losses = losses + torch.tensor([float("inf")] + [0.0] * 7)
                return losses

            eng.step((x, y), poisoned)
            out["skip", agree] = (eng.skipped_steps, params(model))
        finally:
            if not agree:
                kd.all_ranks_true = saved
    return out


def test_rule_buffers_and_skips_across_ranks(tmp_path):
    r0, r1 = spawn(_helper_ranks, tmp_path)
    assert r0["ties"] == [1, 2] and r1["ties"] == [0]
    assert r0["one_gather"] and r1["one_gather"]
    # reduce = sum * W / K: rank 0 (1 + 2) * 2 / 3, rank 1 1 * 2 / 3
    assert r0["reduced"] == pytest.approx(2.0) and r1["reduced"] == pytest.approx(2 / 3)
    assert r0["k1"] == [0] and r0["k1_reduced"] == pytest.approx(4.0) and r0["k1_grad"] == 2.0
    assert r1["k1"] == [1]  # its own top-1 row, weighted 0
    assert r1["k1_reduced"] == 0.0 and r1["k1_grad"] == 0.0
    assert r0["size"] == r1["size"] == 4  # k resolved against the global batch of 8
    # sync_buffers
    assert r0["mean"] == r1["mean"] == ([1.5] * 8, 10)
    assert r0["broadcast"] == r1["broadcast"] == [1.0] * 8
    assert r0["main"] and not r1["main"]
    # the engine agrees on skipping across ranks; without that the weights would drift apart
    assert r0["skip", True][0] == r1["skip", True][0] == 1
    for p, q in zip(r0["skip", True][1], r1["skip", True][1]):
        assert torch.equal(p, q)
    assert (r0["skip", False][0], r1["skip", False][0]) == (1, 0)
    assert any(not torch.equal(p, q) for p, q in zip(r0["skip", False][1], r1["skip", False][1]))


# --------------------------------------------------------------- a crashed or stalled rank
def _crashing_ranks(info: kd.DistInfo, mode: str) -> None:
    model = net(0)
    ddp = kd.wrap(model, info.device)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    eng = kd.create("ksam", ddp, opt, k=0.5, seed=0)
    x, y = dataset(8)
    for _ in range(2):
        eng.step((x, y), ce)
    if info.rank == 1:
        if mode == "crash":
            os._exit(7)
        time.sleep(120)  # stalled: alive but never joins the next collective
    t0 = time.monotonic()
    try:
        for _ in range(10_000):
            eng.step((x, y), ce)
    except Exception as exc:
        torch.save({"elapsed": time.monotonic() - t0, "error": f"{type(exc).__name__}: {exc}"},
                   os.path.join(os.environ["KSAM_TEST_OUT"], "survivor.pt"))
        raise
    raise AssertionError("rank 0 kept stepping without its peer")


@pytest.mark.parametrize("mode", ["crash", "stall"])
def test_lost_rank_fails_the_others(tmp_path, mode):
    os.environ["KSAM_TEST_OUT"] = str(tmp_path)  # inherited by the spawned ranks
    t0 = time.monotonic()
    procs = start(_crashing_ranks, tmp_path, pg_timeout=3.0, mode=mode)
    try:
        procs[0].join(DEADLINE_S)
        alive = procs[0].is_alive()
    finally:
        kill(procs)
        del os.environ["KSAM_TEST_OUT"]
    assert not alive, f"rank 0 still running {DEADLINE_S}s after its peer was lost"
    assert procs[0].exitcode not in (0, None), "rank 0 should exit with an error"
    rec = torch.load(tmp_path / "survivor.pt", weights_only=False)
    assert isinstance(rec["error"], str) and rec["error"]
    assert rec["elapsed"] < 15.0, rec  # the 3 s process-group timeout, or sooner
    if mode == "crash":
        assert procs[1].exitcode == 7
    assert time.monotonic() - t0 < DEADLINE_S


# ------------------------------------------------------------------------- shard, setup
@pytest.mark.parametrize("n", [1, 7, 10, 64])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_shard_covers_each_example_once(n, world):
    for epoch in (0, 1):
        parts = [kd.shard_indices(n, r, world, seed=5, epoch=epoch) for r in range(world)]
        per_rank = -(-n // world)
        assert all(len(p) == per_rank for p in parts)
        flat = torch.cat(parts)
        counts = torch.bincount(flat, minlength=n)
        assert (counts >= 1).all()  # every example on some rank
        assert int((counts - 1).sum()) == per_rank * world - n  # only the wrap padding repeats
        sampler = torch.utils.data.DistributedSampler(range(n), num_replicas=world, rank=0,
                                                      shuffle=True, seed=5)
        for r in range(world):
            sampler.rank = r
            sampler.set_epoch(epoch)
            assert parts[r].tolist() == list(sampler), "differs from DistributedSampler"
    if n >= world:
        for r in range(world):
            dl = kd.shard_indices(n, r, world, seed=5, drop_last=True)
            assert len(dl) == n // world
        dropped = torch.cat([kd.shard_indices(n, r, world, seed=5, drop_last=True)
                             for r in range(world)])
        assert len(set(dropped.tolist())) == len(dropped)


def test_shard_batch_and_epochs():
    x = torch.arange(10.0).unsqueeze(1)
    y = torch.arange(10)
    a = kd.shard({"x": x, "y": y}, 0, 2, seed=1, epoch=0)
    b = kd.shard({"x": x, "y": y}, 1, 2, seed=1, epoch=0)
    assert torch.equal(a["x"].squeeze(1).long(), a["y"])
    assert sorted(a["y"].tolist() + b["y"].tolist()) == list(range(10))
    assert torch.equal(kd.shard(y, 0, 2, 1, 0), a["y"])  # same seed + epoch: same split
    assert not torch.equal(kd.shard(y, 0, 2, 1, 1), a["y"])  # a new epoch reshuffles
    assert kd.shard(y, 1, 2, shuffle=False).tolist() == [1, 3, 5, 7, 9]
    with pytest.raises(ValueError):
        kd.shard_indices(10, 2, 2)


def test_single_process_fallbacks(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    info = kd.setup(device="cpu")
    assert (info.rank, info.world_size, info.backend, info.distributed) == (0, 1, None, False)
    assert not dist.is_initialized()
    assert kd.is_main_process() and kd.get_world_size() == 1
    kd.barrier()
    kd.cleanup()
    model = net(0)
    assert kd.wrap(model, "cpu") is model and kd.unwrap(model) is model
    # without a process group the global rule is TopLoss
    scores = torch.tensor([0.5, 2.0, 2.0, 1.0, 3.0])
    ctx = ksam.SelectionContext(batch_size=5, device=torch.device("cpu"), scores=scores)
    rule = kd.GlobalTopLoss(0.6)
    sel = rule.select(ctx)
    assert torch.equal(sel.index, ksam.TopLoss(0.6).select(ctx).index)
    losses = torch.tensor([1.0, 2.0, 4.0])
    assert rule.reduce(losses, sel) == losses.mean()
    # single-process kd.create with selection="global" equals ksam.create bit for bit
    x, y = dataset(16)
    runs = []
    for make in (lambda m, o: kd.create("ksam", m, o, k=0.25, k_warmup=1, seed=0,
                                        selection="global"),
                 lambda m, o: ksam.create("ksam", m, o, k=0.25, k_warmup=1, seed=0)):
        m = net(0)
        eng = make(m, torch.optim.SGD(m.parameters(), lr=0.1))
        for _ in range(3):
            eng.step((x, y), ce)
        runs.append(params(m))
    for p, q in zip(*runs):
        assert torch.equal(p, q)
    with pytest.raises(ValueError, match="no top-K"):
        kd.create("sam", model, torch.optim.SGD(model.parameters(), lr=0.1), selection="global")
    with pytest.raises(ValueError, match="selection"):
        kd.create("ksam", model, torch.optim.SGD(model.parameters(), lr=0.1), selection="all")


def test_setup_rejects_bad_environment():
    with pytest.raises(RuntimeError, match="MASTER_ADDR"):
        kd.setup(device="cpu", env={"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"})
    with pytest.raises(ValueError, match="RANK"):
        kd.setup(device="cpu", env={"RANK": "3", "WORLD_SIZE": "2"})
    with pytest.raises(ValueError, match="timeout"):
        kd.setup(device="cpu", timeout=0, env={})
