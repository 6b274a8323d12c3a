"""
One timer for many deadlines that arrive in order.

Every upload's commit deadline is its commit request's time plus the same
``commit_timeout``, so deadlines are added in the order they fall due.  A
:class:`DeadlineQueue` keeps them in a deque and holds one timer, for the
earliest still pending, instead of a ``callLater`` and a ``cancel`` per
upload (issue 9).  Settling an entry only marks it; settled entries leave
from the front, so the deque holds about as many as are in flight.

The granularity is none: an entry expires when the clock reaches its own
deadline, as its own ``callLater`` would.  A deadline added out of order
(earlier than one before it: the clock stepped back) waits for those before
it, so fires late by at most the step.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

log = Logger(namespace="oemrelay.deadlines")

#: Past this many entries the deque is rebuilt if most are settled (one
#: delivery stuck at the front must not hold every later one in memory).
COMPACT_AT = 1024

#: An entry: [deadline, the call on expiry or None once settled].
Entry = list


class DeadlineQueue:
    """Deadlines added in order, each expired or settled; one timer for all."""

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._entries: deque[Entry] = deque()
        self._pending = 0
        self._timer: IDelayedCall | None = None
        # The deadline the timer is for: when it fires that deadline is due,
        # even if the clock's float arithmetic reads a hair before it.
        self._timer_deadline = 0.0

    def __len__(self) -> int:
        """Entries not yet expired or settled."""
        return self._pending

    def add(self, deadline: float, expire: Callable[[], None]) -> Entry:
        """
        Call ``expire()`` once the clock reaches ``deadline`` (clock seconds),
        unless the returned entry is :meth:`settle`\\ d first.
        """
        entry = [deadline, expire]
        entries = self._entries
        entries.append(entry)
        self._pending += 1
        if self._timer is None:
            self._start_timer(deadline)
        elif len(entries) > COMPACT_AT and len(entries) > 4 * self._pending:
            self._entries = deque(entry for entry in entries if entry[1] is not None)
        return entry

    def settle(self, entry: Entry) -> None:
        """The entry's work is done: it will not expire (no-op if it did)."""
        if entry[1] is None:
            return
        entry[1] = None
        self._pending -= 1
        entries = self._entries
        while entries and entries[0][1] is None:
            entries.popleft()
        if not entries and self._timer is not None:
            # Nothing in flight: leave no timer behind.
            self._timer.cancel()
            self._timer = None

    def _start_timer(self, deadline: float) -> None:
        self._timer_deadline = deadline
        self._timer = self._clock.callLater(
            max(0.0, deadline - self._clock.seconds()), self._expire_due
        )

    def _expire_due(self) -> None:
        self._timer = None
        now = max(self._clock.seconds(), self._timer_deadline)
        entries = self._entries
        while entries:
            entry = entries[0]
            expire = entry[1]
            if expire is None:
                entries.popleft()
                continue
            if entry[0] > now:
                break
            entries.popleft()
            entry[1] = None
            self._pending -= 1
            try:
                expire()
            except Exception:
                # One owner's bug must not stop the others' deadlines.
                log.failure("deadline expiry failed")
        if entries and self._timer is None:
            self._start_timer(entries[0][0])


class DeadlineQueues:
    """
    A :class:`DeadlineQueue` per timeout: deadlines of one timeout, added as
    they arise, fall due in the order added, so each queue keeps the one
    timer it needs.  (A timeout changed at run time starts a queue of its
    own; the deadlines already in the old one keep it.)
    """

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._queues: dict[float, DeadlineQueue] = {}

    def for_timeout(self, timeout: float) -> DeadlineQueue:
        queue = self._queues.get(timeout)
        if queue is None:
            queue = self._queues[timeout] = DeadlineQueue(self._clock)
        return queue
