"""The node's directory on disk (``ISS_DATA``), and the few ways ISS writes a file durably.

Layout under the data directory (the seed version's, unchanged)::

    blobs/ab/cd/<hex>             the bytes, named by their sha256 (a file store's)
    meta/ab/cd/<hex>.json         what is known about them (kind, bytes, mime, ...)
    quarantine/                   what fsck --repair moved aside
    derived/ab/cd/<hex>/<name>    this node's cached derivatives (thumbnails, conversions)
    copies/ab/cd/<hex>/blob       this node's verified copies of a bucket's small blobs
    tmp/                          this node's writes in flight; never visible anywhere else

The first three are the file driver's (``drivers/file.py``; on S3 they are
keys in the bucket); the last three are the node's scratch. A durable write of
a file is a private, locked temp file in ``tmp/`` (unnamed, ``O_TMPFILE``, where
the file system allows), flushed, then linked (never replacing) or renamed
(replacing) into place and flushed again, a temp name removed on every path
(:func:`write_atomically`, and a store's commit, which does the same for a
group). Every operation on a stored blob that must not overlap a delete holds
the blob's flock (:func:`lock_file`).

Flushes are group commits (:class:`Flusher`): one ``syncfs`` of the data
directory's file system makes durable what every waiting writer wrote, so
concurrent uploads share their flushes instead of paying four fsyncs each.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import IO, Any, Literal, overload

from iss_server import syscalls
from iss_server.errors import StoreFull, StoreUnavailable

# The path of an unnamed temp file (O_TMPFILE) is that of its descriptor, followed by open.
_UNNAMED = '/proc/self/fd/'
# NOTE: errors that say the disk, not the request, is the problem.
_NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})


class Layout:
    """Where each part of a store lives below its data directory (``root``)."""

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)
        #: Make everything written so far under the data directory durable (see :class:`Flusher`).
        self.flush = Flusher(self.root)
        self.tmp = os.path.join(self.root, 'tmp')
        self._unnamed_temps = hasattr(os, 'O_TMPFILE') and syscalls.can_link_open_files()

    def blob(self, hex_digest: str) -> str:
        """Where a file driver on this directory keeps a blob (``storage.blob_key``)."""
        return os.path.join(self.root, 'blobs', hex_digest[0:2], hex_digest[2:4], hex_digest)

    def lock_file(self, name: str) -> str:
        """A file whose flock serialises one kind of housekeeping (``index``, ``derived``)."""
        return os.path.join(self.root, f'{name}.lock')

    def new_temp(self) -> tuple[int, str]:
        """Create a private temp file on the data directory's file system, locked; return (fd, path).

        PERF: an unnamed file (``O_TMPFILE``) where the file system has them (ext4, XFS,
        btrfs, tmpfs): no directory entry is made, flushed and removed again for each
        upload, and a killed worker leaves nothing behind. Its ``path`` is
        ``/proc/self/fd/<fd>``, valid while the fd is open: ``open`` reads it, :func:`link`
        names it. Elsewhere it is a named file under tmp/.

        The exclusive flock marks a named file as in use for as long as this
        process lives, so a sweep in another worker never takes a live write,
        and a killed worker's file is swept at the next start. Once a temp file
        is linked into place, the flock holds the new file too (its inode).
        """
        if self._unnamed_temps:
            try:
                fd = os.open(self.tmp, os.O_TMPFILE | os.O_RDWR, 0o644)
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR):
                    raise
                self._unnamed_temps = False  # NOTE: this file system has none (EISDIR: nor this kernel)
            else:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX)
                    os.fchmod(fd, 0o644)  # APPSEC: as a named temp file, whatever the umask
                except BaseException:
                    os.close(fd)
                    raise
                return fd, _UNNAMED + str(fd)
        while True:
            fd, path = tempfile.mkstemp(dir=self.tmp, prefix='upload-')
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                # NOTE: a sweeper may have taken the file between mkstemp
                # and flock; then it is unlinked (or locked) and we start over.
                if os.fstat(fd).st_nlink:
                    # APPSEC: mkstemp makes 0600 files; a reverse proxy serving
                    # blobs as another user needs to read them.
                    os.fchmod(fd, 0o644)
                    return fd, path
            except BlockingIOError:
                pass
            except BaseException:
                os.close(fd)
                with contextlib.suppress(OSError):
                    os.unlink(path)
                raise
            os.close(fd)


def store_error(exc: OSError, doing: str) -> StoreFull | StoreUnavailable:
    """Translate an OSError raised by the data directory into the store's error."""
    if exc.errno in _NO_SPACE:
        return StoreFull(f'{doing}: {os.strerror(exc.errno)}')
    return StoreUnavailable(f'{doing}: {exc.strerror or exc}')


@contextlib.contextmanager
def translated(doing: str) -> Iterator[None]:
    """Raise an OSError of the block as StoreFull or StoreUnavailable, saying what was being done."""
    try:
        yield
    except OSError as exc:
        raise store_error(exc, doing) from exc


@overload
def write_atomically(
    layout: Layout,
    final_path: str,
    write: Callable[[int], None],
    *,
    replace: bool = ...,
    keep_open: Literal[True],
    guard: contextlib.AbstractContextManager[object] | None = ...,
    cache: bool = ...,
) -> tuple[bool, int]: ...
@overload
def write_atomically(
    layout: Layout,
    final_path: str,
    write: Callable[[int], None],
    *,
    replace: bool = ...,
    keep_open: Literal[False] = ...,
    guard: contextlib.AbstractContextManager[object] | None = ...,
    cache: bool = ...,
) -> tuple[bool, None]: ...
def write_atomically(
    layout: Layout,
    final_path: str,
    write: Callable[[int], None],
    *,
    replace: bool = False,
    keep_open: bool = False,
    guard: contextlib.AbstractContextManager[object] | None = None,
    cache: bool = False,
) -> tuple[bool, int | None]:
    """Write a file whole or not at all: temp file, ``write(fd)``, flush, into place, flush.

    Args:
        write: fills the temp file through its descriptor.
        replace: rename over an existing ``final_path``; otherwise link, which
            never replaces: the first writer of a name wins.
        keep_open: also return a new descriptor of the written file, positioned
            at its start (the caller closes it); the temp name is gone either way.
        guard: entered once the bytes are durable, and held while they are put
            in place (a blob's lock, see :func:`hold`); what it raises aborts.
        cache: a cache's file (a derivative, a node's copy), which a crash may lose
            but never tear: its own bytes are flushed (fsync) before it is named, and
            the name is not flushed. PERF: no ``syncfs`` of the whole file system,
            whose cost grows with whatever else is dirty on it.

    Returns:
        Whether the file was put in place (False: the name existed, nothing
        changed), and the kept descriptor or None.
    """
    fd, temp_path = layout.new_temp()
    try:
        write(fd)
        if cache:
            os.fsync(fd)
        else:
            layout.flush()
        with guard or contextlib.nullcontext():
            if cache:
                placed = link(layout, temp_path, final_path, replace=replace)
            else:
                placed = place(layout, temp_path, final_path, replace=replace)
        kept = None
        if keep_open:
            kept = os.dup(fd)
            os.lseek(kept, 0, os.SEEK_SET)  # NOTE: a dup shares the writer's offset, at the end
        return placed, kept
    finally:
        remove_temp(fd, temp_path)


def place(layout: Layout, temp_path: str, final_path: str, *, replace: bool = False) -> bool:
    """Put a flushed file in place durably: rename over, or link (False if the name exists)."""
    if not link(layout, temp_path, final_path, replace=replace):
        return False
    layout.flush()
    return True


def link(layout: Layout, temp_path: str, final_path: str, *, replace: bool = False) -> bool:
    """Give a temp file of ``layout`` its final name, making the fan-out directories it needs; False if the name exists.

    Not durable until the next flush: the caller flushes once for every name it gave.
    """
    try:
        try:
            _give_name(layout, temp_path, final_path, replace)
        except FileNotFoundError:
            # PERF: the fan-out directory exists for all but the first file in it; made on demand.
            if not os.path.exists(temp_path):
                raise
            os.makedirs(os.path.dirname(final_path), exist_ok=True)
            _give_name(layout, temp_path, final_path, replace)
    except FileExistsError:
        return False
    return True


def _give_name(layout: Layout, temp_path: str, final_path: str, replace: bool) -> None:
    if not temp_path.startswith(_UNNAMED):
        (os.replace if replace else os.link)(temp_path, final_path)
        return
    fd = int(temp_path[len(_UNNAMED) :])
    if not replace:
        syscalls.link_open_file(fd, final_path)
        return
    # NOTE: rename(2) moves names only: the file is named under tmp/ first. Our flock on it
    # keeps sweepers away; if we die before the rename, the next start sweeps the name.
    named = os.path.join(layout.tmp, f'replacing-{uuid.uuid4().hex}')
    syscalls.link_open_file(fd, named)
    try:
        os.replace(named, final_path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(named)
        raise


def write_bytes(data: bytes) -> Callable[[int], None]:
    """A ``write`` for :func:`write_atomically` that writes ``data``."""
    return lambda fd: write_all(fd, data)


def lock_file(path: str, operation: int) -> int | None:
    """Open ``path`` and flock it; None when it is absent, or was removed or replaced meanwhile.

    Returns the open fd, which holds the lock until closed.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, operation)
        # NOTE: while we waited, a delete may have unlinked it, or a repair renamed it.
        with contextlib.suppress(FileNotFoundError):
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
    except BaseException:
        os.close(fd)
        raise
    os.close(fd)
    return None


def remove_temp(fd: int, path: str) -> None:
    """Remove a temp file we hold; unlink a named one first, so no sweeper can get between."""
    if not path.startswith(_UNNAMED):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    os.close(fd)  # NOTE: an unnamed one goes with its last descriptor


def unlink_durably(layout: Layout, path: str) -> bool:
    """Remove a file and make its removal durable; False when it was not there."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    layout.flush()
    return True


def disk_bytes(stat: os.stat_result) -> int:
    """The bytes a file takes on its disk: its blocks (a 100-byte file takes 4 KiB), never less than its size."""
    return max(stat.st_blocks * 512, stat.st_size)


def files_below(top: str) -> Iterator[os.DirEntry]:
    try:
        entries = os.scandir(top)
    except FileNotFoundError:
        return
    with entries:
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                yield from files_below(entry.path)
            else:
                yield entry


def hash_stream(stream: Any) -> tuple[str, int]:
    """The sha256 hex and size of what ``stream.readinto`` gives until EOF (a file, an S3 body)."""
    sha256 = hashlib.sha256()
    buffer = bytearray(1024 * 1024)
    view = memoryview(buffer)
    size = 0
    while count := stream.readinto(buffer):
        sha256.update(view[:count])
        size += count
    return sha256.hexdigest(), size


def write_all(fd: int, data: bytes | memoryview) -> None:
    """Write all of ``data``; os.write may write less, e.g. when the disk fills."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Have the disk start writing these bytes now, without waiting for it.

    PERF: an upload is synced before it becomes a blob; started while the rest is
    still arriving, the disk's work overlaps the transfer instead of following it
    (a 512 MiB multipart upload: 1.23-1.25 s -> 0.97-1.02 s). It also keeps the dirty
    page cache small, which a container's memory limit counts. Errors surface at the fsync.
    """
    syscalls.sync_file_range_write(fd, offset, length)


def open_fd(fd: int) -> IO[bytes]:
    """A binary file object that owns ``fd``."""
    return open(fd, 'rb')


class Flusher:
    """Group commit: one flush of the file system for every writer waiting, however many.

    :meth:`__call__` returns once everything the calling thread wrote before the
    call (file bytes, inodes, links, renames, unlinks, new directories) is on
    stable storage. The flush is ``syncfs(2)`` of the data directory's file
    system: a writer that finds none running starts one at once (a lone upload
    never waits for company); one that finds a flush running waits for the next,
    which one of the waiters starts as soon as the running one ends, for all who
    arrived meanwhile. So with N uploads in flight a flush costs each about 1/N.

    Since Linux 5.8 syncfs reports writeback errors of the file system; a failed
    flush raises its OSError in every writer it was for.
    """

    # NOTE: failures are kept for waiters that wake late; far more than ever wait at once.
    _KEPT_FAILURES = 64

    def __init__(self, root: str) -> None:
        self._root = root
        self._changed = threading.Condition()
        self._started = 0  # flushes started; the number of the one running, if any
        self._finished = 0
        self._running = False
        self._failures: dict[int, OSError] = {}
        self._fd: int | None = None
        #: Flushes made by this process (for tests and benchmarks).
        self.count = 0

    def __call__(self) -> None:
        with self._changed:
            # NOTE: a flush already running may have started before our writes: wait for the next.
            mine = self._started + 1
            while self._finished < mine:
                if self._running:
                    self._changed.wait()
                    continue
                self._running = True
                self._started += 1
                self._changed.release()
                failure = None
                try:
                    self._flush()
                except OSError as exc:
                    failure = exc
                finally:
                    self._changed.acquire()
                    self._running = False
                    self._finished = self._started
                    if failure is not None:
                        self._failures[self._finished] = failure
                        if len(self._failures) > self._KEPT_FAILURES:
                            del self._failures[min(self._failures)]
                    self._changed.notify_all()
            failure = self._failures.get(mine)
        if failure is not None:
            raise failure

    def _flush(self) -> None:
        if self._fd is None:
            # NOTE: held for the process's life, so syncfs reports every writeback error since;
            # a directory opened read-only never stops an operator's remount read-only.
            self._fd = os.open(self._root, os.O_RDONLY | os.O_DIRECTORY)
        syscalls.syncfs(self._fd)
        self.count += 1
