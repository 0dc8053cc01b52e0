"""Derivative requests per second, cold (rendered) and warm (cached), beside Pillow's own loop.

The case: a 12-megapixel JPEG (4000x3000) to a 256-pixel JPEG thumbnail. The limit is the
plain Pillow loop that does the same work in one process (open, draft, thumbnail, save),
measured in the same run; ISS runs under gunicorn as documented (gthread, 2 workers).

    .venv/bin/python -m bench.derivatives [--seconds 10] [--json out.json]

Needs wrk for the warm case (apt-get install -y wrk). Run by hand, on a quiet machine.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import http.client
import io
import itertools
import json
import os
import pathlib
import platform
import re
import subprocess
import sys
import tempfile
import time

from PIL import Image

from iss_testing import HERE
from iss_testing.servers import free_port


def photo() -> bytes:
    """A 4000x3000 JPEG at quality 90 that compresses like a photo (smooth areas and grain)."""
    gradient = Image.linear_gradient('L').resize((4000, 3000))
    grain = Image.effect_noise((4000, 3000), 24)
    image = Image.merge(
        'RGB', (gradient, Image.blend(gradient, grain, 0.3), gradient.transpose(Image.Transpose.FLIP_LEFT_RIGHT))
    )
    buffer = io.BytesIO()
    image.save(buffer, 'JPEG', quality=90)
    return buffer.getvalue()


def pillow_loop(data: bytes, seconds: float) -> float:
    """Thumbnails per second of the plain Pillow loop, one process."""
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        with Image.open(io.BytesIO(data)) as image:
            image.draft('RGB', (256, 256))
            image.thumbnail((256, 256), Image.Resampling.LANCZOS)
            image.save(io.BytesIO(), 'JPEG', quality=80)
        done += 1
    return done / (time.perf_counter() - started)


def pillow_processes(data: bytes, seconds: float, processes: int) -> float:
    with concurrent.futures.ProcessPoolExecutor(processes) as pool:
        return sum(pool.map(pillow_loop, [data] * processes, [seconds] * processes))


def request(port: int, method: str, path: str, body: bytes | None = None, headers=None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection('127.0.0.1', port, timeout=120)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def cold(port: int, image_id: str, seconds: float, concurrency: int) -> float:
    """Renders per second: every request a box not asked before (256x256, 256x255, ...), so all render."""
    sizes = itertools.product(range(256, 128, -1), range(256, 128, -1))
    started = time.perf_counter()

    def one(box: tuple[int, int]) -> None:
        status, _ = request(port, 'GET', f'/images/{image_id}?w={box[0]}&h={box[1]}&format=jpeg&q=80')
        assert status == 200, status

    done = 0
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        while time.perf_counter() - started < seconds:
            list(pool.map(one, [next(sizes) for _ in range(concurrency)]))
            done += concurrency
    return done / (time.perf_counter() - started)


def warm(port: int, image_id: str, seconds: float) -> dict[str, float]:
    url = f'http://127.0.0.1:{port}/images/{image_id}?w=256&h=256&format=jpeg&q=80'
    request(port, 'GET', url[len(f'http://127.0.0.1:{port}') :])  # rendered once
    out = subprocess.run(
        ['wrk', '-t2', '-c16', f'-d{int(seconds)}s', '--latency', url], capture_output=True, text=True, check=True
    ).stdout
    p99 = re.search(r'99%\s+([\d.]+)(us|ms|s)', out)
    scale = {'us': 0.001, 'ms': 1, 's': 1000}[p99.group(2)]
    return {
        'req_per_s': float(re.search(r'Requests/sec:\s+([\d.]+)', out).group(1)),
        'p99_ms': float(p99.group(1)) * scale,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--seconds', type=float, default=10)
    parser.add_argument('--json', type=pathlib.Path)
    args = parser.parse_args()
    data = photo()
    port = free_port()
    with tempfile.TemporaryDirectory() as data_dir:
        env = {**os.environ, 'ISS_DATA': data_dir, 'ISS_PORT': str(port), 'ISS_LOG_LEVEL': 'warning'}
        server = subprocess.Popen([sys.executable, '-m', 'gunicorn', 'iss:app'], cwd=HERE, env=env)
        try:
            for _ in range(100):
                try:
                    if request(port, 'GET', '/health')[0] == 200:
                        break
                except OSError:
                    time.sleep(0.1)
            status, body = request(port, 'POST', '/images', data, {'Content-Type': 'image/jpeg'})
            image_id = json.loads(body)['image_id']
            results = {
                'machine': f'{platform.node()} {os.cpu_count()} cores, {platform.platform()}',
                'date': time.strftime('%Y-%m-%d'),
                'source': f'4000x3000 JPEG q90, {len(data)} bytes -> 256x256 box JPEG q80',
                'pillow_loop_1_process': pillow_loop(data, args.seconds),
                'iss_cold_1_connection': cold(port, image_id, args.seconds, 1),
                'pillow_loop_2_processes': pillow_processes(data, args.seconds, 2),
                'iss_cold_2_connections': cold(port, image_id, args.seconds, 2),
                'iss_warm_wrk_16_connections': warm(port, image_id, args.seconds),
            }
        finally:
            server.terminate()
            server.wait(30)
    results['ratio_cold_1'] = results['iss_cold_1_connection'] / results['pillow_loop_1_process']
    results['ratio_cold_2'] = results['iss_cold_2_connections'] / results['pillow_loop_2_processes']
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + '\n')


if __name__ == '__main__':
    main()
