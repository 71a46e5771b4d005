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
    from ksam.lab.tasks import TASKS

    text = README.read_text()
    table = text[text.index("### Tasks and their data"):]
    table = table[:table.index("\n\n", table.index("| task |"))]
    named = {name for row in table.splitlines()[2:]
             for name in re.findall(r"`([a-z0-9-]+)`", row.split("|")[1])}
    assert named == set(TASKS)


def _py_blocks(path: Path) -> list[str]:
    return re.findall(r"```py\n(.*?)```", path.read_text(), flags=re.S)


def test_the_worked_example_is_the_file_it_names():
    example = (README.parent / "examples" / "digits_task.py").read_text()
    code = example[example.index('"""', 3) + 3:].lstrip()  # without the docstring
    guide = README.parent / "docs" / "guide" / "compare.md"
    assert code in [b for b in _py_blocks(guide) if "load_digits" in b]
    assert "examples/digits_task.py" in README.read_text()


def test_the_compare_example_runs(tmp_path, monkeypatch):
    import ksam

    real, calls = ksam.compare, []

    def small(task, methods, **options):  # the README's call, at 1 seed and 1 epoch
        calls.append(dict(options))
        return real(task, methods, **{**options, "seeds": 1, "epochs": 1, "quiet": True})

    monkeypatch.setattr(ksam, "compare", small)
    monkeypatch.chdir(tmp_path)
    for doc in (README, README.parent / "docs" / "guide" / "compare.md"):
        blocks = [b for b in _py_blocks(doc) if "ksam.compare(" in b]
        assert len(blocks) == 1, doc
        exec(compile(blocks[0], str(doc), "exec"), {"__name__": "__readme__"})
        assert calls[-1]["budget"] == "passes"
        summary = (tmp_path / "runs" / "mine" / "summary.md").read_text()
        assert "## Equal budget: passes" in summary
        monkeypatch.chdir(tmp_path / "runs")  # the second document writes a folder of its own
