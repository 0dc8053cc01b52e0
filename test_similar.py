"""Near-duplicate search: the perceptual hash finds altered copies, the band index answers exactly."""

from __future__ import annotations

import io
import random
import sqlite3

import pytest
from PIL import Image

from bench.near_duplicates import alterations, evaluate, picture
from iss_server import placeholders, similar

# -- the hash ---------------------------------------------------------------------------------------


def test_the_hash_is_64_bits_stable_and_about_half_ones():
    values = [similar.perceptual_hash(picture(seed)) for seed in range(40)]
    assert values == [similar.perceptual_hash(picture(seed)) for seed in range(40)]
    assert all(0 <= value < 1 << 64 for value in values)
    # NOTE: each bit says "above the median": half of them, give or take the ties.
    assert all(24 <= value.bit_count() <= 40 for value in values)
    assert len(set(values)) == 40


def test_every_alteration_lands_within_the_default_distance_of_its_original():
    image = picture(1)
    original = similar.perceptual_hash(image)
    for name, altered in alterations(image, 1).items():
        assert similar.distance(original, similar.perceptual_hash(altered)) <= similar.DEFAULT_DISTANCE, name


def test_distinct_pictures_are_far_apart():
    values = [similar.perceptual_hash(picture(seed)) for seed in range(60)]
    distances = [similar.distance(a, b) for i, a in enumerate(values) for b in values[i + 1 :]]
    assert sum(distances) / len(distances) > 24
    assert min(distances) > similar.DEFAULT_DISTANCE


def test_recall_and_precision_at_the_default_distance():
    """bench/near_duplicates.py in small: 3,000 images there, 80 here (see NOTES-similar.md for both)."""
    result = evaluate(80, similar.perceptual_hash, [similar.DEFAULT_DISTANCE])[similar.DEFAULT_DISTANCE]
    assert result['recall']['all'] >= 0.95, result
    for name in ('resized', 'jpeg40', 'brightened', 'webp'):
        assert result['recall'][name] >= 0.98, (name, result)
    assert result['recall']['cropped'] >= 0.85, result
    assert result['with_false_neighbour'] <= 0.02, result


def test_the_hash_of_a_header_sized_decode_is_that_of_the_full_image():
    image = picture(5).resize((1600, 1200))
    encoded = io.BytesIO()
    image.save(encoded, 'JPEG', quality=90)
    opened = Image.open(io.BytesIO(encoded.getvalue()))
    reduced = placeholders.small(opened)
    assert max(reduced.size) <= placeholders.SIDE
    assert opened.size != image.size  # NOTE: draft made the decoder scale down: 12 MP never decoded
    assert similar.distance(similar.perceptual_hash(image), similar.perceptual_hash(reduced)) <= 4


def test_transparent_pixels_hash_as_white():
    shape = Image.new('RGBA', (64, 64), (0, 0, 0, 0))
    shape.paste((200, 30, 30, 255), (16, 16, 48, 48))
    on_white = Image.new('RGB', (64, 64), 'white')
    on_white.paste((200, 30, 30), (16, 16, 48, 48))
    assert similar.perceptual_hash(shape) == similar.perceptual_hash(on_white)
    assert similar.perceptual_hash(shape.convert('LA')) == similar.perceptual_hash(on_white.convert('L'))


def test_every_flat_image_hashes_to_zero_whatever_its_colour():
    # a flat image has no shape: its DCT coefficients were float noise, a different hash per colour
    colours = [(0, 0, 0), (255, 0, 0), (200, 200, 200), (17, 99, 3), (255, 255, 255)]
    assert {similar.perceptual_hash(Image.new('RGB', (64, 64), colour)) for colour in colours} == {0}
    one_step = Image.new('L', (64, 64), 100)
    one_step.paste(101, (0, 0, 32, 32))  # NOTE: a quarter: a half is only row or column 0, left out
    assert similar.perceptual_hash(one_step) != 0  # NOTE: the least structure an 8-bit image has still counts


def test_16_bit_levels_are_scaled_not_clipped():
    grey = Image.linear_gradient('L').resize((64, 64)).rotate(30)
    deep = grey.convert('I').point(lambda level: level * 257).convert('I;16')  # a 16-bit PNG opens so
    assert similar.perceptual_hash(deep) == similar.perceptual_hash(grey)
    assert placeholders.thumbhash(deep) == placeholders.thumbhash(grey.convert('RGBA'))


def test_signed_storage_and_bands():
    for value in (0, 1, (1 << 63) - 1, 1 << 63, (1 << 64) - 1, 0x0123_4567_89AB_CDEF):
        stored = similar.to_signed(value)
        assert -(1 << 63) <= stored < 1 << 63
        assert similar.to_unsigned(stored) == value
        assert similar.distance(stored, value) == 0
        assert similar.bands(value) == similar.bands(stored)
        assert int(similar.to_hex(stored), 16) == value
    assert similar.bands(0x0123_4567_89AB_CDEF) == [0x0123, 0x4567, 0x89AB, 0xCDEF]
    assert similar.distance(0, (1 << 64) - 1) == 64


# -- the index --------------------------------------------------------------------------------------


@pytest.fixture(params=['sqlite', 'postgresql'])
def index(request) -> similar.SimilarIndex:
    if request.param == 'sqlite':
        db = sqlite3.connect(':memory:', isolation_level=None)
        execute = similar.sqlite_execute(db)
    else:
        import psycopg

        db = psycopg.connect(request.getfixturevalue('postgres').new_database(), autocommit=True)
        execute = similar.postgres_execute(db)
    for statement in similar.schema(request.param):
        execute(statement, ())
    yield similar.SimilarIndex(execute)
    db.close()


def flipped(value: int, bits: list[int]) -> int:
    for bit in bits:
        value ^= 1 << bit
    return value


def test_put_near_remove(index):
    base = 0xF0F0_1234_AAAA_5555
    index.put('a' * 64, base)
    index.put('b' * 64, flipped(base, [0, 17, 40]))  # one bit in three of the four bands
    index.put('c' * 64, flipped(base, list(range(0, 64, 3))))  # far
    index.put('d' * 64, (1 << 64) - 1)  # the sign bit set: stored negative
    assert index.near(base, 10) == [('a' * 64, 0), ('b' * 64, 3)]
    assert index.near(base, 2) == [('a' * 64, 0)]
    assert index.near(base, 10, exclude='a' * 64) == [('b' * 64, 3)]
    assert index.near(base, 10, limit=1) == [('a' * 64, 0)]
    assert index.near((1 << 64) - 1, 0) == [('d' * 64, 0)]
    assert index.get('d' * 64) == (1 << 64) - 1
    index.put('b' * 64, base)  # replaced, not added
    assert index.near(base, 10) == [('a' * 64, 0), ('b' * 64, 0)]
    index.remove('a' * 64)
    assert index.near(base, 10) == [('b' * 64, 0)]
    assert index.get('a' * 64) is None


def test_near_is_exact_at_every_distance(index):
    """Against a full scan: every stored hash within the distance, however its flipped bits fall on the bands."""
    rng = random.Random(27)
    rows = [(f'{i:064x}', rng.getrandbits(64)) for i in range(3000)]
    queries = [rng.getrandbits(64) for _ in range(6)]
    for q, query in enumerate(queries):
        for d in range(similar.MAX_DISTANCE + 1):
            # NOTE: the flips bunched in one band, and spread over all four: both must be found.
            bunched = sorted(rng.sample(range(16 * (q % 4), 16 * (q % 4) + 16), min(d, 16)))
            rows.append((f'{q:02x}{d:02x}b'.ljust(64, '0'), flipped(query, bunched)))
            rows.append((f'{q:02x}{d:02x}s'.ljust(64, '0'), flipped(query, rng.sample(range(64), d))))
    index.put_many(rows)
    for query in queries:
        for max_distance in (0, 3, 4, 7, 10, 12, 16):
            scan = sorted((similar.distance(query, v), h) for h, v in rows)
            expected = [(h, d) for d, h in scan if d <= max_distance]
            assert index.near(query, max_distance, limit=1000) == expected, max_distance


def test_a_distance_past_the_maximum_is_refused(index):
    with pytest.raises(ValueError):
        index.near(0, similar.MAX_DISTANCE + 1)
    with pytest.raises(ValueError):
        index.near(0, -1)
