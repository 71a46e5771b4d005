"""The engine's ``compile`` option: forward passes through torch.compile, same results.

The ``aot_eager`` backend traces the passes exactly as inductor would (dynamo graph capture,
AOTAutograd forward/backward split) but runs the traced ATen ops without generating code,
so these tests need no C++ compiler and are exact.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from torch import nn

import ksam


def ce(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y, reduction="none")


def bn_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))


def batches(n: int = 5):
    out = []
    for s in range(n):
        g = torch.Generator().manual_seed(s)
        out.append((torch.randn(32, 6, generator=g), torch.randint(0, 4, (32,), generator=g)))
    return out


def train(method: str, compile, fast_path: bool = False, **kw):
    model = bn_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    eng = ksam.create(method, model, opt, seed=0, compile=compile, fast_path=fast_path, **kw)
    results = [eng.step(b, ce) for b in batches()]
    return model, eng, results


@pytest.mark.parametrize("method,kw", [("ksam", {"k": 8, "k_warmup": 2}), ("sam", {}),
                                       ("osgd", {"k": 8}), ("sgd", {})])
@pytest.mark.parametrize("fast_path", [False, True])
def test_compiled_passes_equal_eager(method, kw, fast_path):
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    ref, _, ref_results = train(method, False, **kw)
    model, eng, results = train(method, "aot_eager", fast_path=fast_path, **kw)
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
    ref, _, ref_results = train("esam", False)
    model, eng, results = train("esam", "aot_eager")
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
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="compile"):
        ksam.create("ksam", model, torch.optim.SGD(model.parameters(), lr=0.1), compile=bad)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
