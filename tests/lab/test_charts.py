"""The charts of ``ksam compare``: methods by readable names, titles that name the data, a
colour and marker per method, a broken axis where a collapsed method would squeeze the
others."""

from __future__ import annotations

import math

import pytest

from ksam.lab import compare
from ksam.lab.compare import (
    PALETTE,
    accuracy_ranges,
    chart_title,
    collapse_marks,
    method_styles,
    plot_accuracy_vs_cost,
    plot_accuracy_vs_time,
    short_label,
    short_labels,
    task_text,
)
from ksam.methods import DEFAULT_SELECT

# ------------------------------------------------------------------------------------ names


@pytest.mark.parametrize("spec, name", [
    ("sgd:lr=0.1", "SGD"),
    ("sgd", "SGD"),
    ("sam:rho=0.2,lr=0.05", "SAM (ρ=0.2)"),
    ("ksam:k=32,select=auto-margin,rho=0.1,lr=0.025", "K-SAM auto-margin (K=32, ρ=0.1)"),
    ("ksam:select=top,k=16,rho=0.05", "K-SAM top (K=16, ρ=0.05)"),
    ("ksam:k=32,select=auto,estimate=0.1,rho=0.1,lr=0.1", "K-SAM auto (K=32, ρ=0.1)"),
    ("ksam:k=32,rho=0.05,scores=memory,lr=0.1", "K-SAM top from memory (K=32, ρ=0.05)"),
    ("ksam:select=stratified,scores=memory,k_ascent=8,k_descent=24,rho=0.05,lr=0.025",
     "K-SAM stratified from memory (ascent K=8, descent K=24, ρ=0.05)"),
    ("ksam-plain:k=16", "plain K-SAM (K=16)"),
    ("ksam-plain:k=32,rho=0.25,lr=0.1", "plain K-SAM (K=32, ρ=0.25)"),
    ("osgd:k=32,k_warmup=100,lr=0.1", "Ordered SGD top (K=32)"),
    ("osgd:select=auto,estimate=0.1,lr=0.0125", "Ordered SGD auto"),
    ("random-sam:rho=0.2,lr=0.0125", "RandomSubsetSAM (ρ=0.2)"),
    ("mesa:decay=0.999,lr=0.2", "MESA (decay=0.999)"),
    ("sam-late:rho=0.25,lr=0.2", "late-phase SAM (ρ=0.25)"),
])
def test_short_label_names_the_method_its_rule_and_its_radius(spec, name):
    assert short_label(spec) == name


def test_a_ksam_spec_without_select_names_the_default_rule():
    assert short_label("ksam:k=32,rho=0.1") == f"K-SAM {DEFAULT_SELECT} (K=32, ρ=0.1)"
    assert short_label("ksam") == f"K-SAM {DEFAULT_SELECT}"
    # the default rule of K-SAM from memory (and of a loss without a chance level) is top
    assert short_label("ksam:scores=memory") == "K-SAM top from memory"
    assert short_label("ksam:loss_kind=mse") == "K-SAM top (loss_kind=mse)"


def test_short_label_shows_the_details_it_is_asked_for_and_keeps_a_label_that_is_no_spec():
    spec = "ksam:k=32,select=auto,estimate=0.1,rho=0.1,lr=0.025"
    assert short_label(spec, ("estimate", "lr")) == \
        "K-SAM auto (K=32, estimate=0.1, ρ=0.1, lr=0.025)"
    assert short_label("sgd:lr=0.10", ("lr",)) == "SGD (lr=0.1)"
    assert short_label("my own method") == "my own method"
    assert short_label("sam:radius=1") == "sam:radius=1"  # an option sam does not take


def test_short_labels_add_the_lr_or_the_estimate_where_names_would_clash():
    assert short_labels(["sgd:lr=0.1", "sam:rho=0.2,lr=0.05", "sam:rho=0.2,lr=0.1"]) == \
        ["SGD", "SAM (ρ=0.2, lr=0.05)", "SAM (ρ=0.2, lr=0.1)"]
    assert short_labels(["ksam:select=auto,rho=0.1,lr=0.05",
                         "ksam:select=auto,estimate=0.1,rho=0.1,lr=0.05"]) == \
        ["K-SAM auto (ρ=0.1)", "K-SAM auto (estimate=0.1, ρ=0.1)"]
    assert short_labels(["ksam:select=auto,rho=0.1,lr=0.05",
                         "ksam:select=auto,estimate=0.1,rho=0.1,lr=0.025"]) == \
        ["K-SAM auto (ρ=0.1, lr=0.05)", "K-SAM auto (estimate=0.1, ρ=0.1, lr=0.025)"]
    assert short_labels(["osgd:k=32,lr=0.1", "osgd:k=32,k_warmup=100,lr=0.1"]) == \
        ["Ordered SGD top (K=32)", "Ordered SGD top (K=32, k_warmup=100)"]


def test_short_labels_fall_back_to_the_spec_where_no_detail_tells_two_apart():
    explicit = f"ksam:k=32,select={DEFAULT_SELECT},rho=0.1"
    assert short_labels(["sgd", "ksam:k=32,rho=0.1", explicit]) == \
        ["SGD", "ksam:k=32,rho=0.1", explicit]
    assert short_labels(["not a spec", "not a spec either"]) == \
        ["not a spec", "not a spec either"]


# ----------------------------------------------------------------------------------- titles


def test_task_text_names_the_data_the_model_and_the_label_noise():
    assert task_text({"task": "mnist1d", "task_options": {}}) == \
        "MNIST-1D, 1-D CNN, clean labels"  # the task's default model
    assert task_text({"task": "mnist1d", "task_options": {"model": "mlp",
                                                          "label_noise": 0.2}}) == \
        "MNIST-1D, MLP, 20 % symmetric label noise"
    fashion = {"task": "fashion-mnist",
               "task_options": {"augment": False, "label_noise_type": "pair", "model": "cnn",
                                "train_subset": 5000, "label_noise": 0.3}}
    assert task_text(fashion) == \
        "Fashion-MNIST (5000-image subset), small CNN, 30 % pair label noise"
    assert task_text({"task": "my_task", "task_options": {"train_subset": 100}}) == \
        "my_task (100-example subset), clean labels"


def test_chart_title_says_the_seeds_the_epochs_and_the_lr():
    config = {"task": "mnist1d", "task_options": {"label_noise": 0.3}, "epochs": 80}
    what = "final test accuracy vs training time"
    assert chart_title(config, what, seeds=5, lrs=[0.4, 0.1, None]) == (
        "MNIST-1D, 1-D CNN, 30 % symmetric label noise\n"
        "final test accuracy vs training time: 5 seeds, 80 epochs, each method at its own lr")
    assert chart_title(config, what, seeds=1, lrs=[0.1, 0.1]).splitlines()[1] == \
        "final test accuracy vs training time: 1 seed, 80 epochs, lr 0.1"
    assert chart_title({"task": "mnist1d", "task_options": {}}, what) == \
        f"MNIST-1D, 1-D CNN, clean labels\n{what}"


def test_a_reports_title_names_the_budget_of_an_equal_budget_grid():
    report = {"config": {"task": "mnist1d", "task_options": {}, "epochs": 30},
              "rows": [{"lr": 0.1}, {"lr": 0.1}]}
    assert compare._report_title(report, "test accuracy vs training time", 3) == \
        "MNIST-1D, 1-D CNN, clean labels\n" \
        "test accuracy vs training time: 3 seeds, 30 epochs, lr 0.1"
    assert compare._report_title({**report, "mode": "passes"}, "x", 3) == \
        "MNIST-1D, 1-D CNN, clean labels\nx, equal budget (passes): 3 seeds, lr 0.1"


def test_collapse_marks_count_the_collapsed_runs_of_each_method():
    rows = [{"method": "sgd:lr=0.1", "seeds": 5, "collapsed": 0},
            {"method": "ksam-plain:k=16", "seeds": 5, "collapsed": 3},
            {"method": "sam", "seeds": 5, "collapsed": None}]
    assert collapse_marks(rows, "sgd:lr=0.1") == (
        {"ksam-plain:k=16": ", 3/5 collapsed"},
        "collapsed: runs ending more than 10 points below SGD's mean accuracy")
    assert collapse_marks(rows[:1], "sgd:lr=0.1") == ({}, "")


# ----------------------------------------------------------------------------------- styles


def test_method_styles_give_every_method_its_own_colour_and_marker():
    assert method_styles(3) == [("#1f77b4", "o", "-"), ("#ff7f0e", "s", "-"),
                                ("#2ca02c", "^", "-")]
    sixteen = method_styles(16)
    assert [c for c, _, _ in sixteen] == list(PALETTE)
    assert len({m for _, m, _ in sixteen[:15]}) == 15
    assert len(set(sixteen)) == 16
    forty = method_styles(40)
    assert len({(c, m) for c, m, _ in forty}) == 40  # the cost chart's points
    assert len({(c, ls) for c, _, ls in forty}) == 40  # the time chart's lines
    assert forty[16] == (PALETTE[0], "s", "--")


def test_method_styles_take_other_colours():
    styles = method_styles(4, ["C0", "C1"])
    assert styles == [("C0", "o", "-"), ("C1", "s", "-"), ("C0", "s", "--"),
                      ("C1", "^", "--")]


# ------------------------------------------------------------------------------- the y axis


def _point(method: str, acc: float, std: float, cost: float = 1.0, seeds: int = 5,
           frontier: bool = False) -> dict:
    return {"method": method, "seeds": seeds, "cost_mean": cost, "cost_std": 0.1,
            "acc_mean": acc, "acc_std": std, "frontier": frontier}


def test_close_points_share_one_range():
    points = [_point("sgd", 90.0, 0.5), _point("sam", 91.0, 1.0), _point("ksam", 89.5, 0.2)]
    (low, high), = accuracy_ranges(points)
    assert (low, high) == (pytest.approx(88.9), pytest.approx(92.4))  # 89.3-92.0, padded


def test_one_collapsed_method_far_below_breaks_the_axis():
    points = [_point("sgd", 90.0, 0.5), _point("sam", 91.0, 0.5),
              _point("ksam-plain:k=16", 20.0, 2.0)]
    top, bottom = accuracy_ranges(points)
    assert top == (pytest.approx(89.1), pytest.approx(91.9))  # 89.5-91.5, padded
    assert bottom == (pytest.approx(17.6), pytest.approx(22.4))  # 18-22, padded


def test_spread_points_and_missing_accuracies_keep_one_range():
    # evenly spread: no gap wider than a sixth of the whole
    points = [_point(f"m{i}", 20.0 + 15 * i, 0.0) for i in range(5)]
    assert accuracy_ranges(points) == [(pytest.approx(15.2), pytest.approx(84.8))]
    assert accuracy_ranges([_point("sgd", math.nan, math.nan)]) == [(0.0, 100.0)]
    # a gap of a few points is no reason to break the axis; padded within 0-100
    assert accuracy_ranges([_point("sgd", 99.9, 0.0), _point("sam", 99.7, 0.0)]) == \
        [(pytest.approx(99.3), 100.0)]
    assert len(accuracy_ranges([_point("sgd", 90.0, 0.5), _point("sam", 91.0, 0.5),
                                _point("osgd", 85.5, 0.5)])) == 1


# ----------------------------------------------------------------------------------- charts


@pytest.fixture
def figures(monkeypatch):
    """The figures the charts save, kept for a look at their legends and axes."""
    pytest.importorskip("matplotlib")
    saved: list = []
    real = compare._save_png
    monkeypatch.setattr(compare, "_save_png",
                        lambda fig, path: saved.append(fig) or real(fig, path))
    return saved


def _legend(ax) -> list[str]:
    return [t.get_text() for t in ax.get_legend().get_texts()]


def test_the_cost_chart_names_the_methods_and_breaks_its_axis(tmp_path, figures):
    points = [_point("sgd:lr=0.1", 90.0, 0.5, 1.0, frontier=True),
              _point("sam:rho=0.2,lr=0.05", 91.0, 0.5, 2.0, frontier=True),
              _point("ksam-plain:k=16,lr=0.1", 20.0, 2.0, 1.5)]
    path = tmp_path / "cost.png"
    assert plot_accuracy_vs_cost(points, "sgd:lr=0.1", path, "the title",
                                 marks={"ksam-plain:k=16,lr=0.1": ", 5/5 collapsed"},
                                 caption="collapsed: below SGD")
    assert path.read_bytes()[:4] == b"\x89PNG"
    fig, = figures
    upper, lower = fig.axes
    assert _legend(upper) == ["SGD (frontier)", "SAM (ρ=0.2) (frontier)",
                              "plain K-SAM (K=16), 5/5 collapsed"]
    assert upper.get_title() == "the title"
    assert lower.get_xlabel() == "training time / SGD's (evaluation excluded)"
    assert lower.get_ylim() == (pytest.approx(17.6), pytest.approx(22.4))
    # the legend sits beside the axes: the figure is wider than the axes and the legend
    legend_box = upper.get_legend().get_window_extent()
    assert legend_box.x0 > upper.get_window_extent().x1
    assert legend_box.x1 <= fig.bbox.x1


def test_the_cost_chart_of_close_methods_has_one_axis_and_seed_counts_where_they_differ(
        tmp_path, figures):
    points = [_point("sgd", 90.0, 0.5, seeds=3), _point("sam", 91.0, 0.5, 2.0, seeds=2)]
    assert plot_accuracy_vs_cost(points, "sgd", tmp_path / "cost.png", "t")
    (ax,) = figures[0].axes
    assert _legend(ax) == ["SGD (3 seeds)", "SAM (2 seeds)"]
    assert ax.get_ylabel() == "final test accuracy (%)\nmean ± std over seeds; axis from 89 %"


def _run(label: str, accs: list[float]) -> dict:
    return {"label": label, "epochs": [{"test_acc": a, "train_time": float(i + 1)}
                                       for i, a in enumerate(accs)]}


def test_the_time_chart_names_the_methods_and_says_what_its_bands_are(tmp_path, figures):
    runs = [_run("sgd:lr=0.1", [50.0, 80.0, 90.0]), _run("sgd:lr=0.1", [52.0, 82.0, 91.0]),
            _run("ksam:select=top,k=16,rho=0.05,lr=0.1", [40.0, 70.0, 88.0]),
            _run("ksam:select=top,k=16,rho=0.05,lr=0.1", [42.0, 72.0, 89.0])]
    path = tmp_path / "time.png"
    assert plot_accuracy_vs_time(runs, path, "the title")
    assert path.read_bytes()[:4] == b"\x89PNG"
    (ax,) = figures[0].axes
    assert _legend(ax) == ["SGD", "K-SAM top (K=16, ρ=0.05)"]
    assert ax.get_legend().get_title().get_text() == "line: mean over seeds\nband: min-max"
    assert ax.get_title() == "the title"


def test_the_time_chart_of_single_runs_counts_seeds_only_where_they_differ(tmp_path, figures):
    runs = [_run("sgd", [50.0, 90.0]), _run("sam", [40.0, 88.0]), _run("sam", [41.0, 87.0])]
    assert plot_accuracy_vs_time(runs, tmp_path / "time.png", "t")
    (ax,) = figures[0].axes
    assert _legend(ax) == ["SGD (1 seed)", "SAM (2 seeds)"]
    assert plot_accuracy_vs_time(runs[:2], tmp_path / "time2.png", "t")
    (ax,) = figures[1].axes
    assert _legend(ax) == ["SGD", "SAM"]
    assert ax.get_legend().get_title().get_text() == ""
