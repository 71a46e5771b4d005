"""Named configurations for ``ksam compare --preset NAME`` (the evidence in
docs/experiments/results.md).

A preset is a partial :class:`ksam.lab.config.CliConfig`: a mapping from its field names to
values. ``ksam compare`` merges the command's defaults, then the preset, then the flags the
user typed, so whatever the user gave wins (also a value equal to a default).

Method specs carry their own ``k`` (two K values per preset), ``rho`` (tuned per method on a
held-out split) and possibly ``lr``. If the user gives ``--k``, ``--rho`` or ``--lr``, those
keys are removed from the preset's specs so the user's shared value applies to every method
that takes it (specs that become identical, e.g. ``ksam:k=32`` and ``ksam:k=16`` under
``--k 8``, are merged). An explicit ``--methods`` replaces the preset's list entirely.

A new preset is one :func:`register_preset` call. Every choice and its reason is written down
in docs/experiments/results.md.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .config import MethodSpec

__all__ = ["DEFAULT_COMPARE", "PRESETS", "Preset", "preset_layer", "register_preset"]

# rho for SAM-family methods, chosen on MNIST-1D with --validation-split 0.2
# (docs/experiments/results.md): sweep {0.02, 0.05, 0.1, 0.2}, 2 seeds, 20 epochs, best
# validation accuracy per method.
MNIST1D_RHO_SAM = 0.02
MNIST1D_RHO_KSAM = 0.02
# Fashion-MNIST: not tuned; SAM's usual default.
FASHION_RHO = 0.05


def _ksam_k_warmup() -> int:
    """K-SAM's default descent-subset warm-up (``k_warmup``) in the installed ksam, or 0 when
    the method has none. Ordered SGD, the selection-without-perturbation control, gets the
    same warm-up so that the two differ only by the perturbation."""
    import inspect

    from ..methods import METHODS

    for name in ("ksam", "osgd"):
        factory = METHODS.get(name)
        target = getattr(factory, "__init__", factory) if inspect.isclass(factory) else factory
        if target is None or "k_warmup" not in inspect.signature(target).parameters:
            return 0
    default = inspect.signature(METHODS["ksam"].__init__).parameters["k_warmup"].default
    return int(default) if isinstance(default, int) else 0


def _methods(k_quarter: int, k_eighth: int, rho_sam: float, rho_ksam: float) -> list[str]:
    """SGD, SAM, K-SAM at K=B/4 and B/8, random-subset SAM (ascent on B/4, its paper's
    setting), ESAM (its paper's beta/gamma), Ordered SGD at the same two K (and K-SAM's
    default warm-up, if it has one)."""
    warmup = _ksam_k_warmup()
    osgd = f",k_warmup={warmup}" if warmup else ""
    return [
        "sgd",
        f"sam:rho={rho_sam:g}",
        f"ksam:select=top,k={k_quarter},rho={rho_ksam:g}",
        f"ksam:select=top,k={k_eighth},rho={rho_ksam:g}",
        f"random-sam:rho={rho_sam:g}",
        f"esam:rho={rho_sam:g}",
        f"osgd:k={k_quarter}{osgd}",
        f"osgd:k={k_eighth}{osgd}",
    ]


# MNIST-1D with 30 % label noise, 80 epochs (preset mnist1d-noise30): each method's lr, and
# rho where it differs from SAM's 0.25, chosen on a held-out 20 % of the training set
# (experiments/scripts/noise_search.sh, 2 seeds, best final validation accuracy;
# docs/experiments/results.md).
NOISE30_RHO = 0.25


def _noise30_methods() -> list[str]:
    """The whole field, each method at its own tuned lr (and rho where said)."""
    warmup = _ksam_k_warmup()
    rho = NOISE30_RHO
    return [
        "sgd:lr=0.4",
        f"sam:rho={rho:g},lr=0.1",
        "ksam:select=top,k=32,rho=0.05,lr=0.1",
        "ksam:select=top,k=16,rho=0.05,lr=0.1",
        f"ksam-plain:k=32,rho={rho:g},lr=0.1",
        f"ksam-plain:k=16,rho={rho:g},lr=0.1",
        f"random-sam:rho={rho:g},lr=0.1",
        f"esam:rho={rho:g},lr=0.1",
        f"osgd:k=32,k_warmup={warmup},lr=0.2",
        f"osgd:k=16,k_warmup={warmup},lr=0.2",
        "msam:rho=0.3,lr=0.4",
        "looksam:rho=0.1,lr=0.1",
        f"sam-late:rho={rho:g},lr=0.2",
        f"rst:rho={rho:g},lr=0.2",
    ]


def _core_methods(k: int, rho_sam: float, rho_ksam: float) -> list[str]:
    """The reduced list: SGD, SAM, K-SAM at one K and its controls (random-subset SAM,
    Ordered SGD at the same K)."""
    full = _methods(k, k, rho_sam, rho_ksam)
    return [full[0], full[1], full[2], full[4], full[6]]


@dataclass(frozen=True)
class Preset:
    """One named configuration: ``values`` are fields of :class:`ksam.lab.config.CliConfig`
    (``methods`` as spec strings, ``seeds`` as a count, list or range), ``task_options``
    extra task options (as ``--task-option key=value``)."""

    name: str
    description: str
    values: dict[str, Any]
    task_options: dict[str, Any] = field(default_factory=dict)


_MNIST1D = {
    "task": "mnist1d",
    "model": "cnn",
    "epochs": 30,
    "batch_size": 128,
    "lr": 0.1,
    "momentum": 0.9,
    "weight_decay": 5e-4,
    "lr_schedule": "cosine",
    "seeds": "5",
    "device": "cpu",
    "precision": "fp32",
    "methods": _methods(32, 16, MNIST1D_RHO_SAM, MNIST1D_RHO_KSAM),
}

_FASHION = {
    "task": "fashion-mnist",
    "momentum": 0.9,
    "weight_decay": 5e-4,
    "lr_schedule": "cosine",
    "precision": "fp32",
}

# Fashion-MNIST on a CPU where SGD memorizes wrong labels
# (docs/experiments/label-noise-fashion.md): the small CNN, no augmentation, a 5k-image
# subset, 40 epochs; each method's lr (and rho) chosen on a held-out 20 % whose labels
# carry the same noise (2 seeds, best final accuracy). The last row of each list, K-SAM
# from memory with stratified ranks and 8 ascent / 24 descent rows, is chosen by
# experiments/scripts/fashion_noise_search.sh memory-split.
_FASHION_CNN = {**_FASHION, "model": "cnn", "train_subset": 5000, "epochs": 40,
                "batch_size": 128, "seeds": "5", "device": "cpu"}
_FASHION_CNN_NOISE40_METHODS = [
    "sgd:lr=0.0125",
    "sam:rho=0.1,lr=0.025",
    "ksam:select=top,rho=0.1,lr=0.1",
    "ksam:select=auto,estimate=0.1,rho=0.2,lr=0.025",
    "saf:lr=0.0125",
    "mesa:lr=0.0125",
    "ksam:rho=0.1,scores=memory,lr=0.0125",
    "ksam:select=stratified,scores=memory,k_ascent=8,k_descent=24,rho=0.025,lr=0.025",
]

# The same setting on clean labels and at 20 % symmetric noise, chosen by
# experiments/scripts/fashion_noise_search.sh clean / noise20 (docs/experiments/label-noise.md).
_FASHION_CNN_CLEAN_METHODS = [
    "sgd:lr=0.025",
    "sam:rho=0.1,lr=0.05",
    "ksam:select=top,rho=0.1,lr=0.025",
    "ksam:select=auto,estimate=0.1,rho=0.1,lr=0.025",
    "saf:lr=0.025",
    "mesa:lr=0.025",
    "ksam:rho=0.1,scores=memory,lr=0.0125",
    "ksam:select=stratified,scores=memory,k_ascent=8,k_descent=24,rho=0.05,lr=0.025",
]
_FASHION_CNN_NOISE20_METHODS = [
    "sgd:lr=0.0125",
    "sam:rho=0.1,lr=0.025",
    "ksam:select=top,rho=0.1,lr=0.05",
    "ksam:select=auto,estimate=0.1,rho=0.1,lr=0.025",
    "saf:lr=0.0125",
    "mesa:lr=0.0125",
    "ksam:rho=0.1,scores=memory,lr=0.0125",
    "ksam:select=stratified,scores=memory,k_ascent=8,k_descent=24,rho=0.025,lr=0.025",
]
# 30 % pair noise: experiments/scripts/fashion_noise_search.sh pair30
# (docs/experiments/label-noise-fashion.md).
_FASHION_CNN_PAIR30_METHODS = [
    "sgd:lr=0.00625",
    "sam:rho=0.2,lr=0.025",
    "ksam:select=top,rho=0.1,lr=0.05",
    "ksam:select=auto,estimate=0.1,rho=0.1,lr=0.025",
    "saf:lr=0.00625",
    "mesa:lr=0.0125",
    "ksam:rho=0.1,scores=memory,lr=0.05",
    "ksam:select=stratified,scores=memory,k_ascent=8,k_descent=24,rho=0.2,lr=0.025",
]


def _fashion_cnn_noisy(name: str, noise: float, methods: list[str],
                       noise_type: str = "symmetric") -> Preset:
    """The Fashion-MNIST CNN setting with ``noise`` label noise of ``noise_type``
    (``"symmetric"``, or ``"pair"``: class c becomes c+1 mod 10)."""
    return Preset(
        name,
        f"Fashion-MNIST 5k-image subset with {noise:.0%} {noise_type} label noise, small CNN, "
        "no augmentation, 40 epochs, 5 seeds, CPU; the methods of fashion-cnn-clean, each at "
        "its own lr and rho chosen on a noisy held-out split (docs/experiments/label-noise.md)",
        {**_FASHION_CNN, "label_noise": noise, "lr": 0.05, "methods": list(methods)},
        {"augment": False, **({} if noise_type == "symmetric" else
                              {"label_noise_type": noise_type})},
    )


PRESETS: dict[str, Preset] = {}


def register_preset(preset: Preset) -> Preset:
    """Add ``preset`` to :data:`PRESETS` (ValueError if the name is taken)."""
    if preset.name in PRESETS:
        raise ValueError(f"preset {preset.name!r} is already registered")
    PRESETS[preset.name] = preset
    return preset


#: What ``ksam compare`` runs with neither ``--task`` nor ``--preset``: MNIST-1D with 20 %
#: of the training labels wrong (a setting where SAM beats SGD and K-SAM's selection rule
#: decides whether it keeps SAM's gain: docs/experiments/default-rule.md), SGD, SAM,
#: K-SAM with its default rule and with the paper's top-K rule, each at its own lr chosen
#: on a held-out split whose labels are as noisy as the training labels, from the lr grid
#: of that page's confirmation on this task (every method chose 0.1 or 0.2 there; at 0.4
#: SAM diverges in some runs); 5 seeds.
DEFAULT_COMPARE = Preset(
    "default",
    "MNIST-1D CNN with 20 % symmetric label noise, 30 epochs, 5 seeds, CPU: SGD, SAM, K-SAM "
    "(default rule) and K-SAM top, each at its own lr chosen on a held-out split with the "
    "same label noise (what `ksam compare` runs without --task or --preset)",
    {**{k: v for k, v in _MNIST1D.items() if k != "lr"}, "label_noise": 0.2, "seeds": "5",
     "lr_sweep": [0.05, 0.1, 0.2],
     "methods": ["sgd", "sam:rho=0.05", "ksam:k=32,rho=0.05",
                 "ksam:k=32,rho=0.05,select=top"]},
    {"noisy_validation": True},
)

for _preset in [
    DEFAULT_COMPARE,
    Preset(
        "mnist1d",
        "MNIST-1D CNN, 4000 train / 1000 test, 30 epochs, 5 seeds, CPU",
        dict(_MNIST1D),
    ),
    Preset(
        "mnist1d-lr",
        "MNIST-1D CNN as `mnist1d`, each method at its own lr, chosen on a held-out split "
        "(validation sweep over 0.05, 0.1, 0.2, 0.4; 3 seeds; docs/experiments/results.md)",
        {**_MNIST1D, "methods": [
            "sgd:lr=0.2",
            f"sam:rho={MNIST1D_RHO_SAM:g},lr=0.2",
            f"ksam:select=top,k=32,rho={MNIST1D_RHO_KSAM:g},lr=0.2",
            f"ksam:select=top,k=32,rho={MNIST1D_RHO_KSAM:g},rescale=0.5,lr=0.2",
            f"osgd:k=32,k_warmup={_ksam_k_warmup()},lr=0.1",
            "saf:lr=0.2",
            "mesa:decay=0.999,lr=0.2",
            f"ksam:k=32,rho={MNIST1D_RHO_KSAM:g},scores=memory,lr=0.2",
        ]},
    ),
    Preset(
        "mnist1d-noise",
        "MNIST-1D CNN with 20% symmetric label noise on the training set, 5 seeds, CPU",
        {**_MNIST1D, "label_noise": 0.2},
    ),
    Preset(
        "mnist1d-noise30",
        "MNIST-1D CNN with 30% symmetric label noise, 80 epochs, 5 seeds, CPU; the whole "
        "field, each method at its own lr (and SAM's rho 0.25 unless said) chosen on a "
        "held-out split (docs/experiments/results.md)",
        {**_MNIST1D, "label_noise": 0.3, "epochs": 80, "methods": _noise30_methods()},
    ),
    _fashion_cnn_noisy("fashion-cnn-noise40", 0.4, _FASHION_CNN_NOISE40_METHODS),
    Preset(
        "fashion-cnn-clean",
        "Fashion-MNIST 5k-image subset with clean labels, small CNN, no augmentation, 40 "
        "epochs, 5 seeds, CPU; SGD, SAM, K-SAM top, auto and from memory (top; stratified "
        "with 8 ascent / 24 descent rows), SAF, MESA, each at its own lr and rho chosen on a "
        "held-out split (docs/experiments/label-noise.md)",
        {**_FASHION_CNN, "lr": 0.05, "methods": list(_FASHION_CNN_CLEAN_METHODS)},
        {"augment": False},
    ),
    _fashion_cnn_noisy("fashion-cnn-noise20", 0.2, _FASHION_CNN_NOISE20_METHODS),
    _fashion_cnn_noisy("fashion-cnn-pair30", 0.3, _FASHION_CNN_PAIR30_METHODS, "pair"),
    Preset(
        "fashion-mnist-gpu",
        "Fashion-MNIST, full 60k, small ResNet, crop+flip, 15 epochs, batch 256, 3 seeds; "
        "meant to take about 8 minutes on one H100/H200 with the fast path (an estimate)",
        {**_FASHION, "epochs": 15, "batch_size": 256, "lr": 0.1, "seeds": "3",
         "device": "cuda", "methods": _methods(64, 32, FASHION_RHO, FASHION_RHO)},
    ),
    Preset(
        "fashion-mnist-cpu",
        "Fashion-MNIST reduced for a CPU: 5k-example subset, ResNet width 0.25, 4 epochs, "
        "2 seeds, SGD / SAM / K-SAM K=B/4 and its two controls (what one shared CPU core "
        "allows in about 12 minutes)",
        {**_FASHION, "train_subset": 5000, "epochs": 4, "batch_size": 128, "lr": 0.05,
         "seeds": "2", "device": "cpu",
         "methods": _core_methods(32, FASHION_RHO, FASHION_RHO)},
        {"width": 0.25},
    ),
    Preset(
        "fashion-mnist-5k",
        "Fashion-MNIST 5k-example subset (overfitting regime), small ResNet, 100 epochs, "
        "5 seeds; GPU",
        {**_FASHION, "train_subset": 5000, "epochs": 100, "batch_size": 128, "lr": 0.05,
         "seeds": "5", "device": "cuda",
         "methods": _methods(32, 16, FASHION_RHO, FASHION_RHO)},
    ),
    Preset(
        "fashion-mnist-10k",
        "Fashion-MNIST 10k-example subset (overfitting regime), small ResNet, 60 epochs, "
        "5 seeds; GPU",
        {**_FASHION, "train_subset": 10000, "epochs": 60, "batch_size": 128, "lr": 0.05,
         "seeds": "5", "device": "cuda",
         "methods": _methods(32, 16, FASHION_RHO, FASHION_RHO)},
    ),
    Preset(
        "fashion-mnist-noise",
        "Fashion-MNIST full 60k with 20% symmetric label noise, small ResNet, 40 epochs, "
        "batch 256, 3 seeds; GPU",
        {**_FASHION, "label_noise": 0.2, "epochs": 40, "batch_size": 256, "lr": 0.1,
         "seeds": "3", "device": "cuda",
         "methods": _methods(64, 32, FASHION_RHO, FASHION_RHO)},
    ),
]:
    register_preset(_preset)
del _preset


def preset_layer(name: str, user: Mapping[str, Any]) -> dict[str, Any]:
    """Preset ``name`` as a partial configuration to merge under the ``user``'s one (the
    fields the user gave). Where the user gives ``k``, ``rho`` or ``lr`` and no methods,
    those keys leave the preset's specs; specs that become identical are merged. A
    preset's ``lr_sweep`` gives way to the user's ``lr``, ``no_lr_sweep``,
    ``validation_split`` and ``methods``.

    Raises ValueError, listing the presets, for an unknown name.
    """
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    preset = PRESETS[name]
    layer = {key: list(v) if isinstance(v, list) else v for key, v in preset.values.items()}
    layer["task_options"] = dict(preset.task_options)
    if user.get("lr") is not None or user.get("no_lr_sweep") or user.get("validation_split") \
            or user.get("methods"):
        # the user's one lr, a tuning run of their own, or methods that may set their lrs
        layer.pop("lr_sweep", None)
    if "methods" in layer:
        specs = [MethodSpec.parse(spec) for spec in layer["methods"]]
        given = {key for key in ("k", "rho", "lr") if user.get(key) is not None}
        if given:
            specs = [spec.without(given) for spec in specs]
        layer["methods"] = list({spec.label: spec for spec in specs}.values())
    return layer
