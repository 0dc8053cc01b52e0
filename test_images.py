"""Images as first-class: metadata from the header, derivatives rendered once and cached, limits."""

from __future__ import annotations

import io
import json
import pathlib
import re
import subprocess
import sys
import threading
import zlib

import pytest
import webtest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageCms, ImageOps

import iss
from iss_server import formats, images, meta, signing
from iss_server.config import ConfigError, Settings
from iss_server.disk import disk_bytes
from iss_testing import HERE
from iss_testing.cli import cli_json, upload_image
from iss_testing.data import blob_id, blob_path, file_store, files_under, make_png

# NOTE: every test here that takes a client runs on each store, unless marked file_store.
pytestmark = pytest.mark.both_stores


def encode(image: Image.Image, image_format: str = 'PNG', **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, image_format, **options)
    return buffer.getvalue()


def quadrants(width: int = 40, height: int = 20) -> Image.Image:
    """Red top-left, green top-right, blue bottom-left, white bottom-right: every turn shows."""
    image = Image.new('RGB', (width, height), 'white')
    image.paste('red', (0, 0, width // 2, height // 2))
    image.paste('lime', (width // 2, 0, width, height // 2))
    image.paste('blue', (0, height // 2, width // 2, height))
    return image


def colours_at_quadrants(image: Image.Image) -> list[tuple[int, ...]]:
    width, height = image.size
    rgb = image.convert('RGB')
    return [rgb.getpixel((x * width // 4, y * height // 4)) for y in (1, 3) for x in (1, 3)]


def close(colour: tuple[int, ...], expected: tuple[int, ...], tolerance: int = 40) -> bool:
    return all(abs(a - b) <= tolerance for a, b in zip(colour, expected, strict=True))


RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def store(client, data: bytes) -> str:
    return client.post('/images', data, headers={'Content-Type': 'image/png'}).json['image_id']


def derive(client, image_id: str, query: str, **kwargs) -> Image.Image:
    response = client.get(f'/images/{image_id}?{query}', **kwargs)
    return Image.open(io.BytesIO(response.body))


# -- metadata ------------------------------------------------------------------------


def test_upload_records_what_the_header_says_and_the_exif_fields_pipelines_use(client):
    exif = Image.Exif()
    exif[0x010F], exif[0x0110], exif[0x0112] = 'Canon', 'EOS R5', 6  # make, model, orientation
    exif.get_ifd(0x8769)[0x9003] = '2026:11:24 08:15:00'  # DateTimeOriginal
    jpeg = encode(Image.new('RGB', (64, 48), 'grey'), 'JPEG', exif=exif)

    meta = client.get(f'/images/{store(client, jpeg)}/meta').json

    assert {k: meta[k] for k in ('kind', 'mime', 'format', 'width', 'height', 'bytes')} == {
        'kind': 'image',
        'mime': 'image/jpeg',
        'format': 'JPEG',
        'width': 64,
        'height': 48,
        'bytes': len(jpeg),
    }
    assert (meta['oriented_width'], meta['oriented_height']) == (48, 64)  # orientation 6: a quarter turn
    assert (meta['mode'], meta['bit_depth'], meta['channels'], meta['frames']) == ('RGB', 8, 3, 1)
    assert (meta['camera_make'], meta['camera_model'], meta['orientation']) == ('Canon', 'EOS R5', 6)
    assert meta['captured_at'] == '2026-11-24T08:15:00'


@pytest.mark.parametrize(
    'tags, captured_at',
    [
        ({(0x8769, 0x9003): '2026:11:24 08:15:00', (0x8769, 0x9011): '+09:00'}, '2026-11-24T08:15:00+09:00'),
        ({(0x8769, 0x9004): '2025:01:02 03:04:05', (None, 0x0132): '2026:01:01 00:00:00'}, '2025-01-02T03:04:05'),
        ({(None, 0x0132): '2024:02:29 23:59:59'}, '2024-02-29T23:59:59'),
        ({(0x8769, 0x9003): '0000:00:00 00:00:00', (None, 0x0132): '2023:07:08 09:10:11'}, '2023-07-08T09:10:11'),
        ({(0x8769, 0x9003): 'yesterday', (0x8769, 0x9011): '+09:00'}, None),
    ],
    ids=['original-with-offset', 'digitized-before-modified', 'modified-alone', 'placeholder-skipped', 'garbage'],
)
def test_capture_time_is_iso_8601_from_the_best_exif_field_there_is(client, tags, captured_at):
    exif = Image.Exif()
    for (ifd, tag), value in tags.items():
        (exif.get_ifd(ifd) if ifd else exif)[tag] = value
    jpeg = encode(Image.new('RGB', (8, 8)), 'JPEG', exif=exif)

    assert client.get(f'/images/{store(client, jpeg)}/meta').json['captured_at'] == captured_at


def test_sixteen_bit_transparent_and_animated_images_are_described(client):
    grey16 = encode(Image.new('I;16', (8, 8), 30000))
    rgba = encode(Image.new('RGBA', (8, 8), (0, 0, 0, 0)))
    frames = [Image.new('RGB', (8, 8), colour).convert('P') for colour in ('red', 'lime', 'blue')]
    gif = encode(frames[0], 'GIF', save_all=True, append_images=frames[1:], duration=100)

    described = [client.get(f'/images/{store(client, data)}/meta').json for data in (grey16, rgba, gif)]

    assert [(m['mode'], m['bit_depth'], m['channels'], m['frames']) for m in described] == [
        ('I;16', 16, 1, 1),
        ('RGBA', 8, 4, 1),
        ('P', 8, 1, 3),
    ]
    assert described[0]['captured_at'] is None and described[0]['orientation'] is None


def write_seed_image(data_dir, data: bytes) -> str:
    digest = blob_id(data)
    meta = {'kind': 'image', 'bytes': len(data), 'mime': 'image/x-claimed', 'width': 1, 'height': 1, 'created_at': 5.0}
    for top, suffix, content in (('blobs', '', data), ('meta', '.json', json.dumps(meta).encode())):
        path = blob_path(data_dir, digest, top, suffix)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    return digest


def test_seed_meta_is_completed_on_read_and_kept_with_the_seed_keys_as_they_were(data_dir):
    digest = write_seed_image(data_dir, make_png(30, 20))
    client = webtest.TestApp(iss.build_app(Settings(data_dir=str(data_dir))))

    meta = client.get(f'/images/{digest}/meta').json

    assert (meta['mime'], meta['width'], meta['height'], meta['created_at']) == ('image/x-claimed', 1, 1, 5.0)
    assert (meta['format'], meta['mode'], meta['oriented_width']) == ('PNG', 'RGB', 30)
    on_disk = json.loads(blob_path(data_dir, digest, 'meta', '.json').read_bytes())
    assert on_disk == meta, 'completed once and for good'


@pytest.mark.file_store
def test_backfill_completes_every_seed_image_in_the_store(data_dir, client):
    seeds = [write_seed_image(data_dir, make_png(10 + n, 10)) for n in range(3)]
    modern = upload_image(client, make_png(50, 50)).json['image_id']
    cli_json(data_dir, 'reindex')

    result = cli_json(data_dir, 'backfill')

    assert (result['images'], result['completed'], result['failed']) == (4, 3, [])
    for digest in seeds:
        assert json.loads(blob_path(data_dir, digest, 'meta', '.json').read_bytes())['mode'] == 'RGB'
    assert not meta.lacks_fields(client.get(f'/images/{modern}/meta').json)
    assert cli_json(data_dir, 'backfill')['completed'] == 0
    assert cli_json(data_dir, 'fsck')['clean'], 'the index follows the completed meta'


# -- derivatives: sizes, fits, formats --------------------------------------------------


@pytest.mark.parametrize(
    'query, size',
    [
        ('w=20', (20, 10)),
        ('h=5', (10, 5)),
        ('w=20&h=4', (8, 4)),  # contain: inside the box, aspect kept
        ('w=10&h=10&fit=cover', (10, 10)),
        ('w=10&h=10&fit=fill', (10, 10)),
        ('w=100&h=3&fit=fill', (100, 3)),  # fill stretches, and may enlarge
        ('w=1000', (40, 20)),  # contain and cover never enlarge
        ('w=1000&h=1000&fit=cover', (40, 20)),
    ],
)
def test_every_fit_gives_the_documented_size(client, query, size):
    image_id = store(client, encode(quadrants()))

    assert derive(client, image_id, query + '&format=png').size == size


def test_cover_crops_the_centre_and_fill_stretches(client):
    image_id = store(client, encode(quadrants(40, 20)))

    cover = derive(client, image_id, 'w=20&h=20&fit=cover&format=png')
    fill = derive(client, image_id, 'w=20&h=20&fit=fill&format=png')

    # the centred 20x20 of 40x20: the quadrants' inner halves, all four colours still there
    assert [close(c, e) for c, e in zip(colours_at_quadrants(cover), (RED, GREEN, BLUE, WHITE), strict=True)] == [
        True
    ] * 4
    assert [close(c, e) for c, e in zip(colours_at_quadrants(fill), (RED, GREEN, BLUE, WHITE), strict=True)] == [
        True
    ] * 4
    left_of_cover = cover.convert('RGB').getpixel((0, 5))
    assert close(left_of_cover, RED), 'cover keeps the middle: its left edge is inside the red quadrant'


@pytest.mark.parametrize('name', sorted(images.OUTPUT_FORMATS))
def test_every_output_format(client, name):
    image_id = store(client, encode(quadrants()))

    response = client.get(f'/images/{image_id}?w=20&format={name}')

    image = Image.open(io.BytesIO(response.body))
    assert image.format == images.OUTPUT_FORMATS[name]
    assert response.content_type == images.OUTPUT_TYPES[image.format]
    assert image.size == (20, 10)
    assert all(close(c, e, 60) for c, e in zip(colours_at_quadrants(image), (RED, GREEN, BLUE, WHITE), strict=True))


def test_without_a_format_a_resize_keeps_the_source_format(client):
    jpeg = store(client, encode(quadrants(), 'JPEG'))
    gif = store(client, encode(quadrants().convert('P'), 'GIF'))

    assert derive(client, jpeg, 'w=20').format == 'JPEG'
    assert derive(client, gif, 'w=20').format == 'PNG', 'GIF is no output format: PNG keeps every colour'


def test_quality_changes_the_bytes_and_png_takes_none(client):
    image_id = store(client, encode(Image.effect_noise((64, 64), 60).convert('RGB')))

    low = client.get(f'/images/{image_id}?format=jpeg&q=10').body
    high = client.get(f'/images/{image_id}?format=jpeg&q=95').body

    assert len(low) < len(high)
    assert client.get(f'/images/{image_id}?format=png&q=50', status=400).json['title'] == 'Invalid q'


@pytest.mark.parametrize(
    'accept, expected',
    [
        ('image/avif,image/webp,*/*', 'AVIF'),
        ('image/webp,*/*', 'WEBP'),
        ('image/png,*/*;q=0.8', 'JPEG'),
        ('image/avif;q=0,image/webp;q=0.5', 'WEBP'),
        ('image/avif;q=0.0,image/webp; q=0', 'JPEG'),
        (None, 'JPEG'),
    ],
)
def test_format_auto_follows_accept_and_says_vary(client, accept, expected):
    if expected == 'AVIF' and 'avif' not in images.OUTPUT_FORMATS:
        expected = 'WEBP'
    image_id = store(client, encode(quadrants(), 'JPEG'))
    headers = {'Accept': accept} if accept else {}

    response = client.get(f'/images/{image_id}?w=20&format=auto', headers=headers)

    assert Image.open(io.BytesIO(response.body)).format == expected
    assert response.headers['Vary'] == 'Accept'
    assert 'Vary' not in client.get(f'/images/{image_id}?w=20&format=webp').headers


def test_format_auto_without_avif_or_webp_keeps_transparency_in_png(client):
    image_id = store(client, encode(Image.new('RGBA', (8, 8), (255, 0, 0, 0))))

    assert derive(client, image_id, 'format=auto').format == 'PNG'


# -- derivatives: orientation, colour and transparency ----------------------------------

# What undoes each EXIF orientation (Pillow's exif_transpose does these).
_UNDO = {
    1: None,
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
# Their inverses, to make the raw pixels a camera would have stored (the rest undo themselves).
_INVERSE = {
    Image.Transpose.ROTATE_270: Image.Transpose.ROTATE_90,
    Image.Transpose.ROTATE_90: Image.Transpose.ROTATE_270,
}


@pytest.mark.parametrize('orientation', range(1, 9))
@pytest.mark.parametrize('source_format', ['PNG', 'JPEG'])
def test_every_exif_orientation_is_applied(client, orientation, source_format):
    upright = quadrants(40, 20)
    undo = _UNDO[orientation]
    raw = upright if undo is None else upright.transpose(_INVERSE.get(undo, undo))
    assert ImageOps.exif_transpose(_tagged(raw, orientation)).tobytes() == upright.tobytes()  # the test's own premise
    image_id = store(client, encode(raw, source_format, exif=_exif(orientation), quality=95))

    derived = derive(client, image_id, 'w=40&format=png')

    assert derived.size == (40, 20)
    assert all(close(c, e) for c, e in zip(colours_at_quadrants(derived), (RED, GREEN, BLUE, WHITE), strict=True))


def _exif(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif


def _tagged(image: Image.Image, orientation: int) -> Image.Image:
    tagged = image.copy()
    tagged.info['exif'] = _exif(orientation).tobytes()
    tagged.getexif()[0x0112] = orientation
    return tagged


def test_transparency_becomes_white_in_jpeg_and_stays_in_webp_and_png(client):
    rgba = Image.new('RGBA', (20, 20), (0, 0, 0, 0))
    rgba.paste((255, 0, 0, 255), (0, 0, 10, 20))
    palette = rgba.convert('P', palette=Image.Palette.ADAPTIVE)
    palette.info['transparency'] = palette.getpixel((15, 5))
    for source in (rgba, palette):
        image_id = store(client, encode(source))

        jpeg = derive(client, image_id, 'format=jpeg').convert('RGB')
        webp = derive(client, image_id, 'format=webp').convert('RGBA')
        png = derive(client, image_id, 'format=png').convert('RGBA')

        assert close(jpeg.getpixel((15, 10)), WHITE) and close(jpeg.getpixel((5, 10)), RED)
        assert webp.getpixel((15, 10))[3] == 0 and png.getpixel((15, 10))[3] == 0
        assert png.getpixel((5, 10)) == (255, 0, 0, 255)


def test_the_colour_profile_goes_with_the_pixels(client):
    profile = ImageCms.ImageCmsProfile(ImageCms.createProfile('sRGB')).tobytes()
    image_id = store(client, encode(quadrants(), 'JPEG', icc_profile=profile))

    for output in ('jpeg', 'png', 'webp'):
        assert derive(client, image_id, f'w=20&format={output}').info.get('icc_profile') == profile
    assert 'icc_profile' not in derive(client, store(client, encode(quadrants())), 'w=20&format=png').info


def test_sixteen_bit_grey_is_scaled_not_clipped(client):
    image_id = store(client, encode(Image.new('I;16', (8, 8), 32768)))

    grey = derive(client, image_id, 'format=png').convert('L').getpixel((4, 4))

    assert 120 <= grey <= 136, grey


def test_cmyk_jpeg_comes_out_in_its_colours(client):
    image_id = store(client, encode(Image.new('CMYK', (16, 16), (0, 255, 255, 0)), 'JPEG', quality=95))

    for name in ('jpeg', 'png', 'webp'):
        derived = derive(client, image_id, f'format={name}')
        assert derived.mode in ('RGB', 'RGBA')
        assert close(derived.convert('RGB').getpixel((8, 8)), RED), name


def test_an_animated_gif_gives_its_first_frame(client):
    frames = [Image.new('RGB', (8, 8), colour).convert('P') for colour in ('red', 'lime', 'blue')]
    image_id = store(client, encode(frames[0], 'GIF', save_all=True, append_images=frames[1:], duration=100))

    first = derive(client, image_id, 'format=png').convert('RGB')

    assert close(first.getpixel((4, 4)), RED)


# -- derivatives: limits and hostile input -----------------------------------------------


@pytest.mark.file_store
def test_an_image_over_the_pixel_limit_is_refused_without_decoding(make_client, data_dir, png):
    client = make_client()
    image_id = upload_image(client, make_png(200, 100)).json['image_id']
    strict = make_client(max_image_pixels=10_000)

    response = strict.get(f'/images/{image_id}?w=10', status=422)

    assert response.json['title'] == 'Image too large to render'
    assert strict.post('/images', make_png(200, 100), headers={'Content-Type': 'image/png'}, status=413)
    assert files_under(data_dir / 'derived') == []


@pytest.mark.file_store
def test_a_truncated_image_is_422_and_nothing_is_cached(client, data_dir):
    whole = encode(Image.effect_noise((64, 64), 50).convert('RGB'))
    image_id = store(client, whole[: len(whole) // 2])  # the header is intact: it is stored

    response = client.get(f'/images/{image_id}?w=10', status=422)

    assert response.json['title'] == 'Cannot render'
    assert files_under(data_dir / 'derived') == [] and files_under(data_dir / 'tmp') == []


@pytest.mark.file_store
def test_with_decode_verification_a_truncated_image_is_refused_at_upload(make_client, data_dir):
    whole = encode(Image.effect_noise((64, 64), 50).convert('RGB'))
    truncated = whole[: len(whole) // 2]
    header_only, decoding = make_client(), make_client(verify_images='decode')

    refused = decoding.post('/images', truncated, headers={'Content-Type': 'image/jpeg'}, status=422)
    assert refused.json['title'] == 'Image does not decode'
    assert files_under(data_dir / 'blobs') == [] and files_under(data_dir / 'tmp') == []
    accepted = decoding.post('/images', whole, headers={'Content-Type': 'image/jpeg'}, status=201)
    assert accepted.json['verified'] == 'decode'
    assert decoding.get(f'/images/{accepted.json["image_id"]}/meta').json['verified'] == 'decode'
    # by default the header is checked, and the answer says so
    stored = header_only.post('/images', truncated, headers={'Content-Type': 'image/jpeg'}, status=201)
    assert stored.json['verified'] == 'header'


def test_a_batch_with_decode_verification_refuses_only_the_part_that_does_not_decode(make_client):
    client = make_client(verify_images='decode')
    whole = encode(Image.effect_noise((32, 32), 50).convert('RGB'))
    boundary = 'b0undary'
    body = (
        b''.join(
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n\r\n'.encode()
            + data
            + b'\r\n'
            for name, data in (('good.jpg', whole), ('cut.jpg', whole[: len(whole) // 2]))
        )
        + f'--{boundary}--\r\n'.encode()
    )

    response = client.post('/images', body, headers={'Content-Type': f'multipart/form-data; boundary={boundary}'})

    assert response.status_int == 207
    assert [(entry['status'], entry['filename']) for entry in response.json] == [(201, 'good.jpg'), (422, 'cut.jpg')]


PRESETS = {'thumb': {'w': '16', 'h': '16', 'fit': 'cover', 'format': 'png'}, 'small': {'w': '30'}}


def test_a_preset_names_a_derivative_in_every_mode(make_client, png):
    for mode in ('open', 'presets', 'signed'):
        client = make_client(derivative_presets=PRESETS, derivatives=mode, signing_key='k')
        image_id = store(client, png)

        thumb = derive(client, image_id, 'preset=thumb')

        assert (thumb.format, thumb.size) == ('PNG', (16, 16)), mode
        same = client.get(f'/images/{image_id}?w=16&h=16&fit=cover&format=png', expect_errors=True)
        if mode == 'open':
            assert same.body == client.get(f'/images/{image_id}?preset=thumb').body, 'one variant, one file'
        else:
            assert same.status_int == 403, mode
        assert client.get(f'/images/{image_id}?preset=huge', status=400).json['title'] == 'Unknown preset'
        assert client.get(f'/images/{image_id}?preset=thumb&w=3', status=400).json['title'] == 'Invalid preset'


def test_only_presets_mode_refuses_parameters_and_signed_mode_takes_them_signed(make_client, png):
    presets_only = make_client(derivative_presets=PRESETS, derivatives='presets')
    image_id = store(presets_only, png)
    refused = presets_only.get(f'/images/{image_id}?w=64', status=403)
    assert refused.json['title'] == 'Only presets' and 'thumb' in refused.json['description']
    assert presets_only.get(f'/images/{image_id}').body == png, 'the original stays'

    signed_mode = make_client(derivative_presets=PRESETS, derivatives='signed', signing_key='k')
    assert signed_mode.get(f'/images/{image_id}?w=64', status=403).json['title'] == 'Invalid signature'
    url = signing.signed_path('k', f'/images/{image_id}', {'w': '12'}, expires_in=60)
    assert Image.open(io.BytesIO(signed_mode.get(url).body)).size[0] == 12
    signed_mode.get(url.replace('w=12', 'w=13'), status=403)


def test_presets_that_are_not_presets_stop_the_start():
    for bad in ('thumb', 'thumb=', 'Thumb=w:1', 'thumb=width:5', 'a b=w:1'):
        with pytest.raises(ConfigError, match='ISS_DERIVATIVE_PRESETS'):
            Settings.from_env({'ISS_DERIVATIVE_PRESETS': bad})
    presets = Settings.from_env({'ISS_DERIVATIVE_PRESETS': 'thumb=w:256,h:256,fit:cover ; small=w:512'})
    assert presets.derivative_presets == {'thumb': {'w': '256', 'h': '256', 'fit': 'cover'}, 'small': {'w': '512'}}
    with pytest.raises(ConfigError, match='ISS_DERIVATIVES'):
        Settings.from_env({'ISS_DERIVATIVES': 'closed'})


def test_an_artifact_has_no_derivatives(client):
    artifact = client.post('/artifacts?kind=text', b'plain words').json['artifact_id']

    response = client.get(f'/images/{artifact}?w=10', status=415)

    assert response.json['title'] == 'Not an image'
    assert client.get(f'/images/{artifact}').body == b'plain words', 'without parameters: the bytes'


@pytest.mark.parametrize(
    'query, title',
    [
        ('w=0', 'Invalid parameter'),
        ('w=4097', 'Invalid parameter'),
        ('h=-3', 'Invalid parameter'),
        ('w=ten', 'Invalid parameter'),
        ('q=0', 'Invalid parameter'),
        ('q=101', 'Invalid parameter'),
        ('fit=stretch', 'Invalid fit'),
        ('format=gif', 'Invalid format'),
        ('format=', 'Invalid format'),
        ('h=64&fit=cover', 'Invalid fit'),  # it answered 48x64 where cover promises exactly w x h
        ('w=64&fit=fill', 'Invalid fit'),
        ('fit=cover', 'Invalid fit'),
        ('w=64&w=65', 'Repeated parameter'),  # the last one won
        ('w=64&width=65', 'Unknown parameter'),  # ignored
        ('w=64&fromat=webp', 'Unknown parameter'),
    ],
)
def test_bad_parameters_are_400(client, png, query, title):
    image_id = store(client, png)

    assert client.get(f'/images/{image_id}?{query}', status=400).json['title'] == title


_VALUES = st.one_of(st.text(max_size=12), st.integers(-10, 10_000).map(str))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(params=st.dictionaries(st.sampled_from(['w', 'h', 'fit', 'format', 'q']), _VALUES, min_size=1))
def test_parameter_fuzzing_never_gets_a_500(client, params):
    image_id = store(client, make_png(60, 40))

    response = client.get(f'/images/{image_id}', params=params, expect_errors=True)

    assert response.status_int in (200, 400), (params, response.status, response.body[:200])
    expected_type = 'application/json' if response.status_int == 400 else 'image/'
    assert response.content_type.startswith(expected_type)


# -- the cache ---------------------------------------------------------------------------


@pytest.mark.file_store
def test_a_derivative_is_rendered_once_and_served_like_a_blob(client, data_dir, png):
    image_id = store(client, png)
    url = f'/images/{image_id}?w=50&format=webp'

    first = client.get(url)
    cached = files_under(data_dir / 'derived')
    again = client.get(url)
    head = client.head(url)
    ranged = client.get(url, headers={'Range': 'bytes=0-9'}, status=206)
    revalidated = client.get(url, headers={'If-None-Match': first.headers['ETag']}, status=304)

    assert len(cached) == 1 and cached[0].read_bytes() == first.body == again.body
    assert first.headers['ETag'] == f'"{image_id}/50x-contain-q80.webp"'
    assert first.headers['Cache-Control'] == 'public, max-age=31536000, immutable'
    assert head.headers['Content-Length'] == str(len(first.body)) and head.body == b''
    assert ranged.body == first.body[:10] and ranged.headers['Content-Range'] == f'bytes 0-9/{len(first.body)}'
    assert revalidated.body == b''
    assert client.get(f'/images/{image_id}?w=51&format=webp').headers['ETag'] != first.headers['ETag']
    assert client.get(f'/images/{image_id}').body == png, 'the original, unchanged'


def test_the_cache_evicts_the_least_recently_used(data_dir, png):
    store_ = file_store(data_dir)
    client = webtest.TestApp(iss.create_app(Settings(data_dir=str(data_dir)), store_))
    image_id = store(client, encode(Image.effect_noise((100, 100), 50).convert('RGB')))
    urls = [f'/images/{image_id}?w={w}&format=png' for w in (90, 91, 92)]
    for url in urls:
        client.get(url)
    client.get(urls[0])  # used again: now the most recent
    sizes = {p.name: disk_bytes(p.stat()) for p in files_under(data_dir / 'derived')}

    kept = sizes['90x-contain.png'] + sizes['92x-contain.png']
    removed, remaining = store_.derived.evict(int(kept / 0.9) + 1)

    assert (removed, remaining) == (1, kept)
    assert sorted(p.name for p in files_under(data_dir / 'derived')) == ['90x-contain.png', '92x-contain.png']


@pytest.mark.file_store
def test_the_cache_stays_near_its_bound_while_rendering(make_client, data_dir):
    client = make_client(derived_max_bytes=40_000)
    image_id = store(client, encode(Image.effect_noise((120, 120), 50).convert('RGB')))

    for width in range(20, 60):
        client.get(f'/images/{image_id}?w={width}&format=png')  # 1-11 kB each, 0.2 MB in all

    sizes = [disk_bytes(p.stat()) for p in files_under(data_dir / 'derived')]
    # NOTE: one worker: it evicts as soon as its last render crossed the bound.
    assert 0 < sum(sizes) <= 40_000 + max(sizes), sizes


@pytest.mark.file_store
def test_the_cache_bound_counts_the_disk_that_tiny_derivatives_take(make_client, data_dir):
    """1 MB of tiny derivatives took 10.3 MB of disk: the bound counted their sizes, not their blocks."""
    client = make_client(derived_max_bytes=40_000)
    image_id = store(client, encode(Image.effect_noise((120, 120), 50).convert('RGB')))

    for width in range(1, 41):
        client.get(f'/images/{image_id}?w={width}&h=1&fit=fill&format=png')  # ~100 bytes each, a block on disk

    on_disk = [disk_bytes(p.stat()) for p in files_under(data_dir / 'derived')]
    assert 0 < sum(on_disk) <= 40_000 + max(on_disk), on_disk


@pytest.mark.file_store
def test_delete_removes_the_derivatives_too(make_client, data_dir, png):
    client = make_client(admin_token='a')
    image_id = store(client, png)
    client.get(f'/images/{image_id}?w=10')

    client.delete(f'/images/{image_id}', headers={'Authorization': 'Bearer a'}, status=204)

    assert files_under(data_dir / 'derived') == []
    client.get(f'/images/{image_id}?w=10', status=404)
    client.get(f'/images/{image_id}?w=10', headers={'If-None-Match': '*'}, status=404)


def test_workers_rendering_the_same_derivative_at_once_make_one_file(start, tmp_path):
    server = start(ISS_WORKERS='2')
    data = encode(Image.effect_noise((1500, 1000), 50).convert('RGB'), 'JPEG')
    status, _, body = server.request('POST', '/images', data, {'Content-Type': 'image/jpeg'})
    image_id = json.loads(body)['image_id']
    results: list[tuple[int, bytes]] = []

    def fetch() -> None:
        status, _, body = server.request('GET', f'/images/{image_id}?w=300&format=webp')
        results.append((status, body))

    threads = [threading.Thread(target=fetch) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert {status for status, _ in results} == {200}
    assert len({body for _, body in results}) == 1
    assert Image.open(io.BytesIO(results[0][1])).size == (300, 200)
    assert len(files_under(server.data_dir / 'derived')) == 1
    assert files_under(server.data_dir / 'tmp') == []


@pytest.mark.file_store
def test_gc_removes_derivatives_of_no_blob_and_keeps_the_cache_bounded(client, data_dir):
    image_id = store(client, encode(Image.effect_noise((80, 80), 50).convert('RGB')))
    kept = store(client, make_png(70, 70))
    for width in (10, 20, 30):
        client.get(f'/images/{image_id}?w={width}&format=png')
    client.get(f'/images/{kept}?w=10')
    blob_path(data_dir, image_id).unlink()  # as a crash in the middle of a delete could leave it

    assert cli_json(data_dir, 'gc', '--dry-run')['removed']['derived_files'] == 3
    assert cli_json(data_dir, 'gc')['removed']['derived_files'] == 3

    assert [p.parent.name for p in files_under(data_dir / 'derived')] == [kept[7:]]


# -- issue 27: fingerprints, near-duplicate search, phone formats --------------------------------------

# NOTE: bench/near_duplicates.py's pictures: distinct, natural-ish, deterministic; and its altered copies.
from bench.near_duplicates import alterations, picture  # noqa: E402

ADMIN = 'images-admin'


def phone_photo() -> Image.Image:
    """A 64x48 picture whose left half is red: turned by an orientation, the red moves."""
    image = Image.new('RGB', (64, 48), 'blue')
    image.paste('red', (0, 0, 32, 48))
    return image


def jxl_header_declaring(width: int, height: int) -> bytes:
    """A JPEG XL codestream's signature and SizeHeader declaring ``width`` x ``height``, then no image."""
    bits = [0] + [1, 1] + [((height - 1) >> i) & 1 for i in range(30)] + [0, 0, 0]  # not small; 30-bit height
    bits += [1, 1] + [((width - 1) >> i) & 1 for i in range(30)]  # ratio 0: the width follows, 30 bits
    bits += [0] * (-len(bits) % 8)
    header = bytes(sum(bit << i for i, bit in enumerate(bits[at : at + 8])) for at in range(0, len(bits), 8))
    return b'\xff\x0a' + header + b'\x00' * 64


def test_an_upload_answers_and_stores_its_perceptual_hash_and_placeholders(client):
    answer = client.post('/images', encode(picture(1)), content_type='image/png').json

    assert len(answer['phash']) == 16 and int(answer['phash'], 16) >= 0
    assert answer['blurhash'].startswith('L') and len(answer['blurhash']) == 28  # 4x3 components
    assert 20 <= len(answer['thumbhash']) <= 48
    stored = client.get(f'/images/{answer["image_id"]}/meta').json
    listed = client.get('/images').json['items'][0]
    for key in images.FINGERPRINT_KEYS:
        assert stored[key] == listed[key] == answer[key], key


def test_similar_finds_the_altered_copies_nearest_first_and_no_other_picture(make_client):
    client = make_client(admin_token=ADMIN)
    original = store(client, encode(picture(0)))
    others = {store(client, encode(picture(seed))) for seed in range(1, 8)}
    copies = {
        name: store(client, encode(altered.convert('RGB'), 'JPEG', quality=90))
        for name, altered in alterations(picture(0), 0).items()
    }

    found = client.get(f'/images/{original}/similar').json

    assert found['max_distance'] == 10
    assert {item['id'] for item in found['items']} == set(copies.values())
    distances = [item['distance'] for item in found['items']]
    assert distances == sorted(distances) and max(distances) <= 10
    assert all(item['kind'] == 'image' and 'phash' in item for item in found['items'])
    assert not others & {item['id'] for item in found['items']}
    # Pages of two walk the same answer, in the same order.
    paged, path = [], f'/images/{original}/similar?limit=2'
    while path:
        page = client.get(path).json
        paged += page['items']
        path = page['next']
    assert [item['id'] for item in paged] == [item['id'] for item in found['items']]
    # A deleted copy is found no more (the index's triggers follow the row).
    client.delete(f'/images/{copies["webp"]}', headers={'Authorization': f'Bearer {ADMIN}'})
    assert copies['webp'] not in {item['id'] for item in client.get(f'/images/{original}/similar').json['items']}
    # max_distance 0: only exact hashes.
    exact = client.get(f'/images/{original}/similar?max_distance=0').json['items']
    assert all(item['distance'] == 0 for item in exact)


def test_similar_refuses_what_it_cannot_answer(client):
    image_id = store(client, encode(picture(2)))
    artifact = client.post('/artifacts?kind=x', b'not an image').json['artifact_id']

    assert client.get(f'/images/{image_id}/similar?max_distance=17', status=400).json['title'] == 'Invalid parameter'
    assert client.get(f'/images/{image_id}/similar?limit=0', status=400)
    assert client.get(f'/images/{image_id}/similar?cursor=nonsense', status=400).json['title'] == 'Invalid cursor'
    assert client.get(f'/images/{artifact}/similar', status=415).json['title'] == 'Not an image'
    assert client.get('/images/sha256:' + '0' * 64 + '/similar', status=404)


def test_post_similar_answers_for_an_image_it_does_not_store(client):
    original = store(client, encode(picture(3)))
    before = client.get('/stats').json['count']
    smaller = encode(picture(3).resize((160, 120)), 'WEBP', quality=60)

    found = client.post('/images/similar', smaller, content_type='image/webp').json
    as_form = client.post('/images/similar', upload_files=[('file', 'x.webp', smaller, 'image/webp')]).json

    assert [item['id'] for item in found['items']] == [original] == [item['id'] for item in as_form['items']]
    assert found['items'][0]['distance'] <= 4 and found['thumbhash'] and found['blurhash']
    assert client.get('/stats').json['count'] == before, 'nothing was stored'
    refused = client.post('/images/similar', b'plain text', content_type='image/png', status=415).json
    assert refused['title'] == 'Not an image'
    truncated = encode(picture(3), 'JPEG')[:2000]
    assert client.post('/images/similar', truncated, content_type='image/jpeg', status=422).json['status'] == 422


def test_post_similar_checks_its_query_before_it_reads_the_body(client):
    """A bad max_distance or limit was refused only after the body was decoded (here: a 415 for the body)."""
    for query in ('max_distance=17', 'limit=0', 'limit=1&limit=5', 'cursor=nonsense'):
        refused = client.post(f'/images/similar?{query}', b'plain text', content_type='image/png', status=400).json

        assert refused['title'] in ('Invalid parameter', 'Repeated parameter', 'Invalid cursor'), (query, refused)


@pytest.mark.parametrize('route', ['get', 'post'])
@pytest.mark.parametrize('query', ['limit=1&limit=5', 'max_distance=3&max_distance=10', 'cursor=a&cursor=b'])
def test_similar_refuses_a_parameter_given_twice(client, route, query):
    """?limit=1&limit=5 answered a page of 5: the last one won, silently."""
    data = encode(picture(2))
    image_id = store(client, data)

    if route == 'get':
        refused = client.get(f'/images/{image_id}/similar?{query}', status=400).json
    else:
        refused = client.post(f'/images/similar?{query}', data, content_type='image/png', status=400).json

    name = query.partition('=')[0]
    assert (refused['title'], refused['detail']) == ('Repeated parameter', f'Give {name} once.')


@pytest.mark.parametrize(
    'query, says',
    [
        ('limit=-1', 'at least 1 and at most 100'),
        ('limit=1000000000000000', 'at least 1 and at most 100'),
        ('max_distance=-3', 'at least 0 and at most 16'),
        ('max_distance=17', 'at least 0 and at most 16'),
        ('limit=ten', 'must be an integer'),
        ('limit=1.5', 'must be an integer'),
    ],
)
def test_similar_says_the_range_of_an_integer_out_of_it(client, query, says):
    """-1 and 10**15 were "not an integer"."""
    image_id = store(client, encode(picture(2)))

    refused = client.get(f'/images/{image_id}/similar?{query}', status=400).json

    assert refused['title'] == 'Invalid parameter' and says in refused['detail'], refused


@pytest.mark.file_store
def test_older_images_get_their_fingerprints_from_backfill_or_when_asked(data_dir, client):
    seeds = [write_seed_image(data_dir, encode(picture(seed))) for seed in (4, 5)]
    copy = store(client, encode(picture(4).resize((200, 150))))
    cli_json(data_dir, 'reindex')

    # Asked about, a seed image gets its hash at once (its meta completed, its index row following).
    assert [item['id'] for item in client.get(f'/images/{seeds[0]}/similar').json['items']] == [copy]
    result = cli_json(data_dir, 'backfill')

    assert (result['images'], result['completed'], result['failed']) == (3, 1, [])
    assert not meta.lacks_fingerprints(client.get(f'/images/{seeds[1]}/meta').json)
    assert cli_json(data_dir, 'backfill')['completed'] == 0
    assert [item['id'] for item in client.get(f'/images/{copy}/similar').json['items']] == [seeds[0]]
    assert cli_json(data_dir, 'fsck')['clean']


# -- phone formats ----------------------------------------------------------------------------------


def test_a_heic_from_a_phone_is_stored_described_and_rendered_upright(client):
    exif = Image.Exif()
    exif[0x0112] = 6  # NOTE: turned a quarter clockwise, as a phone held upright writes it
    exif[0x010F] = 'Apple'
    exif.get_ifd(0x8769)[0x9003] = '2026:12:01 10:00:00'
    exif[0x8825] = {1: 'N', 2: (52.0, 31.0, 12.0), 3: 'E', 4: (13.0, 24.0, 1.5)}  # GPS
    heic = encode(phone_photo(), 'HEIF', exif=exif.tobytes(), quality=90)

    answer = client.post('/images', heic, content_type='image/heic').json
    stored = client.get(f'/images/{answer["image_id"]}/meta').json
    thumbnail = derive(client, answer['image_id'], 'w=24&format=webp')

    assert (stored['format'], stored['mime']) == ('HEIF', 'image/heif')
    # NOTE: libheif turns the pixels itself and reports them upright (orientation 1): no second turn.
    assert (stored['width'], stored['height'], stored['oriented_width'], stored['oriented_height']) == (48, 64, 48, 64)
    assert (stored['camera_make'], stored['captured_at']) == ('Apple', '2026-12-01T10:00:00')
    assert thumbnail.format == 'WEBP' and thumbnail.size == (24, 32)
    assert close(thumbnail.convert('RGB').getpixel((12, 4)), RED, 60), 'the red half is on top, upright'
    assert answer['phash'] and answer['thumbhash']


@pytest.mark.parametrize('image_format', ['HEIF', 'JXL', 'AVIF'])
def test_each_phone_format_is_an_image_with_derivatives_and_the_same_hash_as_its_png(client, image_format):
    png = client.post('/images', encode(picture(6)), content_type='image/png').json
    answer = client.post('/images', encode(picture(6), image_format, quality=90), content_type='image/x').json

    assert (answer['width'], answer['height']) == (320, 240)
    assert answer['mime'] == {'HEIF': 'image/heif', 'JXL': 'image/jxl', 'AVIF': 'image/avif'}[image_format]
    assert bin(int(answer['phash'], 16) ^ int(png['phash'], 16)).count('1') <= 4
    assert derive(client, answer['image_id'], 'w=64&format=jpeg').size == (64, 48)
    assert png['image_id'] in {item['id'] for item in client.get(f'/images/{answer["image_id"]}/similar').json['items']}


def test_jxl_is_an_output_and_auto_prefers_it_when_accepted(client):
    image_id = store(client, encode(quadrants()))

    jxl = client.get(f'/images/{image_id}?w=20&format=jxl')
    auto = client.get(f'/images/{image_id}?w=20&format=auto', headers={'Accept': 'image/jxl,image/avif,image/webp'})
    refused = client.get(f'/images/{image_id}?w=20&format=auto', headers={'Accept': 'image/jxl;q=0,image/webp'})

    assert jxl.content_type == auto.content_type == 'image/jxl'
    assert Image.open(io.BytesIO(jxl.body)).size == (20, 10)
    assert auto.headers['Vary'] == 'Accept'
    assert refused.content_type == 'image/webp'


def test_a_jxl_derivative_carries_no_exif_and_q100_is_lossless(client):
    """JXL thumbnails kept the photo's EXIF: its GPS, and an orientation the pixels already had."""
    exif = Image.Exif()
    exif[0x010F], exif[0x0112] = 'Canon', 6  # make, orientation
    exif.get_ifd(0x8825)[0x0001] = 'N'  # GPSLatitudeRef
    image_id = store(client, encode(Image.new('RGB', (64, 48), 'grey'), 'JPEG', exif=exif))

    thumbnail = Image.open(io.BytesIO(client.get(f'/images/{image_id}?w=24&format=jxl').body))
    lossless = client.get(f'/images/{image_id}?w=24&format=jxl&q=100')

    assert thumbnail.size == (24, 32)  # turned upright once
    assert not thumbnail.getexif()
    assert lossless.content_type == 'image/jxl'
    assert Image.open(io.BytesIO(lossless.body)).size == (24, 32)


def test_a_jxl_bomb_is_refused_from_its_header_before_any_decode(client):
    bomb = jxl_header_declaring(100_000, 100_000)

    refused = client.post('/images', bomb, content_type='image/jxl', status=413).json

    assert refused['title'] == 'Image too large' and '10000000000 pixels' in refused['detail']


_JXL_BOMB = """
import sys
sys.path.insert(0, {here!r})
from iss_server import formats
from PIL import Image
formats.register()
# NOTE: lossless at effort 1: 11 KB; libjxl decodes it through 32-bit planes (1.2 GB).
for blue in range(3):
    flat = Image.new('RGB', (9000, 9000), (40, 120, 200 + blue))
    flat.save(f'{path}/flat-9000-{{blue}}.jxl', 'JXL', lossless=True, effort=1)
"""

_IDENTIFY = """
import sys, time
sys.path.insert(0, {here!r})
from iss_server import images
started = time.process_time()
info = images.identify(open({path!r}, 'rb'))
peak = [line for line in open('/proc/self/status') if line.startswith('VmHWM')][0].split()[1]
print(info.format, info.width, info.height, info.fields['mode'], round(time.process_time() - started, 2), peak)
"""


@pytest.fixture(scope='session')
def jxl_bombs(tmp_path_factory) -> list[pathlib.Path]:
    """Three files of 11 KB of JPEG XL declaring 9000x9000 pixels (under ISS_MAX_IMAGE_PIXELS): 1.2 GB to decode."""
    path = tmp_path_factory.mktemp('jxl')
    script = _JXL_BOMB.format(here=str(HERE), path=str(path))
    subprocess.run([sys.executable, '-c', script], check=True, timeout=120)  # NOTE: its 800 MB not in pytest's
    return sorted(path.iterdir())


def test_a_jxl_is_identified_from_its_headers_without_decoding_its_pixels(jxl_bombs):
    """pillow-jxl-plugin decoded in Image.open: identifying these 11 KB took 1.2 GB and 2.6 s of CPU."""
    script = _IDENTIFY.format(here=str(HERE), path=str(jxl_bombs[0]))
    done = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, timeout=120, check=True)
    image_format, width, height, mode, cpu_seconds, peak_kib = done.stdout.split()

    assert (image_format, width, height, mode) == ('JXL', '9000', '9000', 'RGB')
    assert float(cpu_seconds) < 0.5 and int(peak_kib) < 200 * 1024, done.stdout


@pytest.mark.slow
def test_concurrent_uploads_of_a_jxl_bomb_decode_one_at_a_time_in_the_render_gate(start, jxl_bombs):
    """Each upload decoded it outside the gate (identify, then the fingerprints): three at once took 3 x 1.2 GB."""
    server = start(ISS_WORKERS='1', ISS_THREADS='4')
    worker = server.processes()[1]
    answers: list[tuple[int, bytes]] = []

    def upload(path: pathlib.Path) -> None:
        status, _, body = server.request('POST', '/images', path.read_bytes(), {'Content-Type': 'image/jxl'})
        answers.append((status, body))

    uploads = [threading.Thread(target=upload, args=(path,)) for path in jxl_bombs]
    for thread in uploads:
        thread.start()
    for thread in uploads:
        thread.join()

    assert [status for status, _ in answers] == [201] * 3, answers
    assert json.loads(answers[0][1])['phash']
    peak_mib = int(re.search(r'VmHWM:\s+(\d+) kB', pathlib.Path(f'/proc/{worker}/status').read_text()).group(1)) / 1024
    assert peak_mib < 1800, f'the worker peaked at {peak_mib:.0f} MiB: more than one 1.2 GB decode at once'


@pytest.mark.parametrize('image_format', ['HEIF', 'JXL', 'AVIF'])
def test_the_pixel_limit_holds_for_each_phone_format(make_client, image_format):
    client = make_client(max_image_pixels=1000)
    data = encode(phone_photo(), image_format)

    assert client.post('/images', data, content_type='image/x', status=413).json['title'] == 'Image too large'


@pytest.mark.parametrize('image_format', ['HEIF', 'JXL', 'AVIF'])
def test_a_truncated_phone_image_is_a_clear_json_refusal(make_client, image_format):
    client = make_client(verify_images='decode')
    data = encode(picture(7), image_format, quality=90)

    refused = client.post('/images', data[: len(data) // 2], content_type='image/x', expect_errors=True)

    assert refused.status_int in (415, 422), refused
    assert refused.json['title'] in ('Not an image', 'Image does not decode')


@pytest.mark.slow
def test_the_client_finds_groups_of_near_duplicates_locally_and_in_the_store(server, tmp_path, capsys):
    from iss_client.command import main

    stored = json.loads(server.request('POST', '/images', encode(picture(10)), {'Content-Type': 'image/png'})[2])
    twin = json.loads(
        server.request('POST', '/images', encode(picture(10).resize((240, 180))), {'Content-Type': 'image/png'})[2]
    )
    server.request('POST', '/images', encode(picture(11)), {'Content-Type': 'image/png'})
    folder = tmp_path / 'dataset'
    folder.mkdir()
    (folder / 'a.jpg').write_bytes(encode(picture(12), 'JPEG', quality=90))
    (folder / 'a-again.webp').write_bytes(encode(picture(12).resize((160, 120)), 'WEBP'))
    (folder / 'like-stored.jpg').write_bytes(encode(picture(10), 'JPEG', quality=40))
    (folder / 'alone.png').write_bytes(encode(picture(13)))
    (folder / 'notes.txt').write_text('not an image')

    assert main(['--url', server.url, '--json', 'dupes', str(folder)]) == 0
    found = [json.loads(line) for line in capsys.readouterr().out.splitlines()]

    groups = sorted(sorted(member.get('path') or member['id'] for member in group['members']) for group in found)
    assert groups == [
        sorted([str(folder / 'a-again.webp'), str(folder / 'a.jpg')]),
        sorted([str(folder / 'like-stored.jpg'), stored['image_id'], twin['image_id']]),
    ]
    assert all(group['members'][0]['distance'] == 0 for group in found)

    assert main(['--url', server.url, 'dupes', '--store']) == 0
    table = capsys.readouterr().out
    assert table.startswith('group 1: 2 images') and stored['image_id'] in table and twin['image_id'] in table


def test_a_decoder_panic_in_rust_is_the_files_refusal_and_an_interrupt_is_not():
    class PanicException(BaseException):
        """What pyo3 raises when a Rust decoder (pillow-jxl-plugin's) panics: no Exception."""

    panic = pytest.raises(images.NotAnImage, match='PanicException: index out of bounds')
    with panic, images._boundary(images.NotAnImage, 'identifying'):
        raise PanicException('index out of bounds')
    with pytest.raises(KeyboardInterrupt), images._boundary(images.NotAnImage, 'identifying'):
        raise KeyboardInterrupt


def test_a_jxl_padded_past_the_header_budget_is_refused_not_read_whole(client):
    """pillow-jxl-plugin reads the whole file at load: a JXL padded to 1.5 GB took a worker to 1.5 GB."""
    padded = encode(picture(5), 'JXL') + bytes(images.HEADER_BUDGET.bytes + 1)

    refused = client.post('/images', padded, content_type='image/jxl', status=413).json

    assert 'identifying it takes more than' in refused['detail']
    assert client.get('/stats').json['count'] == 0


def with_ispe(avif: bytes, width: int, height: int) -> bytes:
    """The AVIF with every ispe (and a sequence's track and sample entry sizes) declaring width x height."""
    patched = bytearray(avif)
    at = patched.find(b'ispe')
    while at > 0:
        patched[at + 8 : at + 16] = width.to_bytes(4, 'big') + height.to_bytes(4, 'big')
        at = patched.find(b'ispe', at + 4)
    if (tkhd := patched.find(b'tkhd')) > 0:
        end = tkhd - 4 + int.from_bytes(patched[tkhd - 4 : tkhd], 'big')
        patched[end - 8 : end] = (width << 16).to_bytes(4, 'big') + (height << 16).to_bytes(4, 'big')
        entry = patched.find(b'av01', patched.find(b'stsd'))
        patched[entry + 28 : entry + 32] = width.to_bytes(2, 'big') + height.to_bytes(2, 'big')
    return bytes(patched)


def flat_avif(size: int = 256, mode: str = 'RGB', frames: int = 1) -> bytes:
    colours = [(40, 120, 200, 100), (200, 120, 40, 100)][:frames]
    images_ = [Image.new(mode, (size, size), colour[: len(mode)]) for colour in colours]
    return encode(images_[0], 'AVIF', speed=10, save_all=frames > 1, append_images=images_[1:])


@pytest.mark.parametrize(
    ('make', 'media_type', 'named'),
    [
        (lambda: flat_avif(256), 'image/avif', 'AV1 item'),
        (lambda: flat_avif(256, frames=2), 'image/avif', 'AV1 item'),
        (lambda: flat_heic(256), 'image/heic', 'HEVC item 1'),
    ],
    ids=['avif-image', 'avif-sequence', 'heic'],
)
def test_an_image_coded_larger_than_its_ispe_is_refused_before_any_decode(client, make, media_type, named):
    """libavif decodes the frame the AV1 sequence header says, then scales it to the ispe: 3.5 KB declaring
    100 x 100 decoded 16000 x 16000 (548 MiB) and passed ISS_MAX_IMAGE_PIXELS; libheif refuses such a picture
    after its decode, and the HEIC was stored as 16 x 16 with no fingerprints, every derivative 422 (issue 27)."""
    lying = with_ispe(make(), 16, 16)
    assert Image.open(io.BytesIO(lying)).size == (16, 16), 'Pillow believes the ispe'

    refused = client.post('/images', lying, content_type=media_type, status=413).json

    assert refused['title'] == 'Image too large'
    assert named in refused['detail'] and 'declares 16x16 pixels but is coded at 256x256' in refused['detail'], refused
    assert client.get('/stats').json['count'] == 0


def test_an_avif_without_a_sequence_header_is_refused_as_not_an_image(client):
    avif = flat_avif(64)
    item = avif.index(b'mdat') + 4  # NOTE: libavif writes one item's data at the start of its mdat
    assert avif[item : item + 3] == b'\x12\x00\x0a', 'a temporal delimiter OBU, then the sequence header'
    padding = avif[: item + 2] + b'\x7a' + avif[item + 3 :]  # the same OBU, as padding (type 15)

    refused = client.post('/images', padding, content_type='image/avif', expect_errors=True)

    assert refused.status_int == 415 and refused.json['title'] == 'Not an image'
    assert client.get('/stats').json['count'] == 0


def test_an_avif_whose_sequence_header_is_no_av1_is_refused_as_not_an_image(client):
    """Its header of 0xFF bytes read as a reduced one of 65536 x 65536: refused as too large (issue 27's trial)."""
    avif = flat_avif(64)
    item = avif.index(b'mdat') + 4
    assert avif[item + 2] == 0x0A, 'the sequence header OBU, with its size'
    size = avif[item + 3]
    broken = avif[: item + 4] + b'\xff' * size + avif[item + 4 + size :]

    refused = client.post('/images', broken, content_type='image/avif', expect_errors=True)

    assert (refused.status_int, refused.json['title']) == (415, 'Not an image'), refused.json
    assert client.get('/stats').json['count'] == 0


@pytest.mark.parametrize(('mode', 'frames'), [('RGB', 1), ('RGBA', 1), ('RGB', 2)], ids=['plain', 'alpha', 'sequence'])
def test_an_honest_avif_is_stored_and_rendered(client, mode, frames):
    stored = client.post('/images', flat_avif(64, mode, frames), content_type='image/avif').json

    recorded = client.get(f'/images/{stored["image_id"]}/meta').json

    assert (recorded['width'], recorded['height'], recorded['frames']) == (64, 64, frames)
    assert recorded['phash']
    assert derive(client, stored['image_id'], 'w=16&format=png').size == (16, 16)


@pytest.mark.parametrize(('override', 'coded'), [(0, (2000, 1000)), (1, (2048, 1024))], ids=['kept', 'overridden'])
def test_an_av1_first_frame_that_may_override_its_size_counts_as_the_largest_its_bits_code(override, coded):
    """dav1d decodes a frame_size_override_flag's size (in frame_width_bits) without holding it to max_frame_width."""

    def bits(*fields: tuple[int, int]) -> bytes:
        text = ''.join(format(value, f'0{count}b') for value, count in fields)
        text += '0' * (-len(text) % 8)
        return int(text, 2).to_bytes(len(text) // 8, 'big')

    # NOTE: a full sequence header: no timing info, one operating point, 11 x 10 frame size bits, 2000 x 1000
    sequence = bits((0, 5), (0, 2), (0, 5), (0, 12), (0, 5), (10, 4), (9, 4), (1999, 11), (999, 10), (0, 9), (3, 2))
    frame = bits((0, 1), (0, 2), (1, 1), (0, 1), (0, 1), (override, 1))  # a shown key frame, screen tools off
    data = b'\x0a' + bytes([len(sequence)]) + sequence + b'\x1a' + bytes([len(frame)]) + frame

    assert formats._av1_coded_size(data) == coded


def flat_heic(size: int = 256, mode: str = 'RGB', **options) -> bytes:
    # PERF: x265 at quality 50 encodes a flat 256 x 256 in about 0.1 s.
    return encode(Image.new(mode, (size, size), (40, 120, 200, 100)[: len(mode)]), 'HEIF', quality=50, **options)


def with_sps_destroyed(heic: bytes) -> bytes:
    """The HEIC with its hvcC's SPS turned into a prefix SEI (NAL unit type 39): no SPS anywhere."""
    at = heic.index(b'\x42\x01', heic.index(b'hvcC'))  # NOTE: an SPS's NAL unit header: type 33, layer 0
    assert heic[at - 5] & 0x3F == 33, 'the hvcC array of SPSs, then its count and the NAL unit length'
    return heic[:at] + b'\x4e' + heic[at + 1 :]


def test_a_heic_coded_over_the_pixel_limit_is_refused_whatever_its_ispe_says(make_client):
    """An outside trial stored a 1200 x 900 photo declaring 100 x 100 on a store of ISS_MAX_IMAGE_PIXELS=1000000."""
    client = make_client(max_image_pixels=100 * 100)
    lying = with_ispe(flat_heic(256), 64, 64)

    refused = client.post('/images', lying, content_type='image/heic', status=413).json

    assert refused['title'] == 'Image too large'
    assert client.get('/stats').json['count'] == 0


def test_a_heic_without_a_sequence_parameter_set_is_refused_as_not_an_image(client):
    refused = client.post('/images', with_sps_destroyed(flat_heic(64)), content_type='image/heic', expect_errors=True)

    assert refused.status_int == 415 and refused.json['title'] == 'Not an image'
    assert client.get('/stats').json['count'] == 0


def ten_bit_heic(width: int, height: int) -> bytes:
    import pillow_heif

    samples = (1000).to_bytes(2, 'little') * (width * height * 3)
    buffer = io.BytesIO()
    pillow_heif.from_bytes('RGB;16', (width, height), samples).save(buffer, quality=50)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ('heic', 'depth'), [(lambda: flat_heic(64), 8), (lambda: ten_bit_heic(40, 24), 10)], ids=['8', '10']
)
def test_a_heic_records_the_bit_depth_it_is_coded_at(client, heic, depth):
    """pillow-heif decodes a 10-bit HEIC (a phone's HDR photo) to 8-bit RGB: its meta said 8 (issue 27's trial)."""
    stored = client.post('/images', heic(), content_type='image/heic').json

    assert client.get(f'/images/{stored["image_id"]}/meta').json['bit_depth'] == depth


def png_coded_at(bits: int, colour_type: int, width: int = 8, height: int = 4) -> bytes:
    """A PNG of ``bits`` a sample, written by hand (Pillow writes no 16-bit colour PNG): grey or RGB(A) noise."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, 'big') + kind + data + zlib.crc32(kind + data).to_bytes(4, 'big')

    samples = {0: 1, 2: 3, 4: 2, 6: 4}[colour_type]
    row = (width * samples * bits + 7) // 8
    pixels = b''.join(b'\x00' + bytes(range(row)) for _ in range(height))
    header = width.to_bytes(4, 'big') + height.to_bytes(4, 'big') + bytes([bits, colour_type, 0, 0, 0])
    return b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', header) + chunk(b'IDAT', zlib.compress(pixels)) + chunk(b'IEND', b'')


@pytest.mark.parametrize(
    ('image', 'depth'),
    [
        (lambda: png_coded_at(16, 2), 16),  # NOTE: Pillow decodes it to RGB, 8 bits a sample
        (lambda: png_coded_at(16, 6), 16),
        (lambda: png_coded_at(16, 4), 16),  # grey and alpha, decoded to RGBA
        (lambda: png_coded_at(2, 0), 2),  # decoded to L
        (lambda: png_coded_at(8, 2), 8),
    ],
    ids=['png-rgb16', 'png-rgba16', 'png-la16', 'png-grey2', 'png-rgb8'],
)
def test_an_image_records_the_bit_depth_its_file_holds(client, image, depth):
    """A 16-bit colour PNG said 8 (the mode Pillow decodes it to), as a 10-bit HEIC did (issue 27's trial)."""
    stored = client.post('/images', image(), content_type='image/png').json

    assert client.get(f'/images/{stored["image_id"]}/meta').json['bit_depth'] == depth


def two_sub_layer_heic() -> bytes:
    """A 130 x 66 HEIC (coded 136 x 72) whose SPS has sps_max_sub_layers_minus1 = 1: profile_tier_level's fillers."""
    heic = encode(Image.new('RGB', (130, 66), 'teal'), 'HEIF', quality=50, enc_params={'x265:temporal-layers': '2'})
    sps = heic.index(b'\x42\x01', heic.index(b'hvcC'))
    assert (heic[sps + 2] >> 1) & 7 == 1, 'x265 wrote two temporal sub-layers'
    return heic


@pytest.mark.parametrize(
    ('heic', 'size'),
    [
        (lambda: flat_heic(64), (64, 64)),
        (lambda: flat_heic(64, 'RGBA', thumbnails=[16]), (64, 64)),  # NOTE: an alpha item and a thumbnail item
        (lambda: encode(Image.new('RGB', (130, 66), 'teal'), 'HEIF', quality=50), (130, 66)),  # coded 136 x 72
        (lambda: ten_bit_heic(40, 24), (40, 24)),
        (lambda: two_sub_layer_heic(), (130, 66)),
    ],
    ids=['plain', 'alpha-and-thumbnail', 'cropped', '10-bit', 'sub-layers'],
)
def test_an_honest_heic_is_stored_and_rendered(client, heic, size):
    stored = client.post('/images', heic(), content_type='image/heic').json

    recorded = client.get(f'/images/{stored["image_id"]}/meta').json

    assert (recorded['format'], recorded['width'], recorded['height']) == ('HEIF', *size)
    assert recorded['phash']
    assert derive(client, stored['image_id'], 'w=16&format=png').width == 16


def test_an_hevc_sps_with_sub_layers_and_a_conformance_window_gives_its_coded_and_shown_sizes():
    """profile_tier_level's size depends on sps_max_sub_layers_minus1 and each sub-layer's flags."""

    def ue(value: int) -> str:
        code = format(value + 1, 'b')
        return '0' * (len(code) - 1) + code

    # NOTE: 2 sub-layers over the first (max_sub_layers_minus1 = 2): the first has its profile, not its level;
    # the second its level only. 4:2:0, 8000 x 6000 coded, a window of 2 + 4 chroma samples across, 3 down.
    text = format(0, '04b') + format(2, '03b') + '1' + '0' * 96  # vps id, sub-layers, nesting, general profile
    text += '10' + '01' + '00' * 6 + '0' * 88 + '0' * 8  # the flags, the fillers, a profile, a level
    text += ue(0) + ue(1) + ue(8000) + ue(6000) + '1' + ue(2) + ue(4) + ue(0) + ue(3) + '1'
    text += '0' * (-len(text) % 8)
    payload = int(text, 2).to_bytes(len(text) // 8, 'big')
    escaped = payload.replace(b'\x00\x00', b'\x00\x00\x03')  # NOTE: the profile's zeros, as an encoder escapes them
    assert escaped != payload

    assert formats._sps_size(b'\x42\x01' + escaped) == ((8000, 6000), (8000 - 2 * 6, 6000 - 2 * 3))
    coded = formats.coded_images(io.BytesIO(two_sub_layer_heic()))
    assert [(image.declared, image.coded, image.shown) for image in coded] == [((130, 66), (136, 72), (130, 66))]


@pytest.mark.parametrize(('width', 'height', 'window'), [(0, 128, 0), (64, 77, 0), (64, 8, 4)])
def test_an_hevc_sps_of_no_size_a_conforming_stream_has_is_no_hevc(width, height, window):
    """A mutated SPS coding 0 x 129 (or 64 x 77) was refused as too large (413), not as no image (issue 27's trial).
    A size is whole minimum coding blocks (8 x 8 at least); a conformance window may not leave nothing."""

    def ue(value: int) -> str:
        code = format(value + 1, 'b')
        return '0' * (len(code) - 1) + code

    text = format(0, '04b') + format(0, '03b') + '1' + '0' * 96 + ue(0) + ue(1) + ue(width) + ue(height)
    text += ('1' + ue(0) + ue(0) + ue(0) + ue(window)) if window else '0'
    text += '1' + '0' * (-(len(text) + 1) % 8)
    payload = int(text, 2).to_bytes(len(text) // 8, 'big').replace(b'\x00\x00', b'\x00\x00\x03')

    with pytest.raises(ValueError, match='not a multiple of 8 x 8|leaves nothing'):
        formats._sps_size(b'\x42\x01' + payload)


def box(kind: bytes, *content: bytes, version: int | None = None) -> bytes:
    body = (b'' if version is None else version.to_bytes(4, 'big')) + b''.join(content)
    return (8 + len(body)).to_bytes(4, 'big') + kind + body


def grid_heic(colours: tuple[str, ...], tile_ispe: int = 64) -> bytes:
    """A HEIC as a phone writes it: its primary a 2 x 2 ``grid`` of hvc1 tiles (``dimg``), each with its ispe and hvcC.

    NOTE: pillow_heif writes no grid: the tiles are its 64 x 64 HEICs, their hvcC and data put in a
    meta of our own (ISO/IEC 23008-12 6.6.2.3: the grid's rows, columns and size in an idat).
    """
    tiles = []
    for colour in dict.fromkeys(colours):
        tile = encode(Image.new('RGB', (64, 64), colour), 'HEIF', quality=50)
        hvcc = tile.index(b'hvcC') - 4
        mdat = tile.index(b'mdat') - 4
        tiles.append((colour, tile[hvcc : hvcc + int.from_bytes(tile[hvcc : hvcc + 4], 'big')], tile[mdat + 8 :]))
    index = {colour: number for number, (colour, _, _) in enumerate(tiles)}
    # NOTE: properties: each tile's hvcC (1, 2...), the tiles' ispe, the grid's ispe
    ipco = box(
        b'ipco',
        *(hvcc for _, hvcc, _ in tiles),
        *(box(b'ispe', size.to_bytes(4, 'big') * 2, version=0) for size in (tile_ispe, 128)),
    )
    tile_ispe_index, grid_ispe_index = len(tiles) + 1, len(tiles) + 2
    associations = [(1).to_bytes(2, 'big') + b'\x01' + bytes([grid_ispe_index])]
    associations += [
        (item).to_bytes(2, 'big') + b'\x02' + bytes([0x80 | (index[colour] + 1), tile_ispe_index])
        for item, colour in enumerate(colours, start=2)
    ]
    ipma = box(b'ipma', len(associations).to_bytes(4, 'big'), *associations, version=0)
    grid = bytes([0, 0, 1, 1]) + (128).to_bytes(2, 'big') * 2  # version, flags, rows - 1, columns - 1, size

    def meta(mdat_start: int) -> bytes:
        offsets, at = {}, mdat_start
        for colour, _, data in tiles:
            offsets[colour] = (at, len(data))
            at += len(data)
        locations = [
            (1).to_bytes(2, 'big') + b'\x00\x01\x00\x00\x00\x01' + (0).to_bytes(4, 'big') + (8).to_bytes(4, 'big')
        ]
        locations += [
            item.to_bytes(2, 'big')
            + b'\x00\x00\x00\x00\x00\x01'
            + offsets[colour][0].to_bytes(4, 'big')
            + offsets[colour][1].to_bytes(4, 'big')
            for item, colour in enumerate(colours, start=2)
        ]
        infes = [box(b'infe', (1).to_bytes(2, 'big'), b'\x00\x00grid\x00', version=2 << 24)]
        infes += [
            box(b'infe', item.to_bytes(2, 'big'), b'\x00\x00hvc1\x00', version=2 << 24)
            for item in range(2, len(colours) + 2)
        ]
        references = (1).to_bytes(2, 'big') + len(colours).to_bytes(2, 'big')
        references += b''.join(item.to_bytes(2, 'big') for item in range(2, len(colours) + 2))
        return box(
            b'meta',
            box(b'hdlr', b'\x00' * 4, b'pict', b'\x00' * 13, version=0),
            box(b'pitm', (1).to_bytes(2, 'big'), version=0),
            box(b'iloc', b'\x44\x00', (1 + len(colours)).to_bytes(2, 'big'), *locations, version=1 << 24),
            box(b'iinf', (1 + len(colours)).to_bytes(2, 'big'), *infes, version=0),
            box(b'iref', box(b'dimg', references), version=0),
            box(b'iprp', ipco, ipma),
            box(b'idat', grid),
            version=0,
        )

    ftyp = box(b'ftyp', b'heic', b'\x00' * 4, b'mif1heic')
    start = len(ftyp) + len(meta(0)) + 8
    return ftyp + meta(start) + box(b'mdat', *(data for _, _, data in tiles))


def test_a_grid_heic_as_phones_write_it_is_stored_and_rendered_and_its_tiles_checked(client):
    """iPhone photos are grids of 512 x 512 hvc1 tiles: each tile is sized by its own ispe and SPS."""
    honest = grid_heic(('red', 'lime', 'blue', 'white'))
    lying = grid_heic(('red', 'lime', 'blue', 'white'), tile_ispe=16)

    stored = client.post('/images', honest, content_type='image/heic').json
    refused = client.post('/images', lying, content_type='image/heic', status=413).json

    assert (stored['width'], stored['height']) == (128, 128) and stored['phash']
    rendered = derive(client, stored['image_id'], 'w=64&format=png')
    assert all(map(close, colours_at_quadrants(rendered), (RED, GREEN, BLUE, WHITE))), 'the tiles in their places'
    assert 'its HEVC item 2 declares 16x16 pixels but is coded at 64x64' in refused['detail'], refused
    assert client.get('/stats').json['count'] == 1


def test_an_sps_in_a_heic_items_data_counts_as_the_one_in_its_hvcc(client):
    """libheif gives libde265 the hvcC's NAL units, then the item's data: an SPS there is decoded too (hev1)."""
    heic, larger = flat_heic(64), flat_heic(256)
    sps = larger.index(b'\x42\x01', larger.index(b'hvcC'))
    length = int.from_bytes(larger[sps - 2 : sps], 'big')  # NOTE: an hvcC's NAL unit lengths are 2 bytes
    data = length.to_bytes(4, 'big') + larger[sps : sps + length] + heic[heic.index(b'mdat') + 4 :]
    iloc = heic.index(b'iloc') + 4  # NOTE: version 0, 4-byte fields; its one item's base offset, extent offset, length
    assert heic[iloc + 4 : iloc + 6] == b'\x44\x40' and heic[iloc + 16 : iloc + 18] == b'\x00\x01'
    located = (len(heic) + 8).to_bytes(4, 'big') + heic[iloc + 16 : iloc + 18] + bytes(4) + len(data).to_bytes(4, 'big')
    moved = heic[: iloc + 12] + located + heic[iloc + 26 :] + box(b'mdat', data)
    assert Image.open(io.BytesIO(moved)).size == (64, 64)

    refused = client.post('/images', moved, content_type='image/heic', status=413).json

    assert 'its HEVC item 1 declares 64x64 pixels but is coded at 256x256' in refused['detail'], refused
