"""The command line: compare, train, resume after a real kill, and bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ksam.cli import main
from ksam.train import load_checkpoint

TINY = ["--task-option", "num_samples=600", "--batch-size", "32", "--quiet"]
SHARED_LR = ["--no-lr-sweep"]  # one shared lr: no lr sweep before the comparison


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
    from ksam.compare import compare
    from ksam.train import TrainConfig

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


def test_same_seed_same_initial_weights_for_every_method(tmp_path):
    from ksam.train import TrainConfig, train

    inits = []
    for method in ("sgd", "ksam"):
        cfg = TrainConfig(method=method, epochs=1, batch_size=32, seed=3,
                          task_options={"num_samples": 600})
        cfg.epochs = 1
        result = train(cfg)
        inits.append(result)
    # Different methods, different trajectories, but the same seed gives the same init:
    torch.manual_seed(3)
    from ksam.tasks import get_task

    task = get_task("mnist1d", num_samples=600)
    torch.manual_seed(3)
    a = task.make_model().state_dict()
    torch.manual_seed(3)
    b = task.make_model().state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def _python_ksam(*args: str) -> list[str]:
    return [sys.executable, "-m", "ksam", *args]


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


def test_tasks_lists_the_registry(capsys):
    assert main(["tasks"]) == 0
    out = capsys.readouterr().out
    for name in ("mnist1d", "fashion-mnist", "cifar10", "cifar100", "text"):
        assert name in out


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


def test_train_with_compile_matches_eager(tmp_path):
    from ksam.train import TrainConfig, train

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


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    from ksam import train as train_mod

    target = tmp_path / "file.bin"
    train_mod.atomic_write_bytes(target, b"old")

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(train_mod.os, "replace", boom)
    with pytest.raises(OSError):
        train_mod.atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"old"
    assert [p.name for p in Path(tmp_path).iterdir()] == ["file.bin"]
