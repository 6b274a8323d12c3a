"""
The real daemon under a simulated fleet, on loopback: records per second and
the relay's own CPU time per record.

Starts an HTTP end server (a separate process answering 204), the relay
(``twistd oemrelay``, http connector, SQLite registry in a temp dir) and, in
this process, a fleet of ``--devices`` simulated devices (oemrelay.simulator,
the same as ``oemrelay simulate``): each says hello once, then uploads
``--records`` realistic records and a commit request and waits for the commit
answer, again and again, for ``--seconds`` after a two-second warm-up.  The
relay's CPU time is read from /proc before and after.  Loopback only; bounded
in count and time.

    python bench/bench_fleet.py [--devices 200] [--seconds 20] [--records 14]
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import textwrap
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))

from twisted.internet import defer, reactor, task  # noqa: E402
from twisted.internet.endpoints import TCP4ClientEndpoint  # noqa: E402

from oemrelay.simulator import DeviceSettings, Fleet, endpoint_connect, percentile  # noqa: E402

SINK = textwrap.dedent(
    """
    import sys
    from twisted.internet import reactor
    from twisted.web import resource, server

    class Sink(resource.Resource):
        isLeaf = True
        def render_POST(self, request):
            request.content.read()
            request.setResponseCode(204)
            return b""

    site = server.Site(Sink())
    site.noisy = False
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    print(port.getHost().port, flush=True)
    reactor.run()
    """
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_relay_config(
    workdir: str, relay_port: int, end_port: int, relay_keys: str = "", connector_keys: str = ""
) -> str:
    """A relay.ini in ``workdir`` posting to 127.0.0.1:``end_port``; its path."""
    config = os.path.join(workdir, "relay.ini")
    with open(config, "w") as f:
        f.write(
            f"[relay]\nlisten = tcp:{relay_port}:interface=127.0.0.1\n"
            f"registry = sqlite:{workdir}/registry.sqlite\n{relay_keys}"
            f"[connector:main]\ntype = http\n{connector_keys}"
            f"url = http://127.0.0.1:{end_port}/dm/[SERIAL]\n"
        )
    return config


def spawn_relay(config: str, workdir: str, twistd_options: list[str] = ()) -> subprocess.Popen:
    """``twistd -n oemrelay -c config`` of this tree, logging to workdir/relay.log."""
    return subprocess.Popen(
        [sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
         "-n", "--pidfile=", "--logfile", os.path.join(workdir, "relay.log"),
         *twistd_options, "oemrelay", "-c", config],
        cwd=workdir,
        # The plugin and package of this tree, wherever it runs from.
        env=dict(os.environ, PYTHONPATH=os.path.join(HERE, "..")),
    )


async def wait_for_relay(port: int) -> None:
    """Wait until the relay accepts connections on ``port`` (15 s at most)."""
    deadline = time.monotonic() + 15
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise SystemExit("the relay did not start; see relay.log")
            await task.deferLater(reactor, 0.2, lambda: None)


def loopback_fleet(relay_port: int, devices: int, settings: DeviceSettings) -> Fleet:
    """``devices`` simulated devices connecting to 127.0.0.1:``relay_port``."""
    return Fleet(
        reactor,
        endpoint_connect(lambda: TCP4ClientEndpoint(reactor, "127.0.0.1", relay_port)),
        devices,
        settings,
    )


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def relay_cpu_seconds(pid: int) -> float:
    """The CPU time of the relay and its worker processes."""
    total = cpu_seconds(pid)
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            children = [int(child) for child in f.read().split()]
    except OSError:
        children = []
    for child in children:
        try:
            total += cpu_seconds(child)
        except OSError:
            pass  # ended meanwhile
    return total


async def run(devices: int, seconds: float, records: int, workdir: str, workers: int = 1) -> None:
    sink = subprocess.Popen(
        [sys.executable, "-c", SINK], stdout=subprocess.PIPE, text=True
    )
    sink_port = int(sink.stdout.readline())
    relay_port = free_port()
    config = write_relay_config(workdir, relay_port, sink_port, f"workers = {workers}\n")
    relay = spawn_relay(
        config,
        workdir,
        ["--profile", os.environ["RELAY_PROFILE"], "--profiler", "cprofile", "--savestats"]
        if os.environ.get("RELAY_PROFILE") else [],
    )
    try:
        await wait_for_relay(relay_port)
        fleet = loopback_fleet(
            relay_port, devices, DeviceSettings(records=records, uploads=0, reply_timeout=30)
        )
        running = defer.Deferred.fromCoroutine(fleet.run())
        await task.deferLater(reactor, 2, lambda: None)  # warm up
        records_before, cpu_before = fleet.stats.records, relay_cpu_seconds(relay.pid)
        latencies_before = len(fleet.stats.latencies)
        started = time.monotonic()
        await task.deferLater(reactor, seconds, lambda: None)
        elapsed = time.monotonic() - started
        committed = fleet.stats.records - records_before
        cpu = relay_cpu_seconds(relay.pid) - cpu_before
        measured = fleet.stats.latencies[latencies_before:]
        fleet.stop()
        summary = await running
        print(f"devices               {devices}")
        print(f"seconds               {elapsed:.1f}")
        print(f"records per upload    {records}")
        print(f"workers               {workers}")
        print(f"records committed     {committed}")
        print(f"records/s             {committed / elapsed:,.0f}")
        print(f"withheld, reconnects  {summary['withheld']}, {summary['reconnects']}")
        print(f"commit latency p50    {percentile(measured, 50) * 1000:.1f} ms")
        print(f"commit latency p99    {percentile(measured, 99) * 1000:.1f} ms")
        print(f"relay CPU per record  {cpu / max(committed, 1) * 1e6:.1f} µs")
        print(f"relay CPU use         {cpu / elapsed * 100:.0f}% of one core")
    finally:
        relay.terminate()
        sink.terminate()
        relay.wait(10)
        sink.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--records", type=int, default=14, help="records per upload")
    parser.add_argument("--workers", type=int, default=1, help="[relay] workers")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        done = defer.Deferred.fromCoroutine(run(args.devices, args.seconds, args.records, workdir, args.workers))
        done.addErrback(lambda failure: print(failure.getTraceback()))
        done.addBoth(lambda _: reactor.stop())
        reactor.run()


if __name__ == "__main__":
    main()
