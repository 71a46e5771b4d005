"""Tasks of the user's own (``--task path/to/file.py:function``, ``package.module:function``,
``ksam.compare(task)``): the dict and the TaskData forms, a file and a module, every generic
option as on a built-in task, resuming, and bad input (one ``ksam: error:`` line, nothing
written)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TASK_FILE

import ksam
from ksam.lab.cli import main
from ksam.lab.tasks import TaskData, get_task
from ksam.lab.tasks.data import RawSplits

ONE = ["--epochs", "1", "--seeds", "1", "--no-lr-sweep", "--quiet"]


def _one_error(capsys, code: int, needle: str) -> None:
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("ksam: error:"), err
    assert needle in err[0], err[0]


def _epochs(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.endswith("time") and k != "step_time_median"}
            for r in rows]


# ------------------------------------------------------------------------------- the forms

def test_a_file_task_is_the_dict_it_returns(task_file):
    task = get_task(f"{task_file}:task")
    x = np.random.default_rng(0).normal(size=(160, 6)).astype("float32")
    assert torch.equal(task.train_x, torch.from_numpy(x))
    assert task.num_classes == 4 and task.num_train == 160 and task.num_test == 64
    assert task.train_y.dtype == torch.int64
    assert task.defaults == {"epochs": 2, "batch_size": 16, "lr": 0.1, "momentum": 0.9,
                             "weight_decay": 5e-4}
    assert get_task(f"{task_file}:task", n=96).num_train == 96  # its keyword: an option
    tensors = get_task(f"{task_file}:tensors")
    assert torch.equal(tensors.train_x, task.train_x)
    assert torch.equal(tensors.test_y, task.test_y)


def test_a_module_task_and_a_file_task_agree(task_file, monkeypatch):
    monkeypatch.syspath_prepend(str(task_file.parent))
    by_module, by_file = get_task("user_task:task"), get_task(f"{task_file}:task")
    assert torch.equal(by_module.train_x, by_file.train_x)
    assert torch.equal(by_module.test_y, by_file.test_y)


def test_the_generic_options_apply_as_to_a_built_in_task(task_file):
    spec = f"{task_file}:task"
    plain = get_task(spec)
    sub = get_task(spec, train_subset=80, seed=3)
    assert sub.num_train == 80
    pair = get_task(spec, label_noise=0.25, label_noise_type="pair", seed=3)
    flipped = pair.noisy_mask
    assert int(flipped.sum()) == 40
    assert torch.equal(pair.train_y[flipped], (plain.train_y[flipped] + 1) % 4)
    assert torch.equal(pair.train_y[~flipped], plain.train_y[~flipped])
    symmetric = get_task(spec, label_noise=0.25, seed=3)
    changed = symmetric.noisy_mask
    assert int(changed.sum()) == 40 and bool((symmetric.train_y[changed]
                                               != plain.train_y[changed]).all())
    held = get_task(spec, validation_split=0.25, seed=3)
    assert (held.num_train, held.num_test) == (120, 40)
    assert held.name.endswith(":task-val0.25")


def test_compare_on_a_file_task_writes_the_report_of_a_built_in_one(task_file, tmp_path,
                                                                     capsys):
    out = tmp_path / "cmp"
    assert main(["compare", "--task", f"{task_file}:task", "--methods", "sgd", "ksam:k=4",
                 "--seeds", "2", "--train-subset", "96", "--label-noise", "0.2",
                 "--task-option", "label_noise_type=pair", "--lr-sweep", "0.05", "0.1",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"ksam compare: {task_file}:task".replace(str(Path.cwd()) + "/", "") in printed
    summary = json.loads((out / "summary.json").read_text())
    assert [r["method"] for r in summary["rows"]] == [
        spec for spec in (f"sgd:lr={summary['rows'][0]['lr']:g}",
                          f"ksam:k=4,lr={summary['rows'][1]['lr']:g}")]
    assert summary["config"]["task"] == f"{task_file}:task"  # absolute: workers import it
    assert summary["config"]["epochs"] == 2 and summary["config"]["batch_size"] == 16
    assert summary["config"]["task_options"] == {"train_subset": 96, "label_noise": 0.2,
                                                 "label_noise_type": "pair"}
    sweep = json.loads((out / "lr_sweep.json").read_text())
    assert set(sweep["validation"]) == {"sgd", "ksam:k=4"}
    part = json.loads((out / "lr-sweep" / "lr-0.05" / "summary.json").read_text())
    assert part["split"] == "validation"
    for name in ("summary.md", "metrics.csv", "accuracy_vs_cost.png", "config.json"):
        assert (out / name).stat().st_size > 0


def test_train_runs_a_file_task(task_file, tmp_path):
    out = tmp_path / "one"
    assert main(["train", "--task", f"{task_file}:task", "--method", "sam", "--out", str(out),
                 "--quiet"]) == 0
    saved = json.loads((out / "config.json").read_text())
    assert (saved["task"], saved["epochs"], saved["batch_size"]) == (f"{task_file}:task", 2, 16)
    assert [r["steps"] for r in _epochs(out)] == [10, 20]


def test_resume_of_a_file_task_comparison_adds_only_the_missing_runs(task_file, tmp_path):
    out = tmp_path / "cmp"
    args = ["compare", "--task", f"{task_file}:task", "--methods", "sgd", "sam", "--epochs",
            "1", "--no-lr-sweep", "--quiet", "--out", str(out)]
    assert main([*args, "--seeds", "1"]) == 0
    first = out / "runs" / "sam-seed0" / "metrics.jsonl"
    text, mtime = first.read_text(), first.stat().st_mtime_ns
    assert main([*args, "--seeds", "2", "--resume"]) == 0
    assert first.read_text() == text and first.stat().st_mtime_ns == mtime
    summary = json.loads((out / "summary.json").read_text())
    assert [r["seeds"] for r in summary["rows"]] == [2, 2]


# ------------------------------------------------------------------------- from Python

def test_ksam_compare_takes_the_dict_and_the_task_data(task_file, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(task_file.parent))
    import user_task

    d = user_task.task()
    by_dict = ksam.compare(d, ["sgd", "sam"], seeds=1, out=tmp_path / "dict", quiet=True,
                           no_lr_sweep=True, epochs=1)
    data = TaskData(RawSplits(d["train_x"], d["train_y"], d["test_x"], d["test_y"]), 4,
                    user_task.make_model, {"epochs": 1, "batch_size": 16}, "the same data")
    by_data = ksam.compare(data, ["sgd", "sam"], seeds=1, out=tmp_path / "data", quiet=True,
                           no_lr_sweep=True, task_name="mine")
    by_file = ksam.compare(f"{task_file}:task", ["sgd", "sam"], seeds=1, quiet=True,
                           out=tmp_path / "file", no_lr_sweep=True, epochs=1)
    by_function = ksam.compare(user_task.task, ["sgd", "sam"], seeds=1, quiet=True,
                               out=tmp_path / "fn", no_lr_sweep=True, epochs=1)
    assert by_dict["config"]["task"] == "python-task" and by_data["config"]["task"] == "mine"
    assert by_function["config"]["task"] == "user_task:task"  # workers import it by name
    accs = [[r["final"]["test_acc"] for r in s["runs"]]
            for s in (by_dict, by_data, by_file, by_function)]
    assert accs[0] == accs[1] == accs[2] == accs[3]
    saved = json.loads((tmp_path / "dict" / "summary.json").read_text())
    assert saved["table"] == by_dict["table"] and by_dict["out"] == str(tmp_path / "dict")


def test_a_python_object_task_trains_in_this_process(tmp_path):
    d = {"train_x": torch.randn(48, 6), "train_y": torch.arange(48) % 4,
         "test_x": torch.randn(16, 6), "test_y": torch.arange(16) % 4,
         "make_model": lambda: torch.nn.Linear(6, 4)}
    with pytest.raises(ValueError, match="jobs > 1 starts worker processes that import the "
                                         "task"):
        ksam.compare(d, ["sgd"], seeds=1, jobs=2, out=tmp_path / "x", quiet=True,
                     batch_size=16)
    assert not (tmp_path / "x").exists()
    summary = ksam.compare(d, ["sgd"], seeds=1, out=tmp_path / "y", quiet=True, epochs=1,
                           batch_size=16, no_lr_sweep=True)
    assert summary["rows"][0]["seeds"] == 1


def test_import_ksam_leaves_the_harness_unimported():
    code = ("import sys, ksam; "
            "print(sorted(m for m in sys.modules if m.startswith('ksam.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    loaded = set(eval(out))
    assert not {m for m in loaded if m.startswith("ksam.lab") or m == "ksam.tasks"}, loaded
    assert callable(ksam.compare)


# ---------------------------------------------------------------------------- bad input

BAD = [
    ("missing file", "nowhere.py:task", "nowhere.py does not exist"),
    ("missing module", "no_such_module_here:task", "no module named 'no_such_module_here'"),
    ("missing function", "{file}:nothing", "has no function 'nothing'"),
    ("not a function", "{file}:not_a_function", "not_a_function in"),
    ("required argument", "{file}:needs", "takes required argument(s) count"),
    ("raises", "{file}:raises", "the function raised RuntimeError: the data server is down"),
    ("not a dict", "{file}:not_a_dict", "the function returned a list, not a dict"),
    ("missing key", "{file}:missing_key", "the dict lacks test_y"),
    ("unknown key", "{file}:unknown_key", "unknown key(s) labels"),
    ("ragged", "{file}:ragged", "train_x is ragged"),
    ("non-finite", "{file}:nan_inputs", "train_x holds non-finite values"),
    ("float labels", "{file}:float_labels", "train_y must be integer class labels"),
    ("labels outside", "{file}:labels_outside",
     "training labels range over [0, 3], outside the 3 classes"),
    ("model output", "{file}:wrong_output",
     "the model's output for 2 examples must be logits of shape [2, 4] (num_classes 4), got "
     "shape [2, 7]"),
    ("same model", "{file}:same_model", "returned the same module"),
    ("lengths", "{file}:lengths", "train_x has 160 examples, train_y 159 labels"),
    ("shapes", "{file}:shapes", "a training example has shape [6], a test example [5]"),
    ("defaults", "{file}:bad_defaults", "defaults: epochs must be an integer >= 1, got 0"),
]


@pytest.mark.parametrize("command", ["compare", "train"])
@pytest.mark.parametrize("spec,needle", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_task_input_is_one_error_line_and_writes_nothing(task_file, tmp_path, capsys,
                                                             monkeypatch, command, spec,
                                                             needle):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    extra = ["--methods", "sgd", *ONE] if command == "compare" else ["--method", "sgd",
                                                                     "--quiet"]
    code = main([command, "--task", spec.format(file=task_file), "--out", str(out), *extra])
    _one_error(capsys, code, needle)
    assert not out.exists()


def test_a_task_file_that_fails_to_import_is_one_error_line(tmp_path):
    broken = tmp_path / "broken.py"
    broken.write_text(TASK_FILE + "\ndef broken(:\n")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "ksam", "compare", "--task",
                           f"{broken}:task", "--out", str(out), *ONE],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ksam: error:"), proc.stderr
    assert f"importing {broken} raised SyntaxError" in err[0]
    assert not out.exists()
