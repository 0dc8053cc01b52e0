"""Verified reads (issue 24, points 7 and 9), with real processes: nginx, SeaweedFS, PostgreSQL, gunicorn.

Behind the shipped nginx site, a blob of a bucket reaches a client whole only if ISS hashed
it: nginx sends it from the bucket only when ISS verified it within ISS_VERIFY_MAX_AGE,
otherwise ISS streams it, hashing as it goes. A scrubber re-hashes every blob on a schedule,
one node at a time. A response a client cuts off is logged as cut, with the bytes sent;
``migrate`` stops on Ctrl-C saying how to resume, and ``--verify`` re-hashes what is there.
"""

from __future__ import annotations

import http.client
import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from iss_server.config import Settings
from iss_testing import HERE
from iss_testing.servers import Gunicorn, Nginx, SeaweedFS, wait_for

pytestmark = pytest.mark.slow

LARGE = 3 * 1024 * 1024  # NOTE: below Nginx.UPLOAD_LIMIT, above ISS_ACCEL_MIN_BYTES


def object_key(env: dict[str, str], hex_digest: str) -> tuple[str, str]:
    settings = Settings.from_env(env)
    return settings.s3_bucket, f'{settings.s3_prefix}blobs/{hex_digest[:2]}/{hex_digest[2:4]}/{hex_digest}'


def corrupt(seaweedfs: SeaweedFS, env: dict[str, str], hex_digest: str, data: bytes) -> None:
    """Replace a blob's object with other bytes of the same length, as a failing backend would serve them."""
    bucket, key = object_key(env, hex_digest)
    seaweedfs.client().put_object(Bucket=bucket, Key=key, Body=data[:-16] + bytes(b ^ 0xFF for b in data[-16:]))


def quarantined(seaweedfs: SeaweedFS, env: dict[str, str]) -> list[str]:
    bucket, key = object_key(env, '0' * 64)
    prefix = key.partition('blobs/')[0] + 'quarantine/'
    listing = seaweedfs.client().list_objects_v2(Bucket=bucket, Prefix=prefix)
    return [item['Key'][len(prefix) :].partition('.')[0] for item in listing.get('Contents', [])]


def get(port: int, path: str, method: str = 'GET') -> tuple[int, http.client.HTTPMessage, bytes]:
    """A request's status, headers and the body bytes that came, also when the body was cut short."""
    conn = http.client.HTTPConnection('127.0.0.1', port, timeout=60)
    try:
        conn.request(method, path)
        response = conn.getresponse()
        try:
            body = response.read()
        except http.client.IncompleteRead as exc:
            body = exc.partial
        return response.status, response.headers, body
    finally:
        conn.close()


def upload(port: int, data: bytes) -> str:
    conn = http.client.HTTPConnection('127.0.0.1', port, timeout=60)
    try:
        conn.request('POST', '/artifacts?kind=x', data)
        response = conn.getresponse()
        assert response.status in (200, 201), response.read()
        return json.loads(response.read())['artifact_id']
    finally:
        conn.close()


def metric(port: int, name: str) -> float:
    body = get(port, '/metrics')[2].decode()
    return sum(float(value) for value in re.findall(rf'^{re.escape(name)} (\S+)$', body, re.MULTILINE))


@pytest.fixture
def site(tmp_path, s3_settings, seaweedfs, shared_data_dir):
    """A node on a bucket handing large GETs to the shipped nginx site, and that site: (node, nginx)."""
    node = Gunicorn(
        tmp_path / 'node',
        tmp_path / 'node.log',
        **s3_settings,
        ISS_ACCEL_REDIRECT='/_internal/s3/',
        ISS_ACCEL_MIN_BYTES='1000',
    )
    (tmp_path / 'nginx').mkdir()
    nginx = Nginx(tmp_path / 'nginx', node.port, shared_data_dir, s3_upstream=seaweedfs.endpoint)
    yield node, nginx
    nginx.stop()
    node.stop()


# -- behind nginx: only verified bytes offloaded -----------------------------------------------


def test_behind_nginx_a_corrupt_large_blob_is_never_served_whole_and_is_quarantined(site, seaweedfs, s3_settings):
    node, nginx = site
    data = os.urandom(LARGE)
    digest = upload(nginx.port, data)
    corrupt(seaweedfs, s3_settings, digest[7:], data)

    status, headers, body = get(nginx.port, f'/artifacts/{digest}')

    # NOTE: the status and length were sent before the last byte was hashed: the body is cut short.
    assert status == 200 and int(headers['Content-Length']) == LARGE
    assert len(body) < LARGE
    assert quarantined(seaweedfs, s3_settings) == [digest[7:]] * 2
    wait_for(lambda: get(nginx.port, f'/artifacts/{digest}')[0] == 404, message='the blob to be gone')
    log = node.log_path.read_text()
    assert 'Traceback' not in log, log


def test_behind_nginx_a_blob_is_offloaded_once_iss_has_verified_it(site):
    node, nginx = site
    data = os.urandom(LARGE)
    digest = upload(nginx.port, data)

    streamed = get(node.port, f'/artifacts/{digest}')  # NOTE: straight to ISS, to see what it answers nginx
    offloaded = get(node.port, f'/artifacts/{digest}')
    through = get(nginx.port, f'/artifacts/{digest}')

    assert 'X-Accel-Redirect' not in streamed[1] and streamed[2] == data
    assert offloaded[1]['X-Accel-Redirect'].startswith('/_internal/s3/') and offloaded[2] == b''
    assert (through[0], through[2]) == (200, data)
    assert metric(node.port, 'iss_large_reads_total{sent_by="iss"}') == 1
    assert metric(node.port, 'iss_large_reads_total{sent_by="nginx"}') == 2


def test_head_of_a_large_blob_through_nginx_is_200_with_its_length(site):
    node, nginx = site
    data = os.urandom(LARGE)
    digest = upload(nginx.port, data)
    # NOTE: straight to ISS, which hashes it on the way (offloaded from now on); through nginx,
    # nginx would keep that answer in its cache, and answer the HEADs from it.
    get(node.port, f'/artifacts/{digest}')

    head = get(nginx.port, f'/artifacts/{digest}', 'HEAD')
    head_again = get(nginx.port, f'/images/{digest}', 'HEAD')
    full = get(nginx.port, f'/artifacts/{digest}')

    assert (head[0], head[1]['Content-Length'], head[1]['ETag'], head[2]) == (200, str(LARGE), f'"{digest}"', b'')
    assert (head_again[0], head_again[1]['Content-Length']) == (200, str(LARGE))
    assert (full[0], full[2]) == (200, data)
    assert 'X-Accel-Redirect' in get(node.port, f'/artifacts/{digest}')[1]


def test_a_blob_verified_longer_ago_than_the_max_age_is_streamed_and_hashed_again(tmp_path, s3_settings):
    node = Gunicorn(
        tmp_path / 'node',
        tmp_path / 'node.log',
        **s3_settings,
        ISS_ACCEL_REDIRECT='/_internal/s3/',
        ISS_ACCEL_MIN_BYTES='1000',
        ISS_VERIFY_MAX_AGE='2',
    )
    try:
        # NOTE: large: a small blob is served from the node's verified copy once read
        digest = upload(node.port, os.urandom(LARGE))
        first = get(node.port, f'/artifacts/{digest}')
        second = get(node.port, f'/artifacts/{digest}')
        time.sleep(2.5)
        later = get(node.port, f'/artifacts/{digest}')
        again = get(node.port, f'/artifacts/{digest}')
    finally:
        node.stop()

    assert ['X-Accel-Redirect' in answer[1] for answer in (first, second, later, again)] == [False, True, False, True]


# -- the scrubber --------------------------------------------------------------------------------


def test_the_scrubber_verifies_every_blob_and_quarantines_a_corrupt_one_on_one_of_two_nodes(
    tmp_path, s3_settings, seaweedfs
):
    scrubbing = {**s3_settings, 'ISS_SCRUB_RATE': str(50 * 1024 * 1024), 'ISS_SCRUB_INTERVAL': '1'}
    accel = {'ISS_ACCEL_REDIRECT': '/_internal/s3/', 'ISS_ACCEL_MIN_BYTES': '1000'}
    nodes = [Gunicorn(tmp_path / name, tmp_path / f'{name}.log', **scrubbing, **accel) for name in ('a', 'b')]
    try:
        good, bad = os.urandom(LARGE), os.urandom(LARGE)
        good_id, bad_id = upload(nodes[0].port, good), upload(nodes[1].port, bad)
        corrupt(seaweedfs, s3_settings, bad_id[7:], bad)

        # NOTE: due one interval after its upload, then found within the scrubber's idle wait
        wait_for(lambda: quarantined(seaweedfs, s3_settings), seconds=30, message='the scrubber to quarantine')
        wait_for(
            lambda: sum(metric(node.port, 'iss_scrub_blobs_total{result="verified"}') for node in nodes) >= 1,
            seconds=30,
            message='the scrubber to verify the good blob',
        )
        # NOTE: no read went through ISS: the scrubber's verification is what lets nginx send it
        offloaded = get(nodes[1].port, f'/artifacts/{good_id}')
        missing = [get(node.port, f'/artifacts/{bad_id}')[0] for node in nodes]
        corrupt_counts = [metric(node.port, 'iss_scrub_blobs_total{result="corrupt"}') for node in nodes]
        logs = [(tmp_path / f'{name}.log').read_text() for name in ('a', 'b')]
    finally:
        for node in nodes:
            node.stop()

    assert quarantined(seaweedfs, s3_settings) == [bad_id[7:]] * 2
    assert missing == [404, 404]
    assert offloaded[1]['X-Accel-Redirect'].startswith('/_internal/s3/')
    # NOTE: one node holds the lease: the corrupt blob is found once, by one of them
    assert sorted(corrupt_counts) == [0, 1]
    assert sum(f'scrubber: its {LARGE} bytes hash to' in log for log in logs) == 1


def test_the_scrubber_keeps_to_its_rate(tmp_path, s3_settings):
    rate = 1024 * 1024
    node = Gunicorn(
        tmp_path / 'node',
        tmp_path / 'node.log',
        **s3_settings,
        ISS_SCRUB_RATE=str(rate),
        ISS_SCRUB_INTERVAL='1',
        ISS_WORKERS='2',
    )
    try:
        for _ in range(3):
            upload(node.port, os.urandom(LARGE))
        time.sleep(1.5)  # NOTE: due now; found within the scrubber's idle wait, then read at its rate
        wait_for(lambda: metric(node.port, 'iss_scrub_read_bytes_total') > 0, seconds=15)
        started = metric(node.port, 'iss_scrub_read_bytes_total')
        time.sleep(4)
        read = metric(node.port, 'iss_scrub_read_bytes_total') - started
    finally:
        node.stop()

    # NOTE: 4 s at 1 MiB/s, whichever worker holds the lease; reads come in 1 MiB chunks
    assert 2 * rate <= read <= 6 * rate


# -- a response cut off mid-body ---------------------------------------------------------------


def read_part_and_leave(port: int, path: str, body_bytes: int, headers: str = '') -> int:
    """GET ``path``, read the head and ``body_bytes`` of the body, then reset the connection; return what came."""
    with socket.create_connection(('127.0.0.1', port), timeout=30) as sock:
        sock.sendall(f'GET {path} HTTP/1.1\r\nHost: iss\r\n{headers}\r\n'.encode())
        received = b''
        while b'\r\n\r\n' not in received or len(received.partition(b'\r\n\r\n')[2]) < body_bytes:
            chunk = sock.recv(65536)
            assert chunk, received[:300]
            received += chunk
        # NOTE: SO_LINGER 0: the close resets the connection, as a client that crashed or gave up
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b'\x01\x00\x00\x00\x00\x00\x00\x00')
    return len(received.partition(b'\r\n\r\n')[2])


def access_lines(log: pathlib.Path, path: str) -> list[dict]:
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith('{')]
    return [line for line in lines if line.get('logger') == 'iss.access' and line.get('path') == path]


def cut_off_responses(node: Gunicorn, size: int) -> list[tuple[int, dict]]:
    """A whole GET and a range, each cut off by its client: (bytes it got, its access line) for each."""
    digest = upload(node.port, os.urandom(size))
    path = f'/artifacts/{digest}'
    got = [
        read_part_and_leave(node.port, path, 1024 * 1024),
        read_part_and_leave(node.port, path, 1024 * 1024, f'Range: bytes=1000-{size - 1}\r\n'),
    ]
    full = get(node.port, path)
    wait_for(lambda: len(access_lines(node.log_path, path)) == 3, message='three access lines')
    assert full[0] == 200 and len(full[2]) == size
    lines = access_lines(node.log_path, path)
    assert 'cut' not in lines[2] and lines[2]['bytes_out'] == size
    assert 'Traceback' not in node.log_path.read_text()
    return list(zip(got, lines[:2], strict=True))


@pytest.mark.parametrize('store', ['disk', 's3'])
def test_a_response_cut_off_by_its_client_is_logged_cut_with_the_bytes_sent_and_no_traceback(tmp_path, request, store):
    env = request.getfixturevalue('s3_settings') if store == 's3' else {}
    size = 48 * 1024 * 1024
    node = Gunicorn(tmp_path / 'node', tmp_path / 'node.log', ISS_LOG_LEVEL='info', **env)
    try:
        cut = cut_off_responses(node, size)
    finally:
        node.stop()

    for (got, line), status in zip(cut, (200, 206), strict=True):
        assert line['status'] == status
        assert line['cut'] == 'the client went away'
        # NOTE: what the kernel took, at least what the client read, never the whole
        assert got <= line['bytes_out'] < size - 1000


# -- migrate: Ctrl-C, and --verify ---------------------------------------------------------------


def iss_command(data_dir: pathlib.Path, *args: str, expect: int = 0) -> dict:
    result = subprocess.run(
        [sys.executable, '-m', 'iss', '--json', *args],
        cwd=HERE,
        env={**os.environ, 'ISS_DATA': str(data_dir)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == expect, result.stdout + result.stderr
    assert 'Traceback' not in result.stderr, result.stderr
    return json.loads(result.stdout)


@pytest.fixture
def source(tmp_path) -> tuple[pathlib.Path, list[bytes]]:
    """A data directory of forty 1 MiB artifacts, and their bytes."""
    import webtest

    import iss

    client = webtest.TestApp(iss.build_app(Settings(data_dir=str(tmp_path / 'source'))))
    blobs = [os.urandom(1024 * 1024) for _ in range(40)]
    for data in blobs:
        client.post('/artifacts?kind=x', data)
    return tmp_path / 'source', blobs


def stored(data_dir: pathlib.Path) -> list[pathlib.Path]:
    return sorted((data_dir / 'blobs').glob('*/*/*'))


def test_migrate_stops_cleanly_on_ctrl_c_saying_how_to_resume_and_a_rerun_completes(source, tmp_path):
    data_dir, blobs = source
    target = tmp_path / 'target'
    command = subprocess.Popen(
        [sys.executable, '-m', 'iss', 'migrate', '--progress', '--to', str(target)],
        cwd=HERE,
        env={**os.environ, 'ISS_DATA': str(data_dir)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for(lambda: (target / 'blobs').is_dir() and stored(target), message='the first blob to be copied')
    command.send_signal(signal.SIGINT)
    out, err = command.communicate(timeout=60)

    assert command.returncode == 130, out + err
    assert 'Traceback' not in err
    assert 'stopping after the blob in hand' in err
    copied = int(re.search(r'^copied: (\d+)$', out, re.MULTILINE)[1])
    assert 0 < copied < len(blobs), out
    assert re.search(rf'^interrupted: after {copied} blobs? of 40: run the same command again to go on', out, re.M)
    assert len(stored(target)) == copied  # NOTE: nothing half-copied: each blob is there whole, or not at all

    again = iss_command(data_dir, 'migrate', '--to', str(target))

    assert (again['present'], again['copied'], again['failed']) == (copied, len(blobs) - copied, [])
    assert iss_command(target, 'fsck')['problems'] == []


def test_migrate_verify_rehashes_what_the_target_has_and_copies_a_corrupt_blob_anew(source, tmp_path):
    data_dir, blobs = source
    target = tmp_path / 'target'
    first = iss_command(data_dir, 'migrate', '--to', str(target))
    damaged = stored(target)[0]
    damaged.chmod(0o644)
    original = damaged.read_bytes()
    damaged.write_bytes(bytes(b ^ 0xFF for b in original[:16]) + original[16:])

    unverified = iss_command(data_dir, 'migrate', '--to', str(target))
    verified = iss_command(data_dir, 'migrate', '--to', str(target), '--verify')

    assert first['copied'] == len(blobs)
    # NOTE: without --verify a rerun trusts what is there
    assert (unverified['present'], unverified['copied']) == (len(blobs), 0)
    assert (verified['verified'], verified['recopied'], verified['copied'], verified['present']) == (
        len(blobs) - 1,
        1,
        1,
        len(blobs) - 1,
    )
    assert damaged.read_bytes() == original
    # NOTE: its meta goes aside with it (a new one comes with the copy)
    assert [path.name.partition('.')[0] for path in (target / 'quarantine').iterdir()] == [damaged.name] * 2
    assert iss_command(target, 'fsck')['problems'] == []
