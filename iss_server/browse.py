"""The browse page's files: ``browse/`` read once, each asset named by its content's hash.

``index.html`` names its assets as ``{{browse.js}}``; :class:`Assets` replaces each with
``/browse/<name>.<hash>.<ext>``, so an asset is cached for a year (``immutable``) and a new
release is fetched at once, by its new name. No build step: the files are the source.
"""

from __future__ import annotations

import hashlib
import pathlib
import re

_TYPES = {'.js': 'text/javascript; charset=utf-8', '.css': 'text/css; charset=utf-8', '.svg': 'image/svg+xml'}

# APPSEC: the page runs only its own script, loads only its own styles, and talks only to
# this server; images come from here (or from blob: URLs the script made with a token).
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; connect-src 'self'; "
    "form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)


class Assets:
    """The page (``html``, its ``etag``) and its assets by fingerprinted name: ``{name: (bytes, type)}``."""

    def __init__(self, directory: pathlib.Path) -> None:
        self.files: dict[str, tuple[bytes, str]] = {}
        names: dict[str, str] = {}
        for path in sorted(directory.iterdir()):
            if path.suffix in _TYPES:
                data = path.read_bytes()
                fingerprinted = f'{path.stem}.{hashlib.sha256(data).hexdigest()[:12]}{path.suffix}'
                self.files[fingerprinted] = (data, _TYPES[path.suffix])
                names[path.name] = f'/browse/{fingerprinted}'
        page = (directory / 'index.html').read_text()
        self.html = re.sub(r'\{\{([\w.]+)\}\}', lambda match: names[match.group(1)], page).encode()
        self.etag = hashlib.sha256(self.html).hexdigest()[:16]
