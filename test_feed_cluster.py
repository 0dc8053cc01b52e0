"""Issue 26's proofs with real processes: the change feed under a cluster's writers, webhooks across outages.

- Two gunicorn nodes on one bucket and one PostgreSQL index, eight writers uploading and
  deleting through both, and followers (long-poll pages and Server-Sent Events, alternating
  nodes): each acknowledged change is seen exactly once, in order per blob, and nothing else.
- A webhook receiver that is down while uploads land gets every change once it is back,
  in feed order, each signed.
- A node SIGKILLed mid-way through delivering a backlog and started again on its data
  directory loses none: at most the one change in flight is sent again, byte for byte.
"""

from __future__ import annotations

import base64
import collections
import concurrent.futures
import dataclasses
import hashlib
import http.client
import http.server
import json
import os
import threading
import time

import pytest
from standardwebhooks import Webhook

from iss_testing.servers import Gunicorn, free_port, wait_for

# NOTE: not in the fast subset (pytest -m "not slow"): several gunicorn nodes, SeaweedFS, PostgreSQL, kills.
pytestmark = pytest.mark.slow

ADMIN = {'Authorization': 'Bearer admin'}
SECRET = 'whsec_' + base64.b64encode(b'issue 26: a secret of 32 bytes!!').decode()


def request(port: int, method: str, path: str, body: bytes | None = None, headers=None, timeout: float = 60):
    """One request on a connection of its own: (status, headers, body)."""
    conn = http.client.HTTPConnection('127.0.0.1', port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.msg, response.read()
    finally:
        conn.close()


def upload(port: int, data: bytes, kind: str = 'frame') -> tuple[int, str]:
    status, _, body = request(
        port, 'POST', f'/artifacts?kind={kind}', data, {'Content-Type': 'application/octet-stream'}
    )
    return status, json.loads(body).get('artifact_id', '') if status < 300 else ''


def blob_id(data: bytes) -> str:
    return 'sha256:' + hashlib.sha256(data).hexdigest()


# -- two nodes, eight writers, followers ------------------------------------------------------------


@dataclasses.dataclass
class History:
    """What the writers were told: uploads and deletes acknowledged, and requests whose answer was lost."""

    uploaded: set[str] = dataclasses.field(default_factory=set)
    deleted: set[str] = dataclasses.field(default_factory=set)
    lost_uploads: set[str] = dataclasses.field(default_factory=set)
    lost_deletes: set[str] = dataclasses.field(default_factory=set)
    refused: list[tuple[str, int]] = dataclasses.field(default_factory=list)
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)


def write_for(seconds: float, ports: list[int], writer: int, history: History) -> None:
    """Upload distinct artifacts through the nodes in turn; delete one of this writer's own every third upload."""
    own: list[str] = []
    deadline = time.monotonic() + seconds
    number = 0
    while time.monotonic() < deadline:
        port = ports[number % len(ports)]
        data = f'writer {writer} artifact {number} '.encode() + os.urandom(512)
        digest = blob_id(data)
        try:
            status, answered = upload(port, data, kind=f'w{writer}')
        except OSError:
            with history.lock:
                history.lost_uploads.add(digest)
        else:
            with history.lock:
                if status == 201 and answered == digest:
                    history.uploaded.add(digest)
                    own.append(digest)
                else:
                    history.refused.append((f'upload {digest}', status))
        if number % 3 == 2 and own:
            victim = own.pop(len(own) // 2)
            try:
                status = request(ports[(number + 1) % len(ports)], 'DELETE', f'/artifacts/{victim}', headers=ADMIN)[0]
            except OSError:
                with history.lock:
                    history.lost_deletes.add(victim)
            else:
                with history.lock:
                    if status == 204:
                        history.deleted.add(victim)
                    else:
                        history.refused.append((f'delete {victim}', status))
        number += 1


def poll_follower(ports: list[int], cursor: str, writers_done: threading.Event, expected, seen: list[dict]) -> None:
    """Follow ``GET /events?after=&wait=`` page by page, each page from the next node, until caught up.

    Caught up: the writers have stopped, every acknowledged change is seen, and a long-poll answers none.
    """
    deadline = time.monotonic() + 120
    page_number = 0
    while time.monotonic() < deadline:
        port = ports[page_number % len(ports)]
        page_number += 1
        status, headers, body = request(port, 'GET', f'/events?after={cursor}&wait=2&limit=37')
        assert status == 200, body
        page = json.loads(body)
        seen.extend(page['events'])
        if page['events']:
            assert page['next'] == page['events'][-1]['cursor']
        else:
            assert page['next'] == cursor  # NOTE: no change: the follower keeps its place
            if writers_done.is_set() and expected() <= {(event['type'], event['item']['id']) for event in seen}:
                return
            if headers.get('Retry-After'):
                time.sleep(float(headers['Retry-After']))
        cursor = page['next']
    missed = expected() - {(event['type'], event['item']['id']) for event in seen}
    raise AssertionError(f'in 120 s the follower never saw {len(missed)} acknowledged changes: {sorted(missed)[:3]}')


def stream_follower(ports: list[int], cursor: str, stop: threading.Event, seen: list[dict], reconnects: list[int]):
    """Follow the feed as Server-Sent Events, reconnecting with Last-Event-ID to the other node every 50 events."""
    connection = 0
    while not stop.is_set():
        port = ports[connection % len(ports)]
        connection += 1
        conn = http.client.HTTPConnection('127.0.0.1', port, timeout=2)
        try:
            conn.request('GET', '/events', headers={'Accept': 'text/event-stream', 'Last-Event-ID': cursor})
            response = conn.getresponse()
            if response.status == 503:  # NOTE: the bulkhead: each node has a few places for waiters
                time.sleep(float(response.getheader('Retry-After') or 1))
                continue
            assert response.status == 200, response.read()
            fields: dict[str, str] = {}
            taken = 0
            while taken < 50 and not stop.is_set():
                line = response.readline().decode()
                assert line, 'the stream ended early'
                line = line.rstrip('\n')
                if line:
                    name, _, value = line.partition(': ')
                    fields[name] = value
                    continue
                if 'data' in fields:  # NOTE: a blank line ends an event; 'retry' and comments carry none
                    event = json.loads(fields['data'])
                    assert fields['id'] == event['cursor'] and fields['event'] == event['type']
                    seen.append(event)
                    cursor = event['cursor']
                    taken += 1
                fields = {}
        except TimeoutError:
            pass  # NOTE: nothing for 2 s: reconnect (after the writers, until stopped)
        finally:
            conn.close()
        reconnects.append(port)


def check_history(history: History, events: list[dict]) -> None:
    """Each acknowledged upload's ``created`` once, each acknowledged delete's ``deleted`` once after it; no more."""
    cursors = [event['cursor'] for event in events]
    assert len(cursors) == len(set(cursors)), 'an event was seen twice'
    per_blob: dict[str, list[str]] = collections.defaultdict(list)
    for event in events:
        per_blob[event['item']['id']].append(event['type'])
    for digest in history.uploaded:
        want = ['created', 'deleted'] if digest in history.deleted else ['created']
        if digest in history.lost_deletes:
            assert per_blob[digest] in (['created'], ['created', 'deleted']), digest
        else:
            assert per_blob[digest] == want, digest
    unacknowledged = set(per_blob) - history.uploaded - history.lost_uploads
    assert not unacknowledged, f'events of blobs no writer was told were stored: {sorted(unacknowledged)[:5]}'
    for digest in history.lost_uploads & set(per_blob):
        assert per_blob[digest] == ['created'], digest  # NOTE: no writer deletes what it was not told it has


def test_two_nodes_eight_writers_each_acknowledged_change_is_followed_once(s3_settings, tmp_path):
    env = {**s3_settings, 'ISS_ADMIN_TOKEN': 'admin', 'ISS_WORKERS': '2'}
    nodes = [Gunicorn(tmp_path / name, tmp_path / f'{name}.log', **env) for name in ('a', 'b')]
    try:
        ports = [node.port for node in nodes]
        start = json.loads(request(ports[0], 'GET', '/events?after=now')[2])['next']
        history = History()
        writers_done, stream_stop = threading.Event(), threading.Event()
        polled: list[dict] = []
        streamed: list[dict] = []
        reconnects: list[int] = []

        def expected() -> set[tuple[str, str]]:
            with history.lock:
                return {('created', digest) for digest in history.uploaded} | {
                    ('deleted', digest) for digest in history.deleted
                }

        with concurrent.futures.ThreadPoolExecutor(10) as pool:
            poller = pool.submit(poll_follower, ports, start, writers_done, expected, polled)
            streamer = pool.submit(stream_follower, ports[::-1], start, stream_stop, streamed, reconnects)
            try:
                writers = [pool.submit(write_for, 10, ports, number, history) for number in range(8)]
                for writer in writers:
                    writer.result()
                writers_done.set()
                poller.result()
                caught_up = lambda: streamer.done() or len(streamed) >= len(polled)  # noqa: E731
                wait_for(caught_up, seconds=30, message='the stream to catch up')
            finally:
                writers_done.set()  # NOTE: so that a failure ends the followers too, not the test's timeout
                stream_stop.set()
            streamer.result()
    finally:
        for node in nodes:
            # NOTE: killed, not stopped: a stream a follower left holds SIGTERM for gunicorn's graceful_timeout.
            node.kill()
            node.stop()

    assert not history.refused and not history.lost_uploads and not history.lost_deletes
    assert len(history.uploaded) >= 100 and len(history.deleted) >= 30, (len(history.uploaded), len(history.deleted))
    check_history(history, polled)
    # NOTE: the stream, resumed by Last-Event-ID on the other node each time, saw the same history in the same order.
    assert len(reconnects) >= 3
    assert [(event['cursor'], event['type'], event['item']['id']) for event in streamed] == [
        (event['cursor'], event['type'], event['item']['id']) for event in polled
    ]


# -- webhooks: a receiver down, then back; a node killed mid-delivery -------------------------------


class Receiver:
    """A webhook endpoint on a fixed loopback port: verifies each signature, keeps each delivery, may be slow.

    ``stop()`` and ``start()`` take it down and bring it back on the same port.
    """

    def __init__(self, delay: float = 0.0) -> None:
        self.port = free_port()
        self.delay = delay
        self.received: list[tuple[dict[str, str], bytes]] = []
        self.forged: list[str] = []
        self._server: http.server.ThreadingHTTPServer | None = None
        self.start()

    @property
    def url(self) -> str:
        return f'http://127.0.0.1:{self.port}/hook'

    def start(self) -> None:
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers['Content-Length'])
                body = self.rfile.read(length)
                if len(body) < length:
                    return  # NOTE: the sender was killed mid-request: nothing was delivered
                headers = {key.lower(): value for key, value in self.headers.items()}
                try:
                    Webhook(SECRET).verify(body, headers)
                except Exception as exc:  # NOTE: refused, so the deliverer would try again; the test fails on it
                    receiver.forged.append(f'{headers.get("webhook-id")}: {exc}')
                    self.send_response(400)
                else:
                    receiver.received.append((headers, body))  # NOTE: on arrival: a kill mid-sleep leaves it here
                    time.sleep(receiver.delay)
                    self.send_response(204)
                self.send_header('Content-Length', '0')
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address) -> None:
                pass  # NOTE: a deliverer killed mid-request leaves a broken pipe; nothing to report

        self._server = Server(('127.0.0.1', self.port), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def ids(self) -> list[str]:
        return [headers['webhook-id'] for headers, _ in self.received]


@pytest.fixture
def receiver():
    made: list[Receiver] = []

    def make(delay: float = 0.0) -> Receiver:
        made.append(Receiver(delay))
        return made[-1]

    yield make
    for one in made:
        one.stop()


def feed(port: int) -> list[dict]:
    """The whole feed, as one node answers it."""
    return json.loads(request(port, 'GET', '/events?limit=1000')[2])['events']


def webhook_state(port: int) -> dict:
    return json.loads(request(port, 'GET', '/webhooks', headers=ADMIN)[2])['webhooks'][0]


def test_a_receiver_down_while_uploads_land_gets_every_change_in_order_once_back(start, receiver):
    hook = receiver()
    server = start(ISS_WEBHOOKS=f'infer={hook.url} {SECRET}', ISS_ADMIN_TOKEN='admin', ISS_WORKERS='2')
    assert upload(server.port, b'before the outage')[0] == 201
    wait_for(lambda: len(hook.received) == 1, message='the first delivery')

    hook.stop()
    digests = []
    for number in range(20):
        status, digest = upload(server.port, f'during the outage {number}'.encode())
        assert status == 201
        digests.append(digest)
        if number % 4 == 3:
            assert request(server.port, 'DELETE', f'/artifacts/{digests[-2]}', headers=ADMIN)[0] == 204
    # NOTE: short: the 1st failure waits 1 s, the 2nd 2 s, the 3rd 4 s (webhooks.Deliverer.BACKOFF_SECONDS).
    wait_for(lambda: webhook_state(server.port)['failures'] >= 2, message='two failed deliveries')
    hook.start()
    events = feed(server.port)
    assert len(events) == 1 + 20 + 5
    wait_for(lambda: len(hook.received) >= len(events), seconds=30, message='every change delivered')
    time.sleep(1)  # NOTE: anything sent twice would come now

    assert hook.forged == []
    assert hook.ids() == [event['cursor'] for event in events]  # NOTE: each once, in feed order
    for (_, body), event in zip(hook.received, events, strict=True):
        cloud_event = json.loads(body)
        assert cloud_event['type'] == f'io.iss.blob.{event["type"]}'
        assert cloud_event['subject'] == cloud_event['data']['id'] == event['item']['id']
    state = webhook_state(server.port)
    assert state['failures'] == 0 and state['cursor'] == events[-1]['cursor'] and not state['paused']


def test_a_node_killed_mid_delivery_and_started_again_loses_no_change(start, receiver, tmp_path):
    hook = receiver(delay=0.25)
    env = {'ISS_WEBHOOKS': f'infer={hook.url} {SECRET}', 'ISS_ADMIN_TOKEN': 'admin', 'ISS_WORKERS': '2'}
    node = start(tmp_path / 'data', **env)
    for number in range(30):
        assert upload(node.port, f'backlog {number}'.encode())[0] == 201
    events = feed(node.port)
    assert len(events) == 30
    wait_for(lambda: len(hook.received) >= 10, seconds=30, message='a third of the backlog delivered')
    assert len(hook.received) < 25, 'the backlog was delivered before the kill'

    node.kill()  # NOTE: SIGKILL to gunicorn's process group: master and workers, mid-delivery
    time.sleep(0.5)  # NOTE: a request that had arrived is counted as delivered before the kill
    delivered_before = len(hook.received)
    node = start(tmp_path / 'data', **env)
    # NOTE: the dead holder's lease runs out first (webhooks.Deliverer.LEASE_SECONDS, 30 s).
    wait_for(lambda: set(hook.ids()) >= {event['cursor'] for event in events}, seconds=60, message='every change')
    time.sleep(1)

    assert hook.forged == []
    ids = hook.ids()
    assert list(dict.fromkeys(ids)) == [event['cursor'] for event in events]  # NOTE: no gap, first sends in order
    repeats = [webhook_id for webhook_id, count in collections.Counter(ids).items() if count > 1]
    # NOTE: one endpoint has one holder (its lease): only the change in flight at the kill may go out again.
    assert len(repeats) <= 1 and len(ids) <= len(events) + 1, (delivered_before, collections.Counter(ids))
    for webhook_id in repeats:
        bodies = {body for headers, body in hook.received if headers['webhook-id'] == webhook_id}
        assert len(bodies) == 1  # NOTE: the same CloudEvent: a receiver that drops a seen id drops it
        assert ids.index(webhook_id) == delivered_before - 1  # NOTE: the last one sent before the kill
    assert webhook_state(node.port)['cursor'] == events[-1]['cursor']
