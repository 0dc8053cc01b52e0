"""Placeholders: ThumbHash and BlurHash as the references compute them, decodable back to the picture."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image, ImageChops, ImageDraw, ImageStat

from iss_server import placeholders


def scene(width: int = 32, height: int = 24) -> Image.Image:
    """A blue-to-orange gradient with a red disc and a dark bar: colour, shape and a ramp."""
    ramp = Image.linear_gradient('L').resize((width, height))
    size = (width, height)
    image = Image.composite(Image.new('RGB', size, (250, 160, 40)), Image.new('RGB', size, (30, 60, 200)), ramp)
    draw = ImageDraw.Draw(image)
    draw.ellipse((width // 8, height // 8, width // 2, height // 2), fill=(220, 20, 30))
    draw.rectangle((width * 5 // 8, height * 5 // 8, width - 2, height - 3), fill=(20, 20, 20))
    return image


def mean_difference(a: Image.Image, b: Image.Image) -> float:
    """The mean absolute difference of two images' RGB levels (0 to 255), ``b`` resized to ``a``."""
    difference = ImageChops.difference(a.convert('RGB'), b.convert('RGB').resize(a.size, Image.Resampling.BOX))
    return sum(ImageStat.Stat(difference).mean) / 3


# NOTE: computed by two independent ports of the references, not by our code: thumbhash 0.1.2
# (a port of Evan Wallace's encoder) and blurhash 1.1.5 (a port of Wolt's Swift encoder).
KNOWN = [
    ((32, 24), 'W2gGZYhvx3UEqpWoZkhsPmpw9kM5', 'LXIfZ6}TJ.Fz5LRQX8OZkGX8n%r@'),
    ((24, 32), 'W2gGZQhvxgWqdWpWa005impw9lI4', 'TWIV=W}TJ.0[M|S#bff+n%6US~r?'),
    ((32, 32), 'W1gGZwhvx3UFqpWnZlhr1pSkqAZnP4QD', 'LWIMT,}TJoFz0[M|X8OZf:kCn%nj'),
]


@pytest.mark.parametrize(('size', 'thumbhash', 'blurhash'), KNOWN)
def test_known_vectors(size, thumbhash, blurhash):
    image = scene(*size)
    assert placeholders.thumbhash(image) == thumbhash
    assert placeholders.blurhash(image) == blurhash


def test_the_reference_flower_decodes_to_its_shape_and_average_colour():
    """The ThumbHash of the reference's flower.jpg (75x100), as the Elixir and .NET ports' tests give it.

    Their tests give its aspect ratio (5/7) and average colour (0.484, 0.341, 0.079); the mean of the
    decoded pixels is that average (the cosines sum to zero over the pixels), give or take clipping.
    """
    decoded = placeholders.thumbhash_to_image('k0oGLQaSVsN0BVhn2oq2Z5SQUQcZ')
    assert decoded.size == (23, 32)
    mean = ImageStat.Stat(decoded).mean
    for level, average in zip(mean, (0.484127015, 0.341269821, 0.0793650597, 1.0), strict=True):
        assert abs(level / 255 - average) < 0.01


@pytest.mark.parametrize('size', [(640, 480), (300, 500), (64, 64)])
def test_both_decode_back_to_the_picture(size):
    image = scene(*size)
    thumb = placeholders.thumbhash_to_image(placeholders.thumbhash(image))
    blur = placeholders.blurhash_to_image(placeholders.blurhash(image), (32, 32))
    # NOTE: the aspect ratio travels in a ThumbHash (roughly: sides of up to 7 cosines), not in a BlurHash.
    assert max(thumb.size) == 32
    assert abs(thumb.width / thumb.height - size[0] / size[1]) < 0.25
    # NOTE: measured ~32 levels off the sharp-edged source, ~78 off the same source turned round.
    turned = image.transpose(Image.Transpose.ROTATE_180)
    for decoded in (thumb, blur):
        assert mean_difference(decoded, image) < 40
        assert mean_difference(decoded, turned) > 65
    # The average colour, what a page shows first, is near exact.
    average = ImageStat.Stat(image.convert('RGB')).mean
    for decoded in (thumb, blur):
        assert all(abs(a - b) < 12 for a, b in zip(ImageStat.Stat(decoded.convert('RGB')).mean, average, strict=True))


def test_thumbhash_keeps_alpha():
    image = scene(40, 40).convert('RGBA')
    image.putalpha(Image.new('L', (40, 40), 255).crop((0, 0, 40, 40)))
    ImageDraw.Draw(image).rectangle((0, 0, 39, 19), fill=(0, 0, 0, 0))  # the top half transparent
    decoded = placeholders.thumbhash_to_image(placeholders.thumbhash(image))
    alpha = decoded.getchannel('A')
    top, bottom = alpha.crop((0, 0, 32, 12)), alpha.crop((0, 20, 32, 32))
    assert ImageStat.Stat(top).mean[0] < 60
    assert ImageStat.Stat(bottom).mean[0] > 200
    assert base64.b64decode(placeholders.thumbhash(scene())) != base64.b64decode(placeholders.thumbhash(image))


def test_a_blurhash_paints_transparent_pixels_white_not_the_colour_they_hide():
    """A fully transparent image (black under its alpha) gave a black placeholder."""
    clear = Image.new('RGBA', (40, 30), (0, 0, 0, 0))
    half = Image.new('RGBA', (40, 30), (0, 0, 150, 255))
    ImageDraw.Draw(half).rectangle((0, 0, 39, 14), fill=(0, 0, 0, 0))  # the top half transparent

    painted = placeholders.blurhash_to_image(placeholders.blurhash(clear))
    assert ImageStat.Stat(painted).mean == pytest.approx([255, 255, 255], abs=6)  # NOTE: the DC is quantized
    top, bottom = (
        placeholders.blurhash_to_image(placeholders.blurhash(half)).crop(box)
        for box in [(0, 0, 32, 8), (0, 24, 32, 32)]
    )
    assert min(ImageStat.Stat(top).mean) > 200
    assert ImageStat.Stat(bottom).mean[2] > ImageStat.Stat(bottom).mean[0] + 30  # NOTE: blue, blurred into white


def test_a_large_jpeg_is_decoded_small():
    encoded = io.BytesIO()
    scene(3200, 2400).save(encoded, 'JPEG', quality=85)
    opened = Image.open(io.BytesIO(encoded.getvalue()))
    reduced = placeholders.small(opened)
    assert reduced.size == (100, 75)
    assert reduced.mode == 'RGBA'
    assert opened.size == (400, 300)  # NOTE: draft: the decoder ran at 1/8 scale
    # The same placeholder as from the full-size pixels, give or take JPEG's loss.
    from_draft = placeholders.thumbhash_to_image(placeholders.thumbhash(reduced))
    from_full = placeholders.thumbhash_to_image(placeholders.thumbhash(scene(3200, 2400)))
    assert mean_difference(from_draft, from_full) < 3


def test_a_blurhash_of_the_wrong_length_is_refused():
    with pytest.raises(ValueError):
        placeholders.blurhash_to_image('LXIfZ6}TJ.Fz5LRQX8OZkGX8n%r')
    with pytest.raises(ValueError):
        placeholders.blurhash_to_image('LXI')
