"""Measure how well the perceptual hash finds altered copies and avoids false neighbours.

    .venv/bin/python -m bench.near_duplicates [--images 3000] [--hash phash|dhash|both]

Makes ``--images`` distinct synthetic pictures (deterministic seeds: a gradient,
shapes, a block of text-like marks, noise, a blur), and of each five altered copies:
resized to half, re-encoded as JPEG quality 40, cropped by up to 5 %, brightened by
20 %, converted to WebP. For each distance threshold it reports recall (the copies
within the threshold of their original) by alteration, and the false neighbours:
the pairs of distinct originals within the threshold, and the share of originals
that have one. ``test_similar.py`` runs the same with a few hundred images.
"""

from __future__ import annotations

import argparse
import io
import random
import time
from collections.abc import Callable

from PIL import Image, ImageDraw, ImageEnhance, ImageFilter

from iss_server import similar

SIZE = (320, 240)


def picture(seed: int) -> Image.Image:
    """Return a distinct, natural-ish picture for ``seed``: the same seed, the same picture."""
    rng = random.Random(seed)
    width, height = SIZE
    start, end = (tuple(rng.randrange(256) for _ in range(3)) for _ in range(2))
    ramp = Image.linear_gradient('L').resize(SIZE).rotate(rng.choice((0, 90, 180, 270)), expand=False)
    image = Image.composite(Image.new('RGB', SIZE, end), Image.new('RGB', SIZE, start), ramp)
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randint(3, 9)):
        colour = tuple(rng.randrange(256) for _ in range(3))
        x0, y0 = rng.randrange(width), rng.randrange(height)
        x1, y1 = x0 + rng.randint(20, width // 2), y0 + rng.randint(20, height // 2)
        shape = rng.choice(('ellipse', 'rectangle', 'polygon', 'line'))
        if shape == 'ellipse':
            draw.ellipse((x0, y0, x1, y1), fill=colour)
        elif shape == 'rectangle':
            draw.rectangle((x0, y0, x1, y1), fill=colour)
        elif shape == 'polygon':
            draw.polygon([(rng.randrange(width), rng.randrange(height)) for _ in range(rng.randint(3, 6))], fill=colour)
        else:
            draw.line((x0, y0, x1, y1), fill=colour, width=rng.randint(2, 12))
    if rng.random() < 0.5:  # text-like marks: lines of short dark "words"
        ink = tuple(rng.randrange(80) for _ in range(3))
        left, top = rng.randrange(width // 2), rng.randrange(height // 2)
        for line in range(rng.randint(3, 8)):
            x = left
            while x < min(width - 10, left + 160):
                word = rng.randint(6, 30)
                draw.rectangle((x, top + line * 12, x + word, top + line * 12 + 6), fill=ink)
                x += word + 5
    # NOTE: noise from the seed's generator: Image.effect_noise draws from C's rand(), no seed of ours.
    noise = Image.frombytes('L', SIZE, rng.randbytes(width * height)).convert('RGB')
    image = Image.blend(image, noise, rng.uniform(0.05, 0.25))
    return image.filter(ImageFilter.GaussianBlur(rng.uniform(0, 1.5)))


def _encoded(image: Image.Image, format: str, **options: object) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format, **options)
    return Image.open(io.BytesIO(buffer.getvalue()))


def alterations(image: Image.Image, seed: int) -> dict[str, Image.Image]:
    """Return the five altered copies of ``image`` (the crop's sides drawn from ``seed``)."""
    rng = random.Random(seed)
    width, height = image.size
    # Up to 5 % of each dimension taken off, split between the two sides at random.
    cut_x, cut_y = rng.randint(1, width // 20), rng.randint(1, height // 20)
    left, top = rng.randint(0, cut_x), rng.randint(0, cut_y)
    return {
        'resized': image.resize((width // 2, height // 2), Image.Resampling.LANCZOS),
        'jpeg40': _encoded(image, 'JPEG', quality=40),
        'cropped': image.crop((left, top, width - (cut_x - left), height - (cut_y - top))),
        'brightened': ImageEnhance.Brightness(image).enhance(1.2),
        'webp': _encoded(image, 'WEBP', quality=75),
    }


def dhash(image: Image.Image) -> int:
    """Return the 64-bit difference hash (9x8 grey, each pixel against its right neighbour), for comparison."""
    pixels = image.convert('RGB').resize((9, 8), Image.Resampling.BOX).convert('L').tobytes()
    value = 0
    for row in range(8):
        for column in range(8):
            value = (value << 1) | (pixels[row * 9 + column] > pixels[row * 9 + column + 1])
    return value


HASHES: dict[str, Callable[[Image.Image], int]] = {'phash': similar.perceptual_hash, 'dhash': dhash}


def evaluate(count: int, hash_image: Callable[[Image.Image], int], thresholds: list[int]) -> dict:
    """Return recall by alteration and false neighbours for each threshold, over ``count`` originals."""
    originals, copies = [], []  # copies: (original's number, alteration, hash)
    for seed in range(count):
        image = picture(seed)
        originals.append(hash_image(image))
        for name, altered in alterations(image, seed).items():
            copies.append((seed, name, hash_image(altered)))
    copy_distances = [(name, similar.distance(originals[seed], value)) for seed, name, value in copies]
    pair_distances = [
        similar.distance(a, originals[j]) for i, a in enumerate(originals) for j in range(i + 1, len(originals))
    ]
    # The nearest other original of each, for the share of originals with a false neighbour.
    nearest = [64] * count
    for i in range(count):
        for j in range(i + 1, count):
            d = similar.distance(originals[i], originals[j])
            nearest[i], nearest[j] = min(nearest[i], d), min(nearest[j], d)
    names = sorted({name for name, _ in copy_distances})
    results = {}
    for threshold in thresholds:
        recall = {name: sum(d <= threshold for n, d in copy_distances if n == name) / count for name in names}
        recall['all'] = sum(d <= threshold for _, d in copy_distances) / len(copy_distances)
        results[threshold] = {
            'recall': recall,
            'false_pairs': sum(d <= threshold for d in pair_distances),
            'pairs': len(pair_distances),
            'with_false_neighbour': sum(d <= threshold for d in nearest) / count,
        }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--images', type=int, default=3000)
    parser.add_argument('--hash', choices=(*HASHES, 'both'), default='both')
    parser.add_argument('--thresholds', default='4,6,8,10,12,14')
    args = parser.parse_args()
    thresholds = [int(t) for t in args.thresholds.split(',')]
    for name in HASHES if args.hash == 'both' else (args.hash,):
        start = time.perf_counter()
        results = evaluate(args.images, HASHES[name], thresholds)
        print(f'{name}: {args.images} originals x 5 copies, {time.perf_counter() - start:.0f} s', flush=True)
        for threshold, result in results.items():
            recall = ' '.join(f'{k}={v:.3f}' for k, v in result['recall'].items())
            print(
                f'  d<={threshold:2}  recall {recall}  false pairs {result["false_pairs"]}/{result["pairs"]}'
                f'  originals with a false neighbour {result["with_false_neighbour"]:.4f}',
                flush=True,
            )


if __name__ == '__main__':
    main()
