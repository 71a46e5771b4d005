"""Bit-identity record of every method, rule and option: the reference for a restructuring.

Each configuration trains a tiny deterministic model for a few steps and records a SHA-256
digest of the final weights (every ``state_dict`` tensor: raw bytes, dtype, shape), one of
the engine's ``state_dict()`` (its tensors, the optimizer's state included, and its numbers;
strings such as class names are left out), and the per-step losses and skipped flags.
Single-process configurations run eager and on the fast path (on the CPU the sync-free
executor); DDP and FSDP2 ones on 2 gloo ranks, recording rank 0's digests, whether rank 1's
weights equal them, and rank 1's engine state digest (AutoBand's estimate and LookSAM's
direction under FSDP2 are rank-local).

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/bit_identity.py --save ref.json
    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/bit_identity.py --check ref.json
    ... --check ref.json --only 'ksam.*fast'    # a regular expression on the names
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import re
import socket
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import ksam
from ksam import distributed as kd
from ksam.selection import RULES

N, B, STEPS, NAN_STEP, RESUME_STEP, WORLD = 64, 16, 10, 4, 5, 2


# ------------------------------------------------------------ models, data, loss functions
def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 4))


def bn_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))


def ce(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x).float(), y, reduction="none")


def ce_logits(model: nn.Module, batch) -> ksam.LossOutput:
    x, y = batch
    logits = model(x)
    return ksam.LossOutput(F.cross_entropy(logits.float(), y, reduction="none"), logits)


def batches(indexed: bool, nan: bool, rank: int = 0, world: int = 1) -> list:
    """STEPS batches of B rows per rank, cycling through a seeded data set of N rows; a NaN
    input in rank ``world - 1``'s batch of step NAN_STEP with ``nan``."""
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(N, 6, generator=g), torch.randint(0, 4, (N,), generator=g)
    out = []
    for s in range(STEPS):
        ids = torch.arange(B) + ((s % (N // (B * world))) * world + rank) * B
        xb = x[ids].clone()
        if nan and s == NAN_STEP and rank == world - 1:
            xb[3, 2] = float("nan")
        out.append(ksam.IndexedBatch((xb, y[ids]), ids) if indexed else (xb, y[ids]))
    return out


# ------------------------------------------------------------------------- configurations
@dataclass(frozen=True)
class Config:
    method: str
    options: dict[str, Any] = field(default_factory=dict)
    model: str = "mlp"  # or "bn"
    optim: str = "sgd"  # or "adam"
    nan: bool = False  # a NaN input at step NAN_STEP: the step is skipped
    resume: bool = False  # state_dict save / fresh engine / load at step RESUME_STEP
    fp16: bool = False  # float16 autocast with a GradScaler("cpu")
    dist: str | None = None  # "ddp" or "fsdp": 2 gloo ranks
    selection: str = "local"  # ksam.distributed.create's selection


def _auto(k, name="k", **options):  # AutoBand estimating over steps 2-3: all three phases
    return RULES["auto"](k, name, estimate_steps=(2, 4), **options)


def configs() -> dict[str, Config]:
    memory = dict(scores="memory", num_examples=N)
    table = {m: Config(m, dict(num_examples=N) if m == "saf" else dict(start_step=3)
                       if m == "sam-late" else {}) for m in ksam.METHODS}
    for rule in RULES:
        select = _auto if rule == "auto" else rule
        table[f"ksam:{rule}:k_warmup=0"] = Config("ksam", dict(select=select, k_warmup=0))
        table[f"ksam:{rule}"] = Config("ksam", dict(select=select))
    table.update({
        "ksam:k_warmup=2": Config("ksam", dict(k_warmup=2)),
        "ksam:k_warmup=2,rescale=False": Config("ksam", dict(k_warmup=2, rescale=False)),
        "ksam:k_ascent=0.5,k_descent=0.125": Config("ksam", dict(k_ascent=0.5, k_descent=0.125,
                                                                 k_warmup=0)),
        "ksam:adaptive": Config("ksam", dict(adaptive=True, k_warmup=0)),
        "osgd:scores=memory": Config("osgd", memory),
        "ksam:scores=memory": Config("ksam", memory),
        "ksam:stratified,scores=memory": Config("ksam", dict(memory, select="stratified")),
    })
    # options on a few methods, each with settings under which its rules act within STEPS
    base = {"sgd": {}, "sam": {}, "ksam": dict(k_warmup=2), "esam": {},
            "looksam": dict(interval=3), "msam": {}, "mesa": dict(decay=0.9),
            "saf": dict(num_examples=N, delay=1, start_epoch=1)}
    # variant: (method options, Config fields)
    variants: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
        "micro": (dict(micro_batch_size=5), {}), "clip": (dict(max_grad_norm=0.5), {}),
        "bf16": (dict(autocast_dtype=torch.bfloat16), {}), "fp16": ({}, dict(fp16=True)),
        "fast": (dict(fast_path=True), {}), "seed": (dict(seed=7), {}),
        "bn": ({}, dict(model="bn")), "nan": ({}, dict(nan=True)),
        "resume": ({}, dict(resume=True)), "fast+nan": (dict(fast_path=True), dict(nan=True)),
        "fast+resume": (dict(fast_path=True), dict(resume=True)),
    }
    for method, opts in base.items():
        if opts:  # the defaults are in the table already
            table[f"{method}:grid"] = Config(method, opts)
        for variant, (extra, fields) in variants.items():
            if not variant.startswith("fast+") or method in ("sam", "ksam"):
                table[f"{method}+{variant}"] = Config(method, dict(opts, **extra), **fields)
    for method in ("sam", "ksam", "esam"):
        table[f"{method}+p=0.5"] = Config(method, dict(base[method], p=0.5))
        table[f"{method}+start_step=3"] = Config(method, dict(base[method], start_step=3))
    table["mesa+start_step=3"] = Config("mesa", dict(base["mesa"], start_step=3))
    for method in ("sgd", "sam", "ksam"):
        table[f"{method}+compile"] = Config(method, dict(base[method], compile="aot_eager"))
    for method in ("ksam", "msam"):
        table[f"{method}+adam"] = Config(method, base[method], optim="adam")
    # DDP and FSDP2 on WORLD gloo ranks (MESA refuses a sharded model)
    dist = {"sgd": Config("sgd"), "sam": Config("sam"), "ksam": Config("ksam", base["ksam"]),
            "ksam:auto": Config("ksam", dict(base["ksam"], select=_auto)),
            "esam": Config("esam"), "looksam": Config("looksam", base["looksam"]),
            "saf": Config("saf", base["saf"]), "mesa": Config("mesa", base["mesa"]),
            "ksam:scores=memory": Config("ksam", memory),
            "ksam:global": Config("ksam", dict(k_warmup=0), selection="global")}
    for mode in ("ddp", "fsdp"):
        table.update({f"{mode}:{name}": replace(cfg, dist=mode) for name, cfg in dist.items()
                      if not (mode == "fsdp" and cfg.method == "mesa")})
    return table


# ---------------------------------------------------------------------------------- runner
def digest(tree: Any) -> str:
    """SHA-256 of the tensors (dtype, shape, raw bytes; DTensors gathered whole) and numbers
    of a nested dict / list, dict keys in sorted order."""
    h = hashlib.sha256()

    def walk(x: Any) -> None:
        if isinstance(x, torch.Tensor):
            t = (x.full_tensor() if hasattr(x, "full_tensor") else x).detach().cpu()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(x, dict):
            for key in sorted(x, key=str):
                walk(x[key])
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)
        elif isinstance(x, (bool, int, float)) or x is None:
            h.update(repr(x).encode())

    walk(tree)
    return h.hexdigest()


def build(cfg: Config, device: str = "cpu"):
    model = bn_net() if cfg.model == "bn" else mlp()
    if cfg.dist:
        model = kd.wrap(model, device, fsdp=cfg.dist == "fsdp")
    opt = torch.optim.Adam(model.parameters(), lr=0.01) if cfg.optim == "adam" else \
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    opts = dict(cfg.options)
    if cfg.fp16:
        opts.update(autocast_dtype=torch.float16, grad_scaler=torch.amp.GradScaler("cpu"))
    if cfg.dist:
        return model, kd.create(cfg.method, model, opt, selection=cfg.selection, **opts)
    return model, ksam.create(cfg.method, model, opt, **opts)


def run(cfg: Config, rank: int = 0, world: int = 1) -> dict[str, Any]:
    if "compile" in cfg.options:
        torch._dynamo.reset()
    loss_fn = ce_logits if cfg.method in ("saf", "mesa") else ce
    model, eng = build(cfg)
    losses, skipped = [], []
    for s, batch in enumerate(batches("num_examples" in cfg.options, cfg.nan, rank, world)):
        if cfg.resume and s == RESUME_STEP:  # a checkpoint round trip into a fresh engine
            buf = io.BytesIO()
            torch.save({"model": model.state_dict(), "engine": eng.state_dict()}, buf)
            buf.seek(0)
            saved = torch.load(buf, weights_only=False)
            model, eng = build(cfg)
            model.load_state_dict(saved["model"])
            eng.load_state_dict(saved["engine"])
        result = eng.step(batch, loss_fn)
        losses.append(float(result.loss))
        skipped.append(bool(result.skipped))
    return {"weights": digest(model.state_dict()), "state": digest(eng.state_dict()),
            "losses": losses, "skipped": skipped}


def _rank(rank: int, port: int, outdir: str, names: list[str]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    kd.setup(timeout=60, device="cpu")
    table = configs()
    torch.save({name: run(table[name], rank, WORLD) for name in names},
               os.path.join(outdir, f"rank{rank}.pt"))
    kd.barrier()
    kd.cleanup()
    os._exit(0)  # FSDP2 on gloo may abort in interpreter teardown


def run_distributed(names: list[str], deadline_s: float = 600.0) -> dict[str, dict]:
    """Every name on WORLD spawned ranks: rank 0's records, whether rank 1's weights equal
    rank 0's, and rank 1's engine state digest."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = torch.multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as outdir:
        procs = [ctx.Process(target=_rank, args=(r, port, outdir, names), daemon=True)
                 for r in range(WORLD)]
        for p in procs:
            p.start()
        end = time.monotonic() + deadline_s
        for p in procs:
            p.join(max(0.0, end - time.monotonic()))
            if p.is_alive():
                p.kill()
        if any(p.exitcode != 0 for p in procs):
            sys.exit(f"distributed ranks failed: exit codes {[p.exitcode for p in procs]}")
        ranks = [torch.load(os.path.join(outdir, f"rank{r}.pt")) for r in range(WORLD)]
    for name, rec in ranks[0].items():  # rank-local engine state (AutoBand's estimate from
        # the rank's own losses, LookSAM's direction under FSDP2: a shard) may differ
        rec["ranks_agree"] = all(r[name]["weights"] == rec["weights"] for r in ranks[1:])
        rec["rank1_state"] = ranks[1][name]["state"]
    return ranks[0]


def compile_works() -> bool:
    try:
        return bool(torch.compile(lambda x: x + 1, backend="aot_eager")(torch.ones(1)) == 2)
    except Exception:  # noqa: BLE001 - any failure means: skip the compile configurations
        return False


def run_all(names: list[str], table: dict[str, Config]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for name in names:
        if table[name].dist is None:
            try:
                out[name] = run(table[name])
            except Exception as exc:  # noqa: BLE001 - recorded, and reported as a difference
                out[name] = {"error": f"{type(exc).__name__}: {exc}"}
                traceback.print_exc()
    dist = [name for name in names if table[name].dist]
    return {**out, **(run_distributed(dist) if dist else {})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--save", metavar="FILE.json")
    mode.add_argument("--check", metavar="FILE.json")
    parser.add_argument("--only", metavar="PATTERN", help="regular expression on the names")
    args = parser.parse_args()
    torch.set_num_threads(1)
    table = configs()
    names = [n for n in table if args.only is None or re.search(args.only, n)]
    if not compile_works():
        print("torch.compile(backend='aot_eager') fails here: compile configurations skipped")
        names = [n for n in names if "compile" not in table[n].options]
    start = time.monotonic()
    records = run_all(names, table)
    took = time.monotonic() - start
    odd = [n for n, r in records.items() if "error" in r or r.get("ranks_agree") is False]
    for name in odd:
        print(f"{name}: {records[name].get('error', 'rank 1 weights differ from rank 0')}")
    if args.save:
        with open(args.save, "w") as f:
            json.dump(records, f, indent=1)
        print(f"{len(records)} configurations in {took:.0f} s -> {args.save}")
        return
    with open(args.check) as f:
        reference = json.load(f)
    differ = []
    for name, rec in records.items():
        ref = reference.get(name)
        if ref is None:
            print(f"{name}: not in the reference")
            continue
        fields = [k for k in sorted(set(ref) | set(rec))
                  if json.dumps(ref.get(k)) != json.dumps(rec.get(k))]  # NaN == NaN
        if fields:
            differ.append(name)
            print(f"{name}: {', '.join(fields)} differ")
    missing = [n for n in reference if n not in table and args.only is None]
    for name in missing:
        print(f"{name}: in the reference, no longer a configuration")
    print(f"{len(records)} configurations in {took:.0f} s: {len(differ)} differ, "
          f"{len(missing)} missing")
    sys.exit(1 if differ or missing else 0)


if __name__ == "__main__":
    main()
