"""
End-to-end test of the many-devices layout (docs/deployment.rst): the real
HAProxy in front of two ``twistd oemrelay`` relays sharing one PostgreSQL
registry, HAProxy telling the relays each device's address with the PROXY
protocol (``send-proxy-v2``; the relays listen on ``haproxy:tcp:...``).

HAProxy (Debian package ``haproxy``; ``.ci/run`` installs it) is started by
the test with its own configuration, on loopback ports only, and stopped in
cleanup; where it is not installed the test is skipped saying so.  The relay
harness and the scripted devices come from :mod:`tests.test_end_to_end` and
:mod:`tests.test_end_to_end_registry`; the registry is a PostgreSQL schema
of the test's own (:mod:`tests.postgres`).
"""

from __future__ import annotations

import os
import re
import shutil
import time

from twisted.internet.error import ConnectError
from twisted.internet.task import deferLater
from twisted.trial.unittest import SkipTest

from oemrelay.codec import MessageType

from .postgres import fresh_schema_url
from .test_end_to_end import (
    AUCKLAND,
    AUCKLAND_SEQ,
    DART_HELLO,
    DART_SERIAL,
    DENMARK,
    DENMARK_SEQ,
    LISTEN,
    LOOPBACK,
    START_TIMEOUT,
    _Daemon,
    _Device,
    device_hello,
    seq_numbers,
    unused_port,
)
from .test_end_to_end_registry import (
    ASYNC_SESSION_COMPLETE,
    ASYNC_SESSION_REQUEST,
    _RegistryTestCase,
    _RelayProcess,
    async_response,
)

#: The second device's serial; the first is the Dart of the captures.
OTHER_SERIAL = 700001

#: The relays' device listener: the PROXY protocol (v1 or v2) in front of tcp.
HAPROXY_LISTEN = f"haproxy:{LISTEN}"


def haproxy_config(frontend_port: int, relays: list[_RelayProcess]) -> str:
    """
    HAProxy in TCP mode on ``frontend_port``, spreading devices over
    ``relays`` and sending each one the device's address (PROXY v2).  A
    connection a dead relay refuses is redispatched to another at once.
    """
    servers = "".join(
        f"    server {relay.name} {LOOPBACK}:{relay.device_port} send-proxy-v2\n"
        for relay in relays
    )
    return f"""\
global
    maxconn 1000

defaults
    mode tcp
    timeout connect 1s
    timeout client 60s
    timeout server 60s
    retries 2
    option redispatch 1

frontend devices
    bind {LOOPBACK}:{frontend_port}
    default_backend relays

backend relays
    balance roundrobin
{servers}"""


def plain_http_connector(name: str, port: int) -> str:
    """An http connector posting every upload to ``/dm/[SERIAL]``."""
    return f"[connector:{name}]\ntype = http\nurl = http://{LOOPBACK}:{port}/dm/[SERIAL]\ntimeout = 5\n"


class HAProxyEndToEndTests(_RegistryTestCase):
    """Devices through HAProxy to two relays with one PostgreSQL registry."""

    timeout = 90

    def setUp(self) -> None:
        super().setUp()
        # Behind the PROXY wrapper the listening line reads
        # "DeviceFactory (PROXY) starting on N".
        self.patch(_Daemon, "_LISTENING", re.compile(rb"DeviceFactory (?:\(PROXY\) )?starting on (\d+)"))

    async def start_haproxy(self, relays: list[_RelayProcess]) -> int:
        """Run HAProxy in front of ``relays``; its device port once it accepts."""
        haproxy = shutil.which("haproxy")
        if haproxy is None:
            raise SkipTest("haproxy is not installed (apt-get install haproxy; .ci/run does)")
        port = unused_port()
        config = self.path("haproxy.cfg")
        with open(config, "w", encoding="utf-8") as f:
            f.write(haproxy_config(port, relays))
        process = _Daemon()
        # -db: stay in the foreground; logs (none configured) would go to stderr.
        transport = self.reactor.spawnProcess(
            process, haproxy, [haproxy, "-db", "-f", config], env=dict(os.environ)
        )
        self.addCleanup(self._stop_daemon, process, transport)
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                probe = await self.connect_device(port, "probe")
                break
            except ConnectError:
                if process.ended or time.monotonic() > deadline:
                    self.fail(f"haproxy did not start: {process.output.decode('utf-8', 'replace')}")
                await deferLater(self.reactor, 0.05, lambda: None)
        probe.transport.loseConnection()
        await self.wait_until(lambda: probe.closed, "the probe connection to close")
        return port

    async def start_proxied_relay(self, connector: str, registry: str, node: str) -> _RelayProcess:
        """A relay named after ``node`` whose device listener expects the PROXY protocol."""
        config, token = self.relay_config(connector, registry=registry, default="platform", node=node)
        # The first listen line is [relay]'s; [api]'s stays plain.
        config = config.replace(f"listen = {LISTEN}", f"listen = {HAPROXY_LISTEN}", 1)
        return await self.start_relay(config, token, f"relay-{node[-1]}")

    async def hello_through(self, port: int, name: str, hello: bytes) -> _Device:
        """A device connected to HAProxy's ``port`` that has had its hello answered."""
        device = await self.connect_device(port, name)
        device.send(hello)
        await self.wait_until(lambda: device.got(MessageType.HELLO_RESPONSE), f"{name}'s 0x01")
        return device

    async def test_failover_through_haproxy_loses_nothing(self) -> None:
        """Through HAProxy: uploads from both relays, a command across relays, one relay killed, its device's uncommitted records delivered by the other."""
        registry = await fresh_schema_url(self)
        server = self.start_http_server()
        connector = plain_http_connector("platform", server.port)
        relays = [
            await self.start_proxied_relay(connector, registry, node) for node in ("node-a", "node-b")
        ]
        relay_a, relay_b = relays
        port = await self.start_haproxy(relays)

        # roundrobin: two devices land on the two relays; the registry says which.
        hellos = {DART_SERIAL: DART_HELLO, OTHER_SERIAL: device_hello(OTHER_SERIAL)}
        devices = {
            serial: await self.hello_through(port, f"device {serial}", hello)
            for serial, hello in hellos.items()
        }
        nodes = {}
        for serial in devices:
            shown = await self.api_until(
                relay_a, f"/api/devices/{serial}", lambda d: d["connected"], f"device {serial} connected"
            )
            nodes[serial] = shown["node"]
        self.assertEqual(sorted(nodes.values()), ["node-a", "node-b"])
        (on_a,) = [serial for serial, node in nodes.items() if node == "node-a"]
        (on_b,) = [serial for serial, node in nodes.items() if node == "node-b"]
        for device in devices.values():
            await self.upload(device, DENMARK)

        # A command queued through relay B reaches the device on relay A.
        commands = f"/api/devices/{on_a}/commands"
        code, queued = await self.api(relay_b, "POST", commands, {"type": "set_odometer", "metres": 5000})
        self.assertEqual(code, 202, queued)
        device_a = devices[on_a]
        device_a.send(ASYNC_SESSION_REQUEST)
        await self.wait_until(lambda: device_a.got(MessageType.ASYNC_MESSAGE), "the 0x20 on relay A")
        device_a.send(async_response(queued["id"], 1))
        await self.wait_until(lambda: device_a.got(MessageType.ASYNC_SESSION_COMPLETE), "the 0x23")
        self.assertEqual(device_a.frames[-1].to_bytes(), ASYNC_SESSION_COMPLETE)
        await self.api_until(
            relay_b,
            commands,
            lambda body: [c["status"] for c in body["commands"]] == ["delivered"],
            "the command delivered, seen through relay B",
        )

        # Commit counts are written once a second: a relay killed within that
        # second loses its last counts (never records). Let A's be written.
        await self.api_until(
            relay_b,
            f"/api/devices/{on_a}",
            lambda d: d["records_committed"] == len(DENMARK_SEQ),
            "relay A's batched commit count",
        )

        # Relay A dies while its device's next records wait for their commit.
        device_a.send(AUCKLAND)
        relay_a.transport.signalProcess("KILL")
        await self.wait_until(lambda: relay_a.daemon.ended and device_a.closed, "relay A and its device to go")
        posted_before = len(server.requests)

        # The device reconnects through HAProxy, reaches relay B, resends, is committed.
        again = await self.hello_through(port, f"device {on_a} again", hellos[on_a])
        await self.upload(again, AUCKLAND)
        await self.api_until(
            relay_b,
            f"/api/devices/{on_a}",
            lambda d: d["connected"] and d["node"] == "node-b"
            and d["records_committed"] == len(DENMARK_SEQ + AUCKLAND_SEQ),
            "the reconnected device on node-b, its commits counted",
        )
        self.assertEqual(len(server.requests), posted_before + 1)

        # Nothing lost: every record each device sent reached the end server.
        posted = {serial: [] for serial in devices}
        for post in server.requests:
            posted[int(post.uri.rsplit("/", 1)[1])] += seq_numbers(post.body)
        self.assertEqual(posted[on_a], DENMARK_SEQ + AUCKLAND_SEQ)
        self.assertEqual(posted[on_b], DENMARK_SEQ)
        self.relays.remove(relay_a)  # killed: no clean shut-down line to look for
        await self.assert_secrets_not_logged()

    async def test_relay_logs_the_device_address_not_haproxys(self) -> None:
        """Behind HAProxy the relay logs the device's own address and source port."""
        server = self.start_http_server()
        relay = await self.start_proxied_relay(
            plain_http_connector("platform", server.port), self.sqlite_registry(), "node-a"
        )
        port = await self.start_haproxy([relay])
        device = await self.hello_through(port, "dart", DART_HELLO)
        own = device.transport.getHost()
        await self.wait_until(
            lambda: b"device %d connected from" % DART_SERIAL in relay.daemon.output, "the connection log line"
        )
        logged = re.findall(rb"device %d connected from (\S+) " % DART_SERIAL, relay.daemon.output)
        self.assertEqual(logged, [f"{own.host}:{own.port}".encode()])
        await self.assert_secrets_not_logged()
