"""``iss-client mirror`` and ``iss-client watch`` against real gunicorn servers (issue 26, the client side)."""

from __future__ import annotations

import io
import json
import pathlib
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

from iss_client import Client
from iss_client.mirror import ISS_KEYS, upload_fields
from iss_testing.data import make_png
from iss_testing.servers import free_port, wait_for

ADMIN = 'admin-token'
UPLOAD = 'upload-token'
TOKENS = {'ISS_API_TOKEN': UPLOAD, 'ISS_ADMIN_TOKEN': ADMIN}


#: ``python -m iss_client``, with Ctrl-C's KeyboardInterrupt as a person's terminal gives it. NOTE: a test run started
#: in the background of a script inherits SIGINT ignored, and Python then leaves it so: the watch never stopped.
CTRL_C_ABLE = (
    'import runpy, signal; signal.signal(signal.SIGINT, signal.default_int_handler); '
    "runpy.run_module('iss_client', run_name='__main__', alter_sys=True)"
)


def iss_client(*args: str, **popen) -> subprocess.Popen:
    """``python -m iss_client ARGS`` as its own process (killed by the test as a person's Ctrl-C or a crash would)."""
    return subprocess.Popen(
        [sys.executable, '-c', CTRL_C_ABLE, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        **popen,
    )


def mirror_args(source, destination, state: pathlib.Path, *more: str) -> list[str]:
    return ['mirror', source.url, destination.url, '--state', str(state), '--dst-token', UPLOAD,
            '--dst-admin-token', ADMIN, '--json', *more]  # fmt: skip


def crash(*servers) -> None:
    """Kill servers at once: a graceful stop waits up to 15 s for the long-poll the follower left behind."""
    for server in servers:
        server.kill()


def seed(client: Client, first: int, count: int) -> list[str]:
    """Upload ``count`` small artifacts (kind, meta, file name of their own) in batches of 100; return their ids."""
    ids = []
    for start in range(first, first + count, 100):
        numbers = range(start, min(start + 100, first + count))
        files = [(f'blob {number}'.encode(), f'b{number}.txt') for number in numbers]
        ids += [stored.id for stored in client.put_many(files, kind='frame', meta={'rig': 'r7'})]
    return ids


def contents(client: Client) -> dict[str, tuple]:
    """Each blob's id → (kind, file name, the uploader's meta), from both listings."""
    return {
        item['id']: (item.get('kind'), item.get('filename'), upload_fields(item)['meta'])
        for door in ('images', 'artifacts')
        for item in client.list(door)
    }


def assert_same(source: Client, destination: Client) -> None:
    listed = contents(source)
    assert contents(destination) == listed
    for blob_id in list(listed)[:: max(1, len(listed) // 50)]:  # NOTE: the bytes of a sample, verified by get
        assert content(destination, blob_id) == content(source, blob_id)


def content(client: Client, blob_id: str) -> bytes:
    sink = io.BytesIO()
    client.get(blob_id, sink)
    return sink.getvalue()


@pytest.mark.slow
def test_a_mirror_killed_mid_run_resumes_and_converges_with_changes_going_on(start, tmp_path):
    src, dst = start(tmp_path / 'src', **TOKENS), start(tmp_path / 'dst', **TOKENS)
    source, source_admin = Client(src.url, UPLOAD), Client(src.url, ADMIN)
    destination = Client(dst.url, UPLOAD)
    ids = seed(source, 0, 2000)
    images = [source.put(make_png(8 + n, 8), filename=f'p{n}.png').id for n in range(5)]
    state = tmp_path / 'mirror.json'

    running = iss_client(*mirror_args(src, dst, state, '--follow', '-j', '2'))
    changing = threading.Thread(target=lambda: [seed(source, 5000, 300), *map(source_admin.delete, ids[:200])])
    changing.start()
    wait_for(lambda: destination.stats()['count'] >= 400, seconds=60, message='the mirror copying')
    running.send_signal(signal.SIGKILL)
    running.wait(10)
    assert destination.stats()['count'] < len(ids)  # NOTE: killed in its full pass
    changing.join()
    assert json.loads(state.read_text())['cursor']

    for blob_id in [*ids[200:300], images[0]]:  # NOTE: changes while no mirror runs
        source_admin.delete(blob_id)
    seed(source, 3000, 50)
    lacking = set(contents(source)) - set(contents(destination))
    resumed = iss_client(*mirror_args(src, dst, state))
    out, err = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, err
    assert json.loads(out)['copied'] == len(lacking)  # NOTE: a resume sends only what is missing
    assert_same(source, destination)

    again = subprocess.run(
        [sys.executable, '-m', 'iss_client', *mirror_args(src, dst, tmp_path / 'fresh.json')],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout) == {'events': 0, 'copied': 0, 'bytes': 0, 'deleted': 0}


def test_mirror_follows_and_tells_its_lag_in_metrics(start, tmp_path):
    src, dst = start(tmp_path / 'src', **TOKENS), start(tmp_path / 'dst', **TOKENS)
    source, destination = Client(src.url, UPLOAD), Client(dst.url, UPLOAD)
    first = source.put(b'before', kind='doc', meta={'page': 1}, filename='a.txt').id
    port = free_port()
    running = iss_client(*mirror_args(src, dst, tmp_path / 'state.json', '--follow', '--metrics-port', str(port)))
    try:
        wait_for(lambda: not destination.missing([first]), seconds=20, message='the first blob copied')
        later = source.put(b'after', kind='doc', filename='b.txt').id
        wait_for(lambda: not destination.missing([later]), seconds=20, message='a change followed')
        Client(src.url, ADMIN).delete(first)
        wait_for(lambda: destination.missing([first]) == [first], seconds=20, message='a delete followed')
        url = f'http://127.0.0.1:{port}/metrics'
        # NOTE: the counters move once the page's last change is applied, a moment after the delete is seen
        wait_for(lambda: 'iss_client_mirror_events_total 2\n' in read(url), message='both changes counted')
        metrics = read(url)
        assert 'iss_client_mirror_blobs_deleted_total 1' in metrics
        assert 'iss_client_mirror_blobs_copied_total 2' in metrics
        lag = float(next(line.split()[1] for line in metrics.splitlines() if line.startswith('iss_client_mirror_lag')))
        assert 0 <= lag < 10
    finally:
        running.send_signal(signal.SIGTERM)  # NOTE: as systemd stops it: the clean stop of Ctrl-C
        _, err = running.communicate(timeout=20)
    assert running.returncode == 1 and 'resume with: iss-client mirror' in err
    assert_same(source, destination)
    crash(src, dst)


def read(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as answer:
        return answer.read().decode()


def test_an_expired_cursor_lists_the_store_anew_of_a_private_source(start, tmp_path):
    src = start(tmp_path / 'src', ISS_READ_TOKEN='read-token', **TOKENS)
    dst = start(tmp_path / 'dst', **TOKENS)
    source, destination = Client(src.url, UPLOAD), Client(dst.url, UPLOAD)
    kept = source.put(b'kept', kind='doc').id
    stale = destination.put(b'only on the destination', kind='doc').id
    # NOTE: a cursor of another index (as after a rebuild): the source answers 410
    state = tmp_path / 'state.json'
    state.write_text(json.dumps({'cursor': destination.events('now').next, 'listed': True}))
    done = subprocess.run(
        [sys.executable, '-m', 'iss_client', *mirror_args(src, dst, state, '--src-token', 'read-token')],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert 'listing anew' in done.stderr
    assert destination.missing([kept, stale]) == [stale]
    assert_same(source, destination)


def test_watch_prints_each_change_as_a_json_line_and_runs_exec_per_change(server, tmp_path):
    client = Client(server.url)
    ran = tmp_path / 'ran.txt'
    cursor = client.events('now').next
    watching = iss_client(
        '--url', server.url, 'watch', '--after', cursor, '--artifacts',
        '--exec', f'echo "$ISS_EVENT_TYPE $ISS_EVENT_ID $ISS_EVENT_KIND $(wc -c)" >> {ran}',
    )  # fmt: skip
    try:
        first = client.put(b'one', kind='frame').id
        client.put(make_png(), filename='p.png')  # NOTE: an image: not watched
        second = client.put(b'two', kind='model').id
        lines = [json.loads(watching.stdout.readline()) for _ in range(2)]
        assert [(line['type'], line['item']['id']) for line in lines] == [('created', first), ('created', second)]
        wait_for(lambda: ran.exists() and len(ran.read_text().splitlines()) == 2, message='--exec run per change')
    finally:
        watching.send_signal(signal.SIGINT)
        _, err = watching.communicate(timeout=20)
    assert watching.returncode == 0, err
    runs = [line.split() for line in ran.read_text().splitlines()]
    assert [run[:3] for run in runs] == [['created', first, 'frame'], ['created', second, 'model']]
    assert int(runs[0][3]) == len(json.dumps(lines[0])) + 1  # NOTE: the event's JSON line on stdin
    assert 'go on with --after' in err
    crash(server)


def test_watch_goes_on_after_the_server_restarts(start, tmp_path):
    server = start(tmp_path / 'data')
    cursor = Client(server.url).events('now').next
    watching = iss_client('--url', server.url, 'watch', '--after', cursor)
    try:
        time.sleep(0.5)
        port = server.port
        server.kill()  # NOTE: as a crash; a graceful stop would wait for the watch's long-poll
        server = start(tmp_path / 'data', port=port)
        blob = Client(f'http://127.0.0.1:{port}').put(b'after the restart', kind='doc').id
        assert json.loads(watching.stdout.readline())['item']['id'] == blob
    finally:
        watching.send_signal(signal.SIGINT)
        watching.communicate(timeout=20)
    crash(server)


def test_the_mirror_knows_the_keys_iss_writes_itself_as_the_server_does():
    # NOTE: the client cannot import the server; this keeps its copy of the list equal to the server's.
    from iss_server import meta

    assert set(ISS_KEYS) == set(meta.RESERVED_KEYS)
