"""The content-addressed blob store behind ISS: its interface, and the store on a local disk.

The promise, for every backend: a blob is either wholly there with the bytes
its name says, or not there at all. An upload is staged (hashed while it
streams, invisible), then committed under its digest; an existing blob is
never overwritten, so concurrent uploads of the same content all succeed
with one blob.

:class:`BlobStore` is all the resources in ``iss.py`` know of a store.
:class:`FileStore` implements it on a data directory (see ``disk.py`` for the
layout and the write path); its index is an :class:`index.SQLiteIndex` under
the same directory unless another is given. The maintenance commands (fsck,
gc) are in ``maintenance.py``, the derivative cache in ``derived.py``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import IO, Any, Protocol

from iss_server import disk, index, meta
from iss_server.blobs import BlobStat, Committed, OpenBlob, parse_id
from iss_server.derived import DerivedCache
from iss_server.errors import BlobNotFound, IndexIncomplete, StoreFailure, StoreUnavailable

log = logging.getLogger('iss.storage')


class Readable(Protocol):
    def readinto(self, buffer: memoryview, /) -> int: ...


class Staged(Protocol):
    """An upload received whole and hashed, not yet visible; leaving its ``with`` block discards it."""

    #: The content's id, ``sha256:<hex>``.
    digest: str
    size: int

    def open(self) -> IO[bytes]:
        """The staged bytes, to inspect them before commit (the caller closes it)."""

    def discard(self) -> None:
        """Throw the bytes away; a no-op once committed or discarded."""

    def __enter__(self) -> Staged: ...

    def __exit__(self, *exc_info: object) -> None: ...


class BlobStore(Protocol):
    """What ISS needs of a store, whatever holds the bytes.

    Ids are ``sha256:<hex>`` strings; a malformed one raises
    :class:`errors.InvalidId`, an absent blob :class:`errors.BlobNotFound`,
    and a store that cannot work right now :class:`errors.StoreUnavailable`
    or :class:`errors.StoreFull` (both :class:`errors.StoreFailure`).
    """

    #: Cached derivatives of the blobs (see :class:`derived.DerivedCache`).
    derived: DerivedCache

    def start(self) -> None:
        """Housekeeping when a service starts on the store (once per process)."""

    def stage(self, stream: Readable, expected: str | None = None) -> Staged:
        """Receive ``stream`` to its end, hashing it; whatever reading it raises propagates.

        ``expected``: the id the bytes claim (a PUT): a store may start moving them to
        their final place while they arrive (the S3 store's multipart upload), to be
        completed by the commit only when they hash to it. The caller still compares.
        """

    def commit(self, staged: Staged, new_meta: dict[str, Any]) -> Committed:
        """Make a staged blob visible under its digest, with ``new_meta`` unless it has meta already."""

    def commit_all(self, uploads: list[tuple[Staged, dict[str, Any]]]) -> list[Committed]:
        """:meth:`commit` for each upload, in order, as one group: what costs per commit is paid once.

        Content given twice is stored once (the later one answers as already stored).
        """

    def open(self, blob_id: str) -> OpenBlob:
        """Open a stored blob for reading."""

    def stat(self, blob_id: str) -> BlobStat:
        """A stored blob's size and version."""

    def proxy_path(self, blob_id: str) -> str:
        """Where a proxy in front finds the blob, below its internal location (``ISS_ACCEL_REDIRECT``).

        On disk: ``ab/cd/<hex>`` below ``blobs/``; on S3: a presigned URL's path and query.
        """

    def presigned_url(self, blob_id: str, *, seconds: int, overrides: dict[str, str] | None = None) -> str:
        """A URL that reads the blob straight from its backend for ``seconds`` (``ISS_S3_REDIRECT``).

        ``overrides`` are the ``response-*`` headers the backend answers with. Only a
        store whose backend serves URLs has it (the S3 store); ISS asks only then.
        """

    def read_meta(self, blob_id: str) -> dict[str, Any] | None:
        """A blob's stored meta, or None when it has none."""

    def complete_meta(self, blob_id: str, fields: dict[str, Any]) -> dict[str, Any]:
        """Add the ``fields`` a blob's meta lacks (never changing a key it has); return the meta."""

    def delete(self, blob_id: str) -> None:
        """Remove a blob, its meta, its index row and its derivatives."""

    def missing(self, blob_ids: list[str]) -> list[str]:
        """The ids that name no stored blob, in order, once each."""

    def list(self, collection: str, *, limit: int, **filters: Any) -> index.Page:
        """A page of the index, newest first (see :meth:`index.Index.page`)."""

    def totals(self) -> dict[str, tuple[int, int]]:
        """``{kind: (count, bytes)}`` of every stored blob."""

    def check(self) -> dict[str, Any]:
        """Prove the store takes writes; return what it can say of its room (``free_bytes``)."""


class StagedBlob:
    """An upload written to a private temp file: hashed and sized, not yet visible.

    Returned by :meth:`FileStore.stage`. It keeps the temp file open, and so
    its flock held, until :meth:`FileStore.commit` links it into place or
    :meth:`discard` removes it.
    """

    def __init__(self, fd: int, path: str, digest: str, size: int) -> None:
        self._fd = fd
        self.path = path
        self.digest = digest
        self.size = size
        #: Work begun elsewhere for these bytes (an S3 multipart upload) that the commit
        #: completes; abandoned (its ``abort``) when the staged blob is discarded instead.
        self.upload: Any = None

    @property
    def hex(self) -> str:
        return self.digest[len('sha256:') :]

    def fileno(self) -> int:
        return self._fd

    def open(self) -> IO[bytes]:
        return open(self.path, 'rb')

    def discard(self) -> None:
        if self.upload is not None:
            self.upload, upload = None, self.upload
            upload.abort()
        if self._fd < 0:
            return
        # NOTE: unlink before close: while the fd is open the flock keeps
        # sweepers away, so the name is never removed by anyone else.
        disk.remove_temp(self._fd, self.path)
        self._fd = -1

    def __enter__(self) -> StagedBlob:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.discard()


class Listings:
    """Listings and totals through a store's index, for every store: 503 until the index is complete."""

    index: index.Index

    def list(self, collection: str, *, limit: int, **filters: Any) -> index.Page:
        """A page of the index, newest first (see :meth:`index.Index.page`).

        Raises:
            IndexIncomplete: the index is still being built.
            InvalidCursor: the cursor is not one a page handed out.
        """
        self._require_complete_index()
        return self.index.page(collection, limit=limit, **filters)

    def totals(self) -> dict[str, tuple[int, int]]:
        """``{kind: (count, bytes)}`` of every stored blob (raises like :meth:`list`)."""
        self._require_complete_index()
        return self.index.totals()

    def _require_complete_index(self) -> None:
        if not self.index.complete:
            raise IndexIncomplete('the index is being built from the blobs')


class FileStore(Listings):
    """Blobs and their metadata in a directory tree, written atomically.

    Args:
        root: The data directory. Its subdirectories are created when
            missing; if that fails the store still starts, and :meth:`check`
            (the health endpoint) says what is wrong.
        index: The index of its blobs (``index.open_index``: the SQLite file
            ``index.sqlite3`` in the data directory, or a shared PostgreSQL).
        derived_max_bytes: The bound of the derivative cache.
    """

    # PERF: a rebuild writes rows by transactions of this many; uploads wait for one at most.
    _REINDEX_BATCH = 500

    def __init__(self, root: str, index: index.Index, derived_max_bytes: int = 1024**3) -> None:
        self.layout = disk.Layout(root)
        self.root = self.layout.root
        self.index = index
        self.derived = DerivedCache(self.layout, derived_max_bytes)
        try:
            for directory in (self.layout.blobs, self.layout.meta, self.layout.tmp):
                os.makedirs(directory, exist_ok=True)
            if not self.index.complete and next(self.layout.blob_files(), None) is None:
                self.index.mark_complete()  # NOTE: an empty store's index is complete as it is
        except (OSError, StoreFailure) as exc:
            log.error('data directory %s is not usable: %s', self.root, exc)

    def start(self) -> None:
        """Sweep what writes killed mid-way left in tmp/, and index a store that has no complete index.

        The index is built in the background (a data directory of the FastAPI
        version): listings answer 503 until it is done. Every worker starts one;
        the first does the work and the others find it done (see :meth:`reindex`).
        """
        try:
            swept = self.sweep_temp()
        except OSError as exc:
            log.error('data directory %s is not usable: %s', self.root, exc)
            return
        if swept:
            log.warning('removed %d stale temp file(s) from %s', swept, self.root)
        try:
            if self.index_complete:
                return
        except StoreFailure:
            return  # NOTE: the health endpoint reports an unusable data directory
        index_in_background(self, self.root)

    # -- writing -------------------------------------------------------------

    def stage(self, stream: Readable, expected: str | None = None) -> StagedBlob:
        """Copy ``stream`` to a temp file until EOF, computing its sha256 (see :func:`stage_file`).

        NOTE: ``expected`` changes nothing here: the bytes are linked into place by the commit.
        """
        return stage_file(self.layout, stream)

    def commit(self, staged: StagedBlob, new_meta: dict[str, Any]) -> Committed:
        """Make a staged blob visible under its id, with ``new_meta`` if it has none yet (see :meth:`commit_all`)."""
        return self.commit_all([(staged, new_meta)])[0]

    def commit_all(self, uploads: list[tuple[StagedBlob, dict[str, Any]]]) -> list[Committed]:
        """Make staged blobs visible under their ids, each with its meta unless it has some; one group commit.

        The first commit of some content wins: an existing blob is never
        overwritten (unless its size shows it is damaged, when the verified
        bytes replace it atomically) and existing metadata is kept; content
        given twice is stored once. However many uploads there are, the disk
        is flushed three times (:class:`disk.Flusher`, shared with every commit
        running meanwhile): once for the staged bytes and the new metas' bytes,
        once for the blobs' names, once for the metas' names. So a crash leaves
        each blob wholly there or not at all, and never a meta without its blob.
        Every blob is held (flock) from its check to its index row, so a
        concurrent :meth:`delete` of the same content happens wholly before or
        wholly after; blobs are taken in the order of their ids, so two groups
        sharing content never wait for each other in a circle.

        Returns:
            For each upload, in order: whether its blob is new, and the meta now stored for it.
        """
        firsts: dict[str, tuple[StagedBlob, dict[str, Any]]] = {}
        for staged, new_meta in uploads:
            firsts.setdefault(staged.hex, (staged, new_meta))
        try:
            with disk.translated('storing a blob'), contextlib.ExitStack() as held:
                outcome = self._commit_group(sorted(firsts.items()), held)
        finally:
            for staged, _ in uploads:
                staged.discard()
        # NOTE: content given again later in the same group was stored by its first upload.
        return [
            outcome[staged.hex] if firsts[staged.hex][0] is staged else Committed(False, outcome[staged.hex].meta)
            for staged, _ in uploads
        ]

    def _commit_group(
        self, uploads: list[tuple[str, tuple[StagedBlob, dict[str, Any]]]], held: contextlib.ExitStack
    ) -> dict[str, Committed]:
        """:meth:`commit_all` for distinct contents sorted by id; locks and temp files go on ``held``."""
        stored: dict[str, dict[str, Any] | None] = {}
        new: list[tuple[str, StagedBlob, bool]] = []  # (hex, staged, replacing a damaged blob)
        for hex_digest, (staged, _) in uploads:
            fd = disk.lock_file(self.layout.blob(hex_digest), fcntl.LOCK_SH)
            if fd is None:
                new.append((hex_digest, staged, False))
                continue
            held.callback(os.close, fd)
            if os.fstat(fd).st_size == staged.size:
                # PERF: already stored; a copy about to be discarded needs no flush.
                stored[hex_digest] = self.read_meta('sha256:' + hex_digest)
            else:
                # NOTE: a blob of the wrong size under this name was damaged by something
                # outside ISS (the seed wrote in place, without sync); the staged bytes
                # are verified, so they take its place atomically.
                log.warning('replacing damaged blob %s', self.layout.blob(hex_digest))
                new.append((hex_digest, staged, True))
        metas = {hex_digest: new_meta for hex_digest, (_, new_meta) in uploads}
        # NOTE: a meta is readied for every blob that may need one, so one flush covers its bytes.
        meta_temps = {
            hex_digest: self._meta_temp(metas[hex_digest], held)
            for hex_digest, _ in uploads
            if hex_digest not in stored or stored[hex_digest] is None
        }
        if meta_temps:
            self.layout.flush()  # the staged bytes and the metas' bytes
        for hex_digest, staged, replace in new:
            # NOTE: once linked, the staged file's own exclusive flock holds the blob.
            if not self._link_blob(hex_digest, staged, replace, held):
                stored[hex_digest] = self.read_meta('sha256:' + hex_digest)
        if new:
            self.layout.flush()  # the blobs' names: before any meta's, never a meta without its blob
        created = {hex_digest for hex_digest, _, _ in new} - stored.keys()
        linked_metas = False
        for hex_digest, temp_path in meta_temps.items():
            if hex_digest in created or stored[hex_digest] is None:
                if disk.link(temp_path, self.layout.meta_file(hex_digest)):
                    stored[hex_digest], linked_metas = metas[hex_digest], True
                else:  # NOTE: another writer's meta got there first; it stays
                    stored[hex_digest] = self.read_meta('sha256:' + hex_digest) or metas[hex_digest]
        if linked_metas:
            self.layout.flush()  # the metas' names
        now = time.time()
        self.index.put_missing(
            [index.row_for(hex_digest, stored[hex_digest], now, staged.size) for hex_digest, (staged, _) in uploads]
        )
        return {hex_digest: Committed(hex_digest in created, stored[hex_digest]) for hex_digest, _ in uploads}

    def _meta_temp(self, new_meta: dict[str, Any], held: contextlib.ExitStack) -> str:
        """A temp file holding ``new_meta``, removed when ``held`` closes; its path."""
        fd, temp_path = self.layout.new_temp()
        held.callback(disk.remove_temp, fd, temp_path)
        disk.write_all(fd, meta.encode(new_meta))
        return temp_path

    def _link_blob(self, hex_digest: str, staged: StagedBlob, replace: bool, held: contextlib.ExitStack) -> bool:
        """Give the staged bytes the blob's name; False when another upload did first (then theirs is held)."""
        final_path = self.layout.blob(hex_digest)
        while not disk.link(staged.path, final_path, replace=replace):
            fd = disk.lock_file(final_path, fcntl.LOCK_SH)
            if fd is not None:  # NOTE: None: deleted meanwhile; link ours after all
                held.callback(os.close, fd)
                return False
        return True

    def write_meta(self, hex_digest: str, meta_doc: dict[str, Any], *, replace: bool = False) -> dict[str, Any]:
        """Write a blob's meta (unless another writer got there first); return what is stored."""
        with disk.translated('writing metadata'):
            placed, _ = disk.write_atomically(
                self.layout, self.layout.meta_file(hex_digest), disk.write_bytes(meta.encode(meta_doc)), replace=replace
            )
        return meta_doc if placed else self.read_meta('sha256:' + hex_digest) or meta_doc

    def delete(self, blob_id: str) -> None:
        """Remove a blob, its meta, its index row and its derivatives.

        A reader that opened the blob before keeps reading the whole of it; one
        that comes after gets :class:`BlobNotFound`. The blob is held (flock)
        throughout, and its meta and row go before its bytes: a commit of the
        same content waits, then stores it anew with its own meta.
        A crash part way leaves the blob without meta or row, which ``fsck``
        reports (the client was not told the delete succeeded).
        """
        hex_digest = parse_id(blob_id)
        with disk.translated('deleting a blob'), disk.hold(self.layout, hex_digest, fcntl.LOCK_EX):
            disk.unlink_durably(self.layout, self.layout.meta_file(hex_digest))
            self.index.remove(hex_digest)
            self.derived.remove(hex_digest)
            disk.unlink_durably(self.layout, self.layout.blob(hex_digest))

    def complete_meta(self, blob_id: str, fields: dict[str, Any]) -> dict[str, Any]:
        """Add to a blob's meta the ``fields`` it lacks, never changing a key it has; return it.

        For meta written by the FastAPI version, which knew less. The file is
        replaced atomically (a reader sees the old or the new one) and the
        index row follows.

        Raises:
            BlobNotFound: the blob is not stored (or was deleted meanwhile).
        """
        hex_digest = parse_id(blob_id)
        with disk.translated('completing metadata'), disk.hold(self.layout, hex_digest) as blob:
            stored = self.read_meta(blob_id) or {}
            missing = {key: value for key, value in fields.items() if key not in stored}
            if not missing:
                return stored
            stored = self.write_meta(hex_digest, {**stored, **missing}, replace=True)
            self.index.put(self.index_row(hex_digest, os.fstat(blob)))
        return stored

    # -- reading -------------------------------------------------------------

    def open(self, blob_id: str) -> OpenBlob:
        """Open a stored blob for reading.

        Raises:
            BlobNotFound: nothing is stored under ``blob_id``.
            StoreUnavailable: the blob exists but cannot be read.
        """
        path = self.layout.blob(parse_id(blob_id))
        try:
            file = open(path, 'rb')  # noqa: SIM115 - the caller owns and closes it
        except FileNotFoundError:
            raise BlobNotFound(blob_id) from None
        except OSError as exc:
            raise disk.store_error(exc, 'opening a blob') from exc
        return OpenBlob(file, BlobStat.of(os.fstat(file.fileno())))

    def stat(self, blob_id: str) -> BlobStat:
        """Return a stored blob's size and version (raises like :meth:`open`)."""
        path = self.layout.blob(parse_id(blob_id))
        try:
            return BlobStat.of(os.stat(path))
        except FileNotFoundError:
            raise BlobNotFound(blob_id) from None
        except OSError as exc:
            raise disk.store_error(exc, 'reading a blob') from exc

    def proxy_path(self, blob_id: str) -> str:
        """Where a blob lives below ``blobs/`` (``ab/cd/<hex>``), for a proxy to serve it."""
        hex_digest = parse_id(blob_id)
        return f'{hex_digest[0:2]}/{hex_digest[2:4]}/{hex_digest}'

    def read_meta(self, blob_id: str) -> dict[str, Any] | None:
        """Return a blob's stored metadata, or None when it has none (or it is unreadable)."""
        path = self.layout.meta_file(parse_id(blob_id))
        try:
            with open(path, 'rb') as file:
                stored = json.load(file)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning('ignoring unreadable metadata %s: %s', path, exc)
            return None
        return stored if isinstance(stored, dict) else None

    def missing(self, blob_ids: list[str]) -> list[str]:
        """Return the ids in ``blob_ids`` that name no stored blob, in order, once each."""
        paths = {blob_id: self.layout.blob(parse_id(blob_id)) for blob_id in blob_ids}
        return [blob_id for blob_id, path in paths.items() if not os.path.exists(path)]

    def is_stored(self, hex_digest: str) -> bool:
        return os.path.exists(self.layout.blob(hex_digest))

    # -- housekeeping --------------------------------------------------------

    def check(self) -> dict[str, Any]:
        """Prove the data directory is usable by writing to it; return free space.

        Raises:
            StoreFull: not even a byte can be written.
            StoreUnavailable: the directory is gone, read-only or failing.
        """
        for directory in (self.layout.blobs, self.layout.meta):
            if not os.path.isdir(directory):
                raise StoreUnavailable(f'{directory} is missing')
        with disk.translated('writing to the data directory'):
            fd, path = self.layout.new_temp()
            try:
                os.write(fd, b'.')
            finally:
                disk.remove_temp(fd, path)
            usage = os.statvfs(self.root)
        # NOTE: after the directory: a read-only or full disk is named as such, not as the index on it.
        self.index.complete  # noqa: B018 - a read that raises IndexUnavailable when the index is down
        return {'free_bytes': usage.f_bavail * usage.f_frsize}

    def sweep_temp(self, *, dry_run: bool = False) -> int:
        """Remove temp files left by dead processes (see :func:`sweep_temp`)."""
        return sweep_temp(self.layout, dry_run=dry_run)

    # -- the index -------------------------------------------------------------

    @property
    def index_complete(self) -> bool:
        return self.index.complete

    def reindex(self, *, only_if_incomplete: bool = False) -> dict[str, int]:
        """Rebuild the index from the files, which stay the truth; safe while ISS runs.

        One rebuild runs at a time (an flock on ``index.lock``); with
        ``only_if_incomplete``, one that finds the index complete returns at once.

        Returns:
            ``blobs`` seen, rows ``changed`` (added or corrected), stale rows ``removed``.
        """
        with open(self.layout.lock_file('index'), 'a') as lock, self.index.session():
            fcntl.flock(lock, fcntl.LOCK_EX)
            if only_if_incomplete and self.index_complete:
                return {}
            counts = {'blobs': 0, 'changed': 0, 'removed': 0}
            self.index.start_rebuild()
            batch: list[str] = []
            for hex_digest, _ in self.layout.blob_files():
                if hex_digest is not None:
                    batch.append(hex_digest)
                if len(batch) == self._REINDEX_BATCH:
                    self._reindex_batch(batch, counts)
                    batch = []
            self._reindex_batch(batch, counts)
            for hex_digest in self.index.unseen():
                if not self.is_stored(hex_digest):
                    counts['removed'] += self.index.remove(hex_digest)
            self.index.mark_complete()
        return counts

    def _reindex_batch(self, batch: list[str], counts: dict[str, int]) -> None:
        # NOTE: a blob held by a commit or delete is not waited for inside the
        # transaction (that commit may be waiting for the index): it is done after.
        held: list[str] = []
        with self.index.transaction():
            for hex_digest in batch:
                try:
                    self._reindex_one(hex_digest, fcntl.LOCK_SH | fcntl.LOCK_NB, counts)
                except BlockingIOError:
                    held.append(hex_digest)
        for hex_digest in held:
            self._reindex_one(hex_digest, fcntl.LOCK_SH, counts)

    def _reindex_one(self, hex_digest: str, lock: int, counts: dict[str, int]) -> None:
        with contextlib.suppress(BlobNotFound), disk.hold(self.layout, hex_digest, lock) as fd:
            row = self.index_row(hex_digest, os.fstat(fd))
            counts['blobs'] += 1
            counts['changed'] += self.index.put(row)
            self.index.saw(hex_digest)

    def stored_blobs(self) -> Iterator[tuple[str, int]]:
        """Every blob in the data directory: its hex and size."""
        for hex_digest, entry in self.layout.blob_files():
            if hex_digest is not None:
                with contextlib.suppress(FileNotFoundError):
                    yield hex_digest, entry.stat().st_size

    def index_row(self, hex_digest: str, stat: os.stat_result) -> index.Row:
        """The row the index should have for a stored blob."""
        return index.row_for(hex_digest, self.read_meta('sha256:' + hex_digest), stat.st_mtime, stat.st_size)


def index_in_background(store: FileStore | Any, where: str) -> None:
    """Build a store's incomplete index in a thread: listings answer 503 until it is done.

    Every worker starts one; the first does the work and the others find it done
    (the store's ``reindex(only_if_incomplete=True)``).
    """

    def build() -> None:
        try:
            counts = store.reindex(only_if_incomplete=True)
        except Exception:
            log.exception('building the index failed; run python -m iss reindex')
        else:
            if counts:
                log.warning('indexed %d blobs found in %s', counts['blobs'], where)

    threading.Thread(target=build, name='iss-reindex', daemon=True).start()


def stage_file(layout: disk.Layout, stream: Readable, also: Callable[[memoryview], None] | None = None) -> StagedBlob:
    """Copy ``stream`` to a temp file under ``layout.tmp`` until EOF, computing its sha256.

    How every store receives an upload (an S3 store spools it on the node's own
    disk). The bytes are synced by the commit, and only if they are new.
    Whatever ``stream.readinto`` raises (a size limit, a client that went away)
    propagates unchanged after the temp file is removed. ``also`` sees each piece
    as it is written (a view, valid until the next piece).

    Raises:
        StoreFull: the disk filled up (the temp file is removed).
        StoreUnavailable: the data directory cannot be written.
    """
    with disk.translated('creating a temp file'):
        fd, path = layout.new_temp()
    sha256 = hashlib.sha256()
    size = 0
    try:
        for piece in written(fd, stream):
            sha256.update(piece)
            size += len(piece)
            if also is not None:
                also(piece)
    except BaseException:
        disk.remove_temp(fd, path)
        raise
    return StagedBlob(fd, path, 'sha256:' + sha256.hexdigest(), size)


def sweep_temp(layout: disk.Layout, *, dry_run: bool = False) -> int:
    """Remove temp files left by dead processes under ``layout.tmp``; return how many went (or would go).

    A temp file whose flock can be taken has no live writer: its process
    died (crash, SIGKILL, power loss) before committing it.
    """
    removed = 0
    for entry in os.scandir(layout.tmp):
        if entry.is_dir(follow_symlinks=False):
            continue  # NOTE: tmp/uploads/ holds resumable uploads, which outlive processes
        try:
            fd = os.open(entry.path, os.O_RDONLY)
        except FileNotFoundError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue
        else:
            if not dry_run:
                os.unlink(entry.path)
            removed += 1
        finally:
            os.close(fd)
    return removed


_FIRST_CHUNK_BYTES = 64 * 1024
# PERF: 1 MiB reads keep the per-chunk Python overhead small next to
# hashing (~1.4 GB/s) while bounding memory per upload.
_CHUNK_SIZE = 1024 * 1024
# PERF: how often a large upload asks the disk to start writing what it received.
_WRITEBACK_BYTES = 8 * 1024 * 1024


def written(fd: int, stream: Readable, start: int = 0) -> Iterator[memoryview]:
    """Write ``stream`` into ``fd`` from offset ``start`` until EOF, yielding each piece once it is written.

    The one way an upload's bytes reach a file (a staged blob, a chunk of a resumable
    upload): the caller hashes or counts what is yielded. Whatever reading raises
    propagates, after the pieces yielded before it were written.
    """
    os.lseek(fd, start, os.SEEK_SET)
    position = written_back = start
    for piece in _chunks(stream, _CHUNK_SIZE):
        with disk.translated('writing an upload'):
            disk.write_all(fd, piece)
        position += len(piece)
        if position - written_back >= _WRITEBACK_BYTES:
            disk.start_writeback(fd, written_back, position - written_back)
            written_back = position
        yield piece


def _chunks(stream: Readable, size: int) -> Iterator[memoryview]:
    """The bytes of ``stream`` in pieces of at most ``size``, until EOF.

    PERF: ``readinto`` fills a reused buffer: each piece is a view of it, valid
    until the next one is asked for.
    """
    # PERF: a small upload never needs the full size, and a fresh 1 MiB buffer costs
    # ~0.6 ms (mmap'd, faulted in, zeroed: gunicorn.conf.py pins the mmap threshold);
    # the first read that fills the small one says the upload is large.
    buffer = memoryview(bytearray(min(size, _FIRST_CHUNK_BYTES)))
    while count := stream.readinto(buffer):
        yield buffer[:count]
        if count == len(buffer) < size:
            buffer = memoryview(bytearray(size))
