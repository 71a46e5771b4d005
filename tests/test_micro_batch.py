"""Micro-batched steps (``micro_batch_size``) and descent-gradient clipping (``max_grad_norm``)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ksam

METHODS = ["sgd", "sam", "asam", "ksam", "ksam-plain", "random-sam", "esam", "osgd"]


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, 4))


def bn_net(seed: int = 0, momentum: float | None = 0.1) -> nn.Module:
    """One BatchNorm layer whose input is the first Linear's output (no BatchNorm before)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16, momentum=momentum), nn.ReLU(),
                         nn.Linear(16, 4))


def data(n: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g), torch.randint(0, 4, (n,), generator=g)


def ce(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y, reduction="none")


class Recorder:
    """A loss_fn that records every forward's size and whether it builds a graph."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, bool]] = []

    def __call__(self, model, batch):
        self.calls.append((len(batch[0]), torch.is_grad_enabled()))
        return ce(model, batch)


def engine(method: str, model: nn.Module, **kw) -> ksam.SharpnessAwareOptimizer:
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    return ksam.create(method, model, opt, seed=0, **kw)


# ------------------------------------------------------------------- forward sizes
def test_ksam_chunks_every_forward():
    """B=1024, K=128, chunks of 64: scoring in 16 gradient-free chunks, each gradient pass
    on the 128 selected rows in 2 chunks."""
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    eng = ksam.KSAM(model, opt, k=0.125, micro_batch_size=64, k_warmup=0)
    rec = Recorder()
    result = eng.step(data(1024), rec)
    assert rec.calls == [(64, False)] * 16 + [(64, True)] * 2 + [(64, True)] * 2
    assert result.ascent_indices.numel() == result.descent_indices.numel() == 128
    # K-SAM's default descent warm-up starts at the whole batch: 16 chunks with gradient
    rec.calls.clear()
    model = mlp()
    eng = ksam.KSAM(model, torch.optim.SGD(model.parameters(), lr=0.1), k=0.125,
                    micro_batch_size=64)
    eng.step(data(1024), rec)
    assert rec.calls == [(64, False)] * 16 + [(64, True)] * 2 + [(64, True)] * 16


@pytest.mark.parametrize("method,expected", [
    ("sam", [(30, True), (30, True), (4, True)] * 2),
    ("sgd", [(30, True), (30, True), (4, True)]),
    ("osgd", [(30, False), (30, False), (4, False), (16, True)]),
    # ESAM in chunks: losses at w+eps without a graph, then the selected rows with one
    ("esam", [(30, True), (30, True), (4, True), (30, False), (30, False), (4, False),
              (30, True), (2, True)]),
])
def test_pass_sizes_in_chunks(method, expected):
    rec = Recorder()
    eng = engine(method, mlp(), micro_batch_size=30, **({"k": 16} if method == "osgd" else {}))
    eng.step(data(64), rec)
    if method == "esam":  # the size of ESAM's descent subset depends on the losses
        assert rec.calls[:6] == expected[:6] and all(g for _, g in rec.calls[6:])
        assert sum(s for s, _ in rec.calls[6:]) == eng.descent.size(64)
    else:
        assert rec.calls == expected


# ------------------------------------------------------------- same step, chunked
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("chunk", [7, 64])
def test_chunked_step_equals_unchunked(method, chunk):
    """Same selections, same weights up to float summation order, same engine state."""
    a, b = mlp(), mlp()
    ea, eb = engine(method, a), engine(method, b, micro_batch_size=chunk)
    for s in range(3):
        batch = data(40, seed=s)
        ra, rb = ea.step(batch, ce), eb.step(batch, ce)
        assert torch.equal(ra.ascent_indices, rb.ascent_indices)
        assert torch.equal(ra.descent_indices, rb.descent_indices)
        assert ra.loss == pytest.approx(rb.loss, rel=1e-6)
        if ra.losses is not None:
            torch.testing.assert_close(ra.losses, rb.losses, rtol=1e-6, atol=1e-7)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    sa, sb = ea.state_dict(), eb.state_dict()
    assert sa.keys() == sb.keys()
    assert (sa["steps"], sa["skipped_steps"]) == (sb["steps"], sb["skipped_steps"])
    assert torch.equal(sa["generator"], sb["generator"])
    for key in sa["optimizer"]["state"]:
        torch.testing.assert_close(sa["optimizer"]["state"][key]["momentum_buffer"],
                                   sb["optimizer"]["state"][key]["momentum_buffer"],
                                   rtol=1e-5, atol=1e-6)


def test_chunked_step_with_grad_scaler_equals_unchunked():
    a, b = mlp(), mlp()
    ea = engine("ksam", a, grad_scaler=torch.amp.GradScaler("cpu", init_scale=1024.0))
    eb = engine("ksam", b, grad_scaler=torch.amp.GradScaler("cpu", init_scale=1024.0),
                micro_batch_size=5)
    for s in range(2):
        ea.step(data(32, seed=s), ce)
        eb.step(data(32, seed=s), ce)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------ BatchNorm
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("method", ["ksam", "sam"])
def test_batchnorm_in_chunks(method, momentum):
    """Each chunk is normalized with its own batch statistics; the running statistics change
    once per step, by the full-batch pass's statistics over all its chunks, and equal the
    unchunked step's (the layer's input does not depend on an earlier BatchNorm)."""
    x, y = data(48, seed=3)
    chunked, whole = bn_net(momentum=momentum), bn_net(momentum=momentum)
    reference = copy.deepcopy(chunked)
    eb = engine(method, chunked, micro_batch_size=20)
    ea = engine(method, whole)
    rb, ra = eb.step((x, y), ce), ea.step((x, y), ce)
    bn, bn_whole = chunked[1], whole[1]
    assert int(bn.num_batches_tracked) == int(bn_whole.num_batches_tracked) == 1
    torch.testing.assert_close(bn.running_mean, bn_whole.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn.running_var, bn_whole.running_var, rtol=1e-5, atol=1e-6)
    assert not torch.equal(bn.running_mean, reference[1].running_mean)
    # the losses at w are those of three separate forwards of 20, 20 and 8 rows, each
    # normalized by its own statistics (and not those of one forward over 48 rows)
    reference.train()
    for m in reference.modules():
        if isinstance(m, nn.BatchNorm1d):
            m.track_running_stats = False
    with torch.no_grad():
        per_chunk = torch.cat([ce(reference, (x[s:s + 20], y[s:s + 20])) for s in (0, 20, 40)])
    if method == "ksam":
        assert torch.equal(rb.losses, per_chunk)
        assert not torch.allclose(ra.losses, per_chunk)
    else:  # SAM's full-batch pass is its ascent: the losses come from it
        torch.testing.assert_close(rb.losses, per_chunk)
    # a second step: still exactly one update per step
    eb.step(data(48, seed=4), ce)
    assert int(bn.num_batches_tracked) == 2


def test_batchnorm_chunks_refuse_syncbatchnorm_and_compile():
    torch.manual_seed(0)
    sync = nn.Sequential(nn.Linear(6, 8), nn.SyncBatchNorm(8), nn.Linear(8, 4))
    with pytest.raises(ValueError, match="SyncBatchNorm"):
        engine("sam", sync, micro_batch_size=8)
    with pytest.raises(ValueError, match="compile does not support BatchNorm"):
        engine("sam", bn_net(), micro_batch_size=8, compile="eager")
    engine("sam", mlp(), micro_batch_size=8, compile="eager")  # no BatchNorm: fine


# ------------------------------------------------------------------------ NaN skip
@pytest.mark.parametrize("method", ["ksam", "sam"])
def test_nan_in_a_later_chunk_skips_the_step(method):
    model = bn_net()
    eng = engine(method, model, micro_batch_size=10)
    eng.step(data(40, seed=0), ce)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt_before = copy.deepcopy(eng.optimizer.state_dict())
    x, y = data(40, seed=1)
    x[35, 2] = float("nan")
    result = eng.step((x, y), ce)
    assert result.skipped and eng.skipped_steps == 1
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    for key, s in opt_before["state"].items():
        assert torch.equal(s["momentum_buffer"],
                           eng.optimizer.state_dict()["state"][key]["momentum_buffer"])
    assert not eng.step(data(40, seed=2), ce).skipped


# ------------------------------------------------------------------ max_grad_norm
def _descent_gradient(method: str, batch) -> tuple[list[torch.Tensor], float]:
    """The descent gradient of one step (plain SGD, lr 1: w_new = w - g) and its norm."""
    model = mlp()
    w = [p.detach().clone() for p in model.parameters()]
    eng = ksam.create(method, model, torch.optim.SGD(model.parameters(), lr=1.0), seed=0)
    result = eng.step(batch, ce)
    grads = [a - p.detach() for a, p in zip(w, model.parameters())]
    return grads, float(result.ascent_grad_norm) if result.ascent_grad_norm is not None else 0


@pytest.mark.parametrize("method", ["sam", "ksam", "sgd"])
@pytest.mark.parametrize("fast", [False, True])
def test_max_grad_norm_clips_the_descent_gradient(method, fast):
    batch = data(32)
    grads, ascent_norm = _descent_gradient(method, batch)
    total = float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))
    limit = total / 3
    model = mlp()
    w = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    eng = ksam.create(method, model, opt, seed=0, max_grad_norm=limit, fast_path=fast)
    result = eng.step(batch, ce)
    if fast:
        assert eng.fast_path_active
    assert float(result.descent_grad_norm) == pytest.approx(total, rel=1e-5)
    scale = limit / (total + 1e-6)
    for w0, p, g in zip(w, model.parameters(), grads):
        torch.testing.assert_close(p.detach(), w0 - g * scale, rtol=1e-5, atol=1e-6)
    if method != "sgd":  # the ascent gradient is not clipped
        assert float(result.ascent_grad_norm) == pytest.approx(ascent_norm, rel=1e-6)
    # a limit above the norm changes nothing
    model2 = mlp()
    eng2 = ksam.create(method, model2, torch.optim.SGD(model2.parameters(), lr=1.0), seed=0,
                       max_grad_norm=2 * total, fast_path=fast)
    eng2.step(batch, ce)
    for w0, p, g in zip(w, model2.parameters(), grads):
        torch.testing.assert_close(p.detach(), w0 - g, rtol=1e-5, atol=1e-6)


def test_max_grad_norm_after_grad_scaler_unscale():
    """The clip sees the unscaled gradient (GradScaler unscales once, before it)."""
    batch = data(32)
    plain, scaled = mlp(), mlp()
    ea = ksam.create("sam", plain, torch.optim.SGD(plain.parameters(), lr=1.0), seed=0,
                     max_grad_norm=0.05)
    eb = ksam.create("sam", scaled, torch.optim.SGD(scaled.parameters(), lr=1.0), seed=0,
                     max_grad_norm=0.05,
                     grad_scaler=torch.amp.GradScaler("cpu", init_scale=2.0**12))
    ra, rb = ea.step(batch, ce), eb.step(batch, ce)
    assert not rb.skipped
    assert float(rb.descent_grad_norm) == pytest.approx(float(ra.descent_grad_norm), rel=1e-5)
    for p, q in zip(plain.parameters(), scaled.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_descent_grad_norm_is_reported_without_clipping():
    grads, _ = _descent_gradient("sam", data(32))
    model = mlp()
    eng = ksam.create("sam", model, torch.optim.SGD(model.parameters(), lr=1.0), seed=0)
    total = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))
    assert float(eng.step(data(32), ce).descent_grad_norm) == pytest.approx(float(total),
                                                                            rel=1e-5)


# ---------------------------------------------------------------------- bad options
@pytest.mark.parametrize("kwargs,message", [
    ({"micro_batch_size": 0}, "micro_batch_size must be an integer >= 1"),
    ({"micro_batch_size": -4}, "micro_batch_size must be an integer >= 1"),
    ({"micro_batch_size": 2.5}, "micro_batch_size must be an integer >= 1"),
    ({"micro_batch_size": True}, "micro_batch_size must be an integer >= 1"),
    ({"max_grad_norm": 0}, "max_grad_norm must be a finite number > 0"),
    ({"max_grad_norm": -1.0}, "max_grad_norm must be a finite number > 0"),
    ({"max_grad_norm": float("nan")}, "max_grad_norm must be a finite number > 0"),
    ({"max_grad_norm": float("inf")}, "max_grad_norm must be a finite number > 0"),
    ({"max_grad_norm": "1"}, "max_grad_norm must be a finite number > 0"),
])
@pytest.mark.parametrize("method", ["sgd", "ksam"])
def test_bad_options_are_refused(method, kwargs, message):
    model = mlp()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=message):
        engine(method, model, **kwargs)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


# --------------------------------------------------------------------------- the CLI
def test_cli_micro_batch_size_and_max_grad_norm(tmp_path, capsys):
    from ksam.cli import main

    tiny = ["train", "--method", "ksam:k=8", "--epochs", "1", "--task-option",
            "num_samples=300", "--batch-size", "32", "--quiet", "--seed", "2"]
    assert main([*tiny, "--out", str(tmp_path / "a"), "--max-grad-norm", "0.5"]) == 0
    assert main([*tiny, "--out", str(tmp_path / "b"), "--max-grad-norm", "0.5",
                 "--micro-batch-size", "5"]) == 0
    from ksam.train import load_checkpoint

    a = load_checkpoint(tmp_path / "a" / "checkpoint.pt")
    b = load_checkpoint(tmp_path / "b" / "checkpoint.pt")
    assert (a["config"]["micro_batch_size"], b["config"]["micro_batch_size"]) == (None, 5)
    assert a["config"]["max_grad_norm"] == b["config"]["max_grad_norm"] == 0.5
    for key in a["model"]:  # no BatchNorm in the mnist1d CNN: chunks change nothing
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=1e-4, atol=1e-5)
    capsys.readouterr()
    for flag, value, message in [("--micro-batch-size", "0", "micro_batch_size must be"),
                                 ("--max-grad-norm", "-1", "max_grad_norm must be")]:
        assert main([*tiny, "--out", str(tmp_path / "bad"), flag, value]) == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("method", ["ksam", "sam"])
def test_chunked_fast_path_equals_unchunked_eager(method):
    a, b = mlp(), mlp()
    ea = engine(method, a)
    eb = engine(method, b, micro_batch_size=7, fast_path=True, max_grad_norm=10.0)
    for s in range(3):
        ea.step(data(40, seed=s), ce)
        eb.step(data(40, seed=s), ce)
    assert eb.fast_path_active
    for p, q in zip(a.parameters(), b.parameters()):  # the clip at 10 never bites here
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------- bench --memory
def test_bench_memory_table(tmp_path, capsys):
    import json

    from ksam.cli import main

    path = tmp_path / "mem.json"
    assert main(["bench", "--memory", "--quick", "--device", "cpu", "--cases",
                 "mnist1d-cnn-b128", "--memory-chunk", "4", "--json", str(path)]) == 0
    rows = json.loads(path.read_text())
    assert [(r["method"], r["batch"], r["micro_batch_size"]) for r in rows] == [
        ("sgd", 32, None), ("sam", 32, None), ("sam, micro-batch 4", 32, 4),
        ("ksam K=B/8", 32, None), ("ksam K=B/8, micro-batch 4", 32, 4)]
    sam = rows[1]
    assert sam["ratio_to_sam"] == 1.0 or sam["step_peak_mib"] <= 0
    assert "| mnist1d-cnn-b128 | ksam K=B/8, micro-batch 4 | 32 |" in capsys.readouterr().out
    assert main(["bench", "--memory", "--memory-chunk", "0"]) == 2
    assert "--memory-chunk must be >= 1" in capsys.readouterr().err
