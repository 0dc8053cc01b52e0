"""iss_server/signing.py alone: signed URLs are bound to their path, parameters, key and time.

Through the app (a private store reading with a signature): test_auth.py and test_images.py.
"""

from __future__ import annotations

import re
import urllib.parse

import pytest

from iss_server import signing

KEY, OLD_KEY = 'the key', 'the previous key'
PATH = '/images/sha256:' + 'ab' * 32
NOW = 1_800_000_000


def query_of(key: str, path: str = PATH, params: dict | None = None, expires_in: int = 60) -> dict[str, str]:
    """The query a client sends with a URL from ``signed_path``, parsed as the server parses it."""
    url = signing.signed_path(key, path, params or {}, expires_in, now=NOW)
    assert url.startswith(path + '?')
    return dict(urllib.parse.parse_qsl(url.partition('?')[2], keep_blank_values=True, strict_parsing=True))


def test_a_signed_url_verifies_until_it_expires_and_not_after():
    query = query_of(KEY, params={'w': '256', 'fit': 'cover'}, expires_in=60)

    assert query['expires'] == str(NOW + 60)
    assert re.fullmatch(r'[A-Za-z0-9_-]{43}', query['signature'])  # NOTE: 32 bytes, URL-safe, no padding
    signing.verify((KEY,), PATH, query, now=NOW)
    signing.verify((KEY,), PATH, query, now=NOW + 60)
    with pytest.raises(signing.BadSignature, match='expired'):
        signing.verify((KEY,), PATH, query, now=NOW + 61)


def test_parameters_with_any_characters_round_trip_in_any_order():
    params = {'name': 'a b/ü&=?#+%', 'w': '1', 'a': ''}
    query = query_of(KEY, params=params)

    signing.verify((KEY,), PATH, dict(reversed(list(query.items()))), now=NOW)


@pytest.mark.parametrize(
    'change',
    [
        lambda path, query: ('/images/sha256:' + 'cd' * 32, query),
        lambda path, query: ('/artifacts/' + path.rpartition('/')[2], query),
        lambda path, query: (path, {**query, 'w': '512'}),
        lambda path, query: (path, {**query, 'h': '256'}),
        lambda path, query: (path, {key: value for key, value in query.items() if key != 'w'}),
        lambda path, query: (path, {**query, 'expires': str(int(query['expires']) + 3600)}),
        lambda path, query: (
            path,
            {**query, 'signature': query['signature'][:-1] + 'AB'[query['signature'].endswith('A')]},
        ),
    ],
    ids=[
        'another id',
        'another route',
        'another value',
        'a parameter added',
        'a parameter dropped',
        'longer',
        'edited',
    ],
)
def test_a_signature_is_for_one_path_and_one_query(change):
    path, query = change(PATH, query_of(KEY, params={'w': '256'}))

    with pytest.raises(signing.BadSignature, match='not for this path'):
        signing.verify((KEY,), path, query, now=NOW)


def test_the_previous_key_still_verifies_and_an_unknown_or_empty_key_does_not():
    query = query_of(OLD_KEY)

    signing.verify((KEY, OLD_KEY), PATH, query, now=NOW)
    for keys in ((KEY,), ('',), ()):
        with pytest.raises(signing.BadSignature):
            signing.verify(keys, PATH, query, now=NOW)


@pytest.mark.parametrize(
    'query',
    [
        {},
        {'signature': 'x'},
        {'expires': str(NOW)},
        {'signature': 'x', 'expires': 'soon'},
        {'signature': 'x', 'expires': '-1'},
        {'signature': ['x', 'y'], 'expires': str(NOW)},
    ],
)
def test_a_malformed_signed_query_is_refused(query):
    with pytest.raises(signing.BadSignature, match='one signature and one expires'):
        signing.verify((KEY,), PATH, query, now=NOW)


def test_a_parameter_given_twice_is_refused():
    query = {**query_of(KEY, params={'w': '1'}), 'w': ['1', '1']}

    with pytest.raises(signing.BadSignature, match='each parameter once'):
        signing.verify((KEY,), PATH, query, now=NOW)
