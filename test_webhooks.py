"""Webhooks: each change of the feed POSTed as a signed CloudEvent, once, by one node, with backoff and pause."""

from __future__ import annotations

import base64
import http.server
import json
import threading
import time
import urllib.parse

import pytest
import webtest
from cloudevents.core.bindings.http import HTTPMessage, from_structured_event
from standardwebhooks import Webhook

import iss
from iss_server import index
from iss_server.config import ConfigError, Settings, WebhookEndpoint
from iss_server.webhooks import Deliverer
from iss_testing.servers import wait_for

SECRET = 'whsec_' + base64.b64encode(b'a secret of thirty-two bytes!!!!').decode()
ADMIN = {'Authorization': 'Bearer admin'}


class Receiver:
    """An HTTP endpoint that keeps what it is sent, and answers ``status``."""

    def __init__(self) -> None:
        self.status = 204
        self.received: list[tuple[dict[str, str], bytes]] = []
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers['Content-Length']))
                if receiver.status < 300:
                    receiver.received.append(({key.lower(): value for key, value in self.headers.items()}, body))
                self.send_response(receiver.status)
                if 300 <= receiver.status < 400:
                    self.send_header('Location', '/elsewhere')
                self.send_header('Content-Length', '0')
                self.end_headers()

            def do_GET(self) -> None:  # NOTE: where a followed redirect would land
                receiver.received.append(({'redirected': 'yes'}, b''))
                self.send_response(200)
                self.send_header('Content-Length', '0')
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        self.url = f'http://127.0.0.1:{self._server.server_port}/hook'

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def receiver():
    receiver = Receiver()
    yield receiver
    receiver.stop()


@pytest.fixture
def deliverers(monkeypatch):
    """Every deliverer a test starts, stopped at its end."""
    started: list[Deliverer] = []
    start = Deliverer.start

    def start_and_keep(self) -> None:
        started.append(self)
        start(self)

    monkeypatch.setattr(Deliverer, 'start', start_and_keep)
    yield started
    for deliverer in started:
        deliverer.stop()


def upload_artifact(client, data: bytes, **kwargs) -> str:
    query = urllib.parse.urlencode({'kind': 'frame', 'meta': json.dumps({'camera': 'rig-7'})})
    return client.post(f'/artifacts?{query}', upload_files=[('file', 'f.bin', data)], **kwargs).json['artifact_id']


def test_each_change_is_posted_as_a_signed_cloudevent(tmp_path, receiver, deliverers):
    settings = Settings(
        data_dir=str(tmp_path / 'data'),
        admin_token='admin',
        webhooks=(WebhookEndpoint('infer', receiver.url, SECRET),),
    )
    client = webtest.TestApp(iss.build_app(settings))
    first = upload_artifact(client, b'frame one')
    client.delete(f'/artifacts/{first}', headers=ADMIN)
    wait_for(lambda: len(receiver.received) == 2, message='two deliveries')

    events = []
    for headers, body in receiver.received:
        Webhook(SECRET).verify(body, headers)  # NOTE: raises unless signed with the secret, recently
        assert headers['content-type'].startswith('application/cloudevents+json')
        events.append(from_structured_event(HTTPMessage(headers={'content-type': headers['content-type']}, body=body)))
    assert [event.get_type() for event in events] == ['io.iss.blob.created', 'io.iss.blob.deleted']
    assert [event.get_subject() for event in events] == [first, first]
    assert events[0].get_data()['camera'] == 'rig-7'
    assert [headers['webhook-id'] for headers, _ in receiver.received] == [event.get_id() for event in events]
    feed = client.get('/events').json['events']
    assert [event.get_id() for event in events] == [event['cursor'] for event in feed]

    state = client.get('/webhooks', headers=ADMIN).json['webhooks']
    assert state == [
        {
            'name': 'infer',
            'url': receiver.url,
            'cursor': feed[-1]['cursor'],
            'sent': 2,
            'failures': 0,
            'next_at': 0,
            'paused': False,
            'last_error': None,
            'leased_by': state[0]['leased_by'],
            'lease_until': state[0]['lease_until'],
        }
    ]
    client.get('/webhooks', status=401)


def test_failures_back_off_then_pause_until_resumed(tmp_path, receiver, deliverers, monkeypatch):
    monkeypatch.setattr(Deliverer, 'BACKOFF_SECONDS', 0.05)
    monkeypatch.setattr(Deliverer, 'PAUSE_AFTER', 3)
    settings = Settings(
        data_dir=str(tmp_path / 'data'),
        admin_token='admin',
        api_token='uploader',  # NOTE: the resume is the admin's, though it is a POST
        webhooks=(WebhookEndpoint('infer', receiver.url, SECRET),),
    )
    client = webtest.TestApp(iss.build_app(settings))
    receiver.status = 503
    upload_artifact(client, b'frame one', headers={'Authorization': 'Bearer uploader'})

    def state() -> dict:
        return client.get('/webhooks', headers=ADMIN).json['webhooks'][0]

    wait_for(lambda: state()['paused'], message='the endpoint paused')
    paused = state()
    assert paused['failures'] == 3 and paused['sent'] == 0 and '503' in paused['last_error']
    time.sleep(0.5)
    assert state()['failures'] == 3  # NOTE: paused: no more attempts

    receiver.status = 204
    client.post('/webhooks/infer/resume', headers=ADMIN, status=204)
    wait_for(lambda: state()['sent'] == 1, message='delivered after resuming')
    assert len(receiver.received) == 1 and state()['failures'] == 0
    client.post('/webhooks/other/resume', headers=ADMIN, status=404)
    client.post('/webhooks/infer/resume', headers={'Authorization': 'Bearer uploader'}, status=401)


def test_a_redirect_is_a_failure_not_a_delivery(tmp_path, receiver):
    store_index = index.SQLiteIndex(str(tmp_path / 'index.sqlite3'))
    store_index.add_webhook('infer')
    receiver.status = 302
    store_index.put_missing([index.row_for('a' * 64, {'kind': 'frame'}, time.time(), 1)])
    assert not Deliverer(store_index, ()).serve(WebhookEndpoint('infer', receiver.url, SECRET))
    state = store_index.webhook_states()[0]
    assert state.failures == 1 and state.sent == 0 and '302' in state.last_error
    assert receiver.received == []


def test_backoff_doubles_up_to_its_cap(tmp_path, receiver):
    store_index = index.SQLiteIndex(str(tmp_path / 'index.sqlite3'))
    store_index.add_webhook('infer')
    deliverer = Deliverer(store_index, (WebhookEndpoint('infer', receiver.url, SECRET),))
    receiver.status = 500
    store_index.put_missing([index.row_for('a' * 64, {'kind': 'frame'}, time.time(), 1)])
    waits = []
    for _ in range(12):
        before = time.time()
        deliverer.serve(WebhookEndpoint('infer', receiver.url, SECRET))
        state = store_index.webhook_states()[0]
        waits.append(round(state.next_at - before))
        store_index._run('UPDATE webhooks SET next_at = 0')  # NOTE: as if the wait were over
    assert waits[:4] == [1, 2, 4, 8] and waits[-1] == 600


def test_one_node_holds_an_endpoint_and_each_change_goes_out_once(postgres, receiver):
    url = postgres.new_database()
    endpoint = WebhookEndpoint('infer', receiver.url, SECRET)
    nodes = [index.PostgresIndex(url), index.PostgresIndex(url)]
    nodes[0].add_webhook('infer')
    nodes[1].add_webhook('infer')  # NOTE: the second node's start keeps the first's cursor
    deliverers = [Deliverer(node, (endpoint,)) for node in nodes]
    for deliverer in deliverers:
        deliverer.start()
    try:
        writer = index.PostgresIndex(url)
        for number in range(40):
            writer.put_missing([index.row_for(f'{number:064x}', {'kind': 'frame'}, time.time(), number)])
        wait_for(lambda: len(receiver.received) >= 40, message='40 deliveries')
        time.sleep(0.5)
    finally:
        for deliverer in deliverers:
            deliverer.stop()
    ids = [headers['webhook-id'] for headers, _ in receiver.received]
    assert ids == [event.cursor for event in writer.events(None, 100).events]  # once each, in feed order


def test_a_lease_expires_and_another_node_takes_over(tmp_path):
    store_index = index.SQLiteIndex(str(tmp_path / 'index.sqlite3'))
    store_index.add_webhook('infer')
    assert store_index.lease_webhook('infer', 'a', 100.0, 10.0) is not None
    assert store_index.lease_webhook('infer', 'b', 200.0, 50.0) is None  # NOTE: a's lease runs until 100
    assert store_index.lease_webhook('infer', 'a', 130.0, 60.0).lease_until == 100.0  # NOTE: half its term left
    assert store_index.lease_webhook('infer', 'a', 130.0, 70.0).lease_until == 130.0  # renewed
    taken = store_index.lease_webhook('infer', 'b', 300.0, 140.0)
    assert taken is not None and taken.leased_by == 'b'
    assert not store_index.record_webhook(taken.delivered('x.1'), 'a', 400.0)  # NOTE: a lost it: refused
    assert store_index.record_webhook(taken.delivered('x.1'), 'b', 400.0)
    assert store_index.lease_webhook('infer', 'a', 500.0, 350.0) is None  # NOTE: b's write renewed its lease


@pytest.mark.parametrize(
    'raw',
    [
        'infer=ftp://h/x ' + SECRET,
        'infer=http://h/x secret',
        'Infer=http://h/x ' + SECRET,
        f'a=http://h {SECRET};a=http://i {SECRET}',
    ],
)
def test_webhooks_setting_refuses_what_it_cannot_use(raw):
    with pytest.raises(ConfigError, match='ISS_WEBHOOKS') as error:
        Settings.from_env({'ISS_WEBHOOKS': raw})
    assert SECRET not in str(error.value)


def test_webhooks_setting():
    settings = Settings.from_env({'ISS_WEBHOOKS': f' infer=https://h/x {SECRET} ; audit=http://a:9/y {SECRET}'})
    assert settings.webhooks == (
        WebhookEndpoint('infer', 'https://h/x', SECRET),
        WebhookEndpoint('audit', 'http://a:9/y', SECRET),
    )


def test_through_gunicorn_each_upload_goes_out_once_from_one_of_the_workers(start, receiver):
    server = start(ISS_WEBHOOKS=f'infer={receiver.url} {SECRET}', ISS_WORKERS='2')
    for number in range(5):
        body = (
            f'--b\r\nContent-Disposition: form-data; name="file"; filename="f.bin"\r\n\r\nframe {number}\r\n--b--\r\n'
        )
        status, _, _ = server.request(
            'POST', '/artifacts?kind=frame', body.encode(), {'Content-Type': 'multipart/form-data; boundary=b'}
        )
        assert status == 201
    wait_for(lambda: len(receiver.received) >= 5, message='five deliveries')
    time.sleep(1)
    feed = json.loads(server.request('GET', '/events')[2])['events']
    assert [headers['webhook-id'] for headers, _ in receiver.received] == [event['cursor'] for event in feed]
