"""How a stored blob is served: the Content-Type it is sent with and the name it is saved as.

Both come from the blob's meta (an old image's type from its bytes), learned once
per stored copy and remembered, for ``Item``'s GET, HEAD and bucket redirect.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from iss_server import images, meta
from iss_server.blobs import BlobStat
from storage import BlobStore


class Presentation(NamedTuple):
    """How a blob is served: the Content-Type, and the name it is saved as."""

    content_type: str
    filename: str


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
