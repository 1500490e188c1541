"""core.data.uploads: zip archives unpacked inside the data root, within limits, or refused with nothing left behind."""

from __future__ import annotations

import io
import stat
import struct
import zipfile
import zlib
from pathlib import Path

import pytest
from PIL import Image

from core.data import DataSpec, load_data
from core.data.uploads import UploadLimits, list_uploads, suggested_name, unpack_upload, uploads_folder


def _png(value: int = 100, size: tuple[int, int] = (8, 8)) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", size, value).save(buffer, format="PNG")
    return buffer.getvalue()


def _zip(entries: dict[str, bytes], infos: list[tuple[zipfile.ZipInfo, bytes]] = ()) -> io.BytesIO:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
        for info, data in infos:
            archive.writestr(info, data)
    buffer.seek(0)
    return buffer


def _classes(top: str = "", n: int = 4) -> dict[str, bytes]:
    return {
        f"{top}{cls}/{i}.png": _png(40 + 150 * label) for label, cls in enumerate(("cats", "dogs")) for i in range(n)
    }


def _left_behind(root: Path) -> list[str]:
    """Everything under the data root (the uploads folder itself aside)."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p != uploads_folder(root))


# ----------------------------------------------------------------------------------------------------------------
# What is accepted
# ----------------------------------------------------------------------------------------------------------------
def test_class_folders_unpack_as_a_named_dataset_that_loads(tmp_path: Path) -> None:
    junk = {"pets/.DS_Store": b"\x00", "__MACOSX/pets/._cats": b"\x00", "pets/cats/._0.png": b"\x00"}
    upload = unpack_upload(_zip({**_classes("pets/"), **junk}), "my-pets", data_root=tmp_path)
    assert upload.dataset == "folder:uploads/my-pets" and upload.path == tmp_path / "uploads" / "my-pets"
    assert upload.files == 8 and upload.bytes == sum(len(v) for v in _classes().values())
    assert sorted(p.name for p in upload.path.iterdir()) == ["cats", "dogs"]  # the wrapping folder and junk gone
    assert list_uploads(tmp_path) == ["folder:uploads/my-pets"]
    bundle = load_data(DataSpec(name=upload.dataset, img_size=8, val_fraction=0.25), data_root=tmp_path)
    assert bundle.classes == ["cats", "dogs"] and bundle.skipped == []


def test_a_vtab_task_folder_unpacks_as_a_vtab_dataset(tmp_path: Path) -> None:
    entries = {f"images/{i}.png": _png(40 + 150 * (i % 2)) for i in range(8)}
    for listing, rows in {"train800.txt": range(4), "val200.txt": range(4, 6), "test.txt": range(6, 8)}.items():
        entries[listing] = "\n".join(f"images/{i}.png {i % 2}" for i in rows).encode()
    upload = unpack_upload(_zip(entries), "task", data_root=tmp_path)
    assert upload.dataset == "vtab:uploads/task" and list_uploads(tmp_path) == ["vtab:uploads/task"]
    assert len(load_data(DataSpec(name=upload.dataset, img_size=8), data_root=tmp_path).train) == 4


def test_limits_come_from_the_environment() -> None:
    assert UploadLimits.from_env({}) == UploadLimits()
    limits = UploadLimits.from_env({"PETLAB_UPLOAD_MAX_MB": "5", "PETLAB_UPLOAD_MAX_FILES": "10"})
    assert (limits.archive_bytes, limits.files, limits.image_pixels) == (5 * 2**20, 10, UploadLimits().image_pixels)
    with pytest.raises(ValueError, match="PETLAB_UPLOAD_MAX_PIXELS='-3'"):
        UploadLimits.from_env({"PETLAB_UPLOAD_MAX_PIXELS": "-3"})
    with pytest.raises(ValueError, match="positive int"):
        UploadLimits(files=0)


# ----------------------------------------------------------------------------------------------------------------
# What is refused, with nothing left behind
# ----------------------------------------------------------------------------------------------------------------
def _symlink(name: str, target: str) -> tuple[zipfile.ZipInfo, bytes]:
    info = zipfile.ZipInfo(name)
    info.create_system = 3  # Unix
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info, target.encode()


def _fifo(name: str) -> tuple[zipfile.ZipInfo, bytes]:
    info = zipfile.ZipInfo(name)
    info.create_system = 3
    info.external_attr = (stat.S_IFIFO | 0o644) << 16
    return info, b""


def _huge_png_header(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares width x height pixels (a decompression bomb for a decoder)."""
    real = _png(0, (1, 1))
    ihdr = struct.pack(">II", width, height) + real[24:29]
    chunk = b"IHDR" + ihdr
    return real[:8] + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk)) + real[33:]


REFUSED = {
    "zip slip": ({**_classes(), "../../evil.png": _png()}, [], "climbs out of its folder"),
    "zip slip inside": ({**_classes(), "cats/../../evil.png": _png()}, [], "climbs out of its folder"),
    "absolute": ({**_classes(), "/tmp/evil.png": _png()}, [], "absolute path"),
    "drive letter": ({**_classes(), "C:/evil.png": _png()}, [], "absolute path"),
    "backslash": ({**_classes(), "cats\\..\\..\\evil.png": _png()}, [], "backslash"),
    "symlink": (_classes(), [_symlink("cats/passwd.png", "/etc/passwd")], "symbolic link"),
    "symlink to a folder": (_classes(), [_symlink("birds", "/")], "symbolic link"),
    "fifo": (_classes(), [_fifo("cats/pipe.png")], "not a regular file"),
    "large image": ({**_classes(), "cats/big.png": _huge_png_header(20_000, 3_000)}, [], "20000 x 3000 pixels"),
    "pixel bomb": ({**_classes(), "cats/bomb.png": _huge_png_header(30_000, 30_000)}, [], "bomb.png declares more"),
    "one class": ({f"cats/{i}.png": _png() for i in range(3)}, [], "at least two"),
    "nothing": ({}, [], "holds no dataset"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_unsafe_archives_are_refused(case: str, tmp_path: Path) -> None:
    entries, infos, message = REFUSED[case]
    with pytest.raises(ValueError, match=message):
        unpack_upload(_zip(entries, infos), "pets", data_root=tmp_path / "root")
    assert _left_behind(tmp_path / "root") == [] and sorted(p.name for p in tmp_path.iterdir()) == ["root"]


def test_an_image_over_the_pixel_limit_is_refused(tmp_path: Path) -> None:
    archive = _zip({**_classes(), "dogs/big.png": _png(size=(50, 40))})
    with pytest.raises(ValueError, match=r"dogs/big\.png declares 50 x 40 pixels"):
        unpack_upload(archive, "pets", data_root=tmp_path, limits=UploadLimits(image_pixels=1999))
    assert _left_behind(tmp_path) == []
    assert unpack_upload(archive, "pets", data_root=tmp_path, limits=UploadLimits(image_pixels=2000)).files == 9


def test_size_and_count_limits(tmp_path: Path) -> None:
    bomb = _zip({**_classes(), "cats/zeros.png": bytes(3 * 2**20)})  # 3 MB of zeros deflate to a few kB
    assert len(bomb.getvalue()) < 2**20 // 8
    with pytest.raises(ValueError, match=r"unpacks to 3\.0 MB"):
        unpack_upload(bomb, "pets", data_root=tmp_path, limits=UploadLimits(unpacked_bytes=2**20))
    with pytest.raises(ValueError, match=r"the archive is 0\.0 MB"):
        unpack_upload(_zip(_classes()), "pets", data_root=tmp_path, limits=UploadLimits(archive_bytes=100))
    with pytest.raises(ValueError, match="lists 8 entries"):
        unpack_upload(_zip(_classes()), "pets", data_root=tmp_path, limits=UploadLimits(files=7))
    assert _left_behind(tmp_path) == []
    first = unpack_upload(_zip(_classes()), "first", data_root=tmp_path, limits=UploadLimits(files=8))
    together = UploadLimits(total_bytes=first.bytes + first.bytes // 2)
    with pytest.raises(ValueError, match="delete some before uploading more"):
        unpack_upload(_zip(_classes()), "second", data_root=tmp_path, limits=together)
    assert list_uploads(tmp_path) == ["folder:uploads/first"]


def test_an_entry_that_unpacks_to_more_than_it_declares_is_cut_short(tmp_path: Path) -> None:
    buffer = _zip({**_classes(), "cats/zeros.png": bytes(2**20)})
    data = bytearray(buffer.getvalue())
    for signature, size_at in ((b"PK\x01\x02", 24), (b"PK\x03\x04", 22)):  # both headers of the last entry
        start = data.rfind(signature)
        struct.pack_into("<I", data, start + size_at, 1000)  # declares 1000 bytes
    with pytest.raises(ValueError, match="cannot be unpacked|more than it declares"):
        unpack_upload(io.BytesIO(bytes(data)), "pets", data_root=tmp_path, limits=UploadLimits())
    assert _left_behind(tmp_path) == []


def test_names_and_non_zip_files_are_refused(tmp_path: Path) -> None:
    for bad in ("", "../x", "a/b", ".hidden", "x" * 65, "spaced name"):
        with pytest.raises(ValueError, match="dataset name"):
            unpack_upload(_zip(_classes()), bad, data_root=tmp_path)
    with pytest.raises(ValueError, match="not a zip archive"):
        unpack_upload(io.BytesIO(b"PK\x03\x04 but not really a zip" * 10), "pets", data_root=tmp_path)
    unpack_upload(_zip(_classes()), "pets", data_root=tmp_path)
    with pytest.raises(ValueError, match="exists already"):
        unpack_upload(_zip(_classes()), "pets", data_root=tmp_path)
    path = tmp_path / "archive.zip"
    path.write_bytes(_zip(_classes()).getvalue())
    assert unpack_upload(path, "from-a-path", data_root=tmp_path).files == 8


def test_suggested_names_are_accepted_names(tmp_path: Path) -> None:
    assert suggested_name("My Pets (2024).zip") == "My-Pets-2024-"
    assert suggested_name("C:\\Users\\me\\.hidden set.zip") == "hidden-set"
    assert suggested_name("...zip") == "upload"
    name = suggested_name("My Pets (2024).zip")
    assert unpack_upload(_zip(_classes()), name, data_root=tmp_path).dataset == f"folder:uploads/{name}"
