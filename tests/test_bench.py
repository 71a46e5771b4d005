"""``ksam bench --memory``: the table of step peak memory, micro-batched rows included."""

from __future__ import annotations

import json

from ksam.cli import main


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
