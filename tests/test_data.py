"""Tests of core.data: offline sources, procedural tasks (known answers), splits, folders, VTAB lists, refusals."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from core.data import (
    SPLITS,
    DataSpec,
    FileImageDataset,
    ImageDataset,
    TensorImageDataset,
    check_data,
    folders,
    image_to_array,
    list_datasets,
    load_data,
    make_loader,
    make_procedural,
    stratified_split,
    unnormalize,
)

SMALL: dict[str, Any] = dict(img_size=16, normalization="none", n_generated=240)
NUM_CLASSES = {"digits": 10, "mnist5k": 10, "lfw-faces": 2, "count": 6, "orientation": 8, "location": 16}


def _stack(ds: ImageDataset) -> torch.Tensor:
    return torch.stack([ds[i][0] for i in range(len(ds))])


# ------------------------------------------------------------------------------------------------------------
# Spec
# ------------------------------------------------------------------------------------------------------------


def test_list_datasets_and_unknown_name() -> None:
    assert list_datasets() == ["digits", "mnist5k", "lfw-faces", "count", "orientation", "location"]
    with pytest.raises(ValueError, match=r"unknown dataset 'cifar10'.*mnist5k.*folder:"):
        DataSpec(name="cifar10")
    with pytest.raises(ValueError, match="names no folder"):
        DataSpec(name="folder:")


def test_spec_round_trips_through_json_and_refuses_nonsense() -> None:
    spec = DataSpec(name="folder:/data/pets", n_train=10, normalization="half", seed=3)
    assert DataSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    assert (spec.kind, spec.path, spec.mean_std[0]) == ("folder", "/data/pets", (0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match="unknown DataSpec field"):
        DataSpec.from_dict({**spec.to_dict(), "colour": "red"})
    with pytest.raises(ValueError, match="unknown normalization 'zscore'.*imagenet, half, none"):
        DataSpec(normalization="zscore")
    with pytest.raises(ValueError, match="n_val=0 would leave the val split empty"):
        DataSpec(n_val=0)
    with pytest.raises(ValueError, match="changes the labels of 'digits'"):
        DataSpec(name="digits", augment=True)
    with pytest.raises(ValueError, match="leaves no training images"):
        DataSpec(val_fraction=0.5, test_fraction=0.5)


# ------------------------------------------------------------------------------------------------------------
# Offline datasets
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(NUM_CLASSES))
def test_offline_dataset_shapes_classes_and_range(name: str) -> None:
    bundle = load_data(DataSpec(name=name, n_train=40, n_val=12, n_test=16, **SMALL))
    assert bundle.num_classes == NUM_CLASSES[name] == len(bundle.classes)
    assert [len(bundle.train), len(bundle.val), len(bundle.test)] == [40, 12, 16]
    x, y = bundle.train[0]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and isinstance(y, int)
    images = _stack(bundle.train)
    assert images.min() >= 0.0 and images.max() <= 1.0 and images.max() > 0.5
    for split in (bundle.train, bundle.val, bundle.test):
        assert split.labels.min() >= 0 and split.labels.max() < bundle.num_classes
    assert bundle.skipped == []
    assert bundle.summary()["sizes"] == {"train": 40, "val": 12, "test": 16}


def test_full_sizes_and_stratification() -> None:
    mnist = load_data(DataSpec(name="mnist5k", img_size=8, normalization="none"))
    assert [len(mnist.train), len(mnist.val), len(mnist.test)] == [3500, 500, 1000]
    for split, per_class in ((mnist.train, 350), (mnist.val, 50), (mnist.test, 100)):
        assert np.bincount(split.labels).tolist() == [per_class] * 10
    digits = load_data(DataSpec(name="digits", img_size=8, normalization="none"))
    assert len(digits.train) + len(digits.val) + len(digits.test) == 1797
    assert [len(digits.val), len(digits.test)] == [180, 359]


def test_digits_match_sklearn_and_lfw_matches_skimage() -> None:
    from skimage.data import lfw_subset
    from sklearn.datasets import load_digits

    digits = load_data(DataSpec(name="digits", img_size=8, normalization="none", n_train=50))
    reference = load_digits()
    idx = digits.train.indices
    assert idx is not None
    np.testing.assert_array_equal(digits.train.labels, reference.target[idx])
    expected = torch.from_numpy(reference.images[idx] / 16.0).float()
    torch.testing.assert_close(_stack(digits.train)[:, 0], expected, atol=0.5 / 255 + 1e-6, rtol=0)
    lfw = load_data(DataSpec(name="lfw-faces", img_size=25, normalization="none"))
    idx = lfw.test.indices
    assert idx is not None
    np.testing.assert_array_equal(lfw.test.labels, (idx >= 100).astype(int))  # 100 faces, then non-faces
    assert lfw.classes == ["face", "non-face"]
    expected = torch.from_numpy(lfw_subset()[idx]).float()
    torch.testing.assert_close(_stack(lfw.test)[:, 1], expected, atol=0.5 / 255 + 1e-6, rtol=0)


@pytest.mark.parametrize(
    ("normalization", "mean", "std"),
    [("imagenet", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)), ("half", (0.5,) * 3, (0.5,) * 3)],
)
def test_normalisation_is_affine_on_the_raw_values(
    normalization: str, mean: tuple[float, ...], std: tuple[float, ...]
) -> None:
    raw = load_data(DataSpec(name="digits", n_train=20, n_val=5, n_test=5, **SMALL))
    spec = DataSpec(name="digits", n_train=20, n_val=5, n_test=5, **{**SMALL, "normalization": normalization})
    normed = load_data(spec)
    expected = (_stack(raw.train) - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    torch.testing.assert_close(_stack(normed.train), expected)
    torch.testing.assert_close(unnormalize(_stack(normed.train), normalization), _stack(raw.train))
    if normalization == "half":
        images = _stack(normed.train)
        assert images.min() == -1.0 and images.max() == 1.0


# ------------------------------------------------------------------------------------------------------------
# Splits
# ------------------------------------------------------------------------------------------------------------


def test_stratified_split_proportions_and_disjointness() -> None:
    labels = np.array([0] * 50 + [1] * 30 + [2] * 20)
    parts = stratified_split(labels, [10, 20, 30], seed=0)
    assert [np.bincount(labels[p], minlength=3).tolist() for p in parts] == [[5, 3, 2], [10, 6, 4], [15, 9, 6]]
    assert len(np.unique(np.concatenate(parts))) == 60
    with pytest.raises(ValueError, match="cannot draw"):
        stratified_split(labels, [60, 50], seed=0)


def test_stratified_split_draws_uniformly_where_it_cannot_stratify() -> None:
    singleton = np.array([0] * 10 + [1] * 10 + [2])  # scikit-learn cannot stratify a class of one item
    tiny_part = np.repeat(np.arange(16), 3)  # nor a part smaller than the number of classes
    for labels, sizes in ((singleton, [5, 5, 11]), (tiny_part, [4, 40])):
        parts = stratified_split(labels, sizes, seed=3)
        assert [len(p) for p in parts] == sizes
        assert len(np.unique(np.concatenate(parts))) == sum(sizes)
        again, other = stratified_split(labels, sizes, seed=3), stratified_split(labels, sizes, seed=4)
        assert all(np.array_equal(p, q) for p, q in zip(parts, again, strict=True))
        assert not all(np.array_equal(p, q) for p, q in zip(parts, other, strict=True))


def test_splits_are_disjoint_seeded_and_nested_under_caps() -> None:
    def split_indices(seed: int, **caps: Any) -> dict[str, set[int]]:
        bundle = load_data(DataSpec(name="digits", seed=seed, **caps, **SMALL))
        return {s: set(getattr(bundle, s).indices.tolist()) for s in SPLITS}

    a, again, other = split_indices(0), split_indices(0), split_indices(1)
    assert a == again
    assert a["test"] != other["test"] and a["train"] != other["train"]
    assert not (a["train"] & a["val"]) and not (a["train"] & a["test"]) and not (a["val"] & a["test"])
    capped = split_indices(0, n_train=100, n_test=50)
    assert len(capped["train"]) == 100 and capped["train"] < a["train"] and capped["test"] < a["test"]
    assert capped["val"] == a["val"]


def test_caps_are_stratified() -> None:
    lfw = load_data(DataSpec(name="lfw-faces", n_train=20, n_val=6, n_test=10, **SMALL))  # sorted by class
    assert [np.bincount(s.labels).tolist() for s in (lfw.train, lfw.val, lfw.test)] == [[10, 10], [3, 3], [5, 5]]


# ------------------------------------------------------------------------------------------------------------
# Procedural tasks: deterministic, and the pixels say what the label says
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["count", "orientation", "location"])
def test_procedural_is_deterministic_and_balanced(name: str) -> None:
    images, labels = make_procedural(name, 64, seed=5)
    images2, labels2 = make_procedural(name, 64, seed=5)
    images3, _ = make_procedural(name, 64, seed=6)
    np.testing.assert_array_equal(images, images2)
    np.testing.assert_array_equal(labels, labels2)
    assert not np.array_equal(images, images3)
    assert images.shape == (64, 64, 64, 3) and images.dtype == np.uint8
    counts = np.bincount(labels, minlength=NUM_CLASSES[name])
    assert counts.max() - counts.min() <= 1
    bundle = load_data(DataSpec(name=name, seed=5, **{**SMALL, "n_generated": 64}))
    generated_labels = make_procedural(name, 64, seed=5)[1]
    np.testing.assert_array_equal(bundle.test.labels, generated_labels[bundle.test.indices])


def _components(image: np.ndarray) -> tuple[np.ndarray, int]:
    """Objects are bright (max channel >= 0.7 - noise), backgrounds dark (<= 0.25 + noise)."""
    return ndimage.label(image.max(axis=-1) > 128)


def test_count_images_hold_label_plus_one_objects() -> None:
    images, labels = make_procedural("count", 150, seed=11)
    found = np.array([_components(image)[1] for image in images])
    np.testing.assert_array_equal(found, labels + 1)


def test_orientation_label_is_the_bars_angle_bin() -> None:
    images, labels = make_procedural("orientation", 150, seed=12)
    for image, label in zip(images, labels, strict=True):
        comp, n = _components(image)
        assert n == 2  # the bar and the disc distractor
        best = (0.0, 0.0)
        for k in range(1, n + 1):
            rows, cols = np.nonzero(comp == k)
            x, y = cols - cols.mean(), -(rows - rows.mean())  # y up, so angles are counterclockwise
            sxx, syy, sxy = (x * x).mean(), (y * y).mean(), (x * y).mean()
            low, high = np.linalg.eigvalsh([[sxx, sxy], [sxy, syy]])
            elongation = high / max(low, 1e-6)
            if elongation > best[0]:
                best = (elongation, math.degrees(0.5 * math.atan2(2 * sxy, sxx - syy)) % 180)
        assert best[0] > 5 and int(best[1] // 22.5) == label


def test_location_label_is_the_filled_discs_cell() -> None:
    images, labels = make_procedural("location", 150, seed=13)
    for image, label in zip(images, labels, strict=True):
        comp, n = _components(image)
        filled = [comp == k for k in range(1, n + 1) if ndimage.binary_fill_holes(comp == k).sum() == (comp == k).sum()]
        assert n == 2 and len(filled) == 1  # the disc has no hole; the hollow square distractor has one
        rows, cols = np.nonzero(filled[0])
        assert int(rows.mean() // 16) * 4 + int(cols.mean() // 16) == label


# ------------------------------------------------------------------------------------------------------------
# Decoding image modes
# ------------------------------------------------------------------------------------------------------------


def test_sixteen_bit_and_other_modes_convert_properly() -> None:
    ramp = np.array([[0, 1000, 32768, 65535]], dtype=np.uint16)
    expected = ramp / 65535.0
    for img in (Image.fromarray(ramp), Image.fromarray(ramp.astype(np.int32))):  # I;16 and I
        assert img.mode in ("I;16", "I")
        out = image_to_array(img)
        assert out.shape == (1, 4, 3)
        np.testing.assert_allclose(out[..., 0], expected, atol=1e-6)  # 1000 -> 0.015, not clipped to 1
        np.testing.assert_array_equal(out[..., 0], out[..., 2])
    rgba = np.zeros((1, 2, 4), dtype=np.uint8)
    rgba[0, 0] = (255, 0, 0, 255)  # opaque red stays red; fully transparent shows the white background
    np.testing.assert_allclose(image_to_array(Image.fromarray(rgba, "RGBA"))[0], [[1, 0, 0], [1, 1, 1]])
    palette = Image.new("P", (2, 1))
    palette.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    palette.putpixel((1, 0), 1)
    np.testing.assert_allclose(image_to_array(palette)[0], [[0, 0, 0], [0, 1, 0]])


# ------------------------------------------------------------------------------------------------------------
# The user's folders
# ------------------------------------------------------------------------------------------------------------


def _save_png(path: Path, mode: str, value: float) -> None:
    """A 12x12 PNG of one mode at grey level value in [0, 1] (left half) and black (right half)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.zeros((12, 12))
    pixels[:, :6] = value
    if mode == "I;16":
        Image.fromarray((pixels * 65535).round().astype(np.uint16)).save(path)
        return
    grey = Image.fromarray((pixels * 255).round().astype(np.uint8))
    (grey.convert(mode, palette=Image.Palette.ADAPTIVE) if mode == "P" else grey.convert(mode)).save(path)


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """data/pets/{cats,dogs}: 8 good PNGs each in modes L, RGB, RGBA, P, I;16, and some bad files."""
    folder = tmp_path / "data" / "pets"
    modes = ["L", "RGB", "RGBA", "P", "I;16", "L", "RGB", "I;16"]
    for label, cls in enumerate(["cats", "dogs"]):
        for i, mode in enumerate(modes):
            _save_png(folder / cls / f"{i}_{mode.replace(';', '')}.png", mode, 0.25 + 0.5 * label)
    good = (folder / "cats" / "0_L.png").read_bytes()
    (folder / "cats" / "corrupt.png").write_bytes(good[:40] + b"\x00garbage" * 10)
    (folder / "dogs" / "empty.png").write_bytes(b"")
    (folder / "dogs" / "notes.txt").write_text("not an image")
    (folder / "dogs" / ".DS_Store").write_bytes(b"\x00\x01")  # hidden: ignored silently
    return folder


def _folder_spec(folder: Path, **kw: Any) -> DataSpec:
    return DataSpec(name=f"folder:{folder}", img_size=12, normalization="none", val_fraction=0.25, **kw)


def test_folder_loads_good_images_and_reports_bad_ones(image_folder: Path) -> None:
    bundle = load_data(_folder_spec(image_folder), data_root=image_folder.parent)
    assert bundle.classes == ["cats", "dogs"]
    assert len(bundle.train) + len(bundle.val) + len(bundle.test) == 16
    reasons = dict(bundle.skipped)
    assert set(reasons) == {"cats/corrupt.png", "dogs/empty.png", "dogs/notes.txt"}
    assert "empty file" in reasons["dogs/empty.png"]
    assert "not an image file" in reasons["dogs/notes.txt"]
    assert "unreadable" in reasons["cats/corrupt.png"] or "not a readable image" in reasons["cats/corrupt.png"]
    for split in (bundle.train, bundle.val, bundle.test):
        for i in range(len(split)):
            image, label = split[i]
            # Every mode, the 16-bit ones included, gives the grey level it was saved with, in all channels.
            torch.testing.assert_close(image[:, :, :5], torch.full((3, 12, 5), 0.25 + 0.5 * label), atol=0.01, rtol=0)
            assert image[:, :, 7:].max() < 0.01


def test_folder_refuses_bad_files_when_asked(image_folder: Path) -> None:
    with pytest.raises(ValueError, match="3 bad file") as info:
        load_data(_folder_spec(image_folder, on_bad_file="error"), data_root=image_folder.parent)
    for name in ("cats/corrupt.png", "dogs/empty.png", "dogs/notes.txt"):
        assert name in str(info.value)


def test_large_folder_splits_load_lazily_with_the_same_values(
    image_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    eager = load_data(_folder_spec(image_folder), data_root=image_folder.parent)
    monkeypatch.setattr(folders, "MATERIALISE_BYTES", 0)
    lazy = load_data(_folder_spec(image_folder), data_root=image_folder.parent)
    assert isinstance(eager.train, TensorImageDataset) and isinstance(lazy.train, FileImageDataset)
    assert eager.train.files == lazy.train.files
    torch.testing.assert_close(_stack(lazy.train), _stack(eager.train), atol=0.5 / 255 + 1e-6, rtol=0)
    lazy.train.paths[0].unlink()
    with pytest.raises(RuntimeError, match=lazy.train.paths[0].name):
        lazy.train[0]


def test_augment_mirrors_only_the_training_split(image_folder: Path) -> None:
    bundle = load_data(_folder_spec(image_folder, augment=True), data_root=image_folder.parent)
    assert bundle.train.flip and not bundle.val.flip and not bundle.test.flip
    torch.manual_seed(0)
    left_bright = [bool(bundle.train[0][0][0, 0, 0] > 0.1) for _ in range(20)]
    assert any(left_bright) and not all(left_bright)
    assert all(bundle.test[0][0][0, 0, 0] > 0.1 for _ in range(5))


def test_loader_batches_and_seeded_order(image_folder: Path) -> None:
    bundle = load_data(_folder_spec(image_folder), data_root=image_folder.parent)
    images, labels = next(iter(make_loader(bundle.train, batch_size=4)))
    assert images.shape == (4, 3, 12, 12) and labels.dtype == torch.int64
    items = torch.utils.data.TensorDataset(torch.arange(30))

    def order(seed: int) -> list[int]:
        return torch.cat([b[0] for b in make_loader(items, batch_size=7, shuffle=True, seed=seed)]).tolist()

    assert order(1) == order(1) != order(2)
    assert sorted(order(1)) == list(range(30))
    assert torch.cat([b[0] for b in make_loader(items, batch_size=7)]).tolist() == list(range(30))


def test_batched_fetch_equals_item_by_item() -> None:
    bundle = load_data(DataSpec(name="lfw-faces", img_size=16, n_train=24))
    images, labels = next(iter(make_loader(bundle.train, batch_size=24)))  # goes through __getitems__
    torch.testing.assert_close(images, _stack(bundle.train))
    assert labels.tolist() == bundle.train.labels.tolist()
    flipping = load_data(DataSpec(name="lfw-faces", img_size=16, n_train=24, augment=True))
    torch.manual_seed(0)
    assert isinstance(flipping.train, TensorImageDataset)
    mirrored = torch.stack([x for x, _ in flipping.train.__getitems__(list(range(24)))])
    same = [torch.equal(m, x) for m, x in zip(mirrored, images, strict=True)]
    flipped = [torch.equal(m, x.flip(-1)) for m, x in zip(mirrored, images, strict=True)]
    assert all(a or b for a, b in zip(same, flipped, strict=True)) and any(flipped) and any(same)


def test_folder_with_one_class_is_refused(tmp_path: Path) -> None:
    for i in range(6):
        _save_png(tmp_path / "one" / "only" / f"{i}.png", "L", 0.5)
    (tmp_path / "one" / "empty_class").mkdir()
    with pytest.raises(ValueError, match=r"has 1 class folder.*\(only\).*at least two classes"):
        load_data(_folder_spec(tmp_path / "one"), data_root=tmp_path)


def test_class_folder_whose_every_file_is_refused_is_left_out(image_folder: Path) -> None:
    birds = image_folder / "birds"
    birds.mkdir()
    (birds / "empty.png").write_bytes(b"")
    (birds / "fake.jpg").write_text("not a jpeg")
    bundle = load_data(_folder_spec(image_folder), data_root=image_folder.parent)
    assert bundle.classes == ["cats", "dogs"]
    for split in (bundle.train, bundle.val, bundle.test):
        assert split.labels.min() >= 0 and split.labels.max() <= 1
        for i in range(len(split)):  # the labels still name the right class: cats 0.25 grey, dogs 0.75
            image, label = split[i]
            assert abs(float(image[0, 0, 0]) - (0.25 + 0.5 * label)) < 0.01
    reasons = dict(bundle.skipped)
    assert reasons["birds/"] == "class left out: all 2 of its files chosen for the splits were refused"
    assert "empty file" in reasons["birds/empty.png"] and "not a readable image" in reasons["birds/fake.jpg"]
    assert bundle.summary()["num_classes"] == 2


def test_folder_left_with_one_readable_class_is_refused(tmp_path: Path) -> None:
    for i in range(6):
        _save_png(tmp_path / "pets" / "cats" / f"{i}.png", "L", 0.5)
        (tmp_path / "pets" / "dogs").mkdir(parents=True, exist_ok=True)
        (tmp_path / "pets" / "dogs" / f"{i}.png").write_bytes(b"")
    with pytest.raises(ValueError, match=r"every file of the class folder\(s\) dogs in .* was refused") as info:
        load_data(_folder_spec(tmp_path / "pets"), data_root=tmp_path)
    message = str(info.value)
    assert "leaves 1 class(es) with readable images (cats)" in message and "Fix or replace those files" in message
    assert len(re.findall(r"dogs/\d\.png: empty file \(0 bytes\)", message)) == 3 and message.endswith("; ...)")


def test_paths_outside_the_data_root_are_refused(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    for cls in ("a", "b"):
        for i in range(4):
            _save_png(outside / cls / f"{i}.png", "L", 0.5)
            _save_png(root / "inside" / cls / f"{i}.png", "L", 0.5)
    (root / "link").symlink_to(outside, target_is_directory=True)
    for path in (outside, root / "inside" / ".." / ".." / "outside", root / "link"):
        with pytest.raises(ValueError, match="outside the allowed data root"):
            load_data(_folder_spec(path), data_root=root)
    assert len(load_data(_folder_spec(Path("inside")), data_root=root).classes) == 2  # relative to the root
    with pytest.raises(ValueError, match="not an existing folder"):
        load_data(_folder_spec(root / "nowhere"), data_root=root)


def test_linked_folders_are_followed_inside_the_root_only(tmp_path: Path) -> None:
    root = tmp_path / "root"
    for cls in ("a", "b"):
        for i in range(4):
            _save_png(root / "pets" / cls / f"{i}.png", "L", 0.5)
            _save_png(root / "more" / cls / f"{i}.png", "L", 0.5)
    (root / "pets" / "a" / "more_a").symlink_to(root / "more" / "a", target_is_directory=True)
    bundle = load_data(_folder_spec(root / "pets"), data_root=root)
    assert len(bundle.train) + len(bundle.val) + len(bundle.test) == 12
    assert np.bincount(np.concatenate([s.labels for s in (bundle.train, bundle.val, bundle.test)])).tolist() == [8, 4]
    (root / "pets" / "b" / "again").symlink_to(root / "more" / "a", target_is_directory=True)
    with pytest.raises(ValueError, match=r"b/again in .* is the same folder as a/more_a"):
        load_data(_folder_spec(root / "pets"), data_root=root)
    (root / "pets" / "b" / "again").unlink()
    (root / "pets" / "b" / "loop").symlink_to(root / "pets" / "b", target_is_directory=True)
    with pytest.raises(ValueError, match=r"b/loop in .* is the same folder as b \(through a symbolic link"):
        load_data(_folder_spec(root / "pets"), data_root=root)
    (root / "pets" / "b" / "loop").unlink()
    (root / "pets" / "b" / "away").symlink_to(tmp_path, target_is_directory=True)
    with pytest.raises(ValueError, match=r"b/away in .* links to .*, outside the data root"):
        load_data(_folder_spec(root / "pets"), data_root=root)


# ------------------------------------------------------------------------------------------------------------
# VTAB-1k task folders
# ------------------------------------------------------------------------------------------------------------


@pytest.fixture
def vtab_folder(tmp_path: Path) -> Path:
    """A VTAB-style task: images/<i>.png with grey level by class, lists of 9 / 3 / 12 / 6 lines, 3 classes."""
    folder = tmp_path / "vtab" / "task"
    for i in range(18):
        _save_png(folder / "images" / f"{i}.png", "RGB", [0.1, 0.5, 0.9][i % 3])
    lines = [f"images/{i}.png {i % 3}" for i in range(18)]
    (folder / "train800.txt").write_text("\n".join(lines[:9]) + "\n")
    (folder / "val200.txt").write_text("\n".join(lines[9:12]) + "\n\n")
    (folder / "train800val200.txt").write_text("\n".join(lines[:12]))
    (folder / "test.txt").write_text("\n".join(lines[12:] + ["images/missing.png 1", "../../../x.png 0"]))
    return folder


def _vtab_spec(folder: Path, **kw: Any) -> DataSpec:
    return DataSpec(name=f"vtab:{folder}", img_size=8, normalization="none", **kw)


def test_vtab_lists_give_the_splits(vtab_folder: Path) -> None:
    root = vtab_folder.parent
    bundle = load_data(_vtab_spec(vtab_folder), data_root=root)
    assert [len(bundle.train), len(bundle.val), len(bundle.test)] == [9, 3, 6]
    assert bundle.classes == ["0", "1", "2"]
    assert bundle.train.files is not None and bundle.train.files[4].name == "4.png"
    for i in range(len(bundle.train)):
        image, label = bundle.train[i]
        assert label == i % 3 and abs(float(image[0, 0, 0]) - [0.1, 0.5, 0.9][label]) < 0.01
    reasons = dict(bundle.skipped)
    assert reasons["images/missing.png"] == "file not found"
    assert "outside the data root" in reasons["../../../x.png"]
    (vtab_folder / "test.txt").write_text("\n".join(f"images/{i}.png {i % 3}" for i in range(12, 18)))
    final = load_data(_vtab_spec(vtab_folder, vtab_final=True, n_test=3), data_root=root)
    assert [len(final.train), len(final.test)] == [12, 3]
    assert np.bincount(final.test.labels).tolist() == [1, 1, 1]


def test_vtab_missing_lists_and_bad_labels_are_named(vtab_folder: Path) -> None:
    root = vtab_folder.parent
    (vtab_folder / "test.txt").unlink()
    with pytest.raises(ValueError, match=r"missing test\.txt.*train800\.txt, val200\.txt"):
        load_data(_vtab_spec(vtab_folder), data_root=root)
    (vtab_folder / "test.txt").write_text("images/0.png 0\n")
    (vtab_folder / "val200.txt").write_text("images/0.png 0\nimages/1.png cat\n")
    with pytest.raises(ValueError, match=r"val200\.txt line 2 .*'cat' is not an integer"):
        load_data(_vtab_spec(vtab_folder), data_root=root)
    (vtab_folder / "val200.txt").write_text("")
    with pytest.raises(ValueError, match=r"val200\.txt .* lists no images.*val split would be empty"):
        load_data(_vtab_spec(vtab_folder), data_root=root)
    (vtab_folder / "val200.txt").write_text("images/missing.png 0\n")
    with pytest.raises(ValueError, match=r"the val split of .* is empty: all 1 file\(s\) chosen for it"):
        load_data(_vtab_spec(vtab_folder), data_root=root)
    (vtab_folder / "val200.txt").write_text("images/0.png 0\n")
    (vtab_folder / "train800.txt").write_text("images/0.png 0\nimages/3.png 0\n")
    with pytest.raises(ValueError, match="fewer than two classes"):
        load_data(_vtab_spec(vtab_folder), data_root=root)


def test_skipped_report_counts_every_file_and_names_the_first(image_folder: Path) -> None:
    bundle = load_data(_folder_spec(image_folder), data_root=image_folder.parent)
    report = bundle.skipped_report()
    assert report["count"] == 3 and [path for path, _ in report["first"]] == [path for path, _ in bundle.skipped]
    short = bundle.skipped_report(limit=1)
    assert short == {"count": 3, "first": [list(bundle.skipped[0])]}
    assert load_data(DataSpec(name="digits", **SMALL)).skipped_report() == {"count": 0, "first": []}


def test_check_data_looks_at_the_folder_only(tmp_path: Path, vtab_folder: Path) -> None:
    root = tmp_path
    (root / "pets").mkdir()
    (root / "a_file").write_text("x")
    assert check_data(DataSpec(name="digits")) is None
    assert check_data(_folder_spec(root / "pets"), data_root=root) == ((root / "pets").resolve(), root.resolve())
    assert check_data(_folder_spec(Path("pets")), data_root=root)[0] == (root / "pets").resolve()  # relative
    with pytest.raises(ValueError, match=r"not an existing folder \(nothing is there\)"):
        check_data(_folder_spec(root / "nowhere"), data_root=root)
    with pytest.raises(ValueError, match=r"not an existing folder \(a file\)"):
        check_data(_folder_spec(root / "a_file"), data_root=root)
    with pytest.raises(ValueError, match="outside the allowed data root"):
        check_data(_folder_spec(Path("/")), data_root=root)
    (vtab_folder / "val200.txt").unlink()
    with pytest.raises(ValueError, match=r"missing val200\.txt"):
        check_data(_vtab_spec(vtab_folder), data_root=root)
