"""``ksam bench``: whole optimizer steps of every method, timed side by side in one process.

Each method gets its own copy of the same model (same initial weights) and optimizer; the
steps are interleaved round-robin (method A, B, C, A, B, C, ...) so drifting clocks or a
busy neighbour hit all methods alike. Warm-up steps are excluded (they include the fast
path's capture), every step is device-synchronized (CUDA events on the GPU), and the figure
is the median. Ratios are to SGD *in the same mode* (eager vs eager, fast vs fast). The
steps run on random inputs of each case's shape, or (``--inputs data``) on the first
training examples of its data set, which some operators process at another speed.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..batch import IndexedBatch
from ..memory import LossOutput
from ..methods import create
from ..schedule import Schedule


@dataclass
class Case:
    """One model and batch shape. ``make_batch`` draws random inputs of the shape; ``task``
    names the data set whose examples have that shape (``--inputs data``), None if none."""

    name: str
    make_model: Callable[[], nn.Module]
    make_batch: Callable[[int, torch.device], tuple[torch.Tensor, torch.Tensor]]
    batch_size: int
    task: str | None = None


def _images(channels: int, size: int, classes: int):
    def make(b: int, device: torch.device):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(b, channels, size, size, generator=g)
        return x.to(device), torch.randint(0, classes, (b,), generator=g).to(device)
    return make


def _signals(length: int, classes: int):
    def make(b: int, device: torch.device):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(b, 1, length, generator=g)
        return x.to(device), torch.randint(0, classes, (b,), generator=g).to(device)
    return make


def _tokens(length: int, vocab: int, classes: int):
    def make(b: int, device: torch.device):
        g = torch.Generator().manual_seed(0)
        x = torch.randint(1, vocab, (b, length), generator=g)
        return x.to(device), torch.randint(0, classes, (b,), generator=g).to(device)
    return make


class EncoderClassifier(nn.Module):
    """A BERT-base-shaped encoder (12 layers, d=768, 12 heads, ff 3072) with a classifier on
    the first token: the shape of the K-SAM paper's GLUE experiments, random weights."""

    def __init__(self, vocab: int = 30522, d: int = 768, layers: int = 12, heads: int = 12,
                 ff: int = 3072, length: int = 128, classes: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.zeros(length, d))
        layer = nn.TransformerEncoderLayer(d, heads, ff, dropout=0.0, batch_first=True,
                                           norm_first=False, activation="gelu")
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids) + self.pos[: ids.shape[1]]
        return self.head(self.encoder(h)[:, 0])


def cases(quick: bool, device: torch.device) -> list[Case]:
    from .tasks.models import FashionResNet, ResNet18, WideResNet, fashion_cnn, mnist1d_cnn

    out = []
    if device.type == "cpu":
        out.append(Case("mnist1d-cnn-b128", lambda: mnist1d_cnn(), _signals(40, 10), 128,
                        "mnist1d"))
        out.append(Case("fashion-resnet-b128", lambda: FashionResNet(),
                        _images(1, 28, 10), 128, "fashion-mnist"))
        out.append(Case("fashion-cnn-b128", lambda: fashion_cnn(), _images(1, 28, 10), 128,
                        "fashion-mnist"))
        if not quick:
            out.append(Case("resnet18-32px-b128", lambda: ResNet18(10), _images(3, 32, 10), 128,
                            "cifar10"))
        return out
    for b in (128, 512):
        out.append(Case(f"resnet18-b{b}", lambda: ResNet18(10), _images(3, 32, 10), b,
                        "cifar10"))
        out.append(Case(f"wrn16-8-b{b}", lambda: WideResNet(16, 8, 10), _images(3, 32, 10), b,
                        "cifar10"))
    out.append(Case("bert-base-32x128", lambda: EncoderClassifier(), _tokens(128, 30522, 2), 32))
    if quick:
        out = [c for c in out if c.name in ("resnet18-b128", "wrn16-8-b512")]
    return out


def with_data_inputs(case: Case, data_dir: str | None) -> Case:
    """``case`` stepping on the first ``batch_size`` training examples of its data set
    (normalized, as training sees them) instead of random inputs: the data set is read here,
    so a missing file or a case without a data set fails before anything is timed. On one
    CPU thread some operators cost less on real inputs than on noise (max-pool over the
    background of a Fashion-MNIST image: docs/experiments/benchmarks.md), which moves the ratios."""
    from .tasks import get_task

    if case.task is None:
        raise ValueError(f"case {case.name} has no data set: --inputs data takes the cases "
                         "of Fashion-MNIST, MNIST-1D and CIFAR-10 models")
    try:
        task = get_task(case.task, data_dir=data_dir)
    except FileNotFoundError as err:  # the loader's hint names train/compare's options
        raise FileNotFoundError(f"{err} ksam bench never downloads and takes no "
                                "--task-option: point --data-dir at the files (ksam train "
                                "and ksam compare fetch them with --task-option "
                                "download=true)") from None
    if task.num_train < case.batch_size:
        raise ValueError(f"{case.task} has {task.num_train} training examples, fewer than "
                         f"case {case.name}'s batch of {case.batch_size}")
    x, y = task.train_x[:case.batch_size].clone(), task.train_y[:case.batch_size].clone()

    def make(b: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        return x[:b].to(device), y[:b].to(device)

    return dataclasses.replace(case, make_batch=make)


def methods_for(batch: int, example_memory: bool = True
                ) -> list[tuple[str, str, dict[str, Any]]]:
    """K-SAM is timed in its steady state: the K warm-up runs full-batch descents for its first
    few hundred steps only. ``ksam`` is the paper's rule (top-K), ``ksam-default`` K-SAM's
    default rule in its steady state too (``steady``: :func:`engine_options`).
    ``example_memory``: with the methods that keep a per-example memory or an average model
    (SAF, MESA, K-SAM from memory); the bench steps on one batch, its examples the
    training set (ids 0..B-1)."""
    rows = [
        ("sgd", "sgd", {}),
        ("sam", "sam", {}),
        ("ksam K=B/2", "ksam", {"k": batch // 2, "k_warmup": 0, "select": "top"}),
        ("ksam K=B/4", "ksam", {"k": batch // 4, "k_warmup": 0, "select": "top"}),
        ("ksam K=B/8", "ksam", {"k": batch // 8, "k_warmup": 0, "select": "top"}),
        ("ksam-default K=B/4", "ksam", {"k": batch // 4, "k_warmup": 0, "steady": True}),
        ("ksam-default K=B/8", "ksam", {"k": batch // 8, "k_warmup": 0, "steady": True}),
        ("osgd K=B/8", "osgd", {"k": batch // 8}),
        ("random-sam B/4", "random-sam", {"k_ascent": 0.25}),
        ("esam", "esam", {}),
        ("msam", "msam", {}),
        ("looksam k=5", "looksam", {"interval": 5}),
        ("rst p=0.5", "rst", {"p": 0.5}),
        ("sam-late start=0.8", "sam-late", {"start": 0.8}),
    ]
    if example_memory:
        rows += [
            ("saf", "saf", {"num_examples": batch}),
            ("mesa", "mesa", {}),
            ("ksam-memory K=B/4", "ksam", {"k": batch // 4, "k_warmup": 0,
                                           "scores": "memory", "num_examples": batch}),
            ("ksam-memory K=B/8", "ksam", {"k": batch // 8, "k_warmup": 0,
                                           "scores": "memory", "num_examples": batch}),
        ]
    return rows


def engine_options(options: dict[str, Any]) -> dict[str, Any]:
    """A bench row's options as the method takes them. ``steady=True`` (a K-SAM row without
    ``select``) runs the default rule with its estimate measured over step 0, so that the
    timed steps, after the warm-up steps, are those of its band phase, which a run reaches
    after a few hundred steps (as ``k_warmup=0`` does for the descent subset)."""
    options = dict(options)
    if options.pop("steady", False):
        from ..methods import DEFAULT_SELECT
        from ..selection import RULES

        options["select"] = functools.partial(RULES[DEFAULT_SELECT], estimate_steps=(0, 1))
    return options


def sharp_fraction(name: str, options: dict[str, Any]) -> float | None:
    """The fraction of a run's steps a scheduled method makes sharpness-aware (None: the
    method has no schedule of plain and sharpness-aware steps)."""
    if name == "looksam":
        return 1.0 / options["interval"]
    if name == "rst":
        return float(options["p"])
    if name == "sam-late":
        return 1.0 - float(options["start"])
    return None


def step_seconds(times: list[float], sharp: list[bool], fraction: float | None) -> float:
    """A method's time per step: the median step, or for a scheduled method the medians of
    its plain and its sharpness-aware steps weighted by its fraction of sharp steps (the
    median of the mixed steps would be one kind's time, not the run's average)."""
    if fraction is None:
        return statistics.median(times)
    plain = [t for t, s in zip(times, sharp) if not s]
    full = [t for t, s in zip(times, sharp) if s]
    if not plain or not full:
        raise ValueError("--steps must be at least 2: a scheduled method is timed on both "
                         "kinds of step")
    return (1 - fraction) * statistics.median(plain) + fraction * statistics.median(full)


def ce(model: nn.Module, batch: Any) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x).float(), y, reduction="none")


def ce_logits(model: nn.Module, batch: Any) -> LossOutput:
    x, y = batch
    logits = model(x)
    return LossOutput(F.cross_entropy(logits.float(), y, reduction="none"), logits)


def step_args(engine: Any, x: torch.Tensor, y: torch.Tensor) -> tuple[Any, Any]:
    """``(batch, loss_fn)`` of the bench's steps for ``engine``: the batch with its example
    ids for a method with a memory, the logits for a method with a loss term."""
    batch: Any = (x, y)
    if engine.plan.memory is not None:
        batch = IndexedBatch(batch, torch.arange(len(y), device=y.device))
    return batch, ce_logits if engine.plan.term is not None or engine.plan.needs_logits else ce


_LAUNCH_CALLS = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx",
                 "cudaGraphLaunch", "cudaLaunchCooperativeKernel", "cudaMemcpyAsync",
                 "cudaMemsetAsync")


def profile_step(step: Callable[[], Any], cuda: bool) -> dict[str, Any]:
    """What one step issues: on the CPU the top-level ATen operator calls (each one a trip
    through the dispatcher, the CPU's analogue of a launch); on CUDA the kernels that ran,
    the host-side launch calls (a replayed CUDA graph is one), and the kernels that took the
    most device time."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        step()
        if cuda:
            torch.cuda.synchronize()
    events = prof.events()

    def nested_in_op(e: Any) -> bool:
        p = e.cpu_parent
        while p is not None:
            if p.name.startswith("aten::"):
                return True
            p = p.cpu_parent
        return False

    out: dict[str, Any] = {"ops": sum(1 for e in events if e.name.startswith("aten::")
                                      and e.device_type == DeviceType.CPU
                                      and not nested_in_op(e))}
    if cuda:
        kernels = [e for e in events if e.device_type == DeviceType.CUDA]
        out["kernels"] = len(kernels)
        out["launch_calls"] = sum(1 for e in events if e.name in _LAUNCH_CALLS)
        by_name: dict[str, float] = {}
        for e in kernels:
            by_name[e.name] = by_name.get(e.name, 0.0) + e.device_time_total
        top = sorted(by_name.items(), key=lambda kv: -kv[1])[:5]
        out["top_kernels_us"] = [(name[:80], round(us, 1)) for name, us in top]
    return out


def bench_case(case: Case, device: torch.device, precision: str, fast: bool, steps: int,
               warmup: int, only: list[str] | None = None,
               profile: bool = False, compile: str | None = None,
               micro_batch_size: int | None = None) -> list[dict[str, Any]]:
    """Rows of one case in one precision and mode. With ``compile`` every method runs twice,
    without and with torch.compile, all interleaved in the same loop; each row's
    ``ratio_to_sgd`` is to SGD of its own variant, ``ratio_to_plain_sgd`` to SGD without
    compile. With ``micro_batch_size`` every method also runs chunked (label
    ``+mb{M}``), interleaved with the others and compared with the same SGD."""
    torch.manual_seed(0)
    base = case.make_model().to(device)
    if device.type == "cuda" and "bert" not in case.name:
        base = base.to(memory_format=torch.channels_last)
    x, y = case.make_batch(case.batch_size, device)
    if device.type == "cuda" and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    dtype = {"fp32": None, "bf16": torch.bfloat16}[precision]
    entries = []
    for backend in [None, compile] if compile else [None]:
        variants = [(label, name, options) for label, name, options
                    in methods_for(case.batch_size)]
        if micro_batch_size is not None:
            variants += [(f"{label} +mb{micro_batch_size}", name,
                          {**options, "micro_batch_size": micro_batch_size})
                         for label, name, options in methods_for(case.batch_size)]
        for label, name, options in variants:
            if only and label.split()[0] not in only:
                continue
            model = copy.deepcopy(base)
            opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
            fraction = sharp_fraction(name, options)
            if "start" in options:
                options = {"start_step": 0}
            engine = create(name, model, opt, autocast_dtype=dtype, fast_path=fast, seed=0,
                            compile=backend or False, **engine_options(options))
            if fraction is not None:
                # Scheduled methods alternate sharp and plain steps here, so that any
                # number of timed steps times both kinds; the row weights the two medians
                # by the method's own fraction of sharp steps.
                engine.use_rules(schedule=Schedule(interval=2))
            entries.append({"label": label, "engine": engine, "times": [], "sharp": [],
                            "args": step_args(engine, x, y),
                            "fraction": fraction,
                            "mode": ("fast" if fast else "eager")
                            + (f"+compile({backend})" if backend else "")})
    cuda = device.type == "cuda"
    for e in entries:  # warm-up (compile, capture) per method, then reset peak memory
        for _ in range(warmup):
            e["engine"].step(*e["args"])
    if cuda:
        torch.cuda.synchronize()
    for e in entries:
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            e["engine"].step(*e["args"])
            torch.cuda.synchronize()
            e["peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    for _ in range(steps):
        for e in entries:
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(True)
                start.record()
                result = e["engine"].step(*e["args"])
                end.record()
                end.synchronize()
                e["times"].append(start.elapsed_time(end) / 1000)
            else:
                t0 = time.perf_counter()
                result = e["engine"].step(*e["args"])
                e["times"].append(time.perf_counter() - t0)
            e["sharp"].append(bool(result.sharp))
    if profile:  # after the timed steps, so the profiler's overhead is not timed
        for e in entries:
            e["profile"] = profile_step(lambda e=e: e["engine"].step(*e["args"]), cuda)
    sgd = {e["mode"]: statistics.median(e["times"]) for e in entries if e["label"] == "sgd"}
    plain_sgd = statistics.median(entries[0]["times"])
    rows = []
    for e in entries:
        med = step_seconds(e["times"], e["sharp"], e["fraction"])
        fast_on = e["engine"].fast_path_active
        row = {
            "case": case.name, "precision": precision, "mode": e["mode"],
            "method": e["label"], "ms": 1000 * med, "ratio_to_sgd": med / sgd[e["mode"]],
            "peak_mb": e.get("peak_mb"), "fast_path_used": fast_on, **e.get("profile", {}),
        }
        if compile:
            row["ratio_to_plain_sgd"] = med / plain_sgd
        if e["fraction"] is not None:  # each kind's median, for the record
            for kind, flag in (("plain", False), ("sharp", True)):
                row[f"ms_{kind}"] = 1000 * statistics.median(
                    t for t, s in zip(e["times"], e["sharp"]) if s == flag)
        rows.append(row)
    return rows


# ------------------------------------------------------------------------- peak memory
def peak_memory_configs(chunk: int) -> list[tuple[str, str, dict[str, Any]]]:
    """What ``--memory`` compares on a batch of ``8 * chunk``: SAM, K-SAM with K = B/8
    unchunked and in chunks of ``chunk``, and SGD for scale."""
    b = 8 * chunk
    return [
        ("sgd", "sgd", {}),
        ("sam", "sam", {}),
        (f"sam, micro-batch {chunk}", "sam", {"micro_batch_size": chunk}),
        ("ksam K=B/8", "ksam", {"k": b // 8, "k_warmup": 0}),
        (f"ksam K=B/8, micro-batch {chunk}", "ksam",
         {"k": b // 8, "k_warmup": 0, "micro_batch_size": chunk}),
    ]


def _rss_bytes() -> int:
    """This process's resident set now (Linux: /proc/self/statm)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _max_rss_bytes() -> int:
    """This process's peak resident set so far (ru_maxrss is in KiB on Linux, bytes on
    macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def measure_peak_memory(case_name: str, quick: bool, device: str, method: str,
                   options: dict[str, Any], batch: int, steps: int) -> dict[str, float]:
    """Peak memory of ``steps`` optimizer steps of one configuration, in this process.

    CUDA: ``torch.cuda.max_memory_allocated`` over the steps, minus what was allocated
    before them (model, optimizer, batch). CPU: torch's CPU allocator is invisible to
    ``tracemalloc``, so the figure is the peak resident set (``ru_maxrss``) minus the
    resident set just before the first step; run each configuration in a fresh process
    (:func:`memory_table` does), or the peak of an earlier one hides it. ``resolved`` is
    False when the steps did not raise the process's peak (an earlier one, e.g. importing
    torch, was higher): the figure is then only an upper bound.
    """
    dev = torch.device(device)
    case = next(c for c in cases(quick, dev) if c.name == case_name)
    torch.manual_seed(0)
    model = case.make_model().to(dev)
    x, y = case.make_batch(batch, dev)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    engine = create(method, model, opt, seed=0, **engine_options(options))
    cuda = dev.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = _rss_bytes()
    peak_before = _max_rss_bytes()
    t0 = time.perf_counter()
    for _ in range(steps):
        engine.step((x, y), ce)
    seconds = (time.perf_counter() - t0) / steps
    if cuda:
        torch.cuda.synchronize()
        peak, resolved = torch.cuda.max_memory_allocated() - before, True
    else:
        peak_after = _max_rss_bytes()
        peak, resolved = peak_after - before, peak_after > peak_before
    return {"step_peak_mib": peak / 2**20, "resolved": resolved, "s_per_step": seconds}


def memory_table(case_name: str, quick: bool, device: str, chunk: int,
                 steps: int = 2) -> list[dict[str, Any]]:
    """:func:`measure_peak_memory` of every :func:`peak_memory_configs` entry, each in a fresh
    Python process (the CPU figure is a process's peak resident set); ``ratio_to_sam``
    compares with SAM at the same batch."""
    rows = []
    batch = 8 * chunk
    for label, method, options in peak_memory_configs(chunk):
        args = json.dumps([case_name, quick, device, method, options, batch, steps])
        code = ("import json, sys; from ksam.lab.bench import measure_peak_memory; "
                "print(json.dumps(measure_peak_memory(*json.loads(sys.argv[1]))))")
        done = subprocess.run([sys.executable, "-c", code, args], capture_output=True,
                              text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"memory measurement of {label!r} failed:\n{done.stderr}")
        result = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append({"case": case_name, "method": label, "batch": batch,
                     "micro_batch_size": options.get("micro_batch_size"), **result})
    sam = next(r["step_peak_mib"] for r in rows if r["method"] == "sam")
    for r in rows:
        r["ratio_to_sam"] = r["step_peak_mib"] / sam if sam > 0 else float("nan")
    return rows


def _print_memory(args: argparse.Namespace, device: torch.device,
                  selected: list[Case]) -> list[dict[str, Any]]:
    chunk = args.memory_chunk
    what = "max_memory_allocated" if device.type == "cuda" else "peak RSS (ru_maxrss)"
    print(f"ksam bench --memory: torch {torch.__version__}, {device}, batch {8 * chunk} "
          f"= 8 x chunk {chunk}; {what} over the steps minus before them, one fresh process "
          "per row")
    print("| case | method | batch | step peak MiB | x SAM | s/step |")
    print("|---|---|---|---|---|---|")
    rows = []
    for case in selected:
        for r in memory_table(case.name, args.quick, str(device), chunk):
            rows.append(r)
            bound = "" if r["resolved"] else "<= "  # the steps did not set the peak
            print(f"| {r['case']} | {r['method']} | {r['batch']} | "
                  f"{bound}{r['step_peak_mib']:.0f} "
                  f"| {r['ratio_to_sam']:.2f} | {r['s_per_step']:.2f} |", flush=True)
    return rows


# -------------------------------------------------------------- FSDP2 vs DDP (torchrun)
def ddp_vs_fsdp(case: Case, device: torch.device, steps: int, warmup: int,
                only: list[str] | None = None) -> list[dict[str, Any]]:
    """Step times of every method on a DDP model (per-rank and synchronized perturbation)
    and on an FSDP2-sharded one, interleaved round-robin in the same processes; run under
    torchrun (every rank calls it; rank 0's times are returned). The model is the same on
    all ranks, each rank steps on its own batch of ``case.batch_size``."""
    from .. import distributed as kd

    if not kd.is_distributed():
        raise RuntimeError("--ddp-vs-fsdp runs under torchrun with 2 or more processes")
    torch.manual_seed(0)
    base = case.make_model().to(device)
    x, y = case.make_batch(case.batch_size, device)
    x = x + kd.get_rank()  # a different batch on each rank
    entries = []
    for label, name, options in methods_for(case.batch_size, example_memory=False):
        if only and label.split()[0] not in only:
            continue
        for mode in ("ddp", "ddp-sync", "fsdp"):
            model = kd.wrap(copy.deepcopy(base), device, fsdp=mode == "fsdp")
            opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
            sync = {} if mode == "fsdp" else {"sync_perturbation": mode == "ddp-sync"}
            engine = kd.create(name, model, opt, seed=0, **sync, **engine_options(options))
            entries.append({"label": label, "mode": mode, "engine": engine, "times": []})
    for e in entries:
        for _ in range(warmup):
            e["engine"].step((x, y), ce)
    for _ in range(steps):
        for e in entries:
            kd.barrier()  # every rank starts the step together: the time includes waiting
            t0 = time.perf_counter()
            e["engine"].step((x, y), ce)
            e["times"].append(time.perf_counter() - t0)
    ddp = {e["label"]: statistics.median(e["times"]) for e in entries if e["mode"] == "ddp"}
    return [{"case": case.name, "method": e["label"], "mode": e["mode"],
             "ms": 1000 * statistics.median(e["times"]),
             "ratio_to_ddp": statistics.median(e["times"]) / ddp[e["label"]]}
            for e in entries]


def _print_ddp_vs_fsdp(args: argparse.Namespace, device: torch.device, selected: list[Case],
                       steps: int, warmup: int, only: list[str] | None) -> list[dict[str, Any]]:
    from .. import distributed as kd

    kd.setup(device=device)
    main = kd.is_main_process()
    if main:
        print(f"ksam bench --ddp-vs-fsdp: torch {torch.__version__}, {kd.get_world_size()} "
              f"processes on {device}, {torch.get_num_threads()} thread(s) each, per-rank batch "
              f"as in the case, median of {steps} steps after {warmup} warm-up")
        print("| case | method | mode | step ms | x DDP |")
        print("|---|---|---|---|---|")
    rows = []
    for case in selected:
        for r in ddp_vs_fsdp(case, device, steps, warmup, only):
            rows.append(r)
            if main:
                print(f"| {r['case']} | {r['method']} | {r['mode']} | {r['ms']:.2f} "
                      f"| {r['ratio_to_ddp']:.2f} |", flush=True)
    kd.cleanup()
    return rows if main else []


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="small sizes, few steps (CPU smoke)")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", nargs="+", default=None, choices=["fp32", "bf16"])
    p.add_argument("--mode", nargs="+", default=None, choices=["eager", "fast"])
    p.add_argument("--steps", type=int, default=None, help="timed steps per method")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--cases", nargs="+", help="only these case names")
    p.add_argument("--methods", nargs="+", help="only these methods (sgd is always kept)")
    p.add_argument("--json", type=str, help="also write the rows to this JSON file")
    p.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--inputs", choices=["random", "data"], default="random",
                   help="what the steps run on: random tensors of the case's shape (default) "
                        "or the first B training examples of the case's data set "
                        "(Fashion-MNIST, MNIST-1D, CIFAR-10; timing only, not --memory)")
    p.add_argument("--data-dir", help="where the data set's files are (--inputs data)")
    p.add_argument("--compile", nargs="?", const="inductor", metavar="BACKEND",
                   help="forward passes through torch.compile (compile time is in the warm-up)")
    p.add_argument("--profile", action="store_true",
                   help="also count what one step issues: ATen ops (CPU), kernels and launch "
                        "calls (CUDA)")
    p.add_argument("--memory", action="store_true",
                   help="peak memory instead of time: SAM and K-SAM (K=B/8) with and without "
                        "micro-batching on a batch of 8 x --memory-chunk, one process each")
    p.add_argument("--memory-chunk", type=int, default=64,
                   help="micro-batch size of --memory (default 64; batch = 8 x this)")
    p.add_argument("--micro-batch-size", type=int,
                   help="also time every method with this micro_batch_size, side by side")
    p.add_argument("--ddp-vs-fsdp", action="store_true",
                   help="under torchrun: every method on a DDP and on an FSDP2 model, "
                        "interleaved (rank 0 prints)")


def run_from_args(args: argparse.Namespace) -> int:
    from ..engine import compile_backend
    from .outputs import atomic_write_text
    from .train import resolve_device

    compile_backend(args.compile)  # a bad backend name fails before anything runs
    device = torch.device(resolve_device(args.device))
    cuda = device.type == "cuda"
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    precisions = args.precision or (["fp32", "bf16"] if cuda else ["fp32"])
    modes = args.mode or (["eager", "fast"] if cuda else ["eager"])
    steps = args.steps or (5 if args.quick else (30 if cuda else 20))
    warmup = args.warmup or (2 if args.quick else 5)
    if min(steps, warmup) < 1:
        raise ValueError("--steps and --warmup must be >= 1")
    only = ["sgd", *args.methods] if args.methods else None
    selected = [c for c in cases(args.quick, device) if not args.cases or c.name in args.cases]
    if not selected:
        raise ValueError(f"no benchmark case matches {args.cases}")
    for name in ("memory_chunk", "micro_batch_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.inputs == "data":
        if args.memory:
            raise ValueError("--inputs data times steps; --memory measures peak memory, "
                             "which does not depend on the input values")
        selected = [with_data_inputs(c, args.data_dir) for c in selected]
    elif args.data_dir is not None:
        raise ValueError("--data-dir is read with --inputs data only")
    if args.ddp_vs_fsdp:
        rows = _print_ddp_vs_fsdp(args, device, selected, steps, warmup, only)
        if args.json and rows:
            atomic_write_text(args.json, json.dumps(rows, indent=2))
        return 0
    if args.memory:
        rows = _print_memory(args, device, selected)
        if args.json:
            atomic_write_text(args.json, json.dumps(rows, indent=2))
        return 0
    rows = []
    print(f"ksam bench: torch {torch.__version__}, "
          f"{torch.cuda.get_device_name() if cuda else f'CPU, {torch.get_num_threads()} threads'}"
          f", median of {steps} steps after {warmup} warm-up, "
          f"{'training examples' if args.inputs == 'data' else 'random inputs'}")
    extra = ""
    if args.profile:
        extra = " ops | kernels | launches |" if cuda else " ops |"
    if args.compile:
        extra = " x SGD without compile |" + extra
    print("| case | precision | mode | method | step ms | x SGD | peak MiB |" + extra)
    print("|---|---|---|---|---|---|---|" + "---|" * extra.count("|"))
    for case in selected:
        for precision in precisions:
            for mode in modes:
                for r in bench_case(case, device, precision, mode == "fast", steps, warmup,
                                    only, args.profile, args.compile,
                                    args.micro_batch_size):
                    rows.append(r)
                    peak = f"{r['peak_mb']:.0f}" if r["peak_mb"] is not None else "-"
                    flag = "" if r["fast_path_used"] or mode == "eager" else " (eager fallback)"
                    print(f"| {r['case']} | {precision} | {r['mode']} | {r['method']}{flag} "
                          f"| {r['ms']:.2f} | {r['ratio_to_sgd']:.2f} | {peak} |"
                          + (f" {r['ratio_to_plain_sgd']:.2f} |" if args.compile else "")
                          + "".join(f" {r[k]} |" for k in ("ops", "kernels", "launch_calls")
                                    if k in r), flush=True)
    if args.json:
        atomic_write_text(args.json, json.dumps(rows, indent=2))
    return 0
