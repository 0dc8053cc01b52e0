"""The meta document of a blob: what ISS writes into ``meta/ab/cd/<hex>.json``, in one place.

Every writer of meta (an upload, ``python -m iss import``, ``fsck --repair``,
the completion of a FastAPI-era image) builds it here, and the listing item
the index keeps is made here too, so the schema is written down once:

- every blob: ``kind``, ``bytes``, ``mime``, ``created_at`` (Unix seconds);
- an image (kind ``image``): ``format``, ``width``, ``height`` and the fields of
  :data:`images.IMAGE_META_KEYS`, read from its header by Pillow, and its
  :data:`images.FINGERPRINT_KEYS` (perceptual hash, placeholders) from a small decode;
- an artifact: the client's own keys besides, which may not be any of ISS's.
"""

from __future__ import annotations

import json
import math
import mimetypes
import re
import time
import unicodedata
from typing import IO, Any, Protocol

from iss_server import images
from iss_server.errors import BadRequest

OCTET_STREAM = 'application/octet-stream'

#: What an artifact's kind may be.
KIND_PATTERN = re.compile(r'[A-Za-z0-9._-]{1,64}')

#: The keys an upload's answer repeats from the stored meta.
ANSWER_KEYS = ('kind', 'bytes', 'mime', 'width', 'height', 'verified', 'created_at', *images.FINGERPRINT_KEYS)

#: Keys ISS writes into a meta file, an upload's answer or a listing item (:func:`listing_item`,
#: ``index.row_for``); an artifact's own meta may not use them (``id`` would fake a listed id).
RESERVED_KEYS = (
    frozenset(ANSWER_KEYS)
    | images.IMAGE_META_KEYS
    | frozenset(images.FINGERPRINT_KEYS)
    | frozenset({'id', 'format', 'image_id', 'artifact_id', 'filename'})
)

_MEDIA_TYPE_PATTERN = re.compile(r'[a-z0-9!#$&^_.+-]+/[a-z0-9!#$&^_.+-]+')
_CHARSET_PATTERN = re.compile(r'charset="?([A-Za-z0-9._:-]{1,40})"?')


# -- building ----------------------------------------------------------------------


def image(
    info: images.ImageInfo,
    size: int,
    created_at: float | None = None,
    filename: str | None = None,
    verified: str | None = None,
    fingerprints: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The meta of an image: the seed's keys, with what Pillow read from its header.

    ``verified`` says how far the upload checked it: ``header`` (identified) or ``decode``
    (every pixel decoded); None for meta made otherwise (fsck, the command line's imports).
    ``fingerprints``: :func:`images.fingerprints` (or its keys null: the pixels did not decode).
    """
    return {
        'kind': 'image',
        'bytes': size,
        'mime': info.mime,
        'format': info.format,
        'width': info.width,
        'height': info.height,
        **info.fields,
        **(fingerprints or {}),
        **({'verified': verified} if verified else {}),
        **_named(filename),
        'created_at': _now(created_at),
    }


def identified_image(
    file: IO[bytes],
    size: int,
    created_at: float | None = None,
    max_pixels: int = images.DEFAULT_MAX_PIXELS,
    filename: str | None = None,
    verify: str | None = None,
) -> dict[str, Any]:
    """The meta of the image in ``file`` with its fingerprints, checked as far as ``verify`` says (header, decode).

    Raises:
        images.NotAnImage, images.ImageTooLarge: as :func:`images.identify`.
        images.CannotRender: with ``decode``, the pixels do not decode.
        RendersBusy: no room to decode in time.
    """
    info = checked_image(file, max_pixels, verify)
    file.seek(0)
    return image(info, size, created_at, filename, verified=verify, fingerprints=fingerprints_of(file, max_pixels))


def checked_image(file: IO[bytes], max_pixels: int, verify: str | None = None) -> images.ImageInfo:
    """What Pillow reads from the header of the image in ``file``, checked as far as ``verify`` says.

    Raises:
        images.NotAnImage, images.ImageTooLarge: as :func:`images.identify`.
        images.CannotRender: with ``decode``, the pixels do not decode.
        RendersBusy: no room to decode in time.
    """
    info = images.identify(file, max_pixels)
    if verify == 'decode':
        file.seek(0)
        images.check_decodes(file, max_pixels)
    return info


def fingerprints_of(file: IO[bytes], max_pixels: int) -> dict[str, Any]:
    """:func:`images.fingerprints`, or each of its keys null when the pixels do not decode.

    NOTE: not a refusal: with ISS_VERIFY_IMAGES=header a truncated image is stored, as before;
    it has no placeholder and is found by no similarity search.
    """
    try:
        return images.fingerprints(file, max_pixels)
    except (images.NotAnImage, images.ImageTooLarge, images.CannotRender):
        return dict.fromkeys(images.FINGERPRINT_KEYS)


def artifact(
    kind: str,
    size: int,
    mime: str | None,
    user: dict[str, Any] | None = None,
    created_at: float | None = None,
    filename: str | None = None,
) -> dict[str, Any]:
    """The meta of an artifact: the client's keys (checked by :func:`parse_user_meta`) and ISS's."""
    return {
        **(user or {}),
        'kind': kind,
        'bytes': size,
        'mime': media_type(mime),
        **_named(filename),
        'created_at': _now(created_at),
    }


def _named(filename: str | None) -> dict[str, str]:
    """``filename``, as stored: the client's base name only, or nothing."""
    name = clean_filename(filename)
    return {'filename': name} if name else {}


# NOTE: a name longer than most filesystems take is no name to save a file as.
_MAX_FILENAME_BYTES = 255


def clean_filename(name: str | None) -> str | None:
    """The base name of a client's file name, safe to store and to send back in a header.

    APPSEC: no directories (``../etc/passwd`` is ``passwd``), no control or format
    characters (no header can be injected through it), at most 255 bytes of UTF-8;
    None when nothing is left.
    """
    if not name:
        return None
    base = re.split(r'[/\\]', name)[-1]
    base = ''.join(ch for ch in base if unicodedata.category(ch) not in ('Cc', 'Cf', 'Zl', 'Zp')).strip()
    encoded = base.encode()
    if len(encoded) > _MAX_FILENAME_BYTES:
        base = encoded[:_MAX_FILENAME_BYTES].decode('utf-8', 'ignore')
    return base if base not in ('', '.', '..') else None


def download_name(blob_id: str, stored: dict[str, Any] | None, content_type: str) -> str:
    """What a download of the blob is saved as: the stored file name, else ``<hex>.<ext>`` from its type."""
    stored_name = (stored or {}).get('filename')
    name = clean_filename(stored_name) if isinstance(stored_name, str) else None
    if name:
        return name
    essence = content_type.partition(';')[0]
    extension = _EXTENSIONS.get(essence) or mimetypes.guess_extension(essence) or ''
    return blob_id.removeprefix('sha256:') + extension


# NOTE: mimetypes' first guess for these is an odd one (.jpe, .htm...).
_EXTENSIONS = {'image/jpeg': '.jpg', 'text/html': '.html', 'text/plain': '.txt', 'application/octet-stream': '.bin'}


def recovered(size: int, created_at: float) -> dict[str, Any]:
    """The meta ``fsck --repair`` gives a blob that had none and is no image."""
    return artifact('recovered', size, OCTET_STREAM, created_at=created_at)


def image_completion(info: images.ImageInfo) -> dict[str, Any]:
    """The fields a FastAPI-era image's meta lacks, from its header."""
    return {'format': info.format, **info.fields}


class _Completable(Protocol):
    """The two calls of a store (:class:`storage.BlobStore`) that :func:`complete_image` makes."""

    def open(self, blob_id: str) -> Any: ...

    def complete_meta(self, blob_id: str, fields: dict[str, Any]) -> dict[str, Any]: ...


def complete_image(
    store: _Completable, blob_id: str, max_pixels: int, *, fingerprints: bool = False
) -> dict[str, Any] | None:
    """Fill in, once and for good, the image fields a stored meta lacks (the FastAPI version wrote fewer).

    With ``fingerprints``, also the perceptual hash and placeholders (a small decode; images stored
    before they existed). The seed's own keys are kept as they are; None when the bytes are no image
    Pillow reads.
    """
    blob = store.open(blob_id)
    with blob.file:
        try:
            completion = image_completion(images.identify(blob.file, max_pixels))
            if fingerprints:
                blob.file.seek(0)
                completion.update(fingerprints_of(blob.file, max_pixels))
        except (images.NotAnImage, images.ImageTooLarge):
            return None
    return store.complete_meta(blob_id, completion)


def lacks_fields(meta: dict[str, Any]) -> bool:
    """True for an image's meta without the fields this version records (the FastAPI version's)."""
    return meta.get('kind') == 'image' and not meta.keys() >= images.IMAGE_META_KEYS


def lacks_fingerprints(meta: dict[str, Any]) -> bool:
    """True for an image's meta stored before the perceptual hash and placeholders were (``backfill`` adds them)."""
    return meta.get('kind') == 'image' and not meta.keys() >= set(images.FINGERPRINT_KEYS)


def listing_item(blob_id: str, meta: dict[str, Any] | None, size: int) -> dict[str, Any]:
    """A blob as listings show it: its id and stored meta (``bytes`` at least)."""
    item = {'id': blob_id, **(meta or {})}
    item.setdefault('bytes', size)
    return item


def encode(meta: dict[str, Any]) -> bytes:
    """The bytes of a meta file (compact JSON)."""
    return json.dumps(meta, separators=(',', ':')).encode()


def _now(created_at: float | None) -> float:
    return time.time() if created_at is None else created_at


# -- checking what clients send ----------------------------------------------------------


def check_kind(kind: str | None) -> str:
    """Return ``kind`` if it is a valid artifact kind: of an upload to /artifacts, or its listing's filter.

    Raises:
        BadRequest: it is missing, not of :data:`KIND_PATTERN`, or ``image`` (the image door's).
    """
    if kind is None or not KIND_PATTERN.fullmatch(kind):
        raise BadRequest(
            'kind is required: 1 to 64 characters of A-Z, a-z, 0-9, ".", "_" or "-".', title='Invalid kind'
        )
    if kind == 'image':
        # NOTE: the index lists every blob of kind image under /images, and /stats counts it as one:
        # only the image door, which has Pillow identify the bytes, stores that kind
        raise BadRequest(
            "The kind image is the image door's: upload images at /images and list them by GET /images.",
            title='Invalid kind',
        )
    return kind


def parse_user_meta(text: str | None, max_bytes: int) -> dict[str, Any]:
    """Parse an artifact's own meta (a JSON object of at most ``max_bytes``), refusing ISS's keys.

    Raises:
        BadRequest: too large, not a JSON object, not UTF-8 as JSON, or setting a reserved key.
    """
    if not text:
        return {}
    if len(text.encode()) > max_bytes:
        raise _invalid_meta(f'meta is larger than {max_bytes} bytes.')
    try:
        parsed = parse_json(text)
    except ValueError as exc:
        raise _invalid_meta(f'meta is not JSON: {exc}') from None
    if not isinstance(parsed, dict):
        raise _invalid_meta('meta must be a JSON object.')
    try:
        # APPSEC: "\ud800" parses to a lone surrogate, which no UTF-8 answer (/meta, /events) can carry
        json.dumps(parsed, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        raise _invalid_meta('meta must be text that UTF-8 encodes: no lone surrogates (\\ud800-\\udfff).') from None
    reserved = sorted(RESERVED_KEYS.intersection(parsed))
    if reserved:
        raise _invalid_meta(f'meta may not set keys ISS owns: {", ".join(reserved)}.')
    return parsed


def media_type(value: str | None) -> str:
    """Normalise a client-declared Content-Type, or fall back to octet-stream.

    Only a plain ``type/subtype`` (and a charset) is kept: anything else is
    not trusted into a response header.
    """
    if not value:
        return OCTET_STREAM
    essence, _, params = value.partition(';')
    essence = essence.strip().lower()
    # NOTE: curl --data-binary labels every body a form; that is no type at all.
    if not _MEDIA_TYPE_PATTERN.fullmatch(essence) or essence == 'application/x-www-form-urlencoded':
        return OCTET_STREAM
    charset = _CHARSET_PATTERN.search(params)
    return f'{essence}; charset={charset.group(1)}' if charset else essence


def _invalid_meta(description: str) -> BadRequest:
    return BadRequest(description, title='Invalid meta')


def parse_json(text: str | bytes) -> Any:
    """Parse a small JSON document a client sent (meta, a request body) as the standard has it.

    Raises:
        ValueError: not JSON; NaN, Infinity or a number too large for a float (``1e999``), which
            JSON has not and no answer could carry back; nested deeper than Python recurses.
    """
    try:
        return json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except RecursionError:
        # NOTE: the decoder recurses once per array or object: its depth is bounded by the interpreter's
        raise ValueError('nested too deeply') from None


def _reject_constant(name: str) -> None:
    raise ValueError(f'{name} is not valid JSON')


def _finite_float(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):
        raise ValueError(f'{text} is too large a number')
    return number
