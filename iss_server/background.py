"""Work each worker does beside its requests, in a thread: the reconciler, the scrubber, the webhooks' deliverer.

Every worker of every node runs each of them; a lease in the index (named by :func:`holder`)
has one at a time do the work it guards. :class:`Background` is the thread, started once and
stopped on demand (the tests stop every one a test started: :data:`RUNNING`; a worker's ends
with its process).
"""

from __future__ import annotations

import os
import socket
import threading
import uuid


def holder() -> str:
    """A name of this process for the index's leases: unique across nodes, workers and restarts."""
    return f'{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}'


class Background:
    """A daemon thread running :meth:`_run` until :meth:`stop`; ``_stop`` is set then, for its waits."""

    #: The thread's name, as ``py-spy`` and a traceback show it.
    thread_name = 'iss-background'

    def __init__(self) -> None:
        self._holder = holder()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)
        self._thread.start()
        RUNNING.add(self)

    def stop(self, timeout: float | None = None) -> None:
        """Ask the thread to end and wait for it (at most ``timeout`` seconds: one engine call's deadline)."""
        self._stop.set()
        RUNNING.discard(self)
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        raise NotImplementedError


#: Every Background started in this process and not stopped yet.
#: NOTE: for the tests, whose apps come and go in one process: a thread left running holds its
#: store (a closed pool it retries every interval, a deleted directory) and a place in the
#: engines' bulkheads, which a later test then finds taken.
RUNNING: set[Background] = set()
