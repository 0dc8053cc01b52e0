"""The operator's checks and clean-ups of a store, whatever its driver: ``fsck`` and ``gc``.

Both run beside a live service through the store's own API (its walks, holds
and quarantine): a blob being committed or deleted is never judged half-way.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import shutil
import tempfile
from collections.abc import Callable
from typing import IO, Any

from iss_server import bucket_sessions, disk, drivers
from iss_server.errors import BlobNotFound
from iss_server.reconciler import reconcile
from storage import BlobStore

#: Makes the meta of a blob that has none, from its bytes and stat.
Describe = Callable[[IO[bytes], os.stat_result], dict[str, Any]]


@dataclasses.dataclass
class Verification:
    """What :func:`verify` found: every problem, and how much it checked."""

    blobs: int = 0
    bytes: int = 0
    problems: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def found(self, problem: str, path: str, blob_id: str | None = None, *, repaired: bool = False) -> None:
        self.problems.append({'problem': problem, 'id': blob_id, 'path': path, 'repaired': repaired})

    @property
    def clean(self) -> bool:
        """True when nothing is wrong, or all that was wrong was repaired."""
        return all(problem['repaired'] for problem in self.problems)


# NOTE: a few hundred blobs hash at a time: memory stays flat on a store of millions.
_VERIFY_BATCH = 256
# NOTE: hashlib releases the GIL, and a remote backend's reads wait on the network: several at once.
_VERIFY_THREADS = 8


def verify(
    store: BlobStore,
    *,
    repair: bool = False,
    describe: Describe | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Verification:
    """Re-hash every blob and cross-check blobs, meta and index (``fsck``).

    Writes left half-done (intents older than the store's grace period) are
    reported; with ``repair`` they are settled first, as the reconciler does
    (:func:`reconciler.reconcile`). With ``repair``: a corrupt blob and its meta move to ``quarantine/``,
    meta without a blob moves there too, a blob without (readable) meta gets
    the meta ``describe`` gives it, and the index is rebuilt. Objects that are
    no blob or meta are reported, never touched.

    Args:
        describe: makes the meta of a blob that has none, from its bytes.
        progress: called with (blobs checked, bytes hashed) as it goes.
    """
    checker = _Checker(store, repair, describe, progress)
    # NOTE: a write left half-done is named by what settling it does (put_completed, put_undone, ...).
    for outcome, count in reconcile(store, grace=store.intent_grace, sweep=False, dry_run=not repair).items():
        for _ in range(count):
            checker.report.found(outcome, store.index.path, repaired=repair)
    with concurrent.futures.ThreadPoolExecutor(_VERIFY_THREADS) as pool:
        pending: list[tuple[str, str, drivers.Stat]] = []
        for hex_digest, where, stat in store.walk('blobs'):
            if hex_digest is None:
                checker.report.found('stray_file', where)
                continue
            pending.append((hex_digest, where, stat))
            if len(pending) == _VERIFY_BATCH:
                checker.check_blobs(pool, pending)
                pending = []
        checker.check_blobs(pool, pending)
    for hex_digest, where, _ in store.walk('meta'):
        if hex_digest is None:
            checker.report.found('stray_file', where)
        elif not store.is_stored(hex_digest):
            moved = repair and store.quarantine_meta(hex_digest)
            checker.report.found('orphaned_meta', where, 'sha256:' + hex_digest, repaired=moved)
    with store.index.session():
        checker.check_index()
    if repair:
        store.reindex()
        for problem in checker.report.problems:
            if problem['problem'] in ('index_missing', 'index_stale', 'index_differs'):
                problem['repaired'] = True
    return checker.report


class _Checker:
    """One fsck run: what it found so far, and how it repairs."""

    def __init__(
        self,
        store: BlobStore,
        repair: bool,
        describe: Describe | None,
        progress: Callable[[int, int], None] | None,
    ) -> None:
        self.report = Verification()
        self._store = store
        self._repair = repair
        self._describe = describe
        self._progress = progress

    def _hash(self, hex_digest: str) -> tuple[str, int] | None:
        try:
            with self._store.open_unverified(hex_digest) as body:
                return disk.hash_stream(body)
        except BlobNotFound:
            return None  # deleted while we looked

    def check_blobs(self, pool: concurrent.futures.Executor, pending: list[tuple[str, str, drivers.Stat]]) -> None:
        hashes = pool.map(self._hash, [hex_digest for hex_digest, _, _ in pending])
        for (hex_digest, where, stat), actual in zip(pending, hashes, strict=True):
            if actual is None:
                continue
            self.report.blobs += 1
            self.report.bytes += actual[1]
            if self._progress:
                self._progress(self.report.blobs, self.report.bytes)
            if actual[0] != hex_digest:
                repaired = self._repair and self._store.quarantine(hex_digest, f'fsck: its bytes hash to {actual[0]}')
                self.report.found('corrupt', where, 'sha256:' + hex_digest, repaired=repaired)
            else:
                self._check_meta(hex_digest, where, stat)

    def _check_meta(self, hex_digest: str, where: str, stat: drivers.Stat) -> None:
        blob_id = 'sha256:' + hex_digest
        if self._store.read_meta(blob_id) is not None:
            return
        problem = 'unreadable_meta' if self._store.has_meta(hex_digest) else 'missing_meta'
        repaired = False
        if self._repair and self._describe is not None:
            if problem == 'unreadable_meta':
                self._store.quarantine_meta(hex_digest)
            try:
                described = self._described(hex_digest, stat)
            except BlobNotFound:
                return  # deleted while we looked
            self._store.write_meta(hex_digest, described, replace=True)
            repaired = True
        self.report.found(problem, where, blob_id, repaired=repaired)

    def _described(self, hex_digest: str, stat: drivers.Stat) -> dict[str, Any]:
        """The meta ``describe`` makes of a blob, from a seekable copy of its bytes."""
        assert self._describe is not None
        with self._store.open_unverified(hex_digest) as body, tempfile.TemporaryFile() as copy:
            shutil.copyfileobj(body, copy, 1024 * 1024)
            copy.seek(0)
            return self._describe(copy, os.stat_result((0,) * 6 + (stat.size, 0, stat.modified, 0)))

    def check_index(self) -> None:
        index = self._store.index
        index.start_rebuild()
        for hex_digest, where, stat in self._store.walk('blobs'):
            if hex_digest is None:
                continue
            expected = self._store.index_row(hex_digest, stat)
            row = index.get(hex_digest)
            index.saw(hex_digest)
            if row is None:
                self.report.found('index_missing', where, 'sha256:' + hex_digest)
            elif row != expected:
                self.report.found('index_differs', where, 'sha256:' + hex_digest)
        for hex_digest in index.unseen():
            if not self._store.is_stored(hex_digest):
                self.report.found('index_stale', index.path, 'sha256:' + hex_digest)


def collect_garbage(store: BlobStore, *, dry_run: bool = False, upload_age: float = 24 * 3600) -> dict[str, int]:
    """Remove what no blob needs (``gc``): the writes left half-done (settled as the reconciler
    does, :func:`reconciler.reconcile`), stale temp files, expired resumable uploads,
    the driver's writes begun more than ``upload_age`` seconds ago and never committed
    (an S3 bucket's multipart uploads), meta, index rows and node derivatives of no
    blob, and derivatives beyond the cache's bound.

    Returns:
        How many of each were removed (with ``dry_run``, would be).
    """
    # NOTE: first, so that what an undone write left is not counted as orphans below.
    settled = reconcile(store, grace=store.intent_grace, sweep=False, dry_run=dry_run)
    counts = {
        **settled,
        'temp_files': store.sweep_temp(dry_run=dry_run),
        # NOTE: a server sweeps them as uploads are created, an idle one leaves them to this;
        # each session's state holds its own expiry, so none is given here
        # (a bucket's objects and parts of no session go once older than upload_age)
        'upload_sessions': bucket_sessions.sessions_of(store, int(upload_age)).sweep_expired(dry_run=dry_run),
        **store.abandoned_writes(upload_age, dry_run=dry_run),
        'orphaned_meta': 0,
        'index_rows': 0,
    }
    for hex_digest, _, _ in store.walk('meta'):
        # NOTE: a commit puts the blob before it writes the meta, and a delete
        # holds the blob until its meta is gone: meta without a blob is never used.
        if hex_digest is not None and not store.is_stored(hex_digest):
            counts['orphaned_meta'] += dry_run or store.remove_meta(hex_digest)
    for hex_digest in store.index.all_hexes():
        if not store.is_stored(hex_digest):
            counts['index_rows'] += dry_run or store.index.remove(hex_digest)
    counts['derived_files'] = store.remove_node_orphans(dry_run=dry_run)
    return counts
