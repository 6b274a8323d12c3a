"""
End-to-end tests: the real ``twistd oemrelay`` daemon in a subprocess.

Each test writes a configuration, starts ``twistd -n oemrelay -c relay.ini``
with the interpreter that runs the tests, and plays devices and end servers
against it with the real reactor, on 127.0.0.1 only.  The relay listens on
port 0; its port is read from its log and then probed.  Every wait is
bounded, and the daemon, the end servers and the device connections are
always stopped in cleanup.
"""

from __future__ import annotations

import json
import os
import re
import socket
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ConnectError, ProcessExitedAlready
from twisted.internet.protocol import Factory, ProcessProtocol, Protocol
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.protocols.policies import WrappingFactory
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from oemrelay.codec import (
    EPOCH_2013,
    Frame,
    FrameDecoder,
    MessageType,
    ProtocolError,
    encode_frame,
    hello_response,
    parse_hello,
)
from oemrelay.simulator import simulated_hello

from .vectors import capture

log = Logger(namespace="tests.test_end_to_end")

LOOPBACK = "127.0.0.1"
LISTEN = f"tcp:0:interface={LOOPBACK}"

#: Bounds, in seconds, of every wait in this module.
START_TIMEOUT = 15.0
STOP_TIMEOUT = 5.0
REPLY_TIMEOUT = 10.0

#: Characters of daemon output per test log event.
_LOG_PIECE = 16000

PROJECT = Path(__file__).resolve().parent.parent

# The device's side, from real captures (tests/data/README.rst).
DART_HELLO = capture("hello-49-byte-dart")  # serial 129336
DART_SERIAL = 129336
DART_IMEI = "353323081669730"
DENMARK = capture("data-0x04-2-records-2021-denmark")  # seq 565-566
DENMARK_SEQ = [565, 566]
AUCKLAND = capture("data-0x04-12-records-2017-auckland")  # seq 518-529
AUCKLAND_SEQ = list(range(518, 530))
FIXED = capture("fixed64-0x10-2-records-G50")  # index 894125-894126
FIXED_SEQ = [894125, 894126]
ASYNC_REQUEST = capture("async-session-request-0x22")
VERSION_DATA = encode_frame(
    MessageType.VERSION_DATA,
    struct.pack("<IIB", DART_SERIAL, 0xFFFFFFFF, 1) + bytes.fromhex("09010000"),
)
TIME_REQUEST = encode_frame(MessageType.TIME_REQUEST)

# Written out, not taken from the codec: these are the protocol's bytes.
COMMIT_REQUEST = bytes.fromhex("0255050000")
COMMIT_OK = bytes.fromhex("025506010001")
HELLO_RESPONSE_HEADER = bytes.fromhex("0255010800")


def twistd_command(config_path: str) -> list[str]:
    """``twistd -n oemrelay -c config_path`` run by the tests' own interpreter."""
    return [
        sys.executable,
        "-c",
        "from twisted.scripts.twistd import run; run()",
        "--nodaemon",
        "--pidfile=",
        "oemrelay",
        "-c",
        config_path,
    ]


def unused_port() -> int:
    """A loopback port nobody listens on (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((LOOPBACK, 0))
        return probe.getsockname()[1]


def seq_numbers(body: bytes) -> list[int]:
    """The ``SeqNo`` of every record of an OEM JSON document."""
    return [record["SeqNo"] for record in json.loads(body)["Records"]]


# -- the daemon ----------------------------------------------------------------



def device_hello(serial: int) -> bytes:
    """A 49-byte hello for another device: the simulator's Dart."""
    return simulated_hello(serial).to_frame()


class _Daemon(ProcessProtocol):
    """The twistd child: its output, the port it listens on, how it ended."""

    _LISTENING = re.compile(rb"DeviceFactory starting on (\d+)")

    def __init__(self) -> None:
        self.stdout = bytearray()
        self.stderr = bytearray()
        self.output = bytearray()
        self.ended = False
        self.exit_code: int | None = None
        self.signal: int | None = None

    def outReceived(self, data: bytes) -> None:
        self.stdout += data
        self.output += data

    def errReceived(self, data: bytes) -> None:
        self.stderr += data
        self.output += data

    def processEnded(self, reason) -> None:
        self.ended = True
        self.exit_code = reason.value.exitCode
        self.signal = getattr(reason.value, "signal", None)

    @property
    def port(self) -> int | None:
        """The relay's listening port, once its log has named it."""
        found = self._LISTENING.search(self.output)
        return int(found.group(1)) if found else None


# -- the end servers -------------------------------------------------------------


@dataclass(frozen=True)
class _Post:
    """One request as the HTTP end server saw it."""

    method: str
    uri: str
    headers: dict[str, list[str]]
    body: bytes


class _HttpEndServer(Resource):
    """Records every request and answers ``status`` after ``delay`` seconds."""

    isLeaf = True

    def __init__(self, clock, events: list, status: int = 200, delay: float = 0.0) -> None:
        super().__init__()
        self.requests: list[_Post] = []
        self.status = status
        self.delay = delay
        self.port = 0
        self._clock = clock
        self._events = events
        self._pending: set = set()

    def render(self, request) -> object:
        self.requests.append(
            _Post(
                request.method.decode("ascii"),
                request.uri.decode("ascii"),
                {
                    name.decode("ascii").lower(): [v.decode("latin-1") for v in values]
                    for name, values in request.requestHeaders.getAllRawHeaders()
                },
                request.content.read(),
            )
        )
        self._events.append(("http", "request"))
        if not self.delay:
            return self._answer(request)
        call = self._clock.callLater(self.delay, self._answer_later, request)
        self._pending.add(call)

        def lost(_):
            # The relay gave up (commit_timeout): nothing left to answer.
            if call.active():
                call.cancel()
            self._pending.discard(call)

        request.notifyFinish().addErrback(lost)
        return NOT_DONE_YET

    def _answer(self, request) -> bytes:
        self._events.append(("http", "answered"))
        request.setResponseCode(self.status)
        request.setHeader(b"Content-Type", b"text/plain")
        return b"ok" if 200 <= self.status < 300 else b"end server refuses"

    def _answer_later(self, request) -> None:
        self._pending = {call for call in self._pending if call.active()}
        request.write(self._answer(request))
        request.finish()

    def cancel_pending(self) -> None:
        """Drop answers not yet given."""
        for call in self._pending:
            if call.active():
                call.cancel()
        self._pending.clear()


class _DmEndServerConnection(Protocol):
    """One relay connection to the raw TCP end server: every byte it sent."""

    def __init__(self, server: _DmEndServer) -> None:
        self.received = bytearray()
        self.closed = False
        self._server = server
        self._decoder = FrameDecoder()

    def connectionMade(self) -> None:
        self._server.connections.append(self)

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        try:
            frames = self._decoder.feed(data)
        except ProtocolError:
            self.transport.abortConnection()
            return
        for frame in frames:
            self._server.frame_received(self, frame)

    def connectionLost(self, reason=None) -> None:
        self.closed = True


class _DmEndServer(Factory):
    """
    A raw TCP end server speaking the device protocol: it answers a hello
    with 0x01 and a commit request with 0x06 ``commit_status``, after
    ``commit_delay`` seconds.
    """

    noisy = False

    def __init__(
        self, clock, events: list, commit_status: bytes = b"\x01", commit_delay: float = 0.0
    ) -> None:
        self.connections: list[_DmEndServerConnection] = []
        self.port = 0
        self._clock = clock
        self._events = events
        self._commit_status = commit_status
        self._commit_delay = commit_delay
        self._pending: list = []

    def buildProtocol(self, addr) -> _DmEndServerConnection:
        return _DmEndServerConnection(self)

    def frame_received(self, connection: _DmEndServerConnection, frame: Frame) -> None:
        if frame.type == MessageType.HELLO:
            hello = parse_hello(frame.payload)
            connection.transport.write(hello_response(hello, self._clock.seconds()))
        elif frame.type == MessageType.COMMIT_REQUEST:
            self._events.append(("tcp", "commit request"))

            def answer() -> None:
                self._events.append(("tcp", "answered"))
                connection.transport.write(
                    encode_frame(MessageType.COMMIT_RESPONSE, self._commit_status)
                )

            self._pending.append(self._clock.callLater(self._commit_delay, answer))

    def cancel_pending(self) -> None:
        """Drop answers not yet given."""
        for call in self._pending:
            if call.active():
                call.cancel()
        self._pending.clear()


# -- the device ------------------------------------------------------------------


class _Device(Protocol):
    """A scripted device: sends what it is told, records every reply."""

    def __init__(self, name: str, events: list) -> None:
        self.name = name
        self.received = bytearray()
        self.frames: list[Frame] = []
        self.closed = False
        self.closed_at: float | None = None
        self._events = events
        self._decoder = FrameDecoder()

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        try:
            frames = self._decoder.feed(data)
        except ProtocolError as error:
            self._events.append((self.name, f"unparsable reply: {error}"))
            return
        for frame in frames:
            self.frames.append(frame)
            self._events.append((self.name, frame.type))

    def connectionLost(self, reason=None) -> None:
        self.closed = True
        self.closed_at = time.monotonic()
        self._events.append((self.name, "closed"))

    def send(self, *frames: bytes) -> None:
        """Write ``frames`` in one go, as a device writing message after message."""
        self.transport.write(b"".join(frames))

    def types(self) -> list[int]:
        """The message types received so far, in order."""
        return [frame.type for frame in self.frames]

    def got(self, message_type: int) -> bool:
        """Whether a message of ``message_type`` has arrived."""
        return message_type in self.types()


# -- the fixture -------------------------------------------------------------------


class _RelayTestCase(TestCase):
    """Starts daemons, end servers and devices, and always stops them."""

    # trial's own bound on each test; the waits below are shorter.
    timeout = 45

    def setUp(self) -> None:
        from twisted.internet import reactor

        self.reactor = reactor
        #: What happened, in order: (who, what) from end servers and devices.
        self.events: list[tuple[str, object]] = []
        self.daemon: _Daemon | None = None
        self.daemon_process = None

    async def wait_until(
        self, predicate: Callable[[], bool], what: str, timeout: float = REPLY_TIMEOUT
    ) -> None:
        """Poll ``predicate`` until true; fail the test after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                self.fail(
                    f"timed out after {timeout:g}s waiting for {what};"
                    f" events {self.events[-20:]}{self._daemon_output()}"
                )
            await deferLater(self.reactor, 0.01, lambda: None)

    def _daemon_output(self) -> str:
        if self.daemon is None:
            return ""
        text = self.daemon.output.decode("utf-8", "replace")
        return "\n--- daemon output ---\n" + text[-4000:]

    def write_config(self, text: str) -> str:
        """Write ``text`` to a new file; its absolute path."""
        workdir = os.path.abspath(self.mktemp())
        os.makedirs(workdir)
        path = os.path.join(workdir, "relay.ini")
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        return path

    def spawn_twistd(self, config_path: str) -> tuple[_Daemon, object]:
        """Start ``twistd -n oemrelay -c config_path``; stopped in cleanup."""
        daemon = _Daemon()
        # Run beside the config, away from the source tree: the plugin and the
        # package come from the installation, as for a deployed relay.
        transport = self.reactor.spawnProcess(
            daemon,
            sys.executable,
            twistd_command(config_path),
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
            path=os.path.dirname(config_path),
        )
        self.addCleanup(self._stop_daemon, daemon, transport)
        return daemon, transport

    async def start_daemon(self, config: str) -> int:
        """Run the relay on ``config``; its port once it accepts connections."""
        daemon, self.daemon_process = self.spawn_twistd(self.write_config(config))
        self.daemon = daemon
        await self.wait_until(
            lambda: daemon.port is not None or daemon.ended,
            "the relay to log its listening port",
            START_TIMEOUT,
        )
        if daemon.port is None:
            self.fail(f"the daemon exited with status {daemon.exit_code}{self._daemon_output()}")
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                probe = await self.connect_device(daemon.port, "probe")
            except ConnectError:
                if time.monotonic() > deadline:
                    self.fail(f"port {daemon.port} never accepted{self._daemon_output()}")
                await deferLater(self.reactor, 0.05, lambda: None)
                continue
            probe.transport.loseConnection()
            await self.wait_until(lambda: probe.closed, "the probe connection to close")
            return daemon.port

    async def _stop_daemon(self, daemon: _Daemon, transport) -> None:
        for signal_name in ("TERM", "KILL"):
            if daemon.ended:
                break
            try:
                transport.signalProcess(signal_name)
            except ProcessExitedAlready:
                pass
            deadline = time.monotonic() + STOP_TIMEOUT
            while not daemon.ended and time.monotonic() < deadline:
                await deferLater(self.reactor, 0.02, lambda: None)
        log.info(
            "daemon ended (status {status}, signal {signal}); its output follows",
            status=daemon.exit_code,
            signal=daemon.signal,
        )
        # In pieces: trial -j carries each log event in one AMP value (< 64 KiB).
        output = daemon.output.decode("utf-8", "replace")
        for start in range(0, len(output), _LOG_PIECE):
            log.info("{output}", output=output[start : start + _LOG_PIECE])
        if not daemon.ended:
            self.fail("the daemon survived SIGTERM and SIGKILL")

    def _listen(self, factory: Factory):
        """Serve ``factory`` on a loopback port; closed with its connections in cleanup."""
        wrapper = WrappingFactory(factory)
        wrapper.noisy = False
        port = self.reactor.listenTCP(0, wrapper, backlog=256, interface=LOOPBACK)
        self.close_in_cleanup(port, wrapper, "end server connections")
        return port.getHost().port

    def close_in_cleanup(self, port, wrapper: WrappingFactory, what: str) -> None:
        """At cleanup stop ``port`` and abort every connection ``wrapper`` holds."""

        async def close() -> None:
            await port.stopListening()
            for connection in list(wrapper.protocols):
                connection.transport.abortConnection()
            await self.wait_until(lambda: not wrapper.protocols, f"{what} to close", STOP_TIMEOUT)

        self.addCleanup(close)

    def start_http_server(self, status: int = 200, delay: float = 0.0) -> _HttpEndServer:
        """An HTTP end server on a loopback port."""
        return self.serve_http(_HttpEndServer(self.reactor, self.events, status, delay))

    def serve_http(self, server):
        """Serve the resource ``server`` on a loopback port (its ``port``); its answers dropped in cleanup."""
        site = Site(server)
        site.noisy = False
        server.port = self._listen(site)
        self.addCleanup(server.cancel_pending)
        return server

    def start_dm_server(self, commit_status: bytes = b"\x01", commit_delay: float = 0.0) -> _DmEndServer:
        """A raw TCP end server speaking the device protocol on a loopback port."""
        server = _DmEndServer(self.reactor, self.events, commit_status, commit_delay)
        server.port = self._listen(server)
        self.addCleanup(server.cancel_pending)
        return server

    async def connect_device(self, port: int, name: str = "device") -> _Device:
        """A device connected to the relay; disconnected in cleanup."""
        device = _Device(name, self.events)
        endpoint = TCP4ClientEndpoint(self.reactor, LOOPBACK, port, timeout=5)
        await connectProtocol(endpoint, device)

        async def disconnect() -> None:
            if not device.closed:
                device.transport.abortConnection()
            await self.wait_until(lambda: device.closed, f"{name} to disconnect", STOP_TIMEOUT)

        self.addCleanup(disconnect)
        return device

    def assert_hello_response(self, device: _Device) -> None:
        """The device's first reply is the 8-byte 0x01: time since 2013 and flags 0."""
        self.assertEqual(bytes(device.received[:5]), HELLO_RESPONSE_HEADER)
        sent_time, flags = struct.unpack("<II", device.received[5:13])
        self.assertLess(abs(sent_time - (time.time() - EPOCH_2013)), 120)
        self.assertEqual(flags, 0)


def http_config(
    server: _HttpEndServer,
    commit_timeout: float = 10,
    timeout: float = 10,
    retry_max: float = 5,
    retry_initial: float = 0.5,
) -> str:
    """A relay posting to ``server``, with a templated URL and headers."""
    return f"""\
[relay]
listen = {LISTEN}
connector = platform
commit_timeout = {commit_timeout}
idle_timeout = 30
retry_initial = {retry_initial:g}
retry_max = {retry_max:g}

[connector:platform]
type = http
url = http://{LOOPBACK}:{server.port}/dm/[SERIAL]?imei=[IMEI]
header1 = X-Imei: [IMEI]
header2 = X-Device: serial [SERIAL]
timeout = {timeout}
"""


def tcp_config(port: int) -> str:
    """A relay forwarding devices to a raw TCP end server on ``port``."""
    return f"""\
[relay]
listen = {LISTEN}
connector = forward
commit_timeout = 10
idle_timeout = 30

[connector:forward]
type = tcp
endpoint = tcp:host={LOOPBACK}:port={port}:timeout=5
"""


# -- the scenarios -----------------------------------------------------------------


class HttpRelayEndToEndTests(_RelayTestCase):
    """The daemon with an HTTP connector."""

    async def test_upload_posted_then_committed(self) -> None:
        """An upload becomes one templated JSON POST and 0x06 01 follows the end server's answer."""
        server = self.start_http_server(delay=0.5)
        port = await self.start_daemon(http_config(server))
        device = await self.connect_device(port)

        device.send(DART_HELLO, DENMARK, AUCKLAND, COMMIT_REQUEST)
        await self.wait_until(lambda: device.got(MessageType.COMMIT_RESPONSE), "0x06")

        self.assertEqual(len(server.requests), 1)
        post = server.requests[0]
        self.assertEqual(post.method, "POST")
        self.assertEqual(post.uri, f"/dm/{DART_SERIAL}?imei={DART_IMEI}")
        self.assertEqual(post.headers["content-type"], ["application/json"])
        self.assertEqual(post.headers["x-imei"], [DART_IMEI])
        self.assertEqual(post.headers["x-device"], [f"serial {DART_SERIAL}"])
        document = json.loads(post.body)
        self.assertEqual(document["SerNo"], DART_SERIAL)
        self.assertEqual(document["IMEI"], DART_IMEI)
        self.assertEqual(document["FW"], "34.2.1.9")
        self.assertEqual(seq_numbers(post.body), DENMARK_SEQ + AUCKLAND_SEQ)

        self.assertEqual(device.types(), [MessageType.HELLO_RESPONSE, MessageType.COMMIT_RESPONSE])
        self.assert_hello_response(device)
        self.assertEqual(bytes(device.received[13:]), COMMIT_OK)
        before_commit = self.events[: self.events.index(("device", MessageType.COMMIT_RESPONSE))]
        self.assertIn(("http", "answered"), before_commit)
        self.assertFalse(device.closed)

    async def test_second_upload_posted_separately(self) -> None:
        """A second commit on the same connection is one more POST with only its own records."""
        server = self.start_http_server()
        port = await self.start_daemon(http_config(server))
        device = await self.connect_device(port)

        device.send(DART_HELLO, DENMARK, COMMIT_REQUEST)
        await self.wait_until(lambda: device.types().count(MessageType.COMMIT_RESPONSE) == 1, "0x06")
        device.send(FIXED, COMMIT_REQUEST)
        await self.wait_until(
            lambda: device.types().count(MessageType.COMMIT_RESPONSE) == 2, "the second 0x06"
        )

        self.assertEqual(
            [seq_numbers(post.body) for post in server.requests], [DENMARK_SEQ, FIXED_SEQ]
        )
        self.assertEqual(bytes(device.received[13:]), COMMIT_OK + COMMIT_OK)
        self.assertFalse(device.closed)

    async def test_refusing_end_server_means_no_commit(self) -> None:
        """A 400 from the end server: one POST, the device gets no 0x06 and is disconnected."""
        server = self.start_http_server(status=400)
        port = await self.start_daemon(http_config(server))
        device = await self.connect_device(port)

        device.send(DART_HELLO, DENMARK, COMMIT_REQUEST)
        await self.wait_until(lambda: device.closed, "the relay to close the device")

        self.assertEqual(len(server.requests), 1)
        self.assertEqual(seq_numbers(server.requests[0].body), DENMARK_SEQ)
        self.assertEqual(device.types(), [MessageType.HELLO_RESPONSE])

    async def test_slow_end_server_means_no_commit(self) -> None:
        """An end server slower than commit_timeout: no 0x06, disconnected once the timeout passed."""
        await self.assert_slow_server_not_committed(
            {"commit_timeout": 1},
            "commit of 2 records withheld, closing so the device resends:"
            " not confirmed within commit_timeout 1s",
        )

    async def test_connector_timeout_means_no_commit(self) -> None:
        """An end server slower than the connector's timeout: no 0x06, disconnected, the timeout logged."""
        await self.assert_slow_server_not_committed(
            {"commit_timeout": 10, "timeout": 1, "retry_max": 0},
            "connector platform: {server} did not answer within 1s",
        )

    async def assert_slow_server_not_committed(self, settings: dict, logged: str) -> None:
        """An end server answering after 3 s: no 0x06, the device closed after ~1 s, ``logged`` in the log."""
        server = self.start_http_server(delay=3.0)
        port = await self.start_daemon(http_config(server, **settings))
        device = await self.connect_device(port)

        sent = time.monotonic()
        device.send(DART_HELLO, DENMARK, COMMIT_REQUEST)
        await self.wait_until(lambda: device.closed, "the relay to close the device", 5)

        self.assertEqual(device.types(), [MessageType.HELLO_RESPONSE])
        self.assertEqual(len(server.requests), 1)
        self.assertNotIn(("http", "answered"), self.events)
        self.assertGreaterEqual(device.closed_at - sent, 0.9)
        self.assertIn(
            logged.format(server=f"{LOOPBACK}:{server.port}"),
            self.daemon.output.decode("utf-8", "replace"),
        )

    async def test_hundred_devices_at_once(self) -> None:
        """100 devices uploading together each get 0x06 01; the end server gets their 100 POSTs."""
        server = self.start_http_server()
        port = await self.start_daemon(http_config(server))
        serials = list(range(700000, 700100))
        devices = await gatherResults(
            [
                Deferred.fromCoroutine(self.connect_device(port, f"device {serial}"))
                for serial in serials
            ]
        )
        for serial, device in zip(serials, devices):
            device.send(device_hello(serial), DENMARK, COMMIT_REQUEST)

        await self.wait_until(
            lambda: all(device.got(MessageType.COMMIT_RESPONSE) for device in devices),
            "all 100 devices' 0x06",
            20,
        )

        for device in devices:
            self.assertEqual(
                device.types(), [MessageType.HELLO_RESPONSE, MessageType.COMMIT_RESPONSE]
            )
            self.assertEqual(bytes(device.received[13:]), COMMIT_OK)
            self.assertFalse(device.closed)
        self.assertEqual(len(server.requests), 100)
        self.assertEqual(sorted(json.loads(p.body)["SerNo"] for p in server.requests), serials)
        self.assertEqual(
            sorted(p.uri for p in server.requests),
            [f"/dm/{serial}?imei={simulated_hello(serial).imei}" for serial in serials],
        )
        self.assertTrue(all(seq_numbers(p.body) == DENMARK_SEQ for p in server.requests))


class DeviceInputEndToEndTests(_RelayTestCase):
    """The daemon facing devices that break the protocol."""

    async def test_garbage_closes_only_that_connection(self) -> None:
        """Bytes that are no frame close that connection; the next device is served normally."""
        server = self.start_http_server()
        port = await self.start_daemon(http_config(server))

        intruder = await self.connect_device(port, "intruder")
        intruder.send(b"GET / HTTP/1.1\r\nHost: relay\r\n\r\n")
        await self.wait_until(lambda: intruder.closed, "the relay to close the intruder")
        self.assertEqual(bytes(intruder.received), b"")

        device = await self.connect_device(port)
        device.send(DART_HELLO, DENMARK, COMMIT_REQUEST)
        await self.wait_until(lambda: device.got(MessageType.COMMIT_RESPONSE), "0x06")
        self.assertEqual(bytes(device.received[13:]), COMMIT_OK)
        self.assertEqual([seq_numbers(p.body) for p in server.requests], [DENMARK_SEQ])

    async def test_data_before_hello_closes_and_posts_nothing(self) -> None:
        """Data before any hello closes the connection and nothing of it is posted."""
        server = self.start_http_server()
        port = await self.start_daemon(http_config(server))

        early = await self.connect_device(port, "early")
        early.send(DENMARK, COMMIT_REQUEST)
        await self.wait_until(lambda: early.closed, "the relay to close the device")
        self.assertEqual(bytes(early.received), b"")

        # A complete upload after it shows the relay had nothing else queued.
        device = await self.connect_device(port)
        device.send(DART_HELLO, FIXED, COMMIT_REQUEST)
        await self.wait_until(lambda: device.got(MessageType.COMMIT_RESPONSE), "0x06")
        self.assertEqual([seq_numbers(p.body) for p in server.requests], [FIXED_SEQ])


class TcpRelayEndToEndTests(_RelayTestCase):
    """The daemon with a raw TCP connector."""

    async def test_frames_forwarded_byte_for_byte(self) -> None:
        """Hello, data and commit reach the end server as sent; 0x14/0x22/0x30 are answered by the relay."""
        server = self.start_dm_server(commit_delay=0.5)
        port = await self.start_daemon(tcp_config(server.port))
        device = await self.connect_device(port)

        # The hello first, so the relay's link to the end server is up before
        # the frames it must keep to itself arrive.
        device.send(DART_HELLO)
        await self.wait_until(
            lambda: server.connections and server.connections[0].received == DART_HELLO,
            "the end server to get the hello",
        )
        device.send(VERSION_DATA, ASYNC_REQUEST, TIME_REQUEST, DENMARK, FIXED, COMMIT_REQUEST)
        await self.wait_until(lambda: device.got(MessageType.COMMIT_RESPONSE), "0x06")

        self.assertEqual(len(server.connections), 1)
        upstream = server.connections[0]
        self.assertEqual(bytes(upstream.received), DART_HELLO + DENMARK + FIXED + COMMIT_REQUEST)
        self.assertEqual(
            device.types(),
            [
                MessageType.HELLO_RESPONSE,
                MessageType.VERSION_RESPONSE,
                MessageType.ASYNC_SESSION_COMPLETE,
                MessageType.TIME_RESPONSE,
                MessageType.COMMIT_RESPONSE,
            ],
        )
        self.assert_hello_response(device)
        version, session_complete, time_reply, commit = device.frames[1:]
        self.assertEqual(version.payload, bytes(12))
        self.assertEqual(session_complete.payload, b"")
        (device_time,) = struct.unpack("<I", time_reply.payload)
        self.assertLess(abs(device_time - (time.time() - EPOCH_2013)), 120)
        self.assertEqual(commit.to_bytes(), COMMIT_OK)
        before_commit = self.events[: self.events.index(("device", MessageType.COMMIT_RESPONSE))]
        self.assertIn(("tcp", "answered"), before_commit)

        device.transport.loseConnection()
        await self.wait_until(lambda: upstream.closed, "the relay to close the end server link")

    async def test_other_frames_passed_on_from_the_start(self) -> None:
        """0x26 and unknown types sent with the hello reach the end server after it, before the upload."""
        server = self.start_dm_server()
        port = await self.start_daemon(tcp_config(server.port))
        device = await self.connect_device(port)
        unknown = encode_frame(0x7E, b"\x01\x02\x03")
        socket_close = encode_frame(MessageType.SOCKET_CLOSE)

        device.send(DART_HELLO, unknown, DENMARK, COMMIT_REQUEST, socket_close)
        await self.wait_until(lambda: device.got(MessageType.COMMIT_RESPONSE), "0x06")
        await self.wait_until(
            lambda: server.connections[0].received.endswith(socket_close), "the 0x26 frame"
        )

        self.assertEqual(
            bytes(server.connections[0].received),
            DART_HELLO + unknown + DENMARK + COMMIT_REQUEST + socket_close,
        )
        self.assertEqual(device.types(), [MessageType.HELLO_RESPONSE, MessageType.COMMIT_RESPONSE])

    async def test_end_server_refusal_means_no_commit(self) -> None:
        """An end server answering the commit with 0x06 00: the device gets no 0x06 and is disconnected."""
        server = self.start_dm_server(commit_status=b"\x00")
        port = await self.start_daemon(tcp_config(server.port))
        device = await self.connect_device(port)

        device.send(DART_HELLO, DENMARK, COMMIT_REQUEST)
        await self.wait_until(lambda: device.closed, "the relay to close the device")

        self.assertEqual(device.types(), [MessageType.HELLO_RESPONSE])
        self.assertEqual(
            bytes(server.connections[0].received), DART_HELLO + DENMARK + COMMIT_REQUEST
        )

    async def test_unreachable_end_server_means_no_commit(self) -> None:
        """An end server port nobody listens on: the device is disconnected without 0x06."""
        port = await self.start_daemon(tcp_config(unused_port()))
        device = await self.connect_device(port)

        device.send(DART_HELLO, DENMARK, COMMIT_REQUEST)
        await self.wait_until(lambda: device.closed, "the relay to close the device")

        self.assertNotIn(MessageType.COMMIT_RESPONSE, device.types())
        self.assertIn("cannot connect to end server", self.daemon.output.decode())


class FileRelayEndToEndTests(_RelayTestCase):
    """The daemon on the sample configuration's file connector."""

    async def test_sample_config_appends_json_line(self) -> None:
        """With etc/relay.ini and a temporary path, a commit appends one valid OEM JSON line."""
        uploads = os.path.abspath(self.mktemp()) + ".jsonl"
        sample = (PROJECT / "etc" / "relay.ini").read_text(encoding="utf-8")
        # [relay] listen and [api] listen, both on free loopback ports.
        config, listens = re.subn(r"(?m)^listen\s*=\s*\S+", f"listen = {LISTEN}", sample)
        config, paths = re.subn(r"(?m)^path\s*=\s*\S+", f"path = {uploads}", config)
        self.assertEqual((listens, paths), (2, 1))
        port = await self.start_daemon(config)
        device = await self.connect_device(port)

        device.send(DART_HELLO, AUCKLAND, COMMIT_REQUEST)
        await self.wait_until(lambda: device.got(MessageType.COMMIT_RESPONSE), "0x06")

        self.assertEqual(bytes(device.received[13:]), COMMIT_OK)
        with open(uploads, encoding="utf-8") as f:
            lines = f.read().split("\n")
        self.assertEqual(len(lines), 2)  # one line and its newline
        self.assertEqual(lines[1], "")
        document = json.loads(lines[0])
        self.assertEqual(document["SerNo"], DART_SERIAL)
        self.assertEqual([r["SeqNo"] for r in document["Records"]], AUCKLAND_SEQ)


class DaemonCommandTests(_RelayTestCase):
    """The ``twistd oemrelay`` command itself."""

    async def exit_output(self, config_text: str) -> tuple[str, str]:
        """
        Start twistd on ``config_text`` and wait for it to exit with status 1
        (so systemd sees the start fail) and no traceback.

        :return: the configuration's path and the daemon's output.
        """
        path = self.write_config(config_text)
        daemon, _ = self.spawn_twistd(path)
        self.daemon = daemon
        await self.wait_until(lambda: daemon.ended, "twistd to exit", START_TIMEOUT)
        self.assertEqual(daemon.exit_code, 1)
        output = daemon.output.decode("utf-8", "replace")
        self.assertNotIn("Traceback", output)
        return path, output

    async def test_bad_config_is_one_line_and_status_1(self) -> None:
        """An unknown key makes twistd exit 1 with one line naming file, section and key."""
        path, output = await self.exit_output(
            f"[relay]\nlisten = {LISTEN}\n\n"
            "[connector:main]\ntype = file\npath = uploads.jsonl\ncolour = blue\n"
        )
        lines = [line for line in output.splitlines() if line.strip()]
        self.assertEqual(len(lines), 1, output)
        self.assertIn(path, lines[0])
        self.assertIn("[connector:main]", lines[0])
        self.assertIn("colour", lines[0])
        self.assertEqual(self.daemon.port, None)

    async def test_port_in_use_is_one_line_and_status_1(self) -> None:
        """A listen port already taken makes twistd exit 1, naming [relay] listen, with no traceback."""
        taken = socket.socket()
        self.addCleanup(taken.close)
        taken.bind((LOOPBACK, 0))
        taken.listen()
        busy = taken.getsockname()[1]
        _, output = await self.exit_output(
            f"[relay]\nlisten = tcp:{busy}:interface={LOOPBACK}\n\n"
            "[connector:main]\ntype = file\npath = uploads.jsonl\n"
        )
        self.assertIn(f"[relay] listen: tcp:{busy}:interface={LOOPBACK}: cannot listen", output)

    async def test_registry_cannot_open(self) -> None:
        """A PostgreSQL registry on a closed loopback port: one critical line without the password, status 1."""
        port = unused_port()
        _, output = await self.exit_output(
            f"[relay]\nlisten = {LISTEN}\n"
            f"registry = postgresql://relay:hunter2@127.0.0.1:{port}/oemrelay?connect_timeout=2\n\n"
            "[connector:main]\ntype = file\npath = uploads.jsonl\n"
        )
        lines = [line for line in output.splitlines() if "cannot open registry" in line]
        self.assertEqual(len(lines), 1, output)
        self.assertIn(f"127.0.0.1:{port}", lines[0])
        self.assertNotIn("hunter2", output)

    async def test_sigterm_stops_cleanly(self) -> None:
        """SIGTERM shuts the daemon down cleanly: connections and port closed, no error logged."""
        server = self.start_http_server()
        port = await self.start_daemon(http_config(server))
        device = await self.connect_device(port)
        device.send(DART_HELLO, DENMARK, COMMIT_REQUEST)
        await self.wait_until(lambda: device.got(MessageType.COMMIT_RESPONSE), "0x06")

        self.daemon_process.signalProcess("TERM")
        await self.wait_until(lambda: self.daemon.ended, "the daemon to exit", STOP_TIMEOUT)

        # twistd stops its services, then ends by the signal it received.
        self.assertEqual((self.daemon.exit_code, self.daemon.signal), (None, 15))
        output = self.daemon.output.decode("utf-8", "replace")
        self.assertIn("Server Shut Down.", output)
        self.assertNotIn("Traceback", output)
        self.assertNotIn("Unhandled", output)
        await self.wait_until(lambda: device.closed, "the device connection to close")
        with self.assertRaises(ConnectError):
            await self.connect_device(port, "late")
