"""Tests of ksam.tasks: loaders on tiny synthetic files, selection options, augmentation."""

from __future__ import annotations

import hashlib
import io
import pickle
import random
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_idx

from ksam.lab.tasks import (
    TASKS,
    Task,
    available_tasks,
    get_task,
    per_sample_cross_entropy,
    random_crop_flip,
)
from ksam.lab.tasks import data as tdata
from ksam.lab.tasks.augment import RandomCropFlip
from ksam.lab.tasks.models import (
    CIFAR_MODELS,
    FashionResNet,
    ResNet18,
    WideResNet,
    build_cifar_model,
    count_parameters,
    mnist1d_cnn,
    mnist1d_mlp,
)

# --------------------------------------------------------------------------- fixtures

N_TRAIN, N_TEST = 60, 20


def _unique_images(n: int, shape: tuple[int, ...], offset: int = 0) -> np.ndarray:
    """Random uint8 images whose first two pixels encode their index (to track examples)."""
    rng = np.random.default_rng(offset + 1)
    x = rng.integers(0, 256, size=(n, *shape), dtype=np.uint8)
    flat = x.reshape(n, -1)
    idx = np.arange(offset, offset + n)
    flat[:, 0], flat[:, 1] = idx % 256, idx // 256
    return x


def _ids_in_order(x: torch.Tensor, mean: float = 0.2860, std: float = 0.3530) -> list[int]:
    """Recover the indices encoded by _unique_images from normalized tensors."""
    pix = torch.round((x.reshape(len(x), -1)[:, :2] * std + mean) * 255).long()
    return (pix[:, 0] + 256 * pix[:, 1]).tolist()


def _image_ids(x: torch.Tensor, mean: float = 0.2860, std: float = 0.3530) -> set[int]:
    return set(_ids_in_order(x, mean, std))


def _fashion_arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "train_x": _unique_images(N_TRAIN, (28, 28)),
        "train_y": np.arange(N_TRAIN) % 10,
        "test_x": _unique_images(N_TEST, (28, 28), offset=1000),
        "test_y": rng.integers(0, 10, N_TEST),
    }


def _write_fashion(folder: Path, gz: bool) -> dict[str, np.ndarray]:
    folder.mkdir(parents=True, exist_ok=True)
    arrays = _fashion_arrays()
    for key, stem in tdata.FASHION_MNIST_FILES.items():
        magic = tdata.IDX_IMAGES_MAGIC if key.endswith("_x") else tdata.IDX_LABELS_MAGIC
        write_idx(folder / (stem + (".gz" if gz else "")), arrays[key], magic)
    return arrays


@pytest.fixture
def fashion_dir(tmp_path: Path) -> Path:
    _write_fashion(tmp_path / "fm", gz=True)
    return tmp_path / "fm"


def _cifar_batch(n: int, offset: int, label_key: bytes, num_classes: int) -> dict:
    x = _unique_images(n, (3, 32, 32), offset).reshape(n, -1)
    labels = [int(v) for v in (np.arange(offset, offset + n) % num_classes)]
    return {b"data": x, label_key: labels, b"batch_label": b"synthetic"}


def _write_cifar(root: Path, num_classes: int) -> Path:
    """A tiny CIFAR-format release under root/<official folder>; returns that folder."""
    folder = root / tdata.CIFAR_SOURCES[num_classes]["folder"]
    folder.mkdir(parents=True, exist_ok=True)
    if num_classes == 10:
        files = {f"data_batch_{i}": (8, 8 * (i - 1)) for i in range(1, 6)}
        files["test_batch"] = (6, 1000)
        key = b"labels"
    else:
        files, key = {"train": (40, 0), "test": (6, 1000)}, b"fine_labels"
    for name, (n, offset) in files.items():
        with open(folder / name, "wb") as f:
            batch = _cifar_batch(n, offset, key, num_classes)
            if num_classes == 10:  # like the official files: protocol 2, numpy 1.x module path
                blob = pickle.dumps(batch, protocol=2)
                f.write(blob.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
            else:
                pickle.dump(batch, f)
    return folder


# --------------------------------------------------------------------------- registry / options


def test_registry_and_unknown_task() -> None:
    assert {"mnist1d", "fashion-mnist", "cifar10", "cifar100"} <= set(available_tasks())
    assert available_tasks() == sorted(TASKS)
    with pytest.raises(ValueError, match="unknown task 'nope'.*cifar10.*mnist1d"):
        get_task("nope")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"train_subset": 0}, "train_subset"),
        ({"train_subset": -3}, "train_subset"),
        ({"train_subset": 2.5}, "train_subset"),
        ({"train_subset": True}, "train_subset"),
        ({"train_subset": 10_000}, "exceeds"),
        ({"label_noise": 1.0}, "label_noise"),
        ({"label_noise": -0.1}, "label_noise"),
        ({"label_noise": "0.2"}, "label_noise"),
        ({"label_noise": float("nan")}, "label_noise"),
        ({"validation_split": 1.0}, "validation_split"),
        ({"validation_split": 0.001}, "validation_split"),
        ({"seed": -1}, "seed"),
        ({"widht": 2.0}, "unknown option.*widht.*accepted options: augment, model, width"),
        ({"width": 0}, "width"),
        ({"model": "vgg"}, "'resnet' or 'cnn'"),
        ({"model": "cnn", "width": 0.5}, "width applies to model=resnet only"),
        ({"augment": "no"}, "augment must be true or false"),
    ],
)
def test_bad_options(fashion_dir: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        get_task("fashion-mnist", data_dir=fashion_dir, **kwargs)


def test_an_unknown_option_lists_every_accepted_one(fashion_dir: Path) -> None:
    import inspect

    from ksam.lab.tasks import COMMON_OPTIONS

    with pytest.raises(ValueError) as info:
        get_task("fashion-mnist", data_dir=fashion_dir, widht=2.0)
    assert str(info.value).endswith(
        "accepted options: augment, model, width; and for every task: data_dir, train_subset, "
        "label_noise, validation_split, label_noise_type, noisy_validation")
    # the list is get_task's own keyword options (device and seed are the run's)
    params = inspect.signature(get_task).parameters
    keyword = [n for n, v in params.items() if v.kind == v.KEYWORD_ONLY]
    assert sorted(COMMON_OPTIONS) == sorted(set(keyword) - {"device", "seed"})


def test_bad_model_names(tmp_path: Path) -> None:
    _write_cifar(tmp_path, 10)
    with pytest.raises(ValueError, match="resnet18, wrn16-8, wrn28-10"):
        get_task("cifar10", data_dir=tmp_path, model="resnet50")
    with pytest.raises(ValueError, match="'cnn' or 'mlp'"):
        get_task("mnist1d", model="transformer")


# --------------------------------------------------------------------------- Fashion-MNIST


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_loads(tmp_path: Path, gz: bool) -> None:
    arrays = _write_fashion(tmp_path, gz=gz)
    task = get_task("fashion-mnist", data_dir=tmp_path)
    assert isinstance(task, Task) and task.name == "fashion-mnist"
    assert task.train_x.shape == (N_TRAIN, 1, 28, 28) and task.test_x.shape == (N_TEST, 1, 28, 28)
    assert task.train_x.dtype == torch.float32 and task.train_y.dtype == torch.int64
    assert task.test_y.dtype == torch.int64 and task.num_classes == 10
    expected = (torch.from_numpy(arrays["train_x"]).float()[:, None] / 255 - 0.2860) / 0.3530
    torch.testing.assert_close(task.train_x, expected)
    assert task.train_y.tolist() == arrays["train_y"].tolist()
    assert task.test_y.tolist() == arrays["test_y"].tolist()
    assert isinstance(task.augment, RandomCropFlip) and task.augment.padding == 2
    assert task.defaults == {"epochs": 10, "batch_size": 128, "lr": 0.05, "momentum": 0.9,
                             "weight_decay": 5e-4}
    assert task.noisy_mask is None and task.description


def test_fashion_mnist_cnn_without_augmentation(fashion_dir: Path) -> None:
    from ksam.lab.tasks.models import count_parameters, fashion_cnn

    task = get_task("fashion-mnist", data_dir=fashion_dir, model="cnn", augment=False)
    assert task.augment is None and "CNN" in task.description
    assert "no augmentation" in task.description
    torch.manual_seed(0)
    model = task.make_model()
    torch.manual_seed(0)
    reference = fashion_cnn()
    assert count_parameters(model) == 52138 and not any(
        isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                  reference.state_dict().values()))
    assert model(task.train_x[:3]).shape == (3, 10)
    resnet = get_task("fashion-mnist", data_dir=fashion_dir)
    assert isinstance(resnet.augment, RandomCropFlip) and "ResNet" in resnet.description


def test_fashion_mnist_parent_dir(tmp_path: Path) -> None:
    _write_fashion(tmp_path / "fashion-mnist", gz=True)
    assert get_task("fashion-mnist", data_dir=tmp_path).num_train == N_TRAIN


def test_fashion_mnist_missing(tmp_path: Path, fashion_dir: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere.*apt-get install dataset-fashion-mnist"):
        get_task("fashion-mnist", data_dir=missing)
    (fashion_dir / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte.*--data-dir"):
        get_task("fashion-mnist", data_dir=fashion_dir)


def test_idx_bad_magic_and_truncation(tmp_path: Path) -> None:
    arrays = _write_fashion(tmp_path, gz=False)
    labels = tmp_path / "train-labels-idx1-ubyte"
    write_idx(labels, arrays["train_y"], tdata.IDX_IMAGES_MAGIC)  # wrong magic
    with pytest.raises(ValueError, match="bad magic number 2051.*expected 2049"):
        get_task("fashion-mnist", data_dir=tmp_path)
    write_idx(labels, arrays["train_y"], tdata.IDX_LABELS_MAGIC)
    images = tmp_path / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:-10])
    with pytest.raises(ValueError, match="truncated"):
        get_task("fashion-mnist", data_dir=tmp_path)
    images.write_bytes(b"\x00\x00")
    with pytest.raises(ValueError, match="truncated"):
        tdata.load_idx(images)
    gz = tmp_path / "x.gz"
    write_idx(gz, arrays["train_x"], tdata.IDX_IMAGES_MAGIC)
    gz.write_bytes(gz.read_bytes()[: len(gz.read_bytes()) // 2])
    with pytest.raises(ValueError, match="x.gz"):
        tdata.load_idx(gz, tdata.IDX_IMAGES_MAGIC)


@pytest.mark.skipif(
    not (tdata.DEFAULT_FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").exists(),
    reason="real Fashion-MNIST not installed",
)
def test_real_fashion_mnist() -> None:
    task = get_task("fashion-mnist", train_subset=512)
    assert task.num_train == 512 and task.num_test == 10_000
    assert task.test_y.bincount().tolist() == [1000] * 10
    assert abs(task.test_x.mean().item()) < 0.05 and abs(task.test_x.std().item() - 1) < 0.05


# --------------------------------------------------------------------------- CIFAR


@pytest.mark.parametrize("num_classes", [10, 100])
@pytest.mark.parametrize("point_at_folder", [False, True])
def test_cifar_loads(tmp_path: Path, num_classes: int, point_at_folder: bool) -> None:
    folder = _write_cifar(tmp_path, num_classes)
    task = get_task(f"cifar{num_classes}", data_dir=folder if point_at_folder else tmp_path)
    assert task.train_x.shape == (40, 3, 32, 32) and task.test_x.shape == (6, 3, 32, 32)
    assert task.train_x.dtype == torch.float32 and task.train_y.dtype == torch.int64
    assert task.num_classes == num_classes
    assert task.train_y.tolist() == [i % num_classes for i in range(40)]
    raw = _unique_images(6, (3, 32, 32), 1000)
    mean = torch.tensor(tdata_mean(num_classes)).view(1, 3, 1, 1)
    std = torch.tensor(tdata_std(num_classes)).view(1, 3, 1, 1)
    torch.testing.assert_close(task.test_x, (torch.from_numpy(raw).float() / 255 - mean) / std)
    assert task.augment is not None and task.augment.padding == 4 and task.augment.flip
    assert task.defaults["epochs"] == 200 and task.defaults["lr"] == 0.1
    assert _image_ids(task.train_x[:, :1], tdata_mean(num_classes)[0],
                      tdata_std(num_classes)[0]) == set(range(40))


def tdata_mean(num_classes: int) -> tuple[float, ...]:
    from ksam.lab import tasks

    return tasks.CIFAR10_MEAN if num_classes == 10 else tasks.CIFAR100_MEAN


def tdata_std(num_classes: int) -> tuple[float, ...]:
    from ksam.lab import tasks

    return tasks.CIFAR10_STD if num_classes == 10 else tasks.CIFAR100_STD


def test_cifar_constants() -> None:
    from ksam.lab import tasks

    assert tasks.CIFAR10_MEAN == pytest.approx((0.4914, 0.4822, 0.4465))
    assert tasks.CIFAR100_MEAN == pytest.approx((0.5071, 0.4865, 0.4409))
    assert tasks.FASHION_MNIST_MEAN == (0.2860,) and tasks.FASHION_MNIST_STD == (0.3530,)


def test_cifar_missing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="CIFAR-10 not found.*data_batch_1.*download=True"):
        get_task("cifar10", data_dir=tmp_path)
    # the command line's way to say it is a task option (there is no --download flag)
    with pytest.raises(FileNotFoundError, match=r"\(CLI: --task-option download=true\)"):
        get_task("cifar10", data_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="cifar-100-python"):
        get_task("cifar100", data_dir=tmp_path / "absent")


def test_cifar_rejects_foreign_pickle(tmp_path: Path) -> None:
    folder = _write_cifar(tmp_path, 100)
    with open(folder / "train", "wb") as f:
        pickle.dump({b"data": print, b"fine_labels": []}, f)
    with pytest.raises(ValueError, match="builtins.print"):
        get_task("cifar100", data_dir=tmp_path)


def _make_tarball(tmp_path: Path, num_classes: int) -> tuple[str, str]:
    src = _write_cifar(tmp_path / "src", num_classes)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(src, arcname=src.name)
    archive = tmp_path / "archive.tar.gz"
    archive.write_bytes(buf.getvalue())
    return archive.as_uri(), hashlib.md5(buf.getvalue()).hexdigest()


def test_cifar_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url, md5 = _make_tarball(tmp_path, 10)
    monkeypatch.setitem(tdata.CIFAR_SOURCES, 10, {**tdata.CIFAR_SOURCES[10], "url": url,
                                                  "md5": md5})
    root = tmp_path / "data"
    task = get_task("cifar10", data_dir=root, download=True)
    assert task.num_train == 40 and task.num_test == 6
    assert sorted(p.name for p in root.iterdir()) == ["cifar-10-batches-py"]  # no temp left
    # Already there: no second download even with a broken URL.
    monkeypatch.setitem(tdata.CIFAR_SOURCES, 10, {**tdata.CIFAR_SOURCES[10], "url": "file:///x"})
    assert get_task("cifar10", data_dir=root, download=True).num_train == 40


def test_cifar_download_md5_mismatch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url, _ = _make_tarball(tmp_path, 100)
    monkeypatch.setitem(tdata.CIFAR_SOURCES, 100, {**tdata.CIFAR_SOURCES[100], "url": url})
    root = tmp_path / "data"
    with pytest.raises(OSError, match="md5 mismatch"):
        get_task("cifar100", data_dir=root, download=True)
    assert list(root.iterdir()) == []  # temp archive removed, nothing extracted


def test_cifar_official_checksums() -> None:
    assert tdata.CIFAR_SOURCES[10]["md5"] == "c58f30108f718f92721af3b95e74349a"
    assert tdata.CIFAR_SOURCES[100]["md5"] == "eb9058c3a382ffc7106e4002c42a8d85"
    assert tdata.CIFAR_SOURCES[10]["url"].startswith("https://www.cs.toronto.edu/~kriz/")


# --------------------------------------------------------------------------- selection options


def test_label_noise(fashion_dir: Path) -> None:
    clean = get_task("fashion-mnist", data_dir=fashion_dir)
    for frac in (0.1, 0.25, 0.5):
        noisy = get_task("fashion-mnist", data_dir=fashion_dir, label_noise=frac, seed=3)
        changed = noisy.train_y != clean.train_y
        assert int(changed.sum()) == round(frac * N_TRAIN)  # exact fraction, all really changed
        assert noisy.noisy_mask is not None and torch.equal(noisy.noisy_mask, changed)
        assert torch.equal(noisy.test_y, clean.test_y)  # test labels untouched
        assert torch.equal(noisy.train_x, clean.train_x)
        assert noisy.train_y.min() >= 0 and noisy.train_y.max() < 10
    a = get_task("fashion-mnist", data_dir=fashion_dir, label_noise=0.3, seed=1)
    b = get_task("fashion-mnist", data_dir=fashion_dir, label_noise=0.3, seed=1)
    c = get_task("fashion-mnist", data_dir=fashion_dir, label_noise=0.3, seed=2)
    assert torch.equal(a.train_y, b.train_y) and not torch.equal(a.train_y, c.train_y)


def test_label_noise_uniform_over_other_classes() -> None:
    task = get_task("mnist1d", num_samples=500, label_noise=0.9, seed=0)
    clean = get_task("mnist1d", num_samples=500)
    changed = task.train_y != clean.train_y
    assert int(changed.sum()) == 360
    shift = (task.train_y - clean.train_y)[changed] % 10
    counts = torch.bincount(shift, minlength=10)
    assert counts[0] == 0 and (counts[1:] > 20).all()  # each other class is used


def test_train_subset(fashion_dir: Path) -> None:
    full = get_task("fashion-mnist", data_dir=fashion_dir)
    a = get_task("fashion-mnist", data_dir=fashion_dir, train_subset=20, seed=5)
    b = get_task("fashion-mnist", data_dir=fashion_dir, train_subset=20, seed=5)
    c = get_task("fashion-mnist", data_dir=fashion_dir, train_subset=20, seed=6)
    big = get_task("fashion-mnist", data_dir=fashion_dir, train_subset=40, seed=5)
    assert a.num_train == 20 and torch.equal(a.train_x, b.train_x)
    assert torch.equal(a.train_y, b.train_y) and not torch.equal(a.train_x, c.train_x)
    ids = _image_ids(a.train_x)
    assert len(ids) == 20 and ids < set(range(N_TRAIN))
    assert ids < _image_ids(big.train_x)  # nested subsets
    assert torch.equal(a.test_x, full.test_x)
    assert a.train_y.tolist() == [i % 10 for i in _ids_in_order(a.train_x)]  # labels follow


def test_validation_split(tmp_path: Path, fashion_dir: Path) -> None:
    task = get_task("fashion-mnist", data_dir=fashion_dir, validation_split=0.25, seed=1)
    assert task.name == "fashion-mnist-val0.25"
    assert task.num_train == 45 and task.num_test == 15
    train_ids = _image_ids(task.train_x)
    val_ids = _image_ids(task.test_x)
    assert train_ids.isdisjoint(val_ids) and train_ids | val_ids == set(range(N_TRAIN))
    assert task.test_y.tolist() == [i % 10 for i in _ids_in_order(task.test_x)]
    again = get_task("fashion-mnist", data_dir=fashion_dir, validation_split=0.25, seed=1)
    assert torch.equal(again.test_x, task.test_x)
    # The split does not move when the subset or the noise change; noise spares validation.
    sub = get_task("fashion-mnist", data_dir=fashion_dir, validation_split=0.25, seed=1,
                   train_subset=10, label_noise=0.5)
    assert torch.equal(sub.test_x, task.test_x) and torch.equal(sub.test_y, task.test_y)
    assert sub.num_train == 10 and _image_ids(sub.train_x) < train_ids
    # The real test set is not needed.
    for stem in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        (fashion_dir / stem).unlink()
    assert get_task("fashion-mnist", data_dir=fashion_dir, validation_split=0.25).num_test == 15


def test_cifar_validation_without_test_batch(tmp_path: Path) -> None:
    folder = _write_cifar(tmp_path, 10)
    (folder / "test_batch").write_bytes(b"garbage")  # must not be read
    task = get_task("cifar10", data_dir=tmp_path, validation_split=0.5, seed=0)
    assert task.num_train == task.num_test == 20


# --------------------------------------------------------------------------- augmentation


def _reference_candidates(img: torch.Tensor, padding: int, flip: bool) -> list[torch.Tensor]:
    """Every crop (and mirrored crop) of the zero-padded image: the slow reference."""
    _, h, w = img.shape
    padded = torch.zeros(img.shape[0], h + 2 * padding, w + 2 * padding)
    padded[:, padding : padding + h, padding : padding + w] = img
    out = []
    for dy in range(2 * padding + 1):
        for dx in range(2 * padding + 1):
            crop = padded[:, dy : dy + h, dx : dx + w]
            out.append(crop)
            if flip:
                out.append(crop.flip(-1))
    return out


@pytest.mark.parametrize(("padding", "flip"), [(2, True), (4, True), (3, False), (0, True)])
def test_random_crop_flip_exact(padding: int, flip: bool) -> None:
    torch.manual_seed(0)
    x = torch.randn(64, 3, 9, 7)
    gen = torch.Generator().manual_seed(1)
    y = random_crop_flip(x, padding, flip=flip, generator=gen)
    assert y.shape == x.shape and y.dtype == x.dtype
    used = set()
    for i in range(len(x)):
        cands = _reference_candidates(x[i], padding, flip)
        hits = [j for j, c in enumerate(cands) if torch.equal(c, y[i])]
        assert hits, f"example {i} is not a crop of its padded input"
        used.add(hits[0])
    n_cands = (2 * padding + 1) ** 2 * (2 if flip else 1)
    assert len(used) >= min(n_cands, 20)  # offsets and flips really vary
    # Same generator seed -> same batch; the global RNG is not consumed.
    state = torch.get_rng_state()
    y2 = random_crop_flip(x, padding, flip=flip, generator=torch.Generator().manual_seed(1))
    assert torch.equal(y, y2) and torch.equal(state, torch.get_rng_state())


def test_random_crop_flip_edge_cases() -> None:
    x = torch.randn(5, 1, 4, 4)
    assert torch.equal(random_crop_flip(x, 0, flip=False), x)
    assert random_crop_flip(x[:0], 2).shape == (0, 1, 4, 4)
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        random_crop_flip(torch.randn(4, 40), 2)
    with pytest.raises(ValueError, match="padding"):
        random_crop_flip(x, -1)
    aug = RandomCropFlip(2)
    assert aug(x, torch.Generator().manual_seed(0)).shape == x.shape
    assert pickle.loads(pickle.dumps(aug)).padding == 2


# --------------------------------------------------------------------------- models


def test_small_model_forward_shapes() -> None:
    torch.manual_seed(0)
    assert mnist1d_cnn()(torch.randn(3, 1, 40)).shape == (3, 10)
    assert mnist1d_mlp()(torch.randn(3, 1, 40)).shape == (3, 10)
    assert FashionResNet()(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert FashionResNet(width=0.5)(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert ResNet18(100)(torch.randn(2, 3, 32, 32)).shape == (2, 100)
    assert WideResNet(10, 2, num_classes=7)(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    assert WideResNet(16, 1, dropout=0.3)(torch.randn(2, 3, 16, 16)).shape == (2, 10)
    with pytest.raises(ValueError, match="6n\\+4"):
        WideResNet(15, 2)


def test_model_sizes() -> None:
    cnn = mnist1d_cnn()
    assert cnn[-1].in_features == 160  # 40 -> 19 -> 10 -> 5 positions x 32 channels
    assert not any(isinstance(m, torch.nn.BatchNorm1d) for m in cnn.modules())
    assert count_parameters(mnist1d_mlp()) == 40 * 100 + 100 + 100 * 100 + 100 + 100 * 10 + 10
    assert count_parameters(FashionResNet(width=2.0)) > 3 * count_parameters(FashionResNet())
    sizes = {m: count_parameters(build_cifar_model(m, 10)) for m in CIFAR_MODELS}
    assert sizes["resnet18"] == pytest.approx(11.17e6, rel=0.01)
    assert sizes["wrn16-8"] == pytest.approx(10.96e6, rel=0.01)
    assert sizes["wrn28-10"] == pytest.approx(36.48e6, rel=0.01)
    assert count_parameters(build_cifar_model("resnet18", 100)) == sizes["resnet18"] + 90 * 513


def test_make_model_is_fresh_and_seeded(tmp_path: Path) -> None:
    _write_cifar(tmp_path, 10)
    task = get_task("cifar10", data_dir=tmp_path, model="wrn16-8")
    torch.manual_seed(0)
    a = task.make_model()
    torch.manual_seed(0)
    b = task.make_model()
    c = task.make_model()
    assert isinstance(a, WideResNet) and a is not b
    assert torch.equal(a.conv1.weight, b.conv1.weight)
    assert not torch.equal(a.conv1.weight, c.conv1.weight)
    assert "wrn16-8" in repr(task.make_model)


# --------------------------------------------------------------------------- MNIST-1D


def test_mnist1d_task_trains_one_step() -> None:
    np.random.seed(123)
    random.seed(123)
    np_state, py_state = np.random.get_state()[1].copy(), random.getstate()
    task = get_task("mnist1d", num_samples=500)
    assert np.array_equal(np.random.get_state()[1], np_state) and random.getstate() == py_state
    assert task.train_x.shape == (400, 1, 40) and task.test_x.shape == (100, 1, 40)
    assert task.train_x.dtype == torch.float32 and task.train_y.dtype == torch.int64
    assert task.augment is None and task.num_classes == 10
    assert task.defaults["lr"] == 0.1 and task.defaults["epochs"] == 50
    assert get_task("mnist1d", num_samples=500, model="mlp").defaults["lr"] == 0.2
    start = time.perf_counter()
    again = get_task("mnist1d", num_samples=500)
    assert time.perf_counter() - start < 0.5  # cached
    assert torch.equal(again.train_x, task.train_x) and torch.equal(again.test_y, task.test_y)

    torch.manual_seed(0)
    model = task.make_model()
    opt = torch.optim.SGD(model.parameters(), lr=task.defaults["lr"], momentum=0.9)
    batch = (task.train_x[:128], task.train_y[:128])
    losses = per_sample_cross_entropy(model, batch)
    assert losses.shape == (128,) and torch.isfinite(losses).all()
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    losses.mean().backward()
    opt.step()
    assert all(not torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))
    assert per_sample_cross_entropy(model, batch).mean() < losses.mean()


def test_mnist1d_missing_package(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "mnist1d", None)
    monkeypatch.setitem(sys.modules, "mnist1d.data", None)
    with pytest.raises(ImportError, match=r'pip install "ksam\[cli\]"'):
        tdata.make_mnist1d(num_samples=123, seed=9)
