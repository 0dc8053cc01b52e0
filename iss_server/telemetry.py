"""What ISS tells its operators: Prometheus metrics, request ids and JSON logs.

Metrics are prometheus_client's. Under gunicorn, gunicorn.conf.py points
``PROMETHEUS_MULTIPROC_DIR`` (``Settings.metrics_dir``) at a fresh directory before the workers start, so
each worker counts into its own memory-mapped file and ``GET /metrics``, served
by any worker, adds them all up. Without it (one process, the tests) they stay
in memory. The store's totals are read from the index when scraped.

Every request gets an id (the client's or nginx's ``X-Request-Id`` when it is
sane, else a new one), returned in ``X-Request-Id`` and written in the one JSON
access line logged per request. Bodies are never logged.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import os
import re
import secrets
import time
import traceback
from collections.abc import Iterator
from typing import Any

import falcon
import prometheus_client
from prometheus_client import multiprocess
from prometheus_client.core import GaugeMetricFamily

from iss_server.errors import ServiceError
from storage import BlobStore

access_log = logging.getLogger('iss.access')

_REQUEST_ID_PATTERN = re.compile(r'[A-Za-z0-9._:-]{1,128}')
# APPSEC: a label value is a time series kept for good (~4.5 KiB each in the multiprocess
# directory): only these methods, and the app's own routes, become one; the rest are counted
# as 'other' and 'unmatched'.
_METHODS = frozenset({'GET', 'HEAD', 'POST', 'PUT', 'PATCH', 'DELETE', 'OPTIONS'})
_UPLOAD_ROUTES = frozenset({'/images', '/artifacts', '/images/{blob_id}', '/artifacts/{blob_id}'})
# Seconds until the response starts: ~0.2 ms for a small GET, up to minutes for a large upload.
_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)


class Metrics:
    """The app's counters and histogram, and the registry ``GET /metrics`` renders."""

    def __init__(self, store: BlobStore, *, shared: bool) -> None:
        """``shared``: prometheus_client's multiprocess mode, values in files every worker adds to."""
        self._multiprocess = shared
        # NOTE: in multiprocess mode values live in files, and the scrape reads them all;
        # otherwise each app has a registry of its own (the tests build many apps).
        own = None if self._multiprocess else prometheus_client.CollectorRegistry()
        self.requests = prometheus_client.Counter(
            'iss_http_requests', 'HTTP requests answered.', ['route', 'method', 'status'], registry=own
        )
        self.latency = prometheus_client.Histogram(
            'iss_http_request_duration_seconds',
            'Time until the response starts (a streamed body is sent after).',
            ['route', 'method'],
            buckets=_LATENCY_BUCKETS,
            registry=own,
        )
        self.bytes_received = prometheus_client.Counter(
            'iss_http_received_bytes', 'Request body bytes, as declared.', ['route'], registry=own
        )
        self.bytes_sent = prometheus_client.Counter(
            'iss_http_sent_bytes', 'Response body bytes.', ['route'], registry=own
        )
        self.uploads = prometheus_client.Counter(
            'iss_uploads', 'Uploads stored: new content, or content already stored.', ['result'], registry=own
        )
        self.reconciled = prometheus_client.Counter(
            'iss_reconcile_fixed',
            'Writes left half-done (a crash, a kill, an outage) that the reconciler finished or undid, by outcome.',
            ['kind'],
            registry=own,
        )
        self.scrubbed = prometheus_client.Counter(
            'iss_scrub_blobs',
            'Blobs the scrubber read back and hashed, by result: verified, corrupt (quarantined), '
            'missing (a row without its blob), changed (deleted or stored anew while read).',
            ['result'],
            registry=own,
        )
        self.scrubbed_bytes = prometheus_client.Counter(
            'iss_scrub_read_bytes', 'Bytes the scrubber read back and hashed.', registry=own
        )
        self.large_reads = prometheus_client.Counter(
            'iss_large_reads',
            'Full GETs of blobs of ISS_ACCEL_MIN_BYTES or more behind nginx, by who sent the bytes: nginx '
            '(verified within ISS_VERIFY_MAX_AGE, or a store on disk) or iss (streamed, hashed as they went).',
            ['sent_by'],
            registry=own,
        )
        # NOTE: see iss_server/engines.py: an engine that hangs shows here before its 503s pile up.
        self.engine_refused = prometheus_client.Counter(
            'iss_engine_refused_calls',
            'Calls to an engine (index, bucket) refused at once: half the threads already waited on it.',
            ['engine'],
            registry=own,
        )
        self.engine_cut = prometheus_client.Counter(
            'iss_engine_cut_calls',
            'Calls to an engine cut off at their deadline (ISS_INDEX_TIMEOUT).',
            ['engine'],
            registry=own,
        )
        if own is None:  # NOTE: multiprocess mode
            self.registry = prometheus_client.CollectorRegistry()
            multiprocess.MultiProcessCollector(self.registry)
        else:
            self.registry = own
        self.registry.register(StoreCollector(store))
        # PERF: labels() checks its values and takes the metric's lock on every call (four a request);
        # the request metrics' children are kept here by their label values (a few routes, methods, statuses).
        self._children: dict[tuple[Any, ...], Any] = {}

    def _child(self, metric: Any, *values: str) -> Any:
        """``metric.labels(*values)``, looked up once."""
        key = (metric, *values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*values)
        return child

    def observe(self, req: falcon.Request, resp: falcon.Response, seconds: float, bytes_sent: int) -> None:
        route = req.uri_template or 'unmatched'  # NOTE: a template of the app's routes, or none
        method = req.method if req.method in _METHODS else 'other'
        status = resp.status_code
        self._child(self.requests, route, method, str(status)).inc()
        self._child(self.latency, route, method).observe(seconds)
        if req.content_length:
            self._child(self.bytes_received, route).inc(req.content_length)
        if bytes_sent:
            self._child(self.bytes_sent, route).inc(bytes_sent)
        if method in ('POST', 'PUT') and route in _UPLOAD_ROUTES and status in (200, 201):
            self._child(self.uploads, 'new' if status == 201 else 'existing').inc()


@functools.cache
def worker_refusals() -> prometheus_client.Counter:
    """The count of requests ISS's gunicorn worker refused itself, by status and why (iss_server/worker.py).

    NOTE: made in the worker, not by :class:`Metrics`: only under gunicorn, so always in multiprocess
    mode, where a value goes to the worker's files whatever registry holds it, and ``/metrics`` adds them up.
    """
    return prometheus_client.Counter(
        'iss_worker_refused',
        'Requests the worker answered itself before the app: 408, 431 (slow or huge headers, a small body '
        'behind ISS_BODY_MIN_RATE), 503 (too many of one address arriving or waiting, no body place in time); '
        "and those gunicorn's parser refused (reason unparsable: 400, 414, 501...; gunicorn_failed: 500).",
        ['status', 'reason'],
        registry=None,
    )


class StoreCollector:
    """Blob count and bytes per kind, from the index's totals at scrape time."""

    def __init__(self, store: BlobStore) -> None:
        self._store = store

    def collect(self) -> Iterator[GaugeMetricFamily]:
        blobs = GaugeMetricFamily('iss_store_blobs', 'Blobs stored, per kind.', labels=['kind'])
        size = GaugeMetricFamily('iss_store_bytes', 'Bytes stored, per kind.', labels=['kind'])
        try:
            totals = self._store.totals()
        except ServiceError:
            return  # NOTE: index not built yet, or the disk is failing: no figures beats wrong ones
        for kind, (count, total) in totals.items():
            blobs.add_metric([kind], count)
            size.add_metric([kind], total)
        yield blobs
        yield size


class MetricsEndpoint:
    """``GET /metrics``: the Prometheus text format."""

    def __init__(self, metrics: Metrics) -> None:
        self._registry = metrics.registry

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.data = prometheus_client.generate_latest(self._registry)
        resp.content_type = prometheus_client.CONTENT_TYPE_LATEST
        resp.cache_control = ('no-store',)


class RequestTelemetry:
    """Middleware: a request id on every request and response, one access line, the metrics."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self._pid = os.getpid()

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        req.context.started = time.perf_counter()
        given = req.get_header('X-Request-Id')
        req.context.request_id = given if given and _REQUEST_ID_PATTERN.fullmatch(given) else new_request_id()
        resp.set_header('X-Request-Id', req.context.request_id)

    def process_response(
        self, req: falcon.Request, resp: falcon.Response, resource: object, req_succeeded: bool
    ) -> None:
        seconds = time.perf_counter() - req.context.started
        body = resp.render_body()
        bytes_sent = len(body) if body is not None else (resp.content_length or 0)
        if req.method == 'HEAD' or resp.status_code == 304:
            bytes_sent = 0
        self._metrics.observe(req, resp, seconds, int(bytes_sent))
        if access_log.isEnabledFor(logging.INFO):
            entry = {
                'request_id': req.context.request_id,
                'method': req.method,
                'path': req.path,
                'query': req.query_string or None,
                'route': req.uri_template,
                'status': resp.status_code,
                'duration_ms': round(seconds * 1000, 3),
                'bytes_in': req.content_length or 0,
                'bytes_out': int(bytes_sent),
                'remote': req.remote_addr,
                'user_agent': req.user_agent,
            }
            if _written_after_body:
                req.env[_DEFERRED] = (entry, resp.stream, _file_offset(resp.stream))
            else:
                access_log.info('request', extra={'request': entry})


#: Set by gunicorn.conf.py (:func:`write_access_after_body`): gunicorn's logger writes each access
#: line once the body is out, or cut; without it (the tests' WSGI apps) it is written as the body starts.
_written_after_body = False
_DEFERRED = 'iss.access'


def write_access_after_body() -> None:
    """Have the server write each access line (see :func:`body_done`) after the body, not before it."""
    global _written_after_body
    _written_after_body = True


def body_done(environ: dict[str, Any], *, written: int, failure: BaseException | None) -> None:
    """Write a request's access line now that its body is out; ``failure``: what cut it short.

    ``written`` is what the server wrote of a body it iterated; a file it sent with sendfile(2)
    was left at the offset where the sending stopped (socket.sendfile's documented behaviour).
    A cut line has ``"cut"`` saying why, and ``bytes_out`` the body bytes really sent.
    """
    deferred = environ.pop(_DEFERRED, None)
    if deferred is None:
        return
    entry, stream, start = deferred
    if failure is not None:
        if not written and start is not None:
            written = (_file_offset(stream) or start) - start
        entry['bytes_out'] = written
        entry['cut'] = _why_cut(failure)
    access_log.info('request', extra={'request': entry})


def _file_offset(stream: object) -> int | None:
    """Where a body that gunicorn may send with sendfile(2) stands in its file; None for any other body."""
    try:
        return os.lseek(stream.fileno(), 0, os.SEEK_CUR)  # type: ignore[attr-defined]
    except (AttributeError, OSError, ValueError):
        return None


def _why_cut(failure: BaseException) -> str:
    if isinstance(failure, (BrokenPipeError, ConnectionResetError, ConnectionAbortedError)):
        return 'the client went away'
    if isinstance(failure, TimeoutError):
        return 'the client stopped reading'
    return f'{type(failure).__name__}: {failure}'


class _RequestIds:
    """Ids of 32 hex digits: a random prefix drawn once per process, then a count.

    PERF: uuid4 reads the kernel's random source on every request (~6% of a small
    GET). The prefix is drawn again in a forked child, so no two processes share one.
    """

    def __init__(self) -> None:
        self._reset()
        os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        self._prefix = secrets.token_hex(8)
        self._count = itertools.count()

    def __call__(self) -> str:
        return f'{self._prefix}{next(self._count):016x}'


new_request_id = _RequestIds()


def request_id(req: falcon.Request) -> str | None:
    return getattr(req.context, 'request_id', None)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and what came with it."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            'time': self.formatTime(record, '%Y-%m-%dT%H:%M:%S') + f'.{int(record.msecs):03d}Z',
            'level': record.levelname.lower(),
            'logger': record.name,
            'pid': record.process,
            'message': record.getMessage(),
        }
        entry.update(getattr(record, 'request', None) or {})
        if record.exc_info:
            entry['error'] = ''.join(traceback.format_exception(*record.exc_info)).rstrip()
        return json.dumps(entry, default=str)

    # NOTE: logging's own recipe for UTC; mypy takes the builtin for a method and drops its argument.
    converter = time.gmtime  # type: ignore[assignment]


def logging_config(level: str) -> dict[str, Any]:
    """gunicorn's ``logconfig_dict``: its own logs and ISS's, all as JSON lines on stderr."""
    handler = {'class': 'logging.StreamHandler', 'formatter': 'json', 'stream': 'ext://sys.stderr'}
    return {
        'version': 1,
        'disable_existing_loggers': False,
        'formatters': {'json': {'()': JsonFormatter}},
        'handlers': {'console': handler},
        'root': {'level': 'WARNING', 'handlers': []},
        'loggers': {
            'gunicorn.error': {'level': level.upper(), 'handlers': ['console'], 'propagate': False},
            'iss': {'level': level.upper(), 'handlers': ['console'], 'propagate': False},
        },
    }
