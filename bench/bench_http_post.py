"""
CPU cost of the HTTP connector's delivery path per POST, for instruction counts.

Starts a minimal keep-alive HTTP server in a child process (answering every
POST ``200`` with an empty body), then delivers one real upload ``--posts``
times through the connector ``build_connector`` makes (the real client,
real sockets on loopback), ``--concurrency`` at a time.  Run it under
callgrind twice, with ``--posts 0`` and with ``--posts N``, and divide the
difference by N:

    valgrind --tool=callgrind --callgrind-out-file=/tmp/a.out \\
        python bench/bench_http_post.py --posts 2000
    callgrind_annotate /tmp/a.out | head -20

The connector's interface is the same before and after the lean client, so
the script measures either tree: ``OEMRELAY_TREE=/path/to/other/checkout``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

# The tree to measure: OEMRELAY_TREE (another checkout), else this one.
sys.path.insert(0, os.environ.get("OEMRELAY_TREE", os.path.join(os.path.dirname(__file__), "..")))

SERVER = r"""
import asyncio, sys

ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"

class Answering(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport, self.buffer = transport, b""

    def data_received(self, data):
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buffer[:end].lower()
            length = int(head.split(b"content-length:")[1].split(b"\r\n")[0])
            if len(self.buffer) < end + 4 + length:
                return
            self.buffer = self.buffer[end + 4 + length:]
            self.transport.write(ANSWER)

async def main():
    server = await asyncio.get_running_loop().create_server(Answering, "127.0.0.1", 0)
    print(server.sockets[0].getsockname()[1], flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


class ClientOnly:
    """POSTs the same prepared request through a connector's client, as the connector would."""

    def __init__(self, connector, url: str) -> None:
        from oemrelay.connectors import http

        self._client = connector._client
        self._url = url
        self._timeout = connector._config.timeout
        self._headers = {
            b"Content-Type": [b"application/json"],
            b"X-Api-Key": [b"key-1"],
            b"Idempotency-Key": [b"0123456789abcdef0123456789abcdef"],
        }
        self._body = b'{"SerNo": 129336, "Records": []}' * 40
        self._treq = hasattr(http, "CappedAgent")  # the tree before the lean client

    def deliver(self, upload, profile):
        if self._treq:
            sent = self._client.post(
                self._url, data=self._body, headers=self._headers, allow_redirects=False
            )
            return sent.addCallback(lambda response: response.content())
        return self._client.post(self._url, self._headers, self._body, self._timeout)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--posts", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument(
        "--client-only",
        action="store_true",
        help="POST a prepared body through the connector's HTTP client alone"
        " (treq's for a tree before the lean client), without the OEM JSON",
    )
    args = parser.parse_args()

    from twisted.internet import reactor
    from twisted.internet.defer import Deferred

    from oemrelay.codec import FrameDecoder, parse_data_records, parse_hello
    from oemrelay.config import config_from_string
    from oemrelay.connectors import build_connector
    from oemrelay.relay import DeviceProfile, Upload
    from tests.vectors import capture

    import oemrelay

    print(f"measuring {os.path.dirname(oemrelay.__file__)}", file=sys.stderr)

    server = subprocess.Popen(
        [sys.executable, "-c", SERVER], stdout=subprocess.PIPE, text=True
    )
    port = int(server.stdout.readline())
    config = config_from_string(
        f"[connector:bench]\ntype = http\nurl = http://127.0.0.1:{port}/dm/[SERIAL]\ntimeout = 600\n"
        "header1 = X-Api-Key: [CUSTOM1]\n"
    ).connectors["bench"]
    connector = build_connector(config, reactor, 65535)
    if args.client_only:
        connector = ClientOnly(connector, f"http://127.0.0.1:{port}/dm/129336")
    hello = parse_hello(FrameDecoder().feed(capture("hello-49-byte-dart"))[0].payload)
    data = FrameDecoder().feed(capture("data-0x04-12-records-2017-auckland"))[0]
    upload = Upload(hello, (data,), tuple(parse_data_records(data.payload)), 0.0)
    profile = DeviceProfile("key-1")
    left = [args.posts]
    finished: Deferred = Deferred()
    failures: list = []

    def one_more(_=None) -> None:
        if left[0] == 0:
            return
        left[0] -= 1
        delivered = connector.deliver(upload, profile)
        delivered.addErrback(failures.append)
        delivered.addBoth(lambda _: one_more() if left[0] else done_one())

    running = [min(args.concurrency, args.posts)]

    def done_one(_=None) -> None:
        running[0] -= 1
        if running[0] == 0 and not finished.called:
            finished.callback(None)

    def start() -> None:
        started = time.process_time()
        if args.posts == 0:
            finished.callback(None)
        for _ in range(running[0]):
            one_more()

        def report(_) -> None:
            spent = time.process_time() - started
            if args.posts:
                print(
                    f"{args.posts} POSTs, {len(failures)} failed:"
                    f" {spent / args.posts * 1e6:.1f} us CPU each (wall-clock CPU, noisy)",
                    file=sys.stderr,
                )
            if failures:
                print(failures[0], file=sys.stderr)
            reactor.stop()

        finished.addCallback(report)

    reactor.callWhenRunning(start)
    try:
        reactor.run()
    finally:
        server.kill()


if __name__ == "__main__":
    main()
