"""Resumable uploads of a store on a bucket: any node continues, asks, finishes or ends any session.

tus on a cluster (issue 24): a session's state is a row of the shared index
(``uploads``), its bytes an S3 multipart upload to ``uploads/<id>/data``. S3 takes
parts of at least 5 MiB (all but the last), so what a chunk leaves short of a part
is kept in an object, ``uploads/<id>/tail.<n>``, until a later chunk fills the part.

No lock is held between requests, nor during a chunk: a node killed mid-chunk
holds nothing, and the next PATCH, on any node, goes on from the last saved row
(the killed chunk's bytes are not claimed, as on disk). A PATCH reads the row and
its version, sends each full part under a part number the index hands out once
(two requests racing at one offset never overwrite each other's parts), then
saves the row only if its version is still the one it read: the loser is 409,
and its parts, never named at completion, are dropped by S3.

The SHA-256 is carried in the row as on disk (OpenSSL's context, see
``resumable.Sha256``), so the last chunk knows the blob's id. The commit, under
the row's lease (one request at a time; a DELETE waits for it to end), completes
the parts into ``uploads/<id>/data``, reads that object back through
``store.stage`` with the id as the expected one (hashed again, so what S3
assembled is what was hashed, while the S3 driver's writer puts it under the
blob's key) and commits it through ``store.commit`` like any upload: the same
identification, dedup, order of blob, meta and row. Each step can be done again:
a node killed anywhere in it leaves the row complete and unfinished, and the next
HEAD or PATCH on any node, or the sweep, finishes it.

NOTE: read back rather than copied in the bucket: an image door identifies the
bytes from a file, and the store's one commit path takes a staged file; the cost
is one GET and one PUT of the upload inside the cluster, once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hmac
import io
import json
import logging
import secrets
import threading
import time
from collections.abc import Callable
from typing import Any

import storage
from iss_server import background, resumable
from iss_server.drivers import KeyNotFound
from iss_server.drivers.s3 import SESSIONS_PREFIX, S3Driver
from iss_server.errors import (
    ChecksumMismatch,
    IncompleteBody,
    OffsetMismatch,
    StoreFailure,
    StoreUnavailable,
    TooManyUploads,
    UploadTooLarge,
)

log = logging.getLogger('iss.tus')

#: S3's smallest part (all but the last); a session's parts are at least this.
MIN_PART_BYTES = 5 * 1024 * 1024
_MAX_PARTS = 10_000
# NOTE: part numbers are handed out once, and a request that loses a race wastes its own; an
# upload's parts are sized so that a tenth of S3's 10,000 numbers stays spare for that.
_PART_NUMBERS_USED = 9_000
# PERF: what a chunk's body is read at a time.
_READ_BYTES = 1024 * 1024
# NOTE: a commit's lease, renewed while it reads the upload back: a node killed in a commit
# holds the session this long at most, and a HEAD waits about as long for a commit under way.
_LEASE_SECONDS = 15.0
_RENEW_EVERY_SECONDS = 5.0
# NOTE: one sweep of the expired sessions at a time across the nodes, at most this often.
_SWEEP_EVERY_SECONDS = 60.0
_SWEEP_BATCH = 200


@dataclasses.dataclass
class BucketSession(resumable.Session):
    """A session's state as its row keeps it: :class:`resumable.Session` and where its bytes are."""

    #: The size of its parts (the last may be smaller).
    part_bytes: int = MIN_PART_BYTES
    #: The S3 multipart upload to ``uploads/<id>/data`` (None: the upload fits in one part).
    upload: str | None = None
    #: The parts sent so far, in order, as S3's completion names them.
    parts: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    #: The object holding the bytes past the last part (None: there are none).
    tail: str | None = None


Body = Callable[[int], storage.Readable]


class BucketSessions:
    """The resumable uploads of a store on a bucket, shared by every node through its index.

    Args:
        store: The store the finished uploads are committed to (its index holds the rows).
        driver: The store's S3 driver, which holds the parts and tails.
        expires_seconds: How long a session lives after its last chunk.
        max_sessions: How many unfinished sessions the store holds at most (0: no bound).
    """

    def __init__(self, store: storage.BlobStore, driver: S3Driver, expires_seconds: int, max_sessions: int) -> None:
        self._store = store
        self._index = store.index
        self._driver = driver
        self.expires_seconds = expires_seconds
        self.max_sessions = max_sessions
        self._node = background.holder()
        self._last_sweep = 0.0
        self._sweep_lock = threading.Lock()

    # -- the protocol's operations -------------------------------------------------

    def create(self, length: int, metadata: dict[str, str], owner: str) -> BucketSession:
        """A new, empty session, its row saved before it is answered.

        Raises:
            TooManyUploads: the store holds ``max_sessions`` unfinished sessions (503).
        """
        self.sweep_now_and_then()
        if self.max_sessions and self._index.open_uploads(time.time()) >= self.max_sessions:
            raise TooManyUploads(self.max_sessions)
        session_id = secrets.token_urlsafe(16)
        part_bytes = max(MIN_PART_BYTES, -(-length // _PART_NUMBERS_USED))
        # NOTE: the multipart upload starts with the session, so no two requests race to start it;
        # one a kill leaves without its row is found by the sweep (no row, older than the expiry).
        upload = self._driver.start_parts(_data_key(session_id)) if length > part_bytes else None
        session = BucketSession(
            id=session_id,
            length=length,
            metadata=metadata,
            owner=owner,
            expires=self._expiry(),
            sha256_state=resumable.Sha256().state_hex(),
            part_bytes=part_bytes,
            upload=upload,
        )
        self._index.add_upload(session.id, _encode(session), session.expires)
        return session

    def get(self, session_id: str, owner: str) -> BucketSession:
        """The session, if it exists, has not expired, and belongs to ``owner`` (else :class:`UploadNotFound`)."""
        return self._read(session_id, owner)[0]

    def resume(self, session_id: str, owner: str, commit: resumable.Committer) -> BucketSession:
        """The session (see :meth:`get`), its commit first finished if a killed node left it undone.

        A commit under way in another request is waited for (a lease's term at most), so that a
        client whose last PATCH lost its answer learns the blob's id.
        """
        session, version = self._read(session_id, owner)
        deadline = time.monotonic() + _LEASE_SECONDS + _RENEW_EVERY_SECONDS
        while session.complete and session.result is None:
            try:
                return self._commit(session, version, commit)
            except OffsetMismatch:
                if time.monotonic() > deadline:
                    return session  # NOTE: still under way: the offset says every byte is in
            time.sleep(0.25)
            session, version = self._read(session_id, owner)
        return session

    def receive(
        self,
        session_id: str,
        owner: str,
        offset: int,
        body: Body | None,
        checksum: tuple[str, bytes] | None,
        commit: resumable.Committer,
    ) -> BucketSession:
        """Append a chunk at ``offset`` (``body`` makes its reader, given the bytes left); commit after the last byte.

        Raises:
            UploadNotFound: no such session.
            OffsetMismatch: it is not at ``offset``, or another request saved it first (409).
        """
        session, version = self._read(session_id, owner)
        resumable.require_offset(session, offset)
        if body is not None:
            session, version = self._append(session, version, body(session.length - offset), checksum)
        if session.complete:
            session = self._commit(session, version, commit)
        return session

    def terminate(self, session_id: str, owner: str) -> None:
        """Remove a session (tus termination), unless a request is committing it (409).

        Raises:
            UploadNotFound: no such session.
        """
        session, _ = self._read(session_id, owner)
        if not self._remove(session):
            raise OffsetMismatch('The upload is being completed by another request; ask HEAD for its result.')

    def discard(self, session_id: str) -> None:
        """Remove a session that cannot complete (its bytes are not what it said they would be)."""
        row = self._index.upload(session_id)
        if row is not None:
            self._remove(_decode(row.state))

    # -- a chunk -----------------------------------------------------------------

    def _append(
        self, session: BucketSession, version: int, body: storage.Readable, checksum: tuple[str, bytes] | None
    ) -> tuple[BucketSession, int]:
        """Send the chunk's full parts, keep the rest as the tail, and save the row if no request saved it first.

        As on disk: without a checksum, a body that stops arriving keeps what came (the
        error raised after); with one, the chunk is kept whole or not at all.
        """
        sha256 = resumable.Sha256.from_hex(session.sha256_state)
        chunk_hash = resumable.CHECKSUMS[checksum[0]]() if checksum else None
        start = position = session.offset
        pending = bytearray(self._read_tail(session))
        parts = list(session.parts)
        failure: IncompleteBody | None = None
        buffer = memoryview(bytearray(_READ_BYTES))
        try:
            while count := body.readinto(buffer):
                piece = buffer[:count]
                position += count
                if position > session.length:
                    raise UploadTooLarge(session.length - start)  # NOTE: the row is not saved: nothing kept
                if sha256 is not None:
                    sha256.update(piece)
                if chunk_hash is not None:
                    chunk_hash.update(piece)
                pending += piece
                while session.upload is not None and len(pending) >= session.part_bytes:
                    parts.append(self._send_part(session, bytes(pending[: session.part_bytes])))
                    del pending[: session.part_bytes]
        except IncompleteBody as exc:
            if checksum is not None:
                raise
            failure = exc  # NOTE: keep what arrived, below, then tell
        if (
            chunk_hash is not None
            and checksum is not None
            and not hmac.compare_digest(chunk_hash.digest(), checksum[1])
        ):
            raise ChecksumMismatch(f'The chunk does not match its {checksum[0]} checksum; nothing of it was kept.')
        if position == start:
            if failure is not None:
                raise failure
            return session, version
        tail = None
        if pending and session.upload is not None and position == session.length:
            parts.append(self._send_part(session, bytes(pending)))  # NOTE: the last part, of any size
        elif pending:
            tail = self._tail_key(session)
            self._driver.write(tail, bytes(pending))
        saved = dataclasses.replace(
            session,
            offset=position,
            parts=parts,
            tail=tail,
            sha256_state=None if sha256 is None else sha256.state_hex(),
            expires=self._expiry(),
        )
        if not self._index.save_upload(saved.id, _encode(saved), saved.expires, version, finished=False):
            if tail is not None:
                self._forget(tail)
            self._read(session.id, session.owner)  # NOTE: UploadNotFound if it was terminated meanwhile
            raise _overtaken()
        if session.tail is not None:
            self._forget(session.tail)  # NOTE: a kill before this leaves it under uploads/<id>/, swept with the session
        if failure is not None:
            raise failure
        return saved, version + 1

    def _read_tail(self, session: BucketSession) -> bytes:
        if session.tail is None:
            return b''
        try:
            return self._driver.read(session.tail)
        except KeyNotFound:
            # NOTE: a request that saved the row after this one read it removes the tail it replaced
            raise OffsetMismatch(
                'Another request sent a chunk of this upload first; ask HEAD for the offset.'
            ) from None

    def _send_part(self, session: BucketSession, data: bytes) -> dict[str, Any]:
        number = self._index.claim_part_number(session.id)
        if number is None:
            raise resumable.no_such_upload(session.id)
        if number > _MAX_PARTS:
            raise StoreUnavailable(f'upload {session.id} has used every S3 part number; it cannot go on')
        assert session.upload is not None  # NOTE: parts are sent only to a session with an upload
        try:
            return self._driver.put_part(_data_key(session.id), session.upload, number, data)
        except KeyNotFound:
            raise resumable.no_such_upload(session.id) from None  # NOTE: terminated meanwhile

    def _tail_key(self, session: BucketSession) -> str:
        return f'{_prefix(session.id)}tail.{secrets.token_hex(8)}'

    # -- the commit ----------------------------------------------------------------

    def _commit(self, session: BucketSession, version: int, commit: resumable.Committer) -> BucketSession:
        """Complete the parts, read the upload back into the store's spool, commit it, and record its blob."""
        holder = self._holder()
        now = time.time()
        if not self._index.lease_upload(session.id, holder, now + _LEASE_SECONDS, now):
            raise OffsetMismatch('The upload is being completed by another request; ask HEAD for its result.')
        try:
            row = self._index.upload(session.id)
            if row is None:
                raise resumable.no_such_upload(session.id)
            session, version = _decode(row.state), row.version  # NOTE: as saved, under the lease
            if session.result is not None:
                return session
            with self._assembled(session) as file:
                expected = None if session.sha256_state is None else resumable.Sha256.from_hex(session.sha256_state)
                digest = None if expected is None else 'sha256:' + expected.hexdigest()
                staged = self._store.stage(_Renewing(file, lambda: self._renew(session.id, holder)), digest)
            with staged:
                if digest is not None and staged.digest != digest:
                    self._remove(session)
                    raise StoreUnavailable(f'the bucket assembled upload {session.id} into other bytes than were sent')
                result = commit.commit(session, staged)
            finished = dataclasses.replace(
                session, result=result, upload=None, parts=[], tail=None, sha256_state=None, expires=self._expiry()
            )
            # NOTE: recorded before its objects go: a kill between them leaves a finished session
            # whose objects the sweep removes with it, never one that can neither resume nor answer
            if not self._index.save_upload(session.id, _encode(finished), finished.expires, version, finished=True):
                raise OffsetMismatch('The upload was changed by another request while it was committed.')
            self._forget_objects(session.id)
            return finished
        finally:
            self._index.lease_upload(session.id, holder, 0.0, time.time())

    def _renew(self, session_id: str, holder: str) -> None:
        now = time.time()
        if not self._index.lease_upload(session_id, holder, now + _LEASE_SECONDS, now):
            raise OffsetMismatch('The upload was taken over by another request while it was committed.')

    @contextlib.contextmanager
    def _assembled(self, session: BucketSession) -> Any:
        """The complete upload's bytes as a readable file: its completed parts, or its one tail."""
        try:
            if session.upload is not None:
                self._driver.complete_parts(_data_key(session.id), session.upload, session.parts)
                file, _ = self._driver.open(_data_key(session.id))
            elif session.tail is not None:
                file, _ = self._driver.open(session.tail)
            else:
                file = io.BytesIO(b'')  # NOTE: an empty upload
        except KeyNotFound:
            self._remove(session)
            raise StoreUnavailable(f'the bytes of upload {session.id} are gone from the bucket') from None
        with contextlib.closing(file):
            yield file

    # -- removal and the sweep ------------------------------------------------------

    def _remove(self, session: BucketSession) -> bool:
        """Remove a session's objects and then its row (the sweep finds a session by its row); False if leased."""
        holder = self._holder()
        now = time.time()
        if not self._index.lease_upload(session.id, holder, now + _LEASE_SECONDS, now):
            return False
        try:
            if session.upload is not None:
                self._driver.abort_parts(_data_key(session.id), session.upload)
            self._forget_objects(session.id)
        finally:
            self._index.remove_upload(session.id, holder, time.time())
        return True

    def _forget_objects(self, session_id: str) -> None:
        for key, _ in list(self._driver.walk(_prefix(session_id))):
            self._driver.remove(key)

    def _forget(self, key: str) -> None:
        with contextlib.suppress(StoreFailure):
            self._driver.remove(key)

    def sweep_expired(self, now: float | None = None, *, dry_run: bool = False) -> int:
        """Remove the sessions past their expiry that no request is committing, and objects of no session.

        An object or multipart upload under ``uploads/`` whose session has no row (a node
        killed between them) goes once it is older than the expiry. Return how many
        sessions went (or would go).
        """
        now = time.time() if now is None else now
        removed = 0
        while batch := self._index.expired_uploads(now, _SWEEP_BATCH):
            went = sum(1 for row in batch if dry_run or self._remove(_decode(row.state)))
            removed += went
            # NOTE: a batch of which none went (each taken by a commit meanwhile) would come back as it is
            if dry_run or went == 0 or len(batch) < _SWEEP_BATCH:
                break
        if not dry_run:
            self._sweep_orphans(now - self.expires_seconds)
        return removed

    def _sweep_orphans(self, before: float) -> None:
        known: dict[str, bool] = {}

        def orphan(key: str) -> bool:
            session_id = key.removeprefix(SESSIONS_PREFIX).partition('/')[0]
            if session_id not in known:
                known[session_id] = self._index.upload(session_id) is None
            return known[session_id]

        for key, stat in list(self._driver.walk(SESSIONS_PREFIX)):
            if stat.modified < before and orphan(key):
                self._forget(key)
        for key, upload_id, initiated in list(self._driver.multipart_uploads(SESSIONS_PREFIX)):
            if initiated < before and orphan(key):
                with contextlib.suppress(StoreFailure):
                    self._driver.abort_parts(key, upload_id)

    def sweep_now_and_then(self) -> None:
        """Start a sweep in the background, if this process has not for a while and no node holds its lease."""
        now = time.monotonic()
        with self._sweep_lock:
            if now - self._last_sweep < _SWEEP_EVERY_SECONDS:
                return
            self._last_sweep = now
        threading.Thread(target=self._sweep_in_background, name='iss-tus-sweep', daemon=True).start()

    def _sweep_in_background(self) -> None:
        now = time.time()
        try:
            # NOTE: a lease as long as the interval: one node of many sweeps in each, the others skip it
            if self._index.take_lease('tus-sweep', self._node, now + _SWEEP_EVERY_SECONDS, now):
                swept = self.sweep_expired()
                if swept:
                    log.info('removed %d expired upload session(s)', swept)
        except StoreFailure as exc:
            log.warning('sweeping expired upload sessions failed (tried again later): %s', exc)

    # -- inside --------------------------------------------------------------------

    def _read(self, session_id: str, owner: str) -> tuple[BucketSession, int]:
        if not resumable.is_session_id(session_id):
            raise resumable.no_such_upload(session_id)
        row = self._index.upload(session_id)
        if row is None:
            raise resumable.no_such_upload(session_id)
        session = _decode(row.state)
        if not hmac.compare_digest(session.owner, owner) or session.expires < time.time():
            raise resumable.no_such_upload(session_id)
        return session, row.version

    def _holder(self) -> str:
        return f'{self._node}:{threading.get_ident()}'

    def _expiry(self) -> float:
        return time.time() + self.expires_seconds


class _Renewing:
    """A reader that calls ``renew`` now and then while it is read (a commit's lease, kept while it works)."""

    def __init__(self, file: Any, renew: Callable[[], None]) -> None:
        self._file = file
        self._renew = renew
        self._renewed = time.monotonic()

    def readinto(self, buffer: memoryview) -> int:
        if time.monotonic() - self._renewed > _RENEW_EVERY_SECONDS:
            self._renew()
            self._renewed = time.monotonic()
        return int(self._file.readinto(buffer))


def _overtaken() -> OffsetMismatch:
    return OffsetMismatch('Another request sent a chunk of this upload first; ask HEAD for the offset.')


def _prefix(session_id: str) -> str:
    return f'{SESSIONS_PREFIX}{session_id}/'


def _data_key(session_id: str) -> str:
    return f'{_prefix(session_id)}data'


def _encode(session: BucketSession) -> str:
    return json.dumps(dataclasses.asdict(session), separators=(',', ':'))


def _decode(state: str) -> BucketSession:
    try:
        return BucketSession(**json.loads(state))
    except (ValueError, TypeError) as exc:
        raise StoreUnavailable(f'an upload session is unreadable: {exc}') from exc


def sessions_of(
    store: storage.BlobStore, expires_seconds: int, max_sessions: int = 0
) -> resumable.Sessions | BucketSessions:
    """The resumable uploads of ``store``: in its index and bucket, shared by every node, when it is a bucket;
    else in its ``tmp/uploads/`` (a disk store is one node's)."""
    if isinstance(store.driver, S3Driver):
        return BucketSessions(store, store.driver, expires_seconds, max_sessions)
    return resumable.Sessions(store, expires_seconds, max_sessions)
