"""
CPU per device of the registry's batched activity write (commit counters,
last upload, last seen, last error), on SQLite or PostgreSQL.

Creates DEVICES devices, then writes FLUSHES batches of one row per device
through DeviceStore.record_activity (as ActivityBatch.flush does once a
second) and prints the relay process's CPU (every thread: the write runs in
a pool thread) per device written, and the wall time per flush.

    python bench/bench_activity_flush.py URL [--devices 500] [--flushes 40]

Use a database of its own: it creates its schema there.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from twisted.internet import task

from oemrelay.codec import Hello
from oemrelay.registry import Registry


async def run(reactor, url: str, devices: int, flushes: int) -> None:
    registry = Registry.from_url(url, reactor)
    await registry.start()
    store = registry.devices
    for serial in range(1, devices + 1):
        await store.device_connected(Hello(serial, "imei", "iccid"), "bench", 1.0)
    now = time.time()
    await store.record_activity([(s, 1, now, now, None) for s in range(1, devices + 1)])
    started_cpu, started_wall = time.process_time(), time.perf_counter()
    for flush in range(flushes):
        now += 1
        rows = [
            (serial, 10, now, now, None if serial % 50 else "end answered 503")
            for serial in range(1, devices + 1)
        ]
        await store.record_activity(rows)
    cpu, wall = time.process_time() - started_cpu, time.perf_counter() - started_wall
    print(f"{url.split(':')[0]:10s} devices {devices} flushes {flushes}:"
          f" {cpu / (devices * flushes) * 1e6:.1f} µs CPU per device,"
          f" {wall / flushes * 1e3:.1f} ms wall per flush")
    await registry.close()


def main(reactor, url: str, devices: int, flushes: int):
    from twisted.internet.defer import Deferred

    return Deferred.fromCoroutine(run(reactor, url, devices, flushes))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("url")
    parser.add_argument("--devices", type=int, default=500)
    parser.add_argument("--flushes", type=int, default=40)
    arguments = parser.parse_args()
    task.react(main, (arguments.url, arguments.devices, arguments.flushes))
