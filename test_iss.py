"""The ISS API through WebTest: every status and header a client depends on."""

from __future__ import annotations

import fcntl
import io
import json
import os
import pathlib
import re
import subprocess
import sys
import threading
import time
import urllib.parse

import falcon.inspect
import pytest
import webtest
import yaml
from openapi_spec_validator import validate
from PIL import Image

import iss
from iss_server import signing
from iss_server.config import ConfigError, Settings
from iss_testing.cli import upload_image
from iss_testing.data import MISSING, blob_id, file_store, files_under, make_png

# NOTE: every test here that takes a client runs on each store, unless marked file_store.
pytestmark = pytest.mark.both_stores

HERE = pathlib.Path(__file__).resolve().parent


def assert_nothing_stored(data_dir: pathlib.Path) -> None:
    assert files_under(data_dir) == [], 'a failed upload left files behind'


# -- uploading images -----------------------------------------------------------


@pytest.mark.file_store
def test_image_upload_stores_blob_and_seed_meta(client, data_dir, png):
    response = upload_image(client, png, 'photo.png')

    digest = blob_id(png)
    assert response.status_int == 201
    assert response.headers['Location'] == f'/images/{digest}'
    assert response.json['image_id'] == digest
    assert response.json['bytes'] == len(png)
    assert response.json['filename'] == 'photo.png'
    assert (response.json['width'], response.json['height'], response.json['mime']) == (100, 80, 'image/png')
    hex_digest = digest[7:]
    blob = data_dir / 'blobs' / hex_digest[:2] / hex_digest[2:4] / hex_digest
    meta_file = data_dir / 'meta' / hex_digest[:2] / hex_digest[2:4] / f'{hex_digest}.json'
    assert blob.read_bytes() == png
    meta = json.loads(meta_file.read_text())
    assert {k: meta[k] for k in ('kind', 'bytes', 'mime', 'width', 'height')} == {
        'kind': 'image',
        'bytes': len(png),
        'mime': 'image/png',
        'width': 100,
        'height': 80,
    }
    assert isinstance(meta['created_at'], float)
    # A reverse proxy running as another user must be able to read both.
    assert blob.stat().st_mode & 0o777 == 0o644
    assert meta_file.stat().st_mode & 0o777 == 0o644
    assert list((data_dir / 'tmp').iterdir()) == []


@pytest.mark.file_store
def test_same_image_twice_is_200_with_one_blob(client, data_dir, png):
    first = upload_image(client, png)
    second = upload_image(client, png, 'other-name.png')

    assert (first.status_int, second.status_int) == (201, 200)
    assert second.json['image_id'] == first.json['image_id']
    assert second.json['created_at'] == first.json['created_at']
    # the answer is the stored meta, the first upload's name included, and says so
    assert second.json['filename'] == 'x.png'
    assert (first.json['created'], second.json['created']) == (True, False)
    assert len(files_under(data_dir / 'blobs')) == 1


def test_raw_image_body_is_typed_by_its_bytes_not_the_claim(client, png):
    response = client.post('/images', png, headers={'Content-Type': 'image/gif'})

    assert response.status_int == 201
    assert response.json['mime'] == 'image/png'
    assert response.json['filename'] is None
    assert client.get(f'/images/{blob_id(png)}').content_type == 'image/png'


@pytest.mark.parametrize(
    'body, content_type',
    [
        (b'just some text, not an image', 'image/png'),
        (make_png()[:20], 'image/png'),  # a truncated header
        (b'', 'image/png'),
    ],
)
@pytest.mark.file_store
def test_bytes_that_are_not_an_image_get_415_pointing_to_artifacts(client, data_dir, body, content_type):
    response = client.post('/images', body, headers={'Content-Type': content_type}, status=415)

    assert '/artifacts' in response.json['description']
    assert_nothing_stored(data_dir / 'blobs')
    assert list((data_dir / 'tmp').iterdir()) == []


@pytest.mark.file_store
def test_multipart_non_image_gets_415_and_stores_nothing(client, data_dir):
    response = client.post('/images', upload_files=[('file', 'a.txt', b'hello', 'text/plain')], status=415)

    assert response.json['title'] == 'Not an image'
    assert_nothing_stored(data_dir / 'blobs')


def test_raw_image_upload_needs_an_image_content_type(client, png):
    response = client.post('/images', png, headers={'Content-Type': 'application/octet-stream'}, status=415)

    assert 'multipart/form-data' in response.json['description']


def png_declaring(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares width x height: a decompression bomb when large."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))

    header = struct.pack('>IIBBBBB', width, height, 8, 2, 0, 0, 0)
    return b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', header) + chunk(b'IDAT', zlib.compress(b'')) + chunk(b'IEND', b'')


@pytest.mark.file_store
def test_decompression_bomb_is_refused_without_decoding(client, data_dir):
    bomb = png_declaring(200_000, 200_000)  # 40 gigapixels in 57 bytes

    response = client.post('/images', bomb, headers={'Content-Type': 'image/png'}, status=413)

    assert response.json['title'] == 'Image too large'
    # NOTE: in ISS's words, naming its limit (Pillow's own check spoke of twice its default)
    assert response.json['description'] == (
        '200000x200000 is 40000000000 pixels; this service decodes at most 89478485 (ISS_MAX_IMAGE_PIXELS)'
    )
    assert_nothing_stored(data_dir / 'blobs')


def test_the_pixel_limit_is_iss_max_image_pixels_even_above_pillows_own(make_client):
    """Pillow refuses more than twice its default (178,956,970 pixels) by itself, whatever ISS was told."""
    client = make_client(max_image_pixels=200_000_000)
    big = png_declaring(15_000, 12_000)  # 180 megapixels

    response = client.post('/images', big, headers={'Content-Type': 'image/png'}, status=201)

    assert (response.json['width'], response.json['height']) == (15_000, 12_000)
    refused = client.post('/images', png_declaring(15_000, 14_000), headers={'Content-Type': 'image/png'}, status=413)
    assert refused.json['description'].endswith('at most 200000000 (ISS_MAX_IMAGE_PIXELS)')


# -- malformed forms ------------------------------------------------------------


def multipart(*parts: tuple[str, str | None, bytes], boundary: str = 'XyZ') -> tuple[bytes, str]:
    chunks = []
    for name, filename, data in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else '')
        chunks.append(f'--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n'.encode() + data + b'\r\n')
    return b''.join(chunks) + f'--{boundary}--\r\n'.encode(), f'multipart/form-data; boundary={boundary}'


@pytest.mark.parametrize(
    'body, content_type, title',
    [
        (multipart(('other', None, b'x'))[0], multipart()[1], 'No file'),
        (multipart(('file', 'a.png', make_png()))[0], 'multipart/form-data', 'Invalid header value'),
        (
            multipart(('file', 'a.png', make_png()))[0][:-40],
            multipart()[1],
            'Malformed multipart/form-data request media',
        ),
        (b'no boundary anywhere', multipart()[1], 'Malformed multipart/form-data request media'),
    ],
    ids=['no-file-part', 'no-boundary-parameter', 'missing-closing-boundary', 'garbage'],
)
@pytest.mark.file_store
def test_malformed_forms_get_400_and_store_nothing(client, data_dir, body, content_type, title):
    response = client.post('/images', body, headers={'Content-Type': content_type}, status=400)

    assert response.json['title'] == title
    assert_nothing_stored(data_dir / 'blobs')
    assert list((data_dir / 'tmp').iterdir()) == []


# Bytes that look like the start of a delimiter (\r\n--XyZ) every 13 bytes, so that whatever
# the read sizes, some are cut in two where one read of the body ends and the next begins
# (none is the delimiter itself: the byte after "Xy" is never a "Z").
NEAR_DELIMITERS = b''.join(b'\r\n--Xy' + bytes([i % 80]) * 6 for i in range(3 * 1024 * 1024 // 13))


@pytest.mark.parametrize(
    'preamble, padding, data, epilogue',
    [
        (b'', b'', NEAR_DELIMITERS, b''),
        (b'This is a preamble.\r\n', b' \t ', b'--XyZ in the middle, not after a line break', b'\r\nan epilogue'),
        (b'', b'', b'\r\n\r\n--\r\n', b''),
        (b'', b'', b'', b''),
    ],
    ids=['near-delimiters', 'preamble-padding-epilogue', 'line-breaks-only', 'empty-file'],
)
def test_well_formed_forms_store_the_file_byte_for_byte(client, preamble, padding, data, epilogue):
    body = (
        preamble
        + b'--XyZ'
        + padding
        + b'\r\nContent-Disposition: form-data; name="kind"\r\n\r\nsample\r\n--XyZ'
        + padding
        + b'\r\nContent-Disposition: form-data; name="file"; filename="d.bin"\r\n'
        + b'Content-Type: application/octet-stream\r\n\r\n'
        + data
        + b'\r\n--XyZ--'
        + epilogue
    )

    response = client.post('/artifacts', body, headers={'Content-Type': 'multipart/form-data; boundary=XyZ'})

    assert response.json['artifact_id'] == blob_id(data)
    assert response.json['kind'] == 'sample'
    assert client.get(f'/artifacts/{blob_id(data)}').body == data


def test_a_form_filename_in_rfc_5987_form_is_decoded(client):
    body = (
        b'--XyZ\r\nContent-Disposition: form-data; name="file"; filename*=UTF-8\'\'%C3%A9t%C3%A9.bin\r\n\r\n'
        b'summer\r\n--XyZ--\r\n'
    )

    response = client.post('/artifacts?kind=k', body, headers={'Content-Type': 'multipart/form-data; boundary=XyZ'})

    assert response.json['filename'] == '\u00e9t\u00e9.bin'


@pytest.mark.parametrize(
    'body, description',
    [
        (b'--XyZ junk\r\nContent-Disposition: form-data; name="file"\r\n\r\nx\r\n--XyZ--', 'line break'),
        (b'--XyZ\r\nContent-Disposition form-data\r\n\r\nx\r\n--XyZ--', 'colon'),
        (b'--XyZ\r\nContent-Disposition: form-data; name="kind"\r\n\r\n' + b'k' * 20000 + b'\r\n--XyZ--', 'over'),
    ],
    ids=['text-after-boundary', 'header-without-colon', 'huge-field'],
)
@pytest.mark.file_store
def test_forms_broken_between_parts_get_400(client, data_dir, body, description):
    headers = {'Content-Type': 'multipart/form-data; boundary=XyZ'}

    response = client.post('/artifacts', body, headers=headers, status=400)

    assert response.json['title'] == 'Malformed multipart/form-data request media'
    assert description in response.json['description']
    assert_nothing_stored(data_dir / 'blobs')
    assert list((data_dir / 'tmp').iterdir()) == []


@pytest.mark.file_store
def test_huge_part_headers_get_400(client, data_dir):
    filler = b'X-Filler: ' + b'a' * 20000
    body = b'--XyZ\r\nContent-Disposition: form-data; name="file"\r\n' + filler + b'\r\n\r\nx\r\n--XyZ--\r\n'

    response = client.post('/images', body, headers={'Content-Type': 'multipart/form-data; boundary=XyZ'}, status=400)

    assert 'headers' in response.json['description']
    assert_nothing_stored(data_dir / 'blobs')


def test_too_many_form_parts_get_400(client):
    """Besides its files, a form carries a few short fields; a form of many other parts is refused."""
    body, content_type = multipart(*[(f'f{i}', None, b'x') for i in range(20)], ('file', 'a.png', make_png()))

    response = client.post('/images', body, headers={'Content-Type': content_type}, status=400)

    assert 'maximum number' in response.json['description']


# -- batch uploads: several files in one form -------------------------------------


@pytest.mark.file_store
def test_a_form_of_several_files_stores_each_and_answers_each_in_order(client, data_dir):
    pngs = [make_png(10 + i, 10) for i in range(3)]
    body, content_type = multipart(
        *[('file', f'p{i}.png', data) for i, data in enumerate(pngs)], ('file', 'again.png', pngs[0])
    )

    response = client.post('/images', body, headers={'Content-Type': content_type}, status=201)

    answers = response.json
    assert [answer['image_id'] for answer in answers] == [blob_id(data) for data in [*pngs, pngs[0]]]
    assert [answer['status'] for answer in answers] == [201, 201, 201, 200]
    assert [answer['created'] for answer in answers] == [True, True, True, False]
    assert [answer['filename'] for answer in answers] == ['p0.png', 'p1.png', 'p2.png', 'p0.png']
    assert [answer['width'] for answer in answers] == [10, 11, 12, 10]
    for data in pngs:
        assert client.get(f'/images/{blob_id(data)}').body == data
    assert sorted(item['id'] for item in client.get('/images').json['items']) == sorted(map(blob_id, pngs))
    assert list((data_dir / 'tmp').iterdir()) == []


def test_a_batch_of_files_all_stored_already_is_200(client):
    pngs = [make_png(20 + i, 10) for i in range(2)]
    body, content_type = multipart(*[('file', f'p{i}.png', data) for i, data in enumerate(pngs)])
    client.post('/images', body, headers={'Content-Type': content_type}, status=201)

    response = client.post('/images', body, headers={'Content-Type': content_type}, status=200)

    assert [answer['status'] for answer in response.json] == [200, 200]


@pytest.mark.file_store
def test_a_refused_file_of_a_batch_is_its_own_error_and_the_others_are_stored(client, data_dir):
    first, last = make_png(30, 10), make_png(31, 10)
    body, content_type = multipart(
        ('file', 'a.png', first), ('file', 'notes.txt', b'not an image'), ('file', 'c.png', last)
    )

    response = client.post('/images', body, headers={'Content-Type': content_type}, status=207)

    answers = response.json
    assert [answer['status'] for answer in answers] == [201, 415, 201]
    assert answers[1]['title'] == 'Not an image'
    assert answers[1]['filename'] == 'notes.txt'
    assert 'image_id' not in answers[1]
    assert client.get(f'/images/{blob_id(first)}').body == first
    assert client.get(f'/images/{blob_id(last)}').body == last
    client.get(f'/images/{blob_id(b"not an image")}', status=404)
    assert len(files_under(data_dir / 'blobs')) == 2
    assert list((data_dir / 'tmp').iterdir()) == []


def test_a_batch_of_artifacts_shares_the_kind_and_meta_of_the_request(client):
    body, content_type = multipart(('file', 'a.bin', b'one'), ('file', 'b.bin', b'two'), ('meta', None, b'{"run": 7}'))

    response = client.post('/artifacts?kind=weights', body, headers={'Content-Type': content_type}, status=201)

    assert [answer['artifact_id'] for answer in response.json] == [blob_id(b'one'), blob_id(b'two')]
    for data, name in ((b'one', 'a.bin'), (b'two', 'b.bin')):
        stored = client.get(f'/artifacts/{blob_id(data)}/meta').json
        assert (stored['kind'], stored['run'], stored['filename']) == ('weights', 7, name)


@pytest.mark.file_store
def test_a_batch_whose_request_is_wrong_stores_none_of_its_files(client, data_dir):
    body, content_type = multipart(('file', 'a.bin', b'one'), ('file', 'b.bin', b'two'))

    response = client.post('/artifacts?kind=no%20spaces', body, headers={'Content-Type': content_type}, status=400)

    assert response.json['title'] == 'Invalid kind'
    assert_nothing_stored(data_dir / 'blobs')
    assert list((data_dir / 'tmp').iterdir()) == []


@pytest.mark.file_store
def test_a_batch_of_more_files_than_allowed_is_413_and_stores_nothing(make_client, data_dir):
    client = make_client(max_batch_files=3)
    body, content_type = multipart(*[('file', f'{i}.bin', b'%d' % i) for i in range(4)])

    response = client.post('/artifacts?kind=x', body, headers={'Content-Type': content_type}, status=413)

    assert response.json['title'] == 'Too many files'
    assert 'at most 3 files' in response.json['description']
    assert_nothing_stored(data_dir / 'blobs')
    assert list((data_dir / 'tmp').iterdir()) == []
    body, content_type = multipart(*[('file', f'{i}.bin', b'%d' % i) for i in range(3)])
    client.post('/artifacts?kind=x', body, headers={'Content-Type': content_type}, status=201)


@pytest.mark.file_store
def test_a_batch_larger_than_the_upload_limit_is_413_and_stores_nothing(make_client, data_dir):
    client = make_client(max_upload_bytes=10_000)
    body, content_type = multipart(*[('file', f'{i}.bin', os.urandom(4000)) for i in range(3)])

    response = client.post('/artifacts?kind=x', body, headers={'Content-Type': content_type}, status=413)

    assert response.json['title'] == 'Upload too large'
    assert_nothing_stored(data_dir / 'blobs')
    assert list((data_dir / 'tmp').iterdir()) == []


@pytest.mark.file_store
def test_a_put_takes_one_file(client, data_dir, png):
    body, content_type = multipart(('file', 'a.png', png), ('file', 'b.png', make_png(5, 5)))

    response = client.put(f'/images/{blob_id(png)}', body, headers={'Content-Type': content_type}, status=400)

    assert response.json['title'] == 'Two files'
    assert_nothing_stored(data_dir / 'blobs')


def test_a_group_of_new_uploads_costs_three_flushes_whatever_its_size(data_dir):
    """The disk is flushed for the staged bytes, the blobs' names and the metas' names: not per upload."""
    store = file_store(data_dir)
    contents = [os.urandom(100) for _ in range(50)]
    before = store.layout.flush.count

    committed = store.commit_all([(store.stage(io.BytesIO(data)), {'kind': 'x'}) for data in contents])

    assert store.layout.flush.count - before == 3
    assert all(outcome.created for outcome in committed)
    assert sorted(path.name for path in files_under(data_dir / 'blobs')) == sorted(blob_id(d)[7:] for d in contents)
    again = store.layout.flush.count
    store.commit_all([(store.stage(io.BytesIO(data)), {'kind': 'x'}) for data in contents])
    assert store.layout.flush.count == again, 'content already stored needs no flush'


def test_a_flush_asked_for_while_one_runs_is_a_later_one_shared_by_all_who_waited(data_dir):
    """Group commit: a writer never trusts a flush that began before it asked; the next serves every waiter."""
    store = file_store(data_dir)
    flusher = store.layout.flush
    flushes: list[tuple[float, float]] = []
    real_flush = flusher._flush

    def slow_flush():
        started = time.monotonic()
        time.sleep(0.2)
        real_flush()
        flushes.append((started, time.monotonic()))

    flusher._flush = slow_flush
    first = threading.Thread(target=flusher)
    first.start()
    time.sleep(0.05)  # the first flush is running
    asked: list[float] = []
    returned: list[float] = []

    def wait_for_durability():
        asked.append(time.monotonic())
        flusher()
        returned.append(time.monotonic())

    waiters = [threading.Thread(target=wait_for_durability) for _ in range(8)]
    for waiter in waiters:
        waiter.start()
    for thread in (first, *waiters):
        thread.join(5)

    assert len(flushes) == 2, 'the eight waiters shared one flush'
    second_start, second_end = flushes[1]
    assert second_start >= max(asked) and min(returned) >= second_end


def test_concurrent_commits_share_their_flushes(data_dir):
    store = file_store(data_dir)
    real_flush = store.layout.flush._flush
    store.layout.flush._flush = lambda: (time.sleep(0.05), real_flush())  # a slow disk: commits pile up
    staged = [store.stage(io.BytesIO(os.urandom(100))) for _ in range(16)]
    start = threading.Barrier(16)
    committed = []

    def commit(one):
        start.wait()
        committed.append(store.commit(one, {'kind': 'x'}))

    threads = [threading.Thread(target=commit, args=(one,)) for one in staged]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)

    assert [outcome.created for outcome in committed] == [True] * 16
    assert store.layout.flush.count <= 9, f'{store.layout.flush.count} flushes for 16 commits (48 unshared)'
    assert len(files_under(data_dir / 'meta')) == 16


def test_groups_sharing_content_in_opposite_orders_never_wait_for_each_other(data_dir):
    """Every blob of a group stays held until its row is written; taken in id order, two groups cannot deadlock."""
    store = file_store(data_dir)
    contents = [os.urandom(64) for _ in range(20)]
    outcomes: list[list] = []

    def commit(order: list[bytes]) -> None:
        outcomes.append(store.commit_all([(store.stage(io.BytesIO(data)), {'kind': 'x'}) for data in order]))

    for _ in range(10):
        threads = [threading.Thread(target=commit, args=(order,)) for order in (contents, contents[::-1])]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(20)
        assert not any(thread.is_alive() for thread in threads), 'two groups waited for each other'
        for data in contents:
            store.delete(blob_id(data))
    created = [sum(outcome.created for outcome in group) for group in outcomes]
    assert [a + b for a, b in zip(created[::2], created[1::2], strict=True)] == [20] * 10


# -- artifacts ------------------------------------------------------------------


@pytest.mark.file_store
def test_artifact_query_parameters_like_the_seed(client, data_dir):
    data = b'test artifact data'
    response = client.post(
        '/artifacts?kind=test_artifact&meta=' + json.dumps({'test_key': 'test_value'}),
        upload_files=[('file', 'test_artifact.txt', data, 'text/plain')],
    )

    assert response.status_int == 201
    assert response.json['artifact_id'] == blob_id(data)
    assert response.json['kind'] == 'test_artifact'
    assert response.headers['Location'] == f'/artifacts/{blob_id(data)}'
    meta = client.get(f'/artifacts/{blob_id(data)}/meta').json
    assert meta['test_key'] == 'test_value'
    assert meta['kind'] == 'test_artifact'
    assert meta['bytes'] == len(data)
    assert client.get(f'/artifacts/{blob_id(data)}').body == data


def test_kind_and_meta_may_come_as_form_fields_after_the_file(client):
    body, content_type = multipart(
        ('file', 'w.bin', b'\x00weights'), ('kind', None, b'model'), ('meta', None, b'{"epoch": 3}')
    )

    response = client.post('/artifacts', body, headers={'Content-Type': content_type})

    assert response.status_int == 201
    assert response.json['kind'] == 'model'
    assert client.get(f'/artifacts/{response.json["artifact_id"]}/meta').json['epoch'] == 3


@pytest.mark.file_store
def test_kind_given_in_query_and_form_is_400(client, data_dir):
    body, content_type = multipart(('kind', None, b'bad kind!'), ('file', 'w.bin', b'weights'))

    response = client.post('/artifacts?kind=model', body, headers={'Content-Type': content_type}, status=400)

    assert response.json['title'] == 'Repeated kind'
    assert_nothing_stored(data_dir / 'blobs')


@pytest.mark.parametrize(
    'query, description',
    [
        ('', 'kind is required'),
        ('kind=', 'kind is required'),
        ('kind=has%20space', 'kind is required'),
        ('kind=' + 'k' * 65, 'kind is required'),
        ('kind=ok&meta=not-json', 'meta is not JSON'),
        ('kind=ok&meta=[1,2]', 'meta must be a JSON object'),
        ('kind=ok&meta="text"', 'meta must be a JSON object'),
        ('kind=ok&meta={"a":NaN}', 'meta is not JSON'),
        ('kind=ok&meta={"kind":"other"}', 'keys ISS owns: kind'),
        ('kind=ok&meta={"bytes":1,"created_at":2}', 'keys ISS owns: bytes, created_at'),
        ('kind=ok&meta=' + '[' * 5000 + ']' * 5000, 'meta is not JSON'),
        ('kind=ok&meta={"a":"' + 'x' * 17000 + '"}', 'meta is larger than 16384 bytes'),
    ],
)
@pytest.mark.file_store
def test_bad_kind_or_meta_gets_400_before_anything_is_stored(client, data_dir, query, description):
    response = client.post(
        f'/artifacts?{query}', upload_files=[('file', 'a.bin', b'payload', 'application/octet-stream')], status=400
    )

    assert description in response.json['description']
    assert_nothing_stored(data_dir / 'blobs')


@pytest.mark.file_store
def test_bad_kind_in_a_form_field_after_the_file_stores_nothing(client, data_dir):
    body, content_type = multipart(('file', 'w.bin', b'weights'), ('kind', None, b'bad kind!'))

    client.post('/artifacts', body, headers={'Content-Type': content_type}, status=400)

    assert_nothing_stored(data_dir / 'blobs')
    assert list((data_dir / 'tmp').iterdir()) == []


@pytest.mark.parametrize(
    'declared, served',
    [
        ('text/csv; charset=utf-8', 'text/csv; charset=utf-8'),
        ('Application/JSON', 'application/json'),
        (None, 'application/octet-stream'),
        ('application/x-www-form-urlencoded', 'application/octet-stream'),  # curl --data-binary's default
        ('not a type', 'application/octet-stream'),
        ('text/plain; charset="x\r\nSet-Cookie: a=b"', 'text/plain; charset=x'),
    ],
)
def test_raw_artifact_is_served_with_its_declared_type(client, declared, served):
    headers = {'Content-Type': declared} if declared else {}
    data = f'body for {declared}'.encode()
    if declared is None:
        # webtest sets a form type for bodies without one; send no header at all.
        response = client.request('/artifacts?kind=raw', method='POST', body=data, content_type='')
    else:
        response = client.post('/artifacts?kind=raw', data, headers=headers)

    assert response.status_int == 201
    assert response.json['mime'] == served
    assert client.get(f'/artifacts/{blob_id(data)}').headers['Content-Type'] == served


def test_content_uploaded_twice_keeps_its_first_kind(client):
    client.post('/artifacts?kind=first', b'same bytes', headers={'Content-Type': 'text/plain'})

    response = client.post('/artifacts?kind=second', b'same bytes', headers={'Content-Type': 'text/plain'})

    assert response.status_int == 200
    assert response.json['kind'] == 'first'


# -- PUT under a claimed id -----------------------------------------------------


@pytest.mark.file_store
def test_put_artifact_verifies_the_claimed_digest(client, data_dir):
    data = os.urandom(10_000)

    created = client.put(f'/artifacts/{blob_id(data)}?kind=model', data)
    again = client.put(f'/artifacts/{blob_id(data)}?kind=model', data)

    assert (created.status_int, again.status_int) == (201, 200)
    assert created.json['artifact_id'] == blob_id(data)
    assert created.headers['Location'] == f'/artifacts/{blob_id(data)}'
    assert client.get(f'/artifacts/{blob_id(data)}').body == data


@pytest.mark.file_store
def test_put_with_a_wrong_digest_is_400_and_stores_nothing(client, data_dir):
    response = client.put(f'/artifacts/{MISSING}?kind=model', b'other bytes', status=400)

    assert response.json['title'] == 'Digest mismatch'
    assert blob_id(b'other bytes') in response.json['description']
    assert_nothing_stored(data_dir / 'blobs')
    assert list((data_dir / 'tmp').iterdir()) == []


@pytest.mark.parametrize('path', ['/artifacts/sha256:abc?kind=m', '/images/SHA256:' + 'A' * 64, '/images/md5:00'])
def test_put_under_a_malformed_id_is_404_like_every_route_that_takes_an_id(client, path):
    response = client.put(path, b'x', status=404)

    assert response.json['title'] == 'Malformed id'


def test_put_artifact_needs_a_kind(client):
    client.put(f'/artifacts/{blob_id(b"x")}', b'x', status=400)


def test_put_image_must_be_an_image(client, png):
    assert client.put(f'/images/{blob_id(png)}', png).status_int == 201
    client.put(f'/images/{blob_id(b"text")}', b'text', status=415)


# -- downloads ------------------------------------------------------------------


def test_download_headers(client, png):
    digest = upload_image(client, png).json['image_id']

    response = client.get(f'/images/{digest}')

    assert response.body == png
    assert response.headers['Content-Type'] == 'image/png'
    assert response.headers['Content-Length'] == str(len(png))
    assert response.headers['ETag'] == f'"{digest}"'
    assert response.headers['Cache-Control'] == 'public, max-age=31536000, immutable'
    assert response.headers['Accept-Ranges'] == 'bytes'
    assert response.headers['X-Content-Type-Options'] == 'nosniff'
    assert 'sandbox' in response.headers['Content-Security-Policy']
    assert response.headers['Content-Disposition'] == 'inline; filename="x.png"'


def test_head_has_the_headers_of_get_and_no_body(client, png):
    digest = upload_image(client, png).json['image_id']

    get = client.get(f'/images/{digest}', headers={'X-Request-Id': 'same'})
    head = client.head(f'/images/{digest}', headers={'X-Request-Id': 'same'})

    assert head.status_int == 200
    assert head.body == b''
    assert dict(head.headers) == dict(get.headers)


def test_either_door_serves_any_blob(client, png):
    image = upload_image(client, png).json['image_id']
    artifact = client.post('/artifacts?kind=k', b'data', headers={'Content-Type': 'text/plain'}).json['artifact_id']

    assert client.get(f'/artifacts/{image}').body == png
    assert client.get(f'/images/{artifact}').body == b'data'
    assert client.get(f'/artifacts/{image}/meta').json['kind'] == 'image'


@pytest.mark.parametrize(
    'range_header, status, content_range, part',
    [
        ('bytes=0-9', 206, 'bytes 0-9/1000', slice(0, 10)),
        ('bytes=990-', 206, 'bytes 990-999/1000', slice(990, 1000)),
        ('bytes=-5', 206, 'bytes 995-999/1000', slice(995, 1000)),
        ('bytes=-5000', 206, 'bytes 0-999/1000', slice(0, 1000)),
        ('bytes=500-100000', 206, 'bytes 500-999/1000', slice(500, 1000)),
        ('BYTES=1-1', 206, 'bytes 1-1/1000', slice(1, 2)),
        ('bytes=0-1,5-6', 200, None, slice(0, 1000)),  # several ranges: ignored
        ('bytes=9-2', 200, None, slice(0, 1000)),  # invalid: ignored
        ('pages=1-2', 200, None, slice(0, 1000)),
        ('bytes=abc', 200, None, slice(0, 1000)),
        ('bytes=-', 200, None, slice(0, 1000)),
        ('bytes=' + '9' * 40 + '-', 200, None, slice(0, 1000)),
    ],
)
def test_range_requests(client, range_header, status, content_range, part):
    data = os.urandom(1000)
    client.post('/artifacts?kind=r', data, headers={'Content-Type': 'application/octet-stream'})

    response = client.get(f'/artifacts/{blob_id(data)}', headers={'Range': range_header})

    assert response.status_int == status
    assert response.headers.get('Content-Range') == content_range
    assert response.body == data[part]
    assert response.headers['Content-Length'] == str(len(data[part]))


@pytest.mark.parametrize('range_header', ['bytes=1000-', 'bytes=5000-6000', 'bytes=-0'])
def test_unsatisfiable_range_is_416(client, range_header):
    data = os.urandom(1000)
    client.post('/artifacts?kind=r', data, headers={'Content-Type': 'application/octet-stream'})

    response = client.get(f'/artifacts/{blob_id(data)}', headers={'Range': range_header}, status=416)

    assert response.headers['Content-Range'] == 'bytes */1000'
    assert response.content_type == 'application/json'


def test_if_range_honours_the_range_only_for_our_etag(client):
    data = os.urandom(100)
    digest = client.post('/artifacts?kind=r', data, headers={'Content-Type': 'text/plain'}).json['artifact_id']

    matching = client.get(f'/artifacts/{digest}', headers={'Range': 'bytes=0-9', 'If-Range': f'"{digest}"'})
    stale = client.get(f'/artifacts/{digest}', headers={'Range': 'bytes=0-9', 'If-Range': '"other"'})

    assert (matching.status_int, stale.status_int) == (206, 200)
    assert stale.body == data


@pytest.mark.parametrize(
    'if_none_match, status',
    [('"{id}"', 304), ('W/"{id}"', 304), ('"other", "{id}"', 304), ('*', 304), ('"other"', 200), ('garbage', 200)],
)
def test_if_none_match(client, png, if_none_match, status):
    digest = upload_image(client, png).json['image_id']

    response = client.get(f'/images/{digest}', headers={'If-None-Match': if_none_match.format(id=digest)})

    assert response.status_int == status
    assert response.headers['ETag'] == f'"{digest}"'
    assert response.headers['Cache-Control'] == 'public, max-age=31536000, immutable'
    if status == 304:
        assert response.body == b''


def test_if_none_match_star_does_not_hide_a_missing_blob(client):
    client.get(f'/images/{MISSING}', headers={'If-None-Match': '*'}, status=404)


@pytest.mark.parametrize(
    'mime',
    [
        'text/html',
        'image/svg+xml',
        'application/xhtml+xml',
        'text/javascript',
        'application/rss+xml',
        'application/rss+xml; charset=utf-8',
    ],
)
def test_active_content_is_served_so_it_cannot_run(client, mime):
    data = b'<script>alert(document.cookie)</script>' + mime.encode()
    client.post('/artifacts?kind=page', data, headers={'Content-Type': mime})

    response = client.get(f'/artifacts/{blob_id(data)}')

    assert response.headers['Content-Type'] == mime
    assert response.headers['Content-Disposition'].startswith('attachment; filename=')
    assert "default-src 'none'" in response.headers['Content-Security-Policy']
    assert 'sandbox' in response.headers['Content-Security-Policy']
    assert response.headers['X-Content-Type-Options'] == 'nosniff'


@pytest.mark.file_store
def test_with_nginx_in_front_full_gets_are_handed_off_with_our_headers(make_client, png):
    client = make_client(accel_redirect='/_internal/blobs/', accel_min_bytes=len(png))
    digest = upload_image(client, png).json['image_id']
    small = client.post('/artifacts?kind=k', png[:-1], headers={'Content-Type': 'text/plain'}).json['artifact_id']
    hex_digest = digest[7:]

    get = client.get(f'/images/{digest}')
    ranged = client.get(f'/images/{digest}', headers={'Range': 'bytes=0-9'})
    head = client.head(f'/images/{digest}')

    for response in (get, ranged):
        assert response.status_int == 200  # nginx cuts the range
        assert (
            response.headers['X-Accel-Redirect'] == f'/_internal/blobs/{hex_digest[:2]}/{hex_digest[2:4]}/{hex_digest}'
        )
        assert response.body == b''
        assert response.headers['ETag'] == f'"{digest}"'
        assert response.headers['Content-Type'] == 'image/png'
    assert 'X-Accel-Redirect' not in head.headers
    assert head.headers['Content-Length'] == str(len(png))
    # Below accel_min_bytes ISS sends the bytes itself, so that nginx can cache them.
    below = client.get(f'/artifacts/{small}')
    assert 'X-Accel-Redirect' not in below.headers
    assert below.body == png[:-1]
    client.get(f'/images/{digest}', headers={'If-None-Match': f'"{digest}"'}, status=304)
    client.get(f'/images/{digest}', headers={'Range': f'bytes={len(png)}-'}, status=416)
    client.get(f'/images/{MISSING}', status=404)


# -- not found ------------------------------------------------------------------


@pytest.mark.parametrize('door', ['images', 'artifacts'])
def test_absent_blob_is_404_saying_so(client, door):
    response = client.get(f'/{door}/{MISSING}', status=404)

    assert response.json['title'] == 'Blob not found'
    assert MISSING in response.json['description']


@pytest.mark.parametrize(
    'path',
    [
        '/images/sha256:nonexistentimageid',  # the seed's own test
        '/artifacts/sha256:nonexistentartifactid',
        '/images/sha256:' + 'A' * 64,
        '/images/' + 'a' * 64,
        '/images/sha256:' + 'a' * 65,
        '/images/..%2f..%2fetc%2fpasswd',
        '/images/%00',
        '/images/sha256:%C3%A9' + 'a' * 62,
        '/images/' + 'x' * 5000,
    ],
)
def test_malformed_id_is_404_saying_it_is_malformed(client, path):
    response = client.get(path, status=404)

    assert response.json['title'] in {'Malformed id', '404 Not Found'}
    assert response.content_type == 'application/json'


def test_head_and_meta_of_absent_blob_are_404(client):
    client.head(f'/images/{MISSING}', status=404)
    client.get(f'/images/{MISSING}/meta', status=404)
    client.get('/artifacts/bogus/meta', status=404)


# -- errors are JSON, always ----------------------------------------------------


@pytest.mark.parametrize(
    'method, path, status',
    [
        ('DELETE', '/stats', 405),
        ('POST', '/health', 405),
        ('PATCH', '/images', 405),
        ('GET', '/nowhere', 404),
        ('PUT', '/images', 405),
    ],
)
def test_routing_errors_are_json_even_for_clients_asking_for_images(client, method, path, status):
    response = client.request(path, method=method, headers={'Accept': 'image/*'}, status=status)

    assert response.content_type == 'application/json'
    assert response.json['status'] == status
    assert 'detail' in response.json


@pytest.mark.parametrize(
    'method, path, headers, status, words',
    [
        ('GET', '/nowhere', {}, 404, '/nowhere'),
        ('DELETE', '/stats', {}, 405, 'GET'),
        ('GET', f'/images/{blob_id(make_png())}', {'Range': 'bytes=999999-'}, 416, str(len(make_png()))),
    ],
)
def test_falcons_own_errors_have_every_documented_key(client, png, method, path, headers, status, words):
    upload_image(client, png)

    response = client.request(path, method=method, headers=headers, status=status)

    assert set(response.json) >= {'title', 'description', 'status', 'detail'}
    assert response.json['status'] == status
    assert words in response.json['description']
    assert response.json['detail'] == response.json['description']


_MALFORMED = 'sha256:' + 'A' * 64


@pytest.mark.parametrize(
    'method, path',
    [
        ('GET', f'/images/{_MALFORMED}'),
        ('HEAD', f'/images/{_MALFORMED}'),
        ('GET', f'/artifacts/{_MALFORMED}'),
        ('GET', f'/images/{_MALFORMED}?w=10'),
        ('GET', f'/images/{_MALFORMED}/meta'),
        ('GET', f'/artifacts/{_MALFORMED}/meta'),
        ('PUT', f'/images/{_MALFORMED}'),
        ('PUT', f'/artifacts/{_MALFORMED}?kind=k'),
        ('DELETE', f'/images/{_MALFORMED}'),
        ('DELETE', f'/artifacts/{_MALFORMED}'),
    ],
)
def test_a_malformed_id_is_answered_alike_on_every_route_that_takes_one(make_client, method, path):
    client = make_client(admin_token='admin')

    response = client.request(
        path, method=method, body=b'x', headers={'Authorization': 'Bearer admin'}, expect_errors=True
    )

    assert response.status_int == 404
    if method != 'HEAD':
        assert response.json['title'] == 'Malformed id'
        assert 'sha256:<64 lowercase hex digits>' in response.json['description']


def test_a_malformed_id_in_a_body_is_400(client):
    response = client.post_json('/blobs/missing', {'ids': [_MALFORMED]}, status=400)

    assert response.json['title'] == 'Malformed id'


@pytest.mark.file_store
def test_declared_body_over_the_limit_is_413_before_reading(make_client, data_dir, png):
    client = make_client(max_upload_bytes=len(png) - 1)

    response = upload_image(client, png, status=413)

    assert response.json['title'] == 'Upload too large'
    assert_nothing_stored(data_dir / 'blobs')
    assert list((data_dir / 'tmp').iterdir()) == []


@pytest.mark.file_store
def test_body_shorter_than_declared_is_400(client, data_dir):
    response = client.request(
        '/artifacts?kind=x',
        method='POST',
        body=b'short',
        headers={'Content-Length': '100', 'Content-Type': 'text/plain'},
        status=400,
    )

    assert response.json['title'] == 'Incomplete request body'
    assert_nothing_stored(data_dir / 'blobs')
    assert list((data_dir / 'tmp').iterdir()) == []


def test_body_without_length_is_411_when_the_server_does_not_delimit_it(client):
    request = webtest.TestRequest.blank('/artifacts?kind=x', method='POST', headers={'Transfer-Encoding': 'chunked'})
    request.environ.pop('CONTENT_LENGTH', None)  # and no wsgi.input_terminated, unlike gunicorn

    response = client.do_request(request, status=411)

    assert response.json['title'] == 'Length required'


# -- names ----------------------------------------------------------------------


def test_the_first_uploads_name_is_kept_and_downloads_are_saved_under_it(client, png):
    digest = upload_image(client, png, 'holiday.png').json['image_id']
    upload_image(client, png, 'renamed.png')

    assert client.get(f'/images/{digest}/meta').json['filename'] == 'holiday.png'
    assert client.get(f'/images/{digest}').headers['Content-Disposition'] == 'inline; filename="holiday.png"'
    assert client.head(f'/images/{digest}').headers['Content-Disposition'] == 'inline; filename="holiday.png"'
    derived = client.get(f'/images/{digest}?w=10&format=webp')
    assert derived.headers['Content-Disposition'] == 'inline; filename="holiday-10x-contain-q80.webp"'
    assert client.get('/images').json['items'][0]['filename'] == 'holiday.png'


def test_a_put_names_its_file_with_the_filename_parameter(client):
    data = b'weights'
    response = client.put(f'/artifacts/{blob_id(data)}?kind=model&filename=model.bin', data)

    assert response.json['filename'] == 'model.bin'
    assert client.get(f'/artifacts/{blob_id(data)}').headers['Content-Disposition'] == 'inline; filename="model.bin"'


@pytest.mark.parametrize(
    'mime, extension', [('image/png', '.png'), ('application/octet-stream', '.bin'), ('text/csv', '.csv')]
)
def test_a_blob_without_a_name_is_saved_as_its_hex_with_the_extension_of_its_type(client, mime, extension):
    data = make_png() if mime == 'image/png' else b'a,b\n1,2\n'
    door = 'images' if mime == 'image/png' else 'artifacts?kind=k'
    client.post(f'/{door}', data, headers={'Content-Type': mime})
    response = client.get(f'/artifacts/{blob_id(data)}')

    assert response.headers['Content-Disposition'] == f'inline; filename="{blob_id(data)[7:]}{extension}"'


@pytest.mark.parametrize(
    'offered, stored, header',
    [
        ('../../etc/passwd', 'passwd', 'inline; filename="passwd"'),
        ('C:\\Users\\me\\cat.png', 'cat.png', 'inline; filename="cat.png"'),
        ('a\r\nSet-Cookie: x=1.png', 'aSet-Cookie: x=1.png', 'inline; filename="aSet-Cookie: x=1.png"'),
        ('say "hi".png', 'say "hi".png', 'inline; filename="say \\"hi\\".png"'),
        (
            'été 2026.png',
            'été 2026.png',
            'inline; filename="ete 2026.png"; filename*=UTF-8\'\'%C3%A9t%C3%A9%202026.png',
        ),
        ('\u202egnp.exe', 'gnp.exe', 'inline; filename="gnp.exe"'),
        ('..', None, None),
    ],
)
def test_a_clients_file_name_is_stored_as_a_base_name_that_cannot_inject_a_header(client, offered, stored, header):
    data = offered.encode() + b' bytes'
    response = client.put(f'/artifacts/{blob_id(data)}?kind=k&filename={urllib.parse.quote(offered)}', data)

    assert response.json['filename'] == stored
    assert client.get(f'/artifacts/{blob_id(data)}/meta').json.get('filename') == stored
    disposition = client.get(f'/artifacts/{blob_id(data)}').headers['Content-Disposition']
    assert disposition == (header or f'inline; filename="{blob_id(data)[7:]}.bin"')


def test_a_stored_name_is_bounded_to_255_bytes(client):
    data = b'long'
    client.put(f'/artifacts/{blob_id(data)}?kind=k&filename={"é" * 200}.bin', data)

    assert len(client.get(f'/artifacts/{blob_id(data)}/meta').json['filename'].encode()) <= 255


# -- metadata -------------------------------------------------------------------


@pytest.mark.file_store
def test_meta_of_a_blob_without_meta_is_its_size(client, data_dir, png):
    digest = upload_image(client, png).json['image_id']
    next((data_dir / 'meta').rglob('*.json')).unlink()

    assert client.get(f'/images/{digest}/meta').json == {'bytes': len(png)}
    assert client.get(f'/images/{digest}').content_type == 'application/octet-stream'


# -- health ---------------------------------------------------------------------


@pytest.mark.parametrize('path', ['/health', '/healthz'])
def test_health_is_exactly_the_seed_answer(client, path):
    response = client.get(path)

    assert response.json == {'ok': True}
    assert response.headers['Cache-Control'] == 'no-store'
    assert client.head(path).status_int == 200


@pytest.mark.file_store
def test_health_is_503_when_the_data_directory_vanishes(client, data_dir):
    subprocess.run(['rm', '-rf', str(data_dir)], check=True)

    response = client.get('/health', status=503)

    assert response.json['ok'] is False
    assert 'missing' in response.json['error']


def test_store_that_cannot_create_its_directories_still_starts(tmp_path):
    blocker = tmp_path / 'file-not-dir'
    blocker.write_text('x')
    client = webtest.TestApp(iss.build_app(Settings(data_dir=str(blocker / 'data'))))

    assert client.get('/health', status=503).json['ok'] is False
    response = client.post('/artifacts?kind=k', b'x', headers={'Content-Type': 'text/plain'}, status=503)
    assert response.json['title'] == 'Storage unavailable'


# -- write token ----------------------------------------------------------------


def test_writes_need_the_token_and_reads_do_not(make_client, png):
    client = make_client(api_token='s3cret')

    missing = upload_image(client, png, status=401)
    wrong = upload_image(client, png, headers={'Authorization': 'Bearer s3cre'}, status=401)
    non_ascii = upload_image(client, png, headers={'Authorization': 'Bearer s3cr\u00e9t'}, status=401)
    put = client.put(f'/images/{blob_id(png)}', png, status=401)
    other_scheme = upload_image(client, png, headers={'Authorization': 'Basic s3cret'}, status=401)
    ok = upload_image(client, png, headers={'Authorization': 'Bearer s3cret'})
    # RFC 9110: the scheme's name is case-insensitive
    lower = upload_image(client, make_png(3, 3), headers={'Authorization': 'bearer s3cret'}, status=201)
    upper = upload_image(client, make_png(4, 4), headers={'Authorization': 'BEARER s3cret'}, status=201)

    for refused in (missing, wrong, non_ascii, put, other_scheme):
        assert refused.headers['WWW-Authenticate'] == 'Bearer realm="iss"'
        assert refused.json['title'] == 'Token required'
    assert ok.status_int == lower.status_int == upper.status_int == 201
    assert client.get(f'/images/{blob_id(png)}').body == png
    assert client.get('/health').json == {'ok': True}


def test_a_private_store_answers_reads_only_with_a_token(make_client, png):
    client = make_client(read_token='reader', api_token='uploader', admin_token='admin')
    image_id = upload_image(client, png, headers={'Authorization': 'Bearer uploader'}).json['image_id']
    reads = [
        ('GET', f'/images/{image_id}'),
        ('HEAD', f'/images/{image_id}'),
        ('GET', f'/images/{image_id}?w=10'),
        ('GET', f'/images/{image_id}/meta'),
        ('GET', f'/artifacts/{image_id}'),
        ('GET', '/images'),
        ('GET', '/artifacts'),
        ('GET', '/stats'),
        ('GET', '/metrics'),
    ]

    for method, path in reads:
        for refused in (None, 'Bearer wrong', 'Basic reader'):
            headers = {'Authorization': refused} if refused else {}
            answer = client.request(path, method=method, headers=headers, expect_errors=True)
            assert answer.status_int == 401, (method, path, refused)
            assert answer.headers['WWW-Authenticate'] == 'Bearer realm="iss"'
        for token in ('reader', 'uploader', 'admin'):
            answer = client.request(path, method=method, headers={'Authorization': f'bearer {token}'})
            assert answer.status_int == 200, (method, path, token)
    # asking which ids are stored tells what is stored: a read, by POST, that every token reads (issue 29)
    missing = {'ids': [image_id]}
    client.post_json('/blobs/missing', missing, status=401)
    for token in ('reader', 'uploader', 'admin'):
        client.post_json('/blobs/missing', missing, headers={'Authorization': f'Bearer {token}'}, status=200)
    readers_only = make_client(read_token='reader')
    readers_only.post_json('/blobs/missing', missing, status=401)
    assert readers_only.post_json('/blobs/missing', missing, headers={'Authorization': 'Bearer reader'}).json == {
        'missing': []
    }
    for open_path in ('/health', '/openapi.yaml', '/openapi.json', '/docs'):
        client.get(open_path, status=200)
    # the read token reads, and only reads
    refused = upload_image(client, make_png(5, 5), headers={'Authorization': 'Bearer reader'}, status=401)
    assert "one of this store's, but not ISS_API_TOKEN" in refused.json['description']
    client.delete(f'/images/{image_id}', headers={'Authorization': 'Bearer reader'}, status=401)
    # looking up an image sent in the body costs an upload's decoding: the upload token, and the message says so
    refused = client.post(
        '/images/similar', png, headers={'Authorization': 'Bearer reader', 'Content-Type': 'image/png'}, status=401
    )
    assert refused.json['description'] == (
        "The token given is one of this store's, but not ISS_API_TOKEN. Searching with an image sent in the body "
        'needs the header "Authorization: Bearer <ISS_API_TOKEN>".'
    )


def test_a_private_stores_answers_are_private_in_caches(make_client, png):
    public = make_client()
    image_id = upload_image(public, png).json['image_id']
    assert public.get(f'/images/{image_id}').headers['Cache-Control'].startswith('public')
    private = make_client(read_token='reader')
    reader = {'Authorization': 'Bearer reader'}

    for path in (f'/images/{image_id}', f'/images/{image_id}?w=10', f'/images/{image_id}/meta'):
        cache_control = private.get(path, headers=reader).headers['Cache-Control']
        assert 'public' not in cache_control and cache_control.startswith('private'), (path, cache_control)
    not_modified = private.get(f'/images/{image_id}', headers={**reader, 'If-None-Match': f'"{image_id}"'}, status=304)
    assert not_modified.headers['Cache-Control'].startswith('private')


def test_a_signed_url_reads_one_path_with_one_query_until_it_expires(make_client, png):
    settings = {'read_token': 'reader', 'api_token': 'uploader', 'admin_token': 'admin', 'signing_key': 'k1'}
    client = make_client(**settings)
    uploader = {'Authorization': 'Bearer uploader'}
    image_id = upload_image(client, png, headers=uploader).json['image_id']
    other_id = upload_image(client, make_png(6, 6), headers=uploader).json['image_id']

    signed = client.post_json('/sign', {'id': image_id}, headers=uploader).json
    thumb = client.post_json(
        '/sign',
        {'id': image_id, 'params': {'w': 10, 'format': 'png'}, 'expires_in': 60},
        headers={'Authorization': 'Bearer admin'},
    ).json['url']

    assert client.get(signed['url']).body == png
    assert client.head(signed['url']).status_int == 200
    assert client.get(thumb).content_type == 'image/png'
    assert signed['expires'] > time.time() + 3500
    assert client.get(signed['url']).headers['Cache-Control'].startswith('private')
    path, _, query = signed['url'].partition('?')
    tampered = {
        'another id': f'/images/{other_id}?{query}',
        'another door and path': f'/artifacts/{image_id}?{query}',
        'other parameters': thumb.replace('w=10', 'w=11'),
        'a parameter added': f'{thumb}&q=5',
        'a later expiry': re.sub(r'expires=\d+', lambda m: f'expires={int(m.group(0)[8:]) + 1000}', signed['url']),
        'a changed signature': signed['url'][:-2] + ('AA' if not signed['url'].endswith('AA') else 'BB'),
        'no expiry': re.sub(r'&?expires=\d+', '', signed['url']),
    }
    for what, url in tampered.items():
        refused = client.get(url, status=403)
        assert refused.json['title'] == 'Invalid signature', what
    expired = signing.signed_path('k1', f'/images/{image_id}', {}, expires_in=10, now=time.time() - 60)
    assert 'expired' in client.get(expired, status=403).json['description']
    # rotation: URLs signed with the previous key stay good; once it is dropped, they are not
    rotated = make_client(**{**settings, 'signing_key': 'k2', 'signing_key_previous': 'k1'})
    assert rotated.get(signed['url']).body == png
    dropped = make_client(**{**settings, 'signing_key': 'k2'})
    dropped.get(signed['url'], status=403)
    # asking for a URL needs the upload or admin token; the read token reads, it does not sign
    client.post_json('/sign', {'id': image_id}, status=401)
    client.post_json('/sign', {'id': image_id}, headers={'Authorization': 'Bearer reader'}, status=401)
    for body in ({'id': 'sha256:nothex'}, {'id': image_id, 'expires_in': 0}, {'id': image_id, 'door': 'x'}):
        client.post_json('/sign', body, headers=uploader, status=400)
    make_client(read_token='reader', api_token='uploader').post_json(
        '/sign', {'id': image_id}, headers=uploader, status=403
    )


@pytest.mark.file_store
def test_python_m_iss_sign_prints_a_url_the_service_takes(make_client, data_dir, png):
    client = make_client(read_token='reader', signing_key='cli-key')
    image_id = upload_image(client, png).json['image_id']

    done = subprocess.run(
        [sys.executable, '-m', 'iss', '--json', 'sign', image_id, 'w=12', '--expires', '120'],
        cwd=HERE,
        env={**os.environ, 'ISS_DATA': str(data_dir), 'ISS_SIGNING_KEY': 'cli-key'},
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert done.returncode == 0, done.stderr
    url = json.loads(done.stdout)['url']
    assert url.startswith(f'/images/{image_id}?') and 'w=12' in url
    assert Image.open(io.BytesIO(client.get(url).body)).size[0] == 12
    client.get(url.replace('w=12', 'w=13'), status=403)


# -- CORS -----------------------------------------------------------------------


def test_cors_allows_configured_origins_and_exposes_headers(make_client, png):
    client = make_client(cors_origins=('http://localhost:5173',))
    digest = upload_image(client, png).json['image_id']

    allowed = client.get(f'/images/{digest}', headers={'Origin': 'http://localhost:5173'})
    other = client.get(f'/images/{digest}', headers={'Origin': 'http://evil.example'})
    preflight = client.options(
        '/images',
        headers={
            'Origin': 'http://localhost:5173',
            'Access-Control-Request-Method': 'POST',
            'Access-Control-Request-Headers': 'Authorization',
        },
    )

    assert allowed.headers['Access-Control-Allow-Origin'] == 'http://localhost:5173'
    exposed = {h.strip().lower() for h in allowed.headers['Access-Control-Expose-Headers'].split(',')}
    assert {'etag', 'content-range', 'content-length'} <= exposed
    assert 'Access-Control-Allow-Origin' not in other.headers
    assert 'POST' in preflight.headers['Access-Control-Allow-Methods']
    assert preflight.headers['Access-Control-Allow-Headers'] == 'Authorization'


def test_no_cors_headers_by_default(client, png):
    digest = upload_image(client, png).json['image_id']

    response = client.get(f'/images/{digest}', headers={'Origin': 'http://localhost:5173'})

    assert 'Access-Control-Allow-Origin' not in response.headers


# -- the contract and the docs --------------------------------------------------


def spec() -> dict:
    return yaml.safe_load((HERE / 'openapi.yaml').read_text())


def test_openapi_validates_as_3_1():
    document = spec()

    validate(document)
    assert document['openapi'].startswith('3.1')


def test_every_route_is_documented_and_every_documented_route_served(data_dir):
    app = iss.build_app(Settings(data_dir=str(data_dir)))
    served = {
        (route.path, method.method)
        for route in falcon.inspect.inspect_routes(app)
        for method in route.methods
        if not method.internal
    }
    documented = {
        (path, method.upper())
        for path, operations in spec()['paths'].items()
        for method in operations
        if method != 'parameters'
    }

    assert served == documented


def test_openapi_is_served_as_yaml_and_as_the_same_json(client):
    as_yaml = client.get('/openapi.yaml')
    as_json = client.get('/openapi.json')

    assert yaml.safe_load(as_yaml.body) == as_json.json == spec()


def test_docs_page_works_offline(client):
    page = client.get('/docs')

    assert page.content_type == 'text/html'
    assert not re.search(r'(src|href)="(https?:)?//', page.text), 'the docs page must not load from the internet'
    for asset in re.findall(r'(?:src|href)="([^"]+)"', page.text):
        response = client.get('/' + asset)
        assert response.status_int == 200
        assert len(response.body) > 1000
    assert "url: 'openapi.json'" in page.text


# -- compatibility with the FastAPI version's data directory ---------------------


def test_data_directory_written_by_the_seed_is_served(tmp_path, png):
    data_dir = tmp_path / 'seed-data'
    digest = blob_id(png)
    hex_digest = digest[7:]
    for top, name, content in (
        ('blobs', hex_digest, png),
        (
            'meta',
            f'{hex_digest}.json',
            json.dumps(
                {
                    'kind': 'image',
                    'bytes': len(png),
                    'mime': 'application/octet-stream',
                    'width': 100,
                    'height': 80,
                    'created_at': 1700000000.5,
                }
            ).encode(),
        ),
    ):
        path = data_dir / top / hex_digest[:2] / hex_digest[2:4] / name
        path.parent.mkdir(parents=True)
        path.write_bytes(content)
    client = webtest.TestApp(iss.build_app(Settings(data_dir=str(data_dir))))

    response = client.get(f'/images/{digest}')

    assert response.body == png
    # The seed stored the client's claim; the bytes say PNG.
    assert response.content_type == 'image/png'
    assert client.get(f'/images/{digest}/meta').json['created_at'] == 1700000000.5
    assert upload_image(client, png).status_int == 200


@pytest.mark.file_store
def test_a_damaged_blob_is_replaced_by_a_verified_upload(client, data_dir, png):
    upload_image(client, png)
    blob = next((data_dir / 'blobs').rglob('*'))
    while blob.is_dir():
        blob = next(blob.iterdir())
    blob.write_bytes(png[:10])  # as a crash in the seed's unsynced write could leave it

    upload_image(client, png)

    assert blob.read_bytes() == png


# -- the store on its own ------------------------------------------------------


def test_temp_files_of_dead_writers_are_swept_and_live_ones_kept(tmp_path):
    store = file_store(tmp_path)
    dead = tmp_path / 'tmp' / 'upload-dead'
    dead.write_bytes(b'partial')
    live = tmp_path / 'tmp' / 'upload-live'
    live.write_bytes(b'in flight')
    with open(live, 'rb') as held:
        fcntl.flock(held, fcntl.LOCK_EX)

        assert store.sweep_temp() == 1

        assert not dead.exists()
        assert live.exists()


def test_a_staged_upload_survives_another_worker_starting_before_it_commits(tmp_path):
    store = file_store(tmp_path)
    with store.stage(io.BytesIO(b'being inspected')) as staged:
        file_store(tmp_path).sweep_temp()  # another gunicorn worker boots

        committed = store.commit(staged, {'kind': 'k'})

    assert committed.created
    assert store.open(staged.digest).file.read() == b'being inspected'
    assert list((tmp_path / 'tmp').iterdir()) == []


def test_create_app_only_wires_and_the_stores_start_does_the_housekeeping(tmp_path):
    store = file_store(tmp_path)
    stale = tmp_path / 'tmp' / 'upload-of-a-killed-worker'
    stale.write_bytes(b'partial')

    iss.create_app(Settings(data_dir=str(tmp_path)), store)
    assert stale.exists(), 'create_app did housekeeping'
    store.start()

    assert not stale.exists()


def test_stage_failure_removes_the_temp_file(tmp_path):
    store = file_store(tmp_path)

    class Broken:
        def __init__(self):
            self.calls = 0

        def readinto(self, buffer):
            self.calls += 1
            if self.calls > 2:
                raise ConnectionResetError('client went away')
            buffer[:100] = b'x' * 100
            return 100

    with pytest.raises(ConnectionResetError):
        store.stage(Broken())
    assert list((tmp_path / 'tmp').iterdir()) == []


def test_disk_full_is_507_and_health_says_so_until_space_is_freed(tmp_path):
    mount_point = tmp_path / 'small'
    mount_point.mkdir()
    mounted = subprocess.run(
        ['mount', '-t', 'tmpfs', '-o', 'size=2m', 'tmpfs', str(mount_point)], capture_output=True, text=True
    )
    assert mounted.returncode == 0, (
        f'this test needs root to mount a 2 MiB tmpfs (CI runs as root): {mounted.stderr.strip()}'
    )
    try:
        client = webtest.TestApp(iss.build_app(Settings(data_dir=str(mount_point / 'data'))))
        too_big = os.urandom(3 * 1024 * 1024)

        full = client.post('/artifacts?kind=k', too_big, headers={'Content-Type': 'text/plain'}, status=507)

        assert full.json['title'] == 'Storage full'
        assert list((mount_point / 'data' / 'tmp').iterdir()) == []
        assert files_under(mount_point / 'data' / 'blobs') == []
        filler = mount_point / 'filler'
        with open(filler, 'wb') as out, pytest.raises(OSError):
            out.write(os.urandom(3 * 1024 * 1024))
            out.flush()
        unhealthy = client.get('/health', status=503)
        assert 'No space left' in unhealthy.json['error']
        filler.unlink()
        assert client.get('/health').json == {'ok': True}
        small = os.urandom(1000)
        assert client.post('/artifacts?kind=k', small, headers={'Content-Type': 'text/plain'}).status_int == 201
    finally:
        subprocess.run(['umount', '-l', str(mount_point)], check=True)


# -- configuration --------------------------------------------------------------


def test_settings_from_the_environment():
    settings = Settings.from_env(
        {
            'ISS_DATA': '/srv/iss',
            'ISS_MAX_UPLOAD_BYTES': '1024',
            'ISS_API_TOKEN': ' t ',
            'ISS_CORS_ORIGINS': 'http://a, http://b,,',
            'ISS_PORT': '9000',
            'ISS_WORKERS': '3',
        }
    )

    assert settings.data_dir == '/srv/iss'
    assert settings.max_upload_bytes == 1024
    assert settings.api_token == 't'
    assert settings.cors_origins == ('http://a', 'http://b')
    assert (settings.port, settings.workers) == (9000, 3)
    assert Settings.from_env({}) == Settings()


@pytest.mark.parametrize(
    'name, value',
    [('ISS_MAX_UPLOAD_BYTES', 'lots'), ('ISS_WORKERS', '0'), ('ISS_PORT', '-1'), ('ISS_ACCEL_REDIRECT', '/no-slash')],
)
def test_unusable_settings_are_refused_with_their_name(name, value):
    with pytest.raises(ConfigError, match=name):
        Settings.from_env({name: value})


def test_nothing_but_config_reads_the_environment():
    # NOTE: gunicorn.conf.py may write it (for prometheus_client), never read it; the client
    # (the iss_client package) is a program of its own, installed without the server, and reads ISS_URL.
    reads = re.compile(r'\bos\.environ\b(?!\[[^]]+\]\s*=[^=])|\bos\.getenv|\bgetenv\(')
    readers = {
        str(path.relative_to(HERE))
        for path in [*HERE.glob('*.py'), *HERE.glob('iss_server/**/*.py')]
        if not path.name.startswith(('test_', 'conftest', 'iss_client')) and reads.search(path.read_text())
    }

    assert readers == {'iss_server/config.py'}


def test_the_command_line_does_not_load_the_app_module_twice():
    # NOTE: python -m iss runs iss.py as __main__; a cli that imported iss would load it again.
    code = 'import sys; from iss_server import cli; assert "iss" not in sys.modules, sorted(sys.modules)'
    subprocess.run([sys.executable, '-c', code], cwd=HERE, check=True, capture_output=True, timeout=60)


def test_example_env_lists_every_setting():
    example = (HERE / 'example.env').read_text()
    source = (HERE / 'iss_server' / 'config.py').read_text()

    assert set(re.findall(r"'(ISS_\w+)'", source)) == set(re.findall(r'^#?\s*(ISS_\w+)=', example, re.M))


@pytest.mark.parametrize(
    'path',
    [
        '/images?limit=1&limit=5',
        '/artifacts?kind=a&kind=b',
        '/images?created_after=1&created_after=2',
        '/artifacts?cursor=a&cursor=b',
        '/events?limit=1&limit=5',
        '/events?wait=0&wait=1',
    ],
)
def test_a_query_parameter_given_twice_is_refused_everywhere(client, path):
    """?limit=1&limit=5 answered a page of 5: the last one won, silently (one rule: params.single)."""
    name = urllib.parse.urlsplit(path).query.partition('=')[0]

    refused = client.get(path, status=400).json

    assert (refused['title'], refused['detail']) == ('Repeated parameter', f'Give {name} once.')


def test_an_upload_query_parameter_given_twice_is_refused_before_the_body(client, png):
    refused = client.post('/artifacts?kind=a&kind=b', png, content_type='application/octet-stream', status=400).json

    assert refused['detail'] == 'Give kind once.'
    assert client.get('/stats').json['count'] == 0
