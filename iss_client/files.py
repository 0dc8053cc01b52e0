"""This machine's side of a push: the files of a tree, their ids and types, and what the client remembers of them.

``iss_server/files.py`` holds the server's copy of the walk, the manifest line and the
media types (the server never imports the client); a test keeps the two the same.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterable
from typing import IO, Any

CHUNK = 1024 * 1024


def files_below(paths: Iterable[str]) -> tuple[list[tuple[str, str]], list[dict[str, str]]]:
    """The files given and those below the directories given: (path, path relative to its root) each.

    APPSEC: a symlink is followed only while it stays inside the directory it was
    found in; one that leads out is skipped and reported, never read.

    Returns:
        The files, and the skipped ones with their reason.
    """
    files: list[tuple[str, str]] = []
    skipped: list[dict[str, str]] = []
    for given in paths:
        if not os.path.isdir(given):
            files.append((given, os.path.basename(given)))
            continue
        top = os.path.realpath(given)
        for folder, directories, names in os.walk(given):
            # NOTE: os.walk never descends into a symlinked directory; one that leads out is named.
            directories.sort()
            for name in [*directories, *sorted(names)]:
                path = os.path.join(folder, name)
                if os.path.islink(path) and not inside(os.path.realpath(path), top):
                    skipped.append({'path': path, 'reason': f'a symlink that leads out of {given}'})
                elif name not in directories:
                    files.append((path, os.path.relpath(path, given)))
    return files, skipped


def inside(path: str, top: str) -> bool:
    """Whether ``path`` is ``top`` or below it."""
    return path == top or path.startswith(top.rstrip(os.sep) + os.sep)


def manifest_entry(path: str, blob_id: str, size: int, new: bool) -> dict[str, Any]:
    """One line of a manifest: which file became which id (``push``, and the server's ``import``; read by ``pull``)."""
    return {'path': path, 'id': blob_id, 'bytes': size, 'status': 'new' if new else 'stored'}


# NOTE: the same table as the server's (iss_server/files.py), so that a file gets one type
# by whichever door it comes in; mimetypes would answer by this machine's /etc/mime.types.
MEDIA_TYPES = {
    '.avif': 'image/avif',
    '.bmp': 'image/bmp',
    '.css': 'text/css',
    '.csv': 'text/csv',
    '.gif': 'image/gif',
    '.gz': 'application/gzip',
    '.htm': 'text/html',
    '.html': 'text/html',
    '.ico': 'image/vnd.microsoft.icon',
    '.jpeg': 'image/jpeg',
    '.jpg': 'image/jpeg',
    '.js': 'text/javascript',
    '.json': 'application/json',
    '.jsonl': 'application/jsonl',
    '.log': 'text/plain',
    '.md': 'text/markdown',
    '.mp3': 'audio/mpeg',
    '.mp4': 'video/mp4',
    '.ogg': 'audio/ogg',
    '.parquet': 'application/vnd.apache.parquet',
    '.pdf': 'application/pdf',
    '.png': 'image/png',
    '.svg': 'image/svg+xml',
    '.tar': 'application/x-tar',
    '.tif': 'image/tiff',
    '.tiff': 'image/tiff',
    '.tsv': 'text/tab-separated-values',
    '.txt': 'text/plain',
    '.wav': 'audio/wav',
    '.webm': 'video/webm',
    '.webp': 'image/webp',
    '.xml': 'application/xml',
    '.yaml': 'application/yaml',
    '.yml': 'application/yaml',
    '.zip': 'application/zip',
}
OCTET_STREAM = 'application/octet-stream'


def media_type(name: str | None) -> str:
    """The media type of a file, by its name's extension (case aside); octet-stream when unknown."""
    return MEDIA_TYPES.get(os.path.splitext(name or '')[1].lower(), OCTET_STREAM)


def hash_stream(file: IO[bytes]) -> str:
    """The id of a stream's bytes from where it stands, left at its start again (seek(0))."""
    sha256 = hashlib.sha256()
    while chunk := file.read(CHUNK):
        sha256.update(chunk)
    file.seek(0)
    return 'sha256:' + sha256.hexdigest()


def hash_file(path: str) -> tuple[str, int]:
    """The id and size of a file's bytes."""
    with open(path, 'rb') as file:
        size = os.fstat(file.fileno()).st_size
        return hash_stream(file), size


class CacheRecord:
    """A small JSON document the client keeps between runs, under ``$XDG_CACHE_HOME/iss-client/<area>/``.

    Named by the sha256 of ``key``; losing it costs time, never correctness, so every
    failure to read or write one is ignored. Default cache: ``~/.cache``.
    """

    def __init__(self, area: str, key: str) -> None:
        cache = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
        self.path = os.path.join(cache, 'iss-client', area, hashlib.sha256(key.encode()).hexdigest() + '.json')

    def load(self) -> dict[str, Any] | None:
        try:
            with open(self.path) as file:
                document = json.load(file)
        except (OSError, ValueError):
            return None
        return document if isinstance(document, dict) else None

    def save(self, document: dict[str, Any]) -> None:
        with contextlib.suppress(OSError):
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            with open(self.path, 'w') as file:
                json.dump(document, file)

    def clear(self) -> None:
        with contextlib.suppress(OSError):
            os.unlink(self.path)


def known_id(path: str, info: os.stat_result) -> str | None:
    """The id this client computed for the file, if the file has not changed since (else None).

    NOTE: keyed as git's index is, by device, inode, size, mtime and ctime in nanoseconds:
    a file written again changes its ctime, whatever its mtime is made to say.
    """
    document = _id_record(path, info).load()
    found = document.get('id') if document else None
    return found if isinstance(found, str) else None


def remember_id(path: str, info: os.stat_result, blob_id: str) -> None:
    """Keep the id of an unchanged file, so that the next push asks about it before sending a byte."""
    _id_record(path, info).save({'id': blob_id})


def _id_record(path: str, info: os.stat_result) -> CacheRecord:
    fields = (os.path.abspath(path), info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)
    return CacheRecord('ids', '\0'.join(map(str, fields)))
