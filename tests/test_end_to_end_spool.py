"""
End-to-end tests of the spool: the real daemon delivers what waits in its
spool file or PostgreSQL schema, in order, across a SIGKILL and a restart,
to real loopback end servers; two relays share one PostgreSQL spool.

Some uploads are put into the spool by the test itself, to prove the
daemon's half (nothing spooled is lost or reordered); the rest come from
devices, through ``commit_policy = spooled`` and best-effort connectors.
"""

from __future__ import annotations

import json
import os
import time

from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.web.server import Site

from oemrelay.codec import MessageType
from oemrelay.spool import DatabaseSpool

from .postgres import fresh_schema_url
from .test_end_to_end import (
    AUCKLAND as AUCKLAND_BYTES,
    AUCKLAND_SEQ,
    COMMIT_REQUEST,
    DART_HELLO,
    DENMARK as DENMARK_BYTES,
    DENMARK_SEQ,
    FIXED_SEQ,
    LISTEN,
    LOOPBACK,
    START_TIMEOUT,
    _HttpEndServer,
    _RelayTestCase,
    seq_numbers,
    unused_port,
)
from .test_spool import AUCKLAND, DART, DENMARK, device, upload_of

FIXED = "fixed64-0x10-2-records-G50"


def spool_config(spool_url: str, connector: str) -> str:
    return f"""\
[relay]
listen = {LISTEN}
connector = platform
spool = {spool_url}
commit_timeout = 10
idle_timeout = 30

[connector:platform]
{connector}
"""


def http_connector(port: int, timeout: float = 2) -> str:
    return f"type = http\nurl = http://{LOOPBACK}:{port}/dm\ntimeout = {timeout}\n"


class _SpoolTestCase(_RelayTestCase):
    async def spool_at(self, url: str) -> DatabaseSpool:
        """The test's own handle on the daemon's spool."""
        spool = DatabaseSpool.from_url(url, reactor, max_records=10_000, owner="test")
        self.addCleanup(spool.close)
        await spool.start()
        return spool

    async def put_three(self, spool: DatabaseSpool, hello=DART) -> list[int]:
        """Three uploads of one device; the sequence numbers in the order sent."""
        for name in (DENMARK, AUCKLAND, FIXED):
            await spool.put(upload_of(hello, name, received_at=time.time()), ("platform",))
        return DENMARK_SEQ + AUCKLAND_SEQ + FIXED_SEQ

    def http_server_on(self, port: int) -> _HttpEndServer:
        """An HTTP end server on a chosen port (the relay's configured URL)."""
        server = _HttpEndServer(self.reactor, self.events)
        site = Site(server)
        site.noisy = False
        listening = self.reactor.listenTCP(port, site, interface=LOOPBACK)
        self.addCleanup(listening.stopListening)
        server.port = port
        return server

    async def wait_empty(self, spool: DatabaseSpool) -> None:
        """Wait until nothing is left in the spool (delivered rows are deleted after the answer)."""
        for _ in range(200):
            if (await spool.stats()).depth == 0:
                return
            await deferLater(self.reactor, 0.05, lambda: None)
        self.fail(f"the spool still holds {(await spool.stats()).depth} uploads")


class SpoolEndToEndTests(_SpoolTestCase):
    """The daemon with an SQLite spool."""

    timeout = 60

    async def test_delivered_in_order_across_sigkill(self) -> None:
        """With the end server down the relay is SIGKILLed; restarted, it delivers every record once, in order."""
        path = os.path.abspath(self.mktemp())
        spool = await self.spool_at(f"sqlite:{path}")
        expected = await self.put_three(spool)
        port = unused_port()
        config = spool_config(f"sqlite:{path}", http_connector(port))
        await self.start_daemon(config)
        await self.wait_until(
            lambda: b"failed (try 1)" in self.daemon.output,
            "the relay to fail its first try",
            START_TIMEOUT,
        )
        self.daemon_process.signalProcess("KILL")
        await self.wait_until(lambda: self.daemon.ended, "the relay to die")
        self.assertEqual((await spool.stats()).depth, 3)

        server = self.http_server_on(port)
        await self.start_daemon(config)
        await self.wait_until(lambda: len(server.requests) == 3, "three POSTs", START_TIMEOUT)
        self.assertEqual(
            [seq for request in server.requests for seq in seq_numbers(request.body)], expected
        )
        await self.wait_empty(spool)

    async def test_raw_tcp_under_the_spool(self) -> None:
        """Spooled uploads reach a raw TCP end server each on its own connection: hello, frames, commit."""
        path = os.path.abspath(self.mktemp())
        spool = await self.spool_at(f"sqlite:{path}")
        for name in (DENMARK, AUCKLAND):
            await spool.put(upload_of(DART, name, received_at=time.time()), ("platform",))
        server = self.start_dm_server()
        endpoint = f"tcp:host={LOOPBACK}:port={server.port}:timeout=5"
        await self.start_daemon(spool_config(f"sqlite:{path}", f"type = tcp\nendpoint = {endpoint}\n"))
        await self.wait_until(
            lambda: self.events.count(("tcp", "answered")) == 2, "two commits", START_TIMEOUT
        )
        await self.wait_until(
            lambda: all(c.closed for c in server.connections), "the connections to close"
        )
        self.assertEqual(len(server.connections), 2)
        for connection, name in zip(server.connections, (DENMARK, AUCKLAND)):
            expected = DART_HELLO + b"".join(
                frame.to_bytes() for frame in upload_of(DART, name).frames
            ) + COMMIT_REQUEST
            self.assertEqual(bytes(connection.received), expected)
        await self.wait_empty(spool)

    async def test_unopenable_spool_exits_1(self) -> None:
        """A spool that cannot be opened stops the relay with status 1 and one line naming it."""
        path = os.path.abspath(self.mktemp())
        with open(path, "wb") as garbage:
            garbage.write(b"not a database" * 100)
        config = spool_config(f"sqlite:{path}", http_connector(unused_port()))
        daemon, _ = self.spawn_twistd(self.write_config(config))
        self.daemon = daemon
        await self.wait_until(lambda: daemon.ended, "the relay to exit", START_TIMEOUT)
        self.assertEqual(daemon.exit_code, 1)
        self.assertIn(f"cannot open spool sqlite:{path}: ".encode(), daemon.output)


class SharedPostgreSQLSpoolTests(_SpoolTestCase):
    """Two relays on one PostgreSQL spool; one of them is SIGKILLed."""

    timeout = 90

    async def test_other_relay_delivers_what_the_dead_one_held(self) -> None:
        """What a killed relay had claimed is delivered by the other once the lease ends; the rest at once."""
        url = await fresh_schema_url(self)
        spool = await self.spool_at(url)
        hanging = self.start_http_server(delay=600)
        await self.put_three(spool, device(1))
        await self.put_three(spool, device(2))
        await self.start_daemon(spool_config(url, http_connector(hanging.port, timeout=50)))
        # Relay A claims one upload of each device and hangs on them.
        await self.wait_until(lambda: len(hanging.requests) == 2, "A's two POSTs", START_TIMEOUT)
        self.daemon_process.signalProcess("KILL")
        await self.wait_until(lambda: self.daemon.ended, "relay A to die")

        server = self.start_http_server()
        await self.start_daemon(spool_config(url, http_connector(server.port)))
        # A's leases hold each device's first upload, so B must not pass them.
        await self.wait_until(lambda: b"spool postgresql" in self.daemon.output, "B's spool")
        await deferLater(self.reactor, 2.5, lambda: None)  # two delivery rounds
        self.assertEqual(server.requests, [])
        # As if the lease had run out (it is 120 s): B takes the uploads over.
        await spool._pool.runOperation("UPDATE spooled SET lease_until = 0 WHERE lease_owner <> 'test'")
        await self.wait_until(lambda: len(server.requests) == 6, "six POSTs", START_TIMEOUT)
        by_device: dict[str, list[int]] = {}
        for request in server.requests:
            records = seq_numbers(request.body)
            serial = json.loads(request.body)["SerNo"]
            by_device.setdefault(serial, []).extend(records)
        self.assertEqual(sorted(by_device.values()), [DENMARK_SEQ + AUCKLAND_SEQ + FIXED_SEQ] * 2)
        await self.wait_empty(spool)


class CommitPolicySpooledTests(_SpoolTestCase):
    """``commit_policy = spooled``: devices commit once their upload is in the spool."""

    timeout = 90

    def config(self, path: str, port: int, extra: str = "") -> str:
        return spool_config(f"sqlite:{path}", http_connector(port)).replace(
            "[relay]\n", f"[relay]\ncommit_policy = spooled\n{extra}", 1
        )

    def commits(self, device) -> int:
        return device.types().count(MessageType.COMMIT_RESPONSE)

    async def test_committed_while_down_delivered_after_sigkill(self) -> None:
        """End server down: the device is committed; after SIGKILL and restart every record arrives in order."""
        path, port = os.path.abspath(self.mktemp()), unused_port()
        relay_port = await self.start_daemon(self.config(path, port))
        device = await self.connect_device(relay_port)
        device.send(DART_HELLO, DENMARK_BYTES, COMMIT_REQUEST)
        await self.wait_until(lambda: self.commits(device) == 1, "the first commit")
        device.send(AUCKLAND_BYTES, COMMIT_REQUEST)
        await self.wait_until(lambda: self.commits(device) == 2, "the second commit")
        self.assertEqual([f.payload for f in device.frames if f.type == MessageType.COMMIT_RESPONSE], [b"\x01"] * 2)
        self.daemon_process.signalProcess("KILL")
        await self.wait_until(lambda: self.daemon.ended, "the relay to die")

        server = self.http_server_on(port)
        await self.start_daemon(self.config(path, port))
        # The backoff the first relay stored (1 s, doubling) holds across the restart.
        await self.wait_until(lambda: len(server.requests) == 2, "two POSTs", 40)
        self.assertEqual(
            [seq for request in server.requests for seq in seq_numbers(request.body)],
            DENMARK_SEQ + AUCKLAND_SEQ,
        )

    async def test_full_spool_withholds_commit(self) -> None:
        """With spool_max_records reached the next upload is not committed, and nothing is lost."""
        path, port = os.path.abspath(self.mktemp()), unused_port()
        relay_port = await self.start_daemon(self.config(path, port, "spool_max_records = 2\n"))
        device = await self.connect_device(relay_port)
        device.send(DART_HELLO, DENMARK_BYTES, COMMIT_REQUEST)
        await self.wait_until(lambda: self.commits(device) == 1, "the first commit")
        device.send(AUCKLAND_BYTES, COMMIT_REQUEST)
        await self.wait_until(lambda: device.closed, "the relay to close the device")
        self.assertEqual(self.commits(device), 1)
        self.assertIn(b"spool full", self.daemon.output)
        spool = await self.spool_at(f"sqlite:{path}")
        self.assertEqual((await spool.stats()).records, 2)
        server = self.http_server_on(port)
        await self.wait_until(lambda: len(server.requests) == 1, "the spooled POST", START_TIMEOUT)
        self.assertEqual(seq_numbers(server.requests[0].body), DENMARK_SEQ)


class BestEffortEndToEndTests(_SpoolTestCase):
    """A best-effort connector never holds a device back: its copy goes through the spool."""

    timeout = 60

    async def test_best_effort_down_commits_and_delivers_later(self) -> None:
        """The required end server accepts, the best-effort one is down: committed at once; the copy arrives when it is back."""
        path, copy_port = os.path.abspath(self.mktemp()), unused_port()
        required = self.start_http_server()
        config = spool_config(f"sqlite:{path}", http_connector(required.port)).replace(
            "connector = platform\n", "connector = platform copy\n", 1
        ) + f"\n[connector:copy]\n{http_connector(copy_port)}role = best_effort\n"
        relay_port = await self.start_daemon(config)
        device = await self.connect_device(relay_port)
        device.send(DART_HELLO, DENMARK_BYTES, COMMIT_REQUEST)
        await self.wait_until(lambda: device.got(MessageType.COMMIT_RESPONSE), "the commit")
        self.assertEqual(
            [f.payload for f in device.frames if f.type == MessageType.COMMIT_RESPONSE], [b"\x01"]
        )
        self.assertEqual([seq_numbers(request.body) for request in required.requests], [DENMARK_SEQ])
        copy = self.http_server_on(copy_port)
        await self.wait_until(lambda: len(copy.requests) == 1, "the spooled copy", 30)
        self.assertEqual(seq_numbers(copy.requests[0].body), DENMARK_SEQ)
        # The same records, the same key: an end server can drop a duplicate.
        key = copy.requests[0].headers["idempotency-key"]
        self.assertEqual(key, required.requests[0].headers["idempotency-key"])
        self.assertEqual(len(key[0]), 32)
