"""What ISS knows about images, with Pillow: identification from the header, and derivatives.

Identification reads the header only (no pixels are decoded), so it is cheap
at upload and a decompression bomb is refused before any memory is spent.
A derivative (:func:`render`) is one decode, shrunk as early as the format
allows (JPEG DCT scaling via ``draft``, then ``reduce``), oriented by its EXIF
tag, converted to what the output format can hold, resized and encoded.

APPSEC: this module is the one boundary between ISS and Pillow's decoders. Every
call into Pillow, at upload and at render, is made here, and whatever a decoder
raises (IndexError, struct.error, a libavif RuntimeError...) becomes one of the
typed refusals below, logged; nothing of a hostile file reaches the resources as a
500. What a file may cost is bounded: identification reads at most
:data:`HEADER_BUDGET` (a JPEG padded with APP segments is refused, not held in
memory), frames are counted within :data:`FRAMES_BUDGET` and at most
:data:`MAX_FRAMES_WALKED` TIFF directories, and decoding goes through a
:class:`RenderGate` that bounds the renders, and their pixels, in flight.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import logging
import re
import threading
import time
import unicodedata
from collections.abc import Iterator
from typing import IO, Any, cast

from PIL import ExifTags, Image, TiffImagePlugin, UnidentifiedImageError, features

from iss_server import formats, placeholders, similar
from iss_server.config import Settings
from iss_server.errors import RendersBusy

log = logging.getLogger('iss.images')

# NOTE: before any Image.open: HEIC/HEIF and JPEG XL are images like the others from here on.
formats.register()

#: Output formats a derivative may have; avif and jxl only where Pillow can write them.
OUTPUT_FORMATS = (
    {'jpeg': 'JPEG', 'png': 'PNG', 'webp': 'WEBP'}
    | ({'avif': 'AVIF'} if features.check('avif') else {})
    | ({'jxl': 'JXL'} if 'JXL' in Image.SAVE else {})
)
OUTPUT_TYPES = {
    'JPEG': 'image/jpeg',
    'PNG': 'image/png',
    'WEBP': 'image/webp',
    'AVIF': 'image/avif',
    'JXL': 'image/jxl',
}
FITS = ('contain', 'cover', 'fill')
#: The longest side each output format encodes (libjpeg, libwebp, AV1); PNG has no such limit.
MAX_OUTPUT_SIDE = {'JPEG': 65_500, 'WEBP': 16_383, 'AVIF': 65_536}
#: Pillow's own bomb limit, for callers that set none of their own (ISS_MAX_IMAGE_PIXELS's default).
DEFAULT_MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 2**31

# The EXIF fields recorded at upload: the ones pipelines sort and filter by.
_EXIF_KEYS = ('captured_at', 'camera_make', 'camera_model', 'orientation')
# Where a capture time may stand, best first, each with the tag of its UTC offset (EXIF 2.31).
_CAPTURE_TIMES = (
    (ExifTags.IFD.Exif, ExifTags.Base.DateTimeOriginal, ExifTags.Base.OffsetTimeOriginal),
    (ExifTags.IFD.Exif, ExifTags.Base.DateTimeDigitized, ExifTags.Base.OffsetTimeDigitized),
    (None, ExifTags.Base.DateTime, ExifTags.Base.OffsetTime),
)
_EXIF_TIME = re.compile(r'(\d{4}):(\d{2}):(\d{2})[ T](\d{2}):(\d{2}):(\d{2})')
_EXIF_OFFSET = re.compile(r'[+-]\d{2}:\d{2}')
# An Accept parameter by which a client refuses the type it follows (RFC 9110 12.4.2).
_REFUSED = re.compile(r'q\s*=\s*0(\.0{0,3})?')
# Orientations 5-8 turn the picture a quarter: width and height swap when it is shown.
_QUARTER_TURNS = frozenset({5, 6, 7, 8})
# Bits per channel of Pillow's modes; what is not here has 8.
# What of an EXIF text field is kept (a camera's make or model is a few dozen characters).
_MAX_EXIF_TEXT = 256
_BITS = {'1': 1, 'I;16': 16, 'I;16B': 16, 'I;16L': 16, 'I;16N': 16, 'I': 32, 'F': 32}
#: A raw mode's bits a sample (Pillow's names: RGB;16B, L;2, F;32F).
_RAW_BITS = re.compile(r'[A-Z]+;(\d+)')

#: Keys an image's meta file gets from one small decode at upload (:func:`fingerprints`): the
#: perceptual hash (16 hex digits) and the placeholders; null when the pixels do not decode.
FINGERPRINT_KEYS = ('phash', 'thumbhash', 'blurhash')

#: Keys an image's meta file gets from its header (see meta.image), beyond the seed's.
IMAGE_META_KEYS = frozenset(
    {
        'format',
        'oriented_width',
        'oriented_height',
        'mode',
        'bit_depth',
        'channels',
        'frames',
        'captured_at',
        'camera_make',
        'camera_model',
        'orientation',
    }
)


class NotAnImage(ValueError):
    """Pillow cannot identify the bytes as an image (or a decoder fails on its header)."""


class ImageTooLarge(ValueError):
    """The image declares more pixels than ISS will decode (a decompression bomb), or its header costs too much."""


class CannotRender(ValueError):
    """The image was identified but its pixels cannot be decoded (truncated, corrupt)."""


class OutputTooLarge(ValueError):
    """The derivative would be larger than its format can hold: refused before any pixel is decoded."""


@dataclasses.dataclass(frozen=True)
class ImageInfo:
    format: str  # Pillow's name for the format, e.g. 'PNG'
    mime: str  # the media type that format implies, never the client's claim
    width: int
    height: int
    fields: dict[str, Any]  # the rest of IMAGE_META_KEYS that the header tells


# -- what a file may cost -----------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ReadBudget:
    """How much Pillow may read of a file for one step: bytes, and calls (each costs Python time)."""

    bytes: int
    reads: int


#: Identification (Image.open and the EXIF): a JPEG's APP segments are kept in memory by
#: Pillow, so a file padded with them is refused past this. NOTE: WebP and AVIF are read
#: whole to be identified: one larger than this is refused (413).
HEADER_BUDGET = ReadBudget(bytes=32 * 1024 * 1024, reads=20_000)
#: Counting the frames after the header (a GIF is read through, not decoded): past this,
#: ``frames`` is the count reached (at least that many).
FRAMES_BUDGET = ReadBudget(bytes=64 * 1024 * 1024, reads=500_000)
#: Formats whose decoder reads the whole file into memory at load (pillow-jxl-plugin): their decode
#: has HEADER_BUDGET, as WebP and AVIF have at open. Others stream their pixels: no read budget.
#: NOTE: a JPEG XL padded to 1.5 GB took a worker to 1.5 GB.
_READ_WHOLE_AT_LOAD = frozenset({'JXL'})


def _decode_budget(image: Image.Image) -> ReadBudget | None:
    return HEADER_BUDGET if image.format in _READ_WHOLE_AT_LOAD else None


#: TIFF directories walked to count frames. PERF: Pillow checks each one against all before
#: it (quadratic): 100,000 tiny ones took minutes.
MAX_FRAMES_WALKED = 1000


class _OverBudget(Exception):
    """Pillow read more of a file than the step allows."""


class _BudgetedFile:
    """A file Pillow reads through, counting what it reads against a :class:`ReadBudget`.

    Seeks are free (a TIFF's directory may be at the end). ``budget`` None: unbounded
    (decoding pixels reads the file, as it must).
    """

    def __init__(self, file: IO[bytes], budget: ReadBudget | None) -> None:
        self._file = file
        self.allow(budget)

    def allow(self, budget: ReadBudget | None) -> None:
        """Start a step with a fresh budget."""
        self._budget = budget
        self._bytes = self._reads = 0

    def _count(self, size: int) -> None:
        if self._budget is None:
            return
        self._bytes += size
        self._reads += 1
        if self._bytes > self._budget.bytes or self._reads > self._budget.reads:
            raise _OverBudget(f'more than {self._budget.bytes} bytes or {self._budget.reads} reads')

    def read(self, size: int = -1) -> bytes:
        if self._budget is not None and (size is None or size < 0 or size > self._budget.bytes):
            size = self._budget.bytes - self._bytes + 1  # NOTE: never more than the budget, then refused
        data = self._file.read(size)
        self._count(len(data))
        return data

    def readinto(self, buffer: Any) -> int:
        # NOTE: typing.IO declares no readinto; every file read here has one (a file, an S3 body).
        count = self._file.readinto(buffer)  # type: ignore[attr-defined]
        self._count(count or 0)
        return count

    def readline(self, size: int = -1) -> bytes:
        if self._budget is not None and (size is None or size < 0):
            size = self._budget.bytes - self._bytes + 1
        line = self._file.readline(size)
        self._count(len(line))
        return line

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._file.seek(offset, whence)

    def tell(self) -> int:
        return self._file.tell()

    def __getattr__(self, name: str) -> Any:
        # NOTE: fileno() among them: libtiff decodes from the descriptor, not a copy in memory.
        return getattr(self._file, name)


@contextlib.contextmanager
def _boundary(refusal: type[ValueError], doing: str) -> Iterator[None]:
    """Turn whatever Pillow or a decoder raises into ``refusal``, logged; ISS's own refusals pass."""
    try:
        yield
    except (NotAnImage, ImageTooLarge, CannotRender, OutputTooLarge, RendersBusy):
        raise
    except _OverBudget as exc:
        log.warning('image refused while %s: it costs %s', doing, exc)
        raise ImageTooLarge(f'identifying it takes {exc}; this service reads at most that') from None
    except UnidentifiedImageError:
        raise refusal('no image format this service reads') from None
    except BaseException as exc:  # APPSEC: a decoder's failure is the file's, whatever its type
        # NOTE: a panic of a decoder in Rust (pillow-jxl-plugin, through pyo3) is a BaseException;
        # an interrupt or an exit is no decoder's.
        if not isinstance(exc, Exception) and type(exc).__name__ != 'PanicException':
            raise
        reason = str(exc).strip()  # NOTE: libheif's messages end in a newline, which an answer should not carry
        log.warning('image refused while %s: %s: %s', doing, type(exc).__name__, reason)
        raise refusal(f'{type(exc).__name__}: {reason}' if reason else type(exc).__name__) from None


class _Limit(threading.local):
    """The pixel limit of the image this thread is opening (ISS_MAX_IMAGE_PIXELS)."""

    max_pixels = DEFAULT_MAX_PIXELS


_limit = _Limit()


def _bomb_check(size: tuple[int, int], *, error_only: bool = False) -> None:
    """Refuse a size of more pixels than the thread's limit: Pillow's own check, with ISS's limit and words.

    APPSEC: Pillow calls it in Image.open and inside its plugins, before they allocate. ISS
    once turned it off to apply its own limit after open: a GIF frame larger than its screen
    (105 bytes, found by scripts/fuzz.py) then took 3.4 GB in Image.open.
    """
    width, height = size
    if max(1, width) * max(1, height) > _limit.max_pixels:
        raise ImageTooLarge(
            f'{width}x{height} is {width * height} pixels; this service decodes at most {_limit.max_pixels} '
            '(ISS_MAX_IMAGE_PIXELS)'
        )


# NOTE: Pillow (pinned) looks the check up by name at each call: this one is used throughout.
Image._decompression_bomb_check = _bomb_check


def _open(file: _BudgetedFile, max_pixels: int) -> Image.Image:
    """Open an image lazily (header only); refuse one of more than ``max_pixels``."""
    _limit.max_pixels = max_pixels
    with _boundary(NotAnImage, 'identifying'):
        # NOTE: a JPEG XL too is opened from its headers (formats._JxlImageFile), its pixels decoded in load.
        image = Image.open(file)
    try:
        _bomb_check(image.size)  # NOTE: Image.open made it already; said here, as it is ISS's rule
        if image.format in _CODED_FORMATS:
            _check_coded_images(file)
    except (ImageTooLarge, NotAnImage):
        image.close()
        raise
    return image


#: Formats whose size Pillow takes from a box (``ispe``) beside the coded images: theirs are read too.
_CODED_FORMATS = frozenset({'AVIF', 'HEIF'})


def _check_coded_images(file: _BudgetedFile) -> None:
    """Refuse an AVIF or a HEIC whose images are coded larger than it declares, or than the pixel limit.

    APPSEC: the size Pillow reports (and :func:`_bomb_check` saw) is the ``ispe``'s; the decoder decodes
    what the AV1 sequence header or the HEVC sequence parameter set says. libavif then scales the frame
    to the ``ispe``: 3.5 KB declaring 100 x 100 decoded 16000 x 16000 (548 MiB) at upload (issue 27,
    NOTES-avifseq.md). libheif refuses the picture (before decoding it when far larger): a HEIC declaring
    100 x 100 over 8000 x 8000 was stored as 100 x 100, with no fingerprints and no derivative (NOTES-hevcsps.md).
    """
    file.allow(HEADER_BUDGET)  # NOTE: Image.open read the whole file; this parse reads its boxes and headers again
    with _boundary(NotAnImage, 'identifying'):
        coded_images = formats.coded_images(file)
    for coded in coded_images:
        (width, height), (shown_width, shown_height) = coded.declared, coded.shown
        if shown_width > width or shown_height > height:
            raise ImageTooLarge(
                f'its {coded.where} declares {width}x{height} pixels but is coded at {shown_width}x{shown_height}; '
                'this service decodes no more than an image declares'
            )
        _bomb_check(coded.coded)


def _bit_depth(image: Image.Image) -> int:
    """Bits per sample as the image is coded.

    NOTE: Pillow decodes a 16-bit colour PNG or TIFF to RGB(A) (8 bits) and a 2- or 4-bit grey PNG to L: its
    raw mode, what the file holds, says the depth (Pillow names them MODE;BITS..., "RGB;16B"). pillow-heif and
    ISS's JPEG XL opener decode a 10- or 12-bit image to RGB and say the coded depth in ``info['bit_depth']``
    (a phone's HDR HEIC was recorded as 8). libavif's is not given: an AVIF's is its mode's.
    """
    coded = image.info.get('bit_depth')
    if type(coded) is int and 1 <= coded <= 32:
        return coded
    raw = _RAW_BITS.match(_raw_mode(image))
    return int(raw[1]) if raw and 1 <= int(raw[1]) <= 64 else _BITS.get(image.mode, 8)


def _raw_mode(image: Image.Image) -> str:
    """The raw mode of the image's first tile ('' for none): the samples as its file holds them."""
    tiles = getattr(image, 'tile', None)  # NOTE: an opened file's (ImageFile); an Image has none
    if not tiles:
        return ''
    args = tiles[0].args
    raw = args[0] if isinstance(args, tuple) and args else args
    return raw if isinstance(raw, str) else ''


def identify(file: IO[bytes], max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageInfo:
    """Identify an image from its header, without decoding the pixels.

    Raises:
        NotAnImage: the bytes are not a format Pillow can open, or its header breaks a decoder.
        ImageTooLarge: the header declares more than ``max_pixels``, or reading it costs
            more than :data:`HEADER_BUDGET`.
    """
    budgeted = _BudgetedFile(file, HEADER_BUDGET)
    with _open(budgeted, max_pixels) as image, _boundary(NotAnImage, 'identifying'):
        width, height = image.size
        image_format = image.format or ''
        fields: dict[str, Any] = {
            'mode': image.mode,
            'bit_depth': _bit_depth(image),
            'channels': len(image.getbands()),
        }
        fields.update(_exif_fields(image))
        if image_format in _READ_WHOLE_AT_LOAD and budgeted.seek(0, 2) > HEADER_BUDGET.bytes:
            # NOTE: as WebP and AVIF, read whole at open: refused here rather than stored without its fingerprints.
            raise ImageTooLarge(
                f'identifying it takes more than {HEADER_BUDGET.bytes} bytes; this service reads at most that'
            )
        budgeted.allow(FRAMES_BUDGET)
        fields['frames'] = _count_frames(image)
    # NOTE: every key, null when the image has no such EXIF field: a meta file has them all.
    fields = dict.fromkeys(_EXIF_KEYS) | fields
    turned = fields.get('orientation') in _QUARTER_TURNS
    fields['oriented_width'], fields['oriented_height'] = (height, width) if turned else (width, height)
    mime = Image.MIME.get(image_format, 'application/octet-stream')
    return ImageInfo(image_format, mime, width, height, fields)


def _count_frames(image: Image.Image) -> int:
    """How many frames the image has; past the bounds, how many were counted (at least that many).

    The header is read already; a decoder failing further in leaves the frames counted so far.
    """
    if isinstance(image, TiffImagePlugin.TiffImageFile):
        # NOTE: seek() reads a TIFF's next directory, decoding nothing (a GIF's would decode).
        try:
            for frame in range(1, MAX_FRAMES_WALKED):
                image.seek(frame)
        except Exception:  # NOTE: EOFError ends the count; anything else too (see above)
            pass
        return image.tell() + 1
    try:
        return int(getattr(image, 'n_frames', 1))
    except Exception:  # NOTE: _OverBudget, or a broken frame further in
        return image.tell() + 1


def _exif_fields(image: Image.Image) -> dict[str, Any]:
    exif = _exif(image)
    if exif is None:
        return {}
    orientation = _orientation(exif)
    return {
        'camera_make': _exif_text(exif, None, ExifTags.Base.Make),
        'camera_model': _exif_text(exif, None, ExifTags.Base.Model),
        'orientation': orientation if orientation != 0 else None,
        'captured_at': _capture_time(exif),
    }


def _exif(image: Image.Image) -> Image.Exif | None:
    """The image's EXIF, read from its header; None when it has none, or a broken one."""
    if image.format == 'PNG' and 'exif' not in image.info:
        # PERF: Pillow looks for an eXIf chunk after the pixels by decoding them all (a 25 MP
        # PNG: 270 ms, and its memory before a render is admitted); the PNG specification puts
        # it before them, where open() has read it.
        return None
    try:
        return image.getexif()
    except _OverBudget:
        raise
    except Exception:  # NOTE: a broken EXIF block is no reason to refuse the image
        return None


def _orientation(exif: Image.Exif | None) -> int:
    """The EXIF Orientation, 1 to 8; 0 when there is none that is one of those.

    NOTE: a whole number only: a RATIONAL 6/1 compares equal to 6, and is no JSON.
    """
    try:
        value = exif.get(ExifTags.Base.Orientation) if exif is not None else None
    except Exception:
        return 0
    return value if type(value) is int and 1 <= value <= 8 else 0


def _exif_text(exif: Image.Exif, ifd: int | None, tag: int) -> str | None:
    try:
        value = (exif.get_ifd(ifd) if ifd else exif).get(tag)
    except _OverBudget:
        raise
    except Exception:
        return None
    if isinstance(value, bytes):
        value = value.decode('utf-8', 'replace')
    if not isinstance(value, str):
        return None
    # APPSEC: no control characters into meta (a NUL, a terminal's escape), and no essay.
    value = ''.join(ch for ch in value[:_MAX_EXIF_TEXT] if unicodedata.category(ch) != 'Cc')
    return value.strip() or None


def _capture_time(exif: Image.Exif) -> str | None:
    """When the picture was taken, as ISO 8601 (with its UTC offset when the camera wrote one).

    EXIF writes ``2026:11:24 08:15:00``, which sorts but no date parser reads;
    a placeholder such as ``0000:00:00 00:00:00`` or a garbled value is no time.
    """
    for ifd, tag, offset_tag in _CAPTURE_TIMES:
        match = _EXIF_TIME.fullmatch(_exif_text(exif, ifd, tag) or '')
        if match is None:
            continue
        try:
            year, month, day, hour, minute, second = map(int, match.groups())
            moment = datetime.datetime(year, month, day, hour, minute, second)
        except ValueError:
            continue
        offset = _exif_text(exif, ifd, offset_tag) or ''
        return moment.isoformat() + (offset if _EXIF_OFFSET.fullmatch(offset) else '')
    return None


# -- fingerprints: the perceptual hash and the placeholders ---------------------------------------


def fingerprints(source: IO[bytes], max_pixels: int, gate: RenderGate | None = None) -> dict[str, Any]:
    """The meta's :data:`FINGERPRINT_KEYS` of the image in ``source``, from one small decode.

    The image is decoded as small as its format allows (``placeholders.reduced``: a JPEG at 1/8
    scale, a HEIC's embedded thumbnail; other formats in full), turned upright by its EXIF
    orientation (a rotated copy is another picture), then hashed.

    Raises:
        NotAnImage, ImageTooLarge: as :func:`identify`.
        CannotRender: the pixels cannot be decoded.
        RendersBusy: the gate had no room for the decode in time.
    """
    budgeted = _BudgetedFile(source, HEADER_BUDGET)
    with _open(budgeted, max_pixels) as image, _boundary(CannotRender, 'fingerprinting'):
        orientation = _orientation(_exif(image))
        # NOTE: draft now (placeholders.reduced's own is then a no-op), so the gate counts the pixels decoded.
        image.draft(None, (placeholders.SIDE * 2, placeholders.SIDE * 2))
        budgeted.allow(_decode_budget(image))
        with (gate or GATE).admitted(_decoded_pixels(image), wait=_UPLOAD_WAIT_SECONDS):
            shown = placeholders.reduced(image)
    if orientation in _TRANSPOSITIONS:
        shown = shown.transpose(_TRANSPOSITIONS[orientation])
    # PERF: one reduction for both placeholders (each reduces a larger image to this same size).
    tiny = placeholders.reduced(shown, placeholders.PLACEHOLDER_SIDE)
    return {
        'phash': similar.to_hex(similar.perceptual_hash(shown)),
        'thumbhash': placeholders.thumbhash(tiny),
        'blurhash': placeholders.blurhash(tiny),
    }


# -- derivatives ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Variant:
    """What a derivative is: at most ``width`` x ``height``, fitted, in ``format`` at ``quality``.

    ``format`` is Pillow's name (JPEG, PNG, WEBP, AVIF); ``quality`` is None for PNG.
    """

    width: int | None
    height: int | None
    fit: str
    format: str
    quality: int | None

    @property
    def key(self) -> str:
        """A canonical name: one file, and one ETag, per distinct variant."""
        size = f'{self.width or ""}x{self.height or ""}'
        quality = f'-q{self.quality}' if self.quality is not None else ''
        return f'{size}-{self.fit}{quality}.{self.format.lower()}'

    @property
    def media_type(self) -> str:
        return OUTPUT_TYPES[self.format]


def target_size(source: tuple[int, int], variant: Variant) -> tuple[int, int]:
    """The output size for an (oriented) source size; never larger than the source."""
    width, height = source
    box_w = min(variant.width or width, width) if variant.fit != 'fill' else (variant.width or width)
    box_h = min(variant.height or height, height) if variant.fit != 'fill' else (variant.height or height)
    if variant.fit == 'fill' or (variant.width and variant.height and variant.fit == 'cover'):
        return max(1, box_w), max(1, box_h)
    # contain (and cover with one side given): scale to fit the box, keeping the aspect ratio
    scale = min(box_w / width, box_h / height, 1.0)
    return max(1, round(width * scale)), max(1, round(height * scale))


class RenderGate:
    """At most ``renders`` decodes at once in this process, holding at most ``pixels`` pixels between them.

    A decode waits for room up to ``wait`` seconds, then is refused (:class:`RendersBusy`,
    a 503 with Retry-After): a burst of large renders is shed, not piled up in memory.
    One image of more than ``pixels`` renders when nothing else does (it could never, else).
    """

    def __init__(self, renders: int, pixels: int, wait: float = 1.0) -> None:
        self.renders = renders
        self.pixels = pixels
        self._wait = wait
        self._condition = threading.Condition()
        self._running = 0
        self._in_flight = 0

    def configure(self, settings: Settings) -> None:
        """Take the bounds of ``settings`` (ISS_RENDERS, ISS_RENDER_PIXELS); renders in flight go on."""
        with self._condition:
            self.renders, self.pixels = settings.renders, settings.render_pixels
            self._condition.notify_all()

    @contextlib.contextmanager
    def admitted(self, pixels: int, wait: float | None = None) -> Iterator[None]:
        """Hold a place for a decode of ``pixels`` pixels while the block runs.

        Raises:
            RendersBusy: no room came within the wait.
        """
        deadline = time.monotonic() + (self._wait if wait is None else wait)
        with self._condition:
            while not self._fits(pixels):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise RendersBusy(f'{self._running} renders of {self._in_flight} pixels in flight')
                self._condition.wait(remaining)
            self._running += 1
            self._in_flight += pixels
        try:
            yield
        finally:
            with self._condition:
                self._running -= 1
                self._in_flight -= pixels
                self._condition.notify_all()

    def _fits(self, pixels: int) -> bool:
        return self._running < self.renders and (self._running == 0 or self._in_flight + pixels <= self.pixels)


#: What a JPEG XL's decode holds per pixel, in the gate's pixels (Pillow's 4 bytes). PERF: libjxl
#: decodes a lossless (modular) image through 32-bit planes: 81 MP took 1.2 GB, 15 bytes a pixel
#: (a lossy one 6); counted as 4 pixels, one such decode has a worker's ISS_RENDER_PIXELS to itself.
JXL_PIXEL_WEIGHT = 4


def _decoded_pixels(image: Image.Image) -> int:
    """The pixels the gate admits to decode ``image`` as it is drafted: a JPEG XL's weighted."""
    return image.width * image.height * (JXL_PIXEL_WEIGHT if image.format == 'JXL' else 1)


#: The gate of this process (a gunicorn worker): every decode of an upload and every render
#: goes through it, unless the caller brings its own. The app sets its bounds (configure).
GATE = RenderGate(Settings.renders, Settings.render_pixels)
# NOTE: an upload that must decode has its whole body received already: it waits longer than a render.
_UPLOAD_WAIT_SECONDS = 30.0


def check_decodes(source: IO[bytes], max_pixels: int, gate: RenderGate | None = None) -> None:
    """Decode every pixel of ``source`` (the first frame), to prove the image is whole.

    Raises:
        NotAnImage, ImageTooLarge: as :func:`identify`.
        CannotRender: the pixels cannot be decoded (truncated, corrupt).
        RendersBusy: the gate had no room for the decode in time.
    """
    budgeted = _BudgetedFile(source, HEADER_BUDGET)
    with _open(budgeted, max_pixels) as image:
        budgeted.allow(_decode_budget(image))
        admitted = (gate or GATE).admitted(_decoded_pixels(image), wait=_UPLOAD_WAIT_SECONDS)
        with admitted, _boundary(CannotRender, 'decoding'):
            image.load()


def render(
    source: IO[bytes], variant: Variant, out: IO[bytes], max_pixels: int, gate: RenderGate | None = None
) -> None:
    """Decode ``source`` once, make ``variant`` of it, and encode it into ``out``, with room from ``gate``.

    Raises:
        NotAnImage, ImageTooLarge: as :func:`identify`.
        OutputTooLarge: the output would be larger than its format holds (a sliver's format conversion).
        CannotRender: the pixels cannot be decoded.
        RendersBusy: the gate had no room for it in time.
        OSError: writing ``out`` failed (as raised by ``out``).
    """
    budgeted = _BudgetedFile(source, HEADER_BUDGET)
    sink = _Sink(out)
    with _open(budgeted, max_pixels) as image:
        try:
            with _boundary(CannotRender, 'rendering'):
                orientation, size = _prepare(image, variant)
                _check_output_size(size, variant.format)
                budgeted.allow(_decode_budget(image))
                with (gate or GATE).admitted(_decoded_pixels(image) + size[0] * size[1]):
                    _render(image, orientation, size, variant, sink)
        except CannotRender:
            if sink.failure is not None:
                raise sink.failure from None  # NOTE: the disk's trouble (full, failing), not the image's
            raise


def _check_output_size(size: tuple[int, int], image_format: str) -> None:
    """Refuse an output its encoder would fail on only after the whole decode (seconds of CPU for a 1x80,000,000)."""
    longest = MAX_OUTPUT_SIDE.get(image_format)
    if longest is not None and max(size) > longest:
        raise OutputTooLarge(
            f'the derivative would be {size[0]}x{size[1]}; {image_format} holds at most {longest} pixels a side: '
            'ask for w and h, or format=png'
        )


class _Sink:
    """The output of a render, remembering a failure of its own (which is no fault of the image)."""

    def __init__(self, out: IO[bytes]) -> None:
        self._out = out
        self.failure: BaseException | None = None

    def write(self, data: Any) -> int:
        try:
            return self._out.write(data)
        except BaseException as exc:
            self.failure = exc
            raise

    # NOTE: no fileno(): Pillow would encode straight to the descriptor, past write().
    def flush(self) -> None:
        self._out.flush()

    def tell(self) -> int:
        return self._out.tell()

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._out.seek(offset, whence)


# Orientations 2-8 as the transposition that shows the picture upright (EXIF 2.32, 4.6.4 A).
_TRANSPOSITIONS = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _prepare(image: Image.Image, variant: Variant) -> tuple[int, tuple[int, int]]:
    """The orientation and output size; a JPEG set to decode no larger than the output needs."""
    orientation = _orientation(_exif(image)) or 1
    turned = orientation in _QUARTER_TURNS
    oriented = image.size[::-1] if turned else image.size
    width, height = target_size(oriented, variant)
    if image.format == 'JPEG':
        # PERF: a JPEG decodes at 1/2, 1/4 or 1/8 scale straight from its DCT
        # coefficients; draft keeps at least the size the output needs.
        scale = max(width / oriented[0], height / oriented[1])
        need = (round(oriented[0] * scale), round(oriented[1] * scale))
        image.draft('RGB' if image.mode not in ('L', 'CMYK') else image.mode, need[::-1] if turned else need)
    return orientation, (width, height)


def _render(image: Image.Image, orientation: int, size: tuple[int, int], variant: Variant, out: _Sink) -> None:
    width, height = size
    image.seek(0)  # NOTE: an animation gives its first frame
    image.load()
    # NOTE: the colour profile goes with the pixels (a Display P3 photo stays P3), except
    # from CMYK: its conversion to RGB leaves a CMYK profile describing nothing.
    icc_profile = image.info.get('icc_profile') if image.mode != 'CMYK' else None
    image = _to_working_mode(image)
    if orientation in _TRANSPOSITIONS:
        # NOTE: not ImageOps.exif_transpose, which rewrites the EXIF (and fails on a malformed
        # one); the output carries no EXIF.
        image = image.transpose(_TRANSPOSITIONS[orientation])
    box = None
    if variant.fit == 'cover':
        # the centred part of the source with the output's aspect ratio
        scale = max(width / image.width, height / image.height)
        crop_w, crop_h = width / scale, height / scale
        left, top = (image.width - crop_w) / 2, (image.height - crop_h) / 2
        box = (left, top, left + crop_w, top + crop_h)
    if image.size != (width, height) or box is not None:
        # PERF: reducing_gap lets Pillow shrink by whole factors (reduce) before resampling.
        image = image.resize((width, height), Image.Resampling.LANCZOS, box=box, reducing_gap=3.0)
    image = _to_output_mode(image, variant.format)
    options: dict[str, Any] = {'icc_profile': icc_profile} if icc_profile else {}
    if variant.quality is not None:
        options['quality'] = variant.quality
    if variant.format == 'PNG':
        options['compress_level'] = 6
    elif variant.format == 'WEBP':
        options['method'] = 4
    elif variant.format == 'JXL':
        # PERF: libjxl's default effort (7) took 107 ms for a 512x384 thumbnail here, 5 took 69 ms;
        # 3 (19 ms) shifts saturated colours of small images by ~65 levels of 255 at q80 (NOTES-images.md).
        options['effort'] = 5
        # NOTE: the plugin copies the source's EXIF when given none: its GPS, and an orientation
        # the pixels already have (a re-upload turned twice). Every other output carries none.
        options['exif'] = b''
        # NOTE: libjxl refuses quality 100 ("the encoder API is used in an incorrect way"): it is lossless.
        options['lossless'] = variant.quality == 100
    # NOTE: Pillow's annotation asks for an IO; it only writes to it, which the sink does.
    image.save(out, variant.format, **options)  # type: ignore[arg-type]


def _to_working_mode(image: Image.Image) -> Image.Image:
    """Pixels Pillow can resample: 8 bits per channel, alpha kept, palettes and CMYK resolved."""
    mode = image.mode
    if mode in ('RGB', 'RGBA', 'L', 'LA'):
        return image
    if mode == 'P':
        return image.convert('RGBA' if 'transparency' in image.info else 'RGB')
    if mode.startswith('I;16'):
        # NOTE: 16-bit grey scaled to 8 bits (not clipped at 255, which turns most of it white).
        return image.convert('I').point(lambda value: value / 256).convert('L')
    if mode in ('I', 'F'):
        low, high = cast(tuple[float, float], image.getextrema())  # NOTE: one band: its (min, max)
        span = (high - low) or 1
        return image.point(lambda value: (value - low) * 255 / span).convert('L')
    if mode == 'CMYK':
        return image.convert('RGB')  # NOTE: Pillow's conversion (Adobe-inverted CMYK handled); no ICC
    return image.convert('RGBA' if 'A' in mode or 'transparency' in image.info else 'RGB')


def _to_output_mode(image: Image.Image, image_format: str) -> Image.Image:
    """What the output format can hold: JPEG has no alpha (flattened on white)."""
    if image_format == 'JPEG' and image.mode in ('RGBA', 'LA'):
        background = Image.new('RGB', image.size, 'white')
        background.paste(image.convert('RGBA'), mask=image.getchannel('A'))
        return background
    return image


def choose_format(accept: str | None, has_alpha: bool) -> str:
    """``format=auto``: JPEG XL, AVIF or WebP when the client accepts them (in that order), else JPEG (PNG with alpha).

    A type the client lists with ``q=0`` is one it refuses (RFC 9110 12.4.2).
    """
    accepted = set()
    for item in (accept or '').split(','):
        media_type, *params = (part.strip().lower() for part in item.split(';'))
        if not any(_REFUSED.fullmatch(param) for param in params):
            accepted.add(media_type)
    if 'image/jxl' in accepted and 'jxl' in OUTPUT_FORMATS:
        return 'JXL'
    if 'image/avif' in accepted and 'avif' in OUTPUT_FORMATS:
        return 'AVIF'
    if 'image/webp' in accepted:
        return 'WEBP'
    return 'PNG' if has_alpha else 'JPEG'
