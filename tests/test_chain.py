"""
The whole raw TCP chain in memory: a device talks to DeviceProtocol and its
session, the relay routes to TcpConnector, whose TcpLink talks to a scripted
end server; both connections are iosim in-memory transports, no sockets.
"""

from __future__ import annotations

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.test.iosim import FakeTransport, IOPump, connect
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from oemrelay.codec import COMMIT_REQUEST, FrameDecoder, MessageType, encode_frame
from oemrelay.config import TcpConnectorConfig
from oemrelay.connectors.tcp import TcpConnector
from oemrelay.relay import Relay
from oemrelay.session import DeviceFactory

from .vectors import capture

HELLO_BYTES = capture("hello-49-byte-dart")
DATA_BYTES = capture("data-0x04-2-records-2021-denmark")
COMMIT_OK = encode_frame(MessageType.COMMIT_RESPONSE, b"\x01")
COMMIT_REFUSED = encode_frame(MessageType.COMMIT_RESPONSE, b"\x00")
END_SERVER_HELLO_RESPONSE = encode_frame(MessageType.HELLO_RESPONSE, bytes(8))


class _Recorder(Protocol):
    """A connection end that keeps every byte it received and whether it was closed."""

    def __init__(self) -> None:
        self.received = b""
        self.closed = False

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure = None) -> None:
        self.closed = True

    def types(self) -> list[int]:
        """The message types of the frames received."""
        return [frame.type for frame in FrameDecoder().feed(self.received)]


class _ScriptedEndServer(_Recorder):
    """
    A raw TCP end server: sends ``on_connect`` first, answers the hello with a
    hello response and each commit request with ``commit_answer``.
    """

    def __init__(self, commit_answer: bytes, on_connect: bytes = b"") -> None:
        super().__init__()
        self._commit_answer = commit_answer
        self._on_connect = on_connect
        self._decoder = FrameDecoder()

    def connectionMade(self) -> None:
        if self._on_connect:
            self.transport.write(self._on_connect)

    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        for frame in self._decoder.feed(data):
            if frame.type == MessageType.HELLO:
                self.transport.write(END_SERVER_HELLO_RESPONSE)
            elif frame.type == MessageType.COMMIT_REQUEST:
                self.transport.write(self._commit_answer)


@implementer(IStreamClientEndpoint)
class _InMemoryEndpoint:
    """Connects the relay to a new scripted end server, when the chain next pumps."""

    def __init__(self, chain: _Chain) -> None:
        self._chain = chain

    def connect(self, factory: Factory) -> Deferred:
        connected: Deferred = Deferred()
        self._chain.connecting.append((factory, connected))
        return connected


class _Chain:
    """Devices, the relay and end servers, joined by in-memory connections."""

    def __init__(self, commit_answer: bytes, on_connect: bytes = b"") -> None:
        self._commit_answer = commit_answer
        self._on_connect = on_connect
        self.clock = Clock()
        connector = TcpConnector(
            TcpConnectorConfig("fwd", "tcp:host=192.0.2.1:port=5027"),
            _InMemoryEndpoint(self),
            65535,
        )
        self._devices = DeviceFactory(
            Relay({"fwd": connector}, "fwd", clock=self.clock),
            self.clock,
            commit_timeout=30,
            idle_timeout=600,
            max_message=65535,
        )
        self.connecting: list[tuple[Factory, Deferred]] = []
        self.end_servers: list[_ScriptedEndServer] = []
        self._pumps: list[IOPump] = []

    def device(self) -> _Recorder:
        """A device connected to the relay."""
        device = _Recorder()
        relay_side = self._devices.buildProtocol(IPv4Address("TCP", "198.51.100.7", 40000))
        self._join(relay_side, device)
        return device

    def _join(self, server: Protocol, client: Protocol) -> None:
        self._pumps.append(
            connect(
                server,
                FakeTransport(server, True),
                client,
                FakeTransport(client, False),
                greet=False,  # bytes move in pump(), after the endpoint's Deferred fired
            )
        )

    def pump(self) -> None:
        """Move bytes and complete connections until nothing moves."""
        moved = True
        while moved:
            moved = False
            while self.connecting:
                factory, connected = self.connecting.pop(0)
                link_side = factory.buildProtocol(IPv4Address("TCP", "192.0.2.1", 5027))
                end_server = _ScriptedEndServer(self._commit_answer, self._on_connect)
                self.end_servers.append(end_server)
                self._join(end_server, link_side)
                connected.callback(link_side)
                moved = True
            for pump in self._pumps:
                moved = pump.pump() or moved

    def upload(self, device: _Recorder) -> None:
        """The device says hello, sends one data frame and asks for a commit."""
        device.transport.write(HELLO_BYTES + DATA_BYTES + COMMIT_REQUEST)
        self.pump()


class ChainTests(SynchronousTestCase):
    """Device to relay to raw TCP end server, all in memory."""

    def test_hello_and_records_forwarded_byte_for_byte(self) -> None:
        """The end server receives the device's hello, its data frame as sent, then a commit request."""
        chain = _Chain(COMMIT_OK)
        chain.upload(chain.device())
        [end_server] = chain.end_servers
        self.assertEqual(end_server.received, HELLO_BYTES + DATA_BYTES + COMMIT_REQUEST)

    def test_committed_after_end_server_accepts(self) -> None:
        """The device gets its hello response, then 06 01 once the end server answered 06 01."""
        chain = _Chain(COMMIT_OK)
        device = chain.device()
        chain.upload(device)
        self.assertEqual(device.types(), [MessageType.HELLO_RESPONSE, MessageType.COMMIT_RESPONSE])
        self.assertTrue(device.received.endswith(COMMIT_OK))
        self.assertFalse(device.closed)

    def test_commit_waits_for_end_server(self) -> None:
        """No commit reaches the device while the end server has not answered the commit request."""
        chain = _Chain(commit_answer=b"")
        device = chain.device()
        chain.upload(device)
        self.assertEqual(device.types(), [MessageType.HELLO_RESPONSE])
        self.assertFalse(device.closed)

    def test_withheld_on_refusal(self) -> None:
        """An end server's 06 00 withholds the commit and closes the device connection."""
        chain = _Chain(COMMIT_REFUSED)
        device = chain.device()
        chain.upload(device)
        self.assertEqual(device.types(), [MessageType.HELLO_RESPONSE])
        self.assertTrue(device.closed)

    def test_end_server_going_away_closes_device(self) -> None:
        """The end server closing its connection closes the device's, with no commit."""
        chain = _Chain(commit_answer=b"")
        device = chain.device()
        chain.upload(device)
        chain.end_servers[0].transport.loseConnection()
        chain.pump()
        self.assertTrue(device.closed)
        self.assertEqual(device.types(), [MessageType.HELLO_RESPONSE])

    def test_stray_commit_ok_never_commits(self) -> None:
        """An end server that sends one stray 06 01 on connect, then refuses: none of 10 uploads is committed."""
        chain = _Chain(COMMIT_REFUSED, on_connect=COMMIT_OK)
        devices = [chain.device() for _ in range(10)]
        for device in devices:
            chain.upload(device)
        self.assertEqual(
            [MessageType.COMMIT_RESPONSE in device.types() for device in devices], [False] * 10
        )
        self.assertTrue(all(device.closed for device in devices))
