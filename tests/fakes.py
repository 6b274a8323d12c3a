"""
Test doubles for the device path: a connector whose links keep each delivery
pending until the test fires it.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.defer import Deferred

from oemrelay.codec import Frame, Hello
from oemrelay.relay import DeviceProfile, Upload


class FakeLink:
    """A link whose deliveries stay pending until the test fires them."""

    def __init__(self, hello: Hello, on_lost: Callable[[str], None]) -> None:
        self.hello = hello
        self.on_lost = on_lost
        self.deliveries: list[tuple[Upload, DeviceProfile, Deferred[None]]] = []
        self.cancelled: list[Deferred[None]] = []
        self.forwarded: list[Frame] = []
        self.closed = 0

    def deliver(self, upload: Upload, profile: DeviceProfile) -> Deferred[None]:
        delivery: Deferred[None] = Deferred(self.cancelled.append)
        self.deliveries.append((upload, profile, delivery))
        return delivery

    def forward(self, frame: Frame) -> None:
        self.forwarded.append(frame)

    def close(self) -> None:
        self.closed += 1

    @property
    def uploads(self) -> list[Upload]:
        return [upload for upload, _, _ in self.deliveries]

    def answer(self, index: int = -1) -> Deferred[None]:
        """The Deferred of delivery ``index`` (the latest by default)."""
        return self.deliveries[index][2]


class FakeConnector:
    """Records the links it opens."""

    def __init__(self, name: str = "main") -> None:
        self.name = name
        self.links: list[FakeLink] = []

    def open_link(self, hello: Hello, on_lost: Callable[[str], None]) -> FakeLink:
        link = FakeLink(hello, on_lost)
        self.links.append(link)
        return link
