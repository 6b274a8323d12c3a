"""Tests for oemrelay.deadlines: many in-order deadlines on one timer."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from oemrelay import deadlines
from oemrelay.deadlines import DeadlineQueue, DeadlineQueues


class DeadlineQueueTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_000_000.1)  # a clock whose float sums round
        self.queue = DeadlineQueue(self.clock)
        self.expired: list[str] = []

    def add(self, name: str, after: float) -> list:
        return self.queue.add(self.clock.seconds() + after, lambda: self.expired.append(name))

    def test_expires_at_its_deadline_not_before(self) -> None:
        """An entry expires when the clock reaches its deadline, not a tick (1 µs) before."""
        self.add("a", 20)
        self.clock.advance(20 - 1e-6)
        self.assertEqual(self.expired, [])
        self.clock.advance(1e-6)
        self.assertEqual(self.expired, ["a"])
        self.assertEqual(len(self.queue), 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_each_entry_at_its_own_deadline(self) -> None:
        """Entries added one after another expire one after another, each on time."""
        self.add("a", 20)
        self.clock.advance(0.5)
        self.add("b", 20)
        self.clock.advance(19.5)
        self.assertEqual(self.expired, ["a"])
        self.clock.advance(0.5 - 1e-6)
        self.assertEqual(self.expired, ["a"])
        self.clock.advance(1e-6)
        self.assertEqual(self.expired, ["a", "b"])

    def test_one_timer_for_many(self) -> None:
        """However many entries wait, one timer is scheduled."""
        for index in range(100):
            self.add(str(index), 20)
            self.clock.advance(0.01)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.assertEqual(len(self.queue), 100)

    def test_settled_entry_never_expires(self) -> None:
        """A settled entry does not expire; the next one still does, on time."""
        first = self.add("a", 20)
        self.clock.advance(1)
        self.add("b", 20)
        self.queue.settle(first)
        self.clock.advance(19)
        self.assertEqual(self.expired, [])
        self.clock.advance(1)
        self.assertEqual(self.expired, ["b"])

    def test_settling_the_last_leaves_no_timer(self) -> None:
        """Once nothing is pending the timer is cancelled."""
        first, second = self.add("a", 20), self.add("b", 20)
        self.queue.settle(second)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.queue.settle(first)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(40)
        self.assertEqual(self.expired, [])

    def test_settle_after_expiry_is_harmless(self) -> None:
        """Settling an entry that expired already changes nothing."""
        first = self.add("a", 20)
        self.clock.advance(20)
        self.queue.settle(first)
        self.assertEqual(len(self.queue), 0)
        self.add("b", 20)
        self.clock.advance(20)
        self.assertEqual(self.expired, ["a", "b"])

    def test_timer_restarts_after_running_dry(self) -> None:
        """An entry added after the queue emptied gets a timer of its own."""
        self.queue.settle(self.add("a", 20))
        self.add("b", 5)
        self.clock.advance(5)
        self.assertEqual(self.expired, ["b"])

    def test_expiry_adding_an_entry(self) -> None:
        """An expiry that adds a new entry gets it timed too."""
        self.queue.add(
            self.clock.seconds() + 1, lambda: (self.expired.append("a"), self.add("b", 2))
        )
        self.clock.advance(1)
        self.clock.advance(2 - 1e-6)
        self.assertEqual(self.expired, ["a"])
        self.clock.advance(1e-6)
        self.assertEqual(self.expired, ["a", "b"])

    def test_failing_expiry_does_not_stop_others(self) -> None:
        """An expiry that raises is logged; later deadlines still expire."""

        def broken() -> None:
            raise ZeroDivisionError("oops")

        self.queue.add(self.clock.seconds() + 1, broken)
        self.add("b", 2)
        self.clock.advance(1)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        self.clock.advance(1)
        self.assertEqual(self.expired, ["b"])

    def test_stuck_front_does_not_hold_settled_entries(self) -> None:
        """Behind one entry that never settles, settled ones are dropped once they pile up."""
        self.add("stuck", 20)
        for _ in range(deadlines.COMPACT_AT * 2):
            self.queue.settle(self.add("quick", 20))
        self.assertLessEqual(len(self.queue._entries), deadlines.COMPACT_AT + 1)
        self.assertEqual(len(self.queue), 1)
        self.clock.advance(20)
        self.assertEqual(self.expired, ["stuck"])

    def test_compaction_boundary(self) -> None:
        """At COMPACT_AT entries nothing is rebuilt; at one more the settled ones go."""
        self.add("stuck", 20)
        for _ in range(deadlines.COMPACT_AT - 1):
            self.queue.settle(self.add("quick", 20))
        self.assertEqual(len(self.queue._entries), deadlines.COMPACT_AT)
        self.add("last", 20)
        self.assertEqual(len(self.queue._entries), 2)  # the two pending


class DeadlineQueuesTests(SynchronousTestCase):
    """DeadlineQueues: a queue per timeout."""

    def test_one_queue_per_timeout(self) -> None:
        """The same timeout gives the same queue; another timeout another, so neither waits behind the other."""
        clock = Clock()
        queues = DeadlineQueues(clock)
        short, long = queues.for_timeout(2), queues.for_timeout(10)
        self.assertIs(queues.for_timeout(2), short)
        self.assertIsNot(short, long)
        expired = []
        long.add(10, lambda: expired.append("long"))
        short.add(2, lambda: expired.append("short"))
        clock.advance(2)
        self.assertEqual(expired, ["short"])
