"""
Tests for :mod:`oemrelay.session`: the device protocol rules and the commit
decision, driven through :class:`DeviceProtocol` over an in-memory transport,
a :class:`Clock` and a fake connector whose deliveries the tests complete.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import (
    EventLoggingObserver,
    StringTransportWithDisconnection,
)
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from oemrelay import session as session_module
from oemrelay.session import FRAMES, Input, State
from oemrelay.codec import (
    parse_hello,
    RawField,
    Record,
    encode_data_records,
    EPOCH_2013,
    MAX_PAYLOAD,
    Frame,
    Hello,
    MessageType,
    encode_frame,
    parse_data_records,
)
from oemrelay.registry import Command, RegistryError
from oemrelay.relay import DeliveryFailed, DeviceProfile, Relay, Upload
from oemrelay.session import DeviceFactory, DeviceProtocol

from .fakes import FakeConnector, FakeLink
from .vectors import capture

PEER = IPv4Address("TCP", "198.51.100.7", 40123)
PEER_TEXT = "198.51.100.7:40123"

#: 2024-01-01 00:00:00 UTC; its hello response is given in docs/protocol.rst, "Hello response (0x01)".
NOW = EPOCH_2013 + 347_068_800
HELLO_RESPONSE_AT_NOW = bytes.fromhex("025501080080d9af1400000000")
G50_HELLO_RESPONSE = bytes.fromhex("02550105000000000000")

COMMIT = encode_frame(MessageType.COMMIT_REQUEST)
COMMIT_OK = bytes.fromhex("025506010001")
VERSION_REPLY = bytes.fromhex("0255150c00") + bytes(12)
ASYNC_COMPLETE = bytes.fromhex("0255230000")
TIME_REQUEST = encode_frame(MessageType.TIME_REQUEST)
SOCKET_CLOSE = encode_frame(MessageType.SOCKET_CLOSE)
VERSION_DATA = encode_frame(
    MessageType.VERSION_DATA,
    struct.pack("<IIB", 129336, 0xFFFFFFFF, 1) + bytes.fromhex("01020304"),
)

DART_HELLO = capture("hello-49-byte-dart")
DART_HELLO_2 = capture("hello-49-byte-dart-2")
G50_HELLO = capture("hello-51-byte-G50")
DATA_2 = capture("data-0x04-2-records-2021-denmark")
DATA_12 = capture("data-0x04-12-records-2017-auckland")
DATA_20 = capture("data-0x04-20-records-dart-after-reset")
FIXED_1 = capture("fixed64-0x10-1-record-G50")
FIXED_2 = capture("fixed64-0x10-2-records-G50")
ASYNC_REQUEST = capture("async-session-request-0x22")

COMMIT_TIMEOUT = 20.0
IDLE_TIMEOUT = 600.0


def time_reply(unix_time: float) -> bytes:
    """The 0x31 frame the relay should send at ``unix_time``."""
    return encode_frame(
        MessageType.TIME_RESPONSE, struct.pack("<I", int(unix_time) - EPOCH_2013)
    )


def payload(frame_bytes: bytes) -> bytes:
    """The payload of one encoded frame."""
    return frame_bytes[5:]


class SessionTestMixin:
    """A factory with a fake connector, a clock and captured log events."""

    max_message = MAX_PAYLOAD

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        self.connector = FakeConnector()
        self.relay = self.make_relay()
        self.events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self.connect_with()

    def connect_with(self, **limits: int) -> None:
        """Connect afresh to a factory given ``limits`` (max_uncommitted_bytes, ...)."""
        self.factory = DeviceFactory(
            self.relay,
            self.clock,
            commit_timeout=COMMIT_TIMEOUT,
            idle_timeout=IDLE_TIMEOUT,
            max_message=self.max_message,
            **limits,
        )
        self.protocol, self.transport = self.connect()

    def make_relay(self) -> Relay:
        """The relay the factory serves: the fake connector, no registry."""
        return Relay({"main": self.connector}, "main")

    def connect(self) -> tuple[DeviceProtocol, StringTransportWithDisconnection]:
        protocol = self.factory.buildProtocol(PEER)
        transport = StringTransportWithDisconnection(peerAddress=PEER)
        transport.protocol = protocol
        protocol.makeConnection(transport)
        return protocol, transport

    def timers_of(self, deadlines) -> int:
        """How many of the clock's timers are ``deadlines``' (a DeadlineQueue's)."""
        return sum(
            getattr(call.func, "__self__", None) is deadlines
            for call in self.clock.getDelayedCalls()
        )

    def send(self, *chunks: bytes) -> None:
        """Each chunk is one dataReceived call."""
        for chunk in chunks:
            self.protocol.dataReceived(chunk)

    def take(self) -> bytes:
        """What the relay wrote to the device since the last take."""
        written = self.transport.value()
        self.transport.clear()
        return written

    def greet(self, hello: bytes = DART_HELLO) -> FakeLink:
        """Send a hello, check it was answered, return the link it opened."""
        self.send(hello)
        self.assertTrue(self.take().startswith(b"\x02\x55\x01"))
        return self.connector.links[-1]

    @property
    def link(self) -> FakeLink:
        return self.connector.links[-1]

    @property
    def is_open(self) -> bool:
        return self.transport.connected

    def warnings(self) -> list[str]:
        return [
            formatEvent(event)
            for event in self.events
            if event["log_level"] == LogLevel.warn
        ]

    def assert_closed_with_warning(self, *words: str) -> None:
        """Closed, and one warning holds the peer and every word in ``words``."""
        self.assertFalse(self.is_open)
        for text in self.warnings():
            if PEER_TEXT in text and all(word in text for word in words):
                return
        self.fail(f"no warning with {PEER_TEXT} and {words} in {self.warnings()}")


class HelloTests(SessionTestMixin, SynchronousTestCase):
    """The hello message and its response."""

    def test_hello_49_answered_with_time_since_2013(self) -> None:
        """A 49-byte hello is answered with 0x01, seconds since 2013 from the clock and flags 0."""
        self.send(DART_HELLO)
        self.assertEqual(self.take(), HELLO_RESPONSE_AT_NOW)
        self.assertTrue(self.is_open)

    def test_peer_read_again_when_the_first_bytes_arrive(self) -> None:
        """The peer is the address known at the first bytes (a PROXY header parsed by then), not at connect."""
        self.transport.peerAddr = IPv4Address("TCP", "203.0.113.9", 5555)
        self.send(DART_HELLO)
        self.assertEqual(self.protocol.session.peer, "203.0.113.9:5555")
        self.transport.peerAddr = PEER
        self.send(DART_HELLO)
        self.assertEqual(self.protocol.session.peer, "203.0.113.9:5555")

    def test_peer_without_an_ip_address_named_by_its_text(self) -> None:
        """A peer that is no IP address (a UNIX socket, say) is named by its str()."""
        from twisted.internet.address import UNIXAddress

        self.transport.peerAddr = UNIXAddress(b"/run/oemrelay.sock")
        self.send(DART_HELLO)
        self.assertEqual(self.protocol.session.peer, str(UNIXAddress(b"/run/oemrelay.sock")))

    def test_hello_response_follows_the_clock(self) -> None:
        """The hello response time is the clock's time when the hello arrives."""
        self.clock.advance(20)  # within hello_timeout
        self.send(DART_HELLO)
        self.assertEqual(
            self.take(),
            encode_frame(MessageType.HELLO_RESPONSE, struct.pack("<II", 347_068_820, 0)),
        )

    def test_hello_51_answered_with_five_zeros(self) -> None:
        """A 51-byte (G50) hello is answered with 02 55 01 05 00 and five zero bytes."""
        self.send(G50_HELLO)
        self.assertEqual(self.take(), G50_HELLO_RESPONSE)

    def test_hello_opens_default_link(self) -> None:
        """The hello opens one link to the default connector, for that device."""
        self.send(DART_HELLO)
        self.assertEqual(len(self.connector.links), 1)
        self.assertEqual(self.link.hello.serial, 129336)
        self.assertEqual(self.link.hello.imei, "353323081669730")

    def test_session_knows_serial_after_hello(self) -> None:
        """The session's serial is 'unknown' before the hello and the device's after it."""
        self.assertEqual(self.protocol.session.serial, "unknown")
        self.send(DART_HELLO)
        self.assertEqual(self.protocol.session.serial, "129336")
        self.assertEqual(self.protocol.session.peer, PEER_TEXT)

    def test_second_hello_same_serial_answered(self) -> None:
        """A second hello with the same serial is answered and opens no new link."""
        self.greet()
        self.send(DART_HELLO_2)
        self.assertEqual(self.take(), HELLO_RESPONSE_AT_NOW)
        self.assertTrue(self.is_open)
        self.assertEqual(len(self.connector.links), 1)
        self.assertEqual(self.link.closed, 0)

    def test_second_hello_other_serial_closes(self) -> None:
        """A second hello with another serial closes the connection unanswered."""
        link = self.greet()
        self.send(G50_HELLO)
        self.assertEqual(self.take(), b"")
        self.assert_closed_with_warning("129336", "6912")
        self.assertEqual(link.closed, 1)

    def test_data_before_hello_closes(self) -> None:
        """Records before the hello close the connection; nothing is delivered."""
        self.send(DATA_2)
        self.assert_closed_with_warning("unknown", "before hello")
        self.assertEqual(self.connector.links, [])
        self.assertEqual(self.take(), b"")

    def test_commit_before_hello_closes(self) -> None:
        """A commit request before the hello closes the connection without a 0x06."""
        self.send(COMMIT)
        self.assert_closed_with_warning("unknown", "0x05")
        self.assertEqual(self.take(), b"")
        self.assertEqual(self.connector.links, [])

    def test_short_hello_closes(self) -> None:
        """A hello too short to hold serial, IMEI and ICCID closes the connection."""
        self.send(encode_frame(MessageType.HELLO, bytes(20)))
        self.assert_closed_with_warning("unknown", "hello")
        self.assertEqual(self.connector.links, [])


class CommitTests(SessionTestMixin, SynchronousTestCase):
    """Records gathered until a commit request, answered once delivered."""

    def test_records_then_commit_make_one_upload(self) -> None:
        """0x04 then 0x05 gives the link one upload with the exact frames and all records."""
        link = self.greet()
        self.send(DATA_2, COMMIT)
        self.assertEqual(len(link.deliveries), 1)
        upload, profile, _ = link.deliveries[0]
        self.assertEqual(upload.frames, (Frame(MessageType.DATA_RECORDS, payload(DATA_2)),))
        self.assertEqual(b"".join(frame.to_bytes() for frame in upload.frames), DATA_2)
        self.assertEqual(list(upload.records), parse_data_records(payload(DATA_2)))
        self.assertEqual([record.seq for record in upload.records], [565, 566])
        self.assertEqual(upload.hello.serial, 129336)
        self.assertEqual(upload.received_at, NOW)
        self.assertEqual(profile, DeviceProfile())

    def test_commit_answered_only_after_delivery(self) -> None:
        """0x06 01 is written only once the link's Deferred fires."""
        link = self.greet()
        self.send(DATA_2, COMMIT)
        self.assertEqual(self.take(), b"")
        link.answer().callback(None)
        self.assertEqual(self.take(), COMMIT_OK)
        self.assertTrue(self.is_open)

    def test_several_data_messages_one_upload(self) -> None:
        """Several 0x04 messages before one commit are delivered as one upload, in order."""
        link = self.greet()
        self.send(DATA_12, DATA_2, DATA_20)
        self.assertEqual(self.protocol.session.pending_records, 34)
        self.send(COMMIT)
        self.assertEqual(self.protocol.session.pending_records, 0)
        self.assertEqual(len(link.deliveries), 1)
        upload = link.uploads[0]
        self.assertEqual(
            b"".join(frame.to_bytes() for frame in upload.frames), DATA_12 + DATA_2 + DATA_20
        )
        self.assertEqual(
            [record.seq for record in upload.records],
            list(range(518, 530)) + [565, 566] + list(range(13, 33)),
        )
        self.assertEqual(upload.first_seq, 518)

    def test_data_and_commit_in_one_read(self) -> None:
        """Data and commit arriving in the same read give one upload."""
        link = self.greet()
        self.send(DATA_2 + COMMIT)
        self.assertEqual(len(link.uploads), 1)
        self.assertEqual(len(link.uploads[0].records), 2)

    def test_fixed_records_uploaded(self) -> None:
        """0x10 fixed records are uploaded as received, with their decoded records."""
        link = self.greet(G50_HELLO)
        self.send(FIXED_1, FIXED_2, COMMIT)
        upload = link.uploads[0]
        self.assertEqual(b"".join(frame.to_bytes() for frame in upload.frames), FIXED_1 + FIXED_2)
        self.assertEqual([record.seq for record in upload.records], [894124, 894125, 894126])
        self.assertEqual(self.warnings(), [])

    def test_next_commit_holds_only_new_records(self) -> None:
        """After a commit succeeded the next upload holds only the records sent after it."""
        link = self.greet()
        self.send(DATA_2, COMMIT)
        link.answer().callback(None)
        self.send(DATA_12, COMMIT)
        self.assertEqual(len(link.deliveries), 2)
        self.assertEqual(link.uploads[1].frames, (Frame(MessageType.DATA_RECORDS, payload(DATA_12)),))
        link.answer().callback(None)
        self.assertEqual(self.take(), COMMIT_OK * 2)

    def test_empty_commit_answered_at_once(self) -> None:
        """A commit with nothing pending is answered at once without any delivery."""
        link = self.greet()
        self.send(COMMIT)
        self.assertEqual(self.take(), COMMIT_OK)
        self.assertEqual(link.deliveries, [])
        self.assertEqual(len(self.connector.links), 1)
        self.assertEqual(self.transport.producerState, "producing")

    def test_empty_commit_after_commit_answered_at_once(self) -> None:
        """A second commit with nothing new is answered at once and delivers nothing again."""
        link = self.greet()
        self.send(DATA_2, COMMIT)
        link.answer().callback(None)
        self.take()
        self.send(COMMIT)
        self.assertEqual(self.take(), COMMIT_OK)
        self.assertEqual(len(link.deliveries), 1)

    def test_delivery_failure_closes_without_commit(self) -> None:
        """A DeliveryFailed closes the connection, writes no 0x06 and logs the reason."""
        link = self.greet()
        self.send(DATA_2, COMMIT)
        link.answer().errback(DeliveryFailed("connector main: end server answered 503"))
        self.assertEqual(self.take(), b"")
        self.assert_closed_with_warning("129336", "end server answered 503")
        self.assertEqual(link.closed, 1)

    def test_synchronous_delivery_failure_closes(self) -> None:
        """A link that raises DeliveryFailed at once closes the connection uncommitted."""
        link = self.greet()

        def refuse(upload: Upload, profile: DeviceProfile) -> Deferred[None]:
            raise DeliveryFailed("connector main: link is closed")

        link.deliver = refuse
        self.send(DATA_2, COMMIT)
        self.assertEqual(self.take(), b"")
        self.assert_closed_with_warning("129336", "link is closed")

    def test_unexpected_delivery_error_logged_and_closes(self) -> None:
        """An unexpected exception from a link is logged as a failure and the connection closes."""
        link = self.greet()
        self.send(DATA_2, COMMIT)
        link.answer().errback(ZeroDivisionError("oops"))
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        self.assertEqual(self.take(), b"")
        self.assert_closed_with_warning("129336", "oops")

    def test_commit_timeout_closes_and_cancels(self) -> None:
        """No answer within commit_timeout: no 0x06, closed, the link's Deferred cancelled."""
        link = self.greet()
        self.send(DATA_2, COMMIT)
        self.clock.advance(COMMIT_TIMEOUT - 0.5)
        self.assertTrue(self.is_open)
        self.assertEqual(link.cancelled, [])
        self.clock.advance(0.5)
        self.assertEqual(link.cancelled, [link.answer()])
        self.assertEqual(self.take(), b"")
        self.assert_closed_with_warning("129336", "commit_timeout")
        self.assertEqual(link.closed, 1)

    def test_successful_delivery_cancels_commit_timer(self) -> None:
        """Once a delivery succeeds its commit timer is gone and never fires."""
        link = self.greet()
        self.send(DATA_2, COMMIT)
        link.answer().callback(None)
        self.take()
        self.clock.advance(COMMIT_TIMEOUT * 2)
        self.assertTrue(self.is_open)
        self.assertEqual(link.cancelled, [])
        self.assertEqual(self.warnings(), [])

    def test_synchronous_delivery_success(self) -> None:
        """A link that accepts at once gets the 0x06 written straight away, then later frames answered."""
        link = self.greet()
        link.deliver = lambda upload, profile: succeed(None)
        self.send(DATA_2 + COMMIT + TIME_REQUEST)
        self.assertEqual(self.take(), COMMIT_OK + time_reply(NOW))
        self.assertEqual(self.transport.producerState, "producing")
        # No commit deadline left: the one timer is the idle sweep's.
        self.assertEqual(
            [call.getTime() for call in self.clock.getDelayedCalls()],
            [NOW + session_module.IDLE_SWEEP_INTERVAL],
        )


class CommitOrderTests(SessionTestMixin, SynchronousTestCase):
    """Frames read while a commit is delivered wait for it, in order."""

    def test_commit_reads_on_until_past_waiting_frames_limit(self) -> None:
        """During a commit reading goes on through 3 waiting frames, pauses at the fourth, resumes at its end."""
        self.connect_with(max_waiting_frames=3)
        link = self.greet()
        self.send(DATA_2, COMMIT)
        self.assertEqual(self.transport.producerState, "producing")
        self.send(TIME_REQUEST * 3)
        self.assertEqual(self.transport.producerState, "producing")
        self.send(TIME_REQUEST)
        self.assertEqual(self.transport.producerState, "paused")
        link.answer().callback(None)
        self.assertEqual(self.transport.producerState, "producing")
        self.assertEqual(self.take(), COMMIT_OK + time_reply(NOW) * 4)

    def test_frames_in_same_read_wait_for_commit(self) -> None:
        """A time request in the same read as the commit is answered after the 0x06."""
        link = self.greet()
        self.send(DATA_2 + COMMIT + TIME_REQUEST)
        self.assertEqual(self.take(), b"")
        self.clock.advance(2)
        link.answer().callback(None)
        self.assertEqual(self.take(), COMMIT_OK + time_reply(NOW + 2))

    def test_frames_in_later_reads_wait_for_commit(self) -> None:
        """Frames read while a commit is pending are handled after it, in order."""
        link = self.greet()
        self.send(DATA_2, COMMIT)
        self.send(VERSION_DATA, ASYNC_REQUEST + SOCKET_CLOSE)
        self.assertEqual(self.take(), b"")
        self.assertEqual(link.forwarded, [])
        link.answer().callback(None)
        self.assertEqual(self.take(), COMMIT_OK + VERSION_REPLY + ASYNC_COMPLETE)
        self.assertEqual(link.forwarded, [Frame(MessageType.SOCKET_CLOSE, b"")])

    def test_second_commit_waits_for_first(self) -> None:
        """A second upload queued behind a commit is delivered only after the first, separately."""
        link = self.greet()
        self.send(DATA_2 + COMMIT + DATA_12 + COMMIT + TIME_REQUEST)
        self.assertEqual(len(link.deliveries), 1)
        self.assertEqual(len(link.uploads[0].records), 2)
        link.answer(0).callback(None)
        self.assertEqual(self.take(), COMMIT_OK)
        self.assertEqual(len(link.deliveries), 2)
        self.assertEqual(len(link.uploads[1].records), 12)
        link.answer(1).callback(None)
        self.assertEqual(self.take(), COMMIT_OK + time_reply(NOW))
        self.assertEqual(self.transport.producerState, "producing")

    def test_waiting_frames_dropped_when_commit_fails(self) -> None:
        """Frames waiting behind a failed commit are never handled or delivered."""
        link = self.greet()
        self.send(DATA_2 + COMMIT + DATA_12 + COMMIT + TIME_REQUEST)
        link.answer().errback(DeliveryFailed("connector main: refused"))
        self.assertEqual(self.take(), b"")
        self.assertEqual(len(link.deliveries), 1)
        self.assertFalse(self.is_open)


class CannedReplyTests(SessionTestMixin, SynchronousTestCase):
    """Messages the relay answers itself, and those it passes on."""

    def test_version_data_answered_with_12_zeros(self) -> None:
        """Each 0x14 is answered with 0x15 and 12 zero bytes and is not forwarded."""
        link = self.greet()
        self.send(VERSION_DATA + VERSION_DATA)
        self.assertEqual(self.take(), VERSION_REPLY * 2)
        self.assertEqual(link.forwarded, [])

    def test_async_session_answered_complete(self) -> None:
        """0x22 is answered with an empty 0x23 and is not forwarded."""
        link = self.greet()
        self.send(ASYNC_REQUEST)
        self.assertEqual(self.take(), ASYNC_COMPLETE)
        self.assertEqual(link.forwarded, [])

    def test_time_request_answered_with_time(self) -> None:
        """0x30 is answered with 0x31 holding the clock's seconds since 2013."""
        self.greet()
        self.clock.advance(61)
        self.send(TIME_REQUEST)
        self.assertEqual(self.take(), time_reply(NOW + 61))
        self.assertEqual(self.take(), b"")

    def test_socket_close_forwarded_unanswered(self) -> None:
        """0x26 gets no reply and is forwarded to the link."""
        link = self.greet()
        self.send(SOCKET_CLOSE)
        self.assertEqual(self.take(), b"")
        self.assertEqual(link.forwarded, [Frame(MessageType.SOCKET_CLOSE, b"")])
        self.assertTrue(self.is_open)

    def test_unknown_type_forwarded_unanswered(self) -> None:
        """An unknown message type gets no reply, is forwarded and the connection stays open."""
        link = self.greet()
        self.send(encode_frame(0x7E, b"\x01\x02\x03"))
        self.assertEqual(self.take(), b"")
        self.assertEqual(link.forwarded, [Frame(0x7E, b"\x01\x02\x03")])
        self.assertTrue(self.is_open)
        self.send(TIME_REQUEST)
        self.assertEqual(self.take(), time_reply(NOW))

    def test_unknown_type_not_part_of_upload(self) -> None:
        """A forwarded frame between data messages does not join the upload."""
        link = self.greet()
        self.send(DATA_2, encode_frame(0x7E, b"x"), COMMIT)
        self.assertEqual(link.uploads[0].frames, (Frame(MessageType.DATA_RECORDS, payload(DATA_2)),))


class BadInputTests(SessionTestMixin, SynchronousTestCase):
    """Input that breaks the protocol closes the connection uncommitted."""

    max_message = 1024

    def assert_nothing_committed(self, link: FakeLink) -> None:
        self.assertEqual(link.deliveries, [])
        self.assertNotIn(COMMIT_OK, self.take())
        self.assertEqual(link.closed, 1)
        # The commit request that follows is ignored: the session is over.
        self.send(COMMIT)
        self.assertEqual(self.take(), b"")

    def test_bad_sync_closes(self) -> None:
        """Bad sync bytes close the connection with a warning naming peer and serial."""
        link = self.greet()
        self.send(DATA_2, b"\x02\x56\x04\x00\x00")
        self.assert_closed_with_warning("129336", "sync")
        self.assert_nothing_committed(link)

    def test_frames_before_garbage_in_same_read_are_heard(self) -> None:
        """A hello followed by garbage in one read is answered, and the warning names its serial."""
        self.send(DART_HELLO + b"garbage!")
        self.assertEqual(self.take(), HELLO_RESPONSE_AT_NOW)
        self.assert_closed_with_warning("129336", "sync")
        self.assertEqual(len(self.warnings()), 1)

    def test_too_much_data_without_commit_closes(self) -> None:
        """Record data beyond max_uncommitted_bytes without a commit closes the connection, committing nothing."""
        self.connect_with(max_uncommitted_bytes=300)
        link = self.greet()
        self.send(DATA_2, DATA_2)
        self.assertTrue(self.is_open)
        self.send(DATA_2, COMMIT)
        self.assert_closed_with_warning("129336", "without a commit")
        self.assert_nothing_committed(link)

    def test_bad_first_byte_closes_at_once(self) -> None:
        """A wrong first sync byte closes before a whole header arrived."""
        link = self.greet()
        self.send(b"\x99")
        self.assert_closed_with_warning("129336", "sync")
        self.assert_nothing_committed(link)

    def test_oversized_length_closes(self) -> None:
        """A declared length above max_message closes the connection before its payload arrives."""
        link = self.greet()
        self.send(DATA_2, b"\x02\x55\x04\x01\x04")
        self.assert_closed_with_warning("129336", "1025", "max_message")
        self.assert_nothing_committed(link)

    def test_length_at_max_message_accepted(self) -> None:
        """A message exactly max_message long is accepted."""
        link = self.greet()
        self.send(encode_frame(0x7F, bytes(1024)))
        self.assertTrue(self.is_open)
        self.assertEqual(len(link.forwarded[0].payload), 1024)

    def test_malformed_data_records_close(self) -> None:
        """A 0x04 whose record overruns its message closes the connection uncommitted."""
        link = self.greet()
        self.send(DATA_2, encode_frame(MessageType.DATA_RECORDS, b"\xff\x00" + bytes(9)))
        self.assert_closed_with_warning("129336", "record")
        self.assert_nothing_committed(link)

    def test_truncated_data_records_close(self) -> None:
        """A 0x04 cut inside its last record closes the connection uncommitted."""
        link = self.greet()
        self.send(encode_frame(MessageType.DATA_RECORDS, payload(DATA_2)[:-3]))
        self.assert_closed_with_warning("129336")
        self.assert_nothing_committed(link)

    def test_fixed_records_not_multiple_of_64_close(self) -> None:
        """A 0x10 payload that is not a multiple of 64 bytes closes the connection uncommitted."""
        link = self.greet(G50_HELLO)
        self.send(FIXED_1, encode_frame(MessageType.FIXED_RECORDS, payload(FIXED_1)[:63]))
        self.assert_closed_with_warning("6912", "multiple of 64")
        self.assert_nothing_committed(link)

    def test_bad_fixed_checksum_delivered_with_warning(self) -> None:
        """A fixed record with a bad checksum is still delivered, with a warning naming serial and index."""
        broken = bytearray(FIXED_1)
        broken[-1] ^= 0xFF
        link = self.greet(G50_HELLO)
        self.send(bytes(broken))
        self.assertTrue(self.is_open)
        warnings = self.warnings()
        self.assertEqual(len(warnings), 1)
        self.assertIn("6912", warnings[0])
        self.assertIn("894124", warnings[0])
        self.assertIn("checksum", warnings[0])
        self.send(COMMIT)
        self.assertEqual(link.uploads[0].frames[0].to_bytes(), bytes(broken))
        self.assertEqual([record.seq for record in link.uploads[0].records], [894124])
        link.answer().callback(None)
        self.assertEqual(self.take(), COMMIT_OK)

    def test_protocol_error_leaves_no_timer(self) -> None:
        """A connection closed for bad input leaves no idle timer behind."""
        self.greet()
        self.send(b"\x02\x56")
        self.assertFalse(self.is_open)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class LimitTests(SessionTestMixin, SynchronousTestCase):
    """The per-connection limits given to the factory, at their boundaries."""

    def test_budget_restarts_after_each_commit(self) -> None:
        """With a budget of two messages, five upload-commit rounds on one connection all commit."""
        self.connect_with(max_uncommitted_bytes=2 * len(payload(DATA_2)))
        link = self.greet()
        for round_number in range(5):
            self.send(DATA_2, DATA_2, COMMIT)
            link.answer().callback(None)
            self.assertEqual(self.take(), COMMIT_OK, f"round {round_number}")
        self.assertTrue(self.is_open)
        self.assertEqual([len(upload.records) for upload in link.uploads], [4] * 5)

    def test_budget_exactly_filled_accepted(self) -> None:
        """Record data exactly at max_uncommitted_bytes is accepted and committed."""
        self.connect_with(max_uncommitted_bytes=2 * len(payload(DATA_2)))
        link = self.greet()
        self.send(DATA_2, DATA_2, COMMIT)
        self.assertTrue(self.is_open)
        self.assertEqual(len(link.uploads), 1)

    def test_budget_one_byte_over_closes(self) -> None:
        """Record data one byte beyond max_uncommitted_bytes closes the connection."""
        self.connect_with(max_uncommitted_bytes=2 * len(payload(DATA_2)) - 1)
        link = self.greet()
        self.send(DATA_2)
        self.assertTrue(self.is_open)
        self.send(DATA_2)
        self.assert_closed_with_warning("129336", str(2 * len(payload(DATA_2)) - 1))
        self.assertEqual(link.deliveries, [])

    def test_waiting_frames_limit_pauses_past_it(self) -> None:
        """With max_waiting_frames=3, reading stops at the fourth waiting frame, not the third."""
        self.connect_with(max_waiting_frames=3)
        self.greet()
        self.hold_in_async_session()
        self.send(TIME_REQUEST * 3)
        self.assertEqual(self.transport.producerState, "producing")
        self.send(TIME_REQUEST)
        self.assertEqual(self.transport.producerState, "paused")

    def hold_in_async_session(self) -> None:
        """Hold the relay in an async session: the registry's due_commands never answers."""
        self.relay.registry.due_commands = lambda serial, now: Deferred()
        self.send(ASYNC_REQUEST)
        self.assertEqual(self.protocol.session.state, State.ASYNC_SESSION)


class UnconfirmedRecordTests(SessionTestMixin, SynchronousTestCase):
    """The disconnect line counts the records the device still holds."""

    def left_with_device(self) -> int:
        """The ``uncommitted`` field of the one disconnect event logged."""
        [event] = [e for e in self.events if "disconnected" in e.get("log_format", "")]
        return event["uncommitted"]

    def test_withheld_upload_counted(self) -> None:
        """After a withheld commit of 2 records the disconnect line says 2 are left."""
        link = self.greet()
        self.send(DATA_2, COMMIT)
        link.answer().errback(DeliveryFailed("connector main: refused"))
        self.assertEqual(self.left_with_device(), 2)

    def test_upload_in_flight_counted(self) -> None:
        """A device leaving while its upload of 2 is delivered leaves 2 with the device."""
        self.greet()
        self.send(DATA_2, COMMIT)
        self.transport.loseConnection()
        self.assertEqual(self.left_with_device(), 2)

    def test_committed_records_not_counted(self) -> None:
        """Only records after the last successful commit count: 12, not 14."""
        link = self.greet()
        self.send(DATA_2, COMMIT)
        link.answer().callback(None)
        self.send(DATA_12)
        self.transport.loseConnection()
        self.assertEqual(self.left_with_device(), 12)

    def test_in_flight_and_gathered_counted(self) -> None:
        """An upload in flight and records gathered meanwhile count together."""
        link = self.greet()
        self.send(DATA_2, COMMIT)
        self.assertEqual(self.protocol.session.unconfirmed_records, 2)
        link.answer().callback(None)
        self.assertEqual(self.protocol.session.unconfirmed_records, 0)
        self.send(DATA_12, COMMIT)
        self.transport.loseConnection()
        link.answer().callback(None)
        self.assertEqual(self.left_with_device(), 12)


class StateTableTests(SessionTestMixin, SynchronousTestCase):
    """The session's transition table itself."""

    def test_every_state_answers_device_and_link_inputs(self) -> None:
        """Each state but OPENING has a row for every frame, drain, a lost end server, a protocol error and a lost connection."""
        external = FRAMES + (
            Input.DRAIN, Input.END_SERVER_LOST, Input.PROTOCOL_ERROR, Input.CONNECTION_LOST
        )
        transitions = session_module.DeviceSession._transitions
        for state in State:
            wanted = external if state is not State.OPENING else external[-3:]
            missing = [event for event in wanted if event not in transitions[state]]
            self.assertEqual(missing, [], state)

    def test_two_rows_for_one_pair_refused(self) -> None:
        """A table giving one state and input twice is refused when compiled."""
        row = (State.IDLE, Input.TIME, State.IDLE, ("_answer_time",))
        with self.assertRaises(ValueError):
            session_module._compile((row, row), session_module.DeviceSession)

    def test_states_and_inputs_hash_by_identity(self) -> None:
        """The table's keys hash in C (object's hash), not through Enum's Python __hash__."""
        for member in (*State, *Input):
            self.assertIs(type(member).__hash__, object.__hash__)
            self.assertEqual(hash(member), object.__hash__(member))

    def test_a_session_has_no_instance_dict(self) -> None:
        """Sessions are slotted: one per connection held, a dict each would cost 1.6 KB."""
        self.greet()
        self.assertFalse(hasattr(self.protocol.session, "__dict__"))

    def test_states_through_a_commit(self) -> None:
        """A session goes awaiting hello, idle, committing, idle, closed."""
        session = self.protocol.session
        seen = [session.state]
        link = self.greet()
        seen.append(session.state)
        self.send(DATA_2, COMMIT)
        seen.append(session.state)
        link.answer().callback(None)
        seen.append(session.state)
        self.transport.loseConnection()
        seen.append(session.state)
        self.assertEqual(
            seen,
            [State.AWAITING_HELLO, State.IDLE, State.COMMITTING, State.IDLE, State.CLOSED],
        )

    def test_closed_session_ignores_every_frame(self) -> None:
        """Once closed, no frame gets an answer or reaches the link."""
        link = self.greet()
        self.protocol.session.protocol_error("test")
        for frame in (DART_HELLO, DATA_2, COMMIT, VERSION_DATA, TIME_REQUEST, ASYNC_REQUEST, SOCKET_CLOSE):
            self.send(frame)
        self.assertEqual(self.take(), b"")
        self.assertEqual((link.deliveries, link.forwarded), ([], []))


class DrainTests(SessionTestMixin, SynchronousTestCase):
    """drain(): the relay stopping lets a commit under way finish, then closes."""

    def test_idle_connection_closes_at_once(self) -> None:
        """Draining an idle connection closes it and its link, gathered records uncommitted."""
        link = self.greet()
        self.send(DATA_2)
        self.protocol.session.drain()
        self.assertFalse(self.is_open)
        self.assertEqual((link.deliveries, link.closed), ([], 1))

    def test_commit_under_way_answered_then_closed(self) -> None:
        """A commit under way when draining starts is answered once delivered, then the connection closes."""
        link = self.greet()
        self.send(DATA_2, COMMIT)
        self.protocol.session.drain()
        self.assertTrue(self.is_open)
        link.answer().callback(None)
        self.assertEqual(self.take(), COMMIT_OK)
        self.assertFalse(self.is_open)
        self.assertEqual(link.closed, 1)

    def test_frames_while_draining_dropped(self) -> None:
        """Frames read while draining are neither answered nor delivered, then or later."""
        link = self.greet()
        self.send(DATA_2, COMMIT, TIME_REQUEST)
        self.protocol.session.drain()
        self.send(DATA_12, COMMIT, VERSION_DATA)
        link.answer().callback(None)
        self.assertEqual(self.take(), COMMIT_OK)
        self.assertEqual(len(link.deliveries), 1)

    def test_commit_withheld_while_draining_closes(self) -> None:
        """A commit timing out while draining is withheld: no 0x06, closed at commit_timeout."""
        link = self.greet()
        self.send(DATA_2, COMMIT)
        self.protocol.session.drain()
        self.clock.advance(COMMIT_TIMEOUT)
        self.assertEqual(link.cancelled, [link.answer()])
        self.assertEqual(self.take(), b"")
        self.assert_closed_with_warning("129336", "commit_timeout")


class StreamTests(SessionTestMixin, SynchronousTestCase):
    """Frames are found whatever the segmentation."""

    def test_byte_at_a_time_session(self) -> None:
        """A whole session delivered one byte per read gets every reply and one exact upload."""
        for byte in DART_HELLO + VERSION_DATA + ASYNC_REQUEST + DATA_12 + DATA_2 + COMMIT:
            self.send(bytes([byte]))
        self.assertEqual(self.take(), HELLO_RESPONSE_AT_NOW + VERSION_REPLY + ASYNC_COMPLETE)
        link = self.link
        self.assertEqual(len(link.deliveries), 1)
        upload = link.uploads[0]
        self.assertEqual(b"".join(frame.to_bytes() for frame in upload.frames), DATA_12 + DATA_2)
        self.assertEqual(len(upload.records), 14)
        link.answer().callback(None)
        for byte in TIME_REQUEST:
            self.send(bytes([byte]))
        self.assertEqual(self.take(), COMMIT_OK + time_reply(NOW))
        self.assertTrue(self.is_open)

    def test_whole_session_in_one_read(self) -> None:
        """A whole session in one read is answered in order, the time after the commit."""
        self.send(DART_HELLO + ASYNC_REQUEST + DATA_2 + COMMIT + TIME_REQUEST)
        self.assertEqual(self.take(), HELLO_RESPONSE_AT_NOW + ASYNC_COMPLETE)
        self.link.answer().callback(None)
        self.assertEqual(self.take(), COMMIT_OK + time_reply(NOW))


class IdleTimeoutTests(SessionTestMixin, SynchronousTestCase):
    """Silent connections are aborted."""

    def test_silent_connection_aborted(self) -> None:
        """A device silent for idle_timeout after its hello is aborted."""
        self.greet()
        self.clock.advance(IDLE_TIMEOUT - 1)
        self.assertTrue(self.is_open)
        self.clock.advance(1)
        self.assertFalse(self.is_open)
        self.assertTrue(self.transport.disconnected, "abortConnection not used")

    def test_activity_resets_idle_timer(self) -> None:
        """Each read restarts the idle timer."""
        link = self.greet()
        self.clock.advance(IDLE_TIMEOUT - 1)
        self.send(TIME_REQUEST)
        self.clock.advance(IDLE_TIMEOUT - 1)
        self.assertTrue(self.is_open)
        self.clock.advance(1)
        self.assertFalse(self.is_open)
        self.assertTrue(self.transport.disconnected)
        self.assertEqual(link.closed, 1)

    def test_closed_at_most_one_sweep_late_never_early(self) -> None:
        """Heard from between two sweeps: closed at the first sweep after idle_timeout, not before."""
        self.greet()
        self.clock.advance(0.5)
        self.send(TIME_REQUEST)  # heard at NOW + 0.5: silent for idle_timeout at NOW + 600.5
        self.clock.advance(IDLE_TIMEOUT - 0.001)
        self.assertTrue(self.is_open)
        self.clock.advance(session_module.IDLE_SWEEP_INTERVAL)
        self.assertFalse(self.is_open)

    def test_each_connection_by_its_own_silence(self) -> None:
        """The sweep closes the silent connection and keeps an older one that was heard from since."""
        first_transport = self.transport
        self.greet()
        self.clock.advance(10)
        self.protocol, self.transport = self.connect()
        self.greet()
        self.clock.advance(IDLE_TIMEOUT - 20)
        first_transport.protocol.dataReceived(TIME_REQUEST)  # the older one, heard again
        self.clock.advance(20)  # the newer one silent for idle_timeout now
        self.assertFalse(self.is_open)
        self.assertTrue(first_transport.connected)

    def test_sweep_as_often_as_a_short_idle_timeout(self) -> None:
        """With idle_timeout under the sweep interval, the sweep runs every idle_timeout."""
        short = session_module.IDLE_SWEEP_INTERVAL / 4
        self.factory = DeviceFactory(
            self.relay, self.clock, commit_timeout=short / 2, idle_timeout=short,
            max_message=self.max_message,
        )
        self.protocol, self.transport = self.connect()
        self.clock.advance(short)
        self.assertFalse(self.is_open)

    def test_no_sweep_once_every_connection_closed(self) -> None:
        """The sweep's timer goes with the last connection."""
        self.greet()
        self.transport.loseConnection()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_idle_abort_during_commit_no_commit(self) -> None:
        """A connection aborted while its commit is pending never gets the 0x06."""
        self.factory.idle_timeout = COMMIT_TIMEOUT / 2
        self.protocol, self.transport = self.connect()
        link = self.greet()
        self.send(DATA_2, COMMIT)
        self.clock.advance(COMMIT_TIMEOUT / 2)
        self.assertFalse(self.is_open)
        link.answer().callback(None)
        self.assertEqual(self.take(), b"")


class CommitDeadlineTests(SessionTestMixin, SynchronousTestCase):
    """Every connection of a factory shares one commit deadline queue."""

    TICK = 1e-6

    def commit_on_second_connection(self, later: float) -> tuple:
        """The first device commits now, a second one ``later`` seconds on."""
        first_link = self.greet()
        self.send(DATA_2, COMMIT)
        self.clock.advance(later)
        first = (self.protocol, self.transport)
        self.protocol, self.transport = self.connect()
        second_link = self.greet(DART_HELLO_2)
        self.send(DATA_2, COMMIT)
        return first, first_link, second_link

    def test_each_connection_times_out_at_its_own_commit_timeout(self) -> None:
        """Two commits 5 s apart time out 5 s apart, each exactly at commit_timeout."""
        (_, first_transport), first_link, second_link = self.commit_on_second_connection(5)
        self.clock.advance(COMMIT_TIMEOUT - 5 - self.TICK)
        self.assertTrue(first_transport.connected)
        self.clock.advance(self.TICK)
        self.assertFalse(first_transport.connected)
        self.assertEqual(first_link.cancelled, [first_link.answer()])
        self.clock.advance(5 - self.TICK)
        self.assertTrue(self.is_open)
        self.assertEqual(second_link.cancelled, [])
        self.clock.advance(self.TICK)
        self.assertFalse(self.is_open)
        self.assertEqual(second_link.cancelled, [second_link.answer()])

    def test_one_commit_timer_for_the_factory(self) -> None:
        """Deliveries under way on several connections hold one timer between them."""
        deadlines = self.factory.commit_deadlines()

        def commit_timers() -> int:
            return self.timers_of(deadlines)

        self.commit_on_second_connection(1)
        self.assertEqual(len(deadlines), 2)
        self.assertEqual(commit_timers(), 1)
        self.link.answer().callback(None)
        self.connector.links[0].answer().callback(None)
        self.assertEqual(commit_timers(), 0)

    def test_answer_a_tick_before_the_deadline_commits(self) -> None:
        """Accepted a tick before commit_timeout: the device is told to commit."""
        link = self.greet()
        self.send(DATA_2, COMMIT)
        self.clock.advance(COMMIT_TIMEOUT - self.TICK)
        link.answer().callback(None)
        self.assertEqual(self.take(), COMMIT_OK)
        self.clock.advance(COMMIT_TIMEOUT)
        self.assertTrue(self.is_open)

    def test_success_after_timing_out_still_withheld(self) -> None:
        """A delivery whose cancellation answers success is withheld all the same."""
        link = self.greet()
        link.deliver = lambda upload, profile: Deferred(lambda d: d.callback(None))
        self.send(DATA_2, COMMIT)
        self.clock.advance(COMMIT_TIMEOUT)
        self.assertEqual(self.take(), b"")
        self.assert_closed_with_warning("129336", "commit_timeout")

    def test_failure_after_timing_out_is_a_timeout(self) -> None:
        """A cancelled delivery failing with its connector's own error counts as a timeout, not a bug."""
        link = self.greet()
        link.deliver = lambda upload, profile: Deferred(
            lambda d: d.errback(ZeroDivisionError("cancelled its own way"))
        )
        self.send(DATA_2, COMMIT)
        self.clock.advance(COMMIT_TIMEOUT)
        self.assertEqual(self.flushLoggedErrors(ZeroDivisionError), [])
        self.assert_closed_with_warning("129336", "commit_timeout")

    def test_next_upload_gets_a_fresh_deadline(self) -> None:
        """After a commit, the next upload's commit_timeout counts from its own request."""
        link = self.greet()
        self.send(DATA_2, COMMIT)
        self.clock.advance(10)
        link.answer().callback(None)
        self.send(DATA_2, COMMIT)
        self.clock.advance(COMMIT_TIMEOUT - self.TICK)
        self.assertTrue(self.is_open)
        self.clock.advance(self.TICK)
        self.assertFalse(self.is_open)

    def test_changed_commit_timeout_starts_a_new_queue(self) -> None:
        """A factory whose commit_timeout changed gives new connections the new one."""
        self.factory.commit_timeout = COMMIT_TIMEOUT / 2
        self.protocol, self.transport = self.connect()
        self.greet()
        self.send(DATA_2, COMMIT)
        self.clock.advance(COMMIT_TIMEOUT / 2)
        self.assertFalse(self.is_open)


class DisconnectTests(SessionTestMixin, SynchronousTestCase):
    """The device or the end server going away."""

    def test_device_leaves_during_delivery(self) -> None:
        """If the device disconnects during a delivery, its later success writes no 0x06 and nothing fails."""
        link = self.greet()
        self.send(DATA_2, COMMIT)
        self.transport.loseConnection()
        self.assertEqual(link.closed, 1)
        link.answer().callback(None)
        self.assertEqual(self.take(), b"")
        self.assertEqual(self.warnings(), [])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_device_leaves_then_delivery_fails(self) -> None:
        """A delivery failing after the device left is not logged as a withheld commit."""
        link = self.greet()
        self.send(DATA_2, COMMIT)
        self.protocol.connectionLost(Failure(ConnectionDone()))
        link.answer().errback(DeliveryFailed("connector main: gone"))
        self.assertEqual(self.take(), b"")
        self.assertEqual(self.warnings(), [])

    def test_device_leaves_then_commit_times_out(self) -> None:
        """A delivery still pending after the device left is cancelled at commit_timeout."""
        link = self.greet()
        self.send(DATA_2, COMMIT)
        self.transport.loseConnection()
        self.clock.advance(COMMIT_TIMEOUT)
        self.assertEqual(link.cancelled, [link.answer()])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_device_leaves_closes_link(self) -> None:
        """A device disconnect closes its link once and leaves no timers."""
        link = self.greet()
        self.send(DATA_2)
        self.transport.loseConnection()
        self.assertEqual(link.closed, 1)
        self.assertEqual(link.deliveries, [])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_disconnect_before_hello(self) -> None:
        """A device leaving before its hello opens no link and logs nothing."""
        self.transport.loseConnection()
        self.assertEqual(self.connector.links, [])
        self.assertEqual(self.warnings(), [])

    def test_end_server_lost_closes_device(self) -> None:
        """The on_lost callback given to open_link closes the device connection."""
        link = self.greet()
        link.on_lost("connector main: end server closed the connection")
        self.assert_closed_with_warning("129336", "end server closed the connection")
        self.assertEqual(link.closed, 1)

    def test_end_server_lost_during_delivery(self) -> None:
        """The end server lost during a delivery closes the device uncommitted."""
        link = self.greet()
        self.send(DATA_2, COMMIT)
        link.on_lost("connector main: end server closed the connection")
        self.assertFalse(self.is_open)
        link.answer().errback(DeliveryFailed("connector main: end server closed the connection"))
        self.assertEqual(self.take(), b"")

    def test_end_server_lost_after_close_ignored(self) -> None:
        """on_lost after the device connection ended does nothing."""
        link = self.greet()
        self.transport.loseConnection()
        link.on_lost("connector main: late")
        self.assertEqual(self.warnings(), [])
        self.assertEqual(link.closed, 1)

    def test_end_server_lost_while_link_opens(self) -> None:
        """A link lost while it is being opened closes the device, unanswered, and closes the link."""
        opened: list[FakeLink] = []

        def open_failing(hello: Hello, on_lost: Callable[[str], None]) -> FakeLink:
            link = FakeLink(hello, on_lost)
            opened.append(link)
            on_lost("connector main: cannot connect to end server")
            return link

        self.connector.open_link = open_failing
        self.send(DART_HELLO)
        self.assert_closed_with_warning("129336", "cannot connect")
        self.assertEqual(self.take(), b"")
        self.assertEqual(opened[0].closed, 1)


# -- the device registry: async sessions (commands) and recorded events --------

NODE = "relay-a"

ODOMETER = Command(
    id=41,
    serial=129336,
    type="set_odometer",
    params={"metres": 10_000},
    message_type=0x0012,
    data=bytes.fromhex("e8030000"),
    status="queued",
    created=NOW - 60,
)
RECOVERY = Command(
    id=42,
    serial=129336,
    type="set_mode",
    params={"mode": "recovery"},
    message_type=0x0003,
    data=bytes.fromhex("03c0498e0d"),
    status="queued",
    created=NOW - 30,
)
RESET = Command(
    id=43,
    serial=129336,
    type="reset",
    params={},
    message_type=0x0002,
    data=b"",
    status="queued",
    created=NOW - 10,
)

#: The 0x20 frames for the commands above, written out from docs/protocol.rst, "Async session (0x22, 0x20, 0x21, 0x23)":
#: message id, CAN address 0xFFFFFFFF, async type, flags 0, data.
ODOMETER_MESSAGE = bytes.fromhex("0255200f00" "29000000" "ffffffff" "1200" "00" "e8030000")
RECOVERY_MESSAGE = bytes.fromhex("0255201000" "2a000000" "ffffffff" "0300" "00" "03c0498e0d")
RESET_MESSAGE = bytes.fromhex("0255200b00" "2b000000" "ffffffff" "0200" "00")


def async_answer(message_id: int, status: int) -> bytes:
    """The device's 0x21 frame answering message ``message_id`` with ``status``."""
    return encode_frame(MessageType.ASYNC_RESPONSE, struct.pack("<IB", message_id, status))


class FakeRegistry:
    """
    A device ledger recording every call.  Calls answer at once unless the
    test made them fail (``failing``) or hold (``hold``: the Deferreds wait in
    ``held`` until the test fires them).
    """

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple]] = []
        # What the relay had written to the device when each call was made.
        self.written_at_call: list[bytes] = []
        self.witness: Callable[[], bytes] = lambda: b""
        self.profile = DeviceProfile()
        self.commands: list[Command] = []
        # Command ids command_sent no longer finds queued.
        self.gone: set[int] = set()
        self.failing: dict[str, Exception] = {}
        self.held: dict[str, list[Deferred]] = {}

    def hold(self, name: str) -> None:
        """Leave later calls to ``name`` pending, in ``held[name]``."""
        self.held[name] = []

    def named(self, name: str) -> list[tuple]:
        """The arguments of every call to ``name``, in order."""
        return [args for called, args in self.calls if called == name]

    def _answer(self, name: str, args: tuple, value: object) -> Deferred:
        self.calls.append((name, args))
        self.written_at_call.append(self.witness())
        if name in self.failing:
            return fail(self.failing[name])
        if name in self.held:
            pending: Deferred = Deferred()
            self.held[name].append(pending)
            return pending
        return succeed(value)

    def profile_for(self, hello: Hello) -> Deferred[DeviceProfile]:
        return self._answer("profile_for", (hello,), self.profile)

    def device_connected(self, hello: Hello, node: str, now: float) -> Deferred:
        return self._answer("device_connected", (hello, node, now), None)

    def device_disconnected(self, serial: int, node: str, now: float) -> Deferred:
        return self._answer("device_disconnected", (serial, node, now), True)

    def upload_committed(self, serial: int, record_count: int, now: float) -> Deferred:
        return self._answer("upload_committed", (serial, record_count, now), True)

    def delivery_failed(self, serial: int, reason: str, now: float) -> Deferred:
        return self._answer("delivery_failed", (serial, reason, now), True)

    def due_commands(self, serial: int, now: float) -> Deferred[list]:
        return self._answer("due_commands", (serial, now), list(self.commands))

    def command_sent(self, command_id: int, now: float) -> Deferred:
        command = None
        if command_id not in self.gone:
            command = next(c for c in self.commands if c.id == command_id)
        return self._answer("command_sent", (command_id, now), command)

    def command_result(self, command_id: int, device_status: int, now: float) -> Deferred:
        return self._answer("command_result", (command_id, device_status, now), None)


class RegistryTestMixin(SessionTestMixin):
    """A session whose relay has a fake registry, a node name and the test clock."""

    def setUp(self) -> None:
        self.registry = FakeRegistry()
        super().setUp()
        self.registry.witness = lambda: self.transport.value()

    def make_relay(self) -> Relay:
        return Relay(
            {"main": self.connector}, "main", self.registry, node=NODE, clock=self.clock
        )

    def errors(self) -> list[str]:
        """Events logged at error level or above."""
        return [
            formatEvent(event)
            for event in self.events
            if event["log_level"] in (LogLevel.error, LogLevel.critical)
        ]

    def assert_warning(self, *words: str) -> None:
        """One warning holds every word in ``words``."""
        for text in self.warnings():
            if all(word in text for word in words):
                return
        self.fail(f"no warning with {words} in {self.warnings()}")


class AsyncSessionTests(RegistryTestMixin, SynchronousTestCase):
    """0x22: the device's due commands, one 0x20 per 0x21, then 0x23."""

    def start(self, *commands: Command) -> None:
        """Greet, queue ``commands`` and send the async session request."""
        self.registry.commands = list(commands)
        self.greet()
        self.send(ASYNC_REQUEST)

    def test_no_due_commands_answered_complete(self) -> None:
        """With no due commands 0x22 is answered with exactly one empty 0x23."""
        self.start()
        self.assertEqual(self.take(), ASYNC_COMPLETE)
        self.assertEqual(self.registry.named("due_commands"), [(129336, NOW)])
        self.assertEqual(self.registry.named("command_sent"), [])
        self.assertEqual(self.link.forwarded, [])

    def test_first_message_exact(self) -> None:
        """The first due command goes out alone as one exact 0x20: id, CAN 0xFFFFFFFF, type, flags 0, data."""
        self.start(ODOMETER, RECOVERY)
        self.assertEqual(self.take(), ODOMETER_MESSAGE)
        self.clock.advance(COMMIT_TIMEOUT / 2)
        self.assertEqual(self.take(), b"")

    def test_each_message_waits_for_its_answer(self) -> None:
        """The second 0x20 follows the 0x21 for the first, and 0x23 the 0x21 for the second."""
        self.start(ODOMETER, RECOVERY)
        self.assertEqual(self.take(), ODOMETER_MESSAGE)
        self.send(async_answer(41, 1))
        self.assertEqual(self.take(), RECOVERY_MESSAGE)
        self.send(async_answer(42, 1))
        self.assertEqual(self.take(), ASYNC_COMPLETE)
        self.assertTrue(self.is_open)
        self.assertEqual(self.link.forwarded, [])

    def test_flood_during_async_session_pauses_reading(self) -> None:
        """Past 32 frames waiting behind an async session the relay stops reading; it reads again after 0x23."""
        self.start(ODOMETER)
        self.assertEqual(self.take(), ODOMETER_MESSAGE)
        self.send(TIME_REQUEST * 32)
        self.assertEqual(self.transport.producerState, "producing")
        self.send(TIME_REQUEST)
        self.assertEqual(self.transport.producerState, "paused")
        self.send(async_answer(41, 1))
        self.assertEqual(self.transport.producerState, "producing")
        self.assertTrue(self.take().startswith(ASYNC_COMPLETE))

    def test_registry_hanging_ends_session(self) -> None:
        """A due_commands call that never answers ends the async session with 0x23 after commit_timeout."""
        self.registry.hold("due_commands")
        self.start(ODOMETER)
        self.assertEqual(self.take(), b"")
        self.clock.advance(COMMIT_TIMEOUT)
        self.assertEqual(self.take(), ASYNC_COMPLETE)
        self.assertTrue(self.is_open)

    def test_command_marked_sent_before_written(self) -> None:
        """command_sent is asked before each 0x20, which is written only once it answers."""
        self.registry.hold("command_sent")
        self.start(ODOMETER, RECOVERY)
        self.assertEqual(self.registry.named("command_sent"), [(41, NOW)])
        self.assertEqual(self.take(), b"")
        self.registry.held["command_sent"][0].callback(ODOMETER)
        self.assertEqual(self.take(), ODOMETER_MESSAGE)
        self.clock.advance(1)
        self.send(async_answer(41, 1))
        self.assertEqual(self.registry.named("command_sent"), [(41, NOW), (42, NOW + 1)])
        self.assertEqual(self.take(), b"")
        self.registry.held["command_sent"][1].callback(RECOVERY)
        self.assertEqual(self.take(), RECOVERY_MESSAGE)

    def test_command_no_longer_queued_skipped(self) -> None:
        """A command for which command_sent fires None is not sent; the next one is."""
        self.registry.gone = {41}
        self.start(ODOMETER, RECOVERY)
        self.assertEqual(self.registry.named("command_sent"), [(41, NOW), (42, NOW)])
        self.assertEqual(self.take(), RECOVERY_MESSAGE)
        self.send(async_answer(42, 1))
        self.assertEqual(self.take(), ASYNC_COMPLETE)
        self.assertEqual(self.registry.named("command_result"), [(42, 1, NOW)])

    def test_every_command_skipped_answered_complete(self) -> None:
        """If no due command is still queued when sent, the session is just 0x23."""
        self.registry.gone = {41, 42}
        self.start(ODOMETER, RECOVERY)
        self.assertEqual(self.take(), ASYNC_COMPLETE)
        self.assertEqual(self.registry.named("command_result"), [])

    def test_results_recorded_for_each_status(self) -> None:
        """command_result gets the id and the device's status: 0 failure, 1 success, 2 retry later."""
        self.start(ODOMETER, RECOVERY, RESET)
        self.assertEqual(self.take(), ODOMETER_MESSAGE)
        self.clock.advance(2)
        self.send(async_answer(41, 0))
        self.assertEqual(self.take(), RECOVERY_MESSAGE)
        self.send(async_answer(42, 1))
        self.assertEqual(self.take(), RESET_MESSAGE)
        self.clock.advance(3)
        self.send(async_answer(43, 2))
        self.assertEqual(self.take(), ASYNC_COMPLETE)
        self.assertEqual(
            self.registry.named("command_result"),
            [(41, 0, NOW + 2), (42, 1, NOW + 2), (43, 2, NOW + 5)],
        )

    def test_answer_for_other_id_ignored(self) -> None:
        """A 0x21 for another id is ignored with a warning and the session keeps waiting."""
        self.start(ODOMETER, RECOVERY)
        self.take()
        self.send(async_answer(99, 1))
        self.assertEqual(self.take(), b"")
        self.assertEqual(self.registry.named("command_result"), [])
        self.assert_warning("129336", "99", "41")
        self.assertTrue(self.is_open)
        self.send(async_answer(41, 1))
        self.assertEqual(self.take(), RECOVERY_MESSAGE)
        self.assertEqual(self.registry.named("command_result"), [(41, 1, NOW)])

    def test_no_answer_within_commit_timeout_ends_session(self) -> None:
        """No 0x21 within commit_timeout: 0x23, a warning, no result recorded, later commands not sent."""
        self.start(ODOMETER, RECOVERY)
        self.assertEqual(self.take(), ODOMETER_MESSAGE)
        self.clock.advance(COMMIT_TIMEOUT - 0.5)
        self.assertEqual(self.take(), b"")
        self.clock.advance(0.5)
        self.assertEqual(self.take(), ASYNC_COMPLETE)
        self.assert_warning("129336", "41", "20s")
        self.assertEqual(self.registry.named("command_result"), [])
        self.assertEqual(self.registry.named("command_sent"), [(41, NOW)])
        self.assertTrue(self.is_open)
        # The session is over: a late answer records nothing, other frames are answered.
        self.send(async_answer(41, 1), TIME_REQUEST)
        self.assertEqual(self.take(), time_reply(NOW + COMMIT_TIMEOUT))
        self.assertEqual(self.registry.named("command_result"), [])

    def test_answer_cancels_its_timer(self) -> None:
        """Once answered, a command's timer is gone: no warning and no extra 0x23 later."""
        self.start(ODOMETER)
        self.take()
        self.send(async_answer(41, 1))
        self.assertEqual(self.take(), ASYNC_COMPLETE)
        self.clock.advance(COMMIT_TIMEOUT * 2)
        self.assertEqual(self.take(), b"")
        self.assertEqual(self.warnings(), [])

    def test_frames_during_session_wait_for_complete(self) -> None:
        """Frames sent during the async session are handled after the 0x23, in order."""
        link = self.greet()
        self.registry.commands = [ODOMETER]
        self.send(ASYNC_REQUEST)
        self.assertEqual(self.take(), ODOMETER_MESSAGE)
        self.send(TIME_REQUEST, DATA_2 + COMMIT, VERSION_DATA)
        self.assertEqual(self.take(), b"")
        self.assertEqual(link.deliveries, [])
        self.clock.advance(1)
        self.send(async_answer(41, 1))
        self.assertEqual(self.take(), ASYNC_COMPLETE + time_reply(NOW + 1))
        self.assertEqual(len(link.deliveries), 1)
        self.assertEqual(link.uploads[0].frames, (Frame(MessageType.DATA_RECORDS, payload(DATA_2)),))
        link.answer().callback(None)
        self.assertEqual(self.take(), COMMIT_OK + VERSION_REPLY)

    def test_answer_split_across_reads(self) -> None:
        """A 0x21 arriving a byte at a time is acted on once its last byte arrives."""
        self.start(ODOMETER, RECOVERY)
        self.take()
        answer = async_answer(41, 1)
        for byte in answer[:-1]:
            self.send(bytes([byte]))
        self.assertEqual(self.take(), b"")
        self.send(answer[-1:])
        self.assertEqual(self.take(), RECOVERY_MESSAGE)
        self.assertEqual(self.registry.named("command_result"), [(41, 1, NOW)])

    def test_answer_in_one_read_with_other_frames(self) -> None:
        """A 0x21 between other frames in one read is taken at once; the others wait for the 0x23."""
        self.start(ODOMETER, RECOVERY)
        self.take()
        self.send(TIME_REQUEST + async_answer(41, 2) + VERSION_DATA)
        self.assertEqual(self.take(), RECOVERY_MESSAGE)
        self.send(async_answer(42, 1) + SOCKET_CLOSE)
        self.assertEqual(self.take(), ASYNC_COMPLETE + time_reply(NOW) + VERSION_REPLY)
        self.assertEqual(self.link.forwarded, [Frame(MessageType.SOCKET_CLOSE, b"")])
        self.assertEqual(self.registry.named("command_result"), [(41, 2, NOW), (42, 1, NOW)])

    def test_request_and_answers_in_one_read(self) -> None:
        """0x22 and the 0x21s for both commands in a single read complete the whole session."""
        self.registry.commands = [ODOMETER, RECOVERY]
        self.greet()
        self.send(ASYNC_REQUEST + async_answer(41, 1) + async_answer(42, 1) + TIME_REQUEST)
        self.assertEqual(
            self.take(), ODOMETER_MESSAGE + RECOVERY_MESSAGE + ASYNC_COMPLETE + time_reply(NOW)
        )

    def test_disconnect_while_waiting_for_answer(self) -> None:
        """The device leaving mid-session ends the wait: no 0x23, no error, no timer, no result."""
        link = self.greet()
        self.registry.commands = [ODOMETER, RECOVERY]
        self.send(ASYNC_REQUEST)
        self.take()
        self.transport.loseConnection()
        self.assertEqual(self.take(), b"")
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.errors(), [])
        self.assertEqual(self.warnings(), [])
        self.assertEqual(self.registry.named("command_result"), [])
        self.assertEqual(self.registry.named("command_sent"), [(41, NOW)])
        self.assertEqual(link.closed, 1)

    def test_disconnect_while_marking_sent(self) -> None:
        """The device leaving while command_sent is pending: nothing is written, and the command goes back to the queue."""
        self.registry.hold("command_sent")
        self.start(ODOMETER, RECOVERY)
        self.transport.loseConnection()
        self.registry.held["command_sent"][0].callback(ODOMETER)
        self.assertEqual(self.take(), b"")
        self.assertEqual(self.registry.named("command_sent"), [(41, NOW)])
        self.assertEqual(self.registry.named("command_result"), [(41, 2, NOW)])
        self.assertEqual(self.errors(), [])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_disconnect_while_commands_looked_up(self) -> None:
        """The device leaving while due_commands is pending: nothing is marked sent or written."""
        self.registry.hold("due_commands")
        self.start(ODOMETER)
        self.transport.loseConnection()
        self.registry.held["due_commands"][0].callback([ODOMETER])
        self.assertEqual(self.take(), b"")
        self.assertEqual(self.registry.named("command_sent"), [])
        self.assertEqual(self.errors(), [])

    def test_due_commands_failure_completes(self) -> None:
        """due_commands failing gives a warning naming the device and a plain 0x23."""
        self.registry.failing["due_commands"] = RegistryError("database is locked")
        self.start(ODOMETER)
        self.assertEqual(self.take(), ASYNC_COMPLETE)
        self.assert_warning("129336", "database is locked")
        self.assertEqual(self.registry.named("command_sent"), [])
        self.assertTrue(self.is_open)
        self.send(TIME_REQUEST)
        self.assertEqual(self.take(), time_reply(NOW))

    def test_command_sent_failure_completes(self) -> None:
        """command_sent failing sends no 0x20: a warning naming the device, 0x23, still connected."""
        self.registry.failing["command_sent"] = RegistryError("database is locked")
        self.start(ODOMETER, RECOVERY)
        self.assertEqual(self.take(), ASYNC_COMPLETE)
        self.assert_warning("129336", "41", "database is locked")
        self.assertEqual(self.errors(), [])
        self.assertTrue(self.is_open)
        self.send(TIME_REQUEST)
        self.assertEqual(self.take(), time_reply(NOW))

    def test_transport_not_paused(self) -> None:
        """The transport keeps reading during an async session, so the 0x21 can arrive."""
        self.start(ODOMETER)
        self.assertEqual(self.take(), ODOMETER_MESSAGE)
        self.assertEqual(self.transport.producerState, "producing")
        self.send(async_answer(41, 1))
        self.assertEqual(self.take(), ASYNC_COMPLETE)
        self.assertEqual(self.transport.producerState, "producing")

    def test_short_answer_closes(self) -> None:
        """A 0x21 too short for id and status during the session closes the connection, no 0x23."""
        self.start(ODOMETER)
        self.take()
        self.send(encode_frame(MessageType.ASYNC_RESPONSE, b"\x29\x00\x00"))
        self.assert_closed_with_warning("129336", "async response")
        self.assertEqual(self.take(), b"")
        self.assertEqual(self.registry.named("command_result"), [])
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.errors(), [])


class RegistryEventTests(RegistryTestMixin, SynchronousTestCase):
    """What the route records in the registry, and registry failures kept off the device path."""

    def test_hello_records_connection(self) -> None:
        """The hello records device_connected with the hello, the node and the clock's time."""
        self.clock.advance(7)
        self.greet()
        [(hello, node, now)] = self.registry.named("device_connected")
        self.assertIs(hello, self.protocol.session.hello)
        self.assertEqual((hello.serial, node, now), (129336, NODE, NOW + 7))

    def test_second_hello_records_nothing_more(self) -> None:
        """A repeated hello from the same device records no second connection."""
        self.greet()
        self.send(DART_HELLO_2)
        self.assertEqual(len(self.registry.named("device_connected")), 1)

    def test_commit_recorded_after_commit_answer(self) -> None:
        """upload_committed(serial, record count, now) is recorded after the 0x06 is written."""
        link = self.greet()
        self.send(DATA_12, DATA_2, COMMIT)
        self.assertEqual(self.registry.named("upload_committed"), [])
        self.clock.advance(3)
        link.answer().callback(None)
        self.assertEqual(self.registry.named("upload_committed"), [(129336, 14, NOW + 3)])
        index = [name for name, _ in self.registry.calls].index("upload_committed")
        self.assertTrue(self.registry.written_at_call[index].endswith(COMMIT_OK))

    def test_empty_commit_records_nothing(self) -> None:
        """A commit with nothing pending records no upload."""
        self.greet()
        self.send(COMMIT)
        self.assertEqual(self.take(), COMMIT_OK)
        self.assertEqual(self.registry.named("upload_committed"), [])

    def test_withheld_commit_recorded(self) -> None:
        """A withheld commit records delivery_failed with the reason, and no upload."""
        link = self.greet()
        self.send(DATA_2, COMMIT)
        link.answer().errback(DeliveryFailed("connector main: end server answered 503"))
        self.assertEqual(
            self.registry.named("delivery_failed"),
            [(129336, "connector main: end server answered 503", NOW)],
        )
        self.assertEqual(self.registry.named("upload_committed"), [])

    def test_withheld_on_timeout_recorded(self) -> None:
        """A commit timing out records delivery_failed naming commit_timeout."""
        self.greet()
        self.send(DATA_2, COMMIT)
        self.clock.advance(COMMIT_TIMEOUT)
        [(serial, reason, now)] = self.registry.named("delivery_failed")
        self.assertEqual((serial, now), (129336, NOW + COMMIT_TIMEOUT))
        self.assertIn("commit_timeout", reason)
        self.assertNotIn("\n", reason)

    def test_withheld_reason_one_line(self) -> None:
        """The recorded reason of an unexpected multi-line error is folded to one line."""
        link = self.greet()
        self.send(DATA_2, COMMIT)
        link.answer().errback(ValueError("first line\n  second line"))
        self.flushLoggedErrors(ValueError)
        self.assertEqual(
            self.registry.named("delivery_failed"), [(129336, "first line second line", NOW)]
        )

    def test_disconnect_recorded(self) -> None:
        """The device leaving records device_disconnected(serial, node, now) once."""
        self.greet()
        self.clock.advance(5)
        self.transport.loseConnection()
        self.assertEqual(self.registry.named("device_disconnected"), [(129336, NODE, NOW + 5)])

    def test_relay_closing_records_disconnect_once(self) -> None:
        """A connection the relay closes records one disconnection."""
        self.greet()
        self.send(b"\x02\x56")
        self.assertFalse(self.is_open)
        self.assertEqual(self.registry.named("device_disconnected"), [(129336, NODE, NOW)])

    def test_disconnect_before_hello_records_nothing(self) -> None:
        """A device leaving before its hello records nothing."""
        self.transport.loseConnection()
        self.assertEqual(self.registry.calls, [])

    def test_connection_record_failure_only_warns(self) -> None:
        """device_connected failing is a warning naming the device; the hello is answered as usual."""
        self.registry.failing["device_connected"] = RegistryError("database is locked")
        self.send(DART_HELLO)
        self.assertEqual(self.take(), HELLO_RESPONSE_AT_NOW)
        self.assertTrue(self.is_open)
        self.assert_warning("129336", "connection", "database is locked")

    def test_commit_record_failure_only_warns(self) -> None:
        """upload_committed failing is a warning; the 0x06 is written and later frames answered."""
        self.registry.failing["upload_committed"] = RegistryError("disk full")
        link = self.greet()
        self.send(DATA_2, COMMIT)
        link.answer().callback(None)
        self.send(TIME_REQUEST)
        self.assertEqual(self.take(), COMMIT_OK + time_reply(NOW))
        self.assertTrue(self.is_open)
        self.assert_warning("129336", "commit", "disk full")
        self.assertEqual(self.errors(), [])

    def test_withheld_record_failure_only_warns(self) -> None:
        """delivery_failed failing is a warning; the commit is withheld and the device closed as usual."""
        self.registry.failing["delivery_failed"] = RegistryError("disk full")
        link = self.greet()
        self.send(DATA_2, COMMIT)
        link.answer().errback(DeliveryFailed("connector main: refused"))
        self.assertEqual(self.take(), b"")
        self.assert_closed_with_warning("129336", "refused")
        self.assert_warning("129336", "delivery error", "disk full")

    def test_disconnection_record_failure_only_warns(self) -> None:
        """device_disconnected failing is a warning naming the device, and nothing else."""
        self.registry.failing["device_disconnected"] = RegistryError("disk full")
        link = self.greet()
        self.transport.loseConnection()
        self.assert_warning("129336", "disconnection", "disk full")
        self.assertEqual(link.closed, 1)
        self.assertEqual(self.errors(), [])

    def test_pending_records_hold_nothing_up(self) -> None:
        """Registry writes still pending never delay what the device is told."""
        for name in ("device_connected", "upload_committed"):
            self.registry.hold(name)
        self.send(DART_HELLO)
        self.assertEqual(self.take(), HELLO_RESPONSE_AT_NOW)
        self.send(DATA_2, COMMIT)
        self.link.answer().callback(None)
        self.send(TIME_REQUEST)
        self.assertEqual(self.take(), COMMIT_OK + time_reply(NOW))
        self.assertEqual(len(self.registry.held["upload_committed"]), 1)

    def test_command_result_failure_only_warns(self) -> None:
        """command_result failing is a warning; the async session carries on to its 0x23."""
        self.registry.failing["command_result"] = RegistryError("disk full")
        self.registry.commands = [ODOMETER]
        self.greet()
        self.send(ASYNC_REQUEST)
        self.take()
        self.send(async_answer(41, 1))
        self.assertEqual(self.take(), ASYNC_COMPLETE)
        self.assertTrue(self.is_open)
        self.assert_warning("129336", "command result", "disk full")

    def test_profile_failure_withholds_commit(self) -> None:
        """profile_for failing with a registry error withholds the commit: registry unavailable."""
        self.registry.failing["profile_for"] = RegistryError("database is\nlocked")
        self.send(DART_HELLO)
        self.assertTrue(self.take().startswith(b"\x02\x55\x01"))
        self.send(DATA_2, COMMIT)
        self.assertEqual(self.connector.links, [])
        self.assertEqual(self.take(), b"")
        self.assert_closed_with_warning("129336", "registry unavailable", "database is locked")
        self.assertEqual(
            self.registry.named("delivery_failed"),
            [(129336, "device registry unavailable: database is locked", NOW)],
        )
        self.assertEqual(self.errors(), [])

    def test_profile_passed_to_link(self) -> None:
        """The registry's profile for the device is what the link delivers with."""
        self.registry.profile = DeviceProfile(custom1="fleet 7")
        link = self.greet()
        self.send(DATA_2, COMMIT)
        self.assertEqual(link.deliveries[0][1], DeviceProfile(custom1="fleet 7"))
        self.assertIs(self.registry.named("profile_for")[0][0], self.protocol.session.hello)


def short_gps_frame(seq: int) -> bytes:
    """A 0x04 frame with one record whose GPS field (id 0) has 10 bytes, fewer than its 21."""
    record = Record(seq, 0, 11, (RawField(0, bytes(10)),))
    return encode_frame(MessageType.DATA_RECORDS, encode_data_records([record]))


class ShortFieldTests(SessionTestMixin, SynchronousTestCase):
    """A known field shorter than its layout is warned about once per device and field."""

    def short_field_warnings(self) -> list[str]:
        return [text for text in self.warnings() if "fewer than its layout" in text]

    def test_warned_once_across_uploads_and_connections(self) -> None:
        """Two uploads on one connection, then a reconnect: one warning naming serial, peer, field and size."""
        self.greet()
        self.send(short_gps_frame(1), short_gps_frame(2), COMMIT)
        self.link.answer().callback(None)
        self.send(short_gps_frame(3), COMMIT)
        self.link.answer().callback(None)
        self.transport.loseConnection()
        self.protocol, self.transport = self.connect()
        self.greet()
        self.send(short_gps_frame(4))
        (warning,) = self.short_field_warnings()
        for fragment in ("129336", PEER_TEXT, "field 0 has 10 bytes", "FType 257"):
            self.assertIn(fragment, warning)

    def test_records_still_delivered(self) -> None:
        """The record with the short field is part of the upload, not dropped."""
        self.greet()
        self.send(short_gps_frame(7), COMMIT)
        self.assertEqual([r.seq for r in self.link.uploads[0].records], [7])

    def test_remembered_reports_bounded(self) -> None:
        """At max_reported remembered pairs the memory is cleared, so the next pair is reported anew."""
        relay = Relay({"main": self.connector}, "main", max_reported=2)
        self.assertTrue(relay.first_report(1, 0))
        self.assertFalse(relay.first_report(1, 0))
        self.assertTrue(relay.first_report(2, 0))
        self.assertFalse(relay.first_report(2, 0))
        self.assertTrue(relay.first_report(3, 0))  # cleared at two remembered
        self.assertTrue(relay.first_report(1, 0))


class UnknownDeviceTests(RegistryTestMixin, SynchronousTestCase):
    """unknown_devices = reject: only serials the registry knows may upload."""

    def make_relay(self) -> Relay:
        return Relay(
            {"main": self.connector},
            "main",
            self.registry,
            node=NODE,
            clock=self.clock,
            unknown_devices="reject",
        )

    def test_unknown_device_closed_and_not_registered(self) -> None:
        """A serial the registry does not know is closed after its hello, opens no link and is not entered in the registry."""
        self.send(DART_HELLO, DATA_2, COMMIT)
        self.assertFalse(self.is_open)
        self.assertEqual(self.connector.links, [])
        self.assertEqual(self.registry.named("device_connected"), [])
        self.assert_warning("129336", PEER_TEXT, "not in the registry", "unknown_devices = reject")
        self.assertNotIn(COMMIT_OK, self.transport.value())

    def test_warned_once_per_serial(self) -> None:
        """A rejected device that keeps reconnecting is warned about once."""
        self.send(DART_HELLO)
        self.protocol, self.transport = self.connect()
        self.send(DART_HELLO)
        self.assertFalse(self.is_open)
        rejected = [text for text in self.warnings() if "not in the registry" in text]
        self.assertEqual(len(rejected), 1)

    def test_known_device_served(self) -> None:
        """A serial the registry knows uploads and commits as usual, and is marked connected."""
        self.registry.profile = DeviceProfile(known=True)
        link = self.greet()
        self.send(DATA_2, COMMIT)
        link.answer().callback(None)
        self.assertIn(COMMIT_OK, self.transport.value())
        self.assertEqual(len(self.registry.named("device_connected")), 1)

    def test_accept_registers_before_the_profile(self) -> None:
        """With the default accept an unknown device is served and entered in the registry at once."""
        relay = Relay({"main": self.connector}, "main", self.registry, node=NODE, clock=self.clock)
        self.assertTrue(relay.accepts_unknown_devices)
        self.registry.hold("profile_for")
        relay.open_route(parse_hello(DART_HELLO[5:]), lambda reason: None)
        self.assertEqual(len(self.registry.named("device_connected")), 1)

    def test_upload_refused_if_the_profile_says_unknown(self) -> None:
        """A commit whose own profile lookup answers first, unknown, is withheld: nothing reaches a connector."""
        self.registry.hold("profile_for")
        self.send(DART_HELLO, DATA_2, COMMIT)
        ahead, for_upload = self.registry.held["profile_for"]
        for_upload.callback(DeviceProfile())
        self.assertFalse(self.is_open)
        self.assertEqual(self.connector.links, [])
        self.assert_warning("withheld", "not in the registry")
        ahead.callback(DeviceProfile())
