"""``ksam bench``: whole optimizer steps of every method, timed side by side in one process.

Each method gets its own copy of the same model (same initial weights) and optimizer; the
steps are interleaved round-robin (method A, B, C, A, B, C, ...) so drifting clocks or a
busy neighbour hit all methods alike. Warm-up steps are excluded (they include the fast
path's capture), every step is device-synchronized (CUDA events on the GPU), and the figure
is the median. Ratios are to SGD *in the same mode* (eager vs eager, fast vs fast).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .methods import create


@dataclass
class Case:
    name: str
    make_model: Callable[[], nn.Module]
    make_batch: Callable[[int, torch.device], tuple[torch.Tensor, torch.Tensor]]
    batch_size: int


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
    from .tasks.models import FashionResNet, ResNet18, WideResNet, mnist1d_cnn

    out = []
    if device.type == "cpu":
        out.append(Case("mnist1d-cnn-b128", lambda: mnist1d_cnn(), _signals(40, 10), 128))
        out.append(Case("fashion-resnet-b128", lambda: FashionResNet(),
                        _images(1, 28, 10), 128))
        if not quick:
            out.append(Case("resnet18-32px-b128", lambda: ResNet18(10), _images(3, 32, 10), 128))
        return out
    for b in (128, 512):
        out.append(Case(f"resnet18-b{b}", lambda: ResNet18(10), _images(3, 32, 10), b))
        out.append(Case(f"wrn16-8-b{b}", lambda: WideResNet(16, 8, 10), _images(3, 32, 10), b))
    out.append(Case("bert-base-32x128", lambda: EncoderClassifier(), _tokens(128, 30522, 2), 32))
    if quick:
        out = [c for c in out if c.name in ("resnet18-b128", "wrn16-8-b512")]
    return out


def methods_for(batch: int) -> list[tuple[str, str, dict[str, Any]]]:
    """K-SAM is timed in its steady state: the K warm-up (docs/collapse.md) runs full-batch
    descents for its first few hundred steps only."""
    return [
        ("sgd", "sgd", {}),
        ("sam", "sam", {}),
        ("ksam K=B/2", "ksam", {"k": batch // 2, "k_warmup": 0}),
        ("ksam K=B/4", "ksam", {"k": batch // 4, "k_warmup": 0}),
        ("ksam K=B/8", "ksam", {"k": batch // 8, "k_warmup": 0}),
        ("osgd K=B/8", "osgd", {"k": batch // 8}),
        ("random-sam B/4", "random-sam", {"k_ascent": 0.25}),
        ("esam", "esam", {}),
    ]


def ce(model: nn.Module, batch: Any) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x).float(), y, reduction="none")


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
               profile: bool = False, compile: str | None = None) -> list[dict[str, Any]]:
    """Rows of one case in one precision and mode. With ``compile`` every method runs twice,
    without and with torch.compile, all interleaved in the same loop; each row's
    ``ratio_to_sgd`` is to SGD of its own variant, ``ratio_to_plain_sgd`` to SGD without
    compile."""
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
        for label, name, options in methods_for(case.batch_size):
            if only and label.split()[0] not in only:
                continue
            model = copy.deepcopy(base)
            opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
            engine = create(name, model, opt, autocast_dtype=dtype, fast_path=fast, seed=0,
                            compile=backend or False, **options)
            entries.append({"label": label, "engine": engine, "times": [],
                            "mode": ("fast" if fast else "eager")
                            + (f"+compile({backend})" if backend else "")})
    cuda = device.type == "cuda"
    for e in entries:  # warm-up (compile, capture) per method, then reset peak memory
        for _ in range(warmup):
            e["engine"].step((x, y), ce)
    if cuda:
        torch.cuda.synchronize()
    for e in entries:
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            e["engine"].step((x, y), ce)
            torch.cuda.synchronize()
            e["peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    for _ in range(steps):
        for e in entries:
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(True)
                start.record()
                e["engine"].step((x, y), ce)
                end.record()
                end.synchronize()
                e["times"].append(start.elapsed_time(end) / 1000)
            else:
                t0 = time.perf_counter()
                e["engine"].step((x, y), ce)
                e["times"].append(time.perf_counter() - t0)
    if profile:  # after the timed steps, so the profiler's overhead is not timed
        for e in entries:
            e["profile"] = profile_step(lambda e=e: e["engine"].step((x, y), ce), cuda)
    sgd = {e["mode"]: statistics.median(e["times"]) for e in entries if e["label"] == "sgd"}
    plain_sgd = statistics.median(entries[0]["times"])
    rows = []
    for e in entries:
        med = statistics.median(e["times"])
        fast_on = e["engine"].fast_path_active
        row = {
            "case": case.name, "precision": precision, "mode": e["mode"],
            "method": e["label"], "ms": 1000 * med, "ratio_to_sgd": med / sgd[e["mode"]],
            "peak_mb": e.get("peak_mb"), "fast_path_used": fast_on, **e.get("profile", {}),
        }
        if compile:
            row["ratio_to_plain_sgd"] = med / plain_sgd
        rows.append(row)
    return rows


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
    p.add_argument("--compile", nargs="?", const="inductor", metavar="BACKEND",
                   help="forward passes through torch.compile (compile time is in the warm-up)")
    p.add_argument("--profile", action="store_true",
                   help="also count what one step issues: ATen ops (CPU), kernels and launch "
                        "calls (CUDA)")


def run_from_args(args: argparse.Namespace) -> int:
    from .engine import compile_backend
    from .train import atomic_write_text, resolve_device

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
    rows = []
    print(f"ksam bench: torch {torch.__version__}, "
          f"{torch.cuda.get_device_name() if cuda else f'CPU, {torch.get_num_threads()} threads'}"
          f", median of {steps} steps after {warmup} warm-up")
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
                                    only, args.profile, args.compile):
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
