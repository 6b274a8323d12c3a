"""
An independent hand decode of the captures in ``dm-captures.txt``.

Written from the byte layouts in ``docs/protocol.rst`` alone, with the
standard library only: it imports nothing from oemrelay, and uses neither
``struct`` nor ``time`` (integers are read with ``int.from_bytes``, dates
counted with ``datetime``), so a value it agrees on with the decoder was not
produced by the decoder.  Run it with ``python tests/data/hand_decode.py``;
``tests/data/README.rst`` records what it printed and ``tests/vectors.py``
holds those values as literals.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

CAPTURES = Path(__file__).with_name("dm-captures.txt")
EPOCH_2013 = datetime(2013, 1, 1, tzinfo=timezone.utc)


def u(data: bytes, offset: int, size: int) -> int:
    """An unsigned little-endian integer of ``size`` bytes."""
    return int.from_bytes(data[offset : offset + size], "little")


def s(data: bytes, offset: int, size: int) -> int:
    """A signed (two's complement) little-endian integer of ``size`` bytes."""
    return int.from_bytes(data[offset : offset + size], "little", signed=True)


def utc(seconds_since_2013: int) -> str:
    """A device time as ``YYYY-MM-DD HH:MM:SS`` UTC."""
    moment = EPOCH_2013 + timedelta(seconds=seconds_since_2013)
    return moment.strftime("%Y-%m-%d %H:%M:%S")


def text(raw: bytes) -> str:
    """An ASCII identity field, cut at its first NUL."""
    return raw.split(b"\x00")[0].decode("ascii")


def read_captures() -> dict[str, bytes]:
    """Each capture's bytes by the name on its ``# name (facts)`` line."""
    captures, name = {}, None
    for line in CAPTURES.read_text().splitlines():
        if line.startswith("# "):
            name = line[2:].split(" (")[0]
        elif line and not line.startswith("#"):
            captures[name] = bytes.fromhex(line)
    return captures


def frame(data: bytes) -> tuple[int, bytes]:
    """Type and payload of a one-frame capture (sync 02 55, type, uint16 length)."""
    assert data[:2] == b"\x02\x55", "sync"
    length = u(data, 3, 2)
    assert len(data) == 5 + length, "one frame, exactly its declared length"
    return data[2], data[5:]


def hello(payload: bytes) -> dict:
    """Section "Hello": serial, IMEI (16 bytes), ICCID (21 bytes), versions."""
    decoded = {
        "length": len(payload),
        "serial": u(payload, 0, 4),
        "imei": text(payload[4:20]),
        "iccid": text(payload[20:41]),
    }
    if len(payload) == 49:
        decoded["fw"] = ".".join(str(b) for b in payload[41:45])
        decoded["flags"] = u(payload, 45, 4)
    return decoded


def gps(field: bytes) -> dict:
    """Field 0, 21 bytes."""
    return {
        "fix": utc(u(field, 0, 4)),
        "lat": s(field, 4, 4),
        "lon": s(field, 8, 4),
        "alt": s(field, 12, 2),
        "speed": u(field, 14, 2),
        "speed_acc": field[16],
        "heading": field[17],
        "pdop": field[18],
        "pos_acc": field[19],
        "status": field[20],
    }


def analogues(field: bytes, width: int) -> dict:
    """Fields 6 (width 2) and 7 (width 4): number byte then signed value."""
    step = 1 + width
    return {field[i]: s(field, i + 1, width) for i in range(0, len(field), step)}


def data_records(payload: bytes) -> list[dict]:
    """Section "Data records": uint16 length (itself included), seq, time, reason, fields."""
    records, offset = [], 0
    while offset < len(payload):
        length = u(payload, offset, 2)
        record = {
            "length": length,
            "seq": u(payload, offset + 2, 4),
            "time": utc(u(payload, offset + 6, 4)),
            "reason": payload[offset + 10],
            "field_ids": [],
        }
        at, end = offset + 11, offset + length
        while at < end:
            field_id, size = payload[at], payload[at + 1]
            at += 2
            if size == 255:
                size, at = u(payload, at, 2), at + 2
            field = payload[at : at + size]
            at += size
            record["field_ids"].append(field_id)
            if field_id == 0:
                record["gps"] = gps(field)
            elif field_id == 1:
                record["debug"] = (u(field, 0, 2), field[2:].decode("ascii"))
            elif field_id == 2:
                record["digital"] = (u(field, 0, 4), u(field, 4, 2), u(field, 6, 2))
            elif field_id == 6:
                record["analogue16"] = analogues(field, 2)
            elif field_id == 7:
                record["analogue32"] = analogues(field, 4)
        assert at == end, "fields fill the record exactly"
        records.append(record)
        offset = end
    return records


def packed_time(value: int) -> str:
    """The G50 bit-packed UTC time of a fixed record."""
    return (
        f"{2000 + (value & 63):04d}-{value >> 6 & 15:02d}-{value >> 10 & 31:02d}"
        f" {value >> 15 & 31:02d}:{value >> 20 & 63:02d}:{value >> 26 & 63:02d}"
    )


def fixed_records(payload: bytes) -> list[dict]:
    """Section "Fixed 64-byte records": one dict per 64 bytes."""
    assert len(payload) % 64 == 0
    records = []
    for offset in range(0, len(payload), 64):
        r = payload[offset : offset + 64]
        a = b = 0
        for byte in r[:62]:
            a = (a + byte) % 256
            b = (b + a) % 256
        records.append(
            {
                "record_type": r[0],
                "index": u(r, 1, 4),
                "time": packed_time(u(r, 5, 4)),
                "lon": s(r, 9, 4),
                "lat": s(r, 13, 4),
                "speed": u(r, 17, 2),
                "heading": r[19],
                "alt": s(r, 20, 2),
                "pos_acc": u(r, 22, 2),
                "speed_acc": r[24],
                "event": r[25],
                "gps_status": r[26],
                "inputs": u(r, 27, 4),
                "outputs": u(r, 31, 2),
                "analogues": [s(r, 33 + 2 * i, 2) for i in range(5)],
                "temperature": s(r, 43, 1),
                "accel": [s(r, 44 + 2 * i, 2) for i in range(3)],
                "device_id": r[50:58].hex(),
                "pdop_hundredths": u(r, 58, 2),
                "checksum": (r[62], r[63]),
                "checksum_ok": (a, b) == (r[62], r[63]),
            }
        )
    return records


def decode_all() -> dict[str, object]:
    """Every capture, decoded by its message type."""
    decoded = {}
    for name, data in read_captures().items():
        message_type, payload = frame(data)
        if message_type == 0x00:
            decoded[name] = hello(payload)
        elif message_type == 0x04:
            decoded[name] = data_records(payload)
        elif message_type == 0x10:
            decoded[name] = fixed_records(payload)
        else:
            decoded[name] = {"type": message_type, "length": len(payload)}
    return decoded


def main() -> None:
    for name, value in decode_all().items():
        print(f"== {name}")
        for item in value if isinstance(value, list) else [value]:
            print(f"   {item}")


if __name__ == "__main__":
    main()
