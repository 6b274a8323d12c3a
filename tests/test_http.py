"""
Tests for :mod:`oemrelay.connectors.http`: one POST of OEM JSON per upload,
through the real HTTP client connected in memory (iosim) to ``twisted.web``
end servers, with a fake clock.
"""

from __future__ import annotations

import json
import os
from base64 import b64encode
from email.utils import formatdate
from urllib.parse import parse_qs

import twisted
from cryptography import x509
from OpenSSL import SSL
from treq.client import HTTPClient
from treq.testing import StubTreq
from twisted.logger import LogLevel, globalLogPublisher
from twisted.internet import task
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.interfaces import IHandshakeListener, IOpenSSLClientConnectionCreator
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import CertificateOptions, PrivateCertificate
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from zope.interface import implementer

from oemrelay.auth import sas_token
from oemrelay.codec import Frame, FrameDecoder, Hello, MessageType, parse_data_records, parse_hello
from oemrelay.config import HttpConnectorConfig, config_from_string
from oemrelay.connectors import build_connector
from oemrelay.connectors import http as http_module
from oemrelay import tls as tls_module
from oemrelay.connectors.http import (
    HttpConnector,
    build_http_client,
    build_token_client,
    form_body,
)
from oemrelay.connectors.http_client import HttpClient
from oemrelay.oem_json import oem_document
from oemrelay.relay import DeliveryFailed, DeviceProfile, StatelessLink, Upload
from oemrelay.tls import ClientCertificatePolicy, PlatformTrustPlusCA

from .fake_azure import FakeIoTHub
from .fake_oauth import FakeOAuth
from .fakes import InMemoryEndServer
from .test_auth import KEY_1, KEY_2, NOW, POLICY_KEY, clock_at
from .test_config import client_certificate_pem, write_temp
from .vectors import capture

HELLO = parse_hello(FrameDecoder().feed(capture("hello-49-byte-dart"))[0].payload)
_DATA = FrameDecoder().feed(capture("data-0x04-2-records-2021-denmark"))[0]
UPLOAD = Upload(HELLO, (_DATA,), tuple(parse_data_records(_DATA.payload)), 0.0)
PROFILE = DeviceProfile("cust/one?a=1&b=2 x", "two", "three")

#: Secrets that must never appear in a failure message.
SECRETS = ("TOPSECRET", "bearer-token-9", "pass-word-7")
SECRET_PROFILE = DeviceProfile("TOPSECRET", "bearer-token-9")
SECRET_CONFIG = dict(
    url="https://end.example.com:8443/dm/[SERIAL]?key=[CUSTOM1]",
    headers=(("Authorization", "Bearer [CUSTOM2]"),),
    username="relay",
    password="pass-word-7",
)

FAKE_CAS = os.path.join(os.path.dirname(twisted.__file__), "internet", "test", "fake_CAs")


class EndServer(Resource):
    """
    An in-memory end server: records each request and answers ``code``
    with ``body``, or holds the request when ``hold`` is set.
    """

    isLeaf = True

    def __init__(self, code: int = 200, body: bytes = b"", hold: bool = False) -> None:
        super().__init__()
        self.code = code
        self.body = body
        self.hold = hold
        self.requests: list[dict] = []
        self.held: list = []

    def render(self, request):
        self.requests.append(
            {
                "method": request.method,
                "uri": request.uri,
                "headers": {
                    name.lower(): values
                    for name, values in request.requestHeaders.getAllRawHeaders()
                },
                "body": request.content.read(),
            }
        )
        request.setResponseCode(self.code)
        if self.code in (301, 302, 303, 307, 308):
            request.setHeader(b"Location", b"http://elsewhere.example.net/other")
        if self.hold:
            self.held.append(request)
            return NOT_DONE_YET
        return self.body


def connector_for(
    end, clock, name: str = "platform", token_client=None, **settings
) -> HttpConnector:
    """
    An HttpConnector named ``name`` with ``settings``, POSTing through the
    real client to ``end`` (a resource served in memory) or through ``end``
    itself if it is a client.
    """
    settings.setdefault("url", "http://end.example.com/dm")
    client = end if hasattr(end, "post") else InMemoryEndServer(end).client(clock)
    return HttpConnector(
        HttpConnectorConfig(name, **settings), client, clock, token_client=token_client
    )


class HttpConnectorTests(SynchronousTestCase):
    """HttpConnector POSTs each upload and counts 2xx as accepted."""

    def setUp(self) -> None:
        self.clock = task.Clock()
        self.server = EndServer()
        self.end = InMemoryEndServer(self.server)

    def connector(self, **settings) -> HttpConnector:
        return connector_for(self.end.client(self.clock), self.clock, **settings)

    def deliver(self, profile: DeviceProfile = PROFILE, **settings) -> Deferred:
        return self.connector(**settings).deliver(UPLOAD, profile)

    def only_request(self) -> dict:
        self.assertEqual(len(self.server.requests), 1)
        return self.server.requests[0]

    def assert_no_secrets(self, message: str) -> None:
        for secret in SECRETS + ("/dm", "key=", "129336"):
            self.assertNotIn(secret, message)
        self.assertNotIn("\n", message)

    def test_one_post(self) -> None:
        """An upload is one POST to the configured URL."""
        self.successResultOf(self.deliver())
        request = self.only_request()
        self.assertEqual((request["method"], request["uri"]), (b"POST", b"/dm"))

    def test_content_type(self) -> None:
        """The POST's Content-Type is application/json."""
        self.successResultOf(self.deliver())
        self.assertEqual(self.only_request()["headers"][b"content-type"], [b"application/json"])

    def test_body(self) -> None:
        """The body is the upload's OEM JSON document."""
        self.successResultOf(self.deliver())
        body = self.only_request()["body"]
        self.assertEqual(body, oem_document(UPLOAD.hello, UPLOAD.records))
        document = json.loads(body)
        self.assertEqual(document["SerNo"], 129336)
        self.assertEqual(document["IMEI"], "353323081669730")
        self.assertEqual([r["SeqNo"] for r in document["Records"]], [565, 566])

    def test_form_body(self) -> None:
        """body = form posts DeviceData=<the OEM JSON> form-encoded, which a form parser reads back exactly."""
        self.successResultOf(self.deliver(body="form"))
        request = self.only_request()
        self.assertEqual(
            request["headers"][b"content-type"], [b"application/x-www-form-urlencoded"]
        )
        fields = parse_qs(request["body"].decode("ascii"), strict_parsing=True)
        self.assertEqual(list(fields), ["DeviceData"])
        self.assertEqual(
            fields["DeviceData"], [oem_document(UPLOAD.hello, UPLOAD.records).decode("utf-8")]
        )

    def test_form_body_escapes_what_a_form_would_misread(self) -> None:
        """In a form body '&', '=', '+' and spaces of the JSON are percent-encoded (a space as '+')."""
        encoded = form_body(b'{"Text": "a&b=c+d e"}')
        self.assertEqual(encoded, b"DeviceData=%7B%22Text%22%3A+%22a%26b%3Dc%2Bd+e%22%7D")

    def test_one_post_per_upload(self) -> None:
        """Each upload is its own POST."""
        connector = self.connector()
        self.successResultOf(connector.deliver(UPLOAD, PROFILE))
        self.successResultOf(connector.deliver(UPLOAD, PROFILE))
        self.assertEqual(len(self.server.requests), 2)

    def test_url_placeholders(self) -> None:
        """[SERIAL], [IMEI], [ICCID] and [CUSTOM2..3] are substituted in the URL."""
        self.successResultOf(
            self.deliver(url="http://end.example.com/[SERIAL]/[IMEI]?i=[ICCID]&c=[CUSTOM2]-[CUSTOM3]")
        )
        self.assertEqual(
            self.only_request()["uri"],
            b"/129336/353323081669730?i=89610185001824844630&c=two-three",
        )

    def test_url_value_encoded(self) -> None:
        """A custom value with '/', '?', '&', '=' and spaces is percent-encoded in the URL."""
        self.successResultOf(self.deliver(url="http://end.example.com/d/[CUSTOM1]?k=[CUSTOM1]"))
        self.assertEqual(
            self.only_request()["uri"],
            b"/d/cust%2Fone%3Fa%3D1%26b%3D2%20x?k=cust%2Fone%3Fa%3D1%26b%3D2%20x",
        )

    def test_headers(self) -> None:
        """header1..3 are sent with their placeholders substituted verbatim."""
        self.successResultOf(
            self.deliver(
                headers=(
                    ("X-Imei", "[IMEI]"),
                    ("X-Custom", "[CUSTOM1]"),
                    ("X-Static", "fixed value"),
                )
            )
        )
        headers = self.only_request()["headers"]
        self.assertEqual(headers[b"x-imei"], [b"353323081669730"])
        self.assertEqual(headers[b"x-custom"], [b"cust/one?a=1&b=2 x"])
        self.assertEqual(headers[b"x-static"], [b"fixed value"])

    def test_repeated_header(self) -> None:
        """Two headers of the same name are both sent."""
        self.successResultOf(self.deliver(headers=(("X-Tag", "a"), ("X-Tag", "[SERIAL]"))))
        self.assertEqual(self.only_request()["headers"][b"x-tag"], [b"a", b"129336"])

    def test_content_type_header(self) -> None:
        """A configured Content-Type replaces application/json."""
        self.successResultOf(self.deliver(headers=(("content-type", "application/vnd.dm+json"),)))
        self.assertEqual(
            self.only_request()["headers"][b"content-type"], [b"application/vnd.dm+json"]
        )

    def test_header_cr(self) -> None:
        """A substituted header value containing CR fails with DeliveryFailed and sends nothing."""
        profile = DeviceProfile("ok\rX-Injected: 1")
        failure = self.failureResultOf(
            self.deliver(profile, headers=(("X-Custom", "[CUSTOM1]"),)), DeliveryFailed
        )
        self.assertIn("X-Custom", str(failure.value))
        self.assertNotIn("Injected", str(failure.value))
        self.assertEqual(self.server.requests, [])

    def test_header_lf(self) -> None:
        """A substituted header value containing LF fails with DeliveryFailed and sends nothing."""
        profile = DeviceProfile("", "", "a\nb")
        self.failureResultOf(
            self.deliver(profile, headers=(("X-Ok", "1"), ("X-Bad", "[CUSTOM3]"))), DeliveryFailed
        )
        self.assertEqual(self.server.requests, [])

    def test_basic_auth(self) -> None:
        """username and password become a Basic Authorization header."""
        self.successResultOf(self.deliver(username="relay", password="s3cret"))
        self.assertEqual(
            self.only_request()["headers"][b"authorization"],
            [b"Basic " + b64encode(b"relay:s3cret")],
        )

    def test_basic_auth_templates(self) -> None:
        """username and password are templates over the device's fields."""
        self.successResultOf(self.deliver(username="dev-[SERIAL]", password="[CUSTOM2]:[CUSTOM3]"))
        self.assertEqual(
            self.only_request()["headers"][b"authorization"],
            [b"Basic " + b64encode(b"dev-129336:two:three")],
        )

    def test_basic_auth_username_only(self) -> None:
        """A username without a password still sends Basic credentials."""
        self.successResultOf(self.deliver(username="relay"))
        self.assertEqual(
            self.only_request()["headers"][b"authorization"], [b"Basic " + b64encode(b"relay:")]
        )

    def test_no_auth(self) -> None:
        """Without username and password no Authorization header is sent."""
        self.successResultOf(self.deliver())
        self.assertNotIn(b"authorization", self.only_request()["headers"])

    def test_success_codes(self) -> None:
        """200, 201, 202 and 204 all count as accepted."""
        for code in (200, 201, 202, 204):
            self.server.code = code
            self.assertIsNone(self.successResultOf(self.deliver()), code)

    def test_failure_codes(self) -> None:
        """500, 404, 301 and 303 fail with DeliveryFailed naming the code but no path or secret."""
        for code in (500, 404, 301, 303):
            self.server.requests.clear()
            self.server.code = code
            failure = self.failureResultOf(
                self.deliver(SECRET_PROFILE, **SECRET_CONFIG), DeliveryFailed
            )
            message = str(failure.value)
            self.assertIn(str(code), message)
            self.assertIn("connector platform", message)
            self.assert_no_secrets(message)
            self.assertEqual(len(self.server.requests), 1, code)

    def test_redirect_not_followed(self) -> None:
        """A redirect is not followed: only the one POST is made and the upload fails."""
        self.server.code = 302
        self.failureResultOf(self.deliver(), DeliveryFailed)
        self.assertEqual([r["method"] for r in self.server.requests], [b"POST"])

    def test_refusal_quotes_body(self) -> None:
        """A refusal's message quotes the start of the answer on one line."""
        self.server.code = 400
        self.server.body = b"bad\r\nrequest " + b"x" * 1000
        message = str(self.failureResultOf(self.deliver(), DeliveryFailed).value)
        self.assertIn("400: bad request xxx", message)
        self.assertNotIn("\n", message)
        self.assertLess(message.count("x"), 210)

    def test_retryable_statuses(self) -> None:
        """408, 429 and 5xx refusals are retryable; 400, 404 and 499 are not (the spool dead-letters them)."""
        verdicts = {}
        for code in (400, 404, 407, 408, 409, 428, 429, 430, 499, 500, 503, 599):
            self.server.code = code
            verdicts[code] = self.failureResultOf(self.deliver(), DeliveryFailed).value.retryable
        self.assertEqual(
            [code for code, retryable in verdicts.items() if retryable],
            [408, 429, 500, 503, 599],
        )

    def test_body_read(self) -> None:
        """The delivery fires only once the whole answer body has been read."""
        self.server.hold = True
        done = self.deliver()
        [request] = self.server.held
        request.write(b"partial")
        self.end.flush()
        self.assertNoResult(done)
        request.write(b" answer")
        request.finish()
        self.end.flush()
        self.successResultOf(done)

    def test_timeout(self) -> None:
        """A request that is never answered fails after `timeout` with DeliveryFailed saying so."""
        self.server.hold = True
        done = self.deliver(SECRET_PROFILE, timeout=7.0, **SECRET_CONFIG)
        self.clock.advance(6.9)
        self.assertNoResult(done)
        self.clock.advance(0.2)
        message = str(self.failureResultOf(done, DeliveryFailed).value)
        self.assertIn("did not answer within 7s", message)
        self.assertIn("end.example.com:8443", message)
        self.assert_no_secrets(message)

    def test_timeout_reading_body(self) -> None:
        """An answer whose body never ends fails with DeliveryFailed once `timeout` passes."""
        self.server.hold = True
        done = self.deliver(timeout=5.0)
        [request] = self.server.held
        request.write(b"never ending")
        self.end.flush()
        self.clock.advance(5.1)
        self.assertIn("within 5s", str(self.failureResultOf(done, DeliveryFailed).value))

    def test_one_timer_per_post(self) -> None:
        """A POST in flight, body partly read, holds one timer: the connect, answer and body share it."""
        self.server.hold = True
        done = self.deliver(timeout=7.0)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        [request] = self.server.held
        request.write(b"partial")
        self.end.flush()
        [timer] = self.clock.getDelayedCalls()
        self.assertEqual(timer.getTime(), 7.0)
        request.finish()
        self.end.flush()
        self.successResultOf(done)

    def test_timeout_cancelled_after_answer(self) -> None:
        """An answered request leaves no timer behind."""
        self.successResultOf(self.deliver())
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_client_raises(self) -> None:
        """A client that raises at once (say, on a URL it cannot encode) gives DeliveryFailed."""

        class Client:
            def post(self, url, headers, body, timeout):
                raise ValueError("cannot encode host")

        connector = connector_for(Client(), self.clock)
        failure = self.failureResultOf(connector.deliver(UPLOAD, PROFILE), DeliveryFailed)
        self.assertIn("cannot encode host", str(failure.value))

    def test_cancel(self) -> None:
        """Cancelling a delivery abandons the request and leaves no timer behind."""
        self.server.hold = True
        done = self.deliver()
        done.cancel()
        self.failureResultOf(done)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_link(self) -> None:
        """open_link gives a stateless link that POSTs through this connector."""
        link = self.connector().open_link(HELLO, lambda reason: None)
        self.assertIsInstance(link, StatelessLink)
        self.successResultOf(link.deliver(UPLOAD, PROFILE))
        self.assertEqual(len(self.server.requests), 1)

    def test_other_device(self) -> None:
        """The placeholders take the delivering device's values."""
        hello = Hello(42, "111", "222")
        upload = Upload(hello, UPLOAD.frames, UPLOAD.records, 0.0)
        connector = self.connector(url="http://end.example.com/[SERIAL]", headers=(("X-I", "[IMEI]"),))
        self.successResultOf(connector.deliver(upload, DeviceProfile()))
        request = self.only_request()
        self.assertEqual((request["uri"], request["headers"][b"x-i"]), (b"/42", [b"111"]))
        self.assertEqual(json.loads(request["body"])["SerNo"], 42)


@implementer(IHandshakeListener)
class HandshakeRecorder(Protocol):
    """Notes whether its TLS handshake completed."""

    completed = False

    def handshakeCompleted(self) -> None:  # noqa: N802 - Twisted's name
        self.completed = True


class HttpConnectionErrorTests(SynchronousTestCase):
    """Connection-level failures become DeliveryFailed without secrets."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        config = dict(SECRET_CONFIG, url="http://end.example.com:8080/dm/[SERIAL]?key=[CUSTOM1]")
        # The client as built for production: HostnameEndpoint on the reactor.
        client = build_http_client(self.reactor, HttpConnectorConfig("platform", **config))
        self.connector = connector_for(client, self.reactor, **config)
        self.done = self.connector.deliver(UPLOAD, SECRET_PROFILE)

    def assert_failed(self) -> str:
        message = str(self.failureResultOf(self.done, DeliveryFailed).value)
        self.assertIn("end.example.com:8080", message)
        for secret in SECRETS + ("/dm", "key="):
            self.assertNotIn(secret, message)
        self.assertNotIn("\n", message)
        return message

    def connect(self):
        # The memory reactor resolves every host name to 127.0.0.1.
        _, port, factory, _, _ = self.reactor.tcpClients[0]
        self.assertEqual(port, 8080)
        protocol = factory.buildProtocol(IPv4Address("TCP", "192.0.2.7", 8080))
        transport = StringTransport()
        protocol.makeConnection(transport)
        return protocol, transport

    def test_refused(self) -> None:
        """A refused connection fails the upload with DeliveryFailed."""
        factory = self.reactor.tcpClients[0][2]
        factory.clientConnectionFailed(None, Failure(ConnectionRefusedError("192.0.2.7")))
        self.reactor.advance(1)  # HostnameEndpoint gives up on its next attempt tick
        self.assertIn("refused", self.assert_failed().lower())

    def test_closed_before_answer(self) -> None:
        """The end server closing before any answer fails the upload with DeliveryFailed."""
        protocol, transport = self.connect()
        sent = transport.value()
        self.assertTrue(sent.startswith(b"POST /dm/129336?key=TOPSECRET "))
        self.assertTrue(sent.endswith(oem_document(UPLOAD.hello, UPLOAD.records)))
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assert_failed()

    def test_closed_mid_answer(self) -> None:
        """The end server closing in the middle of its answer fails the upload."""
        protocol, _ = self.connect()
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assert_failed()

    def test_garbage_answer(self) -> None:
        """An answer that is not HTTP fails the upload."""
        protocol, transport = self.connect()
        protocol.dataReceived(b"\x02\x55\x01\x08\x00garbage\r\n\r\n")
        self.assertTrue(transport.disconnecting)
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertIn("the answer is not HTTP/1.x", self.assert_failed())

    def test_answer_over_socket(self) -> None:
        """A plain 200 answer over the socket is accepted."""
        protocol, _ = self.connect()
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        self.successResultOf(self.done)


class FakeContext:
    """Records what a trust root does to an OpenSSL context."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def set_default_verify_paths(self) -> None:
        self.calls.append(("set_default_verify_paths",))

    def load_verify_locations(self, cafile, capath=None) -> None:
        self.calls.append(("load_verify_locations", cafile))


class PlatformTrustPlusCATests(SynchronousTestCase):
    """PlatformTrustPlusCA trusts the system CAs and one file more."""

    def test_adds_both(self) -> None:
        """The context gets the default verify paths and then the CA file."""
        context = FakeContext()
        PlatformTrustPlusCA("/etc/oemrelay/ca.pem")._addCACertsToContext(context)
        self.assertEqual(
            context.calls,
            [("set_default_verify_paths",), ("load_verify_locations", "/etc/oemrelay/ca.pem")],
        )

    def test_real_context(self) -> None:
        """Twisted's TLS options accept it and load a real CA certificate with it."""
        options = CertificateOptions(trustRoot=PlatformTrustPlusCA(os.path.join(FAKE_CAS, "thing1.pem")))
        self.assertIsInstance(options.getContext(), SSL.Context)

    def test_real_context_bad_file(self) -> None:
        """A file without certificates makes the context fail (the file really is read)."""
        options = CertificateOptions(
            trustRoot=PlatformTrustPlusCA(os.path.join(FAKE_CAS, "not-a-certificate"))
        )
        self.assertRaises(SSL.Error, options.getContext)


class BuildHttpClientTests(SynchronousTestCase):
    """build_http_client makes a verified client with its own pool."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.trust_roots: list = []
        real_policy = tls_module.BrowserLikePolicyForHTTPS

        def recording_policy(trustRoot=None):  # noqa: N803 - Twisted's name
            self.trust_roots.append(trustRoot)
            return real_policy(trustRoot=trustRoot)

        self.patch(tls_module, "BrowserLikePolicyForHTTPS", recording_policy)

    def post(self, client: HttpClient, url: str = "http://end.example.com/dm") -> Deferred:
        return client.post(url, {}, b"{}", 10)

    def test_client(self) -> None:
        """It returns the lean HttpClient, connecting through the given reactor."""
        client = build_http_client(self.reactor, HttpConnectorConfig("h", "https://h/"))
        self.assertIsInstance(client, HttpClient)
        self.post(client)
        self.assertEqual(len(self.reactor.tcpClients), 1)

    def test_pool_size(self) -> None:
        """pool_size caps the connections opened (and requests sent) to one end server."""
        client = build_http_client(
            self.reactor, HttpConnectorConfig("h", "https://h/", pool_size=3)
        )
        waiting = [self.post(client) for _ in range(4)]
        self.assertEqual(len(self.reactor.tcpClients), 3)
        self.assertNoResult(waiting[3])
        self.assertEqual(client.in_flight("http://end.example.com/"), 3)

    def test_default_pool_size(self) -> None:
        """The default pool_size is 256 connections."""
        client = build_http_client(self.reactor, HttpConnectorConfig("h", "https://h/"))
        for _ in range(257):
            self.post(client)
        self.assertEqual(len(self.reactor.tcpClients), 256)

    def test_quiet_connections(self) -> None:
        """Opening a connection logs nothing (no "Starting factory" line per connection)."""
        events: list = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.post(build_http_client(self.reactor, HttpConnectorConfig("h", "https://h/")))
        factory = self.reactor.tcpClients[0][2]
        factory.doStart()
        factory.buildProtocol(IPv4Address("TCP", "192.0.2.7", 80))
        self.assertEqual([e for e in events if e.get("log_level", LogLevel.debug) >= LogLevel.info], [])

    def test_token_client_quiet_too(self) -> None:
        """The OAuth2 token client's connections log nothing either (the check above can fail: a noisy factory does)."""
        events: list = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        client = build_token_client(self.reactor, HttpConnectorConfig("h", "https://h/"))
        client.post("http://end.example.com/token", data=b"x")
        self.reactor.tcpClients[0][2].doStart()
        self.assertEqual([e for e in events if e.get("log_level", LogLevel.debug) >= LogLevel.info], [])
        noisy = Factory()
        noisy.doStart()
        self.assertEqual(len([e for e in events if "Starting factory" in e.get("log_format", "")]), 1)

    def test_platform_trust(self) -> None:
        """Without ca_file, HTTPS trusts the platform's CAs only."""
        build_http_client(self.reactor, HttpConnectorConfig("h", "https://h/"))
        self.assertEqual(self.trust_roots, [None])

    def test_ca_file(self) -> None:
        """With ca_file, HTTPS trusts the platform's CAs plus that file."""
        build_http_client(self.reactor, HttpConnectorConfig("h", "https://h/", ca_file="/x/ca.pem"))
        [trust] = self.trust_roots
        self.assertIsInstance(trust, PlatformTrustPlusCA)
        context = FakeContext()
        trust._addCACertsToContext(context)
        self.assertIn(("load_verify_locations", "/x/ca.pem"), context.calls)

    def test_client_connects(self) -> None:
        """The client connects through the given reactor to the URL's port, or the scheme's."""
        client = build_http_client(self.reactor, HttpConnectorConfig("h", "https://h/"))
        self.post(client, "https://end.example.com:8443/x")
        self.post(client, "https://end.example.com/x")
        self.post(client, "http://end.example.com/x")
        self.assertEqual([port for _, port, *_ in self.reactor.tcpClients], [8443, 443, 80])

    def test_https_is_tls(self) -> None:
        """An https URL's connection starts TLS, naming the host (SNI); an http one sends the request in the clear."""
        client = build_http_client(self.reactor, HttpConnectorConfig("h", "https://h/"))
        for url in ("https://end.example.com:8443/x", "http://end.example.com/x"):
            self.post(client, url)
        sent = []
        for _, port, factory, _, _ in self.reactor.tcpClients:
            protocol = factory.buildProtocol(IPv4Address("TCP", "192.0.2.7", port))
            transport = StringTransport()
            protocol.makeConnection(transport)
            sent.append(transport.value())
        tls, plain = sent
        self.assertEqual(tls[:1], b"\x16")  # a TLS handshake record
        self.assertIn(b"end.example.com", tls)
        self.assertNotIn(b"POST", tls)
        self.assertTrue(plain.startswith(b"POST /x HTTP/1.1\r\nHost: end.example.com\r\n"), plain)

    def test_build_connector(self) -> None:
        """build_connector gives an HttpConnector for an http section."""
        connector = build_connector(HttpConnectorConfig("h", "https://h/"), self.reactor, 65535)
        self.assertIsInstance(connector, HttpConnector)
        self.assertEqual(connector.name, "h")


class StopServiceTests(SynchronousTestCase):
    """Stopping the connector closes its connections."""

    def setUp(self) -> None:
        self.clock = task.Clock()
        self.server = EndServer()
        self.end = InMemoryEndServer(self.server)
        self.connector = connector_for(self.end.client(self.clock), self.clock)
        self.connector.startService()

    def test_closes_idle_connections(self) -> None:
        """stopService closes the idle connection and fires once it has closed."""
        self.successResultOf(self.connector.deliver(UPLOAD, PROFILE))
        [pump] = self.end.pumps
        self.assertFalse(pump.serverIO.disconnected)
        self.successResultOf(self.connector.stopService())
        self.assertTrue(pump.serverIO.disconnected)
        self.assertFalse(self.connector.running)

    def test_waits_for_request_in_flight(self) -> None:
        """A request in flight at stop is answered, then its connection closes and the stop completes."""
        self.server.hold = True
        done = self.connector.deliver(UPLOAD, PROFILE)
        stopped = self.connector.stopService()
        self.assertNoResult(stopped)
        [request] = self.server.held
        request.finish()
        self.end.flush()
        self.successResultOf(done)
        self.successResultOf(stopped)
        self.assertTrue(self.end.pumps[0].serverIO.disconnected)

    def test_request_in_flight_times_out(self) -> None:
        """A request never answered ends the stop when its timeout aborts it."""
        self.server.hold = True
        done = self.connector.deliver(UPLOAD, PROFILE)
        stopped = self.connector.stopService()
        self.clock.advance(10)
        self.failureResultOf(done, DeliveryFailed)
        self.end.flush()
        self.successResultOf(stopped)

    def test_nothing_opened(self) -> None:
        """Without connections, the stop completes at once."""
        self.successResultOf(self.connector.stopService())


#: An IoT Hub connector for hub 'myhub'; extra keys are appended.
IOTHUB_SECTION = "[connector:hub]\ntype = azure-iothub\nhub = myhub\n"


class AzureSasConnectorTests(SynchronousTestCase):
    """An azure-sas connector signs each device's POST with the key in its profile."""

    def setUp(self) -> None:
        self.clock = clock_at()
        self.hub = FakeIoTHub({"dev1": KEY_1}, {"device": POLICY_KEY}, clock=self.clock)
        self.end = InMemoryEndServer(self.hub)

    def connector(self, section: str = IOTHUB_SECTION) -> HttpConnector:
        config = config_from_string(section).connectors["hub"]
        return HttpConnector(config, self.end.client(self.clock), self.clock)

    def deliver(self, profile: DeviceProfile, section: str = IOTHUB_SECTION) -> Deferred:
        return self.connector(section).deliver(UPLOAD, profile)

    def authorizations(self) -> list[str]:
        return [message.headers["authorization"][0] for message in self.hub.messages]

    def test_device_key_accepted(self) -> None:
        """The device's key from custom3 makes a SAS the hub accepts; the upload is delivered."""
        self.successResultOf(self.deliver(DeviceProfile(custom1="dev1", custom3=KEY_1)))
        self.assertEqual(self.hub.rejections, [])
        [message] = self.hub.messages
        self.assertEqual(
            (message.device_id, message.body),
            ("dev1", oem_document(UPLOAD.hello, UPLOAD.records)),
        )
        self.assertTrue(self.authorizations()[0].startswith("SharedAccessSignature sr="))

    def test_message_id(self) -> None:
        """With iothub the request carries iothub-messageid dm-<serial>-<first seq>."""
        self.successResultOf(self.deliver(DeviceProfile(custom1="dev1", custom3=KEY_1)))
        self.assertEqual(UPLOAD.first_seq, 565)
        self.assertEqual(self.hub.messages[0].message_id, "dm-129336-565")

    def test_no_message_id_without_iothub(self) -> None:
        """An http connector with auth = azure-sas but not iothub sends no iothub-messageid."""
        section = (
            "[connector:hub]\ntype = http\nauth = azure-sas\nurl = https://myhub.azure-devices.net"
            "/devices/[CUSTOM1]/messages/events?api-version=2021-04-12\n"
        )
        self.successResultOf(self.deliver(DeviceProfile(custom1="dev1", custom3=KEY_1), section))
        [message] = self.hub.messages
        self.assertIsNone(message.message_id)

    def test_wrong_key(self) -> None:
        """A wrong key fails with DeliveryFailed naming the 401, with no key or token in it."""
        failure = self.failureResultOf(
            self.deliver(DeviceProfile(custom1="dev1", custom3=KEY_2)), DeliveryFailed
        )
        message = str(failure.value)
        self.assertIn("401", message)
        self.assertIn("myhub.azure-devices.net", message)
        for secret in (KEY_1, KEY_2, "SharedAccessSignature", "sig=", "/devices"):
            self.assertNotIn(secret, message)
        self.assertNotIn("\n", message)
        self.assertEqual([r.reason for r in self.hub.rejections], ["wrong signature"])
        self.assertEqual(self.hub.messages, [])

    def test_no_key(self) -> None:
        """A device without a key fails with DeliveryFailed and nothing is sent."""
        failure = self.failureResultOf(self.deliver(DeviceProfile(custom1="dev1")), DeliveryFailed)
        self.assertIn("no SAS key", str(failure.value))
        self.assertIn("129336", str(failure.value))
        self.assertEqual(self.hub.requests, 0)

    def test_key_not_base64(self) -> None:
        """A key that is not base64 fails with DeliveryFailed, not quoting it, and nothing is sent."""
        profile = DeviceProfile(custom1="dev1", custom3="not*base64*s3cret")
        failure = self.failureResultOf(self.deliver(profile), DeliveryFailed)
        self.assertIn("base64", str(failure.value))
        self.assertNotIn("s3cret", str(failure.value))
        self.assertEqual(self.hub.requests, 0)

    def test_preset_signature(self) -> None:
        """A complete 'SharedAccessSignature ...' in custom3 is sent as it is."""
        preset = sas_token("myhub.azure-devices.net/devices/dev1", KEY_1, NOW + 600)
        self.successResultOf(self.deliver(DeviceProfile(custom1="dev1", custom3=preset)))
        self.assertEqual(self.authorizations(), [preset])

    def test_policy_key(self) -> None:
        """A policy key with sas_policy makes a token ending &skn=<policy> that the hub accepts."""
        section = IOTHUB_SECTION + f"sas_key = {POLICY_KEY}\nsas_policy = device\n"
        self.successResultOf(self.deliver(DeviceProfile(custom1="dev1"), section))
        [authorization] = self.authorizations()
        self.assertTrue(authorization.endswith("&skn=device"), authorization)
        self.assertEqual(self.hub.rejections, [])

    def test_token_cached(self) -> None:
        """The same token is sent until the renewal point (ttl less 300 s), then a new one."""
        connector = self.connector()
        profile = DeviceProfile(custom1="dev1", custom3=KEY_1)
        self.successResultOf(connector.deliver(UPLOAD, profile))
        self.clock.advance(3299)
        self.successResultOf(connector.deliver(UPLOAD, profile))
        self.clock.advance(1)
        self.successResultOf(connector.deliver(UPLOAD, profile))
        first, second, third = self.authorizations()
        self.assertEqual(first, second)
        self.assertNotEqual(second, third)
        self.assertIn(f"se={NOW + 3300 + 3600}", third)
        self.assertEqual(self.hub.rejections, [])


#: The OAuth2 client's secret at the fake authorization server.
CLIENT_SECRET = "cl1ent+s3cret/=value"


class OAuth2ConnectorTests(SynchronousTestCase):
    """An oauth2 connector posts with a shared bearer token, fetched again once on 401."""

    def setUp(self) -> None:
        self.clock = clock_at()
        self.server = FakeOAuth({"relay": CLIENT_SECRET}, clock=self.clock)
        self.connector = self.oauth_connector()

    def oauth_connector(self, client_secret: str = CLIENT_SECRET) -> HttpConnector:
        # Tokens come through treq (not on the hot path), uploads through the client.
        return connector_for(
            self.server,
            self.clock,
            token_client=StubTreq(self.server),
            url="https://api.example.com/api/telemetry/[SERIAL]",
            auth="oauth2",
            token_url="https://login.example.com/token",
            client_id="relay",
            client_secret=client_secret,
        )

    def deliver(self) -> Deferred:
        return self.connector.deliver(UPLOAD, PROFILE)

    def assert_no_secrets(self, message: str) -> None:
        self.assertNotIn(CLIENT_SECRET, message)
        for token in self.server.issued:
            self.assertNotIn(token, message)
        self.assertNotIn("Bearer", message)
        self.assertNotIn("\n", message)

    def test_first_upload(self) -> None:
        """The first upload fetches a token and posts with it as Bearer."""
        self.successResultOf(self.deliver())
        self.assertEqual(len(self.server.token_requests), 1)
        self.assertEqual(self.server.token_requests[0].client_id, "relay")
        [accepted] = self.server.accepted
        self.assertEqual(
            (accepted.method, accepted.path, accepted.token),
            ("POST", "/api/telemetry/129336", self.server.issued[0]),
        )
        self.assertEqual(accepted.body, oem_document(UPLOAD.hello, UPLOAD.records))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_token_reused(self) -> None:
        """The second upload reuses the token: one token request for both."""
        self.successResultOf(self.deliver())
        self.successResultOf(self.deliver())
        self.assertEqual(len(self.server.token_requests), 1)
        self.assertEqual([a.token for a in self.server.accepted], [self.server.issued[0]] * 2)

    def test_refetch_after_revocation(self) -> None:
        """After a revocation the upload's 401 fetches one new token and succeeds with it."""
        self.successResultOf(self.deliver())
        self.server.revoke_all()
        self.successResultOf(self.deliver())
        self.assertEqual(self.server.refused, 1)
        self.assertEqual(len(self.server.token_requests), 2)
        self.assertEqual([a.token for a in self.server.accepted], self.server.issued)

    def test_one_refetch_only(self) -> None:
        """A resource that keeps answering 401 fails the upload after one refetch: two POSTs."""
        self.server.is_valid = lambda token: False
        failure = self.failureResultOf(self.deliver(), DeliveryFailed)
        message = str(failure.value)
        self.assertIn("401", message)
        self.assertIn("api.example.com", message)
        self.assert_no_secrets(message)
        self.assertEqual(self.server.refused, 2)
        self.assertEqual(len(self.server.token_requests), 2)
        self.assertEqual(self.server.accepted, [])

    def test_token_endpoint_fails(self) -> None:
        """A failing token endpoint fails the upload without a secret and without a POST."""
        self.server.token_answer = (500, b'{"error": "temporarily_unavailable"}')
        failure = self.failureResultOf(self.deliver(), DeliveryFailed)
        message = str(failure.value)
        self.assertIn("connector platform", message)
        self.assertIn("500", message)
        self.assert_no_secrets(message)
        self.assertEqual((self.server.refused, self.server.accepted), (0, []))

    def test_wrong_client_secret(self) -> None:
        """A refused client secret fails the upload after one token request, not quoting it."""
        self.connector = self.oauth_connector("wr0ng-s3cret")
        failure = self.failureResultOf(self.deliver(), DeliveryFailed)
        message = str(failure.value)
        self.assertIn("invalid_client", message)
        self.assertNotIn("wr0ng-s3cret", message)
        self.assert_no_secrets(message)
        self.assertEqual(len(self.server.token_requests), 1)
        self.assertEqual((self.server.refused, self.server.accepted), (0, []))


class BasicAuthConfigTests(SynchronousTestCase):
    """Basic credentials from an http section with auth left empty still work."""

    def test_templates(self) -> None:
        """username relay-[SERIAL] and password [CUSTOM2] are sent as Basic credentials."""
        config = config_from_string(
            "[connector:platform]\ntype = http\nurl = http://end.example.com/dm\n"
            "username = relay-[SERIAL]\npassword = [CUSTOM2]\n"
        ).connectors["platform"]
        self.assertEqual(config.auth, "basic")
        server = EndServer()
        clock = task.Clock()
        connector = HttpConnector(config, InMemoryEndServer(server).client(clock), clock)
        self.successResultOf(connector.deliver(UPLOAD, PROFILE))
        [request] = server.requests
        self.assertEqual(
            request["headers"][b"authorization"], [b"Basic " + b64encode(b"relay-129336:two")]
        )


class NoCookiesTests(SynchronousTestCase):
    """The clients build_http_client and build_token_client make keep no cookies between requests."""

    def two_requests(self, reactor: MemoryReactorClock, post) -> bytes:
        """
        POST twice, the first answer setting a cookie.

        :return: the second request as sent.
        """
        first = post("http://end.example.com/a")
        factory = reactor.tcpClients[0][2]
        protocol = factory.buildProtocol(IPv4Address("TCP", "192.0.2.7", 80))
        transport = StringTransport()
        protocol.makeConnection(transport)
        protocol.dataReceived(
            b"HTTP/1.1 200 OK\r\nSet-Cookie: session=abc123; Path=/\r\n"
            b"Content-Length: 2\r\n\r\nok"
        )
        self.successResultOf(first)
        transport.clear()
        post("http://end.example.com/b")
        if len(reactor.tcpClients) == 2:  # a client that does not keep connections
            factory = reactor.tcpClients[1][2]
            protocol = factory.buildProtocol(IPv4Address("TCP", "192.0.2.7", 80))
            transport = StringTransport()
            protocol.makeConnection(transport)
        second = transport.value()
        self.assertTrue(second.startswith(b"POST /b "), second)
        return second

    def treq_post(self, client: HTTPClient):
        def post(url: str) -> Deferred:
            return client.post(url, data=b"x").addCallback(lambda response: response.content())

        return post

    def test_cookie_not_sent_back(self) -> None:
        """After an answer with Set-Cookie the next upload carries no Cookie header."""
        reactor = MemoryReactorClock()
        client = build_http_client(reactor, HttpConnectorConfig("h", "http://end.example.com/"))
        second = self.two_requests(reactor, lambda url: client.post(url, {}, b"{}", 10))
        self.assertEqual(len(reactor.tcpClients), 1)  # the pooled connection is reused
        self.assertNotIn(b"cookie:", second.lower())
        self.assertNotIn(b"abc123", second)

    def test_token_client_sends_no_cookie(self) -> None:
        """The OAuth2 token client does not send a cookie back either."""
        reactor = MemoryReactorClock()
        client = build_token_client(reactor, HttpConnectorConfig("h", "http://end.example.com/"))
        second = self.two_requests(reactor, self.treq_post(client))
        self.assertNotIn(b"cookie:", second.lower())

    def test_default_client_would_send_it(self) -> None:
        """A treq client with its default jar does send the cookie back (the checks above can fail)."""
        reactor = MemoryReactorClock()
        pool = HTTPConnectionPool(reactor, persistent=True)
        client = HTTPClient(Agent(reactor, pool=pool))
        second = self.two_requests(reactor, self.treq_post(client))
        self.assertIn(b"Cookie: session=abc123", second)


class ClientCertificateTests(SynchronousTestCase):
    """With client_cert, build_http_client presents that certificate (mutual TLS)."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.cert_pem, self.key_pem = client_certificate_pem()
        self.policies: list[ClientCertificatePolicy] = []
        policies = self.policies

        class RecordingPolicy(ClientCertificatePolicy):
            def __init__(self, trust_root, client_certificate) -> None:
                super().__init__(trust_root, client_certificate)
                self.trust_root = trust_root
                policies.append(self)

        self.patch(tls_module, "ClientCertificatePolicy", RecordingPolicy)

    def policy_for(self, **settings) -> ClientCertificatePolicy:
        build_http_client(self.reactor, HttpConnectorConfig("h", "https://h/", **settings))
        [policy] = self.policies
        return policy

    def assert_presents_certificate(self, policy: ClientCertificatePolicy) -> None:
        """A TLS client made by ``policy`` sends SNI and holds the test certificate."""
        creator = policy.creatorForNetloc(b"end.example.com", 443)
        self.assertTrue(IOpenSSLClientConnectionCreator.providedBy(creator))
        protocol = TLSMemoryBIOFactory(creator, True, Factory.forProtocol(Protocol)).buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        self.assertIn(b"end.example.com", transport.value())  # the ClientHello's SNI
        local = protocol.getHandle().get_certificate()
        self.assertEqual(local.to_cryptography(), x509.load_pem_x509_certificate(self.cert_pem))

    def test_combined_file(self) -> None:
        """A combined certificate and key file gives a ClientCertificatePolicy presenting it."""
        policy = self.policy_for(client_cert=write_temp(self, self.cert_pem + self.key_pem))
        self.assertIsInstance(policy, ClientCertificatePolicy)
        self.assert_presents_certificate(policy)

    def test_two_files(self) -> None:
        """client_cert and client_key in two files give a policy presenting the certificate."""
        policy = self.policy_for(
            client_cert=write_temp(self, self.cert_pem), client_key=write_temp(self, self.key_pem)
        )
        self.assert_presents_certificate(policy)

    def test_platform_trust(self) -> None:
        """Without ca_file the server is verified against the platform's CAs."""
        policy = self.policy_for(client_cert=write_temp(self, self.cert_pem + self.key_pem))
        self.assertNotIsInstance(policy.trust_root, PlatformTrustPlusCA)
        self.assertIsNotNone(policy.trust_root)

    def test_ca_file(self) -> None:
        """With ca_file the server is verified against the platform's CAs plus that file."""
        policy = self.policy_for(
            client_cert=write_temp(self, self.cert_pem + self.key_pem),
            ca_file=os.path.join(FAKE_CAS, "thing1.pem"),
        )
        self.assertIsInstance(policy.trust_root, PlatformTrustPlusCA)
        self.assert_presents_certificate(policy)

    def test_server_certificate_and_host_verified(self) -> None:
        """The policy completes a handshake only with a server the CA vouches for, under the host name asked for."""
        from .test_end_to_end_registry import make_pki

        directory = self.mktemp()
        os.mkdir(directory)
        pki = make_pki(directory)
        with open(pki["server_cert"], "rb") as f, open(pki["server_key"], "rb") as g:
            server = PrivateCertificate.loadPEM(f.read() + g.read())
        server_options = CertificateOptions(
            privateKey=server.privateKey.original, certificate=server.original
        )

        def handshake(ca_file: str, host: bytes) -> bool:
            policy = self.policy_for(
                client_cert=pki["client_cert"], client_key=pki["client_key"], ca_file=ca_file
            )
            self.policies.clear()
            ends = []
            for creator, is_client in ((policy.creatorForNetloc(host, 443), True), (server_options, False)):
                protocol = TLSMemoryBIOFactory(
                    creator, is_client, Factory.forProtocol(HandshakeRecorder)
                ).buildProtocol(None)
                protocol.makeConnection(StringTransport())
                ends.append(protocol)
            for _ in range(10):
                for sender, receiver in (ends, ends[::-1]):
                    data = sender.transport.value()
                    sender.transport.clear()
                    if data and not receiver.transport.disconnecting:
                        receiver.dataReceived(data)
            return ends[0].wrappedProtocol.completed and not ends[0].transport.disconnecting

        self.assertTrue(handshake(pki["ca"], b"localhost"))
        self.assertFalse(handshake(pki["ca"], b"end.example.com"))
        self.assertFalse(handshake(pki["other_ca"], b"localhost"))

    def test_without_client_cert(self) -> None:
        """Without client_cert no client certificate policy is made."""
        build_http_client(self.reactor, HttpConnectorConfig("h", "https://h/"))
        self.assertEqual(self.policies, [])


def http_date(seconds: float) -> bytes:
    """An HTTP date (IMF-fixdate) for ``seconds`` since the epoch."""
    return formatdate(seconds, usegmt=True).encode("ascii")


class RetryAfterServer(EndServer):
    """An end server that also sends a Retry-After header with its answer."""

    def __init__(self, code: int, retry_after: bytes | None) -> None:
        super().__init__(code)
        self.retry_after = retry_after

    def render(self, request):
        if self.retry_after is not None:
            request.setHeader(b"Retry-After", self.retry_after)
        return super().render(request)


class RetryableFailureTests(SynchronousTestCase):
    """Which failures the connector marks retryable, and the Retry-After it passes on."""

    def refusal(self, code: int, retry_after: bytes | None = None) -> DeliveryFailed:
        clock = task.Clock()
        clock.advance(NOW)
        connector = connector_for(RetryAfterServer(code, retry_after), clock)
        return self.failureResultOf(connector.deliver(UPLOAD, PROFILE), DeliveryFailed).value

    def test_transient_statuses_retryable(self) -> None:
        """408, 429, 500, 502, 503 and 599 are retryable."""
        for code in (408, 429, 500, 502, 503, 599):
            self.assertTrue(self.refusal(code).retryable, code)

    def test_other_4xx_not_retryable(self) -> None:
        """400, 401, 403, 404, 409, 413 and 428 are final refusals."""
        for code in (400, 401, 403, 404, 409, 413, 428):
            self.assertFalse(self.refusal(code).retryable, code)

    def test_retry_after_seconds(self) -> None:
        """Retry-After: 7 is passed on as 7 seconds."""
        self.assertEqual(self.refusal(503, b"7").retry_after, 7.0)

    def test_retry_after_http_date(self) -> None:
        """Retry-After as an HTTP date is the seconds from now until then."""
        when = http_date(NOW + 12)
        self.assertEqual(self.refusal(429, when).retry_after, 12.0)

    def test_retry_after_past_date_is_zero(self) -> None:
        """An HTTP date already past means retry now, not a negative wait."""
        when = http_date(NOW - 30)
        self.assertEqual(self.refusal(503, when).retry_after, 0.0)

    def test_retry_after_unreadable_ignored(self) -> None:
        """An unreadable Retry-After (or none) leaves the backoff to decide."""
        self.assertIsNone(self.refusal(503, b"soon").retry_after)
        self.assertIsNone(self.refusal(503, b"-5").retry_after)
        self.assertIsNone(self.refusal(503).retry_after)

    def test_retry_after_of_final_refusal_ignored(self) -> None:
        """A 400 carrying Retry-After is still not retried."""
        refusal = self.refusal(400, b"1")
        self.assertFalse(refusal.retryable)
        self.assertIsNone(refusal.retry_after)

    def test_timeout_retryable(self) -> None:
        """A POST that is not answered in time is retryable."""
        clock = task.Clock()
        server = EndServer(hold=True)
        done = connector_for(server, clock, timeout=1.0).deliver(UPLOAD, PROFILE)
        clock.advance(1.1)
        self.assertTrue(self.failureResultOf(done, DeliveryFailed).value.retryable)


class RetryableConnectionErrorTests(HttpConnectionErrorTests):
    """Connection errors are retryable (the scenarios of HttpConnectionErrorTests)."""

    def setUp(self) -> None:
        super().setUp()
        self.retryable: list[bool] = []

        def note(failure: Failure) -> Failure:
            self.retryable.append(failure.value.retryable)
            return failure

        self.done.addErrback(note)

    def assert_failed(self) -> str:
        message = super().assert_failed()
        self.assertEqual(self.retryable, [True])
        return message


def frames_of(*record_groups: list[bytes]) -> tuple:
    """0x04 frames, one per group of raw records."""
    return tuple(Frame(MessageType.DATA_RECORDS, b"".join(group)) for group in record_groups)


class IdempotencyKeyTests(SynchronousTestCase):
    """Every POST carries an Idempotency-Key derived from the serial and the records."""

    def setUp(self) -> None:
        records = parse_data_records(_DATA.payload)
        self.assertEqual(len(records), 2)
        # The capture's two records, as the raw bytes the device sent.
        length = int.from_bytes(_DATA.payload[:2], "little")
        self.raw = [_DATA.payload[:length], _DATA.payload[length:]]
        self.records = tuple(records)

    def key(self, frames: tuple, hello: Hello = HELLO) -> str:
        return http_module.idempotency_key(Upload(hello, frames, self.records, 0.0))

    def test_sent_with_every_post(self) -> None:
        """The POST's Idempotency-Key header is the upload's key."""
        server = EndServer()
        self.successResultOf(connector_for(server, task.Clock()).deliver(UPLOAD, PROFILE))
        [request] = server.requests
        self.assertEqual(
            request["headers"][b"idempotency-key"], [http_module.idempotency_key(UPLOAD).encode()]
        )

    def test_same_records_other_boundaries_same_key(self) -> None:
        """The same records in one 0x04 frame or split across two give the same key."""
        self.assertEqual(self.key(frames_of(self.raw)), self.key(frames_of([self.raw[0]], [self.raw[1]])))

    def test_one_record_different_other_key(self) -> None:
        """Changing one byte of one record gives another key."""
        changed = bytearray(self.raw[1])
        changed[-1] ^= 1
        self.assertNotEqual(self.key(frames_of(self.raw)), self.key(frames_of([self.raw[0], bytes(changed)])))

    def test_other_serial_other_key(self) -> None:
        """The same records from another device give another key."""
        other = parse_hello(capture("hello-51-byte-G50")[5:])
        self.assertNotEqual(self.key(frames_of(self.raw)), self.key(frames_of(self.raw), other))

    def test_key_is_header_safe(self) -> None:
        """The key is 32 lowercase hex characters."""
        key = self.key(frames_of(self.raw))
        self.assertRegex(key, r"^[0-9a-f]{32}$")
