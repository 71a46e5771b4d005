"""Semantics of the step engine and the methods built on it."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ksam


def ce(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y, reduction="none")


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 4))


def bn_net(seed: int = 0, momentum: float | None = 0.1, sync: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    norm = nn.SyncBatchNorm if sync else nn.BatchNorm1d
    return nn.Sequential(nn.Linear(6, 16), norm(16, momentum=momentum), nn.ReLU(),
                         nn.Linear(16, 4))


def data(n: int = 32, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g), torch.randint(0, 4, (n,), generator=g)


def sgd(model, lr=0.1, momentum=0.9, **kw):
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, **kw)


def params(model):
    return [p.detach().clone() for p in model.parameters()]


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same(a, b, atol=0.0):
    for x, y in zip(a, b):
        if atol == 0:
            assert torch.equal(x, y)
        else:
            torch.testing.assert_close(x, y, atol=atol, rtol=0)


def run(method, model, steps=3, seed=0, batches=None, **kw):
    opt = sgd(model)
    eng = ksam.create(method, model, opt, seed=seed, **kw)
    results = [eng.step(b, ce) for b in (batches or [data(seed=s) for s in range(steps)])]
    return eng, results


# ------------------------------------------------------------------ reference values
def test_ksam_matches_hand_written_reference():
    """One K-SAM step written out by hand: scores, top-K, ascent, eps, descent, SGD."""
    model = mlp()
    ref = copy.deepcopy(model)
    x, y = data(32)
    rho, k = 0.07, 8
    run("ksam-plain", model, batches=[(x, y)], rho=rho, k=k)

    with torch.no_grad():
        scores = F.cross_entropy(ref(x), y, reduction="none")
    top = torch.argsort(scores, descending=True, stable=True)[:k]
    w = list(ref.parameters())
    g = torch.autograd.grad(F.cross_entropy(ref(x[top]), y[top]), w)
    norm = torch.sqrt(sum((gi**2).sum() for gi in g))
    saved = [p.detach().clone() for p in w]
    with torch.no_grad():
        for p, gi in zip(w, g):
            p.add_(gi * rho / (norm + 1e-12))
    g2 = torch.autograd.grad(F.cross_entropy(ref(x[top]), y[top]), w)
    with torch.no_grad():
        for p, old, gi in zip(w, saved, g2):
            p.copy_(old - 0.1 * gi)  # first momentum-SGD step: buf = g
    assert_same(params(model), params(ref), atol=1e-6)


def test_asam_perturbation_formula():
    torch.manual_seed(0)
    p = [torch.randn(5), torch.randn(3, 2)]
    g = [torch.randn(5), torch.randn(3, 2)]
    rho, eta = 0.5, 0.01
    t = [pi.abs() + eta for pi in p]
    norm = torch.sqrt(sum(((ti * gi) ** 2).sum() for ti, gi in zip(t, g)))
    expect = [pi + rho * ti**2 * gi / norm for pi, ti, gi in zip(p, t, g)]
    pp, gg = [x.clone() for x in p], [x.clone() for x in g]
    ksam.AdaptivePerturbation(rho, eta).perturb_(pp, gg)
    assert_same(pp, expect, atol=1e-6)


# ------------------------------------------------------------------- equivalences
def test_ksam_full_batch_equals_sam():
    a, b = mlp(), mlp()
    run("ksam", a, k=1.0, rho=0.05)
    run("sam", b, rho=0.05)
    assert_same(params(a), params(b), atol=1e-6)


def test_sam_rho_zero_equals_sgd():
    a, b = mlp(), mlp()
    run("sam", a, rho=0.0)
    run("sgd", b)
    assert_same(params(a), params(b), atol=1e-6)


def test_ordered_sgd_full_batch_equals_sgd():
    a, b = mlp(), mlp()
    run("osgd", a, k=1.0)
    run("sgd", b)
    assert_same(params(a), params(b), atol=1e-6)


def test_ksam_asymmetric_subsets_and_three_forwards():
    model = mlp()
    sizes = []
    model.register_forward_hook(lambda m, inp, out: sizes.append(inp[0].shape[0]))
    eng, (res,) = run("ksam-plain", model, steps=1, k_ascent=4, k_descent=0.5)
    assert sizes == [32, 4, 16]
    assert res.ascent_indices.numel() == 4 and res.descent_indices.numel() == 16
    # Both subsets are the top of the same scores: the ascent subset is inside the descent's.
    assert set(res.ascent_indices.tolist()) <= set(res.descent_indices.tolist())
    top16 = torch.argsort(res.losses, descending=True, stable=True)[:16]
    assert res.descent_indices.tolist() == top16.tolist()


def test_pass_sizes_of_every_method():
    expect = {"sgd": [32], "sam": [32, 32], "asam": [32, 32], "ksam-plain": [32, 8, 8],
              "ksam": [32, 8, 32],  # default k_warmup: the first descent is the whole batch
              "random-sam": [8, 32], "esam": [32, 32], "osgd": [32, 8]}
    for method, sizes in expect.items():
        model = mlp()
        seen = []
        model.register_forward_hook(lambda m, inp, out, seen=seen: seen.append(len(inp[0])))
        run(method, model, steps=1)
        assert seen == sizes, method


# ---------------------------------------------------------------- restore exactly
@pytest.mark.parametrize("method", ["sam", "asam", "ksam", "random-sam", "esam"])
def test_weights_restored_bit_for_bit_before_optimizer_step(method):
    model = bn_net()
    opt = sgd(model)
    eng = ksam.create(method, model, opt, seed=0)
    before = params(model)
    seen = {}
    real_step = opt.step

    def checking_step(*a, **kw):
        seen["w"] = params(model)
        seen["g"] = [p.grad.clone() for p in model.parameters()]
        return real_step(*a, **kw)

    opt.step = checking_step
    eng.step(data(), ce)
    assert_same(seen["w"], before)  # exactly w, not w + eps - eps
    # ... and the update is the base optimizer's own on the descent gradient
    ref = bn_net()
    ref_opt = sgd(ref)
    for p, g in zip(ref.parameters(), seen["g"]):
        p.grad = g
    ref_opt.step()
    assert_same(params(model), params(ref))


# --------------------------------------------------------------------- BatchNorm
BN_UPDATES = {"sgd": [True], "sam": [True, False], "ksam": [True, False, False],
              "osgd": [True, False], "esam": [True, False], "random-sam": [False, True]}


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("sync", [False, True])
@pytest.mark.parametrize("method", list(BN_UPDATES))
def test_batchnorm_statistics_change_only_in_the_full_batch_pass(method, momentum, sync):
    """Which passes changed a BatchNorm buffer, in order: only the first full-batch one."""
    pattern = BN_UPDATES[method]
    model = bn_net(momentum=momentum, sync=sync)
    bn = model[1]
    log = []
    bn.register_forward_pre_hook(lambda m, i: log.append([b.clone() for b in m.buffers()]))

    def after(m, i, o):
        old = log.pop()
        log.append(not all(torch.equal(a, b) for a, b in zip(old, m.buffers())))

    bn.register_forward_hook(after)
    run(method, model, steps=2)
    assert log == pattern * 2, method
    assert int(bn.num_batches_tracked) == 2


# ---------------------------------------------------------------- non-finite skip
def test_nan_step_is_skipped_and_changes_nothing():
    model = bn_net()
    opt = sgd(model)
    eng = ksam.KSAM(model, opt, k=0.25)
    eng.step(data(seed=0), ce)
    before_w, before_opt = state(model), copy.deepcopy(opt.state_dict())
    x, y = data(seed=1)
    x[3, 0] = float("nan")
    res = eng.step((x, y), ce)
    assert res.skipped and eng.skipped_steps == 1
    after = state(model)
    for k in before_w:
        assert torch.equal(before_w[k], after[k]), k
    for key, s in before_opt["state"].items():
        assert torch.equal(s["momentum_buffer"], opt.state_dict()["state"][key]["momentum_buffer"])
    assert all(p.grad is None for p in model.parameters())
    assert not eng.step(data(seed=2), ce).skipped


def test_inf_gradient_is_skipped():
    model = mlp()
    eng = ksam.SAM(model, sgd(model))
    before = params(model)

    def exploding(m, b):
        return ce(m, b) * torch.tensor(float("inf"))

    assert eng.step(data(), exploding).skipped
    assert_same(params(model), before)


def test_grad_scaler_skips_overflow_and_backs_off():
    model = mlp()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    eng = ksam.KSAM(model, sgd(model), grad_scaler=scaler)
    before = params(model)
    assert eng.step(data(), lambda m, b: ce(m, b) * 1e38).skipped
    assert_same(params(model), before)
    assert scaler.get_scale() < 2.0**10
    res = eng.step(data(), ce)
    assert not res.skipped
    assert not all(torch.equal(a, b) for a, b in zip(before, params(model)))


def test_bf16_autocast_runs_and_trains():
    model = mlp()
    eng = ksam.KSAM(model, sgd(model), k=0.5, autocast_dtype=torch.bfloat16)
    dtypes = []
    model[0].register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    x, y = data(64)
    first = eng.step((x, y), ce).loss
    for _ in range(30):
        last = eng.step((x, y), ce).loss
    assert set(dtypes) == {torch.bfloat16}
    assert last < first


# --------------------------------------------------------------------- bad input
BAD_CONSTRUCTION = [
    ("ksam", {"k": 0}, "k must be >= 1"),
    ("ksam", {"k": -0.5}, "fraction in \\(0, 1\\]"),
    ("ksam", {"k": 1.5}, "fraction in \\(0, 1\\]"),
    ("ksam", {"k_ascent": 0.0}, "k_ascent"),
    ("ksam", {"rho": -0.1}, "rho must be"),
    ("sam", {"rho": -1}, "rho must be"),
    ("esam", {"beta": 0.0}, "beta"),
    ("esam", {"gamma": 2.0}, "gamma"),
    ("random-sam", {"k_ascent": True}, "k_ascent"),
]


@pytest.mark.parametrize("method,kwargs,message", BAD_CONSTRUCTION)
def test_bad_options_fail_at_construction(method, kwargs, message):
    model = mlp()
    with pytest.raises(ValueError, match=message):
        ksam.create(method, model, sgd(model), **kwargs)


def test_unknown_method():
    model = mlp()
    with pytest.raises(ValueError, match="unknown method 'foo'"):
        ksam.create("foo", model, sgd(model))


def test_optimizer_over_other_parameters_is_refused():
    model, other = mlp(), mlp(1)
    with pytest.raises(ValueError, match="not the model's"):
        ksam.KSAM(model, sgd(other))


def _unchanged_after_error(step_call, model, opt):
    before_w, before_opt = state(model), copy.deepcopy(opt.state_dict())
    step_call()
    after = state(model)
    assert all(torch.equal(before_w[k], after[k]) for k in before_w)
    assert str(before_opt) == str(opt.state_dict())
    assert all(p.grad is None for p in model.parameters())


BAD_STEPS = [
    ("k larger than the batch", {"k": 64}, lambda: data(32), ce, "larger than the batch"),
    ("scalar loss", {}, lambda: data(32),
     lambda m, b: F.cross_entropy(m(b[0]), b[1]), "reduction='none'"),
    ("ragged batch", {}, lambda: (torch.randn(32, 6), torch.randint(0, 4, (31,))), ce,
     "different leading sizes"),
    ("wrong length", {}, lambda: data(32), lambda m, b: ce(m, b)[:5], "shape \\[32\\]"),
]


@pytest.mark.parametrize("what,kwargs,batch,loss_fn,message", BAD_STEPS,
                         ids=[c[0] for c in BAD_STEPS])
def test_bad_step_input_fails_fast_and_changes_nothing(what, kwargs, batch, loss_fn, message):
    model = bn_net()
    opt = sgd(model)
    eng = ksam.KSAM(model, opt, **kwargs)
    eng.step(data(64, seed=5), ce) if kwargs.get("k", 0) <= 64 else None

    def call():
        with pytest.raises(ValueError, match=message):
            eng.step(batch(), loss_fn)

    _unchanged_after_error(call, model, opt)


# ------------------------------------------------------------- determinism, state
def test_ties_are_broken_by_index():
    scores = torch.tensor([1.0, 3.0, 3.0, 0.5, 3.0, 2.0])
    ctx = ksam.SelectionContext(batch_size=6, device=torch.device("cpu"), scores=scores)
    assert ksam.TopLoss(4).select(ctx).index.tolist() == [1, 2, 4, 5]


def test_ksam_sorts_the_losses_once_per_step(monkeypatch):
    from ksam import selection

    calls = []
    real = selection.descending_order
    monkeypatch.setattr(selection, "descending_order",
                        lambda v: calls.append(v) or real(v))
    model = mlp()
    eng = ksam.create("ksam", model, sgd(model), k_ascent=12, k=5, k_warmup=0)
    x, y = data()
    result = eng.step((x, y), ce)
    assert len(calls) == 1
    with torch.no_grad():
        losses = F.cross_entropy(mlp()(x), y, reduction="none")
    order = torch.sort(losses, descending=True, stable=True).indices
    assert result.ascent_indices.tolist() == order[:12].tolist()
    assert result.descent_indices.tolist() == order[:5].tolist()


@pytest.mark.parametrize("method", ["ksam", "random-sam", "esam"])
def test_same_seed_same_run(method):
    a, b = mlp(), mlp()
    run(method, a, steps=4, seed=3)
    run(method, b, steps=4, seed=3)
    assert_same(params(a), params(b))


@pytest.mark.parametrize("method", ["ksam", "random-sam", "esam", "sam"])
def test_state_dict_resumes_exactly(method):
    batches = [data(seed=s) for s in range(6)]
    full = bn_net()
    run(method, full, batches=batches, seed=7)

    first = bn_net()
    eng, _ = run(method, first, batches=batches[:3], seed=7)
    saved_model = copy.deepcopy(first.state_dict())
    saved = copy.deepcopy(eng.state_dict())
    assert saved["optimizer"]["state"], "the base optimizer's momentum must be kept"

    resumed = bn_net(seed=99)
    resumed.load_state_dict(saved_model)
    eng2 = ksam.create(method, resumed, sgd(resumed), seed=12345)
    eng2.load_state_dict(saved)
    for b in batches[3:]:
        eng2.step(b, ce)
    assert eng2.steps == 6
    assert_same(list(full.state_dict().values()), list(resumed.state_dict().values()))


def test_state_dict_without_the_optimizer():
    """For trainers that save the optimizer themselves (the HF integration): the engine's
    own state resumes exactly next to a separately saved optimizer."""
    batches = [data(seed=s) for s in range(6)]
    full = bn_net()
    run("ksam", full, batches=batches, seed=7)

    first = bn_net()
    eng, _ = run("ksam", first, batches=batches[:3], seed=7)
    extras = copy.deepcopy(eng.state_dict(include_optimizer=False))
    assert "optimizer" not in extras
    saved_opt = copy.deepcopy(eng.optimizer.state_dict())

    resumed = bn_net(seed=99)
    resumed.load_state_dict(first.state_dict())
    opt = sgd(resumed)
    opt.load_state_dict(saved_opt)
    eng2 = ksam.create("ksam", resumed, opt, seed=12345)
    eng2.load_state_dict(extras)
    assert str(opt.state_dict()) == str(saved_opt)  # left as it was
    for b in batches[3:]:
        eng2.step(b, ce)
    assert eng2.steps == 6
    assert_same(list(full.state_dict().values()), list(resumed.state_dict().values()))


def test_nested_dict_batch():
    class DictModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = mlp()

        def forward(self, inputs):
            return self.net(inputs["x"])

    model = DictModel()
    x, y = data()
    batch = {"inputs": {"x": x}, "labels": y, "tag": "text"}
    eng = ksam.KSAM(model, sgd(model), k=4, k_warmup=0)
    res = eng.step(batch, lambda m, b: F.cross_entropy(m(b["inputs"]), b["labels"],
                                                       reduction="none"))
    assert res.descent_indices.numel() == 4


def test_esam_selects_largest_loss_increase():
    model = mlp()
    x, y = data()
    ref = copy.deepcopy(model)
    eng = ksam.ESAM(model, sgd(model), beta=1.0, gamma=0.25, rho=0.5)
    res = eng.step((x, y), ce)
    with torch.no_grad():
        before = F.cross_entropy(ref(x), y, reduction="none")
    w = list(ref.parameters())
    g = torch.autograd.grad(F.cross_entropy(ref(x), y), w)
    norm = torch.sqrt(sum((gi**2).sum() for gi in g))
    with torch.no_grad():
        for p, gi in zip(w, g):
            p.add_(gi * 0.5 / (norm + 1e-12))
        after = F.cross_entropy(ref(x), y, reduction="none")
    expect = torch.argsort(after - before, descending=True, stable=True)[:8]
    assert res.descent_indices.tolist() == expect.tolist()


def test_random_subset_sizes_and_reproducibility():
    eng, results = run("random-sam", mlp(), steps=3, k_ascent=5, seed=11)
    picks = [r.ascent_indices.tolist() for r in results]
    assert all(len(p) == 5 and p == sorted(p) for p in picks)
    assert len({tuple(p) for p in picks}) > 1  # fresh draws each step
    assert all(r.descent_indices.numel() == 32 for r in results)


# ----------------------------------------------------------------------- fast path
@pytest.mark.parametrize("method", ["sgd", "sam", "ksam", "osgd", "asam"])
def test_fast_path_equals_eager_on_cpu(method):
    batches = [data(seed=s) for s in range(4)]
    a, b = bn_net(), bn_net()
    ea, ra = run(method, a, batches=batches)
    eb, rb = run(method, b, batches=batches, fast_path=True)
    assert eb.executor.reason is None
    assert_same(list(a.state_dict().values()), list(b.state_dict().values()), atol=1e-6)
    assert [r.loss for r in ra] == pytest.approx([r.loss for r in rb], abs=1e-6)
    assert all(not r.skipped for r in rb)


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
    assert "host" in eng.executor.reason
    with pytest.warns(UserWarning, match="fast path off"):
        assert not eng.step(data(), ce).skipped


def test_esam_step_with_no_parameter_drawn_for_the_perturbation():
    model = mlp()
    before = params(model)
    eng = ksam.ESAM(model, sgd(model), beta=1e-9, gamma=0.5)
    res = eng.step(data(), ce)
    assert not res.skipped and res.ascent_grad_norm is None
    assert res.descent_indices.numel() == 16
    assert not all(torch.equal(a, b) for a, b in zip(before, params(model)))
