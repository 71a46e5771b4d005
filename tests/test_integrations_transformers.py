"""KSAMTrainer: ksam steps inside a Hugging Face Trainer loop (tiny random BERT, offline)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

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
    HFPerSampleLoss,
    KSAMTrainer,
    per_sample_loss,
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
    with pytest.raises(ValueError, match="gradient_accumulation_steps"):
        KSAMTrainer(model=tiny_bert(), args=training_args(tmp_path,
                                                          gradient_accumulation_steps=2))
    args = training_args(tmp_path)
    args.fp16 = True  # TrainingArguments itself may refuse fp16 on a CPU-only machine
    with pytest.raises(ValueError, match="fp16"):
        KSAMTrainer(model=tiny_bert(), args=args)
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
