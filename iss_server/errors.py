"""What goes wrong in ISS, as typed errors that carry their HTTP meaning.

Every module below the resources (the store, the index, the meta schema, the
request body) raises one of these; ``iss.py`` turns each into its JSON answer
in one place, by its ``status``, ``title`` and ``description``. Nothing here
knows Falcon, so the store stays usable from the command line and tests.

A server-side failure (``status`` 500 and up) keeps the details it was raised
with for the log (``str(error)``) and tells the client only its
``description``: paths and errno texts of the data directory are no client's
business.
"""

from __future__ import annotations

from typing import Any


def error_body(status: int, title: str, description: str) -> dict[str, Any]:
    """The JSON body of every error ISS answers: ``title``, ``description``, ``status`` and ``detail``.

    ``detail`` repeats the description for clients of the FastAPI version. The app's
    error serializer, a batch's refused files and gunicorn's own refusals all use it.
    """
    return {'title': title, 'description': description, 'status': status, 'detail': description}


class ServiceError(Exception):
    """Base of every error ISS answers on purpose.

    Args:
        subject: what happened, or the one value the class's ``detail_format``
            is about (an id, a limit). The client sees the detail as the
            description, unless the class has a fixed ``description``
            (server-side failures).
        title: overrides the class's title, for a family of input errors.
    """

    status = 500
    title = 'Internal error'
    #: The client's text when it must not be the detail (a server-side failure).
    description: str | None = None
    #: Seconds after which trying again may succeed (sent as Retry-After).
    retry_after: int | None = None
    #: How the detail reads, made from the subject it is raised with.
    detail_format = '{}'

    def __init__(self, subject: object, *, title: str | None = None) -> None:
        super().__init__(self.detail_format.format(subject))
        if title is not None:
            self.title = title

    @property
    def public_description(self) -> str:
        return self.description or str(self)


# -- the client's mistakes --------------------------------------------------------


class BadRequest(ServiceError):
    """Input that cannot be used as it is; the title names what (``Invalid kind``, ``Digest mismatch``)."""

    status = 400
    title = 'Bad request'


class InvalidId(ServiceError, ValueError):
    """The id is not of the form ``sha256:<64 lowercase hex>``, so it names no blob.

    NOTE: 404 on every route that takes an id in its path, GET or PUT alike: the
    URL names nothing that could ever exist. In a request body it is 400 (see
    :class:`InvalidIdInBody`).
    """

    status = 404
    title = 'Malformed id'


class DigestMismatch(BadRequest):
    """Bytes sent under a claimed id (a PUT, a tus ``sha256``) that hash to another; nothing is stored."""

    title = 'Digest mismatch'

    def __init__(self, digest: str, claimed: str) -> None:
        super().__init__(f'The bytes hash to {digest}, not {claimed}; nothing was stored.')


class InvalidIdInBody(BadRequest):
    """A malformed id inside a request body (``POST /blobs/missing``)."""

    title = 'Malformed id'


class BlobNotFound(ServiceError):
    """No blob is stored under that id."""

    status = 404
    title = 'Blob not found'
    detail_format = 'Nothing is stored under {}.'


class InvalidCursor(BadRequest, ValueError):
    """A listing cursor that this index did not hand out."""

    title = 'Invalid cursor'


class CursorExpired(ServiceError):
    """A change feed cursor older than the retention (or of an index since rebuilt): the follower must resync."""

    status = 410
    title = 'Cursor expired'
    detail_format = (
        'The changes after {} are no longer kept (older than ISS_EVENTS_RETAIN, or the index was rebuilt since): '
        'take the cursor of /events?after=now, list the store anew, then follow from that cursor.'
    )


class LengthRequired(ServiceError):
    status = 411
    title = 'Length required'


class TransferCodingNotImplemented(ServiceError):
    """A body sent in a transfer coding ISS does not undo (gzip, deflate...): its bytes are not the client's."""

    status = 501
    title = 'Transfer coding not implemented'
    detail_format = 'Transfer-Encoding {!r}: only chunked is accepted (send the body as it is to be stored).'


class UploadTooLarge(ServiceError):
    status = 413
    title = 'Upload too large'
    detail_format = 'The request body is larger than this service accepts ({} bytes).'


class TooManyFiles(ServiceError):
    """A batch upload with more files than one request may carry."""

    status = 413
    title = 'Too many files'
    detail_format = 'One request may carry at most {} files; send the rest in another.'


class FileRefused(ServiceError):
    """This file's bytes cannot be stored where they were sent; in a batch, the other files still are."""

    status = 422
    title = 'File refused'


class NotAnImage(FileRefused):
    status = 415
    title = 'Not an image'
    detail_format = (
        'The bytes{} are not an image format this service can identify; store other files with POST /artifacts?kind=...'
    )


class UndecodableImage(FileRefused):
    """An image whose header is sound but whose pixels do not decode (ISS_VERIFY_IMAGES=decode)."""

    status = 422
    title = 'Image does not decode'
    detail_format = 'The image is identified from its header, but its pixels do not decode: {}'


class OversizedImage(FileRefused):
    """An image with more pixels than the service decodes (a decompression bomb, or just too big)."""

    status = 413
    title = 'Image too large'


class IncompleteBody(BadRequest):
    """The client went away, or paused too long, before sending the body it declared."""

    title = 'Incomplete request body'


class BodyTooSlow(IncompleteBody):
    """The body arrived slower than ``ISS_BODY_MIN_RATE`` on average, past its first ``ISS_BODY_TIMEOUT`` seconds."""

    status = 408
    title = 'Request body too slow'


class UploadNotFound(ServiceError):
    """No resumable upload of that id is open to this client (none, expired, terminated, or another's)."""

    status = 404
    title = 'Upload not found'
    detail_format = 'No upload {!r}: it never existed, expired, was terminated, or is not yours.'


class OffsetMismatch(ServiceError):
    """A chunk of a resumable upload sent at another offset than the upload's, or while another is arriving."""

    status = 409
    title = 'Offset mismatch'


class TooManyUploads(ServiceError):
    """The store holds as many unfinished resumable uploads as it may (``ISS_TUS_MAX_SESSIONS``)."""

    status = 503
    title = 'Too many open uploads'
    detail_format = (
        'The store holds {} unfinished resumable uploads, its most (ISS_TUS_MAX_SESSIONS): '
        'finish or terminate one, or try again once some have expired.'
    )
    retry_after = 60


class ChecksumMismatch(ServiceError):
    """A chunk whose ``Upload-Checksum`` differs from its bytes (tus's own status, 460)."""

    status = 460
    title = 'Checksum mismatch'


class UnsupportedProtocol(ServiceError):
    """A resumable-upload request of a tus version this server does not speak."""

    status = 412
    title = 'Unsupported tus version'
    detail_format = 'This server speaks tus {}: send "Tus-Resumable: 1.0.0".'


# -- the service's own trouble ------------------------------------------------------


class StoreFailure(ServiceError):
    """The store cannot do this right now: the service's trouble, not the request's."""

    #: Which part of the store is failing, as ``/health`` names it.
    part = 'data directory'


class StoreFull(StoreFailure):
    """The store has no room left for this write."""

    status = 507
    title = 'Storage full'
    description = 'The store has no room for this upload; nothing was stored.'


class StoreUnavailable(StoreFailure):
    """The store cannot be read or written (gone, read-only, I/O error)."""

    status = 503
    title = 'Storage unavailable'
    description = 'The data directory cannot be used right now.'
    retry_after = 5


class BucketUnavailable(StoreUnavailable):
    """The S3 service is unreachable, too slow, refuses ISS's key or answers errors."""

    # NOTE: not "nothing was stored": a write the service took after ISS gave up on it lands all
    # the same (a frozen service that thaws). Sending it again is safe; it then answers created false.
    description = (
        'The object store cannot be used right now; an upload was not acknowledged (sending it again is safe).'
    )
    part = 'bucket'


class CorruptBlob(StoreFailure):
    """A blob's bytes, as the backend handed them over, do not hash to its name; it was set aside."""

    status = 502
    title = 'Corrupt blob'
    description = 'The stored bytes do not match their id; the blob was set aside (see python -m iss fsck).'


class IndexUnavailable(StoreUnavailable):
    """The index cannot be read or written (see the wrapped error)."""

    description = 'The index cannot be used right now.'
    part = 'index'


class IndexFull(StoreFull):
    """The disk holding the index is full."""

    part = 'index'


class RendersBusy(ServiceError):
    """This worker renders as many images, or as many pixels, as it may at once (ISS_RENDERS, ISS_RENDER_PIXELS)."""

    status = 503
    title = 'Busy rendering'
    description = 'Too many images are being rendered right now; try again shortly.'
    retry_after = 1


class FeedBusy(ServiceError):
    """This worker already holds as many change feed streams and long-polls as it lets wait (see events.py)."""

    status = 503
    title = 'Change feed busy'
    description = 'Too many clients are waiting for changes right now; try again shortly.'
    retry_after = 5


class IndexIncomplete(StoreUnavailable):
    """The index is still being built from the files, so it cannot answer listings yet."""

    title = 'Index not ready'
    description = 'The index is being built from the files (python -m iss reindex); try again shortly.'
    retry_after = 10
