"""Hostile input (issue 29): every reproduction of the trial, answered on purpose and at a bounded cost.

Each test reproduces what a hostile client did to a single node (a 500, memory or
CPU per byte sent, labels without end, a cache serving the wrong bytes) and shows
the answer it gets now. The files that once crashed are kept in ``fuzz_corpus/``
and replayed here and by test_fuzz.py.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import hashlib
import http.client
import io
import json
import os
import pathlib
import random
import signal
import socket
import sqlite3
import string
import struct
import subprocess
import sys
import threading
import time
import tracemalloc
import urllib.parse

import pytest
import webtest
from PIL import Image

import iss
from iss_server import cli, errors, images, resumable
from iss_server.config import Settings
from iss_server.worker import ARRIVING_GRACE, LINGER_SECONDS, MAX_WAITING_PER_CLIENT
from iss_testing import HERE
from iss_testing.cli import upload_image
from iss_testing.data import blob_id, make_png
from iss_testing.servers import Gunicorn, wait_for
from test_deploy import MIB, UPLOAD_LIMIT, Nginx

CORPUS = HERE / 'fuzz_corpus' / 'image'
TUS = {'Tus-Resumable': '1.0.0'}


def corpus(pattern: str) -> list[pathlib.Path]:
    return sorted(CORPUS.glob(pattern))


# -- files as a hostile client makes them --------------------------------------------


def tiff_with_directories(count: int) -> bytes:
    """A 1x1 grey TIFF of ``count`` directories (frames), each a copy of the first."""
    tags = [
        (256, 3, 1, 1),
        (257, 3, 1, 1),
        (258, 3, 1, 8),
        (259, 3, 1, 1),
        (262, 3, 1, 1),
        (273, 4, 1, 8),
        (277, 3, 1, 1),
        (278, 3, 1, 1),
        (279, 4, 1, 1),
    ]
    size = 2 + 12 * len(tags) + 4
    out = bytearray(b'II*\x00' + struct.pack('<I', 9) + b'\x80')  # the header, then the one pixel
    for index in range(count):
        following = 9 + (index + 1) * size if index + 1 < count else 0
        out += struct.pack('<H', len(tags))
        out += b''.join(struct.pack('<HHII', *tag) for tag in tags)
        out += struct.pack('<I', following)
    return bytes(out)


def write_padded_jpeg(file: io.RawIOBase, app_bytes: int) -> None:
    """An 8x8 JPEG with ``app_bytes`` of APP15 segments before its frame, written in pieces."""
    buffer = io.BytesIO()
    Image.new('RGB', (8, 8)).save(buffer, 'JPEG')
    jpeg = buffer.getvalue()
    segment = b'\xff\xef' + struct.pack('>H', 65535) + bytes(65533)
    file.write(jpeg[:2])
    for _ in range(app_bytes // len(segment)):
        file.write(segment)
    file.write(jpeg[2:])


# -- tus headers: one parser per family ---------------------------------------------


@pytest.mark.parametrize(
    'value', [None, '', '²', '١٢', '1²', ' 1', '1 ', '-1', '+1', '1_0', '0x10', '1e3', '9' * 19, '1.0'], ids=repr
)
@pytest.mark.parametrize('parse', [resumable.parse_length, resumable.parse_offset])
def test_byte_counts_are_ascii_digits_only(parse, value):
    with pytest.raises(errors.BadRequest) as refused:
        parse(value)
    assert refused.value.status == 400


@pytest.mark.parametrize('value', ['0', '10', '007', '9' * 18])
def test_byte_counts_take_what_the_grammar_allows(value):
    assert resumable.parse_length(value) == resumable.parse_offset(value) == int(value)


@pytest.mark.parametrize(
    'header',
    [
        'filename bmFtZQ==,kind é',  # a value of non-ASCII (base64 raised ValueError: a 500)
        'fïlename bmFtZQ==',  # a key of non-ASCII
        'kind ' + 'A' * (64 * 1024),  # longer than any client sends
        ','.join(f'k{n} YQ==' for n in range(65)),  # more keys than any client sends
        'k' * 129 + ' YQ==',
        'kind //79',  # base64 of no UTF-8
        'kind YQ==,kind YQ==',
    ],
    ids=['non-ascii-value', 'non-ascii-key', 'long', 'many-keys', 'long-key', 'not-utf-8', 'repeated-key'],
)
def test_upload_metadata_outside_its_grammar_is_400(header):
    with pytest.raises(errors.BadRequest) as refused:
        resumable.parse_metadata(header)
    assert len(refused.value.public_description) < 300  # NOTE: what is echoed is cut short


@pytest.mark.parametrize(
    'header',
    ['sha1 é', 'shä1 AAAA', 'sha1 ' + 'A' * 300, 'sha1 ²', 'crc32 AAAA', 'sha1 AAAA'],
    ids=['non-ascii-digest', 'non-ascii-algorithm', 'long', 'superscript', 'unknown-algorithm', 'short-digest'],
)
def test_upload_checksum_outside_its_grammar_is_400(header):
    with pytest.raises(errors.BadRequest) as refused:
        resumable.parse_checksum(header)
    assert len(refused.value.public_description) < 300


def test_non_ascii_tus_headers_are_400_through_the_app(client):
    created = client.post(
        '/uploads',
        headers={**TUS, 'Upload-Length': '3', 'Upload-Metadata': 'kind é'.encode().decode('latin-1')},
        expect_errors=True,
    )
    assert (created.status_int, created.json['title']) == (400, 'Invalid Upload-Metadata')
    location = client.post(
        '/uploads', headers={**TUS, 'Upload-Length': '3', 'Upload-Metadata': 'kind bW9kZWw='}
    ).headers['Location']
    chunk = client.patch(
        location,
        b'abc',
        headers={
            **TUS,
            'Content-Type': 'application/offset+octet-stream',
            'Upload-Offset': '0',
            'Upload-Checksum': 'sha1 é'.encode().decode('latin-1'),
        },
        expect_errors=True,
    )
    assert (chunk.status_int, chunk.json['title']) == (400, 'Invalid checksum')


@pytest.mark.parametrize('value', ['\u00b2', '\u0661\u0660', ' 3', '3_0', '-3', '9' * 19])
def test_byte_counts_outside_ascii_digits_are_400_through_the_app(client, value):
    header = value.encode().decode('latin-1')
    artifact = {**TUS, 'Upload-Metadata': 'kind bW9kZWw='}
    created = client.post('/uploads', headers={**artifact, 'Upload-Length': header}, expect_errors=True)
    assert (created.status_int, created.json['title']) == (400, 'Invalid Upload-Length')
    location = client.post('/uploads', headers={**artifact, 'Upload-Length': '3'}).headers['Location']
    chunk = client.patch(
        location,
        b'abc',
        headers={**TUS, 'Content-Type': 'application/offset+octet-stream', 'Upload-Offset': header},
        expect_errors=True,
    )
    assert (chunk.status_int, chunk.json['title']) == (400, 'Invalid Upload-Offset')


def test_the_404_of_an_upload_does_not_echo_a_long_id(client):
    answer = client.head(f'/uploads/{"x" * 5000}', headers=TUS, expect_errors=True)
    assert answer.status_int == 404
    answer = client.delete(f'/uploads/{"x" * 5000}', headers=TUS, expect_errors=True)
    assert answer.status_int == 404
    assert len(answer.json['description']) < 300


# -- images: one boundary around Pillow ----------------------------------------------


@pytest.mark.parametrize('path', corpus('*'), ids=lambda path: path.name)
def test_every_file_that_once_crashed_is_identified_or_refused(path):
    """Replays fuzz_corpus/image: each is an image, or a typed refusal; never another exception."""
    data = path.read_bytes()
    try:
        info = images.identify(io.BytesIO(data))
    except (images.NotAnImage, images.ImageTooLarge):
        return
    json.dumps(info.fields, allow_nan=False)  # NOTE: the meta must be JSON: no IFDRational
    for verify in (images.check_decodes,):
        try:
            verify(io.BytesIO(data), images.DEFAULT_MAX_PIXELS)
        except images.CannotRender:
            pass
    try:
        images.render(io.BytesIO(data), images.Variant(16, 16, 'contain', 'PNG', None), io.BytesIO(), 10**8)
    except (images.NotAnImage, images.ImageTooLarge, images.CannotRender):
        pass


@pytest.mark.parametrize('path', corpus('[gt]*'), ids=lambda path: path.name)
def test_a_gif_or_tiff_whose_frames_break_the_decoder_is_answered_not_500(client, path):
    """Pillow opens their header, and counting their frames raised IndexError, struct.error, KeyError..."""
    answer = upload_image(client, path.read_bytes(), path.name, expect_errors=True)
    assert answer.status_int in (201, 413, 415), answer.text
    if answer.status_int == 201:
        assert client.get(f'/images/{answer.json["image_id"]}/meta').json['frames'] >= 1


@pytest.mark.parametrize('path', corpus('[gt]*'), ids=lambda path: path.name)
def test_the_same_over_tus(client, path):
    data = path.read_bytes()
    metadata = f'kind {base64.b64encode(b"image").decode()}'
    answer = client.post(
        '/uploads',
        data,
        headers={
            **TUS,
            'Upload-Length': str(len(data)),
            'Upload-Metadata': metadata,
            'Content-Type': 'application/offset+octet-stream',
        },
        expect_errors=True,
    )
    assert answer.status_int in (201, 413, 415), answer.text


def test_a_rational_exif_orientation_is_no_orientation_and_the_batch_is_stored(client):
    """``IFDRational is not JSON serializable`` made the upload, and a batch holding it, 500."""
    rational = (CORPUS / 'jpeg-rational-orientation.jpg').read_bytes()
    alone = upload_image(client, rational, 'r.jpg')
    assert (alone.status_int, alone.json['image_id']) == (201, blob_id(rational))
    stored = client.get(f'/images/{blob_id(rational)}/meta').json
    assert stored['orientation'] is None
    assert (stored['oriented_width'], stored['oriented_height']) == (32, 24)
    batch = client.post(
        '/images',
        upload_files=[
            ('file', 'a.png', make_png(color='green'), 'image/png'),
            ('file', 'r.jpg', rational, 'image/jpeg'),
        ],
    )
    assert batch.status_int == 201
    assert [entry['status'] for entry in batch.json] == [201, 200]
    assert client.get(f'/images/{blob_id(rational)}?w=10').status_int == 200


def test_exif_text_is_stored_without_control_characters_on_the_s3_store(tmp_path, s3_settings):
    """A camera make with a NUL and a terminal escape inside, a model of 5,000 characters: cleaned and cut short."""
    exif = Image.Exif()
    exif[0x010F] = 'Can\x00on\x1b[31m'
    exif[0x0110] = 'M' * 5000
    buffer = io.BytesIO()
    Image.new('RGB', (8, 8)).save(buffer, 'JPEG', exif=exif)
    settings = Settings(
        data_dir=str(tmp_path / 'data'),
        store=s3_settings['ISS_STORE'],
        index=s3_settings['ISS_INDEX'],
        s3_endpoint=s3_settings['ISS_S3_ENDPOINT'],
        s3_access_key=s3_settings['AWS_ACCESS_KEY_ID'],
        s3_secret_key=s3_settings['AWS_SECRET_ACCESS_KEY'],
    )
    client = webtest.TestApp(iss.build_app(settings))
    image_id = upload_image(client, buffer.getvalue(), 'c.jpg').json['image_id']
    stored = client.get(f'/images/{image_id}/meta').json
    assert (stored['camera_make'], len(stored['camera_model'])) == ('Canon[31m', 256)
    assert client.get('/images', params={'limit': 1}).json['items'][0]['camera_make'] == 'Canon[31m'


@pytest.mark.parametrize('path', corpus('jpeg-exif-*'), ids=lambda path: path.name)
def test_a_jpeg_with_malformed_exif_renders_upright_as_its_orientation_says(client, path):
    """ImageOps.exif_transpose raised on their EXIF: a 500 for any derivative."""
    data = path.read_bytes()
    assert upload_image(client, data, 'x.jpg').status_int == 201
    derived = client.get(f'/images/{blob_id(data)}?w=16&format=png')
    assert derived.status_int == 200
    assert Image.open(io.BytesIO(derived.body)).size[0] <= 16


def corrupt_avif() -> bytes:
    """An AVIF whose header and sequence header read, and whose frame libavif fails to decode (RuntimeError)."""
    encoded = io.BytesIO()
    Image.effect_noise((64, 64), 60).convert('RGB').save(encoded, 'AVIF', speed=10)
    data = encoded.getvalue()
    sequence_header = data.index(b'\x0a', data.index(b'mdat') + 4)  # NOTE: OBU type 1, with its size field
    return data[: sequence_header + 1] + b'\x7f' + data[sequence_header + 2 :]  # NOTE: its size, now past the frame


def test_a_corrupt_avif_is_refused_at_upload_with_decode_and_at_render(make_client):
    """libavif raised RuntimeError: a 500 at upload with ISS_VERIFY_IMAGES=decode, and for a derivative."""
    # NOTE: the fuzz corpus's own corrupt AVIF has no sequence header: refused at identify now, as no image
    found = upload_image(make_client(), (CORPUS / 'avif-decode-runtime-error.avif').read_bytes(), expect_errors=True)
    assert (found.status_int, found.json['title']) == (415, 'Not an image')
    data = corrupt_avif()
    verifying = make_client(verify_images='decode')
    refused = upload_image(verifying, data, 'x.avif', expect_errors=True)
    assert (refused.status_int, refused.json['title']) == (422, 'Image does not decode')
    lenient = make_client()
    assert upload_image(lenient, data, 'x.avif').status_int == 201
    derived = lenient.get(f'/images/{blob_id(data)}?w=10', expect_errors=True)
    assert (derived.status_int, derived.json['title']) == (422, 'Cannot render')


def test_a_tiff_of_a_hundred_thousand_directories_costs_a_bounded_cpu():
    """Pillow walked them all to count frames, each checked against those before: 56 s of CPU."""
    data = tiff_with_directories(100_000)
    started = time.process_time()
    info = images.identify(io.BytesIO(data))
    assert time.process_time() - started < 2  # measured: 0.11 s (before: 56 s)
    assert info.fields['frames'] == images.MAX_FRAMES_WALKED
    assert images.identify(io.BytesIO(tiff_with_directories(3))).fields['frames'] == 3


def test_a_jpeg_padded_with_app_segments_costs_no_memory_per_byte(tmp_path):
    """Pillow keeps every APP segment: 512 MiB of them took 513 MiB of memory to identify."""
    with open(tmp_path / 'padded.jpg', 'w+b') as file:
        write_padded_jpeg(file, 96 * MIB)
        file.seek(0)
        tracemalloc.start()
        try:
            with pytest.raises(images.ImageTooLarge):
                images.identify(file)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert peak < images.HEADER_BUDGET.bytes + 4 * MIB, peak
    with open(tmp_path / 'small.jpg', 'w+b') as file:
        write_padded_jpeg(file, MIB)  # a megabyte of APP segments is a photo's, and identified
        file.seek(0)
        assert images.identify(file).format == 'JPEG'


def test_a_failure_of_the_output_is_not_the_images_fault():
    class Full(io.BytesIO):
        def write(self, data):
            raise OSError(28, 'No space left on device')

    with pytest.raises(OSError, match='No space'):
        images.render(io.BytesIO(make_png()), images.Variant(10, 10, 'contain', 'PNG', None), Full(), 10**8)


# -- renders: a gate per worker ------------------------------------------------------


def test_the_gate_admits_renders_and_pixels_up_to_its_bounds():
    gate = images.RenderGate(renders=2, pixels=100, wait=0.05)
    with gate.admitted(60):
        with pytest.raises(errors.RendersBusy), gate.admitted(60):  # 60 + 60 pixels are over the budget
            pass
        with gate.admitted(40), pytest.raises(errors.RendersBusy), gate.admitted(1):  # two renders already
            pass
    with gate.admitted(1000):  # larger than the budget: alone, it renders
        pass
    released = threading.Event()

    def hold() -> None:
        with gate.admitted(100):
            released.wait(5)

    holder = threading.Thread(target=hold)
    holder.start()
    time.sleep(0.05)
    threading.Timer(0.1, released.set).start()
    with images.RenderGate(2, 100, wait=2).admitted(1):  # another gate: no wait
        pass
    started = time.monotonic()
    with gate.admitted(100, wait=2):  # waits for the holder
        assert 0.03 < time.monotonic() - started < 2
    holder.join()


def test_renders_beyond_the_gate_are_a_fast_503_with_retry_after():
    gate = images.RenderGate(renders=1, pixels=10**9, wait=0.0)
    with gate.admitted(1), pytest.raises(errors.RendersBusy) as busy:
        images.render(io.BytesIO(make_png()), images.Variant(10, 10, 'contain', 'PNG', None), io.BytesIO(), 10**8, gate)
    assert (busy.value.status, busy.value.retry_after) == (503, 1)


def test_a_render_the_worker_has_no_room_for_is_a_503_with_retry_after_through_the_app(client, png):
    """The app needs no change for it: images.render uses the process's gate, RendersBusy is a ServiceError."""
    assert upload_image(client, png).status_int == 201
    bounds = images.GATE.renders
    with contextlib.ExitStack() as held:
        for _ in range(bounds):  # NOTE: every place taken, as by renders in other threads
            held.enter_context(images.GATE.admitted(1))
        started = time.monotonic()
        busy = client.get(f'/images/{blob_id(png)}?w=10', expect_errors=True)
        assert time.monotonic() - started < 5
    assert (busy.status_int, busy.headers['Retry-After'], busy.json['title']) == (503, '1', 'Busy rendering')
    assert client.get(f'/images/{blob_id(png)}?w=10').status_int == 200  # room again


_RENDERS_IN_THREADS = """
import io, sys, threading
sys.path.insert(0, {here!r})
from iss_server import images
source = open({path!r}, 'rb').read()
gate = images.RenderGate({renders}, {pixels}, wait=120)
def one():
    images.render(io.BytesIO(source), images.Variant(64, 64, 'contain', 'PNG', None), io.BytesIO(), 10**9, gate)
threads = [threading.Thread(target=one) for _ in range(8)]
[t.start() for t in threads]
[t.join() for t in threads]
print([line for line in open('/proc/self/status') if line.startswith('VmHWM')][0].split()[1])
"""


def test_concurrent_renders_hold_the_memory_of_the_gate_not_of_the_requests(tmp_path):
    """Sixteen renders of an allowed 9400x9400 image took a worker to 5.5 GB; here eight of 3000x3000."""
    path = tmp_path / 'big.png'
    Image.effect_noise((3000, 3000), 64).convert('RGB').save(path, compress_level=1)

    def peak_kib(renders: int, pixels: int) -> int:
        script = _RENDERS_IN_THREADS.format(here=str(HERE), path=str(path), renders=renders, pixels=pixels)
        done = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, timeout=300, check=True)
        return int(done.stdout.split()[-1])

    gated = peak_kib(Settings().renders, Settings().render_pixels)
    ungated = peak_kib(8, 10**12)
    one_decode_kib = 3000 * 3000 * 3 // 1024
    assert gated < ungated - 3 * one_decode_kib, (gated, ungated)


# -- metrics: labels from a fixed set ------------------------------------------------


def test_ten_thousand_junk_requests_leave_the_metrics_flat(server):
    rng = random.Random(29)

    def junk(count: int) -> None:
        connection = http.client.HTTPConnection('127.0.0.1', server.port, timeout=30)
        for _ in range(count):
            method = ''.join(rng.choices(string.ascii_uppercase, k=rng.randint(3, 12)))
            path = '/junk/' + ''.join(rng.choices(string.ascii_letters + string.digits + '-._~/', k=rng.randint(1, 40)))
            connection.request(method if rng.random() < 0.9 else 'GET', path)
            response = connection.getresponse()
            response.read()
            assert response.status < 500
        connection.close()

    junk(200)
    server.request('GET', '/metrics')  # NOTE: the scrape is a request of its own, counted after it
    before = server.request('GET', '/metrics')[2].decode()
    junk(10_000)
    after = server.request('GET', '/metrics')[2].decode()
    series = {line.rpartition(' ')[0] for line in after.splitlines() if not line.startswith('#')}
    assert series == {line.rpartition(' ')[0] for line in before.splitlines() if not line.startswith('#')}
    # NOTE: the counts grow by a few digits; a label value per method or path is ~200 bytes each.
    assert len(after) - len(before) < 2048, (len(before), len(after))


# -- nginx's cache: one entry per what decides the bytes ------------------------------


@pytest.fixture
def nginx_stack(tmp_path, shared_data_dir):
    behind = Gunicorn(shared_data_dir, tmp_path / 'behind.log', ISS_MAX_UPLOAD_BYTES=str(UPLOAD_LIMIT))
    nginx_dir = tmp_path / 'nginx'
    nginx_dir.mkdir()
    nginx = Nginx(nginx_dir, behind.port, shared_data_dir)
    yield nginx
    nginx.stop()
    behind.stop()


def test_nginx_never_answers_a_derivative_with_the_original_nor_the_reverse(nginx_stack):
    """The key was ``$2?$args``: after GET /artifacts/X?w=10, GET /images/X?w=10 answered the original."""
    nginx = nginx_stack
    for order in (('artifacts', 'images'), ('images', 'artifacts')):
        original = make_png(120, 90, color='blue' if order[0] == 'images' else 'yellow')
        stored = upload_through(nginx, original)
        for _ in range(2):  # the second round is answered from the cache
            for door in order:
                status, headers, body = nginx.request('GET', f'/{door}/{stored}?w=10')
                assert status == 200
                if door == 'images':
                    assert Image.open(io.BytesIO(body)).size == (10, 8), door
                else:
                    assert body == original, door
            for door in order:
                assert nginx.request('GET', f'/{door}/{stored}')[2] == original


def upload_through(nginx: Nginx, data: bytes) -> str:
    digest = 'sha256:' + hashlib.sha256(data).hexdigest()
    status, _, _ = nginx.request('PUT', f'/images/{digest}', data, {'Content-Type': 'image/png'})
    assert status == 201
    return digest


def test_settings_of_the_render_gate_are_read():
    gate = images.RenderGate(1, 1)
    gate.configure(Settings.from_env({'ISS_RENDERS': '3', 'ISS_RENDER_PIXELS': '1000'}))
    assert (gate.renders, gate.pixels) == (3, 1000)
    assert (Settings().renders, Settings().render_pixels) == (2, Settings().max_image_pixels)


def test_a_gif_frame_larger_than_its_screen_is_refused_before_pillow_allocates_it():
    """Found by scripts/fuzz.py: 105 bytes took 3.4 GB and 5 s in Image.open (ISS had turned Pillow's check off)."""
    data = (CORPUS / 'gif-frame-larger-than-its-screen-oom.gif').read_bytes()
    started = time.process_time()
    for call in (images.identify, images.check_decodes):
        with pytest.raises(images.ImageTooLarge):
            call(io.BytesIO(data), images.DEFAULT_MAX_PIXELS)
    assert time.process_time() - started < 1


@pytest.mark.parametrize('value', ['\u0661\u0660', ' 10', '1_0', '+10', '\u00b2'])
def test_a_derivative_size_outside_ascii_digits_is_400_one_spelling_one_cache_key(client, png, value):
    image_id = upload_image(client, png).json['image_id']

    answer = client.get(f'/images/{image_id}', {'w': value}, expect_errors=True)

    assert answer.status_int == 400 and answer.json['title'] == 'Invalid parameter'


def test_a_range_of_non_ascii_digits_is_ignored_as_rfc_9110_says(client, png):
    image_id = upload_image(client, png).json['image_id']

    answer = client.get(f'/images/{image_id}', headers={'Range': 'bytes=\u00b2-'.encode().decode('latin-1')})

    assert answer.status_int == 200 and answer.body == png


def test_a_chunk_after_the_upload_is_complete_says_so(client):
    artifact = {**TUS, 'Upload-Metadata': 'kind bW9kZWw='}
    location = client.post('/uploads', headers={**artifact, 'Upload-Length': '3'}).headers['Location']
    chunk = {**TUS, 'Content-Type': 'application/offset+octet-stream', 'Upload-Offset': '0'}
    client.patch(location, b'abc', headers=chunk)

    again = client.patch(location, b'abc', headers={**chunk, 'Upload-Offset': '3'}, expect_errors=True)

    assert again.status_int == 409 and 'complete' in again.json['description'], again.json


# -- meta that no JSON reader can take back, and kinds and keys that are ISS's ------------


def tus_metadata(**fields: str) -> dict[str, str]:
    encoded = ','.join(f'{name} {base64.b64encode(value.encode()).decode()}' for name, value in fields.items())
    return {**TUS, 'Upload-Metadata': encoded, 'Upload-Length': '2'}


def artifact_query(kind: str, user_meta: str | None = None) -> str:
    return urllib.parse.urlencode({'kind': kind, **({'meta': user_meta} if user_meta is not None else {})})


REFUSED_META = [
    pytest.param('{"a":"\\ud800"}', id='lone-surrogate-value'),
    pytest.param('{"a":[{"\\udfff":1}]}', id='lone-surrogate-nested-key'),
    pytest.param('{"a":1e999}', id='overflows-to-infinity'),
    pytest.param('{"a":[-1e999]}', id='nested-negative-overflow'),
    pytest.param('{"a":NaN}', id='nan'),
    pytest.param('{"a":{"b":-Infinity}}', id='nested-infinity'),
    pytest.param('{"id":"sha256:00"}', id='listing-id'),
    pytest.param('{"verified":"decode"}', id='answer-verified'),
]


@pytest.mark.parametrize('user_meta', REFUSED_META)
def test_meta_that_cannot_be_served_back_or_fakes_iss_keys_is_400_at_upload(client, user_meta):
    """A trial stored these (201); then /meta, listings and /events answered 500 or a faked id."""
    posted = client.post(f'/artifacts?{artifact_query("x", user_meta)}', b'm1', expect_errors=True)
    put = client.put(f'/artifacts/{blob_id(b"m1")}?{artifact_query("x", user_meta)}', b'm1', expect_errors=True)
    tus = client.post('/uploads', headers=tus_metadata(kind='x', meta=user_meta), expect_errors=True)

    for answer in (posted, put, tus):
        assert answer.status_int == 400 and answer.json['title'] == 'Invalid meta', answer.json
    assert client.get('/artifacts').json['items'] == []
    assert client.get('/events').status_int == 200


def test_meta_of_any_unicode_that_utf8_encodes_is_stored_and_served_back(client):
    user_meta = json.dumps({'\u00e9t\u00e9': ['\U0001f600', 1.5e300, {'n': None}]})

    stored = client.post(f'/artifacts?{artifact_query("x", user_meta)}', b'm2')

    assert client.get(f'/artifacts/{stored.json["artifact_id"]}/meta').json['\u00e9t\u00e9'][0] == '\U0001f600'
    assert client.get('/events').status_int == 200


def test_the_kind_image_is_the_image_doors_and_the_artifacts_door_refuses_it(client):
    posted = client.post(f'/artifacts?{artifact_query("image")}', b'x', expect_errors=True)
    put = client.put(f'/artifacts/{blob_id(b"x")}?{artifact_query("image")}', b'x', expect_errors=True)
    batch = client.post(
        '/artifacts',
        {'kind': 'image'},
        upload_files=[('file', 'a.bin', b'x'), ('file', 'b.bin', b'y')],
        expect_errors=True,
    )

    for answer in (posted, put, batch):
        assert answer.status_int == 400 and answer.json['title'] == 'Invalid kind', answer.json
        assert '/images' in answer.json['description']
    assert client.get('/images').json['items'] == [] and client.get('/artifacts').json['items'] == []
    assert client.get('/stats').json['count'] == 0


@pytest.mark.parametrize(
    'body',
    [
        pytest.param(b'[' * 100_000 + b']' * 100_000, id='nested-past-the-recursion-limit'),
        pytest.param(b'{"ids":[' * 1000 + b']}' * 1000, id='nested-objects'),
        pytest.param(b'{"ids":NaN}', id='nan'),
    ],
)
def test_a_json_body_nested_past_any_use_or_not_json_is_400(client, body):
    answer = client.post('/blobs/missing', body, headers={'Content-Type': 'application/json'}, expect_errors=True)

    assert answer.status_int == 400, answer.body[:200]


@pytest.mark.parametrize(('name', 'value'), [('limit', '\u0663'), ('limit', '1_0'), ('created_after', '\u0661\u0660')])
def test_listing_parameters_take_ascii_digits_only(client, name, value):
    answer = client.get('/images', {name: value}, expect_errors=True)

    assert answer.status_int == 400, answer.body


# -- slow clients: no thread for headers, most threads for bodies, a minimum rate ---------

SLOW_CLIENTS = 200
# NOTE: the slow clients come from 127.0.0.1, the health checks from another address of loopback
# (one address holds at most iss_server.worker.MAX_ARRIVING_PER_CLIENT connections still sending a request).
HEALTH_CHECKER = ('127.0.0.2', 0)
HONEST_UPLOADER = ('127.0.0.3', 0)
#: Slow clients spread over eight addresses of loopback, 25 from each (under any per-address bound).
SPREAD = tuple(f'127.0.0.{last}' for last in range(4, 12))


def open_slow_clients(
    port: int, first_bytes: bytes, count: int = SLOW_CLIENTS, sources: tuple[str, ...] = ('127.0.0.1',)
) -> list[socket.socket]:
    clients = []
    for number in range(count):
        client = socket.create_connection(
            ('127.0.0.1', port), timeout=30, source_address=(sources[number % len(sources)], 0)
        )
        with contextlib.suppress(OSError):
            client.sendall(first_bytes)
        clients.append(client)
    return clients


@contextlib.contextmanager
def dripping(clients: list[socket.socket], drop: bytes, every: float = 0.5):
    """Each client sends ``drop`` every ``every`` seconds, never pausing long, while the block runs."""
    stop = threading.Event()

    def drip() -> None:
        while not stop.wait(every):
            for client in clients:
                with contextlib.suppress(OSError):
                    client.send(drop)

    dripper = threading.Thread(target=drip, daemon=True)
    dripper.start()
    try:
        yield
    finally:
        stop.set()
        dripper.join()
        for client in clients:
            client.close()


def health_answers_within(port: int, seconds: float, checks: int = 6) -> list[float]:
    """Ask /health ``checks`` times, a half second apart, each answered 200 within ``seconds``; their times."""
    took = []
    for _ in range(checks):
        started = time.monotonic()
        connection = http.client.HTTPConnection('127.0.0.1', port, timeout=seconds, source_address=HEALTH_CHECKER)
        connection.request('GET', '/health')
        assert connection.getresponse().status == 200
        connection.close()
        took.append(time.monotonic() - started)
        time.sleep(0.5)
    return took


def uploads_answer_within(port: int, seconds: float, checks: int = 3) -> list[float]:
    """Upload a small body ``checks`` times from another address, each answered 201 within ``seconds``; their times."""
    took = []
    for _ in range(checks):
        started = time.monotonic()
        connection = http.client.HTTPConnection('127.0.0.1', port, timeout=seconds, source_address=HONEST_UPLOADER)
        connection.request('POST', '/artifacts?kind=honest', body=os.urandom(20_000))
        assert connection.getresponse().status == 201
        connection.close()
        took.append(time.monotonic() - started)
    return took


def answer_of(client: socket.socket, first: bytes = b'') -> bytes:
    """What the server answered on ``client`` until it closed (``first``: what was read of it already)."""
    answer = first
    with contextlib.suppress(OSError):
        while chunk := client.recv(4096):
            answer += chunk
    return answer


@pytest.mark.slow
def test_two_hundred_header_trickles_take_no_thread_and_are_cut_at_the_header_timeout(start):
    """33 connections trickling header bytes once took every thread (2 x 16) and /health with them."""
    server = start(ISS_HEADER_TIMEOUT='3')
    clients = open_slow_clients(server.port, b'GET /health HTTP/1.1\r\n')
    with dripping(clients, b'X-Slow: 1\r\n'):
        assert max(health_answers_within(server.port, 1.0)) < 1.0
        answers = [answer_of(client) for client in clients]
    # each either answered 408 at the header timeout, or 503 at once past the per-address bound
    statuses = collections.Counter(answer[9:12] for answer in answers)
    assert set(statuses) == {b'408', b'503'} and statuses[b'408'] >= 64, statuses
    for status in (b'408', b'503'):
        answer = next(answer for answer in answers if answer[9:12] == status)
        assert json.loads(answer.partition(b'\r\n\r\n')[2])['status'] == int(status)
    assert b'Retry-After: 1' in next(answer for answer in answers if answer[9:12] == b'503')


def test_past_the_connections_one_address_may_have_arriving_the_next_have_a_second_for_their_request(start):
    """Beyond MAX_ARRIVING_PER_CLIENT the connection was closed without an answer; then answered 503 at once,
    /health included, however fast its request came (a burst of one NAT's requests got 503s)."""
    server = start(ISS_WORKERS='1', ISS_HEADER_TIMEOUT='5')
    clients = open_slow_clients(server.port, b'GET /health HTTP/1.1\r\n', 64)
    try:
        assert server.request('GET', '/health')[0] == 200  # NOTE: the same address; its request came at once
        late = open_slow_clients(server.port, b'GET /health HTTP/1.1\r\n', 1)[0]
        started = time.monotonic()
        answer = answer_of(late)
        late.close()
        assert ARRIVING_GRACE - 0.1 < time.monotonic() - started < ARRIVING_GRACE + 1.5
        assert answer.startswith(b'HTTP/1.1 503') and b'Retry-After: 1' in answer, answer
        assert json.loads(answer.partition(b'\r\n\r\n')[2])['title'] == 'Too many slow requests'
        assert max(health_answers_within(server.port, 1.0, checks=2)) < 1.0  # another address is answered
    finally:
        for client in clients:
            client.close()


#: A documentation prefix (RFC 3849: never routed) made local on loopback for the test: any address of it may connect.
IPV6_PREFIX = '2001:db8:5::/48'
IPV6_FREEBIND = 78  # NOTE: linux/in6.h; Python's socket module does not name it


@pytest.fixture
def ipv6_prefix():
    """Every address of :data:`IPV6_PREFIX` a local one, as a host given a /64 has all of its own (root, ``ip``)."""
    route = ['ip', '-6', 'route', 'replace', 'local', IPV6_PREFIX, 'dev', 'lo', 'table', 'local']
    made = subprocess.run(route, capture_output=True, text=True)
    assert made.returncode == 0, f'{" ".join(route)} (root and iproute2 are needed; .ci/run has both): {made.stderr}'
    try:
        yield
    finally:
        subprocess.run(['ip', '-6', 'route', 'del', 'local', IPV6_PREFIX, 'dev', 'lo', 'table', 'local'], check=False)


def test_the_addresses_of_one_ipv6_64_are_one_client_to_the_bounds_per_address(start, ipv6_prefix):
    """Counted by address, the 2**64 addresses a host has in its /64 were as many clients: its slow connections,
    each from an address of its own, passed MAX_ARRIVING_PER_CLIENT without end."""
    server = start(ISS_WORKERS='1', ISS_HEADER_TIMEOUT='5', ISS_HOST='[::]')

    def connect(source: str) -> socket.socket:
        client = socket.socket(socket.AF_INET6)
        client.settimeout(10)
        client.setsockopt(socket.IPPROTO_IPV6, IPV6_FREEBIND, 1)  # NOTE: an address not on any interface
        client.bind((source, 0))
        client.connect(('::1', server.port))
        return client

    clients = [connect(f'2001:db8:5::{number:x}') for number in range(1, 65)]  # NOTE: all in 2001:db8:5::/64
    try:
        for client in clients:
            client.sendall(b'GET /health HTTP/1.1\r\n')
        late = connect('2001:db8:5::ffff:1')
        late.sendall(b'GET /health HTTP/1.1\r\n')
        started = time.monotonic()
        answer = answer_of(late)
        late.close()
        assert answer.startswith(b'HTTP/1.1 503'), answer
        assert time.monotonic() - started < ARRIVING_GRACE + 1.5
        assert json.loads(answer.partition(b'\r\n\r\n')[2])['title'] == 'Too many slow requests'
        # NOTE: the next /64 is another client; and IPv4 through the same dual-stack socket
        with connect('2001:db8:5:1::1') as neighbour:
            neighbour.sendall(b'GET /health HTTP/1.1\r\nHost: iss\r\nConnection: close\r\n\r\n')
            assert answer_of(neighbour).startswith(b'HTTP/1.1 200')
        assert server.request('GET', '/health')[0] == 200
    finally:
        for client in clients:
            client.close()


def test_three_hundred_fast_requests_of_one_address_at_once_are_all_answered(start):
    """Accepted faster than their bytes came, they counted as still arriving: 172 of 300 got 503 in 0.17 s."""
    server = start()

    async def health() -> int:
        reader, writer = await asyncio.open_connection('127.0.0.1', server.port)
        writer.write(b'GET /health HTTP/1.1\r\nHost: iss\r\nConnection: close\r\n\r\n')
        answer = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        return int(answer[9:12])

    async def burst() -> list[int]:
        return await asyncio.gather(*(health() for _ in range(300)))

    assert collections.Counter(asyncio.run(burst())) == {200: 300}


@pytest.mark.slow
def test_two_hundred_body_drips_leave_threads_free_and_are_cut_at_the_minimum_rate(start):
    """A one-byte drip never pauses, so ISS_BODY_TIMEOUT alone never tripped; 200 of them took every thread."""
    server = start(ISS_BODY_TIMEOUT='2', ISS_BODY_MIN_RATE='1024')
    head = (
        b'POST /artifacts?kind=slow HTTP/1.1\r\nHost: iss\r\nContent-Type: application/octet-stream\r\n'
        b'Content-Length: 1000000\r\n\r\n'
    )
    clients = open_slow_clients(server.port, head)
    with dripping(clients, b'x', every=0.2):
        assert max(uploads_answer_within(server.port, 1.0)) < 1.0  # a small body needs no place
        assert max(health_answers_within(server.port, 1.0, checks=3)) < 1.0
        answers = [answer_of(client) for client in clients]
    statuses = collections.Counter(answer[9:12] for answer in answers)
    # one address holds a quarter of each worker's 14 body places: 3 received bodies at a time, cut at the minimum
    # rate (408); the others waited for a place in the main loop, and those still waiting after ISS_BODY_TIMEOUT
    # (or past MAX_WAITING_PER_CLIENT) got 503
    assert statuses[b'408'] >= 3, statuses  # NOTE: at least one worker's share (the other may get few)
    assert statuses[b'503'] >= 1, statuses
    assert set(statuses) == {b'503', b'408'}, statuses
    assert b'Retry-After: 1' in next(answer for answer in answers if answer[9:12] == b'503')
    assert not list((server.data_dir / 'tmp').glob('upload-*'))  # nothing half-written stays


@pytest.mark.slow
@pytest.mark.parametrize('sources', [('127.0.0.1',), SPREAD], ids=['one-address', 'eight-addresses'])
def test_two_hundred_small_body_drips_take_no_thread_and_are_cut_at_their_pace(start, sources):
    """200 clients dripping small uploads held every body place, and an honest upload waited ISS_BODY_TIMEOUT."""
    server = start(ISS_BODY_TIMEOUT='2', ISS_BODY_MIN_RATE='1024')
    head = b'POST /artifacts?kind=slow HTTP/1.1\r\nHost: iss\r\nContent-Length: 2048\r\n\r\n'
    clients = open_slow_clients(server.port, head, sources=sources)
    with dripping(clients, b'x', every=0.2):
        assert max(uploads_answer_within(server.port, 1.0)) < 1.0
        assert max(health_answers_within(server.port, 1.0, checks=2)) < 1.0
        answers = [answer_of(client) for client in clients]
    # received in the main loop, cut at ISS_BODY_TIMEOUT + 2048 / ISS_BODY_MIN_RATE s (408), or, past one address's
    # MAX_ARRIVING_PER_CLIENT, answered 503 at once
    statuses = collections.Counter(answer[9:12] for answer in answers)
    assert statuses[b'408'] >= 64 and set(statuses) <= {b'408', b'503'}, statuses
    assert json.loads(next(a for a in answers if a[9:12] == b'408').partition(b'\r\n\r\n')[2])['title'] == (
        'Request body too slow'
    )
    assert not list((server.data_dir / 'tmp').glob('upload-*'))


@pytest.mark.slow
def test_two_hundred_slow_clients_through_nginx_leave_health_answering(tmp_path, shared_data_dir):
    behind = Gunicorn(
        shared_data_dir, tmp_path / 'behind.log', ISS_MAX_UPLOAD_BYTES=str(UPLOAD_LIMIT), ISS_BODY_TIMEOUT='2'
    )
    nginx_dir = tmp_path / 'nginx'
    nginx_dir.mkdir()
    nginx = Nginx(nginx_dir, behind.port, shared_data_dir)
    try:
        header_trickles = open_slow_clients(nginx.port, b'GET /health HTTP/1.1\r\n', SLOW_CLIENTS // 2)
        head = (
            b'PUT /artifacts/sha256:'
            + b'0' * 64
            + b'?kind=slow HTTP/1.1\r\nHost: iss\r\nContent-Length: 100000\r\n\r\n'
        )
        # NOTE: small bodies (nginx buffers them) and large ones (streamed to ISS's body places)
        body_drips = open_slow_clients(nginx.port, head, SLOW_CLIENTS // 4) + open_slow_clients(
            nginx.port, head.replace(b'100000', b'1000000'), SLOW_CLIENTS // 4
        )
        with dripping(header_trickles, b'X-Slow: 1\r\n'), dripping(body_drips, b'x', every=0.2):
            assert max(uploads_answer_within(nginx.port, 1.0)) < 1.0
            assert max(health_answers_within(nginx.port, 1.0)) < 1.0
            assert max(health_answers_within(behind.port, 1.0, checks=2)) < 1.0
    finally:
        nginx.stop()
        behind.stop()


def open_non_readers(port: int, path: str, count: int) -> list[socket.socket]:
    """``count`` clients that ask for ``path`` with a small receive buffer and read nothing."""
    clients = []
    for _ in range(count):
        client = socket.socket()
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        client.connect(('127.0.0.1', port))
        client.sendall(f'GET {path} HTTP/1.1\r\nHost: iss\r\n\r\n'.encode())
        clients.append(client)
    return clients


def was_closed(client: socket.socket) -> bool:
    """Whether the server closed the connection (reset, or what it sent ends)."""
    client.setblocking(False)
    try:
        while client.recv(1024 * 1024):
            pass
    except ConnectionResetError:
        return True
    except BlockingIOError:
        return False
    return True


def read_slowly(port: int, path: str, every: float = 0.05) -> bytes:
    """The body at ``path``, read 64 KiB every ``every`` seconds (1.3 MB/s: far above ISS_BODY_MIN_RATE)."""
    client = socket.create_connection(('127.0.0.1', port), timeout=10, source_address=HONEST_UPLOADER)
    client.sendall(f'GET {path} HTTP/1.1\r\nHost: iss\r\nConnection: close\r\n\r\n'.encode())
    answer = b''
    while chunk := client.recv(64 * 1024):
        answer += chunk
        time.sleep(every)
    client.close()
    return answer.partition(b'\r\n\r\n')[2]


def test_clients_that_stop_reading_a_download_are_cut_and_health_keeps_answering(start):
    """40 clients that asked for a 60 MB blob and read nothing held 40 threads for ever: /health timed out on every
    other probe, and none was logged cut (issue 29). Responses go out under the body pace, as bodies come in."""
    server = start(ISS_BODY_TIMEOUT='2', ISS_LOG_LEVEL='info')
    data = os.urandom(8 * 1024 * 1024)  # NOTE: more than loopback's kernel takes at once (1.6 to 4 MB)
    digest = 'sha256:' + hashlib.sha256(data).hexdigest()
    assert server.request('PUT', f'/artifacts/{digest}?kind=big', data)[0] == 201
    path = f'/artifacts/{digest}'
    honest: list[bytes] = []
    reader = threading.Thread(target=lambda: honest.append(read_slowly(server.port, path)))

    clients = open_non_readers(server.port, path, 40)
    started = time.monotonic()
    reader.start()
    try:
        assert max(health_answers_within(server.port, 1.0, checks=8)) < 1.0

        def cut() -> list[dict]:
            return [
                line
                for line in server.json_log()
                if line.get('path') == path and line.get('cut') == 'the client stopped reading'
            ]

        wait_for(lambda: len(cut()) == 40, seconds=8, message='the 40 clients cut')
        assert time.monotonic() - started < 2 + 5
        assert all(was_closed(client) for client in clients)
        assert all(line['bytes_out'] < len(data) for line in cut())
        reader.join(timeout=15)
        assert honest == [data]  # NOTE: waits a moment each time: never the one that waited longest
    finally:
        for client in clients:
            client.close()


def test_a_client_that_pipelines_small_gets_and_reads_none_is_cut(start):
    """Each answer is small, but they fill the kernel's buffers: past them, a small answer waited for ever too."""
    server = start(ISS_BODY_TIMEOUT='2', ISS_LOG_LEVEL='info')
    data = os.urandom(64 * 1024)  # NOTE: the largest blob sent from memory (responses._SMALL_BLOB_BYTES)
    digest = 'sha256:' + hashlib.sha256(data).hexdigest()
    assert server.request('PUT', f'/artifacts/{digest}?kind=small', data)[0] == 201
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.connect(('127.0.0.1', server.port))
    client.sendall(f'GET /artifacts/{digest} HTTP/1.1\r\nHost: iss\r\n\r\n'.encode() * 200)
    try:
        wait_for(
            lambda: any(line.get('cut') == 'the client stopped reading' for line in server.json_log()),
            seconds=8,
            message='the client cut',
        )
        assert was_closed(client)
        assert max(health_answers_within(server.port, 1.0, checks=2)) < 1.0
    finally:
        client.close()


def test_a_body_slower_than_the_minimum_rate_is_408_and_keeps_nothing(start):
    server = start(ISS_BODY_TIMEOUT='1', ISS_BODY_MIN_RATE='1000')
    client = socket.create_connection(('127.0.0.1', server.port), timeout=10)
    client.sendall(b'POST /artifacts?kind=slow HTTP/1.1\r\nHost: iss\r\nContent-Length: 100000\r\n\r\n')
    started = time.monotonic()
    answer = b''
    while not answer and time.monotonic() - started < 8:
        with contextlib.suppress(OSError):
            client.send(b'x' * 10)  # 100 bytes a second, never a pause
        client.settimeout(0.1)
        with contextlib.suppress(TimeoutError):
            answer = client.recv(4096)
    client.settimeout(5)
    answer = answer_of(client, answer)
    client.close()
    assert answer.startswith(b'HTTP/1.1 408'), answer
    assert json.loads(answer.partition(b'\r\n\r\n')[2])['title'] == 'Request body too slow'
    assert time.monotonic() - started < 3
    assert not list((server.data_dir / 'tmp').glob('upload-*'))


@pytest.mark.parametrize(
    ('headers', 'status', 'title'),
    [({}, 413, 'Upload too large'), ({'Authorization': 'Bearer wrong'}, 401, 'Token required')],
    ids=['over-the-limit', 'wrong-token'],
)
def test_a_client_that_reads_only_once_its_body_is_sent_gets_the_answer_given_before_it(start, headers, status, title):
    """Answered before its body was read, and the connection closed with the rest unread: the kernel reset it, and
    http.client (which reads once it has sent all) met a broken pipe, never the answer (curl and urllib3 read it)."""
    server = start(ISS_MAX_UPLOAD_BYTES=str(MIB), ISS_API_TOKEN='right')
    body = os.urandom(48 * MIB)
    with_token = {'Authorization': 'Bearer right'} if status == 413 else {}

    for _ in range(3):
        connection = http.client.HTTPConnection('127.0.0.1', server.port, timeout=10)
        connection.request('POST', '/artifacts?kind=big', body=body, headers={**with_token, **headers})
        answer = connection.getresponse()
        assert (answer.status, json.loads(answer.read())['title']) == (status, title)
        connection.close()


def test_a_client_that_sends_on_after_its_answer_is_closed_within_the_lingering_time(start):
    """The worker reads a closed connection's rest for LINGER_SECONDS at most, in its main loop: /health answers."""
    server = start(ISS_MAX_UPLOAD_BYTES=str(MIB), ISS_WORKERS='1')
    endless = socket.create_connection(('127.0.0.1', server.port), timeout=10)
    endless.sendall(b'POST /artifacts?kind=big HTTP/1.1\r\nHost: iss\r\nContent-Length: 100000000000\r\n\r\n')
    started = time.monotonic()
    block = bytes(65536)
    with contextlib.suppress(OSError):
        while time.monotonic() - started < LINGER_SECONDS + 10:
            endless.sendall(block)
            if time.monotonic() - started > 1:
                assert server.request('GET', '/health')[0] == 200
    cut_after = time.monotonic() - started
    answer = answer_of(endless)
    endless.close()
    assert LINGER_SECONDS - 1 < cut_after < LINGER_SECONDS + 3, cut_after
    assert answer.startswith(b'HTTP/1.1 413'), answer[:200]


@pytest.mark.parametrize(
    ('target', 'status', 'title'),
    [
        (b'/artifacts?kind=slow', b'408', 'Request body too slow'),
        # NOTE: a body the app leaves unread is drained for DRAIN_SECONDS before the connection is kept
        (b'/health', b'405', '405 Method Not Allowed'),
    ],
    ids=['read', 'left-unread'],
)
def test_a_chunked_drip_is_cut_and_its_connection_closed(start, target, status, title):
    """gunicorn fills one read of a chunked body from as many chunks as come, a receive each: a chunk of one
    byte every 0.2 s never let a receive time out, and held its body place (a thread) for as long as it dripped."""
    server = start(ISS_BODY_TIMEOUT='2', ISS_BODY_MIN_RATE='1024')
    client = socket.create_connection(('127.0.0.1', server.port), timeout=8)
    client.sendall(b'POST ' + target + b' HTTP/1.1\r\nHost: iss\r\nTransfer-Encoding: chunked\r\n\r\n')
    started = time.monotonic()
    with dripping([client], b'1\r\nx\r\n', every=0.2):
        assert max(uploads_answer_within(server.port, 1.0, checks=1)) < 1.0
        answer = answer_of(client)  # NOTE: until the server closes the connection (or the 8 s timeout)
        took = time.monotonic() - started
    assert answer.startswith(b'HTTP/1.1 ' + status), answer
    error = json.loads(answer.partition(b'\r\n\r\n')[2])
    assert error['title'] == title
    assert took < 5, took  # ISS_BODY_TIMEOUT and a little, then the close
    if status == b'408':
        # NOTE: issue 29: it said keep-alive, then closed; and "Received 0 bytes" after ten chunks
        assert b'\r\nConnection: close\r\n' in answer, answer
        received = int(error['description'].split()[1])
        assert received >= 5 * len(b'1\r\nx\r\n'), error['description']
    assert not list((server.data_dir / 'tmp').glob('upload-*'))


@pytest.mark.parametrize(
    ('request_bytes', 'status', 'connection'),
    [
        (
            b'POST /artifacts?kind=p HTTP/1.1\r\nHost: iss\r\nContent-Length: 5000000\r\n\r\n' + b'a' * 1000,
            413,
            b'close',
        ),
        (b'POST /health HTTP/1.1\r\nHost: iss\r\nContent-Length: 3\r\n\r\nabc', 405, b'keep-alive'),
    ],
    ids=['413-declared', '405-drained'],
)
def test_an_answer_says_connection_close_when_the_connection_closes_after_it(start, request_bytes, status, connection):
    """Issue 29: a 413 to a declared 5 MB body said keep-alive, then closed (gunicorn drains at most 64 KiB)."""
    server = start(ISS_MAX_UPLOAD_BYTES='1000000')
    with socket.create_connection(('127.0.0.1', server.port), timeout=8) as client:
        client.sendall(request_bytes)
        answer = client.recv(65536)
        client.settimeout(0.5)
        with contextlib.suppress(TimeoutError):
            answer += answer_of(client)
        closed = not client.recv(1) if connection == b'close' else None

    assert answer.startswith(b'HTTP/1.1 %d' % status), answer
    assert b'\r\nConnection: ' + connection + b'\r\n' in answer, answer
    assert closed in (True, None)


def test_a_body_in_a_transfer_coding_iss_does_not_undo_is_501_and_stores_nothing(server):
    """Issue 29: "Transfer-Encoding: gzip, chunked" was stored as the bytes came, still gzipped (nginx: 501)."""
    with socket.create_connection(('127.0.0.1', server.port), timeout=5) as client:
        client.sendall(
            b'POST /artifacts?kind=coded HTTP/1.1\r\nHost: iss\r\nTransfer-Encoding: gzip, chunked\r\n\r\n'
            b'3\r\nabc\r\n0\r\n\r\n'
        )
        answer = answer_of(client)

    assert answer.startswith(b'HTTP/1.1 501'), answer
    assert b'\r\nConnection: close\r\n' in answer
    assert json.loads(answer.partition(b'\r\n\r\n')[2])['title'] == 'Transfer coding not implemented'
    assert not list((server.data_dir / 'blobs').rglob('*'))


@pytest.mark.parametrize('size', [b'fffffffffffffffffffff', b'%x' % 1_000_001])
def test_a_chunk_larger_than_the_upload_limit_is_413_at_once(start, size):
    """Issue 29: its size line promised more than the limit; ISS waited for the bytes (408 after ISS_BODY_TIMEOUT)."""
    server = start(ISS_BODY_TIMEOUT='5', ISS_MAX_UPLOAD_BYTES='1000000')
    started = time.monotonic()
    with socket.create_connection(('127.0.0.1', server.port), timeout=8) as client:
        client.sendall(
            b'POST /artifacts?kind=huge HTTP/1.1\r\nHost: iss\r\nTransfer-Encoding: chunked\r\n\r\n' + size + b'\r\nabc'
        )
        answer = answer_of(client)

    assert answer.startswith(b'HTTP/1.1 413'), answer
    assert b'\r\nConnection: close\r\n' in answer
    assert json.loads(answer.partition(b'\r\n\r\n')[2])['title'] == 'Upload too large'
    assert time.monotonic() - started < 2
    assert not list((server.data_dir / 'tmp').glob('upload-*'))


def test_past_the_requests_one_address_may_have_waiting_for_a_body_place_it_is_answered_503_at_once(start):
    """They waited without bound: one address could hold every connection a worker accepts (1000), /health shut out."""
    server = start(ISS_WORKERS='1', ISS_BODY_TIMEOUT='5')
    head = b'POST /artifacts?kind=slow HTTP/1.1\r\nHost: iss\r\nTransfer-Encoding: chunked\r\n\r\n'
    # NOTE: 3 take their share of the worker's body places (a quarter of 14), 64 wait for one, the others are refused
    clients = open_slow_clients(server.port, head, count=100)
    try:
        started = time.monotonic()
        late = open_slow_clients(server.port, head, count=1)[0]
        late.settimeout(3)
        answer = answer_of(late)
        late.close()
        assert time.monotonic() - started < 1.0
        assert answer.startswith(b'HTTP/1.1 503') and b'Retry-After: 1' in answer, answer
        assert json.loads(answer.partition(b'\r\n\r\n')[2])['title'] == 'Busy receiving'
        assert server.request('GET', '/health')[0] == 200  # NOTE: the same address: /health needs no body place
        assert max(uploads_answer_within(server.port, 1.0, checks=1)) < 1.0
    finally:
        for client in clients:
            client.close()


def test_behind_a_trusted_proxy_the_requests_waiting_for_a_body_place_count_against_the_client_it_forwards(start):
    """Behind nginx every request came from nginx's address: 64 waiting uploads of all its clients refused the next."""
    server = start(ISS_WORKERS='1', ISS_BODY_TIMEOUT='5')

    def head(client: str) -> bytes:
        return (
            b'POST /artifacts?kind=slow HTTP/1.1\r\nHost: iss\r\nTransfer-Encoding: chunked\r\n'
            b'X-Forwarded-For: 198.51.100.9, ' + client.encode() + b'\r\n\r\n'
        )

    # NOTE: 14 take the places, 86 wait: from 127.0.0.1 (gunicorn's default forwarded_allow_ips), each as its client
    clients = [open_slow_clients(server.port, head(f'203.0.113.{number}'), count=1)[0] for number in range(100)]
    try:
        another = open_slow_clients(server.port, head('203.0.113.200'), count=1)[0]
        another.settimeout(1.5)
        with pytest.raises(TimeoutError):
            another.recv(1)  # NOTE: it waits its turn, as the others do: no 503
        clients.append(another)
        crowd = open_slow_clients(server.port, head('192.0.2.1'), count=MAX_WAITING_PER_CLIENT)
        clients += crowd
        started = time.monotonic()
        late = open_slow_clients(server.port, head('192.0.2.1'), count=1)[0]
        late.settimeout(3)
        answer = answer_of(late)
        late.close()
        assert time.monotonic() - started < 1.0
        assert answer.startswith(b'HTTP/1.1 503') and b'Retry-After: 1' in answer, answer
    finally:
        for client in clients:
            client.close()


def test_one_client_holds_its_share_of_the_body_places_and_another_uploads_at_once(start):
    """Slow but legal uploads of one address (above ISS_BODY_MIN_RATE) held every body place for as long as they
    lasted: an honest large upload from another address waited ISS_BODY_TIMEOUT, then got 503 (issue 29's trial)."""
    server = start(ISS_WORKERS='1', ISS_BODY_TIMEOUT='6', ISS_BODY_MIN_RATE='1024', ISS_LOG_LEVEL='info')
    head = b'POST /artifacts?kind=slow HTTP/1.1\r\nHost: iss\r\nContent-Length: 100000000\r\n\r\n'
    # NOTE: 3 of the 14 places are its share; its 11 other uploads wait their turn, not refused
    clients = open_slow_clients(server.port, head, count=14)
    with dripping(clients, b'x' * 400, every=0.2):  # 2 kB/s each: never cut
        time.sleep(0.5)
        started = time.monotonic()
        connection = http.client.HTTPConnection('127.0.0.1', server.port, timeout=10, source_address=HONEST_UPLOADER)
        connection.request('POST', '/artifacts?kind=honest', body=os.urandom(MIB))
        assert connection.getresponse().status == 201
        connection.close()
        assert time.monotonic() - started < 2.0
        for client in clients:
            client.settimeout(0.01)
            with pytest.raises(TimeoutError):
                client.recv(1)  # NOTE: each receives, or waits: none is answered
    metrics = server.request('GET', '/metrics')[2].decode()
    assert 'iss_worker_refused_total' not in metrics


def test_the_requests_the_worker_refuses_have_their_access_line_and_their_count(start):
    """The worker's own 408, 431 and 503, and gunicorn's parser's 400 and 414, had no access line (the 503's was a
    line of plain text) and no metric."""
    server = start(ISS_WORKERS='1', ISS_HEADER_TIMEOUT='1', ISS_LOG_LEVEL='info')
    huge = socket.create_connection(('127.0.0.1', server.port), timeout=5)
    huge.sendall(b'GET /health?huge=1 HTTP/1.1\r\n' + b'X-Big: 1\r\n' * 7000)
    assert answer_of(huge).startswith(b'HTTP/1.1 431')
    slow = socket.create_connection(('127.0.0.1', server.port), timeout=5)
    slow.sendall(b'PUT /artifacts/x HTTP/1.1\r\n')
    assert answer_of(slow).startswith(b'HTTP/1.1 408')
    huge.close()
    slow.close()
    # NOTE: and those gunicorn's parser refuses (it answers them before ISS sees a request)
    for unparsable, status in (
        (b'GE\x01T / HTTP/1.1\r\n', b'400 Bad Request'),
        (b'GET /' + b'a' * 9000 + b' HTTP/1.1\r\n', b'414 URI Too Long'),
        # NOTE: gunicorn's reason for its 501 is "Bad Request"
        (b'POST / HTTP/1.1\r\nTransfer-Encoding: x-foo, chunked\r\n', b'501 Not Implemented'),
    ):
        with socket.create_connection(('127.0.0.1', server.port), timeout=5) as sent:
            sent.sendall(unparsable + b'Host: x\r\n\r\n')
            answer = answer_of(sent)
            assert answer.startswith(b'HTTP/1.1 ' + status + b'\r\n'), answer
            assert json.loads(answer.partition(b'\r\n\r\n')[2])['title'] == status[4:].decode()
    for _ in range(5):  # NOTE: its client gone before the answer: the address is still known
        with socket.create_connection(('127.0.0.1', server.port), timeout=5) as gone:
            gone.sendall(b'GARBAGE\r\n\r\n')
    all_in = 'iss_worker_refused_total{reason="unparsable",status="400"} 6.0'
    wait_for(lambda: all_in in server.request('GET', '/metrics')[2].decode(), message='the gone clients refused')
    metrics = server.request('GET', '/metrics')[2].decode()
    assert 'iss_worker_refused_total{reason="head_too_large",status="431"} 1.0' in metrics, metrics
    assert 'iss_worker_refused_total{reason="head_timeout",status="408"} 1.0' in metrics, metrics
    assert 'iss_worker_refused_total{reason="unparsable",status="414"} 1.0' in metrics, metrics
    assert 'iss_worker_refused_total{reason="unparsable",status="501"} 1.0' in metrics, metrics
    refused = [line for line in server.json_log() if line.get('refused')]
    assert [(line['status'], line['refused'], line['method'], line['path'], line['query']) for line in refused] == [
        (431, 'head_too_large', 'GET', '/health', 'huge=1'),
        (408, 'head_timeout', 'PUT', '/artifacts/x', None),
        (400, 'unparsable', None, None, None),
        (414, 'unparsable', None, None, None),
        (501, 'unparsable', None, None, None),
    ] + [(400, 'unparsable', None, None, None)] * 5
    assert all(line['bytes_out'] > 0 for line in refused[:5]), 'the body of each answer was sent'
    assert all(line['logger'] == 'iss.access' and len(line['request_id']) == 32 for line in refused)
    assert {line['remote'] for line in refused} == {'127.0.0.1'}


# -- the change feed lets a node stop -------------------------------------------------


def test_event_streams_and_long_polls_end_when_the_node_is_told_to_stop(start):
    """A stream held gunicorn's graceful stop for 15-30 s (found by test_feed_cluster.py)."""
    server = start()
    stream = socket.create_connection(('127.0.0.1', server.port), timeout=30)
    stream.sendall(b'GET /events HTTP/1.1\r\nHost: iss\r\nAccept: text/event-stream\r\n\r\n')
    assert stream.recv(4096).startswith(b'HTTP/1.1 200')
    poll = socket.create_connection(('127.0.0.1', server.port), timeout=30)
    poll.sendall(b'GET /events?wait=60 HTTP/1.1\r\nHost: iss\r\n\r\n')
    time.sleep(0.5)
    started = time.monotonic()
    os.kill(server.process.pid, signal.SIGTERM)
    server.process.wait(30)
    assert time.monotonic() - started < 8
    answer = poll.recv(4096)
    assert answer.startswith(b'HTTP/1.1 200') and b'"events": []' in answer


# -- derivatives larger than their format, refused before decoding ----------------------


def test_a_derivative_its_format_cannot_hold_is_422_before_any_decoding(client):
    sliver = io.BytesIO()
    Image.new('L', (1, 70_000)).save(sliver, 'PNG')
    image_id = upload_image(client, sliver.getvalue()).json['image_id']

    for query, side in (('format=webp', 16_383), ('format=jpeg', 65_500), ('w=1&format=webp', 16_383)):
        refused = client.get(f'/images/{image_id}?{query}', status=422)
        assert refused.json['title'] == 'Derivative too large'
        assert f'at most {side} pixels a side' in refused.json['description']
    assert Image.open(io.BytesIO(client.get(f'/images/{image_id}?h=100&format=webp').body)).size == (1, 100)


# -- tokens, signing and the operator's commands ----------------------------------------


def test_the_read_token_asks_which_ids_are_missing_and_reads_beside_a_stray_signature(make_client, png):
    client = make_client(read_token='reader', api_token='uploader', signing_key='key')
    image_id = upload_image(client, png, headers={'Authorization': 'Bearer uploader'}).json['image_id']
    reader = {'Authorization': 'Bearer reader'}

    answer = client.post_json('/blobs/missing', {'ids': [image_id]}, headers=reader)
    assert answer.json == {'missing': []}
    assert client.get(f'/images/{image_id}?signature=stray', headers=reader).body == png
    # without a token, the signature is what is checked
    assert client.get(f'/images/{image_id}?signature=stray', status=403).json['title'] == 'Invalid signature'


@pytest.mark.parametrize(
    'params, says',
    [
        (['x=1'], 'not a derivative parameter'),
        (['w=abc'], 'must be an integer'),
        (['w=5000'], 'at most 4096'),
        (['w'], 'NAME=VALUE'),
        (['w=1', 'w=2'], 'once'),
        (['fit=cover', 'w=10'], 'give both w and h'),
        (['format=gif'], 'format must be one of'),
    ],
)
def test_sign_refuses_parameters_a_request_would_be_refused_for(tmp_path, monkeypatch, capsys, params, says):
    monkeypatch.setenv('ISS_SIGNING_KEY', 'the key')
    digest = 'sha256:' + '0' * 64

    assert cli.main(['--json', '--data', str(tmp_path), 'sign', digest, *params]) == cli.UNUSABLE
    assert says in json.loads(capsys.readouterr().err)['error']


def test_post_sign_refuses_parameters_a_request_would_be_refused_for(make_client, png):
    client = make_client(api_token='uploader', signing_key='key')
    image_id = upload_image(client, png, headers={'Authorization': 'Bearer uploader'}).json['image_id']
    for params in ({'w': 'abc'}, {'w': 0}, {'fit': 'stretch'}, {'format': 'gif'}):
        client.post_json(
            '/sign', {'id': image_id, 'params': params}, headers={'Authorization': 'Bearer uploader'}, status=400
        )


def test_fsck_refuses_a_directory_that_is_no_store_and_leaves_it_untouched(tmp_path, capsys):
    elsewhere = tmp_path / 'documents'
    elsewhere.mkdir()
    (elsewhere / 'letter.txt').write_text('dear ISS')

    assert cli.main(['--json', '--data', str(elsewhere), 'fsck']) == cli.UNUSABLE
    assert 'not an ISS data directory' in json.loads(capsys.readouterr().err)['error']
    assert [path.name for path in elsewhere.iterdir()] == ['letter.txt']
    empty = tmp_path / 'new'
    empty.mkdir()
    assert cli.main(['--json', '--data', str(empty), 'fsck']) == cli.OK  # an empty one is a new store


# -- the index after a kill: rows for every blob a killed commit named -------------------

KILLED_BETWEEN_BLOB_AND_ROW = """
import io, os, signal, sys
import storage
from iss_server import meta
from iss_server.config import Settings

store = storage.open_store(Settings(data_dir=sys.argv[1]))
store.start()
staged = store.stage(io.BytesIO(sys.argv[2].encode()))
# NOTE: the kill point: the blob and its meta are named, the index row (and the intent's end) is next
store.index.finish_puts = lambda rows, intent_ids: os.kill(os.getpid(), signal.SIGKILL)
store.commit(staged, meta.artifact('killed', staged.size, 'text/plain'))
"""


@pytest.mark.parametrize('repaired_by', ['the next start', 'gc'])
def test_a_blob_whose_commit_was_killed_before_its_row_is_indexed_without_an_operator(tmp_path, start, repaired_by):
    """After 93 worker kills the index lacked 437 blobs on disk, until someone ran fsck --repair."""
    data_dir = tmp_path / 'data'
    content = f'killed before its row ({repaired_by})'
    digest = 'sha256:' + hashlib.sha256(content.encode()).hexdigest()
    killed = subprocess.run([sys.executable, '-c', KILLED_BETWEEN_BLOB_AND_ROW, str(data_dir), content], cwd=HERE)
    assert killed.returncode == -signal.SIGKILL
    assert list((data_dir / 'blobs').rglob(digest[7:]))  # the blob is named, and no row says so

    # NOTE: the dead writer's intent is settled once older than the grace period (a live writer renews it)
    if repaired_by == 'gc':
        env = {**os.environ, 'ISS_RECONCILE_GRACE': '1'}
        time.sleep(1.1)
        gc = subprocess.run([sys.executable, '-m', 'iss', '--data', str(data_dir), 'gc'], cwd=HERE, env=env)
        assert gc.returncode == 0
        server = start(data_dir)
    else:
        server = start(data_dir, ISS_RECONCILE_GRACE='1', ISS_RECONCILE_INTERVAL='1')

    def listed() -> list[str]:
        return [item['id'] for item in json.loads(server.request('GET', '/artifacts?kind=killed')[2])['items']]

    wait_for(lambda: listed() == [digest], 20, 'the killed commit settled')
    assert json.loads(server.request('GET', '/stats')[2])['kinds']['killed']['count'] == 1
    assert not [path for path in (data_dir / 'tmp').iterdir() if path.is_file()]


def damage(index_file: pathlib.Path, how: str) -> None:
    """Damage the SQLite index in place (the same inode, as a failing disk would)."""
    # NOTE: the WAL's pages first, into the file: else they would mask the damage
    with contextlib.closing(sqlite3.connect(index_file)) as db:
        db.execute('PRAGMA wal_checkpoint(TRUNCATE)')
    with open(index_file, 'r+b') as file:
        if how == 'garbage':
            file.write(os.urandom(4096))  # NOTE: the header: SQLite says "file is not a database"
        else:
            size = index_file.stat().st_size
            for offset in range(4096, size, 512):  # NOTE: every page but the first: "malformed"
                file.seek(offset)
                file.write(b'\xff' * 16)


@pytest.mark.parametrize('how', ['garbage', 'pages'])
@pytest.mark.parametrize('when', ['stopped', 'running'])
def test_a_damaged_index_is_set_aside_and_rebuilt_from_the_files(start, how, when):
    """A damaged index.sqlite3 left the node answering 503 to every write and listing until someone moved it away."""
    server = start()
    stored = []
    for number in range(20):
        status, _, body = server.request('POST', '/artifacts?kind=kept', f'blob {number}'.encode())
        assert status == 201
        stored.append(json.loads(body)['artifact_id'])
    index_file = server.data_dir / 'index.sqlite3'
    if when == 'stopped':
        server.stop()
        damage(index_file, how)
        server = start(server.data_dir)
    else:
        time.sleep(1.5)  # NOTE: the index's idle connections close after a second
        damage(index_file, how)

    def listed() -> bool:
        status, _, body = server.request('GET', '/artifacts?kind=kept&limit=100')
        assert status in (200, 503), body  # NOTE: 503 while it is rebuilt, never a 500
        return status == 200 and sorted(item['id'] for item in json.loads(body)['items']) == sorted(stored)

    wait_for(listed, 15, 'the index rebuilt')
    assert server.request('POST', '/artifacts?kind=kept', b'after')[0] == 201
    assert server.request('GET', '/health')[0] == 200
    assert list(server.data_dir.glob('index.sqlite3.corrupt-*'))  # kept for a post-mortem


def test_headers_pipelined_in_part_behind_a_request_are_collected_like_any(start):
    """The part of a next request sent with the first went straight to a thread, to wait there for the rest."""
    server = start(ISS_HEADER_TIMEOUT='2', ISS_THREADS='1', ISS_WORKERS='1')
    client = socket.create_connection(('127.0.0.1', server.port), timeout=10)
    client.sendall(b'GET /health HTTP/1.1\r\nHost: iss\r\n\r\nGET /health HTTP/1.1\r\nX-Slow: 1\r\n')

    assert max(health_answers_within(server.port, 1.0, checks=4)) < 1.0  # the one thread is free
    answers = answer_of(client)
    assert answers.startswith(b'HTTP/1.1 200') and b'HTTP/1.1 408' in answers
