"""Comparisons at equal cost (``ksam compare --budget``): every method gets SGD's example
passes within one of its steps, or the steps SGD's measured time buys at its measured time
per step; runs of a given number of steps; resuming an equal-budget comparison."""

from __future__ import annotations

import json
import math
import statistics

import pytest

from ksam.lab.cli import main
from ksam.lab.train import TrainConfig, train

#: 240 training examples, batches of 32: 7 steps an epoch
TINY = ["--task", "mnist1d", "--task-option", "num_samples=300", "--batch-size", "32",
        "--no-lr-sweep", "--quiet"]
B, SPE = 32, 7

#: every method, with options that put its warm-up, schedule or loss term inside 14 steps
EVERY_METHOD = ["sgd", "sam", "asam", "ksam:k=8,k_warmup=4", "ksam-plain:k=8",
                "random-sam:k_ascent=8", "esam", "osgd:k=8", "msam", "looksam:interval=3",
                "sam-late", "rst:p=0.5", "saf:start_epoch=0", "mesa:start=0.5",
                "ksam:k=8,k_warmup=4,scores=memory"]


def _summary(out):
    return json.loads((out / "summary.json").read_text())


def test_every_method_gets_sgds_passes_within_one_step(tmp_path):
    out = tmp_path / "cmp"
    assert main(["compare", "--methods", *EVERY_METHOD, "--seeds", "1", "--epochs", "2",
                 "--budget", "passes", "--out", str(out), *TINY]) == 0
    summary = _summary(out)
    budget = summary["budget"]
    assert budget["mode"] == "passes" and budget["amount"] == 3 * B * 2 * SPE
    runs = {r["label"]: r["final"] for r in budget["runs"]}
    assert list(runs) == EVERY_METHOD
    for label, final in runs.items():
        # the passes each run counted step by step, from the schedule's decisions it took
        used = final["passes"]
        assert used <= budget["amount"] < used + 7 * B, label  # a step costs at most 7B
    assert runs["sam"]["steps"] == SPE and runs["asam"]["steps"] == SPE  # 6B a step
    assert runs["mesa:start=0.5"]["steps"] == 12  # 6 steps of 3B, then 6 of 4B
    assert runs["sam-late"]["steps"] == 12  # 10 plain steps of 3B, the last 2 of 6B
    # a method whose steps cost SGD's runs its equal-epochs run, not a second one
    assert budget["reused"] == ["sgd", "msam", "saf:start_epoch=0"]
    trained = sorted(p.name for p in (out / "budget-passes" / "runs").iterdir())
    assert "sgd-seed0" not in trained and "msam-seed0" not in trained
    assert len(trained) == len(EVERY_METHOD) - 3
    rows = {r["method"]: r for r in budget["rows"]}
    assert rows["sam"]["epochs_run"] == 1.0 and rows["sgd"]["passes_vs_sgd"] == 1.0
    text = (out / "summary.md").read_text()
    assert "## Equal epochs" in text and "## Equal budget: passes" in text
    assert "| sam | 0.1 | 1.00 | 7 | 1.000x |" in text
    sub = (out / "budget-passes" / "summary.md").read_text()
    assert budget["table"] in sub


def test_a_time_budget_buys_the_steps_of_sgds_measured_time(tmp_path):
    out = tmp_path / "cmp"
    assert main(["compare", "--methods", "sgd", "sam", "ksam:k=8", "--seeds", "2",
                 "--epochs", "2", "--budget", "time", "--out", str(out), *TINY]) == 0
    summary = _summary(out)
    finals = {}
    for run in summary["runs"]:
        finals.setdefault(run["label"], []).append(run["final"])
    budget_s = statistics.fmean(f["train_time"] for f in finals["sgd"])
    assert summary["budget"]["amount"] == budget_s
    for run in summary["budget"]["runs"]:
        per_step = statistics.fmean(f["train_time"] / f["steps"] for f in finals[run["label"]])
        steps = SPE * 2 if run["label"] == "sgd" else \
            max(1, math.floor(budget_s / per_step * (1 + 1e-12)))
        assert run["final"]["steps"] == steps, run["label"]
    assert summary["budget"]["reused"].count("sgd") == 2  # SGD's runs are the budget's


def test_a_time_budget_needs_sgd(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", "--methods", "sam", "--budget", "time", "--out", str(out),
                 *TINY]) == 2
    assert "--budget time gives every method SGD's measured training time" in \
        capsys.readouterr().err
    assert not out.exists()


def test_resume_of_an_equal_budget_comparison_trains_only_the_missing_runs(tmp_path):
    out = tmp_path / "cmp"
    args = ["compare", "--methods", "sgd", "sam", "--epochs", "2", "--budget", "passes",
            "--out", str(out), *TINY]
    assert main([*args, "--seeds", "1"]) == 0
    first = out / "budget-passes" / "runs" / "sam-seed0" / "metrics.jsonl"
    text, mtime = first.read_text(), first.stat().st_mtime_ns
    assert main([*args, "--seeds", "2", "--resume"]) == 0
    assert first.read_text() == text and first.stat().st_mtime_ns == mtime
    budget = _summary(out)["budget"]
    assert [r["seeds"] for r in budget["rows"]] == [2, 2]
    assert (out / "budget-passes" / "runs" / "sam-seed1" / "checkpoint.pt").exists()


def test_a_run_of_a_given_number_of_steps(tmp_path):
    base = dict(method="sgd", batch_size=32, task_options={"num_samples": 600})
    short = train(TrainConfig(epochs=2, steps=20, **base), out_dir=tmp_path / "short")
    rows = short["epochs"]
    assert [r["steps"] for r in rows] == [15, 20]
    assert [r["passes"] for r in rows] == [15 * 3 * 32, 20 * 3 * 32]
    assert rows[-1]["lr"] == 0.0  # the cosine schedule ends with the run
    saved = json.loads((tmp_path / "short" / "config.json").read_text())
    assert (saved["epochs"], saved["steps"]) == (2, 20)
    whole = train(TrainConfig(epochs=2, steps=30, **base))
    plain = train(TrainConfig(epochs=2, **base))
    assert [r["train_loss"] for r in whole["epochs"]] == \
        [r["train_loss"] for r in plain["epochs"]]
    with pytest.raises(ValueError, match="steps=40 take 3 epochs of 15 steps, not epochs=2"):
        train(TrainConfig(epochs=2, steps=40, **base))
