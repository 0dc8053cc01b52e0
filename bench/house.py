"""Two checkouts of ISS (before and after a redesign) on both stores, small and large requests, in one run.

    python -m bench.house OLD_CHECKOUT NEW_CHECKOUT [--rounds 3] [--seconds 5] [--mib 256]

For each checkout, two ``gunicorn iss:app`` with the default settings (2 workers x 16 threads):
one on a data directory, one on an S3 store (a prefix of one bucket of a real SeaweedFS, its
index a schema of a real PostgreSQL: ``iss_testing.servers``). Then, round after round, the
checkouts taking turns (old, new, old, new...), each measures:

- ``GET``: wrk (1 thread, 16 connections) on a stored 4 KiB PNG, file store;
- ``POST``: wrk, one distinct 4 KiB PNG per multipart ``POST /images`` (bench.small_post's
  script), file store;
- ``S3 PUT``: ``curl -T`` of ``--mib`` MiB of new bytes to ``PUT /artifacts/{id}`` on the S3 store,
  in seconds.

Prints each figure's median per side and the ratio new/old of the medians with the range of
the rounds' ratios: on a shared machine only a ratio taken in the same minute means much.
Needs wrk and curl. Both checkouts run on this checkout's .venv.
"""

import argparse
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

from bench import alternate, iss_bench, small_get, small_post
from bench.local_server import big_file
from iss_testing.servers import PostgreSQL, SeaweedFS, free_port, s3_node_environment


def start_node(checkout: str, work: pathlib.Path, name: str, env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    (work / name).mkdir()
    process = subprocess.Popen(
        [sys.executable, '-m', 'gunicorn', 'iss:app'],
        cwd=checkout,
        env={**os.environ, 'ISS_DATA': str(work / name), 'ISS_PORT': str(port), 'ISS_LOG_LEVEL': 'warning', **env},
        stdout=open(work / f'{name}.log', 'wb'),  # noqa: SIM115 - the process holds it
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f'http://127.0.0.1:{port}'
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + '/health', timeout=2):
                return process, url
        except OSError:
            time.sleep(0.2)
    sys.exit(f'{name} did not start: see {work / name}.log')


def s3_put_seconds(url: str, work: pathlib.Path, mib: int) -> float:
    path = work / 'big.bin'
    hex_digest = big_file(path, mib)
    started = time.monotonic()
    subprocess.run(
        ['curl', '-sSf', '-o', '/dev/null', '-T', str(path), f'{url}/artifacts/sha256:{hex_digest}?kind=bench'],
        check=True,
    )
    seconds = time.monotonic() - started
    path.unlink()
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('old')
    parser.add_argument('new')
    parser.add_argument('--rounds', type=int, default=3)
    parser.add_argument('--seconds', type=float, default=5)
    parser.add_argument('--mib', type=int, default=256)
    args = parser.parse_args()
    work = pathlib.Path(tempfile.mkdtemp(prefix='iss-house-'))
    seaweedfs = SeaweedFS(work / 'seaweedfs')
    postgres = PostgreSQL()
    processes = []
    try:
        nodes: dict[str, dict[str, str]] = {}
        for side, checkout in (('old', args.old), ('new', args.new)):
            s3 = s3_node_environment(seaweedfs, postgres)
            file_process, file_url = start_node(checkout, work, f'{side}-file', {})
            s3_process, s3_url = start_node(checkout, work, f'{side}-s3', s3)
            processes += [file_process, s3_process]
            nodes[side] = {'file': file_url, 's3': s3_url}
        head, text, tail = iss_bench.make_png_parts()
        script = small_post.write_script(str(work), 1)
        measures = {
            'GET 4 KiB, req/s': lambda urls, image: small_get.wrk(f'{urls["file"]}/images/{image}', args.seconds)[
                'rps'
            ],
            'POST 4 KiB distinct, req/s': lambda urls, image: small_post.wrk(
                urls['file'] + '/images', script, args.seconds
            )['rps'],
            f'S3 PUT {args.mib} MiB, s': lambda urls, image: s3_put_seconds(urls['s3'], work, args.mib),
        }
        images = {}
        for side, urls in nodes.items():
            upload = urllib.request.Request(
                urls['file'] + '/images', data=head + text + tail, headers={'Content-Type': 'image/png'}, method='POST'
            )
            with urllib.request.urlopen(upload) as answer:
                images[side] = iss_bench.extract_id(answer.read())

        def measure(name: str, side: str) -> float:
            subprocess.run(['sync'], check=True)
            return measures[name](nodes[side], images[side])

        results = alternate.alternating_rounds(
            args.rounds, dict.fromkeys(measures, ('old', 'new')), measure, show=lambda value: f'{value:,.2f}'
        )
        print()
        for name, sides in results.items():
            old, new = statistics.median(sides['old']), statistics.median(sides['new'])
            ratios = [n / o for n, o in zip(sides['new'], sides['old'], strict=True)]
            print(
                f'{name}: old {old:,.2f}, new {new:,.2f}; new/old {new / old:.3f} '
                f'({min(ratios):.3f}-{max(ratios):.3f} over {args.rounds} rounds)'
            )
    finally:
        for process in processes:
            os.killpg(process.pid, 15)
        for process in processes:
            process.wait(20)
        seaweedfs.stop()
        postgres.stop()
    return 0


if __name__ == '__main__':
    sys.exit(main())
