"""
The registry as the device path uses it, kept off each upload's way.

Looking a device's profile up and counting its commit in the database on
every upload cost two queries through the pool's threads per upload (issue 9).
:class:`ProfileCache` keeps profiles in memory for ``profile_cache_seconds``
and forgets one as soon as this relay's API changes it; :class:`ActivityBatch`
adds commits and delivery errors up per device and writes them once a second
and when the relay stops.  :class:`RelayLedger` puts the two in front of a
:class:`~oemrelay.registry.Registry` as the relay's
:class:`~oemrelay.relay.DeviceLedger`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from twisted.application.internet import TimerService
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from ..codec import Hello
from ..oneline import one_line
from ..relay import DeviceProfile
from .devices import check_count, check_serial

log = Logger(namespace="oemrelay.registry")

#: Seconds between two writes of the batched commit counters.
FLUSH_INTERVAL = 1.0


class ProfileCache:
    """
    Device profiles by serial, each kept ``max_age`` seconds after its lookup
    began (so a change made meanwhile is seen within ``max_age``); 0 keeps none.

    :meth:`forget` drops profiles at once; a lookup under way when it is
    called is not kept, since it may have read the old profile.
    """

    def __init__(
        self,
        lookup: Callable[[Hello], Deferred[DeviceProfile]],
        clock: IReactorTime,
        max_age: float,
    ) -> None:
        self._lookup = lookup
        self._clock = clock
        self._max_age = max_age
        self._profiles: dict[int, tuple[float, DeviceProfile]] = {}
        # Bumped by forget(): a lookup begun before then is not kept.
        self._forgotten = 0

    def cached_profile(self, hello: Hello) -> DeviceProfile | None:
        """The device's profile if held and fresh, else None (no lookup begun)."""
        cached = self._profiles.get(hello.serial)
        if cached is not None and self._clock.seconds() - cached[0] < self._max_age:
            return cached[1]
        return None

    def profile_for(self, hello: Hello) -> Deferred[DeviceProfile]:
        """The device's profile: from memory if fresh, else from the registry."""
        now = self._clock.seconds()
        cached = self._profiles.get(hello.serial)
        if cached is not None and now - cached[0] < self._max_age:
            return succeed(cached[1])
        forgotten = self._forgotten

        def keep(profile: DeviceProfile) -> DeviceProfile:
            if self._max_age > 0 and forgotten == self._forgotten:
                self._profiles[hello.serial] = (now, profile)
            return profile

        return self._lookup(hello).addCallback(keep)

    def forget(self, serials: Iterable[int] | None = None) -> None:
        """Drop the profiles of ``serials`` (None: every profile)."""
        self._forgotten += 1
        if serials is None:
            self._profiles.clear()
            return
        for serial in serials:
            self._profiles.pop(serial, None)


@dataclass
class _Activity:
    """What happened to one device since the last write."""

    records: int = 0
    last_upload: float | None = None
    last_seen: float = 0.0
    #: The device's last error after these events (None: its last upload went through).
    last_error: str | None = None

    def then(self, later: _Activity) -> _Activity:
        """This activity followed by ``later``."""
        return _Activity(
            self.records + later.records,
            later.last_upload if later.last_upload is not None else self.last_upload,
            max(self.last_seen, later.last_seen),
            later.last_error,
        )


class ActivityBatch(TimerService):
    """
    Commits and delivery errors, added up per device and written in one
    transaction every :data:`FLUSH_INTERVAL` seconds and when stopped.

    A write that fails is kept and tried again with the next; once stopped,
    every event is written at once, so none is lost to a late commit.
    """

    def __init__(self, store: Any, clock: IReactorTime, interval: float = FLUSH_INTERVAL) -> None:
        super().__init__(interval, self.flush)
        self.clock = clock
        self._store = store
        self._pending: dict[int, _Activity] = {}

    def upload_committed(self, serial: int, record_count: int, now: float) -> Deferred[None]:
        """Count ``record_count`` records delivered and clear the device's last error."""
        check_count("record_count", record_count)
        pending = self._pending.get(serial)
        if pending is None or not self.running:
            return self._add(serial, _Activity(record_count, now, now, None))
        # The device's entry is this batch's own (a flush takes the dict):
        # added to in place, as then() would, with nothing allocated.
        pending.records += record_count
        pending.last_upload = now
        if now > pending.last_seen:
            pending.last_seen = now
        pending.last_error = None
        return succeed(None)

    def delivery_failed(self, serial: int, reason: str, now: float) -> Deferred[None]:
        """Keep why an upload was not delivered."""
        return self._add(serial, _Activity(0, None, now, str(reason).replace("\x00", "\\x00")))

    def _add(self, serial: int, activity: _Activity) -> Deferred[None]:
        check_serial(serial)
        earlier = self._pending.get(serial)
        self._pending[serial] = activity if earlier is None else earlier.then(activity)
        if not self.running:
            return self.flush()
        return succeed(None)

    def flush(self) -> Deferred[None]:
        """Write what is pending; fires when written (or kept for the next try)."""
        if not self._pending:
            return succeed(None)
        batch, self._pending = self._pending, {}

        def failed(failure) -> None:
            # Put back in front of what came meanwhile: nothing is lost.
            for serial, activity in batch.items():
                later = self._pending.get(serial)
                self._pending[serial] = activity if later is None else activity.then(later)
            log.warn(
                "registry: could not record the activity of {count} devices,"
                " will retry: {reason}",
                count=len(batch),
                reason=one_line(failure.value),
            )

        written = self._store.record_activity(
            [
                (serial, a.records, a.last_upload, a.last_seen, a.last_error)
                for serial, a in batch.items()
            ]
        )
        return written.addCallbacks(lambda _: None, failed)

    def stopService(self) -> Deferred[None]:
        stopped = super().stopService()
        flushed = self.flush()
        if stopped is None:
            return flushed
        return stopped.addCallback(lambda _: flushed)


class RelayLedger:
    """
    The relay's :class:`~oemrelay.relay.DeviceLedger` on a registry:
    profiles cached, commits and errors batched, the rest passed through.

    :param registry: a :class:`~oemrelay.registry.Registry`; its API changes
        make the cache forget the devices changed.
    """

    def __init__(
        self, registry: Any, clock: IReactorTime, profile_cache_seconds: float
    ) -> None:
        self.profiles = ProfileCache(registry.profile_for, clock, profile_cache_seconds)
        self.activity = ActivityBatch(registry.devices, clock)
        registry.on_devices_changed(self.profiles.forget)
        self.profile_for = self.profiles.profile_for
        self.cached_profile = self.profiles.cached_profile
        self.upload_committed = self.activity.upload_committed
        self.delivery_failed = self.activity.delivery_failed
        self.device_connected = registry.device_connected
        self.device_disconnected = registry.device_disconnected
        self.due_commands = registry.due_commands
        self.command_sent = registry.command_sent
        self.command_result = registry.command_result
