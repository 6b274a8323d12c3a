"""
CPU cost of the relay's own work per record, without the network.

Feeds real captures through the whole device path in memory — frame decoder,
session, relay route, OEM JSON body — with a connector that accepts at once,
and reports microseconds of CPU per record and records per second on one
core.  The target (see README.rst, "Performance") is 50 µs per record.

    python bench/bench_pipeline.py [--uploads 20000]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from twisted.internet.defer import succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from oemrelay.codec import COMMIT_REQUEST, Hello
from oemrelay.oem_json import oem_document
from oemrelay.relay import Relay, StatelessLink
from oemrelay.session import DeviceFactory
from tests.vectors import capture


class JsonSink:
    """Builds the OEM body, as the HTTP and file connectors do, then accepts."""

    name = "sink"

    def __init__(self) -> None:
        self.bytes = 0
        self._link = StatelessLink(self.deliver)

    def open_link(self, hello, on_lost):
        return self._link

    def deliver(self, upload, profile):
        self.bytes += len(oem_document(upload.hello, upload.records))
        return succeed(None)


def run(uploads: int) -> None:
    sink = JsonSink()
    factory = DeviceFactory(
        Relay({"sink": sink}, "sink"),
        Clock(),
        commit_timeout=20,
        idle_timeout=600,
        max_message=65535,
    )
    data = (
        capture("data-0x04-12-records-2017-auckland")
        + capture("data-0x04-2-records-2021-denmark")
        + COMMIT_REQUEST
    )
    records_per_upload = 14
    devices = 100
    sessions = []
    for serial in range(devices):
        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        protocol.dataReceived(
            Hello(serial, "353323081669730", "89610185001824844630", 34, 2, 1, 9).to_frame()
        )
        sessions.append((protocol, transport))

    started_cpu = time.process_time()
    started_wall = time.perf_counter()
    for i in range(uploads):
        protocol, transport = sessions[i % devices]
        protocol.dataReceived(data)
        transport.clear()
    cpu = time.process_time() - started_cpu
    wall = time.perf_counter() - started_wall

    records = uploads * records_per_upload
    print(f"uploads            {uploads}")
    print(f"records            {records}")
    print(f"JSON bytes         {sink.bytes}")
    print(f"CPU per record     {cpu / records * 1e6:.1f} µs")
    print(f"records/s (1 core) {records / wall:,.0f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--uploads", type=int, default=20000)
    run(parser.parse_args().uploads)
