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


class InMemoryEndServer:
    """
    An end server in memory for :class:`oemrelay.connectors.http_client.HttpClient`:
    each connection the client opens is joined by an iosim pump to a
    ``twisted.web`` Site serving ``resource``.  Bytes move only when
    :meth:`flush` is called.

    :ivar connects: ``(scheme, host, port)`` of each connection opened.
    :ivar refuse: when set, an exception every connect fails with.
    :ivar hold: when true, connects wait in :attr:`held` until
        :meth:`complete_connects`.
    """

    def __init__(self, resource) -> None:
        from twisted.internet.task import Clock
        from twisted.web.server import Site

        # The server's own timers: never the clock a test advances.
        self.site = Site(resource, reactor=Clock())
        self.pumps: list = []
        self.connects: list[tuple[str, str, int]] = []
        self.refuse: Exception | None = None
        self.hold = False
        self.held: list[tuple[Deferred, object]] = []

    def endpoint_for(self, scheme: str, host: str, port: int) -> _MemoryEndpoint:
        return _MemoryEndpoint(self, scheme, host, port)

    def client(self, clock, pool_size: int = 256, *, flushing: bool = True, **settings):
        """
        An HttpClient whose every connection reaches this server; unless
        ``flushing`` is false, each POST and the close are flushed through
        at once (as treq's StubTreq does).
        """
        from oemrelay.connectors.http_client import HttpClient

        client = HttpClient(clock, pool_size, endpoint_for=self.endpoint_for, **settings)
        return _FlushingClient(client, self) if flushing else client

    def _connect(self, address: tuple[str, str, int], factory) -> Deferred:
        from twisted.internet.defer import fail, succeed

        if self.refuse is not None:
            return fail(self.refuse)
        if self.hold:
            held: Deferred = Deferred()
            self.held.append((held, lambda: self._join(address, factory)))
            return held
        return succeed(self._join(address, factory))

    def _join(self, address: tuple[str, str, int], factory):
        from twisted.internet.address import IPv4Address
        from twisted.test import iosim

        self.connects.append(address)
        client = factory.buildProtocol(IPv4Address("TCP", "192.0.2.7", address[2]))
        server = self.site.buildProtocol(IPv4Address("TCP", "192.0.2.1", 50000))
        self.pumps.append(
            iosim.connect(
                server,
                iosim.FakeTransport(server, isServer=True),
                client,
                iosim.FakeTransport(client, isServer=False),
                greet=False,
            )
        )
        return client

    def complete_connects(self) -> None:
        """Complete every held connect."""
        held, self.held = self.held, []
        for connecting, join in held:
            connecting.callback(join())

    def flush(self) -> None:
        """Move bytes both ways (and closes) until nothing moves."""
        while any([pump.pump() for pump in self.pumps]):
            pass


class _MemoryEndpoint:
    def __init__(self, server: InMemoryEndServer, *address) -> None:
        self._server = server
        self._address = address

    def connect(self, factory) -> Deferred:
        return self._server._connect(self._address, factory)


class _FlushingClient:
    """An HttpClient whose posts and close move every byte they cause at once."""

    def __init__(self, client, server: InMemoryEndServer) -> None:
        self._client = client
        self._server = server

    def post(self, *args, **kwargs) -> Deferred:
        sent = self._client.post(*args, **kwargs)
        self._server.flush()
        return sent

    def close(self) -> Deferred:
        closed = self._client.close()
        self._server.flush()
        return closed

    def __getattr__(self, name: str):
        return getattr(self._client, name)
