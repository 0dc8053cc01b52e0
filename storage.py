"""The content-addressed blob store behind ISS.

Layout under the data directory (the seed version's, unchanged)::

    blobs/ab/cd/<hex>         the bytes, named by their sha256
    meta/ab/cd/<hex>.json     what is known about them (kind, bytes, mime, ...)
    tmp/                      uploads in flight; never visible under blobs/ or meta/

The promise: a blob is either wholly there with the bytes its name says, or
not there at all. Every write goes to a private temp file under ``tmp/``,
is hashed while it streams, synced, and then hard-linked into place. A link
never replaces an existing name, so an existing blob is never overwritten
and concurrent uploads of the same content all succeed with one blob.

The resources in ``iss.py`` use only :class:`FileStore`'s public methods
(``stage``, ``commit``, ``open``, ``size``, ``read_meta``, ``check``), so a
second backend can stand in without touching them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import tempfile
from typing import IO, Any, Protocol

log = logging.getLogger('iss.storage')

_ID_PATTERN = re.compile(r'sha256:([0-9a-f]{64})')

# NOTE: errors that say the disk, not the request, is the problem.
_NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})


class StoreError(Exception):
    """Base class of what the store raises; iss.py maps each to an HTTP status."""


class InvalidId(StoreError, ValueError):
    """The id is not of the form ``sha256:<64 lowercase hex>``, so it names no blob."""


class BlobNotFound(StoreError):
    """No blob is stored under that id."""


class StoreFull(StoreError):
    """The data directory has no room left for this write."""


class StoreUnavailable(StoreError):
    """The data directory cannot be read or written (gone, read-only, I/O error)."""


def parse_id(blob_id: str) -> str:
    """Return the hex digest of a ``sha256:<64 lowercase hex>`` id.

    Raises:
        InvalidId: ``blob_id`` is not of that form. APPSEC: the hex is the only
            part of client input that ever becomes part of a path.
    """
    match = _ID_PATTERN.fullmatch(blob_id)
    if match is None:
        raise InvalidId(f'{blob_id[:80]!r} is not of the form sha256:<64 lowercase hex digits>')
    return match.group(1)


def _store_error(exc: OSError, doing: str) -> StoreError:
    """Translate an OSError raised by the data directory into a StoreError."""
    if exc.errno in _NO_SPACE:
        return StoreFull(f'{doing}: {os.strerror(exc.errno)}')
    return StoreUnavailable(f'{doing}: {exc.strerror or exc}')


class Readable(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


@dataclasses.dataclass(frozen=True)
class Committed:
    """What :meth:`FileStore.commit` did: ``created`` is False when the blob was already stored."""

    created: bool
    meta: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class OpenBlob:
    """A stored blob opened for reading; the caller closes ``file``."""

    file: IO[bytes]
    size: int


class StagedBlob:
    """An upload written to a private temp file: hashed and sized, not yet visible.

    Returned by :meth:`FileStore.stage`. It keeps the temp file open, and so
    its flock held, until :meth:`FileStore.commit` links it into place or
    :meth:`discard` removes it. Use it as a context manager: leaving the
    block discards it unless it was committed.
    """

    def __init__(self, fd: int, path: str, digest: str, size: int) -> None:
        self._fd = fd
        self.path = path
        #: The content's id, ``sha256:<hex>``.
        self.digest = digest
        self.size = size

    @property
    def hex(self) -> str:
        return self.digest[len('sha256:') :]

    def fileno(self) -> int:
        return self._fd

    def open(self) -> IO[bytes]:
        """Open the staged bytes for reading (to inspect them before commit)."""
        return open(self.path, 'rb')

    def discard(self) -> None:
        """Remove the temp file; a no-op once committed or discarded."""
        if self._fd < 0:
            return
        # NOTE: unlink before close: while the fd is open the flock keeps
        # sweepers away, so the name is never removed by anyone else.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        os.close(self._fd)
        self._fd = -1

    def __enter__(self) -> StagedBlob:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.discard()


class FileStore:
    """Blobs and their metadata in a directory tree, written atomically.

    Args:
        root: The data directory. Its subdirectories are created when
            missing; if that fails the store still starts, and :meth:`check`
            (the health endpoint) says what is wrong.
    """

    # PERF: 1 MiB reads keep the per-chunk Python overhead small next to
    # hashing (~1.4 GB/s) while bounding memory per upload.
    _CHUNK_SIZE = 1024 * 1024

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)
        self._blobs = os.path.join(self.root, 'blobs')
        self._meta = os.path.join(self.root, 'meta')
        self._tmp = os.path.join(self.root, 'tmp')
        try:
            for directory in (self._blobs, self._meta, self._tmp):
                os.makedirs(directory, exist_ok=True)
            swept = self.sweep_temp()
        except OSError as exc:
            log.error('data directory %s is not usable: %s', self.root, exc)
        else:
            if swept:
                log.warning('removed %d stale temp file(s) from %s', swept, self._tmp)

    # -- paths ---------------------------------------------------------------

    def _blob_path(self, hex_digest: str) -> str:
        return os.path.join(self._blobs, hex_digest[0:2], hex_digest[2:4], hex_digest)

    def _meta_path(self, hex_digest: str) -> str:
        return os.path.join(self._meta, hex_digest[0:2], hex_digest[2:4], hex_digest + '.json')

    # -- writing -------------------------------------------------------------

    def _new_temp(self) -> tuple[int, str]:
        """Create a locked temp file under tmp/ and return (fd, path).

        The exclusive flock marks the file as in use for as long as this
        process lives, so :meth:`sweep_temp` in another worker never takes a
        live upload, and a killed worker's file is swept at the next start.
        """
        while True:
            fd, path = tempfile.mkstemp(dir=self._tmp, prefix='upload-')
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

    def stage(self, stream: Readable) -> StagedBlob:
        """Copy ``stream`` to a temp file until EOF, computing its sha256.

        The bytes are synced by :meth:`commit`, and only if they are new.

        Whatever ``stream.read`` raises (a size limit, a client that went
        away) propagates unchanged after the temp file is removed.

        Raises:
            StoreFull: the disk filled up (the temp file is removed).
            StoreUnavailable: the data directory cannot be written.
        """
        try:
            fd, path = self._new_temp()
        except OSError as exc:
            raise _store_error(exc, 'creating a temp file') from exc
        sha256 = hashlib.sha256()
        size = 0
        try:
            while chunk := stream.read(self._CHUNK_SIZE):
                sha256.update(chunk)
                size += len(chunk)
                try:
                    _write_all(fd, chunk)
                except OSError as exc:
                    raise _store_error(exc, 'writing an upload') from exc
        except BaseException:
            _remove_temp(fd, path)
            raise
        return StagedBlob(fd, path, 'sha256:' + sha256.hexdigest(), size)

    def commit(self, staged: StagedBlob, meta: dict[str, Any]) -> Committed:
        """Make a staged blob visible under its id, with ``meta`` if it has none yet.

        The first commit of some content wins: an existing blob is never
        overwritten (unless its size shows it is damaged, when the verified
        bytes replace it atomically) and existing metadata is kept.

        Returns:
            Whether the blob is new, and the metadata now stored for it.
        """
        blob_path = self._blob_path(staged.hex)
        try:
            created = self._link_into_place(staged, blob_path)
        except OSError as exc:
            raise _store_error(exc, 'storing a blob') from exc
        finally:
            staged.discard()
        stored = self.read_meta(staged.digest)
        if stored is None:
            stored = self._write_meta(staged.hex, meta)
        return Committed(created, stored)

    def _link_into_place(self, staged: StagedBlob, final_path: str) -> bool:
        with contextlib.suppress(FileNotFoundError):
            if os.stat(final_path).st_size == staged.size:
                # PERF: already stored; a copy about to be discarded needs no fsync.
                return False
        os.fsync(staged.fileno())
        directory = os.path.dirname(final_path)
        os.makedirs(directory, exist_ok=True)
        try:
            os.link(staged.path, final_path)
        except FileExistsError:
            if os.stat(final_path).st_size == staged.size:
                return False
            # NOTE: a blob of the wrong size under this name was damaged by
            # something outside ISS (the seed wrote in place, without sync);
            # the staged bytes are verified, so they take its place atomically.
            log.warning('replacing damaged blob %s', final_path)
            os.replace(staged.path, final_path)
        _fsync_directory(directory)
        return True

    def _write_meta(self, hex_digest: str, meta: dict[str, Any]) -> dict[str, Any]:
        """Write ``meta`` unless another writer got there first; return what is stored."""
        meta_path = self._meta_path(hex_digest)
        try:
            fd, temp_path = self._new_temp()
            try:
                _write_all(fd, json.dumps(meta, separators=(',', ':')).encode())
                os.fsync(fd)
                os.makedirs(os.path.dirname(meta_path), exist_ok=True)
                os.link(temp_path, meta_path)
                _fsync_directory(os.path.dirname(meta_path))
            except FileExistsError:
                return self.read_meta('sha256:' + hex_digest) or meta
            finally:
                _remove_temp(fd, temp_path)
        except OSError as exc:
            raise _store_error(exc, 'writing metadata') from exc
        return meta

    # -- reading -------------------------------------------------------------

    def open(self, blob_id: str) -> OpenBlob:
        """Open a stored blob for reading.

        Raises:
            BlobNotFound: nothing is stored under ``blob_id``.
            StoreUnavailable: the blob exists but cannot be read.
        """
        path = self._blob_path(parse_id(blob_id))
        try:
            file = open(path, 'rb')  # noqa: SIM115 - the caller owns and closes it
        except FileNotFoundError:
            raise BlobNotFound(blob_id) from None
        except OSError as exc:
            raise _store_error(exc, 'opening a blob') from exc
        return OpenBlob(file, os.fstat(file.fileno()).st_size)

    def size(self, blob_id: str) -> int:
        """Return the size of a stored blob in bytes (raises like :meth:`open`)."""
        path = self._blob_path(parse_id(blob_id))
        try:
            return os.stat(path).st_size
        except FileNotFoundError:
            raise BlobNotFound(blob_id) from None
        except OSError as exc:
            raise _store_error(exc, 'reading a blob') from exc

    def relative_path(self, blob_id: str) -> str:
        """Return where a blob lives below ``blobs/`` (``ab/cd/<hex>``), for a proxy to serve it."""
        hex_digest = parse_id(blob_id)
        return f'{hex_digest[0:2]}/{hex_digest[2:4]}/{hex_digest}'

    def read_meta(self, blob_id: str) -> dict[str, Any] | None:
        """Return a blob's stored metadata, or None when it has none (or it is unreadable)."""
        path = self._meta_path(parse_id(blob_id))
        try:
            with open(path, 'rb') as file:
                meta = json.load(file)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning('ignoring unreadable metadata %s: %s', path, exc)
            return None
        return meta if isinstance(meta, dict) else None

    # -- housekeeping --------------------------------------------------------

    def check(self) -> dict[str, Any]:
        """Prove the data directory is usable by writing to it; return free space.

        Raises:
            StoreFull: not even a byte can be written.
            StoreUnavailable: the directory is gone, read-only or failing.
        """
        for directory in (self._blobs, self._meta):
            if not os.path.isdir(directory):
                raise StoreUnavailable(f'{directory} is missing')
        try:
            fd, path = self._new_temp()
            try:
                os.write(fd, b'.')
            finally:
                _remove_temp(fd, path)
            usage = os.statvfs(self.root)
        except OSError as exc:
            raise _store_error(exc, 'writing to the data directory') from exc
        return {'free_bytes': usage.f_bavail * usage.f_frsize}

    def sweep_temp(self) -> int:
        """Remove temp files left by dead processes; return how many went.

        A temp file whose flock can be taken has no live writer: its process
        died (crash, SIGKILL, power loss) before committing it.
        """
        removed = 0
        for entry in os.scandir(self._tmp):
            try:
                fd = os.open(entry.path, os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue
            else:
                os.unlink(entry.path)
                removed += 1
            finally:
                os.close(fd)
        return removed


def _remove_temp(fd: int, path: str) -> None:
    """Remove a temp file we hold; unlink first, so no sweeper can get between."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    """Write all of ``data``; os.write may write less, e.g. when the disk fills."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _fsync_directory(path: str) -> None:
    """Make a new directory entry durable (the link itself, not just the bytes)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
