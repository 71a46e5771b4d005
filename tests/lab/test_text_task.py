"""The text-classification task: synthetic sentiment data, the plain-torch transformer, the
Hugging Face path (offline: a tiny local model and tokenizer, a stand-in ``datasets``)."""

from __future__ import annotations

import sys
import types
from collections.abc import Iterator

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import ksam
from ksam.lab.tasks import TASKS, TaskData, get_task, per_sample_cross_entropy, register_task
from ksam.lab.tasks.text import (
    CLS_ID,
    FIRST_NEG,
    FIRST_NEUTRAL,
    FIRST_POS,
    NEGATORS,
    PAD_ID,
    TEXT_TASK_DESCRIPTION,
    TEXT_TASK_OPTIONS,
    HFTextClassifier,
    TextTransformer,
    make_sentiment_data,
    make_text_task,
    sentiment_labels,
)

POS, NEG, NOT, NEUTRAL = FIRST_POS, FIRST_NEG, NEGATORS[0], FIRST_NEUTRAL


def test_data_is_deterministic_and_well_formed():
    ids, y = make_sentiment_data(300, seq_len=24, seed=5)
    ids2, y2 = make_sentiment_data(300, seq_len=24, seed=5)
    assert np.array_equal(ids, ids2) and np.array_equal(y, y2)
    assert not np.array_equal(ids, make_sentiment_data(300, seq_len=24, seed=6)[0])
    assert not np.array_equal(ids, make_sentiment_data(300, seq_len=24, seed=5,
                                                       split="test")[0])
    assert ids.dtype == np.int64 and y.dtype == np.int64 and ids.shape == (300, 24)
    assert (ids[:, 0] == CLS_ID).all() and ids.min() >= 0 and ids.max() < 64
    real = ids != PAD_ID
    assert (real[:, :-1] >= real[:, 1:]).all()  # padding only at the end
    assert real.sum(1).min() >= 12
    assert 0.35 < y.mean() < 0.65
    assert np.array_equal(y, sentiment_labels(ids))
    n_sentiment = ((ids >= FIRST_POS) & (ids < FIRST_NEUTRAL)).sum(1)
    assert set(np.unique(n_sentiment)) <= {1, 3, 5}  # odd: the score is never 0
    assert np.isin(ids, NEGATORS).any(1).mean() > 0.5  # negations are common


def test_label_rule_needs_word_order():
    ids = np.array([
        [CLS_ID, POS, PAD_ID, PAD_ID, PAD_ID],
        [CLS_ID, NOT, POS, PAD_ID, PAD_ID],
        [CLS_ID, NOT, NEUTRAL, POS, PAD_ID],  # a negation before a neutral word does nothing
        [CLS_ID, NOT, POS, NEG, PAD_ID],      # -1 - 1
        [CLS_ID, POS, NOT, NEG, PAD_ID],      # +1 + 1: same bag of words, other label
    ])
    assert sentiment_labels(ids).tolist() == [1, 0, 1, 0, 1]


def test_make_text_task_builds_task_data():
    td = make_text_task(None, True, num_train=50, num_test=20, seq_len=16)
    assert isinstance(td, TaskData) and td.num_classes == 2
    assert td.splits.train_x.shape == (50, 16) and td.splits.test_x.shape == (20, 16)
    assert td.splits.train_x.dtype == np.int64
    assert {"epochs", "batch_size", "lr", "momentum", "weight_decay"} <= set(td.defaults)
    assert make_text_task(None, False, num_train=50).splits.test_x is None
    assert set(TEXT_TASK_OPTIONS) >= {"num_train", "seq_len", "hf_model", "hf_dataset"}
    model = td.make_model()
    assert isinstance(model, TextTransformer) and "TextTransformer" in repr(td.make_model)
    with pytest.raises(ValueError, match="seq_len"):
        make_text_task(None, True, seq_len=4)
    with pytest.raises(ValueError, match="hf_model"):
        make_text_task(None, True, hf_dataset="glue")


def test_model_masks_padding_and_accepts_float_ids():
    torch.manual_seed(0)
    model = TextTransformer(64, 2, max_len=32).eval()
    ids = torch.from_numpy(make_sentiment_data(6, seq_len=16, seed=1)[0])
    padded = torch.cat([ids, torch.zeros(6, 16, dtype=torch.long)], 1)
    with torch.no_grad():
        out = model(ids)
        assert out.shape == (6, 2)
        torch.testing.assert_close(model(padded), out, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model(ids.float()), out)
    with pytest.raises(ValueError, match="max_len"):
        model(torch.ones(1, 40, dtype=torch.long))


@pytest.fixture
def text_task_name() -> Iterator[str]:
    """The registered name of the text task; registered here (and removed after) if
    ksam.tasks does not register it yet."""
    for name, spec in TASKS.items():
        if spec.build is make_text_task:
            yield name
            return
    name = "_text_under_test"
    register_task(name, TEXT_TASK_DESCRIPTION, options=TEXT_TASK_OPTIONS)(make_text_task)
    try:
        yield name
    finally:
        TASKS.pop(name, None)


def test_get_task_and_ksam_steps(text_task_name):
    task = get_task(text_task_name, device="cpu", seed=0, label_noise=0.1, num_train=200,
                    num_test=50, seq_len=16)
    assert task.train_x.shape == (200, 16) and task.num_classes == 2
    assert task.noisy_mask is not None and int(task.noisy_mask.sum()) == 20
    assert torch.equal(task.train_x.long().float(), task.train_x.float())  # ids stay exact
    batch = (task.train_x[:32], task.train_y[:32])
    torch.manual_seed(0)
    model = task.make_model()
    engine = ksam.create("ksam", model, torch.optim.SGD(model.parameters(), lr=0.05),
                         rho=0.05, k=0.25, k_warmup=0, seed=0)
    assert engine.step(batch, per_sample_cross_entropy).descent_indices.numel() == 8
    # The model learns (here: fits one batch) through the engine.
    torch.manual_seed(0)
    model = task.make_model()
    engine = ksam.create("sam", model, torch.optim.Adam(model.parameters(), lr=3e-3), seed=0)
    losses = [engine.step(batch, per_sample_cross_entropy).loss for _ in range(15)]
    assert losses[-1] < 0.85 * losses[0]


# --------------------------------------------------------------------------- Hugging Face


@pytest.fixture
def hf_dir(tmp_path):
    """A tiny random BERT and a word-level tokenizer saved locally (nothing downloaded)."""
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    words = ["good", "bad", "movie", "not", "very", "plot", "a", "the"]
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *words])}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.post_processor = tokenizers.processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
        sep_token="[SEP]")
    fast.save_pretrained(tmp_path)
    config = transformers.BertConfig(vocab_size=len(vocab), hidden_size=32,
                                     num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=64)
    transformers.BertForSequenceClassification(config).save_pretrained(tmp_path)
    return str(tmp_path)


class _Split:
    """Enough of a ``datasets.Dataset``: columns by name, ``column_names``."""

    def __init__(self, **columns) -> None:
        self.columns = columns
        self.column_names = list(columns)

    def __getitem__(self, key):
        return self.columns[key]


def _fake_datasets(pair: bool) -> types.ModuleType:
    def load_dataset(name, config=None):
        assert (name, config) == ("glue", "mrpc" if pair else "sst2")
        text = {"sentence1": ["a good movie", "bad plot", "not very good"],
                "sentence2": ["the movie", "a plot", "good"]} if pair else \
            {"sentence": ["a good movie", "bad plot", "not very good"]}
        return {"train": _Split(**text, label=[1, 0, 0]),
                "validation": _Split(**text, label=[1, 1, 0]),
                "test": _Split(**text, label=[-1, -1, -1])}

    module = types.ModuleType("datasets")
    module.load_dataset = load_dataset
    return module


@pytest.mark.parametrize("pair", [False, True])
def test_hf_dataset_and_model(hf_dir, monkeypatch, pair):
    monkeypatch.setitem(sys.modules, "datasets", _fake_datasets(pair))
    td = make_text_task(None, True, hf_model=hf_dir, hf_dataset="glue",
                        hf_config="mrpc" if pair else "sst2", max_length=12)
    x, y = td.splits.train_x, td.splits.train_y
    assert x.shape == (3, 12) and x.dtype == np.int64 and y.tolist() == [1, 0, 0]
    assert td.splits.test_y.tolist() == [1, 1, 0]  # validation, not the hidden test labels
    assert (x[:, 0] == 2).all() and (x[1, -1] == 0)  # [CLS] first, padded with [PAD]=0
    if pair:
        assert ((x == 3).sum(1) == 2).all()  # [SEP] between and after the two sentences
    model = td.make_model()
    assert isinstance(model, HFTextClassifier) and model.pad_id == 0
    logits = model(torch.from_numpy(x))
    assert logits.shape == (3, 2)
    # The mask hides padding: the same logits with or without the trailing padding.
    assert (x[:, 8:] == 0).all()
    model.eval()
    with torch.no_grad():
        full = model(torch.from_numpy(x))
        torch.testing.assert_close(model(torch.from_numpy(x[:, :8])), full, atol=1e-5,
                                   rtol=1e-5)
        loss = F.cross_entropy(full, torch.from_numpy(y))
    assert torch.isfinite(loss)


def test_hf_model_on_synthetic_data(hf_dir):
    td = make_text_task(None, True, num_train=8, num_test=4, seq_len=12, hf_model=hf_dir)
    model = td.make_model()
    ids = torch.from_numpy(td.splits.train_x) % 12  # the tiny vocabulary
    assert model(ids).shape == (8, 2)


def test_hf_errors_are_clear(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "datasets", None)  # not installed
    with pytest.raises(ImportError, match="pip install datasets"):
        make_text_task(None, True, hf_model="x", hf_dataset="glue", hf_config="sst2")
    pytest.importorskip("transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    td = make_text_task(None, True, num_train=8, num_test=4,
                        hf_model=str(tmp_path / "no-such-model"))
    with pytest.raises(RuntimeError, match="could not load Hugging Face model"):
        td.make_model()
