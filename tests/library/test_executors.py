"""The ways of running a step: the eager and the sync-free (fast path) executor make the
same steps, passes through torch.compile make the same steps, and micro-batches
(``micro_batch_size``) make the same step in chunks."""

from __future__ import annotations

import copy
import functools
from collections import namedtuple

import pytest
import torch
import torch._dynamo
from conftest import (
    assert_same,
    assert_unchanged,
    batches,
    bn_net,
    ce,
    data,
    mlp,
    params,
    run,
    sgd,
    snapshot,
    state,
)
from torch import nn

import ksam
from ksam.batch import map_tree
from ksam.executor import EagerExecutor
from ksam.fast import SyncFreeExecutor
from ksam.selection import RULES, AutoBand


# ------------------------------------------------------- eager and fast path agree
def test_executors_are_chosen_by_fast_path():
    model = bn_net()
    assert isinstance(ksam.SAM(model, sgd(model))._executor, EagerExecutor)
    fast = ksam.SAM(model, sgd(model), fast_path=True)
    assert isinstance(fast._executor, SyncFreeExecutor)
    assert fast.fast_path and fast.fast_path_active


@pytest.mark.parametrize("method,kw", [
    ("sgd", {}), ("sam", {}), ("ksam", {}), ("osgd", {}), ("asam", {}),
    ("msam", {}), ("looksam", {"interval": 2}), ("rst", {"p": 0.5}),
    ("sam-late", {"start_step": 2}), ("ksam", {"start_step": 2, "k": 8}),
])
def test_fast_path_equals_eager_on_cpu(method, kw):
    batches_ = batches(5)
    a, b = bn_net(), bn_net()
    _, ra = run(method, a, batches_, **kw)
    eb, rb = run(method, b, batches_, fast_path=True, **kw)
    assert eb._executor.reason is None and eb.fast_path_active
    assert_same(a.state_dict().values(), b.state_dict().values(), atol=1e-6)
    assert [r.loss for r in ra] == pytest.approx([r.loss for r in rb], abs=1e-6)
    assert all(not r.skipped for r in rb)


def test_ksam_warmup_deterministic_and_fast_path_equal():
    models = [mlp(), mlp(), mlp()]
    engines = [ksam.KSAM(models[0], sgd(models[0]), k=4, k_warmup=1, seed=0),
               ksam.KSAM(models[1], sgd(models[1]), k=4, k_warmup=1, seed=0),
               ksam.KSAM(models[2], sgd(models[2]), k=4, k_warmup=1, seed=0, fast_path=True)]
    for s in range(6):
        for e in engines:
            e.step(data(seed=s), ce)
    assert engines[2]._executor.reason is None
    for p, q, r in zip(*(m.parameters() for m in models)):
        assert torch.equal(p, q)
        torch.testing.assert_close(p, r, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ["stratified", "auto", "auto-margin"])
def test_selection_rules_same_seed_same_run_and_fast_path_equals_eager(name):
    a, b, c = mlp(), mlp(), mlp()
    run("ksam", a, steps=4, k=8, k_warmup=1, select=name)
    run("ksam", b, steps=4, k=8, k_warmup=1, select=name)
    eng, _ = run("ksam", c, steps=4, k=8, k_warmup=1, select=name, fast_path=True)
    assert eng._executor.reason is None
    assert_same(params(a), params(b))
    assert_same(params(a), params(c), atol=1e-6)


@pytest.fixture
def quick_auto(monkeypatch):
    """``select="auto-quick"``: the auto band with its estimate over steps 1-2."""
    monkeypatch.setitem(RULES, "auto-quick", functools.partial(AutoBand, estimate_steps=(1, 3)))
    return "auto-quick"


def test_auto_band_through_its_phases_fast_path_equals_eager_and_resumes(quick_auto):
    def engine(model, fast=False):
        return ksam.KSAM(model, sgd(model), k=8, k_warmup=1, select=quick_auto, seed=0,
                         fast_path=fast)

    a, b, c = mlp(), mlp(), mlp()
    ea, eb = engine(a), engine(b, fast=True)
    for s in range(8):
        ra, rb = ea.step(data(seed=s), ce), eb.step(data(seed=s), ce)
        assert torch.equal(ra.descent_indices, rb.descent_indices)
    assert eb._executor.reason is None
    assert_same(params(a), params(b), atol=1e-6)
    assert ea.descent.estimate() == eb.descent.estimate() is not None
    # Stop after 4 steps, reload into a fresh engine, continue: same as uninterrupted.
    ec = engine(c)
    for s in range(4):
        ec.step(data(seed=s), ce)
    d = mlp(5)
    ed = engine(d)
    ed.load_state_dict(ec.state_dict())
    d.load_state_dict(c.state_dict())
    for s in range(4, 8):
        ed.step(data(seed=s), ce)
    assert_same(params(a), params(d))


def test_fast_path_skips_on_the_device():
    model = bn_net()
    opt = sgd(model)
    eng = ksam.KSAM(model, opt, fast_path=True)
    eng.step(data(seed=0), ce)
    before, before_opt = state(model), copy.deepcopy(opt.state_dict()["state"])
    x, y = data(seed=1)
    x[0] = float("inf")
    res = eng.step((x, y), ce)
    assert res.skipped and eng.skipped_steps == 1
    assert all(torch.equal(before[k], v) for k, v in state(model).items())
    for k, s in before_opt.items():
        assert torch.equal(s["momentum_buffer"], opt.state_dict()["state"][k]["momentum_buffer"])


def test_fast_path_skipped_first_step_leaves_no_momentum():
    """A skipped first step must not create SGD's momentum buffers: the fused kernel would
    leave them uninitialized and every later step would use them."""
    runs = []
    for fast in (False, True):
        model = bn_net()
        opt = sgd(model, **({} if fast else {"fused": True}))
        eng = ksam.SAM(model, opt, fast_path=fast)
        x, y = data(seed=0)
        x[3] = float("nan")
        assert eng.step((x, y), ce).skipped and not opt.state
        for s in range(1, 4):
            assert not eng.step(data(seed=s), ce).skipped
        runs.append(model.state_dict())
    assert_same(runs[0].values(), runs[1].values())


def test_fast_path_keeps_scheduler_working():
    model = mlp()
    opt = sgd(model, lr=0.5)
    eng = ksam.KSAM(model, opt, fast_path=True)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.1)
    eng.step(data(), ce)
    sched.step()
    assert float(opt.param_groups[0]["lr"]) == pytest.approx(0.05)
    ref = mlp()
    ref_opt = sgd(ref, lr=0.5)
    ref_eng = ksam.KSAM(ref, ref_opt)
    ref_sched = torch.optim.lr_scheduler.StepLR(ref_opt, step_size=1, gamma=0.1)
    ref_eng.step(data(), ce)
    ref_sched.step()
    eng.step(data(seed=3), ce)
    ref_eng.step(data(seed=3), ce)
    assert_same(params(model), params(ref), atol=1e-6)


def test_fast_path_falls_back_for_host_random_rules():
    model = mlp()
    eng = ksam.RandomSubsetSAM(model, sgd(model), fast_path=True)
    assert "host" in eng._executor.reason
    with pytest.warns(UserWarning, match="fast path off"):
        assert not eng.step(data(), ce).skipped


# --------------------------------------------------------- fast path and its state
def test_fast_engine_steps_after_loading_a_state():
    """A stepped fast engine reloading its own state steps on exactly as one that did not."""
    a, b = bn_net(), bn_net()
    ea = ksam.KSAM(a, sgd(a), k=8, seed=0, fast_path=True)
    eb = ksam.KSAM(b, sgd(b), k=8, seed=0, fast_path=True)
    for s in range(2):
        ea.step(data(seed=s), ce)
        eb.step(data(seed=s), ce)
    eb.load_state_dict(copy.deepcopy(eb.state_dict()))
    for s in range(2, 4):
        assert not ea.step(data(seed=s), ce).skipped
        assert not eb.step(data(seed=s), ce).skipped
    assert eb.fast_path_active and eb.steps == 4
    assert_same(a.state_dict().values(), b.state_dict().values())


def test_state_of_the_other_executor_is_refused_and_changes_nothing():
    eager_model, fast_model = bn_net(), bn_net(1)
    eager = ksam.KSAM(eager_model, sgd(eager_model), k=8)
    eager.step(data(), ce)
    opt = sgd(fast_model)
    fast = ksam.KSAM(fast_model, opt, k=8, fast_path=True)
    fast.step(data(seed=2), ce)
    before = snapshot(fast_model, opt)
    with pytest.raises(ValueError, match="fast_path=False"):
        fast.load_state_dict(eager.state_dict())
    assert fast.steps == 1
    assert_unchanged(before, fast_model, opt)
    with pytest.raises(ValueError, match="fast_path=True"):
        eager.load_state_dict(fast.state_dict())


def test_state_without_fast_path_record_loads_into_a_fast_engine_and_steps():
    """An older state (no ``fast_path`` key) brings an unfused optimizer state: the fast
    engine prepares the optimizer again before its next step instead of failing in it."""
    src_model, model = bn_net(), bn_net()
    src = ksam.KSAM(src_model, sgd(src_model), k=8, seed=0)
    src.step(data(), ce)
    saved = src.state_dict()
    del saved["fast_path"]
    eng = ksam.KSAM(model, sgd(model), k=8, seed=0, fast_path=True)
    eng.step(data(seed=5), ce)
    eng.load_state_dict(saved)
    assert not eng.step(data(seed=2), ce).skipped
    assert eng.optimizer.param_groups[0]["fused"] is True and eng.skipped_steps == 0


# ------------------------------------------------------ graph keys, cloned batches
def test_graph_key_tells_closures_with_the_same_code_apart():
    model = bn_net()
    ex = SyncFreeExecutor(ksam.Plain(model, sgd(model))._rt)
    batch = data()

    def weighted(w):
        return lambda m, b: w * ce(m, b)

    one, two = weighted(1.0), weighted(2.0)
    assert one.__code__ is two.__code__
    assert ex._key(batch, one, 32, 0, True) != ex._key(batch, two, 32, 0, True)
    assert ex._key(batch, one, 32, 0, True) == ex._key(batch, one, 32, 0, True)

    class Task:
        def loss(self, m, b):
            return ce(m, b)

    task = Task()
    assert task.loss is not task.loss  # a new bound method at each access ...
    # ... one graph
    assert ex._key(batch, task.loss, 32, 0, True) == ex._key(batch, task.loss, 32, 0, True)


def test_a_cloned_tree_keeps_mapping_subclasses_and_namedtuples_unaliased():
    transformers = pytest.importorskip("transformers")
    enc = transformers.BatchEncoding({"input_ids": torch.arange(6).view(2, 3),
                                      "labels": torch.tensor([0, 1])})
    copy_ = map_tree(enc, torch.Tensor.clone)
    assert type(copy_) is transformers.BatchEncoding
    assert copy_["input_ids"] is not enc["input_ids"]
    assert copy_["input_ids"].data_ptr() != enc["input_ids"].data_ptr()
    assert torch.equal(copy_["input_ids"], enc["input_ids"])

    Pair = namedtuple("Pair", "x y")
    pair = Pair(torch.ones(2, 3), torch.zeros(2))
    cloned = map_tree(pair, torch.Tensor.clone)
    assert type(cloned) is Pair and cloned.x.data_ptr() != pair.x.data_ptr()
    assert torch.equal(cloned.x, pair.x) and torch.equal(cloned.y, pair.y)


# ------------------------------------------------------------------- torch.compile
# The ``aot_eager`` backend traces the passes exactly as inductor would (dynamo graph
# capture, AOTAutograd forward/backward split) but runs the traced ATen ops without
# generating code, so these tests need no C++ compiler and are exact.
def _compiled_run(method: str, compile, fast_path: bool = False, **kw):
    model = bn_net()
    eng, results = run(method, model, batches(5), opt=sgd(model), compile=compile,
                       fast_path=fast_path, **kw)
    return model, eng, results


@pytest.mark.parametrize("method,kw", [("ksam", {"k": 8, "k_warmup": 2}), ("sam", {}),
                                       ("osgd", {"k": 8}), ("sgd", {})])
@pytest.mark.parametrize("fast_path", [False, True])
def test_compiled_passes_equal_eager(method, kw, fast_path):
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    ref, _, ref_results = _compiled_run(method, False, **kw)
    model, eng, results = _compiled_run(method, "aot_eager", fast_path=fast_path, **kw)
    # the passes really went through dynamo (not a silent eager fallback)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1
    assert eng.compile == "aot_eager"
    # the user's model is untouched: same class, same state_dict keys (no "_orig_mod.")
    assert type(model) is nn.Sequential
    assert list(model.state_dict()) == list(ref.state_dict())
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(model.state_dict()[k], v, atol=1e-6, rtol=0)
    for a, b in zip(ref_results, results):
        assert a.descent_indices.tolist() == b.descent_indices.tolist()
        assert a.loss == pytest.approx(b.loss, abs=1e-6)


def test_esam_compiled_does_not_recompile_per_mask():
    """ESAM draws a new weight mask every step; with compile the engine computes and drops
    the masked-out gradients instead of switching requires_grad (a recompile per pattern)."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    ref, _, ref_results = _compiled_run("esam", False)
    model, eng, results = _compiled_run("esam", "aot_eager")
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert 1 <= graphs <= 3, graphs  # scoring/ascent at w, perturbed descent; not one per mask
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(model.state_dict()[k], v, atol=1e-6, rtol=0)
    for a, b in zip(ref_results, results):
        assert a.descent_indices.tolist() == b.descent_indices.tolist()


def test_compile_true_means_inductor():
    model = bn_net()
    eng = ksam.create("ksam", model, torch.optim.SGD(model.parameters(), lr=0.1), compile=True)
    assert eng.compile == "inductor"
    assert ksam.create("sgd", model, torch.optim.SGD(model.parameters(), lr=0.1)).compile is None


@pytest.mark.parametrize("bad", ["no-such-backend", 3])
def test_unknown_backend_is_refused(bad):
    model = bn_net()
    before = state(model)
    with pytest.raises(ValueError, match="compile"):
        ksam.create("ksam", model, torch.optim.SGD(model.parameters(), lr=0.1), compile=bad)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ------------------------------------------------------------------- micro-batches
METHODS = ["sgd", "sam", "asam", "ksam", "ksam-plain", "random-sam", "esam", "osgd"]


class Recorder:
    """A loss_fn that records every forward's size and whether it builds a graph."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, bool]] = []

    def __call__(self, model, batch):
        self.calls.append((len(batch[0]), torch.is_grad_enabled()))
        return ce(model, batch)


def engine(method: str, model: nn.Module, **kw) -> ksam.Method:
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    return ksam.create(method, model, opt, seed=0, **kw)


# ---------------------------------------------------- micro-batches: forward sizes
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


# -------------------------------------------------------- micro-batches: same step
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


# -------------------------------------------------------- micro-batches: BatchNorm
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


# --------------------------------------------------------- micro-batches: NaN skip
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



# -------------------------------------- micro-batches and the clip through the CLI
def test_cli_micro_batch_size_and_max_grad_norm(tmp_path, capsys):
    from ksam.lab.cli import main

    tiny = ["train", "--method", "ksam:k=8", "--epochs", "1", "--task-option",
            "num_samples=300", "--batch-size", "32", "--quiet", "--seed", "2"]
    assert main([*tiny, "--out", str(tmp_path / "a"), "--max-grad-norm", "0.5"]) == 0
    assert main([*tiny, "--out", str(tmp_path / "b"), "--max-grad-norm", "0.5",
                 "--micro-batch-size", "5"]) == 0
    from ksam.lab.outputs import load_checkpoint

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
