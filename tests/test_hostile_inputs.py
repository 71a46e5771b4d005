"""Hostile but realistic input, through the Python API and the command line, grouped by the
promise it puts to the test:

- bad input changes nothing (options, specs, refused steps, refused loads);
- non-finite steps are skipped (also in a param group added after the engine was built);
- resume is exact (or refused with one error line, never a silent retrain);
- files stay inside ``--out`` (``--overwrite`` removes only what ksam wrote there);
- every check the command line can make is made before it writes.

Every assertion is exact: tensors equal bit for bit, files byte for byte, exit code 2 with
one ``ksam: error:`` line.
"""

from __future__ import annotations

import copy
import errno
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    CLI_SMALL,
    assert_one_error,
    assert_same,
    assert_tree_equal,
    assert_unchanged,
    batches,
    ce,
    ce_logits,
    copy_folder,
    data,
    files_of,
    lock_held,
    mlp,
    params,
    sgd,
    snapshot,
)

import ksam
from ksam.lab.cli import main
from ksam.lab.config import MethodSpec
from ksam.lab.outputs import MANIFEST, load_checkpoint, save_checkpoint

#: Methods by name, with the options they need here (a memory of 64 examples).
SPECS = {
    "saf": ("saf", {"num_examples": 64}),
    "osgd-memory": ("osgd", {"k": 8, "scores": "memory", "num_examples": 64}),
    "ksam-memory": ("ksam", {"k": 8, "scores": "memory", "num_examples": 64}),
    "looksam": ("looksam", {"interval": 2}),
}


def build(name: str, model: torch.nn.Module, opt: torch.optim.Optimizer | None = None,
          **kw) -> ksam.Method:
    method, options = SPECS.get(name, (name, {}))
    return ksam.create(method, model, opt or sgd(model), seed=0, **{**options, **kw})


def batch_for(engine: ksam.Method, seed: int):
    """The ``seed``-th batch of 32, with example ids (two halves of 64) for a memory."""
    b = data(32, seed=seed)
    if engine.plan.memory is None:
        return b
    return ksam.IndexedBatch(b, torch.arange(32) + 32 * (seed % 2))


def loss_for(engine: ksam.Method):
    return ce_logits if engine.plan.term is not None else ce


def take_steps(engine: ksam.Method, seeds) -> None:
    for s in seeds:
        engine.step(batch_for(engine, s), loss_for(engine))


def _python_ksam(*args: str) -> list[str]:
    return [sys.executable, "-m", "ksam", *args]


# =========================================================== bad input changes nothing

ILL_TYPED = [
    ("sam", {"seed": -1}, "seed must be an integer"),
    ("sam", {"seed": 1.5}, "seed must be an integer"),
    ("sam", {"seed": "7"}, "seed must be an integer"),
    ("sam", {"seed": True}, "seed must be an integer"),
    ("sam", {"seed": 2**64}, "seed must be an integer"),
    ("sgd", {"fast_path": "yes"}, "fast_path must be True or False"),
    ("ksam", {"fast_path": 2}, "fast_path must be True or False"),
    ("sam", {"adaptive": "yes"}, "adaptive must be True or False"),
    ("ksam", {"adaptive": 2}, "adaptive must be True or False"),
    ("sam", {"eta": -1.0}, "eta must be"),
    ("ksam", {"eta": math.nan}, "eta must be"),
    ("rst", {"eta": "0.1"}, "eta must be"),
    ("sgd", {"grad_scaler": "x"}, "grad_scaler must be"),
    ("sgd", {"finite_reducer": 3}, "finite_reducer must be"),
]


@pytest.mark.parametrize("method,kwargs,message", ILL_TYPED,
                         ids=[f"{m}-{next(iter(k))}={next(iter(k.values()))!r}"
                              for m, k, _ in ILL_TYPED])
def test_ill_typed_options_are_refused_at_construction(method, kwargs, message):
    model = mlp()
    opt = sgd(model)
    before = params(model)
    with pytest.raises(ValueError, match=message):
        ksam.create(method, model, opt, **{"seed": 0, **kwargs})
    assert_same(params(model), before)
    assert not opt.state


def test_a_repeated_method_option_is_refused(tmp_path, capsys):
    with pytest.raises(ValueError, match="option k is given twice"):
        MethodSpec.parse("ksam:k=0.25,k=0.5")
    out = tmp_path / "out"
    assert_one_error(capsys, main(["train", "--method", "ksam:k=0.25,k=0.5", "--out",
                                   str(out), *CLI_SMALL]), "given twice")
    assert not out.exists()


def _scalar_loss(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


@pytest.mark.filterwarnings("ignore:ksam fast path off")
@pytest.mark.parametrize("method,kwargs", [
    ("random-sam", {}), ("esam", {}), ("rst", {}), ("sam", {"p": 0.5}),
    ("ksam", {"p": 0.5, "k": 8}), ("random-sam", {"fast_path": True}),
], ids=["random-sam", "esam", "rst", "sam-p", "ksam-p", "random-sam-fast"])
def test_a_refused_step_leaves_the_generator_as_it_was(method, kwargs):
    """A step refused for its loss_fn draws nothing: the next steps are bit for bit those
    of a run that never made the call."""
    refused_model, clean_model = mlp(), mlp()
    refused = ksam.create(method, refused_model, sgd(refused_model), seed=3, **kwargs)
    clean = ksam.create(method, clean_model, sgd(clean_model), seed=3, **kwargs)
    steps = batches(5)
    refused.step(steps[0], ce)
    clean.step(steps[0], ce)
    with pytest.raises(ValueError, match="reduction='none'"):
        refused.step(steps[1], _scalar_loss)
    assert torch.equal(refused.generator.get_state(), clean.generator.get_state())
    for b in steps[1:]:
        refused.step(b, ce)
        clean.step(b, ce)
    assert_same(params(refused_model), params(clean_model))
    assert refused.steps == clean.steps == 5


@pytest.mark.parametrize("name", ["sgd", "sam", "ksam", "esam", "msam", "looksam", "saf",
                                  "mesa", "osgd-memory"])
def test_detached_losses_are_refused_by_every_method(name):
    """A loss_fn whose losses do not require grad is refused (SAF and MESA too, whose
    loss term alone would still give a gradient), and the refused step changes nothing."""
    model = mlp()
    engine = build(name, model)
    take_steps(engine, [0])
    opt = engine.optimizer
    before = snapshot(model, opt)
    loss_fn = loss_for(engine)

    def detached(m, b):
        out = loss_fn(m, b)
        if isinstance(out, ksam.LossOutput):
            return ksam.LossOutput(out.losses.detach(), out.logits)
        return out.detach()

    with pytest.raises(ValueError, match="do not require grad"):
        engine.step(batch_for(engine, 1), detached)
    assert_unchanged(before, model, opt)
    assert engine.steps == 1


# =================================================== non-finite steps are skipped
# ... also in a param group added to the optimizer after the engine was built.

def _first_layer_added_later(name: str, after: int = 1,
                             **kw) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Progressive unfreezing, two ways, over the same four batches: (a) the optimizer holds
    the last layer, ``after`` steps, then ``add_param_group`` gives it the first; (b) the
    optimizer holds both groups from the start, the first layer frozen for those steps.
    Returns the two models."""
    steps = batches(4)
    late = mlp()
    opt = torch.optim.SGD(late[2].parameters(), lr=0.1, momentum=0.9)
    engine = build(name, late, opt, **kw)
    for b in steps[:after]:
        engine.step(b, ce)
    opt.add_param_group({"params": list(late[0].parameters())})
    for b in steps[after:]:
        engine.step(b, ce)

    ref = mlp()
    ref[0].requires_grad_(False)
    ref_opt = torch.optim.SGD([{"params": list(ref[2].parameters())},
                               {"params": list(ref[0].parameters())}], lr=0.1, momentum=0.9)
    ref_engine = build(name, ref, ref_opt, **kw)
    for b in steps[:after]:
        ref_engine.step(b, ce)
    ref[0].requires_grad_(True)
    for b in steps[after:]:
        ref_engine.step(b, ce)
    return late, ref


@pytest.mark.parametrize("name,after,kwargs,atol", [
    ("sam", 1, {}, 0), ("sam", 1, {"fast_path": True}, 0), ("asam", 1, {}, 0),
    ("ksam", 1, {"k": 8}, 0), ("random-sam", 1, {}, 0), ("esam", 1, {}, 0),
    ("msam", 1, {}, 0),
    # LookSAM's flat buffers are as long as the parameters it steps, and its sums over them
    # round alike only for buffers of one length: bit for bit when the group is added
    # before the first step, up to rounding after one.
    ("looksam", 0, {}, 0), ("looksam", 1, {}, 1e-6),
], ids=["sam", "sam-fast", "asam", "ksam", "random-sam", "esam", "msam", "looksam",
        "looksam-after-a-step"])
def test_a_param_group_added_later_is_perturbed_and_stepped(name, after, kwargs, atol):
    """The engine reads the optimizer's param groups at every step: a group added later is
    perturbed, restored and stepped exactly as if it had been there, frozen, from the
    start."""
    late, ref = _first_layer_added_later(name, after, **kwargs)
    assert not torch.equal(late[0].weight, mlp()[0].weight)  # the added layer trained
    assert_same(params(late), params(ref), atol=atol)


def test_looksam_keeps_its_direction_for_the_parameters_it_had():
    """An added group extends LookSAM's stored direction v by zeros: the entries it had
    stay as they were, bit for bit."""
    model = mlp()
    opt = torch.optim.SGD(model[2].parameters(), lr=0.1, momentum=0.9)
    engine = build("looksam", model, opt)  # interval 2: step 0 sets v, step 1 reads it
    engine.step(data(seed=0), ce)
    v = engine.transform.state_dict()["v"]
    assert v.numel() == 16 * 4 + 4 and bool(v.ne(0).any())
    opt.add_param_group({"params": list(model[0].parameters())})
    before = params(model)[:2]
    engine.step(data(seed=1), ce)
    assert torch.equal(engine.transform.state_dict()["v"],
                       torch.cat([v, torch.zeros(6 * 16 + 16)]))
    assert not torch.equal(model[0].weight, before[0])


@pytest.mark.parametrize("name", ["sgd", "sam", "ksam", "looksam"])
def test_a_nan_gradient_only_in_an_added_group_skips_the_step(name):
    model = mlp()
    opt = torch.optim.SGD(model[2].parameters(), lr=0.1, momentum=0.9)
    engine = build(name, model, opt)
    engine.step(data(seed=0), ce)
    opt.add_param_group({"params": list(model[0].parameters())})
    engine.step(data(seed=1), ce)  # the added group gets its momentum
    before = snapshot(model, opt)
    assert len(before[1]) == 4
    hook = model[0].weight.register_hook(lambda g: torch.full_like(g, math.nan))
    try:
        result = engine.step(data(seed=2), ce)
    finally:
        hook.remove()
    assert result.skipped and engine.skipped_steps == 1
    assert_unchanged(before, model, opt)


def test_a_param_group_of_another_model_is_refused_at_the_next_step():
    model, other = mlp(), mlp(1)
    opt = sgd(model)
    engine = ksam.SAM(model, opt, seed=0)
    engine.step(data(seed=0), ce)
    opt.add_param_group({"params": list(other.parameters())})
    before = snapshot(model, opt)
    with pytest.raises(ValueError, match="not the model's"):
        engine.step(data(seed=1), ce)
    assert_unchanged(before, model, opt)
    assert engine.steps == 1


# ============================================================== resume is exact
# load_state_dict: a state that does not fit, or is not sound, is refused and changes nothing.

def _nan_momentum(state):
    buf = next(iter(state["optimizer"]["state"].values()))["momentum_buffer"]
    buf.fill_(math.nan)


def _rename_table(state):
    tables = state["memory"]["tables"]
    tables["logit"] = tables.pop("logits")


def _short_loss_table(state):
    tables = state["memory"]["tables"]
    tables["loss"] = tables["loss"][:10]


def _drop_ema_entry(state):
    state["term"]["ema"].pop(next(iter(state["term"]["ema"])))


EDITS = [
    ("negative steps", "sgd", lambda s: s.update(steps=-5), "steps"),
    ("fractional steps", "sgd", lambda s: s.update(steps=1.7), "steps"),
    ("negative skipped steps", "sgd", lambda s: s.update(skipped_steps=-3), "skipped_steps"),
    ("more skipped than steps", "sgd", lambda s: s.update(skipped_steps=s["steps"] + 1),
     "skipped steps"),
    ("boolean steps", "sam", lambda s: s.update(steps=True), "steps"),
    ("negative lr", "sam", lambda s: s["optimizer"]["param_groups"][0].update(lr=-1.0),
     "'lr'"),
    ("infinite momentum", "sam",
     lambda s: s["optimizer"]["param_groups"][0].update(momentum=math.inf), "'momentum'"),
    ("nan momentum buffer", "sam", _nan_momentum, "not finite"),
    ("memory without its tables", "saf", lambda s: s["memory"]["tables"].clear(), "lacks"),
    ("renamed memory table", "saf", _rename_table, "no table 'logit'"),
    ("memory table of other rows", "osgd-memory", _short_loss_table, "rows"),
    ("no memory", "ksam-memory", lambda s: s.pop("memory"), "lacks the method's memory"),
    ("looksam transform emptied", "looksam", lambda s: s.update(transform={}), "direction v"),
    ("mesa term emptied", "mesa", lambda s: s.update(term={}), "average"),
    ("mesa term incomplete", "mesa", _drop_ema_entry, "average"),
]


@pytest.mark.parametrize("name,edit,message", [e[1:] for e in EDITS],
                         ids=[e[0] for e in EDITS])
def test_an_edited_state_is_refused_and_changes_nothing(name, edit, message):
    source, target, twin = (build(name, mlp(seed)) for seed in (1, 2, 2))
    take_steps(source, range(3))
    for engine in (target, twin):
        take_steps(engine, range(2))
    state = copy.deepcopy(source.state_dict())
    edit(state)
    before = copy.deepcopy(target.state_dict())
    with pytest.raises(ValueError, match=message):
        target.load_state_dict(state)
    assert_tree_equal(target.state_dict(), before)
    for engine in (target, twin):  # steps on as if it had never been asked
        take_steps(engine, range(2, 5))
    assert_same(params(target.model), params(twin.model))


def test_an_optimizer_state_of_a_wider_model_is_refused_and_changes_nothing():
    wide = mlp(hidden=32)
    source = ksam.SAM(wide, sgd(wide), seed=0)
    take_steps(source, range(2))
    narrow, twin_model = mlp(), mlp()
    target, twin = ksam.SAM(narrow, sgd(narrow), seed=0), ksam.SAM(twin_model,
                                                                  sgd(twin_model), seed=0)
    for engine in (target, twin):
        take_steps(engine, range(2))
    before = copy.deepcopy(target.state_dict())
    with pytest.raises(ValueError, match="shape \\[32, 6\\]"):
        target.load_state_dict(source.state_dict())
    assert_tree_equal(target.state_dict(), before)
    for engine in (target, twin):
        take_steps(engine, range(2, 4))
    assert_same(params(narrow), params(twin_model))


# ...................................................... resume on the command line

def _train(out: Path, *extra: str) -> int:
    return main(["train", "--method", "sgd", "--epochs", "2", "--out", str(out), *CLI_SMALL,
                 *extra])


@pytest.mark.parametrize("how", ["deleted", "dangling link"])
def test_resume_without_its_checkpoint_after_progress_is_one_error(two_epoch_run, tmp_path,
                                                                   capsys, how):
    out = copy_folder(two_epoch_run, tmp_path / "run")
    (out / "checkpoint.pt").unlink()
    if how == "dangling link":
        (out / "checkpoint.pt").symlink_to(tmp_path / "gone.pt")
    before = files_of(out)
    needle = "is a link to" if how == "dangling link" else "shows 2 epochs finished"
    assert_one_error(capsys, _train(out, "--resume"), needle)
    assert files_of(out) == before


def _rehashed(two_epoch_run: Path, target: Path, edit) -> Path:
    """A copy of the finished run whose checkpoint was edited and checksummed anew."""
    out = copy_folder(two_epoch_run, target)
    state = load_checkpoint(out / "checkpoint.pt")
    edit(state)
    save_checkpoint(state, out / "checkpoint.pt")
    return out


def _other_weights(state):
    name = next(iter(state["model"]))
    state["model"][name] = torch.zeros(3, 3)


def _nan_checkpoint_momentum(state):
    opt = state["engine"]["optimizer"]
    next(iter(opt["state"].values()))["momentum_buffer"].fill_(math.nan)


@pytest.mark.parametrize("edit,needle", [
    (_other_weights, "holds the weights of another model"),
    (_nan_checkpoint_momentum, "non-finite optimizer state"),
    (lambda s: s.update(history=[]), "history does not hold epochs 1 to 2"),
    (lambda s: s.update(epoch=1), "history does not hold epochs 1 to 1"),
], ids=["weights-of-another-model", "nan-momentum", "emptied-history", "epoch-field"])
def test_a_rehashed_checkpoint_is_checked_beyond_its_checksum(two_epoch_run, tmp_path, capsys,
                                                              edit, needle):
    out = _rehashed(two_epoch_run, tmp_path / "run", edit)
    before = files_of(out)
    assert_one_error(capsys, _train(out, "--resume"), needle)
    assert files_of(out) == before


def test_metrics_that_disagree_with_the_checkpoint_are_one_error(two_epoch_run, tmp_path,
                                                                 capsys):
    out = copy_folder(two_epoch_run, tmp_path / "run")
    rows = (out / "metrics.jsonl").read_text().splitlines()
    (out / "metrics.jsonl").write_text("\n".join([rows[1], rows[0]]) + "\n")
    before = files_of(out)
    assert_one_error(capsys, _train(out, "--resume"), "does not agree with the history")
    assert files_of(out) == before


def test_resume_on_a_users_own_config_json_says_so(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "config.json").write_text('{"my": "settings"}')
    before = files_of(out)
    assert_one_error(capsys, _train(out, "--resume"), "config.json was not written by ksam")
    assert files_of(out) == before


def test_a_full_disk_names_the_file_and_the_run_resumes_exactly(two_epoch_run, tmp_path,
                                                                capsys, monkeypatch):
    """The second checkpoint's write fails for want of space: one error naming the file and
    saying how to go on; --resume then ends with the weights of the uninterrupted run."""
    real_fsync, writes = os.fsync, []

    def full_disk(fd):
        if ".checkpoint.pt." in os.readlink(f"/proc/self/fd/{fd}"):
            writes.append(fd)
            if len(writes) == 2:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)

    out = tmp_path / "run"
    monkeypatch.setattr(os, "fsync", full_disk)
    line = assert_one_error(capsys, _train(out), "checkpoint.pt")
    monkeypatch.undo()
    assert "No space left on device" in line and "--resume" in line
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] == 1
    assert _train(out, "--resume") == 0
    done, reference = (load_checkpoint(p / "checkpoint.pt") for p in (out, two_epoch_run))
    assert_tree_equal(done["model"], reference["model"])
    assert (out / "metrics.jsonl").read_text().count("\n") == 2


# ============================================================ files stay inside --out

def _hostile_manifest(tmp_path: Path, paths: list[str]) -> Path:
    out = tmp_path / "d" / "o"
    out.mkdir(parents=True)
    (out / MANIFEST).write_text(json.dumps({"command": "train", "paths": paths}))
    return out


def test_overwrite_never_follows_dot_dot_out_of_the_folder(tmp_path, capsys):
    precious = tmp_path / "d" / "precious.txt"
    out = _hostile_manifest(tmp_path, ["../precious.txt"])
    precious.write_text("keep")
    assert_one_error(capsys, _train(out, "--overwrite"), "not a path inside the folder")
    assert precious.read_text() == "keep"
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST]


def test_overwrite_never_follows_a_link_out_of_the_folder(tmp_path, capsys):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim.txt").write_text("keep")
    out = _hostile_manifest(tmp_path, ["link/victim.txt"])
    (out / "link").symlink_to(outside)
    assert_one_error(capsys, _train(out, "--overwrite"), "symbolic link")
    assert (outside / "victim.txt").read_text() == "keep"


def test_overwrite_with_an_absolute_path_in_the_manifest_ends_and_deletes_nothing(tmp_path):
    """(Before, the clean-up climbed from the absolute path to / and spun there.)"""
    victim = tmp_path / "abs" / "victim.txt"
    victim.parent.mkdir()
    victim.write_text("keep")
    out = _hostile_manifest(tmp_path, [str(victim)])
    proc = subprocess.run(_python_ksam("train", "--method", "sgd", "--epochs", "1", "--out",
                                       str(out), "--overwrite", *CLI_SMALL),
                          capture_output=True, text=True, timeout=120)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1, proc.stderr
    assert err[0].startswith("ksam: error:") and "not a path inside the folder" in err[0]
    assert victim.read_text() == "keep"


def test_manifest_paths_are_strictly_inside_the_folder(tmp_path):
    from ksam.lab.outputs import manifest_path

    (tmp_path / "sub").mkdir()
    (tmp_path / "out").symlink_to(tmp_path.parent)
    assert manifest_path(tmp_path, "sub/config.json") == tmp_path / "sub" / "config.json"
    assert manifest_path(tmp_path, "out") == tmp_path / "out"  # the link itself: inside
    for bad in ("..", "../x", "sub/../../x", "/etc/passwd", "", ".", "out/x", 5, None):
        with pytest.raises(ValueError):
            manifest_path(tmp_path, bad)


def test_overwrite_keeps_a_users_own_config_json(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "config.json").write_text('{"my": "settings"}')
    assert_one_error(capsys, _train(out, "--overwrite"), "config.json was not written by ksam")
    assert files_of(out) == {"config.json": b'{"my": "settings"}'}


def test_a_busy_out_is_refused_with_the_locks_message(two_epoch_run, tmp_path, capsys):
    out = copy_folder(two_epoch_run, tmp_path / "run")
    with lock_held(out):
        before = files_of(out)
        assert_one_error(capsys, _train(out), f"--out {out} is in use")
        assert files_of(out) == before


# ============================================ the command line checks before it writes

@pytest.mark.parametrize("spec,needle", [
    ("saf:num_examples=5", "num_examples=5, but the training set has 240 examples"),
    ("ksam:scores=memory,num_examples=10", "num_examples=10, but the training set has 240"),
    ("saf:num_examples=100000", "num_examples=100000, but the training set has 240"),
], ids=["saf-too-few", "ksam-memory-too-few", "saf-too-many"])
@pytest.mark.parametrize("command", ["train", "compare"])
def test_num_examples_is_checked_against_the_training_set_before_writing(tmp_path, capsys,
                                                                         command, spec,
                                                                         needle):
    out = tmp_path / "out"
    argv = ["train", "--method", spec] if command == "train" else \
        ["compare", "--methods", "sgd", spec, "--seeds", "1", "--no-lr-sweep"]
    assert_one_error(capsys, main([*argv, "--epochs", "1", "--out", str(out), *CLI_SMALL]),
                     needle)
    assert not out.exists()


def test_a_data_dir_that_is_a_file_is_called_a_file(tmp_path, capsys):
    a_file = tmp_path / "hostname"
    a_file.write_text("box\n")
    out = tmp_path / "out"
    assert_one_error(capsys, main(["train", "--task", "fashion-mnist", "--data-dir",
                                   str(a_file), "--out", str(out), "--quiet"]),
                     "is a file, not a folder")
    assert not out.exists()
