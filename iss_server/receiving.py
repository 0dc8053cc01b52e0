"""Uploads received: the files of a multipart form, or a raw body, staged in the store.

:class:`UploadReceiver` reads the body (:class:`bodies.RequestBody`), stages each
file as it arrives (``store.stage``) and discards what the resource did not commit;
it also reads the small JSON documents some requests carry.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any

import falcon

from iss_server import forms, meta
from iss_server.bodies import RequestBody
from iss_server.config import Settings
from iss_server.errors import BadRequest, TooManyFiles
from storage import BlobStore, StagedBlob


@dataclasses.dataclass
class Upload:
    """A received upload: the staged bytes and what came with them."""

    staged: StagedBlob
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

    def read_json(self, req: falcon.Request, limit: int) -> Any:
        """The small JSON document a request carries (at most ``limit`` bytes); None if it is none.

        The resource says what it expected: None, like a document of the wrong shape, is its 400.
        """
        try:
            return meta.parse_json(RequestBody(req, limit, self._timeout).read() or b'null')
        except ValueError:
            return None

    def _receive_form(
        self, req: falcon.Request, body: RequestBody, form_fields: tuple[str, ...], max_files: int
    ) -> list[Upload]:
        form = forms.FormReader(
            body, req.content_type or '', max_parts=max_files + self._MAX_OTHER_PARTS, length=body.declared_length
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
    """Whether the body is a form (its files are uploads), not the one file itself."""
    return (req.content_type or '').lower().startswith('multipart/form-data')
