"""What download.py and small_get.py share: nginx sending ISS's own blob files, and taking turns."""

import argparse
import contextlib
import os
import shutil
import signal
import tempfile
import types
from collections.abc import Callable, Iterator
from typing import TypeVar

from bench import iss_bench

_T = TypeVar('_T')


def arguments(description: str) -> argparse.ArgumentParser:
    """The options both scripts take: which ISS, its data directory, how many rounds."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument('--url', required=True, help='ISS, e.g. http://127.0.0.1:8800')
    parser.add_argument('--data-dir', required=True, help="that ISS's ISS_DATA")
    parser.add_argument('--rounds', type=int, default=5)
    return parser


@contextlib.contextmanager
def nginx_on_blobs(data_dir: str) -> Iterator[Callable[[str], str]]:
    """nginx serving the blob files under ``data_dir``; yields a blob's URL for its hex digest.

    NOTE: the shared benchmark's own nginx, so the limit is configured as it is there.
    """
    work = tempfile.mkdtemp(prefix='iss-nginx-')
    nginx = None
    try:
        nginx, port = iss_bench.start_nginx(
            types.SimpleNamespace(workdir=work, nginx_port=0, nginx_workers='1'),
            os.path.abspath(os.path.join(data_dir, 'blobs')),
        )
        yield lambda hex_digest: f'http://127.0.0.1:{port}/{hex_digest[:2]}/{hex_digest[2:4]}/{hex_digest}'
    finally:
        if nginx is not None:
            nginx.send_signal(signal.SIGQUIT)
            nginx.wait(10)
        shutil.rmtree(work)


def take_turns(targets: dict[str, str], measure: Callable[[str], _T], rounds: int) -> dict[str, list[_T]]:
    """``measure`` each target in turn, ``rounds`` times, after one warm-up each (connections, caches)."""
    for url in targets.values():
        measure(url)
    results: dict[str, list[_T]] = {name: [] for name in targets}
    for _ in range(rounds):
        for name, url in targets.items():
            results[name].append(measure(url))
    return results
