"""
Hold many simulated devices connected after their hello, for the benchmark's
connected-devices row: ``python bench/hold.py HOST PORT COUNT SERIAL_BASE``.

Connects COUNT devices to the relay on HOST:PORT (127.0.0.1 or ::1) (at most 2,000
connecting at once), each sending its hello and waiting for the hello
response; prints one JSON line (how many are connected, the hello round
trip p99 in ms, and the devices that failed by reason) once all answered or
failed, then holds them until SIGTERM.
"""

from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from twisted.internet import reactor  # noqa: E402
from twisted.internet.defer import Deferred, DeferredSemaphore  # noqa: E402
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, connectProtocol  # noqa: E402
from twisted.internet.protocol import Protocol  # noqa: E402

from oemrelay.simulator import percentile, simulated_hello  # noqa: E402

#: Devices connecting at once (the listen backlog and SYN queue stay sane).
CONNECTING = 2000


class _Holder(Protocol):
    def __init__(self, serial: int) -> None:
        self._serial = serial
        self.answered: Deferred[float] = Deferred()

    def connectionMade(self) -> None:  # noqa: N802
        self._sent = time.monotonic()
        self.transport.write(simulated_hello(self._serial).to_frame())

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        if not self.answered.called:
            self.answered.callback(time.monotonic() - self._sent)

    def connectionLost(self, reason) -> None:  # noqa: N802
        if not self.answered.called:
            self.answered.errback(reason)


def main() -> None:
    host = sys.argv[1]
    port, count, base = (int(value) for value in sys.argv[2:5])
    endpoint = (TCP6ClientEndpoint if ":" in host else TCP4ClientEndpoint)(reactor, host, port, timeout=60)
    gate = DeferredSemaphore(CONNECTING)
    round_trips: list[float] = []
    failures: dict[str, int] = {}
    held = []

    async def one(serial: int) -> None:
        await gate.acquire()
        try:
            holder = _Holder(serial)
            held.append(holder)
            await connectProtocol(endpoint, holder)
            round_trips.append(await holder.answered)
        except Exception as error:
            reason = type(error).__name__
            failures[reason] = failures.get(reason, 0) + 1
        finally:
            gate.release()

    async def run() -> None:
        from twisted.internet.defer import gatherResults

        await gatherResults([Deferred.fromCoroutine(one(base + n)) for n in range(count)])
        print(json.dumps({
            "connected": len(round_trips),
            "failed": failures,
            "hello_p99_ms": percentile(round_trips, 99) * 1000,
        }), flush=True)

    reactor.callWhenRunning(lambda: Deferred.fromCoroutine(run()))
    reactor.run()


if __name__ == "__main__":
    main()
