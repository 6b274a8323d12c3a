"""
Tests for :class:`oemrelay.api.ApiRequest`: the API's requests are refused
from their headers (no token: 401, too large a declared body: 413) before
any of the body is read, and chunked bodies are cut off past the cap.
"""

from __future__ import annotations

import json

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from oemrelay.api import MAX_CSV_BODY, ApiRequest, build_api_site

from .test_api import CONNECTORS, TOKEN, FakeRegistry

CLIENT = IPv4Address("TCP", "127.0.0.1", 40000)


class EarlyRefusalTests(SynchronousTestCase):
    """Requests judged at their headers, on an in-memory connection."""

    def setUp(self) -> None:
        self.site = build_api_site(FakeRegistry(), TOKEN, CONNECTORS, Clock())
        self.requests: list[ApiRequest] = []

        def recording(*args) -> ApiRequest:
            self.requests.append(ApiRequest(*args))
            return self.requests[-1]

        self.site.requestFactory = recording
        self.channel = self.site.buildProtocol(CLIENT)
        self.transport = StringTransport(peerAddress=CLIENT)
        self.channel.makeConnection(self.transport)
        self.addCleanup(self.channel.connectionLost, None)

    def send_head(self, method: str, headers: dict[str, str]) -> None:
        lines = [f"{method} /api/devices/import HTTP/1.1", "Host: relay"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        self.channel.dataReceived(("\r\n".join(lines) + "\r\n\r\n").encode())

    def answer(self) -> tuple[int, dict]:
        head, _, body = self.transport.value().partition(b"\r\n\r\n")
        status = int(head.split(b" ")[1])
        return status, json.loads(body) if body else {}

    def request(self) -> ApiRequest:
        return self.requests[-1]

    def test_no_token_401_before_a_gigabyte_body(self) -> None:
        """A POST declaring 1 GiB without a token is answered 401 from its headers and the connection closes."""
        self.send_head("POST", {"Content-Length": str(1 << 30)})
        status, body = self.answer()
        self.assertEqual(status, 401)
        self.assertEqual(body, {"error": "missing bearer token"})
        self.assertIn(b"www-authenticate: bearer", self.transport.value().lower())
        self.assertTrue(self.transport.disconnecting)

    def test_body_after_refusal_is_not_kept(self) -> None:
        """Body bytes arriving after an early 401 are dropped, not written to a file."""
        self.send_head("POST", {"Content-Length": "100000000"})
        self.channel.dataReceived(b"x" * 1_000_000)
        content = self.request().content
        content.seek(0, 2)
        self.assertEqual(content.tell(), 0)

    def test_wrong_token_401(self) -> None:
        """A wrong bearer token is answered 401 invalid token from the headers."""
        self.send_head(
            "POST", {"Authorization": "Bearer wrong", "Content-Length": str(1 << 30)}
        )
        status, body = self.answer()
        self.assertEqual((status, body), (401, {"error": "invalid bearer token"}))
        self.assertNotIn(TOKEN.encode(), self.transport.value())

    def test_declared_length_boundary(self) -> None:
        """With the token, MAX_CSV_BODY declared is read; one byte more is answered 413 from the headers."""
        auth = {"Authorization": f"Bearer {TOKEN}"}
        self.send_head("POST", {**auth, "Content-Length": str(MAX_CSV_BODY)})
        self.assertEqual(self.transport.value(), b"")
        self.assertIsNone(self.request().refused)
        self.setUp()
        self.send_head("POST", {**auth, "Content-Length": str(MAX_CSV_BODY + 1)})
        status, body = self.answer()
        self.assertEqual(status, 413)
        self.assertIn(str(MAX_CSV_BODY), body["error"])
        self.assertTrue(self.transport.disconnecting)

    def test_chunked_body_cut_off_past_the_cap(self) -> None:
        """A chunked body is answered 413 once it passes MAX_CSV_BODY, keeping no more than that."""
        self.send_head(
            "POST",
            {"Authorization": f"Bearer {TOKEN}", "Transfer-Encoding": "chunked"},
        )
        chunk = b"y" * (1 << 20)
        frame = b"%x\r\n" % len(chunk) + chunk + b"\r\n"
        for _ in range(MAX_CSV_BODY // len(chunk)):
            self.channel.dataReceived(frame)
        self.assertEqual(self.transport.value(), b"")
        self.channel.dataReceived(b"1\r\nz\r\n")
        status, _ = self.answer()
        self.assertEqual(status, 413)
        self.channel.dataReceived(frame * 3)
        content = self.request().content
        content.seek(0, 2)
        self.assertEqual(content.tell(), MAX_CSV_BODY)

    def test_no_token_get_refused_too(self) -> None:
        """A GET without a token is answered 401 as well, so paths stay hidden."""
        self.send_head("GET", {})
        self.assertEqual(self.answer()[0], 401)

    def test_authorized_request_answered_by_the_api(self) -> None:
        """With the token, a request reaches the API resource and is answered there."""
        self.channel.dataReceived(
            f"GET /api/openapi.json HTTP/1.1\r\nHost: relay\r\nAuthorization: Bearer {TOKEN}\r\n\r\n".encode()
        )
        status, body = self.answer()
        self.assertEqual(status, 200)
        self.assertIn("openapi", body)



class OpenPathTests(SynchronousTestCase):
    """Health checks, and metrics when public, are answered without the token; /api never is."""

    def answer_to(self, path: str, metrics_public: bool = False) -> int:
        site = build_api_site(
            FakeRegistry(),
            TOKEN,
            CONNECTORS,
            Clock(),
            metrics=lambda: b"# metrics\n",
            metrics_public=metrics_public,
        )
        channel = site.buildProtocol(CLIENT)
        transport = StringTransport(peerAddress=CLIENT)
        channel.makeConnection(transport)
        self.addCleanup(channel.connectionLost, None)
        channel.dataReceived(f"GET {path} HTTP/1.1\r\nHost: relay\r\n\r\n".encode())
        return int(transport.value().split(b" ")[1])

    def test_health_without_token(self) -> None:
        """/healthz answers 200 with no token (a query string does not change the path)."""
        self.assertEqual(self.answer_to("/healthz"), 200)
        self.assertEqual(self.answer_to("/healthz?probe=1"), 200)

    def test_metrics_needs_token_unless_public(self) -> None:
        """/metrics without a token is 401, or 200 with metrics_public."""
        self.assertEqual(self.answer_to("/metrics"), 401)
        self.assertEqual(self.answer_to("/metrics", metrics_public=True), 200)

    def test_api_never_open(self) -> None:
        """/api/devices without a token is 401 even with metrics_public."""
        self.assertEqual(self.answer_to("/api/devices", metrics_public=True), 401)

    def test_console_files_without_token(self) -> None:
        """The console's page loads without a token (it asks for it); a look-alike path does not."""
        self.assertEqual(self.answer_to("/console/"), 200)
        self.assertEqual(self.answer_to("/consoleX"), 401)
