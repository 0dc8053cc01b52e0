"""iss_server/auth.py alone: the middleware that checks tokens, on a small Falcon app of its own.

How ISS wires it (which routes need which token): test_iss.py, test_images.py and test_browse.py.
"""

from __future__ import annotations

import falcon
import falcon.testing
import pytest

from iss_server import auth, signing

UPLOAD, ADMIN, READ, SIGNING_KEY = 'upload-token', 'admin-token', 'read-token', 'signing-key'


class Blobs:
    """Stands for a resource anyone may read and only a token holder may write."""

    def on_get(self, req, resp, **params):
        resp.media = {'read': True}
        resp.cache_control = ('public', 'max-age=60')

    on_head = on_get

    def on_post(self, req, resp, **params):
        resp.status = falcon.HTTP_201

    def on_delete(self, req, resp, **params):
        resp.status = falcon.HTTP_204


class Session(Blobs):
    """Stands for an upload session: reading it is the uploader's business too."""


class Exempt(Blobs):
    """Stands for a resource that checks a token of its own."""


class Health:
    def on_get(self, req, resp, **params):
        resp.media = {'status': 'ok'}


class Lookup:
    """Stands for a POST that tells what is stored: a read, not an upload."""

    def on_post(self, req, resp, **params):
        resp.media = {'stored': []}
        resp.cache_control = ('no-store',)


def app(
    *, upload: str = UPLOAD, admin: str = ADMIN, read: str = '', keys: tuple[str, ...] = ()
) -> falcon.testing.TestClient:
    middleware = [
        auth.RequireToken(
            frozenset({'POST'}), upload, 'ISS_API_TOKEN', 'Uploading', (Exempt, Lookup), (Session,), (read, admin)
        ),
        auth.RequireToken(frozenset({'DELETE'}), admin, 'ISS_ADMIN_TOKEN', 'Deleting', other_tokens=(read, upload)),
    ]
    if read:
        middleware.append(auth.RequireReadToken((read, upload, admin), (Health,), (Lookup,), keys))
    application = falcon.App(middleware=middleware)
    application.add_route('/blobs/{name}', Blobs())
    application.add_route('/sessions/{name}', Session())
    application.add_route('/exempt', Exempt())
    application.add_route('/health', Health())
    application.add_route('/lookup', Lookup())
    return falcon.testing.TestClient(application)


def bearer(token: str) -> dict[str, str]:
    return {'Authorization': f'Bearer {token}'}


@pytest.mark.parametrize(
    'header, token',
    [
        ('Bearer abc', b'abc'),
        ('bearer abc', b'abc'),
        ('BEARER abc', b'abc'),
        ('Bearer  abc  ', b'abc'),
        ('Bearer ünï', 'ünï'.encode()),
        ('Basic abc', b''),
        ('Bearerabc', b''),
        ('abc', b''),
        ('', b''),
        (None, b''),
    ],
)
def test_the_bearer_token_is_read_from_its_header_and_nothing_else(header, token):
    assert auth.bearer_token(header) == token


def test_a_write_needs_its_token_and_a_read_does_not():
    client = app()

    assert client.simulate_get('/blobs/a').status_code == 200
    assert client.simulate_post('/blobs/a', headers=bearer(UPLOAD)).status_code == 201
    assert client.simulate_delete('/blobs/a', headers=bearer(ADMIN)).status_code == 204
    for method, headers in [
        ('POST', {}),
        ('POST', bearer('wrong')),
        ('POST', bearer(ADMIN)),
        ('DELETE', bearer(UPLOAD)),
    ]:
        refused = client.simulate_request(method, '/blobs/a', headers=headers)

        assert refused.status_code == 401, (method, headers)
        assert refused.headers['WWW-Authenticate'] == 'Bearer realm="iss"'


def test_a_wrong_token_is_told_apart_from_a_missing_one():
    client = app()

    missing = client.simulate_post('/blobs/a').json
    wrong = client.simulate_post('/blobs/a', headers=bearer('wrong')).json

    assert missing['title'] == wrong['title'] == 'Token required'
    assert 'not one this store takes' in wrong['description']
    assert 'not one this store takes' not in missing['description']


def test_a_token_of_another_kind_is_named_as_one_of_the_stores_not_as_a_wrong_one():
    client = app(read=READ)

    for method, token, needed in [
        ('POST', READ, 'ISS_API_TOKEN'),
        ('POST', ADMIN, 'ISS_API_TOKEN'),
        ('DELETE', READ, 'ISS_ADMIN_TOKEN'),
        ('DELETE', UPLOAD, 'ISS_ADMIN_TOKEN'),
    ]:
        refused = client.simulate_request(method, '/blobs/a', headers=bearer(token))

        assert refused.status_code == 401
        assert refused.headers['WWW-Authenticate'] == 'Bearer realm="iss"'
        assert f"one of this store's, but not {needed}" in refused.json['description'], (method, token)
        assert 'not one this store takes' not in refused.json['description']


def test_without_its_token_set_the_action_is_off_for_everyone():
    client = app(admin='')

    for headers in ({}, bearer(''), bearer(ADMIN)):
        refused = client.simulate_delete('/blobs/a', headers=headers)

        assert refused.status_code == 403
        assert refused.json['title'] == 'Deleting is off'
        assert 'ISS_ADMIN_TOKEN' in refused.json['description']


def test_every_method_of_a_session_needs_the_token_and_an_exempt_resource_none():
    client = app()

    assert client.simulate_get('/sessions/s').status_code == 401
    assert client.simulate_get('/sessions/s', headers=bearer(UPLOAD)).status_code == 200
    assert client.simulate_post('/exempt').status_code == 201


def test_a_method_no_resource_takes_is_405_not_401():
    assert app().simulate_put('/blobs/a').status_code == 405
    assert app(read=READ).simulate_get('/nowhere').status_code == 404


def test_a_private_store_needs_any_token_to_read_and_keeps_answers_out_of_shared_caches():
    client = app(read=READ)

    refused = client.simulate_get('/blobs/a')
    assert refused.status_code == 401
    assert 'ISS_READ_TOKEN' in refused.json['description']
    assert client.simulate_post('/lookup').status_code == 401
    for token in (READ, UPLOAD, ADMIN):
        read = client.simulate_get('/blobs/a', headers=bearer(token))

        assert read.status_code == 200
        assert read.headers['Cache-Control'] == 'private, max-age=60'
    looked_up = client.simulate_post('/lookup', headers=bearer(READ))
    assert looked_up.status_code == 200
    assert looked_up.headers['Cache-Control'] == 'private, no-store'
    # NOTE: writing still takes the upload token, not the read token.
    assert client.simulate_post('/blobs/a', headers=bearer(READ)).status_code == 401


def test_health_stays_public_in_a_private_store():
    answer = app(read=READ).simulate_get('/health')

    assert answer.status_code == 200
    assert 'Cache-Control' not in answer.headers


def test_a_signed_url_stands_in_for_the_read_token_for_its_one_read():
    client = app(read=READ, keys=(SIGNING_KEY,))
    url = signing.signed_path(SIGNING_KEY, '/blobs/a', {'w': '1'}, 60)
    query = url.partition('?')[2]

    for method in ('GET', 'HEAD'):
        assert client.simulate_request(method, '/blobs/a', query_string=query).status_code == 200
    other = client.simulate_get('/blobs/b', query_string=query)
    assert other.status_code == 403
    assert other.json['title'] == 'Invalid signature'
    # NOTE: it reads; it does not write.
    assert client.simulate_post('/blobs/a', query_string=query).status_code == 401


def test_a_signature_means_nothing_where_no_signing_key_is_set():
    client = app(read=READ)
    query = signing.signed_path(SIGNING_KEY, '/blobs/a', {}, 60).partition('?')[2]

    assert client.simulate_get('/blobs/a', query_string=query).status_code == 401
