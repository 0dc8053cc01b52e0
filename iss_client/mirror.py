"""``iss-client mirror``: keep one ISS a copy of another, from the source's change feed.

The order that loses nothing: take the feed's latest cursor (``after=now``) first, then copy
what the source lists and the destination lacks (and delete what the destination has and
the source does not), then apply the feed from that cursor. A change made while the store is
listed is in the feed after the cursor, so it is applied then, if the listing missed it.

Each blob is downloaded (verified against its id as it arrives) and put by id, so the
destination re-hashes it and refuses bytes of another id; only what the destination says it
lacks (``POST /blobs/missing``) is sent. The cursor is kept in a state file, replaced
atomically after each page of the feed is applied, so a mirror stopped in any way (Ctrl-C,
SIGKILL, a crash) resumes where it was; applying a change twice does no harm.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
import hashlib
import http.server
import io
import json
import os
import pathlib
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from iss_client.library import Client, CursorExpired, ISSError

# NOTE: the keys ISS writes into a blob's meta itself (the server's meta.RESERVED_KEYS, with
# ``id`` and ``verified``): the rest of a listing item are the uploader's own, sent along.
ISS_KEYS = frozenset(
    {
        'id',
        'kind',
        'bytes',
        'mime',
        'width',
        'height',
        'format',
        'created_at',
        'image_id',
        'artifact_id',
        'filename',
        'verified',
        'oriented_width',
        'oriented_height',
        'mode',
        'bit_depth',
        'channels',
        'frames',
        'captured_at',
        'camera_make',
        'camera_model',
        'orientation',
        'phash',
        'thumbhash',
        'blurhash',
    }
)
#: Events asked for at once; the state is saved after each page.
PAGE = 500
# PERF: a blob up to this size is held in memory between download and upload.
_SPOOL_BYTES = 8 * 1024 * 1024
# PERF: blobs up to this size go to the destination in batches of this many (as push sends them).
_BATCH_BYTES = 256 * 1024
_BATCH = 100


def default_state(source: str, destination: str) -> pathlib.Path:
    """``~/.cache/iss-client/mirror/<hash of both URLs>.json`` (``$XDG_CACHE_HOME`` if set)."""
    cache = pathlib.Path(os.environ.get('XDG_CACHE_HOME') or pathlib.Path.home() / '.cache')
    name = hashlib.sha256(f'{source}\n{destination}'.encode()).hexdigest()[:16]
    return cache / 'iss-client' / 'mirror' / f'{name}.json'


def upload_fields(item: dict[str, Any]) -> dict[str, Any]:
    """What a listing item is put as: ``kind`` (None: an image), the uploader's ``meta`` and the ``filename``."""
    if item.get('kind') == 'image':
        return {'kind': None, 'meta': None, 'filename': item.get('filename')}
    own = {key: value for key, value in item.items() if key not in ISS_KEYS}
    # NOTE: a blob stored without meta (a crash before it was written) has no kind: "file", as push names it.
    return {'kind': item.get('kind') or 'file', 'meta': own or None, 'filename': item.get('filename')}


@dataclasses.dataclass
class Counters:
    """What a mirror has done, for its log lines and ``/metrics``."""

    events: int = 0
    copied: int = 0
    bytes_copied: int = 0
    deleted: int = 0
    lag: float = 0.0
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False)

    def prometheus(self) -> bytes:
        """The counters in Prometheus's text format."""
        with self.lock:
            lines = [
                '# HELP iss_client_mirror_lag_seconds Seconds between the last applied change and its application.',
                '# TYPE iss_client_mirror_lag_seconds gauge',
                f'iss_client_mirror_lag_seconds {self.lag:.3f}',
                '# HELP iss_client_mirror_events_total Changes of the source applied.',
                '# TYPE iss_client_mirror_events_total counter',
                f'iss_client_mirror_events_total {self.events}',
                '# HELP iss_client_mirror_blobs_copied_total Blobs sent to the destination.',
                '# TYPE iss_client_mirror_blobs_copied_total counter',
                f'iss_client_mirror_blobs_copied_total {self.copied}',
                '# HELP iss_client_mirror_bytes_copied_total Bytes sent to the destination.',
                '# TYPE iss_client_mirror_bytes_copied_total counter',
                f'iss_client_mirror_bytes_copied_total {self.bytes_copied}',
                '# HELP iss_client_mirror_blobs_deleted_total Blobs deleted on the destination.',
                '# TYPE iss_client_mirror_blobs_deleted_total counter',
                f'iss_client_mirror_blobs_deleted_total {self.deleted}',
            ]
        return ('\n'.join(lines) + '\n').encode()


def serve_metrics(counters: Counters, port: int, host: str = '127.0.0.1') -> http.server.ThreadingHTTPServer:
    """Serve ``GET /metrics`` of ``counters`` on ``host:port`` from a daemon thread."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.split('?')[0] != '/metrics':
                self.send_error(404)
                return
            body = counters.prometheus()
            self.send_response(200)
            self.send_header('Content-Type', 'text/plain; version=0.0.4')
            self.send_header('Content-Length', str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_: object) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer((host, port), Handler)
    threading.Thread(target=httpd.serve_forever, name='iss-client-metrics', daemon=True).start()
    return httpd


class State:
    """The mirror's cursor in its file: ``cursor`` (where the feed is applied up to) and ``listed`` (full pass done)."""

    def __init__(self, path: pathlib.Path) -> None:
        self.path = path
        self.cursor: str | None = None
        self.listed = False
        with contextlib.suppress(FileNotFoundError):
            saved = json.loads(path.read_text())
            self.cursor, self.listed = saved.get('cursor'), bool(saved.get('listed'))

    def save(self, cursor: str | None, listed: bool) -> None:
        """Replace the file atomically (a rename of a written and synced copy)."""
        self.cursor, self.listed = cursor, listed
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile('w', dir=self.path.parent, prefix='.mirror.', delete=False) as temp:
            json.dump({'cursor': cursor, 'listed': listed}, temp)
            temp.flush()
            os.fsync(temp.fileno())
        os.replace(temp.name, self.path)


class Mirror:
    """Keep ``destination`` a copy of ``source``; deletes go through ``deleter`` (with the admin token)."""

    def __init__(
        self,
        source: Client,
        destination: Client,
        deleter: Client,
        state: State,
        *,
        jobs: int = 8,
        log: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True),
    ) -> None:
        self._source = source
        self._destination = destination
        self._deleter = deleter
        self._state = state
        self._jobs = max(1, jobs)
        self._log = log
        self.counters = Counters()

    def run(self, follow: bool) -> None:
        """Bring the destination up to the source; with ``follow``, keep it there until interrupted."""
        if not self._state.listed:
            self.full_pass()
        while True:
            try:
                self._apply_feed(follow)
                return
            except CursorExpired as exc:
                self._log(f'mirror: the feed no longer serves the cursor ({exc.description}): listing anew')
                self._state.save(None, listed=False)
                self.full_pass()

    def full_pass(self) -> None:
        """Copy what the source lists and the destination lacks; delete what only the destination lists.

        NOTE: the cursor is taken first (or the one of a pass cut short is kept), so every
        change from the start of the listing on is applied from the feed afterwards.
        """
        cursor = self._state.cursor or self._source.events('now').next
        self._state.save(cursor, listed=False)
        started = time.monotonic()
        wanted = {item['id']: item for door in ('images', 'artifacts') for item in self._source.list(door)}
        present = {item['id'] for door in ('images', 'artifacts') for item in self._destination.list(door)}
        missing = self._destination.missing(list(wanted))
        self._copy([wanted[blob_id] for blob_id in missing])
        self._delete(sorted(present - wanted.keys()))
        self._state.save(cursor, listed=True)
        self._log(
            f'mirror: listed {len(wanted):,} blobs, copied {len(missing):,}, deleted {len(present - wanted.keys()):,}'
            f' in {time.monotonic() - started:.1f} s; following the feed'
        )

    def _apply_feed(self, follow: bool) -> None:
        for page in self._pages(follow):
            if page is None:
                return
            events, cursor = page
            self._apply(events)
            self._state.save(cursor, listed=True)

    def _pages(self, follow: bool) -> Iterator[tuple[list[dict[str, Any]], str] | None]:
        """The feed's pages after the saved cursor; ``None`` once caught up (when not following)."""
        if follow:
            for page in self._source.follow(self._state.cursor, limit=PAGE):
                if page.events:
                    yield page.events, page.next
                else:
                    with self.counters.lock:
                        self.counters.lag = 0.0
        while True:
            page = self._source.events(self._state.cursor, PAGE)
            if not page.events:
                with self.counters.lock:
                    self.counters.lag = 0.0
                yield None
                return
            yield page.events, page.next

    def _apply(self, events: list[dict[str, Any]]) -> None:
        """Apply a page: each blob's last change in it decides (copied if the destination lacks it, or deleted)."""
        last = {event['item']['id']: event for event in events}
        alive = [event['item'] for event in last.values() if event['type'] != 'deleted']
        gone = [blob_id for blob_id, event in last.items() if event['type'] == 'deleted']
        missing = set(self._destination.missing([item['id'] for item in alive]))
        # NOTE: an "updated" blob the destination has already is left as it is: ISS has no call
        # that changes a stored blob's meta, and an update is the server completing its own keys.
        self._copy([item for item in alive if item['id'] in missing])
        self._delete(gone)
        lag = time.time() - events[-1]['time']
        with self.counters.lock:
            self.counters.events += len(events)
            self.counters.lag = lag
        self._log(
            f'mirror: applied {len(events)} changes ({len(missing)} copied, {len(gone)} deleted), lag {lag:.2f} s'
        )

    def _copy(self, items: list[dict[str, Any]]) -> None:
        """Copy blobs: small ones of the same kind and meta in batches, every other one by itself."""
        batches: dict[str, list[dict[str, Any]]] = {}
        alone = []
        for item in items:
            # NOTE: a batch names every file (a form part without a name is "file"): one without goes alone
            if item.get('bytes', _BATCH_BYTES + 1) > _BATCH_BYTES or not item.get('filename'):
                alone.append(item)
                continue
            fields = upload_fields(item)
            batches.setdefault(json.dumps([fields['kind'], fields['meta']], sort_keys=True), []).append(item)
        work: list[Callable[[], None]] = [functools.partial(self._copy_one, item) for item in alone]
        for group in batches.values():
            work += [functools.partial(self._copy_batch, group[n : n + _BATCH]) for n in range(0, len(group), _BATCH)]
        self._each(lambda job: job(), work)

    def _copy_batch(self, items: list[dict[str, Any]]) -> None:
        """Download small blobs (each verified) and send them in one request (each id checked on the answer).

        PERF: one request and one group commit on the destination for up to 100 blobs; 2,000
        small blobs took 8.1 s one by one, 2.6 s so.
        """
        files = []
        for item in items:
            sink = io.BytesIO()
            try:
                self._source.get(item['id'], sink)
            except ISSError as exc:
                if exc.status == 404:
                    continue  # NOTE: deleted since: its "deleted" change follows in the feed
                raise
            files.append((sink.getvalue(), item.get('filename')))
        if not files:
            return
        fields = upload_fields(items[0])
        for outcome in self._destination.put_many(files, kind=fields['kind'], meta=fields['meta']):
            if isinstance(outcome, ISSError):
                raise outcome
        with self.counters.lock:
            self.counters.copied += len(files)
            self.counters.bytes_copied += sum(len(content) for content, _ in files)

    def _each(self, work: Callable[[Any], None], items: list[Any]) -> None:
        """Run ``work`` on every item, ``jobs`` at once; the first error (or Ctrl-C) cancels what has not started."""
        pool = concurrent.futures.ThreadPoolExecutor(self._jobs)
        try:
            for future in [pool.submit(work, item) for item in items]:
                future.result()
        finally:
            # NOTE: without cancel_futures, a Ctrl-C would wait for every queued copy
            pool.shutdown(cancel_futures=True)

    def _copy_one(self, item: dict[str, Any]) -> None:
        """Download a blob (verified) and put it by id (verified again by the destination)."""
        with tempfile.SpooledTemporaryFile(_SPOOL_BYTES) as spool:
            try:
                size = self._source.get(item['id'], spool)
            except ISSError as exc:
                if exc.status == 404:
                    return  # NOTE: deleted since: its "deleted" change follows in the feed
                raise
            spool.seek(0)
            self._destination.put(spool, digest=item['id'], **upload_fields(item))
        with self.counters.lock:
            self.counters.copied += 1
            self.counters.bytes_copied += size

    def _delete(self, blob_ids: list[str]) -> None:
        def delete(blob_id: str) -> None:
            try:
                self._deleter.delete(blob_id)
            except ISSError as exc:
                if exc.status != 404:
                    raise
            with self.counters.lock:
                self.counters.deleted += 1

        self._each(delete, blob_ids)
