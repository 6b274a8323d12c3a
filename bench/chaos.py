"""
The chaos run: the real daemon, hundreds of simulated devices for a minute,
an end server that fails 20 % of POSTs (503) and answers 5 % only after the
connector's timeout; once with retries inside the commit window (the
defaults) and once without (``retry_max = 0``, DM's behaviour).

Counts per run: records sent by the devices, committed to them, accepted by
the end server, accepted more than once (duplicates), lost (committed but
never accepted: must be 0), withheld commits and device reconnects.  With
``--write FILE`` the counts replace the table in ``FILE``
(docs/reliability.rst).  Loopback only; not part of the test suite.

    python bench/chaos.py [--devices 300] [--seconds 60] [--write docs/reliability.rst]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

from bench_fleet import (  # noqa: E402
    free_port, loopback_fleet, spawn_relay, wait_for_relay, write_relay_config,
)
from twisted.internet import defer, reactor, task  # noqa: E402

from oemrelay.simulator import DeviceSettings  # noqa: E402

#: The connector's timeout; a "late" answer comes after it.
CONNECTOR_TIMEOUT = 2.0

CHAOTIC_END_SERVER = textwrap.dedent(
    """
    import json, random, sys
    from twisted.internet import reactor, task
    from twisted.web import resource, server

    FAIL, LATE, LATE_AFTER, COUNTS = float(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
    seen, counts = set(), {"posts": 0, "accepted": 0, "duplicates": 0, "failed": 0, "late": 0}
    chance = random.Random(7)

    def accept(document):
        for record in document["Records"]:
            key = (document["SerNo"], record["SeqNo"])
            counts["accepted"] += 1
            if key in seen:
                counts["duplicates"] += 1
            seen.add(key)

    class Chaos(resource.Resource):
        isLeaf = True
        def render_POST(self, request):
            counts["posts"] += 1
            document = json.loads(request.content.read())
            roll = chance.random()
            if roll < FAIL:
                counts["failed"] += 1
                request.setResponseCode(503)
                return b"busy"
            if roll < FAIL + LATE:
                counts["late"] += 1
                def late():
                    accept(document)  # processed, though the relay gave up
                    if not request._disconnected:
                        request.setResponseCode(204)
                        request.finish()
                reactor.callLater(LATE_AFTER, late)
                request.notifyFinish().addErrback(lambda _: None)
                return server.NOT_DONE_YET
            accept(document)
            request.setResponseCode(204)
            return b""

    def write():
        with open(COUNTS + ".tmp", "w") as f:
            json.dump(counts, f)
        import os; os.replace(COUNTS + ".tmp", COUNTS)

    site = server.Site(Chaos())
    site.noisy = False
    port = reactor.listenTCP(0, site, interface="127.0.0.1", backlog=1024)
    task.LoopingCall(write).start(0.5)
    print(port.getHost().port, flush=True)
    reactor.run()
    """
)


async def one_run(devices: int, seconds: float, records: int, retries: bool, workdir: str) -> dict:
    """One chaos run; its counts."""
    counts_file = os.path.join(workdir, "counts.json")
    end_server = subprocess.Popen(
        [sys.executable, "-c", CHAOTIC_END_SERVER, "0.20", "0.05",
         str(CONNECTOR_TIMEOUT + 1), counts_file],
        stdout=subprocess.PIPE, text=True,
    )
    end_port = int(end_server.stdout.readline())
    relay_port = free_port()
    config = write_relay_config(
        workdir,
        relay_port,
        end_port,
        "commit_timeout = 10\n" + ("" if retries else "retry_max = 0\n"),
        f"timeout = {CONNECTOR_TIMEOUT:g}\n",
    )
    relay = spawn_relay(config, workdir)
    try:
        await wait_for_relay(relay_port)
        fleet = loopback_fleet(
            relay_port,
            devices,
            # A device that was not committed comes back after 5 s, much
            # sooner than a battery tracker would: the run counts reconnects.
            DeviceSettings(records=records, uploads=0, interval=1.0, backoff=5.0, reply_timeout=30),
        )
        running = defer.Deferred.fromCoroutine(fleet.run())
        await task.deferLater(reactor, seconds, lambda: None)
        fleet.stop()
        summary = await running
        # Let late answers and deliveries in flight end before counting.
        await task.deferLater(reactor, CONNECTOR_TIMEOUT + 10, lambda: None)
        with open(counts_file) as f:
            server = json.load(f)
        alive = relay.poll() is None
    finally:
        relay.terminate()
        end_server.terminate()
        relay.wait(30)
        end_server.wait(10)
    committed = summary["records_committed"]
    distinct_accepted = server["accepted"] - server["duplicates"]
    return {
        "uploads sent": summary["uploads"] + summary["withheld"],
        "records sent": (summary["uploads"] + summary["withheld"]) * records,
        "records committed": committed,
        "records accepted": server["accepted"],
        "duplicates": server["duplicates"],
        # Committed records the end server never accepted (a lower bound
        # from the counts: committed above distinct accepted).
        "lost": max(0, committed - distinct_accepted),
        "POSTs": server["posts"],
        "withheld commits": summary["withheld"],
        "device reconnects": summary["reconnects"],
        "relay survived": "yes" if alive else "NO",
    }


def table(devices: int, seconds: float, records: int, with_retries: dict, without: dict) -> str:
    """The reST table of both runs and the reconnects the retries saved."""
    rows = [(name, str(with_retries[name]), str(without[name])) for name in with_retries]
    saved = without["device reconnects"] - with_retries["device reconnects"]
    rows.append(("reconnects saved by retries", str(saved), ""))
    widths = [max(len(row[i]) for row in rows + [HEADER]) for i in range(3)]
    rule = "  ".join("=" * width for width in widths)
    lines = [rule, "  ".join(h.ljust(w) for h, w in zip(HEADER, widths)), rule]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.append(rule)
    intro = (
        f"{devices} simulated devices for {seconds:g} s, {records} records per upload,"
        " commit_timeout 10 s, connector timeout 2 s; the end server answers 20 % of"
        " POSTs 503 and 5 % only after 3 s.  Regenerate with"
        f" ``python bench/chaos.py --devices {devices} --seconds {seconds:g}"
        " --write docs/reliability.rst``."
    )
    return f"{BEGIN}\n\n{intro}\n\n" + "\n".join(lines) + f"\n\n{END}"


HEADER = ("count", "retries (defaults)", "no retries (retry_max = 0)")
BEGIN = ".. chaos-table-begin"
END = ".. chaos-table-end"


def write_into(path: str, text: str) -> None:
    """Replace the text between the chaos-table markers in ``path``."""
    with open(path, encoding="utf-8") as f:
        document = f.read()
    start, end = document.index(BEGIN), document.index(END) + len(END)
    with open(path, "w", encoding="utf-8") as f:
        f.write(document[:start] + text + document[end:])


async def main_async(args) -> None:
    runs = []
    for retries in (True, False):
        with tempfile.TemporaryDirectory() as workdir:
            runs.append(await one_run(args.devices, args.seconds, args.records, retries, workdir))
    text = table(args.devices, args.seconds, args.records, *runs)
    print(text)
    if args.write:
        write_into(args.write, text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=300)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--records", type=int, default=10, help="records per upload")
    parser.add_argument("--write", help="the .rst file whose chaos table to replace")
    args = parser.parse_args()
    done = defer.Deferred.fromCoroutine(main_async(args))
    done.addErrback(lambda failure: print(failure.getTraceback()))
    done.addBoth(lambda _: reactor.stop())
    reactor.run()


if __name__ == "__main__":
    main()
