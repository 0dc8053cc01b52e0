"""Many small uploads: ISS against the FastAPI version, alternated in one run, with the disk's limit beside.

    python -m bench.small_post --seed SEED_CHECKOUT --seed-python SEED_VENV/bin/python
        [--rounds 3] [--seconds 5] [--batch 100] [--dir DIR]

SEED_CHECKOUT is a clone of github.com/VitalyVorobyev/image_store_service (the FastAPI
version, run with ``uvicorn iss:app`` as its README says: one process, no fsync);
SEED_VENV has its requirements and uvicorn (``pip install fastapi uvicorn python-multipart
pillow``). ISS is this checkout's gunicorn with its defaults (2 workers x 16 threads). Both
keep their data on the file system of ``--dir``.

Each round measures, in turn, with wrk (1 thread, 16 connections, as iss_bench.py):
- ``seed``: the FastAPI version, one distinct 4096-byte PNG per multipart POST /images;
- ``ISS``: ISS, the same requests;
- ``ISS batch``: ISS, ``--batch`` distinct PNGs as ``file`` parts of one POST /images
  (counted per file);
- ``durable limit``: bench.durable_limit, the disk's rate for what one upload at a time
  must make durable (two files, four fsyncs), 16 threads, no HTTP;
- ``durable limit, grouped``: the same files made durable as ISS's group commit does
  (``--group``: three ``syncfs`` per upload, shared by the threads waiting).
Then one connection (wrk -c1) to ISS for its p50/p99 latency. Every request must succeed
(a 201 for every file of every batch), or the script stops: a rate of errors is no result.
Prints each side's median rate and the ratios to the FastAPI version's, with their range over
the rounds. Before each measurement the disk is synced (``sync``), so that no side writes
what the one before left dirty (the FastAPI version writes without fsync, and ISS's flushes
are ``syncfs``). Nothing is deleted until the end: on ext4 without a journal, files made
within ~30 s of a mass deletion are slow to allocate (the kernel's ``recently_deleted``),
which would burden whichever side came next.
"""

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid

from bench import iss_bench
from iss_testing import HERE
from iss_testing.servers import free_port

CHECKOUT = str(HERE)

# Each request carries ``parts`` distinct valid PNGs: the fixed-length tEXt chunk of each holds
# nonce + thread + counter + part, its CRC32 recomputed, so a server that checks images accepts it.
# NOTE: iss_bench.py's own Lua up to its request(): the PNG pieces, the CRC32, the per-thread
# nonce and counter (iss_bench.py stays as the shared benchmark has it).
_LUA_PNG_TEXT = iss_bench.LUA_DISTINCT[: iss_bench.LUA_DISTINCT.index('function request()')]
LUA = (
    _LUA_PNG_TEXT
    + r"""
local parts, boundary = {parts}, "{boundary}"
function request()
  counter = counter + 1
  local body = {{}}
  for part = 1, parts do
    local val = string.format("%s-%d-%d-%d", nonce, tid or 0, counter, part)
    local text = keyword .. "\0" .. val .. string.rep("_", textlen - #keyword - 1 - #val)
    local chunk = be32(#text) .. "tEXt" .. text .. be32(crc32("tEXt" .. text))
    body[#body + 1] = "--" .. boundary .. "\r\nContent-Disposition: form-data; name=\"file\"; filename=\"f" ..
      part .. ".png\"\r\nContent-Type: image/png\r\n\r\n" .. head .. chunk .. tail .. "\r\n"
  end
  body[#body + 1] = "--" .. boundary .. "--\r\n"
  return wrk.format("POST", nil, {{["Content-Type"] = "multipart/form-data; boundary=" .. boundary}},
                    table.concat(body))
end
-- NOTE: wrk counts only HTTP statuses; a batch answers 207 when a part failed, so that is an error here.
function response(status, headers, body)
  if status == 207 then wrk.thread:stop() end
end
"""
)


def start(command: list[str], cwd: str, env: dict[str, str], log: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, **env, 'ISS_PORT': str(port)}
    command = [part.replace('{port}', str(port)) for part in command]
    with open(log, 'wb') as out:
        process = subprocess.Popen(command, cwd=cwd, env=env, stdout=out, stderr=out, start_new_session=True)
    url = f'http://127.0.0.1:{port}'
    for _ in range(200):
        try:
            with urllib.request.urlopen(url + '/health', timeout=1):
                return process, url
        except OSError:
            time.sleep(0.1)
    sys.exit(f'{command} did not come up; see {log}')


def stop(process: subprocess.Popen) -> None:
    os.killpg(process.pid, signal.SIGTERM)
    process.wait(20)


def write_script(work: str, parts: int) -> str:
    head, _, tail = iss_bench.make_png_parts()
    for name, data in (('head', head), ('tail', tail)):
        with open(os.path.join(work, f'png.{name}'), 'wb') as file:
            file.write(data)
    path = os.path.join(work, f'post{parts}.lua')
    with open(path, 'w', encoding='ascii') as file:
        file.write(
            LUA.format(
                head=os.path.join(work, 'png.head'),
                tail=os.path.join(work, 'png.tail'),
                parts=parts,
                boundary=iss_bench.BOUNDARY,
                keyword=iss_bench.TEXT_KEYWORD.decode(),
                textlen=iss_bench.TEXT_LEN,
            )
        )
    return path


def wrk(url: str, script: str, seconds: float, connections: int = 16) -> dict:
    done = subprocess.run(
        ['wrk', '-t1', f'-c{connections}', f'-d{seconds:g}s', '--timeout', '30s', '--latency', '-s', script, url]
        + ['--', uuid.uuid4().hex],
        check=True,
        capture_output=True,
        text=True,
    )
    result = iss_bench.parse_wrk(done.stdout)
    if 'rps' not in result or result['non_2xx_3xx'] or result['socket_errors']:
        sys.exit(f'{url}: failed requests\n{done.stdout}{done.stderr}')
    return result


def durable_limit(directory: str, seconds: float, *how: str) -> float:
    done = subprocess.run(
        [sys.executable, '-m', 'bench.durable_limit', '--dir', directory, '--seconds', f'{seconds:g}', *how],
        cwd=CHECKOUT,
        check=True,
        capture_output=True,
        text=True,
    )
    first, cpu = done.stdout.splitlines()[:2]  # NOTE: its files stay until the end, with ours
    print(f'  ({" ".join(how) or "fsync"}) {cpu}', flush=True)
    return float(first.rsplit(': ', 1)[1].split()[0].replace(',', ''))


def spread(values: list[float]) -> str:
    return f'{statistics.median(values):,.2f}x ({min(values):.2f}-{max(values):.2f})'


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--seed', required=True, help='a checkout of the FastAPI version')
    parser.add_argument('--seed-python', required=True, help='a python with fastapi, uvicorn, python-multipart')
    parser.add_argument('--rounds', type=int, default=3)
    parser.add_argument('--seconds', type=float, default=5)
    parser.add_argument('--batch', type=int, default=100, help='files per request of the batch side (0: none)')
    parser.add_argument('--dir', default=tempfile.gettempdir(), help='where the data directories go (one disk)')
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix='iss-small-post-', dir=args.dir)
    single, batch = write_script(work, 1), write_script(work, args.batch)
    python = os.path.join(CHECKOUT, '.venv', 'bin', 'python')
    servers = []
    try:
        seed, seed_url = start(
            [args.seed_python, '-m', 'uvicorn', 'iss:app', '--port', '{port}', '--log-level', 'warning'],
            args.seed,
            {'ISS_DATA': os.path.join(work, 'seed')},
            os.path.join(work, 'seed.log'),
        )
        servers.append(seed)
        iss, iss_url = start(
            [python, '-m', 'gunicorn', 'iss:app'],
            CHECKOUT,
            {'ISS_DATA': os.path.join(work, 'iss'), 'ISS_LOG_LEVEL': 'warning'},
            os.path.join(work, 'iss.log'),
        )
        servers.append(iss)
        sides = {
            'seed': lambda: wrk(seed_url + '/images', single, args.seconds)['rps'],
            'ISS': lambda: wrk(iss_url + '/images', single, args.seconds)['rps'],
            'ISS batch': lambda: wrk(iss_url + '/images', batch, args.seconds)['rps'] * args.batch,
            'durable limit': lambda: durable_limit(work, args.seconds),
            'durable limit, grouped': lambda: durable_limit(work, args.seconds, '--group'),
        }
        if not args.batch:
            del sides['ISS batch']
        for measure in sides.values():  # NOTE: a warm-up of each (connections, imports, directories)
            os.sync()
            measure()
        rates: dict[str, list[float]] = {name: [] for name in sides}
        for number in range(args.rounds):
            for name, measure in sides.items():
                os.sync()
                rates[name].append(measure())
                print(f'round {number + 1} {name}: {rates[name][-1]:,.0f} files/s', flush=True)
        os.sync()
        alone = wrk(iss_url + '/images', single, args.seconds, connections=1)
    finally:
        for server in servers:
            stop(server)
        shutil.rmtree(work)
    seed_rates = rates['seed']
    for name in (name for name in rates if name != 'seed'):
        ratios = [mine / theirs for mine, theirs in zip(rates[name], seed_rates, strict=True)]
        print(f'{name}: {statistics.median(rates[name]):,.0f} files/s, {spread(ratios)} the FastAPI version')
    print(f'FastAPI version: {statistics.median(seed_rates):,.0f} files/s (no fsync)')
    print(f'ISS, one connection: p50 {alone["lat_p50_ms"]:.2f} ms, p99 {alone["lat_p99_ms"]:.2f} ms')
    return 0


if __name__ == '__main__':
    sys.exit(main())
