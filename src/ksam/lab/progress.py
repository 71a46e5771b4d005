"""Progress of a command's runs: a bar on a terminal, else one line per finished run.

:class:`EpochProgress` follows runs trained one after the other in this process (the bar
moves every epoch); :class:`RunProgress` runs trained elsewhere, in parallel (worker
processes, Ray tasks: done / running / queued and an ETA). Both take ``finished(title,
result)`` after each run, ``result`` as :func:`ksam.lab.compare.run_one` returns it, and
``total``, the runs still expected, which a command may correct as it learns them.
"""

from __future__ import annotations

import sys
import time
from typing import Any

__all__ = ["EpochProgress", "RunProgress", "accuracy_words"]


def accuracy_words(result: dict[str, Any]) -> str:
    """``"accuracy 91.20 %"``, or ``"validation accuracy ..."`` for a run evaluated on a
    held-out part of the training set."""
    final = result["final"]
    acc = "-" if final.get("test_acc") is None else f"{final['test_acc']:.2f}"
    held_out = (result.get("config") or {}).get("task_options", {}).get("validation_split")
    return f"{'validation accuracy' if held_out else 'accuracy'} {acc} %"


def _bar(total: int | None, unit: str) -> Any:
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit=unit, dynamic_ncols=True)


class EpochProgress:
    """Runs trained one after the other in this process: ``progress(title, row)`` after
    every epoch moves the bar's description; :meth:`finished` counts the run (without a
    terminal, one line: ``run 3/9 done: sam seed 1: accuracy ...``)."""

    def __init__(self, total: int, quiet: bool) -> None:
        self.total, self.quiet, self.done = total, quiet, 0
        self.bar = _bar(total, "run") if not quiet and sys.stdout.isatty() else None

    def __call__(self, title: str, row: dict[str, Any]) -> None:
        if self.bar is not None:
            acc = "-" if row["test_acc"] is None else f"{row['test_acc']:.2f}"
            self.bar.set_description(f"{title} epoch {row['epoch']}")
            self.bar.set_postfix(acc=acc, loss=f"{row['train_loss']:.3f}")

    def finished(self, title: str, result: dict[str, Any]) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.total = self.total
            self.bar.update(1)
        elif not self.quiet:
            final = result["final"]
            print(f"run {self.done}/{self.total} done: {title}: {accuracy_words(result)}, "
                  f"train loss {final['train_loss']:.4f}, {final['train_time']:.1f} s",
                  flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class RunProgress:
    """One display over the runs of a command: done / running / queued and an ETA (from
    the runs finished so far per second of wall-clock). A tqdm bar on a terminal, else one
    line per finished run; nothing when ``quiet``. ``running`` counts the runs submitted
    and not done, up to the ``slots`` that run at once."""

    def __init__(self, total: int | None, slots: int, quiet: bool) -> None:
        self.total, self.slots, self.quiet = total, slots, quiet
        self.done = self.in_flight = 0
        self.start: float | None = None
        self.bar = _bar(total, "run") if not quiet and sys.stdout.isatty() else None

    def submitted(self, n: int) -> None:
        if self.start is None:
            self.start = time.perf_counter()
        self.in_flight += n
        self._show_state()

    def state(self) -> dict[str, Any]:
        """``done``, ``running``, ``queued`` and ``eta_s`` (None before a run finished or
        without a total)."""
        running = min(self.in_flight, self.slots)
        eta = None
        if self.done and self.total is not None and self.start is not None:
            rate = self.done / (time.perf_counter() - self.start)
            eta = max(0, self.total - self.done) / rate
        return {"done": self.done, "running": running, "queued": self.in_flight - running,
                "eta_s": eta}

    def finished(self, title: str, result: dict[str, Any]) -> None:
        self.done += 1
        self.in_flight -= 1
        if self.bar is not None:
            self.bar.total = self.total
            self.bar.update(1)
            self._show_state()
        elif not self.quiet:
            final, s = result["final"], self.state()
            eta = "-" if s["eta_s"] is None else _clock(s["eta_s"])
            total = "?" if self.total is None else self.total
            print(f"run {self.done}/{total} done: {title}: {accuracy_words(result)}, "
                  f"{final.get('train_time', 0.0):.1f} s on {result.get('host')}; "
                  f"{s['running']} running, {s['queued']} queued, ETA {eta}", flush=True)

    def _show_state(self) -> None:
        if self.bar is not None:
            s = self.state()
            self.bar.set_postfix(running=s["running"], queued=s["queued"])

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
