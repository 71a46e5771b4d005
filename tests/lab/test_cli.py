"""The command line: what ``ksam compare`` / ``ksam train`` write and report, resuming,
the safety of output folders, and bad input (one ``ksam: error:`` line that touches nothing;
an error of ksam itself keeps its traceback)."""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_one_error, copy_folder, files_of, lock_held, write_idx

from ksam.lab.cli import build_parser, config_from_args, main
from ksam.lab.compare import accuracy_vs_cost, compare, method_styles
from ksam.lab.config import DEFAULT_LR_SWEEP, CliConfig
from ksam.lab.outputs import (
    MANIFEST,
    TRAIN_OUTPUTS,
    folder_contents,
    load_checkpoint,
    save_checkpoint,
)
from ksam.lab.train import RESUME_MAY_CHANGE, TrainConfig

TINY = ["--task", "mnist1d", "--task-option", "num_samples=600", "--batch-size", "32",
        "--quiet"]
SMALL = ["--task", "mnist1d", "--task-option", "num_samples=300", "--batch-size", "32",
         "--quiet"]
SHARED_LR = ["--no-lr-sweep"]  # one shared lr: no lr sweep before the comparison


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "one"
    assert main(["train", "--method", "sgd", "--epochs", "1", "--out", str(out), *SMALL]) == 0
    return out


def _python_ksam(*args: str) -> list[str]:
    return [sys.executable, "-m", "ksam", *args]


def _cfg(*argv: str) -> CliConfig:
    return config_from_args(build_parser().parse_args(list(argv)))


# ---------------------------------------------------------- what compare and train write and report

def test_compare_writes_a_complete_report(tmp_path, capsys):
    out = tmp_path / "cmp"
    code = main(["compare", "--methods", "sgd", "sam", "ksam:k=8", "osgd:k=8", "--seeds", "2",
                 "--epochs", "2", "--out", str(out), *TINY, *SHARED_LR])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| sgd |" in printed and "| ksam:k=8 |" in printed
    for name in ("summary.md", "summary.json", "metrics.csv", "config.json",
                 "accuracy_vs_time.png"):
        assert (out / name).stat().st_size > 0, name
    summary = json.loads((out / "summary.json").read_text())
    rows = {r["method"]: r for r in summary["rows"]}
    assert set(rows) == {"sgd", "sam", "ksam:k=8", "osgd:k=8"}
    assert rows["sgd"]["time_vs_ref"] == pytest.approx(1.0)
    assert all(r["seeds"] == 2 for r in rows.values())
    lines = (out / "metrics.csv").read_text().strip().splitlines()
    assert len(lines) == 1 + 4 * 2 * 2  # header + methods x seeds x epochs
    run_dir = out / "runs" / "ksam_k_8-seed1"
    epochs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in epochs] == [1, 2]
    assert epochs[1]["steps"] == 2 * (480 // 32)
    assert (out / "accuracy_vs_time.png").read_bytes()[:4] == b"\x89PNG"


def test_each_method_at_its_own_lr(tmp_path):
    from ksam.lab.compare import compare
    from ksam.lab.train import TrainConfig

    base = TrainConfig(epochs=1, batch_size=32, lr=0.1, task_options={"num_samples": 600})
    report = compare(base, ["sgd", "sgd:lr=0.01", "ksam:k=8,lr=0.3"], [0], tmp_path / "c")
    lrs = {r["label"]: r["config"]["lr"] for r in report["runs"]}
    assert lrs == {"sgd": 0.1, "sgd:lr=0.01": 0.01, "ksam:k=8,lr=0.3": 0.3}
    ksam_run = next(r for r in report["runs"] if r["label"].startswith("ksam"))
    assert ksam_run["config"]["method_options"] == {"k": 8}
    accs = {r["label"]: r["final"]["train_loss"] for r in report["runs"]}
    assert accs["sgd"] != accs["sgd:lr=0.01"]
    saved = json.loads((tmp_path / "c" / "runs" / "sgd_lr_0.01-seed0" / "config.json")
                       .read_text())
    assert saved["lr"] == 0.01


def test_lr_sweep_chooses_each_lr_on_the_held_out_split(tmp_path, capsys):
    out = tmp_path / "sweep"
    code = main(["compare", "--methods", "sgd", "ksam:k=8", "--lr-sweep", "0.01", "0.3",
                 "--seeds", "2", "--epochs", "2", "--out", str(out), *TINY])
    assert code == 0
    sweep = json.loads((out / "lr_sweep.json").read_text())
    for spec in ("sgd", "ksam:k=8"):
        by_lr = {float(lr): acc for lr, acc in sweep["validation"][spec].items()}
        assert sweep["chosen"][spec] == max(by_lr, key=by_lr.get)
    # the sweep ran on the held-out split, the final comparison on the test set
    for lr in ("0.01", "0.3"):
        part = json.loads((out / "lr-sweep" / f"lr-{lr}" / "summary.json").read_text())
        assert part["split"] == "validation"
        assert part["config"]["task_options"]["validation_split"] == 0.2
        assert part["config"]["lr"] == float(lr)
    final = json.loads((out / "summary.json").read_text())
    assert final["split"] == "test"
    assert "validation_split" not in final["config"]["task_options"]
    labels = [r["method"] for r in final["rows"]]
    assert labels == [f"sgd:lr={sweep['chosen']['sgd']:g}",
                      f"ksam:k=8,lr={sweep['chosen']['ksam:k=8']:g}"]
    runs = {r["label"]: r for r in final["runs"]}
    assert len(runs) == 2
    printed = capsys.readouterr().out
    assert "| method | lr 0.01 | lr 0.3 | chosen |" in printed


def test_the_plan_comes_first_and_the_sweep_is_counted_and_named(tmp_path, capsys):
    out = tmp_path / "sweep"
    assert main(["compare", "--methods", "sgd", "ksam:k=8", "--lr-sweep", "0.01", "0.3",
                 "--seeds", "1", "--epochs", "1", "--out", str(out),
                 "--task-option", "num_samples=600", "--batch-size", "32"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == ("ksam compare: mnist1d, 1 epochs of batch 32; 2 methods (sgd, "
                          "ksam:k=8) x 1 seed = 2 runs")
    assert printed[1] == ("  first the lr sweep: every method at lr 0.01, 0.3 on a held-out "
                          "0.2 of the training set, 4 runs (lr_sweep.md); then each method at "
                          "its best lr on the test set")
    assert printed[2] == (f"  6 runs one after the other in this process, 1 torch thread "
                          f"(--threads); results in {out}")
    assert printed[3].startswith("run 1/6 done: lr 0.01 (held out) sgd seed 0: validation "
                                 "accuracy ")
    assert printed[7].startswith("run 5/6 done: sgd:lr=") and " accuracy " in printed[7]
    summary = (out / "summary.md").read_text()
    assert "; before them, the lr sweep's 4 held-out runs (lr_sweep.md): " in summary
    held_out = (out / "lr-sweep" / "lr-0.01" / "summary.md").read_text()
    assert "| method | lr | validation acc % (mean ± std) |" in held_out
    assert "Validation accuracy at the end of training (the 'validation acc' column)" \
        in held_out
    base = json.loads((out / "config.json").read_text())["base"]
    assert base["lr"] is None and "method" not in base and "method_options" not in base
    shared = json.loads((out / "lr-sweep" / "lr-0.3" / "config.json").read_text())["base"]
    assert shared["lr"] == 0.3  # a held-out comparison at one lr says which


def test_the_plan_is_printed_before_the_first_run_ends_into_a_pipe(tmp_path):
    import select

    proc = subprocess.Popen(_python_ksam("compare", "--methods", "sgd", "--seeds", "1",
                                         "--epochs", "300", "--out", str(tmp_path / "c"),
                                         *TINY[:-1]),
                            stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 300)
        assert ready, "nothing printed"
        assert proc.stdout.readline().startswith("ksam compare: mnist1d, 300 epochs")
        assert proc.poll() is None  # printed while the runs train
    finally:
        proc.kill()
        proc.wait()


def test_compare_into_a_train_folder_names_the_other_command(finished_run, capsys):
    assert_one_error(capsys, main(["compare", "--methods", "sgd", "--out", str(finished_run),
                             *SMALL, *SHARED_LR]),
               "holds the results of a `ksam train`, which `ksam compare` neither resumes nor "
               "replaces; choose another --out")


def test_compare_help_describes_groups_and_names_its_defaults(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")  # no line breaks inside the phrases
    assert main(["compare", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "Train several methods with several seeds on one task" in text
    for group in ("methods and seeds:", "task and data:", "training:",
                  "learning rate per method:", "equal budget:", "where the runs run:",
                  "output:"):
        assert group in text
    assert "output directory, new or empty (default runs/compare-TASK-DATE-TIME)" in text
    assert "training epochs; default: the task's (mnist1d: 50; `ksam tasks` lists every " \
           "task's)" in text
    assert "path/to/file.py:function or package.module:function" in text


def test_default_compare_sweeps_each_lr_and_a_given_lr_does_not():
    for task in ([], ["--task", "mnist1d"]):  # the default preset, and a task of one's own
        assert _cfg("compare", *task, "--lr-sweep", "0.1", "0.3").sweep_lrs == [0.1, 0.3]
        assert _cfg("compare", *task, "--lr", "0.1").sweep_lrs is None
        assert _cfg("compare", *task, "--no-lr-sweep").sweep_lrs is None
        assert _cfg("compare", *task, "--methods", "sgd:lr=0.2", "sam").sweep_lrs is None
        assert _cfg("compare", *task, "--validation-split", "0.2").sweep_lrs is None  # tuning
        assert _cfg("compare", *task, "--validation-split", "0.3", "--lr-sweep",
                    "0.1").sweep_lrs == [0.1]
    assert _cfg("compare", "--task", "mnist1d").sweep_lrs == list(DEFAULT_LR_SWEEP)
    assert _cfg("compare", "--methods", "sgd", "sam").sweep_lrs == list(DEFAULT_LR_SWEEP)
    assert _cfg("compare").sweep_lrs == [0.05, 0.1, 0.2]  # the default preset's grid
    assert _cfg("compare", "--preset", "mnist1d").sweep_lrs is None  # the preset's lr


def test_default_compare_reports_each_methods_lr(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", "--methods", "sgd", "--seeds", "1", "--epochs", "1",
                 "--out", str(out), *SMALL]) == 0
    printed = capsys.readouterr().out
    sweep = json.loads((out / "lr_sweep.json").read_text())
    assert sweep["lrs"] == list(DEFAULT_LR_SWEEP)
    lr = sweep["chosen"]["sgd"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["lr_choice"]["mode"] == "sweep"
    assert summary["rows"][0]["lr"] == lr
    assert "each method at its own lr, chosen among 0.1, 0.2, 0.4" in printed
    assert f"| sgd:lr={lr:g} | {lr:g} |" in printed
    assert "each method at its own lr" in (out / "summary.md").read_text()

    shared = tmp_path / "shared"
    assert main(["compare", "--methods", "sgd", "--seeds", "1", "--epochs", "1", "--lr", "0.1",
                 "--out", str(shared), *SMALL]) == 0
    assert "one shared lr (0.1) for every method" in (shared / "summary.md").read_text()
    assert not (shared / "lr_sweep.md").exists()


def test_eval_every_evaluates_every_nth_and_the_last_epoch_only(tmp_path):
    def rows(name: str, *extra: str) -> list[dict]:
        out = tmp_path / name
        assert main(["train", "--method", "ksam:k=8", "--epochs", "4", "--out", str(out),
                     "--quiet", *TINY, *extra]) == 0
        return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]

    every = rows("every")
    sparse = rows("sparse", "--eval-every", "3")
    assert [r["test_acc"] is None for r in sparse] == [True, True, False, False]
    assert [r["test_loss"] is None for r in sparse] == [True, True, False, False]
    # Evaluation changes nothing in training: same losses, same final accuracy.
    assert [r["train_loss"] for r in sparse] == [r["train_loss"] for r in every]
    assert [r["test_acc"] for r in sparse[2:]] == [r["test_acc"] for r in every[2:]]
    # How often to evaluate may change on resume; the run continues.
    assert main(["train", "--method", "ksam:k=8", "--epochs", "5", "--out",
                 str(tmp_path / "sparse"), "--quiet", *TINY, "--resume"]) == 2  # epochs differ
    assert main(["train", "--method", "ksam:k=8", "--epochs", "4", "--eval-every", "1",
                 "--out", str(tmp_path / "sparse"), "--quiet", *TINY, "--resume"]) == 0


def test_every_method_of_a_seed_starts_from_the_same_weights():
    """Same seed, same initial weights and data, whatever the method: at lr 0 no step moves
    the weights (a sharp step restores w bit for bit), so each run ends at its initial
    weights, which agree across methods and differ for another seed."""
    from ksam.lab.train import TrainConfig, train

    ends = {}
    for method, seed in (("sgd", 3), ("sam", 3), ("ksam", 3), ("sgd", 4)):
        cfg = TrainConfig(method=method, epochs=1, batch_size=32, seed=seed, lr=0.0,
                          momentum=0.0, weight_decay=0.0, task_options={"num_samples": 600})
        ends[method, seed] = train(cfg)["model"].state_dict()
    first = ends["sgd", 3]
    for key in (("sam", 3), ("ksam", 3)):
        assert all(torch.equal(first[k], ends[key][k]) for k in first), key
    assert not all(torch.equal(first[k], ends["sgd", 4][k]) for k in first)


def test_train_with_compile_matches_eager(tmp_path):
    from ksam.lab.train import TrainConfig, train

    def final(**kw):
        cfg = TrainConfig(method="ksam", epochs=1, batch_size=32, seed=0,
                          task_options={"num_samples": 600}, **kw)
        return train(cfg, out_dir=tmp_path / str(kw))

    plain, compiled = final(), final(compile="aot_eager")
    assert compiled["config"]["compile"] == "aot_eager"
    assert compiled["final"]["test_acc"] == plain["final"]["test_acc"]
    assert compiled["final"]["train_loss"] == pytest.approx(plain["final"]["train_loss"],
                                                             abs=1e-5)
    ckpt = load_checkpoint(tmp_path / str({"compile": "aot_eager"}) / "checkpoint.pt")
    assert not any(k.startswith("_orig_mod") for k in ckpt["model"])


def test_data_dir_is_written_as_a_string_and_resumes(tmp_path, capsys):
    data, out = tmp_path / "data", tmp_path / "run"
    data.mkdir()
    args = ["train", "--method", "sgd", "--data-dir", str(data), "--out", str(out), *SMALL]
    assert main([*args, "--epochs", "1"]) == 0
    assert json.loads((out / "config.json").read_text())["task_options"]["data_dir"] == \
        str(data)
    assert main([*args, "--epochs", "1", "--resume"]) == 0  # same configuration: continues

    cmp = tmp_path / "cmp"
    assert main(["compare", "--methods", "sgd", "--seeds", "1", "--epochs", "1",
                 "--no-lr-sweep", "--data-dir", str(data), "--out", str(cmp), *SMALL]) == 0
    saved = json.loads((cmp / "config.json").read_text())
    assert saved["base"]["task_options"]["data_dir"] == str(data)


def test_progress_without_a_terminal_is_one_line_per_finished_run(tmp_path, capsys):
    out = tmp_path / "cmp"
    args = ["compare", "--methods", "sgd", "ksam:k=8", "--seeds", "0,3", "--epochs", "2",
            "--out", str(out), "--task-option", "num_samples=300", "--batch-size", "32",
            *SHARED_LR]
    assert main(args) == 0
    printed = capsys.readouterr().out.splitlines()
    done = [line for line in printed if line.startswith("run ")]
    assert [line.split(":")[0] for line in done] == [
        "run 1/4 done", "run 2/4 done", "run 3/4 done", "run 4/4 done"]
    assert [line.split(": ")[1] for line in done] == [
        "sgd seed 0", "ksam:k=8 seed 0", "sgd seed 3", "ksam:k=8 seed 3"]
    summary = json.loads((out / "summary.json").read_text())
    accs = {(r["label"], r["seed"]): r["final"]["test_acc"] for r in summary["runs"]}
    assert f"accuracy {accs[('ksam:k=8', 3)]:.2f} %" in done[3]

    assert main([*args, "--quiet", "--overwrite"]) == 0
    assert not [line for line in capsys.readouterr().out.splitlines()
                if line.startswith("run ")]


def test_the_printed_table_and_the_plot_explain_collapsed_and_frontier(tmp_path, capsys,
                                                                        monkeypatch):
    import matplotlib.figure

    from ksam.lab.compare import FRONTIER_CAPTION, table_notes

    captions: list[str] = []
    real = matplotlib.figure.Figure.text
    monkeypatch.setattr(matplotlib.figure.Figure, "text",
                        lambda self, x, y, s, *a, **k: captions.append(s)
                        or real(self, x, y, s, *a, **k))
    out = tmp_path / "cmp"
    assert main(["compare", "--methods", "sgd", "sam", "--seeds", "1", "--epochs", "1",
                 "--out", str(out), *SMALL, *SHARED_LR]) == 0
    printed = capsys.readouterr().out
    notes = table_notes("sgd")
    summary = json.loads((out / "summary.json").read_text())
    # the notes under the table, then the reading of it
    assert printed.rstrip().endswith(f"{notes}\n\n{summary['reading']}")
    assert summary["reading"].startswith("Reading: the most accurate method here is ")
    assert "'collapsed' counts runs ending more than 10 points of test accuracy below sgd's " \
           "mean" in notes
    assert "'(frontier)' in accuracy_vs_cost.png marks the methods no other method beats" \
        in notes
    assert notes in (out / "summary.md").read_text()
    assert captions == [FRONTIER_CAPTION]
    assert "'(frontier)': no other method is both faster and more accurate" in FRONTIER_CAPTION


def test_accuracy_plot_says_where_its_axis_starts(tmp_path, monkeypatch):
    import matplotlib.axes

    from ksam.lab.compare import accuracy_axis, plot_accuracy_vs_time

    def run(label, accs):
        return {"label": label, "epochs": [{"test_acc": a, "train_time": float(i + 1)}
                                           for i, a in enumerate(accs)]}

    runs = [run("sgd", [10.0, 85.0, 90.0]), run("sam", [12.0, 88.0, 94.0])]
    label = "test accuracy (%)\nthe axis starts at 80 %, lower points cut off"
    assert accuracy_axis(runs) == (80.0, 96.0, label)
    # nothing below the axis' start: nothing to say
    assert accuracy_axis([run("sgd", [85.0, 90.0])]) == (80.0, 92.0, "test accuracy (%)")
    assert accuracy_axis([run("sgd", [5.0, 8.0])]) == (0.0, 10.0, "test accuracy (%)")

    labels: list[str] = []
    real = matplotlib.axes.Axes.set_ylabel
    monkeypatch.setattr(matplotlib.axes.Axes, "set_ylabel",
                        lambda self, text, *a, **k: labels.append(text)
                        or real(self, text, *a, **k))
    assert plot_accuracy_vs_time(runs, tmp_path / "t.png", "title")
    assert labels == [label]


# --------------------------------------------------------------------------------- accuracy vs cost

def _run(label: str, time: float, acc: float) -> dict:
    return {"label": label, "final": {"train_time": time, "test_acc": acc}}


def test_accuracy_vs_cost_points_exactly():
    runs = [_run("sgd", 1.0, 90.0), _run("sgd", 3.0, 92.0),
            _run("sam", 4.0, 93.0), _run("sam", 4.0, 95.0),
            _run("osgd", 2.0, 80.0), _run("osgd", 2.0, 80.0)]
    points = {p["method"]: p for p in accuracy_vs_cost(runs, "sgd")}
    sgd, sam, osgd = points["sgd"], points["sam"], points["osgd"]
    assert (sgd["cost_mean"], sgd["cost_std"]) == (1.0, math.sqrt(0.5))  # 0.5 and 1.5
    assert (sgd["acc_mean"], sgd["acc_std"]) == (91.0, math.sqrt(2.0))
    assert (sam["cost_mean"], sam["cost_std"], sam["acc_mean"]) == (2.0, 0.0, 94.0)
    assert (osgd["cost_mean"], osgd["acc_std"], osgd["seeds"]) == (1.0, 0.0, 2)
    # osgd costs what sgd costs and is less accurate: off the frontier
    assert (sgd["frontier"], sam["frontier"], osgd["frontier"]) == (True, True, False)


def _fake_run(label: str, seed: int, host: str, device: str, time_s: float) -> dict:
    final = {"test_acc": 90.0, "train_time": time_s, "steps": 100,
             "step_time_median": time_s / 100, "skipped_steps": 0}
    return {"label": label, "seed": seed, "host": host, "device_name": device,
            "final": final, "config": {"lr": 0.1}}


def test_the_report_says_where_runs_ran_and_marks_times_across_kinds_of_device():
    from ksam.lab.compare import device_note, markdown_table, places, summarize

    runs = [_fake_run("sgd", 0, "a", "A100", 10.0), _fake_run("sam", 0, "a", "A100", 20.0),
            _fake_run("sgd", 1, "b", "A100", 10.0), _fake_run("sam", 1, "c", "H100", 12.0)]
    rows = summarize(runs, "sgd")
    assert [(r["method"], r["devices"], r["mixed_devices"]) for r in rows] == \
        [("sgd", ["A100"], False), ("sam", ["A100", "H100"], True)]
    table = markdown_table(rows, "sgd").splitlines()
    assert "| 1.00x |" in table[2] and "| 1.60x* |" in table[3]
    assert device_note(rows, "sgd").strip().startswith("'*' after time / sgd: sam and sgd")
    assert device_note(summarize(runs[:3], "sgd"), "sgd") == ""
    assert places(runs) == [{"host": "a", "device_name": "A100", "runs": 2},
                            {"host": "b", "device_name": "A100", "runs": 1},
                            {"host": "c", "device_name": "H100", "runs": 1}]


def test_compare_writes_the_accuracy_vs_cost_chart(tmp_path):
    report = compare(TrainConfig(epochs=1, batch_size=32, task_options={"num_samples": 300}),
                     ["sgd", "ksam:k=8"], [0, 1], tmp_path / "c")
    summary = json.loads((tmp_path / "c" / "summary.json").read_text())
    assert summary["accuracy_vs_cost"] == accuracy_vs_cost(report["runs"], "sgd")
    assert summary["accuracy_vs_cost"][0]["method"] == "sgd"
    png = tmp_path / "c" / "accuracy_vs_cost.png"
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_method_styles_tell_more_methods_than_colours_apart():
    colours = [f"C{i}" for i in range(10)]
    styles = method_styles(40, colours)
    assert [c for c, _, _ in styles[:10]] == colours  # a colour each, then the cycle again
    assert len({m for _, m, _ in styles[:10]}) == 10  # and a marker each
    assert styles[10][0] == "C0" and styles[10][2] == "--"
    assert len({(c, marker) for c, marker, _ in styles}) == 40  # the cost chart's points
    assert len({(c, line) for c, _, line in styles}) == 40  # the time chart's lines


def test_sgd_at_its_own_lr_is_the_reference(tmp_path):
    report = compare(TrainConfig(epochs=1, batch_size=32, task_options={"num_samples": 300}),
                     ["sam:lr=0.2", "sgd:lr=0.2"], [0], None)
    assert report["reference"] == "sgd:lr=0.2"
    assert report["rows"][1]["time_vs_ref"] == 1.0


# ------------------------------------------------------------------------------------------- resume

def test_compare_resume_keeps_finished_runs_and_adds_missing_ones(tmp_path, capsys):
    out = tmp_path / "cmp"
    args = ["compare", "--methods", "sgd", "ksam:k=8", "--epochs", "2", "--out", str(out),
            *TINY, *SHARED_LR]
    assert main([*args, "--seeds", "1"]) == 0
    first = out / "runs" / "ksam_k_8-seed0" / "metrics.jsonl"
    text, mtime = first.read_text(), first.stat().st_mtime_ns
    before = json.loads((out / "summary.json").read_text())["rows"]

    assert main([*args, "--seeds", "2", "--resume"]) == 0
    assert first.read_text() == text and first.stat().st_mtime_ns == mtime  # not retrained
    rows = {r["method"]: r for r in json.loads((out / "summary.json").read_text())["rows"]}
    assert all(r["seeds"] == 2 for r in rows.values())
    for row in before:  # seed 0's accuracy is the one it had
        assert rows[row["method"]]["test_acc_all"][0] == row["test_acc_all"][0]
    assert (out / "runs" / "sgd-seed1" / "checkpoint.pt").exists()

    summary = (out / "summary.md").read_text()
    capsys.readouterr()
    assert main([*args, "--seeds", "2", "--resume", "--lr", "0.3"]) == 2
    err = capsys.readouterr().err
    assert "was made with lr=0.1 (now 0.3)" in err
    assert (out / "summary.md").read_text() == summary  # nothing rewritten


def test_resume_needs_out(capsys):
    assert main(["compare", "--resume", *TINY]) == 2
    assert "--resume needs --out" in capsys.readouterr().err


def test_train_resume_refuses_another_configuration(tmp_path, capsys):
    out = tmp_path / "one"
    args = ["train", "--method", "ksam:k=8", "--out", str(out), *TINY]
    assert main([*args, "--epochs", "1"]) == 0
    assert main([*args, "--epochs", "2", "--resume"]) == 2
    assert "was made with epochs=1 (now 2)" in capsys.readouterr().err


def test_train_resumes_after_a_real_kill(tmp_path):
    common = ["train", "--method", "ksam:k=8", "--epochs", "10", "--seed", "4", *TINY]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    full = tmp_path / "full"
    subprocess.run(_python_ksam(*common, "--out", str(full)), check=True, env=env,
                   capture_output=True, timeout=300)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(_python_ksam(*common, "--out", str(killed)), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = killed / "checkpoint.pt"
    deadline = time.time() + 120
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    at_kill = load_checkpoint(ckpt)["epoch"]
    assert 1 <= at_kill < 10

    resumed = subprocess.run(_python_ksam(*common, "--out", str(killed), "--resume"),
                             env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    a = load_checkpoint(full / "checkpoint.pt")
    b = load_checkpoint(ckpt)
    assert b["epoch"] == 10
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert [r["test_acc"] for r in a["history"]] == [r["test_acc"] for r in b["history"]]
    lines = (killed / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == list(range(1, 11))


def _garble(data: bytes) -> bytes:
    middle = len(data) // 2
    return data[:middle] + bytes(b ^ 0xFF for b in data[middle:middle + 64]) + \
        data[middle + 64:]


@pytest.mark.parametrize("damage,needle", [
    (_garble, "damaged"),
    (lambda d: d[: len(d) // 3], "damaged"),
    (lambda d: b"", "empty file"),
    (lambda d: b"PK\x03\x04 not ours" * 10, "not a ksam checkpoint"),
], ids=["garbled", "truncated", "empty", "foreign"])
def test_resume_refuses_a_bad_checkpoint_and_touches_nothing(finished_run, tmp_path, capsys,
                                                             damage, needle):
    out = copy_folder(finished_run, tmp_path / "copy")
    ckpt = out / "checkpoint.pt"
    ckpt.write_bytes(damage(ckpt.read_bytes()))
    before = files_of(out)
    code = main(["train", "--method", "sgd", "--epochs", "2", "--out", str(out), "--resume",
                 *SMALL])
    assert_one_error(capsys, code, needle)
    assert files_of(out) == before


def test_a_checkpoint_of_a_torch_save_is_foreign(tmp_path):
    path = tmp_path / "checkpoint.pt"
    torch.save({"model": {}}, path)
    with pytest.raises(ValueError, match="not a ksam checkpoint"):
        load_checkpoint(path)


def test_non_finite_weights_are_refused_even_with_a_good_checksum(finished_run, tmp_path):
    state = load_checkpoint(finished_run / "checkpoint.pt")
    name = next(iter(state["model"]))
    state["model"][name] = torch.full_like(state["model"][name], math.nan)
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(state, path)
    with pytest.raises(ValueError, match=f"non-finite weights \\({name}"):
        load_checkpoint(path)


def test_a_run_interrupted_before_its_first_checkpoint_resumes_from_scratch(tmp_path, capsys):
    args = ["train", "--method", "ksam:k=8", "--epochs", "2", "--seed", "1", *SMALL]
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert main([*args, "--out", str(full)]) == 0
    assert main([*args, "--out", str(cut)]) == 0
    # what a run killed during its first epoch leaves: its config (and ksam's manifest)
    (cut / "checkpoint.pt").unlink()
    (cut / "metrics.jsonl").unlink()
    before = files_of(cut)
    assert_one_error(capsys, main([*args, "--out", str(cut)]), "is not empty")  # a plain rerun
    assert_one_error(capsys, main([*args, "--out", str(cut), "--resume", "--lr", "0.3"]),
               "was made with lr=0.1 (now 0.3)")
    assert files_of(cut) == before
    assert main([*args, "--out", str(cut), "--resume"]) == 0
    a, b = load_checkpoint(full / "checkpoint.pt"), load_checkpoint(cut / "checkpoint.pt")
    assert b["epoch"] == 2
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert (cut / "config.json").read_text() == (full / "config.json").read_text()


def test_resume_refuses_another_fast_setting_before_writing(finished_run, tmp_path, capsys):
    out = copy_folder(finished_run, tmp_path / "copy")
    before = files_of(out)
    code = main(["train", "--method", "sgd", "--epochs", "1", "--out", str(out), "--resume",
                 "--fast", *SMALL])
    assert_one_error(capsys, code, "was made with fast=False (now True)")
    assert files_of(out) == before
    assert "fast" not in RESUME_MAY_CHANGE


def test_resume_reads_a_configuration_saved_under_the_earlier_field_names(tmp_path, capsys):
    from ksam.lab.outputs import save_checkpoint

    out = tmp_path / "old"
    args = ["train", "--method", "sgd", "--out", str(out), *SMALL]
    assert main([*args, "--epochs", "1", "--schedule", "constant"]) == 0
    state = load_checkpoint(out / "checkpoint.pt")
    config = state["config"]
    config["schedule"] = config.pop("lr_schedule")
    config["selection"] = config.pop("selection_scope")
    save_checkpoint(state, out / "checkpoint.pt")
    assert_one_error(capsys, main([*args, "--epochs", "1", "--resume", "--schedule", "cosine"]),
               "was made with lr_schedule='constant' (now 'cosine')")
    assert main([*args, "--epochs", "1", "--resume", "--schedule", "constant"]) == 0


# ----------------------------------------------------------------------------- output folder safety

def test_train_refuses_a_finished_run_unless_resume_or_overwrite(finished_run, tmp_path,
                                                                 capsys):
    out = copy_folder(finished_run, tmp_path / "again")
    (out / "notes.txt").write_text("mine")
    before = files_of(out)
    args = ["train", "--method", "sgd", "--epochs", "1", "--out", str(out), *SMALL]
    assert_one_error(capsys, main(args), "is not empty")
    assert files_of(out) == before
    assert_one_error(capsys, main([*args, "--resume", "--overwrite"]), "not allowed with")

    assert main([*args, "--seed", "1", "--overwrite"]) == 0
    assert json.loads((out / "config.json").read_text())["seed"] == 1
    assert load_checkpoint(out / "checkpoint.pt")["config"]["seed"] == 1
    assert (out / "notes.txt").read_text() == "mine"  # not ksam's: left alone


def test_compare_refuses_another_comparison_and_overwrite_removes_stale_runs(tmp_path, capsys):
    out = tmp_path / "cmp"
    args = ["compare", "--seeds", "1", "--epochs", "1", "--no-lr-sweep", "--out", str(out),
            *SMALL]
    assert main([*args, "--methods", "sgd", "sam"]) == 0
    assert (out / "runs" / "sam-seed0").is_dir()
    before = files_of(out)
    assert_one_error(capsys, main([*args, "--methods", "sgd"]), "is not empty")
    assert files_of(out) == before

    assert main([*args, "--methods", "sgd", "--overwrite"]) == 0
    assert sorted(p.name for p in (out / "runs").iterdir()) == ["sgd-seed0"]
    assert [r["method"] for r in json.loads((out / "summary.json").read_text())["rows"]] == \
        ["sgd"]


def test_out_on_a_file_or_a_read_only_folder(tmp_path, capsys, monkeypatch):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert_one_error(capsys, main(["train", "--out", str(a_file), *SMALL]), "is a file")
    assert_one_error(capsys, main(["compare", "--out", str(a_file / "sub"), *SMALL]), "is a file")
    assert a_file.read_text() == "x"

    locked = tmp_path / "locked"
    locked.mkdir()
    if os.geteuid() == 0:  # root writes anywhere: stand in for the permission check
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, m: Path(p) != locked and real(p, m))
    else:
        locked.chmod(0o500)
    assert_one_error(capsys, main(["train", "--out", str(locked / "run"), *SMALL]), "not writable")
    assert not (locked / "run").exists()


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    from ksam.lab import outputs as outputs

    target = tmp_path / "file.bin"
    outputs.atomic_write_bytes(target, b"old")

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(outputs.os, "replace", boom)
    with pytest.raises(OSError):
        outputs.atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"old"
    assert [p.name for p in Path(tmp_path).iterdir()] == ["file.bin"]


def test_a_folder_of_the_other_command_is_neither_resumed_nor_replaced(finished_run, tmp_path,
                                                                       capsys):
    out = copy_folder(finished_run, tmp_path / "train-run")
    before = files_of(out)
    def compare_args(folder: Path) -> list[str]:
        return ["compare", "--methods", "sgd", "--seeds", "1", "--epochs", "1",
                "--out", str(folder), *SMALL, *SHARED_LR]

    for again in ("--resume", "--overwrite"):
        assert_one_error(capsys, main([*compare_args(out), again]),
                   "holds the results of a `ksam train`, which `ksam compare` neither "
                   "resumes nor replaces")
        assert files_of(out) == before

    cmp = tmp_path / "cmp"
    assert main(compare_args(cmp)) == 0
    before = files_of(cmp)
    for again in ("--resume", "--overwrite"):
        assert_one_error(capsys, main(["train", "--method", "sgd", "--epochs", "1", "--out",
                                 str(cmp), again, *SMALL]),
                   "holds the results of a `ksam compare`, which `ksam train` neither")
        assert files_of(cmp) == before


def test_a_folder_written_before_manifests_is_still_told_apart(finished_run, tmp_path, capsys):
    out = tmp_path / "legacy"
    out.mkdir()
    for name, data in files_of(finished_run).items():
        if name != MANIFEST:
            (out / name).write_bytes(data)
    assert folder_contents(out) == ("train", list(TRAIN_OUTPUTS))
    assert_one_error(capsys, main(["compare", "--methods", "sgd", "--seeds", "1", "--epochs", "1",
                             "--out", str(out), "--resume", *SMALL, *SHARED_LR]),
               "holds the results of a `ksam train`")
    (out / "notes.txt").write_text("mine")
    assert main(["train", "--method", "sgd", "--epochs", "1", "--out", str(out), "--seed", "2",
                 "--overwrite", *SMALL]) == 0
    assert load_checkpoint(out / "checkpoint.pt")["config"]["seed"] == 2
    assert (out / "notes.txt").read_text() == "mine"


def test_overwrite_removes_what_ksam_wrote_and_nothing_else(tmp_path):
    out = tmp_path / "cmp"
    args = ["compare", "--seeds", "1", "--epochs", "1", "--out", str(out), *SMALL]
    assert main([*args, "--methods", "sgd", "sam", "--lr-sweep", "0.1"]) == 0
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["command"] == "compare"
    assert {"runs/sgd_lr_0.1-seed0", "runs/sam_lr_0.1-seed0", "lr-sweep/lr-0.1", "summary.md",
            "lr_sweep.md", "config.json"} <= set(manifest["paths"])
    assert json.loads((out / "runs" / "sam_lr_0.1-seed0" / MANIFEST).read_text()) == {
        "command": "train", "paths": ["config.json", "metrics.jsonl", "checkpoint.pt"]}
    mine = {"runs/mine/notes.txt": "a", "runs/own.txt": "b",
            "runs/sam_lr_0.1-seed0/keep.txt": "c", "lr-sweep/plan.txt": "d", "notes.md": "e"}
    for name, text in mine.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(text)

    assert main([*args, "--methods", "sgd", "--no-lr-sweep", "--overwrite"]) == 0
    for name, text in mine.items():
        assert (out / name).read_text() == text, name
    assert sorted(p.name for p in (out / "runs").iterdir()) == [
        "mine", "own.txt", "sam_lr_0.1-seed0", "sgd-seed0"]
    assert sorted(p.name for p in (out / "runs" / "sam_lr_0.1-seed0").iterdir()) == \
        ["keep.txt"]
    assert sorted(p.name for p in (out / "lr-sweep").iterdir()) == ["plan.txt"]
    assert not (out / "lr_sweep.md").exists()
    assert [r["method"] for r in json.loads((out / "summary.json").read_text())["rows"]] == \
        ["sgd"]
    assert set(json.loads((out / MANIFEST).read_text())["paths"]) == {
        "config.json", "runs/sgd-seed0", "accuracy_vs_cost.png", "summary.md",
        "summary.json", "metrics.csv", "accuracy_vs_time.png"}


def test_a_second_command_into_a_locked_folder_fails_naming_the_lock(tmp_path, capsys):
    out = tmp_path / "new"
    out.mkdir()
    with lock_held(out):
        for argv in (["compare", "--methods", "sgd", "--seeds", "1", *SHARED_LR],
                     ["train", "--method", "sgd"]):
            code = main([*argv, "--epochs", "1", "--out", str(out), *SMALL])
            assert_one_error(capsys, code, f"--out {out} is in use: another ksam command holds its "
                                     f"lock (an exclusive flock on the folder {out})")
            assert list(out.iterdir()) == []
    # the lock is the holder's only while it runs: now the folder takes a run
    assert main(["train", "--method", "sgd", "--epochs", "1", "--out", str(out), *SMALL]) == 0


def test_output_files_get_the_permissions_of_a_plain_open(tmp_path):
    from ksam.lab.outputs import atomic_write_bytes

    old = os.umask(0o027)
    try:
        atomic_write_bytes(tmp_path / "a.bin", b"x")
        assert (tmp_path / "a.bin").stat().st_mode & 0o777 == 0o640
        os.umask(0o002)
        assert main(["train", "--method", "sgd", "--epochs", "1", "--out",
                     str(tmp_path / "run"), *SMALL]) == 0
    finally:
        os.umask(old)
    for name in (*TRAIN_OUTPUTS, MANIFEST):
        assert (tmp_path / "run" / name).stat().st_mode & 0o777 == 0o664, name


# ------------------------------------------------------------------------------ argument validation

BAD = [
    ("unknown task", ["compare", "--task", "imagenet"], "unknown task"),
    ("unknown method", ["compare", "--methods", "sgd", "adamw"], "unknown method 'adamw'"),
    ("unknown method option", ["compare", "--methods", "sgd:rho=0.1"], "takes no option"),
    ("missing data dir", ["compare", "--task", "fashion-mnist", "--data-dir", "/nonexistent/x"],
     "/nonexistent/x"),
    ("k zero", ["compare", "--k", "0"], "k must be >= 1"),
    ("k above one", ["compare", "--k", "1.5"], "fraction in (0, 1]"),
    ("k larger than batch", ["compare", "--k", "500"], "larger than the batch"),
    ("negative rho", ["compare", "--rho", "-0.1"], "rho must be"),
    ("non-numeric", ["compare", "--epochs", "ten"], "invalid int value"),
    ("non-numeric k", ["train", "--k", "abc"], "not a number"),
    ("resume without checkpoint", ["train", "--resume"], "no checkpoint"),
    ("bad seeds", ["compare", "--seeds", "a,b"], "seeds must be"),
    ("unknown compile backend", ["train", "--compile", "nvcc"], "unknown torch.compile backend"),
    ("negative lr in a spec", ["compare", "--methods", "sgd", "sgd:lr=-1"], "lr must be"),
    ("negative lr in a sweep", ["compare", "--lr-sweep", "0.1", "-1"], "lr must be"),
    ("lr and lr sweep", ["compare", "--lr", "0.1", "--lr-sweep", "0.1", "0.2"],
     "exclude each other"),
    ("eval every 0", ["compare", "--eval-every", "0"], "eval_every must be an integer >= 1"),
    ("spec lr under a sweep", ["compare", "--methods", "sgd", "sam:lr=0.1", "--lr-sweep",
                               "0.1", "0.2"], "sets its own lr"),
]


@pytest.mark.parametrize("argv,message", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_one_line_no_traceback_nothing_written(tmp_path, argv, message):
    out = tmp_path / "out"
    tiny = [] if "--task" in argv else ["--task-option", "num_samples=600"]
    proc = subprocess.run(_python_ksam(*argv, "--out", str(out), "--quiet", *tiny),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ksam: error:"), proc.stderr
    assert message in err[0]
    assert "Traceback" not in proc.stderr
    assert not out.exists()


@pytest.mark.parametrize("argv,needle", [
    (["compare", "--rho", "inf"], "not a finite number"),
    (["compare", "--lr", "nan"], "not a finite number"),
    (["train", "--k", "inf"], "not a finite number"),
    (["compare", "--methods", "sgd", "sam:rho=inf"], "not a finite number"),
    (["train", "--method", "ksam:rho=nan"], "not a finite number"),
    (["compare", "--lr-sweep", "0.1", "inf"], "not a finite number"),
    (["compare", "--task-option", "num_samples=inf"], "not a finite number"),
    (["compare", "--seeds", "1,1"], "seed 1 given twice"),
    (["compare", "--seeds", "0,2,2"], "seed 2 given twice"),
    (["compare", "--methods", "sgd", "sgd"], "given twice"),
], ids=["rho", "lr", "k", "spec-rho", "train-spec", "sweep", "task-option", "seeds",
        "seeds-2", "spec-twice"])
def test_non_finite_options_and_repeats_areassert_one_error(tmp_path, capsys, argv, needle):
    out = tmp_path / "out"
    assert_one_error(capsys, main([*argv, "--out", str(out), "--quiet"]), needle)
    assert not out.exists()


def test_compare_refuses_a_repeated_seed():
    with pytest.raises(ValueError, match="given twice"):
        compare(TrainConfig(epochs=1), ["sgd"], [1, 1], None)


def test_out_of_range_labels_fail_before_anything_is_written(tmp_path, capsys):
    data = tmp_path / "fmnist"
    data.mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", 64), ("t10k", 16)):
        write_idx(data / f"{split}-images-idx3-ubyte.gz",
                  rng.integers(0, 256, (n, 28, 28)), 2051)
        labels = rng.integers(0, 10, n)
        labels[3] = 12 if split == "train" else labels[3]
        write_idx(data / f"{split}-labels-idx1-ubyte.gz", labels, 2049)
    out = tmp_path / "run"
    code = main(["train", "--task", "fashion-mnist", "--data-dir", str(data), "--method", "sgd",
                 "--epochs", "1", "--batch-size", "16", "--out", str(out), "--quiet"])
    assert_one_error(capsys, code, "training labels range over [0, 12]")
    assert not out.exists()


@pytest.mark.parametrize("argv,needle", [
    (["compare", "--seeds", "99999999999999999999"], "seeds asked for; at most 10000"),
    (["compare", "--seeds", "0,99999999999999999999"], "seed 99999999999999999999 is too large"),
    (["compare", "--seeds", "0,18446744073709551615"], "is too large: a seed is at most "
                                                       "18446744073709551614"),
    (["compare", "--seeds", "5-99999999999999999999"], "seeds asked for"),
    (["train", "--seed", "18446744073709551615"], "is too large"),
    (["compare", "--momentum", "5"], "momentum must be a finite number in [0, 1), got 5.0"),
    (["train", "--momentum", "1"], "momentum must be a finite number in [0, 1)"),
    (["compare", "--task-option", "=3"], "--task-option '=3' names no option"),
    (["train", "--task-option", "seed=3"], "'seed' is not a task option: give --seed"),
    (["train", "--task-option", "device=cpu"], "'device' is not a task option"),
    (["train", "--fsdp"], "--fsdp needs several processes (torchrun, WORLD_SIZE > 1)"),
    (["compare", "--selection", "global"], "--selection global needs several processes"),
    (["train", "--sync-perturbation", "--fsdp"], "--fsdp, --sync-perturbation need several"),
    (["train", "--micro-batch-size", "0"], "micro_batch_size must be an integer >= 1"),
], ids=["seed-count", "seed-list", "seed-2**64-1", "seed-range", "train-seed", "momentum",
        "momentum-1", "empty-task-option", "task-option-seed",
        "task-option-device", "fsdp", "global", "sync", "micro-batch"])
def test_bad_values_are_one_error_before_anything_runs(tmp_path, capsys, argv, needle):
    out = tmp_path / "out"
    assert_one_error(capsys, main([*argv, "--out", str(out), *SMALL]), needle)
    assert not out.exists()


def test_seeds_are_all_checked_by_the_configuration():
    from ksam.lab.config import MAX_SEED, parse_seeds

    assert parse_seeds(f"0,{MAX_SEED}") == [0, MAX_SEED]
    torch.Generator().manual_seed(MAX_SEED + 1)  # the data order's seed: torch takes it
    with pytest.raises(ValueError, match="too large"):
        parse_seeds([0, MAX_SEED + 1])
    with pytest.raises(ValueError, match="micro_batch_size must be an integer >= 1"):
        _cfg("train", "--micro-batch-size", "0")  # refused when the configuration is made


@pytest.mark.parametrize("env,needle", [
    ({"WORLD_SIZE": "2"}, "WORLD_SIZE=2 but RANK, MASTER_ADDR, MASTER_PORT not set"),
    ({"WORLD_SIZE": "2", "RANK": "0", "MASTER_PORT": "29500"}, "but MASTER_ADDR not set"),
    ({"WORLD_SIZE": "two"}, "WORLD_SIZE='two' is not a number of processes"),
    ({"WORLD_SIZE": "0"}, "WORLD_SIZE=0: need at least one process"),
], ids=["nothing", "no-addr", "not-a-number", "zero"])
def test_a_bad_torchrun_environment_isassert_one_error(tmp_path, capsys, monkeypatch, env, needle):
    for var in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    out = tmp_path / "out"
    for argv in (["train", "--method", "sgd"], ["compare", "--methods", "sgd", *SHARED_LR]):
        assert_one_error(capsys, main([*argv, "--epochs", "1", "--out", str(out), *SMALL]), needle)
        assert not out.exists()


def test_every_training_flag_says_what_it_does():
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name in ("compare", "train"):
        for action in commands.choices[name]._actions:
            assert action.help, (name, action.option_strings)
        help_text = commands.choices[name].format_help()
        for flag in ("--epochs", "--batch-size", "--lr"):
            assert flag in help_text


# ---------------------------------------------------------------------------- errors of ksam itself

@pytest.mark.parametrize("error", [KeyError("step"), TypeError("bad call"),
                                   AttributeError("no such attribute")])
def test_an_error_of_ksam_itself_shows_its_traceback(monkeypatch, capsys, error):
    import ksam.lab.cli

    def broken(cfg):
        raise error

    monkeypatch.setattr(ksam.lab.cli, "cmd_train", broken)
    with pytest.raises(type(error)):
        main(["train", "--quiet"])
    assert "ksam: error" not in capsys.readouterr().err


def test_user_errors_are_the_users_alone():
    from ksam.lab.cli import USER_ERRORS
    from ksam.lab.tasks.data import MissingDependencyError

    assert not any(issubclass(KeyError, e) or issubclass(ImportError, e)
                   or issubclass(RuntimeError, e) for e in USER_ERRORS)
    assert issubclass(MissingDependencyError, USER_ERRORS)


# -------------------------------------------------------------------------------- one configuration

def test_the_run_configuration_is_defined_once():
    from dataclasses import fields

    from ksam.lab.config import RunConfig
    from ksam.lab.train import TrainConfig

    run = [f.name for f in fields(RunConfig)]
    assert [f.name for f in fields(TrainConfig)] == [*run, "method", "method_options", "steps"]
    cli = [f.name for f in fields(CliConfig)]
    assert cli[:len(run)] == run  # the command line adds only its own fields
    assert not {"method", "method_options", "steps"} & set(cli)
    for name in ("schedule", "selection"):  # the engine's Schedule, the selection rule
        assert name not in run and name not in cli
    cfg = _cfg("train", "--schedule", "constant", "--selection", "local", "--seed", "4")
    base = cfg.train_config()
    assert (base.lr_schedule, base.selection_scope, base.seed) == ("constant", "local", 4)
    assert base.task_options == cfg.task_kwargs()
    # a preset or a saved file may still say "schedule": it is read as lr_schedule
    assert CliConfig.from_layers({"schedule": "constant"}).lr_schedule == "constant"


# ---------------------------------------------------------------------------------- tasks and bench

def test_tasks_lists_the_registry(capsys):
    assert main(["tasks"]) == 0
    out = capsys.readouterr().out
    for name in ("mnist1d", "fashion-mnist", "cifar10", "cifar100", "text"):
        assert name in out
    assert "defaults: epochs 50, batch 128, lr 0.1, momentum 0.9, weight decay 0.0005 (lr 0.2 " \
           "with model=mlp)" in out
    assert "defaults: epochs 10, batch 128, lr 0.05" in out  # fashion-mnist
    assert "FILE.py:FUNCTION a task of your own" in out


def test_every_task_builds_the_defaults_it_lists():
    from ksam.lab.tasks import TASKS, get_task

    for name in ("mnist1d", "text"):  # the tasks that build offline
        assert get_task(name).defaults == TASKS[name].defaults, name


def test_bench_quick_prints_ratios(tmp_path, capsys):
    path = tmp_path / "bench.json"
    code = main(["bench", "--quick", "--device", "cpu", "--steps", "2", "--warmup", "1",
                 "--cases", "mnist1d-cnn-b128", "--json", str(path)])
    assert code == 0
    rows = json.loads(path.read_text())
    methods = [r["method"] for r in rows]
    assert methods[0] == "sgd" and "ksam K=B/8" in methods and "esam" in methods
    assert rows[0]["ratio_to_sgd"] == 1.0
    assert "| mnist1d-cnn-b128 | fp32 | eager | ksam K=B/8 |" in capsys.readouterr().out


def test_bench_profile_and_compile(tmp_path, capsys):
    import torch._dynamo

    torch._dynamo.reset()
    path = tmp_path / "bench.json"
    code = main(["bench", "--quick", "--device", "cpu", "--steps", "2", "--warmup", "1",
                 "--cases", "mnist1d-cnn-b128", "--methods", "sam", "ksam", "--profile",
                 "--compile", "aot_eager", "--json", str(path)])
    assert code == 0
    all_rows = json.loads(path.read_text())
    # every method without and with compile, side by side in one run
    assert [r["mode"] for r in all_rows] == ["eager"] * 5 + ["eager+compile(aot_eager)"] * 5
    assert all_rows[0]["ratio_to_sgd"] == all_rows[5]["ratio_to_sgd"] == 1.0
    assert all_rows[0]["ratio_to_plain_sgd"] == 1.0
    assert all_rows[5]["ratio_to_plain_sgd"] > 0
    rows = {r["method"]: r for r in all_rows[5:]}
    # ATen ops issued by one step: a pass issues the same ops whatever its batch size, so
    # K-SAM (scoring forward + two subset passes + selection) issues more than SAM, and SAM
    # (two passes) more than SGD (one).
    ops = {m: rows[m]["ops"] for m in ("sgd", "sam", "ksam K=B/8")}
    assert 0 < ops["sgd"] < ops["sam"] < ops["ksam K=B/8"], ops
    assert rows["ksam K=B/2"]["ops"] == rows["ksam K=B/8"]["ops"]
    assert "| ops |" in capsys.readouterr().out
