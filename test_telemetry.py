"""iss_server/telemetry.py alone: request ids, the access line, the JSON log format and the metrics.

Through gunicorn (several workers, one /metrics): test_gunicorn.py and test_deploy.py.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys

import falcon
import falcon.testing
import prometheus_client
import pytest

from iss_server import telemetry
from iss_server.errors import ServiceError

HEX_ID = re.compile(r'[0-9a-f]{32}')


class Store:
    """Stands for the store: only its totals are read, at scrape time."""

    def __init__(self, totals=None) -> None:
        self._totals = totals

    def totals(self):
        if self._totals is None:
            raise ServiceError('the index is not built yet')
        return self._totals


class Images:
    def on_post(self, req, resp):
        req.bounded_stream.read()
        resp.status = falcon.HTTP_201
        resp.media = {'stored': True}

    def on_get(self, req, resp):
        resp.text = 'listing'

    on_head = on_get


@pytest.fixture
def metrics() -> telemetry.Metrics:
    return telemetry.Metrics(Store({'image': (2, 300), 'model': (1, 5000)}), shared=False)


@pytest.fixture
def client(metrics) -> falcon.testing.TestClient:
    app = falcon.App(middleware=[telemetry.RequestTelemetry(metrics)])
    app.add_route('/images', Images())
    app.add_route('/metrics', telemetry.MetricsEndpoint(metrics))
    return falcon.testing.TestClient(app)


def test_request_ids_are_32_hex_digits_each_new():
    ids = [telemetry.new_request_id() for _ in range(1000)]

    assert all(HEX_ID.fullmatch(each) for each in ids)
    assert len(set(ids)) == len(ids)


def test_a_forked_worker_draws_ids_of_its_own():
    parent = telemetry.new_request_id()
    reading, writing = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child reports through the pipe
        os.write(writing, telemetry.new_request_id().encode())
        os._exit(0)
    os.close(writing)
    os.waitpid(child, 0)
    with os.fdopen(reading) as pipe:
        forked = pipe.read()

    assert HEX_ID.fullmatch(forked)
    assert forked[:16] != parent[:16], 'a forked child must not count on from its parent prefix'


@pytest.mark.parametrize('given', ['abc-123', 'nginx.7f:00_ab', 'x' * 128])
def test_a_sane_request_id_is_kept(client, given):
    assert client.simulate_get('/images', headers={'X-Request-Id': given}).headers['X-Request-Id'] == given


@pytest.mark.parametrize('given', [None, '', 'x' * 129, 'has space', 'semi;colon', 'ünï', '<script>'])
def test_a_missing_or_odd_request_id_is_replaced_by_a_new_one(client, given):
    headers = {'X-Request-Id': given} if given is not None else {}

    assert HEX_ID.fullmatch(client.simulate_get('/images', headers=headers).headers['X-Request-Id'])


def test_one_access_line_per_request_with_its_facts_and_never_its_body(client, caplog):
    with caplog.at_level(logging.INFO, logger='iss.access'):
        answer = client.simulate_post(
            '/images', body=b'secret body bytes', query_string='kind=x', headers={'X-Request-Id': 'r-1'}
        )
        client.simulate_head('/images')

    posted, headed = [record.request for record in caplog.records if record.name == 'iss.access']
    assert posted == {
        'request_id': 'r-1',
        'method': 'POST',
        'path': '/images',
        'query': 'kind=x',
        'route': '/images',
        'status': 201,
        'duration_ms': posted['duration_ms'],
        'bytes_in': len(b'secret body bytes'),
        'bytes_out': len(answer.content),
        'remote': posted['remote'],
        'user_agent': posted['user_agent'],
    }
    assert 0 <= posted['duration_ms'] < 10_000
    assert (headed['method'], headed['query'], headed['bytes_out']) == ('HEAD', None, 0)
    line = telemetry.JsonFormatter().format(caplog.records[0])
    assert 'secret' not in line


def test_the_log_format_is_one_json_object_per_line_in_utc():
    try:
        raise ValueError('boom')
    except ValueError:
        record = logging.LogRecord('iss.store', logging.ERROR, __file__, 1, 'failed: %s', ('x',), sys.exc_info())
    record.request = {'request_id': 'r-2'}

    line = telemetry.JsonFormatter().format(record)

    assert '\n' not in line
    entry = json.loads(line)
    assert re.fullmatch(r'\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z', entry['time'])
    assert (entry['level'], entry['logger'], entry['message'], entry['request_id']) == (
        'error',
        'iss.store',
        'failed: x',
        'r-2',
    )
    assert entry['pid'] == os.getpid()
    assert 'ValueError: boom' in entry['error']


def metric(client, name: str, **labels: str) -> float | None:
    text = client.simulate_get('/metrics').text
    wanted = ','.join(f'{key}="{value}"' for key, value in labels.items())
    found = re.search(rf'^{name}\{{{re.escape(wanted)}\}} (\S+)$', text, re.M)
    return float(found.group(1)) if found else None


def test_requests_uploads_and_bytes_are_counted_per_route(client):
    client.simulate_post('/images', body=b'12345')
    client.simulate_post('/images', body=b'67890')
    client.simulate_get('/images')
    client.simulate_get('/nowhere')

    assert metric(client, 'iss_http_requests_total', method='POST', route='/images', status='201') == 2
    assert metric(client, 'iss_http_requests_total', method='GET', route='unmatched', status='404') == 1
    assert metric(client, 'iss_uploads_total', result='new') == 2
    assert metric(client, 'iss_http_received_bytes_total', route='/images') == 10
    assert metric(client, 'iss_http_sent_bytes_total', route='/images') == 2 * len(b'{"stored": true}') + len('listing')
    answer = client.simulate_get('/metrics')
    assert answer.headers['Content-Type'] == prometheus_client.CONTENT_TYPE_LATEST
    assert answer.headers['Cache-Control'] == 'no-store'


def test_the_store_totals_are_read_at_scrape_time_and_left_out_when_unknown(client):
    assert metric(client, 'iss_store_blobs', kind='image') == 2
    assert metric(client, 'iss_store_bytes', kind='model') == 5000

    unknown = telemetry.Metrics(Store(None), shared=False)
    app = falcon.App()
    app.add_route('/metrics', telemetry.MetricsEndpoint(unknown))
    text = falcon.testing.TestClient(app).simulate_get('/metrics').text
    assert 'iss_store_' not in text
    assert 'iss_http_requests' in text
