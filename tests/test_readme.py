"""The README's training-loop example runs as written."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs(tmp_path, monkeypatch, capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    monkeypatch.chdir(tmp_path)
    exec(compile(blocks[0], "README.md", "exec"), {"__name__": "__readme__"})
    printed = capsys.readouterr().out.split()
    assert float(printed[0]) > 0
    assert (tmp_path / "ksam_state.pt").exists()


def test_readme_task_table_lists_every_task():
    from ksam.tasks import TASKS

    text = README.read_text()
    table = text[text.index("### Tasks and their data"):]
    table = table[:table.index("\n\n", table.index("| task |"))]
    named = {name for row in table.splitlines()[2:]
             for name in re.findall(r"`([a-z0-9-]+)`", row.split("|")[1])}
    assert named == set(TASKS)
