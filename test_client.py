"""The client (the iss_client package) and its iss-client command, installed as a user would, on a real gunicorn."""

from __future__ import annotations

import ast
import hashlib
import io
import json
import os
import pathlib
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

import pytest
from PIL import Image

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
    for name in ('pyproject.toml', 'README.md'):
        shutil.copy(HERE / name, source / name)
    shutil.copytree(HERE / 'iss_client', source / 'iss_client', ignore=shutil.ignore_patterns('__pycache__'))
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
    enter) and a copy of the client's package where nobody can read it.
    """
    if os.getuid() != 0:
        return [str(installed / 'iss-client')], None
    package = world_readable / 'iss_client'
    shutil.copytree(HERE / 'iss_client', package, ignore=shutil.ignore_patterns('__pycache__'))
    for path in [package, *package.iterdir()]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    run = f'import sys; sys.path.insert(0, {str(world_readable)!r}); from iss_client import main; sys.exit(main())'
    return ['/usr/bin/python3', '-c', run], _as_nobody


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
    command = [sys.executable, '-m', 'iss_client', '--url', server.url, 'push', '--kind', 'set', str(tree)]

    env = {**os.environ, 'XDG_CACHE_HOME': str(tmp_path / 'cache')}
    first = subprocess.run(command, capture_output=True, text=True, cwd=HERE, env=env, timeout=300)
    second = subprocess.run(command, capture_output=True, text=True, cwd=HERE, env=env, timeout=300)

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


@pytest.mark.parametrize('size', [20 * MIB, 40 * MIB], ids=['by-id', 'while-hashing'])
def test_a_file_over_the_servers_upload_limit_is_its_413_sent_once(start, tmp_path, size):
    """The server answers 413 before reading such a body and closes; the rest of the file met a broken pipe,
    and the client said "Unreachable: Broken pipe" after retries that each sent the whole file again."""
    server = start(ISS_MAX_UPLOAD_BYTES=str(MIB))
    path = tmp_path / 'too-large.bin'
    path.write_bytes(os.urandom(size))
    assert iss_client.library.upload_way(size, id_known=False) == ('by-id' if size < 32 * MIB else 'while-hashing')

    with pytest.raises(iss_client.ISSError) as refused:
        iss_client.Client(server.url, retries=4).put(path, kind='big')

    assert (refused.value.status, refused.value.title) == (413, 'Upload too large'), refused.value
    metrics = server.request('GET', '/metrics')[2].decode().splitlines()
    refused = [line for line in metrics if line.startswith('iss_http_requests_total') and 'status="413"' in line]
    assert len(refused) == 1 and refused[0].endswith(' 1.0'), ('the file was sent once', refused)


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
    monkeypatch.setattr(iss_client.library, '_RESUMABLE_BYTES', 2 * MIB)
    monkeypatch.setattr(iss_client.library, '_RESUMABLE_CHUNK_BYTES', MIB)
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


# -- the command as a new user meets it (issue 25) -------------------------------------


def _command(
    *args: str, cache: pathlib.Path, umask: int | None = None, timeout: float = 300, **env: str
) -> subprocess.CompletedProcess:
    """``python -m iss_client ARGS`` from the checkout, with a cache of its own and no ISS_* of the test's."""
    environ = {name: value for name, value in os.environ.items() if not name.startswith('ISS_')}
    environ.update(XDG_CACHE_HOME=str(cache), **env)
    return subprocess.run(
        [sys.executable, '-m', 'iss_client', *args],
        capture_output=True,
        text=True,
        cwd=HERE,
        env=environ,
        preexec_fn=None if umask is None else lambda: os.umask(umask),
        timeout=timeout,
    )


def _mixed_tree(top: pathlib.Path) -> None:
    (top / 'photos').mkdir(parents=True)
    (top / 'photos' / 'a.png').write_bytes(make_png())
    (top / 'photos' / 'broken.png').write_bytes(make_png()[:30])  # an image's first bytes, then nothing
    (top / 'table.csv').write_bytes(b'a,b\n1,2\n')
    (top / 'doc.json').write_bytes(b'{"a": 1}')
    (top / 'notes.txt').write_bytes(b'notes\n')


def test_push_stores_a_mixed_tree_in_one_run_images_as_images_the_rest_as_files(start, tmp_path):
    server = start()
    tree = tmp_path / 'tree'
    _mixed_tree(tree)

    pushed = _command('--url', server.url, 'push', str(tree), cache=tmp_path / 'cache')

    assert pushed.returncode == 0, pushed.stderr
    manifest = {entry['path']: entry for entry in map(json.loads, pushed.stdout.splitlines())}
    assert set(manifest) == {'photos/a.png', 'photos/broken.png', 'table.csv', 'doc.json', 'notes.txt'}
    client = iss_client.Client(server.url)
    stored = {path: client.meta(entry['id']) for path, entry in manifest.items()}
    assert {path: (meta['kind'], meta['mime']) for path, meta in stored.items()} == {
        'photos/a.png': ('image', 'image/png'),
        'photos/broken.png': ('file', 'image/png'),  # the image door said no: stored as a file
        'table.csv': ('file', 'text/csv'),
        'doc.json': ('file', 'application/json'),
        'notes.txt': ('file', 'text/plain'),
    }
    assert [item['id'] for item in client.list('images')] == [manifest['photos/a.png']['id']]


def test_push_other_kind_names_the_kind_of_what_is_no_image(start, tmp_path):
    server = start()
    tree = tmp_path / 'tree'
    _mixed_tree(tree)

    pushed = _command('--url', server.url, 'push', '--other-kind', 'dataset', str(tree), cache=tmp_path / 'cache')

    assert pushed.returncode == 0, pushed.stderr
    manifest = {entry['path']: entry['id'] for entry in map(json.loads, pushed.stdout.splitlines())}
    client = iss_client.Client(server.url)
    kinds = {path: client.meta(blob_id)['kind'] for path, blob_id in manifest.items()}
    assert kinds == {
        'photos/a.png': 'image',
        'photos/broken.png': 'dataset',
        'table.csv': 'dataset',
        'doc.json': 'dataset',
        'notes.txt': 'dataset',
    }


def test_push_images_only_refuses_what_is_no_image_even_when_the_server_has_it(start, tmp_path):
    server = start()
    tree = tmp_path / 'tree'
    _mixed_tree(tree)
    assert _command('--url', server.url, 'push', str(tree), cache=tmp_path / 'cache').returncode == 0

    again = _command('--url', server.url, 'push', '--images-only', str(tree), cache=tmp_path / 'cache')

    assert again.returncode == 1
    # NOTE: broken.png begins as a PNG: only the server can tell, and it has those bytes already
    assert [json.loads(line)['path'] for line in again.stdout.splitlines()] == ['photos/a.png', 'photos/broken.png']
    assert str(tree / 'notes.txt') in again.stderr and 'without --images-only' in again.stderr


def test_push_images_only_refuses_the_rest_naming_the_option_that_takes_it(start, tmp_path):
    server = start()
    tree = tmp_path / 'tree'
    _mixed_tree(tree)

    pushed = _command('--url', server.url, 'push', '--images-only', str(tree), cache=tmp_path / 'cache')

    assert pushed.returncode == 1
    assert [json.loads(line)['path'] for line in pushed.stdout.splitlines()] == ['photos/a.png']
    refusals = pushed.stderr.splitlines()
    assert len(refusals) == 4 and all('without --images-only' in line for line in refusals), pushed.stderr
    assert str(tree / 'notes.txt') in pushed.stderr and 'POST /artifacts' not in pushed.stderr
    both = _command('--url', server.url, 'push', '--images-only', '--kind', 'x', str(tree), cache=tmp_path / 'cache')
    assert both.returncode == 2 and '--kind' in both.stderr


def test_push_with_a_kind_stores_every_file_as_an_artifact_of_it(start, tmp_path):
    server = start()
    tree = tmp_path / 'tree'
    _mixed_tree(tree)

    pushed = _command('--url', server.url, 'push', '--kind', 'dataset', str(tree), cache=tmp_path / 'cache')

    assert pushed.returncode == 0, pushed.stderr
    client = iss_client.Client(server.url)
    assert {client.meta(json.loads(line)['id'])['kind'] for line in pushed.stdout.splitlines()} == {'dataset'}
    assert list(client.list('images')) == []


def test_a_re_push_of_a_40_mib_file_sends_no_byte_of_it(start, tmp_path):
    server = start()
    tree = tmp_path / 'tree'
    tree.mkdir()
    (tree / 'weights.csv').write_bytes(os.urandom(40 * MIB))
    push = ('--url', server.url, 'push', str(tree))

    first = _command(*push, cache=tmp_path / 'cache')
    received = _uploaded_bytes(server)
    second = _command(*push, cache=tmp_path / 'cache')

    assert first.returncode == second.returncode == 0, first.stderr + second.stderr
    assert received >= 40 * MIB
    assert json.loads(second.stdout)['status'] == 'stored'
    assert _uploaded_bytes(server) == received, 'the re-push sent bytes of a stored file'
    meta = iss_client.Client(server.url).meta(json.loads(first.stdout)['id'])
    assert (meta['kind'], meta['mime'], meta['filename']) == ('file', 'text/csv', 'weights.csv')


def test_every_way_up_types_a_file_by_its_extension(start, tmp_path):
    server = start()
    client = iss_client.Client(server.url)
    by_id = tmp_path / 'middle.json'
    by_id.write_bytes(b'[' + b'1,' * 200_000 + b'1]')
    hashing = tmp_path / 'large.txt'
    hashing.write_bytes(os.urandom(40 * MIB))
    resumable = tmp_path / 'video.tsv'
    resumable.write_bytes(os.urandom(2 * MIB))

    ways = {
        'by-id': client.put(by_id, kind='t'),
        'while-hashing': client.put(hashing, kind='t'),
        'batch': client.put_many([(b'a,b\n', 'small.csv')], kind='t')[0],
        'resumable': client.put_resumable(resumable, kind='t', chunk_bytes=MIB),
    }

    assert iss_client.upload_way(by_id.stat().st_size, id_known=False) == 'by-id'
    assert iss_client.upload_way(hashing.stat().st_size, id_known=False) == 'while-hashing'
    assert {way: client.meta(stored.id)['mime'] for way, stored in ways.items()} == {
        'by-id': 'application/json',
        'while-hashing': 'text/plain',
        'batch': 'text/csv',
        'resumable': 'text/tab-separated-values',
    }


def test_the_client_and_the_servers_import_type_files_by_the_same_table():
    import iss_server.files

    assert iss_client.files.MEDIA_TYPES == iss_server.files.MEDIA_TYPES
    assert iss_client.media_type('A.CSV') == iss_server.files.media_type('A.CSV') == 'text/csv'
    assert iss_client.media_type('weights') == iss_server.files.media_type('weights') == 'application/octet-stream'


def test_the_servers_import_and_push_write_manifests_of_the_same_shape(start, tmp_path):
    tree = tmp_path / 'tree'
    _mixed_tree(tree)
    (tree / 'photos' / 'copy.png').write_bytes(make_png())  # the same bytes twice: one new, one stored
    server = start()
    imported = tmp_path / 'imported.jsonl'
    (tmp_path / 'other').mkdir()
    subprocess.run(
        [sys.executable, '-m', 'iss', 'import', str(tree), '--kind', 'set', '--manifest', str(imported)],
        env={**os.environ, 'ISS_DATA': str(tmp_path / 'other')},
        cwd=HERE,
        check=True,
        capture_output=True,
        timeout=120,
    )

    pushed = _command('--url', server.url, '-q', 'push', '--kind', 'set', str(tree), cache=tmp_path / 'cache')

    assert pushed.returncode == 0, pushed.stderr
    from_import = sorted(map(json.loads, imported.read_text().splitlines()), key=lambda entry: entry['path'])
    from_push = [json.loads(line) for line in pushed.stdout.splitlines()]  # NOTE: push sorts by path
    assert len(from_push) == 6 and from_push == from_import


def test_pull_restores_file_names_and_gives_modes_by_the_umask(start, tmp_path):
    server = start()
    client = iss_client.Client(server.url)
    report = client.put(b'a,b\n', kind='t', filename='report.csv')
    same_name = client.put(b'c,d\n', kind='t', filename='report.csv')
    nameless = client.put(b'no name', kind='t')
    cache = tmp_path / 'cache'

    by_id = _command(
        '--url',
        server.url,
        'pull',
        report.id,
        same_name.id,
        nameless.id,
        '-o',
        str(tmp_path / 'ids'),
        cache=cache,
        umask=0o027,
    )

    assert by_id.returncode == 0, by_id.stderr
    got = {path.name: (path.read_bytes(), path.stat().st_mode & 0o777) for path in (tmp_path / 'ids').iterdir()}
    assert got == {
        'report.csv': (b'a,b\n', 0o640),
        same_name.id.removeprefix('sha256:'): (b'c,d\n', 0o640),  # the name was taken
        nameless.id.removeprefix('sha256:'): (b'no name', 0o640),
    }
    tree = tmp_path / 'tree'
    _mixed_tree(tree)
    manifest = tmp_path / 'manifest.jsonl'
    assert _command('--url', server.url, 'push', str(tree), '--manifest', str(manifest), cache=cache).returncode == 0

    by_manifest = _command(
        '--url',
        server.url,
        'pull',
        '--manifest',
        str(manifest),
        '-o',
        str(tmp_path / 'back'),
        cache=cache,
        umask=0o022,
    )

    assert by_manifest.returncode == 0, by_manifest.stderr
    back = {str(path.relative_to(tmp_path / 'back')): path for path in (tmp_path / 'back').rglob('*') if path.is_file()}
    assert {name: path.read_bytes() for name, path in back.items()} == {
        str(path.relative_to(tree)): path.read_bytes() for path in tree.rglob('*') if path.is_file()
    }
    assert {path.stat().st_mode & 0o777 for path in back.values()} == {0o644}


def test_options_go_before_or_after_the_command_and_every_command_speaks_json(start, tmp_path):
    server = start(ISS_ADMIN_TOKEN='admin')
    cache = tmp_path / 'cache'
    (tmp_path / 'one.txt').write_bytes(b'one')

    pushed = _command('push', str(tmp_path / 'one.txt'), '--json', '--url', server.url, cache=cache)
    blob = json.loads(pushed.stdout)['id']
    runs = {
        'stats before': _command('--url', server.url, '--json', 'stats', cache=cache),
        'stats after': _command('stats', '--json', '--url', server.url, cache=cache),
        'ls': _command('--json', 'ls', '--url', server.url, cache=cache),
        'meta': _command('meta', blob, '--json', '--url', server.url, cache=cache),
        'pull': _command('--json', '--url', server.url, 'pull', blob, '-o', str(tmp_path / 'out'), cache=cache),
        'rm': _command('--url', server.url, '--token', 'admin', 'rm', '--json', blob, cache=cache),
    }

    assert pushed.returncode == 0, pushed.stderr
    assert {name: run.returncode for name, run in runs.items()} == dict.fromkeys(runs, 0), runs
    documents = {name: [json.loads(line) for line in run.stdout.splitlines()] for name, run in runs.items()}
    assert documents['stats before'] == documents['stats after'] and documents['stats after'][0]['count'] == 1
    assert [item['id'] for item in documents['ls']] == [blob]
    assert documents['meta'][0]['filename'] == 'one.txt'
    assert documents['pull'] == [{'id': blob, 'path': str(tmp_path / 'out' / 'one.txt'), 'bytes': 3}]
    assert documents['rm'] == [{'id': blob, 'deleted': True}]


def test_the_commands_speak_to_a_person_in_sizes_dates_and_plurals(start, tmp_path):
    server = start()
    client = iss_client.Client(server.url)
    one = client.put(os.urandom(1_234_567), kind='model', filename='w.bin')
    cache = tmp_path / 'cache'

    stats = _command('--url', server.url, 'stats', cache=cache).stdout
    listing = _command('--url', server.url, 'ls', cache=cache).stdout
    meta = _command('--url', server.url, 'meta', one.id, cache=cache).stdout
    client.put(b'two', kind='model')
    more = _command('--url', server.url, 'stats', cache=cache).stdout
    helps = [_command(*command, '--help', cache=cache).stdout for command in [(), ('push',), ('pull',)]]

    assert stats.splitlines() == ['1 blob, 1.2 MB', '  model: 1 blob, 1.2 MB']
    assert more.splitlines()[0] == '2 blobs, 1.2 MB'
    date = r'\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d'
    assert re.fullmatch(rf'{one.id}  model\s+1\.2 MB  {date}  w\.bin', listing.strip()), listing
    assert re.search(rf'^  created_at: {date}$', meta, re.M) and '  bytes: 1.2 MB (1,234,567 bytes)' in meta, meta
    assert all(help_text and not re.search(r'``|:class:|:meth:', help_text) for help_text in helps)
    assert '--images-only' in helps[1] and 'before or after' in helps[0]


def test_an_unreachable_server_fails_fast_in_one_line(tmp_path):
    with socket.socket() as closed:
        closed.bind(('127.0.0.1', 0))
        url = f'http://127.0.0.1:{closed.getsockname()[1]}'  # bound, never listening: refused
        started = time.monotonic()
        result = _command('--url', url, 'stats', cache=tmp_path / 'cache')
        took = time.monotonic() - started

    assert result.returncode == 2
    assert took < 2.5, f'{took:.1f} s to find the server was not there'
    assert result.stderr.count('\n') == 1 and f'cannot reach {url}' in result.stderr, result.stderr
    assert 'Connection refused' in result.stderr and '--url' in result.stderr and '0 Unreachable' not in result.stderr


def test_a_missing_token_and_a_wrong_one_are_told_apart(start, tmp_path):
    server = start(ISS_API_TOKEN='right')
    (tmp_path / 'a.txt').write_bytes(b'a')
    cache = tmp_path / 'cache'

    missing = _command('--url', server.url, 'push', str(tmp_path / 'a.txt'), cache=cache)
    wrong = _command('--url', server.url, '--token', 'wrong', 'push', str(tmp_path / 'a.txt'), cache=cache)

    assert missing.returncode == wrong.returncode == 1
    assert 'no token was given: pass --token or set $ISS_API_TOKEN' in missing.stderr
    assert 'the token given was refused: check --token or $ISS_API_TOKEN' in wrong.stderr


def test_an_error_line_never_runs_into_the_progress_line(monkeypatch):
    stderr = io.StringIO()
    monkeypatch.setattr(sys, 'stderr', stderr)
    console = iss_client.command._Console(enabled=True)
    console.start(2, 2000)

    console.advance(1000)
    console.error('a.txt', 'Permission denied')
    console.advance(1000)
    console.finish()

    assert re.fullmatch(
        r'\r\x1b\[K1/2 files  1\.0 kB/2\.0 kB  [^\n\r]+'
        r'\r\x1b\[Kiss-client: a\.txt: Permission denied\n'
        r'1/2 files  1\.0 kB/2\.0 kB  [^\n\r]+'
        r'\r\x1b\[K2/2 files  2\.0 kB/2\.0 kB  [^\n\r]+\n',
        stderr.getvalue(),
    ), repr(stderr.getvalue())


def test_the_server_never_imports_the_client_and_the_client_imports_only_the_standard_library():
    def imported(path: pathlib.Path) -> set[str]:
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {alias.name.partition('.')[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.partition('.')[0])
        return names

    server = [HERE / name for name in ('iss.py', 'storage.py', 'gunicorn.conf.py', 'healthcheck.py')]
    server += sorted((HERE / 'iss_server').rglob('*.py'))
    client = sorted((HERE / 'iss_client').rglob('*.py'))

    assert {str(path.relative_to(HERE)) for path in server if 'iss_client' in imported(path)} == set()
    outside = {name for path in client for name in imported(path)} - set(sys.stdlib_module_names) - {'iss_client'}
    assert outside == set()


# -- dupes ---------------------------------------------------------------------------


def _pictures(folder: pathlib.Path, count: int) -> list[pathlib.Path]:
    """``count`` PNGs of one colour each, two by two the same picture at two sizes (near-duplicates)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for number in range(count):
        colour = ('red', 'green', 'blue', 'white')[number // 2 % 4]
        path = folder / f'{number}.png'
        path.write_bytes(make_png(100 + 20 * (number % 2), 80 + 16 * (number % 2), colour))
        paths.append(path)
    return paths


def test_dupes_refuses_a_missing_path_in_one_line_with_the_usage_code(server, tmp_path):
    """A missing path was a FileNotFoundError traceback."""
    _pictures(tmp_path / 'here', 2)

    result = _command('--url', server.url, 'dupes', str(tmp_path / 'here'), str(tmp_path / 'gone'), cache=tmp_path)

    assert result.returncode == 2, result.stderr
    assert result.stderr == f'iss-client: {tmp_path / "gone"}: no such file or directory\n'


def test_dupes_skips_a_fifo_with_a_warning_and_counts_the_files_that_are_no_images(server, tmp_path):
    """A FIFO in the folder made it wait for a writer forever; the text files were skipped without a word."""
    folder = tmp_path / 'photos'
    _pictures(folder, 2)
    os.mkfifo(folder / 'pipe')
    (folder / 'notes.txt').write_text('not an image')
    (folder / 'table.csv').write_text('a,b\n')

    result = _command('--url', server.url, 'dupes', str(folder), cache=tmp_path, timeout=30)

    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith('group 1: 2 images'), result.stdout
    assert result.stderr.splitlines() == [
        f'iss-client: {folder / "pipe"}: not a regular file: skipped',
        'iss-client: dupes: 2 files skipped: no image (by its first bytes)',
    ]


def test_dupes_shows_the_same_groups_on_every_run_the_first_path_first(server, tmp_path):
    """With -j 8 a group's first member was whichever answer came first: five outputs in six runs."""
    folder = tmp_path / 'photos'
    folder.mkdir()
    for number, angle in enumerate((0, 40, 90)):
        picture = Image.linear_gradient('L').rotate(angle).convert('RGB')
        picture.paste((200, 30, 30), (40 + 30 * number, 60, 120, 140))
        for copy, (side, quality) in enumerate(((256, 95), (200, 60), (240, 30))):
            picture.resize((side, side)).save(folder / f'{number}-{copy}.jpg', quality=quality)

    runs = [_command('--url', server.url, 'dupes', '-j', '8', str(folder), cache=tmp_path) for _ in range(3)]

    assert [run.returncode for run in runs] == [0, 0, 0], runs[0].stderr
    assert runs[0].stdout == runs[1].stdout == runs[2].stdout
    groups = [block.splitlines()[1:] for block in runs[0].stdout.split('group ')[1:]]
    assert len(groups) == 3, runs[0].stdout
    for number, group in enumerate(sorted(groups, key=lambda lines: lines[0])):
        assert group[0] == f'   0  {folder / f"{number}-0.jpg"}'  # NOTE: the first in the paths' order


def test_dupes_names_a_file_the_server_cannot_read_as_an_image_without_push_advice(server, tmp_path):
    """It said "push it without --images-only", an option dupes does not have."""
    folder = tmp_path / 'photos'
    _pictures(folder, 2)
    (folder / 'cut.png').write_bytes(make_png(50, 50)[:20])  # NOTE: an image by its first bytes, no more

    result = _command('--url', server.url, 'dupes', str(folder), cache=tmp_path)

    assert result.returncode == 1
    assert result.stderr == f'iss-client: {folder / "cut.png"}: not an image: the server cannot read it as one\n'


def test_dupes_into_a_closed_pipe_ends_without_a_traceback(server, tmp_path):
    """``iss-client dupes | head`` printed a BrokenPipeError traceback once head had gone."""
    _pictures(tmp_path / 'photos', 8)
    environ = {name: value for name, value in os.environ.items() if not name.startswith('ISS_')}
    reader, writer = os.pipe()
    os.close(reader)  # NOTE: the reader is gone before the command writes a line, as head's after its lines
    try:
        done = subprocess.run(
            [sys.executable, '-m', 'iss_client', '--url', server.url, 'dupes', str(tmp_path / 'photos')],
            stdout=writer,
            stderr=subprocess.PIPE,
            text=True,
            cwd=HERE,
            env={**environ, 'XDG_CACHE_HOME': str(tmp_path)},
            timeout=60,
        )
    finally:
        os.close(writer)

    assert (done.returncode, done.stderr) == (1, '')


def test_dupes_without_the_token_it_needs_says_so_once(start, tmp_path):
    """Each file's 401 was a line of its own (and a request of its own)."""
    server = start(ISS_API_TOKEN='right')
    _pictures(tmp_path / 'photos', 12)

    result = _command('--url', server.url, 'dupes', str(tmp_path / 'photos'), cache=tmp_path)

    assert result.returncode == 1
    assert result.stderr.count('\n') == 1, result.stderr
    assert 'no token was given: pass --token or set $ISS_API_TOKEN' in result.stderr
