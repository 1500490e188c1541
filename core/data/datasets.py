"""The datasets `load_data` returns, the `DataBundle` holding a spec's three splits, and the DataLoader."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from core.data.images import load_image
from core.data.spec import NORMALIZATIONS, SPLITS, DataSpec

SKIPPED_RECORDED = 20
"""How many of a dataset's skipped files a run record names (all are counted)."""


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
        """A whole batch in a few tensor ops rather than one call per item (DataLoader calls this when it exists)."""
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

    def skipped_report(self, limit: int = SKIPPED_RECORDED) -> dict[str, Any]:
        """What a run records of the files left out: ``{"count": n, "first": [[path, reason], ...]}``, the first
        ``limit`` in the order they were found (class folders left out are items too, named ``class/``)."""
        return {"count": len(self.skipped), "first": [list(item) for item in self.skipped[:limit]]}


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
