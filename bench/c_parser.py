"""What gunicorn's C HTTP parser (gunicorn_h1c) moves: ISS and the floor, each with either parser, in one run.

    /tmp/h1c/.venv/bin/python -m bench.c_parser [--rounds 5] [--seconds 5] [--floor DIR]

Issue 28 asks what would move the floor. gunicorn parses a request's line and headers in
Python unless ``gunicorn_h1c`` is installed (its ``http_parser`` setting, ``auto`` by default;
only the head: the body readers and the unreader stay gunicorn's Python ones). Run with a
python that has ``gunicorn_h1c``; four servers are started from it, each on its own loopback
port, the same software but for ``--http-parser``:

- ``floor py`` / ``floor C``: ``floorapp.py`` of the shared bench (``--floor``) on the floor's
  settings (``-k gthread -w 2 --threads 16``, no config file), ``--http-parser python`` / ``fast``;
- ``ISS py`` / ``ISS C``: this checkout, ``gunicorn iss:app`` with its gunicorn.conf.py (ISS's
  worker, 2 x 16), on its own data directory, ``--http-parser python`` / ``fast``.

``fast`` fails at the first request if gunicorn_h1c is missing; before measuring, each server is
asked a request with a bad method, whose 400 tells which parser read it (the C parser's message
names the character). Then rounds as bench.small_requests takes them (sides in turn, the order
reversed every other round; wrk -t2 -c16 after a 1 s warm-up; the server's CPU per request from
/proc) of ``GET`` (a stored 4096-byte PNG; the floor: its 4 KiB answer) and ``POST same`` (that
PNG, multipart, content already stored). Prints the medians and per-round ratios.
"""

import argparse
import importlib.util
import pathlib
import socket
import statistics
import subprocess
import sys
import tempfile
import time

from gunicorn.config import Config
from gunicorn.http.message import Request
from gunicorn.http.unreader import Unreader

from bench import alternate, iss_bench, small_requests

CHECKOUT = pathlib.Path(__file__).resolve().parent.parent
PARSERS = {'py': 'python', 'C': 'fast'}
#: The headers of a browser's GET of an image (besides Host): where a C parser gains more than with wrk's own.
BROWSER_HEADERS = (
    ('User-Agent', 'Mozilla/5.0 (X11; Linux x86_64; rv:140.0) Gecko/20100101 Firefox/140.0'),
    ('Accept', 'image/avif,image/webp,image/png,image/svg+xml,image/*;q=0.8,*/*;q=0.5'),
    ('Accept-Language', 'en-US,en;q=0.5'),
    ('Accept-Encoding', 'gzip, deflate, br, zstd'),
    ('Connection', 'keep-alive'),
    ('Referer', 'https://www.example.org/gallery'),
    ('Sec-Fetch-Dest', 'image'),
    ('Sec-Fetch-Mode', 'no-cors'),
    ('Sec-Fetch-Site', 'same-site'),
    ('If-None-Match', '"sha256:0123456789abcdef"'),
    ('Priority', 'u=5, i'),
)
#: The heads of the cases: what wrk sends (Host, and a POST's length and type), and a browser's GET.
HEADS = {
    'GET': b'GET /images/0123456789abcdef0123456789abcdef HTTP/1.1\r\nHost: 127.0.0.1:40000\r\n\r\n',
    'POST same': (
        b'POST /images HTTP/1.1\r\nHost: 127.0.0.1:40000\r\nContent-Length: 4289\r\n'
        b'Content-Type: multipart/form-data; boundary=----iss-bench-boundary\r\n\r\n'
    ),
    'GET browser': (
        b'GET /images/0123456789abcdef0123456789abcdef HTTP/1.1\r\nHost: 127.0.0.1:40000\r\n'
        + b''.join(f'{name}: {value}\r\n'.encode() for name, value in BROWSER_HEADERS)
        + b'\r\n'
    ),
}


def browser_script(work: pathlib.Path) -> str:
    """A wrk script sending :data:`BROWSER_HEADERS` with every GET."""
    script = work / 'browser.lua'
    script.write_text(''.join(f'wrk.headers["{name}"] = [[{value}]]\n' for name, value in BROWSER_HEADERS))
    return str(script)


def parser_in_use(url: str) -> str:
    """Which parser read a request, from the 400 a bad method gets: 'C' (gunicorn_h1c) or 'py'."""
    host, port = url.removeprefix('http://').split(':')
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b'G@T / HTTP/1.1\r\nHost: x\r\n\r\n')
        answer = b''
        while chunk := sock.recv(65536):
            answer += chunk
    if b' 400 ' not in answer.split(b'\r\n', 1)[0]:
        sys.exit(f'{url}: a bad method was not answered 400:\n{answer!r}')
    return 'C' if b'Invalid character' in answer else 'py'


class _OneRead(Unreader):
    """An unreader whose source gives ``data`` once, then nothing: a request head already received."""

    def __init__(self, data: bytes) -> None:
        super().__init__()
        self._data = data

    def chunk(self, *_: object) -> bytes:
        data, self._data = self._data, b''
        return data


def head_parse_us(repeats: int = 40, number: int = 2000) -> dict[str, dict[str, float]]:
    """CPU microseconds of gunicorn's ``Request()`` of each head, per parser: the least of ``repeats`` batches.

    NOTE: in this process, the parsers' batches interleaved, so a busy machine slows both alike: the
    part of a request the setting changes, measured apart from the rest of the request's CPU.
    """
    configs = {}
    for name, setting in PARSERS.items():
        configs[name] = Config()
        configs[name].set('http_parser', setting)
    best = {name: dict.fromkeys(HEADS, float('inf')) for name in PARSERS}
    for _ in range(repeats):
        for head_name, head in HEADS.items():
            for name, config in configs.items():
                started = time.process_time()
                for _ in range(number):
                    Request(config, _OneRead(head), ('127.0.0.1', 40000))
                spent = (time.process_time() - started) * 1e6 / number
                best[name][head_name] = min(best[name][head_name], spent)
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--floor', default='/work/shared/bench/floor', help="the shared bench's floorapp.py directory")
    parser.add_argument('--rounds', type=int, default=5)
    parser.add_argument('--seconds', type=float, default=5)
    args = parser.parse_args()
    if importlib.util.find_spec('gunicorn_h1c') is None:
        sys.exit(f'{sys.executable} has no gunicorn_h1c: run this with a python that has it')
    heads = head_parse_us()
    for head_name in HEADS:
        py, c = heads['py'][head_name], heads['C'][head_name]
        print(f'Request() of a {head_name} head: {py:.1f} us CPU (py), {c:.1f} us (C): {c - py:+.1f} us', flush=True)
    work = pathlib.Path(tempfile.mkdtemp(prefix='iss-c-parser-'))
    head, text, tail = iss_bench.make_png_parts()
    png = head + text + tail
    same = small_requests.same_bytes_script(work, png)
    browser = browser_script(work)
    gunicorn = [sys.executable, '-m', 'gunicorn']
    floor = [*gunicorn, '-c', '/dev/null', '-k', 'gthread', '-w', '2', '--threads', '16', '--bind', '127.0.0.1:{port}']
    pids: list[int] = []
    # side -> {case: (pid, url, wrk script)}
    sides: dict[str, dict[str, tuple[int | None, str, str | None]]] = {}
    bases: dict[str, str] = {}  # side -> its server's URL
    load_before = pathlib.Path('/proc/loadavg').read_text().split()[:3]
    started = time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())
    try:
        for name, setting in PARSERS.items():
            pid, url = small_requests.start(
                [*floor, '--http-parser', setting, 'floorapp:app'], args.floor, {}, work / f'floor-{name}.log', '/get'
            )
            pids.append(pid)
            bases[f'floor {name}'] = url
            sides[f'floor {name}'] = {
                'GET': (pid, url + '/get', None),
                'GET browser': (pid, url + '/get', browser),
                'POST same': (pid, url + '/post', same),
            }
        for name, setting in PARSERS.items():
            environment = {'ISS_LOG_LEVEL': 'warning', 'ISS_DATA': str(work / f'data-{name}')}
            pid, url = small_requests.start(
                [*gunicorn, '--http-parser', setting, 'iss:app'],
                str(CHECKOUT),
                environment,
                work / f'iss-{name}.log',
                '/health',
            )
            pids.append(pid)
            image = small_requests.store_png(url, png)
            bases[f'ISS {name}'] = url
            sides[f'ISS {name}'] = {
                'GET': (pid, f'{url}/images/{image}', None),
                'GET browser': (pid, f'{url}/images/{image}', browser),
                'POST same': (pid, f'{url}/images', same),
            }
        for side, url in bases.items():
            found = parser_in_use(url)
            if found != side.split()[1]:
                sys.exit(f'{side}: its bad request was read by the {found} parser')
            print(f'{side}: the {found} parser reads its requests', flush=True)
        cases = ('GET', 'GET browser', 'POST same')
        results = alternate.alternating_rounds(
            args.rounds,
            {case: list(sides) for case in cases},
            lambda case, side: small_requests.measure(*sides[side][case][:2], args.seconds, sides[side][case][2]),
            show=lambda value: f'{value[0]:,.0f} req/s, {value[1]:.3f} ms CPU',
        )
    finally:
        small_requests.stop(pids)
        subprocess.run(['rm', '-rf', str(work)], check=False)
    load_after = pathlib.Path('/proc/loadavg').read_text().split()[:3]
    print(f'\n{started}, {small_requests.machine()}; 4 KiB, wrk -t2 -c16, {args.seconds:g} s x {args.rounds} rounds')
    print(f'load average {" ".join(load_before)} before, {" ".join(load_after)} after')
    for case, by_side in results.items():
        for side, values in by_side.items():
            rps = statistics.median(value[0] for value in values)
            cpu = statistics.median(value[1] or 0 for value in values)
            print(f'{case:10} {side:9} {rps:8,.0f} req/s, {cpu:.3f} ms CPU/req')
        for mine, theirs in (
            ('ISS py', 'floor py'),
            ('ISS C', 'floor C'),
            ('ISS C', 'floor py'),
            ('floor C', 'floor py'),
            ('ISS C', 'ISS py'),
        ):
            pairs = zip(by_side[mine], by_side[theirs], strict=True)
            cpu_ratios = [(a[1] or 0) / (b[1] or 1) for a, b in pairs]
            change = [(a[1] or 0) - (b[1] or 0) for a, b in zip(by_side[mine], by_side[theirs], strict=True)]
            line = f'{case:10} CPU/req {mine} / {theirs}: {small_requests.spread(cpu_ratios)}'
            if mine.split()[0] == theirs.split()[0]:
                line += f', {statistics.median(change) * 1000:+.0f} us CPU per request'
            print(line)
    return 0


if __name__ == '__main__':
    sys.exit(main())
