"""Near-duplicate search: ``GET /images/{id}/similar`` and ``POST /images/similar``.

Both answer the stored images whose perceptual hash (``phash`` in the meta, kept in
the index's ``image_hashes`` by triggers; see :mod:`iss_server.similar`) is within
``max_distance`` bits of the one asked about, nearest first, in pages:

    {"phash": "...", "max_distance": 10,
     "items": [{"id": "sha256:...", "distance": 3, ...its listing item}], "next": "/images/...?cursor=..."}

The query is exact (every stored image within the distance is found) and reads
no more of the table than the band lookups name: see ``similar.SimilarIndex.near``.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import re
import urllib.parse

import falcon

from iss_server import images, meta, params, similar
from iss_server.config import Settings
from iss_server.doors import ImageDoor
from iss_server.errors import InvalidCursor, NotAnImage, OversizedImage, UndecodableImage
from iss_server.receiving import UploadReceiver
from storage import BlobStore

DEFAULT_LIMIT = 20
MAX_LIMIT = 100
#: A phash as the meta holds it (a meta edited by hand may hold anything: the index's triggers skip it too).
_PHASH = re.compile(r'[0-9a-f]{16}')


@dataclasses.dataclass(frozen=True)
class _Query:
    """A search's parameters, checked."""

    max_distance: int
    limit: int
    after: tuple[int, str] | None


class _Search:
    """What both routes share: the query's parameters, and the page of matches as JSON."""

    def __init__(self, store: BlobStore, settings: Settings) -> None:
        self._store = store
        self._max_pixels = settings.max_image_pixels

    @staticmethod
    def _query(req: falcon.Request) -> _Query:
        """The query's parameters, checked before anything is read or decoded.

        Raises:
            falcon.HTTPInvalidParam, BadRequest: a parameter out of its grammar or range, or given twice.
            InvalidCursor: a cursor of no previous page.
        """
        max_distance = params.whole_number(
            params.single(req, 'max_distance'), 'max_distance', minimum=0, maximum=similar.MAX_DISTANCE
        )
        limit = params.whole_number(params.single(req, 'limit'), 'limit', minimum=1, maximum=MAX_LIMIT)
        return _Query(
            similar.DEFAULT_DISTANCE if max_distance is None else max_distance,
            limit or DEFAULT_LIMIT,
            _decode_cursor(params.single(req, 'cursor')),
        )

    def _answer(
        self, req: falcon.Request, resp: falcon.Response, query: _Query, phash: str, *, exclude: str | None = None
    ) -> None:
        limit = query.limit
        # NOTE: one more than the page, to know whether there is a next one without a second query.
        found = self._store.index.similar_images(
            int(phash, 16), query.max_distance, limit + 1, exclude=exclude, after=query.after
        )
        page = found[:limit]
        items = [{**json.loads(item), 'distance': distance} for distance, item in page]
        next_url = None
        if len(found) > limit:
            last = page[-1]
            next_query = {key: value for key, value in req.params.items() if key != 'cursor'}
            next_query['cursor'] = _encode_cursor(last[0], items[-1]['id'].removeprefix('sha256:'))
            next_url = f'{req.path}?{urllib.parse.urlencode(next_query, doseq=True)}'
            resp.append_link(next_url, 'next')
        resp.cache_control = ('no-cache',)
        resp.media = {'phash': phash, 'max_distance': query.max_distance, 'items': items, 'next': next_url}


class SimilarToStored(_Search):
    """``GET /images/{id}/similar``: the stored images that look like a stored one (itself left out).

    An image stored before its perceptual hash was computed at upload gets it now (its meta
    completed once, as ``python -m iss backfill`` would).
    """

    def on_get(self, req: falcon.Request, resp: falcon.Response, blob_id: str) -> None:
        query = self._query(req)  # NOTE: before the meta is completed, which may decode the image
        stored = self._store.read_meta(blob_id)
        if stored is None:
            self._store.stat(blob_id)  # NOTE: BlobNotFound (or a malformed id) for what is not stored
            stored = {}
        if stored.get('kind') != 'image':
            raise falcon.HTTPUnsupportedMediaType(
                title='Not an image', description=f'{blob_id} is not stored as an image, so it has no perceptual hash.'
            )
        if meta.lacks_fingerprints(stored):
            stored = meta.complete_image(self._store, blob_id, self._max_pixels, fingerprints=True) or stored
        phash = stored.get('phash')
        if not isinstance(phash, str) or not _PHASH.fullmatch(phash):
            raise UndecodableImage(f'{blob_id} has no perceptual hash')
        self._answer(req, resp, query, phash, exclude=blob_id.removeprefix('sha256:'))


class SimilarToUpload(_Search):
    """``POST /images/similar``: the stored images that look like the image in the body, which is not stored.

    The body is as ``POST /images`` takes it (a raw image/* body, or a form's ``file``), within
    the same limits; the answer also carries the sent image's placeholders.
    """

    #: What a 401 says needs the upload token here (auth.RequireToken): it costs an upload's decoding, but is no upload.
    token_purpose = 'Searching with an image sent in the body'

    def __init__(self, store: BlobStore, receiver: UploadReceiver, door: ImageDoor, settings: Settings) -> None:
        super().__init__(store, settings)
        self._receiver = receiver
        self._door = door

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        self._door.check(req)
        query = self._query(req)  # NOTE: a 400 before the body is received and decoded, not after
        with self._receiver.receive(req) as (upload,), upload.staged.open() as file:
            try:
                images.identify(file, self._max_pixels)
                file.seek(0)
                sent = images.fingerprints(file, self._max_pixels)
            except images.NotAnImage:
                raise NotAnImage('') from None
            except images.ImageTooLarge as exc:
                raise OversizedImage(exc) from None
            except images.CannotRender as exc:
                raise UndecodableImage(exc) from None
        self._answer(req, resp, query, sent['phash'])
        resp.media = {**resp.media, 'thumbhash': sent['thumbhash'], 'blurhash': sent['blurhash']}


def _encode_cursor(distance: int, hex_digest: str) -> str:
    return base64.urlsafe_b64encode(f'{distance}:{hex_digest}'.encode()).decode().rstrip('=')


def _decode_cursor(cursor: str | None) -> tuple[int, str] | None:
    if cursor is None:
        return None
    try:
        distance, _, hex_digest = base64.urlsafe_b64decode(cursor + '=' * (-len(cursor) % 4)).decode().partition(':')
        if distance.isdigit() and len(hex_digest) == 64:
            return int(distance), hex_digest
    except (ValueError, UnicodeDecodeError):
        pass
    raise InvalidCursor(f'{cursor[:80]!r} is not a cursor from a previous page')
