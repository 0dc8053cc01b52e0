"""ISS's gunicorn worker: gthread, with no thread given to a connection until its request's headers are in.

gunicorn's gthread worker hands each connection to a thread that reads the request's headers
from a blocking socket with no deadline: 33 clients trickling a header byte at a time took
every thread of 2 workers x 16, and ``/health`` stopped answering for as long as they
lasted (issue 29). Here the main loop collects a request's headers itself, from non-blocking
sockets in its poller, and hands the connection to a thread only with its whole header block
buffered; a client that does not complete it within ``ISS_HEADER_TIMEOUT`` seconds is answered
408 and closed, and one address holds at most :data:`MAX_ARRIVING_PER_CLIENT` connections
whose request is still arriving (the next have :data:`ARRIVING_GRACE` seconds for theirs, then
503). A body of at most :data:`MAX_BUFFERED_BODY` bytes is received here too, whole, before a
thread sees it: 200 clients dripping small uploads take no thread, and an honest small upload
never waits behind them for a place. Larger bodies, and chunked ones, take all threads but an eighth at most (the others
wait for a place here, without a thread, ``ISS_BODY_TIMEOUT`` seconds at most and
:data:`MAX_WAITING_PER_CLIENT` of an address, then 503), and ISS reads them at a minimum rate,
each receive (:mod:`iss_server.bodies`). One client holds at most a quarter of the body places
(:data:`BODY_PLACES_SHARE`): its further requests wait, and a freed place goes to the first
waiting request whose client holds less than its share.

Every request the worker refuses itself (408, 431, 503) gets its JSON access line, with
``refused`` saying why (:data:`REFUSALS`), and counts in ``iss_worker_refused_total``.

NOTE: this reaches into gunicorn's ThreadWorker and TConn as of the pinned gunicorn 27.0.1
(as :class:`bodies.SocketBody` does); ``test_hostile.py``'s slowloris tests fail if an
upgrade changes them. TLS and HTTP/2 prior knowledge, which ISS's configuration never turns
on, keep gunicorn's own path.
"""

from __future__ import annotations

import errno
import heapq
import ipaddress
import itertools
import json
import logging
import re
import selectors
import socket
import struct
import time
from collections import Counter
from collections.abc import Callable
from functools import partial
from http import HTTPStatus
from typing import Any

import gunicorn.util
from gunicorn.http2 import negotiation
from gunicorn.workers import gthread

from iss_server import bodies, events, sending, telemetry
from iss_server.config import Settings
from iss_server.errors import error_body

#: Bytes a request's headers may take (request line included): what gunicorn allows of one line
#: (``limit_request_line``) and a few dozen ordinary fields. More is answered 431.
MAX_HEAD_BYTES = 64 * 1024
#: Connections of one client address whose request (headers, or a buffered body) is still arriving, per worker.
MAX_ARRIVING_PER_CLIENT = 64
#: Seconds a connection of an address past :data:`MAX_ARRIVING_PER_CLIENT` has for its whole request, else 503.
#: NOTE: refused at once, a burst of 300 fast /health of one address (a NAT) got 172 503s in 0.17 s: accepted
#: faster than their bytes came, they all counted as arriving. Only the slow ones are still arriving after it.
ARRIVING_GRACE = 1.0
#: Connections of one client address waiting for a body place, per worker; the next request with a body is
#: answered 503 at once (its address's other requests are not: /health needs no body place).
MAX_WAITING_PER_CLIENT = 64
#: Largest body received whole by the main loop (a request that declares its length and expects no
#: ``100 Continue``); larger ones are read by a thread, with a body place. nginx buffers the same (deploy/nginx).
MAX_BUFFERED_BODY = 256 * 1024
#: Seconds a thread drains a body the app left unread, to keep the connection (gunicorn: 5).
DRAIN_SECONDS = 1.0
#: Seconds a connection closed after its answer is still read from by the main loop (its bytes dropped), as
#: nginx's lingering close does: a client still sending the body the answer did not wait for (a 413, a 401) gets
#: that answer, not a reset, once it has sent it (Python's http.client, Java's HttpURLConnection read only then).
LINGER_SECONDS = 5.0
#: Connections a worker lingers on at once; the next ones are closed at once.
MAX_LINGERING = 64
#: One client holds at most this fraction of a worker's body places (at least one): 3 of 14. Slow but legal
#: uploads of one address (above ISS_BODY_MIN_RATE, never cut) held every place for as long as they lasted
#: (issue 29's trial); with a quarter, three quarters stay to the others, and iss-client's 8 parallel jobs
#: over 2 workers still run 6 at once (the others wait their turn here).
BODY_PLACES_SHARE = 1 / 4
#: Why the worker refused a request itself (the ``refused`` of its access line, a label of the metric): a fixed set.
#: Each with its status and the title of its answer.
REFUSALS = {
    'head_timeout': (408, 'Request Timeout'),  # its headers took over ISS_HEADER_TIMEOUT
    'head_too_large': (431, 'Request Header Fields Too Large'),  # its headers exceed MAX_HEAD_BYTES
    'body_too_slow': (408, 'Request body too slow'),  # its small body fell behind ISS_BODY_MIN_RATE
    # its address had MAX_ARRIVING_PER_CLIENT connections still sending, and it took over ARRIVING_GRACE
    'too_many_arriving': (503, 'Too many slow requests'),
    'too_many_waiting': (503, 'Busy receiving'),  # its client had MAX_WAITING_PER_CLIENT waiting for a body place
    'no_body_place': (503, 'Busy receiving'),  # it waited ISS_BODY_TIMEOUT for a body place (or the worker stopped)
}
_TOO_MANY_ARRIVING = (
    f'Over {MAX_ARRIVING_PER_CLIENT} connections from your address are still sending their request; try again shortly.'
)


class ThreadWorker(gthread.ThreadWorker):
    """gunicorn's gthread worker whose threads only ever see requests with their headers complete."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # NOTE: each connection collecting its headers, with its deadline, in the order they started
        # (all have the same timeout, so the first is always the first to expire).
        self._heads: dict[gthread.TConn, float] = {}
        # NOTE: the same, of the connections past their address's MAX_ARRIVING_PER_CLIENT (ARRIVING_GRACE each).
        self._heads_past_the_bound: dict[gthread.TConn, float] = {}
        self._arriving_per_client: Counter[str] = Counter()
        settings = Settings.from_env()
        self._header_timeout = settings.header_timeout
        # NOTE: each connection receiving a small body, with the number of its entry in the heap of deadlines.
        # An entry is the earliest its body may fall behind its pace; when it comes up, the body's real
        # deadline is pushed anew if that is later (bytes arrived meanwhile), and an entry whose number is
        # not its connection's (handed over, or gone) is dropped.
        self._bodies: dict[gthread.TConn, int] = {}
        self._body_deadlines: list[tuple[float, int, gthread.TConn]] = []
        self._body_order = itertools.count()
        self._body_min_rate = settings.body_min_rate
        # NOTE: all threads but an eighth (at least one) may run requests with a body, so slow uploads
        # leave those to everything else, /health included. A request with a body that finds no
        # place waits for one here, in the main loop (no thread held), for ISS_BODY_TIMEOUT at most.
        self.body_places = max(1, self.cfg.threads - max(1, self.cfg.threads // 8))
        self._free_body_places = self.body_places
        self.body_places_per_client = max(1, int(self.body_places * BODY_PLACES_SHARE))
        self._body_places_held: Counter[str] = Counter()
        self._waiting_bodies: dict[gthread.TConn, float] = {}
        self._waiting_per_client: Counter[str] = Counter()
        self._body_wait = settings.body_timeout
        # NOTE: each connection lingering after its close, with its deadline, in the order they started.
        self._lingering: dict[gthread.TConn, float] = {}
        # PERF: whether a connection may need gunicorn's own path (TLS, HTTP/2 prior knowledge), decided
        # once: asking the config per request was 2% of a small GET's samples (py-spy).
        self._maybe_gunicorns_path = bool(self.cfg.is_ssl) or self.cfg.http2_cleartext in ('prior-knowledge', 'both')

    def init_process(self) -> None:
        """gunicorn's, every response of the process sent under the body pace (:mod:`iss_server.sending`)."""
        sending.pace_responses(self._body_wait, self._body_min_rate, places=self.body_places)
        super().init_process()

    def handle_exit(self, sig: int, frame: Any) -> None:
        """SIGTERM: the change feed's waiting requests answer now, so the graceful stop is not held by them."""
        events.STOPPING.set()
        super().handle_exit(sig, frame)

    # -- where gunicorn would hand a connection to a thread --------------------------

    def accept(self, listener: socket.socket) -> None:
        try:
            client_sock, client_addr = listener.accept()
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                raise
            return
        self.nr_conns += 1
        conn = _Connection(self.cfg, client_sock, client_addr, listener.getsockname())
        conn.linger = self._linger
        self._collect_head(conn)

    def on_client_socket_readable(self, conn: gthread.TConn, client: socket.socket) -> None:
        """A kept-alive connection sends its next request: its headers are collected like a new one's."""
        self.poller.unregister(client)
        self.keepalived_conns.remove(conn)
        self._collect_head(conn, readable=True)

    def enqueue_req(self, conn: gthread.TConn) -> None:
        """Hand a connection to a thread once its headers are in, a small body too, or a larger body's place is free.

        What a connection sent ahead (pipelined) may be only part of its next headers: they are collected first.
        """
        if conn.parser is not None and not conn.is_http2:
            ahead = conn.parser.unreader.buf.getvalue()
            if ahead and not _complete(ahead):
                self._collect_head(conn)
                return
            # PERF: where the headers end, found once for the looks below (on every request)
            head = _head_length(ahead)
            length = _buffered_body_length(ahead, head)
            if length is not None:
                if len(ahead) < head + length:
                    self._collect_body(conn, length)
                    return
            elif _declares_a_body(ahead, head):
                client = self._client_of(conn, ahead, head)
                if not self._may_take_a_body_place(client):
                    self._wait_for_a_body_place(conn, client)
                    return
                self._free_body_places -= 1
                self._body_places_held[client] += 1
                conn.body_place = client
        super().enqueue_req(conn)

    def finish_request(self, conn: gthread.TConn, fs: Any) -> None:
        """gunicorn's, after giving back the request's body place to the first waiting request that may take it.

        NOTE: a waiting request's client is at its share, or no place was free: the place freed here
        is the only one a waiting request may take. The look passes at most the waiting requests of
        the clients at their share (MAX_WAITING_PER_CLIENT each, a handful of clients).
        """
        client = getattr(conn, 'body_place', None)
        if client is not None:
            conn.body_place = None
            self._free_body_places += 1
            self._body_places_held[client] -= 1
            if not self._body_places_held[client]:
                del self._body_places_held[client]
            waiting = next((w for w in self._waiting_bodies if self._may_take_a_body_place(w.waiting_as)), None)
            if waiting is not None:
                self._forget_waiting(waiting)
                self.enqueue_req(waiting)
        super().finish_request(conn, fs)

    def _may_take_a_body_place(self, client: str) -> bool:
        """Whether a place is free and ``client`` holds less than its share of them."""
        return bool(self._free_body_places) and self._body_places_held[client] < self.body_places_per_client

    def murder_pending(self) -> None:
        super().murder_pending()
        now = time.monotonic()
        while self._heads:
            conn, deadline = next(iter(self._heads.items()))
            if deadline > now:
                break
            self._refuse_head(conn, 'head_timeout', f'The request headers took over {self._header_timeout:g} s.')
        while self._heads_past_the_bound:
            conn, deadline = next(iter(self._heads_past_the_bound.items()))
            if deadline > now:
                break
            self._refuse_head(conn, 'too_many_arriving', _TOO_MANY_ARRIVING)
        while self._body_deadlines and self._body_deadlines[0][0] <= now:
            _, number, conn = heapq.heappop(self._body_deadlines)
            if self._bodies.get(conn) != number:
                continue
            if self._body_deadline(conn) > now:
                self._await_body(conn)
            else:
                self._refuse_slow_body(conn)
        while self._waiting_bodies:
            conn, deadline = next(iter(self._waiting_bodies.items()))
            if deadline > now and self.alive:
                break
            self._forget_waiting(conn)
            self._refuse_busy(conn, 'no_body_place')
        while self._lingering:
            conn, deadline = next(iter(self._lingering.items()))
            if deadline > now:
                break
            self._stop_lingering(conn)

    def _wait_for_a_body_place(self, conn: gthread.TConn, client: str) -> None:
        """Let the request wait its turn for a body place; past :data:`MAX_WAITING_PER_CLIENT` of ``client``, 503.

        NOTE: it waits too when places are free but ``client`` holds its share: a place it took now
        would be one the next client finds taken, for as long as the upload lasts.

        NOTE: a waiting connection holds no thread, but counts in the worker's connections: one address
        waiting without bound stopped the worker accepting (``worker_connections``), /health included.
        """
        if self._waiting_per_client[client] >= MAX_WAITING_PER_CLIENT:
            self._refuse_busy(conn, 'too_many_waiting')
            return
        conn.waiting_as = client
        self._waiting_per_client[client] += 1
        self._waiting_bodies[conn] = time.monotonic() + self._body_wait

    def _client_of(self, conn: gthread.TConn, ahead: bytes, head: int) -> str:
        """The client a request counts against: its peer's address or, from a trusted proxy, the address it forwards.

        NOTE: behind nginx every request comes from nginx's address: counted there, 64 large uploads of all
        its clients together refused the next. nginx appends the address it saw last in X-Forwarded-For, and
        bounds each client's connections itself (limit_conn). Trusted: gunicorn's ``forwarded_allow_ips``.
        """
        peer = _address(conn.client)
        if isinstance(conn.client, tuple) and not self._trusts(peer):
            return conn.counted_as  # NOTE: a Unix socket's peer is trusted, as gunicorn trusts it
        forwarded = _FORWARDED_FOR.search(ahead, 0, head)
        if forwarded is None:
            return conn.counted_as
        return _counted_as(forwarded[1].rpartition(b',')[2].strip()[:64].decode('latin-1') or peer)

    def _trusts(self, address: str) -> bool:
        """Whether ``address`` is one of gunicorn's ``forwarded_allow_ips`` (a proxy whose forwarding is believed)."""
        if '*' in self.cfg.forwarded_allow_ips:
            return True
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in network for network in self.cfg.forwarded_allow_networks())

    def _forget_waiting(self, conn: gthread.TConn) -> None:
        del self._waiting_bodies[conn]
        address = conn.waiting_as
        self._waiting_per_client[address] -= 1
        if not self._waiting_per_client[address]:
            del self._waiting_per_client[address]

    def _refuse_busy(self, conn: gthread.TConn, refused: str) -> None:
        """Answer 503 with Retry-After before the app (and without reading the body)."""
        self.nr_conns -= 1
        description = 'Too many uploads are arriving right now; try again shortly.'
        _refuse(conn, refused, description, conn.parser.unreader.buf.getvalue())

    def _keepalive_after(self, conn: gthread.TConn, keepalive: bool) -> bool:
        """gunicorn's, draining an unread body for :data:`DRAIN_SECONDS`: a drip after a 401 holds no thread long.

        APPSEC: gunicorn checks the drain's deadline between reads of 1 KiB, and one read of a chunked
        body is as many receives as chunks come (a one-byte chunk every 0.2 s held the thread 200 s):
        the deadline bounds each receive.
        """
        if not keepalive:
            return False
        deadline = time.monotonic() + DRAIN_SECONDS
        with bodies.receiving_through(conn.parser.unreader, partial(_receive_by, deadline, conn.sock)):
            return bool(conn.parser.finish_body(deadline=deadline))

    # -- collecting the headers ------------------------------------------------------

    def _collect_head(self, conn: gthread.TConn, *, readable: bool = False) -> None:
        """Collect the connection's next request headers, from the poller (``readable``: read what is there first)."""
        if self._maybe_gunicorns_path and (
            self.cfg.is_ssl or negotiation.prior_knowledge_allowed(self.cfg, conn.client)
        ):
            super().enqueue_req(conn)  # NOTE: gunicorn's own path (never ISS's configuration)
            return
        address = conn.counted_as
        now = time.monotonic()
        # NOTE: past its address's bound a connection is admitted all the same, with ARRIVING_GRACE for its whole
        # request (headers, and a small body): nothing tells a fast request from a slow one until it has arrived.
        if self._arriving_per_client[address] >= MAX_ARRIVING_PER_CLIENT:
            conn.past_the_bound_until = now + ARRIVING_GRACE
            self._heads_past_the_bound[conn] = conn.past_the_bound_until
        else:
            conn.past_the_bound_until = None
            self._heads[conn] = now + self._header_timeout
        conn.init()  # NOTE: a plain connection's init only makes its parser
        if not readable:  # PERF: gunicorn made a kept-alive socket non-blocking before polling it (an ioctl less)
            conn.sock.setblocking(False)
        conn.head = bytearray(conn.parser.unreader.take_buffered())  # NOTE: what came pipelined
        self._arriving_per_client[address] += 1
        if readable:
            # PERF: a kept-alive connection comes back readable, its next headers in as a rule: read
            # now, they go to a thread without a poller registration, its removal and a turn of the
            # main loop (two epoll_ctl and an epoll_wait per request).
            self._on_head_bytes(conn, conn.sock, registered=False)
            if conn not in self._heads and conn not in self._heads_past_the_bound:
                return  # NOTE: handed over, refused or closed
        self.poller.register(conn.sock, selectors.EVENT_READ, partial(self._on_head_bytes, conn))

    def _on_head_bytes(self, conn: gthread.TConn, client: socket.socket, *, registered: bool = True) -> None:
        data = _receive(conn.sock)
        if data is None:
            return
        if not data:
            self._forget_arriving(conn, self._heads_of(conn), registered)
            self.nr_conns -= 1
            conn.close()
            return
        conn.head += data
        end = _head_end(conn.head)
        if 0 <= end <= MAX_HEAD_BYTES:
            self._forget_arriving(conn, self._heads_of(conn), registered)
            self._hand_over(conn)
        # NOTE: a head that came whole in one receive is bounded too (gunicorn's own bounds are above it)
        elif end >= 0 or len(conn.head) > MAX_HEAD_BYTES:
            self._refuse_head(
                conn, 'head_too_large', f'The request headers exceed {MAX_HEAD_BYTES} bytes.', registered=registered
            )

    def _heads_of(self, conn: gthread.TConn) -> dict[gthread.TConn, float]:
        """The connections collecting their headers that ``conn`` is one of, with their deadlines."""
        return self._heads if conn.past_the_bound_until is None else self._heads_past_the_bound

    def _refuse_head(self, conn: gthread.TConn, refused: str, description: str, *, registered: bool = True) -> None:
        self._forget_arriving(conn, self._heads_of(conn), registered)
        self.nr_conns -= 1
        _refuse(conn, refused, description, conn.head)

    # -- receiving a small body --------------------------------------------------------

    def _collect_body(self, conn: gthread.TConn, length: int) -> None:
        """Receive the rest of a body of ``length`` bytes here, as long as it keeps the pace of ISS_BODY_MIN_RATE.

        NOTE: the pace :class:`bodies.RequestBody` asks of a body it reads, counted from the end of the headers.
        """
        conn.sock.setblocking(False)
        conn.head = bytearray(conn.parser.unreader.take_buffered())
        conn.body_start = _head_length(conn.head)
        conn.body_end = conn.body_start + length
        conn.body_pace = bodies.Pace(self._body_wait, self._body_min_rate)
        conn.body_pace.moved = len(conn.head) - conn.body_start
        self._arriving_per_client[conn.counted_as] += 1
        self._await_body(conn)
        self.poller.register(conn.sock, selectors.EVENT_READ, partial(self._on_body_bytes, conn))

    def _body_deadline(self, conn: gthread.TConn) -> float:
        """When the body falls behind its pace: ISS_BODY_TIMEOUT s, plus a second per ISS_BODY_MIN_RATE bytes.

        Past its address's MAX_ARRIVING_PER_CLIENT, by the end of its ARRIVING_GRACE at the latest.
        """
        paced: float = conn.body_pace.deadline()
        return paced if conn.past_the_bound_until is None else min(paced, conn.past_the_bound_until)

    def _await_body(self, conn: gthread.TConn) -> None:
        self._bodies[conn] = number = next(self._body_order)
        heapq.heappush(self._body_deadlines, (self._body_deadline(conn), number, conn))

    def _refuse_slow_body(self, conn: gthread.TConn) -> None:
        self._forget_arriving(conn, self._bodies)
        self.nr_conns -= 1
        if conn.past_the_bound_until is not None and conn.past_the_bound_until <= time.monotonic():
            _refuse(conn, 'too_many_arriving', _TOO_MANY_ARRIVING, conn.head)
            return
        _refuse(conn, 'body_too_slow', conn.body_pace.shortfall(), conn.head)

    def _on_body_bytes(self, conn: gthread.TConn, client: socket.socket) -> None:
        data = _receive(conn.sock)
        if data is None:
            return
        conn.head += data
        conn.body_pace.moved += len(data)
        if data and self._body_deadline(conn) <= time.monotonic():
            self._refuse_slow_body(conn)  # NOTE: a drip never pauses: it is cut when it falls behind, as it arrives
            return
        # NOTE: a client gone before its last byte goes to a thread too: the app answers its IncompleteBody.
        if not data or len(conn.head) >= conn.body_end:
            self._forget_arriving(conn, self._bodies)
            self._hand_over(conn, to_thread=True)

    # -- lingering after the close ------------------------------------------------------

    def _linger(self, conn: gthread.TConn) -> bool:
        """Read ``conn``, closed for writing, in the poller until its client is done or :data:`LINGER_SECONDS`.

        False when the worker lingers on :data:`MAX_LINGERING` already, or is stopping: close it now.
        """
        if len(self._lingering) >= MAX_LINGERING or not self.alive:
            return False
        self._lingering[conn] = time.monotonic() + LINGER_SECONDS
        self.poller.register(conn.sock, selectors.EVENT_READ, partial(self._on_lingering_bytes, conn))
        return True

    def _on_lingering_bytes(self, conn: gthread.TConn, client: socket.socket) -> None:
        if _read_away(conn.sock):
            self._stop_lingering(conn)

    def _stop_lingering(self, conn: gthread.TConn) -> None:
        del self._lingering[conn]
        self.poller.unregister(conn.sock)
        gunicorn.util.close(conn.sock)

    # -- both ----------------------------------------------------------------------------

    def _hand_over(self, conn: gthread.TConn, to_thread: bool = False) -> None:
        """What arrived goes back to the parser; the connection to :meth:`enqueue_req`, or straight to a thread."""
        conn.parser.unreader.unread(bytes(conn.head))
        conn.head = bytearray()
        conn.data_ready = True
        if to_thread:
            super().enqueue_req(conn)  # NOTE: its small body is all here (or will never be): no place needed
        else:
            self.enqueue_req(conn)

    def _forget_arriving(
        self, conn: gthread.TConn, arriving: dict[gthread.TConn, Any], registered: bool = True
    ) -> None:
        del arriving[conn]
        if registered:
            self.poller.unregister(conn.sock)
        address = conn.counted_as
        self._arriving_per_client[address] -= 1
        if not self._arriving_per_client[address]:
            del self._arriving_per_client[address]


def _refuse(conn: gthread.TConn, refused: str, description: str, head: bytes | bytearray) -> None:
    """Answer a request the worker refuses itself (503s with Retry-After), log and count it, close its connection.

    ``refused``: one of :data:`REFUSALS`; ``head``: what arrived of the request.
    """
    status, title = REFUSALS[refused]
    retry_after = 1 if status == 503 else None
    sent = _answer(conn.sock, status, HTTPStatus(status).phrase, title, description, retry_after=retry_after)
    _log_refusal(_address(conn.client), status, refused, head, sent)
    conn.close(graceful=True)


def answer_parser_refusal(sock: socket.socket, status: int, reason: str, message: str) -> None:
    """Answer a request gunicorn's parser refused in ISS's JSON (gunicorn writes an HTML page through
    ``gunicorn.util.write_error``, which gunicorn.conf.py points here), and log and count it.

    NOTE: gunicorn answers these before ISS sees a request: a malformed request line or header (400), a
    request line over ``limit_request_line`` (414), a transfer coding it does not undo (501); and 500 when
    it failed itself. ``refused`` is ``unparsable``, or ``gunicorn_failed`` for the 500. gunicorn keeps its
    reason "Bad Request" for its 500 and 501: the status's own is said then.
    """
    if reason == 'Bad Request' and status != 400:
        reason = HTTPStatus(status).phrase
    try:
        remote = _address(sock.getpeername())  # NOTE: before the answer: a client gone makes the write reset it
    except OSError:
        remote = ''
    sent = _answer(sock, status, reason, reason, message)
    _log_refusal(remote, status, 'gunicorn_failed' if status == 500 else 'unparsable', b'', sent)


def _log_refusal(remote: str, status: int, refused: str, head: bytes | bytearray, sent: int) -> None:
    """The access line and the count of a request refused before the app; ``head``: what arrived of it,
    ``sent``: the bytes of its answer's body the kernel took."""
    telemetry.worker_refusals().labels(str(status), refused).inc()
    if not telemetry.access_log.isEnabledFor(logging.INFO):
        return
    line = _REQUEST_LINE.match(head)
    method, path, query = (part.decode('latin-1') if part else None for part in line.groups()) if line else [None] * 3
    entry = {
        'request_id': telemetry.new_request_id(),
        'method': method,
        'path': path,
        'query': query,
        'route': None,
        'status': status,
        'bytes_in': 0,
        'bytes_out': sent,
        'remote': remote,
        'refused': refused,
    }
    telemetry.access_log.info('request', extra={'request': entry})


def _address(client: object) -> str:
    """The client's address without its port (a Unix socket's peer is one client)."""
    return str(client[0]) if isinstance(client, tuple) else str(client)


def _counted_as(address: str) -> str:
    """What the bounds per client count ``address`` as: an IPv6 address's /64, any other address whole.

    APPSEC: one host is given a /64 at least (RFC 6177) and may send from any of its 2**64 addresses:
    counted by address, each connection of a slowloris was a client of its own. An IPv4 address mapped
    into IPv6 (a dual-stack listener's) counts as the IPv4 address.
    """
    if ':' not in address:
        return address
    try:
        ip = ipaddress.IPv6Address(address.partition('%')[0])
    except ValueError:
        return address
    if ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ipaddress.IPv6Network((ip, 64), strict=False))


class _Connection(gthread.TConn):
    #: Until when the request must have arrived, when it came past its address's MAX_ARRIVING_PER_CLIENT.
    past_the_bound_until: float | None = None
    #: The worker's :meth:`ThreadWorker._linger`: whether it goes on reading the connection after its close.
    linger: Callable[[gthread.TConn], bool] = staticmethod(lambda conn: False)

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        #: The client the bounds per address count it against (:func:`_counted_as`)
        self.counted_as = _counted_as(_address(self.client))

    def close(self, graceful: bool = False) -> None:
        """Close; gracefully, as nginx does: the answer sent, what the client still sends is read and dropped.

        NOTE: unread bytes make the kernel send a reset, which may cut the answer before the client read it.
        What has arrived is read here; a client still sending is read by the worker's main loop (gunicorn's
        graceful close waited there up to 2 s for a dripping peer, every other connection with it).
        """
        if graceful and not _set_to_reset(self.sock):
            try:
                self.sock.setblocking(False)
                self.sock.shutdown(socket.SHUT_WR)
                if not _read_away(self.sock) and self.linger(self):
                    return
            except OSError:
                pass
        gunicorn.util.close(self.sock)


def _head_end(data: bytes | bytearray) -> int:
    """Where the headers at the start of ``data`` end (their blank line's index), or -1: not in yet.

    PERF: the bare-LF end is looked for only before the CRLF one: a POST's whole body is often
    buffered behind its head, and scanning it for both ends was 8% of a small POST's samples (py-spy).
    """
    crlf = data.find(b'\r\n\r\n')
    lf = data.find(b'\n\n', 0, len(data) if crlf < 0 else crlf)
    return lf if lf >= 0 else crlf


def _complete(head: bytes | bytearray) -> bool:
    """Whether ``head`` holds the end of a request's headers."""
    return _head_end(head) >= 0


_BODY_DECLARED = re.compile(rb'\n(?:content-length[ \t]*:[ \t]*0*[1-9]|transfer-encoding[ \t]*:)', re.IGNORECASE)


def _declares_a_body(ahead: bytes, head: int) -> bool:
    """Whether the headers, the first ``head`` bytes of ``ahead``, declare a body (a length other than 0, or chunked).

    NOTE: a look before gunicorn parses them, to admit the request; gunicorn's parser still
    decides (a malformed header is its 400), and a body it then finds is read as always.
    """
    return _BODY_DECLARED.search(ahead, 0, head) is not None


#: A request line's method, path and query, as much as the log takes of them.
_REQUEST_LINE = re.compile(rb'([A-Z]{1,16}) ([^ \r\n?]{1,2048})(?:\?([^ \r\n]{0,2048}))? HTTP/')
_FORWARDED_FOR = re.compile(rb'\nx-forwarded-for[ \t]*:[ \t]*([^\r\n]*)', re.IGNORECASE)
_CONTENT_LENGTH = re.compile(rb'\ncontent-length[ \t]*:[ \t]*([0-9]{1,16})[ \t]*\r?\n', re.IGNORECASE)
_STREAMED = re.compile(rb'\n(?:transfer-encoding|expect)[ \t]*:', re.IGNORECASE)


def _head_length(ahead: bytes | bytearray) -> int:
    """Bytes the request's headers take at the start of ``ahead`` (all of it while they are incomplete)."""
    end = _head_end(ahead)
    if end < 0:
        return len(ahead)
    return end + (2 if ahead.startswith(b'\n\n', end) else 4)


def _buffered_body_length(ahead: bytes | bytearray, head: int) -> int | None:
    """The length of the body the main loop receives whole (1 to :data:`MAX_BUFFERED_BODY` bytes), else None.

    ``head``: the bytes the headers take at the start of ``ahead`` (:func:`_head_length`).

    NOTE: a chunked body, or one whose client waits for ``100 Continue`` (gunicorn's thread sends it), is read by a
    thread as before; so is a malformed length, which gunicorn's parser answers 400.
    """
    if _STREAMED.search(ahead, 0, head):
        return None
    lengths = _CONTENT_LENGTH.findall(ahead, 0, head)
    if len(lengths) != 1 or not 0 < int(lengths[0]) <= MAX_BUFFERED_BODY:
        return None
    return int(lengths[0])


def _receive(sock: socket.socket) -> bytes | None:
    """What arrived on a non-blocking socket: b'' when the client is gone, None when nothing after all."""
    try:
        return sock.recv(MAX_HEAD_BYTES)
    except (BlockingIOError, InterruptedError):
        return None
    except OSError:
        return b''


def _set_to_reset(sock: socket.socket) -> bool:
    """Whether the socket is to be reset at its close (SO_LINGER of 0 s): a response cut short (sending.py)."""
    try:
        on, seconds = struct.unpack('ii', sock.getsockopt(socket.SOL_SOCKET, socket.SO_LINGER, 8))
    except OSError:
        return True
    return bool(on) and not seconds


def _read_away(sock: socket.socket) -> bool:
    """Drop what arrived on a non-blocking socket (at most 1 MiB at a time); whether its client is done sending."""
    try:
        for _ in range(16):
            if not sock.recv(65536):
                return True
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        return True
    return False


def _receive_by(deadline: float, sock: socket.socket, receive: Callable[[], bytes]) -> bytes:
    """``receive()`` from ``sock``, waiting no later than ``deadline`` (:func:`time.monotonic`)."""
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise TimeoutError('the drain of an unread body took its time')
    sock.settimeout(remaining)
    return receive()


def _answer(
    sock: socket.socket, status: int, reason: str, title: str, description: str, retry_after: int | None = None
) -> int:
    """Answer in ISS's JSON without blocking (a client that reads nothing gets the close alone); the body's bytes
    the kernel took (0 when it took not all of the answer)."""
    body = json.dumps(error_body(status, title, description)).encode()
    retry = f'Retry-After: {retry_after}\r\n' if retry_after is not None else ''
    head = (
        f'HTTP/1.1 {status} {reason}\r\nConnection: close\r\n{retry}'
        f'Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n'
    )
    try:
        sock.setblocking(False)
        gunicorn.util.write(sock, head.encode() + body)
    except OSError:
        return 0
    return len(body)
