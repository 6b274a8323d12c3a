"""
The operator console: static files shipped in this package, served under
``/console/`` on the management API's listener, and the site root that puts
them beside the API.

The page is plain HTML, CSS and JavaScript (no build step, no library, so it
works with no internet access).  Everything it shows it fetches from the
documented API with the bearer token, which it keeps in session storage.
The files are served with a strict Content-Security-Policy (no inline script
or style, nothing from elsewhere, no framing) and ``nosniff``; they hold no
data, so serving them needs no token.
"""

from __future__ import annotations

import os

from twisted.web.resource import IResource, Resource
from twisted.web.server import Request
from twisted.web.util import Redirect

_HERE = os.path.dirname(os.path.abspath(__file__))

#: The console's files and their content types; nothing else is served.
FILES = {
    b"": ("index.html", b"text/html; charset=utf-8"),
    b"index.html": ("index.html", b"text/html; charset=utf-8"),
    b"app.js": ("app.js", b"text/javascript; charset=utf-8"),
    b"app.css": ("app.css", b"text/css; charset=utf-8"),
}

#: Only this origin's script, style and requests; no inline code, no framing.
CONTENT_SECURITY_POLICY = (
    b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self';"
    b" connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)

SECURITY_HEADERS = {
    b"content-security-policy": CONTENT_SECURITY_POLICY,
    b"x-content-type-options": b"nosniff",
    b"x-frame-options": b"DENY",
    b"referrer-policy": b"no-referrer",
    b"cache-control": b"no-cache",
}


class ConsoleFiles(Resource):
    """``/console/<file>``: one of :data:`FILES`, read once, with the security headers."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self._files = {}
        for name, (filename, content_type) in FILES.items():
            with open(os.path.join(_HERE, filename), "rb") as f:
                self._files[name] = (f.read(), content_type)

    def render_GET(self, request: Request) -> bytes:
        for name, value in SECURITY_HEADERS.items():
            request.setHeader(name, value)
        found = self._files.get(b"/".join(request.postpath))
        if found is None:
            request.setResponseCode(404)
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            return b"no such file\n"
        data, content_type = found
        request.setHeader(b"content-type", content_type)
        return data

    render_HEAD = render_GET


class SiteRoot(Resource):
    """``/console/...`` is the console; every other path goes to the API."""

    def __init__(self, api: IResource) -> None:
        super().__init__()
        self._api = api
        self._console = ConsoleFiles()

    def getChild(self, path: bytes, request: Request) -> IResource:
        if path == b"console":
            if not request.postpath:
                return Redirect(b"/console/")
            return self._console
        # The API routes on the whole request path, not on what is left of it.
        return self._api

    def render(self, request: Request) -> bytes:
        return self._api.render(request)
