"""The one contract every storage driver keeps (as the OCI registry's ``testsuites``), and the house rules.

A driver joins the suite by adding a factory to ``DRIVERS``: every test below then
runs on it. The file driver runs on ``tmp_path``; the S3 driver on the session's
SeaweedFS, on a fresh prefix.
"""

from __future__ import annotations

import ast
import concurrent.futures
import hashlib
import io
import os
import pathlib
import urllib.request

import pytest

import storage
from iss_server import disk, index, maintenance
from iss_server.drivers import Driver, KeyNotFound
from iss_server.drivers.file import FileDriver
from iss_server.errors import StoreFailure, StoreUnavailable
from iss_testing import HERE
from iss_testing.servers import S3_KEY, S3_OBJECTS_KEY, S3_OBJECTS_SECRET, S3_SECRET


def _file_driver(request, tmp_path: pathlib.Path) -> tuple[Driver, disk.Layout]:
    layout = disk.Layout(str(tmp_path / 'data'))
    os.makedirs(layout.tmp)
    return FileDriver(layout, ('blobs', 'meta')), layout


def _s3_driver(request, tmp_path: pathlib.Path) -> tuple[Driver, disk.Layout]:
    from iss_server.drivers.s3 import S3Driver

    seaweedfs = request.getfixturevalue('seaweedfs')
    bucket, _, prefix = seaweedfs.new_store().removeprefix('s3://').partition('/')
    driver = S3Driver(bucket, prefix + '/', endpoint=seaweedfs.endpoint, access_key=S3_KEY, secret_key=S3_SECRET)
    layout = disk.Layout(str(tmp_path / 'scratch'))
    os.makedirs(layout.tmp)
    return driver, layout


#: Every driver, by name: how to make one (and the node's spool its sources are staged in).
DRIVERS = {'file': _file_driver, 's3': _s3_driver}


@pytest.fixture(params=sorted(DRIVERS))
def made(request, tmp_path):
    return DRIVERS[request.param](request, tmp_path)


@pytest.fixture
def driver(made) -> Driver:
    return made[0]


@pytest.fixture
def spool(made):
    """Stage bytes as the store does (a hashed temp file of the node's spool): a driver's source."""
    layout = made[1]
    staged: list[storage.StagedBlob] = []

    def stage(data: bytes) -> storage.StagedBlob:
        staged.append(storage.stage_file(layout, io.BytesIO(data)))
        return staged[-1]

    yield stage
    for source in staged:
        source.discard()


def put(driver: Driver, source, key: str, *, replace: bool = False) -> bool:
    """Put as the store does: in a group, synced, the source discarded once the group ended."""
    try:
        with driver.group() as group:
            stored = group.put(source, key, replace=replace)
            group.sync()
    finally:
        # NOTE: a spooled file is locked while staged: a file driver's new object is held until then.
        source.discard()
    return stored


def test_a_put_stores_the_bytes_under_the_key_unless_an_object_is_there(driver, spool):
    assert put(driver, spool(b'first'), 'blobs/aa/bb/one') is True
    assert put(driver, spool(b'second'), 'blobs/aa/bb/one') is False

    assert driver.read('blobs/aa/bb/one') == b'first'
    assert driver.stat('blobs/aa/bb/one').size == len(b'first')


def test_a_put_that_replaces_does_and_gives_a_new_version(driver, spool):
    put(driver, spool(b'first'), 'meta/aa/bb/one.json')
    before = driver.stat('meta/aa/bb/one.json').version

    assert put(driver, spool(b'{"second": 2}'), 'meta/aa/bb/one.json', replace=True) is True

    assert driver.read('meta/aa/bb/one.json') == b'{"second": 2}'
    assert driver.stat('meta/aa/bb/one.json').version != before


def test_bytes_that_do_not_hash_to_their_checksum_are_refused(driver, spool):
    if isinstance(driver, FileDriver):
        pytest.skip('the file driver links the very file the spool hashed as it wrote it')
    source = spool(b'the real bytes')
    source.digest = 'sha256:' + hashlib.sha256(b'other bytes').hexdigest()

    with pytest.raises(StoreFailure):
        put(driver, source, 'blobs/aa/bb/wrong')

    with pytest.raises(KeyNotFound):
        driver.stat('blobs/aa/bb/wrong')


def test_a_writer_is_invisible_until_committed_and_refuses_wrong_bytes(driver, monkeypatch):
    data = os.urandom(6 * 1024 * 1024)
    writer = driver.writer('blobs/aa/bb/big', hashlib.sha256(data).hexdigest())
    if writer is None:
        assert isinstance(driver, FileDriver), 'only a driver whose put links the spooled file has no writer'
        return
    monkeypatch.setattr('iss_server.drivers.s3._PART_BYTES', 5 * 1024 * 1024)
    for start in range(0, len(data), 1024 * 1024):
        writer.write(memoryview(data)[start : start + 1024 * 1024])

    with pytest.raises(KeyNotFound):
        driver.stat('blobs/aa/bb/big')
    assert list(driver.walk('blobs/')) == []
    assert writer.commit() is True

    assert driver.read('blobs/aa/bb/big') == data
    again = driver.writer('blobs/aa/bb/big', hashlib.sha256(data).hexdigest())
    again.write(memoryview(data))
    assert again.commit() is False, 'a writer never overwrites'
    wrong = driver.writer('blobs/aa/bb/small', hashlib.sha256(b'claimed').hexdigest())
    wrong.write(memoryview(b'other'))
    with pytest.raises(StoreFailure):
        wrong.commit()
    assert [key for key, _ in driver.walk('blobs/')] == ['blobs/aa/bb/big']
    assert driver.abandoned(0, dry_run=True) in ({}, {'multipart_uploads': 0})


def test_a_cancelled_writer_leaves_nothing(driver, monkeypatch):
    data = os.urandom(11 * 1024 * 1024)
    writer = driver.writer('blobs/aa/bb/cancelled', hashlib.sha256(data).hexdigest())
    if writer is None:
        return
    monkeypatch.setattr('iss_server.drivers.s3._PART_BYTES', 5 * 1024 * 1024)
    writer.write(memoryview(data))

    writer.cancel()
    writer.cancel()  # NOTE: a no-op the second time

    assert list(driver.walk('')) == []
    assert driver.abandoned(0, dry_run=True) in ({}, {'multipart_uploads': 0})


def test_an_object_opens_at_an_offset_with_the_stat_of_the_whole(driver, spool):
    put(driver, spool(b'0123456789'), 'blobs/aa/bb/digits')

    whole, stat = driver.open('blobs/aa/bb/digits')
    tail, tail_stat = driver.open('blobs/aa/bb/digits', 4)
    with whole, tail:
        assert (whole.read(), tail.read()) == (b'0123456789', b'456789')
    assert stat.size == tail_stat.size == 10
    assert stat.version == tail_stat.version == driver.stat('blobs/aa/bb/digits').version


def test_an_absent_key_is_a_typed_error_everywhere(driver):
    for operation in (driver.read, driver.open, driver.stat):
        with pytest.raises(KeyNotFound) as raised:
            operation('blobs/aa/bb/absent')
        assert raised.value.key == 'blobs/aa/bb/absent'
    assert driver.move('blobs/aa/bb/absent', 'quarantine/absent') is False


def test_a_removal_is_idempotent(driver, spool):
    put(driver, spool(b'x'), 'meta/aa/bb/gone.json')

    driver.remove('meta/aa/bb/gone.json')
    driver.remove('meta/aa/bb/gone.json')

    with pytest.raises(KeyNotFound):
        driver.stat('meta/aa/bb/gone.json')


def test_a_move_takes_the_object_to_its_new_key(driver, spool):
    put(driver, spool(b'moved'), 'blobs/aa/bb/here')

    assert driver.move('blobs/aa/bb/here', 'quarantine/here.1') is True

    assert driver.read('quarantine/here.1') == b'moved'
    with pytest.raises(KeyNotFound):
        driver.stat('blobs/aa/bb/here')


def test_a_walk_yields_every_key_under_a_prefix_with_its_size(driver, spool):
    for key, data in (('blobs/aa/bb/one', b'1'), ('blobs/cc/dd/two', b'22'), ('meta/aa/bb/one.json', b'{}')):
        put(driver, spool(data), key)

    assert sorted((key, stat.size) for key, stat in driver.walk('blobs/')) == [
        ('blobs/aa/bb/one', 1),
        ('blobs/cc/dd/two', 2),
    ]
    assert [key for key, _ in driver.walk('meta/')] == ['meta/aa/bb/one.json']
    assert list(driver.walk('quarantine/')) == []


def test_a_hold_answers_the_stat_or_none_and_an_absent_key_is_never_held(driver, spool):
    put(driver, spool(b'held'), 'blobs/aa/bb/held')

    with driver.group() as group:
        held = group.hold('blobs/aa/bb/held')
        try:
            absent = group.hold('blobs/aa/bb/absent')
        except KeyNotFound:
            absent = None

    assert held is None or held.size == 4, 'a driver without locks answers None'
    assert absent is None


def test_a_redirect_url_serves_the_bytes_or_there_is_none(driver, spool):
    put(driver, spool(b'served directly'), 'blobs/aa/bb/served')

    url = driver.redirect_url('blobs/aa/bb/served', seconds=60, overrides={'ResponseContentType': 'text/plain'})

    if url is None:
        assert isinstance(driver, FileDriver) and driver.proxy_path('blobs/aa/bb/served') == 'aa/bb/served'
        return
    with urllib.request.urlopen(url, timeout=10) as answer:
        assert (answer.read(), answer.headers['Content-Type']) == (b'served directly', 'text/plain')


def test_a_healthy_backend_passes_its_check_and_a_broken_one_says_so(driver, made, tmp_path):
    driver.check()

    if isinstance(driver, FileDriver):
        os.rmdir(tmp_path / 'data' / 'meta')
        broken: Driver = driver
    else:
        from iss_server.drivers.s3 import S3Driver

        # NOTE: a missing bucket is created (see the test below), unless the credentials may not.
        broken = S3Driver(
            'no-such-bucket',
            endpoint=driver._service['endpoint_url'],
            access_key=S3_OBJECTS_KEY,
            secret_key=S3_OBJECTS_SECRET,
        )
    with pytest.raises(StoreUnavailable) as failure:
        broken.check()
    if broken is not driver:
        assert 'the bucket no-such-bucket does not exist, and these credentials may not create it' in str(failure.value)


def test_a_missing_bucket_is_created_once_however_many_ask_at_once(request, caplog):
    from iss_server.drivers.s3 import S3Driver

    seaweedfs = request.getfixturevalue('seaweedfs')
    bucket = seaweedfs.new_bucket_name()

    def create() -> bool:
        driver = S3Driver(bucket, endpoint=seaweedfs.endpoint, access_key=S3_KEY, secret_key=S3_SECRET)
        return driver.create()

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        created = list(pool.map(lambda _: create(), range(8)))
    # NOTE: those that found it missing and created it at the same time each say so (SeaweedFS answers each 200).
    assert created.count(True) >= 1
    assert caplog.text.count(f'created the bucket {bucket}: it was missing') == created.count(True)
    assert create() is False
    S3Driver(bucket, endpoint=seaweedfs.endpoint, access_key=S3_OBJECTS_KEY, secret_key=S3_OBJECTS_SECRET).check()


# -- the house rules ----------------------------------------------------------------------------


def _imports(path: pathlib.Path) -> set[str]:
    """The modules a file imports (``from a import b`` counts as ``a`` and ``a.b``)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f'{node.module}.{alias.name}' for alias in node.names)
    return names


# NOTE: the modules that speak HTTP (see ARCHITECTURE.md); the store and the drivers import none of them.
WEB = {'iss', 'falcon'} | {
    f'iss_server.{name}'
    for name in (
        'auth', 'bodies', 'derivatives', 'doors', 'events', 'pages', 'presentation', 'receiving', 'responses',
        'telemetry', 'tus', 'webhooks',
    )
}  # fmt: skip


def test_a_driver_knows_bytes_and_keys_never_rows_meta_images_or_the_store():
    forbidden = {'storage', 'iss_server.index', 'iss_server.meta', 'iss_server.images'} | WEB
    drivers = sorted((HERE / 'iss_server' / 'drivers').glob('*.py'))

    assert [path.name for path in drivers] == ['__init__.py', 'file.py', 's3.py']
    for path in drivers:
        assert _imports(path) & forbidden == set(), path.name
        # NOTE: 650: s3.py grew past 600 lines when it learnt to create a missing bucket.
        assert len(path.read_text().splitlines()) < 650, path.name


def test_the_store_imports_no_web_module_and_chooses_a_backend_in_one_place():
    assert _imports(HERE / 'storage.py') & WEB == set()
    for path in [HERE / 'iss.py', HERE / 'storage.py', *sorted((HERE / 'iss_server').rglob('*.py'))]:
        text = path.read_text()
        chooses = 'settings.store ==' in text or 'settings.store !=' in text or 'isinstance(store,' in text
        assert not chooses or (path.name == 'storage.py' and text.count('settings.store ==') == 1), path


# -- the store over every driver: fsck, gc and the node's copies written once ------------------


@pytest.fixture
def store(made, tmp_path) -> storage.BlobStore:
    driver, layout = made
    (tmp_path / 'index').mkdir()
    store_index = index.open_index('sqlite', str(tmp_path / 'index'))
    return storage.BlobStore(driver, store_index, layout, node_copies=driver.verify_reads)


def commit(store: storage.BlobStore, data: bytes) -> str:
    staged = store.stage(io.BytesIO(data))
    store.commit(staged, {'kind': 'k', 'bytes': len(data), 'created_at': 1.0})
    return staged.digest


def test_fsck_finds_and_quarantines_a_corrupt_blob_with_its_meta_on_every_driver(store, made, spool):
    driver = made[0]
    good, bad = commit(store, b'good bytes'), commit(store, b'bad bytes')
    put(driver, spool(b'rot bytes'), storage.blob_key(bad[7:]), replace=True)

    found = maintenance.verify(store)
    repaired = maintenance.verify(store, repair=True)

    assert [(p['problem'], p['id'], p['repaired']) for p in found.problems] == [('corrupt', bad, False)]
    assert (found.blobs, repaired.clean) == (2, True)
    assert store.missing([good, bad]) == [bad] and store.index.get(bad[7:]) is None
    assert sorted(key.split('.')[0] for key, _ in driver.walk('quarantine/')) == [f'quarantine/{bad[7:]}'] * 2
    assert maintenance.verify(store).problems == []


def test_gc_removes_the_meta_and_row_of_a_blob_gone_on_every_driver(store, made):
    driver = made[0]
    kept, lost = commit(store, b'kept'), commit(store, b'lost')
    driver.remove(storage.blob_key(lost[7:]))

    dry = maintenance.collect_garbage(store, dry_run=True)
    removed = maintenance.collect_garbage(store)

    assert (dry['orphaned_meta'], dry['index_rows']) == (removed['orphaned_meta'], removed['index_rows']) == (1, 1)
    assert [hex_digest for hex_digest, _, _ in store.walk('meta')] == [kept[7:]]
    assert maintenance.collect_garbage(store)['orphaned_meta'] == 0


def test_a_small_remote_blob_is_copied_to_the_node_and_never_as_a_derivative(store, made, tmp_path):
    digest = commit(store, b'small and remote')

    with store.open(digest).file as first, store.open(digest).file as again:
        assert first.read() == again.read() == b'small and remote'

    scratch = pathlib.Path(made[1].root)
    copies = [p.relative_to(scratch).as_posix() for p in scratch.rglob('*') if p.is_file() and 'copies/' in str(p)]
    assert copies == ([f'copies/{digest[7:9]}/{digest[9:11]}/{digest[7:]}/blob'] if made[0].verify_reads else [])
    assert not (scratch / 'derived').exists() or not any((scratch / 'derived').rglob('*'))
    store.delete(digest)
    assert not any(p.is_file() for p in (scratch / 'copies').rglob('*'))
