"""Image formats past Pillow's own: HEIC/HEIF (``pillow-heif``) and JPEG XL (``pillow-jxl-plugin``).

AVIF needs no plugin: Pillow reads and writes it itself (its wheels carry libavif
since 11.3). :func:`register` teaches Pillow the other two, once per process;
call it before the first ``Image.open`` of an upload (``images.py`` does, at import).

NOTE: what each costs (NOTES-similar.md has the numbers):
- A HEIC decodes in full (HEVC has no reduced-scale decode as JPEG's ``draft``),
  unless it carries a thumbnail (phones write one): then ``draft``/``thumbnail``
  decode that thumbnail instead, as pillow-heif's plugin does.
- A JPEG XL decodes in full when it is *opened*: pillow-jxl-plugin decodes the
  whole file in ``Image.open``, so even reading its size costs a full decode.
"""

from __future__ import annotations

import threading

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
