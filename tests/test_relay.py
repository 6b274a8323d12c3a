"""
Tests for :mod:`oemrelay.relay`: choosing a device's connector, opening and
reusing its links, and the values and helpers around an upload.
"""

from __future__ import annotations


from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from oemrelay.codec import Frame, Hello, MessageType, Record, parse_hello
from oemrelay.relay import (
    MAX_HELD_FRAMES,
    MAX_PLANS,
    DeliveryFailed,
    DeviceProfile,
    DeviceRoute,
    NoRegistry,
    Relay,
    StatelessLink,
    Upload,
    describe_failure,
)

from .fakes import FakeConnector
from .vectors import capture

HELLO = parse_hello(capture("hello-49-byte-dart")[5:])
OTHER_HELLO = parse_hello(capture("hello-51-byte-G50")[5:])


def make_upload(*seqs: int, hello: Hello = HELLO) -> Upload:
    """An upload holding records with the sequence numbers ``seqs``."""
    return Upload(hello, (), tuple(Record(seq, 0, 1) for seq in seqs), 1000.0)


class FakeProfiles(NoRegistry):
    """A profile source answering with a set profile, at once or when told."""

    def __init__(self, profile: DeviceProfile | None = None) -> None:
        self.profile = profile
        self.asked: list[Hello] = []
        self.pending: list[Deferred[DeviceProfile]] = []

    def profile_for(self, hello: Hello) -> Deferred[DeviceProfile]:
        self.asked.append(hello)
        if self.profile is not None:
            return succeed(self.profile)
        answer: Deferred[DeviceProfile] = Deferred()
        self.pending.append(answer)
        return answer


class RouteTestMixin:
    """Two connectors, ``main`` the default and ``other``."""

    def setUp(self) -> None:
        self.main = FakeConnector("main")
        self.other = FakeConnector("other")
        self.lost: list[str] = []

    def route(self, profiles: FakeProfiles | None = None, **options: int) -> DeviceRoute:
        relay = Relay({"main": self.main, "other": self.other}, "main", profiles, **options)
        return relay.open_route(HELLO, self.lost.append)


class RelayTests(RouteTestMixin, SynchronousTestCase):
    """Building a relay and opening routes."""

    def test_unknown_default_refused(self) -> None:
        """A default connector that is not configured is refused."""
        with self.assertRaises(ValueError) as raised:
            Relay({"main": self.main}, "missing")
        self.assertIn("missing", str(raised.exception))

    def test_no_profiles_by_default(self) -> None:
        """Without a profile source every device gets the empty profile."""
        relay = Relay({"main": self.main}, "main")
        self.assertIsInstance(relay.registry, NoRegistry)
        self.assertEqual(self.successResultOf(relay.registry.profile_for(HELLO)), DeviceProfile())

    def test_connectors_copied(self) -> None:
        """The relay keeps its own copy of the connector mapping."""
        connectors = {"main": self.main}
        relay = Relay(connectors, "main")
        connectors["later"] = self.other
        self.assertEqual(list(relay.connectors), ["main"])

    def test_open_route_opens_default_link(self) -> None:
        """Opening a route opens one link to the default connector only, with the device's hello."""
        self.route()
        self.assertEqual(len(self.main.links), 1)
        self.assertEqual(self.other.links, [])
        self.assertEqual(self.main.links[0].hello, HELLO)

    def test_on_lost_passed_to_link(self) -> None:
        """The route gives the link the session's on_lost callback."""
        self.route()
        self.main.links[0].on_lost("end server gone")
        self.assertEqual(self.lost, ["end server gone"])

    def test_each_route_has_its_own_links(self) -> None:
        """Two device connections get two links to the same connector."""
        first = self.route()
        second = self.route()
        self.assertEqual(len(self.main.links), 2)
        self.assertIsNot(first.link_for("main"), second.link_for("main"))


class CachedProfiles(FakeProfiles):
    """A registry that holds profiles in memory: ``cached`` (None: a miss)."""

    def __init__(self, cached: DeviceProfile | None, profile: DeviceProfile | None = None) -> None:
        super().__init__(profile)
        self.cached = cached

    def cached_profile(self, hello: Hello) -> DeviceProfile | None:
        return self.cached


class FastPathTests(RouteTestMixin, SynchronousTestCase):
    """A cached profile and one required connector: the link's own Deferred answers."""

    def test_cached_profile_asks_nothing(self) -> None:
        """With the profile in memory profile_for is not called and the link's Deferred is the answer."""
        profiles = CachedProfiles(DeviceProfile(custom1="k", connector="other"))
        route = self.route(profiles)
        profiles.asked.clear()  # the route's open_ahead asked once
        delivery = route.deliver(make_upload(1))
        self.assertEqual(profiles.asked, [])
        [(_, given, answer)] = self.other.links[0].deliveries
        self.assertEqual(given.custom1, "k")
        self.assertIs(delivery, answer)

    def test_cache_miss_looks_up(self) -> None:
        """A miss asks profile_for and waits for it."""
        profiles = CachedProfiles(None)
        route = self.route(profiles)
        delivery = route.deliver(make_upload(1))
        self.assertNoResult(delivery)
        self.assertEqual(self.main.links, [])
        for lookup in profiles.pending:
            lookup.callback(DeviceProfile())
        self.main.links[0].answer().callback(None)
        self.assertIsNone(self.successResultOf(delivery))

    def test_no_registry_is_the_fast_path(self) -> None:
        """Without a registry the empty profile is used at once."""
        route = self.route()
        delivery = route.deliver(make_upload(1))
        self.assertIs(delivery, self.main.links[0].answer())

    def test_closed_route_fails(self) -> None:
        """A closed route delivers nothing, even with the profile at hand."""
        route = self.route(CachedProfiles(DeviceProfile()))
        route.close()
        failure = self.failureResultOf(route.deliver(make_upload(1)), DeliveryFailed)
        self.assertEqual(failure.value.kind, "closed")

    def test_cached_unknown_device_refused(self) -> None:
        """With unknown_devices = reject a cached profile of an unknown device is refused."""
        relay = Relay(
            {"main": self.main},
            "main",
            CachedProfiles(DeviceProfile(known=False)),
            unknown_devices="reject",
        )
        route = relay.open_route(HELLO, self.lost.append)
        failure = self.failureResultOf(route.deliver(make_upload(1)), DeliveryFailed)
        self.assertEqual(failure.value.kind, "unknown_device")

    def test_link_raising_fails_the_delivery(self) -> None:
        """A link that raises instead of failing its Deferred fails the delivery, not the caller."""
        route = self.route()
        route.link_for("main").deliver = lambda upload, profile: 1 / 0
        self.failureResultOf(route.deliver(make_upload(1)), ZeroDivisionError)

    def test_cancel_reaches_link(self) -> None:
        """Cancelling the delivery cancels the link's Deferred."""
        route = self.route(CachedProfiles(DeviceProfile()))
        delivery = route.deliver(make_upload(1))
        delivery.cancel()
        self.assertEqual(self.main.links[0].cancelled, [self.main.links[0].answer()])
        self.failureResultOf(delivery, CancelledError)


class DeliveryPlanTests(SynchronousTestCase):
    """Relay.plan_for: the connectors of one connector setting, remembered."""

    def setUp(self) -> None:
        self.relay = Relay(
            {"a": FakeConnector("a"), "b": FakeConnector("b")},
            "a",
            roles={"b": "best_effort"},
            spool=object(),
        )

    def test_default_and_override(self) -> None:
        """None is the default connector; an override names its own, sorted by role."""
        self.assertEqual(self.relay.plan_for(None).required, ("a",))
        plan = self.relay.plan_for("a b")
        self.assertEqual((plan.names, plan.required, plan.best_effort), (("a", "b"), ("a",), ("b",)))
        self.assertIsNone(plan.missing)
        self.assertEqual(self.relay.plan_for("b nope").missing, "nope")

    def test_remembered(self) -> None:
        """The same setting gives the same plan object."""
        self.assertIs(self.relay.plan_for("a b"), self.relay.plan_for("a b"))

    def test_bounded(self) -> None:
        """MAX_PLANS settings are remembered; one more starts afresh."""
        for index in range(MAX_PLANS):
            self.relay.plan_for(f"a {index}")
        first = self.relay.plan_for("a 0")
        self.assertIs(self.relay.plan_for("a 0"), first)
        self.relay.plan_for("a new")
        self.assertIsNot(self.relay.plan_for("a 0"), first)


class DeliverTests(RouteTestMixin, SynchronousTestCase):
    """Choosing the connector an upload goes to."""

    def test_default_connector_used(self) -> None:
        """Without an override the upload goes to the default connector's link with the profile."""
        route = self.route()
        upload = make_upload(5)
        delivery = route.deliver(upload)
        [(delivered, profile, answer)] = self.main.links[0].deliveries
        self.assertIs(delivered, upload)
        self.assertEqual(profile, DeviceProfile())
        self.assertNoResult(delivery)
        answer.callback(None)
        self.assertIsNone(self.successResultOf(delivery))
        self.assertEqual(self.other.links, [])

    def test_override_connector_used(self) -> None:
        """A profile's connector override sends the upload there, with the profile's fields."""
        profile = DeviceProfile(custom1="fleet 7", connector="other")
        profiles = FakeProfiles(profile)
        route = self.route(profiles)
        upload = make_upload(5)
        delivery = route.deliver(upload)
        self.assertEqual(profiles.asked[-1], HELLO)
        self.assertEqual(self.main.links, [])
        [(delivered, given, answer)] = self.other.links[0].deliveries
        self.assertIs(delivered, upload)
        self.assertEqual(given, profile)
        answer.callback(None)
        self.successResultOf(delivery)

    def test_profile_without_override_uses_default(self) -> None:
        """A profile with custom fields but no override goes to the default connector."""
        profile = DeviceProfile(custom2="x")
        route = self.route(FakeProfiles(profile))
        route.deliver(make_upload(1))
        self.assertEqual(self.main.links[0].deliveries[0][1], profile)
        self.assertEqual(self.other.links, [])

    def test_unknown_override_fails(self) -> None:
        """An override naming no configured connector fails with DeliveryFailed naming it."""
        route = self.route(FakeProfiles(DeviceProfile(connector="nowhere")))
        delivery = route.deliver(make_upload(1))
        failure = self.failureResultOf(delivery, DeliveryFailed)
        self.assertIn("'nowhere'", str(failure.value))
        self.assertEqual(self.main.links, [])
        self.assertEqual(self.other.links, [])

    def test_delivery_waits_for_profile(self) -> None:
        """Nothing is delivered until the profile lookup answers."""
        profiles = FakeProfiles()
        route = self.route(profiles)
        delivery = route.deliver(make_upload(1))
        self.assertNoResult(delivery)
        self.assertEqual(self.other.links, [])
        profiles.pending[-1].callback(DeviceProfile(connector="other"))
        self.assertEqual(len(self.other.links[0].deliveries), 1)
        self.other.links[0].deliveries[0][2].callback(None)
        self.successResultOf(delivery)

    def test_profile_failure_fails_delivery(self) -> None:
        """A failed profile lookup fails the delivery."""
        profiles = FakeProfiles()
        route = self.route(profiles)
        delivery = route.deliver(make_upload(1))
        profiles.pending[-1].errback(DeliveryFailed("registry unreachable"))
        self.failureResultOf(delivery, DeliveryFailed)
        self.assertEqual(self.main.links, [])

    def test_link_failure_fails_delivery(self) -> None:
        """A link's failure is the delivery's failure."""
        route = self.route()
        delivery = route.deliver(make_upload(1))
        self.main.links[0].deliveries[0][2].errback(DeliveryFailed("answered 500"))
        failure = self.failureResultOf(delivery, DeliveryFailed)
        self.assertEqual(str(failure.value), "answered 500")

    def test_cancel_reaches_link(self) -> None:
        """Cancelling a delivery cancels the link's Deferred."""
        route = self.route()
        delivery = route.deliver(make_upload(1))
        answer = self.main.links[0].deliveries[0][2]
        delivery.cancel()
        self.assertTrue(answer.called)
        self.failureResultOf(delivery)

    def test_links_opened_once_and_reused(self) -> None:
        """Each connector's link is opened once per route and reused by later deliveries."""
        route = self.route(FakeProfiles(DeviceProfile(connector="other")))
        for seq in (1, 2, 3):
            route.deliver(make_upload(seq))
        self.assertEqual(self.main.links, [])
        self.assertEqual(len(self.other.links), 1)
        self.assertEqual(
            [upload.first_seq for upload, _, _ in self.other.links[0].deliveries], [1, 2, 3]
        )
        self.assertIs(route.link_for("other"), self.other.links[0])

    def test_deliver_after_close_fails_without_opening_link(self) -> None:
        """A delivery whose profile arrives after the route closed fails and opens no link."""
        profiles = FakeProfiles()
        route = self.route(profiles)
        delivery = route.deliver(make_upload(1))
        route.close()
        for lookup in profiles.pending:
            lookup.callback(DeviceProfile(connector="other"))
        self.failureResultOf(delivery, DeliveryFailed)
        self.assertEqual(self.other.links, [])
        self.assertEqual(self.main.links, [])


class ForwardCloseTests(RouteTestMixin, SynchronousTestCase):
    """Frames outside uploads, and the end of a device connection."""

    def test_forward_reaches_open_links(self) -> None:
        """forward() passes the frame to every open link."""
        route = self.route(FakeProfiles(DeviceProfile(connector="other")))
        route.link_for("main")
        frame = Frame(MessageType.SOCKET_CLOSE, b"")
        route.forward(frame)
        self.assertEqual(self.main.links[0].forwarded, [frame])
        self.assertEqual(self.other.links[0].forwarded, [frame])

    def test_own_connector_opened_ahead(self) -> None:
        """Before any delivery the link of the device's own connector is open and gets frames; the default's is not opened."""
        route = self.route(FakeProfiles(DeviceProfile(connector="other")))
        route.forward(Frame(0x7E, b"x"))
        self.assertEqual(self.other.links[0].forwarded, [Frame(0x7E, b"x")])
        self.assertEqual(self.main.links, [])

    def test_frames_held_until_link_opens(self) -> None:
        """Frames passed on before the profile is known reach the link once it opens, in order; past 64 they are dropped."""
        profiles = FakeProfiles()
        route = self.route(profiles)
        frames = [Frame(0x7E, bytes([i])) for i in range(MAX_HELD_FRAMES + 3)]
        for frame in frames:
            route.forward(frame)
        profiles.pending[0].callback(DeviceProfile(connector="other"))
        self.assertEqual(self.other.links[0].forwarded, frames[:MAX_HELD_FRAMES])
        route.forward(frames[0])
        self.assertEqual(self.other.links[0].forwarded[-1], frames[0])

    def test_held_frames_limit_is_the_relays(self) -> None:
        """A relay made with max_held_frames=3 holds exactly three frames for a link not yet open."""
        profiles = FakeProfiles()
        route = self.route(profiles, max_held_frames=3)
        frames = [Frame(0x7E, bytes([i])) for i in range(4)]
        for frame in frames:
            route.forward(frame)
        profiles.pending[0].callback(DeviceProfile(connector="other"))
        self.assertEqual(self.other.links[0].forwarded, frames[:3])

    def test_nothing_opened_ahead_while_profile_unknown(self) -> None:
        """No link opens until the profile lookup answers; a failed lookup opens none."""
        profiles = FakeProfiles()
        self.route(profiles)
        self.assertEqual((self.main.links, self.other.links), ([], []))
        profiles.pending[0].errback(DeliveryFailed("registry unreachable"))
        self.assertEqual((self.main.links, self.other.links), ([], []))

    def test_close_closes_all_links(self) -> None:
        """close() closes every open link exactly once, even if called again."""
        route = self.route(FakeProfiles(DeviceProfile(connector="other")))
        route.link_for("main")
        route.close()
        route.close()
        self.assertEqual(self.main.links[0].closed, 1)
        self.assertEqual(self.other.links[0].closed, 1)

    def test_forward_after_close_reaches_nothing(self) -> None:
        """After close() forwarded frames reach no link."""
        route = self.route()
        route.close()
        route.forward(Frame(0x7E, b"x"))
        self.assertEqual(self.main.links[0].forwarded, [])


class UploadTests(SynchronousTestCase):
    """The upload value."""

    def test_first_seq_is_first_record(self) -> None:
        """first_seq is the sequence number of the first record, not the smallest."""
        self.assertEqual(make_upload(530, 518, 600).first_seq, 530)

    def test_first_seq_empty(self) -> None:
        """An upload without records has no first_seq."""
        self.assertIsNone(make_upload().first_seq)

    def test_upload_frozen(self) -> None:
        """An upload cannot be changed once made."""
        upload = make_upload(1)
        with self.assertRaises(AttributeError):
            upload.records = ()  # type: ignore[misc]


class StatelessLinkTests(SynchronousTestCase):
    """The link of connectors without per-device state."""

    def test_deliver_is_the_callable(self) -> None:
        """deliver calls the function given; forward and close do nothing."""
        calls = []
        link = StatelessLink(lambda upload, profile: calls.append((upload, profile)) or succeed(None))
        upload = make_upload(1)
        self.successResultOf(link.deliver(upload, DeviceProfile()))
        link.forward(Frame(0x26, b""))
        link.close()
        self.assertEqual(calls, [(upload, DeviceProfile())])


class DescribeFailureTests(SynchronousTestCase):
    """One-line reasons for failed deliveries."""

    def test_delivery_failed_message_verbatim(self) -> None:
        """A DeliveryFailed is described by its message as it is."""
        failure = Failure(DeliveryFailed("connector main: http://x answered 503: 'busy'"))
        self.assertEqual(describe_failure(failure), "connector main: http://x answered 503: 'busy'")

    def test_multiline_error_made_one_line(self) -> None:
        """Any other error's message is folded to one line."""
        failure = Failure(ValueError("first line\n   second\tline\r\n"))
        self.assertEqual(describe_failure(failure), "first line second line")

    def test_empty_message_named_by_type(self) -> None:
        """An error with no message is described by its type name."""
        self.assertEqual(describe_failure(Failure(ConnectionError())), "ConnectionError")


class PresenceRegistry(NoRegistry):
    """Records connection writes; device_connected answers when the test says."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []
        self.connected: list[Deferred[None]] = []

    def device_connected(self, hello: Hello, node: str, now: float) -> Deferred[None]:
        self.calls.append(("connected", hello.serial))
        answer: Deferred[None] = Deferred()
        self.connected.append(answer)
        return answer

    def device_disconnected(self, serial: int, node: str, now: float) -> Deferred[None]:
        self.calls.append(("disconnected", serial))
        return succeed(None)


class PresenceTests(SynchronousTestCase):
    """Connections and disconnections reach the registry in order, once per device."""

    def setUp(self) -> None:
        self.registry = PresenceRegistry()
        self.relay = Relay({"main": FakeConnector("main")}, "main", self.registry, node="n")

    def test_disconnection_waits_for_connection_write(self) -> None:
        """A disconnection is written only after the connection write has finished."""
        route = self.relay.open_route(HELLO, lambda reason: None)
        route.close()
        self.assertEqual(self.registry.calls, [("connected", HELLO.serial)])
        self.registry.connected[0].callback(None)
        self.assertEqual(
            self.registry.calls,
            [("connected", HELLO.serial), ("disconnected", HELLO.serial)],
        )

    def test_reconnect_before_old_close(self) -> None:
        """A device that reconnected is not marked disconnected when its old connection closes."""
        old = self.relay.open_route(HELLO, lambda reason: None)
        new = self.relay.open_route(HELLO, lambda reason: None)
        for answer in self.registry.connected:
            answer.callback(None)
        old.close()
        self.assertNotIn(("disconnected", HELLO.serial), self.registry.calls)
        new.close()
        self.assertEqual(self.registry.calls[-1], ("disconnected", HELLO.serial))

    def test_failed_write_does_not_stop_the_queue(self) -> None:
        """A connection write that fails is logged and the disconnection is still written."""
        route = self.relay.open_route(HELLO, lambda reason: None)
        route.close()
        self.registry.connected[0].errback(Failure(RuntimeError("database locked")))
        self.assertEqual(self.registry.calls[-1], ("disconnected", HELLO.serial))
        self.assertEqual(len(self.flushLoggedErrors()), 0)

    def test_nothing_kept_once_written(self) -> None:
        """
        A device whose writes are done keeps no Deferred while connected, and
        nothing once gone; a later write after one under way still follows it.
        """
        route = self.relay.open_route(HELLO, lambda reason: None)
        device = self.relay.presence._devices[HELLO.serial]
        self.assertIsNotNone(device.writes)
        self.registry.connected[0].callback(None)
        self.assertIsNone(device.writes)
        again = self.relay.open_route(HELLO, lambda reason: None)
        route.close()
        again.close()
        self.assertEqual(self.registry.calls[-1], ("connected", HELLO.serial))
        self.registry.connected[1].callback(None)
        self.assertEqual(self.registry.calls[-1], ("disconnected", HELLO.serial))
        self.assertNotIn(HELLO.serial, self.relay.presence._devices)
