"""What ksam writes to disk: atomic files, checksummed checkpoints, and the output folders of
``ksam train`` / ``ksam compare`` (a manifest of what ksam wrote, a lock while a command
writes).

- Every file is written atomically (a temporary file in the same folder, fsync, rename):
  readers see the old file or the new one, never a half-written one; it gets the
  permissions a plain ``open()`` would (``0o666`` less the umask).
- A checkpoint carries a magic header and a SHA-256 of its payload, verified on read.
- An output folder keeps a manifest of the paths ksam wrote there; ``--overwrite`` removes
  only those. A command holds an exclusive lock on the folder while it writes.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


class WriteError(OSError):
    """A file could not be written (a full disk, a folder that went read-only); the message
    names the file. The file as it was is left in place."""

    @classmethod
    def of(cls, path: Path, exc: OSError) -> WriteError:
        """The error ``exc`` of writing ``path``, naming it (its errno kept)."""
        return cls._made(exc.errno, f"cannot write {path}: {exc.strerror or exc}")

    def with_note(self, note: str) -> WriteError:
        """This error with ``note`` added to its message."""
        message = self.strerror if self.errno is not None else str(self)
        return self._made(self.errno, f"{message}; {note}")

    @classmethod
    def _made(cls, code: int | None, message: str) -> WriteError:
        return cls(code, message) if code is not None else cls(message)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never a
    half-written one (write to a temporary file in the same folder, fsync, rename). The file
    gets the permissions a plain ``open()`` would give it (``0o666`` less the umask).
    :class:`WriteError`, naming ``path``, when the system refuses the write."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    except OSError as exc:
        raise WriteError.of(path, exc) from exc
    try:
        with os.fdopen(fd, "wb") as f:
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it 0600
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError) and not isinstance(exc, WriteError):
            raise WriteError.of(path, exc) from exc
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


#: First bytes of a ksam checkpoint file; then the SHA-256 of the payload (32 bytes), then
#: the payload (``torch.save`` of the state). The digest makes a garbled, truncated or foreign
#: file an error on read instead of NaN weights.
CHECKPOINT_MAGIC = b"KSAM-CHECKPOINT-1\n"
#: What ``train(out_dir=...)`` writes in its folder.
TRAIN_OUTPUTS = ("config.json", "metrics.jsonl", "checkpoint.pt")


def checkpoint_path(out_dir: Path) -> Path:
    return Path(out_dir) / "checkpoint.pt"


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """Write ``state`` atomically with the SHA-256 of its bytes (see :data:`CHECKPOINT_MAGIC`)."""
    import io

    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    atomic_write_bytes(path, CHECKPOINT_MAGIC + hashlib.sha256(payload).digest() + payload)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`. ValueError for an empty,
    truncated, garbled or foreign file, or one whose weights are not all finite."""
    import io

    path = Path(path)
    raw = path.read_bytes()
    head = len(CHECKPOINT_MAGIC)
    if not raw.startswith(CHECKPOINT_MAGIC):
        raise ValueError(f"checkpoint {path} is not a ksam checkpoint"
                         f"{' (empty file)' if not raw else ''}")
    digest, payload = raw[head:head + 32], raw[head + 32:]
    if hashlib.sha256(payload).digest() != digest:
        raise ValueError(f"checkpoint {path} is damaged (truncated or garbled: its checksum "
                         "does not match)")
    try:
        state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as exc:  # a checksummed file that still fails to unpickle
        raise ValueError(f"checkpoint {path} cannot be read: {exc}") from None
    keys = ("config", "epoch", "model", "engine", "scheduler", "history")
    if not isinstance(state, dict) or any(k not in state for k in keys):
        raise ValueError(f"checkpoint {path} lacks some of {', '.join(keys)}")
    if not isinstance(state["model"], dict) or not isinstance(state["engine"], dict):
        raise ValueError(f"checkpoint {path} holds no model or engine state")
    bad = [name for name, t in state["model"].items()
           if isinstance(t, Tensor) and t.is_floating_point() and not bool(t.isfinite().all())]
    if bad:
        raise ValueError(f"checkpoint {path} holds non-finite weights ({', '.join(bad[:3])})")
    for what, optimizer in (("optimizer", state["engine"].get("optimizer")),
                            ("FSDP optimizer", state.get("fsdp_optimizer"))):
        if _non_finite(optimizer):
            raise ValueError(f"checkpoint {path} holds a non-finite {what} state")
    _check_history(state, path)
    return state


def _non_finite(tree: Any) -> bool:
    """Whether a nested dict / list of tensors and numbers holds a non-finite float."""
    if isinstance(tree, Tensor):
        return tree.is_floating_point() and not bool(tree.isfinite().all())
    if isinstance(tree, float):
        return not math.isfinite(tree)
    if isinstance(tree, dict):
        return any(_non_finite(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return any(_non_finite(v) for v in tree)
    return False


def _check_history(state: dict[str, Any], path: Path) -> None:
    """ValueError unless the checkpoint's history is the rows of epochs 1, ..., ``epoch``:
    an emptied or cut history would have the restored weights trained again."""
    epoch, history = state["epoch"], state["history"]
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 1:
        raise ValueError(f"checkpoint {path}: its epoch {epoch!r} is not an epoch number")
    if not isinstance(history, list) or [
            r.get("epoch") if isinstance(r, dict) else None for r in history] != \
            list(range(1, epoch + 1)):
        count = len(history) if isinstance(history, list) else 0
        raise ValueError(f"checkpoint {path} is at epoch {epoch} but its history does not "
                         f"hold epochs 1 to {epoch} ({count} rows)")


# --------------------------------------------------------------------------- output folders

#: The manifest ksam keeps in each output folder: the command that writes there and every
#: path (relative to the folder) it wrote. ``overwrite`` removes these paths and nothing else.
MANIFEST = ".ksam-manifest.json"
#: The files each command writes in its folder, and its sub-folders that hold folders of
#: other commands (a comparison's runs, its lr sweep's comparisons). A folder written before
#: ksam kept a manifest is read as holding these.
COMMAND_OUTPUTS = {
    "train": TRAIN_OUTPUTS,
    "compare": ("config.json", "summary.md", "summary.json", "metrics.csv",
                "accuracy_vs_time.png", "accuracy_vs_cost.png", "lr_sweep.md",
                "lr_sweep.json"),
}
COMMAND_SUBFOLDERS = {"train": {}, "compare": {"runs": "train", "lr-sweep": "compare"}}
#: Files named so are a command's scratch, not results (``ksam compare --ray``'s probe of
#: whether the workers share the driver's file system): never results, removed with them.
PROBE_PREFIX = ".ksam-probe-"


def manifest_path(folder: Path, name: object) -> Path:
    """The path in ``folder`` of ``name``, a path a manifest lists: ValueError unless it is
    strictly inside ``folder`` - a relative path without ``..`` that names something below
    the folder, no symbolic link on its way that leads out of it. (The last part may
    itself be a link: ksam removes the link, never what it points to.)"""
    if not isinstance(name, str) or not name or "\0" in name:
        raise ValueError(f"{name!r} is not a path")
    rel = Path(name)
    if rel.is_absolute() or ".." in rel.parts or rel == Path("."):
        raise ValueError(f"{name!r} is not a path inside the folder")
    target = folder / rel
    base = folder.resolve()
    if not target.parent.resolve().is_relative_to(base):
        raise ValueError(f"{name!r} leads out of the folder through a symbolic link")
    return target


def _read_manifest(folder: Path) -> dict[str, Any] | None:
    """The manifest of ``folder`` (None where there is none). ValueError for one that is not
    ksam's: not JSON, another shape, or a path that is not strictly inside the folder
    (:func:`manifest_path`)."""
    path = folder / MANIFEST
    if not path.exists() and not path.is_symlink():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        manifest = None
    if not (isinstance(manifest, dict) and manifest.get("command") in COMMAND_OUTPUTS
            and isinstance(manifest.get("paths"), list)):
        raise ValueError(f"{path} is damaged: not the manifest of a ksam command")
    for name in manifest["paths"]:
        try:
            manifest_path(folder, name)
        except ValueError as exc:
            raise ValueError(f"{path} is damaged or not ksam's: {exc}; ksam touches nothing "
                             "outside --out (remove the manifest to go on)") from None
    return manifest


def folder_contents(folder: Path) -> tuple[str | None, list[str]]:
    """(the command whose results ``folder`` holds, or None; the paths it wrote there):
    from its manifest, else (a folder older than manifests) from its ``config.json`` and
    the files of that command that are there."""
    folder = Path(folder)
    manifest = _read_manifest(folder)
    if manifest is not None:
        return manifest["command"], [str(p) for p in manifest["paths"]]
    try:
        saved = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None, []
    command = "compare" if isinstance(saved, dict) and "base" in saved else \
        "train" if isinstance(saved, dict) and "method" in saved else None
    if command is None:
        return None, []
    paths = [name for name in COMMAND_OUTPUTS[command] if (folder / name).exists()]
    for sub, inner in COMMAND_SUBFOLDERS[command].items():
        if (folder / sub).is_dir():
            paths += [f"{sub}/{d.name}" for d in sorted((folder / sub).iterdir())
                      if d.is_dir() and folder_contents(d)[0] == inner]
    return command, paths


def check_folder_command(folder: Path, command: str) -> None:
    """ValueError if ``folder`` holds the results of another ksam command: a command
    neither continues nor replaces another's results."""
    held, _ = folder_contents(folder)
    if held is not None and held != command:
        raise ValueError(f"{folder} holds the results of a `ksam {held}`, which "
                         f"`ksam {command}` neither resumes nor replaces; choose another --out")


def foreign_outputs(folder: Path, command: str) -> list[str]:
    """The files ``command`` writes in ``folder`` (its ``config.json``, ...) that are there
    but that ksam did not write (its manifest does not list them; a folder older than
    manifests: its ``config.json`` is not a ksam configuration)."""
    _, paths = folder_contents(folder)
    return [name for name in COMMAND_OUTPUTS[command] if name not in paths
            and ((folder / name).exists() or (folder / name).is_symlink())]


def check_own_outputs(folder: Path, command: str) -> None:
    """ValueError if ``folder`` holds a file of ``command``'s name that ksam did not write:
    ksam neither reads it as its own nor replaces it."""
    foreign = foreign_outputs(folder, command)
    if foreign:
        raise ValueError(f"{folder / foreign[0]} was not written by ksam (the folder's "
                         f"{MANIFEST} does not list it): ksam neither reads nor replaces "
                         "it; move it away or choose another --out")


def _clear(folder: Path) -> None:
    """Remove what ksam wrote in ``folder`` (recursively through its sub-folders' own
    manifests), then the folders it made that are left empty; nothing else, and nothing
    outside ``folder`` (every path is checked by :func:`manifest_path`)."""
    _, paths = folder_contents(folder)
    for name in paths:
        target = manifest_path(folder, name)
        if target.is_dir() and not target.is_symlink():
            _clear(target)
        elif target.exists() or target.is_symlink():
            target.unlink()
        _remove_empty_below(target, folder)
    for probe in folder.glob(f"{PROBE_PREFIX}*"):
        probe.unlink()
    (folder / MANIFEST).unlink(missing_ok=True)


def _remove_empty_below(target: Path, folder: Path) -> None:
    """Remove ``target`` and the folders above it that are left empty, up to ``folder``
    (kept); the climb stops at ``folder``, or at the first path not below it."""
    for path in (target, *target.parents):
        if path == folder or folder not in path.parents:
            return
        if path.is_dir() and not path.is_symlink() and not any(path.iterdir()):
            path.rmdir()


def _remove_empty(path: Path, top: Path | None) -> None:
    """Remove the empty folders from ``path`` up to ``top`` (the first one made)."""
    if top is None:
        return
    while path.is_dir() and not any(path.iterdir()):
        path.rmdir()
        if path == top:
            return
        path = path.parent


def _has_results(folder: Path) -> bool:
    return folder.is_dir() and any(p.name != MANIFEST and not p.name.startswith(PROBE_PREFIX)
                                   for p in folder.iterdir())


class OutputFolder:
    """The output folder of one ksam command while it writes there.

    :func:`open_output` makes it, takes its lock (an exclusive ``flock`` on the folder, held
    until :meth:`close`; released by the system if the process dies) and checks it;
    :meth:`write_text` / :meth:`write_bytes` / :meth:`record` add each path to the
    folder's manifest before it is written.
    """

    _open: dict[str, OutputFolder] = {}  # folders this process holds, by resolved path

    def __init__(self, path: Path, command: str, fd: int | None) -> None:
        self.path, self.command, self._fd, self._users = path, command, fd, 1
        manifest = _read_manifest(path)
        self.paths: list[str] = list(manifest["paths"]) if manifest else \
            folder_contents(path)[1]

    def record(self, name: str) -> Path:
        """Add ``name`` (a path relative to the folder) to the manifest; returns its path."""
        if name not in self.paths:
            self.paths.append(name)
            atomic_write_text(self.path / MANIFEST, json.dumps(
                {"command": self.command, "paths": self.paths}, indent=1))
        return self.path / name

    def write_text(self, name: str, text: str) -> None:
        atomic_write_text(self.record(name), text)

    def write_bytes(self, name: str, data: bytes) -> None:
        atomic_write_bytes(self.record(name), data)

    def close(self) -> None:
        self._users -= 1
        if self._users == 0:
            OutputFolder._open.pop(str(self.path.resolve()), None)
            if self._fd is not None:
                os.close(self._fd)  # releases the lock

    def __enter__(self) -> OutputFolder:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _lock(path: Path, *, shared: bool = False) -> int | None:
    """An open descriptor of ``path`` holding its exclusive lock (``shared``: a shared one,
    which only an exclusive holder refuses); ValueError if another process holds it. None
    where the system has no ``flock`` (no lock is taken)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ValueError(f"--out {path} is in use: another ksam command holds its lock (an "
                         f"exclusive flock on the folder {path}); wait for it to end or "
                         "choose another --out") from None
    return fd


def check_unlocked(path: Path) -> None:
    """ValueError (the lock's message) if another command holds the lock of the folder
    ``path``; a shared lock is taken and given back at once (shared: the ranks of one
    torchrun command may look at the same time). Nothing when this process holds it."""
    if str(Path(path).resolve()) in OutputFolder._open:
        return
    fd = _lock(Path(path), shared=True)
    if fd is not None:
        os.close(fd)


def open_output(path: Path, command: str, *, resume: bool = False,
                overwrite: bool = False) -> OutputFolder:
    """Make ``path``, lock it and check it for ``command``: ValueError if another command
    holds the lock, if it holds another command's results, if it holds results and
    neither ``resume`` nor ``overwrite`` is given, if its manifest is not ksam's
    (:func:`manifest_path`), or if it holds a file of the command's names that ksam did
    not write (:func:`check_own_outputs`); ``overwrite`` then removes what ksam wrote there
    (nothing else). A folder this process holds already is returned as it is."""
    path = Path(path)
    held = OutputFolder._open.get(str(path.resolve()))
    if held is not None:
        held._users += 1
        return held
    new = next((p for p in (*reversed(path.absolute().parents), path.absolute())
                if not p.exists()), None)
    path.mkdir(parents=True, exist_ok=True)
    fd = _lock(path)
    try:
        check_folder_command(path, command)
        if _has_results(path) and not (resume or overwrite):
            raise ValueError(f"--out {path} is not empty; give --resume to continue the "
                             "results there or --overwrite to replace them")
        check_own_outputs(path, command)
        if overwrite:
            _clear(path)
        folder = OutputFolder(path, command, fd)
    except BaseException:
        if fd is not None:
            os.close(fd)
        _remove_empty(path.absolute(), new)
        raise
    OutputFolder._open[str(path.resolve())] = folder
    return folder
