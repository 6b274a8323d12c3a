"""
Tests for the redaction of an end server's quoted answer in
:mod:`oemrelay.connectors.http`: an end server that echoes the request in
its error body must not get the relay's secrets into the log.
"""

from __future__ import annotations

import json
from base64 import b64encode
from urllib.parse import unquote

from treq.testing import StubTreq
from twisted.internet import task
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource

from oemrelay.config import config_from_string
from oemrelay.connectors.http import (
    REDACTED,
    HttpConnector,
    quote_answer,
    redact,
    secrets_sent,
)
from oemrelay.relay import DeliveryFailed, DeviceProfile

from .fake_oauth import FakeOAuth
from .fakes import InMemoryEndServer
from .test_auth import KEY_1, clock_at
from .test_http import CLIENT_SECRET, UPLOAD, connector_for


class EchoServer(Resource):
    """Answers 500 with the request written back: URI, headers, then ``style``-formatted."""

    isLeaf = True

    def __init__(self, style: str = "text", padding: int = 0) -> None:
        super().__init__()
        self.style = style
        self.padding = padding

    def render(self, request) -> bytes:
        request.setResponseCode(500)
        headers = {
            name.decode(): [v.decode() for v in values]
            for name, values in request.requestHeaders.getAllRawHeaders()
        }
        if self.style == "json":
            echoed = json.dumps({"uri": request.uri.decode(), "headers": headers})
        else:
            echoed = request.uri.decode() + " " + " ".join(
                f"{name}: {', '.join(values)}" for name, values in headers.items()
            )
        return ("x" * self.padding + echoed).encode()


PROFILE = DeviceProfile("cust-one-key", "cust-two-secret", "cust-three/secret+")

SECRETS_BASIC = ("relay-user", "pass-w0rd", "relay-user:pass-w0rd")


class EchoingEndServerTests(SynchronousTestCase):
    """A 500 answer echoing the request is quoted with every secret redacted."""

    def setUp(self) -> None:
        self.clock = task.Clock()

    def refusal(self, server: Resource, profile: DeviceProfile = PROFILE, **settings) -> str:
        token_client = StubTreq(server) if settings.get("auth") == "oauth2" else None
        connector = connector_for(server, self.clock, token_client=token_client, **settings)
        failure = self.failureResultOf(connector.deliver(UPLOAD, profile), DeliveryFailed)
        return str(failure.value)

    def assert_hidden(self, message: str, *secrets: str) -> None:
        self.assertIn("500", message)
        self.assertIn(REDACTED, message)
        for secret in secrets:
            self.assertNotIn(secret, message)

    def test_basic_credentials_and_base64(self) -> None:
        """Basic user, password, user:password and their base64 are redacted from the quote."""
        message = self.refusal(EchoServer(), username="relay-user", password="pass-w0rd")
        encoded = b64encode(b"relay-user:pass-w0rd").decode()
        self.assert_hidden(message, *SECRETS_BASIC, encoded)

    def test_header_values_and_custom_fields(self) -> None:
        """Header values and custom1..3, in the URL or headers, raw or JSON-escaped, are redacted."""
        settings = dict(
            url="http://end.example.com/dm?key=[CUSTOM1]",
            headers=(("X-Api-Key", "[CUSTOM2]"), ("X-Other", "[CUSTOM3]")),
        )
        for style in ("text", "json"):
            message = self.refusal(EchoServer(style), **settings)
            self.assert_hidden(
                message, "cust-one-key", "cust-two-secret", "cust-three", "key="
            )

    def test_bearer_token(self) -> None:
        """The OAuth2 bearer token sent is redacted."""
        self.clock = clock_at()
        server = FakeOAuth({"relay": CLIENT_SECRET}, clock=self.clock)
        server.putChild(b"api", EchoServer())
        message = self.refusal(
            server,
            url="https://api.example.com/api/telemetry",
            auth="oauth2",
            token_url="https://login.example.com/token",
            client_id="relay",
            client_secret=CLIENT_SECRET,
        )
        (token,) = server.issued
        self.assert_hidden(message, token)

    def test_sas_signature(self) -> None:
        """Every part of a SAS token, raw and percent-decoded, is redacted."""
        self.clock = clock_at()
        section = "[connector:hub]\ntype = azure-iothub\nhub = myhub\n"
        config = config_from_string(section).connectors["hub"]
        client = InMemoryEndServer(EchoServer()).client(self.clock)
        connector = HttpConnector(config, client, self.clock)
        profile = DeviceProfile(custom1="dev1", custom3=KEY_1)
        failure = self.failureResultOf(connector.deliver(UPLOAD, profile), DeliveryFailed)
        message = str(failure.value)
        headers = connector.request_headers(UPLOAD.hello, profile)
        (authorization,) = headers[b"Authorization"]
        signature = authorization.decode().split("sig=")[1].split("&")[0]
        self.assert_hidden(message, signature, unquote(signature), KEY_1, "sig=")

    def test_plain_answer_quoted_unchanged(self) -> None:
        """An answer holding no secret is quoted as it is."""
        message = self.refusal(EchoServer(), url="http://end.example.com/")
        self.assertIn("Content-Type: application/json", message)
        self.assertNotIn(REDACTED, message)


class RedactTests(SynchronousTestCase):
    """The redaction helpers on their own."""

    def test_longest_secret_first(self) -> None:
        """A secret holding a shorter one is redacted whole."""
        self.assertEqual(redact("a abcdef b", {"abc", "abcdef"}), f"a {REDACTED} b")

    def test_basic_header_parts(self) -> None:
        """A Basic header yields its base64, user:password, user and password."""
        header = b"Basic " + b64encode(b"u1:p:2")
        found = secrets_sent({b"Authorization": [header]}, "http://h/", {})
        for part in ("u1", "p:2", "u1:p:2", header.decode()[6:]):
            self.assertIn(part, found)

    def test_content_type_not_secret(self) -> None:
        """Content-Type values are not treated as secrets."""
        found = secrets_sent({b"Content-Type": [b"application/json"]}, "http://h/", {})
        self.assertNotIn("application/json", found)

    def test_secret_across_the_cut(self) -> None:
        """A secret starting anywhere before the 200th character is redacted, not cut in half and shown."""
        for start in range(185, 200):
            quoted = quote_answer(b"x" * start + b"cust-two-secret|tail", {"cust-two-secret"})
            self.assertNotIn("cust-", quoted, f"secret at {start}")
            self.assertEqual(quoted, ("x" * start + REDACTED + "|tail")[:200])

    def test_quote_is_at_most_200_characters(self) -> None:
        """The quote is cut at 200 characters."""
        self.assertEqual(len(quote_answer(b"y" * 1000, {"zz"})), 200)
