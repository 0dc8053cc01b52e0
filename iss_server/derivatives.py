"""Derivatives (images resized and converted on request) and the signed URLs that hand them out.

:class:`Derivatives` serves ``/images/{id}?w=&h=&fit=&format=&q=`` (or ``?preset=``)
for ``Item``: it checks the query, picks the variant, renders it once into the
store's derivative cache and sends it like a blob. :class:`Sign` answers
``POST /sign`` with a URL that reads one blob or derivative without a token.
The parameters are named once, in ``config.DERIVATIVE_PARAMETERS``.
"""

from __future__ import annotations

import contextlib
import pathlib
import urllib.parse
from collections.abc import Iterator, Mapping
from typing import IO, Any

import falcon

from iss_server import doors, images, index, meta, signing
from iss_server.auth import carries_one_of, token_required
from iss_server.blobs import OpenBlob, parse_id
from iss_server.config import DERIVATIVE_PARAMETERS, Settings
from iss_server.errors import BadRequest, InvalidId, InvalidIdInBody
from iss_server.params import single, whole_number
from iss_server.receiving import UploadReceiver
from iss_server.responses import etag_matches, send_file, send_not_modified
from storage import BlobStore


class Derivatives:
    """Images resized and converted on request, each rendered once and kept in a bounded cache.

    ``?w=&h=`` bound the size (never enlarged, except by ``fit=fill``), ``fit``
    is contain (default), cover (crop to fill w x h) or fill (stretch),
    ``format`` is jpeg, png, webp, avif (where Pillow has it) or auto (from
    Accept), ``q`` the quality (1-100; not for png). A derivative is a file
    like a blob: strong ETag (the id and the variant), immutable, HEAD,
    Range, 304 (answered without rendering: the variant decides the bytes).
    """

    # NOTE: any of these in the query asks for a derivative (PERF: one tuple, not one per GET)
    _QUERY_NAMES = (*DERIVATIVE_PARAMETERS, 'preset')
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
        requested_format = _format(params)
        stored = self._store.read_meta(blob_id)
        if stored is None:
            # NOTE: a deleted blob has no meta: BlobNotFound here, before any cached
            # derivative is served (another node's cache may still hold one).
            self._store.stat(blob_id)
            stored = {}
        variant = self._variant(req, params, blob_id, stored, requested_format)
        if requested_format == 'auto':
            resp.vary = ('Accept',)
        etag = f'{blob_id}/{variant.key}'
        if etag_matches(req.if_none_match, etag):
            self._store.stat(blob_id)  # NOTE: a 304 needs no render (the variant decides the bytes), only the blob
            send_not_modified(resp, etag)
            return True
        filename = self._filename(blob_id, stored, variant)
        derived = self._open(blob_id, variant)
        file: IO[bytes] | None = derived.file
        if req.method == 'HEAD':
            derived.file.close()
            file = None
        send_file(
            req, resp, file, etag=etag, size=derived.stat.size, content_type=variant.media_type, filename=filename
        )
        return True

    @staticmethod
    def _filename(blob_id: str, stored: dict[str, Any], variant: images.Variant) -> str:
        """A derivative is saved as its source's name with the variant: ``photo-256x256-cover.webp``."""
        source_name = meta.download_name(blob_id, stored, meta.OCTET_STREAM)
        return f'{pathlib.PurePath(source_name).stem}-{variant.key}'

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
        for name in req.params:
            if name in signing.PARAMETERS:
                continue  # NOTE: a signed URL's own (checked by auth.RequireReadToken)
            if name not in self._QUERY_NAMES:
                raise BadRequest(
                    f'{name} is not a derivative parameter; they are {", ".join(DERIVATIVE_PARAMETERS)}.',
                    title='Unknown parameter',
                )
            single(req, name)  # NOTE: BadRequest for one given twice

    def _allowed_params(self, req: falcon.Request) -> dict[str, str]:
        """The derivative's parameters: a preset's, or the query's where ``ISS_DERIVATIVES`` allows them.

        ``open``: any; ``presets``: only ``?preset=NAME``; ``signed``: presets, and other
        parameters only in a signed URL (so nobody makes the service render sizes the
        application did not hand out).
        """
        name = single(req, 'preset')
        # NOTE: a parameter given twice (a list) was refused already
        given = {
            key: value for key, value in req.params.items() if key in DERIVATIVE_PARAMETERS and isinstance(value, str)
        }
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

    def _variant(
        self,
        req: falcon.Request,
        params: dict[str, str],
        blob_id: str,
        stored: dict[str, Any],
        requested_format: str | None,
    ) -> images.Variant:
        width, height, fit, quality = _box(params, self._max_dimension)
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


def check_parameters(params: Mapping[str, str], max_dimension: int) -> None:
    """Refuse derivative parameters a request would be refused for (``POST /sign``, ``python -m iss sign``).

    Raises:
        BadRequest: a name that is no derivative parameter, or a value outside its grammar.
        falcon.HTTPInvalidParam: w, h or q not a whole number in bounds.
    """
    unknown = set(params) - set(DERIVATIVE_PARAMETERS)
    if unknown:
        raise BadRequest(
            f'{", ".join(sorted(unknown))}: not a derivative parameter; they are {", ".join(DERIVATIVE_PARAMETERS)}.',
            title='Unknown parameter',
        )
    _box(params, max_dimension)
    _format(params)


def _box(params: Mapping[str, str], max_dimension: int) -> tuple[int | None, int | None, str, int | None]:
    """A derivative's ``w``, ``h``, ``fit`` and ``q``, each in its grammar."""
    width = whole_number(params.get('w'), 'w', minimum=1, maximum=max_dimension)
    height = whole_number(params.get('h'), 'h', minimum=1, maximum=max_dimension)
    fit = params.get('fit', 'contain')
    if fit not in images.FITS:
        raise BadRequest('fit must be contain, cover or fill.', title='Invalid fit')
    if fit != 'contain' and (width is None or height is None):
        # NOTE: "exactly w x h" needs both; with one, cover rendered the source's aspect
        raise BadRequest(f'fit={fit} makes exactly w x h: give both w and h.', title='Invalid fit')
    return width, height, fit, whole_number(params.get('q'), 'q', minimum=1, maximum=100)


def _format(params: Mapping[str, str]) -> str | None:
    name = params.get('format')
    if name is None:
        return None
    name = name.lower()
    if name != 'auto' and name not in images.OUTPUT_FORMATS:
        raise BadRequest(
            f'format must be one of {", ".join([*images.OUTPUT_FORMATS, "auto"])}.', title='Invalid format'
        )
    return name


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
    except images.OutputTooLarge as exc:
        raise falcon.HTTPUnprocessableEntity(title='Derivative too large', description=f'{exc}.') from None
    except images.CannotRender as exc:
        raise falcon.HTTPUnprocessableEntity(
            title='Cannot render', description=f'The image cannot be decoded: {exc}'
        ) from None


class Sign:
    """``POST /sign``: a URL that reads one blob (or one derivative of it) without a token, for a while.

    Body: ``{"id": "sha256:...", "door": "images" | "artifacts", "params": {"w": 256, ...},
    "expires_in": 3600}``; only ``id`` is required. Needs the upload or the admin token, so
    it needs one of them set; signing is off without ``ISS_SIGNING_KEY`` (403).
    """

    _MAX_BODY_BYTES = 64 * 1024

    def __init__(self, receiver: UploadReceiver, settings: Settings) -> None:
        self._receiver = receiver
        self._key = settings.signing_key
        self._max_dimension = settings.max_derived_dimension
        self._tokens = tuple(token.encode() for token in (settings.api_token, settings.admin_token) if token)

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        if not self._key or not self._tokens:
            raise falcon.HTTPForbidden(
                title='Signing is off',
                description='Signing needs ISS_SIGNING_KEY, and ISS_API_TOKEN or ISS_ADMIN_TOKEN to ask for it.',
            )
        if not carries_one_of(req, self._tokens):
            raise token_required('Signing needs "Authorization: Bearer <ISS_API_TOKEN or ISS_ADMIN_TOKEN>".', req)
        body = self._receiver.read_json(req, self._MAX_BODY_BYTES)
        if not isinstance(body, dict):
            raise BadRequest(
                'Send JSON {"id": "sha256:<hex>", "params": {...}, "expires_in": 3600}.', title='Invalid body'
            )
        try:
            blob_id = parse_id(str(body.get('id')))
        except InvalidId as exc:
            raise InvalidIdInBody(str(exc)) from None
        door, params = body.get('door', index.IMAGES), _whole(body.get('params', {}))
        expires_in = _whole(body.get('expires_in', 3600))
        if door not in (index.IMAGES, index.ARTIFACTS):
            raise BadRequest('door is images or artifacts.', title='Invalid body')
        if not isinstance(params, dict) or not all(
            name in DERIVATIVE_PARAMETERS and isinstance(value, (str, int)) and not isinstance(value, bool)
            for name, value in params.items()
        ):
            raise BadRequest(
                f'params is an object of derivative parameters ({", ".join(DERIVATIVE_PARAMETERS)}) and their values.',
                title='Invalid body',
            )
        check_parameters({str(k): str(v) for k, v in params.items()}, self._max_dimension)
        longest = signing.MAX_EXPIRES_IN
        if not isinstance(expires_in, int) or isinstance(expires_in, bool) or not 0 < expires_in <= longest:
            raise BadRequest(f'expires_in is 1 to {longest} seconds.', title='Invalid body')
        path = doors.location(door, f'sha256:{blob_id}')
        url = signing.signed_path(self._key, path, {str(k): str(v) for k, v in params.items()}, expires_in)
        resp.media = {'url': url, 'expires': int(urllib.parse.parse_qs(url.partition('?')[2])['expires'][0])}


def _whole(value: object) -> object:
    """A whole JSON number as an int, also as an object's values: 256.0 is an integer to JSON Schema."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {key: _whole(item) for key, item in value.items()}
    return value
