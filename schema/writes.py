"""Writing a run's files: whole or not at all, and a full disk said in words.

Every file is written to a temp file in its own folder, flushed and fsynced, then moved over the old
one with ``os.replace``: a failed write leaves the previous version (or nothing) and no temp file.
An ``OSError`` on the way (a full disk, a quota, a read-only or foreign folder) becomes a
:class:`WriteError` naming the folder, the errno's words and the file, which the CLI prints without
a traceback. Libraries that report a failed write without an errno (SEAL's ``basic_ios::clear``,
torch's ``PytorchStreamWriter failed``, h5py's ``file write failed``) are told apart by the folder's
free space at the moment of the failure.
"""

from __future__ import annotations

import errno
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from schema.errors import UserError

# the folder the user chose cannot take the file: the fix is theirs
FIXABLE = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES})
# below this many free bytes, a write that failed without an errno is taken for a full disk
NEARLY_FULL = 1 << 20


class WriteError(UserError):
    """A file of the run could not be written (the disk is full, the folder read-only, ...)."""

    exit_code = 2

    def __init__(self, message: str, *, path: Path, errno_: int | None) -> None:
        super().__init__(message)
        self.path = path
        self.errno = errno_


def write_error(path: str | Path, exc: OSError) -> WriteError:
    """The :class:`WriteError` for ``exc`` raised while writing ``path``."""
    path = Path(path)
    code = exc.errno
    name = errno.errorcode.get(code, str(code)) if code is not None else "unknown"
    words = exc.strerror or (os.strerror(code) if code is not None else str(exc))
    if code in FIXABLE:
        fix = "free space or choose another --out"
    else:
        fix = "check the folder (its disk, its permissions) or choose another --out"
    message = f"{path.parent}: {words} (errno {name}) while writing {path.name}; {fix}"
    return WriteError(message, path=path, errno_=code)


@contextmanager
def writing(path: str | Path, *, mode: int = 0o666) -> Iterator[Path]:
    """Yield a temp path beside ``path`` for a writer that takes a path or opens its own file
    (``write_h5ad``, ``savefig``, ``np.savez``, ``to_csv``); on success it is fsynced and replaces
    ``path``, on any failure it is removed and an ``OSError`` becomes a :class:`WriteError`.

    The temp name keeps ``path``'s suffix, from which matplotlib and numpy take the format. ``mode``
    is the new file's permission bits (before the umask), e.g. ``0o600`` for a secret.
    """
    path = Path(path)
    temp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp{path.suffix}")
    try:
        try:
            os.close(os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode))
            yield temp
            _fsync(temp)
            os.replace(temp, path)
        except BaseException as exc:
            cause = _write_failure(exc, path.parent)
            _remove(temp)
            if cause is not None:
                raise write_error(path, cause) from exc
            raise
    finally:
        _remove(temp)
    _fsync_folder(path.parent)


def atomic_write(path: str | Path, data: bytes | str, *, mode: int = 0o666) -> Path:
    """Write ``data`` (``str`` as UTF-8) to ``path`` atomically; see :func:`writing`.

    >>> import tempfile
    >>> folder = Path(tempfile.mkdtemp())
    >>> atomic_write(folder / "report.json", '{"ok": true}').read_text()
    '{"ok": true}'
    >>> sorted(p.name for p in folder.iterdir())  # no temporary file is left beside it
    ['report.json']
    """
    payload = data.encode() if isinstance(data, str) else bytes(data)
    with writing(path, mode=mode) as temp:
        fd = os.open(temp, os.O_WRONLY | os.O_TRUNC)
        try:
            view = memoryview(payload)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
    return Path(path)


def _write_failure(exc: BaseException, folder: Path) -> OSError | None:
    """The ``OSError`` behind a failed write, or ``None`` for a failure that is not the disk's."""
    if isinstance(exc, OSError) and exc.errno is not None:
        return exc
    if isinstance(exc, (OSError, RuntimeError)) and _free_bytes(folder) < NEARLY_FULL:
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return None


def _free_bytes(folder: Path) -> int:
    try:
        stats = os.statvfs(folder)
    except OSError:
        return NEARLY_FULL  # unknown: not taken for a full disk
    return stats.f_bavail * stats.f_frsize


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_folder(folder: Path) -> None:
    """Make the rename durable; a folder that cannot be opened or synced (some network disks) is left."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        with suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    with suppress(OSError):
        path.unlink(missing_ok=True)
