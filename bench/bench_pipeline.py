"""
CPU cost of the relay's own work per record, without the network.

Feeds uploads through the whole device path in memory — frame decoder,
session, relay route, OEM JSON body written from the frames as the HTTP
connector writes it — with a connector that accepts at once, and reports
microseconds of CPU per record and records per second on one core.  The
target (see README.rst, "Performance") is 50 µs per record.

``--load captures`` sends two real captures (14 records) per upload;
``--load simulated`` the fleet simulator's 10-record uploads (what
``bench/run`` and the daemon benchmarks send).  ``--part codec`` runs only
the records' share of that path: the session's walk of each data frame
(:func:`oemrelay.codec.frame_shape`) and the OEM JSON from the frames.

For instruction counts, which the noise of a shared machine does not move,
run it under callgrind twice and subtract the start-up::

    valgrind --tool=callgrind python bench/bench_pipeline.py --uploads 2001
    valgrind --tool=callgrind python bench/bench_pipeline.py --uploads 1

    python bench/bench_pipeline.py [--uploads 20000] [--load captures|simulated]
        [--part pipeline|codec]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from twisted.internet.defer import succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from oemrelay.codec import COMMIT_REQUEST, FrameDecoder, Hello, frame_shape, upload_cost
from oemrelay.oem_json import oem_document_of_frames
from oemrelay.relay import Relay, StatelessLink
from oemrelay.session import DeviceFactory
from oemrelay.simulator import DeviceTrack, records_frames
from tests.vectors import capture

HELLO = Hello(1, "353323081669730", "89610185001824844630", 34, 2, 1, 9)


class JsonSink:
    """Builds the OEM body, as the HTTP and file connectors do, then accepts."""

    name = "sink"

    def __init__(self) -> None:
        self.bytes = 0
        self._link = StatelessLink(self.deliver)

    def open_link(self, hello, on_lost):
        return self._link

    def deliver(self, upload, profile):
        self.bytes += len(oem_document_of_frames(upload.hello, upload.frames))
        return succeed(None)


def upload_data(load: str) -> tuple[bytes, int]:
    """One upload's data frames and how many records they hold."""
    if load == "simulated":
        track = DeviceTrack(7)
        records = [track.record(1000 + i, 400_000_000 + 30 * i) for i in range(10)]
        return records_frames(records), len(records)
    return (
        capture("data-0x04-12-records-2017-auckland")
        + capture("data-0x04-2-records-2021-denmark"),
        14,
    )


def greeted_devices(factory: DeviceFactory, devices: int) -> list[tuple]:
    """``devices`` connections of ``factory``, each past its hello: (protocol, transport)."""
    sessions = []
    for serial in range(devices):
        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        protocol.dataReceived(dataclasses.replace(HELLO, serial=serial).to_frame())
        sessions.append((protocol, transport))
    return sessions


def run_pipeline(uploads: int, data: bytes) -> int:
    """Every upload through a session; the JSON bytes written."""
    sink = JsonSink()
    factory = DeviceFactory(
        Relay({"sink": sink}, "sink"),
        Clock(),
        commit_timeout=20,
        idle_timeout=600,
        max_message=65535,
    )
    data += COMMIT_REQUEST
    devices = 100
    sessions = greeted_devices(factory, devices)
    for i in range(uploads):
        protocol, transport = sessions[i % devices]
        protocol.dataReceived(data)
        transport.clear()
    return sink.bytes


def run_codec(uploads: int, data: bytes) -> int:
    """Only the records' work: the session's walk, then the JSON."""
    frames = tuple(FrameDecoder().feed(data))
    written = 0
    for _ in range(uploads):
        cost = 0
        for frame in frames:
            shape = frame_shape(frame)
            cost += upload_cost(shape.record_count, shape.field_count, len(frame.payload))
        written += len(oem_document_of_frames(HELLO, frames))
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--uploads", type=int, default=20000)
    parser.add_argument("--load", choices=("captures", "simulated"), default="captures")
    parser.add_argument("--part", choices=("pipeline", "codec"), default="pipeline")
    args = parser.parse_args()
    data, records_per_upload = upload_data(args.load)
    run = run_pipeline if args.part == "pipeline" else run_codec

    started_cpu = time.process_time()
    started_wall = time.perf_counter()
    written = run(args.uploads, data)
    cpu = time.process_time() - started_cpu
    wall = time.perf_counter() - started_wall

    records = args.uploads * records_per_upload
    print(f"uploads            {args.uploads}")
    print(f"records            {records}")
    print(f"JSON bytes         {written}")
    print(f"CPU per record     {cpu / records * 1e6:.1f} µs")
    print(f"records/s (1 core) {records / wall:,.0f}")


if __name__ == "__main__":
    main()
