"""The ISS client for pipelines: a library (:class:`Client`) and the ``iss-client`` command.

Standard library only (``http.client``, ``hashlib``, threads), so it installs on any machine
with Python 3.11 and nothing of the server: ``pip install /path/to/iss`` gives both.

    from iss_client import Client

    iss = Client('http://127.0.0.1:8000', token='...')
    stored = iss.put('frame.jpg')                   # hashed here first; not sent if stored
    iss.put(b'weights', kind='model', meta={'epoch': 3})
    iss.get(stored.id, 'copy.jpg')                  # verified against its id while it arrives
    for item in iss.list('artifacts', kind='model'):
        print(item['id'], item['bytes'])

Every upload is a ``PUT`` under the id computed here, so the server verifies the bytes; a
download is hashed as it arrives and resumed with ``Range`` when the connection breaks.
Connection errors, 503 and 507 are retried with backoff; every other error raises
:class:`ISSError` carrying the server's JSON error.

The command (``iss-client --help``): ``push``, ``pull``, ``ls``, ``meta``, ``rm``, ``stats``.
Exit codes: 0 all done, 1 some items failed (each named on stderr), 2 usage or no server.
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import contextlib
import dataclasses
import hashlib
import http.client
import io
import json
import os
import pathlib
import random
import shutil
import stat
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import IO, Any

__all__ = ['Client', 'ISSError', 'IntegrityError', 'Stored', 'main']

OK, SOME_FAILED, USAGE = 0, 1, 2

_CHUNK = 1024 * 1024
# NOTE: the server takes at most 10,000 ids per /blobs/missing.
_MISSING_BATCH = 1000
# PERF: push sends files up to this size in batches (one request, one group commit on the
# server) of at most _BATCH_FILES files and _BATCH_BYTES bytes.
_BATCH_FILE_BYTES = 256 * 1024
_BATCH_FILES = 100
_BATCH_BYTES = 8 * 1024 * 1024
# PERF: a file this large is sent while it is hashed (Client._put_while_hashing), in pieces
# between which the upload can be stopped.
_SEND_WHILE_HASHING_BYTES = 32 * 1024 * 1024
_SEND_PIECE = 8 * 1024 * 1024
# NOTE: push sends a file this large over tus (Client.put_resumable), in chunks of
# _RESUMABLE_CHUNK_BYTES: a broken connection costs at most a chunk, and a proxy that caps
# a request's body (100 MB at Cloudflare) lets every chunk through.
_RESUMABLE_BYTES = 256 * 1024 * 1024
_RESUMABLE_CHUNK_BYTES = 64 * 1024 * 1024
_TUS = {'Tus-Resumable': '1.0.0'}


class ISSError(Exception):
    """The server refused a request; ``status``, ``title`` and ``description`` are its JSON error's."""

    def __init__(self, status: int, title: str, description: str) -> None:
        super().__init__(f'{status} {title}: {description}' if description else f'{status} {title}')
        self.status = status
        self.title = title
        self.description = description


class IntegrityError(ISSError):
    """The bytes received do not hash to the id asked for: nothing was kept."""


class Unreachable(ISSError):
    """The server could not be reached, after every retry."""


@dataclasses.dataclass(frozen=True)
class Stored:
    """What :meth:`Client.put` did: the blob's ``id``, whether it is ``new``, and whether bytes were ``sent``."""

    id: str
    new: bool
    sent: bool
    bytes: int
    meta: dict[str, Any]


class Client:
    """A connection to one ISS; safe to share between threads (each thread gets its own connection).

    Args:
        url: ``http://host:port`` (a path prefix is kept, for ISS behind a proxy path).
        token: the bearer token, sent with every request (upload, admin or read token).
        timeout: seconds a request may go without a byte.
        retries: attempts after the first, on connection errors, 503 and 507.
    """

    def __init__(self, url: str, token: str | None = None, *, timeout: float = 60, retries: int = 5) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ('http', 'https') or not parts.hostname:
            raise ValueError(f'{url!r} is not an http:// or https:// URL')
        self._scheme = parts.scheme
        self._netloc = parts.netloc
        self._prefix = parts.path.rstrip('/')
        self._token = token
        self._timeout = timeout
        self._retries = retries
        self._local = threading.local()

    # -- the calls -------------------------------------------------------------------

    def put(
        self,
        source: str | os.PathLike | bytes | IO[bytes],
        *,
        kind: str | None = None,
        meta: dict[str, Any] | None = None,
        filename: str | None = None,
        digest: str | None = None,
    ) -> Stored:
        """Store a file, bytes or a binary stream: as an image, or as an artifact of ``kind``.

        The sha256 is computed here first; when the server has the blob already, nothing is
        sent. ``filename`` defaults to a path's base name. Pass ``digest`` when it is known
        (``push`` does) to skip hashing and the question. A large file is sent while it is
        hashed (see :meth:`_put_while_hashing`), and the upload stopped if the server turns
        out to have it.
        """
        with _opened(source) as (file, size, name):
            query: dict[str, str] = {}
            if kind is not None:
                query['kind'] = kind
            if meta:
                query['meta'] = json.dumps(meta, separators=(',', ':'))
            if filename or name:
                query['filename'] = filename or name
            door = 'images' if kind is None else 'artifacts'
            blob_id = digest
            if blob_id is None:
                if size >= _SEND_WHILE_HASHING_BYTES and _sendable_file(file) and self._scheme == 'http':
                    return self._put_while_hashing(file, size, door, query)
                blob_id = 'sha256:' + _hash_stream(file)
                if not self.missing([blob_id]):
                    return Stored(blob_id, new=False, sent=False, bytes=size, meta=self.meta(blob_id))
            return self._put_by_id(file, size, blob_id, door, query)

    def _put_by_id(self, file: IO[bytes], size: int, blob_id: str, door: str, query: dict[str, str]) -> Stored:
        """``PUT /{door}/{id}``: the server verifies the bytes against the id as they stream."""
        path = f'/{door}/{blob_id}' + (f'?{urllib.parse.urlencode(query)}' if query else '')
        # PERF: a small body goes in the same send(2) as the headers; sent after them,
        # Nagle's algorithm holds it until the headers are acknowledged.
        content: bytes | IO[bytes] = file.read() if size <= _CHUNK else file
        status, _, body = self._call('PUT', path, body=content, length=size)
        return Stored(blob_id, new=status == 201, sent=True, bytes=size, meta=json.loads(body))

    def _put_while_hashing(self, file: IO[bytes], size: int, door: str, query: dict[str, str]) -> Stored:
        """Send a large file by POST while another thread hashes it and asks whether it is stored.

        PERF: hashing first puts the whole read (0.4 s for 512 MiB) before the first byte
        is sent. Here the hash is done long before the upload, and then answers two things:
        if the server has the blob, the upload is cut off (the server keeps nothing of a
        body cut short) and nothing more is sent; if not, the id the server answers must be
        this one. An upload that fails on the way is sent again as a verified PUT.
        """
        start = file.tell()
        known: dict[str, Any] = {}
        stored = threading.Event()

        hasher = threading.Thread(
            target=self._hash_and_ask,
            args=(file.fileno(), start, size, known, stored),
            name='iss-client-hash',
            daemon=True,
        )
        hasher.start()
        try:
            answer = self._post_file(file, start, size, door, query, stored)
        except (OSError, http.client.HTTPException, _Retry):
            answer = None  # NOTE: sent again below, by id, with the retries of _call
        finally:
            hasher.join()
        if 'error' in known:
            raise known['error']
        blob_id = known['id']
        if answer is None and stored.is_set():
            return Stored(blob_id, new=False, sent=False, bytes=size, meta=self.meta(blob_id))
        if answer is None:
            file.seek(start)
            return self._put_by_id(file, size, blob_id, door, query)
        status, body = answer
        if body.get(f'{door[:-1]}_id') != blob_id:
            raise IntegrityError(502, 'Wrong id', f'the server stored {body.get(f"{door[:-1]}_id")} for {blob_id}')
        return Stored(blob_id, new=status == 201, sent=True, bytes=size, meta=body)

    def _post_file(
        self, file: IO[bytes], start: int, size: int, door: str, query: dict[str, str], stop: threading.Event
    ) -> tuple[int, dict[str, Any]] | None:
        """One POST of the file by sendfile(2), in pieces; None when ``stop`` cut it off.

        PERF: the raw body, as a PUT's, when the door takes it (an artifact, or an image whose
        first bytes say its type): the server reads it straight into the store, where a
        multipart form costs it a search for the boundary and one more copy of every byte.
        """
        head = tail = b''
        content_type = _image_type(os.pread(file.fileno(), 12, start)) if door == 'images' else None
        if door == 'images' and content_type is None:
            boundary = 'iss-client-' + os.urandom(12).hex()
            name = query.get('filename', 'file').replace('"', '%22').replace('\r', '').replace('\n', '')
            head = (
                f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
                f'Content-Type: application/octet-stream\r\n\r\n'
            ).encode()
            tail = f'\r\n--{boundary}--\r\n'.encode()
            content_type = f'multipart/form-data; boundary={boundary}'
        connection = self._connection()
        try:
            path = f'/{door}' + (f'?{urllib.parse.urlencode(query)}' if query else '')
            connection.putrequest('POST', self._prefix + path, skip_accept_encoding=True)
            if content_type is not None:
                connection.putheader('Content-Type', content_type)
            connection.putheader('Content-Length', str(len(head) + size + len(tail)))
            if self._token:
                connection.putheader('Authorization', f'Bearer {self._token}')
            connection.endheaders(head)
            sent = 0
            while sent < size:
                if stop.is_set():
                    self._drop_connection()  # NOTE: the server discards a body cut short
                    return None
                sent += connection.sock.sendfile(file, start + sent, min(_SEND_PIECE, size - sent))
            if tail:
                connection.sock.sendall(tail)
            response = connection.getresponse()
            body = response.read()
        except BaseException:
            self._drop_connection()
            raise
        if response.will_close:
            self._drop_connection()
        _raise_for(response, body)
        return response.status, json.loads(body)

    def put_resumable(
        self,
        path: str | os.PathLike,
        *,
        kind: str | None = None,
        meta: dict[str, Any] | None = None,
        filename: str | None = None,
        digest: str | None = None,
        chunk_bytes: int | None = None,
    ) -> Stored:
        """Store a file over tus (``/uploads``): in chunks, resumed where the server has it after a failure.

        A connection that breaks, a 503 or a 409 (another request moved the upload on) is
        followed by a HEAD for the offset and the rest of the file from there, within the
        retries; a later call for the same file (path, size and mtime unchanged) on the same
        server resumes the upload an earlier, interrupted run left (its URL is kept under
        ``$XDG_CACHE_HOME/iss-client/uploads/``). The file is hashed meanwhile in another
        thread: if the server has it already the upload stops and is terminated; otherwise
        the id the server committed must be this one. With ``digest`` known, the server
        checks it too (metadata ``sha256``). Chunks are ``chunk_bytes`` (default 64 MiB).
        """
        path = os.fspath(path)
        chunk_bytes = chunk_bytes or _RESUMABLE_CHUNK_BYTES
        info = os.stat(path)
        fields = {'kind': kind or 'image', 'filename': filename or os.path.basename(path)}
        if meta:
            fields['meta'] = json.dumps(meta, separators=(',', ':'))
        if digest:
            fields['sha256'] = digest
        record = _ResumeRecord(f'{self._scheme}://{self._netloc}{self._prefix}', path, info)
        location = record.load()
        offset = self._upload_offset(location) if location else None
        if offset is None:
            location, offset = self._create_upload(info.st_size, fields)
            record.save(location)
        known: dict[str, Any] = {}
        stored = threading.Event()
        with open(path, 'rb') as file:
            hasher = threading.Thread(
                target=self._hash_and_ask,
                args=(file.fileno(), 0, info.st_size, known, stored),
                name='iss-client-hash',
                daemon=True,
            )
            hasher.start()
            try:
                headers = self._send_chunks(location, file, info.st_size, offset, chunk_bytes, stored)
            finally:
                hasher.join()
        if 'error' in known:
            raise known['error']
        blob_id = known['id']
        record.clear()
        if headers is None:  # NOTE: the server has these bytes: stopped, and nothing kept
            with contextlib.suppress(ISSError):
                self._call('DELETE', location, headers=_TUS)
            return Stored(blob_id, new=False, sent=False, bytes=info.st_size, meta=self.meta(blob_id))
        if headers['ISS-Blob-Id'] != blob_id:
            raise IntegrityError(502, 'Wrong id', f'the server stored {headers["ISS-Blob-Id"]} for {blob_id}')
        new = headers['ISS-Blob-Status'] == '201'
        return Stored(blob_id, new=new, sent=True, bytes=info.st_size, meta=self.meta(blob_id))

    def _create_upload(self, size: int, fields: dict[str, str]) -> tuple[str, int]:
        """``POST /uploads``: the new session's path, and its offset (0)."""
        metadata = ','.join(f'{key} {base64.b64encode(value.encode()).decode()}' for key, value in fields.items())
        _, headers, _ = self._call(
            'POST', '/uploads', headers={**_TUS, 'Upload-Length': str(size), 'Upload-Metadata': metadata}
        )
        location = urllib.parse.urlsplit(headers['Location']).path.removeprefix(self._prefix)
        return location, int(headers['Upload-Offset'])

    def _upload_offset(self, location: str) -> int | None:
        """Where the server has the session (HEAD), or None when it has no such session any more."""
        try:
            _, headers, _ = self._call('HEAD', location, headers=_TUS)
        except ISSError as exc:
            if exc.status in (404, 410):
                return None
            raise
        return int(headers['Upload-Offset'])

    def _send_chunks(
        self, location: str, file: IO[bytes], size: int, offset: int, chunk_bytes: int, stop: threading.Event
    ) -> http.client.HTTPMessage | None:
        """PATCH the file from ``offset`` to its end; the last answer's headers, or None when ``stop`` was set."""
        attempt = 0
        headers = http.client.HTTPMessage()
        while 'ISS-Blob-Id' not in headers:
            if stop.is_set():
                return None
            if offset == size:  # NOTE: committed already (an empty file, or a lost last answer)
                headers = self._call('HEAD', location, headers=_TUS)[1]
                if 'ISS-Blob-Id' not in headers:
                    raise ISSError(502, 'Upload not committed', f'{location} has every byte and no blob')
                break
            length = min(chunk_bytes, size - offset)
            file.seek(offset)
            try:
                chunk = {**_TUS, 'Upload-Offset': str(offset), 'Content-Type': 'application/offset+octet-stream'}
                with self._response('PATCH', location, body=file, length=length, headers=chunk) as response:
                    response.read()
                    headers = response.headers
                offset = int(headers['Upload-Offset'])
            except (OSError, http.client.HTTPException, _Retry, ISSError) as exc:
                if isinstance(exc, ISSError) and exc.status != 409:
                    raise
                attempt = self._backoff(attempt, exc)
                offset = self._upload_offset(location)
                if offset is None:
                    raise ISSError(404, 'Upload not found', f'the server lost the upload at {location}') from exc
        return headers

    def _hash_and_ask(self, fd: int, start: int, size: int, known: dict[str, Any], stored: threading.Event) -> None:
        """Hash ``size`` bytes of ``fd`` from ``start`` into ``known['id']`` and set ``stored`` if the server has them.

        Run in a thread beside an upload of the same bytes (by ``pread``: the upload's file
        position is its own); what goes wrong is kept as ``known['error']``.
        """
        try:
            sha256 = hashlib.sha256()
            offset = start
            while offset < start + size and (chunk := os.pread(fd, _CHUNK, offset)):
                sha256.update(chunk)
                offset += len(chunk)
            known['id'] = 'sha256:' + sha256.hexdigest()
            if not self.missing([known['id']]):
                stored.set()
        except Exception as exc:
            known['error'] = exc

    def put_many(
        self,
        files: Sequence[tuple[bytes, str | None]],
        *,
        kind: str | None = None,
        meta: dict[str, Any] | None = None,
    ) -> list[Stored | ISSError]:
        """Store several small files in one request (a batch: one group commit on the server).

        ``files`` are ``(content, filename)`` pairs, all of them held in memory: for small
        files. Returns, in order, each file's :class:`Stored` or the error it alone got
        (say, 415 for one that is not an image); an error of the whole request raises.
        """
        boundary = 'iss-client-' + os.urandom(12).hex()
        parts = []
        for content, filename in files:
            name = (filename or 'file').replace('"', '%22').replace('\r', '').replace('\n', '')
            parts.append(
                f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
                f'Content-Type: application/octet-stream\r\n\r\n'.encode()
            )
            parts += (content, b'\r\n')
        parts.append(f'--{boundary}--\r\n'.encode())
        query: dict[str, str] = {}
        if kind is not None:
            query['kind'] = kind
        if meta:
            query['meta'] = json.dumps(meta, separators=(',', ':'))
        door = 'images' if kind is None else 'artifacts'
        path = f'/{door}' + (f'?{urllib.parse.urlencode(query)}' if query else '')
        _, _, body = self._call(
            'POST', path, body=b''.join(parts), content_type=f'multipart/form-data; boundary={boundary}'
        )
        answers = json.loads(body)
        answers = answers if isinstance(answers, list) else [answers]  # NOTE: one file is answered alone
        outcomes: list[Stored | ISSError] = []
        for (content, _), answer in zip(files, answers, strict=True):
            status = answer.get('status', 201 if answer.get('created') else 200)
            if status >= 400:
                outcomes.append(ISSError(status, str(answer.get('title', '')), str(answer.get('description', ''))))
                continue
            blob_id = answer['image_id' if kind is None else 'artifact_id']
            expected = 'sha256:' + hashlib.sha256(content).hexdigest()
            if blob_id != expected:
                outcomes.append(IntegrityError(502, 'Wrong id', f'the server stored {blob_id} for {expected}'))
                continue
            outcomes.append(Stored(blob_id, new=status == 201, sent=True, bytes=len(content), meta=answer))
        return outcomes

    def get(self, blob_id: str, destination: str | os.PathLike | IO[bytes]) -> int:
        """Download a blob to a path (written whole or not at all) or a writable stream; return its size.

        The bytes are hashed as they arrive; a broken connection is resumed with ``Range``.

        Raises:
            IntegrityError: the bytes do not hash to ``blob_id`` (a path is then not written).
        """
        if isinstance(destination, (str, os.PathLike)):
            target = pathlib.Path(destination)
            target.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=target.parent, prefix=f'.{target.name}.', delete=False) as temp:
                try:
                    size = self._download(blob_id, temp)
                    temp.flush()
                    os.fsync(temp.fileno())
                except BaseException:
                    os.unlink(temp.name)
                    raise
            os.replace(temp.name, target)
            return size
        return self._download(blob_id, destination)

    def meta(self, blob_id: str) -> dict[str, Any]:
        return json.loads(self._call('GET', f'/artifacts/{blob_id}/meta')[2])

    def missing(self, blob_ids: Sequence[str]) -> list[str]:
        """The ids the server does not have, in the order given (asked in batches)."""
        missing: list[str] = []
        for start in range(0, len(blob_ids), _MISSING_BATCH):
            body = json.dumps({'ids': list(blob_ids[start : start + _MISSING_BATCH])}).encode()
            missing += json.loads(self._call('POST', '/blobs/missing', body=body, content_type='application/json')[2])[
                'missing'
            ]
        return missing

    def list(self, collection: str = 'artifacts', **filters: Any) -> Iterator[dict[str, Any]]:
        """Every item of ``/images`` or ``/artifacts`` (newest first), following the pages' ``next``."""
        if collection not in ('images', 'artifacts'):
            raise ValueError('collection is "images" or "artifacts"')
        query = {key: value for key, value in filters.items() if value is not None}
        path: str | None = f'/{collection}' + (f'?{urllib.parse.urlencode(query)}' if query else '')
        while path is not None:
            page = json.loads(self._call('GET', path)[2])
            yield from page['items']
            path = page['next']

    def delete(self, blob_id: str) -> None:
        self._call('DELETE', f'/artifacts/{blob_id}')

    def stats(self) -> dict[str, Any]:
        return json.loads(self._call('GET', '/stats')[2])

    # -- the wire ----------------------------------------------------------------------

    def _download(self, blob_id: str, out: IO[bytes]) -> int:
        sha256 = hashlib.sha256()
        received = 0
        attempt = 0
        while True:
            headers = {}
            if received:
                # NOTE: If-Range: if the stored copy were another, the whole is sent again.
                headers = {'Range': f'bytes={received}-', 'If-Range': f'"{blob_id}"'}
            try:
                with self._response('GET', f'/artifacts/{blob_id}', headers=headers) as response:
                    if received and response.status == 200:
                        sha256, received = hashlib.sha256(), 0
                        out.seek(0)
                        out.truncate()
                    while chunk := response.read(_CHUNK):
                        sha256.update(chunk)
                        out.write(chunk)
                        received += len(chunk)
                    if response.length:  # NOTE: http.client leaves what was not read
                        raise http.client.IncompleteRead(b'', response.length)
                break
            except (OSError, http.client.HTTPException, _Retry) as exc:
                attempt = self._backoff(attempt, exc)
        if 'sha256:' + sha256.hexdigest() != blob_id:
            raise IntegrityError(0, 'Integrity error', f'the bytes received hash to sha256:{sha256.hexdigest()}')
        return received

    def _call(
        self,
        method: str,
        path: str,
        *,
        body: bytes | IO[bytes] | None = None,
        length: int | None = None,
        content_type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, http.client.HTTPMessage, bytes]:
        """One request, retried as the class says; the status, headers and whole body of a success."""
        headers = {**(headers or {}), **({'Content-Type': content_type} if content_type else {})}
        attempt = 0
        while True:
            start = body.tell() if body is not None and not isinstance(body, bytes) else 0
            try:
                with self._response(method, path, body=body, length=length, headers=headers) as response:
                    return response.status, response.headers, response.read()
            except (OSError, http.client.HTTPException, _Retry) as exc:
                attempt = self._backoff(attempt, exc)
                if body is not None and not isinstance(body, bytes):
                    body.seek(start)

    @contextlib.contextmanager
    def _response(
        self,
        method: str,
        path: str,
        *,
        body: bytes | IO[bytes] | None = None,
        length: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> Iterator[http.client.HTTPResponse]:
        """A 2xx or 304 response; other statuses raise (503 and 507 as retryable)."""
        headers = dict(headers or {})
        if self._token:
            headers['Authorization'] = f'Bearer {self._token}'
        if body is not None:
            headers['Content-Length'] = str(len(body) if isinstance(body, bytes) else length)
        connection = self._connection()
        try:
            if _sendable_file(body) and self._scheme == 'http':
                # PERF: a file body goes out with sendfile(2), never through Python's buffers
                # (512 MiB: 1.71 s through http.client's reads, against curl -T's 1.44 s).
                connection.putrequest(method, self._prefix + path, skip_accept_encoding=True)
                for name, value in headers.items():
                    connection.putheader(name, value)
                connection.endheaders()
                connection.sock.sendfile(body, body.tell(), length)
            else:
                connection.request(method, self._prefix + path, body=body, headers=headers)
            response = connection.getresponse()
        except BaseException:
            self._drop_connection()
            raise
        try:
            _raise_for(response)
            yield response
        except BaseException:
            self._drop_connection()
            raise
        if response.will_close or not response.isclosed():
            self._drop_connection()

    def _backoff(self, attempt: int, exc: Exception) -> int:
        """Sleep before try ``attempt + 1``, or raise when there are no tries left."""
        if attempt >= self._retries:
            if isinstance(exc, _Retry):
                raise exc.error from None
            raise Unreachable(0, 'Unreachable', f'{self._netloc}: {exc or type(exc).__name__}') from exc
        delay = min(10.0, 0.25 * 2**attempt) * random.uniform(0.5, 1.0)
        if isinstance(exc, _Retry) and exc.retry_after is not None:
            delay = max(delay, exc.retry_after)
        time.sleep(delay)
        return attempt + 1

    def _connection(self) -> http.client.HTTPConnection:
        connection = getattr(self._local, 'connection', None)
        if connection is None:
            cls = http.client.HTTPSConnection if self._scheme == 'https' else http.client.HTTPConnection
            # PERF: http.client sends a file body in blocks of 8 KiB unless told otherwise.
            connection = self._local.connection = cls(self._netloc, timeout=self._timeout, blocksize=_CHUNK)
        return connection

    def _drop_connection(self) -> None:
        connection = getattr(self._local, 'connection', None)
        if connection is not None:
            connection.close()
            self._local.connection = None


class _ResumeRecord:
    """Where an interrupted resumable upload of one file to one server can be resumed: its URL, kept on disk.

    Keyed by the server, the file's absolute path, size and mtime: a file that changed
    starts afresh. Under ``$XDG_CACHE_HOME/iss-client/uploads/`` (default ``~/.cache``).
    """

    def __init__(self, server: str, path: str, info: os.stat_result) -> None:
        key = f'{server}\0{os.path.abspath(path)}\0{info.st_size}\0{info.st_mtime_ns}'
        cache = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
        self.path = os.path.join(cache, 'iss-client', 'uploads', hashlib.sha256(key.encode()).hexdigest() + '.json')

    def load(self) -> str | None:
        try:
            with open(self.path) as file:
                return json.load(file)['location']
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def save(self, location: str) -> None:
        with contextlib.suppress(OSError):  # NOTE: without a record the upload still works, only not across runs
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            with open(self.path, 'w') as file:
                json.dump({'location': location}, file)

    def clear(self) -> None:
        with contextlib.suppress(OSError):
            os.unlink(self.path)


def _sendable_file(body: object) -> bool:
    """True for a regular file that sendfile(2) can send from."""
    try:
        return stat.S_ISREG(os.fstat(body.fileno()).st_mode)  # type: ignore[union-attr]
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return False


class _Retry(Exception):
    """A 503 or 507: worth trying again, after ``Retry-After`` if the server said."""

    def __init__(self, error: ISSError, retry_after: str | None) -> None:
        super().__init__(str(error))
        self.error = error
        self.retry_after = float(retry_after) if retry_after and retry_after.isdigit() else None


# NOTE: enough to send an image as a raw body (image/*); the server types it by its bytes anyway.
_IMAGE_SIGNATURES = (
    (b'\x89PNG\r\n\x1a\n', 'image/png'),
    (b'\xff\xd8\xff', 'image/jpeg'),
    (b'GIF87a', 'image/gif'),
    (b'GIF89a', 'image/gif'),
    (b'II*\x00', 'image/tiff'),
    (b'MM\x00*', 'image/tiff'),
    (b'BM', 'image/bmp'),
)


def _image_type(start: bytes) -> str | None:
    """The image type the first bytes of a file announce, or None."""
    if start[:4] == b'RIFF' and start[8:12] == b'WEBP':
        return 'image/webp'
    return next((media_type for signature, media_type in _IMAGE_SIGNATURES if start.startswith(signature)), None)


def _raise_for(response: http.client.HTTPResponse, body: bytes | None = None) -> None:
    """Raise the error of a response of 400 and up (503 and 507 as retryable); its body is read if not given."""
    if response.status < 400:
        return
    error = _error_of(response.status, response.read() if body is None else body)
    if response.status in (503, 507):
        raise _Retry(error, response.headers.get('Retry-After'))
    raise error


def _error_of(status: int, body: bytes) -> ISSError:
    try:
        answer = json.loads(body)
        return ISSError(status, str(answer.get('title', '')), str(answer.get('description', '')))
    except (ValueError, AttributeError):
        return ISSError(status, http.client.responses.get(status, 'Error'), body[:200].decode('utf-8', 'replace'))


@contextlib.contextmanager
def _opened(source: str | os.PathLike | bytes | IO[bytes]) -> Iterator[tuple[IO[bytes], int, str | None]]:
    """The source as a seekable binary file at its start, its size and its base name (if a path)."""
    if isinstance(source, (str, os.PathLike)):
        with open(source, 'rb') as file:
            yield file, os.fstat(file.fileno()).st_size, os.path.basename(source)
        return
    if isinstance(source, (bytes, bytearray, memoryview)):
        yield io.BytesIO(source), len(source), None
        return
    if source.seekable():
        start = source.tell()
        size = source.seek(0, os.SEEK_END) - start
        source.seek(start)
        yield _Window(source, start), size, None
        return
    # NOTE: a pipe is read once: spooled to disk (never to memory) to hash it, then sent.
    with tempfile.TemporaryFile() as spool:
        shutil.copyfileobj(source, spool, _CHUNK)
        size = spool.tell()
        spool.seek(0)
        yield spool, size, None


class _Window(io.RawIOBase):
    """A seekable stream seen from ``start`` on, so that seek(0) means its start."""

    def __init__(self, stream: IO[bytes], start: int) -> None:
        self._stream = stream
        self._start = start

    def read(self, size: int = -1) -> bytes:
        return self._stream.read(size)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        if whence == os.SEEK_SET:
            offset += self._start
        return self._stream.seek(offset, whence) - self._start

    def tell(self) -> int:
        return self._stream.tell() - self._start


def _hash_stream(file: IO[bytes]) -> str:
    sha256 = hashlib.sha256()
    while chunk := file.read(_CHUNK):
        sha256.update(chunk)
    file.seek(0)
    return sha256.hexdigest()


def hash_file(path: str) -> tuple[str, int]:
    """The id and size of a file's bytes."""
    with open(path, 'rb') as file:
        size = os.fstat(file.fileno()).st_size
        return 'sha256:' + _hash_stream(file), size


# -- trees of files ----------------------------------------------------------------


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
                if os.path.islink(path) and not _inside(os.path.realpath(path), top):
                    skipped.append({'path': path, 'reason': f'a symlink that leads out of {given}'})
                elif name not in directories:
                    files.append((path, os.path.relpath(path, given)))
    return files, skipped


def _inside(path: str, top: str) -> bool:
    return path == top or path.startswith(top.rstrip(os.sep) + os.sep)


def manifest_entry(path: str, blob_id: str, size: int, new: bool) -> dict[str, Any]:
    """One line of a manifest: which file became which id (``push``, ``import``; read by ``pull``)."""
    return {'path': path, 'id': blob_id, 'bytes': size, 'status': 'new' if new else 'stored'}


# -- the command -------------------------------------------------------------------


class _Progress:
    """A status line on stderr (files, bytes, rate, ETA), only when a person is watching."""

    def __init__(self, total_files: int, total_bytes: int, enabled: bool) -> None:
        self._files, self._bytes = total_files, total_bytes
        self._done_files = self._done_bytes = 0
        self._enabled = enabled
        self._started = self._shown = time.monotonic()
        self._lock = threading.Lock()

    def advance(self, size: int) -> None:
        with self._lock:
            self._done_files += 1
            self._done_bytes += size
            now = time.monotonic()
            if self._enabled and (now - self._shown >= 0.1 or self._done_files == self._files):
                self._shown = now
                self._show(now)

    def _show(self, now: float) -> None:
        rate = self._done_bytes / max(now - self._started, 1e-6)
        left = (self._bytes - self._done_bytes) / rate if rate else 0
        sys.stderr.write(
            f'\r\x1b[K{self._done_files:,}/{self._files:,} files  {_size(self._done_bytes)}/{_size(self._bytes)}'
            f'  {_size(rate)}/s  ETA {int(left) // 60}:{int(left) % 60:02d}'
            + ('\n' if self._done_files == self._files else '')
        )
        sys.stderr.flush()


def _size(count: float) -> str:
    for unit in ('B', 'kB', 'MB', 'GB'):
        if count < 1000 or unit == 'GB':
            return f'{count:,.0f} {unit}' if unit == 'B' else f'{count:,.1f} {unit}'
        count /= 1000
    return f'{count:,.1f} TB'


def _parallel(
    work: Callable[[Any], Any], items: Sequence[Any], jobs: int
) -> Iterator[tuple[Any, Any, Exception | None]]:
    """Run ``work`` on each item with ``jobs`` threads; yield (item, result, error) as each ends."""
    with concurrent.futures.ThreadPoolExecutor(max(1, jobs)) as pool:
        futures = {pool.submit(work, item): item for item in items}
        for future in concurrent.futures.as_completed(futures):
            try:
                yield futures[future], future.result(), None
            except Exception as exc:
                yield futures[future], None, exc


def _fail(what: str, exc: BaseException) -> None:
    print(f'iss-client: {what}: {exc}', file=sys.stderr)


def push(client: Client, args: argparse.Namespace) -> int:
    files, skipped = files_below(args.paths)
    for item in skipped:
        _fail(item['path'], item['reason'])
    failed = bool(skipped)
    # NOTE: large files are hashed while they are sent (Client.put); the rest first, so that
    # one question finds which are missing and the small ones go in batches.
    large: list[tuple[str, str, str, int]] = []  # path, relative, '', size
    hashed: list[tuple[str, str, str, int]] = []  # path, relative, id, size

    def hash_small(item: tuple[str, str]) -> tuple[str, int] | None:
        size = os.stat(item[0]).st_size
        if size >= _SEND_WHILE_HASHING_BYTES:
            large.append((*item, '', size))
            return None
        return hash_file(item[0])

    for (path, relative), digest, exc in _parallel(hash_small, files, args.jobs):
        if exc is not None:
            _fail(path, exc.strerror if isinstance(exc, OSError) and exc.strerror else exc)
            failed = True
        elif digest is not None:
            hashed.append((path, relative, *digest))
    hashed.sort()
    large.sort()
    missing = set(client.missing(list(dict.fromkeys(blob_id for _, _, blob_id, _ in hashed))))
    meta = json.loads(args.meta) if args.meta else None
    progress = _Progress(len(hashed) + len(large), sum(item[3] for item in hashed + large), _watched(args))
    sending: dict[str, tuple[str, str, str, int]] = {}
    for item in hashed:
        if item[2] in missing:
            sending.setdefault(item[2], item)  # NOTE: one upload for files of the same bytes
    uploaded: dict[str, bool] = {}
    stored_large: dict[str, Stored] = {}

    def upload(work: list[tuple[str, str, str, int]]) -> list[Stored | Exception]:
        if len(work) == 1:
            path, _, blob_id, size = work[0]
            if size >= _RESUMABLE_BYTES:
                try:
                    return [client.put_resumable(path, kind=args.kind, meta=meta)]
                except ISSError as exc:
                    if exc.status not in (404, 405) or exc.title == 'Upload not found':
                        raise
                    # NOTE: a server from before resumable uploads: one request
            return [client.put(path, kind=args.kind, meta=meta, digest=blob_id or None)]
        contents = []
        for path, _, _, _ in work:
            with open(path, 'rb') as file:
                contents.append((file.read(), os.path.basename(path)))
        try:
            return list(client.put_many(contents, kind=args.kind, meta=meta))
        except ISSError as exc:
            if exc.title != 'Two files':
                raise
            # NOTE: a server from before batch uploads takes one file per request
            return [_outcome(lambda item=item: upload([item])[0]) for item in work]

    work = [[item] for item in large] + _batches(list(sending.values()))
    for batch, outcomes, exc in _parallel(upload, work, args.jobs):
        for item, outcome in zip(batch, outcomes or [exc] * len(batch), strict=True):
            if isinstance(outcome, Exception):
                _fail(item[0], outcome)
                failed = True
            elif item[2]:
                uploaded[item[2]] = outcome.new
            else:
                stored_large[item[0]] = outcome
            progress.advance(item[3])
    entries: list[dict[str, Any]] = []
    for item in hashed:
        _, relative, blob_id, size = item
        sent_itself = sending.get(blob_id) is item
        if not sent_itself:
            progress.advance(size)  # NOTE: stored already, or the same bytes as a file that was sent
        if blob_id in missing and blob_id not in uploaded:
            continue  # NOTE: its upload failed, and was named above
        entries.append(manifest_entry(relative, blob_id, size, sent_itself and uploaded[blob_id]))
    for path, relative, _, size in large:
        if path in stored_large:
            stored = stored_large[path]
            entries.append(manifest_entry(relative, stored.id, size, stored.new and stored.sent))
    entries.sort(key=lambda entry: entry['path'])
    _write_manifest(entries, args.manifest)
    return SOME_FAILED if failed else OK


def _batches(items: list[tuple[str, str, str, int]]) -> list[list[tuple[str, str, str, int]]]:
    """Small files in batches (the largest first), every other file alone."""
    work: list[list[tuple[str, str, str, int]]] = []
    batch: list[tuple[str, str, str, int]] = []
    batch_bytes = 0
    for item in sorted(items, key=lambda item: -item[3]):
        size = item[3]
        if size > _BATCH_FILE_BYTES:
            work.append([item])
            continue
        if batch and (len(batch) == _BATCH_FILES or batch_bytes + size > _BATCH_BYTES):
            work.append(batch)
            batch, batch_bytes = [], 0
        batch.append(item)
        batch_bytes += size
    if batch:
        work.append(batch)
    return work


def _outcome(call: Callable[[], Stored]) -> Stored | Exception:
    try:
        return call()
    except Exception as exc:
        return exc


def pull(client: Client, args: argparse.Namespace) -> int:
    if args.manifest:
        with open(args.manifest) as file:
            entries = [json.loads(line) for line in file if line.strip()]
        wanted = [(entry['id'], entry['path'], entry.get('bytes', 0)) for entry in entries]
    else:
        wanted = [(blob_id, blob_id.removeprefix('sha256:'), 0) for blob_id in args.ids]
    output = pathlib.Path(args.output).resolve()
    failed = False
    todo: list[tuple[str, pathlib.Path]] = []
    sizes: dict[str, int] = {}  # NOTE: what the manifest says, for the progress bar
    for blob_id, relative, size in wanted:
        target = (output / relative).resolve()
        # APPSEC: a manifest names paths below the output directory, never outside it.
        if not _inside(str(target), str(output)) or target == output:
            _fail(relative, 'a path outside the output directory')
            failed = True
            continue
        todo.append((blob_id, target))
        sizes[str(target)] = size
    progress = _Progress(len(todo), sum(sizes.values()), _watched(args))
    for (blob_id, target), _, exc in _parallel(lambda item: client.get(*item), todo, args.jobs):
        if exc is not None:
            _fail(f'{blob_id} -> {target}', exc)
            failed = True
        progress.advance(sizes[str(target)])
    return SOME_FAILED if failed else OK


def _write_manifest(entries: list[dict[str, Any]], manifest: str | None) -> None:
    lines = ''.join(json.dumps(entry) + '\n' for entry in entries)
    if manifest:
        with open(manifest, 'w') as out:
            out.write(lines)
    else:
        sys.stdout.write(lines)


def _watched(args: argparse.Namespace) -> bool:
    return sys.stderr.isatty() and not args.quiet


def ls(client: Client, args: argparse.Namespace) -> int:
    collection = 'images' if args.images else 'artifacts'
    items = client.list(collection, kind=args.kind, created_after=args.after, created_before=args.before)
    for count, item in enumerate(items, 1):
        if args.json:
            print(json.dumps(item))
        else:
            print(f'{item["id"]}  {item.get("kind", ""):<12} {item.get("bytes", 0):>12,}  {item.get("filename") or ""}')
        if args.limit and count >= args.limit:
            break
    return OK


def meta_command(client: Client, args: argparse.Namespace) -> int:
    failed = False
    for blob_id in args.ids:
        try:
            found = client.meta(blob_id)
        except ISSError as exc:
            _fail(blob_id, exc)
            failed = True
            continue
        print(json.dumps({'id': blob_id, **found}) if args.json else f'{blob_id}\n' + _text(found, '  '))
    return SOME_FAILED if failed else OK


def rm(client: Client, args: argparse.Namespace) -> int:
    failed = False
    for blob_id in args.ids:
        try:
            client.delete(blob_id)
        except ISSError as exc:
            _fail(blob_id, exc)
            failed = True
    return SOME_FAILED if failed else OK


def stats(client: Client, args: argparse.Namespace) -> int:
    totals = client.stats()
    if args.json:
        print(json.dumps(totals))
        return OK
    print(f'{totals["count"]:,} blobs, {_size(totals["bytes"])}')
    for kind, figures in totals['kinds'].items():
        print(f'  {kind or "(no meta)"}: {figures["count"]:,} blobs, {_size(figures["bytes"])}')
    return OK


def _text(document: dict[str, Any], indent: str) -> str:
    return ''.join(f'{indent}{key}: {value}\n' for key, value in document.items())


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog='iss-client', description=__doc__.split('\n\n')[0])
    top.add_argument('--url', default=os.environ.get('ISS_URL', 'http://127.0.0.1:8000'), help='default: $ISS_URL')
    top.add_argument('--token', default=os.environ.get('ISS_API_TOKEN'), help='default: $ISS_API_TOKEN')
    top.add_argument('-j', '--jobs', type=int, default=8, help='requests at once (default 8)')
    top.add_argument('-q', '--quiet', action='store_true', help='no progress bar even on a terminal')
    commands = top.add_subparsers(dest='command', required=True, metavar='COMMAND')

    def command(name: str, function: Callable[[Client, argparse.Namespace], int], text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=text, description=text)
        sub.set_defaults(function=function)
        sub.add_argument('-j', '--jobs', type=int, default=argparse.SUPPRESS, help='requests at once')
        sub.add_argument('--json', action='store_true', help='JSON lines')
        return sub

    pushing = command('push', push, 'upload files and directories, only what the server lacks; print a manifest')
    pushing.add_argument('paths', nargs='+', metavar='PATH')
    pushing.add_argument('--kind', help='store as artifacts of this kind (default: images)')
    pushing.add_argument('--meta', help='JSON object of artifact meta, for every file')
    pushing.add_argument('--manifest', metavar='FILE', help='write the manifest there instead of stdout')
    pulling = command('pull', pull, "download ids (or a manifest's files) into a directory, verified")
    pulling.add_argument('ids', nargs='*', metavar='ID')
    pulling.add_argument('--manifest', metavar='FILE', help='a manifest of push: restore its paths')
    pulling.add_argument('-o', '--output', required=True, metavar='DIR')
    listing = command('ls', ls, 'list artifacts (or --images), newest first')
    listing.add_argument('--images', action='store_true')
    listing.add_argument('--kind')
    listing.add_argument('--after', help='created after (Unix seconds or ISO 8601)')
    listing.add_argument('--before', help='created before')
    listing.add_argument('--limit', type=int, help='at most this many')
    command('meta', meta_command, 'print the stored meta of ids').add_argument('ids', nargs='+', metavar='ID')
    command('rm', rm, 'delete ids (needs the admin token)').add_argument('ids', nargs='+', metavar='ID')
    command('stats', stats, 'count blobs and bytes per kind')
    return top


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command == 'pull' and bool(args.ids) == bool(args.manifest):
        parser().error('pull takes ids or --manifest FILE, not both')
    if args.command == 'push' and args.meta:
        try:
            if not isinstance(json.loads(args.meta), dict):
                raise ValueError
        except ValueError:
            parser().error('--meta must be a JSON object')
    try:
        client = Client(args.url, args.token)
    except ValueError as exc:
        parser().error(str(exc))
    try:
        return args.function(client, args)
    except Unreachable as exc:
        _fail(args.url, exc)
        return USAGE
    except ISSError as exc:
        _fail(args.command, exc)
        return SOME_FAILED
    except KeyboardInterrupt:
        return SOME_FAILED


if __name__ == '__main__':
    sys.exit(main())
