"""
The OEM Server "traditional" JSON document for an upload.

The shape is DM's, to the key order (``FType`` last) and the units: raw
integers, ``Lat``/``Long`` in degrees with at most seven decimals and no float
noise, times as ``YYYY-MM-DD HH:MM:SS`` UTC (``docs/payload.rst``,
``tests/data/oem-http-sample.json``).  The document is written directly as
text: it is on the hot path, and the exact number formatting matters.

Fields whose OEM JSON keys are not public are emitted with keys of our own;
``docs/payload.rst`` lists every FType, its keys, units and evidence:

* field 1, debug text: ``{"Code":39,"Text":"RESET ...","FType":1}``
* field 26, trip summary: ``{"TripDist":n,"TripDur":s,"FType":26}``
* field 27, odometer and run hours: ``{"Odo":n,"RunHrs":s,"FType":27}``
* any other field id: ``{"Raw":"<base64 of the field bytes>","FType":id}``
* a field longer than its layout: the standard keys, then
  ``"ExtraRaw":"<base64 of the bytes after the layout>"`` before ``FType``
* a known field id shorter than its layout: ``{"Raw":...,"ShortOf":id,
  "FType":257}``, never the standard FType, whose keys it cannot fill
* a G50 fixed record, every value in G50 units: ``FType`` 256.

A device field id is one byte, so 256 and 257 can never collide with one.
"""

from __future__ import annotations

import struct
from binascii import b2a_base64
from collections.abc import Callable, Iterable
from datetime import date
from json.encoder import encode_basestring_ascii

from .codec import (
    EMPTY_FIELD_IDS,
    FIELD_MIN_SIZE,
    SIGNED_ANALOGUE,
    Analogues,
    DebugText,
    Digital,
    DriverId,
    Field,
    FixedRecordExtras,
    Frame,
    GpsFix,
    Hello,
    MessageType,
    OdometerRunHours,
    RawField,
    Record,
    ProtocolError,
    ShortField,
    TripSummary,
    _RECORD_HEADER as _CODEC_RECORD_HEADER,
    field_header,
    parse_fixed_records,
)

#: ``FType`` of the G50 fixed-record extras: outside the one-byte id range.
FIXED_EXTRAS_FTYPE = 256
#: ``FType`` of a known field too short for its layout.
SHORT_FIELD_FTYPE = 257

#: A JSON string literal, exactly as ``json.dumps`` writes one (it calls this).
_string = encode_basestring_ascii

_TWO_DIGITS = tuple(f"{n:02d}" for n in range(60))
#: The proleptic ordinal of 2013-01-01, day 0 of every device time.
_DAY_2013 = date(2013, 1, 1).toordinal()


def device_time(seconds_since_2013: int, days: dict[int, str] | None = None) -> str:
    """
    A device time as OEM writes it: ``YYYY-MM-DD HH:MM:SS`` in UTC.

    ``days`` memoises the date part for one document (its records share a
    day or two); it must not outlive the document.
    """
    day, rest = divmod(seconds_since_2013, 86400)
    if days is None:
        date_part = date.fromordinal(_DAY_2013 + day).isoformat()
    else:
        date_part = days.get(day)
        if date_part is None:
            date_part = days[day] = date.fromordinal(_DAY_2013 + day).isoformat()
    hours, rest = divmod(rest, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{date_part} {_TWO_DIGITS[hours]}:{_TWO_DIGITS[minutes]}:{_TWO_DIGITS[seconds]}"


def degrees(raw: int) -> str:
    """``raw`` × 1e-7 as a JSON number with no float noise (``-79.3462607``)."""
    digits = str(raw)
    sign = ""
    if raw < 0:
        sign, digits = "-", digits[1:]
    if len(digits) < 8:
        digits = digits.rjust(8, "0")
    return f"{sign}{digits[:-7]}.{digits[-7:].rstrip('0') or '0'}"


def _base64(data: bytes) -> str:
    return b2a_base64(data, newline=False).decode("ascii")


def _extra(data: bytes) -> str:
    """The ``ExtraRaw`` member for bytes after a layout, or nothing."""
    return f'"ExtraRaw":"{_base64(data)}",' if data else ""


def _gps(f: GpsFix) -> str:
    return (
        f'{{"GpsUTC":"{device_time(f.fix_time)}","Lat":{degrees(f.latitude)},'
        f'"Long":{degrees(f.longitude)},"Alt":{f.altitude},"Spd":{f.speed},'
        f'"SpdAcc":{f.speed_accuracy},"Head":{f.heading},"PDOP":{f.pdop},'
        f'"PosAcc":{f.position_accuracy},"GpsStat":{f.status},{_extra(f.extra)}"FType":0}}'
    )


def _digital(f: Digital) -> str:
    return (
        f'{{"DIn":{f.inputs},"DOut":{f.outputs},"DevStat":{f.status},'
        f'{_extra(f.extra)}"FType":2}}'
    )


def _driver_id(f: DriverId) -> str:
    return f'{{"DType":{f.id_type},"Data":"{_base64(f.data)}","FType":3}}'


def _analogues(f: Analogues) -> str:
    values = ",".join(f'"{number}":{value}' for number, value in f.values)
    return f'{{"AnalogueData":{{{values}}},{_extra(f.extra)}"FType":{f.field_id}}}'


def _debug_text(f: DebugText) -> str:
    text = _string(f.text.decode("latin-1"))
    return f'{{"Code":{f.code},"Text":{text},"FType":1}}'


def _trip(f: TripSummary) -> str:
    return (
        f'{{"TripDist":{f.distance},"TripDur":{f.duration},'
        f'{_extra(f.extra)}"FType":26}}'
    )


def _odometer(f: OdometerRunHours) -> str:
    return (
        f'{{"Odo":{f.odometer},"RunHrs":{f.run_hours},{_extra(f.extra)}"FType":27}}'
    )


def _raw(f: RawField) -> str:
    return f'{{"Raw":"{_base64(f.data)}","FType":{f.field_id}}}'


def _short(f: ShortField) -> str:
    return (
        f'{{"Raw":"{_base64(f.data)}","ShortOf":{f.field_id},'
        f'"FType":{SHORT_FIELD_FTYPE}}}'
    )


def _fixed_extras(f: FixedRecordExtras) -> str:
    x, y, z = f.acceleration
    analogues = ",".join(str(value) for value in f.analogues)
    return (
        f'{{"Lat":{degrees(f.latitude)},"Long":{degrees(f.longitude)},'
        f'"Alt":{f.altitude},"Spd":{f.speed},"Head":{f.heading},'
        f'"PosAccRaw":{f.position_accuracy},"SpdAccRaw":{f.speed_accuracy},'
        f'"GpsStat":{f.gps_status},"DIn":{f.inputs},"DOut":{f.outputs},'
        f'"Analogues":[{analogues}],'
        f'"Temp":{f.temperature},"AccX":{x},"AccY":{y},"AccZ":{z},'
        f'"DevId":"{f.device_id.hex()}","PDOP100":{f.pdop_hundredths},'
        f'"ChecksumOk":{"true" if f.checksum_ok else "false"},'
        f'"FType":{FIXED_EXTRAS_FTYPE}}}'
    )


_FIELD_WRITERS: dict[type, Callable[..., str]] = {
    GpsFix: _gps,
    Digital: _digital,
    DriverId: _driver_id,
    Analogues: _analogues,
    DebugText: _debug_text,
    TripSummary: _trip,
    OdometerRunHours: _odometer,
    RawField: _raw,
    ShortField: _short,
    FixedRecordExtras: _fixed_extras,
}


def field_json(field: Field) -> str:
    """One field object."""
    return _FIELD_WRITERS[type(field)](field)


def record_json(record: Record) -> str:
    """One element of ``Records``."""
    fields = ",".join(_FIELD_WRITERS[type(f)](f) for f in record.fields)
    return (
        f'{{"SeqNo":{record.seq},"Reason":{record.reason},'
        f'"DateUTC":"{device_time(record.time)}","Fields":[{fields}]}}'
    )


def _document_head(hello: Hello) -> str:
    return (
        f'{{"SerNo":{hello.serial},"IMEI":{_string(hello.imei)},'
        f'"ICCID":{_string(hello.iccid)},"ProdId":{hello.product_id},'
        f'"FW":{_string(hello.firmware)},"Records":['
    )


def oem_document(hello: Hello, records: Iterable[Record]) -> bytes:
    """
    The complete traditional-format body for one upload, UTF-8 encoded,
    from decoded records: the reference for :func:`oem_document_of_frames`.
    """
    body = ",".join(record_json(r) for r in records)
    return f"{_document_head(hello)}{body}]}}".encode("utf-8")


# -- the same document straight from the frames' bytes -------------------------
#
# The hot path: no field object is built.  Each writer below is the bytes
# twin of the object writer above (the property tests in
# tests/test_oem_json_bytes.py hold them to the same output, byte for byte).

# The codec's own layouts, so the two cannot disagree.  (The record header
# is a Struct of its own with the codec's format: sharing the codec's one
# measured 4.8k more instructions per 10-record upload under callgrind.)
_RECORD_HEADER = struct.Struct(_CODEC_RECORD_HEADER.format)
_GPS = GpsFix._LAYOUT
_DIGITAL = Digital._LAYOUT
_PAIR = TripSummary._LAYOUT  # and OdometerRunHours'
_ANALOGUE_ITEM_SIZE = {field_id: item.size for field_id, item in Analogues._ITEMS.items()}
# Their sizes as plain globals for the per-field and per-record paths.
_GPS_SIZE, _DIGITAL_SIZE, _PAIR_SIZE = _GPS.size, _DIGITAL.size, _PAIR.size
_RECORD_HEADER_SIZE = _RECORD_HEADER.size
#: Analogue fields of up to this many readings unpack through one Struct
#: (and format through one template) each; longer ones item by item.
_PRECOMPILED_READINGS = 16
_READINGS_LAYOUT = {
    (field_id, count): struct.Struct("<" + item.format[1:] * count)
    for field_id, item in Analogues._ITEMS.items()
    for count in range(_PRECOMPILED_READINGS + 1)
}
_READINGS_TEMPLATE = tuple(
    ",".join(['"{}":{}'] * count) for count in range(_PRECOMPILED_READINGS + 1)
)


def _readings(field_id: int, payload: bytes, at: int, count: int) -> str:
    """The ``AnalogueData`` members of ``count`` readings at ``at``."""
    if count <= _PRECOMPILED_READINGS:
        values = _READINGS_LAYOUT[field_id, count].unpack_from(payload, at)
    else:
        item = _READINGS_LAYOUT[field_id, 1]
        values = tuple(
            value
            for offset in range(at, at + count * item.size, item.size)
            for value in item.unpack_from(payload, offset)
        )
    if field_id == 6 and SIGNED_ANALOGUE in values[::2]:
        values = list(values)
        for i in range(0, len(values), 2):
            if values[i] == SIGNED_ANALOGUE and values[i + 1] >= 0x8000:
                values[i + 1] -= 0x10000
    if count <= _PRECOMPILED_READINGS:
        return _READINGS_TEMPLATE[count].format(*values)
    return ",".join(f'"{values[i]}":{values[i + 1]}' for i in range(0, len(values), 2))


def _record_json_from_bytes(
    payload: bytes, at: int, record_end: int, seq: int, time: int, reason: int,
    times: dict[int, str], days: dict[int, str],
) -> str:
    """One ``Records`` element, field by field (any field, any size)."""
    min_size = FIELD_MIN_SIZE
    fields: list[str] = []
    while at < record_end:
        field_id, size, at = field_header(payload, at, record_end, seq, len(fields))
        field_end = at + size
        if size < min_size[field_id] and (size or field_id not in EMPTY_FIELD_IDS):
            fields.append(
                f'{{"Raw":"{_base64(payload[at:field_end])}","ShortOf":{field_id},'
                f'"FType":{SHORT_FIELD_FTYPE}}}'
            )
        elif field_id == 0:
            (fix_time, latitude, longitude, altitude, speed, speed_accuracy,
             heading, pdop, position_accuracy, status) = _GPS.unpack_from(payload, at)
            fix_utc = times.get(fix_time)
            if fix_utc is None:
                fix_utc = times[fix_time] = device_time(fix_time, days)
            # Most fields hold no bytes past their layout: no slice, no call.
            extra = _extra(payload[at + _GPS_SIZE : field_end]) if size > _GPS_SIZE else ""
            fields.append(
                f'{{"GpsUTC":"{fix_utc}","Lat":{degrees(latitude)},'
                f'"Long":{degrees(longitude)},"Alt":{altitude},"Spd":{speed},'
                f'"SpdAcc":{speed_accuracy},"Head":{heading},"PDOP":{pdop},'
                f'"PosAcc":{position_accuracy},"GpsStat":{status},{extra}"FType":0}}'
            )
        elif field_id == 6 or field_id == 7:
            item_size = _ANALOGUE_ITEM_SIZE[field_id]
            count = size // item_size
            whole_end = at + count * item_size
            extra = _extra(payload[whole_end:field_end]) if whole_end < field_end else ""
            fields.append(
                f'{{"AnalogueData":{{{_readings(field_id, payload, at, count)}}},'
                f'{extra}"FType":{field_id}}}'
            )
        elif field_id == 2:
            inputs, outputs, status = _DIGITAL.unpack_from(payload, at)
            extra = _extra(payload[at + _DIGITAL_SIZE : field_end]) if size > _DIGITAL_SIZE else ""
            fields.append(
                f'{{"DIn":{inputs},"DOut":{outputs},"DevStat":{status},'
                f'{extra}"FType":2}}'
            )
        elif field_id == 1:
            code = payload[at] | payload[at + 1] << 8
            text = _string(payload[at + 2 : field_end].decode("latin-1"))
            fields.append(f'{{"Code":{code},"Text":{text},"FType":1}}')
        elif field_id == 3:
            fields.append(
                f'{{"DType":{payload[at]},"Data":"{_base64(payload[at + 1:field_end])}",'
                f'"FType":3}}'
            )
        elif field_id == 26 or field_id == 27:
            first, second = _PAIR.unpack_from(payload, at)
            extra = _extra(payload[at + _PAIR_SIZE : field_end]) if size > _PAIR_SIZE else ""
            keys = ('"TripDist":', ',"TripDur":') if field_id == 26 else ('"Odo":', ',"RunHrs":')
            fields.append(
                f'{{{keys[0]}{first}{keys[1]}{second},{extra}"FType":{field_id}}}'
            )
        else:
            fields.append(
                f'{{"Raw":"{_base64(payload[at:field_end])}","FType":{field_id}}}'
            )
        at = field_end
    record_time = times.get(time)
    if record_time is None:
        record_time = times[time] = device_time(time, days)
    return (
        f'{{"SeqNo":{seq},"Reason":{reason},"DateUTC":"{record_time}",'
        f'"Fields":[{",".join(fields)}]}}'
    )


#: Record layouts (each field's id and size, in order) seen so far, each with
#: its compiled writer, or None for a layout the writer does not cover.
#: Keyed on the layout, never the values; bounded, as devices choose layouts.
_RECORD_WRITERS: dict[tuple[int, ...], Callable[..., str] | None] = {}
_MAX_RECORD_WRITERS = 512


def _compile_record_writer(key: tuple[int, ...]) -> Callable[..., str] | None:
    """
    A function writing records of one layout of fixed-size fields (GPS,
    digital, analogues, trip, odometer, each exactly its layout), or None
    for any other layout.  It is generated source: one Struct unpacks the
    whole record and one f-string formats it, as the writers above would.

    Given a record of the layout's length, the function checks every field
    header against the layout and returns None if one differs: a record of
    that length whose field headers all match has that layout, so the
    caller can try it before walking the record.
    """
    formats = ["<2xIIB"]
    names = ["seq", "time", "reason"]
    headers: list[str] = []
    lines: list[str] = []
    parts: list[str] = []
    for number, field in enumerate(key):
        field_id, size = field >> 16, field & 0xFFFF
        v = [f"v{number}_{i}" for i in range(40)]
        # Each field's id and length byte, checked against the layout.
        formats.append("H")
        names.append(f"h{number}")
        headers.append(f"h{number} == {field_id | size << 8}")
        if field_id == 0 and size == _GPS.size:
            formats.append(_GPS.format[1:])
            names += v[:10]
            lines.append(
                f"    fix = times.get({v[0]})\n"
                f"    if fix is None:\n"
                f"        fix = times[{v[0]}] = device_time({v[0]}, days)\n"
                f"    {v[0]} = fix\n"
            )
            parts.append(
                f'{{{{"GpsUTC":"{{{v[0]}}}","Lat":{{degrees({v[1]})}},'
                f'"Long":{{degrees({v[2]})}},"Alt":{{{v[3]}}},"Spd":{{{v[4]}}},'
                f'"SpdAcc":{{{v[5]}}},"Head":{{{v[6]}}},"PDOP":{{{v[7]}}},'
                f'"PosAcc":{{{v[8]}}},"GpsStat":{{{v[9]}}},"FType":0}}}}'
            )
        elif field_id == 2 and size == _DIGITAL.size:
            formats.append(_DIGITAL.format[1:])
            names += v[:3]
            parts.append(
                f'{{{{"DIn":{{{v[0]}}},"DOut":{{{v[1]}}},"DevStat":{{{v[2]}}},"FType":2}}}}'
            )
        elif field_id in _ANALOGUE_ITEM_SIZE and size % _ANALOGUE_ITEM_SIZE[field_id] == 0:
            count = size // _ANALOGUE_ITEM_SIZE[field_id]
            if count > _PRECOMPILED_READINGS:
                return None
            formats.append(Analogues._ITEMS[field_id].format[1:] * count)
            names += v[: 2 * count]
            if field_id == 6:
                for i in range(count):
                    n, value = v[2 * i], v[2 * i + 1]
                    lines.append(
                        f"    if {n} == {SIGNED_ANALOGUE} and {value} >= 0x8000:\n"
                        f"        {value} -= 0x10000\n"
                    )
            readings = ",".join(
                f'"{{{v[2 * i]}}}":{{{v[2 * i + 1]}}}' for i in range(count)
            )
            parts.append(f'{{{{"AnalogueData":{{{{{readings}}}}},"FType":{field_id}}}}}')
        elif field_id in (26, 27) and size == _PAIR.size:
            formats.append(_PAIR.format[1:])
            names += v[:2]
            first, second = ("TripDist", "TripDur") if field_id == 26 else ("Odo", "RunHrs")
            parts.append(
                f'{{{{"{first}":{{{v[0]}}},"{second}":{{{v[1]}}},"FType":{field_id}}}}}'
            )
        else:
            return None
    source = (
        "def write(payload, offset, times, days):\n"
        f"    {', '.join(names)}, = unpack_from(payload, offset)\n"
        + (f"    if not ({' and '.join(headers)}):\n        return None\n" if headers else "")
        +         "    date = times.get(time)\n"
        "    if date is None:\n"
        "        date = times[time] = device_time(time, days)\n"
        + "".join(lines)
        + "    return f'{{\"SeqNo\":{seq},\"Reason\":{reason},\"DateUTC\":\"{date}\",\"Fields\":["
        + ",".join(parts)
        + "]}}'\n"
    )
    namespace = {
        "unpack_from": struct.Struct("".join(formats)).unpack_from,
        "device_time": device_time,
        "degrees": degrees,
    }
    exec(source, namespace)  # noqa: S102 - source made above from ints only
    return namespace["write"]


#: The writer last compiled for each record length: tried first (it checks
#: the field headers) so most records skip the walk.
_WRITER_BY_LENGTH: dict[int, Callable[..., str | None]] = {}

_UNSEEN = object()


def _data_records_json(payload: bytes, out: list[str], times: dict, days: dict) -> None:
    """Append the ``Records`` elements of a 0x04 payload to ``out``."""
    offset = 0
    end = len(payload)
    writers = _RECORD_WRITERS
    by_length = _WRITER_BY_LENGTH
    while offset < end:
        if end - offset < 11:
            raise ProtocolError(f"truncated record header at offset {offset}")
        length, seq, time, reason = _RECORD_HEADER.unpack_from(payload, offset)
        record_end = offset + length
        if length < 11 or record_end > end:
            raise ProtocolError(
                f"record at offset {offset} declares length {length},"
                f" {end - offset} bytes left"
            )
        guess = by_length.get(length)
        if guess is not None:
            text = guess(payload, offset, times, days)
            if text is not None:
                out.append(text)
                offset = record_end
                continue
        # The record's layout, checked as parse_data_records checks it.
        at = offset + _RECORD_HEADER_SIZE
        key: list[int] = []
        extended = False
        while at < record_end:
            field_id, size, data_at = field_header(payload, at, record_end, seq, len(key))
            extended = extended or data_at - at == 4  # a 255-escaped length
            key.append(field_id << 16 | size)
            at = data_at + size
        writer = None
        if not extended:
            layout = tuple(key)
            writer = writers.get(layout, _UNSEEN)
            if writer is _UNSEEN:
                # Full: new layouts take the field-by-field path, so a device
                # sending endless layouts cannot make each record compile.
                writer = None
                if len(writers) < _MAX_RECORD_WRITERS:
                    writer = writers[layout] = _compile_record_writer(layout)
            if writer is not None:
                # This length's latest layout is the next record's best guess
                # (at most one per stored layout, so bounded as they are).
                by_length[length] = writer
        if writer is None:
            out.append(
                _record_json_from_bytes(
                    payload, offset + _RECORD_HEADER_SIZE, record_end, seq, time, reason, times, days
                )
            )
        else:
            out.append(writer(payload, offset, times, days))
        offset = record_end


def oem_document_of_frames(hello: Hello, frames: Iterable[Frame]) -> bytes:
    """
    :func:`oem_document` for the records in ``frames`` (0x04 and 0x10),
    written from their bytes without decoding them into objects.

    :raises ProtocolError: as :func:`~oemrelay.codec.parse_records` would.
    """
    records: list[str] = []
    # Device times repeat within an upload (a record and its fix); the memo
    # lives for this one document only.
    times: dict[int, str] = {}
    days: dict[int, str] = {}
    for frame in frames:
        if frame.type == MessageType.DATA_RECORDS:
            _data_records_json(frame.payload, records, times, days)
        elif frame.type == MessageType.FIXED_RECORDS:
            # G50 only, and rare: the object path is cheap enough.
            records.extend(record_json(r) for r in parse_fixed_records(frame.payload))
        else:
            raise ProtocolError(f"message type 0x{frame.type:02x} holds no records")
    return f"{_document_head(hello)}{','.join(records)}]}}".encode("utf-8")
