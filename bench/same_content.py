"""Concurrent uploads of the same large content through two nodes on S3, two checkouts in one run (issue 24, point 8).

    python -m bench.same_content OLD_CHECKOUT NEW_CHECKOUT [--rounds 3] [--mib 20] [--uploads 16]

For each checkout, two ``gunicorn iss:app`` nodes (2 workers x 16 threads) on one store (a
prefix of one bucket of a real SeaweedFS, its index a schema of a real PostgreSQL). Each
round, the checkouts taking turns, ``--uploads`` clients send the same new ``--mib`` MiB at
once, half by ``PUT /artifacts/{id}`` (parts sent as they arrive), half by ``POST``, spread
over both nodes. Prints each round's statuses (one 201 and the rest 200 is right) and the
seconds until the last answer.
"""

import argparse
import collections
import concurrent.futures
import hashlib
import http.client
import os
import pathlib
import subprocess
import sys
import tempfile
import threading
import time

from bench import alternate
from bench.house import start_node
from iss_testing.servers import PostgreSQL, SeaweedFS, s3_node_environment


def one_round(urls: list[str], mib: int, uploads: int) -> tuple[collections.Counter[str], float]:
    data = os.urandom(mib * 1024 * 1024)
    blob_id = 'sha256:' + hashlib.sha256(data).hexdigest()
    start = threading.Barrier(uploads)

    def send(number: int) -> str:
        port = int(urls[number % len(urls)].rsplit(':', 1)[1])
        method = 'PUT' if number % 4 < 2 else 'POST'
        path = f'/artifacts/{blob_id}?kind=bench' if method == 'PUT' else '/artifacts?kind=bench'
        start.wait()
        conn = http.client.HTTPConnection('127.0.0.1', port, timeout=300)
        try:
            conn.request(method, path, data, {'Content-Type': 'application/octet-stream'})
            return str(conn.getresponse().status)
        except OSError as exc:
            return type(exc).__name__
        finally:
            conn.close()

    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(uploads) as pool:
        statuses = collections.Counter(pool.map(send, range(uploads)))
    return statuses, time.monotonic() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('old')
    parser.add_argument('new')
    parser.add_argument('--rounds', type=int, default=3)
    parser.add_argument('--mib', type=int, default=20)
    parser.add_argument('--uploads', type=int, default=16)
    args = parser.parse_args()
    work = pathlib.Path(tempfile.mkdtemp(prefix='iss-same-'))
    seaweedfs = SeaweedFS(work / 'seaweedfs')
    postgres = PostgreSQL()
    processes: list[subprocess.Popen] = []
    try:
        nodes = {}
        for side, checkout in (('old', args.old), ('new', args.new)):
            env = {**s3_node_environment(seaweedfs, postgres), 'ISS_THREADS': '16'}
            started = [start_node(checkout, work, f'{side}-{name}', env) for name in ('a', 'b')]
            processes += [process for process, _ in started]
            nodes[side] = [url for _, url in started]
        alternate.alternating_rounds(
            args.rounds,
            {f'{args.uploads} x {args.mib} MiB': ('old', 'new')},
            lambda case, side: one_round(nodes[side], args.mib, args.uploads),
            show=lambda outcome: f'{dict(sorted(outcome[0].items()))} in {outcome[1]:.1f} s',
        )
    finally:
        for process in processes:
            os.killpg(process.pid, 15)
        seaweedfs.stop()
        postgres.stop()
    return 0


if __name__ == '__main__':
    sys.exit(main())
