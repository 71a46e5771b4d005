"""The engine/executor boundary and the defects found at it (issue 12)."""

from __future__ import annotations

import copy
import math
from collections import namedtuple
from datetime import timedelta

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ksam
import ksam.distributed as kd
from ksam.executor import ComputedStep, EagerExecutor
from ksam.fast import SyncFreeExecutor, _clone_tree
from ksam.selection import Selection, SelectionContext, TopLoss, subset_gradient_scale


def ce(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y, reduction="none")


def bn_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))


def data(n: int = 32, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g), torch.randint(0, 4, (n,), generator=g)


def sgd(model, **kw):
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, **kw)


def snapshot(model, opt):
    """Weights, BatchNorm buffers and momentum, copied."""
    momentum = [s["momentum_buffer"].clone() for s in opt.state.values()
                if s.get("momentum_buffer") is not None]
    return [t.detach().clone() for t in model.state_dict().values()], momentum


def assert_unchanged(before, model, opt):
    after = snapshot(model, opt)
    assert len(before[0]) == len(after[0]) and len(before[1]) == len(after[1])
    for a, b in zip(before[0] + before[1], after[0] + after[1]):
        assert torch.equal(a, b)


# ------------------------------------------------------------------- the two stages
def test_compute_then_apply_is_a_step():
    """The public stages, run by hand, make exactly the step that step() makes."""
    a, b = bn_net(), bn_net()
    ea = ksam.KSAM(a, sgd(a), k=8, seed=0)
    eb = ksam.KSAM(b, sgd(b), k=8, seed=0)
    for s in range(3):
        batch = data(seed=s)
        ra = ea.step(batch, ce)
        computed = eb.compute(batch, ce)
        assert isinstance(computed, ComputedStep)
        assert computed.descent_indices.tolist() == ra.descent_indices.tolist()
        skip = not bool(eb.finite(computed))
        eb.apply(computed, skip)
        assert float(computed.loss) == ra.loss and skip == ra.skipped
    assert eb.steps == ea.steps == 3
    for p, q in zip(a.state_dict().values(), b.state_dict().values()):
        assert torch.equal(p, q)


def test_executors_are_chosen_by_fast_path():
    model = bn_net()
    assert isinstance(ksam.SAM(model, sgd(model)).executor, EagerExecutor)
    fast = ksam.SAM(model, sgd(model), fast_path=True)
    assert isinstance(fast.executor, SyncFreeExecutor)
    assert fast.fast_path and fast.fast_path_active


def test_selection_rules_hold_no_state_between_select_and_reduce():
    scores = torch.tensor([0.1, 2.0, 0.2, 3.0])
    ctx = SelectionContext(batch_size=4, device=torch.device("cpu"), scores=scores)
    rule = TopLoss(2, rescale=True)
    before = dict(vars(rule))
    sel = rule.select(ctx)
    assert isinstance(sel, Selection) and vars(rule) == before
    assert torch.equal(sel.scale, subset_gradient_scale(scores, sel.index))
    # a selection of another batch reduces with its own scale, whatever ran in between
    other = rule.select(SelectionContext(batch_size=4, device=torch.device("cpu"),
                                         scores=torch.tensor([3.0, 3.0, 3.0, 3.0])))
    losses = torch.tensor([1.0, 3.0])
    assert float(rule.reduce(losses, sel)) == pytest.approx(2.0 * float(sel.scale))
    assert float(rule.reduce(losses, other)) == pytest.approx(2.0)


# ------------------------------------------------- defect 1: state loads, failed steps
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
    for p, q in zip(a.state_dict().values(), b.state_dict().values()):
        assert torch.equal(p, q)


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
    state = src.state_dict()
    del state["fast_path"]
    eng = ksam.KSAM(model, sgd(model), k=8, seed=0, fast_path=True)
    eng.step(data(seed=5), ce)
    eng.load_state_dict(state)
    assert not eng.step(data(seed=2), ce).skipped
    assert eng.optimizer.param_groups[0]["fused"] is True and eng.skipped_steps == 0


class _FailingSGD(torch.optim.SGD):
    def step(self, closure=None):
        raise RuntimeError("optimizer failed")


@pytest.mark.parametrize("fast_path", [False, True])
@pytest.mark.parametrize("where", ["descent", "optimizer"])
def test_a_failing_step_changes_nothing(fast_path, where):
    model = bn_net()
    opt = _FailingSGD(model.parameters(), lr=0.1, momentum=0.9) if where == "optimizer" \
        else sgd(model)
    eng = ksam.SAM(model, opt, fast_path=fast_path)
    if where == "descent":
        eng.step(data(seed=3), ce)  # momentum exists

    def loss_fn(m, batch):
        losses = ce(m, batch)
        if where == "descent" and m[1].track_running_stats is False:  # perturbed pass
            raise RuntimeError("loss failed")
        return losses

    before = snapshot(model, opt)
    steps = eng.steps
    with pytest.raises(RuntimeError, match="failed"):
        eng.step(data(), loss_fn)
    assert_unchanged(before, model, opt)
    assert eng.steps == steps and all(p.grad is None for p in model.parameters())


# ------------------------------------------------- defects 5, 7: bad options, frozen
@pytest.mark.parametrize("factory, kwargs", [
    (ksam.KSAM, {"rho": math.inf}),
    (ksam.KSAM, {"rho": math.nan}),
    (ksam.SAM, {"rho": math.inf}),
    (ksam.SAM, {"rho": 0.5, "adaptive": True, "eta": math.inf}),
    (ksam.ESAM, {"rho": math.inf}),
    (ksam.KSAM, {"k": math.nan}),
    (ksam.KSAM, {"rescale": math.inf}),
    (ksam.ESAM, {"beta": math.nan}),
    (ksam.ESAM, {"gamma": math.inf}),
])
def test_non_finite_options_are_refused(factory, kwargs):
    model = bn_net()
    before = [t.clone() for t in model.state_dict().values()]
    with pytest.raises(ValueError):
        factory(model, sgd(model), **kwargs)
    for a, b in zip(before, model.state_dict().values()):
        assert torch.equal(a, b)


def test_non_finite_rule_options_are_refused():
    with pytest.raises(ValueError, match="finite"):
        ksam.GradientNormPerturbation(math.inf)
    with pytest.raises(ValueError, match="finite"):
        ksam.AdaptivePerturbation(0.5, math.nan)


def test_all_frozen_parameters_are_refused_at_construction():
    model = bn_net()
    opt = sgd(model)
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="frozen"):
        ksam.KSAM(model, opt)


# ---------------------------------------------------- defect 8: state of another method
def test_state_records_the_method_and_refuses_another():
    a, b = bn_net(), bn_net()
    sam = ksam.SAM(a, sgd(a))
    sam.step(data(), ce)
    state = sam.state_dict()
    assert state["method"] == "SAM"
    assert state["rules"] == {"ascent": "WholeBatch", "perturbation": "GradientNormPerturbation",
                              "descent": "WholeBatch"}
    opt = sgd(b)
    k = ksam.KSAM(b, opt, k=8)
    with pytest.raises(ValueError, match="another method"):
        k.load_state_dict(state)
    assert k.steps == 0 and not opt.state
    c = bn_net()
    asam = ksam.create("asam", c, sgd(c))
    with pytest.raises(ValueError, match="AdaptivePerturbation"):
        asam.load_state_dict(state)


# ------------------------------------------------------ defects 9, 10: graph keys, clones
def test_graph_key_tells_closures_with_the_same_code_apart():
    model = bn_net()
    ex = SyncFreeExecutor(ksam.SGD(model, sgd(model)))
    batch = data()

    def weighted(w):
        return lambda m, b: w * ce(m, b)

    one, two = weighted(1.0), weighted(2.0)
    assert one.__code__ is two.__code__
    assert ex._key(batch, one, 32) != ex._key(batch, two, 32)
    assert ex._key(batch, one, 32) == ex._key(batch, one, 32)

    class Task:
        def loss(self, m, b):
            return ce(m, b)

    task = Task()
    assert task.loss is not task.loss  # a new bound method at each access ...
    assert ex._key(batch, task.loss, 32) == ex._key(batch, task.loss, 32)  # ... one graph


def test_clone_tree_keeps_mapping_subclasses_and_namedtuples_unaliased():
    transformers = pytest.importorskip("transformers")
    enc = transformers.BatchEncoding({"input_ids": torch.arange(6).view(2, 3),
                                      "labels": torch.tensor([0, 1])})
    copy_ = _clone_tree(enc)
    assert type(copy_) is transformers.BatchEncoding
    assert copy_["input_ids"] is not enc["input_ids"]
    assert copy_["input_ids"].data_ptr() != enc["input_ids"].data_ptr()
    assert torch.equal(copy_["input_ids"], enc["input_ids"])

    Pair = namedtuple("Pair", "x y")
    pair = Pair(torch.ones(2, 3), torch.zeros(2))
    cloned = _clone_tree(pair)
    assert type(cloned) is Pair and cloned.x.data_ptr() != pair.x.data_ptr()
    assert torch.equal(cloned.x, pair.x) and torch.equal(cloned.y, pair.y)


# ------------------------------------------------------------ defect 13: loss kinds
def test_rescale_estimate_for_squared_error():
    scores = torch.tensor([1.0, 4.0, 9.0, 0.0])  # residuals 1, 2, 3, 0
    idx = torch.tensor([2, 1])
    # mean |r| over the batch / over the subset = (6/4) / (5/2)
    assert float(subset_gradient_scale(scores, idx, "mse")) == pytest.approx(0.6)
    ce_scale = float(subset_gradient_scale(scores, idx, "ce"))
    assert ce_scale != pytest.approx(0.6)


def test_rescale_on_mse_scales_the_descent_step():
    torch.manual_seed(0)
    x, y = torch.randn(16, 6), torch.randn(16)

    def mse(m, b):
        return (m(b[0]).squeeze(1) - b[1]).pow(2)

    def run(**kw):
        torch.manual_seed(1)
        model = nn.Linear(6, 1)
        w0 = model.weight.detach().clone()
        eng = ksam.OrderedSGD(model, torch.optim.SGD(model.parameters(), lr=0.1), k=4)
        eng.descent = TopLoss(4, **kw)
        res = eng.step((x, y), mse)
        return model.weight.detach() - w0, res

    plain, res = run()
    scaled, _ = run(rescale=True, loss_kind="mse")
    s = subset_gradient_scale(res.losses, res.descent_indices, "mse")
    torch.testing.assert_close(scaled, plain * s, rtol=1e-5, atol=1e-8)


def test_negative_losses_make_the_rescaled_step_skipped_not_hidden():
    scores = torch.tensor([-1.0, 2.0, 0.5, 3.0])
    assert math.isnan(float(subset_gradient_scale(scores, torch.tensor([3, 1]))))
    torch.manual_seed(0)
    model = nn.Linear(6, 4)
    before = [p.detach().clone() for p in model.parameters()]
    eng = ksam.KSAM(model, torch.optim.SGD(model.parameters(), lr=0.1), k=2, k_warmup=0)
    res = eng.step(data(8), lambda m, b: ce(m, b) - 1.0)  # shifted: some losses < 0
    assert res.skipped and eng.skipped_steps == 1
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_loss_kind_other_turns_rescale_off():
    model = bn_net()
    eng = ksam.KSAM(model, sgd(model), loss_kind="other")
    assert eng.descent.rescale is False and "loss_kind='other'" in repr(eng.descent)
    assert ksam.KSAM(model, sgd(model)).descent.rescale is True
    with pytest.raises(ValueError, match="rescale"):
        ksam.KSAM(model, sgd(model), loss_kind="other", rescale=True)
    with pytest.raises(ValueError, match="loss_kind"):
        ksam.KSAM(model, sgd(model), loss_kind="bce")


# --------------------------------------------------------------- defect 14: the small ones
def test_fp16_ascent_grad_norm_is_unscaled():
    results = []
    for scaler in (None, torch.amp.GradScaler("cpu", init_scale=2.0**10)):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 4))
        eng = ksam.SAM(model, sgd(model), grad_scaler=scaler)
        results.append(float(eng.step(data(), ce).ascent_grad_norm))
    assert results[1] == pytest.approx(results[0], rel=1e-5)


def test_asam_reuses_its_buffers():
    rule = ksam.AdaptivePerturbation(0.5, 0.01)
    params = [torch.randn(3, 4), torch.randn(5)]
    rule.perturb_([p.clone() for p in params], [torch.randn_like(p) for p in params])
    first = [b.data_ptr() for b in rule._scratch]
    out = [p.clone() for p in params]
    grads = [torch.randn_like(p) for p in params]
    expect_grads = [g * (p.abs() + 0.01) for g, p in zip(grads, params)]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g)
                                                 for g in expect_grads]))
    rule.perturb_(out, grads)
    assert [b.data_ptr() for b in rule._scratch] == first
    for p, o, g in zip(params, out, expect_grads):
        torch.testing.assert_close(o, p + g * (p.abs() + 0.01) * 0.5 / (norm + 1e-12))


def test_dist_timeout_from_the_environment():
    assert kd.resolve_timeout(None, {}) == kd.DEFAULT_TIMEOUT
    assert kd.resolve_timeout(None, {"KSAM_DIST_TIMEOUT": "7.5"}) == timedelta(seconds=7.5)
    assert kd.resolve_timeout(3, {"KSAM_DIST_TIMEOUT": "7.5"}) == timedelta(seconds=3)
    for bad in ("abc", "0", "-1", "inf"):
        with pytest.raises(ValueError, match="KSAM_DIST_TIMEOUT"):
            kd.resolve_timeout(None, {"KSAM_DIST_TIMEOUT": bad})
    with pytest.raises(ValueError):
        kd.resolve_timeout(math.inf)


def test_ddp_model_needs_a_finite_reducer():
    class FakeDDP(nn.Module):  # what the engine looks for: no_sync
        def __init__(self):
            super().__init__()
            self.module = bn_net()

        def no_sync(self):
            raise AssertionError("not called")

    model = FakeDDP()
    with pytest.raises(ValueError, match="finite_reducer"):
        ksam.SAM(model, sgd(model))
    calls = []
    eng = ksam.SGD(model, sgd(model), finite_reducer=lambda f: calls.append(f) or f)
    computed = ComputedStep(loss=torch.tensor(1.0), ascent_indices=torch.arange(0),
                            descent_indices=torch.arange(2), losses=None,
                            ascent_grad_norm=None, checks=[torch.tensor(1.0)])
    assert bool(eng.finite(computed)) and len(calls) == 1


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
    for a, b in zip(runs[0].values(), runs[1].values()):
        assert torch.equal(a, b)
