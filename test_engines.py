"""Engines that hang or restart never hang ISS (issue 24, points 1-4): deadlines, pooled connections, PgBouncer.

Real servers only: PostgreSQL and SeaweedFS frozen with SIGSTOP (sockets open, nothing answers:
a stuck disk, a failover, a long lock), PostgreSQL restarted, PgBouncer in transaction mode.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest

from iss_server import engines, index
from iss_server.errors import BucketUnavailable, IndexUnavailable
from iss_testing import HERE
from iss_testing.cli import cli_json
from iss_testing.servers import (
    S3_KEY,
    S3_OBJECTS_KEY,
    S3_OBJECTS_SECRET,
    S3_SECRET,
    Gunicorn,
    PgBouncer,
    PostgreSQL,
    SeaweedFS,
    free_port,
    s3_node_environment,
)


@contextlib.contextmanager
def frozen(server: PostgreSQL | SeaweedFS) -> Iterator[None]:
    server.freeze()
    try:
        yield
    finally:
        server.thaw()


def timed(call, *args, **kwargs):
    """``call``'s answer (or the exception it raised) and the seconds it took."""
    started = time.monotonic()
    try:
        answer = call(*args, **kwargs)
    except Exception as exc:
        answer = exc
    return answer, time.monotonic() - started


# -- bulkheads: a busy engine's callers queue, a stuck one's are refused at once ---------------------


def test_a_bulkhead_lets_callers_of_a_busy_engine_wait_and_refuses_those_of_a_stuck_one():
    bulkhead = engines.Bulkhead('index', IndexUnavailable)
    bulkhead.limit = 2
    release = threading.Event()

    def hold() -> None:
        with bulkhead.call():
            release.wait()

    def enter() -> None:
        with bulkhead.call():
            pass

    with concurrent.futures.ThreadPoolExecutor(2) as holders:
        for _ in range(2):
            holders.submit(hold)
        engines_wait_for(lambda: bulkhead.inside == 2)
        threading.Timer(0.3, release.set).start()
        answer, seconds = timed(enter)  # NOTE: waits for the places freed at 0.3 s
    assert answer is None and 0.2 < seconds < 1
    release.clear()
    with concurrent.futures.ThreadPoolExecutor(2) as holders:
        for _ in range(2):
            holders.submit(hold)
        engines_wait_for(lambda: bulkhead.inside == 2)
        time.sleep(bulkhead.STUCK)  # NOTE: both places held this long: the engine is taken for stuck
        answer, seconds = timed(enter)
        release.set()
    assert isinstance(answer, IndexUnavailable) and 'slow to answer' in str(answer)
    assert seconds < 0.1
    assert bulkhead.inside == 0


def engines_wait_for(condition) -> None:
    deadline = time.monotonic() + 5
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.01)


# -- the index: a deadline on every call, counted by ISS -----------------------------------------


def test_a_frozen_postgresql_costs_a_call_its_deadline_then_works_again(postgres):
    store_index = index.PostgresIndex(postgres.new_database(), timeout=1)
    assert store_index.get('0' * 64) is None  # NOTE: the pool and its connection, made before the freeze
    with frozen(postgres):
        answer, seconds = timed(store_index.get, '0' * 64)
        assert isinstance(answer, IndexUnavailable), answer
        assert 'no answer within 1 s' in str(answer)
        assert seconds < 1.5
        # NOTE: connecting anew meets the same frozen server, and the same deadline.
        answer, seconds = timed(store_index.totals)
        assert isinstance(answer, IndexUnavailable), answer
        assert seconds < 2.5
    assert store_index.get('0' * 64) is None


def test_a_request_waits_on_a_frozen_postgresql_one_budget_however_many_calls_it_makes(postgres, monkeypatch):
    store_index = index.PostgresIndex(postgres.new_database(), timeout=1)
    assert store_index.get('0' * 64) is None
    monkeypatch.setattr(engines.INDEX.budget, 'seconds', 1.5)
    with frozen(postgres):
        started = time.monotonic()
        with engines.INDEX.budget.request():
            # NOTE: a deadline of its own for each call would cost the request three seconds.
            answers = [timed(store_index.get, '0' * 64) for _ in range(3)]
        whole = time.monotonic() - started
        assert all(isinstance(answer, IndexUnavailable) for answer, _ in answers), answers
        (_, first), (_, second), (third_answer, third) = answers
        assert 0.9 < first < 1.3  # NOTE: the call's own deadline, less than the budget
        assert 0.3 < second < 0.8  # NOTE: what the budget had left
        assert third < 0.1 and 'too little is left of the 1.5 s this request may spend in index calls' in str(
            third_answer
        )
        assert whole < 1.5 + watchdog_slack()
        # NOTE: a thread outside a request (the reconciler, a webhook) keeps each call's own deadline.
        answer, seconds = timed(store_index.get, '0' * 64)
        assert isinstance(answer, IndexUnavailable) and 0.9 < seconds < 1.3
    assert store_index.get('0' * 64) is None


def test_a_request_waits_on_a_frozen_s3_service_one_budget_however_many_calls_it_makes(seaweedfs, monkeypatch):
    from iss_server.drivers.s3 import S3Driver

    bucket, _, prefix = seaweedfs.new_store().removeprefix('s3://').partition('/')
    driver = S3Driver(
        bucket, prefix + '/', endpoint=seaweedfs.endpoint, access_key=S3_KEY, secret_key=S3_SECRET, timeout=3
    )
    driver.write('a', b'a')
    monkeypatch.setattr(engines.BUCKET.budget, 'seconds', 3)
    with frozen(seaweedfs):
        started = time.monotonic()
        with engines.BUCKET.budget.request():
            answers = [timed(driver.write, f'k{number}', b'x') for number in range(4)]
        whole = time.monotonic() - started
    assert all(isinstance(answer, BucketUnavailable) for answer, _ in answers), answers
    assert 'too little is left' in str(answers[-1][0]) and answers[-1][1] < 0.1
    assert whole < 3 + watchdog_slack()
    assert driver.read('a') == b'a'


def watchdog_slack() -> float:
    """How late past its deadline a cut call may end: a watchdog's tick, and the answer's way back."""
    return engines.Watchdog.TICK + 0.2


def test_a_restarted_postgresql_costs_no_call_an_error(postgres):
    store_index = index.PostgresIndex(postgres.new_database(), timeout=2, pool_size=4)
    # NOTE: four threads at once, so that the pool holds four connections the restart ends.
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        assert all(totals == {} for totals in pool.map(lambda _: store_index.totals(), range(40)))
    postgres.restart()
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda _: timed(store_index.totals), range(100)))
    failures = [answer for answer, _ in answers if isinstance(answer, Exception)]
    assert failures == []
    assert max(seconds for _, seconds in answers) < 2


def test_each_worker_keeps_at_most_its_pool_of_connections(postgres):
    url = postgres.new_database() + '&application_name=iss-pool-of-two'
    store_index = index.PostgresIndex(url, timeout=5, pool_size=2)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda _: store_index._run('SELECT pg_sleep(0.02)'), range(32)))
    [(connections,)] = store_index._run(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'iss-pool-of-two'"
    )
    assert 1 <= connections <= 2


# -- a node: what its clients see while an engine hangs or restarts ------------------------------


def start_node(tmp_path, seaweedfs, postgres, **changes: str) -> Gunicorn:
    """An ISS node on S3 and PostgreSQL, with short deadlines (2 s on the index, 4 s on S3) and 8 threads."""
    settings = {'ISS_WORKERS': '1', 'ISS_THREADS': '8', 'ISS_INDEX_TIMEOUT': '2', 'ISS_S3_TIMEOUT': '4'}
    environment = s3_node_environment(seaweedfs, postgres) | settings | changes
    return Gunicorn(tmp_path / 'data', tmp_path / 'gunicorn.log', **environment)


@pytest.fixture
def node(tmp_path, seaweedfs, postgres) -> Iterator[Gunicorn]:
    server = start_node(tmp_path, seaweedfs, postgres)
    yield server
    server.kill()  # NOTE: a request still stuck on a thawed engine would hold a graceful stop


OCTETS = {'Content-Type': 'application/octet-stream'}


def upload(node: Gunicorn, number: int) -> str:
    status, _, body = node.request('POST', '/artifacts?kind=x', f'artifact {number}'.encode(), OCTETS)
    assert status in (200, 201), body
    return json.loads(body)['artifact_id']


CALLS_NEEDING_THE_INDEX = [('GET', '/stats', None), ('GET', '/artifacts', None), ('POST', '/artifacts?kind=x', b'x')]


@pytest.mark.slow
def test_a_node_answers_503_within_its_index_deadline_while_postgresql_is_frozen(node, postgres):
    upload(node, 1)
    with frozen(postgres):
        for method, path, body in CALLS_NEEDING_THE_INDEX:
            (status, headers, answer), seconds = timed(node.request, method, path, body, OCTETS)
            assert status == 503, (path, answer)
            assert headers['Retry-After'], path
            assert json.loads(answer)['title'] == 'Storage unavailable', path
            assert seconds < 2 + 1, (path, seconds)
    assert node.request('GET', '/stats')[0] == 200


@pytest.mark.slow
def test_a_node_answers_503_within_its_s3_deadline_while_seaweedfs_is_frozen(node, seaweedfs):
    with frozen(seaweedfs):
        (status, headers, answer), seconds = timed(node.request, 'POST', '/artifacts?kind=x', b'never stored', OCTETS)
        assert status == 503, answer
        assert headers['Retry-After']
        assert seconds < 4 + 1, seconds
    upload(node, 2)


@pytest.mark.slow
def test_a_frozen_postgresql_costs_a_request_its_index_deadline_however_long_the_s3_deadline(
    tmp_path, seaweedfs, postgres
):
    """Found from outside: the budget was the larger of the two deadlines, so a request whose first
    index call ran out waited again in the next ones, up to ISS_S3_TIMEOUT (15 s by default)."""
    node = start_node(
        tmp_path,
        seaweedfs,
        postgres,
        ISS_S3_TIMEOUT='15',
        # NOTE: a large read then asks the index twice: its row (the node's copy), and whether nginx may send it.
        ISS_ACCEL_REDIRECT='/_internal/s3/',
        ISS_ACCEL_MIN_BYTES='1000',
    )
    try:
        large = [f'artifact {number} '.encode() * 100 for number in range(3)]  # NOTE: over ISS_ACCEL_MIN_BYTES
        digests = [
            json.loads(node.request('POST', '/artifacts?kind=x', body, OCTETS)[2])['artifact_id'] for body in large
        ]
        with frozen(postgres):
            for method, path, body in CALLS_NEEDING_THE_INDEX:
                (status, _, answer), seconds = timed(node.request, method, path, body, OCTETS)
                assert status == 503, (path, answer)
                assert seconds < 2 + 1, (path, seconds)
            for digest, body in zip(digests, large, strict=True):
                (status, headers, answer), seconds = timed(node.request, 'GET', f'/artifacts/{digest}')
                # NOTE: sent by the node, which hashed it (nginx may not: when it was last verified is unknown).
                assert (status, answer, headers.get('X-Accel-Redirect')) == (200, body, None)
                assert seconds < 2 + 1, seconds
        assert node.request('GET', '/stats')[0] == 200
    finally:
        node.kill()


@pytest.mark.slow
def test_a_postgresql_restart_costs_no_client_a_503_once_it_is_back(node, postgres):
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        assert set(pool.map(lambda _: node.request('GET', '/stats')[0], range(40))) == {200}
        postgres.restart()
        statuses = list(pool.map(lambda n: node.request('GET', '/stats' if n % 2 else '/artifacts')[0], range(100)))
    assert statuses.count(503) == 0, statuses
    assert set(statuses) == {200}


# -- PgBouncer: the pooler for more nodes than max_connections allows --------------------------


@pytest.mark.slow
def test_a_node_runs_its_index_through_pgbouncer_in_transaction_mode(tmp_path, seaweedfs, postgres):
    database = postgres.new_own_database()
    bouncer = PgBouncer(postgres, database, server_connections=2)
    environment = {
        **s3_node_environment(seaweedfs, postgres),
        'ISS_INDEX': bouncer.url(),
        'ISS_INDEX_PREPARED': '0',  # NOTE: PgBouncer 1.18 keeps no prepared statement across transactions
    }
    node = Gunicorn(tmp_path / 'data', tmp_path / 'gunicorn.log', **environment, ISS_WORKERS='2', ISS_THREADS='8')
    try:

        def client(number: int) -> list[int]:
            # PERF: more requests than psycopg's prepare threshold (5) per connection, were it on
            return [
                upload_status(node, number),
                node.request('GET', '/artifacts?limit=5')[0],
                node.request('GET', '/stats')[0],
                node.request('GET', '/events?limit=5')[0],
            ]

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            statuses = [status for answer in pool.map(client, range(48)) for status in answer]
        assert set(statuses) <= {200, 201}, statuses
        stats = json.loads(node.request('GET', '/stats')[2])
        assert stats['count'] == 48
        # NOTE: the rebuild's and fsck's bookkeeping spans many transactions, each on any server connection.
        # NOTE: a row of no blob, which the rebuild finds unseen and removes.
        index.PostgresIndex(bouncer.url(), prepared=False).put(index.row_for('f' * 64, None, 1.0, 1))
        rebuilt = cli_json(tmp_path / 'data', 'reindex', environment=environment)
        assert (rebuilt['blobs'], rebuilt['changed'], rebuilt['removed']) == (48, 0, 1)
        assert cli_json(tmp_path / 'data', 'fsck', environment=environment)['problems'] == []
        [(connections,)] = index.PostgresIndex(postgres.url())._run(
            'SELECT count(*) FROM pg_stat_activity WHERE datname = ?', (database,)
        )
        assert connections <= 2
    finally:
        node.kill()
        bouncer.stop()


def upload_status(node: Gunicorn, number: int) -> int:
    return node.request('POST', '/artifacts?kind=x', f'artifact {number}'.encode(), OCTETS)[0]


# -- bulkheads and health: a stuck engine holds a share of the threads, never all -------------------


@contextlib.contextmanager
def pressed(node: Gunicorn, path: str, clients: int = 12) -> Iterator[None]:
    """``clients`` threads asking ``path`` over and over (more than the node's threads) while the block runs."""
    done = threading.Event()

    def client() -> None:
        while not done.is_set():
            with contextlib.suppress(OSError):
                node.request('GET', path)

    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        for _ in range(clients):
            pool.submit(client)
        try:
            yield
        finally:
            done.set()


@pytest.mark.slow
def test_while_postgresql_is_frozen_what_needs_no_index_answers_within_a_second(node, postgres):
    digest = upload(node, 3)
    assert node.request('GET', f'/artifacts/{digest}')[0] == 200
    with frozen(postgres), pressed(node, '/stats'):
        time.sleep(1.5)  # NOTE: the index's places taken, its deadline running
        slowest = 0.0
        for _ in range(10):
            for path in ('/health/live', f'/artifacts/{digest}'):
                (status, _, _), seconds = timed(node.request, 'GET', path)
                assert status == 200, path
                slowest = max(slowest, seconds)
            time.sleep(0.2)
        assert slowest < 1, slowest
        (status, headers, body), seconds = timed(node.request, 'GET', '/health/ready')
        assert seconds < 2 + 1
    assert status == 503
    assert headers['Retry-After']
    answer = json.loads(body)
    assert (answer['ok'], answer['failing']) == (False, 'index')
    assert answer['engines']['bucket'] == 'ok'
    assert node.request('GET', '/health/ready')[0] == 200
    metrics = node.request('GET', '/metrics')[2].decode()
    for name in ('iss_engine_refused_calls_total', 'iss_engine_cut_calls_total'):
        assert float(re.search(rf'^{name}{{engine="index"}} (\S+)$', metrics, re.M)[1]) > 0, name


@pytest.mark.slow
def test_an_uncached_read_while_postgresql_is_frozen_costs_one_index_deadline(node, postgres):
    """Found from outside: the lookup's deadline, then the bucket, then a second deadline to record the check."""
    digest = upload(node, 4)
    with frozen(postgres):
        (status, _, body), seconds = timed(node.request, 'GET', f'/artifacts/{digest}')
    assert (status, body) == (200, b'artifact 4')
    assert seconds < 2 + 1, seconds


@pytest.mark.slow
def test_while_seaweedfs_is_frozen_health_names_the_bucket_and_listings_answer_within_a_second(node, seaweedfs):
    digests = [upload(node, number) for number in range(4, 8)]
    # NOTE: never read yet, so not on the node: each read asks the bucket.
    with frozen(seaweedfs), pressed(node, f'/artifacts/{digests[0]}'):
        time.sleep(1.5)
        (status, headers, body), seconds = timed(node.request, 'GET', '/health/ready')
        assert seconds < 2 + 1
        assert status == 503
        assert json.loads(body)['failing'] == 'bucket'
        seed_answer = json.loads(node.request('GET', '/health')[2])
        assert (sorted(seed_answer), seed_answer['failing']) == (['error', 'failing', 'ok'], 'bucket')
        slowest = 0.0
        for _ in range(10):
            for path in ('/health/live', '/artifacts?limit=2', '/stats'):
                (status, _, _), seconds = timed(node.request, 'GET', path)
                assert status == 200, path
                slowest = max(slowest, seconds)
            time.sleep(0.2)
        assert slowest < 1, slowest


@pytest.mark.slow
def test_the_container_probe_asks_readiness_and_liveness_on_request(tmp_path):
    server = Gunicorn(tmp_path / 'data', tmp_path / 'g.log', ISS_WORKERS='1')
    environment = {**os.environ, 'ISS_PORT': str(server.port)}

    def probe(*args: str) -> int:
        command = [sys.executable, 'healthcheck.py', *args]
        return subprocess.run(command, cwd=HERE, env=environment, capture_output=True, timeout=30).returncode

    try:
        shutil.rmtree(tmp_path / 'data')  # NOTE: the data directory gone: not ready, still alive
        assert (probe(), probe('ready'), probe('live'), probe('dead')) == (1, 1, 0, 2)
        assert json.loads(server.request('GET', '/health/ready')[2])['engines']['index'] != 'ok'
    finally:
        server.stop()


# -- the bucket: a node creates it on a fresh S3 service --------------------------------------------


def node_on_a_fresh_bucket(
    tmp_path, seaweedfs, postgres, bucket: str, ready: bool = True, **environment: str
) -> Gunicorn:
    tmp_path.mkdir(exist_ok=True)
    return Gunicorn(
        tmp_path / 'data',
        tmp_path / 'gunicorn.log',
        **{**s3_node_environment(seaweedfs, postgres), 'ISS_STORE': f's3://{bucket}/', **environment},
        ISS_WORKERS='2',  # NOTE: two workers, each creating it at start: at once
        expect_health=200 if ready else 503,
    )


@pytest.mark.slow
def test_a_node_creates_its_missing_bucket_at_start_and_is_ready_without_a_write(tmp_path, seaweedfs, postgres):
    bucket = seaweedfs.new_bucket_name()
    # NOTE: two nodes starting at once on one fresh bucket, two workers each.
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        nodes = list(
            pool.map(lambda name: node_on_a_fresh_bucket(tmp_path / name, seaweedfs, postgres, bucket), ('one', 'two'))
        )
    try:
        for node in nodes:
            status, _, body = node.request('GET', '/health/ready')
            assert (status, json.loads(body)['engines']['bucket']) == (200, 'ok'), body
        assert seaweedfs.keys(bucket) == []  # NOTE: nothing written: ready all the same
        logs = ''.join(node.log_path.read_text() for node in nodes)
        assert 'could not make sure' not in logs
        assert 1 <= logs.count(f'created the bucket {bucket}: it was missing') <= 4, logs
        upload(nodes[0], 5000)
    finally:
        for node in nodes:
            node.kill()


@pytest.mark.slow
def test_a_node_whose_credentials_may_not_create_its_bucket_says_so_when_asked_if_ready(tmp_path, seaweedfs, postgres):
    bucket = seaweedfs.new_bucket_name()
    credentials = {'AWS_ACCESS_KEY_ID': S3_OBJECTS_KEY, 'AWS_SECRET_ACCESS_KEY': S3_OBJECTS_SECRET}
    node = node_on_a_fresh_bucket(tmp_path, seaweedfs, postgres, bucket, ready=False, **credentials)
    try:
        status, headers, body = node.request('GET', '/health/ready')
        answer = json.loads(body)
        assert (status, answer['failing']) == (503, 'bucket'), body
        assert headers['Retry-After']
        assert f'the bucket {bucket} does not exist, and these credentials may not create it' in answer['error']
        assert 'could not make sure the store' in node.log_path.read_text()
    finally:
        node.kill()
    # NOTE: created by someone who may, a node with the same credentials is ready.
    seaweedfs.client().create_bucket(Bucket=bucket)
    node_on_a_fresh_bucket(tmp_path, seaweedfs, postgres, bucket, **credentials).kill()


# -- a frozen bucket that thaws: a write that timed out lands all the same -----------------------------


def test_a_put_whose_timed_out_attempt_lands_before_its_retry_says_it_stored_the_object(seaweedfs, tmp_path):
    """Found from outside: a new blob answered 200 "created": false when the service thawed during the retry."""
    import io

    import storage
    from iss_server import disk
    from iss_server.drivers.s3 import S3Driver

    bucket, _, prefix = seaweedfs.new_store().removeprefix('s3://').partition('/')
    # NOTE: attempts of 2.5 s: the first ends at ~2.5 s, the retry starts by 3.5 s and ends after 5 s.
    driver = S3Driver(
        bucket, prefix + '/', endpoint=seaweedfs.endpoint, access_key=S3_KEY, secret_key=S3_SECRET, timeout=6
    )
    layout = disk.Layout(str(tmp_path / 'scratch'))
    os.makedirs(layout.tmp)
    staged = storage.stage_file(layout, io.BytesIO(b'new content, sent while the service is frozen'))
    try:
        with frozen(seaweedfs):
            thawing = threading.Timer(3.7, seaweedfs.thaw)
            thawing.start()
            (stored, seconds) = timed(driver.put, staged, 'blobs/new')
            thawing.join()
    finally:
        staged.discard()
    # NOTE: the first attempt landed at the thaw; its retry found the object there (412): its own.
    assert stored is True, (stored, seconds)
    assert driver.read('blobs/new') == b'new content, sent while the service is frozen'
    # NOTE: and another writer's object is still another's.
    other = storage.stage_file(layout, io.BytesIO(b'new content, sent while the service is frozen'))
    try:
        assert driver.put(other, 'blobs/new') is False
    finally:
        other.discard()


@pytest.mark.slow
def test_new_content_sent_while_s3_freezes_and_thaws_is_never_answered_as_found_there(tmp_path, seaweedfs, postgres):
    """A request answers 201 for content it stored, or 503 (not acknowledged). The write may land after
    the 503 all the same (the service took it before it froze), so the client's retry answers 200
    "created": false: the truth, as the content is stored and that request did not create it; or not
    land, and the retry stores it (201). Either way the content is there to read: the reconciler's undo
    of the frozen write once removed what the retry had stored."""
    node = Gunicorn(
        tmp_path / 'data',
        tmp_path / 'gunicorn.log',
        **s3_node_environment(seaweedfs, postgres),
        ISS_WORKERS='1',
        ISS_S3_TIMEOUT='8',  # NOTE: attempts of 3.5 s: the retry starts at ~3.5 s, the deadline at 8 s
    )
    try:
        node.request('GET', '/stats')
        # NOTE: thawed during the retry (its first attempt lands before it), and after the deadline.
        for number, thaw_at in enumerate((3.7, 8.5)):
            content = f'new content {number}, sent while the service is frozen'.encode()
            with frozen(seaweedfs):
                thawing = threading.Timer(thaw_at, seaweedfs.thaw)
                thawing.start()
                (status, headers, body), seconds = timed(node.request, 'POST', '/artifacts?kind=x', content, OCTETS)
                thawing.join()
            assert seconds < 8 + 1
            first = (status, json.loads(body).get('created', False))
            assert first in ((201, True), (503, False)), body
            if status == 503:
                assert headers['Retry-After'] and 'sending it again is safe' in json.loads(body)['description']
            wait_for_landing = time.monotonic() + 5
            while True:
                status, _, body = node.request('POST', '/artifacts?kind=x', content, OCTETS)
                if status != 503 or time.monotonic() > wait_for_landing:
                    break
                time.sleep(0.2)
            # NOTE: after a 503 the frozen put may have landed (200, found) or not (the deadline shut its
            # socket before the bucket took it: the retry stores it, 201); after a 201 it is there.
            retried = (status, json.loads(body)['created'])
            assert retried in ([(200, False)] if first[0] == 201 else [(200, False), (201, True)]), (first, body)
            assert node.request('GET', f'/artifacts/{json.loads(body)["artifact_id"]}')[2] == content
    finally:
        node.kill()


# -- a node starting: its port is bound before its workers answer ---------------------------------------


@pytest.mark.slow
def test_connections_made_while_a_node_starts_wait_for_its_workers_and_are_answered(tmp_path, seaweedfs, postgres):
    """Found from outside: a restarted node accepts TCP connections seconds before its workers answer
    (gunicorn's master binds, then forks them; a worker's start asks the index, here frozen for 3 s).
    Such a connection waits in the listen backlog and is answered; none is refused or reset."""
    port = free_port()
    environment = {
        **os.environ,
        **s3_node_environment(seaweedfs, postgres),
        'ISS_DATA': str(tmp_path / 'data'),
        'ISS_PORT': str(port),
        'ISS_WORKERS': '2',
        'ISS_INDEX_TIMEOUT': '3',
        'ISS_LOG_LEVEL': 'warning',
    }
    answers: list[tuple[float, float, str]] = []  # NOTE: when made, when answered, the status line or error

    def ask(connection: socket.socket, made: float) -> None:
        with connection:
            try:
                connection.sendall(b'GET /health/live HTTP/1.1\r\nHost: iss\r\nConnection: close\r\n\r\n')
                answer = b''
                while chunk := connection.recv(65536):
                    answer += chunk
                answers.append((made, time.monotonic(), answer.split(b'\r\n', 1)[0].decode()))
            except OSError as exc:
                answers.append((made, time.monotonic(), repr(exc)))

    with frozen(postgres), (tmp_path / 'gunicorn.log').open('ab') as log:
        started = time.monotonic()
        node = subprocess.Popen(
            [sys.executable, '-m', 'gunicorn', 'iss:app'],
            cwd=HERE,
            env=environment,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            askers = []
            while not any(status.endswith('200 OK') for _, _, status in answers):
                assert time.monotonic() - started < 20, answers
                try:
                    connection = socket.create_connection(('127.0.0.1', port), timeout=30)
                except ConnectionRefusedError:
                    time.sleep(0.05)  # NOTE: not bound yet
                    continue
                askers.append(threading.Thread(target=ask, args=(connection, time.monotonic())))
                askers[-1].start()
                time.sleep(0.1)
            for asker in askers:
                asker.join(35)
        finally:
            os.killpg(node.pid, signal.SIGKILL)
            node.wait(10)
    first_made = min(made for made, _, _ in answers)
    first_answered = min(answered for _, answered, _ in answers)
    print(
        f'\nstarting node: {len(answers)} connections accepted {first_answered - first_made:.2f} s before it answered'
    )
    assert {status for _, _, status in answers} == {'HTTP/1.1 200 OK'}, answers
    assert first_answered - first_made > 1  # NOTE: the window is there: these connections waited in it
