"""
Tests for :mod:`oemrelay.registry.notify` without a database: the payload
and the listening thread on a fake connection.  (The real LISTEN/NOTIFY is
tested on PostgreSQL in tests.test_registry.)
"""

from __future__ import annotations

import threading
from types import SimpleNamespace

from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.trial.unittest import SynchronousTestCase, TestCase

from oemrelay.registry.notify import (
    MAX_PAYLOAD,
    ChangeListener,
    changed_serials,
    changes_payload,
)


class PayloadTests(SynchronousTestCase):
    """The serials changed, as a notification payload and back."""

    def test_round_trip(self) -> None:
        """Serials listed come back as they went."""
        self.assertEqual(changed_serials(changes_payload([5, 4294967295])), [5, 4294967295])

    def test_too_many(self) -> None:
        """A list longer than MAX_PAYLOAD bytes becomes * (any device); one at the limit does not."""
        at_limit = [11] + [1] * ((MAX_PAYLOAD - 2) // 2)  # "11 1 ... 1": MAX_PAYLOAD bytes
        self.assertEqual(len(changes_payload(at_limit)), MAX_PAYLOAD)
        self.assertEqual(changes_payload(at_limit + [1]), "*")
        self.assertIsNone(changed_serials("*"))

    def test_not_understood(self) -> None:
        """A payload that is no list of serials means any device."""
        self.assertIsNone(changed_serials("5 six"))


class _FakeConnection:
    def __init__(self, payloads: list[str]) -> None:
        self.executed: list[str] = []
        self._payloads = payloads
        self.closed = threading.Event()

    def execute(self, sql: str) -> None:
        self.executed.append(sql)

    def notifies(self, timeout: float):
        while self._payloads:
            yield SimpleNamespace(payload=self._payloads.pop(0))
        threading.Event().wait(0.01)

    def close(self) -> None:
        self.closed.set()


class ChangeListenerTests(TestCase):
    """The listener's thread: connects, LISTENs, reports, reconnects after an error, stops."""

    timeout = 10

    async def until(self, condition) -> None:
        for _ in range(200):
            if condition():
                return
            await deferLater(reactor, 0.02, lambda: None)
        self.fail("timed out")

    async def test_listen_and_retry(self) -> None:
        """After a failed connection it retries; each connection reports None first, then the serials."""
        told: list = []
        connections = [_FakeConnection(["5 6", "*"])]
        attempts: list = []

        def connect():
            attempts.append(True)
            if len(attempts) == 1:
                raise OSError("connection refused")
            return connections[0]

        listener = ChangeListener(connect, reactor, told.append, retry_seconds=0.05)
        listener.startService()
        await self.until(lambda: len(told) == 3)
        self.assertEqual(told, [None, [5, 6], None])
        self.assertEqual(connections[0].executed, ["LISTEN oemrelay_devices"])
        self.flushLoggedErrors()
        await listener.stopService()
        self.assertTrue(connections[0].closed.is_set())
