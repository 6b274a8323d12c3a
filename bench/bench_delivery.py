"""
Instructions (and CPU) per upload of the machinery around a delivery.

Like bench_pipeline.py, but wired as the daemon wires it: the registry's
profile cache and activity batch (on an in-memory registry), the retry
policy, the commit timeout and the metrics, live view and fleet activity
observers.  The connector accepts at once and builds no JSON (``--json``
adds it), so what remains is decoding, the session, the route and the
observers.  For instruction counts run it under callgrind twice, with
``--uploads N`` and ``2N``, and divide the difference by N.  By default
each of the 500 devices' uploads stays in flight until every device has
sent one, as with a real end server.

    python bench/bench_delivery.py [--uploads 20000] [--json] [--at-once]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock

from oemrelay.activity import FleetActivity
from oemrelay.codec import COMMIT_REQUEST
from oemrelay.events import Observers
from oemrelay.live import LiveHub
from oemrelay.metrics import RelayMetrics
from oemrelay.oem_json import oem_document
from oemrelay.registry.hot_path import RelayLedger
from oemrelay.relay import DeviceProfile, Relay, StatelessLink
from oemrelay.retry import RetryPolicy
from oemrelay.session import DeviceFactory
from tests.vectors import capture

sys.path.insert(0, os.path.dirname(__file__))
from bench_pipeline import greeted_devices  # noqa: E402

#: Long: the reactor's clock is real time, and under callgrind a round of
#: uploads in flight takes many seconds; none may time out.
COMMIT_TIMEOUT = 3600


class MemoryRegistry:
    """Every device known, with custom fields; activity writes counted."""

    def __init__(self) -> None:
        self.devices = self
        self.activity_rows = 0

    def profiles_for(self, serials):
        return succeed({serial: DeviceProfile("key", "", "", None, True) for serial in serials})

    def record_activity(self, rows):
        self.activity_rows += len(rows)
        return succeed(None)

    def on_devices_changed(self, listener):
        pass

    def _nothing(self, *args):
        return succeed(None)

    record_presence = _nothing
    due_commands = command_sent = command_result = _nothing


class Sink:
    """
    Accepts every upload: at once, or (as an end server over the network
    does) later, when :meth:`answer` is called: then as many deliveries are
    in flight together as there are devices.
    """

    name = "sink"

    def __init__(self, json: bool, at_once: bool) -> None:
        self.bytes = 0
        self._json = json
        self._at_once = at_once
        self._pending: list[Deferred] = []
        self._link = StatelessLink(self.deliver)

    def open_link(self, hello, on_lost):
        return self._link

    def deliver(self, upload, profile):
        if self._json:
            self.bytes += len(oem_document(upload.hello, upload.records))
        if self._at_once:
            return succeed(None)
        answer = Deferred()
        self._pending.append(answer)
        return answer

    def answer(self) -> None:
        pending, self._pending = self._pending, []
        for answer in pending:
            answer.callback(None)


def run(uploads: int, json: bool, at_once: bool = False, small: bool = False) -> None:
    # The real reactor, not run: its timers are a heap as in the daemon
    # (task.Clock sorts a list on every callLater, which would dominate).
    from twisted.internet import reactor as clock

    registry = MemoryRegistry()
    ledger = RelayLedger(registry, clock, 60)
    # The batch is flushed below every 2,000 uploads (a second of the daemon
    # at 500 devices), not by real time: callgrind runs 50 times slower.
    ledger.activity.clock = Clock()
    ledger.activity.startService()
    observers = Observers()
    metrics = RelayMetrics()
    observers.subscribe(metrics)
    observers.subscribe(LiveHub(clock))
    observers.subscribe(FleetActivity(clock))
    sink = Sink(json, at_once)
    factory = DeviceFactory(
        Relay(
            {"sink": sink},
            "sink",
            ledger,
            clock=clock,
            observers=observers,
            retry=RetryPolicy(clock),
            commit_timeout=COMMIT_TIMEOUT,
        ),
        clock,
        commit_timeout=COMMIT_TIMEOUT,
        idle_timeout=600,
        max_message=65535,
    )
    data = (
        (b"" if small else capture("data-0x04-12-records-2017-auckland"))
        + capture("data-0x04-2-records-2021-denmark")
        + COMMIT_REQUEST
    )
    devices = 500
    sessions = greeted_devices(factory, devices)

    started_cpu = time.process_time()
    for i in range(uploads):
        protocol, transport = sessions[i % devices]
        protocol.dataReceived(data)
        if i % devices == devices - 1:
            sink.answer()  # every device's upload was in flight: accept them
            for _, transport in sessions:
                transport.clear()
            clock.runUntilCurrent()  # due timers fire
        if i % 2000 == 1999:
            ledger.activity.flush()
    cpu = time.process_time() - started_cpu
    print(f"uploads            {uploads}")
    print(f"activity rows      {registry.activity_rows}")
    # Must be 0: a commit timing out (real time) would change the work done.
    withheld = metrics.registry.get_sample_value("oemrelay_commits_withheld_total", {"kind": "timeout"})
    print(f"timed out          {int(withheld or 0)}")
    print(f"CPU per upload     {cpu / max(uploads, 1) * 1e6:.1f} µs")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--uploads", type=int, default=20000)
    parser.add_argument("--json", action="store_true", help="build the OEM JSON too")
    parser.add_argument(
        "--at-once", action="store_true", help="accept each upload at once (none in flight)"
    )
    parser.add_argument(
        "--small", action="store_true", help="2 records per upload, not 14: less decoding"
    )
    arguments = parser.parse_args()
    run(arguments.uploads, arguments.json, arguments.at_once, arguments.small)
