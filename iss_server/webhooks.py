"""Webhooks: each change of the feed POSTed to the endpoints ``ISS_WEBHOOKS`` names.

Each change goes out as a CloudEvents 1.0 structured JSON event (``io.iss.blob.created``,
``…updated``, ``…deleted``; ``id`` the feed's cursor, ``subject`` the blob's id, ``data`` its
listing item), signed per Standard Webhooks (``webhook-id``, ``webhook-timestamp``,
``webhook-signature``). The index keeps each endpoint's cursor, failures and lease: the
node that holds an endpoint's lease delivers it, in feed order, one change at a time; a
failure backs off exponentially and the endpoint pauses after :attr:`Deliverer.PAUSE_AFTER`
failures in a row, until an admin resumes it. Delivery is at least once: a receiver drops
a ``webhook-id`` it has seen (a node that lost its lease mid-POST may send one again).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import time
import urllib.error
import urllib.request

import falcon
from cloudevents.core.bindings.http import to_structured_event
from cloudevents.core.v1.event import CloudEvent
from standardwebhooks import Webhook

from iss_server import index
from iss_server.auth import carries_one_of, token_required
from iss_server.background import Background
from iss_server.config import WebhookEndpoint
from iss_server.errors import CursorExpired, ServiceError
from iss_server.params import single

log = logging.getLogger(__name__)


class DeliveryFailed(Exception):
    """The endpoint did not take the event (no answer, or not 2xx)."""


class Deliverer(Background):
    """One process's deliverer: a thread that serves the endpoints whose lease it holds."""

    thread_name = 'iss-webhooks'

    #: Seconds a lease lasts; renewed at every round, so a node that stops loses it this fast.
    LEASE_SECONDS = 30.0
    #: Seconds an endpoint may take to answer (well under the lease).
    TIMEOUT_SECONDS = 10.0
    #: Seconds between rounds when there is nothing to send.
    IDLE_SECONDS = 0.2
    #: Failures in a row after which an endpoint pauses.
    PAUSE_AFTER = 20
    #: Backoff after the n-th failure in a row: BACKOFF_SECONDS * 2 ** (n - 1), at most MAX_BACKOFF_SECONDS.
    BACKOFF_SECONDS = 1.0
    MAX_BACKOFF_SECONDS = 600.0
    BATCH = 50

    def __init__(self, store_index: index.Index, endpoints: tuple[WebhookEndpoint, ...]) -> None:
        self._index = store_index
        self._endpoints = endpoints
        super().__init__()

    def start(self) -> None:
        """Have every endpoint follow the feed (from now, for one new to the index), and start sending."""
        for endpoint in self._endpoints:
            self._index.add_webhook(endpoint.name)
        super().start()

    def _run(self) -> None:
        while not self._stop.is_set():
            busy = False
            for endpoint in self._endpoints:
                try:
                    busy |= self.serve(endpoint)
                except ServiceError as exc:  # NOTE: the index is down: the next round tries again
                    log.warning('webhook %s: %s', endpoint.name, exc)
                except Exception:  # NOTE: a bug must not end the deliveries of this process for good
                    log.exception('webhook %s: unexpected error', endpoint.name)
                    self._stop.wait(self.IDLE_SECONDS)
            if not busy:
                self._stop.wait(self.IDLE_SECONDS)

    def serve(self, endpoint: WebhookEndpoint) -> bool:
        """Send the endpoint's next changes if this node holds its lease; return whether any went out."""
        now = time.time()
        state = self._index.lease_webhook(endpoint.name, self._holder, now + self.LEASE_SECONDS, now)
        if state is None or state.paused or state.next_at > now:
            return False
        try:
            page = self._index.events(state.cursor, self.BATCH)
        except CursorExpired as exc:
            self._record(state.failed(str(exc), now, pause=True))
            return False
        for event in page.events:
            try:
                self._post(endpoint, event)
            except DeliveryFailed as exc:
                failures = state.failures + 1
                backoff = min(self.MAX_BACKOFF_SECONDS, self.BACKOFF_SECONDS * 2 ** (failures - 1))
                log.warning('webhook %s: %s (failure %d)', endpoint.name, exc, failures)
                self._record(state.failed(str(exc), now + backoff, pause=failures >= self.PAUSE_AFTER))
                return False
            state = state.delivered(event.cursor)
            if not self._record(state):
                return False  # NOTE: the lease went to another node, which goes on from the cursor it reads
        return bool(page.events)

    def _record(self, state: index.WebhookState) -> bool:
        """Keep the endpoint's state and renew the lease (a batch may outlast one), if it is still ours."""
        return self._index.record_webhook(state, self._holder, time.time() + self.LEASE_SECONDS)

    def _post(self, endpoint: WebhookEndpoint, event: index.Event) -> None:
        message = to_structured_event(cloud_event(event))
        body = message.body.decode() if isinstance(message.body, bytes) else message.body
        sent_at = datetime.datetime.now(datetime.UTC)
        headers = {
            **message.headers,
            'webhook-id': event.cursor,
            'webhook-timestamp': str(int(sent_at.timestamp())),
            'webhook-signature': Webhook(endpoint.secret).sign(event.cursor, sent_at, body),
            'User-Agent': 'iss-webhooks',
        }
        request = urllib.request.Request(endpoint.url, body.encode(), headers, method='POST')
        try:
            with _OPENER.open(request, timeout=self.TIMEOUT_SECONDS) as response:
                response.read(1024)
        except urllib.error.HTTPError as exc:
            raise DeliveryFailed(f'{endpoint.url} answered {exc.code}') from None
        except (OSError, ValueError) as exc:
            raise DeliveryFailed(f'{endpoint.url}: {exc}') from None


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect is a failure: urllib would follow a 302 with a GET, taken for a delivery."""

    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None


_OPENER = urllib.request.build_opener(_NoRedirects)


def cloud_event(event: index.Event) -> CloudEvent:
    """A change of the feed as a CloudEvents 1.0 event."""
    item = json.loads(event.item)
    return CloudEvent(
        attributes={
            'id': event.cursor,
            'source': '/events',
            'type': f'io.iss.blob.{event.type}',
            'subject': item['id'],
            'time': datetime.datetime.fromtimestamp(event.time, datetime.UTC),
            'datacontenttype': 'application/json',
        },
        data=item,
    )


class Webhooks:
    """``GET /webhooks``: each endpoint's delivery state (admin token); ``POST /webhooks/{name}/resume``."""

    def __init__(self, store_index: index.Index, endpoints: tuple[WebhookEndpoint, ...], admin_token: str) -> None:
        self._index = store_index
        self._endpoints = {endpoint.name: endpoint for endpoint in endpoints}
        self._admin = (admin_token.encode(),) if admin_token else ()

    def _check(self, req: falcon.Request) -> None:
        if not self._admin:
            raise falcon.HTTPForbidden(title='Webhooks admin is off', description='It needs ISS_ADMIN_TOKEN set.')
        if not carries_one_of(req, self._admin):
            raise token_required('The webhooks state needs "Authorization: Bearer <ISS_ADMIN_TOKEN>".', req)

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        """Answer each endpoint's cursor, deliveries, failures, next attempt and whether it is paused."""
        self._check(req)
        states = {state.name: state for state in self._index.webhook_states()}
        resp.cache_control = ['no-store']
        resp.media = {
            'webhooks': [
                {'name': name, 'url': endpoint.url, **dataclasses.asdict(states[name])}
                if name in states
                else {'name': name, 'url': endpoint.url, 'cursor': None}
                for name, endpoint in self._endpoints.items()
            ]
        }

    def on_post_resume(self, req: falcon.Request, resp: falcon.Response, name: str) -> None:
        """Resume a paused endpoint (``?from=now``: skipping what it missed, after a 410)."""
        self._check(req)
        if name not in self._endpoints:
            raise falcon.HTTPNotFound(title='No such webhook', description=f'ISS_WEBHOOKS names no {name!r}.')
        cursor = self._index.events('now', 1).next_cursor if single(req, 'from') == 'now' else None
        self._index.resume_webhook(name, cursor)
        resp.status = falcon.HTTP_NO_CONTENT
