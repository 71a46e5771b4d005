"""Invariants of the step engine, whatever the method (the guarantees the README lists):
the weights restored bit for bit before the update, the equivalences SAM / SGD, the
BatchNorm rule, skipped and failed steps change nothing, clipping, determinism, state_dict
round trips and refusals, and bad input refused early."""

from __future__ import annotations

import copy
import functools
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    assert_same,
    assert_tree_equal,
    assert_unchanged,
    batches,
    bn_net,
    bn_update_pattern,
    ce,
    ctx,
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
from ksam import core
from ksam.core import ComputedStep
from ksam.selection import AutoBand, TopLoss


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


# --------------------------------------------------------------------- equivalences
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


# ------------------------------------------------------------------ the core's stages
def test_the_core_functions_make_the_step():
    """ksam.core's compute, verdict and apply, run by hand with the step number and the
    schedule's decision, make exactly the steps that step() makes: through K-SAM's
    descent warm-up (subset sizes 32, 16, 8) and AutoBand's phases."""
    a, b = bn_net(), bn_net()
    rule = functools.partial(AutoBand, estimate_steps=(2, 4))
    ea = ksam.KSAM(a, sgd(a), k=8, k_warmup=2, select=rule, seed=0)
    eb = ksam.KSAM(b, sgd(b), k=8, k_warmup=2, select=rule, seed=0)
    sizes = []
    for s in range(8):
        batch = data(seed=s)
        ra = ea.step(batch, ce)
        sharp = eb.plan.schedule.is_sharp(eb.steps, eb.generator)
        computed = core.compute(eb._rt, batch, ce, 32, eb.steps, sharp)
        assert isinstance(computed, ComputedStep)
        assert computed.descent_indices.tolist() == ra.descent_indices.tolist()
        verdict = core.verdict(eb._rt, computed)
        skip = not bool(verdict.finite)
        core.apply(eb._rt, computed, verdict, skip)
        eb.steps += 1
        assert float(computed.loss) == ra.loss and skip == ra.skipped
        sizes.append(ra.descent_indices.numel())
    assert sizes == [32, 32, 16, 16, 8, 8, 8, 8]
    assert ea.steps == 8 and ea.descent.estimate() is not None
    for p, q in zip(a.state_dict().values(), b.state_dict().values()):
        assert torch.equal(p, q)
    assert torch.equal(ea.descent.state_dict()["estimate"], eb.descent.state_dict()["estimate"])


# --------------------------------------------------------------------- BatchNorm
BN_UPDATES = {"sgd": [True], "sam": [True, False], "ksam": [True, False, False],
              "osgd": [True, False], "esam": [True, False], "random-sam": [False, True]}


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("sync", [False, True])
@pytest.mark.parametrize("method", list(BN_UPDATES))
def test_batchnorm_statistics_change_only_in_the_full_batch_pass(method, momentum, sync):
    """Which passes changed a BatchNorm buffer, in order: only the first full-batch one."""
    model = bn_net(momentum=momentum, sync=sync)
    bn = model[1]
    log = bn_update_pattern(bn, lambda: run(method, model, steps=2))
    assert log == BN_UPDATES[method] * 2, method
    assert int(bn.num_batches_tracked) == 2


def test_batchnorm_statistics_of_scheduled_and_momentum_methods():
    """MSAM's only pass is the perturbed one (it updates them, as random-subset SAM's only
    full-batch pass does); LookSAM's plain steps update them in their one pass at w."""

    def pattern(method, **kw):
        model = bn_net()
        return bn_update_pattern(model[1], lambda: run(method, model, steps=4, **kw))

    assert pattern("msam") == [True] * 4
    assert pattern("looksam", interval=2) == [True, False, True, True, False, True]
    assert pattern("sam-late", start_step=2) == [True, True, True, False, True, False]
    assert pattern("ksam-plain", k=8, p=0.0) == [True, False] * 4


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


def test_fp16_ascent_grad_norm_is_unscaled():
    results = []
    for scaler in (None, torch.amp.GradScaler("cpu", init_scale=2.0**10)):
        model = mlp()
        eng = ksam.SAM(model, sgd(model), grad_scaler=scaler)
        results.append(float(eng.step(data(), ce).ascent_grad_norm))
    assert results[1] == pytest.approx(results[0], rel=1e-5)


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


# ------------------------------------------------------------- failures change nothing
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
    calls = []

    def loss_fn(m, batch):
        calls.append(len(calls))
        if where == "descent" and len(calls) == 2:  # SAM's second pass: the perturbed one
            raise RuntimeError("loss failed")
        return ce(m, batch)

    before = snapshot(model, opt)
    steps = eng.steps
    with pytest.raises(RuntimeError, match="failed"):
        eng.step(data(), loss_fn)
    assert len(calls) == 2  # both of SAM's passes ran: it failed where it should
    assert_unchanged(before, model, opt)
    assert eng.steps == steps and all(p.grad is None for p in model.parameters())


# ------------------------------------------------------------------ max_grad_norm
def _descent_gradient(method: str, batch) -> tuple[list[torch.Tensor], float]:
    """The descent gradient of one step (plain SGD, lr 1: w_new = w - g) and the ascent
    gradient's norm."""
    model = mlp()
    w = params(model)
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
    w = params(model)
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


# ------------------------------------------------------------------- determinism
def test_ties_are_broken_by_index():
    scores = torch.tensor([1.0, 3.0, 3.0, 0.5, 3.0, 2.0])
    assert TopLoss(4).select(ctx(scores)).index.tolist() == [1, 2, 4, 5]


@pytest.mark.parametrize("method", ["ksam", "random-sam", "esam"])
def test_same_seed_same_run(method):
    a, b = mlp(), mlp()
    run(method, a, steps=4, seed=3)
    run(method, b, steps=4, seed=3)
    assert_same(params(a), params(b))


# ---------------------------------------------------------------------- state_dict
@pytest.mark.parametrize("method", ["ksam", "random-sam", "esam", "sam"])
def test_state_dict_resumes_exactly(method):
    batches_ = batches(6)
    full = bn_net()
    run(method, full, batches_, seed=7)

    first = bn_net()
    eng, _ = run(method, first, batches_[:3], seed=7)
    saved_model = copy.deepcopy(first.state_dict())
    saved = copy.deepcopy(eng.state_dict())
    assert saved["optimizer"]["state"], "the base optimizer's momentum must be kept"

    resumed = bn_net(seed=99)
    resumed.load_state_dict(saved_model)
    eng2 = ksam.create(method, resumed, sgd(resumed), seed=12345)
    eng2.load_state_dict(saved)
    for b in batches_[3:]:
        eng2.step(b, ce)
    assert eng2.steps == 6
    assert_same(full.state_dict().values(), resumed.state_dict().values())


@pytest.mark.parametrize("method,kw", [
    ("msam", {}), ("looksam", {"interval": 3}), ("rst", {"p": 0.5}),
    ("sam-late", {"start_step": 4}), ("ksam", {"p": 0.5, "k": 8}),
])
def test_state_dict_resumes_schedules_and_transforms_exactly(method, kw):
    batches_ = batches(8)
    full = bn_net()
    full_eng, _ = run(method, full, batches_, seed=7, **kw)

    first = bn_net()
    eng, _ = run(method, first, batches_[:4], seed=7, **kw)
    saved = copy.deepcopy(eng.state_dict())
    saved_model = copy.deepcopy(first.state_dict())
    if method == "looksam":
        assert saved["transform"]["v"].abs().sum() > 0  # the stored direction travels
    resumed = bn_net(seed=99)
    resumed.load_state_dict(saved_model)
    eng2 = ksam.create(method, resumed, sgd(resumed), seed=12345, **kw)
    eng2.load_state_dict(saved)
    for b in batches_[4:]:
        eng2.step(b, ce)
    assert eng2.steps == 8
    assert eng2.sharp_steps == full_eng.sharp_steps
    assert_same(full.state_dict().values(), resumed.state_dict().values())


def test_state_dict_round_trip_resumes_the_descent_warmup():
    """The descent subset's warm-up is a function of the engine's step count, which its
    state_dict holds."""

    def sizes(eng, seeds):
        out = []
        for s in seeds:
            r = eng.step(data(seed=s), ce)
            out.append((r.ascent_indices.numel(), r.descent_indices.numel()))
        return out

    full, part = mlp(), mlp()
    sizes_full = sizes(ksam.KSAM(full, sgd(full), k=4, k_warmup=2, seed=3), range(8))

    e_part = ksam.KSAM(part, sgd(part), k=4, k_warmup=2, seed=3)
    got = sizes(e_part, range(3))
    saved = copy.deepcopy(e_part.state_dict())
    resumed = copy.deepcopy(part)
    e_res = ksam.KSAM(resumed, sgd(resumed), k=4, k_warmup=2, seed=99)
    e_res.load_state_dict(saved)
    assert e_res.steps == 3
    got += sizes(e_res, range(3, 8))
    assert got == sizes_full == [(4, 32), (4, 32), (4, 16), (4, 16), (4, 8), (4, 8),
                                 (4, 4), (4, 4)]
    for p, q in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(p, q)


def test_state_dict_without_the_optimizer():
    """For trainers that save the optimizer themselves (the HF integration): the engine's
    own state resumes exactly next to a separately saved optimizer."""
    batches_ = batches(6)
    full = bn_net()
    run("ksam", full, batches_, seed=7)

    first = bn_net()
    eng, _ = run("ksam", first, batches_[:3], seed=7)
    extras = copy.deepcopy(eng.state_dict(include_optimizer=False))
    assert "optimizer" not in extras
    saved_opt = copy.deepcopy(eng.optimizer.state_dict())
    assert saved_opt["state"]

    resumed = bn_net(seed=99)
    resumed.load_state_dict(first.state_dict())
    opt = sgd(resumed)
    opt.load_state_dict(saved_opt)
    eng2 = ksam.create("ksam", resumed, opt, seed=12345)
    eng2.load_state_dict(extras)
    assert_tree_equal(opt.state_dict(), saved_opt)  # left as it was
    for b in batches_[3:]:
        eng2.step(b, ce)
    assert eng2.steps == 6
    assert_same(full.state_dict().values(), resumed.state_dict().values())


def test_state_records_the_method_and_refuses_another():
    a, b = bn_net(), bn_net()
    sam = ksam.SAM(a, sgd(a))
    sam.step(data(), ce)
    saved = sam.state_dict()
    assert saved["method"] == "SAM"
    assert saved["rules"] == {"ascent": "WholeBatch", "perturbation": "GradientNormPerturbation",
                              "descent": "WholeBatch"}
    opt = sgd(b)
    k = ksam.KSAM(b, opt, k=8)
    with pytest.raises(ValueError, match="another method"):
        k.load_state_dict(saved)
    assert k.steps == 0 and not opt.state
    c = bn_net()
    asam = ksam.create("asam", c, sgd(c))
    with pytest.raises(ValueError, match="AdaptivePerturbation"):
        asam.load_state_dict(saved)


def _adam_state_of(opt: torch.optim.Optimizer) -> list:
    return [(k, v.clone() if isinstance(v, torch.Tensor) else v)
            for st in opt.state.values() for k, v in st.items()]


@pytest.mark.parametrize("recorded", [True, False])
def test_a_state_of_another_optimizer_is_refused_and_changes_nothing(recorded):
    """A SAM-over-SGD state into a SAM-over-Adam engine: refused (by the recorded optimizer
    class, or - for a state without it - by the failed load, rolled back), and the engine
    steps on as before."""
    a = mlp()
    sam_sgd = ksam.SAM(a, sgd(a))
    sam_sgd.step(data(seed=0), ce)
    saved = sam_sgd.state_dict()
    if not recorded:
        del saved["optimizer_class"]
    b, twin = mlp(), mlp()
    engines = []
    for m in (b, twin):
        eng = ksam.SAM(m, torch.optim.Adam(m.parameters(), lr=1e-3))
        eng.step(data(seed=0), ce)
        engines.append(eng)
    eng, reference = engines
    groups_before = copy.deepcopy(eng.optimizer.state_dict()["param_groups"])
    adam_before = _adam_state_of(eng.optimizer)
    with pytest.raises(ValueError, match="another optimizer" if recorded else "nothing"):
        eng.load_state_dict(saved)
    assert eng.optimizer.state_dict()["param_groups"] == groups_before
    for (ka, va), (kb, vb) in zip(adam_before, _adam_state_of(eng.optimizer)):
        assert ka == kb and (torch.equal(va, vb) if isinstance(va, torch.Tensor) else va == vb)
    assert eng.steps == 1
    for s in (1, 2):  # still steps exactly as an engine that was never asked to load
        eng.step(data(seed=s), ce)
        reference.step(data(seed=s), ce)
    assert_same(params(b), params(twin))


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
    ("msam", {"rho": -0.1}, "rho must be"),
    ("looksam", {"interval": 0}, "interval must be"),
    ("looksam", {"alpha": -1.0}, "alpha must be"),
    ("rst", {"p": 1.5}, "p must be a finite number in \\[0, 1\\]"),
    ("rst", {"p": float("nan")}, "p must be a finite number in \\[0, 1\\]"),
    ("sam-late", {"start_step": -1}, "start_step must be"),
    ("ksam", {"start_step": 2.5}, "start_step must be"),
    ("esam", {"p": True}, "p must be a finite number in \\[0, 1\\]"),
    ("looksam", {"alpha": float("inf")}, "alpha must be a finite number >= 0"),
    ("mesa", {"temperature": 0.0}, "temperature must be a finite number > 0"),
    ("saf", {"num_examples": 8, "delay": 0}, "delay must be an integer >= 1"),
]


@pytest.mark.parametrize("method,kwargs,message", BAD_CONSTRUCTION)
def test_bad_options_fail_at_construction(method, kwargs, message):
    model = mlp()
    before = params(model)
    with pytest.raises(ValueError, match=message):
        ksam.create(method, model, sgd(model), **kwargs)
    assert_same(params(model), before)


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
    assert_same(before, model.state_dict().values())


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
def test_bad_engine_options_are_refused(method, kwargs, message):
    model = mlp()
    before = params(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    with pytest.raises(ValueError, match=message):
        ksam.create(method, model, opt, seed=0, **kwargs)
    assert_same(params(model), before)


def test_unknown_method():
    model = mlp()
    with pytest.raises(ValueError, match="unknown method 'foo'"):
        ksam.create("foo", model, sgd(model))


@pytest.mark.parametrize("method, option", [("random-sam", "k"), ("sgd", "rho"),
                                            ("msam", "select"), ("ksam", "kk")])
def test_unknown_option_names_the_method_and_its_options(method, option):
    model = mlp()
    before = params(model)
    with pytest.raises(ValueError) as info:
        ksam.create(method, model, sgd(model), **{option: 8})
    message = str(info.value)
    assert f"method {method!r} takes no option {option!r}" in message
    takes = ksam.methods.option_names(method)
    assert all(name in message for name in takes)
    assert "engine options" in message and "micro_batch_size" in message
    assert_same(params(model), before)


def test_optimizer_over_other_parameters_is_refused():
    model, other = mlp(), mlp(1)
    with pytest.raises(ValueError, match="not the model's"):
        ksam.KSAM(model, sgd(other))


def test_all_frozen_parameters_are_refused_at_construction():
    model = bn_net()
    opt = sgd(model)
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="frozen"):
        ksam.KSAM(model, opt)


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
    assert not eng.step(data(64, seed=5), ce).skipped  # momentum exists: it must stay
    assert opt.state
    before = snapshot(model, opt)
    with pytest.raises(ValueError, match=message):
        eng.step(batch(), loss_fn)
    assert_unchanged(before, model, opt)
    assert eng.steps == 1 and all(p.grad is None for p in model.parameters())


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
