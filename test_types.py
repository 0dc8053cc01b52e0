"""The product code passes mypy (mypy.ini), strictly enough that a driver missing a method fails,
and so does code typed against one backend."""

import ast
import pathlib
import re
import subprocess
import sys
import textwrap

import pytest

HERE = pathlib.Path(__file__).parent


@pytest.fixture(scope='module')
def cache_dir(tmp_path_factory):
    """mypy's cache for this module's runs: the later ones reuse what the first checked.

    NOTE: a directory of this test session's, so that runs in parallel never share one.
    """
    return tmp_path_factory.mktemp('mypy-cache')


def mypy(cache_dir: pathlib.Path, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, '-m', 'mypy', '--config-file', str(HERE / 'mypy.ini'), '--cache-dir', str(cache_dir)]
    return subprocess.run([*command, *args], cwd=HERE, capture_output=True, text=True)


def test_product_code_passes_mypy(cache_dir):
    result = mypy(cache_dir)

    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith('Success: no issues found')


def test_a_driver_missing_a_method_fails_mypy(tmp_path, cache_dir):
    # NOTE: a copy of the file driver without its remove(), handed to the store as
    # open_store hands the real one: the store takes a Driver, so the call is refused.
    source = (HERE / 'iss_server' / 'drivers' / 'file.py').read_text()
    tree = ast.parse(source)
    driver = next(node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == 'FileDriver')
    driver.body = [node for node in driver.body if not (isinstance(node, ast.FunctionDef) and node.name == 'remove')]
    lacking = tmp_path / 'lacking_driver.py'
    lacking.write_text(
        ast.unparse(tree)
        + textwrap.dedent("""

            import storage
            from iss_server import index


            def store(layout: disk.Layout, index_: index.Index) -> storage.BlobStore:
                return storage.BlobStore(FileDriver(layout, ('blobs',)), index_, layout)
        """)
    )

    result = mypy(cache_dir, str(lacking))

    output = result.stdout + result.stderr
    assert re.search(r'lacking_driver\.py:\d+: error: .* type "FileDriver"; expected "Driver"', output), output
    assert re.search(r'lacking_driver\.py:\d+: note: +remove$', output, re.M), output
    assert result.returncode == 1


def test_code_typed_against_one_backend_fails_mypy(tmp_path, cache_dir):
    # NOTE: a resource reaching past the store to what only the file driver has (its layout).
    module = tmp_path / 'one_backend.py'
    module.write_text(
        textwrap.dedent("""
            import storage


            def data_dir(store: storage.BlobStore) -> str:
                return store._driver.layout.root
        """)
    )

    result = mypy(cache_dir, str(module))

    output = result.stdout + result.stderr
    assert re.search(r'one_backend\.py:\d+: error: "Driver" has no attribute "layout"', output), output
    assert result.returncode == 1
