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

import json
from base64 import b64encode
from collections.abc import Callable, Iterable
from time import gmtime, strftime

from .codec import (
    EPOCH_2013,
    Analogues,
    DebugText,
    Digital,
    DriverId,
    Field,
    FixedRecordExtras,
    GpsFix,
    Hello,
    OdometerRunHours,
    RawField,
    Record,
    ShortField,
    TripSummary,
)

#: ``FType`` of the G50 fixed-record extras: outside the one-byte id range.
FIXED_EXTRAS_FTYPE = 256
#: ``FType`` of a known field too short for its layout.
SHORT_FIELD_FTYPE = 257

_string = json.dumps


def device_time(seconds_since_2013: int) -> str:
    """A device time as OEM writes it: ``YYYY-MM-DD HH:MM:SS`` in UTC."""
    return strftime("%Y-%m-%d %H:%M:%S", gmtime(EPOCH_2013 + seconds_since_2013))


def degrees(raw: int) -> str:
    """``raw`` × 1e-7 as a JSON number with no float noise (``-79.3462607``)."""
    whole, fraction = divmod(abs(raw), 10_000_000)
    sign = "-" if raw < 0 else ""
    decimals = f"{fraction:07d}".rstrip("0") or "0"
    return f"{sign}{whole}.{decimals}"


def _base64(data: bytes) -> str:
    return b64encode(data).decode("ascii")


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


def oem_document(hello: Hello, records: Iterable[Record]) -> bytes:
    """The complete traditional-format body for one upload, UTF-8 encoded."""
    body = ",".join(record_json(r) for r in records)
    return (
        f'{{"SerNo":{hello.serial},"IMEI":{_string(hello.imei)},'
        f'"ICCID":{_string(hello.iccid)},"ProdId":{hello.product_id},'
        f'"FW":{_string(hello.firmware)},"Records":[{body}]}}'
    ).encode("utf-8")
