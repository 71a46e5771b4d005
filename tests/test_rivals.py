"""The rivals on the engine: Momentum-SAM, LookSAM, late-phase SAM, RST and the schedule of
sharpness-aware steps (issue 13). Equivalences are exact; references are written by hand."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ksam
from ksam.schedule import Schedule, start_step_of

LR, MU, WD = 0.1, 0.9, 5e-4


def ce(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y, reduction="none")


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 4))


def bn_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))


def data(n: int = 32, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g), torch.randint(0, 4, (n,), generator=g)


def batches(steps: int) -> list:
    return [data(seed=s) for s in range(steps)]


def sgd(model, lr=LR, momentum=MU, weight_decay=WD):
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum,
                           weight_decay=weight_decay)


def params(model):
    return [p.detach().clone() for p in model.parameters()]


def assert_same(a, b, atol=0.0):
    a, b = list(a), list(b)
    assert len(a) == len(b)
    for x, y in zip(a, b):
        if atol == 0:
            assert torch.equal(x, y)
        else:
            torch.testing.assert_close(x, y, atol=atol, rtol=0)


def run(method, model, data_=None, seed=0, opt=None, **kw):
    opt = opt or sgd(model)
    eng = ksam.create(method, model, opt, seed=seed, **kw)
    results = [eng.step(b, ce) for b in (data_ or batches(5))]
    return eng, results


def final(method, data_=None, make=mlp, **kw):
    model = make()
    run(method, model, data_, **kw)
    return list(model.state_dict().values())


# ------------------------------------------------------------ hand-written references
def _grad(model, batch):
    x, y = batch
    w = list(model.parameters())
    return list(torch.autograd.grad(F.cross_entropy(model(x), y), w))


def _norm(ts):
    return torch.sqrt(sum((t.double() ** 2).sum() for t in ts)).float()


def _grad_at(model, batch, eps):
    """Gradient at w + eps, w put back exactly."""
    w = list(model.parameters())
    saved = [p.detach().clone() for p in w]
    with torch.no_grad():
        for p, e in zip(w, eps):
            p.add_(e)
    g = _grad(model, batch)
    with torch.no_grad():
        for p, s in zip(w, saved):
            p.copy_(s)
    return g


def _sam_grad(model, batch, rho, g=None):
    g = _grad(model, batch) if g is None else g
    n = _norm(g)
    return _grad_at(model, batch, [rho * gi / (n + 1e-12) for gi in g])


class _HandSGD:
    """torch.optim.SGD(lr, momentum, weight_decay) written out."""

    def __init__(self, model):
        self.w = list(model.parameters())
        self.buf = None

    def step(self, grads):
        with torch.no_grad():
            d = [g + WD * p for g, p in zip(grads, self.w)]
            self.buf = d if self.buf is None else [MU * b + di for b, di in zip(self.buf, d)]
            for p, b in zip(self.w, self.buf):
                p.sub_(LR * b)


def test_msam_matches_hand_written_reference():
    rho, data_ = 0.3, batches(5)
    model, ref = mlp(), mlp()
    run("msam", model, data_, rho=rho)
    opt = _HandSGD(ref)
    for b in data_:
        if opt.buf is None:  # first step: no momentum yet, no perturbation
            g = _grad(ref, b)
        else:
            n = _norm(opt.buf)
            g = _grad_at(ref, b, [-rho * v / (n + 1e-12) for v in opt.buf])
        opt.step(g)
    assert_same(params(model), params(ref), atol=2e-6)


def test_msam_with_adam_perturbs_along_the_first_moment():
    rho, data_ = 0.2, batches(4)
    model, ref = mlp(), mlp()
    run("msam", model, data_, rho=rho, opt=torch.optim.AdamW(model.parameters(), lr=1e-2))
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    w = list(ref.parameters())
    for b in data_:
        m = [ref_opt.state[p]["exp_avg"] for p in w if p in ref_opt.state]
        eps = [-rho * mi / (_norm(m) + 1e-12) for mi in m] if m else [torch.zeros_like(p)
                                                                      for p in w]
        for p, g in zip(w, _grad_at(ref, b, eps)):
            p.grad = g
        ref_opt.step()
    assert_same(params(model), params(ref), atol=2e-6)


def test_looksam_matches_hand_written_reference():
    rho, alpha, interval, data_ = 0.05, 0.7, 3, batches(7)
    model, ref = mlp(), mlp()
    run("looksam", model, data_, rho=rho, interval=interval, alpha=alpha)
    opt, v = _HandSGD(ref), None
    for t, b in enumerate(data_):
        g = _grad(ref, b)
        if t % interval == 0:
            gs = _sam_grad(ref, b, rho, g)
            dot = sum((a * c).sum() for a, c in zip(gs, g))
            gv = [a - dot / _norm(g) ** 2 * c for a, c in zip(gs, g)]
            v = [x / _norm(gv) for x in gv]
            d = gs
        else:
            d = [gi + alpha * _norm(g) * vi for gi, vi in zip(g, v)]
        opt.step(d)
    assert_same(params(model), params(ref), atol=2e-6)


@pytest.mark.parametrize("method,kw", [("sam-late", {"start_step": 2}), ("rst", {"p": 0.5})])
def test_scheduled_sam_matches_hand_written_reference(method, kw):
    rho, seed, data_ = 0.05, 11, batches(8)
    model, ref = mlp(), mlp()
    _, results = run(method, model, data_, seed=seed, rho=rho, **kw)
    if method == "rst":
        gen = torch.Generator().manual_seed(seed)
        sharp = [float(torch.rand((), generator=gen)) < 0.5 for _ in data_]
        assert 0 < sum(sharp) < len(sharp)
    else:
        sharp = [t >= 2 for t in range(len(data_))]
    assert [r.ascent_indices.numel() > 0 for r in results] == sharp
    opt = _HandSGD(ref)
    for b, s in zip(data_, sharp):
        opt.step(_sam_grad(ref, b, rho) if s else _grad(ref, b))
    assert_same(params(model), params(ref), atol=2e-6)


# --------------------------------------------------------------------- equivalences
def test_msam_rho_zero_is_sgd():
    assert_same(final("msam", rho=0.0), final("sgd"))


def test_msam_without_momentum_is_sgd():
    a, b = mlp(), mlp()
    run("msam", a, opt=sgd(a, momentum=0.0), rho=0.5)
    run("sgd", b, opt=sgd(b, momentum=0.0))
    assert_same(params(a), params(b))


def test_looksam_interval_one_is_sam():
    assert_same(final("looksam", make=bn_net, interval=1), final("sam", make=bn_net))


@pytest.mark.parametrize("method", ["sam", "asam", "ksam", "random-sam", "esam"])
def test_start_step_zero_and_p_one_are_the_method(method):
    plain = final(method, make=bn_net)
    assert_same(final(method, make=bn_net, start_step=0), plain)
    assert_same(final(method, make=bn_net, p=1.0), plain)


def test_sam_late_from_zero_is_sam_and_beyond_the_run_is_sgd():
    assert_same(final("sam-late", make=bn_net, start_step=0), final("sam", make=bn_net))
    assert_same(final("sam-late", make=bn_net, start_step=5), final("sgd", make=bn_net))
    assert_same(final("sam-late", make=bn_net, start_step=10**6), final("sgd", make=bn_net))


def test_rst_p_one_is_sam_and_p_zero_is_sgd():
    assert_same(final("rst", make=bn_net, p=1.0), final("sam", make=bn_net))
    assert_same(final("rst", make=bn_net, p=0.0), final("sgd", make=bn_net))


@pytest.mark.parametrize("method", ["sam", "asam", "random-sam", "esam"])
def test_never_sharp_is_a_whole_batch_plain_step(method):
    assert_same(final(method, make=bn_net, p=0.0), final("sgd", make=bn_net))


def test_ksam_plain_steps_are_ordered_sgd_on_the_descent_subset():
    kw = {"k": 8}
    assert_same(final("ksam-plain", make=bn_net, p=0.0, **kw),
                final("osgd", make=bn_net, **kw))


# --------------------------------------------------------- passes and their counts
def _counting(log):
    """A loss_fn logging (rows, gradient?, backward passes through it) per forward."""

    def loss_fn(model, batch):
        losses = ce(model, batch)
        entry = [len(losses), losses.requires_grad, 0]
        log.append(entry)
        if losses.requires_grad:
            losses.register_hook(lambda g, e=entry: e.__setitem__(2, e[2] + 1))
        return losses

    return loss_fn


def _passes(method, steps=4, **kw):
    model = mlp()
    eng = ksam.create(method, model, sgd(model), seed=3, **kw)
    out = []
    for b in batches(steps):
        log: list = []
        eng.step(b, _counting(log))
        out.append([tuple(e) for e in log])
    return out


PLAIN, SAM_STEP = [(32, True, 1)], [(32, True, 1), (32, True, 1)]


def test_pass_counts_per_step():
    assert _passes("msam") == [PLAIN] * 4  # one forward, one backward, also with a buffer
    assert _passes("looksam", interval=2) == [SAM_STEP, PLAIN, SAM_STEP, PLAIN]
    assert _passes("sam-late", start_step=3) == [PLAIN] * 3 + [SAM_STEP]
    scoring, top8 = (32, False, 0), (8, True, 1)
    assert _passes("ksam-plain", k=8, start_step=2) == [[scoring, top8]] * 2 + \
        [[scoring, top8, top8]] * 2
    rst = _passes("rst", steps=12, p=0.5)
    assert set(map(tuple, rst)) == {tuple(PLAIN), tuple(SAM_STEP)}
    gen = torch.Generator().manual_seed(3)
    assert [len(s) == 2 for s in rst] == [float(torch.rand((), generator=gen)) < 0.5
                                          for _ in range(12)]


def test_schedule_counts_sharp_steps():
    model = mlp()
    eng, _ = run("looksam", model, batches(7), interval=3)
    assert eng.schedule.sharp_steps == 3  # steps 0, 3, 6
    sched = Schedule(start_step=2, interval=2)
    assert [sched.is_sharp(t, None) for t in range(7)] == [False, False, True, False, True,
                                                           False, True]


def test_batchnorm_statistics_only_from_the_first_full_batch_pass():
    """MSAM's only pass is the perturbed one (it updates them, as random-subset SAM's only
    full-batch pass does); LookSAM's plain steps update them in their one pass at w."""

    def pattern(method, **kw):
        model = bn_net()
        bn = model[1]
        log = []
        bn.register_forward_pre_hook(lambda m, i: log.append([b.clone() for b in m.buffers()]))

        def after(m, i, o):
            old = log.pop()
            log.append(not all(torch.equal(a, b) for a, b in zip(old, m.buffers())))

        bn.register_forward_hook(after)
        run(method, model, batches(4), **kw)
        return log

    assert pattern("msam") == [True] * 4
    assert pattern("looksam", interval=2) == [True, False, True, True, False, True]
    assert pattern("sam-late", start_step=2) == [True, True, True, False, True, False]
    assert pattern("ksam-plain", k=8, p=0.0) == [True, False] * 4


# ------------------------------------------------------------- state and resume
@pytest.mark.parametrize("method,kw", [
    ("msam", {}), ("looksam", {"interval": 3}), ("rst", {"p": 0.5}),
    ("sam-late", {"start_step": 4}), ("ksam", {"p": 0.5, "k": 8}),
])
def test_state_dict_resumes_bit_identically(method, kw):
    data_ = batches(8)
    full = bn_net()
    full_eng, _ = run(method, full, data_, seed=7, **kw)

    first = bn_net()
    eng, _ = run(method, first, data_[:4], seed=7, **kw)
    saved = copy.deepcopy(eng.state_dict())
    saved_model = copy.deepcopy(first.state_dict())
    if method == "looksam":
        assert saved["transform"]["v"].abs().sum() > 0  # the stored direction travels
    resumed = bn_net(seed=99)
    resumed.load_state_dict(saved_model)
    eng2 = ksam.create(method, resumed, sgd(resumed), seed=12345, **kw)
    eng2.load_state_dict(saved)
    for b in data_[4:]:
        eng2.step(b, ce)
    assert eng2.steps == 8
    assert eng2.schedule.sharp_steps == full_eng.schedule.sharp_steps
    assert_same(full.state_dict().values(), resumed.state_dict().values())


def test_skipped_sam_step_keeps_looksams_direction():
    model = mlp()
    eng = ksam.create("looksam", model, sgd(model), interval=2)
    eng.step(data(seed=0), ce)
    eng.step(data(seed=1), ce)
    v = eng.state_dict()["transform"]["v"].clone()
    before = params(model)
    x, y = data(seed=2)
    x[0, 0] = float("nan")
    assert eng.step((x, y), ce).skipped  # a SAM step (t = 2), skipped
    assert torch.equal(eng.state_dict()["transform"]["v"], v)
    assert_same(params(model), before)


# ---------------------------------------------------------------------- fast path
@pytest.mark.parametrize("method,kw", [
    ("msam", {}), ("looksam", {"interval": 2}), ("rst", {"p": 0.5}),
    ("sam-late", {"start_step": 2}), ("ksam", {"start_step": 2, "k": 8}),
])
def test_fast_path_equals_eager_on_cpu(method, kw):
    data_ = batches(5)
    a, b = bn_net(), bn_net()
    run(method, a, data_, **kw)
    eng, _ = run(method, b, data_, fast_path=True, **kw)
    assert eng.fast_path_active
    assert_same(a.state_dict().values(), b.state_dict().values(), atol=1e-6)


# --------------------------------------------------------------------- bad input
@pytest.mark.parametrize("method,kw,message", [
    ("msam", {"rho": -0.1}, "rho must be"),
    ("looksam", {"interval": 0}, "interval must be"),
    ("looksam", {"alpha": -1.0}, "alpha must be"),
    ("rst", {"p": 1.5}, "p must be a probability"),
    ("rst", {"p": float("nan")}, "p must be a probability"),
    ("sam-late", {"start_step": -1}, "start_step must be"),
    ("ksam", {"start_step": 2.5}, "start_step must be"),
    ("esam", {"p": True}, "p must be a probability"),
])
def test_bad_options_fail_at_construction(method, kw, message):
    model = mlp()
    before = params(model)
    with pytest.raises(ValueError, match=message):
        ksam.create(method, model, sgd(model), **kw)
    assert_same(params(model), before)


def test_sam_late_needs_its_start():
    model = mlp()
    with pytest.raises(TypeError, match="start_step"):
        ksam.create("sam-late", model, sgd(model))


def test_start_fraction_of_the_run():
    assert start_step_of(0.8, 1000) == 800
    assert start_step_of(0.0, 37) == 0 and start_step_of(1.0, 37) == 37
    with pytest.raises(ValueError, match="fraction of the run"):
        start_step_of(1.2, 10)


def test_cli_spec_start_fraction_becomes_start_step():
    from ksam.compare import parse_method_spec
    from ksam.train import TrainConfig, build_engine

    def engine(spec, steps_total=50):
        name, options = parse_method_spec(spec)
        cfg = TrainConfig(method=name, method_options=options, lr=0.1, momentum=0.9,
                          weight_decay=0.0, device="cpu", fast=False)
        return build_engine(name, mlp(), cfg, steps_total)[0]

    assert engine("sam-late:start=0.8").schedule.start_step == 40
    assert engine("sam-late").schedule.start_step == 40  # the default: the last 20 %
    sched = engine("ksam:start=0.5,p=0.25").schedule
    assert (sched.start_step, sched.p) == (25, 0.25)
    assert engine("rst:p=0.3").schedule.p == 0.3
    assert engine("looksam:interval=4,alpha=0.5").schedule.interval == 4
    with pytest.raises(ValueError, match="not both"):
        engine("sam:start=0.5,start_step=3")
    with pytest.raises(ValueError, match="takes no option 'start'"):
        parse_method_spec("msam:start=0.5")


def test_looksam_with_a_frozen_parameter():
    """Parameters without a gradient get no share of v: interval=1 is still SAM, and the
    plain steps leave the frozen parameter alone."""

    def frozen():
        model = mlp()
        model[0].bias.requires_grad_(False)
        return model

    assert_same(final("looksam", make=frozen, interval=1), final("sam", make=frozen))
    model = frozen()
    bias = model[0].bias.detach().clone()
    eng, results = run("looksam", model, batches(4), interval=2)
    assert torch.equal(model[0].bias, bias) and not any(r.skipped for r in results)
