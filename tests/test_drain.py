"""
Tests for draining on stop: :meth:`oemrelay.session.DeviceFactory.drain`
and the order :mod:`oemrelay.service` stops things in.
"""

from __future__ import annotations

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.trial.unittest import SynchronousTestCase

from oemrelay.service import DeviceService, StopInOrder

from .test_session import COMMIT, COMMIT_OK, COMMIT_TIMEOUT, DATA_2, SessionTestMixin


class FactoryDrainTests(SessionTestMixin, SynchronousTestCase):
    """A draining factory answers commits in flight, closes devices, then fires."""

    def committing(self):
        """The mixin's device, greeted, its upload being delivered."""
        link = self.greet()
        self.send(DATA_2, COMMIT)
        return link

    def test_no_connections_fires_at_once(self) -> None:
        """A factory with no device connection drains at once."""
        self.transport.loseConnection()
        self.assertEqual(self.factory.connections, 0)
        self.successResultOf(self.factory.drain(5))

    def test_idle_device_closed(self) -> None:
        """An idle device is closed at once and the drain fires."""
        self.greet()
        drained = self.factory.drain(5)
        self.assertFalse(self.is_open)
        self.successResultOf(drained)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_commit_in_flight_answered_then_closed(self) -> None:
        """An upload delivered during the grace is committed to the device, then the device closed."""
        link = self.committing()
        drained = self.factory.drain(5)
        self.assertTrue(self.is_open)
        self.assertNoResult(drained)
        self.clock.advance(4.9)
        link.answer().callback(None)
        self.assertEqual(self.take(), COMMIT_OK)
        self.assertFalse(self.is_open)
        self.successResultOf(drained)

    def test_grace_over_aborts_without_commit(self) -> None:
        """A delivery still in flight when shutdown_grace ends is not committed; the device is closed."""
        self.committing()
        drained = self.factory.drain(5)
        self.clock.advance(4.9)
        self.assertNoResult(drained)
        self.clock.advance(0.1)
        self.assertFalse(self.is_open)
        self.assertNotIn(COMMIT_OK, self.take())
        self.successResultOf(drained)

    def test_grace_longer_than_commit_timeout(self) -> None:
        """A delivery the commit_timeout ends during the grace is withheld and the drain fires."""
        self.committing()
        drained = self.factory.drain(COMMIT_TIMEOUT * 2)
        self.clock.advance(COMMIT_TIMEOUT)
        self.assertFalse(self.is_open)
        self.assertNotIn(COMMIT_OK, self.take())
        self.successResultOf(drained)


class Recording(Service):
    """A service noting when it was asked to stop and whose stop fires when told."""

    def __init__(self, name: str, log: list[str], done: Deferred | None = None) -> None:
        self.name = name
        self._log = log
        self._done = done

    def stopService(self):
        super().stopService()
        self._log.append(self.name)
        return self._done if self._done is not None else succeed(None)


class StopInOrderTests(SynchronousTestCase):
    """StopInOrder stops its children last first, each after the one before finished."""

    def test_waits_for_each(self) -> None:
        """The registry (first added) is not stopped until the devices (last added) have drained."""
        stopped: list[str] = []
        devices_done: Deferred[None] = Deferred()
        top = StopInOrder()
        Recording("registry", stopped).setServiceParent(top)
        Recording("devices", stopped, devices_done).setServiceParent(top)
        top.startService()
        done = top.stopService()
        self.assertEqual(stopped, ["devices"])
        devices_done.callback(None)
        self.assertEqual(stopped, ["devices", "registry"])
        self.successResultOf(done)


class DeviceServiceTests(SessionTestMixin, SynchronousTestCase):
    """DeviceService: listeners stop, then devices drain, then it has stopped."""

    def test_order(self) -> None:
        """Listening stops before the drain; the stop completes once the last device's commit is answered."""
        stopped: list[str] = []
        link = self.greet()
        self.send(DATA_2, COMMIT)
        service = DeviceService(self.factory, self.relay, 5)
        Recording("listener", stopped).setServiceParent(service)
        service.startService()
        done = service.stopService()
        self.assertEqual(stopped, ["listener"])
        self.assertTrue(self.is_open)
        self.assertNoResult(done)
        link.answer().callback(None)
        self.assertEqual(self.take(), COMMIT_OK)
        self.assertEqual(stopped, ["listener"])
        self.successResultOf(done)
