"""MedMNIST v2 2-D datasets at 28 px (Yang et al., Scientific Data 2023).

Each dataset is one official ``<name>.npz`` file (keys ``train_images``, ``train_labels``,
``val_images``, ``val_labels``, ``test_images``, ``test_labels``; ``uint8`` images ``(N, 28, 28)``
grey or ``(N, 28, 28, 3)`` RGB; labels ``(N, 1)``) expected at ``<root>/<name>.npz``. URLs, MD5
checksums, split sizes and class names are copied from the ``INFO`` table of the ``medmnist``
package (v3.0.2, ``medmnist/info.py``); the package itself is not a dependency.

ChestMNIST is deliberately not registered: it is multi-label (14 binary findings per image),
which the single-label ``ImageData.labels`` of shape ``(N,)`` cannot represent.

Present files are MD5-verified; the digest is cached per ``(path, mtime, size)`` for the life of
the process so repeated loads do not re-hash. Missing files are downloaded with
``torchvision.datasets.utils.download_url`` when ``download=True``.
"""

from __future__ import annotations

import hashlib
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fl.data.base import _CLEAR_HOOKS, DatasetError, DatasetInfo, ImageData, register

__all__ = ["MEDMNIST", "MedMNISTSpec", "file_md5", "medmnist_path", "read_npz_split"]

_ZENODO = "https://zenodo.org/records/10519652/files"
_HOMEPAGE = "https://medmnist.com/ (files: https://zenodo.org/records/10519652)"


@dataclass(frozen=True)
class MedMNISTSpec:
    """One row of the MedMNIST table: where the official file is and what it contains."""

    name: str
    md5: str
    channels: int
    class_names: tuple[str, ...]
    n_samples: tuple[int, int, int]  # train, val, test
    task: str
    description: str

    @property
    def url(self) -> str:
        """Official download URL of the 28 px file."""
        return f"{_ZENODO}/{self.name}.npz?download=1"

    @property
    def filename(self) -> str:
        """File name expected under the data root."""
        return f"{self.name}.npz"


_ORGAN_CLASSES = (
    "bladder",
    "femur-left",
    "femur-right",
    "heart",
    "kidney-left",
    "kidney-right",
    "liver",
    "lung-left",
    "lung-right",
    "pancreas",
    "spleen",
)

#: The registered MedMNIST datasets (official 28 px files), keyed by name.
MEDMNIST: dict[str, MedMNISTSpec] = {
    spec.name: spec
    for spec in (
        MedMNISTSpec(
            name="pathmnist",
            md5="a8b06965200029087d5bd730944a56c1",
            channels=3,
            class_names=(
                "adipose",
                "background",
                "debris",
                "lymphocytes",
                "mucus",
                "smooth muscle",
                "normal colon mucosa",
                "cancer-associated stroma",
                "colorectal adenocarcinoma epithelium",
            ),
            n_samples=(89996, 10004, 7180),
            task="multi-class",
            description="colorectal cancer histology patches (NCT-CRC-HE-100K / CRC-VAL-HE-7K), "
            "H&E stained, 9 tissue types",
        ),
        MedMNISTSpec(
            name="dermamnist",
            md5="0744692d530f8e62ec473284d019b0c7",
            channels=3,
            class_names=(
                "actinic keratoses and intraepithelial carcinoma",
                "basal cell carcinoma",
                "benign keratosis-like lesions",
                "dermatofibroma",
                "melanoma",
                "melanocytic nevi",
                "vascular lesions",
            ),
            n_samples=(7007, 1003, 2005),
            task="multi-class",
            description="dermatoscopic images of pigmented skin lesions (HAM10000), 7 diseases",
        ),
        MedMNISTSpec(
            name="octmnist",
            md5="c68d92d5b585d8d81f7112f81e2d0842",
            channels=1,
            class_names=(
                "choroidal neovascularization",
                "diabetic macular edema",
                "drusen",
                "normal",
            ),
            n_samples=(97477, 10832, 1000),
            task="multi-class",
            description="retinal optical coherence tomography scans, 4 diagnosis categories",
        ),
        MedMNISTSpec(
            name="pneumoniamnist",
            md5="28209eda62fecd6e6a2d98b1501bb15f",
            channels=1,
            class_names=("normal", "pneumonia"),
            n_samples=(4708, 524, 624),
            task="binary-class",
            description="paediatric chest X-rays, pneumonia vs normal",
        ),
        MedMNISTSpec(
            name="retinamnist",
            md5="bd4c0672f1bba3e3a89f0e4e876791e4",
            channels=3,
            class_names=("0", "1", "2", "3", "4"),
            n_samples=(1080, 120, 400),
            task="ordinal-regression",
            description="retina fundus images (DeepDRiD), 5-level diabetic retinopathy grade",
        ),
        MedMNISTSpec(
            name="breastmnist",
            md5="750601b1f35ba3300ea97c75c52ff8f6",
            channels=1,
            class_names=("malignant", "normal, benign"),
            n_samples=(546, 78, 156),
            task="binary-class",
            description="breast ultrasound images, malignant vs normal/benign",
        ),
        MedMNISTSpec(
            name="bloodmnist",
            md5="7053d0359d879ad8a5505303e11de1dc",
            channels=3,
            class_names=(
                "basophil",
                "eosinophil",
                "erythroblast",
                "immature granulocytes(myelocytes, metamyelocytes and promyelocytes)",
                "lymphocyte",
                "monocyte",
                "neutrophil",
                "platelet",
            ),
            n_samples=(11959, 1712, 3421),
            task="multi-class",
            description="microscope images of individual normal blood cells, 8 cell types",
        ),
        MedMNISTSpec(
            name="tissuemnist",
            md5="ebe78ee8b05294063de985d821c1c34b",
            channels=1,
            class_names=(
                "Collecting Duct, Connecting Tubule",
                "Distal Convoluted Tubule",
                "Glomerular endothelial cells",
                "Interstitial endothelial cells",
                "Leukocytes",
                "Podocytes",
                "Proximal Tubule Segments",
                "Thick Ascending Limb",
            ),
            n_samples=(165466, 23640, 47280),
            task="multi-class",
            description="human kidney cortex cells (BBBC051), 8 categories",
        ),
        MedMNISTSpec(
            name="organamnist",
            md5="68e3f8846a6bd62f0c9bf841c0d9eacc",
            channels=1,
            class_names=_ORGAN_CLASSES,
            n_samples=(34561, 6491, 17778),
            task="multi-class",
            description="abdominal CT slices (LiTS), axial view, 11 organs",
        ),
        MedMNISTSpec(
            name="organcmnist",
            md5="b9ceb9546e10131b32923c5bbeaea2b1",
            channels=1,
            class_names=_ORGAN_CLASSES,
            n_samples=(12975, 2392, 8216),
            task="multi-class",
            description="abdominal CT slices (LiTS), coronal view, 11 organs",
        ),
        MedMNISTSpec(
            name="organsmnist",
            md5="9ab87b696fb54e2a387ebe992d6ed5f1",
            channels=1,
            class_names=_ORGAN_CLASSES,
            n_samples=(13932, 2452, 8827),
            task="multi-class",
            description="abdominal CT slices (LiTS), sagittal view, 11 organs",
        ),
    )
}

_HASH_CHUNK = 1 << 20
_MD5_CACHE: dict[tuple[str, int, int], str] = {}
_CLEAR_HOOKS.append(_MD5_CACHE.clear)

#: Exceptions ``np.load`` / reading an npz member raise for truncated or corrupt files.
_CORRUPT_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    ValueError,
    EOFError,
    zipfile.BadZipFile,
    zlib.error,
)


def medmnist_path(name: str, root: str | Path) -> Path:
    """Where the 28 px file of MedMNIST dataset ``name`` is expected under ``root``."""
    return Path(root) / MEDMNIST[name].filename


def file_md5(path: Path) -> str:
    """MD5 hex digest of a file, cached per ``(resolved path, mtime_ns, size)``."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    cached = _MD5_CACHE.get(key)
    if cached is not None:
        return cached
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(_HASH_CHUNK), b""):
            digest.update(block)
    result = digest.hexdigest()
    _MD5_CACHE[key] = result
    return result


def _download(spec: MedMNISTSpec, root: Path) -> None:
    """Fetch the official file into ``root`` via torchvision, wrapping failures."""
    # Looked up at call time so tests (and users) can substitute the downloader.
    import torchvision.datasets.utils as tv_utils

    target = root / spec.filename
    try:
        root.mkdir(parents=True, exist_ok=True)
        tv_utils.download_url(spec.url, root=str(root), filename=spec.filename, md5=spec.md5)
    except (OSError, RuntimeError) as exc:
        raise DatasetError(
            f"could not download {spec.name} from {spec.url} to {target}: {exc}. "
            f"Offline fix: place the official file {spec.filename} (md5 {spec.md5}) at {target}."
        ) from exc
    if not target.is_file():
        raise DatasetError(
            f"download of {spec.url} reported success but {target} does not exist; "
            f"place the official file (md5 {spec.md5}) there by hand"
        )


def _verify(spec: MedMNISTSpec, path: Path) -> None:
    """Raise :class:`DatasetError` if ``path`` does not have the official MD5."""
    found = file_md5(path)
    if found != spec.md5:
        raise DatasetError(
            f"checksum mismatch for {path}: expected md5 {spec.md5}, found {found}. The file is "
            f"truncated, corrupt or not the official one; delete it and re-download "
            f"(download=True) or place the official file from {spec.url} there."
        )


def _to_nchw(images: np.ndarray, path: Path, key: str) -> torch.Tensor:
    """Convert ``(N, H, W)`` or ``(N, H, W, C)`` ``uint8`` arrays to a ``(N, C, H, W)`` tensor."""
    if images.dtype != np.uint8:
        raise DatasetError(f"{path}: {key} has dtype {images.dtype}, expected uint8")
    if images.ndim == 3:
        return torch.from_numpy(np.ascontiguousarray(images)).unsqueeze(1)
    if images.ndim == 4:
        return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
    raise DatasetError(f"{path}: {key} has shape {images.shape}, expected (N,H,W) or (N,H,W,C)")


def read_npz_split(path: Path, split: str, info: DatasetInfo) -> ImageData:
    """Read one split of a MedMNIST-layout ``.npz`` into an :class:`ImageData`.

    Raises :class:`DatasetError` naming ``path`` if the file cannot be read (truncated, not a zip),
    lacks the split's keys, or holds arrays of the wrong type or shape.
    """
    image_key, label_key = f"{split}_images", f"{split}_labels"
    try:
        with np.load(path, allow_pickle=False) as archive:
            missing = [k for k in (image_key, label_key) if k not in archive.files]
            if missing:
                raise DatasetError(
                    f"{path} lacks {missing} (has {sorted(archive.files)}); it is not a valid "
                    f"MedMNIST file — delete it and re-download or place the official file there"
                )
            raw_images = archive[image_key]
            raw_labels = archive[label_key]
    except _CORRUPT_ERRORS as exc:
        raise DatasetError(
            f"cannot read {path} ({type(exc).__name__}: {exc}); the file is truncated or "
            f"corrupt — delete it and re-download or place the official file there"
        ) from exc
    images = _to_nchw(raw_images, path, image_key)
    if raw_labels.ndim == 2 and raw_labels.shape[1] != 1:
        raise DatasetError(
            f"{path}: {label_key} has shape {raw_labels.shape}; multi-label files are unsupported"
        )
    if not np.issubdtype(raw_labels.dtype, np.integer):
        raise DatasetError(f"{path}: {label_key} has dtype {raw_labels.dtype}, expected integers")
    labels = torch.from_numpy(raw_labels.reshape(-1).astype(np.int64))
    if labels.shape[0] != images.shape[0]:
        raise DatasetError(
            f"{path}: {images.shape[0]} images but {labels.shape[0]} labels in split {split!r}"
        )
    try:
        return ImageData(images=images, labels=labels, info=info, mean=(), std=(), split=split)
    except (TypeError, ValueError) as exc:
        raise DatasetError(
            f"{path}: split {split!r} is inconsistent with {info.name}: {exc}"
        ) from exc


def _make_loader(spec: MedMNISTSpec, info: DatasetInfo) -> Callable[[Path, str, bool], ImageData]:
    """Build the registry loader of one MedMNIST dataset."""

    def loader(root: Path, split: str, download: bool) -> ImageData:
        """Load ``split`` of this dataset from ``<root>/<name>.npz``, downloading if allowed."""
        path = Path(root) / spec.filename
        if not path.is_file():
            if not download:
                raise DatasetError(
                    f"{spec.name}: file not found at {path}. Pass download=True to fetch it from "
                    f"{spec.url}, or place the official file (md5 {spec.md5}) there."
                )
            _download(spec, Path(root))
        _verify(spec, path)
        return read_npz_split(path, split, info)

    loader.__name__ = f"load_{spec.name}"
    loader.__qualname__ = loader.__name__
    return loader


def _info(spec: MedMNISTSpec) -> DatasetInfo:
    """Static registry facts for one MedMNIST dataset (stats computed from the train split)."""
    train, val, test = spec.n_samples
    return DatasetInfo(
        name=spec.name,
        channels=spec.channels,
        num_classes=len(spec.class_names),
        class_names=spec.class_names,
        splits=("train", "val", "test"),
        native_size=28,
        mean=None,
        std=None,
        description=(
            f"MedMNIST v2 {spec.name} (28 px, {spec.task}): {spec.description}; "
            f"train/val/test {train}/{val}/{test}; CC BY 4.0; {_HOMEPAGE}"
        ),
    )


for _spec in MEDMNIST.values():
    _spec_info = _info(_spec)
    register(_spec.name, _spec_info)(_make_loader(_spec, _spec_info))
