"""HEIC/HEIF, AVIF and JPEG XL: made by their libraries, opened by Pillow with their size, mode and EXIF."""

from __future__ import annotations

import io

import pytest
from PIL import Image, ImageOps

from iss_server import formats

ORIENTATION, GPS = 0x0112, 0x8825
WHERE = {1: 'N', 2: (52.0, 31.0, 12.0), 3: 'E', 4: (13.0, 24.0, 1.5)}


def tagged(width: int = 64, height: int = 48) -> tuple[Image.Image, Image.Exif]:
    """A picture whose left half is red, with EXIF: turned 90 degrees clockwise (6), and a GPS position."""
    image = Image.new('RGB', (width, height), 'blue')
    image.paste('red', (0, 0, width // 2, height))
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    exif[GPS] = WHERE
    return image, exif


def encoded(image: Image.Image, image_format: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, image_format, **options)
    return buffer.getvalue()


def test_register_is_idempotent_and_adds_all_three():
    formats.register()
    formats.register()
    assert formats.supported() == {'HEIF': True, 'JXL': True, 'AVIF': True}
    assert Image.registered_extensions()['.heic'] == 'HEIF'
    assert Image.registered_extensions()['.jxl'] == 'JXL'
    assert [Image.MIME[name] for name in formats.NAMES] == ['image/heif', 'image/jxl', 'image/avif']


@pytest.mark.parametrize('image_format', ['AVIF', 'JXL'])
def test_avif_and_jxl_open_with_their_size_mode_and_exif(image_format):
    formats.register()
    image, exif = tagged()
    opened = Image.open(io.BytesIO(encoded(image, image_format, exif=exif.tobytes())))
    assert (opened.format, opened.size, opened.mode) == (image_format, (64, 48), 'RGB')
    assert opened.getexif()[ORIENTATION] == 6
    assert opened.getexif().get_ifd(GPS) == WHERE
    upright = ImageOps.exif_transpose(opened)
    assert upright.size == (48, 64)
    assert upright.getpixel((24, 5))[0] > 200  # NOTE: turned clockwise, the red left half is on top


def test_heic_opens_upright_with_its_gps():
    """pillow-heif turns the image by the orientation itself and reports 1: exif_transpose then does nothing."""
    formats.register()
    image, exif = tagged()
    opened = Image.open(io.BytesIO(encoded(image, 'HEIF', exif=exif.tobytes(), quality=90)))
    assert (opened.format, opened.size, opened.mode) == ('HEIF', (48, 64), 'RGB')
    assert opened.getexif().get(ORIENTATION, 1) == 1
    assert opened.getexif().get_ifd(GPS) == WHERE
    upright = ImageOps.exif_transpose(opened)
    assert upright.size == (48, 64)
    assert upright.getpixel((24, 5))[0] > 200


def test_a_heic_with_a_thumbnail_drafts_it_instead_of_decoding_the_image():
    formats.register()
    image = Image.new('RGB', (1024, 768), 'green')
    opened = Image.open(io.BytesIO(encoded(image, 'HEIF', quality=50, thumbnails=[160])))
    assert opened.size == (1024, 768)
    opened.thumbnail((64, 64))  # NOTE: draft (1024x768 -> the 160 px thumbnail), then the resize
    assert opened.size == (64, 48)
    drafted = Image.open(io.BytesIO(encoded(image, 'HEIF', quality=50, thumbnails=[160])))
    assert drafted.draft(None, (128, 128)) is None  # NOTE: 160x120 is not at least 128x128: no
    assert drafted.draft(None, (100, 100)) is not None
    assert drafted.size == (160, 120)


# -- a JPEG XL's headers, read without decoding (issue 27's trial: 12 KB cost 1.2 GB to identify) --------


@pytest.mark.parametrize('mode', ['L', 'LA', 'RGB', 'RGBA', 'I;16', 'F'])
@pytest.mark.parametrize('options', [{}, {'lossless': True}, {'use_container': True}], ids=['lossy', 'lossless', 'box'])
def test_a_jxl_header_says_the_size_and_mode_libjxl_decodes(mode, options):
    formats.register()
    image = Image.new(mode, (37, 21), {'L': 9, 'I;16': 300, 'F': 0.5}.get(mode, 'red'))
    data = encoded(image, 'JXL', **options)

    header = formats.jxl_header(io.BytesIO(data))
    opened = Image.open(io.BytesIO(data))
    declared = (opened.size, opened.mode)
    opened.load()

    assert (header.width, header.height, header.mode) == (37, 21, mode)
    assert declared == (opened.size, opened.mode) == ((37, 21), mode)
    assert header.bits_per_sample == opened.info['bit_depth'] == {'I;16': 16, 'F': 32}.get(mode, 8)


def test_a_jxl_header_cut_short_or_not_a_jxl_is_a_value_error():
    formats.register()
    data = encoded(Image.new('RGBA', (37, 21), 'red'), 'JXL', use_container=True)

    for broken in (data[:40], b'\xff\x0a\x01', b'GIF89a' + bytes(20)):
        with pytest.raises(ValueError):
            formats.jxl_header(io.BytesIO(broken))
