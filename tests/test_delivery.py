"""
Tests for the delivery decision in :class:`oemrelay.relay.DeviceRoute`:
several connectors per device, their roles, the commit policy, the spool
and retries inside the commit window.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from oemrelay.events import Observers, RelayObserver
from oemrelay.relay import (
    BEST_EFFORT,
    COMMIT_SPOOLED,
    DeliveryFailed,
    DeviceProfile,
    Relay,
    SpoolFull,
    Upload,
)
from oemrelay.retry import RetryPolicy

from .fakes import FakeConnector
from .test_relay import HELLO, FakeProfiles, make_upload


class FakeSpool:
    """Records what is put; answers with ``answer`` (None: succeed at once)."""

    def __init__(self, answer: Exception | Deferred | None = None) -> None:
        self.answer = answer
        self.puts: list[tuple[Upload, tuple[str, ...]]] = []

    def put(self, upload: Upload, connectors: tuple[str, ...]) -> Deferred[None]:
        self.puts.append((upload, connectors))
        if isinstance(self.answer, Deferred):
            return self.answer
        return succeed(None) if self.answer is None else fail(self.answer)


class NotSpooled(RelayObserver):
    """Records copy_not_spooled events."""

    def __init__(self) -> None:
        self.events: list[tuple] = []

    def copy_not_spooled(self, upload, connectors, reason) -> None:
        self.events.append((upload, connectors, reason))


class DeliveryTestMixin:
    """Three fake connectors a, b, c; the relay built per test."""

    def setUp(self) -> None:
        self.connectors = {name: FakeConnector(name) for name in "abc"}
        self.spool = FakeSpool()
        self.clock = Clock()
        self.observers = Observers()
        self.not_spooled = NotSpooled()
        self.observers.subscribe(self.not_spooled)

    def relay(self, default: str = "a", profile: DeviceProfile | None = None, **options) -> Relay:
        options.setdefault("spool", self.spool)
        return Relay(
            self.connectors,
            default,
            FakeProfiles(profile or DeviceProfile()),
            observers=self.observers,
            **options,
        )

    def deliver(self, relay: Relay, upload: Upload | None = None) -> Deferred[None]:
        route = relay.open_route(HELLO, lambda reason: None)
        return route.deliver(upload or make_upload(1, 2))

    def link(self, name: str):
        return self.connectors[name].links[-1]


class SeveralConnectorsTests(DeliveryTestMixin, SynchronousTestCase):
    """Every required connector gets the upload; the commit waits for all."""

    def test_each_required_connector_delivered_concurrently(self) -> None:
        """With connector = a b both links get the upload before either answers."""
        delivery = self.deliver(self.relay("a b"))
        self.assertEqual(len(self.link("a").deliveries), 1)
        self.assertEqual(len(self.link("b").deliveries), 1)
        self.assertEqual(self.connectors["c"].links, [])
        self.link("a").answer().callback(None)
        self.assertNoResult(delivery)
        self.link("b").answer().callback(None)
        self.successResultOf(delivery)

    def test_one_refusal_withholds(self) -> None:
        """One required connector's refusal fails the delivery with that connector's reason."""
        delivery = self.deliver(self.relay("a b"))
        self.link("a").answer().callback(None)
        self.link("b").answer().errback(DeliveryFailed("b answered 400"))
        self.assertEqual(str(self.failureResultOf(delivery, DeliveryFailed).value), "b answered 400")

    def test_override_lists_several(self) -> None:
        """A registry override of 'b c' sends to b and c, not the default a."""
        delivery = self.deliver(self.relay("a", DeviceProfile(connector="b c")))
        self.link("b").answer().callback(None)
        self.link("c").answer().callback(None)
        self.successResultOf(delivery)
        self.assertEqual(self.connectors["a"].links, [])

    def test_override_naming_unknown_connector(self) -> None:
        """An override naming one unconfigured connector among others withholds, kind configuration."""
        delivery = self.deliver(self.relay("a", DeviceProfile(connector="b nope")))
        failure = self.failureResultOf(delivery, DeliveryFailed)
        self.assertEqual(failure.value.kind, "configuration")
        self.assertIn("'nope'", str(failure.value))

    def test_unknown_default_among_several_refused(self) -> None:
        """A relay whose default list names an unknown connector is refused."""
        with self.assertRaises(ValueError):
            self.relay("a nope")


class RoleTests(DeliveryTestMixin, SynchronousTestCase):
    """Best-effort connectors go through the spool and never hold the device back."""

    def test_best_effort_copy_spooled_after_required(self) -> None:
        """The best-effort connector's copy is put in the spool once the required one accepted."""
        upload = make_upload(3)
        delivery = self.deliver(self.relay("a b", roles={"b": BEST_EFFORT}), upload)
        self.assertEqual(self.connectors["b"].links[-1].deliveries, [])
        self.assertEqual(self.spool.puts, [])
        self.link("a").answer().callback(None)
        self.successResultOf(delivery)
        self.assertEqual(self.spool.puts, [(upload, ("b",))])

    def test_no_copy_when_required_refused(self) -> None:
        """A withheld commit spools no best-effort copy (the device resends it)."""
        delivery = self.deliver(self.relay("a b", roles={"b": BEST_EFFORT}))
        self.link("a").answer().errback(DeliveryFailed("a answered 503"))
        self.failureResultOf(delivery, DeliveryFailed)
        self.assertEqual(self.spool.puts, [])

    def test_failed_copy_does_not_withhold(self) -> None:
        """A best-effort copy the spool refuses is reported, and the commit still goes ahead."""
        self.spool.answer = SpoolFull("spool holds 1000 records")
        delivery = self.deliver(self.relay("a b", roles={"b": BEST_EFFORT}))
        self.link("a").answer().callback(None)
        self.successResultOf(delivery)
        [(_, connectors, reason)] = self.not_spooled.events
        self.assertEqual(connectors, ("b",))
        self.assertIn("spool full", reason)

    def test_slow_copy_does_not_hold_device(self) -> None:
        """The delivery fires while the best-effort put is still pending."""
        self.spool.answer = Deferred()
        delivery = self.deliver(self.relay("a b", roles={"b": BEST_EFFORT}))
        self.link("a").answer().callback(None)
        self.successResultOf(delivery)

    def test_only_best_effort_commits_at_once(self) -> None:
        """A device whose only connector is best effort is committed once its copy is handed over."""
        delivery = self.deliver(self.relay("b", roles={"b": BEST_EFFORT}))
        self.successResultOf(delivery)
        self.assertEqual([names for _, names in self.spool.puts], [("b",)])

    def test_best_effort_needs_spool(self) -> None:
        """A best-effort role without a spool is refused when the relay is built."""
        with self.assertRaises(ValueError):
            self.relay("a b", roles={"b": BEST_EFFORT}, spool=None)


class SpooledPolicyTests(DeliveryTestMixin, SynchronousTestCase):
    """commit_policy = spooled: the commit waits for the spool alone."""

    def test_put_with_every_connector(self) -> None:
        """The upload is spooled for all of the device's connectors and no link delivers it."""
        upload = make_upload(4)
        self.spool.answer = Deferred()
        delivery = self.deliver(
            self.relay("a b", roles={"b": BEST_EFFORT}, commit_policy=COMMIT_SPOOLED), upload
        )
        self.assertNoResult(delivery)
        self.spool.answer.callback(None)
        self.successResultOf(delivery)
        self.assertEqual(self.spool.puts, [(upload, ("a", "b"))])
        self.assertEqual(self.link("a").deliveries, [])

    def test_spool_full_withholds(self) -> None:
        """A full spool withholds the commit, kind spool_full, so the device keeps its data."""
        self.spool.answer = SpoolFull("full")
        delivery = self.deliver(self.relay("a", commit_policy=COMMIT_SPOOLED))
        self.assertEqual(self.failureResultOf(delivery, DeliveryFailed).value.kind, "spool_full")

    def test_spool_error_withholds(self) -> None:
        """Any other spool failure withholds the commit, kind spool, with a one-line reason."""
        self.spool.answer = OSError("disk full\nsecond line")
        delivery = self.deliver(self.relay("a", commit_policy=COMMIT_SPOOLED))
        failure = self.failureResultOf(delivery, DeliveryFailed)
        self.assertEqual(failure.value.kind, "spool")
        self.assertNotIn("\n", str(failure.value))

    def test_spooled_needs_spool(self) -> None:
        """commit_policy = spooled without a spool is refused when the relay is built."""
        with self.assertRaises(ValueError):
            self.relay("a", commit_policy=COMMIT_SPOOLED, spool=None)


class RouteRetryTests(DeliveryTestMixin, SynchronousTestCase):
    """Each required connector retries on its own, bounded by the upload's commit window."""

    def retrying_relay(self, default: str = "a") -> Relay:
        return self.relay(
            default,
            retry=RetryPolicy(self.clock, 0.5, 5, lambda: 1.0),
            commit_timeout=2.0,
        )

    def test_transient_failure_retried(self) -> None:
        """A 503-like failure is delivered again after the backoff and the upload accepted."""
        delivery = self.deliver(self.retrying_relay())
        self.link("a").answer().errback(DeliveryFailed("503", retryable=True))
        self.clock.advance(0.5)
        self.assertEqual(len(self.link("a").deliveries), 2)
        self.link("a").answer().callback(None)
        self.successResultOf(delivery)

    def test_window_counts_from_commit_request(self) -> None:
        """The window runs from the upload's received_at: a retry due after it is not made."""
        self.clock.advance(1000.5)  # make_upload's received_at is 1000.0
        delivery = self.deliver(self.retrying_relay())
        self.link("a").answer().errback(DeliveryFailed("503", retryable=True, retry_after=1.5))
        self.failureResultOf(delivery, DeliveryFailed)
        self.assertEqual(len(self.link("a").deliveries), 1)

    def test_each_connector_retries_alone(self) -> None:
        """Only the failed connector is tried again; the other's acceptance stands."""
        delivery = self.deliver(self.retrying_relay("a b"))
        self.link("a").answer().callback(None)
        self.link("b").answer().errback(DeliveryFailed("503", retryable=True))
        self.clock.advance(0.5)
        self.assertEqual((len(self.link("a").deliveries), len(self.link("b").deliveries)), (1, 2))
        self.link("b").answer().callback(None)
        self.successResultOf(delivery)
