"""Image placeholders: ThumbHash and BlurHash, a few dozen bytes a page shows while the image loads.

Both are computed from a small decode (:func:`small`, at most 100 px a side; a
JPEG is decoded at 1/2 to 1/8 scale by ``Image.draft``), so they cost about as
much for a 12 MP photo as for a thumbnail.

- :func:`thumbhash` follows Evan Wallace's reference (``thumbhash.js``
  ``rgbaToThumbHash``): ~25 bytes (returned as base64), keeps the aspect ratio and
  alpha. :func:`thumbhash_to_image` is its decoder (``thumbHashToRGBA``).
- :func:`blurhash` follows Wolt's reference (the C and TypeScript encoders): a
  base-83 string of 4x3 components (3x4 for a portrait). :func:`blurhash_to_image`
  is its decoder.

NOTE: our own code, not PyPI's: ``thumbhash`` 0.1.2 has no decoder, rounds
halves the Python way (the reference rounds them up, so its bytes differ) and
mis-parses its alpha branch; ``blurhash-python`` (Wolt's binding) closes the
image it is given, reads it through ``getdata`` and pulls in cffi and six;
``blurhash`` (a pure port) is correct but computes a cosine per pixel per
component. Both of ours are checked against those ports in test_placeholders.py.
"""

from __future__ import annotations

import base64
import functools
import math
from itertools import repeat
from operator import add, mul, sub, truediv

from PIL import Image

#: The largest side :func:`small` decodes to, and the largest :func:`thumbhash` takes (the reference's limit).
SIDE = 100
#: ThumbHash and BlurHash read at most this many pixels a side: a larger image is first reduced to it,
#: one reduction for both in ``images.fingerprints``. NOTE: ThumbHash's reference takes up to 100, but
#: its at most 7 cosines a side are sampled well by 32 pixels, and pure Python pays for each pixel
#: (100x75: ~25 ms; 32x24: ~2 ms, before the PERF work of NOTES-fingerprints.md); the decoded
#: placeholders differ by < 5 levels of 255 on average, where either is 15 to 40 off the source.
#: BlurHash's 4x3 cosines see nothing finer either.
PLACEHOLDER_SIDE = 32


def small(image: Image.Image, side: int = SIDE) -> Image.Image:
    """Return ``image`` reduced to fit ``side`` x ``side`` pixels, as a new RGBA image (see :func:`reduced`)."""
    return reduced(image, side).convert('RGBA')


def reduced(image: Image.Image, side: int = SIDE) -> Image.Image:
    """Return ``image`` reduced to fit ``side`` x ``side`` pixels: a new RGB image, RGBA if a pixel is not opaque.

    PERF: on an image not yet loaded, ``draft`` first has the decoder scale it down: a JPEG
    decodes at 1/2 to 1/8 scale, a HEIC with an embedded thumbnail decodes that thumbnail; the
    full-size pixels are never decoded. Such an image is then smaller for its other uses too:
    give this function an image opened for it. Other formats decode in full.
    PERF: an opaque image stays RGB, the same pixels as RGBA's without their alpha of 255: Pillow
    resizes RGBA premultiplied (two conversions more: 100x80 to 32x26, 107 -> 41 us), the perceptual
    hash composites RGBA on white (64 us), and the placeholders read three planes, not four.
    """
    image.draft(None, (side * 2, side * 2))  # NOTE: twice the side, as Image.thumbnail's reducing_gap
    thumbnail = eight_bit(image.copy())
    thumbnail.thumbnail((side, side), Image.Resampling.BOX)
    if thumbnail.mode == 'RGB' and 'transparency' not in thumbnail.info:
        return thumbnail
    rgba = thumbnail.convert('RGBA')
    if rgba.getchannel('A').getextrema() == (255, 255):
        return rgba.convert('RGB')
    return rgba


def on_white(image: Image.Image) -> Image.Image:
    """Return ``image`` as RGB, its transparent pixels composited on white."""
    if image.mode not in ('RGB', 'L'):
        image = image.convert('RGBA' if 'A' in image.getbands() or 'transparency' in image.info else 'RGB')
        if image.mode == 'RGBA':
            image = Image.alpha_composite(Image.new('RGBA', image.size, (255, 255, 255, 255)), image)
    return image.convert('RGB')


def eight_bit(image: Image.Image) -> Image.Image:
    """Return ``image`` with 16-bit grey levels scaled to 8 bits; any other image as it is.

    NOTE: Pillow's ``convert`` clips 16-bit levels at 255 (a 16-bit PNG would look white).
    """
    if image.mode == 'I' or image.mode.startswith('I;16'):
        return image.convert('I').point(lambda level: level / 256).convert('L')
    return image


def _js_round(value: float) -> int:
    """Round halves up, as JavaScript's ``Math.round`` (the references are in JavaScript)."""
    return math.floor(value + 0.5)


# -- ThumbHash ---------------------------------------------------------------------------------------


def thumbhash(image: Image.Image) -> str:
    """Return the ThumbHash of ``image`` (reduced to :data:`PLACEHOLDER_SIDE` if larger), base64-encoded."""
    if image.width > PLACEHOLDER_SIDE or image.height > PLACEHOLDER_SIDE or image.mode not in ('RGB', 'RGBA'):
        image = reduced(image, PLACEHOLDER_SIDE)
    return base64.b64encode(_thumbhash_bytes(image.width, image.height, image.mode, image.tobytes())).decode()


# PERF: the reference's per-pixel arithmetic on 8-bit levels, as tables: the same floats, looked up.
_ALPHA = [level / 255 for level in range(256)]  # a level's alpha: 0 to 1
_WEIGHT = [alpha / 255 for alpha in _ALPHA]  # what a colour level of that alpha adds: alpha / 255 * level
_BEHIND = [1 - alpha for alpha in _ALPHA]  # how much of the average colour shows through it
_OPAQUE = [_WEIGHT[255] * level for level in range(256)]  # a colour level at alpha 1


def _thumbhash_bytes(w: int, h: int, mode: str, pixels: bytes) -> bytes:
    """The ThumbHash of ``pixels`` (``RGB``: opaque; or ``RGBA``), as the reference computes it.

    PERF: by planes, not by pixels: each step of the reference's per-pixel loops runs over a whole
    channel at once (``map`` over byte slices and tables), the same operations on the same floats
    in the same order, so the same hash; a 32x32 image 2.0 -> 0.76 ms CPU.
    """
    count = w * h
    bands = len(mode)
    levels = [pixels[band::bands] for band in range(3)]
    if mode == 'RGBA':
        alpha_levels = pixels[3::4]
        alphas = list(map(_ALPHA.__getitem__, alpha_levels))
        weights = list(map(_WEIGHT.__getitem__, alpha_levels))
        # alpha / 255 * level, each channel: its sum makes the average, and it is the pixel's own part
        own = [list(map(mul, weights, channel)) for channel in levels]
        avg_a = sum(alphas)
    else:
        # NOTE: alpha 1 everywhere: the reference's average colour times (1 - 1) is 0, and 0 + x is x.
        own = [list(map(_OPAQUE.__getitem__, channel)) for channel in levels]
        alphas = []
        avg_a = float(count)
    avg_r, avg_g, avg_b = (sum(channel) for channel in own)
    if avg_a:
        avg_r, avg_g, avg_b = avg_r / avg_a, avg_g / avg_a, avg_b / avg_a
    has_alpha = avg_a < count
    l_limit = 5 if has_alpha else 7  # NOTE: fewer luminance terms when alpha needs the room
    lx = max(1, _js_round(l_limit * w / max(w, h)))
    ly = max(1, _js_round(l_limit * h / max(w, h)))
    # RGBA to LPQA (luminance, yellow-blue, red-green, alpha), composited atop the average colour.
    if has_alpha:
        behind = list(map(_BEHIND.__getitem__, alpha_levels))
        r, g, b = (
            list(map(add, map(mul, repeat(average), behind), channel))
            for average, channel in zip((avg_r, avg_g, avg_b), own, strict=True)
        )
    else:
        r, g, b = own
    r_plus_g = list(map(add, r, g))
    lum = list(map(truediv, map(add, r_plus_g, b), repeat(3)))
    yb = list(map(sub, map(truediv, r_plus_g, repeat(2)), b))
    rg = list(map(sub, r, g))

    def encode_channel(channel: list[float], nx: int, ny: int) -> tuple[float, list[float], float]:
        # PERF: separable: each row is projected on each horizontal cosine once, then the
        # projections are summed down the columns (a 100x75 image: 60 -> 10 ms).
        rows = [channel[y * w : (y + 1) * w] for y in range(h)]
        # NOTE: the first cosine is 1 everywhere: a row's sum is its projection, exactly.
        along = [[sum(row) for row in rows]]
        along += [[sum(map(mul, row, fx)) for row in rows] for fx in _thumbhash_cosines(w, nx)[1:]]
        dc, ac, scale = 0.0, [], 0.0
        for cy, fy in enumerate(_thumbhash_cosines(h, ny)):
            cx = 0
            while cx * ny < nx * (ny - cy):
                f = sum(map(mul, along[cx], fy)) / count
                if cx or cy:
                    ac.append(f)
                    scale = max(scale, abs(f))
                else:
                    dc = f
                cx += 1
        if scale:
            ac = [0.5 + 0.5 / scale * f for f in ac]
        return dc, ac, scale

    l_dc, l_ac, l_scale = encode_channel(lum, max(3, lx), max(3, ly))
    p_dc, p_ac, p_scale = encode_channel(yb, 3, 3)
    q_dc, q_ac, q_scale = encode_channel(rg, 3, 3)
    landscape = w > h
    header24 = (
        _js_round(63 * l_dc)
        | (_js_round(31.5 + 31.5 * p_dc) << 6)
        | (_js_round(31.5 + 31.5 * q_dc) << 12)
        | (_js_round(31 * l_scale) << 18)
        | (has_alpha << 23)
    )
    header16 = (
        (ly if landscape else lx) | (_js_round(63 * p_scale) << 3) | (_js_round(63 * q_scale) << 9) | (landscape << 15)
    )
    out = bytearray([header24 & 255, (header24 >> 8) & 255, header24 >> 16, header16 & 255, header16 >> 8])
    channels = [l_ac, p_ac, q_ac]
    if has_alpha:
        a_dc, a_ac, a_scale = encode_channel(alphas, 5, 5)
        out.append(_js_round(15 * a_dc) | (_js_round(15 * a_scale) << 4))
        channels.append(a_ac)
    start = len(out)
    index = 0
    for ac in channels:
        for f in ac:
            if index % 2 == 0:
                out.append(0)
            out[start + index // 2] |= _js_round(15 * f) << ((index & 1) << 2)
            index += 1
    return bytes(out)


def thumbhash_to_image(value: str) -> Image.Image:
    """Return the small RGBA image (32 px on its longer side) a ThumbHash stands for."""
    hash_ = base64.b64decode(value)
    header24 = hash_[0] | (hash_[1] << 8) | (hash_[2] << 16)
    header16 = hash_[3] | (hash_[4] << 8)
    l_dc = (header24 & 63) / 63
    p_dc = ((header24 >> 6) & 63) / 31.5 - 1
    q_dc = ((header24 >> 12) & 63) / 31.5 - 1
    l_scale = ((header24 >> 18) & 31) / 31
    has_alpha = header24 >> 23
    p_scale = ((header16 >> 3) & 63) / 63
    q_scale = ((header16 >> 9) & 63) / 63
    landscape = header16 >> 15
    lx = max(3, (5 if has_alpha else 7) if landscape else header16 & 7)
    ly = max(3, header16 & 7 if landscape else (5 if has_alpha else 7))
    a_dc = (hash_[5] & 15) / 15 if has_alpha else 1.0
    a_scale = (hash_[5] >> 4) / 15
    start = 6 if has_alpha else 5
    index = 0

    def decode_channel(nx: int, ny: int, scale: float) -> list[float]:
        nonlocal index
        ac = []
        for cy in range(ny):
            cx = 0 if cy else 1
            while cx * ny < nx * (ny - cy):
                nibble = (hash_[start + (index >> 1)] >> ((index & 1) << 2)) & 15
                ac.append((nibble / 7.5 - 1) * scale)
                index += 1
                cx += 1
        return ac

    l_ac = decode_channel(lx, ly, l_scale)
    p_ac = decode_channel(3, 3, p_scale * 1.25)  # NOTE: the reference boosts saturation against quantization
    q_ac = decode_channel(3, 3, q_scale * 1.25)
    a_ac = decode_channel(5, 5, a_scale) if has_alpha else []
    ratio = _thumbhash_ratio(hash_)
    w = _js_round(32 if ratio > 1 else 32 * ratio)
    h = _js_round(32 / ratio if ratio > 1 else 32)
    out = bytearray()
    n_x, n_y = max(lx, 5 if has_alpha else 3), max(ly, 5 if has_alpha else 3)
    for y in range(h):
        fy = [math.cos(math.pi / h * (y + 0.5) * cy) for cy in range(n_y)]
        for x in range(w):
            fx = [math.cos(math.pi / w * (x + 0.5) * cx) for cx in range(n_x)]
            lum, p, q, a = l_dc, p_dc, q_dc, a_dc
            j = 0
            for cy in range(ly):
                cx = 0 if cy else 1
                while cx * ly < lx * (ly - cy):
                    lum += l_ac[j] * fx[cx] * fy[cy] * 2
                    cx, j = cx + 1, j + 1
            j = 0
            for cy in range(3):
                for cx in range(0 if cy else 1, 3 - cy):
                    f = fx[cx] * fy[cy] * 2
                    p += p_ac[j] * f
                    q += q_ac[j] * f
                    j += 1
            if has_alpha:
                j = 0
                for cy in range(5):
                    for cx in range(0 if cy else 1, 5 - cy):
                        a += a_ac[j] * fx[cx] * fy[cy] * 2
                        j += 1
            b = lum - 2 / 3 * p
            r = (3 * lum - b + q) / 2
            g = r - q
            out += bytes(int(max(0, 255 * min(1, v))) for v in (r, g, b, a))
    return Image.frombytes('RGBA', (w, h), bytes(out))


@functools.cache
def _thumbhash_cosines(size: int, count: int) -> list[list[float]]:
    """The first ``count`` cosines the reference projects ``size`` pixels on (once a size: sizes are <= 32)."""
    return [[math.cos(math.pi / size * c * (x + 0.5)) for x in range(size)] for c in range(count)]


def _thumbhash_ratio(hash_: bytes) -> float:
    has_alpha, landscape, header = hash_[2] & 0x80, hash_[4] & 0x80, hash_[3]
    lx = (5 if has_alpha else 7) if landscape else header & 7
    ly = header & 7 if landscape else (5 if has_alpha else 7)
    return lx / ly


# -- BlurHash ----------------------------------------------------------------------------------------

_BASE83 = '0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz#$%*+,-.:;=?@[]^_{|}~'


def _encode83(value: int, length: int) -> str:
    return ''.join(_BASE83[(value // 83 ** (length - 1 - i)) % 83] for i in range(length))


def _decode83(text: str) -> int:
    value = 0
    for char in text:
        value = value * 83 + _BASE83.index(char)
    return value


def _to_linear(value: int) -> float:
    v = value / 255
    return v / 12.92 if v <= 0.04045 else ((v + 0.055) / 1.055) ** 2.4


def _to_srgb(value: float) -> int:
    v = max(0.0, min(1.0, value))
    return int(v * 12.92 * 255 + 0.5) if v <= 0.0031308 else int((1.055 * v ** (1 / 2.4) - 0.055) * 255 + 0.5)


def _sign_pow(value: float, exponent: float) -> float:
    return math.copysign(abs(value) ** exponent, value)


_LINEAR = [_to_linear(v) for v in range(256)]  # PERF: a table, not a power per channel per pixel


def blurhash(image: Image.Image, components: tuple[int, int] | None = None) -> str:
    """Return the BlurHash of ``image``: 4x3 components (3x4 for a portrait) unless ``components`` says."""
    if image.width > PLACEHOLDER_SIDE or image.height > PLACEHOLDER_SIDE:
        image = reduced(image, PLACEHOLDER_SIDE)
    nx, ny = components or ((3, 4) if image.height > image.width else (4, 3))
    w, h = image.size
    # NOTE: a BlurHash has no alpha: transparent pixels count as white, as the phash and a JPEG
    # derivative take them, not as whatever colour they hide (often black: a dark placeholder).
    rgb = on_white(image).tobytes()
    # PERF: separable, by planes: each row of a channel is projected on the nx horizontal cosines
    # once, then those projections down the columns on the ny vertical ones, where the reference
    # multiplies each pixel by each of the nx * ny cosines; a 32x32 image 2.2 -> 0.44 ms CPU.
    # NOTE: the sums run in another order, so a factor may differ in its last bit (1e-16); a factor
    # is quantized to 19 levels (the DC to 8-bit sRGB), so the string differs only if one falls
    # within 1e-16 of a step: the same strings on NOTES-fingerprints.md's 412 test images.
    along_x = _blurhash_cosines(w, nx)
    along_y = _blurhash_cosines(h, ny)
    projected = []  # per channel: per horizontal cosine, the projection of each row
    for band in range(3):
        linear = list(map(_LINEAR.__getitem__, rgb[band::3]))
        rows = [linear[y * w : (y + 1) * w] for y in range(h)]
        # NOTE: the first cosine is 1 everywhere: a row's sum is its projection.
        projected.append(
            [[sum(row) for row in rows]] + [[sum(map(mul, row, fx)) for row in rows] for fx in along_x[1:]]
        )
    factors = []
    for j, fy in enumerate(along_y):
        for i in range(nx):
            norm = (1 if i == 0 and j == 0 else 2) / (w * h)
            r, g, b = (sum(map(mul, channel[i], fy)) * norm for channel in projected)
            factors.append((r, g, b))
    dc, ac = factors[0], factors[1:]
    text = _encode83(nx - 1 + (ny - 1) * 9, 1)
    if ac:
        actual = max(abs(c) for factor in ac for c in factor)
        quantised = max(0, min(82, math.floor(actual * 166 - 0.5)))
        maximum = (quantised + 1) / 166
        text += _encode83(quantised, 1)
    else:
        maximum = 1.0
        text += _encode83(0, 1)
    text += _encode83((_to_srgb(dc[0]) << 16) + (_to_srgb(dc[1]) << 8) + _to_srgb(dc[2]), 4)
    for factor in ac:
        r, g, b = (max(0, min(18, math.floor(_sign_pow(c / maximum, 0.5) * 9 + 9.5))) for c in factor)
        text += _encode83(r * 19 * 19 + g * 19 + b, 2)
    return text


@functools.cache
def _blurhash_cosines(size: int, count: int) -> list[list[float]]:
    """The first ``count`` cosines the reference projects ``size`` pixels on (once a size: sizes are <= 32)."""
    return [[math.cos(math.pi * c * x / size) for x in range(size)] for c in range(count)]


def blurhash_to_image(value: str, size: tuple[int, int] = (32, 32), punch: float = 1.0) -> Image.Image:
    """Return the RGB image of ``size`` a BlurHash stands for (``punch`` > 1 strengthens its contrast)."""
    if len(value) < 6:
        raise ValueError('a BlurHash has at least 6 characters')
    flag = _decode83(value[0])
    ny, nx = flag // 9 + 1, flag % 9 + 1
    if len(value) != 4 + 2 * nx * ny:
        raise ValueError(f'a BlurHash of {nx}x{ny} components has {4 + 2 * nx * ny} characters')
    maximum = (_decode83(value[1]) + 1) / 166 * punch
    dc = _decode83(value[2:6])
    colours = [(_LINEAR[dc >> 16], _LINEAR[(dc >> 8) & 255], _LINEAR[dc & 255])]
    for k in range(1, nx * ny):
        quantised = _decode83(value[4 + k * 2 : 6 + k * 2])
        parts = (quantised // (19 * 19), (quantised // 19) % 19, quantised % 19)
        red, green, blue = (_sign_pow((part - 9) / 9, 2.0) * maximum for part in parts)
        colours.append((red, green, blue))
    w, h = size
    out = bytearray()
    for y in range(h):
        fy = [math.cos(math.pi * y * j / h) for j in range(ny)]
        for x in range(w):
            fx = [math.cos(math.pi * x * i / w) for i in range(nx)]
            r = g = b = 0.0
            for j in range(ny):
                for i in range(nx):
                    basis = fx[i] * fy[j]
                    colour = colours[i + j * nx]
                    r += colour[0] * basis
                    g += colour[1] * basis
                    b += colour[2] * basis
            out += bytes((_to_srgb(r), _to_srgb(g), _to_srgb(b)))
    return Image.frombytes('RGB', (w, h), bytes(out))
