"""
The structural walk of data frames (codec.frame_shape), held to the object
decoder it stands in for in the session: the same records, fields, first
sequence number, short fields, checksum mismatches, cost and errors.
"""

from __future__ import annotations

import struct

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from oemrelay.codec import (
    EMPTY_FIELD_IDS,
    FIELD_MIN_SIZE,
    MAX_FIELDS_PER_RECORD,
    Analogues,
    DebugText,
    Digital,
    FixedRecordExtras,
    Frame,
    FrameDecoder,
    GpsFix,
    MessageType,
    ProtocolError,
    RawField,
    Record,
    ShortField,
    data_records_shape,
    decode_field,
    decoded_cost,
    encode_fixed_record,
    fixed_records_shape,
    frame_shape,
    is_short_field,
    parse_data_records,
    parse_fixed_records,
    upload_cost,
)
from tests.record_bytes import BOUNDED, damaged, data_payloads, fixed_payloads, u8
from tests.vectors import captures


def _outcome(parse, payload: bytes):
    """What ``parse`` makes of ``payload``: its result or its error message."""
    try:
        return "ok", parse(payload)
    except ProtocolError as error:
        return "error", str(error)


class DataShapeTests(SynchronousTestCase):
    """data_records_shape against parse_data_records."""

    def assertSameAsDecoder(self, payload: bytes) -> None:
        decoded = _outcome(parse_data_records, payload)
        walked = _outcome(data_records_shape, payload)
        self.assertEqual(walked[0], decoded[0], (walked, decoded))
        if decoded[0] == "error":
            self.assertEqual(walked[1], decoded[1])
            return
        records, shape = decoded[1], walked[1]
        self.assertEqual(shape.record_count, len(records))
        self.assertEqual(shape.field_count, sum(len(r.fields) for r in records))
        self.assertEqual(shape.first_seq, records[0].seq if records else None)
        self.assertEqual(
            shape.short_fields,
            tuple(
                (f.field_id, len(f.data))
                for r in records
                for f in r.fields
                if type(f) is ShortField
            ),
        )
        self.assertEqual(
            upload_cost(shape.record_count, shape.field_count, len(payload)),
            decoded_cost(records, len(payload)),
        )

    @BOUNDED
    @given(data_payloads)
    def test_valid_payloads(self, payload: bytes) -> None:
        """Counts, first seq, short fields and cost are the decoder's."""
        self.assertSameAsDecoder(payload)

    @BOUNDED
    @given(data_payloads, st.integers(0, 5000), u8, st.booleans())
    def test_damaged_payloads(self, payload, position, value, truncate) -> None:
        """A cut or changed payload is refused with the decoder's own message, or walked like it."""
        self.assertSameAsDecoder(damaged(payload, position, value, truncate))

    @BOUNDED
    @given(st.binary(max_size=200))
    def test_arbitrary_bytes(self, payload: bytes) -> None:
        """Arbitrary bytes: the same verdict and message as the decoder."""
        self.assertSameAsDecoder(payload)

    def test_captures(self) -> None:
        """Every real 0x04 capture walks like it decodes."""
        for name, wire in captures().items():
            if wire[2] == MessageType.DATA_RECORDS:
                self.assertSameAsDecoder(wire[5:])

    def test_most_fields_per_record(self) -> None:
        """MAX_FIELDS_PER_RECORD empty fields pass; one more is refused, naming the record."""
        def record(fields: int) -> bytes:
            body = b"\x09\x00" * fields
            return struct.pack("<HIIB", 11 + len(body), 77, 0, 1) + body

        self.assertEqual(
            data_records_shape(record(MAX_FIELDS_PER_RECORD)).field_count,
            MAX_FIELDS_PER_RECORD,
        )
        with self.assertRaises(ProtocolError) as raised:
            data_records_shape(record(MAX_FIELDS_PER_RECORD + 1))
        self.assertEqual(
            str(raised.exception), f"record 77 holds more than {MAX_FIELDS_PER_RECORD} fields"
        )

    def test_truncated_header(self) -> None:
        """Ten bytes where a record header needs eleven are refused."""
        with self.assertRaises(ProtocolError) as raised:
            data_records_shape(bytes(10))
        self.assertEqual(str(raised.exception), "truncated record header at offset 0")

    def test_empty_payload(self) -> None:
        """No records: nothing counted and no first seq."""
        self.assertEqual(data_records_shape(b""), (0, 0, None, (), ()))

    def test_first_seq_of_first_record(self) -> None:
        """first_seq is the first record's, not the smallest."""
        payload = struct.pack("<HIIB", 11, 530, 0, 1) + struct.pack("<HIIB", 11, 518, 0, 1)
        self.assertEqual(data_records_shape(payload).first_seq, 530)


class ShortSizeTableTests(SynchronousTestCase):
    """FIELD_MIN_SIZE is the decoders' own boundary, size by size."""

    def test_every_id_and_size_near_the_boundary(self) -> None:
        """is_short_field agrees with decode_field for every id at sizes 0 to minimum + 2."""
        for field_id in range(256):
            for size in range(FIELD_MIN_SIZE[field_id] + 3):
                short = type(decode_field(field_id, bytes(size))) is ShortField
                self.assertEqual(is_short_field(field_id, size), short, (field_id, size))

    def test_layout_sizes(self) -> None:
        """The minimum sizes are the documented layouts (docs/protocol.rst)."""
        self.assertEqual(
            {i: FIELD_MIN_SIZE[i] for i in range(256) if FIELD_MIN_SIZE[i]},
            {0: 21, 1: 2, 2: 8, 3: 1, 6: 3, 7: 5, 26: 8, 27: 8},
        )
        self.assertEqual(EMPTY_FIELD_IDS, {6, 7})


class FixedShapeTests(SynchronousTestCase):
    """fixed_records_shape against parse_fixed_records."""

    @BOUNDED
    @given(fixed_payloads())
    def test_fixed_payloads(self, payload: bytes) -> None:
        """Counts, first index and each mismatched checksum's index are the decoder's."""
        records = parse_fixed_records(payload)
        shape = fixed_records_shape(payload)
        self.assertEqual(shape.record_count, len(records))
        self.assertEqual(shape.field_count, sum(len(r.fields) for r in records))
        self.assertEqual(shape.first_seq, records[0].seq if records else None)
        extras = [r.fields[-1] for r in records]
        self.assertTrue(all(isinstance(e, FixedRecordExtras) for e in extras))
        self.assertEqual(
            shape.bad_checksums,
            tuple(r.seq for r, e in zip(records, extras) if not e.checksum_ok),
        )

    @BOUNDED
    @given(st.binary(max_size=200))
    def test_arbitrary_bytes(self, payload: bytes) -> None:
        """The same verdict and message as the decoder."""
        decoded = _outcome(parse_fixed_records, payload)
        walked = _outcome(fixed_records_shape, payload)
        self.assertEqual(walked[0], decoded[0])
        if decoded[0] == "error":
            self.assertEqual(walked[1], decoded[1])

    def test_one_bad_checksum_of_two(self) -> None:
        """Only the record whose checksum fails is named."""
        good = encode_fixed_record(10, 0, 0, 0, 1)
        bad = bytearray(encode_fixed_record(11, 0, 0, 0, 1))
        bad[63] ^= 1
        self.assertEqual(fixed_records_shape(good + bytes(bad)).bad_checksums, (11,))


class FrameShapeTests(SynchronousTestCase):
    """frame_shape picks the walk by message type."""

    def test_dispatch(self) -> None:
        """0x04 and 0x10 walk as their own layouts."""
        fixed = encode_fixed_record(10, 0, 0, 0, 1)
        self.assertEqual(frame_shape(Frame(MessageType.FIXED_RECORDS, fixed)).record_count, 1)
        data = struct.pack("<HIIB", 11, 5, 0, 1)
        self.assertEqual(frame_shape(Frame(MessageType.DATA_RECORDS, data)).first_seq, 5)

    def test_other_type_refused(self) -> None:
        """A frame of another type holds no records."""
        with self.assertRaises(ProtocolError) as raised:
            frame_shape(Frame(MessageType.TIME_REQUEST, b""))
        self.assertEqual(str(raised.exception), "message type 0x30 holds no records")


class FastConstructorTests(SynchronousTestCase):
    """The decoders' slot-filling constructors make the dataclasses' own objects."""

    def test_decoded_objects_are_the_classes_objects(self) -> None:
        """Every decoded field and record equals, hashes like and is as frozen as one built by its class."""
        import dataclasses

        from oemrelay.codec import parse_records

        frames = [
            frame
            for wire in captures().values()
            for frame in FrameDecoder().feed(wire)
            if frame.type in (MessageType.DATA_RECORDS, MessageType.FIXED_RECORDS)
        ]
        frames.append(Frame(MessageType.DATA_RECORDS, struct.pack("<HIIB", 17, 1, 2, 3)
                            + b"\x00\x01\x00" + b"\x63\x01\x00"))
        seen = set()
        for record in parse_records(frames):
            rebuilt = Record(record.seq, record.time, record.reason, tuple(
                type(f)(*(getattr(f, n.name) for n in dataclasses.fields(f)))
                for f in record.fields
            ))
            self.assertEqual(record, rebuilt)
            self.assertEqual(hash(record), hash(rebuilt))
            seen.update(type(f) for f in record.fields)
            for item in (record, *record.fields):
                name = dataclasses.fields(item)[0].name
                with self.assertRaises(dataclasses.FrozenInstanceError):
                    setattr(item, name, 0)
        self.assertEqual(
            seen,
            {GpsFix, Digital, Analogues, DebugText, ShortField, RawField, FixedRecordExtras},
        )


class KnownLayoutTests(SynchronousTestCase):
    """The walk's memory of layouts by record length never changes its answer."""

    def setUp(self) -> None:
        from oemrelay import codec

        self.codec = codec
        self.patch(codec, "_LAYOUT_BY_LENGTH", {})
        self.patch(codec, "_FRAME_BY_LENGTH", {})

    def record(self, body: bytes, seq: int = 9) -> bytes:
        return struct.pack("<HIIB", 11 + len(body), seq, 0, 1) + body

    def test_same_length_other_layout(self) -> None:
        """A record as long as a known one but laid out otherwise is walked: its own short fields and count."""
        known = self.record(b"\x02\x08" + bytes(8) + b"\x1a\x08" + bytes(8))
        other = self.record(b"\x00\x04" + bytes(4) + b"\x1a\x0c" + bytes(12))
        self.assertEqual(data_records_shape(known).short_fields, ())
        shape = data_records_shape(other)
        self.assertEqual(shape.short_fields, ((0, 4),))
        self.assertEqual(shape.field_count, 2)

    def test_known_layout_keeps_its_short_fields(self) -> None:
        """Short fields are reported again for every record of a remembered layout."""
        record = self.record(b"\x02\x02" + bytes(2))
        self.assertEqual(data_records_shape(record * 3).short_fields, ((2, 2),) * 3)
        self.assertIn(len(record), self.codec._LAYOUT_BY_LENGTH)

    def test_extended_length_never_remembered(self) -> None:
        """A record with an extended-length field is walked every time, however long."""
        record = self.record(b"\x09\xff\x02\x00\xaa\xbb")
        data_records_shape(record)
        self.assertEqual(self.codec._LAYOUT_BY_LENGTH, {})
        same_length = self.record(b"\x09\x04" + bytes(4))
        self.assertEqual(data_records_shape(same_length).field_count, 1)

    def test_damaged_record_of_known_length(self) -> None:
        """A record of a known length whose field overruns it gets the decoder's error."""
        data_records_shape(self.record(b"\x02\x08" + bytes(8)))
        self.assertRefusedAsDecoded(self.record(b"\x02\x09" + bytes(8)))

    def test_known_frame_reads_its_own_first_seq(self) -> None:
        """A payload laid out like one walked before keeps its counts and short fields, with its own first seq."""
        body = b"\x02\x02" + bytes(2) + b"\x1a\x08" + bytes(8)
        data_records_shape(self.record(body, seq=9) + self.record(body, seq=10))
        self.assertEqual(len(self.codec._FRAME_BY_LENGTH), 1)
        self.assertEqual(
            data_records_shape(self.record(body, seq=500) + self.record(body, seq=501)),
            (2, 4, 500, ((2, 2), (2, 2)), ()),
        )

    def test_same_payload_length_other_layout(self) -> None:
        """A payload as long as a known one but laid out otherwise is walked: its own fields."""
        data_records_shape(self.record(b"\x02\x08" + bytes(8)) * 2)
        other = self.record(b"\x02\x02" + bytes(2)) + self.record(b"\x09\x0e" + bytes(14))
        self.assertSameAs(other, (2, 2, 9, ((2, 2),), ()))

    def test_damaged_payload_of_known_length(self) -> None:
        """A payload of a known length whose field overruns its record gets the decoder's error."""
        data_records_shape(self.record(b"\x02\x08" + bytes(8)) * 2)
        self.assertRefusedAsDecoded(
            self.record(b"\x02\x08" + bytes(8)) + self.record(b"\x02\x09" + bytes(8))
        )

    def test_payload_with_extended_length_never_remembered(self) -> None:
        """A payload holding an extended-length field is walked every time."""
        data_records_shape(self.record(b"\x02\x08" + bytes(8)) + self.record(b"\x09\xff\x02\x00\xaa\xbb"))
        self.assertEqual(self.codec._FRAME_BY_LENGTH, {})

    def test_frames_bounded(self) -> None:
        """At the bound new payload lengths are not remembered, and are walked right."""
        self.patch(self.codec, "_MAX_KNOWN_FRAMES", 2)
        self.assertThirdLengthWalked()

    def test_first_layout_of_a_length_kept(self) -> None:
        """Another layout of a known payload length is walked, and the first stays remembered."""
        first = self.record(b"\x02\x08" + bytes(8)) * 2
        data_records_shape(first)
        kept = self.codec._FRAME_BY_LENGTH[len(first)]
        other = self.record(b"\x02\x02" + bytes(2)) + self.record(b"\x09\x0e" + bytes(14))
        self.assertSameAs(other, (2, 2, 9, ((2, 2),), ()))
        self.assertIs(self.codec._FRAME_BY_LENGTH[len(first)], kept)

    def test_frame_headers_bounded_altogether(self) -> None:
        """Payloads whose headers would pass the bound on all kept are walked, not remembered."""
        # Two records of one field: 4 headers (2 record lengths, 2 field headers) each.
        self.patch(self.codec, "_MAX_KNOWN_FRAME_HEADERS", 8)
        self.assertThirdLengthWalked()

    def assertThirdLengthWalked(self) -> None:
        """Three payload lengths in: the first two remembered, the third walked right."""
        for size in (1, 2, 3):
            data_records_shape(self.record(b"\x09" + bytes([size]) + bytes(size)) * 2)
        self.assertEqual(sorted(self.codec._FRAME_BY_LENGTH), [28, 30])
        self.assertSameAs(self.record(b"\x09\x03" + bytes(3)) * 2, (2, 2, 9, (), ()))

    def test_layouts_of_too_many_fields_not_remembered(self) -> None:
        """A record of more than _MAX_LAYOUT_FIELDS fields is walked every time; one of that many is remembered."""
        self.patch(self.codec, "_MAX_LAYOUT_FIELDS", 3)
        at_bound = self.record(b"\x09\x01\x00" * 3)
        over = self.record(b"\x09\x01\x00" * 4)
        data_records_shape(at_bound)
        data_records_shape(over)
        self.assertEqual(sorted(self.codec._LAYOUT_BY_LENGTH), [len(at_bound)])
        self.assertSameAs(over, (1, 4, 9, (), ()))

    def assertRefusedAsDecoded(self, payload: bytes) -> None:
        with self.assertRaises(ProtocolError) as walked:
            data_records_shape(payload)
        with self.assertRaises(ProtocolError) as decoded:
            parse_data_records(payload)
        self.assertEqual(str(walked.exception), str(decoded.exception))

    def assertSameAs(self, payload: bytes, shape: tuple) -> None:
        self.assertEqual(data_records_shape(payload), shape)
        records = parse_data_records(payload)
        self.assertEqual((len(records), sum(len(r.fields) for r in records)), shape[:2])

    def test_bounded(self) -> None:
        """At the bound, new lengths are not remembered; known ones are still updated."""
        self.patch(self.codec, "_MAX_KNOWN_LAYOUTS", 2)
        for size in (1, 2, 3):
            data_records_shape(self.record(b"\x09" + bytes([size]) + bytes(size)))
        self.assertEqual(sorted(self.codec._LAYOUT_BY_LENGTH), [14, 15])
        data_records_shape(self.record(b"\x02\x01" + bytes(1)))
        self.assertEqual(self.codec._LAYOUT_BY_LENGTH[14].short_fields, ((2, 1),))
