"""
Tests for what the console adds to the management API: the device search
and filters (on the real registry, SQLite and PostgreSQL, and through the
API), ``GET /api/fleet``, the live stream, recordings, and the console's
static files with their security headers.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet import reactor
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.internet.error import ConnectionDone
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.server import NOT_DONE_YET
from twisted.web.test.requesthelper import DummyRequest

from oemrelay.activity import FleetActivity
from oemrelay.api import build_api
from oemrelay.codec import Frame, MessageType
from oemrelay.console import CONTENT_SECURITY_POLICY, SiteRoot
from oemrelay.live import LiveHub
from oemrelay.registry import DeviceRecord, Registry
from oemrelay.registry.devices import DeviceQuery

from .postgres import fresh_schema_url
from .test_api import AUTH, CONNECTORS, NOW, TOKEN, FakeRegistry, _ApiTestCase
from .test_live import HELLO, SERIAL, events_of, upload
from .test_registry import hello


class SearchingRegistry(FakeRegistry):
    """The fake registry, also answering the console's queries."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[DeviceRecord] = []

    def search_devices(self, query: DeviceQuery):
        return self._answer("search_devices", (query,), self.found[: query.limit])

    def fleet_counts(self):
        counts = {"devices": 3, "connected": 1, "failing": 1, "nodes": {"a": 1}}
        return self._answer("fleet_counts", (), counts)


class _ConsoleApiTestCase(_ApiTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.registry = SearchingRegistry()
        self.hub = LiveHub(self.clock)
        self.activity = FleetActivity(self.clock)
        self.resource = build_api(
            self.registry, TOKEN, CONNECTORS, self.clock,
            live=self.hub, activity=self.activity, spool_stats=lambda: {"depth": 2},
        )
        from treq.testing import StubTreq

        self.stub = StubTreq(self.resource)


# -- the registry's search --------------------------------------------------------


class DeviceSearchScenariosMixin:
    """search_devices on a real registry; ``make_database()`` gives an empty one's URL."""

    async def make_database(self) -> str:
        raise NotImplementedError

    async def setUp(self) -> None:
        self.registry = Registry.from_url(await self.make_database(), reactor=reactor)
        self.addCleanup(self.registry.close)
        await self.registry.start()
        await self.registry.device_connected(hello(10, imei="351111"), "node-a", NOW - 7200)
        await self.registry.device_connected(hello(11, imei="352222"), "node-b", NOW)
        await self.registry.device_disconnected(10, "node-a", NOW - 7200)
        await self.registry.update_device(12, {"custom2": "fleet-north", "custom1": "351"})
        await self.registry.delivery_failed(11, "end server answered 500", NOW)

    async def serials(self, **query: Any) -> list[int]:
        found = await self.registry.search_devices(DeviceQuery(limit=query.pop("limit", 10), **query))
        return [device.serial for device in found]

    async def test_search_by_prefix(self) -> None:
        """A search matches the start of an IMEI or a custom field, across devices."""
        self.assertEqual(await self.serials(search="351"), [10, 12])
        self.assertEqual(await self.serials(search="fleet-n"), [12])
        self.assertEqual(await self.serials(search="leet"), [])

    async def test_search_by_serial(self) -> None:
        """A number matches that serial exactly (and prefixes of text fields)."""
        self.assertEqual(await self.serials(search="11"), [11])

    async def test_search_does_not_match_sql(self) -> None:
        """SQL wildcards and quotes in a search are plain text."""
        self.assertEqual(await self.serials(search="%"), [])
        self.assertEqual(await self.serials(search="' OR 1=1 --"), [])

    async def test_filters(self) -> None:
        """connected, failing and silent_before each select their devices."""
        self.assertEqual(await self.serials(connected=True), [11])
        self.assertEqual(await self.serials(failing=True), [11])
        self.assertEqual(await self.serials(silent_before=NOW - 3600), [10])
        # The boundary: last seen exactly at the limit is not "before" it.
        self.assertEqual(await self.serials(silent_before=NOW - 7200), [])

    async def test_sort_by_last_seen(self) -> None:
        """last_seen sorts the most recent first and never-seen devices last, then pages."""
        self.assertEqual(await self.serials(sort="last_seen"), [11, 10, 12])
        self.assertEqual(await self.serials(sort="last_seen", limit=1, offset=1), [10])

    async def test_after_pages(self) -> None:
        """after pages in serial order."""
        self.assertEqual(await self.serials(after=10, limit=1), [11])

    async def test_bad_sort(self) -> None:
        """An unknown sort is a ValueError."""
        with self.assertRaises(ValueError):
            await self.serials(sort="imei")

    async def test_fleet_counts(self) -> None:
        """fleet_counts counts devices, connected, failing, and connected devices by node."""
        self.assertEqual(
            await self.registry.fleet_counts(),
            {"devices": 3, "connected": 1, "failing": 1, "nodes": {"node-b": 1}},
        )


class SQLiteDeviceSearchTests(DeviceSearchScenariosMixin, TestCase):
    """The search on SQLite."""

    async def make_database(self) -> str:
        return "sqlite:" + self.mktemp()

    async def test_search_uses_indexes(self) -> None:
        """SQLite answers a search from the indexes, scanning no table."""
        query = DeviceQuery(limit=10, search="351")
        where, params = query.where()
        plan = await self.registry.database.pool.runQuery(
            f"EXPLAIN QUERY PLAN SELECT serial FROM devices WHERE {where}", params
        )
        details = " ".join(row[-1] for row in plan)
        self.assertIn("devices_imei", details)
        self.assertNotIn("SCAN devices", details)


class PostgreSQLDeviceSearchTests(DeviceSearchScenariosMixin, TestCase):
    """The search on PostgreSQL."""

    async def make_database(self) -> str:
        return await fresh_schema_url(self)


# -- the API ------------------------------------------------------------------------


class DeviceListTests(_ConsoleApiTestCase):
    """GET /api/devices with the console's parameters."""

    def test_filters_passed_to_the_registry(self) -> None:
        """q, connected, failing, silent_hours and sort become one DeviceQuery."""
        self.registry.found = [DeviceRecord(5), DeviceRecord(6)]
        status, body = self.call(
            "GET", "/api/devices?q=abc&connected=true&failing=true&silent_hours=2"
            "&sort=last_seen&offset=10&limit=1",
        )
        self.assertEqual(status, 200)
        ((query,),) = self.registry.called("search_devices")
        self.assertEqual(
            query,
            DeviceQuery(limit=2, offset=10, search="abc", connected=True, failing=True,
                        silent_before=NOW - 7200, sort="last_seen"),
        )
        self.assertEqual(([d["serial"] for d in body["devices"]], body["next"]), ([5], 11))

    def test_plain_listing_unchanged(self) -> None:
        """Without the new parameters the listing is list_devices, as before."""
        self.registry.add(DeviceRecord(1))
        self.assertEqual(self.call("GET", "/api/devices")[0], 200)
        self.assertEqual(self.registry.called("search_devices"), [])
        self.assertEqual(self.registry.called("list_devices"), [(101, None)])

    def test_serial_sort_pages_by_after(self) -> None:
        """In serial order next is the last serial; offset is refused."""
        self.registry.found = [DeviceRecord(5), DeviceRecord(6)]
        self.assertEqual(self.call("GET", "/api/devices?q=x&limit=1")[1]["next"], 5)
        self.assertError(self.call("GET", "/api/devices?offset=3"), 400, "after")
        self.assertError(self.call("GET", "/api/devices?sort=last_seen&after=3"), 400, "offset")

    def test_bad_parameters(self) -> None:
        """Bad flags, sorts and hours are 400s naming the parameter."""
        self.assertError(self.call("GET", "/api/devices?connected=yes"), 400, "connected")
        self.assertError(self.call("GET", "/api/devices?sort=imei"), 400, "sort")
        self.assertError(self.call("GET", "/api/devices?silent_hours=0"), 400, "silent_hours")
        self.assertError(self.call("GET", "/api/devices?q=a%00b"), 400, "NUL")

    def test_silent_hours_bounds(self) -> None:
        """silent_hours takes 1 to 8784 (a year); 8785 is a 400."""
        self.assertEqual(self.call("GET", "/api/devices?silent_hours=8784")[0], 200)
        self.assertError(self.call("GET", "/api/devices?silent_hours=8785"), 400, "8784")


class FleetTests(_ConsoleApiTestCase):
    """GET /api/fleet."""

    def test_summary(self) -> None:
        """The fleet joins registry counts, this node's activity and the spool's stats."""
        self.activity.upload_committed(upload(records=4), 0.1)
        status, body = self.call("GET", "/api/fleet?minutes=5")
        self.assertEqual(status, 200)
        self.assertEqual(body["registry"]["connected"], 1)
        self.assertEqual(body["activity"]["records_committed"], 4)
        self.assertEqual(body["activity"]["minutes"], 5)
        self.assertEqual(body["activity"]["spool"], {"depth": 2})

    def test_minutes_bounds(self) -> None:
        """minutes takes 1 to 60."""
        self.assertEqual(self.call("GET", "/api/fleet?minutes=60")[0], 200)
        self.assertError(self.call("GET", "/api/fleet?minutes=61"), 400, "minutes")
        self.assertError(self.call("GET", "/api/fleet?minutes=0"), 400, "minutes")

    def test_needs_token(self) -> None:
        """The fleet needs the bearer token like every API path."""
        self.assertError(self.call("GET", "/api/fleet", headers={}), 401)


class RecordingApiTests(_ConsoleApiTestCase):
    """POST /api/devices/{serial}/recordings, GET /api/recordings[/{id}]."""

    def test_record_list_download(self) -> None:
        """A recording started through the API is listed and downloads as a capture."""
        self.registry.add(DeviceRecord(SERIAL))
        status, started = self.call(
            "POST", f"/api/devices/{SERIAL}/recordings", json_body={"minutes": 2}
        )
        self.assertEqual((status, started["id"], started["recording"]), (201, 1, True))
        self.hub.frame_received(HELLO, Frame(MessageType.COMMIT_REQUEST, b""))
        status, listed = self.call("GET", "/api/recordings")
        self.assertEqual(listed["recordings"][0]["frames"], 1)
        response, content = self.request("GET", "/api/recordings/1")
        self.assertEqual(response.code, 200)
        self.assertEqual(
            response.headers.getRawHeaders(b"content-type"), [b"text/plain; charset=us-ascii"]
        )
        self.assertIn(b"attachment", response.headers.getRawHeaders(b"content-disposition")[0])
        self.assertIn(b"02 55 05 00 00", content)

    def test_bad_minutes(self) -> None:
        """Minutes 0, past 60, a string or an unknown key are 400s."""
        self.registry.add(DeviceRecord(SERIAL))
        for body in ({"minutes": 0}, {"minutes": 61}, {"minutes": "5"}, {"seconds": 5}):
            self.assertError(
                self.call("POST", f"/api/devices/{SERIAL}/recordings", json_body=body), 400
            )

    def test_unknown_device_and_recording(self) -> None:
        """An unknown device cannot be recorded; an unknown or non-numeric id is a 404."""
        self.assertError(
            self.call("POST", "/api/devices/9/recordings", json_body={"minutes": 1}), 404
        )
        self.assertError(self.call("GET", "/api/recordings/7"), 404, "recording")
        self.assertError(self.call("GET", "/api/recordings/x"), 404, "recording")

    def test_without_live_hub(self) -> None:
        """Without a live hub the recordings paths answer 404."""
        resource = build_api(self.registry, TOKEN, CONNECTORS, self.clock)
        from treq.testing import StubTreq

        self.stub = StubTreq(resource)
        self.assertError(self.call("GET", "/api/recordings"), 404, "not enabled")


class _StreamRequest(DummyRequest):
    """A DummyRequest that keeps its producer (DummyRequest's own loops resuming it)."""

    streamingProducer = None

    def registerProducer(self, producer, streaming: bool) -> None:
        self.producer, self.streamingProducer = producer, streaming


class LiveStreamTests(SynchronousTestCase):
    """GET /api/devices/{serial}/live, rendered into a DummyRequest."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        self.registry = SearchingRegistry()
        self.registry.add(DeviceRecord(SERIAL))
        self.hub = LiveHub(self.clock, max_watchers=1)
        self.resource = build_api(self.registry, TOKEN, CONNECTORS, self.clock, live=self.hub)

    def open(self, serial: int = SERIAL) -> DummyRequest:
        request = _StreamRequest([])
        request.path = request.uri = f"/api/devices/{serial}/live".encode()
        request.requestHeaders.setRawHeaders(b"authorization", [AUTH["Authorization"].encode()])
        self.assertEqual(self.resource.render(request), NOT_DONE_YET)
        return request

    def test_stream(self) -> None:
        """The stream is text/event-stream, registered as a producer, and carries uploads."""
        request = self.open()
        self.assertEqual(request.responseCode, 200)
        self.assertEqual(
            request.responseHeaders.getRawHeaders(b"content-type"), [b"text/event-stream"]
        )
        self.assertTrue(request.streamingProducer)
        self.hub.upload_received(upload())
        (event,) = events_of(request.written)
        self.assertEqual(event["type"], "upload")
        self.assertEqual(request.finished, 0)

    def test_closed_stream_unwatched(self) -> None:
        """When the browser goes away the device is no longer watched."""
        request = self.open()
        request.processingFailed(Failure(ConnectionDone()))
        before = list(request.written)
        self.hub.upload_received(upload())
        self.assertEqual(request.written, before)
        # Its place is free again.
        self.assertEqual(self.open().responseCode, 200)

    def test_too_many_watchers(self) -> None:
        """A watcher past max_watchers gets a 429 and a finished answer."""
        self.open()
        second = self.open()
        self.assertEqual((second.responseCode, second.finished), (429, 1))

    def test_unknown_device(self) -> None:
        """An unknown device's stream is a 404."""
        request = self.open(SERIAL + 1)
        self.assertEqual(request.responseCode, 404)


# -- the console's files -----------------------------------------------------------------


class ConsoleFilesTests(SynchronousTestCase):
    """The static console beside the API."""

    def setUp(self) -> None:
        from treq.testing import StubTreq

        api_resource = build_api(FakeRegistry(), TOKEN, CONNECTORS, Clock())
        self.stub = StubTreq(SiteRoot(api_resource))

    def get(self, path: str, headers: dict | None = None):
        d = self.stub.get("http://relay.example" + path, headers=headers, allow_redirects=False)
        self.stub.flush()
        response = self.successResultOf(d)
        return response, self.successResultOf(self.stub.content(response))

    def test_files_with_security_headers(self) -> None:
        """Each console file is served, without a token, with a strict CSP and nosniff."""
        for path, content_type in (
            ("/console/", b"text/html; charset=utf-8"),
            ("/console/app.js", b"text/javascript; charset=utf-8"),
            ("/console/app.css", b"text/css; charset=utf-8"),
        ):
            response, content = self.get(path)
            self.assertEqual(response.code, 200, path)
            self.assertTrue(content)
            headers = response.headers
            self.assertEqual(headers.getRawHeaders(b"content-type"), [content_type])
            self.assertEqual(headers.getRawHeaders(b"x-content-type-options"), [b"nosniff"])
            (policy,) = headers.getRawHeaders(b"content-security-policy")
            self.assertEqual(policy, CONTENT_SECURITY_POLICY)
            self.assertIn(b"frame-ancestors 'none'", policy)
            self.assertIn(b"script-src 'self';", policy)
            self.assertNotIn(b"unsafe-inline", policy)

    def test_no_inline_script_or_style(self) -> None:
        """The page holds no inline script, style or event attribute (the CSP would block them)."""
        _, page = self.get("/console/")
        self.assertNotRegex(page, rb"<script(?![^>]*\bsrc=)")
        self.assertNotIn(b"<style", page)
        self.assertNotRegex(page, rb"\son[a-z]+=")

    def test_script_never_sets_markup(self) -> None:
        """The script never writes markup from data: no innerHTML, outerHTML or insertAdjacentHTML."""
        _, script = self.get("/console/app.js")
        for sink in (b"innerHTML", b"outerHTML", b"insertAdjacentHTML", b"document.write"):
            self.assertNotIn(sink, script)

    def test_unknown_file(self) -> None:
        """A file the console does not ship is a 404, a path outside it too."""
        self.assertEqual(self.get("/console/../oemrelay/api.py")[0].code, 404)
        self.assertEqual(self.get("/console/secret.txt")[0].code, 404)

    def test_redirect_to_slash(self) -> None:
        """/console redirects to /console/."""
        response, _ = self.get("/console")
        self.assertEqual(response.code, 302)
        self.assertEqual(response.headers.getRawHeaders(b"location"), [b"/console/"])

    def test_api_still_answers(self) -> None:
        """API paths pass through the root unchanged, token and all."""
        response, content = self.get("/api/devices", AUTH)
        self.assertEqual((response.code, json.loads(content)), (200, {"devices": [], "next": None}))
        self.assertEqual(self.get("/api/devices")[0].code, 401)


class ConsolePackagingTests(SynchronousTestCase):
    """The console ships in the wheel (no build step at install)."""

    def test_console_files_in_wheel(self) -> None:
        """index.html, app.js and app.css are package data of oemrelay.console."""
        from oemrelay.console import FILES

        from .test_packaging import _built_wheel

        names = _built_wheel().names
        for filename, _ in FILES.values():
            self.assertIn(f"oemrelay/console/{filename}", names)
