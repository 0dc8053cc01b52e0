"""What the before/after benches share: nginx sending ISS's own blob files, and taking turns (rounds)."""

import argparse
import contextlib
import os
import shutil
import signal
import tempfile
import types
from collections.abc import Callable, Iterator, Sequence
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


def alternating_rounds(
    rounds: int,
    cases: dict[str, Sequence[str]],
    measure: Callable[[str, str], _T],
    show: Callable[[_T], str] = str,
    after_round: Callable[[int], None] | None = None,
) -> dict[str, dict[str, list[_T]]]:
    """``measure(case, side)`` of every case's sides, round after round; each case's results per side, in rounds.

    NOTE: the sides take turns within a case, their order reversed every other round, so that
    neither always runs first (right after a warm-up, or another side's load) on a shared machine:
    read the ratios of sides measured in the same round. Each value is printed as it comes
    (``show``); ``after_round(number)`` runs after each round, for what is measured once a round.
    """
    results: dict[str, dict[str, list[_T]]] = {case: {side: [] for side in sides} for case, sides in cases.items()}
    for number in range(1, rounds + 1):
        for case, sides in cases.items():
            for side in sides if number % 2 else sides[::-1]:
                value = measure(case, side)
                results[case][side].append(value)
                print(f'round {number} {case} {side}: {show(value)}', flush=True)
        if after_round is not None:
            after_round(number)
    return results
