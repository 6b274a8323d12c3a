"""
The raw TCP connector: the device's own protocol, passed on to an end server.

For each device connection the relay opens one connection to ``endpoint``
(any Twisted client endpoint string, ``tcp:`` or ``tls:``) and plays the
device there: it sends the device's hello frame as received, then for each
upload the data frames exactly as received followed by a commit request, and
counts the upload accepted when the end server answers ``0x06 01``.  Version
data (0x14), async session requests (0x22) and time requests (0x30) are
answered by the relay and never reach the end server, as with DM's OEM
Server; other frames (0x26, unknown types) are passed on as they come.

The end server's hello response is consumed (the device already has the
relay's); its commit response decides the device's commit.  If the end server
cannot be reached or goes away, or sends a commit response for which no
commit request was outstanding when it arrived, the device connection is
closed uncommitted.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from twisted.internet.defer import Deferred, fail
from twisted.internet.endpoints import clientFromString, connectProtocol
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..codec import COMMIT_REQUEST, Frame, FrameDecoder, Hello, MessageType, ProtocolError
from ..config import TcpConnectorConfig
from ..relay import DeliveryFailed, DeviceProfile, Upload

log = Logger(namespace="oemrelay.connectors.tcp")

#: Frames (0x26, unknown types) held for an end server still being connected
#: to; a device sending more is flooding, and is disconnected.
MAX_UNSENT_FRAMES = 64


class _EndServerProtocol(Protocol):
    """The relay's connection to the end server for one device."""

    def __init__(self, link: TcpLink, max_message: int) -> None:
        self._link = link
        self._decoder = FrameDecoder(max_message)

    def dataReceived(self, data: bytes) -> None:
        try:
            frames = self._decoder.feed(data)
        except ProtocolError as error:
            self._link.lost(f"end server broke the protocol: {error}")
            return
        self._link.frames_from_end_server(frames)

    def connectionLost(self, reason: Failure = None) -> None:
        self._link.lost("end server closed the connection")


class TcpLink:
    """One device connection's counterpart at the end server."""

    def __init__(
        self,
        connector: TcpConnector,
        hello: Hello,
        on_lost: Callable[[str], None],
    ) -> None:
        self._connector = connector
        self._serial = hello.serial
        self._on_lost = on_lost
        self._protocol: _EndServerProtocol | None = None
        self._commit_answers: deque[Deferred[bytes]] = deque()
        self._closed = False
        self._ready: Deferred[None] = Deferred()
        self._hello_frame = hello.to_frame()
        # Frames passed on before the end server connection is up: sent after the hello.
        self._unsent: list[Frame] = []
        self._connecting = connectProtocol(
            connector.endpoint, _EndServerProtocol(self, connector.max_message)
        )
        self._connecting.addCallbacks(self._connected, self._not_connected)

    def _connected(self, protocol: _EndServerProtocol) -> None:
        if self._closed:
            protocol.transport.loseConnection()
            return
        self._protocol = protocol
        unsent, self._unsent = self._unsent, []
        protocol.transport.write(
            self._hello_frame + b"".join(frame.to_bytes() for frame in unsent)
        )
        self._ready.callback(None)

    def _not_connected(self, failure: Failure) -> None:
        self.lost(f"cannot connect to end server: {failure.getErrorMessage()}")

    def frames_from_end_server(self, frames: list[Frame]) -> None:
        # These bytes can only answer commit requests written before they
        # arrived, not one an answer among them has meanwhile led to.
        answerable = len(self._commit_answers)
        for frame in frames:
            if self._closed:
                return
            if frame.type != MessageType.COMMIT_RESPONSE:
                self._other_frame(frame)
            elif answerable:
                answerable -= 1
                self._commit_answers.popleft().callback(frame.payload)
            else:
                # Out of step with our requests: no later 0x06 can be trusted.
                self.lost("end server sent a commit response without a commit request")

    def _other_frame(self, frame: Frame) -> None:
        if frame.type != MessageType.HELLO_RESPONSE:  # expected, and consumed
            log.info(
                "connector {name}: end server sent message type 0x{type:02x}"
                " for device {serial}; not passed on",
                name=self._connector.name,
                type=frame.type,
                serial=self._serial,
            )

    def lost(self, reason: str) -> None:
        """The end server link failed: fail what waits on it, tell the session."""
        if self._closed:
            return
        self._closed = True
        self._drop(reason)
        self._on_lost(f"connector {self._connector.name}: {reason}")

    async def _deliver(self, upload: Upload) -> None:
        await self._ready
        if self._closed:
            raise DeliveryFailed(f"connector {self._connector.name}: link is closed")
        answer: Deferred[bytes] = Deferred()
        self._commit_answers.append(answer)
        self._protocol.transport.write(
            b"".join(frame.to_bytes() for frame in upload.frames) + COMMIT_REQUEST
        )
        status = await answer
        if status != b"\x01":
            raise DeliveryFailed(
                f"connector {self._connector.name}: end server answered the commit"
                f" with status {status.hex() or 'empty'}"
            )

    def deliver(self, upload: Upload, profile: DeviceProfile) -> Deferred[None]:
        if self._closed:
            return fail(DeliveryFailed(f"connector {self._connector.name}: link is closed"))
        return Deferred.fromCoroutine(self._deliver(upload))

    def forward(self, frame: Frame) -> None:
        if self._closed:
            return
        if self._protocol is None:
            if len(self._unsent) >= MAX_UNSENT_FRAMES:
                self.lost(
                    f"more than {MAX_UNSENT_FRAMES} frames to pass on before the"
                    " end server connection was up"
                )
                return
            self._unsent.append(frame)
        else:
            self._protocol.transport.write(frame.to_bytes())

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._drop("device connection closed")

    def _drop(self, reason: str) -> None:
        self._connecting.cancel()
        if not self._ready.called:
            self._ready.errback(DeliveryFailed(f"connector {self._connector.name}: {reason}"))
            self._ready.addErrback(lambda _: None)
        answers, self._commit_answers = self._commit_answers, deque()
        for answer in answers:
            answer.errback(DeliveryFailed(f"connector {self._connector.name}: {reason}"))
        if self._protocol is not None:
            self._protocol.transport.loseConnection()


class TcpConnector:
    """Forwards each device connection to ``endpoint`` in the device protocol."""

    def __init__(
        self,
        config: TcpConnectorConfig,
        endpoint: IStreamClientEndpoint,
        max_message: int,
    ) -> None:
        self.name = config.name
        self.endpoint = endpoint
        self.max_message = max_message

    @classmethod
    def from_config(cls, config: TcpConnectorConfig, reactor, max_message: int) -> TcpConnector:
        return cls(config, clientFromString(reactor, config.endpoint), max_message)

    def open_link(self, hello: Hello, on_lost: Callable[[str], None]) -> TcpLink:
        return TcpLink(self, hello, on_lost)
