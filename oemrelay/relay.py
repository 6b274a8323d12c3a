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
from dataclasses import dataclass, field
from typing import Protocol

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from .codec import Frame, Hello, Record
from .events import Observers
from .oneline import one_line

log = Logger(namespace="oemrelay.relay")

#: Frames outside uploads held for a link not yet open; more are dropped.
MAX_HELD_FRAMES = 64


@dataclass(frozen=True, slots=True)
class Upload:
    """
    Everything a device sent for one commit: its identity, the data frames
    exactly as received (0x04 and 0x10) and the records decoded from them.
    """

    hello: Hello
    frames: tuple[Frame, ...]
    records: tuple[Record, ...]
    received_at: float

    @property
    def first_seq(self) -> int | None:
        """The first record's sequence number (an idempotency handle)."""
        return self.records[0].seq if self.records else None


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


class DeliveryFailed(Exception):
    """
    The end server did not accept an upload.  The message is one line;
    ``kind`` is a short fixed word for counting why (see
    :meth:`oemrelay.events.RelayObserver.commit_withheld`).  ``retryable``
    is False when the end server would refuse the same upload again (an HTTP
    4xx but 408 and 429): the spool then dead-letters it at once.
    """

    def __init__(self, message: str, kind: str = "refused", *, retryable: bool = True) -> None:
        super().__init__(message)
        self.kind = kind
        self.retryable = retryable


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
    ) -> None:
        if default_connector not in connectors:
            raise ValueError(f"no connector named {default_connector!r}")
        self.connectors = dict(connectors)
        self.default_connector = default_connector
        self.registry = registry or NoRegistry()
        self.node = node
        self._clock = clock
        self.max_held_frames = max_held_frames
        #: Told of what every device connection does (metrics, live view).
        self.observers = observers or Observers()
        self.presence = _Presence(self)

    def now(self) -> float:
        """The time registry entries are stamped with."""
        return self._clock.seconds() if self._clock is not None else time.time()

    def open_route(self, hello: Hello, on_lost: Callable[[str], None]) -> DeviceRoute:
        """
        Start routing one device connection.  The link to the device's own
        connector (its override, or the default) opens ahead of its first
        upload, so a raw TCP end server gets the hello at once.
        """
        route = DeviceRoute(self, hello, on_lost)
        route.open_ahead()
        return route


@dataclass(eq=False)
class _DevicePresence:
    connections: int = 0
    pending_writes: int = 0
    writes: Deferred = field(default_factory=lambda: succeed(None))


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
            if not (device.pending_writes or device.connections):
                if self._devices.get(serial) is device:
                    del self._devices[serial]

        device.pending_writes += 1
        device.writes.addCallback(lambda _: _record(what, serial, write()))
        device.writes.addBoth(written)


def _record(what: str, serial: int, written: Deferred) -> Deferred:
    # Registry bookkeeping never holds up or breaks the device path.
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

    def __init__(self, relay: Relay, hello: Hello, on_lost: Callable[[str], None]) -> None:
        self._relay = relay
        self._registry = relay.registry
        self._hello = hello
        self._on_lost = on_lost
        self._links: dict[str, Link] = {}
        # Frames to pass on before the device's link is open (see open_ahead).
        self._held: list[Frame] | None = []
        self._closed = False
        relay.presence.opened(hello)

    def open_ahead(self) -> None:
        """Open the link the device's next upload will use, once its profile is known."""

        def open_link(profile: DeviceProfile) -> None:
            name = profile.connector or self._relay.default_connector
            if not self._closed and name in self._relay.connectors:
                self.link_for(name)

        def opened(_: object) -> None:
            # Frames the device sent meanwhile reach the link, in order.
            held, self._held = self._held, None
            for frame in held:
                self.forward(frame)

        # A failed lookup is retried, and reported, by the upload's own.
        lookup = self._registry.profile_for(self._hello)
        lookup.addCallbacks(open_link, lambda _: None).addCallback(opened)

    def link_for(self, connector_name: str) -> Link:
        """This connection's link to ``connector_name``, opened on first use."""
        link = self._links.get(connector_name)
        if link is None:
            connector = self._relay.connectors[connector_name]
            link = connector.open_link(self._hello, self._on_lost)
            self._links[connector_name] = link
        return link

    async def deliver(self, upload: Upload) -> None:
        """
        Deliver ``upload`` to the device's connector.

        :raises DeliveryFailed: if it was not accepted.
        """
        try:
            profile = await self._registry.profile_for(self._hello)
        except DeliveryFailed:
            raise
        except Exception as error:
            raise DeliveryFailed(
                f"device registry unavailable: {one_line(error)}", "registry"
            ) from None
        if self._closed:
            # Closed while the profile was looked up: open no new link.
            raise DeliveryFailed("device connection closed before delivery", "closed")
        name = profile.connector or self._relay.default_connector
        if name not in self._relay.connectors:
            raise DeliveryFailed(
                f"device's connector {name!r} is not configured", "configuration"
            )
        await self.link_for(name).deliver(upload, profile)

    def committed(self, upload: Upload) -> None:
        """The device was told to delete ``upload``'s records."""
        _record(
            "commit",
            self._hello.serial,
            self._registry.upload_committed(
                self._hello.serial, len(upload.records), self._relay.now()
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
        self._relay.presence.closed(self._hello.serial)


def describe_failure(failure: Failure) -> str:
    """A one-line reason for a failed delivery, for logs and errors."""
    if failure.check(DeliveryFailed):
        return str(failure.value)
    text = str(failure.value) or failure.type.__name__
    return one_line(text)
