"""``ksam bench``: the table of step peak memory (``--memory``, micro-batched rows
included), and steps timed on a data set's training examples (``--inputs data``)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import write_idx

from ksam.lab.bench import Case, cases, with_data_inputs
from ksam.lab.cli import main
from ksam.lab.tasks import get_task


def test_bench_memory_table(tmp_path, capsys):
    path = tmp_path / "mem.json"
    assert main(["bench", "--memory", "--quick", "--device", "cpu", "--cases",
                 "mnist1d-cnn-b128", "--memory-chunk", "4", "--json", str(path)]) == 0
    rows = json.loads(path.read_text())
    assert [(r["method"], r["batch"], r["micro_batch_size"]) for r in rows] == [
        ("sgd", 32, None), ("sam", 32, None), ("sam, micro-batch 4", 32, 4),
        ("ksam K=B/8", 32, None), ("ksam K=B/8, micro-batch 4", 32, 4)]
    sam = rows[1]
    assert sam["ratio_to_sam"] == 1.0 or sam["step_peak_mib"] <= 0
    assert "| mnist1d-cnn-b128 | ksam K=B/8, micro-batch 4 | 32 |" in capsys.readouterr().out
    assert main(["bench", "--memory", "--memory-chunk", "0"]) == 2
    assert "--memory-chunk must be >= 1" in capsys.readouterr().err


@pytest.fixture
def small_fashion(tmp_path):
    """Fashion-MNIST files with 160 training and 16 test images (random pixels)."""
    folder = tmp_path / "fashion"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", 160), ("t10k", 16)):
        write_idx(folder / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)),
                  2051)
        write_idx(folder / f"{split}-labels-idx1-ubyte.gz", rng.integers(0, 10, n), 2049)
    return folder


def _cpu_case(name):
    return next(c for c in cases(True, torch.device("cpu")) if c.name == name)


def test_data_inputs_are_the_first_training_examples(small_fashion):
    case = with_data_inputs(_cpu_case("fashion-cnn-b128"), str(small_fashion))
    x, y = case.make_batch(case.batch_size, torch.device("cpu"))
    task = get_task("fashion-mnist", data_dir=small_fashion)
    assert torch.equal(x, task.train_x[:128]) and torch.equal(y, task.train_y[:128])
    signals = with_data_inputs(_cpu_case("mnist1d-cnn-b128"), None)
    x, y = signals.make_batch(128, torch.device("cpu"))
    task = get_task("mnist1d")
    assert torch.equal(x, task.train_x[:128]) and torch.equal(y, task.train_y[:128])


def test_bench_times_steps_on_training_examples(small_fashion, tmp_path, capsys):
    path = tmp_path / "bench.json"
    assert main(["bench", "--quick", "--device", "cpu", "--steps", "2", "--warmup", "1",
                 "--cases", "fashion-cnn-b128", "--methods", "ksam", "--inputs", "data",
                 "--data-dir", str(small_fashion), "--json", str(path)]) == 0
    rows = json.loads(path.read_text())
    assert [r["method"] for r in rows] == ["sgd", "ksam K=B/2", "ksam K=B/4", "ksam K=B/8"]
    out = capsys.readouterr().out
    assert "steps after 1 warm-up, training examples" in out
    assert "| fashion-cnn-b128 | fp32 | eager | ksam K=B/4 |" in out


def test_data_inputs_refuse_a_case_without_its_data(tmp_path, small_fashion):
    with pytest.raises(ValueError, match="case bert has no data set"):
        with_data_inputs(Case("bert", torch.nn.Identity, lambda b, d: None, 8), None)
    few = tmp_path / "few"
    few.mkdir()
    for split, n in (("train", 100), ("t10k", 4)):
        write_idx(few / f"{split}-images-idx3-ubyte.gz", np.zeros((n, 28, 28)), 2051)
        write_idx(few / f"{split}-labels-idx1-ubyte.gz", np.zeros(n), 2049)
    with pytest.raises(ValueError, match="100 training examples, fewer than case "
                                         "fashion-cnn-b128's batch of 128"):
        with_data_inputs(_cpu_case("fashion-cnn-b128"), str(few))


def test_data_inputs_name_bench_s_way_to_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="CIFAR-10 not found: .* ksam bench never "
                                                "downloads .* point --data-dir at the files"):
        with_data_inputs(next(c for c in cases(False, torch.device("cpu"))
                              if c.task == "cifar10"), str(tmp_path))


@pytest.mark.parametrize("argv,needle", [
    (["--inputs", "data", "--data-dir", "EMPTY"], "Fashion-MNIST"),
    (["--inputs", "data", "--memory"], "--memory measures peak memory"),
    (["--data-dir", "EMPTY"], "--data-dir is read with --inputs data only"),
])
def test_bench_input_errors_come_before_any_row(argv, needle, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    path = tmp_path / "bench.json"
    argv = [str(empty) if a == "EMPTY" else a for a in argv]
    assert main(["bench", "--quick", "--device", "cpu", "--cases", "fashion-cnn-b128",
                 "--json", str(path), *argv]) == 2
    captured = capsys.readouterr()
    assert needle in captured.err and captured.out == "" and not path.exists()
