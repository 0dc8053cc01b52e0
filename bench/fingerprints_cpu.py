"""Measure the CPU an upload's fingerprints cost: ``images.fingerprints`` and each of its hashes.

    .venv/bin/python -m bench.fingerprints_cpu [--calls 700]

Three images: the tests' 100x80 one-colour PNG (``make_png``), the small-requests bench's
4 KiB PNG (36x36 random pixels, ``iss_bench.make_png_parts``) and a 12 MP JPEG (a grey ramp
and noise). For each: ``fingerprints`` in all (open, draft decode, reduction, the three hashes)
and each hash alone on the image ``placeholders.small`` gives (the placeholders reducing it to
32 px themselves). CPU time (``time.process_time``), the least of 7 runs: the machine is shared
and the least is the least disturbed.
"""

from __future__ import annotations

import argparse
import io
import time
from collections.abc import Callable

from PIL import Image

from bench import iss_bench
from iss_server import images, placeholders, similar
from iss_testing.data import make_png

RUNS = 7


def cpu_ms(call: Callable[[], object], calls: int) -> float:
    """The CPU of one ``call`` in ms: the least of :data:`RUNS` runs of ``calls / RUNS`` calls."""
    call()
    per_run = max(1, calls // RUNS)
    best = float('inf')
    for _ in range(RUNS):
        start = time.process_time()
        for _ in range(per_run):
            call()
        best = min(best, (time.process_time() - start) / per_run * 1000)
    return best


def photo() -> bytes:
    """A 4000x3000 JPEG: a grey ramp under noise (quality 85)."""
    ramp = Image.linear_gradient('L').resize((4000, 3000)).convert('RGB')
    noise = Image.effect_noise((4000, 3000), 40).convert('RGB')
    encoded = io.BytesIO()
    Image.blend(ramp, noise, 0.5).save(encoded, 'JPEG', quality=85)
    return encoded.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--calls', type=int, default=700)
    calls = parser.parse_args().calls
    cases = {
        '100x80 PNG (make_png)': make_png(),
        '4 KiB PNG (36x36 noise)': b''.join(iss_bench.make_png_parts()),
        '12 MP JPEG': photo(),
    }
    for name, data in cases.items():
        slow = 10 if 'JPEG' in name else 1  # NOTE: a 12 MP decode, even at 1/8 scale, is ~50 ms
        size, parts = measure(data, calls, slow)
        print(f'{name}, shown {size}: ' + ', '.join(f'{k} {v:.2f}' for k, v in parts.items()) + ' ms')


def measure(data: bytes, calls: int, slow: int) -> tuple[str, dict[str, float]]:
    """The size ``placeholders.small`` gives ``data``, and the CPU ms of fingerprints and of each hash."""
    with Image.open(io.BytesIO(data)) as opened:
        shown = placeholders.small(opened)
    return f'{shown.width}x{shown.height}', {
        'fingerprints': cpu_ms(lambda: images.fingerprints(io.BytesIO(data), 10**8), calls // slow),
        'phash': cpu_ms(lambda: similar.perceptual_hash(shown), calls),
        'thumbhash': cpu_ms(lambda: placeholders.thumbhash(shown), calls),
        'blurhash': cpu_ms(lambda: placeholders.blurhash(shown), calls),
    }


if __name__ == '__main__':
    main()
