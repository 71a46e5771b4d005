"""FSDP2 (torch.distributed.fsdp.fully_shard) support, on the CPU: gloo, 2 spawned processes.

The ranks run through :mod:`distributed_harness`. Every parameter is a DTensor holding half of
the rows on each rank; the engine computes its norms over both shards (every rule that takes
one: SAM's, ASAM's, ESAM's, MSAM's, LookSAM's), so 2 ranks with batch b step as one process
with batch 2b (up to float summation order). Every method under FSDP2 against DDP is in
test_distributed.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from distributed_harness import SCHEDULE, WORLD, bn_net, ce, full_params, mlp, spawn
from distributed_harness import data as dataset
from torch import nn

import ksam
from ksam import distributed as kd
from ksam.params import ParameterSet, Sharding, sharded_norm

pytestmark = [
    pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                       reason="needs torch.distributed gloo"),
    pytest.mark.skipif(not kd.fsdp_available(), reason="needs FSDP2 (torch >= 2.6)"),
]

CONFIGS: dict[str, dict[str, Any]] = {
    "sam": dict(method="sam", rho=0.5),
    "asam": dict(method="asam", rho=0.5),
    "ksam-global": dict(method="ksam", select="top", k=0.25, k_warmup=0, rho=0.5,
                        selection="global"),
    "osgd-global": dict(method="osgd", k=5, selection="global"),
    "sgd": dict(method="sgd"),
    "sam-chunks-clip": dict(method="sam", rho=0.5, micro_batch_size=3, max_grad_norm=0.2),
    # gamma=1: the descent on every row (ESAM's loss-increase selection is per rank)
    "esam": dict(method="esam", rho=0.5, gamma=1.0),
    # MSAM's perturbation -rho v/||v|| and LookSAM's direction v and its ||g|| v: norms
    # over both shards (and LookSAM's stored v, one shard per rank)
    "msam": dict(method="msam", rho=0.5),
    "looksam": dict(method="looksam", rho=0.5, interval=2, alpha=0.7),
    # plain steps of the schedule (a whole-batch step; K-SAM's on the global top-K rows)
    "sam+schedule": dict(method="sam", rho=0.5, **SCHEDULE),
    "ksam-global+schedule": dict(method="ksam", select="top", k=0.25, k_warmup=0, rho=0.5,
                                 selection="global", **SCHEDULE),
    "rst": dict(method="rst", rho=0.5),
    # the method's own constructor on the FSDP2 model, no ksam.distributed.create
    "sam-plain-constructor": dict(method="sam", rho=0.5, constructor=True),
}
STEPS, B = 4, 10


def _batches() -> list:
    x, y = dataset(STEPS * WORLD * B, seed=3)
    n = WORLD * B
    return [(x[s * n:(s + 1) * n], y[s * n:(s + 1) * n]) for s in range(STEPS)]


_full = full_params


def _equiv_ranks(info: kd.DistInfo) -> dict:
    out: dict[str, Any] = {}
    for name, cfg in CONFIGS.items():
        opts = dict(cfg)
        method = opts.pop("method")
        model = kd.wrap(mlp(0), info.device, fsdp=True)
        opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
        make = ksam.create if opts.pop("constructor", False) else kd.create
        eng = make(method, model, opt, seed=0, **opts)
        norms, descent, sharp = [], [], []
        for xb, yb in _batches():
            rows = slice(info.rank * B, (info.rank + 1) * B)
            result = eng.step((xb[rows], yb[rows]), ce)
            descent.append(float(result.descent_grad_norm))
            sharp.append(result.sharp)
            if result.ascent_grad_norm is not None:
                norms.append(float(result.ascent_grad_norm))
        shapes = [tuple(p.to_local().shape) for p in model.parameters()]
        out[name] = {"params": _full(model), "norms": norms, "descent": descent,
                     "shapes": shapes, "sharp": sharp, "skipped": eng.skipped_steps}
    return out


def test_fsdp_matches_single_process(tmp_path):
    ranks = spawn(_equiv_ranks, tmp_path)
    for name, cfg in CONFIGS.items():
        opts = dict(cfg)
        method = opts.pop("method")
        opts.pop("selection", None)
        opts.pop("constructor", None)
        model = mlp(0)
        opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
        eng = ksam.create(method, model, opt, seed=0, **opts)
        norms, descent, sharp = [], [], []
        for batch in _batches():
            result = eng.step(batch, ce)
            descent.append(float(result.descent_grad_norm))
            sharp.append(result.sharp)
            if result.ascent_grad_norm is not None:
                norms.append(float(result.ascent_grad_norm))
        if method in ("looksam", "rst") or "p" in opts:  # plain and sharp steps both
            assert set(sharp) == {True, False}, (name, sharp)
        for r in ranks:
            assert r[name]["skipped"] == 0
            assert r[name]["sharp"] == sharp, name
            # really sharded: the first Linear's 16 rows split 8 + 8
            assert r[name]["shapes"][0] == (8, 6), r[name]["shapes"]
            assert r[name]["norms"] == pytest.approx(norms, rel=1e-5), name
            assert r[name]["descent"] == pytest.approx(descent, rel=1e-5), name
            for p, q in zip(r[name]["params"], model.parameters()):
                torch.testing.assert_close(p, q.detach(), rtol=1e-5, atol=1e-6, msg=name)


def _rules_ranks(info: kd.DistInfo) -> dict:
    """BatchNorm statistics, a NaN on one rank, and a distributed-checkpoint round trip."""
    out: dict[str, Any] = {}
    x, y = dataset(WORLD * B, seed=5)
    rows = slice(info.rank * B, (info.rank + 1) * B)
    xb, yb = x[rows], y[rows]
    # BatchNorm: the scoring pass at w alone moves the statistics (a train-mode forward).
    ref = bn_net(0)
    with torch.no_grad():
        ref(xb)
    model = kd.wrap(bn_net(0), info.device, fsdp=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    eng = kd.create("ksam", model, opt, seed=0, k=0.25, rho=0.5)
    eng.step((xb, yb), ce)
    out["bn_equal"] = all(torch.equal(a, b) for a, b in zip(model.buffers(), ref.buffers()))
    # NaN in rank 1's batch only: both ranks skip; nothing moves.
    before = _full(model)
    buffers = [b.clone() for b in model.buffers()]
    bad = xb.clone()
    if info.rank == 1:
        bad[0, 0] = float("nan")
    result = eng.step((bad, yb), ce)
    out["skipped"] = (result.skipped, eng.skipped_steps)
    out["unchanged"] = all(torch.equal(a, b) for a, b in zip(before, _full(model))) and all(
        torch.equal(a, b) for a, b in zip(buffers, model.buffers()))
    # Checkpoint: a full state_dict, loaded into a fresh sharded model, continues identically.
    state = kd.state_dict(eng)
    out["keys"] = sorted(state["model"])
    eng.step((xb, yb), ce)
    after = _full(model)
    model2 = kd.wrap(bn_net(7), info.device, fsdp=True)
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.2, momentum=0.9)
    eng2 = kd.create("ksam", model2, opt2, seed=1, k=0.25, rho=0.5)
    kd.load_state_dict(eng2, state)
    eng2.step((xb, yb), ce)
    out["resumed_equal"] = all(torch.equal(a, b) for a, b in zip(after, _full(model2)))
    out["steps"] = (eng.steps, eng2.steps, eng2.skipped_steps)
    return out


def test_fsdp_batchnorm_nan_skip_and_checkpoint(tmp_path):
    ranks = spawn(_rules_ranks, tmp_path)
    for r in ranks:
        assert r["bn_equal"]
        assert r["skipped"] == (True, 1)
        assert r["unchanged"]
        assert r["keys"] == sorted(bn_net(0).state_dict())
        assert r["resumed_equal"]
        assert r["steps"] == (3, 3, 1)


def _partial_ranks(info: kd.DistInfo) -> str:
    model = mlp(0).to(info.device)
    from torch.distributed.fsdp import fully_shard

    fully_shard(model[0])  # the last Linear stays unsharded
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    try:
        ksam.create("sam", model, opt)
    except ValueError as exc:
        return str(exc)
    return "accepted"


def test_fsdp_refuses_a_partly_sharded_model(tmp_path):
    for message in spawn(_partial_ranks, tmp_path):
        assert "2 of the optimizer's parameters are not sharded" in message


def test_sharded_norm_is_the_norm_of_the_whole():
    """The arithmetic alone (one process): squares of the shards' norms add up."""
    g = torch.Generator().manual_seed(0)
    whole = [torch.randn(7, 3, generator=g), torch.randn(5, generator=g)]
    shards = [[t[:4] for t in whole], [t[4:] for t in whole]]
    local = [torch.linalg.vector_norm(torch.stack(torch._foreach_norm(s))) for s in shards]
    total = sharded_norm(local)  # no process group: the local sum
    assert not dist.is_initialized()
    torch.testing.assert_close(total, torch.linalg.vector_norm(local[0]).square().add(
        local[1].square()).sqrt())
    model = nn.Linear(3, 7)  # whole tensors: the norm of a list is over every element
    unsharded = ParameterSet(model, torch.optim.SGD(model.parameters(), lr=0.1))
    assert unsharded.sharding is None and not unsharded.sharded
    torch.testing.assert_close(unsharded.norm(whole), total)
    assert Sharding.of([torch.zeros(2)]) is None


class _Interrupt(Exception):
    pass


def _train_ranks(info: kd.DistInfo, out: str) -> dict:
    """`ksam train --fsdp` under torchrun: an uninterrupted run, and one stopped after its
    first epoch's checkpoint and resumed."""
    from ksam.lab.train import TrainConfig, train

    def cfg() -> TrainConfig:
        return TrainConfig(task="mnist1d", method="ksam", method_options={"k": 8}, epochs=2,
                           batch_size=32, device="cpu", fsdp=True,
                           task_options={"num_samples": 600})

    full = train(cfg(), out_dir=Path(out) / "full", dist_info=info)

    def stop(row: dict) -> None:
        raise _Interrupt

    try:
        train(cfg(), out_dir=Path(out) / "cut", dist_info=info, on_epoch=stop)
    except _Interrupt:
        kd.barrier()  # rank 0 has written the checkpoint that every rank resumes from
    resumed = train(cfg(), out_dir=Path(out) / "cut", dist_info=info, resume=True)
    return {"full": _full(full["model"]), "resumed": _full(resumed["model"]),
            "shards": [tuple(p.to_local().shape) for p in full["model"].parameters()]}


def test_train_fsdp_resumes_exactly(tmp_path):
    (tmp_path / "ranks").mkdir()
    ranks = spawn(_train_ranks, tmp_path / "ranks", out=str(tmp_path))
    for r in ranks:
        for a, b in zip(r["full"], r["resumed"]):
            assert torch.equal(a, b)
    assert ranks[0]["shards"] != [tuple(p.shape) for p in ranks[0]["full"]]  # sharded
    # the checkpoint holds whole tensors under the model's own names: one process loads it
    from ksam.lab.train import load_checkpoint

    ckpt = load_checkpoint(tmp_path / "cut" / "checkpoint.pt")
    assert ckpt["epoch"] == 2 and ckpt["config"]["fsdp"]
    for key, value in ckpt["model"].items():
        assert not hasattr(value, "placements"), key
    from ksam.lab.tasks import get_task

    model = get_task("mnist1d", device="cpu", num_samples=600).make_model()
    model.load_state_dict(ckpt["model"])
    for a, b in zip(model.parameters(), ranks[0]["full"]):
        assert torch.equal(a.detach(), b)


def _global_chunks_ranks(info: kd.DistInfo) -> str:
    model = kd.wrap(mlp(0), info.device, fsdp=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    try:
        kd.create("ksam", model, opt, k=0.25, selection="global", micro_batch_size=4)
    except ValueError as exc:
        return str(exc)
    return "accepted"


def test_fsdp_refuses_global_selection_in_chunks(tmp_path):
    for message in spawn(_global_chunks_ranks, tmp_path):
        assert "micro_batch_size with selection='global' is not possible" in message
