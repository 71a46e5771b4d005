"""Methods with per-example memory or logits: SAF, MESA, and K-SAM / Ordered SGD with scores
from memory. Each against a hand-written reference of its published algorithm; the memory
written only by applied steps, resumed exactly; bad input refused with nothing changed."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    assert_same,
    assert_tree_equal,
    assert_unchanged,
    bn_net,
    ce,
    ce_logits,
    mlp,
    params,
    snapshot,
)

import ksam
from ksam import IndexedBatch
from ksam.methods import _NOT_FROM_MEMORY, MEMORY_RULES
from ksam.selection import RULES

N = 48  # training-set size
B = 16  # batch size
WD = 5e-4


def dataset(seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, 6, generator=g), torch.randint(0, 4, (N,), generator=g)


def epochs(count: int) -> list[torch.Tensor]:
    """The ids of each step: every example once an epoch, in a fresh order each epoch."""
    g = torch.Generator().manual_seed(7)
    out = []
    for _ in range(count):
        order = torch.randperm(N, generator=g)
        out.extend(order[i:i + B] for i in range(0, N, B))
    return out


def indexed(ids: torch.Tensor, data=None) -> IndexedBatch:
    x, y = dataset() if data is None else data
    return IndexedBatch((x[ids], y[ids]), ids)


def opt_of(model) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=WD)


def published_kl(z: torch.Tensor, m: torch.Tensor, t: float) -> torch.Tensor:
    """The reference code's per-example KL: ``F.kl_div`` of the softmaxes, times T^2."""
    return F.kl_div(F.softmax(z / t, -1).log(), F.softmax(m / t, -1),
                    reduction="none").sum(-1) * t ** 2


# ------------------------------------------------------------------------------ SAF
SAF_OPTS = dict(lam=0.3, temperature=2.0, delay=2, start_epoch=2)


def saf_reference(model, steps: list[torch.Tensor]):
    """SAF_train.py's loop, with an example's visit count as its epoch."""
    opt = opt_of(model)
    e, t, lam, start = SAF_OPTS["delay"], SAF_OPTS["temperature"], SAF_OPTS["lam"], \
        SAF_OPTS["start_epoch"]
    ring = torch.zeros(N, e + 1, 4)
    visits = torch.zeros(N, dtype=torch.long)
    x, y = dataset()
    for ids in steps:
        z = model(x[ids])
        v = visits[ids]
        loss = F.cross_entropy(z, y[ids], reduction="none")
        on = (v > start) & (v >= e)
        kl = published_kl(z, ring[ids, (v - e) % (e + 1)], t)
        loss = (loss + lam * kl * on).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        ring[ids, v % (e + 1)] = z.detach()
        visits[ids] += 1
    return ring, visits


def test_saf_matches_the_published_algorithm_and_remembers_each_visits_logits():
    steps = epochs(6)
    ref_model, model = mlp(), mlp()
    ring, visits = saf_reference(ref_model, steps)
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def recording(m, batch):
        out = ce_logits(m, batch)
        seen.append(out.logits.detach().clone())
        return out

    eng = ksam.create("saf", model, opt_of(model), num_examples=N, **SAF_OPTS)
    for ids in steps:
        eng.step(indexed(ids), recording)
    assert_same(params(model), params(ref_model), atol=1e-6)
    tables = eng.plan.memory.tables
    assert torch.equal(tables["visits"][:N], visits)
    # The ring holds exactly the logits the engine's passes computed, slot v mod (E + 1).
    expected = torch.zeros(N, SAF_OPTS["delay"] + 1, 4)
    count = torch.zeros(N, dtype=torch.long)
    for ids, z in zip(steps, seen):
        expected[ids, count[ids] % (SAF_OPTS["delay"] + 1)] = z
        count[ids] += 1
    assert torch.equal(tables["logits"][:N], expected)
    torch.testing.assert_close(tables["logits"][:N], ring, atol=1e-5, rtol=0)


def test_saf_micro_batches_slice_the_ids_with_the_rows():
    steps = epochs(4)
    a, b = mlp(), mlp()
    ea = ksam.create("saf", a, opt_of(a), num_examples=N, **SAF_OPTS)
    eb = ksam.create("saf", b, opt_of(b), num_examples=N, micro_batch_size=5, **SAF_OPTS)
    for ids in steps:
        ea.step(indexed(ids), ce_logits)
        eb.step(indexed(ids), ce_logits)
    assert_same(params(a), params(b), atol=1e-6)
    assert torch.equal(ea.plan.memory.tables["visits"], eb.plan.memory.tables["visits"])
    torch.testing.assert_close(ea.plan.memory.tables["logits"],
                               eb.plan.memory.tables["logits"], atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------- MESA
MESA_OPTS = dict(lam=0.5, temperature=3.0, decay=0.8, start_step=2)


def test_mesa_matches_the_published_algorithm_with_its_average_model():
    steps = epochs(3)
    ref_model, model = bn_net(), bn_net()
    opt = opt_of(ref_model)
    ema = copy.deepcopy(ref_model).eval()
    x, y = dataset()
    for s, ids in enumerate(steps):
        with torch.no_grad():
            target = ema(x[ids])
        z = ref_model(x[ids])
        loss = F.cross_entropy(z, y[ids], reduction="none")
        if s >= MESA_OPTS["start_step"]:
            loss = loss + MESA_OPTS["lam"] * published_kl(z, target,
                                                          MESA_OPTS["temperature"])
        opt.zero_grad()
        loss.mean().backward()
        opt.step()
        d = MESA_OPTS["decay"]
        with torch.no_grad():
            for ev, mv in zip(ema.state_dict().values(), ref_model.state_dict().values()):
                ev.copy_(d * ev + (1 - d) * mv if ev.is_floating_point() else mv)
    eng = ksam.create("mesa", model, opt_of(model), **MESA_OPTS)
    for ids in steps:  # MESA needs no ids: a plain (inputs, labels) batch
        eng.step(indexed(ids).batch, ce_logits)
    assert_same(model.state_dict().values(), ref_model.state_dict().values(), atol=1e-6)
    assert_same(eng.plan.term.ema.state_dict().values(), ema.state_dict().values(), atol=1e-6)


# ------------------------------------------------------------- K-SAM from memory
def ksam_memory_reference(model, steps, k1: int, k2: int, rho: float = 0.05,
                          select: str = "top"):
    """K-SAM whose scores are each example's last loss at w (+inf before its first): the
    first K rows of the batch's order by them (``top``) or the rows at ranks
    ``floor(i * B / K)`` (``stratified``)."""
    opt = opt_of(model)
    memory = torch.full((N,), float("inf"))
    x, y = dataset()
    chosen = []
    for ids in steps:
        xb, yb = x[ids], y[ids]
        order = torch.sort(memory[ids], descending=True, stable=True).indices
        if select == "top":
            a, d = order[:k1], order[:k2]
        else:
            a, d = (order[[i * len(ids) // k for i in range(k)]] for k in (k1, k2))
        losses_a = F.cross_entropy(model(xb[a]), yb[a], reduction="none")
        opt.zero_grad()
        losses_a.mean().backward()
        ps = [p for p in model.parameters()]
        gs = [p.grad.clone() for p in ps]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in gs]))
        saved = [p.detach().clone() for p in ps]
        with torch.no_grad():
            for p, g in zip(ps, gs):
                p.add_(g * (rho / (norm + 1e-12)))
        opt.zero_grad()
        F.cross_entropy(model(xb[d]), yb[d], reduction="none").mean().backward()
        with torch.no_grad():
            for p, s in zip(ps, saved):
                p.copy_(s)
        opt.step()
        memory[ids[a]] = losses_a.detach()
        chosen.append((a, d))
    return memory, chosen


@pytest.mark.parametrize("select", ["top", "stratified"])
def test_ksam_with_scores_from_memory_matches_its_reference_without_a_scoring_pass(select):
    steps = epochs(4)
    ref_model, model = mlp(), mlp()
    memory, chosen = ksam_memory_reference(ref_model, steps, k1=4, k2=8, select=select)
    eng = ksam.create("ksam", model, opt_of(model), k_ascent=4, k_descent=8, k_warmup=0,
                      scores="memory", num_examples=N, select=select)
    forwards = []
    counting = lambda m, b: forwards.append(len(b[1])) or ce(m, b)  # noqa: E731
    for ids, (a, d) in zip(steps, chosen):
        r = eng.step(indexed(ids), counting)
        assert torch.equal(r.ascent_indices, a) and torch.equal(r.descent_indices, d)
        assert r.losses is None
    assert forwards == [4, 8] * len(steps)  # no forward over the whole batch
    assert_same(params(model), params(ref_model), atol=1e-6)
    table = eng.plan.memory.tables["loss"][:N]
    assert torch.equal(torch.isinf(table), torch.isinf(memory))
    torch.testing.assert_close(table, memory, atol=1e-6, rtol=0)


def test_ordered_sgd_from_memory_refreshes_the_rows_it_descends_on():
    steps = epochs(2)
    model = mlp()
    eng = ksam.create("osgd", model, opt_of(model), k=4, scores="memory", num_examples=N)
    r = eng.step(indexed(steps[0]), ce)
    table = eng.plan.memory.tables["loss"][:N]
    rows = steps[0][r.descent_indices]
    assert torch.isfinite(table[rows]).all()
    assert torch.isinf(table).sum() == N - 4
    assert r.loss == pytest.approx(float(table[rows].mean()))


def test_ksam_from_memory_updates_batchnorm_once_in_its_first_pass():
    model = bn_net()
    eng = ksam.create("ksam", model, opt_of(model), k=4, k_warmup=0, scores="memory",
                      num_examples=N)
    bn = model[1]
    from conftest import bn_update_pattern

    assert bn_update_pattern(bn, lambda: eng.step(indexed(epochs(1)[0]), ce)) == [True, False]


# --------------------------------------------------------- skip, resume, fast path
def _engines():
    """(name, make engine, batch of ids, loss_fn) for each memory method."""
    return [
        ("saf", lambda m, **kw: ksam.create("saf", m, opt_of(m), num_examples=N,
                                            **SAF_OPTS, **kw), ce_logits),
        ("mesa", lambda m, **kw: ksam.create("mesa", m, opt_of(m), **MESA_OPTS, **kw),
         ce_logits),
        ("ksam-memory", lambda m, **kw: ksam.create("ksam", m, opt_of(m), k=4, k_warmup=0,
                                                    scores="memory", num_examples=N, **kw),
         ce),
        ("osgd-memory", lambda m, **kw: ksam.create("osgd", m, opt_of(m), k=4,
                                                    scores="memory", num_examples=N, **kw),
         ce),
    ]


def _memory_state(eng):
    state = eng.state_dict()
    return {k: state[k] for k in ("term", "memory") if k in state}


@pytest.mark.parametrize("name,make,loss_fn", _engines(), ids=[e[0] for e in _engines()])
def test_a_skipped_step_leaves_the_memory_and_the_average_as_they_were(name, make, loss_fn):
    model = bn_net()
    eng = make(model)
    steps = epochs(3)
    for ids in steps[:5]:
        eng.step(indexed(ids), loss_fn)
    before, memory = snapshot(model, eng.optimizer), copy.deepcopy(_memory_state(eng))
    x, y = dataset()
    bad = x.clone()
    bad[steps[5][0]] = float("nan")
    r = eng.step(indexed(steps[5], (bad, y)), loss_fn)
    assert r.skipped
    assert_unchanged(before, model, eng.optimizer)
    assert_tree_equal(_memory_state(eng), memory)


@pytest.mark.parametrize("name,make,loss_fn", _engines(), ids=[e[0] for e in _engines()])
def test_resume_mid_run_is_bit_identical(name, make, loss_fn):
    steps = epochs(4)
    a = bn_net()
    ea = make(a)
    for ids in steps:
        ea.step(indexed(ids), loss_fn)
    b = bn_net()
    eb = make(b)
    for ids in steps[:7]:
        eb.step(indexed(ids), loss_fn)
    saved = copy.deepcopy({"model": b.state_dict(), "engine": eb.state_dict()})
    c = bn_net(seed=5)
    ec = make(c)
    c.load_state_dict(saved["model"])
    ec.load_state_dict(saved["engine"])
    for ids in steps[7:]:
        ec.step(indexed(ids), loss_fn)
    assert_same(a.state_dict().values(), c.state_dict().values())
    assert_tree_equal(_memory_state(ec), _memory_state(ea))


@pytest.mark.parametrize("name,make,loss_fn", _engines(), ids=[e[0] for e in _engines()])
def test_sync_free_executor_equals_eager_on_cpu(name, make, loss_fn):
    steps = epochs(3)
    a, b = bn_net(), bn_net()
    ea, eb = make(a), make(b, fast_path=True)
    for ids in steps:
        ra, rb = ea.step(indexed(ids), loss_fn), eb.step(indexed(ids), loss_fn)
        assert ra.loss == pytest.approx(rb.loss, abs=1e-6) and not rb.skipped
    assert eb.fast_path_active
    assert_same(a.state_dict().values(), b.state_dict().values(), atol=1e-6)
    ma, mb = _memory_state(ea), _memory_state(eb)
    flat_a = [t for d in ma.values() for t in _tensors(d)]
    flat_b = [t for d in mb.values() for t in _tensors(d)]
    assert_same(flat_a, flat_b, atol=1e-6)


def _tensors(tree):
    if isinstance(tree, torch.Tensor):
        yield tree.float()
    elif isinstance(tree, dict):
        for v in tree.values():
            yield from _tensors(v)


# ------------------------------------------------------------------------ bad input
def _memory_engines():
    return [e for e in _engines() if e[0] != "mesa"]


@pytest.mark.parametrize("name,make,loss_fn", _memory_engines(),
                         ids=[e[0] for e in _memory_engines()])
def test_a_batch_without_valid_ids_is_one_error_and_changes_nothing(name, make, loss_fn):
    model = bn_net()
    eng = make(model)
    eng.step(indexed(epochs(1)[0]), loss_fn)
    before, memory = snapshot(model, eng.optimizer), copy.deepcopy(_memory_state(eng))
    ids = epochs(1)[1]
    x, y = dataset()
    with pytest.raises(ValueError, match="IndexedBatch"):
        eng.step((x[ids], y[ids]), loss_fn)
    too_far = ids.clone()
    too_far[3] = N  # an id of an example past N: num_examples too small for the data
    with pytest.raises(ValueError, match=f"example id {N} is out of range for num_examples"):
        eng.step(IndexedBatch((x[ids], y[ids]), too_far), loss_fn)
    with pytest.raises(ValueError, match="out of range"):
        eng.step(IndexedBatch((x[ids], y[ids]), ids - N), loss_fn)
    with pytest.raises(ValueError, match="1-D integer tensor of 16"):
        eng.step(IndexedBatch((x[ids], y[ids]), ids.float()), loss_fn)
    assert eng.steps == 1
    assert_unchanged(before, model, eng.optimizer)
    assert_tree_equal(_memory_state(eng), memory)


@pytest.mark.parametrize("method,kw", [("saf", {"num_examples": N}), ("mesa", {})])
def test_a_loss_fn_without_logits_is_refused_with_nothing_changed(method, kw):
    model = bn_net()
    eng = ksam.create(method, model, opt_of(model), start_step=0, **kw) if method == "mesa" \
        else ksam.create(method, model, opt_of(model), **kw)
    before = snapshot(model, eng.optimizer)
    with pytest.raises(TypeError, match="loss_fn must return ksam.LossOutput"):
        eng.step(indexed(epochs(1)[0]), ce)
    assert_unchanged(before, model, eng.optimizer)
    assert eng.steps == 0
    if eng.plan.memory is not None:
        assert eng.plan.memory.tables == {}


@pytest.mark.parametrize("kw,match", [
    ({"scores": "memory"}, "needs num_examples"),
    ({"scores": "memory", "num_examples": 0}, "num_examples must be"),
    ({"scores": "memory", "num_examples": N, "select": "auto-margin"},
     "takes select='top' or 'stratified', got 'auto-margin': it compares the losses' values"),
    ({"scores": "memory", "num_examples": N, "select": "auto"},
     "got 'auto': it compares the losses' values with chance"),
    ({"scores": "memory", "num_examples": N, "select": ksam.selection.TopLoss},
     "a rule factory is not one of them"),
    ({"scores": "memory", "num_examples": N, "rescale": True}, "takes no rescale"),
    ({"scores": "remembered", "num_examples": N}, "scores must be"),
    ({"num_examples": N}, "num_examples is for scores='memory'"),
])
def test_memory_options_are_checked(kw, match):
    model = mlp()
    with pytest.raises(ValueError, match=match):
        ksam.create("ksam", model, opt_of(model), **kw)


@pytest.mark.parametrize("rule", sorted(RULES))
def test_every_rule_is_taken_from_memory_or_refused_with_its_reason(rule):
    model = mlp()
    build = lambda: ksam.create("ksam", model, opt_of(model), select=rule,  # noqa: E731
                                scores="memory", num_examples=N)
    if rule in MEMORY_RULES:
        assert build().plan.memory is not None
    else:
        with pytest.raises(ValueError, match=f"got '{rule}': {_NOT_FROM_MEMORY[rule]}"):
            build()


def test_saf_and_mesa_options_are_checked():
    model = mlp()
    with pytest.raises(TypeError):
        ksam.create("saf", model, opt_of(model))  # num_examples is required
    for kw, match in [({"delay": 0}, "delay"), ({"temperature": 0}, "temperature"),
                      ({"lam": -1}, "lam")]:
        with pytest.raises(ValueError, match=match):
            ksam.create("saf", model, opt_of(model), num_examples=N, **kw)
    with pytest.raises(ValueError, match="decay"):
        ksam.create("mesa", model, opt_of(model), decay=1.0)


def test_a_state_of_another_training_set_size_is_refused():
    a, b = mlp(), mlp()
    ea = ksam.create("saf", a, opt_of(a), num_examples=N, **SAF_OPTS)
    ea.step(indexed(epochs(1)[0]), ce_logits)
    eb = ksam.create("saf", b, opt_of(b), num_examples=N + 1, **SAF_OPTS)
    with pytest.raises(ValueError, match="num_examples"):
        eb.load_state_dict(ea.state_dict())
    assert eb.plan.memory.tables == {} and eb.steps == 0
