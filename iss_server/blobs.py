"""What every store hands out about a blob: its id, its stat, an open blob, a commit's outcome.

The values of the store interface (:class:`storage.BlobStore`), apart from
any one backend, so that the file store, the derivative cache and the HTTP
layer share them without importing each other.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import IO, Any

from iss_server.errors import InvalidId

_ID_PATTERN = re.compile(r'sha256:([0-9a-f]{64})')


def parse_id(blob_id: str) -> str:
    """Return the hex digest of a ``sha256:<64 lowercase hex>`` id.

    Raises:
        InvalidId: ``blob_id`` is not of that form. APPSEC: the hex is the only
            part of client input that ever becomes part of a path or key.
    """
    match = _ID_PATTERN.fullmatch(blob_id)
    if match is None:
        raise InvalidId(f'{blob_id[:80]!r} is not of the form sha256:<64 lowercase hex digits>, so it names no blob.')
    return match.group(1)


@dataclasses.dataclass(frozen=True)
class BlobStat:
    """A stored blob's size, and ``version``: which stored copy it is.

    NOTE: blobs never change, but a deleted one can be stored again (with
    other meta); the version tells the copies apart (on disk: the inode and
    its change time).
    """

    size: int
    version: str

    @classmethod
    def of(cls, stat: os.stat_result) -> BlobStat:
        return cls(stat.st_size, f'{stat.st_ino}-{stat.st_ctime_ns}')


@dataclasses.dataclass(frozen=True)
class OpenBlob:
    """A stored blob (or derivative) opened for reading; the caller closes ``file``."""

    file: IO[bytes]
    stat: BlobStat


@dataclasses.dataclass(frozen=True)
class Committed:
    """What a commit did: ``created`` is False when the blob was already stored."""

    created: bool
    meta: dict[str, Any]
