"""What tus.py, browse.py and client.py share: ``gunicorn iss:app`` from this tree on a free port, a big file."""

import hashlib
import os
import pathlib
import signal
import subprocess
import sys
import time
import urllib.request

from iss_testing import HERE


def start_server(data: pathlib.Path, port: int) -> subprocess.Popen:
    """gunicorn with the default settings on ``data``, once it answers /health; its own process group."""
    env = {**os.environ, 'ISS_DATA': str(data), 'ISS_PORT': str(port), 'ISS_LOG_LEVEL': 'warning'}
    process = subprocess.Popen([sys.executable, '-m', 'gunicorn', 'iss:app'], cwd=HERE, env=env, start_new_session=True)
    for _ in range(200):
        try:
            urllib.request.urlopen(f'http://127.0.0.1:{port}/health', timeout=1)
            return process
        except OSError:
            time.sleep(0.1)
    raise SystemExit('gunicorn did not start')


def stop_server(process: subprocess.Popen) -> None:
    os.killpg(process.pid, signal.SIGTERM)
    process.wait(30)


def big_file(path: pathlib.Path, mib: int) -> str:
    """Write ``mib`` MiB of new random bytes to ``path``; return their sha256 hex."""
    sha256 = hashlib.sha256()
    with open(path, 'wb') as out:
        for _ in range(mib):
            block = os.urandom(1024 * 1024)
            sha256.update(block)
            out.write(block)
    return sha256.hexdigest()


def tree_rss_kib(pid: int) -> int:
    """The summed resident memory of a process and its children (gunicorn's master and workers), in KiB."""
    children = pathlib.Path(f'/proc/{pid}/task/{pid}/children').read_text().split()
    total = 0
    for each in (pid, *map(int, children)):
        for line in pathlib.Path(f'/proc/{each}/status').read_text().splitlines():
            if line.startswith('VmRSS:'):
                total += int(line.split()[1])
    return total
