"""iss_server.bodies: the request body within its limit and timeout, and gunicorn's socket read directly."""

from __future__ import annotations

import io
import socket

import falcon.testing
import gunicorn.http.body
import gunicorn.http.unreader
import pytest

from iss_server.bodies import RequestBody, SocketBody
from iss_server.errors import IncompleteBody, LengthRequired, TransferCodingNotImplemented, UploadTooLarge


def request(body: bytes = b'', headers: dict[str, str] | None = None, **env_extra) -> falcon.Request:
    env = falcon.testing.create_environ(method='POST', body=body, headers=headers)
    env.update(env_extra)
    return falcon.Request(env)


class Stalling(io.RawIOBase):
    """A body whose client stopped sending: every read times out."""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        raise TimeoutError('timed out')


class RecordingSocket:
    def __init__(self) -> None:
        self.timeouts: list[float] = []

    def settimeout(self, seconds: float) -> None:
        self.timeouts.append(seconds)


def test_a_body_within_the_limit_reads_whole():
    body = RequestBody(request(b'0123456789'), limit=10, timeout=5)

    assert body.declared_length == 10
    assert body.read() == b'0123456789'


def test_readinto_fills_the_buffer_and_ends_with_zero():
    body = RequestBody(request(b'abcdef'), limit=100, timeout=5)
    buffer = memoryview(bytearray(4))

    assert body.readinto(buffer) == 4
    assert bytes(buffer) == b'abcd'
    assert body.readinto(buffer) == 2
    assert bytes(buffer[:2]) == b'ef'
    assert body.readinto(buffer) == 0


def test_a_declared_length_over_the_limit_is_refused_before_a_byte_is_read():
    req = request(b'x' * 11)

    with pytest.raises(UploadTooLarge) as refused:
        RequestBody(req, limit=10, timeout=5)

    assert refused.value.status == 413
    assert req.stream.read() == b'x' * 11  # NOTE: untouched


def test_a_chunked_body_is_refused_as_it_crosses_the_limit():
    req = request(b'', **{'wsgi.input': io.BytesIO(b'y' * 25), 'wsgi.input_terminated': True})
    req.env.pop('CONTENT_LENGTH', None)
    body = RequestBody(req, limit=20, timeout=5)

    assert body.declared_length is None
    assert body.read(20) == b'y' * 20
    with pytest.raises(UploadTooLarge):
        body.read(20)


def test_a_chunked_body_needs_a_server_that_marks_its_end():
    req = request(b'', **{'wsgi.input': io.BytesIO(b'abc')})
    req.env.pop('CONTENT_LENGTH', None)

    with pytest.raises(LengthRequired) as refused:
        RequestBody(req, limit=20, timeout=5)

    assert refused.value.status == 411


@pytest.mark.parametrize('codings', ['gzip, chunked', 'deflate,chunked', 'x-custom, chunked'])
def test_a_body_in_a_transfer_coding_iss_does_not_undo_is_501_before_a_byte_is_read(codings):
    """Issue 29: gunicorn takes "gzip, chunked" and hands on the gzipped bytes, which were stored as they came."""
    req = request(b'', headers={'Transfer-Encoding': codings}, **{'wsgi.input': io.BytesIO(b'abc')})
    req.env.update({'wsgi.input_terminated': True})
    req.env.pop('CONTENT_LENGTH', None)

    with pytest.raises(TransferCodingNotImplemented) as refused:
        RequestBody(req, limit=20, timeout=5)

    assert refused.value.status == 501
    assert req.stream.read() == b'abc'  # NOTE: untouched


@pytest.mark.parametrize('codings', ['chunked', 'Chunked', 'identity, chunked'])
def test_a_plain_chunked_body_is_read(codings):
    req = request(b'', headers={'Transfer-Encoding': codings}, **{'wsgi.input': io.BytesIO(b'abc')})
    req.env.update({'wsgi.input_terminated': True})
    req.env.pop('CONTENT_LENGTH', None)

    assert RequestBody(req, limit=20, timeout=5).read() == b'abc'


def test_a_body_shorter_than_declared_is_incomplete():
    req = request(b'', headers={'Content-Length': '10'}, **{'wsgi.input': io.BytesIO(b'short')})
    body = RequestBody(req, limit=100, timeout=5)

    assert body.read(5) == b'short'
    with pytest.raises(IncompleteBody, match='Received 5 of the 10 bytes declared'):
        body.read(5)


def test_a_client_that_stops_sending_is_an_incomplete_body_not_a_500():
    req = request(b'', headers={'Content-Length': '10'}, **{'wsgi.input': io.BufferedReader(Stalling())})
    body = RequestBody(req, limit=100, timeout=5)

    with pytest.raises(IncompleteBody, match='stopped arriving: timed out') as refused:
        body.read(10)

    assert refused.value.status == 400


def test_gunicorns_socket_gets_the_body_timeout():
    connection = RecordingSocket()

    RequestBody(request(b'abc', **{'gunicorn.socket': connection}), limit=100, timeout=7)

    assert connection.timeouts == [7]


def test_no_socket_body_outside_gunicorn():
    assert SocketBody.of(falcon.testing.create_environ(body=b'abc')) is None


def gunicorn_body(sent: bytes, length: int) -> tuple[gunicorn.http.body.Body, socket.socket]:
    ours, theirs = socket.socketpair()
    theirs.sendall(sent)
    reader = gunicorn.http.body.LengthReader(gunicorn.http.unreader.SocketUnreader(ours), length)
    return gunicorn.http.body.Body(reader), theirs


def test_a_gunicorn_body_is_received_straight_from_the_socket():
    body, theirs = gunicorn_body(b'hello world', 11)
    with theirs:
        received = SocketBody.of({'wsgi.input': body})

        assert received is not None
        buffer = memoryview(bytearray(5))
        assert received.readinto(buffer) == 5
        assert bytes(buffer) == b'hello'
        assert received.read() == b' world'
        assert received.read(10) == b''
        assert body.reader.length == 0  # NOTE: gunicorn finds the body consumed


def test_gunicorns_read_ahead_of_the_next_request_is_given_back():
    body, theirs = gunicorn_body(b'', 3)
    with theirs:
        body.reader.unreader.unread(b'abcGET / HTTP/1.1\r\n')
        received = SocketBody.of({'wsgi.input': body})

        assert received.read() == b'abc'
        assert body.reader.unreader.read() == b'GET / HTTP/1.1\r\n'


def test_a_failed_socket_read_tells_gunicorn_to_close_the_connection():
    body, theirs = gunicorn_body(b'', 10)
    received = SocketBody.of({'wsgi.input': body})
    body.reader.unreader.sock.settimeout(0.01)

    with theirs, pytest.raises(TimeoutError):
        received.read(10)

    assert body.failed is True
