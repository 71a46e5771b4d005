"""``ksam compare --ray``: the same results as the serial command, run by run and bit for
bit; a killed worker retried from its checkpoint; ``--resume`` of an interrupted command;
results sent back through Ray where the workers do not share the file system; bad input.

One local Ray instance of 2 CPUs serves the whole module (``--ray`` joins the instance a
process is connected to), its workers on one thread each; the serial runs of the driver run
on one thread too (results are bit-identical only at the same number of threads).
"""

from __future__ import annotations

import builtins
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch

ray = pytest.importorskip("ray")

from ksam.lab.cli import main  # noqa: E402
from ksam.lab.cluster import SHARED_FS_ENV, RayRunner  # noqa: E402
from ksam.lab.compare import GridRun  # noqa: E402
from ksam.lab.outputs import MANIFEST, load_checkpoint  # noqa: E402
from ksam.lab.train import TrainConfig  # noqa: E402

SMALL = ["--task", "mnist1d", "--task-option", "num_samples=600", "--batch-size", "32",
         "--quiet"]
#: The grid of the equality test: 3 methods x 2 seeds, an lr sweep over 2 values first.
GRID = ["compare", "--methods", "sgd", "sam", "ksam", "--seeds", "0,1", "--epochs", "2",
        "--lr-sweep", "0.1", "0.2", *SMALL]
#: Runs long enough to be stopped in the middle (8 epochs of 25 steps).
LONG = ["--task", "mnist1d", "--task-option", "num_samples=1000", "--batch-size", "32",
        "--quiet", "--no-lr-sweep"]
#: Columns of the report that are wall-clock times (they differ from run to run).
TIME_COLUMNS = {"train time s", "steps/s", "step ms (median)"}
TIME_FIELDS = {"epoch_time", "train_time", "step_time_median"}


@pytest.fixture(scope="module", autouse=True)
def ray_instance():
    printer = builtins.print  # Ray may replace it in the driver (see ksam.cluster.import_ray)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    yield ray
    ray.shutdown()
    torch.set_num_threads(threads)
    builtins.print = printer


def _one_error(capsys, code: int, needle: str) -> None:
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("ksam: error:"), err
    assert needle in err[0], err[0]


def _table(markdown: str) -> list[dict[str, str]]:
    """The rows of the report's table, without its time columns (``time / ...`` too)."""
    lines = [line for line in markdown.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = [dict(zip(header, (c.strip() for c in line.strip("|").split("|"))))
            for line in lines[1:]]
    return [{k: v for k, v in row.items() if k not in TIME_COLUMNS
             and not k.startswith("time / ")} for row in rows]


def _epochs(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in TIME_FIELDS} for row in rows]


def _run_dirs(out: Path) -> list[Path]:
    return sorted(p.parent for p in out.rglob("metrics.jsonl"))


def _holders(folder: Path) -> set[int]:
    """The processes (other than this one) with a file or folder under ``folder`` open: a
    run holds its folder's lock (an open descriptor) while it trains."""
    found = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if any(os.readlink(fd).startswith(str(folder)) for fd in (proc / "fd").iterdir()):
                found.add(int(proc.name))
        except OSError:  # gone, or not ours to read
            continue
    return found


def _wait(condition, timeout: float = 600.0, step: float = 0.01) -> None:
    # generous: a loaded 2-core machine starts Ray workers slowly; the condition, not the
    # time, is what the tests check
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(step)


@pytest.fixture(scope="module")
def grids(tmp_path_factory):
    """The same grid run without and with --ray."""
    root = tmp_path_factory.mktemp("grid")
    assert main([*GRID, "--out", str(root / "serial")]) == 0
    assert main([*GRID, "--out", str(root / "ray"), "--ray"]) == 0
    return root / "serial", root / "ray"


# ------------------------------------------------------------------- the same results

def test_ray_grid_gives_the_serial_results_run_by_run(grids):
    serial, ray_out = grids
    a, b = (json.loads((d / "summary.json").read_text()) for d in grids)
    assert [(r["label"], r["seed"], r["final"]["test_acc"]) for r in a["runs"]] == \
        [(r["label"], r["seed"], r["final"]["test_acc"]) for r in b["runs"]]
    sweep_a, sweep_b = (json.loads((d / "lr_sweep.json").read_text()) for d in grids)
    assert sweep_a["chosen"] == sweep_b["chosen"]
    assert sweep_a["validation"] == sweep_b["validation"]
    dirs = _run_dirs(serial)
    assert len(dirs) == 3 * 2 * 3  # (2 sweep lrs + the comparison) x methods x seeds
    assert [d.relative_to(serial) for d in dirs] == \
        [d.relative_to(ray_out) for d in _run_dirs(ray_out)]
    for d in dirs:  # every epoch's losses and accuracies, bit for bit
        other = ray_out / d.relative_to(serial)
        assert _epochs(d) == _epochs(other), d
        assert (d / "config.json").read_bytes() == (other / "config.json").read_bytes()


def test_ray_grid_writes_the_serial_report(grids):
    serial, ray_out = grids
    for md in ("summary.md", *(str(p.relative_to(serial))
                               for p in serial.glob("lr-sweep/*/summary.md"))):
        assert _table((serial / md).read_text()) == _table((ray_out / md).read_text()), md
    assert (serial / "lr_sweep.md").read_text() == (ray_out / "lr_sweep.md").read_text()
    for name in ("accuracy_vs_time.png", "accuracy_vs_cost.png", "metrics.csv"):
        assert (ray_out / name).stat().st_size > 0
    csv_a, csv_b = ((d / "metrics.csv").read_text().splitlines() for d in grids)
    header = csv_a[0].split(",")
    keep = [i for i, name in enumerate(header) if name not in TIME_FIELDS]
    assert [[row.split(",")[i] for i in keep] for row in csv_a] == \
        [[row.split(",")[i] for i in keep] for row in csv_b]
    runs = json.loads((ray_out / "summary.json").read_text())["runs"]
    assert all(r["node_id"] and r["host"] and r["device_name"] for r in runs)
    assert "Runs ran on: " in (ray_out / "summary.md").read_text()
    assert not list(ray_out.rglob(".ksam-probe-*"))  # the probe of a shared file system


def test_an_equal_budget_grid_on_ray_is_the_serial_one(task_file, tmp_path):
    # the workers import the task of the user's file by its path
    grid = ["compare", "--task", f"{task_file}:task", "--methods", "sgd", "sam", "ksam:k=4",
            "--seeds", "2", "--no-lr-sweep", "--budget", "passes", "--quiet"]
    serial, on_ray = tmp_path / "serial", tmp_path / "ray"
    assert main([*grid, "--jobs", "1", "--out", str(serial)]) == 0
    assert main([*grid, "--ray", "--out", str(on_ray)]) == 0
    dirs = _run_dirs(serial)
    assert len(dirs) == 6 + 4  # the equal-epochs grid, the budget grid without SGD
    assert [d.relative_to(serial) for d in dirs] == [d.relative_to(on_ray)
                                                     for d in _run_dirs(on_ray)]
    for d in dirs:
        other = on_ray / d.relative_to(serial)
        assert _epochs(d) == _epochs(other), d
        assert (d / "config.json").read_bytes() == (other / "config.json").read_bytes()
    a, b = (json.loads((d / "summary.json").read_text()) for d in (serial, on_ray))
    assert _table(a["budget"]["table"]) == _table(b["budget"]["table"])
    assert [r["final"]["passes"] for r in a["budget"]["runs"]] == \
        [r["final"]["passes"] for r in b["budget"]["runs"]]


def test_compare_without_ray_never_imports_it(tmp_path):
    code = ("import sys; from ksam.lab.cli import main; "
            f"code = main(['compare', '--methods', 'sgd', '--seeds', '1', '--epochs', '1', "
            f"'--no-lr-sweep', '--task-option', 'num_samples=300', '--batch-size', '32', "
            f"'--quiet', '--out', {str(tmp_path / 'c')!r}]); "
            "assert code == 0; assert 'ray' not in sys.modules, 'ray imported'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    assert done.returncode == 0, done.stderr


# ------------------------------------------------------------------- failures

@pytest.mark.skipif(sys.platform != "linux", reason="finds the worker through /proc")
def test_a_killed_worker_is_retried_from_its_checkpoint(tmp_path):
    args = ["compare", "--methods", "ksam", "--seeds", "1", "--epochs", "8", *LONG]
    assert main([*args, "--out", str(tmp_path / "full")]) == 0
    out = tmp_path / "killed"
    run_dir = out / "runs" / "ksam-seed0"
    codes: list[int] = []
    driver = threading.Thread(target=lambda: codes.append(
        main([*args, "--out", str(out), "--ray"])))
    driver.start()
    try:
        _wait(lambda: (run_dir / "checkpoint.pt").exists())
        workers = _holders(run_dir)
        at_kill = load_checkpoint(run_dir / "checkpoint.pt")["epoch"]
        assert len(workers) == 1 and 1 <= at_kill < 8, (workers, at_kill)
        os.kill(workers.pop(), signal.SIGKILL)
    finally:
        driver.join(timeout=300)
    assert codes == [0]
    assert _epochs(run_dir) == _epochs(tmp_path / "full" / "runs" / "ksam-seed0")
    a, b = (load_checkpoint(d / "runs" / "ksam-seed0" / "checkpoint.pt")
            for d in (tmp_path / "full", out))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


@pytest.mark.skipif(sys.platform != "linux", reason="waits for the workers through /proc")
def test_resume_after_an_interrupted_ray_command_trains_only_what_is_missing(tmp_path):
    out = tmp_path / "cmp"
    args = ["compare", "--methods", "sgd", "ksam", "--seeds", "0,1", "--epochs", "6", *LONG,
            "--out", str(out)]
    address = ray.get_runtime_context().gcs_address  # the driver joins the running cluster
    proc = subprocess.Popen([sys.executable, "-m", "ksam", *args, "--ray", address],
                            env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def finished() -> list[Path]:  # its last checkpoint written (after its metrics)
        return [d for d in _run_dirs(out) if (d / "checkpoint.pt").exists()
                and load_checkpoint(d / "checkpoint.pt")["epoch"] == 6]

    try:
        _wait(lambda: finished() or proc.poll() is not None, timeout=600, step=0.05)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, "the command ended before it was interrupted"
    _wait(lambda: not _holders(out), timeout=600, step=0.1)  # its tasks are cancelled
    kept = {d: (d / "metrics.jsonl").stat().st_mtime_ns for d in finished()}
    assert 1 <= len(kept) < 4
    assert main([*args, "--resume", "--ray"]) == 0
    dirs = _run_dirs(out)
    assert len(dirs) == 4 and all(len(_epochs(d)) == 6 for d in dirs)
    trained = [d for d in dirs if kept.get(d) != (d / "metrics.jsonl").stat().st_mtime_ns]
    assert len(trained) == 4 - len(kept)
    rows = json.loads((out / "summary.json").read_text())["rows"]
    assert [(r["method"], r["seeds"]) for r in rows] == [("sgd", 2), ("ksam", 2)]


def test_a_bad_run_fails_the_command_with_its_own_error(tmp_path):
    cfg = TrainConfig(method="sgd", epochs=1, batch_size=10_000,
                      task_options={"num_samples": 300})
    bad = GridRun(cfg, "sgd", 0, 0, tmp_path / "bad", False, False, "bad")
    with RayRunner() as runner, pytest.raises(ValueError, match="larger than the training"):
        runner.execute([bad])


# ------------------------------------------------------------------- no shared file system

def test_without_a_shared_file_system_the_driver_writes_the_results(tmp_path, monkeypatch):
    args = ["compare", "--methods", "sgd", "ksam", "--seeds", "1", "--epochs", "2",
            "--no-lr-sweep", *SMALL, "--ray"]
    assert main([*args, "--out", str(tmp_path / "shared")]) == 0
    monkeypatch.setenv(SHARED_FS_ENV, "0")
    sent = tmp_path / "sent"
    scratch = set(Path(tempfile.gettempdir()).glob("ksam-ray-*"))
    assert main([*args, "--out", str(sent)]) == 0
    assert set(Path(tempfile.gettempdir()).glob("ksam-ray-*")) == scratch  # removed
    for d in _run_dirs(tmp_path / "shared"):
        other = sent / d.relative_to(tmp_path / "shared")
        assert sorted(p.name for p in d.iterdir()) == sorted(p.name for p in other.iterdir())
        for name in ("config.json", MANIFEST):
            assert (d / name).read_bytes() == (other / name).read_bytes(), name
        assert _epochs(d) == _epochs(other)
        a, b = load_checkpoint(d / "checkpoint.pt"), load_checkpoint(other / "checkpoint.pt")
        assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    before = {d: (d / "checkpoint.pt").stat().st_mtime_ns for d in _run_dirs(sent)}
    assert main([*args, "--out", str(sent), "--resume"]) == 0  # finished runs: only re-read
    assert before == {d: (d / "checkpoint.pt").stat().st_mtime_ns for d in _run_dirs(sent)}


# ------------------------------------------------------------------- bad input

TINY_CMP = ["compare", "--methods", "sgd", "--seeds", "1", "--epochs", "1", "--no-lr-sweep",
            *SMALL]


@pytest.mark.parametrize("extra,needle", [
    (["--ray", "127.0.0.1:1"], "no Ray cluster reachable there"),
    (["--ray", "--gpus-per-run", "1"], "the Ray cluster has 0 GPU(s)"),
    (["--ray", "--cpus-per-run", "64"], "the Ray cluster has 2 CPU(s)"),
    (["--cpus-per-run", "1"], "--cpus-per-run sizes the Ray task of each run: give --ray"),
    (["--gpus-per-run", "1"], "--gpus-per-run sizes the Ray task of each run: give --ray"),
    (["--ray", "--cpus-per-run", "0"], "--cpus-per-run must be a finite number > 0"),
], ids=["unreachable", "no-gpus", "too-many-cpus", "cpus-without-ray", "gpus-without-ray",
        "zero-cpus"])
def test_bad_ray_input_is_one_error_line_and_writes_nothing(tmp_path, capsys, extra, needle):
    out = tmp_path / "c"
    _one_error(capsys, main([*TINY_CMP, "--out", str(out), *extra]), needle)
    assert not out.exists()


def test_ray_without_the_extra_installed_is_one_error_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails
    out = tmp_path / "c"
    _one_error(capsys, main([*TINY_CMP, "--out", str(out), "--ray"]),
               'pip install "ksam[ray]"')
    assert not out.exists()
