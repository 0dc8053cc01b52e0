"""The ways tests call ISS besides HTTP: the command line (``python -m iss``), and a form upload through WebTest."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

from iss_testing import HERE


def upload_image(client, data: bytes, name: str = 'x.png', **kwargs):
    """POST ``data`` to /images as a form's file field, through a WebTest client."""
    return client.post('/images', upload_files=[('file', name, data, 'image/png')], **kwargs)


def run_cli(
    *args: str, data_dir: pathlib.Path | None = None, environment: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run ``python -m iss ARGS`` on ``data_dir`` (and ``environment``: a store's settings), as an operator does."""
    env = {**os.environ, **(environment or {}), 'ISS_DATA': str(data_dir or '/nonexistent')}
    return subprocess.run(
        [sys.executable, '-m', 'iss', *args], cwd=HERE, env=env, capture_output=True, text=True, timeout=120
    )


def cli_json(data_dir: pathlib.Path, *args: str, expect: int = 0, environment: dict[str, str] | None = None) -> dict:
    """Run ``python -m iss --json ARGS``; check its exit status and return its report."""
    result = run_cli('--json', *args, data_dir=data_dir, environment=environment)
    assert result.returncode == expect, result.stdout + result.stderr
    return json.loads(result.stdout)
