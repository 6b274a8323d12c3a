"""
Digital Matter device protocol: frames, messages and records, with no I/O.

Everything here is a pure function or a small value type, so the codec can be
tested and fuzzed without a reactor.  The byte layouts follow
``docs/protocol.rst`` ("Framing", "Data records (0x04)", "Field types",
"Fixed 64-byte records (0x10)"); all integers are little-endian.

A frame is ``02 55 <type> <uint16 length> <payload>``.  Because the header is
fully determined by type and payload, ``encode_frame(frame.type,
frame.payload)`` reproduces the device's bytes exactly; the raw TCP connector
relies on that.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable
from time import gmtime
from dataclasses import dataclass, field
from dataclasses import fields as dataclass_fields
from datetime import datetime, timezone
from enum import IntEnum
from typing import ClassVar, NamedTuple

SYNC = b"\x02\x55"
HEADER_SIZE = 5
MAX_PAYLOAD = 0xFFFF
#: The largest uint32 (serials, sequence numbers, device times, message ids).
UINT32_MAX = 0xFFFFFFFF

#: Unix time of 2013-01-01 00:00:00 UTC, the epoch of every device time.
EPOCH_2013 = 1356998400


class MessageType(IntEnum):
    """Message types, named from the side that sends them."""

    HELLO = 0x00
    HELLO_RESPONSE = 0x01
    DATA_RECORDS = 0x04
    COMMIT_REQUEST = 0x05
    COMMIT_RESPONSE = 0x06
    FIXED_RECORDS = 0x10
    VERSION_DATA = 0x14
    VERSION_RESPONSE = 0x15
    ASYNC_MESSAGE = 0x20
    ASYNC_RESPONSE = 0x21
    ASYNC_SESSION_REQUEST = 0x22
    ASYNC_SESSION_COMPLETE = 0x23
    SOCKET_CLOSE = 0x26
    TIME_REQUEST = 0x30
    TIME_RESPONSE = 0x31


class ProtocolError(Exception):
    """
    The device sent bytes that break the protocol; the connection must end.

    The message is a short reason fit for a single log line.
    """


class FramingError(ProtocolError):
    """
    The byte stream stopped being frames.  ``frames`` holds the complete
    frames that came before the bad bytes in the same data, so that what the
    device said first (its hello, say) is still heard.
    """

    def __init__(self, reason: str, frames: list[Frame]) -> None:
        super().__init__(reason)
        self.frames = frames


class Frame(NamedTuple):
    """
    One protocol message: its type byte and payload.

    A NamedTuple rather than a frozen dataclass: as immutable, and made in
    half the time (a frozen dataclass sets each field through
    ``object.__setattr__``; three frames are made per raw TCP upload).
    """

    type: int
    payload: bytes

    def to_bytes(self) -> bytes:
        """The frame exactly as it travels on the wire."""
        return encode_frame(self.type, self.payload)


def encode_frame(message_type: int, payload: bytes = b"") -> bytes:
    """Wrap ``payload`` in a frame header."""
    return SYNC + struct.pack("<BH", message_type, len(payload)) + payload


class FrameDecoder:
    """
    Turn a byte stream into frames, whatever the TCP segmentation.

    One buffer is walked by offset; a declared length above ``max_payload``
    is refused before any of its payload is buffered.
    """

    # Two per raw TCP device connection held: slotted.
    __slots__ = ("_unprocessed", "max_payload")

    def __init__(self, max_payload: int = MAX_PAYLOAD) -> None:
        self.max_payload = max_payload
        self._unprocessed = b""

    @property
    def buffered(self) -> int:
        """Bytes received but not yet part of a complete frame."""
        return len(self._unprocessed)

    def feed(self, data: bytes) -> list[Frame]:
        """
        Add ``data`` and return every frame it completes.

        :raises FramingError: on bad sync bytes or an oversized length.
        """
        buffer = self._unprocessed + data if self._unprocessed else data
        frames = []
        offset = 0
        end = len(buffer)
        while end - offset >= HEADER_SIZE:
            if not buffer.startswith(SYNC, offset):
                raise FramingError(
                    f"bad sync bytes {bytes(buffer[offset:offset + 2]).hex()}", frames
                )
            message_type = buffer[offset + 2]
            length = buffer[offset + 3] | buffer[offset + 4] << 8
            if length > self.max_payload:
                raise FramingError(
                    f"declared length {length} of message type 0x{message_type:02x}"
                    f" exceeds max_message {self.max_payload}",
                    frames,
                )
            start = offset + HEADER_SIZE
            if end - start < length:
                break
            frames.append(Frame(message_type, bytes(buffer[start : start + length])))
            offset = start + length
        if offset == end:  # the common case: the data ended with a frame
            self._unprocessed = b""
            return frames
        partial_sync = bytes(buffer[offset : offset + 2])
        if partial_sync and not SYNC.startswith(partial_sync):
            # Fail at the first wrong byte rather than once five have arrived.
            raise FramingError(f"bad sync bytes {partial_sync.hex()}", frames)
        self._unprocessed = buffer[offset:]
        return frames


# -- time -------------------------------------------------------------------


def seconds_since_2013(unix_time: float) -> int:
    """Device time (uint32 seconds since 2013-01-01 UTC) for a Unix time."""
    return max(0, int(unix_time) - EPOCH_2013) & UINT32_MAX


# -- hello ------------------------------------------------------------------

_HELLO_IDENTITY = struct.Struct("<I16s21s")
_HELLO_VERSION = struct.Struct("<BBBBI")
HELLO_STANDARD_SIZE = 49
HELLO_G50_SIZE = 51


def _ascii_field(raw: bytes) -> str:
    return raw.split(b"\x00", 1)[0].decode("ascii", "replace")


@dataclass(frozen=True, slots=True)
class Hello:
    """
    Who the device is, from its hello message (0x00).

    ``g50`` marks the 51-byte form, which is answered with five zero bytes
    instead of the time.  Its version bytes have an unknown layout and are
    read like the 49-byte form's.
    """

    serial: int
    imei: str
    iccid: str
    product_id: int = 0
    hardware_rev: int = 0
    firmware_major: int = 0
    firmware_minor: int = 0
    flags: int = 0
    g50: bool = False
    #: The payload as received, forwarded byte for byte by the TCP connector.
    payload: bytes = field(default=b"", repr=False, compare=False)

    @property
    def firmware(self) -> str:
        """The OEM ``FW`` string: ``Prod.Hw.Major.Minor``."""
        return (
            f"{self.product_id}.{self.hardware_rev}."
            f"{self.firmware_major}.{self.firmware_minor}"
        )

    def to_payload(self) -> bytes:
        """The 49- or 51-byte hello payload (for simulators and tests)."""
        payload = _HELLO_IDENTITY.pack(
            self.serial, self.imei.encode("ascii"), self.iccid.encode("ascii")
        ) + _HELLO_VERSION.pack(
            self.product_id,
            self.hardware_rev,
            self.firmware_major,
            self.firmware_minor,
            self.flags,
        )
        return payload + b"\x00\x00" if self.g50 else payload

    def to_frame(self) -> bytes:
        """The hello frame: as the device sent it, or encoded from the fields."""
        return encode_frame(MessageType.HELLO, self.payload or self.to_payload())


def parse_hello(payload: bytes) -> Hello:
    """
    Decode a hello payload.

    The 49- and 51-byte forms are known.  Other lengths of at least 41 bytes
    are accepted the way traccar accepts them, reading what is present.

    :raises ProtocolError: if the identity part is incomplete.
    """
    if len(payload) < _HELLO_IDENTITY.size:
        raise ProtocolError(f"hello of {len(payload)} bytes is too short")
    serial, imei, iccid = _HELLO_IDENTITY.unpack_from(payload)
    version = (0, 0, 0, 0, 0)
    if len(payload) >= _HELLO_IDENTITY.size + _HELLO_VERSION.size:
        version = _HELLO_VERSION.unpack_from(payload, _HELLO_IDENTITY.size)
    return Hello(
        serial,
        _ascii_field(imei),
        _ascii_field(iccid),
        *version,
        g50=len(payload) == HELLO_G50_SIZE,
        payload=bytes(payload),
    )


def hello_response(hello: Hello, unix_time: float) -> bytes:
    """The 0x01 reply: the time since 2013 and flags 0, or G50's five zeros."""
    if hello.g50:
        return encode_frame(MessageType.HELLO_RESPONSE, bytes(5))
    return encode_frame(
        MessageType.HELLO_RESPONSE,
        struct.pack("<II", seconds_since_2013(unix_time), 0),
    )


# -- fixed replies -----------------------------------------------------------

COMMIT_SUCCESS = encode_frame(MessageType.COMMIT_RESPONSE, b"\x01")
COMMIT_REQUEST = encode_frame(MessageType.COMMIT_REQUEST)
VERSION_RESPONSE = encode_frame(MessageType.VERSION_RESPONSE, bytes(12))
ASYNC_SESSION_COMPLETE = encode_frame(MessageType.ASYNC_SESSION_COMPLETE)


def time_response(unix_time: float) -> bytes:
    """The 0x31 reply to a time request: seconds since 2013."""
    return encode_frame(
        MessageType.TIME_RESPONSE, struct.pack("<I", seconds_since_2013(unix_time))
    )


# -- record fields -----------------------------------------------------------
#
# Each field type knows its binary form.  A field longer than its layout is
# decoded from its first bytes, as traccar's binary decoder does, and keeps the
# rest in ``extra`` (newer firmware appends bytes); a known field id shorter
# than its layout becomes a ShortField, an unknown id a RawField.  No byte is
# ever lost: ``to_bytes`` gives back exactly what the device sent.


class _PackedField:
    """A field of one fixed struct layout, its values in declaration order."""

    __slots__ = ()
    _LAYOUT: ClassVar[struct.Struct]

    @classmethod
    def from_bytes(cls, data: bytes):
        """The field, or None if ``data`` is shorter than the layout."""
        size = cls.MIN_SIZE
        if len(data) == size:
            return cls._build(*cls._LAYOUT.unpack(data), b"")
        if len(data) > size:
            return cls._build(*cls._LAYOUT.unpack_from(data), data[size:])
        return None

    def to_bytes(self) -> bytes:
        values = (getattr(self, f.name) for f in dataclass_fields(self) if f.name != "extra")
        return self._LAYOUT.pack(*values) + self.extra


@dataclass(frozen=True, slots=True)
class GpsFix(_PackedField):
    """Field 0: the GPS fix, every value raw as the device sent it."""

    FIELD_ID: ClassVar[int] = 0
    _LAYOUT: ClassVar[struct.Struct] = struct.Struct("<IiihHBBBBB")
    MIN_SIZE: ClassVar[int] = _LAYOUT.size

    fix_time: int
    latitude: int
    longitude: int
    altitude: int
    speed: int
    speed_accuracy: int
    heading: int
    pdop: int
    position_accuracy: int
    status: int
    #: Bytes after the 21-byte layout (newer firmware), kept as sent.
    extra: bytes = b""


@dataclass(frozen=True, slots=True)
class DebugText:
    """Field 1: a numbered trace line, seen in records with reason 21."""

    FIELD_ID: ClassVar[int] = 1
    MIN_SIZE: ClassVar[int] = 2

    code: int
    text: bytes

    @classmethod
    def from_bytes(cls, data: bytes) -> DebugText | None:
        if len(data) < cls.MIN_SIZE:
            return None
        return cls._build(data[0] | data[1] << 8, data[2:])

    def to_bytes(self) -> bytes:
        return struct.pack("<H", self.code) + self.text


@dataclass(frozen=True, slots=True)
class Digital(_PackedField):
    """Field 2: digital inputs, outputs and device status flags."""

    FIELD_ID: ClassVar[int] = 2
    _LAYOUT: ClassVar[struct.Struct] = struct.Struct("<IHH")
    MIN_SIZE: ClassVar[int] = _LAYOUT.size

    inputs: int
    outputs: int
    status: int
    extra: bytes = b""


@dataclass(frozen=True, slots=True)
class DriverId:
    """Field 3: an id type byte and the id's bytes."""

    FIELD_ID: ClassVar[int] = 3
    MIN_SIZE: ClassVar[int] = 1

    id_type: int
    data: bytes

    @classmethod
    def from_bytes(cls, data: bytes) -> DriverId | None:
        if len(data) < cls.MIN_SIZE:
            return None
        return cls._build(data[0], data[1:])

    def to_bytes(self) -> bytes:
        return bytes([self.id_type]) + self.data


#: The one 16-bit analogue DM documents as signed: internal temperature in
#: 0.01 °C.  The others (voltages in mV or 10 mV, signal strength) are
#: unsigned, as traccar's binary decoder reads them.
SIGNED_ANALOGUE = 3


@dataclass(frozen=True, slots=True)
class Analogues:
    """
    Fields 6 and 7: numbered analogue readings, 16- or 32-bit.

    16-bit values are unsigned except analogue 3 (SIGNED_ANALOGUE); 32-bit
    values are signed (no public source says otherwise).  ``values`` keeps
    the device's order, which OEM keeps in its JSON; ``extra`` holds a
    trailing part-item, kept as sent.
    """

    field_id: int
    values: tuple[tuple[int, int], ...]
    extra: bytes = b""

    _ITEMS: ClassVar[dict[int, struct.Struct]] = {
        6: struct.Struct("<BH"),
        7: struct.Struct("<Bi"),
    }

    @property
    def FIELD_ID(self) -> int:  # noqa: N802 - same name as the other fields
        return self.field_id

    @classmethod
    def from_bytes_for(cls, field_id: int, data: bytes) -> Analogues | None:
        item = cls._ITEMS[field_id]
        whole = len(data) - len(data) % item.size
        if not whole and data:
            return None
        values = tuple(item.iter_unpack(data[:whole] if whole < len(data) else data))
        if field_id == 6:
            for number, value in values:
                if value >= 0x8000 and number == SIGNED_ANALOGUE:
                    # Rare, so the common case keeps unpack's own tuples.
                    values = tuple(
                        (n, v - 0x10000 if n == SIGNED_ANALOGUE and v >= 0x8000 else v)
                        for n, v in values
                    )
                    break
        return cls._build(field_id, values, bytes(data[whole:]))

    def to_bytes(self) -> bytes:
        item = self._ITEMS[self.field_id]
        mask = 0xFFFF if self.field_id == 6 else -1
        return (
            b"".join(item.pack(number, value & mask) for number, value in self.values)
            + self.extra
        )


@dataclass(frozen=True, slots=True)
class TripSummary(_PackedField):
    """Field 26: trip distance and duration in seconds (traccar's reading)."""

    FIELD_ID: ClassVar[int] = 26
    _LAYOUT: ClassVar[struct.Struct] = struct.Struct("<II")
    MIN_SIZE: ClassVar[int] = _LAYOUT.size

    distance: int
    duration: int
    extra: bytes = b""


@dataclass(frozen=True, slots=True)
class OdometerRunHours(_PackedField):
    """Field 27: odometer and run hours in seconds (traccar's reading)."""

    FIELD_ID: ClassVar[int] = 27
    _LAYOUT: ClassVar[struct.Struct] = struct.Struct("<II")
    MIN_SIZE: ClassVar[int] = _LAYOUT.size

    odometer: int
    run_hours: int
    extra: bytes = b""


@dataclass(frozen=True, slots=True)
class RawField:
    """A field whose layout is unknown: its id and raw bytes."""

    field_id: int
    data: bytes

    @property
    def FIELD_ID(self) -> int:  # noqa: N802 - same name as the other fields
        return self.field_id

    def to_bytes(self) -> bytes:
        return self.data


@dataclass(frozen=True, slots=True)
class ShortField(RawField):
    """
    A known field id whose bytes are fewer than its layout needs.

    Never emitted under its own ``FType`` (a consumer would miss the keys);
    the session logs it once per device.
    """


@dataclass(frozen=True, slots=True)
class FixedRecordExtras:
    """
    Every value of a G50 fixed 64-byte record, in the G50's own units.

    Not an OEM field: emitted with oemrelay's own ``FType`` (see oem_json).
    Only the analogues whose DM meaning and unit are established also go
    into a standard analogue field (see parse_fixed_records).
    """

    latitude: int
    longitude: int
    altitude: int
    speed: int
    heading: int
    position_accuracy: int
    speed_accuracy: int
    gps_status: int
    inputs: int
    outputs: int
    analogues: tuple[int, int, int, int, int]
    temperature: int
    acceleration: tuple[int, int, int]
    device_id: bytes
    pdop_hundredths: int
    checksum_ok: bool


Field = (
    GpsFix
    | DebugText
    | Digital
    | DriverId
    | Analogues
    | TripSummary
    | OdometerRunHours
    | RawField
    | ShortField
    | FixedRecordExtras
)

def _builder(cls: type) -> Callable[..., object]:
    """
    A constructor for the frozen slotted dataclass ``cls`` taking every field
    positionally.  It fills the slots directly: a frozen dataclass __init__
    goes through object.__setattr__ per field, and decoding builds many.
    The object is the same (equal, hashable, frozen) as ``cls(...)`` makes.
    """
    names = [f.name for f in dataclass_fields(cls)]
    namespace: dict[str, object] = {"new": object.__new__, "cls": cls}
    for i, name in enumerate(names):
        namespace[f"set{i}"] = getattr(cls, name).__set__
    arguments = ", ".join(f"a{i}" for i in range(len(names)))
    source = (
        f"def build({arguments}):\n    self = new(cls)\n"
        + "".join(f"    set{i}(self, a{i})\n" for i in range(len(names)))
        + "    return self\n"
    )
    exec(source, namespace)  # noqa: S102 - source made above from field names
    return namespace["build"]


for _cls in (GpsFix, DebugText, Digital, DriverId, Analogues, TripSummary, OdometerRunHours):
    _cls._build = staticmethod(_builder(_cls))
_build_raw = _builder(RawField)
_build_short = _builder(ShortField)
_build_extras = _builder(FixedRecordExtras)

_FIELD_TYPES = {
    cls.FIELD_ID: cls
    for cls in (GpsFix, DebugText, Digital, DriverId, TripSummary, OdometerRunHours)
}


def decode_field(field_id: int, data: bytes) -> Field:
    """
    The typed field for ``field_id``: a ShortField if a known id's bytes are
    too few for its layout, a RawField if the id is unknown.
    """
    if field_id in Analogues._ITEMS:
        decoded = Analogues.from_bytes_for(field_id, data)
    elif field_id in _FIELD_TYPES:
        decoded = _FIELD_TYPES[field_id].from_bytes(data)
    else:
        return _build_raw(field_id, data)
    return decoded if decoded is not None else _build_short(field_id, data)


@dataclass(frozen=True, slots=True)
class Record:
    """
    One logged record: sequence number, time (seconds since 2013), log
    reason and its fields in the device's order.
    """

    seq: int
    time: int
    reason: int
    fields: tuple[Field, ...] = ()

    @property
    def short_fields(self) -> tuple[ShortField, ...]:
        """The fields too short for their layout, for the session to log."""
        return tuple(f for f in self.fields if type(f) is ShortField)


_RECORD_HEADER = struct.Struct("<HIIB")
_build_record = _builder(Record)


def parse_data_records(payload: bytes) -> list[Record]:
    """
    Decode the records of a 0x04 message.

    :raises ProtocolError: if a record or field runs past its container.
    """
    records = []
    offset = 0
    end = len(payload)
    while offset < end:
        if end - offset < _RECORD_HEADER.size:
            raise ProtocolError(f"truncated record header at offset {offset}")
        length, seq, time, reason = _RECORD_HEADER.unpack_from(payload, offset)
        if length < _RECORD_HEADER.size or offset + length > end:
            raise ProtocolError(
                f"record at offset {offset} declares length {length},"
                f" {end - offset} bytes left"
            )
        records.append(
            _build_record(
                seq,
                time,
                reason,
                _parse_fields(payload, offset + _RECORD_HEADER.size, offset + length, seq),
            )
        )
        offset += length
    return records


#: The most fields one record may hold.  DM defines a few dozen field ids
#: and a record carries each at most once or twice; 2-byte empty fields in
#: their thousands are an amplification attack, refused while decoding.
MAX_FIELDS_PER_RECORD = 64

#: :func:`decoded_cost`'s estimate, in bytes: per record, per field, and per
#: wire byte (the frame kept for byte-for-byte forwarding, the values).  Set
#: above what tracemalloc measured: a typical 4-field, 70-byte record takes
#: about 1,100 bytes decoded, an empty field 56, an empty record 99.
_RECORD_COST = 128
_FIELD_COST = 64
_WIRE_BYTE_COST = 16


def decoded_cost(records: list[Record], wire_size: int) -> int:
    """
    An upper estimate of the memory ``records``, decoded from ``wire_size``
    payload bytes, take, so that limits count what an upload costs rather
    than its wire size.
    """
    fields = sum(len(record.fields) for record in records)
    return upload_cost(len(records), fields, wire_size)


def upload_cost(record_count: int, field_count: int, wire_size: int) -> int:
    """decoded_cost from the counts alone (see :class:`FrameShape`)."""
    return (
        _RECORD_COST * record_count + _FIELD_COST * field_count + _WIRE_BYTE_COST * wire_size
    )


def field_header(payload: bytes, at: int, end: int, seq: int, count: int) -> tuple[int, int, int]:
    """
    The header of the field at ``at`` in record ``seq``, which ends at
    ``end`` and holds ``count`` fields before it: the field id, its size
    and where its bytes begin.  Every walk of a record's fields (decoding,
    the OEM JSON from bytes) reads headers here, so they refuse alike.

    :raises ProtocolError: past :data:`MAX_FIELDS_PER_RECORD` fields, or a
        header or field running past the record.
    """
    if count == MAX_FIELDS_PER_RECORD:
        raise ProtocolError(f"record {seq} holds more than {MAX_FIELDS_PER_RECORD} fields")
    if end - at < 2:
        raise ProtocolError(f"truncated field header in record {seq}")
    field_id = payload[at]
    size = payload[at + 1]
    at += 2
    if size == 255:
        if end - at < 2:
            raise ProtocolError(f"truncated extended field length in record {seq}")
        size = payload[at] | payload[at + 1] << 8
        at += 2
    if at + size > end:
        raise ProtocolError(
            f"field {field_id} in record {seq} declares {size} bytes, {end - at} left"
        )
    return field_id, size, at


def _parse_fields(payload: bytes, offset: int, end: int, seq: int) -> tuple[Field, ...]:
    fields = []
    while offset < end:
        field_id, length, offset = field_header(payload, offset, end, seq, len(fields))
        fields.append(decode_field(field_id, payload[offset : offset + length]))
        offset += length
    return tuple(fields)


#: Per field id, the fewest bytes its layout needs: a known field with fewer
#: becomes a ShortField (0 for ids of any length).  Taken from the field
#: classes, whose decoders use the same sizes, so the walk below and
#: decode_field cannot disagree.
FIELD_MIN_SIZE: tuple[int, ...] = tuple(
    Analogues._ITEMS[field_id].size if field_id in Analogues._ITEMS
    else _FIELD_TYPES[field_id].MIN_SIZE if field_id in _FIELD_TYPES
    else 0
    for field_id in range(256)
)
#: Field ids that decode from no bytes at all (no analogue readings).
EMPTY_FIELD_IDS = frozenset(Analogues._ITEMS)


def is_short_field(field_id: int, size: int) -> bool:
    """Whether ``size`` bytes of field ``field_id`` decode to a ShortField."""
    return size < FIELD_MIN_SIZE[field_id] and (size > 0 or field_id not in EMPTY_FIELD_IDS)


class FrameShape(NamedTuple):
    """
    What the session needs of a 0x04 or 0x10 payload, found without decoding
    a field: how many records and fields it holds (for the limits and
    :func:`upload_cost`), the first record's sequence number, the
    ``(field id, size)`` of each field shorter than its layout, and the index
    of each fixed record whose checksum does not match.
    """

    record_count: int
    field_count: int
    first_seq: int | None
    short_fields: tuple[tuple[int, int], ...] = ()
    bad_checksums: tuple[int, ...] = ()


def _seq_at(payload: bytes, offset: int) -> int:
    return int.from_bytes(payload[offset + 2 : offset + 6], "little")


class _KnownLayout(NamedTuple):
    """A record layout walked before: where its field headers are, and what it holds."""

    headers: struct.Struct
    expected: tuple[int, ...]
    field_count: int
    short_fields: tuple[tuple[int, int], ...]


#: The layout last walked for each record length, tried first: a record of
#: that length whose field headers (id and length bytes, short form) all
#: match has that layout, so its fields need no walk.  Keyed on layout,
#: never values; bounded in count, and in fields per layout (a layout's
#: Struct costs about 50 bytes a field: a hostile device's 64 KB records of
#: one-byte fields must not each keep a megabyte).
_LAYOUT_BY_LENGTH: dict[int, _KnownLayout] = {}
_MAX_KNOWN_LAYOUTS = 512
_MAX_LAYOUT_FIELDS = 255


def _remember_layout(length: int, headers: list[int], short: tuple[tuple[int, int], ...]) -> None:
    if len(headers) > _MAX_LAYOUT_FIELDS:
        return
    if length not in _LAYOUT_BY_LENGTH and len(_LAYOUT_BY_LENGTH) >= _MAX_KNOWN_LAYOUTS:
        return
    layout = ["<"]
    at = _RECORD_HEADER.size
    for header in headers:
        layout.append(f"{at}xH")
        at = header >> 8
    _LAYOUT_BY_LENGTH[length] = _KnownLayout(
        struct.Struct("".join(layout)), tuple(headers), len(headers), short
    )


class _KnownFrame(NamedTuple):
    """A whole 0x04 payload's layout walked before: every record length and field header."""

    headers: struct.Struct
    expected: tuple[int, ...]
    shape: FrameShape


#: The payload layout first walked for each payload length, tried before
#: the records': a device logs records of one layout, and uploads as many at
#: a time, so most payloads match one in a single unpack.  Keyed on layout,
#: never values (the first seq is read afresh).  The first layout of a
#: length is kept (another of that length is walked, not rebuilt each time
#: two alternate), and the headers kept altogether are bounded as well as
#: the lengths, so a hostile device's largest payloads cannot fill memory.
_FRAME_BY_LENGTH: dict[int, _KnownFrame] = {}
_MAX_KNOWN_FRAMES = 512
_MAX_KNOWN_FRAME_HEADERS = 65536


def _remember_frame(length: int, records: list[tuple[int, tuple[int, ...]]], shape: FrameShape) -> None:
    kept = sum(len(known.expected) for known in _FRAME_BY_LENGTH.values())
    if kept + len(records) + sum(len(headers) for _, headers in records) > _MAX_KNOWN_FRAME_HEADERS:
        return
    layout = ["<"]
    expected: list[int] = []
    for record_length, headers in records:
        # The record's length, the rest of its header, then each field's
        # header and the bytes it declares.
        layout.append(f"H{_RECORD_HEADER.size - 2}x")
        layout.extend(f"H{header >> 8}x" for header in headers)
        expected.append(record_length)
        expected.extend(headers)
    _FRAME_BY_LENGTH[length] = _KnownFrame(struct.Struct("".join(layout)), tuple(expected), shape)


def data_records_shape(payload: bytes) -> FrameShape:
    """
    The shape of a 0x04 payload, validated exactly as parse_data_records
    validates it (the same ProtocolError, with the same message).
    """
    end = len(payload)
    frame = _FRAME_BY_LENGTH.get(end)
    if frame is not None and frame.headers.unpack_from(payload) == frame.expected:
        known = frame.shape  # a 0x04 payload's shape has no bad_checksums
        # Made afresh with its own first seq, not _replace()d: that is a
        # Python-level call per upload.
        return FrameShape(
            known.record_count, known.field_count, _seq_at(payload, 0), known.short_fields
        )
    records = fields = 0
    short: list[tuple[int, int]] = []
    # Each record's length and field headers, while all are in the short
    # form (None: not to be remembered: the length is known already, or
    # there is no room for another).
    layouts: list[tuple[int, tuple[int, ...]]] | None = (
        [] if frame is None and len(_FRAME_BY_LENGTH) < _MAX_KNOWN_FRAMES else None
    )
    offset = 0
    known_layouts = _LAYOUT_BY_LENGTH
    while offset < end:
        if end - offset < _RECORD_HEADER.size:
            raise ProtocolError(f"truncated record header at offset {offset}")
        length = payload[offset] | payload[offset + 1] << 8
        record_end = offset + length
        if length < _RECORD_HEADER.size or record_end > end:
            raise ProtocolError(
                f"record at offset {offset} declares length {length},"
                f" {end - offset} bytes left"
            )
        known = known_layouts.get(length)
        if known is not None and known.headers.unpack_from(payload, offset) == known.expected:
            records += 1
            fields += known.field_count
            if known.short_fields:
                short.extend(known.short_fields)
            if layouts is not None:
                layouts.append((length, known.expected))
            offset = record_end
            continue
        at = offset + _RECORD_HEADER.size
        seq = _seq_at(payload, offset)
        count = 0
        # Each field's id | length byte << 8, while only the short form is seen.
        headers: list[int] | None = []
        record_short = len(short)
        while at < record_end:
            field_id, size, data_at = field_header(payload, at, record_end, seq, count)
            if data_at - at == 4:
                headers = None  # an extended length
            elif headers is not None:
                headers.append(field_id | size << 8)
            if is_short_field(field_id, size):
                short.append((field_id, size))
            at = data_at + size
            count += 1
        if headers is not None:
            _remember_layout(length, headers, tuple(short[record_short:]))
            if layouts is not None:
                layouts.append((length, tuple(headers)))
        else:
            layouts = None
        records += 1
        fields += count
        offset = record_end
    shape = FrameShape(records, fields, _seq_at(payload, 0) if records else None, tuple(short))
    if layouts:
        _remember_frame(end, layouts, shape)
    return shape


def fixed_records_shape(payload: bytes) -> FrameShape:
    """
    The shape of a 0x10 payload, validated as parse_fixed_records validates
    it; every fixed record decodes to two fields.
    """
    if len(payload) % FIXED_RECORD_SIZE:
        raise ProtocolError(
            f"fixed-record payload of {len(payload)} bytes is not a multiple of 64"
        )
    records = len(payload) // FIXED_RECORD_SIZE
    bad = tuple(
        int.from_bytes(payload[offset + 1 : offset + 5], "little")
        for offset in range(0, len(payload), FIXED_RECORD_SIZE)
        if fletcher8(payload[offset : offset + 62]) != payload[offset + 62 : offset + 64]
    )
    first_seq = int.from_bytes(payload[1:5], "little") if records else None
    return FrameShape(records, 2 * records, first_seq, (), bad)


def frame_shape(frame: Frame) -> FrameShape:
    """
    The shape of a data frame (0x04 or 0x10).

    :raises ProtocolError: if its records do not decode, or it holds none.
    """
    if frame.type == MessageType.DATA_RECORDS:
        return data_records_shape(frame.payload)
    if frame.type == MessageType.FIXED_RECORDS:
        return fixed_records_shape(frame.payload)
    raise ProtocolError(f"message type 0x{frame.type:02x} holds no records")


def parse_records(frames: Iterable[Frame]) -> list[Record]:
    """
    The records of data frames (0x04 and 0x10), decoded in order.

    :raises ProtocolError: if a frame's records do not decode, or a frame is
        of another type.
    """
    records: list[Record] = []
    for frame in frames:
        if frame.type == MessageType.DATA_RECORDS:
            records.extend(parse_data_records(frame.payload))
        elif frame.type == MessageType.FIXED_RECORDS:
            records.extend(parse_fixed_records(frame.payload))
        else:
            raise ProtocolError(f"message type 0x{frame.type:02x} holds no records")
    return records


def encode_data_records(records: list[Record] | tuple[Record, ...]) -> bytes:
    """The 0x04 payload for ``records`` (the inverse of parse_data_records)."""
    out = []
    for record in records:
        body = b"".join(_encode_field(field) for field in record.fields)
        out.append(
            _RECORD_HEADER.pack(
                _RECORD_HEADER.size + len(body), record.seq, record.time, record.reason
            )
        )
        out.append(body)
    return b"".join(out)


def _encode_field(field: Field) -> bytes:
    data = field.to_bytes()
    if len(data) < 255:
        return bytes([field.FIELD_ID, len(data)]) + data
    return struct.pack("<BBH", field.FIELD_ID, 255, len(data)) + data


# -- fixed 64-byte records (0x10, G50) ----------------------------------------

FIXED_RECORD_SIZE = 64
_FIXED_RECORD = struct.Struct("<BIIiiHBhHBBBIH5Hb3h8sH2x")


def fletcher8(data: bytes) -> bytes:
    """The two-byte 8-bit Fletcher checksum (A, B) that closes a fixed record."""
    a = b = 0
    for byte in data:
        a = (a + byte) & 0xFF
        b = (b + a) & 0xFF
    return bytes((a, b))


def _unpack_fixed_time(packed: int) -> int:
    """Seconds since 2013 from the G50 bit-packed UTC time (0 if invalid)."""
    year = 2000 + (packed & 0x3F)
    month = packed >> 6 & 0x0F
    day = packed >> 10 & 0x1F
    hour = packed >> 15 & 0x1F
    minute = packed >> 20 & 0x3F
    second = packed >> 26 & 0x3F
    try:
        moment = datetime(year, month, day, hour, minute, second, tzinfo=timezone.utc)
    except ValueError:  # 31 February and the like: only a corrupted record
        return 0
    return seconds_since_2013(moment.timestamp())


def _pack_fixed_time(seconds: int) -> int:
    t = gmtime(EPOCH_2013 + seconds)
    return (
        (t.tm_year - 2000)
        | t.tm_mon << 6
        | t.tm_mday << 10
        | t.tm_hour << 15
        | t.tm_min << 20
        | t.tm_sec << 26
    )


#: The G50's int8 temperature when it has none (the only value ever seen,
#: and int8's maximum): never converted into analogue 3.
FIXED_TEMPERATURE_UNAVAILABLE = 127


def _fixed_standard_analogues(
    analogues: tuple[int, int, int, int, int], temperature: int
) -> Analogues:
    """
    The G50 values that have DM's analogue meaning and unit, converted:
    1 battery mV as is, 2 supply mV to DM's 10 mV (rounded half up) and the
    temperature °C to analogue 3's 0.01 °C.  G50 analogues 3-5 have no known
    meaning, so they stay in FixedRecordExtras only.
    """
    battery_mv, supply_mv = analogues[0], analogues[1]
    values = [(1, battery_mv), (2, (supply_mv + 5) // 10)]
    if temperature != FIXED_TEMPERATURE_UNAVAILABLE:
        values.append((SIGNED_ANALOGUE, temperature * 100))
    return Analogues._build(6, tuple(values), b"")


def parse_fixed_records(payload: bytes) -> list[Record]:
    """
    Decode the 64-byte records of a 0x10 message into the common record model.

    A G50 record becomes the analogues whose DM unit is established (see
    _fixed_standard_analogues) and a FixedRecordExtras with every value in
    G50 units, including whether the checksum matched.  Its fix is not a
    GpsFix: the G50's 16-bit position accuracy has no known unit and it has
    no status word, so DM's GPS and digital fields cannot be filled without
    inventing values.  A checksum mismatch does not reject the record: the
    caller logs it.

    :raises ProtocolError: if the payload is not a whole number of records.
    """
    if len(payload) % FIXED_RECORD_SIZE:
        raise ProtocolError(
            f"fixed-record payload of {len(payload)} bytes is not a multiple of 64"
        )
    records = []
    for offset in range(0, len(payload), FIXED_RECORD_SIZE):
        chunk = payload[offset : offset + FIXED_RECORD_SIZE]
        (
            _record_type, index, packed_time, longitude, latitude, speed, heading,
            altitude, position_accuracy, speed_accuracy, event, gps_status,
            inputs, outputs, a1, a2, a3, a4, a5, temperature, ax, ay, az,
            device_id, pdop_hundredths,
        ) = _FIXED_RECORD.unpack_from(chunk)
        analogues = (a1, a2, a3, a4, a5)
        records.append(
            _build_record(
                index,
                _unpack_fixed_time(packed_time),
                event,
                (
                    _fixed_standard_analogues(analogues, temperature),
                    _build_extras(
                        latitude, longitude, altitude, speed, heading,
                        position_accuracy, speed_accuracy, gps_status,
                        inputs, outputs, analogues, temperature,
                        (ax, ay, az), device_id, pdop_hundredths,
                        fletcher8(chunk[:62]) == chunk[62:64],
                    ),
                ),
            )
        )
    return records


def encode_fixed_record(
    index: int,
    time: int,
    latitude: int,
    longitude: int,
    event: int,
    *,
    speed: int = 0,
    heading: int = 0,
    altitude: int = 0,
    position_accuracy: int = 0,
    speed_accuracy: int = 0,
    gps_status: int = 0,
    inputs: int = 0,
    outputs: int = 0,
    analogues: tuple[int, int, int, int, int] = (0, 0, 0, 0, 0),
    temperature: int = 0,
    acceleration: tuple[int, int, int] = (0, 0, 0),
    device_id: bytes = bytes(8),
    pdop_hundredths: int = 0,
) -> bytes:
    """One G50 64-byte record with a correct checksum (for simulators and tests)."""
    body = _FIXED_RECORD.pack(
        0x0E, index, _pack_fixed_time(time), longitude, latitude, speed, heading,
        altitude, position_accuracy, speed_accuracy, event, gps_status,
        inputs, outputs, *(a & 0xFFFF for a in analogues), temperature,
        *acceleration, device_id, pdop_hundredths,
    )
    return body[:62] + fletcher8(body[:62])


# -- async messages (0x20 / 0x21) ----------------------------------------------

#: The CAN address of the device itself (rather than a module on its CAN bus).
CAN_ADDRESS_SELF = UINT32_MAX

_ASYNC_MESSAGE_HEADER = struct.Struct("<IIHB")
_ASYNC_RESPONSE = struct.Struct("<IB")


class AsyncStatus(IntEnum):
    """The delivery status a device reports in an async response (0x21)."""

    FAILURE = 0
    SUCCESS = 1
    RETRY_LATER = 2


@dataclass(frozen=True, slots=True)
class AsyncMessage:
    """One server-to-device async message (0x20), as parsed by parse_async_message."""

    message_id: int
    can_address: int
    async_type: int
    flags: int
    data: bytes


def encode_async_message(
    message_id: int,
    async_type: int,
    data: bytes = b"",
    can_address: int = CAN_ADDRESS_SELF,
    flags: int = 0,
) -> bytes:
    """
    The whole 0x20 frame: message id, CAN address, async type, flags, data.

    :raises struct.error: if a number does not fit its field or the frame
        would exceed the maximum payload.
    """
    return encode_frame(
        MessageType.ASYNC_MESSAGE,
        _ASYNC_MESSAGE_HEADER.pack(message_id, can_address, async_type, flags) + data,
    )


def parse_async_message(payload: bytes) -> AsyncMessage:
    """
    Decode a 0x20 payload (the inverse of encode_async_message's payload).

    :raises ProtocolError: if the 11-byte header is incomplete.
    """
    if len(payload) < _ASYNC_MESSAGE_HEADER.size:
        raise ProtocolError(f"async message of {len(payload)} bytes is too short")
    message_id, can_address, async_type, flags = _ASYNC_MESSAGE_HEADER.unpack_from(
        payload
    )
    return AsyncMessage(
        message_id,
        can_address,
        async_type,
        flags,
        bytes(payload[_ASYNC_MESSAGE_HEADER.size :]),
    )


def parse_async_response(payload: bytes) -> tuple[int, int]:
    """
    The message id and delivery status (see AsyncStatus) of a 0x21 payload.

    Bytes after the first five are ignored.

    :raises ProtocolError: if the payload is shorter than five bytes.
    """
    if len(payload) < _ASYNC_RESPONSE.size:
        raise ProtocolError(f"async response of {len(payload)} bytes is too short")
    message_id, status = _ASYNC_RESPONSE.unpack_from(payload)
    return message_id, status
