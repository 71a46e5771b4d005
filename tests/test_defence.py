"""K-SAM's collapse guards: the descent subset's warm-up schedule (TopLoss ``warmup``) and
the descent step's rescaling to a full-batch step's size (TopLoss ``rescale``)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ksam
from ksam.compare import parse_method_spec
from ksam.methods import K_WARMUP, RESCALE
from ksam.selection import SelectionContext, TopLoss, subset_gradient_scale


def ce(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y, reduction="none")


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 4))


def data(n: int = 32, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g), torch.randint(0, 4, (n,), generator=g)


def sgd(model: nn.Module) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def ctx(scores: torch.Tensor, step: int) -> SelectionContext:
    return SelectionContext(batch_size=len(scores), device=torch.device("cpu"),
                            scores=scores, step=step)


# ------------------------------------------------------------------ the schedule
def test_schedule_halves_from_batch_to_k():
    rule = TopLoss(16, warmup=10)
    got = [rule.size_at(128, t) for t in (0, 9, 10, 19, 20, 29, 30, 39, 40, 10**9)]
    assert got == [128, 128, 64, 64, 32, 32, 16, 16, 16, 16]
    assert rule.size(128) == 16  # the static size is the final K


def test_schedule_rounds_up_for_odd_batches():
    rule = TopLoss(0.125, warmup=1)  # K = round(12.5) = 12 of 100
    assert [rule.size_at(100, t) for t in range(6)] == [100, 50, 25, 13, 12, 12]
    assert TopLoss(1, warmup=1).size_at(3, 10**6) == 1


def test_selected_indices_at_given_steps():
    scores = torch.tensor([0.1, 0.9, 0.5, 0.9, 0.3, 0.7, 0.2, 0.8])
    rule = TopLoss(2, warmup=3)
    assert rule.select(ctx(scores, 0)).index.tolist() == [1, 3, 7, 5, 2, 4, 6, 0]
    assert rule.select(ctx(scores, 3)).index.tolist() == [1, 3, 7, 5]  # ties: lower index first
    assert rule.select(ctx(scores, 6)).index.tolist() == [1, 3]
    assert rule.select(ctx(scores, 100)).index.tolist() == [1, 3]


def test_plain_rule_is_unchanged():
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


# --------------------------------------------------------------------- the method
def descent_sizes(eng: ksam.SharpnessAwareOptimizer, steps: int) -> list[tuple[int, int]]:
    out = []
    for s in range(steps):
        r = eng.step(data(seed=s), ce)
        out.append((r.ascent_indices.numel(), r.descent_indices.numel()))
    return out


def test_default_ksam_warms_up_the_descent_only():
    model = mlp()
    eng = ksam.KSAM(model, sgd(model), k=8, k_warmup=2)
    assert descent_sizes(eng, 7) == [(8, 32), (8, 32), (8, 16), (8, 16), (8, 8), (8, 8), (8, 8)]


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
        ksam.KSAM(models[0], sgd(models[0]), k=8, k_warmup=0, rescale=False, seed=0),
        ksam.create("ksam-plain", models[1], sgd(models[1]), k=8, seed=0),
        ksam.SharpnessAwareOptimizer(models[2], sgd(models[2]), ascent=TopLoss(8),
                                     perturbation=ksam.GradientNormPerturbation(0.05),
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


def test_state_dict_round_trip_resumes_the_schedule():
    """The schedule is a function of the engine's step count, which its state_dict holds."""
    full, part = mlp(), mlp()
    e_full = ksam.KSAM(full, sgd(full), k=4, k_warmup=2, seed=3)
    sizes_full = descent_sizes(e_full, 8)

    e_part = ksam.KSAM(part, sgd(part), k=4, k_warmup=2, seed=3)
    sizes = descent_sizes(e_part, 3)
    saved = copy.deepcopy(e_part.state_dict())
    resumed = copy.deepcopy(part)
    e_res = ksam.KSAM(resumed, sgd(resumed), k=4, k_warmup=2, seed=99)
    e_res.load_state_dict(saved)
    assert e_res.steps == 3
    for s in range(3, 8):
        r = e_res.step(data(seed=s), ce)
        sizes.append((r.ascent_indices.numel(), r.descent_indices.numel()))
    assert sizes == sizes_full == [(4, 32), (4, 32), (4, 16), (4, 16), (4, 8), (4, 8),
                                   (4, 4), (4, 4)]
    for p, q in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(p, q)


def test_deterministic_and_fast_path_equal_on_cpu():
    models = [mlp(), mlp(), mlp()]
    engines = [ksam.KSAM(models[0], sgd(models[0]), k=4, k_warmup=1, seed=0),
               ksam.KSAM(models[1], sgd(models[1]), k=4, k_warmup=1, seed=0),
               ksam.KSAM(models[2], sgd(models[2]), k=4, k_warmup=1, seed=0, fast_path=True)]
    for s in range(6):
        for e in engines:
            e.step(data(seed=s), ce)
    assert engines[2].executor.reason is None
    for p, q, r in zip(*(m.parameters() for m in models)):
        assert torch.equal(p, q)
        torch.testing.assert_close(p, r, atol=1e-6, rtol=0)


# ------------------------------------------------------------------- the rescaling
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


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), "yes", None])
def test_rescale_out_of_range_is_refused(bad):
    with pytest.raises(ValueError, match="rescale must be"):
        TopLoss(2, rescale=bad)
    model = mlp()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="rescale must be"):
        ksam.KSAM(model, torch.optim.SGD(model.parameters(), lr=0.1), rescale=bad)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_rescaled_step_is_the_plain_step_times_the_scale():
    """Plain SGD base (no momentum, no weight decay): the update is linear in the gradient."""
    a, b = mlp(), mlp()
    w0 = [p.detach().clone() for p in a.parameters()]
    ea = ksam.KSAM(a, torch.optim.SGD(a.parameters(), lr=0.1), k=8, k_warmup=0, rescale=True)
    eb = ksam.KSAM(b, torch.optim.SGD(b.parameters(), lr=0.1), k=8, k_warmup=0, rescale=False)
    ra, rb = ea.step(data(seed=0), ce), eb.step(data(seed=0), ce)
    assert torch.equal(ra.descent_indices, rb.descent_indices)
    scale = float(subset_gradient_scale(ra.losses, ra.descent_indices))
    assert 0 < scale < 1
    for p, q, w in zip(a.parameters(), b.parameters(), w0):
        torch.testing.assert_close(p - w, scale * (q - w), atol=1e-6, rtol=1e-5)
