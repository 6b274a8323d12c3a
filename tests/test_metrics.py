"""
Tests for :mod:`oemrelay.metrics`: what each relay event counts, the bounded
labels, the spool gauges, registry call timing and the multiprocess sum.
"""

from __future__ import annotations

import os
import subprocess
import sys

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from oemrelay import __version__
from oemrelay.events import Observers
from oemrelay.metrics import MAX_ERROR_REASONS, RelayMetrics, reason_label
from oemrelay.registry.database import _SQLITE, Database
from oemrelay.relay import Relay

from .test_session import COMMIT, DATA_2, SessionTestMixin


def samples(metrics: RelayMetrics) -> dict[tuple[str, tuple], float]:
    """Every sample of the exposition text, by (name, sorted labels)."""
    text = metrics.exposition().decode("utf-8")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


class FakeSpool:
    """A spool whose depth and oldest age the test sets."""

    def __init__(self, depth: int, oldest_age: float | None) -> None:
        self._depth = depth
        self._oldest_age = oldest_age

    def depth(self) -> int:
        return self._depth

    def oldest_age(self) -> float | None:
        return self._oldest_age


class RelayMetricsTests(SynchronousTestCase):
    """Each event, told through the relay's Observers, moves its metric."""

    def setUp(self) -> None:
        self.metrics = RelayMetrics()
        self.observers = Observers()
        self.observers.subscribe(self.metrics)

    def value(self, name: str, **labels: str) -> float:
        return samples(self.metrics)[(name, tuple(sorted(labels.items())))]

    def test_connections_open_and_total(self) -> None:
        """Two opened and one closed: one open now, two in total, one session ended by the device."""
        self.observers.connection_opened("127.0.0.1:1")
        self.observers.connection_opened("127.0.0.1:2")
        self.observers.connection_closed(None, "127.0.0.1:1", "device")
        self.assertEqual(self.value("oemrelay_device_connections_open"), 1)
        self.assertEqual(self.value("oemrelay_device_connections_total"), 2)
        self.assertEqual(self.value("oemrelay_sessions_total", outcome="device"), 1)

    def test_withheld_by_kind(self) -> None:
        """Withheld commits are counted by their kind, not their reason text."""
        self.observers.commit_withheld(None, "timeout", "not confirmed within 20s")
        self.observers.commit_withheld(None, "timeout", "not confirmed within 30s")
        self.assertEqual(self.value("oemrelay_commits_withheld_total", kind="timeout"), 2)

    def test_connector_requests_durations_and_retries(self) -> None:
        """Tries are counted by connector and status class, their seconds summed; retries by connector."""
        self.observers.delivery_attempted("platform", "5xx", 0.25)
        self.observers.delivery_attempted("platform", "2xx", 0.5)
        self.observers.delivery_retried("platform")
        self.assertEqual(
            self.value("oemrelay_connector_requests_total", connector="platform", outcome="5xx"), 1
        )
        self.assertEqual(
            self.value("oemrelay_connector_request_seconds_sum", connector="platform"), 0.75
        )
        self.assertEqual(
            self.value("oemrelay_connector_request_seconds_count", connector="platform"), 2
        )
        self.assertEqual(self.value("oemrelay_connector_retries_total", connector="platform"), 1)

    def test_registry_call_seconds(self) -> None:
        """A registry call's seconds are observed under its call name."""
        self.observers.registry_called("txn_profile_for", 0.125)
        self.assertEqual(
            self.value("oemrelay_registry_call_seconds_sum", call="txn_profile_for"), 0.125
        )

    def test_build_info(self) -> None:
        """build_info carries the running version, value 1."""
        self.assertEqual(self.value("oemrelay_build_info", version=__version__), 1)

    def test_reasons_lose_their_numbers(self) -> None:
        """Two bad-sync errors with different bytes are one reason, counted twice."""
        self.observers.protocol_error(None, "p", "bad sync bytes 0255")
        self.observers.protocol_error(None, "p", "bad sync bytes 7f41")
        self.assertEqual(
            self.value("oemrelay_decode_errors_total", reason="bad sync bytes N"), 2
        )

    def test_reason_label(self) -> None:
        """Decimal, 0x hex and hex bytes become N; words stay."""
        self.assertEqual(
            reason_label("message type 0x21 before hello"), "message type N before hello"
        )
        self.assertEqual(
            reason_label("field 12 in record 565 declares 9 bytes, 3 left"),
            "field N in record N declares N bytes, N left",
        )
        self.assertEqual(reason_label("bad sync bytes ff02"), "bad sync bytes N")

    def test_reasons_capped(self) -> None:
        """The first MAX_ERROR_REASONS reasons keep their name; the next is "other"; a known one still counts as itself."""
        words = [chr(ord("a") + n // 26) + chr(ord("a") + n % 26) for n in range(MAX_ERROR_REASONS + 1)]
        for word in words:
            self.observers.protocol_error(None, "p", f"broken {word}")
        self.observers.protocol_error(None, "p", f"broken {words[0]}")
        reasons = {
            dict(labels)["reason"]: value
            for (name, labels), value in samples(self.metrics).items()
            if name == "oemrelay_decode_errors_total"
        }
        self.assertEqual(len(reasons), MAX_ERROR_REASONS + 1)
        self.assertEqual(reasons["other"], 1)
        self.assertEqual(reasons[f"broken {words[MAX_ERROR_REASONS - 1]}"], 1)
        self.assertNotIn(f"broken {words[MAX_ERROR_REASONS]}", reasons)
        self.assertEqual(reasons[f"broken {words[0]}"], 2)

    def test_no_spool_no_spool_metrics(self) -> None:
        """Without a spool source there are no spool series."""
        self.assertFalse(any(name.startswith("oemrelay_spool") for name, _ in samples(self.metrics)))

    def test_spool_read_at_scrape(self) -> None:
        """The spool's depth and oldest age are what it says at the scrape."""
        spool = FakeSpool(3, 42.5)
        metrics = RelayMetrics(spool)
        self.assertEqual(samples(metrics)[("oemrelay_spool_depth", ())], 3)
        self.assertEqual(samples(metrics)[("oemrelay_spool_oldest_age_seconds", ())], 42.5)
        spool._depth, spool._oldest_age = 0, None
        self.assertEqual(samples(metrics)[("oemrelay_spool_depth", ())], 0)
        self.assertEqual(samples(metrics)[("oemrelay_spool_oldest_age_seconds", ())], 0)

    def test_relays_do_not_share_counts(self) -> None:
        """Each RelayMetrics has its own registry: another one's events do not show."""
        RelayMetrics().connection_opened("p")
        self.assertEqual(self.value("oemrelay_device_connections_total"), 0)


class SessionMetricsTests(SessionTestMixin, SynchronousTestCase):
    """A real device session feeding the metrics."""

    def make_relay(self) -> Relay:
        self.metrics = RelayMetrics()
        observers = Observers()
        observers.subscribe(self.metrics)
        return Relay({"main": self.connector}, "main", observers=observers)

    def test_records_received_and_committed(self) -> None:
        """Two records asked to commit are received; once delivered, committed, with the commit's seconds."""
        self.greet()
        self.send(DATA_2, COMMIT)
        values = samples(self.metrics)
        self.assertEqual(values[("oemrelay_records_received_total", ())], 2)
        self.assertEqual(values[("oemrelay_records_committed_total", ())], 0)
        self.clock.advance(1.5)
        self.link.answer().callback(None)
        values = samples(self.metrics)
        self.assertEqual(values[("oemrelay_records_committed_total", ())], 2)
        self.assertEqual(values[("oemrelay_commit_seconds_sum", ())], 1.5)

    def test_no_device_labels(self) -> None:
        """Neither the serial nor the peer appears anywhere in the exposition."""
        self.greet()
        self.send(DATA_2, COMMIT)
        self.link.answer().callback(None)
        text = self.metrics.exposition().decode("utf-8")
        self.assertNotIn(str(self.protocol.session.hello.serial), text)
        self.assertNotIn(self.protocol.session.peer, text)


class _FakeDbapi:
    paramstyle = "qmark"


class _FakePool:
    """A connection pool whose transactions finish when the test says."""

    dbapi = _FakeDbapi

    def __init__(self) -> None:
        self.pending: list[Deferred] = []

    def runInteraction(self, function, *args) -> Deferred:
        called: Deferred = Deferred()
        self.pending.append(called)
        return called


class _CallRecorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, float]] = []

    def registry_called(self, call: str, seconds: float) -> None:
        self.calls.append((call, seconds))


class RegistryTimingTests(SynchronousTestCase):
    """Database.interaction tells its call observer how long each call took."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.pool = _FakePool()
        self.database = Database(self.pool, _SQLITE, "sqlite:/x", self.clock)
        self.database._not_started = None  # as after start()

    def test_call_timed_until_its_result(self) -> None:
        """A call answered 0.25 s later is told as its function's name and 0.25 s; the result passes through."""
        recorder = _CallRecorder()
        self.database.call_observer = recorder
        result = self.database.query_one("SELECT 1")
        self.clock.advance(0.25)
        self.assertEqual(recorder.calls, [])
        self.pool.pending[0].callback(("row",))
        self.assertEqual(recorder.calls, [("fetch_one", 0.25)])
        self.assertEqual(self.successResultOf(result), ("row",))

    def test_failed_call_timed_and_still_failing(self) -> None:
        """A failing call is timed too, and its failure reaches the caller."""
        recorder = _CallRecorder()
        self.database.call_observer = recorder
        result = self.database.write("UPDATE x SET y = 1")
        self.pool.pending[0].errback(RuntimeError("gone"))
        self.assertEqual(recorder.calls, [("rowcount", 0)])
        self.failureResultOf(result, RuntimeError)

    def test_no_observer_no_timing(self) -> None:
        """Without a call observer the result is untouched."""
        result = self.database.query_all("SELECT 1")
        self.pool.pending[0].callback([])
        self.assertEqual(self.successResultOf(result), [])


_WORKER = """
import sys
from oemrelay.metrics import RelayMetrics
metrics = RelayMetrics()
for _ in range(int(sys.argv[1])):
    metrics.connection_opened("p")
"""

_SCRAPE = """
import sys
from oemrelay.metrics import RelayMetrics
sys.stdout.write(RelayMetrics().exposition(sys.argv[1]).decode())
"""


class MultiprocessTests(SynchronousTestCase):
    """With PROMETHEUS_MULTIPROC_DIR, one scrape sums every worker's counts."""

    def run_python(self, code: str, *args: str, directory: str) -> str:
        env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=directory)
        env["PYTHONPATH"] = os.pathsep.join([os.getcwd(), *sys.path])
        done = subprocess.run(
            [sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=60
        )
        self.assertEqual(done.returncode, 0, done.stderr)
        return done.stdout

    def test_two_workers_summed(self) -> None:
        """Workers that accepted 2 and 3 connections give one total of 5."""
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        self.run_python(_WORKER, "2", directory=directory)
        self.run_python(_WORKER, "3", directory=directory)
        text = self.run_python(_SCRAPE, directory, directory=directory)
        values = {
            sample.name: sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if not sample.labels
        }
        self.assertEqual(values["oemrelay_device_connections_total"], 5)
