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
relay's), and nothing of an upload is written before it came, as a device
would wait for it; the commit response to the upload's commit request then
decides the device's commit.  If the end server cannot be reached or goes
away, or sends a commit response out of step (before its hello response, or
with no commit request outstanding), the device connection is closed
uncommitted: such an answer can never confirm an upload.

An upload coming out of the spool is delivered the same way on a connection
of its own (:meth:`TcpConnector.deliver_on_own_connection`).
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import clientFromString
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..codec import COMMIT_REQUEST, Frame, FrameDecoder, Hello, MessageType, ProtocolError
from ..config import TcpConnectorConfig
from ..relay import DeliveryFailed, DeviceProfile, Upload
from ..writes import write_now

log = Logger(namespace="oemrelay.connectors.tcp")

#: Frames (0x26, unknown types) held for an end server still being connected
#: to; a device sending more is flooding, and is disconnected.
MAX_UNSENT_FRAMES = 64



class _OneConnection(Factory):
    """
    What connectProtocol does, quietly: the one protocol for one connection,
    without a "Starting factory <... at 0x...>" line per device.
    """

    noisy = False

    def __init__(self, protocol) -> None:
        self._protocol = protocol

    def buildProtocol(self, addr):
        return self._protocol

class _EndServerProtocol(Protocol):
    """The relay's connection to the end server for one device: feeds its link."""

    def __init__(self, link: TcpLink, max_message: int) -> None:
        self._link = link
        self._decoder = FrameDecoder(max_message)

    def dataReceived(self, data: bytes) -> None:
        try:
            frames = self._decoder.feed(data)
        except ProtocolError as error:
            self._link.end_server_failed(f"end server broke the protocol: {error}")
            return
        self._link.frames_from_end_server(frames)

    def connectionLost(self, reason: Failure = None) -> None:
        self._link.end_server_failed("end server closed the connection")


class TcpLink:
    """
    One device connection's counterpart at the end server.

    The states, and what every input does in each, are the table
    ``_TABLE`` below.  The relay behaves as a device would: it sends the
    hello, waits for the end server's hello response, and only then writes an
    upload and its commit request, one upload at a time.  So the one commit
    response that can confirm an upload is the first one after that upload's
    commit request in the ``committing`` state; a commit response in any other
    state (before the hello response, with no request outstanding) means the
    end server is out of step with us, and the link is lost without a commit.
    """

    def __init__(
        self,
        connector: TcpConnector,
        hello: Hello,
        on_lost: Callable[[str], None],
    ) -> None:
        self._connector = connector
        self._serial = hello.serial
        self._on_lost = on_lost
        self._state = "connecting"
        self._protocol: _EndServerProtocol | None = None
        self._hello_frame = hello.to_frame()
        # Frames passed on before the end server connection is up: sent after the hello.
        self._unsent: list[Frame] = []
        # The one upload being delivered, and the Deferred its commit response fires.
        self._upload: Upload | None = None
        self._answer: Deferred[None] | None = None
        # Commit responses of the read being processed, fired once it is done.
        self._answered: list[tuple[Deferred[None], bytes]] = []
        self._connecting = connector.endpoint.connect(
            _OneConnection(_EndServerProtocol(self, connector.max_message))
        )
        self._connecting.addCallbacks(self._connected, self._not_connected)

    # -- the public surface (Link) ---------------------------------------------

    def deliver(self, upload: Upload, profile: DeviceProfile) -> Deferred[None]:
        """Write ``upload`` and a commit request; fires when the end server answers 06 01."""
        answer: Deferred[None] = Deferred()
        self._upload_offered(upload, answer)
        return answer

    def forward(self, frame: Frame) -> None:
        """Pass a frame that is no upload on to the end server."""
        # Frames are held only while connecting, so this bounds just that.
        if len(self._unsent) >= MAX_UNSENT_FRAMES:
            self._lost(
                f"more than {MAX_UNSENT_FRAMES} frames to pass on before the"
                " end server connection was up"
            )
            return
        self._frame_offered(frame)

    def close(self) -> None:
        """The device connection closed: close the end server's, without calling on_lost."""
        self._closed_by_device("device connection closed")

    def end_server_failed(self, reason: str) -> None:
        """The end server connection failed or broke the protocol."""
        self._lost(reason)

    def frames_from_end_server(self, frames: list[Frame]) -> None:
        """Feed one read's frames to the machine."""
        for frame in frames:
            if frame.type == MessageType.COMMIT_RESPONSE:
                self._commit_response(frame.payload)
            elif frame.type == MessageType.HELLO_RESPONSE:
                self._hello_response()
            else:
                self._other_frame(frame)
        # Answers fire only now: a commit request written in reaction to one
        # (the session's next upload) must not be answered by a surplus
        # commit response that arrived in the same read, before it was sent.
        answered, self._answered = self._answered, []
        for answer, status in answered:
            if status == b"\x01":
                answer.callback(None)
            else:
                answer.errback(
                    self._failed(
                        "end server answered the commit with status"
                        f" {status.hex() or 'empty'}"
                    )
                )

    # -- the machine -----------------------------------------------------------
    #
    # States: connecting (nothing written yet), connecting_with_upload (and
    # an upload waits), greeting (the hello is written, its response has not
    # come), greeting_with_upload, open (hello answered, no commit request
    # outstanding), committing (an upload and its commit request written, the
    # answer awaited), closed (every input ignored or refused).
    #
    # A row is (state, input, next state, outputs); the state is entered,
    # then the outputs run in order, each given the input's arguments.  A
    # plain table rather than automat's MethodicalMachine: automat builds a
    # new function and filters arguments by signature on every input, a
    # tenth of the raw TCP path's CPU.
    _TABLE = (
        ("connecting", "connection_made", "greeting", ("_send_hello",)),
        ("connecting", "upload_offered", "connecting_with_upload", ("_hold_upload",)),
        ("connecting", "frame_offered", "connecting", ("_hold_frame",)),
        ("connecting_with_upload", "connection_made", "greeting_with_upload", ("_send_hello",)),
        ("connecting_with_upload", "upload_offered", "connecting_with_upload", ("_refuse_second_upload",)),
        ("connecting_with_upload", "frame_offered", "connecting_with_upload", ("_hold_frame",)),
        ("greeting", "hello_response", "open", ()),
        ("greeting", "commit_response", "closed", ("_lose_before_hello",)),
        ("greeting", "upload_offered", "greeting_with_upload", ("_hold_upload",)),
        ("greeting", "frame_offered", "greeting", ("_write_frame",)),
        ("greeting_with_upload", "hello_response", "committing", ("_send_upload",)),
        ("greeting_with_upload", "commit_response", "closed", ("_lose_before_hello",)),
        ("greeting_with_upload", "upload_offered", "greeting_with_upload", ("_refuse_second_upload",)),
        ("greeting_with_upload", "frame_offered", "greeting_with_upload", ("_write_frame",)),
        ("open", "hello_response", "open", ()),  # a repeated one changes nothing
        ("open", "commit_response", "closed", ("_lose_out_of_step",)),
        ("open", "upload_offered", "committing", ("_hold_upload", "_send_upload")),
        ("open", "frame_offered", "open", ("_write_frame",)),
        ("committing", "hello_response", "committing", ()),
        ("committing", "commit_response", "open", ("_answer_upload",)),
        ("committing", "upload_offered", "committing", ("_refuse_second_upload",)),
        ("committing", "frame_offered", "committing", ("_write_frame",)),
        # A connection completing after close() is dropped; anything else is ignored.
        ("closed", "connection_made", "closed", ("_drop_late_connection",)),
        ("closed", "hello_response", "closed", ()),
        ("closed", "commit_response", "closed", ()),
        ("closed", "upload_offered", "closed", ("_refuse_upload",)),
        ("closed", "frame_offered", "closed", ()),
        ("closed", "lost", "closed", ()),
        ("closed", "closed_by_device", "closed", ()),
    ) + tuple(
        row
        for state in ("connecting", "connecting_with_upload", "greeting",
                      "greeting_with_upload", "open", "committing")
        for row in (
            (state, "lost", "closed", ("_lose",)),
            (state, "closed_by_device", "closed", ("_close_quietly",)),
        )
    )

    #: The table compiled: (state, input) -> (next state, output names).
    _TRANSITIONS = {(state, input_): (to, outputs) for state, input_, to, outputs in _TABLE}

    def _input(self, input_: str, *args: object) -> None:
        self._state, outputs = self._TRANSITIONS[self._state, input_]
        for output in outputs:
            getattr(self, output)(*args)

    def _connection_made(self, protocol: _EndServerProtocol) -> None:
        self._input("connection_made", protocol)

    def _hello_response(self) -> None:
        self._input("hello_response")

    def _commit_response(self, status: bytes) -> None:
        self._input("commit_response", status)

    def _upload_offered(self, upload: Upload, answer: Deferred[None]) -> None:
        self._input("upload_offered", upload, answer)

    def _frame_offered(self, frame: Frame) -> None:
        self._input("frame_offered", frame)

    def _lost(self, reason: str) -> None:
        """The end server connection failed, could not be made, or broke the protocol."""
        self._input("lost", reason)

    def _closed_by_device(self, reason: str) -> None:
        self._input("closed_by_device", reason)

    # -- the outputs -------------------------------------------------------------

    def _hold_upload(self, upload: Upload, answer: Deferred[None]) -> None:
        self._upload, self._answer = upload, answer

    def _refuse_second_upload(self, upload: Upload, answer: Deferred[None]) -> None:
        # The session waits for each commit, as the device does; two at once
        # would leave a commit response's upload ambiguous.
        answer.errback(self._failed("an upload is already awaiting its commit response"))

    def _refuse_upload(self, upload: Upload, answer: Deferred[None]) -> None:
        answer.errback(self._failed("link is closed"))

    def _hold_frame(self, frame: Frame) -> None:
        self._unsent.append(frame)

    def _write_frame(self, frame: Frame) -> None:
        write_now(self._protocol.transport, frame.to_bytes())

    def _send_hello(self, protocol: _EndServerProtocol) -> None:
        self._protocol = protocol
        unsent, self._unsent = self._unsent, []
        write_now(
            protocol.transport,
            self._hello_frame + b"".join(frame.to_bytes() for frame in unsent),
        )

    def _drop_late_connection(self, protocol: _EndServerProtocol) -> None:
        protocol.transport.loseConnection()

    def _send_upload(self, *_: object) -> None:
        write_now(
            self._protocol.transport,
            # One join, the commit request in it: no second copy of the upload.
            b"".join([*(frame.to_bytes() for frame in self._upload.frames), COMMIT_REQUEST]),
        )

    def _answer_upload(self, status: bytes) -> None:
        self._answered.append((self._answer, status))
        self._upload = self._answer = None

    def _lose(self, reason: str) -> None:
        self._give_up_and_report(reason)

    def _lose_before_hello(self, status: bytes) -> None:
        self._give_up_and_report("end server sent a commit response before its hello response")

    def _lose_out_of_step(self, status: bytes) -> None:
        self._give_up_and_report("end server sent a commit response without a commit request")

    def _close_quietly(self, reason: str) -> None:
        self._give_up(reason)

    # -- helpers -----------------------------------------------------------------

    def _connected(self, protocol: _EndServerProtocol) -> None:
        self._connection_made(protocol)

    def _not_connected(self, failure: Failure) -> None:
        # After close() the cancelled attempt fails too: ignored when closed.
        self._lost(f"cannot connect to end server: {failure.getErrorMessage()}")

    def _give_up(self, reason: str) -> None:
        """Fail the upload being delivered and close the end server connection."""
        answer, self._upload, self._answer = self._answer, None, None
        self._unsent = []
        self._connecting.cancel()
        if self._protocol is not None:
            self._protocol.transport.loseConnection()
        if answer is not None:
            answer.errback(self._failed(reason))

    def _give_up_and_report(self, reason: str) -> None:
        self._give_up(reason)
        self._on_lost(f"connector {self._connector.name}: {reason}")

    def _failed(self, reason: str) -> Failure:
        return Failure(
            DeliveryFailed(f"connector {self._connector.name}: {reason}", "end_server")
        )

    def _other_frame(self, frame: Frame) -> None:
        log.info(
            "connector {name}: end server sent message type 0x{type:02x}"
            " for device {serial}; not passed on",
            name=self._connector.name,
            type=frame.type,
            serial=self._serial,
        )


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

    def deliver_on_own_connection(self, upload: Upload) -> Deferred[None]:
        """
        Deliver ``upload`` on a connection of its own, as the device would
        have (for the spool): the hello as received, the frames, a commit
        request; fires when the end server answers ``06 01``, then closes.
        """
        # The failure reaches the Deferred too: the loss needs no report.
        link = TcpLink(self, upload.hello, lambda reason: None)
        answer = link.deliver(upload, DeviceProfile())

        def close(result: object) -> object:
            link.close()
            return result

        return answer.addBoth(close)
