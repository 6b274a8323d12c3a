"""
The fleet view's recent figures: what the relay did in the last minutes.

:class:`FleetActivity` is a :class:`~oemrelay.events.RelayObserver` that
counts, per minute of the clock, uploads and records committed, commits
withheld by kind and end-server errors by connector, and how many devices this
node holds connected now.  It keeps :data:`WINDOW_MINUTES` minutes, so its
memory does not grow with traffic; ``GET /api/fleet`` shows it.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.interfaces import IReactorTime

from .events import RelayObserver

#: How many minutes of figures are kept, and the most a summary may cover.
WINDOW_MINUTES = 60
#: The delivery outcomes that are not end-server errors.
_SUCCESS_OUTCOMES = frozenset({"2xx"})


@dataclass
class _Minute:
    """The counts of one clock minute."""

    start: int
    uploads: int = 0
    records: int = 0
    withheld: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)


class FleetActivity(RelayObserver):
    """Counts the relay's events by minute; :meth:`summary` adds the last minutes up."""

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._minutes: deque[_Minute] = deque()
        #: Serials connected to this node now (a device reconnecting before
        #: its old connection closed is counted once).
        self._connected: Counter[int] = Counter()

    def _now(self) -> _Minute:
        now = self._clock.seconds()
        if self._minutes:
            # Most events fall in the minute of the one before.
            latest = self._minutes[-1]
            if latest.start <= now < latest.start + 60:
                return latest
        # Not in the latest minute (or none yet): a new one begins.
        start = int(now // 60) * 60
        self._minutes.append(_Minute(start))
        while self._minutes[0].start <= start - WINDOW_MINUTES * 60:
            self._minutes.popleft()
        return self._minutes[-1]

    # -- events --

    def device_connected(self, hello, peer: str) -> None:
        self._connected[hello.serial] += 1

    def connection_closed(self, hello, peer: str, outcome: str) -> None:
        if hello is not None and self._connected[hello.serial] > 0:
            self._connected[hello.serial] -= 1
            if not self._connected[hello.serial]:
                del self._connected[hello.serial]

    def upload_committed(self, upload, seconds: float) -> None:
        minute = self._now()
        minute.uploads += 1
        minute.records += upload.record_count

    def commit_withheld(self, upload, kind: str, reason: str) -> None:
        self._now().withheld[kind] += 1

    def delivery_attempted(self, connector: str, outcome: str, seconds: float) -> None:
        if outcome not in _SUCCESS_OUTCOMES:
            self._now().errors[connector] += 1

    # -- the summary --

    def summary(self, minutes: int, spool_stats: Callable[[], Any] | None = None) -> dict:
        """
        The figures of the last ``minutes`` minutes (the current one included).

        :param spool_stats: the spool's ``stats()``, if a spool is configured;
            its answer is passed on as ``spool``.
        :raises ValueError: if ``minutes`` is not from 1 to :data:`WINDOW_MINUTES`.
        """
        if isinstance(minutes, bool) or not isinstance(minutes, int) or not (
            1 <= minutes <= WINDOW_MINUTES
        ):
            raise ValueError(f"minutes must be a whole number from 1 to {WINDOW_MINUTES}")
        first = int(self._clock.seconds() // 60) * 60 - (minutes - 1) * 60
        recent = [minute for minute in self._minutes if minute.start >= first]
        withheld: Counter[str] = Counter()
        errors: Counter[str] = Counter()
        for minute in recent:
            withheld.update(minute.withheld)
            errors.update(minute.errors)
        return {
            "minutes": minutes,
            "connected_here": len(self._connected),
            "uploads_committed": sum(minute.uploads for minute in recent),
            "records_committed": sum(minute.records for minute in recent),
            "withheld": dict(sorted(withheld.items())),
            "end_server_errors": dict(sorted(errors.items())),
            "spool": None if spool_stats is None else spool_stats(),
        }
