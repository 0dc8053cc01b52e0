"""The tests' fixtures: a WebTest client of ISS on each store, real gunicorn, SeaweedFS and PostgreSQL.

What the fixtures start and make lives in the package ``iss_testing`` (servers, the cutting
proxy, test data), which tests and benchmarks import.

Which tests run on both stores is declared: a test that takes ``client`` (or ``make_client``)
runs once per store in ``BACKENDS`` when it is marked ``both_stores`` (its module's
``pytestmark``) and not ``file_store``; any other runs on the file store only.
"""

from __future__ import annotations

import inspect
import pathlib
import shutil
import tempfile

import pytest
import webtest

import iss
from iss_server import background
from iss_server.config import Settings
from iss_testing.data import make_png
from iss_testing.servers import Gunicorn, PostgreSQL, SeaweedFS, s3_node_environment

#: The stores a ``both_stores`` test runs on; test_cluster.py checks that neither is left out.
BACKENDS = ('file', 's3')


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Give each test that takes a client the stores its markers declare."""
    if 'store_backend' not in metafunc.fixturenames:
        return
    marked = metafunc.definition.get_closest_marker
    on_both = marked('both_stores') is not None and marked('file_store') is None
    # NOTE: a test that looks at the data directory's files would find none on S3: it must say so.
    takes = inspect.signature(metafunc.function).parameters
    looks_at_files = 'data_dir' in metafunc.fixturenames or 'tmp_path' in takes
    if on_both and looks_at_files:
        raise pytest.UsageError(f'{metafunc.definition.nodeid} looks at files: mark it @pytest.mark.file_store')
    metafunc.parametrize('store_backend', BACKENDS if on_both else BACKENDS[:1], indirect=True)


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


@pytest.fixture(autouse=True)
def _background_stopped():
    """Stop the reconcilers, scrubbers and deliverers a test's apps started, when it ends."""
    yield
    for work in list(background.RUNNING):
        work.stop(timeout=10)


@pytest.fixture
def data_dir(tmp_path: pathlib.Path) -> pathlib.Path:
    """The data directory of the test's file store."""
    return tmp_path / 'data'


@pytest.fixture
def make_client(tmp_path: pathlib.Path, store_backend: dict[str, str]):
    """Make a WebTest client of ``iss.build_app`` on the test's store, with settings of the test's own."""

    def make(**settings) -> webtest.TestApp:
        # NOTE: no reconciler unless asked: its thread would outlive the test's directory
        settings.setdefault('reconcile_interval', 0)
        return webtest.TestApp(iss.build_app(Settings(data_dir=str(tmp_path / 'data'), **store_backend, **settings)))

    return make


@pytest.fixture
def client(make_client) -> webtest.TestApp:
    return make_client()


@pytest.fixture
def png() -> bytes:
    return make_png()


@pytest.fixture
def start(tmp_path: pathlib.Path):
    """Start ``gunicorn iss:app`` (on ``data_dir``, with env settings); each is stopped after the test."""
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


@pytest.fixture
def shared_data_dir():
    """A data directory another user (nginx's workers) can reach: not under pytest's 0700 tmp."""
    path = pathlib.Path(tempfile.mkdtemp(prefix='iss-nginx-'))
    path.chmod(0o755)
    yield path / 'data'
    shutil.rmtree(path)


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
    return s3_node_environment(seaweedfs, postgres)
