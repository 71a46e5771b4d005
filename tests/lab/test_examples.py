"""The worked example, examples/digits_task.py: a task of the user's own on scikit-learn's
bundled digits, run as the README and docs/guide/compare.md say."""

from __future__ import annotations

import json
from pathlib import Path

from ksam.lab.cli import main
from ksam.lab.tasks import get_task

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "digits_task.py"


def test_the_digits_example_is_a_task():
    task = get_task(f"{EXAMPLE}:task")
    assert (task.num_train, task.num_test, task.num_classes) == (1348, 449, 10)
    assert task.input_shape == (64,)
    assert float(task.train_x.min()) == 0.0 and float(task.train_x.max()) == 1.0
    assert task.defaults["epochs"] == 30 and task.defaults["batch_size"] == 64


def test_the_digits_example_runs_the_comparison(tmp_path):
    out = tmp_path / "digits"
    assert main(["compare", "--task", f"{EXAMPLE}:task", "--methods", "sgd", "ksam",
                 "--seeds", "1", "--epochs", "1", "--train-subset", "256", "--no-lr-sweep",
                 "--budget", "passes", "--quiet", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [r["method"] for r in summary["budget"]["rows"]] == ["sgd", "ksam"]
    assert summary["config"]["batch_size"] == 64
