r"""A text-classification task (GLUE SST-2/MRPC shape), offline by default.

**Synthetic sentiment** (the default, generated locally and deterministically from
``data_seed``): each example is ``[CLS] w_1 ... w_L [PAD]...`` over a small vocabulary of
neutral, positive, negative and negation words. It holds 1, 3 or 5 sentiment words; a
negation word right before one flips its polarity, and negation words also appear before
neutral words, where they do nothing. The label is 1 iff the signed sum of polarities is
positive (an odd number of +-1 terms: never a tie). Most examples are decided by counting
words; the negated ones need word order (two examples with the same bag of words can have
different labels). Label noise comes from :func:`ksam.lab.tasks.get_task`'s ``label_noise``.

Why these rates (``negation=0.1``, ``distractor=0.05``): with the CLI's momentum SGD the
transformer learns the counting part in an epoch or two (about 88% test accuracy after 8
epochs with the defaults, SGD or SAM) and the order part slowly; at higher negation rates
(0.35) it stays on the bag-of-words plateau (about 62%) for at least as many epochs, with
SGD or Adam (a CPU observation, not a benchmark).

Token ids ``[N, T]`` int64, padding id 0, first token ``[CLS]`` (id 1); the model
(:class:`TextTransformer`, plain torch: 2 pre-LN encoder layers, d=64, pooled first token)
builds its own attention mask from the padding, so the task's batches are ``(ids, labels)``
like every other task's.

**Hugging Face** (``hf_model`` / ``hf_dataset``; needs ``transformers`` and, for a data set,
``datasets``, and a machine that is online or has them cached): ``hf_dataset`` (with
``hf_config``, e.g. ``"nyu-mll/glue"``, ``"sst2"``) is tokenized with ``hf_model``'s
tokenizer, padded to ``max_length``; the test split is ``validation`` (GLUE's test labels are
hidden). The model is ``AutoModelForSequenceClassification.from_pretrained(hf_model)`` behind
:class:`HFTextClassifier`, which masks the tokenizer's padding id. ``hf_model`` alone trains
that model on the synthetic data (a smoke test: the ids are not its vocabulary).

Registered by :mod:`ksam.lab.tasks` with ``register_task(name, TEXT_TASK_DESCRIPTION,
options=TEXT_TASK_OPTIONS)(make_text_task)``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .base import TaskData
from .data import MissingDependencyError, RawSplits

__all__ = [
    "CLS_ID",
    "HFTextClassifier",
    "PAD_ID",
    "TEXT_HF_DEFAULTS",
    "TEXT_TASK_DEFAULTS",
    "TEXT_TASK_DESCRIPTION",
    "TEXT_TASK_OPTIONS",
    "TextTransformer",
    "make_sentiment_data",
    "make_text_task",
    "sentiment_labels",
]

PAD_ID, CLS_ID = 0, 1
NEGATORS = (2, 3)
NUM_POLAR = 5  # positive words 4..8, negative words 9..13, neutral words 14..vocab-1
FIRST_POS = 4
FIRST_NEG = FIRST_POS + NUM_POLAR
FIRST_NEUTRAL = FIRST_NEG + NUM_POLAR
MIN_VOCAB = FIRST_NEUTRAL + 8

TEXT_TASK_OPTIONS: dict[str, Any] = {
    "num_train": 4000,
    "num_test": 1000,
    "seq_len": 24,
    "vocab_size": 48,
    "negation": 0.1,
    "distractor": 0.05,
    "data_seed": 42,
    "hf_model": None,
    "hf_dataset": None,
    "hf_config": None,
    "max_length": 128,
}
#: The training defaults of the synthetic data, and what a Hugging Face data set changes.
TEXT_TASK_DEFAULTS: dict[str, Any] = {"epochs": 15, "batch_size": 64, "lr": 0.05,
                                      "momentum": 0.9, "weight_decay": 5e-4}
TEXT_HF_DEFAULTS: dict[str, Any] = {"epochs": 3, "batch_size": 32, "lr": 2e-3}
TEXT_TASK_DESCRIPTION = (
    "text classification, SST-2 shape: synthetic sentiment with negation (offline, "
    "2-layer transformer), or a Hugging Face model/data set via hf_model/hf_dataset"
)

# GLUE-style column names of the text inputs, single sentences last.
_TEXT_FIELDS: tuple[tuple[str, ...], ...] = (
    ("sentence1", "sentence2"), ("question1", "question2"), ("question", "sentence"),
    ("premise", "hypothesis"), ("sentence",), ("text",),
)


# --------------------------------------------------------------------------- synthetic data


def sentiment_labels(ids: np.ndarray) -> np.ndarray:
    """The rule that labels the synthetic data: 1 iff the sum of polarities, each flipped
    by a negation word right before it, is positive. ``ids`` is ``[N, T]``."""
    ids = np.asarray(ids)
    polarity = np.where((ids >= FIRST_POS) & (ids < FIRST_NEG), 1,
                        np.where((ids >= FIRST_NEG) & (ids < FIRST_NEUTRAL), -1, 0))
    negated = np.zeros_like(ids, dtype=bool)
    negated[:, 1:] = np.isin(ids[:, :-1], NEGATORS)
    score = np.where(negated, -polarity, polarity).sum(1)
    return (score > 0).astype(np.int64)


def make_sentiment_data(n: int, seq_len: int = 24, vocab_size: int = 48, seed: int = 42,
                        split: str = "train", negation: float = 0.1,
                        distractor: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """``n`` synthetic examples: token ids ``[n, seq_len]`` int64 and labels ``[n]`` int64.

    Deterministic in ``seed``; ``split`` ("train" or "test") picks an independent stream, so
    the test set does not change with the number of training examples. Each example:
    ``[CLS]``, then units in random order - 1, 3 or 5 sentiment words, each negated with
    probability ``negation``, and neutral words, each preceded by a (harmless) negation
    with probability ``distractor`` - then padding; its length is uniform in
    ``[seq_len // 2, seq_len]``.
    """
    if seq_len < 12:
        raise ValueError(f"seq_len must be >= 12, got {seq_len}")
    if vocab_size < MIN_VOCAB:
        raise ValueError(f"vocab_size must be >= {MIN_VOCAB}, got {vocab_size}")
    if n < 1:
        raise ValueError(f"need at least one example, got n={n}")
    for name, p in (("negation", negation), ("distractor", distractor)):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"{name} must be a probability in [0, 1], got {p!r}")
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    rng = np.random.default_rng(np.random.SeedSequence([seed, 7, split == "test"]))
    ids = np.full((n, seq_len), PAD_ID, dtype=np.int64)
    ids[:, 0] = CLS_ID
    for i in range(n):
        budget = int(rng.integers(seq_len // 2, seq_len + 1)) - 1  # tokens after [CLS]
        units: list[list[int]] = []
        for _ in range(int(rng.choice((1, 3, 5)))):
            first = FIRST_POS if rng.random() < 0.5 else FIRST_NEG
            word = int(rng.integers(first, first + NUM_POLAR))
            units.append([int(rng.choice(NEGATORS)), word] if rng.random() < negation else [word])
        used = sum(len(u) for u in units)
        while used < budget:
            word = int(rng.integers(FIRST_NEUTRAL, vocab_size))
            unit = [int(rng.choice(NEGATORS)), word] \
                if rng.random() < distractor and used + 2 <= budget else [word]
            units.append(unit)
            used += len(unit)
        order = rng.permutation(len(units))
        tokens = [t for j in order for t in units[j]][: seq_len - 1]
        ids[i, 1:1 + len(tokens)] = tokens
    return ids, sentiment_labels(ids)


# --------------------------------------------------------------------------- models


class TextTransformer(nn.Module):
    """Small transformer encoder classifier in plain torch: token + learned position
    embeddings, pre-LN ``nn.TransformerEncoder``, the first token's state to a linear head.

    Takes token ids ``[n, T]`` and masks ``pad_id`` itself. Float ids (a loader that made
    every input float) are rounded back to integers.

    Token and position embeddings start N(0, ``init_std``=1): with BERT's 0.02 the model sits
    on a plateau for epochs under momentum SGD, and SAM with rho=0.05 (a perturbation that
    large next to such small embeddings) never leaves it; at 1.0 SGD, SAM and K-SAM all learn
    from the first epoch (the pre-LN layers normalize the scale anyway).
    """

    def __init__(self, vocab_size: int, num_classes: int, max_len: int, d_model: int = 64,
                 nhead: int = 4, num_layers: int = 2, dim_feedforward: int = 128,
                 dropout: float = 0.1, pad_id: int = PAD_ID, init_std: float = 1.0) -> None:
        super().__init__()
        self.pad_id = pad_id
        self.max_len = max_len
        self.embed = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Parameter(torch.randn(1, max_len, d_model) * init_std)
        layer = nn.TransformerEncoderLayer(d_model, nhead, dim_feedforward, dropout,
                                           activation="gelu", batch_first=True,
                                           norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, num_classes)
        nn.init.normal_(self.embed.weight, std=init_std)

    def forward(self, ids: Tensor) -> Tensor:
        if ids.is_floating_point():
            ids = ids.round().long()
        if ids.shape[1] > self.max_len:
            raise ValueError(f"sequences of {ids.shape[1]} tokens exceed max_len={self.max_len}")
        h = self.embed(ids) + self.pos[:, : ids.shape[1]]
        h = self.encoder(h, src_key_padding_mask=ids == self.pad_id)
        return self.head(self.norm(h[:, 0]))


class HFTextClassifier(nn.Module):
    """A Hugging Face sequence classifier as a ``model(ids) -> logits`` module: builds the
    attention mask from ``pad_id`` (so the task's batches stay ``(ids, labels)``)."""

    def __init__(self, model: nn.Module, pad_id: int) -> None:
        super().__init__()
        self.model = model
        self.pad_id = int(pad_id)

    def forward(self, ids: Tensor) -> Tensor:
        if ids.is_floating_point():
            ids = ids.round().long()
        return self.model(input_ids=ids, attention_mask=(ids != self.pad_id).long()).logits


class _TextModelFactory:
    """Picklable ``make_model`` for :class:`TextTransformer`, with a readable repr."""

    def __init__(self, vocab_size: int, num_classes: int, max_len: int) -> None:
        self.vocab_size, self.num_classes, self.max_len = vocab_size, num_classes, max_len

    def __call__(self) -> nn.Module:
        return TextTransformer(self.vocab_size, self.num_classes, self.max_len)

    def __repr__(self) -> str:
        return (f"TextTransformer(vocab_size={self.vocab_size}, num_classes={self.num_classes}"
                f", max_len={self.max_len}, d_model=64, layers=2)")


class _HFModelFactory:
    """Picklable ``make_model`` loading ``AutoModelForSequenceClassification`` each call
    (from the local cache after the first)."""

    def __init__(self, name: str, num_classes: int, pad_id: int) -> None:
        self.name, self.num_classes, self.pad_id = name, num_classes, pad_id

    def __call__(self) -> nn.Module:
        transformers = _import("transformers", "hf_model")
        try:
            model = transformers.AutoModelForSequenceClassification.from_pretrained(
                self.name, num_labels=self.num_classes)
        except Exception as err:
            raise _unavailable("model", self.name, err) from err
        if getattr(model.config, "pad_token_id", None) is None:
            model.config.pad_token_id = self.pad_id  # e.g. GPT-2: find the last real token
        return HFTextClassifier(model, self.pad_id)

    def __repr__(self) -> str:
        return f"AutoModelForSequenceClassification({self.name!r}, num_labels={self.num_classes})"


# --------------------------------------------------------------------------- Hugging Face


def _import(module: str, option: str) -> Any:
    try:
        return __import__(module)
    except ImportError:
        raise MissingDependencyError(
            f"the text task's {option} option needs the {module!r} package: "
            f"pip install {module}" + (" (or ksam[transformers])" if module == "transformers"
                                       else "")
        ) from None


def _unavailable(what: str, name: str, err: Exception) -> RuntimeError:
    return RuntimeError(
        f"could not load Hugging Face {what} {name!r}: {type(err).__name__}: {err}. "
        "It must be in the local Hugging Face cache or the machine must be online "
        "(HF_HUB_OFFLINE=1 forbids downloads)"
    )


def _text_fields(columns: Sequence[str]) -> tuple[str, ...]:
    for fields in _TEXT_FIELDS:
        if all(f in columns for f in fields):
            return fields
    raise ValueError(f"cannot tell the text columns of the data set (columns: "
                     f"{', '.join(columns)}); expected one of {_TEXT_FIELDS}")


def _load_hf_dataset(name: str, config: str | None, tokenizer_name: str, max_length: int,
                     need_test: bool) -> tuple[RawSplits, int, int]:
    """Tokenized splits, number of classes, padding id."""
    datasets = _import("datasets", "hf_dataset")
    transformers = _import("transformers", "hf_model")
    try:
        ds = datasets.load_dataset(name, config)
    except Exception as err:
        raise _unavailable("data set", name if config is None else f"{name}/{config}",
                           err) from err
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_name)
    except Exception as err:
        raise _unavailable("tokenizer", tokenizer_name, err) from err
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    splits = list(ds.keys())
    if "train" not in splits:
        raise ValueError(f"data set {name!r} has no 'train' split (splits: {splits})")
    test_split = "validation" if "validation" in splits else "test"
    if need_test and test_split not in splits:
        raise ValueError(f"data set {name!r} has no 'validation' or 'test' split")
    fields = _text_fields(ds["train"].column_names)

    def encode(split: str) -> tuple[np.ndarray, np.ndarray]:
        part = ds[split]
        enc = tokenizer(*[list(part[f]) for f in fields], truncation=True,
                        padding="max_length", max_length=max_length)
        labels = np.asarray(part["label"], dtype=np.int64)
        if (labels < 0).any():
            raise ValueError(f"split {split!r} of {name!r} has hidden labels (< 0)")
        return np.asarray(enc["input_ids"], dtype=np.int64), labels

    train_x, train_y = encode("train")
    test_x, test_y = encode(test_split) if need_test else (None, None)
    features = getattr(ds["train"], "features", None)
    label_feature = features.get("label") if isinstance(features, dict) else None
    num_classes = int(getattr(label_feature, "num_classes", 0) or train_y.max() + 1)
    return RawSplits(train_x, train_y, test_x, test_y), num_classes, int(tokenizer.pad_token_id)


# --------------------------------------------------------------------------- the builder


def _positive_int(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"text task {name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def make_text_task(
    data_dir: str | os.PathLike[str] | None = None,
    need_test: bool = True,
    *,
    num_train: int = TEXT_TASK_OPTIONS["num_train"],
    num_test: int = TEXT_TASK_OPTIONS["num_test"],
    seq_len: int = TEXT_TASK_OPTIONS["seq_len"],
    vocab_size: int = TEXT_TASK_OPTIONS["vocab_size"],
    negation: float = TEXT_TASK_OPTIONS["negation"],
    distractor: float = TEXT_TASK_OPTIONS["distractor"],
    data_seed: int = TEXT_TASK_OPTIONS["data_seed"],
    hf_model: str | None = None,
    hf_dataset: str | None = None,
    hf_config: str | None = None,
    max_length: int = TEXT_TASK_OPTIONS["max_length"],
) -> Any:
    """Builder of the text task for :func:`ksam.lab.tasks.register_task`: returns a
    ``TaskData`` of token ids ``[N, T]`` (int64, padding 0) and int64 labels.

    ``data_dir`` is unused (generated, or the Hugging Face cache); ``need_test=False`` skips
    the test split. See the module docstring for the options.
    """
    del data_dir
    defaults = dict(TEXT_TASK_DEFAULTS)
    if hf_dataset is not None:
        if hf_model is None:
            raise ValueError("hf_dataset needs hf_model too (its tokenizer makes the ids)")
        max_length = _positive_int("max_length", max_length, 2)
        splits, num_classes, pad_id = _load_hf_dataset(hf_dataset, hf_config, hf_model,
                                                       max_length, need_test)
        return TaskData(
            splits=splits, num_classes=num_classes,
            make_model=_HFModelFactory(hf_model, num_classes, pad_id),
            defaults={**defaults, **TEXT_HF_DEFAULTS},
            description=f"{hf_dataset}{'/' + hf_config if hf_config else ''} "
                        f"({len(splits.train_y)} train), {hf_model}, max_length {max_length}",
        )

    num_train = _positive_int("num_train", num_train)
    num_test = _positive_int("num_test", num_test)
    seq_len = _positive_int("seq_len", seq_len, 12)
    vocab_size = _positive_int("vocab_size", vocab_size, MIN_VOCAB)
    data_seed = _positive_int("data_seed", data_seed, 0)
    rates = {"negation": float(negation), "distractor": float(distractor)}
    splits = RawSplits(*make_sentiment_data(num_train, seq_len, vocab_size, data_seed, **rates))
    if need_test:
        splits.test_x, splits.test_y = make_sentiment_data(num_test, seq_len, vocab_size,
                                                           data_seed, split="test", **rates)
    make_model: Any = _TextModelFactory(vocab_size, 2, seq_len)
    if hf_model is not None:
        make_model = _HFModelFactory(hf_model, 2, PAD_ID)
    return TaskData(
        splits=splits, num_classes=2, make_model=make_model, defaults=defaults,
        description=f"synthetic sentiment with negation ({num_train} train, {seq_len} tokens, "
                    f"vocab {vocab_size}), {make_model!r}",
    )
