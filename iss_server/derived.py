"""The derivative cache on disk: thumbnails and conversions, rendered once, kept within a bound.

Each derivative lives at ``derived/ab/cd/<hex>/<name>`` (``name`` is the
variant's key, e.g. ``256x256-cover-q80.webp``), written whole or not at all
(:func:`disk.write_atomically`, as a cache's file: a crash may lose it, never
tear it) while its blob is held, so that a concurrent delete removes it too.
The cache is kept under a byte bound by removing the least recently used first
(a read touches the file's modification time).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from collections.abc import Callable
from typing import IO

from iss_server import disk
from iss_server.blobs import BlobStat, OpenBlob


class DerivedCache:
    """Files made from a store's blobs on this node, at most ``max_bytes`` of them, under ``top/``.

    ``derived/`` holds the derivatives; a store on a remote backend keeps its
    verified copies of small blobs in a second cache, ``copies/``.
    """

    # NOTE: each worker counts its own renders and measures the cache (a walk of derived/)
    # when that count says it is full, and every this many renders to see the others' too.
    _MEASURE_EVERY = 50

    def __init__(
        self,
        layout: disk.Layout,
        max_bytes: int,
        hold: Callable[[str], contextlib.AbstractContextManager[object]],
        top: str = 'derived',
    ) -> None:
        self._layout = layout
        self._top = os.path.join(layout.root, top)
        self._lock = layout.lock_file(top)
        self.max_bytes = max_bytes
        # NOTE: held while a rendered derivative gets its name, so that a delete of the blob
        # (which holds it too) removes it (BlobNotFound when it was deleted meanwhile).
        self._hold = hold
        # NOTE: bytes under derived/ as last measured, plus what this process wrote since.
        self._bytes: int | None = None
        self._writes = 0

    def _dir(self, hex_digest: str) -> str:
        return os.path.join(self._top, hex_digest[0:2], hex_digest[2:4], hex_digest)

    def open(self, hex_digest: str, name: str) -> OpenBlob | None:
        """Open a cached derivative, or None when it is not cached."""
        path = os.path.join(self._dir(hex_digest), name)
        try:
            file = open(path, 'rb')  # noqa: SIM115 - the caller owns and closes it
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise disk.store_error(exc, 'opening a derivative') from exc
        # NOTE: the modification time orders eviction: least recently used goes first.
        with contextlib.suppress(OSError):
            os.utime(file.fileno())
        return OpenBlob(file, BlobStat.of(os.fstat(file.fileno())))

    def put(self, hex_digest: str, name: str, write: Callable[[IO[bytes]], object]) -> OpenBlob:
        """Make a derivative with ``write`` and cache it as ``name``; return it open.

        Two workers making the same one at once both succeed, with one file.

        Raises:
            BlobNotFound: the blob was deleted meanwhile.
            Whatever ``write`` raises, after the temp file is removed.
        """

        def write_fd(fd: int) -> None:
            with open(fd, 'wb', closefd=False) as temp:
                write(temp)

        path = os.path.join(self._dir(hex_digest), name)
        with disk.translated('storing a derivative'):
            # NOTE: rendered before the blob is held, so a delete never waits for a render;
            # served from the kept descriptor, as eviction below may remove the name already.
            _, fd = disk.write_atomically(
                self._layout, path, write_fd, keep_open=True, guard=self._hold(hex_digest), cache=True
            )
        rendered = disk.open_fd(fd)
        file_stat = os.fstat(rendered.fileno())
        self._writes += 1
        if self._bytes is not None:
            # NOTE: the bound is of the disk's bytes: 1 MB of tiny derivatives took 10.3 MB of it (issue 29).
            self._bytes += disk.disk_bytes(file_stat)
        if self._bytes is None or self._bytes > self.max_bytes or self._writes % self._MEASURE_EVERY == 0:
            _, remaining = self.evict(self.max_bytes)
            self._bytes = remaining if remaining is not None else self._bytes
        return OpenBlob(rendered, BlobStat.of(file_stat))

    def evict(self, max_bytes: int) -> tuple[int, int | None]:
        """Remove the least recently used derivatives until they take at most ``max_bytes``.

        Returns how many files went, and the bytes that remain. NOTE: one worker
        at a time (an flock); one that finds another evicting skips, (0, None).
        """
        os.makedirs(self._top, exist_ok=True)
        with open(self._lock, 'a') as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return 0, None
            files = []
            for entry in disk.files_below(self._top):
                with contextlib.suppress(FileNotFoundError):
                    stat = entry.stat(follow_symlinks=False)
                    files.append((stat.st_mtime_ns, disk.disk_bytes(stat), entry.path))
            total = sum(size for _, size, _ in files)
            removed = 0
            # NOTE: down to 90%, so that the next renders do not each trigger eviction.
            for _, size, path in sorted(files):
                if total <= max_bytes * 0.9:
                    break
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                    removed += 1
                total -= size
        return removed, total

    def remove(self, hex_digest: str) -> None:
        """Remove every derivative of a blob (it is being deleted or quarantined)."""
        shutil.rmtree(self._dir(hex_digest), ignore_errors=True)

    def remove_orphans(self, is_stored: Callable[[str], bool], *, dry_run: bool = False) -> int:
        """Remove the derivatives of blobs no longer stored; return how many files went (or would)."""
        removed = 0
        for entry in disk.files_below(self._top):
            hex_digest = os.path.basename(os.path.dirname(entry.path))
            if not is_stored(hex_digest):
                removed += 1
                if not dry_run:
                    self.remove(hex_digest)
        return removed
