"""The client (iss_client.py) and the iss-client command, installed as a user would, against a real gunicorn."""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import pytest

import iss_client
from iss_testing import HERE
from iss_testing.data import blob_id, files_under, make_png
from iss_testing.proxy import CuttingProxy
from iss_testing.servers import wait_for

MIB = 1024 * 1024


@pytest.fixture(scope='module')
def installed(tmp_path_factory) -> pathlib.Path:
    """``pip install`` of the checkout into a venv of its own: the client, and nothing of the server."""
    venv = tmp_path_factory.mktemp('client-venv')
    # NOTE: built from a copy, so the build leaves nothing in the checkout; the copy holds
    # what the package is made of, and the test fails if it ever needs more.
    source = tmp_path_factory.mktemp('client-source')
    for name in ('pyproject.toml', 'iss_client.py', 'README.md'):
        shutil.copy(HERE / name, source / name)
    subprocess.run([sys.executable, '-m', 'venv', str(venv)], check=True, timeout=120)
    subprocess.run(
        [str(venv / 'bin' / 'pip'), 'install', '-q', str(source)], check=True, capture_output=True, timeout=300
    )
    return venv / 'bin'


@pytest.mark.slow
def test_the_client_installs_without_the_server(installed):
    probe = 'import iss_client\nfor name in ("falcon", "PIL", "gunicorn", "iss"):\n'
    probe += '    try:\n        __import__(name)\n    except ImportError:\n        pass\n'
    probe += '    else:\n        raise SystemExit(name + " was installed with the client")\n'

    subprocess.run([str(installed / 'python'), '-c', probe], check=True, cwd='/', timeout=60)
    assert (installed / 'iss-client').exists()


@pytest.fixture
def world_readable_dir():
    """A directory another user can read (pytest's tmp_path is 0700), removed afterwards."""
    path = pathlib.Path(tempfile.mkdtemp(prefix='iss-client-'))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


def _as_nobody():
    os.setgid(65534)
    os.setuid(65534)


def unprivileged_client(installed: pathlib.Path, world_readable: pathlib.Path) -> tuple[list[str], object]:
    """The iss-client command, run so that a mode-000 file really is unreadable to it.

    NOTE: as root (CI), permissions stop nothing, so the client runs as nobody: with
    Debian's own python3 (the venv's interpreter lives under /root, which nobody may not
    enter) and a copy of the client module where nobody can read it.
    """
    if os.getuid() != 0:
        return [str(installed / 'iss-client')], None
    shutil.copy(HERE / 'iss_client.py', world_readable / 'iss_client.py')
    (world_readable / 'iss_client.py').chmod(0o644)
    return ['/usr/bin/python3', str(world_readable / 'iss_client.py')], _as_nobody


def _make_tree(top: pathlib.Path) -> dict[str, bytes]:
    """500 small files in nested folders, some of them the same bytes; returns relative path -> bytes."""
    files: dict[str, bytes] = {}
    for number in range(500):
        data = f'file {number % 450}\n'.encode() * (1 + number % 450 % 7)  # 50 duplicates
        relative = f'set{number % 5}/part{number % 3}/f{number:03d}.txt'
        path = top / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        files[relative] = data
    for folder in [top, *[p for p in top.rglob('*') if p.is_dir()]]:
        folder.chmod(0o755)
    for path in top.rglob('*.txt'):
        path.chmod(0o644)
    return files


def _uploaded_bytes(server) -> float:
    """What /metrics counts as received on the upload routes (not /blobs/missing)."""
    text = server.request('GET', '/metrics')[2].decode()
    total = 0.0
    for line in text.splitlines():
        match = re.match(r'iss_http_received_bytes_total\{route="([^"]+)"\} (\S+)', line)
        if match and match.group(1) != '/blobs/missing':
            total += float(match.group(2))
    return total


def _posts(server, route: str) -> float:
    """How many POSTs /metrics counts on ``route``."""
    text = server.request('GET', '/metrics')[2].decode()
    pattern = rf'iss_http_requests_total\{{method="POST",route="{re.escape(route)}",status="\d+"\}} (\S+)'
    return sum(float(match) for match in re.findall(pattern, text))


@pytest.mark.slow
def test_push_a_tree_then_again_sends_nothing_and_pull_restores_it(installed, start, world_readable_dir, tmp_path):
    server = start()
    tree = world_readable_dir / 'tree'
    files = _make_tree(tree)
    (tree / 'set0' / 'passwd').symlink_to('/etc/passwd')
    unreadable = tree / 'set1' / 'secret.txt'
    unreadable.write_bytes(b'nobody may read this')
    unreadable.chmod(0o000)
    client, preexec = unprivileged_client(installed, world_readable_dir)
    command = [*client, '--url', server.url, 'push', '--kind', 'sample', '-j', '8', str(tree)]

    first = subprocess.run(command, capture_output=True, text=True, preexec_fn=preexec, timeout=300)

    assert first.returncode == 1, first.stderr
    assert str(tree / 'set0' / 'passwd') in first.stderr and 'leads out of' in first.stderr
    assert str(unreadable) in first.stderr and 'Permission denied' in first.stderr
    manifest = [json.loads(line) for line in first.stdout.splitlines()]
    assert {entry['path']: entry['id'] for entry in manifest} == {path: blob_id(data) for path, data in files.items()}
    assert all(entry['bytes'] == len(files[entry['path']]) for entry in manifest)
    statuses = [entry['status'] for entry in manifest]
    assert statuses.count('new') == len(set(files.values())) == 450
    assert statuses.count('stored') == 50
    stats = json.loads(server.request('GET', '/stats')[2])
    assert stats['count'] == 450
    assert blob_id(pathlib.Path('/etc/passwd').read_bytes()) not in {entry['id'] for entry in manifest}
    assert _posts(server, '/artifacts') == 5, 'the 450 small files went in batches of 100'

    received = _uploaded_bytes(server)
    second = subprocess.run(command, capture_output=True, text=True, preexec_fn=preexec, timeout=300)

    assert second.returncode == 1  # the same two bad files, named again
    assert {json.loads(line)['status'] for line in second.stdout.splitlines()} == {'stored'}
    assert _uploaded_bytes(server) == received, 'the second push sent bytes'

    manifest_file = tmp_path / 'manifest.jsonl'
    manifest_file.write_text(first.stdout)
    out = tmp_path / 'pulled'
    pulled = subprocess.run(
        [str(installed / 'iss-client'), '--url', server.url, 'pull', '--manifest', str(manifest_file), '-o', str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )

    assert pulled.returncode == 0, pulled.stderr
    got = {str(path.relative_to(out)): path.read_bytes() for path in out.rglob('*') if path.is_file()}
    assert got == files


def test_a_wrong_token_exits_1_with_the_servers_message(installed, start, tmp_path):
    server = start(ISS_API_TOKEN='right')
    (tmp_path / 'a.png').write_bytes(make_png())

    result = subprocess.run(
        [str(installed / 'iss-client'), '--url', server.url, '--token', 'wrong', 'push', str(tmp_path / 'a.png')],
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode == 1
    assert 'Token required' in result.stderr and 'Authorization: Bearer <ISS_API_TOKEN>' in result.stderr


def test_the_token_and_url_come_from_the_environment(installed, start, tmp_path):
    server = start(ISS_API_TOKEN='right')
    (tmp_path / 'a.png').write_bytes(make_png())

    result = subprocess.run(
        [str(installed / 'iss-client'), 'push', str(tmp_path / 'a.png')],
        env={**os.environ, 'ISS_URL': server.url, 'ISS_API_TOKEN': 'right'},
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)['status'] == 'new'


def test_a_download_cut_mid_way_is_resumed_with_range_and_verified(start, tmp_path):
    server = start()
    data = os.urandom(8 * MIB)
    digest = 'sha256:' + hashlib.sha256(data).hexdigest()
    iss_client.Client(server.url).put(data, kind='blob')
    proxy = CuttingProxy(server.port, cut_after=3 * MIB, direction='download')
    downloads = tmp_path / 'downloads'
    try:
        size = iss_client.Client(f'http://127.0.0.1:{proxy.port}').get(digest, downloads / 'copy.bin')
    finally:
        proxy.close()

    assert proxy.cut, 'the proxy never cut the download'
    assert size == len(data) and (downloads / 'copy.bin').read_bytes() == data
    resumed = [request for request in proxy.requests if b'Range: bytes=' in request]
    assert len(resumed) == 1 and f'If-Range: "{digest}"'.encode() in resumed[0]
    assert [path.name for path in downloads.iterdir()] == ['copy.bin'], 'a temp file was left behind'


def test_bytes_that_do_not_match_their_id_are_never_kept(start, tmp_path):
    server = start()
    data = b'the real bytes'
    iss_client.Client(server.url).put(data, kind='blob')
    blob = server.data_dir / 'blobs' / blob_id(data)[7:9] / blob_id(data)[9:11] / blob_id(data)[7:]
    blob.write_bytes(b'the fake bytes')  # same length: damaged on the server's disk

    downloads = tmp_path / 'downloads'
    with pytest.raises(iss_client.IntegrityError):
        iss_client.Client(server.url).get(blob_id(data), downloads / 'copy.bin')

    assert list(downloads.iterdir()) == []


def test_the_library_puts_paths_bytes_and_streams_and_lists_and_deletes(start, tmp_path):
    server = start(ISS_ADMIN_TOKEN='admin')
    client = iss_client.Client(server.url, token='admin')
    path = tmp_path / 'photo.png'
    path.write_bytes(make_png())

    from_path = client.put(path)
    again = client.put(path)
    from_bytes = client.put(b'weights', kind='model', meta={'epoch': 3})
    with open(path, 'rb') as stream:
        stream.read(10)
        from_stream = client.put(stream, kind='tail')  # from where the stream stands
    from_pipe = client.put(subprocess.Popen(['echo', 'piped'], stdout=subprocess.PIPE).stdout, kind='pipe')

    assert (from_path.new, from_path.sent, from_path.meta['filename']) == (True, True, 'photo.png')
    assert (again.new, again.sent, again.id) == (False, False, from_path.id)
    assert client.meta(from_bytes.id)['epoch'] == 3
    assert from_stream.id == blob_id(make_png()[10:])
    assert from_pipe.id == blob_id(b'piped\n')
    assert [item['id'] for item in client.list('images')] == [from_path.id]
    assert {item['id'] for item in client.list('artifacts')} == {from_bytes.id, from_stream.id, from_pipe.id}
    assert client.missing([from_path.id, blob_id(b'nope')]) == [blob_id(b'nope')]
    assert client.stats()['count'] == 4
    client.delete(from_bytes.id)
    with pytest.raises(iss_client.ISSError) as refused:
        client.meta(from_bytes.id)
    assert refused.value.status == 404 and refused.value.title == 'Blob not found'


def test_put_many_stores_a_batch_in_one_request_and_says_what_each_file_became(start):
    server = start()
    client = iss_client.Client(server.url)
    png, other = make_png(), make_png(7, 7)
    client.put(other)

    outcomes = client.put_many([(png, 'a.png'), (b'not an image', 'notes.txt'), (other, 'b.png')])

    assert [type(outcome) for outcome in outcomes] == [iss_client.Stored, iss_client.ISSError, iss_client.Stored]
    assert (outcomes[0].id, outcomes[0].new, outcomes[0].meta['filename']) == (blob_id(png), True, 'a.png')
    assert (outcomes[1].status, outcomes[1].title) == (415, 'Not an image')
    assert (outcomes[2].id, outcomes[2].new) == (blob_id(other), False)
    assert _posts(server, '/images') == 1, 'the three files went in one request'
    assert client.put_many([(b'alone', 'one.bin')], kind='single')[0].id == blob_id(b'alone')


def _uploads_counted(server) -> float:
    text = server.request('GET', '/metrics')[2].decode()
    return sum(float(value) for value in re.findall(r'iss_uploads_total\{result="\w+"\} (\S+)', text))


@pytest.mark.slow
def test_a_large_file_is_sent_while_it_is_hashed_and_cut_off_when_the_server_has_it(start, tmp_path):
    server = start()
    client = iss_client.Client(server.url)
    path = tmp_path / 'weights.bin'
    path.write_bytes(os.urandom(64 * MIB))

    first = client.put(path, kind='model')

    assert (first.id, first.new, first.sent, first.meta['filename']) == (
        blob_id(path.read_bytes()),
        True,
        True,
        'weights.bin',
    )
    assert _uploads_counted(server) == 1
    # NOTE: over a slow link (64 MiB in ~2 s), so the hash (~0.3 s) is done long before the upload
    slow = CuttingProxy(server.port, cut_after=1 << 40, pace=0.002)
    again = iss_client.Client(f'http://127.0.0.1:{slow.port}').put(path, kind='model')

    assert (again.id, again.new, again.sent) == (first.id, False, False)
    assert _uploads_counted(server) == 1, 'the second upload was cut off before it was stored'
    wait_for(lambda: files_under(server.data_dir / 'tmp') == [], message='the cut-off upload to leave nothing')
    path.write_bytes(os.urandom(40 * MIB))
    with pytest.raises(iss_client.ISSError) as refused:
        client.put(path)  # new bytes by the image door: they are not an image
    assert refused.value.status == 415
    photo = tmp_path / 'huge.png'
    photo.write_bytes(make_png() + os.urandom(40 * MIB))  # a PNG with 40 MiB after its end: still one
    image = client.put(photo)
    assert (image.new, image.meta['mime'], image.meta['filename']) == (True, 'image/png', 'huge.png')
    assert client.get(image.id, tmp_path / 'back.png') == photo.stat().st_size


def test_push_hashes_a_large_file_while_sending_it_and_names_it_in_the_manifest(start, tmp_path):
    server = start()
    tree = tmp_path / 'tree'
    (tree / 'small').mkdir(parents=True)
    (tree / 'small' / 'a.txt').write_bytes(b'small')
    (tree / 'big.bin').write_bytes(os.urandom(40 * MIB))
    command = [sys.executable, str(HERE / 'iss_client.py'), '--url', server.url, 'push', '--kind', 'set', str(tree)]

    first = subprocess.run(command, capture_output=True, text=True, timeout=300)
    second = subprocess.run(command, capture_output=True, text=True, timeout=300)

    assert first.returncode == second.returncode == 0, first.stderr + second.stderr
    manifest = {entry['path']: entry for entry in map(json.loads, first.stdout.splitlines())}
    assert manifest['big.bin']['id'] == blob_id((tree / 'big.bin').read_bytes())
    assert [manifest[path]['status'] for path in ('big.bin', 'small/a.txt')] == ['new', 'new']
    assert {json.loads(line)['status'] for line in second.stdout.splitlines()} == {'stored'}


def test_a_list_follows_every_page(start):
    server = start()
    client = iss_client.Client(server.url)
    ids = {client.put(f'item {number}'.encode(), kind='page').id for number in range(25)}

    assert {item['id'] for item in client.list('artifacts', kind='page', limit=10)} == ids


@pytest.mark.slow
def test_an_upload_answered_503_is_retried_until_the_store_is_back(start, tmp_path):
    server = start(tmp_path / 'data', ISS_WORKERS='1')
    away = tmp_path / 'away'
    (tmp_path / 'data').rename(away)  # the data directory vanishes: uploads answer 503
    restore = threading.Timer(1.0, lambda: away.rename(tmp_path / 'data'))
    restore.start()
    try:
        stored = iss_client.Client(server.url, retries=6).put(b'arrives at last', kind='retry')
    finally:
        restore.join()

    assert stored.new and stored.sent
    metrics = server.request('GET', '/metrics')[2].decode()
    assert re.search(
        r'iss_http_requests_total\{method="PUT",route="/artifacts/\{blob_id\}",status="503"\} [1-9]', metrics
    )
    assert iss_client.Client(server.url).meta(stored.id)['kind'] == 'retry'


def test_an_error_that_retrying_cannot_mend_is_raised_at_once(start):
    server = start()
    client = iss_client.Client(server.url, retries=6)

    started = time.monotonic()
    with pytest.raises(iss_client.ISSError) as refused:
        client.put(b'no kind', kind='not a kind!')

    assert refused.value.status == 400 and refused.value.title == 'Invalid kind'
    assert time.monotonic() - started < 1, 'a 400 was retried'


# -- resumable uploads (tus) -----------------------------------------------------------


def _session_files(server) -> list[pathlib.Path]:
    return [p for p in files_under(server.data_dir / 'tmp') if p.suffix == '.part']


def test_a_resumable_upload_goes_on_where_the_server_has_it_after_a_cut(start, tmp_path, monkeypatch):
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'cache'))
    server = start()
    path = tmp_path / 'video.bin'
    path.write_bytes(os.urandom(6 * MIB))
    proxy = CuttingProxy(server.port, cut_after=random.randrange(2 * MIB, 5 * MIB))
    client = iss_client.Client(f'http://127.0.0.1:{proxy.port}', retries=5)

    stored = client.put_resumable(path, kind='video', meta={'camera': 2}, chunk_bytes=MIB)

    assert proxy.cuts == 1
    assert (stored.id, stored.new, stored.sent) == (blob_id(path.read_bytes()), True, True)
    assert stored.meta['camera'] == 2 and stored.meta['filename'] == 'video.bin'
    assert _session_files(server) == [] and list((tmp_path / 'cache').rglob('*.json')) == []


def test_a_resumable_upload_interrupted_in_one_run_is_resumed_by_the_next(start, tmp_path, monkeypatch):
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'cache'))
    server = start()
    path = tmp_path / 'model.bin'
    path.write_bytes(os.urandom(6 * MIB))
    proxy = CuttingProxy(server.port, cut_after=3 * MIB + 1000)
    url = f'http://127.0.0.1:{proxy.port}'  # NOTE: the proxy cuts once; the next run passes
    with pytest.raises(iss_client.Unreachable):
        iss_client.Client(url, retries=0).put_resumable(path, kind='m', chunk_bytes=MIB)
    (record,) = (tmp_path / 'cache').rglob('*.json')
    location = json.loads(record.read_text())['location']
    status, headers, _ = server.request('HEAD', location, headers={'Tus-Resumable': '1.0.0'})
    assert status == 200 and int(headers['Upload-Offset']) >= 2 * MIB

    stored = iss_client.Client(url).put_resumable(path, kind='m', chunk_bytes=MIB)

    assert (stored.id, stored.new) == (blob_id(path.read_bytes()), True)
    _, headers, _ = server.request('HEAD', location, headers={'Tus-Resumable': '1.0.0'})
    assert headers['ISS-Blob-Id'] == stored.id, 'the next run finished the same session'
    assert not record.exists()


@pytest.mark.slow
def test_a_resumable_upload_of_a_stored_file_stops_and_leaves_nothing(start, tmp_path, monkeypatch):
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'cache'))
    server = start()
    path = tmp_path / 'again.bin'
    path.write_bytes(os.urandom(40 * MIB))
    client = iss_client.Client(server.url)
    client.put(path, kind='m')

    again = client.put_resumable(path, kind='m', chunk_bytes=MIB)

    assert (again.id, again.new) == (blob_id(path.read_bytes()), False)
    assert _session_files(server) == []


@pytest.mark.slow
def test_push_sends_a_file_over_the_threshold_resumably(start, tmp_path, monkeypatch):
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'cache'))
    monkeypatch.setattr(iss_client, '_RESUMABLE_BYTES', 2 * MIB)
    monkeypatch.setattr(iss_client, '_RESUMABLE_CHUNK_BYTES', MIB)
    server = start()
    tree = tmp_path / 'tree'
    tree.mkdir()
    (tree / 'big.bin').write_bytes(os.urandom(5 * MIB))
    (tree / 'small.txt').write_bytes(b'small')

    assert iss_client.main(['--url', server.url, '-q', 'push', '--kind', 'set', str(tree)]) == 0

    metrics = server.request('GET', '/metrics')[2].decode()
    patches = re.search(
        r'iss_http_requests_total\{method="PATCH",route="/uploads/\{upload_id\}",status="204"\} (\S+)', metrics
    )
    assert patches and float(patches.group(1)) == 5
    assert iss_client.Client(server.url).meta(blob_id((tree / 'big.bin').read_bytes()))['kind'] == 'set'
