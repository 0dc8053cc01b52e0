"""Who may do what: the bearer tokens that guard uploads, deletion and, for a private store, reads.

Checked by middleware after routing, before the resource runs, so a resource
never sees a request it should not; the tokens come from :class:`config.Settings`.
"""

from __future__ import annotations

import hmac

import falcon

from iss_server import signing


class RequireToken:
    """Requests with one of ``methods`` need ``Authorization: Bearer <token>``.

    With an empty token those requests are refused outright (403): that is
    how deletion stays off until ``ISS_ADMIN_TOKEN`` is set.
    """

    def __init__(
        self,
        methods: frozenset[str],
        token: str,
        variable: str,
        purpose: str,
        exempt: tuple[type, ...] = (),
        every_method_of: tuple[type, ...] = (),
        other_tokens: tuple[str, ...] = (),
    ) -> None:
        self._methods = methods
        self._expected = token.encode() if token else None
        # NOTE: the store's other tokens, so that one of them is told apart from a mistyped token
        self._others = tuple(other.encode() for other in other_tokens if other and other != token)
        self._variable = variable
        self._purpose = purpose
        self._exempt = exempt  # NOTE: resources that check a token of their own
        self._every_method_of = every_method_of  # NOTE: resources whose reads are writes' (an upload session)

    def process_resource(self, req: falcon.Request, resp: falcon.Response, resource: object, params: dict) -> None:
        # NOTE: after routing, so a method no resource takes still gets its 404 or 405.
        if not hasattr(resource, f'on_{req.method.lower()}'):
            return
        if req.method not in self._methods and not isinstance(resource, self._every_method_of):
            return
        if isinstance(resource, self._exempt):
            return
        if self._expected is None:
            raise falcon.HTTPForbidden(
                title=f'{self._purpose} is off', description=f'{self._purpose} is off until {self._variable} is set.'
            )
        if not hmac.compare_digest(bearer_token(req.get_header('Authorization')), self._expected):
            # NOTE: a resource may name its own purpose (a POST that is no upload)
            purpose = getattr(resource, 'token_purpose', self._purpose)
            needed = f'{purpose} needs the header "Authorization: Bearer <{self._variable}>".'
            if carries_one_of(req, self._others):
                raise token_required(f"The token given is one of this store's, but not {self._variable}. {needed}")
            raise token_required(needed, req)


class RequireReadToken:
    """With ``ISS_READ_TOKEN`` set, the store is private: every read needs one of the tokens.

    A read is a GET or HEAD of anything but the ``public`` resources (health, the API
    document, its page and assets), or a POST to one of ``reads_by_post`` (asking which ids
    are stored tells what is stored). The read, upload and admin tokens all read. Answers
    to them are ``private`` in caches (``public`` becomes it): a shared cache (nginx's) keeps none.
    """

    def __init__(
        self,
        tokens: tuple[str, ...],
        public: tuple[type, ...],
        reads_by_post: tuple[type, ...],
        signing_keys: tuple[str, ...] = (),
    ) -> None:
        self._tokens = tuple(token.encode() for token in tokens if token)
        self._public = public
        self._reads_by_post = reads_by_post
        self._signing_keys = tuple(key for key in signing_keys if key)

    def process_resource(self, req: falcon.Request, resp: falcon.Response, resource: object, params: dict) -> None:
        # NOTE: no resource: a static route (the page's assets) or no route at all (its 404)
        if resource is None or isinstance(resource, self._public):
            return
        if req.method not in ('GET', 'HEAD') and not (
            req.method == 'POST' and isinstance(resource, self._reads_by_post)
        ):
            return
        req.context.private_read = True
        # NOTE: a token first: it reads anything, so a stray signature= beside it is no reason to refuse
        if carries_one_of(req, self._tokens):
            return
        if 'signature' in req.params and req.method in ('GET', 'HEAD') and self._signing_keys:
            try:
                signing.verify(self._signing_keys, req.path, req.params)
            except signing.BadSignature as exc:
                raise falcon.HTTPForbidden(title='Invalid signature', description=str(exc)) from None
            return  # NOTE: a valid signature stands in for the token, for this one read
        raise token_required(
            'This store is private: reading needs "Authorization: Bearer <ISS_READ_TOKEN>" '
            '(or the upload or admin token).',
            req,
        )

    def process_response(
        self, req: falcon.Request, resp: falcon.Response, resource: object, req_succeeded: bool
    ) -> None:
        if not req.context.get('private_read'):
            return
        cache_control = resp.get_header('Cache-Control') or ''
        if cache_control.startswith('public'):
            cache_control = 'private' + cache_control.removeprefix('public')
        elif 'private' not in cache_control:
            cache_control = ', '.join(['private', *filter(None, [cache_control])])
        resp.set_header('Cache-Control', cache_control)


def token_required(description: str, req: falcon.Request | None = None) -> falcon.HTTPUnauthorized:
    """401 with the Bearer challenge: the request needs a token it did not carry (or carried a wrong one).

    NOTE: the title stays "Token required" either way (clients match it); the description says
    which it was, so a person can tell a missing token from a mistyped one.
    """
    if req is not None and bearer_token(req.get_header('Authorization')):
        description = f'The token given is not one this store takes. {description}'
    return falcon.HTTPUnauthorized(title='Token required', description=description, challenges=['Bearer realm="iss"'])


def carries_one_of(req: falcon.Request, tokens: tuple[bytes, ...]) -> bool:
    """Whether the request's bearer token is one of ``tokens``.

    APPSEC: every token compared, each in constant time, so none can be told apart by timing.
    """
    given = bearer_token(req.get_header('Authorization'))
    return any([hmac.compare_digest(given, token) for token in tokens])


def bearer_token(authorization: str | None) -> bytes:
    """The token of an ``Authorization: Bearer <token>`` header; empty for any other header.

    The scheme's name is case-insensitive (RFC 9110, section 11.1): ``bearer`` and ``BEARER``
    are ``Bearer``. The caller compares the token in constant time (``hmac.compare_digest``),
    so that it cannot be guessed byte by byte.
    """
    scheme, _, token = (authorization or '').partition(' ')
    if scheme.lower() != 'bearer':
        return b''
    return token.strip(' ').encode('utf-8', 'replace')
