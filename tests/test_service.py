"""
Tests for :mod:`oemrelay.service`: listeners and the registry report a failed
start as one line and ask for a non-zero exit.
"""

from __future__ import annotations

import io
import sys

from twisted.internet.defer import Deferred, fail
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import Factory
from twisted.internet.testing import MemoryReactor
from twisted.trial.unittest import SynchronousTestCase

from oemrelay.service import START_FAILED, Listener, RegistryService


class RefusingReactor(MemoryReactor):
    """A memory reactor whose TCP listens fail with EADDRINUSE."""

    def listenTCP(self, port, factory, backlog=50, interface=""):
        raise CannotListenError(interface, port, OSError(98, "Address already in use"))


class ListenerTests(SynchronousTestCase):
    """A Listener that cannot listen says so in one line and exits with status 1."""

    def setUp(self) -> None:
        self.stderr = io.StringIO()
        self.patch(sys, "stderr", self.stderr)
        self.stops: list[str] = []

    def listener(self, reactor) -> Listener:
        return Listener(
            "relay", "tcp:20500", Factory(), reactor, lambda: self.stops.append("stop")
        )

    def test_port_in_use_exits_1(self) -> None:
        """A listen refused while twistd starts services raises SystemExit(1) after one line."""
        with self.assertRaises(SystemExit) as caught:
            self.listener(RefusingReactor()).privilegedStartService()
        self.assertEqual(caught.exception.code, START_FAILED)
        self.assertEqual(
            self.stderr.getvalue(),
            "oemrelay: [relay] listen: tcp:20500: cannot listen:"
            " [Errno 98] Address already in use\n",
        )
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_listens(self) -> None:
        """A listen that works starts nothing else and writes nothing."""
        reactor = MemoryReactor()
        self.listener(reactor).privilegedStartService()
        self.assertEqual(len(reactor.tcpServers), 1)
        self.assertEqual((self.stderr.getvalue(), self.stops), ("", []))

    def test_later_failure_stops(self) -> None:
        """A listen that fails after start-up writes one line and stops with a failure."""
        listener = self.listener(MemoryReactor())
        waiting: Deferred = Deferred()
        listener.endpoint._endpoint = type("Slow", (), {"listen": lambda self, f: waiting})()
        listener.privilegedStartService()
        self.assertEqual(self.stops, [])
        waiting.errback(CannotListenError("", 20500, OSError(13, "Permission denied")))
        self.assertEqual(self.stops, ["stop"])
        self.assertIn("cannot listen: [Errno 13] Permission denied", self.stderr.getvalue())

    def test_stop_before_listening_is_no_failure(self) -> None:
        """Stopping a listener still waiting to listen is not reported as a failed start."""
        listener = self.listener(MemoryReactor())
        listener.endpoint._endpoint = type("Slow", (), {"listen": lambda self, f: Deferred()})()
        listener.privilegedStartService()
        listener.stopService()
        self.assertEqual((self.stops, self.stderr.getvalue()), ([], ""))


class FailingRegistry:
    """A registry whose start fails, as a database that cannot be opened does."""

    url_for_logs = "sqlite:/nowhere/registry.sqlite"

    def __init__(self) -> None:
        self.closed = False

    def start(self, node: str) -> Deferred:
        return fail(OSError("unable to open database file"))

    def close(self) -> None:
        self.closed = True


class RegistryServiceTests(SynchronousTestCase):
    """A registry that cannot be opened stops the relay with a failure."""

    def test_cannot_open(self) -> None:
        """A failed registry start logs one critical line and calls the start-failure hook."""
        stops: list[str] = []
        registry = FailingRegistry()
        service = RegistryService(registry, "node-a", lambda: stops.append("stop"))
        service.startService()
        self.assertEqual(stops, ["stop"])
        self.successResultOf(service.stopService())
        self.assertTrue(registry.closed)


class _FakeSpool:
    url_for_logs = "sqlite:spool.sqlite"

    def __init__(self) -> None:
        self.opening: Deferred = Deferred()
        self.closed = 0

    def start(self) -> Deferred:
        return self.opening

    def close(self) -> Deferred:
        self.closed += 1
        return Deferred.fromCoroutine(_nothing())


async def _nothing() -> None:
    pass


class _FakeDelivery:
    def __init__(self) -> None:
        self.started = 0

    def start(self) -> None:
        self.started += 1

    def stop(self) -> Deferred:
        return Deferred.fromCoroutine(_nothing())


class SpoolServiceTests(SynchronousTestCase):
    """The spool's service: background delivery runs only while the service does."""

    def service(self):
        from oemrelay.service import SpoolService

        self.spool, self.delivery, self.failures = _FakeSpool(), _FakeDelivery(), []
        return SpoolService(self.spool, self.delivery, lambda: self.failures.append(1))

    def test_delivery_starts_once_open(self) -> None:
        """Background delivery starts when the spool has opened, not before."""
        service = self.service()
        service.startService()
        self.assertEqual(self.delivery.started, 0)
        self.spool.opening.callback(None)
        self.assertEqual(self.delivery.started, 1)

    def test_stopped_while_opening_starts_no_delivery(self) -> None:
        """Stopped before the spool opened (another service failed to start): no delivery starts, the spool closes, the stop completes."""
        service = self.service()
        service.startService()
        stopped = service.stopService()
        self.spool.opening.callback(None)
        self.successResultOf(stopped)
        self.assertEqual((self.delivery.started, self.spool.closed), (0, 1))

    def test_failed_open_stops_the_relay(self) -> None:
        """A spool that cannot be opened calls the start-failure hook and starts no delivery."""
        service = self.service()
        service.startService()
        self.spool.opening.errback(OSError("disk gone"))
        self.assertEqual((self.failures, self.delivery.started), ([1], 0))


class FileLimitTests(SynchronousTestCase):
    """The open-file limit raised to what max_connections needs, or one warning."""

    def fit(self, max_connections: int, soft: int, hard: int, refuse: bool = False):
        from oemrelay.service import fit_file_limit

        self.set_to: list = []

        def setrlimit(which, limits):
            if refuse:
                raise ValueError("not allowed")
            self.set_to.append(limits)

        return fit_file_limit(max_connections, lambda which: (soft, hard), setrlimit)

    def test_enough_already(self) -> None:
        """A limit of exactly max_connections + SPARE_FILES is enough: nothing changed, no warning."""
        from oemrelay.service import SPARE_FILES

        self.assertIsNone(self.fit(1000, 1000 + SPARE_FILES, 4096))
        self.assertEqual(self.set_to, [])

    def test_raised_within_the_hard_limit(self) -> None:
        """One file short: the soft limit is raised to what is needed, quietly."""
        from oemrelay.service import SPARE_FILES

        self.assertIsNone(self.fit(1000, 1000 + SPARE_FILES - 1, 65536))
        self.assertEqual(self.set_to, [(1000 + SPARE_FILES, 65536)])

    def test_hard_limit_too_low(self) -> None:
        """Raised to the hard limit, and a warning naming the key and both numbers."""
        warning = self.fit(20000, 1024, 8192)
        self.assertEqual(self.set_to, [(8192, 8192)])
        self.assertIn("[relay] max_connections 20000 needs 20256 open files", warning)
        self.assertIn("the limit is 8192", warning)

    def test_refused(self) -> None:
        """A system that refuses the change gets the warning with the old limit."""
        self.assertIn("the limit is 1024", self.fit(5000, 1024, 65536, refuse=True))

    def test_no_limit_configured(self) -> None:
        """max_connections = 0 (no limit) asks nothing of the file limit."""
        self.assertIsNone(self.fit(0, 16, 16))


class CollectorTuningTests(SynchronousTestCase):
    """The garbage collector's thresholds while the relay serves devices."""

    def setUp(self) -> None:
        import gc

        self.addCleanup(gc.set_threshold, *gc.get_threshold())

    def test_set_while_running_restored_when_stopped(self) -> None:
        """Started: GC_THRESHOLDS; stopped: what was there before."""
        import gc

        from oemrelay.service import GC_THRESHOLDS, CollectorTuning

        gc.set_threshold(700, 10, 10)
        tuning = CollectorTuning()
        tuning.startService()
        self.assertEqual(gc.get_threshold(), GC_THRESHOLDS)
        tuning.stopService()
        self.assertEqual(gc.get_threshold(), (700, 10, 10))

    def test_part_of_the_relay(self) -> None:
        """build_service's tree holds it, so the daemon and each worker tune their collector."""
        from twisted.internet.testing import MemoryReactorClock

        from oemrelay.config import config_from_string
        from oemrelay.service import CollectorTuning, build_service

        from .test_config import FILE_CONNECTOR

        config = config_from_string(
            f"[relay]\nlisten = tcp:0:interface=127.0.0.1\nregistry = sqlite:{self.mktemp()}\n"
            + FILE_CONNECTOR
        )
        top = build_service(config, MemoryReactorClock())
        self.assertTrue(any(isinstance(child, CollectorTuning) for child in top))
