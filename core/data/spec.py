"""What decides a dataset: the `DataSpec`, its names and normalisations, and where user data may live."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

NORMALIZATIONS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "half": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "none": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
}
BAD_FILE_POLICIES = ("skip", "error")
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
