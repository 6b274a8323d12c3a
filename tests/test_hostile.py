"""
Tests for the device link's defences against hostile clients, in memory: a
device that never reads, slow hellos and trickled frames, connection floods,
and uploads that would decode to far more than their wire size.
"""

from __future__ import annotations

import struct
import tracemalloc

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import (
    EventLoggingObserver,
    StringTransportWithDisconnection,
)
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from oemrelay.codec import (
    MAX_FIELDS_PER_RECORD,
    MessageType,
    ProtocolError,
    decoded_cost,
    encode_frame,
    parse_data_records,
)
from oemrelay.session import (
    FRAME_TIMEOUT,
    HELLO_TIMEOUT,
    PeerNotices,
    State,
)

from .test_events import Recorder
from .test_session import (
    COMMIT,
    COMMIT_OK,
    DART_HELLO,
    DATA_2,
    NOW,
    PEER,
    PEER_TEXT,
    TIME_REQUEST,
    SessionTestMixin,
    payload,
    time_reply,
)


def record_with_empty_fields(count: int, seq: int = 1) -> bytes:
    """One 0x04 record payload holding ``count`` empty fields of an unknown id."""
    fields = bytes([200, 0]) * count
    return struct.pack("<HIIB", 11 + len(fields), seq, 1, 1) + fields


class HostileSessionMixin(SessionTestMixin):
    """Session tests with an event recorder subscribed."""

    def setUp(self) -> None:
        super().setUp()
        self.recorder = Recorder()
        self.relay.observers.subscribe(self.recorder)

    def events_named(self, name: str) -> list[tuple]:
        return [event for event in self.recorder.events if event[0] == name]

    def log_lines(self, level: LogLevel = LogLevel.warn) -> list[str]:
        return [formatEvent(e) for e in self.events if e["log_level"] == level]


class WriteBackpressureTests(HostileSessionMixin, SynchronousTestCase):
    """A device that does not read its answers stops being read."""

    def test_protocol_is_its_transports_streaming_producer(self) -> None:
        """The protocol registers with its transport as a streaming producer at connect."""
        self.assertIs(self.transport.producer, self.protocol)
        self.assertTrue(self.transport.streaming)

    def test_full_write_buffer_pauses_reading(self) -> None:
        """The transport pausing the protocol (write buffer over its mark) pauses reading."""
        self.greet()
        self.protocol.pauseProducing()
        self.assertEqual(self.transport.producerState, "paused")
        self.protocol.resumeProducing()
        self.assertEqual(self.transport.producerState, "producing")

    def test_drained_writes_keep_a_commit_paused(self) -> None:
        """Answers drained during a commit with frames waiting do not resume reading; the commit's end does."""
        self.connect_with(max_waiting_frames=1)
        link = self.greet()
        self.send(DATA_2, COMMIT, TIME_REQUEST, TIME_REQUEST)
        self.assertEqual(self.transport.producerState, "paused")
        self.protocol.pauseProducing()
        self.protocol.resumeProducing()
        self.assertEqual(self.transport.producerState, "paused")
        link.answer().callback(None)
        self.assertEqual(self.transport.producerState, "producing")

    def test_commit_end_keeps_full_writes_paused(self) -> None:
        """A commit answered while the write buffer is full leaves reading paused until it drains."""
        link = self.greet()
        self.send(DATA_2, COMMIT)
        self.protocol.pauseProducing()
        link.answer().callback(None)
        self.assertEqual(self.transport.producerState, "paused")
        self.protocol.resumeProducing()
        self.assertEqual(self.transport.producerState, "producing")

    def test_close_unregisters_the_producer(self) -> None:
        """Closing unregisters the producer, or loseConnection would wait for it for ever."""
        self.greet()
        self.send(b"\x99")  # bad sync: the relay closes
        self.assertIsNone(self.transport.producer)
        self.assertFalse(self.is_open)


class HelloTimeoutTests(HostileSessionMixin, SynchronousTestCase):
    """A connection must say hello within hello_timeout."""

    def test_no_hello_closed_at_hello_timeout(self) -> None:
        """A connection without a hello is open just before hello_timeout and closed at it."""
        self.clock.advance(HELLO_TIMEOUT - 0.001)
        self.assertTrue(self.is_open)
        self.clock.advance(0.001)
        self.assertFalse(self.is_open)
        self.assertEqual(self.events_named("connection_closed")[-1][3], "hello_timeout")

    def test_trickled_bytes_do_not_extend_it(self) -> None:
        """Bytes of a hello trickled one every 2 s, each resetting idle_timeout, still end at hello_timeout."""
        for byte in DART_HELLO[: int(HELLO_TIMEOUT / 2)]:
            self.send(bytes([byte]))
            self.clock.advance(2)
        self.assertFalse(self.is_open)

    def test_settled_deadline_not_kept(self) -> None:
        """Once the hello came its deadline is settled and dropped, and its timer with it."""
        self.assertEqual((len(self.factory.hello_deadlines()), self.timers_of(self.factory.hello_deadlines())), (1, 1))
        self.greet()
        self.assertIsNone(self.protocol.session._hello_deadline)
        self.assertEqual((len(self.factory.hello_deadlines()), self.timers_of(self.factory.hello_deadlines())), (0, 0))

    def test_connections_share_one_hello_timer(self) -> None:
        """
        Connections awaiting their hello hold one timer between them, and each
        is closed at its own hello_timeout.
        """
        self.clock.advance(1)
        _, later_transport = self.connect()
        self.assertEqual((len(self.factory.hello_deadlines()), self.timers_of(self.factory.hello_deadlines())), (2, 1))
        self.clock.advance(HELLO_TIMEOUT - 1)
        self.assertFalse(self.is_open)
        self.assertTrue(later_transport.connected)
        self.clock.advance(1)
        self.assertFalse(later_transport.connected)
        self.assertEqual(self.timers_of(self.factory.hello_deadlines()), 0)

    def test_hello_in_time_cancels_it(self) -> None:
        """A hello before hello_timeout keeps the connection past it."""
        self.clock.advance(HELLO_TIMEOUT - 1)
        self.greet()
        self.clock.advance(HELLO_TIMEOUT * 2)
        self.assertTrue(self.is_open)

    def test_configured_hello_timeout_used(self) -> None:
        """The factory's hello_timeout, not the default, is the deadline."""
        self.connect_with(hello_timeout=5)
        self.clock.advance(5)
        self.assertFalse(self.is_open)

    def test_logged_once_per_address_per_minute(self) -> None:
        """Ten hello timeouts from one address at once make one warning; the next, a minute on, tells the count."""
        for _ in range(9):
            self.connect()
        self.clock.advance(HELLO_TIMEOUT)
        self.clock.advance(60 - HELLO_TIMEOUT)
        for _ in range(10):
            self.connect()
        self.clock.advance(HELLO_TIMEOUT)
        lines = [line for line in self.log_lines() if "no hello" in line]
        self.assertEqual(len(lines), 2, lines)
        self.assertIn(PEER_TEXT, lines[0])
        self.assertIn("9 more", lines[1])


class FrameTimeoutTests(HostileSessionMixin, SynchronousTestCase):
    """A frame once started must be completed within frame_timeout."""

    def test_trickled_frame_closed_at_frame_timeout(self) -> None:
        """A frame trickled a byte a second is aborted frame_timeout after its first byte."""
        self.greet()
        frame = encode_frame(MessageType.DATA_RECORDS, payload(DATA_2) * 100)
        for second in range(int(FRAME_TIMEOUT)):
            self.send(frame[second : second + 1])
            self.clock.advance(1)
        self.assertFalse(self.is_open)
        self.assertTrue(self.transport.disconnected, "abortConnection not used")
        self.assertEqual(self.events_named("connection_closed")[-1][3], "frame_timeout")

    def test_open_just_before_frame_timeout(self) -> None:
        """A partial frame is tolerated until just before frame_timeout."""
        self.greet()
        self.send(TIME_REQUEST[:3])
        self.clock.advance(FRAME_TIMEOUT - 0.001)
        self.assertTrue(self.is_open)
        self.send(TIME_REQUEST[3:])
        self.clock.advance(FRAME_TIMEOUT)
        self.assertTrue(self.is_open)

    def test_each_completed_frame_restarts_the_deadline(self) -> None:
        """A device always mid-frame but completing one every 10 s stays open well past frame_timeout."""
        self.greet()
        self.send(TIME_REQUEST[:2])
        for _ in range(int(FRAME_TIMEOUT)):
            self.clock.advance(10)
            self.send(TIME_REQUEST[2:] + TIME_REQUEST[:2])
        self.assertTrue(self.is_open)

    def test_not_while_the_relay_is_not_reading(self) -> None:
        """A partial frame left while frames waiting for a commit pause reading is not the device's fault."""
        self.connect_with(frame_timeout=COMMIT_WAIT / 2, max_waiting_frames=1)
        link = self.greet()
        self.send(DATA_2 + COMMIT + TIME_REQUEST * 2 + TIME_REQUEST[:2])
        self.assertEqual(self.transport.producerState, "paused")
        self.clock.advance(COMMIT_WAIT)
        self.assertTrue(self.is_open)
        link.answer().callback(None)
        self.assertEqual(self.take(), COMMIT_OK + time_reply(NOW + COMMIT_WAIT) * 2)
        self.clock.advance(COMMIT_WAIT / 2)
        self.assertFalse(self.is_open)


#: Less than the session tests' commit_timeout (20 s).
COMMIT_WAIT = 10.0

OTHER_PEER = IPv4Address("TCP", "203.0.113.50", 1000)


class ConnectionLimitTests(HostileSessionMixin, SynchronousTestCase):
    """max_connections sheds pre-hello sockets first; max_connections_per_ip refuses."""

    def connect_from(self, address: IPv4Address = PEER):
        """A new connection from ``address``: its protocol and transport."""
        protocol = self.factory.buildProtocol(address)
        transport = StringTransportWithDisconnection(peerAddress=address)
        transport.protocol = protocol
        protocol.makeConnection(transport)
        return protocol, transport

    def test_at_the_limit_the_oldest_without_hello_is_shed(self) -> None:
        """A new connection at max_connections closes the oldest pre-hello one, not a device with a hello."""
        self.connect_with(max_connections=3)
        self.greet()  # the first connection, now a device
        greeted = self.transport
        _, first_bare = self.connect_from()
        _, second_bare = self.connect_from()
        self.assertEqual(self.factory.connections, 3)
        _, newcomer = self.connect_from()
        self.assertTrue(greeted.connected)
        self.assertFalse(first_bare.connected)
        self.assertTrue(second_bare.connected)
        self.assertTrue(newcomer.connected)
        self.assertEqual(self.factory.connections, 3)
        self.assertEqual(self.events_named("connection_closed")[-1][3], "shed")

    def test_a_pre_hello_connection_that_left_is_not_the_one_shed(self) -> None:
        """At the limit the oldest pre-hello connection still open is shed, not one that already closed."""
        self.connect_with(max_connections=2)
        self.greet()
        greeted = self.transport
        _, gone = self.connect_from()
        gone.loseConnection()
        _, waiting = self.connect_from()
        _, newcomer = self.connect_from()
        self.assertTrue(greeted.connected)
        self.assertFalse(waiting.connected)
        self.assertTrue(newcomer.connected)
        self.assertEqual(self.factory.connections, 2)

    def test_below_the_limit_nothing_is_shed(self) -> None:
        """max_connections - 1 open connections and one more: nothing is shed or refused."""
        self.connect_with(max_connections=3)
        _, second = self.connect_from()
        _, third = self.connect_from()
        self.assertTrue(all(t.connected for t in (self.transport, second, third)))
        self.assertEqual(self.events_named("connection_refused"), [])

    def test_refused_when_every_connection_said_hello(self) -> None:
        """At max_connections with every device greeted, the new connection is refused and counted."""
        self.connect_with(max_connections=1)
        self.greet()
        _, refused = self.connect_from(OTHER_PEER)
        self.assertFalse(refused.connected)
        self.assertTrue(self.is_open)
        self.assertEqual(
            self.events_named("connection_refused"),
            [("connection_refused", "203.0.113.50", "max_connections")],
        )

    def test_closed_connections_free_their_place(self) -> None:
        """A connection that ended no longer counts toward max_connections."""
        self.connect_with(max_connections=1)
        self.greet()
        self.transport.loseConnection()
        protocol, transport = self.connect_from(OTHER_PEER)
        self.protocol, self.transport = protocol, transport
        self.greet()
        self.assertTrue(transport.connected)
        self.assertEqual(self.factory.connections, 1)

    def test_per_ip_limit_refuses_the_next_at_its_first_bytes(self) -> None:
        """With max_connections_per_ip 2, a third connection from one address is refused when its bytes arrive."""
        self.connect_with(max_connections_per_ip=2)
        self.greet()
        second, second_transport = self.connect_from()
        second.dataReceived(DART_HELLO)
        third, third_transport = self.connect_from()
        self.assertTrue(third_transport.connected)
        third.dataReceived(DART_HELLO)
        self.assertFalse(third_transport.connected)
        self.assertEqual(third_transport.value(), b"", "a refused device was answered")
        self.assertTrue(second_transport.connected)
        self.assertEqual(
            self.events_named("connection_refused"),
            [("connection_refused", PEER_TEXT, "max_connections_per_ip")],
        )
        _, other_transport = self.connect_from(OTHER_PEER)
        self.assertTrue(other_transport.connected)

    def test_per_ip_count_released_on_close(self) -> None:
        """A closed connection's address may connect again under max_connections_per_ip 1."""
        self.connect_with(max_connections_per_ip=1)
        self.greet()
        self.transport.loseConnection()
        self.protocol, self.transport = self.connect_from()
        self.greet()
        self.assertTrue(self.is_open)

    def test_per_ip_uses_the_address_at_the_first_bytes(self) -> None:
        """Behind haproxy the address counted is the one known at the first bytes, not the balancer's."""
        self.connect_with(max_connections_per_ip=1)
        balancer = IPv4Address("TCP", "10.0.0.1", 443)
        self.protocol, self.transport = self.connect_from(balancer)
        self.transport.peerAddr = PEER
        self.greet()
        protocol, transport = self.connect_from(balancer)
        transport.peerAddr = OTHER_PEER
        protocol.dataReceived(DART_HELLO)
        self.assertTrue(transport.connected)

    def test_refusals_logged_once_per_minute(self) -> None:
        """Fifty refusals from one address in a minute are one warning line."""
        self.connect_with(max_connections=1)
        self.greet()
        for _ in range(50):
            self.connect_from(OTHER_PEER)
        lines = [line for line in self.log_lines() if "refusing" in line]
        self.assertEqual(len(lines), 1)
        self.assertIn("203.0.113.50", lines[0])
        self.assertIn("max_connections 1", lines[0])
        self.assertEqual(len(self.events_named("connection_refused")), 50)


class PeerNoticesTests(SynchronousTestCase):
    """One log line per address per interval."""

    def test_interval_boundary(self) -> None:
        """A second notice just inside the interval is held back; one at the interval is logged with the count."""
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        clock = Clock()
        notices = PeerNotices(clock, interval=60)
        notices.tell("192.0.2.1:1", "x {peer}")
        clock.advance(59.999)
        notices.tell("192.0.2.1:2", "x {peer}")
        self.assertEqual(len(events), 1)
        clock.advance(0.001)
        notices.tell("192.0.2.1:3", "x {peer}")
        self.assertEqual(len(events), 2)
        self.assertIn("1 more", formatEvent(events[1]))

    def test_addresses_are_separate(self) -> None:
        """Two addresses each get their line; the port is not part of the address."""
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        notices = PeerNotices(Clock())
        notices.tell("192.0.2.1:1", "x {peer}")
        notices.tell("192.0.2.2:1", "x {peer}")
        notices.tell("[2001:db8::1]:5", "x {peer}")
        notices.tell("[2001:db8::1]:6", "x {peer}")
        self.assertEqual(len(events), 3)


class UploadCostTests(HostileSessionMixin, SynchronousTestCase):
    """An upload is bounded by records and by decoded cost, not only by wire bytes."""

    def send_records(self, record_payload: bytes) -> None:
        self.send(encode_frame(MessageType.DATA_RECORDS, record_payload))

    def test_records_per_upload_boundary(self) -> None:
        """max_records_per_upload records are committed; one more closes the connection uncommitted."""
        self.connect_with(max_records_per_upload=4)
        link = self.greet()
        self.send(DATA_2, DATA_2, COMMIT)
        link.answer().callback(None)
        self.assertEqual(self.take(), COMMIT_OK)
        self.send(DATA_2, DATA_2)
        self.assertTrue(self.is_open)
        self.send(DATA_2)
        self.assert_closed_with_warning("max_records_per_upload 4")
        self.assertEqual(len(link.uploads), 1)

    def test_upload_memory_boundary(self) -> None:
        """Records costing exactly max_upload_memory are accepted; the next record closes uncommitted."""
        records = parse_data_records(payload(DATA_2))
        cost = decoded_cost(records, len(payload(DATA_2)))
        self.connect_with(max_upload_memory=2 * cost)
        link = self.greet()
        self.send(DATA_2, DATA_2)
        self.assertTrue(self.is_open)
        self.send(encode_frame(MessageType.DATA_RECORDS, record_with_empty_fields(0)))
        self.assert_closed_with_warning("max_upload_memory")
        self.assertEqual(link.deliveries, [])

    def test_empty_fields_cost_more_than_their_wire_size(self) -> None:
        """Thousands of 2-byte empty fields hit max_upload_memory long before the wire budget."""
        self.connect_with(max_upload_memory=1024 * 1024)
        link = self.greet()
        for seq in range(200):
            self.send_records(record_with_empty_fields(MAX_FIELDS_PER_RECORD, seq) * 50)
            if not self.is_open:
                break
        self.assertFalse(self.is_open)
        self.assertLess(seq, 100, "closed only after more than 1.3 MB of wire bytes")
        self.assertEqual(link.deliveries, [])

    def test_commit_restarts_the_cost(self) -> None:
        """Each commit starts the decoded-cost budget afresh."""
        records = parse_data_records(payload(DATA_2))
        self.connect_with(max_upload_memory=decoded_cost(records, len(payload(DATA_2))))
        link = self.greet()
        for _ in range(3):
            self.send(DATA_2, COMMIT)
            link.answer().callback(None)
        self.assertEqual(len(link.uploads), 3)
        self.assertIs(self.protocol.session.state, State.IDLE)


class DecodedCostTests(SynchronousTestCase):
    """The codec's own bounds on what a payload may decode to."""

    def test_fields_per_record_boundary(self) -> None:
        """A record of MAX_FIELDS_PER_RECORD fields decodes; one more field is a ProtocolError."""
        (record,) = parse_data_records(record_with_empty_fields(MAX_FIELDS_PER_RECORD))
        self.assertEqual(len(record.fields), MAX_FIELDS_PER_RECORD)
        with self.assertRaises(ProtocolError) as raised:
            parse_data_records(record_with_empty_fields(MAX_FIELDS_PER_RECORD + 1))
        self.assertIn(str(MAX_FIELDS_PER_RECORD), str(raised.exception))

    def test_cost_estimate_is_above_measured_memory(self) -> None:
        """decoded_cost is at least what tracemalloc measures for empty-field records."""
        data = record_with_empty_fields(MAX_FIELDS_PER_RECORD) * 200
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            records = parse_data_records(data)
            used = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        self.assertGreaterEqual(decoded_cost(records, len(data)), used)
