"""The CUDA-graph fast path against the eager step, on a GPU (skipped without one).

Run on a GPU machine: ``python -m pytest tests/library/test_fast_cuda.py -q``.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from conftest import ce
from torch import nn

import ksam

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)).cuda()


def batches(n_batches: int, b: int = 64):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(b, 3, 16, 16, generator=g).cuda(),
             torch.randint(0, 10, (b,), generator=g).cuda()) for _ in range(n_batches)]


def _pair(method: str, **kw):
    a = net()
    b = copy.deepcopy(a)
    ea = ksam.create(method, a, torch.optim.SGD(a.parameters(), lr=0.05, momentum=0.9,
                                                weight_decay=5e-4), seed=0, **kw)
    eb = ksam.create(method, b, torch.optim.SGD(b.parameters(), lr=0.05, momentum=0.9,
                                                weight_decay=5e-4), seed=0, fast_path=True,
                     **kw)
    return a, b, ea, eb


@pytest.mark.parametrize("method,kw", [
    ("sgd", {}), ("sam", {}), ("ksam", {"k": 8}), ("ksam", {"k": 8, "k_warmup": 2}),
    ("osgd", {"k": 8}),
    # the rivals: one graph per kind of step (schedule: sharp / plain; MSAM: before and
    # after its momentum buffer exists)
    ("msam", {}), ("looksam", {"interval": 2}), ("rst", {"p": 0.5}),
    ("sam-late", {"start_step": 8}), ("ksam", {"k": 8, "start_step": 8}),
    # a rule with phases (stratified, measuring, band): one graph per phase
    ("ksam", {"k": 8, "select": functools.partial(ksam.selection.AutoBand,
                                                  estimate_steps=(5, 10))}),
    ("ksam", {"k": 8, "select": functools.partial(ksam.selection.AutoBand, classes=10,
                                                  estimate_steps=(5, 10))}),
])
def test_graph_replay_equals_eager(method, kw):
    a, b, ea, eb = _pair(method, **kw)
    for batch in batches(16):  # 3 warm-up steps, capture, replays (and re-captures)
        ra, rb = ea.step(batch, ce), eb.step(batch, ce)
        assert ra.loss == pytest.approx(rb.loss, rel=1e-4, abs=1e-5)
    assert eb._executor.reason is None and eb._executor._entries
    assert any(e.graph is not None for e in eb._executor._entries.values())
    for (ka, va), (_, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(va, vb, rtol=1e-4, atol=1e-5, msg=ka)


def test_graph_skips_non_finite_on_device():
    a, b, ea, eb = _pair("ksam", k=8, k_warmup=0)
    data = batches(6)
    for batch in data[:5]:
        eb.step(batch, ce)
    before = copy.deepcopy(b.state_dict())
    x, y = data[5]
    x = x.clone()
    x[0] = float("nan")
    res = eb.step((x, y), ce)
    assert res.skipped and eb.skipped_steps == 1
    for k, v in b.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_short_last_batch_and_scheduler():
    a, b, ea, eb = _pair("ksam", k=8, k_warmup=0)
    sched_a = torch.optim.lr_scheduler.CosineAnnealingLR(ea.optimizer, 20)
    sched_b = torch.optim.lr_scheduler.CosineAnnealingLR(eb.optimizer, 20)
    data = batches(8) + [(x[:40], y[:40]) for x, y in batches(1)]
    for batch in data:
        ea.step(batch, ce)
        eb.step(batch, ce)
        sched_a.step()
        sched_b.step()
    for (ka, va), (_, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(va, vb, rtol=1e-4, atol=1e-5, msg=ka)


def test_bf16_graph_runs():
    a, b, ea, eb = _pair("ksam", k=8, k_warmup=0, autocast_dtype=torch.bfloat16)
    for batch in batches(6):
        res = eb.step(batch, ce)
    assert not res.skipped and eb._executor.reason is None


@pytest.mark.parametrize("fast_path", [False, True])
def test_compiled_passes_on_cuda_equal_eager(fast_path):
    """torch.compile (inductor: generated kernels) inside the step, and inside its CUDA
    graph with the fast path."""
    import torch._dynamo

    torch._dynamo.reset()
    a = net()
    b = copy.deepcopy(a)
    ea = ksam.create("ksam", a, torch.optim.SGD(a.parameters(), lr=0.05, momentum=0.9),
                     seed=0, k=8, k_warmup=0)
    eb = ksam.create("ksam", b, torch.optim.SGD(b.parameters(), lr=0.05, momentum=0.9),
                     seed=0, k=8, k_warmup=0, compile=True, fast_path=fast_path)
    for batch in batches(8):
        ra, rb = ea.step(batch, ce), eb.step(batch, ce)
        assert ra.loss == pytest.approx(rb.loss, rel=1e-4, abs=1e-5)
    if fast_path:
        assert eb._executor.reason is None
        assert any(e.graph is not None for e in eb._executor._entries.values())
    for (ka, va), (_, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(va, vb, rtol=1e-3, atol=1e-4, msg=ka)


def test_replayed_result_indices_are_not_overwritten():
    a, b, ea, eb = _pair("ksam", k=8, k_warmup=0)
    results = [eb.step(batch, ce) for batch in batches(8)]
    assert any(e.graph is not None for e in eb._executor._entries.values())
    refs = [ea.step(batch, ce) for batch in batches(8)]
    for r, ref in zip(results, refs):  # earlier results kept their own indices
        assert r.descent_indices.tolist() == ref.descent_indices.tolist()


def test_closures_with_the_same_code_get_their_own_graphs():
    def weighted(w):
        return lambda m, batch: w * ce(m, batch)

    a, b, ea, eb = _pair("sgd")
    losses = {1.0: weighted(1.0), 3.0: weighted(3.0)}
    for i, batch in enumerate(batches(12)):
        w = 1.0 if i % 2 == 0 else 3.0
        ra, rb = ea.step(batch, losses[w]), eb.step(batch, losses[w])
        assert ra.loss == pytest.approx(rb.loss, rel=1e-4, abs=1e-5)
    assert eb._executor.reason is None
    for (ka, va), (_, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(va, vb, rtol=1e-4, atol=1e-5, msg=ka)


def test_namedtuple_and_mapping_batches_are_captured():
    import collections

    Pair = collections.namedtuple("Pair", "x y")

    class Enc(collections.UserDict):
        pass

    def ce_pair(m, batch):
        return ce(m, (batch.x, batch.y))

    def ce_enc(m, batch):
        return ce(m, (batch["x"], batch["y"]))

    for wrap, loss_fn in ((lambda x, y: Pair(x, y), ce_pair),
                          (lambda x, y: Enc({"x": x, "y": y}), ce_enc)):
        a, b, ea, eb = _pair("ksam", k=8)
        first = None
        for batch in batches(6):
            wrapped = wrap(*batch)
            first = first or wrapped
            ra, rb = ea.step(wrapped, loss_fn), eb.step(wrapped, loss_fn)
            assert ra.loss == pytest.approx(rb.loss, rel=1e-4, abs=1e-5)
        assert eb._executor.reason is None
        assert any(e.graph is not None for e in eb._executor._entries.values())
        static = next(iter(eb._executor._entries.values())).static_batch
        assert type(static) is type(first)
        leaves = static if isinstance(static, tuple) else list(static.values())
        firsts = first if isinstance(first, tuple) else list(first.values())
        assert all(s.data_ptr() != f.data_ptr() for s, f in zip(leaves, firsts))


def test_a_param_group_added_after_capture_is_captured_anew():
    """Progressive unfreezing on the fast path: the graphs captured for the last layer are
    dropped when the optimizer gets the others, and the steps after equal the eager ones."""
    a = net()
    b = copy.deepcopy(a)
    engines = [ksam.create("ksam", m, torch.optim.SGD(m[5].parameters(), lr=0.05,
                                                      momentum=0.9), seed=0, k=8,
                           fast_path=fast) for m, fast in ((a, False), (b, True))]
    data = batches(12)
    for batch in data[:6]:
        for engine in engines:
            engine.step(batch, ce)
    ea, eb = engines
    assert any(e.graph is not None for e in eb._executor._entries.values())
    conv = b[0].weight.detach().clone()
    for m, engine in ((a, ea), (b, eb)):
        engine.optimizer.add_param_group({"params": list(m[:2].parameters())})
    for batch in data[6:]:
        ra, rb = ea.step(batch, ce), eb.step(batch, ce)
        assert ra.loss == pytest.approx(rb.loss, rel=1e-4, abs=1e-5)
    assert eb._executor.reason is None
    assert any(e.graph is not None for e in eb._executor._entries.values())
    assert not torch.equal(b[0].weight, conv)
    for (ka, va), (_, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(va, vb, rtol=1e-4, atol=1e-5, msg=ka)
