"""Each method against a hand-written reference of its published algorithm (K-SAM, ESAM,
Momentum-SAM, LookSAM, late-phase SAM, RST), the exact equivalences between methods, the
passes each method makes, the methods' defaults and their names in a method spec."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_same, batches, bn_net, ce, data, mlp, params, run, sgd

import ksam
from ksam.lab.compare import parse_method_spec
from ksam.methods import K_WARMUP, RESCALE
from ksam.schedule import start_step_of
from ksam.selection import TopLoss

LR, MU, WD = 0.1, 0.9, 5e-4


def sgd_wd(model, momentum=MU):
    """The SGD of :class:`_HandSGD`: lr, momentum and weight decay."""
    return sgd(model, lr=LR, momentum=momentum, weight_decay=WD)


def run_wd(method, model, batches_=None, opt=None, **kw):
    """:func:`conftest.run` with :func:`sgd_wd` over 5 batches unless told otherwise."""
    return run(method, model, batches(5) if batches_ is None else batches_,
               opt=opt or sgd_wd(model), **kw)


def final(method, batches_=None, make=mlp, **kw):
    model = make()
    run_wd(method, model, batches_, **kw)
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


def test_ksam_matches_hand_written_reference():
    """One K-SAM step written out by hand: scores, top-K, ascent, eps, descent, SGD."""
    model = mlp()
    ref = copy.deepcopy(model)
    x, y = data(32)
    rho, k = 0.07, 8
    run("ksam-plain", model, [(x, y)], rho=rho, k=k)

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


def test_msam_matches_hand_written_reference():
    rho, batches_ = 0.3, batches(5)
    model, ref = mlp(), mlp()
    run_wd("msam", model, batches_, rho=rho)
    opt = _HandSGD(ref)
    for b in batches_:
        if opt.buf is None:  # first step: no momentum yet, no perturbation
            g = _grad(ref, b)
        else:
            n = _norm(opt.buf)
            g = _grad_at(ref, b, [-rho * v / (n + 1e-12) for v in opt.buf])
        opt.step(g)
    assert_same(params(model), params(ref), atol=2e-6)


def test_msam_with_adam_perturbs_along_the_first_moment():
    rho, batches_ = 0.2, batches(4)
    model, ref = mlp(), mlp()
    run_wd("msam", model, batches_, rho=rho,
           opt=torch.optim.AdamW(model.parameters(), lr=1e-2))
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    w = list(ref.parameters())
    for b in batches_:
        m = [ref_opt.state[p]["exp_avg"] for p in w if p in ref_opt.state]
        eps = [-rho * mi / (_norm(m) + 1e-12) for mi in m] if m else [torch.zeros_like(p)
                                                                      for p in w]
        for p, g in zip(w, _grad_at(ref, b, eps)):
            p.grad = g
        ref_opt.step()
    assert_same(params(model), params(ref), atol=2e-6)


def test_looksam_matches_hand_written_reference():
    rho, alpha, interval, batches_ = 0.05, 0.7, 3, batches(7)
    model, ref = mlp(), mlp()
    run_wd("looksam", model, batches_, rho=rho, interval=interval, alpha=alpha)
    opt, v = _HandSGD(ref), None
    for t, b in enumerate(batches_):
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


@pytest.mark.parametrize("method,kw", [("sam-late", {"start_step": 2}), ("rst", {"p": 0.5}),
                                       ("sam", {"start_step": 3})])
def test_scheduled_sam_matches_hand_written_reference(method, kw):
    rho, seed, batches_ = 0.05, 11, batches(8)
    model, ref = mlp(), mlp()
    eng, results = run_wd(method, model, batches_, seed=seed, rho=rho, **kw)
    if method == "rst":
        gen = torch.Generator().manual_seed(seed)
        sharp = [float(torch.rand((), generator=gen)) < 0.5 for _ in batches_]
        assert 0 < sum(sharp) < len(sharp)
    else:
        sharp = [t >= kw["start_step"] for t in range(len(batches_))]
    assert [r.ascent_indices.numel() > 0 for r in results] == sharp
    assert eng.sharp_steps == sum(sharp)
    opt = _HandSGD(ref)
    for b, s in zip(batches_, sharp):
        opt.step(_sam_grad(ref, b, rho) if s else _grad(ref, b))
    assert_same(params(model), params(ref), atol=2e-6)


@pytest.mark.parametrize("method,kw", [("sam", {}), ("sam", {"p": 1.0}),
                                       ("sam", {"start_step": 0}),
                                       ("sam-late", {"start_step": 0}), ("rst", {"p": 1.0})])
def test_sam_on_every_step_matches_hand_written_reference_and_draws_nothing(method, kw):
    """A schedule that leaves every step sharp (start 0, p=1) is SAM, step by step, and
    takes no draw from the engine's generator."""
    rho, seed, batches_ = 0.05, 4, batches(5)
    model, ref = mlp(), mlp()
    eng, results = run_wd(method, model, batches_, seed=seed, rho=rho, **kw)
    assert [r.ascent_indices.numel() for r in results] == [32] * 5
    assert eng.sharp_steps == 5
    assert torch.equal(eng.generator.get_state(),
                       torch.Generator().manual_seed(seed).get_state())
    opt = _HandSGD(ref)
    for b in batches_:
        opt.step(_sam_grad(ref, b, rho))
    assert_same(params(model), params(ref), atol=2e-6)


@pytest.mark.parametrize("method", ["asam", "ksam", "random-sam", "esam"])
def test_p_one_makes_every_step_sharp_and_draws_no_schedule_number(method):
    """With p=1 the generator advances exactly as the method's own draws make it (random
    rows, ESAM's mask), never by a schedule draw."""
    own, _ = run_wd(method, mlp(), seed=4)
    eng, results = run_wd(method, mlp(), seed=4, p=1.0)
    assert all(r.ascent_indices.numel() > 0 for r in results)
    assert eng.sharp_steps == own.sharp_steps == 5
    assert torch.equal(eng.generator.get_state(), own.generator.get_state())


@pytest.mark.parametrize("method", ["sam", "asam", "random-sam", "esam"])
def test_start_step_is_plain_sgd_steps_then_the_method(method):
    """``start_step=S``: exactly the steps of plain SGD for S steps, then exactly those of
    the method, continuing from SGD's weights and momentum."""
    start, seed, batches_ = 3, 4, batches(6)
    model, ref = mlp(), mlp()
    eng, results = run_wd(method, model, batches_, seed=seed, start_step=start)
    assert [r.ascent_indices.numel() > 0 for r in results] == [False] * 3 + [True] * 3
    assert all(r.descent_indices.numel() == 32 for r in results[:start])
    assert eng.sharp_steps == 3
    opt = sgd_wd(ref)
    run("sgd", ref, batches_[:start], opt=opt)
    run(method, ref, batches_[start:], seed=seed, opt=opt)
    assert_same(params(model), params(ref))


# --------------------------------------------------------------------- equivalences
def test_msam_rho_zero_is_sgd():
    assert_same(final("msam", rho=0.0), final("sgd"))


def test_msam_without_momentum_is_sgd():
    a, b = mlp(), mlp()
    run_wd("msam", a, opt=sgd_wd(a, momentum=0.0), rho=0.5)
    run_wd("sgd", b, opt=sgd_wd(b, momentum=0.0))
    assert_same(params(a), params(b))


def test_looksam_interval_one_is_sam():
    assert_same(final("looksam", make=bn_net, interval=1), final("sam", make=bn_net))


def test_sam_late_beyond_the_run_is_sgd():
    assert_same(final("sam-late", make=bn_net, start_step=5), final("sgd", make=bn_net))
    assert_same(final("sam-late", make=bn_net, start_step=10**6), final("sgd", make=bn_net))


def test_rst_p_zero_is_sgd():
    assert_same(final("rst", make=bn_net, p=0.0), final("sgd", make=bn_net))


@pytest.mark.parametrize("method", ["sam", "asam", "random-sam", "esam"])
def test_never_sharp_is_a_whole_batch_plain_step(method):
    assert_same(final(method, make=bn_net, p=0.0), final("sgd", make=bn_net))


def test_ksam_plain_steps_are_ordered_sgd_on_the_descent_subset():
    kw = {"k": 8}
    assert_same(final("ksam-plain", make=bn_net, p=0.0, **kw),
                final("osgd", make=bn_net, **kw))


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
    eng, results = run_wd("looksam", model, batches(4), interval=2)
    assert torch.equal(model[0].bias, bias) and not any(r.skipped for r in results)


# --------------------------------------------------------- passes and their counts
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
    eng = ksam.create(method, model, sgd_wd(model), seed=3, **kw)
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


def test_looksam_counts_its_sam_steps():
    eng, _ = run_wd("looksam", mlp(), batches(7), interval=3)
    assert eng.sharp_steps == 3  # steps 0, 3, 6


# --------------------------------------------------------------- defaults and options
def test_random_subset_sizes_and_reproducibility():
    eng, results = run("random-sam", mlp(), steps=3, k_ascent=5, seed=11)
    picks = [r.ascent_indices.tolist() for r in results]
    assert all(len(p) == 5 and p == sorted(p) for p in picks)
    assert len({tuple(p) for p in picks}) > 1  # fresh draws each step
    assert all(r.descent_indices.numel() == 32 for r in results)


def test_esam_step_with_no_parameter_drawn_for_the_perturbation():
    model = mlp()
    before = params(model)
    eng = ksam.ESAM(model, sgd(model), beta=1e-9, gamma=0.5)
    res = eng.step(data(), ce)
    assert not res.skipped and res.ascent_grad_norm is None
    assert res.descent_indices.numel() == 16
    assert not all(torch.equal(a, b) for a, b in zip(before, params(model)))


def _subset_sizes(eng: ksam.Method, steps: int) -> list[tuple[int, int]]:
    out = []
    for s in range(steps):
        r = eng.step(data(seed=s), ce)
        out.append((r.ascent_indices.numel(), r.descent_indices.numel()))
    return out


def test_default_ksam_warms_up_the_descent_only():
    model = mlp()
    eng = ksam.KSAM(model, sgd(model), k=8, k_warmup=2)
    assert _subset_sizes(eng, 7) == [(8, 32), (8, 32), (8, 16), (8, 16), (8, 8), (8, 8),
                                     (8, 8)]


def test_defaults_and_plain_method():
    model = mlp()
    default = ksam.create("ksam", model, sgd(model))
    assert default.descent.warmup == K_WARMUP > 0 and default.descent.rescale is RESCALE is True
    assert not default.ascent.warmup and not default.ascent.rescale  # the ascent is plain
    plain = ksam.create("ksam-plain", model, sgd(model)).descent
    assert plain.warmup == 0 and plain.rescale is False
    assert ksam.create("osgd", model, sgd(model)).descent.warmup == 0
    assert parse_method_spec("ksam:k=16,k_warmup=0") == ("ksam", {"k": 16, "k_warmup": 0})
    assert parse_method_spec("ksam-plain:k=16") == ("ksam-plain", {"k": 16})


def test_plain_mode_matches_a_hand_built_engine():
    """``k_warmup=0, rescale=False`` / ``ksam-plain``: the engine with two plain TopLoss
    rules."""
    models = [mlp(), mlp(), mlp()]
    engines = [
        ksam.KSAM(models[0], sgd(models[0]), k=8, k_warmup=0, rescale=False, select="top",
                  seed=0),
        ksam.create("ksam-plain", models[1], sgd(models[1]), k=8, seed=0),
        ksam.Method(models[2], sgd(models[2]), ascent=TopLoss(8),
                    perturbation=ksam.perturbation.GradientNormPerturbation(0.05),
                    descent=TopLoss(8), seed=0),
    ]
    for s in range(4):
        idx = [e.step(data(seed=s), ce).descent_indices.tolist() for e in engines]
        assert idx[0] == idx[1] == idx[2] and len(idx[0]) == 8
    for p, q, r in zip(*(m.parameters() for m in models)):
        assert torch.equal(p, q) and torch.equal(p, r)


def test_warmup_differs_from_plain_only_while_warming_up():
    a, b = mlp(), mlp()
    ea = ksam.KSAM(a, sgd(a), k=8, k_warmup=1)
    eb = ksam.KSAM(b, sgd(b), k=8, k_warmup=0)
    ra, rb = ea.step(data(seed=0), ce), eb.step(data(seed=0), ce)
    assert ra.descent_indices.numel() == 32 and rb.descent_indices.numel() == 8
    assert not torch.equal(a[0].weight, b[0].weight)


def test_sam_late_needs_its_start():
    model = mlp()
    with pytest.raises(TypeError, match="start_step"):
        ksam.create("sam-late", model, sgd(model))


# ------------------------------------------------------------------- method specs
def test_start_fraction_of_the_run():
    assert start_step_of(0.8, 1000) == 800
    assert start_step_of(0.0, 37) == 0 and start_step_of(1.0, 37) == 37
    with pytest.raises(ValueError, match="fraction of the run"):
        start_step_of(1.2, 10)


def test_cli_spec_start_fraction_becomes_start_step():
    from ksam.lab.train import TrainConfig, build_engine

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


def test_cli_spec_takes_select():
    assert parse_method_spec("ksam:k=16,select=band") == ("ksam", {"k": 16, "select": "band"})
    assert parse_method_spec("osgd:select=median") == ("osgd", {"select": "median"})
    with pytest.raises(ValueError, match="takes no option 'select'"):
        parse_method_spec("ksam-plain:select=band")


@pytest.mark.parametrize("seed", range(6))
def test_esam_keeps_frozen_parameters_frozen(seed):
    """A layer the user froze (but left in the optimizer) is neither trained nor unfrozen by
    ESAM's weight mask, for any draw of the mask."""
    model = mlp()
    frozen = next(model.parameters())
    frozen.requires_grad_(False)
    before = frozen.detach().clone()
    eng = ksam.ESAM(model, sgd(model), seed=seed)
    for s in range(4):
        assert not eng.step(data(seed=s), ce).skipped
        assert not frozen.requires_grad
    assert torch.equal(frozen, before)
    assert any(not torch.equal(p, q) for p, q in zip(params(model)[1:], params(mlp())[1:]))
