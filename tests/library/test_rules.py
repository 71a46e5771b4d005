"""The rules of the engine, each on its own and inside a method: selection rules (exact
rows on constructed losses, warm-up, rescaling, labels, the ``select=`` keyword, the auto
band), perturbation rules, the schedule of sharp steps, and what the rules with state keep
across steps."""

from __future__ import annotations

import copy
import functools
import itertools
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_same, assert_tree_equal, ce, ctx, data, mlp, params, run, sgd
from torch import nn

import ksam
from ksam.params import ParameterSet
from ksam.schedule import Schedule
from ksam.selection import (
    AUTO_ESTIMATE_STEPS,
    RULES,
    AutoBand,
    AutoMarginBand,
    Selection,
    SelectionContext,
    StratifiedLoss,
    TopLoss,
    subset_gradient_scale,
)

NEW_RULES = ["stratified", "auto", "auto-margin"]
AUTO_START, AUTO_STOP = AUTO_ESTIMATE_STEPS  # the measuring window of select="auto"


# ------------------------------------------------------------------------- registry
def test_registry_names_and_defaults():
    assert list(RULES) == ["top", *NEW_RULES]
    assert RULES["top"] is TopLoss
    for name, factory in RULES.items():  # k is the only argument a rule needs
        rule = factory(8)
        assert isinstance(rule, TopLoss) and rule.size(32) == 8, name
    assert repr(StratifiedLoss(0.25, warmup=5)) == "StratifiedLoss(k=0.25, warmup=5)"


@pytest.mark.parametrize("cls,kw", [(AutoBand, {"max_skip": 1.0}),
                                    (AutoBand, {"max_skip": -0.1}),
                                    (AutoBand, {"margin": True}), (AutoBand, {"margin": "2"}),
                                    (AutoBand, {"decay": float("nan")})])
def test_bad_rule_options(cls, kw):
    with pytest.raises(ValueError, match=next(iter(kw))):
        cls(4, **kw)


# ------------------------------------------------------------- rows on constructed losses
SCORES = [0.1, 0.9, 0.5, 0.9, 0.3, 0.7, 0.2, 0.8, 0.05, 0.6]
# loss order (largest first, ties by the lower index): 1 3 7 5 9 2 4 6 0 8


def test_stratified_takes_evenly_spaced_ranks():
    # loss order 1 3 7 5 9 2 4 6 0 8
    # ranks 0 2 4 6 8
    assert StratifiedLoss(5).select(ctx(SCORES)).index.tolist() == [1, 7, 9, 4, 0]
    assert StratifiedLoss(3).select(ctx(SCORES)).index.tolist() == [1, 5, 4]  # ranks 0 3 6
    assert StratifiedLoss(1).select(ctx(SCORES)).index.tolist() == [1]  # the top example
    assert StratifiedLoss(10).select(ctx(SCORES)).index.tolist() == \
        [1, 3, 7, 5, 9, 2, 4, 6, 0, 8]


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


# ---------------------------------------------------------- warm-up of every rule
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


def test_rescale_uses_the_selected_rows():
    scores = torch.tensor(SCORES)
    rule = StratifiedLoss(3, rescale=True)
    selection = rule.select(ctx(SCORES))
    expect = ksam.selection.subset_gradient_scale(scores, selection.index)
    assert torch.equal(selection.scale, expect)
    assert torch.equal(rule.reduce(torch.tensor([1.0, 2.0, 3.0]), selection), 2.0 * expect)




# ------------------------------------------------------------------ TopLoss: one sort
def test_ksam_sorts_the_losses_once_per_step(monkeypatch):
    from ksam import selection

    calls = []
    real = selection.descending_order
    monkeypatch.setattr(selection, "descending_order",
                        lambda v: calls.append(v) or real(v))
    model = mlp()
    eng = ksam.create("ksam", model, sgd(model), k_ascent=12, k=5, k_warmup=0, select="top")
    x, y = data()
    result = eng.step((x, y), ce)
    assert len(calls) == 1
    with torch.no_grad():
        losses = F.cross_entropy(mlp()(x), y, reduction="none")
    order = torch.sort(losses, descending=True, stable=True).indices
    assert result.ascent_indices.tolist() == order[:12].tolist()
    assert result.descent_indices.tolist() == order[:5].tolist()


# ------------------------------------------------------------------ TopLoss warm-up
def test_warmup_halves_from_batch_to_k():
    rule = TopLoss(16, warmup=10)
    got = [rule.size_at(128, t) for t in (0, 9, 10, 19, 20, 29, 30, 39, 40, 10**9)]
    assert got == [128, 128, 64, 64, 32, 32, 16, 16, 16, 16]
    assert rule.size(128) == 16  # the static size is the final K


def test_warmup_rounds_up_for_odd_batches():
    rule = TopLoss(0.125, warmup=1)  # K = round(12.5) = 12 of 100
    assert [rule.size_at(100, t) for t in range(6)] == [100, 50, 25, 13, 12, 12]
    assert TopLoss(1, warmup=1).size_at(3, 10**6) == 1


def test_top_loss_rows_during_warmup():
    scores = torch.tensor([0.1, 0.9, 0.5, 0.9, 0.3, 0.7, 0.2, 0.8])
    rule = TopLoss(2, warmup=3)
    assert rule.select(ctx(scores, 0)).index.tolist() == [1, 3, 7, 5, 2, 4, 6, 0]
    assert rule.select(ctx(scores, 3)).index.tolist() == [1, 3, 7, 5]  # ties: lower index first
    assert rule.select(ctx(scores, 6)).index.tolist() == [1, 3]
    assert rule.select(ctx(scores, 100)).index.tolist() == [1, 3]


def test_top_loss_without_warmup_is_the_plain_top_k():
    scores = torch.rand(50, generator=torch.Generator().manual_seed(0))
    plain = TopLoss(0.25)
    for t in (0, 1, 7, 1000):
        assert plain.size_at(50, t) == plain.size(50) == 12
        assert torch.equal(plain.select(ctx(scores, t)).index,
                           torch.sort(scores, descending=True, stable=True).indices[:12])
    assert repr(plain) == "TopLoss(k=0.25)" and "warmup=5" in repr(TopLoss(3, warmup=5))


@pytest.mark.parametrize("bad", [-1, 1.5, True, "10"])
def test_warmup_is_validated(bad):
    with pytest.raises(ValueError, match="warmup"):
        TopLoss(4, warmup=bad)


# ------------------------------------------------------------------ TopLoss rescale
def test_subset_gradient_scale_exact():
    ln = torch.log
    scores = torch.stack([ln(torch.tensor(2.0)), torch.tensor(0.0), ln(torch.tensor(4.0)),
                          ln(torch.tensor(4.0))])  # 1 - p_y = 0.5, 0, 0.75, 0.75
    assert float(subset_gradient_scale(scores, torch.tensor([2, 3]))) == pytest.approx(2 / 3)
    assert float(subset_gradient_scale(scores, torch.arange(4))) == pytest.approx(1.0)
    # never above 1, even for a subset that is not the top
    assert float(subset_gradient_scale(scores, torch.tensor([1]))) == 1.0


def test_rescale_multiplies_the_reduced_loss():
    scores = torch.tensor([0.1, 2.0, 0.2, 3.0])
    rule = TopLoss(2, rescale=True)
    sel = rule.select(ctx(scores, 0))
    idx = sel.index
    assert idx.tolist() == [3, 1]
    losses = torch.tensor([1.0, 3.0])
    expect = 2.0 * float(subset_gradient_scale(scores, idx))
    assert float(rule.reduce(losses, sel)) == pytest.approx(expect)
    plain = TopLoss(2)
    assert float(plain.reduce(losses, plain.select(ctx(scores, 0)))) == 2.0


@pytest.mark.parametrize("power", [0.25, 0.5])
def test_rescale_power_is_the_scale_to_that_power(power):
    scores = torch.tensor([0.1, 2.0, 0.2, 3.0])
    rule = TopLoss(2, rescale=power)
    sel = rule.select(ctx(scores, 0))
    losses = torch.tensor([1.0, 3.0])
    full = float(subset_gradient_scale(scores, sel.index))
    assert 0 < full < 1
    assert float(rule.reduce(losses, sel)) == pytest.approx(2.0 * full ** power)
    assert repr(rule) == f"TopLoss(k=2, rescale={power})"


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), "yes"])
def test_rescale_out_of_range_is_refused(bad):
    with pytest.raises(ValueError, match="rescale must be"):
        TopLoss(2, rescale=bad)
    model = mlp()
    before = params(model)
    with pytest.raises(ValueError, match="rescale must be"):
        ksam.KSAM(model, torch.optim.SGD(model.parameters(), lr=0.1), rescale=bad)
    assert_same(params(model), before)


def test_rescale_none_is_the_default_for_the_loss_kind():
    """``rescale=None`` (K-SAM's default) turns the estimate on where the loss kind has one
    and off for ``loss_kind="other"``; a rule itself takes no None."""
    with pytest.raises(ValueError, match="rescale must be"):
        TopLoss(2, rescale=None)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    assert ksam.KSAM(model, opt, k=2, rescale=None).descent.rescale is True
    assert ksam.KSAM(model, opt, k=2).descent.rescale is True
    assert ksam.KSAM(model, opt, k=2, loss_kind="other").descent.rescale is False


def test_rescaled_step_is_the_plain_step_times_the_scale():
    """Plain SGD base (no momentum, no weight decay): the update is linear in the gradient."""
    a, b = mlp(), mlp()
    w0 = params(a)
    ea = ksam.KSAM(a, torch.optim.SGD(a.parameters(), lr=0.1), k=8, k_warmup=0, rescale=True)
    eb = ksam.KSAM(b, torch.optim.SGD(b.parameters(), lr=0.1), k=8, k_warmup=0, rescale=False)
    ra, rb = ea.step(data(seed=0), ce), eb.step(data(seed=0), ce)
    assert torch.equal(ra.descent_indices, rb.descent_indices)
    scale = float(subset_gradient_scale(ra.losses, ra.descent_indices))
    assert 0 < scale < 1
    for p, q, w in zip(a.parameters(), b.parameters(), w0):
        torch.testing.assert_close(p - w, scale * (q - w), atol=1e-6, rtol=1e-5)


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

    def step(**kw):
        torch.manual_seed(1)
        model = nn.Linear(6, 1)
        w0 = model.weight.detach().clone()
        eng = ksam.Method(
            model, torch.optim.SGD(model.parameters(), lr=0.1), ascent=None,
            perturbation=None, descent=TopLoss(4, **kw))
        res = eng.step((x, y), mse)
        return model.weight.detach() - w0, res

    plain, res = step()
    scaled, _ = step(rescale=True, loss_kind="mse")
    s = subset_gradient_scale(res.losses, res.descent_indices, "mse")
    torch.testing.assert_close(scaled, plain * s, rtol=1e-5, atol=1e-8)


def test_negative_losses_make_the_rescaled_step_skipped_not_hidden():
    scores = torch.tensor([-1.0, 2.0, 0.5, 3.0])
    assert math.isnan(float(subset_gradient_scale(scores, torch.tensor([3, 1]))))
    torch.manual_seed(0)
    model = nn.Linear(6, 4)
    before = params(model)
    eng = ksam.KSAM(model, torch.optim.SGD(model.parameters(), lr=0.1), k=2, k_warmup=0)
    res = eng.step(data(8), lambda m, b: ce(m, b) - 1.0)  # shifted: some losses < 0
    assert res.skipped and eng.skipped_steps == 1
    assert_same(params(model), before)


def test_loss_kind_other_turns_rescale_off():
    model = mlp()
    eng = ksam.KSAM(model, sgd(model), loss_kind="other")
    assert eng.descent.rescale is False and "loss_kind='other'" in repr(eng.descent)
    assert ksam.KSAM(model, sgd(model)).descent.rescale is True
    with pytest.raises(ValueError, match="rescale"):
        ksam.KSAM(model, sgd(model), loss_kind="other", rescale=True)
    with pytest.raises(ValueError, match="loss_kind"):
        ksam.KSAM(model, sgd(model), loss_kind="bce")


# ------------------------------------------------------- the rules inside the methods
@pytest.mark.parametrize("name", NEW_RULES)
def test_full_batch_equals_sam_and_sgd(name):
    a, b = mlp(), mlp()
    run("ksam", a, k=1.0, rho=0.05, select=name)
    run("sam", b, rho=0.05)
    assert_same(params(a), params(b), atol=1e-6)
    c, d = mlp(), mlp()
    run("osgd", c, k=1.0, select=name)
    run("sgd", d)
    assert_same(params(c), params(d), atol=1e-6)


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
    assert type(ksam.OrderedSGD(model, sgd(model)).descent) is TopLoss  # the paper's


def test_ksam_steps_on_the_rows_the_rule_selects():
    model = mlp()
    x, y = data()
    with torch.no_grad():
        losses = F.cross_entropy(mlp()(x), y, reduction="none")
    order = torch.sort(losses, descending=True, stable=True).indices
    sizes = []
    model.register_forward_hook(lambda m, inp, out: sizes.append(inp[0].shape[0]))
    eng = ksam.KSAM(model, sgd(model), k=8, k_ascent=4, k_warmup=0, select="stratified")
    res = eng.step((x, y), ce)
    assert sizes == [32, 4, 8]  # one scoring forward, no extra pass
    assert res.ascent_indices.tolist() == order[0::8].tolist()  # ranks 0, 8, 16, 24
    assert res.descent_indices.tolist() == order[0::4].tolist()  # ranks 0, 4, ..., 28


@pytest.mark.parametrize("batch", [
    lambda x, y: x,                       # no labels
    lambda x, y: (x, y.float()),          # not integers
    lambda x, y: (x, y[:, None]),         # not 1-D
    lambda x, y: {"x": x, "y": y},        # neither (inputs, labels) nor a "labels" entry
])
def test_a_rule_that_reads_labels_refuses_a_batch_without_them(batch):
    model = mlp()
    eng = ksam.KSAM(model, sgd(model), k=8, select="auto-margin")
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
        with pytest.raises(ValueError, match="unknown selection rule 'nope'.*top, stratified"):
            factory(model, sgd(model), select="nope")
    with pytest.raises(ValueError, match="unknown selection rule"):
        ksam.OrderedSGD(model, sgd(model), select=None)  # K-SAM's None is its default
    for retired in ("band", "median", "balanced"):  # said where they went
        with pytest.raises(ValueError, match=f"'{retired}' left the library in 0.2.0.*"
                                             "rule_variants.py registers it"):
            ksam.KSAM(model, sgd(model), select=retired)



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


# ------------------------------------------------------------- K-SAM's default rule
def test_ksam_uses_the_default_rule_where_a_chance_level_exists():
    """``ksam.KSAM(model, opt)`` - and ``create("ksam")``, the CLI's ``ksam`` - select with
    ``auto``; a loss without a chance level and remembered scores keep the paper's
    ``top``; ``ksam-plain`` is the paper's rule."""
    model = mlp()
    assert ksam.methods.DEFAULT_SELECT == "auto"
    for eng in (ksam.KSAM(model, sgd(model)), ksam.create("ksam", model, sgd(model))):
        assert type(eng.ascent) is type(eng.descent) is AutoBand
        assert eng.ascent._estimate is eng.descent._estimate  # one estimate for both passes
    for kw in ({"loss_kind": "other"}, {"loss_kind": "mse"},
               {"scores": "memory", "num_examples": 64}):
        assert type(ksam.KSAM(model, sgd(model), **kw).descent) is TopLoss, kw
    assert type(ksam.create("ksam-plain", model, sgd(model)).descent) is TopLoss


def test_auto_margin_counts_what_the_model_confidently_contradicts():
    """Row 0, labelled 1, rated 0.6 for class 0 and 0.4 for its label - the pair-noise
    case - is above chance (0.4 > 1/10) and confidently contradicted: only auto-margin
    counts it. Row 1, its label at chance and no class at 1/2, and row 2, clean and
    fitted, are counted by neither."""
    labels = [1, 1, 0]
    probs = torch.tensor([[0.6, 0.4] + [0.0] * 8,   # pair noise: label 1 at 0.4 > 1/10
                          [0.3, 0.1] + [0.075] * 8,  # label at chance, no confident class
                          [0.9, 0.1 / 9] + [0.1 / 9] * 8]).clamp_min(1e-6)
    c = SelectionContext(batch_size=3, device=torch.device("cpu"),
                         scores=-probs.log()[torch.arange(3), torch.tensor(labels)],
                         labels=torch.tensor(labels), logits=probs.log())
    assert AutoBand(1, classes=10).flagged(c).tolist() == [False, False, False]
    assert AutoMarginBand(1, classes=10).flagged(c).tolist() == [True, False, False]
    assert ksam.selection.confidently_contradicted(c).tolist() == [True, False, False]


def test_auto_margin_skips_the_pair_noise_auto_keeps():
    """Rows 0-2 clean and fitted, rows 3-5 labelled with their class's pair (the model
    says 0.6 for the true class, 0.4 for the label): after the window, ``auto`` skips
    nothing (no row is below chance) and trains on the top losses - the flipped rows -
    while ``auto-margin`` skips them."""
    labels = [0, 1, 2, 1, 2, 3]
    probs = torch.tensor([[0.9] + [0.1 / 9] * 9, [0.1 / 9, 0.9] + [0.1 / 9] * 8,
                          [0.05, 0.05, 0.9] + [0.0] * 7,
                          [0.6, 0.4] + [0.0] * 8, [0.0, 0.6, 0.4] + [0.0] * 7,
                          [0.0, 0.0, 0.6, 0.4] + [0.0] * 6]).clamp_min(1e-6)
    logits = probs.log()
    scores = -logits.log_softmax(1)[torch.arange(6), torch.tensor(labels)]

    def picks(cls):
        rule = cls(2, estimate_steps=(0, 1), margin=1.0)
        rows = []
        for t in range(3):
            c = SelectionContext(batch_size=6, device=torch.device("cpu"), scores=scores,
                                 step=t, labels=torch.tensor(labels), logits=logits)
            rows.append(applied(rule, c).index.tolist())
        return rows[-1]

    assert sorted(picks(AutoBand)) == [3, 4]  # the top losses: flipped rows
    assert set(picks(AutoMarginBand)) <= {0, 1, 2, 5}  # skip ceil(0.5 * 6) = 3 rows
    assert not set(picks(AutoMarginBand)) & {3, 4}


def test_auto_margin_without_logits_is_auto_and_says_so_once():
    """With a loss_fn that returns no logits ``auto-margin`` counts the rows below chance
    only: the steps equal ``auto``'s bit for bit, and one UserWarning says why."""
    import functools
    import warnings

    window = {"estimate_steps": (2, 4)}
    a, b = mlp(), mlp()
    ea = ksam.KSAM(a, sgd(a), k=8, k_warmup=1, seed=0,
                   select=functools.partial(AutoBand, **window))
    eb = ksam.KSAM(b, sgd(b), k=8, k_warmup=1, seed=0,
                   select=functools.partial(AutoMarginBand, **window))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for s in range(8):
            ra, rb = ea.step(data(seed=s), ce), eb.step(data(seed=s), ce)
            assert ra.descent_indices.tolist() == rb.descent_indices.tolist()
    assert sum("returns none" in str(w.message) for w in caught) == 1
    assert all(torch.equal(p, q) for p, q in zip(params(a), params(b)))


def test_the_default_rule_reads_the_labels_of_a_mapping_batch():
    """A Hugging Face style batch: the labels are its ``labels`` entry."""
    model = mlp()
    eng = ksam.KSAM(model, sgd(model), k=8)
    x, y = data()

    def loss_fn(m, b):
        logits = m(b["inputs"])
        return ksam.LossOutput(F.cross_entropy(logits, b["labels"], reduction="none"),
                               logits)

    result = eng.step({"inputs": x, "labels": y}, loss_fn)
    assert not result.skipped and result.descent_indices.numel() == 32  # the warm-up


def test_a_top_k_state_into_the_default_rule_says_how_to_load_it():
    """A K-SAM state of the paper's rule (the default before 0.2.0) is refused by a method
    with the default rule, with the select= that loads it; nothing changes."""
    model = mlp()
    old = ksam.KSAM(model, sgd(model), k=8, select="top")
    old.step(data(), ce)
    state = old.state_dict()
    new = ksam.KSAM(model, sgd(model), k=8)
    with pytest.raises(ValueError, match="build the method with select='top'"):
        new.load_state_dict(state)
    assert new.steps == 0
    again = ksam.KSAM(model, sgd(model), k=8, select="top")
    again.load_state_dict(state)
    assert again.steps == 1


def test_the_default_rule_refuses_a_batch_without_labels_and_changes_nothing():
    """A batch that is one tensor carries no labels to set the chance level: one clear
    error on the first step, weights and state untouched; ``select="top"`` trains on it."""
    model = mlp()
    before = [p.detach().clone() for p in model.parameters()]
    eng = ksam.KSAM(model, sgd(model), k=8)
    x, _ = data()
    with pytest.raises(ValueError, match="reads class labels"):
        eng.step(x, lambda m, b: m(b).logsumexp(1))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert eng.steps == 0 and not eng.optimizer.state
    top = ksam.KSAM(model, sgd(model), k=8, select="top")
    assert not top.step(x, lambda m, b: m(b).logsumexp(1)).skipped


def applied(rule, context):
    """``rule.select(context)`` on a step that is applied: its staged update committed."""
    selection = rule.select(context)
    rule.commit(True, True)
    return selection


def test_auto_band_phases_and_rows():
    rule = AutoBand(2, estimate_steps=(1, 3))
    assert [rule.graph_key(t) for t in (0, 1, 2, 3, 10**6)] == \
        ["stratified", "measure", "measure", "band", "band"]
    picks = [applied(rule, ctx(AUTO_SCORES, t, AUTO_LABELS)).index.tolist() for t in range(3)]
    assert picks == [[1, 4]] * 3  # ranks 0 and 4: evenly spaced, as "stratified"
    assert rule.estimate() is None
    # Window mean 3/8; skip = ceil(1.25 * 3/8 * 8) = 4 = max_skip * B: ranks 4, 5.
    assert applied(rule, ctx(AUTO_SCORES, 3, AUTO_LABELS)).index.tolist() == [4, 2]
    assert rule.estimate() == 0.375


def test_auto_band_estimate_falls_and_never_rises():
    rule = AutoBand(1, estimate_steps=(0, 1), max_skip=0.9)
    applied(rule, ctx(AUTO_SCORES, 0, AUTO_LABELS))  # window: 3/8
    applied(rule, ctx(AUTO_SCORES, 1, AUTO_LABELS))
    assert rule.estimate() == 0.375
    high = [9.0] * 8  # every row below chance: the running mean rises, the estimate not
    for t in range(2, 6):
        applied(rule, ctx(high, t, AUTO_LABELS))
    assert rule.estimate() == 0.375
    low = [0.0] * 8
    mean = 0.375
    for _ in range(4):
        mean = 0.95 * mean + 0.05 * 1.0
    for t in range(6, 30):
        index = applied(rule, ctx(low, t, AUTO_LABELS)).index
        mean = 0.95 * mean
        expect = min(mean, 0.375)
        assert rule.estimate() == pytest.approx(expect, rel=1e-5)
        skip = min(math.ceil(1.25 * expect * 8 - 1e-6), round(0.9 * 8), 7)
        assert index.tolist() == [skip]  # equal losses: the loss order is 0..7


def test_auto_band_classes_option_needs_no_labels():
    rule = AutoBand(2, estimate_steps=(0, 1), classes=4)
    assert not rule.needs_labels and AutoBand(2).needs_labels
    applied(rule, ctx(AUTO_SCORES, 0))
    assert applied(rule, ctx(AUTO_SCORES, 1)).index.tolist() == [4, 2]
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
        applied(a, ctx(batches[t], t, AUTO_LABELS))
    b.load_state_dict(a.state_dict())
    for t in range(5, 12):
        assert torch.equal(applied(a, ctx(batches[t], t, AUTO_LABELS)).index,
                           applied(b, ctx(batches[t], t, AUTO_LABELS)).index)
    assert torch.equal(a.state_dict()["estimate"], b.state_dict()["estimate"])
    with pytest.raises(ValueError, match="not a state"):
        b.load_state_dict({"estimate": torch.zeros(3)})



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


def test_the_cli_measures_auto_over_a_fraction_of_the_run():
    from ksam.lab.train import TrainConfig, build_engine
    from ksam.selection import AUTO_ESTIMATE_FRACTION, auto_window, rule_options

    assert auto_window(AUTO_ESTIMATE_FRACTION, 960) == (96, 192)
    assert auto_window(0.25, 1000) == (250, 500) and auto_window(0.5, 3) == (2, 3)
    assert auto_window(0.01, 10) == (0, 1)  # at least one step
    for bad in (0, 0.6, -0.1, True, "0.1", float("nan")):
        with pytest.raises(ValueError, match="estimate must be a fraction"):
            auto_window(bad, 100)
    for plain in ({"select": "stratified", "k": 8}, {}, {"select": "auto"}):
        assert rule_options(plain, 100) == plain
    with pytest.raises(ValueError, match="estimate is an option of select='auto' and "
                                         "'auto-margin', not of select='top'"):
        rule_options({"estimate": 0.2}, 100)
    model = mlp()
    # K-SAM's default rule measures over the fraction too (the CLI's ksam:estimate=0.2).
    cfg = TrainConfig(method="ksam", method_options={"estimate": 0.2, "k": 8}, lr=0.1,
                      momentum=0.9, weight_decay=0.0)
    engine, _ = build_engine("ksam", model, cfg, steps_total=1000)
    assert type(engine.descent) is AutoBand
    assert (engine.descent.estimate_from, engine.descent.estimate_until) == (200, 400)
    for method in ("ksam", "osgd"):
        cfg = TrainConfig(method=method, method_options={"select": "auto", "estimate": 0.2,
                                                         "k": 8}, lr=0.1, momentum=0.9,
                          weight_decay=0.0)
        engine, _ = build_engine(method, model, cfg, steps_total=1000)
        for rule in (engine.descent, engine.ascent) if method == "ksam" else (engine.descent,):
            assert type(rule) is AutoBand
            assert (rule.estimate_from, rule.estimate_until) == (200, 400)
        cfg = replace(cfg, method_options={"select": "auto", "k": 8})
        engine, _ = build_engine(method, model, cfg, steps_total=500)
        assert (engine.descent.estimate_from, engine.descent.estimate_until) == \
            AUTO_ESTIMATE_STEPS



# ------------------------------------------------------------------ perturbation rules
def _space(tensors):
    """A parameter set over ``tensors`` (a rule takes its norms from it)."""
    holder = nn.ParameterList([nn.Parameter(t.clone()) for t in tensors])
    return ParameterSet(holder, torch.optim.SGD(holder.parameters(), lr=0.1))


def test_asam_perturbation_formula():
    torch.manual_seed(0)
    p = [torch.randn(5), torch.randn(3, 2)]
    g = [torch.randn(5), torch.randn(3, 2)]
    rho, eta = 0.5, 0.01
    t = [pi.abs() + eta for pi in p]
    norm = torch.sqrt(sum(((ti * gi) ** 2).sum() for ti, gi in zip(t, g)))
    expect = [pi + rho * ti**2 * gi / norm for pi, ti, gi in zip(p, t, g)]
    pp, gg = [x.clone() for x in p], [x.clone() for x in g]
    ksam.perturbation.AdaptivePerturbation(rho, eta).perturb_(pp, gg, _space(p))
    assert_same(pp, expect, atol=1e-6)


def test_asam_reuses_its_buffers():
    rule = ksam.perturbation.AdaptivePerturbation(0.5, 0.01)
    weights = [torch.randn(3, 4), torch.randn(5)]
    space = _space(weights)
    rule.perturb_([p.clone() for p in weights], [torch.randn_like(p) for p in weights], space)
    first = [b.data_ptr() for b in rule._scratch]
    out = [p.clone() for p in weights]
    grads = [torch.randn_like(p) for p in weights]
    expect_grads = [g * (p.abs() + 0.01) for g, p in zip(grads, weights)]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g)
                                                 for g in expect_grads]))
    rule.perturb_(out, grads, space)
    assert [b.data_ptr() for b in rule._scratch] == first
    for p, o, g in zip(weights, out, expect_grads):
        torch.testing.assert_close(o, p + g * (p.abs() + 0.01) * 0.5 / (norm + 1e-12))


def test_non_finite_rule_options_are_refused():
    with pytest.raises(ValueError, match="finite"):
        ksam.perturbation.GradientNormPerturbation(math.inf)
    with pytest.raises(ValueError, match="finite"):
        ksam.perturbation.AdaptivePerturbation(0.5, math.nan)


# --------------------------------------------------------------------------- schedule
def test_schedule_marks_sharp_steps():
    sched = Schedule(start_step=2, interval=2)
    assert [sched.is_sharp(t, None) for t in range(7)] == [False, False, True, False, True,
                                                           False, True]


# ---------------------------------------------------------- what the rules keep
# State changes only by the steps that are applied: a skipped (non-finite) step leaves it as
# it was; K-SAM's ascent and descent rules keep one estimate between them.
def test_selection_rules_hold_no_state_between_select_and_reduce():
    scores = torch.tensor([0.1, 2.0, 0.2, 3.0])
    rule = TopLoss(2, rescale=True)
    before = dict(vars(rule))
    sel = rule.select(ctx(scores))
    assert isinstance(sel, Selection) and vars(rule) == before
    assert torch.equal(sel.scale, subset_gradient_scale(scores, sel.index))
    # a selection of another batch reduces with its own scale, whatever ran in between
    other = rule.select(SelectionContext(batch_size=4, device=torch.device("cpu"),
                                         scores=torch.tensor([3.0, 3.0, 3.0, 3.0])))
    losses = torch.tensor([1.0, 3.0])
    assert float(rule.reduce(losses, sel)) == pytest.approx(2.0 * float(sel.scale))
    assert float(rule.reduce(losses, other)) == pytest.approx(2.0)


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


class NaNOnCall:
    """``ce``, but NaN losses and gradients from forward ``call`` of the step on (0: every
    pass)."""

    def __init__(self, call: int = 0) -> None:
        self.call, self.calls = call, 0

    def __call__(self, model, batch):
        self.calls += 1
        losses = ce(model, batch)
        return losses * float("nan") if self.calls > self.call else losses


def _auto_state(eng):
    """The engine's state but its step counts, and the rules' estimates."""
    saved = copy.deepcopy(eng.state_dict())
    for key in ("steps", "skipped_steps", "sharp_steps", "schedule"):
        saved.pop(key, None)
    return saved, eng.ascent.estimate(), eng.descent.estimate()


@pytest.mark.parametrize("fast_path", [False, True])
@pytest.mark.parametrize("poison", ["every pass", "descent pass"])
@pytest.mark.parametrize("at", [(AUTO_START + AUTO_STOP) // 2, AUTO_STOP + 5],
                         ids=["measuring", "band"])
def test_skipped_step_leaves_the_auto_estimate_unchanged(at, poison, fast_path):
    model = mlp()
    opt = sgd(model)
    eng = ksam.KSAM(model, opt, k=8, k_warmup=0, select="auto", seed=0, fast_path=fast_path)
    assert isinstance(eng.descent, AutoBand)
    for t in range(at):
        assert not eng.step(data(seed=t), ce).skipped
    if at > AUTO_STOP:
        assert eng.descent.estimate() is not None
    before = _auto_state(eng)
    # K-SAM's sharp step: scoring forward, ascent pass, descent pass (the third forward)
    assert eng.step(data(seed=at), NaNOnCall(0 if poison == "every pass" else 2)).skipped
    assert eng.skipped_steps == 1
    after = _auto_state(eng)
    assert_tree_equal(after[0], before[0])
    assert after[1:] == before[1:]


def test_ksam_ascent_and_descent_keep_one_auto_estimate():
    """With a schedule the ascent rule selects on the sharp steps only; the estimate of the
    share below chance is one quantity all the same."""
    model = mlp()
    eng = ksam.KSAM(model, sgd(model), k=8, k_ascent=4, k_warmup=0, select="auto", p=0.5,
                    seed=0)
    for t in range(AUTO_STOP + 20):
        eng.step(data(seed=t), ce)
    assert 0 < eng.sharp_steps < AUTO_STOP + 20
    assert eng.descent.estimate() is not None
    assert eng.ascent.estimate() == eng.descent.estimate()


class _NaNEverywhere:
    """``ce``, but NaN losses and gradients on every pass."""

    def __call__(self, model, batch):
        return ce(model, batch) * float("nan")


@pytest.mark.parametrize("fast_path", [False, True])
def test_skipped_sharp_step_is_not_counted_as_sharp(fast_path):
    """The schedule's count, like every rule's state, changes only on applied steps."""
    model = mlp()
    eng = ksam.SAM(model, sgd(model), fast_path=fast_path)
    assert not eng.step(data(seed=0), ce).skipped
    assert eng.sharp_steps == 1
    assert eng.step(data(seed=1), _NaNEverywhere()).skipped
    assert eng.sharp_steps == 1 and eng.state_dict()["sharp_steps"] == 1
    assert not eng.step(data(seed=2), ce).skipped
    assert eng.sharp_steps == 2 and eng.steps == 3
