"""Dataset loaders: raw numpy arrays from local files (or generated, for MNIST-1D).

They return uint8 images ``[N, C, H, W]`` (or already-normalized float32 for MNIST-1D) and
int64 labels; :func:`ksam.lab.tasks.get_task` does the subset / noise / split selection on these
arrays and only then converts and normalizes on the device, so the host never holds a float
copy of a whole dataset. Only torch + numpy are needed; ``mnist1d`` is imported lazily.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import pickle
import random
import shutil
import tarfile
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "MissingDependencyError",
    "CIFAR_SOURCES",
    "DEFAULT_DATA_DIR",
    "DEFAULT_FASHION_MNIST_DIR",
    "RawSplits",
    "download_cifar",
    "find_cifar_dir",
    "load_cifar",
    "load_fashion_mnist",
    "load_idx",
    "make_mnist1d",
]


class MissingDependencyError(ImportError):
    """A task needs an optional package that is not installed (the message says which and
    how to install it)."""


_log = logging.getLogger(__name__)

DEFAULT_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
# Where CIFAR is looked for / downloaded when no data_dir is given (ignored by git).
DEFAULT_DATA_DIR = Path(os.environ.get("KSAM_DATA_DIR", ".data"))

IDX_IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions
IDX_LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension

FASHION_MNIST_FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}

CIFAR_SOURCES: dict[int, dict[str, str]] = {
    10: {
        "url": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        "md5": "c58f30108f718f92721af3b95e74349a",
        "folder": "cifar-10-batches-py",
    },
    100: {
        "url": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        "md5": "eb9058c3a382ffc7106e4002c42a8d85",
        "folder": "cifar-100-python",
    },
}


@dataclass
class RawSplits:
    """Train/test arrays as stored on disk; ``test_*`` is None when not requested."""

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray | None = None
    test_y: np.ndarray | None = None


# --------------------------------------------------------------------------- IDX (MNIST-style)


def load_idx(path: str | os.PathLike[str], expected_magic: int | None = None) -> np.ndarray:
    """Parse an IDX file (optionally gzipped) of unsigned bytes into a uint8 array.

    Written by hand so that Fashion-MNIST needs neither torchvision nor a network; the magic
    number and the byte count are checked so a wrong or truncated file fails loudly here
    instead of producing garbage images.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:  # gzip raises these on corrupt / truncated streams
        raise ValueError(f"cannot read IDX file {path}: {e}") from e
    if len(raw) < 4:
        raise ValueError(f"IDX file {path} is truncated: {len(raw)} bytes, no header")
    magic = int.from_bytes(raw[:4], "big")
    if expected_magic is not None and magic != expected_magic:
        raise ValueError(
            f"bad magic number {magic} in IDX file {path} (expected {expected_magic}); "
            "is this the right file, and is it decompressed correctly?"
        )
    if raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"IDX file {path}: magic {magic} is not an unsigned-byte IDX header")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"IDX file {path} is truncated inside its header")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(shape, dtype=np.int64))
    if len(raw) - header != expected:
        raise ValueError(
            f"IDX file {path} is truncated or corrupt: header says shape {shape} "
            f"({expected} bytes of data) but it holds {len(raw) - header}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape).copy()


def check_data_dir(folder: Path) -> None:
    """NotADirectoryError when ``folder`` (a task's ``data_dir``) is a file: the data is
    looked for in a folder, and "not found" would mislead."""
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"data dir {folder} is a file, not a folder: give "
                                 "--data-dir the folder that holds the data files")


def _fashion_missing(msg: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"{msg}. Get Fashion-MNIST with `apt-get install dataset-fashion-mnist` (installs into "
        f"{DEFAULT_FASHION_MNIST_DIR}) or download the four files train-images-idx3-ubyte.gz, "
        "train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz from "
        "https://github.com/zalandoresearch/fashion-mnist into --data-dir"
    )


def _find_idx_file(folder: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    raise _fashion_missing(f"Fashion-MNIST file {folder / (stem + '.gz')} (or {stem}) not found")


def load_fashion_mnist(
    data_dir: str | os.PathLike[str] | None = None, need_test: bool = True
) -> RawSplits:
    """Fashion-MNIST as uint8 ``[N, 1, 28, 28]`` images and int64 labels.

    ``data_dir`` holds the four IDX files (``.gz`` or not), or has a ``fashion-mnist``
    sub-folder that does; defaults to ``/usr/share/datasets/fashion-mnist``.
    """
    folder = Path(data_dir) if data_dir is not None else DEFAULT_FASHION_MNIST_DIR
    check_data_dir(folder)
    if not folder.is_dir():
        raise _fashion_missing(f"Fashion-MNIST directory {folder} does not exist")
    sub = folder / "fashion-mnist"
    stems = FASHION_MNIST_FILES.values()
    has_files = any((folder / (s + e)).is_file() for s in stems for e in ("", ".gz"))
    if not has_files and sub.is_dir():
        folder = sub

    def images(stem: str) -> np.ndarray:
        x = load_idx(_find_idx_file(folder, stem), IDX_IMAGES_MAGIC)
        return x[:, None, :, :]

    def labels(stem: str, n: int) -> np.ndarray:
        path = _find_idx_file(folder, stem)
        y = load_idx(path, IDX_LABELS_MAGIC).astype(np.int64)
        if len(y) != n:
            raise ValueError(f"{path}: {len(y)} labels for {n} images")
        return y

    train_x = images(FASHION_MNIST_FILES["train_x"])
    out = RawSplits(train_x, labels(FASHION_MNIST_FILES["train_y"], len(train_x)))
    if need_test:
        out.test_x = images(FASHION_MNIST_FILES["test_x"])
        out.test_y = labels(FASHION_MNIST_FILES["test_y"], len(out.test_x))
    return out


# --------------------------------------------------------------------------- CIFAR


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that only rebuilds numpy arrays: the CIFAR batches need nothing else, and
    refusing other globals keeps a tampered file from running code."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 store bytes
    }

    def find_class(self, module: str, name: str):  # noqa: ANN201 - pickle API
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"CIFAR batch refers to {module}.{name}: not allowed")
        if module == "numpy.core.multiarray":  # files pickled by numpy 1.x (all official ones)
            module = "numpy._core.multiarray" if hasattr(np, "_core") else module
        return super().find_class(module, name)


def _read_cifar_batch(path: Path, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    with open(path, "rb") as f:
        try:
            d = _ArrayUnpickler(f, encoding="bytes").load()
        except (pickle.UnpicklingError, EOFError, ValueError) as e:
            raise ValueError(f"cannot read CIFAR batch {path}: {e}") from e
    if not isinstance(d, dict) or b"data" not in d or label_key not in d:
        raise ValueError(f"CIFAR batch {path} lacks the keys b'data' and {label_key!r}")
    x = np.asarray(d[b"data"], dtype=np.uint8)
    y = np.asarray(d[label_key], dtype=np.int64)
    if x.ndim != 2 or x.shape[1] != 3 * 32 * 32 or len(x) != len(y):
        raise ValueError(f"CIFAR batch {path}: data {x.shape} / labels {y.shape} malformed")
    return x.reshape(-1, 3, 32, 32), y


def _cifar_files(num_classes: int) -> tuple[list[str], list[str], bytes]:
    if num_classes == 10:
        return [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], b"labels"
    if num_classes == 100:
        return ["train"], ["test"], b"fine_labels"
    raise ValueError(f"CIFAR has 10 or 100 classes, not {num_classes}")


def find_cifar_dir(data_dir: str | os.PathLike[str], num_classes: int) -> Path | None:
    """The extracted CIFAR folder: ``data_dir`` itself or its standard sub-folder, else None."""
    train, test, _ = _cifar_files(num_classes)
    root = Path(data_dir)
    for folder in (root, root / CIFAR_SOURCES[num_classes]["folder"]):
        if all((folder / name).is_file() for name in train + test):
            return folder
    return None


def download_cifar(data_dir: str | os.PathLike[str], num_classes: int) -> Path:
    """Download, md5-check and extract the official CIFAR release into ``data_dir``.

    Atomic: the archive goes to a temporary file and is extracted into a temporary folder
    that is renamed into place, so an interrupted or concurrent run never leaves a
    half-written dataset that a later run would trust.
    """
    src = CIFAR_SOURCES[num_classes]
    root = Path(data_dir)
    root.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=root, prefix=".download-", suffix=".tar.gz")
    tmp_tar = Path(tmp_name)
    tmp_dir: Path | None = None
    try:
        md5 = hashlib.md5()
        _log.info("downloading %s into %s", src["url"], root)
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(src["url"], timeout=60) as resp:
            while chunk := resp.read(1 << 20):
                md5.update(chunk)
                out.write(chunk)
        if md5.hexdigest() != src["md5"]:
            raise OSError(
                f"md5 mismatch for {src['url']}: got {md5.hexdigest()}, expected {src['md5']}; "
                "the download is corrupt, try again"
            )
        tmp_dir = Path(tempfile.mkdtemp(dir=root, prefix=".extract-"))
        with tarfile.open(tmp_tar, "r:gz") as tar:
            if hasattr(tarfile, "data_filter"):  # refuses absolute paths, links out, etc.
                tar.extractall(tmp_dir, filter="data")
            else:  # pragma: no cover - Python without the PEP 706 backport
                tar.extractall(tmp_dir)
        extracted = tmp_dir / src["folder"]
        if not extracted.is_dir():
            raise OSError(f"archive {src['url']} has no folder {src['folder']!r}")
        target = root / src["folder"]
        try:
            os.replace(extracted, target)
        except OSError:
            if find_cifar_dir(root, num_classes) is None:  # not a concurrent download
                raise
    finally:
        tmp_tar.unlink(missing_ok=True)
        if tmp_dir is not None:
            shutil.rmtree(tmp_dir, ignore_errors=True)
    folder = find_cifar_dir(root, num_classes)
    if folder is None:
        raise OSError(f"CIFAR-{num_classes} archive extracted into {root} but files are missing")
    return folder


def load_cifar(
    num_classes: int,
    data_dir: str | os.PathLike[str] | None = None,
    download: bool = False,
    need_test: bool = True,
) -> RawSplits:
    """CIFAR-10/100 (python pickle release) as uint8 ``[N, 3, 32, 32]`` and int64 labels."""
    train, test, label_key = _cifar_files(num_classes)
    root = Path(data_dir) if data_dir is not None else DEFAULT_DATA_DIR
    check_data_dir(root)
    folder = find_cifar_dir(root, num_classes)
    if folder is None:
        if not download:
            src = CIFAR_SOURCES[num_classes]
            raise FileNotFoundError(
                f"CIFAR-{num_classes} not found: looked for {', '.join(train + test)} in {root} "
                f"and in {root / src['folder']}. Pass the option download=True "
                f"(CLI: --task-option download=true) to fetch {src['url']} into {root}, or "
                "extract it there."
            )
        folder = download_cifar(root, num_classes)

    def read(names: list[str]) -> tuple[np.ndarray, np.ndarray]:
        parts = [_read_cifar_batch(folder / n, label_key) for n in names]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    out = RawSplits(*read(train))
    if need_test:
        out.test_x, out.test_y = read(test)
    for y in (out.train_y, out.test_y):
        if y is not None and len(y) and (y.min() < 0 or y.max() >= num_classes):
            raise ValueError(f"CIFAR-{num_classes} labels out of range [0, {num_classes})")
    return out


# --------------------------------------------------------------------------- MNIST-1D

_MNIST1D_CACHE: dict[tuple[int, int], RawSplits] = {}


def make_mnist1d(num_samples: int = 5000, seed: int = 42) -> RawSplits:
    """Generate MNIST-1D locally (80/20 split) as float32 ``[N, 1, 40]``; cached per process.

    Uses ``mnist1d.data.make_dataset`` (never its download path). Generation takes seconds,
    hence the cache keyed by ``(num_samples, seed)``; the global ``random`` / ``numpy``
    states that mnist1d reseeds are restored afterwards so callers' RNG streams are untouched.
    """
    key = (int(num_samples), int(seed))
    if key not in _MNIST1D_CACHE:
        try:
            import mnist1d.data as mdata
        except ImportError as e:
            raise MissingDependencyError(
                'the "mnist1d" task needs the mnist1d package: pip install "ksam[cli]" '
                "(or pip install mnist1d)"
            ) from e
        args = mdata.get_dataset_args()
        args.num_samples = key[0]
        args.seed = key[1]
        py_state, np_state = random.getstate(), np.random.get_state()
        try:
            d = mdata.make_dataset(args)
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
        _MNIST1D_CACHE[key] = RawSplits(
            np.asarray(d["x"], dtype=np.float32)[:, None, :],
            np.asarray(d["y"], dtype=np.int64),
            np.asarray(d["x_test"], dtype=np.float32)[:, None, :],
            np.asarray(d["y_test"], dtype=np.int64),
        )
    raw = _MNIST1D_CACHE[key]
    # Copies of the label arrays only: callers may modify labels (noise) but never images.
    return RawSplits(raw.train_x, raw.train_y.copy(), raw.test_x, raw.test_y.copy())
