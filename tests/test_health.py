"""
Tests for the operator's paths of the management API: ``/healthz``,
``/readyz``, ``/metrics``; and the service's readiness checks and start-up line.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.logger import formatEvent
from twisted.trial.unittest import SynchronousTestCase
from treq.testing import StubTreq

from oemrelay.api import READY_CHECK_TIMEOUT, build_api, build_api_site
from oemrelay.config import config_from_string
from oemrelay.metrics import RelayMetrics
from oemrelay.service import STARTUP_FORMAT, ready_checks, startup_fields

from .test_api import AUTH, BASE, CONNECTORS, TOKEN, FakeRegistry


class _OpsTestCase(SynchronousTestCase):
    """The API with metrics and readiness checks the test chooses, through StubTreq."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.registry = FakeRegistry()
        self.metrics = RelayMetrics()
        self.checks: list = []

    def build(self, **options) -> None:
        options.setdefault("metrics", self.metrics.exposition)
        options.setdefault("ready_checks", self.checks)
        self.stub = StubTreq(build_api(self.registry, TOKEN, CONNECTORS, self.clock, **options))

    def request(self, method: str, path: str, headers: dict | None = None, flush: bool = True):
        """Send one request; its Deferred response."""
        if not hasattr(self, "stub"):
            self.build()
        answer = self.stub.request(method, BASE + path, headers=headers or {})
        if flush:
            self.stub.flush()
        return answer

    def answer(self, method: str, path: str, headers: dict | None = None) -> tuple[int, bytes, object]:
        """Status, body and headers of one request answered at once."""
        response = self.successResultOf(self.request(method, path, headers))
        body = self.successResultOf(self.stub.content(response))
        return response.code, body, response.headers


class HealthzTests(_OpsTestCase):
    """GET /healthz: alive, no token."""

    def test_ok_without_token(self) -> None:
        """200 ok in plain text, with no Authorization header and no registry call."""
        code, body, headers = self.answer("GET", "/healthz")
        self.assertEqual((code, body), (200, b"ok\n"))
        self.assertEqual(headers.getRawHeaders(b"content-type"), [b"text/plain; charset=utf-8"])
        self.assertEqual(headers.getRawHeaders(b"cache-control"), [b"no-store"])
        self.assertEqual(self.registry.calls, [])

    def test_head(self) -> None:
        """HEAD is answered 200 with no body."""
        code, body, _ = self.answer("HEAD", "/healthz")
        self.assertEqual((code, body), (200, b""))

    def test_post_not_allowed(self) -> None:
        """POST is a 405 whose Allow names GET."""
        code, _, headers = self.answer("POST", "/healthz")
        self.assertEqual(code, 405)
        self.assertIn(b"GET", headers.getRawHeaders(b"allow")[0])

    def test_only_exact_path(self) -> None:
        """/healthz/x is not the health path: it is an API path, so it needs the token."""
        code, _, _ = self.answer("GET", "/healthz/x")
        self.assertEqual(code, 401)


class ReadyzTests(_OpsTestCase):
    """GET /readyz: every check passes, or a 503 naming the failing ones."""

    def test_no_checks_ready(self) -> None:
        """With nothing to check it is ready."""
        self.assertEqual(self.answer("GET", "/readyz")[:2], (200, b"ok\n"))

    def test_every_check_passes(self) -> None:
        """Checks returning a value or a Deferred that fires: 200 ok, no token needed."""
        self.checks += [("listeners", lambda: None), ("registry", lambda: succeed(("1",)))]
        self.assertEqual(self.answer("GET", "/readyz")[:2], (200, b"ok\n"))

    def test_failing_checks_named(self) -> None:
        """A check that raises and one whose Deferred fails: 503, one line each with its name and reason."""

        def unbound() -> None:
            raise RuntimeError("not bound: tcp:20500")

        self.checks += [
            ("listeners", unbound),
            ("spool", lambda: None),
            ("registry", lambda: fail(OSError("database is locked"))),
        ]
        code, body, _ = self.answer("GET", "/readyz")
        self.assertEqual(code, 503)
        self.assertEqual(
            body,
            b"not ready: listeners: not bound: tcp:20500\n"
            b"not ready: registry: database is locked\n",
        )

    def test_check_without_answer_times_out(self) -> None:
        """A check with no answer fails after READY_CHECK_TIMEOUT seconds, not a moment before."""
        self.checks.append(("registry", Deferred))
        pending = self.request("GET", "/readyz")
        self.clock.advance(READY_CHECK_TIMEOUT - 0.001)
        self.stub.flush()
        self.assertNoResult(pending)
        self.clock.advance(0.001)
        self.stub.flush()
        response = self.successResultOf(pending)
        body = self.successResultOf(self.stub.content(response))
        self.assertEqual(response.code, 503)
        self.assertEqual(body, b"not ready: registry: no answer within 5s\n")


class MetricsEndpointTests(_OpsTestCase):
    """GET /metrics: Prometheus text, behind the token unless public."""

    def test_with_token(self) -> None:
        """With the token: 200 in Prometheus' text format, counting what happened."""
        self.metrics.connection_opened("p")
        code, body, headers = self.answer("GET", "/metrics", AUTH)
        self.assertEqual(code, 200)
        self.assertTrue(headers.getRawHeaders(b"content-type")[0].startswith(b"text/plain; version=0.0.4"))
        self.assertIn(b"oemrelay_device_connections_total 1.0\n", body)

    def test_missing_token(self) -> None:
        """No token: 401 with a Bearer challenge, and no metric in the body."""
        code, body, headers = self.answer("GET", "/metrics")
        self.assertEqual(code, 401)
        self.assertTrue(headers.getRawHeaders(b"www-authenticate")[0].startswith(b"Bearer"))
        self.assertNotIn(b"oemrelay_", body)

    def test_wrong_token(self) -> None:
        """A wrong token: 401 invalid_token."""
        code, body, _ = self.answer("GET", "/metrics", {"Authorization": "Bearer nope"})
        self.assertEqual(code, 401)
        self.assertIn(b"invalid bearer token", body)

    def test_public(self) -> None:
        """metrics_public: 200 with no token."""
        self.build(metrics_public=True)
        code, body, _ = self.answer("GET", "/metrics")
        self.assertEqual(code, 200)
        self.assertIn(b"oemrelay_build_info", body)

    def test_public_does_not_open_the_api(self) -> None:
        """metrics_public leaves /api/ behind the token."""
        self.build(metrics_public=True)
        self.assertEqual(self.answer("GET", "/api/devices")[0], 401)

    def test_post_not_allowed(self) -> None:
        """POST /metrics is a 405."""
        self.assertEqual(self.answer("POST", "/metrics", AUTH)[0], 405)

    def test_without_metrics(self) -> None:
        """An API built with no metrics answers /metrics as an unknown path."""
        self.build(metrics=None)
        self.assertEqual(self.answer("GET", "/metrics", AUTH)[0], 404)


class _Listener:
    def __init__(self, description: str, port: object = None) -> None:
        self.description = description
        self.port = port


class _Database:
    def __init__(self) -> None:
        self.queries: list[str] = []

    def query_one(self, sql: str) -> Deferred:
        self.queries.append(sql)
        return succeed((1,))


class _Registry:
    def __init__(self) -> None:
        self.database = _Database()


class ReadyChecksTests(SynchronousTestCase):
    """The service's readiness checks."""

    def test_unbound_listener_named(self) -> None:
        """A listener not yet bound fails the listeners check, naming its endpoint; a bound one does not."""
        listeners = [_Listener("tcp:20500", port=object()), _Listener("tcp:8080")]
        checks = dict(ready_checks(_Registry(), listeners))
        error = self.assertRaises(RuntimeError, checks["listeners"])
        self.assertEqual(str(error), "not bound: tcp:8080")
        listeners[1].port = object()
        self.assertIsNone(checks["listeners"]())

    def test_listeners_read_at_check_time(self) -> None:
        """A listener added after the checks were made is checked too."""
        listeners: list = []
        checks = dict(ready_checks(_Registry(), listeners))
        listeners.append(_Listener("tcp:8080"))
        self.assertRaises(RuntimeError, checks["listeners"])

    def test_registry_cheap_query(self) -> None:
        """The registry check runs SELECT 1."""
        registry = _Registry()
        checks = dict(ready_checks(registry, []))
        self.successResultOf(checks["registry"]())
        self.assertEqual(registry.database.queries, ["SELECT 1"])


_SECRET_CONFIG = """\
[relay]
listen = tcp:20500 tcp:20501
connector = platform
registry = postgresql://relay:hunter2@db.example:5432/oemrelay

[connector:platform]
type = http
url = https://user.example:8443/dm/secret-path?code=key123
username = relay
password = pa55word

[connector:other]
type = file
path = uploads.jsonl

[api]
listen = tcp:8080
token = tok3n
"""


class StartupLineTests(SynchronousTestCase):
    """The start-up line says what runs and holds no secret."""

    def line(self, text: str, registry_url: str = "sqlite:/var/lib/r.db") -> str:
        fields = startup_fields(config_from_string(text), registry_url)
        return formatEvent({"log_format": STARTUP_FORMAT, **fields})

    def test_what_runs(self) -> None:
        """Listeners, the devices' connector with type and host, registry, API and workers."""
        line = self.line(_SECRET_CONFIG, "postgresql://relay@db.example:5432/oemrelay")
        self.assertIn("devices on tcp:20500 tcp:20501;", line)
        self.assertIn("connector platform: http to https://user.example:8443, auth basic;", line)
        self.assertIn("registry postgresql://relay@db.example:5432/oemrelay;", line)
        self.assertIn("API tcp:8080;", line)
        self.assertTrue(line.endswith("workers 1"), line)

    def test_every_connector_devices_use(self) -> None:
        """With connector = a b, both are named with their targets, in the configured order."""
        line = self.line(
            "[relay]\nconnector = b a\n"
            "[connector:a]\ntype = file\npath = a.jsonl\n"
            "[connector:b]\ntype = file\npath = b.jsonl\n"
            "[connector:unused]\ntype = file\npath = c.jsonl\n"
        )
        self.assertIn("; connector b: file b.jsonl; connector a: file a.jsonl;", line)
        self.assertNotIn("unused", line)

    def test_no_secrets(self) -> None:
        """No URL path or query, password, token, or registry password."""
        line = self.line(_SECRET_CONFIG, "postgresql://relay@db.example:5432/oemrelay")
        for secret in ("secret-path", "key123", "pa55word", "tok3n", "hunter2"):
            self.assertNotIn(secret, line)

    def test_only_connector_and_api_off(self) -> None:
        """With no [relay] connector the only section is named; without [api] the API is off."""
        line = self.line("[connector:files]\ntype = file\npath = u.jsonl\n")
        self.assertIn("connector files: file u.jsonl;", line)
        self.assertIn("API off;", line)


class ApiSiteTests(SynchronousTestCase):
    """The API's Site is quiet."""

    def test_quiet(self) -> None:
        """No "Starting factory" line and no access-log line per request."""
        site = build_api_site(FakeRegistry(), TOKEN, CONNECTORS, Clock())
        self.assertFalse(site.noisy)
        written: list = []
        site.logFile = type("File", (), {"write": written.append})()
        site.log(object())
        self.assertEqual(written, [])
