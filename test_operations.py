"""Running ISS for years: listing, lookup, totals, deletion and the operator's commands."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import multiprocessing
import os
import pathlib
import subprocess
import sys
import tempfile
import threading
import time
import traceback

import pytest
import webtest

import iss
import storage
from iss_server import resumable
from iss_server.config import Settings
from iss_testing import HERE
from iss_testing.cli import cli_json, run_cli, upload_image
from iss_testing.data import MISSING, blob_id, blob_path, file_store, files_under, make_png
from iss_testing.servers import wait_for

# NOTE: every test here that takes a client runs on each store, unless marked file_store.
pytestmark = pytest.mark.both_stores

ADMIN = {'Authorization': 'Bearer admin-secret'}


@pytest.fixture
def admin_client(make_client) -> webtest.TestApp:
    return make_client(admin_token='admin-secret')


def upload_artifact(client, data: bytes, kind: str = 'model', content_type: str = 'application/octet-stream', **kw):
    meta = kw.pop('meta', '')
    return client.post(f'/artifacts?kind={kind}&meta={meta}', data, headers={'Content-Type': content_type}, **kw)


def ids_of(response) -> list[str]:
    return [item['id'] for item in response.json['items']]


def walk(client, url: str) -> list[str]:
    """Every id of a listing, following its next links."""
    ids: list[str] = []
    while url:
        response = client.get(url)
        ids += ids_of(response)
        url = response.json['next']
        assert (url is None) == ('Link' not in response.headers)
    return ids


# -- listing ----------------------------------------------------------------------


def test_listings_are_newest_first_with_the_stored_meta(client):
    image_ids = [upload_image(client, make_png(color=c)).json['image_id'] for c in ('red', 'green', 'blue')]
    artifact = upload_artifact(client, b'weights', meta='{"epoch": 3}').json

    images = client.get('/images')
    artifacts = client.get('/artifacts')

    assert ids_of(images) == image_ids[::-1]
    assert images.json['next'] is None
    first = images.json['items'][0]
    assert first == {'id': image_ids[-1], **client.get(f'/images/{image_ids[-1]}/meta').json}
    assert first['width'] == 100 and first['format'] == 'PNG'
    assert artifacts.json['items'] == [
        {'id': artifact['artifact_id'], **client.get(f'/artifacts/{artifact["artifact_id"]}/meta').json}
    ]
    assert artifacts.json['items'][0]['epoch'] == 3


def test_pages_follow_the_cursor_without_repeats_or_gaps_while_uploads_continue(client):
    older = [upload_artifact(client, b'%d' % n).json['artifact_id'] for n in range(7)]

    first = client.get('/artifacts?limit=3')
    newer = upload_artifact(client, b'uploaded during the walk').json['artifact_id']
    rest = walk(client, first.json['next'])

    assert ids_of(first) + rest == older[::-1]
    assert newer not in rest
    assert first.headers['Link'] == f'<{first.json["next"]}>; rel=next'
    assert 'limit=3' in first.json['next']


def test_artifacts_filter_by_kind_and_creation_time(client):
    model = upload_artifact(client, b'm', kind='model').json
    time.sleep(0.01)
    dataset = upload_artifact(client, b'd', kind='dataset').json
    between = (model['created_at'] + dataset['created_at']) / 2
    iso = time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(dataset['created_at'] + 60)) + 'Z'

    assert ids_of(client.get('/artifacts?kind=dataset')) == [dataset['artifact_id']]
    assert ids_of(client.get(f'/artifacts?created_after={between}')) == [dataset['artifact_id']]
    assert ids_of(client.get(f'/artifacts?created_before={between}')) == [model['artifact_id']]
    assert len(ids_of(client.get(f'/artifacts?created_before={iso}'))) == 2
    assert ids_of(client.get('/artifacts?kind=dataset&created_before=1000')) == []
    # the filters travel in the next link
    page = client.get('/artifacts?kind=model&limit=1&created_after=0')
    assert page.json['next'] is None
    two = client.get('/artifacts?limit=1&created_after=1')
    assert 'created_after=1' in two.json['next']


@pytest.mark.parametrize(
    'query, title',
    [
        ('limit=0', 'Invalid parameter'),
        ('limit=1001', 'Invalid parameter'),
        ('limit=ten', 'Invalid parameter'),
        ('cursor=bm90IGEgY3Vyc29y', 'Invalid cursor'),
        ('cursor=%25%25', 'Invalid cursor'),
        ('created_after=yesterday', 'Invalid created_after'),
        ('created_before=2026-13-01', 'Invalid created_before'),
        ('kind=no%20spaces', 'Invalid kind'),
    ],
)
def test_bad_listing_parameters_are_400(client, query, title):
    response = client.get(f'/artifacts?{query}', status=400)

    assert response.json['title'] == title


def test_a_seed_data_directory_is_indexed_in_the_background(tmp_path, png):
    data_dir = tmp_path / 'seed'
    digest = blob_id(png)
    for top, name, content in (
        ('blobs', digest[7:], png),
        ('meta', digest[7:] + '.json', json.dumps({'kind': 'image', 'bytes': len(png), 'created_at': 5.0}).encode()),
    ):
        path = data_dir / top / digest[7:9] / digest[9:11] / name
        path.parent.mkdir(parents=True)
        path.write_bytes(content)
    # a blob of the seed without meta (a crash between its two writes) is listed as an artifact
    orphan = b'no meta'
    orphan_path = data_dir / 'blobs' / blob_id(orphan)[7:9] / blob_id(orphan)[9:11] / blob_id(orphan)[7:]
    orphan_path.parent.mkdir(parents=True)
    orphan_path.write_bytes(orphan)

    client = webtest.TestApp(iss.build_app(Settings(data_dir=str(data_dir))))

    wait_for(lambda: client.get('/images', expect_errors=True).status_int == 200, message='the index')
    assert ids_of(client.get('/images')) == [digest]
    assert client.get('/artifacts').json['items'] == [{'id': blob_id(orphan), 'bytes': len(orphan)}]


def test_listing_answers_503_while_the_index_is_incomplete(data_dir, png):
    store = file_store(data_dir)
    store.index.mark_complete(False)
    store.start()
    client = webtest.TestApp(iss.create_app(Settings(data_dir=str(data_dir)), store))

    # NOTE: the app started a build in a thread; holding its lock keeps it from finishing.
    with open(data_dir / 'index.lock', 'a') as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        store.index.mark_complete(False)
        response = client.get('/images', status=503)
        stats = client.get('/stats', status=503)
    assert response.headers['Retry-After'] == '10'
    assert response.json['title'] == stats.json['title'] == 'Index not ready'
    assert upload_image(client, png).status_int == 201  # uploads never wait for it


# -- lookup and totals -----------------------------------------------------------


def test_missing_blobs_answers_only_the_ids_not_stored(client, png):
    stored = upload_image(client, png).json['image_id']
    other = blob_id(b'other')

    response = client.post_json('/blobs/missing', {'ids': [stored, other, MISSING, other]})

    assert response.json == {'missing': [other, MISSING]}


@pytest.mark.parametrize(
    'body, title',
    [
        ({'ids': ['sha256:abc']}, 'Malformed id'),
        ({'ids': 'sha256:' + '0' * 64}, 'Invalid body'),
        ({'ids': [1]}, 'Invalid body'),
        ([MISSING], 'Invalid body'),
        ({'ids': [MISSING] * 10_001}, 'Too many ids'),
    ],
)
def test_missing_blobs_refuses_what_is_not_a_list_of_ids(client, body, title):
    assert client.post_json('/blobs/missing', body, status=400).json['title'] == title


def test_missing_blobs_needs_the_upload_token_like_every_post(make_client):
    client = make_client(api_token='t')

    client.post_json('/blobs/missing', {'ids': []}, status=401)
    client.post_json('/blobs/missing', {'ids': []}, headers={'Authorization': 'Bearer t'}, status=200)


def test_stats_count_blobs_and_bytes_per_kind(admin_client, png):
    upload_image(admin_client, png)
    upload_image(admin_client, png)  # the same bytes count once
    upload_artifact(admin_client, b'12345', kind='model')
    gone = upload_artifact(admin_client, b'123', kind='model').json['artifact_id']
    admin_client.delete(f'/artifacts/{gone}', headers=ADMIN)

    assert admin_client.get('/stats').json == {
        'count': 2,
        'bytes': len(png) + 5,
        'kinds': {'image': {'count': 1, 'bytes': len(png)}, 'model': {'count': 1, 'bytes': 5}},
    }


# -- deletion --------------------------------------------------------------------


@pytest.mark.file_store
def test_deletion_is_off_without_an_admin_token(client, data_dir, png):
    digest = upload_image(client, png).json['image_id']

    response = client.delete(f'/images/{digest}', headers=ADMIN, status=403)

    assert 'ISS_ADMIN_TOKEN' in response.json['description']
    assert client.get(f'/images/{digest}').body == png


def test_deletion_needs_the_admin_token_not_the_upload_token(make_client, png):
    client = make_client(admin_token='admin-secret', api_token='upload-secret')
    digest = upload_image(client, png, headers={'Authorization': 'Bearer upload-secret'}).json['image_id']

    for headers in ({}, {'Authorization': 'Bearer upload-secret'}, {'Authorization': 'Bearer admin-secre'}):
        response = client.delete(f'/images/{digest}', headers=headers, status=401)
        assert response.headers['WWW-Authenticate'] == 'Bearer realm="iss"'
    client.delete(f'/images/{digest}', headers=ADMIN, status=204)


@pytest.mark.file_store
def test_delete_removes_blob_meta_and_row_and_the_content_can_come_back(admin_client, data_dir):
    digest = upload_artifact(admin_client, b'{"a": 1}', content_type='text/plain').json['artifact_id']
    assert admin_client.get(f'/artifacts/{digest}').content_type == 'text/plain'

    response = admin_client.delete(f'/artifacts/{digest}', headers=ADMIN, status=204)

    assert response.body == b''
    admin_client.get(f'/artifacts/{digest}', status=404)
    admin_client.get(f'/artifacts/{digest}/meta', status=404)
    admin_client.delete(f'/images/{digest}', headers=ADMIN, status=404)
    assert files_under(data_dir / 'blobs') == files_under(data_dir / 'meta') == []
    assert ids_of(admin_client.get('/artifacts')) == []
    # stored again, with other meta: served with the new type, not one remembered from before
    again = upload_artifact(admin_client, b'{"a": 1}', kind='config', content_type='application/json', status=201)
    assert again.json['artifact_id'] == digest
    assert admin_client.get(f'/artifacts/{digest}').content_type == 'application/json'
    assert admin_client.get('/artifacts').json['items'][0]['kind'] == 'config'


def test_delete_of_a_malformed_id_is_404(admin_client):
    admin_client.delete('/images/sha256:nothex', headers=ADMIN, status=404)


def test_a_delete_waits_for_an_upload_of_the_same_content_to_finish(data_dir):
    store = file_store(data_dir)
    staged = store.stage(_Chunks([b'content']))
    linked, go_on, deleted = threading.Event(), threading.Event(), threading.Event()
    flush = store.layout.flush

    def flush_and_pause_once_the_blob_is_linked():
        flush()
        if os.path.exists(store.layout.blob(staged.hex)) and not linked.is_set():
            linked.set()
            go_on.wait(5)

    store.layout.flush = flush_and_pause_once_the_blob_is_linked
    uploader = threading.Thread(target=store.commit, args=(staged, {'kind': 'x', 'bytes': 7}))
    uploader.start()
    assert linked.wait(5)
    # the upload has linked the blob and holds it while it writes its meta and index row
    deleter = threading.Thread(target=lambda: (store.delete(blob_id(b'content')), deleted.set()))
    deleter.start()
    time.sleep(0.2)
    assert not deleted.is_set(), 'the delete did not wait for the upload'
    go_on.set()
    uploader.join(5)
    deleter.join(5)

    assert deleted.is_set()
    assert files_under(data_dir / 'blobs') == files_under(data_dir / 'meta') == []
    assert store.totals() == {}


def test_uploads_and_deletes_of_the_same_content_leave_blob_meta_and_row_in_step(data_dir):
    """Many rounds of a commit and a delete at once: after each, all three exist or none does."""
    store = file_store(data_dir)
    digest = blob_id(b'contended')
    hex_digest = digest[7:]
    barrier = threading.Barrier(2)

    def commit() -> None:
        staged = store.stage(_Chunks([b'contended']))
        barrier.wait()
        store.commit(staged, {'kind': 'k', 'bytes': 9})

    def delete() -> None:
        barrier.wait()
        with contextlib.suppress(storage.BlobNotFound):
            store.delete(digest)

    for _ in range(300):
        store.commit(store.stage(_Chunks([b'contended'])), {'kind': 'k', 'bytes': 9})
        threads = [threading.Thread(target=commit), threading.Thread(target=delete)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        state = (
            blob_path(data_dir, digest).exists(),
            blob_path(data_dir, digest, 'meta', '.json').exists(),
            store.index.get(hex_digest) is not None,
        )
        assert state in ((True, True, True), (False, False, False))


class _Chunks:
    def __init__(self, chunks: list[bytes]) -> None:
        self._chunks = list(chunks)

    def readinto(self, buffer: memoryview) -> int:
        chunk = self._chunks.pop(0) if self._chunks else b''
        buffer[: len(chunk)] = chunk
        return len(chunk)


@pytest.mark.slow
def test_delete_racing_with_downloads_and_uploads_never_serves_a_truncated_blob(start, tmp_path):
    """Through gunicorn with two workers: a reader gets the whole blob or a 404, never a part."""
    server = start(ISS_ADMIN_TOKEN='admin-secret', ISS_WORKERS='2')
    blob = os.urandom(4 * 1024 * 1024)
    digest = blob_id(blob)
    url = f'/artifacts/{digest}'
    stop = time.monotonic() + 6
    seen: dict[str, int] = {'whole': 0, 'absent': 0}
    errors: list[str] = []

    def download() -> None:
        while time.monotonic() < stop:
            status, _, body = server.request('GET', url)
            if status == 200 and body == blob:
                seen['whole'] += 1
            elif status == 404:
                seen['absent'] += 1
            else:
                errors.append(f'{status}: {len(body)} bytes')

    def upload_and_delete() -> None:
        while time.monotonic() < stop:
            status, _, _ = server.request('PUT', f'{url}?kind=race', blob)
            if status not in (200, 201):
                errors.append(f'PUT {status}')
            status, _, _ = server.request('DELETE', url, headers=ADMIN)
            if status not in (204, 404):
                errors.append(f'DELETE {status}')

    threads = [threading.Thread(target=download) for _ in range(4)] + [
        threading.Thread(target=upload_and_delete) for _ in range(2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    assert seen['whole'] > 5 and seen['absent'] > 5, seen
    # whatever the last operation was, blob, meta and index agree
    result = run_cli('--data', str(server.data_dir), '--json', 'fsck')
    assert result.returncode == 0, result.stdout


# -- the command line -------------------------------------------------------------


@pytest.mark.file_store
def test_fsck_finds_a_flipped_bit_and_repair_quarantines_the_blob(client, data_dir, png):
    digest = upload_image(client, png).json['image_id']
    other = upload_artifact(client, b'healthy').json['artifact_id']
    assert cli_json(data_dir, 'fsck')['clean'] is True
    path = blob_path(data_dir, digest)
    damaged = bytearray(path.read_bytes())
    damaged[len(damaged) // 2] ^= 0x01
    path.write_bytes(damaged)

    found = cli_json(data_dir, 'fsck', expect=1)

    assert found['blobs'] == 2 and found['bytes'] == len(png) + len(b'healthy')
    assert [(p['problem'], p['id'], p['repaired']) for p in found['problems']] == [('corrupt', digest, False)]
    repaired = cli_json(data_dir, 'fsck', '--repair')
    assert [(p['problem'], p['repaired']) for p in repaired['problems']] == [('corrupt', True)]
    assert sorted(p.name.split('.')[0] for p in (data_dir / 'quarantine').iterdir()) == [digest[7:]] * 2
    client.get(f'/images/{digest}', status=404)
    assert client.get(f'/artifacts/{other}').body == b'healthy'
    assert cli_json(data_dir, 'fsck')['problems'] == []
    # the verified bytes can be stored again
    assert upload_image(client, png).status_int == 201


@pytest.mark.file_store
def test_fsck_reports_orphans_missing_meta_stray_files_and_index_drift(client, data_dir, png):
    image = upload_image(client, png).json['image_id']
    artifact = upload_artifact(client, b'artifact').json['artifact_id']
    lost = upload_artifact(client, b'lost').json['artifact_id']
    blob_path(data_dir, image, 'meta', '.json').unlink()  # a blob without meta
    blob_path(data_dir, lost).unlink()  # meta and index row without a blob
    blob_path(data_dir, artifact, 'meta', '.json').write_text('{not json')
    (data_dir / 'blobs' / 'stray.txt').write_text('?')

    found = cli_json(data_dir, 'fsck', expect=1)

    problems = {(p['problem'], p['id']) for p in found['problems']}
    assert problems == {
        ('missing_meta', image),
        ('unreadable_meta', artifact),
        ('orphaned_meta', lost),
        ('stray_file', None),
        ('index_differs', image),
        ('index_differs', artifact),
        ('index_stale', lost),
    }
    repaired = cli_json(data_dir, 'fsck', '--repair', expect=1)  # the stray file is left alone
    assert [p['problem'] for p in repaired['problems'] if not p['repaired']] == ['stray_file']
    assert client.get(f'/images/{image}/meta').json['format'] == 'PNG'
    assert client.get(f'/artifacts/{artifact}/meta').json['kind'] == 'recovered'
    assert ids_of(client.get('/images')) == [image]
    assert lost not in ids_of(client.get('/artifacts'))
    assert (data_dir / 'blobs' / 'stray.txt').exists()


@pytest.mark.file_store
def test_gc_removes_stale_temp_files_expired_uploads_orphaned_meta_and_rows(client, data_dir, png):
    lost = upload_artifact(client, b'lost').json['artifact_id']
    kept = upload_image(client, png).json['image_id']
    blob_path(data_dir, lost).unlink()
    (data_dir / 'tmp' / 'upload-dead').write_bytes(b'half an upload')
    store = file_store(data_dir)
    owner = resumable.owner_of(b'')
    live = resumable.Sessions(store, expires_seconds=3600).create(10, {'kind': 'a'}, owner)
    # NOTE: created after, as a creation sweeps the expired: abandoned on a server gone idle
    resumable.Sessions(store, expires_seconds=-1).create(10, {'kind': 'a'}, owner)

    dry = cli_json(data_dir, 'gc', '--dry-run')
    assert dry['removed'] == {
        'temp_files': 1,
        'upload_sessions': 1,
        'orphaned_meta': 1,
        'index_rows': 1,
        'derived_files': 0,
    }
    assert (data_dir / 'tmp' / 'upload-dead').exists() and len(files_under(data_dir / 'tmp' / 'uploads')) == 4
    assert cli_json(data_dir, 'gc')['removed'] == {
        'temp_files': 1,
        'upload_sessions': 1,
        'orphaned_meta': 1,
        'index_rows': 1,
        'derived_files': 0,
    }

    assert sorted(p.name for p in files_under(data_dir / 'tmp')) == [f'{live.id}.json', f'{live.id}.part']
    assert files_under(data_dir / 'meta') == [blob_path(data_dir, kept, 'meta', '.json')]
    assert [item['id'] for item in client.get('/artifacts').json['items']] == []
    assert cli_json(data_dir, 'gc')['removed'] == {
        'temp_files': 0,
        'upload_sessions': 0,
        'orphaned_meta': 0,
        'index_rows': 0,
        'derived_files': 0,
    }


def test_gc_leaves_a_live_upload_alone(data_dir):
    store = file_store(data_dir)
    # NOTE: past what waits in memory (storage._IN_MEMORY_BYTES): a temp file, unnamed where the file system allows
    pieces = [os.urandom(16 * 1024) for _ in range(8)]
    with store.stage(_Chunks(pieces)) as staged:
        assert cli_json(data_dir, 'gc')['removed']['temp_files'] == 0
        with staged.open() as received:
            assert received.read() == b''.join(pieces)


@pytest.mark.file_store
def test_reindex_rebuilds_a_lost_index_and_stats_reads_it(client, data_dir, png):
    upload_image(client, png)
    upload_artifact(client, b'abc', kind='model')
    for name in ('index.sqlite3', 'index.sqlite3-wal', 'index.sqlite3-shm'):
        (data_dir / name).unlink(missing_ok=True)

    assert cli_json(data_dir, 'reindex')['blobs'] == 2
    stats = cli_json(data_dir, 'stats')

    assert stats['count'] == 2 and stats['bytes'] == len(png) + 3
    assert stats['kinds'] == {'image': {'count': 1, 'bytes': len(png)}, 'model': {'count': 1, 'bytes': 3}}
    assert stats['free_bytes'] > 0
    assert cli_json(data_dir, 'reindex')['changed'] == 0


@pytest.mark.file_store
def test_a_running_service_writes_to_an_index_rebuilt_under_it(client, data_dir, png):
    upload_image(client, png)
    for name in ('index.sqlite3', 'index.sqlite3-wal', 'index.sqlite3-shm'):
        (data_dir / name).unlink(missing_ok=True)
    assert cli_json(data_dir, 'reindex')['blobs'] == 1

    upload_artifact(client, b'after the rebuild', kind='model')

    # The service's kept connections were to the removed file; the new row is in the new one.
    assert cli_json(data_dir, 'stats')['count'] == 2


@pytest.mark.file_store
def test_import_stores_a_folder_as_images_and_reports_what_it_skipped(tmp_path, data_dir, client):
    folder = tmp_path / 'photos'
    (folder / 'day2').mkdir(parents=True)
    (folder / 'a.png').write_bytes(make_png(color='red'))
    (folder / 'day2' / 'b.png').write_bytes(make_png(color='blue'))
    (folder / 'day2' / 'copy.png').write_bytes(make_png(color='blue'))
    (folder / 'notes.txt').write_text('not an image')

    result = run_cli('--progress', 'import', str(folder), data_dir=data_dir)

    # NOTE: a file skipped is a file not imported: the exit code says so (1), as the README's
    # exit codes do, and the reason speaks of the file, not of ISS's internals.
    assert result.returncode == 1, result.stderr
    assert 'files: 4\nnew: 2\nexisting: 1\n' in result.stdout
    assert 'skipped: 1\n' in result.stdout and 'notes.txt' in result.stdout
    assert 'not an image Pillow can identify' in result.stdout and '<_io' not in result.stdout
    assert '[' + '#' * 30 + '] 4/4 files' in result.stderr
    listed = client.get('/images').json['items']
    assert sorted(item['id'] for item in listed) == sorted(
        {blob_id(make_png(color='red')), blob_id(make_png(color='blue'))}
    )


@pytest.mark.file_store
def test_import_skips_symlinks_that_lead_out_of_the_folder(tmp_path, data_dir, client):
    folder = tmp_path / 'photos'
    folder.mkdir()
    (folder / 'a.png').write_bytes(make_png(color='red'))
    (folder / 'inside.png').symlink_to(folder / 'a.png')
    (folder / 'passwd').symlink_to('/etc/passwd')
    (folder / 'etc').symlink_to('/etc')

    result = cli_json(data_dir, 'import', str(folder), '--kind', 'file', expect=1)

    assert sorted(item['path'] for item in result['skipped']) == [str(folder / 'etc'), str(folder / 'passwd')]
    assert all('leads out of' in item['reason'] for item in result['skipped'])
    assert {item['path'] for item in result['manifest']} == {'a.png', 'inside.png'}
    passwd = pathlib.Path('/etc/passwd').read_bytes()
    client.get(f'/artifacts/{blob_id(passwd)}', status=404)


@pytest.mark.file_store
def test_import_json_is_the_manifest_of_push_and_can_go_to_a_file(tmp_path, data_dir, client):
    folder = tmp_path / 'runs'
    (folder / 'day1').mkdir(parents=True)
    (folder / 'day1' / 'a.bin').write_bytes(b'first')
    (folder / 'b.bin').write_bytes(b'first')
    manifest = tmp_path / 'manifest.jsonl'

    result = cli_json(data_dir, 'import', str(folder), '--kind', 'run', '--manifest', str(manifest))

    expected = [
        {'path': 'b.bin', 'id': blob_id(b'first'), 'bytes': 5, 'status': 'new'},
        {'path': 'day1/a.bin', 'id': blob_id(b'first'), 'bytes': 5, 'status': 'stored'},
    ]
    assert sorted(result['manifest'], key=lambda entry: entry['path']) == expected
    assert sorted(map(json.loads, manifest.read_text().splitlines()), key=lambda entry: entry['path']) == expected


@pytest.mark.file_store
def test_json_works_after_the_command_too_and_stats_read_as_text(data_dir, client, png):
    upload_image(client, png)

    after = run_cli('stats', '--json', data_dir=data_dir)
    text = run_cli('stats', data_dir=data_dir)

    assert after.returncode == 0, after.stderr
    assert json.loads(after.stdout)['count'] == 1
    assert f'count: 1\nbytes: {len(png)} bytes\nkinds:\n  image: 1 blob, {len(png)} bytes\n' in text.stdout
    assert '{' not in text.stdout


@pytest.mark.file_store
def test_the_command_line_runs_from_any_directory(tmp_path, data_dir, client, png):
    upload_image(client, png)

    result = subprocess.run(
        [sys.executable, str(HERE / 'iss.py'), '--json', 'stats'],
        cwd=tmp_path,
        env={**os.environ, 'ISS_DATA': str(data_dir)},
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)['count'] == 1


@pytest.mark.file_store
def test_import_with_a_kind_stores_artifacts_typed_by_extension(tmp_path, data_dir, client):
    folder = tmp_path / 'runs'
    folder.mkdir()
    (folder / 'config.json').write_text('{}')
    (folder / 'weights.bin').write_bytes(b'\0' * 10)

    result = cli_json(data_dir, 'import', str(folder), '--kind', 'run')

    assert (result['new'], result['skipped'], result['failed']) == (2, [], [])
    assert client.get(f'/artifacts/{blob_id(b"{}")}').content_type == 'application/json'
    assert {item['kind'] for item in client.get('/artifacts?kind=run').json['items']} == {'run'}


@pytest.mark.parametrize(
    'args, message',
    [
        (('import', '/nonexistent-folder'), 'is not a directory'),
        (('--data', '/nonexistent-store', 'stats'), 'is not a directory'),
    ],
)
def test_cli_exits_2_with_a_json_error_when_it_cannot_run(data_dir, args, message):
    data_dir.mkdir()
    result = run_cli('--json', *args, data_dir=data_dir)

    assert result.returncode == 2
    assert message in json.loads(result.stderr)['error']


def test_cli_refuses_a_bad_kind_and_an_unknown_command(data_dir):
    data_dir.mkdir()
    assert run_cli('import', '.', '--kind', 'a b', data_dir=data_dir).returncode == 2
    assert run_cli('frobnicate', data_dir=data_dir).returncode == 2


# -- at scale ---------------------------------------------------------------------


@pytest.mark.slow
def test_a_store_of_100000_blobs_is_listed_in_full_through_gunicorn(start, tmp_path):
    """100,000 blobs written as the FastAPI version would have, indexed, then walked page by page."""
    data_dir = tmp_path / 'big'
    expected = []
    for number in range(100_000):
        content = b'%d' % number
        digest = hashlib.sha256(content).hexdigest()
        meta = b'{"kind":"image","bytes":%d,"created_at":%d}' % (len(content), 1_700_000_000 + number)
        for top, name, data in (('blobs', digest, content), ('meta', digest + '.json', meta)):
            folder = data_dir / top / digest[:2] / digest[2:4]
            folder.mkdir(parents=True, exist_ok=True)
            (folder / name).write_bytes(data)
        expected.append('sha256:' + digest)
    indexed = cli_json(data_dir, 'reindex')
    assert indexed['blobs'] == 100_000
    server = start(data_dir)

    started = time.monotonic()
    status, _, body = server.request('GET', '/images?limit=1000')
    first_page = time.monotonic() - started
    ids, url = [], '/images?limit=1000'
    while url:
        status, _, body = server.request('GET', url)
        assert status == 200
        page = json.loads(body)
        ids += [item['id'] for item in page['items']]
        url = page['next']
    walked = time.monotonic() - started

    assert ids == expected[::-1]
    # Stated bounds, about 10x what this 2-core machine measures (see bench/README.md).
    assert first_page < 1.0, f'first page of 1000 took {first_page:.2f} s'
    assert walked < 20.0, f'100 pages of 1000 took {walked:.2f} s'
    print(f'reindex {indexed["seconds"]} s, first page {first_page * 1000:.0f} ms, all 100 pages {walked:.2f} s')
    # PERF: pytest removed the 330,000 files and folders after the test, in Python: 50-75 s of the suite's
    # 30 minutes. Moved out of tmp_path, they go in a detached rm beside the next tests instead.
    server.stop()
    discarded = pathlib.Path(tempfile.mkdtemp(prefix='iss-discarded-', dir=tmp_path.parent.parent))  # same disk
    data_dir.rename(discarded / 'big')
    subprocess.Popen(['rm', '-rf', str(discarded)], start_new_session=True)


# -- observability ------------------------------------------------------------------


def test_every_response_carries_a_request_id_and_a_sane_given_one_is_kept(client):
    fresh = client.get('/health')
    given = client.get('/health', headers={'X-Request-Id': 'trace-42:a.b'})
    hostile = client.get('/health', headers={'X-Request-Id': 'x' * 200})
    error = client.get('/nowhere', status=404)

    assert len(fresh.headers['X-Request-Id']) == 32
    assert given.headers['X-Request-Id'] == 'trace-42:a.b'
    assert hostile.headers['X-Request-Id'] != 'x' * 200
    assert len(error.headers['X-Request-Id']) == 32


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text, 0 when absent."""
    wanted = ','.join(f'{key}="{value}"' for key, value in labels.items())
    for line in text.splitlines():
        sample, _, value = line.rpartition(' ')
        if sample == (f'{name}{{{wanted}}}' if labels else name):
            return float(value)
    return 0.0


def test_metrics_add_up_every_worker(start, png):
    server = start(ISS_WORKERS='2', ISS_LOG_LEVEL='info')

    def health_lines() -> list[dict]:
        return [line for line in server.json_log() if line.get('route') == '/health']

    # NOTE: the kernel hands sequential connections to one worker; bursts reach both.
    for _ in range(50):
        burst = [threading.Thread(target=server.request, args=('GET', '/health')) for _ in range(16)]
        for thread in burst:
            thread.start()
        for thread in burst:
            thread.join()
        if len({line['pid'] for line in health_lines()}) == 2:
            break
    assert len({line['pid'] for line in health_lines()}) == 2, 'both workers should have answered'
    health_requests = len(health_lines())
    assert server.request('POST', '/images', png, {'Content-Type': 'image/png'})[0] == 201
    assert server.request('POST', '/images', png, {'Content-Type': 'image/png'})[0] == 200
    assert server.request('GET', f'/images/{blob_id(png)}')[0] == 200

    for _ in range(6):  # whichever worker answers, it sums them all
        status, headers, body = server.request('GET', '/metrics')
        text = body.decode()
        assert status == 200 and headers['Content-Type'].startswith('text/plain; version=')
        assert metric(text, 'iss_http_requests_total', method='GET', route='/health', status='200') == health_requests
        assert metric(text, 'iss_http_request_duration_seconds_count', method='GET', route='/health') == health_requests
        assert metric(text, 'iss_uploads_total', result='new') == 1
        assert metric(text, 'iss_uploads_total', result='existing') == 1
        assert metric(text, 'iss_http_received_bytes_total', route='/images') == 2 * len(png)
        assert metric(text, 'iss_http_sent_bytes_total', route='/images/{blob_id}') == len(png)
        assert metric(text, 'iss_store_blobs', kind='image') == 1
        assert metric(text, 'iss_store_bytes', kind='image') == len(png)


def test_access_log_is_one_json_line_per_request_without_bodies(start):
    server = start(ISS_LOG_LEVEL='info')
    secret = b'body-marker-' + os.urandom(8).hex().encode()

    status, headers, _ = server.request('POST', '/artifacts?kind=k', secret, {'X-Request-Id': 'req-1'})
    server.request('GET', '/health')

    assert status == 201 and headers['X-Request-Id'] == 'req-1'
    log = server.log_path.read_text()
    assert secret.decode() not in log
    lines = [line for line in server.json_log() if line['logger'] == 'iss.access']
    upload = next(line for line in lines if line['request_id'] == 'req-1')
    assert upload['method'] == 'POST' and upload['path'] == '/artifacts' and upload['query'] == 'kind=k'
    assert (upload['status'], upload['bytes_in'], upload['route']) == (201, len(secret), '/artifacts')
    assert upload['level'] == 'info' and upload['duration_ms'] > 0 and upload['time'].endswith('Z')
    assert '"GET /health' not in log, "gunicorn's own access log is off: one line per request"
    assert all(line.startswith('{') for line in log.splitlines()), 'every log line is JSON'


def test_log_level_warning_keeps_access_lines_out(start):
    server = start(ISS_LOG_LEVEL='warning')
    server.request('GET', '/health')

    assert [line for line in server.json_log() if line['logger'] == 'iss.access'] == []


class _BrokenStore(storage.FileStore):
    def stat(self, blob_id: str) -> storage.BlobStat:
        raise RuntimeError('a bug in the store')


def test_an_unexpected_error_is_a_json_500_and_a_logged_traceback(data_dir, caplog):
    client = webtest.TestApp(
        iss.create_app(Settings(data_dir=str(data_dir)), _BrokenStore(str(data_dir), file_store(data_dir).index))
    )

    response = client.head(f'/images/{MISSING}', status=500)
    response = client.get(f'/images/{MISSING}/meta', status=500)

    request_id = response.headers['X-Request-Id']
    assert response.json['title'] == 'Internal error' and request_id in response.json['description']
    assert 'Traceback' not in response.text and 'a bug in the store' not in response.text
    record = caplog.records[-1]
    assert record.levelname == 'ERROR' and record.request == {'request_id': request_id}
    assert 'a bug in the store' in ''.join(traceback.format_exception(*record.exc_info))


def _start_a_store(root: str, barrier, answers) -> None:
    """A worker starting: build the store and read the index, after every other has arrived."""
    complaints: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            complaints.append(record.getMessage())

    logging.getLogger('iss').addHandler(Collect(logging.WARNING))
    barrier.wait()
    try:
        store = file_store(root)
        store.start()
        complaints += [] if store.index_complete else ['the index of an empty store is not complete']
    except Exception as exc:
        complaints.append(repr(exc))
    answers.put(complaints)


def test_artifacts_of_kind_image_are_not_asked_of_the_artifacts_listing(client, png):
    """/stats counts images under the kind image, and they are listed by /images: the two agree."""
    upload_image(client, png)

    refused = client.get('/artifacts?kind=image', status=400)

    assert refused.json['title'] == 'Invalid kind' and 'GET /images' in refused.json['description']
    assert client.get('/stats').json['kinds']['image']['count'] == len(client.get('/images').json['items']) == 1


def _start_workers_as_gunicorn_does(tmp: str, attempts: int, answers) -> None:
    """A master with no threads of its own forks eight workers onto a new data directory, again and again."""
    fork = multiprocessing.get_context('fork')
    for attempt in range(attempts):
        barrier = fork.Barrier(8, timeout=60)
        workers = [
            fork.Process(target=_start_a_store, args=(f'{tmp}/data{attempt}', barrier, answers), daemon=True)
            for _ in range(8)
        ]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(60)
            if worker.exitcode is None:
                worker.kill()
                answers.put([f'start {attempt}: a worker hung'])


def test_many_workers_starting_at_once_on_a_fresh_data_directory_all_come_up(tmp_path):
    """Eight processes create the index of a new data directory in the same instant, 25 times over."""
    # NOTE: forked from a master that has no threads, as gunicorn's: a child forked from
    # pytest itself, whose threads may be inside SQLite at that instant (an idle
    # connection closing), inherits SQLite's locks held and waits forever (34 of 200 such
    # forks hung here), a fault of the test's fork and not of the index.
    attempts, context = 25, multiprocessing.get_context('forkserver')
    answers = context.Queue()
    master = context.Process(target=_start_workers_as_gunicorn_does, args=(str(tmp_path), attempts, answers))
    master.start()
    try:
        complaints = [message for _ in range(attempts * 8) for message in answers.get(timeout=120)]
    finally:
        master.join(60)
        master.kill()  # NOTE: one that hangs fails this test, never holds up the whole run
    assert complaints == []
