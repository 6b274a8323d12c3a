"""
Tests for :mod:`oemrelay.connectors.http_client`: the answer parser fed
bytes in every segmentation, and the client's pool, timer and keep-alive
handling over in-memory transports and a fake clock.
"""

from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import task
from twisted.internet.defer import CancelledError, Deferred, TimeoutError, succeed
from twisted.internet.error import ConnectionDone, ConnectionLost, ConnectionRefusedError
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from oemrelay.connectors.http_client import (
    Answer,
    BadAnswer,
    HttpClient,
    ResponseParser,
)

from .fakes import InMemoryEndServer

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"

#: Valid answers and what each reads as: (code, body, keep-alive, a header).
ANSWERS = {
    "length": (
        b"HTTP/1.1 201 Created\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\nhello",
        (201, b"hello", True, (b"content-type", [b"text/plain"])),
    ),
    "chunked with extensions and trailers": (
        b"HTTP/1.1 500 Oops\r\nTransfer-Encoding: chunked\r\nRetry-After: 7\r\n\r\n"
        b"4;ext=1\r\nbody\r\nA\r\n0123456789\r\n0\r\nX-Trailer: t\r\nX-Other: u\r\n\r\n",
        (500, b"body0123456789", True, (b"retry-after", [b"7"])),
    ),
    "chunked without trailers": (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        (200, b"abc", True, (b"transfer-encoding", [b"chunked"])),
    ),
    "100 Continue first": (
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n"
        b"HTTP/1.1 204 No Content\r\nX-A: 1\r\n\r\n",
        (204, b"", True, (b"x-a", [b"1"])),
    ),
    "connection close": (
        b"HTTP/1.1 404 Not Found\r\nConnection: close\r\nContent-Length: 3\r\n\r\nnop",
        (404, b"nop", False, (b"connection", [b"close"])),
    ),
    "HTTP/1.0 keep-alive": (
        b"HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\nContent-Length: 0\r\n\r\n",
        (200, b"", True, (b"content-length", [b"0"])),
    ),
    "folded header": (
        b"HTTP/1.1 200 OK\r\nX-Long: one\r\n  two\r\nContent-Length: 0\r\n\r\n",
        (200, b"", True, (b"x-long", [b"one two"])),
    ),
}


def read(data: bytes, **limits) -> Answer:
    """The answer ``data`` reads as, fed at once."""
    parser = ResponseParser(**limits)
    if not parser.feed(data):
        parser.connection_closed()
    return parser.answer()


def summary(answer: Answer, header: bytes) -> tuple:
    return (answer.code, answer.body, answer.keep_alive, (header, answer.headers.get(header)))


class ResponseParserTests(SynchronousTestCase):
    """ResponseParser reads one answer to a POST."""

    def test_answers(self) -> None:
        """Each sample answer reads as expected, fed at once."""
        for name, (data, expected) in ANSWERS.items():
            self.assertEqual(summary(read(data), expected[3][0]), expected, name)

    @settings(max_examples=300, deadline=None)
    @given(
        name=st.sampled_from(sorted(ANSWERS)),
        cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=12),
    )
    def test_any_split_same_answer(self, name: str, cuts: list[int]) -> None:
        """Any split of a valid answer into pieces reads as the same answer, ending on its last byte."""
        data, expected = ANSWERS[name]
        points = sorted({cut % (len(data) + 1) for cut in cuts} | {0, len(data)})
        parser = ResponseParser()
        for start, end in zip(points, points[1:]):
            self.assertFalse(parser.done)
            ended = parser.feed(data[start:end])
            self.assertEqual(ended, end == len(data))
        self.assertEqual(summary(parser.answer(), expected[3][0]), expected)
        self.assertEqual(parser.extra, b"")

    def test_byte_by_byte(self) -> None:
        """Fed one byte at a time, every sample answer ends exactly on its last byte."""
        for name, (data, expected) in ANSWERS.items():
            parser = ResponseParser()
            ended = [parser.feed(data[i : i + 1]) for i in range(len(data))]
            self.assertEqual(ended, [False] * (len(data) - 1) + [True], name)
            self.assertEqual(summary(parser.answer(), expected[3][0]), expected, name)

    def test_until_close(self) -> None:
        """Without Content-Length or chunking the body ends with the connection, which is not reused."""
        parser = ResponseParser()
        self.assertFalse(parser.feed(b"HTTP/1.1 200 OK\r\n\r\nall of "))
        self.assertFalse(parser.feed(b"it"))
        parser.connection_closed()
        answer = parser.answer()
        self.assertEqual((answer.code, answer.body, answer.keep_alive), (200, b"all of it", False))

    def test_http10_closes_by_default(self) -> None:
        """An HTTP/1.0 answer without keep-alive means the connection is not reused."""
        self.assertFalse(read(b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n").keep_alive)

    def test_connection_tokens(self) -> None:
        """Connection: close is found among other tokens, in any case."""
        answer = read(b"HTTP/1.1 200 OK\r\nConnection: Upgrade, CLOSE\r\nContent-Length: 0\r\n\r\n")
        self.assertFalse(answer.keep_alive)

    def test_chunked_and_length_not_reused(self) -> None:
        """Transfer-Encoding and Content-Length together: chunked is read, the connection not reused."""
        answer = read(
            b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"2\r\nok\r\n0\r\n\r\n"
        )
        self.assertEqual((answer.body, answer.keep_alive), (b"ok", False))

    def test_other_transfer_coding_read_until_close(self) -> None:
        """A body encoded otherwise than chunked last is read until the connection closes."""
        parser = ResponseParser()
        self.assertFalse(parser.feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nxyz"))
        parser.connection_closed()
        self.assertEqual(parser.answer().body, b"xyz")

    def test_repeated_equal_length(self) -> None:
        """Content-Length: 2, 2 (repeated by a proxy) is 2."""
        self.assertEqual(read(b"HTTP/1.1 200 OK\r\nContent-Length: 2, 2\r\n\r\nok").body, b"ok")

    def test_no_body_for_204_and_304(self) -> None:
        """204 and 304 have no body, whatever Content-Length says."""
        for code in (b"204", b"304"):
            parser = ResponseParser()
            self.assertTrue(parser.feed(b"HTTP/1.1 " + code + b" X\r\nContent-Length: 5\r\n\r\n"))

    def test_stray_empty_lines_before_status(self) -> None:
        """Empty lines before the status line are skipped."""
        self.assertEqual(read(b"\r\n\r\n" + OK).code, 200)

    def test_extra_bytes_after_answer(self) -> None:
        """Bytes after the end of the answer are kept apart (so the connection is not reused)."""
        parser = ResponseParser()
        self.assertTrue(parser.feed(OK + b"HTTP/1.1 200"))
        self.assertEqual((parser.answer().body, parser.extra), (b"ok", b"HTTP/1.1 200"))

    def test_malformed(self) -> None:
        """Answers that cannot be read fail with a one-line reason quoting nothing of the answer."""
        cases = {
            b"SSH-2.0-OpenSSH\r\n\r\n": "not HTTP/1.x",
            b"HTTP/2.0 200 OK\r\n\r\n": "not HTTP/1.x",
            b"HTTP/1.1 20 OK\r\n\r\n": "status line",
            b"HTTP/1.1 2000 OK\r\n\r\n": "status line",
            b"HTTP/1.1 099 OK\r\n\r\n": "status line",
            b"HTTP/1.1 abc OK\r\n\r\n": "status line",
            b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n": "malformed header line",
            b"HTTP/1.1 200 OK\r\nName : v\r\n\r\n": "malformed header line",
            b"HTTP/1.1 200 OK\r\n folded\r\n\r\n": "continuation line",
            b"HTTP/1.1 200 OK\r\nContent-Length: 1, 2\r\n\r\n": "Content-Length",
            b"HTTP/1.1 200 OK\r\nContent-Length: +5\r\n\r\n": "Content-Length",
            b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n": "Content-Length",
            b"HTTP/1.1 101 Switching\r\n\r\n": "switched protocols",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0x5\r\n": "chunk size",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n": "chunk size",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nokX\r\n": "CRLF",
        }
        for data, reason in cases.items():
            error = self.assertRaises(BadAnswer, ResponseParser().feed, data)
            self.assertIn(reason, str(error), data)
            self.assertNotIn("\n", str(error))
            self.assertNotIn("OK", str(error))

    def test_header_size_boundary(self) -> None:
        """A head of exactly max_head bytes is read, in any two pieces; one byte more fails."""
        head = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nX-Pad: "
        exact = head + b"p" * (100 - len(head))
        self.assertEqual(len(exact), 100)
        for cut in range(len(exact) + 4):
            parser = ResponseParser(max_head=100)
            data = exact + b"\r\n\r\n"
            parser.feed(data[:cut])
            self.assertTrue(parser.feed(data[cut:]), cut)
        over = exact + b"p"
        # Once 3 bytes past the limit nothing but the end could still follow.
        for cut in (len(over) + 3, len(over) + 4):
            parser = ResponseParser(max_head=100)
            error = self.assertRaises(BadAnswer, parser.feed, (over + b"\r\n\r\n")[:cut])
            self.assertIn("over 100 bytes", str(error))

    def test_header_never_ending(self) -> None:
        """A header that never ends fails once past the limit, without waiting for its end."""
        parser = ResponseParser(max_head=1000)
        parser.feed(b"HTTP/1.1 200 OK\r\n")
        self.assertRaises(BadAnswer, lambda: [parser.feed(b"X-A: b\r\n") for _ in range(200)])

    def test_trailer_size_limit(self) -> None:
        """Trailers are held to the header limit too."""
        parser = ResponseParser(max_head=100)
        parser.feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n")
        self.assertRaises(BadAnswer, parser.feed, b"X-T: " + b"t" * 100)

    def test_chunk_line_limit(self) -> None:
        """A chunk size line longer than 1024 bytes fails; 1024 is read."""
        start = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        fits = b"2;" + b"e" * 1022
        self.assertTrue(ResponseParser().feed(start + fits + b"\r\nok\r\n0\r\n\r\n"))
        split = ResponseParser()
        self.assertFalse(split.feed(start + fits + b"\r"))  # its end may still follow
        self.assertTrue(split.feed(b"\nok\r\n0\r\n\r\n"))
        self.assertRaises(BadAnswer, ResponseParser().feed, start + fits + b"e\r\n")
        self.assertRaises(BadAnswer, ResponseParser().feed, start + fits + b"ee")

    def test_body_kept_boundary(self) -> None:
        """At most max_kept_body bytes of the body are kept; the rest is read and dropped."""
        for size, kept in ((10, 10), (11, 10), (9, 9)):
            data = b"HTTP/1.1 500 X\r\nContent-Length: %d\r\n\r\n" % size + b"b" * size
            answer = read(data, max_kept_body=10)
            self.assertEqual((len(answer.body), answer.keep_alive), (kept, True), size)

    def test_huge_body_not_buffered(self) -> None:
        """A 64 MiB chunked body is read through, keeping 64 KiB; the answer ends normally."""
        parser = ResponseParser()
        parser.feed(b"HTTP/1.1 500 X\r\nTransfer-Encoding: chunked\r\n\r\n")
        piece = b"100000\r\n" + b"z" * 0x100000 + b"\r\n"
        for _ in range(64):
            self.assertFalse(parser.feed(piece))
        self.assertTrue(parser.feed(b"0\r\n\r\n"))
        self.assertEqual(len(parser.answer().body), 64 * 1024)

    def test_truncated(self) -> None:
        """A connection closing before the answer ended fails, saying where."""
        cases = {
            b"": "before any answer",
            b"HTTP/1.1 200 OK\r\nContent-": "in the answer's header",
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nab": "body ended",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n": "body ended",
            b"HTTP/1.1 100 Continue\r\n\r\n": "in the answer's header",
        }
        for data, reason in cases.items():
            parser = ResponseParser()
            parser.feed(data)
            error = self.assertRaises(BadAnswer, parser.connection_closed)
            self.assertIn(reason, str(error), data)


class Transport(StringTransport):
    """A StringTransport that counts its writes and keeps its TCP_NODELAY setting."""

    writes = 0
    no_delay = False

    def setTcpNoDelay(self, enabled: bool) -> None:  # noqa: N802 - Twisted's name
        self.no_delay = enabled

    def write(self, data: bytes) -> None:
        self.writes += 1
        super().write(data)


class Endpoints:
    """Endpoints whose connections are StringTransports; connects may be held."""

    def __init__(self) -> None:
        self.addresses: list[tuple[str, str, int]] = []
        self.connections: list[tuple] = []
        self.hold = False
        self.held: list[Deferred] = []
        self.cancelled = 0
        self.refuse = False

    def endpoint_for(self, scheme: str, host: str, port: int):
        endpoints = self

        class Endpoint:
            def connect(self, factory) -> Deferred:
                endpoints.addresses.append((scheme, host, port))
                return endpoints.connect(factory)

        return Endpoint()

    def connect(self, factory) -> Deferred:
        if self.refuse:
            return _failed(ConnectionRefusedError("here"))
        if self.hold:
            held = Deferred(lambda d: setattr(self, "cancelled", self.cancelled + 1))
            held.factory = factory
            self.held.append(held)
            return held
        return succeed(self.join(factory))

    def join(self, factory):
        protocol = factory.buildProtocol(None)
        transport = Transport()
        protocol.makeConnection(transport)
        self.connections.append((protocol, transport))
        return protocol

    def complete(self) -> None:
        held, self.held = self.held, []
        for connecting in held:
            connecting.callback(self.join(connecting.factory))


def _failed(error: Exception) -> Deferred:
    failed: Deferred = Deferred()
    failed.errback(error)
    return failed


URL = "http://end.example.com:8080/dm/1?k=v"


class HttpClientTests(SynchronousTestCase):
    """The client's requests, connections, pool and timer."""

    def setUp(self) -> None:
        self.clock = task.Clock()
        self.endpoints = Endpoints()
        self.client = self.make_client(256)

    def make_client(self, pool_size: int, **settings) -> HttpClient:
        return HttpClient(
            self.clock, pool_size, endpoint_for=self.endpoints.endpoint_for, **settings
        )

    def post(self, url: str = URL, body: bytes = b"{}", timeout: float = 10, headers=None) -> Deferred:
        return self.client.post(url, headers or {}, body, timeout)

    def connection(self, index: int = -1):
        return self.endpoints.connections[index]

    def answer(self, index: int = -1, data: bytes = OK) -> None:
        protocol, _ = self.connection(index)
        protocol.dataReceived(data)

    def test_request_bytes(self) -> None:
        """A request is one write: request line, Host, Content-Length, the headers in order, the body."""
        self.post(headers={b"Content-Type": [b"application/json"], b"X-A": [b"1", b"2"]})
        _, transport = self.connection()
        self.assertEqual(transport.writes, 1)
        self.assertTrue(transport.no_delay)
        self.assertEqual(
            transport.value(),
            b"POST /dm/1?k=v HTTP/1.1\r\nHost: end.example.com:8080\r\nContent-Length: 2\r\n"
            b"Content-Type: application/json\r\nX-A: 1\r\nX-A: 2\r\n\r\n{}",
        )

    def test_header_names_as_before(self) -> None:
        """Header names are sent in Http-Header-Case, with twisted.web's exceptions (as treq sent them)."""
        self.post(headers={b"iothub-messageid": [b"m"], b"x-custom-THING": [b"c"], b"etag": [b"e"]})
        sent = self.connection()[1].value()
        self.assertIn(b"\r\nIothub-Messageid: m\r\nX-Custom-Thing: c\r\nETag: e\r\n", sent)

    def test_request_targets(self) -> None:
        """No path is /, a bare query gets /, a fragment is not sent, non-ASCII is percent-encoded; the default port is not in Host."""
        targets = {
            "http://h": b"POST / HTTP/1.1\r\nHost: h\r\n",
            "http://h?a=1": b"POST /?a=1 HTTP/1.1\r\n",
            "http://h/p#frag": b"POST /p HTTP/1.1\r\n",
            "http://h/caf\u00e9?q=\u00e9": b"POST /caf%C3%A9?q=%C3%A9 HTTP/1.1\r\n",
            "https://h:443/x": b"POST /x HTTP/1.1\r\nHost: h\r\n",
        }
        for url, start in targets.items():
            self.post(url)
            _, transport = self.connection()
            self.assertTrue(transport.value().startswith(start), (url, transport.value()))
            self.answer()
            transport.clear()

    def test_answer(self) -> None:
        """The Deferred fires with the answer: code, headers, body."""
        done = self.post()
        self.answer(data=b"HTTP/1.1 503 Busy\r\nRetry-After: 3\r\nContent-Length: 4\r\n\r\nbusy")
        answer = self.successResultOf(done)
        self.assertEqual((answer.code, answer.header(b"retry-after"), answer.body), (503, b"3", b"busy"))
        self.assertIsNone(answer.header(b"location"))

    def test_connection_reused(self) -> None:
        """Consecutive requests to one server share one connection."""
        for _ in range(3):
            done = self.post()
            self.answer()
            self.successResultOf(done)
        self.assertEqual(len(self.endpoints.connections), 1)
        _, transport = self.connection()
        self.assertEqual(transport.value().count(b"POST "), 3)
        self.assertFalse(transport.disconnecting)

    def test_servers_apart(self) -> None:
        """Each (scheme, host, port) has its own connections; spellings of one server share them."""
        for url in ("http://a/1", "http://A:80/2", "http://b/1", "https://a/1", "http://a:81/1"):
            self.post(url)
        self.assertEqual(
            self.endpoints.addresses,
            [
                ("http", "a", 80),
                ("http", "a", 80),  # the first is busy
                ("http", "b", 80),
                ("https", "a", 443),
                ("http", "a", 81),
            ],
        )
        self.assertEqual(self.client.in_flight("http://a/"), 2)

    def test_pool_cap_and_order(self) -> None:
        """Past pool_size requests wait, and are sent in the order they were made on the freed connections."""
        self.client = self.make_client(2)
        done = [self.post(body=b"%d" % n) for n in range(5)]
        self.assertEqual(len(self.endpoints.connections), 2)
        self.assertEqual(self.client.in_flight(URL), 2)
        for waiting in done[2:]:
            self.assertNoResult(waiting)
        self.answer(1)
        self.successResultOf(done[1])
        self.answer(0)
        self.answer(1)
        self.assertEqual(len(self.endpoints.connections), 2)  # no third connection
        bodies = [
            re.findall(rb"\r\n\r\n(\d)", transport.value())
            for _, transport in self.endpoints.connections
        ]
        self.assertEqual(bodies, [[b"0", b"3"], [b"1", b"2", b"4"]])
        self.assertNoResult(done[4])

    def test_cap_of_one(self) -> None:
        """With pool_size 1 the second request waits for the first to be answered, not just sent."""
        self.client = self.make_client(1)
        self.post()
        second = self.post()
        self.assertEqual(self.connection()[1].value().count(b"POST"), 1)
        self.answer()
        self.assertEqual(self.connection()[1].value().count(b"POST"), 2)
        self.assertNoResult(second)

    def test_waiting_request_times_out(self) -> None:
        """A request that times out while waiting leaves the queue: the next one takes the slot."""
        self.client = self.make_client(1)
        self.post(body=b"A")
        late = self.post(body=b"B", timeout=1)
        then = self.post(body=b"C")
        self.clock.advance(1)
        self.failureResultOf(late, TimeoutError)
        self.answer()
        _, transport = self.connection()
        self.assertTrue(transport.value().endswith(b"\r\n\r\nC"))
        self.assertNoResult(then)
        self.assertEqual(self.client.in_flight(URL), 1)

    def test_timeout_boundary(self) -> None:
        """The request fails at its timeout, not before; its connection is aborted, never reused."""
        done = self.post(timeout=5)
        self.clock.advance(4.999)
        self.assertNoResult(done)
        self.clock.advance(0.001)
        self.failureResultOf(done, TimeoutError)
        _, transport = self.connection()
        self.assertTrue(transport.disconnected)  # aborted
        self.assertEqual(self.client.in_flight(URL), 0)
        self.post()
        self.assertEqual(len(self.endpoints.connections), 2)

    def test_one_timer_covers_body(self) -> None:
        """A body still arriving when the timeout passes fails the request too."""
        done = self.post(timeout=5)
        self.clock.advance(4)
        self.answer(data=b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        self.clock.advance(1)
        self.failureResultOf(done, TimeoutError)

    def test_timeout_covers_connect(self) -> None:
        """A connect still under way at the timeout is cancelled."""
        self.endpoints.hold = True
        done = self.post(timeout=3)
        self.clock.advance(3)
        self.failureResultOf(done, TimeoutError)
        self.assertEqual(self.endpoints.cancelled, 1)
        self.assertEqual(self.client.in_flight(URL), 0)

    def test_timer_cancelled_when_answered(self) -> None:
        """An answered request leaves no timer behind."""
        done = self.post()
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.answer()
        self.successResultOf(done)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_requests_share_one_timer(self) -> None:
        """
        Requests of one timeout hold one reactor timer between them, and each
        still times out at its own deadline, the others unharmed.
        """
        first = self.post(timeout=5)
        self.clock.advance(1)
        second, third = self.post(timeout=5), self.post(timeout=5)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.answer(index=2)
        self.successResultOf(third)
        self.clock.advance(3.999)
        self.assertNoResult(first)
        self.clock.advance(0.001)
        self.failureResultOf(first, TimeoutError)
        self.assertNoResult(second)
        self.clock.advance(1)
        self.failureResultOf(second, TimeoutError)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_shorter_timeout_not_held_behind_a_longer(self) -> None:
        """A request with a shorter timeout, posted after one with a longer, times out at its own."""
        longer = self.post(timeout=10)
        shorter = self.post(timeout=2)
        self.clock.advance(2)
        self.failureResultOf(shorter, TimeoutError)
        self.assertNoResult(longer)

    def test_late_answer_ignored(self) -> None:
        """An answer arriving after the timeout does not fire the request again."""
        done = self.post(timeout=1)
        self.clock.advance(1)
        self.failureResultOf(done, TimeoutError)
        self.answer()  # the transport is aborted; the protocol forgot the request

    def test_cancel_in_flight(self) -> None:
        """Cancelling a request aborts its connection and frees its slot."""
        done = self.post()
        done.cancel()
        self.failureResultOf(done, CancelledError)
        self.assertTrue(self.connection()[1].disconnected)
        self.assertEqual((self.client.in_flight(URL), self.clock.getDelayedCalls()), (0, []))

    def test_cancel_waiting(self) -> None:
        """Cancelling a waiting request takes it out of the queue."""
        self.client = self.make_client(1)
        self.post(body=b"A")
        waiting = self.post(body=b"B")
        self.post(body=b"C")
        waiting.cancel()
        self.failureResultOf(waiting, CancelledError)
        self.answer()
        self.assertTrue(self.connection()[1].value().endswith(b"C"))

    def test_connection_close_not_reused(self) -> None:
        """An answer with Connection: close closes that connection; the next request opens another."""
        done = self.post()
        self.answer(data=b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")
        self.successResultOf(done)
        self.assertTrue(self.connection()[1].disconnecting)
        self.post()
        self.assertEqual(len(self.endpoints.connections), 2)

    def test_http10_not_reused(self) -> None:
        """An HTTP/1.0 answer without keep-alive closes that connection."""
        self.post()
        self.answer(data=b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n")
        self.assertTrue(self.connection()[1].disconnecting)
        self.assertEqual(self.client.idle_connections(URL), 0)

    def test_extra_bytes_not_reused(self) -> None:
        """Bytes after the answer make the connection unusable."""
        self.post()
        self.answer(data=OK + b"HTTP/1.1 200 OK\r\n")
        self.assertTrue(self.connection()[1].disconnecting)
        self.assertEqual(self.client.idle_connections(URL), 0)

    def test_read_until_close(self) -> None:
        """An answer without length ends, and is given, when the server closes the connection."""
        done = self.post()
        self.answer(data=b"HTTP/1.1 200 OK\r\n\r\nuntil close")
        self.assertNoResult(done)
        self.connection()[0].connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.successResultOf(done).body, b"until close")
        self.assertEqual(self.client.idle_connections(URL), 0)

    def test_server_closed_idle(self) -> None:
        """An idle connection the server closed is dropped; the next request opens another."""
        self.post()
        self.answer()
        self.assertEqual(self.client.idle_connections(URL), 1)
        self.connection()[0].connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.client.idle_connections(URL), 0)
        self.post()
        self.assertEqual(len(self.endpoints.connections), 2)

    def test_unsolicited_bytes_drop_idle(self) -> None:
        """Bytes arriving on an idle connection (a 408 before closing, say) drop it."""
        self.post()
        self.answer()
        self.answer(data=b"HTTP/1.1 408 Request Timeout\r\n\r\n")
        self.assertTrue(self.connection()[1].disconnected)
        self.assertEqual(self.client.idle_connections(URL), 0)

    def test_malformed_fails_and_drops(self) -> None:
        """A malformed answer fails the request with its reason and the connection is aborted."""
        done = self.post()
        self.answer(data=b"garbage\r\n\r\n")
        self.assertIn("not HTTP/1.x", str(self.failureResultOf(done, BadAnswer).value))
        self.assertTrue(self.connection()[1].disconnected)
        self.assertEqual((self.client.in_flight(URL), self.client.idle_connections(URL)), (0, 0))

    def test_closed_mid_answer(self) -> None:
        """A connection lost mid-answer fails the request, naming the cause."""
        done = self.post()
        self.answer(data=b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nabc")
        self.connection()[0].connectionLost(Failure(ConnectionLost("reset by peer")))
        message = str(self.failureResultOf(done, BadAnswer).value)
        self.assertIn("before the answer's body ended", message)
        self.assertIn("reset by peer", message)

    def race(self) -> Deferred:
        """A request on a reused connection that the server closes before answering."""
        self.post()
        self.answer()
        raced = self.post(body=b"again")
        first, transport = self.connection()
        self.assertTrue(transport.value().endswith(b"again"))
        first.connectionLost(Failure(ConnectionDone()))
        return raced

    def test_keep_alive_race_retried(self) -> None:
        """A reused connection closed before any answer byte: the request is sent again on a new connection."""
        raced = self.race()
        self.assertEqual(len(self.endpoints.connections), 2)
        _, transport = self.connection()
        sent = transport.value()
        self.assertTrue(sent.startswith(b"POST /dm/1?k=v HTTP/1.1\r\n") and sent.endswith(b"again"))
        self.assertNoResult(raced)
        self.answer()
        self.successResultOf(raced)

    def test_keep_alive_race_retried_once(self) -> None:
        """The retry's connection closing too fails the request: exactly one retry."""
        raced = self.race()
        self.connection()[0].connectionLost(Failure(ConnectionDone()))
        self.assertIn("before any answer", str(self.failureResultOf(raced, BadAnswer).value))
        self.assertEqual(len(self.endpoints.connections), 2)
        self.assertEqual(self.client.in_flight(URL), 0)

    def test_no_retry_on_new_connection(self) -> None:
        """A new connection closed before any answer is not retried."""
        done = self.post()
        self.connection()[0].connectionLost(Failure(ConnectionDone()))
        self.failureResultOf(done, BadAnswer)
        self.assertEqual(len(self.endpoints.connections), 1)

    def test_no_retry_once_answer_began(self) -> None:
        """A reused connection closed after some answer bytes is not retried."""
        self.post()
        self.answer()
        done = self.post()
        self.answer(data=b"HTTP/1.1 2")
        self.connection()[0].connectionLost(Failure(ConnectionDone()))
        self.failureResultOf(done, BadAnswer)
        self.assertEqual(len(self.endpoints.connections), 1)

    def test_retry_keeps_one_timer(self) -> None:
        """The retried request still ends at its first timeout."""
        raced = self.race()
        self.clock.advance(10)
        self.failureResultOf(raced, TimeoutError)

    def test_connect_failure(self) -> None:
        """A refused connect fails the request and frees the slot for the next."""
        self.client = self.make_client(1)
        self.endpoints.hold = True
        first, second = self.post(), self.post()
        [connecting] = self.endpoints.held
        self.endpoints.held.clear()
        connecting.errback(ConnectionRefusedError("here"))
        self.failureResultOf(first, ConnectionRefusedError)
        self.assertEqual(len(self.endpoints.held), 1)  # the second is connecting now
        self.endpoints.complete()
        self.answer()
        self.successResultOf(second)

    def test_refused_at_once(self) -> None:
        """A connect failing at once fails the request, holding no slot."""
        self.endpoints.refuse = True
        self.failureResultOf(self.post(), ConnectionRefusedError)
        self.assertEqual(self.client.in_flight(URL), 0)

    def test_idle_reuse_is_lifo(self) -> None:
        """The most recently used idle connection is taken first."""
        self.post(), self.post()
        self.answer(0)
        self.answer(1)
        self.post(body=b"next")
        self.assertTrue(self.connection(1)[1].value().endswith(b"next"))
        self.assertFalse(self.connection(0)[1].value().endswith(b"next"))

    def test_close(self) -> None:
        """close closes idle connections, lets one in use finish, then fires."""
        self.post()
        self.answer()
        busy = self.post(url="http://other/")
        closed = self.client.close()
        self.assertTrue(self.connection(0)[1].disconnecting)
        self.connection(0)[0].connectionLost(Failure(ConnectionDone()))
        self.assertNoResult(closed)
        self.answer(1)
        self.successResultOf(busy)
        self.assertTrue(self.connection(1)[1].disconnecting)  # not kept after close
        self.connection(1)[0].connectionLost(Failure(ConnectionDone()))
        self.successResultOf(closed)


class Slow(Resource):
    """Answers after the test writes; keeps each request."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.held: list = []

    def render_POST(self, request):  # noqa: N802 - Twisted's name
        self.held.append(request)
        return NOT_DONE_YET


class AgainstTwistedWebTests(SynchronousTestCase):
    """The client against twisted.web's server, over iosim."""

    def setUp(self) -> None:
        self.clock = task.Clock()
        self.resource = Slow()
        self.end = InMemoryEndServer(self.resource)
        self.client = self.end.client(self.clock, flushing=False)

    def test_chunked_answers_on_one_connection(self) -> None:
        """Chunked answers written in pieces are read, and consecutive requests share a connection."""
        for n in range(3):
            done = self.client.post("http://end.example.com/x", {}, b"%d" % n, 10)
            self.end.flush()
            request = self.resource.held[-1]
            self.assertEqual(request.content.read(), b"%d" % n)
            request.setResponseCode(502)
            request.write(b"part one, ")
            self.end.flush()
            request.write(b"part two")
            request.finish()
            self.end.flush()
            answer = self.successResultOf(done)
            self.assertEqual((answer.code, answer.body), (502, b"part one, part two"))
        self.assertEqual(len(self.end.connects), 1)
