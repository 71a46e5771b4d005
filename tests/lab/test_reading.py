"""The reading printed under a comparison's table: the most accurate method and its cost,
the methods a std's overlap does not tell apart from it, and the collapsed runs."""

from __future__ import annotations

import math

from ksam.lab.compare import COLLAPSE_MARGIN, reading


def _row(method: str, mean: float, std: float, time: float, collapsed: int = 0,
         seeds: int = 3) -> dict:
    return {"method": method, "test_acc_mean": mean, "test_acc_std": std, "seeds": seeds,
            "collapsed": collapsed, "train_time_s": time, "time_vs_ref": time / 10.0}


def test_reading_names_the_best_its_cost_the_ties_and_the_collapses():
    rows = [_row("sgd", 82.5, 0.5, 10.0), _row("sam", 86.0, 0.6, 20.0),
            _row("ksam", 85.6, 0.3, 15.0), _row("ksam:select=top", 55.2, 9.0, 14.0, 3)]
    text = reading(rows, "sgd").splitlines()
    assert text[0] == ("Reading: the most accurate method here is sam (86.00 % test accuracy, "
                       "2.00x sgd's time).")
    assert text[1] == ("Within one std of it (not told apart on these seeds): ksam (85.60 %, "
                       "1.50x sgd's time); the cheapest of them is ksam.")
    assert text[2].startswith(f"ksam:select=top collapsed in 3 of 3 runs: they ended more "
                              f"than {COLLAPSE_MARGIN:.0f} points below sgd's mean")
    assert len(text) == 3


def test_reading_of_one_seed_or_clear_winner_has_no_ties():
    rows = [_row("sgd", 80.0, math.nan, 10.0, seeds=1), _row("sam", 80.5, math.nan, 20.0,
                                                               seeds=1)]
    assert reading(rows, "sgd", "validation") == (
        "Reading: the most accurate method here is sam (80.50 % validation accuracy, 2.00x "
        "sgd's time).")
    assert reading([], "sgd") == ""


def test_a_method_with_collapsed_runs_is_never_called_a_tie():
    """SAM's wide std from two collapsed runs overlaps the best method's: it is reported as
    collapsed, not as indistinguishable from the best."""
    rows = [_row("sgd", 86.3, 0.4, 10.0), _row("sam", 53.0, 38.1, 18.0, collapsed=2),
            _row("ksam", 91.7, 2.2, 19.0)]
    text = reading(rows, "sgd").splitlines()
    assert len(text) == 2 and text[1].startswith("sam collapsed in 2 of 3 runs")
