"""The driver on a data directory: each key a file below it, written the disk's durable way.

A put links a file spooled under the data directory's ``tmp/`` (the store's
spool, on the same file system) to the key's path: a link never replaces, so
the first writer of a key wins, and the bytes are the ones the spool hashed.
Puts are grouped (:meth:`FileDriver.group`): a sync is one flush of the file
system (:class:`disk.Flusher`) for every put of the group and every writer
waiting meanwhile. A hold is the file's flock (shared; exclusive to remove),
so a removal never overlaps a put or a read of meta it must not miss.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import os
from collections.abc import Iterator
from typing import IO

from iss_server import disk
from iss_server.drivers import Busy, KeyNotFound, Source, Stat
from iss_server.errors import StoreUnavailable

#: Files up to this size are read whole when opened (responses.py sends blobs up to 64 KiB from memory).
_READ_AT_OPEN_BYTES = 64 * 1024


def _read_to_end(fd: int, size: int) -> bytes:
    """A file's bytes to its end, in one read as a rule: its ``size`` (fstat) and one byte more are asked for.

    NOTE: a regular file's read returns less than asked only at its end; a file that grew meanwhile is read on.
    """
    data = os.read(fd, size + 1)
    if len(data) <= size:
        return data
    chunks = [data]
    while chunk := os.read(fd, io.DEFAULT_BUFFER_SIZE):
        chunks.append(chunk)
    return b''.join(chunks)


def _stat(stat: os.stat_result) -> Stat:
    # NOTE: the inode and its change time tell a stored copy from one stored again after a delete.
    return Stat(stat.st_size, f'{stat.st_ino}-{stat.st_ctime_ns}', stat.st_mtime)


class FileDriver:
    """Objects as files below ``layout.root``; see the module's docstring.

    Args:
        layout: The data directory (its ``flush`` is the group commit, its ``tmp/`` the spool).
        directories: The top directories made at once, and missed by :meth:`check`.
    """

    verify_reads = False
    part = StoreUnavailable.part

    def __init__(self, layout: disk.Layout, directories: tuple[str, ...] = ()) -> None:
        self.layout = layout
        self._directories = [os.path.join(layout.root, top) for top in directories]
        # NOTE: a directory that cannot be made leaves the store starting; check() names it.
        with contextlib.suppress(OSError):
            for directory in self._directories:
                os.makedirs(directory, exist_ok=True)

    def __repr__(self) -> str:
        return self.layout.root

    def path(self, key: str) -> str:
        """The file of ``key``. APPSEC: a key never leads out of the data directory."""
        path = os.path.normpath(os.path.join(self.layout.root, key))
        if not path.startswith(self.layout.root + os.sep):
            raise ValueError(f'{key!r} is no key below the data directory')
        return path

    @contextlib.contextmanager
    def group(self) -> Iterator[_FileGroup]:
        with disk.translated('storing'), contextlib.ExitStack() as held:
            yield _FileGroup(self, held)

    def writer(self, key: str, sha256: str) -> None:
        """None: a spooled file is linked into place, nothing is gained by starting early."""
        return None

    def read(self, key: str) -> bytes:
        # PERF: openat, fstat, read, close: Python's open and read() to the end add an ioctl (isatty),
        # an lseek, an fstat and a second read (strace of a POST of stored content, which reads its meta;
        # each syscall hands the GIL to another of 16 threads).
        fd = self._open_fd(key, 'reading a file')
        try:
            return _read_to_end(fd, os.fstat(fd).st_size)
        except OSError as exc:
            raise disk.store_error(exc, 'reading a file') from exc
        finally:
            os.close(fd)

    def open(self, key: str, offset: int = 0) -> tuple[IO[bytes], Stat]:
        fd = self._open_fd(key, 'opening a file')
        try:
            stat = os.fstat(fd)
            if stat.st_size <= _READ_AT_OPEN_BYTES:
                # PERF: a small file is read here, whole (openat, fstat, read, close): a small GET sends it
                # from memory anyway, and Python's file object added an fstat and an lseek (strace).
                file: IO[bytes] = io.BytesIO(_read_to_end(fd, stat.st_size))
            else:
                # NOTE: a buffer size given, Python does not ask whether the file is a terminal (an ioctl).
                file = open(fd, 'rb', buffering=io.DEFAULT_BUFFER_SIZE)  # noqa: SIM115 - the caller closes it
                fd = -1  # NOTE: the file object's now
        except OSError as exc:
            raise disk.store_error(exc, 'opening a file') from exc
        finally:
            if fd >= 0:
                os.close(fd)
        if offset:
            file.seek(offset)
        return file, _stat(stat)

    def _open_fd(self, key: str, doing: str) -> int:
        try:
            return os.open(self.path(key), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise KeyNotFound(key) from None
        except OSError as exc:
            raise disk.store_error(exc, doing) from exc

    def stat(self, key: str) -> Stat:
        try:
            return _stat(os.stat(self.path(key)))
        except FileNotFoundError:
            raise KeyNotFound(key) from None
        except OSError as exc:
            raise disk.store_error(exc, 'reading a file') from exc

    def move(self, key: str, target: str) -> bool:
        target_path = self.path(target)
        with disk.translated('moving a file'):
            os.makedirs(os.path.dirname(target_path), exist_ok=True)
            try:
                os.rename(self.path(key), target_path)
            except FileNotFoundError:
                return False
            self.layout.flush()
        return True

    def remove(self, key: str) -> bool:
        with disk.translated('removing a file'):
            return disk.unlink_durably(self.layout, self.path(key))

    def walk(self, prefix: str) -> Iterator[tuple[str, Stat]]:
        top, _, _ = prefix.rpartition('/')
        with disk.translated('walking the data directory'):
            for entry in disk.files_below(os.path.join(self.layout.root, top)):
                key = os.path.relpath(entry.path, self.layout.root)
                if key.startswith(prefix):
                    with contextlib.suppress(FileNotFoundError):  # NOTE: removed while we walked
                        yield key, _stat(entry.stat(follow_symlinks=False))

    def redirect_url(self, key: str, *, seconds: int, overrides: dict[str, str]) -> None:
        """None: a directory serves no URLs (a proxy in front reads it: :meth:`proxy_path`)."""
        return None

    def proxy_path(self, key: str) -> str:
        """The key below its top directory: nginx's internal location aliases it (``/_internal/blobs/``)."""
        return key.partition('/')[2]

    def location(self, key: str) -> str:
        return self.path(key)

    def abandoned(self, age: float, *, dry_run: bool = False) -> dict[str, int]:
        """Nothing: a write in flight is a temp file of the spool, which the store sweeps."""
        return {}

    def create(self) -> bool:
        """False: the data directory's parts are made when the driver is (see :meth:`__init__`)."""
        return False

    def check(self) -> None:
        for directory in self._directories:
            if not os.path.isdir(directory):
                raise StoreUnavailable(f'{directory} is missing')


class _FileGroup:
    """Puts linked now, made durable by :meth:`sync`; holds are flocks released when the group ends."""

    def __init__(self, driver: FileDriver, held: contextlib.ExitStack) -> None:
        self._driver = driver
        self._held = held

    def hold(self, key: str, *, exclusive: bool = False, wait: bool = True) -> Stat:
        operation = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | (0 if wait else fcntl.LOCK_NB)
        try:
            fd = disk.lock_file(self._driver.path(key), operation)
        except BlockingIOError:
            raise Busy(key) from None
        if fd is None:
            raise KeyNotFound(key)
        self._held.callback(os.close, fd)
        return _stat(os.fstat(fd))

    def put(self, source: Source, key: str, *, replace: bool = False) -> bool:
        path = self._driver.path(key)
        # NOTE: once linked, the spooled file's own exclusive flock holds the new object.
        while not disk.link(self._driver.layout, source.path, path, replace=replace):
            fd = disk.lock_file(path, fcntl.LOCK_SH)
            if fd is not None:  # NOTE: None: removed meanwhile; link ours after all
                self._held.callback(os.close, fd)
                return False
        return True

    def sync(self) -> None:
        self._driver.layout.flush()
