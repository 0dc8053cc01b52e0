"""Nothing half-written, ever visible (issue 24): the commit order with intents, and the reconciler.

An upload records an intent in the index before it writes, and removes it in the
transaction that inserts its row; a delete records one with the removal of its row.
Whatever stops a writer in between (SIGKILL, an index or a bucket that fails) leaves
the intent, and one pass of the reconciler makes the content complete (blob, meta,
row: served, listed, counted) or absent from every view. The half-written states are
made here with the store's own calls, as a writer cut off at that point leaves them;
the slow tests cut real writers off (SIGKILL of a worker mid-upload) and run the
cluster's concurrent uploads of the same content.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import http.client
import json
import os
import re
import threading
import time

import psycopg
import pytest
import webtest

import iss
from iss_server import index, maintenance, reconciler
from iss_server.config import Settings
from iss_testing.servers import Gunicorn, free_port, wait_for
from storage import BlobStore, blob_key, meta_key, open_store

pytestmark = pytest.mark.both_stores

# NOTE: an hour ago: older than any grace period.
LONG_AGO = time.time() - 3600


@pytest.fixture
def store(tmp_path, store_backend) -> BlobStore:
    settings = Settings(data_dir=str(tmp_path / 'data'), reconcile_interval=0, **store_backend)
    store = open_store(settings)
    store.start()
    return store


@pytest.fixture
def client(store) -> webtest.TestApp:
    settings = Settings(data_dir=store.root, reconcile_interval=0, admin_token='admin')
    return webtest.TestApp(iss.create_app(settings, store))


def upload(client: webtest.TestApp, data: bytes, kind: str = 'half') -> str:
    return client.post(f'/artifacts?kind={kind}', data, {'Content-Type': 'application/octet-stream'}).json[
        'artifact_id'
    ]


def one_pass(store: BlobStore, **options) -> dict[str, int]:
    """One reconciler pass, as a node's reconciler makes it (its lease, then :func:`reconciler.reconcile`)."""
    return reconciler.Reconciler(store, interval=1, grace=60, sweep_every=1, **options).run_once() or {}


def listed(client: webtest.TestApp) -> list[str]:
    return [item['id'] for item in client.get('/artifacts').json['items']]


def assert_complete(client: webtest.TestApp, store: BlobStore, blob_id: str, data: bytes) -> None:
    """Served, described, listed, counted; its blob and meta are stored and no intent is left."""
    assert client.get(f'/artifacts/{blob_id}').body == data
    assert client.get(f'/artifacts/{blob_id}/meta').json['kind'] == 'half'
    assert blob_id in listed(client)
    assert client.get('/stats').json['kinds']['half']['count'] >= 1
    assert store.is_stored(blob_id[7:]) and store.has_meta(blob_id[7:])
    assert store.index.intents(hex_digest=blob_id[7:]) == []


def assert_absent(client: webtest.TestApp, store: BlobStore, blob_id: str, kind: str = 'half') -> None:
    """Not served, described, listed nor counted (its ``kind``); neither blob nor meta stored, no intent left."""
    client.get(f'/artifacts/{blob_id}', status=404)
    client.get(f'/artifacts/{blob_id}/meta', status=404)
    assert blob_id not in listed(client)
    assert kind not in client.get('/stats').json['kinds']
    assert not store.is_stored(blob_id[7:]) and not store.has_meta(blob_id[7:])
    assert store.index.intents(hex_digest=blob_id[7:]) == []


# -- the commit order ---------------------------------------------------------------------


def test_an_upload_leaves_no_intent_and_its_row_is_there(client, store):
    blob_id = upload(client, b'whole')

    assert_complete(client, store, blob_id, b'whole')
    assert store.index.intents(before=time.time() + 1) == []


def test_an_upload_while_the_index_is_down_answers_503_and_stores_nothing(client, store):
    working, store.index = store.index, index.PostgresIndex(f'postgresql://iss@127.0.0.1:{free_port()}/none')
    try:
        client.post('/artifacts?kind=half', b'never stored', {'Content-Type': 'text/plain'}, status=503)
        client.put(f'/artifacts/sha256:{hashlib.sha256(b"put").hexdigest()}?kind=half', b'put', status=503)
    finally:
        store.index = working

    for data in (b'never stored', b'put'):
        assert_absent(client, store, 'sha256:' + hashlib.sha256(data).hexdigest())


def test_a_delete_while_the_index_is_down_answers_503_and_changes_nothing(client, store):
    blob_id = upload(client, b'kept whole')
    working, store.index = store.index, index.PostgresIndex(f'postgresql://iss@127.0.0.1:{free_port()}/none')
    try:
        client.delete(f'/artifacts/{blob_id}', headers={'Authorization': 'Bearer admin'}, status=503)
    finally:
        store.index = working

    assert_complete(client, store, blob_id, b'kept whole')


# -- one pass settles each half-written state -------------------------------------------


def test_a_put_cut_off_after_its_blob_and_meta_is_completed(client, store):
    blob_id = upload(client, b'blob and meta, no row')
    store.index.remove(blob_id[7:])  # NOTE: as a writer killed before its last transaction leaves it
    store.index.record_intents('put', [blob_id[7:]], LONG_AGO)
    assert blob_id not in listed(client)

    assert one_pass(store) == {'put_completed': 1}
    assert_complete(client, store, blob_id, b'blob and meta, no row')


def test_a_put_cut_off_before_its_meta_is_undone(client, store):
    blob_id = upload(client, b'blob only')
    store.index.remove(blob_id[7:])
    store.remove_meta(blob_id[7:])
    store.index.record_intents('put', [blob_id[7:]], LONG_AGO)
    assert client.get(f'/artifacts/{blob_id}').body == b'blob only'  # NOTE: the half-written state, served by id

    assert one_pass(store) == {'put_undone': 1}
    assert_absent(client, store, blob_id)


def test_a_put_cut_off_before_its_blob_leaves_nothing(client, store):
    hex_digest = hashlib.sha256(b'nothing written').hexdigest()
    store.index.record_intents('put', [hex_digest], LONG_AGO)

    assert one_pass(store) == {'put_undone': 1}
    assert_absent(client, store, 'sha256:' + hex_digest)


def test_a_delete_cut_off_after_its_meta_is_finished(client, store):
    blob_id = upload(client, b'deleted half-way')
    store.index.begin_delete(blob_id[7:], LONG_AGO)
    store.remove_meta(blob_id[7:])  # NOTE: the backend failed before the blob went (the issue's DELETE)

    assert one_pass(store) == {'delete_completed': 1}
    assert_absent(client, store, blob_id)


def test_a_delete_whose_content_was_uploaded_again_keeps_the_new_upload(client, store):
    blob_id = upload(client, b'back again')
    store.index.begin_delete(blob_id[7:], LONG_AGO)
    store.remove_meta(blob_id[7:])
    assert upload(client, b'back again') == blob_id

    assert one_pass(store) == {'intent_dropped': 1}
    assert_complete(client, store, blob_id, b'back again')


def test_a_live_writers_intent_is_left_to_it(client, store):
    blob_id = upload(client, b'in flight')
    store.index.remove(blob_id[7:])
    store.index.record_intents('put', [blob_id[7:]], time.time())

    assert one_pass(store) == {}
    assert len(store.index.intents(hex_digest=blob_id[7:])) == 1


def test_an_old_intent_waits_while_another_writer_of_its_content_is_at_work(client, store):
    blob_id = upload(client, b'two writers')
    store.index.remove(blob_id[7:])
    store.remove_meta(blob_id[7:])
    store.index.record_intents('put', [blob_id[7:]], LONG_AGO)
    store.index.record_intents('put', [blob_id[7:]], time.time())

    assert one_pass(store) == {}
    assert store.is_stored(blob_id[7:])


def test_an_undo_marks_itself_then_gives_way_to_a_writer_that_began_meanwhile(client, store):
    """On a bucket nothing holds a blob: a writer that began after the undo's first looks found the leavings, wrote
    its row, and the undo then removed its blob (a 201 whose bytes were gone, in the fault suite's frozen S3)."""
    blob_id = upload(client, b'left half-written')
    store.index.remove(blob_id[7:])
    store.remove_meta(blob_id[7:])
    [left] = store.index.record_intents('put', [blob_id[7:]], LONG_AGO)
    store.index.record_intents('put', [blob_id[7:]], time.time())  # NOTE: the writer, after the undo's looks

    assert store._may_remove(store.index.intents(hex_digest=blob_id[7:])[0]) is False
    assert [(intent.id, intent.op, intent.alive_at) for intent in store.index.intents(hex_digest=blob_id[7:])][0] == (
        left,
        'put',
        0.0,
    ), 'made old again: a later pass settles it'
    assert store.is_stored(blob_id[7:])


def test_an_undo_with_no_writer_at_work_says_so_before_it_removes(client, store):
    blob_id = upload(client, b'left alone')
    store.index.remove(blob_id[7:])
    store.remove_meta(blob_id[7:])
    store.index.record_intents('put', [blob_id[7:]], LONG_AGO)

    assert store._may_remove(store.index.intents(hex_digest=blob_id[7:])[0]) is True
    [marked] = store.index.intents(hex_digest=blob_id[7:])
    assert marked.op == 'undo' and marked.alive_at > time.time() - 5
    assert store.index.removals([blob_id[7:]], time.time() - 60) == [blob_id[7:]]


def test_an_upload_waits_while_a_removal_of_its_content_is_at_work(client, store, store_backend):
    """What makes the undo's mark a guard: a writer on a bucket (no lock) looks for it after recording its intent."""
    data = b'removed while uploaded again'
    hex_digest = hashlib.sha256(data).hexdigest()
    [removal] = store.index.record_intents('put', [hex_digest], time.time())
    store.index.mark_intent(removal, 'undo', time.time())
    answers: list[int] = []
    uploader = threading.Thread(
        target=lambda: answers.append(
            client.post('/artifacts?kind=half', data, {'Content-Type': 'application/octet-stream'}).status_int
        )
    )
    uploader.start()
    time.sleep(0.5)
    waited = not answers
    store.index.drop_intent(removal)
    uploader.join(10)

    # NOTE: a file store holds the blob from its check to its row (a removal takes the same lock): no wait
    assert waited is bool(store_backend), answers
    assert answers == [201]
    assert_complete(client, store, 'sha256:' + hex_digest, data)


def test_the_sweep_indexes_a_whole_orphan_and_removes_the_rest(client, store):
    """Objects with neither row nor intent (a PUT the bucket took after its writer gave up)."""
    whole = upload(client, b'blob and meta')
    store.index.remove(whole[7:])
    meta_only = upload(client, b'meta only')
    store.index.remove(meta_only[7:])
    blob_only = upload(client, b'blob only')
    store.index.remove(blob_only[7:])
    store.remove_meta(blob_only[7:])
    _remove_blob(store, meta_only[7:])

    counts = reconciler.reconcile(store, grace=60, orphan_grace=0)

    assert counts == {'orphan_indexed': 1, 'orphan_quarantined': 1, 'orphaned_meta': 1}
    assert_complete(client, store, whole, b'blob and meta')
    for blob_id in (meta_only, blob_only):
        client.get(f'/artifacts/{blob_id}', status=404)
        assert not store.is_stored(blob_id[7:]) and not store.has_meta(blob_id[7:])
    assert listed(client) == [whole]
    assert client.get('/stats').json['count'] == 1


def test_the_sweep_leaves_young_objects_and_a_store_being_indexed_alone(client, store):
    young = upload(client, b'young')
    store.index.remove(young[7:])

    assert reconciler.reconcile(store, grace=60) == {}
    store.index.mark_complete(False)
    assert reconciler.reconcile(store, grace=60, orphan_grace=0) == {}
    assert store.is_stored(young[7:]) and store.has_meta(young[7:])


def test_one_node_at_a_time_makes_a_pass(store):
    first = reconciler.Reconciler(store, interval=1, grace=60, sweep_every=0)
    second = reconciler.Reconciler(store, interval=1, grace=60, sweep_every=0)

    assert first.run_once() == {}
    assert second.run_once() is None  # NOTE: the first holds the lease
    assert first.run_once() == {}


def test_fsck_reports_and_repairs_and_gc_settles_through_the_same_pass(client, store):
    cut_off = upload(client, b'fsck finds it')
    store.index.remove(cut_off[7:])
    store.index.record_intents('put', [cut_off[7:]], LONG_AGO)

    found = maintenance.verify(store)
    assert [problem['problem'] for problem in found.problems if problem['problem'] == 'put_completed'] == [
        'put_completed'
    ]
    assert not found.clean
    assert maintenance.verify(store, repair=True).clean
    assert_complete(client, store, cut_off, b'fsck finds it')

    deleted = upload(client, b'gc finishes it', kind='gone')
    store.index.begin_delete(deleted[7:], LONG_AGO)
    assert maintenance.collect_garbage(store, dry_run=True)['delete_completed'] == 1
    assert store.is_stored(deleted[7:])
    assert maintenance.collect_garbage(store)['delete_completed'] == 1
    assert_absent(client, store, deleted, kind='gone')


def test_a_commit_that_outlasted_the_grace_period_is_refused(client, store):
    hex_digest = hashlib.sha256(b'slow').hexdigest()
    intent_ids = store.index.record_intents('put', [hex_digest], time.time())
    store.index.drop_intent(intent_ids[0])  # NOTE: what a reconciler that took the writer for dead does

    with pytest.raises(Exception, match='outlasted ISS_RECONCILE_GRACE'):
        store.index.finish_puts([index.row_for(hex_digest, {'kind': 'half'}, time.time(), 4)], intent_ids)
    assert store.index.get(hex_digest) is None


def _remove_blob(store: BlobStore, hex_digest: str) -> None:
    """Remove a blob's bytes alone (what an operator's mistake or a lost disk leaves: its meta without it)."""
    store._driver.remove(blob_key(hex_digest))
    assert store._driver.stat(meta_key(hex_digest))


# -- real processes ---------------------------------------------------------------------


@pytest.fixture
def nodes(s3_settings, tmp_path):
    """Gunicorn nodes on one bucket and one PostgreSQL, reconciling every second after a grace of three."""
    started = []

    def start(name: str, **env: str) -> Gunicorn:
        settings = {'ISS_RECONCILE_INTERVAL': '1', 'ISS_RECONCILE_GRACE': '3', 'ISS_ADMIN_TOKEN': 'admin'}
        node = Gunicorn(tmp_path / name, tmp_path / f'{name}.log', **{**s3_settings, **settings, **env})
        started.append(node)
        return node

    yield start
    for node in started:
        node.stop()


def intents_in(url: str) -> list[tuple]:
    with psycopg.connect(url, autocommit=True) as db:
        return db.execute('SELECT hex, op, at FROM intents').fetchall()


def fixed(node: Gunicorn, kind: str) -> float:
    text = node.request('GET', '/metrics')[2].decode()
    match = re.search(rf'^iss_reconcile_fixed_total{{kind="{kind}"}} (\S+)$', text, re.MULTILINE)
    return float(match[1]) if match else 0.0


@pytest.mark.slow
def test_a_worker_killed_mid_upload_leaves_nothing_visible_after_one_pass(nodes, s3_settings):
    a, b = nodes('a'), nodes('b')
    size, chunk = 192 * 1024 * 1024, os.urandom(1024 * 1024)
    blob_id = 'sha256:' + hashlib.sha256(chunk * (size // len(chunk))).hexdigest()

    def send() -> None:
        conn = http.client.HTTPConnection('127.0.0.1', a.port, timeout=120)
        try:
            conn.putrequest('POST', '/artifacts?kind=half')
            conn.putheader('Content-Length', str(size))
            conn.endheaders()
            for _ in range(size // len(chunk)):
                conn.send(chunk)
            conn.getresponse()
        except OSError:
            pass  # NOTE: the worker is killed under it

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    # NOTE: killed once its intent is recorded: its bytes are going up to the bucket
    wait_for(lambda: intents_in(s3_settings['ISS_INDEX']), seconds=120, message='the upload recording its intent')
    for worker in a.processes()[1:]:
        os.kill(worker, 9)
    sender.join(30)

    wait_for(lambda: not intents_in(s3_settings['ISS_INDEX']), seconds=30, message='the reconciler settling it')
    for node in (a, b):
        assert node.request('GET', f'/artifacts/{blob_id}')[0] == 404
        assert node.request('GET', f'/artifacts/{blob_id}/meta')[0] == 404
        assert json.loads(node.request('GET', '/artifacts')[2])['items'] == []
        assert json.loads(node.request('GET', '/stats')[2])['count'] == 0
    assert fixed(a, 'put_undone') + fixed(b, 'put_undone') == 1


@pytest.mark.slow
def test_a_delete_cut_off_by_the_bucket_is_finished_by_a_node(nodes, s3_settings):
    a, b = nodes('a'), nodes('b')
    data = os.urandom(64 * 1024)
    status, _, body = a.request('POST', '/artifacts?kind=half', data)
    blob_id = 'sha256:' + hashlib.sha256(data).hexdigest()
    assert status == 201
    # NOTE: what a DELETE whose bucket failed after the row leaves: the intent, the blob, no meta
    store = open_store(Settings.from_env({**s3_settings, 'ISS_DATA': str(a.data_dir)}))
    store.index.begin_delete(blob_id[7:], time.time())
    store.remove_meta(blob_id[7:])

    wait_for(lambda: not intents_in(s3_settings['ISS_INDEX']), seconds=30, message='the reconciler settling it')
    for node in (a, b):
        assert node.request('GET', f'/artifacts/{blob_id}')[0] == 404
        assert json.loads(node.request('GET', '/stats')[2])['count'] == 0
    assert not store.is_stored(blob_id[7:])
    assert fixed(a, 'delete_completed') + fixed(b, 'delete_completed') == 1


@pytest.mark.slow
@pytest.mark.parametrize('size_mib', [8, 20])
def test_sixteen_uploads_of_the_same_large_content_through_two_nodes_all_succeed(nodes, s3_settings, size_mib):
    """One 201 and fifteen 200s, whether by PUT (parts sent as they arrive) or POST; one writer sends the bytes."""
    a, b = nodes('a', ISS_THREADS='16'), nodes('b', ISS_THREADS='16')
    data = os.urandom(size_mib * 1024 * 1024)
    blob_id = 'sha256:' + hashlib.sha256(data).hexdigest()
    start = threading.Barrier(16)

    def send(node_and_method: tuple[Gunicorn, str]) -> int | str:
        node, method = node_and_method
        path = f'/artifacts/{blob_id}?kind=half' if method == 'PUT' else '/artifacts?kind=half'
        start.wait()
        try:
            return node.request(method, path, data, {'Content-Type': 'application/octet-stream'})[0]
        except OSError as exc:
            return repr(exc)

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        statuses = list(pool.map(send, [(a, 'PUT'), (b, 'PUT'), (a, 'POST'), (b, 'POST')] * 4))

    assert sorted(map(str, statuses)) == ['200'] * 15 + ['201'], statuses
    assert intents_in(s3_settings['ISS_INDEX']) == []
    assert b.request('GET', f'/artifacts/{blob_id}')[2] == data
    assert json.loads(a.request('GET', '/stats')[2])['count'] == 1
