"""iss_server/forms.py alone: multipart/form-data read as it streams, edge cases a client can send.

The HTTP tests (test_iss.py, test_stores.py) send whole forms through the app; these give the
reader bodies that arrive in pieces of any size, with padding, odd headers and broken ends.
"""

from __future__ import annotations

import falcon
import pytest

from iss_server.forms import FormReader

BOUNDARY = 'b0undary'


class Trickle:
    """A request body that hands over at most ``piece`` bytes per read, as a slow socket does."""

    def __init__(self, data: bytes, piece: int) -> None:
        self._data = data
        self._piece = piece
        self._at = 0

    def readinto(self, buffer: memoryview) -> int:
        count = min(self._piece, len(buffer), len(self._data) - self._at)
        buffer[:count] = self._data[self._at : self._at + count]
        self._at += count
        return count


def form(*parts: bytes, preamble: bytes = b'', epilogue: bytes = b'') -> bytes:
    """A body of ``parts`` (each its header lines, a blank line, its bytes) between delimiters."""
    delimiter = f'--{BOUNDARY}'.encode()
    body = preamble + (b'\r\n' if preamble else b'')
    for part in parts:
        body += delimiter + b'\r\n' + part + b'\r\n'
    return body + delimiter + b'--' + epilogue


def part(name: str, data: bytes, filename: str | None = None, content_type: str | None = None) -> bytes:
    disposition = f'Content-Disposition: form-data; name="{name}"' + (f'; filename="{filename}"' if filename else '')
    headers = disposition + (f'\r\nContent-Type: {content_type}' if content_type else '')
    return headers.encode() + b'\r\n\r\n' + data


def read(body: bytes, piece: int = 1 << 20, max_parts: int = 10, **options) -> list[tuple]:
    """Each part of ``body`` as (name, filename, content type, bytes), read in pieces of ``piece`` bytes."""
    reader = FormReader(
        Trickle(body, piece),
        f'multipart/form-data; boundary={BOUNDARY}',
        max_parts=max_parts,
        length=len(body),
        **options,
    )
    found = []
    for each in reader.parts():
        data = bytearray()
        buffer = bytearray(4096)
        while count := each.readinto(memoryview(buffer)):
            data += buffer[:count]
        found.append((each.name, each.filename, each.content_type, bytes(data)))
    return found


# NOTE: bytes that look like a delimiter's start, without being one.
TRICKY = b'\r\n--b0undar\r\n-\r\n--\r\n--b0undarY' + bytes(range(256)) * 40 + b'\r'


@pytest.mark.parametrize('piece', [1, 2, 7, 13, 4096, 1 << 20])
def test_a_form_arriving_in_pieces_of_any_size_reads_byte_for_byte(piece):
    body = form(part('kind', b'photo'), part('file', TRICKY, 'a.bin', 'application/octet-stream'), part('empty', b''))

    assert read(body, piece) == [
        ('kind', None, 'text/plain', b'photo'),
        ('file', 'a.bin', 'application/octet-stream', TRICKY),
        ('empty', None, 'text/plain', b''),
    ]


def test_preamble_epilogue_and_transport_padding_are_ignored():
    body = form(part('a', b'1'), preamble=b'this is a preamble', epilogue=b'\r\nand an epilogue')
    padded = body.replace(f'--{BOUNDARY}\r\n'.encode(), f'--{BOUNDARY} \t \r\n'.encode())

    assert read(body) == read(padded) == [('a', None, 'text/plain', b'1')]


def test_a_part_without_headers_has_no_name_and_is_text():
    assert read(form(b'\r\nbare')) == [(None, None, 'text/plain', b'bare')]


def test_a_part_left_unread_is_skipped_for_the_next():
    reader = FormReader(
        Trickle(form(part('skipped', b'x' * 10000), part('kept', b'yes')), 3),
        f'multipart/form-data; boundary={BOUNDARY}',
        max_parts=5,
        length=None,
    )

    names = [(each.name, each.read_all(100) if each.name == 'kept' else None) for each in reader.parts()]

    assert names == [('skipped', None), ('kept', b'yes')]


def test_an_rfc_5987_filename_is_decoded():
    header = b'Content-Disposition: form-data; name="file"; filename*=UTF-8\'\'na%C3%AFve%20photo.png'

    assert read(form(header + b'\r\n\r\ndata'))[0][1] == 'naïve photo.png'


@pytest.mark.parametrize(
    'body, message',
    [
        (form(part('a', b'1'))[:-2], 'ends before its closing boundary'),
        (form(part('a', b'1')).removesuffix(f'--{BOUNDARY}--'.encode()), 'ends before its closing boundary'),
        (f'--{BOUNDARY}X\r\n'.encode() + part('a', b'1') + f'\r\n--{BOUNDARY}--'.encode(), 'not followed by a line'),
        (form(b'Content-Disposition form-data\r\n\r\n1'), 'without a colon'),
        (form(b"Content-Disposition: form-data; name=a; filename*=nocharset''x%FF\r\n\r\n1"), 'undecodable'),
        (form(b'Content-Type: text/plain\xff\r\n\r\n1'), 'undecodable'),
        (form(b'X-Padding: ' + b'p' * 9000 + b'\r\n\r\n1'), 'exceed 8192 bytes'),
        (form(*[part('a', b'1')] * 11), 'maximum number of parts (10)'),
    ],
    ids=['cut', 'no closing', 'boundary run on', 'header no colon', 'charset', 'header bytes', 'long headers', 'parts'],
)
def test_a_malformed_form_is_a_400_that_says_why(body, message):
    for piece in (1, 1 << 20):
        with pytest.raises(falcon.MultipartParseError) as raised:
            read(body, piece)

        assert raised.value.status == falcon.HTTP_400
        assert message in raised.value.description


@pytest.mark.parametrize(
    'content_type',
    ['multipart/form-data', 'multipart/form-data; boundary=', 'multipart/form-data; boundary=' + 'x' * 71],
)
def test_a_content_type_without_a_usable_boundary_is_refused(content_type):
    with pytest.raises(falcon.HTTPInvalidHeader):
        FormReader(Trickle(b'', 1), content_type, max_parts=1, length=0)


def test_a_field_is_read_whole_up_to_its_limit_and_no_further():
    reader = FormReader(
        Trickle(form(part('meta', b'x' * 64), part('meta', b'x' * 65)), 5),
        f'multipart/form-data; boundary={BOUNDARY}',
        max_parts=5,
        length=None,
    )
    fields = reader.parts()

    assert next(fields).read_all(64) == b'x' * 64
    with pytest.raises(falcon.MultipartParseError) as raised:
        next(fields).read_all(64)
    assert raised.value.description == 'The form field "meta" is over 64 bytes.'
