"""The two doors an upload enters by, ``/images`` and ``/artifacts``, and what its client is told.

A door decides what an upload must be to be stored through it (an image that
Pillow identifies; an artifact with a ``kind`` and the client's ``meta``) and
the meta it is stored with. Its ``name`` is the route's first segment, the
listing the blob is indexed in (``index.IMAGES``, ``index.ARTIFACTS``) and the
start of the blob's URL (:func:`location`). A POST, a PUT and a finished tus
session all pass through a door's :meth:`Door.meta_for`.
"""

from __future__ import annotations

import time
from typing import Any, Protocol

import falcon

from iss_server import images, index, meta
from iss_server.blobs import Committed
from iss_server.config import Settings
from iss_server.errors import BadRequest, FileRefused, NotAnImage, OversizedImage, UndecodableImage, error_body
from iss_server.params import single
from iss_server.receiving import Upload, is_multipart
from storage import BlobStore, NewMeta


def location(door: str, blob_id: str) -> str:
    """The URL path of a stored blob: ``/images/sha256:...`` (``Location``, tus's result, signed URLs)."""
    return f'/{door}/{blob_id}'


class Door(Protocol):
    """How one door checks and describes what is uploaded through it."""

    #: ``images`` or ``artifacts``: the route, the listing, the blob's URL.
    name: str
    #: The key of the id in the answer: ``image_id`` or ``artifact_id``.
    id_field: str
    #: The form fields besides ``file`` that a POST may carry.
    form_fields: tuple[str, ...]

    def check(self, req: falcon.Request) -> None:
        """Refuse what the headers and query already show to be wrong, before a byte of body is read."""

    def meta_for(self, req: falcon.Request, upload: Upload) -> NewMeta:
        """The meta this door gives the uploaded file (or what makes it, which the commit calls if it writes one).

        Raises:
            FileRefused: this file cannot be stored here (in a batch, the others still are).
            ServiceError: the request is wrong for every file it carries.
        """


class ImageDoor:
    """Images: Pillow must identify the bytes from their header; the meta is what it read."""

    name = index.IMAGES
    id_field = 'image_id'
    form_fields: tuple[str, ...] = ()

    def __init__(self, settings: Settings) -> None:
        self._max_pixels = settings.max_image_pixels
        self._verify = settings.verify_images

    def check(self, req: falcon.Request) -> None:
        if req.method == 'POST' and not is_multipart(req) and not content_type(req).startswith('image/'):
            raise falcon.HTTPUnsupportedMediaType(
                title='Unsupported upload',
                description='Send multipart/form-data with a "file" field, or a raw body with an image/* '
                'Content-Type; store other files with POST /artifacts?kind=...',
            )

    def meta_for(self, req: falcon.Request, upload: Upload) -> NewMeta:
        """The image is identified (and decoded, per ISS_VERIFY_IMAGES) now; its fingerprints when its meta is written.

        PERF: the fingerprints decode the pixels (45% of the CPU of a small POST of content
        already stored, py-spy), and a commit keeps the meta it finds: only new content needs them.
        """
        with upload.staged.open() as file:
            try:
                info = meta.checked_image(file, self._max_pixels, self._verify)
            except images.NotAnImage:
                raise NotAnImage('') from None
            except images.ImageTooLarge as exc:
                raise OversizedImage(exc) from None
            except images.CannotRender as exc:
                raise UndecodableImage(exc) from None
        filename, received = offered_name(req, upload), time.time()

        def with_fingerprints() -> dict[str, Any]:
            with upload.staged.open() as file:
                fingerprints = meta.fingerprints_of(file, self._max_pixels)
            return meta.image(info, upload.staged.size, received, filename, self._verify, fingerprints)

        return with_fingerprints


class ArtifactDoor:
    """Artifacts: any bytes, with a ``kind`` and the client's ``meta`` (query string, or form fields of a POST)."""

    name = index.ARTIFACTS
    id_field = 'artifact_id'
    form_fields: tuple[str, ...] = ('kind', 'meta')

    def __init__(self, settings: Settings) -> None:
        self._max_meta_bytes = settings.max_meta_bytes

    def check(self, req: falcon.Request) -> None:
        """PERF: what the query string says is checked before a byte of body is read.

        A form may carry the kind as a field: without one in the query, it is checked by meta_for.
        """
        kind = single(req, 'kind')
        if kind is None and is_multipart(req):
            meta.parse_user_meta(single(req, 'meta'), self._max_meta_bytes)
        else:
            self.fields(kind, single(req, 'meta'))

    def fields(self, kind: str | None, user_meta: str | None) -> tuple[str, dict[str, Any]]:
        """The artifact's ``kind`` and its client's ``meta``, checked: of a POST, a PUT or a tus session.

        Raises:
            BadRequest: no kind, a kind that is not of meta.KIND_PATTERN or is ``image`` (the image
                door's), or meta that is no JSON object of at most ISS_MAX_META_BYTES without ISS's keys.
        """
        return meta.check_kind(kind), meta.parse_user_meta(user_meta, self._max_meta_bytes)

    def meta_for(self, req: falcon.Request, upload: Upload) -> dict[str, Any]:
        kind, user = self.fields(self._value(req, upload, 'kind'), self._value(req, upload, 'meta'))
        return meta.artifact(kind, upload.staged.size, upload.content_type, user, filename=offered_name(req, upload))

    @staticmethod
    def _value(req: falcon.Request, upload: Upload, name: str) -> str | None:
        value = single(req, name)
        if name not in upload.fields:
            return value
        if value is not None:
            raise BadRequest(f'Give {name} once: in the query string or as a form field.', title=f'Repeated {name}')
        return upload.fields[name]


def offered_name(req: falcon.Request, upload: Upload) -> str | None:
    """The file name the client gives: ``?filename=`` (any upload), else the form part's."""
    return single(req, 'filename') or upload.filename


def content_type(req: falcon.Request) -> str:
    """The request's Content-Type, lowercase; empty when it has none."""
    return (req.content_type or '').lower()


# -- what the client is told ----------------------------------------------------------


def answer_upload(req: falcon.Request, resp: falcon.Response, door: Door, upload: Upload, committed: Committed) -> None:
    """201 with Location for new content; 200 and the meta stored before when it was already stored."""
    body = _outcome(req, door, upload, committed)
    del body['status']
    resp.media = body
    resp.location = location(door.name, upload.staged.digest)
    resp.status = falcon.HTTP_201 if committed.created else falcon.HTTP_200


def answer_batch(req: falcon.Request, resp: falcon.Response, door: Door, store: BlobStore, files: list[Upload]) -> None:
    """Several files in one form: one group commit, and a list with each file's outcome, in order.

    A refused file (not an image, say) is an entry with its error; the others
    are stored all the same. The status is 201 when every file is stored and
    one at least is new, 200 when all were stored already, 207 when any was
    refused.
    """
    outcomes: list[dict[str, Any] | None] = []
    accepted: list[tuple[Upload, NewMeta]] = []
    for upload in files:
        try:
            accepted.append((upload, door.meta_for(req, upload)))
            outcomes.append(None)
        except FileRefused as exc:
            refusal = error_body(exc.status, exc.title, exc.public_description)
            outcomes.append({**refusal, 'filename': meta.clean_filename(offered_name(req, upload))})
    committed = iter(store.commit_all([(upload.staged, file_meta) for upload, file_meta in accepted]))
    stored = iter(accepted)
    answers = [outcome or _outcome(req, door, next(stored)[0], next(committed)) for outcome in outcomes]
    resp.media = answers
    if len(accepted) < len(files):
        resp.status = falcon.HTTP_207
    else:
        resp.status = falcon.HTTP_201 if any(answer['created'] for answer in answers) else falcon.HTTP_200


def _outcome(req: falcon.Request, door: Door, upload: Upload, committed: Committed) -> dict[str, Any]:
    """What the client is told of one stored file: its id, the stored meta's answer keys, ``created``.

    ``filename`` is the stored one (the first upload's), or for a blob stored
    without one, the name this upload offered; ``status`` is 201 or 200.
    """
    stored = committed.meta
    body: dict[str, Any] = {
        door.id_field: upload.staged.digest,
        'filename': stored.get('filename', meta.clean_filename(offered_name(req, upload))),
    }
    body.update({key: stored[key] for key in meta.ANSWER_KEYS if key in stored})
    body['created'] = committed.created
    body['status'] = 201 if committed.created else 200
    return body
