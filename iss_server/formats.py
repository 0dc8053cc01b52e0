"""Image formats past Pillow's own: HEIC/HEIF (``pillow-heif``) and JPEG XL (``pillow-jxl-plugin``).

AVIF needs no plugin: Pillow reads and writes it itself (its wheels carry libavif
since 11.3). :func:`register` teaches Pillow the other two, once per process;
call it before the first ``Image.open`` of an upload (``images.py`` does, at import).
:func:`jxl_header` reads a JPEG XL's size, mode and EXIF without decoding it.

NOTE: what each costs (NOTES-similar.md has the numbers):
- A HEIC decodes in full (HEVC has no reduced-scale decode as JPEG's ``draft``),
  unless it carries a thumbnail (phones write one): then ``draft``/``thumbnail``
  decode that thumbnail instead, as pillow-heif's plugin does.
- A JPEG XL decodes in full (libjxl gives no smaller decode through the plugin), in
  ``load`` as every other format: pillow-jxl-plugin decodes in ``Image.open``, so its
  opener is replaced by :class:`_JxlImageFile`, which reads the headers (:func:`jxl_header`)
  and leaves the decode to ``load``, inside ``images``' render gate. A decode costs about
  15 bytes a pixel (a lossless 81 MP: 1.2 GB), see NOTES-jxl.md.
"""

from __future__ import annotations

import dataclasses
import io
import threading
from typing import Any, Protocol, cast

from PIL import Image, ImageFile

#: Pillow's names of the formats this module is about. NOTE: their media types are Pillow's
#: registry's, as for every other format (``Image.MIME``): image/heif, image/jxl, image/avif.
NAMES = ('HEIF', 'JXL', 'AVIF')

_lock = threading.Lock()
_registered = False


def register() -> None:
    """Teach Pillow to open (and save) HEIC/HEIF and JPEG XL; a no-op when done before."""
    global _registered
    if _registered:
        return
    with _lock:
        if _registered:
            return
        import pillow_heif
        from pillow_jxl import JpegXLImagePlugin

        # NOTE: thumbnails kept (draft() decodes a phone's embedded thumbnail, not 12 MP);
        # depth and auxiliary images skipped: ISS never shows them, and each costs a decode.
        pillow_heif.register_heif_opener(thumbnails=True, depth_images=False, aux_images=False)
        # NOTE: importing the JXL plugin registered its opener (and its encoder, kept); this one replaces it.
        Image.register_open('JXL', _JxlImageFile, JpegXLImagePlugin._accept)
        _registered = True


def supported() -> dict[str, bool]:
    """Return whether Pillow opens each of HEIF, JXL and AVIF now (for the health page and tests)."""
    Image.init()  # NOTE: Pillow loads its own plugins (AVIF's among them) lazily
    return {name: name in Image.OPEN for name in NAMES}


# -- a JPEG XL's header, read without decoding ---------------------------------------------------------

_JXL_CODESTREAM = b'\xff\x0a'
_JXL_CONTAINER = b'\x00\x00\x00\x0cJXL \x0d\x0a\x87\x0a'
# NOTE: the aspect ratios a SizeHeader may name instead of a width (ISO/IEC 18181-1, SizeHeader).
_JXL_RATIOS = {1: (1, 1), 2: (12, 10), 3: (4, 3), 4: (3, 2), 5: (16, 9), 6: (5, 4), 7: (2, 1)}
# NOTE: the boxes read past to find the codestream; a file of more is no JPEG XL a camera writes.
_JXL_MAX_BOXES = 64
# NOTE: the codestream's headers fit in this (names of extra channels included): read at once.
_JXL_HEADERS_BYTES = 4096
# NOTE: an Exif box larger than a JPEG's APP1 segment can be is no camera's: its EXIF is skipped.
_JXL_MAX_EXIF_BYTES = 65_535
_ALPHA, _SPOT_COLOUR, _CFA, _GREY = 0, 2, 5, 1


class Readable(Protocol):
    """A file read and sought (an upload's staged file, or ``images``' budgeted one over it)."""

    def read(self, size: int = -1) -> bytes: ...

    def seek(self, offset: int, whence: int = 0) -> int: ...


@dataclasses.dataclass(frozen=True)
class JxlHeader:
    """What a JPEG XL file declares before its pixels: its size, Pillow's mode for it, its EXIF."""

    width: int
    height: int
    mode: str  # NOTE: the one pillow-jxl-plugin decodes it to: L, LA, RGB, RGBA, I;16 or F
    exif: bytes | None  # the TIFF data of its Exif box, as the plugin gives it to Pillow


def jxl_header(file: Readable) -> JxlHeader:
    """The size, mode and EXIF a JPEG XL file declares, read from its headers and boxes without decoding.

    APPSEC: pillow-jxl-plugin decodes the whole image inside ``Image.open``: 12 KB declaring
    9000 x 9000 pixels cost 1.2 GB and seconds of CPU to be identified (NOTES-jxl.md). :func:`register`
    replaces its opener by one that reads this instead, and decodes only in ``load``.

    Raises:
        ValueError: the file is no JPEG XL, or its headers are cut short or malformed.
    """
    file.seek(0)
    head = file.read(len(_JXL_CONTAINER))
    if head.startswith(_JXL_CODESTREAM):
        file.seek(2)
        return _codestream_headers(file.read(_JXL_HEADERS_BYTES), None)
    if head != _JXL_CONTAINER:
        raise ValueError('not a JPEG XL file')
    headers, exif = None, None
    for _ in range(_JXL_MAX_BOXES):
        box = file.read(8)
        if len(box) < 8:
            break
        size, box_type = int.from_bytes(box[:4], 'big'), box[4:]
        header_size = 8
        if size == 1:
            size, header_size = int.from_bytes(file.read(8), 'big'), 16
        if size != 0 and size < header_size:
            break
        content = size - header_size if size else None  # NOTE: 0 is "to the end of the file"
        if box_type in (b'jxlc', b'jxlp') and headers is None:
            prefix = 6 if box_type == b'jxlp' else 2
            if box_type == b'jxlp':
                file.read(4)  # NOTE: a partial codestream's index comes first
            if file.read(2) != _JXL_CODESTREAM:
                raise ValueError('a JPEG XL codestream box without the codestream signature')
            # NOTE: no further than the box: headers split over two partial boxes are "cut short", not misread.
            headers = file.read(_JXL_HEADERS_BYTES if content is None else min(_JXL_HEADERS_BYTES, content - prefix))
            if content is None:
                break
            file.seek(content - prefix - len(headers), 1)
            continue
        if box_type == b'Exif' and exif is None and content is not None and 4 < content <= _JXL_MAX_EXIF_BYTES:
            exif = file.read(content)
            continue
        if content is None:
            break
        file.seek(content, 1)
    if headers is None:
        raise ValueError('a JPEG XL container without a codestream')
    return _codestream_headers(headers, exif)


def _codestream_headers(data: bytes, exif: bytes | None) -> JxlHeader:
    """Read the SizeHeader and the ImageMetadata up to its colour space (ISO/IEC 18181-1, A.6 and A.4)."""
    bits = _Bits(data)
    width, height = _size_header(bits)
    grey, alpha, floating, bits_per_sample = _image_metadata(bits)
    if grey and not alpha and floating:
        mode = 'F'
    elif grey and not alpha and bits_per_sample > 8:
        mode = 'I;16'
    else:
        mode = ('L' if grey else 'RGB') + ('A' if alpha else '')
    if exif is not None and exif[4:8] in (b'II*\x00', b'MM\x00*'):
        exif = exif[4:]  # NOTE: the box starts with the offset of the TIFF header; the plugin skips it too
    return JxlHeader(width, height, mode, exif)


class _Bits:
    """A JPEG XL bit reader: bits least significant first, byte after byte."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._position = 0

    def __call__(self, count: int) -> int:
        if self._position + count > len(self._data) * 8:
            raise ValueError('a JPEG XL header cut short')
        value = 0
        for i in range(count):
            at = self._position + i
            value |= ((self._data[at >> 3] >> (at & 7)) & 1) << i
        self._position += count
        return value

    def u32(self, *choices: tuple[int, int]) -> int:
        """A U32: a 2-bit selector, then the chosen (bits, offset)."""
        count, offset = choices[self(2)]
        return self(count) + offset

    def enum(self) -> int:
        value = self.u32((0, 0), (0, 1), (4, 2), (6, 18))
        if value > 63:
            raise ValueError('a JPEG XL enum out of range')
        return value


def _size_header(bits: _Bits) -> tuple[int, int]:
    def dimension() -> int:
        return bits.u32((9, 1), (13, 1), (18, 1), (30, 1))

    small = bits(1)
    height = (bits(5) + 1) * 8 if small else dimension()
    ratio = bits(3)
    if ratio:
        numerator, denominator = _JXL_RATIOS[ratio]
        return height * numerator // denominator, height
    width = (bits(5) + 1) * 8 if small else dimension()
    return width, height


def _image_metadata(bits: _Bits) -> tuple[bool, bool, bool, int]:
    """Whether the image is grey, has alpha, has floating-point samples, and its bits per sample."""
    if bits(1):  # all_default: 8-bit sRGB, no extra channel
        return False, False, False, 8
    if bits(1):  # extra_fields
        bits(3)  # orientation. NOTE: libjxl's size and the plugin's are before it: ISS turns by EXIF only
        if bits(1):  # have_intr_size
            _size_header(bits)
        if bits(1):  # have_preview
            div8 = bits(1)
            preview = ((0, 16), (0, 32), (5, 1), (9, 33)) if div8 else ((6, 1), (8, 65), (10, 321), (12, 1345))
            bits.u32(*preview)
            if bits(3) == 0:
                bits.u32(*preview)
        if bits(1):  # have_animation
            bits.u32((0, 100), (0, 1000), (10, 1), (30, 1))
            bits.u32((0, 1), (0, 1001), (8, 1), (10, 1))
            bits.u32((0, 0), (3, 0), (16, 0), (32, 0))
            bits(1)
    floating, bits_per_sample = _bit_depth(bits)
    bits(1)  # modular_16_bit_buffer_sufficient
    alpha = False
    for _ in range(bits.u32((0, 0), (0, 1), (4, 2), (12, 1))):
        if bits(1):  # d_alpha: an 8-bit alpha channel
            alpha = True
            continue
        channel_type = bits.enum()
        alpha = alpha or channel_type == _ALPHA
        _bit_depth(bits)
        bits.u32((0, 0), (0, 3), (0, 4), (3, 1))  # dim_shift
        for _ in range(bits.u32((0, 0), (4, 0), (5, 16), (10, 48))):
            bits(8)  # NOTE: the channel's name
        if channel_type == _ALPHA:
            bits(1)  # alpha_associated
        elif channel_type == _SPOT_COLOUR:
            bits(16 * 4)
        elif channel_type == _CFA:
            bits.u32((0, 1), (2, 0), (4, 3), (8, 19))
    bits(1)  # xyb_encoded
    grey = False
    if not bits(1):  # the colour encoding is not all default (sRGB)
        bits(1)  # want_icc
        grey = bits.enum() == _GREY
    return grey, alpha, floating, bits_per_sample


def _bit_depth(bits: _Bits) -> tuple[bool, int]:
    if bits(1):  # floating_point_sample
        depth = bits.u32((0, 32), (0, 16), (0, 24), (6, 1))
        bits(4)  # exponent_bits_per_sample
        return True, depth
    return False, bits.u32((0, 8), (0, 10), (0, 12), (6, 1))


class _JxlImageFile(ImageFile.ImageFile):
    """pillow-jxl-plugin's image, opened from its headers and decoded in ``load`` (as Pillow's own formats).

    NOTE: the plugin's decoder and its pixels as given to Pillow (one frame; 16-bit and float only
    for grey; a reconstructed JPEG opened as one); the decoded size and mode must be the declared ones.
    """

    format = 'JXL'
    format_description = 'JPEG XL image'

    def _open(self) -> None:
        header = jxl_header(cast(Readable, self.fp))  # NOTE: Image.open gives _open its file, always
        self._size = (header.width, header.height)
        self._mode = header.mode
        if header.exif is not None:
            self.info['exif'] = header.exif
        self.is_animated = False
        self.n_frames = 1
        self.tile = []

    def load(self) -> Any:
        if self._im is None and self.fp is not None:
            from pillow_jxl import Decoder

            self.fp.seek(0)
            jpeg, info, pixels, icc_profile, _boxes = Decoder()(self.fp.read())
            mode, size = ('F' if info.mode == 'F;16' else info.mode), (info.width, info.height)
            if jpeg:
                with Image.open(io.BytesIO(pixels)) as reconstructed:
                    mode, size, pixels = reconstructed.mode, reconstructed.size, reconstructed.tobytes()
                    icc_profile = reconstructed.info.get('icc_profile', icc_profile)
            if (mode, size) != (self.mode, self.size):
                raise ValueError(f'decoded as {mode} {size}, not the {self.mode} {self.size} its header declares')
            if icc_profile:
                self.info['icc_profile'] = icc_profile
            self.im = Image.frombytes(mode, size, pixels).im
        return super().load()
