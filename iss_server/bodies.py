"""The request body, read within the upload limit and the body timeout.

:class:`RequestBody` is what every resource reads a body through (a form, a raw
upload, a tus chunk, a small JSON document): it refuses what is too large before
or as it arrives, and turns a client that went away into :class:`IncompleteBody`.
Under gunicorn, a body of known length is received straight from the socket
(:class:`SocketBody`), and a chunked one through gunicorn's reader, each receive
paced (:func:`receiving_through`). :class:`Pace` is the one pace rule, which responses are
sent under too (:mod:`iss_server.sending`).
"""

from __future__ import annotations

import contextlib
import io
import socket
import time
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import falcon
import gunicorn.http.body
import gunicorn.http.unreader

from iss_server.errors import (
    BodyTooSlow,
    IncompleteBody,
    LengthRequired,
    TransferCodingNotImplemented,
    UploadTooLarge,
)


class Pace:
    """The pace a body keeps, received or sent: ``timeout`` seconds its longest pause, and ``min_rate`` bytes
    a second on average once its first ``timeout`` seconds are past (``ISS_BODY_TIMEOUT``, ``ISS_BODY_MIN_RATE``).

    A one-byte drip never pauses: without the average it would hold a thread for as long as it lasts.
    ``moved`` counts the bytes that went (received, or taken by the kernel to send) since the pace started.
    """

    def __init__(self, timeout: float, min_rate: int) -> None:
        self.timeout = timeout
        self.min_rate = min_rate
        self.started = time.monotonic()
        self.moved = 0

    def deadline(self) -> float:
        """The moment (``time.monotonic``) the body falls behind its pace unless more of it goes."""
        return self.started + self.timeout + self.moved / self.min_rate

    def behind(self) -> float:
        """Seconds the body is behind its pace (negative: how long it may still take for what has gone)."""
        return time.monotonic() - self.deadline()

    def next_wait(self) -> float:
        """How long the next byte may take when the body is not :meth:`behind`: a full pause at first, then until
        the pace would be behind without it."""
        return min(self.timeout, 1 / self.min_rate - self.behind())

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def shortfall(self) -> str:
        """What a body that fell behind did, and what the pace asks (a 408's description)."""
        return (
            f'Received {self.moved} bytes in {self.elapsed():.0f} s: a body must average '
            f'{self.min_rate} bytes a second after its first {self.timeout} s (ISS_BODY_MIN_RATE).'
        )


class RequestBody:
    """The request body as a stream that enforces the upload limit and notices truncation.

    A body declared larger than the limit is refused before a byte is read;
    a chunked one is refused as soon as it crosses the limit. A client that
    goes away before sending what it declared, or pauses longer than the body
    timeout, gets :class:`errors.IncompleteBody`, which the store sees as an
    ordinary exception (and removes its temp file). Past its first ``timeout``
    seconds, a body must have averaged :data:`min_rate` bytes a second
    (:class:`errors.BodyTooSlow`, 408): a one-byte drip never pauses, and
    would hold a thread for as long as it lasts.
    """

    #: ``ISS_BODY_MIN_RATE``, set by the app (``configure``): one pace for every body of the process.
    min_rate = 1024

    @classmethod
    def configure(cls, min_rate: int) -> None:
        cls.min_rate = min_rate

    def __init__(self, req: falcon.Request, limit: int, timeout: int) -> None:
        self._limit = limit
        self._received = 0
        #: The sizes a chunked body's chunks announced so far (:meth:`_announced`).
        self._announced_bytes = 0
        self.declared_length = req.content_length
        # NOTE: what the pace counts: the bytes received off the socket, a chunked body's framing included
        self._pace = Pace(timeout, self.min_rate)
        self._socket: socket.socket | None = req.env.get('gunicorn.socket')
        # APPSEC: gunicorn's threads read bodies from a blocking socket with no
        # timeout, so a client that stops sending would hold a thread for ever.
        # gunicorn makes the socket blocking again before the next request.
        if self.declared_length is None:
            # NOTE: a chunked body is only safe to read when the server
            # marks where it ends (gunicorn does; PEP 3333 servers may not).
            if not req.env.get('wsgi.input_terminated'):
                raise LengthRequired('Send a Content-Length header (or a chunked body to a server that supports it).')
            # APPSEC: gunicorn takes "gzip, chunked" and hands on the bytes still gzipped, which would be
            # stored as the client's (issue 29); nginx answers such a request 501 itself.
            codings = req.get_header('Transfer-Encoding') or ''
            if {coding.strip(' \t').lower() for coding in codings.split(',')} - {'chunked', 'identity', ''}:
                raise TransferCodingNotImplemented(codings)
            self._stream = req.stream
            self._unreader = _chunked_unreader(req.env)
            _announcing_sizes_to(req.env, self._announced)
        elif self.declared_length > limit:
            raise UploadTooLarge(limit)
        else:
            self._stream = SocketBody.of(req.env) or req.bounded_stream
            self._unreader = None
            if isinstance(self._stream, SocketBody) and self._stream.all_here:
                # PERF: the worker received this body whole (worker.MAX_BUFFERED_BODY): no read waits on the
                # socket, so it needs no timeout, which cost an ioctl per read and a poll per send (strace).
                self._socket = None
        self._keep_pace()

    def read(self, size: int = -1) -> bytes:
        with self._arriving():
            data = self._stream.read(size)
        self._count(len(data), size)
        return data

    def readinto(self, buffer: memoryview) -> int:
        """Fill the start of ``buffer`` with the next bytes of the body; 0 at its end."""
        with self._arriving():
            if isinstance(self._stream, SocketBody):
                received = self._stream.readinto(buffer)
            else:
                data = self._stream.read(len(buffer))
                received = len(data)
                buffer[:received] = data
        self._count(received, len(buffer))
        return received

    @contextlib.contextmanager
    def _arriving(self) -> Iterator[None]:
        """Whatever reading the body raises (a reset, a timeout) is an incomplete body."""
        self._keep_pace()
        try:
            with receiving_through(self._unreader, self._paced):
                yield
        except UploadTooLarge:
            raise  # NOTE: a chunk's size said so (_announced), before its bytes came
        except Exception as exc:
            if self._pace.behind() >= 0:
                raise self._too_slow() from exc
            raise IncompleteBody(f'The body stopped arriving: {exc or type(exc).__name__}') from exc

    def _keep_pace(self) -> None:
        """Let the next read wait at most the pause allowed, and no later than the body's pace allows."""
        if self._socket is None:
            return
        if self._pace.behind() >= 0:
            raise self._too_slow()
        self._socket.settimeout(self._pace.next_wait())

    def _paced(self, receive: Callable[[], bytes]) -> bytes:
        """One receive of a chunked body from the socket, kept to the pace like a read.

        APPSEC: gunicorn fills one read of a chunked body from as many chunks as come, a receive
        each (and a chunk's size line a receive per byte, if so sent): a chunk of one byte every
        0.2 s never let a receive time out, and the read went on for as long as it dripped.
        """
        self._keep_pace()
        data = receive()
        self._pace.moved += len(data)
        return data

    def _announced(self, size: int) -> None:
        """A chunk's size line says ``size`` bytes come: past the limit with the chunks before, 413 before they do.

        NOTE: a chunk of 2**84 bytes otherwise waited for its bytes until ISS_BODY_TIMEOUT (408, issue 29).
        """
        self._announced_bytes += size
        if self._announced_bytes > self._limit:
            raise UploadTooLarge(self._limit)

    def _too_slow(self) -> BodyTooSlow:
        return BodyTooSlow(self._pace.shortfall())

    def _count(self, received: int, asked: int) -> None:
        self._received += received
        if self._unreader is None:
            self._pace.moved += received  # NOTE: a chunked body's bytes are counted as they arrive (_paced)
        if self._received > self._limit:
            raise UploadTooLarge(self._limit)
        if not received and asked != 0 and self.declared_length is not None and self._received < self.declared_length:
            raise IncompleteBody(f'Received {self._received} of the {self.declared_length} bytes declared.')


class SocketBody:
    """The rest of a gunicorn request body of known length, received straight from its socket.

    PERF: gunicorn's reader passes each piece through three BytesIO buffers and
    slices it on every read, and each fresh 1 MiB buffer is fresh pages from the
    kernel; ``recv_into`` a reused buffer copies each byte once. The bytes
    gunicorn read ahead with the headers come first, and its reader is told
    what was taken, so it finds the body consumed when the next request on the
    connection is parsed (or, if a read failed, closes the connection).

    NOTE: this reaches into gunicorn's Body, LengthReader and unreader, as of the
    pinned gunicorn 27.0.1; test_gunicorn.py's pipelining, trickle and half-close
    tests fail if an upgrade changes them. Any other server gets the plain stream.
    """

    _CHUNK_SIZE = 1024 * 1024

    def __init__(self, body: gunicorn.http.body.Body, reader: gunicorn.http.body.LengthReader) -> None:
        self._body = body
        self._reader = reader
        self._socket = reader.unreader.sock
        # What gunicorn holds already: Body's buffer (counted off the length) and the
        # read-ahead after the headers, of which only the body's part is taken.
        ahead = reader.unreader.take_buffered()
        taken, rest = ahead[: reader.length], ahead[reader.length :]
        if rest:
            reader.unreader.unread(rest)
        reader.length -= len(taken)
        self._pending = memoryview(body.buf.getvalue() + taken)
        body.buf = io.BytesIO()

    @classmethod
    def of(cls, env: dict[str, Any]) -> SocketBody | None:
        """The body of this request as a SocketBody, or None when it is not a gunicorn one of known length."""
        body = env.get('wsgi.input')
        reader = getattr(body, 'reader', None)
        if (
            isinstance(body, gunicorn.http.body.Body)
            and isinstance(reader, gunicorn.http.body.LengthReader)
            and isinstance(getattr(reader.unreader, 'sock', None), socket.socket)
        ):
            return cls(body, reader)
        return None

    @property
    def all_here(self) -> bool:
        """Whether the whole body was read ahead with the headers: nothing is left to receive from the socket."""
        return not self._reader.length

    def readinto(self, buffer: memoryview) -> int:
        if self._pending:
            count = min(len(buffer), len(self._pending))
            buffer[:count], self._pending = self._pending[:count], self._pending[count:]
            return count
        if not self._reader.length:
            return 0
        with self._marking_failure():
            count = self._socket.recv_into(buffer, min(len(buffer), self._reader.length))
        self._reader.length -= count
        return count

    def read(self, size: int | None = -1) -> bytes:
        """Like a raw stream's read: up to ``size`` bytes, fewer if fewer have arrived; all with -1."""
        if size is None or size < 0:
            return b''.join(iter(lambda: self.read(self._CHUNK_SIZE), b''))
        if self._pending:
            data, self._pending = self._pending[:size].tobytes(), self._pending[size:]
            return data
        if not self._reader.length:
            return b''
        with self._marking_failure():
            data = self._socket.recv(min(size, self._reader.length))
        self._reader.length -= len(data)
        return data

    @contextlib.contextmanager
    def _marking_failure(self) -> Iterator[None]:
        """A failed read leaves the connection mid-body: gunicorn must close it, not reuse it."""
        try:
            yield
        except BaseException:
            self._body.failed = True
            raise


def _chunked_unreader(env: dict[str, Any]) -> Any:
    """The unreader a gunicorn chunked body is received through, or None when it is not one on a socket."""
    reader = getattr(env.get('wsgi.input'), 'reader', None)
    if isinstance(reader, gunicorn.http.body.ChunkedReader) and isinstance(
        getattr(reader.req, 'unreader', None), gunicorn.http.unreader.SocketUnreader
    ):
        return reader.req.unreader
    return None


def _announcing_sizes_to(env: dict[str, Any], announced: Callable[[int], None]) -> None:
    """Tell ``announced`` each chunk size gunicorn's ChunkedReader parses, before it reads the chunk's bytes.

    NOTE: as of the pinned gunicorn 27.0.1, its parse_chunked calls ``self.parse_chunk_size``, which an
    attribute of the instance shadows; test_hostile.py's huge chunk test fails if an upgrade changes that.
    """
    reader = getattr(env.get('wsgi.input'), 'reader', None)
    if not isinstance(reader, gunicorn.http.body.ChunkedReader):
        return
    parse_chunk_size = reader.parse_chunk_size

    def parse_and_announce(unreader: Any, data: bytes | None = None) -> tuple[int, bytes | None]:
        size, rest = parse_chunk_size(unreader, data)
        announced(size)
        return size, rest

    reader.parse_chunk_size = parse_and_announce


@contextlib.contextmanager
def receiving_through(unreader: Any, paced: Callable[[Callable[[], bytes]], bytes]) -> Iterator[None]:
    """While the block runs, each receive of gunicorn's ``unreader`` from its socket goes through ``paced``.

    ``paced(receive)`` checks what it must (a pace, a deadline), sets the socket's timeout, and
    returns ``receive()``. ``unreader`` None (not a gunicorn socket's): nothing changes.

    NOTE: this reaches into gunicorn's unreader as of the pinned gunicorn 27.0.1, as
    :class:`SocketBody` does: every read of it from the socket (its ChunkedReader's, its
    finish_body's) calls ``SocketUnreader.chunk``, which an attribute of the instance shadows;
    test_hostile.py's chunked drip tests fail if an upgrade changes that.
    """
    if unreader is None:
        yield
        return
    unreader.chunk = lambda size_hint=None: paced(
        partial(gunicorn.http.unreader.SocketUnreader.chunk, unreader, size_hint)
    )
    try:
        yield
    finally:
        del unreader.chunk
