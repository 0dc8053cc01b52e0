"""``GET /events``: the store's change feed, for pipelines that react to uploads and deletions.

The index records every change of a blob's row (``created``, ``updated``, ``deleted``) in
the transaction of the change itself (see :meth:`index.Index.events`); this resource hands
them out in commit order after a cursor, as a JSON page (long-polled with ``wait``) or as
Server-Sent Events. A follower that keeps its cursor misses none and sees none twice.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator

import falcon

from iss_server import index
from iss_server.errors import ServiceError

log = logging.getLogger(__name__)


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

    def __init__(self, store_index: index.Index, retain_seconds: int) -> None:
        self._index = store_index
        store_index.events_retain = retain_seconds

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        """Answer the changes after ``after`` (a page, or a stream)."""
        after = req.get_param('after') or None
        resp.cache_control = ['no-store']
        if 'text/event-stream' in (req.accept or ''):
            after = req.get_header('Last-Event-ID') or after
            page = self._index.events(after, 0)  # NOTE: a bad or expired cursor answers 400 or 410, not a stream
            resp.content_type = 'text/event-stream'
            resp.set_header('X-Accel-Buffering', 'no')  # NOTE: nginx passes each event on at once
            resp.stream = self._stream(page.next_cursor)
            return
        limit = req.get_param_as_int('limit', min_value=1, max_value=self.MAX_LIMIT, default=self.DEFAULT_LIMIT)
        wait = req.get_param_as_int('wait', min_value=0, max_value=self.MAX_WAIT, default=0)
        page = self._index.wait_for_events(after, limit, wait)
        resp.media = {'events': [event_document(event) for event in page.events], 'next': page.next_cursor}

    def _stream(self, cursor: str) -> Iterator[bytes]:
        yield f'retry: {self.RETRY_MS}\n\n'.encode()
        deadline = time.monotonic() + self.STREAM_SECONDS
        while (left := deadline - time.monotonic()) > 0:
            try:
                page = self._index.wait_for_events(cursor, self.DEFAULT_LIMIT, min(self.KEEPALIVE_SECONDS, left))
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
