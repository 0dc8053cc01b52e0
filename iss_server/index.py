"""The store's index: one row per blob, for listing, lookup and totals.

The blobs and their meta stay the source of truth; this is a derived copy that
the store's ``reindex`` can rebuild from them at any time. Two backends answer
the same queries (:class:`_Queries`): :class:`SQLiteIndex`, the embedded
default at ``$ISS_DATA/index.sqlite3`` in WAL mode, so gunicorn's workers and
threads read while one writes (each process reuses its connections and closes
those idle for a second); and :class:`PostgresIndex`, one database shared by
every node of a store that has several (``ISS_INDEX=postgresql://...``).

Every change of a row is also written, by triggers in the same transaction, to the change
feed's ``events`` (see :meth:`_Queries.events`, served as ``GET /events``).

``complete`` says whether the rows cover the whole store: a fresh index on an
empty store does, one created beside existing blobs (a data directory of the
FastAPI version) does not until a rebuild has run.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import fcntl
import hashlib
import itertools
import json
import logging
import os
import re
import select
import sqlite3
import threading
import time
import urllib.parse
import uuid
import weakref
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Generic, TypeVar

from iss_server import engines, meta, similar
from iss_server.errors import CursorExpired, IndexFull, IndexUnavailable, InvalidCursor

_DB = TypeVar('_DB')

log = logging.getLogger(__name__)

IMAGES = 'images'
ARTIFACTS = 'artifacts'

_SCHEMA = """
CREATE TABLE IF NOT EXISTS blobs (
    hex TEXT PRIMARY KEY,
    collection TEXT NOT NULL,      -- 'images' or 'artifacts': the door it is listed under
    kind TEXT,                     -- the meta's kind; NULL for a blob without meta
    bytes INTEGER NOT NULL,
    created_at REAL NOT NULL,
    item TEXT NOT NULL             -- the listing entry, JSON: the id and the stored meta
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS blobs_by_time ON blobs (collection, created_at, hex);
CREATE INDEX IF NOT EXISTS blobs_by_kind ON blobs (collection, kind, created_at, hex);

-- PERF: totals kept by triggers, so /stats and /metrics cost one small read.
CREATE TABLE IF NOT EXISTS totals (
    kind TEXT PRIMARY KEY,
    count INTEGER NOT NULL,
    bytes INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TRIGGER IF NOT EXISTS totals_insert AFTER INSERT ON blobs BEGIN
    INSERT INTO totals VALUES (coalesce(new.kind, ''), 1, new.bytes)
    ON CONFLICT (kind) DO UPDATE SET count = count + 1, bytes = bytes + excluded.bytes;
END;
CREATE TRIGGER IF NOT EXISTS totals_delete AFTER DELETE ON blobs BEGIN
    UPDATE totals SET count = count - 1, bytes = bytes - old.bytes WHERE kind = coalesce(old.kind, '');
    DELETE FROM totals WHERE count = 0;
END;

CREATE TRIGGER IF NOT EXISTS totals_update AFTER UPDATE ON blobs BEGIN
    UPDATE totals SET count = count - 1, bytes = bytes - old.bytes WHERE kind = coalesce(old.kind, '');
    INSERT INTO totals VALUES (coalesce(new.kind, ''), 1, new.bytes)
    ON CONFLICT (kind) DO UPDATE SET count = count + 1, bytes = bytes + excluded.bytes;
    DELETE FROM totals WHERE count = 0;
END;

CREATE TABLE IF NOT EXISTS state (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;

-- The change feed (GET /events): one row per change of a blob's row, written by these triggers in
-- the transaction of the change itself, so every writer is covered and none can forget it. NOTE:
-- SQLite serialises writes, so seq order is commit order; AUTOINCREMENT never reuses a pruned seq.
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    type TEXT NOT NULL,            -- 'created', 'updated' (the meta changed) or 'deleted'
    at REAL NOT NULL,              -- Unix seconds of the change
    item TEXT NOT NULL             -- the row's listing entry, JSON (as it was, for 'deleted')
);
CREATE TRIGGER IF NOT EXISTS events_insert AFTER INSERT ON blobs BEGIN
    INSERT INTO events (type, at, item) VALUES ('created', (julianday('now') - 2440587.5) * 86400.0, new.item);
END;
CREATE TRIGGER IF NOT EXISTS events_update AFTER UPDATE ON blobs BEGIN
    INSERT INTO events (type, at, item) VALUES ('updated', (julianday('now') - 2440587.5) * 86400.0, new.item);
END;
CREATE TRIGGER IF NOT EXISTS events_delete AFTER DELETE ON blobs BEGIN
    INSERT INTO events (type, at, item) VALUES ('deleted', (julianday('now') - 2440587.5) * 86400.0, old.item);
END;
-- NOTE: cursors carry it, so one from an index since lost and rebuilt (seq counting anew) is refused.
INSERT INTO state VALUES ('events_epoch', lower(hex(randomblob(4)))) ON CONFLICT (key) DO NOTHING;

-- Webhooks (webhooks.py): each endpoint's place in the feed, its failures, and which node holds its lease.
CREATE TABLE IF NOT EXISTS webhooks (
    name TEXT PRIMARY KEY,
    cursor TEXT NOT NULL,          -- the last change it took
    sent INTEGER NOT NULL DEFAULT 0,
    failures INTEGER NOT NULL DEFAULT 0,   -- in a row
    next_at REAL NOT NULL DEFAULT 0,       -- no attempt before (the backoff)
    paused INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    leased_by TEXT,
    lease_until REAL NOT NULL DEFAULT 0
) WITHOUT ROWID;

-- What a write of the bucket (or data directory) is about to do, recorded before it starts and
-- removed in the transaction that makes its outcome visible (storage.py: the commit order), so
-- that the reconciler (reconciler.py) finds every write a crash, a kill or an outage cut short.
CREATE TABLE IF NOT EXISTS intents (
    id TEXT PRIMARY KEY,           -- one per writer: two uploads of the same content each have theirs
    hex TEXT NOT NULL,
    op TEXT NOT NULL,              -- 'put' or 'delete'; 'undo': the reconciler removing a put's leavings
    at REAL NOT NULL,              -- Unix seconds it was recorded
    alive_at REAL NOT NULL         -- when its writer last said it is at work (0: it gave up)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS intents_by_time ON intents (alive_at);
CREATE INDEX IF NOT EXISTS intents_by_hex ON intents (hex);

-- The scrubber (scrubber.py): when each blob's bytes were last read back from the store and hashed.
CREATE TABLE IF NOT EXISTS verified (
    hex TEXT PRIMARY KEY,
    checked_at REAL NOT NULL,      -- last read and hashed, or tried to (what the scrubber schedules by)
    verified_at REAL               -- last found to hash to its name (what nginx may offload by)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS verified_by_time ON verified (checked_at);
-- NOTE: a blob that goes (deleted, quarantined) is forgotten; the same content stored again is not verified yet.
CREATE TRIGGER IF NOT EXISTS verified_forget AFTER DELETE ON blobs BEGIN
    DELETE FROM verified WHERE hex = old.hex;
END;
-- Resumable uploads of a store on a bucket (bucket_sessions.py): any node continues any session.
-- state is the session's JSON; version counts its saves (a save names the one it read);
-- next_part hands out part numbers, each once; the lease is held while a node commits it.
CREATE TABLE IF NOT EXISTS uploads (
    id TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    expires REAL NOT NULL,
    finished INTEGER NOT NULL DEFAULT 0,
    version INTEGER NOT NULL DEFAULT 0,
    next_part INTEGER NOT NULL DEFAULT 0,
    leased_by TEXT,
    lease_until REAL NOT NULL DEFAULT 0
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS uploads_by_expiry ON uploads (expires);
-- Work that one node at a time does (the reconciler's pass, the scrubber, the sweep of expired
-- uploads): who holds it, until when.
CREATE TABLE IF NOT EXISTS leases (
    name TEXT PRIMARY KEY,
    leased_by TEXT NOT NULL,
    lease_until REAL NOT NULL
) WITHOUT ROWID;
"""


@dataclasses.dataclass(frozen=True)
class Row:
    hex: str
    collection: str
    kind: str | None
    bytes: int
    created_at: float
    item: str


@dataclasses.dataclass(frozen=True)
class Event:
    """One change of the store: its ``cursor``, ``type``, time (Unix seconds) and the row's listing entry (JSON)."""

    cursor: str
    type: str
    time: float
    item: str


@dataclasses.dataclass(frozen=True)
class EventPage:
    """Changes in commit order, and the cursor to ask for the next ones (the same one when there are none)."""

    events: list[Event]
    next_cursor: str


@dataclasses.dataclass(frozen=True)
class WebhookState:
    """Where a webhook endpoint is in the feed: its cursor, changes sent, failures in a row, backoff, lease."""

    name: str
    cursor: str
    sent: int
    failures: int
    next_at: float
    paused: bool
    last_error: str | None
    leased_by: str | None
    lease_until: float

    def delivered(self, cursor: str) -> WebhookState:
        return dataclasses.replace(self, cursor=cursor, sent=self.sent + 1, failures=0, next_at=0.0, last_error=None)

    def failed(self, error: str, next_at: float, *, pause: bool) -> WebhookState:
        return dataclasses.replace(self, failures=self.failures + 1, next_at=next_at, paused=pause, last_error=error)


@dataclasses.dataclass(frozen=True)
class Intent:
    """A write of the store begun and not yet finished: its own ``id``, the blob's ``hex``, ``op``, since ``at``.

    ``alive_at``: when its writer last said it is at work (``BlobStore`` renews it while it is).
    """

    id: str
    hex: str
    op: str  # NOTE: 'put' or 'delete'; 'undo': the reconciler removing what a put left (storage.settle)
    at: float
    alive_at: float


@dataclasses.dataclass(frozen=True)
class Page:
    """One page of a listing: the items' JSON texts, and the cursor of the next page."""

    items: list[str]
    next_cursor: str | None


def row_for(hex_digest: str, stored: dict[str, Any] | None, fallback_time: float, size: int) -> Row:
    """The index row of a blob with this metadata (None: a blob without meta)."""
    stored = stored or {}
    kind = stored.get('kind') if isinstance(stored.get('kind'), str) else None
    created_at = stored.get('created_at')
    if not isinstance(created_at, (int, float)) or isinstance(created_at, bool):
        created_at = fallback_time
    item = meta.listing_item('sha256:' + hex_digest, stored, size)
    return Row(
        hex_digest,
        IMAGES if kind == 'image' else ARTIFACTS,
        kind,
        size,
        float(created_at),
        json.dumps(item, separators=(',', ':')),
    )


def totals_document(totals: dict[str, tuple[int, int]]) -> dict[str, Any]:
    """What ``/stats`` and ``python -m iss stats`` say of :meth:`SQLiteIndex.totals`: in all and per kind."""
    return {
        'count': sum(count for count, _ in totals.values()),
        'bytes': sum(size for _, size in totals.values()),
        # NOTE: blobs stored without meta (a crash before it was written) count under "".
        'kinds': {kind: {'count': count, 'bytes': size} for kind, (count, size) in totals.items()},
    }


class _Queries:
    """What every index answers, in SQL that SQLite and PostgreSQL both speak.

    A backend supplies the connection: ``_execute`` (one statement: its rows and
    how many rows it changed), ``_execute_many`` (one statement for many rows, in
    one transaction), ``session``, ``transaction``, and ``_TEMP`` (the schema of a
    connection's own temporary tables). Placeholders are written ``?``.
    """

    #: Where the index lives, for messages (a PostgreSQL URL without its password).
    path: str
    _TEMP = 'temp'
    _SEEN_TABLE = 'CREATE TEMP TABLE seen (hex TEXT PRIMARY KEY)'

    def _execute(self, sql: str, params: Iterable[Any]) -> tuple[list[tuple], int]:
        raise NotImplementedError

    def _execute_many(self, sql: str, rows: list[tuple]) -> None:
        raise NotImplementedError

    def session(self) -> contextlib.AbstractContextManager[object]:
        raise NotImplementedError

    def transaction(self) -> contextlib.AbstractContextManager[None]:
        """Group writes (a rebuild) into one transaction: ``with index.transaction(): ...``."""
        raise NotImplementedError

    def _run(self, sql: str, params: Iterable[Any] = ()) -> list[tuple]:
        return self._execute(sql, params)[0]

    def _changes(self, sql: str, params: Iterable[Any]) -> bool:
        return self._execute(sql, params)[1] > 0

    # -- writes --------------------------------------------------------------

    def put(self, row: Row) -> bool:
        """Add or replace a blob's row; return whether anything changed."""
        return self._wrote(
            self._changes(
                'INSERT INTO blobs VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (hex) DO UPDATE SET '
                'collection = excluded.collection, kind = excluded.kind, bytes = excluded.bytes, '
                'created_at = excluded.created_at, item = excluded.item '
                'WHERE blobs.item IS DISTINCT FROM excluded.item',
                dataclasses.astuple(row),
            )
        )

    _PUT_MISSING = 'INSERT INTO blobs VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (hex) DO NOTHING'

    def put_missing(self, rows: list[Row]) -> None:
        """Add each blob's row unless it has one (the cheap self-healing on every upload); one transaction.

        PERF: the rows already there (an upload of stored content, as a rule) are found by a read
        first, which takes no write lock: SQLite's write transaction for a row already there was
        15% of such a POST, and serialised the workers' commits (a file store holds each blob
        from its check to here, so its row cannot go meanwhile but by the reconciler's repairs).
        """
        if not rows:
            return
        marks = ', '.join('?' * len(rows))
        present = {
            hex_digest
            for (hex_digest,) in self._run(f'SELECT hex FROM blobs WHERE hex IN ({marks})', [row.hex for row in rows])
        }
        rows = [row for row in rows if row.hex not in present]
        if not rows:
            return
        if len(rows) == 1:  # PERF: a lone row commits by itself, without BEGIN and COMMIT
            self._run(self._PUT_MISSING, dataclasses.astuple(rows[0]))
        else:
            # NOTE: in one order (kind, then hex), so that two groups never lock the totals in a circle.
            self._execute_many(
                self._PUT_MISSING,
                [dataclasses.astuple(row) for row in sorted(rows, key=lambda r: (r.kind or '', r.hex))],
            )
        self._wrote(True)

    def remove(self, hex_digest: str) -> bool:
        """Remove a blob's row; return whether it had one."""
        return self._wrote(self._changes('DELETE FROM blobs WHERE hex = ?', (hex_digest,)))

    # -- intents: writes of the store begun and not yet finished (storage.py, reconciler.py) --

    _RECORD_INTENT = 'INSERT INTO intents VALUES (?, ?, ?, ?, ?)'

    def record_intents(self, op: str, hexes: Sequence[str], now: float) -> list[str]:
        """Record that this writer begins ``op`` ('put') on each blob, before any byte is written; their ids.

        NOTE: the ids of one call share a prefix, so that (at, id) orders two writers alike on
        every content they share: of two batches, one is first on all of them (see storage.py).
        """
        if not hexes:
            return []  # PERF: an upload of stored content records none (uuid4 reads the kernel's random source)
        writer = uuid.uuid4().hex
        rows = [(f'{writer}.{number:06d}', hex_digest, op, now, now) for number, hex_digest in enumerate(hexes)]
        if len(rows) == 1:  # PERF: a lone row commits by itself, without BEGIN and COMMIT
            self._run(self._RECORD_INTENT, rows[0])
        elif rows:
            self._execute_many(self._RECORD_INTENT, rows)
        return [row[0] for row in rows]

    def finish_puts(self, rows: list[Row], intent_ids: Sequence[str]) -> None:
        """Add each blob's row unless it has one, and remove the puts' intents: one transaction.

        What makes an upload visible: before it, blob and meta are written and the intent
        says so; after it, the row is there and the intent gone; never one without the other.

        Raises:
            IndexUnavailable: an intent was gone: the reconciler took the writer for dead (it
                outlasted the grace period) and may have undone its write; nothing is committed.
        """
        with self.session(), self.transaction():
            for intent_id in intent_ids:
                if not self._changes('DELETE FROM intents WHERE id = ?', (intent_id,)):
                    raise IndexUnavailable(f'{self.path}: the write outlasted ISS_RECONCILE_GRACE and was settled')
            # NOTE: in one order (kind, then hex), so that two groups never lock the totals in a circle.
            for row in sorted(rows, key=lambda r: (r.kind or '', r.hex)):
                self._run(self._PUT_MISSING, dataclasses.astuple(row))
        self._wrote(True)

    def begin_delete(self, hex_digest: str, now: float) -> str:
        """Record a delete's intent and remove the blob's row: one transaction, before the bucket is touched.

        From here the blob is absent from listings, ``/stats`` and every node's copies; the
        intent's id is returned, dropped (:meth:`drop_intent`) once meta and blob are gone.
        """
        intent_id = uuid.uuid4().hex
        with self.session(), self.transaction():
            self._run(self._RECORD_INTENT, (intent_id, hex_digest, 'delete', now, now))
            self._run('DELETE FROM blobs WHERE hex = ?', (hex_digest,))
        self._wrote(True)
        return intent_id

    def keep_intents(self, intent_ids: Sequence[str], alive_at: float) -> None:
        """Say the intents' writers are at work at ``alive_at`` (0: they gave up; the next pass settles them)."""
        if intent_ids:
            marks = ', '.join('?' * len(intent_ids))
            self._run(f'UPDATE intents SET alive_at = ? WHERE id IN ({marks})', [alive_at, *intent_ids])

    def mark_intent(self, intent_id: str, op: str, alive_at: float) -> None:
        """Say what an intent's writer does now (a put the reconciler undoes becomes 'undo'), and since when."""
        self._run('UPDATE intents SET op = ?, alive_at = ? WHERE id = ?', (op, alive_at, intent_id))

    def removals(self, hexes: Sequence[str], alive_since: float) -> list[str]:
        """Those of ``hexes`` whose objects a delete or an undo at work since ``alive_since`` is removing."""
        if not hexes:
            return []
        marks = ', '.join('?' * len(hexes))
        return [
            hex_digest
            for (hex_digest,) in self._run(
                "SELECT DISTINCT hex FROM intents WHERE op IN ('delete', 'undo') AND alive_at >= ? "
                f'AND hex IN ({marks})',
                [alive_since, *hexes],
            )
        ]

    def drop_intent(self, intent_id: str) -> bool:
        """Remove an intent whose write is finished or undone; whether it was there."""
        return self._changes('DELETE FROM intents WHERE id = ?', (intent_id,))

    def intents(self, *, before: float | None = None, hex_digest: str | None = None) -> list[Intent]:
        """The intents whose writers were last at work before ``before`` (Unix seconds), or those of one blob.

        Oldest first (by ``at``, then ``id``: the order in which writers of the same content take turns).
        """
        if hex_digest is not None:
            rows = self._run('SELECT * FROM intents WHERE hex = ? ORDER BY at, id', (hex_digest,))
        else:
            rows = self._run('SELECT * FROM intents WHERE alive_at < ? ORDER BY at, id', (before,))
        return [Intent(*row) for row in rows]

    def unknown(self, hexes: Sequence[str]) -> list[str]:
        """Those of ``hexes`` that have neither a row nor an intent (the reconciler's sweep), in order."""
        if not hexes:
            return []
        marks = ', '.join('?' * len(hexes))
        known = {
            hex_digest
            for (hex_digest,) in self._run(
                f'SELECT hex FROM blobs WHERE hex IN ({marks}) UNION SELECT hex FROM intents WHERE hex IN ({marks})',
                [*hexes, *hexes],
            )
        }
        return [hex_digest for hex_digest in hexes if hex_digest not in known]

    @property
    def swept_at(self) -> float:
        """When the reconciler last walked the whole store (Unix seconds; 0: never), whichever node did."""
        return float(self._state('reconcile_swept_at') or 0)

    def mark_swept(self, at: float) -> None:
        self._set_state('reconcile_swept_at', repr(at))

    def _wrote(self, changed: bool) -> bool:
        """After a write: wake this process's followers, and now and then prune the expired events."""
        if not changed:
            return False
        with self._changed:
            self._generation += 1
            self._changed.notify_all()
        if time.monotonic() >= self._next_prune and not self._in_transaction():
            # NOTE: never inside a caller's transaction (a rebuild's batch), whose lock it would hold longer.
            self._next_prune = time.monotonic() + self._PRUNE_EVERY_SECONDS
            try:
                self.prune_events(time.time() - self.events_retain)
            except IndexUnavailable as exc:
                log.warning('pruning the change feed failed (tried again in a minute): %s', exc)
        return True

    def _in_transaction(self) -> bool:
        raise NotImplementedError

    # -- a rebuild's bookkeeping, on this thread's connection ------------------

    def start_rebuild(self) -> None:
        """Start counting which rows a rebuild has seen (see :meth:`unseen`)."""
        self._run(f'DROP TABLE IF EXISTS {self._TEMP}.seen')
        self._run(self._SEEN_TABLE)

    def saw(self, hex_digest: str) -> None:
        self._run(f'INSERT INTO {self._TEMP}.seen VALUES (?) ON CONFLICT (hex) DO NOTHING', (hex_digest,))

    def unseen(self) -> list[str]:
        """Rows the rebuild did not see: candidates for removal."""
        return [h for (h,) in self._run(f'SELECT hex FROM blobs WHERE hex NOT IN (SELECT hex FROM {self._TEMP}.seen)')]

    def mark_complete(self, complete: bool = True) -> None:
        self._set_state('complete', '1' if complete else '0')

    def _set_state(self, key: str, value: str) -> None:
        self._run(
            'INSERT INTO state VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value', (key, value)
        )

    def _state(self, key: str) -> str | None:
        rows = self._run('SELECT value FROM state WHERE key = ?', (key,))
        return rows[0][0] if rows else None

    # -- reads ---------------------------------------------------------------

    @property
    def complete(self) -> bool:
        return self._state('complete') == '1'

    def all_hexes(self) -> Iterator[str]:
        """Every row's hex, read in pages so a huge index is never held at once."""
        last = ''
        while rows := self._run('SELECT hex FROM blobs WHERE hex > ? ORDER BY hex LIMIT 1000', (last,)):
            yield from (hex_digest for (hex_digest,) in rows)
            last = rows[-1][0]

    def get(self, hex_digest: str) -> Row | None:
        rows = self._run('SELECT * FROM blobs WHERE hex = ?', (hex_digest,))
        return Row(*rows[0]) if rows else None

    def similar_images(
        self,
        value: int,
        max_distance: int,
        limit: int,
        *,
        exclude: str | None = None,
        after: tuple[int, str] | None = None,
    ) -> list[tuple[int, str]]:
        """The stored images within ``max_distance`` bits of the perceptual hash ``value``, nearest first.

        Each as ``(distance, listing item JSON)``; ``exclude`` and ``after`` as :meth:`similar.SimilarIndex.near`.
        """
        near = similar.SimilarIndex(self._run).near(value, max_distance, limit, exclude=exclude, after=after)
        if not near:
            return []
        marks = ', '.join('?' * len(near))
        items = dict(
            self._run(f'SELECT hex, item FROM blobs WHERE hex IN ({marks})', [hex_digest for hex_digest, _ in near])
        )
        # NOTE: a row deleted between the two reads is left out.
        return [(distance, items[hex_digest]) for hex_digest, distance in near if hex_digest in items]

    def totals(self) -> dict[str, tuple[int, int]]:
        """``{kind: (count, bytes)}``; a blob without meta counts under ``''``."""
        return {kind: (count, size) for kind, count, size in self._run('SELECT * FROM totals ORDER BY kind')}

    def page(
        self,
        collection: str,
        *,
        limit: int,
        kind: str | None = None,
        created_after: float | None = None,
        created_before: float | None = None,
        cursor: str | None = None,
    ) -> Page:
        """Items of ``collection``, newest first, ``limit`` at most, after ``cursor``.

        Raises:
            InvalidCursor: ``cursor`` is not one this method returned.
        """
        where: list[str] = ['collection = ?']
        params: list[object] = [collection]
        if kind is not None:
            where.append('kind = ?')
            params.append(kind)
        if created_after is not None:
            where.append('created_at > ?')
            params.append(created_after)
        if created_before is not None:
            where.append('created_at < ?')
            params.append(created_before)
        if cursor is not None:
            last_time, last_hex = _decode_cursor(cursor)
            # NOTE: keyset pagination: a page costs the same however deep it is,
            # and uploads during a walk neither repeat nor skip older items.
            # PERF: as a row value, the database seeks the index to it (an OR of the parts scans).
            where.append('(created_at, hex) < (?, ?)')
            params += [last_time, last_hex]
        rows = self._run(
            f'SELECT created_at, hex, item FROM blobs WHERE {" AND ".join(where)} '
            'ORDER BY created_at DESC, hex DESC LIMIT ?',
            [*params, limit + 1],
        )
        next_cursor = _encode_cursor(rows[limit - 1][0], rows[limit - 1][1]) if len(rows) > limit else None
        return Page([item for _, _, item in rows[:limit]], next_cursor)

    # -- the change feed (GET /events) ----------------------------------------

    #: The columns that put events in commit order (SQLite: ``seq``; see :class:`PostgresIndex`).
    _EVENT_POSITION: tuple[str, ...] = ('seq',)
    #: SQL true of an event that no change still uncommitted may come before (see :class:`PostgresIndex`).
    _EVENT_SETTLED = 'TRUE'
    #: A statement that makes prunes take turns, inside their transaction (SQLite's BEGIN IMMEDIATE already does).
    _PRUNE_LOCK = ''
    #: Seconds between two looks at the events while waiting for one that another process writes.
    _EVENT_POLL_SECONDS = 0.05
    _PRUNE_EVERY_SECONDS = 60.0
    _next_prune: float  # NOTE: declared for mypy, which meets its use before _start_feed sets it
    _PRUNE_BATCH = 1000
    #: Seconds of changes kept for followers; the feed sets it from ``ISS_EVENTS_RETAIN``.
    events_retain: float = 7 * 86400

    def _start_feed(self) -> None:
        self._changed = threading.Condition()
        self._generation = 0  # NOTE: counts this process's writes, so a waiter never misses a wake-up
        self._next_prune = 0.0

    def events(self, after: str | None, limit: int) -> EventPage:
        """The changes after the cursor ``after``, in commit order, ``limit`` at most.

        ``after`` None starts at the oldest change kept; ``'now'`` answers none, with the
        cursor of the latest (where a follower that has just listed the store starts).

        Raises:
            InvalidCursor: ``after`` is not a cursor this index handed out (also one past the
                newest position it has: a follower holding it would skip every change up to there).
            CursorExpired: the changes after it are pruned, or the index was lost and rebuilt since.
        """
        return self._events(after, limit, check_ahead=True)

    def _events(self, after: str | None, limit: int, *, check_ahead: bool) -> EventPage:
        """:meth:`events`; ``check_ahead`` False trusts ``after`` not to be ahead (the previous page's cursor)."""
        columns = ', '.join(self._EVENT_POSITION)
        while True:
            epoch = self._state('events_epoch') or ''
            pruned = self._pruned()
            if after is None:
                position = pruned
            elif after == 'now':
                position = self._head() or pruned
            else:
                position = self._decode_event_cursor(after, epoch)
            rows = self._run(
                f'SELECT {columns}, type, at, item FROM events '
                f'WHERE ({columns}) > ({", ".join("?" * len(position))}) AND {self._EVENT_SETTLED} '
                f'ORDER BY {columns} LIMIT ?',
                [*position, limit],
            )
            # NOTE: read after the events, so that a prune between the two is seen.
            if self._pruned() <= position:
                break
            if after is not None and after != 'now':
                raise CursorExpired(after)
        # NOTE: only when nothing follows it: a settled change after a position proves it is not ahead.
        # The newest position handed out never moves back (prunes keep theirs), so none is refused wrongly.
        if check_ahead and not rows and position > (self._head() or self._pruned()):
            raise InvalidCursor(f'{(after or "")[:80]!r} is ahead of the change feed')
        width = len(self._EVENT_POSITION)
        events = [Event(_event_cursor(epoch, row[:width]), *row[width:]) for row in rows]
        return EventPage(events, events[-1].cursor if events else _event_cursor(epoch, position))

    def wait_for_events(
        self, after: str | None, limit: int, seconds: float, stop: threading.Event | None = None
    ) -> EventPage:
        """:meth:`events`, waiting up to ``seconds`` for one when there are none yet (or until ``stop`` is set)."""
        deadline = time.monotonic() + seconds
        check_ahead = True
        while True:
            generation = self._generation
            # PERF: the first look checks the cursor; the next ones take the cursor it answered.
            page = self._events(after, limit, check_ahead=check_ahead)
            check_ahead = False
            left = deadline - time.monotonic()
            if page.events or left <= 0 or (stop is not None and stop.is_set()):
                return page
            after = page.next_cursor
            # NOTE: woken at once by a write of this process; another's is seen at the next look.
            with self._changed:

                def written(seen: int = generation) -> bool:
                    return self._generation != seen

                self._changed.wait_for(written, min(self._EVENT_POLL_SECONDS, left))

    def prune_events(self, before: float) -> int:
        """Delete the settled events older than ``before`` (Unix seconds), oldest first; return how many.

        NOTE: up to a position, which is kept (``events_pruned``): a cursor before it answers
        410 rather than skip what was deleted after it.
        """
        columns = ', '.join(self._EVENT_POSITION)
        removed = 0
        with self.session():
            while True:
                rows = self._run(
                    f'SELECT {columns}, at FROM events WHERE {self._EVENT_SETTLED} ORDER BY {columns} LIMIT ?',
                    [self._PRUNE_BATCH],
                )
                expired = [row[:-1] for row in itertools.takewhile(lambda row: row[-1] < before, rows)]
                if not expired:
                    return removed
                with self.transaction():
                    if self._PRUNE_LOCK:
                        self._run(self._PRUNE_LOCK)
                    last = max(tuple(expired[-1]), self._pruned())  # NOTE: never back, whoever pruned first
                    self._run(f'DELETE FROM events WHERE ({columns}) <= ({", ".join("?" * len(last))})', last)
                    self._set_state('events_pruned', '.'.join(map(str, last)))
                removed += len(expired)
                if len(expired) < self._PRUNE_BATCH:
                    return removed

    def _pruned(self) -> tuple[int, ...]:
        """The position up to which events are pruned (zeros: none ever were)."""
        value = self._state('events_pruned')
        return tuple(map(int, value.split('.'))) if value else (0,) * len(self._EVENT_POSITION)

    def _head(self) -> tuple[int, ...] | None:
        """The position of the latest settled event, if any is kept."""
        columns = ', '.join(self._EVENT_POSITION)
        rows = self._run(
            f'SELECT {columns} FROM events WHERE {self._EVENT_SETTLED} '
            f'ORDER BY {", ".join(column + " DESC" for column in self._EVENT_POSITION)} LIMIT 1'
        )
        return tuple(rows[0]) if rows else None

    def _decode_event_cursor(self, cursor: str, epoch: str) -> tuple[int, ...]:
        given_epoch, *numbers = cursor.split('.')
        # NOTE: ASCII digits that fit a 64-bit integer (int() takes '²', SQLite refuses 2**64).
        if len(numbers) != len(self._EVENT_POSITION) or not all(_COUNTER.fullmatch(number) for number in numbers):
            raise InvalidCursor(f'{cursor[:80]!r} is not a cursor of /events')
        if given_epoch != epoch:
            raise CursorExpired(cursor[:80])  # NOTE: of an index since lost and rebuilt: counted anew
        return tuple(map(int, numbers))

    # -- webhooks' places in the feed (webhooks.py) ----------------------------

    _WEBHOOK_COLUMNS = 'name, cursor, sent, failures, next_at, paused, last_error, leased_by, lease_until'

    def add_webhook(self, name: str) -> None:
        """Have endpoint ``name`` follow the feed from its latest change, unless it already follows it."""
        self._run(
            'INSERT INTO webhooks (name, cursor) VALUES (?, ?) ON CONFLICT (name) DO NOTHING',
            (name, self.events('now', 1).next_cursor),
        )

    def lease_webhook(self, name: str, holder: str, until: float, now: float) -> WebhookState | None:
        """Take or renew the lease on endpoint ``name`` until ``until``; its state if ``holder`` has it."""
        rows = self._run(f'SELECT {self._WEBHOOK_COLUMNS} FROM webhooks WHERE name = ?', (name,))
        if not rows:
            return None
        state = _webhook_state(rows[0])
        # PERF: a lease held by another, or by this holder for more than half its term, is only
        # read: the workers that look every 0.2 s would otherwise each write to the index as often.
        if state.leased_by != holder and state.lease_until >= now:
            return None
        if state.leased_by == holder and state.lease_until - now > (until - now) / 2:
            return state
        # NOTE: one statement: of two nodes finding the lease expired, the second one's UPDATE
        # waits for the first's row lock, then finds it taken (PostgreSQL re-checks the WHERE).
        if not self._changes(
            'UPDATE webhooks SET leased_by = ?, lease_until = ? WHERE name = ? AND (leased_by = ? OR lease_until < ?)',
            (holder, until, name, holder, now),
        ):
            return None
        rows = self._run(f'SELECT {self._WEBHOOK_COLUMNS} FROM webhooks WHERE name = ?', (name,))
        return _webhook_state(rows[0]) if rows else None

    def record_webhook(self, state: WebhookState, holder: str, until: float) -> bool:
        """Keep an endpoint's new state and lease it until ``until``, if ``holder`` still holds it; return whether."""
        return self._changes(
            'UPDATE webhooks SET cursor = ?, sent = ?, failures = ?, next_at = ?, paused = ?, last_error = ?, '
            'lease_until = ? WHERE name = ? AND leased_by = ?',
            (state.cursor, state.sent, state.failures, state.next_at, int(state.paused), state.last_error, until)
            + (state.name, holder),
        )

    def resume_webhook(self, name: str, cursor: str | None = None) -> None:
        """Clear an endpoint's failures and pause; ``cursor``: go on from there instead of its own."""
        self._run(
            'UPDATE webhooks SET paused = 0, failures = 0, next_at = 0, last_error = NULL, '
            'cursor = coalesce(?, cursor) WHERE name = ?',
            (cursor, name),
        )

    def webhook_states(self) -> list[WebhookState]:
        return [_webhook_state(row) for row in self._run(f'SELECT {self._WEBHOOK_COLUMNS} FROM webhooks ORDER BY name')]

    # -- the scrubber's record (scrubber.py); leases (the reconciler's pass, the scrubber) ---------------------------

    def record_check(self, hex_digest: str, at: float, *, verified: bool) -> None:
        """Record that a blob's bytes were read back and hashed at ``at``; ``verified``: they hashed to its name.

        NOTE: only for a blob that has a row: one deleted meanwhile is not recorded again.
        """
        self._run(
            'INSERT INTO verified SELECT hex, ?, ? FROM blobs WHERE hex = ? ON CONFLICT (hex) DO UPDATE SET '
            'checked_at = excluded.checked_at, verified_at = coalesce(excluded.verified_at, verified.verified_at)',
            (at, at if verified else None, hex_digest),
        )

    def verified_at(self, hex_digest: str) -> float | None:
        """When the blob's bytes last hashed to its name, read back from the store; None: never (or forgotten)."""
        rows = self._run('SELECT verified_at FROM verified WHERE hex = ?', (hex_digest,))
        return rows[0][0] if rows else None

    def due_for_check(self, before: float, limit: int) -> list[tuple[str, int]]:
        """Up to ``limit`` blobs (hex, bytes) last hashed before ``before``, the longest ago first.

        A blob never read back counts from its upload (its bytes were hashed as they came in).
        """
        return [
            (hex_digest, size)
            for hex_digest, size in self._run(
                'SELECT blobs.hex, blobs.bytes FROM blobs LEFT JOIN verified ON verified.hex = blobs.hex '
                'WHERE coalesce(verified.checked_at, blobs.created_at) < ? '
                'ORDER BY coalesce(verified.checked_at, blobs.created_at), blobs.hex LIMIT ?',
                (before, limit),
            )
        ]

    def take_lease(self, name: str, holder: str, until: float, now: float) -> bool:
        """Take or renew the lease ``name`` until ``until``; return whether ``holder`` has it."""
        rows = self._run('SELECT leased_by, lease_until FROM leases WHERE name = ?', (name,))
        # PERF: a lease another holds is only read: every worker of every node asks, often.
        if rows and rows[0][0] != holder and rows[0][1] >= now:
            return False
        # NOTE: one statement: of two holders finding the lease expired, the second one's write waits
        # for the first's row lock, then finds it taken (PostgreSQL re-checks the WHERE).
        return self._changes(
            'INSERT INTO leases VALUES (?, ?, ?) ON CONFLICT (name) DO UPDATE SET '
            'leased_by = excluded.leased_by, lease_until = excluded.lease_until '
            'WHERE leases.leased_by = excluded.leased_by OR leases.lease_until < ?',
            (name, holder, until, now),
        )

    # -- resumable uploads of a store on a bucket (bucket_sessions.py) ----------

    def add_upload(self, upload_id: str, state: str, expires: float) -> None:
        self._run('INSERT INTO uploads (id, state, expires) VALUES (?, ?, ?)', (upload_id, state, expires))

    def upload(self, upload_id: str) -> UploadRow | None:
        """A resumable upload's row: its JSON state, the version that state is, its commit lease."""
        rows = self._run('SELECT state, version, leased_by, lease_until FROM uploads WHERE id = ?', (upload_id,))
        return UploadRow(upload_id, *rows[0]) if rows else None

    def open_uploads(self, now: float) -> int:
        """How many uploads are unfinished and unexpired (what ``ISS_TUS_MAX_SESSIONS`` bounds)."""
        return int(self._run('SELECT count(*) FROM uploads WHERE finished = 0 AND expires >= ?', (now,))[0][0])

    def claim_part_number(self, upload_id: str) -> int | None:
        """A part number no other request of this upload is given (None: the upload is gone)."""
        rows = self._run('UPDATE uploads SET next_part = next_part + 1 WHERE id = ? RETURNING next_part', (upload_id,))
        return int(rows[0][0]) if rows else None

    def save_upload(self, upload_id: str, state: str, expires: float, version: int, *, finished: bool) -> bool:
        """Replace the state, if it is still ``version`` (no other request saved it since); return whether."""
        return self._changes(
            'UPDATE uploads SET state = ?, expires = ?, finished = ?, version = version + 1 '
            'WHERE id = ? AND version = ?',
            (state, expires, int(finished), upload_id, version),
        )

    def lease_upload(self, upload_id: str, holder: str, until: float, now: float) -> bool:
        """Take (or renew) the upload's commit lease until ``until``, unless another holder's runs on."""
        return self._changes(
            'UPDATE uploads SET leased_by = ?, lease_until = ? WHERE id = ? AND (leased_by = ? OR lease_until < ?)',
            (holder, until, upload_id, holder, now),
        )

    def remove_upload(self, upload_id: str, holder: str, now: float) -> bool:
        """Remove the upload's row unless another holder's lease runs on; return whether it went."""
        return self._changes(
            'DELETE FROM uploads WHERE id = ? AND (leased_by IS NULL OR leased_by = ? OR lease_until < ?)',
            (upload_id, holder, now),
        )

    def expired_uploads(self, now: float, limit: int) -> list[UploadRow]:
        """Uploads past their expiry that no node is committing, a batch at a time."""
        rows = self._run(
            'SELECT id, state, version, leased_by, lease_until FROM uploads '
            'WHERE expires < ? AND lease_until < ? ORDER BY expires LIMIT ?',
            (now, now, limit),
        )
        return [UploadRow(*row) for row in rows]


@dataclasses.dataclass(frozen=True)
class UploadRow:
    """A resumable upload as the index keeps it (the state is bucket_sessions' JSON)."""

    id: str
    state: str
    version: int
    leased_by: str | None
    lease_until: float


_COUNTER = re.compile(r'[0-9]{1,18}')


def _webhook_state(row: tuple) -> WebhookState:
    name, cursor, sent, failures, next_at, paused, last_error, leased_by, lease_until = row
    return WebhookState(name, cursor, sent, failures, next_at, bool(paused), last_error, leased_by, lease_until)


def _event_cursor(epoch: str, position: Iterable[int]) -> str:
    """A cursor of the change feed: the index's epoch and the event's position, ``3f9a01c2.1234``."""
    return '.'.join([epoch, *map(str, position)])


class SQLiteIndex(_Queries):
    """The SQLite index of one store; safe to share between threads and processes."""

    # NOTE: a rebuild writes in batches; writers wait for a batch, never fail.
    _BUSY_TIMEOUT_MS = 30_000
    _SEEN_TABLE = 'CREATE TEMP TABLE seen (hex TEXT PRIMARY KEY) WITHOUT ROWID'

    # PERF: connections are kept for reuse: opening one costs ~130 us, and closing a
    # process's last one checkpoints the WAL into the database file (four fdatasyncs),
    # which every upload to a quiet server paid for (a small upload on one connection:
    # 2.8 -> 1.8 ms of CPU). NOTE: those idle for this long are closed, so a quiet ISS
    # holds no file open for writing and an operator's `mount -o remount,ro` is not refused.
    _IDLE_SECONDS = 1.0

    def __init__(self, path: str) -> None:
        self.path = path
        self._local = threading.local()
        self._schema_made = (0, 0)  # NOTE: (pid, inode) of the file this process made the schema in
        self._idle: list[_Connection[sqlite3.Connection]] = []
        self._idle_lock = threading.Lock()
        self._idle_pid = os.getpid()
        self._closer: threading.Timer | None = None
        self._start_feed()

    def _in_transaction(self) -> bool:
        held = getattr(self._local, 'held', None)
        return held is not None and held.pid == os.getpid() and held.db.in_transaction

    @contextlib.contextmanager
    def session(self) -> Iterator[sqlite3.Connection]:
        """One connection for the calls inside the block (a rebuild's transactions, its temp table).

        Outside a session each call takes a connection for itself alone.
        """
        held = getattr(self._local, 'held', None)
        if held is not None and held.pid == os.getpid():
            yield held.db
            return
        held = self._local.held = self._take()
        try:
            yield held.db
        except BaseException:
            self._local.held = None
            _close(held)  # NOTE: after an error (a full or failing disk) the next call starts afresh
            raise
        self._local.held = None
        self._give_back(held)

    def _take(self) -> _Connection[sqlite3.Connection]:
        """An idle connection to the current index file, or a new one."""
        try:
            inode = os.stat(self.path).st_ino
        except OSError:
            inode = None  # NOTE: not created yet, or removed: connect says which
        with self._idle_lock:
            idle = self._own_idle()
            while idle:
                connection = idle.pop()
                if connection.inode == inode:
                    return connection
                _close(connection)  # NOTE: the file was removed or replaced (a lost index rebuilt)
        return self._connect()

    def _own_idle(self) -> list[_Connection[sqlite3.Connection]]:
        """This process's idle connections; call it holding ``_idle_lock``."""
        if self._idle_pid != os.getpid():
            # NOTE: a forked child starts with none of its parent's.
            _INHERITED.extend(self._idle)
            self._idle, self._idle_pid, self._closer = [], os.getpid(), None
        return self._idle

    def _connect(self, *, set_aside: bool = True) -> _Connection[sqlite3.Connection]:
        db: sqlite3.Connection | None = None
        try:
            db = sqlite3.connect(
                self.path, timeout=self._BUSY_TIMEOUT_MS / 1000, isolation_level=None, check_same_thread=False
            )
            # NOTE: NORMAL in WAL mode never corrupts; after a power loss the last
            # transactions may be missing, and the files (the truth) still have them.
            db.execute('PRAGMA synchronous=NORMAL')
            inode = os.stat(self.path).st_ino
            # NOTE: per process and per file: a file lost or set aside while ISS runs is a new, empty one
            if self._schema_made != (os.getpid(), inode):
                self._enter_wal_mode(db)
                # NOTE: in one write transaction taken up front: statements that each read the
                # schema and then write upgrade a read lock, which SQLite refuses at once, without
                # waiting, while another process creates the schema ("database is locked" from
                # one worker in ~15 first starts of two).
                db.execute('BEGIN IMMEDIATE')
                try:
                    for statement in _schema_statements():
                        db.execute(statement)
                    db.execute('COMMIT')
                except BaseException:
                    db.execute('ROLLBACK')
                    raise
                self._schema_made = (os.getpid(), inode)
        except (sqlite3.Error, OSError) as exc:
            if db is not None:
                db.close()
            if set_aside and _is_corrupt(exc) and self._set_aside_if_corrupt():
                return self._connect(set_aside=False)  # NOTE: a new, empty index: the store's start rebuilds it
            raise _unavailable(self.path, exc) from exc
        return _Connection(db, inode, os.getpid())

    def _set_aside_if_corrupt(self) -> bool:
        """Rename a corrupt index file (and its WAL) aside, so a new one is built from the files; whether it was.

        NOTE: the index is derived from the blob and meta files, the truth: a file SQLite cannot read
        (a disk's fault, or an operator's) once left the node answering 503 to every write and listing
        until someone moved it away. In one process at a time, under a lock, and only while the file
        is still unreadable: another worker may have set it aside and made the new one already.
        """
        with open(self.path + '.repair.lock', 'a') as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                with contextlib.closing(sqlite3.connect(self.path, timeout=self._BUSY_TIMEOUT_MS / 1000)) as db:
                    if db.execute('PRAGMA quick_check(1)').fetchall() == [('ok',)]:
                        return True  # NOTE: whole now: set aside (or never corrupt) meanwhile
            except sqlite3.Error as exc:
                if not _is_corrupt(exc):
                    return False
            aside = f'{self.path}.corrupt-{time.strftime("%Y%m%dT%H%M%S")}'
            os.rename(self.path, aside)
            for suffix in ('-wal', '-shm'):
                with contextlib.suppress(FileNotFoundError):
                    os.rename(self.path + suffix, aside + suffix)
            log.error('index %s cannot be read (set aside as %s): rebuilding it from the files', self.path, aside)
            return True

    def _enter_wal_mode(self, db: sqlite3.Connection) -> None:
        """Switch a new index file to WAL (a no-op for one that is), waiting for other processes doing it.

        NOTE: the switch needs the file to itself, and SQLite answers "database is locked" at
        once instead of calling the busy handler: several workers starting on a fresh data
        directory all try it in the same millisecond.
        """
        deadline = time.monotonic() + self._BUSY_TIMEOUT_MS / 1000
        while True:
            try:
                db.execute('PRAGMA journal_mode=WAL')
                return
            except sqlite3.OperationalError as exc:
                if exc.sqlite_errorcode != sqlite3.SQLITE_BUSY or time.monotonic() > deadline:
                    raise
                time.sleep(0.005)

    def _give_back(self, connection: _Connection[sqlite3.Connection]) -> None:
        if connection.pid != os.getpid() or connection.db.in_transaction:
            _close(connection)  # NOTE: a transaction left open rolls back; never handed on
            return
        connection.idle_since = time.monotonic()
        with self._idle_lock:
            self._own_idle().append(connection)
            if self._closer is None:
                self._close_idle_later(self._IDLE_SECONDS)

    def _close_idle_later(self, delay: float) -> None:
        self._closer = threading.Timer(delay, self._close_idle)
        self._closer.daemon = True
        self._closer.start()

    def _close_idle(self) -> None:
        """Close the connections idle for ``_IDLE_SECONDS``; come back for the others."""
        now = time.monotonic()
        with self._idle_lock:
            stale = [connection for connection in self._own_idle() if now - connection.idle_since >= self._IDLE_SECONDS]
            self._idle = fresh = [connection for connection in self._idle if connection not in stale]
            self._closer = None
            if fresh:
                self._close_idle_later(min(connection.idle_since for connection in fresh) + self._IDLE_SECONDS - now)
        for connection in stale:
            _close(connection)

    def _execute(self, sql: str, params: Iterable[Any]) -> tuple[list[tuple], int]:
        """Run one statement; return its rows and how many rows it changed."""
        with self.session() as db:
            try:
                cursor = db.execute(sql, tuple(params))
                return cursor.fetchall(), cursor.rowcount
            except sqlite3.Error as exc:
                raise self._failed(exc) from exc

    def _execute_many(self, sql: str, rows: list[tuple]) -> None:
        with self.session() as db:
            try:
                db.execute('BEGIN IMMEDIATE')
                db.executemany(sql, rows)
                db.execute('COMMIT')
            except sqlite3.Error as exc:
                if db.in_transaction:
                    db.execute('ROLLBACK')
                raise self._failed(exc) from exc

    def _failed(self, exc: sqlite3.Error) -> IndexUnavailable | IndexFull:
        """The error a failed statement raises; a damaged file is set aside first (the next call makes a new one)."""
        if _is_corrupt(exc):
            with contextlib.suppress(OSError, sqlite3.Error):
                self._set_aside_if_corrupt()
        return _unavailable(self.path, exc)

    def transaction(self) -> _Transaction:
        return _Transaction(self)


@dataclasses.dataclass(eq=False)
class _Connection(Generic[_DB]):
    db: _DB  # NOTE: a sqlite3.Connection; PostgresIndex keeps its psycopg ones here too
    inode: int  # NOTE: of the index file it opened, to notice a file removed and rebuilt
    pid: int
    idle_since: float = 0.0


# NOTE: connections a forked child inherited: kept referenced, so that their
# finalizers never close (and checkpoint) the parent's database from the child.
_INHERITED: list[_Connection[Any]] = []  # NOTE: SQLite's and PostgreSQL's


def _close(connection: _Connection[sqlite3.Connection]) -> None:
    if connection.pid == os.getpid():
        connection.db.close()
    else:
        _INHERITED.append(connection)


class _Transaction:
    def __init__(self, index: SQLiteIndex) -> None:
        self._index = index

    def __enter__(self) -> None:
        self._index._run('BEGIN IMMEDIATE')

    def __exit__(self, exc_type: object, *rest: object) -> None:
        self._index._run('ROLLBACK' if exc_type else 'COMMIT')


_POSTGRES_SCHEMA = """
CREATE TABLE IF NOT EXISTS blobs (
    hex TEXT PRIMARY KEY,
    collection TEXT NOT NULL,
    kind TEXT,
    bytes BIGINT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    item TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS blobs_by_time ON blobs (collection, created_at, hex);
CREATE INDEX IF NOT EXISTS blobs_by_kind ON blobs (collection, kind, created_at, hex);
CREATE TABLE IF NOT EXISTS totals (kind TEXT PRIMARY KEY, count BIGINT NOT NULL, bytes BIGINT NOT NULL);
CREATE OR REPLACE FUNCTION iss_count_totals() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP IN ('DELETE', 'UPDATE') THEN
        UPDATE totals SET count = count - 1, bytes = bytes - OLD.bytes WHERE kind = coalesce(OLD.kind, '');
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        INSERT INTO totals VALUES (coalesce(NEW.kind, ''), 1, NEW.bytes)
        ON CONFLICT (kind) DO UPDATE SET count = totals.count + 1, bytes = totals.bytes + excluded.bytes;
    END IF;
    DELETE FROM totals WHERE count = 0;
    RETURN NULL;
END $$;
CREATE OR REPLACE TRIGGER blobs_totals AFTER INSERT OR UPDATE OR DELETE ON blobs
    FOR EACH ROW EXECUTE FUNCTION iss_count_totals();
CREATE TABLE IF NOT EXISTS state (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS events (
    seq BIGINT GENERATED ALWAYS AS IDENTITY,
    xact BIGINT NOT NULL,
    type TEXT NOT NULL,
    at DOUBLE PRECISION NOT NULL,
    item TEXT NOT NULL,
    PRIMARY KEY (xact, seq)
);
CREATE OR REPLACE FUNCTION iss_record_event() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO events (xact, type, at, item) VALUES (
        pg_current_xact_id()::text::bigint,
        CASE TG_OP WHEN 'INSERT' THEN 'created' WHEN 'UPDATE' THEN 'updated' ELSE 'deleted' END,
        extract(epoch FROM clock_timestamp()),
        CASE TG_OP WHEN 'DELETE' THEN OLD.item ELSE NEW.item END
    );
    RETURN NULL;
END $$;
CREATE OR REPLACE TRIGGER blobs_events AFTER INSERT OR UPDATE OR DELETE ON blobs
    FOR EACH ROW EXECUTE FUNCTION iss_record_event();
INSERT INTO state VALUES ('events_epoch', substr(md5(random()::text), 1, 8)) ON CONFLICT (key) DO NOTHING;
CREATE TABLE IF NOT EXISTS webhooks (
    name TEXT PRIMARY KEY,
    cursor TEXT NOT NULL,
    sent BIGINT NOT NULL DEFAULT 0,
    failures INTEGER NOT NULL DEFAULT 0,
    next_at DOUBLE PRECISION NOT NULL DEFAULT 0,
    paused INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    leased_by TEXT,
    lease_until DOUBLE PRECISION NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS verified (
    hex TEXT PRIMARY KEY,
    checked_at DOUBLE PRECISION NOT NULL,
    verified_at DOUBLE PRECISION
);
CREATE INDEX IF NOT EXISTS verified_by_time ON verified (checked_at);
CREATE OR REPLACE FUNCTION iss_forget_verified() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM verified WHERE hex = OLD.hex;
    RETURN NULL;
END $$;
CREATE OR REPLACE TRIGGER blobs_verified AFTER DELETE ON blobs
    FOR EACH ROW EXECUTE FUNCTION iss_forget_verified();
CREATE TABLE IF NOT EXISTS leases (
    name TEXT PRIMARY KEY,
    leased_by TEXT NOT NULL,
    lease_until DOUBLE PRECISION NOT NULL
);
CREATE TABLE IF NOT EXISTS intents (
    id TEXT PRIMARY KEY,
    hex TEXT NOT NULL,
    op TEXT NOT NULL,
    at DOUBLE PRECISION NOT NULL,
    alive_at DOUBLE PRECISION NOT NULL
);
CREATE INDEX IF NOT EXISTS intents_by_time ON intents (alive_at);
CREATE INDEX IF NOT EXISTS intents_by_hex ON intents (hex);
CREATE TABLE IF NOT EXISTS uploads (
    id TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    expires DOUBLE PRECISION NOT NULL,
    finished INTEGER NOT NULL DEFAULT 0,
    version BIGINT NOT NULL DEFAULT 0,
    next_part INTEGER NOT NULL DEFAULT 0,
    leased_by TEXT,
    lease_until DOUBLE PRECISION NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS uploads_by_expiry ON uploads (expires);
-- A rebuild's bookkeeping (PostgresIndex.start_rebuild): the rows each run has seen.
CREATE UNLOGGED TABLE IF NOT EXISTS rebuild_seen (run TEXT NOT NULL, hex TEXT NOT NULL, PRIMARY KEY (run, hex));
""" + ''.join(f'{statement};\n' for statement in (*similar.schema('postgresql'), *similar.sync_triggers('postgresql')))

#: What the schema a database has is, so a node creates it only when it changed (see _PoolHooks.configure).
_POSTGRES_SCHEMA_HASH = hashlib.sha256(_POSTGRES_SCHEMA.encode()).hexdigest()


class PostgresIndex(_Queries):
    """The index in a PostgreSQL database, shared by every ISS node of a store (``ISS_INDEX=postgresql://...``).

    The same rows and totals as :class:`SQLiteIndex`, in a database of its own
    (tables ``blobs``, ``totals``, ``state``). Each process keeps a pool of at most
    ``pool_size`` connections (``ISS_INDEX_POOL_SIZE``), made when it first needs one, so a
    forked child never uses, or closes, its parent's; a call borrows one for a statement
    (autocommit), a :meth:`session` for all of its own.

    Every call has a deadline, ``timeout`` seconds (``ISS_INDEX_TIMEOUT``) counted by ISS:
    waiting for a pooled connection, connecting, and each statement (a frozen server counts
    nothing; see :mod:`engines`), cut to what the request's index budget has left (``engines.INDEX.budget``).
    A server that is down, refuses, or answers too late raises :class:`errors.IndexUnavailable`
    (503), and the connection is dropped. One whose server
    went away while it was idle (a restart) is noticed before use at no cost and replaced,
    so a restart costs no client an error once the server is back.
    """

    # NOTE: sequence numbers are taken before commit, so they commit out of order: a reader
    # that stepped past seq 7 while seq 6's transaction runs on would never see 6. Events are
    # ordered by their transaction's id first, and only those of transactions older than every
    # one still running are handed out: no change can then commit before them in that order.
    # (By seq alone with that filter is not enough: a later transaction may take a smaller seq.)
    _EVENT_POSITION = ('xact', 'seq')
    _EVENT_SETTLED = 'xact < pg_snapshot_xmin(pg_current_snapshot())::text::bigint'
    _PRUNE_LOCK = "SELECT pg_advisory_xact_lock(hashtext('iss-events-prune'))"
    # NOTE: a deadlock between two groups of rows, which PostgreSQL breaks by aborting one, is tried again.
    _ATTEMPTS = 3

    def __init__(self, url: str, *, timeout: float = 5.0, pool_size: int = 4, prepared: bool = True) -> None:
        import psycopg  # NOTE: only a PostgreSQL index needs it

        self._psycopg = psycopg
        self._url = url
        self.timeout = timeout
        self._pool_size = pool_size
        # NOTE: added to the URL's own options (a search_path, say), not in their place. The server's
        # own statement_timeout as well: it ends a statement a live server runs too long, and frees its locks.
        given = psycopg.conninfo.conninfo_to_dict(url).get('options', '')
        self._options: dict[str, Any] = {  # NOTE: psycopg.connect()'s keywords
            'autocommit': True,
            # NOTE: counted by psycopg itself (whole seconds, 2 at least).
            'connect_timeout': max(2, int(timeout)),
            'options': f'{given} -c statement_timeout={int(timeout * 1000)}'.strip(),
        }
        if not prepared:
            self._options['prepare_threshold'] = None  # NOTE: behind PgBouncer in transaction mode
        self.path = _without_password(url)
        self._local = threading.local()
        self._hooks = _PoolHooks(psycopg, timeout)
        self._pool: Any = None
        self._pool_pid = 0
        self._pool_lock = threading.Lock()
        self._start_feed()

    def _held(self) -> Any:
        """The connection this thread's :meth:`session` holds, if any."""
        held = getattr(self._local, 'held', None)
        return held.db if held is not None and held.pid == os.getpid() else None

    def _in_transaction(self) -> bool:
        db = self._held()
        return (
            db is not None and not db.closed and db.info.transaction_status != self._psycopg.pq.TransactionStatus.IDLE
        )

    def _connections(self) -> Any:
        """This process's pool, opened at its first use."""
        if self._pool_pid != os.getpid():
            from psycopg_pool import ConnectionPool

            with self._pool_lock:
                if self._pool_pid != os.getpid():
                    if self._pool is not None:
                        # NOTE: the parent's: its connections' finalizers would end the parent's sessions.
                        _INHERITED.append(self._pool)
                    self._pool = ConnectionPool(
                        self._url,
                        kwargs=self._options,
                        min_size=1,
                        max_size=self._pool_size,
                        open=True,
                        configure=self._hooks.configure,
                        check=self._hooks.check,
                        timeout=self.timeout,
                        name=f'iss-index-{os.getpid()}',
                        # NOTE: a server down longer is tried again by the next call, at once, instead of
                        # after a backoff that grows to minutes (which would outlast the server's return).
                        reconnect_timeout=self.timeout,
                    )
                    self._hooks.pool = self._pool
                    self._pool_pid = os.getpid()
                    # NOTE: its threads keep it alive: closed with the index (the tests make hundreds).
                    weakref.finalize(self, _close_pool, self._pool, os.getpid())
        return self._pool

    @contextlib.contextmanager
    def session(self) -> Iterator[Any]:
        """One connection for the calls inside the block (a rebuild's transactions, its temp table)."""
        db = self._held()
        if db is not None:
            yield db
            return
        pool = self._connections()
        try:
            # NOTE: the wait is the request's too (a transaction's connection is taken outside its calls).
            with engines.INDEX.budget.spending():
                db = pool.getconn(timeout=engines.INDEX.budget.within(self.timeout))
        except self._psycopg.Error as exc:  # NOTE: the pool's timeout too (PoolTimeout)
            raise self._unavailable(exc) from exc
        self._local.held = _Connection(db, 0, os.getpid())
        try:
            yield db
        finally:
            self._local.held = None
            pool.putconn(db)  # NOTE: one broken or left in a transaction is closed or rolled back

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """The statements inside the block in one transaction (joined to this thread's, if one is open)."""
        with self.session():
            if self._in_transaction():
                yield
                return
            # NOTE: BEGIN and COMMIT as statements of their own, each with its deadline (a
            # rebuild's batch reads the bucket between its statements, which no deadline covers).
            self._run('BEGIN')
            try:
                yield
            except BaseException:
                with contextlib.suppress(IndexUnavailable):
                    self._run('ROLLBACK')
                raise
            self._run('COMMIT')

    @contextlib.contextmanager
    def _call(self) -> Iterator[Any]:
        """A connection for one call, guarded: a place in the bulkhead, and one deadline for the wait and the call."""
        started = time.monotonic()
        with engines.INDEX.call(), self.session() as db:
            call = None
            try:
                left = engines.INDEX.budget.within(self.timeout - (time.monotonic() - started))
                with engines.WATCHDOG.deadline(db.fileno(), left) as call:
                    yield db
            except self._psycopg.Error as exc:
                raise self._unavailable(exc, late=call is not None and call.expired) from exc

    def _execute(self, sql: str, params: Iterable[Any]) -> tuple[list[tuple], int]:
        with self._call() as db:
            cursor = db.execute(sql.replace('?', '%s'), tuple(params))
            return (cursor.fetchall() if cursor.description else []), cursor.rowcount

    def _execute_many(self, sql: str, rows: list[tuple]) -> None:
        for attempt in range(self._ATTEMPTS):
            try:
                with self.transaction(), self._call() as db, db.cursor() as cursor:
                    cursor.executemany(sql.replace('?', '%s'), rows)
                return
            except IndexUnavailable as exc:
                deadlock = isinstance(exc.__cause__, self._psycopg.errors.DeadlockDetected)
                if not deadlock or attempt == self._ATTEMPTS - 1:
                    raise

    # -- a rebuild's bookkeeping, in a table of the index -------------------------------------
    # NOTE: not a temporary table: behind PgBouncer in transaction mode each statement may run on
    # another server connection, which has none of this one's. Each run has rows of its own.

    #: Seconds after which a run's rows are surely a killed rebuild's, and cleared by the next one.
    _REBUILD_RUNS_KEPT = 86400

    def start_rebuild(self) -> None:
        # NOTE: a run is named by its start, so older ones compare smaller.
        self._local.run = f'{time.time():015.3f}-{os.urandom(4).hex()}'
        self._run('DELETE FROM rebuild_seen WHERE run < ?', (f'{time.time() - self._REBUILD_RUNS_KEPT:015.3f}',))

    def saw(self, hex_digest: str) -> None:
        self._run('INSERT INTO rebuild_seen VALUES (?, ?) ON CONFLICT DO NOTHING', (self._local.run, hex_digest))

    def unseen(self) -> list[str]:
        """Rows the rebuild did not see: candidates for removal. The run's bookkeeping is cleared."""
        run = self._local.run
        rows = self._run('SELECT hex FROM blobs WHERE hex NOT IN (SELECT hex FROM rebuild_seen WHERE run = ?)', (run,))
        self._run('DELETE FROM rebuild_seen WHERE run = ?', (run,))
        return [hex_digest for (hex_digest,) in rows]

    def _unavailable(self, exc: Exception, *, late: bool = False) -> IndexUnavailable | IndexFull:
        if late:
            return IndexUnavailable(
                f"{self.path}: no answer within {self.timeout:g} s (ISS_INDEX_TIMEOUT) or the request's budget"
            )
        full = isinstance(exc, self._psycopg.errors.DiskFull)
        return (IndexFull if full else IndexUnavailable)(f'{self.path}: {exc}')


class _PoolHooks:
    """What a :class:`PostgresIndex`'s pool calls on its connections, kept apart from the index
    (which the pool's threads would otherwise keep alive).
    """

    def __init__(self, psycopg: Any, timeout: float) -> None:
        self._psycopg = psycopg
        self._timeout = timeout
        self._schema_ready = False
        self.pool: Any = None

    def configure(self, db: Any) -> None:
        """A new connection: the schema, created by the first one (see below)."""
        if self._schema_ready:
            return
        # NOTE: several nodes and workers start at once; CREATE ... IF NOT EXISTS
        # races in PostgreSQL, so one at a time creates the schema. And only when it changed:
        # its DDL (CREATE OR REPLACE TRIGGER, CREATE INDEX) locks the tables a running node
        # writes, in another order than a DELETE's triggers do (a deadlock, found by test_reconcile).
        with engines.WATCHDOG.deadline(db.fileno(), self._timeout), db.transaction():
            db.execute("SELECT pg_advisory_xact_lock(hashtext('iss-index-schema'))")
            if db.execute("SELECT to_regclass('state') IS NOT NULL").fetchone()[0]:
                row = db.execute("SELECT value FROM state WHERE key = 'schema'").fetchone()
                if row is not None and row[0] == _POSTGRES_SCHEMA_HASH:
                    self._schema_ready = True
                    return
            db.execute(_POSTGRES_SCHEMA)
            db.execute(
                "INSERT INTO state VALUES ('schema', %s) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (_POSTGRES_SCHEMA_HASH,),
            )
        self._schema_ready = True

    def check(self, db: Any) -> None:
        """Refuse a pooled connection whose server went away while it sat idle.

        PERF: no round trip. An idle connection has nothing to read; one that has is closed
        by the server (end of file, or the FATAL a server shutting down sends first).
        """
        readable = select.poll()
        readable.register(db.fileno(), select.POLLIN)
        if readable.poll(0):
            db.close()
            # NOTE: a restart ended them all: the pool's others are replaced at once, rather than
            # each found out by a call of its own (the pool waits a growing second after each).
            self.pool.drain()
            raise self._psycopg.OperationalError('the server closed the connection while it was idle')


def _close_pool(pool: Any, pid: int) -> None:
    """Close an index's pool, in the process that opened it (never a forked child's copy).

    NOTE: in a thread of its own: the collector may run this in any thread, one of the pool's too,
    which the pool would wait for to end.
    """
    if os.getpid() == pid:
        threading.Thread(target=pool.close, kwargs={'timeout': 5}, name='iss-index-close', daemon=True).start()


#: What a store is given as its index.
Index = SQLiteIndex | PostgresIndex


def open_index(
    location: str, data_dir: str, *, timeout: float = 5.0, pool_size: int = 4, prepared: bool = True
) -> Index:
    """The index ``ISS_INDEX`` names: ``sqlite`` (``index.sqlite3`` in the data directory) or a PostgreSQL URL.

    The keywords are a PostgreSQL index's (``ISS_INDEX_TIMEOUT``, ``ISS_INDEX_POOL_SIZE``, ``ISS_INDEX_PREPARED``).
    """
    if location == 'sqlite':
        return SQLiteIndex(os.path.join(data_dir, 'index.sqlite3'))
    return PostgresIndex(location, timeout=timeout, pool_size=pool_size, prepared=prepared)


def _without_password(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(':' + parts.password + '@', ':***@')
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def _schema_statements() -> list[str]:
    """The statements of ``_SCHEMA``, one by one (a trigger's body holds semicolons of its own)."""
    statements, current = [], ''
    for line in _SCHEMA.splitlines(keepends=True):
        current += line
        if sqlite3.complete_statement(current):
            statements.append(current.strip())
            current = ''
    # NOTE: the near-duplicate index (similar.py), kept by triggers from the items' phash.
    return statements + similar.schema('sqlite') + similar.sync_triggers('sqlite')


def _is_corrupt(exc: BaseException) -> bool:
    """Whether SQLite says its file is no database, or a damaged one."""
    code = getattr(exc, 'sqlite_errorcode', None)
    return code is not None and code & 0xFF in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)


def _unavailable(path: str, exc: sqlite3.Error | OSError) -> IndexUnavailable | IndexFull:
    full = getattr(exc, 'sqlite_errorcode', None) == sqlite3.SQLITE_FULL
    return (IndexFull if full else IndexUnavailable)(f'{path}: {exc}')


def _encode_cursor(created_at: float, hex_digest: str) -> str:
    raw = json.dumps([created_at, hex_digest], separators=(',', ':')).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip('=')


def _decode_cursor(cursor: str) -> tuple[float, str]:
    try:
        created_at, hex_digest = json.loads(base64.urlsafe_b64decode(cursor + '=' * (-len(cursor) % 4)))
        if isinstance(created_at, (int, float)) and isinstance(hex_digest, str) and len(hex_digest) == 64:
            return float(created_at), hex_digest
    except (ValueError, TypeError):
        pass
    raise InvalidCursor(f'{cursor[:80]!r} is not a cursor from a previous page')
