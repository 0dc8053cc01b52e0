"""Resumable uploads on a cluster (issue 24, point 6; issue 29's tus items): any node continues any session.

Real SeaweedFS (S3) and PostgreSQL; the in-process tests build two apps on one
bucket and one index (two nodes in all but the process), the others start two
gunicorn nodes, the shipped nginx site balancing them without stickiness, and kill
nodes with SIGKILL mid-upload.
"""

from __future__ import annotations

import base64
import collections
import hashlib
import http.client
import itertools
import json
import os
import pathlib
import random
import threading
import time

import pytest
import webtest
from tusclient import client as tus_client

import iss
import iss_client
import storage
from iss_server import bucket_sessions
from iss_server.config import Settings
from iss_testing.servers import Gunicorn, Nginx, SeaweedFS

# NOTE: not in the fast subset: SeaweedFS, PostgreSQL and gunicorn nodes.
pytestmark = pytest.mark.slow

TUS = {'Tus-Resumable': '1.0.0'}
CHUNK = {**TUS, 'Content-Type': 'application/offset+octet-stream'}
MIB = 1024 * 1024


def metadata(**fields: str) -> str:
    return ','.join(f'{key} {base64.b64encode(value.encode()).decode()}' for key, value in fields.items())


def blob_id(data: bytes) -> str:
    return 'sha256:' + hashlib.sha256(data).hexdigest()


@pytest.fixture
def settings(s3_settings, tmp_path) -> Settings:
    return Settings.from_env({**s3_settings, 'ISS_DATA': str(tmp_path / 'node')})


@pytest.fixture
def node(s3_settings, tmp_path):
    """Make an app on the test's bucket and index with a data directory (scratch) of its own: one node."""

    def make(name: str, **changes: str) -> webtest.TestApp:
        return webtest.TestApp(
            iss.build_app(Settings.from_env({**s3_settings, 'ISS_DATA': str(tmp_path / name), **changes}))
        )

    return make


def session_objects(seaweedfs: SeaweedFS, settings: Settings) -> tuple[list[str], list[dict]]:
    """What resumable uploads hold in the bucket: objects under uploads/ and unfinished multipart uploads."""
    prefix = settings.s3_prefix + 'uploads/'
    keys = seaweedfs.keys(settings.s3_bucket, prefix)
    uploads = seaweedfs.client().list_multipart_uploads(Bucket=settings.s3_bucket, Prefix=prefix).get('Uploads', [])
    return keys, uploads


def create(app: webtest.TestApp, length: int, status: int = 201, **fields: str) -> webtest.TestResponse:
    fields.setdefault('kind', 'model')
    headers = {**TUS, 'Upload-Length': str(length), 'Upload-Metadata': metadata(**fields)}
    return app.post('/uploads', headers=headers, status=status)


def patch(app: webtest.TestApp, location: str, offset: int, data: bytes, status: int = 204) -> webtest.TestResponse:
    headers = {**CHUNK, 'Upload-Offset': str(offset)}
    return app.request(location, method='PATCH', headers=headers, body=data, status=status)


# -- two nodes in one process ---------------------------------------------------------------------


def test_chunks_sent_to_either_node_cross_parts_and_commit_one_blob(node, settings, seaweedfs):
    a, b = node('a'), node('b')
    data = os.urandom(13 * MIB + 12345)  # NOTE: two full parts of 5 MiB and a last one
    location = create(a, len(data), filename='model.bin').headers['Location']
    offsets = [0, 700_000, 3 * MIB, 5 * MIB + 1, 9 * MIB, 11 * MIB, len(data)]
    for number, (start, end) in enumerate(itertools.pairwise(offsets)):
        app, other = (a, b) if number % 2 else (b, a)
        answer = patch(app, location, start, data[start:end])
        assert answer.headers['Upload-Offset'] == str(end)
        # NOTE: the other node knows at once where the upload is
        assert other.head(location, headers=TUS).headers['Upload-Offset'] == str(end)

    assert answer.headers['ISS-Blob-Id'] == blob_id(data)
    assert answer.headers['ISS-Blob-Status'] == '201'
    for app in (a, b):
        assert app.get(f'/artifacts/{blob_id(data)}').body == data
        assert app.head(location, headers=TUS).headers['ISS-Blob-Id'] == blob_id(data)
        assert app.get(f'/artifacts/{blob_id(data)}/meta').json['filename'] == 'model.bin'
    assert session_objects(seaweedfs, settings) == ([], [])  # NOTE: no part, tail or data object left


def test_a_small_upload_never_starts_a_multipart_upload(node, settings, seaweedfs):
    a, b = node('a'), node('b')
    data = os.urandom(300_000)
    location = create(a, len(data)).headers['Location']
    patch(a, location, 0, data[:1000])
    keys, uploads = session_objects(seaweedfs, settings)
    assert uploads == [] and len(keys) == 1 and '/tail.' in keys[0]
    answer = patch(b, location, 1000, data[1000:])

    assert answer.headers['ISS-Blob-Id'] == blob_id(data)
    assert a.get(f'/artifacts/{blob_id(data)}').body == data
    assert session_objects(seaweedfs, settings) == ([], [])


def test_an_image_and_an_empty_upload_go_through_the_store_like_any(node, png):
    a, b = node('a'), node('b')
    location = create(a, len(png), kind='image').headers['Location']
    answer = patch(b, location, 0, png)
    assert a.get(answer.headers['ISS-Blob-Location'] + '/meta').json['width'] > 0

    empty = create(b, 0)
    assert empty.headers['ISS-Blob-Id'] == blob_id(b'')


def test_termination_on_another_node_removes_the_parts_and_the_row(node, settings, seaweedfs):
    a, b = node('a'), node('b')
    data = os.urandom(12 * MIB)
    location = create(a, len(data)).headers['Location']
    patch(a, location, 0, data[: 6 * MIB])
    assert session_objects(seaweedfs, settings)[1] != []

    b.request(location, method='DELETE', headers=TUS, status=204)

    for app in (a, b):
        app.head(location, headers=TUS, status=404)
    patch(a, location, 6 * MIB, data[6 * MIB :], status=404)
    assert session_objects(seaweedfs, settings) == ([], [])


def test_a_chunk_at_a_stale_offset_is_409_and_changes_nothing(node):
    a, b = node('a'), node('b')
    data = os.urandom(7 * MIB)
    location = create(a, len(data)).headers['Location']
    patch(a, location, 0, data[: 6 * MIB])
    patch(b, location, 0, data[: 6 * MIB], status=409)
    answer = patch(b, location, 6 * MIB, data[6 * MIB :])
    assert answer.headers['ISS-Blob-Id'] == blob_id(data)


def test_a_commit_left_undone_by_a_killed_node_is_finished_by_a_head_on_another(node, monkeypatch):
    a, b = node('a'), node('b')
    data = os.urandom(6 * MIB)
    location = create(a, len(data)).headers['Location']
    patch(a, location, 0, data[: 5 * MIB + 10])

    class Killed(BaseException):
        """The node dies: nothing after this line of the commit runs."""

    def die(*args, **kwargs):
        raise Killed

    with monkeypatch.context() as patched:
        patched.setattr(storage.BlobStore, 'commit', die)
        with pytest.raises(Killed):
            patch(a, location, 5 * MIB + 10, data[5 * MIB + 10 :])

    answer = b.head(location, headers=TUS)
    assert answer.headers['Upload-Offset'] == str(len(data))
    assert answer.headers['ISS-Blob-Id'] == blob_id(data)
    assert a.get(f'/artifacts/{blob_id(data)}').body == data


def test_open_sessions_are_capped_with_a_503_that_says_so(node, data_dir):
    for app in (
        node('a', ISS_TUS_MAX_SESSIONS='2'),
        webtest.TestApp(iss.build_app(Settings(data_dir=str(data_dir), tus_max_sessions=2))),
    ):
        first = create(app, 10).headers['Location']
        create(app, 10)
        refused = create(app, 10, status=503)
        assert refused.json['title'] == 'Too many open uploads'
        assert 'ISS_TUS_MAX_SESSIONS' in refused.json['description']
        assert refused.headers['Retry-After'] == '60'
        # NOTE: a finished session is not open: room again
        patch(app, first, 0, b'0123456789')
        create(app, 10)


def test_the_sweep_removes_expired_sessions_their_parts_and_objects_of_no_session(node, settings, seaweedfs):
    a = node('a', ISS_UPLOAD_EXPIRES='1')
    data = os.urandom(12 * MIB)
    location = create(a, len(data)).headers['Location']
    patch(a, location, 0, data[: 6 * MIB])  # NOTE: a part and a tail
    store = storage.open_store(settings)
    # NOTE: what a node killed between starting a multipart upload and saving its row leaves
    stray = store.driver.start_parts('uploads/AAAAAAAAAAAAAAAAAAAAAA/data')
    time.sleep(1.5)

    swept = bucket_sessions.sessions_of(store, expires_seconds=1).sweep_expired()

    assert swept == 1
    a.head(location, headers=TUS, status=404)
    assert session_objects(seaweedfs, settings) == ([], [])
    assert stray not in [upload['UploadId'] for upload in session_objects(seaweedfs, settings)[1]]


# -- gunicorn nodes -----------------------------------------------------------------------------------


@pytest.fixture
def nodes(s3_settings, tmp_path):
    """Start gunicorn nodes on the test's bucket and index; each is killed at the end."""
    started: list[Gunicorn] = []

    def start(name: str, port: int | None = None) -> Gunicorn:
        server = Gunicorn(tmp_path / name, tmp_path / f'{name}.log', port=port, **s3_settings)
        started.append(server)
        return server

    yield start
    for server in started:
        if server.process.poll() is None:
            server.kill()
        server._log.close()


def a_file(tmp_path: pathlib.Path, size: int) -> tuple[pathlib.Path, bytes]:
    data = os.urandom(size)
    path = tmp_path / f'file-{size}'
    path.write_bytes(data)
    return path, data


def requests_of(server: Gunicorn, method: str) -> int:
    """How many requests of ``method`` to an upload session ``server`` answered, from its /metrics."""
    text = server.request('GET', '/metrics')[2].decode()
    return int(
        sum(
            float(line.rsplit(' ', 1)[1])
            for line in text.splitlines()
            if line.startswith('iss_http_requests_total{')
            and f'method="{method}"' in line
            and 'route="/uploads/{upload_id}"' in line
        )
    )


def test_tuspy_alternating_patches_between_two_nodes(nodes, tmp_path):
    a, b = nodes('a'), nodes('b')
    path, data = a_file(tmp_path, 23 * MIB + 99)
    uploader = tus_client.TusClient(f'{a.url}/uploads').uploader(
        str(path), chunk_size=3 * MIB, metadata={'kind': 'tuspy', 'filename': path.name}
    )
    uploader.set_url(uploader.create_url())
    session_path = uploader.url.split('/uploads/', 1)[1]
    turn = 0
    while uploader.offset < len(data):
        turn += 1
        uploader.url = f'{(a, b)[turn % 2].url}/uploads/{session_path}'
        uploader.upload_chunk()

    assert requests_of(a, 'PATCH') >= 4 and requests_of(b, 'PATCH') >= 4
    assert uploader.request.response_headers['iss-blob-id'] == blob_id(data)
    for server in (a, b):
        assert server.request('GET', f'/artifacts/{blob_id(data)}')[2] == data


def test_tuspy_through_the_shipped_cluster_site_without_stickiness(nodes, tmp_path, shared_data_dir, monkeypatch):
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'cache'))
    a, b = nodes('a'), nodes('b')
    workdir = tmp_path / 'nginx'
    workdir.mkdir()
    site = Nginx(workdir, [a.port, b.port], shared_data_dir)
    try:
        path, data = a_file(tmp_path, 21 * MIB)
        # NOTE: chunks below what the site lets through in one request in the tests (4 MiB)
        uploader = tus_client.TusClient(f'http://127.0.0.1:{site.port}/uploads').uploader(
            str(path), chunk_size=2 * MIB, metadata={'kind': 'tuspy'}
        )
        uploader.upload()
        # NOTE: and the project's own client, as iss-client push sends a large file (issue 24 saw it fail)
        pushed, pushed_data = a_file(tmp_path, 9 * MIB + 3)
        stored = iss_client.Client(f'http://127.0.0.1:{site.port}').put_resumable(pushed, kind='m', chunk_bytes=MIB)
    finally:
        site.stop()

    # NOTE: nginx's round robin sent chunks to both nodes; each went on from where the other was
    assert requests_of(a, 'PATCH') >= 8 and requests_of(b, 'PATCH') >= 8
    assert b.request('GET', f'/artifacts/{blob_id(data)}')[2] == data
    assert stored.id == blob_id(pushed_data)
    assert a.request('GET', f'/artifacts/{blob_id(pushed_data)}')[2] == pushed_data


def send_slowly(port: int, location: str, offset: int, data: bytes, sent: threading.Event) -> None:
    """A PATCH whose body stops half-way (the node is killed meanwhile); what happens to it is not asked."""
    connection = http.client.HTTPConnection('127.0.0.1', port, timeout=30)
    try:
        connection.putrequest('PATCH', location)
        for name, value in {**CHUNK, 'Upload-Offset': str(offset), 'Content-Length': str(len(data))}.items():
            connection.putheader(name, value)
        connection.endheaders()
        connection.send(data[: len(data) // 2])
        sent.set()
        time.sleep(30)
    except OSError:
        pass
    finally:
        sent.set()
        connection.close()


def test_a_node_killed_mid_chunk_leaves_the_upload_to_the_other(nodes, tmp_path):
    a, b = nodes('a'), nodes('b')
    data = os.urandom(16 * MIB)
    status, headers, _ = a.request(
        'POST', '/uploads', headers={**TUS, 'Upload-Length': str(len(data)), 'Upload-Metadata': metadata(kind='k')}
    )
    assert status == 201
    location = headers['Location']
    status, headers, _ = a.request('PATCH', location, data[: 6 * MIB], {**CHUNK, 'Upload-Offset': '0'})
    assert status == 204

    sent = threading.Event()
    sender = threading.Thread(target=send_slowly, args=(a.port, location, 6 * MIB, data[6 * MIB :], sent))
    sender.start()
    assert sent.wait(30)
    time.sleep(0.3)
    a.kill()
    sender.join()

    status, headers, _ = b.request('HEAD', location, headers=TUS)
    assert status == 200 and headers['Upload-Offset'] == str(6 * MIB)  # NOTE: the killed chunk is not claimed
    status, headers, _ = b.request('PATCH', location, data[6 * MIB :], {**CHUNK, 'Upload-Offset': str(6 * MIB)})
    assert status == 204 and headers['ISS-Blob-Id'] == blob_id(data)
    assert b.request('GET', f'/artifacts/{blob_id(data)}')[2] == data


def listed(server: Gunicorn) -> set[str]:
    """Every artifact id the node lists, page by page."""
    ids: set[str] = set()
    path: str | None = '/artifacts?limit=500'
    while path is not None:
        page = json.loads(server.request('GET', path)[2])
        ids |= {item['id'] for item in page['items']}
        path = page['next']
    return ids


@pytest.mark.timeout(3600)
def test_uploads_survive_repeated_kills_at_random_points(nodes):
    """A node SIGKILLed again and again (ISS_TUS_KILLS, 5 unless set) while four clients upload through
    both nodes at random, one upload after another: each upload ends whole with its id, nothing else is listed."""
    kills = int(os.environ.get('ISS_TUS_KILLS', '5'))
    a, b = nodes('a'), nodes('b')
    a_port = a.port
    servers = {'a': a, 'b': b}
    stop = threading.Event()
    uploaded: list[tuple[bytes, str | None]] = []  # NOTE: each file, and the id its session answered
    failures: list[str] = []
    cut: collections.Counter[str] = collections.Counter()

    def request(method: str, path: str, body=None, headers=None):
        """To a node picked at random; a killed or restarting one fails the request (None)."""
        server = servers[random.choice('ab')]
        try:
            return server.request(method, path, body, headers)
        except OSError:
            cut[method] += 1
            time.sleep(0.05)
            return None

    def upload(data: bytes) -> str | None:
        """Send ``data`` over tus through either node, going on from the offset either one gives."""
        location = None
        seen: collections.Counter[str] = collections.Counter()  # NOTE: what the server said, for a failure
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if location is None:
                headers = {**TUS, 'Upload-Length': str(len(data)), 'Upload-Metadata': 'kind a2s='}
                answer = request('POST', '/uploads', headers=headers)
                if answer is not None and answer[0] == 201:
                    location = answer[1]['Location']
                continue
            answer = request('HEAD', location, headers=TUS)
            if answer is None or answer[0] != 200:
                seen[f'HEAD {answer and answer[0]}'] += 1
                continue
            if answer[1].get('ISS-Blob-Id'):
                return answer[1]['ISS-Blob-Id']
            offset = int(answer[1]['Upload-Offset'])
            if offset == len(data):
                seen['HEAD complete, no id'] += 1
                time.sleep(0.5)  # NOTE: a commit under way, or one a killed node left until its lease ends
                continue
            end = min(len(data), offset + random.choice((MIB, 3 * MIB, 6 * MIB)))
            answer = request('PATCH', location, data[offset:end], {**CHUNK, 'Upload-Offset': str(offset)})
            seen[f'PATCH {answer and answer[0]}'] += 1
        failures.append(f'an upload of {len(data)} bytes did not finish: {location} {dict(seen)}')
        return None

    def client() -> None:
        while not stop.is_set():
            data = os.urandom(random.randrange(1, 12 * MIB))
            uploaded.append((data, upload(data)))

    def killer() -> None:
        try:
            for _ in range(kills):
                time.sleep(random.uniform(0.2, 2.0))
                if stop.is_set():
                    return
                servers['a'].kill()
                servers['a'] = nodes('a', port=a_port)
        finally:
            stop.set()

    threads = [threading.Thread(target=client) for _ in range(4)] + [threading.Thread(target=killer)]
    try:
        for thread in threads:
            thread.start()
    finally:
        for thread in threads[-1:] + threads[:-1]:
            thread.join()

    assert failures == []
    assert cut['PATCH'] > 0, f'no PATCH met a killed node: {cut}'  # NOTE: the kills hit uploads under way
    for data, answered in uploaded:
        assert answered == blob_id(data)
        assert servers['b'].request('GET', f'/artifacts/{answered}')[2] == data
    # NOTE: nothing visible that is not one of the files: no partial blob
    assert listed(servers['b']) == {blob_id(data) for data, _ in uploaded}
