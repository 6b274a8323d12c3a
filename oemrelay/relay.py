"""
The path of an upload from a device session to the connectors.

A session turns what a device sent between two commit requests into an
:class:`Upload` value and hands it to its :class:`DeviceRoute`.  The route
looks up the device's profile (custom fields, connector override), picks the
connector and delivers through that connector's link for this device
connection.  The session alone decides what to tell the device: the route's
Deferred firing means "accepted by the end server", anything else means
"withhold the commit".

Nothing here assumes one connector or synchronous delivery: links are opened
per connector on demand and every delivery is a Deferred.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import FrozenInstanceError, dataclass, field
from functools import partial
from typing import Protocol

from twisted.internet.defer import Deferred, FirstError, fail, gatherResults, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from .codec import Frame, Hello, Record, frame_shape, parse_records
from .config import (
    BEST_EFFORT,
    COMMIT_DELIVERED,
    COMMIT_SPOOLED,
    REQUIRED,
    UNKNOWN_ACCEPT,
    connector_names,
)
from .events import Observers
from .oneline import one_line
from .retry import RetryPolicy, deliver_with_retries

log = Logger(namespace="oemrelay.relay")

#: (serial, what) pairs remembered for log-once warnings; then forgotten, so
#: a fleet of odd devices cannot grow the set without bound.
MAX_REPORTED = 10_000

#: Frames outside uploads held for a link not yet open; more are dropped.
MAX_HELD_FRAMES = 64

#: Delivery plans remembered, one per connector override seen.
MAX_PLANS = 1000


class Upload:
    """
    Everything a device sent for one commit: its identity, the data frames
    exactly as received (0x04 and 0x10) and the records in them.

    Immutable.  The session builds it from frames whose records it counted
    without decoding them (:func:`~oemrelay.codec.frame_shape`): ``records``
    is decoded from ``frames`` on first use and kept, while
    ``record_count`` and ``first_seq`` cost nothing.  Given ``records``
    (the spool, tests), they are used as they are.
    """

    __slots__ = ("hello", "frames", "received_at", "record_count", "first_seq", "_records")

    hello: Hello
    frames: tuple[Frame, ...]
    received_at: float
    #: How many records the frames hold.
    record_count: int
    #: The first record's sequence number (an idempotency handle), or None.
    first_seq: int | None

    def __init__(
        self,
        hello: Hello,
        frames: tuple[Frame, ...],
        records: tuple[Record, ...] | None,
        received_at: float,
        *,
        record_count: int | None = None,
        first_seq: int | None = None,
    ) -> None:
        if records is not None:
            record_count = len(records)
            first_seq = records[0].seq if records else None
        elif record_count is None:
            shapes = [frame_shape(frame) for frame in frames]
            record_count = sum(shape.record_count for shape in shapes)
            first_seq = next(
                (shape.first_seq for shape in shapes if shape.record_count), None
            )
        setattr_ = object.__setattr__
        setattr_(self, "hello", hello)
        setattr_(self, "frames", frames)
        setattr_(self, "received_at", received_at)
        setattr_(self, "record_count", record_count)
        setattr_(self, "first_seq", first_seq)
        setattr_(self, "_records", records)

    @property
    def records(self) -> tuple[Record, ...]:
        """The records of ``frames``, decoded once."""
        records = self._records
        if records is None:
            records = tuple(parse_records(self.frames))
            object.__setattr__(self, "_records", records)
        return records

    def __setattr__(self, name: str, value: object) -> None:
        raise FrozenInstanceError(f"cannot assign to field {name!r}")

    def __delattr__(self, name: str) -> None:
        raise FrozenInstanceError(f"cannot delete field {name!r}")

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return (self.hello, self.frames, self.received_at) == (
            other.hello, other.frames, other.received_at
        ) and self.records == other.records

    def __hash__(self) -> int:
        return hash((self.hello, self.frames, self.received_at))

    def __repr__(self) -> str:
        return (
            f"Upload(hello={self.hello!r}, frames={self.frames!r},"
            f" record_count={self.record_count!r}, first_seq={self.first_seq!r},"
            f" received_at={self.received_at!r})"
        )


@dataclass(frozen=True, slots=True)
class DeviceProfile:
    """
    What the relay knows of a device beyond its hello: the custom fields used
    in connector templates and an optional connector override.
    """

    # Custom fields often hold device keys: never in a repr that may be logged.
    custom1: str = field(default="", repr=False)
    custom2: str = field(default="", repr=False)
    custom3: str = field(default="", repr=False)
    connector: str | None = None
    #: Whether the registry has an entry for the device (``unknown_devices = reject``).
    known: bool = False


@dataclass(frozen=True, slots=True)
class DeliveryPlan:
    """The connectors one connector setting names, sorted by role."""

    names: tuple[str, ...]
    required: tuple[str, ...]
    best_effort: tuple[str, ...]
    #: The first name that is not a configured connector, if any.
    missing: str | None

    @classmethod
    def of(
        cls, names: tuple[str, ...], connectors: Mapping[str, object], roles: Mapping[str, str]
    ) -> DeliveryPlan:
        required = tuple(name for name in names if roles.get(name, REQUIRED) == REQUIRED)
        return cls(
            names,
            required,
            tuple(name for name in names if name not in required),
            next((name for name in names if name not in connectors), None),
        )


def _not_cached(hello: Hello) -> None:
    return None


def _no_registry_profile(hello: Hello) -> DeviceProfile:
    return NoRegistry._EMPTY


class DeliveryFailed(Exception):
    """
    The end server did not accept an upload.  The message is one line;
    ``kind`` is a short fixed word for counting why (see
    :meth:`oemrelay.events.RelayObserver.commit_withheld`).

    ``retryable`` says a later try may succeed (a connection error, a
    timeout, 408, 429, 5xx); ``retry_after`` is the end server's own
    ``Retry-After`` in seconds, if it gave one.
    """

    def __init__(
        self,
        message: str,
        kind: str = "refused",
        *,
        retryable: bool = False,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.retryable = retryable
        self.retry_after = retry_after

    def after_attempts(self, attempts: int) -> DeliveryFailed:
        """The same failure, its reason saying it was the last of ``attempts``."""
        return DeliveryFailed(f"{self} (after {attempts} attempts)", self.kind)


class SpoolFull(Exception):
    """
    The spool holds ``spool_max_records`` already; nothing more is spooled
    (the spool raises this, or a subclass, from ``put``).
    """


class UploadSpool(Protocol):
    """
    Where uploads wait, durably, for background delivery (the spool in
    :mod:`oemrelay.spool` provides it).
    """

    def put(self, upload: Upload, connectors: tuple[str, ...]) -> Deferred[None]:
        """
        Keep ``upload`` for later delivery to each of ``connectors``; fire once
        it is durable; fail with :class:`SpoolFull` when the spool is full.
        """


class Link(Protocol):
    """A connector's side of one device connection."""

    def deliver(self, upload: Upload, profile: DeviceProfile) -> Deferred[None]:
        """Fire when the end server accepted ``upload``; fail otherwise."""

    def forward(self, frame: Frame) -> None:
        """Pass on a device frame that is not part of an upload (0x26, unknown types)."""

    def close(self) -> None:
        """The device connection is over."""


class Connector(Protocol):
    """A configured destination for uploads (one ``[connector:NAME]``)."""

    name: str

    def open_link(
        self, hello: Hello, on_lost: Callable[[str], None]
    ) -> Link:
        """
        Start serving one device connection.  ``on_lost`` is called with a
        reason if the link fails on its own (an end server going away).
        """


class StatelessLink:
    """The link of a connector that keeps no per-device state (HTTP, file)."""

    def __init__(
        self, deliver: Callable[[Upload, DeviceProfile], Deferred[None]]
    ) -> None:
        self.deliver = deliver

    def forward(self, frame: Frame) -> None:
        pass

    def close(self) -> None:
        pass


class DeviceLedger(Protocol):
    """
    What the device path asks of and tells the device registry
    (:class:`oemrelay.registry.Registry` provides it; every call returns a
    Deferred).
    """

    def profile_for(self, hello: Hello) -> Deferred[DeviceProfile]: ...

    # Optional: ``cached_profile(hello)``, the profile at once if held in
    # memory, else None (see Relay.cached_profile).

    def device_connected(self, hello: Hello, node: str, now: float) -> Deferred: ...

    def device_disconnected(self, serial: int, node: str, now: float) -> Deferred: ...

    def upload_committed(self, serial: int, record_count: int, now: float) -> Deferred: ...

    def delivery_failed(self, serial: int, reason: str, now: float) -> Deferred: ...

    def due_commands(self, serial: int, now: float) -> Deferred[list]: ...

    def command_sent(self, command_id: int, now: float) -> Deferred: ...

    def command_result(self, command_id: int, device_status: int, now: float) -> Deferred: ...


class NoRegistry:
    """No registry: empty profiles, no commands, nothing recorded."""

    _EMPTY = DeviceProfile()

    def profile_for(self, hello: Hello) -> Deferred[DeviceProfile]:
        return succeed(self._EMPTY)

    def due_commands(self, serial: int, now: float) -> Deferred[list]:
        return succeed([])

    def _nothing(self, *args: object) -> Deferred[None]:
        return succeed(None)

    device_connected = device_disconnected = upload_committed = _nothing
    delivery_failed = command_sent = command_result = _nothing


class Relay:
    """The configured connectors, the default one and the device registry."""

    def __init__(
        self,
        connectors: Mapping[str, Connector],
        default_connector: str,
        registry: DeviceLedger | None = None,
        *,
        node: str = "",
        clock: IReactorTime | None = None,
        max_held_frames: int = MAX_HELD_FRAMES,
        observers: Observers | None = None,
        max_reported: int = MAX_REPORTED,
        unknown_devices: str = UNKNOWN_ACCEPT,
        retry: RetryPolicy | None = None,
        commit_timeout: float = 0.0,
        roles: Mapping[str, str] | None = None,
        commit_policy: str = COMMIT_DELIVERED,
        spool: UploadSpool | None = None,
    ) -> None:
        for name in connector_names(default_connector) or ("",):
            if name not in connectors:
                raise ValueError(f"no connector named {name!r}")
        self.connectors = dict(connectors)
        #: The connector names devices without an override use, space separated.
        self.default_connector = default_connector
        #: Retries inside the commit window; None: one attempt per connector.
        self.retry = retry
        #: The session's commit_timeout: no retry starts after it ran out.
        self.commit_timeout = commit_timeout
        self.roles = dict(roles or {})
        self.commit_policy = commit_policy
        self.spool = spool
        needs_spool = commit_policy == COMMIT_SPOOLED or BEST_EFFORT in self.roles.values()
        if needs_spool and spool is None:
            raise ValueError("best_effort connectors and commit_policy = spooled need a spool")
        self.registry = registry or NoRegistry()
        self.node = node
        self._clock = clock
        self.max_held_frames = max_held_frames
        #: Told of what every device connection does (metrics, live view).
        self.observers = observers or Observers()
        self.presence = _Presence(self)
        self._reported: set[tuple[int, object]] = set()
        self._max_reported = max_reported
        #: False with ``unknown_devices = reject``: only serials in the registry upload.
        self.accepts_unknown_devices = unknown_devices == UNKNOWN_ACCEPT
        #: The device's profile if the registry has it in memory, else None
        #: (then the route asks ``profile_for``).
        self.cached_profile: Callable[[Hello], DeviceProfile | None] = (
            _no_registry_profile
            if registry is None
            else getattr(registry, "cached_profile", _not_cached)
        )
        self._plans: dict[str | None, DeliveryPlan] = {}

    def plan_for(self, connector_override: str | None) -> DeliveryPlan:
        """Where a device with ``connector_override`` (None: none) delivers."""
        plan = self._plans.get(connector_override)
        if plan is None:
            if len(self._plans) >= MAX_PLANS:
                self._plans.clear()  # overrides are registry text: bound them
            plan = DeliveryPlan.of(
                connector_names(connector_override or self.default_connector),
                self.connectors,
                self.roles,
            )
            self._plans[connector_override] = plan
        return plan

    def now(self) -> float:
        """The time registry entries are stamped with."""
        return self._clock.seconds() if self._clock is not None else time.time()

    def first_report(self, serial: int, what: object) -> bool:
        """
        True the first time ``what`` is reported for device ``serial`` (for
        warnings logged once per device, across its connections).
        """
        key = (serial, what)
        if key in self._reported:
            return False
        if len(self._reported) >= self._max_reported:
            self._reported.clear()
        self._reported.add(key)
        return True

    def open_route(
        self,
        hello: Hello,
        on_lost: Callable[[str], None],
        on_rejected: Callable[[str], None] = lambda reason: None,
    ) -> DeviceRoute:
        """
        Start routing one device connection.  The link to the device's own
        connector (its override, or the default) opens ahead of its first
        upload, so a raw TCP end server gets the hello at once.  With
        ``unknown_devices = reject`` a device the registry does not know is
        ``on_rejected`` once its profile says so.
        """
        route = DeviceRoute(self, hello, on_lost, on_rejected)
        route.open_ahead()
        return route


@dataclass(eq=False, slots=True)
class _DevicePresence:
    connections: int = 0
    pending_writes: int = 0
    #: The device's registry writes under way, the next chained to the
    #: last; None when none is (the batching ledger's are done at once), so
    #: a device held connected keeps no Deferred.
    writes: Deferred | None = None


class _Presence:
    """
    Tells the registry which devices are connected to this relay.

    A device may reconnect before its old connection is closed: only the
    close of its last connection records it disconnected.  One serial's
    connection and disconnection writes run one after the other: with a pool
    of several database connections they could otherwise swap and leave the
    device marked connected.
    """

    def __init__(self, relay: Relay) -> None:
        self._relay = relay
        # Per serial, while it has connections or writes pending here.
        self._devices: dict[int, _DevicePresence] = {}

    def opened(self, hello: Hello) -> None:
        """A connection of the device saying ``hello`` began."""
        device = self._devices.setdefault(hello.serial, _DevicePresence())
        device.connections += 1
        relay, now = self._relay, self._relay.now()
        self._write(
            hello.serial,
            device,
            "connection",
            lambda: relay.registry.device_connected(hello, relay.node, now),
        )

    def closed(self, serial: int) -> None:
        """A connection of device ``serial`` ended."""
        device = self._devices[serial]
        device.connections -= 1
        if device.connections:
            return  # another connection of this device is still open here
        relay, now = self._relay, self._relay.now()
        self._write(
            serial,
            device,
            "disconnection",
            lambda: relay.registry.device_disconnected(serial, relay.node, now),
        )

    def _write(
        self, serial: int, device: _DevicePresence, what: str, write: Callable[[], Deferred]
    ) -> None:
        def written(_: object) -> None:
            device.pending_writes -= 1
            if device.pending_writes:
                return
            device.writes = None
            if not device.connections and self._devices.get(serial) is device:
                del self._devices[serial]

        device.pending_writes += 1
        if device.writes is None:
            device.writes = _record(what, serial, write())
        else:
            device.writes.addCallback(lambda _: _record(what, serial, write()))
        device.writes.addBoth(written)


def _record(what: str, serial: int, written: Deferred) -> Deferred:
    # Registry bookkeeping never holds up or breaks the device path.
    if written.called and written.result is None:
        return written  # already done (a batched commit): nothing can fail
    return written.addErrback(
        lambda failure: log.warn(
            "registry: could not record {what} of device {serial}: {reason}",
            what=what,
            serial=serial,
            reason=describe_failure(failure),
        )
    )


class DeviceRoute:
    """The links, deliveries and registry entries of one device connection."""

    # One per device held: slotted, 100 bytes less each.
    __slots__ = (
        "_closed", "_held", "_hello", "_links", "_on_lost", "_on_rejected",
        "_present", "_registry", "_relay",
    )

    def __init__(
        self,
        relay: Relay,
        hello: Hello,
        on_lost: Callable[[str], None],
        on_rejected: Callable[[str], None] = lambda reason: None,
    ) -> None:
        self._relay = relay
        self._registry = relay.registry
        self._hello = hello
        self._on_lost = on_lost
        self._on_rejected = on_rejected
        self._links: dict[str, Link] = {}
        # Frames to pass on before the device's link is open (see open_ahead).
        self._held: list[Frame] | None = []
        self._closed = False
        # Whether the registry was told of this connection.  With
        # unknown_devices = reject that waits for the profile: a device the
        # registry does not know must not be entered in it by connecting.
        self._present = False
        if relay.accepts_unknown_devices:
            self._mark_present()

    def _mark_present(self) -> None:
        self._present = True
        self._relay.presence.opened(self._hello)

    def open_ahead(self) -> None:
        """Open the links the device's next upload will use, once its profile is known."""

        def open_links(profile: DeviceProfile) -> None:
            if self._closed:
                return
            if not (profile.known or self._relay.accepts_unknown_devices):
                self._on_rejected(
                    f"serial {self._hello.serial} is not in the registry"
                    " (unknown_devices = reject)"
                )
                return
            if not self._present:
                self._mark_present()
            for name in self._relay.plan_for(profile.connector).names:
                if not self._closed and name in self._relay.connectors:
                    self.link_for(name)

        def opened(_: object) -> None:
            # Frames the device sent meanwhile reach the links, in order.
            held, self._held = self._held, None
            for frame in held:
                self.forward(frame)

        # A failed lookup is retried, and reported, by the upload's own.
        lookup = self._registry.profile_for(self._hello)
        lookup.addCallbacks(open_links, lambda _: None).addCallback(opened)

    def link_for(self, connector_name: str) -> Link:
        """This connection's link to ``connector_name``, opened on first use."""
        link = self._links.get(connector_name)
        if link is None:
            connector = self._relay.connectors[connector_name]
            link = connector.open_link(self._hello, self._on_lost)
            self._links[connector_name] = link
        return link

    def deliver(self, upload: Upload) -> Deferred[None]:
        """
        Deliver ``upload`` as the commit policy says: to every required
        connector of the device (concurrently, each with its own retries),
        its best-effort copies handed to the spool once those accepted; or,
        with ``commit_policy = spooled``, into the spool for all of them.

        The common case (the profile cached, one required connector) runs on
        plain callbacks: the link's own Deferred, with the retries' errback,
        is the answer.  Cancelling it cancels what is under way.

        :return: fires when accepted (or spooled); fails with
            :class:`DeliveryFailed` if not.
        """
        profile = self._relay.cached_profile(self._hello)
        if profile is None:
            return Deferred.fromCoroutine(self._look_up_and_deliver(upload))
        return self._deliver_as(upload, profile)

    async def _look_up_and_deliver(self, upload: Upload) -> None:
        try:
            profile = await self._registry.profile_for(self._hello)
        except DeliveryFailed:
            raise
        except Exception as error:
            raise DeliveryFailed(
                f"device registry unavailable: {one_line(error)}", "registry"
            ) from None
        await self._deliver_as(upload, profile)

    def _deliver_as(self, upload: Upload, profile: DeviceProfile) -> Deferred[None]:
        if self._closed:
            # Closed while the profile was looked up: open no new link.
            return fail(DeliveryFailed("device connection closed before delivery", "closed"))
        if not (profile.known or self._relay.accepts_unknown_devices):
            return fail(
                DeliveryFailed(
                    f"serial {self._hello.serial} is not in the registry", "unknown_device"
                )
            )
        plan = self._relay.plan_for(profile.connector)
        if plan.missing is not None:
            return fail(
                DeliveryFailed(
                    f"device's connector {plan.missing!r} is not configured", "configuration"
                )
            )
        if self._relay.commit_policy == COMMIT_SPOOLED:
            return Deferred.fromCoroutine(self._spool(upload, plan.names))
        try:
            if len(plan.required) == 1:
                delivery = self._deliver_to(plan.required[0], upload, profile)
            else:
                delivery = gatherResults(
                    [self._deliver_to(name, upload, profile) for name in plan.required],
                    consumeErrors=True,
                ).addCallbacks(_nothing, _first_error)
        except Exception:
            # A link that raised instead of failing its Deferred.
            return fail()
        if plan.best_effort:
            delivery.addCallback(self._copy_to_spool, upload, plan.best_effort)
        return delivery

    def _deliver_to(self, name: str, upload: Upload, profile: DeviceProfile) -> Deferred[None]:
        link = self.link_for(name)
        retry = self._relay.retry
        if retry is None:
            return link.deliver(upload, profile)
        return deliver_with_retries(
            partial(link.deliver, upload, profile),  # no Python frame per attempt
            retry,
            upload.received_at + self._relay.commit_timeout,
            connector=name,
            serial=self._hello.serial,
            observers=self._relay.observers,
        )

    async def _spool(self, upload: Upload, names: tuple[str, ...]) -> None:
        try:
            await self._relay.spool.put(upload, names)
        except SpoolFull:
            raise DeliveryFailed("spool full; not committed", "spool_full") from None
        except Exception as error:
            raise DeliveryFailed(f"spool: {one_line(error)}", "spool") from None

    def _copy_to_spool(self, _: object, upload: Upload, names: tuple[str, ...]) -> None:
        # Never awaited: a best-effort copy does not hold the device back.
        def not_spooled(failure: Failure) -> None:
            reason = describe_failure(failure)
            self._relay.observers.copy_not_spooled(upload, names, reason)
            log.warn(
                "device {serial}: best-effort copy for {connectors} not spooled"
                " (required connectors accepted; committed anyway): {reason}",
                serial=self._hello.serial,
                connectors=" ".join(names),
                reason=reason,
            )

        Deferred.fromCoroutine(self._spool(upload, names)).addErrback(not_spooled)

    def committed(self, upload: Upload) -> None:
        """The device was told to delete ``upload``'s records."""
        _record(
            "commit",
            self._hello.serial,
            self._registry.upload_committed(
                self._hello.serial, upload.record_count, self._relay.now()
            ),
        )

    def withheld(self, upload: Upload, reason: str) -> None:
        """The commit of ``upload`` was withheld for ``reason``."""
        _record(
            "delivery error",
            self._hello.serial,
            self._registry.delivery_failed(self._hello.serial, reason, self._relay.now()),
        )

    def due_commands(self) -> Deferred[list]:
        """The commands to send the device in this async session."""
        return self._registry.due_commands(self._hello.serial, self._relay.now())

    def command_sent(self, command_id: int) -> Deferred:
        """Mark a command sent; fires with None if it is no longer queued."""
        return self._registry.command_sent(command_id, self._relay.now())

    def command_result(self, command_id: int, device_status: int) -> None:
        """Record the device's answer (0x21) to a command."""
        _record(
            "command result",
            self._hello.serial,
            self._registry.command_result(command_id, device_status, self._relay.now()),
        )

    def forward(self, frame: Frame) -> None:
        """Pass a non-upload frame to every open link (held until the first opens)."""
        if self._held is not None:
            if len(self._held) < self._relay.max_held_frames:
                self._held.append(frame)
            return
        for link in self._links.values():
            link.forward(frame)

    def close(self) -> None:
        """Close every link; later deliveries are not expected."""
        if self._closed:
            return
        self._closed = True
        links, self._links = self._links, {}
        for link in links.values():
            link.close()
        if self._present:
            self._relay.presence.closed(self._hello.serial)


def _nothing(_: object) -> None:
    return None


def _first_error(failure: Failure) -> Failure:
    # gatherResults wraps the first connector's failure: pass on its own.
    if failure.check(FirstError):
        return failure.value.subFailure
    return failure


def describe_failure(failure: Failure) -> str:
    """A one-line reason for a failed delivery, for logs and errors."""
    if failure.check(DeliveryFailed):
        return str(failure.value)
    text = str(failure.value) or failure.type.__name__
    return one_line(text)
