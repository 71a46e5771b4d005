"""KSAMMixin: ksam steps in a LightningModule with manual optimization (CPU, offline)."""

from __future__ import annotations

import csv
import warnings
from types import SimpleNamespace

import pytest
import torch
from conftest import assert_tree_equal, ce, ce_logits
from torch import nn

L = pytest.importorskip("lightning.pytorch")

import ksam  # noqa: E402
from ksam.integrations.lightning import KSAMMixin  # noqa: E402

BATCH = 8


def net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))


class Module(KSAMMixin, L.LightningModule):
    def __init__(self, method: str = "ksam", **kwargs) -> None:
        super().__init__()
        self.net = net()
        self.configure_ksam(method, **kwargs)
        self.sizes: list[int] = []
        self.batches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.net.register_forward_pre_hook(lambda m, a: self.sizes.append(a[0].shape[0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        self.batches.append(tuple(t.clone() for t in batch))
        self.ksam_step(batch, ce)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def loader(n: int = 64) -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(1)
    data = torch.utils.data.TensorDataset(torch.randn(n, 6, generator=g),
                                          torch.randint(0, 3, (n,), generator=g))
    return torch.utils.data.DataLoader(data, batch_size=BATCH, shuffle=False)


def trainer(tmp_path, **kw) -> L.Trainer:
    base = dict(accelerator="cpu", devices=1, max_steps=3, logger=False,
                enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, log_every_n_steps=1)
    base.update(kw)
    return L.Trainer(default_root_dir=str(tmp_path), **base)


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        warnings.filterwarnings("ignore", ".*GPU available but not used.*")
        yield


@pytest.mark.parametrize("method, kwargs, sizes", [
    ("ksam", {"k": 0.25, "k_warmup": 0}, [8, 2, 2]),
    ("sam", {}, [8, 8]),
    ("sgd", {}, [8]),
])
def test_ksam_step_in_lightning(tmp_path, method, kwargs, sizes):
    module = Module(method, **kwargs)
    init = {k: v.clone() for k, v in module.net.state_dict().items()}
    logger = L.loggers.CSVLogger(str(tmp_path), name="run")
    t = trainer(tmp_path, logger=logger)
    t.fit(module, loader())

    assert t.global_step == 3 and module.ksam.steps == 3  # max_steps honoured
    assert module.sizes == sizes * 3
    assert isinstance(module.ksam.optimizer.base, torch.optim.SGD)  # the unwrapped optimizer

    # Same weights as running the engine by hand on the same batches.
    ref = net()
    ref.load_state_dict(init)
    engine = ksam.create(method, ref, torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9),
                         **kwargs)
    losses = [engine.step(b, ce).loss for b in module.batches]
    for p, q in zip(module.net.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)

    # The loss is logged at every step.
    assert t.callback_metrics["train_loss"].item() == pytest.approx(losses[-1], abs=1e-6)
    logger.save()
    with open(f"{logger.log_dir}/metrics.csv") as f:
        logged = [float(r["train_loss"]) for r in csv.DictReader(f) if r.get("train_loss")]
    assert logged == pytest.approx(losses, abs=1e-6)


def test_bf16_mixed_uses_autocast(tmp_path):
    module = Module("ksam", k=0.25, k_warmup=0)
    t = trainer(tmp_path, precision="bf16-mixed", max_steps=1)
    t.fit(module, loader())
    assert module.ksam.autocast_dtype is torch.bfloat16 and module.ksam.steps == 1


def test_refusals(tmp_path):
    module = Module("ksam")
    module.automatic_optimization = True
    with pytest.raises(RuntimeError, match="manual optimization"):
        trainer(tmp_path, max_steps=1).fit(module, loader())
    # Lightning turns 16-mixed into bf16-mixed on a CPU, so fake the trainer it reports.
    for fake, match in [(SimpleNamespace(world_size=1, precision="16-mixed"), "16-mixed"),
                        (SimpleNamespace(world_size=2, precision="32-true"), "single device")]:
        module = Module("ksam")
        module._trainer = fake
        with pytest.raises(RuntimeError, match=match):
            module.ksam_step((torch.randn(8, 6), torch.zeros(8, dtype=torch.long)), ce)


def test_checkpoint_carries_engine_state(tmp_path):
    # Two batches an epoch and whole epochs: the resumed run sees the same batches as the
    # uninterrupted one (Lightning cannot resume a plain DataLoader mid-epoch).
    module = Module("random-sam", k_ascent=0.5, seed=3)
    t = trainer(tmp_path, max_steps=-1, max_epochs=1)
    t.fit(module, loader(16))
    path = tmp_path / "two.ckpt"
    t.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=False)
    assert ckpt["ksam_state"]["steps"] == 2

    resumed = Module("random-sam", k_ascent=0.5, seed=99)
    t2 = trainer(tmp_path, max_steps=-1, max_epochs=2)
    t2.fit(resumed, loader(16), ckpt_path=str(path))
    full = Module("random-sam", k_ascent=0.5, seed=3)
    trainer(tmp_path, max_steps=-1, max_epochs=2).fit(full, loader(16))
    assert resumed.ksam.steps == 4 and t2.global_step == 4
    assert resumed.ksam.generator.get_state().equal(full.ksam.generator.get_state())
    for p, q in zip(resumed.net.parameters(), full.net.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)


class NaNModule(Module):
    """Finite gradients, a non-finite loss from the second step on."""

    def training_step(self, batch, batch_idx):
        self.batches.append(tuple(t.clone() for t in batch))
        nan = float("nan") if batch_idx >= 1 else 0.0
        self.ksam_step(batch, lambda m, b: ce(m, b) + nan)
        if batch_idx == 0:
            opt = self.ksam.optimizer.base
            self.after_first = ([p.detach().clone() for p in self.net.parameters()],
                                [opt.state[p]["momentum_buffer"].clone()
                                 for p in self.net.parameters()])


def test_fast_path_skip_reaches_the_real_optimizer(tmp_path):
    """The fast path's device-side skip flag goes through the LightningOptimizer proxy to
    the real optimizer: a non-finite step leaves weights and momentum as they were."""
    module = NaNModule("sam", fast_path=True)
    trainer(tmp_path).fit(module, loader())
    assert module.ksam.fast_path_active and module.ksam.skipped_steps == 2
    opt = module.ksam.optimizer.base
    weights, momentum = module.after_first
    for p, w, m in zip(module.net.parameters(), weights, momentum):
        assert torch.equal(p, w) and torch.equal(opt.state[p]["momentum_buffer"], m)


def test_max_grad_norm_and_micro_batches_are_engine_options(tmp_path):
    model = Module("sam", max_grad_norm=1e-3, micro_batch_size=3)
    init = [p.detach().clone() for p in model.parameters()]
    trainer(tmp_path, max_steps=1).fit(model, loader())
    assert model.ksam.max_grad_norm == 1e-3 and model.ksam.micro_batch_size == 3
    assert model.sizes == [3, 3, 2] * 2  # ascent and descent over 8 rows in chunks of 3
    step = torch.linalg.vector_norm(torch.stack(
        [torch.linalg.vector_norm(p.detach() - q) for p, q in zip(model.parameters(), init)]))
    assert float(step) == pytest.approx(0.1 * 1e-3, rel=1e-4)  # lr x the clipped norm


# ----------------------------------------------------------- example ids and logits
N = 24  # training-set size: 3 steps an epoch
MEMORY_METHODS = {  # name: method, options (each makes the step depend on the ids or logits)
    "saf": ("saf", {"lam": 0.5, "temperature": 2.0, "delay": 1, "start_epoch": 0,
                    "num_examples": N}),
    "mesa": ("mesa", {"lam": 0.5, "temperature": 2.0, "decay": 0.5}),
    "ksam-memory": ("ksam", {"scores": "memory", "k": 0.25, "k_warmup": 0,
                             "num_examples": N}),
}


class Indexed(torch.utils.data.Dataset):
    """``(x, y, index)``: each example with its position in the dataset."""

    def __init__(self, n: int = N) -> None:
        g = torch.Generator().manual_seed(1)
        self.x, self.y = torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i], i


def indexed_loader() -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(Indexed(), batch_size=BATCH, shuffle=True,
                                       generator=torch.Generator().manual_seed(0))


class IndexedModule(Module):
    """The documented pattern: the batch's ids into a ksam.IndexedBatch, logits returned."""

    def __init__(self, method: str, **kwargs) -> None:
        super().__init__(method, **kwargs)
        self.results: list[ksam.StepResult] = []

    def training_step(self, batch, batch_idx):
        x, y, index = batch
        self.batches.append(ksam.IndexedBatch((x.clone(), y.clone()), index.clone()))
        self.results.append(self.ksam_step(ksam.IndexedBatch((x, y), index), ce_logits))


@pytest.mark.parametrize("name", list(MEMORY_METHODS))
def test_memory_methods_match_the_plain_engine_on_the_same_batches(tmp_path, name):
    """SAF, MESA and K-SAM from memory in a LightningModule: 3 shuffled epochs give, bit for
    bit, the plain engine's weights, losses and memory on the same ids and batches."""
    method, kwargs = MEMORY_METHODS[name]
    module = IndexedModule(method, seed=0, **kwargs)
    init = {k: v.clone() for k, v in module.net.state_dict().items()}
    t = trainer(tmp_path, max_steps=9)
    t.fit(module, indexed_loader())
    assert module.ksam.steps == 9 and t.global_step == 9
    ids = torch.cat([b.index for b in module.batches])
    assert sorted(ids[:N].tolist()) == list(range(N)) and ids[:N].tolist() != list(range(N))

    ref = net()
    ref.load_state_dict(init)
    engine = ksam.create(method, ref, torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9),
                         seed=0, **kwargs)
    results = [engine.step(b, ce_logits) for b in module.batches]
    for p, q in zip(module.net.parameters(), ref.parameters()):
        assert torch.equal(p, q)
    assert [r.loss for r in module.results] == [r.loss for r in results]
    assert t.callback_metrics["train_loss"].item() == pytest.approx(results[-1].loss, abs=1e-6)
    state, ref_state = module.ksam.state_dict(), engine.state_dict()
    if name == "mesa":  # the average of the module (its keys under "net.") and of the net
        assert_tree_equal(list(state["term"]["ema"].values()),
                          list(ref_state["term"]["ema"].values()))
    else:
        assert_tree_equal(state["memory"], ref_state["memory"])


def test_a_method_with_memory_needs_num_examples_and_ids(tmp_path):
    with pytest.raises(ValueError, match="num_examples=N"):
        Module("saf")
    with pytest.raises(ValueError, match="num_examples=N"):
        Module("osgd", scores="memory")

    class Plain(IndexedModule):  # forgets to wrap the batch
        def training_step(self, batch, batch_idx):
            x, y, _ = batch
            self.ksam_step((x, y), ce_logits)

    module = Plain("saf", num_examples=N)
    init = [p.detach().clone() for p in module.parameters()]
    with pytest.raises(ValueError, match="ksam.IndexedBatch"):
        trainer(tmp_path, max_steps=1).fit(module, indexed_loader())
    for p, q in zip(module.parameters(), init):
        assert torch.equal(p, q)
