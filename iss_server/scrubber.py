"""The scrubber: every blob read back from the store and hashed again, on a schedule.

As Ceph's deep scrub does for its objects: bytes that rot where they are kept (a disk, a
bucket's service, an object overwritten behind ISS's back) are found before a client asks for
them. One node at a time scrubs (a lease in the index, taken by whichever worker of whichever
node finds it free, as webhooks.py leases an endpoint), at ``ISS_SCRUB_RATE`` bytes per second
for the whole store. A blob is hashed again ``ISS_SCRUB_INTERVAL`` after its upload (its bytes
were hashed as they came in) or its last check, the longest ago first. One that hashes to its
name is recorded verified in the index (nginx may then send it from the bucket, see
``iss.Item``); one that does not is quarantined, as a read through ISS that finds it would.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
from collections.abc import Callable
from typing import IO

from iss_server.background import Background
from iss_server.errors import BlobNotFound, ServiceError
from storage import BlobStore

log = logging.getLogger(__name__)

#: The lease's name in the index.
LEASE = 'scrubber'


class Interrupted(Exception):
    """A blob's read was left off: this process stops, or another node took the lease (it goes on from the index)."""


class Scrubber(Background):
    """One process's scrubber: a thread that checks the blobs due while it holds the store's lease."""

    thread_name = 'iss-scrubber'

    #: Seconds a lease lasts; renewed while it scrubs, so a node that stops loses it this fast.
    LEASE_SECONDS = 60.0
    #: Seconds between looks when nothing is due, or another node scrubs.
    IDLE_SECONDS = 10.0
    #: Blobs asked of the index at a time.
    BATCH = 100
    #: Bytes read at a time.
    CHUNK_BYTES = 1024 * 1024

    def __init__(
        self,
        store: BlobStore,
        *,
        rate: int,
        interval: int,
        checked: Callable[[str], None] = lambda result: None,
        read: Callable[[int], None] = lambda size: None,
    ) -> None:
        """``rate``: bytes per second read; ``interval``: seconds between two checks of a blob.

        ``checked`` is called with each blob's result, ``read`` with each chunk's size (the metrics).
        """
        self._store = store
        self._rate = rate
        self._interval = interval
        self._checked = checked
        self._read = read
        super().__init__()
        self._renewed = 0.0

    def _run(self) -> None:
        while not self._stop.is_set():
            checked = 0
            try:
                checked = self.scrub_due()
            except ServiceError as exc:  # NOTE: the index or the store is down: the next look tries again
                log.warning('scrubbing: %s', exc)
            except Interrupted as exc:
                log.info('scrubbing: %s', exc)
            except Exception:  # NOTE: a bug must not end this process's scrubbing for good
                log.exception('scrubbing: unexpected error')
            if not checked:
                self._stop.wait(self.IDLE_SECONDS)

    def scrub_due(self) -> int:
        """Check the blobs that are due, as long as this process holds the lease; return how many it checked."""
        if not self._renew(force=True):
            return 0
        checked = 0
        pace = _Pace(self._rate)
        for hex_digest, _ in self._store.index.due_for_check(time.time() - self._interval, self.BATCH):
            if self._stop.is_set() or not self._renew():
                break
            self._checked(self.check(hex_digest, pace))
            checked += 1
        return checked

    def check(self, hex_digest: str, pace: _Pace) -> str:
        """Read a blob back, hash it, record or quarantine it; return the result (``verified``, ``corrupt``...).

        Raises:
            StoreUnavailable: the store cannot be read now (nothing is recorded: it is due again at once).
            Interrupted: this process stops, or another node took over meanwhile.
        """
        blob_id = 'sha256:' + hex_digest
        try:
            before = self._store.stat(blob_id)
            with contextlib.closing(self._store.open_unverified(hex_digest)) as file:
                size, actual = self._hash(file, pace)
        except BlobNotFound:
            # NOTE: a row without its blob (fsck and gc's to judge), or one deleted since: checked, not verified.
            self._store.record_check(hex_digest, verified=False)
            return 'missing'
        if actual == hex_digest:
            self._store.record_check(hex_digest, verified=True)
            return 'verified'
        try:
            replaced = self._store.stat(blob_id).version != before.version
        except BlobNotFound:
            replaced = True
        if replaced:
            # NOTE: deleted or stored anew while it was read (a slow read of a large blob): not corrupt.
            return 'changed'
        self._store.quarantine(hex_digest, f'scrubber: its {size} bytes hash to {actual}')
        return 'corrupt'

    def _hash(self, file: IO[bytes], pace: _Pace) -> tuple[int, str]:
        sha256 = hashlib.sha256()
        size = 0
        while chunk := file.read(self.CHUNK_BYTES):
            sha256.update(chunk)
            size += len(chunk)
            self._read(len(chunk))
            if self._stop.wait(pace.wait(len(chunk))):
                raise Interrupted('this process stops')
            if not self._renew():
                raise Interrupted('the lease went to another node')
        return size, sha256.hexdigest()

    def _renew(self, *, force: bool = False) -> bool:
        """Hold the lease for another LEASE_SECONDS; return whether this process holds it.

        PERF: renewed once a third of its term has passed, not at every blob or chunk.
        """
        now = time.time()
        if not force and now - self._renewed < self.LEASE_SECONDS / 3:
            return True
        if self._store.index.take_lease(LEASE, self._holder, now + self.LEASE_SECONDS, now):
            self._renewed = now
            return True
        self._renewed = 0.0
        return False


class _Pace:
    """``rate`` bytes per second at most, on average since it was made: how long to wait after each read."""

    def __init__(self, rate: int) -> None:
        self._rate = rate
        self._started = time.monotonic()
        self._bytes = 0

    def wait(self, size: int) -> float:
        self._bytes += size
        return max(0.0, self._started + self._bytes / self._rate - time.monotonic())
