"""Image formats past Pillow's own: HEIC/HEIF (``pillow-heif``) and JPEG XL (``pillow-jxl-plugin``).

AVIF needs no plugin: Pillow reads and writes it itself (its wheels carry libavif
since 11.3). :func:`register` teaches Pillow the other two, once per process;
call it before the first ``Image.open`` of an upload (``images.py`` does, at import).
:func:`jxl_size` reads a JPEG XL's declared size, so that its pixel limit is checked before
pillow-jxl-plugin decodes it.

NOTE: what each costs (NOTES-similar.md has the numbers):
- A HEIC decodes in full (HEVC has no reduced-scale decode as JPEG's ``draft``),
  unless it carries a thumbnail (phones write one): then ``draft``/``thumbnail``
  decode that thumbnail instead, as pillow-heif's plugin does.
- A JPEG XL decodes in full when it is *opened*: pillow-jxl-plugin decodes the
  whole file in ``Image.open``, so even reading its size costs a full decode.
"""

from __future__ import annotations

import threading
from typing import Protocol

from PIL import Image

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
        import pillow_jxl  # noqa: F401  NOTE: importing it registers the JXL plugin with Pillow

        # NOTE: thumbnails kept (draft() decodes a phone's embedded thumbnail, not 12 MP);
        # depth and auxiliary images skipped: ISS never shows them, and each costs a decode.
        pillow_heif.register_heif_opener(thumbnails=True, depth_images=False, aux_images=False)
        _registered = True


def supported() -> dict[str, bool]:
    """Return whether Pillow opens each of HEIF, JXL and AVIF now (for the health page and tests)."""
    Image.init()  # NOTE: Pillow loads its own plugins (AVIF's among them) lazily
    return {name: name in Image.OPEN for name in NAMES}


# -- a JPEG XL's size, before pillow-jxl-plugin decodes it -------------------------------------------

_JXL_CODESTREAM = b'\xff\x0a'
_JXL_CONTAINER = b'\x00\x00\x00\x0cJXL \x0d\x0a\x87\x0a'
# NOTE: the aspect ratios a SizeHeader may name instead of a width (ISO/IEC 18181-1, SizeHeader).
_JXL_RATIOS = {1: (1, 1), 2: (12, 10), 3: (4, 3), 4: (3, 2), 5: (16, 9), 6: (5, 4), 7: (2, 1)}
# NOTE: the boxes read past to find the codestream; a file of more is no JPEG XL a camera writes.
_JXL_MAX_BOXES = 64


class Readable(Protocol):
    """A file read and sought (an upload's staged file, or ``images``' budgeted one over it)."""

    def read(self, size: int = -1) -> bytes: ...

    def seek(self, offset: int, whence: int = 0) -> int: ...


def is_jxl(head: bytes) -> bool:
    """Whether ``head`` (the first 12 bytes of a file, or more) starts a JPEG XL codestream or container."""
    return head.startswith(_JXL_CODESTREAM) or head.startswith(_JXL_CONTAINER)


def jxl_size(file: Readable) -> tuple[int, int]:
    """The width and height a JPEG XL file declares, read from its SizeHeader without decoding.

    APPSEC: pillow-jxl-plugin decodes the whole image inside ``Image.open``, before Pillow's
    pixel-limit check runs: a few hundred bytes declaring 100,000 x 100,000 pixels would be
    decoded first. ``images`` checks this size before it lets the plugin open the file.

    Raises:
        ValueError: the file is no JPEG XL, or its header is cut short.
    """
    file.seek(0)
    head = file.read(len(_JXL_CONTAINER))
    if head.startswith(_JXL_CODESTREAM):
        file.seek(2)
        return _size_header(file.read(16))
    if head != _JXL_CONTAINER:
        raise ValueError('not a JPEG XL file')
    for _ in range(_JXL_MAX_BOXES):
        header = file.read(8)
        if len(header) < 8:
            break
        size, box_type = int.from_bytes(header[:4], 'big'), header[4:]
        header_size = 8
        if size == 1:
            size, header_size = int.from_bytes(file.read(8), 'big'), 16
        if box_type in (b'jxlc', b'jxlp'):
            if box_type == b'jxlp':
                file.read(4)  # NOTE: a partial codestream's index comes first
            if file.read(2) != _JXL_CODESTREAM:
                raise ValueError('a JPEG XL codestream box without the codestream signature')
            return _size_header(file.read(16))
        if size == 0 or size < header_size:
            break  # NOTE: 0 is "to the end of the file", which holds no codestream then
        file.seek(size - header_size, 1)
    raise ValueError('a JPEG XL container without a codestream')


def _size_header(data: bytes) -> tuple[int, int]:
    """Decode a SizeHeader: its bits are read least significant first, byte after byte."""
    position = 0

    def bits(count: int) -> int:
        nonlocal position
        if position + count > len(data) * 8:
            raise ValueError('a JPEG XL header cut short')
        value = 0
        for i in range(count):
            value |= ((data[(position + i) >> 3] >> ((position + i) & 7)) & 1) << i
        position += count
        return value

    def dimension() -> int:
        return bits((9, 13, 18, 30)[bits(2)]) + 1

    small = bits(1)
    height = (bits(5) + 1) * 8 if small else dimension()
    ratio = bits(3)
    if ratio:
        numerator, denominator = _JXL_RATIOS[ratio]
        return height * numerator // denominator, height
    width = (bits(5) + 1) * 8 if small else dimension()
    return width, height
