"""Test data and what a store holds: images, content ids, blob paths, the files under a directory."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import pathlib

from PIL import Image

import storage
from iss_server import index

#: A well-formed id that no test stores.
MISSING = 'sha256:' + '0' * 64


def make_png(width: int = 100, height: int = 80, color: str = 'red') -> bytes:
    """Return a PNG of one colour."""
    buffer = io.BytesIO()
    Image.new('RGB', (width, height), color).save(buffer, 'PNG')
    return buffer.getvalue()


def blob_id(data: bytes) -> str:
    """Return the content id ISS gives ``data``."""
    return 'sha256:' + hashlib.sha256(data).hexdigest()


def blob_path(data_dir: pathlib.Path, digest: str, top: str = 'blobs', suffix: str = '') -> pathlib.Path:
    """Return where the file store keeps ``digest`` below ``top`` (the seed's two-level fan-out)."""
    hex_digest = digest[7:]
    return data_dir / top / hex_digest[:2] / hex_digest[2:4] / (hex_digest + suffix)


def file_store(root) -> storage.FileStore:
    """Open a file store on ``root`` with its SQLite index beside it, as ``ISS_STORE=file`` opens it."""
    return storage.FileStore(str(root), index.open_index('sqlite', str(root)))


def files_under(path: pathlib.Path) -> list[pathlib.Path]:
    """Return the files below ``path``, sorted."""
    return sorted(p for p in path.rglob('*') if p.is_file())


def temp_files_open(tmp: pathlib.Path, pids: list[int] | None = None) -> list[str]:
    """The files under ``tmp`` these processes (this one by default) hold open: uploads being staged.

    Unlike a listing of ``tmp/`` it also sees the unnamed temp files (``O_TMPFILE``) a
    store stages in, which are in no directory.
    """
    top = os.path.realpath(tmp) + os.sep
    held = []
    for pid in pids or [os.getpid()]:
        with contextlib.suppress(OSError):  # NOTE: a process that ended meanwhile
            for fd in os.listdir(f'/proc/{pid}/fd'):
                with contextlib.suppress(OSError):  # NOTE: a descriptor closed meanwhile
                    target = os.readlink(f'/proc/{pid}/fd/{fd}')
                    if target.startswith(top):
                        held.append(target)
    return held


def files_in(directory: pathlib.Path) -> list[pathlib.Path]:
    """Return the files below ``directory``; none if it does not exist."""
    return [p for p in directory.rglob('*') if p.is_file()] if directory.exists() else []
