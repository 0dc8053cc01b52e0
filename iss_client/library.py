"""The client library: :class:`Client`, its errors, and the wire (``http.client``, threads).

Every upload is verified: under the id computed here (``PUT``), or against it when the
server answers; a download is hashed as it arrives and resumed with ``Range`` when the
connection breaks. Connection errors, 503 and 507 are retried with backoff; every other
error raises :class:`ISSError` carrying the server's JSON error.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import functools
import hashlib
import http.client
import io
import json
import os
import pathlib
import random
import shutil
import stat
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Iterator, Sequence
from typing import IO, Any, TypeGuard, cast

from iss_client.files import CHUNK, CacheRecord, hash_stream, media_type

# NOTE: the server takes at most 10,000 ids per /blobs/missing.
_MISSING_BATCH = 1000
# PERF: files up to this size go in batches: one request, one group commit on the server (upload_way).
_BATCH_FILE_BYTES = 256 * 1024
# PERF: a file this large whose id is not known yet is sent while it is hashed
# (Client._put_while_hashing), in pieces between which the upload can be stopped.
_SEND_WHILE_HASHING_BYTES = 32 * 1024 * 1024
_SEND_PIECE = 8 * 1024 * 1024
# NOTE: a file this large goes over tus (Client.put_resumable), in chunks of
# _RESUMABLE_CHUNK_BYTES: a broken connection costs at most a chunk, and a proxy that caps
# a request's body (100 MB at Cloudflare) lets every chunk through.
_RESUMABLE_BYTES = 256 * 1024 * 1024
_RESUMABLE_CHUNK_BYTES = 64 * 1024 * 1024
_TUS = {'Tus-Resumable': '1.0.0'}
# NOTE: a long-poll of the change feed waits this long (the server allows 60), well inside the client's timeout.
_FOLLOW_WAIT = 25
# NOTE: a server that has never answered this client gets this many more tries and this long
# to accept a connection: a wrong --url fails in a second, not after the retries meant for
# a server restarting under a running push.
_FIRST_CONTACT_RETRIES = 2
_CONNECT_SECONDS = 5.0


def upload_way(size: int, id_known: bool) -> str:
    """How a file goes up: the one rule, by its size and whether its id is known before a byte is sent.

    - ``resumable`` from 256 MiB (:meth:`Client.put_resumable`, over tus): in chunks,
      resumed after a failure, even by a later run;
    - ``while-hashing`` from 32 MiB when the id is not known yet (:meth:`Client._put_while_hashing`):
      the bytes are likely new, so they start at once, and stop as soon as the hash,
      done meanwhile, says the server has them;
    - ``batch`` up to 256 KiB (:meth:`Client.put_many`): many files in one request;
    - ``by-id`` for every other file (``PUT /{door}/{id}``).

    A file whose id is known is asked about first (``POST /blobs/missing``, many ids at
    once) and not sent at all when the server has it.
    """
    if size >= _RESUMABLE_BYTES:
        return 'resumable'
    if not id_known and size >= _SEND_WHILE_HASHING_BYTES:
        return 'while-hashing'
    return 'batch' if size <= _BATCH_FILE_BYTES else 'by-id'


class ISSError(Exception):
    """The server refused a request; ``status``, ``title`` and ``description`` are its JSON error's."""

    def __init__(self, status: int, title: str, description: str) -> None:
        # NOTE: status 0 is no HTTP answer (unreachable, or bytes that do not match): not shown.
        text = ' '.join(filter(None, [str(status) if status else '', title]))
        super().__init__(f'{text}: {description}' if description else text)
        self.status = status
        self.title = title
        self.description = description


class IntegrityError(ISSError):
    """The bytes received do not hash to the id asked for: nothing was kept."""


class CursorExpired(ISSError):
    """410 from ``/events``: the cursor is older than the feed keeps, or of an index since rebuilt."""


class Unreachable(ISSError):
    """The server could not be reached, after every retry; ``reason`` says what the last try met."""

    def __init__(self, server: str, reason: str) -> None:
        super().__init__(0, 'Unreachable', f'{server}: {reason}')
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class EventPage:
    """A page of the change feed: its ``events`` (each with its own ``cursor``) and the cursor to ask with ``next``."""

    events: list[dict[str, Any]]
    next: str


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
        self._answered = False  # NOTE: whether the server ever answered (see _FIRST_CONTACT_RETRIES)

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

        The way is :func:`upload_way`'s. The sha256 is computed here first, and when the
        server has the blob already nothing is sent; pass ``digest`` when it is known and
        the server was asked already (``push`` does) to skip both. ``filename`` defaults
        to a path's base name; it also gives the file's media type (by its extension).
        """
        with _opened(source) as (file, size, name):
            upload = _Upload(kind, meta, filename or name)
            way = upload_way(size, digest is not None)
            if way == 'resumable' and isinstance(source, (str, os.PathLike)):
                try:
                    return self.put_resumable(source, kind=kind, meta=meta, filename=filename, digest=digest)
                except ISSError as exc:
                    if exc.status not in (404, 405) or exc.title == 'Upload not found':
                        raise
                    # NOTE: a server from before resumable uploads: one request
            if digest is None:
                if way in ('resumable', 'while-hashing') and _sendable_file(file) and self._scheme == 'http':
                    return self._put_while_hashing(file, size, upload)
                digest = hash_stream(file)
                if not self.missing([digest]):
                    return Stored(digest, new=False, sent=False, bytes=size, meta=self.meta(digest))
            return self._put_by_id(file, size, digest, upload)

    def _put_by_id(self, file: IO[bytes], size: int, blob_id: str, upload: _Upload) -> Stored:
        """``PUT /{door}/{id}``: the server verifies the bytes against the id as they stream."""
        # PERF: a small body goes in the same send(2) as the headers; sent after them,
        # Nagle's algorithm holds it until the headers are acknowledged.
        content: bytes | IO[bytes] = file.read() if size <= CHUNK else file
        status, _, body = self._call(
            'PUT', upload.path(blob_id), body=content, length=size, content_type=media_type(upload.filename)
        )
        return Stored(blob_id, new=status == 201, sent=True, bytes=size, meta=json.loads(body))

    def _put_while_hashing(self, file: IO[bytes], size: int, upload: _Upload) -> Stored:
        """Send a large file by POST while another thread hashes it and asks whether it is stored.

        PERF: hashing first puts the whole read (0.4 s for 512 MiB) before the first byte
        is sent. Here the hash is done long before the upload, and then answers two things:
        if the server has the blob, the upload is cut off (the server keeps nothing of a
        body cut short) and nothing more is sent; if not, the id the server answers must be
        this one. An upload that fails on the way is sent again as a verified PUT.
        """
        start = file.tell()
        with _HashingBeside(self, file.fileno(), start, size) as hashing:
            try:
                answer = self._post_file(file, start, size, upload, hashing.stored)
            except (OSError, http.client.HTTPException, _Retry):
                answer = None  # NOTE: sent again below, by id, with the retries of _call
        blob_id = hashing.id
        if answer is None and hashing.stored.is_set():
            return Stored(blob_id, new=False, sent=False, bytes=size, meta=self.meta(blob_id))
        if answer is None:
            file.seek(start)
            return self._put_by_id(file, size, blob_id, upload)
        status, body = answer
        _check_id(body.get(upload.id_field), blob_id)
        return Stored(blob_id, new=status == 201, sent=True, bytes=size, meta=body)

    def _post_file(
        self, file: IO[bytes], start: int, size: int, upload: _Upload, stop: threading.Event
    ) -> tuple[int, dict[str, Any]] | None:
        """One POST of the file by sendfile(2), in pieces; None when ``stop`` cut it off.

        PERF: the raw body, as a PUT's, when the door takes it (an artifact, or an image whose
        first bytes say its type): the server reads it straight into the store, where a
        multipart form costs it a search for the boundary and one more copy of every byte.
        """
        head = tail = b''
        content_type = media_type(upload.filename)
        if upload.door == 'images':
            sniffed = image_type(os.pread(file.fileno(), 12, start))
            if sniffed is None:
                form = _Form()
                head, tail = form.head(upload.filename), b'\r\n' + form.end()
                content_type = form.content_type
            else:
                content_type = sniffed
        connection = self._connection()
        try:
            connection.putrequest('POST', self._prefix + upload.path(), skip_accept_encoding=True)
            connection.putheader('Content-Type', content_type)
            connection.putheader('Content-Length', str(len(head) + size + len(tail)))
            if self._token:
                connection.putheader('Authorization', f'Bearer {self._token}')
            with _answer_may_come_early():
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
            self._answered = True
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
        upload = _Upload(kind or 'image', meta, filename or os.path.basename(path))
        fields = {**upload.fields(), 'filetype': media_type(upload.filename)}
        if digest:
            fields['sha256'] = digest
        server = f'{self._scheme}://{self._netloc}{self._prefix}'
        record = CacheRecord('uploads', f'{server}\0{os.path.abspath(path)}\0{info.st_size}\0{info.st_mtime_ns}')
        location = (record.load() or {}).get('location')
        if not isinstance(location, str) or (offset := self._upload_offset(location)) is None:
            location, offset = self._create_upload(info.st_size, fields)
            record.save({'location': location})
        with open(path, 'rb') as file, _HashingBeside(self, file.fileno(), 0, info.st_size) as hashing:
            headers = self._send_chunks(location, file, info.st_size, offset, chunk_bytes, hashing.stored)
        blob_id = hashing.id
        record.clear()
        if headers is None:  # NOTE: the server has these bytes: stopped, and nothing kept
            with contextlib.suppress(ISSError):
                self._call('DELETE', location, headers=_TUS)
            return Stored(blob_id, new=False, sent=False, bytes=info.st_size, meta=self.meta(blob_id))
        _check_id(headers['ISS-Blob-Id'], blob_id)
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
                resumed = self._upload_offset(location)
                if resumed is None:
                    raise ISSError(404, 'Upload not found', f'the server lost the upload at {location}') from exc
                offset = resumed
        return headers

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
        form = _Form()
        parts: list[bytes] = []
        for content, filename in files:
            parts += (form.head(filename), content, b'\r\n')
        parts.append(form.end())
        upload = _Upload(kind, meta, None)
        _, _, body = self._call('POST', upload.path(), body=b''.join(parts), content_type=form.content_type)
        answers = json.loads(body)
        answers = answers if isinstance(answers, list) else [answers]  # NOTE: one file is answered alone
        outcomes: list[Stored | ISSError] = []
        for (content, _), answer in zip(files, answers, strict=True):
            status = answer.get('status', 201 if answer.get('created') else 200)
            try:
                if status >= 400:
                    raise ISSError(status, str(answer.get('title', '')), str(answer.get('description', '')))
                blob_id = answer[upload.id_field]
                _check_id(blob_id, 'sha256:' + hashlib.sha256(content).hexdigest())
            except ISSError as exc:
                outcomes.append(exc)
                continue
            outcomes.append(Stored(blob_id, new=status == 201, sent=True, bytes=len(content), meta=answer))
        return outcomes

    def get(self, blob_id: str, destination: str | os.PathLike | IO[bytes]) -> int:
        """Download a blob to a path (written whole or not at all) or a writable stream; return its size.

        The bytes are hashed as they arrive; a broken connection is resumed with ``Range``.
        A path gets the mode a new file gets here (0666 less the umask), as ``cp`` gives it.

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
                    # NOTE: mkstemp makes it 0600, private to a file that is not the user's yet
                    os.fchmod(temp.fileno(), 0o666 & ~_umask())
                except BaseException:
                    os.unlink(temp.name)
                    raise
            os.replace(temp.name, target)
            return size
        return self._download(blob_id, destination)

    def reach(self) -> None:
        """Make sure the server answers (anything at all): raise :class:`Unreachable` at once when it does not."""
        attempt = 0
        while True:
            try:
                with self._response('GET', '/healthz'):
                    return
            except (ISSError, _Retry):
                return  # NOTE: an answer, whatever it says
            except (OSError, http.client.HTTPException) as exc:
                attempt = self._backoff(attempt, exc)

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

    def similar_to(self, data: bytes, max_distance: int | None = None) -> dict[str, Any]:
        """``POST /images/similar``: the sent image's ``phash`` and placeholders, and every stored image
        within ``max_distance`` bits of it (``items``, nearest first, each with its ``distance``).

        Raises:
            ISSError: 415 for bytes that are no image, 422 for one that does not decode.
        """
        query = {'limit': 100, **({'max_distance': max_distance} if max_distance is not None else {})}
        path: str | None = f'/images/similar?{urllib.parse.urlencode(query)}'
        answer: dict[str, Any] = {}
        content_type = image_type(data[:12]) or 'application/octet-stream'
        while path is not None:
            # NOTE: each page asks again with the image: the server keeps nothing of it.
            page = json.loads(self._call('POST', path, body=data, content_type=content_type)[2])
            answer = {**page, 'items': answer.get('items', []) + page['items']}
            path = page['next']
        return answer

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

    def events(self, after: str | None = None, limit: int = 100, wait: int = 0) -> EventPage:
        """The changes after ``after`` (None: the oldest kept; ``'now'``: none, with the latest cursor).

        ``wait`` seconds (at most 60) long-polls: the answer comes as soon as a change lands.

        Raises:
            CursorExpired: the cursor is no longer served (410): list the store anew.
        """
        query = {'limit': limit, 'wait': wait, **({'after': after} if after else {})}
        try:
            page = json.loads(self._call('GET', f'/events?{urllib.parse.urlencode(query)}')[2])
        except ISSError as exc:
            if exc.status == 410:
                raise CursorExpired(exc.status, exc.title, exc.description) from None
            raise
        return EventPage(page['events'], page['next'])

    def follow(self, after: str | None = 'now', *, limit: int = 100, wait: int = _FOLLOW_WAIT) -> Iterator[EventPage]:
        """Every page of the feed after ``after``, for ever, long-polled; an empty page when ``wait`` passes quietly.

        An unreachable server, or one that answers 5xx, is asked again with backoff (up to a
        minute apart); every other error, :class:`CursorExpired` among them, ends the iteration.
        """
        cursor = after
        attempt = 0
        while True:
            try:
                page = self.events(cursor, limit, wait)
            except ISSError as exc:
                if not isinstance(exc, Unreachable) and exc.status < 500:
                    raise
                time.sleep(min(60.0, 2.0**attempt) * random.uniform(0.5, 1.0))
                attempt += 1
                continue
            attempt = 0
            cursor = page.next
            yield page

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
                    while chunk := response.read(CHUNK):
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
            with _answer_may_come_early():
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
        self._answered = True
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
        never_answered = not self._answered and not isinstance(exc, _Retry)
        if attempt >= (min(self._retries, _FIRST_CONTACT_RETRIES) if never_answered else self._retries):
            if isinstance(exc, _Retry):
                raise exc.error from None
            reason = (exc.strerror if isinstance(exc, OSError) else None) or str(exc) or type(exc).__name__
            raise Unreachable(self._netloc, reason) from exc
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
            connection = cls(self._netloc, timeout=min(self._timeout, _CONNECT_SECONDS), blocksize=CHUNK)
            connection.connect()
            connection.sock.settimeout(self._timeout)
            self._local.connection = connection
        return connection

    def _drop_connection(self) -> None:
        connection = getattr(self._local, 'connection', None)
        if connection is not None:
            connection.close()
            self._local.connection = None


@contextlib.contextmanager
def _answer_may_come_early() -> Iterator[None]:
    """Around the sending of a request: a server may answer before it has the whole body, then close.

    NOTE: ISS refuses a body over its upload limit (413), or one sent without the token (401), before
    reading it; the rest of the body then meets a closed connection (a broken pipe, or a reset), and
    the answer is there to read, as curl and urllib3 read it. A file over the limit was "Unreachable:
    Broken pipe", after retries that each sent it again. With no answer, the read that follows raises.
    """
    try:
        yield
    except (BrokenPipeError, ConnectionResetError):
        pass


def _sendable_file(body: object) -> TypeGuard[IO[bytes]]:
    """True for a regular file that sendfile(2) can send from."""
    try:
        return stat.S_ISREG(os.fstat(body.fileno()).st_mode)  # type: ignore[attr-defined]  # NOTE: AttributeError below
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return False


class _Retry(Exception):
    """A 503 or 507: worth trying again, after ``Retry-After`` if the server said."""

    def __init__(self, error: ISSError, retry_after: str | None) -> None:
        super().__init__(str(error))
        self.error = error
        self.retry_after = (
            float(retry_after) if retry_after and retry_after.isascii() and retry_after.isdigit() else None
        )


# NOTE: enough to send an image as a raw body (image/*); the server types it by its bytes anyway.
_IMAGE_SIGNATURES = (
    (b'\x89PNG\r\n\x1a\n', 'image/png'),
    (b'\xff\xd8\xff', 'image/jpeg'),
    (b'GIF87a', 'image/gif'),
    (b'GIF89a', 'image/gif'),
    (b'II*\x00', 'image/tiff'),
    (b'MM\x00*', 'image/tiff'),
    (b'BM', 'image/bmp'),
    (b'\xff\x0a', 'image/jxl'),
    (b'\x00\x00\x00\x0cJXL \x0d\x0a\x87\x0a', 'image/jxl'),
)
# NOTE: HEIC/HEIF and AVIF are ISO media files: an ftyp box first, whose brand says which.
_ISO_BRANDS = {
    **dict.fromkeys((b'heic', b'heix', b'heim', b'heis', b'hevc', b'hevx', b'mif1', b'msf1'), 'image/heif'),
    **dict.fromkeys((b'avif', b'avis'), 'image/avif'),
}


def image_type(start: bytes) -> str | None:
    """The image type the first bytes of a file announce, or None."""
    if start[:4] == b'RIFF' and start[8:12] == b'WEBP':
        return 'image/webp'
    if start[4:8] == b'ftyp':
        return _ISO_BRANDS.get(start[8:12])
    return next((found for signature, found in _IMAGE_SIGNATURES if start.startswith(signature)), None)


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
        # NOTE: a RawIOBase, a binary file to its readers (typeshed keeps the two types apart)
        yield cast(IO[bytes], _Window(source, start)), size, None
        return
    # NOTE: a pipe is read once: spooled to disk (never to memory) to hash it, then sent.
    with tempfile.TemporaryFile() as spool:
        shutil.copyfileobj(source, spool, CHUNK)
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


@dataclasses.dataclass(frozen=True)
class _Upload:
    """Where an upload goes and what it says of itself: the door (by ``kind``), meta and file name."""

    kind: str | None
    meta: dict[str, Any] | None
    filename: str | None

    @property
    def door(self) -> str:
        return 'images' if self.kind is None else 'artifacts'

    @property
    def id_field(self) -> str:
        """The field of the server's answer that holds the id."""
        return 'image_id' if self.kind is None else 'artifact_id'

    def fields(self) -> dict[str, str]:
        """``kind``, ``meta`` and ``filename``, those given, as the server reads them (query or tus metadata)."""
        fields = {'kind': self.kind, 'filename': self.filename}
        if self.meta:
            fields['meta'] = json.dumps(self.meta, separators=(',', ':'))
        return {name: value for name, value in fields.items() if value}

    def path(self, blob_id: str | None = None) -> str:
        """``/{door}`` (a POST) or ``/{door}/{id}`` (a PUT), with the fields as its query string."""
        query = urllib.parse.urlencode(self.fields())
        return f'/{self.door}' + (f'/{blob_id}' if blob_id else '') + (f'?{query}' if query else '')


class _Form:
    """A multipart/form-data body of files, each a ``file`` field with its name and its type by that name."""

    def __init__(self) -> None:
        self._boundary = 'iss-client-' + os.urandom(12).hex()
        self.content_type = f'multipart/form-data; boundary={self._boundary}'

    def head(self, filename: str | None) -> bytes:
        """What goes before a file's bytes (after them: CRLF, then the next head or :meth:`end`)."""
        name = (filename or 'file').replace('"', '%22').replace('\r', '').replace('\n', '')
        return (
            f'--{self._boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
            f'Content-Type: {media_type(filename)}\r\n\r\n'
        ).encode()

    def end(self) -> bytes:
        return f'--{self._boundary}--\r\n'.encode()


class _HashingBeside:
    """Hash ``size`` bytes of ``fd`` from ``start`` in another thread, and ask the server whether it has them.

    Runs beside an upload of the same bytes (by ``pread``: the upload's file position is
    its own); ``stored`` is set as soon as the server says it has them, for the upload
    to stop. On leaving, the thread is joined and ``id`` holds the id; what went wrong
    in the thread is raised then.
    """

    def __init__(self, client: Client, fd: int, start: int, size: int) -> None:
        self.stored = threading.Event()
        self.id = ''
        self._error: Exception | None = None
        self._thread = threading.Thread(
            target=self._run, args=(client, fd, start, size), name='iss-client-hash', daemon=True
        )

    def __enter__(self) -> _HashingBeside:
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        self._thread.join()
        if kind is None and self._error is not None:
            raise self._error

    def _run(self, client: Client, fd: int, start: int, size: int) -> None:
        try:
            sha256 = hashlib.sha256()
            offset = start
            while offset < start + size and (chunk := os.pread(fd, CHUNK, offset)):
                sha256.update(chunk)
                offset += len(chunk)
            self.id = 'sha256:' + sha256.hexdigest()
            if not client.missing([self.id]):
                self.stored.set()
        except Exception as exc:
            self._error = exc


def _check_id(answered: object, expected: str) -> None:
    """Raise :class:`IntegrityError` unless the server stored the bytes under the id computed here."""
    if answered != expected:
        raise IntegrityError(502, 'Wrong id', f'the server stored {answered} for {expected}')


@functools.cache
def _umask() -> int:
    """This process's umask, read without changing it where Linux tells it."""
    with contextlib.suppress(OSError, ValueError, StopIteration), open('/proc/self/status') as status:
        return int(next(line for line in status if line.startswith('Umask:')).split()[1], 8)
    mask = os.umask(0o22)  # NOTE: elsewhere, read by setting it, and put back at once
    os.umask(mask)
    return mask
