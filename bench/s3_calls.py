"""The S3 driver's CPU per call and per small store operation, on a real SeaweedFS (issue 28).

    python -m bench.s3_calls [--calls 200] [--rounds 3]

Starts SeaweedFS and PostgreSQL as the tests do (iss_testing.servers), then, in this one
thread, for 4 KiB objects (each round, the cases in turn):

- driver calls: ``put`` of a new key, ``put`` of a stored key (412), ``open`` + read, ``stat``,
  and boto3's bare ``get_object`` + read beside a GET signed once with SigV4 by hand and sent
  over ``http.client`` (the floor below boto3: what a request costs without it);
- store operations (``BlobStore`` on the bucket, its index in PostgreSQL): stage + commit of
  new content, of stored content, and the first and second ``open`` + read of a new blob
  (from the bucket, verified, kept on the node; then the node's copy);
- ``POST /images`` of one stored 4096-byte PNG (bench.small_requests' "POST same") through the
  WSGI app in this process (``iss.build_app``, WebTest): the whole request but the socket (its
  requests to the bucket are not counted: the app has its own client).

Prints the CPU of this process per call (ms, ``time.process_time``: boto3, the index's
client, hashing; SeaweedFS's and PostgreSQL's own CPU are not counted), the wall time per
call, and the HTTP requests sent to the bucket per call, by method. For where the CPU goes:
``py-spy record -o out.svg -- python -m bench.s3_calls``.
"""

import argparse
import collections
import datetime
import hashlib
import hmac
import http.client
import io
import os
import pathlib
import statistics
import tempfile
import time
import urllib.parse
from collections.abc import Callable

import webtest

import iss
import storage
from bench import iss_bench
from iss_server.config import Settings
from iss_server.drivers.s3 import S3Driver
from iss_testing.servers import S3_KEY, S3_SECRET, PostgreSQL, SeaweedFS, s3_node_environment

SIZE = 4096

_sent: collections.Counter[str] = collections.Counter()
#: Per case, each round's CPU and wall ms per call.
Results = dict[str, list[tuple[float, float]]]


def count_sent(request: object, **_: object) -> None:
    _sent[getattr(request, 'method', '?')] += 1


def measure(name: str, calls: int, step: Callable[[int], object], results: Results) -> None:
    """Run ``step(n)`` for n in range(calls); record CPU and wall ms per call, print the requests per call."""
    _sent.clear()
    cpu, wall = time.process_time(), time.perf_counter()
    for n in range(calls):
        step(n)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    results.setdefault(name, []).append((cpu * 1000 / calls, wall * 1000 / calls))
    sent = ', '.join(f'{method} {count / calls:.2f}' for method, count in sorted(_sent.items())) or 'none'
    print(f'  {name:28} {cpu * 1000 / calls:6.3f} ms CPU {wall * 1000 / calls:6.3f} ms wall  requests/call: {sent}')


class SignedGet:
    """GETs of one object over one keep-alive ``http.client`` connection, signed once (SigV4, unsigned payload)."""

    def __init__(self, endpoint: str, bucket: str, key: str) -> None:
        url = urllib.parse.urlsplit(endpoint)
        self.conn = http.client.HTTPConnection(url.hostname, url.port, timeout=10)
        self.path = f'/{bucket}/{urllib.parse.quote(key)}'
        now = datetime.datetime.now(datetime.UTC)
        amz_date, day = now.strftime('%Y%m%dT%H%M%SZ'), now.strftime('%Y%m%d')
        host = url.netloc
        payload = 'UNSIGNED-PAYLOAD'
        signed_headers = 'host;x-amz-content-sha256;x-amz-date'
        headers = f'host:{host}\nx-amz-content-sha256:{payload}\nx-amz-date:{amz_date}\n'
        canonical = f'GET\n{self.path}\n\n{headers}\n{signed_headers}\n{payload}'
        scope = f'{day}/us-east-1/s3/aws4_request'
        to_sign = f'AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n{hashlib.sha256(canonical.encode()).hexdigest()}'
        key_bytes = ('AWS4' + S3_SECRET).encode()
        for part in (day, 'us-east-1', 's3', 'aws4_request'):
            key_bytes = hmac.new(key_bytes, part.encode(), hashlib.sha256).digest()
        signature = hmac.new(key_bytes, to_sign.encode(), hashlib.sha256).hexdigest()
        self.headers = {
            'x-amz-date': amz_date,
            'x-amz-content-sha256': payload,
            'Authorization': (
                f'AWS4-HMAC-SHA256 Credential={S3_KEY}/{scope}, SignedHeaders={signed_headers}, Signature={signature}'
            ),
        }

    def __call__(self, _: int) -> bytes:
        self.conn.request('GET', self.path, headers=self.headers)
        response = self.conn.getresponse()
        data = response.read()
        assert response.status == 200, (response.status, data)
        return data


def blob(n: int) -> bytes:
    return n.to_bytes(8, 'big') + os.urandom(SIZE - 8)


def one_round(store: storage.BlobStore, driver: S3Driver, prefix: str, calls: int, results: Results) -> None:
    """Every case once, ``calls`` calls each, on new objects under ``prefix``."""
    stored = []
    for n in range(calls):
        staged = store.stage(io.BytesIO(blob(n)))
        staged.spool()
        stored.append(staged)
    measure('driver put new', calls, lambda n: driver.put(stored[n], prefix + str(n)), results)
    measure('driver put stored (412)', calls, lambda n: driver.put(stored[n], prefix + str(n)), results)

    def open_read(n: int) -> bytes:
        file, _ = driver.open(prefix + str(n))
        with file:
            return file.read()

    measure('driver open + read', calls, open_read, results)
    measure('driver stat', calls, lambda n: driver.stat(prefix + str(n)), results)
    measure(
        'boto3 get_object + read',
        calls,
        lambda n: driver.client.get_object(Bucket=driver.bucket, Key=driver.prefix + prefix + str(n))['Body'].read(),
        results,
    )
    signed_get = SignedGet(driver.endpoint, driver.bucket, driver.prefix + prefix + '0')
    measure('http.client signed GET', calls, signed_get, results)
    for staged in stored:
        staged.discard()

    datas = [blob(n) for n in range(calls)]
    ids = ['sha256:' + hashlib.sha256(data).hexdigest() for data in datas]

    def commit(n: int) -> None:
        store.commit(store.stage(io.BytesIO(datas[n])), {'size': SIZE})

    def read(n: int) -> None:
        with store.open(ids[n]).file as file:
            assert len(file.read()) == SIZE

    measure('store commit new', calls, commit, results)
    measure('store commit stored', calls, commit, results)
    measure('store first open + read', calls, read, results)
    measure('store node copy open + read', calls, read, results)


def http_round(client: webtest.TestApp, png: bytes, calls: int, results: Results) -> None:
    """``calls`` POSTs of the same stored PNG, multipart as bench.small_requests sends it."""

    def post(_: int) -> None:
        client.post('/images', upload_files=[('file', 'a.png', png, 'image/png')], status=200)

    measure('http POST same (uncounted)', calls, post, results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--calls', type=int, default=200)
    parser.add_argument('--rounds', type=int, default=3)
    args = parser.parse_args()
    work = pathlib.Path(tempfile.mkdtemp(prefix='iss-bench-s3-calls-'))
    seaweedfs, postgres = SeaweedFS(work / 'seaweedfs'), PostgreSQL()
    try:
        environ = s3_node_environment(seaweedfs, postgres) | {'ISS_DATA': str(work / 'node')}
        store = storage.open_store(Settings.from_env(environ))
        store.start()
        driver = store.driver
        assert isinstance(driver, S3Driver)
        driver.client.meta.events.register('before-send.s3', count_sent)
        print(f'pid {os.getpid()}, load average {os.getloadavg()}, {datetime.datetime.now(datetime.UTC):%H:%M} UTC')
        results: Results = {}
        settings = Settings.from_env(environ | {'ISS_RECONCILE_INTERVAL': '0', 'ISS_LOG_LEVEL': 'warning'})
        client = webtest.TestApp(iss.build_app(settings))
        png = b''.join(iss_bench.make_png_parts())
        client.post('/images', upload_files=[('file', 'a.png', png, 'image/png')], status=201)

        for round_number in range(args.rounds):
            print(f'round {round_number + 1}')
            one_round(store, driver, f'bench-{round_number}/', args.calls, results)
            http_round(client, png, args.calls, results)
        print(f'medians of {args.rounds} rounds, {args.calls} calls each; load average {os.getloadavg()}')
        for name, rounds in results.items():
            cpu = statistics.median(c for c, _ in rounds)
            wall = statistics.median(w for _, w in rounds)
            each = ', '.join(f'{c:.3f}' for c, _ in rounds)
            print(f'  {name:28} {cpu:6.3f} ms CPU  {wall:6.3f} ms wall  (CPU rounds {each})')
    finally:
        seaweedfs.stop()
        postgres.stop()


if __name__ == '__main__':
    main()
