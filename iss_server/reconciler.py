"""The reconciler: every write that a crash, a kill or an outage left half-done, finished or undone.

The commit order (``storage.BlobStore.commit_all`` and ``delete``) records an intent in
the index before a write touches the bucket (or data directory), and removes it in the
transaction that makes the outcome visible. So whatever stopped a writer, what it left
is named by an intent, and :func:`reconcile` settles each one older than the grace
period (``ISS_RECONCILE_GRACE``): a put is completed when its blob and meta are whole
and its bytes hash to the name, otherwise undone; a delete is completed
(``BlobStore.settle``). Now and then (``ISS_RECONCILE_SWEEP``) it also walks the store
for objects with neither row nor intent, such as a PUT the bucket took after its writer
had given up (``BlobStore.settle_orphan``).

Every worker of every node runs a :class:`Reconciler`; a lease in the index (as the
webhooks' leases) has one of them at a time make a pass. ``fsck --repair`` and ``gc``
run the same :func:`reconcile`.
"""

from __future__ import annotations

import collections
import logging
import random
import time
from collections.abc import Callable

from iss_server.background import Background
from iss_server.errors import ServiceError
from storage import BlobStore

log = logging.getLogger(__name__)

#: The lease one reconciler of all nodes holds while it makes a pass.
LEASE = 'reconcile'
# NOTE: the sweep asks the index about this many objects at once, and the lease is renewed as often.
_BATCH = 500


def reconcile(
    store: BlobStore,
    *,
    grace: float,
    sweep: bool = True,
    orphan_grace: float | None = None,
    dry_run: bool = False,
    renew: Callable[[], bool] = lambda: True,
) -> dict[str, int]:
    """One pass: settle the intents older than ``grace`` seconds; with ``sweep``, the objects without row or intent.

    Args:
        orphan_grace: the age (seconds) an object without row or intent must have to be settled;
            ``grace`` when None.
        renew: called before each batch; the pass stops when it answers False (the lease was lost).

    Returns:
        How many of each outcome (see ``BlobStore.settle`` and ``settle_orphan``); with ``dry_run``,
        how many there would be. Nothing on a store whose index is being built (objects
        without rows are expected there).
    """
    counts: collections.Counter[str] = collections.Counter()
    if not store.index_complete:
        return {}
    now = time.time()
    for number, intent in enumerate(store.index.intents(before=now - grace)):
        if number % _BATCH == 0 and not renew():
            return dict(counts)
        if outcome := store.settle(intent, dry_run=dry_run):
            counts[outcome] += 1
    if sweep:
        _sweep(store, now - (grace if orphan_grace is None else orphan_grace), counts, dry_run, renew)
        if not dry_run:
            store.index.mark_swept(now)
    return dict(counts)


def _sweep(
    store: BlobStore, before: float, counts: collections.Counter[str], dry_run: bool, renew: Callable[[], bool]
) -> None:
    """Settle every blob, then every meta, written before ``before`` that has neither row nor intent."""
    for top in ('blobs', 'meta'):
        batch: list[str] = []
        for hex_digest, _, stat in store.walk(top):
            if hex_digest is not None and stat.modified < before:
                batch.append(hex_digest)
            if len(batch) == _BATCH:
                if not renew():
                    return
                _settle_orphans(store, batch, counts, dry_run)
                batch = []
        _settle_orphans(store, batch, counts, dry_run)


def _settle_orphans(store: BlobStore, hexes: list[str], counts: collections.Counter[str], dry_run: bool) -> None:
    for hex_digest in store.index.unknown(hexes):
        if outcome := store.settle_orphan(hex_digest, dry_run=dry_run):
            counts[outcome] += 1


class Reconciler(Background):
    """One process's reconciler: a thread that makes a pass every ``interval`` seconds when it holds the lease.

    Args:
        fixed: called with each outcome and its count after a pass (the metrics).
    """

    thread_name = 'iss-reconciler'

    def __init__(
        self,
        store: BlobStore,
        *,
        interval: float,
        grace: float,
        sweep_every: float,
        fixed: Callable[[str, int], None] = lambda kind, count: None,
    ) -> None:
        self._store = store
        self._interval = interval
        self._grace = grace
        self._sweep_every = sweep_every
        self._fixed = fixed
        #: Seconds a lease lasts; renewed at every batch, so a node that stops loses it this fast.
        self.lease_seconds = max(3 * interval, 10.0)
        super().__init__()

    def _run(self) -> None:
        # NOTE: the workers of a node start together; a random first wait spreads their looks at the lease.
        wait = random.uniform(0, self._interval)
        failing = False
        while not self._stop.wait(wait):
            wait = self._interval
            try:
                self.run_once()
            except ServiceError as exc:  # NOTE: the index or the bucket is down: the next pass tries again
                if not failing:  # NOTE: once, not every pass of an outage
                    log.warning('reconciler: %s (trying again every %g s)', exc, self._interval)
                failing = True
                continue
            except Exception:  # NOTE: a bug must not end the reconciling of this process for good
                log.exception('reconciler: unexpected error')
                continue
            if failing:
                log.warning('reconciler: working again')
            failing = False

    def run_once(self) -> dict[str, int] | None:
        """A pass, if this process holds (or takes) the lease; what it did, or None without the lease."""
        if not self._renew():
            return None
        sweep = bool(self._sweep_every) and time.time() >= self._store.index.swept_at + self._sweep_every
        counts = reconcile(self._store, grace=self._grace, sweep=sweep, renew=self._renew)
        if counts:
            log.warning('reconciler: settled writes left unfinished: %s', counts)
        for kind, count in counts.items():
            self._fixed(kind, count)
        return counts

    def _renew(self) -> bool:
        now = time.time()
        return self._store.index.take_lease(LEASE, self._holder, now + self.lease_seconds, now)
