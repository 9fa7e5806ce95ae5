"""Atomic output: write under a temporary name in the destination folder, then rename.

A reader (or a rerun after ``kill -9``) sees either the complete file or none at all, never a
half-written one. Temporary names start with ``.tmp-`` so that stale ones are easy to spot and clean.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from segpipe.errors import SegpipeError

__all__ = ["TMP_PREFIX", "atomic_path", "atomic_write_bytes", "atomic_write_text", "ensure_writable_dir"]

TMP_PREFIX = ".tmp-"


def ensure_writable_dir(path: str | os.PathLike, *, what: str = "output folder") -> Path:
    """Create ``path`` (and parents) and check that files can be written in it."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise SegpipeError(f"{what} '{path}': expected a folder, found a file; choose another path")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SegpipeError(
            f"{what} '{path}': cannot be created ({exc.strerror or exc}); choose a folder you can write to"
        ) from exc
    if not path.is_dir():
        raise SegpipeError(f"{what} '{path}': expected a folder, found a file; choose another path")
    if not os.access(path, os.W_OK | os.X_OK):
        raise SegpipeError(f"{what} '{path}': not writable; choose a folder you can write to or fix its permissions")
    return path


def ensure_writable_file(path: str | os.PathLike, *, what: str = "output file", example: str = "output.json") -> Path:
    """Check, before any work, that ``path`` can be written as a file: not an existing folder, and in a folder
    that exists or can be made and is writable (``example``: a file name to suggest)."""
    path = Path(path)
    _not_a_folder(path, what, example)
    ensure_writable_dir(path.parent, what=f"{what} '{path}': the folder")
    return path


def _not_a_folder(path: Path, what: str, example: str) -> None:
    if path.is_dir():
        raise SegpipeError(f"{what} '{path}': expected a file to write, found a folder; give a file name, e.g. '{path / example}'")


_UMASK: int | None = None


def _umask() -> int:
    """The process's umask (read from /proc, where setting and restoring it would race with other threads)."""
    global _UMASK
    if _UMASK is None:
        try:
            line = next(ln for ln in Path("/proc/self/status").read_text().splitlines() if ln.startswith("Umask:"))
            _UMASK = int(line.split()[1], 8)
        except (OSError, StopIteration, ValueError):
            _UMASK = os.umask(0o022)
            os.umask(_UMASK)
    return _UMASK


def _device_full(exc: BaseException, parent: Path) -> bool:
    """A write failed for want of space: ENOSPC or a quota; NumPy's short write, which loses the errno; or
    torch.save's zip writer failing (a RuntimeError) on a device with next to nothing left."""
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT) or (exc.errno is None and "requested and" in str(exc) and "written" in str(exc))
    if isinstance(exc, RuntimeError) and "inline_container" in str(exc):
        return "file write failed" in str(exc) or shutil.disk_usage(parent).free < 64 * 2**20
    return False


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike, *, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to ``final``; rename it onto ``final`` when the block succeeds.

    With ``directory=True`` the temporary path is a fresh folder, and an existing ``final`` folder is
    replaced. On any exception (Ctrl-C included) the temporary path is removed and ``final`` is untouched;
    a full device (or quota) is one :class:`SegpipeError` line. What appears has the permissions a plain
    write would give under the umask (a temporary file or folder is private to its owner, which a cache
    shared by a group, or read by a container's user, could not use).
    """
    final = Path(final)
    parent = final.parent
    if not directory:
        _not_a_folder(final, "file", final.name)
    ensure_writable_dir(parent)
    if directory:
        tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX + final.name + ".", dir=parent))
    else:
        # the temporary name ends with the final one, so that writers that go by the extension
        # (nibabel: ".nii.gz") write the right format
        fd, name = tempfile.mkstemp(prefix=TMP_PREFIX, suffix="-" + final.name, dir=parent)
        os.close(fd)
        tmp = Path(name)
    try:
        try:
            yield tmp
        except (OSError, RuntimeError) as exc:
            if not _device_full(exc, parent):
                raise
            free = shutil.disk_usage(parent).free / 2**20
            reason = getattr(exc, "strerror", None) or (str(exc).strip().splitlines() or [""])[0]
            raise SegpipeError(f"'{final}': the device is full or over quota ({free:.0f} MB free there; {reason}); "
                               "free some space or write elsewhere") from None
        if directory:
            os.chmod(tmp, 0o777 & ~_umask())
            if final.exists():
                old = Path(tempfile.mkdtemp(prefix=TMP_PREFIX + final.name + ".old.", dir=parent))
                os.replace(final, old / "x")
                os.replace(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, final)
        else:
            os.chmod(tmp, 0o666 & ~_umask())
            os.replace(tmp, final)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))
