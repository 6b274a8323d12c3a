"""
A fake OAuth 2.0 authorization server and protected resource, for tests.

:class:`FakeOAuth` is a :class:`twisted.web.resource.Resource` with two
children: ``/token`` issues bearer tokens by the client credentials grant,
``/api`` accepts any request carrying a live one.  Give it to
``treq.testing.StubTreq`` for in-memory tests, or serve it with
``Site(fake)`` on a loopback port for end-to-end tests.
"""

from __future__ import annotations

import json
import secrets
from base64 import b64decode
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import parse_qsl, unquote_plus

from twisted.internet.interfaces import IReactorTime
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request


@dataclass(frozen=True)
class TokenRequest:
    """One request to the token endpoint, as the server understood it."""

    client_id: str | None
    #: ``"basic"``, ``"body"`` or ``"none"``.
    auth_method: str
    grant_type: str | None
    scope: str | None
    content_type: str | None


@dataclass(frozen=True)
class ResourceRequest:
    """One request the protected resource accepted."""

    method: str
    path: str
    token: str
    body: bytes


class _TokenEndpoint(Resource):
    isLeaf = True

    def __init__(self, server: FakeOAuth) -> None:
        super().__init__()
        self._server = server

    def render_POST(self, request: Request):  # noqa: N802 - Twisted's name
        return self._server._token_request(request)


class _ProtectedResource(Resource):
    isLeaf = True

    def __init__(self, server: FakeOAuth) -> None:
        super().__init__()
        self._server = server

    def render(self, request: Request) -> bytes:
        return self._server._resource_request(request)


class FakeOAuth(Resource):
    """
    An OAuth 2.0 server for the client credentials grant (RFC 6749 4.4).

    ``POST /token`` authenticates the client by HTTP Basic (each part
    form-urlencoded, RFC 6749 2.3.1) or by ``client_id``/``client_secret``
    form fields (not both), wants ``grant_type=client_credentials`` and
    answers ``{"access_token", "token_type": "Bearer", "expires_in"}``.
    Refusals are RFC 6749 5.2 JSON errors (``invalid_client`` 401,
    ``invalid_request``/``unsupported_grant_type`` 400).

    Any method on ``/api`` (and below) needs ``Authorization: Bearer
    <token>`` with a token issued here, not expired and not revoked;
    otherwise it answers 401 with ``WWW-Authenticate: Bearer
    error="invalid_token"``.  Accepted requests are kept and answered 204.

    :param clients: client id -> client secret.
    :param clock: the current time, for token expiry.
    :param expires_in: the lifetime given to new tokens, in seconds; None
        leaves ``expires_in`` out of the answer.
    """

    def __init__(
        self,
        clients: Mapping[str, str],
        *,
        clock: IReactorTime,
        expires_in: int | None = 3600,
    ) -> None:
        super().__init__()
        self.clients = dict(clients)
        self.clock = clock
        self.expires_in = expires_in
        #: Every token request, accepted or not, in order.
        self.token_requests: list[TokenRequest] = []
        #: Every token issued, oldest first.
        self.issued: list[str] = []
        #: Requests the protected resource accepted.
        self.accepted: list[ResourceRequest] = []
        #: How many requests the protected resource refused.
        self.refused = 0
        #: When set, the token endpoint answers this (code, body) instead.
        self.token_answer: tuple[int, bytes] | None = None
        #: When true, the token endpoint holds requests unanswered until
        #: :meth:`release` (for timeouts and concurrent callers).
        self.hang = False
        #: Token requests left unanswered while :attr:`hang` was set.
        self.hanging: list[tuple] = []
        self._expiry: dict[str, float] = {}
        self.putChild(b"token", _TokenEndpoint(self))
        self.putChild(b"api", _ProtectedResource(self))

    def revoke_all(self) -> None:
        """Make every token issued so far invalid at the protected resource."""
        self._expiry.clear()

    def is_valid(self, token: str) -> bool:
        """Whether the protected resource would accept ``token`` now."""
        expiry = self._expiry.get(token)
        return expiry is not None and self.clock.seconds() < expiry

    def _client_of(self, request: Request, form: dict[str, str]) -> tuple[str | None, str | None, str]:
        header = request.getHeader(b"authorization")
        in_body = "client_id" in form or "client_secret" in form
        if header is not None and header[:6].lower() == b"basic ":
            if in_body:
                return None, None, "both"
            try:
                pair = b64decode(header[6:], validate=True).decode("utf-8")
            except ValueError:
                return None, None, "basic"
            client_id, colon, secret = pair.partition(":")
            if not colon:
                return None, None, "basic"
            return unquote_plus(client_id), unquote_plus(secret), "basic"
        if in_body:
            return form.get("client_id"), form.get("client_secret"), "body"
        return None, None, "none"

    def _token_request(self, request: Request):
        request.content.seek(0)
        content_type = request.getHeader(b"content-type")
        form = dict(parse_qsl(request.content.read().decode("utf-8"), keep_blank_values=True))
        client_id, secret, method = self._client_of(request, form)
        self.token_requests.append(
            TokenRequest(
                client_id,
                method,
                form.get("grant_type"),
                form.get("scope"),
                content_type.decode("latin-1") if content_type else None,
            )
        )
        if self.hang:
            held = (request, form, client_id, secret, method, content_type)
            self.hanging.append(held)
            # A client that gave up (timed out) is not answered later.
            request.notifyFinish().addErrback(lambda _: self._forget(held))
            return NOT_DONE_YET
        return self._answer_token(request, form, client_id, secret, method, content_type)

    def release(self) -> None:
        """Answer every token request held while :attr:`hang` was set."""
        self.hang = False
        hanging, self.hanging = self.hanging, []
        for request, *details in hanging:
            body = self._answer_token(request, *details)
            request.write(body)
            request.finish()

    def _forget(self, held: tuple) -> None:
        if held in self.hanging:
            self.hanging.remove(held)

    def _answer_token(
        self,
        request: Request,
        form: dict[str, str],
        client_id: str | None,
        secret: str | None,
        method: str,
        content_type: bytes | None,
    ) -> bytes:
        if self.token_answer is not None:
            code, body = self.token_answer
            request.setResponseCode(code)
            request.setHeader(b"Content-Type", b"application/json")
            return body
        if method == "both":
            return self._error(request, 400, "invalid_request")
        if (
            content_type is None
            or content_type.split(b";")[0].strip().lower()
            != b"application/x-www-form-urlencoded"
        ):
            return self._error(request, 400, "invalid_request")
        expected = self.clients.get(client_id) if client_id is not None else None
        if expected is None or secret is None or not secrets.compare_digest(
            expected.encode("utf-8"), secret.encode("utf-8")
        ):
            if method == "basic":
                request.setHeader(b"WWW-Authenticate", b'Basic realm="fake"')
            return self._error(request, 401, "invalid_client")
        if form.get("grant_type") != "client_credentials":
            return self._error(request, 400, "unsupported_grant_type")
        token = f"fake-{len(self.issued) + 1}-{secrets.token_urlsafe(16)}"
        self.issued.append(token)
        lifetime = 3600 if self.expires_in is None else self.expires_in
        self._expiry[token] = self.clock.seconds() + lifetime
        answer: dict[str, object] = {"access_token": token, "token_type": "Bearer"}
        if self.expires_in is not None:
            answer["expires_in"] = self.expires_in
        request.setHeader(b"Content-Type", b"application/json")
        request.setHeader(b"Cache-Control", b"no-store")
        return json.dumps(answer).encode("utf-8")

    def _resource_request(self, request: Request) -> bytes:
        header = request.getHeader(b"authorization") or b""
        scheme, _, token = header.decode("latin-1").partition(" ")
        if scheme.lower() != "bearer" or not self.is_valid(token):
            self.refused += 1
            request.setResponseCode(401)
            request.setHeader(b"WWW-Authenticate", b'Bearer error="invalid_token"')
            return b""
        request.content.seek(0)
        self.accepted.append(
            ResourceRequest(
                request.method.decode("ascii"),
                request.path.decode("utf-8"),
                token,
                request.content.read(),
            )
        )
        request.setResponseCode(204)
        return b""

    def _error(self, request: Request, code: int, error: str) -> bytes:
        request.setResponseCode(code)
        request.setHeader(b"Content-Type", b"application/json")
        request.setHeader(b"Cache-Control", b"no-store")
        return json.dumps({"error": error}).encode("utf-8")
