"""
Tests for :mod:`oemrelay.registry.hot_path`: the profile cache and the
batched commit counters, on a fake registry and a fake clock.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from oemrelay.codec import Hello
from oemrelay.registry.hot_path import ActivityBatch, ProfileCache, RelayLedger
from oemrelay.relay import DeviceProfile


def hello(serial: int = 1) -> Hello:
    return Hello(serial, "imei", "iccid")


class _Lookups:
    """A registry's profiles_for answered by the test, keeping the serials of each call."""

    def __init__(self) -> None:
        self.calls: list[Deferred] = []
        self.serials: list[list[int]] = []
        self.profile = DeviceProfile(custom1="one")

    def __call__(self, serials: list[int]) -> Deferred:
        answer: Deferred = Deferred()
        self.calls.append(answer)
        self.serials.append(serials)
        return answer

    def answer(self) -> None:
        self.calls[-1].callback({serial: self.profile for serial in self.serials[-1]})


class ProfileCacheTests(SynchronousTestCase):
    """Profiles come from memory while fresh, from the registry otherwise."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.lookups = _Lookups()
        self.cache = ProfileCache(self.lookups, self.clock, 5)

    def lookup(self, serial: int = 1) -> Deferred:
        return self.cache.profile_for(hello(serial))

    def test_hit(self) -> None:
        """A second lookup within max_age asks the registry nothing."""
        first = self.lookup()
        self.lookups.answer()
        self.assertEqual(self.successResultOf(first), self.lookups.profile)
        self.clock.advance(4.9)
        self.assertEqual(self.successResultOf(self.lookup()), self.lookups.profile)
        self.assertEqual(len(self.lookups.calls), 1)

    def test_stale_at_max_age(self) -> None:
        """A profile exactly max_age seconds old is looked up again."""
        self.lookup()
        self.lookups.answer()
        self.clock.advance(5)
        self.assertNoResult(self.lookup())
        self.assertEqual(len(self.lookups.calls), 2)

    def test_age_from_lookup_start(self) -> None:
        """A profile's age counts from when its lookup began, not when it answered."""
        self.lookup()
        self.clock.advance(3)
        self.lookups.answer()
        self.clock.advance(2)
        self.lookup()
        self.assertEqual(len(self.lookups.calls), 2)

    def test_per_device(self) -> None:
        """Each serial has its own entry."""
        self.lookup(1)
        self.lookups.answer()
        self.lookup(2)
        self.assertEqual(len(self.lookups.calls), 2)

    def test_forget(self) -> None:
        """A forgotten device is looked up again; others stay cached."""
        for serial in (1, 2):
            self.lookup(serial)
            self.lookups.answer()
        self.cache.forget([1])
        self.lookup(1)
        self.lookup(2)
        self.assertEqual(len(self.lookups.calls), 3)

    def test_forget_all(self) -> None:
        """forget(None) drops every profile."""
        self.lookup(1)
        self.lookups.answer()
        self.cache.forget()
        self.lookup(1)
        self.assertEqual(len(self.lookups.calls), 2)

    def test_lookup_across_forget_not_kept(self) -> None:
        """A lookup under way when the device is forgotten is not cached: it may be old."""
        self.lookup()
        self.cache.forget([1])
        self.lookups.answer()
        self.lookup()
        self.assertEqual(len(self.lookups.calls), 2)

    def test_misses_meanwhile_looked_up_together(self) -> None:
        """
        Devices missed while a lookup is in flight are looked up in one,
        after it; a device missed again while its own is in flight waits
        for that one.
        """
        first, again = self.lookup(1), self.lookup(1)
        waiting = [self.lookup(serial) for serial in (2, 3, 2)]
        self.assertEqual(self.lookups.serials, [[1]])
        self.lookups.answer()
        self.assertEqual(self.successResultOf(first), self.lookups.profile)
        self.assertEqual(self.successResultOf(again), self.lookups.profile)
        self.assertEqual(self.lookups.serials, [[1], [2, 3]])
        for answer in waiting:
            self.assertNoResult(answer)
        self.lookups.answer()
        for answer in waiting:
            self.assertEqual(self.successResultOf(answer), self.lookups.profile)
        self.lookup(3)
        self.assertEqual(len(self.lookups.calls), 2)

    def test_lookup_after_failure_goes_on(self) -> None:
        """A failed lookup fails all its waiters; those missed meanwhile are still looked up."""
        first, second = self.lookup(1), self.lookup(1)
        later = self.lookup(2)
        self.lookups.calls[-1].errback(RuntimeError("down"))
        self.failureResultOf(first, RuntimeError)
        self.failureResultOf(second, RuntimeError)
        self.assertEqual(self.lookups.serials, [[1], [2]])
        self.lookups.answer()
        self.assertEqual(self.successResultOf(later), self.lookups.profile)

    def test_failure_not_kept(self) -> None:
        """A failed lookup fails the caller and is not cached."""
        first = self.lookup()
        self.lookups.calls[-1].errback(RuntimeError("down"))
        self.failureResultOf(first, RuntimeError)
        self.lookup()
        self.assertEqual(len(self.lookups.calls), 2)

    def test_zero_keeps_nothing(self) -> None:
        """With max_age 0 every lookup asks the registry."""
        cache = ProfileCache(self.lookups, self.clock, 0)
        cache.profile_for(hello())
        self.lookups.answer()
        cache.profile_for(hello())
        self.assertEqual(len(self.lookups.calls), 2)


    def test_cached_profile_at_once(self) -> None:
        """cached_profile answers a fresh profile synchronously, asking the registry nothing."""
        self.assertIsNone(self.cache.cached_profile(hello()))
        self.assertEqual(self.lookups.calls, [])  # a miss begins no lookup
        self.lookup()
        self.lookups.answer()
        self.clock.advance(4.9)
        self.assertEqual(self.cache.cached_profile(hello()), self.lookups.profile)
        self.assertIsNone(self.cache.cached_profile(hello(2)))
        self.assertEqual(len(self.lookups.calls), 1)

    def test_cached_profile_stale_at_max_age(self) -> None:
        """cached_profile gives None for a profile exactly max_age old, as profile_for looks it up."""
        self.lookup()
        self.lookups.answer()
        self.clock.advance(5)
        self.assertIsNone(self.cache.cached_profile(hello()))

    def test_cached_profile_forgotten(self) -> None:
        """A forgotten profile is no longer offered."""
        self.lookup()
        self.lookups.answer()
        self.cache.forget([1])
        self.assertIsNone(self.cache.cached_profile(hello()))


class _Store:
    """A DeviceStore's record_presence and record_activity, keeping what they were given."""

    def __init__(self) -> None:
        self.written: list[list] = []
        self.presence: list[list] = []
        #: Every write, in order: ("presence" | "activity", rows).
        self.writes: list[tuple[str, list]] = []
        self.failing = False
        self.presence_failing = False

    def record_presence(self, presence: list) -> Deferred:
        if self.presence_failing:
            return fail(RuntimeError("database down"))
        self.presence.append(sorted(presence, key=lambda row: row[0]))
        self.writes.append(("presence", self.presence[-1]))
        return succeed(None)

    def record_activity(self, activity: list) -> Deferred:
        if self.failing:
            return fail(RuntimeError("database down"))
        self.written.append(sorted(activity))
        self.writes.append(("activity", self.written[-1]))
        return succeed(None)


class _BatchTestCase(SynchronousTestCase):
    """A started ActivityBatch on a Clock and a store keeping what it was given."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.store = _Store()
        self.batch = ActivityBatch(self.store, self.clock)
        self.batch.startService()


class ActivityBatchTests(_BatchTestCase):
    """Commits and errors are added up per device and written once a second and on stop."""

    def test_flushed_each_second(self) -> None:
        """Nothing is written before a second has passed; then one batch, counts summed."""
        self.batch.upload_committed(1, 10, 100.0)
        self.batch.upload_committed(1, 5, 100.5)
        self.batch.upload_committed(2, 3, 100.2)
        self.clock.advance(0.999)
        self.assertEqual(self.store.written, [])
        self.clock.advance(0.001)
        self.assertEqual(
            self.store.written,
            [[(1, 15, 100.5, 100.5, None), (2, 3, 100.2, 100.2, None)]],
        )

    def test_commits_added_in_place_keep_then_semantics(self) -> None:
        """Commits of one device in one second: counts add, last_seen never moves back."""
        self.batch.upload_committed(1, 10, 100.5)
        self.batch.delivery_failed(1, "down", 100.6)
        self.batch.upload_committed(1, 5, 100.2)  # the clock stepped back
        self.clock.advance(1)
        self.assertEqual(self.store.written, [[(1, 15, 100.2, 100.6, None)]])

    def test_commit_during_a_failing_write_not_lost(self) -> None:
        """A commit made while a write is under way is merged after the write's failure."""
        writes: list[Deferred] = []
        self.store.record_activity = lambda activity: writes.append(Deferred()) or writes[-1]
        self.batch.upload_committed(1, 10, 100.0)
        self.clock.advance(1)
        self.batch.upload_committed(1, 5, 101.0)
        self.batch.upload_committed(1, 1, 101.1)
        writes[0].errback(RuntimeError("database down"))
        del self.store.record_activity
        self.clock.advance(1)
        self.assertEqual(self.store.written, [[(1, 16, 101.1, 101.1, None)]])

    def test_nothing_pending_nothing_written(self) -> None:
        """A second with no activity writes nothing."""
        self.clock.advance(1)
        self.assertEqual(self.store.written, [])

    def test_last_event_sets_error(self) -> None:
        """The device's last error is that of its last event: a failure after a commit stays."""
        self.batch.upload_committed(1, 10, 100.0)
        self.batch.delivery_failed(1, "HTTP 503", 101.0)
        self.batch.delivery_failed(2, "down", 100.0)
        self.batch.upload_committed(2, 1, 102.0)
        self.clock.advance(1)
        self.assertEqual(
            self.store.written,
            [[(1, 10, 100.0, 101.0, "HTTP 503"), (2, 1, 102.0, 102.0, None)]],
        )

    def test_flushed_on_stop(self) -> None:
        """Stopping writes what is pending; later events are written at once."""
        self.batch.upload_committed(1, 10, 100.0)
        self.successResultOf(self.batch.stopService())
        self.assertEqual(self.store.written, [[(1, 10, 100.0, 100.0, None)]])
        self.batch.upload_committed(1, 2, 101.0)
        self.assertEqual(self.store.written[-1], [(1, 2, 101.0, 101.0, None)])

    def test_failed_write_kept(self) -> None:
        """A write that fails is retried with the next one, merged, nothing lost."""
        self.store.failing = True
        self.batch.upload_committed(1, 10, 100.0)
        self.clock.advance(1)
        self.batch.upload_committed(1, 5, 101.5)
        self.store.failing = False
        self.clock.advance(1)
        self.assertEqual(self.store.written, [[(1, 15, 101.5, 101.5, None)]])
        self.flushLoggedErrors()

    def test_timer_survives_failure(self) -> None:
        """After a failed write the timer keeps running."""
        self.store.failing = True
        self.batch.upload_committed(1, 1, 100.0)
        self.clock.advance(1)
        self.store.failing = False
        self.clock.advance(1)
        self.assertEqual(len(self.store.written), 1)

    def test_bad_values_refused(self) -> None:
        """A negative count or a serial past uint32 is refused at once."""
        self.assertRaises(ValueError, self.batch.upload_committed, 1, -1, 100.0)
        self.assertRaises(ValueError, self.batch.upload_committed, 2**32, 1, 100.0)

    def test_nul_escaped(self) -> None:
        """A NUL in a reason is stored escaped (PostgreSQL text holds no NUL)."""
        self.batch.delivery_failed(1, "a\x00b", 100.0)
        self.clock.advance(1)
        self.assertEqual(self.store.written[0][0][4], "a\\x00b")


class PresenceBatchTests(_BatchTestCase):
    """Connections and disconnections are batched with the activity, written first."""

    def test_flushed_each_second(self) -> None:
        """Nothing is written before a second has passed; then one presence batch."""
        self.batch.device_connected(hello(1), "node-a", 100.0)
        self.batch.device_connected(hello(2), "node-a", 100.5)
        self.clock.advance(0.999)
        self.assertEqual(self.store.presence, [])
        self.clock.advance(0.001)
        self.assertEqual(self.store.presence, [[
            (1, hello(1), "node-a", 100.0, 100.0, None),
            (2, hello(2), "node-a", 100.5, 100.5, None),
        ]])

    def test_connected_then_gone(self) -> None:
        """A device that came and went within one batch: its hello, then its disconnection."""
        self.batch.device_connected(hello(1), "node-a", 100.0)
        self.batch.device_disconnected(1, "node-a", 100.7)
        self.clock.advance(1)
        self.assertEqual(self.store.presence, [[(1, hello(1), "node-a", 100.0, 100.0, 100.7)]])

    def test_reconnected(self) -> None:
        """Gone and back within one batch: the last hello, first seen at the first, connected."""
        first, second = hello(1), Hello(1, "353323081669731", "8961", 34, 2, 1, 10)
        self.batch.device_connected(first, "node-a", 100.0)
        self.batch.device_disconnected(1, "node-a", 100.2)
        self.batch.device_connected(second, "node-a", 100.4)
        self.clock.advance(1)
        self.assertEqual(self.store.presence, [[(1, second, "node-a", 100.0, 100.4, None)]])

    def test_disconnected_alone(self) -> None:
        """A disconnection with no hello in the batch is written as one."""
        self.batch.device_disconnected(5, "node-a", 101.0)
        self.clock.advance(1)
        self.assertEqual(self.store.presence, [[(5, None, "node-a", None, None, 101.0)]])

    def test_presence_before_activity(self) -> None:
        """The connections are written before the commits (a new device's row must exist)."""
        self.batch.upload_committed(1, 10, 100.1)
        self.batch.device_connected(hello(1), "node-a", 100.0)
        self.clock.advance(1)
        self.assertEqual([kind for kind, _ in self.store.writes], ["presence", "activity"])

    def test_failed_presence_kept_and_activity_waits(self) -> None:
        """A failed presence write is retried, merged with what came since; the commits wait for it."""
        self.store.presence_failing = True
        self.batch.device_connected(hello(1), "node-a", 100.0)
        self.batch.upload_committed(1, 10, 100.1)
        self.clock.advance(1)
        self.assertEqual(self.store.writes, [])
        self.batch.device_disconnected(1, "node-a", 101.5)
        self.store.presence_failing = False
        self.clock.advance(1)
        self.assertEqual(self.store.writes, [
            ("presence", [(1, hello(1), "node-a", 100.0, 100.0, 101.5)]),
            ("activity", [(1, 10, 100.1, 100.1, None)]),
        ])
        self.flushLoggedErrors()

    def test_flushed_on_stop(self) -> None:
        """Stopping writes the pending connections; later ones are written at once."""
        self.batch.device_connected(hello(1), "node-a", 100.0)
        self.successResultOf(self.batch.stopService())
        self.assertEqual(len(self.store.presence), 1)
        self.batch.device_disconnected(1, "node-a", 101.0)
        self.assertEqual(self.store.presence[-1], [(1, None, "node-a", None, None, 101.0)])

    def test_bad_serial_refused(self) -> None:
        """A serial past uint32 is refused at once, not at the write."""
        self.assertRaises(ValueError, self.batch.device_connected, hello(2**32), "node-a", 1.0)
        self.assertRaises(ValueError, self.batch.device_disconnected, -1, "node-a", 1.0)


class _Registry:
    """What RelayLedger takes from a Registry."""

    def __init__(self) -> None:
        self.lookups = _Lookups()
        self.profiles_for = self.lookups
        self.devices = _Store()
        self.listeners: list = []
        self.device_connected = self.device_disconnected = lambda *a: succeed(None)
        self.due_commands = self.command_sent = self.command_result = lambda *a: succeed(None)

    def on_devices_changed(self, listener) -> None:
        self.listeners.append(listener)


class RelayLedgerTests(SynchronousTestCase):
    """The relay's ledger caches profiles and forgets those the API changed."""

    def test_change_forgets(self) -> None:
        """A change told by the registry makes the next lookup ask it again."""
        registry = _Registry()
        ledger = RelayLedger(registry, Clock(), 5)
        ledger.profile_for(hello())
        registry.lookups.answer()
        ledger.profile_for(hello())
        self.assertEqual(len(registry.lookups.calls), 1)
        for listener in registry.listeners:
            listener((1,))
        ledger.profile_for(hello())
        self.assertEqual(len(registry.lookups.calls), 2)

    def test_cached_profile_offered(self) -> None:
        """The ledger offers the relay its cache's synchronous answer."""
        registry = _Registry()
        ledger = RelayLedger(registry, Clock(), 5)
        self.assertIsNone(ledger.cached_profile(hello()))
        ledger.profile_for(hello())
        registry.lookups.answer()
        self.assertEqual(ledger.cached_profile(hello()), registry.lookups.profile)
