"""What ISS knows about images: identification from the header, with Pillow."""

from __future__ import annotations

import dataclasses
import time
import warnings
from typing import IO, Any

from PIL import Image


class NotAnImage(ValueError):
    """Pillow cannot identify the bytes as an image."""


class ImageTooLarge(ValueError):
    """The image declares more pixels than Pillow will decode (a decompression bomb)."""


@dataclasses.dataclass(frozen=True)
class ImageInfo:
    format: str  # Pillow's name for the format, e.g. 'PNG'
    mime: str  # the media type that format implies, never the client's claim
    width: int
    height: int


def identify(file: IO[bytes]) -> ImageInfo:
    """Identify an image from its header, without decoding the pixels.

    Raises:
        NotAnImage: the bytes are not a format Pillow can open.
        ImageTooLarge: the header declares a decompression bomb.
    """
    try:
        with warnings.catch_warnings():
            # NOTE: a large-but-allowed image only warns; that is not an error here.
            warnings.simplefilter('ignore', Image.DecompressionBombWarning)
            with Image.open(file) as image:
                width, height = image.size
                image_format = image.format or ''
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(str(exc)) from None
    except Exception as exc:
        raise NotAnImage(str(exc) or type(exc).__name__) from None
    mime = Image.MIME.get(image_format, 'application/octet-stream')
    return ImageInfo(image_format, mime, width, height)


def image_meta(file: IO[bytes], size: int, created_at: float | None = None) -> dict[str, Any]:
    """The meta file of an image: the seed's keys, with what Pillow read from the header.

    Raises:
        NotAnImage, ImageTooLarge: as :func:`identify`.
    """
    info = identify(file)
    return {
        'kind': 'image',
        'bytes': size,
        'mime': info.mime,
        'format': info.format,
        'width': info.width,
        'height': info.height,
        'created_at': time.time() if created_at is None else created_at,
    }
