"""Cold thumbnails on imgproxy's published benchmark case, per core, from JPEG and from the phone formats.

    .venv/bin/python -m bench.images_anchor [--seconds 5] [--rounds 3] [--json out.json]

The case (imgproxy's own benchmark, the anchor issue 27 names): a 2K-wide JPEG resized to
fit 512x512, JPEG quality 80, every request rendered (no cache): 79.6 req/s on 2 vCPU for
imgproxy, so ~40 per core. Here, in one run, for the same picture as JPEG (q90), HEIC (q80),
JPEG XL (q85, effort 3) and AVIF (q60, speed 8):

- ``pillow``: the plain Pillow loop in one process, the calls ``images.render`` makes (open,
  ``draft`` to the fitted size for JPEG, LANCZOS resize, save q80): the most a worker could do;
- ``iss``: ISS under gunicorn with one worker (``ISS_WORKERS=1``, one core's worth), two
  connections; every request a box not asked before (512x512, 512x511, ...) so each renders,
  as ``bench/derivatives.py`` does;
- ``pyvips`` (only when it is installed): ``thumbnail_buffer`` and ``write_to_buffer`` of the same.

Ratios are within this run: the methods take turns, ``--rounds`` times ``--seconds`` each, and
each keeps its best round (on a machine shared with other work, the best round is the one least
disturbed). NOTE: imgproxy's number is from its own hardware; ours is a shared 2-core VM: the
comparison with it is an order of magnitude, not a race.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import io
import itertools
import json
import os
import pathlib
import platform
import random
import subprocess
import sys
import tempfile
import time

from PIL import Image

from bench.derivatives import request
from bench.near_duplicates import picture
from iss_server import formats
from iss_testing import HERE
from iss_testing.servers import free_port

SIZE = (2048, 1365)
BOX = 512
#: imgproxy's published figure for this case, and the vCPUs it had.
IMGPROXY = {'req_per_s': 79.6, 'vcpus': 2}


def photo() -> Image.Image:
    """A 2048x1365 picture with grain, so that the encoders have a photo's detail to keep."""
    noise = Image.frombytes('L', SIZE, random.Random(7).randbytes(SIZE[0] * SIZE[1])).convert('RGB')
    return Image.blend(picture(7).resize(SIZE, Image.Resampling.BICUBIC), noise, 0.1)


def sources() -> dict[str, tuple[bytes, str]]:
    """The picture in each format: its bytes and media type."""
    formats.register()
    image = photo()
    out = {}
    for name, image_format, media_type, options in (
        ('jpeg', 'JPEG', 'image/jpeg', {'quality': 90}),
        ('heic', 'HEIF', 'image/heic', {'quality': 80}),
        ('jxl', 'JXL', 'image/jxl', {'quality': 85, 'effort': 3}),
        ('avif', 'AVIF', 'image/avif', {'quality': 60, 'speed': 8}),
    ):
        buffer = io.BytesIO()
        image.save(buffer, image_format, **options)
        out[name] = (buffer.getvalue(), media_type)
    return out


def pillow_loop(data: bytes, seconds: float) -> float:
    """Thumbnails per second of the plain Pillow loop, one process."""
    formats.register()
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        with Image.open(io.BytesIO(data)) as image:
            scale = min(BOX / image.width, BOX / image.height)
            fitted = (round(image.width * scale), round(image.height * scale))
            # NOTE: JPEG only (DCT scaling to the fitted size, as images.render does); the others decode in full
            image.draft('RGB', fitted)
            image = image.resize(fitted, Image.Resampling.LANCZOS, reducing_gap=3.0)
            image.convert('RGB').save(io.BytesIO(), 'JPEG', quality=80)
        done += 1
    return done / (time.perf_counter() - started)


def pyvips_loop(data: bytes, seconds: float) -> float | None:
    """The same with libvips (``pyvips``), one process, one libvips thread; None without it, or the format."""
    try:
        import pyvips  # type: ignore[import-not-found]
    except ImportError:
        return None
    pyvips.cache_set_max(0)
    pyvips.concurrency_set(1)  # NOTE: one thread: per core, as the others
    try:
        pyvips.Image.thumbnail_buffer(data, BOX, height=BOX).write_to_buffer('.jpg[Q=80]')
    except pyvips.Error:
        return None  # NOTE: a format this libvips build does not read (pyvips-binary has no HEVC decoder)
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        pyvips.Image.thumbnail_buffer(data, BOX, height=BOX).write_to_buffer('.jpg[Q=80]')
        done += 1
    return done / (time.perf_counter() - started)


_BOXES = ((BOX - dw, BOX - dh) for dw, dh in itertools.product(range(200), range(200)))


def iss_cold(port: int, image_id: str, seconds: float, connections: int = 2) -> float:
    """Renders per second: each request a box not asked before, so each renders."""
    started = time.perf_counter()

    def one(box: tuple[int, int]) -> None:
        status, _ = request(port, 'GET', f'/images/{image_id}?w={box[0]}&h={box[1]}&format=jpeg&q=80')
        assert status == 200, status

    done = 0
    with concurrent.futures.ThreadPoolExecutor(connections) as pool:
        while time.perf_counter() - started < seconds:
            list(pool.map(one, [next(_BOXES) for _ in range(connections)]))
            done += connections
    return done / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--seconds', type=float, default=5)
    parser.add_argument('--rounds', type=int, default=3)
    parser.add_argument('--json', type=pathlib.Path)
    args = parser.parse_args()
    made = sources()
    port = free_port()
    per_core_imgproxy = IMGPROXY['req_per_s'] / IMGPROXY['vcpus']
    rows: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as data_dir:
        env = {**os.environ, 'ISS_DATA': data_dir, 'ISS_PORT': str(port), 'ISS_LOG_LEVEL': 'warning'}
        env['ISS_WORKERS'] = '1'  # NOTE: one core's worth
        server = subprocess.Popen([sys.executable, '-m', 'gunicorn', 'iss:app'], cwd=HERE, env=env)
        try:
            for _ in range(100):
                try:
                    if request(port, 'GET', '/health')[0] == 200:
                        break
                except OSError:
                    time.sleep(0.1)
            for name, (data, media_type) in made.items():
                status, body = request(port, 'POST', '/images', data, {'Content-Type': media_type})
                assert status in (200, 201), body
                image_id = json.loads(body)['image_id']
                row = {'bytes': float(len(data))}
                for _ in range(args.rounds):
                    measured = {
                        'pillow_1_process': pillow_loop(data, args.seconds),
                        'iss_1_worker': iss_cold(port, image_id, args.seconds),
                        'pyvips_1_process': pyvips_loop(data, args.seconds),
                    }
                    for method, rate in measured.items():
                        if rate is not None:
                            row[method] = max(row.get(method, 0.0), rate)
                row['iss_vs_pillow'] = row['iss_1_worker'] / row['pillow_1_process']
                row['iss_vs_imgproxy_per_core'] = row['iss_1_worker'] / per_core_imgproxy
                row['iss_vs_iss_jpeg'] = row['iss_1_worker'] / rows.get('jpeg', row)['iss_1_worker']
                rows[name] = row
                print(name, json.dumps(row), flush=True)
        finally:
            server.terminate()
            server.wait(30)
    results = {
        'machine': f'{platform.node()} {os.cpu_count()} cores, {platform.platform()}',
        'date': time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime()),
        'case': f'{SIZE[0]}x{SIZE[1]} source -> fit {BOX}x{BOX} JPEG q80, cold (rendered each time)',
        'imgproxy_per_core': per_core_imgproxy,
        **rows,
    }
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + '\n')


if __name__ == '__main__':
    main()
