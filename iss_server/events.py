"""``GET /events``: the store's change feed, for pipelines that react to uploads and deletions.

The index records every change of a blob's row (``created``, ``updated``, ``deleted``) in
the transaction of the change itself (see :meth:`index.Index.events`); this resource hands
them out in commit order after a cursor, as a JSON page (long-polled with ``wait``) or as
Server-Sent Events. A follower that keeps its cursor misses none and sees none twice.

Each waiting request holds one of gunicorn's threads, so at most a quarter of a worker's
threads (``ISS_THREADS // 4``, at least one) wait for changes, long-polls and streams
together: past that a long-poll answers at once, as with ``wait=0`` (with ``Retry-After: 1``
when it has nothing), and a stream is refused with 503 and ``Retry-After``. The other
threads keep answering everything else.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Generator, Iterator

import falcon

from iss_server import index
from iss_server.errors import FeedBusy, ServiceError
from iss_server.params import single, whole_number

log = logging.getLogger(__name__)

#: Set when this process is told to stop (SIGTERM, see iss_server/worker.py): streams end and
#: long-polls answer at once, so a graceful stop is not held for their 15 s to 5 min.
STOPPING = threading.Event()


class Events:
    """The change feed: ``?after=CURSOR&limit=N&wait=SECONDS``, or ``Accept: text/event-stream``."""

    DEFAULT_LIMIT = 100
    MAX_LIMIT = 1000
    #: Longest long-poll, in seconds.
    MAX_WAIT = 60
    #: NOTE: a stream holds one of gunicorn's threads: it ends after this many seconds and the
    #: client reconnects with Last-Event-ID (EventSource does so by itself), so none is held forever.
    STREAM_SECONDS = 300
    #: Seconds of silence after which a stream sends a comment, so proxies keep it open.
    KEEPALIVE_SECONDS = 15
    #: What a stream asks the client to wait before reconnecting, in milliseconds.
    RETRY_MS = 1000

    #: One waiting request (long-poll or stream) for this many of the worker's threads.
    THREADS_PER_WAITER = 4
    #: Seconds a long-poll turned away from waiting asks its follower to let pass before asking again.
    BUSY_RETRY_SECONDS = 1

    def __init__(self, store_index: index.Index, retain_seconds: int, threads: int) -> None:
        self._index = store_index
        store_index.events_retain = retain_seconds
        # NOTE: per process, as the threads are: the bulkhead that keeps waiters from taking them all.
        self._places = max(1, threads // self.THREADS_PER_WAITER)
        self._waiters = threading.BoundedSemaphore(self._places)

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        """Answer the changes after ``after`` (a page, or a stream)."""
        after = single(req, 'after') or None
        resp.cache_control = ['no-store']
        if 'text/event-stream' in (req.accept or ''):
            after = req.get_header('Last-Event-ID') or after
            page = self._index.events(after, 0)  # NOTE: a bad or expired cursor answers 400 or 410, not a stream
            if not self._waiters.acquire(blocking=False):
                raise FeedBusy(f'all {self._places} places for waiting requests are taken')
            resp.content_type = 'text/event-stream'
            resp.set_header('X-Accel-Buffering', 'no')  # NOTE: nginx passes each event on at once
            resp.stream = _Held(self._stream(page.next_cursor), self._waiters)
            return
        limit = whole_number(single(req, 'limit'), 'limit', minimum=1, maximum=self.MAX_LIMIT) or self.DEFAULT_LIMIT
        wait = whole_number(single(req, 'wait'), 'wait', minimum=0, maximum=self.MAX_WAIT) or 0
        waiting = wait > 0 and self._waiters.acquire(blocking=False)
        try:
            page = self._index.wait_for_events(after, limit, wait if waiting else 0, stop=STOPPING)
        finally:
            if waiting:
                self._waiters.release()
        if wait and not waiting and not page.events:
            resp.retry_after = self.BUSY_RETRY_SECONDS  # NOTE: the follower asks again, after a pause
        resp.media = {'events': [event_document(event) for event in page.events], 'next': page.next_cursor}

    def _stream(self, cursor: str) -> Generator[bytes, None, None]:
        yield f'retry: {self.RETRY_MS}\n\n'.encode()
        deadline = time.monotonic() + self.STREAM_SECONDS
        while (left := deadline - time.monotonic()) > 0 and not STOPPING.is_set():
            try:
                page = self._index.wait_for_events(
                    cursor, self.DEFAULT_LIMIT, min(self.KEEPALIVE_SECONDS, left), stop=STOPPING
                )
            except ServiceError as exc:
                # NOTE: the status is sent: the stream just ends, and the client resumes from its last id.
                log.warning('change feed stream ended: %s', exc)
                return
            if not page.events:
                yield b': keep-alive\n\n'
            for event in page.events:
                data = json.dumps(event_document(event), separators=(',', ':'))
                yield f'id: {event.cursor}\nevent: {event.type}\ndata: {data}\n\n'.encode()
            cursor = page.next_cursor


def event_document(event: index.Event) -> dict[str, object]:
    """An event as the feed answers it: ``cursor``, ``type``, ``time`` and the blob's listing ``item``."""
    return {'cursor': event.cursor, 'type': event.type, 'time': event.time, 'item': json.loads(event.item)}


class _Held:
    """A stream that holds its place in the bulkhead until the server closes it (sent, or the client gone)."""

    def __init__(self, chunks: Generator[bytes, None, None], place: threading.BoundedSemaphore) -> None:
        self._chunks = chunks
        self._place: threading.BoundedSemaphore | None = place

    def __iter__(self) -> Iterator[bytes]:
        return self._chunks

    def close(self) -> None:
        """End the stream and give its place back (once)."""
        self._chunks.close()
        place, self._place = self._place, None
        if place is not None:
            place.release()
