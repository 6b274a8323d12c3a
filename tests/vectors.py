"""
The real device captures and OEM JSON sample kept in ``tests/data``.

Copied from ``shared/vectors`` so the suite stands alone.
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
