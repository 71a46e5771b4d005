"""``ksam compare --jobs N``: the grid's runs in worker processes give the serial command's
results bit for bit (at one thread a run); the default number of workers; a run's torch
threads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import ksam.lab.pool
from ksam.lab.cli import build_parser, config_from_args, main

TIME_FIELDS = {"epoch_time", "train_time", "step_time_median"}
TIME_COLUMNS = {"train time s", "steps/s", "step ms (median)"}


def _epochs(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIME_FIELDS} for r in rows]


def _table(markdown: str) -> list[dict[str, str]]:
    lines = [line for line in markdown.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = [dict(zip(header, (c.strip() for c in line.strip("|").split("|"))))
            for line in lines[1:] if not line.startswith("| method")]
    return [{k: v for k, v in row.items() if k not in TIME_COLUMNS and not k.startswith("time")}
            for row in rows]


def test_jobs_give_the_serial_results_bit_for_bit(task_file, tmp_path, capsys):
    grid = ["compare", "--task", f"{task_file}:task", "--methods", "sgd", "sam", "ksam:k=4",
            "--seeds", "2", "--lr-sweep", "0.05", "0.1", "--budget", "passes"]
    serial, parallel = tmp_path / "serial", tmp_path / "parallel"
    assert main([*grid, "--jobs", "1", "--quiet", "--out", str(serial)]) == 0
    assert main([*grid, "--jobs", "2", "--out", str(parallel)]) == 0
    printed = capsys.readouterr().out
    assert "in 2 worker processes, 1 torch thread each" in printed
    dirs = sorted(p.parent.relative_to(serial) for p in serial.rglob("metrics.jsonl"))
    assert dirs == sorted(p.parent.relative_to(parallel) for p in parallel.rglob("metrics.jsonl"))
    assert len(dirs) == 2 * 6 + 6 + 4  # the sweep, the comparison, the budget grid
    for d in dirs:
        assert _epochs(serial / d) == _epochs(parallel / d), d
        assert (serial / d / "config.json").read_bytes() == \
            (parallel / d / "config.json").read_bytes()
    a, b = (json.loads((d / "summary.json").read_text()) for d in (serial, parallel))
    assert _table(a["table"]) == _table(b["table"])
    assert _table(a["budget"]["table"]) == _table(b["budget"]["table"])
    assert (serial / "lr_sweep.md").read_text() == (parallel / "lr_sweep.md").read_text()


def _cfg(*argv: str):
    return config_from_args(build_parser().parse_args(list(argv)))


def test_the_default_is_one_worker_per_core(monkeypatch):
    from ksam.lab.compare import _jobs

    monkeypatch.setattr(ksam.lab.pool, "available_cores", lambda: 4)
    assert _jobs(_cfg("compare"), "cpu", 1, True) == 4
    assert _jobs(_cfg("compare", "--jobs", "3"), "cpu", 1, True) == 3
    assert _jobs(_cfg("compare"), "cuda", 1, True) == 1  # one GPU: one run at a time
    assert _jobs(_cfg("compare"), "cpu", 2, True) == 1  # under torchrun
    assert _jobs(_cfg("compare", "--ray"), "cpu", 1, True) == 1
    assert _jobs(_cfg("compare"), "cpu", 1, False) == 1  # a Python object of this process
    for argv, device, needle in ((["--jobs", "2"], "cuda", "on a GPU they run one at a time"),
                                 (["--jobs", "2", "--ray"], "cpu", "exclude each other")):
        with pytest.raises(ValueError, match=needle):
            _jobs(_cfg("compare", *argv), device, 1, True)


@pytest.mark.parametrize("requested,env,cores,busy,expected", [
    (3, None, 2, 1.0, 3),
    (None, None, 2, 1.03, 1),
    (None, None, 8, 0.2, 8),
    (None, None, 4, 6.5, 1),
    (None, "1", 8, 0.0, None),  # OMP_NUM_THREADS: torch's own count
])
def test_a_run_takes_the_cores_not_busy(monkeypatch, requested, env, cores, busy, expected):
    monkeypatch.setattr(ksam.lab.pool, "available_cores", lambda: cores)
    monkeypatch.setattr(ksam.lab.pool, "busy_cores", lambda: busy)
    if env is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", env)
    threads, why = ksam.lab.pool.choose_threads(requested)
    assert threads == (torch.get_num_threads() if expected is None else expected)
    assert why.startswith(f"{threads} torch thread")


def test_train_says_how_many_threads_it_takes(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    try:
        assert main(["train", "--method", "sgd", "--epochs", "1", "--task-option",
                     "num_samples=300", "--batch-size", "32", "--out", str(tmp_path / "a")]) == 0
        first = capsys.readouterr().out.splitlines()[0]
        assert first.startswith("threads: 1 torch thread: 1 core, ")  # the tests' one core
        assert torch.get_num_threads() == 1
        assert main(["train", "--method", "sgd", "--epochs", "1", "--task-option",
                     "num_samples=300", "--batch-size", "32", "--threads", "2",
                     "--out", str(tmp_path / "b")]) == 0
        assert capsys.readouterr().out.splitlines()[0] == "threads: 2 torch threads (--threads)"
    finally:
        torch.set_num_threads(before)
