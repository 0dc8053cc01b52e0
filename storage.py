"""The content-addressed blob store behind ISS, written once over a small driver.

The promise, for every backend: a blob is either wholly there with the bytes
its name says, or not there at all. An upload is staged (spooled on the node's
disk and hashed while it streams, invisible), then committed under its digest;
an existing blob is never overwritten, so concurrent uploads of the same
content all succeed with one blob.

:class:`BlobStore` holds every rule of that promise (dedup, the order of blob,
meta and index row, delete, quarantine, completing old meta, reindex, check)
over a :class:`drivers.Driver`, which only stores bytes under keys: the seed's
layout, ``blobs/ab/cd/<hex>`` and ``meta/ab/cd/<hex>.json``, on a data
directory (``drivers/file.py``) or in an S3 bucket (``drivers/s3.py``).
:func:`open_store` is the one place that chooses a driver. The node's own
scratch (``tmp/``: uploads being received; ``derived/``: the derivative
cache; ``copies/``: verified copies of small blobs of a remote backend) is a
:class:`disk.Layout` of ``ISS_DATA``. The maintenance commands (fsck, gc) are
in ``maintenance.py``, over the same API.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import fcntl
import hashlib
import io
import itertools
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import IO, Any, Protocol

from iss_server import disk, index, meta
from iss_server.blobs import BlobStat, Committed, OpenBlob, parse_id
from iss_server.config import ConfigError, Settings
from iss_server.derived import DerivedCache
from iss_server.drivers import Busy, Driver, Group, KeyNotFound, Stat, Writer
from iss_server.drivers.file import FileDriver
from iss_server.errors import (
    BlobNotFound,
    CorruptBlob,
    IndexIncomplete,
    IndexUnavailable,
    ServiceError,
    StoreFailure,
    StoreUnavailable,
)

log = logging.getLogger('iss.storage')

# PERF: a remote backend's blobs up to this size are kept on each node that reads them (see
# BlobStore.open): a 4 KiB GET costs one indexed lookup instead of a signed S3 request
# (bench/s3.py: 194 -> 700-1,030 req/s).
_NODE_COPY_BYTES = 256 * 1024
# PERF: /blobs/missing asks the backend about this many ids at once.
_LOOKUPS_IN_FLIGHT = 16
# NOTE: a few hundred blobs at a time: memory stays flat on a store of millions.
_REINDEX_BATCH = 500
# NOTE: how long a writer waits for an earlier writer of the same content (then it writes too:
# the conditional puts keep one copy), and how often it looks.
_SINGLE_FLIGHT_SECONDS = 60.0
_SINGLE_FLIGHT_POLL_SECONDS = 0.05
# PERF: smaller content is written by each of its writers (a look at the others' intents costs more).
_SINGLE_FLIGHT_MIN_BYTES = 1024 * 1024
_READ_BYTES = 1024 * 1024

_KEY_PATTERN = re.compile(r'(?:blobs|meta)/[0-9a-f]{2}/[0-9a-f]{2}/([0-9a-f]{64})(?:\.json)?')


def blob_key(hex_digest: str) -> str:
    return f'blobs/{hex_digest[0:2]}/{hex_digest[2:4]}/{hex_digest}'


def meta_key(hex_digest: str) -> str:
    return f'meta/{hex_digest[0:2]}/{hex_digest[2:4]}/{hex_digest}.json'


def hex_of(top: str, key: str) -> str | None:
    """The blob's hex a key under ``top/`` (``blobs``, ``meta``) names, or None for a stray key."""
    match = _KEY_PATTERN.fullmatch(key)
    if match is None or key != (blob_key if top == 'blobs' else meta_key)(match.group(1)):
        return None
    return match.group(1)


#: The meta a commit gives a blob that has none: the document, or what makes it when the commit needs it.
NewMeta = dict[str, Any] | Callable[[], dict[str, Any]]


def _made(new_meta: NewMeta) -> dict[str, Any]:
    return new_meta() if callable(new_meta) else new_meta


class Readable(Protocol):
    def readinto(self, buffer: memoryview, /) -> int: ...


class StagedBlob:
    """An upload written to a private temp file of the spool: hashed and sized, not yet visible.

    It keeps the temp file open, and so its flock held, until the commit puts
    it in place or :meth:`discard` removes it. It is a :class:`drivers.Source`.
    A small upload waits in memory instead (:meth:`in_memory`) until the commit
    finds its content new and :meth:`spool` writes it.
    """

    def __init__(self, fd: int, path: str, digest: str, size: int) -> None:
        self._fd = fd
        self._path = path
        self.digest = digest
        self.size = size
        #: The object a driver began writing while the bytes arrived (a PUT's claimed
        #: digest): the commit commits it, a discard cancels it.
        self.writer: Writer | None = None
        #: The bytes of a small upload not written yet, and the spool they go to.
        self._waiting: tuple[disk.Layout, bytes] | None = None
        self._waiting_taken = size  # NOTE: what they count in _waiting_in_memory while they wait

    @classmethod
    def in_memory(cls, layout: disk.Layout, data: bytes) -> StagedBlob:
        """A small upload held in memory: written to ``layout``'s spool only when :meth:`spool` is called.

        NOTE: past :data:`_WAITING_BYTES` held by this process (a batch of many small
        files, many threads), it is written at once: memory stays bounded.
        """
        staged = cls(-1, '', 'sha256:' + hashlib.sha256(data).hexdigest(), len(data))
        staged._waiting = (layout, data)
        if not _waiting_in_memory.take(len(data)):
            staged._waiting_taken = 0
            staged.spool()
        return staged

    def spool(self) -> None:
        """Write bytes waiting in memory to a temp file of the spool; a no-op when they are in one.

        PERF: the commit calls it for new content only (before the flush that makes staged
        bytes durable), so content already stored is answered without any write.
        """
        if self._waiting is None:
            return
        layout, data = self._waiting
        with disk.translated('writing an upload'):
            fd, path = layout.new_temp()
            try:
                disk.write_all(fd, data)
            except BaseException:
                disk.remove_temp(fd, path)
                raise
        self._fd, self._path = fd, path
        self._stop_waiting()

    def _stop_waiting(self) -> None:
        if self._waiting is not None:
            self._waiting = None
            _waiting_in_memory.give(self._waiting_taken)

    @property
    def path(self) -> str:
        """The temp file holding the bytes (written now if they waited in memory)."""
        self.spool()
        return self._path

    @property
    def hex(self) -> str:
        return self.digest[len('sha256:') :]

    @property
    def sha256(self) -> str:
        return self.hex

    def fileno(self) -> int:
        self.spool()
        return self._fd

    def open(self) -> IO[bytes]:
        """The staged bytes, to inspect them before commit (the caller closes it)."""
        if self._waiting is not None:
            return io.BytesIO(self._waiting[1])
        return open(self._path, 'rb')

    def discard(self) -> None:
        """Throw the bytes away; a no-op once committed or discarded."""
        if self.writer is not None:
            writer, self.writer = self.writer, None
            writer.cancel()
        self._stop_waiting()
        if self._fd < 0:
            return
        # NOTE: unlink before close: while the fd is open the flock keeps
        # sweepers away, so the name is never removed by anyone else.
        disk.remove_temp(self._fd, self._path)
        self._fd = -1

    def __enter__(self) -> StagedBlob:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.discard()


class _Budget:
    """A count of bytes that may not pass a bound, shared by a process's threads."""

    def __init__(self, limit: int) -> None:
        self._left = limit
        self._lock = threading.Lock()

    def take(self, size: int) -> bool:
        """Count ``size`` more bytes, unless that would pass the bound (then False)."""
        with self._lock:
            if size > self._left:
                return False
            self._left -= size
            return True

    def give(self, size: int) -> None:
        with self._lock:
            self._left += size


class BlobStore:
    """Blobs and their meta over a driver; what ISS's resources and commands know of a store.

    Ids are ``sha256:<hex>`` strings; a malformed one raises
    :class:`errors.InvalidId`, an absent blob :class:`errors.BlobNotFound`,
    and a store that cannot work right now :class:`errors.StoreUnavailable`
    or :class:`errors.StoreFull` (both :class:`errors.StoreFailure`).

    Args:
        driver: Where the bytes live (see :mod:`iss_server.drivers`).
        index: The index of the blobs (``index.open_index``).
        scratch: The node's own directory (``ISS_DATA``): the spool of uploads under
            ``tmp/`` (for a file driver, the data directory itself: a put links a
            spooled file), the derivative cache, the lock of a reindex.
        derived_max_bytes: The bound of the derivative cache (and of the node's copies).
        node_copies: Keep verified copies of small blobs on this node (a remote backend).
        intent_grace: Seconds after which a write's intent is taken for left behind (``ISS_RECONCILE_GRACE``).
    """

    def __init__(
        self,
        driver: Driver,
        index: index.Index,
        scratch: disk.Layout,
        *,
        derived_max_bytes: int = 1024**3,
        node_copies: bool = False,
        intent_grace: float = 300.0,
    ) -> None:
        self._driver = driver
        self.intent_grace = intent_grace
        #: This process's intents of writes in flight, renewed by a thread while there are any.
        self._alive: set[str] = set()
        self._alive_lock = threading.Lock()
        self._keeper: threading.Thread | None = None
        self.index = index
        self.layout = scratch
        self.root = scratch.root
        #: Cached derivatives of the blobs, rendered while the blob is held.
        self.derived = DerivedCache(scratch, derived_max_bytes, hold=self._held)
        # NOTE: not a derivative: the blob itself, verified, served while the index has its row.
        # PERF: its hold asks the bucket nothing (a HEAD was half the CPU of a first read, issue 28):
        # the bytes were just read and hashed to their name, and a copy a concurrent delete leaves
        # behind is never served (no row) and is swept by remove_node_orphans.
        self._copies = (
            DerivedCache(scratch, derived_max_bytes, hold=self._held_unasked, top='copies') if node_copies else None
        )
        self._index_building = threading.Lock()  # NOTE: held while this process builds the index
        try:
            os.makedirs(scratch.tmp, exist_ok=True)
            if not self.index.complete and next(self._driver.walk('blobs/'), None) is None:
                self.index.mark_complete()  # NOTE: an empty store's index is complete as it is
        except (OSError, StoreFailure) as exc:
            log.error('store %r is not usable: %s', driver, exc)

    def __repr__(self) -> str:
        return f'BlobStore({self._driver!r})'

    @property
    def driver(self) -> Driver:
        """Where the bytes live (resumable uploads of a bucket keep their parts there too)."""
        return self._driver

    @property
    def backend(self) -> str:
        """What ``/health`` names the blobs' backend: ``bucket`` or ``data directory``."""
        return self._driver.part

    def start(self) -> None:
        """Sweep what writes killed mid-way left in tmp/, and index a store that has no complete index.

        The index is built in the background (a data directory of the FastAPI
        version, a bucket filled by another tool): listings answer 503 until it
        is done. Every worker starts one; the first does the work and the others
        find it done (see :meth:`reindex`).
        """
        try:
            swept = self.sweep_temp()
        except OSError as exc:
            log.error('scratch directory %s is not usable: %s', self.root, exc)
            return
        if swept:
            log.warning('removed %d stale temp file(s) from %s', swept, self.root)
        # NOTE: in the background: a frozen service would hold the worker's start for its deadline.
        threading.Thread(target=self._create_backend, name='iss-create-backend', daemon=True).start()
        self._build_index_unless_complete()

    def _create_backend(self) -> None:
        """Create the backend's bucket if it is missing (a fresh S3 service), so readiness needs no first write.

        NOTE: every worker of every node asks; one creates it, the others find it there. One that
        cannot (the service down, credentials that may not) logs why; /health/ready asks again.
        """
        try:
            self._driver.create()
        except StoreFailure as exc:
            log.error('could not make sure the store %s exists: %s', self._driver, exc)

    def _build_index_unless_complete(self) -> None:
        """Build the index in the background when incomplete (new, lost, set aside as corrupt), one build at a time."""
        try:
            if self.index_complete:
                return
        except StoreFailure:
            return  # NOTE: the health endpoint reports what is down
        if self._index_building.acquire(blocking=False):
            index_in_background(self, repr(self._driver), done=self._index_building.release)

    # -- writing -------------------------------------------------------------

    def stage(self, stream: Readable, expected: str | None = None) -> StagedBlob:
        """Spool ``stream`` to a temp file until EOF, computing its sha256 (see :func:`stage_file`).

        ``expected``: the id the bytes claim (a PUT). A driver may write them to
        their final key while they arrive (the S3 driver's multipart upload), to be
        committed only when they hashed to it: receiving and sending overlap.
        The caller still compares.
        """
        if (
            expected is None
            or self._stored_or_being_stored(parse_id(expected))
            or (writer := self._driver.writer(blob_key(parse_id(expected)), expected[7:])) is None
        ):
            return stage_file(self.layout, stream)
        try:
            staged = stage_file(self.layout, stream, also=writer.write)
        except BaseException:
            writer.cancel()
            raise
        if staged.digest != expected:
            writer.cancel()  # NOTE: wrong bytes are never committed
        else:
            staged.writer = writer
        return staged

    def _stored_or_being_stored(self, hex_digest: str) -> bool:
        """Whether the content has its row, or a live writer on some node (a PUT then sends its bytes only if need be).

        PERF: sixteen PUTs of the same 20 MiB through two nodes each sent every part to the
        bucket at once (issue 24: parts timed out under the load); only the first writer does now.
        """
        return self.index.get(hex_digest) is not None or bool(self._live_puts(hex_digest))

    def _live_puts(self, hex_digest: str, *, other_than: str = '') -> list[index.Intent]:
        """The puts of the content recorded within the grace period (their writers are at work), oldest first."""
        live_since = time.time() - self.intent_grace
        return [
            intent
            for intent in self.index.intents(hex_digest=hex_digest)
            if intent.op == 'put' and intent.alive_at >= live_since and intent.id != other_than
        ]

    def commit(self, staged: StagedBlob, new_meta: NewMeta) -> Committed:
        """Make a staged blob visible under its id, with ``new_meta`` if it has none yet (see :meth:`commit_all`)."""
        return self.commit_all([(staged, new_meta)])[0]

    def commit_all(self, uploads: Sequence[tuple[StagedBlob, NewMeta]]) -> list[Committed]:
        """Make staged blobs visible under their ids, each with its meta unless it has some; one group commit.

        The first commit of some content wins: an existing blob is never
        overwritten (unless its size shows it is damaged, when the verified
        bytes replace it) and existing metadata is kept; content given twice is
        stored once. However many uploads there are, a disk is flushed three
        times (the driver's :meth:`~drivers.Group.sync`, shared with every commit
        running meanwhile): once for the staged bytes and the new metas' bytes,
        once for the blobs' names, once for the metas' names. So a crash leaves
        each blob wholly there or not at all, and never a meta without its blob.
        Every blob is held from its check to its index row, so a concurrent
        :meth:`delete` of the same content happens wholly before or wholly
        after; blobs are taken in the order of their ids, so two groups sharing
        content never wait for each other in a circle.

        The commit order, on every backend: an intent per content not wholly
        stored yet is recorded in the index first (the index down: nothing is
        written, 503), then blobs, then metas, then one transaction inserts the
        rows and removes the intents. A writer killed or cut off between the two
        leaves its intent, which the reconciler (``reconciler.py``) finishes or
        undoes once it is older than :attr:`intent_grace`. Of several writers of
        the same content (of :data:`_SINGLE_FLIGHT_MIN_BYTES` or more), on any
        nodes, the first to record its intent writes; the others wait (up to
        :data:`_SINGLE_FLIGHT_SECONDS`) for its row.

        Returns:
            For each upload, in order: whether its blob is new, and the meta now stored for it.
        """
        firsts: dict[str, tuple[StagedBlob, NewMeta]] = {}
        for staged, new_meta in uploads:
            firsts.setdefault(staged.hex, (staged, new_meta))
        try:
            with self._driver.group() as group, contextlib.ExitStack() as spooled:
                outcome = self._commit_group(group, sorted(firsts.items()), spooled)
        finally:
            for staged, _ in uploads:
                staged.discard()
        # NOTE: content given again later in the same group was stored by its first upload.
        return [
            outcome[staged.hex] if firsts[staged.hex][0] is staged else Committed(False, outcome[staged.hex].meta)
            for staged, _ in uploads
        ]

    def _commit_group(
        self, group: Group, uploads: list[tuple[str, tuple[StagedBlob, NewMeta]]], spooled: contextlib.ExitStack
    ) -> dict[str, Committed]:
        """:meth:`commit_all` for distinct contents sorted by id; the metas' temp files go on ``spooled``."""
        stored: dict[str, dict[str, Any] | None] = {}
        new: list[tuple[str, StagedBlob, bool]] = []  # (hex, staged, replacing a damaged blob)
        unasked: set[str] = set()  # NOTE: a driver without locks answers None: its put says whether it is there
        for hex_digest, (staged, _) in uploads:
            try:
                held = group.hold(blob_key(hex_digest))
                if held is None:
                    unasked.add(hex_digest)
            except KeyNotFound:
                held = None
            if held is None:
                new.append((hex_digest, staged, False))
            elif held.size == staged.size:
                # PERF: already stored; a copy about to be discarded needs no flush.
                stored[hex_digest] = self.read_meta('sha256:' + hex_digest)
            else:
                # NOTE: a blob of the wrong size under this name was damaged by something
                # outside ISS (the seed wrote in place, without sync); the staged bytes
                # are verified, so they take its place atomically.
                log.warning('replacing damaged blob %s', self._driver.location(blob_key(hex_digest)))
                new.append((hex_digest, staged, True))
        unfinished = [hex_digest for hex_digest, _ in uploads if stored.get(hex_digest) is None]
        # PERF: a meta is made only for content that has none (an image's fingerprints decode its pixels);
        # for content the driver was not asked about, once its put says it is new (_write_group).
        metas = {
            hex_digest: _made(new_meta)
            for hex_digest, (_, new_meta) in uploads
            if hex_digest in unfinished and hex_digest not in unasked
        }
        # NOTE: the index down here, nothing is written (503, nothing stored).
        intent_ids = dict(zip(unfinished, self.index.record_intents('put', unfinished, time.time()), strict=True))
        with self._writing(list(intent_ids.values())):
            # NOTE: a driver with locks holds each blob from its check to its row: a removal waits its turn there
            self._wait_for_removals([hex_digest for hex_digest in unfinished if hex_digest in unasked])
            for hex_digest, staged, _ in list(new):
                if staged.size >= _SINGLE_FLIGHT_MIN_BYTES and self._stored_by_an_earlier_writer(
                    hex_digest, intent_ids[hex_digest]
                ):
                    stored[hex_digest] = self.read_meta('sha256:' + hex_digest)
                    new = [entry for entry in new if entry[0] != hex_digest]
            return self._write_group(group, uploads, metas, spooled, stored, new, intent_ids)

    @contextlib.contextmanager
    def _writing(self, intent_ids: list[str]) -> Iterator[None]:
        """Keep the intents alive while the block writes (see :meth:`_keep_alive`); give them up if it fails.

        NOTE: a given-up intent is settled by the reconciler's next pass, and the writers waiting
        on it go on at once; a put the bucket takes after all is found by the sweep.
        """
        with self._alive_lock:
            self._alive.update(intent_ids)
            if intent_ids and self._keeper is None:
                self._keeper = threading.Thread(target=self._keep_alive, name='iss-intents', daemon=True)
                self._keeper.start()
        try:
            yield
        except BaseException:
            with contextlib.suppress(StoreFailure):
                self.index.keep_intents(intent_ids, 0.0)
            raise
        finally:
            with self._alive_lock:
                self._alive.difference_update(intent_ids)

    def _keep_alive(self) -> None:
        """Renew this process's intents in flight, every third of the grace period, until there are none.

        So the grace period bounds how long a dead writer's intent waits, not how long a write may take
        (a 2 GiB PUT to a slow bucket, a writer waiting for another's row).
        """
        while True:
            time.sleep(self.intent_grace / 3)
            with self._alive_lock:
                alive = list(self._alive)
                if not alive:
                    self._keeper = None
                    return
            try:
                self.index.keep_intents(alive, time.time())
            except StoreFailure as exc:
                log.warning('renewing %d write intent(s) failed: %s', len(alive), exc)

    def _stored_by_an_earlier_writer(self, hex_digest: str, intent_id: str) -> bool:
        """Wait while a writer that recorded its intent first, on any node, stores the same content; whether it did.

        PERF: one writer sends the bytes, not sixteen (see :meth:`_stored_or_being_stored`). A
        writer that fails makes its intent old (see :meth:`_commit_group`): the others go on at once.
        """
        deadline = time.monotonic() + _SINGLE_FLIGHT_SECONDS
        while True:
            live = self._live_puts(hex_digest)
            mine = next((intent for intent in live if intent.id == intent_id), None)
            if mine is None or not any((intent.at, intent.id) < (mine.at, mine.id) for intent in live):
                return False
            if self.index.get(hex_digest) is not None:
                return self.read_meta('sha256:' + hex_digest) is not None
            if time.monotonic() >= deadline:
                return False
            time.sleep(_SINGLE_FLIGHT_POLL_SECONDS)

    def _write_group(
        self,
        group: Group,
        uploads: list[tuple[str, tuple[StagedBlob, NewMeta]]],
        metas: dict[str, dict[str, Any]],
        spooled: contextlib.ExitStack,
        stored: dict[str, dict[str, Any] | None],
        new: list[tuple[str, StagedBlob, bool]],
        intent_ids: dict[str, str],
    ) -> dict[str, Committed]:
        """The writes of :meth:`_commit_group` once its intents are recorded: blobs, metas (``metas``: those
        of the contents that had none, made already; those the driver was not asked about are made here), rows."""
        # NOTE: a meta is readied for every blob that may need one, so one sync covers its bytes.
        meta_sources = {
            hex_digest: self._spool(meta.encode(made), spooled)
            for hex_digest, made in metas.items()
            if hex_digest not in stored or stored[hex_digest] is None
        }
        for _, staged, _ in new:
            staged.spool()  # NOTE: a small upload waited in memory; its content is new, so it is written now
        if meta_sources or new:
            group.sync()  # the staged bytes and the metas' bytes
        for hex_digest, staged, replace in new:
            if not self._put_blob(group, hex_digest, staged, replace):
                stored[hex_digest] = self.read_meta('sha256:' + hex_digest)
        created = {hex_digest for hex_digest, _, _ in new} - stored.keys()
        for hex_digest, (_, new_meta) in uploads:
            if hex_digest not in metas and (hex_digest in created or stored[hex_digest] is None):
                metas[hex_digest] = _made(new_meta)
                meta_sources[hex_digest] = self._spool(meta.encode(metas[hex_digest]), spooled)
        if new:
            group.sync()  # the blobs' names (and the metas' bytes made since): never a meta without its blob
        put_metas = False
        for hex_digest, source in meta_sources.items():
            if hex_digest in created or stored[hex_digest] is None:
                if group.put(source, meta_key(hex_digest)):
                    stored[hex_digest], put_metas = metas[hex_digest], True
                else:  # NOTE: another writer's meta got there first; it stays
                    stored[hex_digest] = self.read_meta('sha256:' + hex_digest) or metas[hex_digest]
        if put_metas:
            group.sync()  # the metas' names
        now = time.time()
        rows = [index.row_for(hex_digest, stored[hex_digest], now, staged.size) for hex_digest, (staged, _) in uploads]
        if intent_ids:
            self.index.finish_puts(rows, list(intent_ids.values()))
        else:  # NOTE: every content was wholly stored already (a file store's hold says so)
            self.index.put_missing(rows)
        committed = {}
        for hex_digest, _ in uploads:
            stored_meta = stored[hex_digest]
            assert stored_meta is not None  # NOTE: each blob has its meta by now (put above, or another writer's)
            committed[hex_digest] = Committed(hex_digest in created, stored_meta)
        return committed

    @staticmethod
    def _put_blob(group: Group, hex_digest: str, staged: StagedBlob, replace: bool) -> bool:
        """Put a staged blob under its key; False when another upload stored it first (then it is held)."""
        if staged.writer is not None and not replace:
            writer, staged.writer = staged.writer, None
            return writer.commit()
        return group.put(staged, blob_key(hex_digest), replace=replace)

    def _spool(self, data: bytes, spooled: contextlib.ExitStack) -> StagedBlob:
        """``data`` in a temp file of the spool, removed when ``spooled`` closes (a :class:`drivers.Source`)."""
        with disk.translated('writing metadata'):
            fd, temp_path = self.layout.new_temp()
            source = StagedBlob(fd, temp_path, 'sha256:' + hashlib.sha256(data).hexdigest(), len(data))
            spooled.callback(source.discard)
            disk.write_all(fd, data)
        return source

    def write_meta(self, hex_digest: str, meta_doc: dict[str, Any], *, replace: bool = False) -> dict[str, Any]:
        """Write a blob's meta (unless another writer got there first, or ``replace``); return what is stored."""
        with self._driver.group() as group, contextlib.ExitStack() as spooled:
            source = self._spool(meta.encode(meta_doc), spooled)
            group.sync()
            placed = group.put(source, meta_key(hex_digest), replace=replace)
            if placed:
                group.sync()
        return meta_doc if placed else self.read_meta('sha256:' + hex_digest) or meta_doc

    def complete_meta(self, blob_id: str, fields: dict[str, Any]) -> dict[str, Any]:
        """Add to a blob's meta the ``fields`` it lacks, never changing a key it has; return it.

        For meta written by the FastAPI version, which knew less. The meta is
        replaced atomically (a reader sees the old or the new one) and the index
        row follows.

        Raises:
            BlobNotFound: the blob is not stored (or was deleted meanwhile).
        """
        hex_digest = parse_id(blob_id)
        with self._held(hex_digest) as stat:
            stored = self.read_meta(blob_id) or {}
            missing = {key: value for key, value in fields.items() if key not in stored}
            if not missing:
                return stored
            stored = self.write_meta(hex_digest, {**stored, **missing}, replace=True)
            self.index.put(index.row_for(hex_digest, stored, stat.modified, stat.size))
        return stored

    def delete(self, blob_id: str) -> None:
        """Remove a blob: its row (with a delete's intent, in one transaction), this node's copies, meta, bytes.

        A reader that opened the blob before keeps reading the whole of it; one
        that comes after gets :class:`BlobNotFound`, on every node (a node serves
        a cached derivative or copy only while the blob's meta or row is there).
        The blob is held throughout: a commit of the same content waits, then
        stores it anew with its own meta. The index down, nothing changes (503);
        a crash or an outage of the backend part way leaves the intent, and the
        reconciler finishes the delete.
        """
        hex_digest = parse_id(blob_id)
        with self._held(hex_digest, exclusive=True):
            intent_id = self.index.begin_delete(hex_digest, time.time())
            with self._writing([intent_id]):
                self._forget_on_node(hex_digest)
                self._remove_objects(hex_digest)
            self.index.drop_intent(intent_id)

    def _remove_objects(self, hex_digest: str) -> None:
        """A blob's meta, then its bytes: the end of a delete, or the undoing of an upload cut short."""
        self._driver.remove(meta_key(hex_digest))
        self._driver.remove(blob_key(hex_digest))

    # -- the reconciler's repairs (reconciler.py) -------------------------------

    def settle(self, intent: index.Intent, *, dry_run: bool = False) -> str | None:
        """Finish or undo a write its writer left (killed, or cut off by an outage); what was done, or None.

        A put whose blob and meta are there and whose bytes hash to the name is
        finished (its row inserted): ``put_completed``; otherwise what it wrote goes:
        ``put_undone`` (the client never had a 201). A delete is finished:
        ``delete_completed``. An intent whose content has its row again (another
        writer finished it, or uploaded it again after the delete) just goes:
        ``intent_dropped``. None: a writer of the same content is at work now; a
        later pass decides.
        """
        hex_digest = intent.hex
        if self.index.get(hex_digest) is not None:
            if not dry_run:
                self.index.drop_intent(intent.id)
            return 'intent_dropped'
        if self._live_puts(hex_digest, other_than=intent.id):
            return None
        if intent.op == 'put' and (row := self._complete_row(hex_digest)) is not None:
            if not dry_run:
                self.index.finish_puts([row], [intent.id])
            return 'put_completed'
        if not dry_run:
            if not self._may_remove(intent):
                return None
            self._remove_unlisted(hex_digest)
            self.index.drop_intent(intent.id)
        return 'delete_completed' if intent.op == 'delete' else 'put_undone'

    def _may_remove(self, intent: index.Intent) -> bool:
        """Mark ``intent`` a removal at work, then look again for a writer of its content: whether none is.

        APPSEC: on a bucket nothing holds a blob (no lock): a writer of the same content that began after
        the looks of :meth:`settle` found the leavings there (its put answered "exists"), wrote its row,
        and the removal then took its blob: a 201 whose bytes were gone (the fault suite's frozen S3).
        Each side says what it does before it looks at the other (its intent, then the other's): of a
        writer and a removal, at least one sees the other. The writer waits for the removal to end
        (:meth:`_wait_for_removals`); a removal that sees a writer gives way (its intent made old, it is
        settled again by a later pass).
        """
        removing = 'delete' if intent.op == 'delete' else 'undo'
        self.index.mark_intent(intent.id, removing, time.time())
        if not self._live_puts(intent.hex, other_than=intent.id) and self.index.get(intent.hex) is None:
            return True
        self.index.mark_intent(intent.id, intent.op if intent.op == 'delete' else 'put', 0.0)
        return False

    def _wait_for_removals(self, hexes: Sequence[str]) -> None:
        """Wait while a delete or an undo at work removes the objects of any of ``hexes`` (see :meth:`_may_remove`).

        Raises:
            StoreUnavailable: one went on past :data:`_SINGLE_FLIGHT_SECONDS` (its remover is stuck).
        """
        deadline = time.monotonic() + _SINGLE_FLIGHT_SECONDS
        while self.index.removals(hexes, time.time() - self.intent_grace):
            if time.monotonic() >= deadline:
                raise StoreUnavailable('a removal of the same content is taking its time; try again')
            time.sleep(_SINGLE_FLIGHT_POLL_SECONDS)

    def settle_orphan(self, hex_digest: str, *, dry_run: bool = False) -> str | None:
        """Settle a blob or meta that has neither row nor intent (a write the bucket took after its writer gave up).

        A blob whose meta is readable and bytes hash to its name is indexed:
        ``orphan_indexed``. One without meta moves to ``quarantine/`` (it might be
        an operator's, copied in): ``orphan_quarantined``. A meta without its blob
        goes: ``orphaned_meta``. None: it has a row or an intent by now.
        """
        if self.index.get(hex_digest) is not None or self.index.intents(hex_digest=hex_digest):
            return None
        if not self.is_stored(hex_digest):
            if not dry_run:
                self.remove_meta(hex_digest)
            return 'orphaned_meta'
        if (row := self._complete_row(hex_digest)) is not None:
            if not dry_run:
                self.index.put_missing([row])
            return 'orphan_indexed'
        if not dry_run:
            self.quarantine(hex_digest, 'a blob without meta, row or intent')
        return 'orphan_quarantined'

    def _complete_row(self, hex_digest: str) -> index.Row | None:
        """The row of a blob whose meta is readable and whose bytes hash to its name, or None."""
        stored_meta = self.read_meta('sha256:' + hex_digest)
        if stored_meta is None:
            return None
        try:
            stat = self._driver.stat(blob_key(hex_digest))
            with self.open_unverified(hex_digest) as body:
                actual, size = disk.hash_stream(body)
        except (KeyNotFound, BlobNotFound):
            return None
        if actual != hex_digest or size != stat.size:
            return None
        return index.row_for(hex_digest, stored_meta, stat.modified, stat.size)

    def _remove_unlisted(self, hex_digest: str) -> None:
        """Remove a blob that has no row, and its meta, holding it (a commit of it on this node waits)."""
        try:
            with self._held(hex_digest, exclusive=True):
                self._forget_on_node(hex_digest)
                self._remove_objects(hex_digest)
        except BlobNotFound:
            self._driver.remove(meta_key(hex_digest))

    def quarantine(self, hex_digest: str, why: str) -> bool:
        """Move a blob whose bytes do not match its name, and its meta, to ``quarantine/``; its row goes.

        Returns False when it was gone already.
        """
        log.error('quarantining %s: %s', self._driver.location(blob_key(hex_digest)), why)
        try:
            with self._held(hex_digest, exclusive=True):
                if not self._driver.move(blob_key(hex_digest), _quarantined(hex_digest)):
                    return False
                self.quarantine_meta(hex_digest)
                self.index.remove(hex_digest)
                self._forget_on_node(hex_digest)
        except BlobNotFound:
            return False
        return True

    def quarantine_meta(self, hex_digest: str) -> bool:
        """Move a blob's meta to ``quarantine/`` (it is unreadable, or its blob is gone)."""
        return self._driver.move(meta_key(hex_digest), _quarantined(hex_digest, '.json'))

    def _forget_on_node(self, hex_digest: str) -> None:
        self.derived.remove(hex_digest)
        if self._copies is not None:
            self._copies.remove(hex_digest)

    @contextlib.contextmanager
    def _held(self, hex_digest: str, *, exclusive: bool = False) -> Iterator[Stat]:
        """Hold a stored blob for the block (see :meth:`drivers.Group.hold`); yield its stat.

        Raises:
            BlobNotFound: it is not stored (or was deleted while we waited).
        """
        key = blob_key(hex_digest)
        try:
            with self._driver.group() as group:
                # NOTE: a driver without locks is asked whether the blob is there
                yield group.hold(key, exclusive=exclusive) or self._driver.stat(key)
        except KeyNotFound:
            raise BlobNotFound('sha256:' + hex_digest) from None

    @contextlib.contextmanager
    def _held_unasked(self, hex_digest: str) -> Iterator[None]:
        """Hold a blob where the driver has locks; a driver without them is asked nothing (a node's copy).

        Raises:
            BlobNotFound: it is not stored (a driver with locks says so).
        """
        try:
            with self._driver.group() as group:
                group.hold(blob_key(hex_digest))
                yield
        except KeyNotFound:
            raise BlobNotFound('sha256:' + hex_digest) from None

    # -- reading -------------------------------------------------------------

    def open(self, blob_id: str) -> OpenBlob:
        """Open a stored blob for reading (verified as it streams where the driver's reads cross a network).

        PERF: a remote backend's small blob (up to :data:`_NODE_COPY_BYTES`) is kept
        on the node once read and verified, and served from there while the shared
        index has its row: a delete removes the row before the bytes, so every node
        stops serving its copy at once.

        Raises:
            BlobNotFound: nothing is stored under ``blob_id``.
            StoreUnavailable: the blob exists but cannot be read.
        """
        hex_digest = parse_id(blob_id)
        if self._copies is not None:
            try:
                row = self.index.get(hex_digest)
            except IndexUnavailable:
                # NOTE: the row only says whether the node's copy is still good; the bucket itself
                # answers without it, so an index that is down or stuck costs a read one deadline,
                # not a second one to record the check (the scrubber checks the blob later).
                return self._open(hex_digest, record=False)
            if row is not None and row.bytes <= _NODE_COPY_BYTES:
                cached = self._copies.open(hex_digest, 'blob')
                if cached is None:
                    with self._open(hex_digest).file as source:
                        cached = self._copies.put(hex_digest, 'blob', lambda out: out.write(source.read()))
                return OpenBlob(cached.file, BlobStat(cached.stat.size, f'row-{row.created_at!r}'))
        return self._open(hex_digest)

    def _open(self, hex_digest: str, *, record: bool = True) -> OpenBlob:
        """The blob's bytes from the driver; ``record``: a verified read is recorded in the index."""
        try:
            file, stat = self._driver.open(blob_key(hex_digest))
        except KeyNotFound:
            raise BlobNotFound('sha256:' + hex_digest) from None
        if self._driver.verify_reads:
            file = _VerifiedReader(self, hex_digest, file, stat, record=record)  # type: ignore[assignment]
        return OpenBlob(file, BlobStat(stat.size, stat.version))

    @property
    def verifies_reads(self) -> bool:
        """Whether :meth:`open` hashes what it reads (a backend across a network) before the last byte goes out."""
        return self._driver.verify_reads

    def verified_since(self, blob_id: str, since: float) -> bool:
        """Whether the blob's bytes, read back from the backend, hashed to its name at ``since`` or later.

        NOTE: an index that cannot answer says no: the caller then reads through ISS, which verifies.
        """
        try:
            at = self.index.verified_at(parse_id(blob_id))
        except ServiceError as exc:
            log.warning('when %s was verified is unknown: %s', blob_id, exc)
            return False
        return at is not None and at >= since

    def record_check(self, hex_digest: str, *, verified: bool) -> None:
        """Record in the index that a blob's bytes were read back and hashed now (see :meth:`verified_since`).

        NOTE: a record that cannot be written is only logged: the blob is checked again later.
        """
        try:
            self.index.record_check(hex_digest, time.time(), verified=verified)
        except ServiceError as exc:
            log.warning('recording the check of sha256:%s failed: %s', hex_digest, exc)

    def open_unverified(self, hex_digest: str) -> IO[bytes]:
        """A blob's bytes as the driver reads them, for fsck to judge (the caller closes it)."""
        try:
            return self._driver.open(blob_key(hex_digest))[0]
        except KeyNotFound:
            raise BlobNotFound('sha256:' + hex_digest) from None

    def stat(self, blob_id: str) -> BlobStat:
        """Return a stored blob's size and version (raises like :meth:`open`)."""
        try:
            stat = self._driver.stat(blob_key(parse_id(blob_id)))
        except KeyNotFound:
            raise BlobNotFound(blob_id) from None
        return BlobStat(stat.size, stat.version)

    def proxy_path(self, blob_id: str) -> str:
        """Where a proxy in front finds the blob, below its internal location (``ISS_ACCEL_REDIRECT``).

        On disk: ``ab/cd/<hex>`` below ``blobs/``; on S3: a presigned URL's path and query.
        """
        return self._driver.proxy_path(blob_key(parse_id(blob_id)))

    def redirect_url(self, blob_id: str, *, seconds: int, overrides: dict[str, str] | None = None) -> str | None:
        """A URL that reads the blob straight from its backend for ``seconds``, or None where there is none.

        ``overrides`` are the ``Response*`` headers the backend answers with (``ISS_S3_REDIRECT``).
        """
        return self._driver.redirect_url(blob_key(parse_id(blob_id)), seconds=seconds, overrides=overrides or {})

    def read_meta(self, blob_id: str) -> dict[str, Any] | None:
        """Return a blob's stored metadata, or None when it has none (or it is unreadable)."""
        key = meta_key(parse_id(blob_id))
        try:
            stored = json.loads(self._driver.read(key))
        except KeyNotFound:
            return None
        except ValueError as exc:
            log.warning('ignoring unreadable metadata %s: %s', self._driver.location(key), exc)
            return None
        return stored if isinstance(stored, dict) else None

    def missing(self, blob_ids: list[str]) -> list[str]:
        """Return the ids in ``blob_ids`` that name no stored blob, in order, once each (asked several at a time)."""
        unique = list(dict.fromkeys(blob_ids))
        hexes = [parse_id(blob_id) for blob_id in unique]
        if len(hexes) <= 1:
            stored = [self.is_stored(hex_digest) for hex_digest in hexes]
        else:
            with concurrent.futures.ThreadPoolExecutor(min(_LOOKUPS_IN_FLIGHT, len(hexes))) as pool:
                stored = list(pool.map(self.is_stored, hexes))
        return [blob_id for blob_id, present in zip(unique, stored, strict=True) if not present]

    def is_stored(self, hex_digest: str) -> bool:
        try:
            self._driver.stat(blob_key(hex_digest))
        except KeyNotFound:
            return False
        return True

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
            # NOTE: an index lost or set aside while ISS runs is rebuilt without a restart
            self._build_index_unless_complete()
            raise IndexIncomplete('the index is being built from the blobs')

    # -- housekeeping --------------------------------------------------------

    def check(self, *, with_index: bool = True) -> dict[str, Any]:
        """Prove the backend and the node's scratch take writes, and the index answers; return free space.

        ``free_bytes`` is the node's room for uploads in flight (on a file store, the store's room).
        ``with_index`` False leaves the index out (``/health`` asks it apart, with a deadline of its own).

        Raises:
            StoreFull: not even a byte can be written.
            StoreUnavailable: the backend, the directory or the index is gone, read-only or failing.
        """
        self._driver.check()
        with disk.translated('writing to the data directory'):
            fd, path = self.layout.new_temp()
            try:
                os.write(fd, b'.')
            finally:
                disk.remove_temp(fd, path)
            usage = os.statvfs(self.root)
        # NOTE: after the directory: a read-only or full disk is named as such, not as the index on it.
        if with_index:
            self.index.complete  # noqa: B018 - a read that raises IndexUnavailable when the index is down
        return {'free_bytes': usage.f_bavail * usage.f_frsize}

    def sweep_temp(self, *, dry_run: bool = False) -> int:
        """Remove temp files left by dead processes (see :func:`sweep_temp`)."""
        return sweep_temp(self.layout, dry_run=dry_run)

    def abandoned_writes(self, age: float, *, dry_run: bool = False) -> dict[str, int]:
        """Remove the driver's writes begun more than ``age`` seconds ago and never committed; how many, by kind."""
        return self._driver.abandoned(age, dry_run=dry_run)

    def has_meta(self, hex_digest: str) -> bool:
        """Whether a meta is stored for the blob, readable or not."""
        try:
            self._driver.stat(meta_key(hex_digest))
        except KeyNotFound:
            return False
        return True

    def remove_meta(self, hex_digest: str) -> bool:
        """Remove the meta of a blob that is not stored (gc)."""
        return self._driver.remove(meta_key(hex_digest))

    def remove_node_orphans(self, *, dry_run: bool = False) -> int:
        """Remove this node's derivatives and copies of blobs no longer stored, then keep the caches' bounds."""
        removed = 0
        for cache in (self.derived, self._copies):
            if cache is not None:
                removed += cache.remove_orphans(self.is_stored, dry_run=dry_run)
                if not dry_run:
                    removed += cache.evict(cache.max_bytes)[0]
        return removed

    # -- the index and the operator's walks -----------------------------------

    @property
    def index_complete(self) -> bool:
        return self.index.complete

    def walk(self, top: str) -> Iterator[tuple[str | None, str, Stat]]:
        """Every object under ``top/`` (``blobs``, ``meta``): its blob's hex (None: a stray), where it is, its stat."""
        for key, stat in self._driver.walk(top + '/'):
            yield hex_of(top, key), self._driver.location(key), stat

    def stored_blobs(self) -> Iterator[tuple[str, int]]:
        """Every stored blob: its hex and size."""
        for hex_digest, _, stat in self.walk('blobs'):
            if hex_digest is not None:
                yield hex_digest, stat.size

    def metas(self) -> Iterator[tuple[str, dict[str, Any]]]:
        """Every stored blob's id and meta (blobs without readable meta are left out)."""
        for hex_digest, _, _ in self.walk('meta'):
            if hex_digest is not None and (stored := self.read_meta('sha256:' + hex_digest)) is not None:
                yield 'sha256:' + hex_digest, stored

    def index_row(self, hex_digest: str, stat: Stat) -> index.Row:
        """The row the index should have for a stored blob."""
        return index.row_for(hex_digest, self.read_meta('sha256:' + hex_digest), stat.modified, stat.size)

    def reindex(self, *, only_if_incomplete: bool = False) -> dict[str, int]:
        """Rebuild the index from the blobs, which stay the truth; safe while ISS runs.

        One rebuild runs at a time on a node (an flock on ``index.lock``); with
        ``only_if_incomplete``, one that finds the index complete returns at once.

        Returns:
            ``blobs`` seen, rows ``changed`` (added or corrected), stale rows ``removed``.
        """
        os.makedirs(self.root, exist_ok=True)
        with open(self.layout.lock_file('index'), 'a') as lock, self.index.session():
            fcntl.flock(lock, fcntl.LOCK_EX)
            if only_if_incomplete and self.index_complete:
                return {}
            counts = {'blobs': 0, 'changed': 0, 'removed': 0}
            self.index.start_rebuild()
            batch: list[tuple[str, Stat]] = []
            for hex_digest, _, stat in self.walk('blobs'):
                if hex_digest is not None:
                    batch.append((hex_digest, stat))
                if len(batch) == _REINDEX_BATCH:
                    self._reindex_batch(batch, counts)
                    batch = []
            self._reindex_batch(batch, counts)
            for hex_digest in self.index.unseen():
                if not self.is_stored(hex_digest):
                    counts['removed'] += self.index.remove(hex_digest)
            self.index.mark_complete()
        return counts

    # NOTE: Sequence, as ``list`` in this class's annotations names the method.
    def _reindex_batch(self, batch: Sequence[tuple[str, Stat]], counts: dict[str, int]) -> None:
        # NOTE: a blob held by a commit or delete is not waited for inside the
        # transaction (that commit may be waiting for the index): it is done after.
        busy: list[tuple[str, Stat]] = []
        with self.index.transaction():
            for hex_digest, stat in batch:
                try:
                    self._reindex_one(hex_digest, stat, counts, wait=False)
                except Busy:
                    busy.append((hex_digest, stat))
        for hex_digest, stat in busy:
            self._reindex_one(hex_digest, stat, counts, wait=True)

    def _reindex_one(self, hex_digest: str, walked: Stat, counts: dict[str, int], *, wait: bool) -> None:
        with contextlib.suppress(KeyNotFound), self._driver.group() as group:
            row = self.index_row(hex_digest, group.hold(blob_key(hex_digest), wait=wait) or walked)
            counts['blobs'] += 1
            counts['changed'] += self.index.put(row)
            self.index.saw(hex_digest)


class FileStore(BlobStore):
    """The store on a data directory: :class:`BlobStore` over a :class:`drivers.file.FileDriver`.

    Args:
        root: The data directory. Its subdirectories are created when
            missing; if that fails the store still starts, and :meth:`check`
            (the health endpoint) says what is wrong.
        index: The index of its blobs (``index.open_index``: the SQLite file
            ``index.sqlite3`` in the data directory, or a shared PostgreSQL).
        derived_max_bytes: The bound of the derivative cache.
    """

    def __init__(self, root: str, index: index.Index, derived_max_bytes: int = 1024**3) -> None:
        layout = disk.Layout(root)
        super().__init__(FileDriver(layout, ('blobs', 'meta')), index, layout, derived_max_bytes=derived_max_bytes)


def open_store(settings: Settings, *, existing: bool = False, only_a_store: bool = False) -> BlobStore:
    """The store the settings name (``ISS_STORE``, ``ISS_INDEX``), not yet started: the one place that chooses.

    The index is made here and handed to the store: a file store on its own
    disk or an S3 bucket, with SQLite beside the data or a shared PostgreSQL.

    Args:
        existing: the store must be there already (an operator's command never
            makes an empty one of a mistyped directory): ConfigError otherwise.
        only_a_store: with ``existing``, the directory is a store's (or empty), not any
            directory (a command that checks or changes a store: fsck, gc, reindex...).
    """
    # NOTE: opening the index touches nothing yet (a data directory not there is refused below).
    store_index = index.open_index(
        settings.index,
        settings.data_dir,
        timeout=settings.index_timeout,
        pool_size=settings.index_pool_size,
        prepared=settings.index_prepared,
    )
    if settings.store == 'file':
        if existing and not os.path.isdir(settings.data_dir):
            raise ConfigError(f'{settings.data_dir} is not a directory (set ISS_DATA or --data)')
        if existing and only_a_store:
            _refuse_unless_a_data_directory(settings.data_dir)
        store = FileStore(settings.data_dir, store_index, derived_max_bytes=settings.derived_max_bytes)
        store.intent_grace = settings.reconcile_grace
        return store
    from iss_server.drivers.s3 import S3Driver  # NOTE: only an S3 store needs boto3

    driver = S3Driver(
        settings.s3_bucket,
        settings.s3_prefix,
        endpoint=settings.s3_endpoint,
        region=settings.s3_region,
        access_key=settings.s3_access_key,
        secret_key=settings.s3_secret_key,
        timeout=settings.s3_timeout,
    )
    scratch = disk.Layout(settings.data_dir)
    return BlobStore(
        driver,
        store_index,
        scratch,
        derived_max_bytes=settings.derived_max_bytes,
        node_copies=True,
        intent_grace=settings.reconcile_grace,
    )


def _refuse_unless_a_data_directory(path: str) -> None:
    """A command that checks or changes a store runs on a store's data directory (``blobs/``), or an empty one.

    NOTE: ``fsck --data`` of a mistyped path once made a store there (blobs/, meta/, tmp/ and an
    index among someone's files) and reported it clean.

    Raises:
        ConfigError: ``path`` holds files but no ``blobs/``.
    """
    with os.scandir(path) as entries:
        empty = not any(entries)
    if not empty and not os.path.isdir(os.path.join(path, 'blobs')):
        raise ConfigError(f'{path} is not an ISS data directory: it has files but no blobs/ (set ISS_DATA or --data)')


def _quarantined(hex_digest: str, suffix: str = '') -> str:
    return f'quarantine/{hex_digest}{suffix}.{time.strftime("%Y%m%dT%H%M%S")}'


class _VerifiedReader:
    """A blob being read from a remote backend, file-like (``read``, ``readinto``, ``seek``, ``close``).

    Read from its first byte to its last, the bytes are hashed as they pass, and
    the last read raises :class:`errors.CorruptBlob` (after quarantining the
    blob) instead of returning when they do not hash to the name: a proxy or
    client never receives a complete wrong blob. A ``seek`` (a Range request)
    re-opens the object at that byte; what a range serves cannot be verified
    alone, and ``fsck`` re-hashes every blob.
    """

    def __init__(self, store: BlobStore, hex_digest: str, body: IO[bytes], stat: Stat, *, record: bool = True) -> None:
        self._store = store
        self._record = record
        self._hex = hex_digest
        self._body = body
        self.stat = BlobStat(stat.size, stat.version)
        self._position = 0
        self._sha256: Any = hashlib.sha256()

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        if whence != os.SEEK_SET:
            raise OSError('only absolute seeks')
        # NOTE: a part of the blob cannot be checked against its name.
        self._sha256 = None
        if offset != self._position:
            self._body.close()
            try:
                self._body = self._store._driver.open(blob_key(self._hex), offset)[0]
            except KeyNotFound:
                raise BlobNotFound('sha256:' + self._hex) from None
            self._position = offset
        return offset

    def tell(self) -> int:
        return self._position

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            chunks = []
            while chunk := self.read(_READ_BYTES):
                chunks.append(chunk)
            return b''.join(chunks)
        data = self._body.read(size)
        self._position += len(data)
        if self._sha256 is not None:
            self._sha256.update(data)
            if self._position >= self.stat.size or not data:
                self._verify()
        return data

    def readinto(self, buffer: memoryview) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def _verify(self) -> None:
        actual, self._sha256 = self._sha256.hexdigest(), None
        if self._position != self.stat.size:
            raise StoreUnavailable(f'sha256:{self._hex}: the backend sent {self._position} of {self.stat.size} bytes')
        if actual != self._hex:
            self._store.quarantine(self._hex, f'its {self._position} bytes hash to {actual}')
            raise CorruptBlob(f'sha256:{self._hex}: the backend answered bytes that hash to {actual}')
        if self._record:
            self._store.record_check(self._hex, verified=True)

    def close(self) -> None:
        self._body.close()

    def __enter__(self) -> _VerifiedReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def index_in_background(store: BlobStore, where: str, done: Callable[[], None] = lambda: None) -> None:
    """Build a store's incomplete index in a thread: listings answer 503 until it is done; ``done`` is called after.

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
        finally:
            done()

    threading.Thread(target=build, name='iss-reindex', daemon=True).start()


def stage_file(layout: disk.Layout, stream: Readable, also: Callable[[memoryview], None] | None = None) -> StagedBlob:
    """Copy ``stream`` to a temp file under ``layout.tmp`` until EOF, computing its sha256.

    How every store receives an upload (an S3 store spools it on the node's own
    disk). The bytes are synced by the commit, and only if they are new.
    PERF: an upload that ends within its first :data:`_IN_MEMORY_BYTES` waits in
    memory (:meth:`StagedBlob.in_memory`), written only if the commit finds it new.
    Whatever ``stream.readinto`` raises (a size limit, a client that went away)
    propagates unchanged after the temp file is removed. ``also`` sees each piece
    as it is written (a view, valid until the next piece).

    Raises:
        StoreFull: the disk filled up (the temp file is removed).
        StoreUnavailable: the data directory cannot be written.
    """
    first = memoryview(bytearray(_IN_MEMORY_BYTES))
    size = 0
    while size < len(first) and (count := stream.readinto(first[size:])):
        size += count
    if size < len(first):
        if also is not None and size:
            also(first[:size])
        return StagedBlob.in_memory(layout, bytes(first[:size]))
    with disk.translated('creating a temp file'):
        fd, path = layout.new_temp()
    sha256 = hashlib.sha256()
    size = 0
    try:
        for piece in written(fd, stream, head=first):
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
    died (crash, SIGKILL, power loss) before committing it (a commit it began is
    its intent's, which the reconciler settles).
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


# PERF: an upload up to this size is received into memory, and written only if it is new;
# at most _WAITING_BYTES of them wait in a process's memory at once (the rest are written at once).
_IN_MEMORY_BYTES = 64 * 1024
_WAITING_BYTES = 32 * 1024 * 1024
_waiting_in_memory = _Budget(_WAITING_BYTES)
_FIRST_CHUNK_BYTES = 64 * 1024
# PERF: 1 MiB reads keep the per-chunk Python overhead small next to
# hashing (~1.4 GB/s) while bounding memory per upload.
_CHUNK_SIZE = 1024 * 1024
# PERF: how often a large upload asks the disk to start writing what it received.
_WRITEBACK_BYTES = 8 * 1024 * 1024


def written(fd: int, stream: Readable, start: int = 0, head: memoryview | None = None) -> Iterator[memoryview]:
    """Write ``stream`` into ``fd`` from offset ``start`` until EOF, yielding each piece once it is written.

    ``head``: bytes already read from ``stream``, written first.

    The one way an upload's bytes reach a file (a staged blob, a chunk of a resumable
    upload): the caller hashes or counts what is yielded. Whatever reading raises
    propagates, after the pieces yielded before it were written.
    """
    os.lseek(fd, start, os.SEEK_SET)
    position = written_back = start
    for piece in itertools.chain([head] if head else [], _chunks(stream, _CHUNK_SIZE)):
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
