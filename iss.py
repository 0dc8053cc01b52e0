"""ISS, the Image Store Service: images and artifacts stored by content address.

Read :func:`create_app` first: it wires every route to its resource. The
resources speak HTTP; the store (``storage.py``) speaks bytes; ``httpio.py``
carries bytes between the two; ``meta.py`` says what a blob's meta holds.
What goes wrong below is a typed error (``errors.py``) mapped to its answer in
one place here. gunicorn runs ``iss:app``, which is built from the
environment on first use::

    gunicorn iss:app              # reads ./gunicorn.conf.py
"""

from __future__ import annotations

import contextlib
import datetime
import http
import json
import logging
import pathlib
import re
import sys
import urllib.parse
from collections.abc import Iterator
from typing import IO, Any, Protocol

import falcon
import yaml
from swagger_ui_bundle import swagger_ui_path

from iss_server import browse, httpio, images, index, meta, resumable, signing, telemetry
from iss_server.auth import RequireReadToken, RequireToken, bearer_token, carries_one_of
from iss_server.blobs import BlobStat, Committed, OpenBlob, parse_id
from iss_server.config import Settings
from iss_server.errors import (
    BadRequest,
    FileRefused,
    InvalidId,
    InvalidIdInBody,
    NotAnImage,
    OversizedImage,
    ServiceError,
    StoreFailure,
    UndecodableImage,
    UnsupportedProtocol,
    UploadTooLarge,
)
from iss_server.httpio import (
    Presentation,
    RequestBody,
    Sendable,
    Upload,
    UploadReceiver,
    content_disposition,
    etag_matches,
    is_active,
    send_file,
)
from storage import BlobStore, open_store

log = logging.getLogger('iss')

HERE = pathlib.Path(__file__).resolve().parent

_NUMBER_PATTERN = re.compile(r'-?\d{1,12}(\.\d{1,9})?')


# -- errors: every one answered as JSON, from here -------------------------------------


# NOTE: Falcon's own answers (no route, a method no resource takes, a range past
# the end) carry no description; every ISS error has one.
_FALCON_DESCRIPTIONS = {
    404: 'Nothing is served at {path}; /docs lists what is.',
    405: '{path} does not take {method}; it takes {allow}.',
    416: 'The range asks for bytes past the end of the {length} stored.',
}


def _serialize_error(req: falcon.Request, resp: falcon.Response, error: falcon.HTTPError) -> None:
    """Write every error as JSON with ``title``, ``description``, ``status`` and ``detail``.

    ``detail`` repeats the description for clients of the FastAPI version.
    """
    body = error.to_dict()
    if 'description' not in body:
        headers = error.headers or {}
        template = _FALCON_DESCRIPTIONS.get(error.status_code, '{title}.')
        body['description'] = template.format(
            path=req.path,
            method=req.method,
            allow=headers.get('Allow', 'no method'),
            length=headers.get('Content-Range', '').rpartition('/')[2] or 'bytes',
            title=body['title'],
        )
    body['status'] = error.status_code
    body['detail'] = body['description']
    resp.data = json.dumps(body).encode()
    resp.content_type = falcon.MEDIA_JSON


def _answer_service_error(req: falcon.Request, resp: falcon.Response, error: ServiceError, params: dict) -> None:
    """What the store, the index, the meta schema or the body reader raised, as its HTTP answer."""
    if error.status >= 500:
        log.error('%s: %s', error.title.lower(), error)
    headers = {'Retry-After': str(error.retry_after)} if error.retry_after else None
    # NOTE: a status of no RFC (tus's 460) is named by its title, not "460 Unknown"
    status = error.status if error.status in http.HTTPStatus._value2member_map_ else f'{error.status} {error.title}'
    raise falcon.HTTPError(status, title=error.title, description=error.public_description, headers=headers)


def _log_unexpected_error(req: falcon.Request, resp: falcon.Response, error: Exception, params: dict) -> None:
    """A bug: logged with its traceback and request id; the client gets a plain JSON 500."""
    request_id = telemetry.request_id(req)
    log.error('unexpected error', exc_info=error, extra={'request': {'request_id': request_id}})
    raise falcon.HTTPInternalServerError(
        title='Internal error',
        description=f'Something went wrong in ISS; the log has the details under request id {request_id}.',
    )


# -- uploads: what makes one an image or an artifact ------------------------------------


class Uploads(Protocol):
    """How one door (``/images`` or ``/artifacts``) checks and commits what is uploaded to it."""

    #: The key of the id in the answer: ``image_id`` or ``artifact_id``.
    id_field: str
    #: The form fields besides ``file`` that a POST may carry.
    form_fields: tuple[str, ...]

    def check(self, req: falcon.Request) -> None:
        """Refuse what the headers and query already show to be wrong, before a byte of body is read."""

    def meta_for(self, req: falcon.Request, upload: Upload) -> dict[str, Any]:
        """The meta this door gives the uploaded file.

        Raises:
            FileRefused: this file cannot be stored here (in a batch, the others still are).
            ServiceError: the request is wrong for every file it carries.
        """


class ImageUploads:
    """Images: Pillow must identify the bytes from their header; the meta is what it read."""

    id_field = 'image_id'
    form_fields = ()

    def __init__(self, store: BlobStore, settings: Settings) -> None:
        self._store = store
        self._max_pixels = settings.max_image_pixels
        self._verify = settings.verify_images

    def check(self, req: falcon.Request) -> None:
        if req.method == 'POST' and not httpio.is_multipart(req) and not _content_type(req).startswith('image/'):
            raise falcon.HTTPUnsupportedMediaType(
                title='Unsupported upload',
                description='Send multipart/form-data with a "file" field, or a raw body with an image/* '
                'Content-Type; store other files with POST /artifacts?kind=...',
            )

    def meta_for(self, req: falcon.Request, upload: Upload) -> dict[str, Any]:
        with upload.staged.open() as file:
            try:
                return meta.identified_image(
                    file,
                    upload.staged.size,
                    max_pixels=self._max_pixels,
                    filename=_offered_name(req, upload),
                    verify=self._verify,
                )
            except images.NotAnImage:
                raise NotAnImage('') from None
            except images.ImageTooLarge as exc:
                raise OversizedImage(exc) from None
            except images.CannotRender as exc:
                raise UndecodableImage(exc) from None


class ArtifactUploads:
    """Artifacts: any bytes, with a ``kind`` and the client's ``meta`` (query string, or form fields of a POST)."""

    id_field = 'artifact_id'
    form_fields = ('kind', 'meta')

    def __init__(self, store: BlobStore, settings: Settings) -> None:
        self._store = store
        self._max_meta_bytes = settings.max_meta_bytes

    def check(self, req: falcon.Request) -> None:
        """PERF: what the query string says is checked before a byte of body is read."""
        if req.get_param('kind') is not None or not httpio.is_multipart(req):
            meta.check_kind(req.get_param('kind'))
        meta.parse_user_meta(req.get_param('meta'), self._max_meta_bytes)

    def meta_for(self, req: falcon.Request, upload: Upload) -> dict[str, Any]:
        kind = meta.check_kind(self._value(req, upload, 'kind'))
        user = meta.parse_user_meta(self._value(req, upload, 'meta'), self._max_meta_bytes)
        return meta.artifact(kind, upload.staged.size, upload.content_type, user, filename=_offered_name(req, upload))

    @staticmethod
    def _value(req: falcon.Request, upload: Upload, name: str) -> str | None:
        value = req.get_param(name)
        if name not in upload.fields:
            return value
        if value is not None:
            raise BadRequest(f'Give {name} once: in the query string or as a form field.', title=f'Repeated {name}')
        return upload.fields[name]


def _offered_name(req: falcon.Request, upload: Upload) -> str | None:
    """The file name the client gives: ``?filename=`` (any upload), else the form part's."""
    return req.get_param('filename') or upload.filename


def _answer_upload(
    req: falcon.Request, resp: falcon.Response, uploads: Uploads, upload: Upload, committed: Committed
) -> None:
    """201 with Location for new content; 200 and the meta stored before when it was already stored."""
    body = _upload_outcome(req, uploads, upload, committed)
    del body['status']
    resp.media = body
    resp.location = f'/{uploads.id_field.partition("_")[0]}s/{upload.staged.digest}'
    resp.status = falcon.HTTP_201 if committed.created else falcon.HTTP_200


def _upload_outcome(req: falcon.Request, uploads: Uploads, upload: Upload, committed: Committed) -> dict[str, Any]:
    """What the client is told of one stored file: its id, the stored meta's answer keys, ``created``.

    ``filename`` is the stored one (the first upload's), or for a blob stored
    without one, the name this upload offered; ``status`` is 201 or 200.
    """
    stored = committed.meta
    body: dict[str, Any] = {
        uploads.id_field: upload.staged.digest,
        'filename': stored.get('filename', meta.clean_filename(_offered_name(req, upload))),
    }
    body.update({key: stored[key] for key in meta.ANSWER_KEYS if key in stored})
    body['created'] = committed.created
    body['status'] = 201 if committed.created else 200
    return body


def _answer_batch(
    req: falcon.Request, resp: falcon.Response, uploads: Uploads, store: BlobStore, files: list[Upload]
) -> None:
    """Several files in one form: one group commit, and a list with each file's outcome, in order.

    A refused file (not an image, say) is an entry with its error; the others
    are stored all the same. The status is 201 when every file is stored and
    one at least is new, 200 when all were stored already, 207 when any was
    refused.
    """
    outcomes: list[dict[str, Any] | None] = []
    accepted: list[tuple[Upload, dict[str, Any]]] = []
    for upload in files:
        try:
            accepted.append((upload, uploads.meta_for(req, upload)))
            outcomes.append(None)
        except FileRefused as exc:
            outcomes.append(_refusal(exc, _offered_name(req, upload)))
    committed = iter(store.commit_all([(upload.staged, file_meta) for upload, file_meta in accepted]))
    stored = iter(accepted)
    outcomes = [outcome or _upload_outcome(req, uploads, next(stored)[0], next(committed)) for outcome in outcomes]
    resp.media = outcomes
    if len(accepted) < len(files):
        resp.status = falcon.HTTP_207
    else:
        resp.status = falcon.HTTP_201 if any(outcome['created'] for outcome in outcomes) else falcon.HTTP_200


def _refusal(error: FileRefused, offered_name: str | None) -> dict[str, Any]:
    description = error.public_description
    return {
        'status': error.status,
        'title': error.title,
        'description': description,
        'detail': description,
        'filename': meta.clean_filename(offered_name),
    }


def _content_type(req: falcon.Request) -> str:
    return (req.content_type or '').lower()


# -- collections ----------------------------------------------------------------------


class Collection:
    """``/images``, ``/artifacts``: GET lists newest first, filtered, in pages; POST uploads.

    The items come from the store's index as stored JSON and are sent as
    they are: a page costs one indexed query, however big the store.
    """

    _DEFAULT_LIMIT = 100
    _MAX_LIMIT = 1000

    def __init__(
        self, store: BlobStore, receiver: UploadReceiver, uploads: Uploads, collection: str, settings: Settings
    ) -> None:
        self._store = store
        self._receiver = receiver
        self._uploads = uploads
        self._collection = collection
        self._max_batch_files = settings.max_batch_files
        # NOTE: artifacts are listed by kind; images all have the kind "image".
        self._kind_filter = collection == index.ARTIFACTS

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        limit = req.get_param_as_int('limit', min_value=1, max_value=self._MAX_LIMIT, default=self._DEFAULT_LIMIT)
        filters: dict[str, Any] = {
            'created_after': _timestamp_param(req, 'created_after'),
            'created_before': _timestamp_param(req, 'created_before'),
            'cursor': req.get_param('cursor') or None,
        }
        if self._kind_filter:
            kind = req.get_param('kind')
            if kind == 'image':
                # NOTE: the index lists everything of kind image under /images, which /stats counts
                raise BadRequest('Blobs of kind image are listed by GET /images.', title='Invalid kind')
            filters['kind'] = None if kind is None else meta.check_kind(kind)
        page = self._store.list(self._collection, limit=limit, **filters)
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

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        """Store the body, or the form's ``file`` part; several ``file`` parts are a batch (a list answers)."""
        self._uploads.check(req)
        with self._receiver.receive(
            req, form_fields=self._uploads.form_fields, max_files=self._max_batch_files
        ) as files:
            if len(files) > 1:
                _answer_batch(req, resp, self._uploads, self._store, files)
                return
            committed = self._store.commit(files[0].staged, self._uploads.meta_for(req, files[0]))
        _answer_upload(req, resp, self._uploads, files[0], committed)


class MissingBlobs:
    """``POST /blobs/missing``: which of these ids are not stored, so a client sends only those.

    The Remote Execution API's FindMissingBlobs: one round trip before a batch of uploads.
    """

    MAX_IDS = 10_000
    # NOTE: 10,000 ids are ~750 KB of JSON; 2 MiB leaves room for whitespace.
    _MAX_BODY_BYTES = 2 * 1024 * 1024

    def __init__(self, store: BlobStore, receiver: UploadReceiver) -> None:
        self._store = store
        self._receiver = receiver

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        try:
            body = json.loads(self._receiver.read_small(req, self._MAX_BODY_BYTES) or b'null')
        except ValueError:
            body = None
        ids = body.get('ids') if isinstance(body, dict) else None
        if not isinstance(ids, list) or not all(isinstance(blob_id, str) for blob_id in ids):
            raise BadRequest('Send JSON {"ids": ["sha256:<hex>", ...]}.', title='Invalid body')
        if len(ids) > self.MAX_IDS:
            raise BadRequest(f'Send at most {self.MAX_IDS} ids.', title='Too many ids')
        try:
            resp.media = {'missing': self._store.missing(ids)}
        except InvalidId as exc:
            raise InvalidIdInBody(str(exc)) from None


class Stats:
    """``GET /stats``: how many blobs and bytes the store holds, per kind."""

    def __init__(self, store: BlobStore) -> None:
        self._store = store

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.cache_control = ('no-cache',)
        resp.media = index.totals_document(self._store.totals())


# -- one blob ---------------------------------------------------------------------------


class Presentations:
    """How each blob is presented: the Content-Type it is served with and the name it is saved as.

    Learned from its meta once per stored copy, and remembered.
    """

    # NOTE: bounded so a scan over many ids cannot grow a worker without end.
    _CACHE_SIZE = 100_000

    def __init__(self, store: BlobStore) -> None:
        self._store = store
        # PERF: blobs are immutable, so what is learned once of a stored copy stays right.
        self._known: dict[tuple[str, str], Presentation] = {}

    def of(self, blob_id: str, stat: BlobStat) -> Presentation:
        """The presentation of the stored copy ``stat`` describes."""
        known = self._known.get((blob_id, stat.version))
        if known is not None:
            return known
        stored = self._store.read_meta(blob_id)
        content_type = self._content_type(blob_id, stored)
        presentation = Presentation(content_type, meta.download_name(blob_id, stored, content_type))
        if stored is not None:  # NOTE: not remembered without meta; it may yet be written
            if len(self._known) >= self._CACHE_SIZE:
                self._known.clear()
            self._known[(blob_id, stat.version)] = presentation
        return presentation

    def _content_type(self, blob_id: str, stored: dict[str, Any] | None) -> str:
        if stored is None:
            return meta.OCTET_STREAM
        if stored.get('kind') == 'image' and 'format' not in stored:
            # NOTE: the FastAPI version stored the client's claim as an image's
            # mime; the bytes say what it really is.
            blob = self._store.open(blob_id)
            with blob.file:
                try:
                    return images.identify(blob.file).mime
                except (images.NotAnImage, images.ImageTooLarge):
                    return meta.OCTET_STREAM
        mime = stored.get('mime')
        return meta.media_type(mime) if isinstance(mime, str) else meta.OCTET_STREAM


class Item:
    """``/images/{id}``, ``/artifacts/{id}``: GET and HEAD the bytes, PUT under a claimed id, DELETE.

    Either door serves any blob. GET and HEAD: Range, If-None-Match,
    zero-copy (see :func:`httpio.send_file`); on ``/images/{id}`` a query of
    ``w``, ``h``, ``fit``, ``format`` or ``q`` serves a derivative instead.
    With ``accel_redirect`` set (nginx in front), a GET of a blob of
    ``accel_min_bytes`` or more answers with ``X-Accel-Redirect`` and nginx
    sends the bytes, while ISS has already decided the status and every header.
    """

    def __init__(
        self,
        store: BlobStore,
        receiver: UploadReceiver,
        uploads: Uploads,
        presentations: Presentations,
        settings: Settings,
        derivatives: Derivatives | None = None,
    ) -> None:
        self._store = store
        self._receiver = receiver
        self._uploads = uploads
        self._presentations = presentations
        self._derivatives = derivatives
        self._accel_redirect = settings.accel_redirect
        self._accel_min_bytes = settings.accel_min_bytes
        self._redirect_seconds = settings.s3_redirect

    def on_get(self, req: falcon.Request, resp: falcon.Response, blob_id: str) -> None:
        if self._derivatives is not None and self._derivatives.respond(req, resp, blob_id):
            return
        redirect = self._redirect_seconds and req.method == 'GET' and not etag_matches(req.if_none_match, blob_id)
        if redirect and self._redirect_to_bucket(resp, blob_id):
            return
        send_file(req, resp, self._original(blob_id))

    on_head = on_get

    def on_put(self, req: falcon.Request, resp: falcon.Response, blob_id: str) -> None:
        parse_id(blob_id)
        self._uploads.check(req)
        with self._receiver.receive(req, expected=blob_id) as (upload,):
            if upload.staged.digest != blob_id:
                raise BadRequest(
                    f'The body hashes to {upload.staged.digest}, not {blob_id}; nothing was stored.',
                    title='Digest mismatch',
                )
            committed = self._store.commit(upload.staged, self._uploads.meta_for(req, upload))
        _answer_upload(req, resp, self._uploads, upload, committed)

    def on_delete(self, req: falcon.Request, resp: falcon.Response, blob_id: str) -> None:
        """Remove the blob, its meta, index row and derivatives (RequireToken checked the admin token)."""
        self._store.delete(blob_id)
        resp.status = falcon.HTTP_204

    def _redirect_to_bucket(self, resp: falcon.Response, blob_id: str) -> bool:
        """``ISS_S3_REDIRECT``: 307 to a presigned URL that serves the blob from the bucket with our headers.

        APPSEC: content a browser would run is never redirected: it is served here, with the
        CSP and nosniff that a presigned URL cannot carry. False: serve it here (also when the store has no URL).
        """
        presentation = self._presentations.of(blob_id, self._store.stat(blob_id))
        if is_active(presentation.content_type):
            return False
        url = self._store.redirect_url(
            blob_id,
            seconds=self._redirect_seconds,
            overrides={
                'ResponseContentType': presentation.content_type,
                'ResponseContentDisposition': content_disposition(presentation.filename),
                'ResponseCacheControl': 'public, max-age=31536000, immutable',
            },
        )
        if url is None:
            return False  # NOTE: a store whose backend serves no URLs (a directory)
        resp.status = falcon.HTTP_307
        resp.location = url
        # NOTE: the URL expires; a cache may keep the redirect for half its life at most.
        resp.cache_control = ('private', f'max-age={self._redirect_seconds // 2}')
        return True

    def _original(self, blob_id: str) -> Sendable:
        def redirect(stat: BlobStat) -> str | None:
            # NOTE: small blobs are sent by ISS even behind nginx, so that nginx can cache them.
            if not self._accel_redirect or stat.size < self._accel_min_bytes:
                return None
            return self._accel_redirect + self._store.proxy_path(blob_id)

        return Sendable(
            etag=blob_id,
            open=lambda: self._store.open(blob_id),
            stat=lambda: self._store.stat(blob_id),
            describe=lambda stat: self._presentations.of(blob_id, stat),
            redirect=redirect,
        )


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
    # NOTE: any of these in the query asks for a derivative (PERF: one tuple, not one per GET)
    _QUERY_NAMES = (*PARAMETERS, 'preset')
    _DEFAULT_QUALITY = 80

    def __init__(self, store: BlobStore, settings: Settings) -> None:
        self._store = store
        self._max_pixels = settings.max_image_pixels
        self._max_dimension = settings.max_derived_dimension
        self._presets = settings.derivative_presets
        self._mode = settings.derivatives
        self._signing_keys = (settings.signing_key, settings.signing_key_previous)

    def respond(self, req: falcon.Request, resp: falcon.Response, blob_id: str) -> bool:
        """Serve the derivative the query asks for; False when it asks for none (serve the original)."""
        if not any(name in req.params for name in self._QUERY_NAMES):
            return False
        self._refuse_what_would_be_ignored(req)
        params = self._allowed_params(req)
        requested_format = self._format(params)
        stored = self._store.read_meta(blob_id)
        if stored is None:
            # NOTE: a deleted blob has no meta: BlobNotFound here, before any cached
            # derivative is served (another node's cache may still hold one).
            self._store.stat(blob_id)
            stored = {}
        variant = self._variant(req, params, blob_id, stored, requested_format)
        if requested_format == 'auto':
            resp.vary = ('Accept',)

        def stat() -> BlobStat:
            derived = self._open(blob_id, variant)
            derived.file.close()
            return derived.stat

        send_file(
            req,
            resp,
            Sendable(
                etag=f'{blob_id}/{variant.key}',
                open=lambda: self._open(blob_id, variant),
                stat=stat,
                describe=lambda stat: self._presentation(blob_id, stored, variant),
                # NOTE: a 304 needs no render (the variant decides the bytes), only the blob.
                exists=lambda: self._store.stat(blob_id),
            ),
        )
        return True

    @staticmethod
    def _presentation(blob_id: str, stored: dict[str, Any], variant: images.Variant) -> Presentation:
        """A derivative is saved as its source's name with the variant: ``photo-256x256-cover.webp``."""
        source_name = meta.download_name(blob_id, stored, meta.OCTET_STREAM)
        return Presentation(variant.media_type, f'{pathlib.PurePath(source_name).stem}-{variant.key}')

    def _open(self, blob_id: str, variant: images.Variant) -> OpenBlob:
        """The cached derivative, rendered first if it is not cached."""
        hex_digest = parse_id(blob_id)
        cached = self._store.derived.open(hex_digest, variant.key)
        if cached is not None:
            return cached
        source = self._store.open(blob_id)

        def write(out: IO[bytes]) -> None:
            images.render(source.file, variant, out, self._max_pixels)

        with source.file, _refusing_what_cannot_render(blob_id):
            return self._store.derived.put(hex_digest, variant.key, write)

    def _refuse_what_would_be_ignored(self, req: falcon.Request) -> None:
        """A derivative's query says exactly one thing: no parameter twice, none unknown.

        NOTE: each of these was once taken silently (the last ``w`` of two won, an unknown
        one was ignored), rendering and caching something the client did not ask for.
        """
        for name, value in req.params.items():
            if name in signing.PARAMETERS:
                continue  # NOTE: a signed URL's own (checked by auth.RequireReadToken)
            if name not in self._QUERY_NAMES:
                raise BadRequest(
                    f'{name} is not a derivative parameter; they are {", ".join(self.PARAMETERS)}.',
                    title='Unknown parameter',
                )
            if isinstance(value, list):
                raise BadRequest(f'Give {name} once.', title='Repeated parameter')

    def _allowed_params(self, req: falcon.Request) -> dict[str, str]:
        """The derivative's parameters: a preset's, or the query's where ``ISS_DERIVATIVES`` allows them.

        ``open``: any; ``presets``: only ``?preset=NAME``; ``signed``: presets, and other
        parameters only in a signed URL (so nobody makes the service render sizes the
        application did not hand out).
        """
        name = req.get_param('preset')
        given = {key: value for key, value in req.params.items() if key in self.PARAMETERS}
        if name is not None:
            if given:
                raise BadRequest('Give a preset, or parameters, not both.', title='Invalid preset')
            if name not in self._presets:
                known = ', '.join(self._presets) or 'none are configured (ISS_DERIVATIVE_PRESETS)'
                raise BadRequest(f'{name!r} is no preset; the presets are: {known}.', title='Unknown preset')
            return dict(self._presets[name])
        if self._mode == 'presets':
            raise falcon.HTTPForbidden(
                title='Only presets',
                description=f'This service renders only its presets: ?preset= {", ".join(self._presets)}.',
            )
        if self._mode == 'signed':
            try:
                signing.verify(self._signing_keys, req.path, req.params)
            except signing.BadSignature as exc:
                raise falcon.HTTPForbidden(
                    title='Invalid signature',
                    description=f'Derivative parameters need a signed URL (POST /sign), or ?preset=. {exc}',
                ) from None
        return given

    def _format(self, params: dict[str, str]) -> str | None:
        name = params.get('format')
        if name is None:
            return None
        name = name.lower()
        if name != 'auto' and name not in images.OUTPUT_FORMATS:
            raise BadRequest(
                f'format must be one of {", ".join([*images.OUTPUT_FORMATS, "auto"])}.', title='Invalid format'
            )
        return name

    def _variant(
        self,
        req: falcon.Request,
        params: dict[str, str],
        blob_id: str,
        stored: dict[str, Any],
        requested_format: str | None,
    ) -> images.Variant:
        width = _int_param(params, 'w', self._max_dimension)
        height = _int_param(params, 'h', self._max_dimension)
        fit = params.get('fit', 'contain')
        if fit not in images.FITS:
            raise BadRequest('fit must be contain, cover or fill.', title='Invalid fit')
        if fit != 'contain' and (width is None or height is None):
            # NOTE: "exactly w x h" needs both; with one, cover rendered the source's aspect
            raise BadRequest(f'fit={fit} makes exactly w x h: give both w and h.', title='Invalid fit')
        quality = _int_param(params, 'q', 100)
        source = self._source(blob_id, stored)
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
                raise BadRequest('q applies to jpeg, webp and avif.', title='Invalid q')
            quality = None
        elif quality is None:
            quality = self._DEFAULT_QUALITY
        return images.Variant(width, height, fit, image_format, quality)

    def _source(self, blob_id: str, stored: dict[str, Any]) -> dict[str, Any]:
        """What the meta says of the source image (format and mode), read from its header if not."""
        if 'mode' in stored and 'format' in stored:
            return stored
        blob = self._store.open(blob_id)
        with blob.file, _refusing_what_cannot_render(blob_id):
            info = images.identify(blob.file, self._max_pixels)
        return {'format': info.format, **info.fields}


def _int_param(params: dict[str, str], name: str, maximum: int) -> int | None:
    """A whole number from 1 to ``maximum``, or None when not given; 400 otherwise, as Falcon's own."""
    raw = params.get(name)
    if raw is None:
        return None
    try:
        value = int(raw)
    except ValueError:
        raise falcon.HTTPInvalidParam('The value must be an integer.', name) from None
    if not 1 <= value <= maximum:
        raise falcon.HTTPInvalidParam(f'The value must be at least 1 and at most {maximum}.', name)
    return value


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


class BlobMeta:
    """Serves what is stored about a blob; an image's meta from the FastAPI version is completed."""

    def __init__(self, store: BlobStore, settings: Settings) -> None:
        self._store = store
        self._max_pixels = settings.max_image_pixels

    def on_get(self, req: falcon.Request, resp: falcon.Response, blob_id: str) -> None:
        size = self._store.stat(blob_id).size
        stored = self._store.read_meta(blob_id)
        if stored is not None and meta.lacks_fields(stored):
            stored = meta.complete_image(self._store, blob_id, self._max_pixels) or stored
        resp.media = stored or {'bytes': size}


class Sign:
    """``POST /sign``: a URL that reads one blob (or one derivative of it) without a token, for a while.

    Body: ``{"id": "sha256:...", "door": "images" | "artifacts", "params": {"w": 256, ...},
    "expires_in": 3600}``; only ``id`` is required. Needs the upload or the admin token, so
    it needs one of them set; signing is off without ``ISS_SIGNING_KEY`` (403).
    """

    MAX_EXPIRES_IN = 7 * 24 * 3600
    _MAX_BODY_BYTES = 64 * 1024

    def __init__(self, receiver: UploadReceiver, settings: Settings) -> None:
        self._receiver = receiver
        self._key = settings.signing_key
        self._tokens = tuple(token.encode() for token in (settings.api_token, settings.admin_token) if token)

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        if not self._key or not self._tokens:
            raise falcon.HTTPForbidden(
                title='Signing is off',
                description='Signing needs ISS_SIGNING_KEY, and ISS_API_TOKEN or ISS_ADMIN_TOKEN to ask for it.',
            )
        if not carries_one_of(req, self._tokens):
            raise falcon.HTTPUnauthorized(
                title='Token required',
                description='Signing needs "Authorization: Bearer <ISS_API_TOKEN or ISS_ADMIN_TOKEN>".',
                challenges=['Bearer realm="iss"'],
            )
        try:
            body = json.loads(self._receiver.read_small(req, self._MAX_BODY_BYTES) or b'null')
        except ValueError:
            body = None
        if not isinstance(body, dict):
            raise BadRequest(
                'Send JSON {"id": "sha256:<hex>", "params": {...}, "expires_in": 3600}.', title='Invalid body'
            )
        try:
            blob_id = parse_id(str(body.get('id')))
        except InvalidId as exc:
            raise InvalidIdInBody(str(exc)) from None
        door, params, expires_in = body.get('door', 'images'), body.get('params', {}), body.get('expires_in', 3600)
        if door not in ('images', 'artifacts'):
            raise BadRequest('door is images or artifacts.', title='Invalid body')
        if isinstance(params, dict):  # NOTE: 256.0 is an integer to JSON Schema
            params = {k: int(v) if isinstance(v, float) and v.is_integer() else v for k, v in params.items()}
        if not isinstance(params, dict) or not all(
            name in Derivatives.PARAMETERS and isinstance(value, (str, int)) and not isinstance(value, bool)
            for name, value in params.items()
        ):
            raise BadRequest(
                'params is an object of derivative parameters (w, h, fit, format, q) and their values.',
                title='Invalid body',
            )
        if isinstance(expires_in, float) and expires_in.is_integer():
            expires_in = int(expires_in)  # NOTE: 3600.0 is an integer to JSON Schema
        if not isinstance(expires_in, int) or isinstance(expires_in, bool) or not 0 < expires_in <= self.MAX_EXPIRES_IN:
            raise BadRequest(f'expires_in is 1 to {self.MAX_EXPIRES_IN} seconds.', title='Invalid body')
        path = f'/{door}/sha256:{blob_id}'
        url = signing.signed_path(self._key, path, {str(k): str(v) for k, v in params.items()}, expires_in)
        resp.media = {'url': url, 'expires': int(urllib.parse.parse_qs(url.partition('?')[2])['expires'][0])}


# -- resumable uploads (tus 1.0) -----------------------------------------------------


#: What a browser's tus client must be allowed to read of the answers (CORS).
TUS_HEADERS = (
    'Upload-Offset',
    'Upload-Length',
    'Upload-Metadata',
    'Upload-Expires',
    'Tus-Resumable',
    'Tus-Version',
    'Tus-Extension',
    'Tus-Max-Size',
    'Tus-Checksum-Algorithm',
    'ISS-Blob-Id',
    'ISS-Blob-Status',
    'ISS-Blob-Location',
)


class ResumableUploads:
    """The tus 1.0 uploads under ``/uploads``: what both of its resources share.

    A session is created with its length and ``Upload-Metadata`` (``kind``, ``meta``,
    ``filename``, ``filetype``, ``sha256``), checked then as a POST's fields are, so a
    wrong kind is refused before a byte is sent. Chunks are appended by
    ``resumable.Sessions``; the last one commits the upload through the store like any
    other (an image is identified then: 415, and nothing stored, for one that is not).
    """

    def __init__(self, store: BlobStore, sessions: resumable.Sessions, doors: dict[str, Uploads], settings: Settings):
        self._store = store
        self.sessions = sessions
        self._doors = doors
        self.max_size = settings.max_upload_bytes
        self._timeout = settings.body_timeout
        self._max_meta_bytes = settings.max_meta_bytes

    def owner(self, req: falcon.Request) -> str:
        """The requester, as a session records its owner (``RequireToken`` has checked the upload token, if set)."""
        return resumable.owner_of(bearer_token(req.get_header('Authorization')))

    def door_of(self, metadata: dict[str, str]) -> tuple[str, Uploads]:
        """Where the finished upload goes (``images`` or ``artifacts``), its fields checked now.

        Raises:
            BadRequest: no kind, a bad kind or meta, or a ``sha256`` that is no id.
        """
        kind = metadata.get('kind')
        if 'sha256' in metadata:
            try:
                parse_id(_as_id(metadata['sha256']))
            except InvalidId:
                raise BadRequest(
                    'sha256 in Upload-Metadata is the expected id: sha256:<64 lowercase hex>.',
                    title='Invalid Upload-Metadata',
                ) from None
        if kind == 'image':
            return 'images', self._doors['images']
        meta.check_kind(kind)
        meta.parse_user_meta(metadata.get('meta'), self._max_meta_bytes)
        return 'artifacts', self._doors['artifacts']

    def receive(
        self, req: falcon.Request, session_id: str, owner: str, offset: int, *, has_body: bool = True
    ) -> resumable.Session:
        """Append the request's body at ``offset``; commit the upload when it is its last byte."""
        with self.sessions.writing(session_id, owner, offset) as (session, fd):
            if has_body and req.content_length != 0:
                body = RequestBody(req, session.length - offset, self._timeout)
                session = self.sessions.append(
                    session, fd, body, resumable.parse_checksum(req.get_header('Upload-Checksum'))
                )
            if session.complete:
                session = self._commit(req, session, fd)
        return session

    def _commit(self, req: falcon.Request, session: resumable.Session, fd: int) -> resumable.Session:
        """The complete upload into the store, verified and identified as a POST's would be."""
        collection, uploads = self.door_of(session.metadata)
        metadata = session.metadata
        with self.sessions.staged(session, fd) as staged:
            expected = metadata.get('sha256')
            if expected is not None and staged.digest != _as_id(expected):
                self.sessions.discard(session.id)
                raise BadRequest(
                    f'The upload hashes to {staged.digest}, not {_as_id(expected)}; nothing was stored.',
                    title='Digest mismatch',
                )
            fields = {name: metadata[name] for name in ('kind', 'meta') if name in metadata}
            upload = Upload(staged, metadata.get('filename') or metadata.get('name'), _filetype(metadata), fields)
            try:
                committed = self._store.commit(staged, uploads.meta_for(req, upload))
            except FileRefused:
                self.sessions.discard(session.id)
                raise
            # NOTE: recorded before the staged file goes: a crash between them leaves a finished
            # session whose file is swept with it, never one that can neither resume nor answer
            return self.sessions.finish(
                session,
                {'id': staged.digest, 'location': f'/{collection}/{staged.digest}', 'created': committed.created},
            )

    def answer(self, resp: falcon.Response, session: resumable.Session) -> None:
        """The headers every answer about a session carries: offset, expiry, and the blob once committed."""
        resp.set_header('Upload-Offset', str(session.offset))
        resp.set_header(
            'Upload-Expires', falcon.dt_to_http(datetime.datetime.fromtimestamp(session.expires, datetime.UTC))
        )
        if session.result is not None:
            resp.set_header('ISS-Blob-Id', session.result['id'])
            resp.set_header('ISS-Blob-Status', '201' if session.result['created'] else '200')
            resp.set_header('ISS-Blob-Location', session.result['location'])


class UploadsCollection:
    """``/uploads``: OPTIONS tells what this tus server speaks; POST creates an upload, with its first chunk or not."""

    def __init__(self, uploads: ResumableUploads) -> None:
        self._uploads = uploads

    def on_options(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.status = falcon.HTTP_204
        resp.set_header('Tus-Version', resumable.VERSION)
        resp.set_header('Tus-Extension', ','.join(resumable.EXTENSIONS))
        resp.set_header('Tus-Max-Size', str(self._uploads.max_size))
        resp.set_header('Tus-Checksum-Algorithm', ','.join(resumable.CHECKSUMS))

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        if req.get_header('Upload-Defer-Length') is not None:
            raise BadRequest(
                'Give Upload-Length: this server does not take uploads of unknown length.',
                title='Upload-Length required',
            )
        length = _header_count(req, 'Upload-Length')
        if length > self._uploads.max_size:
            raise UploadTooLarge(self._uploads.max_size)
        metadata = resumable.parse_metadata(req.get_header('Upload-Metadata'))
        self._uploads.door_of(metadata)
        has_chunk = req.content_length != 0 and (req.content_length is not None or _chunk_type(req))
        if has_chunk and not _chunk_type(req):
            raise falcon.HTTPUnsupportedMediaType(
                title='Unsupported chunk', description=f'A chunk is sent as Content-Type: {resumable.CHUNK_TYPE}.'
            )
        owner = self._uploads.owner(req)
        session = self._uploads.sessions.create(length, metadata, owner)
        resp.status = falcon.HTTP_201
        resp.location = f'/uploads/{session.id}'
        if has_chunk or length == 0:
            session = self._uploads.receive(req, session.id, owner, 0, has_body=has_chunk)
        self._uploads.answer(resp, session)


class UploadSession:
    """``/uploads/{upload_id}``: HEAD says its offset, PATCH appends a chunk, DELETE terminates it."""

    def __init__(self, uploads: ResumableUploads) -> None:
        self._uploads = uploads

    def on_head(self, req: falcon.Request, resp: falcon.Response, upload_id: str) -> None:
        session = self._uploads.sessions.get(upload_id, self._uploads.owner(req))
        resp.set_header('Upload-Length', str(session.length))
        if session.metadata:
            resp.set_header('Upload-Metadata', resumable.format_metadata(session.metadata))
        resp.cache_control = ('no-store',)
        self._uploads.answer(resp, session)

    def on_patch(self, req: falcon.Request, resp: falcon.Response, upload_id: str) -> None:
        if not _chunk_type(req):
            raise falcon.HTTPUnsupportedMediaType(
                title='Unsupported chunk', description=f'A chunk is sent as Content-Type: {resumable.CHUNK_TYPE}.'
            )
        owner = self._uploads.owner(req)
        session = self._uploads.receive(req, upload_id, owner, _header_count(req, 'Upload-Offset'))
        resp.status = falcon.HTTP_204
        self._uploads.answer(resp, session)

    def on_delete(self, req: falcon.Request, resp: falcon.Response, upload_id: str) -> None:
        self._uploads.sessions.terminate(upload_id, self._uploads.owner(req))
        resp.status = falcon.HTTP_204


class TusProtocol:
    """Middleware for ``/uploads``: ``Tus-Resumable`` asked of every request but OPTIONS, and sent on every answer."""

    _RESOURCES = (UploadsCollection, UploadSession)
    _OVERRIDES = frozenset({'PATCH', 'DELETE'})

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        """``X-HTTP-Method-Override``: a POST stands for a PATCH or DELETE (proxies that drop those)."""
        # PERF: every request passes here; a GET costs one comparison
        if req.method != 'POST' or not req.path.startswith('/uploads/'):
            return
        override = (req.get_header('X-HTTP-Method-Override') or '').upper()
        if override in self._OVERRIDES:
            req.method = override

    def process_resource(self, req: falcon.Request, resp: falcon.Response, resource: object, params: dict) -> None:
        if (
            isinstance(resource, self._RESOURCES)
            and req.method != 'OPTIONS'
            and req.get_header('Tus-Resumable') != resumable.VERSION
        ):
            raise UnsupportedProtocol(resumable.VERSION)

    def process_response(
        self, req: falcon.Request, resp: falcon.Response, resource: object, req_succeeded: bool
    ) -> None:
        if isinstance(resource, self._RESOURCES):
            resp.set_header('Tus-Resumable', resumable.VERSION)
            resp.set_header('Tus-Version', resumable.VERSION)


def _header_count(req: falcon.Request, name: str) -> int:
    """A header that must be a whole number of bytes (``Upload-Length``, ``Upload-Offset``)."""
    raw = req.get_header(name)
    if raw is None or not raw.isdigit() or len(raw) > 18:
        raise BadRequest(f'{name} is required: a whole number of bytes.', title=f'Invalid {name}')
    return int(raw)


def _chunk_type(req: falcon.Request) -> bool:
    return _content_type(req).partition(';')[0].strip() == resumable.CHUNK_TYPE


def _as_id(text: str) -> str:
    """An expected digest as an id: ``sha256:<hex>``, given with the prefix or without."""
    return text if text.startswith('sha256:') else 'sha256:' + text


def _filetype(metadata: dict[str, str]) -> str | None:
    """The client's media type of the file (tus-js-client and Uppy send ``filetype``, ``type``)."""
    return metadata.get('filetype') or metadata.get('type') or None


class BrowsePage:
    """``GET /`` and ``/browse``: the page to look at the store, upload and delete, in a browser.

    The page is public (it holds no data; the script reads through the API, with the token
    the user gives it); revalidated on every visit, its assets cached for a year.
    """

    def __init__(self, assets: browse.Assets) -> None:
        self._assets = assets

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.etag = self._assets.etag
        resp.cache_control = ('no-cache',)
        resp.set_header('Content-Security-Policy', browse.CSP)
        resp.set_header('X-Content-Type-Options', 'nosniff')
        resp.set_header('Referrer-Policy', 'same-origin')
        if req.get_header('If-None-Match') == f'"{self._assets.etag}"':
            resp.status = falcon.HTTP_304
            return
        resp.data = self._assets.html
        resp.content_type = 'text/html; charset=utf-8'


class BrowseAsset:
    """``GET /browse/{name}``: the page's script and style, by fingerprinted name, immutable."""

    def __init__(self, assets: browse.Assets) -> None:
        self._assets = assets

    def on_get(self, req: falcon.Request, resp: falcon.Response, name: str) -> None:
        if name not in self._assets.files:
            raise falcon.HTTPNotFound(title='Not found', description=f'The page has no asset {name!r}.')
        resp.data, resp.content_type = self._assets.files[name]
        resp.cache_control = ('public', 'max-age=31536000', 'immutable')
        resp.set_header('X-Content-Type-Options', 'nosniff')


class Health:
    """Liveness and readiness: 200 while the store takes writes, else 503."""

    def __init__(self, store: BlobStore) -> None:
        self._store = store

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.cache_control = ('no-store',)
        try:
            self._store.check()
        except StoreFailure as exc:
            resp.status = falcon.HTTP_503
            # NOTE: which part is down (data directory, bucket, index), for whoever is paged.
            resp.media = {'ok': False, 'failing': exc.part, 'error': str(exc)}
            if exc.retry_after:
                resp.retry_after = exc.retry_after
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


# -- helpers --------------------------------------------------------------------


def _timestamp_param(req: falcon.Request, name: str) -> float | None:
    """A time given as Unix seconds or ISO 8601 (no zone: UTC), as Unix seconds."""
    raw = req.get_param(name)
    if raw is None:
        return None
    try:
        return float(raw) if _NUMBER_PATTERN.fullmatch(raw) else _iso_timestamp(raw)
    except ValueError:
        raise BadRequest(
            f'{name} must be Unix seconds or an ISO 8601 time, e.g. 2026-11-25T12:00:00Z.', title=f'Invalid {name}'
        ) from None


def _iso_timestamp(text: str) -> float:
    moment = datetime.datetime.fromisoformat(text)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)
    return moment.timestamp()


# -- the app --------------------------------------------------------------------


def create_app(settings: Settings, store: BlobStore) -> falcon.App:
    """Wire the WSGI app: every route ISS serves, its middleware and its error map.

    It only wires: the store arrives ready (see :func:`build_app`).
    """
    metrics = telemetry.Metrics(store, shared=bool(settings.metrics_dir))
    middleware: list[object] = [telemetry.RequestTelemetry(metrics), TusProtocol()]
    if settings.cors_origins:
        middleware.append(
            falcon.CORSMiddleware(
                allow_origins=list(settings.cors_origins),
                expose_headers=['ETag', 'Content-Range', 'Content-Length', 'Location', 'X-Request-Id', *TUS_HEADERS],
            )
        )
    if settings.api_token:
        middleware.append(
            RequireToken(
                frozenset({'POST', 'PUT', 'PATCH'}),
                settings.api_token,
                'ISS_API_TOKEN',
                'Uploading',
                exempt=(Sign,),
                every_method_of=(UploadSession,),
            )
        )
    # NOTE: an upload session is terminated by its owner, not the admin (ResumableUploads.owner)
    middleware.append(
        RequireToken(
            frozenset({'DELETE'}), settings.admin_token, 'ISS_ADMIN_TOKEN', 'Deleting', exempt=(UploadSession,)
        )
    )
    if settings.read_token:
        middleware.append(
            RequireReadToken(
                (settings.read_token, settings.api_token, settings.admin_token),
                public=(Health, OpenAPIDocument, Docs, BrowsePage, BrowseAsset, UploadsCollection, UploadSession),
                reads_by_post=(MissingBlobs,),
                signing_keys=(settings.signing_key, settings.signing_key_previous),
            )
        )

    app = falcon.App(middleware=middleware)
    app.set_error_serializer(_serialize_error)
    app.add_error_handler(ServiceError, _answer_service_error)
    app.add_error_handler(Exception, _log_unexpected_error)

    receiver = UploadReceiver(store, settings)
    presentations = Presentations(store)
    image_uploads = ImageUploads(store, settings)
    artifact_uploads = ArtifactUploads(store, settings)
    derivatives = Derivatives(store, settings)
    blob_meta = BlobMeta(store, settings)
    app.add_route('/images', Collection(store, receiver, image_uploads, index.IMAGES, settings))
    app.add_route('/images/{blob_id}', Item(store, receiver, image_uploads, presentations, settings, derivatives))
    app.add_route('/images/{blob_id}/meta', blob_meta)
    app.add_route('/artifacts', Collection(store, receiver, artifact_uploads, index.ARTIFACTS, settings))
    app.add_route('/artifacts/{blob_id}', Item(store, receiver, artifact_uploads, presentations, settings))
    app.add_route('/artifacts/{blob_id}/meta', blob_meta)
    app.add_route('/blobs/missing', MissingBlobs(store, receiver))
    app.add_route('/stats', Stats(store))
    resumable_uploads = ResumableUploads(
        store,
        resumable.Sessions(store, settings.upload_expires),
        {'images': image_uploads, 'artifacts': artifact_uploads},
        settings,
    )
    app.add_route('/uploads', UploadsCollection(resumable_uploads))
    app.add_route('/uploads/{upload_id}', UploadSession(resumable_uploads))
    app.add_route('/sign', Sign(receiver, settings))
    app.add_route('/metrics', telemetry.MetricsEndpoint(metrics))

    health = Health(store)
    app.add_route('/health', health)
    app.add_route('/healthz', health)

    openapi = OpenAPIDocument(HERE / 'openapi.yaml')
    app.add_route('/openapi.yaml', openapi)
    app.add_route('/openapi.json', openapi, suffix='json')
    app.add_route('/docs', Docs())
    assets = browse.Assets(HERE / 'browse')
    page = BrowsePage(assets)
    app.add_route('/', page)
    app.add_route('/browse', page)
    app.add_route('/browse/{name}', BrowseAsset(assets))
    app.add_static_route('/docs/assets', str(swagger_ui_path))
    return app


def build_app(settings: Settings) -> falcon.App:
    """The app on the store the settings name, started (temp files swept, the index built if need be)."""
    store = open_store(settings)
    store.start()
    return create_app(settings, store)


def __getattr__(name: str) -> falcon.App:
    """Build ``iss.app`` from the environment when gunicorn first asks for it.

    NOTE: lazily, so importing this module (tests, tools) touches no data directory.
    """
    if name == 'app':
        app = build_app(Settings.from_env())
        globals()['app'] = app
        return app
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


if __name__ == '__main__':
    from iss_server import cli

    sys.exit(cli.main())
