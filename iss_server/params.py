"""The query parameters ISS reads itself, in one grammar: whole numbers and times, ASCII only.

APPSEC: ``int()``, ``float()`` and Falcon's ``get_param_as_int`` also take '١٠', '²'-free
Unicode digits, ' 10' and '1_0': each spelling would be a request (and an nginx cache key) of
its own for the same answer, and a door to the parsers' corners. Here a number is 1 to 12 ASCII
digits, a time Unix seconds or ISO 8601.
"""

from __future__ import annotations

import datetime
import re

import falcon

from iss_server.errors import BadRequest

_WHOLE_NUMBER = re.compile(r'[0-9]{1,12}')
# NOTE: an integer, but not a whole number of 1 to 12 digits: one out of every range (negative, or huge).
_INTEGER = re.compile(r'-?[0-9]+')
_UNIX_SECONDS = re.compile(r'-?[0-9]{1,12}(\.[0-9]{1,9})?')


def whole_number(raw: str | None, name: str, *, minimum: int, maximum: int) -> int | None:
    """``raw`` as a whole number from ``minimum`` to ``maximum``, None when not given; 400 otherwise, as Falcon's own.

    Raises:
        falcon.HTTPInvalidParam: not 1 to 12 ASCII digits, or out of bounds.
    """
    if raw is None:
        return None
    out_of_range = falcon.HTTPInvalidParam(f'The value must be at least {minimum} and at most {maximum}.', name)
    if not _WHOLE_NUMBER.fullmatch(raw):
        if _INTEGER.fullmatch(raw):
            raise out_of_range  # NOTE: -1 or 10**20 is an integer: "must be an integer" misled
        raise falcon.HTTPInvalidParam('The value must be an integer.', name)
    value = int(raw)
    if not minimum <= value <= maximum:
        raise out_of_range
    return value


def single(req: falcon.Request, name: str) -> str | None:
    """The query parameter ``name``, given once; None when not given.

    NOTE: Falcon gives a parameter given twice as a list, and ``get_param`` the last of it: which
    one the client meant is not ISS's to guess (``?limit=1&limit=5`` was silently a page of 5).

    Raises:
        BadRequest: given more than once.
    """
    value = req.params.get(name)
    if isinstance(value, list):
        raise BadRequest(f'Give {name} once.', title='Repeated parameter')
    return value


def timestamp(raw: str | None, name: str) -> float | None:
    """``raw`` as Unix seconds: given as Unix seconds or ISO 8601 (no zone: UTC); None when not given.

    Raises:
        BadRequest: neither.
    """
    if raw is None:
        return None
    try:
        if _UNIX_SECONDS.fullmatch(raw):
            return float(raw)
        if not raw.isascii():
            raise ValueError(raw)
        moment = datetime.datetime.fromisoformat(raw)
    except ValueError:
        raise BadRequest(
            f'{name} must be Unix seconds or an ISO 8601 time, e.g. 2026-11-25T12:00:00Z.', title=f'Invalid {name}'
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)
    return moment.timestamp()
