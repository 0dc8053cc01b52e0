"""Time decoding a 12 MP photo-like image as JPEG, HEIC, AVIF and JPEG XL: in full, and for a 100 px thumbnail.

    .venv/bin/python -m bench.image_formats [--repeat 3]

The picture is bench/near_duplicates.py's synthetic one, 4000x3000, with noise so
that the encoders have detail to keep. JPEG's thumbnail uses ``draft`` (a 1/8-scale
decode); HEIC's does too when the file carries a thumbnail (as a phone's does), so
it is timed with and without one. Prints sizes and the best of ``--repeat`` runs.
"""

from __future__ import annotations

import argparse
import io
import os
import random
import time

from PIL import Image

from bench.near_duplicates import picture
from iss_server import formats

SIZE = (4000, 3000)


def photo() -> Image.Image:
    noise = Image.frombytes('L', SIZE, random.Random(7).randbytes(SIZE[0] * SIZE[1])).convert('RGB')
    return Image.blend(picture(7).resize(SIZE, Image.Resampling.BICUBIC), noise, 0.1)


def encodings(image: Image.Image) -> dict[str, bytes]:
    out = {}
    for name, format, options in (
        ('jpeg q85', 'JPEG', {'quality': 85}),
        ('heic q80', 'HEIF', {'quality': 80}),
        ('avif q60', 'AVIF', {'quality': 60, 'speed': 8}),
        ('jxl q85', 'JXL', {'quality': 85, 'effort': 3}),
    ):
        buffer = io.BytesIO()
        start = time.perf_counter()
        image.save(buffer, format, **options)
        print(f'{name:22} encoded in {time.perf_counter() - start:6.2f} s, {len(buffer.getvalue()) / 2**20:5.2f} MiB')
        out[name] = buffer.getvalue()
    buffer = io.BytesIO()
    image.save(buffer, 'HEIF', quality=80, thumbnails=[320])  # NOTE: as a phone's HEIC carries one
    out['heic q80 + thumbnail'] = buffer.getvalue()
    return out


def best(repeat: int, action) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        action()
        times.append(time.perf_counter() - start)
    return min(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--repeat', type=int, default=3)
    args = parser.parse_args()
    formats.register()
    print(time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime()), os.cpu_count(), 'cores (shared, noisy)')
    for name, data in encodings(photo()).items():

        def full(data=data):
            Image.open(io.BytesIO(data)).load()

        def header(data=data):
            return Image.open(io.BytesIO(data)).size

        def thumb(data=data):
            image = Image.open(io.BytesIO(data))
            image.thumbnail((100, 100))

        print(
            f'{name:22} open (size only) {best(args.repeat, header):7.1f} ms  full decode '
            f'{best(args.repeat, full):7.1f} ms  100 px thumbnail {best(args.repeat, thumb):7.1f} ms'
        )


if __name__ == '__main__':
    main()
