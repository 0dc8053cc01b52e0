"""iss_server.responses: send_file's headers, ranges, conditional answers and sandboxing, through falcon.testing."""

from __future__ import annotations

import io

import falcon
import falcon.testing
import pytest

from iss_server.responses import (
    closed_on_error,
    content_disposition,
    etag_matches,
    is_active,
    send_file,
    send_not_modified,
)

DATA = bytes(range(100))
ETAG = 'sha256:' + 'ab' * 32


class TrackedFile(io.BytesIO):
    """A file that remembers being closed after the response is done with it."""

    opened: list[TrackedFile] = []

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        TrackedFile.opened.append(self)


class FileResource:
    """Answers like Item: 304 first, then the file (None for a HEAD) with send_file."""

    def __init__(self, data: bytes = DATA, **options) -> None:
        self._data = data
        self._options = {'content_type': 'image/png', 'filename': 'photo.png', **options}

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        if etag_matches(req.if_none_match, ETAG):
            send_not_modified(resp, ETAG)
            return
        file = TrackedFile(self._data) if req.method == 'GET' else None
        send_file(req, resp, file, etag=ETAG, size=len(self._data), **self._options)

    on_head = on_get


def client(data: bytes = DATA, **options) -> falcon.testing.TestClient:
    app = falcon.App()
    app.add_route('/file', FileResource(data, **options))
    return falcon.testing.TestClient(app)


@pytest.fixture(autouse=True)
def no_file_left_open():
    TrackedFile.opened.clear()
    yield
    assert all(file.closed for file in TrackedFile.opened), 'send_file left a file open'


def test_a_file_is_sent_whole_with_immutable_sandboxed_headers():
    response = client().simulate_get('/file')

    assert response.status_code == 200
    assert response.content == DATA
    assert response.headers['ETag'] == f'"{ETAG}"'
    assert response.headers['Cache-Control'] == 'public, max-age=31536000, immutable'
    assert response.headers['Content-Type'] == 'image/png'
    assert response.headers['Accept-Ranges'] == 'bytes'
    assert response.headers['X-Content-Type-Options'] == 'nosniff'
    assert 'sandbox' in response.headers['Content-Security-Policy']
    assert response.headers['Content-Disposition'] == 'inline; filename="photo.png"'


def test_a_large_file_is_streamed_and_closed():
    data = b'z' * (200 * 1024)

    response = client(data).simulate_get('/file')

    assert response.content == data
    assert response.headers['Content-Length'] == str(len(data))


def test_head_sends_the_headers_of_a_get_without_the_bytes():
    response = client().simulate_head('/file')

    assert response.status_code == 200
    assert response.content == b''
    assert response.headers['Content-Length'] == str(len(DATA))
    assert response.headers['ETag'] == f'"{ETAG}"'
    assert TrackedFile.opened == []


@pytest.mark.parametrize(
    ('header', 'start', 'end'),
    [('bytes=2-5', 2, 5), ('bytes=90-', 90, 99), ('bytes=-3', 97, 99), ('bytes=95-1000', 95, 99), ('BYTES=0-0', 0, 0)],
)
def test_one_range_is_206_with_its_bytes(header, start, end):
    response = client().simulate_get('/file', headers={'Range': header})

    assert response.status_code == 206
    assert response.content == DATA[start : end + 1]
    assert response.headers['Content-Range'] == f'bytes {start}-{end}/100'
    assert response.headers['Content-Length'] == str(end - start + 1)


def test_a_suffix_longer_than_the_file_is_the_whole_file():
    response = client().simulate_get('/file', headers={'Range': 'bytes=-500'})

    assert response.status_code == 206
    assert response.headers['Content-Range'] == 'bytes 0-99/100'


@pytest.mark.parametrize('header', ['bytes=100-', 'bytes=1000-2000', 'bytes=-0'])
def test_an_unsatisfiable_range_is_416_with_the_size(header):
    response = client().simulate_get('/file', headers={'Range': header})

    assert response.status_code == 416
    assert response.headers['Content-Range'] == 'bytes */100'


@pytest.mark.parametrize(
    'header', ['bytes=0-1,5-6', 'bytes=5-3', 'items=0-5', 'bytes=a-b', 'bytes=-', 'bytes=+1-2', 'bytes=1_0-20']
)
def test_a_range_rfc_9110_says_to_ignore_gets_the_whole_file(header):
    response = client().simulate_get('/file', headers={'Range': header})

    assert response.status_code == 200
    assert response.content == DATA


def test_no_range_of_an_empty_file():
    response = client(b'').simulate_get('/file', headers={'Range': 'bytes=0-5'})

    assert response.status_code == 200
    assert response.content == b''


def test_if_range_with_our_etag_serves_the_range_and_any_other_the_whole_file():
    ranged = client().simulate_get('/file', headers={'Range': 'bytes=0-1', 'If-Range': f'"{ETAG}"'})
    stale = client().simulate_get('/file', headers={'Range': 'bytes=0-1', 'If-Range': '"sha256:other"'})
    dated = client().simulate_get('/file', headers={'Range': 'bytes=0-1', 'If-Range': 'Wed, 21 Oct 2015 07:28:00 GMT'})

    assert (ranged.status_code, ranged.content) == (206, DATA[:2])
    assert (stale.status_code, stale.content) == (200, DATA)
    assert (dated.status_code, dated.content) == (200, DATA)


@pytest.mark.parametrize('header', [f'"{ETAG}"', f'W/"{ETAG}"', f'"other", "{ETAG}"', '*'])
def test_if_none_match_of_our_etag_is_304(header):
    response = client().simulate_get('/file', headers={'If-None-Match': header})

    assert response.status_code == 304
    assert response.content == b''
    assert response.headers['ETag'] == f'"{ETAG}"'
    assert response.headers['Cache-Control'] == 'public, max-age=31536000, immutable'


def test_if_none_match_of_another_etag_sends_the_file():
    response = client().simulate_get('/file', headers={'If-None-Match': '"sha256:other"'})

    assert (response.status_code, response.content) == (200, DATA)


@pytest.mark.parametrize(
    'content_type', ['text/html', 'text/html; charset=utf-8', 'image/svg+xml', 'application/xml', 'application/foo+xml']
)
def test_active_content_is_an_attachment(content_type):
    response = client(content_type=content_type, filename='page.html').simulate_get('/file')

    assert is_active(content_type)
    assert response.headers['Content-Disposition'] == 'attachment; filename="page.html"'
    assert response.headers['Content-Security-Policy'].endswith('sandbox')


@pytest.mark.parametrize('content_type', ['image/png', 'text/plain', 'application/octet-stream', 'application/json'])
def test_passive_content_is_inline(content_type):
    assert not is_active(content_type)


@pytest.mark.parametrize(
    ('filename', 'expected'),
    [
        ('photo.png', 'inline; filename="photo.png"'),
        ('say "hi".txt', 'inline; filename="say \\"hi\\".txt"'),
        ('back\\slash', 'inline; filename="back\\\\slash"'),
        ('café.png', 'inline; filename="cafe.png"; filename*=UTF-8\'\'caf%C3%A9.png'),
        ('日本.png', 'inline; filename=".png"; filename*=UTF-8\'\'%E6%97%A5%E6%9C%AC.png'),
        ('日本', 'inline; filename="download"; filename*=UTF-8\'\'%E6%97%A5%E6%9C%AC'),
        ('a b;c.png', 'inline; filename="a b;c.png"'),
    ],
)
def test_content_disposition_follows_rfc_6266_and_5987(filename, expected):
    assert content_disposition(filename) == expected


def test_an_attachment_is_named_so():
    assert content_disposition('x.svg', attachment=True) == 'attachment; filename="x.svg"'


def test_accel_path_hands_a_get_to_nginx_with_every_header_decided():
    response = client(accel_path='/_blobs/ab/cd/abcd').simulate_get('/file', headers={'Range': 'bytes=0-9'})

    assert response.headers['X-Accel-Redirect'] == '/_blobs/ab/cd/abcd'
    assert response.content == b''
    assert response.headers['ETag'] == f'"{ETAG}"'
    assert 'sandbox' in response.headers['Content-Security-Policy']


def test_accel_path_still_answers_416_itself():
    response = client(accel_path='/_blobs/x').simulate_get('/file', headers={'Range': 'bytes=500-'})

    assert response.status_code == 416
    assert 'X-Accel-Redirect' not in response.headers


def test_a_head_is_answered_here_even_with_an_accel_path():
    response = client(accel_path='/_blobs/x').simulate_head('/file')

    assert 'X-Accel-Redirect' not in response.headers
    assert response.headers['Content-Length'] == str(len(DATA))


def test_a_failure_before_send_file_closes_the_file():
    file = TrackedFile(DATA)

    with pytest.raises(RuntimeError), closed_on_error(file):
        raise RuntimeError('the meta could not be read')

    assert file.closed


def test_etag_matches_nothing_without_if_none_match():
    assert not etag_matches(None, ETAG)
    assert not etag_matches([], ETAG)
