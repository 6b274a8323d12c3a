"""
One load process of the benchmark: a fleet of simulated devices
(oemrelay.simulator, as ``oemrelay simulate``) measured over a window.

    python bench/load.py PORT DEVICES RECORDS WARMUP SECONDS SERIAL_BASE [RATE]

The devices (each sending the same pre-encoded records every time, see
:func:`_cheap_uploads`) connect and upload as fast as the relay commits (or, with RATE,
that many uploads per second in all); after WARMUP seconds, and once as
many connections and committed uploads as devices have been counted (the
counts are running totals: a device reconnecting, or committing twice,
counts twice), it prints
``measuring`` (the caller samples the relay's CPU then), and after SECONDS
more one JSON line: records and uploads committed in the window, its length,
the commit latency percentiles of the window's commits and the devices that
had to reconnect in it.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from twisted.internet import reactor, task  # noqa: E402
from twisted.internet.defer import Deferred  # noqa: E402
from twisted.internet.endpoints import TCP4ClientEndpoint  # noqa: E402

from oemrelay import simulator  # noqa: E402
from oemrelay.codec import COMMIT_REQUEST  # noqa: E402
from oemrelay.simulator import DeviceSettings, Fleet, endpoint_connect, percentile  # noqa: E402


def _cheap_uploads(records: int) -> None:
    """
    Every device sends the same pre-encoded upload each time (the same
    sequence numbers again, which the relay does not mind), so the load
    processes spend their CPU on the network, not on making records: making
    fresh records cost the load more than the relay spent on them.
    """
    track = simulator.DeviceTrack(100000)
    start = 400_000_000
    upload = simulator.records_frames(
        [track.record(seq, start + seq * simulator.LOG_INTERVAL) for seq in range(records)]
    ) + COMMIT_REQUEST
    original = simulator.SimulatedDevice._send_upload

    def send_upload(device) -> None:
        if device._upload is None:
            device._upload = (upload, records)
        original(device)

    simulator.SimulatedDevice._send_upload = send_upload


async def measure(port: int, devices: int, records: int, warmup: float, seconds: float,
                  serial_base: int, rate: float | None) -> None:
    fleet = Fleet(
        reactor,
        endpoint_connect(lambda: TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=30)),
        devices,
        DeviceSettings(records=records, uploads=0, reply_timeout=60,
                       interval=devices / rate if rate else 0.0, spread=bool(rate)),
        serial_base,
    )
    _cheap_uploads(records)
    running = Deferred.fromCoroutine(fleet.run())
    await task.deferLater(reactor, warmup, lambda: None)
    stats = fleet.stats
    # The window opens once as many connections and commits as devices have
    # been counted (running totals: reconnects count, as do fast devices'
    # second commits), so the connection storm is over before it.
    for _ in range(600):
        if stats.connected >= devices and stats.uploads >= devices:
            break
        await task.deferLater(reactor, 0.1, lambda: None)
    records_before, uploads_before, latencies_before = stats.records, stats.uploads, len(stats.latencies)
    reconnects_before = stats.reconnects
    print("measuring", flush=True)
    started = time.monotonic()
    await task.deferLater(reactor, seconds, lambda: None)
    elapsed = time.monotonic() - started
    window = stats.latencies[latencies_before:]
    result = {
        "records": stats.records - records_before,
        "uploads": stats.uploads - uploads_before,
        "seconds": elapsed,
        "withheld": stats.withheld,
        "reconnects": stats.reconnects - reconnects_before,
        "p50": percentile(window, 50) * 1000,
        "p99": percentile(window, 99) * 1000,
    }
    print(json.dumps(result), flush=True)
    fleet.stop()
    await running


def main() -> None:
    # The load's own collections would show in its latencies as the relay's.
    gc.set_threshold(10_000, 20, 100)
    port, devices, records = (int(v) for v in sys.argv[1:4])
    warmup, seconds = float(sys.argv[4]), float(sys.argv[5])
    serial_base = int(sys.argv[6])
    rate = float(sys.argv[7]) if len(sys.argv) > 7 else None
    done = Deferred.fromCoroutine(measure(port, devices, records, warmup, seconds, serial_base, rate))
    done.addErrback(lambda failure: sys.stderr.write(failure.getTraceback()))
    done.addBoth(lambda _: reactor.stop())
    reactor.run()


if __name__ == "__main__":
    main()
