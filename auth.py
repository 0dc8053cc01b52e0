"""Who may do what: the bearer tokens that guard uploads and deletion.

Checked by middleware after routing, before the resource runs, so a resource
never sees a request it should not; the tokens come from :class:`config.Settings`.
"""

from __future__ import annotations

import hmac

import falcon


class RequireToken:
    """Requests with one of ``methods`` need ``Authorization: Bearer <token>``.

    With an empty token those requests are refused outright (403): that is
    how deletion stays off until ``ISS_ADMIN_TOKEN`` is set.
    """

    def __init__(self, methods: frozenset[str], token: str, variable: str, purpose: str) -> None:
        self._methods = methods
        self._expected = token.encode() if token else None
        self._variable = variable
        self._purpose = purpose

    def process_resource(self, req: falcon.Request, resp: falcon.Response, resource: object, params: dict) -> None:
        # NOTE: after routing, so a method no resource takes still gets its 404 or 405.
        if req.method not in self._methods or not hasattr(resource, f'on_{req.method.lower()}'):
            return
        if self._expected is None:
            raise falcon.HTTPForbidden(
                title=f'{self._purpose} is off', description=f'{self._purpose} is off until {self._variable} is set.'
            )
        if not hmac.compare_digest(bearer_token(req.get_header('Authorization')), self._expected):
            raise falcon.HTTPUnauthorized(
                title='Token required',
                description=f'{self._purpose} needs the header "Authorization: Bearer <{self._variable}>".',
                challenges=['Bearer realm="iss"'],
            )


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
