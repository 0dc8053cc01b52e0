"""ISS configuration: the environment, read in one place into one typed object.

Nothing else in ISS reads ``os.environ``; gunicorn.conf.py, the app factory
and the command line all take a :class:`Settings`. ``example.env`` lists every variable below with
its default.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping


class ConfigError(ValueError):
    """An environment variable holds a value ISS cannot use."""


def _integer(environ: Mapping[str, str], name: str, default: int, minimum: int = 0) -> int:
    raw = environ.get(name, '').strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f'{name} must be a whole number, not {raw!r}') from None
    if value < minimum:
        raise ConfigError(f'{name} must be at least {minimum}, not {value}')
    return value


_DURATION = re.compile(r'(\d+)\s*([smhd]?)')
_SECONDS_PER = {'': 1, 's': 1, 'm': 60, 'h': 3600, 'd': 86400}


def _duration(environ: Mapping[str, str], name: str, default: int) -> int:
    """Seconds, written as a whole number of them or with a unit: ``90``, ``90s``, ``15m``, ``12h``, ``7d``."""
    raw = environ.get(name, '').strip().lower()
    if not raw:
        return default
    match = _DURATION.fullmatch(raw)
    if match is None or int(match[1]) < 1:
        raise ConfigError(f'{name} must be a duration of at least 1 second (3600, 90s, 15m, 12h, 7d), not {raw!r}')
    return int(match[1]) * _SECONDS_PER[match[2]]


@dataclasses.dataclass(frozen=True)
class WebhookEndpoint:
    """One of ``ISS_WEBHOOKS``: its name (its place in the feed is kept under it), URL and signing secret."""

    name: str
    url: str
    secret: str


_WEBHOOK = re.compile(r'([a-z0-9_-]{1,32})=(https?://\S+)\s+(whsec_[A-Za-z0-9+/]+={0,2})')


def _webhooks(environ: Mapping[str, str], name: str) -> tuple[WebhookEndpoint, ...]:
    """``NAME=URL whsec_SECRET;...`` as endpoints (the secret as Standard Webhooks writes it)."""
    endpoints = []
    for entry in filter(None, (part.strip() for part in environ.get(name, '').split(';'))):
        match = _WEBHOOK.fullmatch(entry)
        if match is None:
            raise ConfigError(
                f'{name}: an entry is not NAME=URL whsec_SECRET with a name of a-z, 0-9, _ or - '
                f'and an http(s) URL: {entry.split()[0]!r}'  # APPSEC: never the secret in a message
            )
        endpoints.append(WebhookEndpoint(*match.groups()))
    if len({endpoint.name for endpoint in endpoints}) < len(endpoints):
        raise ConfigError(f'{name} names an endpoint twice')
    return tuple(endpoints)


def _csv(environ: Mapping[str, str], name: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in environ.get(name, '').split(',') if item.strip())


def _choice(environ: Mapping[str, str], name: str, choices: tuple[str, ...]) -> str:
    """One of ``choices`` (the first is the default, for an unset or empty variable)."""
    raw = environ.get(name, '').strip().lower() or choices[0]
    if raw not in choices:
        raise ConfigError(f'{name} must be one of {", ".join(choices)}, not {raw!r}')
    return raw


_PRESET_NAME = re.compile(r'[a-z0-9_-]{1,32}')
#: The query parameters of a derivative (``/images/{id}?w=256``), also a preset's keys.
#: NOTE: the one list; iss_server/derivatives.py parses each in ``Derivatives._variant``.
DERIVATIVE_PARAMETERS = ('w', 'h', 'fit', 'format', 'q')


def _presets(environ: Mapping[str, str], name: str) -> dict[str, dict[str, str]]:
    """``thumb=w:256,h:256,fit:cover;small=w:512`` as ``{'thumb': {'w': '256', ...}, ...}``."""
    presets: dict[str, dict[str, str]] = {}
    for entry in filter(None, (part.strip() for part in environ.get(name, '').split(';'))):
        preset, equals, spec = entry.partition('=')
        params = dict(pair.strip().partition(':')[::2] for pair in spec.split(',') if pair.strip())
        if (
            not equals
            or not _PRESET_NAME.fullmatch(preset.strip())
            or not params
            or not set(params) <= set(DERIVATIVE_PARAMETERS)
        ):
            raise ConfigError(
                f'{name}: {entry!r} is not NAME=KEY:VALUE,... with a name of a-z, 0-9, _ or - and keys of '
                f'{", ".join(DERIVATIVE_PARAMETERS)}'
            )
        presets[preset.strip()] = params
    return presets


def _location(environ: Mapping[str, str], name: str) -> str:
    raw = environ.get(name, '').strip()
    if raw and not (raw.startswith('/') and raw.endswith('/')):
        raise ConfigError(f'{name} must be a path that starts and ends with "/", not {raw!r}')
    return raw


_BUCKET = re.compile(r'[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]')


def _store(environ: Mapping[str, str], name: str) -> str:
    """``file`` (the default) or ``s3://BUCKET[/PREFIX]`` with a valid bucket name."""
    raw = environ.get(name, '').strip() or 'file'
    if raw == 'file':
        return raw
    bucket, _, prefix = raw.removeprefix('s3://').partition('/')
    if not raw.startswith('s3://') or not _BUCKET.fullmatch(bucket) or '//' in prefix:
        raise ConfigError(f'{name} must be file or s3://BUCKET[/PREFIX], not {raw!r}')
    return raw.rstrip('/')


def _index(environ: Mapping[str, str], name: str) -> str:
    raw = environ.get(name, '').strip() or 'sqlite'
    if raw != 'sqlite' and not raw.startswith(('postgresql://', 'postgres://')):
        raise ConfigError(f'{name} must be sqlite or a postgresql:// URL, not {raw!r}')
    return raw


def _url(environ: Mapping[str, str], name: str) -> str:
    raw = environ.get(name, '').strip()
    if raw and not raw.startswith(('http://', 'https://')):
        raise ConfigError(f'{name} must be an http:// or https:// URL, not {raw!r}')
    return raw


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything ISS can be told from outside, with the documented defaults."""

    #: Root of the store: ``blobs/``, ``meta/`` and ``tmp/`` live below it. With an S3 store,
    #: this node's own scratch space: uploads being received (``tmp/``) and its derivatives.
    data_dir: str = './data'
    #: Where the blobs live: ``file`` (``data_dir``) or ``s3://BUCKET[/PREFIX]``.
    store: str = 'file'
    #: The index: ``sqlite`` (a file in ``data_dir``) or a ``postgresql://`` URL shared by every node.
    index: str = 'sqlite'
    #: Seconds a call to a PostgreSQL index may take, connecting or waiting for a pooled connection
    #: included, counted by ISS itself (a frozen server counts nothing); past it, 503.
    index_timeout: int = 5
    #: PostgreSQL connections each worker process keeps (nodes x workers x this <= max_connections).
    index_pool_size: int = 4
    #: Whether psycopg prepares the statements it runs often; 0 behind PgBouncer in transaction mode,
    #: which hands each transaction to any server connection (PgBouncer before 1.21 keeps none).
    index_prepared: bool = True
    #: The S3 service's URL (SeaweedFS, MinIO, Ceph RGW); empty: AWS itself.
    s3_endpoint: str = ''
    s3_region: str = 'us-east-1'
    s3_access_key: str = ''
    s3_secret_key: str = ''
    #: Seconds a presigned URL lives when full GETs of an S3 store answer 307 to the bucket; 0: off.
    s3_redirect: int = 0
    #: Seconds one S3 call may take, its one retry included (each attempt gets about half).
    s3_timeout: int = 15
    #: Largest request body accepted on POST and PUT; 413 as soon as it is crossed.
    max_upload_bytes: int = 2 * 1024**3
    #: How far an uploaded image is checked: ``header`` (identified from it) or ``decode``
    #: (every pixel of the first frame decoded; an image that does not is refused, 422).
    verify_images: str = 'header'
    #: Most ``file`` parts one multipart POST may carry (a batch upload); 413 beyond.
    max_batch_files: int = 1000
    #: Seconds a client may pause while sending a body before ISS drops the upload.
    body_timeout: int = 60
    #: Bytes per second a body must average once its first ``body_timeout`` seconds are past (a drip is cut).
    body_min_rate: int = 1024
    #: Seconds a client has to send a request's headers (gunicorn's worker answers 408 past them).
    header_timeout: int = 10
    #: Seconds a resumable upload (tus) lives after its last chunk; a finished one answers with its id as long.
    upload_expires: int = 24 * 3600
    #: Most unfinished resumable uploads the store holds at once (0: no bound); creating one more is 503.
    tus_max_sessions: int = 10_000
    #: Seconds the change feed (``GET /events``) keeps a change; a cursor older answers 410.
    events_retain: int = 7 * 86400
    #: Endpoints each change of the feed is POSTed to (CloudEvents, signed per Standard Webhooks).
    webhooks: tuple[WebhookEndpoint, ...] = ()
    #: Seconds between the reconciler's passes over writes left unfinished (reconciler.py); 0: off.
    reconcile_interval: int = 30
    #: Seconds after which a write's intent, or an object without row, is taken for left behind.
    reconcile_grace: int = 300
    #: Seconds between the reconciler's walks of the whole store for objects without row or intent; 0: never.
    reconcile_sweep: int = 3600
    #: Largest artifact ``meta`` JSON document, in bytes of its text.
    max_meta_bytes: int = 16 * 1024
    #: When set, POST and PUT need ``Authorization: Bearer <token>``.
    api_token: str = ''
    #: When set, the store is private: every read needs this token (or the upload or admin one).
    read_token: str = ''
    #: Named derivative parameter sets, ``thumb=w:256,h:256,fit:cover,format:webp;small=w:512``.
    derivative_presets: dict[str, dict[str, str]] = dataclasses.field(default_factory=dict)
    #: Which derivatives a client may ask for: ``open`` (any), ``presets`` (only ?preset=), or
    #: ``signed`` (presets, and any other only in a signed URL).
    derivatives: str = 'open'
    #: Key of signed URLs (``POST /sign``, ``python -m iss sign``); empty: signing is off.
    signing_key: str = ''
    #: The key before the current one, still accepted, so that keys rotate.
    signing_key_previous: str = ''
    #: When set, DELETE needs ``Authorization: Bearer <token>``; when empty, deletion is off (403).
    admin_token: str = ''
    #: Origins allowed by CORS; empty means CORS is off.
    cors_origins: tuple[str, ...] = ()
    #: With nginx in front: the internal location (e.g. ``/_internal/blobs/``) aliased to
    #: ``$ISS_DATA/blobs/``; full GETs then answer with X-Accel-Redirect and nginx sends the bytes.
    accel_redirect: str = ''
    #: With accel_redirect: smaller blobs are still sent by ISS, so nginx can cache them.
    accel_min_bytes: int = 1024 * 1024
    #: With accel_redirect on a store read over a network (S3): nginx sends a blob from the bucket only
    #: if ISS hashed its bytes there within this many seconds (the scrubber, or a full read through ISS);
    #: otherwise ISS streams it, hashing as it goes.
    verify_max_age: int = 8 * 86400
    #: Bytes per second the scrubber reads back and hashes, for the whole store (one node at a time
    #: scrubs); 0: no scrubber.
    scrub_rate: int = 0
    #: Seconds after which the scrubber hashes a blob again (since its upload or its last check).
    scrub_interval: int = 7 * 86400
    #: Largest image (width x height) accepted at upload (413) and rendered (422): bombs are never decoded.
    max_image_pixels: int = 89_478_485
    #: Renders one worker makes at once (derivatives, and ISS_VERIFY_IMAGES=decode); 503 beyond.
    renders: int = 2
    #: Decoded pixels one worker holds at once across its renders (one larger image renders alone).
    render_pixels: int = 89_478_485
    #: Largest width or height a derivative may ask for (400 beyond).
    max_derived_dimension: int = 4096
    #: Bytes the derivative cache may take under ``derived/``; least recently used go first.
    derived_max_bytes: int = 1024**3
    #: Where gunicorn listens.
    host: str = '127.0.0.1'
    port: int = 8000
    #: gunicorn worker processes and threads per worker (gthread worker).
    workers: int = 2
    threads: int = 16
    #: Seconds a connection may stay silent (gunicorn's keep-alive and worker timeout).
    keepalive: int = 5
    timeout: int = 60
    log_level: str = 'info'
    #: Where prometheus_client's multiprocess mode keeps each worker's values (gunicorn.conf.py
    #: makes a fresh one per start when unset); empty: metrics stay in the process.
    metrics_dir: str = ''

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Build the settings from ``environ`` (default: ``os.environ``).

        Raises:
            ConfigError: a variable is set to something unusable.
        """
        env = os.environ if environ is None else environ
        defaults = cls()
        return cls(
            data_dir=env.get('ISS_DATA', '').strip() or defaults.data_dir,
            store=_store(env, 'ISS_STORE'),
            index=_index(env, 'ISS_INDEX'),
            index_timeout=_integer(env, 'ISS_INDEX_TIMEOUT', defaults.index_timeout, 1),
            index_pool_size=_integer(env, 'ISS_INDEX_POOL_SIZE', defaults.index_pool_size, 1),
            index_prepared=_choice(env, 'ISS_INDEX_PREPARED', ('1', '0')) == '1',
            s3_endpoint=_url(env, 'ISS_S3_ENDPOINT'),
            s3_region=env.get('AWS_REGION', '').strip() or defaults.s3_region,
            s3_access_key=env.get('AWS_ACCESS_KEY_ID', '').strip(),
            s3_secret_key=env.get('AWS_SECRET_ACCESS_KEY', '').strip(),
            s3_redirect=_integer(env, 'ISS_S3_REDIRECT', defaults.s3_redirect),
            s3_timeout=_integer(env, 'ISS_S3_TIMEOUT', defaults.s3_timeout, 2),
            max_upload_bytes=_integer(env, 'ISS_MAX_UPLOAD_BYTES', defaults.max_upload_bytes, 1),
            max_meta_bytes=_integer(env, 'ISS_MAX_META_BYTES', defaults.max_meta_bytes, 2),
            max_batch_files=_integer(env, 'ISS_MAX_BATCH_FILES', defaults.max_batch_files, 1),
            verify_images=_choice(env, 'ISS_VERIFY_IMAGES', ('header', 'decode')),
            derivative_presets=_presets(env, 'ISS_DERIVATIVE_PRESETS'),
            derivatives=_choice(env, 'ISS_DERIVATIVES', ('open', 'presets', 'signed')),
            body_timeout=_integer(env, 'ISS_BODY_TIMEOUT', defaults.body_timeout, 1),
            body_min_rate=_integer(env, 'ISS_BODY_MIN_RATE', defaults.body_min_rate, 1),
            header_timeout=_integer(env, 'ISS_HEADER_TIMEOUT', defaults.header_timeout, 1),
            upload_expires=_integer(env, 'ISS_UPLOAD_EXPIRES', defaults.upload_expires, 1),
            tus_max_sessions=_integer(env, 'ISS_TUS_MAX_SESSIONS', defaults.tus_max_sessions, 0),
            events_retain=_duration(env, 'ISS_EVENTS_RETAIN', defaults.events_retain),
            webhooks=_webhooks(env, 'ISS_WEBHOOKS'),
            reconcile_interval=_integer(env, 'ISS_RECONCILE_INTERVAL', defaults.reconcile_interval),
            reconcile_grace=_integer(env, 'ISS_RECONCILE_GRACE', defaults.reconcile_grace, 1),
            reconcile_sweep=_integer(env, 'ISS_RECONCILE_SWEEP', defaults.reconcile_sweep),
            api_token=env.get('ISS_API_TOKEN', '').strip(),
            admin_token=env.get('ISS_ADMIN_TOKEN', '').strip(),
            read_token=env.get('ISS_READ_TOKEN', '').strip(),
            signing_key=env.get('ISS_SIGNING_KEY', '').strip(),
            signing_key_previous=env.get('ISS_SIGNING_KEY_PREVIOUS', '').strip(),
            cors_origins=_csv(env, 'ISS_CORS_ORIGINS'),
            accel_redirect=_location(env, 'ISS_ACCEL_REDIRECT'),
            accel_min_bytes=_integer(env, 'ISS_ACCEL_MIN_BYTES', defaults.accel_min_bytes),
            verify_max_age=_duration(env, 'ISS_VERIFY_MAX_AGE', defaults.verify_max_age),
            scrub_rate=_integer(env, 'ISS_SCRUB_RATE', defaults.scrub_rate),
            scrub_interval=_duration(env, 'ISS_SCRUB_INTERVAL', defaults.scrub_interval),
            max_image_pixels=_integer(env, 'ISS_MAX_IMAGE_PIXELS', defaults.max_image_pixels, 1),
            renders=_integer(env, 'ISS_RENDERS', defaults.renders, 1),
            render_pixels=_integer(env, 'ISS_RENDER_PIXELS', defaults.render_pixels, 1),
            max_derived_dimension=_integer(env, 'ISS_MAX_DERIVED_DIMENSION', defaults.max_derived_dimension, 1),
            derived_max_bytes=_integer(env, 'ISS_DERIVED_MAX_BYTES', defaults.derived_max_bytes),
            host=env.get('ISS_HOST', '').strip() or defaults.host,
            port=_integer(env, 'ISS_PORT', defaults.port),
            workers=_integer(env, 'ISS_WORKERS', defaults.workers, 1),
            threads=_integer(env, 'ISS_THREADS', defaults.threads, 1),
            keepalive=_integer(env, 'ISS_KEEPALIVE', defaults.keepalive, 1),
            timeout=_integer(env, 'ISS_TIMEOUT', defaults.timeout, 1),
            log_level=env.get('ISS_LOG_LEVEL', '').strip().lower() or defaults.log_level,
            metrics_dir=env.get('PROMETHEUS_MULTIPROC_DIR', '').strip(),
        )

    @property
    def s3_bucket(self) -> str:
        return self.store.removeprefix('s3://').partition('/')[0]

    @property
    def s3_prefix(self) -> str:
        """The keys' prefix in the bucket, ``''`` or ending with ``/``."""
        prefix = self.store.removeprefix('s3://').partition('/')[2]
        return prefix + '/' if prefix else ''
