"""Tests of :mod:`fl.data`: the registry, MedMNIST, torchvision sets and image folders."""

from __future__ import annotations

import shutil
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.datasets
import torchvision.datasets.utils
from PIL import Image
from skimage import data as skdata

from fl import data
from fl.data import base, medmnist

MEDMNIST_NAMES = [
    "pathmnist",
    "dermamnist",
    "octmnist",
    "pneumoniamnist",
    "retinamnist",
    "breastmnist",
    "bloodmnist",
    "tissuemnist",
    "organamnist",
    "organcmnist",
    "organsmnist",
]
TORCHVISION_NAMES = ["cifar10", "cifar100", "mnist", "fashionmnist"]

# name -> (channels, classes, {split: size})
REAL = {
    "pneumoniamnist": (1, 2, {"train": 4708, "val": 524, "test": 624}),
    "retinamnist": (3, 5, {"train": 1080, "val": 120, "test": 400}),
}


@pytest.fixture(scope="module")
def data_root(shared_dir: Path) -> Path:
    """Directory holding the official MedMNIST files."""
    return shared_dir / "data"


@pytest.fixture
def pneumonia_copy(data_root: Path, tmp_path: Path) -> Path:
    """A private copy of pneumoniamnist.npz that a test may damage."""
    target = tmp_path / "pneumoniamnist.npz"
    shutil.copyfile(data_root / "pneumoniamnist.npz", target)
    return target


# --- registry ------------------------------------------------------------------------------


def test_available_lists_all_datasets_sorted() -> None:
    names = data.available()
    assert names == sorted(names)
    assert set(MEDMNIST_NAMES + TORCHVISION_NAMES + ["folder"]) <= set(names)
    assert "chestmnist" not in names  # multi-label, deliberately unsupported


def test_info_facts() -> None:
    pneumonia = data.info("pneumoniamnist")
    assert (pneumonia.channels, pneumonia.num_classes) == (1, 2)
    assert pneumonia.class_names == ("normal", "pneumonia")
    assert pneumonia.splits == ("train", "val", "test")
    assert pneumonia.native_size == 28
    assert pneumonia.mean is None  # computed from the train split
    retina = data.info("RetinaMNIST")  # case-insensitive
    assert (retina.channels, retina.num_classes) == (3, 5)
    cifar = data.info("cifar10")
    assert cifar.splits == ("train", "test") and cifar.mean is not None and cifar.native_size == 32
    assert len(data.info("cifar100").class_names) == 100
    for name in MEDMNIST_NAMES:
        entry = medmnist.MEDMNIST[name]
        assert entry.url == f"https://zenodo.org/records/10519652/files/{name}.npz?download=1"
        assert len(entry.md5) == 32
    assert medmnist.MEDMNIST["pneumoniamnist"].md5 == "28209eda62fecd6e6a2d98b1501bb15f"
    assert medmnist.MEDMNIST["retinamnist"].md5 == "bd4c0672f1bba3e3a89f0e4e876791e4"


def test_unknown_dataset_lists_known_names(tmp_path: Path) -> None:
    with pytest.raises(data.UnknownDatasetError) as excinfo:
        data.info("imagenet")
    assert isinstance(excinfo.value, ValueError)
    message = str(excinfo.value)
    assert "imagenet" in message and "pneumoniamnist" in message and "cifar10" in message
    with pytest.raises(data.UnknownDatasetError):
        data.load("imagenet", root=tmp_path, split="train")


def test_bad_split_and_image_size(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown split"):
        data.load("pneumoniamnist", root=tmp_path, split="validation")
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="image_size"):
            data.load("pneumoniamnist", root=tmp_path, split="train", image_size=bad)


def test_register_user_dataset(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(base, "DATASETS", base.DATASETS.copy())
    rng = np.random.default_rng(0)
    pixels = torch.from_numpy(rng.integers(0, 256, (12, 1, 8, 8), dtype=np.uint8))
    calls: list[str] = []

    @data.register("toy")
    def load_toy(root: Path, split: str, download: bool) -> data.ImageData:
        """Serve the same random images for every split."""
        calls.append(split)
        info = data.DatasetInfo("toy", 1, 3, ("a", "b", "c"), ("train", "test"), 8, None, None, "")
        labels = torch.arange(12) % 3
        return data.ImageData(pixels, labels, info, mean=(), std=(), split=split)

    assert "toy" in data.available()
    assert data.info("toy").discovered
    test = data.load("toy", root=tmp_path, split="test", image_size=4)
    assert test.images.shape == (12, 1, 4, 4)
    assert test.info.num_classes == 3
    expected_mean = pixels.double().div(255).mean().item()
    assert test.mean[0] == pytest.approx(expected_mean)
    assert calls == ["test", "train"]  # stats come from the train split
    data.load("toy", root=tmp_path, split="test")
    assert calls == ["test", "train", "test"]  # stats cached per (name, root)
    with pytest.raises(ValueError, match="already registered"):
        data.register("toy")(load_toy)


# --- MedMNIST (real files) -----------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(REAL))
def test_real_medmnist_splits(name: str, data_root: Path) -> None:
    channels, classes, sizes = REAL[name]
    loaded = {split: data.load(name, root=data_root, split=split) for split in sizes}
    train_mean, train_std = data.compute_stats(loaded["train"].images)
    for split, size in sizes.items():
        part = loaded[split]
        assert len(part) == size and part.split == split
        assert part.images.shape == (size, channels, 28, 28)
        assert part.images.dtype == torch.uint8 and part.labels.dtype == torch.int64
        assert part.labels.shape == (size,)
        assert set(part.labels.unique().tolist()) == set(range(classes))
        assert part.info.num_classes == classes and part.info.channels == channels
        # Every split carries the train split's statistics.
        assert part.mean == pytest.approx(train_mean) and part.std == pytest.approx(train_std)
        assert len(part.mean) == channels
        assert all(0.1 < m < 0.8 for m in part.mean)
        assert all(0.05 < s < 0.4 for s in part.std)
        assert part.images.float().std() > 10  # real content, not a constant image


def test_real_medmnist_pixels_match_file(data_root: Path) -> None:
    retina = data.load("retinamnist", root=data_root, split="val")
    with np.load(data_root / "retinamnist.npz") as archive:
        raw = archive["val_images"]
        raw_labels = archive["val_labels"]
    assert torch.equal(retina.images, torch.from_numpy(raw).permute(0, 3, 1, 2))
    assert torch.equal(retina.labels, torch.from_numpy(raw_labels[:, 0].astype(np.int64)))


@pytest.mark.parametrize("size", [16, 32])
def test_real_medmnist_resized(size: int, data_root: Path) -> None:
    native = data.load("retinamnist", root=data_root, split="test")
    resized = data.load("retinamnist", root=data_root, split="test", image_size=size)
    assert resized.images.shape == (400, 3, size, size) and resized.images.dtype == torch.uint8
    assert torch.equal(resized.labels, native.labels)
    assert resized.mean == native.mean  # stats are those of the (native) train split
    expected = F.interpolate(
        native.images.float(),
        size=(size, size),
        mode="bilinear",
        align_corners=False,
        antialias=True,
    )
    assert torch.equal(resized.images, expected.round().clamp(0, 255).to(torch.uint8))
    means = resized.float_images().mean(dim=(0, 2, 3))
    assert torch.allclose(means, native.float_images().mean(dim=(0, 2, 3)), atol=0.01)
    grey = data.load("pneumoniamnist", root=data_root, split="val", image_size=size)
    assert grey.images.shape == (524, 1, size, size)


def test_float_images_and_subset(data_root: Path) -> None:
    val = data.load("pneumoniamnist", root=data_root, split="val")
    floats = val.float_images()
    assert floats.dtype == torch.float32 and floats.shape == (524, 1, 28, 28)
    assert float(floats.min()) >= 0.0 and float(floats.max()) <= 1.0
    assert torch.allclose(floats * 255, val.images.float())
    picked = val.float_images(np.array([3, 1]))
    assert torch.equal(picked, floats[[3, 1]])
    sub = val.subset([5, 7, 9])
    assert len(sub) == 3 and sub.mean == val.mean and sub.split == "val"
    assert torch.equal(sub.labels, val.labels[[5, 7, 9]])
    assert torch.equal(sub.images, val.images[torch.tensor([5, 7, 9])])


def test_checksum_mismatch_names_file(pneumonia_copy: Path) -> None:
    raw = bytearray(pneumonia_copy.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    pneumonia_copy.write_bytes(bytes(raw))
    with pytest.raises(data.DatasetError) as excinfo:
        data.load("pneumoniamnist", root=pneumonia_copy.parent, split="train")
    message = str(excinfo.value)
    assert str(pneumonia_copy) in message
    assert "28209eda62fecd6e6a2d98b1501bb15f" in message and "re-download" in message


def test_intact_copy_loads_and_caches_checksum(pneumonia_copy: Path) -> None:
    part = data.load("pneumoniamnist", root=pneumonia_copy.parent, split="test")
    assert len(part) == 624
    stat = pneumonia_copy.stat()
    key = (str(pneumonia_copy.resolve()), stat.st_mtime_ns, stat.st_size)
    assert medmnist._MD5_CACHE[key] == "28209eda62fecd6e6a2d98b1501bb15f"
    data.clear_caches()
    assert key not in medmnist._MD5_CACHE


def test_truncated_file_raises(pneumonia_copy: Path) -> None:
    raw = pneumonia_copy.read_bytes()
    pneumonia_copy.write_bytes(raw[: len(raw) // 3])
    with pytest.raises(data.DatasetError, match=r"pneumoniamnist\.npz"):
        data.load("pneumoniamnist", root=pneumonia_copy.parent, split="train")
    # The reader itself (behind the checksum) also reports unreadable files by name.
    info = data.info("pneumoniamnist")
    with pytest.raises(data.DatasetError, match="cannot read") as excinfo:
        medmnist.read_npz_split(pneumonia_copy, "train", info)
    assert str(pneumonia_copy) in str(excinfo.value)


def test_npz_without_expected_keys(tmp_path: Path) -> None:
    path = tmp_path / "odd.npz"
    np.savez(path, something=np.zeros(3))
    with pytest.raises(data.DatasetError, match="lacks") as excinfo:
        medmnist.read_npz_split(path, "val", data.info("pneumoniamnist"))
    assert str(path) in str(excinfo.value)


def test_missing_file_without_download(tmp_path: Path) -> None:
    with pytest.raises(data.DatasetError) as excinfo:
        data.load("retinamnist", root=tmp_path, split="train")
    message = str(excinfo.value)
    assert str(tmp_path / "retinamnist.npz") in message
    assert "https://zenodo.org/records/10519652/files/retinamnist.npz?download=1" in message


def test_download_without_network(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def offline(url: str, root: str, filename: str | None = None, md5: str | None = None) -> None:
        """Behave like a machine without internet access."""
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.datasets.utils, "download_url", offline)
    root = tmp_path / "fresh"
    with pytest.raises(data.DatasetError) as excinfo:
        data.load("pneumoniamnist", root=root, split="train", download=True)
    message = str(excinfo.value)
    assert medmnist.MEDMNIST["pneumoniamnist"].url in message
    assert str(root / "pneumoniamnist.npz") in message and "place the official file" in message
    assert isinstance(excinfo.value.__cause__, urllib.error.URLError)


def test_download_places_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, data_root: Path
) -> None:
    seen: list[tuple[str, str, str | None, str | None]] = []

    def fake_download(url: str, root: str, filename: str | None = None, md5: str | None = None):
        """Serve the official file from the shared directory instead of the network."""
        seen.append((url, root, filename, md5))
        assert filename is not None
        shutil.copyfile(data_root / "retinamnist.npz", Path(root) / filename)

    monkeypatch.setattr(torchvision.datasets.utils, "download_url", fake_download)
    root = tmp_path / "new" / "dir"
    part = data.load("retinamnist", root=root, split="val", download=True)
    assert len(part) == 120 and (root / "retinamnist.npz").is_file()
    spec = medmnist.MEDMNIST["retinamnist"]
    assert seen == [(spec.url, str(root), "retinamnist.npz", spec.md5)]


# --- torchvision sets ----------------------------------------------------------------------


@pytest.mark.parametrize("name", TORCHVISION_NAMES)
def test_torchvision_missing_files(name: str, tmp_path: Path) -> None:
    with pytest.raises(data.DatasetError) as excinfo:
        data.load(name, root=tmp_path, split="train", download=False)
    message = str(excinfo.value)
    assert str(tmp_path) in message and "download=True" in message
    assert isinstance(excinfo.value.__cause__, RuntimeError)


def test_torchvision_has_no_val_split(tmp_path: Path) -> None:
    with pytest.raises(data.DatasetError, match="train, test"):
        data.load("cifar10", root=tmp_path, split="val")


class _FakeTorchvision:
    """Stands in for a torchvision dataset class: records arguments, serves fixed arrays."""

    data: object
    targets: object

    def __init__(self, root: str, train: bool, download: bool) -> None:
        self.root, self.train, self.download = root, train, download


def test_torchvision_conversion(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    cifar_pixels = rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    mnist_pixels = torch.from_numpy(rng.integers(0, 256, (5, 28, 28), dtype=np.uint8))

    class FakeCIFAR(_FakeTorchvision):
        data = cifar_pixels
        targets = (0, 1, 2, 3, 4, 9)

    class FakeMNIST(_FakeTorchvision):
        data = mnist_pixels
        targets = torch.tensor([7, 0, 1, 2, 3])

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCIFAR)
    monkeypatch.setattr(torchvision.datasets, "MNIST", FakeMNIST)
    cifar = data.load("cifar10", root=tmp_path, split="test")
    assert cifar.images.shape == (6, 3, 32, 32)
    assert torch.equal(cifar.images, torch.from_numpy(cifar_pixels).permute(0, 3, 1, 2))
    assert cifar.labels.tolist() == [0, 1, 2, 3, 4, 9]
    assert cifar.mean == data.info("cifar10").mean
    mnist = data.load("mnist", root=tmp_path, split="train", image_size=14)
    assert mnist.images.shape == (5, 1, 14, 14) and mnist.labels.dtype == torch.int64


# --- image folders -------------------------------------------------------------------------


def _crops(count: int, size: int, offset: int) -> list[np.ndarray]:
    """Distinct real-image crops of the astronaut photograph."""
    photo = skdata.astronaut()
    return [
        photo[offset + 25 * i : offset + 25 * i + size, 60 + 29 * i : 60 + 29 * i + size]
        for i in range(count)
    ]


def _write_tree(root: Path, classes: dict[str, list[np.ndarray]], grey: bool = False) -> None:
    """Write ``root/<class>/<i>.png`` files."""
    for name, crops in classes.items():
        (root / name).mkdir(parents=True)
        for i, crop in enumerate(crops):
            image = Image.fromarray(crop)
            (image.convert("L") if grey else image).save(root / name / f"{i:02d}.png")


def test_folder_auto_split(tmp_path: Path) -> None:
    classes = {"cat": _crops(10, 24, 0), "dog": _crops(10, 24, 100), "eye": _crops(10, 24, 200)}
    _write_tree(tmp_path, classes)
    splits = {s: data.load("folder", root=tmp_path, split=s) for s in ("train", "val", "test")}
    assert [len(splits[s]) for s in ("train", "val", "test")] == [24, 3, 3]
    train = splits["train"]
    assert train.info.channels == 3 and train.info.class_names == ("cat", "dog", "eye")
    assert train.info.num_classes == 3 and train.info.native_size == 24
    assert train.images.shape == (24, 3, 24, 24)
    # Every file appears in exactly one split, with its own pixels and label.
    rows = {
        (int(label), image.numpy().tobytes())
        for part in splits.values()
        for image, label in zip(part.images, part.labels, strict=True)
    }
    expected = {
        (k, np.ascontiguousarray(crop.transpose(2, 0, 1)).tobytes())
        for k, name in enumerate(sorted(classes))
        for crop in classes[name]
    }
    assert rows == expected
    again = data.load("folder", root=tmp_path, split="val")
    assert torch.equal(again.images, splits["val"].images)  # deterministic split
    mean, std = data.compute_stats(train.images)
    assert splits["test"].mean == pytest.approx(mean) and splits["test"].std == pytest.approx(std)
    assert data.info("folder").channels == 0  # generic until loaded


def test_folder_explicit_splits_grey(tmp_path: Path) -> None:
    _write_tree(tmp_path / "train", {"a": _crops(3, 16, 0), "b": _crops(2, 16, 50)}, grey=True)
    _write_tree(tmp_path / "test", {"b": _crops(2, 16, 150)}, grey=True)
    test = data.load("folder", root=tmp_path, split="test", image_size=8)
    assert test.images.shape == (2, 1, 8, 8)
    assert test.labels.tolist() == [1, 1]  # "b" is class 1 across splits
    assert test.info.splits == ("train", "test")
    with pytest.raises(data.DatasetError, match="no 'val' split"):
        data.load("folder", root=tmp_path, split="val")


def test_folder_sizes_differ(tmp_path: Path) -> None:
    _write_tree(tmp_path, {"x": _crops(6, 20, 0), "y": _crops(6, 26, 90)})
    with pytest.raises(data.DatasetError, match="differ in size") as excinfo:
        data.load("folder", root=tmp_path, split="train")
    assert str(tmp_path / "y") in str(excinfo.value)
    train = data.load("folder", root=tmp_path, split="train", image_size=12)
    assert train.images.shape == (len(train), 3, 12, 12)
    assert train.info.native_size == 0


def test_folder_empty_or_missing(tmp_path: Path) -> None:
    (tmp_path / "empty" / "class_a").mkdir(parents=True)
    (tmp_path / "empty" / "class_a" / "notes.txt").write_text("not an image")
    with pytest.raises(data.DatasetError, match="no images") as excinfo:
        data.load("folder", root=tmp_path / "empty", split="train")
    assert str(tmp_path / "empty") in str(excinfo.value)
    with pytest.raises(data.DatasetError, match="does not exist"):
        data.load("folder", root=tmp_path / "absent", split="train")


def test_folder_too_small_for_auto_split(tmp_path: Path) -> None:
    _write_tree(tmp_path, {"only": _crops(4, 10, 0)})
    assert len(data.load("folder", root=tmp_path, split="train")) == 4
    with pytest.raises(data.DatasetError, match="empty"):
        data.load("folder", root=tmp_path, split="test")


def test_folder_corrupt_image(tmp_path: Path) -> None:
    _write_tree(tmp_path, {"a": _crops(3, 10, 0)})
    (tmp_path / "a" / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(data.DatasetError, match=r"broken\.png"):
        data.load("folder", root=tmp_path, split="train")
