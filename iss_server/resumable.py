"""Resumable uploads (tus 1.0): sessions that grow chunk by chunk and end as one staged blob.

A session is two files under ``tmp/uploads/``: ``<id>.part``, the bytes received so
far, and ``<id>.json``, its state (length, metadata, owner, the durable offset, the
SHA-256 state at that offset, expiry, and once committed the blob's id). A PATCH
holds the ``.part`` file's flock, so two at once cannot both write (the second is
refused, 409), and appends at the offset; the state is replaced atomically after the
bytes are flushed, so the offset never claims a byte that is not on disk. The SHA-256
is carried from chunk to chunk in the state (OpenSSL's context, 112 bytes): the last
chunk ends the hash, and completing a 2 GB upload reads nothing again, whichever
worker takes which chunk.

``sweep_temp`` leaves ``tmp/uploads/`` alone; :meth:`Sessions.sweep_expired` removes
sessions whose last activity is older than ``ISS_UPLOAD_EXPIRES``.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import ctypes
import ctypes.util
import dataclasses
import fcntl
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import storage
from iss_server import disk
from iss_server.errors import (
    BadRequest,
    ChecksumMismatch,
    IncompleteBody,
    OffsetMismatch,
    StoreUnavailable,
    TooManyUploads,
    UploadNotFound,
    UploadTooLarge,
)

log = logging.getLogger('iss.tus')

VERSION = '1.0.0'
EXTENSIONS = ('creation', 'creation-with-upload', 'expiration', 'checksum', 'termination')
#: Per-chunk checksums (``Upload-Checksum``): sha1 is the one every tus server must take.
CHECKSUMS = {'sha1': hashlib.sha1, 'sha256': hashlib.sha256, 'md5': hashlib.md5}
CHUNK_TYPE = 'application/offset+octet-stream'

_ID_PATTERN = re.compile(r'[A-Za-z0-9_-]{22}')
_METADATA_KEY = re.compile(r'[!#$%&\'*+.^_`|~0-9A-Za-z-]+')


# -- a SHA-256 whose state can be saved between requests ------------------------


class _Sha256Context(ctypes.Structure):
    """OpenSSL's ``SHA256_CTX`` (``<openssl/sha.h>``): plain words, so its bytes are the hash's state."""

    _fields_ = [
        ('h', ctypes.c_uint32 * 8),
        ('Nl', ctypes.c_uint32),
        ('Nh', ctypes.c_uint32),
        ('data', ctypes.c_uint32 * 16),
        ('num', ctypes.c_uint),
        ('md_len', ctypes.c_uint),
    ]


def _libcrypto() -> ctypes.CDLL | None:
    """The libcrypto that hashlib uses (found through the process's own maps), or None."""
    hashlib.sha256()  # NOTE: makes sure _hashlib, and so libcrypto, is loaded
    with contextlib.suppress(OSError), open('/proc/self/maps') as maps:
        for line in maps:
            path = line.rsplit(' ', 1)[-1].strip()
            if '/libcrypto.so' in path:
                return ctypes.CDLL(path)
    name = ctypes.util.find_library('crypto')
    return ctypes.CDLL(name) if name else None


_crypto = _libcrypto()
if _crypto is not None:
    for _name, _args in (
        ('SHA256_Init', [ctypes.POINTER(_Sha256Context)]),
        ('SHA256_Update', [ctypes.POINTER(_Sha256Context), ctypes.c_void_p, ctypes.c_size_t]),
        ('SHA256_Final', [ctypes.c_char_p, ctypes.POINTER(_Sha256Context)]),
    ):
        getattr(_crypto, _name).argtypes = _args


class Sha256:
    """SHA-256 of a file that grows across requests and processes.

    ``state`` is what to save; :meth:`restore` continues from it. Where no libcrypto
    can be loaded, ``state`` is None and a session's hash is recomputed from its file
    when a chunk arrives at another process (correct, and a read of what came before).
    """

    def __init__(self, state: bytes | None = None) -> None:
        if _crypto is None:
            self._fallback: Any = hashlib.sha256()
            return
        self._fallback = None
        if state is None:
            self._context = _Sha256Context()
            _crypto.SHA256_Init(ctypes.byref(self._context))
        else:
            self._context = _Sha256Context.from_buffer_copy(state)

    @property
    def state(self) -> bytes | None:
        return None if self._fallback is not None else bytes(self._context)

    def state_hex(self) -> str | None:
        """:attr:`state` as text, for a session's JSON."""
        state = self.state
        return None if state is None else state.hex()

    @classmethod
    def from_hex(cls, state: str | None) -> Sha256 | None:
        """The hash a session's JSON saved; None when it saved none, or this process cannot take it up."""
        return None if state is None or _crypto is None else cls(bytes.fromhex(state))

    def update(self, data: memoryview) -> None:
        if self._fallback is not None:
            self._fallback.update(data)
            return
        # PERF: the chunk's own buffer, not a copy (the reused receive buffer is writable)
        address = ctypes.addressof(ctypes.c_char.from_buffer(data)) if len(data) else None
        assert _crypto is not None  # NOTE: no fallback: libcrypto was loaded
        _crypto.SHA256_Update(ctypes.byref(self._context), address, len(data))

    def hexdigest(self) -> str:
        if self._fallback is not None:
            return self._fallback.hexdigest()
        digest = ctypes.create_string_buffer(32)
        assert _crypto is not None  # NOTE: no fallback: libcrypto was loaded
        _crypto.SHA256_Final(digest, ctypes.byref(_Sha256Context.from_buffer_copy(bytes(self._context))))
        return digest.raw.hex()


# -- the protocol's headers --------------------------------------------------------
#
# APPSEC: one parser per header family, each refusing (400) anything outside its grammar
# before a byte of it is used: ASCII only, bounded lengths. str.isdigit() takes '²' and
# int() then refuses it (a 500); base64 of non-ASCII text raises ValueError, not
# binascii.Error (a 500 too). What an error echoes of a header is cut short.

# NOTE: 18 digits stay below 2**63, what the offsets of a file and of S3 can hold.
_BYTE_COUNT = re.compile(r'[0-9]{1,18}')
# NOTE: under gunicorn the whole head is at most 64 KiB (iss_server/worker.py's MAX_HEAD_BYTES, else 431), which
# bounds Upload-Metadata a little below this; these bounds hold without it too.
_MAX_METADATA_CHARS = 64 * 1024
_MAX_METADATA_PAIRS = 64
_MAX_METADATA_KEY_CHARS = 128
_MAX_CHECKSUM_CHARS = 256
# How much of a refused value an error repeats.
_ECHOED_CHARS = 64


def parse_length(header: str | None) -> int:
    """``Upload-Length``: the whole upload's size, a whole number of bytes (ASCII digits).

    Raises:
        BadRequest: missing, or anything but 1 to 18 ASCII digits.
    """
    return _byte_count('Upload-Length', header)


def parse_offset(header: str | None) -> int:
    """``Upload-Offset``: where a chunk starts, a whole number of bytes (ASCII digits).

    Raises:
        BadRequest: missing, or anything but 1 to 18 ASCII digits.
    """
    return _byte_count('Upload-Offset', header)


def _byte_count(name: str, header: str | None) -> int:
    if header is None or not _BYTE_COUNT.fullmatch(header):
        raise BadRequest(f'{name} is required: a whole number of bytes, in ASCII digits.', title=f'Invalid {name}')
    return int(header)


def parse_metadata(header: str | None) -> dict[str, str]:
    """``Upload-Metadata``: ``key base64value`` pairs, comma-separated; a key alone has an empty value.

    Raises:
        BadRequest: a header that is not ASCII or too long, a pair that is not of that form,
            a key given twice, or a value that is not base64 of UTF-8 text.
    """
    if not header:
        return {}
    if len(header) > _MAX_METADATA_CHARS or not header.isascii():
        raise _invalid_metadata(
            f'Upload-Metadata is ASCII text of at most {_MAX_METADATA_CHARS} characters, '
            'within the 64 KiB all request headers may take.'
        )
    metadata: dict[str, str] = {}
    for pair in filter(None, (part.strip() for part in header.split(','))):
        key, _, encoded = pair.partition(' ')
        if len(key) > _MAX_METADATA_KEY_CHARS or not _METADATA_KEY.fullmatch(key) or key in metadata:
            raise _invalid_metadata(f'Upload-Metadata has a bad or repeated key: {_echo(key)}.')
        if len(metadata) == _MAX_METADATA_PAIRS:
            raise _invalid_metadata(f'Upload-Metadata has more than {_MAX_METADATA_PAIRS} keys.')
        try:
            metadata[key] = base64.b64decode(encoded.strip(), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            raise _invalid_metadata(
                f'The value of {_echo(key)} in Upload-Metadata is not base64 of UTF-8 text.'
            ) from None
    return metadata


def format_metadata(metadata: dict[str, str]) -> str:
    """``Upload-Metadata`` as a client sent it (HEAD answers with it)."""
    return ','.join(f'{key} {base64.b64encode(value.encode()).decode()}' for key, value in metadata.items())


def parse_checksum(header: str | None) -> tuple[str, bytes] | None:
    """``Upload-Checksum: <algorithm> <base64 digest>`` as (algorithm, digest), or None.

    Raises:
        BadRequest: a header that is not ASCII or too long, an algorithm not in
            :data:`CHECKSUMS`, or a digest that is not base64 of its size.
    """
    if header is None:
        return None
    if len(header) > _MAX_CHECKSUM_CHARS or not header.isascii():
        raise BadRequest(
            f'Upload-Checksum is "<algorithm> <base64 digest>" in ASCII, at most {_MAX_CHECKSUM_CHARS} characters.',
            title='Invalid checksum',
        )
    algorithm, _, encoded = header.strip().partition(' ')
    if algorithm not in CHECKSUMS:
        raise BadRequest(
            f'Upload-Checksum algorithm {_echo(algorithm)} is not one of {", ".join(CHECKSUMS)}.',
            title='Unsupported checksum algorithm',
        )
    try:
        digest = base64.b64decode(encoded.strip(), validate=True)
    except binascii.Error:
        digest = b''
    if len(digest) != CHECKSUMS[algorithm]().digest_size:
        raise BadRequest(
            f'Upload-Checksum: {_echo(encoded)} is not a base64 {algorithm} digest.', title='Invalid checksum'
        )
    return algorithm, digest


def _invalid_metadata(description: str) -> BadRequest:
    return BadRequest(description, title='Invalid Upload-Metadata')


def _echo(text: str) -> str:
    """A client's value as an error repeats it: quoted, and cut short."""
    return repr(text if len(text) <= _ECHOED_CHARS else text[:_ECHOED_CHARS] + '...')


def is_session_id(text: str) -> bool:
    """Whether ``text`` is of the form of a session's id (any other is 404 without a lookup)."""
    return _ID_PATTERN.fullmatch(text) is not None


def owner_of(token: bytes) -> str:
    """What a session keeps of the token that created it: its SHA-256, never the token."""
    return hashlib.sha256(b'iss-upload-owner\0' + token).hexdigest()


# -- sessions ----------------------------------------------------------------------


@dataclasses.dataclass
class Session:
    """One resumable upload's state, as its ``.json`` file keeps it."""

    id: str
    length: int
    metadata: dict[str, str]
    owner: str
    expires: float
    offset: int = 0
    #: The SHA-256 state at ``offset`` (hex), or None to recompute it from the file.
    sha256_state: str | None = None
    #: Once committed: ``{'id', 'location', 'created'}``; the session then has no ``.part``.
    result: dict[str, Any] | None = None

    @property
    def complete(self) -> bool:
        return self.offset == self.length


class Committer(Protocol):
    """What ends a complete session in the store (the door's checks, ``store.commit``): the result to record."""

    def commit(self, session: Session, staged: storage.StagedBlob) -> dict[str, Any]:
        """Commit the session's staged bytes."""

    def stored(self, session: Session, digest: str) -> dict[str, Any]:
        """The result of a session whose blob a commit stored before a kill kept it from being recorded."""


class Sessions:
    """The resumable uploads of a file store, under its ``tmp/uploads/``.

    Args:
        store: The store the finished uploads are committed to (its layout holds the sessions).
        expires_seconds: How long a session lives after its last chunk (and a finished one
            still answers with its blob's id).
    """

    # PERF: what hashing a session's bytes from its file reads at a time.
    _CHUNK_SIZE = 1024 * 1024
    # NOTE: how often (at most) creating a session also sweeps the expired ones.
    _SWEEP_EVERY_SECONDS = 60.0

    def __init__(self, store: storage.BlobStore, expires_seconds: int, max_sessions: int = 0) -> None:
        self._store = store
        self._layout = store.layout
        self.directory = os.path.join(store.layout.tmp, 'uploads')
        self.expires_seconds = expires_seconds
        self.max_sessions = max_sessions
        self._last_sweep = 0.0
        self._sweep_lock = threading.Lock()

    def _path(self, session_id: str, suffix: str) -> str:
        return os.path.join(self.directory, session_id + suffix)

    def create(self, length: int, metadata: dict[str, str], owner: str) -> Session:
        """A new, empty session: its ``.part`` file and its state, durable before it is answered.

        Raises:
            TooManyUploads: ``max_sessions`` are unfinished (each has its ``.part``; 503).
        """
        self._sweep_now_and_then()
        if self.max_sessions and self._unfinished() >= self.max_sessions:
            raise TooManyUploads(self.max_sessions)
        session = Session(
            id=secrets.token_urlsafe(16), length=length, metadata=metadata, owner=owner, expires=self._expiry()
        )
        with disk.translated('creating an upload session'):
            os.makedirs(self.directory, exist_ok=True)
            # NOTE: the state first: what the sweep finds by it is never left behind
            self._save(session)
            os.close(os.open(self._path(session.id, '.part'), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        return session

    def get(self, session_id: str, owner: str) -> Session:
        """The session, if it exists, has not expired, and belongs to ``owner``.

        Raises:
            UploadNotFound: none of that (another owner's session is not told apart from none).
        """
        if not is_session_id(session_id):
            raise no_such_upload(session_id)
        try:
            with open(self._path(session_id, '.json'), 'rb') as file:
                fields = json.load(file)
            session = Session(**fields)
        except FileNotFoundError:
            raise no_such_upload(session_id) from None
        except OSError as exc:
            raise disk.store_error(exc, 'reading an upload') from exc
        except (ValueError, TypeError) as exc:
            raise StoreUnavailable(f'upload state {session_id} is unreadable: {exc}') from exc
        if not hmac.compare_digest(session.owner, owner) or session.expires < time.time():
            raise no_such_upload(session_id)
        return session

    def resume(self, session_id: str, owner: str, commit: Committer) -> Session:
        """The session (see :meth:`get`), its commit first finished if a kill within it left it undone.

        NOTE: a client takes offset = length for done and asks HEAD for the id; it never sends the
        empty PATCH that would commit a session whose worker was killed after its last byte.
        """
        session = self._recovered(session_id, owner, commit)
        if session.complete and session.result is None:
            try:
                with (
                    self.writing(session_id, owner, session.length) as (session, fd),
                    self.staged(session, fd) as staged,
                ):
                    session = self.finish(session, commit.commit(session, staged))
            except OffsetMismatch:
                pass  # NOTE: a live request commits it: the next HEAD has the id
        return session

    def _recovered(self, session_id: str, owner: str, commit: Committer) -> Session:
        """The session, its blob's id recorded first if a kill within its commit left it out."""
        session = self.get(session_id, owner)
        if session.complete and session.result is None:
            session = self._recover(session, commit)
        return session

    def _recover(self, session: Session, commit: Committer) -> Session:
        """A complete session without its blob's id: the worker committing it was killed, or is at it.

        The id is known from the saved hash. If that blob is stored, the commit got that far:
        its id is recorded, and the ``.part`` (which may be the blob's own inode, linked)
        goes, without a lock that the blob's could be (a self-deadlock). If it is not and the
        ``.part`` is gone, the session cannot complete: it goes (404). Otherwise a PATCH commits
        it. No lock: a commit finishing meanwhile records the same id.
        """
        state = Sha256.from_hex(session.sha256_state)
        if state is None:
            return session  # NOTE: no saved hash (no libcrypto here): the PATCH at the end commits it
        digest = 'sha256:' + state.hexdigest()
        if self._store.is_stored(digest[len('sha256:') :]):
            session = self.finish(session, commit.stored(session, digest))
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path(session.id, '.part'))
            return session
        if not os.path.exists(self._path(session.id, '.part')):
            self._remove(session.id)
            raise no_such_upload(session.id)
        return session

    def receive(
        self,
        session_id: str,
        owner: str,
        offset: int,
        body: Callable[[int], storage.Readable] | None,
        checksum: tuple[str, bytes] | None,
        commit: Committer,
    ) -> Session:
        """Append a chunk at ``offset`` (``body`` makes its reader, given the bytes left); commit after the last byte.

        Raises:
            UploadNotFound: no such session.
            OffsetMismatch: another request holds it, or it is not at ``offset`` (409).
        """
        self._recovered(session_id, owner, commit)  # NOTE: a commit a kill left half-recorded, before any lock
        with self.writing(session_id, owner, offset) as (session, fd):
            if body is not None:
                session = self.append(session, fd, body(session.length - offset), checksum)
            if session.complete:
                with self.staged(session, fd) as staged:
                    session = self.finish(session, commit.commit(session, staged))
        return session

    @contextlib.contextmanager
    def writing(self, session_id: str, owner: str, offset: int) -> Iterator[tuple[Session, int]]:
        """Hold the session for one chunk at ``offset``: its state and its ``.part`` file, open and locked.

        Raises:
            UploadNotFound: no such session (see :meth:`get`).
            OffsetMismatch: another request holds it, or it is not at ``offset`` (409).
        """
        session = self.get(session_id, owner)
        require_offset(session, offset)
        try:
            fd = os.open(self._path(session_id, '.part'), os.O_RDWR)
        except FileNotFoundError:
            raise OffsetMismatch('The upload was completed or terminated by another request.') from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise OffsetMismatch(
                    'Another request is sending a chunk of this upload; ask HEAD for the offset.'
                ) from None
            # NOTE: what the state says now, under the lock: the other request may have moved it on
            session = self.get(session_id, owner)
            if not os.fstat(fd).st_nlink:
                raise OffsetMismatch('The upload was completed or terminated by another request.')
            require_offset(session, offset)
            yield session, fd
        finally:
            os.close(fd)

    def append(self, session: Session, fd: int, body: storage.Readable, checksum: tuple[str, bytes] | None) -> Session:
        """Write the chunk in ``body`` at the session's offset; return the session with the offset it reached.

        Without a checksum, a body that stops arriving keeps what came (made durable, the
        offset moved past it) and its error is raised after. With one, the chunk is kept
        whole, or nothing of it when its digest differs (:class:`ChecksumMismatch`) or it
        stops arriving.

        Raises:
            UploadTooLarge: the body runs past the upload's length; nothing of it kept.
        """
        sha256 = self._sha256_at(session, fd)
        chunk_hash = CHECKSUMS[checksum[0]]() if checksum else None
        start = position = session.offset
        failure: BaseException | None = None
        try:
            for piece in storage.written(fd, body, start):
                position += len(piece)
                if position > session.length:
                    raise UploadTooLarge(session.length - start)  # NOTE: nothing of it kept, below
                sha256.update(piece)
                if chunk_hash is not None:
                    chunk_hash.update(piece)
        except IncompleteBody as exc:
            if checksum is not None:
                self._truncate(fd, start)
                raise
            failure = exc  # NOTE: keep what arrived, below, then tell
        except BaseException:
            self._truncate(fd, start)
            raise
        if (
            checksum is not None
            and chunk_hash is not None
            and not hmac.compare_digest(chunk_hash.digest(), checksum[1])
        ):
            self._truncate(fd, start)
            raise ChecksumMismatch(f'The chunk does not match its {checksum[0]} checksum; nothing of it was kept.')
        state = sha256.state
        session = dataclasses.replace(
            session, offset=position, expires=self._expiry(), sha256_state=None if state is None else state.hex()
        )
        if not os.fstat(fd).st_nlink:
            raise no_such_upload(session.id)  # NOTE: terminated while the chunk arrived: not brought back
        with disk.translated('saving an upload chunk'):
            os.ftruncate(fd, position)  # NOTE: drops what an earlier, refused chunk left beyond
            self._save(session)  # NOTE: flushes the chunk's bytes and then the state
        if failure is not None:
            raise failure
        return session

    def digest(self, session: Session, fd: int) -> str:
        """The ``sha256:<hex>`` id of a complete session's bytes."""
        return 'sha256:' + self._sha256_at(session, fd).hexdigest()

    def staged(self, session: Session, fd: int) -> storage.StagedBlob:
        """The complete session's bytes as a staged blob, for ``store.commit``; it owns a new descriptor."""
        return storage.StagedBlob(os.dup(fd), self._path(session.id, '.part'), self.digest(session, fd), session.length)

    def finish(self, session: Session, result: dict[str, Any]) -> Session:
        """Record the committed blob (its ``.part`` is gone), so that HEAD keeps answering with it."""
        session = dataclasses.replace(session, result=result, sha256_state=None, expires=self._expiry())
        with disk.translated('finishing an upload'):
            self._save(session)
        return session

    def terminate(self, session_id: str, owner: str) -> None:
        """Remove a session (tus termination); one being written is removed when that chunk ends.

        One whose last chunk is in (its commit under way) is removed once the commit ends: a
        DELETE and the final PATCH are serialised, so the session never comes back after a 204.

        Raises:
            UploadNotFound: no such session.
        """
        session = self.get(session_id, owner)
        fd = None
        if session.complete and session.result is None:
            # NOTE: the .part may be the blob's inode (a kill between link and unlink); no lock of
            # ours is held on the blob here, so waiting for it cannot deadlock
            fd = disk.lock_file(self._path(session_id, '.part'), fcntl.LOCK_EX)
        try:
            self._remove(session_id)
        finally:
            if fd is not None:
                os.close(fd)

    def discard(self, session_id: str) -> None:
        """Remove a session that cannot complete (its bytes are not what it said they would be)."""
        self._remove(session_id)

    def sweep_expired(self, now: float | None = None, *, dry_run: bool = False) -> int:
        """Remove the sessions past their expiry that no request holds; return how many went (or would go)."""
        now = time.time() if now is None else now
        removed = 0
        try:
            entries = list(os.scandir(self.directory))
        except FileNotFoundError:
            return 0
        for entry in entries:
            if not entry.name.endswith('.json'):
                continue
            session_id = entry.name.removesuffix('.json')
            try:
                with open(entry.path, 'rb') as file:
                    expires = json.load(file)['expires']
            except (OSError, ValueError, KeyError):
                continue  # NOTE: being replaced this instant, or not ours
            if expires < now and (dry_run or self._remove(session_id, only_if_idle=True)):
                removed += 1
        return removed

    # -- inside --------------------------------------------------------------------

    def _sha256_at(self, session: Session, fd: int) -> Sha256:
        """The hash of the session's first ``offset`` bytes: from its saved state, else read from the file."""
        if session.sha256_state is not None and _crypto is not None:
            return Sha256(bytes.fromhex(session.sha256_state))
        sha256 = Sha256()
        position = 0
        buffer = memoryview(bytearray(self._CHUNK_SIZE))
        while position < session.offset:
            count = os.preadv(fd, [buffer[: min(len(buffer), session.offset - position)]], position)
            if not count:
                raise disk.store_error(OSError(5, 'the upload file is shorter than its offset'), 'hashing an upload')
            sha256.update(buffer[:count])
            position += count
        return sha256

    def _save(self, session: Session) -> None:
        """Replace the session's state, durably (which also flushes the chunk written before)."""
        data = json.dumps(dataclasses.asdict(session)).encode()
        disk.write_atomically(self._layout, self._path(session.id, '.json'), disk.write_bytes(data), replace=True)

    def _remove(self, session_id: str, *, only_if_idle: bool = False) -> bool:
        fd = None
        if only_if_idle:
            try:
                fd = disk.lock_file(self._path(session_id, '.part'), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False  # NOTE: a chunk is arriving: not idle, whatever its expiry said
        try:
            for suffix in ('.part', '.json'):  # NOTE: the state last: the sweep finds a session by it
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self._path(session_id, suffix))
        finally:
            if fd is not None:
                os.close(fd)
        return True

    def _truncate(self, fd: int, length: int) -> None:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, length)

    def _expiry(self) -> float:
        return time.time() + self.expires_seconds

    def _unfinished(self) -> int:
        try:
            return sum(1 for entry in os.scandir(self.directory) if entry.name.endswith('.part'))
        except FileNotFoundError:
            return 0

    def _sweep_now_and_then(self) -> None:
        """Sweep in the background now and then (PERF: 16k sessions took a create 3.8 s when it swept inline)."""
        now = time.monotonic()
        with self._sweep_lock:
            if now - self._last_sweep < self._SWEEP_EVERY_SECONDS:
                return
            self._last_sweep = now
        threading.Thread(target=self._sweep_in_background, name='iss-tus-sweep', daemon=True).start()

    def _sweep_in_background(self) -> None:
        try:
            self.sweep_expired()
        except OSError as exc:
            log.warning('sweeping expired upload sessions failed (tried again later): %s', exc)


def no_such_upload(session_id: str) -> UploadNotFound:
    # APPSEC: an id is 22 characters; what a client sent in its place is not repeated whole.
    return UploadNotFound(session_id if len(session_id) <= _ECHOED_CHARS else session_id[:_ECHOED_CHARS] + '...')


def require_offset(session: Session, offset: int) -> None:
    """A chunk goes on where the session is, and never after it is complete (409 otherwise)."""
    if session.result is not None:
        raise OffsetMismatch(f'The upload is complete (all {session.offset} bytes); there is nothing more to send.')
    if session.offset != offset:
        raise OffsetMismatch(f'The upload is at offset {session.offset}, not {offset}.')
