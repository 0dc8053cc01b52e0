"""The store that outgrew one machine: ISS on a real S3 service (SeaweedFS) with a shared PostgreSQL index.

The API suite itself runs on both stores (the tests marked both_stores); these are the
guarantees only a bucket, a shared index and several nodes have: the seed's
layout as keys, verified and whole-or-nothing writes and reads, 503 when a
part is down, two gunicorn nodes on one store, migration, fsck and gc.
"""

from __future__ import annotations

import base64
import concurrent.futures
import dataclasses
import hashlib
import http.client
import json
import os
import pathlib
import subprocess
import sys
import threading

import botocore.exceptions
import pytest
import webtest

import iss
from conftest import BACKENDS
from iss_server.config import Settings
from iss_server.drivers import s3 as s3_driver
from iss_testing import HERE
from iss_testing.data import blob_id, make_png
from iss_testing.servers import Gunicorn, Nginx, SeaweedFS, free_port, wait_for

# NOTE: not in the fast subset (pytest -m "not slow"): SeaweedFS, PostgreSQL and several gunicorn nodes.
pytestmark = pytest.mark.slow

# -- the suite runs on both stores ----------------------------------------------------------


def test_the_api_suite_runs_on_both_stores():
    collected = subprocess.run(
        [sys.executable, '-m', 'pytest', '--collect-only', '-q', '-p', 'no:cacheprovider', '-m', 'both_stores'],
        cwd=HERE,
        capture_output=True,
        text=True,
        timeout=300,
    ).stdout.splitlines()
    on = {
        backend: [line for line in collected if f'[{backend}]' in line or f'[{backend}-' in line]
        for backend in BACKENDS
    }

    assert BACKENDS == ('file', 's3')
    # NOTE: every test on S3 runs on the file store too, under the same name.
    assert {line.replace('[s3', '[file') for line in on['s3']} <= set(on['file'])
    assert len(on['s3']) >= 213, collected[-5:]  # NOTE: as many as before the markers (issue 23)
    assert len(on['file']) >= len(on['s3'])
    # NOTE: the parts the issue names: uploads, downloads, ranges, conditionals, derivatives,
    # listings, delete, hostile input; each has tests on the S3 store.
    for name in (
        'test_an_image_upload_stores_one_blob_and_its_meta',
        'test_a_batch_stores_each_file_once',
        'test_put_artifact_needs_a_kind',
        'test_a_put_whose_bytes_do_not_hash_to_its_id_stores_nothing',
        'test_download_headers',
        'test_range_requests',
        'test_unsatisfiable_range_is_416',
        'test_if_none_match',
        'test_if_range_honours_the_range_only_for_our_etag',
        'test_active_content_is_served_so_it_cannot_run',
        'test_every_fit_gives_the_documented_size',
        'test_format_auto_follows_accept_and_says_vary',
        'test_listings_are_newest_first_with_the_stored_meta',
        'test_pages_follow_the_cursor_without_repeats_or_gaps_while_uploads_continue',
        'test_delete_removes_blob_meta_row_and_derivatives',
        'test_hostile_uploads_are_refused_and_leave_nothing_anywhere',
        'test_well_formed_forms_store_the_file_byte_for_byte',
        'test_parameter_fuzzing_never_gets_a_500',
        'test_a_resumable_upload_in_two_chunks_becomes_a_blob',
    ):
        assert any(f'::{name}' in line for line in on['s3']), f'no test {name}* runs on the S3 store'


# -- a store on one bucket --------------------------------------------------------------------


@pytest.fixture
def settings(s3_settings, tmp_path) -> Settings:
    return Settings.from_env({**s3_settings, 'ISS_DATA': str(tmp_path / 'node')})


@pytest.fixture
def client(settings) -> webtest.TestApp:
    return webtest.TestApp(iss.build_app(settings))


def keys(seaweedfs: SeaweedFS, settings: Settings, top: str = '') -> list[str]:
    """The store's keys below ``top``, without the store's prefix."""
    prefix = settings.s3_prefix
    return [key.removeprefix(prefix) for key in seaweedfs.keys(settings.s3_bucket, prefix + top)]


def multipart_uploads(seaweedfs: SeaweedFS, settings: Settings) -> list[dict]:
    answer = seaweedfs.client().list_multipart_uploads(Bucket=settings.s3_bucket, Prefix=settings.s3_prefix)
    return answer.get('Uploads', [])


def test_the_bucket_holds_the_seeds_layout_as_keys(client, seaweedfs, settings):
    png = make_png()
    hex_digest = client.post('/images', upload_files=[('file', 'a.png', png)]).json['image_id'][7:]

    assert keys(seaweedfs, settings) == [
        f'blobs/{hex_digest[:2]}/{hex_digest[2:4]}/{hex_digest}',
        f'meta/{hex_digest[:2]}/{hex_digest[2:4]}/{hex_digest}.json',
    ]
    stored = seaweedfs.client().get_object(
        Bucket=settings.s3_bucket, Key=f'{settings.s3_prefix}meta/{hex_digest[:2]}/{hex_digest[2:4]}/{hex_digest}.json'
    )
    assert json.loads(stored['Body'].read())['filename'] == 'a.png'
    assert list((pathlib.Path(settings.data_dir) / 'tmp').iterdir()) == []


def test_a_seed_data_directory_copied_into_a_bucket_is_served_as_it_is(seaweedfs, s3_settings, tmp_path):
    png = make_png(30, 20, 'blue')
    hex_digest = blob_id(png)[7:]
    bucket = seaweedfs.new_bucket()  # NOTE: at the bucket's top, no prefix, as `aws s3 sync data/ s3://b/` makes it
    seed_meta = {
        'kind': 'image',
        'bytes': len(png),
        'mime': 'image/png',
        'width': 30,
        'height': 20,
        'created_at': 1.7e9,
    }
    s3 = seaweedfs.client()
    s3.put_object(Bucket=bucket, Key=f'blobs/{hex_digest[:2]}/{hex_digest[2:4]}/{hex_digest}', Body=png)
    s3.put_object(
        Bucket=bucket, Key=f'meta/{hex_digest[:2]}/{hex_digest[2:4]}/{hex_digest}.json', Body=json.dumps(seed_meta)
    )
    client = webtest.TestApp(
        iss.build_app(
            Settings.from_env({**s3_settings, 'ISS_STORE': f's3://{bucket}', 'ISS_DATA': str(tmp_path / 'n')})
        )
    )

    assert client.get(f'/images/sha256:{hex_digest}').body == png
    wait_for(lambda: client.get('/images', expect_errors=True).status_int == 200, message='the index built')
    assert [item['id'] for item in client.get('/images').json['items']] == [f'sha256:{hex_digest}']
    assert client.get('/stats').json['count'] == 1


def test_a_large_upload_goes_up_in_verified_parts_and_leaves_no_upload_behind(client, seaweedfs, settings, monkeypatch):
    monkeypatch.setattr(s3_driver, '_SINGLE_PUT_BYTES', 6 * 1024 * 1024)
    monkeypatch.setattr(s3_driver, '_PART_BYTES', 5 * 1024 * 1024)
    data = os.urandom(17 * 1024 * 1024)

    response = client.put(
        f'/artifacts/{blob_id(data)}?kind=weights', data, headers={'Content-Type': 'application/octet-stream'}
    )

    assert response.status_int == 201
    assert client.get(f'/artifacts/{blob_id(data)}').body == data
    assert multipart_uploads(seaweedfs, settings) == []
    head = seaweedfs.client().head_object(
        Bucket=settings.s3_bucket,
        Key=settings.s3_prefix + keys(seaweedfs, settings, 'blobs')[0],
        ChecksumMode='ENABLED',
    )
    assert head['ContentLength'] == len(data)
    assert head['ChecksumSHA256'].endswith('-4')  # NOTE: four parts, each checked by the service


def test_the_service_refuses_bytes_that_do_not_hash_to_the_checksum_sent(seaweedfs, settings):
    """What ISS's writes rest on: x-amz-checksum-sha256 is verified by the S3 service itself."""
    s3 = seaweedfs.client()
    key = settings.s3_prefix + 'blobs/00/00/' + '0' * 64

    with pytest.raises(botocore.exceptions.ClientError) as refused:
        s3.put_object(
            Bucket=settings.s3_bucket,
            Key=key,
            Body=b'other bytes',
            ChecksumSHA256=base64.b64encode(b'\0' * 32).decode(),
        )

    assert refused.value.response['Error']['Code'] in ('BadDigest', 'InvalidDigest', 'XAmzContentSHA256Mismatch')
    assert keys(seaweedfs, settings) == []


@pytest.mark.parametrize('body, declared', [(b'short', 100), (b'x' * 10, 10**6)])
def test_an_upload_cut_short_leaves_nothing_in_the_bucket_or_on_the_node(client, seaweedfs, settings, body, declared):
    client.request('/artifacts?kind=x', method='POST', body=body, headers={'Content-Length': str(declared)}, status=400)

    assert keys(seaweedfs, settings) == []
    assert list((pathlib.Path(settings.data_dir) / 'tmp').iterdir()) == []


def test_a_put_under_the_wrong_digest_stores_nothing(client, seaweedfs, settings):
    client.put(f'/artifacts/{blob_id(b"a")}?kind=x', b'b', status=400)

    assert keys(seaweedfs, settings) == []


def corrupt(seaweedfs: SeaweedFS, settings: Settings, hex_digest: str, data: bytes) -> None:
    """Replace a blob's object with other bytes of the same length, as a failing backend would serve them."""
    key = f'{settings.s3_prefix}blobs/{hex_digest[:2]}/{hex_digest[2:4]}/{hex_digest}'
    seaweedfs.client().put_object(
        Bucket=settings.s3_bucket, Key=key, Body=bytes(b ^ 0xFF for b in data[:16]) + data[16:]
    )


def test_a_small_blob_whose_bytes_do_not_match_is_never_served_and_is_quarantined(client, seaweedfs, settings, caplog):
    data = os.urandom(4096)
    digest = client.post('/artifacts?kind=x', data).json['artifact_id']
    corrupt(seaweedfs, settings, digest[7:], data)

    response = client.get(f'/artifacts/{digest}', status=502)

    assert response.json['title'] == 'Corrupt blob'
    assert data[16:] not in response.body
    client.get(f'/artifacts/{digest}', status=404)
    # NOTE: the meta goes aside with its blob, as on a file store
    assert [key.partition('.')[0] for key in keys(seaweedfs, settings)] == [f'quarantine/{digest[7:]}'] * 2
    assert 'quarantining' in caplog.text
    assert client.get('/stats').json['count'] == 0


def test_fsck_reports_a_corrupt_blob_and_repair_sets_it_aside(client, seaweedfs, settings, s3_settings):
    good, bad = os.urandom(1000), os.urandom(1000)
    for data in (good, bad):
        client.post('/artifacts?kind=x', data)
    corrupt(seaweedfs, settings, blob_id(bad)[7:], bad)
    env = {**s3_settings, 'ISS_DATA': settings.data_dir}

    report = run_json(env, 'fsck', expect=1)
    repaired = run_json(env, 'fsck', '--repair', expect=0)

    assert [(p['problem'], p['id']) for p in report['problems']] == [('corrupt', blob_id(bad))]
    assert report['blobs'] == 2
    assert repaired['problems'][0]['repaired'] is True
    assert run_json(env, 'fsck')['problems'] == []
    client.get(f'/artifacts/{blob_id(bad)}', status=404)
    assert client.get(f'/artifacts/{blob_id(good)}').body == good


def run_json(env: dict[str, str], *args: str, expect: int = 0) -> dict:
    result = subprocess.run(
        [sys.executable, '-m', 'iss', '--json', *args],
        cwd=HERE,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == expect, result.stdout + result.stderr
    return json.loads(result.stdout)


def test_gc_removes_meta_rows_and_uploads_of_no_blob(client, seaweedfs, settings, s3_settings):
    data = os.urandom(100)
    digest = client.post('/artifacts?kind=x', data).json['artifact_id']
    s3 = seaweedfs.client()
    s3.delete_object(
        Bucket=settings.s3_bucket, Key=f'{settings.s3_prefix}blobs/{digest[7:9]}/{digest[9:11]}/{digest[7:]}'
    )
    s3.create_multipart_upload(Bucket=settings.s3_bucket, Key=f'{settings.s3_prefix}blobs/aa/bb/' + 'a' * 64)
    env = {**s3_settings, 'ISS_DATA': settings.data_dir}

    kept = run_json(env, 'gc')['removed']
    removed = run_json(env, 'gc', '--uploads-older-than', '0')['removed']

    assert (kept['orphaned_meta'], kept['index_rows'], kept['multipart_uploads']) == (1, 1, 0)
    assert removed['multipart_uploads'] == 1
    assert keys(seaweedfs, settings) == []
    assert multipart_uploads(seaweedfs, settings) == []


def test_stats_and_reindex_work_on_a_bucket(client, settings, s3_settings):
    client.post('/artifacts?kind=x', b'one')
    client.post('/images', upload_files=[('file', 'a.png', make_png())])
    env = {**s3_settings, 'ISS_DATA': settings.data_dir}

    assert run_json(env, 'reindex')['blobs'] == 2
    stats = run_json(env, 'stats')
    assert (stats['count'], sorted(stats['kinds'])) == (2, ['image', 'x'])


# -- a part that is down is 503, never 500 --------------------------------------------------------


def test_a_bucket_that_cannot_be_reached_is_503_with_retry_after(s3_settings, tmp_path):
    env = {**s3_settings, 'ISS_S3_ENDPOINT': f'http://127.0.0.1:{free_port()}', 'ISS_DATA': str(tmp_path / 'n')}
    client = webtest.TestApp(iss.build_app(Settings.from_env(env)))

    health = client.get('/health', status=503)
    upload = client.post('/artifacts?kind=x', b'data', status=503)
    read = client.get(f'/artifacts/{blob_id(b"data")}', status=503)

    assert health.json['failing'] == 'bucket'
    assert upload.headers['Retry-After'] == '5'
    assert 'sending it again is safe' in upload.json['description']
    assert read.json['title'] == 'Storage unavailable'
    assert list((tmp_path / 'n' / 'tmp').iterdir()) == []


def test_a_key_the_service_refuses_is_503_saying_the_bucket(s3_settings, tmp_path):
    env = {**s3_settings, 'AWS_SECRET_ACCESS_KEY': 'wrong', 'ISS_DATA': str(tmp_path / 'n')}
    client = webtest.TestApp(iss.build_app(Settings.from_env(env)))

    assert client.get('/health', status=503).json['failing'] == 'bucket'
    client.post('/artifacts?kind=x', b'data', status=503)


def test_an_index_that_cannot_be_reached_is_503_saying_the_index(s3_settings, tmp_path):
    env = {**s3_settings, 'ISS_INDEX': f'postgresql://iss@127.0.0.1:{free_port()}/iss', 'ISS_DATA': str(tmp_path / 'n')}
    client = webtest.TestApp(iss.build_app(Settings.from_env(env)))

    health = client.get('/health', status=503)
    listing = client.get('/images', status=503)

    assert health.json['failing'] == 'index'
    assert listing.headers['Retry-After']
    assert 'traceback' not in listing.text.lower()


# -- several nodes on one store -----------------------------------------------------------------


@pytest.fixture
def nodes(s3_settings, tmp_path):
    """Two gunicorn nodes, each with its own scratch directory, on one bucket and one PostgreSQL."""
    started = []

    def start(name: str, **env: str) -> Gunicorn:
        node = Gunicorn(tmp_path / name, tmp_path / f'{name}.log', **{**s3_settings, 'ISS_ADMIN_TOKEN': 'admin', **env})
        started.append(node)
        return node

    yield start
    for node in started:
        node.stop()


def test_an_upload_on_one_node_is_read_and_listed_on_the_other(nodes):
    a, b = nodes('a'), nodes('b')
    png = make_png(40, 30, 'green')

    status, _, body = a.request('POST', '/images', png, {'Content-Type': 'image/png'})
    digest = json.loads(body)['image_id']

    assert status == 201
    assert b.request('GET', f'/images/{digest}')[2] == png
    assert [item['id'] for item in json.loads(b.request('GET', '/images')[2])['items']] == [digest]
    assert json.loads(b.request('GET', f'/images/{digest}/meta')[2])['width'] == 40


def test_sixteen_uploads_of_the_same_bytes_on_two_nodes_make_one_object_and_sixteen_successes(
    nodes, seaweedfs, s3_settings
):
    a, b = nodes('a'), nodes('b')
    data = os.urandom(256 * 1024)
    start = threading.Barrier(16)

    def upload(node: Gunicorn) -> int:
        start.wait()
        return node.request('POST', '/artifacts?kind=same', data, {'Content-Type': 'application/octet-stream'})[0]

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        statuses = list(pool.map(upload, [a, b] * 8))

    settings = Settings.from_env(s3_settings)
    assert sorted(statuses) == [200] * 15 + [201]
    assert keys(seaweedfs, settings, 'blobs') == [
        f'blobs/{blob_id(data)[7:9]}/{blob_id(data)[9:11]}/{blob_id(data)[7:]}'
    ]
    assert len(keys(seaweedfs, settings, 'meta')) == 1
    assert json.loads(b.request('GET', '/stats')[2])['count'] == 1


def test_a_delete_on_one_node_is_404_on_the_other_derivatives_included(nodes):
    a, b = nodes('a'), nodes('b')
    png = make_png(64, 64, 'purple')
    digest = json.loads(a.request('POST', '/images', png, {'Content-Type': 'image/png'})[2])['image_id']
    assert a.request('GET', f'/images/{digest}?w=16')[0] == 200  # cached on node A

    assert b.request('DELETE', f'/images/{digest}', headers={'Authorization': 'Bearer admin'})[0] == 204

    assert a.request('GET', f'/images/{digest}')[0] == 404
    assert a.request('GET', f'/images/{digest}?w=16')[0] == 404
    assert a.request('GET', f'/images/{digest}/meta')[0] == 404
    assert json.loads(a.request('GET', '/images')[2])['items'] == []


def test_a_node_killed_mid_upload_leaves_no_blob_and_gc_removes_its_parts(nodes, seaweedfs, s3_settings, tmp_path):
    a = nodes('a')
    settings = Settings.from_env(s3_settings)
    size = 256 * 1024 * 1024
    chunk = os.urandom(1024 * 1024)

    def send() -> None:
        conn = http.client.HTTPConnection('127.0.0.1', a.port, timeout=120)
        try:
            conn.putrequest('POST', '/artifacts?kind=big')
            conn.putheader('Content-Length', str(size))
            conn.endheaders()
            for _ in range(size // len(chunk)):
                conn.send(chunk)
            conn.getresponse()
        except OSError:
            pass  # NOTE: the node is killed under it

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    # NOTE: killed once the bytes are going up to the bucket (the multipart upload exists)
    wait_for(lambda: multipart_uploads(seaweedfs, settings), seconds=120, message='the upload reaching the bucket')
    a.kill()
    sender.join(30)

    assert keys(seaweedfs, settings, 'blobs') == []
    assert keys(seaweedfs, settings, 'meta') == []
    env = {**s3_settings, 'ISS_DATA': str(tmp_path / 'a')}
    removed = run_json(env, 'gc', '--uploads-older-than', '0')['removed']
    assert removed['multipart_uploads'] == 1
    # NOTE: the spooled upload and its meta on the killed node's disk were unnamed (O_TMPFILE): the
    # kernel reclaimed them with the process, nothing is left for gc to sweep
    assert removed['temp_files'] == 0
    assert [path for path in (tmp_path / 'a' / 'tmp').rglob('*') if path.is_file()] == []
    assert multipart_uploads(seaweedfs, settings) == []


def test_seaweedfs_stopped_mid_upload_gives_503s_and_service_resumes_when_it_is_back(tmp_path, postgres):
    own = SeaweedFS(tmp_path / 'seaweedfs')
    try:
        bucket = own.new_bucket()
        env = {
            'ISS_STORE': f's3://{bucket}',
            'ISS_INDEX': postgres.new_database(),
            'ISS_S3_ENDPOINT': own.endpoint,
            'AWS_ACCESS_KEY_ID': 'iss-tests',
            'AWS_SECRET_ACCESS_KEY': 'iss-tests-secret',
        }
        node = Gunicorn(tmp_path / 'node', tmp_path / 'node.log', **env)
        try:
            before = node.request('POST', '/artifacts?kind=x', b'before')
            own.stop()
            during = [node.request('POST', '/artifacts?kind=x', os.urandom(2 * 1024 * 1024)) for _ in range(3)]
            reads = node.request('GET', f'/artifacts/{json.loads(before[2])["artifact_id"]}')
            health = node.request('GET', '/health')
            own.start()
            wait_for(lambda: node.request('GET', '/health')[0] == 200, seconds=60, message='health after restart')
            after = node.request('POST', '/artifacts?kind=x', b'after')
        finally:
            node.stop()
        log = (tmp_path / 'node.log').read_text()
        stored = own.keys(bucket, 'blobs/')
    finally:
        own.stop()

    assert before[0] == 201
    assert [status for status, _, _ in during] == [503] * 3
    assert all(headers['Retry-After'] for _, headers, _ in during)
    assert (reads[0], health[0], json.loads(health[2])['failing']) == (503, 503, 'bucket')
    assert after[0] == 201
    assert 'Traceback' not in log
    assert stored == [f'blobs/{h[:2]}/{h[2:4]}/{h}' for h in sorted([blob_id(b'before')[7:], blob_id(b'after')[7:]])]
    assert list((tmp_path / 'node' / 'tmp').iterdir()) == []


# -- migration -----------------------------------------------------------------------------------


def test_migrate_copies_a_data_directory_to_a_bucket_verified_and_resumes_and_back(tmp_path, seaweedfs, s3_settings):
    source = tmp_path / 'data'
    client = webtest.TestApp(iss.build_app(Settings(data_dir=str(source))))
    blobs = [os.urandom(5000 + n) for n in range(5)]
    for data in blobs:
        client.post('/artifacts?kind=m', data)
    png = make_png()
    client.post('/images', upload_files=[('file', 'p.png', png)])
    target = s3_settings['ISS_STORE']
    file_env = {key: value for key, value in s3_settings.items() if key not in ('ISS_STORE', 'ISS_INDEX')}
    file_env['ISS_DATA'] = str(source)
    settings = Settings.from_env(s3_settings)

    first = run_json(file_env, 'migrate', '--to', target, '--to-index', s3_settings['ISS_INDEX'])
    # NOTE: an interrupted copy: one blob lost on the target, run again
    lost = keys(seaweedfs, settings, 'blobs')[0]
    seaweedfs.client().delete_object(Bucket=settings.s3_bucket, Key=settings.s3_prefix + lost)
    again = run_json(file_env, 'migrate', '--to', target, '--to-index', s3_settings['ISS_INDEX'])
    back = run_json({**s3_settings, 'ISS_DATA': str(tmp_path / 'node')}, 'migrate', '--to', str(tmp_path / 'back'))

    assert (first['copied'], first['present'], first['failed']) == (6, 0, [])
    assert (again['copied'], again['present']) == (1, 5)
    assert back['copied'] == 6
    s3_client = webtest.TestApp(iss.build_app(dataclasses.replace(settings, data_dir=str(tmp_path / 'node2'))))
    for data in blobs:
        assert s3_client.get(f'/artifacts/{blob_id(data)}').body == data
    assert s3_client.get(f'/images/{blob_id(png)}/meta').json['filename'] == 'p.png'
    assert s3_client.get('/stats').json['count'] == 6
    returned = webtest.TestApp(iss.build_app(Settings(data_dir=str(tmp_path / 'back'))))
    assert returned.get(f'/images/{blob_id(png)}').body == png
    assert returned.get('/stats').json['count'] == 6
    assert hashlib.sha256(returned.get(f'/artifacts/{blob_id(blobs[0])}').body).hexdigest() == blob_id(blobs[0])[7:]
    assert run_json({'ISS_DATA': str(tmp_path / 'back')}, 'fsck')['problems'] == []


def test_behind_nginx_the_bytes_come_from_the_bucket_with_the_headers_iss_decided(
    tmp_path, s3_settings, seaweedfs, shared_data_dir
):
    node = Gunicorn(
        tmp_path / 'node',
        tmp_path / 'node.log',
        **s3_settings,
        ISS_ACCEL_REDIRECT='/_internal/s3/',
        ISS_ACCEL_MIN_BYTES='1000',
    )
    (tmp_path / 'nginx').mkdir()
    # NOTE: its cache beside shared_data_dir, where nginx's workers (nobody) can write
    nginx = Nginx(tmp_path / 'nginx', node.port, shared_data_dir, s3_upstream=seaweedfs.endpoint)
    try:
        data = os.urandom(300_000)
        page = b'<script>alert(1)</script>' * 100
        digest = json.loads(nginx.request('POST', '/artifacts?kind=x&filename=w.bin', data)[2])['artifact_id']
        active = json.loads(nginx.request('POST', '/artifacts?kind=x', page, {'Content-Type': 'text/html'})[2])[
            'artifact_id'
        ]

        # NOTE: nginx sends only what ISS verified lately: the first read goes through ISS, which hashes it
        streamed = node.request('GET', f'/artifacts/{digest}')
        direct = node.request('GET', f'/artifacts/{digest}')
        full = nginx.request('GET', f'/artifacts/{digest}')
        ranged = nginx.request('GET', f'/artifacts/{digest}', headers={'Range': 'bytes=100-199'})
        cached = nginx.request('GET', f'/artifacts/{digest}', headers={'If-None-Match': f'"{digest}"'})
        html = nginx.request('GET', f'/artifacts/{active}')
        inside = nginx.request('GET', '/_internal/s3/' + s3_settings['ISS_STORE'][5:] + '/blobs/')
    finally:
        nginx.stop()
        node.stop()

    assert streamed[1]['X-Accel-Redirect'] is None and streamed[2] == data
    assert direct[1]['X-Accel-Redirect'].startswith('/_internal/s3/') and direct[2] == b''
    assert (full[0], full[2]) == (200, data)
    for header in (
        'ETag',
        'Content-Type',
        'Content-Disposition',
        'Cache-Control',
        'X-Content-Type-Options',
        'Content-Security-Policy',
    ):
        assert full[1].get_all(header) == direct[1].get_all(header), header
    assert not [name for name in full[1] if name.lower().startswith('x-amz')]
    assert (ranged[0], ranged[2], ranged[1]['Content-Range']) == (206, data[100:200], 'bytes 100-199/300000')
    assert cached[0] == 304
    assert (html[0], html[2]) == (200, page)
    assert html[1]['Content-Disposition'].startswith('attachment')
    assert "default-src 'none'" in html[1]['Content-Security-Policy']
    assert inside[0] == 404


def test_with_iss_s3_redirect_a_get_is_a_307_to_a_presigned_url_that_serves_our_headers(s3_settings, tmp_path):
    import urllib.request

    client = webtest.TestApp(
        iss.build_app(Settings.from_env({**s3_settings, 'ISS_S3_REDIRECT': '300', 'ISS_DATA': str(tmp_path / 'n')}))
    )
    data = os.urandom(5000)
    digest = client.post(
        '/artifacts?kind=x&filename=w.bin', data, headers={'Content-Type': 'application/x-weights'}
    ).json['artifact_id']
    page = client.post('/artifacts?kind=x', b'<script>alert(1)</script>', headers={'Content-Type': 'text/html'}).json[
        'artifact_id'
    ]

    redirect = client.get(f'/artifacts/{digest}', status=307)
    with urllib.request.urlopen(redirect.headers['Location']) as answer:
        body, headers = answer.read(), answer.headers
    ranged = urllib.request.urlopen(
        urllib.request.Request(redirect.headers['Location'], headers={'Range': 'bytes=0-9'})
    )
    html = client.get(f'/artifacts/{page}')
    conditional = client.get(f'/artifacts/{digest}', headers={'If-None-Match': f'"{digest}"'}, status=304)

    assert redirect.headers['Cache-Control'] == 'private, max-age=150'
    assert redirect.headers['Location'].startswith(s3_settings['ISS_S3_ENDPOINT'])
    assert body == data
    assert headers['Content-Type'] == 'application/x-weights'
    assert headers['Content-Disposition'] == 'inline; filename="w.bin"'
    assert (ranged.status, ranged.read()) == (206, data[:10])
    assert html.status_int == 200 and html.headers['Content-Disposition'].startswith('attachment')
    assert conditional.body == b''
    client.get(f'/artifacts/sha256:{"0" * 64}', status=404)


@pytest.mark.parametrize('how', ['wrong digest', 'cut short'])
def test_a_put_sent_up_while_it_arrives_is_abandoned_when_wrong_or_cut(client, seaweedfs, settings, monkeypatch, how):
    monkeypatch.setattr(s3_driver, '_PART_BYTES', 5 * 1024 * 1024)
    data = os.urandom(17 * 1024 * 1024)
    claimed = blob_id(data if how == 'cut short' else data[::-1])
    length = len(data) + (1024 if how == 'cut short' else 0)

    client.request(
        f'/artifacts/{claimed}?kind=weights',
        method='PUT',
        body=data,
        headers={'Content-Length': str(length)},
        status=400,
    )

    assert keys(seaweedfs, settings) == []
    assert multipart_uploads(seaweedfs, settings) == []
    assert list((pathlib.Path(settings.data_dir) / 'tmp').iterdir()) == []
