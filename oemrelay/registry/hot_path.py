"""
The registry as the device path uses it, kept off each upload's way.

Looking a device's profile up and counting its commit in the database on
every upload cost two queries through the pool's threads per upload (issue 9).
:class:`ProfileCache` keeps profiles in memory for ``profile_cache_seconds``
and forgets one as soon as this relay's API changes it; :class:`ActivityBatch`
adds connections, commits and delivery errors up per device and writes them
once a second and when the relay stops (a write per connection was most of
the relay's CPU when thousands of devices reconnected at once).  :class:`RelayLedger` puts the two in front of a
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

#: Seconds between two writes of the batched connections and commit counters.
FLUSH_INTERVAL = 1.0


class ProfileCache:
    """
    Device profiles by serial, each kept ``max_age`` seconds after its lookup
    began (so a change made meanwhile is seen within ``max_age``); 0 keeps none.

    Looked up together: one lookup is in flight at a time, and the devices
    missed meanwhile are looked up in the next, all at once (thousands of
    devices reconnecting after a restart cost a few queries, not one each;
    a lone miss is looked up at once).  A device missed again while its
    own lookup is in flight waits for that one.

    :meth:`forget` drops profiles at once; a lookup under way when it is
    called is not kept, since it may have read the old profile.
    """

    def __init__(
        self,
        lookup_many: Callable[[list[int]], Deferred[dict[int, DeviceProfile]]],
        clock: IReactorTime,
        max_age: float,
    ) -> None:
        self._lookup_many = lookup_many
        self._clock = clock
        self._max_age = max_age
        self._profiles: dict[int, tuple[float, DeviceProfile]] = {}
        # Bumped by forget(): a lookup begun before then is not kept.
        self._forgotten = 0
        # Serials waiting for the next lookup, with who waits for each; and
        # those of the lookup under way (empty: none is).
        self._wanted: dict[int, list[Deferred[DeviceProfile]]] = {}
        self._in_flight: dict[int, list[Deferred[DeviceProfile]]] = {}

    def cached_profile(self, hello: Hello) -> DeviceProfile | None:
        """The device's profile if held and fresh, else None (no lookup begun)."""
        cached = self._profiles.get(hello.serial)
        if cached is not None and self._clock.seconds() - cached[0] < self._max_age:
            return cached[1]
        return None

    def profile_for(self, hello: Hello) -> Deferred[DeviceProfile]:
        """The device's profile: from memory if fresh, else from the registry."""
        profile = self.cached_profile(hello)
        if profile is not None:
            return succeed(profile)
        answer: Deferred[DeviceProfile] = Deferred()
        in_flight = self._in_flight.get(hello.serial)
        if in_flight is not None:
            in_flight.append(answer)  # its answer serves this caller too
            return answer
        self._wanted.setdefault(hello.serial, []).append(answer)
        if not self._in_flight:
            self._look_up_wanted()
        return answer

    def _look_up_wanted(self) -> None:
        wanted, self._wanted = self._wanted, {}
        self._in_flight = wanted
        began, forgotten = self._clock.seconds(), self._forgotten

        def answered(profiles: dict[int, DeviceProfile]) -> None:
            keep = self._max_age > 0 and forgotten == self._forgotten
            for serial, waiting in wanted.items():
                profile = profiles[serial]
                if keep:
                    self._profiles[serial] = (began, profile)
                for answer in waiting:
                    answer.callback(profile)

        def failed(failure) -> None:
            for waiting in wanted.values():
                for answer in waiting:
                    answer.errback(failure)

        def next_lookup(_: object) -> None:
            self._in_flight = {}
            if self._wanted:
                self._look_up_wanted()

        looked_up = self._lookup_many(list(wanted))
        looked_up.addCallbacks(answered, failed).addBoth(next_lookup)

    def forget(self, serials: Iterable[int] | None = None) -> None:
        """Drop the profiles of ``serials`` (None: every profile)."""
        self._forgotten += 1
        if serials is None:
            self._profiles.clear()
            return
        for serial in serials:
            self._profiles.pop(serial, None)


@dataclass
class _Presence:
    """One device's connections and disconnection since the last write."""

    #: The latest hello, if it connected since the last write.
    hello: Hello | None
    node: str
    first_connected: float | None = None
    connected: float | None = None
    #: When its last connection here ended, if it did after the hello (or
    #: with no hello pending).
    disconnected: float | None = None

    def then(self, later: _Presence) -> _Presence:
        """This presence followed by ``later``."""
        if later.hello is not None:
            first = self.first_connected if self.hello is not None else later.first_connected
            return _Presence(later.hello, later.node, first, later.connected, later.disconnected)
        return _Presence(
            self.hello, self.node, self.first_connected, self.connected, later.disconnected
        )

    def row(self, serial: int) -> tuple:
        return (serial, self.hello, self.node, self.first_connected, self.connected,
                self.disconnected)


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
    Connections, disconnections, commits and delivery errors, added up per
    device and written every :data:`FLUSH_INTERVAL` seconds and when stopped:
    the connections first, so that a device new to the registry is in it
    before its first commit is counted.

    A write that fails is kept and tried again with the next; once stopped,
    every event is written at once, so none is lost to a late commit.
    """

    def __init__(self, store: Any, clock: IReactorTime, interval: float = FLUSH_INTERVAL) -> None:
        super().__init__(interval, self.flush)
        self.clock = clock
        self._store = store
        self._pending: dict[int, _Activity] = {}
        self._presence: dict[int, _Presence] = {}

    def device_connected(self, hello: Hello, node: str, now: float) -> Deferred[None]:
        """Record the device's hello: connected to ``node`` since ``now``."""
        return self._add(self._presence, hello.serial, _Presence(hello, node, now, now))

    def device_disconnected(self, serial: int, node: str, now: float) -> Deferred[None]:
        """Record the device disconnected from ``node`` (unless another node holds it)."""
        return self._add(self._presence, serial, _Presence(None, node, disconnected=now))

    def upload_committed(self, serial: int, record_count: int, now: float) -> Deferred[None]:
        """Count ``record_count`` records delivered and clear the device's last error."""
        check_count("record_count", record_count)
        pending = self._pending.get(serial)
        if pending is None or not self.running:
            return self._add(self._pending, serial, _Activity(record_count, now, now, None))
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
        return self._add(
            self._pending, serial, _Activity(0, None, now, str(reason).replace("\x00", "\\x00"))
        )

    def _add(self, pending: dict, serial: int, entry: _Activity | _Presence) -> Deferred[None]:
        """``entry`` merged into ``pending``'s for the device (Activity or Presence)."""
        check_serial(serial)
        earlier = pending.get(serial)
        pending[serial] = entry if earlier is None else earlier.then(entry)
        if not self.running:
            return self.flush()
        return succeed(None)

    def flush(self) -> Deferred[None]:
        """Write what is pending; fires when written (or kept for the next try)."""
        if not self._presence:
            return self._flush_activity()
        presence, self._presence = self._presence, {}

        def failed(failure) -> None:
            _put_back(presence, self._presence, "connections", failure)

        written = self._store.record_presence(
            [earlier.row(serial) for serial, earlier in presence.items()]
        )
        # Activity waits for the connections: a new device's row must exist first.
        return written.addCallbacks(lambda _: self._flush_activity(), failed)

    def _flush_activity(self) -> Deferred[None]:
        if not self._pending:
            return succeed(None)
        batch, self._pending = self._pending, {}

        def failed(failure) -> None:
            _put_back(batch, self._pending, "activity", failure)

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


def _put_back(batch: dict, pending: dict, what: str, failure) -> None:
    """A batch that could not be written, back in front of what came meanwhile."""
    for serial, earlier in batch.items():
        later = pending.get(serial)
        pending[serial] = earlier if later is None else earlier.then(later)
    log.warn(
        "registry: could not record the {what} of {count} devices, will retry: {reason}",
        what=what,
        count=len(batch),
        reason=one_line(failure.value),
    )


class RelayLedger:
    """
    The relay's :class:`~oemrelay.relay.DeviceLedger` on a registry:
    profiles cached, connections, commits and errors batched, the rest
    passed through.

    :param registry: a :class:`~oemrelay.registry.Registry`; its API changes
        make the cache forget the devices changed.
    """

    def __init__(
        self, registry: Any, clock: IReactorTime, profile_cache_seconds: float
    ) -> None:
        self.profiles = ProfileCache(registry.profiles_for, clock, profile_cache_seconds)
        self.activity = ActivityBatch(registry.devices, clock)
        registry.on_devices_changed(self.profiles.forget)
        self.profile_for = self.profiles.profile_for
        self.cached_profile = self.profiles.cached_profile
        self.upload_committed = self.activity.upload_committed
        self.delivery_failed = self.activity.delivery_failed
        self.device_connected = self.activity.device_connected
        self.device_disconnected = self.activity.device_disconnected
        self.due_commands = registry.due_commands
        self.command_sent = registry.command_sent
        self.command_result = registry.command_result
