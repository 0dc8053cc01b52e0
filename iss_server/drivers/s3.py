"""The driver on an S3 bucket (boto3): each key an object under an optional prefix.

Every put is conditional and checked: ``If-None-Match: *`` (an object is never
overwritten; 412 means another writer stored it first) and
``x-amz-checksum-sha256`` (the service refuses bytes that do not hash to the
checksum: a blob's own name). Up to :data:`_SINGLE_PUT_BYTES` one PutObject;
larger objects a multipart upload, each part with its own checksum, the parts
re-hashed in order on the way out and completed only when they hash to the
checksum. Parts are invisible until completion; a failure aborts the upload,
and one left by a killed node is aborted by ``gc`` (:meth:`S3Driver.abandoned`)
or the bucket's lifecycle rule. Every S3 or network failure becomes
:class:`errors.BucketUnavailable` (503, ``Retry-After``).

Every call has a deadline, ``timeout`` (``ISS_S3_TIMEOUT``), its one retry included: each of
its two attempts may take about half (:meth:`S3Driver.attempt_timeout`), and the retry waits at
most a second. A call on a frozen service costs its request that, never
more, and at most half a worker's request threads wait on the bucket at once
(:data:`engines.BUCKET`). A request's calls to the bucket share one budget, ``timeout`` in all
(``engines.BUCKET.budget``): botocore's socket timeouts are the client's, not a call's, so an
attempt (a retry too) starts only if the request has a whole attempt's time left, and is refused,
as a 503, if not (:meth:`S3Driver._within_budget`).
"""

from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import hashlib
import logging
import mimetypes
import os
import threading
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from typing import IO, Any, cast

import boto3
import botocore.config
import botocore.exceptions
import urllib3.exceptions

from iss_server import engines
from iss_server.drivers import KeyNotFound, Source, Stat
from iss_server.errors import BucketUnavailable, CorruptBlob

log = logging.getLogger(__name__)

# PERF: one request up to this size (a request costs ~2-5 ms against SeaweedFS on loopback);
# beyond it, parts go up several at a time and a failure costs one part, not the whole.
_SINGLE_PUT_BYTES = 64 * 1024 * 1024
_PART_BYTES = 16 * 1024 * 1024
# NOTE: parts in flight per upload: memory stays within _PART_BYTES times this, whatever the size.
_PARTS_IN_FLIGHT = 4
_MAX_PARTS = 10_000

# NOTE: the answers of S3 that say a condition failed, or a key is absent.
_EXISTS = frozenset({'PreconditionFailed', '412', 'ConditionalRequestConflict', '409'})
_ABSENT = frozenset({'NoSuchKey', '404', 'NotFound'})
_NO_UPLOAD = frozenset({'NoSuchUpload', '404'})
_BUCKET_EXISTS = frozenset({'BucketAlreadyOwnedByYou', 'BucketAlreadyExists'})
#: Keys of resumable uploads (iss_server/bucket_sessions.py): their multipart uploads live as long as a session.
SESSIONS_PREFIX = 'uploads/'

# NOTE: two attempts in all (botocore's max_attempts would count retries only: three in all); standard
# mode waits a random 0-1 s before the first retry, which the deadline keeps room for.
_ATTEMPTS = 2
_RETRY_WAIT = 1.0
# NOTE: a PUT of a file waits up to 1 s for "100 Continue" before its bytes (botocore); a small one goes as bytes.
_CONTINUE_WAIT = 1.0
_BYTES_WITHOUT_CONTINUE = 64 * 1024

# NOTE: boto3 sessions are not thread-safe; clients made from one are (and are shared by threads).
_SESSION: tuple[int, Any] | None = None
_SESSION_LOCK = threading.Lock()


class S3Driver:
    """Objects in ``bucket`` under ``prefix`` (``''`` or ending in ``/``); see the module's docstring."""

    verify_reads = True
    part = BucketUnavailable.part

    def __init__(
        self,
        bucket: str,
        prefix: str = '',
        *,
        endpoint: str = '',
        region: str = 'us-east-1',
        access_key: str = '',
        secret_key: str = '',
        timeout: float = 15.0,
    ) -> None:
        self.bucket = bucket
        self.timeout = timeout
        self.prefix = prefix
        self.endpoint = endpoint
        self._service: dict[str, Any] = {  # NOTE: boto3's client() keywords
            'endpoint_url': endpoint or None,
            'region_name': region,
            'aws_access_key_id': access_key or None,
            'aws_secret_access_key': secret_key or None,
        }
        self._client: Any = None
        self._client_pid = 0
        self._client_lock = threading.Lock()

    def __repr__(self) -> str:
        return f's3://{self.bucket}/{self.prefix}'

    @property
    def client(self) -> Any:
        """This process's boto3 client (thread-safe; a forked child makes its own, never sharing sockets)."""
        if self._client_pid != os.getpid():
            with self._client_lock:
                if self._client_pid != os.getpid():
                    self._client = self._new_client()
                    self._client_pid = os.getpid()
        return self._client

    @property
    def attempt_timeout(self) -> float:
        """Seconds one attempt may take: to connect, or to be answered (a PUT's wait for "100 Continue" included)."""
        return max(1.0, (self.timeout - _RETRY_WAIT) / _ATTEMPTS)

    def _new_client(self) -> Any:
        config = botocore.config.Config(
            signature_version='s3v4',
            s3={'addressing_style': 'path'},
            # NOTE: client-side socket timeouts, so a frozen service is noticed too (see the docstring).
            connect_timeout=self.attempt_timeout,
            read_timeout=max(0.5, self.attempt_timeout - _CONTINUE_WAIT),
            retries={'total_max_attempts': _ATTEMPTS, 'mode': 'standard'},
            # NOTE: gunicorn's threads of a worker share the client and its pool.
            max_pool_connections=64,
            # PERF: ISS sends its own SHA-256 checksums; boto's default CRC32 of every body
            # would hash each upload a second time.
            request_checksum_calculation='when_required',
            response_checksum_validation='when_required',
            parameter_validation=False,  # PERF: ~2% of a small request's CPU (bench/s3_calls.py)
        )
        with _SESSION_LOCK:
            # PERF: one session per process: each new one reloads the S3 service model (~0.3 s).
            global _SESSION
            if _SESSION is None or _SESSION[0] != os.getpid():
                _SESSION = (os.getpid(), boto3.session.Session())
            session = _SESSION[1]
        client = session.client('s3', config=config, **self._service)
        for operation in ('PutObject', 'UploadPart'):
            client.meta.events.register(f'before-sign.s3.{operation}', _payload_hash_from_checksum)
        client.meta.events.register('before-send.s3', self._within_budget)
        return client

    def _within_budget(self, request: Any, **_: Any) -> None:
        """Refuse an attempt the request's budget cannot wait for (botocore's ``before-send``, each attempt's).

        NOTE: raised here, it ends the call without a retry (botocore retries only its own errors).
        """
        if engines.BUCKET.budget.left() < self.attempt_timeout:
            engines.BUCKET.on_refused(engines.BUCKET.engine)
            raise BucketUnavailable(f'{request.method} not sent: {engines.BUCKET.budget.refusal()}')

    # -- writing -------------------------------------------------------------

    @contextlib.contextmanager
    def group(self) -> Iterator[_S3Group]:
        yield _S3Group(self)

    def writer(self, key: str, sha256: str) -> _PartsAsTheyArrive:
        """Parts of a multipart upload sent while the bytes arrive: receiving and sending overlap."""
        return _PartsAsTheyArrive(self, key, sha256)

    def put(self, source: Source, key: str, *, replace: bool = False) -> bool:
        """Upload ``source`` under ``key`` unless an object is there (``replace``: anyway); True when stored."""
        if source.size > _SINGLE_PUT_BYTES:
            return self._put_multipart(source, key)
        condition = {} if replace else {'IfNoneMatch': '*'}
        content_type = mimetypes.guess_type(key)[0] or 'binary/octet-stream'
        with open(source.path, 'rb') as body:
            # PERF: a small body as bytes: a file's waits for "100 Continue" (a round trip more)
            data = body.read() if source.size <= _BYTES_WITHOUT_CONTINUE else body
            return self._put_object(key, data, source.size, source.sha256, ContentType=content_type, **condition)

    def _put_object(self, key: str, body: Any, size: int, sha256: str, **params: Any) -> bool:
        copy = uuid.uuid4().hex
        with _translated('storing an object'):
            try:
                self.client.put_object(
                    Bucket=self.bucket,
                    Key=self.prefix + key,
                    Body=body,
                    ContentLength=size,
                    ChecksumSHA256=base64.b64encode(bytes.fromhex(sha256)).decode(),
                    Metadata={'iss-copy': copy},
                    **params,
                )
            except botocore.exceptions.ClientError as exc:
                if _code(exc) in _EXISTS:
                    return self._landed_before_its_retry(exc, key, copy)
                raise
        return True

    def _landed_before_its_retry(self, exc: botocore.exceptions.ClientError, key: str, copy: str) -> bool:
        """Whether the object a conditional write's retry found is that write's own: True, it stored it.

        NOTE: an attempt that timed out may land after all, before its retry (a frozen service
        thawed): the retry then finds the object there (412). Its ``iss-copy`` says whose it is.
        """
        if not exc.response.get('ResponseMetadata', {}).get('RetryAttempts'):
            return False
        try:
            return self.stat(key).version == copy
        except KeyNotFound:
            return False

    def _put_multipart(self, source: Source, key: str) -> bool:
        """Send a spooled file up in parts, read in order; complete it only if they hash to its checksum."""
        parts = _Parts(self, key, max(_PART_BYTES, -(-source.size // _MAX_PARTS)))
        whole = hashlib.sha256()
        try:
            for offset in range(0, source.size, parts.part_bytes):
                with _translated('reading a staged upload'):
                    data = os.pread(source.fileno(), parts.part_bytes, offset)
                whole.update(data)
                parts.send(data)
            if whole.hexdigest() != source.sha256:
                # NOTE: the spooled file changed under us (a failing disk): never completed.
                raise CorruptBlob(f'the spooled bytes of {key} changed before they reached the bucket')
        except BaseException:
            parts.abort()
            raise
        return parts.complete()

    def write(self, key: str, data: bytes) -> None:
        """Store ``data`` under ``key``, replacing what is there (a resumable upload's own scratch objects)."""
        self._put_object(key, data, len(data), hashlib.sha256(data).hexdigest())

    # -- a multipart upload that outlives a request (a resumable upload's parts, sent by any node) --

    def start_parts(self, key: str) -> str:
        """Start a multipart upload to ``key``; its id, which any node may send parts of."""
        with _translated('starting a multipart upload'):
            answer = self.client.create_multipart_upload(
                Bucket=self.bucket, Key=self.prefix + key, ChecksumAlgorithm='SHA256'
            )
        return str(answer['UploadId'])

    def put_part(self, key: str, upload_id: str, number: int, data: bytes) -> dict[str, Any]:
        """Send part ``number`` (S3 keeps the last one sent under a number); what completing it needs.

        Raises:
            KeyNotFound: the upload was aborted.
        """
        checksum = base64.b64encode(hashlib.sha256(data).digest()).decode()
        with _translated('storing a part'):
            try:
                answer = self.client.upload_part(
                    Bucket=self.bucket,
                    Key=self.prefix + key,
                    UploadId=upload_id,
                    PartNumber=number,
                    Body=data,
                    ChecksumSHA256=checksum,
                )
            except botocore.exceptions.ClientError as exc:
                if _code(exc) in _NO_UPLOAD:
                    raise KeyNotFound(key) from None  # NOTE: aborted
                raise
        return {'PartNumber': number, 'ETag': answer['ETag'], 'ChecksumSHA256': checksum}

    def complete_parts(self, key: str, upload_id: str, parts: list[dict[str, Any]]) -> None:
        """Join ``parts`` (in order) into the object ``key``; done already (by a node killed after it) is done.

        Raises:
            KeyNotFound: the upload is gone and no object is there (aborted).
        """
        with _translated('completing a multipart upload'):
            try:
                self.client.complete_multipart_upload(
                    Bucket=self.bucket, Key=self.prefix + key, UploadId=upload_id, MultipartUpload={'Parts': parts}
                )
            except botocore.exceptions.ClientError as exc:
                if _code(exc) not in _NO_UPLOAD:
                    raise
                self.stat(key)  # NOTE: KeyNotFound unless an earlier completion made it

    def abort_parts(self, key: str, upload_id: str) -> None:
        """Abandon a multipart upload and its parts; one already gone is no error."""
        with _translated('aborting a multipart upload'):
            try:
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=self.prefix + key, UploadId=upload_id)
            except botocore.exceptions.ClientError as exc:
                if _code(exc) not in _NO_UPLOAD:
                    raise

    def multipart_uploads(self, prefix: str) -> Iterator[tuple[str, str, float]]:
        """The unfinished multipart uploads to keys under ``prefix``: key, upload id, time started."""
        paginator = self.client.get_paginator('list_multipart_uploads')
        with _translated('listing multipart uploads'):
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix + prefix):
                for upload in page.get('Uploads', []):
                    yield upload['Key'].removeprefix(self.prefix), upload['UploadId'], upload['Initiated'].timestamp()

    # -- reading -------------------------------------------------------------

    def _get(self, key: str, doing: str, **params: Any) -> dict[str, Any]:
        with _translated(doing):
            try:
                return self.client.get_object(Bucket=self.bucket, Key=self.prefix + key, **params)
            except botocore.exceptions.ClientError as exc:
                if _code(exc) in _ABSENT:
                    raise KeyNotFound(key) from None
                raise

    def read(self, key: str) -> bytes:
        body = self._get(key, 'reading an object')['Body']
        with contextlib.closing(body), _translated('reading an object'):
            return body.read()

    def open(self, key: str, offset: int = 0) -> tuple[IO[bytes], Stat]:
        answer = self._get(key, 'reading an object', **({'Range': f'bytes={offset}-'} if offset else {}))
        stat = _stat_of(answer)
        if offset:  # NOTE: a range's ContentLength is the range's
            stat = Stat(offset + stat.size, stat.version, stat.modified)
        # NOTE: read as a file (read, readinto, close) by everything that opens a blob.
        return cast(IO[bytes], _Body(answer['Body'])), stat

    def stat(self, key: str) -> Stat:
        with _translated('reading an object'):
            try:
                return _stat_of(self.client.head_object(Bucket=self.bucket, Key=self.prefix + key))
            except botocore.exceptions.ClientError as exc:
                if _code(exc) in _ABSENT:
                    raise KeyNotFound(key) from None
                raise

    def walk(self, prefix: str) -> Iterator[tuple[str, Stat]]:
        pages = iter(
            self.client.get_paginator('list_objects_v2').paginate(Bucket=self.bucket, Prefix=self.prefix + prefix)
        )
        while True:
            # NOTE: a page at a time: the caller's work between pages holds no place in the bulkhead.
            with _translated('listing the bucket'):
                page = next(pages, None)
            if page is None:
                return
            for entry in page.get('Contents', []):
                stat = Stat(entry['Size'], entry['ETag'].strip('"'), entry['LastModified'].timestamp())
                yield entry['Key'].removeprefix(self.prefix), stat

    # -- removing ------------------------------------------------------------

    def move(self, key: str, target: str) -> bool:
        with _translated('moving an object'):
            try:
                self.client.copy_object(
                    Bucket=self.bucket,
                    Key=self.prefix + target,
                    CopySource={'Bucket': self.bucket, 'Key': self.prefix + key},
                )
            except botocore.exceptions.ClientError as exc:
                if _code(exc) in _ABSENT:
                    return False
                raise
        return self.remove(key)

    def remove(self, key: str) -> bool:
        """Remove an object; True (S3 answers alike whether or not it was there)."""
        with _translated('removing an object'):
            self.client.delete_object(Bucket=self.bucket, Key=self.prefix + key)
        return True

    def abandoned(self, age: float, *, dry_run: bool = False) -> dict[str, int]:
        """Multipart uploads started more than ``age`` seconds ago: a node completes or aborts its own in minutes."""
        paginator = self.client.get_paginator('list_multipart_uploads')
        cutoff = time.time() - age
        count = 0
        with _translated('listing multipart uploads'):
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix):
                for upload in page.get('Uploads', []):
                    # NOTE: a resumable upload's parts live as long as its session, whose sweep ends them.
                    if upload['Key'].startswith(self.prefix + SESSIONS_PREFIX):
                        continue
                    if upload['Initiated'].timestamp() < cutoff:
                        count += 1
                        if not dry_run:
                            self.client.abort_multipart_upload(
                                Bucket=self.bucket, Key=upload['Key'], UploadId=upload['UploadId']
                            )
        return {'multipart_uploads': count}

    # -- serving -------------------------------------------------------------

    def redirect_url(self, key: str, *, seconds: int, overrides: dict[str, str]) -> str:
        """A presigned GET of the object, answering with the ``Response*`` headers of ``overrides``."""
        params = {'Bucket': self.bucket, 'Key': self.prefix + key, **overrides}
        with _translated('signing a URL'):
            return self.client.generate_presigned_url('get_object', Params=params, ExpiresIn=seconds)

    def proxy_path(self, key: str) -> str:
        """A presigned URL's path and query, for nginx's internal location proxying to the service.

        The location (``ISS_ACCEL_REDIRECT``, e.g. ``/_internal/s3/``) passes it on
        as it is: ``proxy_pass http://seaweedfs:8333/;``.
        """
        url = urllib.parse.urlsplit(self.redirect_url(key, seconds=300, overrides={}))
        return f'{url.path.lstrip("/")}?{url.query}'

    def location(self, key: str) -> str:
        return f's3://{self.bucket}/{self.prefix}{key}'

    def create(self) -> bool:
        """Create the bucket if it is missing (a fresh S3 service); True when this call did (and logged it).

        NOTE: asked first, so credentials that may not create buckets are not refused for one
        that is there; one that another node creates meanwhile is no failure.
        """
        with _translated('reaching the bucket'):
            try:
                self.client.head_bucket(Bucket=self.bucket)
                return False
            except botocore.exceptions.ClientError as exc:
                if _code(exc) not in _ABSENT:
                    raise
            try:
                self.client.create_bucket(Bucket=self.bucket)
            except botocore.exceptions.ClientError as exc:
                if _code(exc) in _BUCKET_EXISTS:
                    return False
                raise BucketUnavailable(
                    f'the bucket {self.bucket} does not exist, and these credentials may not create it '
                    f'({_code(exc)}): create it, or give ISS credentials that may (s3:CreateBucket)'
                ) from exc
        log.warning('created the bucket %s: it was missing', self.bucket)
        return True

    def check(self) -> None:
        """The bucket answers; one missing is created (see :meth:`create`), or the error says why it cannot be."""
        self.create()


class _S3Group:
    """No locks, no syncs: each put is durable, and conditional, when it returns."""

    def __init__(self, driver: S3Driver) -> None:
        self._driver = driver

    def hold(self, key: str, *, exclusive: bool = False, wait: bool = True) -> None:
        """None: a bucket has no locks (PERF: nor is it asked; the conditional put decides)."""
        return None

    def put(self, source: Source, key: str, *, replace: bool = False) -> bool:
        return self._driver.put(source, key, replace=replace)

    def sync(self) -> None:
        pass


class _Parts:
    """One multipart upload: parts sent a few at a time, each with its checksum.

    ``send`` waits when :data:`_PARTS_IN_FLIGHT` are in flight (memory stays within that
    many parts); ``complete`` finishes it with ``If-None-Match: *`` (False: the object was
    there already, and the upload is aborted); ``abort`` abandons it, whatever went up.
    """

    def __init__(self, driver: S3Driver, key: str, part_bytes: int = _PART_BYTES) -> None:
        self._driver = driver
        self._name = key
        self._key = driver.prefix + key
        self._copy = uuid.uuid4().hex
        self.part_bytes = part_bytes
        self._pool = concurrent.futures.ThreadPoolExecutor(_PARTS_IN_FLIGHT, thread_name_prefix='iss-s3-part')
        self._in_flight: list[concurrent.futures.Future] = []
        self._parts: list[dict[str, Any]] = []
        with _translated('starting a multipart upload'):
            self._upload_id = driver.client.create_multipart_upload(
                Bucket=driver.bucket, Key=self._key, ChecksumAlgorithm='SHA256', Metadata={'iss-copy': self._copy}
            )['UploadId']

    def send(self, data: bytes) -> None:
        number = len(self._parts) + len(self._in_flight) + 1
        self._in_flight.append(self._pool.submit(self._send, number, data))
        if len(self._in_flight) >= _PARTS_IN_FLIGHT:
            with _translated('storing a part'):  # NOTE: this request's thread waits on the bucket
                self._parts.append(self._in_flight.pop(0).result())

    def _send(self, number: int, data: bytes) -> dict[str, Any]:
        checksum = base64.b64encode(hashlib.sha256(data).digest()).decode()
        # NOTE: outside the bulkhead: this upload's own threads, as many as _PARTS_IN_FLIGHT, are
        # not the worker's; the request's thread holds the place while it waits for them.
        with _translated('storing a part', guarded=False):
            answer = self._driver.client.upload_part(
                Bucket=self._driver.bucket,
                Key=self._key,
                UploadId=self._upload_id,
                PartNumber=number,
                Body=data,
                ChecksumSHA256=checksum,
            )
        return {'PartNumber': number, 'ETag': answer['ETag'], 'ChecksumSHA256': checksum}

    def complete(self) -> bool:
        try:
            with _translated('storing a part'):
                self._parts.extend(future.result() for future in self._in_flight)
            self._in_flight = []
            with _translated('completing a multipart upload'):
                try:
                    self._driver.client.complete_multipart_upload(
                        Bucket=self._driver.bucket,
                        Key=self._key,
                        UploadId=self._upload_id,
                        MultipartUpload={'Parts': self._parts},
                        IfNoneMatch='*',
                    )
                except botocore.exceptions.ClientError as exc:
                    if _code(exc) not in _EXISTS:
                        raise
                    if self._driver._landed_before_its_retry(exc, self._name, self._copy):
                        return True
                    self.abort()
                    return False
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
            self._driver.client.abort_multipart_upload(
                Bucket=self._driver.bucket, Key=self._key, UploadId=self._upload_id
            )


class _PartsAsTheyArrive:
    """A :class:`drivers.Writer`: bytes sent up while they arrive, in parts once there is more than one.

    A part goes up once it is full, so the multipart upload starts only for an object
    larger than one part; a smaller one goes up whole, in one PutObject, at :meth:`commit`.
    """

    def __init__(self, driver: S3Driver, key: str, sha256: str) -> None:
        self._driver = driver
        self._key = key
        self._sha256 = sha256
        self._buffer = bytearray()
        self._parts: _Parts | None = None

    def write(self, piece: memoryview) -> None:
        self._buffer += piece
        if len(self._buffer) >= _PART_BYTES:
            if self._parts is None:
                self._parts = _Parts(self._driver, self._key)
            # PERF: one copy out of the buffer (a bytearray's slice would be a second)
            self._parts.send(bytes(memoryview(self._buffer)[:_PART_BYTES]))
            del self._buffer[:_PART_BYTES]

    def commit(self) -> bool:
        buffer, self._buffer = self._buffer, bytearray()
        if self._parts is None:
            if hashlib.sha256(buffer).hexdigest() != self._sha256:
                raise CorruptBlob(f'the bytes written to {self._key} do not hash to {self._sha256}')
            return self._driver._put_object(self._key, bytes(buffer), len(buffer), self._sha256, IfNoneMatch='*')
        if buffer:
            self._parts.send(bytes(buffer))
        return self._parts.complete()

    def cancel(self) -> None:
        self._buffer = bytearray()
        if self._parts is not None:
            parts, self._parts = self._parts, None
            parts.abort()


class _Body:
    """A GetObject body as a file-like reader (``read``, ``readinto``, ``close``), its errors the bucket's."""

    def __init__(self, body: Any) -> None:
        self._body = body

    def read(self, size: int = -1) -> bytes:
        with _translated('reading an object'):
            return self._body.read(None if size < 0 else size)

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self._body.close()

    def __enter__(self) -> _Body:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _stat_of(answer: dict[str, Any]) -> Stat:
    """An object's stat from HeadObject or GetObject: the copy id ISS gave it, else its ETag and time."""
    modified = answer['LastModified'].timestamp()
    copy = answer.get('Metadata', {}).get('iss-copy')
    version = copy or f'{answer["ETag"].strip(chr(34))}-{modified:.0f}'
    return Stat(answer['ContentLength'], version, modified)


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


def _code(exc: botocore.exceptions.ClientError) -> str:
    error = exc.response.get('Error', {})
    return str(error.get('Code') or exc.response.get('ResponseMetadata', {}).get('HTTPStatusCode', ''))


@contextlib.contextmanager
def _translated(doing: str, *, guarded: bool = True) -> Iterator[None]:
    """Raise the S3 service's trouble as BucketUnavailable (503), saying what was being done.

    Client errors the caller expects (absent key, failed condition) are looked at by
    the caller first, inside this block; whatever else S3 answers is the service's trouble.
    ``guarded``: the block holds a place in :data:`engines.BUCKET` (refused at once when full).
    """
    try:
        with engines.BUCKET.call() if guarded else contextlib.nullcontext():
            yield
    except botocore.exceptions.ClientError as exc:
        raise BucketUnavailable(f'{doing}: {_code(exc)} {exc}') from exc
    except (botocore.exceptions.BotoCoreError, urllib3.exceptions.HTTPError, ConnectionError, TimeoutError) as exc:
        raise BucketUnavailable(f'{doing}: {exc}') from exc
