"""Files on the server's machine for ``python -m iss import``: the walk, the manifest line, the media types.

The client (``iss_client/files.py``) has its own copy of the same three (the server never
imports the client, nor the client the server); a test keeps the two the same.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any


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
    """One line of a manifest: which file became which id (``import``, and the client's ``push``; read by ``pull``)."""
    return {'path': path, 'id': blob_id, 'bytes': size, 'status': 'new' if new else 'stored'}


# NOTE: the same table as the client's (iss_client/files.py), so that a file gets one type
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
