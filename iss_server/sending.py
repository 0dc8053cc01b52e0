"""Responses sent under the pace bodies are received under: a client that stops reading is cut.

gunicorn's threads send a response on a blocking socket with no timeout: 40 clients that asked
for a large blob and read nothing held 40 threads for ever, and ``/health`` timed out on every
other probe (issue 29). Here each send of a response is first offered to the kernel without
waiting (``MSG_DONTWAIT``: the one ``sendto`` a blocking ``sendall`` makes, and no timeout, which
would cost a poll before every send); what the kernel does not take at once goes out under the
body pace (:class:`bodies.Pace`: ``ISS_BODY_TIMEOUT`` the longest wait for room, ``ISS_BODY_MIN_RATE``
bytes a second on average), counted from the moment the kernel had no room until it takes a whole
send at once again (the client caught up). A client that
falls behind it is cut: :class:`ClientStoppedReading`, which the access line names ``"the client
stopped reading"``, and the connection is reset.

A thread waiting for room is held all the same: all threads but an eighth may wait at once (the
worker's body places, as many), so ``/health`` and small reads keep threads. A response that must
wait when they all do cuts the waiting one whose client took least since its wait began (the one
that waited longest of those): 40 clients reading nothing are cut as they come, not each after
``ISS_BODY_TIMEOUT``, and an honest reader among them is not the one cut.

NOTE: not a length above which a response is paced: what the kernel takes at once depends on the
peer and on what is still unsent before it (on loopback 1.6 to 4 MB for one response; a client
pipelining small GETs and reading none fills it with small answers, each of which then blocked).
Only the kernel knows; it says so when a send takes less than offered.
"""

from __future__ import annotations

import fcntl
import math
import os
import select
import socket
import struct
import termios
import threading
from collections.abc import Callable
from typing import IO, Any

import gunicorn.http.wsgi

from iss_server.bodies import Pace


class ClientStoppedReading(TimeoutError):
    """The client took a response slower than the pace allows (a TimeoutError: telemetry's cut reason)."""


class _Waiting:
    """The responses of the process waiting for room, at most ``places`` at once."""

    def __init__(self) -> None:
        self.places = 1
        self._lock = threading.Lock()
        #: each waiting response, with what it had still queued in the kernel when its wait began
        self._queued: dict[PacedSocket, int] = {}

    def enter(self, sender: PacedSocket) -> None:
        """Count ``sender`` waiting from now; when all places are taken, the one whose client took least is cut.

        NOTE: what a client took while its response waits is only seen in the kernel's queue (SIOCOUTQ):
        on loopback an honest reader empties a third of a 4 MB buffer, a second, before the wait ends.
        """
        with self._lock:
            if len(self._queued) >= self.places:
                # NOTE: the first of those that took least is the one that has waited longest
                least = min(self._queued, key=lambda waiting: self._queued[waiting] - waiting.queued())
                del self._queued[least]
                least.cut_short()
            self._queued[sender] = sender.queued()

    def leave(self, sender: PacedSocket) -> None:
        with self._lock:
            self._queued.pop(sender, None)


_waiting = _Waiting()


class PacedSocket:
    """A response's socket as gunicorn's Response sends through it (``sendall``, ``sendfile``), kept to the pace."""

    def __init__(self, sock: socket.socket, timeout: float, min_rate: int) -> None:
        self._sock = sock
        self._timeout = timeout
        self._min_rate = min_rate
        self._pace: Pace | None = None
        self._room = select.poll()
        self._cut_short = False

    def sendall(self, data: bytes) -> None:
        sent = 0
        # NOTE: a socket with a timeout (a request body's, bodies.RequestBody) polls before a send, MSG_DONTWAIT
        # or not, and waits there: it goes to the pace at once (non-blocking, no poll while there is room).
        offered = not self._sock.gettimeout()
        if offered:
            try:
                sent = self._sock.send(data, socket.MSG_DONTWAIT)
            except BlockingIOError:
                pass
            if sent == len(data):
                # NOTE: the client has caught up: the next wait starts a new pace (an event stream's
                # quiet minutes between events are not the client's)
                self._pace = None
                return
        if self._pace is not None:
            self._pace.moved += sent
        view = memoryview(data)
        self._send_paced(lambda done: self._sock.send(view[done:]), len(data), sent, room=not offered)

    def sendfile(self, file: IO[bytes], offset: int = 0, count: int | None = None) -> int:
        """``count`` bytes of ``file`` from ``offset`` with sendfile(2), as gunicorn's Response calls it.

        Like :meth:`socket.socket.sendfile`, the file is left where the sending stopped (telemetry.body_done
        reads it when the client is cut).
        """
        assert count is not None  # NOTE: gunicorn always gives the length it sends
        source, sink, length = file.fileno(), self._sock.fileno(), count
        pace = self._pace_started()
        before = pace.moved
        try:
            self._send_paced(lambda done: os.sendfile(sink, source, offset + done, length - done), length, 0, room=True)
        finally:
            file.seek(offset + pace.moved - before)
        return pace.moved - before

    def _send_paced(self, send: Callable[[int], int], total: int, done: int, *, room: bool) -> None:
        """``send(done)`` what the kernel takes of the rest past byte ``done`` of ``total``, waiting for room under
        the pace (``room``: whether to try once before the first wait)."""
        pace = self._pace_started()
        while done < total:
            if not room:
                self._wait_for_room(pace)
            room = False
            try:
                sent = send(done)
            except BlockingIOError:
                continue
            if not sent:
                return  # NOTE: sendfile at the end of the file (gunicorn's Response sends no more than it has)
            done += sent
            pace.moved += sent

    def _pace_started(self) -> Pace:
        """The pace, from now if the kernel has had room for everything offered so far; the socket non-blocking.

        PERF: non-blocking, so that sendfile(2) and send(2) return with what the kernel took and the waits
        are the pace's polls; gunicorn makes the socket blocking again before the connection's next request.
        """
        if self._pace is None:
            self._pace = Pace(self._timeout, self._min_rate)
            self._sock.setblocking(False)
            self._room.register(self._sock, select.POLLOUT)
        return self._pace

    def queued(self) -> int:
        """Bytes the kernel still holds of the response: not sent, or not yet acknowledged by the client."""
        try:
            return struct.unpack('i', fcntl.ioctl(self._sock.fileno(), termios.TIOCOUTQ, b'\0\0\0\0'))[0]
        except OSError:
            return 0

    def cut_short(self) -> None:
        """Cut the response while it waits for room, from another thread: its wait ends (no more to send: POLLOUT)."""
        self._cut_short = True
        try:
            self._sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def _wait_for_room(self, pace: Pace) -> None:
        """Until the kernel has room for more (it has sent some on), no longer than the pace allows, or cut."""
        if pace.behind() < 0:
            _waiting.enter(self)
            try:
                room = self._room.poll(math.ceil(pace.next_wait() * 1000))
            finally:
                _waiting.leave(self)
            if room and not self._cut_short:
                return
        # APPSEC: reset, not closed: a close would leave the unsent bytes (MBs) queued in the kernel, for as long as
        # the peer keeps its window shut (nginx's reset_timedout_connection does the same).
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack('ii', 1, 0))
        except OSError:
            pass
        if self._cut_short:
            raise ClientStoppedReading(
                f'the client took {pace.moved} bytes in {pace.elapsed():.0f} s once the kernel had no room, and '
                f'its client took least while waiting of the {_waiting.places} responses a worker lets wait at once'
            )
        raise ClientStoppedReading(
            f'the client took {pace.moved} bytes in {pace.elapsed():.0f} s once the kernel had no room: a response '
            f'goes at {pace.min_rate} bytes a second after its first {pace.timeout:g} s, with no pause over '
            f'{pace.timeout:g} s (ISS_BODY_MIN_RATE, ISS_BODY_TIMEOUT)'
        )


class PacedResponse(gunicorn.http.wsgi.Response):
    """gunicorn's Response, sending through a :class:`PacedSocket`.

    NOTE: this reaches into gunicorn's Response as of the pinned gunicorn 27.0.1 (as
    :class:`bodies.SocketBody` does into its Body): it sends only through ``self.sock``'s
    ``sendall`` (``util.write``, ``util.write_chunk``) and ``sendfile(file, offset=, count=)``,
    and ``wsgi.create`` makes it from the module's ``Response``, which :func:`pace_responses`
    replaces; test_hostile.py's slow-reader tests fail if an upgrade changes that.
    """

    timeout: float = 60
    min_rate: int = 1024

    def __init__(self, req: Any, sock: Any, cfg: Any) -> None:
        # NOTE: a TLS socket (never ISS's configuration) sends as gunicorn's own: it takes no MSG_DONTWAIT
        if type(sock) is socket.socket:
            sock = PacedSocket(sock, self.timeout, self.min_rate)
        super().__init__(req, sock, cfg)


def pace_responses(timeout: float, min_rate: int, places: int) -> None:
    """Have gunicorn send every response of this process under the body pace, ``places`` of them waiting at most."""
    PacedResponse.timeout, PacedResponse.min_rate = timeout, min_rate
    _waiting.places = places
    gunicorn.http.wsgi.Response = PacedResponse
