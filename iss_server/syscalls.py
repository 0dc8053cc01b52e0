"""The few Linux C library calls ISS uses that Python's os module lacks.

Each is None-safe: where this libc has no such function (musl has no
``mallopt``; macOS no ``sync_file_range``) the call does nothing, and ISS
keeps its guarantees, only without that optimisation (``syncfs`` falls
back to ``sync``, which is as safe and slower).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from collections.abc import Callable


def libc_function(name: str, *argtypes: type) -> Callable[..., int] | None:
    """A C library function, or None where this libc has none."""
    library = ctypes.util.find_library('c')
    function = getattr(ctypes.CDLL(library, use_errno=True), name, None) if library else None
    if function is not None:
        function.argtypes = argtypes
    return function


_sync_file_range = libc_function('sync_file_range', ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
_SYNC_FILE_RANGE_WRITE = 2  # from <fcntl.h>: start writeback, do not wait for it

_syncfs = libc_function('syncfs', ctypes.c_int)

_linkat = libc_function('linkat', ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_int)
_AT_FDCWD = -100  # from <fcntl.h>
_AT_SYMLINK_FOLLOW = 0x400

_mallopt = libc_function('mallopt', ctypes.c_int, ctypes.c_int)
_M_MMAP_THRESHOLD = -3  # from <malloc.h>


def sync_file_range_write(fd: int, offset: int, length: int) -> None:
    """Start writing these bytes of ``fd`` to disk, without waiting (sync_file_range(2))."""
    if _sync_file_range is not None:
        _sync_file_range(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


def syncfs(fd: int) -> None:
    """Write every dirty page, inode and directory of the file system ``fd`` is on, and flush it (syncfs(2)).

    Since Linux 5.8 it reports a writeback error seen since ``fd`` was opened (or last
    synced through it). Where libc has no syncfs, :func:`os.sync` does the same for every
    file system (slower, and it reports no errors).
    """
    if _syncfs is None:
        os.sync()
    elif _syncfs(fd) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def can_link_open_files() -> bool:
    """Whether :func:`link_open_file` works here (a libc with linkat, and /proc mounted)."""
    return _linkat is not None and os.path.isdir('/proc/self/fd')


def link_open_file(fd: int, path: str) -> None:
    """Give the open file ``fd`` the name ``path`` (which must not exist): how an ``O_TMPFILE`` gets one.

    linkat(2) of ``/proc/self/fd/<fd>`` following the link, as open(2) shows for O_TMPFILE:
    unlike ``AT_EMPTY_PATH`` it needs no capability. Python's ``os.link`` calls link(2), which
    links the /proc link itself (EXDEV). Raises OSError like ``os.link`` (FileExistsError...).
    """
    assert _linkat is not None  # NOTE: callers ask can_link_open_files() first
    source = f'/proc/self/fd/{fd}'.encode()
    if _linkat(_AT_FDCWD, source, _AT_FDCWD, os.fsencode(path), _AT_SYMLINK_FOLLOW) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), path)


def set_mmap_threshold(size: int) -> None:
    """Serve allocations of ``size`` bytes and more from mmap, always (mallopt(3))."""
    if _mallopt is not None:
        _mallopt(_M_MMAP_THRESHOLD, size)
