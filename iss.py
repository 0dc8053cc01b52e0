"""ISS, the Image Store Service: images and artifacts stored by content address.

Read :func:`create_app` first: it wires every route to its resource. The
resources speak HTTP; the store (``storage.py``) speaks bytes. gunicorn runs
``iss:app``, which is built from the environment on first use::

    gunicorn iss:app              # reads ./gunicorn.conf.py
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hmac
import io
import json
import logging
import pathlib
import re
import socket
import sys
import threading
import time
import urllib.parse
from collections.abc import Iterator
from typing import IO, Any

import falcon
import gunicorn.http.body
import yaml
from swagger_ui_bundle import swagger_ui_path

import forms
import images
import index
import storage
import telemetry
from config import Settings

log = logging.getLogger('iss')

HERE = pathlib.Path(__file__).resolve().parent

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

_MEDIA_TYPE_PATTERN = re.compile(r'[a-z0-9!#$&^_.+-]+/[a-z0-9!#$&^_.+-]+')
_CHARSET_PATTERN = re.compile(r'charset="?([A-Za-z0-9._:-]{1,40})"?')
_NUMBER_PATTERN = re.compile(r'-?\d{1,12}(\.\d{1,9})?')
_RANGE_PATTERN = re.compile(r'bytes=(\d{0,18})-(\d{0,18})', re.IGNORECASE)

# Keys ISS writes into every meta file; an artifact's own meta may not use them.
RESERVED_META_KEYS = images.IMAGE_META_KEYS | frozenset(
    {
        'kind',
        'bytes',
        'mime',
        'width',
        'height',
        'format',
        'created_at',
        'image_id',
        'artifact_id',
        'filename',
    }
)

OCTET_STREAM = 'application/octet-stream'

# Blobs up to this size are read and sent from memory; larger ones go out with sendfile(2).
_SMALL_BLOB_BYTES = 64 * 1024


# -- errors ---------------------------------------------------------------------


class UploadTooLarge(falcon.HTTPContentTooLarge):
    def __init__(self, limit: int) -> None:
        super().__init__(
            title='Upload too large',
            description=f'The request body is larger than this service accepts ({limit} bytes).',
        )


class IncompleteBody(falcon.HTTPBadRequest):
    def __init__(self, detail: str) -> None:
        super().__init__(title='Incomplete request body', description=detail)


def _serialize_error(req: falcon.Request, resp: falcon.Response, error: falcon.HTTPError) -> None:
    """Write every error as JSON, whatever the client accepts.

    ``detail`` repeats the description for clients of the FastAPI version.
    """
    body = error.to_dict()
    body['status'] = error.status_code
    body['detail'] = body.get('description', body['title'])
    resp.data = json.dumps(body).encode()
    resp.content_type = falcon.MEDIA_JSON


def _raise_store_error(req: falcon.Request, resp: falcon.Response, error: Exception, params: dict) -> None:
    """Map what the store raises to HTTP, in one place for every resource."""
    if isinstance(error, storage.BlobNotFound):
        raise falcon.HTTPNotFound(title='Blob not found', description=f'Nothing is stored under {error}.')
    if isinstance(error, storage.InvalidId):
        raise falcon.HTTPNotFound(
            title='Malformed id',
            description=f'{error}, so it names no stored blob.',
        )
    if isinstance(error, storage.IndexIncomplete):
        raise falcon.HTTPServiceUnavailable(
            title='Index not ready',
            description='The index is being built from the files (python -m iss reindex); try again shortly.',
            retry_after=10,
        )
    if isinstance(error, storage.StoreFull):
        log.error('store full: %s', error)
        raise falcon.HTTPInsufficientStorage(
            title='Storage full', description='The store has no room for this upload; nothing was stored.'
        )
    log.error('store unavailable: %s', error)
    raise falcon.HTTPServiceUnavailable(
        title='Storage unavailable', description='The data directory cannot be used right now.'
    )


def _log_unexpected_error(req: falcon.Request, resp: falcon.Response, error: Exception, params: dict) -> None:
    """A bug: logged with its traceback and request id; the client gets a plain JSON 500."""
    request_id = telemetry.request_id(req)
    log.error('unexpected error', exc_info=error, extra={'request': {'request_id': request_id}})
    raise falcon.HTTPInternalServerError(
        title='Internal error',
        description=f'Something went wrong in ISS; the log has the details under request id {request_id}.',
    )


# -- the request body -----------------------------------------------------------


class RequestBody:
    """The request body as a stream that enforces the upload limit and notices truncation.

    A body declared larger than the limit is refused before a byte is read;
    a chunked one is refused as soon as it crosses the limit. A client that
    goes away before sending what it declared, or pauses longer than the body
    timeout, gets :class:`IncompleteBody`, which the store sees as an ordinary
    exception (and removes its temp file).
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
                raise falcon.HTTPLengthRequired(
                    title='Length required',
                    description='Send a Content-Length header (or a chunked body to a server that supports it).',
                )
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


@dataclasses.dataclass
class Upload:
    """A received upload: the staged bytes and what came with them."""

    staged: storage.StagedBlob
    filename: str | None
    content_type: str | None
    fields: dict[str, str]


class UploadReceiver:
    """Stages the file of a multipart form (field ``file``) or a raw request body."""

    _MAX_FORM_PARTS = 16

    def __init__(self, store: storage.FileStore, settings: Settings) -> None:
        self._store = store
        self._limit = settings.max_upload_bytes
        self._timeout = settings.body_timeout
        self._max_field_bytes = settings.max_meta_bytes

    @contextlib.contextmanager
    def receive(self, req: falcon.Request, *, form_fields: tuple[str, ...] = ()) -> Iterator[Upload]:
        """Stage the upload; the temp file is removed when the block exits uncommitted."""
        body = RequestBody(req, self._limit, self._timeout)
        if is_multipart(req):
            upload = self._receive_form(req, body, form_fields)
        else:
            staged = self._store.stage(body)
            upload = Upload(staged, None, req.content_type, {})
        with upload.staged:
            yield upload

    def _receive_form(self, req: falcon.Request, body: RequestBody, form_fields: tuple[str, ...]) -> Upload:
        # APPSEC: a form carries one file and a couple of short fields.
        form = forms.FormReader(body, req.content_type, max_parts=self._MAX_FORM_PARTS, length=body.declared_length)
        upload: Upload | None = None
        fields: dict[str, str] = {}
        try:
            for part in form.parts():
                if part.name == 'file':
                    if upload is not None:
                        raise falcon.HTTPBadRequest(
                            title='Two files', description='Send exactly one form field named "file".'
                        )
                    staged = self._store.stage(part)
                    upload = Upload(staged, part.filename, part.content_type, fields)
                elif part.name in form_fields:
                    if part.name in fields:
                        raise falcon.HTTPBadRequest(
                            title='Repeated field', description=f'The form field "{part.name}" was sent twice.'
                        )
                    fields[part.name] = part.read_all(self._max_field_bytes).decode('utf-8', 'replace')
        except BaseException:
            if upload is not None:
                upload.staged.discard()
            raise
        if upload is None:
            raise falcon.HTTPBadRequest(
                title='No file', description='The form has no field named "file" (curl -F file=@path).'
            )
        return upload


def is_multipart(req: falcon.Request) -> bool:
    return (req.content_type or '').lower().startswith('multipart/form-data')


def media_type(value: str | None) -> str:
    """Normalise a client-declared Content-Type, or fall back to octet-stream.

    Only a plain ``type/subtype`` (and a charset) is kept: anything else is
    not trusted into a response header.
    """
    if not value:
        return OCTET_STREAM
    essence, _, params = value.partition(';')
    essence = essence.strip().lower()
    # NOTE: curl --data-binary labels every body a form; that is no type at all.
    if not _MEDIA_TYPE_PATTERN.fullmatch(essence) or essence == 'application/x-www-form-urlencoded':
        return OCTET_STREAM
    charset = _CHARSET_PATTERN.search(params)
    return f'{essence}; charset={charset.group(1)}' if charset else essence


# -- resources ------------------------------------------------------------------


def store_image(store: storage.FileStore, upload: Upload, max_pixels: int) -> storage.Committed:
    """Commit an upload as an image, after Pillow identified it from its header."""
    with upload.staged.open() as file:
        try:
            meta = images.image_meta(file, upload.staged.size, max_pixels=max_pixels)
        except images.NotAnImage:
            raise falcon.HTTPUnsupportedMediaType(
                title='Not an image',
                description='The bytes are not an image format this service can identify; '
                'store other files with POST /artifacts?kind=...',
            ) from None
        except images.ImageTooLarge as exc:
            raise falcon.HTTPContentTooLarge(title='Image too large', description=str(exc)) from None
    return store.commit(upload.staged, meta)


class ArtifactFields:
    """Validates an artifact's ``kind`` and ``meta`` (query string first, then form)."""

    def __init__(self, settings: Settings) -> None:
        self._max_meta_bytes = settings.max_meta_bytes

    def check_query(self, req: falcon.Request) -> None:
        """PERF: what the query string says is checked before a byte of body is read."""
        if req.get_param('kind') is not None or not is_multipart(req):
            self.kind(req.get_param('kind'))
        self._meta(req.get_param('meta'))

    def build_meta(self, req: falcon.Request, upload: Upload) -> dict[str, Any]:
        """Return the meta file for this upload: the client's keys plus ISS's own."""
        kind = self.kind(self._value(req, upload, 'kind'))
        meta = self._meta(self._value(req, upload, 'meta'))
        meta.update(kind=kind, bytes=upload.staged.size, mime=media_type(upload.content_type), created_at=time.time())
        return meta

    @staticmethod
    def _value(req: falcon.Request, upload: Upload, name: str) -> str | None:
        value = req.get_param(name)
        if name not in upload.fields:
            return value
        if value is not None:
            raise falcon.HTTPBadRequest(
                title=f'Repeated {name}', description=f'Give {name} once: in the query string or as a form field.'
            )
        return upload.fields[name]

    @staticmethod
    def kind(kind: str | None) -> str:
        if kind is None or not storage.KIND_PATTERN.fullmatch(kind):
            raise falcon.HTTPBadRequest(
                title='Invalid kind',
                description='kind is required: 1 to 64 characters of A-Z, a-z, 0-9, ".", "_" or "-".',
            )
        return kind

    def _meta(self, text: str | None) -> dict[str, Any]:
        if not text:
            return {}
        if len(text.encode()) > self._max_meta_bytes:
            raise falcon.HTTPBadRequest(
                title='Invalid meta', description=f'meta is larger than {self._max_meta_bytes} bytes.'
            )
        try:
            meta = json.loads(text, parse_constant=_reject_constant)
        except (ValueError, RecursionError) as exc:
            raise falcon.HTTPBadRequest(title='Invalid meta', description=f'meta is not JSON: {exc}') from None
        if not isinstance(meta, dict):
            raise falcon.HTTPBadRequest(title='Invalid meta', description='meta must be a JSON object.')
        reserved = sorted(RESERVED_META_KEYS.intersection(meta))
        if reserved:
            raise falcon.HTTPBadRequest(
                title='Invalid meta', description=f'meta may not set keys ISS owns: {", ".join(reserved)}.'
            )
        return meta


def _answer_upload(
    resp: falcon.Response, id_field: str, digest: str, committed: storage.Committed, filename: str | None
) -> None:
    """201 with Location for new content, 200 when it was already stored."""
    body: dict[str, Any] = {id_field: digest, 'filename': filename}
    for key in ('kind', 'bytes', 'mime', 'width', 'height', 'created_at'):
        if key in committed.meta:
            body[key] = committed.meta[key]
    resp.media = body
    resp.location = f'/{id_field.partition("_")[0]}s/{digest}'
    resp.status = falcon.HTTP_201 if committed.created else falcon.HTTP_200


def _check_claimed_id(blob_id: str) -> None:
    try:
        storage.parse_id(blob_id)
    except storage.InvalidId as exc:
        raise falcon.HTTPBadRequest(title='Malformed id', description=str(exc)) from None


def _check_digest(staged: storage.StagedBlob, claimed: str) -> None:
    if staged.digest != claimed:
        raise falcon.HTTPBadRequest(
            title='Digest mismatch',
            description=f'The body hashes to {staged.digest}, not {claimed}; nothing was stored.',
        )


class Listing:
    """GET on a collection: its items newest first, filtered, in pages joined by a cursor.

    The items come from the store's index as stored JSON and are sent as
    they are: a page costs one indexed query, however big the store.
    """

    _DEFAULT_LIMIT = 100
    _MAX_LIMIT = 1000

    def __init__(self, store: storage.FileStore, collection: str, *, kind_filter: bool) -> None:
        self._store = store
        self._collection = collection
        self._kind_filter = kind_filter

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        limit = req.get_param_as_int('limit', min_value=1, max_value=self._MAX_LIMIT, default=self._DEFAULT_LIMIT)
        filters: dict[str, Any] = {
            'created_after': _timestamp_param(req, 'created_after'),
            'created_before': _timestamp_param(req, 'created_before'),
            'cursor': req.get_param('cursor') or None,
        }
        if self._kind_filter:
            kind = req.get_param('kind')
            filters['kind'] = None if kind is None else ArtifactFields.kind(kind)
        try:
            page = self._store.list(self._collection, limit=limit, **filters)
        except index.InvalidCursor as exc:
            raise falcon.HTTPBadRequest(title='Invalid cursor', description=str(exc)) from None
        next_url = None
        if page.next_cursor is not None:
            query = {key: value for key, value in req.params.items() if key != 'cursor'}
            query['cursor'] = page.next_cursor
            next_url = f'{req.path}?{urllib.parse.urlencode(query, doseq=True)}'
            resp.append_link(next_url, 'next')
        resp.cache_control = ('no-cache',)
        # PERF: the index stores each item as JSON, so a page is joined, not re-encoded.
        resp.data = b'{"items":[%s],"next":%s}' % (
            ','.join(page.items).encode(),
            json.dumps(next_url).encode(),
        )
        resp.content_type = falcon.MEDIA_JSON


class Images(Listing):
    """``/images``: GET lists images; POST stores a multipart file or a raw image/* body."""

    def __init__(self, store: storage.FileStore, receiver: UploadReceiver, settings: Settings) -> None:
        super().__init__(store, index.IMAGES, kind_filter=False)
        self._receiver = receiver
        self._max_pixels = settings.max_image_pixels

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        if not is_multipart(req) and not (req.content_type or '').lower().startswith('image/'):
            raise falcon.HTTPUnsupportedMediaType(
                title='Unsupported upload',
                description='Send multipart/form-data with a "file" field, or a raw body with an image/* '
                'Content-Type; store other files with POST /artifacts?kind=...',
            )
        with self._receiver.receive(req) as upload:
            committed = store_image(self._store, upload, self._max_pixels)
        _answer_upload(resp, 'image_id', upload.staged.digest, committed, upload.filename)


class Artifacts(Listing):
    """``/artifacts``: GET lists artifacts (of a kind); POST ``?kind=&meta=`` stores any file."""

    def __init__(self, store: storage.FileStore, receiver: UploadReceiver, fields: ArtifactFields) -> None:
        super().__init__(store, index.ARTIFACTS, kind_filter=True)
        self._receiver = receiver
        self._fields = fields

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        self._fields.check_query(req)
        with self._receiver.receive(req, form_fields=('kind', 'meta')) as upload:
            committed = self._store.commit(upload.staged, self._fields.build_meta(req, upload))
        _answer_upload(resp, 'artifact_id', upload.staged.digest, committed, upload.filename)


class MissingBlobs:
    """``POST /blobs/missing``: which of these ids are not stored, so a client sends only those.

    The Remote Execution API's FindMissingBlobs: one round trip before a batch of uploads.
    """

    MAX_IDS = 10_000
    # NOTE: 10,000 ids are ~750 KB of JSON; 2 MiB leaves room for whitespace.
    _MAX_BODY_BYTES = 2 * 1024 * 1024

    def __init__(self, store: storage.FileStore, settings: Settings) -> None:
        self._store = store
        self._timeout = settings.body_timeout

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        try:
            body = json.loads(RequestBody(req, self._MAX_BODY_BYTES, self._timeout).read() or b'null')
        except ValueError:
            body = None
        ids = body.get('ids') if isinstance(body, dict) else None
        if not isinstance(ids, list) or not all(isinstance(blob_id, str) for blob_id in ids):
            raise falcon.HTTPBadRequest(title='Invalid body', description='Send JSON {"ids": ["sha256:<hex>", ...]}.')
        if len(ids) > self.MAX_IDS:
            raise falcon.HTTPBadRequest(title='Too many ids', description=f'Send at most {self.MAX_IDS} ids.')
        try:
            resp.media = {'missing': self._store.missing(ids)}
        except storage.InvalidId as exc:
            raise falcon.HTTPBadRequest(title='Malformed id', description=str(exc)) from None


class Stats:
    """``GET /stats``: how many blobs and bytes the store holds, per kind."""

    def __init__(self, store: storage.FileStore) -> None:
        self._store = store

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        totals = self._store.totals()
        resp.cache_control = ('no-cache',)
        resp.media = {
            'count': sum(count for count, _ in totals.values()),
            'bytes': sum(size for _, size in totals.values()),
            # NOTE: blobs stored without meta (a crash before it was written) count under "".
            'kinds': {kind: {'count': count, 'bytes': size} for kind, (count, size) in totals.items()},
        }


class ContentTypes:
    """The Content-Type each blob is served with, remembered once learned."""

    # NOTE: bounded so a scan over many ids cannot grow a worker without end.
    _CACHE_SIZE = 100_000

    def __init__(self, store: storage.FileStore) -> None:
        self._store = store
        # PERF: blobs are immutable, so a type learned once stays right.
        self._known: dict[tuple[str, tuple[int, int]], str] = {}

    def of(self, blob_id: str, version: tuple[int, int]) -> str:
        """The type of the stored copy ``version`` of a blob (see storage.BlobStat)."""
        content_type = self._known.get((blob_id, version))
        if content_type is None:
            content_type = self._look_up(blob_id)
            if content_type is None:
                return OCTET_STREAM  # NOTE: not remembered; the metadata may yet be written
            if len(self._known) >= self._CACHE_SIZE:
                self._known.clear()
            self._known[(blob_id, version)] = content_type
        return content_type

    def _look_up(self, blob_id: str) -> str | None:
        meta = self._store.read_meta(blob_id)
        if meta is None:
            return None
        if meta.get('kind') == 'image' and 'format' not in meta:
            # NOTE: the FastAPI version stored the client's claim as an image's
            # mime; the bytes say what it really is.
            blob = self._store.open(blob_id)
            with blob.file:
                try:
                    return images.identify(blob.file).mime
                except (images.NotAnImage, images.ImageTooLarge):
                    return OCTET_STREAM
        mime = meta.get('mime')
        return media_type(mime) if isinstance(mime, str) else OCTET_STREAM


class BlobItem:
    """Serves a stored blob's bytes: GET and HEAD, Range, If-None-Match, zero-copy.

    Either door, ``/images/{id}`` or ``/artifacts/{id}``, serves any blob.
    With ``accel_redirect`` set (nginx in front), a GET that would send the
    bytes of a blob of ``accel_min_bytes`` or more answers with
    ``X-Accel-Redirect`` instead: nginx sends the file (and cuts the range),
    while ISS has already decided the status and every header.
    """

    def __init__(
        self, store: storage.FileStore, receiver: UploadReceiver, content_types: ContentTypes, settings: Settings
    ) -> None:
        self._store = store
        self._receiver = receiver
        self._content_types = content_types
        self._accel_redirect = settings.accel_redirect
        self._accel_min_bytes = settings.accel_min_bytes

    def on_get(self, req: falcon.Request, resp: falcon.Response, blob_id: str) -> None:
        self._respond(req, resp, blob_id, send_body=True)

    def on_head(self, req: falcon.Request, resp: falcon.Response, blob_id: str) -> None:
        self._respond(req, resp, blob_id, send_body=False)

    def on_delete(self, req: falcon.Request, resp: falcon.Response, blob_id: str) -> None:
        """Remove the blob, its meta and index row (the admin token was checked by RequireToken)."""
        self._store.delete(blob_id)
        resp.status = falcon.HTTP_204

    def _respond(self, req: falcon.Request, resp: falcon.Response, blob_id: str, send_body: bool) -> None:
        not_modified = _etag_matches(req.if_none_match, blob_id)
        if send_body and not not_modified:
            blob = self._store.open(blob_id)
            file, stat = blob.file, blob.stat
        else:
            file, stat = None, self._store.stat(blob_id)
        accel_path = None
        # NOTE: small blobs are sent by ISS even behind nginx, so that nginx can cache them.
        if file is not None and self._accel_redirect and stat.size >= self._accel_min_bytes:
            accel_path = self._accel_redirect + self._store.relative_path(blob_id)
        try:
            content_type = self._content_types.of(blob_id, stat.version)
        except BaseException:
            if file is not None:
                file.close()
            raise
        send_file(req, resp, file, stat.size, blob_id, content_type, not_modified=not_modified, accel_path=accel_path)


def send_file(
    req: falcon.Request,
    resp: falcon.Response,
    file: IO[bytes] | None,
    size: int,
    etag: str,
    content_type: str,
    *,
    not_modified: bool,
    accel_path: str | None = None,
) -> None:
    """Answer with an immutable file: its headers, 304, one Range (206/416), sendfile(2) when large.

    ``file`` is None for HEAD and 304; it is handed to the response (or closed).
    With ``accel_path``, nginx sends the bytes (X-Accel-Redirect) and cuts the
    range, while every header and status is decided here.
    """
    try:
        resp.etag = etag
        resp.cache_control = _IMMUTABLE
        if not_modified:
            resp.status = falcon.HTTP_304
            return
        resp.content_type = content_type
        resp.accept_ranges = 'bytes'
        resp.set_header('X-Content-Type-Options', 'nosniff')
        resp.set_header('Content-Security-Policy', _BLOB_CSP)
        essence = content_type.partition(';')[0]
        if essence in _ACTIVE_TYPES or essence.endswith('+xml'):
            resp.set_header('Content-Disposition', 'attachment')
        byte_range = _requested_range(req, etag, size)
        if accel_path is not None:
            # PERF: nginx sends the file with sendfile and applies the Range
            # itself; an unsatisfiable one was already answered 416 above.
            resp.set_header('X-Accel-Redirect', accel_path)
            return
        if byte_range is None:
            if file is not None and size <= _SMALL_BLOB_BYTES:
                # PERF: one read beats sendfile's setup for a thumbnail-sized blob
                # (4 KiB GETs: +9-14% req/s, p99 21 -> 17 ms; gunicorn, 2 cores).
                resp.data = file.read()
                return
            resp.content_length = size
            # PERF: a plain file object: Falcon hands it to wsgi.file_wrapper
            # and gunicorn sends it with sendfile(2).
            resp.stream, file = file, None
            return
        start, end = byte_range
        resp.status = falcon.HTTP_206
        resp.content_range = (start, end, size)
        resp.content_length = end - start + 1
        if file is not None:
            resp.stream, file = _slice(req, file, start, end - start + 1), None
    finally:
        if file is not None:
            file.close()


class ImageItem(BlobItem):
    """``/images/{id}``: GET with ``w``, ``h``, ``fit``, ``format`` or ``q`` serves a derivative;
    PUT stores an image under the id it claims."""

    def __init__(
        self,
        store: storage.FileStore,
        receiver: UploadReceiver,
        content_types: ContentTypes,
        settings: Settings,
        derivatives: Derivatives,
    ) -> None:
        super().__init__(store, receiver, content_types, settings)
        self._derivatives = derivatives
        self._max_pixels = settings.max_image_pixels

    def _respond(self, req: falcon.Request, resp: falcon.Response, blob_id: str, send_body: bool) -> None:
        if not self._derivatives.respond(req, resp, blob_id, send_body):
            super()._respond(req, resp, blob_id, send_body)

    def on_put(self, req: falcon.Request, resp: falcon.Response, blob_id: str) -> None:
        _check_claimed_id(blob_id)
        with self._receiver.receive(req) as upload:
            _check_digest(upload.staged, blob_id)
            committed = store_image(self._store, upload, self._max_pixels)
        _answer_upload(resp, 'image_id', blob_id, committed, None)


class Derivatives:
    """Images resized and converted on request, each rendered once and kept in a bounded cache.

    ``?w=&h=`` bound the size (never enlarged, except by ``fit=fill``), ``fit``
    is contain (default), cover (crop to fill w x h) or fill (stretch),
    ``format`` is jpeg, png, webp, avif (where Pillow has it) or auto (from
    Accept), ``q`` the quality (1-100; not for png). A derivative is a file
    like a blob: strong ETag (the id and the variant), immutable, HEAD,
    Range, 304 (answered without rendering: the variant decides the bytes).
    """

    PARAMETERS = ('w', 'h', 'fit', 'format', 'q')
    _DEFAULT_QUALITY = 80

    def __init__(self, store: storage.FileStore, settings: Settings) -> None:
        self._store = store
        self._max_pixels = settings.max_image_pixels
        self._max_dimension = settings.max_derived_dimension
        self._cache_bytes = settings.derived_max_bytes

    def respond(self, req: falcon.Request, resp: falcon.Response, blob_id: str, send_body: bool) -> bool:
        """Serve the derivative the query asks for; False when it asks for none (serve the original)."""
        if not any(name in req.params for name in self.PARAMETERS):
            return False
        requested_format = self._format(req)
        variant = self._variant(req, blob_id, requested_format)
        if requested_format == 'auto':
            resp.vary = ('Accept',)
        etag = f'{blob_id}/{variant.key}'
        if _etag_matches(req.if_none_match, etag):
            self._store.stat(blob_id)  # NOTE: 304 only for a blob that is still stored
            send_file(req, resp, None, 0, etag, variant.media_type, not_modified=True)
            return True
        derived = self._store.open_derived(blob_id, variant.key) or self._render(blob_id, variant)
        file = derived.file if send_body else None
        if not send_body:
            derived.file.close()
        send_file(req, resp, file, derived.stat.size, etag, variant.media_type, not_modified=False)
        return True

    def _render(self, blob_id: str, variant: images.Variant) -> storage.OpenBlob:
        source = self._store.open(blob_id)

        def write(out: IO[bytes]) -> None:
            with source.file:
                images.render(source.file, variant, out, self._max_pixels)

        try:
            with _refusing_what_cannot_render(blob_id):
                return self._store.store_derived(blob_id, variant.key, write, self._cache_bytes)
        finally:
            source.file.close()

    def _format(self, req: falcon.Request) -> str | None:
        name = req.get_param('format')
        if name is None:
            return None
        name = name.lower()
        if name != 'auto' and name not in images.OUTPUT_FORMATS:
            raise falcon.HTTPBadRequest(
                title='Invalid format',
                description=f'format must be one of {", ".join([*images.OUTPUT_FORMATS, "auto"])}.',
            )
        return name

    def _variant(self, req: falcon.Request, blob_id: str, requested_format: str | None) -> images.Variant:
        width = req.get_param_as_int('w', min_value=1, max_value=self._max_dimension)
        height = req.get_param_as_int('h', min_value=1, max_value=self._max_dimension)
        fit = req.get_param('fit', default='contain')
        if fit not in images.FITS:
            raise falcon.HTTPBadRequest(title='Invalid fit', description='fit must be contain, cover or fill.')
        quality = req.get_param_as_int('q', min_value=1, max_value=100)
        source = self._source(blob_id)
        has_alpha = 'A' in source.get('mode', '') or source.get('mode') == 'P'
        if requested_format == 'auto':
            image_format = images.choose_format(req.get_header('Accept'), has_alpha)
        elif requested_format is not None:
            image_format = images.OUTPUT_FORMATS[requested_format]
        elif source.get('format') in images.OUTPUT_TYPES:
            image_format = source['format']  # NOTE: a resize alone keeps the format
        else:
            image_format = 'PNG' if has_alpha else 'JPEG'
        if image_format == 'PNG':
            if quality is not None and requested_format == 'png':
                raise falcon.HTTPBadRequest(title='Invalid q', description='q applies to jpeg, webp and avif.')
            quality = None
        elif quality is None:
            quality = self._DEFAULT_QUALITY
        return images.Variant(width, height, fit, image_format, quality)

    def _source(self, blob_id: str) -> dict[str, Any]:
        """What the meta says of the source image (format and mode), read from its header if not."""
        meta = self._store.read_meta(blob_id) or {}
        if 'mode' in meta and 'format' in meta:
            return meta
        blob = self._store.open(blob_id)
        with blob.file, _refusing_what_cannot_render(blob_id):
            info = images.identify(blob.file, self._max_pixels)
        return {'format': info.format, **info.fields}


@contextlib.contextmanager
def _refusing_what_cannot_render(blob_id: str) -> Iterator[None]:
    """Answer what Pillow cannot (or must not) render as 415 or 422."""
    try:
        yield
    except images.NotAnImage:
        raise falcon.HTTPUnsupportedMediaType(
            title='Not an image', description=f'{blob_id} is not an image, so it has no derivatives.'
        ) from None
    except images.ImageTooLarge as exc:
        raise falcon.HTTPUnprocessableEntity(title='Image too large to render', description=str(exc)) from None
    except images.CannotRender as exc:
        raise falcon.HTTPUnprocessableEntity(
            title='Cannot render', description=f'The image cannot be decoded: {exc}'
        ) from None


class ArtifactItem(BlobItem):
    """``/artifacts/{id}?kind=``: PUT stores an artifact under the id it claims."""

    def __init__(
        self,
        store: storage.FileStore,
        receiver: UploadReceiver,
        content_types: ContentTypes,
        settings: Settings,
        fields: ArtifactFields,
    ) -> None:
        super().__init__(store, receiver, content_types, settings)
        self._fields = fields

    def on_put(self, req: falcon.Request, resp: falcon.Response, blob_id: str) -> None:
        _check_claimed_id(blob_id)
        self._fields.check_query(req)
        with self._receiver.receive(req) as upload:
            _check_digest(upload.staged, blob_id)
            committed = self._store.commit(upload.staged, self._fields.build_meta(req, upload))
        _answer_upload(resp, 'artifact_id', blob_id, committed, None)


class BlobMeta:
    """Serves what is stored about a blob; an image's meta from the FastAPI version is completed."""

    def __init__(self, store: storage.FileStore, settings: Settings) -> None:
        self._store = store
        self._max_pixels = settings.max_image_pixels

    def on_get(self, req: falcon.Request, resp: falcon.Response, blob_id: str) -> None:
        size = self._store.stat(blob_id).size
        meta = self._store.read_meta(blob_id)
        if meta is not None and images.lacks_fields(meta):
            meta = complete_image_meta(self._store, blob_id, self._max_pixels) or meta
        resp.media = meta or {'bytes': size}


def complete_image_meta(store: storage.FileStore, blob_id: str, max_pixels: int) -> dict[str, Any] | None:
    """Fill in, once and for good, the image fields a meta file lacks (the FastAPI version wrote fewer).

    The seed's own keys are kept as they are; None when the bytes are no image Pillow reads.
    """
    blob = store.open(blob_id)
    with blob.file:
        try:
            info = images.identify(blob.file, max_pixels)
        except (images.NotAnImage, images.ImageTooLarge):
            return None
    return store.complete_meta(blob_id, {'format': info.format, **info.fields})


class Health:
    """Liveness and readiness: 200 while the data directory takes writes, else 503."""

    def __init__(self, store: storage.FileStore) -> None:
        self._store = store

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.cache_control = ('no-store',)
        try:
            self._store.check()
        except storage.StoreError as exc:
            resp.status = falcon.HTTP_503
            resp.media = {'ok': False, 'error': str(exc)}
        else:
            resp.media = {'ok': True}

    on_head = on_get


class OpenAPIDocument:
    """Serves ``openapi.yaml`` as written, and the same document as JSON."""

    def __init__(self, path: pathlib.Path) -> None:
        self._yaml = path.read_bytes()
        self._json = json.dumps(yaml.safe_load(self._yaml)).encode()

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.data = self._yaml
        resp.content_type = 'application/yaml'

    def on_get_json(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.data = self._json
        resp.content_type = falcon.MEDIA_JSON


_DOCS_PAGE = b"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>ISS API</title>
<link rel="stylesheet" href="docs/assets/swagger-ui.css">
</head>
<body>
<div id="swagger-ui"></div>
<script src="docs/assets/swagger-ui-bundle.js"></script>
<script>
window.ui = SwaggerUIBundle({url: 'openapi.json', dom_id: '#swagger-ui', deepLinking: true});
</script>
</body>
</html>
"""


class Docs:
    """The interactive API page; Swagger UI's files come from an installed package."""

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.data = _DOCS_PAGE
        resp.content_type = falcon.MEDIA_HTML


# -- middleware -----------------------------------------------------------------


class RequireToken:
    """Requests with one of ``methods`` need ``Authorization: Bearer <token>``.

    With an empty token those requests are refused outright (403): that is
    how deletion stays off until ``ISS_ADMIN_TOKEN`` is set.
    """

    def __init__(self, methods: frozenset[str], token: str, variable: str, purpose: str) -> None:
        self._methods = methods
        self._expected = f'Bearer {token}'.encode() if token else None
        self._variable = variable
        self._purpose = purpose

    def process_resource(self, req: falcon.Request, resp: falcon.Response, resource: object, params: dict) -> None:
        # NOTE: after routing, so a method no resource takes still gets its 404 or 405.
        if req.method not in self._methods or not hasattr(resource, f'on_{req.method.lower()}'):
            return
        if self._expected is None:
            raise falcon.HTTPForbidden(
                title=f'{self._purpose} is off', description=f'{self._purpose} is off until {self._variable} is set.'
            )
        given = (req.get_header('Authorization') or '').encode('utf-8', 'replace')
        # APPSEC: constant-time, so the token cannot be guessed byte by byte.
        if not hmac.compare_digest(given, self._expected):
            raise falcon.HTTPUnauthorized(
                title='Token required',
                description=f'{self._purpose} needs the header "Authorization: Bearer <{self._variable}>".',
                challenges=['Bearer realm="iss"'],
            )


# -- helpers --------------------------------------------------------------------


def _reject_constant(name: str) -> None:
    raise ValueError(f'{name} is not valid JSON')


def _timestamp_param(req: falcon.Request, name: str) -> float | None:
    """A time given as Unix seconds or ISO 8601 (no zone: UTC), as Unix seconds."""
    raw = req.get_param(name)
    if raw is None:
        return None
    try:
        return float(raw) if _NUMBER_PATTERN.fullmatch(raw) else _iso_timestamp(raw)
    except ValueError:
        raise falcon.HTTPBadRequest(
            title=f'Invalid {name}',
            description=f'{name} must be Unix seconds or an ISO 8601 time, e.g. 2026-11-25T12:00:00Z.',
        ) from None


def _iso_timestamp(text: str) -> float:
    moment = datetime.datetime.fromisoformat(text)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)
    return moment.timestamp()


def _etag_matches(if_none_match: list | None, blob_id: str) -> bool:
    """If-None-Match uses weak comparison (RFC 9110 13.1.2), and ``*`` matches anything stored."""
    if not if_none_match:
        return False
    return any(tag == '*' or str(tag) == blob_id for tag in if_none_match)


def _requested_range(req: falcon.Request, blob_id: str, size: int) -> tuple[int, int] | None:
    """Return the single byte range to serve, or None to serve the whole blob.

    A Range header that is malformed, asks for several ranges, or comes with
    an If-Range that is not our ETag is ignored, as RFC 9110 14.2 allows;
    a well-formed range that starts past the end gets 416.
    """
    header = req.get_header('Range')
    if header is None or size == 0:
        return None
    if_range = req.get_header('If-Range')
    if if_range is not None and if_range.strip() != f'"{blob_id}"':
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


def _slice(req: falcon.Request, file: IO[bytes], start: int, length: int) -> FileSlice:
    if req.env.get('SERVER_SOFTWARE', '').startswith('gunicorn/'):
        return SendfileSlice(file, start, length)
    return FileSlice(file, start, length)


# -- the app --------------------------------------------------------------------


def _sweep_temp(store: storage.FileStore) -> None:
    """Remove what uploads killed mid-way left in tmp/ (live ones are flock'd and stay)."""
    try:
        swept = store.sweep_temp()
    except OSError as exc:
        log.error('data directory %s is not usable: %s', store.root, exc)
    else:
        if swept:
            log.warning('removed %d stale temp file(s) from %s', swept, store.root)


def _build_index_if_incomplete(store: storage.FileStore) -> None:
    """Index a store that has blobs but no complete index (the FastAPI version's), in the background.

    Listings answer 503 until it is done; every worker starts one, the first
    does the work and the others find it done (storage.FileStore.reindex locks).
    """
    try:
        if store.index_complete:
            return
    except storage.StoreError:
        return  # NOTE: the health endpoint reports an unusable data directory

    def build() -> None:
        try:
            counts = store.reindex(only_if_incomplete=True)
        except Exception:
            log.exception('building the index failed; run python -m iss reindex')
        else:
            if counts:
                log.warning('indexed %d blobs found in %s', counts['blobs'], store.root)

    threading.Thread(target=build, name='iss-reindex', daemon=True).start()


def create_app(settings: Settings, store: storage.FileStore | None = None) -> falcon.App:
    """Build the WSGI app: every route ISS serves is wired here."""
    if store is None:
        store = storage.FileStore(settings.data_dir)
    _sweep_temp(store)
    _build_index_if_incomplete(store)
    metrics = telemetry.Metrics(store)
    middleware: list[object] = [telemetry.RequestTelemetry(metrics)]
    if settings.cors_origins:
        middleware.append(
            falcon.CORSMiddleware(
                allow_origins=list(settings.cors_origins),
                expose_headers=['ETag', 'Content-Range', 'Content-Length', 'Location', 'X-Request-Id'],
            )
        )
    if settings.api_token:
        middleware.append(RequireToken(frozenset({'POST', 'PUT'}), settings.api_token, 'ISS_API_TOKEN', 'Uploading'))
    middleware.append(RequireToken(frozenset({'DELETE'}), settings.admin_token, 'ISS_ADMIN_TOKEN', 'Deleting'))

    app = falcon.App(middleware=middleware)
    app.set_error_serializer(_serialize_error)
    app.add_error_handler(storage.StoreError, _raise_store_error)
    app.add_error_handler(Exception, _log_unexpected_error)

    receiver = UploadReceiver(store, settings)
    fields = ArtifactFields(settings)
    content_types = ContentTypes(store)
    derivatives = Derivatives(store, settings)
    meta = BlobMeta(store, settings)
    app.add_route('/images', Images(store, receiver, settings))
    app.add_route('/images/{blob_id}', ImageItem(store, receiver, content_types, settings, derivatives))
    app.add_route('/images/{blob_id}/meta', meta)
    app.add_route('/artifacts', Artifacts(store, receiver, fields))
    app.add_route('/artifacts/{blob_id}', ArtifactItem(store, receiver, content_types, settings, fields))
    app.add_route('/artifacts/{blob_id}/meta', meta)
    app.add_route('/blobs/missing', MissingBlobs(store, settings))
    app.add_route('/stats', Stats(store))
    app.add_route('/metrics', telemetry.MetricsEndpoint(metrics))

    health = Health(store)
    app.add_route('/health', health)
    app.add_route('/healthz', health)

    openapi = OpenAPIDocument(HERE / 'openapi.yaml')
    app.add_route('/openapi.yaml', openapi)
    app.add_route('/openapi.json', openapi, suffix='json')
    app.add_route('/docs', Docs())
    app.add_static_route('/docs/assets', str(swagger_ui_path))
    return app


def __getattr__(name: str) -> falcon.App:
    """Build ``iss.app`` from the environment when gunicorn first asks for it.

    NOTE: lazily, so importing this module (tests, tools) touches no data directory.
    """
    if name == 'app':
        app = create_app(Settings.from_env())
        globals()['app'] = app
        return app
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


if __name__ == '__main__':
    import cli

    sys.exit(cli.main())
