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

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from twisted.internet.defer import Deferred, succeed
from twisted.python.failure import Failure

from .codec import Frame, Hello, Record


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

    custom1: str = ""
    custom2: str = ""
    custom3: str = ""
    connector: str | None = None


class DeliveryFailed(Exception):
    """The end server did not accept an upload.  The message is one line."""


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


class ProfileSource(Protocol):
    """Where device profiles come from (the registry, once there is one)."""

    def profile_for(self, hello: Hello) -> Deferred[DeviceProfile]:
        ...


class NoProfiles:
    """Every device has empty custom fields and no override."""

    _EMPTY = DeviceProfile()

    def profile_for(self, hello: Hello) -> Deferred[DeviceProfile]:
        return succeed(self._EMPTY)


class Relay:
    """The configured connectors, the default one and the profile source."""

    def __init__(
        self,
        connectors: Mapping[str, Connector],
        default_connector: str,
        profiles: ProfileSource | None = None,
    ) -> None:
        if default_connector not in connectors:
            raise ValueError(f"no connector named {default_connector!r}")
        self.connectors = dict(connectors)
        self.default_connector = default_connector
        self.profiles = profiles or NoProfiles()

    def open_route(self, hello: Hello, on_lost: Callable[[str], None]) -> DeviceRoute:
        """Start routing one device connection; links open eagerly for the default."""
        route = DeviceRoute(self, hello, on_lost)
        route.link_for(self.default_connector)
        return route


class DeviceRoute:
    """The links and deliveries of one device connection."""

    def __init__(self, relay: Relay, hello: Hello, on_lost: Callable[[str], None]) -> None:
        self._relay = relay
        self._hello = hello
        self._on_lost = on_lost
        self._links: dict[str, Link] = {}
        self._closed = False

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
        profile = await self._relay.profiles.profile_for(self._hello)
        if self._closed:
            # Closed while the profile was looked up: open no new link.
            raise DeliveryFailed("device connection closed before delivery")
        name = profile.connector or self._relay.default_connector
        if name not in self._relay.connectors:
            raise DeliveryFailed(f"device's connector {name!r} is not configured")
        await self.link_for(name).deliver(upload, profile)

    def forward(self, frame: Frame) -> None:
        """Pass a non-upload frame to every open link."""
        for link in self._links.values():
            link.forward(frame)

    def close(self) -> None:
        """Close every link; later deliveries are not expected."""
        self._closed = True
        links, self._links = self._links, {}
        for link in links.values():
            link.close()


def describe_failure(failure: Failure) -> str:
    """A one-line reason for a failed delivery, for logs and errors."""
    if failure.check(DeliveryFailed):
        return str(failure.value)
    text = str(failure.value) or failure.type.__name__
    return " ".join(text.split())
