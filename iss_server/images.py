"""What ISS knows about images, with Pillow: identification from the header, and derivatives.

Identification reads the header only (no pixels are decoded), so it is cheap
at upload and a decompression bomb is refused before any memory is spent.
A derivative (:func:`render`) is one decode, shrunk as early as the format
allows (JPEG DCT scaling via ``draft``, then ``reduce``), oriented by its EXIF
tag, converted to what the output format can hold, resized and encoded.
"""

from __future__ import annotations

import dataclasses
import datetime
import re
from typing import IO, Any

from PIL import ExifTags, Image, ImageOps, features

#: Output formats a derivative may have; avif only where this Pillow was built with it.
OUTPUT_FORMATS = {'jpeg': 'JPEG', 'png': 'PNG', 'webp': 'WEBP'} | ({'avif': 'AVIF'} if features.check('avif') else {})
OUTPUT_TYPES = {'JPEG': 'image/jpeg', 'PNG': 'image/png', 'WEBP': 'image/webp', 'AVIF': 'image/avif'}
FITS = ('contain', 'cover', 'fill')
#: Pillow's own bomb limit, for callers that set none of their own (ISS_MAX_IMAGE_PIXELS's default).
DEFAULT_MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 2**31
# NOTE: every image ISS opens goes through _open, which applies the caller's limit from the
# header; Pillow's own (global) check would refuse, in other words, anything over twice its
# default whatever ISS_MAX_IMAGE_PIXELS says, and warn below that.
Image.MAX_IMAGE_PIXELS = None

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
_BITS = {'1': 1, 'I;16': 16, 'I;16B': 16, 'I;16L': 16, 'I;16N': 16, 'I': 32, 'F': 32}

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
    """Pillow cannot identify the bytes as an image."""


class ImageTooLarge(ValueError):
    """The image declares more pixels than ISS will decode (a decompression bomb)."""


class CannotRender(ValueError):
    """The image was identified but its pixels cannot be decoded (truncated, corrupt)."""


@dataclasses.dataclass(frozen=True)
class ImageInfo:
    format: str  # Pillow's name for the format, e.g. 'PNG'
    mime: str  # the media type that format implies, never the client's claim
    width: int
    height: int
    fields: dict[str, Any]  # the rest of IMAGE_META_KEYS that the header tells


def _open(file: IO[bytes], max_pixels: int) -> Image.Image:
    """Open an image lazily (header only); refuse one of more than ``max_pixels``."""
    try:
        image = Image.open(file)
    except Exception as exc:
        raise NotAnImage(str(exc) or type(exc).__name__) from None
    width, height = image.size
    if width * height > max_pixels:
        image.close()
        raise ImageTooLarge(
            f'{width}x{height} is {width * height} pixels; this service decodes at most {max_pixels} '
            '(ISS_MAX_IMAGE_PIXELS)'
        )
    return image


def identify(file: IO[bytes], max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageInfo:
    """Identify an image from its header, without decoding the pixels.

    Raises:
        NotAnImage: the bytes are not a format Pillow can open.
        ImageTooLarge: the header declares more than ``max_pixels``.
    """
    with _open(file, max_pixels) as image:
        width, height = image.size
        image_format = image.format or ''
        fields: dict[str, Any] = {
            'mode': image.mode,
            'bit_depth': _BITS.get(image.mode, 8),
            'channels': len(image.getbands()),
            'frames': getattr(image, 'n_frames', 1),
        }
        fields.update(_exif_fields(image))
    # NOTE: every key, null when the image has no such EXIF field: a meta file has them all.
    fields = dict.fromkeys(_EXIF_KEYS) | fields
    turned = fields.get('orientation') in _QUARTER_TURNS
    fields['oriented_width'], fields['oriented_height'] = (height, width) if turned else (width, height)
    mime = Image.MIME.get(image_format, 'application/octet-stream')
    return ImageInfo(image_format, mime, width, height, fields)


def _exif_fields(image: Image.Image) -> dict[str, Any]:
    if image.format == 'PNG' and 'exif' not in image.info:
        # PERF: Pillow looks for an eXIf chunk after the pixels by decoding them all (a 25 MP
        # PNG: 270 ms); the PNG specification puts it before them, where open() has read it.
        return {}
    try:
        exif = image.getexif()
    except Exception:  # NOTE: a broken EXIF block is no reason to refuse the image
        return {}
    orientation = exif.get(ExifTags.Base.Orientation)
    return {
        'camera_make': _exif_text(exif, None, ExifTags.Base.Make),
        'camera_model': _exif_text(exif, None, ExifTags.Base.Model),
        'orientation': orientation if orientation in range(1, 9) else None,
        'captured_at': _capture_time(exif),
    }


def _exif_text(exif: Image.Exif, ifd: int | None, tag: int) -> str | None:
    try:
        value = (exif.get_ifd(ifd) if ifd else exif).get(tag)
    except Exception:
        return None
    if isinstance(value, bytes):
        value = value.decode('utf-8', 'replace')
    return (value.strip('\x00 ').strip() or None) if isinstance(value, str) else None


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
            moment = datetime.datetime(*map(int, match.groups()))
        except ValueError:
            continue
        offset = _exif_text(exif, ifd, offset_tag) or ''
        return moment.isoformat() + (offset if _EXIF_OFFSET.fullmatch(offset) else '')
    return None


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


def check_decodes(source: IO[bytes], max_pixels: int) -> None:
    """Decode every pixel of ``source`` (the first frame), to prove the image is whole.

    Raises:
        NotAnImage, ImageTooLarge: as :func:`identify`.
        CannotRender: the pixels cannot be decoded (truncated, corrupt).
    """
    with _open(source, max_pixels) as image:
        try:
            image.load()
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise CannotRender(str(exc) or type(exc).__name__) from None


def render(source: IO[bytes], variant: Variant, out: IO[bytes], max_pixels: int) -> None:
    """Decode ``source`` once, make ``variant`` of it, and encode it into ``out``.

    Raises:
        NotAnImage, ImageTooLarge: as :func:`identify`.
        CannotRender: the pixels cannot be decoded.
    """
    with _open(source, max_pixels) as image:
        try:
            _render(image, variant, out)
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise CannotRender(str(exc) or type(exc).__name__) from None


def _render(image: Image.Image, variant: Variant, out: IO[bytes]) -> None:
    orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
    turned = orientation in _QUARTER_TURNS
    oriented = image.size[::-1] if turned else image.size
    width, height = target_size(oriented, variant)
    if image.format == 'JPEG':
        # PERF: a JPEG decodes at 1/2, 1/4 or 1/8 scale straight from its DCT
        # coefficients; draft keeps at least the size the output needs.
        scale = max(width / oriented[0], height / oriented[1])
        need = (round(oriented[0] * scale), round(oriented[1] * scale))
        image.draft('RGB' if image.mode not in ('L', 'CMYK') else image.mode, need[::-1] if turned else need)
    image.seek(0)  # NOTE: an animation gives its first frame
    image.load()
    # NOTE: the colour profile goes with the pixels (a Display P3 photo stays P3), except
    # from CMYK: its conversion to RGB leaves a CMYK profile describing nothing.
    icc_profile = image.info.get('icc_profile') if image.mode != 'CMYK' else None
    image = _to_working_mode(image)
    if orientation != 1:
        image = ImageOps.exif_transpose(image)
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
    image.save(out, variant.format, **options)


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
        low, high = image.getextrema()
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
    """``format=auto``: AVIF or WebP when the client accepts them, else JPEG (PNG with alpha).

    A type the client lists with ``q=0`` is one it refuses (RFC 9110 12.4.2).
    """
    accepted = set()
    for item in (accept or '').split(','):
        media_type, *params = (part.strip().lower() for part in item.split(';'))
        if not any(_REFUSED.fullmatch(param) for param in params):
            accepted.add(media_type)
    if 'image/avif' in accepted and 'avif' in OUTPUT_FORMATS:
        return 'AVIF'
    if 'image/webp' in accepted:
        return 'WEBP'
    return 'PNG' if has_alpha else 'JPEG'
