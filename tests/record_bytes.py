"""
hypothesis strategies for 0x04 payloads as raw bytes, for the tests that
hold the byte-level walks (codec.data_records_shape, the OEM JSON written
from frames) to the object decoder.

The fields are built as bytes rather than as field objects, so that every
size a device may send turns up: exactly a layout, shorter (a ShortField),
longer (``ExtraRaw``), empty, unknown ids (RawField) and lengths past 254
(the extended length form).
"""

from __future__ import annotations

import struct

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from oemrelay.codec import FIELD_MIN_SIZE, SIGNED_ANALOGUE, encode_fixed_record

def bounded(examples: int) -> settings:
    """Bounded and repeatable: the same ``examples`` every run, nothing stored on disk."""
    return settings(
        max_examples=examples,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
    )


BOUNDED = bounded(150)

u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)

#: Every id with a layout, and a few without.
KNOWN_FIELD_IDS = [0, 1, 2, 3, 6, 7, 26, 27]


@st.composite
def field_sizes(draw, field_id: int) -> int:
    """A size around the field's layout, or anywhere up to the extended form."""
    minimum = FIELD_MIN_SIZE[field_id]
    return draw(
        st.one_of(
            st.integers(max(0, minimum - 2), minimum + 12),
            st.integers(0, 40),
            st.integers(250, 300),
        )
    )


@st.composite
def analogue_readings(draw, field_id: int) -> bytes:
    """Whole readings, with signed analogue 3 about its 0x8000 boundary."""
    if field_id == 6:
        reading = st.tuples(
            st.sampled_from([SIGNED_ANALOGUE, SIGNED_ANALOGUE, 1, 2, 4, 255]),
            st.one_of(u16, st.integers(0x7FFE, 0x8001), st.sampled_from([0, 0xFFFF])),
        ).map(lambda pair: struct.pack("<BH", *pair))
    else:
        reading = st.tuples(u8, st.integers(-0x80000000, 0x7FFFFFFF)).map(
            lambda pair: struct.pack("<Bi", *pair)
        )
    return b"".join(draw(st.lists(reading, max_size=20)))


@st.composite
def raw_fields(draw) -> bytes:
    """One field as it travels: id, length (short or extended form), bytes."""
    field_id = draw(st.one_of(st.sampled_from(KNOWN_FIELD_IDS), u8))
    if field_id in (6, 7) and draw(st.booleans()):
        data = draw(analogue_readings(field_id)) + draw(st.binary(max_size=6))
    elif field_id == 1 and draw(st.booleans()):
        # Debug text: latin-1 bytes past ASCII, quotes, backslashes, controls.
        text = draw(st.binary(max_size=80)) + draw(st.sampled_from([b"", b'"\\', b"\xe9\xff\x7f\n"]))
        data = draw(st.binary(min_size=2, max_size=2)) + text
    else:
        data = draw(st.binary(min_size=draw(field_sizes(field_id)), max_size=300))
    if len(data) < 255:
        return bytes([field_id, len(data)]) + data
    return struct.pack("<BBH", field_id, 255, len(data)) + data


@st.composite
def raw_records(draw) -> bytes:
    """One record: header (length, seq, time, reason) and up to 6 fields."""
    body = b"".join(draw(st.lists(raw_fields(), max_size=6)))
    return struct.pack("<HIIB", 11 + len(body), draw(u32), draw(u32), draw(u8)) + body


#: A whole 0x04 payload.
data_payloads = st.lists(raw_records(), max_size=5).map(b"".join)


@st.composite
def fixed_payloads(draw) -> bytes:
    """0x10 payloads: G50 records, some with a byte changed (checksum mismatch)."""
    records = []
    for _ in range(draw(st.integers(0, 3))):
        record = bytearray(
            encode_fixed_record(
                draw(u32),
                draw(st.integers(0, 1_609_372_799)),
                draw(st.integers(-0x80000000, 0x7FFFFFFF)),
                draw(st.integers(-0x80000000, 0x7FFFFFFF)),
                draw(u8),
                analogues=draw(st.tuples(u16, u16, u16, u16, u16)),
                temperature=draw(st.sampled_from([127, -40, 0, 25, -128])),
                device_id=draw(st.binary(min_size=8, max_size=8)),
            )
        )
        if draw(st.booleans()):
            position = draw(st.integers(5, 61))
            record[position] ^= draw(st.integers(1, 255))
        records.append(bytes(record))
    return b"".join(records)


def damaged(payload: bytes, position: int, value: int, truncate: bool) -> bytes:
    """``payload`` cut at, or with one byte overwritten at, ``position``."""
    if not payload:
        return bytes([value])
    position %= len(payload)
    if truncate:
        return payload[:position]
    return payload[:position] + bytes([value]) + payload[position + 1 :]


@st.composite
def layout_fields(draw) -> bytes:
    """A field of exactly its layout (what production devices send), any values."""
    field_id = draw(st.sampled_from([0, 2, 6, 7, 26, 27]))
    if field_id in (6, 7):
        data = draw(analogue_readings(field_id))
        if len(data) >= 255:
            data = data[: 250 - 250 % (3 if field_id == 6 else 5)]
    else:
        data = draw(st.binary(min_size=FIELD_MIN_SIZE[field_id], max_size=FIELD_MIN_SIZE[field_id]))
    return bytes([field_id, len(data)]) + data


@st.composite
def layout_records(draw) -> bytes:
    """Records of exact-layout fields, some sharing a length but not a layout."""
    body = b"".join(draw(st.lists(layout_fields(), max_size=5)))
    return struct.pack("<HIIB", 11 + len(body), draw(u32), draw(u32), draw(u8)) + body


#: 0x04 payloads written by the compiled record writers.
layout_payloads = st.lists(layout_records(), max_size=6).map(b"".join)
