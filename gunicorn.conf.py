"""gunicorn settings for ISS, from the same environment as the app (see example.env).

``gunicorn iss:app`` reads this file from the working directory by itself.
"""

import errno
import os
import resource
import shutil
import socket
import sys
import tempfile

import gunicorn.arbiter
import gunicorn.glogging
import gunicorn.http.body
import gunicorn.http.wsgi
import gunicorn.systemd
import gunicorn.util
import gunicorn.workers.base
from gunicorn.http.parser import _DRAIN_MAX_BYTES

from iss_server import syscalls
from iss_server.config import Settings
from iss_server.errors import ServiceError
from iss_server.sending import ClientStoppedReading

_settings = Settings.from_env()

# Each worker counts into its own files here; GET /metrics adds them up. A fresh directory per
# start, as prometheus_client requires, unless the operator names one (and wipes it).
# NOTE: written to the environment, where prometheus_client and the workers' Settings read it.
_own_metrics_dir = None
if not _settings.metrics_dir:
    _own_metrics_dir = os.environ['PROMETHEUS_MULTIPROC_DIR'] = tempfile.mkdtemp(prefix='iss-metrics-')

# NOTE: only now: prometheus_client picks its multiprocess mode when first imported.
from iss_server import telemetry  # noqa: E402
from iss_server.worker import MAX_HEAD_BYTES, answer_parser_refusal  # noqa: E402

wsgi_app = 'iss:app'
bind = f'{_settings.host}:{_settings.port}'
workers = _settings.workers
# NOTE: gthread, not sync: a thread per connection, so a slow client holding an
# upload open blocks one thread, not the worker, and /health keeps answering.
# gunicorn still hands file responses to sendfile(2) with this worker.
# NOTE: ISS's gthread (iss_server/worker.py): a thread only for a request whose headers are in,
# so clients trickling headers cannot take the threads (issue 29).
worker_class = 'iss_server.worker.ThreadWorker'
threads = _settings.threads
keepalive = _settings.keepalive
timeout = _settings.timeout
graceful_timeout = 30
loglevel = _settings.log_level
# NOTE: JSON lines on stderr; ISS writes one access line per request itself (telemetry.py).
logconfig_dict = telemetry.logging_config(_settings.log_level)
accesslog = None


class _Logger(gunicorn.glogging.Logger):
    """gunicorn's logger without its access log: ISS writes one JSON access line itself.

    PERF: with a logconfig_dict, gunicorn builds its access-log fields for every request
    even though nothing is configured to write them (~7% of a small GET, py-spy).
    """

    def access(self, resp: object, req: object, environ: dict, request_time: object) -> None:
        # NOTE: gunicorn calls this in a finally once the body is out: an exception on its way
        # out is what cut the body (a client that went away), and ISS's line says so.
        telemetry.body_done(environ, written=getattr(resp, 'iss_written', 0), failure=sys.exc_info()[1])

    def exception(self, msg: object, *args: object, **kwargs: object) -> None:
        failure = sys.exc_info()[1]
        if isinstance(failure, ServiceError):
            # NOTE: ISS cut a body it had begun (a blob that failed its hash, a store gone mid-read):
            # expected, said in one line here and in the request's access line, not a traceback.
            self.error('%s: the body was cut short: %s', msg, failure)
            return
        if isinstance(failure, ClientStoppedReading):
            # NOTE: a client's doing, like the reset gunicorn logs at debug; the access line's "cut" says it
            self.debug('%s: %s', msg, failure)
            return
        super().exception(msg, *args, **kwargs)


telemetry.write_access_after_body()
_emit_body = gunicorn.http.wsgi.Response._emit_body


def _emit_and_count(self: gunicorn.http.wsgi.Response, data: bytes) -> None:
    """gunicorn's own, then count the body bytes really written (its ``sent`` counts them before)."""
    _emit_body(self, data)
    self.iss_written = getattr(self, 'iss_written', 0) + len(data)


# NOTE: the hook gunicorn keeps for subclasses that frame the body; its Response is not configurable.
gunicorn.http.wsgi.Response._emit_body = _emit_and_count
_should_close = gunicorn.http.wsgi.Response.should_close


def _closing_after_its_body(self: gunicorn.http.wsgi.Response) -> bool:
    """gunicorn's, and a request whose body failed to read (a 408, a 400 cut short, a 413 chunk) or whose unread
    rest of known length is more than gunicorn drains (a 413 declared): its answer says ``Connection: close``,
    which gunicorn then does (its parser never reuses such a connection).

    NOTE: gunicorn decides the header before the connection's fate, and said keep-alive (issue 29). A chunked
    body left unread (a 405 to a drip) is still drained after the answer, and may yet close: not known here.
    """
    body = getattr(self.req, 'body', None)
    reader = getattr(body, 'reader', None)
    return (
        bool(_should_close(self))
        or getattr(body, 'failed', False) is True
        # NOTE: ISS's SocketBody keeps the reader's length; the drain stops at gunicorn's byte cap
        or (isinstance(reader, gunicorn.http.body.LengthReader) and reader.length >= _DRAIN_MAX_BYTES)
    )


gunicorn.http.wsgi.Response.should_close = _closing_after_its_body


logger_class = _Logger
# NOTE: gunicorn 27 otherwise opens a control socket under $HOME.
control_socket_disable = True
# The longest request line gunicorn allows (its default is 4094): an artifact's `meta` may
# travel in the query string. Larger `meta` goes as a form field (ISS_MAX_META_BYTES).
limit_request_line = 8190
# NOTE: ISS's worker bounds the whole head (MAX_HEAD_BYTES, 64 KiB, else 431); gunicorn's own bound of a field
# (8190 bytes) was stricter, and kept a tus Upload-Metadata of a few files' names under 8 KiB: one field may
# take the whole head. gunicorn's 100 fields stay (431 beyond): 13,000 fields of 5 bytes cost 120 ms a request.
limit_request_field_size = MAX_HEAD_BYTES


# NOTE: gunicorn answers the requests it refuses itself (400, 414, 431...) through this one function, as an HTML
# page; ISS answers them in its JSON, with an access line and a count.
gunicorn.util.write_error = answer_parser_refusal


def _return_large_buffers_to_the_os() -> None:
    """Serve large allocations from mmap, always, so they go back to the OS when freed.

    glibc raises its mmap threshold each time a large block is freed, after which the
    1 MiB upload buffers come from heaps that fragment: in a 45 s soak the workers' RSS
    rose steadily (+45 MiB) while Python's own heap stayed flat; with the threshold pinned
    it stays flat. Called here, in the master before it forks, so every worker has it.
    A libc without mallopt (musl) keeps its own behaviour.
    """
    syscalls.set_mmap_threshold(128 * 1024)


_return_large_buffers_to_the_os()


def _allow_the_files_batches_hold() -> None:
    """Raise the soft limit of open files to the hard one, in the master, so every worker has it.

    Each file of a batch upload in flight holds a descriptor (its staged temp file, whose
    flock marks it live) until the batch commits: 16 threads each receiving a batch of
    ISS_MAX_BATCH_FILES would pass the usual soft limit of 1024 long before the hard one.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


_allow_the_files_batches_hold()


def on_starting(server: gunicorn.arbiter.Arbiter) -> None:
    """Refuse at once, in one line, to start on an address another program holds.

    NOTE: gunicorn itself retries a taken port five times, a second apart, then exits with a
    bare "Can't connect": the line that says which setting to change comes from here.
    """
    # Sockets handed over by systemd or by the old master of a USR2 upgrade are bound already.
    inherited = gunicorn.systemd.listen_fds(unset_environment=False) or server.master_pid or server.cfg.reuse_port
    for address in [] if inherited else server.cfg.address:
        if isinstance(address, tuple):
            _exit_unless_free(server, *address[:2])


def _exit_unless_free(server: gunicorn.arbiter.Arbiter, host: str, port: int) -> None:
    family = socket.AF_INET6 if ':' in host else socket.AF_INET
    try:
        # NOTE: SO_REUSEADDR, as gunicorn binds, so a port in TIME_WAIT is free to both.
        socket.create_server((host, port), family=family, reuse_port=False).close()
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            reason = f'port {port} is in use on {host or "all addresses"}: stop what listens there, or set ISS_PORT'
        else:
            # NOTE: the errno's own text: create_server's strerror adds the address again
            error = os.strerror(exc.errno) if exc.errno is not None else str(exc)
            reason = f'cannot listen on {host}:{port} ({error}): check ISS_HOST and ISS_PORT'
        on_exit(server)
        if server.pidfile is not None:
            server.pidfile.unlink()
        sys.exit(f'iss: {reason} (see example.env)')


def child_exit(server: gunicorn.arbiter.Arbiter, worker: gunicorn.workers.base.Worker) -> None:
    """A dead worker's gauges go; its counters stay in the sums (prometheus_client's rule)."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def on_exit(server: gunicorn.arbiter.Arbiter) -> None:
    if _own_metrics_dir:
        shutil.rmtree(_own_metrics_dir, ignore_errors=True)
