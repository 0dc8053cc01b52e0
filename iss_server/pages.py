"""The pages a person opens in a browser: the browse page and its assets, the API docs and their document."""

from __future__ import annotations

import json
import pathlib

import falcon
import yaml

from iss_server import browse
from iss_server.responses import IMMUTABLE, etag_matches


class BrowsePage:
    """``GET /`` and ``/browse``: the page to look at the store, upload and delete, in a browser.

    The page is public (it holds no data; the script reads through the API, with the token
    the user gives it); revalidated on every visit, its assets cached for a year.
    """

    def __init__(self, assets: browse.Assets) -> None:
        self._assets = assets

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.etag = self._assets.etag
        resp.cache_control = ('no-cache',)
        resp.set_header('Content-Security-Policy', browse.CSP)
        resp.set_header('X-Content-Type-Options', 'nosniff')
        resp.set_header('Referrer-Policy', 'same-origin')
        if etag_matches(req.if_none_match, self._assets.etag):
            resp.status = falcon.HTTP_304
            return
        resp.data = self._assets.html
        resp.content_type = 'text/html; charset=utf-8'


class BrowseAsset:
    """``GET /browse/{name}``: the page's script and style, by fingerprinted name, immutable."""

    def __init__(self, assets: browse.Assets) -> None:
        self._assets = assets

    def on_get(self, req: falcon.Request, resp: falcon.Response, name: str) -> None:
        if name not in self._assets.files:
            raise falcon.HTTPNotFound(title='Not found', description=f'The page has no asset {name!r}.')
        resp.data, resp.content_type = self._assets.files[name]
        resp.cache_control = IMMUTABLE
        resp.set_header('X-Content-Type-Options', 'nosniff')


class OpenAPIDocument:
    """Serves ``openapi.yaml`` as written, and the same document as JSON."""

    def __init__(self, path: pathlib.Path) -> None:
        self._yaml = path.read_bytes()
        self._json = json.dumps(yaml.safe_load(self._yaml)).encode()

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.data = self._yaml
        resp.content_type = 'application/yaml'

    def on_get_json(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.data = self._json
        resp.content_type = falcon.MEDIA_JSON


_DOCS_PAGE = b"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>ISS API</title>
<link rel="stylesheet" href="docs/assets/swagger-ui.css">
</head>
<body>
<div id="swagger-ui"></div>
<script src="docs/assets/swagger-ui-bundle.js"></script>
<script>
window.ui = SwaggerUIBundle({url: 'openapi.json', dom_id: '#swagger-ui', deepLinking: true});
</script>
</body>
</html>
"""


class Docs:
    """The interactive API page; Swagger UI's files come from an installed package."""

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.data = _DOCS_PAGE
        resp.content_type = falcon.MEDIA_HTML
