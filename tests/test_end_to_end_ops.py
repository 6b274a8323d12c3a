"""
End-to-end operations: the real ``twistd oemrelay`` says what runs in one
start-up line, stays quiet per connection, serves ``/healthz``, ``/readyz``
and ``/metrics`` on its API listener, and writes JSON lines when asked.
"""

from __future__ import annotations

import json
import re

from prometheus_client.parser import text_string_to_metric_families
from treq.client import HTTPClient
from twisted.web.client import Agent, HTTPConnectionPool

from .test_end_to_end import (
    COMMIT_REQUEST,
    _Daemon,
    DART_HELLO,
    DENMARK,
    FIXED,
    LISTEN,
    LOOPBACK,
    MessageType,
    _RelayTestCase,
    device_hello,
)

TOKEN = "ops-t0ken-secret"
_API_PORT = re.compile(rb"ApiSite starting on (\d+)")
_SUMMARY = "running: devices on"


class _OpsTestCase(_RelayTestCase):
    """A relay with an HTTP connector and the API, and a client for the API."""

    def setUp(self) -> None:
        super().setUp()
        pool = HTTPConnectionPool(self.reactor, persistent=False)
        self.http = HTTPClient(Agent(self.reactor, pool=pool, connectTimeout=5))
        self.addCleanup(pool.closeCachedConnections)

    def config(self, server, log_format: str = "text", extra_api: str = "") -> str:
        return (
            f"[relay]\nlisten = {LISTEN}\nconnector = platform\nlog_format = {log_format}\n\n"
            "[connector:platform]\ntype = http\n"
            f"url = http://{LOOPBACK}:{server.port}/dm/[SERIAL]?code=query-secret\n\n"
            f"[api]\nlisten = {LISTEN}\ntoken = {TOKEN}\n{extra_api}"
        )

    async def start(self, server, **options) -> tuple[int, int]:
        """The relay's device port and API port."""
        port = await self.start_daemon(self.config(server, **options))
        found = _API_PORT.search(self.daemon.output)
        self.assertIsNotNone(found, self.daemon.output)
        return port, int(found.group(1))

    async def get(self, api_port: int, path: str, token: str | None = TOKEN) -> tuple[int, bytes]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        response = await self.http.get(f"http://{LOOPBACK}:{api_port}{path}", headers=headers)
        return response.code, await response.content()

    async def upload_twice(self, port: int) -> None:
        """Two devices, each committing one upload over HTTP."""
        first = await self.connect_device(port, "first")
        first.send(DART_HELLO, DENMARK, COMMIT_REQUEST)
        second = await self.connect_device(port, "second")
        second.send(device_hello(4242), FIXED, COMMIT_REQUEST)
        for device in (first, second):
            await self.wait_until(lambda: device.got(MessageType.COMMIT_RESPONSE), "0x06")


class StartupAndMetricsEndToEndTests(_OpsTestCase):
    """The text log, the operator's endpoints and the metrics after real uploads."""

    async def test_one_summary_line_and_quiet_factories(self) -> None:
        """One start-up summary, no factory lines, no access lines and no secret while devices upload over HTTP."""
        server = self.start_http_server()
        port, api_port = await self.start(server)
        await self.upload_twice(port)
        self.assertEqual((await self.get(api_port, "/healthz", token=None))[0], 200)
        self.assertEqual((await self.get(api_port, "/metrics"))[0], 200)

        output = self.daemon.output.decode("utf-8", "replace")
        summary = [line for line in output.splitlines() if _SUMMARY in line]
        self.assertEqual(len(summary), 1, output)
        self.assertIn(f"connector platform: http to http://{LOOPBACK}:{server.port}", summary[0])
        self.assertIn("workers 1", summary[0])
        for noise in ("Starting factory", "Stopping factory", "GET /", " at 0x"):
            self.assertNotIn(noise, output)
        for secret in (TOKEN, "query-secret"):
            self.assertNotIn(secret, output)

    async def test_health_readiness_and_metrics(self) -> None:
        """healthz and readyz answer without a token; metrics need it and count the commits and requests."""
        server = self.start_http_server()
        port, api_port = await self.start(server)
        await self.upload_twice(port)

        self.assertEqual(await self.get(api_port, "/healthz", token=None), (200, b"ok\n"))
        self.assertEqual(await self.get(api_port, "/readyz", token=None), (200, b"ok\n"))
        self.assertEqual((await self.get(api_port, "/metrics", token=None))[0], 401)
        self.assertEqual((await self.get(api_port, "/metrics", token="wrong"))[0], 401)
        code, body = await self.get(api_port, "/metrics")
        self.assertEqual(code, 200)
        values = {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(body.decode("utf-8"))
            for sample in family.samples
        }
        self.assertEqual(values[("oemrelay_records_committed_total", ())], 4)
        self.assertEqual(
            values[
                (
                    "oemrelay_connector_requests_total",
                    (("connector", "platform"), ("outcome", "2xx")),
                )
            ],
            2,
        )
        self.assertGreater(values[("oemrelay_device_connections_total", ())], 2)
        self.assertTrue(
            any(name == "oemrelay_registry_call_seconds_count" for name, _ in values)
        )

    async def test_metrics_public(self) -> None:
        """With metrics_public = true, /metrics answers without a token; /api/ still needs one."""
        server = self.start_http_server()
        _, api_port = await self.start(server, extra_api="metrics_public = true\n")
        self.assertEqual((await self.get(api_port, "/metrics", token=None))[0], 200)
        self.assertEqual((await self.get(api_port, "/api/devices", token=None))[0], 401)


class TcpBehindProxyEndToEndTests(_OpsTestCase):
    """The raw TCP connector behind a PROXY-protocol listener is quiet too."""

    def setUp(self) -> None:
        super().setUp()
        self.patch(
            _Daemon, "_LISTENING", re.compile(rb"DeviceFactory (?:\(PROXY\) )?starting on (\d+)")
        )

    async def test_no_factory_lines(self) -> None:
        """haproxy: listener and tcp connector: one summary line, no factory line, while devices commit."""
        end_server = self.start_dm_server()
        port = await self.start_daemon(
            f"[relay]\nlisten = haproxy:{LISTEN}\n\n"
            f"[connector:forward]\ntype = tcp\nendpoint = tcp:host={LOOPBACK}:port={end_server.port}\n"
        )
        for serial in (4242, 4243):
            device = await self.connect_device(port, f"device {serial}")
            device.send(
                b"PROXY TCP4 10.1.2.3 127.0.0.1 5555 20500\r\n", device_hello(serial), FIXED, COMMIT_REQUEST
            )
            await self.wait_until(lambda: device.got(MessageType.COMMIT_RESPONSE), "0x06")
        output = self.daemon.output.decode("utf-8", "replace")
        self.assertEqual(output.count(_SUMMARY), 1, output)
        self.assertIn("connector forward: tcp to tcp:host=", output)
        for noise in ("Starting factory", "Stopping factory", " at 0x"):
            self.assertNotIn(noise, output)


class JsonLogEndToEndTests(_OpsTestCase):
    """[relay] log_format = json."""

    async def test_every_line_json(self) -> None:
        """Every stdout line is a JSON object; the summary has its fields; a device's serial is a field."""
        server = self.start_http_server()
        port, _ = await self.start(server, log_format="json")
        await self.upload_twice(port)
        bad = await self.connect_device(port, "bad")
        bad.send(b"\x00\x00garbage")
        await self.wait_until(lambda: bad.closed, "the bad device to be closed")
        await self.wait_until(
            lambda: b"closing" in self.daemon.stdout, "the closing line"
        )

        records = [json.loads(line) for line in self.daemon.stdout.decode("utf-8").splitlines()]
        for record in records:
            self.assertEqual(
                list(record)[:4], ["time", "level", "namespace", "message"], record
            )
        (summary,) = [record for record in records if _SUMMARY in record["message"]]
        self.assertEqual(summary["namespace"], "oemrelay.service")
        self.assertTrue(summary["connectors"].startswith("connector platform: http to "), summary)
        self.assertEqual(summary["workers"], 1)
        closing = [record for record in records if "closing" in record["message"]]
        self.assertTrue(closing, records)
        self.assertIn("reason", closing[0])
        self.assertNotIn(TOKEN, self.daemon.output.decode("utf-8"))
