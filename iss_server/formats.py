"""Image formats past Pillow's own: HEIC/HEIF (``pillow-heif``) and JPEG XL (``pillow-jxl-plugin``).

AVIF needs no plugin: Pillow reads and writes it itself (its wheels carry libavif
since 11.3). :func:`register` teaches Pillow the other two, once per process;
call it before the first ``Image.open`` of an upload (``images.py`` does, at import).
:func:`jxl_header` reads a JPEG XL's size, mode and EXIF without decoding it;
:func:`coded_images` reads the size each AV1 or HEVC image of an AVIF or a HEIC is coded at, without decoding it.

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
from collections.abc import Iterator
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
    bits_per_sample: int  # as coded: a 10-bit colour image decodes to RGB (8 bits a sample)


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
    return JxlHeader(width, height, mode, exif, bits_per_sample)


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


# -- the size each image of an AVIF or a HEIC is coded at, read without decoding -----------------------


@dataclasses.dataclass(frozen=True)
class CodedImage:
    """An AV1 or HEVC image of an AVIF or a HEIC (an item, a track's first frame): its declared and coded sizes."""

    where: str  # 'AV1 item 1', 'HEVC item 2', 'AV1 track 1'
    # NOTE: the item's ispe, or the track's tkhd: what Pillow (libavif, libheif) reports as the size.
    declared: tuple[int, int]
    # NOTE: what the decoder allocates: an AV1 sequence header's max_frame_width x max_frame_height (dav1d),
    # an HEVC sequence parameter set's pic_width_in_luma_samples x pic_height_in_luma_samples (libde265).
    coded: tuple[int, int]
    # NOTE: what the decoder gives: the coded size less an HEVC conformance window (x265 codes a 33 x 33
    # picture as 40 x 40, cropped by the window to its ispe); an AV1 frame is given whole.
    shown: tuple[int, int]


# NOTE: bounds of the parse (a hostile file costs at most these): a grid of 256 x 256 tiles is
# libavif's own limit; 4096 tiles of 512 x 512 are 1 GP, more than any camera writes.
_ISOBMFF_MAX_ITEMS = 4096
_ISOBMFF_MAX_BOXES = _ISOBMFF_MAX_ITEMS + 64  # in one box: an iinf has a box per item
_ISOBMFF_MAX_TOP_BOXES = 1024  # ftyp, meta, moov, mdat, free: walked by seeking, never read
_ISOBMFF_MAX_BOX_BYTES = 4 * 1024 * 1024  # a meta or moov box, read whole (4096 items take about 200 KB)
# NOTE: a sequence header is tens of bytes, the first OBU of an item (a temporal delimiter may come before),
# and the first frame header follows it (after metadata OBUs, HDR's among them: hundreds of bytes).
_AV1_HEADER_BYTES = 4096
_AV1_MAX_OBUS = 8
_OBU_SEQUENCE_HEADER, _OBU_FRAME_HEADER, _OBU_FRAME = 1, 3, 6
_HEVC_ITEM_TYPES = (b'hvc1', b'hev1')  # NOTE: hev1: parameter sets may be in the item's data too
# NOTE: the NAL units walked in one HEVC item's data (by their lengths: a slice's bytes are never read).
# An image is one picture: its parameter sets, SEI and slices (one a tile, for Apple's and x265's).
_HEVC_MAX_NAL_UNITS = 256
# NOTE: an SPS's sizes come within its first 200 bytes (profile_tier_level of 7 sub-layers is 98 bytes,
# each ue(v) at most 9; emulation-prevention bytes add at most one in three).
_HEVC_SPS_BYTES = 512
_NAL_SPS = 33
# NOTE: SubWidthC, SubHeightC of each chroma_format_idc (H.265 table 6-1): a conformance window's unit.
_CHROMA_UNITS = {0: (1, 1), 1: (2, 2), 2: (2, 1), 3: (1, 1)}


def coded_images(file: Readable) -> list[CodedImage]:
    """Every AV1 and HEVC image of an AVIF or a HEIC, with the size it declares and the size it is coded at.

    APPSEC: Pillow (libavif, libheif) takes the size from an ``ispe`` box (an AVIF track's from
    ``tkhd``), and ISS checks that against ISS_MAX_IMAGE_PIXELS; the decoder then decodes what the
    coded headers say. libavif scales an AV1 frame to the ``ispe`` after: 3.9 KB declaring
    100 x 100 decoded 16000 x 16000 (issue 27). libheif refuses an HEVC picture of another size
    (after decoding it, or before when it is far larger), so a HEIC lying so was stored with a size
    no decode gives. The caller refuses an image coded larger than it declares.
    Every ``av01``, ``hvc1`` and ``hev1`` item is read, not only those decoded (the primary, a grid's
    tiles, the alpha, a thumbnail): the others (a gain map, a depth map) are no larger in an honest
    file, and one rule is simpler than following ``iref``. Of an AV1 track (an image sequence) the
    first frame is read: the one ISS decodes (a later keyframe may carry another sequence header;
    ISS never decodes it).

    Raises:
        ValueError: the file is no ISOBMFF, its boxes are malformed or past its bounds, it has no AV1
            or HEVC image, or one has no readable sequence header (the decoder could not decode it either).
    """
    found: list[CodedImage] = []
    file_size = file.seek(0, 2)
    file.seek(0)
    position = 0
    for _ in range(_ISOBMFF_MAX_TOP_BOXES):
        header = file.read(16)
        if len(header) < 8:
            break
        size, kind, header_size = int.from_bytes(header[:4], 'big'), header[4:8], 8
        if size == 1:
            size, header_size = int.from_bytes(header[8:16], 'big'), 16
        if size == 0:  # NOTE: "to the end of the file": the last box
            size = file_size - position
        if size < header_size or position + size > file_size:
            raise ValueError(f'a {kind!r} box of {size} bytes, past the end of the file or short of its header')
        if kind in (b'meta', b'moov'):
            if size > _ISOBMFF_MAX_BOX_BYTES:
                raise ValueError(f'a {kind!r} box of {size} bytes; this service reads at most {_ISOBMFF_MAX_BOX_BYTES}')
            file.seek(position + header_size)
            content = file.read(size - header_size)
            if len(content) < size - header_size:
                raise ValueError(f'a {kind!r} box cut short')
            found += _item_images(content, file) if kind == b'meta' else _track_images(content, file)
        position += size
        file.seek(position)
    if not found:
        raise ValueError('no AV1 or HEVC image in it')
    return found


class _Cursor:
    """Big-endian integers read from a box's bytes, never past its end."""

    def __init__(self, data: bytes, start: int, end: int) -> None:
        self.data, self.position, self.end = data, start, end

    def uint(self, size: int) -> int:
        return int.from_bytes(self.bytes(size), 'big')

    def bytes(self, size: int) -> bytes:
        if self.position + size > self.end:
            raise ValueError('a box cut short')
        self.position += size
        return self.data[self.position - size : self.position]


def _boxes(data: bytes, start: int, end: int) -> Iterator[tuple[bytes, int, int]]:
    """The (type, content start, content end) of the boxes in ``data[start:end]``."""
    for _ in range(_ISOBMFF_MAX_BOXES):
        if start + 8 > end:
            return
        cursor = _Cursor(data, start, end)
        size, kind, header_size = cursor.uint(4), cursor.bytes(4), 8
        if size == 1:
            size, header_size = cursor.uint(8), 16
        elif size == 0:
            size = end - start
        if size < header_size or start + size > end:
            raise ValueError(f'a {kind!r} box past its parent')
        yield kind, start + header_size, start + size
        start += size
    raise ValueError(f'more than {_ISOBMFF_MAX_BOXES} boxes in one')


def _children(data: bytes, start: int, end: int) -> dict[bytes, tuple[int, int]]:
    """The first box of each type in ``data[start:end]``: (content start, content end)."""
    found: dict[bytes, tuple[int, int]] = {}
    for kind, content_start, content_end in _boxes(data, start, end):
        found.setdefault(kind, (content_start, content_end))
    return found


def _item_images(meta: bytes, file: Readable) -> list[CodedImage]:
    """The AV1 and HEVC items of a ``meta`` box (ISO/IEC 23008-12: iinf, iloc, iprp > ipco, ipma)."""
    boxes = _children(meta, 4, len(meta))  # NOTE: meta is a FullBox: version and flags first
    if not {b'iinf', b'iloc', b'iprp'} <= boxes.keys():
        return []
    items = _coded_items(meta, *boxes[b'iinf'])
    if len(items) > _ISOBMFF_MAX_ITEMS:
        raise ValueError(f'more than {_ISOBMFF_MAX_ITEMS} AV1 or HEVC items')
    locations = _locations(meta, *boxes[b'iloc'])
    properties = _item_properties(meta, *boxes[b'iprp'])
    found = []
    for item, item_type in items.items():
        codec = 'AV1' if item_type == b'av01' else 'HEVC'
        own = properties.get(item, {})
        if b'ispe' not in own or item not in locations:
            raise ValueError(f'{codec} item {item} without its size (ispe) or its location (iloc)')
        ispe = _Cursor(meta, *own[b'ispe'])
        ispe.uint(4)  # version, flags
        declared = (ispe.uint(4), ispe.uint(4))
        data = _ItemData(file, meta, boxes.get(b'idat'), *locations[item])
        if codec == 'AV1':
            coded = shown = _av1_coded_size(data.read(0, _AV1_HEADER_BYTES))
        else:
            coded, shown = _hevc_coded_size(meta, own.get(b'hvcC'), data)
        found.append(CodedImage(f'{codec} item {item}', declared, coded, shown))
    return found


def _coded_items(meta: bytes, start: int, end: int) -> dict[int, bytes]:
    """The id and type of each ``av01``, ``hvc1`` and ``hev1`` item of an ``iinf`` (its ``infe`` of version 2, 3)."""
    items = {}
    for kind, content_start, content_end in _boxes(meta, start + (6 if meta[start] == 0 else 8), end):
        cursor = _Cursor(meta, content_start, content_end)
        version = cursor.uint(4) >> 24
        if kind != b'infe' or version < 2:
            continue
        item = cursor.uint(2 if version == 2 else 4)
        cursor.uint(2)  # item_protection_index
        item_type = cursor.bytes(4)
        if item_type == b'av01' or item_type in _HEVC_ITEM_TYPES:
            items[item] = item_type
    return items


def _locations(meta: bytes, start: int, end: int) -> dict[int, tuple[int, list[tuple[int, int]]]]:
    """Each item's construction method and (offset, length) extents, from an ``iloc``, its base offset added."""
    cursor = _Cursor(meta, start, end)
    version = cursor.uint(4) >> 24
    sizes = cursor.uint(2)
    offset_size, length_size, base_size = sizes >> 12, (sizes >> 8) & 15, (sizes >> 4) & 15
    index_size = sizes & 15 if version in (1, 2) else 0
    locations = {}
    extents_left = _ISOBMFF_MAX_BOXES  # NOTE: an extent of 0-byte offset and length takes no room: counted instead
    for _ in range(min(cursor.uint(2 if version < 2 else 4), _ISOBMFF_MAX_BOXES)):
        item = cursor.uint(2 if version < 2 else 4)
        method = cursor.uint(2) & 15 if version in (1, 2) else 0
        cursor.uint(2)  # data_reference_index
        base = cursor.uint(base_size)
        extents = []
        count = cursor.uint(2)
        extents_left -= count
        if extents_left < 0:
            raise ValueError(f'more than {_ISOBMFF_MAX_BOXES} extents in an iloc')
        for _ in range(count):
            cursor.uint(index_size)
            extents.append((base + cursor.uint(offset_size), cursor.uint(length_size)))  # NOTE: length 0: to the end
        locations[item] = (method, extents)
    return locations


def _item_properties(meta: bytes, start: int, end: int) -> dict[int, dict[bytes, tuple[int, int]]]:
    """Each item's properties, the first of each type (``iprp``: in ``ipco``, an item's listed in ``ipma``)."""
    boxes = _children(meta, start, end)
    if b'ipco' not in boxes or b'ipma' not in boxes:
        return {}
    properties = list(_boxes(meta, *boxes[b'ipco']))
    cursor = _Cursor(meta, *boxes[b'ipma'])
    version_and_flags = cursor.uint(4)
    version, wide = version_and_flags >> 24, version_and_flags & 1
    found: dict[int, dict[bytes, tuple[int, int]]] = {}
    for _ in range(min(cursor.uint(4), _ISOBMFF_MAX_BOXES)):
        own = found.setdefault(cursor.uint(2 if version < 1 else 4), {})
        for _ in range(cursor.uint(1)):
            index = cursor.uint(2) & 0x7FFF if wide else cursor.uint(1) & 0x7F
            if 0 < index <= len(properties):
                kind, content_start, content_end = properties[index - 1]
                own.setdefault(kind, (content_start, content_end))
    return found


class _ItemData:
    """An item's bytes over its extents, in the file or in the ``meta``'s ``idat``, read a piece at a time."""

    def __init__(
        self, file: Readable, meta: bytes, idat: tuple[int, int] | None, method: int, extents: list[tuple[int, int]]
    ) -> None:
        if method == 0:  # NOTE: offsets in the file
            start, end = 0, file.seek(0, 2)
        elif method == 1 and idat is not None:  # NOTE: offsets in the idat box
            start, end = idat
        else:
            raise ValueError(f'an item located by construction method {method}, which libavif and libheif never read')
        self._file, self._meta, self._in_file = file, meta, method == 0
        self._extents = []
        for offset, length in extents:
            if start + offset >= end:  # NOTE: an offset of 64 bits would overflow seek
                raise ValueError('item data past the end of its file or idat')
            # NOTE: cut where the file ends (the decoder could read no further either)
            self._extents.append((start + offset, min(length or end, end - start - offset)))
        self.size = sum(length for _, length in self._extents)

    def read(self, offset: int, size: int) -> bytes:
        """Up to ``size`` bytes from ``offset`` of the item's data; fewer where it ends."""
        data = b''
        for start, length in self._extents:
            if offset >= length:
                offset -= length
                continue
            count = min(length - offset, size - len(data))
            if self._in_file:
                self._file.seek(start + offset)
                data += self._file.read(count)
            else:
                data += self._meta[start + offset : start + offset + count]
            offset = 0
            if len(data) >= size:
                break
        return data


def _track_images(moov: bytes, file: Readable) -> list[CodedImage]:
    """The first frame of each ``av01`` track of a ``moov`` (an image sequence), with its ``tkhd`` size."""
    found = []
    tracks = 0
    for kind, start, end in _boxes(moov, 0, len(moov)):
        if kind != b'trak':
            continue
        tracks += 1
        trak = _children(moov, start, end)
        stbl = _path(moov, trak.get(b'mdia'), b'minf', b'stbl')
        if b'tkhd' not in trak or stbl is None:
            continue
        tkhd_end = trak[b'tkhd'][1]
        declared = _Cursor(moov, tkhd_end - 8, tkhd_end)
        width, height = declared.uint(4) >> 16, declared.uint(4) >> 16  # NOTE: 16.16 fixed point, its last fields
        tables = _children(moov, *stbl)
        stsd = tables.get(b'stsd', (0, 0))
        entries = list(_boxes(moov, stsd[0] + 8, stsd[1])) if stsd[1] else []
        if not entries or entries[0][0] != b'av01':
            continue
        if b'stsz' not in tables or not ({b'stco', b'co64'} & tables.keys()):
            raise ValueError(f'AV1 track {tracks} without its sample sizes or chunk offsets')
        chunks = _Cursor(moov, *tables.get(b'stco', tables.get(b'co64', (0, 0))))
        chunks.uint(8)  # version, flags, entry_count
        offset = chunks.uint(4 if b'stco' in tables else 8)  # NOTE: the first sample starts its first chunk
        samples = _Cursor(moov, *tables[b'stsz'])
        samples.uint(4)
        sample_size = samples.uint(4)
        samples.uint(4)  # sample_count
        sample = _ItemData(file, moov, None, 0, [(offset, sample_size or samples.uint(4))])
        coded = _av1_coded_size(sample.read(0, _AV1_HEADER_BYTES))
        found.append(CodedImage(f'AV1 track {tracks}', (width, height), coded, coded))
    return found


def _path(data: bytes, box: tuple[int, int] | None, *kinds: bytes) -> tuple[int, int] | None:
    """The content of the box found down ``kinds`` from ``box``, or None."""
    for kind in kinds:
        if box is None:
            return None
        box = _children(data, *box).get(kind)
    return box


# -- an HEVC image's coded size (H.265 7.3.1 NAL units, 7.3.2.2 SPS; ISO/IEC 14496-15 8.3.3 hvcC) ----------


def _hevc_coded_size(
    meta: bytes, hvcc: tuple[int, int] | None, data: _ItemData
) -> tuple[tuple[int, int], tuple[int, int]]:
    """The largest coded and shown sizes of an HEVC item's sequence parameter sets.

    NOTE: libheif gives libde265 the NAL units of the item's ``hvcC``, then those of its data: the SPSs
    of both are read (an ``hev1`` item may carry its own in its data), and the largest counts.
    """
    if hvcc is None:
        raise ValueError('an HEVC item without its hvcC')
    config = _Cursor(meta, *hvcc)
    config.bytes(21)  # NOTE: the general profile, chroma format and bit depths: the SPS's own say
    length_size = (config.uint(1) & 3) + 1  # lengthSizeMinusOne: the size of a NAL unit's length in the data
    sizes = []
    for _ in range(config.uint(1)):  # numOfArrays
        config.uint(1)  # array_completeness, NAL_unit_type: each NAL unit's own header says
        for _ in range(config.uint(2)):  # numNalus
            nal_unit = config.bytes(config.uint(2))
            if _is_sps(nal_unit):
                sizes.append(_sps_size(nal_unit))
    offset = 0
    for _ in range(_HEVC_MAX_NAL_UNITS):
        if offset >= data.size:
            break
        head = data.read(offset, length_size + 2)
        if len(head) < length_size + 2:
            raise ValueError('an HEVC NAL unit cut short')
        length = int.from_bytes(head[:length_size], 'big')
        if _is_sps(head[length_size:]):
            sizes.append(_sps_size(data.read(offset + length_size, min(length, _HEVC_SPS_BYTES))))
        offset += length_size + length
    if offset < data.size:
        raise ValueError(f'more than {_HEVC_MAX_NAL_UNITS} NAL units in an HEVC image')
    if not sizes:
        raise ValueError('no HEVC sequence parameter set for an HEVC image')
    coded = (max(coded[0] for coded, _ in sizes), max(coded[1] for coded, _ in sizes))
    return coded, (max(shown[0] for _, shown in sizes), max(shown[1] for _, shown in sizes))


def _is_sps(nal_unit: bytes) -> bool:
    """Whether a NAL unit is an SPS libde265 reads: nal_unit_type 33, nuh_layer_id 0 (it drops other layers)."""
    return len(nal_unit) >= 2 and (nal_unit[0] >> 1) & 0x3F == _NAL_SPS and not (nal_unit[0] & 1 or nal_unit[1] >> 3)


def _sps_size(nal_unit: bytes) -> tuple[tuple[int, int], tuple[int, int]]:
    """An SPS's pic_width x pic_height_in_luma_samples, and that less its conformance window (H.265 7.3.2.2.1)."""
    # NOTE: an encoder puts 0x03 after two zero bytes so that no start code appears inside: taken out first.
    bits = _MsbBits(nal_unit[2:].replace(b'\x00\x00\x03', b'\x00\x00'))
    bits(4)  # sps_video_parameter_set_id
    sub_layers = bits(3)  # sps_max_sub_layers_minus1
    bits(1)  # sps_temporal_id_nesting_flag
    # NOTE: profile_tier_level(1, sps_max_sub_layers_minus1) (7.3.3): the general profile (88 bits) and level,
    # then which sub-layers have their own, 2-bit fillers up to 8 of them, and each one's profile and level.
    bits(88 + 8)
    present = [(bits(1), bits(1)) for _ in range(sub_layers)]  # sub_layer_profile_present_flag, _level_
    if sub_layers:
        bits(2 * (8 - sub_layers))  # reserved_zero_2bits
    for profile, level in present:
        bits(88 * profile + 8 * level)
    bits.uvlc()  # sps_seq_parameter_set_id
    chroma_format = bits.uvlc()
    if chroma_format not in _CHROMA_UNITS:
        raise ValueError(f'an HEVC chroma_format_idc of {chroma_format}')
    unit_width, unit_height = _CHROMA_UNITS[chroma_format]
    if chroma_format == 3 and bits(1):  # separate_colour_plane_flag: each plane coded as monochrome
        unit_width, unit_height = 1, 1
    width, height = bits.uvlc(), bits.uvlc()
    # NOTE: a conforming size is a whole number of minimum coding blocks, of 8 x 8 at least (7.4.3.2.1): one that
    # is not (0 x 129) is no HEVC to decode, and no size to refuse as too large
    if not (width and height) or width % 8 or height % 8:
        raise ValueError(f'an HEVC sequence parameter set coding {width}x{height}, not a multiple of 8 x 8')
    left = right = top = bottom = 0
    if bits(1):  # conformance_window_flag
        left, right, top, bottom = bits.uvlc(), bits.uvlc(), bits.uvlc(), bits.uvlc()
    shown = (width - unit_width * (left + right), height - unit_height * (top + bottom))
    if min(shown) <= 0:
        raise ValueError(f'an HEVC conformance window that leaves nothing of {width}x{height}')
    return (width, height), shown


# -- an AV1 image's coded size (AV1 5.3 OBUs, 5.5 sequence header, 5.9.2 frame header) ---------------------


def _av1_coded_size(data: bytes) -> tuple[int, int]:
    """The largest frame an AV1 image's data may decode first (AV1 5.3 OBUs, 5.5 sequence header, 5.9.2 frame header).

    NOTE: a frame is its sequence header's max_frame_width x max_frame_height, unless its frame header
    sets frame_size_override_flag: then its size is coded in frame_width_bits, and dav1d does not hold
    it to the maximum. A reduced still picture header (AVIF stills) forbids the override; otherwise the
    first frame header is read up to that flag, and a first frame that overrides its size (or is no
    shown key frame) counts as the largest size those bits code, as dav1d would decode it.
    """
    sequence: _Av1Sequence | None = None
    for kind, obu in _obus(data):
        if kind == _OBU_SEQUENCE_HEADER and sequence is None:
            sequence = _sequence_header(_MsbBits(obu))
            if sequence.reduced:
                return sequence.max_size
        elif kind in (_OBU_FRAME_HEADER, _OBU_FRAME) and sequence is not None:
            return sequence.max_size if _keeps_max_size(_MsbBits(obu), sequence) else sequence.codable_size
    raise ValueError('no AV1 sequence header and frame header where the image starts')


def _obus(data: bytes) -> Iterator[tuple[int, bytes]]:
    """The (type, payload) of the first OBUs in ``data``; the last one maybe cut short where ``data`` ends."""
    position = 0
    for _ in range(_AV1_MAX_OBUS):
        if position >= len(data):
            return
        header = data[position]
        if header & 0x80:
            raise ValueError('an AV1 OBU with its forbidden bit set')
        kind, extension, has_size = (header >> 3) & 15, header & 4, header & 2
        position += 2 if extension else 1
        size = len(data) - position  # NOTE: an OBU without a size field runs to the end of the item
        if has_size:
            size = 0
            for byte in range(8):  # leb128
                if position >= len(data):
                    raise ValueError('an AV1 OBU size cut short')
                size |= (data[position] & 0x7F) << (7 * byte)
                position += 1
                if not data[position - 1] & 0x80:
                    break
        yield kind, data[position : position + size]
        position += size


class _MsbBits:
    """An AV1 or HEVC bit reader: most significant bit first."""

    def __init__(self, data: bytes) -> None:
        self._value, self._size, self._position = int.from_bytes(data, 'big'), len(data) * 8, 0

    def __call__(self, count: int) -> int:
        if self._position + count > self._size:
            raise ValueError('an AV1 or HEVC header cut short')
        self._position += count
        return (self._value >> (self._size - self._position)) & ((1 << count) - 1)

    def uvlc(self) -> int:
        """An AV1 uvlc(), which is HEVC's ue(v) (H.265 9.2): a count of zeros, a one, then as many bits."""
        zeros = 0
        while not self(1):
            zeros += 1
            if zeros >= 32:
                raise ValueError('an AV1 uvlc or HEVC ue(v) of more than 32 bits')
        return self(zeros) + (1 << zeros) - 1


@dataclasses.dataclass(frozen=True)
class _Av1Sequence:
    """What of a sequence header the frame sizes, and the first frame header up to its size, need."""

    reduced: bool  # reduced_still_picture_header
    max_size: tuple[int, int]  # max_frame_width, max_frame_height
    codable_size: tuple[int, int]  # 2 ** frame_width_bits, 2 ** frame_height_bits: what a frame header can code
    presentation_time_bits: int  # 0: no frame_presentation_time in a shown frame's header
    frame_id_bits: int  # 0: no current_frame_id
    screen_content_tools: int  # seq_force_screen_content_tools; 2: each frame says
    integer_mv: int  # seq_force_integer_mv; 2: each frame says


_SELECT = 2  # SELECT_SCREEN_CONTENT_TOOLS, SELECT_INTEGER_MV


def _sequence_header(bits: _MsbBits) -> _Av1Sequence:
    """Read a sequence_header_obu up to order_hint_bits_minus_1 (AV1 5.5.1 to 5.5.5).

    NOTE: a header that breaks the conformance rules these fields have is no AV1 (dav1d refuses it): bytes of
    0xFF read as a reduced header of 65536 x 65536, which is no image's size to refuse as too large.
    """
    profile, still_picture, reduced = bits(3), bits(1), bits(1)
    if profile > 2:
        raise ValueError(f'an AV1 sequence header of the reserved profile {profile}')
    if reduced and not still_picture:
        raise ValueError('an AV1 reduced still picture header that is not of a still picture')
    presentation_time_bits = 0
    if reduced:
        bits(5)  # seq_level_idx[0]
    else:
        decoder_model_info, buffer_delay_length, equal_picture_interval = 0, 0, 0
        if bits(1):  # timing_info_present_flag
            bits(32)  # num_units_in_display_tick
            bits(32)  # time_scale
            equal_picture_interval = bits(1)
            if equal_picture_interval:
                bits.uvlc()  # num_ticks_per_picture_minus_1
            decoder_model_info = bits(1)
            if decoder_model_info:
                buffer_delay_length = bits(5) + 1
                bits(32)  # num_units_in_decoding_tick
                bits(5)  # buffer_removal_time_length_minus_1
                presentation_time_length = bits(5) + 1  # NOTE: read always, used when pictures are not equally spaced
                presentation_time_bits = 0 if equal_picture_interval else presentation_time_length
        initial_display_delay = bits(1)
        for _ in range(bits(5) + 1):  # operating_points_cnt_minus_1
            bits(12)  # operating_point_idc
            if bits(5) > 7:  # seq_level_idx
                bits(1)  # seq_tier
            if decoder_model_info and bits(1):  # decoder_model_present_for_this_op
                bits(2 * buffer_delay_length + 1)  # decoder and encoder buffer delays, low_delay_mode_flag
            if initial_display_delay and bits(1):  # initial_display_delay_present_for_this_op
                bits(4)
    width_bits, height_bits = bits(4) + 1, bits(4) + 1
    max_size = (bits(width_bits) + 1, bits(height_bits) + 1)
    codable_size = (1 << width_bits, 1 << height_bits)
    if reduced:
        return _Av1Sequence(True, max_size, codable_size, 0, 0, 0, 0)
    frame_id_bits = bits(4) + bits(3) + 3 if bits(1) else 0  # frame_id_numbers_present_flag: idLen
    bits(3)  # use_128x128_superblock, enable_filter_intra, enable_intra_edge_filter
    bits(4)  # enable_interintra_compound, enable_masked_compound, enable_warped_motion, enable_dual_filter
    order_hint = bits(1)
    if order_hint:
        bits(2)  # enable_jnt_comp, enable_ref_frame_mvs
    screen_content_tools = _SELECT if bits(1) else bits(1)
    integer_mv = _SELECT
    if screen_content_tools:
        integer_mv = _SELECT if bits(1) else bits(1)
    return _Av1Sequence(
        False, max_size, codable_size, presentation_time_bits, frame_id_bits, screen_content_tools, integer_mv
    )


def _keeps_max_size(bits: _MsbBits, sequence: _Av1Sequence) -> bool:
    """Whether a first frame header is of a shown key frame without frame_size_override_flag (AV1 5.9.2)."""
    if bits(1):  # show_existing_frame
        return False
    frame_type, show_frame = bits(2), bits(1)
    if frame_type != 0 or not show_frame:  # NOTE: KEY_FRAME; a shown one has error_resilient_mode unread
        return False
    bits(sequence.presentation_time_bits)  # temporal_point_info
    bits(1)  # disable_cdf_update
    screen_content_tools = bits(1) if sequence.screen_content_tools == _SELECT else sequence.screen_content_tools
    if screen_content_tools and sequence.integer_mv == _SELECT:
        bits(1)  # force_integer_mv
    bits(sequence.frame_id_bits)  # current_frame_id
    return not bits(1)  # frame_size_override_flag


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
        self.info['bit_depth'] = header.bits_per_sample  # NOTE: as pillow-heif says a HEIC's
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
