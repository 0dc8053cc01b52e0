"""iss-client against what a user would otherwise run, alternated in one run.

    python -m bench.client --url http://127.0.0.1:8000 [--files 2000] [--mib 512] [--rounds 3]

Small files: ``--files`` new 4 KiB files each round, pushed with ``iss-client push -j 8``,
against the same number of other new files sent by one sequential ``requests`` loop (a
Session, so keep-alive: the stronger baseline). Large file: ``--mib`` of new bytes each round,
pushed with ``iss-client push`` (which hashes the file first, asks whether it is stored, then
PUTs it under its id), against ``curl -T`` of the same size to ``PUT /artifacts/{id}`` with the
id already known, and against ``sha256sum`` then ``curl -T`` (what a script must do to PUT).
Each pair runs back to back, the order alternating; prints the median rate of each and the
median of the pairs' ratios. Needs curl and requests (in requirements-dev.txt's venv).
"""

import argparse
import functools
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import requests

from bench.local_server import big_file

HERE = pathlib.Path(__file__).resolve().parent.parent
CLIENT = [sys.executable, '-m', 'iss_client']  # NOTE: run in the checkout (cwd=HERE)


def new_files(folder: pathlib.Path, count: int) -> list[pathlib.Path]:
    folder.mkdir(parents=True)
    paths = []
    for number in range(count):
        path = folder / f'f{number:05d}.bin'
        path.write_bytes(os.urandom(4096))
        paths.append(path)
    return paths


def timed(run) -> float:
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


def push(url: str, *paths: pathlib.Path) -> None:
    subprocess.run(
        [*CLIENT, '--url', url, '-q', 'push', '--kind', 'bench', *map(str, paths)],
        check=True,
        stdout=subprocess.DEVNULL,
        cwd=HERE,
    )


def requests_loop(url: str, paths: list[pathlib.Path]) -> None:
    with requests.Session() as session:
        for path in paths:
            with open(path, 'rb') as file:
                session.post(f'{url}/artifacts?kind=bench', data=file).raise_for_status()


def curl_put(url: str, path: pathlib.Path, hex_digest: str) -> None:
    subprocess.run(
        ['curl', '-sf', '-o', '/dev/null', '-T', str(path), f'{url}/artifacts/sha256:{hex_digest}?kind=bench'],
        check=True,
    )


def sha256sum_then_curl(url: str, path: pathlib.Path) -> None:
    hex_digest = subprocess.run(['sha256sum', str(path)], check=True, capture_output=True, text=True).stdout[:64]
    curl_put(url, path, hex_digest)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--url', required=True)
    parser.add_argument('--files', type=int, default=2000)
    parser.add_argument('--mib', type=int, default=512)
    parser.add_argument('--rounds', type=int, default=3)
    args = parser.parse_args()
    work = pathlib.Path(tempfile.mkdtemp(prefix='iss-client-bench-'))
    small: dict[str, list[float]] = {'push -j 8': [], 'requests loop': []}
    large: dict[str, list[float]] = {'push': [], 'curl -T': [], 'sha256sum + curl -T': []}
    try:
        for number in range(args.rounds):
            pushed, looped = work / f'push{number}', work / f'loop{number}'
            new_files(pushed, args.files)
            small_runs = {
                'push -j 8': functools.partial(push, args.url, pushed),
                'requests loop': functools.partial(requests_loop, args.url, new_files(looped, args.files)),
            }
            for name in small_runs if number % 2 == 0 else reversed(small_runs):
                small[name].append(args.files / timed(small_runs[name]))
            files = {name: work / f'{number}-{index}.bin' for index, name in enumerate(large)}
            digests = {name: big_file(path, args.mib) for name, path in files.items()}
            large_runs = {
                'push': functools.partial(push, args.url, files['push']),
                'curl -T': functools.partial(curl_put, args.url, files['curl -T'], digests['curl -T']),
                'sha256sum + curl -T': functools.partial(sha256sum_then_curl, args.url, files['sha256sum + curl -T']),
            }
            for name in large_runs if number % 2 == 0 else reversed(large_runs):
                subprocess.run(['sync'], check=True)
                large[name].append(args.mib * 1024 * 1024 / 1e6 / timed(large_runs[name]))
            for path in files.values():
                path.unlink()
    finally:
        shutil.rmtree(work)
    ratio = [a / b for a, b in zip(small['push -j 8'], small['requests loop'], strict=True)]
    print(
        f'{args.files} files of 4 KiB, median of {args.rounds}: push -j 8 {statistics.median(small["push -j 8"]):,.0f}'
        f' files/s, requests loop {statistics.median(small["requests loop"]):,.0f} files/s; ratio '
        f'{statistics.median(ratio):.2f}x ({min(ratio):.2f}-{max(ratio):.2f})'
    )
    for baseline in ('curl -T', 'sha256sum + curl -T'):
        ratio = [a / b for a, b in zip(large['push'], large[baseline], strict=True)]
        print(
            f'{args.mib} MiB, median of {args.rounds}: push {statistics.median(large["push"]):,.0f} MB/s, '
            f'{baseline} {statistics.median(large[baseline]):,.0f} MB/s; ratio {statistics.median(ratio):.2f}x '
            f'({min(ratio):.2f}-{max(ratio):.2f})'
        )
    return 0


if __name__ == '__main__':
    sys.exit(main())
