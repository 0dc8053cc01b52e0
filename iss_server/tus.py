"""Resumable uploads, tus 1.0, under ``/uploads``: the HTTP side of ``resumable.Sessions``.

``POST /uploads`` creates a session (its length and ``Upload-Metadata`` checked
as a POST's query would be), ``PATCH /uploads/{id}`` appends a chunk, and the
last chunk commits the upload through its door like any POST. ``TusProtocol``
is the middleware that asks for, and sends, ``Tus-Resumable``.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
from typing import Any

import falcon

from iss_server import doors, resumable
from iss_server.auth import bearer_token
from iss_server.blobs import parse_id
from iss_server.bodies import RequestBody
from iss_server.bucket_sessions import BucketSessions
from iss_server.config import Settings
from iss_server.doors import ArtifactDoor, Door, ImageDoor
from iss_server.errors import BadRequest, DigestMismatch, FileRefused, InvalidId, UnsupportedProtocol, UploadTooLarge
from iss_server.receiving import Upload
from storage import BlobStore, StagedBlob

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

    def __init__(
        self,
        store: BlobStore,
        sessions: resumable.Sessions | BucketSessions,
        images: ImageDoor,
        artifacts: ArtifactDoor,
        settings: Settings,
    ) -> None:
        self._store = store
        self.sessions = sessions
        self._images = images
        self._artifacts = artifacts
        self.max_size = settings.max_upload_bytes
        self._timeout = settings.body_timeout

    def owner(self, req: falcon.Request) -> str:
        """The requester, as a session records its owner (``RequireToken`` has checked the upload token, if set)."""
        return resumable.owner_of(bearer_token(req.get_header('Authorization')))

    def door_of(self, metadata: dict[str, str]) -> Door:
        """The door the finished upload goes through (kind ``image``: images), its fields checked now.

        Raises:
            BadRequest: no kind, a bad kind or meta, or a ``sha256`` that is no id.
        """
        if 'sha256' in metadata:
            try:
                parse_id(_as_id(metadata['sha256']))
            except InvalidId:
                raise BadRequest(
                    'sha256 in Upload-Metadata is the expected id: sha256:<64 lowercase hex>.',
                    title='Invalid Upload-Metadata',
                ) from None
        if metadata.get('kind') == 'image':
            return self._images
        self._artifacts.fields(metadata.get('kind'), metadata.get('meta'))
        return self._artifacts

    def receive(
        self, req: falcon.Request, session_id: str, owner: str, offset: int, *, has_body: bool = True
    ) -> resumable.Session:
        """Append the request's body at ``offset``; commit the upload when it is its last byte."""
        body = None
        if has_body and req.content_length != 0:
            body = functools.partial(RequestBody, req, timeout=self._timeout)
        checksum = resumable.parse_checksum(req.get_header('Upload-Checksum'))
        return self.sessions.receive(session_id, owner, offset, body, checksum, _Commit(self, req))

    def resume(self, req: falcon.Request, session_id: str) -> resumable.Session:
        """The session asked about, its commit finished first if a killed node left it undone (a bucket's)."""
        return self.sessions.resume(session_id, self.owner(req), _Commit(self, req))

    def result(self, session: resumable.Session, digest: str, *, created: bool) -> dict[str, Any]:
        """What a finished session records and answers with: its blob's id, location, and whether it was new."""
        location = doors.location(self.door_of(session.metadata).name, digest)
        return {'id': digest, 'location': location, 'created': created}

    def commit(self, req: falcon.Request, session: resumable.Session, staged: StagedBlob) -> dict[str, Any]:
        """The complete upload into the store, verified and identified as a POST's would be; the result to record."""
        door = self.door_of(session.metadata)
        metadata = session.metadata
        expected = metadata.get('sha256')
        if expected is not None and staged.digest != _as_id(expected):
            self.sessions.discard(session.id)
            raise DigestMismatch(staged.digest, _as_id(expected))
        fields = {name: metadata[name] for name in door.form_fields if name in metadata}
        upload = Upload(staged, metadata.get('filename') or metadata.get('name'), _filetype(metadata), fields)
        try:
            committed = self._store.commit(staged, door.meta_for(req, upload))
        except FileRefused:
            self.sessions.discard(session.id)
            raise
        return self.result(session, staged.digest, created=committed.created)

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


class _Commit:
    """The request's way to end a complete session (``resumable.Committer``)."""

    def __init__(self, uploads: ResumableUploads, req: falcon.Request) -> None:
        self._uploads = uploads
        self._req = req

    def commit(self, session: resumable.Session, staged: StagedBlob) -> dict[str, Any]:
        return self._uploads.commit(self._req, session, staged)

    def stored(self, session: resumable.Session, digest: str) -> dict[str, Any]:
        return self._uploads.result(session, digest, created=False)


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
        length = resumable.parse_length(req.get_header('Upload-Length'))
        if length > self._uploads.max_size:
            raise UploadTooLarge(self._uploads.max_size)
        metadata = resumable.parse_metadata(req.get_header('Upload-Metadata'))
        self._uploads.door_of(metadata)
        has_chunk = req.content_length != 0 and (req.content_length is not None or _chunk_type(req))
        if has_chunk:
            _check_chunk_type(req)
        owner = self._uploads.owner(req)
        session = self._uploads.sessions.create(length, metadata, owner)
        resp.status = falcon.HTTP_201
        resp.location = f'/uploads/{session.id}'
        if has_chunk or length == 0:
            try:
                session = self._uploads.receive(req, session.id, owner, 0, has_body=has_chunk)
            except Exception:
                # NOTE: the error is answered without the session's Location: one no client can find is not kept
                with contextlib.suppress(Exception):
                    self._uploads.sessions.discard(session.id)
                raise
        self._uploads.answer(resp, session)


class UploadSession:
    """``/uploads/{upload_id}``: HEAD says its offset, PATCH appends a chunk, DELETE terminates it."""

    def __init__(self, uploads: ResumableUploads) -> None:
        self._uploads = uploads

    def on_head(self, req: falcon.Request, resp: falcon.Response, upload_id: str) -> None:
        session = self._uploads.resume(req, upload_id)
        resp.set_header('Upload-Length', str(session.length))
        if session.metadata:
            resp.set_header('Upload-Metadata', resumable.format_metadata(session.metadata))
        resp.cache_control = ('no-store',)
        self._uploads.answer(resp, session)

    def on_patch(self, req: falcon.Request, resp: falcon.Response, upload_id: str) -> None:
        _check_chunk_type(req)
        owner = self._uploads.owner(req)
        session = self._uploads.receive(req, upload_id, owner, resumable.parse_offset(req.get_header('Upload-Offset')))
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


def _chunk_type(req: falcon.Request) -> bool:
    return doors.content_type(req).partition(';')[0].strip() == resumable.CHUNK_TYPE


def _check_chunk_type(req: falcon.Request) -> None:
    """A chunk is ``application/offset+octet-stream``: 415 for anything else."""
    if not _chunk_type(req):
        raise falcon.HTTPUnsupportedMediaType(
            title='Unsupported chunk', description=f'A chunk is sent as Content-Type: {resumable.CHUNK_TYPE}.'
        )


def _as_id(text: str) -> str:
    """An expected digest as an id: ``sha256:<hex>``, given with the prefix or without."""
    return text if text.startswith('sha256:') else 'sha256:' + text


def _filetype(metadata: dict[str, str]) -> str | None:
    """The client's media type of the file (tus-js-client and Uppy send ``filetype``, ``type``)."""
    return metadata.get('filetype') or metadata.get('type') or None
