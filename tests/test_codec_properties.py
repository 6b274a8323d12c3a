"""
Property-based tests of :mod:`oemrelay.codec` (hypothesis).

Two kinds of property: whatever the codec encodes it decodes to the same
thing (frames whatever the TCP segmentation, hellos, data records, fixed
records, async messages), and arbitrary bytes from a device only ever raise
the codec's own :class:`~oemrelay.codec.ProtocolError` (the session turns that
into one log line and a closed connection; anything else would be a bug).

Every test runs a bounded number of examples, derandomized (the same
examples on every run, no example database), so the module takes a few
seconds and a failure is reproducible.  hypothesis is a test-only dependency.
"""

from __future__ import annotations

import struct

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from oemrelay.codec import (
    FIXED_RECORD_SIZE,
    HEADER_SIZE,
    MAX_PAYLOAD,
    Analogues,
    DebugText,
    Digital,
    DriverId,
    Frame,
    FrameDecoder,
    FramingError,
    GpsFix,
    Hello,
    OdometerRunHours,
    ProtocolError,
    SIGNED_ANALOGUE,
    RawField,
    Record,
    TripSummary,
    decode_field,
    encode_async_message,
    encode_data_records,
    encode_fixed_record,
    encode_frame,
    parse_async_message,
    parse_async_response,
    parse_data_records,
    parse_fixed_records,
    parse_hello,
)

from .record_bytes import bounded, u8, u16, u32

BOUNDED = bounded(100)
i16 = st.integers(-0x8000, 0x7FFF)
i32 = st.integers(-0x80000000, 0x7FFFFFFF)
small_bytes = st.binary(max_size=40)

#: Field ids the codec has no layout for, so they stay RawFields.
_KNOWN_FIELD_IDS = {0, 1, 2, 3, 6, 7, 26, 27}

fields = st.one_of(
    st.builds(GpsFix, u32, i32, i32, i16, u16, u8, u8, u8, u8, u8),
    st.builds(DebugText, u16, small_bytes),
    st.builds(Digital, u32, u16, u16),
    st.builds(DriverId, u8, small_bytes),
    # 16-bit analogues: number 3 (temperature) is signed, every other unsigned.
    st.builds(
        Analogues,
        st.just(6),
        st.lists(
            st.one_of(st.tuples(st.just(SIGNED_ANALOGUE), i16), st.tuples(u8.filter(lambda n: n != SIGNED_ANALOGUE), u16)),
            max_size=8,
        ).map(tuple),
    ),
    st.builds(Analogues, st.just(7), st.lists(st.tuples(u8, i32), max_size=8).map(tuple)),
    st.builds(TripSummary, u32, u32),
    st.builds(OdometerRunHours, u32, u32),
    # Up to 300 bytes: past 254 a field's length takes the extended form.
    st.builds(RawField, u8.filter(lambda i: i not in _KNOWN_FIELD_IDS), st.binary(max_size=300)),
)
records = st.builds(Record, u16, u32, u8, st.lists(fields, max_size=5).map(tuple))

frames = st.builds(Frame, u8, st.binary(max_size=300))


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    """``data`` cut at the positions ``cuts`` (taken modulo its length + 1)."""
    points = sorted({cut % (len(data) + 1) for cut in cuts})
    edges = [0, *points, len(data)]
    return [data[a:b] for a, b in zip(edges, edges[1:])]


def feed_all(decoder: FrameDecoder, chunks: list[bytes]) -> list[Frame]:
    """Every frame ``decoder`` yields for ``chunks`` fed one after another."""
    return [frame for chunk in chunks for frame in decoder.feed(chunk)]


class FrameDecoderPropertyTests(SynchronousTestCase):
    """The framing layer, fed the way TCP delivers bytes."""

    @BOUNDED
    @given(st.lists(frames, max_size=6), st.lists(st.integers(0, 2000), max_size=12))
    def test_frames_survive_any_segmentation(self, sent: list[Frame], cuts: list[int]) -> None:
        """Encoded frames cut anywhere decode to the same frames, with nothing left over."""
        wire = b"".join(encode_frame(frame.type, frame.payload) for frame in sent)
        decoder = FrameDecoder()
        self.assertEqual(feed_all(decoder, split_at(wire, cuts)), sent)
        self.assertEqual(decoder.buffered, 0)

    @BOUNDED
    @given(frames, st.integers(1, HEADER_SIZE + 299))
    def test_incomplete_frame_is_buffered_not_yielded(self, frame: Frame, missing: int) -> None:
        """A frame missing its last bytes yields nothing and is held whole in the buffer."""
        wire = frame.to_bytes()
        missing = min(missing, len(wire))
        decoder = FrameDecoder()
        self.assertEqual(decoder.feed(wire[: len(wire) - missing]), [])
        self.assertEqual(decoder.buffered, len(wire) - missing)
        self.assertEqual(decoder.feed(wire[len(wire) - missing :]), [frame])

    @BOUNDED
    @given(st.binary(max_size=600), st.lists(st.integers(0, 2000), max_size=8), st.integers(0, MAX_PAYLOAD))
    def test_arbitrary_bytes_raise_only_framing_errors(
        self, data: bytes, cuts: list[int], max_payload: int
    ) -> None:
        """Any bytes in any chunks yield frames or raise FramingError carrying the frames before the fault."""
        decoder = FrameDecoder(max_payload)
        yielded: list[Frame] = []
        for chunk in split_at(data, cuts):
            try:
                yielded += decoder.feed(chunk)
            except FramingError as error:
                self.assertTrue(str(error))
                self.assertTrue(all(isinstance(f, Frame) for f in error.frames))
                return
        self.assertTrue(all(len(f.payload) <= max_payload for f in yielded))

    @BOUNDED
    @given(u8, st.integers(0, MAX_PAYLOAD - 2), st.integers(-2, 2))
    def test_declared_length_checked_against_maximum(self, message_type: int, max_payload: int, beyond: int) -> None:
        """A header declaring more than max_payload is refused at once; up to it, the payload is awaited."""
        length = max(0, max_payload + beyond)  # around the boundary, where an off-by-one shows
        header = struct.pack("<2sBH", b"\x02\x55", message_type, length)
        decoder = FrameDecoder(max_payload)
        if length > max_payload:
            with self.assertRaises(FramingError):
                decoder.feed(header)
        else:
            self.assertEqual(decoder.feed(header), [] if length else [Frame(message_type, b"")])


class MessagePropertyTests(SynchronousTestCase):
    """The payload parsers and their encoders."""

    @BOUNDED
    @given(st.lists(records, max_size=4))
    def test_data_records_round_trip(self, sent: list[Record]) -> None:
        """Encoded data records parse back to the same records."""
        self.assertEqual(parse_data_records(encode_data_records(sent)), sent)

    @BOUNDED
    @given(u8, st.binary(max_size=300))
    def test_decoded_field_keeps_every_byte(self, field_id: int, data: bytes) -> None:
        """Any field's bytes decode to a field that encodes back to the same bytes."""
        self.assertEqual(decode_field(field_id, data).to_bytes(), data)

    @BOUNDED
    @given(
        u32,
        st.text("0123456789", max_size=16),
        st.text("0123456789", max_size=21),
        u8, u8, u8, u8, u32, st.booleans(),
    )
    def test_hello_round_trip(self, serial, imei, iccid, product, hardware, major, minor, flags, g50) -> None:
        """A hello's fields, 49- or 51-byte form, parse back from its payload."""
        hello = Hello(serial, imei, iccid, product, hardware, major, minor, flags, g50)
        self.assertEqual(parse_hello(hello.to_payload()), hello)

    @BOUNDED
    @given(
        u32,
        # Seconds since 2013 the G50's 6-bit year (2000-2063) can hold.
        st.integers(0, 1_609_372_799),  # 2063-12-31 23:59:59
        i32, i32, u8, st.tuples(u16, u16, u16, u16, u16), st.binary(min_size=8, max_size=8), u16,
    )
    def test_fixed_record_round_trip(self, index, time, latitude, longitude, event, analogues, device_id, pdop) -> None:
        """An encoded 64-byte record parses back with its values and a matching checksum."""
        payload = encode_fixed_record(
            index, time, latitude, longitude, event,
            analogues=analogues, device_id=device_id, pdop_hundredths=pdop,
        )
        (record,) = parse_fixed_records(payload)
        _standard_analogues, extras = record.fields
        self.assertEqual((record.seq, record.time, record.reason), (index, time, event))
        self.assertEqual((extras.latitude, extras.longitude), (latitude, longitude))
        self.assertEqual(extras.analogues, analogues)
        self.assertEqual((extras.device_id, extras.pdop_hundredths), (device_id, pdop))
        self.assertTrue(extras.checksum_ok)

    @BOUNDED
    @given(u32, st.integers(0, 61), st.integers(1, 255))
    def test_any_changed_byte_fails_the_checksum(self, index: int, position: int, delta: int) -> None:
        """Changing any one of a fixed record's 62 checked bytes makes its checksum mismatch."""
        payload = bytearray(encode_fixed_record(index, 0, 0, 0, 1))
        payload[position] = (payload[position] + delta) % 256
        (record,) = parse_fixed_records(bytes(payload))
        self.assertFalse(record.fields[-1].checksum_ok)

    @BOUNDED
    @given(u32, u16, st.binary(max_size=200), u32, u8)
    def test_async_message_round_trip(self, message_id, async_type, data, can_address, flags) -> None:
        """An encoded 0x20 message parses back to its id, type, address, flags and data."""
        (frame,) = FrameDecoder().feed(encode_async_message(message_id, async_type, data, can_address, flags))
        message = parse_async_message(frame.payload)
        self.assertEqual(
            (message.message_id, message.async_type, message.data, message.can_address, message.flags),
            (message_id, async_type, data, can_address, flags),
        )

    @BOUNDED
    @given(st.lists(records, min_size=1, max_size=3), st.integers(0, 2000), u8, st.booleans())
    def test_damaged_records_raise_only_protocol_errors(
        self, sent: list[Record], position: int, value: int, truncate: bool
    ) -> None:
        """Valid data records truncated or with one byte overwritten parse or raise ProtocolError."""
        payload = bytearray(encode_data_records(sent))
        position %= len(payload)
        if truncate:
            del payload[position:]
        else:
            payload[position] = value
        try:
            parse_data_records(bytes(payload))
        except ProtocolError as error:
            self.assertTrue(str(error))

    @BOUNDED
    @given(st.binary(max_size=3 * FIXED_RECORD_SIZE + 10))
    def test_arbitrary_payloads_raise_only_protocol_errors(self, payload: bytes) -> None:
        """Every payload parser either decodes arbitrary bytes or raises ProtocolError."""
        for parse in (
            parse_hello,
            parse_data_records,
            parse_fixed_records,
            parse_async_message,
            parse_async_response,
        ):
            try:
                parse(payload)
            except ProtocolError as error:
                self.assertTrue(str(error), parse.__name__)
