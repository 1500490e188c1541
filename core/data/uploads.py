"""Users' own images, uploaded as one zip archive and unpacked inside the data root as a dataset they name.

An archive holds one folder per class (``cats/1.jpg``, ``dogs/2.png``; wrapped in one top folder or not), or a VTAB-1k
task folder (its ``.txt`` lists beside the images). `unpack_upload` puts it in ``<data root>/uploads/<name>``, and
the dataset is then ``folder:uploads/<name>`` (or ``vtab:uploads/<name>``), listed by `list_uploads`.

An upload may come from anyone who can reach the app, so the archive is checked before and while it is unpacked,
against `UploadLimits` (settings with safe defaults, read from environment variables by `UploadLimits.from_env`):

- sizes: the archive, the entries its end record declares (before zipfile reads the central directory, whose
  entries each take memory), the unpacked bytes (declared sizes first, then the bytes actually written, since an
  entry may lie about its size), the number of files, and all uploads together;
- names: absolute paths, drive letters, ``..`` parts, backslashes and NUL characters are refused, so nothing is
  written outside the upload's folder (zip slip);
- entries: links (a zip stores a symlink as an entry whose Unix mode, in ``external_attr``, says so), device files,
  pipes and encrypted entries are refused; macOS's ``__MACOSX`` folder and hidden files are left out;
- images: every image file's header is read and one with more than ``image_pixels`` pixels refuses the upload
  (a small file can declare a huge image: a decompression bomb). Unreadable images are left for the training's
  bad-file report, like those of any folder dataset.

Anything refused raises ValueError saying what to fix, and leaves nothing behind.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import stat
import warnings
import zipfile
from dataclasses import dataclass, fields
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from PIL import Image

from core.data.folders import IMAGE_EXTENSIONS, VTAB_LISTS
from core.data.spec import default_data_root

UPLOADS_DIR = "uploads"
"""The folder of the data root that holds the uploads, one folder per dataset."""
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_MB = 2**20
_CHUNK = _MB
_IGNORED_TOP = "__MACOSX"
_DIRECTORY_BYTES_PER_ENTRY = 512
"""Central directory bytes allowed per permitted entry (46 fixed bytes, the name, extra fields): zipfile reads the
whole directory, each entry into an object, so its size bounds the memory an archive can make the server spend."""
LIMIT_VARIABLES = {
    "archive_bytes": ("PETLAB_UPLOAD_MAX_MB", _MB),
    "unpacked_bytes": ("PETLAB_UPLOAD_MAX_UNPACKED_MB", _MB),
    "files": ("PETLAB_UPLOAD_MAX_FILES", 1),
    "image_pixels": ("PETLAB_UPLOAD_MAX_PIXELS", 1),
    "total_bytes": ("PETLAB_UPLOADS_MAX_TOTAL_MB", _MB),
}
"""Each `UploadLimits` field's environment variable and the unit it is given in."""


@dataclass(frozen=True)
class UploadLimits:
    """What one upload may hold. Each field is also an environment variable (`from_env`); Streamlit's own
    ``server.maxUploadSize`` (in ``.streamlit/config.toml``, in MB) must allow ``archive_bytes`` too.

    Attributes:
        archive_bytes: The zip file itself (``PETLAB_UPLOAD_MAX_MB``, in MB).
        unpacked_bytes: Every file unpacked (``PETLAB_UPLOAD_MAX_UNPACKED_MB``, in MB).
        files: Files and folders in the archive (``PETLAB_UPLOAD_MAX_FILES``).
        image_pixels: Width x height of any one image (``PETLAB_UPLOAD_MAX_PIXELS``).
        total_bytes: All uploads together, this one included (``PETLAB_UPLOADS_MAX_TOTAL_MB``, in MB).
    """

    archive_bytes: int = 200 * _MB
    unpacked_bytes: int = 1024 * _MB
    files: int = 20_000
    image_pixels: int = 40_000_000
    total_bytes: int = 10 * 1024 * _MB

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"upload limit {f.name} must be a positive int, got {value!r}")

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> UploadLimits:
        """The defaults, with each limit whose environment variable is set replaced by it.

        Raises:
            ValueError: a variable that is not a positive integer, naming it.
        """
        environ = dict(os.environ if environ is None else environ)
        values = {}
        for name, (variable, unit) in LIMIT_VARIABLES.items():
            text = environ.get(variable, "").strip()
            if not text:
                continue
            if not text.isdigit() or int(text) < 1:
                raise ValueError(f"{variable}={text!r}: give a positive whole number")
            values[name] = int(text) * unit
        return cls(**values)

    def describe(self) -> str:
        """The limits in one line, for the page that takes uploads."""
        return (
            f"at most {self.archive_bytes / _MB:g} MB zipped, {self.unpacked_bytes / _MB:g} MB unpacked, "
            f"{self.files:,} files, {self.image_pixels / 1e6:g} megapixels per image"
        )


@dataclass(frozen=True)
class Upload:
    """An unpacked upload.

    Attributes:
        dataset: Its `DataSpec` name: ``folder:uploads/<name>`` or ``vtab:uploads/<name>``.
        path: Its folder.
        files: Files unpacked.
        bytes: Bytes unpacked.
    """

    dataset: str
    path: Path
    files: int
    bytes: int


def suggested_name(filename: str) -> str:
    """A dataset name for an uploaded file: its stem with other characters than `NAME_PATTERN` allows as ``-``."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", PurePosixPath(filename.replace("\\", "/")).stem)
    return stem.lstrip("._-")[:64] or "upload"


def uploads_folder(data_root: Path | str | None = None) -> Path:
    """``<data root>/uploads`` (the data root defaults to `default_data_root`)."""
    return Path(data_root if data_root is not None else default_data_root()).expanduser() / UPLOADS_DIR


def list_uploads(data_root: Path | str | None = None) -> list[str]:
    """The `DataSpec` names of the uploaded datasets, by name."""
    folder = uploads_folder(data_root)
    if not folder.is_dir():
        return []
    return [
        _dataset_name(entry)
        for entry in sorted(folder.iterdir())
        if entry.is_dir() and not entry.is_symlink() and NAME_PATTERN.fullmatch(entry.name)
    ]


def unpack_upload(
    archive: BinaryIO | Path | str,
    name: str,
    data_root: Path | str | None = None,
    limits: UploadLimits | None = None,
) -> Upload:
    """Check a zip archive and unpack it as the dataset ``name`` under ``<data root>/uploads``.

    Args:
        archive: The zip, as a path or a binary file object that can seek (Streamlit's uploaded file is one).
        name: The dataset's name: letters, digits, ``.``, ``_`` and ``-``, at most 64, starting with a letter or
            digit; it must not be taken.
        data_root: Where uploads go (default `default_data_root`).
        limits: Default `UploadLimits.from_env`.

    Raises:
        ValueError: A bad or taken name, or an archive that is not a zip, is too large, unpacks too large, holds
            too many files, an unsafe entry or an image over the pixel limit, or no dataset layout; nothing is kept.
    """
    limits = limits if limits is not None else UploadLimits.from_env()
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise ValueError(
            f"dataset name {name!r}: use 1 to 64 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    uploads = uploads_folder(data_root)
    target = uploads / name
    if target.exists() or target.is_symlink():
        raise ValueError(f"an upload named {name!r} exists already ({target}); choose another name")
    stream = open(archive, "rb") if isinstance(archive, (str, Path)) else archive  # noqa: SIM115 - closed below
    try:
        size = stream.seek(0, os.SEEK_END)
        if size > limits.archive_bytes:
            raise ValueError(f"the archive is {size / _MB:.1f} MB; uploads may be at most {limits.describe()}")
        stream.seek(0)
        uploads.mkdir(parents=True, exist_ok=True)
        staging = uploads / f".incoming-{secrets.token_hex(6)}"  # hidden: never listed as a dataset
        staging.mkdir()
        try:
            files, written = _unpack(stream, staging, limits, _bytes_below(uploads))
            dataset = _dataset_folder(staging)
            _check_pixels(dataset, limits)
            dataset.rename(target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    finally:
        if stream is not archive:
            stream.close()
    return Upload(dataset=_dataset_name(target), path=target, files=files, bytes=written)


def _unpack(stream: BinaryIO, folder: Path, limits: UploadLimits, already: int) -> tuple[int, int]:
    """Unpack the archive's safe entries into folder; returns (files, bytes). ``already``: bytes of other uploads."""
    try:
        end = zipfile._EndRecData(stream)  # noqa: SLF001 - the end record, read before the central directory
        if end is None:
            raise zipfile.BadZipFile
        declared = end[zipfile._ECD_ENTRIES_TOTAL]  # noqa: SLF001
        directory_bytes = end[zipfile._ECD_SIZE]  # noqa: SLF001
        if declared > limits.files or directory_bytes > limits.files * _DIRECTORY_BYTES_PER_ENTRY:
            raise ValueError(f"the archive lists {declared:,} entries; uploads may hold {limits.describe()}")
        stream.seek(0)
        archive = zipfile.ZipFile(stream)
    except zipfile.BadZipFile:
        raise ValueError("the file is not a zip archive (or a damaged one); upload a .zip") from None
    with archive:
        listed = archive.infolist()
        if len(listed) > limits.files:  # the end record's count can lie
            raise ValueError(f"the archive holds {len(listed):,} entries; uploads may hold {limits.describe()}")
        entries = [info for info in listed if _wanted(_checked_name(info))]
        for info in entries:
            _check_entry(info)
        declared_bytes = sum(info.file_size for info in entries)
        if declared_bytes > limits.unpacked_bytes:
            raise ValueError(
                f"the archive unpacks to {declared_bytes / _MB:.1f} MB; uploads may be {limits.describe()}"
            )
        budget = min(limits.unpacked_bytes, limits.total_bytes - already)
        if declared_bytes > budget:
            raise ValueError(
                f"the uploads already take {already / _MB:.1f} MB of the {limits.total_bytes / _MB:g} MB they may "
                "take together; delete some before uploading more"
            )
        written = files = 0
        for info in entries:
            path = folder / info.filename
            if info.is_dir():
                path.mkdir(parents=True, exist_ok=True)
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                with archive.open(info) as source, open(path, "xb") as sink:
                    while chunk := source.read(_CHUNK):
                        written += len(chunk)
                        if written > budget:  # an entry that declared less than it holds
                            raise ValueError(
                                f"the archive unpacks to more than {budget / _MB:.1f} MB, more than it declares; "
                                f"uploads may be {limits.describe()}"
                            )
                        sink.write(chunk)
            except FileExistsError:
                raise ValueError(f"the archive holds {info.filename!r} twice") from None
            except (zipfile.BadZipFile, EOFError, OSError, NotImplementedError) as exc:
                raise ValueError(f"{info.filename} in the archive cannot be unpacked: {exc}") from None
            files += 1
    return files, written


def _checked_name(info: zipfile.ZipInfo) -> PurePosixPath:
    """The entry's path inside the upload; ValueError for a name that could point anywhere else."""
    name = info.filename
    path = PurePosixPath(name)
    if "\\" in name or "\x00" in name:
        raise ValueError(f"the archive entry {name!r} has a backslash or NUL character in its name; zip it again")
    if path.is_absolute() or re.match(r"[A-Za-z]:", name):
        raise ValueError(f"the archive entry {name!r} is an absolute path; archives must hold relative paths")
    if ".." in path.parts:
        raise ValueError(f"the archive entry {name!r} climbs out of its folder ('..'); zip the folder itself")
    return path


def _wanted(path: PurePosixPath) -> bool:
    """Whether an entry is kept: not macOS's resource folder, not hidden."""
    return bool(path.parts) and path.parts[0] != _IGNORED_TOP and not any(p.startswith(".") for p in path.parts)


def _check_entry(info: zipfile.ZipInfo) -> None:
    """Refuse links, device files, pipes and encrypted entries."""
    mode = info.external_attr >> 16  # the Unix mode, where the zip was made on a Unix system (0 otherwise)
    if stat.S_ISLNK(mode):
        raise ValueError(f"the archive entry {info.filename!r} is a symbolic link; uploads may hold files only")
    if stat.S_IFMT(mode) not in (0, stat.S_IFREG, stat.S_IFDIR):
        raise ValueError(f"the archive entry {info.filename!r} is not a regular file or folder")
    if info.flag_bits & 0x1:
        raise ValueError(f"the archive entry {info.filename!r} is encrypted; upload an archive without a password")


def _dataset_folder(staging: Path) -> Path:
    """The unpacked dataset: the staging folder, or the one folder an archive of a folder wraps it in."""
    folder = staging
    while not _vtab_lists(folder):
        entries = [entry for entry in folder.iterdir() if not entry.name.startswith(".")]
        if len(entries) == 1 and entries[0].is_dir():
            folder = entries[0]
            continue
        classes = [entry.name for entry in entries if entry.is_dir()]
        if len(classes) < 2:
            raise ValueError(
                "the archive holds no dataset: zip one folder per class (at least two, e.g. cats/ and dogs/ with "
                f"their images), or a VTAB-1k task folder with its {', '.join(VTAB_LISTS)}"
            )
        break
    return folder


def _vtab_lists(folder: Path) -> list[str]:
    return [name for name in VTAB_LISTS if (folder / name).is_file()]


def _dataset_name(folder: Path) -> str:
    kind = "vtab" if _vtab_lists(folder) else "folder"
    return f"{kind}:{UPLOADS_DIR}/{folder.name}"


def _check_pixels(folder: Path, limits: UploadLimits) -> None:
    """Read each image file's header (no pixels are decoded) and refuse images over the pixel limit."""
    for path in sorted(folder.rglob("*")):
        if path.suffix.lower() not in IMAGE_EXTENSIONS or not path.is_file():
            continue
        relative = path.relative_to(folder).as_posix()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(path) as image:
                    width, height = image.size
        except Image.DecompressionBombError as exc:
            raise ValueError(f"{relative} declares more pixels than Pillow opens ({exc}); leave it out") from None
        except Exception:  # noqa: BLE001 - unreadable: reported by the training's bad-file check instead
            continue
        if width * height > limits.image_pixels:
            raise ValueError(
                f"{relative} declares {width} x {height} pixels; uploads may hold {limits.describe()}. Resize it, "
                "or leave it out"
            )


def _bytes_below(folder: Path) -> int:
    """Bytes of the files under folder (links not followed)."""
    total = 0
    for dirpath, _, filenames in os.walk(folder):
        for filename in filenames:
            try:
                total += os.lstat(os.path.join(dirpath, filename)).st_size
            except OSError:
                continue
    return total
