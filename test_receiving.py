"""iss_server.receiving: the files of a form, or a raw body, staged in the store and discarded unless committed."""

from __future__ import annotations

import os
import pathlib

import falcon.testing
import pytest

import storage
from iss_server.config import Settings
from iss_server.errors import BadRequest, TooManyFiles, UploadTooLarge
from iss_server.receiving import UploadReceiver, is_multipart
from iss_testing.data import blob_id, file_store, temp_files_open

BOUNDARY = 'b0undary'


def form(*parts: tuple[str, str | None, bytes]) -> bytes:
    """A multipart/form-data body of (name, filename, bytes) parts."""
    out = b''
    for name, filename, data in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else '')
        out += f'--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n'.encode()
        out += (b'Content-Type: application/octet-stream\r\n' if filename else b'') + b'\r\n' + data + b'\r\n'
    return out + f'--{BOUNDARY}--\r\n'.encode()


def form_request(body: bytes) -> falcon.Request:
    headers = {'Content-Type': f'multipart/form-data; boundary={BOUNDARY}'}
    return falcon.Request(falcon.testing.create_environ(method='POST', body=body, headers=headers))


def raw_request(body: bytes, content_type: str = 'image/png') -> falcon.Request:
    headers = {'Content-Type': content_type, 'Content-Length': str(len(body))}
    return falcon.Request(falcon.testing.create_environ(method='PUT', body=body, headers=headers))


@pytest.fixture
def store(data_dir: pathlib.Path):
    return file_store(data_dir)


@pytest.fixture
def receiver(store, data_dir: pathlib.Path) -> UploadReceiver:
    return UploadReceiver(store, Settings(data_dir=str(data_dir), max_upload_bytes=4000))


@pytest.fixture
def staged_files(data_dir: pathlib.Path):
    """The temp files staged in the data directory's tmp/, not yet committed (named or not)."""
    return lambda: temp_files_open(data_dir / 'tmp')


def test_a_raw_body_is_one_upload_with_the_requests_type(receiver, staged_files):
    with receiver.receive(raw_request(b'raw bytes', 'text/plain')) as uploads:
        (upload,) = uploads
        assert (upload.staged.digest, upload.staged.size) == (blob_id(b'raw bytes'), 9)
        assert (upload.filename, upload.content_type, upload.fields) == (None, 'text/plain', {})
        assert staged_files() == []  # NOTE: a small upload waits in memory until a commit finds it new
        with upload.staged.open() as received:
            assert received.read() == b'raw bytes'

    assert staged_files() == []


def test_an_upload_past_what_waits_in_memory_is_staged_in_one_temp_file(store, data_dir, staged_files):
    receiver = UploadReceiver(store, Settings(data_dir=str(data_dir)))
    data = os.urandom(100 * 1024)
    with receiver.receive(raw_request(data, 'application/octet-stream')) as (upload,):
        assert (upload.staged.digest, upload.staged.size) == (blob_id(data), len(data))
        assert len(staged_files()) == 1

    assert staged_files() == []


def test_a_forms_file_comes_with_its_name_and_the_fields_asked_for(receiver):
    body = form(('kind', None, b'model'), ('file', 'w.bin', b'weights'), ('other', None, b'ignored'))

    with receiver.receive(form_request(body), form_fields=('kind',)) as (upload,):
        assert upload.staged.digest == blob_id(b'weights')
        assert (upload.filename, upload.content_type) == ('w.bin', 'application/octet-stream')
        assert upload.fields == {'kind': 'model'}


def test_a_batch_is_staged_in_order(receiver, staged_files):
    body = form(('file', 'a', b'first'), ('file', 'b', b'second'), ('file', 'c', b'third'))

    with receiver.receive(form_request(body), max_files=3) as uploads:
        assert [upload.filename for upload in uploads] == ['a', 'b', 'c']
        assert [upload.staged.digest for upload in uploads] == [
            blob_id(b'first'),
            blob_id(b'second'),
            blob_id(b'third'),
        ]

    assert staged_files() == []


def test_two_files_where_one_is_taken_are_refused_and_nothing_stays_staged(receiver, staged_files):
    body = form(('file', 'a', b'first'), ('file', 'b', b'second'))

    with pytest.raises(BadRequest, match='exactly one') as refused, receiver.receive(form_request(body)):
        pass

    assert refused.value.title == 'Two files'
    assert staged_files() == []


def test_more_files_than_a_batch_takes_are_413(receiver, staged_files):
    body = form(*[('file', str(number), b'%d' % number) for number in range(3)])

    with pytest.raises(TooManyFiles) as refused, receiver.receive(form_request(body), max_files=2):
        pass

    assert refused.value.status == 413
    assert staged_files() == []


def test_a_form_without_a_file_is_refused(receiver):
    with pytest.raises(BadRequest) as refused, receiver.receive(form_request(form(('kind', None, b'x')))):
        pass

    assert refused.value.title == 'No file'


def test_a_field_sent_twice_is_refused(receiver):
    body = form(('kind', None, b'a'), ('kind', None, b'b'), ('file', 'f', b'x'))

    with pytest.raises(BadRequest) as refused, receiver.receive(form_request(body), form_fields=('kind',)):
        pass

    assert refused.value.title == 'Repeated field'


def test_a_form_of_many_small_parts_is_refused(receiver):
    body = form(*[(f'field{number}', None, b'x') for number in range(17)], ('file', 'f', b'x'))

    with pytest.raises(BadRequest, match='maximum number of parts'), receiver.receive(form_request(body)):
        pass


def test_an_upload_over_the_limit_is_413_and_nothing_stays_staged(receiver, staged_files):
    with pytest.raises(UploadTooLarge), receiver.receive(raw_request(b'x' * 4001)):
        pass

    assert staged_files() == []


def test_read_json_gives_the_document_or_none(receiver):
    assert receiver.read_json(raw_request(b'{"ids": []}', 'application/json'), 100) == {'ids': []}
    assert receiver.read_json(raw_request(b'not json', 'application/json'), 100) is None
    assert receiver.read_json(raw_request(b'', 'application/json'), 100) is None
    with pytest.raises(UploadTooLarge):
        receiver.read_json(raw_request(b'[' + b'1,' * 100 + b'1]', 'application/json'), 100)


def test_is_multipart_reads_the_type_in_any_case():
    assert is_multipart(form_request(b''))
    assert is_multipart(raw_request(b'', 'Multipart/Form-Data; boundary=x'))
    assert not is_multipart(raw_request(b'', 'image/png'))


def test_small_uploads_wait_in_memory_only_up_to_the_bound_then_are_written_at_once(
    receiver, staged_files, monkeypatch
):
    monkeypatch.setattr(storage, '_waiting_in_memory', storage._Budget(2000))
    body = form(*(('file', f'f{n}', bytes([n]) * 900) for n in range(3)))

    with receiver.receive(form_request(body), max_files=3) as uploads:
        assert len(staged_files()) == 1  # NOTE: the third passed the bound: written at once
        assert [upload.staged.size for upload in uploads] == [900, 900, 900]

    assert staged_files() == []
    assert storage._waiting_in_memory.take(2000), 'what waited was given back'
