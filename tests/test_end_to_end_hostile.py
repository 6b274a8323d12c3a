"""
Hostile clients against the real daemon, on loopback: a device that never
reads, an amplification upload, slowloris hellos and frames, connection
floods, a 1 GiB unauthenticated API body and an end server echoing secrets.
Each asserts the relay's memory stays bounded (VmRSS from /proc), refusals
come promptly, other devices are still served, and the log stays clean.
"""

from __future__ import annotations

import base64
import struct
import sys
import time

from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ConnectError
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol
from twisted.internet.task import deferLater
from twisted.web.resource import Resource
from twisted.web.server import Site
from zope.interface import implementer

from oemrelay.codec import MAX_FIELDS_PER_RECORD, MessageType, encode_frame

from .test_end_to_end import (
    DART_HELLO,
    LISTEN,
    LOOPBACK,
    VERSION_DATA,
    _RelayTestCase,
    device_hello,
    unused_port,
)

#: Growth of the relay's resident memory each attack may cause, in bytes.
MAX_GROWTH = 24 * 1024 * 1024

BASIC_USER = "relay-user-e2e"
BASIC_PASSWORD = "pa55-w0rd-e2e"
HEADER_SECRET = "hdr-s3cret-value"
API_TOKEN = "api-t0ken-e2e"


def file_config(directory_hint: str = "", **relay: object) -> str:
    """A relay writing to a file connector, with ``relay`` keys added."""
    extra = "".join(f"{key} = {value}\n" for key, value in relay.items())
    return (
        f"[relay]\nlisten = {LISTEN}\ncommit_timeout = 5\nidle_timeout = 30\n{extra}"
        "[connector:f]\ntype = file\npath = out.jsonl\n"
    )


def amplifying_records(records: int) -> bytes:
    """A 0x04 payload of ``records`` records of MAX_FIELDS_PER_RECORD empty fields each."""
    fields = bytes([200, 0]) * MAX_FIELDS_PER_RECORD
    return b"".join(
        struct.pack("<HIIB", 11 + len(fields), seq, 1, 1) + fields for seq in range(records)
    )


@implementer(IPushProducer)
class _Flood(Protocol):
    """
    Writes ``head`` then ``chunk`` for as long as the connection takes it
    and never reads: TCP backpressure pauses it, so the test holds no backlog.
    """

    def __init__(self, head: bytes, chunk: bytes, limit: int = 1 << 62) -> None:
        self.head, self.chunk, self.limit = head, chunk, limit
        self.sent = 0
        self.received = bytearray()
        self.closed = False
        self._paused = False

    def connectionMade(self) -> None:
        self.transport.registerProducer(self, True)
        self.transport.write(self.head)
        self.resumeProducing()

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        while not self._paused and not self.closed and self.sent < self.limit:
            self.transport.write(self.chunk)
            self.sent += len(self.chunk)

    def stopProducing(self) -> None:
        self._paused = True

    def connectionLost(self, reason=None) -> None:
        self.closed = True


class _Deaf(_Flood):
    """A flood that does not read what the relay answers either."""

    def connectionMade(self) -> None:
        self.transport.pauseProducing()  # stop reading from the relay
        super().connectionMade()


class _Echo(Resource):
    """An end server that answers 500 with the request's headers written back."""

    isLeaf = True

    def render(self, request) -> bytes:
        request.setResponseCode(500)
        return b"you sent: " + b"; ".join(
            name + b"=" + b",".join(values)
            for name, values in request.requestHeaders.getAllRawHeaders()
        )


class HostileClientEndToEndTests(_RelayTestCase):
    """The daemon under attack keeps bounded memory and serves real devices."""

    timeout = 30

    def rss(self) -> int:
        """The daemon's resident memory now, in bytes."""
        with open(f"/proc/{self.daemon_process.pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")

    async def connect(self, port: int, protocol: Protocol) -> Protocol:
        """``protocol`` connected to ``port``; aborted in cleanup."""
        await connectProtocol(TCP4ClientEndpoint(self.reactor, LOOPBACK, port, timeout=5), protocol)

        def abort() -> None:
            if not protocol.closed:
                protocol.transport.abortConnection()

        self.addCleanup(abort)
        return protocol

    async def try_connect(self, port: int, name: str):
        """A device connection, or None if the relay reset it before it was made."""
        try:
            return await self.connect_device(port, name)
        except ConnectError:
            return None

    async def sleep(self, seconds: float) -> None:
        await deferLater(self.reactor, seconds, lambda: None)

    async def assert_device_served(self, port: int, serial: int = 4242) -> None:
        """A real device connecting now gets its hello answered within 2 s."""
        device = await self.connect_device(port, f"device-{serial}")
        device.send(device_hello(serial))
        await self.wait_until(lambda: device.got(MessageType.HELLO_RESPONSE), "a hello answer", 2)

    def assert_clean_log(self) -> None:
        output = self.daemon.output.decode("utf-8", "replace")
        for bad in ("Traceback", "Unhandled", "CRITICAL"):
            self.assertNotIn(bad, output)

    async def test_never_reading_device(self) -> None:
        """A device sending 0x14 without reading the answers is no longer read; memory stays bounded."""
        port = await self.start_daemon(file_config())
        before = self.rss()
        deaf = await self.connect(port, _Deaf(DART_HELLO, VERSION_DATA * 2000))
        await self.sleep(2)
        sent_by_then = deaf.sent
        await self.sleep(1.5)
        # Once its answers back up, the relay reads nothing more from it.
        self.assertLess(deaf.sent - sent_by_then, 256 * 1024)
        self.assertLess(self.rss() - before, MAX_GROWTH)
        self.assertGreater(deaf.sent, 1 << 20, "the attack never got going")
        await self.assert_device_served(port)
        self.assert_clean_log()

    async def test_amplification_upload(self) -> None:
        """Records of empty fields are refused at max_upload_memory, uncommitted, memory bounded."""
        port = await self.start_daemon(file_config())
        before = self.rss()
        frame = encode_frame(MessageType.DATA_RECORDS, amplifying_records(400))
        attacker = await self.connect(port, _Flood(DART_HELLO, frame, limit=8 << 20))
        await self.wait_until(lambda: attacker.closed, "the relay to close the attacker", 10)
        self.assertLess(self.rss() - before, MAX_GROWTH)
        self.assertIn(b"max_upload_memory", self.daemon.output)
        self.assertNotIn(bytes.fromhex("025506010001"), attacker.received)
        await self.assert_device_served(port)
        self.assert_clean_log()

    async def test_slowloris_hello_and_frame(self) -> None:
        """A hello trickled byte by byte is closed at hello_timeout; a trickled frame at frame_timeout."""
        port = await self.start_daemon(file_config(hello_timeout=1, frame_timeout=1))
        slow_hello = await self.connect_device(port, "slow-hello")
        started = time.monotonic()
        for byte in DART_HELLO[:8]:
            if slow_hello.closed:
                break
            slow_hello.send(bytes([byte]))
            await self.sleep(0.25)
        await self.wait_until(lambda: slow_hello.closed, "the slow hello to be closed", 3)
        self.assertLess(slow_hello.closed_at - started, 2.5)
        slow_frame = await self.connect_device(port, "slow-frame")
        slow_frame.send(DART_HELLO)
        frame = encode_frame(MessageType.DATA_RECORDS, bytes(60000))
        started = time.monotonic()
        for offset in range(0, 40):
            if slow_frame.closed:
                break
            slow_frame.send(frame[offset : offset + 1])
            await self.sleep(0.1)
        await self.wait_until(lambda: slow_frame.closed, "the slow frame to be closed", 3)
        self.assertLess(slow_frame.closed_at - started, 2.5)
        self.assertIn(b"frame_timeout", self.daemon.output)
        self.assert_clean_log()

    async def test_connection_flood(self) -> None:
        """300 bare sockets over max_connections 50 shed for devices; with 50 devices more are refused, logged once."""
        port = await self.start_daemon(file_config(max_connections=50))
        before = self.rss()
        flood = [await self.connect_device(port, f"bare-{n}") for n in range(300)]
        await self.assert_device_served(port, 1)
        devices = []
        for serial in range(2, 51):
            device = await self.connect_device(port, f"device-{serial}")
            device.send(device_hello(serial))
            devices.append(device)
        await self.wait_until(
            lambda: all(d.got(MessageType.HELLO_RESPONSE) for d in devices),
            "49 more devices answered",
        )
        await self.wait_until(lambda: all(s.closed for s in flood), "bare sockets shed")
        refused = [await self.try_connect(port, f"late-{n}") for n in range(20)]
        await self.wait_until(
            lambda: all(r is None or r.closed for r in refused), "late sockets refused", 5
        )
        self.assertTrue(all(not d.closed for d in devices), "a device with a hello was shed")
        self.assertEqual(self.daemon.output.count(b"refusing connection"), 1)
        self.assertLess(self.rss() - before, MAX_GROWTH)
        self.assert_clean_log()

    async def test_unauthenticated_gigabyte_api_body(self) -> None:
        """A 1 GiB body without the token is answered 401 before it is read; memory and disk untouched."""
        api_port = unused_port()
        config = file_config() + f"[api]\nlisten = tcp:{api_port}:interface={LOOPBACK}\ntoken = {API_TOKEN}\n"
        await self.start_daemon(config)
        before = self.rss()
        head = (
            b"POST /api/devices/import HTTP/1.1\r\nHost: relay\r\n"
            b"Content-Type: text/csv\r\nContent-Length: %d\r\n\r\n" % (1 << 30)
        )
        client = await self.connect(api_port, _Flood(head, bytes(64 * 1024), limit=1 << 30))
        await self.wait_until(lambda: b"\r\n\r\n" in client.received, "the 401", 5)
        self.assertTrue(client.received.startswith(b"HTTP/1.1 401"), bytes(client.received[:80]))
        await self.wait_until(lambda: client.closed, "the API to close the connection", 5)
        self.assertLess(client.sent, 64 << 20, "most of the gigabyte was taken in")
        self.assertLess(self.rss() - before, MAX_GROWTH)
        self.assert_clean_log()

    async def test_echoing_end_server(self) -> None:
        """An end server echoing the request: the daemon's log quotes it with no credential or header value."""
        site = Site(_Echo())
        site.noisy = False
        end_port = self._listen(site)
        config = (
            f"[relay]\nlisten = {LISTEN}\ncommit_timeout = 5\nidle_timeout = 30\n"
            "[connector:h]\ntype = http\n"
            f"url = http://{LOOPBACK}:{end_port}/dm\n"
            f"username = {BASIC_USER}\npassword = {BASIC_PASSWORD}\n"
            f"header1 = X-Api-Key: {HEADER_SECRET}\n"
        )
        port = await self.start_daemon(config)
        device = await self.connect_device(port)
        device.send(DART_HELLO)
        from .test_end_to_end import COMMIT_REQUEST, DENMARK

        device.send(DENMARK, COMMIT_REQUEST)
        await self.wait_until(lambda: b"answered 500" in self.daemon.output, "the refusal logged")
        output = self.daemon.output.decode("utf-8", "replace")
        basic = base64.b64encode(f"{BASIC_USER}:{BASIC_PASSWORD}".encode()).decode()
        for secret in (BASIC_USER, BASIC_PASSWORD, basic, HEADER_SECRET):
            self.assertNotIn(secret, output)
        self.assertIn("[redacted]", output)
        self.assert_clean_log()


if not sys.platform.startswith("linux"):
    HostileClientEndToEndTests.skip = "reads the relay's memory from /proc"
