"""DICOM exports as ZIP archives: what PACS web portals, cloud archives and viewers (OHIF's "download study")
hand out. They are unpacked into a temporary folder and read like any export folder.

Unpacking refuses what could write outside that folder (absolute names, ``..``, drive letters), leaves out
links, checks the free space first (an archive's declared sizes; a damaged member is caught by its CRC), and
names a password-protected archive, all as one line.
"""

from __future__ import annotations

import contextlib
import shutil
import stat
import tempfile
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from segpipe.errors import SegpipeError

__all__ = ["is_zip", "unpack_zip", "unpacked"]


def is_zip(path: Path) -> bool:
    """A DICOM export as a ZIP archive: a file named ``*.zip`` (a damaged one too: :func:`unpack_zip` names it),
    or a ZIP archive by its content whatever its name, except a PyTorch checkpoint (which ``torch.save`` also
    writes as a ZIP archive, around its ``data.pkl``)."""
    if not path.is_file():
        return False
    if path.name.lower().endswith(".zip"):
        return True
    if not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as archive:
            return not any(name.endswith("/data.pkl") for name in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return True  # damaged: unpack_zip names it


@contextlib.contextmanager
def unpacked(path: str | Path, *, what: str = "input") -> Iterator[Path]:
    """The archive ``path`` unpacked (:func:`unpack_zip`) into a temporary folder, removed after the block."""
    with tempfile.TemporaryDirectory(prefix="segpipe-unpacked-") as tmp:
        yield unpack_zip(path, tmp, what=what)


def unpack_zip(path: str | Path, into: str | Path, *, what: str = "input") -> Path:
    """Unpack the archive ``path`` into the new folder ``into/<archive name without .zip>`` and return it."""
    path, into = Path(path), Path(into)
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise SegpipeError(f"{what} '{path}': not a readable ZIP archive ({exc}); download or copy it again") from None
    dest = into / (path.name[: -len(".zip")] if path.name.lower().endswith(".zip") else path.name)
    with archive:
        members = archive.infolist()
        needed = sum(m.file_size for m in members)
        into.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(into).free
        if needed > free:
            raise SegpipeError(f"{what} '{path}': unpacking needs {needed / 1e9:.1f} GB and the temporary folder '{into}' has "
                               f"{free / 1e9:.1f} GB free; unpack it yourself somewhere larger, or set TMPDIR")
        for m in members:
            parts = PurePosixPath(m.filename.replace("\\", "/")).parts
            if m.filename.startswith(("/", "\\")) or ".." in parts or (parts and ":" in parts[0]):
                raise SegpipeError(f"{what} '{path}': the archive names a file outside itself ('{m.filename}'); refused, as "
                                   "unpacking it would write elsewhere on this machine")
            if m.is_dir() or stat.S_ISLNK(m.external_attr >> 16):
                continue  # folders come with their files; links could point anywhere
            target = dest.joinpath(*parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                with archive.open(m) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
            except RuntimeError as exc:  # zipfile's word for an encrypted member
                if m.flag_bits & 0x1:
                    raise SegpipeError(f"{what} '{path}': the archive is password-protected; unpack it yourself and give the "
                                       "folder") from None
                raise SegpipeError(f"{what} '{path}': '{m.filename}' cannot be unpacked ({exc})") from None
            except (zipfile.BadZipFile, EOFError, NotImplementedError, zlib.error) as exc:
                raise SegpipeError(f"{what} '{path}': '{m.filename}' cannot be unpacked ({exc}); the archive is damaged or uses "
                                   "an unusual compression: download it again, or unpack it yourself and give the folder") from None
            except OSError as exc:
                raise SegpipeError(f"{what} '{path}': '{m.filename}' cannot be written to the temporary folder '{into}' "
                                   f"({exc.strerror or exc}); free space there, or set TMPDIR") from None
    dest.mkdir(parents=True, exist_ok=True)  # an empty archive: an empty folder, found to hold no DICOM below
    return dest
