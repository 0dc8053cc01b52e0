"""What guards each call ISS makes to an engine it runs on: the PostgreSQL index and the S3 bucket.

An engine that hangs (a frozen server, a failover, a black-holed network) must cost a request
its deadline and a JSON 503 with ``Retry-After``, never a hang, and must not take the worker
with it. Two guards, one per concern:

- :class:`Bulkhead`: at most a bounded share of a worker's threads wait on one engine at once
  (``ISS_THREADS`` // 2); one more waits for a place while the engine answers, and is refused at
  once, as that engine's 503, when it does not. So while the index is frozen, ``/health/live``,
  blobs and whatever does not need it still find threads.
- :class:`Watchdog`: a deadline on a call blocked on a socket, which the peer cannot enforce when
  it is frozen (PostgreSQL's ``statement_timeout`` is counted by the server; a stopped server's
  kernel still acknowledges every byte, so TCP keepalives and ``tcp_user_timeout`` never fire).
  Past the deadline the socket is shut down: the call blocked on it fails at once, and the
  connection is dropped. boto3 needs none: its socket timeouts are client-side (see drivers/s3.py).

A request makes several engine calls in sequence (an intent, the puts, the row); each with a
deadline of its own, a hanging engine would cost the request a deadline per call. So a request
has a :class:`Budget` per engine: the seconds its thread may spend in that engine's calls in all,
the engine's own deadline (``ISS_INDEX_TIMEOUT`` for the index, ``ISS_S3_TIMEOUT`` for the
bucket). Each call gets at most what is left of its engine's (the index's watchdog deadline; an
S3 attempt starts only if a whole attempt fits), and once it is spent the engine's next call is
refused at once, as its 503. So a hung index costs a request at most ``ISS_INDEX_TIMEOUT``
however many index calls it makes, and a hung bucket at most ``ISS_S3_TIMEOUT``. Time spent
receiving or sending a body is not counted, only time inside engine calls; threads that serve no
request (the reconciler, the scrubber, webhooks, the parts an upload sends alongside) have no budget.

``INDEX`` and ``BUCKET`` are this process's bulkheads, each with its engine's budget;
:func:`configure` sizes them from the settings.
:class:`Probes` asks each engine with a deadline of its own, for ``/health/ready``.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import itertools
import logging
import math
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator

from iss_server.config import Settings
from iss_server.errors import BucketUnavailable, IndexUnavailable, StoreUnavailable

log = logging.getLogger(__name__)


def _nothing(engine: str) -> None:
    """What an engine's guard calls when it refuses or cuts a call, until :func:`configure` says."""


class Bulkhead:
    """At most ``limit`` threads of this process inside calls to one engine at once.

    One more waits for a place while the engine answers (a loaded one frees places within
    milliseconds); when the oldest call inside has waited :data:`STUCK` seconds, or a call took
    that long in the last :data:`REMEMBERED` seconds, the engine is taken for stuck and the next
    calls are refused at once, until a place frees. A thread already
    inside counts once, however deep its calls nest (a blob's body read while its meta is fetched).
    ``limit`` 0 lets every thread in (the command line, the tests' stores).
    """

    #: Seconds after which an engine whose places are all taken is taken for stuck.
    STUCK = 1.0
    #: Seconds a call that took STUCK or more marks the engine as stuck (its places taken by the next
    #: ones, which a frozen engine holds each for a whole deadline).
    REMEMBERED = 10.0
    #: Seconds between two looks of a call waiting for a place.
    _LOOK = 0.05

    def __init__(self, engine: str, unavailable: type[StoreUnavailable], setting: str = '') -> None:
        self.engine = engine
        self._unavailable = unavailable
        #: A request's seconds in this engine's calls (``setting``, its deadline).
        self.budget = Budget(engine, setting)
        self.limit = 0
        self._since: dict[int, float] = {}  # NOTE: the threads inside, by ident: when each came in
        self._slow_at = -self.REMEMBERED  # NOTE: when a call that took STUCK or more ended
        self._lock = threading.Condition()
        self._local = threading.local()
        #: Called with the engine's name for each call refused (``iss_engine_refused_calls``).
        self.on_refused: Callable[[str], None] = _nothing

    @contextlib.contextmanager
    def call(self) -> Iterator[None]:
        """Hold a place while the block runs.

        Raises:
            StoreUnavailable: (the engine's own kind) every place is held by a call older than STUCK,
                or the request's :attr:`budget` for this engine is spent.
        """
        if self.budget.left() <= 0:
            self.on_refused(self.engine)
            raise self._unavailable(f'the {self.engine} is not asked: {self.budget.refusal()}')
        # NOTE: the wait for a place is the request's too.
        with self.budget.spending(), self._place():
            yield

    @contextlib.contextmanager
    def _place(self) -> Iterator[None]:
        depth = getattr(self._local, 'depth', 0)
        thread = threading.get_ident()
        if depth == 0:
            with self._lock:
                while self.limit and len(self._since) >= self.limit:
                    now = time.monotonic()
                    waited = now - min(self._since.values())
                    if waited >= self.STUCK or now - self._slow_at < self.REMEMBERED:
                        self.on_refused(self.engine)
                        raise self._unavailable(
                            f'the {self.engine} is slow to answer: {len(self._since)} calls of this worker wait '
                            f'on it, for {waited:.1f} s already (at most ISS_THREADS // 2 may)'
                        )
                    self._lock.wait(self._LOOK)
                self._since[thread] = time.monotonic()
        self._local.depth = depth + 1
        try:
            yield
        finally:
            self._local.depth = depth
            if depth == 0:
                with self._lock:
                    now = time.monotonic()
                    if now - self._since.pop(thread) >= self.STUCK:
                        self._slow_at = now
                    self._lock.notify()

    @property
    def inside(self) -> int:
        """Threads inside a call now."""
        return len(self._since)


class Budget:
    """The seconds a request's thread may spend inside one engine's calls, all together (see the module's docstring).

    :meth:`request` gives the calling thread its budget; calls made outside one are not counted, and
    find the whole of their own deadline (:meth:`left` is infinite).
    """

    def __init__(self, engine: str, setting: str = '') -> None:
        self.engine = engine
        #: The setting :attr:`seconds` comes from, named in a refusal.
        self.setting = setting
        #: Seconds per request: the engine's deadline (:func:`configure`); 0, none.
        self.seconds = 0.0
        self._local = threading.local()

    @contextlib.contextmanager
    def request(self) -> Iterator[None]:
        """The block is one request: its calls to the engine share :attr:`seconds`."""
        self.start()
        try:
            yield
        finally:
            self.stop()

    def start(self) -> None:
        """This thread's request begins (see :class:`PerRequest`), with the whole of :attr:`seconds`."""
        self._local.allowed = self.seconds or math.inf
        self._local.spent = 0.0
        self._local.since = None

    def stop(self) -> None:
        """This thread's request is over: its further calls are not counted."""
        self._local.allowed = math.inf

    def left(self) -> float:
        """Seconds this thread's request may still spend in the engine's calls (infinite outside a request)."""
        allowed = getattr(self._local, 'allowed', math.inf)
        if allowed == math.inf:
            return math.inf
        since = self._local.since
        return allowed - self._local.spent - (time.monotonic() - since if since is not None else 0.0)

    def within(self, seconds: float) -> float:
        """A call's own deadline, ``seconds``, cut to what the request has left (never below 0)."""
        return max(0.0, min(seconds, self.left()))

    def refusal(self) -> str:
        """Why a call is refused: the words of its 503."""
        setting = f' ({self.setting})' if self.setting else ''
        return f'too little is left of the {self.seconds:g} s this request may spend in {self.engine} calls{setting}'

    @contextlib.contextmanager
    def spending(self) -> Iterator[None]:
        """Count the block's time as spent (once, however deep the calls nest)."""
        if getattr(self._local, 'allowed', math.inf) == math.inf or self._local.since is not None:
            yield
            return
        self._local.since = time.monotonic()
        try:
            yield
        finally:
            self._local.spent += time.monotonic() - self._local.since
            self._local.since = None


class PerRequest:
    """Falcon middleware: each request's calls to an engine share that engine's budget (:attr:`Bulkhead.budget`).

    NOTE: a body streamed after the response started (a blob's bytes) is read outside it: a
    client reads at its own pace, and each read has the bucket's own deadline.
    """

    def process_request(self, req: object, resp: object) -> None:
        for bulkhead in (INDEX, BUCKET):
            bulkhead.budget.start()

    def process_response(self, req: object, resp: object, resource: object, req_succeeded: bool) -> None:
        for bulkhead in (INDEX, BUCKET):
            bulkhead.budget.stop()


INDEX = Bulkhead('index', IndexUnavailable, 'ISS_INDEX_TIMEOUT')
BUCKET = Bulkhead('bucket', BucketUnavailable, 'ISS_S3_TIMEOUT')


def configure(settings: Settings, *, refused: Callable[[str], None], cut: Callable[[str], None]) -> None:
    """Size this process's bulkheads: each engine may hold half of a worker's threads (at least one);
    and a request's budget in each engine's calls: its deadline.

    ``refused`` and ``cut`` are called with an engine's name for each call its bulkhead refused,
    and each the watchdog cut off at its deadline (the app's metrics).
    """
    INDEX.budget.seconds = settings.index_timeout
    BUCKET.budget.seconds = settings.s3_timeout
    for bulkhead in (INDEX, BUCKET):
        bulkhead.limit = max(1, settings.threads // 2)
        bulkhead.on_refused = refused
    WATCHDOG.on_cut = cut


@dataclasses.dataclass(eq=False)
class _Call:
    """One call the watchdog guards: when it must be over, and the socket to shut if not."""

    until: float
    fd: int
    expired: bool = False


class Watchdog:
    """Shuts a socket down when the call blocked on it runs past its deadline (see the module's docstring).

    One daemon thread per process looks every :data:`TICK` seconds, so a deadline is kept to
    within a tick; a call costs a dict entry and an uncontended lock, and no thread of its own.
    """

    #: Seconds between two looks: how late past its deadline a call may end.
    TICK = 0.1

    #: The engine it guards (only the index needs it).
    engine = 'index'

    def __init__(self) -> None:
        self._calls: dict[int, _Call] = {}
        self._numbers = itertools.count()
        self._lock = threading.Lock()
        self._thread_pid = 0
        #: Called with the engine's name for each call cut off (``iss_engine_cut_calls``).
        self.on_cut: Callable[[str], None] = _nothing

    @contextlib.contextmanager
    def deadline(self, fd: int, seconds: float) -> Iterator[_Call]:
        """Guard the block's use of socket ``fd``: past ``seconds`` it is shut down, and ``expired`` set.

        NOTE: the entry is removed under the lock before the block's caller hands the
        connection on, so a socket is never shut after its call ended in time.
        """
        call = _Call(time.monotonic() + seconds, fd)
        number = next(self._numbers)
        if self._thread_pid != os.getpid():
            self._start()  # NOTE: a forked child has none of its parent's threads
        with self._lock:
            self._calls[number] = call
        try:
            yield call
        finally:
            with self._lock:
                self._calls.pop(number, None)

    def _start(self) -> None:
        with self._lock:
            if self._thread_pid == os.getpid():
                return
            self._calls.clear()  # NOTE: the parent's calls; not this process's to cut
            self._thread_pid = os.getpid()
        threading.Thread(target=self._watch, name='iss-engine-watchdog', daemon=True).start()

    def _watch(self) -> None:
        while True:
            time.sleep(self.TICK)
            now = time.monotonic()
            with self._lock:
                late = [self._calls.pop(number) for number, call in list(self._calls.items()) if call.until <= now]
                for call in late:
                    call.expired = True
                    _shut(call.fd)
            for _ in late:
                self.on_cut(self.engine)


def _shut(fd: int) -> None:
    """Shut the socket down (both ways): a read or write blocked on it returns at once, with an error."""
    try:
        # NOTE: on a duplicate, so that closing it leaves the connection's own descriptor alone.
        with socket.socket(fileno=os.dup(fd)) as sock:
            sock.shutdown(socket.SHUT_RDWR)
    except OSError as exc:
        log.warning('could not cut off a call past its deadline: %s', exc)


WATCHDOG = Watchdog()


class Probes:
    """Checks of the engines, each answered within a deadline of its own (``/health/ready``).

    A check runs in a thread of its own; one that outlives a caller's deadline goes on, and
    callers meanwhile wait on that same run rather than start another, so a stuck engine holds
    one thread here however often it is asked.
    """

    def __init__(self, checks: dict[str, Callable[[], object]]) -> None:
        self._checks = checks
        self._running: dict[str, concurrent.futures.Future[object]] = {}
        self._lock = threading.Lock()

    def run(self, seconds: float) -> dict[str, BaseException | None]:
        """Each check's failure (``TimeoutError``: no answer within ``seconds``), or None; in the checks' order."""
        until = time.monotonic() + seconds
        running = {name: self._start(name) for name in self._checks}
        outcomes: dict[str, BaseException | None] = {}
        for name, future in running.items():
            try:
                outcomes[name] = future.exception(timeout=max(0.0, until - time.monotonic()))
            except concurrent.futures.TimeoutError:
                outcomes[name] = TimeoutError(f'no answer within {seconds:g} s')
        return outcomes

    def _start(self, name: str) -> concurrent.futures.Future[object]:
        with self._lock:
            future = self._running.get(name)
            if future is None or future.done():
                future = self._running[name] = concurrent.futures.Future()
                threading.Thread(target=self._check, args=(name, future), name=f'iss-probe-{name}', daemon=True).start()
            return future

    def _check(self, name: str, future: concurrent.futures.Future[object]) -> None:
        try:
            future.set_result(self._checks[name]())
        except BaseException as exc:  # NOTE: handed to the caller, whatever it is
            future.set_exception(exc)
