"""A resumable upload (tus, in chunks) against one ``curl -T`` of the same file, alternated in one run.

    python -m bench.tus [--mib 512] [--chunk-mib 16] [--rounds 3]

Starts ``gunicorn iss:app`` from this tree on a free port with a fresh data directory
under /tmp. Each round writes new random files and uploads each once, the order of the
sides alternating: ``curl -T`` to ``PUT /artifacts/{id}`` (the id known beforehand, one
request), a minimal tus client (``http.client``: POST, then one PATCH per chunk, each
chunk read from the file and sent), and ``tuspy`` (a real client: requests, a chunk in
memory) with the same chunk size. Prints the median rate of each, the median of the
rounds' ratios to curl, and the growth of the server's memory (master and workers'
summed RSS, sampled every 20 ms) during each tus upload over its RSS before it.
"""

import argparse
import base64
import http.client
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from bench.local_server import big_file, tree_rss_kib
from iss_testing.servers import Gunicorn

TUS = {'Tus-Resumable': '1.0.0'}


class PeakRss:
    """The highest summed RSS of the server while the block runs, sampled in a thread."""

    def __init__(self, pid: int) -> None:
        self._pid = pid
        self.before = tree_rss_kib(pid)
        self.peak = self.before
        self._done = threading.Event()

    def __enter__(self):
        threading.Thread(target=self._sample, daemon=True).start()
        return self

    def _sample(self) -> None:
        while not self._done.wait(0.02):
            self.peak = max(self.peak, tree_rss_kib(self._pid))

    def __exit__(self, *exc):
        self._done.set()


def curl_put(port: int, path: pathlib.Path, hex_digest: str) -> None:
    url = f'http://127.0.0.1:{port}/artifacts/sha256:{hex_digest}?kind=bench'
    subprocess.run(['curl', '-sf', '-o', '/dev/null', '-T', str(path), url], check=True)


def tus_minimal(port: int, path: pathlib.Path, hex_digest: str, chunk: int) -> None:
    size = path.stat().st_size
    connection = http.client.HTTPConnection('127.0.0.1', port)
    metadata = 'kind ' + base64.b64encode(b'bench').decode()
    connection.request('POST', '/uploads', headers={**TUS, 'Upload-Length': str(size), 'Upload-Metadata': metadata})
    created = connection.getresponse()
    created.read()
    location = created.headers['Location']
    with open(path, 'rb') as file:
        for offset in range(0, size, chunk):
            body = file.read(chunk)
            headers = {**TUS, 'Content-Type': 'application/offset+octet-stream', 'Upload-Offset': str(offset)}
            connection.request('PATCH', location, body=body, headers=headers)
            answer = connection.getresponse()
            answer.read()
            assert answer.status == 204, answer.status
    assert answer.headers['ISS-Blob-Id'] == 'sha256:' + hex_digest
    connection.close()


def tuspy(port: int, path: pathlib.Path, hex_digest: str, chunk: int) -> None:
    from tusclient import client

    uploader = client.TusClient(f'http://127.0.0.1:{port}/uploads').uploader(
        str(path), chunk_size=chunk, metadata={'kind': 'bench'}
    )
    uploader.upload()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--mib', type=int, default=512)
    parser.add_argument('--chunk-mib', type=int, default=16)
    parser.add_argument('--rounds', type=int, default=3)
    args = parser.parse_args()
    work = pathlib.Path(tempfile.mkdtemp(prefix='iss-tus-bench-'))
    server = Gunicorn(work / 'data', work / 'gunicorn.log')
    port = server.port
    chunk = args.chunk_mib * 1024 * 1024
    sides = {
        'curl -T': curl_put,
        'tus (http.client)': lambda p, f, h: tus_minimal(p, f, h, chunk),
        'tuspy': lambda p, f, h: tuspy(p, f, h, chunk),
    }
    rates: dict[str, list[float]] = {name: [] for name in sides}
    growth: dict[str, list[int]] = {name: [] for name in sides}
    try:
        for number in range(args.rounds):
            files = {name: work / f'{number}-{index}.bin' for index, name in enumerate(sides)}
            digests = {name: big_file(path, args.mib) for name, path in files.items()}
            for name in sides if number % 2 == 0 else reversed(sides):
                subprocess.run(['sync'], check=True)
                with PeakRss(server.process.pid) as rss:
                    started = time.perf_counter()
                    sides[name](port, files[name], digests[name])
                    seconds = time.perf_counter() - started
                rates[name].append(args.mib * 1024 * 1024 / 1e6 / seconds)
                growth[name].append((rss.peak - rss.before) // 1024)
            for path in files.values():
                path.unlink()
    finally:
        server.stop()
        shutil.rmtree(work)
    print(f'{args.mib} MiB in {args.chunk_mib} MiB chunks, {args.rounds} rounds, median:')
    for name in sides:
        ratio = [a / b for a, b in zip(rates[name], rates['curl -T'], strict=True)]
        print(
            f'  {name}: {statistics.median(rates[name]):,.0f} MB/s, {statistics.median(ratio):.2f}x curl -T '
            f'({min(ratio):.2f}-{max(ratio):.2f}); server RSS growth {growth[name]} MiB'
        )
    return 0


if __name__ == '__main__':
    sys.exit(main())
