"""ISS, the Image Store Service: images and artifacts stored by content address.

Read :func:`create_app` first: it wires every route to its resource. The
resources here are the seed's (the collections, one blob, its meta, the
missing ids, stats, health); the rest live in ``iss_server/`` by concern:
``doors`` (what an upload must be), ``derivatives`` (and ``/sign``), ``tus``
(resumable uploads), ``pages`` (browse, docs). The resources speak HTTP; the
store (``storage.py``) speaks bytes; ``bodies``, ``receiving`` and
``responses`` carry bytes between the two. What goes wrong below is a typed
error (``errors.py``) mapped to its answer in one place here. gunicorn runs
``iss:app``, which is built from the environment on first use::

    gunicorn iss:app              # reads ./gunicorn.conf.py
"""

from __future__ import annotations

import http
import json
import logging
import pathlib
import sys
import time
import urllib.parse
from typing import Any

if __name__ == '__main__':
    # `python -m iss` runs the operator's commands (iss_server/cli.py). NOTE: here, before the
    # imports below, so that a dependency missing (a python outside the venv) is one line saying
    # what to install, not a traceback.
    try:
        from iss_server import cli
    except ModuleNotFoundError as missing:
        from iss_server import refuse_missing_dependency

        refuse_missing_dependency(missing, pathlib.Path(__file__).resolve().parent)
    sys.exit(cli.main())

import falcon
from swagger_ui_bundle import swagger_ui_path

from iss_server import browse, bucket_sessions, doors, engines, images, index, meta, params, telemetry
from iss_server.auth import RequireReadToken, RequireToken
from iss_server.blobs import parse_id
from iss_server.bodies import RequestBody
from iss_server.config import Settings
from iss_server.derivatives import Derivatives, Sign
from iss_server.doors import ArtifactDoor, Door, ImageDoor
from iss_server.errors import (
    BadRequest,
    DigestMismatch,
    InvalidId,
    InvalidIdInBody,
    ServiceError,
    StoreFailure,
    StoreUnavailable,
    error_body,
)
from iss_server.events import Events
from iss_server.lookalikes import SimilarToStored, SimilarToUpload
from iss_server.pages import BrowseAsset, BrowsePage, Docs, OpenAPIDocument
from iss_server.presentation import Presentations
from iss_server.receiving import UploadReceiver
from iss_server.reconciler import Reconciler
from iss_server.responses import (
    IMMUTABLE,
    closed_on_error,
    content_disposition,
    etag_matches,
    is_active,
    send_file,
    send_not_modified,
)
from iss_server.scrubber import Scrubber
from iss_server.tus import TUS_HEADERS, ResumableUploads, TusProtocol, UploadsCollection, UploadSession
from iss_server.webhooks import Deliverer, Webhooks
from storage import BlobStore, open_store

log = logging.getLogger('iss')

HERE = pathlib.Path(__file__).resolve().parent

# -- errors: every one answered as JSON, from here -------------------------------------


# NOTE: Falcon's own answers (no route, a method no resource takes, a range past
# the end) carry no description; every ISS error has one.
_FALCON_DESCRIPTIONS = {
    404: 'Nothing is served at {path}; /docs lists what is.',
    405: '{path} does not take {method}; it takes {allow}.',
    416: 'The range asks for bytes past the end of the {length} stored.',
}


def _serialize_error(req: falcon.Request, resp: falcon.Response, error: falcon.HTTPError) -> None:
    """Write every error as JSON (:func:`errors.error_body`), Falcon's own with a description too."""
    body = error.to_dict()
    description = error.description  # NOTE: in ``body`` when not None
    if description is None:
        headers = dict(error.headers or {})  # NOTE: Falcon takes a dict or a list of pairs
        template = _FALCON_DESCRIPTIONS.get(error.status_code, '{title}.')
        description = template.format(
            path=req.path,
            method=req.method,
            allow=headers.get('Allow', 'no method'),
            length=headers.get('Content-Range', '').rpartition('/')[2] or 'bytes',
            title=error.title,
        )
    # NOTE: to_dict may carry more (Falcon's ``code``, ``link``); those are kept.
    body.update(error_body(error.status_code, error.title, description))
    resp.data = json.dumps(body).encode()
    resp.content_type = falcon.MEDIA_JSON


def _answer_service_error(req: falcon.Request, resp: falcon.Response, error: ServiceError, params: dict) -> None:
    """What the store, the index, the meta schema or the body reader raised, as its HTTP answer."""
    if error.status >= 500:
        log.error('%s: %s', error.title.lower(), error)
    headers = {'Retry-After': str(error.retry_after)} if error.retry_after else None
    # NOTE: a status of no RFC (tus's 460) is named by its title, not "460 Unknown"
    status = error.status if error.status in http.HTTPStatus._value2member_map_ else f'{error.status} {error.title}'
    raise falcon.HTTPError(status, title=error.title, description=error.public_description, headers=headers)


def _log_unexpected_error(req: falcon.Request, resp: falcon.Response, error: Exception, params: dict) -> None:
    """A bug: logged with its traceback and request id; the client gets a plain JSON 500."""
    request_id = telemetry.request_id(req)
    log.error('unexpected error', exc_info=error, extra={'request': {'request_id': request_id}})
    raise falcon.HTTPInternalServerError(
        title='Internal error',
        description=f'Something went wrong in ISS; the log has the details under request id {request_id}.',
    )


# -- collections ----------------------------------------------------------------------


class Collection:
    """``/images``, ``/artifacts``: GET lists newest first, filtered, in pages; POST uploads.

    The items come from the store's index as stored JSON and are sent as
    they are: a page costs one indexed query, however big the store.
    """

    _DEFAULT_LIMIT = 100
    _MAX_LIMIT = 1000

    def __init__(self, store: BlobStore, receiver: UploadReceiver, door: Door, settings: Settings) -> None:
        self._store = store
        self._receiver = receiver
        self._door = door
        self._max_batch_files = settings.max_batch_files
        # NOTE: artifacts are listed by kind; images all have the kind "image".
        self._kind_filter = door.name == index.ARTIFACTS

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        limit = (
            params.whole_number(params.single(req, 'limit'), 'limit', minimum=1, maximum=self._MAX_LIMIT)
            or self._DEFAULT_LIMIT
        )
        filters: dict[str, Any] = {
            'created_after': params.timestamp(params.single(req, 'created_after'), 'created_after'),
            'created_before': params.timestamp(params.single(req, 'created_before'), 'created_before'),
            'cursor': params.single(req, 'cursor') or None,
        }
        if self._kind_filter:
            kind = params.single(req, 'kind')
            filters['kind'] = None if kind is None else meta.check_kind(kind)
        page = self._store.list(self._door.name, limit=limit, **filters)
        next_url = None
        if page.next_cursor is not None:
            query = {key: value for key, value in req.params.items() if key != 'cursor'}
            query['cursor'] = page.next_cursor
            next_url = f'{req.path}?{urllib.parse.urlencode(query, doseq=True)}'
            resp.append_link(next_url, 'next')
        resp.cache_control = ('no-cache',)
        # PERF: the index stores each item as JSON, so a page is joined, not re-encoded.
        resp.data = b'{"items":[%s],"next":%s}' % (
            ','.join(page.items).encode(),
            json.dumps(next_url).encode(),
        )
        resp.content_type = falcon.MEDIA_JSON

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        """Store the body, or the form's ``file`` part; several ``file`` parts are a batch (a list answers)."""
        self._door.check(req)
        with self._receiver.receive(req, form_fields=self._door.form_fields, max_files=self._max_batch_files) as files:
            if len(files) > 1:
                doors.answer_batch(req, resp, self._door, self._store, files)
                return
            committed = self._store.commit(files[0].staged, self._door.meta_for(req, files[0]))
        doors.answer_upload(req, resp, self._door, files[0], committed)


class MissingBlobs:
    """``POST /blobs/missing``: which of these ids are not stored, so a client sends only those.

    The Remote Execution API's FindMissingBlobs: one round trip before a batch of uploads.
    """

    MAX_IDS = 10_000
    # NOTE: 10,000 ids are ~750 KB of JSON; 2 MiB leaves room for whitespace.
    _MAX_BODY_BYTES = 2 * 1024 * 1024

    def __init__(self, store: BlobStore, receiver: UploadReceiver) -> None:
        self._store = store
        self._receiver = receiver

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        body = self._receiver.read_json(req, self._MAX_BODY_BYTES)
        ids = body.get('ids') if isinstance(body, dict) else None
        if not isinstance(ids, list) or not all(isinstance(blob_id, str) for blob_id in ids):
            raise BadRequest('Send JSON {"ids": ["sha256:<hex>", ...]}.', title='Invalid body')
        if len(ids) > self.MAX_IDS:
            raise BadRequest(f'Send at most {self.MAX_IDS} ids.', title='Too many ids')
        try:
            resp.media = {'missing': self._store.missing(ids)}
        except InvalidId as exc:
            raise InvalidIdInBody(str(exc)) from None


class Stats:
    """``GET /stats``: how many blobs and bytes the store holds, per kind."""

    def __init__(self, store: BlobStore) -> None:
        self._store = store

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.cache_control = ('no-cache',)
        resp.media = index.totals_document(self._store.totals())


# -- one blob ---------------------------------------------------------------------------


class Item:
    """``/images/{id}``, ``/artifacts/{id}``: GET and HEAD the bytes, PUT under a claimed id, DELETE.

    Either door serves any blob. GET and HEAD: Range, If-None-Match,
    zero-copy (see :func:`responses.send_file`); on ``/images/{id}`` a query of
    ``w``, ``h``, ``fit``, ``format`` or ``q`` serves a derivative instead.
    With ``accel_redirect`` set (nginx in front), a GET of a blob of
    ``accel_min_bytes`` or more answers with ``X-Accel-Redirect`` and nginx
    sends the bytes, while ISS has already decided the status and every header.
    From a store whose reads ISS verifies (a bucket), only a blob whose bytes
    hashed to its name within ``verify_max_age`` (the scrubber, or a full read
    through ISS) is handed over: any other ISS streams, hashing as it goes.
    """

    def __init__(
        self,
        store: BlobStore,
        receiver: UploadReceiver,
        door: Door,
        presentations: Presentations,
        settings: Settings,
        metrics: telemetry.Metrics,
        derivatives: Derivatives | None = None,
    ) -> None:
        self._store = store
        self._receiver = receiver
        self._door = door
        self._presentations = presentations
        self._derivatives = derivatives
        self._accel_redirect = settings.accel_redirect
        self._accel_min_bytes = settings.accel_min_bytes
        self._verify_max_age = settings.verify_max_age
        self._large_reads = metrics.large_reads
        self._redirect_seconds = settings.s3_redirect

    def on_get(self, req: falcon.Request, resp: falcon.Response, blob_id: str) -> None:
        if self._derivatives is not None and self._derivatives.respond(req, resp, blob_id):
            return
        if etag_matches(req.if_none_match, blob_id):
            # NOTE: the store is asked first: 304 only for what is still stored, and a
            # malformed id never reaches a header.
            self._store.stat(blob_id)
            send_not_modified(resp, blob_id)
            return
        if self._redirect_seconds and req.method == 'GET' and self._redirect_to_bucket(resp, blob_id):
            return
        # PERF: a GET costs an open, a HEAD a stat.
        blob = self._store.open(blob_id) if req.method == 'GET' else None
        file = blob.file if blob is not None else None
        with closed_on_error(file):
            stat = blob.stat if blob is not None else self._store.stat(blob_id)
            presentation = self._presentations.of(blob_id, stat)
            accel_path = None
            # NOTE: small blobs are sent by ISS even behind nginx, so that nginx can cache them.
            if self._accel_redirect and file is not None and stat.size >= self._accel_min_bytes:
                if self._offloadable(blob_id):
                    accel_path = self._accel_redirect + self._store.proxy_path(blob_id)
                self._large_reads.labels('nginx' if accel_path else 'iss').inc()
        send_file(
            req,
            resp,
            file,
            etag=blob_id,
            size=stat.size,
            content_type=presentation.content_type,
            filename=presentation.filename,
            accel_path=accel_path,
        )

    on_head = on_get

    def _offloadable(self, blob_id: str) -> bool:
        """Whether nginx may send the blob: ISS would not hash its bytes either, or it did so recently.

        NOTE: nginx hashes nothing; a blob read over a network is handed to it only
        while its last verification is younger than ISS_VERIFY_MAX_AGE.
        """
        if not self._store.verifies_reads:
            return True
        return self._store.verified_since(blob_id, time.time() - self._verify_max_age)

    def on_put(self, req: falcon.Request, resp: falcon.Response, blob_id: str) -> None:
        parse_id(blob_id)
        self._door.check(req)
        with self._receiver.receive(req, expected=blob_id) as (upload,):
            if upload.staged.digest != blob_id:
                raise DigestMismatch(upload.staged.digest, blob_id)
            committed = self._store.commit(upload.staged, self._door.meta_for(req, upload))
        doors.answer_upload(req, resp, self._door, upload, committed)

    def on_delete(self, req: falcon.Request, resp: falcon.Response, blob_id: str) -> None:
        """Remove the blob, its meta, index row and derivatives (RequireToken checked the admin token)."""
        self._store.delete(blob_id)
        resp.status = falcon.HTTP_204

    def _redirect_to_bucket(self, resp: falcon.Response, blob_id: str) -> bool:
        """``ISS_S3_REDIRECT``: 307 to a presigned URL that serves the blob from the bucket with our headers.

        APPSEC: content a browser would run is never redirected: it is served here, with the
        CSP and nosniff that a presigned URL cannot carry. False: serve it here (also when the store has no URL).
        """
        presentation = self._presentations.of(blob_id, self._store.stat(blob_id))
        if is_active(presentation.content_type):
            return False
        url = self._store.redirect_url(
            blob_id,
            seconds=self._redirect_seconds,
            overrides={
                'ResponseContentType': presentation.content_type,
                'ResponseContentDisposition': content_disposition(presentation.filename),
                'ResponseCacheControl': ', '.join(IMMUTABLE),
            },
        )
        if url is None:
            return False  # NOTE: a store whose backend serves no URLs (a directory)
        resp.status = falcon.HTTP_307
        resp.location = url
        # NOTE: the URL expires; a cache may keep the redirect for half its life at most.
        resp.cache_control = ('private', f'max-age={self._redirect_seconds // 2}')
        return True


class BlobMeta:
    """Serves what is stored about a blob; an image's meta from the FastAPI version is completed."""

    def __init__(self, store: BlobStore, settings: Settings) -> None:
        self._store = store
        self._max_pixels = settings.max_image_pixels

    def on_get(self, req: falcon.Request, resp: falcon.Response, blob_id: str) -> None:
        size = self._store.stat(blob_id).size
        stored = self._store.read_meta(blob_id)
        if stored is not None and meta.lacks_fields(stored):
            stored = meta.complete_image(self._store, blob_id, self._max_pixels) or stored
        resp.media = stored or {'bytes': size}


class Health:
    """Readiness (``/health``, ``/healthz``, ``/health/ready``): 200 while every engine works, else 503
    naming the one that fails; and liveness (``/health/live``): 200 while the process answers.

    Each engine is asked apart, with a deadline of its own (:data:`DEADLINE`): the blobs' backend
    (the bucket or the data directory, and the node's scratch) and the index. A stuck one answers
    503 within it, whatever its own deadline, so the container probe (4-5 s) never gives up first.
    """

    #: Seconds each engine has to answer.
    DEADLINE = 2.0

    def __init__(self, store: BlobStore) -> None:
        self._probes = engines.Probes(
            {store.backend: lambda: store.check(with_index=False), 'index': lambda: store.index.complete}
        )

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        """The seed's answer, exactly: ``{"ok": true}``, or ``ok`` false with the part ``failing`` and the ``error``."""
        self._answer_ready(resp)
        resp.media.pop('engines')  # NOTE: kept as the seed answered, for clients that compare it whole

    on_head = on_get

    def on_get_ready(self, req: falcon.Request, resp: falcon.Response) -> None:
        """The seed's answer, and each engine's state (``ok`` or its error) under ``engines``."""
        self._answer_ready(resp)

    on_head_ready = on_get_ready

    def _answer_ready(self, resp: falcon.Response) -> None:
        resp.cache_control = ('no-store',)
        outcomes = self._probes.run(self.DEADLINE)
        answer: dict[str, Any] = {'ok': True}
        for part, failure in outcomes.items():
            if failure is None:
                continue
            if not isinstance(failure, (StoreFailure, TimeoutError)):
                raise failure  # NOTE: a bug, answered as any other (500, logged)
            if answer['ok']:
                # NOTE: which part is down (data directory, bucket, index), for whoever is paged: the first.
                answer = {'ok': False, 'failing': getattr(failure, 'part', part), 'error': str(failure)}
                resp.status = falcon.HTTP_503
                resp.retry_after = getattr(failure, 'retry_after', None) or StoreUnavailable.retry_after
        # NOTE: every engine's state, where the seed's answer named one.
        answer['engines'] = {part: 'ok' if failure is None else str(failure) for part, failure in outcomes.items()}
        resp.media = answer

    def on_get_live(self, req: falcon.Request, resp: falcon.Response) -> None:
        """The process answers: nothing else is asked (restarting it would not mend an engine)."""
        resp.cache_control = ('no-store',)
        resp.media = {'ok': True}

    on_head_live = on_get_live


# -- helpers --------------------------------------------------------------------


# -- the app --------------------------------------------------------------------


def create_app(settings: Settings, store: BlobStore, metrics: telemetry.Metrics | None = None) -> falcon.App:
    """Wire the WSGI app: every route ISS serves, its middleware and its error map.

    It only wires: the store arrives ready (see :func:`build_app`), and so may its metrics.
    """
    # NOTE: the render gate is one per process (Pillow's memory is the worker's); the app sets its bounds.
    images.GATE.configure(settings)
    RequestBody.configure(settings.body_min_rate)
    if metrics is None:
        metrics = telemetry.Metrics(store, shared=bool(settings.metrics_dir))
    # NOTE: so are the engines' bulkheads (a share of this worker's threads), counted in the metrics.
    engines.configure(
        settings,
        refused=lambda engine: metrics.engine_refused.labels(engine).inc(),
        cut=lambda engine: metrics.engine_cut.labels(engine).inc(),
    )
    # NOTE: Any, as Falcon types middleware by protocols of its private falcon._typing
    middleware: list[Any] = [telemetry.RequestTelemetry(metrics), engines.PerRequest(), TusProtocol()]
    if settings.cors_origins:
        middleware.append(
            falcon.CORSMiddleware(
                allow_origins=list(settings.cors_origins),
                expose_headers=['ETag', 'Content-Range', 'Content-Length', 'Location', 'X-Request-Id', *TUS_HEADERS],
            )
        )
    if settings.api_token:
        middleware.append(
            RequireToken(
                frozenset({'POST', 'PUT', 'PATCH'}),
                settings.api_token,
                'ISS_API_TOKEN',
                'Uploading',
                # NOTE: on a private store, asking which ids are stored is a read, which any of its
                # tokens may make (RequireReadToken); on a public one, a POST like every other.
                exempt=(Sign, Webhooks, *((MissingBlobs,) if settings.read_token else ())),
                every_method_of=(UploadSession,),
                other_tokens=(settings.read_token, settings.admin_token),
            )
        )
    # NOTE: an upload session is terminated by its owner, not the admin (ResumableUploads.owner)
    middleware.append(
        RequireToken(
            frozenset({'DELETE'}),
            settings.admin_token,
            'ISS_ADMIN_TOKEN',
            'Deleting',
            exempt=(UploadSession,),
            other_tokens=(settings.read_token, settings.api_token),
        )
    )
    if settings.read_token:
        middleware.append(
            RequireReadToken(
                (settings.read_token, settings.api_token, settings.admin_token),
                public=(Health, OpenAPIDocument, Docs, BrowsePage, BrowseAsset, UploadsCollection, UploadSession),
                reads_by_post=(MissingBlobs, SimilarToUpload),
                signing_keys=(settings.signing_key, settings.signing_key_previous),
            )
        )

    app = falcon.App(middleware=middleware)
    app.set_error_serializer(_serialize_error)
    app.add_error_handler(ServiceError, _answer_service_error)
    app.add_error_handler(Exception, _log_unexpected_error)

    receiver = UploadReceiver(store, settings)
    presentations = Presentations(store)
    images_door = ImageDoor(settings)
    artifacts_door = ArtifactDoor(settings)
    derivatives = Derivatives(store, settings)
    blob_meta = BlobMeta(store, settings)
    app.add_route('/images', Collection(store, receiver, images_door, settings))
    app.add_route(
        '/images/{blob_id}', Item(store, receiver, images_door, presentations, settings, metrics, derivatives)
    )
    app.add_route('/images/{blob_id}/meta', blob_meta)
    # NOTE: a search that stores nothing; as POST /blobs/missing, it takes the upload token when one is set.
    app.add_route('/images/similar', SimilarToUpload(store, receiver, images_door, settings))
    app.add_route('/images/{blob_id}/similar', SimilarToStored(store, settings))
    app.add_route('/artifacts', Collection(store, receiver, artifacts_door, settings))
    app.add_route('/artifacts/{blob_id}', Item(store, receiver, artifacts_door, presentations, settings, metrics))
    app.add_route('/artifacts/{blob_id}/meta', blob_meta)
    app.add_route('/blobs/missing', MissingBlobs(store, receiver))
    app.add_route('/stats', Stats(store))
    app.add_route('/events', Events(store.index, settings.events_retain, settings.threads))
    webhooks = Webhooks(store.index, settings.webhooks, settings.admin_token)
    app.add_route('/webhooks', webhooks)
    app.add_route('/webhooks/{name}/resume', webhooks, suffix='resume')
    sessions = bucket_sessions.sessions_of(store, settings.upload_expires, settings.tus_max_sessions)
    resumable_uploads = ResumableUploads(store, sessions, images_door, artifacts_door, settings)
    app.add_route('/uploads', UploadsCollection(resumable_uploads))
    app.add_route('/uploads/{upload_id}', UploadSession(resumable_uploads))
    app.add_route('/sign', Sign(receiver, settings))
    app.add_route('/metrics', telemetry.MetricsEndpoint(metrics))

    health = Health(store)
    app.add_route('/health', health)
    app.add_route('/healthz', health)
    app.add_route('/health/ready', health, suffix='ready')
    app.add_route('/health/live', health, suffix='live')

    openapi = OpenAPIDocument(HERE / 'openapi.yaml')
    app.add_route('/openapi.yaml', openapi)
    app.add_route('/openapi.json', openapi, suffix='json')
    app.add_route('/docs', Docs())
    assets = browse.Assets(HERE / 'browse')
    page = BrowsePage(assets)
    app.add_route('/', page)
    app.add_route('/browse', page)
    app.add_route('/browse/{name}', BrowseAsset(assets))
    app.add_static_route('/docs/assets', str(swagger_ui_path))
    return app


def build_app(settings: Settings) -> falcon.App:
    """The app on the store the settings name, started (temp files swept, the index built if need be).

    NOTE: in each gunicorn worker (the app is built there, not in the master), so each runs a
    webhook deliverer, a reconciler and a scrubber; leases in the index have one of them, on one
    node, send each change, make each reconciler's pass and scrub the store.
    """
    store = open_store(settings)
    store.start()
    metrics = telemetry.Metrics(store, shared=bool(settings.metrics_dir))
    app = create_app(settings, store, metrics)
    if settings.webhooks:
        Deliverer(store.index, settings.webhooks).start()
    if settings.reconcile_interval:
        Reconciler(
            store,
            interval=settings.reconcile_interval,
            grace=settings.reconcile_grace,
            sweep_every=settings.reconcile_sweep,
            fixed=lambda kind, count: metrics.reconciled.labels(kind).inc(count),
        ).start()
    if settings.scrub_rate:
        Scrubber(
            store,
            rate=settings.scrub_rate,
            interval=settings.scrub_interval,
            checked=lambda result: metrics.scrubbed.labels(result).inc(),
            read=metrics.scrubbed_bytes.inc,
        ).start()
    return app


def __getattr__(name: str) -> falcon.App:
    """Build ``iss.app`` from the environment when gunicorn first asks for it.

    NOTE: lazily, so importing this module (tests, tools) touches no data directory.
    """
    if name == 'app':
        app = build_app(Settings.from_env())
        globals()['app'] = app
        return app
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
