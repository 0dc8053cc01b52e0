"""Fault injection on a real cluster: two ISS nodes behind the cluster nginx site, one bucket, one index.

- ``Cluster``: PostgreSQL and SeaweedFS (the engines), a ``FaultProxy`` in front of each,
  two gunicorn nodes that reach the engines only through those proxies, and nginx balancing
  the nodes (and fetching offloaded blobs from the bucket through the S3 proxy, as ISS
  signed them). Faults: ``freeze``/``thaw`` an engine (SIGSTOP/SIGCONT of its processes),
  ``kill_engine``/``restart_engine``, a proxy's ``blackhole``/``reset``/``heal``, ``kill_node``.
- ``Workload``: writers and readers through nginx (uploads, batches, tus sessions, deletes,
  reads, listings, ``/stats``, ``/health``), each request recorded: what, when, how long,
  the answer; and a ``Ledger`` of what the clients were told.
- ``check``: the promise after the faults are healed and one reconcile interval has passed.
  Every acknowledged upload reads back byte-exact from every node; every acknowledged delete
  is gone; the bucket's blobs, its metas and the index's rows are one set (nothing
  half-written, whatever the answers were); listings and ``/stats`` equal the bucket; every
  answer was a success or a JSON 503 with Retry-After; none took longer than the deadline
  plus one second.

Nothing here stands in for ISS or an engine: the proxies only pass bytes, or stop passing them.
"""

from __future__ import annotations

import base64
import collections
import concurrent.futures
import contextlib
import dataclasses
import hashlib
import http.client
import json
import os
import pathlib
import random
import shutil
import signal
import socket
import struct
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from typing import Any

import psycopg

from iss_testing.servers import Gunicorn, Nginx, PgBouncer, PostgreSQL, SeaweedFS, s3_node_environment, wait_for

ADMIN = {'Authorization': 'Bearer admin'}
KIND = 'chaos'

# -- a TCP relay that a test partitions -------------------------------------------------------------


class FaultProxy:
    """A TCP relay in front of an engine that can stop passing bytes, or reset every connection.

    ``blackhole()``: connections are accepted and what is sent is kept, but nothing reaches
    either side (a partition: TCP retransmits, the peer never answers) until ``heal()``,
    which delivers what was held, as a network that comes back does. ``reset()``: every
    open connection is reset (RST) and so is every new one, until ``heal()``.
    """

    _MODES = ('pass', 'blackhole', 'reset')

    def __init__(self, target_port: int) -> None:
        self._target = target_port
        self.mode = 'pass'
        self._flowing = threading.Event()
        self._flowing.set()
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._listener = socket.create_server(('127.0.0.1', 0))
        self.port: int = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True, name=f'proxy-{self.port}').start()

    def blackhole(self) -> None:
        self.mode = 'blackhole'
        self._flowing.clear()

    def reset(self) -> None:
        self.mode = 'reset'
        self._flowing.set()
        with self._lock:
            doomed = list(self._open)
        for sock in doomed:
            _reset(sock)

    def heal(self) -> None:
        self.mode = 'pass'
        self._flowing.set()

    def close(self) -> None:
        self._listener.close()
        self.reset()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self.mode == 'reset':
                _reset(client)
                continue
            threading.Thread(target=self._connect, args=(client,), daemon=True).start()

    def _connect(self, client: socket.socket) -> None:
        self._track(client)
        # NOTE: black-holed, a new connection is accepted (the kernel's handshake) and left waiting.
        self._flowing.wait()
        try:
            upstream = socket.create_connection(('127.0.0.1', self._target), timeout=5)
            upstream.settimeout(None)
        except OSError:
            _reset(client)  # NOTE: the engine is down: the client sees its connection refused, as without us
            self._untrack(client)
            return
        self._track(upstream)
        threading.Thread(target=self._pipe, args=(upstream, client), daemon=True).start()
        self._pipe(client, upstream)

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                self._flowing.wait()
                if self.mode == 'reset':
                    break
                sink.sendall(data)
        for end in (source, sink):
            if self.mode == 'reset':
                _reset(end)  # NOTE: an RST, never the FIN of a shutdown: the peer must not see a clean end
            else:
                with contextlib.suppress(OSError):
                    end.shutdown(socket.SHUT_RDWR)
            self._untrack(end)

    def _track(self, sock: socket.socket) -> None:
        with self._lock:
            self._open.add(sock)

    def _untrack(self, sock: socket.socket) -> None:
        with self._lock:
            self._open.discard(sock)
        with contextlib.suppress(OSError):
            sock.close()


def _reset(sock: socket.socket) -> None:
    """Close ``sock`` with an RST; wake a thread blocked reading it first (SHUT_RD sends nothing)."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack('ii', 1, 0))
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RD)
    with contextlib.suppress(OSError):
        sock.close()


# -- the cluster ----------------------------------------------------------------------------------


@dataclasses.dataclass
class Engines:
    """The engines a cluster runs on, started once per test module (faults restore them)."""

    postgres: PostgreSQL
    seaweedfs: SeaweedFS

    @classmethod
    @contextlib.contextmanager
    def started(cls, directory: pathlib.Path) -> Iterator[Engines]:
        postgres = PostgreSQL()
        try:
            seaweedfs = SeaweedFS(directory / 'seaweedfs')
            try:
                yield cls(postgres, seaweedfs)
            finally:
                seaweedfs.stop()
        finally:
            postgres.stop()


class Cluster:
    """Two (or more) gunicorn nodes on one bucket and one index, each engine behind a ``FaultProxy``, nginx in front.

    ``deadline``: what a request may cost when an engine hangs, whole seconds (set as
    ``ISS_INDEX_TIMEOUT`` and ``ISS_S3_TIMEOUT``). ``reconcile_interval`` and ``reconcile_grace``
    (``ISS_RECONCILE_INTERVAL``, ``ISS_RECONCILE_GRACE``, and the sweep for objects without a
    row as often, ``ISS_RECONCILE_SWEEP``): a write left half-done is settled once its grace
    has passed, at the next pass; so ``settle_seconds`` after a fault every content is
    complete or absent. Settings a node does not know are ignored: the suite runs on code
    from before them, and says what fails there.

    ``pgbouncer``: the nodes reach the index through PgBouncer in transaction pooling (a database of
    its own, the README's setup for more nodes than PostgreSQL's connections allow) instead of through
    the index's ``FaultProxy``; PostgreSQL's faults are then PgBouncer's server's.
    """

    def __init__(
        self,
        engines: Engines,
        workdir: pathlib.Path,
        nodes: int = 2,
        deadline: int = 2,
        reconcile_interval: int = 1,
        reconcile_grace: int = 3,
        pgbouncer: bool = False,
        **env: str,
    ) -> None:
        self.engines = engines
        self.workdir = workdir
        self.deadline = deadline
        self.settle_seconds = reconcile_grace + reconcile_interval
        self.index_proxy = FaultProxy(engines.postgres.port)
        self.s3_proxy = FaultProxy(engines.seaweedfs.port)
        direct = s3_node_environment(engines.seaweedfs, engines.postgres)
        self.index_url = direct['ISS_INDEX']
        self.bucket, _, prefix = direct['ISS_STORE'][len('s3://') :].partition('/')
        self.prefix = prefix + '/'
        self.s3_endpoint = f'http://127.0.0.1:{self.s3_proxy.port}'
        self.env = {
            **direct,
            'ISS_INDEX': self.index_url.replace(f':{engines.postgres.port}/', f':{self.index_proxy.port}/'),
            'ISS_S3_ENDPOINT': self.s3_endpoint,
            'ISS_ADMIN_TOKEN': 'admin',
            'ISS_ACCEL_REDIRECT': '/_internal/s3/',
            # NOTE: the workload's larger blobs (above it) are fetched by nginx from the bucket, the smaller by ISS.
            'ISS_ACCEL_MIN_BYTES': str(64 * 1024),
            'ISS_INDEX_TIMEOUT': str(deadline),
            'ISS_S3_TIMEOUT': str(deadline),
            'ISS_RECONCILE_INTERVAL': str(reconcile_interval),
            'ISS_RECONCILE_GRACE': str(reconcile_grace),
            'ISS_RECONCILE_SWEEP': str(reconcile_interval),
            **env,
        }
        self.bouncer: PgBouncer | None = None
        if pgbouncer:
            database = engines.postgres.new_own_database()
            self.bouncer = PgBouncer(engines.postgres, database, server_connections=4)
            self.index_url = engines.postgres.url(database)
            # NOTE: PgBouncer keeps no prepared statement across transactions
            self.env |= {'ISS_INDEX': self.bouncer.url(), 'ISS_INDEX_PREPARED': '0'}
        self.nodes: list[Gunicorn] = []
        self.nginx: Nginx | None = None
        # NOTE: nginx's workers run as nobody: its cache cannot be under pytest's 0700 tmp.
        self._shared = pathlib.Path(tempfile.mkdtemp(prefix='iss-chaos-'))
        self._shared.chmod(0o755)
        try:
            # PERF: started together: each takes seconds to answer /health.
            with concurrent.futures.ThreadPoolExecutor(nodes) as starting:
                started = [starting.submit(self._start_node, number) for number in range(nodes)]
            # NOTE: the nodes that did start are kept, so that stop() ends them when another did not.
            self.nodes.extend(node.result() for node in started if node.exception() is None)
            for node in started:
                node.result()
            (workdir / 'nginx').mkdir()
            self.nginx = Nginx(
                workdir / 'nginx',
                [node.port for node in self.nodes],
                self._shared / 'data',
                self.s3_endpoint,
                s3_timeout=self.deadline,
            )
        except BaseException:
            self.stop()
            raise

    def _start_node(self, number: int, port: int | None = None) -> Gunicorn:
        name = f'node{number}'
        return Gunicorn(self.workdir / name, self.workdir / f'{name}.log', port=port, **self.env)

    @property
    def port(self) -> int:
        """nginx's: where the clients go."""
        assert self.nginx is not None
        return self.nginx.port

    def stop(self) -> None:
        for proxy in (self.index_proxy, self.s3_proxy):
            proxy.heal()
        with contextlib.suppress(ProcessLookupError):
            self.thaw('postgres')
        with contextlib.suppress(ProcessLookupError):
            self.thaw('s3')
        if self.nginx is not None:
            self.nginx.stop()
        # NOTE: killed, not stopped: a node holding requests stuck on an engine takes its whole graceful timeout.
        for node in self.nodes:
            if node.process.poll() is None:
                node.kill()
            node._log.close()
        for proxy in (self.index_proxy, self.s3_proxy):
            proxy.close()
        if self.bouncer is not None:
            self.bouncer.stop()
        shutil.rmtree(self._shared, ignore_errors=True)

    # -- faults --

    def _signal(self, engine: str, signum: int) -> None:
        if engine == 'postgres':
            self.engines.postgres.signal(signum)
        else:
            os.killpg(self.engines.seaweedfs.process.pid, signum)  # NOTE: its own session, one process group

    def freeze(self, engine: str) -> None:
        """SIGSTOP every process of ``engine`` ('postgres' or 's3'): a stuck disk or a failover, seen from outside."""
        self._signal(engine, signal.SIGSTOP)

    def thaw(self, engine: str) -> None:
        self._signal(engine, signal.SIGCONT)

    def kill_engine(self, engine: str) -> None:
        if engine == 'postgres':
            self.engines.postgres.kill()
        else:
            self.engines.seaweedfs.kill()
            self.engines.seaweedfs._log.close()

    def restart_engine(self, engine: str) -> None:
        (self.engines.postgres if engine == 'postgres' else self.engines.seaweedfs).start()

    def proxy(self, engine: str) -> FaultProxy:
        return self.index_proxy if engine == 'postgres' else self.s3_proxy

    def kill_node(self, number: int) -> None:
        self.nodes[number].kill()
        self.nodes[number]._log.close()

    def restart_node(self, number: int) -> None:
        self.nodes[number] = self._start_node(number, self.nodes[number].port)

    # -- what the engines hold, seen directly --

    def bucket_objects(self, top: str) -> dict[str, int]:
        """``{key below top: size}`` of the store's objects."""
        s3 = self.engines.seaweedfs.client()
        found: dict[str, int] = {}
        for page in s3.get_paginator('list_objects_v2').paginate(Bucket=self.bucket, Prefix=self.prefix + top):
            for entry in page.get('Contents', []):
                found[entry['Key'][len(self.prefix + top) :]] = entry['Size']
        return found

    def index_rows(self) -> dict[str, int]:
        """``{hex: bytes}`` of the index's rows."""
        with psycopg.connect(self.index_url, connect_timeout=10) as db:
            return {hex_digest: size for hex_digest, size in db.execute('SELECT hex, bytes FROM blobs').fetchall()}


@contextlib.contextmanager
def cluster(engines: Engines, workdir: pathlib.Path, **options: Any) -> Iterator[Cluster]:
    started = Cluster(engines, workdir, **options)
    try:
        yield started
    finally:
        started.stop()


# -- requests ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class Call:
    """One request of the workload: what, when (seconds since the workload began), how long, the answer."""

    op: str
    started: float
    seconds: float = 0.0
    status: int | None = None  # NOTE: None: no answer (the client gave up, or the connection broke)
    error: str = ''
    retry_after: bool = False
    json_body: bool = False

    def refused_properly(self) -> bool:
        """A 503 as the promise words it: JSON, with Retry-After."""
        return self.status == 503 and self.json_body and self.retry_after


@dataclasses.dataclass
class Answer:
    status: int
    headers: http.client.HTTPMessage
    body: bytes


def send(
    port: int,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 30.0,
) -> Answer:
    conn = http.client.HTTPConnection('127.0.0.1', port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return Answer(response.status, response.headers, response.read())
    finally:
        conn.close()


def blob_id(data: bytes) -> str:
    return 'sha256:' + hashlib.sha256(data).hexdigest()


@dataclasses.dataclass
class Ledger:
    """What the clients were told. ``uncertain``: uploads and deletes whose outcome no answer said."""

    uploaded: dict[str, bytes] = dataclasses.field(default_factory=dict)
    deleted: set[str] = dataclasses.field(default_factory=set)
    uncertain: set[str] = dataclasses.field(default_factory=set)
    corrupt_reads: list[str] = dataclasses.field(default_factory=list)


class Workload:
    """Clients through nginx, each its own thread, until ``stop()``; every request is a ``Call``.

    Each client uploads contents no other client sends (single POSTs, batches of three,
    tus sessions of two chunks), reads back and deletes only its own, and lists, asks
    ``/stats`` and ``/health``. ``timeout``: how long a client waits for an answer.
    """

    def __init__(self, port: int, clients: int, timeout: float, seed: int = 24) -> None:
        self.port = port
        self.timeout = timeout
        self.calls: list[Call] = []
        self.ledger = Ledger()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._began = time.monotonic()
        self._threads = [
            threading.Thread(target=self._client, args=(random.Random(seed + n), n), daemon=True)
            for n in range(clients)
        ]
        for thread in self._threads:
            thread.start()

    def now(self) -> float:
        return time.monotonic() - self._began

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(self.timeout * 3 + 10)

    # -- one client --

    def _client(self, rng: random.Random, number: int) -> None:
        own: list[str] = []
        serial = 0
        while not self._stop.is_set():
            serial += 1
            roll = rng.random()
            if roll < 0.30:
                self._upload(rng, number, serial, own)
            elif roll < 0.40:
                self._batch(rng, number, serial, own)
            elif roll < 0.47:
                self._tus(rng, number, serial, own)
            elif roll < 0.57 and own:
                self._delete(own.pop(rng.randrange(len(own))))
            elif roll < 0.80 and own:
                self._read(rng.choice(own))
            elif roll < 0.90:
                self._call('list', 'GET', f'/artifacts?kind={KIND}&limit=50', ok=(200,))
            elif roll < 0.95:
                self._call('stats', 'GET', '/stats', ok=(200,))
            else:
                self._call('health', 'GET', '/health', ok=(200,))
            time.sleep(rng.uniform(0.0, 0.05))

    def _content(self, rng: random.Random, number: int, serial: int) -> bytes:
        # NOTE: a mix: small ones ISS sends and nginx caches, larger ones nginx fetches from the bucket.
        size = rng.choice((rng.randrange(100, 8192), rng.randrange(80 * 1024, 200 * 1024)))
        return f'client {number} upload {serial} '.encode() + rng.randbytes(size)

    def _call(
        self,
        op: str,
        method: str,
        path: str,
        ok: tuple[int, ...],
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> Answer | None:
        """Send one request, record it; the answer if its status is in ``ok``."""
        call = Call(op, self.now())
        answer: Answer | None = None
        try:
            answer = send(self.port, method, path, body, headers, timeout=self.timeout)
        except (OSError, http.client.HTTPException) as exc:
            call.error = f'{type(exc).__name__}: {exc}'
        call.seconds = self.now() - call.started
        if answer is not None:
            call.status = answer.status
            call.retry_after = answer.headers.get('Retry-After') is not None
            call.json_body = answer.headers.get_content_type() == 'application/json' and _is_json(answer.body)
            if answer.status not in ok and not call.refused_properly():
                call.error = answer.body[:200].decode(errors='replace')
        with self._lock:
            self.calls.append(call)
        return answer if answer is not None and answer.status in ok else None

    def _upload(self, rng: random.Random, number: int, serial: int, own: list[str]) -> None:
        data = self._content(rng, number, serial)
        digest = blob_id(data)
        answer = self._call(
            'upload',
            'POST',
            f'/artifacts?kind={KIND}',
            ok=(201,),
            body=data,
            headers={'Content-Type': 'application/octet-stream'},
        )
        self._settle_upload(
            {digest: data}, answer is not None and json.loads(answer.body)['artifact_id'] == digest, own
        )

    def _batch(self, rng: random.Random, number: int, serial: int, own: list[str]) -> None:
        contents = [self._content(rng, number, serial * 10 + part) for part in range(3)]
        boundary = f'chaos-{number}-{serial}'
        body = (
            b''.join(
                f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="f{n}.bin"\r\n'
                'Content-Type: application/octet-stream\r\n\r\n'.encode()
                + data
                + b'\r\n'
                for n, data in enumerate(contents)
            )
            + f'--{boundary}--\r\n'.encode()
        )
        answer = self._call(
            'batch',
            'POST',
            f'/artifacts?kind={KIND}',
            ok=(201,),
            body=body,
            headers={'Content-Type': f'multipart/form-data; boundary={boundary}'},
        )
        stored = answer is not None and [entry['artifact_id'] for entry in json.loads(answer.body)] == [
            blob_id(data) for data in contents
        ]
        self._settle_upload({blob_id(data): data for data in contents}, stored, own)

    def _tus(self, rng: random.Random, number: int, serial: int, own: list[str]) -> None:
        data = self._content(rng, number, serial)
        half = len(data) // 2
        kind = base64.b64encode(KIND.encode()).decode()
        tus = {'Tus-Resumable': '1.0.0'}
        created = self._call(
            'tus',
            'POST',
            '/uploads',
            ok=(201,),
            headers={**tus, 'Upload-Length': str(len(data)), 'Upload-Metadata': f'kind {kind}', 'Content-Length': '0'},
        )
        answer = None
        if created is not None:
            path = urllib.parse.urlsplit(created.headers['Location']).path
            chunk = {**tus, 'Content-Type': 'application/offset+octet-stream'}
            if self._call('tus', 'PATCH', path, ok=(204,), body=data[:half], headers={**chunk, 'Upload-Offset': '0'}):
                answer = self._call(
                    'tus', 'PATCH', path, ok=(204,), body=data[half:], headers={**chunk, 'Upload-Offset': str(half)}
                )
        self._settle_upload(
            {blob_id(data): data}, answer is not None and answer.headers.get('ISS-Blob-Id') == blob_id(data), own
        )

    def _settle_upload(self, contents: dict[str, bytes], acknowledged: bool, own: list[str]) -> None:
        with self._lock:
            if acknowledged:
                self.ledger.uploaded.update(contents)
            else:
                self.ledger.uncertain.update(contents)
        if acknowledged:
            own.extend(contents)

    def _delete(self, digest: str) -> None:
        answer = self._call('delete', 'DELETE', f'/artifacts/{digest}', ok=(204,), headers=ADMIN)
        with self._lock:
            (self.ledger.deleted.add if answer is not None else self.ledger.uncertain.add)(digest)

    def _read(self, digest: str) -> None:
        answer = self._call('read', 'GET', f'/artifacts/{digest}', ok=(200,))
        if answer is not None and blob_id(answer.body) != digest:
            with self._lock:
                self.ledger.corrupt_reads.append(f'{digest}: {len(answer.body)} bytes that hash otherwise')


def _is_json(body: bytes) -> bool:
    try:
        json.loads(body)
    except ValueError:
        return False
    return True


# -- a fault's run, and the checker -------------------------------------------------------------------


@dataclasses.dataclass
class Run:
    """A workload with one fault in its middle: when the fault began and ended, on the workload's clock."""

    workload: Workload
    fault_began: float = 0.0
    fault_ended: float = 0.0


def run(
    target: Cluster,
    begin: Callable[[], None],
    end: Callable[[], None],
    seconds: float,
    midway: Callable[[], None] | None = None,
    midway_at: float = 0.5,
    clients: int = 6,
    before: float = 2.0,
    after: float = 4.0,
) -> Run:
    """A workload through ``target``'s nginx: ``before`` s calm, the fault (``begin``, ``seconds``, ``end``), ``after``.

    ``midway``: what changes ``midway_at`` through the fault (0.5: halfway), a partition turned into resets, say.
    """
    run = Run(Workload(target.port, clients, timeout=target.deadline + 4))
    try:
        time.sleep(before)
        run.fault_began = run.workload.now()
        begin()
        try:
            if midway is not None:
                time.sleep(seconds * midway_at)
                midway()
            time.sleep(max(0.0, run.fault_began + seconds - run.workload.now()))
        finally:
            end()
            run.fault_ended = run.workload.now()
        time.sleep(after)
    finally:
        run.workload.stop()
    return run


@dataclasses.dataclass
class Report:
    """What the checker found: the promises broken (``problems``), and what was measured (``measured``)."""

    problems: list[str] = dataclasses.field(default_factory=list)
    measured: dict[str, object] = dataclasses.field(default_factory=dict)

    def broken(self, what: str, examples: list[str], limit: int = 3) -> None:
        if examples:
            self.problems.append(f'{what}: {len(examples)}, e.g. ' + '; '.join(examples[:limit]))

    def summary(self) -> str:
        return '\n'.join(['', *self.problems, f'measured: {json.dumps(self.measured)}'])


def check(target: Cluster, run: Run, recover_within: float = 60.0) -> Report:
    """Check the promise on ``target`` after ``run`` (its fault healed); the report measures the fault too."""
    report = Report()
    calls = run.workload.calls
    ledger = run.workload.ledger
    report.measured.update(_measure(run, target.deadline))

    ready = time.monotonic()
    try:
        wait_for(
            lambda: all(_status(node.port, '/health') == 200 for node in target.nodes),
            seconds=recover_within,
            message='every node healthy',
        )
    except AssertionError:
        report.problems.append(f"not every node answered /health 200 within {recover_within:g} s of the fault's end")
    report.measured['healthy_after_s'] = round(time.monotonic() - ready + run.workload.now() - run.fault_ended, 1)
    # NOTE: the reconciler's grace and one interval (and nginx's cache validity, 2 s) after the last request.
    time.sleep(max(target.settle_seconds, 2) + 1)

    wrong: dict[str, list[Call]] = collections.defaultdict(list)
    for c in calls:
        if c.error and not c.refused_properly():
            wrong[f'{c.op} {c.status or "none"}'].append(c)
    report.broken(
        'answers neither a success nor a JSON 503 with Retry-After '
        f'({", ".join(f"{kind} x{len(some)}" for kind, some in wrong.items())})',
        # NOTE: one example of each kind of wrong answer
        [
            f'{c.op} at {c.started:.1f}s: {c.status or "no answer"}{"" if c.retry_after else " (no Retry-After)"} '
            f'{c.error[:160]}'
            for c in (some[0] for some in wrong.values())
        ],
        limit=len(wrong),
    )
    slow = sorted((c for c in calls if c.seconds > target.deadline + 1), key=lambda c: -c.seconds)
    report.broken(
        f'requests that waited longer than the deadline + 1 s ({target.deadline + 1:g} s)',
        [f'{c.op} at {c.started:.1f}s took {c.seconds:.1f}s ({c.status or c.error[:60]})' for c in slow],
    )
    report.broken('reads through nginx whose bytes did not hash to their id', ledger.corrupt_reads)

    live = {digest: data for digest, data in ledger.uploaded.items() if digest not in ledger.deleted | ledger.uncertain}
    reads = [(node.port, digest) for node in target.nodes for digest in live]
    gone = [(node.port, digest) for node in target.nodes for digest in ledger.deleted]
    # PERF: hundreds of reads per node: several at once.
    with concurrent.futures.ThreadPoolExecutor(8) as reading:
        got = list(reading.map(lambda read: _read_through_node(target, *read), reads))
        answered = list(reading.map(lambda read: _status(read[0], f'/artifacts/{read[1]}'), gone))
    report.broken(
        'acknowledged uploads not readable byte-exact from every node',
        [
            f'{digest[:19]}… on :{port}: {found if isinstance(found, str) else "other bytes"}'
            for (port, digest), found in zip(reads, got, strict=True)
            if found != live[digest]
        ],
    )
    report.broken(
        'acknowledged deletes still served',
        [
            f'{digest[:19]}… on :{port}: {status}'
            for (port, digest), status in zip(gone, answered, strict=True)
            if status != 404
        ],
    )

    blobs = {key.rpartition('/')[2]: size for key, size in target.bucket_objects('blobs/').items()}
    metas = {key.rpartition('/')[2].removesuffix('.json') for key in target.bucket_objects('meta/')}
    rows = target.index_rows()
    report.measured['bucket_blobs'] = len(blobs)
    report.broken('blobs without meta', sorted(set(blobs) - metas))
    report.broken('metas without blob', sorted(metas - set(blobs)))
    report.broken('blobs without an index row', sorted(set(blobs) - set(rows)))
    report.broken('index rows without blob', sorted(set(rows) - set(blobs)))
    report.broken(
        "index rows whose size is not the blob's",
        [f'{h}: {rows[h]} != {blobs[h]}' for h in sorted(set(rows) & set(blobs)) if rows[h] != blobs[h]],
    )
    report.broken('acknowledged uploads absent from the bucket', [d for d in live if d[7:] not in blobs])
    report.broken('acknowledged deletes still in the bucket', [d for d in ledger.deleted if d[7:] in blobs])

    # NOTE: each node's answer, and nginx's: one index behind them all, but each node its own connections to it.
    for name, port in [('nginx', target.port), *((f'node :{node.port}', node.port) for node in target.nodes)]:
        listed = _listing(port)
        report.broken(f'blobs the listings miss ({name})', sorted(set(blobs) - listed))
        report.broken(f'listed ids that are not in the bucket ({name})', sorted(listed - set(blobs)))
        stats = json.loads(send(port, 'GET', '/stats').body)
        if (stats.get('count'), stats.get('bytes')) != (len(blobs), sum(blobs.values())):
            report.problems.append(
                f'/stats ({name}) says {stats.get("count")} blobs of {stats.get("bytes")} bytes; '
                f'the bucket holds {len(blobs)} of {sum(blobs.values())}'
            )
    return report


def _measure(run: Run, deadline: float) -> dict[str, object]:
    """What clients saw while the fault lasted, how long they waited, how long until every request succeeded again."""
    calls = run.workload.calls
    # NOTE: a request that was waiting when the fault began is one of the fault's too.
    during = [c for c in calls if c.started < run.fault_ended and c.started + c.seconds > run.fault_began]
    seen = collections.Counter(f'{c.op} {c.status or "none"}' for c in during)
    calm = collections.Counter(
        f'{c.op} {c.status or "none"}' for c in calls if c.error and c.started + c.seconds <= run.fault_began
    )
    # NOTE: unavailable (5xx, no answer), not refused (a 4xx says something else is wrong, fault or none).
    failed_after = [
        c.started + c.seconds
        for c in calls
        if c.error and (c.status or 500) >= 500 and c.started + c.seconds >= run.fault_ended
    ]
    latencies = sorted(c.seconds for c in during) or [0.0]
    return {
        'requests': len(calls),
        'failed_before_fault': dict(sorted(calm.items())),
        'during_fault': dict(sorted(seen.items())),
        'health_max_s': round(max((c.seconds for c in during if c.op == 'health'), default=0.0), 2),
        'answer_p50_s': round(latencies[len(latencies) // 2], 2),
        'answer_max_s': round(latencies[-1], 2),
        'slowest_anywhere_s': round(max((c.seconds for c in calls), default=0.0), 2),
        'failures_after_fault': len(failed_after),
        'recovered_after_s': round(max(failed_after, default=run.fault_ended) - run.fault_ended, 1),
        'acknowledged_uploads': len(run.workload.ledger.uploaded),
        'acknowledged_deletes': len(run.workload.ledger.deleted),
        'uncertain': len(run.workload.ledger.uncertain),
    }


def _status(port: int, path: str) -> int | None:
    try:
        return send(port, 'GET', path, timeout=10).status
    except (OSError, http.client.HTTPException):
        return None


def _read_through_node(target: Cluster, port: int, digest: str) -> bytes | str:
    """A GET of ``digest`` from one node; a blob it hands to nginx is fetched from the bucket as nginx would."""
    try:
        answer = send(port, 'GET', f'/artifacts/{digest}', timeout=10)
        if answer.status != 200:
            return f'{answer.status} {answer.body[:80]!r}'
        offloaded = answer.headers.get('X-Accel-Redirect')
        if offloaded is None:
            return answer.body
        fetched = send(target.s3_proxy.port, 'GET', '/' + offloaded.removeprefix('/_internal/s3/'), timeout=10)
        return fetched.body if fetched.status == 200 else f'bucket {fetched.status}'
    except (OSError, http.client.HTTPException) as exc:
        return f'{type(exc).__name__}: {exc}'


def _listing(port: int) -> set[str]:
    """Every hex the listings (both doors, every page) name."""
    listed: set[str] = set()
    for door in ('artifacts', 'images'):
        path: str | None = f'/{door}?limit=1000'
        while path is not None:
            answer = send(port, 'GET', path)
            assert answer.status == 200, f'{path}: {answer.status} {answer.body[:200]!r}'
            page = json.loads(answer.body)
            listed.update(item['id'][len('sha256:') :] for item in page['items'])
            path = page['next']
    return listed
