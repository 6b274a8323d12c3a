"""
Tests for the management HTTP API, in memory through StubTreq against a fake
registry, plus (when the real registry exists) end-to-end over a real socket.
"""

from __future__ import annotations

import json
import re
import os
from dataclasses import replace
from typing import Any

from treq.client import HTTPClient
from treq.testing import StubTreq
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.server import NOT_DONE_YET, Site
from twisted.web.test.requesthelper import DummyRequest

from oemrelay import api
from oemrelay.api import build_api
from oemrelay.codec import Hello
from oemrelay.commands import COMMAND_TYPES, CommandRequest
from oemrelay.registry import Command, DeviceRecord, Registry

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
BASE = "http://relay.example"
CONNECTORS = {"primary", "backup"}
#: 2026-11-26T09:20:02Z
NOW = 1795684802.0
SECRET = "custom-secret-value"


class FakeRegistry:
    """
    The registry's API-facing methods over dicts, answering with fired
    Deferreds.  ``calls`` records method names; ``imports`` every row list
    passed to ``import_devices``; ``broken`` makes every method fail.
    """

    def __init__(self) -> None:
        self.devices: dict[int, DeviceRecord] = {}
        self.commands: dict[int, list[Command]] = {}
        self.calls: list[tuple[str, tuple]] = []
        self.imports: list[list[dict[str, Any]]] = []
        self.broken: Exception | None = None
        self.refuse_import: str | None = None
        self._next_id = 1

    def _answer(self, name: str, args: tuple, value: Any):
        self.calls.append((name, args))
        if self.broken is not None:
            return fail(self.broken)
        return succeed(value)

    def called(self, name: str) -> list[tuple]:
        return [args for called, args in self.calls if called == name]

    def add(self, device: DeviceRecord) -> DeviceRecord:
        self.devices[device.serial] = device
        return device

    def list_devices(self, limit: int, after: int | None = None):
        serials = sorted(s for s in self.devices if after is None or s > after)
        page = [self.devices[s] for s in serials[:limit]]
        return self._answer("list_devices", (limit, after), page)

    def get_device(self, serial: int):
        return self._answer("get_device", (serial,), self.devices.get(serial))

    def _merge(self, serial: int, changes: dict[str, Any]) -> tuple[DeviceRecord, bool]:
        changes = dict(changes)
        if "connector" in changes and not changes["connector"]:
            changes["connector"] = None
        created = serial not in self.devices
        device = replace(self.devices.get(serial, DeviceRecord(serial)), **changes)
        self.devices[serial] = device
        return device, created

    def update_device(self, serial: int, changes: dict[str, Any]):
        if self.broken is None:
            result = self._merge(serial, changes)
        else:
            result = None
        return self._answer("update_device", (serial, changes), result)

    def import_devices(self, rows: list[dict[str, Any]]):
        self.imports.append(rows)
        if self.refuse_import is not None:
            self.calls.append(("import_devices", (rows,)))
            return fail(ValueError(self.refuse_import))
        counts = None
        if self.broken is None:
            created = updated = 0
            for row in rows:
                row = dict(row)
                _, was_created = self._merge(row.pop("serial"), row)
                created += was_created
                updated += not was_created
            counts = (created, updated)
        return self._answer("import_devices", (rows,), counts)

    def add_command(self, serial: int, request: CommandRequest, now: float):
        command = None
        if serial in self.devices:
            command = Command(
                id=self._next_id,
                serial=serial,
                type=request.type,
                params=request.params,
                message_type=request.message_type,
                data=request.data,
                status="queued",
                created=now,
                send_after=request.send_after,
                expires=request.expires,
            )
            self._next_id += 1
            self.commands.setdefault(serial, []).append(command)
        return self._answer("add_command", (serial, request, now), command)

    def list_commands(self, serial: int, now: float):
        return self._answer(
            "list_commands", (serial, now), list(self.commands.get(serial, []))
        )


class _ApiTestCase(SynchronousTestCase):
    """Builds the API over a fake registry and talks to it through StubTreq."""

    def setUp(self) -> None:
        self.registry = FakeRegistry()
        self.clock = Clock()
        self.clock.advance(NOW)
        self.resource = build_api(self.registry, TOKEN, CONNECTORS, self.clock)
        self.stub = StubTreq(self.resource)
        self.events: list[dict] = []
        self.patch(api, "log", Logger(namespace="oemrelay.api", observer=self.events.append))

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        json_body: Any = None,
        headers: dict[str, str] | None = None,
    ):
        """Send one request; return the response and its body bytes."""
        if json_body is not None:
            body = json.dumps(json_body).encode("utf-8")
        all_headers = dict(AUTH if headers is None else headers)
        d = self.stub.request(method, BASE + path, data=body, headers=all_headers)
        self.stub.flush()
        response = self.successResultOf(d)
        content = self.successResultOf(self.stub.content(response))
        return response, content

    def call(self, method: str, path: str, **kwargs) -> tuple[int, Any]:
        """Send one request; return the status and the decoded JSON body."""
        response, content = self.request(method, path, **kwargs)
        self.assertEqual(
            response.headers.getRawHeaders(b"content-type"), [b"application/json"]
        )
        return response.code, json.loads(content)

    def assertError(self, answer: tuple[int, Any], status: int, *fragments: str) -> None:
        code, body = answer
        self.assertEqual((code, list(body)), (status, ["error"]), body)
        for fragment in fragments:
            self.assertIn(fragment, body["error"])


def _device(serial: int, **values: Any) -> DeviceRecord:
    return DeviceRecord(serial, **values)


class AuthenticationTests(_ApiTestCase):
    """Every request needs the bearer token."""

    def test_missing_token(self) -> None:
        """A request without Authorization is a 401 with WWW-Authenticate: Bearer."""
        self.registry.add(_device(1))
        response, content = self.request("GET", "/api/devices/1", headers={})
        self.assertEqual(response.code, 401)
        challenge = response.headers.getRawHeaders(b"www-authenticate")
        self.assertEqual(len(challenge), 1)
        self.assertTrue(challenge[0].startswith(b"Bearer"))
        self.assertEqual(json.loads(content), {"error": "missing bearer token"})
        self.assertEqual(self.registry.calls, [])

    def test_wrong_token(self) -> None:
        """A wrong token is a 401 saying invalid_token, and the registry is not asked."""
        response, content = self.request(
            "GET", "/api/devices", headers={"Authorization": "Bearer nope"}
        )
        self.assertEqual(response.code, 401)
        self.assertIn(
            b'error="invalid_token"',
            response.headers.getRawHeaders(b"www-authenticate")[0],
        )
        self.assertEqual(json.loads(content), {"error": "invalid bearer token"})
        self.assertEqual(self.registry.calls, [])

    def test_token_prefix(self) -> None:
        """A prefix of the token is not the token."""
        code, _ = self.call(
            "GET", "/api/devices", headers={"Authorization": f"Bearer {TOKEN[:-1]}"}
        )
        self.assertEqual(code, 401)

    def test_other_scheme(self) -> None:
        """The token under another scheme (Basic) is refused."""
        code, _ = self.call(
            "GET", "/api/devices", headers={"Authorization": f"Basic {TOKEN}"}
        )
        self.assertEqual(code, 401)

    def test_scheme_case_insensitive(self) -> None:
        """The scheme name is case-insensitive, as HTTP says."""
        code, _ = self.call(
            "GET", "/api/devices", headers={"Authorization": f"bearer {TOKEN}"}
        )
        self.assertEqual(code, 200)

    def test_two_authorization_headers(self) -> None:
        """Two Authorization headers are refused even if one is right."""
        d = self.stub.request(
            "GET",
            BASE + "/api/devices",
            headers={"Authorization": [f"Bearer {TOKEN}", "Bearer other"]},
        )
        self.stub.flush()
        self.assertEqual(self.successResultOf(d).code, 401)

    def test_before_routing(self) -> None:
        """Without the token an unknown path is a 401, not a 404."""
        code, _ = self.call("GET", "/nowhere", headers={})
        self.assertEqual(code, 401)

    def test_mutation_without_token(self) -> None:
        """A PUT without the token changes nothing."""
        code, _ = self.call(
            "PUT", "/api/devices/5", json_body={"custom1": "x"}, headers={}
        )
        self.assertEqual(code, 401)
        self.assertEqual(self.registry.devices, {})

    def test_openapi_needs_token(self) -> None:
        """The OpenAPI document is behind the token too."""
        code, _ = self.call("GET", "/api/openapi.json", headers={})
        self.assertEqual(code, 401)

    def test_empty_token_refused(self) -> None:
        """build_api refuses an empty token, which would let anyone in."""
        self.assertRaises(ValueError, build_api, self.registry, "", CONNECTORS, self.clock)


class RoutingTests(_ApiTestCase):
    """Paths and methods outside the API's."""

    def test_unknown_path(self) -> None:
        """An unknown path under /api is a JSON 404."""
        self.assertError(self.call("GET", "/api/things"), 404, "no such path")

    def test_outside_api(self) -> None:
        """A path outside /api is a 404."""
        self.assertError(self.call("GET", "/"), 404)

    def test_trailing_slash(self) -> None:
        """Paths are exact: /api/devices/ is a 404."""
        self.assertError(self.call("GET", "/api/devices/"), 404)

    def test_too_deep(self) -> None:
        """A path below a device other than commands is a 404."""
        self.registry.add(_device(1))
        self.assertError(self.call("GET", "/api/devices/1/other"), 404)

    def test_wrong_method(self) -> None:
        """A method a path does not take is a 405 with Allow."""
        response, content = self.request("DELETE", "/api/devices/1")
        self.assertEqual(response.code, 405)
        self.assertEqual(response.headers.getRawHeaders(b"allow"), [b"GET, PUT"])
        self.assertIn("DELETE", json.loads(content)["error"])

    def test_wrong_method_on_import(self) -> None:
        """GET of the import path is a 405 allowing POST."""
        response, _ = self.request("GET", "/api/devices/import")
        self.assertEqual(response.code, 405)
        self.assertEqual(response.headers.getRawHeaders(b"allow"), [b"POST"])

    def test_routes_are_documented(self) -> None:
        """The route table and the OpenAPI document name the same methods on the same paths."""
        resource = build_api(self.registry, TOKEN, CONNECTORS, self.clock, metrics=lambda: b"")
        routed = {
            (route.method.decode("ascii").lower(), route.path) for route in resource.routes
        } | {("get", path.decode("ascii")) for path in resource.ops_paths}
        documented = {
            (method, path)
            for path, item in api.openapi_document(CONNECTORS)["paths"].items()
            for method in item
            if method != "parameters"
        }
        self.assertEqual(routed, documented)

    def test_literal_beats_parameter(self) -> None:
        """/api/devices/import is the import path, not a device whatever the table's order."""
        self.patch(self.resource, "routes", tuple(reversed(self.resource.routes)))
        response, _ = self.request("GET", "/api/devices/import")
        self.assertEqual(response.code, 405)
        self.assertEqual(response.headers.getRawHeaders(b"allow"), [b"POST"])

    def test_not_cached(self) -> None:
        """Answers, which may carry custom fields, are marked no-store."""
        response, _ = self.request("GET", "/api/devices")
        self.assertEqual(response.headers.getRawHeaders(b"cache-control"), [b"no-store"])


class ListDevicesTests(_ApiTestCase):
    """GET /api/devices: pages of devices by serial."""

    def _add(self, *serials: int) -> None:
        for serial in serials:
            self.registry.add(_device(serial))

    def test_empty(self) -> None:
        """No devices: an empty list and no next page."""
        self.assertEqual(self.call("GET", "/api/devices"), (200, {"devices": [], "next": None}))

    def test_default_limit(self) -> None:
        """Without limit a page holds 100 devices and names the next."""
        self._add(*range(1, 151))
        code, body = self.call("GET", "/api/devices")
        self.assertEqual(code, 200)
        self.assertEqual([d["serial"] for d in body["devices"]], list(range(1, 101)))
        self.assertEqual(body["next"], 100)
        self.assertEqual(self.registry.called("list_devices"), [(101, None)])

    def test_paging(self) -> None:
        """Following next walks every device once, in serial order, ending with null."""
        self._add(9, 3, 7, 1, 5)
        seen, after, pages = [], None, 0
        while True:
            query = "?limit=2" + ("" if after is None else f"&after={after}")
            code, body = self.call("GET", "/api/devices" + query)
            self.assertEqual(code, 200)
            pages += 1
            seen.extend(d["serial"] for d in body["devices"])
            after = body["next"]
            if after is None:
                break
        self.assertEqual((seen, pages), ([1, 3, 5, 7, 9], 3))

    def test_exact_page(self) -> None:
        """When the last page is exactly full, next is null (no empty page)."""
        self._add(1, 2)
        self.assertEqual(self.call("GET", "/api/devices?limit=2")[1]["next"], None)

    def test_after(self) -> None:
        """after passes the serial on and only greater serials come back."""
        self._add(10, 20, 30)
        code, body = self.call("GET", "/api/devices?after=10")
        self.assertEqual([d["serial"] for d in body["devices"]], [20, 30])
        self.assertEqual(self.registry.called("list_devices"), [(101, 10)])

    def test_max_limit(self) -> None:
        """limit=1000 is allowed."""
        self.assertEqual(self.call("GET", "/api/devices?limit=1000")[0], 200)
        self.assertEqual(self.registry.called("list_devices"), [(1001, None)])

    def test_bad_limits(self) -> None:
        """limit must be a whole number from 1 to 1000."""
        for limit in ("0", "1001", "abc", "", "-1", "1.5", "99999999999"):
            self.assertError(
                self.call("GET", f"/api/devices?limit={limit}"), 400, "limit"
            )
        self.assertEqual(self.registry.calls, [])

    def test_bad_after(self) -> None:
        """after must be a uint32 serial."""
        for after in ("x", "-1", "4294967296", ""):
            self.assertError(self.call("GET", f"/api/devices?after={after}"), 400, "after")
        self.assertEqual(self.registry.calls, [])

    def test_unknown_parameter(self) -> None:
        """An unknown query parameter is a 400 naming it."""
        self.assertError(self.call("GET", "/api/devices?limt=5"), 400, "'limt'")

    def test_repeated_parameter(self) -> None:
        """A parameter given twice is a 400."""
        self.assertError(self.call("GET", "/api/devices?limit=5&limit=6"), 400, "more than once")

    def test_device_fields(self) -> None:
        """Listed devices carry their fields, times as ISO 8601 and no pending count."""
        self.registry.add(_device(1, imei="3566", first_seen=NOW, custom1="a"))
        device = self.call("GET", "/api/devices")[1]["devices"][0]
        self.assertEqual(
            (device["imei"], device["first_seen"], device["last_seen"], device["custom1"]),
            ("3566", "2026-11-26T09:20:02Z", None, "a"),
        )
        self.assertNotIn("pending_commands", device)


class GetDeviceTests(_ApiTestCase):
    """GET /api/devices/{serial}."""

    def test_device(self) -> None:
        """A known device comes back with every field."""
        self.registry.add(
            _device(
                4242,
                imei="356000000000001",
                iccid="8961000000000000001",
                product_id=97,
                hardware_rev=2,
                firmware="1.2",
                first_seen=NOW - 86400,
                last_seen=NOW,
                connected=True,
                node="node-a",
                last_upload=NOW - 60.7,
                records_committed=12,
                last_error="end server said 503",
                custom1="c1",
                custom2="c2",
                custom3="c3",
                connector="backup",
            )
        )
        self.assertEqual(
            self.call("GET", "/api/devices/4242"),
            (
                200,
                {
                    "serial": 4242,
                    "imei": "356000000000001",
                    "iccid": "8961000000000000001",
                    "product_id": 97,
                    "hardware_rev": 2,
                    "firmware": "1.2",
                    "first_seen": "2026-11-25T09:20:02Z",
                    "last_seen": "2026-11-26T09:20:02Z",
                    "connected": True,
                    "node": "node-a",
                    "last_upload": "2026-11-26T09:19:01Z",
                    "records_committed": 12,
                    "last_error": "end server said 503",
                    "custom1": "c1",
                    "custom2": "c2",
                    "custom3": "c3",
                    "connector": "backup",
                    "pending_commands": 0,
                },
            ),
        )

    def test_pending_commands(self) -> None:
        """pending_commands counts queued and sent commands only."""
        self.registry.add(_device(7))
        statuses = ["queued", "sent", "delivered", "failed", "expired", "queued"]
        self.registry.commands[7] = [
            Command(i, 7, "remote_reset", {}, 2, b"", status, NOW)
            for i, status in enumerate(statuses)
        ]
        self.assertEqual(self.call("GET", "/api/devices/7")[1]["pending_commands"], 3)
        self.assertEqual(self.registry.called("list_commands"), [(7, NOW)])

    def test_unknown(self) -> None:
        """An unknown device is a 404."""
        self.assertError(self.call("GET", "/api/devices/99"), 404, "99")

    def test_largest_serial(self) -> None:
        """4294967295 is a valid serial (so an unknown one is a 404)."""
        self.assertError(self.call("GET", "/api/devices/4294967295"), 404)
        self.assertEqual(self.registry.called("get_device"), [(4294967295,)])

    def test_bad_serials(self) -> None:
        """A serial that is not a decimal uint32 is a 400; the registry is not asked."""
        for serial in ("abc", "4294967296", "-1", "+1", "1e3", "%31", "12345678901", "١٢"):
            self.assertError(self.call("GET", f"/api/devices/{serial}"), 400, "serial")
        self.assertEqual(self.registry.calls, [])

    def test_leading_zeros(self) -> None:
        """Leading zeros name the same device."""
        self.registry.add(_device(7))
        self.assertEqual(self.call("GET", "/api/devices/007")[1]["serial"], 7)


class PutDeviceTests(_ApiTestCase):
    """PUT /api/devices/{serial}: merge custom fields and the connector override."""

    def test_create(self) -> None:
        """An unknown device is created: 201 with the device."""
        code, body = self.call(
            "PUT", "/api/devices/12", json_body={"custom1": "a", "connector": "backup"}
        )
        self.assertEqual(code, 201)
        self.assertEqual(
            (body["serial"], body["custom1"], body["custom2"], body["connector"], body["pending_commands"]),
            (12, "a", "", "backup", 0),
        )
        self.assertEqual(self.registry.devices[12].custom1, "a")

    def test_merge(self) -> None:
        """A known device is merged: 200, keys left out keep their values."""
        self.registry.add(_device(12, custom1="a", custom2="b", connector="backup"))
        code, body = self.call("PUT", "/api/devices/12", json_body={"custom2": "B"})
        self.assertEqual(code, 200)
        self.assertEqual(
            (body["custom1"], body["custom2"], body["connector"]), ("a", "B", "backup")
        )
        self.assertEqual(self.registry.called("update_device"), [(12, {"custom2": "B"})])

    def test_clear_connector(self) -> None:
        """connector null or "" clears the override (passed on as None)."""
        for value in (None, ""):
            self.registry.add(_device(12, connector="backup"))
            code, body = self.call("PUT", "/api/devices/12", json_body={"connector": value})
            self.assertEqual((code, body["connector"]), (200, None))
        self.assertEqual(
            self.registry.called("update_device"),
            [(12, {"connector": None}), (12, {"connector": None})],
        )

    def test_empty_object(self) -> None:
        """An empty object registers the device without changing anything."""
        self.assertEqual(self.call("PUT", "/api/devices/3", json_body={})[0], 201)
        self.assertIn(3, self.registry.devices)

    def test_several_connectors(self) -> None:
        """An override may list several configured connectors, stored space separated."""
        self.assertEqual(
            self.call("PUT", "/api/devices/12", json_body={"connector": " primary  backup "})[0], 201
        )
        self.assertEqual(self.registry.devices[12].connector, "primary backup")

    def test_one_unknown_among_several(self) -> None:
        """One unknown name in a list is a 400 naming it, and nothing changes."""
        self.assertError(
            self.call("PUT", "/api/devices/12", json_body={"connector": "primary nope"}),
            400,
            "unknown connector 'nope'",
        )
        self.assertEqual(self.registry.calls, [])

    def test_unknown_connector(self) -> None:
        """A connector name that is not configured is a 400 and nothing changes."""
        self.assertError(
            self.call("PUT", "/api/devices/12", json_body={"connector": "nope"}),
            400,
            "unknown connector 'nope'",
            "backup, primary",
        )
        self.assertEqual(self.registry.calls, [])

    def test_unknown_key(self) -> None:
        """A key other than custom1-3 and connector is a 400."""
        self.assertError(
            self.call("PUT", "/api/devices/12", json_body={"custom4": "x"}), 400, "custom4"
        )
        self.assertEqual(self.registry.calls, [])

    def test_wrong_types(self) -> None:
        """Custom fields must be strings, connector a string or null."""
        for body in ({"custom1": 5}, {"custom2": None}, {"custom3": ["x"]}, {"connector": 1}):
            self.assertError(self.call("PUT", "/api/devices/12", json_body=body), 400)
        self.assertEqual(self.registry.calls, [])

    def test_nul(self) -> None:
        """A custom value with a NUL character (which PostgreSQL cannot store) is a 400."""
        self.assertError(
            self.call("PUT", "/api/devices/12", json_body={"custom3": "a\x00b"}), 400, "custom3", "NUL"
        )
        self.assertEqual(self.registry.calls, [])

    def test_not_an_object(self) -> None:
        """A JSON body that is not an object is a 400."""
        self.assertError(self.call("PUT", "/api/devices/12", json_body=["custom1"]), 400, "object")

    def test_bad_json(self) -> None:
        """Bodies that are not JSON, not UTF-8, use NaN or repeat a key are 400s."""
        for body in (b"{", b"", b"\xff{}", b'{"custom1": NaN}', b'{"custom1": "a", "custom1": "b"}'):
            self.assertError(self.call("PUT", "/api/devices/12", body=body), 400)
        self.assertEqual(self.registry.calls, [])

    def test_deeply_nested(self) -> None:
        """JSON nested too deep for the parser is a 400, not a 500."""
        for body in (b"[" * 100_000 + b"]" * 100_000, b'{"a":' * 100_000 + b"1" + b"}" * 100_000):
            self.assertError(self.call("PUT", "/api/devices/12", body=body), 400, "JSON")
        self.assertEqual(self.registry.calls, [])

    def test_lone_surrogate(self) -> None:
        """A custom value with a lone surrogate, which no database can store, is a 400."""
        self.assertError(
            self.call("PUT", "/api/devices/12", body=b'{"custom1": "a\\ud800b"}'), 400, "custom1"
        )
        self.assertEqual(self.registry.calls, [])

    def test_too_large(self) -> None:
        """A JSON body over the limit is a 413."""
        self.patch(api, "MAX_JSON_BODY", 100)
        self.assertError(
            self.call("PUT", "/api/devices/12", json_body={"custom1": "x" * 100}), 413
        )
        self.assertEqual(self.registry.calls, [])

    def test_body_at_limit(self) -> None:
        """A JSON body of exactly the limit is accepted; one byte more is a 413."""
        body = json.dumps({"custom1": "x" * 80}).encode("utf-8")
        self.patch(api, "MAX_JSON_BODY", len(body))
        code, device = self.call("PUT", "/api/devices/12", body=body)
        self.assertEqual((code, device["custom1"]), (201, "x" * 80))
        self.assertError(self.call("PUT", "/api/devices/12", body=body + b" "), 413)

    def test_bad_serial(self) -> None:
        """A PUT to a malformed serial is a 400."""
        self.assertError(self.call("PUT", "/api/devices/x", json_body={}), 400, "serial")

    def test_form_content_type(self) -> None:
        """A JSON body labelled as a form (curl -d) is still read as JSON."""
        code, body = self.call(
            "PUT",
            "/api/devices/12",
            body=b'{"custom1": "a"}',
            headers={**AUTH, "Content-Type": "application/x-www-form-urlencoded"},
        )
        self.assertEqual((code, body["custom1"]), (201, "a"))

    def test_logs_without_secrets(self) -> None:
        """A PUT logs one line with method, path and status, never the values."""
        self.call("PUT", "/api/devices/12", json_body={"custom1": SECRET})
        self.assertEqual(len(self.events), 1)
        event = self.events[0]
        self.assertEqual(
            (event["method"], event["path"], event["status"]), ("PUT", "/api/devices/12", 201)
        )
        self.assertNotIn(SECRET, repr(self.events))

    def test_reads_not_logged(self) -> None:
        """A GET logs nothing."""
        self.call("GET", "/api/devices")
        self.assertEqual(self.events, [])


class ImportTests(_ApiTestCase):
    """POST /api/devices/import: CSV rows, all or nothing."""

    def post(self, text: str | bytes) -> tuple[int, Any]:
        body = text.encode("utf-8") if isinstance(text, str) else text
        return self.call(
            "POST",
            "/api/devices/import",
            body=body,
            headers={**AUTH, "Content-Type": "text/csv"},
        )

    def test_with_header(self) -> None:
        """A header row is skipped; created and updated are counted."""
        self.registry.add(_device(2, custom1="old"))
        code, body = self.post("serial,custom1,custom2,custom3\n1,a,b,c\n2,d,e,f\n")
        self.assertEqual((code, body), (200, {"created": 1, "updated": 1}))
        self.assertEqual(
            self.registry.imports,
            [
                [
                    {"serial": 1, "custom1": "a", "custom2": "b", "custom3": "c"},
                    {"serial": 2, "custom1": "d", "custom2": "e", "custom3": "f"},
                ]
            ],
        )
        self.assertEqual(self.registry.devices[2].custom1, "d")

    def test_without_header(self) -> None:
        """Without a header the first row is data."""
        code, body = self.post("1,a,b,c\r\n2,d,e,f")
        self.assertEqual((code, body), (200, {"created": 2, "updated": 0}))
        self.assertEqual([row["serial"] for row in self.registry.imports[0]], [1, 2])

    def test_header_case(self) -> None:
        """The header is recognised whatever its case and spacing."""
        self.assertEqual(self.post(" Serial ,x,y,z\n1,a,b,c\n"), (200, {"created": 1, "updated": 0}))

    def test_connector_column(self) -> None:
        """A fifth column sets the override; an empty cell clears it."""
        self.registry.add(_device(2, connector="backup"))
        code, _ = self.post(
            "serial,custom1,custom2,custom3,connector\n1,a,,,primary\n2,b,,,\n"
        )
        self.assertEqual(code, 200)
        self.assertEqual(
            [(row["serial"], row["connector"]) for row in self.registry.imports[0]],
            [(1, "primary"), (2, None)],
        )
        self.assertEqual(self.registry.devices[2].connector, None)

    def test_four_columns_keep_connector(self) -> None:
        """Four-column rows leave the connector override alone."""
        self.registry.add(_device(2, connector="backup"))
        self.post("2,a,b,c\n")
        self.assertNotIn("connector", self.registry.imports[0][0])
        self.assertEqual(self.registry.devices[2].connector, "backup")

    def test_values_kept_exactly(self) -> None:
        """Custom values keep spaces, commas and newlines when quoted."""
        self.post('1," spaced ","a,b","two\nlines"\n')
        self.assertEqual(
            self.registry.imports[0][0],
            {"serial": 1, "custom1": " spaced ", "custom2": "a,b", "custom3": "two\nlines"},
        )

    def test_bad_serial(self) -> None:
        """A bad serial fails the import naming its line; nothing reaches the registry."""
        self.assertError(
            self.post("serial,custom1,custom2,custom3\n1,a,b,c\nxyz,d,e,f\n3,g,h,i\n"),
            400,
            "line 3",
            "serial",
        )
        self.assertEqual((self.registry.imports, self.registry.devices), ([], {}))

    def test_serial_too_large(self) -> None:
        """A serial over uint32 is a bad row."""
        self.assertError(self.post("4294967296,a,b,c\n"), 400, "line 1")
        self.assertEqual(self.registry.imports, [])

    def test_wrong_column_count(self) -> None:
        """A row with another number of cells than the first is a bad row."""
        self.assertError(self.post("1,a,b,c\n2,a,b\n"), 400, "line 2", "3 columns")
        self.assertEqual(self.registry.imports, [])

    def test_mixed_widths(self) -> None:
        """A five-cell row in a four-column file is a bad row."""
        self.assertError(self.post("1,a,b,c\n2,a,b,c,primary\n"), 400, "line 2")
        self.assertEqual(self.registry.imports, [])

    def test_too_few_columns(self) -> None:
        """A file whose first row has three cells is refused at line 1."""
        self.assertError(self.post("1,a,b\n"), 400, "line 1", "3 columns")

    def test_unknown_connector(self) -> None:
        """An unknown connector name fails the import naming its line."""
        self.assertError(self.post("1,a,b,c,primary\n2,a,b,c,elsewhere\n"), 400, "line 2", "elsewhere")
        self.assertEqual(self.registry.imports, [])

    def test_duplicate_serial(self) -> None:
        """A serial listed twice is a bad row naming both lines."""
        self.assertError(self.post("1,a,b,c\n2,a,b,c\n1,x,y,z\n"), 400, "line 3", "line 1")
        self.assertEqual(self.registry.imports, [])

    def test_blank_lines(self) -> None:
        """Blank lines are skipped and line numbers stay those of the file."""
        self.assertError(self.post("\n1,a,b,c\n\n\nbad,a,b,c\n"), 400, "line 5")
        self.assertEqual(self.post("\n1,a,b,c\n\n2,a,b,c\n\n"), (200, {"created": 2, "updated": 0}))

    def test_line_after_multiline_cell(self) -> None:
        """Line numbers count the lines inside quoted cells."""
        self.assertError(self.post('1,"x\ny\nz",b,c\nbad,a,b,c\n'), 400, "line 4")

    def test_byte_order_mark(self) -> None:
        """A UTF-8 byte order mark (Excel) does not hide the header."""
        self.assertEqual(
            self.post("\ufeffserial,custom1,custom2,custom3\n1,a,b,c\n".encode("utf-8")),
            (200, {"created": 1, "updated": 0}),
        )

    def test_not_utf8(self) -> None:
        """A body that is not UTF-8 is a 400."""
        self.assertError(self.post(b"1,\xff,b,c\n"), 400, "UTF-8")
        self.assertEqual(self.registry.imports, [])

    def test_nul(self) -> None:
        """A NUL character in a custom value is a bad row naming its line."""
        self.assertError(self.post("1,a,b,c\n2,a\x00,b,c\n"), 400, "line 2", "custom1", "NUL")
        self.assertEqual(self.registry.imports, [])

    def test_csv_syntax_error(self) -> None:
        """Text after a closing quote is a CSV error naming its line."""
        self.assertError(self.post('1,a,b,c\n2,"a"x,b,c\n'), 400, "line 2")
        self.assertEqual(self.registry.imports, [])

    def test_empty(self) -> None:
        """A CSV with no devices (or only a header) is a 400."""
        self.assertError(self.post(""), 400, "no devices")
        self.assertError(self.post("serial,custom1,custom2,custom3\n"), 400, "no devices")
        self.assertEqual(self.registry.imports, [])

    def test_too_large(self) -> None:
        """A body over the limit is a 413 and nothing is imported."""
        self.patch(api, "MAX_CSV_BODY", 20)
        self.assertError(self.post("1,a,b,c\n2,a,b,c\n3,a,b,c\n"), 413)
        self.assertEqual(self.registry.imports, [])

    def test_body_at_limit(self) -> None:
        """A CSV of exactly the limit is imported; one byte more is a 413, nothing imported."""
        text = "1,a,b,c\n2,a,b,c\n"
        self.patch(api, "MAX_CSV_BODY", len(text))
        self.assertEqual(self.post(text), (200, {"created": 2, "updated": 0}))
        self.assertError(self.post(text + "\n"), 413)
        self.assertEqual(len(self.registry.imports), 1)

    def test_refused_by_database(self) -> None:
        """A row the database refuses (named by index) is a 400 naming its line."""
        self.registry.refuse_import = "row 1: the database refused it: CHECK constraint failed"
        self.assertError(
            self.post("serial,custom1,custom2,custom3\n1,a,b,c\n\n2,d,e,f\n"),
            400,
            "line 4: the database refused it: CHECK constraint failed",
        )
        self.assertEqual(self.registry.devices, {})

    def test_any_content_type(self) -> None:
        """The body is read as CSV whatever its Content-Type (curl's default form type)."""
        code, body = self.call(
            "POST",
            "/api/devices/import",
            body=b"1,a,b,c\n",
            headers={**AUTH, "Content-Type": "application/x-www-form-urlencoded"},
        )
        self.assertEqual((code, body), (200, {"created": 1, "updated": 0}))

    def test_logs_without_secrets(self) -> None:
        """An import logs one line without the custom values."""
        self.post(f"1,{SECRET},b,c\n")
        self.assertEqual(len(self.events), 1)
        self.assertEqual(self.events[0]["status"], 200)
        self.assertNotIn(SECRET, repr(self.events))


class CommandTests(_ApiTestCase):
    """POST and GET /api/devices/{serial}/commands."""

    def test_queue(self) -> None:
        """A valid command is a 202 with the command; the registry gets it encoded, at now."""
        self.registry.add(_device(5))
        code, body = self.call(
            "POST",
            "/api/devices/5/commands",
            json_body={"type": "set_odometer", "metres": 10000},
        )
        self.assertEqual(
            (code, body),
            (
                202,
                {
                    "id": 1,
                    "type": "set_odometer",
                    "params": {"metres": 10000},
                    "status": "queued",
                    "created": "2026-11-26T09:20:02Z",
                    "send_after": None,
                    "expires": None,
                    "sent": None,
                    "completed": None,
                    "device_status": None,
                },
            ),
        )
        [(serial, request, now)] = self.registry.called("add_command")
        self.assertEqual(
            (serial, request.message_type, request.data, now),
            (5, 0x0012, b"\xe8\x03\x00\x00", NOW),
        )

    def test_schedule(self) -> None:
        """send_after and expires come back as ISO 8601 UTC."""
        self.registry.add(_device(5))
        code, body = self.call(
            "POST",
            "/api/devices/5/commands",
            json_body={
                "type": "remote_reset",
                "send_after": "2026-11-26T10:00:00+01:00",
                "expires": "2026-11-27T00:00:00Z",
            },
        )
        self.assertEqual(
            (code, body["send_after"], body["expires"]),
            (202, "2026-11-26T09:00:00Z", "2026-11-27T00:00:00Z"),
        )

    def test_unknown_device(self) -> None:
        """A command for an unknown device is a 404."""
        self.assertError(
            self.call("POST", "/api/devices/5/commands", json_body={"type": "remote_reset"}),
            404,
            "5",
        )

    def test_command_error(self) -> None:
        """A body parse_command refuses is a 400 with its message; nothing is queued."""
        self.registry.add(_device(5))
        self.assertError(
            self.call("POST", "/api/devices/5/commands", json_body={"type": "explode"}),
            400,
            'unknown command "type"',
        )
        self.assertError(
            self.call("POST", "/api/devices/5/commands", json_body={"type": "set_run_hours"}),
            400,
            '"seconds"',
        )
        self.assertEqual(self.registry.called("add_command"), [])

    def test_expired(self) -> None:
        """An expiry already past is a 400."""
        self.registry.add(_device(5))
        self.assertError(
            self.call(
                "POST",
                "/api/devices/5/commands",
                json_body={"type": "remote_reset", "expires": "2026-11-26T09:20:01Z"},
            ),
            400,
            "expires",
        )
        self.assertEqual(self.registry.called("add_command"), [])

    def test_expires_at_boundary(self) -> None:
        """An expiry of exactly now is a 400; one second later is queued."""
        self.registry.add(_device(5))
        path = "/api/devices/5/commands"
        self.assertError(
            self.call(
                "POST", path, json_body={"type": "remote_reset", "expires": "2026-11-26T09:20:02Z"}
            ),
            400,
            "expires",
        )
        code, body = self.call(
            "POST", path, json_body={"type": "remote_reset", "expires": "2026-11-26T09:20:03Z"}
        )
        self.assertEqual((code, body["status"]), (202, "queued"))

    def test_time_outside_utc_years(self) -> None:
        """A send_after whose UTC is past year 9999 is a 400 and is not queued (it could never be listed)."""
        self.registry.add(_device(5))
        self.assertError(
            self.call(
                "POST",
                "/api/devices/5/commands",
                json_body={"type": "remote_reset", "send_after": "9999-12-31T23:59:59-23:59"},
            ),
            400,
            "send_after",
        )
        self.assertEqual(self.registry.called("add_command"), [])

    def test_bad_json(self) -> None:
        """A command body that is not JSON is a 400."""
        self.registry.add(_device(5))
        self.assertError(self.call("POST", "/api/devices/5/commands", body=b"type=x"), 400, "JSON")

    def test_list(self) -> None:
        """The listing shows every command with all its fields."""
        self.registry.add(_device(5))
        self.registry.commands[5] = [
            Command(
                3, 5, "immobilise", {"on": True}, 0x100, b"\x01", "delivered",
                NOW - 120, send_after=NOW - 100, expires=NOW + 3600,
                sent=NOW - 90, completed=NOW - 89, device_status=1,
            ),
            Command(4, 5, "remote_reset", {}, 2, b"", "queued", NOW),
        ]
        code, body = self.call("GET", "/api/devices/5/commands")
        self.assertEqual(code, 200)
        self.assertEqual(
            body["commands"][0],
            {
                "id": 3,
                "type": "immobilise",
                "params": {"on": True},
                "status": "delivered",
                "created": "2026-11-26T09:18:02Z",
                "send_after": "2026-11-26T09:18:22Z",
                "expires": "2026-11-26T10:20:02Z",
                "sent": "2026-11-26T09:18:32Z",
                "completed": "2026-11-26T09:18:33Z",
                "device_status": 1,
            },
        )
        self.assertEqual([c["id"] for c in body["commands"]], [3, 4])
        self.assertEqual(self.registry.called("list_commands"), [(5, NOW)])

    def test_list_after_queue(self) -> None:
        """A queued command shows up in the listing."""
        self.registry.add(_device(5))
        self.call("POST", "/api/devices/5/commands", json_body={"type": "immobilise", "on": False})
        code, body = self.call("GET", "/api/devices/5/commands")
        self.assertEqual(
            [(c["type"], c["params"], c["status"]) for c in body["commands"]],
            [("immobilise", {"on": False}, "queued")],
        )

    def test_list_unknown_device(self) -> None:
        """Listing the commands of an unknown device is a 404."""
        self.assertError(self.call("GET", "/api/devices/5/commands"), 404)

    def test_bad_serial(self) -> None:
        """A malformed serial in the commands path is a 400."""
        self.assertError(self.call("GET", "/api/devices/five/commands"), 400, "serial")


class RegistryFailureTests(_ApiTestCase):
    """Database errors are 500s with a fixed message; details go to the log."""

    def test_failed_deferred(self) -> None:
        """A failing registry Deferred is a 500 "registry unavailable", logged as an error."""
        self.registry.broken = RuntimeError("database is locked")
        self.assertError(self.call("GET", "/api/devices"), 500)
        self.assertEqual(
            self.call("GET", "/api/devices/1")[1], {"error": "registry unavailable"}
        )
        errors = [e for e in self.events if e["log_level"].name == "error"]
        self.assertEqual(len(errors), 2)
        self.assertEqual(errors[0]["error"], "database is locked")

    def test_synchronous_exception(self) -> None:
        """A registry method raising outright is treated the same."""

        def explode(*args):
            raise OSError("disk gone")

        self.registry.list_devices = explode
        self.assertEqual(
            self.call("GET", "/api/devices"), (500, {"error": "registry unavailable"})
        )

    def test_no_secrets_logged(self) -> None:
        """A failed update logs neither the body nor the custom values."""
        self.registry.broken = RuntimeError("connection refused")
        self.assertError(
            self.call("PUT", "/api/devices/1", json_body={"custom1": SECRET}), 500
        )
        self.assertIn(500, [e.get("status") for e in self.events])
        self.assertNotIn(SECRET, repr(self.events))

    def test_bug(self) -> None:
        """A bug in the API itself is a 500 "internal error", logged with its traceback."""
        self.patch(api, "_device_json", lambda device: 1 / 0)
        self.registry.add(_device(1))
        self.assertEqual(self.call("GET", "/api/devices"), (500, {"error": "internal error"}))
        [failure] = [e["log_failure"] for e in self.events if "log_failure" in e]
        self.assertTrue(failure.check(ZeroDivisionError))


class DisconnectTests(SynchronousTestCase):
    """A client that goes away before the answer is ready."""

    def test_nothing_written(self) -> None:
        """If the client disconnects while the registry works, the answer is dropped quietly."""
        registry = FakeRegistry()
        pending: Deferred[DeviceRecord | None] = Deferred()
        registry.get_device = lambda serial: pending
        resource = build_api(registry, TOKEN, CONNECTORS, Clock())
        request = DummyRequest([b"api", b"devices", b"1"])
        request.path = request.uri = b"/api/devices/1"
        request.requestHeaders.setRawHeaders(b"authorization", [f"Bearer {TOKEN}".encode()])
        self.assertEqual(resource.render(request), NOT_DONE_YET)
        request.processingFailed(Failure(ConnectionDone()))
        pending.callback(DeviceRecord(1))
        self.assertEqual((request.written, request.finished), ([], 0))


class OpenApiTests(_ApiTestCase):
    """GET /api/openapi.json."""

    def document(self) -> dict[str, Any]:
        code, body = self.call("GET", "/api/openapi.json")
        self.assertEqual(code, 200)
        return body

    def test_paths(self) -> None:
        """The document is OpenAPI 3.0 and lists every path with its methods."""
        document = self.document()
        self.assertTrue(document["openapi"].startswith("3.0."))
        self.assertEqual(
            {
                path: sorted(key for key in item if key != "parameters")
                for path, item in document["paths"].items()
            },
            {
                "/api/deadletters": ["get"],
                "/api/deadletters/{id}": ["delete"],
                "/api/deadletters/{id}/retry": ["post"],
                "/api/devices": ["get"],
                "/api/devices/import": ["post"],
                "/api/devices/{serial}": ["get", "put"],
                "/api/devices/{serial}/commands": ["get", "post"],
                "/api/devices/{serial}/live": ["get"],
                "/api/devices/{serial}/recordings": ["post"],
                "/api/fleet": ["get"],
                "/api/openapi.json": ["get"],
                "/healthz": ["get"],
                "/metrics": ["get"],
                "/readyz": ["get"],
                "/api/recordings": ["get"],
                "/api/recordings/{recording}": ["get"],
            },
        )

    def test_bearer_security(self) -> None:
        """A bearer security scheme applies to the whole API."""
        document = self.document()
        self.assertEqual(
            document["components"]["securitySchemes"],
            {"bearerAuth": {"type": "http", "scheme": "bearer"}},
        )
        self.assertEqual(document["security"], [{"bearerAuth": []}])

    def test_every_command_type(self) -> None:
        """The command body is one of a schema per command type."""
        schemas = self.document()["components"]["schemas"]
        body = schemas["CommandBody"]
        names = set(body["discriminator"]["mapping"])
        self.assertEqual(names, set(COMMAND_TYPES))
        self.assertEqual(len(body["oneOf"]), len(COMMAND_TYPES))
        self.assertEqual(
            schemas["Command_set_odometer"]["properties"]["type"], {"type": "string", "enum": ["set_odometer"]}
        )

    def test_openapi_30_only(self) -> None:
        """No JSON Schema keyword OpenAPI 3.0 lacks (const) appears."""
        self.assertNotIn('"const"', json.dumps(self.document()))

    def test_references_resolve(self) -> None:
        """Every $ref points at a schema in the document."""
        document = self.document()
        refs: list[str] = []

        def walk(node: Any) -> None:
            if isinstance(node, dict):
                if "$ref" in node:
                    refs.append(node["$ref"])
                for value in node.values():
                    walk(value)
            elif isinstance(node, list):
                for value in node:
                    walk(value)

        walk(document)
        self.assertGreater(len(refs), 10)
        for ref in refs:
            prefix, _, name = ref.rpartition("/")
            self.assertEqual(prefix, "#/components/schemas")
            self.assertIn(name, document["components"]["schemas"])

    def test_operations_described(self) -> None:
        """Every operation needing the token has responses including 401; bodies are described where taken."""
        document = self.document()
        for path, item in document["paths"].items():
            for method, operation in item.items():
                if method == "parameters":
                    continue
                if operation.get("security") != []:
                    self.assertIn("401", operation["responses"], (path, method))
                # A retry is a bodiless POST: the id in the path says it all.
                takes_body = method in ("put", "post") and not path.endswith("/retry")
                self.assertEqual("requestBody" in operation, takes_body, (path, method))

    def test_device_schema_matches_answers(self) -> None:
        """The Device schema lists exactly the keys a device answer has."""
        self.registry.add(_device(7))
        _, device = self.call("GET", "/api/devices/7")
        schema = self.document()["components"]["schemas"]["Device"]
        self.assertEqual(set(schema["properties"]), set(device))

    def test_device_changes_are_the_settings(self) -> None:
        """The DeviceChanges schema lists exactly the keys PUT accepts."""
        schema = self.document()["components"]["schemas"]["DeviceChanges"]
        self.assertEqual(list(schema["properties"]), ["custom1", "custom2", "custom3", "connector"])

    def test_connector_names(self) -> None:
        """The override's pattern allows configured names, space separated, or empty; nothing else."""
        schema = self.document()["components"]["schemas"]["DeviceChanges"]
        pattern = re.compile(schema["properties"]["connector"]["pattern"])
        for allowed in ("backup", "primary", "backup primary", ""):
            self.assertTrue(pattern.match(allowed), allowed)
        for refused in ("nope", "backup nope", "backupprimary", "backup  primary"):
            self.assertFalse(pattern.match(refused), refused)


class _TrackingSite(Site):
    """A Site that can close its connections and say when they are gone."""

    def __init__(self, resource) -> None:
        super().__init__(resource)
        self.connections: list[tuple[list, Deferred[None]]] = []

    def buildProtocol(self, addr):  # noqa: N802 - Twisted's name
        channel = super().buildProtocol(addr)
        transport: list = []
        lost: Deferred[None] = Deferred()
        make_connection, connection_lost = channel.makeConnection, channel.connectionLost

        def made(new_transport) -> None:
            transport.append(new_transport)
            make_connection(new_transport)

        def gone(reason) -> None:
            connection_lost(reason)
            lost.callback(None)

        channel.makeConnection, channel.connectionLost = made, gone
        self.connections.append((transport, lost))
        return channel

    async def close_all(self) -> None:
        for transport, lost in self.connections:
            if not lost.called:
                transport[0].loseConnection()
            await lost


class RealRegistryTests(TestCase):
    """The API on a real socket with a real SQLite registry, through real treq."""

    async def setUp(self) -> None:
        from twisted.internet import reactor

        self.reactor = reactor
        path = os.path.abspath(self.mktemp())
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self.registry = Registry.from_url(f"sqlite:{path}", reactor)
        await self.registry.start()
        self.addCleanup(self.registry.close)

        site = _TrackingSite(build_api(self.registry, TOKEN, CONNECTORS, reactor))
        port = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.addCleanup(site.close_all)
        self.base = f"http://127.0.0.1:{port.getHost().port}"

        pool = HTTPConnectionPool(reactor, persistent=True)
        self.addCleanup(pool.closeCachedConnections)
        self.http = HTTPClient(Agent(reactor, pool=pool))

    async def call(
        self, method: str, path: str, body: bytes | None = None, json_body: Any = None,
        token: str = TOKEN,
    ) -> tuple[int, Any]:
        """One request over the socket; the status and decoded JSON body."""
        if json_body is not None:
            body = json.dumps(json_body).encode("utf-8")
        response = await self.http.request(
            method, self.base + path, data=body,
            headers={"Authorization": f"Bearer {token}"},
        )
        content = await response.content()
        self.assertEqual(
            response.headers.getRawHeaders(b"content-type"), [b"application/json"]
        )
        return response.code, json.loads(content)

    async def test_put_and_get(self) -> None:
        """A PUT creates then merges a device that GET and the listing then show."""
        code, created = await self.call(
            "PUT", "/api/devices/1001", json_body={"custom1": SECRET, "connector": "backup"}
        )
        self.assertEqual((code, created["custom1"], created["connector"]), (201, SECRET, "backup"))
        code, merged = await self.call(
            "PUT", "/api/devices/1001", json_body={"custom2": "two", "connector": None}
        )
        self.assertEqual(
            (code, merged["custom1"], merged["custom2"], merged["connector"]),
            (200, SECRET, "two", None),
        )
        code, device = await self.call("GET", "/api/devices/1001")
        self.assertEqual(device, merged)
        self.assertEqual(
            (device["connected"], device["first_seen"], device["pending_commands"]),
            (False, None, 0),
        )
        code, page = await self.call("GET", "/api/devices")
        self.assertEqual([d["serial"] for d in page["devices"]], [1001])
        self.assertEqual((await self.call("GET", "/api/devices/1002"))[0], 404)

    async def test_connected_device(self) -> None:
        """A device the relay saw shows its identity and times as ISO 8601."""
        hello = Hello(serial=77, imei="356000000000077", iccid="8961000000000000077",
                      product_id=97, hardware_rev=2, firmware_major=1, firmware_minor=5)
        await self.registry.device_connected(hello, "node-a", NOW)
        code, device = await self.call("GET", "/api/devices/77")
        self.assertEqual(
            (code, device["imei"], device["connected"], device["node"], device["first_seen"]),
            (200, "356000000000077", True, "node-a", "2026-11-26T09:20:02Z"),
        )

    async def test_import_and_page(self) -> None:
        """A CSV import creates and updates devices; a bad one changes nothing."""
        await self.call("PUT", "/api/devices/2", json_body={"custom1": "old"})
        csv_text = b"serial,custom1,custom2,custom3,connector\n1,a,,,primary\n2,b,,,\n3,c,,,\n"
        self.assertEqual(
            await self.call("POST", "/api/devices/import", body=csv_text),
            (200, {"created": 2, "updated": 1}),
        )
        code, error = await self.call(
            "POST", "/api/devices/import", body=b"4,a,b,c\n1,changed,b,c\nbad,a,b,c\n"
        )
        self.assertEqual(code, 400)
        self.assertIn("line 3", error["error"])

        serials, after = [], None
        while True:
            query = "?limit=2" + ("" if after is None else f"&after={after}")
            code, page = await self.call("GET", "/api/devices" + query)
            serials.extend(d["serial"] for d in page["devices"])
            after = page["next"]
            if after is None:
                break
        self.assertEqual(serials, [1, 2, 3])
        self.assertEqual(
            [(d["custom1"], d["connector"]) for d in (await self.call("GET", "/api/devices"))[1]["devices"]],
            [("a", "primary"), ("b", None), ("c", None)],
        )

    async def test_commands(self) -> None:
        """A queued command is listed and counted as pending; unknown devices are 404s."""
        await self.call("PUT", "/api/devices/5", json_body={})
        code, command = await self.call(
            "POST", "/api/devices/5/commands", json_body={"type": "set_run_hours", "seconds": 3600}
        )
        self.assertEqual(
            (code, command["type"], command["params"], command["status"]),
            (202, "set_run_hours", {"seconds": 3600}, "queued"),
        )
        code, listing = await self.call("GET", "/api/devices/5/commands")
        self.assertEqual([c["id"] for c in listing["commands"]], [command["id"]])
        self.assertEqual(listing["commands"][0], command)
        self.assertEqual((await self.call("GET", "/api/devices/5"))[1]["pending_commands"], 1)
        self.assertEqual(
            (await self.call("POST", "/api/devices/6/commands", json_body={"type": "remote_reset"}))[0],
            404,
        )

    async def test_wrong_token(self) -> None:
        """Over the socket too, a wrong token is a 401 and nothing is created."""
        code, _ = await self.call("PUT", "/api/devices/9", json_body={}, token="wrong")
        self.assertEqual(code, 401)
        self.assertIsNone(await self.registry.get_device(9))
