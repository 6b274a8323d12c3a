"""
Tests for :mod:`oemrelay.connectors.tcp`: the relay plays the device towards
an end server, over in-memory connections.
"""

from __future__ import annotations

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from oemrelay.codec import (
    Frame,
    FrameDecoder,
    Hello,
    MessageType,
    encode_frame,
    parse_data_records,
    parse_fixed_records,
    parse_hello,
)
from oemrelay.config import TcpConnectorConfig
from oemrelay.connectors import build_connector
from oemrelay.connectors.tcp import MAX_UNSENT_FRAMES, TcpConnector, TcpLink
from oemrelay.relay import DeliveryFailed, DeviceProfile, Upload

from .vectors import capture

HELLO_BYTES = capture("hello-49-byte-dart")
HELLO = parse_hello(FrameDecoder().feed(HELLO_BYTES)[0].payload)
DATA_BYTES = capture("data-0x04-2-records-2021-denmark")
FIXED_BYTES = capture("fixed64-0x10-1-record-G50")
_DATA = FrameDecoder().feed(DATA_BYTES)[0]
_FIXED = FrameDecoder().feed(FIXED_BYTES)[0]
UPLOAD = Upload(HELLO, (_DATA,), tuple(parse_data_records(_DATA.payload)), 0.0)
TWO_FRAME_UPLOAD = Upload(
    HELLO,
    (_DATA, _FIXED),
    tuple(parse_data_records(_DATA.payload)) + tuple(parse_fixed_records(_FIXED.payload)),
    0.0,
)
PROFILE = DeviceProfile()

COMMIT_REQUEST = bytes.fromhex("0255050000")
COMMIT_OK = bytes.fromhex("025506010001")
COMMIT_REFUSED = bytes.fromhex("025506010000")
#: What an end server answers to the hello: the time since 2013 and flags.
HELLO_RESPONSE = encode_frame(MessageType.HELLO_RESPONSE, bytes(8))


@implementer(IStreamClientEndpoint)
class FakeEndpoint:
    """A client endpoint whose connection attempts the test completes."""

    def __init__(self) -> None:
        self.attempts: list[tuple[Factory, Deferred]] = []
        self.cancelled: list[int] = []

    def connect(self, factory: Factory) -> Deferred:
        index = len(self.attempts)
        attempt: Deferred = Deferred(lambda d: self.cancelled.append(index))
        self.attempts.append((factory, attempt))
        return attempt

    def accept(self, index: int = 0) -> tuple[Protocol, StringTransport]:
        """Connect attempt ``index`` to an in-memory transport."""
        factory, attempt = self.attempts[index]
        protocol = factory.buildProtocol(IPv4Address("TCP", "192.0.2.1", 5027))
        transport = StringTransport()
        protocol.makeConnection(transport)
        attempt.callback(protocol)
        return protocol, transport

    def refuse(self, index: int = 0) -> None:
        """Fail attempt ``index`` as a refused connection."""
        self.attempts[index][1].errback(ConnectionRefusedError("192.0.2.1"))


class TcpLinkTests(SynchronousTestCase):
    """A TcpLink replays the device's hello, uploads and commits to the end server."""

    def setUp(self) -> None:
        self.endpoint = FakeEndpoint()
        self.connector = TcpConnector(TcpConnectorConfig("fwd", "tcp:host=h:port=1"), self.endpoint, 65535)
        self.lost: list[str] = []
        self.link = self.connector.open_link(HELLO, self.lost.append)

    def accept(self) -> tuple[Protocol, StringTransport]:
        """Connect the link, answer its hello and forget the hello it wrote."""
        protocol, transport = self.endpoint.accept()
        protocol.dataReceived(HELLO_RESPONSE)
        transport.clear()
        return protocol, transport

    def end_server_closes(self, protocol: Protocol, transport: StringTransport) -> None:
        transport.loseConnection()
        protocol.connectionLost(Failure(ConnectionDone()))

    def test_open_connects(self) -> None:
        """Opening a link starts one connection attempt to the endpoint."""
        self.assertIsInstance(self.link, TcpLink)
        self.assertEqual(len(self.endpoint.attempts), 1)

    def test_hello_written(self) -> None:
        """Once connected, the device's hello frame is written byte for byte."""
        _, transport = self.endpoint.accept()
        self.assertEqual(transport.value(), HELLO_BYTES)

    def test_hello_from_fields(self) -> None:
        """A hello without its original payload is written encoded from its fields."""
        hello = Hello(6912, "353229027539251", "8991500000000130459", 4, 3, 4, 25)
        self.connector.open_link(hello, self.lost.append)
        _, transport = self.endpoint.accept(1)
        self.assertEqual(transport.value(), hello.to_frame())
        self.assertEqual(FrameDecoder().feed(transport.value())[0].type, MessageType.HELLO)

    def test_deliver_writes_frames_and_commit(self) -> None:
        """An upload is written as its frames exactly, then 02 55 05 00 00."""
        _, transport = self.accept()
        self.link.deliver(UPLOAD, PROFILE)
        self.assertEqual(transport.value(), DATA_BYTES + COMMIT_REQUEST)

    def test_deliver_several_frames(self) -> None:
        """An upload of several frames is written in order, then one commit request."""
        _, transport = self.accept()
        self.link.deliver(TWO_FRAME_UPLOAD, PROFILE)
        self.assertEqual(transport.value(), DATA_BYTES + FIXED_BYTES + COMMIT_REQUEST)

    def test_commit_success(self) -> None:
        """The delivery fires only when the end server answers 02 55 06 01 00 01."""
        protocol, _ = self.accept()
        done = self.link.deliver(UPLOAD, PROFILE)
        self.assertNoResult(done)
        protocol.dataReceived(COMMIT_OK)
        self.assertIsNone(self.successResultOf(done))
        self.assertEqual(self.lost, [])

    def test_commit_split(self) -> None:
        """A commit response arriving a byte at a time is still recognised."""
        protocol, _ = self.accept()
        done = self.link.deliver(UPLOAD, PROFILE)
        for byte in COMMIT_OK[:-1]:
            protocol.dataReceived(bytes([byte]))
            self.assertNoResult(done)
        protocol.dataReceived(COMMIT_OK[-1:])
        self.successResultOf(done)

    def test_commit_refused(self) -> None:
        """Commit status 00 fails the delivery with DeliveryFailed naming the status."""
        protocol, _ = self.accept()
        done = self.link.deliver(UPLOAD, PROFILE)
        protocol.dataReceived(COMMIT_REFUSED)
        failure = self.failureResultOf(done, DeliveryFailed)
        self.assertIn("00", str(failure.value))
        self.assertIn("connector fwd", str(failure.value))

    def test_commit_empty(self) -> None:
        """A commit response without a status byte fails the delivery."""
        protocol, _ = self.accept()
        done = self.link.deliver(UPLOAD, PROFILE)
        protocol.dataReceived(encode_frame(MessageType.COMMIT_RESPONSE))
        self.failureResultOf(done, DeliveryFailed)

    def test_two_uploads(self) -> None:
        """Successive uploads are answered in order by successive commit responses."""
        protocol, transport = self.accept()
        first = self.link.deliver(UPLOAD, PROFILE)
        protocol.dataReceived(COMMIT_OK)
        self.successResultOf(first)
        second = self.link.deliver(UPLOAD, PROFILE)
        self.assertEqual(transport.value(), (DATA_BYTES + COMMIT_REQUEST) * 2)
        protocol.dataReceived(COMMIT_REFUSED)
        self.failureResultOf(second, DeliveryFailed)

    def test_second_upload_while_committing_refused(self) -> None:
        """An upload offered while another awaits its commit response fails unwritten; the first still commits."""
        protocol, transport = self.accept()
        first = self.link.deliver(UPLOAD, PROFILE)
        transport.clear()
        second = self.link.deliver(UPLOAD, PROFILE)
        self.assertIn("already", str(self.failureResultOf(second, DeliveryFailed).value))
        self.assertEqual(transport.value(), b"")
        protocol.dataReceived(COMMIT_OK)
        self.successResultOf(first)
        self.assertEqual(self.lost, [])

    def test_hello_response_swallowed(self) -> None:
        """A repeated hello response neither answers a commit nor ends the link."""
        protocol, transport = self.accept()
        done = self.link.deliver(UPLOAD, PROFILE)
        protocol.dataReceived(HELLO_RESPONSE)
        self.assertNoResult(done)
        self.assertEqual(self.lost, [])
        self.assertFalse(transport.disconnecting)
        protocol.dataReceived(COMMIT_OK)
        self.successResultOf(done)

    def test_hello_response_with_commit(self) -> None:
        """A hello response and a commit response in one read are told apart."""
        done = self.link.deliver(UPLOAD, PROFILE)
        protocol, transport = self.endpoint.accept()
        protocol.dataReceived(HELLO_RESPONSE + COMMIT_OK)
        self.successResultOf(done)
        self.assertEqual(self.lost, [])

    def test_unexpected_commit_response(self) -> None:
        """A commit response nobody asked for calls on_lost: later answers could not be trusted."""
        protocol, transport = self.accept()
        protocol.dataReceived(COMMIT_OK)
        self.assertEqual(len(self.lost), 1)
        self.assertIn("commit response", self.lost[0])
        self.assertTrue(transport.disconnecting)
        self.failureResultOf(self.link.deliver(UPLOAD, PROFILE), DeliveryFailed)

    def test_second_commit_response_after_answer(self) -> None:
        """A second 0x06 for an answered commit calls on_lost instead of waiting to answer the next one."""
        protocol, transport = self.accept()
        first = self.link.deliver(UPLOAD, PROFILE)
        protocol.dataReceived(COMMIT_OK)
        self.successResultOf(first)
        protocol.dataReceived(COMMIT_OK)
        self.assertEqual(len(self.lost), 1)
        self.assertTrue(transport.disconnecting)

    def test_double_answer_in_one_read_not_taken_for_next_commit(self) -> None:
        """Two 0x06 in one read answer one commit: a commit requested meanwhile is not answered by the second."""
        protocol, transport = self.accept()
        first = self.link.deliver(UPLOAD, PROFILE)
        following: list[Deferred] = []
        # The session delivers the device's next upload as soon as the first is committed.
        first.addCallback(lambda _: following.append(self.link.deliver(UPLOAD, PROFILE)))
        protocol.dataReceived(COMMIT_OK + COMMIT_OK)
        self.successResultOf(first)
        self.failureResultOf(following[0], DeliveryFailed)
        self.assertEqual(len(self.lost), 1)

    def test_early_answer_before_commit_request(self) -> None:
        """A 0x06 01 sent while no commit request was outstanding does not answer the commit written next."""
        protocol, transport = self.accept()
        protocol.dataReceived(HELLO_RESPONSE + COMMIT_OK)
        done = self.link.deliver(UPLOAD, PROFILE)
        self.failureResultOf(done, DeliveryFailed)
        self.assertEqual(len(self.lost), 1)

    def test_deliver_before_connected(self) -> None:
        """An upload delivered while connecting waits for the hello response, then is written."""
        done = self.link.deliver(UPLOAD, PROFILE)
        self.assertNoResult(done)
        protocol, transport = self.endpoint.accept()
        self.assertEqual(transport.value(), HELLO_BYTES)
        protocol.dataReceived(HELLO_RESPONSE)
        self.assertEqual(transport.value(), HELLO_BYTES + DATA_BYTES + COMMIT_REQUEST)
        protocol.dataReceived(COMMIT_OK)
        self.successResultOf(done)

    def test_upload_waits_for_hello_response(self) -> None:
        """An upload delivered before the end server's hello response is not written until it comes."""
        protocol, transport = self.endpoint.accept()
        transport.clear()
        done = self.link.deliver(UPLOAD, PROFILE)
        self.assertEqual(transport.value(), b"")
        protocol.dataReceived(HELLO_RESPONSE)
        self.assertEqual(transport.value(), DATA_BYTES + COMMIT_REQUEST)
        self.assertNoResult(done)

    def test_stray_commit_ok_on_connect_commits_nothing(self) -> None:
        """A 06 01 sent on connect, before the hello response, fails the waiting upload: no false commit."""
        done = self.link.deliver(UPLOAD, PROFILE)
        protocol, transport = self.endpoint.accept()
        protocol.dataReceived(COMMIT_OK)
        self.failureResultOf(done, DeliveryFailed)
        self.assertEqual(len(self.lost), 1)
        self.assertIn("before its hello response", self.lost[0])
        self.assertTrue(transport.disconnecting)
        self.assertEqual(transport.value(), HELLO_BYTES)

    def test_stray_commit_ok_then_refusals_commit_nothing(self) -> None:
        """An end server sending one stray 06 01 then refusing with 06 00 gets no upload committed."""
        done = self.link.deliver(UPLOAD, PROFILE)
        protocol, _ = self.endpoint.accept()
        protocol.dataReceived(COMMIT_OK + HELLO_RESPONSE)
        protocol.dataReceived(COMMIT_REFUSED)
        self.failureResultOf(done, DeliveryFailed)
        self.failureResultOf(self.link.deliver(UPLOAD, PROFILE), DeliveryFailed)

    def test_commit_response_before_hello_response_idle(self) -> None:
        """A 0x06 before the hello response, with no upload waiting, loses the link."""
        protocol, transport = self.endpoint.accept()
        protocol.dataReceived(COMMIT_OK)
        self.assertEqual(len(self.lost), 1)
        self.assertTrue(transport.disconnecting)
        self.failureResultOf(self.link.deliver(UPLOAD, PROFILE), DeliveryFailed)

    def test_end_server_closes(self) -> None:
        """The end server closing fails the pending delivery and calls on_lost once."""
        protocol, transport = self.accept()
        done = self.link.deliver(UPLOAD, PROFILE)
        self.end_server_closes(protocol, transport)
        self.failureResultOf(done, DeliveryFailed)
        self.assertEqual(len(self.lost), 1)
        self.assertTrue(self.lost[0].startswith("connector fwd: "), self.lost[0])
        self.assertIn("closed", self.lost[0])

    def test_end_server_closes_idle(self) -> None:
        """The end server closing with nothing pending still calls on_lost once."""
        protocol, transport = self.accept()
        self.end_server_closes(protocol, transport)
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(len(self.lost), 1)

    def test_deliver_after_lost(self) -> None:
        """A delivery on a lost link fails with DeliveryFailed and writes nothing."""
        protocol, transport = self.accept()
        self.end_server_closes(protocol, transport)
        transport.clear()
        self.failureResultOf(self.link.deliver(UPLOAD, PROFILE), DeliveryFailed)
        self.assertEqual(transport.value(), b"")

    def test_cannot_connect(self) -> None:
        """A refused connection calls on_lost once with the reason."""
        self.endpoint.refuse()
        self.assertEqual(len(self.lost), 1)
        self.assertIn("cannot connect", self.lost[0])
        self.assertIn("connector fwd", self.lost[0])

    def test_cannot_connect_pending(self) -> None:
        """A delivery waiting for the connection fails when it is refused."""
        done = self.link.deliver(UPLOAD, PROFILE)
        self.endpoint.refuse()
        self.failureResultOf(done, DeliveryFailed)
        self.assertEqual(len(self.lost), 1)

    def test_forward(self) -> None:
        """forward() writes the frame as it travels on the wire."""
        _, transport = self.accept()
        frame = Frame(MessageType.SOCKET_CLOSE, b"")
        self.link.forward(frame)
        self.assertEqual(transport.value(), bytes.fromhex("0255260000"))

    def test_forward_unknown_type(self) -> None:
        """forward() passes on frames of unknown types with their payload."""
        _, transport = self.accept()
        self.link.forward(Frame(0x7E, b"\x01\x02"))
        self.assertEqual(transport.value(), bytes.fromhex("02557e02000102"))

    def test_flood_before_connected_closes(self) -> None:
        """More than MAX_UNSENT_FRAMES frames to pass on before the connection is up: the link is lost, nothing held."""
        for _ in range(MAX_UNSENT_FRAMES):
            self.link.forward(Frame(0x7E, b"x"))
        self.assertEqual(self.lost, [])
        self.link.forward(Frame(0x7E, b"x"))
        self.assertEqual(len(self.lost), 1)
        self.assertIn("frames to pass on", self.lost[0])

    def test_forward_after_close(self) -> None:
        """forward() after close() writes nothing."""
        _, transport = self.accept()
        self.link.close()
        self.link.forward(Frame(MessageType.SOCKET_CLOSE, b""))
        self.assertEqual(transport.value(), b"")

    def test_close(self) -> None:
        """close() closes the end-server connection without calling on_lost."""
        protocol, transport = self.accept()
        self.link.close()
        self.assertTrue(transport.disconnecting)
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.lost, [])

    def test_close_pending(self) -> None:
        """close() fails a delivery waiting for its commit response."""
        self.accept()
        done = self.link.deliver(UPLOAD, PROFILE)
        self.link.close()
        self.failureResultOf(done, DeliveryFailed)
        self.assertEqual(self.lost, [])

    def test_close_twice(self) -> None:
        """A second close() is harmless."""
        _, transport = self.accept()
        self.link.close()
        self.link.close()
        self.assertTrue(transport.disconnecting)

    def test_close_while_connecting(self) -> None:
        """close() before the connection is made cancels the attempt and fails waiting deliveries."""
        done = self.link.deliver(UPLOAD, PROFILE)
        self.link.close()
        self.assertEqual(self.endpoint.cancelled, [0])
        self.failureResultOf(done, DeliveryFailed)
        self.assertEqual(self.lost, [])

    def test_deliver_after_close(self) -> None:
        """A delivery after close() fails with DeliveryFailed."""
        self.accept()
        self.link.close()
        self.failureResultOf(self.link.deliver(UPLOAD, PROFILE), DeliveryFailed)

    def test_garbage(self) -> None:
        """Bytes that are no frame from the end server call on_lost and close the connection."""
        protocol, transport = self.accept()
        done = self.link.deliver(UPLOAD, PROFILE)
        protocol.dataReceived(b"HTTP/1.1 400 Bad Request\r\n")
        self.assertEqual(len(self.lost), 1)
        self.assertIn("protocol", self.lost[0])
        self.assertTrue(transport.disconnecting)
        self.failureResultOf(done, DeliveryFailed)
        protocol.dataReceived(b"more garbage")
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(len(self.lost), 1)

    def test_oversized_frame(self) -> None:
        """A frame longer than max_message from the end server calls on_lost."""
        connector = TcpConnector(TcpConnectorConfig("fwd", "tcp:host=h:port=1"), self.endpoint, 16)
        connector.open_link(HELLO, self.lost.append)
        protocol, _ = self.endpoint.accept(1)
        protocol.dataReceived(encode_frame(0x04, bytes(17))[:5])
        self.assertEqual(len(self.lost), 1)
        self.assertIn("max_message", self.lost[0])


class TcpConnectorTests(SynchronousTestCase):
    """TcpConnector built from configuration connects through the reactor."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.config = TcpConnectorConfig("fwd", "tcp:host=127.0.0.1:port=5027")
        self.lost: list[str] = []

    def test_name(self) -> None:
        """The connector is named after its section."""
        connector = TcpConnector.from_config(self.config, self.reactor, 65535)
        self.assertEqual((connector.name, connector.max_message), ("fwd", 65535))

    def test_build_connector(self) -> None:
        """build_connector gives a TcpConnector for a tcp section."""
        connector = build_connector(self.config, self.reactor, 1000)
        self.assertIsInstance(connector, TcpConnector)
        self.assertEqual(connector.max_message, 1000)

    def test_connects_per_link(self) -> None:
        """Each device connection gets its own connection to the configured host and port."""
        connector = TcpConnector.from_config(self.config, self.reactor, 65535)
        connector.open_link(HELLO, self.lost.append)
        connector.open_link(HELLO, self.lost.append)
        self.assertEqual(
            [(host, port) for host, port, *_ in self.reactor.tcpClients],
            [("127.0.0.1", 5027)] * 2,
        )

    def test_hello_through_reactor(self) -> None:
        """Over a reactor connection the hello is written on connect and commits work."""
        connector = TcpConnector.from_config(self.config, self.reactor, 65535)
        link = connector.open_link(HELLO, self.lost.append)
        factory = self.reactor.tcpClients[0][2]
        protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5027))
        transport = StringTransport()
        protocol.makeConnection(transport)
        self.assertEqual(transport.value(), HELLO_BYTES)
        done = link.deliver(UPLOAD, PROFILE)
        protocol.dataReceived(HELLO_RESPONSE + COMMIT_OK)
        self.successResultOf(done)

    def test_refused_through_reactor(self) -> None:
        """A refused reactor connection calls on_lost."""
        connector = TcpConnector.from_config(self.config, self.reactor, 65535)
        connector.open_link(HELLO, self.lost.append)
        factory = self.reactor.tcpClients[0][2]
        factory.clientConnectionFailed(None, Failure(ConnectionRefusedError("127.0.0.1")))
        self.assertEqual(len(self.lost), 1)
        self.assertIn("cannot connect", self.lost[0])

    def test_cancel_is_not_lost(self) -> None:
        """Closing while connecting through the reactor stops the attempt without on_lost."""
        connector = TcpConnector.from_config(self.config, self.reactor, 65535)
        link = connector.open_link(HELLO, self.lost.append)
        link.close()
        self.assertEqual(self.lost, [])
        [attempt] = self.reactor.connectors
        self.assertTrue(attempt.stoppedConnecting)


class OwnConnectionTests(SynchronousTestCase):
    """deliver_on_own_connection plays the device on a fresh connection, for the spool."""

    def setUp(self) -> None:
        self.endpoint = FakeEndpoint()
        self.connector = TcpConnector(
            TcpConnectorConfig("fwd", "tcp:host=h:port=1"), self.endpoint, 65535
        )

    def test_writes_hello_frames_commit(self) -> None:
        """The hello as received, then after its answer the frames and a commit request."""
        done = self.connector.deliver_on_own_connection(TWO_FRAME_UPLOAD)
        protocol, transport = self.endpoint.accept()
        self.assertEqual(transport.value(), HELLO_BYTES)
        protocol.dataReceived(HELLO_RESPONSE)
        self.assertEqual(
            transport.value(), HELLO_BYTES + DATA_BYTES + FIXED_BYTES + COMMIT_REQUEST
        )
        self.assertNoResult(done)
        protocol.dataReceived(COMMIT_OK)
        self.successResultOf(done)

    def test_closed_after_answer(self) -> None:
        """Once the end server answered, the connection is closed."""
        done = self.connector.deliver_on_own_connection(UPLOAD)
        protocol, transport = self.endpoint.accept()
        protocol.dataReceived(HELLO_RESPONSE + COMMIT_OK)
        self.successResultOf(done)
        self.assertTrue(transport.disconnecting)

    def test_refused_commit_fails(self) -> None:
        """06 00 fails the delivery and closes the connection."""
        done = self.connector.deliver_on_own_connection(UPLOAD)
        protocol, transport = self.endpoint.accept()
        protocol.dataReceived(HELLO_RESPONSE + COMMIT_REFUSED)
        failure = self.failureResultOf(done, DeliveryFailed)
        self.assertIn("status 00", str(failure.value))
        self.assertTrue(transport.disconnecting)

    def test_stray_commit_answer_fails(self) -> None:
        """A 06 01 before the hello answer never confirms the upload."""
        done = self.connector.deliver_on_own_connection(UPLOAD)
        protocol, _ = self.endpoint.accept()
        protocol.dataReceived(COMMIT_OK + HELLO_RESPONSE + COMMIT_OK)
        self.failureResultOf(done, DeliveryFailed)

    def test_unreachable_fails(self) -> None:
        """An end server that cannot be reached fails the delivery."""
        done = self.connector.deliver_on_own_connection(UPLOAD)
        self.endpoint.refuse()
        self.assertIn("cannot connect", str(self.failureResultOf(done, DeliveryFailed).value))

    def test_one_connection_per_delivery(self) -> None:
        """Each delivery opens a connection of its own."""
        self.connector.deliver_on_own_connection(UPLOAD)
        self.connector.deliver_on_own_connection(UPLOAD)
        self.assertEqual(len(self.endpoint.attempts), 2)


class TcpLinkTableTests(SynchronousTestCase):
    """TcpLink's transition table itself."""

    STATES = ("connecting", "connecting_with_upload", "greeting", "greeting_with_upload",
              "open", "committing", "closed")

    def test_every_state_answers_the_inputs_it_can_meet(self) -> None:
        """
        Every state has a row for every input but those it cannot meet: the
        end server's frames before its connection is made, a second
        connection made after it was.
        """
        inputs = {input_ for _, input_, _, _ in TcpLink._TABLE}
        cannot_meet = {
            "connecting": {"hello_response", "commit_response"},
            "connecting_with_upload": {"hello_response", "commit_response"},
            "closed": set(),
        }
        for state in self.STATES:
            wanted = inputs - cannot_meet.get(state, {"connection_made"})
            missing = sorted(i for i in wanted if (state, i) not in TcpLink._TRANSITIONS)
            self.assertEqual(missing, [], state)

    def test_one_row_per_pair(self) -> None:
        """No state and input pair has two rows (the compiled dict would hide one)."""
        self.assertEqual(len(TcpLink._TRANSITIONS), len(TcpLink._TABLE))

    def test_outputs_exist(self) -> None:
        """Every output the table names is a method of the link."""
        for _, _, to, outputs in TcpLink._TABLE:
            self.assertIn(to, self.STATES)
            for output in outputs:
                self.assertTrue(callable(getattr(TcpLink, output, None)), output)
