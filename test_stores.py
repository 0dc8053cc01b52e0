"""Uploads, deletion and hostile input, proven on every store (conftest.BACKENDS: a data directory, an S3 bucket).

What is stored is looked at through the backend itself (files under the data
directory, or keys in the bucket), never through ISS's own answers alone.
"""

from __future__ import annotations

import os
import pathlib

import pytest

from iss_testing.data import MISSING, blob_id, make_png

# NOTE: every test here that takes a client runs on each store, unless marked file_store.
pytestmark = pytest.mark.both_stores


@pytest.fixture
def stored(store_backend, tmp_path, request):
    """What the test's store holds: the keys (or paths) below blobs/ and meta/, and the node's temp files."""

    def listing() -> dict[str, list[str]]:
        data = tmp_path / 'data'
        temps = sorted(p.name for p in (data / 'tmp').iterdir() if p.is_file()) if (data / 'tmp').exists() else []
        if not store_backend:
            tops = {
                top: sorted(str(p.relative_to(data)) for p in (data / top).rglob('*') if p.is_file())
                for top in ('blobs', 'meta')
            }
            return {**tops, 'tmp': temps, 'uploads': []}
        seaweedfs = request.getfixturevalue('seaweedfs')
        bucket, _, prefix = store_backend['store'].removeprefix('s3://').partition('/')
        keys = [key.removeprefix(prefix + '/') for key in seaweedfs.keys(bucket, prefix + '/')]
        uploads = seaweedfs.client().list_multipart_uploads(Bucket=bucket, Prefix=prefix + '/').get('Uploads', [])
        return {
            'blobs': [key for key in keys if key.startswith('blobs/')],
            'meta': [key for key in keys if key.startswith('meta/')],
            'tmp': temps,
            'uploads': [upload['Key'] for upload in uploads],
        }

    return listing


def nothing(stored) -> bool:
    return stored() == {'blobs': [], 'meta': [], 'tmp': [], 'uploads': []}


def layout_of(digest: str) -> tuple[str, str]:
    hex_digest = digest[7:]
    return (
        f'blobs/{hex_digest[:2]}/{hex_digest[2:4]}/{hex_digest}',
        f'meta/{hex_digest[:2]}/{hex_digest[2:4]}/{hex_digest}.json',
    )


@pytest.fixture
def admin_client(make_client):
    return make_client(admin_token='admin')


def test_an_image_upload_stores_one_blob_and_its_meta_under_the_seeds_layout(client, stored):
    png = make_png()

    first = client.post('/images', upload_files=[('file', 'a.png', png, 'image/png')])
    again = client.post('/images', upload_files=[('file', 'b.png', png, 'image/png')])

    assert (first.status_int, again.status_int) == (201, 200)
    blob, meta_key = layout_of(blob_id(png))
    assert stored() == {'blobs': [blob], 'meta': [meta_key], 'tmp': [], 'uploads': []}
    assert client.get(f'/images/{blob_id(png)}/meta').json['filename'] == 'a.png'


def test_a_batch_stores_each_file_once(client, stored):
    one, two = make_png(10, 10, 'red'), make_png(11, 11, 'blue')
    files = [
        ('file', 'one.png', one, 'image/png'),
        ('file', 'two.png', two, 'image/png'),
        ('file', 'again.png', one, 'image/png'),
    ]

    response = client.post('/images', upload_files=files)

    assert [entry['status'] for entry in response.json] == [201, 201, 200]
    assert len(stored()['blobs']) == 2


def test_delete_removes_blob_meta_row_and_derivatives_and_the_content_can_come_back(admin_client, stored):
    png = make_png(50, 50, 'yellow')
    digest = admin_client.post('/images', upload_files=[('file', 'y.png', png, 'image/png')]).json['image_id']
    admin_client.get(f'/images/{digest}?w=20')

    admin_client.delete(f'/images/{digest}', headers={'Authorization': 'Bearer admin'}, status=204)

    assert nothing(stored)
    admin_client.get(f'/images/{digest}', status=404)
    admin_client.get(f'/images/{digest}?w=20', status=404)
    admin_client.get(f'/images/{digest}/meta', status=404)
    admin_client.delete(f'/images/{digest}', headers={'Authorization': 'Bearer admin'}, status=404)
    assert admin_client.get('/images').json['items'] == []
    assert admin_client.get('/stats').json['count'] == 0
    assert admin_client.post('/images', upload_files=[('file', 'y2.png', png, 'image/png')]).status_int == 201
    assert admin_client.get(f'/images/{digest}/meta').json['filename'] == 'y2.png'


def test_missing_names_what_is_not_stored(client):
    digest = client.post('/artifacts?kind=x', b'here').json['artifact_id']

    assert client.post_json('/blobs/missing', {'ids': [digest, MISSING, MISSING]}).json == {'missing': [MISSING]}


@pytest.mark.parametrize(
    'body, headers, status',
    [
        (b'short', {'Content-Length': '100', 'Content-Type': 'text/plain'}, 400),
        (
            b'--x\r\nContent-Disposition: form-data; name="file"; filename="a"\r\n\r\nabc',
            {'Content-Type': 'multipart/form-data; boundary=x'},
            400,
        ),
        (b'not an image', {'Content-Type': 'image/png'}, 415),
    ],
    ids=['cut short', 'unterminated form', 'not an image'],
)
def test_hostile_uploads_are_refused_and_leave_nothing_anywhere(client, stored, body, headers, status):
    path = '/artifacts?kind=x' if 'text/plain' in headers.get('Content-Type', '') else '/images'

    response = client.request(path, method='POST', body=body, headers=headers, status=status)

    assert response.content_type == 'application/json'
    assert nothing(stored)


def test_a_put_whose_bytes_do_not_hash_to_its_id_stores_nothing(client, stored):
    client.put(f'/artifacts/{blob_id(b"claimed")}?kind=x', b'sent', status=400)

    assert nothing(stored)


def test_a_resumable_upload_in_two_chunks_becomes_a_blob(client, stored):
    data = os.urandom(300_000)
    created = client.post(
        '/uploads',
        headers={'Tus-Resumable': '1.0.0', 'Upload-Length': str(len(data)), 'Upload-Metadata': 'kind YXJ0aWZhY3Q='},
        status=201,
    )
    location = created.headers['Location']
    for offset in (0, 100_000):
        end = len(data) if offset else 100_000
        client.request(
            location,
            method='PATCH',
            body=data[offset:end],
            headers={
                'Tus-Resumable': '1.0.0',
                'Upload-Offset': str(offset),
                'Content-Type': 'application/offset+octet-stream',
            },
            status=204,
        )

    assert client.get(f'/artifacts/{blob_id(data)}').body == data
    assert stored()['blobs'] == [layout_of(blob_id(data))[0]]
    assert not any(pathlib.Path(name).suffix == '.part' for name in stored()['tmp'])
