"""The command line under hostile use: each case gives one ``ksam: error:`` line and touches
nothing, or runs as documented (paths, checkpoints, output folders, non-finite options,
duplicate seeds, bad label files)."""

from __future__ import annotations

import gzip
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from ksam.cli import build_parser, config_from_args, main
from ksam.compare import accuracy_vs_cost, compare
from ksam.config import DEFAULT_LR_SWEEP, CliConfig
from ksam.train import TrainConfig, load_checkpoint, save_checkpoint

TINY = ["--task-option", "num_samples=300", "--batch-size", "32", "--quiet"]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _one_error(capsys, code: int, needle: str) -> None:
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("ksam: error:"), err
    assert needle in err[0], err[0]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "one"
    assert main(["train", "--method", "sgd", "--epochs", "1", "--out", str(out), *TINY]) == 0
    return out


# --------------------------------------------------------------------------- 2: --data-dir

def test_data_dir_is_written_as_a_string_and_resumes(tmp_path, capsys):
    data, out = tmp_path / "data", tmp_path / "run"
    data.mkdir()
    args = ["train", "--method", "sgd", "--data-dir", str(data), "--out", str(out), *TINY]
    assert main([*args, "--epochs", "1"]) == 0
    assert json.loads((out / "config.json").read_text())["task_options"]["data_dir"] == \
        str(data)
    assert main([*args, "--epochs", "1", "--resume"]) == 0  # same configuration: continues

    cmp = tmp_path / "cmp"
    assert main(["compare", "--methods", "sgd", "--seeds", "1", "--epochs", "1",
                 "--no-lr-sweep", "--data-dir", str(data), "--out", str(cmp), *TINY]) == 0
    saved = json.loads((cmp / "config.json").read_text())
    assert saved["base"]["task_options"]["data_dir"] == str(data)


# --------------------------------------------------------------------------- 3, 7: checkpoints

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
    out = tmp_path / "copy"
    out.mkdir()
    for name, data in _snapshot(finished_run).items():
        (out / name).write_bytes(data)
    ckpt = out / "checkpoint.pt"
    ckpt.write_bytes(damage(ckpt.read_bytes()))
    before = _snapshot(out)
    code = main(["train", "--method", "sgd", "--epochs", "2", "--out", str(out), "--resume",
                 *TINY])
    _one_error(capsys, code, needle)
    assert _snapshot(out) == before


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


# --------------------------------------------------------------------------- 4: --out

def test_train_refuses_a_finished_run_unless_resume_or_overwrite(finished_run, tmp_path,
                                                                 capsys):
    out = tmp_path / "again"
    out.mkdir()
    for name, data in _snapshot(finished_run).items():
        (out / name).write_bytes(data)
    (out / "notes.txt").write_text("mine")
    before = _snapshot(out)
    args = ["train", "--method", "sgd", "--epochs", "1", "--out", str(out), *TINY]
    _one_error(capsys, main(args), "is not empty")
    assert _snapshot(out) == before
    _one_error(capsys, main([*args, "--resume", "--overwrite"]), "not allowed with")

    assert main([*args, "--seed", "1", "--overwrite"]) == 0
    assert json.loads((out / "config.json").read_text())["seed"] == 1
    assert load_checkpoint(out / "checkpoint.pt")["config"]["seed"] == 1
    assert (out / "notes.txt").read_text() == "mine"  # not ksam's: left alone


def test_compare_refuses_another_comparison_and_overwrite_removes_stale_runs(tmp_path, capsys):
    out = tmp_path / "cmp"
    args = ["compare", "--seeds", "1", "--epochs", "1", "--no-lr-sweep", "--out", str(out),
            *TINY]
    assert main([*args, "--methods", "sgd", "sam"]) == 0
    assert (out / "runs" / "sam-seed0").is_dir()
    before = _snapshot(out)
    _one_error(capsys, main([*args, "--methods", "sgd"]), "is not empty")
    assert _snapshot(out) == before

    assert main([*args, "--methods", "sgd", "--overwrite"]) == 0
    assert sorted(p.name for p in (out / "runs").iterdir()) == ["sgd-seed0"]
    assert [r["method"] for r in json.loads((out / "summary.json").read_text())["rows"]] == \
        ["sgd"]


def test_out_on_a_file_or_a_read_only_folder(tmp_path, capsys, monkeypatch):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    _one_error(capsys, main(["train", "--out", str(a_file), *TINY]), "is a file")
    _one_error(capsys, main(["compare", "--out", str(a_file / "sub"), *TINY]), "is a file")
    assert a_file.read_text() == "x"

    locked = tmp_path / "locked"
    locked.mkdir()
    if os.geteuid() == 0:  # root writes anywhere: stand in for the permission check
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, m: Path(p) != locked and real(p, m))
    else:
        locked.chmod(0o500)
    _one_error(capsys, main(["train", "--out", str(locked / "run"), *TINY]), "not writable")
    assert not (locked / "run").exists()


# --------------------------------------------------------------------------- 5, 6: values

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
def test_non_finite_options_and_repeats_are_one_error(tmp_path, capsys, argv, needle):
    out = tmp_path / "out"
    _one_error(capsys, main([*argv, "--out", str(out), "--quiet"]), needle)
    assert not out.exists()


def test_compare_refuses_a_repeated_seed():
    with pytest.raises(ValueError, match="given twice"):
        compare(TrainConfig(epochs=1), ["sgd"], [1, 1], None)


# --------------------------------------------------------------------------- 7: bad labels

def _write_idx(path: Path, array: np.ndarray, magic: int) -> None:
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_out_of_range_labels_fail_before_anything_is_written(tmp_path, capsys):
    data = tmp_path / "fmnist"
    data.mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", 64), ("t10k", 16)):
        _write_idx(data / f"{split}-images-idx3-ubyte.gz",
                   rng.integers(0, 256, (n, 28, 28)), 2051)
        labels = rng.integers(0, 10, n)
        labels[3] = 12 if split == "train" else labels[3]
        _write_idx(data / f"{split}-labels-idx1-ubyte.gz", labels, 2049)
    out = tmp_path / "run"
    code = main(["train", "--task", "fashion-mnist", "--data-dir", str(data), "--method", "sgd",
                 "--epochs", "1", "--batch-size", "16", "--out", str(out), "--quiet"])
    _one_error(capsys, code, "training labels range over [0, 12]")
    assert not out.exists()


# --------------------------------------------------------------------------- configuration

def _cfg(*argv: str) -> CliConfig:
    return config_from_args(build_parser().parse_args(list(argv)))


def test_default_compare_sweeps_each_lr_and_a_given_lr_does_not():
    assert _cfg("compare").sweep_lrs == list(DEFAULT_LR_SWEEP)
    assert _cfg("compare", "--lr-sweep", "0.1", "0.3").sweep_lrs == [0.1, 0.3]
    assert _cfg("compare", "--lr", "0.1").sweep_lrs is None
    assert _cfg("compare", "--no-lr-sweep").sweep_lrs is None
    assert _cfg("compare", "--methods", "sgd:lr=0.2", "sam").sweep_lrs is None
    assert _cfg("compare", "--preset", "mnist1d").sweep_lrs is None  # the preset's lr
    assert _cfg("compare", "--validation-split", "0.2").sweep_lrs is None  # a tuning run
    assert _cfg("compare", "--validation-split", "0.3", "--lr-sweep", "0.1").sweep_lrs == [0.1]


def test_default_compare_reports_each_methods_lr(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", "--methods", "sgd", "--seeds", "1", "--epochs", "1",
                 "--out", str(out), *TINY]) == 0
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
                 "--out", str(shared), *TINY]) == 0
    assert "one shared lr (0.1) for every method" in (shared / "summary.md").read_text()
    assert not (shared / "lr_sweep.md").exists()


# --------------------------------------------------------------------------- accuracy vs cost

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


def test_compare_writes_the_accuracy_vs_cost_chart(tmp_path):
    report = compare(TrainConfig(epochs=1, batch_size=32, task_options={"num_samples": 300}),
                     ["sgd", "ksam:k=8"], [0, 1], tmp_path / "c")
    summary = json.loads((tmp_path / "c" / "summary.json").read_text())
    assert summary["accuracy_vs_cost"] == accuracy_vs_cost(report["runs"], "sgd")
    assert summary["accuracy_vs_cost"][0]["method"] == "sgd"
    png = tmp_path / "c" / "accuracy_vs_cost.png"
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_sgd_at_its_own_lr_is_the_reference(tmp_path):
    report = compare(TrainConfig(epochs=1, batch_size=32, task_options={"num_samples": 300}),
                     ["sam:lr=0.2", "sgd:lr=0.2"], [0], None)
    assert report["reference"] == "sgd:lr=0.2"
    assert report["rows"][1]["time_vs_ref"] == 1.0
