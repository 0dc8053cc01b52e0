"""Signed URLs: a GET or HEAD of one path with one query, allowed until a time, without a token.

A signature is HMAC-SHA256, keyed with ``ISS_SIGNING_KEY``, over the method (``GET``; a HEAD
is checked as the GET it previews), the path and the query: every parameter but
``signature``, ``expires`` included, sorted and percent-encoded. So it cannot be moved to
another id, given other derivative parameters, or kept alive past ``expires`` (Unix seconds).
A previous key (``ISS_SIGNING_KEY_PREVIOUS``) still verifies, so keys rotate without breaking
the URLs already handed out.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
import urllib.parse
from collections.abc import Mapping

#: The query parameters a signed URL adds.
PARAMETERS = ('expires', 'signature')
#: The longest a signed URL may live: a week (``POST /sign``, ``python -m iss sign``).
MAX_EXPIRES_IN = 7 * 24 * 3600


class BadSignature(Exception):
    """The URL's signature is missing, malformed, for another request, or past its time."""


def sign(key: str, path: str, params: Mapping[str, str], expires: int) -> str:
    """The query string (without ``?``) that lets a GET of ``path`` with ``params`` through until ``expires``."""
    query = {**params, 'expires': str(expires)}
    return f'{_canonical_query(query)}&signature={_signature(key.encode(), path, query)}'


def signed_path(key: str, path: str, params: Mapping[str, str], expires_in: int, now: float | None = None) -> str:
    """``path?...&expires=...&signature=...``, valid for ``expires_in`` seconds from ``now``."""
    expires = int(time.time() if now is None else now) + expires_in
    return f'{path}?{sign(key, path, params, expires)}'


def verify(keys: tuple[str, ...], path: str, params: Mapping[str, str | list[str]], now: float | None = None) -> None:
    """Check the signature in ``params`` (the request's query) against each key.

    Raises:
        BadSignature: it is malformed, matches no key, or has expired.
    """
    signature, expires = params.get('signature'), params.get('expires')
    if not isinstance(signature, str) or not isinstance(expires, str) or not (expires.isascii() and expires.isdigit()):
        raise BadSignature('A signed URL has one signature and one expires (Unix seconds).')
    if any(isinstance(value, list) for value in params.values()):
        raise BadSignature('A signed URL gives each parameter once.')
    query = {name: value for name, value in params.items() if name != 'signature' and isinstance(value, str)}
    given = signature.encode()
    # APPSEC: every key compared, each in constant time.
    matches = [hmac.compare_digest(given, _signature(key.encode(), path, query).encode()) for key in keys if key]
    if not any(matches):
        raise BadSignature('The signature is not for this path and these parameters.')
    if int(expires) < (time.time() if now is None else now):
        raise BadSignature('The signed URL has expired.')


def _signature(key: bytes, path: str, query: Mapping[str, str]) -> str:
    message = f'GET\n{path}\n{_canonical_query(query)}'.encode()
    return base64.urlsafe_b64encode(hmac.new(key, message, hashlib.sha256).digest()).decode().rstrip('=')


def _canonical_query(query: Mapping[str, str]) -> str:
    return urllib.parse.urlencode(sorted(query.items()), quote_via=urllib.parse.quote)
