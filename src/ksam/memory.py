r"""Per-example memory, and the rules that read and write it.

:class:`ExampleMemory` holds tables of N rows on the device, one row per training example,
addressed by the example ids of an :class:`ksam.batch.IndexedBatch`. Like every rule with
state it is written in two stages: a step *stages* rows (:meth:`ExampleMemory.stage`) and the
engine *commits* them once the step is applied (:meth:`ExampleMemory.commit`), so a skipped
step leaves the memory as it was. Each table has one extra row N that takes the writes a
step does not keep (and the rows of invalid ids): the writes have static shapes and need
no host sync. Under DDP every rank keeps all N rows; the staged rows of all ranks are
all-gathered at commit and written on every rank, so the replicas' memories stay identical.

Two kinds of rules use a memory or a model's logits:

- a :class:`LossTerm` adds a per-example term to the loss of the step's gradient pass from
  the logits ``loss_fn`` returns (as :class:`LossOutput`): :class:`TrajectoryKL` (SAF: the
  KL to the example's outputs of ``delay`` visits before, remembered) and :class:`EMAKL`
  (MESA: the KL to an exponential moving average of the model);
- :class:`RememberedLosses` gives K-SAM and Ordered SGD their scores from the losses an
  example had when a pass at w last computed them, instead of a scoring forward.

SAF and MESA (Du et al., NeurIPS 2022), for logits z of an example, remembered (or EMA)
logits m, temperature :math:`\tau` and weight :math:`\lambda`:

.. math:: \ell_i = \mathrm{CE}_i + \lambda\,\tau^2\,
          \mathrm{KL}\bigl(\mathrm{softmax}(m_i/\tau)\,\Vert\,\mathrm{softmax}(z_i/\tau)\bigr)
"""

from __future__ import annotations

import copy
import math
from numbers import Integral
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .stateful import Stateful
from .validate import check_fraction, check_int, check_number

__all__ = ["LossOutput", "ExampleMemory", "LossTerm", "TrajectoryKL", "EMAKL",
           "RememberedLosses", "check_num_examples"]


class LossOutput(NamedTuple):
    """What ``loss_fn`` may return instead of a tensor of per-sample losses: the losses
    ``[n]`` and the logits ``[n, C]`` they came from. Every method accepts it; SAF and MESA
    require it (they need the logits)."""

    losses: Tensor
    logits: Tensor


def check_num_examples(value: object) -> int:
    """``num_examples`` as an int >= 1; ValueError otherwise."""
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
        raise ValueError(f"num_examples must be the size N of the training set (an int >= 1), "
                         f"got {value!r}")
    return int(value)


class ExampleMemory(Stateful):
    """Tables of ``num_examples`` rows on the device (see the module docstring).

    A table is made at its first use (:meth:`table`), on the device and with the row shape
    of what is stored in it; :meth:`state_dict` holds them all. ``tables`` declares the
    tables its owner keeps: name -> (row shape, None for a size known only at first use;
    dtype; fill); :meth:`load_state_dict` then refuses a state with other tables or of other
    shapes or dtypes. Its state must be in a method's state (:attr:`required`).
    """

    required = True

    def __init__(self, num_examples: int,
                 tables: dict[str, tuple[tuple[int | None, ...], torch.dtype, float]]
                 | None = None) -> None:
        self.num_examples = check_num_examples(num_examples)
        #: the declared tables (None: any)
        self.schema = tables
        #: name -> tensor of N + 1 rows (row N takes the writes that are not kept)
        self.tables: dict[str, Tensor] = {}
        self._fill: dict[str, float] = {}
        #: DDP's process group when the replicas share the memory (set by the engine)
        self.replicated = False
        self.group = None
        self._staged: list[tuple[Tensor, dict[str, Tensor]]] = []

    # ------------------------------------------------------------------ ids
    def check_ids(self, ids: object, n: int) -> Tensor:
        """ValueError unless ``ids`` are ``n`` integer example ids in [0, N). Reads them on
        the host (one sync where they live on a GPU); :meth:`guard` is the device-side
        check."""
        if not isinstance(ids, Tensor):
            raise ValueError("this method needs the ids of a batch's examples: give batches "
                             "as ksam.IndexedBatch(batch, index), index the examples' "
                             "positions in the training set")
        if ids.dim() != 1 or ids.shape[0] != n or ids.is_floating_point() \
                or ids.is_complex() or ids.dtype == torch.bool:
            raise ValueError(f"the batch's index must be a 1-D integer tensor of {n} example "
                             f"ids, got {ids.dtype} of shape {list(ids.shape)}")
        low, high = (int(v) for v in torch.aminmax(ids.detach()))
        if low < 0 or high >= self.num_examples:
            bad = low if low < 0 else high
            raise ValueError(f"example id {bad} is out of range for num_examples="
                             f"{self.num_examples} (ids must be in [0, {self.num_examples})"
                             "; give num_examples the size of the training set)")
        return ids

    def guard(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        """``(safe, check)``: the ids as int64 with any out of range sent to the spare row,
        and a 0-d value that is NaN unless all were in range (the engine's finite check then
        skips the step). On the device, no host sync."""
        ids = ids.long()
        valid = (ids >= 0) & (ids < self.num_examples)
        safe = torch.where(valid, ids, self.num_examples)
        check = torch.where(valid.all(), 0.0, math.nan)
        return safe, check

    # --------------------------------------------------------------- tables
    def table(self, name: str, row_shape: tuple[int, ...], dtype: torch.dtype,
              device: torch.device, fill: float = 0.0) -> Tensor:
        """The table ``name`` (made filled with ``fill`` at its first use), on ``device``."""
        t = self.tables.get(name)
        if t is None:
            t = torch.full((self.num_examples + 1, *row_shape), fill, dtype=dtype,
                           device=device)
            self.tables[name] = t
        elif tuple(t.shape[1:]) != tuple(row_shape):
            raise ValueError(f"the memory's {name!r} rows have shape {list(t.shape[1:])}, "
                             f"this step gives {list(row_shape)}")
        elif t.device != device:
            t = self.tables[name] = t.to(device)
        self._fill[name] = fill
        return t

    def read(self, name: str, ids: Tensor) -> Tensor:
        """Rows ``ids`` of table ``name`` (a copy)."""
        return self.tables[name].index_select(0, ids)

    def stage(self, ids: Tensor, **rows: Tensor) -> None:
        """Rows to write at ``ids`` (one tensor per table) once the step is applied."""
        self._staged.append((ids, {k: v.detach() for k, v in rows.items()}))

    def discard(self) -> None:
        """Forget the rows staged so far (a step that failed part of the way)."""
        self._staged = []

    def commit(self, keep: bool | Tensor, sharp: bool = True) -> None:
        """Write the staged rows where ``keep`` (bool, or a 0-d bool device tensor), then
        forget them. Under DDP (``replicated``) every rank's staged rows are written."""
        staged, self._staged = self._staged, []
        if not staged or keep is False:
            return
        names = staged[0][1].keys()
        ids = torch.cat([s[0] for s in staged])
        rows = {k: torch.cat([s[1][k] for s in staged]) for k in names}
        if self.replicated:
            ids, rows = self._gather(ids, rows)
        if isinstance(keep, Tensor):
            ids = torch.where(keep, ids, self.num_examples)
        for name, values in rows.items():
            table = self.tables[name]
            table.index_copy_(0, ids, values.to(table.dtype))

    def _gather(self, ids: Tensor, rows: dict[str, Tensor]) -> tuple[Tensor, dict]:
        """All ranks' staged rows (padded to the longest with writes to the spare row)."""
        import torch.distributed as dist

        world = dist.get_world_size(self.group)
        count = torch.tensor([ids.numel()], device=ids.device)
        counts = [torch.zeros_like(count) for _ in range(world)]
        dist.all_gather(counts, count, group=self.group)
        most = int(max(int(c) for c in counts))
        pad = most - ids.numel()

        def gathered(t: Tensor, fill: float) -> Tensor:
            if pad:
                t = torch.cat([t, t.new_full((pad, *t.shape[1:]), fill)])
            parts = [torch.empty_like(t) for _ in range(world)]
            dist.all_gather(parts, t.contiguous(), group=self.group)
            return torch.cat(parts)

        return gathered(ids, self.num_examples), {k: gathered(v, 0) for k, v in rows.items()}

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict:
        return {"num_examples": self.num_examples,
                "tables": {k: v.clone() for k, v in self.tables.items()}}

    def load_state_dict(self, state: dict, *, applied: bool = False) -> None:
        """Restore :meth:`state_dict`. ValueError, nothing changed, for a memory of another
        N, a table that is not a tensor of N + 1 rows, one not declared (a renamed table)
        or of another row shape or dtype, NaN entries (or non-finite ones other than the
        table's fill), and with ``applied`` (a state of a run that has applied steps,
        which wrote every declared table) a declared table missing."""
        if not state and not applied:
            self.tables = {}
            return
        if not isinstance(state, dict) or not isinstance(state.get("tables"), dict):
            raise ValueError("the memory's state lacks its tables")
        if state.get("num_examples") != self.num_examples:
            raise ValueError(f"this state's memory has num_examples="
                             f"{state.get('num_examples')}, this engine's {self.num_examples}")
        tables = {name: self._checked(name, t) for name, t in state["tables"].items()}
        missing = sorted(set(self.schema or {}) - set(tables)) if applied else []
        if missing:
            raise ValueError(f"the memory's state lacks its table(s) {', '.join(missing)} "
                             "(a state of applied steps has them all)")
        self.tables = tables
        self._staged = []

    def _checked(self, name: str, t: object) -> Tensor:
        """A copy of the saved table ``name``, checked (see :meth:`load_state_dict`)."""
        if not isinstance(t, Tensor) or t.dim() < 1 or t.shape[0] != self.num_examples + 1:
            raise ValueError(f"the memory's table {name!r} does not have "
                             f"{self.num_examples + 1} rows")
        fill = 0.0
        if self.schema is not None:
            if name not in self.schema:
                raise ValueError(f"the memory has no table {name!r} (its tables: "
                                 f"{', '.join(sorted(self.schema))})")
            rows, dtype, fill = self.schema[name]
            shape = tuple(t.shape[1:])
            if t.dtype != dtype or len(shape) != len(rows) or any(
                    want is not None and want != got for want, got in zip(rows, shape)):
                raise ValueError(f"the memory's table {name!r} has rows {list(shape)} of "
                                 f"{t.dtype}, this memory keeps {list(rows)} of {dtype}")
        ok = torch.isfinite(t) | (t == fill) if t.is_floating_point() else t >= 0
        if not bool(ok.all()):
            raise ValueError(f"the memory's table {name!r} holds "
                             f"{'non-finite' if t.is_floating_point() else 'negative'} entries")
        return t.clone()


def kl_to_target(logits: Tensor, target_logits: Tensor, temperature: float) -> Tensor:
    r"""Per-example :math:`\tau^2\,\mathrm{KL}(\mathrm{softmax}(m/\tau)\Vert
    \mathrm{softmax}(z/\tau))` (the reference code's ``F.kl_div`` of the two, summed over
    classes, times :math:`\tau^2`), in fp32; the target carries no gradient."""
    log_q = F.log_softmax(logits.float() / temperature, dim=-1)
    log_p = F.log_softmax(target_logits.detach().float() / temperature, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1) * temperature ** 2


class LossTerm(Stateful):
    """Base class of the engine's per-example loss terms (see the module docstring).

    The engine calls :meth:`objective` in each gradient pass of a step it is
    :meth:`active` in, with the pass's per-sample losses, the logits from ``loss_fn``'s
    :class:`LossOutput`, the rows' example ids (None without an :class:`IndexedBatch`) and
    ``call(model)``, which runs ``loss_fn`` on the pass's rows with another model. A term
    with state stages its update there and makes it its state in :meth:`commit`, after the
    optimizer step, where ``keep``."""

    #: the term reads per-example memory (the batch must carry example ids)
    memory: ExampleMemory | None = None
    #: forwards of another model (without gradient) the term runs over the rows of each
    #: gradient pass it is added to (MESA's average model: 1); what a step costs counts them
    extra_forwards: int = 0

    def active(self, step: int) -> bool:
        """Whether the term is added at optimizer step ``step`` (host-side, static)."""
        return True

    def objective(self, losses: Tensor, logits: Tensor, ids: Tensor | None,
                  call: object) -> Tensor:
        raise NotImplementedError

    def graph_key(self, step: int) -> object:
        return self.active(step)

    required = True


class TrajectoryKL(LossTerm):
    """SAF's trajectory loss (Du et al. 2022, reference ``SAF_train.py``): the KL from the
    logits an example got ``delay`` visits before (remembered) to its logits now, weighted
    ``lam`` at temperature ``temperature``, added once the example has been seen more than
    ``start_epoch`` times. An example's visits are counted in the memory (one per applied
    step that holds it), so with a loader that gives every example once an epoch a visit
    is the reference code's epoch. The memory keeps ``delay + 1`` logit rows per example
    (a ring: the visit-v logits go to slot v mod (delay + 1)), as the reference does."""

    def __init__(self, num_examples: int, *, lam: float = 0.16, temperature: float = 5.0,
                 delay: int = 3, start_epoch: int = 5) -> None:
        self.lam = check_number("lam", lam, low=0)
        self.temperature = check_number("temperature", temperature, low=0, low_open=True)
        self.delay = check_int("delay", delay, low=1)
        self.memory = ExampleMemory(num_examples, tables={
            "logits": ((self.delay + 1, None), torch.float32, 0.0),
            "visits": ((), torch.long, 0.0)})
        self.start_epoch = check_int("start_epoch", start_epoch)

    def objective(self, losses: Tensor, logits: Tensor, ids: Tensor | None,
                  call: object) -> Tensor:
        assert ids is not None
        slots = self.delay + 1
        mem = self.memory
        past = mem.table("logits", (slots, logits.shape[-1]), torch.float32, logits.device)
        visits = mem.table("visits", (), torch.long, logits.device)
        seen = visits.index_select(0, ids)
        # The ring slot written delay visits ago is the one after this visit's.
        target = past[ids, torch.remainder(seen + 1, slots)]
        on = (seen > self.start_epoch) & (seen >= self.delay)
        kl = kl_to_target(logits, target, self.temperature)
        # This visit's logits go into one slot of each example's ring: staged as whole
        # rings (the other slots as they are), so a commit is one index_copy per table.
        ring = past.index_select(0, ids)
        ring[torch.arange(ids.numel(), device=ids.device), torch.remainder(seen, slots)] = \
            logits.detach().float()
        mem.stage(ids, visits=seen + 1, logits=ring)
        return losses.float() + self.lam * torch.where(on, kl, 0.0)

    def __repr__(self) -> str:
        return (f"TrajectoryKL(lam={self.lam:g}, temperature={self.temperature:g}, "
                f"delay={self.delay}, start_epoch={self.start_epoch}, "
                f"num_examples={self.memory.num_examples})")


class EMAKL(LossTerm):
    """MESA's loss (Du et al. 2022, reference ``MESA_train.py``): the KL from the logits of
    an exponential moving average of the model (``decay``, in eval mode, one extra forward
    without gradient) to the model's logits, weighted ``lam`` at ``temperature``, from
    optimizer step ``start_step`` on. The average is updated after every applied step:
    ``ema = decay * ema + (1 - decay) * w`` for every floating-point entry of the model's
    ``state_dict`` (parameters and BatchNorm statistics), other entries copied."""

    extra_forwards = 1

    def __init__(self, model: nn.Module, *, lam: float = 0.3, temperature: float = 5.0,
                 decay: float = 0.9998, start_step: int = 0) -> None:
        self.lam = check_number("lam", lam, low=0)
        self.temperature = check_number("temperature", temperature, low=0, low_open=True)
        self.decay = check_fraction("decay", decay, high_open=True)
        self.start_step = check_int("start_step", start_step)
        self.model = model
        #: the moving average: a copy of the model, in eval mode, without gradients
        self.ema = copy.deepcopy(model).eval().requires_grad_(False)

    def active(self, step: int) -> bool:
        return step >= self.start_step

    def objective(self, losses: Tensor, logits: Tensor, ids: Tensor | None,
                  call: object) -> Tensor:
        with torch.no_grad():
            out = call(self.ema)
        target = out.logits if isinstance(out, LossOutput) else out[1]
        kl = kl_to_target(logits, target, self.temperature)
        return losses.float() + self.lam * kl

    def commit(self, keep: bool | Tensor, sharp: bool = True) -> None:
        if keep is False:
            return
        d = self.decay
        with torch.no_grad():
            for e, m in zip(self.ema.state_dict().values(), self.model.state_dict().values()):
                new = d * e + (1.0 - d) * m if e.is_floating_point() else m
                e.copy_(torch.where(keep, new, e) if isinstance(keep, Tensor) else new)

    def state_dict(self) -> dict:
        return {"ema": {k: v.clone() for k, v in self.ema.state_dict().items()}}

    def load_state_dict(self, state: dict, *, applied: bool = False) -> None:
        """Restore :meth:`state_dict`: ValueError, nothing changed, unless it holds the
        whole average, every entry of the model's ``state_dict`` with its shape and dtype,
        finite."""
        saved = state.get("ema") if isinstance(state, dict) else None
        mine = self.ema.state_dict()
        if not isinstance(saved, dict) or set(saved) != set(mine):
            missing = sorted(set(mine) - set(saved or {}))[:3]
            raise ValueError("MESA's state lacks its average model"
                             + (f" (missing {', '.join(missing)})" if missing else ""))
        for key, t in mine.items():
            new = saved[key]
            if not isinstance(new, Tensor) or new.shape != t.shape or new.dtype != t.dtype:
                raise ValueError(f"MESA's average: {key} does not fit the model "
                                 f"({list(t.shape)} {t.dtype})")
            if new.is_floating_point() and not bool(new.isfinite().all()):
                raise ValueError(f"MESA's average: {key} is not finite")
        self.ema.load_state_dict(saved)

    def __repr__(self) -> str:
        return (f"EMAKL(lam={self.lam:g}, temperature={self.temperature:g}, "
                f"decay={self.decay:g}, start_step={self.start_step})")


class RememberedLosses:
    """Scores from memory for K-SAM and Ordered SGD: the loss each example had at w the
    last time a pass computed it (the ascent pass's rows of a sharp K-SAM step, the descent
    rows of a plain step or of Ordered SGD), +inf for an example not scored yet, so that
    every example is picked once before stale losses compete. No scoring forward."""

    def __init__(self, num_examples: int) -> None:
        self.memory = ExampleMemory(num_examples,
                                    tables={"loss": ((), torch.float32, math.inf)})

    def read(self, ids: Tensor) -> Tensor:
        table = self.memory.table("loss", (), torch.float32, ids.device, fill=math.inf)
        return table.index_select(0, ids)

    def refresh(self, ids: Tensor, losses: Tensor) -> None:
        """Stage the losses at w of the examples ``ids``."""
        self.memory.stage(ids, loss=losses.float())

    def __repr__(self) -> str:
        return f"RememberedLosses(num_examples={self.memory.num_examples})"
