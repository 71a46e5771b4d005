"""Presets of ``ksam compare --preset``: each resolves to a valid configuration, user values win."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch import nn

from ksam.lab.cli import build_parser, config_from_args
from ksam.lab.config import DEFAULT_LR_SWEEP, DEFAULT_METHODS, CliConfig, MethodSpec
from ksam.lab.presets import PRESETS, Preset, preset_layer, register_preset
from ksam.lab.tasks import TASKS
from ksam.lab.train import build_engine


def _resolved(name: str, *argv: str) -> CliConfig:
    return config_from_args(build_parser().parse_args(["compare", "--preset", name, *argv]))


def _labels(cfg: CliConfig) -> list[str]:
    return [spec.label for spec in cfg.methods]


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_resolves_to_a_valid_configuration(name):
    args = _resolved(name)
    preset = PRESETS[name]
    assert args.task == preset.values["task"] and args.task in TASKS
    for field in ("epochs", "batch_size", "momentum", "weight_decay", "methods"):
        assert getattr(args, field) is not None, field
    assert args.lr is not None or args.sweep_lrs  # one lr, or each method's from a sweep
    assert _labels(args) == preset.values["methods"]
    assert len(args.seeds) >= (5 if name.startswith("mnist1d") else 2)
    if "gpu" in name or name in ("fashion-mnist-5k", "fashion-mnist-10k", "fashion-mnist-noise"):
        assert args.device == "cuda"
        assert len(args.seeds) >= 3
    if name.endswith("-cpu") or name.startswith(("mnist1d", "fashion-cnn")):
        assert args.device == "cpu"
    if "noise" in name:
        noise = {"mnist1d-noise30": 0.3, "fashion-cnn-noise40": 0.4}.get(name, 0.2)
        assert args.label_noise == pytest.approx(noise)
    if "pair" in name:
        assert args.label_noise == pytest.approx(0.3)
        assert args.task_kwargs()["label_noise_type"] == "pair"

    # The task accepts every task option the preset sets (unknown ones would be rejected).
    opts = args.task_kwargs()
    task_specific = set(opts) - {"data_dir", "train_subset", "label_noise", "validation_split",
                                 "label_noise_type", "noisy_validation"}
    assert task_specific <= set(TASKS[args.task].options)

    base = args.train_config()
    replace(base, device="cpu").validate()  # GPU presets: validate the rest on this machine
    cfg = replace(base, device="cpu", fast=False)

    # The controls the results rely on: same K for K-SAM and Ordered SGD, two K values.
    named = [(spec.name, spec.run_options(args.shared), spec) for spec in args.methods]
    methods = [n for n, _, _ in named]
    reduced = name == "fashion-mnist-cpu"  # the CPU version keeps the core and the controls
    tuned = name == "mnist1d-lr"  # the methods whose lr was tuned: K=B/4 and its control
    # SGD, SAM and K-SAM's rules, each tuned (the default: at its own lr from the sweep)
    rules = name.startswith("fashion-cnn") or name == "default"
    required = ("sgd", "sam", "ksam") + (() if rules else ("osgd",))
    required += () if tuned or rules else ("random-sam",) + (() if reduced else ("esam",))
    for method in required:
        assert method in methods, method
    k_ksam = {o.get("k", 0.25) for n, o, _ in named if n == "ksam"}
    k_osgd = {o["k"] for n, o, _ in named if n == "osgd"}
    if not rules:
        assert k_ksam == k_osgd
    expected = {cfg.batch_size // 4} if name == "default" else {0.25} if rules \
        else {cfg.batch_size // 4} if reduced or tuned \
        else {cfg.batch_size // 8, cfg.batch_size // 4}
    assert k_ksam == expected

    # Every method builds and accepts the batch size (cheap: a linear model, no data).
    for method, options, spec in named:
        run_cfg = replace(cfg, method_options=options, lr=spec.lr or cfg.lr or 0.1)
        run_cfg.validate()
        engine, _ = build_engine(method, nn.Linear(4, 3), run_cfg, 1,
                                 num_examples=cfg.batch_size)
        engine.check_batch(cfg.batch_size)


def test_user_values_win_over_the_preset():
    args = _resolved("mnist1d", "--epochs", "3", "--lr", "0.02", "--seeds", "0,1",
                     "--label-noise", "0.1", "--batch-size", "64", "--device", "cuda")
    assert (args.epochs, args.lr, args.label_noise, args.batch_size) == (3, 0.02, 0.1, 64)
    assert args.seeds == [0, 1]
    assert args.device == "cuda"
    assert args.weight_decay == PRESETS["mnist1d"].values["weight_decay"]  # untouched: preset

    args = _resolved("mnist1d", "--methods", "sgd", "ksam:k=4")
    assert _labels(args) == ["sgd", "ksam:k=4"]


def test_user_k_and_rho_replace_the_preset_spec_values():
    args = _resolved("mnist1d", "--k", "8", "--rho", "0.3")
    names = [spec.name for spec in args.methods]
    assert names.count("ksam") == 1 and names.count("osgd") == 1 and "sam" in names
    assert not any(item.startswith(("k=", "rho="))
                   for spec in _labels(args) for item in spec.partition(":")[2].split(","))
    assert len(args.methods) == len(set(_labels(args)))
    for spec in args.methods:
        name, options = spec.name, spec.run_options(args.shared)
        if name in ("ksam", "osgd"):
            assert options["k"] == 8
        if name in ("sam", "ksam", "random-sam", "esam"):
            assert options["rho"] == 0.3


def test_per_method_lrs_and_the_user_lr():
    args = _resolved("mnist1d-lr")
    lrs = {spec.partition(":")[0]: spec.rpartition("lr=")[2] for spec in _labels(args)}
    assert lrs["sgd"] == "0.2" and lrs["osgd"] == "0.1"
    # the user's --lr replaces the preset's per-method lrs (and fills the shared one)
    args = _resolved("mnist1d-lr", "--lr", "0.05")
    assert args.lr == 0.05
    assert not any("lr=" in spec for spec in _labels(args))
    assert "sgd" in _labels(args)


def test_user_task_option_wins():
    args = _resolved("fashion-mnist-cpu", "--task-option", "width=0.75")
    assert args.task_kwargs()["width"] == 0.75
    args = _resolved("fashion-mnist-cpu")
    assert args.task_kwargs()["width"] == 0.25


def test_unknown_preset_lists_the_presets():
    with pytest.raises(ValueError, match="unknown preset") as info:
        _resolved("no-such-preset")
    for name in PRESETS:
        assert name in str(info.value)


def test_cli_reports_an_unknown_preset(capsys):
    from ksam.lab.cli import main

    assert main(["compare", "--preset", "nope", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "unknown preset" in err and "mnist1d-noise" in err


def test_mnist1d_preset_runs_one_tiny_epoch(tmp_path):
    """The preset goes through the real command end to end (shrunk to seconds)."""
    from ksam.lab.cli import main

    torch.set_num_threads(1)
    out = tmp_path / "p"
    code = main(["compare", "--preset", "mnist1d", "--epochs", "1", "--seeds", "1",
                 "--task-option", "num_samples=300", "--methods", "sgd", "ksam:k=8",
                 "--batch-size", "32", "--quiet", "--out", str(out)])
    assert code == 0
    assert (out / "summary.md").exists()


def test_an_explicit_flag_wins_even_when_it_equals_the_default():
    """Old presets filled every field still at the parser's default, so `--schedule cosine`
    (the default) lost to a preset's `constant`; layers keep what the user typed."""
    preset = register_preset(Preset("test-constant", "a preset with a constant schedule",
                                    {"lr_schedule": "constant", "label_noise": 0.2,
                                     "seeds": "5", "methods": ["sgd", "sam:rho=0.1"]}))
    try:
        args = _resolved(preset.name, "--schedule", "cosine", "--label-noise", "0",
                         "--seeds", "3")
        assert (args.lr_schedule, args.label_noise, args.seeds) == ("cosine", 0.0, [0, 1, 2])
        args = _resolved(preset.name)
        assert (args.lr_schedule, args.label_noise, args.seeds) == ("constant", 0.2,
                                                                 [0, 1, 2, 3, 4])
        with pytest.raises(ValueError, match="already registered"):
            register_preset(preset)
    finally:
        del PRESETS[preset.name]


def test_preset_layer_strips_the_users_shared_keys_from_its_specs():
    layer = preset_layer("mnist1d-lr", {"lr": 0.05, "rho": 0.1})
    assert all(isinstance(spec, MethodSpec) for spec in layer["methods"])
    assert all(spec.lr is None and "rho" not in spec.options for spec in layer["methods"])
    assert [s.label for s in preset_layer("mnist1d-lr", {})["methods"]] == \
        PRESETS["mnist1d-lr"].values["methods"]
    with pytest.raises(ValueError, match="unknown configuration field"):
        CliConfig.from_layers({"epochz": 3})


def test_presets_and_config_do_not_import_the_cli():
    import subprocess
    import sys

    code = ("import sys, ksam.lab.presets, ksam.lab.config; "
            "assert 'ksam.lab.cli' not in sys.modules, sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)


def _compare(*argv: str) -> CliConfig:
    return config_from_args(build_parser().parse_args(["compare", *argv]))


def test_compare_without_task_or_preset_runs_the_default_preset():
    """The main job's default: noisy MNIST-1D, SGD, SAM, K-SAM's default rule and K-SAM top,
    each at its own lr from the default sweep on a held-out split as noisy as training."""
    cfg = _compare()
    assert cfg.preset is None and cfg.task == "mnist1d" and cfg.label_noise == 0.2
    assert cfg.task_options["noisy_validation"] is True
    assert _labels(cfg) == ["sgd", "sam:rho=0.05", "ksam:k=32,rho=0.05",
                            "ksam:k=32,rho=0.05,select=top"]
    assert cfg.seeds == [0, 1, 2, 3, 4] and cfg.epochs == 30 and cfg.lr is None
    assert cfg.sweep_lrs == [0.05, 0.1, 0.2]
    assert _compare("--label-noise", "0").label_noise == 0.0  # the user's flag wins
    for argv in (["--lr", "0.1"], ["--no-lr-sweep"], ["--validation-split", "0.2"]):
        assert _compare(*argv).sweep_lrs is None, argv  # the preset's sweep gives way
    assert _compare("--lr-sweep", "0.3", "0.6").sweep_lrs == [0.3, 0.6]


def test_naming_a_task_leaves_the_default_preset_out():
    cfg = _compare("--task", "mnist1d")
    assert cfg.label_noise == 0.0 and "noisy_validation" not in cfg.task_options
    assert _labels(cfg) == list(DEFAULT_METHODS) and cfg.seeds == [0, 1, 2]
    assert cfg.sweep_lrs == list(DEFAULT_LR_SWEEP)
    assert _labels(_compare("--preset", "mnist1d-noise")) == _labels(
        _compare("--task", "mnist1d", "--preset", "mnist1d-noise"))
