"""File responses: an immutable blob or derivative, answered like Werkzeug's ``send_file``.

:func:`send_file` takes the open file (None for a HEAD) and what the caller knows
of it as plain keywords, and decides every header and status: ETag, the
immutable Cache-Control, one Range (206/416), the sandboxing headers (CSP,
nosniff, attachment for active types), X-Accel-Redirect or sendfile(2). It
closes what it is given, whatever happens. :func:`send_not_modified` is the 304,
which a caller answers first, once it has checked the thing is still stored.
"""

from __future__ import annotations

import contextlib
import re
import unicodedata
import urllib.parse
from collections.abc import Iterator
from typing import IO

import falcon

# NOTE: one year, and "immutable": a blob's bytes can never change under its id.
IMMUTABLE = ('public', 'max-age=31536000', 'immutable')

# APPSEC: every blob response is a sandboxed document with no sources allowed,
# so even content that a browser would render as a page runs no script in our
# origin; images still display when opened directly.
_BLOB_CSP = "default-src 'none'; style-src 'unsafe-inline'; sandbox"

# APPSEC: types a browser runs as active content are also sent as attachments.
_ACTIVE_TYPES = frozenset(
    {
        'text/html',
        'application/xhtml+xml',
        'image/svg+xml',
        'text/xml',
        'application/xml',
        'text/xsl',
        'text/javascript',
        'application/javascript',
        'application/x-javascript',
        'application/ecmascript',
        'text/ecmascript',
        'application/wasm',
        'multipart/x-mixed-replace',
    }
)

_RANGE_PATTERN = re.compile(r'bytes=([0-9]{0,18})-([0-9]{0,18})', re.IGNORECASE)  # NOTE: \d takes '²'

# Blobs up to this size are read and sent from memory; larger ones go out with sendfile(2).
_SMALL_BLOB_BYTES = 64 * 1024


def send_not_modified(resp: falcon.Response, etag: str) -> None:
    """304: the client's copy (If-None-Match, see :func:`etag_matches`) is this one.

    NOTE: the caller checks first that the thing is still stored: 304 only for what is.
    """
    _immutable(resp, etag)
    resp.status = falcon.HTTP_304


def send_file(
    req: falcon.Request,
    resp: falcon.Response,
    file: IO[bytes] | None,
    *,
    etag: str,
    size: int,
    content_type: str,
    filename: str,
    accel_path: str | None = None,
) -> None:
    """Answer with an immutable file: its headers, one Range (206/416), sendfile(2) when large.

    Args:
        file: the open file for a GET, None for a HEAD; handed to the response or closed.
        etag: the strong ETag (the blob's id, or the id and the variant of a derivative).
        size: the file's size in bytes.
        content_type: served as is; a type a browser would run is also an attachment.
        filename: the name the client saves it as (Content-Disposition, RFC 6266).
        accel_path: where nginx finds the bytes (X-Accel-Redirect): nginx then sends
            them, and cuts the range, with every header already decided here.
    """
    try:
        _immutable(resp, etag)
        resp.content_type = content_type
        resp.accept_ranges = 'bytes'
        resp.set_header('X-Content-Type-Options', 'nosniff')
        resp.set_header('Content-Security-Policy', _BLOB_CSP)
        resp.set_header('Content-Disposition', content_disposition(filename, attachment=is_active(content_type)))
        byte_range = _requested_range(req, etag, size)
        if file is not None and accel_path is not None:
            # PERF: nginx sends the file with sendfile and applies the Range
            # itself; an unsatisfiable one was already answered 416 above.
            resp.set_header('X-Accel-Redirect', accel_path)
            return
        if byte_range is None:
            if file is not None and size <= _SMALL_BLOB_BYTES:
                # PERF: one read beats sendfile's setup for a thumbnail-sized blob
                # (4 KiB GETs: +9-14% req/s, p99 21 -> 17 ms; gunicorn, 2 cores). Of its
                # known size: read() to the end costs an fstat, an lseek and a read more (strace).
                resp.data = file.read(size)
                return
            resp.content_length = size
            if file is not None:
                # PERF: a plain file object: Falcon hands it to wsgi.file_wrapper
                # and gunicorn sends it with sendfile(2).
                resp.stream, file = _streamable(file), None
            return
        start, end = byte_range
        resp.status = falcon.HTTP_206
        resp.content_range = (start, end, size)
        resp.content_length = end - start + 1
        if file is not None:
            resp.stream, file = _streamable(_slice(req, file, start, end - start + 1)), None
    finally:
        if file is not None:
            file.close()


@contextlib.contextmanager
def closed_on_error(file: IO[bytes] | None) -> Iterator[None]:
    """Close ``file`` if the block fails before it is handed to :func:`send_file`."""
    try:
        yield
    except BaseException:
        if file is not None:
            file.close()
        raise


def is_active(content_type: str) -> bool:
    """Whether a browser would run content of this type (HTML, SVG, script, any XML) if it rendered it."""
    essence = content_type.partition(';')[0]
    return essence in _ACTIVE_TYPES or essence.endswith('+xml')


def content_disposition(filename: str, *, attachment: bool = False) -> str:
    """``inline`` (or ``attachment``) with the file name, RFC 6266: ``filename*`` when it is not ASCII.

    ``filename`` comes cleaned of control characters (see meta.clean_filename); quotes
    and backslashes are escaped here, so nothing in it can end the header or the parameter.
    """
    kind = 'attachment' if attachment else 'inline'
    try:
        filename.encode('ascii')
    except UnicodeEncodeError:
        fallback = unicodedata.normalize('NFKD', filename).encode('ascii', 'ignore').decode() or 'download'
        encoded = urllib.parse.quote(filename, safe='!#$&+-.^_`|~')
        return f'{kind}; filename="{_quoted(fallback)}"; filename*=UTF-8\'\'{encoded}'
    return f'{kind}; filename="{_quoted(filename)}"'


def _quoted(text: str) -> str:
    return text.replace('\\', '\\\\').replace('"', '\\"')


def _immutable(resp: falcon.Response, etag: str) -> None:
    resp.etag = etag
    resp.cache_control = IMMUTABLE


def etag_matches(if_none_match: list | None, etag: str) -> bool:
    """If-None-Match uses weak comparison (RFC 9110 13.1.2), and ``*`` matches anything stored."""
    if not if_none_match:
        return False
    return any(tag == '*' or str(tag) == etag for tag in if_none_match)


def _requested_range(req: falcon.Request, etag: str, size: int) -> tuple[int, int] | None:
    """Return the single byte range to serve, or None to serve the whole file.

    A Range header that is malformed, asks for several ranges, or comes with
    an If-Range that is not our ETag is ignored, as RFC 9110 14.2 allows;
    a well-formed range that starts past the end gets 416.

    NOTE: not Falcon's ``req.range``: it answers 400 to what RFC 9110 says to ignore
    (several ranges, ``5-3``), takes ``bytes=-0`` (unsatisfiable: 416) as malformed,
    and lets ``int`` read ``+5`` and ``1_0``. falcon.routing.static's checks are kept:
    no range of an empty file, 416 past the end, the end clamped to the size.
    """
    header = req.get_header('Range')
    if header is None or size == 0:
        return None
    if_range = req.get_header('If-Range')
    if if_range is not None and if_range.strip() != f'"{etag}"':
        return None
    match = _RANGE_PATTERN.fullmatch(header.strip())
    if match is None:
        return None
    first, last = match.groups()
    if not first:
        if not last:
            return None
        if int(last) == 0:
            raise falcon.HTTPRangeNotSatisfiable(size)
        return max(0, size - int(last)), size - 1
    start = int(first)
    end = int(last) if last else size - 1
    if last and end < start:
        return None
    if start >= size:
        raise falcon.HTTPRangeNotSatisfiable(size)
    return start, min(end, size - 1)


class FileSlice:
    """A byte range of an open file, read no further than its end."""

    def __init__(self, file: IO[bytes], start: int, length: int) -> None:
        file.seek(start)
        self._file = file
        self._remaining = length

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0 or size > self._remaining:
            size = self._remaining
        data = self._file.read(size)
        self._remaining -= len(data)
        return data

    def close(self) -> None:
        self._file.close()


class SendfileSlice(FileSlice):
    """A FileSlice that gunicorn may send with sendfile(2).

    PERF: gunicorn sends exactly Content-Length bytes from the file's current
    offset, so a range stays zero-copy there. Other servers may send to the
    end of the file (see falcon.routing.static), so they get a FileSlice.
    """

    def fileno(self) -> int:
        return self._file.fileno()

    def seek(self, offset: int) -> int:
        """Where socket.sendfile leaves the file when the sending stops part way (telemetry.body_done reads it)."""
        return self._file.seek(offset)


class InPieces:
    """A file with no descriptor (a blob streaming from a bucket), sent in pieces of 1 MiB.

    PERF: Falcon hands a ``read``-able stream to wsgi.file_wrapper, which reads 8 KiB
    at a time: from S3 that ran at 133 MiB/s, in pieces of 1 MiB at 290-330 MiB/s
    (bench/s3.py). An iterable without ``read`` is sent as it yields. A thread reading
    ahead while the last piece is sent gained nothing (the GIL): not kept.
    """

    _PIECE = 1024 * 1024

    def __init__(self, file: IO[bytes] | FileSlice) -> None:
        self._file = file

    def __iter__(self) -> Iterator[bytes]:
        while piece := self._file.read(self._PIECE):
            yield piece

    def close(self) -> None:
        self._file.close()


def _streamable(file: IO[bytes] | FileSlice) -> IO[bytes] | FileSlice | InPieces:
    """The file itself when gunicorn can sendfile(2) it, else :class:`InPieces` of it."""
    try:
        # NOTE: a FileSlice has no fileno (AttributeError), its SendfileSlice has
        file.fileno()  # type: ignore[union-attr]
    except (AttributeError, OSError, ValueError):
        return InPieces(file)
    return file


def _slice(req: falcon.Request, file: IO[bytes], start: int, length: int) -> FileSlice:
    if req.env.get('SERVER_SOFTWARE', '').startswith('gunicorn/'):
        return SendfileSlice(file, start, length)
    return FileSlice(file, start, length)
