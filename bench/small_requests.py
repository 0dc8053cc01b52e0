"""Small requests: ISS beside the floor of Python WSGI on the same gunicorn settings, alternated in one run.

    python -m bench.small_requests [--before CHECKOUT] [--seed SEED_CHECKOUT --seed-python PY]
        [--rounds 3] [--seconds 5] [--floor DIR]

Issue 28's comparison, from one script. Served at once, each on its own loopback port:

- ``ISS``: this checkout, ``gunicorn iss:app`` as the README starts it (2 workers x 16 threads,
  gthread), on a data directory with its SQLite index;
- ``before`` (``--before``): another checkout of ISS the same way, e.g. ``git archive`` of the
  commit before a change, for a before/after in the same minutes;
- ``floor``: ``floorapp.py`` of the shared bench (``--floor``, /work/shared/bench/floor): a Falcon
  hello-world answering 4 KiB, and a Falcon multipart echo that reads the part and hashes it, on
  the same gunicorn settings (``-k gthread -w 2 --threads 16``, no config file);
- ``nginx``: nginx (iss_bench.py's configuration) sending ISS's blob file of the GET case;
- ``seed`` (``--seed``): the FastAPI version under uvicorn with 2 workers, if a checkout is given;
- ``ISS S3`` (``--s3``): this checkout on an S3 store (a real SeaweedFS on this machine, its index
  in a real PostgreSQL: ``iss_testing.servers``), for the two POST cases and GET.

Each round measures every side in turn (the order reversed every other round), with wrk
(2 threads, 16 connections: the shared floor script's settings) after a 1 s warm-up:

- ``GET``: a stored 4096-byte PNG (the floor: its 4 KiB answer; nginx: the blob file);
- ``POST same``: the same 4096-byte PNG, multipart, every time (content already stored);
- ``POST distinct``: a distinct valid 4096-byte PNG per request (bench.small_post's script).

The server's CPU per request is read from /proc (utime + stime of its whole process tree,
before and after). Prints, per case and side, the median rate and CPU per request, and the
ratios to the floor with their range over the rounds. With ``--s3``, each round also reads
``--blobs`` new 4 KiB blobs of the S3 node twice from 4 keep-alive connections (bench.s3's
``small_gets``): the first read of each (from the bucket, verified, then kept on the node)
against the second (the node's copy). Every request must succeed.
Needs wrk and nginx.
"""

import argparse
import hashlib
import http.client
import os
import pathlib
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

from bench import alternate, iss_bench, small_post
from iss_testing.servers import PostgreSQL, SeaweedFS, free_port, s3_node_environment

CHECKOUT = pathlib.Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf('SC_CLK_TCK')


def tree_cpu_seconds(pid: int) -> float:
    """The user + system CPU time of a process and all its descendants, in seconds."""
    ticks = 0
    todo = [pid]
    while todo:
        each = todo.pop()
        try:
            fields = pathlib.Path(f'/proc/{each}/stat').read_text().rsplit(')', 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])
            for task in os.listdir(f'/proc/{each}/task'):
                todo += map(int, pathlib.Path(f'/proc/{each}/task/{task}/children').read_text().split())
        except OSError:
            pass  # NOTE: a thread or process that ended meanwhile
    return ticks / CLK_TCK


def start(command: list[str], cwd: str, env: dict[str, str], log: pathlib.Path, ready: str) -> tuple[int, str]:
    """Start a server in its own session on a free port (``{port}`` in ``command``); return its pid and URL."""
    port = free_port()
    command = [part.replace('{port}', str(port)) for part in command]
    with open(log, 'wb') as out:
        process = subprocess.Popen(
            command,
            cwd=cwd,
            env={**os.environ, **env, 'ISS_PORT': str(port)},
            stdout=out,
            stderr=out,
            start_new_session=True,
        )
    url = f'http://127.0.0.1:{port}'
    for _ in range(300):
        try:
            with urllib.request.urlopen(url + ready, timeout=1):
                return process.pid, url
        except OSError:
            time.sleep(0.1)
    sys.exit(f'{command} did not come up; see {log}')


def stop(pids: list[int]) -> None:
    """Stop the servers ``start`` started (each a process group): SIGTERM, then SIGKILL for what is left."""
    for pid in pids:
        os.killpg(pid, signal.SIGTERM)
    time.sleep(2)
    for pid in pids:
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def wrk(url: str, seconds: float, script: str | None = None) -> dict:
    command = ['wrk', '-t2', '-c16', f'-d{seconds:g}s', '--timeout', '30s', '--latency']
    done = subprocess.run(
        [*command, *(['-s', script] if script else []), url, '--', os.urandom(8).hex()],
        check=True,
        capture_output=True,
        text=True,
    )
    result = iss_bench.parse_wrk(done.stdout)
    if 'rps' not in result or result['non_2xx_3xx'] or result['socket_errors']:
        sys.exit(f'{url}: failed requests\n{done.stdout}{done.stderr}')
    return result


def measure(pid: int | None, url: str, seconds: float, script: str | None) -> tuple[float, float | None]:
    """Requests per second, and the server's CPU milliseconds per request (None: not measured)."""
    wrk(url, 1, script)
    before = tree_cpu_seconds(pid) if pid else 0.0
    result = wrk(url, seconds, script)
    cpu_ms = (tree_cpu_seconds(pid) - before) * 1000 / result['requests'] if pid else None
    return result['rps'], cpu_ms


def same_bytes_script(work: pathlib.Path, png: bytes) -> str:
    """A wrk script posting ``png`` as the one ``file`` part of a form, the same bytes every time."""
    head = (
        f'--{iss_bench.BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n'
        'Content-Type: image/png\r\n\r\n'
    )
    (work / 'same.body').write_bytes(head.encode() + png + f'\r\n--{iss_bench.BOUNDARY}--\r\n'.encode())
    script = work / 'same.lua'
    script.write_text(
        f'local f = io.open("{work / "same.body"}", "rb"); wrk.body = f:read("*all"); f:close()\n'
        'wrk.method = "POST"\n'
        f'wrk.headers["Content-Type"] = "multipart/form-data; boundary={iss_bench.BOUNDARY}"\n'
    )
    return str(script)


def store_png(url: str, png: bytes) -> str:
    upload = urllib.request.Request(url + '/images', data=png, headers={'Content-Type': 'image/png'}, method='POST')
    with urllib.request.urlopen(upload) as answer:
        return iss_bench.extract_id(answer.read())


def machine() -> str:
    lines = pathlib.Path('/proc/cpuinfo').read_text().splitlines()
    model = next((line.split(':', 1)[1].strip() for line in lines if line.startswith('model name')), '?')
    return f'{os.cpu_count()} CPUs ({model}), Linux {platform.release()}, Python {platform.python_version()}'


def spread(values: list[float]) -> str:
    return f'{statistics.median(values):.2f}x ({min(values):.2f}-{max(values):.2f})'


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--before', help='another ISS checkout, served and measured beside this one')
    parser.add_argument('--seed', help='a checkout of the FastAPI version')
    parser.add_argument('--seed-python', help='a python with its requirements and uvicorn')
    parser.add_argument('--floor', default='/work/shared/bench/floor', help="the shared bench's floorapp.py directory")
    parser.add_argument('--s3', action='store_true', help='also ISS on an S3 store (SeaweedFS, PostgreSQL)')
    parser.add_argument('--blobs', type=int, default=300, help='new blobs read twice per round (--s3)')
    parser.add_argument('--rounds', type=int, default=3)
    parser.add_argument('--seconds', type=float, default=5)
    args = parser.parse_args()
    work = pathlib.Path(tempfile.mkdtemp(prefix='iss-small-requests-'))
    work.chmod(0o755)  # NOTE: nginx's workers (another user) read ISS's blob file below it
    head, text, tail = iss_bench.make_png_parts()
    png = head + text + tail
    same = same_bytes_script(work, png)
    distinct = small_post.write_script(str(work), 1)
    gunicorn = [sys.executable, '-m', 'gunicorn']
    iss_env = {'ISS_LOG_LEVEL': 'warning'}
    pids: list[int] = []
    engines: list[SeaweedFS | PostgreSQL] = []
    first_reads: list[tuple[float, float]] = []
    # side -> {case: (pid, url, wrk script)}
    sides: dict[str, dict[str, tuple[int | None, str, str | None]]] = {}
    try:
        checkouts = {'ISS': str(CHECKOUT), **({'before': args.before} if args.before else {})}
        iss_data = ''
        for name, checkout in checkouts.items():
            data = str(work / f'data-{name}')
            pid, url = start(
                [*gunicorn, 'iss:app'], checkout, {**iss_env, 'ISS_DATA': data}, work / f'{name}.log', '/health'
            )
            pids.append(pid)
            image = store_png(url, png)
            iss_data = iss_data or data
            sides[name] = {
                'GET': (pid, f'{url}/images/{image}', None),
                'POST same': (pid, f'{url}/images', same),
                'POST distinct': (pid, f'{url}/images', distinct),
            }
        if args.s3:
            seaweedfs, postgres = SeaweedFS(work / 'seaweedfs'), PostgreSQL()
            engines += [seaweedfs, postgres]
            environment = {**iss_env, **s3_node_environment(seaweedfs, postgres), 'ISS_DATA': str(work / 'data-s3')}
            pid, url = start([*gunicorn, 'iss:app'], str(CHECKOUT), environment, work / 's3.log', '/health')
            pids.append(pid)
            image = store_png(url, png)
            s3_url = url
            sides['ISS S3'] = {
                'GET': (pid, f'{url}/images/{image}', None),
                'POST same': (pid, f'{url}/images', same),
                'POST distinct': (pid, f'{url}/images', distinct),
            }
        floor_command = [*gunicorn, '-c', '/dev/null', '-k', 'gthread', '-w', '2', '--threads', '16']
        pid, url = start(
            [*floor_command, '--bind', '127.0.0.1:{port}', 'floorapp:app'], args.floor, {}, work / 'floor.log', '/get'
        )
        pids.append(pid)
        sides['floor'] = {'GET': (pid, url + '/get', None), 'POST same': (pid, url + '/post', same)}
        sides['floor']['POST distinct'] = (pid, url + '/post', distinct)
        if args.seed:
            seed = [args.seed_python or 'python', '-m', 'uvicorn', 'iss:app', '--port', '{port}', '--workers', '2']
            pid, url = start(
                [*seed, '--log-level', 'warning'],
                args.seed,
                {'ISS_DATA': str(work / 'seed')},
                work / 'seed.log',
                '/health',
            )
            pids.append(pid)
            image = store_png(url, png)
            sides['seed'] = {
                'GET': (pid, f'{url}/images/{image}', None),
                'POST same': (pid, f'{url}/images', same),
                'POST distinct': (pid, f'{url}/images', distinct),
            }
        with alternate.nginx_on_blobs(iss_data) as nginx_url:
            sides['nginx'] = {'GET': (None, nginx_url(sides['ISS']['GET'][1].rsplit(':', 1)[1]), None)}

            def s3_reads(number: int) -> None:
                port = int(s3_url.rsplit(':', 1)[1])
                ids = [put_new_blob(s3_url) for _ in range(args.blobs)]
                first_reads.append((reads_per_second(port, ids), reads_per_second(port, ids)))
                first, cached = first_reads[-1]
                print(f'round {number} S3 reads: first {first:,.0f}/s, cached {cached:,.0f}/s', flush=True)

            cases = ('GET', 'POST same', 'POST distinct')
            results = alternate.alternating_rounds(
                args.rounds,
                {case: [side for side in sides if case in sides[side]] for case in cases},
                lambda case, side: measure(*sides[side][case][:2], args.seconds, sides[side][case][2]),
                show=lambda value: (
                    f'{value[0]:,.0f} req/s' + (f', {value[1]:.3f} ms CPU' if value[1] is not None else '')
                ),
                after_round=s3_reads if args.s3 else None,
            )
    finally:
        stop(pids)
        for engine in engines:
            engine.stop()
        subprocess.run(['rm', '-rf', str(work)], check=False)
    when = time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())
    print(f'\n{when}, {machine()}; 4 KiB, wrk -t2 -c16, {args.seconds:g} s x {args.rounds} rounds')
    for case, by_side in results.items():
        floor = by_side['floor']
        for side, values in by_side.items():
            rps = statistics.median(value[0] for value in values)
            line = f'{case:14} {side:7} {rps:8,.0f} req/s'
            if values[0][1] is not None:
                line += f', {statistics.median(value[1] or 0 for value in values):.3f} ms CPU/req'
            if side != 'floor':
                line += (
                    f'; rate {spread([mine[0] / theirs[0] for mine, theirs in zip(values, floor, strict=True)])} floor'
                )
                if values[0][1] is not None:
                    cpu_ratios = [(mine[1] or 0) / (theirs[1] or 1) for mine, theirs in zip(values, floor, strict=True)]
                    line += f', CPU {spread(cpu_ratios)} floor'
            print(line)
    if 'before' in results['GET']:
        for case, by_side in results.items():
            pairs = list(zip(by_side['ISS'], by_side['before'], strict=True))
            rates = spread([mine[0] / theirs[0] for mine, theirs in pairs])
            cpu = spread([(mine[1] or 0) / (theirs[1] or 1) for mine, theirs in pairs])
            print(f'{case}: ISS/before rate {rates}, CPU per request {cpu}')
    if 'ISS S3' in results['POST distinct']:
        for case in ('POST same', 'POST distinct'):
            pairs = zip(results[case]['ISS S3'], results[case]['ISS'], strict=True)
            on_s3 = [mine[0] / theirs[0] for mine, theirs in pairs]
            print(f'{case}: ISS S3 {spread(on_s3)} ISS on disk')
        ratios = [first / cached for first, cached in first_reads]
        first = statistics.median(first for first, _ in first_reads)
        print(f'S3 first read of a 4 KiB blob {first:,.0f}/s: {spread(ratios)} a read of its node copy')
    return 0


def reads_per_second(port: int, ids: list[str], connections: int = 4) -> float:
    """GETs per second of each of ``ids`` once, from ``connections`` keep-alive connections, each its own share."""

    def read(share: list[str]) -> None:
        connection = http.client.HTTPConnection('127.0.0.1', port, timeout=30)
        for blob_id in share:
            connection.request('GET', f'/artifacts/{blob_id}')
            response = connection.getresponse()
            assert response.status == 200, response.status
            response.read()
        connection.close()

    readers = [threading.Thread(target=read, args=(ids[n::connections],)) for n in range(connections)]
    started = time.perf_counter()
    for reader in readers:
        reader.start()
    for reader in readers:
        reader.join()
    return len(ids) / (time.perf_counter() - started)


def put_new_blob(url: str) -> str:
    """Store 4 KiB of new bytes as an artifact; return its id."""
    data = os.urandom(4096)
    blob_id = 'sha256:' + hashlib.sha256(data).hexdigest()
    upload = urllib.request.Request(f'{url}/artifacts/{blob_id}?kind=bench', data=data, method='PUT')
    with urllib.request.urlopen(upload):
        return blob_id


if __name__ == '__main__':
    sys.exit(main())
