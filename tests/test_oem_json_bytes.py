"""
The OEM JSON written straight from the frames (oem_json.oem_document_of_frames)
is byte for byte the document of the decoded records (oem_document, the
reference), for arbitrary records of every field type and every capture.
"""

from __future__ import annotations

import calendar
import json
import struct
from decimal import Decimal
from time import gmtime, strftime

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from oemrelay.codec import (
    EPOCH_2013,
    Frame,
    FrameDecoder,
    Hello,
    MessageType,
    ProtocolError,
    parse_hello,
    parse_records,
)
from oemrelay.oem_json import degrees, device_time, oem_document, oem_document_of_frames
from oemrelay import oem_json
from tests.record_bytes import (
    BOUNDED,
    damaged,
    data_payloads,
    fixed_payloads,
    layout_payloads,
    u8,
    u32,
)
from tests.vectors import captures

HELLO = Hello(129336, "353323081669730", "89610185001824844630", 34, 2, 1, 9)


def _outcome(document, frames):
    try:
        return "ok", document(frames)
    except ProtocolError as error:
        return "error", str(error)


class BytesDocumentTests(SynchronousTestCase):
    """oem_document_of_frames against oem_document(parse_records(...))."""

    def assertSameDocument(self, frames: list[Frame], hello: Hello = HELLO) -> None:
        reference = _outcome(lambda f: oem_document(hello, parse_records(f)), frames)
        from_bytes = _outcome(lambda f: oem_document_of_frames(hello, f), frames)
        self.assertEqual(from_bytes, reference)

    @BOUNDED
    @given(st.lists(data_payloads, min_size=1, max_size=3))
    def test_arbitrary_data_records(self, payloads: list[bytes]) -> None:
        """Every field type, short, long, raw, extended and empty: the same bytes."""
        self.assertSameDocument([Frame(MessageType.DATA_RECORDS, p) for p in payloads])

    @BOUNDED
    @given(data_payloads, st.integers(0, 5000), u8, st.booleans())
    def test_damaged_data_records(self, payload, position, value, truncate) -> None:
        """Cut or changed payloads: the same document, or the same one-line error."""
        self.assertSameDocument(
            [Frame(MessageType.DATA_RECORDS, damaged(payload, position, value, truncate))]
        )

    @BOUNDED
    @given(fixed_payloads(), data_payloads)
    def test_fixed_records_between_data_records(self, fixed: bytes, data: bytes) -> None:
        """G50 fixed records, good and bad checksums, mixed with 0x04 frames."""
        self.assertSameDocument(
            [
                Frame(MessageType.DATA_RECORDS, data),
                Frame(MessageType.FIXED_RECORDS, fixed),
                Frame(MessageType.DATA_RECORDS, data),
            ]
        )

    @BOUNDED
    @given(u32, st.text(max_size=16), st.text(max_size=21), u8, u8, u8, u8)
    def test_any_hello(self, serial, imei, iccid, product, hardware, major, minor) -> None:
        """Identity strings with quotes, controls or non-ASCII are escaped alike."""
        self.assertSameDocument(
            [Frame(MessageType.DATA_RECORDS, b"")],
            Hello(serial, imei, iccid, product, hardware, major, minor),
        )

    @BOUNDED
    @given(st.lists(layout_payloads, min_size=1, max_size=3))
    def test_exact_layout_records(self, payloads: list[bytes]) -> None:
        """Records of exact-layout fields (the compiled writers' path): the same bytes."""
        self.assertSameDocument([Frame(MessageType.DATA_RECORDS, p) for p in payloads])

    @BOUNDED
    @given(st.lists(layout_payloads, min_size=1, max_size=3), st.integers(0, 5000), u8, st.booleans())
    def test_damaged_exact_layout_records(self, payloads, position, value, truncate) -> None:
        """Layouts seen before, then a record of a known length with a changed header: the same result."""
        self.assertSameDocument([Frame(MessageType.DATA_RECORDS, p) for p in payloads])
        joined = b"".join(payloads)
        self.assertSameDocument(
            [Frame(MessageType.DATA_RECORDS, damaged(joined, position, value, truncate))]
        )

    def test_same_length_other_layout(self) -> None:
        """A record as long as a compiled layout but laid out otherwise is not written by it."""
        digital_then_trip = b"\x02\x08" + bytes(8) + b"\x1a\x08" + bytes(range(8))
        trip_then_odometer = b"\x1a\x08" + bytes(range(8)) + b"\x1b\x08" + bytes(8)
        payload = b"".join(
            struct.pack("<HIIB", 11 + len(body), seq, 0, 1) + body
            for seq, body in enumerate([digital_then_trip, trip_then_odometer, digital_then_trip])
        )
        self.assertSameDocument([Frame(MessageType.DATA_RECORDS, payload)])
        records = json.loads(oem_document_of_frames(HELLO, [Frame(MessageType.DATA_RECORDS, payload)]))
        self.assertEqual(
            [[f["FType"] for f in r["Fields"]] for r in records["Records"]],
            [[2, 26], [26, 27], [2, 26]],
        )

    def test_compiled_writer_used_for_exact_layouts(self) -> None:
        """GPS, digital and analogue fields of their exact sizes get a compiled writer."""
        self.patch(oem_json, "_RECORD_WRITERS", {})
        self.patch(oem_json, "_WRITER_BY_LENGTH", {})
        (frame,) = FrameDecoder().feed(captures()["data-0x04-12-records-2017-auckland"])
        oem_document_of_frames(HELLO, [frame])
        layout = (0 << 16 | 21, 2 << 16 | 8, 6 << 16 | 9, 7 << 16 | 25)
        self.assertIsNotNone(oem_json._RECORD_WRITERS.get(layout))

    def test_writers_bounded(self) -> None:
        """With the layout table full, new layouts are written field by field and not stored."""
        self.patch(oem_json, "_RECORD_WRITERS", {})
        self.patch(oem_json, "_WRITER_BY_LENGTH", {})
        self.patch(oem_json, "_MAX_RECORD_WRITERS", 2)
        bodies = [b"\x02\x08" + bytes(8) * 1, b"\x1a\x08" + bytes(8), b"\x1b\x08" + bytes(8)]
        frames = [
            Frame(MessageType.DATA_RECORDS, struct.pack("<HIIB", 11 + len(b), 1, 0, 1) + b)
            for b in bodies
        ]
        for frame in frames:
            self.assertSameDocument([frame])
        self.assertEqual(len(oem_json._RECORD_WRITERS), 2)
        self.assertNotIn((27 << 16 | 8,), oem_json._RECORD_WRITERS)

    def test_every_capture(self) -> None:
        """Every real capture, alone and all together, with each real hello."""
        hellos = [
            parse_hello(wire[5:])
            for wire in captures().values()
            if wire[2] == MessageType.HELLO
        ]
        data = [
            frame
            for wire in captures().values()
            for frame in FrameDecoder().feed(wire)
            if frame.type in (MessageType.DATA_RECORDS, MessageType.FIXED_RECORDS)
        ]
        self.assertEqual(len(data), 5)
        for hello in hellos:
            for frame in data:
                self.assertSameDocument([frame], hello)
            self.assertSameDocument(data, hello)

    def test_other_message_type_refused(self) -> None:
        """A frame that holds no records is an error, as for the decoder."""
        self.assertSameDocument([Frame(MessageType.TIME_REQUEST, b"")])

    def test_output_is_json(self) -> None:
        """The document parses, records in order."""
        (frame,) = FrameDecoder().feed(captures()["data-0x04-12-records-2017-auckland"])
        document = json.loads(oem_document_of_frames(HELLO, [frame]))
        self.assertEqual([r["SeqNo"] for r in document["Records"]], list(range(518, 530)))


class NumberFormattingTests(SynchronousTestCase):
    """The two converters the JSON calls per record, against plain oracles."""

    @BOUNDED
    @given(st.one_of(u32, st.sampled_from([0, 59, 60, 3599, 3600, 86399, 86400, 0xFFFFFFFF])))
    def test_device_time(self, seconds: int) -> None:
        """The same text as strftime of gmtime, with and without a day memo."""
        expected = strftime("%Y-%m-%d %H:%M:%S", gmtime(EPOCH_2013 + seconds))
        self.assertEqual(device_time(seconds), expected)
        days: dict[int, str] = {}
        self.assertEqual(device_time(seconds, days), expected)
        self.assertEqual(device_time(seconds, days), expected)
        self.assertEqual(list(days), [seconds // 86400])

    def test_device_time_epoch(self) -> None:
        """Device time 0 is 2013-01-01 00:00:00 UTC."""
        self.assertEqual(calendar.timegm((2013, 1, 1, 0, 0, 0)), EPOCH_2013)
        self.assertEqual(device_time(0), "2013-01-01 00:00:00")

    @BOUNDED
    @given(
        st.one_of(
            st.integers(-0x80000000, 0x7FFFFFFF),
            st.sampled_from([0, 1, -1, 9_999_999, -9_999_999, 10_000_000, -10_000_000]),
        )
    )
    def test_degrees(self, raw: int) -> None:
        """raw × 1e-7 exactly, at most seven decimals, no trailing zeros but one."""
        text = degrees(raw)
        self.assertEqual(Decimal(text), Decimal(raw).scaleb(-7))
        whole, decimals = text.split(".")
        self.assertTrue(decimals == "0" or not decimals.endswith("0"), text)
        self.assertLessEqual(len(decimals), 7)
        self.assertEqual(whole.lstrip("-") == "0" or not whole.lstrip("-").startswith("0"), True)
