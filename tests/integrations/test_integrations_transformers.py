"""KSAMTrainer: ksam steps inside a Hugging Face Trainer loop (tiny random BERT, offline)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_tree_equal

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from transformers import (  # noqa: E402
    BertConfig,
    BertForSequenceClassification,
    BertForTokenClassification,
    TrainingArguments,
)

import ksam  # noqa: E402
from ksam.integrations.transformers import (  # noqa: E402
    INDEX_COLUMN,
    HFPerSampleLoss,
    KSAMTrainer,
    merge_batches,
    per_sample_loss,
    with_example_index,
)

VOCAB, SEQ, BATCH = 100, 12, 8


def tiny_bert(seed: int = 0, num_labels: int = 2, cls: type = BertForSequenceClassification):
    """A random 2-layer BERT (hidden 32); dropout off so that runs compare bit for bit."""
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=32,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                        num_labels=num_labels)
    return cls(config)


class ToyText(torch.utils.data.Dataset):
    """Random token ids with padding; label 1 iff the sequence holds more high than low ids."""

    def __init__(self, n: int = 64, seed: int = 0, token_labels: bool = False) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, VOCAB, (n, SEQ), generator=g)
        lengths = torch.randint(4, SEQ + 1, (n,), generator=g)
        self.mask = (torch.arange(SEQ) < lengths[:, None]).long()
        self.ids = self.ids * self.mask
        if token_labels:
            self.labels = torch.where(self.mask.bool(), self.ids % 3, -100)
        else:
            self.labels = ((self.ids > 50).sum(1) > (self.ids * self.mask < 50).sum(1) / 2).long()

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": self.labels[i]}


def training_args(tmp_path, **kw) -> TrainingArguments:
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=BATCH, max_steps=3,
                learning_rate=0.05, logging_steps=1, save_strategy="no", report_to=[],
                use_cpu=True, disable_tqdm=True, seed=0, dataloader_drop_last=True)
    base.update(kw)
    return TrainingArguments(**base)


class RecordingTrainer(KSAMTrainer):
    """Keeps each step's batch and StepResult, to replay the run by hand."""

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.batches: list[dict[str, torch.Tensor]] = []
        self.results: list[ksam.StepResult] = []

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.batches.append({k: v.clone() for k, v in inputs.items()})
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.results.append(self.last_step_result)
        return loss


def count_forwards(model) -> list[int]:
    sizes: list[int] = []
    model.register_forward_pre_hook(
        lambda m, a, kw: sizes.append(kw["input_ids"].shape[0]), with_kwargs=True)
    return sizes


METHODS = {  # name, options, forward sizes of one step with a batch of 8
    "ksam": ({"rho": 0.05, "k": 0.25, "k_warmup": 0}, [8, 2, 2]),
    "sam": ({"rho": 0.05}, [8, 8]),
    "sgd": ({}, [8]),
}


@pytest.mark.parametrize("method", list(METHODS))
def test_trainer_runs_the_engine_and_matches_a_manual_replay(tmp_path, method):
    kwargs, sizes_per_step = METHODS[method]
    steps = 3
    model = tiny_bert()
    init = {k: v.clone() for k, v in model.state_dict().items()}
    sizes = count_forwards(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    trainer = RecordingTrainer(
        model=model, args=training_args(tmp_path, max_steps=steps, lr_scheduler_type="constant",
                                        max_grad_norm=0.0),
        train_dataset=ToyText(), optimizers=(opt, None), ksam_method=method, ksam_kwargs=kwargs)
    trainer.train()

    # The engine did every pass: exactly the method's forwards, one optimizer step per step.
    assert sizes == sizes_per_step * steps
    assert trainer.ksam.steps == steps and trainer.state.global_step == steps
    if method == "ksam":
        assert all(r.descent_indices.numel() == 2 for r in trainer.results)

    # Replaying the same batches through the engine by hand gives the same weights.
    ref = tiny_bert()
    ref.load_state_dict(init)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)
    engine = ksam.create(method, ref, ref_opt, seed=0, **kwargs)
    ref_losses = [engine.step(b, HFPerSampleLoss()).loss for b in trainer.batches]
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=name)
    assert not torch.equal(model.state_dict()["classifier.weight"], init["classifier.weight"])

    # The Trainer logs the engine's loss (the batch mean at w) at every step.
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert logged == pytest.approx(ref_losses, abs=1e-4)
    assert [r.loss for r in trainer.results] == pytest.approx(ref_losses, abs=1e-6)


def test_lr_scheduler_and_default_optimizer(tmp_path):
    model = tiny_bert()
    trainer = KSAMTrainer(model=model, args=training_args(tmp_path, max_steps=4,
                                                          learning_rate=1e-3),
                          train_dataset=ToyText(), ksam_kwargs={"k": 0.5})
    trainer.train()
    base = trainer.base_optimizer
    assert isinstance(base, torch.optim.AdamW)
    lrs = [h["learning_rate"] for h in trainer.state.log_history if "learning_rate" in h]
    assert len(lrs) == 4 and all(a > b for a, b in zip(lrs, lrs[1:]))  # linear decay
    assert all(g["lr"] == pytest.approx(0.0) for g in base.param_groups)  # decayed to 0
    assert len(base.state) > 0 and all(s["step"] == 4 for s in base.state.values())
    grad_norms = [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]
    if int(__import__("transformers").__version__.split(".")[0]) >= 5:
        assert grad_norms and all(g > 0 for g in grad_norms)


def test_max_grad_norm_clips_the_descent_gradient(tmp_path):
    model = tiny_bert()
    init = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = KSAMTrainer(model=model, args=training_args(tmp_path, max_steps=1,
                                                          max_grad_norm=1e-3,
                                                          lr_scheduler_type="constant"),
                          train_dataset=ToyText(), optimizers=(opt, None), ksam_method="sam")
    trainer.train()
    step = torch.linalg.vector_norm(torch.stack(
        [torch.linalg.vector_norm(p.detach() - q) for p, q in zip(model.parameters(), init)]))
    assert float(step) == pytest.approx(0.1 * 1e-3, rel=1e-3)


@pytest.mark.parametrize("method", ["ksam", "random-sam"])
def test_checkpoint_resume_gives_the_uninterrupted_run(tmp_path, method):
    # k_warmup=1: the descent subset shrinks 8, 4, 2, 2 with the engine's step count, which
    # must therefore survive the resume.
    kwargs = {"k": 0.25, "k_warmup": 1} if method == "ksam" else {"k_ascent": 0.5}

    def run(out, resume=None):
        trainer = KSAMTrainer(model=tiny_bert(), args=training_args(
            out, max_steps=4, learning_rate=1e-3, save_strategy="steps", save_steps=2),
            train_dataset=ToyText(), ksam_method=method, ksam_kwargs=kwargs)
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    full = run(tmp_path / "full")
    ckpt = tmp_path / "full" / "checkpoint-2"
    assert (ckpt / "optimizer.pt").is_file() and (ckpt / "ksam_state.pt").is_file()
    saved_opt = torch.load(ckpt / "optimizer.pt", weights_only=True)
    assert set(saved_opt) == {"state", "param_groups"}  # the base optimizer's own state_dict
    assert all("exp_avg" in s for s in saved_opt["state"].values())
    assert torch.load(ckpt / "ksam_state.pt", weights_only=True)["steps"] == 2

    resumed = run(tmp_path / "resumed", resume=str(ckpt))
    assert resumed.ksam.steps == 4 and resumed.state.global_step == 4
    for (name, p), q in zip(full.model.named_parameters(), resumed.model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=name)
    assert resumed.ksam.generator.get_state().equal(full.ksam.generator.get_state())


def test_token_classification_per_sample_loss_and_training(tmp_path):
    logits = torch.randn(3, 4, 5)
    labels = torch.tensor([[1, -100, 2, 0], [-100, -100, -100, -100], [4, 4, -100, -100]])
    got = per_sample_loss(logits, labels)
    want = torch.stack([
        F.cross_entropy(logits[0, [0, 2, 3]], labels[0, [0, 2, 3]]),
        torch.tensor(0.0),  # no valid token: loss 0
        F.cross_entropy(logits[2, :2], labels[2, :2]),
    ])
    torch.testing.assert_close(got, want)
    shifted = per_sample_loss(logits, labels, shift_labels=True)
    torch.testing.assert_close(shifted[2], F.cross_entropy(logits[2, :1], labels[2, 1:2]))

    model = tiny_bert(num_labels=3, cls=BertForTokenClassification)
    sizes = count_forwards(model)
    trainer = KSAMTrainer(model=model, args=training_args(tmp_path, max_steps=2),
                          train_dataset=ToyText(token_labels=True),
                          ksam_kwargs={"k": 0.25, "k_warmup": 0})
    trainer.train()
    assert sizes == [8, 2, 2] * 2
    assert [h["loss"] for h in trainer.state.log_history if "loss" in h]


def test_sequence_level_losses():
    logits = torch.randn(4, 3)
    y = torch.tensor([0, 2, 1, 1])
    torch.testing.assert_close(per_sample_loss(logits, y),
                               F.cross_entropy(logits, y, reduction="none"))
    reg = torch.randn(4, 1)
    target = torch.randn(4)
    torch.testing.assert_close(per_sample_loss(reg, target), (reg[:, 0] - target) ** 2)
    multi = torch.randint(0, 2, (4, 3)).float()
    torch.testing.assert_close(
        per_sample_loss(logits, multi),
        F.binary_cross_entropy_with_logits(logits, multi, reduction="none").mean(1))


def test_regression_model_trains(tmp_path):
    class Reg(ToyText):
        def __getitem__(self, i):
            item = super().__getitem__(i)
            item["labels"] = item["labels"].float()
            return item

    trainer = KSAMTrainer(model=tiny_bert(num_labels=1), args=training_args(tmp_path,
                                                                             max_steps=1),
                          train_dataset=Reg(), ksam_method="sam")
    trainer.train()
    assert trainer.ksam.steps == 1


def test_bf16_autocast(tmp_path):
    try:
        args = training_args(tmp_path, max_steps=1, bf16=True)
    except (ValueError, ImportError) as err:  # pragma: no cover - no CPU bf16 here
        pytest.skip(f"bf16 not available: {err}")
    trainer = KSAMTrainer(model=tiny_bert(), args=args, train_dataset=ToyText())
    trainer.train()
    assert trainer.ksam.autocast_dtype is torch.bfloat16
    assert trainer.ksam.steps == 1


def test_refused_settings(tmp_path):
    with pytest.raises(ValueError, match="gradient_accumulation_steps sets the engine's"):
        KSAMTrainer(model=tiny_bert(), args=training_args(tmp_path,
                                                          gradient_accumulation_steps=2),
                    ksam_kwargs={"micro_batch_size": 2})
    with pytest.raises(ValueError, match="unknown method"):
        KSAMTrainer(model=tiny_bert(), args=training_args(tmp_path), ksam_method="adam")
    with pytest.raises(ValueError, match="k must be"):
        KSAMTrainer(model=tiny_bert(), args=training_args(tmp_path), ksam_kwargs={"k": 0})


def test_default_loss_reads_label_names(tmp_path):
    trainer = KSAMTrainer(model=tiny_bert(), args=training_args(tmp_path,
                                                                label_names=["target"]))
    assert trainer.per_sample_loss_fn.label_name == "target"
    assert os.fspath(tmp_path)  # keep tmp_path used


def test_fast_path_skip_reaches_the_real_optimizer(tmp_path):
    """The fast path's device-side skip flag goes through the Trainer's proxy optimizers to
    the real one: a non-finite step leaves weights and momentum as they were."""
    model = tiny_bert()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    base_loss = HFPerSampleLoss()
    steps = {"n": 0}

    def loss_fn(m, inputs):  # finite gradients, non-finite loss from the second step on
        losses = base_loss(m, inputs)
        return losses + float("nan") if steps["n"] >= 1 else losses

    class Counting(KSAMTrainer):
        def training_step(self, *a, **kw):
            out = super().training_step(*a, **kw)
            steps["n"] += 1
            return out

    trainer = Counting(
        model=model, args=training_args(tmp_path, max_steps=3, lr_scheduler_type="constant",
                                        max_grad_norm=0.0),
        train_dataset=ToyText(), optimizers=(opt, None), ksam_method="sam",
        ksam_kwargs={"fast_path": True}, per_sample_loss_fn=loss_fn)
    snapshots = []
    trainer.add_callback(_Snapshot(model, opt, snapshots))
    trainer.train()
    assert trainer.ksam.fast_path_active and trainer.ksam.skipped_steps == 2
    after_first = snapshots[0]
    for k, v in model.state_dict().items():
        assert torch.equal(v, after_first[0][k]), k
    for p in model.parameters():
        assert torch.equal(opt.state[p]["momentum_buffer"], after_first[1][id(p)])


class _Snapshot(__import__("transformers").TrainerCallback):
    """Copies the weights and momentum after each step."""

    def __init__(self, model, opt, out) -> None:
        self.model, self.opt, self.out = model, opt, out

    def on_step_end(self, args, state, control, **kwargs):
        self.out.append(({k: v.clone() for k, v in self.model.state_dict().items()},
                         {id(p): self.opt.state[p]["momentum_buffer"].clone()
                          for p in self.model.parameters()}))


def test_loss_kind_follows_the_labels():
    loss = HFPerSampleLoss()
    assert loss.loss_kind({"labels": torch.tensor([0, 1])}) == "ce"
    assert loss.loss_kind({"labels": torch.tensor([0.5, 1.5])}) == "mse"
    assert loss.loss_kind({"labels": torch.zeros(2, 5, dtype=torch.long)}) == "other"
    assert loss.loss_kind({"labels": torch.zeros(2, 3)}) == "other"  # multi-label mean
    assert HFPerSampleLoss(shift_labels=True).loss_kind({"labels": torch.tensor([1])}) == "other"
    assert HFPerSampleLoss(problem_type="regression").loss_kind({}) == "mse"


def test_token_level_ksam_runs_without_rescale(tmp_path):
    model = tiny_bert(num_labels=3, cls=BertForTokenClassification)
    trainer = KSAMTrainer(model=model, args=training_args(tmp_path, max_steps=1),
                          train_dataset=ToyText(token_labels=True), ksam_method="ksam",
                          ksam_kwargs={"k": 0.5})
    trainer.train()
    assert trainer.ksam.descent.loss_kind == "other" and trainer.ksam.descent.rescale is False


def test_gradient_accumulation_is_one_step_in_chunks(tmp_path):
    """G=2 micro-batches of 4 step as one batch of 8 (K-SAM ranks all 8), with no forward
    larger than 4; the logged loss is the mean over the 8."""
    kwargs = {"rho": 0.05, "k": 0.25, "k_warmup": 0}
    whole, chunked = tiny_bert(), tiny_bert()
    sizes = count_forwards(chunked)
    a = KSAMTrainer(model=whole, args=training_args(tmp_path / "a", max_steps=2),
                    train_dataset=ToyText(), ksam_method="ksam", ksam_kwargs=kwargs)
    b = KSAMTrainer(model=chunked, args=training_args(
        tmp_path / "b", max_steps=2, per_device_train_batch_size=BATCH // 2,
        gradient_accumulation_steps=2), train_dataset=ToyText(), ksam_method="ksam",
        ksam_kwargs=kwargs)
    a.train()
    b.train()
    assert b.ksam.micro_batch_size == BATCH // 2 and b.ksam.steps == a.ksam.steps == 2
    assert sizes == [4, 4, 2, 2] * 2  # scoring in 2 chunks, then K=2 rows per pass
    for p, q in zip(whole.parameters(), chunked.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)
    la = [h["loss"] for h in a.state.log_history if "loss" in h]
    lb = [h["loss"] for h in b.state.log_history if "loss" in h]
    assert lb == pytest.approx(la, rel=1e-4)


def test_merge_batches_pads_like_a_collator():
    first = {"input_ids": torch.tensor([[5, 6, 7]]), "attention_mask": torch.tensor([[1, 1, 1]]),
             "labels": torch.tensor([[1, 2, 3]]), "flag": "x"}
    second = {"input_ids": torch.tensor([[8, 9], [4, 0]]),
              "attention_mask": torch.tensor([[1, 1], [1, 0]]),
              "labels": torch.tensor([[4, 5], [6, -100]]), "flag": "y"}
    out = merge_batches([first, second], pad_token_id=3)
    assert out["flag"] == "x"
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 9, 3], [4, 0, 3]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0], [1, 0, 0]]
    assert out["labels"].tolist() == [[1, 2, 3], [4, 5, -100], [6, -100, -100]]
    left = merge_batches([first, second], pad_token_id=3, padding_side="left")
    assert left["input_ids"].tolist() == [[5, 6, 7], [3, 8, 9], [3, 4, 0]]
    same = merge_batches([{"x": torch.ones(2, 3)}, {"x": torch.zeros(1, 3)}])
    assert same["x"].shape == (3, 3)


def test_fp16_engine_owns_the_grad_scaler(tmp_path):
    """fp16: the engine scales, unscales once (before the clip) and steps; accelerate's
    scaler is gone; the scale survives a checkpoint."""
    args = training_args(tmp_path, fp16=True, max_steps=2, max_grad_norm=1.0,
                         save_strategy="steps", save_steps=2)
    trainer = KSAMTrainer(model=tiny_bert(), args=args, train_dataset=ToyText(),
                          ksam_method="sam")
    assert trainer.accelerator.scaler is None and not trainer.accelerator.native_amp
    trainer.train()
    engine = trainer.ksam
    assert engine.grad_scaler is trainer.grad_scaler
    assert engine.autocast_dtype is torch.float16 and engine.max_grad_norm == 1.0
    assert engine.steps == 2 and engine.skipped_steps == 0
    result = trainer.last_step_result
    assert 0 < float(result.descent_grad_norm) < 1e3  # unscaled: not times the 2**16 scale
    saved = torch.load(tmp_path / "checkpoint-2" / "ksam_state.pt", weights_only=True)
    assert saved["grad_scaler"]["scale"] == trainer.grad_scaler.get_scale()


# ----------------------------------------------------------- example ids and logits
N = 16  # training-set size of the tests below: 2 steps an epoch at batch 8
MEMORY_METHODS = {  # name: options (each makes the step depend on the ids or the logits)
    "saf": {"lam": 0.5, "temperature": 2.0, "delay": 1, "start_epoch": 0},
    "mesa": {"lam": 0.5, "temperature": 2.0, "decay": 0.5},
    "ksam-memory": {"scores": "memory", "k": 0.25, "k_warmup": 0},
}


def method_of(name: str) -> str:
    return "ksam" if name == "ksam-memory" else name


def replay(batches, init, method: str, kwargs: dict, **engine_kw):
    """The plain engine over the batches a trainer recorded: the ids taken out of each
    batch into an IndexedBatch, the default loss with its logits."""
    ref = tiny_bert()
    ref.load_state_dict(init)
    opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)
    if method != "mesa":
        engine_kw["num_examples"] = N
    engine = ksam.create(method_of(method), ref, opt, seed=0, **kwargs, **engine_kw)
    loss = HFPerSampleLoss(return_logits=True)
    results = []
    for b in batches:
        features = {k: v for k, v in b.items() if k != INDEX_COLUMN}
        results.append(engine.step(ksam.IndexedBatch(features, b[INDEX_COLUMN]), loss))
    return ref, engine, results


def memory_trainer(tmp_path, method: str, model, dataset=None, engine_kw=None, **kw):
    """A RecordingTrainer of ``method`` over ``dataset`` (default: :class:`ToyText` of N
    with its ids), 6 steps; ``kw`` go to the TrainingArguments."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    args = dict(max_steps=6, lr_scheduler_type="constant", max_grad_norm=0.0)
    args.update(kw)
    return RecordingTrainer(
        model=model, args=training_args(tmp_path, **args),
        train_dataset=with_example_index(ToyText(N)) if dataset is None else dataset,
        optimizers=(opt, None), ksam_method=method_of(method),
        ksam_kwargs={**MEMORY_METHODS[method], **(engine_kw or {})})


@pytest.mark.parametrize("method", list(MEMORY_METHODS))
def test_memory_methods_match_the_plain_engine_on_the_same_batches(tmp_path, method):
    """SAF, MESA and K-SAM from memory through the Trainer: 3 shuffled epochs give, bit for
    bit, the plain engine's weights, losses and memory on the same ids and batches."""
    model = tiny_bert()
    init = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = memory_trainer(tmp_path, method, model)
    trainer.train()
    assert trainer.ksam.steps == 6 and len(trainer.batches) == 6

    # The ids are the examples' positions in train_dataset, in the sampler's shuffled order.
    text = ToyText(N)
    ids = torch.cat([b[INDEX_COLUMN] for b in trainer.batches])
    for b in trainer.batches:
        assert torch.equal(b["input_ids"], text.ids[b[INDEX_COLUMN]])
    assert sorted(ids[:N].tolist()) == list(range(N)) and ids[:N].tolist() != list(range(N))

    ref, engine, results = replay(trainer.batches, init, method, MEMORY_METHODS[method])
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert torch.equal(p, q), name
    assert [r.loss for r in trainer.results] == [r.loss for r in results]
    state, ref_state = trainer.ksam.state_dict(), engine.state_dict()
    state.pop("optimizer"), ref_state.pop("optimizer")
    assert_tree_equal(state, ref_state)  # the memory (SAF, K-SAM) or the average (MESA)
    if method != "mesa":
        assert trainer.ksam.plan.memory.num_examples == N  # the default: len(train_dataset)


def test_a_method_with_memory_refuses_batches_without_ids(tmp_path):
    model = tiny_bert()
    init = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = memory_trainer(tmp_path, "saf", model, dataset=ToyText(N))
    with pytest.raises(ValueError, match=f"column '{INDEX_COLUMN}'.*with_example_index"):
        trainer.train()
    for k, v in model.state_dict().items():
        assert torch.equal(v, init[k]), k
    # A method that reads no ids runs on the same dataset; the logits only where needed.
    plain = KSAMTrainer(model=tiny_bert(), args=training_args(tmp_path), train_dataset=ToyText(N),
                        ksam_method="ksam")
    assert not plain.needs_example_ids and not plain.per_sample_loss_fn.return_logits
    assert memory_trainer(tmp_path, "mesa", tiny_bert()).per_sample_loss_fn.return_logits


def test_the_index_column_survives_remove_unused_columns_and_evaluation(tmp_path):
    class Extra(ToyText):  # a key the model does not take, which the Trainer removes
        def __getitem__(self, i):
            return {**super().__getitem__(i), "source": torch.tensor(i)}

    trainer = memory_trainer(tmp_path, "saf", tiny_bert(), dataset=with_example_index(Extra(N)),
                             max_steps=2)
    assert trainer.args.remove_unused_columns
    trainer.train()
    assert all(set(b) == {"input_ids", "attention_mask", "labels", INDEX_COLUMN}
               for b in trainer.batches)
    # Evaluation drops the ids before the model's forward.
    metrics = trainer.evaluate(eval_dataset=with_example_index(ToyText(N)))
    assert metrics["eval_loss"] > 0


def test_with_example_index_on_a_datasets_dataset(tmp_path):
    datasets = pytest.importorskip("datasets")
    text = ToyText(N)
    raw = datasets.Dataset.from_dict({"input_ids": text.ids.tolist(),
                                      "attention_mask": text.mask.tolist(),
                                      "labels": text.labels.tolist(),
                                      "sentence": [f"s{i}" for i in range(N)]})
    with pytest.raises(ValueError, match=f"column '{INDEX_COLUMN}'"):  # at construction
        memory_trainer(tmp_path, "saf", tiny_bert(), dataset=raw)
    ds = with_example_index(raw)
    assert [int(i) for i in ds[INDEX_COLUMN]] == list(range(N))
    ds = ds.with_format("torch")
    with pytest.raises(ValueError, match="already has"):
        with_example_index(ds)
    trainer = memory_trainer(tmp_path, "saf", tiny_bert(), dataset=ds, max_steps=2)
    kept = trainer._remove_unused_columns(ds)
    assert set(kept.column_names) == {"input_ids", "attention_mask", "labels", INDEX_COLUMN}
    trainer.train()
    assert trainer.ksam.steps == 2
    for b in trainer.batches:
        assert torch.equal(b["input_ids"], text.ids[b[INDEX_COLUMN]])


def test_gradient_accumulation_merges_the_ids(tmp_path):
    """SAF with G=2 micro-batches of 4 equals, bit for bit, SAF on the batches of 8 with
    forwards in chunks of 4; each step's memory rows are those of all 8 ids."""
    init = {k: v.clone() for k, v in tiny_bert().state_dict().items()}
    one = memory_trainer(tmp_path / "a", "saf", tiny_bert(),
                         engine_kw={"micro_batch_size": BATCH // 2})
    two = memory_trainer(tmp_path / "b", "saf", tiny_bert(), gradient_accumulation_steps=2,
                         per_device_train_batch_size=BATCH // 2)
    one.train()
    two.train()
    assert two.ksam.steps == one.ksam.steps == 6 and two.ksam.micro_batch_size == BATCH // 2
    merged = [torch.cat([a[INDEX_COLUMN], b[INDEX_COLUMN]])
              for a, b in zip(two.batches[::2], two.batches[1::2])]
    assert [m.tolist() for m in merged] == [b[INDEX_COLUMN].tolist() for b in one.batches]
    for p, q in zip(one.model.parameters(), two.model.parameters()):
        assert torch.equal(p, q)
    assert_tree_equal(one.ksam.plan.memory.tables, two.ksam.plan.memory.tables)
    assert torch.equal(two.ksam.plan.memory.tables["visits"][:N], torch.full((N,), 3))
    ref, _, _ = replay(one.batches, init, "saf", MEMORY_METHODS["saf"],
                       micro_batch_size=BATCH // 2)
    for p, q in zip(two.model.parameters(), ref.parameters()):
        assert torch.equal(p, q)


def test_the_default_loss_returns_logits_for_sequence_level_models_only():
    model = tiny_bert()
    batch = {"input_ids": ToyText(4).ids, "labels": torch.tensor([0, 1, 1, 0])}
    out = HFPerSampleLoss(return_logits=True)(model, batch)
    assert isinstance(out, ksam.LossOutput) and out.logits.shape == (4, 2)
    assert torch.equal(out.losses, HFPerSampleLoss()(model, batch))
    token = tiny_bert(num_labels=3, cls=BertForTokenClassification)
    with pytest.raises(ValueError, match="token-level"):
        HFPerSampleLoss(return_logits=True)(token, {"input_ids": ToyText(4).ids,
                                                   "labels": torch.zeros(4, SEQ).long()})
