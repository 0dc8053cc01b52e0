"""How long the browse page takes to show its first screen of 100 thumbnails, with a cold derivative cache.

    python -m bench.browse [--images 120] [--rounds 5]

Makes a store of ``--images`` camera-sized JPEGs (1280x720, each different), then each round:
a fresh gunicorn from this tree on that data with ``derived/`` emptied (so every thumbnail is
rendered), a fresh browser context (no HTTP cache), navigation to ``/`` in Debian's Chromium
(Playwright, a 2000x2000 viewport: 100 tiles on the first screen), and the time from the start
of navigation until the first 100 thumbnails are decoded (``performance.now()`` in the page).
Prints each round and the median.
"""

import argparse
import io
import pathlib
import shutil
import statistics
import sys
import tempfile
import urllib.request

from PIL import Image
from playwright.sync_api import sync_playwright

from iss_testing.servers import Gunicorn, free_port

FLAGS = ['--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-component-update']


def photo(number: int) -> bytes:
    """A 1280x720 JPEG unlike the others: gradients turned and tinted by ``number``."""
    gradient = Image.radial_gradient('L').resize((1280, 720))
    turned = Image.linear_gradient('L').rotate(number * 7 % 360).resize((1280, 720))
    tint = Image.new('L', (1280, 720), number * 29 % 256)
    buffer = io.BytesIO()
    Image.merge('RGB', (gradient, turned, tint)).save(buffer, 'JPEG', quality=85)
    return buffer.getvalue()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--images', type=int, default=120)
    parser.add_argument('--rounds', type=int, default=5)
    args = parser.parse_args()
    work = pathlib.Path(tempfile.mkdtemp(prefix='iss-browse-bench-'))
    data = work / 'data'
    port = free_port()
    server = Gunicorn(data, work / 'gunicorn.log', port=port)
    for number in range(args.images):
        request = urllib.request.Request(
            f'http://127.0.0.1:{port}/images', data=photo(number), headers={'Content-Type': 'image/jpeg'}
        )
        urllib.request.urlopen(request).read()
    server.stop()
    times = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=shutil.which('chromium'), args=FLAGS)
        try:
            for number in range(args.rounds):
                shutil.rmtree(data / 'derived', ignore_errors=True)
                server = Gunicorn(data, work / 'gunicorn.log', port=port)
                try:
                    context = browser.new_context(viewport={'width': 2000, 'height': 2000})
                    page = context.new_page()
                    page.goto(f'http://127.0.0.1:{port}/')
                    page.wait_for_function(
                        """() => { const images = [...document.querySelectorAll('#gallery img')].slice(0, 100);
                        return images.length === 100 && images.every(i => i.complete && i.naturalWidth > 0); }""",
                        polling=10,
                    )
                    elapsed = page.evaluate('() => performance.now()') / 1000
                    rendered = len(list((data / 'derived').rglob('*.*')))
                    context.close()
                finally:
                    server.stop()
                times.append(elapsed)
                print(f'round {number + 1}: first 100 thumbnails in {elapsed:.2f} s ({rendered} rendered)')
        finally:
            browser.close()
    shutil.rmtree(work)
    print(f'median {statistics.median(times):.2f} s, max {max(times):.2f} s over {args.rounds} rounds')
    return 0


if __name__ == '__main__':
    sys.exit(main())
