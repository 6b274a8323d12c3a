"""
One device connection: the protocol rules and the commit decision.

:class:`DeviceSession` holds the rules (hello before anything else, canned
replies, records gathered until a commit request, the commit answered only
once the route confirmed delivery).  It reaches the network only through the
narrow :class:`DeviceChannel` interface, so it is tested without sockets.
:class:`DeviceProtocol` is the thin Twisted protocol that feeds it frames.

While a commit is being delivered the session reads nothing further from the
device: frames already received wait in order, and the transport is paused.
A device waits for the commit answer anyway, and this bounds what one device
can make the relay hold.

An async session request (0x22) sends the device's due commands from the
registry, one 0x20 at a time, each waiting for the device's 0x21, then 0x23.
Other frames that arrive meanwhile wait, as during a commit.
"""

from __future__ import annotations

from collections import deque
from typing import Protocol as TypingProtocol

from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure

from .codec import (
    ASYNC_SESSION_COMPLETE,
    AsyncStatus,
    COMMIT_SUCCESS,
    VERSION_RESPONSE,
    Frame,
    FrameDecoder,
    FramingError,
    Hello,
    MessageType,
    ProtocolError,
    Record,
    FixedRecordExtras,
    encode_async_message,
    hello_response,
    parse_async_response,
    parse_data_records,
    parse_fixed_records,
    parse_hello,
    time_response,
)
from .relay import DeliveryFailed, DeviceRoute, Relay, Upload, describe_failure

log = Logger(namespace="oemrelay.session")

#: Frames a device may send while a commit or an async session is under way
#: before the relay stops reading from it.
_MAX_WAITING_FRAMES = 32

#: The most record data one upload may hold.  Devices send about 1 KiB per
#: message; a flash backlog of tens of thousands of records still fits.
MAX_UNCOMMITTED_BYTES = 4 * 1024 * 1024


def _commit_timed_out(result: object, timeout: float) -> None:
    # A connector cancelled mid-delivery may fail with its own error (treq:
    # DeliveryFailed wrapping ResponseNeverReceived), not CancelledError,
    # which addTimeout's default conversion alone turns into TimeoutError.
    raise TimeoutError(timeout, "commit")


class DeviceChannel(TypingProtocol):
    """What a session may do to its connection."""

    def send(self, data: bytes) -> None: ...

    def close(self) -> None: ...

    def pause(self) -> None: ...

    def resume(self) -> None: ...


class DeviceSession:
    """The protocol state of one device connection."""

    def __init__(
        self,
        peer: str,
        channel: DeviceChannel,
        relay: Relay,
        clock: IReactorTime,
        commit_timeout: float,
    ) -> None:
        self.peer = peer
        self.hello: Hello | None = None
        self._channel = channel
        self._relay = relay
        self._clock = clock
        self._commit_timeout = commit_timeout
        self._route: DeviceRoute | None = None
        self._frames: list[Frame] = []
        self._records: list[Record] = []
        self._pending_bytes = 0
        self._waiting: deque[Frame] = deque()
        # A commit or an async session is under way: other frames wait.
        self._busy = False
        # The command id and the Deferred awaiting its 0x21, in an async session.
        self._awaited_response: tuple[int, Deferred[int]] | None = None
        self._closed = False

    @property
    def serial(self) -> str:
        """The device serial for log lines (``unknown`` before the hello)."""
        return str(self.hello.serial) if self.hello else "unknown"

    @property
    def pending_records(self) -> int:
        """Records received since the last commit request."""
        return len(self._records)

    # -- input ---------------------------------------------------------------

    def frame_received(self, frame: Frame) -> None:
        """Handle one frame now, or after the commit or async session under way."""
        if self._closed:
            return
        try:
            if frame.type == MessageType.ASYNC_RESPONSE and self._awaited_response:
                self._async_response(frame)
            elif self._busy:
                self._waiting.append(frame)
                if len(self._waiting) > _MAX_WAITING_FRAMES:
                    self._channel.pause()
            else:
                self._handle(frame)
        except ProtocolError as error:
            self.protocol_error(str(error))

    def protocol_error(self, reason: str) -> None:
        """The device broke the protocol: log it, drop its records, hang up."""
        if self._closed:
            return
        log.warn(
            "closing device connection from {peer}, serial {serial}: {reason}",
            peer=self.peer,
            serial=self.serial,
            reason=reason,
        )
        self._close()

    def connection_lost(self) -> None:
        """The connection is gone; uncommitted records are the device's to resend."""
        if self.hello is not None:
            log.info(
                "device {serial} from {peer} disconnected"
                " ({uncommitted} uncommitted records left with the device)",
                serial=self.serial,
                peer=self.peer,
                uncommitted=len(self._records),
            )
        self._closed = True
        self._discard()

    # -- message rules -------------------------------------------------------

    def _handle(self, frame: Frame) -> None:
        message_type = frame.type
        if message_type == MessageType.HELLO:
            self._hello_received(parse_hello(frame.payload))
            return
        if self.hello is None:
            raise ProtocolError(f"message type 0x{message_type:02x} before hello")
        if message_type == MessageType.DATA_RECORDS:
            self._keep(frame, parse_data_records(frame.payload))
        elif message_type == MessageType.FIXED_RECORDS:
            records = parse_fixed_records(frame.payload)
            self._check_fixed_checksums(records)
            self._keep(frame, records)
        elif message_type == MessageType.COMMIT_REQUEST:
            self._commit_requested()
        elif message_type == MessageType.VERSION_DATA:
            self._channel.send(VERSION_RESPONSE)
        elif message_type == MessageType.ASYNC_SESSION_REQUEST:
            self._start_async_session()
        elif message_type == MessageType.TIME_REQUEST:
            self._channel.send(time_response(self._clock.seconds()))
        else:
            # 0x26 (socket closing), stray 0x21, types we do not know: DM says
            # unknown messages can be ignored; raw TCP end servers still see them.
            if message_type != MessageType.SOCKET_CLOSE:
                log.info(
                    "device {serial} sent message type 0x{type:02x}; ignored"
                    " (passed on to raw TCP end servers)",
                    serial=self.serial,
                    type=message_type,
                )
            self._route.forward(frame)

    def _hello_received(self, hello: Hello) -> None:
        if self.hello is None:
            self.hello = hello
            log.info(
                "device {serial} connected from {peer} (IMEI {imei}, FW {fw})",
                serial=hello.serial,
                peer=self.peer,
                imei=hello.imei,
                fw=hello.firmware,
            )
            self._route = self._relay.open_route(hello, self._end_server_lost)
            if self._closed:
                # A link failed while opening and closed the session before
                # the route was stored: close the route, do not answer.
                self._discard()
                return
        elif hello.serial != self.hello.serial:
            raise ProtocolError(
                f"second hello with another serial {hello.serial}"
            )
        self._channel.send(hello_response(hello, self._clock.seconds()))

    def _keep(self, frame: Frame, records: list[Record]) -> None:
        self._pending_bytes += len(frame.payload)
        if self._pending_bytes > MAX_UNCOMMITTED_BYTES:
            raise ProtocolError(
                f"more than {MAX_UNCOMMITTED_BYTES} bytes of records without a"
                " commit request"
            )
        self._frames.append(frame)
        self._records.extend(records)

    def _check_fixed_checksums(self, records: list[Record]) -> None:
        for record in records:
            extras = record.fields[-1]
            if isinstance(extras, FixedRecordExtras) and not extras.checksum_ok:
                # Forwarded anyway: the checksum rule is inferred, and refusing
                # the record would make the device resend it forever.
                log.warn(
                    "device {serial} from {peer}: checksum mismatch in fixed"
                    " record {index}; forwarding it unchanged",
                    serial=self.serial,
                    peer=self.peer,
                    index=record.seq,
                )

    # -- commit --------------------------------------------------------------

    def _commit_requested(self) -> None:
        if not self._frames:
            self._channel.send(COMMIT_SUCCESS)
            return
        upload = Upload(
            self.hello,
            tuple(self._frames),
            tuple(self._records),
            self._clock.seconds(),
        )
        self._frames, self._records, self._pending_bytes = [], [], 0
        self._busy = True
        self._channel.pause()
        delivery = Deferred.fromCoroutine(self._route.deliver(upload))
        delivery.addTimeout(self._commit_timeout, self._clock, _commit_timed_out)
        delivery.addCallbacks(
            self._delivered,
            self._not_delivered,
            callbackArgs=(upload,),
            errbackArgs=(upload,),
        )

    def _delivered(self, _: object, upload: Upload) -> None:
        if self._closed:
            log.info(
                "device {serial}: {count} records delivered after the device"
                " left; it will send them again",
                serial=self.serial,
                count=len(upload.records),
            )
            return
        self._channel.send(COMMIT_SUCCESS)
        # No log line per commit: twistd logs every level, and commits are
        # the hot path; the registry counts them.
        self._route.committed(upload)
        self._not_busy()

    def _not_busy(self) -> None:
        self._busy = False
        self._channel.resume()
        while self._waiting and not self._busy and not self._closed:
            self.frame_received(self._waiting.popleft())

    def _not_delivered(self, failure: Failure, upload: Upload) -> None:
        self._busy = False
        if failure.check(TimeoutError, CancelledError):
            reason = f"not confirmed within commit_timeout {self._commit_timeout:g}s"
        elif failure.check(DeliveryFailed):
            reason = describe_failure(failure)
        else:
            log.failure(
                "bug delivering for device {serial}", failure, serial=self.serial
            )
            reason = describe_failure(failure)
        if self._closed:
            return
        self._route.withheld(upload, reason)
        log.warn(
            "device {serial} from {peer}: commit of {count} records withheld,"
            " closing so the device resends: {reason}",
            serial=self.serial,
            peer=self.peer,
            count=len(upload.records),
            reason=reason,
        )
        self._close()

    # -- async session (commands) ---------------------------------------------

    def _start_async_session(self) -> None:
        self._busy = True
        session = Deferred.fromCoroutine(self._send_due_commands())
        session.addErrback(self._async_session_failed)
        session.addCallback(lambda _: self._not_busy())

    async def _send_due_commands(self) -> None:
        try:
            commands = await self._route.due_commands().addTimeout(
                self._commit_timeout, self._clock
            )
        except Exception as error:
            log.warn(
                "device {serial}: no commands sent, registry unavailable: {reason}",
                serial=self.serial,
                reason=" ".join(str(error).split()),
            )
            commands = []
        route = self._route  # still there to record results once closed
        for command in commands:
            if self._closed:
                return
            try:
                sent = await route.command_sent(command.id).addTimeout(
                    self._commit_timeout, self._clock
                )
            except Exception as error:
                log.warn(
                    "device {serial}: command {id} not sent, registry unavailable:"
                    " {reason}; ending the async session",
                    serial=self.serial,
                    id=command.id,
                    reason=" ".join(str(error).split()),
                )
                break
            if sent is None:
                continue  # taken by another relay, or expired, meanwhile
            if self._closed:
                # Marked sent, never written: back in the queue for next time.
                route.command_result(command.id, AsyncStatus.RETRY_LATER)
                return
            answer: Deferred[int] = Deferred()
            self._awaited_response = (command.id, answer)
            self._channel.send(
                encode_async_message(command.id, command.message_type, command.data)
            )
            try:
                status = await answer.addTimeout(self._commit_timeout, self._clock)
            except TimeoutError:
                log.warn(
                    "device {serial}: no answer to command {id} within"
                    " {seconds:g}s; ending the async session",
                    serial=self.serial,
                    id=command.id,
                    seconds=self._commit_timeout,
                )
                break
            finally:
                self._awaited_response = None
            self._route.command_result(command.id, status)
            log.info(
                "device {serial}: command {id} ({type}) answered with status {status}",
                serial=self.serial,
                id=command.id,
                type=command.type,
                status=status,
            )
        if not self._closed:
            self._channel.send(ASYNC_SESSION_COMPLETE)

    def _async_response(self, frame: Frame) -> None:
        message_id, status = parse_async_response(frame.payload)
        expected, answer = self._awaited_response
        if message_id != expected:
            log.warn(
                "device {serial}: answer for message {got} while waiting for"
                " command {expected}; ignored",
                serial=self.serial,
                got=message_id,
                expected=expected,
            )
            return
        answer.callback(status)

    def _async_session_failed(self, failure: Failure) -> None:
        if not failure.check(CancelledError):
            log.failure(
                "bug in the async session of device {serial}", failure, serial=self.serial
            )
            self._close()

    def _end_server_lost(self, reason: str) -> None:
        if self._closed:
            return
        log.warn(
            "device {serial} from {peer}: closing, end server link lost: {reason}",
            serial=self.serial,
            peer=self.peer,
            reason=reason,
        )
        self._close()

    # -- teardown ------------------------------------------------------------

    def _close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._discard()
        self._channel.close()

    def _discard(self) -> None:
        self._frames, self._records, self._pending_bytes = [], [], 0
        self._waiting.clear()
        if self._awaited_response is not None:
            self._awaited_response[1].cancel()
        if self._route is not None:
            route, self._route = self._route, None
            route.close()


class DeviceProtocol(Protocol, TimeoutMixin):
    """Feeds a device's bytes to its session; the session's channel to it."""

    def __init__(self, factory: DeviceFactory) -> None:
        self._factory = factory
        self._decoder = FrameDecoder(factory.max_message)
        self.session: DeviceSession | None = None
        self.callLater = factory.clock.callLater

    def connectionMade(self) -> None:
        peer = self.transport.getPeer()
        host = getattr(peer, "host", str(peer))
        port = getattr(peer, "port", None)
        self.session = DeviceSession(
            f"{host}:{port}" if port is not None else host,
            self,
            self._factory.relay,
            self._factory.clock,
            self._factory.commit_timeout,
        )
        self.setTimeout(self._factory.idle_timeout)

    def dataReceived(self, data: bytes) -> None:
        self.resetTimeout()
        try:
            frames = self._decoder.feed(data)
        except FramingError as error:
            for frame in error.frames:
                self.session.frame_received(frame)
            self.session.protocol_error(str(error))
            return
        for frame in frames:
            self.session.frame_received(frame)

    def timeoutConnection(self) -> None:
        log.info(
            "device {serial} from {peer}: silent for {seconds:g}s, closing",
            serial=self.session.serial,
            peer=self.session.peer,
            seconds=self._factory.idle_timeout,
        )
        self.transport.abortConnection()

    def connectionLost(self, reason: Failure = None) -> None:
        self.setTimeout(None)
        self.session.connection_lost()

    # DeviceChannel

    def send(self, data: bytes) -> None:
        self.transport.write(data)

    def close(self) -> None:
        self.setTimeout(None)
        self.transport.loseConnection()

    def pause(self) -> None:
        self.transport.pauseProducing()

    def resume(self) -> None:
        self.transport.resumeProducing()


class DeviceFactory(Factory):
    """Makes a :class:`DeviceProtocol` per device connection."""

    def __init__(
        self,
        relay: Relay,
        clock: IReactorTime,
        *,
        commit_timeout: float,
        idle_timeout: float,
        max_message: int,
    ) -> None:
        self.relay = relay
        self.clock = clock
        self.commit_timeout = commit_timeout
        self.idle_timeout = idle_timeout
        self.max_message = max_message

    def buildProtocol(self, addr: object) -> DeviceProtocol:
        return DeviceProtocol(self)
