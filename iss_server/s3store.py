"""The blob store on an S3 bucket (``ISS_STORE=s3://BUCKET[/PREFIX]``), for several ISS nodes on one store.

The bucket keeps the seed's layout as keys (``blobs/ab/cd/<hex>``,
``meta/ab/cd/<hex>.json``), so a data directory copied into it with any S3
tool is served as it is. The index is shared too (``ISS_INDEX``, PostgreSQL
for several nodes); each node keeps only scratch space on its own disk
(``ISS_DATA``): uploads being received, resumable upload sessions, and its
cache of derivatives.

The write protocol, whole-or-nothing and verified:

1. An upload is spooled to the node's disk and hashed as it arrives
   (:func:`storage.stage_file`, as for the file store): nothing reaches the
   bucket before its digest is known, so a client that goes away, a body over
   the limit or a wrong PUT digest leave nothing there.
2. Up to :data:`_SINGLE_PUT_BYTES`, one PutObject under the final key with
   ``x-amz-checksum-sha256`` (the blob's own name: the service refuses bytes
   that do not hash to it) and ``If-None-Match: *`` (an existing blob is
   never overwritten; 412 means another upload stored it first).
3. Larger blobs: a multipart upload to the final key, each part with its own
   ``x-amz-checksum-sha256``, the parts re-hashed in order on the way out and
   completed with ``If-None-Match: *`` only when they hash to the name. Parts
   are invisible until completion; a failure aborts the upload, and one left by
   a killed node is aborted by ``gc`` (or the bucket's lifecycle rule).
4. Then the meta, also with ``If-None-Match: *`` (the first upload's meta
   wins), then the index row. A crash between the two leaves a blob without
   meta, which ``fsck`` reports and repairs, never meta without its blob.

Reads are verified: a blob read from its first byte to its last is hashed as
it streams, and bytes that do not hash to its name are never completed as if
valid: the read raises :class:`errors.CorruptBlob` (the response is cut), the
object is moved to ``quarantine/`` and logged, and ``fsck`` reports it.

Every S3 or network failure becomes :class:`errors.BucketUnavailable` (503,
``Retry-After``); the client library is boto3 (see ``requirements.txt``).
"""

from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import threading
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from typing import Any

import boto3
import botocore.config
import botocore.exceptions
import urllib3.exceptions

import storage
from iss_server import disk, index, meta
from iss_server.blobs import BlobStat, Committed, OpenBlob, parse_id
from iss_server.config import Settings
from iss_server.derived import DerivedCache
from iss_server.errors import BlobNotFound, BucketUnavailable, CorruptBlob, StoreFailure

log = logging.getLogger('iss.s3store')

# PERF: one request up to this size (a request costs ~2-5 ms against SeaweedFS on loopback);
# beyond it, parts go up several at a time and a failure costs one part, not the whole.
_SINGLE_PUT_BYTES = 64 * 1024 * 1024
_PART_BYTES = 16 * 1024 * 1024
# NOTE: parts in flight per upload: memory stays within _PART_BYTES times this, whatever the size.
_PARTS_IN_FLIGHT = 4
_MAX_PARTS = 10_000
# PERF: /blobs/missing asks the bucket about this many ids at once.
_LOOKUPS_IN_FLIGHT = 16
_READ_BYTES = 1024 * 1024
# PERF: blobs up to this size are kept on each node that reads them (see S3Store.open),
# under this name in the node's derivative cache (no variant key has an '=' in it).
_NODE_CACHED_BYTES = 256 * 1024
_NODE_COPY = 'original=verified'

# NOTE: the answers of S3 that say a condition failed, a key is absent, or the service is in trouble.
_EXISTS = frozenset({'PreconditionFailed', '412', 'ConditionalRequestConflict', '409'})
_ABSENT = frozenset({'NoSuchKey', '404', 'NotFound'})


# NOTE: boto3 sessions are not thread-safe; clients made from one are (and are shared by threads).
_SESSION: tuple[int, Any] | None = None
_SESSION_LOCK = threading.Lock()


class S3Store(storage.Listings):
    """Blobs and their meta in an S3 bucket; see the module's docstring for the guarantees.

    Args:
        settings: ``store`` names the bucket and prefix; ``s3_*`` the service and its
            key; ``data_dir`` this node's scratch space; ``derived_max_bytes`` the
            bound of its derivative cache.
        index: The shared index (``index.open_index``).
    """

    def __init__(self, settings: Settings, store_index: index.Index) -> None:
        self.layout = disk.Layout(settings.data_dir)
        self.root = self.layout.root
        self.index = store_index
        self.bucket = settings.s3_bucket
        self.prefix = settings.s3_prefix
        self._settings = settings
        self._client: Any = None
        self._client_pid = 0
        self._client_lock = threading.Lock()
        # NOTE: each node renders into its own bounded cache; a derivative is served only
        # after the blob's meta was read from the bucket (iss.Derivatives), so a blob deleted
        # through any node is 404 on every node, derivatives included.
        self.derived = DerivedCache(self.layout, settings.derived_max_bytes, hold=self._held_while_rendered)
        try:
            os.makedirs(self.layout.tmp, exist_ok=True)
        except OSError as exc:
            log.error('scratch directory %s is not usable: %s', self.root, exc)

    @contextlib.contextmanager
    def _held_while_rendered(self, hex_digest: str) -> Iterator[None]:
        """A derivative is cached only while its blob is stored (BlobNotFound if it was deleted meanwhile)."""
        self.stat('sha256:' + hex_digest)
        yield

    def __repr__(self) -> str:
        return f'S3Store(s3://{self.bucket}/{self.prefix})'

    # -- the S3 client -------------------------------------------------------

    @property
    def client(self) -> Any:
        """This process's boto3 client (thread-safe; a forked child makes its own, never sharing sockets)."""
        if self._client_pid != os.getpid():
            with self._client_lock:
                if self._client_pid != os.getpid():
                    self._client = self._new_client()
                    self._client_pid = os.getpid()
        return self._client

    def _new_client(self) -> Any:
        settings = self._settings
        config = botocore.config.Config(
            signature_version='s3v4',
            s3={'addressing_style': 'path'},
            # NOTE: a service that is down answers 503 within seconds, not after a minute of retries.
            connect_timeout=3,
            read_timeout=30,
            retries={'max_attempts': 2, 'mode': 'standard'},
            # NOTE: gunicorn's threads of a worker share the client and its pool.
            max_pool_connections=64,
            # PERF: ISS sends its own SHA-256 checksums; boto's default CRC32 of every body
            # would hash each upload a second time.
            request_checksum_calculation='when_required',
            response_checksum_validation='when_required',
        )
        with _SESSION_LOCK:
            # PERF: one session per process: each new one reloads the S3 service model (~0.3 s).
            global _SESSION
            if _SESSION is None or _SESSION[0] != os.getpid():
                _SESSION = (os.getpid(), boto3.session.Session())
            session = _SESSION[1]
        client = session.client(
            's3',
            endpoint_url=settings.s3_endpoint or None,
            region_name=settings.s3_region,
            aws_access_key_id=settings.s3_access_key or None,
            aws_secret_access_key=settings.s3_secret_key or None,
            config=config,
        )
        for operation in ('PutObject', 'UploadPart'):
            client.meta.events.register(f'before-sign.s3.{operation}', _payload_hash_from_checksum)
        return client

    def _key(self, top: str, hex_digest: str, suffix: str = '') -> str:
        return f'{self.prefix}{top}/{hex_digest[0:2]}/{hex_digest[2:4]}/{hex_digest}{suffix}'

    def blob_key(self, hex_digest: str) -> str:
        return self._key('blobs', hex_digest)

    def meta_key(self, hex_digest: str) -> str:
        return self._key('meta', hex_digest, '.json')

    # -- lifecycle -----------------------------------------------------------

    def start(self) -> None:
        """Sweep this node's dead temp files; index the bucket in the background if the index is incomplete."""
        try:
            swept = storage.sweep_temp(self.layout)
        except OSError as exc:
            log.error('scratch directory %s is not usable: %s', self.root, exc)
        else:
            if swept:
                log.warning('removed %d stale temp file(s) from %s', swept, self.root)
        try:
            if self.index.complete:
                return
            if next(self.objects('blobs'), None) is None:
                self.index.mark_complete()  # NOTE: an empty bucket's index is complete as it is
                return
        except StoreFailure:
            return  # NOTE: /health says which part is down
        storage.index_in_background(self, repr(self))

    def check(self) -> dict[str, Any]:
        """Prove the bucket answers with ISS's key, the index answers, and the scratch space takes writes.

        Raises:
            BucketUnavailable, IndexUnavailable, StoreUnavailable: the part that is down.
        """
        with _translated('reaching the bucket'):
            self.client.head_bucket(Bucket=self.bucket)
        self.index.complete  # noqa: B018 - a read that raises IndexUnavailable when the index is down
        with disk.translated('writing to the scratch directory'):
            fd, path = self.layout.new_temp()
            disk.remove_temp(fd, path)
            usage = os.statvfs(self.root)
        # NOTE: a bucket has no free space to speak of; this is the node's room for uploads in flight.
        return {'free_bytes': usage.f_bavail * usage.f_frsize}

    # -- writing -------------------------------------------------------------

    def stage(self, stream: storage.Readable, expected: str | None = None) -> storage.StagedBlob:
        """Spool ``stream`` to the node's disk, hashing it (see :func:`storage.stage_file`).

        With ``expected`` (a PUT names its digest), the bytes also go up as they arrive, in
        parts of a multipart upload to the blob's final key, which :meth:`commit` completes
        only when they hashed to that name: receiving and sending overlap instead of adding up.
        """
        if expected is None:
            return storage.stage_file(self.layout, stream)
        upload = _PartsAsTheyArrive(self, parse_id(expected))
        try:
            staged = storage.stage_file(self.layout, stream, also=upload.feed)
        except BaseException:
            upload.abort()
            raise
        if staged.digest != expected or not upload.started:
            upload.abort()  # NOTE: wrong bytes never complete; a small blob goes up in one request
        else:
            staged.upload = upload
        return staged

    def commit(self, staged: storage.StagedBlob, new_meta: dict[str, Any]) -> Committed:
        return self.commit_all([(staged, new_meta)])[0]

    def commit_all(self, uploads: list[tuple[storage.StagedBlob, dict[str, Any]]]) -> list[Committed]:
        """Store each staged blob under its digest (unless stored), then its meta (unless it has one), then rows.

        Content given twice is stored once; the staged files are removed on every path.
        """
        firsts: dict[str, tuple[storage.StagedBlob, dict[str, Any]]] = {}
        for staged, new_meta in uploads:
            firsts.setdefault(staged.hex, (staged, new_meta))
        outcome: dict[str, Committed] = {}
        try:
            for hex_digest, (staged, new_meta) in sorted(firsts.items()):
                created = self._put_blob(hex_digest, staged)
                stored = None if created else self.read_meta('sha256:' + hex_digest)
                if stored is None:
                    stored = self.write_meta(hex_digest, new_meta)
                outcome[hex_digest] = Committed(created, stored)
        finally:
            for staged, _ in uploads:
                staged.discard()
        now = time.time()
        self.index.put_missing(
            [
                index.row_for(hex_digest, outcome[hex_digest].meta, now, staged.size)
                for hex_digest, (staged, _) in firsts.items()
            ]
        )
        return [
            outcome[staged.hex] if firsts[staged.hex][0] is staged else Committed(False, outcome[staged.hex].meta)
            for staged, _ in uploads
        ]

    def _put_blob(self, hex_digest: str, staged: storage.StagedBlob) -> bool:
        """Upload a staged blob to its key unless one is there; True when this upload created it."""
        if staged.upload is not None:
            staged.upload, upload = None, staged.upload
            return upload.complete()
        key = self.blob_key(hex_digest)
        copy = {'Metadata': {'iss-copy': uuid.uuid4().hex}}
        if staged.size <= _SINGLE_PUT_BYTES:
            with staged.open() as body, _translated('storing a blob'):
                try:
                    self.client.put_object(
                        Bucket=self.bucket,
                        Key=key,
                        Body=body,
                        ContentLength=staged.size,
                        ChecksumSHA256=_base64(hex_digest),
                        IfNoneMatch='*',
                        **copy,
                    )
                except botocore.exceptions.ClientError as exc:
                    if _code(exc) in _EXISTS:
                        return False
                    raise
            return True
        return self._put_multipart(key, hex_digest, staged)

    def _put_multipart(self, key: str, hex_digest: str, staged: storage.StagedBlob) -> bool:
        """Send a spooled blob up in parts, read from the file in order; complete it only if they hash to its name."""
        parts = _Parts(self, key, max(_PART_BYTES, -(-staged.size // _MAX_PARTS)))
        whole = hashlib.sha256()
        try:
            for offset in range(0, staged.size, parts.part_bytes):
                with disk.translated('reading a staged upload'):
                    data = os.pread(staged.fileno(), parts.part_bytes, offset)
                whole.update(data)
                parts.send(data)
            if whole.hexdigest() != hex_digest:
                # NOTE: the spooled file changed under us (a failing disk): never completed.
                raise CorruptBlob(f'staged bytes of {hex_digest} changed before they reached the bucket')
        except BaseException:
            parts.abort()
            raise
        return parts.complete()

    def _put_json(self, key: str, document: dict[str, Any], *, replace: bool) -> bool:
        condition = {} if replace else {'IfNoneMatch': '*'}
        with _translated('writing metadata'):
            try:
                self.client.put_object(
                    Bucket=self.bucket, Key=key, Body=meta.encode(document), ContentType='application/json', **condition
                )
            except botocore.exceptions.ClientError as exc:
                if _code(exc) in _EXISTS:
                    return False
                raise
        return True

    def write_meta(self, hex_digest: str, meta_doc: dict[str, Any], *, replace: bool = False) -> dict[str, Any]:
        """Write a blob's meta (unless another writer got there first, or ``replace``); return what is stored."""
        if self._put_json(self.meta_key(hex_digest), meta_doc, replace=replace):
            return meta_doc
        return self.read_meta('sha256:' + hex_digest) or meta_doc

    def complete_meta(self, blob_id: str, fields: dict[str, Any]) -> dict[str, Any]:
        """Add to a blob's meta the ``fields`` it lacks; return it (raises BlobNotFound when not stored)."""
        hex_digest = parse_id(blob_id)
        stat = self.stat(blob_id)
        stored = self.read_meta(blob_id) or {}
        missing = {key: value for key, value in fields.items() if key not in stored}
        if not missing:
            return stored
        stored = self.write_meta(hex_digest, {**stored, **missing}, replace=True)
        self.index.put(index.row_for(hex_digest, stored, time.time(), stat.size))
        return stored

    def delete(self, blob_id: str) -> None:
        """Remove a blob: its meta, index row and this node's derivatives first, its bytes last.

        Every node answers 404 from then on: the blob and its meta are gone from
        the bucket, and a node serves a cached derivative only after reading the meta.
        """
        hex_digest = parse_id(blob_id)
        self.stat(blob_id)  # NOTE: BlobNotFound for what is not stored (S3 deletes absent keys silently)
        with _translated('deleting a blob'):
            self.client.delete_object(Bucket=self.bucket, Key=self.meta_key(hex_digest))
            self.index.remove(hex_digest)
            self.derived.remove(hex_digest)
            self.client.delete_object(Bucket=self.bucket, Key=self.blob_key(hex_digest))

    # -- reading -------------------------------------------------------------

    def open(self, blob_id: str) -> OpenBlob:
        """Open a stored blob for reading: one GetObject, verified when read to its end.

        PERF: a small blob (up to :data:`_NODE_CACHED_BYTES`) is kept on the node's disk
        once read and verified, in the derivative cache (bounded, LRU), and served from
        there while the shared index has its row: a 4 KiB GET costs one indexed lookup
        instead of a signed S3 request (bench/s3.py: 194 -> 700-1,030 req/s). A delete removes the row before the
        bytes, so every node stops serving its copy at once.
        """
        hex_digest = parse_id(blob_id)
        row = self.index.get(hex_digest)
        if row is not None and row.bytes <= _NODE_CACHED_BYTES:
            version = f'row-{row.created_at!r}'
            cached = self.derived.open(hex_digest, _NODE_COPY)
            if cached is None:
                with VerifiedObject(self, hex_digest) as source:
                    cached = self.derived.put(hex_digest, _NODE_COPY, lambda out: out.write(source.read()))
            return OpenBlob(cached.file, BlobStat(cached.stat.size, version))
        reader = VerifiedObject(self, hex_digest)
        return OpenBlob(reader, reader.stat)

    def stat(self, blob_id: str) -> BlobStat:
        hex_digest = parse_id(blob_id)
        with _translated('reading a blob'):
            try:
                answer = self.client.head_object(Bucket=self.bucket, Key=self.blob_key(hex_digest))
            except botocore.exceptions.ClientError as exc:
                if _code(exc) in _ABSENT:
                    raise BlobNotFound(blob_id) from None
                raise
        return _stat_of(answer)

    def proxy_path(self, blob_id: str) -> str:
        """A presigned URL's path and query for nginx's internal location proxying to the S3 service.

        The location (``ISS_ACCEL_REDIRECT``, e.g. ``/_internal/s3/``) passes it
        on to the service as it is: ``proxy_pass http://seaweedfs:8333/;``.
        """
        url = urllib.parse.urlsplit(self.presigned_url(blob_id, seconds=300))
        return f'{url.path.lstrip("/")}?{url.query}'

    def presigned_url(self, blob_id: str, *, seconds: int, overrides: dict[str, str] | None = None) -> str:
        """A URL that reads the blob straight from the bucket for ``seconds``, with ``response-*`` headers."""
        params = {'Bucket': self.bucket, 'Key': self.blob_key(parse_id(blob_id)), **(overrides or {})}
        with _translated('signing a URL'):
            return self.client.generate_presigned_url('get_object', Params=params, ExpiresIn=seconds)

    def read_meta(self, blob_id: str) -> dict[str, Any] | None:
        """A blob's stored meta, or None when it has none (or it is unreadable)."""
        key = self.meta_key(parse_id(blob_id))
        with _translated('reading metadata'):
            try:
                body = self.client.get_object(Bucket=self.bucket, Key=key)['Body']
                with contextlib.closing(body):
                    raw = body.read()
            except botocore.exceptions.ClientError as exc:
                if _code(exc) in _ABSENT:
                    return None
                raise
        try:
            stored = json.loads(raw)
        except ValueError as exc:
            log.warning('ignoring unreadable metadata %s: %s', key, exc)
            return None
        return stored if isinstance(stored, dict) else None

    def missing(self, blob_ids: list[str]) -> list[str]:
        """The ids that name no blob in the bucket, in order, once each (asked several at a time)."""
        unique = list(dict.fromkeys(blob_ids))
        hexes = [parse_id(blob_id) for blob_id in unique]
        with concurrent.futures.ThreadPoolExecutor(_LOOKUPS_IN_FLIGHT) as pool:
            stored = list(pool.map(self.is_stored, hexes))
        return [blob_id for blob_id, present in zip(unique, stored, strict=True) if not present]

    def is_stored(self, hex_digest: str) -> bool:
        try:
            self.stat('sha256:' + hex_digest)
        except BlobNotFound:
            return False
        return True

    def quarantine(self, hex_digest: str, why: str) -> bool:
        """Move a blob whose bytes do not match its name out of ``blobs/``; its meta, row and derivatives go.

        Returns False when it was gone already.
        """
        key = self.blob_key(hex_digest)
        target = f'{self.prefix}quarantine/{hex_digest}.{time.strftime("%Y%m%dT%H%M%S")}'
        log.error('quarantining %s: %s', key, why)
        with _translated('quarantining a blob'):
            try:
                self.client.copy_object(Bucket=self.bucket, Key=target, CopySource={'Bucket': self.bucket, 'Key': key})
            except botocore.exceptions.ClientError as exc:
                if _code(exc) in _ABSENT:
                    return False
                raise
            self.client.delete_object(Bucket=self.bucket, Key=self.meta_key(hex_digest))
            self.index.remove(hex_digest)
            self.derived.remove(hex_digest)
            self.client.delete_object(Bucket=self.bucket, Key=key)
        return True

    # -- the operator's commands ---------------------------------------------

    def objects(self, top: str) -> Iterator[tuple[str | None, dict[str, Any]]]:
        """Every object under ``top/`` (``blobs``, ``meta``): its blob's hex (None for a stray key), and its listing."""
        suffix = '.json' if top == 'meta' else ''
        paginator = self.client.get_paginator('list_objects_v2')
        with _translated('listing the bucket'):
            for page in paginator.paginate(Bucket=self.bucket, Prefix=f'{self.prefix}{top}/'):
                for entry in page.get('Contents', []):
                    name = entry['Key'].rpartition('/')[2].removesuffix(suffix)
                    try:
                        valid = entry['Key'] == self._key(top, parse_id('sha256:' + name), suffix)
                    except ValueError:
                        valid = False
                    yield (name if valid else None), entry

    def reindex(self, *, only_if_incomplete: bool = False) -> dict[str, int]:
        """Rebuild the index from the bucket, which stays the truth; safe while ISS runs.

        Returns:
            ``blobs`` seen, rows ``changed`` (added or corrected), stale rows ``removed``.
        """
        os.makedirs(self.root, exist_ok=True)
        with open(self.layout.lock_file('index'), 'a') as lock, self.index.session():
            fcntl.flock(lock, fcntl.LOCK_EX)
            if only_if_incomplete and self.index.complete:
                return {}
            counts = {'blobs': 0, 'changed': 0, 'removed': 0}
            self.index.start_rebuild()
            for hex_digest, entry in self.objects('blobs'):
                if hex_digest is None:
                    continue
                row = self.index_row(hex_digest, entry)
                counts['blobs'] += 1
                counts['changed'] += self.index.put(row)
                self.index.saw(hex_digest)
            for hex_digest in self.index.unseen():
                if not self.is_stored(hex_digest):
                    counts['removed'] += self.index.remove(hex_digest)
            self.index.mark_complete()
        return counts

    def index_row(self, hex_digest: str, entry: dict[str, Any]) -> index.Row:
        """The row the index should have for a blob, from its listing entry and its meta."""
        return index.row_for(
            hex_digest, self.read_meta('sha256:' + hex_digest), entry['LastModified'].timestamp(), entry['Size']
        )

    def stored_blobs(self) -> Iterator[tuple[str, int]]:
        """Every blob in the bucket: its hex and size."""
        for hex_digest, entry in self.objects('blobs'):
            if hex_digest is not None:
                yield hex_digest, entry['Size']

    def open_unverified(self, hex_digest: str) -> Any:
        """A blob's bytes as the bucket sends them, for fsck to judge (the caller closes it)."""
        return self.get_blob(hex_digest)['Body']

    def get_blob(self, hex_digest: str, **params: Any) -> dict[str, Any]:
        """GetObject of a blob (``params``: a ``Range``); BlobNotFound when the bucket has none."""
        with _translated('reading a blob'):
            try:
                return self.client.get_object(Bucket=self.bucket, Key=self.blob_key(hex_digest), **params)
            except botocore.exceptions.ClientError as exc:
                if _code(exc) in _ABSENT:
                    raise BlobNotFound('sha256:' + hex_digest) from None
                raise

    def stale_uploads(self, age: float) -> Iterator[tuple[str, str]]:
        """Multipart uploads under ``blobs/`` started more than ``age`` seconds ago: (key, upload id).

        A node completes or aborts its own within minutes; older ones were left by a killed node.
        """
        paginator = self.client.get_paginator('list_multipart_uploads')
        cutoff = time.time() - age
        with _translated('listing multipart uploads'):
            for page in paginator.paginate(Bucket=self.bucket, Prefix=f'{self.prefix}blobs/'):
                for upload in page.get('Uploads', []):
                    if upload['Initiated'].timestamp() < cutoff:
                        yield upload['Key'], upload['UploadId']

    def abort_upload(self, key: str, upload_id: str) -> None:
        with _translated('aborting a multipart upload'):
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)

    def delete_key(self, key: str) -> None:
        with _translated('deleting an object'):
            self.client.delete_object(Bucket=self.bucket, Key=key)


class _Parts:
    """One multipart upload to a blob's final key: parts sent a few at a time, each with its checksum.

    ``send`` waits when :data:`_PARTS_IN_FLIGHT` are in flight (memory stays within that
    many parts); ``complete`` finishes it with ``If-None-Match: *`` (False: the blob was
    there already, and the upload is aborted); ``abort`` abandons it, whatever went up.
    """

    def __init__(self, store: S3Store, key: str, part_bytes: int = _PART_BYTES) -> None:
        self._store = store
        self._key = key
        self.part_bytes = part_bytes
        self._pool = concurrent.futures.ThreadPoolExecutor(_PARTS_IN_FLIGHT, thread_name_prefix='iss-s3-part')
        self._in_flight: list[concurrent.futures.Future] = []
        self._parts: list[dict[str, Any]] = []
        with _translated('starting a multipart upload'):
            self._upload_id = store.client.create_multipart_upload(
                Bucket=store.bucket, Key=key, ChecksumAlgorithm='SHA256', Metadata={'iss-copy': uuid.uuid4().hex}
            )['UploadId']

    def send(self, data: bytes) -> None:
        number = len(self._parts) + len(self._in_flight) + 1
        self._in_flight.append(self._pool.submit(self._send, number, data))
        if len(self._in_flight) >= _PARTS_IN_FLIGHT:
            self._parts.append(self._in_flight.pop(0).result())

    def _send(self, number: int, data: bytes) -> dict[str, Any]:
        checksum = base64.b64encode(hashlib.sha256(data).digest()).decode()
        with _translated('storing a part'):
            answer = self._store.client.upload_part(
                Bucket=self._store.bucket,
                Key=self._key,
                UploadId=self._upload_id,
                PartNumber=number,
                Body=data,
                ChecksumSHA256=checksum,
            )
        return {'PartNumber': number, 'ETag': answer['ETag'], 'ChecksumSHA256': checksum}

    def complete(self) -> bool:
        try:
            self._parts.extend(future.result() for future in self._in_flight)
            self._in_flight = []
            with _translated('completing a multipart upload'):
                try:
                    self._store.client.complete_multipart_upload(
                        Bucket=self._store.bucket,
                        Key=self._key,
                        UploadId=self._upload_id,
                        MultipartUpload={'Parts': self._parts},
                        IfNoneMatch='*',
                    )
                except botocore.exceptions.ClientError as exc:
                    if _code(exc) in _EXISTS:
                        self.abort()
                        return False
                    raise
        except BaseException:
            self.abort()
            raise
        finally:
            self._pool.shutdown(wait=False)
        return True

    def abort(self) -> None:
        for future in self._in_flight:
            future.cancel()
        self._pool.shutdown(wait=True)
        with contextlib.suppress(Exception):
            self._store.client.abort_multipart_upload(
                Bucket=self._store.bucket, Key=self._key, UploadId=self._upload_id
            )


class _PartsAsTheyArrive:
    """A PUT's bytes sent up while they arrive (:meth:`S3Store.stage` with the claimed digest).

    Fed each piece as the spool receives it; a part goes up once it is full, so the
    multipart upload starts only for a blob larger than one part.
    """

    def __init__(self, store: S3Store, hex_digest: str) -> None:
        self._store = store
        self._key = store.blob_key(hex_digest)
        self._buffer = bytearray()
        self._parts: _Parts | None = None

    @property
    def started(self) -> bool:
        return self._parts is not None

    def feed(self, piece: memoryview) -> None:
        self._buffer += piece
        if len(self._buffer) >= _PART_BYTES:
            if self._parts is None:
                self._parts = _Parts(self._store, self._key)
            # PERF: one copy out of the buffer (a bytearray's slice would be a second)
            self._parts.send(bytes(memoryview(self._buffer)[:_PART_BYTES]))
            del self._buffer[:_PART_BYTES]

    def complete(self) -> bool:
        assert self._parts is not None
        if self._buffer:
            self._parts.send(bytes(self._buffer))
            self._buffer = bytearray()
        return self._parts.complete()

    def abort(self) -> None:
        self._buffer = bytearray()
        if self._parts is not None:
            self._parts.abort()


class VerifiedObject:
    """A blob being read from the bucket, file-like (``read``, ``readinto``, ``seek``, ``close``).

    Read from its first byte to its last, the bytes are hashed as they pass, and
    the last read raises :class:`errors.CorruptBlob` (after quarantining the
    object) instead of returning when they do not hash to the name: a proxy or
    client never receives a complete wrong blob. A ``seek`` (a Range request)
    re-opens the object at that byte; what a range serves cannot be verified
    alone, and ``fsck`` re-hashes every blob.
    """

    def __init__(self, store: S3Store, hex_digest: str) -> None:
        self._store = store
        self._hex = hex_digest
        self._body = self._get(None)
        self._position = 0
        self._sha256: Any = hashlib.sha256()

    def _get(self, start: int | None) -> Any:
        answer = self._store.get_blob(self._hex, **({} if start is None else {'Range': f'bytes={start}-'}))
        if start is None:
            self.stat = _stat_of(answer)
        return answer['Body']

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        if whence != os.SEEK_SET:
            raise OSError('only absolute seeks')
        # NOTE: a part of the blob cannot be checked against its name.
        self._sha256 = None
        if offset != self._position:
            self._body.close()
            self._body = self._get(offset)
            self._position = offset
        return offset

    def tell(self) -> int:
        return self._position

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            chunks = []
            while chunk := self.read(_READ_BYTES):
                chunks.append(chunk)
            return b''.join(chunks)
        with _translated('reading a blob'):
            data = self._body.read(size)
        self._position += len(data)
        if self._sha256 is not None:
            self._sha256.update(data)
            if self._position >= self.stat.size or not data:
                self._verify()
        return data

    def readinto(self, buffer: memoryview) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def _verify(self) -> None:
        actual, self._sha256 = self._sha256.hexdigest(), None
        if self._position != self.stat.size:
            raise BucketUnavailable(f'sha256:{self._hex}: the bucket sent {self._position} of {self.stat.size} bytes')
        if actual != self._hex:
            self._store.quarantine(self._hex, f'its {self._position} bytes hash to {actual}')
            raise CorruptBlob(f'sha256:{self._hex}: the bucket answered bytes that hash to {actual}')

    def close(self) -> None:
        self._body.close()

    def __enter__(self) -> VerifiedObject:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _stat_of(answer: dict[str, Any]) -> BlobStat:
    """A blob's size and version from HeadObject or GetObject: the copy id ISS gave it, else ETag and time."""
    copy = answer.get('Metadata', {}).get('iss-copy')
    version = copy or f'{answer["ETag"].strip(chr(34))}-{answer["LastModified"].timestamp():.0f}'
    return BlobStat(answer['ContentLength'], version)


def _payload_hash_from_checksum(request: Any, **_: Any) -> None:
    """Sign a body by the SHA-256 ISS computed already (``x-amz-checksum-sha256``), not by hashing it again.

    PERF: over http:// botocore hashes every body for its signature; the checksum ISS
    sends is that same SHA-256 (the blob's name, or the part's), which the service
    verifies against the bytes: one pass of SHA-256 per byte less (~0.25 s of a core
    per 256 MiB).
    """
    checksum = request.headers.get('x-amz-checksum-sha256')
    if checksum and 'X-Amz-Content-SHA256' not in request.headers:
        request.headers['X-Amz-Content-SHA256'] = base64.b64decode(checksum).hex()


def _base64(hex_digest: str) -> str:
    return base64.b64encode(bytes.fromhex(hex_digest)).decode()


def _code(exc: botocore.exceptions.ClientError) -> str:
    error = exc.response.get('Error', {})
    return str(error.get('Code') or exc.response.get('ResponseMetadata', {}).get('HTTPStatusCode', ''))


@contextlib.contextmanager
def _translated(doing: str) -> Iterator[None]:
    """Raise the S3 service's trouble as BucketUnavailable (503), saying what was being done.

    Client errors the caller expects (absent key, failed condition) are looked at by
    the caller first, inside this block; whatever else S3 answers is the service's trouble.
    """
    try:
        yield
    except botocore.exceptions.ClientError as exc:
        raise BucketUnavailable(f'{doing}: {_code(exc)} {exc}') from exc
    except (botocore.exceptions.BotoCoreError, urllib3.exceptions.HTTPError, ConnectionError, TimeoutError) as exc:
        raise BucketUnavailable(f'{doing}: {exc}') from exc
