"""Data-parallel training on the CPU (gloo, 2 spawned processes): DistributedDataParallel,
FSDP2 for every method, ksam.distributed's launch helpers and its cross-rank selection.

The ranks run through :mod:`distributed_harness` (spawned processes, results via files, a
deadline). Spawning is slow, so one spawn runs every method of a mode and each rank returns a
record per case; the tests then check each case and name every one that fails.
"""

from __future__ import annotations

import os
import re
import time
import traceback
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.distributed as dist
from distributed_harness import (
    GLOBAL,
    NUM_EXAMPLES,
    SCHEDULE,
    SCHEDULED,
    WORLD,
    bn_net,
    ce,
    data,
    full_params,
    kill,
    method_cases,
    mlp,
    params,
    spawn,
    start,
)
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import ksam
from ksam import distributed as kd
from ksam.lab.tasks import cross_entropy_output
from ksam.selection import RULES

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed gloo"
)

DEADLINE_S = 90.0  # hang guard for a multi-process test (start-up included)
EVERY_METHOD_DEADLINE_S = 300.0  # one spawn that runs every method of a mode

# ------------------------------------------------------ every method, DDP and FSDP2 alike
STEPS, B = 8, 16  # steps of a case; rows per rank and step

#: Settings the engine refuses with a clear ValueError instead of running them wrongly:
#: ``{(mode, case): regular expression the message must match}``, mode one of "ddp-per-rank",
#: "ddp-sync", "fsdp", "global". A case listed here must be refused; any other must run.
REFUSED: dict[tuple[str, str], str] = {
    # MESA's average is a full copy of the model: refused on a sharded one.
    ("fsdp", "mesa"): "FSDP-sharded model is not supported",
}

#: Cases built with the method's own constructor on a DDP / FSDP2 model (no
#: ksam.distributed.create); rank 1's batch of step NAN_STEP holds a NaN, so the engine must
#: make every rank skip that step by itself.
PLAIN: dict[str, tuple[Callable, dict[str, Any]]] = {
    "KSAM(model)": (ksam.KSAM, dict(k=0.25, k_warmup=2, rho=0.1)),
    "SAM(model)": (ksam.SAM, dict(rho=0.1)),
}
NAN_STEP = 3

CASES = method_cases()
# the schedule is taken by these cases, which must show plain and sharp steps both
# (MESA's start_step starts its KL term; every step of MESA is of one kind)
MIXED = {name for name, (method, opts) in CASES.items()
         if method != "mesa" and ("p" in opts or "start_step" in opts or method == "looksam")}


def test_every_method_is_covered():
    """The case table holds every method of ksam.METHODS and K-SAM with every select= rule,
    the scheduled methods with and without the schedule."""
    assert {method for method, _ in CASES.values()} == set(ksam.METHODS)
    assert {name.split(":")[1] for name, (method, opts) in CASES.items()
            if method == "ksam" and "select" in opts and "+" not in name} == set(RULES)
    for method in SCHEDULED:
        scheduled = [o for m, o in CASES.values() if m == method and o.get("p") == SCHEDULE["p"]]
        unscheduled = [o for m, o in CASES.values() if m == method and "p" not in o]
        assert scheduled and unscheduled, method
    assert {m for m, o in CASES.values() if o.get("selection") == "global"} == set(GLOBAL)


def _batches(rank: int, nan_step: int | None = None) -> list:
    """This rank's rows of each step's global batch (rank r: rows r*B .. r*B+B-1 of a data
    set of NUM_EXAMPLES rows, cycled), with their global ids."""
    x, y = data(NUM_EXAMPLES, seed=11)
    per_pass = NUM_EXAMPLES // (WORLD * B)
    out = []
    for s in range(STEPS):
        start = ((s % per_pass) * WORLD + rank) * B
        ids = torch.arange(start, start + B)
        xb = x[ids].clone()
        if s == nan_step and rank == 1:
            xb[0, 0] = float("nan")
        out.append(ksam.IndexedBatch((xb, y[ids]), ids))
    return out


_stand_ins: list[int] = []


def _count_stand_ins() -> None:
    """Count, in this rank's process, the selections that are a weight-0 stand-in row."""
    select = kd.GlobalTopLoss.select

    def counted(self, ctx):
        sel = select(self, ctx)
        _stand_ins.append(int(sel.scale is not None and float(sel.scale) == 0.0))
        return sel

    kd.GlobalTopLoss.select = counted


def _model(info: kd.DistInfo, mode: str, plain: bool, esam_sync: bool) -> nn.Module:
    if mode == "fsdp":  # FSDP2 shards what each rank holds: every rank starts from one init
        model = bn_net(100)
        return kd.fully_shard(model) if plain else kd.wrap(model, info.device, fsdp=True)
    model = bn_net(100 + info.rank)  # DDP's construction-time broadcast aligns the ranks
    if plain:  # torch's own defaults, buffer broadcast in forwards included
        return DistributedDataParallel(model)
    # ESAM's random ascent mask leaves parameters without an ascent gradient: a synchronized
    # ascent needs DDP to look for unused parameters (the engine says so otherwise)
    return kd.wrap(model, info.device, find_unused_parameters=esam_sync)


def _run_case(info: kd.DistInfo, mode: str, method: str | Callable, opts: dict[str, Any],
              sync: bool | None) -> dict[str, Any]:
    opts = dict(opts)
    plain = callable(method)
    model = _model(info, mode, plain, method == "esam" and bool(sync))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    if sync is not None:
        opts["sync_perturbation"] = sync
    _stand_ins.clear()
    try:
        eng = method(model, opt, seed=0, **opts) if plain else \
            kd.create(method, model, opt, seed=0, **opts)
    except ValueError as exc:
        return {"refused": str(exc)}
    init = full_params(model)
    rec: dict[str, Any] = {"sharp": [], "skipped": [], "ascent_norm": [], "descent_norm": []}
    try:
        for batch in _batches(info.rank, NAN_STEP if plain else None):
            result = eng.step(batch, cross_entropy_output)
            rec["sharp"].append(getattr(result, "sharp", None))
            rec["skipped"].append(bool(result.skipped))
            a = result.ascent_grad_norm
            rec["ascent_norm"].append(None if a is None else float(a))
            rec["descent_norm"].append(float(result.descent_grad_norm))
    except Exception as exc:  # noqa: BLE001 - reported per case by the test
        return {"error": f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"}
    rec.update(init=init, params=full_params(model), stand_ins=sum(_stand_ins),
               buffers=[b.detach().clone() for b in model.buffers()],
               skipped_steps=eng.skipped_steps)
    return rec


def _every_method_ranks(info: kd.DistInfo, mode: str) -> dict:
    """Every case of ``mode`` ("ddp": per-rank and synchronized perturbation; "fsdp")."""
    _count_stand_ins()
    syncs = (False, True) if mode == "ddp" else (None,)
    out: dict[tuple[str, bool | None], dict] = {}
    for sync in syncs:
        for name, (method, opts) in CASES.items():
            out[name, sync] = _run_case(info, mode, method, opts, sync)
        for name, (cls, opts) in PLAIN.items():
            out[name, sync] = _run_case(info, mode, cls, opts, sync)
    return out


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b))


def _refusal(mode: str, name: str, rec: dict) -> str | None:
    """None when the case ran or was refused as REFUSED lists it; else what went wrong."""
    expected = REFUSED.get((mode, name))
    if "refused" in rec:
        if expected is None:
            return f"{mode} {name}: refused, not listed in REFUSED: {rec['refused']}"
        if not re.search(expected, rec["refused"]):
            return f"{mode} {name}: refused with an unclear message: {rec['refused']}"
        return None
    if expected is not None:
        return f"{mode} {name}: listed in REFUSED but ran"
    if "error" in rec:
        return f"{mode} {name}: failed: {rec['error']}"
    return None


def _rank_agreement(mode: str, name: str, r0: dict, r1: dict) -> list[str]:
    """What both ranks of one case must share: the schedule, no skips (but NAN_STEP's)."""
    bad = []
    if r0["sharp"] != r1["sharp"]:
        bad.append(f"{mode} {name}: the ranks disagree on the sharp steps: "
                   f"{r0['sharp']} vs {r1['sharp']}")
    plain = name in PLAIN
    skips = [s == NAN_STEP for s in range(STEPS)] if plain else [False] * STEPS
    for r, rec in enumerate((r0, r1)):
        if rec["skipped"] != skips or rec["skipped_steps"] != sum(skips):
            bad.append(f"{mode} {name}: rank {r} skipped {rec['skipped']}, expected {skips}")
    if name in MIXED and set(r0["sharp"]) != {True, False}:
        bad.append(f"{mode} {name}: the schedule left no plain or no sharp step: {r0['sharp']}")
    if name == "ksam-global-k1" and r0["stand_ins"] + r1["stand_ins"] != 2 * STEPS:
        # the k=1 global cut lies on one rank per step: the other runs its weight-0 stand-in
        # in the ascent and in the descent
        bad.append(f"{mode} {name}: {r0['stand_ins']} + {r1['stand_ins']} stand-in rows, "
                   f"expected {2 * STEPS}")
    if all(torch.equal(p, q) for p, q in zip(r0["init"], r0["params"])):
        bad.append(f"{mode} {name}: the weights did not move")
    return bad


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory) -> list:
    return spawn(_every_method_ranks, tmp_path_factory.mktemp("ddp"),
                 deadline_s=EVERY_METHOD_DEADLINE_S, mode="ddp")


def test_every_method_keeps_ddp_replicas_identical(ddp_runs):
    """Every method, per-rank and synchronized perturbation: after STEPS steps both ranks hold
    the same weights bit for bit (DDP's all-reduce hands both ranks the same averaged
    gradient, and a perturbation is restored bit for bit). Each rank's BatchNorm statistics
    are its own (no buffer sync in forwards), so only the parameters are compared."""
    r0, r1 = ddp_runs
    failures = []
    for name in [*CASES, *PLAIN]:
        for sync in (False, True):
            mode = "ddp-sync" if sync else "ddp-per-rank"
            a, b = r0[name, sync], r1[name, sync]
            problem = _refusal(mode, name, a) or _refusal(mode, name, b)
            if problem or "refused" in a:
                failures += [problem] if problem else []
                continue
            failures += _rank_agreement(mode, name, a, b)
            if not all(torch.equal(p, q) for p, q in zip(a["params"], b["params"])):
                failures.append(f"{mode} {name}: the ranks' weights differ, max |w0 - w1| = "
                                f"{_max_diff(a['params'], b['params']):.3g}")
    assert not failures, "\n".join(failures)


@pytest.mark.skipif(not kd.fsdp_available(), reason="needs FSDP2 (torch >= 2.6)")
def test_every_method_under_fsdp_steps_as_ddp_with_synchronized_perturbation(ddp_runs, tmp_path):
    """Every method on an FSDP2-sharded model: the gathered weights, each rank's BatchNorm
    statistics, the schedule and the gradient norms equal those of the same run under DDP
    with a synchronized perturbation, where every tensor is whole: the ascent and descent
    gradients are averaged alike, and every norm is taken over all shards.

    Tolerance: FSDP2 reduce-scatters each gradient and sums the squares of the shards' norms,
    DDP all-reduces whole buckets and takes one norm: the same sums in another order, a
    rounding difference of float32 that 8 momentum steps carry along (at most 5e-7 here, in
    the k=1 case whose single row makes the largest gradients).
    """
    fsdp = spawn(_every_method_ranks, tmp_path, deadline_s=EVERY_METHOD_DEADLINE_S,
                 mode="fsdp")
    failures = []
    for name in [*CASES, *PLAIN]:
        recs = [fsdp[r][name, None] for r in range(WORLD)]
        problem = _refusal("fsdp", name, recs[0]) or _refusal("fsdp", name, recs[1])
        if problem or "refused" in recs[0]:
            failures += [problem] if problem else []
            continue
        failures += _rank_agreement("fsdp", name, *recs)
        for r, rec in enumerate(recs):
            ref = ddp_runs[r][name, True]
            if "params" not in ref:
                failures.append(f"fsdp {name}: no DDP run to compare with ({ref})")
                break
            if rec["sharp"] != ref["sharp"]:
                failures.append(f"fsdp {name}: sharp steps {rec['sharp']}, DDP {ref['sharp']}")
            # torch's DDP of a PLAIN case broadcasts rank 0's statistics in every forward
            for what in ("params",) if name in PLAIN else ("params", "buffers"):
                if not all(torch.allclose(p, q, rtol=1e-5, atol=1e-6)
                           for p, q in zip(rec[what], ref[what])):
                    failures.append(f"fsdp {name}: rank {r}'s {what} differ from DDP's, max "
                                    f"difference {_max_diff(rec[what], ref[what]):.3g}")
            for what in ("ascent_norm", "descent_norm"):
                got = [v for v in rec[what] if v is not None]
                want = [v for v in ref[what] if v is not None]
                if len(got) != len(want) or got != pytest.approx(want, rel=1e-5, nan_ok=True):
                    failures.append(f"fsdp {name}: rank {r}'s {what} {got}, DDP {want}")
    assert not failures, "\n".join(failures)


# ---------------------------------------------- 2 ranks x b == 1 process x 2b (sync, global)
EQUIV_CONFIGS: dict[str, dict[str, Any]] = {
    # select="top": the global top-K and its one-process reference take the same rule
    "ksam": dict(method="ksam", select="top", k=0.25, k_warmup=0, rho=0.5),
    # descent subset schedule on the global batch: 20, 20, 10, 10, 5, 5 rows
    "ksam-warmup": dict(method="ksam", select="top", k=0.25, k_warmup=2, rho=0.5),
    "ksam-k-int": dict(method="ksam", select="top", k_ascent=3, k_descent=0.5, k_warmup=0,
                       rho=0.5),
    "ksam-plain": dict(method="ksam-plain", k=0.25, rho=0.5),  # no warmup, no rescale
    "sam": dict(method="sam", rho=0.5),
    "osgd": dict(method="osgd", k=5),
}
# the same with the schedule: a plain step descends on the global top-K rows too
EQUIV_CONFIGS.update({f"{name}+schedule": dict(cfg, **SCHEDULE) for name, cfg in
                      list(EQUIV_CONFIGS.items()) if name not in ("osgd", "ksam-k-int")})
EQUIV_STEPS, EQUIV_B = 6, 10
PER_RANK_TOO = ("ksam", "sam")  # also run with per-rank perturbation, which must differ


def _equiv_batches():
    x, y = data(EQUIV_STEPS * WORLD * EQUIV_B, seed=3)
    return [(x[s * WORLD * EQUIV_B:(s + 1) * WORLD * EQUIV_B],
             y[s * WORLD * EQUIV_B:(s + 1) * WORLD * EQUIV_B]) for s in range(EQUIV_STEPS)]


def _equiv_ranks(info: kd.DistInfo) -> dict:
    out: dict[tuple[str, bool], Any] = {}
    for name, cfg in EQUIV_CONFIGS.items():
        for sync in (True, False) if name in PER_RANK_TOO else (True,):
            opts = dict(cfg)
            method = opts.pop("method")
            model = mlp(0)
            ddp = kd.wrap(model, info.device)
            opt = torch.optim.SGD(ddp.parameters(), lr=0.2, momentum=0.9)
            selection = "global" if method != "sam" else "local"
            try:
                eng = kd.create(method, ddp, opt, seed=0, selection=selection,
                                sync_perturbation=sync, **opts)
            except ValueError as exc:
                out[name, sync] = {"refused": str(exc)}
                continue
            sharp = []
            for xb, yb in _equiv_batches():
                rows = slice(info.rank * EQUIV_B, (info.rank + 1) * EQUIV_B)
                sharp.append(getattr(eng.step((xb[rows], yb[rows]), ce), "sharp", None))
            out[name, sync] = {"params": params(model), "sharp": sharp}
    return out


def test_sync_global_matches_single_process(tmp_path):
    """Synchronized perturbation and global top-K: 2 ranks with b rows each step as one
    process with the 2b rows joined, plain steps of a schedule included (tolerance: the mean
    over 2b rows against the mean of two means of b, float32 rounding)."""
    ranks = spawn(_equiv_ranks, tmp_path)
    failures = []
    for name, cfg in EQUIV_CONFIGS.items():
        cfg = dict(cfg)
        method = cfg.pop("method")
        model = mlp(0)
        opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
        eng = ksam.create(method, model, opt, seed=0, **cfg)
        sharp = [getattr(eng.step(batch, ce), "sharp", None) for batch in _equiv_batches()]
        single = params(model)
        if "p" in cfg:
            assert set(sharp) == {True, False}, f"{name}: the schedule took one kind of step"
        recs = [rank[name, True] for rank in ranks]
        problem = _refusal("global", name, recs[0]) or _refusal("global", name, recs[1])
        if problem or "refused" in recs[0]:
            failures += [problem] if problem else []
            continue
        for r, rec in enumerate(recs):
            if rec["sharp"] != sharp:
                failures.append(f"global {name}: rank {r}'s sharp steps {rec['sharp']}, one "
                                f"process {sharp}")
            if not all(torch.allclose(p, q, atol=2e-6, rtol=1e-5)
                       for p, q in zip(rec["params"], single)):
                failures.append(f"global {name}: rank {r} differs from one process, max "
                                f"difference {_max_diff(rec['params'], single):.3g}")
        if name in PER_RANK_TOO:  # per-rank perturbation is a different (m-sharpness) step
            gap = _max_diff(ranks[0][name, False]["params"], single)
            if gap <= 1e-4:
                failures.append(f"{name}: per-rank perturbation equals the global one")
    assert not failures, "\n".join(failures)


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
    x_all, y_all = data(WORLD * steps * 8)
    x, y = kd.shard((x_all, y_all), seed=0, epoch=0)
    out = {}
    real_all_gather = getattr(dist, GATHER)
    for name, cfg in COUNT_CONFIGS.items():
        cfg = dict(cfg)
        method = cfg.pop("method")
        group = CountingGroup(dist.group.WORLD)
        model = bn_net(0)
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
        ctx = ksam.selection.SelectionContext(batch_size=4, device=device, scores=scores)
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
        sel = rule.select(ksam.selection.SelectionContext(batch_size=4, device=device,
                                                          scores=scores))
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
    model = bn_net(0)
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

    # a step whose loss is not finite on rank 0 only (gradients finite): all ranks skip it;
    # with each rank's own verdict (finite_reducer=identity) only rank 0 would
    for agree in (True, False):
        model = mlp(0)
        ddp = kd.wrap(model)
        own = {} if agree else {"finite_reducer": lambda flag: flag}
        eng = kd.create("ksam", ddp, torch.optim.SGD(ddp.parameters(), lr=0.1), k=0.5, **own)
        x, y = data(8)

        def poisoned(m, batch, rank=info.rank):
            losses = ce(m, batch)
            if rank == 0 and not torch.is_grad_enabled():  # rank 0's scoring pass only
                losses = losses + torch.tensor([float("inf")] + [0.0] * 7)
            return losses

        eng.step((x, y), poisoned)
        out["skip", agree] = (eng.skipped_steps, params(model))
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
    model = mlp(0)
    ddp = kd.wrap(model, info.device)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    eng = kd.create("ksam", ddp, opt, k=0.5, seed=0)
    x, y = data(8)
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
    model = mlp(0)
    assert kd.wrap(model, "cpu") is model and kd.unwrap(model) is model
    # without a process group the global rule is TopLoss
    scores = torch.tensor([0.5, 2.0, 2.0, 1.0, 3.0])
    ctx = ksam.selection.SelectionContext(batch_size=5, device=torch.device("cpu"), scores=scores)
    rule = kd.GlobalTopLoss(0.6)
    sel = rule.select(ctx)
    assert torch.equal(sel.index, ksam.selection.TopLoss(0.6).select(ctx).index)
    losses = torch.tensor([1.0, 2.0, 4.0])
    assert rule.reduce(losses, sel) == losses.mean()
    # single-process kd.create with selection="global" equals ksam.create bit for bit
    x, y = data(16)
    runs = []
    for scope in ("global", None):
        m = mlp(0)
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        if scope == "global":  # said, not silently ignored
            with pytest.warns(UserWarning, match="without a process group"):
                eng = kd.create("ksam", m, opt, k=0.25, k_warmup=1, seed=0, selection="global")
        else:
            eng = ksam.create("ksam", m, opt, k=0.25, k_warmup=1, seed=0, select="top")
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
