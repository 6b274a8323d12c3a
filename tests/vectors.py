"""
The real device captures and OEM JSON sample kept in ``tests/data``, and the
values an independent hand decode of the captures gave.

The captures are copied from ``shared/vectors`` so the suite stands alone;
where they come from is in ``tests/data/README.rst``.  The literals below
were printed by ``tests/data/hand_decode.py``, a decoder written from
``docs/protocol.rst`` that imports nothing from oemrelay, so tests that
compare the relay's output with them do not trust the relay's own decoder.
``tests/test_codec.py`` (HandDecodeTests) checks that the script still
prints them.
"""

from __future__ import annotations

import calendar
import json
from functools import cache
from pathlib import Path

from oemrelay.codec import EPOCH_2013

DATA = Path(__file__).parent / "data"


@cache
def captures() -> dict[str, bytes]:
    """Every capture in ``dm-captures.txt`` by its name (the words before ``(``)."""
    frames = {}
    name = None
    for line in (DATA / "dm-captures.txt").read_text().splitlines():
        line = line.strip()
        if line.startswith("# "):
            name = line[2:].split(" (")[0].strip()
        elif line and not line.startswith("#"):
            frames[name] = bytes.fromhex(line)
    return frames


def capture(name: str) -> bytes:
    """One capture's bytes, e.g. ``capture("hello-49-byte-dart")``."""
    return captures()[name]


def oem_sample() -> dict:
    """The real OEM Server HTTP body, parsed."""
    return json.loads((DATA / "oem-http-sample.json").read_text())


def oem_sample_text() -> str:
    """The real OEM Server HTTP body as posted."""
    return (DATA / "oem-http-sample.json").read_text().strip()


def payload(name: str) -> bytes:
    """The payload of a one-frame capture (its bytes after the 5-byte header)."""
    return capture(name)[5:]


def since_2013(text: str) -> int:
    """Seconds since 2013 for a ``YYYY-MM-DD HH:MM:SS`` UTC time."""
    date, time = text.split(" ")
    parts = [int(p) for p in date.split("-")] + [int(p) for p in time.split(":")]
    return calendar.timegm((*parts, 0, 0, 0)) - EPOCH_2013


#: ``(seq, DateUTC, reason, field ids)`` of every 0x04 record, by capture,
#: as ``tests/data/hand_decode.py`` decodes them.
HAND_DECODED_RECORDS: dict[str, tuple[tuple[int, str, int, tuple[int, ...]], ...]] = {
    "data-0x04-2-records-2021-denmark": (
        (565, "2021-02-05 05:51:55", 3, (0, 2, 6)),
        (566, "2021-02-05 06:07:02", 3, (0, 2, 6)),
    ),
    "data-0x04-12-records-2017-auckland": (
        (518, "2017-06-12 07:14:26", 3, (0, 2, 6, 7)),
        (519, "2017-06-12 07:14:49", 3, (0, 2, 6, 7)),
        (520, "2017-06-12 07:15:30", 3, (0, 2, 6, 7)),
        (521, "2017-06-12 07:15:53", 3, (0, 2, 6, 7)),
        (522, "2017-06-12 07:16:16", 3, (0, 2, 6, 7)),
        (523, "2017-06-12 07:16:39", 3, (0, 2, 6, 7)),
        (524, "2017-06-12 07:17:02", 3, (0, 2, 6, 7)),
        (525, "2017-06-12 07:17:25", 3, (0, 2, 6, 7)),
        (526, "2017-06-12 07:17:49", 3, (0, 2, 6, 7)),
        (527, "2017-06-12 07:18:12", 3, (0, 2, 6, 7)),
        (528, "2017-06-12 07:18:37", 3, (0, 2, 6, 7)),
        (529, "2017-06-12 07:19:01", 3, (0, 2, 6, 7)),
    ),
    "data-0x04-20-records-dart-after-reset": (
        (13, "2013-01-01 00:00:00", 21, (1,)),
        (14, "2013-01-01 00:00:00", 21, (1,)),
        (15, "2013-01-01 00:00:00", 9, (0, 2, 6)),
        (16, "2013-01-01 00:00:00", 9, (0, 2, 6)),
        (17, "2013-01-01 00:00:00", 9, (0, 2, 6)),
        (18, "2013-01-01 00:00:00", 2, (0, 2, 6)),
        (19, "2013-01-01 00:00:00", 15, (0, 2, 6)),
        (20, "2013-01-01 00:00:00", 21, (1,)),
        (21, "2013-01-01 00:00:00", 23, (0, 2, 6)),
        (22, "2013-01-01 00:00:00", 21, (1,)),
        (23, "2013-01-01 00:00:00", 21, (1,)),
        (24, "2013-01-01 00:00:00", 23, (0, 2, 6)),
        (25, "2013-01-01 00:00:00", 21, (1,)),
        (26, "2013-01-01 00:00:00", 21, (1,)),
        (27, "2013-01-01 00:00:00", 21, (1,)),
        (28, "2013-01-01 00:00:00", 23, (0, 2, 6)),
        (29, "2013-01-01 00:00:00", 21, (1,)),
        (30, "2013-01-01 00:00:00", 21, (1,)),
        (31, "2013-01-01 00:00:00", 23, (0, 2, 6)),
        (32, "2013-01-01 00:00:00", 21, (1,)),
    ),
}

#: ``(index, DateUTC, event)`` of every G50 fixed record, by capture.
HAND_DECODED_FIXED: dict[str, tuple[tuple[int, str, int], ...]] = {
    "fixed64-0x10-1-record-G50": ((894124, "2018-03-14 11:46:24", 3),),
    "fixed64-0x10-2-records-G50": (
        (894125, "2018-03-14 11:46:34", 9),
        (894126, "2018-03-14 11:46:34", 2),
    ),
}

#: The JSON number text of each Lat/Long raw value the hand decode found in
#: the first record of each capture with a fix: raw / 10**7 written out by
#: hand, so no float formatting produced it.
HAND_DECODED_DEGREES: dict[int, str] = {
    554574140: "55.457414",
    99343941: "9.9343941",
    -367399358: "-36.7399358",
    1747199418: "174.7199418",
    -294937869: "-29.4937869",
    312025029: "31.2025029",
}
