"""The user's images on disk: ImageFolder-style class folders and VTAB-1k task folders.

Paths must resolve inside a data root. Every selected file is opened, verified and decoded before anything is
returned; bad ones are reported in `DataBundle.skipped` (or refused with ``on_bad_file="error"``). A class folder
none of whose files is readable is left out, with a note in the same report; fewer than two classes left is
refused. Splits whose uint8 images fit in `MATERIALISE_BYTES` are kept in memory, larger ones are decoded per
item.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torchvision.datasets.folder import find_classes, make_dataset

from core.data.datasets import DataBundle, FileImageDataset, ImageDataset, TensorImageDataset
from core.data.images import load_image
from core.data.spec import SPLITS, DataSpec, default_data_root
from core.data.splits import cap_split, partition

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
    | {".ppm", ".pgm", ".pbm", ".pnm", ".tga", ".qoi"}
)
VTAB_LISTS = ("train800.txt", "val200.txt", "train800val200.txt", "test.txt")
MATERIALISE_BYTES = 256 * 2**20  # a folder split whose uint8 images fit in this is kept in memory


def resolve_inside(path: str | Path, data_root: Path) -> Path:
    """Resolve path (relative to data_root; symlinks and ``..`` followed); refuse it outside the root."""
    root = Path(data_root).expanduser().resolve()
    target = Path(path).expanduser()
    resolved = (target if target.is_absolute() else root / target).resolve()
    if not resolved.is_relative_to(root):
        where = str(path) if str(resolved) == str(path) else f"{path} (resolved: {resolved})"
        raise ValueError(
            f"{where} is outside the allowed data root {root}; move the data under the root, or set "
            "PETLAB_DATA_ROOT (or pass data_root=) to a folder that contains it"
        )
    return resolved


_EMPTY_CLASS = "class folder holds no image files; left out of the classes"


def _list_folder(folder: Path, root: Path) -> tuple[list[str], list[tuple[str, int]], list[tuple[str, str]]]:
    """Class names, (relative file, label) candidates and files left out, of an ImageFolder-style folder.

    torchvision's `find_classes` / `make_dataset` list it: classes sorted by name, files by path, links to
    folders followed. Hidden files and folders (``.name``) are ignored; files beside the class folders and files
    without an image extension are reported; class folders without any image file are left out (and reported)
    rather than given a label no image has. Linked folders must stay inside root (see `_check_linked_folders`).
    """
    skipped = [
        (entry.name, "not inside a class folder; put each image in a subfolder named by class")
        for entry in sorted(os.scandir(folder), key=lambda entry: entry.name)
        if not entry.name.startswith(".") and not entry.is_dir()
    ]
    try:
        class_dirs = [name for name in find_classes(folder)[0] if not name.startswith(".")]
    except FileNotFoundError:  # no subfolder at all
        class_dirs = []
    if not class_dirs:
        return [], [], skipped
    _check_linked_folders(folder, root, class_dirs)

    def is_image(path: str) -> bool:
        relative = Path(path).relative_to(folder)
        if any(part.startswith(".") for part in relative.parts):
            return False
        suffix = relative.suffix.lower()
        if suffix not in IMAGE_EXTENSIONS:
            skipped.append((relative.as_posix(), f"not an image file (extension {suffix or 'none'!r})"))
        return suffix in IMAGE_EXTENSIONS

    class_to_index = {name: index for index, name in enumerate(class_dirs)}
    listed = make_dataset(folder, class_to_index, is_valid_file=is_image, allow_empty=True)
    with_images = sorted({index for _, index in listed})
    label_of = {index: label for label, index in enumerate(with_images)}
    candidates = [(Path(path).relative_to(folder).as_posix(), label_of[index]) for path, index in listed]
    skipped += [(name + "/", _EMPTY_CLASS) for index, name in enumerate(class_dirs) if index not in label_of]
    return [class_dirs[index] for index in with_images], candidates, skipped


def _check_linked_folders(folder: Path, root: Path, class_dirs: list[str]) -> None:
    """Refuse links to folders that `make_dataset` would follow out of the data root, or to one folder twice.

    Files outside the root would only be refused one by one after a walk there (of the whole disk, for a link
    to ``/``); a folder reached twice would have its images listed twice, and a link to a parent folder endlessly.
    """
    seen: dict[Path, str] = {}
    for name in class_dirs:
        for dirpath, _, _ in os.walk(folder / name, followlinks=True):  # stops at the first refusal
            relative = Path(dirpath).relative_to(folder).as_posix()
            real = Path(dirpath).resolve()
            if not real.is_relative_to(root):
                raise ValueError(
                    f"{relative} in {folder} links to {real}, outside the data root {root}; move that folder "
                    "under the root or remove the link"
                )
            if real in seen:
                raise ValueError(
                    f"{relative} in {folder} is the same folder as {seen[real]} (through a symbolic link), so "
                    "its images would be listed twice (or endlessly, for a link to a parent folder); remove the link"
                )
            seen[real] = relative


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
    drop_refused_classes: bool = False,
) -> DataBundle:
    """Check the selected files of each split, drop (or refuse) bad ones, and build the datasets.

    With drop_refused_classes (class folders, not the fixed label space of VTAB lists), a class none of whose
    selected files is readable is left out and noted in the skipped report, and the others are relabelled.
    """
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
    relabel = {label: label for label in range(len(classes))}
    if drop_refused_classes:
        chosen = [(rel, label) for _, rel, label in order]
        relabel, notes = _relabel_without_refused_classes(folder, classes, chosen, reasons)
        classes = [classes[label] for label in relabel]
        skipped += notes
    datasets: dict[str, ImageDataset] = {}
    for split in SPLITS:
        rows = [i for i, (s, _, _) in enumerate(order) if s == split and reasons[i] is None]
        if not rows:
            n_listed = sum(s == split for s, _, _ in order)
            raise ValueError(
                f"the {split} split of {folder} is empty: all {n_listed} file(s) chosen for it are "
                "unreadable; add readable images"
            )
        labels = [relabel[order[i][2]] for i in rows]
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


def _relabel_without_refused_classes(
    folder: Path, classes: list[str], chosen: list[tuple[str, int]], reasons: list[str | None]
) -> tuple[dict[int, int], list[tuple[str, str]]]:
    """New labels of the classes with a readable file among those chosen, and a note for each class left out.

    Args:
        folder: The image folder (for messages).
        classes: Class names, indexed by label.
        chosen: (relative path, label) of each file chosen for the splits.
        reasons: Why each chosen file was refused, or None for a readable one.

    Raises:
        ValueError: When fewer than two classes keep a readable file.
    """
    labels = [label for _, label in chosen]
    readable_labels = [label for label, reason in zip(labels, reasons, strict=True) if reason is None]
    n_chosen = np.bincount(labels, minlength=len(classes))
    n_readable = np.bincount(readable_labels, minlength=len(classes))
    refused = [label for label in range(len(classes)) if n_chosen[label] and not n_readable[label]]
    kept = [label for label in range(len(classes)) if label not in refused]
    if len(kept) < 2:
        examples = [
            f"{rel}: {reason}" for (rel, label), reason in zip(chosen, reasons, strict=True) if label in refused
        ]
        raise ValueError(
            f"every file of the class folder(s) {', '.join(classes[label] for label in refused)} in {folder} "
            f"was refused, which leaves {len(kept)} class(es) with readable images "
            f"({', '.join(classes[label] for label in kept) or 'none'}); a classifier needs at least two. Fix or "
            f"replace those files ({'; '.join(examples[:3])}{'; ...' if len(examples) > 3 else ''})"
        )
    notes = [
        (classes[label] + "/", f"class left out: all {n_chosen[label]} of its files chosen for the splits were refused")
        for label in refused
    ]
    return {label: new_label for new_label, label in enumerate(kept)}, notes


def _load_folder(spec: DataSpec, folder: Path, root: Path, progress: Callable[[int, int], None] | None) -> DataBundle:
    classes, candidates, skipped = _list_folder(folder, root)
    if len(classes) < 2:
        raise ValueError(
            f"{folder} has {len(classes)} class folder(s) with images ({', '.join(classes) or 'none'}); an "
            "image folder needs one subfolder per class and at least two classes"
        )
    labels = np.array([label for _, label in candidates], dtype=np.int64)
    parts = partition(labels, spec)
    split_entries = {split: [candidates[i] for i in idx] for split, idx in parts.items()}
    return _load_files(spec, folder, root, split_entries, classes, skipped, progress, drop_refused_classes=True)


def _vtab_lists(spec: DataSpec) -> dict[str, str]:
    """The list file of each split of a VTAB spec."""
    train = "train800val200.txt" if spec.vtab_final else "train800.txt"
    return {"train": train, "val": "val200.txt", "test": "test.txt"}


def _load_vtab(spec: DataSpec, folder: Path, root: Path, progress: Callable[[int, int], None] | None) -> DataBundle:
    """The splits of a VTAB-1k task folder (its lists checked by `check_data`); classes are 0 .. the largest label in
    any list, named by index."""
    names = _vtab_lists(spec)
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
        idx = cap_split(np.arange(len(entries)), labels, getattr(spec, f"n_{split}"), spec.seed)
        split_entries[split] = [entries[i] for i in idx]
    classes = [str(c) for c in range(num_classes)]
    return _load_files(spec, folder, root, split_entries, classes, [], progress)


def check_data(spec: DataSpec, data_root: Path | str | None = None) -> tuple[Path, Path] | None:
    """(folder, resolved data root) of a ``folder:`` or ``vtab:`` spec; None for offline data.

    Looks only at the folder itself (no listing, no image read), so callers check a spec with it before a run is
    recorded: the path resolves inside the data root, is an existing folder, and a VTAB folder holds its lists.

    Raises:
        ValueError: What to fix: a path outside the root, missing or not a folder, or missing VTAB lists.
    """
    if spec.kind == "offline":
        return None
    root = Path(data_root if data_root is not None else default_data_root()).expanduser().resolve()
    folder = resolve_inside(spec.path or "", root)
    if not folder.is_dir():
        what = "a file" if folder.exists() else "nothing is there"
        shown = spec.path if str(folder) == spec.path else f"{spec.path} ({folder})"
        raise ValueError(f"{shown} is not an existing folder ({what}); give a folder inside {root}")
    if spec.kind == "vtab":
        missing = [name for name in _vtab_lists(spec).values() if not (folder / name).is_file()]
        if missing:
            raise ValueError(
                f"VTAB folder {folder} is missing {', '.join(missing)}; a VTAB-1k task folder holds "
                f"{', '.join(VTAB_LISTS)} with lines 'relative/path/to/image.jpg label'"
            )
    return folder, root


def load_from_disk(
    spec: DataSpec, data_root: Path | str | None, progress: Callable[[int, int], None] | None
) -> DataBundle:
    """The splits of a ``folder:`` or ``vtab:`` spec, whose path must resolve inside data_root (see `check_data`)."""
    located = check_data(spec, data_root)
    if located is None:
        raise ValueError(f"{spec.name} is an offline dataset, not a folder")
    folder, root = located
    if spec.kind == "folder":
        return _load_folder(spec, folder, root, progress)
    return _load_vtab(spec, folder, root, progress)
