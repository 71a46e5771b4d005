"""The selection rules of ``ksam.selection.RULES`` (issue 15: selection under label noise):
exact rows on constructed losses, the warm-up schedule, full-batch equivalences, the
``select=`` keyword of K-SAM and Ordered SGD, labels for the class-balanced rule, and the
label-noise options of the tasks."""

from __future__ import annotations

import functools
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ksam
from ksam.compare import parse_method_spec
from ksam.selection import (
    RULES,
    AutoBand,
    ClassBalancedTopLoss,
    LossBand,
    MedianBand,
    SelectionContext,
    StratifiedLoss,
    TopLoss,
    class_round_robin,
)
from ksam.tasks import get_task

NEW_RULES = ["band", "median", "stratified", "balanced", "auto"]


def ce(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y, reduction="none")


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 4))


def data(n: int = 32, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g), torch.randint(0, 4, (n,), generator=g)


def sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def ctx(scores, step=0, labels=None):
    return SelectionContext(batch_size=len(scores), device=torch.device("cpu"),
                            scores=torch.as_tensor(scores, dtype=torch.float32), step=step,
                            labels=None if labels is None else torch.as_tensor(labels))


def params(model):
    return [p.detach().clone() for p in model.parameters()]


# ------------------------------------------------------------------------- registry
def test_registry_names_and_defaults():
    assert list(RULES) == ["top", *NEW_RULES]
    assert RULES["top"] is TopLoss
    for name, factory in RULES.items():  # k is the only argument a rule needs
        rule = factory(8)
        assert isinstance(rule, TopLoss) and rule.size(32) == 8, name
    assert LossBand(4).skip == ksam.selection.BAND_SKIP == 0.3
    assert repr(LossBand(4, skip=0.3)) == "LossBand(k=4, skip=0.3)"
    assert repr(MedianBand(0.25, warmup=5)) == "MedianBand(k=0.25, warmup=5)"


@pytest.mark.parametrize("cls,kw", [(LossBand, {"skip": 1.0}), (LossBand, {"skip": -0.1}),
                                    (LossBand, {"skip": True}), (LossBand, {"skip": "0.2"}),
                                    (LossBand, {"skip": float("nan")})])
def test_bad_rule_options(cls, kw):
    with pytest.raises(ValueError, match=next(iter(kw))):
        cls(4, **kw)


# ------------------------------------------------------------- rows on constructed losses
SCORES = [0.1, 0.9, 0.5, 0.9, 0.3, 0.7, 0.2, 0.8, 0.05, 0.6]
# loss order (largest first, ties by the lower index): 1 3 7 5 9 2 4 6 0 8


def test_band_skips_the_top_then_takes_the_next_k():
    assert LossBand(3, skip=0.2).select(ctx(SCORES)).index.tolist() == [7, 5, 9]
    assert LossBand(3, skip=0.0).select(ctx(SCORES)).index.tolist() == [1, 3, 7]  # = top-K
    assert LossBand(2, skip=0.35).select(ctx(SCORES)).index.tolist() == [9, 2]  # round(3.5) = 4
    # The skip is capped at B - K: the band never runs past the batch.
    assert LossBand(4, skip=0.9).select(ctx(SCORES)).index.tolist() == [4, 6, 0, 8]
    assert LossBand(0.5, skip=0.4).select(ctx(SCORES)).index.tolist() == [9, 2, 4, 6, 0]


def test_median_band_is_centred():
    assert MedianBand(2).select(ctx(SCORES)).index.tolist() == [9, 2]  # rows 4, 5 of 10
    assert MedianBand(3).select(ctx(SCORES)).index.tolist() == [5, 9, 2]  # (10 - 3) // 2 = 3
    assert MedianBand(10).select(ctx(SCORES)).index.tolist() == [1, 3, 7, 5, 9, 2, 4, 6, 0, 8]


def test_stratified_takes_evenly_spaced_ranks():
    # loss order 1 3 7 5 9 2 4 6 0 8
    # ranks 0 2 4 6 8
    assert StratifiedLoss(5).select(ctx(SCORES)).index.tolist() == [1, 7, 9, 4, 0]
    assert StratifiedLoss(3).select(ctx(SCORES)).index.tolist() == [1, 5, 4]  # ranks 0 3 6
    assert StratifiedLoss(1).select(ctx(SCORES)).index.tolist() == [1]  # the top example
    assert StratifiedLoss(10).select(ctx(SCORES)).index.tolist() == \
        [1, 3, 7, 5, 9, 2, 4, 6, 0, 8]


def test_class_balanced_takes_classes_in_turn():
    labels = [0, 1, 1, 1, 2, 1, 0, 1, 2, 2]
    # loss order 1 3 7 5 9 2 4 6 0 8 -> labels 1 1 1 1 2 1 2 0 0 2
    # round 1: class 1 (row 1), class 2 (row 9), class 0 (row 6); round 2: 3, 4, 0; ...
    rule = ClassBalancedTopLoss(5)
    assert rule.select(ctx(SCORES, labels=labels)).index.tolist() == [1, 9, 6, 3, 4]
    assert ClassBalancedTopLoss(10).select(ctx(SCORES, labels=labels)).index.tolist() == \
        [1, 9, 6, 3, 4, 0, 7, 8, 5, 2]
    # One class only: the plain top-K.
    one_class = ClassBalancedTopLoss(3).select(ctx(SCORES, labels=[7] * 10))
    assert one_class.index.tolist() == [1, 3, 7]


def test_class_round_robin_matches_a_reference():
    g = torch.Generator().manual_seed(1)
    for n, c in [(1, 1), (5, 2), (32, 4), (64, 10)]:
        scores = torch.randint(0, 6, (n,), generator=g).float()  # many ties
        labels = torch.randint(0, c, (n,), generator=g)
        order = torch.sort(scores, descending=True, stable=True).indices
        per_class: dict[int, list[int]] = {}
        for i in order.tolist():
            per_class.setdefault(int(labels[i]), []).append(i)
        rank = {i: r for rows in per_class.values() for r, i in enumerate(rows)}
        position = {i: p for p, i in enumerate(order.tolist())}
        expect = sorted(range(n), key=lambda i: (rank[i], position[i]))
        assert class_round_robin(order, labels).tolist() == expect


def test_class_balanced_needs_labels_in_the_context():
    with pytest.raises(ValueError, match="labels"):
        ClassBalancedTopLoss(3).select(ctx(SCORES))


@pytest.mark.parametrize("name", NEW_RULES)
def test_rules_share_one_sort_per_step(name, monkeypatch):
    from ksam import selection

    calls = []
    real = selection.descending_order
    monkeypatch.setattr(selection, "descending_order", lambda v: calls.append(v) or real(v))
    model = mlp()
    eng = ksam.KSAM(model, sgd(model), k_ascent=12, k=5, k_warmup=0, select=name)
    eng.step(data(), ce)
    assert len(calls) == 1


# ------------------------------------------------------------------------ warm-up
@pytest.mark.parametrize("name", NEW_RULES)
def test_warmup_sizes_match_top_loss(name):
    rule, top = RULES[name](16, warmup=10), TopLoss(16, warmup=10)
    steps = (0, 9, 10, 19, 20, 29, 30, 39, 40, 10**9)
    assert [rule.size_at(128, t) for t in steps] == [top.size_at(128, t) for t in steps] \
        == [128, 128, 64, 64, 32, 32, 16, 16, 16, 16]
    assert rule.size(128) == 16


@pytest.mark.parametrize("name", NEW_RULES)
def test_warmup_starts_at_the_whole_batch(name):
    labels = [0, 1, 1, 1, 2, 1, 0, 1, 2, 2]
    rule = RULES[name](2, warmup=3)
    sizes = [len(rule.select(ctx(SCORES, t, labels)).index) for t in (0, 2, 3, 6, 9, 100)]
    assert sizes == [10, 10, 5, 3, 2, 2]
    assert sorted(rule.select(ctx(SCORES, 0, labels)).index.tolist()) == list(range(10))


def test_band_rows_during_warmup():
    rule = LossBand(2, skip=0.2, warmup=3)
    assert rule.select(ctx(SCORES, 0)).index.tolist() == [1, 3, 7, 5, 9, 2, 4, 6, 0, 8]
    assert rule.select(ctx(SCORES, 3)).index.tolist() == [7, 5, 9, 2, 4]  # skip 2 of 10
    assert rule.select(ctx(SCORES, 9)).index.tolist() == [7, 5]


def test_rescale_uses_the_selected_rows():
    scores = torch.tensor(SCORES)
    rule = LossBand(3, skip=0.2, rescale=True)
    selection = rule.select(ctx(SCORES))
    expect = ksam.selection.subset_gradient_scale(scores, selection.index)
    assert torch.equal(selection.scale, expect)
    assert torch.equal(rule.reduce(torch.tensor([1.0, 2.0, 3.0]), selection), 2.0 * expect)


# ------------------------------------------------------------------- equivalences
def run(method, model, steps=3, **kw):
    eng = ksam.create(method, model, sgd(model), seed=0, **kw)
    return eng, [eng.step(data(seed=s), ce) for s in range(steps)]


def allclose(a, b):
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", NEW_RULES)
def test_full_batch_equals_sam_and_sgd(name):
    a, b = mlp(), mlp()
    run("ksam", a, k=1.0, rho=0.05, select=name)
    run("sam", b, rho=0.05)
    allclose(params(a), params(b))
    c, d = mlp(), mlp()
    run("osgd", c, k=1.0, select=name)
    run("sgd", d)
    allclose(params(c), params(d))


@pytest.mark.parametrize("name", ["top", *NEW_RULES])
def test_ksam_and_osgd_use_the_rule_on_both_passes(name):
    model = mlp()
    eng = ksam.KSAM(model, sgd(model), k=8, k_ascent=4, select=name)
    assert type(eng.ascent) is type(eng.descent) is RULES[name]
    assert eng.ascent.k == 4 and eng.descent.k == 8
    assert eng.ascent.warmup == 0 and not eng.ascent.rescale
    assert eng.descent.warmup == ksam.methods.K_WARMUP and eng.descent.rescale is True
    osgd = ksam.OrderedSGD(model, sgd(model), k=8, k_warmup=3, select=name)
    assert type(osgd.descent) is RULES[name] and osgd.descent.warmup == 3
    assert type(ksam.KSAM(model, sgd(model)).descent) is TopLoss  # default "top"
    assert type(ksam.OrderedSGD(model, sgd(model)).descent) is TopLoss


def test_ksam_steps_on_the_rows_the_rule_selects():
    model = mlp()
    x, y = data()
    with torch.no_grad():
        losses = F.cross_entropy(mlp()(x), y, reduction="none")
    order = torch.sort(losses, descending=True, stable=True).indices
    sizes = []
    model.register_forward_hook(lambda m, inp, out: sizes.append(inp[0].shape[0]))
    eng = ksam.KSAM(model, sgd(model), k=8, k_ascent=4, k_warmup=0, select="band")
    res = eng.step((x, y), ce)
    assert sizes == [32, 4, 8]  # one scoring forward, no extra pass
    assert res.ascent_indices.tolist() == order[10:14].tolist()  # skip round(0.3 * 32) = 10
    assert res.descent_indices.tolist() == order[10:18].tolist()


def test_class_balanced_reads_the_batch_labels():
    model = mlp()
    x, y = data()
    with torch.no_grad():
        losses = F.cross_entropy(mlp()(x), y, reduction="none")
    order = torch.sort(losses, descending=True, stable=True).indices
    eng = ksam.OrderedSGD(model, sgd(model), k=8, select="balanced")
    res = eng.step((x, y), ce)
    assert res.descent_indices.tolist() == class_round_robin(order, y)[:8].tolist()
    assert torch.bincount(y[res.descent_indices], minlength=4).tolist() == [2, 2, 2, 2]


@pytest.mark.parametrize("batch", [
    lambda x, y: x,                       # no labels
    lambda x, y: (x, y.float()),          # not integers
    lambda x, y: (x, y[:, None]),         # not 1-D
    lambda x, y: {"x": x, "y": y},        # not (inputs, labels)
])
def test_class_balanced_without_labels_fails_before_any_change(batch):
    model = mlp()
    eng = ksam.KSAM(model, sgd(model), k=8, select="balanced")
    before = params(model)
    x, y = data()

    def loss_fn(m, b):
        return F.cross_entropy(m(b["x"] if isinstance(b, dict) else b[0]
                                 if isinstance(b, tuple) else b), y, reduction="none")

    with pytest.raises(ValueError, match="labels"):
        eng.step(batch(x, y), loss_fn)
    assert all(torch.equal(a, b) for a, b in zip(before, params(model)))
    assert eng.steps == 0 and all(p.grad is None for p in model.parameters())


def test_unknown_rule_fails_at_construction():
    model = mlp()
    for factory in (ksam.KSAM, ksam.OrderedSGD):
        with pytest.raises(ValueError, match="unknown selection rule 'nope'.*top, band"):
            factory(model, sgd(model), select="nope")
        with pytest.raises(ValueError, match="unknown selection rule"):
            factory(model, sgd(model), select=None)


@pytest.mark.parametrize("name", NEW_RULES)
def test_same_seed_same_run_and_fast_path_equals_eager(name):
    a, b, c = mlp(), mlp(), mlp()
    run("ksam", a, steps=4, k=8, k_warmup=1, select=name)
    run("ksam", b, steps=4, k=8, k_warmup=1, select=name)
    eng, _ = run("ksam", c, steps=4, k=8, k_warmup=1, select=name, fast_path=True)
    assert eng.executor.reason is None
    assert all(torch.equal(p, q) for p, q in zip(params(a), params(b)))
    allclose(params(a), params(c))


def test_cli_spec_takes_select():
    assert parse_method_spec("ksam:k=16,select=band") == ("ksam", {"k": 16, "select": "band"})
    assert parse_method_spec("osgd:select=median") == ("osgd", {"select": "median"})
    with pytest.raises(ValueError, match="takes no option 'select'"):
        parse_method_spec("ksam-plain:select=band")


# ------------------------------------------------------------------- label noise
def test_pair_noise_flips_to_the_next_class():
    clean = get_task("mnist1d", num_samples=500)
    task = get_task("mnist1d", num_samples=500, label_noise=0.3, label_noise_type="pair",
                    seed=2)
    changed = task.train_y != clean.train_y
    assert int(changed.sum()) == 120 and torch.equal(task.noisy_mask, changed)
    assert torch.equal(task.train_y[changed], (clean.train_y[changed] + 1) % 10)
    # The same examples as symmetric noise with the same seed; only the new label differs.
    sym = get_task("mnist1d", num_samples=500, label_noise=0.3, seed=2)
    assert torch.equal(sym.noisy_mask, task.noisy_mask)
    with pytest.raises(ValueError, match="label_noise_type"):
        get_task("mnist1d", num_samples=500, label_noise=0.3, label_noise_type="flip")


def test_noisy_validation_labels():
    kw = dict(num_samples=500, validation_split=0.2, seed=1)
    clean = get_task("mnist1d", **kw)
    quiet = get_task("mnist1d", label_noise=0.25, **kw)
    noisy = get_task("mnist1d", label_noise=0.25, noisy_validation=True, **kw)
    assert torch.equal(quiet.test_y, clean.test_y)  # default: held-out labels stay clean
    assert torch.equal(noisy.test_x, clean.test_x) and torch.equal(noisy.train_y, quiet.train_y)
    changed = noisy.test_y != clean.test_y
    assert int(changed.sum()) == round(0.25 * clean.num_test) == 20
    pair = get_task("mnist1d", label_noise=0.25, label_noise_type="pair",
                    noisy_validation=True, **kw)
    flipped = pair.test_y != clean.test_y
    assert torch.equal(pair.test_y[flipped], (clean.test_y[flipped] + 1) % 10)
    # Without a held-out split the real test set is never noisy.
    test = get_task("mnist1d", num_samples=500, label_noise=0.25, noisy_validation=True)
    assert torch.equal(test.test_y, get_task("mnist1d", num_samples=500).test_y)
    with pytest.raises(ValueError, match="noisy_validation"):
        get_task("mnist1d", num_samples=500, noisy_validation="yes")


def test_rows_are_distinct_and_inside_the_batch():
    # Whatever the losses (many ties here), every rule returns size() distinct rows.
    g = torch.Generator().manual_seed(3)
    for name, n, k in itertools.product(RULES, (7, 32), (1, 3, 0.5)):
        scores = torch.randint(0, 4, (n,), generator=g).float()
        labels = torch.randint(0, 3, (n,), generator=g)
        idx = RULES[name](k).select(ctx(scores, labels=labels)).index.tolist()
        assert len(idx) == len(set(idx)) == RULES[name](k).size(n)
        assert all(0 <= i < n for i in idx)


# ------------------------------------------------------------------- auto band
# Losses of 8 rows, 4 classes (chance loss ln 4 = 1.386): rows 1, 3, 6 are above it.
AUTO_SCORES = [0.1, 5.0, 0.2, 3.0, 0.3, 0.4, 2.0, 0.05]
AUTO_LABELS = [0, 1, 2, 3, 0, 1, 2, 3]
# loss order: 1 3 6 5 4 2 0 7


def test_auto_band_phases_and_rows():
    rule = AutoBand(2, estimate_steps=(1, 3))
    assert [rule.graph_key(t) for t in (0, 1, 2, 3, 10**6)] == \
        ["stratified", "measure", "measure", "band", "band"]
    picks = [rule.select(ctx(AUTO_SCORES, t, AUTO_LABELS)).index.tolist() for t in range(3)]
    assert picks == [[1, 4]] * 3  # ranks 0 and 4: evenly spaced, as "stratified"
    assert rule.estimate() is None
    # Window mean 3/8; skip = ceil(1.25 * 3/8 * 8) = 4 = max_skip * B: ranks 4, 5.
    assert rule.select(ctx(AUTO_SCORES, 3, AUTO_LABELS)).index.tolist() == [4, 2]
    assert rule.estimate() == 0.375


def test_auto_band_estimate_falls_and_never_rises():
    rule = AutoBand(1, estimate_steps=(0, 1), max_skip=0.9)
    rule.select(ctx(AUTO_SCORES, 0, AUTO_LABELS))  # window: 3/8
    rule.select(ctx(AUTO_SCORES, 1, AUTO_LABELS))
    assert rule.estimate() == 0.375
    high = [9.0] * 8  # every row below chance: the running mean rises, the estimate not
    for t in range(2, 6):
        rule.select(ctx(high, t, AUTO_LABELS))
    assert rule.estimate() == 0.375
    low = [0.0] * 8
    mean = 0.375
    for _ in range(4):
        mean = 0.95 * mean + 0.05 * 1.0
    for t in range(6, 30):
        index = rule.select(ctx(low, t, AUTO_LABELS)).index
        mean = 0.95 * mean
        expect = min(mean, 0.375)
        assert rule.estimate() == pytest.approx(expect, rel=1e-5)
        skip = min(math.ceil(1.25 * expect * 8 - 1e-6), round(0.9 * 8), 7)
        assert index.tolist() == [skip]  # equal losses: the loss order is 0..7


def test_auto_band_classes_option_needs_no_labels():
    rule = AutoBand(2, estimate_steps=(0, 1), classes=4)
    assert not rule.needs_labels and AutoBand(2).needs_labels
    rule.select(ctx(AUTO_SCORES, 0))
    assert rule.select(ctx(AUTO_SCORES, 1)).index.tolist() == [4, 2]
    with pytest.raises(ValueError, match="labels"):
        AutoBand(2, estimate_steps=(0, 1)).select(ctx(AUTO_SCORES, 0))


@pytest.mark.parametrize("kw", [{"margin": 0}, {"margin": float("nan")}, {"margin": True},
                                {"estimate_steps": (3, 3)}, {"estimate_steps": (-1, 2)},
                                {"estimate_steps": (1.0, 2)}, {"estimate_steps": 5},
                                {"decay": 1.5}, {"decay": -0.1}, {"max_skip": -0.1}, {"classes": 1},
                                {"classes": 2.5}, {"loss_kind": "mse"}])
def test_auto_band_bad_options(kw):
    with pytest.raises(ValueError):
        AutoBand(4, **kw)


def test_auto_band_state_dict_round_trip():
    a, b = AutoBand(2, estimate_steps=(0, 2)), AutoBand(2, estimate_steps=(0, 2))
    assert a.state_dict() == {}
    g = torch.Generator().manual_seed(0)
    batches = [torch.rand(8, generator=g) * 3 for _ in range(12)]
    for t in range(5):
        a.select(ctx(batches[t], t, AUTO_LABELS))
    b.load_state_dict(a.state_dict())
    for t in range(5, 12):
        assert torch.equal(a.select(ctx(batches[t], t, AUTO_LABELS)).index,
                           b.select(ctx(batches[t], t, AUTO_LABELS)).index)
    assert torch.equal(a.state_dict()["estimate"], b.state_dict()["estimate"])
    with pytest.raises(ValueError, match="not a state"):
        b.load_state_dict({"estimate": torch.zeros(3)})


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
    assert eb.executor.reason is None
    allclose(params(a), params(b))
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
    assert all(torch.equal(p, q) for p, q in zip(params(a), params(d)))


def test_select_takes_a_rule_factory_for_a_rules_own_options():
    model = mlp()
    factory = functools.partial(AutoBand, estimate_steps=(5, 9), margin=1.5)
    for eng in (ksam.KSAM(model, sgd(model), k=8, select=factory),
                ksam.OrderedSGD(model, sgd(model), k=8, k_warmup=2, select=factory)):
        assert type(eng.descent) is AutoBand and eng.descent.margin == 1.5
        assert (eng.descent.estimate_from, eng.descent.estimate_until) == (5, 9)
    assert ksam.KSAM(model, sgd(model), k=8, select=factory).descent.warmup == \
        ksam.methods.K_WARMUP
    with pytest.raises(ValueError, match="not a selection rule"):
        ksam.KSAM(model, sgd(model), select=lambda k, name, **kw: ksam.selection.WholeBatch())
