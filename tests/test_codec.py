"""
Tests for ``oemrelay.codec``: framing, hello, replies and record layouts,
checked against the real device captures in ``tests/data``.
"""

from __future__ import annotations

import calendar
import importlib.util
import random
import struct

from twisted.trial.unittest import SynchronousTestCase

from oemrelay.codec import (
    FramingError,
    ASYNC_SESSION_COMPLETE,
    COMMIT_REQUEST,
    COMMIT_SUCCESS,
    EPOCH_2013,
    VERSION_RESPONSE,
    Analogues,
    DebugText,
    Digital,
    DriverId,
    FixedRecordExtras,
    Frame,
    FrameDecoder,
    GpsFix,
    Hello,
    MessageType,
    OdometerRunHours,
    ProtocolError,
    RawField,
    ShortField,
    Record,
    TripSummary,
    decode_field,
    encode_data_records,
    encode_fixed_record,
    encode_frame,
    fletcher8,
    hello_response,
    parse_data_records,
    parse_fixed_records,
    parse_hello,
    seconds_since_2013,
    time_response,
)

from .vectors import (
    DATA,
    HAND_DECODED_FIXED,
    HAND_DECODED_RECORDS,
    capture,
    captures,
    payload,
    since_2013,
)
from .zones import use_time_zone

#: Unix time of 2024-01-01 00:00:00 UTC (347 068 800 s since 2013).
NEW_YEAR_2024 = 1704067200

DATA_CAPTURES = (
    "data-0x04-2-records-2021-denmark",
    "data-0x04-12-records-2017-auckland",
    "data-0x04-20-records-dart-after-reset",
)
FIXED_CAPTURES = ("fixed64-0x10-1-record-G50", "fixed64-0x10-2-records-G50")




def record_bytes(seq: int, time: int, reason: int, body: bytes) -> bytes:
    """A hand-written 0x04 record: header with the right length, then ``body``."""
    return struct.pack("<HIIB", 11 + len(body), seq, time, reason) + body


def field_bytes(field_id: int, data: bytes) -> bytes:
    """A hand-written short-form field."""
    return bytes([field_id, len(data)]) + data


def expected_frames() -> list[Frame]:
    """Every capture as the frame it holds, in file order."""
    return [Frame(data[2], data[5:]) for data in captures().values()]


class FrameDecoderTests(SynchronousTestCase):
    """FrameDecoder turns any segmentation of the stream into the same frames."""

    def test_every_capture_whole(self) -> None:
        """Each capture fed in one read gives exactly its one frame."""
        for name, data in captures().items():
            decoder = FrameDecoder()
            frames = decoder.feed(data)
            self.assertEqual(frames, [Frame(data[2], data[5:])], name)
            self.assertEqual(len(frames[0].payload), data[3] | data[4] << 8, name)
            self.assertEqual(decoder.buffered, 0, name)

    def test_capture_types(self) -> None:
        """The captures decode to the message types their names state."""
        types = {name: FrameDecoder().feed(data)[0].type for name, data in captures().items()}
        self.assertEqual(types["hello-51-byte-G50"], MessageType.HELLO)
        self.assertEqual(types["hello-49-byte-dart"], MessageType.HELLO)
        self.assertEqual(types["async-session-request-0x22"], MessageType.ASYNC_SESSION_REQUEST)
        for name in DATA_CAPTURES:
            self.assertEqual(types[name], MessageType.DATA_RECORDS)
        for name in FIXED_CAPTURES:
            self.assertEqual(types[name], MessageType.FIXED_RECORDS)

    def test_every_capture_one_byte_at_a_time(self) -> None:
        """Fed byte by byte, a capture gives nothing until its last byte."""
        for name, data in captures().items():
            decoder = FrameDecoder()
            for index in range(len(data) - 1):
                self.assertEqual(decoder.feed(data[index : index + 1]), [], name)
                self.assertEqual(decoder.buffered, index + 1, name)
            self.assertEqual(decoder.feed(data[-1:]), [Frame(data[2], data[5:])], name)
            self.assertEqual(decoder.buffered, 0, name)

    def test_all_captures_coalesced(self) -> None:
        """Every capture in a single read gives every frame, in order."""
        stream = b"".join(captures().values())
        decoder = FrameDecoder()
        self.assertEqual(decoder.feed(stream), expected_frames())
        self.assertEqual(decoder.buffered, 0)

    def test_coalesced_with_partial_tail(self) -> None:
        """Complete frames are returned and the start of the next is kept."""
        hello = capture("hello-49-byte-dart")
        data = capture("data-0x04-2-records-2021-denmark")
        decoder = FrameDecoder()
        self.assertEqual(decoder.feed(hello + data[:7]), [Frame(0, hello[5:])])
        self.assertEqual(decoder.buffered, 7)
        self.assertEqual(decoder.feed(data[7:]), [Frame(4, data[5:])])
        self.assertEqual(decoder.buffered, 0)

    def test_random_split_points(self) -> None:
        """Any split of the concatenated captures gives the same frames."""
        stream = b"".join(captures().values()) * 2
        expected = expected_frames() * 2
        rng = random.Random(20240101)
        for _ in range(300):
            cuts = sorted(rng.sample(range(1, len(stream)), rng.randint(1, 40)))
            decoder = FrameDecoder()
            frames = []
            start = 0
            for cut in [*cuts, len(stream)]:
                frames.extend(decoder.feed(stream[start:cut]))
                start = cut
            self.assertEqual(frames, expected, cuts)
            self.assertEqual(decoder.buffered, 0)

    def test_zero_length_payload(self) -> None:
        """A header with length 0 is a complete frame with an empty payload."""
        decoder = FrameDecoder()
        self.assertEqual(decoder.feed(b"\x02\x55\x05\x00\x00"), [Frame(5, b"")])
        self.assertEqual(decoder.buffered, 0)

    def test_zero_length_payloads_coalesced(self) -> None:
        """Several empty frames in one read all come out, in order."""
        stream = encode_frame(0x22) + encode_frame(0x05) + encode_frame(0x26)
        self.assertEqual(
            FrameDecoder().feed(stream), [Frame(0x22, b""), Frame(0x05, b""), Frame(0x26, b"")]
        )

    def test_empty_feed(self) -> None:
        """Feeding no bytes gives no frames and keeps the buffer."""
        decoder = FrameDecoder()
        self.assertEqual(decoder.feed(b""), [])
        decoder.feed(b"\x02\x55\x04")
        self.assertEqual(decoder.feed(b""), [])
        self.assertEqual(decoder.buffered, 3)

    def test_partial_payload_waits(self) -> None:
        """A frame is held until its whole declared payload has arrived."""
        decoder = FrameDecoder()
        self.assertEqual(decoder.feed(b"\x02\x55\x06\x02\x00\x01"), [])
        self.assertEqual(decoder.buffered, 6)
        self.assertEqual(decoder.feed(b"\x02"), [Frame(6, b"\x01\x02")])

    def test_bad_first_byte(self) -> None:
        """A single wrong first byte raises at once."""
        self.assertRaises(ProtocolError, FrameDecoder().feed, b"\x03")

    def test_bad_second_byte(self) -> None:
        """A correct first sync byte then a wrong second raises at once."""
        self.assertRaises(ProtocolError, FrameDecoder().feed, b"\x02\x56")

    def test_bad_second_byte_in_separate_read(self) -> None:
        """The wrong second sync byte raises even when it arrives alone."""
        decoder = FrameDecoder()
        self.assertEqual(decoder.feed(b"\x02"), [])
        self.assertRaises(ProtocolError, decoder.feed, b"\x00")

    def test_swapped_sync(self) -> None:
        """Sync bytes in the wrong order are refused."""
        self.assertRaises(ProtocolError, FrameDecoder().feed, b"\x55\x02")

    def test_first_sync_byte_alone_waits(self) -> None:
        """A lone 0x02 may start a frame, so it is buffered, not refused."""
        decoder = FrameDecoder()
        self.assertEqual(decoder.feed(b"\x02"), [])
        self.assertEqual(decoder.buffered, 1)

    def test_bad_sync_full_header(self) -> None:
        """A complete header with wrong sync bytes raises."""
        self.assertRaises(ProtocolError, FrameDecoder().feed, b"\x02\x54\x04\x00\x00")

    def test_bad_sync_partial_header(self) -> None:
        """Three or four bytes of a header with bad sync raise without waiting."""
        self.assertRaises(ProtocolError, FrameDecoder().feed, b"GET")
        self.assertRaises(ProtocolError, FrameDecoder().feed, b"\x00\x55\x04\x00")

    def test_bad_sync_after_frame(self) -> None:
        """Garbage after a good frame in the same read raises."""
        frame = capture("async-session-request-0x22")
        self.assertRaises(ProtocolError, FrameDecoder().feed, frame + b"\xff")
        self.assertRaises(ProtocolError, FrameDecoder().feed, frame + b"\x02\x00")
        self.assertRaises(ProtocolError, FrameDecoder().feed, frame + b"HTTP/1.1")

    def test_bad_sync_after_frame_in_later_read(self) -> None:
        """Garbage arriving in a later read raises at its first byte."""
        decoder = FrameDecoder()
        self.assertEqual(len(decoder.feed(capture("hello-49-byte-dart"))), 1)
        self.assertRaises(ProtocolError, decoder.feed, b"\x00")

    def test_length_above_max_payload(self) -> None:
        """A declared length above max_payload raises on the header alone."""
        decoder = FrameDecoder(max_payload=1024)
        self.assertRaises(ProtocolError, decoder.feed, b"\x02\x55\x04\x01\x04")

    def test_length_above_max_payload_split_header(self) -> None:
        """The length check happens as soon as the fifth header byte arrives."""
        decoder = FrameDecoder(max_payload=10)
        self.assertEqual(decoder.feed(b"\x02\x55\x04\x0b"), [])
        self.assertRaises(ProtocolError, decoder.feed, b"\x00")

    def test_length_at_max_payload(self) -> None:
        """A declared length equal to max_payload is accepted."""
        decoder = FrameDecoder(max_payload=10)
        self.assertEqual(decoder.feed(b"\x02\x55\x04\x0a\x00"), [])
        self.assertEqual(decoder.feed(bytes(10)), [Frame(4, bytes(10))])

    def test_capture_above_small_max_payload(self) -> None:
        """The 1001-byte Dart upload is refused by a 1000-byte maximum."""
        decoder = FrameDecoder(max_payload=1000)
        data = capture("data-0x04-20-records-dart-after-reset")
        self.assertRaises(ProtocolError, decoder.feed, data[:5])

    def test_default_max_payload(self) -> None:
        """By default the largest 16-bit length is accepted."""
        decoder = FrameDecoder()
        self.assertEqual(decoder.max_payload, 0xFFFF)
        self.assertEqual(decoder.feed(b"\x02\x55\x04\xff\xff"), [])
        self.assertEqual(decoder.buffered, 5)

    def test_frame_to_bytes(self) -> None:
        """A decoded frame re-encodes to the device's bytes exactly."""
        for name, data in captures().items():
            (frame,) = FrameDecoder().feed(data)
            self.assertEqual(frame.to_bytes(), data, name)

    def test_encode_frame(self) -> None:
        """encode_frame writes sync, type and a little-endian length."""
        self.assertEqual(encode_frame(0x04, b"\x01" * 258), b"\x02\x55\x04\x02\x01" + b"\x01" * 258)
        self.assertEqual(encode_frame(0x26), b"\x02\x55\x26\x00\x00")


class TimeTests(SynchronousTestCase):
    """Device times count seconds since 2013-01-01 UTC."""

    def test_epoch(self) -> None:
        """2013-01-01 00:00:00 UTC is device time 0."""
        self.assertEqual(EPOCH_2013, calendar.timegm((2013, 1, 1, 0, 0, 0, 0, 0, 0)))
        self.assertEqual(seconds_since_2013(EPOCH_2013), 0)

    def test_known_time(self) -> None:
        """2024-01-01 is 347 068 800 seconds after the epoch."""
        self.assertEqual(seconds_since_2013(NEW_YEAR_2024), 347068800)

    def test_fraction_truncated(self) -> None:
        """Fractions of a second are dropped."""
        self.assertEqual(seconds_since_2013(NEW_YEAR_2024 + 0.999), 347068800)

    def test_before_epoch(self) -> None:
        """Times before 2013 become 0 rather than a negative number."""
        self.assertEqual(seconds_since_2013(0), 0)
        self.assertEqual(seconds_since_2013(EPOCH_2013 - 1), 0)


class HelloTests(SynchronousTestCase):
    """parse_hello reads the device's identity from both hello forms."""

    def test_49_byte_dart(self) -> None:
        """The Dart hello decodes to its serial, IMEI, ICCID and versions."""
        hello = parse_hello(payload("hello-49-byte-dart"))
        self.assertEqual(
            hello,
            Hello(129336, "353323081669730", "89610185001824844630", 34, 2, 1, 9, 0, False),
        )
        self.assertEqual(hello.firmware, "34.2.1.9")
        self.assertFalse(hello.g50)

    def test_49_byte_dart_second_sim(self) -> None:
        """The second Dart capture differs only in its ICCID."""
        hello = parse_hello(payload("hello-49-byte-dart-2"))
        self.assertEqual(hello.serial, 129336)
        self.assertEqual(hello.imei, "353323081669730")
        self.assertEqual(hello.iccid, "89610145689933000085")
        self.assertEqual(hello.firmware, "34.2.1.9")

    def test_51_byte_g50(self) -> None:
        """The G50 hello has the same identity layout and is flagged g50."""
        hello = parse_hello(payload("hello-51-byte-G50"))
        self.assertEqual(hello.serial, 6912)
        self.assertEqual(hello.imei, "353229027539251")
        self.assertEqual(hello.iccid, "89915000000001304594")
        self.assertTrue(hello.g50)

    def test_51_byte_g50_version_bytes(self) -> None:
        """The G50 tail is read naively with the 49-byte layout."""
        hello = parse_hello(payload("hello-51-byte-G50"))
        self.assertEqual(
            (hello.product_id, hello.hardware_rev, hello.firmware_major, hello.firmware_minor),
            (0, 0, 4, 3),
        )
        self.assertEqual(hello.flags, 0x78101904)
        self.assertEqual(hello.firmware, "0.0.4.3")

    def test_payload_kept(self) -> None:
        """The received payload is kept and re-framed byte for byte."""
        for name in ("hello-49-byte-dart", "hello-51-byte-G50"):
            hello = parse_hello(payload(name))
            self.assertEqual(hello.payload, payload(name))
            self.assertEqual(hello.to_frame(), capture(name))

    def test_to_payload_round_trip(self) -> None:
        """A 49-byte hello re-encodes from its fields to the device's bytes."""
        hello = parse_hello(payload("hello-49-byte-dart"))
        self.assertEqual(hello.to_payload(), payload("hello-49-byte-dart"))
        built = Hello(129336, "353323081669730", "89610185001824844630", 34, 2, 1, 9)
        self.assertEqual(built.to_frame(), capture("hello-49-byte-dart"))

    def test_g50_to_payload_length(self) -> None:
        """A hello built with g50 encodes to 51 bytes and parses back as G50."""
        built = Hello(6912, "353229027539251", "89915000000001304594", g50=True)
        data = built.to_payload()
        self.assertEqual(len(data), 51)
        self.assertEqual(parse_hello(data), built)

    def test_too_short(self) -> None:
        """A hello without its complete 41-byte identity raises."""
        for size in (0, 1, 40):
            self.assertRaises(ProtocolError, parse_hello, payload("hello-49-byte-dart")[:size])

    def test_identity_only(self) -> None:
        """A 41-byte hello is accepted with zero versions, like traccar."""
        hello = parse_hello(payload("hello-49-byte-dart")[:41])
        self.assertEqual(hello.serial, 129336)
        self.assertEqual(hello.firmware, "0.0.0.0")
        self.assertFalse(hello.g50)

    def test_fields_without_nul(self) -> None:
        """IMEI and ICCID filling their whole field are read completely."""
        data = struct.pack("<I16s21s", 7, b"1234567890123456", b"A" * 21) + bytes(8)
        hello = parse_hello(data)
        self.assertEqual(hello.imei, "1234567890123456")
        self.assertEqual(hello.iccid, "A" * 21)

    def test_text_after_nul_ignored(self) -> None:
        """Bytes after the NUL terminator of a text field are dropped."""
        data = struct.pack("<I16s21s", 7, b"123\x00junk", b"89\x00\xff\xfe") + bytes(8)
        hello = parse_hello(data)
        self.assertEqual((hello.imei, hello.iccid), ("123", "89"))

    def test_non_ascii_replaced(self) -> None:
        """Non-ASCII bytes in the identity do not raise."""
        data = struct.pack("<I16s21s", 7, b"35\xff", b"\x80") + bytes(8)
        hello = parse_hello(data)
        self.assertEqual(hello.imei, "35\ufffd")
        self.assertEqual(hello.iccid, "\ufffd")


class ReplyTests(SynchronousTestCase):
    """The server's replies are byte-exact."""

    def test_hello_response_known_time(self) -> None:
        """The hello reply at 2024-01-01 carries 347 068 800 and flags 0."""
        hello = parse_hello(payload("hello-49-byte-dart"))
        self.assertEqual(
            hello_response(hello, NEW_YEAR_2024),
            bytes.fromhex("02550108 0080d9af14 00000000".replace(" ", "")),
        )

    def test_hello_response_epoch(self) -> None:
        """At the 2013 epoch the hello reply time is zero."""
        hello = parse_hello(payload("hello-49-byte-dart"))
        self.assertEqual(hello_response(hello, EPOCH_2013), bytes.fromhex("0255010800") + bytes(8))

    def test_hello_response_g50(self) -> None:
        """A 51-byte hello is answered with five zero bytes, whatever the time."""
        hello = parse_hello(payload("hello-51-byte-G50"))
        expected = bytes.fromhex("02550105000000000000")
        self.assertEqual(hello_response(hello, NEW_YEAR_2024), expected)
        self.assertEqual(hello_response(hello, 0), expected)

    def test_time_response(self) -> None:
        """The 0x31 reply carries the uint32 seconds since 2013."""
        self.assertEqual(time_response(NEW_YEAR_2024), bytes.fromhex("02553104 0080d9af14".replace(" ", "")))
        self.assertEqual(time_response(EPOCH_2013 + 1), bytes.fromhex("025531040001000000"))

    def test_commit_success(self) -> None:
        """The commit reply is 0x06 with status 1."""
        self.assertEqual(COMMIT_SUCCESS, bytes.fromhex("025506010001"))

    def test_commit_request(self) -> None:
        """The commit request is an empty 0x05."""
        self.assertEqual(COMMIT_REQUEST, bytes.fromhex("0255050000"))

    def test_version_response(self) -> None:
        """The version reply is 0x15 with twelve zero bytes."""
        self.assertEqual(VERSION_RESPONSE, bytes.fromhex("0255150c00") + bytes(12))

    def test_async_session_complete(self) -> None:
        """The async session reply is an empty 0x23."""
        self.assertEqual(ASYNC_SESSION_COMPLETE, bytes.fromhex("0255230000"))


class DataRecordsTests(SynchronousTestCase):
    """parse_data_records decodes 0x04 payloads to the hand-decoded values (tests/data/README.rst)."""

    def test_denmark(self) -> None:
        """The 2021 Denmark upload decodes to its two records exactly."""
        records = parse_data_records(payload("data-0x04-2-records-2021-denmark"))
        first_time = since_2013("2021-02-05 05:51:55")
        second_time = since_2013("2021-02-05 06:07:02")
        self.assertEqual(
            records,
            [
                Record(
                    565,
                    first_time,
                    3,
                    (
                        GpsFix(first_time, 554574140, 99343941, 30, 2330, 1, 148, 12, 7, 3),
                        Digital(3, 0, 3),
                        Analogues(6, ((1, 4125), (3, 2112), (4, 24), (5, 4072), (6, 7214))),
                    ),
                ),
                Record(
                    566,
                    second_time,
                    3,
                    (
                        GpsFix(second_time, 555500261, 96395707, 23, 2499, 1, 165, 13, 7, 3),
                        Digital(3, 0, 3),
                        Analogues(6, ((1, 4125), (3, 2235), (4, 24), (5, 4072), (6, 7214))),
                    ),
                ),
            ],
        )

    def test_auckland_sequence_and_times(self) -> None:
        """The Auckland upload holds seq 518-529, reason 3, 07:14:26 to 07:19:01."""
        data = payload("data-0x04-12-records-2017-auckland")
        records = parse_data_records(data)
        self.assertEqual([r.seq for r in records], list(range(518, 530)))
        self.assertEqual({r.reason for r in records}, {3})
        self.assertEqual(records[0].time, since_2013("2017-06-12 07:14:26"))
        self.assertEqual(records[-1].time, since_2013("2017-06-12 07:19:01"))
        self.assertEqual(len(data), 12 * 82)
        self.assertEqual(
            [struct.unpack_from("<H", data, 82 * i)[0] for i in range(12)], [82] * 12
        )

    def test_auckland_first_record(self) -> None:
        """The first Auckland record has GPS, digital and 16- and 32-bit analogues."""
        first = parse_data_records(payload("data-0x04-12-records-2017-auckland"))[0]
        time = since_2013("2017-06-12 07:14:26")
        self.assertEqual(
            first.fields,
            (
                GpsFix(time, -367399358, 1747199418, 45, 1549, 9, 115, 17, 43, 3),
                Digital(1, 0, 3),
                Analogues(6, ((1, 4162), (3, 1764), (4, 20))),
                Analogues(7, ((11, 48), (12, 3), (13, 488), (14, 3785), (15, 7))),
            ),
        )

    def test_auckland_field_types(self) -> None:
        """Every Auckland record has fields 0, 2, 6, 7 in that order."""
        records = parse_data_records(payload("data-0x04-12-records-2017-auckland"))
        expected = HAND_DECODED_RECORDS["data-0x04-12-records-2017-auckland"]
        self.assertEqual(len(expected), 12)
        self.assertEqual([[f.FIELD_ID for f in r.fields] for r in records], [[0, 2, 6, 7]] * 12)
        # Fix time equals record time in this capture, by the hand decode.
        self.assertEqual(
            [r.fields[0].fix_time for r in records], [since_2013(t) for _, t, _, _ in expected]
        )

    def test_auckland_second_speed(self) -> None:
        """Record 519 reports 763 cm/s at heading raw 125 (250 degrees)."""
        second = parse_data_records(payload("data-0x04-12-records-2017-auckland"))[1]
        self.assertEqual(second.seq, 519)
        self.assertEqual((second.fields[0].speed, second.fields[0].heading), (763, 125))

    def test_dart_sequence_and_times(self) -> None:
        """The Dart upload holds seq 13-32, all with record time 0."""
        records = parse_data_records(payload("data-0x04-20-records-dart-after-reset"))
        self.assertEqual([r.seq for r in records], list(range(13, 33)))
        self.assertEqual({r.time for r in records}, {0})

    def test_dart_debug_text(self) -> None:
        """The Dart debug records carry field 1 with their codes and texts."""
        records = {r.seq: r for r in parse_data_records(payload("data-0x04-20-records-dart-after-reset"))}
        roll = DebugText(0x13, b"Roll detected cos^2 < 383553884")
        tumbler = DebugText(0x13, b"Tumbler triggered cos^2 < 0")
        expected = {
            13: DebugText(0x27, b"RESET Dart 34.2.1.9 flags=1 WD=0"),
            14: DebugText(0x14, b"No Admin params found - using defaults + AutoAPN"),
            20: roll, 23: roll, 27: roll, 30: roll,
            22: tumbler, 25: tumbler, 29: tumbler, 32: tumbler,
            # Section 6 writes "chars." but the field is 25 bytes: no final dot.
            26: DebugText(0x0B, b"GSM: TCP bad SYNC chars"),
        }
        for seq, text in expected.items():
            self.assertEqual(records[seq].reason, 21, seq)
            self.assertEqual(records[seq].fields, (text,), seq)
        debug_seqs = {s for s, r in records.items() if any(isinstance(f, DebugText) for f in r.fields)}
        self.assertEqual(debug_seqs, set(expected))

    def test_dart_state_records(self) -> None:
        """Dart seq 15-19 show the input, trip and power changes of tests/data/README.rst."""
        records = {r.seq: r for r in parse_data_records(payload("data-0x04-20-records-dart-after-reset"))}
        summary = {
            seq: (records[seq].reason, records[seq].fields[1].inputs, records[seq].fields[1].status)
            for seq in range(15, 20)
        }
        self.assertEqual(
            summary, {15: (9, 5, 7), 16: (9, 1, 7), 17: (9, 0, 7), 18: (2, 0, 6), 19: (15, 0, 2)}
        )
        self.assertEqual(dict(records[18].fields[2].values)[2], 64)
        self.assertEqual(dict(records[19].fields[2].values)[2], 55)

    def test_dart_impact_records(self) -> None:
        """Seq 21, 24, 28 and 31 are reason 23 with a GPS fix that is all zero."""
        records = {r.seq: r for r in parse_data_records(payload("data-0x04-20-records-dart-after-reset"))}
        for seq in (21, 24, 28, 31):
            self.assertEqual(records[seq].reason, 23)
            self.assertEqual(records[seq].fields[0], GpsFix(0, 0, 0, 0, 0, 0, 0, 0, 0, 0))

    def test_round_trip_captures(self) -> None:
        """Every 0x04 capture re-encodes byte for byte and re-parses equal."""
        for name in DATA_CAPTURES:
            data = payload(name)
            records = parse_data_records(data)
            self.assertEqual(encode_data_records(records), data, name)
            self.assertEqual(parse_data_records(encode_data_records(records)), records, name)

    def test_round_trip_constructed(self) -> None:
        """parse(encode(records)) gives back records of every field type."""
        records = [
            Record(
                1,
                2,
                3,
                (
                    GpsFix(5, -1, 2**31 - 1, -32768, 65535, 255, 179, 9, 4, 7),
                    DebugText(7, b"\x00\xffhello"),
                    Digital(2**32 - 1, 65535, 0xFF),
                    DriverId(2, bytes.fromhex("000009b6e139")),
                    Analogues(6, ((4, 65535), (1, 32767), (3, -32768))),
                    Analogues(7, ((11, -(2**31)), (20, 2**31 - 1))),
                    TripSummary(1234, 5678),
                    OdometerRunHours(2**32 - 1, 0),
                    RawField(99, b"\x01\x02\x03"),
                    RawField(15, b""),
                ),
            ),
            Record(2**32 - 1, 2**32 - 1, 255),
        ]
        self.assertEqual(parse_data_records(encode_data_records(records)), records)

    def test_empty_payload(self) -> None:
        """An empty 0x04 payload holds no records."""
        self.assertEqual(parse_data_records(b""), [])
        self.assertEqual(encode_data_records([]), b"")

    def test_record_without_fields(self) -> None:
        """A record of only its 11-byte header has no fields."""
        data = record_bytes(7, 100, 28, b"")
        self.assertEqual(len(data), 11)
        self.assertEqual(parse_data_records(data), [Record(7, 100, 28, ())])
        self.assertEqual(encode_data_records([Record(7, 100, 28)]), data)

    def test_records_without_fields_between_others(self) -> None:
        """Empty records next to full ones keep every boundary."""
        gps = field_bytes(0, bytes(21))
        data = record_bytes(1, 0, 28, b"") + record_bytes(2, 0, 11, gps) + record_bytes(3, 0, 28, b"")
        records = parse_data_records(data)
        self.assertEqual([(r.seq, len(r.fields)) for r in records], [(1, 0), (2, 1), (3, 0)])

    def test_unknown_field_kept_raw(self) -> None:
        """An unknown field id is kept as a RawField with its bytes."""
        data = record_bytes(1, 0, 46, field_bytes(24, b"\x01\x0b\x02\xca\x0a\x14\x00"))
        (record,) = parse_data_records(data)
        self.assertEqual(record.fields, (RawField(24, b"\x01\x0b\x02\xca\x0a\x14\x00"),))
        self.assertEqual(record.fields[0].FIELD_ID, 24)
        self.assertEqual(encode_data_records([record]), data)

    def test_unknown_field_between_known(self) -> None:
        """An unknown field is skipped by its length; the next field still decodes."""
        body = field_bytes(200, b"\xaa" * 5) + field_bytes(2, struct.pack("<IHH", 1, 2, 3))
        (record,) = parse_data_records(record_bytes(1, 0, 11, body))
        self.assertEqual(record.fields, (RawField(200, b"\xaa" * 5), Digital(1, 2, 3)))

    def test_known_field_too_short(self) -> None:
        """A known field id shorter than its layout is a ShortField, bytes kept."""
        cases = [
            (0, bytes(20)),
            (1, b"\x01"),
            (2, bytes(7)),
            (3, b""),
            (6, bytes(2)),
            (7, bytes(4)),
            (26, bytes(7)),
            (27, bytes(7)),
        ]
        for field_id, data in cases:
            encoded = record_bytes(1, 0, 0, field_bytes(field_id, data))
            (record,) = parse_data_records(encoded)
            self.assertEqual(record.fields, (ShortField(field_id, data),), field_id)
            self.assertEqual(record.short_fields, record.fields, field_id)
            self.assertEqual(encode_data_records([record]), encoded, field_id)

    def test_decode_field_types(self) -> None:
        """decode_field builds the typed value of every known field id."""
        self.assertEqual(decode_field(1, b"\x27\x00OK"), DebugText(0x27, b"OK"))
        self.assertEqual(decode_field(1, b"\x27\x00"), DebugText(0x27, b""))
        self.assertEqual(decode_field(3, bytes.fromhex("02000009b6e139")),
                         DriverId(2, bytes.fromhex("000009b6e139")))
        self.assertEqual(decode_field(3, b"\x07"), DriverId(7, b""))
        self.assertEqual(decode_field(6, b""), Analogues(6, ()))
        self.assertEqual(decode_field(6, b"\x03\x00\x80"), Analogues(6, ((3, -32768),)))
        self.assertEqual(decode_field(7, b"\x11\x01\x01\x01\x00\x12\x01\x00\x00\x00"),
                         Analogues(7, ((17, 65793), (18, 1))))
        self.assertEqual(decode_field(7, b"\x0b\xff\xff\xff\xff"), Analogues(7, ((11, -1),)))
        self.assertEqual(decode_field(26, struct.pack("<II", 10, 20)), TripSummary(10, 20))
        self.assertEqual(decode_field(27, struct.pack("<II", 30, 40)), OdometerRunHours(30, 40))

    def test_gps_signed_values(self) -> None:
        """Latitude, longitude and altitude are signed; speed is unsigned."""
        data = struct.pack("<IiihHBBBBB", 1, -1, -(2**31), -5, 65535, 0, 0, 0, 0, 0)
        self.assertEqual(decode_field(0, data), GpsFix(1, -1, -(2**31), -5, 65535, 0, 0, 0, 0, 0))

    def test_extended_length_round_trip(self) -> None:
        """A field longer than 254 bytes is written with the 255 escape and read back."""
        long_raw = RawField(200, bytes(range(256)) * 2)
        long_text = DebugText(0x13, b"x" * 1000)
        records = [Record(9, 10, 21, (long_raw, long_text, Digital(1, 0, 3)))]
        data = encode_data_records(records)
        self.assertEqual(data[11:15], b"\xc8\xff\x00\x02")
        self.assertEqual(data[15 + 512 : 15 + 512 + 4], b"\x01\xff\xea\x03")
        self.assertEqual(len(data), 11 + 4 + 512 + 4 + 1002 + 2 + 8)
        self.assertEqual(parse_data_records(data), records)

    def test_extended_length_boundary(self) -> None:
        """254 bytes use the one-byte length; 255 bytes need the escape."""
        short = encode_data_records([Record(1, 0, 0, (RawField(99, bytes(254)),))])
        self.assertEqual(short[11:13], b"\x63\xfe")
        escaped = encode_data_records([Record(1, 0, 0, (RawField(99, bytes(255)),))])
        self.assertEqual(escaped[11:15], b"\x63\xff\xff\x00")
        self.assertEqual(parse_data_records(escaped)[0].fields, (RawField(99, bytes(255)),))

    def test_extended_length_hand_written(self) -> None:
        """Hand-written escaped fields decode, even for short and known fields."""
        gps = struct.pack("<IiihHBBBBB", 5, 10, 20, 30, 40, 1, 2, 3, 4, 7)
        body = b"\x30\xff\x03\x00\xaa\xbb\xcc" + b"\x00\xff\x15\x00" + gps + b"\x63\xff\x00\x00"
        (record,) = parse_data_records(record_bytes(4, 5, 6, body))
        self.assertEqual(
            record.fields,
            (RawField(0x30, b"\xaa\xbb\xcc"), GpsFix(5, 10, 20, 30, 40, 1, 2, 3, 4, 7), RawField(0x63, b"")),
        )

    def test_truncated_record_header(self) -> None:
        """Fewer than 11 bytes left for a record header raise."""
        for size in (1, 2, 10):
            self.assertRaises(ProtocolError, parse_data_records, bytes([11]) + bytes(size - 1))

    def test_record_longer_than_payload(self) -> None:
        """A record declaring more bytes than remain raises."""
        data = record_bytes(1, 0, 0, field_bytes(2, bytes(8)))
        self.assertRaises(ProtocolError, parse_data_records, data[:-1])

    def test_record_length_below_header(self) -> None:
        """A record length smaller than its own header raises (no endless loop)."""
        for length in (0, 1, 10):
            data = struct.pack("<HIIB", length, 1, 0, 0)
            self.assertRaises(ProtocolError, parse_data_records, data)

    def test_truncated_field_header(self) -> None:
        """A single byte left in a record for a field header raises."""
        self.assertRaises(ProtocolError, parse_data_records, record_bytes(1, 0, 0, b"\x02"))

    def test_truncated_extended_length(self) -> None:
        """An escape without its two length bytes raises."""
        self.assertRaises(ProtocolError, parse_data_records, record_bytes(1, 0, 0, b"\x63\xff"))
        self.assertRaises(ProtocolError, parse_data_records, record_bytes(1, 0, 0, b"\x63\xff\x01"))

    def test_field_past_record_end(self) -> None:
        """A field longer than what is left of its record raises."""
        self.assertRaises(ProtocolError, parse_data_records, record_bytes(1, 0, 0, b"\x02\x08" + bytes(7)))
        self.assertRaises(
            ProtocolError, parse_data_records, record_bytes(1, 0, 0, b"\x63\xff\x10\x00" + bytes(15))
        )

    def test_field_cannot_spill_into_next_record(self) -> None:
        """A field is bounded by its record, even if the payload has more bytes."""
        data = record_bytes(1, 0, 0, b"\x02\x08" + bytes(4)) + record_bytes(2, 0, 0, b"")
        self.assertRaises(ProtocolError, parse_data_records, data)

    def test_every_truncation_of_capture(self) -> None:
        """Cut anywhere, a capture either parses to whole records or raises ProtocolError."""
        for name in DATA_CAPTURES:
            data = payload(name)
            records = parse_data_records(data)
            boundaries = {}
            offset = 0
            for count in range(len(records) + 1):
                boundaries[offset] = count
                if count < len(records):
                    offset += struct.unpack_from("<H", data, offset)[0]
            for cut in range(len(data)):
                if cut in boundaries:
                    self.assertEqual(parse_data_records(data[:cut]), records[: boundaries[cut]])
                else:
                    self.assertRaises(ProtocolError, parse_data_records, data[:cut])


class FieldLengthTests(SynchronousTestCase):
    """Fields longer than their layout decode from their first bytes and keep the rest."""

    def test_gps_one_byte_longer(self) -> None:
        """A 22-byte GPS field decodes the 21-byte layout and keeps the 22nd byte."""
        layout = struct.pack("<IiihHBBBBB", 5, -10, 20, 30, 40, 1, 2, 3, 4, 7)
        field = decode_field(0, layout + b"\x99")
        self.assertEqual(field, GpsFix(5, -10, 20, 30, 40, 1, 2, 3, 4, 7, extra=b"\x99"))
        self.assertEqual(decode_field(0, layout).extra, b"")

    def test_longer_packed_fields(self) -> None:
        """Digital, trip and odometer fields decode their layout with extra bytes."""
        self.assertEqual(decode_field(2, struct.pack("<IHH", 1, 2, 3) + b"\x01\x02"),
                         Digital(1, 2, 3, extra=b"\x01\x02"))
        self.assertEqual(decode_field(26, struct.pack("<II", 10, 20) + b"\x00"),
                         TripSummary(10, 20, extra=b"\x00"))
        self.assertEqual(decode_field(27, struct.pack("<II", 30, 40) + b"\xff"),
                         OdometerRunHours(30, 40, extra=b"\xff"))

    def test_analogue_part_item(self) -> None:
        """A trailing part of an analogue item is kept as extra, whole items decoded."""
        self.assertEqual(decode_field(6, b"\x01\x10\x10\x02\x05"),
                         Analogues(6, ((1, 0x1010),), extra=b"\x02\x05"))
        self.assertEqual(decode_field(7, b"\x0b\x01\x00\x00\x00\x0c"),
                         Analogues(7, ((11, 1),), extra=b"\x0c"))
        self.assertEqual(decode_field(6, b"\x01\x10\x10").extra, b"")

    def test_longer_fields_round_trip(self) -> None:
        """Encoding a longer field gives back every byte the device sent."""
        cases = [(0, bytes(range(22))), (2, bytes(9)), (6, bytes(4)), (7, bytes(6)),
                 (26, bytes(12)), (27, bytes(9))]
        for field_id, data in cases:
            encoded = record_bytes(1, 0, 0, field_bytes(field_id, data))
            (record,) = parse_data_records(encoded)
            self.assertNotIsInstance(record.fields[0], RawField)
            self.assertEqual(record.short_fields, (), field_id)
            self.assertEqual(encode_data_records([record]), encoded, field_id)

    def test_short_field_is_not_raw_unknown(self) -> None:
        """A short known field differs from an unknown id's RawField of the same bytes."""
        self.assertNotEqual(decode_field(0, bytes(20)), RawField(0, bytes(20)))
        self.assertEqual(decode_field(99, bytes(20)), RawField(99, bytes(20)))


class AnalogueSignTests(SynchronousTestCase):
    """16-bit analogue 3 (temperature) is signed; every other 16-bit analogue is unsigned."""

    def test_temperature_signed(self) -> None:
        """Analogue 3 at 0x8000 and 0xffff reads -32768 and -1; 0x7fff stays positive."""
        self.assertEqual(decode_field(6, b"\x03\x00\x80\x03\xff\xff\x03\xff\x7f").values,
                         ((3, -32768), (3, -1), (3, 32767)))

    def test_others_unsigned(self) -> None:
        """Analogues 1, 2, 4, 5, 6 and 9 at 0x8000 or 0xffff read as unsigned."""
        data = b"".join(struct.pack("<BH", n, 0x8000 if n % 2 else 0xFFFF) for n in (1, 2, 4, 5, 6, 9))
        self.assertEqual(decode_field(6, data).values,
                         ((1, 32768), (2, 65535), (4, 65535), (5, 32768), (6, 65535), (9, 32768)))

    def test_round_trip_both_ways(self) -> None:
        """Signed analogue 3 and unsigned others encode back to the same bytes."""
        data = b"\x03\x00\x80\x01\xff\xff\x02\x00\x80"
        self.assertEqual(decode_field(6, data).to_bytes(), data)

    def test_32_bit_signed(self) -> None:
        """32-bit analogues stay signed (no public source says otherwise)."""
        self.assertEqual(decode_field(7, b"\x0b\x00\x00\x00\x80").values, ((11, -(2**31)),))


class FixedRecordsTests(SynchronousTestCase):
    """parse_fixed_records decodes G50 64-byte records to the common model."""

    def test_one_record(self) -> None:
        """The single-record capture decodes to every hand-decoded value (tests/data/README.rst)."""
        (record,) = parse_fixed_records(payload("fixed64-0x10-1-record-G50"))
        time = since_2013("2018-03-14 11:46:24")
        self.assertEqual(
            record,
            Record(
                894124,
                time,
                3,
                (
                    Analogues(6, ((1, 4235), (2, 1393))),
                    FixedRecordExtras(
                        -294937869, 312025029, 66, 0, 126, 2449, 9, 7, 1, 0,
                        (4235, 13925, 0, 0, 0), 127, (468, -828, -270),
                        b"\xff" * 8, 238, True,
                    ),
                ),
            ),
        )

    def test_two_records(self) -> None:
        """The two-record capture holds index 894125 and 894126 at 11:46:34."""
        records = parse_fixed_records(payload("fixed64-0x10-2-records-G50"))
        time = since_2013("2018-03-14 11:46:34")
        self.assertEqual([r.seq for r in records], [894125, 894126])
        self.assertEqual([r.reason for r in records], [9, 2])
        self.assertEqual([r.time for r in records], [time, time])
        self.assertEqual([r.fields[1].inputs for r in records], [0, 0])
        self.assertEqual([r.fields[1].checksum_ok for r in records], [True, True])
        self.assertEqual([r.fields[1].device_id for r in records], [b"\xff" * 8, bytes(8)])
        self.assertEqual([r.fields[1].pdop_hundredths for r in records], [229, 229])
        for record in records:
            self.assertEqual(record.fields[1].latitude, -294937869)
            self.assertEqual(record.fields[1].longitude, 312025029)

    def test_checksums_in_captures(self) -> None:
        """The last two bytes of every captured record are its Fletcher-8 sum."""
        sums = []
        for name in FIXED_CAPTURES:
            data = payload(name)
            for offset in range(0, len(data), 64):
                chunk = data[offset : offset + 64]
                self.assertEqual(fletcher8(chunk[:62]), chunk[62:])
                sums.append(chunk[62:].hex())
        self.assertEqual(sums, ["3f1b", "c5d0", "c96d"])

    def test_corrupted_byte(self) -> None:
        """A changed byte clears checksum_ok but the record still decodes."""
        data = bytearray(payload("fixed64-0x10-1-record-G50"))
        data[17] ^= 0x01  # speed low byte
        (record,) = parse_fixed_records(bytes(data))
        self.assertFalse(record.fields[1].checksum_ok)
        self.assertEqual(record.seq, 894124)
        self.assertEqual(record.fields[1].speed, 1)

    def test_corrupted_checksum(self) -> None:
        """A wrong checksum byte clears checksum_ok."""
        data = bytearray(payload("fixed64-0x10-1-record-G50"))
        data[63] ^= 0xFF
        self.assertFalse(parse_fixed_records(bytes(data))[0].fields[1].checksum_ok)

    def test_corruption_only_affects_its_record(self) -> None:
        """In a two-record payload only the corrupted record fails its checksum."""
        data = bytearray(payload("fixed64-0x10-2-records-G50"))
        data[64 + 30] ^= 0x10
        records = parse_fixed_records(bytes(data))
        self.assertEqual([r.fields[1].checksum_ok for r in records], [True, False])

    def test_not_multiple_of_64(self) -> None:
        """A payload that is not a whole number of records raises."""
        data = payload("fixed64-0x10-2-records-G50")
        for size in (1, 63, 65, 127, 129):
            self.assertRaises(ProtocolError, parse_fixed_records, (data * 2)[:size])

    def test_empty(self) -> None:
        """An empty 0x10 payload holds no records."""
        self.assertEqual(parse_fixed_records(b""), [])

    def test_encode_reproduces_capture(self) -> None:
        """encode_fixed_record with the captured values gives the captured bytes."""
        data = encode_fixed_record(
            894124,
            since_2013("2018-03-14 11:46:24"),
            -294937869,
            312025029,
            3,
            heading=126,
            altitude=66,
            position_accuracy=2449,
            speed_accuracy=9,
            gps_status=7,
            inputs=1,
            analogues=(4235, 13925, 0, 0, 0),
            temperature=127,
            acceleration=(468, -828, -270),
            device_id=b"\xff" * 8,
            pdop_hundredths=238,
        )
        self.assertEqual(data, payload("fixed64-0x10-1-record-G50"))

    def test_encode_round_trip(self) -> None:
        """A record built by encode_fixed_record parses back to its values."""
        time = since_2013("2031-12-31 23:59:58")
        data = encode_fixed_record(
            7, time, -899999999, 1799999999, 44,
            speed=65535, heading=179, altitude=-100, position_accuracy=65535,
            speed_accuracy=255, gps_status=1, inputs=2**32 - 1, outputs=65535,
            analogues=(-32768, 32767, 1, -1, 0), temperature=-128,
            acceleration=(-32768, 0, 32767), device_id=b"12345678", pdop_hundredths=99,
        )
        self.assertEqual(len(data), 64)
        self.assertEqual(data[60:62], b"\x00\x00")
        self.assertEqual(
            parse_fixed_records(data),
            [
                Record(
                    7,
                    time,
                    44,
                    (
                        Analogues(6, ((1, 32768), (2, 3277), (3, -12800))),
                        FixedRecordExtras(
                            -899999999, 1799999999, -100, 65535, 179, 65535, 255, 1,
                            2**32 - 1, 65535, (32768, 32767, 1, 65535, 0), -128,
                            (-32768, 0, 32767), b"12345678", 99, True,
                        ),
                    ),
                )
            ],
        )

    def test_time_zero_round_trip(self) -> None:
        """Device time 0 packs as 2013-01-01 and reads back as 0."""
        (record,) = parse_fixed_records(encode_fixed_record(1, 0, 0, 0, 0))
        self.assertEqual(record.time, 0)

    def test_invalid_packed_time(self) -> None:
        """A packed time with month 0 reads as time 0."""
        data = bytearray(payload("fixed64-0x10-1-record-G50"))
        data[5:9] = b"\x00\x00\x00\x00"
        data[62:64] = fletcher8(bytes(data[:62]))
        (record,) = parse_fixed_records(bytes(data))
        self.assertEqual(record.time, 0)
        self.assertTrue(record.fields[1].checksum_ok)

    def test_pdop_kept_in_hundredths(self) -> None:
        """PDOP stays in the G50's hundredths, never squeezed into a byte."""
        for hundredths in (0, 238, 2550, 65535):
            (record,) = parse_fixed_records(encode_fixed_record(1, 0, 0, 0, 0, pdop_hundredths=hundredths))
            self.assertEqual(record.fields[-1].pdop_hundredths, hundredths)


class FixedRecordMappingTests(SynchronousTestCase):
    """Only G50 values whose DM meaning and unit are established reach DM's fields."""

    def standard(self, **values) -> tuple:
        (record,) = parse_fixed_records(encode_fixed_record(1, 0, 0, 0, 0, **values))
        return record.fields[0].values

    def test_no_gps_or_digital_field(self) -> None:
        """A G50 record has no GpsFix (accuracy unit unknown) nor Digital (no status word)."""
        (record,) = parse_fixed_records(payload("fixed64-0x10-1-record-G50"))
        self.assertEqual([type(f) for f in record.fields], [Analogues, FixedRecordExtras])

    def test_supply_millivolts_to_tens(self) -> None:
        """Analogue 2 goes from the G50's mV to DM's 10 mV, rounded half up."""
        for millivolts, tens in ((13925, 1393), (13924, 1392), (13915, 1392), (4, 0), (5, 1), (65535, 6554)):
            self.assertEqual(self.standard(analogues=(0, millivolts, 0, 0, 0))[1], (2, tens), millivolts)

    def test_battery_millivolts_as_is(self) -> None:
        """Analogue 1 is battery mV in both, so it passes unchanged and unsigned."""
        self.assertEqual(self.standard(analogues=(4235, 0, 0, 0, 0))[0], (1, 4235))
        self.assertEqual(self.standard(analogues=(0x8000, 0, 0, 0, 0))[0], (1, 0x8000))

    def test_unknown_analogues_not_standard(self) -> None:
        """G50 analogues 3-5 (meaning unknown) never appear as DM analogues."""
        numbers = [n for n, _ in self.standard(analogues=(1, 2, 3, 4, 5), temperature=127)]
        self.assertEqual(numbers, [1, 2])

    def test_temperature_to_analogue_3(self) -> None:
        """Temperature °C becomes analogue 3 in 0.01 °C; 127 (none) and only 127 is left out."""
        self.assertEqual(self.standard(temperature=126)[2], (3, 12600))
        self.assertEqual(self.standard(temperature=-128)[2], (3, -12800))
        self.assertEqual(self.standard(temperature=0)[2], (3, 0))
        self.assertEqual(len(self.standard(temperature=127)), 2)


class Fletcher8Tests(SynchronousTestCase):
    """fletcher8 is the UBX-style 8-bit Fletcher checksum."""

    def test_empty(self) -> None:
        """The checksum of nothing is two zero bytes."""
        self.assertEqual(fletcher8(b""), b"\x00\x00")

    def test_small(self) -> None:
        """A is the byte sum and B the sum of the running A."""
        self.assertEqual(fletcher8(b"\x01\x02"), b"\x03\x04")
        self.assertEqual(fletcher8(b"\x01\x02\x03"), b"\x06\x0a")

    def test_wraps_modulo_256(self) -> None:
        """Both sums wrap at 256."""
        self.assertEqual(fletcher8(b"\xff\xff"), b"\xfe\xfd")
        self.assertEqual(fletcher8(b"\x80" * 4), b"\x00\x00")

    def test_order_matters(self) -> None:
        """Swapping two bytes changes B, unlike a plain sum."""
        self.assertNotEqual(fletcher8(b"\x01\x02"), fletcher8(b"\x02\x01"))


class FixedRecordTimeTests(SynchronousTestCase):
    """The G50 packed time is read as a real calendar date."""

    def test_impossible_date_is_zero(self) -> None:
        """A packed 31 February (only a corrupted record has one) gives time 0, not 3 March."""
        record = bytearray(capture("fixed64-0x10-1-record-G50")[5:])
        packed = 18 | 2 << 6 | 31 << 10 | 11 << 15 | 46 << 20 | 24 << 26
        record[5:9] = packed.to_bytes(4, "little")
        self.assertEqual(parse_fixed_records(bytes(record))[0].time, 0)


class FramingErrorTests(SynchronousTestCase):
    """A framing error carries the frames that came before the bad bytes."""

    def test_frames_before_bad_bytes(self) -> None:
        """Bad sync after two good frames raises with those two frames attached."""
        good = capture("hello-49-byte-dart") + capture("async-session-request-0x22")
        with self.assertRaises(FramingError) as raised:
            FrameDecoder().feed(good + b"\x99\x99")
        self.assertEqual([f.type for f in raised.exception.frames], [0x00, 0x22])

    def test_oversized_after_good_frame(self) -> None:
        """An oversized declared length after a good frame keeps that frame."""
        data = capture("async-session-request-0x22") + b"\x02\x55\x04\xff\xff"
        with self.assertRaises(FramingError) as raised:
            FrameDecoder(max_payload=1000).feed(data)
        self.assertEqual([f.type for f in raised.exception.frames], [0x22])


def _hand_decode():
    """The standalone ``tests/data/hand_decode.py``, loaded from its path."""
    path = DATA / "hand_decode.py"
    spec = importlib.util.spec_from_file_location("hand_decode", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class HandDecodeTests(SynchronousTestCase):
    """The codec agrees with the independent hand decode of every capture."""

    def test_literals_are_what_the_script_prints(self) -> None:
        """The literals in tests/vectors.py are what hand_decode.py decodes today."""
        decoded = _hand_decode().decode_all()
        records = {
            name: tuple(
                (r["seq"], r["time"], r["reason"], tuple(r["field_ids"])) for r in decoded[name]
            )
            for name in HAND_DECODED_RECORDS
        }
        fixed = {
            name: tuple((r["index"], r["time"], r["event"]) for r in decoded[name])
            for name in HAND_DECODED_FIXED
        }
        self.assertEqual(records, HAND_DECODED_RECORDS)
        self.assertEqual(fixed, HAND_DECODED_FIXED)
        self.assertEqual(sorted(HAND_DECODED_RECORDS), sorted(DATA_CAPTURES))
        self.assertEqual(sorted(HAND_DECODED_FIXED), sorted(FIXED_CAPTURES))

    def test_hand_decode_checksums(self) -> None:
        """The hand decode finds all three fixed-record checksums correct."""
        decoded = _hand_decode().decode_all()
        checks = [r["checksum_ok"] for name in FIXED_CAPTURES for r in decoded[name]]
        self.assertEqual(checks, [True, True, True])

    def test_data_records_match(self) -> None:
        """All 34 records of the 0x04 captures have the hand decode's seq, time, reason, fields."""
        count = 0
        for name, expected in HAND_DECODED_RECORDS.items():
            records = parse_data_records(payload(name))
            self.assertEqual(
                [(r.seq, r.time, r.reason, tuple(f.FIELD_ID for f in r.fields)) for r in records],
                [(seq, since_2013(t), reason, ids) for seq, t, reason, ids in expected],
                name,
            )
            count += len(records)
        self.assertEqual(count, 2 + 12 + 20)

    def test_fixed_records_match(self) -> None:
        """All 3 G50 fixed records have the hand decode's index, time and event."""
        count = 0
        for name, expected in HAND_DECODED_FIXED.items():
            records = parse_fixed_records(payload(name))
            self.assertEqual(
                [(r.seq, r.time, r.reason) for r in records],
                [(index, since_2013(t), event) for index, t, event in expected],
                name,
            )
            count += len(records)
        self.assertEqual(count, 3)


class LongHelloTests(SynchronousTestCase):
    """Only a hello of exactly 51 bytes is the G50 form."""

    def test_52_bytes_not_g50(self) -> None:
        """A 52-byte hello (the G50 one plus a byte) is not G50 and gets the time reply."""
        hello = parse_hello(payload("hello-51-byte-G50") + b"\x00")
        self.assertFalse(hello.g50)
        self.assertEqual(hello.serial, 6912)
        self.assertEqual(
            hello_response(hello, NEW_YEAR_2024),
            bytes.fromhex("0255010800") + (347068800).to_bytes(4, "little") + bytes(4),
        )

    def test_much_longer_not_g50(self) -> None:
        """A 200-byte hello is not G50 either, and its identity is still read."""
        hello = parse_hello(payload("hello-49-byte-dart") + bytes(151))
        self.assertFalse(hello.g50)
        self.assertEqual((hello.serial, hello.firmware), (129336, "34.2.1.9"))
        self.assertEqual(len(hello_response(hello, NEW_YEAR_2024)), 5 + 8)

    def test_50_bytes_not_g50(self) -> None:
        """A 50-byte hello, one short of G50, is not G50."""
        self.assertFalse(parse_hello(payload("hello-51-byte-G50")[:50]).g50)


class FixedRecordTimeZoneTests(SynchronousTestCase):
    """G50 packed times are UTC whatever the host's time zone."""

    def setUp(self) -> None:
        use_time_zone(self)

    def test_encodes_capture_time_in_utc(self) -> None:
        """Under Auckland time the capture's values still encode to its exact bytes."""
        (index, moment, event), = HAND_DECODED_FIXED["fixed64-0x10-1-record-G50"]
        data = encode_fixed_record(
            index, since_2013(moment), -294937869, 312025029, event,
            heading=126, altitude=66, position_accuracy=2449, speed_accuracy=9,
            gps_status=7, inputs=1, analogues=(4235, 13925, 0, 0, 0),
            temperature=127, acceleration=(468, -828, -270), device_id=b"\xff" * 8,
            pdop_hundredths=238,
        )
        self.assertEqual(data, payload("fixed64-0x10-1-record-G50"))

    def test_round_trip(self) -> None:
        """A time encoded and parsed back under Auckland time is unchanged."""
        moment = since_2013("2021-02-05 23:30:00")  # another date in Auckland
        (record,) = parse_fixed_records(encode_fixed_record(1, moment, 0, 0, 3))
        self.assertEqual(record.time, moment)
