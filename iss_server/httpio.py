"""Bytes in and out over HTTP: request bodies, uploads, and file responses.

In: :class:`RequestBody` reads a body within the upload limit (straight from
gunicorn's socket when it can, :class:`SocketBody`), and
:class:`UploadReceiver` stages the file of a form or a raw body in the store.
Out: :func:`send_file` composes the answer of an immutable file, like
Werkzeug's ``send_file``: ETag, 304, one Range (206/416), the sandboxing
headers, X-Accel-Redirect or sendfile(2), and it closes what it opens.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import re
import socket
import unicodedata
import urllib.parse
from collections.abc import Callable, Iterator
from typing import IO, Any

import falcon
import gunicorn.http.body

from iss_server import forms
from iss_server.blobs import BlobStat, OpenBlob
from iss_server.config import Settings
from iss_server.errors import BadRequest, IncompleteBody, LengthRequired, TooManyFiles, UploadTooLarge
from storage import BlobStore, Staged

# NOTE: one year, and "immutable": a blob's bytes can never change under its id.
_IMMUTABLE = ('public', 'max-age=31536000', 'immutable')

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

_RANGE_PATTERN = re.compile(r'bytes=(\d{0,18})-(\d{0,18})', re.IGNORECASE)

# Blobs up to this size are read and sent from memory; larger ones go out with sendfile(2).
_SMALL_BLOB_BYTES = 64 * 1024


# -- the request body -----------------------------------------------------------


class RequestBody:
    """The request body as a stream that enforces the upload limit and notices truncation.

    A body declared larger than the limit is refused before a byte is read;
    a chunked one is refused as soon as it crosses the limit. A client that
    goes away before sending what it declared, or pauses longer than the body
    timeout, gets :class:`errors.IncompleteBody`, which the store sees as an
    ordinary exception (and removes its temp file).
    """

    def __init__(self, req: falcon.Request, limit: int, timeout: int) -> None:
        self._limit = limit
        self._received = 0
        self.declared_length = req.content_length
        connection = req.env.get('gunicorn.socket')
        if connection is not None:
            # APPSEC: gunicorn's threads read bodies from a blocking socket with no
            # timeout, so a client that stops sending would hold a thread for ever.
            # gunicorn makes the socket blocking again before the next request.
            connection.settimeout(timeout)
        if self.declared_length is None:
            # NOTE: a chunked body is only safe to read when the server
            # marks where it ends (gunicorn does; PEP 3333 servers may not).
            if not req.env.get('wsgi.input_terminated'):
                raise LengthRequired('Send a Content-Length header (or a chunked body to a server that supports it).')
            self._stream = req.stream
        elif self.declared_length > limit:
            raise UploadTooLarge(limit)
        else:
            self._stream = SocketBody.of(req.env) or req.bounded_stream

    def read(self, size: int = -1) -> bytes:
        with self._arriving():
            data = self._stream.read(size)
        self._count(len(data), size)
        return data

    def readinto(self, buffer: memoryview) -> int:
        """Fill the start of ``buffer`` with the next bytes of the body; 0 at its end."""
        with self._arriving():
            if isinstance(self._stream, SocketBody):
                received = self._stream.readinto(buffer)
            else:
                data = self._stream.read(len(buffer))
                received = len(data)
                buffer[:received] = data
        self._count(received, len(buffer))
        return received

    @contextlib.contextmanager
    def _arriving(self) -> Iterator[None]:
        """Whatever reading the body raises (a reset, a timeout) is an incomplete body."""
        try:
            yield
        except Exception as exc:
            raise IncompleteBody(f'The body stopped arriving: {exc or type(exc).__name__}') from exc

    def _count(self, received: int, asked: int) -> None:
        self._received += received
        if self._received > self._limit:
            raise UploadTooLarge(self._limit)
        if not received and asked != 0 and self.declared_length is not None and self._received < self.declared_length:
            raise IncompleteBody(f'Received {self._received} of the {self.declared_length} bytes declared.')


class SocketBody:
    """The rest of a gunicorn request body of known length, received straight from its socket.

    PERF: gunicorn's reader passes each piece through three BytesIO buffers and
    slices it on every read, and each fresh 1 MiB buffer is fresh pages from the
    kernel; ``recv_into`` a reused buffer copies each byte once. The bytes
    gunicorn read ahead with the headers come first, and its reader is told
    what was taken, so it finds the body consumed when the next request on the
    connection is parsed (or, if a read failed, closes the connection).

    NOTE: this reaches into gunicorn's Body, LengthReader and unreader, as of the
    pinned gunicorn 27.0.1; test_gunicorn.py's pipelining, trickle and half-close
    tests fail if an upgrade changes them. Any other server gets the plain stream.
    """

    _CHUNK_SIZE = 1024 * 1024

    def __init__(self, body: gunicorn.http.body.Body, reader: gunicorn.http.body.LengthReader) -> None:
        self._body = body
        self._reader = reader
        self._socket = reader.unreader.sock
        # What gunicorn holds already: Body's buffer (counted off the length) and the
        # read-ahead after the headers, of which only the body's part is taken.
        ahead = reader.unreader.take_buffered()
        taken, rest = ahead[: reader.length], ahead[reader.length :]
        if rest:
            reader.unreader.unread(rest)
        reader.length -= len(taken)
        self._pending = memoryview(body.buf.getvalue() + taken)
        body.buf = io.BytesIO()

    @classmethod
    def of(cls, env: dict[str, Any]) -> SocketBody | None:
        """The body of this request as a SocketBody, or None when it is not a gunicorn one of known length."""
        body = env.get('wsgi.input')
        reader = getattr(body, 'reader', None)
        if (
            isinstance(body, gunicorn.http.body.Body)
            and isinstance(reader, gunicorn.http.body.LengthReader)
            and isinstance(getattr(reader.unreader, 'sock', None), socket.socket)
        ):
            return cls(body, reader)
        return None

    def readinto(self, buffer: memoryview) -> int:
        if self._pending:
            count = min(len(buffer), len(self._pending))
            buffer[:count], self._pending = self._pending[:count], self._pending[count:]
            return count
        if not self._reader.length:
            return 0
        with self._marking_failure():
            count = self._socket.recv_into(buffer, min(len(buffer), self._reader.length))
        self._reader.length -= count
        return count

    def read(self, size: int = -1) -> bytes:
        """Like a raw stream's read: up to ``size`` bytes, fewer if fewer have arrived; all with -1."""
        if size is None or size < 0:
            return b''.join(iter(lambda: self.read(self._CHUNK_SIZE), b''))
        if self._pending:
            data, self._pending = self._pending[:size].tobytes(), self._pending[size:]
            return data
        if not self._reader.length:
            return b''
        with self._marking_failure():
            data = self._socket.recv(min(size, self._reader.length))
        self._reader.length -= len(data)
        return data

    @contextlib.contextmanager
    def _marking_failure(self) -> Iterator[None]:
        """A failed read leaves the connection mid-body: gunicorn must close it, not reuse it."""
        try:
            yield
        except BaseException:
            self._body.failed = True
            raise


# -- uploads --------------------------------------------------------------------


@dataclasses.dataclass
class Upload:
    """A received upload: the staged bytes and what came with them."""

    staged: Staged
    filename: str | None
    content_type: str | None
    fields: dict[str, str]


class UploadReceiver:
    """Stages the files of a multipart form (fields ``file``) or a raw request body."""

    # NOTE: besides its files, a form carries a couple of short fields.
    _MAX_OTHER_PARTS = 16

    def __init__(self, store: BlobStore, settings: Settings) -> None:
        self._store = store
        self._limit = settings.max_upload_bytes
        self._timeout = settings.body_timeout
        self._max_field_bytes = settings.max_meta_bytes

    @contextlib.contextmanager
    def receive(
        self,
        req: falcon.Request,
        *,
        form_fields: tuple[str, ...] = (),
        max_files: int = 1,
        expected: str | None = None,
    ) -> Iterator[list[Upload]]:
        """Stage the upload's files, in order; what is not committed is discarded when the block exits.

        A raw body is one file; a form carries 1 to ``max_files`` parts named ``file``.
        ``expected``: the id a raw body claims (a PUT), handed to the store's ``stage``.

        Raises:
            TooManyFiles: the form carries more than ``max_files`` (which is more than 1).
        """
        body = RequestBody(req, self._limit, self._timeout)
        if is_multipart(req):
            uploads = self._receive_form(req, body, form_fields, max_files)
        else:
            uploads = [Upload(self._store.stage(body, expected), None, req.content_type, {})]
        try:
            yield uploads
        finally:
            for upload in uploads:
                upload.staged.discard()

    def read_small(self, req: falcon.Request, limit: int) -> bytes:
        """The whole body of a request that carries a small document (JSON), at most ``limit`` bytes."""
        return RequestBody(req, limit, self._timeout).read()

    def _receive_form(
        self, req: falcon.Request, body: RequestBody, form_fields: tuple[str, ...], max_files: int
    ) -> list[Upload]:
        form = forms.FormReader(
            body, req.content_type, max_parts=max_files + self._MAX_OTHER_PARTS, length=body.declared_length
        )
        uploads: list[Upload] = []
        fields: dict[str, str] = {}
        other_parts = 0
        try:
            for part in form.parts():
                if part.name != 'file':
                    other_parts += 1
                    if other_parts > self._MAX_OTHER_PARTS:
                        raise BadRequest(
                            f'The form exceeds the maximum number of parts besides files ({self._MAX_OTHER_PARTS}).',
                            title='Malformed multipart/form-data request media',
                        )
                if part.name == 'file':
                    if len(uploads) == max_files:
                        if max_files == 1:
                            raise BadRequest('Send exactly one form field named "file".', title='Two files')
                        raise TooManyFiles(max_files)
                    uploads.append(Upload(self._store.stage(part), part.filename, part.content_type, fields))
                elif part.name in form_fields:
                    if part.name in fields:
                        raise BadRequest(f'The form field "{part.name}" was sent twice.', title='Repeated field')
                    fields[part.name] = part.read_all(self._max_field_bytes).decode('utf-8', 'replace')
        except BaseException:
            for upload in uploads:
                upload.staged.discard()
            raise
        if not uploads:
            raise BadRequest('The form has no field named "file" (curl -F file=@path).', title='No file')
        return uploads


def is_multipart(req: falcon.Request) -> bool:
    return (req.content_type or '').lower().startswith('multipart/form-data')


# -- file responses ----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Presentation:
    """How a file is presented to the client: its type, and the name it is saved as."""

    content_type: str
    filename: str


@dataclasses.dataclass(frozen=True)
class Sendable:
    """What :func:`send_file` serves, and how to learn about it only as far as the request needs.

    A GET costs an ``open``, a HEAD a ``stat``, and a 304 only the check that
    the thing is still stored (``exists``, by default the ``stat``). The type
    and the name to save it as may depend on which stored copy it is.
    """

    etag: str
    open: Callable[[], OpenBlob]
    stat: Callable[[], BlobStat]
    describe: Callable[[BlobStat], Presentation]
    exists: Callable[[], object] | None = None
    #: Where a proxy in front finds the bytes (X-Accel-Redirect), or None to send them here.
    redirect: Callable[[BlobStat], str | None] = lambda stat: None


def send_file(req: falcon.Request, resp: falcon.Response, sendable: Sendable) -> None:
    """Answer with an immutable file: its headers, 304, one Range (206/416), sendfile(2) when large.

    Every header and status is decided here; with a redirect, nginx then sends
    the bytes (and cuts the range). What this opens is handed to the response
    or closed, whatever happens.
    """
    # NOTE: the store is asked first, so a malformed id never reaches a header.
    if etag_matches(req.if_none_match, sendable.etag):
        (sendable.exists or sendable.stat)()  # NOTE: 304 only for what is still stored
        _immutable(resp, sendable.etag)
        resp.status = falcon.HTTP_304
        return
    blob = sendable.open() if req.method != 'HEAD' else None
    file = blob.file if blob is not None else None
    try:
        stat = blob.stat if blob is not None else sendable.stat()
        presentation = sendable.describe(stat)
        _immutable(resp, sendable.etag)
        resp.content_type = presentation.content_type
        resp.accept_ranges = 'bytes'
        resp.set_header('X-Content-Type-Options', 'nosniff')
        resp.set_header('Content-Security-Policy', _BLOB_CSP)
        active = is_active(presentation.content_type)
        resp.set_header('Content-Disposition', content_disposition(presentation.filename, attachment=active))
        byte_range = _requested_range(req, sendable.etag, stat.size)
        redirect = sendable.redirect(stat) if file is not None else None
        if redirect is not None:
            # PERF: nginx sends the file with sendfile and applies the Range
            # itself; an unsatisfiable one was already answered 416 above.
            resp.set_header('X-Accel-Redirect', redirect)
            return
        if byte_range is None:
            if file is not None and stat.size <= _SMALL_BLOB_BYTES:
                # PERF: one read beats sendfile's setup for a thumbnail-sized blob
                # (4 KiB GETs: +9-14% req/s, p99 21 -> 17 ms; gunicorn, 2 cores).
                resp.data = file.read()
                return
            resp.content_length = stat.size
            # PERF: a plain file object: Falcon hands it to wsgi.file_wrapper
            # and gunicorn sends it with sendfile(2).
            resp.stream, file = _streamable(file), None
            return
        start, end = byte_range
        resp.status = falcon.HTTP_206
        resp.content_range = (start, end, stat.size)
        resp.content_length = end - start + 1
        if file is not None:
            resp.stream, file = _streamable(_slice(req, file, start, end - start + 1)), None
    finally:
        if file is not None:
            file.close()


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
    resp.cache_control = _IMMUTABLE


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

    def read(self, size: int = -1) -> bytes:
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
        file.fileno()
    except (AttributeError, OSError, ValueError):
        return InPieces(file)
    return file


def _slice(req: falcon.Request, file: IO[bytes], start: int, length: int) -> FileSlice:
    if req.env.get('SERVER_SOFTWARE', '').startswith('gunicorn/'):
        return SendfileSlice(file, start, length)
    return FileSlice(file, start, length)
