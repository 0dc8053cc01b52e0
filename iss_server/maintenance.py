"""The operator's checks and clean-ups of a store, on disk or in a bucket: ``fsck`` and ``gc``.

Both run beside a live service, through the same locks as its writes (see
``disk.py``): a blob being committed or deleted is never judged half-way.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import fcntl
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import IO, Any

import storage
from iss_server import disk, index, resumable
from iss_server.errors import BlobNotFound
from storage import FileStore

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


def verify(
    store: FileStore,
    *,
    repair: bool = False,
    describe: Describe | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Verification:
    """Re-hash every blob and cross-check blobs, meta and index (``fsck``).

    With ``repair``: a corrupt blob and its meta move to ``quarantine/``,
    meta without a blob moves there too, a blob without (readable) meta gets
    the meta ``describe`` gives it, and the index is rebuilt. Files that are
    no blob or meta are reported, never touched.

    Args:
        describe: makes the meta of a blob that has none, from its bytes.
        progress: called with (blobs checked, bytes hashed) as it goes.
    """
    if not isinstance(store, FileStore):
        return _verify_bucket(store, repair, describe, progress)
    checker = _Checker(store, repair, describe, progress)
    layout = store.layout
    with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 2) as pool:
        # NOTE: hashlib releases the GIL, so blobs hash in parallel.
        pending: list[tuple[str, os.DirEntry]] = []
        for hex_digest, entry in layout.blob_files():
            if hex_digest is None:
                checker.report.found('stray_file', entry.path)
                continue
            pending.append((hex_digest, entry))
            if len(pending) == _VERIFY_BATCH:
                checker.check_blobs(pool, pending)
                pending = []
        checker.check_blobs(pool, pending)
    for hex_digest, entry in layout.meta_files():
        if hex_digest is None:
            checker.report.found('stray_file', entry.path)
        elif not store.is_stored(hex_digest):
            moved = repair and checker.quarantine_file(entry.path, hex_digest + '.json')
            checker.report.found('orphaned_meta', entry.path, 'sha256:' + hex_digest, repaired=moved)
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
        store: FileStore,
        repair: bool,
        describe: Describe | None,
        progress: Callable[[int, int], None] | None,
    ) -> None:
        self.report = Verification()
        self._store = store
        self._layout = store.layout
        self._repair = repair
        self._describe = describe
        self._progress = progress

    def check_blobs(self, pool: concurrent.futures.Executor, pending: list[tuple[str, os.DirEntry]]) -> None:
        hashes = pool.map(disk.hash_file, [entry.path for _, entry in pending])
        for (hex_digest, entry), actual in zip(pending, hashes, strict=True):
            if actual is None:
                continue  # deleted while we looked
            self.report.blobs += 1
            self.report.bytes += actual[1]
            if self._progress:
                self._progress(self.report.blobs, self.report.bytes)
            if actual[0] != hex_digest:
                repaired = self._repair and self._quarantine_blob(hex_digest)
                self.report.found('corrupt', entry.path, 'sha256:' + hex_digest, repaired=repaired)
            else:
                self._check_meta(hex_digest, entry)

    def _check_meta(self, hex_digest: str, entry: os.DirEntry) -> None:
        blob_id = 'sha256:' + hex_digest
        meta_path = self._layout.meta_file(hex_digest)
        if not os.path.exists(meta_path):
            problem = 'missing_meta'
        elif self._store.read_meta(blob_id) is None:
            problem = 'unreadable_meta'
        else:
            return
        repaired = False
        if self._repair and self._describe is not None:
            if problem == 'unreadable_meta':
                self.quarantine_file(meta_path, hex_digest + '.json')
            with open(entry.path, 'rb') as file:
                self._store.write_meta(hex_digest, self._describe(file, os.fstat(file.fileno())))
            repaired = True
        self.report.found(problem, entry.path, blob_id, repaired=repaired)

    def check_index(self) -> None:
        index = self._store.index
        index.start_rebuild()
        for hex_digest, entry in self._layout.blob_files():
            if hex_digest is None:
                continue
            with contextlib.suppress(FileNotFoundError):
                expected = self._store.index_row(hex_digest, entry.stat())
                row = index.get(hex_digest)
                index.saw(hex_digest)
                if row is None:
                    self.report.found('index_missing', entry.path, 'sha256:' + hex_digest)
                elif row != expected:
                    self.report.found('index_differs', entry.path, 'sha256:' + hex_digest)
        for hex_digest in index.unseen():
            if not self._store.is_stored(hex_digest):
                self.report.found('index_stale', index.path, 'sha256:' + hex_digest)

    def _quarantine_blob(self, hex_digest: str) -> bool:
        """Move a corrupt blob, and its meta, out of the store; its index row and derivatives go."""
        try:
            with disk.hold(self._layout, hex_digest, fcntl.LOCK_EX):
                self.quarantine_file(self._layout.blob(hex_digest), hex_digest)
                self.quarantine_file(self._layout.meta_file(hex_digest), hex_digest + '.json')
                self._store.index.remove(hex_digest)
                self._store.derived.remove(hex_digest)
        except BlobNotFound:
            return False
        return True

    def quarantine_file(self, path: str, name: str) -> bool:
        quarantine = self._layout.quarantine
        os.makedirs(quarantine, exist_ok=True)
        target = os.path.join(quarantine, f'{name}.{time.strftime("%Y%m%dT%H%M%S")}')
        try:
            os.rename(path, target)
        except FileNotFoundError:
            return False
        self._layout.flush()
        return True


def collect_garbage(store: FileStore, *, dry_run: bool = False, upload_age: float = 24 * 3600) -> dict[str, int]:
    """Remove what no blob needs (``gc``): stale temp files, expired resumable uploads,
    meta, index rows and derivatives of no blob, and derivatives beyond the cache's bound;
    on S3, multipart uploads started more than ``upload_age`` seconds ago too.

    Returns:
        How many of each were removed (with ``dry_run``, would be).
    """
    if not isinstance(store, FileStore):
        return _collect_bucket_garbage(store, dry_run, upload_age)
    counts = {
        'temp_files': store.sweep_temp(dry_run=dry_run),
        # NOTE: a server sweeps them as uploads are created, an idle one leaves them to this;
        # each session's state holds its own expiry, so none is given here
        'upload_sessions': resumable.Sessions(store, expires_seconds=0).sweep_expired(dry_run=dry_run),
        'orphaned_meta': 0,
        'index_rows': 0,
    }
    for hex_digest, _ in store.layout.meta_files():
        # NOTE: a commit links the blob before it writes the meta, and a delete
        # holds the blob until its meta is gone: meta without a blob is never used.
        if hex_digest is not None and not store.is_stored(hex_digest):
            counts['orphaned_meta'] += dry_run or disk.unlink_durably(store.layout, store.layout.meta_file(hex_digest))
    return _remove_rows_and_derivatives_of_no_blob(store, counts, dry_run)


def _remove_rows_and_derivatives_of_no_blob(store: Any, counts: dict[str, int], dry_run: bool) -> dict[str, int]:
    """gc's last steps on either store: index rows and derivatives of no blob, and the cache's bound."""
    for hex_digest in store.index.all_hexes():
        if not store.is_stored(hex_digest):
            counts['index_rows'] += dry_run or store.index.remove(hex_digest)
    counts['derived_files'] = store.derived.remove_orphans(store.is_stored, dry_run=dry_run)
    if not dry_run:
        counts['derived_files'] += store.derived.evict(store.derived.max_bytes)[0]
    return counts


def metas(store: FileStore) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every stored blob's id and meta (blobs without readable meta are left out)."""
    entries = store.layout.meta_files() if isinstance(store, FileStore) else store.objects('meta')
    for hex_digest, _ in entries:
        if hex_digest is not None and (stored := store.read_meta('sha256:' + hex_digest)) is not None:
            yield 'sha256:' + hex_digest, stored


# -- the same checks and clean-ups on an S3 bucket -----------------------------------


def _verify_bucket(
    store: Any, repair: bool, describe: Describe | None, progress: Callable[[int, int], None] | None
) -> Verification:
    """:func:`verify` for an :class:`s3store.S3Store`: every object re-hashed as it streams from the bucket."""
    report = Verification()
    where = f's3://{store.bucket}/{store.prefix}'

    def hashed(hex_digest: str) -> tuple[str, int] | None:
        try:
            with store.open_unverified(hex_digest) as body:
                return disk.hash_stream(body)
        except BlobNotFound:
            return None

    blobs = list(store.objects('blobs'))
    # NOTE: what the pass over the blobs learned (still stored, the meta read), so the meta and
    # index checks after it ask the bucket nothing twice
    still_stored: dict[str, dict[str, Any] | None] = {}
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        for (hex_digest, entry), actual in zip(
            blobs, pool.map(lambda item: hashed(item[0]) if item[0] else None, blobs), strict=True
        ):
            key = where + entry['Key'].removeprefix(store.prefix)
            if hex_digest is None:
                report.found('stray_file', key)
                continue
            if actual is None:
                continue  # deleted while we looked
            report.blobs += 1
            report.bytes += actual[1]
            if progress:
                progress(report.blobs, report.bytes)
            blob_id = 'sha256:' + hex_digest
            if actual[0] != hex_digest:
                repaired = repair and store.quarantine(hex_digest, f'fsck: its bytes hash to {actual[0]}')
                report.found('corrupt', key, blob_id, repaired=repaired)
                if not repaired:
                    still_stored[hex_digest] = store.read_meta(blob_id)
                continue
            still_stored[hex_digest] = store.read_meta(blob_id)
            if still_stored[hex_digest] is None:
                repaired = False
                if repair and describe is not None:
                    with store.open_unverified(hex_digest) as body, tempfile.TemporaryFile() as copy:
                        shutil.copyfileobj(body, copy, 1024 * 1024)
                        copy.seek(0)
                        stat = os.stat_result((0,) * 6 + (entry['Size'], 0, entry['LastModified'].timestamp(), 0))
                        store.write_meta(hex_digest, describe(copy, stat), replace=True)
                    repaired = True
                report.found('missing_meta', key, blob_id, repaired=repaired)
    for hex_digest, entry in store.objects('meta'):
        key = where + entry['Key'].removeprefix(store.prefix)
        if hex_digest is None:
            report.found('stray_file', key)
        elif hex_digest not in still_stored and not store.is_stored(hex_digest):
            if repair:
                store.delete_key(entry['Key'])
            report.found('orphaned_meta', key, 'sha256:' + hex_digest, repaired=repair)
    with store.index.session():
        store.index.start_rebuild()
        for hex_digest, entry in blobs:
            if hex_digest not in still_stored:
                continue
            row = store.index.get(hex_digest)
            store.index.saw(hex_digest)
            if row is None:
                report.found('index_missing', where + entry['Key'], 'sha256:' + hex_digest)
            elif row != index.row_for(hex_digest, still_stored[hex_digest], row.created_at, entry['Size']):
                report.found('index_differs', where + entry['Key'], 'sha256:' + hex_digest)
        for hex_digest in store.index.unseen():
            if not store.is_stored(hex_digest):
                report.found('index_stale', store.index.path, 'sha256:' + hex_digest)
    if repair:
        store.reindex()
        for problem in report.problems:
            if problem['problem'] in ('index_missing', 'index_stale', 'index_differs'):
                problem['repaired'] = True
    return report


def _collect_bucket_garbage(store: Any, dry_run: bool, upload_age: float) -> dict[str, int]:
    """:func:`collect_garbage` for an :class:`s3store.S3Store`, and multipart uploads no node completes."""
    counts = {
        'temp_files': storage.sweep_temp(store.layout, dry_run=dry_run),
        'upload_sessions': resumable.Sessions(store, expires_seconds=0).sweep_expired(dry_run=dry_run),
        'multipart_uploads': 0,
        'orphaned_meta': 0,
        'index_rows': 0,
    }
    for key, upload_id in store.stale_uploads(upload_age):
        counts['multipart_uploads'] += 1
        if not dry_run:
            store.abort_upload(key, upload_id)
    for hex_digest, entry in store.objects('meta'):
        if hex_digest is not None and not store.is_stored(hex_digest):
            counts['orphaned_meta'] += 1
            if not dry_run:
                store.delete_key(entry['Key'])
    return _remove_rows_and_derivatives_of_no_blob(store, counts, dry_run)
