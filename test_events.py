"""The change feed, ``GET /events``: what it tells, in which order, from which cursor, and to whom."""

from __future__ import annotations

import http.client
import json
import random
import threading
import time
import urllib.parse
from email.message import Message

import pytest
import webtest

import iss
import storage
from iss_server import index
from iss_server.config import ConfigError, Settings
from iss_server.events import Events
from iss_testing.cli import upload_image
from iss_testing.data import make_png
from iss_testing.servers import wait_for

ADMIN = {'Authorization': 'Bearer admin'}


@pytest.fixture
def feed_client(tmp_path):
    """A client of a file store that deletes with the admin token, and the store (to prune its events)."""
    settings = Settings(data_dir=str(tmp_path / 'data'), admin_token='admin')
    store = storage.open_store(settings)
    store.start()
    return webtest.TestApp(iss.create_app(settings, store)), store


def upload_artifact(client, data: bytes, **meta) -> str:
    query = urllib.parse.urlencode({'kind': 'frame', 'meta': json.dumps(meta)})
    return client.post(f'/artifacts?{query}', upload_files=[('file', 'f.bin', data)]).json['artifact_id']


def test_feed_tells_creations_and_deletions_in_commit_order(feed_client):
    client, _ = feed_client
    start = client.get('/events').json
    assert start['events'] == []

    image = upload_image(client, make_png()).json['image_id']
    frame = upload_artifact(client, b'frame one', camera='rig-7')
    client.delete(f'/images/{image}', headers=ADMIN)
    page = client.get('/events', {'after': start['next']}).json

    assert [(event['type'], event['item']['id']) for event in page['events']] == [
        ('created', image),
        ('created', frame),
        ('deleted', image),
    ]
    created_frame = page['events'][1]
    assert created_frame['item']['kind'] == 'frame'
    assert created_frame['item']['camera'] == 'rig-7'
    assert created_frame['item']['bytes'] == len(b'frame one')
    assert page['events'][0]['item']['filename'] == 'x.png'
    assert abs(created_frame['time'] - time.time()) < 60
    assert page['next'] == page['events'][-1]['cursor']
    assert len({event['cursor'] for event in page['events']}) == 3
    # NOTE: the same frame stored again is no change: no event
    upload_artifact(client, b'frame one', camera='rig-7')
    assert client.get('/events', {'after': page['next']}).json == {'events': [], 'next': page['next']}
    assert client.get('/events', {'after': page['next']}).headers['Cache-Control'] == 'no-store'


def test_limit_pages_through_the_feed_without_gaps_or_repeats(feed_client):
    client, _ = feed_client
    ids = [upload_artifact(client, f'frame {n}'.encode()) for n in range(5)]
    seen, cursor = [], None
    for _ in range(10):
        page = client.get('/events', {'limit': 2, **({'after': cursor} if cursor else {})}).json
        assert len(page['events']) <= 2
        if not page['events']:
            assert page['next'] == cursor
            break
        seen += [event['item']['id'] for event in page['events']]
        cursor = page['next']
    assert seen == ids


def test_after_now_starts_at_the_latest_change(feed_client):
    client, _ = feed_client
    upload_artifact(client, b'before')
    now = client.get('/events', {'after': 'now'}).json
    assert now['events'] == []
    later = upload_artifact(client, b'after')
    assert [event['item']['id'] for event in client.get('/events', {'after': now['next']}).json['events']] == [later]


def test_wait_answers_as_soon_as_a_change_lands(feed_client):
    client, _ = feed_client
    cursor = client.get('/events', {'after': 'now'}).json['next']
    uploaded: list[str] = []
    writer = threading.Timer(0.5, lambda: uploaded.append(upload_artifact(client, b'late frame')))
    writer.start()
    started = time.monotonic()
    page = client.get('/events', {'after': cursor, 'wait': 20}).json
    writer.join()
    assert time.monotonic() - started < 5
    assert [event['item']['id'] for event in page['events']] == uploaded


def test_wait_without_a_change_answers_the_same_cursor_after_the_wait(feed_client):
    client, _ = feed_client
    cursor = client.get('/events').json['next']
    started = time.monotonic()
    assert client.get('/events', {'after': cursor, 'wait': 1}).json == {'events': [], 'next': cursor}
    assert 0.9 < time.monotonic() - started < 5


@pytest.mark.parametrize(
    'query',
    [
        {'wait': '61'},
        {'wait': '-1'},
        {'limit': '0'},
        {'limit': '1001'},
        # NOTE: ASCII digits only (Falcon's get_param_as_int takes each of these as 3 or 10)
        {'wait': '\u0663'},
        {'limit': '\u0663'},
        {'wait': ' 3'},
        {'limit': '1_0'},
        {'limit': '+3'},
    ],
)
def test_bounds_of_wait_and_limit(feed_client, query):
    client, _ = feed_client
    assert client.get('/events', query, status=400).json['status'] == 400


@pytest.mark.parametrize('tail', ['', '.x', '.1.2', '.\u00b2', '.-1', '.1e3', '.' + '9' * 20])
def test_a_cursor_not_handed_out_is_refused(feed_client, tail):
    client, _ = feed_client
    epoch = client.get('/events').json['next'].split('.')[0]  # NOTE: of this index, so only the tail is wrong
    assert client.get('/events', {'after': epoch + tail}, status=400).json['title'] == 'Invalid cursor'


def test_a_cursor_ahead_of_the_feed_is_refused(feed_client):
    client, store = feed_client
    upload_artifact(client, b'one')
    head = client.get('/events', {'after': 'now'}).json['next']
    epoch, seq = head.split('.')
    for ahead in (f'{epoch}.{int(seq) + 1}', f'{epoch}.999999'):
        assert client.get('/events', {'after': ahead}, status=400).json['title'] == 'Invalid cursor'
        assert client.get('/events', {'after': ahead, 'wait': 1}, status=400).json['title'] == 'Invalid cursor'
        headers = {'Accept': 'text/event-stream', 'Last-Event-ID': ahead}
        assert client.get('/events', headers=headers, status=400).content_type == 'application/json'
    assert client.get('/events', {'after': head}).json == {'events': [], 'next': head}
    # NOTE: the newest position handed out stays valid once pruned, and is still the limit
    assert store.index.prune_events(time.time() + 1) == 1
    assert client.get('/events', {'after': head}).json == {'events': [], 'next': head}
    client.get('/events', {'after': f'{epoch}.{int(seq) + 1}'}, status=400)
    two = upload_artifact(client, b'two')
    assert [event['item']['id'] for event in client.get('/events', {'after': head}).json['events']] == [two]


def test_a_cursor_older_than_the_retention_answers_410(feed_client):
    client, store = feed_client
    old = client.get('/events').json['next']
    upload_artifact(client, b'one')
    upload_artifact(client, b'two')
    kept = client.get('/events', {'after': old, 'limit': 1}).json['next']  # NOTE: after "one"
    assert store.index.prune_events(time.time() + 1) == 2

    gone = client.get('/events', {'after': old}, status=410).json
    assert gone['title'] == 'Cursor expired' and 'after=now' in gone['description']
    assert client.get('/events', {'after': kept}, status=410).json['status'] == 410
    # NOTE: from the start, a new follower gets what is kept, and the pruned cursor is where it begins
    start = client.get('/events').json
    assert start['events'] == []
    three = upload_artifact(client, b'three')
    assert [event['item']['id'] for event in client.get('/events', {'after': start['next']}).json['events']] == [three]


def test_a_cursor_of_an_index_since_rebuilt_answers_410(tmp_path):
    settings = Settings(data_dir=str(tmp_path / 'data'))
    client = webtest.TestApp(iss.build_app(settings))
    upload_artifact(client, b'one')
    cursor = client.get('/events').json['next']
    for path in (tmp_path / 'data').glob('index.sqlite3*'):
        path.unlink()
    rebuilt = webtest.TestApp(iss.build_app(settings))
    assert rebuilt.get('/events', {'after': cursor}, status=410).json['title'] == 'Cursor expired'
    # NOTE: the rebuild itself is in the feed, from its start, once the background rebuild is done
    wait_for(lambda: rebuilt.get('/stats', expect_errors=True).status_int == 200, message='the index rebuilt')
    assert [event['type'] for event in rebuilt.get('/events').json['events']] == ['created']


def test_events_are_pruned_on_writes_after_the_retention(tmp_path):
    store_index = index.SQLiteIndex(str(tmp_path / 'index.sqlite3'))
    store_index.events_retain = 0.2
    store_index.put(index.row_for('a' * 64, {'kind': 'frame'}, time.time(), 1))
    first = store_index.events(None, 10).events
    time.sleep(0.3)
    store_index._next_prune = 0.0  # NOTE: as if a minute had passed
    store_index.put(index.row_for('b' * 64, {'kind': 'frame'}, time.time(), 1))
    with pytest.raises(index.CursorExpired):
        store_index.events(first[0].cursor.rsplit('.', 1)[0] + '.0', 10)
    assert [event.item for event in store_index.events(None, 10).events] == [
        index.row_for('b' * 64, {'kind': 'frame'}, 0, 1).item
    ]


def test_event_stream_frames_each_change_and_resumes_from_last_event_id(feed_client, monkeypatch):
    client, _ = feed_client
    monkeypatch.setattr(Events, 'STREAM_SECONDS', 0.5)
    monkeypatch.setattr(Events, 'KEEPALIVE_SECONDS', 0.2)
    first = upload_artifact(client, b'one')
    second = upload_artifact(client, b'two')

    response = client.get('/events', headers={'Accept': 'text/event-stream'})
    assert response.content_type == 'text/event-stream'
    assert response.headers['Cache-Control'] == 'no-store'
    blocks = response.text.split('\n\n')
    assert blocks[0] == 'retry: 1000'
    events = [block for block in blocks if block.startswith('id: ')]
    parsed = [dict(line.split(': ', 1) for line in block.split('\n')) for block in events]
    assert [(event['event'], json.loads(event['data'])['item']['id']) for event in parsed] == [
        ('created', first),
        ('created', second),
    ]
    assert all(json.loads(event['data'])['cursor'] == event['id'] for event in parsed)
    assert ': keep-alive' in blocks  # NOTE: the quiet rest of the stream keeps the connection alive

    resumed = client.get('/events', headers={'Accept': 'text/event-stream', 'Last-Event-ID': parsed[0]['id']})
    assert [line for line in resumed.text.split('\n') if line.startswith('id: ')] == [f'id: {parsed[1]["id"]}']


def test_event_stream_refuses_an_expired_cursor_before_streaming(feed_client):
    client, _ = feed_client
    headers = {'Accept': 'text/event-stream', 'Last-Event-ID': '00000000.1'}
    assert client.get('/events', headers=headers, status=410).content_type == 'application/json'


def test_a_private_store_needs_the_read_token_for_its_feed(make_client):
    client = make_client(read_token='reader')
    client.get('/events', status=401)
    assert client.get('/events', headers={'Authorization': 'Bearer reader'}).json['events'] == []
    assert (
        client.get('/events', headers={'Authorization': 'Bearer reader'}).headers['Cache-Control']
        == 'private, no-store'
    )


@pytest.mark.parametrize(
    ('raw', 'seconds'), [('', 7 * 86400), ('3600', 3600), ('90s', 90), ('15m', 900), ('12h', 43200), ('7d', 604800)]
)
def test_retention_setting(raw, seconds):
    assert Settings.from_env({'ISS_EVENTS_RETAIN': raw}).events_retain == seconds


@pytest.mark.parametrize('raw', ['0', '7w', '-1d', 'soon'])
def test_retention_setting_refuses_what_is_no_duration(raw):
    with pytest.raises(ConfigError, match='ISS_EVENTS_RETAIN'):
        Settings.from_env({'ISS_EVENTS_RETAIN': raw})


def test_the_feed_on_a_postgresql_index_prunes_and_refuses_what_it_pruned(postgres):
    store_index = index.PostgresIndex(postgres.new_database())
    start = store_index.events('now', 1).next_cursor
    store_index.put_missing([_frame_row(1)])
    store_index.put(index.row_for(f'{1:064x}', {'kind': 'frame', 'number': 1, 'note': 'added'}, 0, 1))
    assert store_index.remove(f'{1:064x}')
    events = store_index.events(start, 10).events
    assert [event.type for event in events] == ['created', 'updated', 'deleted']
    assert json.loads(events[1].item)['note'] == 'added'
    assert [len(event.cursor.split('.')) for event in events] == [3, 3, 3]  # NOTE: epoch, transaction, seq

    epoch, xact, seq = events[2].cursor.split('.')
    for ahead in (f'{epoch}.{xact}.{int(seq) + 1}', f'{epoch}.{int(xact) + 1}.0', f'{epoch}.{xact}9.{seq}'):
        with pytest.raises(index.InvalidCursor):
            store_index.events(ahead, 10)

    assert store_index.prune_events(time.time() + 1) == 3
    with pytest.raises(index.InvalidCursor):
        store_index.events(f'{epoch}.{int(xact) + 1}.0', 10)  # NOTE: past the pruned position too
    with pytest.raises(index.CursorExpired):
        store_index.events(events[1].cursor, 10)
    assert store_index.events(events[2].cursor, 10).events == []  # NOTE: the last one pruned: nothing missed
    store_index.put_missing([_frame_row(2)])
    assert [event.type for event in store_index.events(None, 10).events] == ['created']


# -- several writers on PostgreSQL ------------------------------------------------------------


def _frame_row(number: int) -> index.Row:
    return index.row_for(f'{number:064x}', {'kind': 'frame', 'number': number}, time.time(), number)


def _write_concurrently(writers: list[index.PostgresIndex], rounds: int, seed: int) -> None:
    """Each writer on its own threads: single rows, groups, rows held in slow transactions, deletions."""
    numbers = iter(range(1, 10**6))
    lock = threading.Lock()

    def take() -> int:
        with lock:
            return next(numbers)

    def write(store_index: index.PostgresIndex, rng: random.Random) -> None:
        for _ in range(rounds):
            choice = rng.random()
            if choice < 0.3:
                store_index.put_missing([_frame_row(take())])
            elif choice < 0.5:
                store_index.put_missing([_frame_row(take()) for _ in range(3)])
            elif choice < 0.8:
                # NOTE: a transaction that takes its id, waits, then writes: its seq is taken
                # after those of transactions that started later, and it commits last.
                with store_index.transaction():
                    store_index.put(_frame_row(take()))
                    time.sleep(rng.random() * 0.02)
                    store_index.put(_frame_row(take()))
            else:
                number = take()
                store_index.put_missing([_frame_row(number)])
                store_index.remove(f'{number:064x}')

    threads = [
        threading.Thread(target=write, args=(writers[n % len(writers)], random.Random(seed + n))) for n in range(6)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def _follow_while(reader: index.PostgresIndex, busy: threading.Event) -> list[index.Event]:
    """What a follower that keeps its cursor sees, reading small pages until the writers are done."""
    history: list[index.Event] = []
    cursor = reader.events('now', 1).next_cursor
    while True:
        done = not busy.is_set()
        page = reader.events(cursor, 7)
        history += page.events
        cursor = page.next_cursor
        if done and not page.events:
            return history


def test_a_follower_sees_every_change_of_concurrent_writers_once_in_commit_order(postgres):
    url = postgres.new_database()
    writers = [index.PostgresIndex(url), index.PostgresIndex(url)]
    reader = index.PostgresIndex(url)
    reader.events('now', 1)  # NOTE: the schema exists before the follower takes its cursor
    busy = threading.Event()
    busy.set()
    seen: list[list[index.Event]] = []
    follower = threading.Thread(target=lambda: seen.append(_follow_while(reader, busy)))
    follower.start()
    _write_concurrently(writers, rounds=40, seed=26)
    busy.clear()
    follower.join(60)
    history = seen[0]

    committed = reader.events(None, 100_000).events
    assert len(committed) > 200
    assert [event.cursor for event in history] == [event.cursor for event in committed]  # no gap, no repeat
    # NOTE: in an order consistent with commit order: each blob is created before it is deleted
    order = {(event.type, json.loads(event.item)['id']): n for n, event in enumerate(history)}
    for (kind, blob_id), position in order.items():
        if kind == 'deleted':
            assert order[('created', blob_id)] < position


def test_a_follower_by_sequence_number_alone_misses_changes(postgres):
    """The check above can fail: ordered by seq alone, a follower steps past changes that commit later."""

    class BySequence(index.PostgresIndex):
        _EVENT_POSITION = ('seq',)
        _EVENT_SETTLED = 'TRUE'

    url = postgres.new_database()
    writers = [index.PostgresIndex(url), index.PostgresIndex(url)]
    reader = BySequence(url)
    reader.events('now', 1)
    busy = threading.Event()
    busy.set()
    seen: list[list[index.Event]] = []
    follower = threading.Thread(target=lambda: seen.append(_follow_while(reader, busy)))
    follower.start()
    _write_concurrently(writers, rounds=40, seed=26)
    busy.clear()
    follower.join(60)
    assert len(seen[0]) < len(reader.events(None, 100_000).events)


# -- through gunicorn ---------------------------------------------------------------------------


def test_long_poll_and_stream_wake_when_an_upload_lands(server):
    cursor = json.loads(server.request('GET', '/events?after=now')[2])['next']

    def upload_later(data: bytes) -> threading.Timer:
        def upload() -> None:
            body = (
                b'--b\r\nContent-Disposition: form-data; name="file"; filename="f.bin"\r\n\r\n'
                + data
                + b'\r\n--b--\r\n'
            )
            server.request('POST', '/artifacts?kind=frame', body, {'Content-Type': 'multipart/form-data; boundary=b'})

        timer = threading.Timer(0.5, upload)
        timer.start()
        return timer

    writer = upload_later(b'frame one')
    started = time.monotonic()
    status, _, body = server.request('GET', f'/events?after={cursor}&wait=20')
    writer.join()
    assert status == 200 and time.monotonic() - started < 5
    page = json.loads(body)
    assert [event['type'] for event in page['events']] == ['created']

    conn = http.client.HTTPConnection('127.0.0.1', server.port, timeout=20)
    conn.request('GET', '/events', headers={'Accept': 'text/event-stream', 'Last-Event-ID': page['next']})
    response = conn.getresponse()
    assert response.status == 200 and response.getheader('Content-Type') == 'text/event-stream'
    writer = upload_later(b'frame two')
    lines = []
    while not (lines and lines[-1].startswith('data: ')):
        lines.append(response.readline().decode().rstrip('\n'))
    writer.join()
    conn.close()
    assert 'event: created' in lines
    assert json.loads(lines[-1][len('data: ') :])['item']['bytes'] == len(b'frame two')


# -- waiting requests are bounded (a bulkhead per worker) -----------------------------------


def _get_timed(port: int, path: str, headers: dict[str, str] | None = None) -> tuple[float, int, Message, bytes]:
    started = time.monotonic()
    conn = http.client.HTTPConnection('127.0.0.1', port, timeout=30)
    try:
        conn.request('GET', path, headers=headers or {})
        response = conn.getresponse()
        body = response.read() if response.getheader('Content-Type') != 'text/event-stream' else b''
        return time.monotonic() - started, response.status, response.msg, body  # NOTE: names in any case
    finally:
        conn.close()


def test_long_polls_past_the_bulkhead_answer_at_once_and_health_keeps_answering(start):
    """4 threads: one may wait; 6 held long-polls leave /health, streams refused, and 5 polls answered at once."""
    server = start(ISS_WORKERS='1', ISS_THREADS='4')
    cursor = json.loads(server.request('GET', '/events?after=now')[2])['next']
    results: list[tuple[float, int, Message, bytes]] = []
    polls = [
        threading.Thread(target=lambda: results.append(_get_timed(server.port, f'/events?after={cursor}&wait=3')))
        for _ in range(6)
    ]
    for poll in polls:
        poll.start()
    wait_for(lambda: len(results) >= 5, seconds=2, message='the long-polls past the bulkhead answered')

    took, status, _, _ = _get_timed(server.port, '/health')
    assert status == 200 and took < 1
    took, status, headers, _ = _get_timed(server.port, '/events', {'Accept': 'text/event-stream'})
    assert status == 503 and headers['Retry-After'] == '5' and took < 1
    for poll in polls:
        poll.join()
    times = sorted(took for took, *_ in results)
    assert times[4] < 1.5 and times[5] >= 2.5  # NOTE: five turned away at once, one waited its 3 s
    for _, status, _, body in results:
        assert status == 200 and json.loads(body) == {'events': [], 'next': cursor}
    assert sum(headers.get('Retry-After') == '1' for _, _, headers, _ in results) == 5

    # NOTE: the place is given back: a stream now gets it, and holds it (a long-poll is turned away)
    conn = http.client.HTTPConnection('127.0.0.1', server.port, timeout=10)
    conn.request('GET', '/events', headers={'Accept': 'text/event-stream', 'Last-Event-ID': cursor})
    response = conn.getresponse()
    assert response.status == 200 and response.readline() == b'retry: 1000\n'
    took, status, headers, _ = _get_timed(server.port, f'/events?after={cursor}&wait=3')
    assert status == 200 and took < 1 and headers['Retry-After'] == '1'
    conn.close()

    # NOTE: a stream whose client is gone gives its place back at the first write that fails
    def upload(data: bytes) -> None:
        body = b'--b\r\nContent-Disposition: form-data; name="file"; filename="f.bin"\r\n\r\n' + data + b'\r\n--b--\r\n'
        server.request('POST', '/artifacts?kind=frame', body, {'Content-Type': 'multipart/form-data; boundary=b'})

    upload(b'one')
    upload(b'two')
    wait_for(
        lambda: _get_timed(server.port, '/events?after=now&wait=1')[0] >= 0.9,
        seconds=5,
        message='a long-poll waits again',
    )


def test_a_finished_stream_gives_its_place_back(tmp_path, monkeypatch):
    monkeypatch.setattr(Events, 'STREAM_SECONDS', 0.2)
    monkeypatch.setattr(Events, 'KEEPALIVE_SECONDS', 0.1)
    settings = Settings(data_dir=str(tmp_path / 'data'), threads=4)  # NOTE: one place
    client = webtest.TestApp(iss.build_app(settings))
    for _ in range(3):
        response = client.get('/events', headers={'Accept': 'text/event-stream'})
        assert response.status_int == 200 and response.text.startswith('retry: 1000')
