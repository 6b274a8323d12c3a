"""
One device connection: the protocol rules and the commit decision.

:class:`DeviceSession` holds the rules (hello before anything else, canned
replies, records gathered until a commit request, the commit answered only
once the route confirmed delivery) as one explicit state machine: a table of
``(state, input) -> (next state, outputs)``.  It reaches the network only
through the narrow :class:`DeviceChannel` interface, so it is tested without
sockets.  :class:`DeviceProtocol` is the thin Twisted protocol that feeds it
frames.

While a commit is being delivered, frames the device sends wait in order
for its end; once more than ``max_waiting_frames`` wait, the transport is
paused until then.  A device waits for the commit answer anyway, and this
bounds what one device can make the relay hold.

An async session request (0x22) sends the device's due commands from the
registry, one 0x20 at a time, each waiting for the device's 0x21, then 0x23.
Other frames that arrive meanwhile wait, as during a commit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from enum import Enum
from typing import Protocol as TypingProtocol

from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.interfaces import IPushProducer, IReactorTime, ISSLTransport
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

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
    frame_shape,
    upload_cost,
    encode_async_message,
    hello_response,
    parse_async_response,
    parse_hello,
    time_response,
)
from .deadlines import DeadlineQueue, DeadlineQueues, Entry
from .oneline import one_line
# The limits' defaults are the configuration's (one source for each).
from .config import (
    FRAME_TIMEOUT,
    HELLO_TIMEOUT,
    MAX_CONNECTIONS,
    MAX_RECORDS_PER_UPLOAD,
    MAX_UPLOAD_MEMORY,
)
from .relay import DeliveryFailed, DeviceRoute, Relay, Upload, describe_failure
from .writes import write_now

log = Logger(namespace="oemrelay.session")

#: Frames a device may send while a commit or an async session is under way
#: before the relay stops reading from it.
MAX_WAITING_FRAMES = 32

#: The most record data one upload may hold.  Devices send about 1 KiB per
#: message; a flash backlog of tens of thousands of records still fits.
MAX_UNCOMMITTED_BYTES = 4 * 1024 * 1024

#: Seconds during which a peer's refusals after the first are only counted.
NOTICE_INTERVAL = 60.0


class State(Enum):
    """Where a device connection is."""

    # The transition table is looked up by state and input a few times per
    # upload: identity hashing in C, not Enum's hash of the name in Python.
    __hash__ = object.__hash__

    AWAITING_HELLO = "awaiting hello"
    #: The hello's route is being opened (synchronously; a link may fail meanwhile).
    OPENING = "opening"
    IDLE = "idle"
    #: An upload is being delivered; frames wait (reading pauses past max_waiting_frames).
    COMMITTING = "committing"
    #: Due commands are being sent; frames other than 0x21 wait.
    ASYNC_SESSION = "async session"
    #: Told to stop (SIGTERM) during a commit: its answer is awaited, then close.
    DRAINING = "draining"
    CLOSED = "closed"


class Input(Enum):
    """What can happen to a device connection."""

    __hash__ = object.__hash__  # as State's

    # Frames from the device, by message type.
    HELLO = "hello"
    DATA = "data records"
    COMMIT = "commit request"
    EMPTY_COMMIT = "commit request, nothing pending"
    VERSION = "version data"
    TIME = "time request"
    ASYNC_REQUEST = "async session request"
    COMMAND_ANSWER = "async response"
    OTHER = "other frame"
    # Everything else.
    ROUTE_OPENED = "route opened"
    DELIVERED = "delivered"
    NOT_DELIVERED = "not delivered"
    ASYNC_DONE = "async session done"
    END_SERVER_LOST = "end server lost"
    #: The registry does not know the device (unknown_devices = reject).
    REJECTED = "unknown device rejected"
    PROTOCOL_ERROR = "protocol error"
    CONNECTION_LOST = "connection lost"
    DRAIN = "drain"
    HELLO_TIMEOUT = "no hello in time"


#: Every input a device frame becomes.
FRAMES = (
    Input.HELLO,
    Input.DATA,
    Input.COMMIT,
    Input.EMPTY_COMMIT,
    Input.VERSION,
    Input.TIME,
    Input.ASYNC_REQUEST,
    Input.COMMAND_ANSWER,
    Input.OTHER,
)

_FRAME_INPUTS = {
    MessageType.HELLO: Input.HELLO,
    MessageType.DATA_RECORDS: Input.DATA,
    MessageType.FIXED_RECORDS: Input.DATA,
    MessageType.COMMIT_REQUEST: Input.COMMIT,
    MessageType.VERSION_DATA: Input.VERSION,
    MessageType.TIME_REQUEST: Input.TIME,
    MessageType.ASYNC_SESSION_REQUEST: Input.ASYNC_REQUEST,
    MessageType.ASYNC_RESPONSE: Input.COMMAND_ANSWER,
}


class DeviceChannel(TypingProtocol):
    """What a session may do to its connection."""

    def send(self, data: bytes) -> None: ...

    def close(self) -> None: ...

    def pause(self) -> None: ...

    def resume(self) -> None: ...


_OPEN = tuple(state for state in State if state is not State.CLOSED)
_NOT_COMMITTING = (State.AWAITING_HELLO, State.IDLE, State.ASYNC_SESSION)
_NOT_HELLO = tuple(frame for frame in FRAMES if frame is not Input.HELLO)
_NOT_ANSWER = tuple(frame for frame in FRAMES if frame is not Input.COMMAND_ANSWER)
#: In a row's input column: every input no earlier row gave for that state.
_ANY_OTHER = tuple(Input)

_Row = tuple[
    "State | tuple[State, ...]", "Input | tuple[Input, ...]", State, tuple[str, ...]
]


class DeviceSession:
    """The protocol state of one device connection."""

    # Slots: one session per connection held, and past 30 attributes an
    # instance's __dict__ stops sharing its keys with the others' (1.6 KB per
    # connection, tracemalloc with 10,000 devices held; slots take 8 bytes each).
    __slots__ = (
        "_awaited_response", "_certificate_names", "_channel", "_clock",
        "_commit_deadlines", "_commit_timeout", "_delivery", "_delivery_deadline",
        "_delivery_timed_out", "_first_seq", "_frames", "_hello_deadline", "_hello_deadlines",
        "_hello_timeout", "_max_records_per_upload", "_max_uncommitted_bytes",
        "_max_upload_memory", "_max_waiting_frames", "_notices", "_observers",
        "_pending_bytes", "_record_count", "_relay", "_route", "_state",
        "_unconfirmed_records", "_upload_memory", "_waiting", "hello", "outcome", "peer",
    )

    # How to read the table: a row is (state, input, next state, outputs); a
    # tuple in the first two columns stands for each of its members.  On an
    # input the session enters the next state, then runs the outputs in order,
    # each given the input's argument (a frame, an upload, a reason).  An
    # output that feeds another input (a delivery accepted at once, a link
    # lost while opening) comes last, so nothing of the old row runs after it.
    # An output that raises ProtocolError (a bad payload) sits in a row that
    # stays open; frame_received turns the error into PROTOCOL_ERROR.  A pair
    # missing from the table cannot happen; it raises KeyError.
    #
    # Room for the next states: retrying inside the commit window stays in
    # COMMITTING (the connector retries while commit_timeout runs; only its
    # final answer is an input); spooled is DELIVERED fed once the spool holds
    # the upload durably.  DRAINING's grace period is commit_timeout, which
    # bounds every delivery.
    _TABLE: tuple[_Row, ...] = (
        # state               input(s)              next state           outputs
        (State.AWAITING_HELLO, Input.HELLO,         State.OPENING,       ("_take_hello", "_check_identity", "_open_route")),
        (State.AWAITING_HELLO, _NOT_HELLO,          State.AWAITING_HELLO, ("_refuse_before_hello",)),
        (State.AWAITING_HELLO, Input.HELLO_TIMEOUT, State.CLOSED,        ("_note_hello_timeout", "_close")),
        (State.OPENING,       Input.ROUTE_OPENED,   State.IDLE,          ("_keep_route", "_answer_hello")),
        (State.IDLE,          Input.HELLO,          State.IDLE,          ("_hello_again",)),
        (State.IDLE,          Input.DATA,           State.IDLE,          ("_keep",)),
        (State.IDLE,          Input.COMMIT,         State.COMMITTING,    ("_deliver",)),
        (State.IDLE,          Input.EMPTY_COMMIT,   State.IDLE,          ("_answer_commit",)),
        (State.IDLE,          Input.VERSION,        State.IDLE,          ("_answer_version",)),
        (State.IDLE,          Input.TIME,           State.IDLE,          ("_answer_time",)),
        (State.IDLE,          Input.ASYNC_REQUEST,  State.ASYNC_SESSION, ("_start_async_session",)),
        (State.IDLE,          (Input.COMMAND_ANSWER, Input.OTHER), State.IDLE, ("_forward",)),
        (State.COMMITTING,    FRAMES,               State.COMMITTING,    ("_wait",)),
        (State.COMMITTING,    Input.DELIVERED,      State.IDLE,          ("_commit", "_replay_waiting")),
        (State.COMMITTING,    Input.NOT_DELIVERED,  State.CLOSED,        ("_withhold", "_close")),
        (State.ASYNC_SESSION, _NOT_ANSWER,          State.ASYNC_SESSION, ("_wait",)),
        (State.ASYNC_SESSION, Input.COMMAND_ANSWER, State.ASYNC_SESSION, ("_answer_command",)),
        (State.ASYNC_SESSION, Input.ASYNC_DONE,     State.IDLE,          ("_complete_async", "_replay_waiting")),
        (State.COMMITTING,    Input.DRAIN,          State.DRAINING,      ()),
        (State.DRAINING,      FRAMES + (Input.DRAIN,), State.DRAINING,   ()),
        (State.DRAINING,      Input.DELIVERED,      State.CLOSED,        ("_commit", "_note_drained", "_close")),
        (State.DRAINING,      Input.NOT_DELIVERED,  State.CLOSED,        ("_withhold", "_close")),
        (_NOT_COMMITTING,     Input.DRAIN,          State.CLOSED,        ("_note_drained", "_close")),
        (_OPEN,               Input.END_SERVER_LOST, State.CLOSED,       ("_warn_closing", "_note_end_server_lost", "_close")),
        (_OPEN,               Input.PROTOCOL_ERROR, State.CLOSED,        ("_warn_closing", "_note_protocol_error", "_close")),
        (_OPEN,               Input.REJECTED,       State.CLOSED,        ("_warn_rejected", "_close")),
        (_OPEN,               Input.CONNECTION_LOST, State.CLOSED,       ("_log_disconnect", "_discard")),
        # Closed: frames and late failures are dropped; late results tidy up.
        (State.CLOSED,        Input.DELIVERED,      State.CLOSED,        ("_log_late_delivery",)),
        (State.CLOSED,        Input.ROUTE_OPENED,   State.CLOSED,        ("_close_route",)),
        (State.CLOSED,        Input.CONNECTION_LOST, State.CLOSED,       ("_log_disconnect",)),
        (State.CLOSED,        _ANY_OTHER,           State.CLOSED,        ()),
    )

    #: The table compiled: state -> input -> (next state, output functions).
    _transitions: dict[State, dict[Input, tuple[State, tuple[Callable, ...]]]]

    def __init__(
        self,
        peer: str,
        channel: DeviceChannel,
        relay: Relay,
        clock: IReactorTime,
        commit_timeout: float,
        *,
        max_uncommitted_bytes: int = MAX_UNCOMMITTED_BYTES,
        max_waiting_frames: int = MAX_WAITING_FRAMES,
        max_records_per_upload: int = MAX_RECORDS_PER_UPLOAD,
        max_upload_memory: int = MAX_UPLOAD_MEMORY,
        hello_timeout: float = HELLO_TIMEOUT,
        notices: PeerNotices | None = None,
        certificate_names: Callable[[], frozenset[str]] | None = None,
        commit_deadlines: DeadlineQueue | None = None,
        hello_deadlines: DeadlineQueue | None = None,
    ) -> None:
        """
        :param commit_deadlines: where the commit deadline of each upload
            waits (shared by the connections of one factory: one timer for
            all); None: the session's own.
        :param hello_deadlines: where the hello deadline waits, likewise.
        """
        self.peer = peer
        self.hello: Hello | None = None
        self._state = State.AWAITING_HELLO
        self._channel = channel
        self._relay = relay
        self._clock = clock
        self._commit_timeout = commit_timeout
        self._max_uncommitted_bytes = max_uncommitted_bytes
        self._max_waiting_frames = max_waiting_frames
        self._max_records_per_upload = max_records_per_upload
        self._max_upload_memory = max_upload_memory
        self._hello_timeout = hello_timeout
        self._notices = notices if notices is not None else PeerNotices(clock)
        self._upload_memory = 0
        # Mutual TLS: the names in the device's certificate, one to be its serial.
        self._certificate_names = certificate_names
        # Settled by the hello; a connection that never says hello is shed.
        self._hello_deadlines = (
            hello_deadlines if hello_deadlines is not None else DeadlineQueue(clock)
        )
        self._hello_deadline: Entry | None = self._hello_deadlines.add(
            clock.seconds() + hello_timeout, self._hello_timed_out
        )
        self._route: DeviceRoute | None = None
        # The upload being gathered: frames since the last commit request.
        self._frames: list[Frame] = []
        # Counted, not decoded: the upload decodes its records if asked.
        self._record_count = 0
        self._first_seq: int | None = None
        self._pending_bytes = 0
        # Records received since the last commit the device was told of.
        self._unconfirmed_records = 0
        # A list, not a deque: an empty deque takes 600 bytes per connection
        # held, and only a few frames (max_waiting_frames) ever wait.
        self._waiting: list[Frame] = []
        # The command id and the Deferred awaiting its 0x21, in an async session.
        self._awaited_response: tuple[int, Deferred[int]] | None = None
        self._observers = relay.observers
        # The upload under way, its entry in the commit deadlines and whether
        # that deadline passed (then its answer, whatever it is, withholds).
        self._commit_deadlines = (
            commit_deadlines if commit_deadlines is not None else DeadlineQueue(clock)
        )
        self._delivery: Deferred[None] | None = None
        self._delivery_deadline: Entry | None = None
        self._delivery_timed_out = False
        #: How the connection ended, for observers; set when the relay closes it.
        self.outcome = "device"

    @property
    def state(self) -> State:
        """Where the connection is (see the table above)."""
        return self._state

    @property
    def serial(self) -> str:
        """The device serial for log lines (``unknown`` before the hello)."""
        return str(self.hello.serial) if self.hello else "unknown"

    @property
    def pending_records(self) -> int:
        """Records received since the last commit request."""
        return self._record_count

    @property
    def unconfirmed_records(self) -> int:
        """
        Records the device still holds: received since its last successful
        commit, including those of an upload in flight or withheld.
        """
        return self._unconfirmed_records

    # -- input ---------------------------------------------------------------

    def _input(self, event: Input, argument: object = None) -> None:
        self._state, outputs = self._transitions[self._state][event]
        for output in outputs:
            output(self, argument)

    def frame_received(self, frame: Frame) -> None:
        """Handle one frame now, or after the commit or async session under way."""
        event = _FRAME_INPUTS.get(frame.type, Input.OTHER)
        if event is Input.COMMIT and not self._frames:
            event = Input.EMPTY_COMMIT
        try:
            self._input(event, frame)
        except ProtocolError as error:
            self._input(Input.PROTOCOL_ERROR, str(error))
        if self.hello is not None:
            self._observers.frame_received(self.hello, frame)

    def protocol_error(self, reason: str) -> None:
        """The device broke the protocol: log it, drop its records, hang up."""
        self._input(Input.PROTOCOL_ERROR, reason)

    def connection_lost(self) -> None:
        """The connection is gone; uncommitted records are the device's to resend."""
        self._input(Input.CONNECTION_LOST)

    def drain(self) -> None:
        """
        Stop taking work (the relay is stopping): close now, or once the
        commit under way is answered or withheld; frames meanwhile are dropped.
        """
        self._input(Input.DRAIN)

    def _end_server_lost(self, reason: str) -> None:
        self._input(Input.END_SERVER_LOST, f"end server link lost: {reason}")

    def _note_end_server_lost(self, _: object) -> None:
        self.outcome = "end_server_lost"

    def _rejected(self, reason: str) -> None:
        self._input(Input.REJECTED, reason)

    def _warn_rejected(self, reason: str) -> None:
        self.outcome = "rejected"
        # Once per serial: a rejected device keeps trying.
        if self._relay.first_report(self.hello.serial, Input.REJECTED):
            log.warn(
                "device {serial} from {peer}: closing: {reason}; logged once per device",
                serial=self.serial,
                peer=self.peer,
                reason=reason,
            )

    def _note_drained(self, _: object) -> None:
        self.outcome = "drained"

    def _hello_timed_out(self) -> None:
        self._hello_deadline = None
        self._input(Input.HELLO_TIMEOUT)

    def _forget_hello_deadline(self) -> None:
        # Not kept once settled (the queue drops settled entries from its front).
        if self._hello_deadline is not None:
            self._hello_deadlines.settle(self._hello_deadline)
            self._hello_deadline = None

    def _note_hello_timeout(self, _: object) -> None:
        self.outcome = "hello_timeout"
        # A flood of bare connections must not become a flood of log lines.
        self._notices.tell(
            self.peer,
            "closing connection from {peer}: no hello within {seconds:g}s",
            seconds=self._hello_timeout,
        )

    # -- hello -----------------------------------------------------------------

    def _take_hello(self, frame: Frame) -> None:
        self._forget_hello_deadline()
        self.hello = hello = parse_hello(frame.payload)
        log.info(
            "device {serial} connected from {peer} (IMEI {imei}, FW {fw})",
            serial=hello.serial,
            peer=self.peer,
            imei=hello.imei,
            fw=hello.firmware,
        )
        self._observers.device_connected(hello, self.peer)

    def _check_identity(self, _: object) -> None:
        if self._certificate_names is None:
            return
        names = self._certificate_names()
        if str(self.hello.serial) not in names:
            # Raised before the route opens: nothing of this device is accepted.
            shown = ", ".join(sorted(names)) or "no name"
            raise ProtocolError(
                f"device certificate names {shown}, not the hello's serial {self.hello.serial}"
            )

    def _open_route(self, _: object) -> None:
        # A link failing while it opens feeds END_SERVER_LOST first.
        route = self._relay.open_route(self.hello, self._end_server_lost, self._rejected)
        self._input(Input.ROUTE_OPENED, route)

    def _keep_route(self, route: DeviceRoute) -> None:
        self._route = route

    def _close_route(self, route: DeviceRoute) -> None:
        route.close()

    def _answer_hello(self, _: object) -> None:
        self._channel.send(hello_response(self.hello, self._clock.seconds()))

    def _hello_again(self, frame: Frame) -> None:
        hello = parse_hello(frame.payload)
        if hello.serial != self.hello.serial:
            raise ProtocolError(f"second hello with another serial {hello.serial}")
        self._channel.send(hello_response(hello, self._clock.seconds()))

    def _refuse_before_hello(self, frame: Frame) -> None:
        raise ProtocolError(f"message type 0x{frame.type:02x} before hello")

    # -- canned replies and passed-on frames ------------------------------------

    def _answer_version(self, _: object) -> None:
        self._channel.send(VERSION_RESPONSE)

    def _answer_time(self, _: object) -> None:
        self._channel.send(time_response(self._clock.seconds()))

    def _forward(self, frame: Frame) -> None:
        # 0x26 (socket closing), stray 0x21, types we do not know: DM says
        # unknown messages can be ignored; raw TCP end servers still see them.
        if frame.type != MessageType.SOCKET_CLOSE:
            log.info(
                "device {serial} sent message type 0x{type:02x}; ignored"
                " (passed on to raw TCP end servers)",
                serial=self.serial,
                type=frame.type,
            )
        self._route.forward(frame)

    # -- records and commit ------------------------------------------------------

    def _keep(self, frame: Frame) -> None:
        shape = frame_shape(frame)
        if shape.short_fields:
            self._report_short_fields(shape.short_fields)
        if shape.bad_checksums:
            self._check_fixed_checksums(shape.bad_checksums)
        self._pending_bytes += len(frame.payload)
        if self._pending_bytes > self._max_uncommitted_bytes:
            raise ProtocolError(
                f"more than {self._max_uncommitted_bytes} bytes of records without"
                " a commit request"
            )
        if self._record_count + shape.record_count > self._max_records_per_upload:
            raise ProtocolError(
                f"more than max_records_per_upload {self._max_records_per_upload}"
                " records without a commit request"
            )
        # Decoded records cost many times their wire size (an empty field is
        # 2 bytes on the wire, an object here): the budget counts the cost.
        self._upload_memory += upload_cost(
            shape.record_count, shape.field_count, len(frame.payload)
        )
        if self._upload_memory > self._max_upload_memory:
            raise ProtocolError(
                f"records decoding to more than max_upload_memory"
                f" {self._max_upload_memory} bytes without a commit request"
            )
        self._frames.append(frame)
        if self._first_seq is None:
            self._first_seq = shape.first_seq
        self._record_count += shape.record_count
        self._unconfirmed_records += shape.record_count

    def _report_short_fields(self, short_fields: tuple[tuple[int, int], ...]) -> None:
        for field_id, size in short_fields:
            if self._relay.first_report(self.hello.serial, field_id):
                log.warn(
                    "device {serial} from {peer}: field {field_id} has {size}"
                    " bytes, fewer than its layout; forwarded as FType 257"
                    " (ShortOf {field_id}); logged once per device and field",
                    serial=self.serial,
                    peer=self.peer,
                    field_id=field_id,
                    size=size,
                )

    def _check_fixed_checksums(self, bad_checksums: tuple[int, ...]) -> None:
        for index in bad_checksums:
            # Forwarded anyway: the checksum rule is inferred, and refusing
            # the record would make the device resend it forever.
            log.warn(
                "device {serial} from {peer}: checksum mismatch in fixed"
                " record {index}; forwarding it unchanged",
                serial=self.serial,
                peer=self.peer,
                index=index,
            )

    def _deliver(self, _: object) -> None:
        upload = Upload(
            self.hello,
            tuple(self._frames),
            None,
            self._clock.seconds(),
            record_count=self._record_count,
            first_seq=self._first_seq,
        )
        # The byte budget is per upload: a long-lived connection starts afresh.
        self._frames, self._pending_bytes = [], 0
        self._record_count, self._first_seq = 0, None
        self._upload_memory = 0
        self._observers.upload_received(upload)
        self._delivery = delivery = self._route.deliver(upload)
        delivery.addCallbacks(
            self._delivered,
            self._not_delivered,
            callbackArgs=(upload,),
            errbackArgs=(upload,),
        )
        if self._delivery is delivery:
            # Still under way (a delivery answered at once needs no deadline).
            self._delivery_deadline = self._commit_deadlines.add(
                upload.received_at + self._commit_timeout, self._commit_timed_out
            )

    def _commit_timed_out(self) -> None:
        # Whatever the cancelled delivery then answers, even success, the
        # commit is withheld: the device has given up waiting.
        self._delivery_timed_out = True
        self._delivery.cancel()

    def _delivery_ended(self) -> bool:
        """Forget the delivery that just answered; whether it had timed out."""
        timed_out = self._delivery_timed_out
        if self._delivery_deadline is not None:
            self._commit_deadlines.settle(self._delivery_deadline)
        self._delivery = self._delivery_deadline = None
        self._delivery_timed_out = False
        return timed_out

    def _timeout_reason(self) -> str:
        return f"not confirmed within commit_timeout {self._commit_timeout:g}s"

    def _delivered(self, _: object, upload: Upload) -> None:
        if self._delivery_ended():
            self._input(Input.NOT_DELIVERED, (upload, "timeout", self._timeout_reason()))
            return
        self._input(Input.DELIVERED, upload)

    def _not_delivered(self, failure: Failure, upload: Upload) -> None:
        # A connector cancelled mid-delivery may fail with its own error (a
        # DeliveryFailed for the aborted POST), not CancelledError: a delivery
        # that timed out is a timeout whatever it says.
        if self._delivery_ended() or failure.check(TimeoutError, CancelledError):
            kind = "timeout"
            reason = self._timeout_reason()
        elif failure.check(DeliveryFailed):
            kind = failure.value.kind
            reason = describe_failure(failure)
        else:
            log.failure(
                "bug delivering for device {serial}", failure, serial=self.serial
            )
            kind = "internal"
            reason = describe_failure(failure)
        self._input(Input.NOT_DELIVERED, (upload, kind, reason))

    def _answer_commit(self, _: object) -> None:
        self._channel.send(COMMIT_SUCCESS)

    def _commit(self, upload: Upload) -> None:
        self._channel.send(COMMIT_SUCCESS)
        self._unconfirmed_records -= upload.record_count
        # No log line per commit: twistd logs every level, and commits are
        # the hot path; the registry counts them.
        self._route.committed(upload)
        self._observers.upload_committed(upload, self._clock.seconds() - upload.received_at)

    def _withhold(self, withheld: tuple[Upload, str, str]) -> None:
        upload, kind, reason = withheld
        self.outcome = "withheld"
        self._route.withheld(upload, reason)
        self._observers.commit_withheld(upload, kind, reason)
        log.warn(
            "device {serial} from {peer}: commit of {count} records withheld,"
            " closing so the device resends: {reason}",
            serial=self.serial,
            peer=self.peer,
            count=upload.record_count,
            reason=reason,
        )

    def _log_late_delivery(self, upload: Upload) -> None:
        log.info(
            "device {serial}: {count} records delivered after the device"
            " left; it will send them again",
            serial=self.serial,
            count=upload.record_count,
        )

    # -- frames waiting for a commit or an async session --------------------------

    def _wait(self, frame: Frame) -> None:
        # Reading goes on (devices wait for their answer; pausing and
        # resuming for every commit would cost two system calls) until
        # more than max_waiting_frames wait.
        self._waiting.append(frame)
        if len(self._waiting) > self._max_waiting_frames:
            self._channel.pause()

    def _replay_waiting(self, _: object) -> None:
        if self._waiting:  # reading is paused only with frames waiting (_wait)
            self._channel.resume()
        # A replayed commit or async request leaves IDLE: the rest waits again.
        while self._waiting and self._state is State.IDLE:
            self.frame_received(self._waiting.pop(0))

    # -- async session (commands) ---------------------------------------------

    def _start_async_session(self, _: object) -> None:
        session = Deferred.fromCoroutine(self._send_due_commands())
        session.addCallbacks(
            lambda _: self._input(Input.ASYNC_DONE), self._async_session_failed
        )

    async def _send_due_commands(self) -> None:
        try:
            commands = await self._route.due_commands().addTimeout(
                self._commit_timeout, self._clock
            )
        except Exception as error:
            log.warn(
                "device {serial}: no commands sent, registry unavailable: {reason}",
                serial=self.serial,
                reason=one_line(error),
            )
            commands = []
        route = self._route  # still there to record results once closed
        # The registry calls below outlive the connection; the session's state
        # after each says whether to carry on.
        for command in commands:
            if self._state is State.CLOSED:
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
                    reason=one_line(error),
                )
                return
            if sent is None:
                continue  # taken by another relay, or expired, meanwhile
            if self._state is State.CLOSED:
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
                return
            finally:
                self._awaited_response = None
            route.command_result(command.id, status)
            log.info(
                "device {serial}: command {id} ({type}) answered with status {status}",
                serial=self.serial,
                id=command.id,
                type=command.type,
                status=status,
            )

    def _answer_command(self, frame: Frame) -> None:
        if self._awaited_response is None:
            # No command out yet (the registry is being asked): wait with the rest.
            self._wait(frame)
            return
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
        self._observers.command_answered(self.hello, message_id, status)
        answer.callback(status)

    def _complete_async(self, _: object) -> None:
        self._channel.send(ASYNC_SESSION_COMPLETE)

    def _async_session_failed(self, failure: Failure) -> None:
        # CancelledError: the connection closed while a command awaited its answer.
        if not failure.check(CancelledError):
            log.failure(
                "bug in the async session of device {serial}", failure, serial=self.serial
            )
            self._input(Input.PROTOCOL_ERROR, "internal error in the async session")

    # -- teardown ------------------------------------------------------------

    def _note_protocol_error(self, reason: str) -> None:
        self.outcome = "protocol_error"
        self._observers.protocol_error(self.hello, self.peer, reason)

    def _warn_closing(self, reason: str) -> None:
        log.warn(
            "device {serial} from {peer}: closing: {reason}",
            serial=self.serial,
            peer=self.peer,
            reason=reason,
        )

    def _log_disconnect(self, _: object) -> None:
        self._observers.connection_closed(self.hello, self.peer, self.outcome)
        if self.hello is not None:
            log.info(
                "device {serial} from {peer} disconnected"
                " ({uncommitted} uncommitted records left with the device)",
                serial=self.serial,
                peer=self.peer,
                uncommitted=self._unconfirmed_records,
            )

    def _close(self, _: object) -> None:
        self._discard(None)
        self._channel.close()

    def _discard(self, _: object) -> None:
        self._forget_hello_deadline()
        self._frames, self._pending_bytes = [], 0
        self._record_count, self._first_seq = 0, None
        self._upload_memory = 0
        self._waiting.clear()
        if self._awaited_response is not None:
            self._awaited_response[1].cancel()
        if self._route is not None:
            route, self._route = self._route, None
            route.close()


def _compile(
    rows: Iterable[_Row], owner: type
) -> dict[State, dict[Input, tuple[State, tuple[Callable, ...]]]]:
    """The transition table as nested dicts, its outputs as functions of ``owner``."""
    transitions: dict[State, dict[Input, tuple[State, tuple[Callable, ...]]]] = {
        state: {} for state in State
    }
    for states, inputs, next_state, outputs in rows:
        functions = tuple(getattr(owner, name) for name in outputs)
        for state in states if isinstance(states, tuple) else (states,):
            for event in inputs if isinstance(inputs, tuple) else (inputs,):
                if event in transitions[state]:
                    if inputs is _ANY_OTHER:
                        continue
                    raise ValueError(f"two rows for {state} on {event}")
                transitions[state][event] = (next_state, functions)
    return transitions


DeviceSession._transitions = _compile(DeviceSession._TABLE, DeviceSession)


class PeerNotices:
    """
    Log lines about a peer, at most one per address per minute: the rest are
    counted and the count is told with the next line, so a flood of hostile
    connections costs a line a minute, not a line an attempt.
    """

    #: Addresses remembered before those quiet for a minute are forgotten.
    _REMEMBERED = 4096

    def __init__(self, clock: IReactorTime, interval: float = NOTICE_INTERVAL) -> None:
        self._clock = clock
        self._interval = interval
        # address -> (when last logged, lines held back since)
        self._last: dict[str, tuple[float, int]] = {}

    def tell(self, peer: str, format: str, **fields: object) -> None:
        """Log ``format`` (with ``peer`` and ``fields``) unless this address was told of lately."""
        address = _address_of(peer)
        now = self._clock.seconds()
        last, held_back = self._last.get(address, (None, 0))
        if last is not None and now - last < self._interval:
            self._last[address] = (last, held_back + 1)
            return
        if len(self._last) >= self._REMEMBERED:
            self._forget_quiet(now)
        self._last[address] = (now, 0)
        if held_back:
            format += " ({held_back} more like it from this address since the last line)"
        log.warn(format, peer=peer, held_back=held_back, **fields)

    def _forget_quiet(self, now: float) -> None:
        self._last = {
            address: told
            for address, told in self._last.items()
            if now - told[0] < self._interval
        }


def _host_of(address: object) -> str:
    """An address's host, or its text if it has none (not IP: a UNIX socket, say)."""
    host = getattr(address, "host", None)
    # str() only then: attrs' repr of an IP address is slow, and a storm
    # of connections pays it per connection.
    return str(address) if host is None else host


def _address_of(peer: str) -> str:
    """The host part of a ``host:port`` peer text (IPv6 hosts hold colons too)."""
    host, colon, _port = peer.rpartition(":")
    return host if colon else peer


_NOT_PAUSED: frozenset[str] = frozenset()

#: Seconds between two sweeps for connections silent for idle_timeout (or
#: idle_timeout, if shorter): a silent device is closed at most this late.
IDLE_SWEEP_INTERVAL = 1.0


class _Refused(Protocol):
    """A connection over the limit: closed at once, before it is read."""

    def connectionMade(self) -> None:
        self.transport.abortConnection()


@implementer(IPushProducer)
class DeviceProtocol(Protocol):
    """
    Feeds a device's bytes to its session; the session's channel to it.

    It is its transport's producer: once more than Twisted's write-buffer
    mark (64 KiB) waits to be sent to a device that does not read, the
    transport pauses it and it stops reading that device until the answers
    are gone, so a device sending requests without reading the replies
    cannot make the relay queue them without end.
    """

    def __init__(self, factory: DeviceFactory) -> None:
        self._factory = factory
        self._decoder = FrameDecoder(factory.max_message)
        self.session: DeviceSession | None = None
        #: When the device was last heard from (the factory's idle sweep reads it).
        self.last_heard = 0.0
        # Why reading is paused: "session" (frames waiting for a commit or
        # async session beyond max_waiting_frames), "writes" (answers queued
        # for the device beyond the mark).  A frozenset replaced on change:
        # one empty one is shared by every connection held, where a set each
        # took 216 bytes.
        self._paused_by: frozenset[str] = _NOT_PAUSED
        self._frame_deadline = None
        # Whether the factory was told the device said hello.
        self._greeted = False
        #: The peer's address, once final (at the first bytes): per-IP limits.
        self.address: str | None = None

    def connectionMade(self) -> None:
        self._peer_final = False
        self.session = DeviceSession(
            self._peer_text(),
            self,
            self._factory.relay,
            self._factory.clock,
            self._factory.commit_timeout,
            max_uncommitted_bytes=self._factory.max_uncommitted_bytes,
            max_waiting_frames=self._factory.max_waiting_frames,
            max_records_per_upload=self._factory.max_records_per_upload,
            max_upload_memory=self._factory.max_upload_memory,
            hello_timeout=self._factory.hello_timeout,
            notices=self._factory.notices,
            commit_deadlines=self._factory.commit_deadlines(),
            hello_deadlines=self._factory.hello_deadlines(),
            certificate_names=(
                self._certificate_names
                if self._factory.device_certificates
                and ISSLTransport.providedBy(self.transport)
                else None
            ),
        )
        self.transport.registerProducer(self, True)
        self._factory.connection_made(self)
        self._factory.relay.observers.connection_opened(self.session.peer)

    def _certificate_names(self) -> frozenset[str]:
        # Mutual TLS made the handshake require a certificate the CA signed.
        certificate = self.transport.getPeerCertificate()
        if certificate is None:
            return frozenset()
        from .tls import certificate_names

        return certificate_names(certificate.to_cryptography())

    def _peer_text(self) -> str:
        peer = self.transport.getPeer()
        host = _host_of(peer)
        port = getattr(peer, "port", None)
        return f"{host}:{port}" if port is not None else host

    def dataReceived(self, data: bytes) -> None:
        if not self._peer_final:
            # Behind haproxy: the PROXY header is parsed before the first
            # bytes reach us, so only now does getPeer() give the device.
            self.session.peer = self._peer_text()
            self._peer_final = True
            if not self._factory.admit(self, _address_of(self.session.peer)):
                return
        self._factory.heard(self)
        try:
            frames = self._decoder.feed(data)
        except FramingError as error:
            for frame in error.frames:
                self.session.frame_received(frame)
            self.session.protocol_error(str(error))
            return
        for frame in frames:
            self.session.frame_received(frame)
        if not self._greeted and self.session.hello is not None:
            self._greeted = True
            self._factory.hello_received(self)
        self._watch_partial_frame(restart=bool(frames))

    def _watch_partial_frame(self, restart: bool) -> None:
        # Every byte resets idle_timeout; this deadline, from a frame's first
        # byte, is what stops a device trickling one frame out for ever.
        armed = self._frame_deadline is not None and self._frame_deadline.active()
        if armed and (restart or not self._decoder.buffered):
            self._frame_deadline.cancel()
            armed = False
        if (
            not armed
            and self._decoder.buffered
            and self.session.state is not State.CLOSED
        ):
            self._frame_deadline = self._factory.clock.callLater(
                self._factory.frame_timeout, self._frame_timed_out
            )

    def _frame_timed_out(self) -> None:
        if self._paused_by:
            # The relay is not reading: the device is not to blame.
            self._watch_partial_frame(restart=True)
            return
        self._abort(
            "frame_timeout", "frame not completed within frame_timeout", self._factory.frame_timeout
        )

    def idle_timed_out(self) -> None:
        """Silent for idle_timeout (the factory's sweep found it)."""
        self._abort("idle", "silent for", self._factory.idle_timeout)

    def _abort(self, outcome: str, what: str, seconds: float) -> None:
        log.info(
            "device {serial} from {peer}: {what} {seconds:g}s, closing",
            serial=self.session.serial,
            peer=self.session.peer,
            what=what,
            seconds=seconds,
        )
        self.session.outcome = outcome
        self.transport.abortConnection()

    def shed(self) -> None:
        """Close this connection (no hello yet) to make room for another."""
        self.session.outcome = "shed"
        self.transport.abortConnection()

    def connectionLost(self, reason: Failure = None) -> None:
        if self._frame_deadline is not None and self._frame_deadline.active():
            self._frame_deadline.cancel()
        self.session.connection_lost()
        self._factory.connection_lost(self)

    # IPushProducer: the transport's write buffer

    def pauseProducing(self) -> None:
        self._pause_reading("writes")

    def resumeProducing(self) -> None:
        self._resume_reading("writes")

    def stopProducing(self) -> None:
        pass  # the connection is closing; connectionLost follows

    def _pause_reading(self, why: str) -> None:
        if not self._paused_by:
            self.transport.pauseProducing()
        self._paused_by = self._paused_by | {why}

    def _resume_reading(self, why: str) -> None:
        if why not in self._paused_by:
            return
        self._paused_by = self._paused_by - {why}
        if not self._paused_by:
            self.transport.resumeProducing()

    # DeviceChannel

    def send(self, data: bytes) -> None:
        write_now(self.transport, data)

    def close(self) -> None:
        self._factory.not_idle_watched(self)
        # A registered producer holds loseConnection open until it leaves.
        self.transport.unregisterProducer()
        self.transport.loseConnection()

    def pause(self) -> None:
        self._pause_reading("session")

    def resume(self) -> None:
        self._resume_reading("session")


class DeviceFactory(Factory):
    """
    Makes a :class:`DeviceProtocol` per device connection, within the
    connection limits.

    At ``max_connections`` a new connection sheds the oldest one that has
    not said hello yet (a device that did is never shed for a newcomer); only
    when every connection has said hello is the new one refused.  A peer
    address holding ``max_connections_per_ip`` is refused more, checked at
    its first bytes, when the address behind a PROXY header is known.
    Refusals are counted (``connection_refused``) and logged once per
    address per minute.  0 for either limit: no limit.
    """

    # No "Starting factory <object at 0x...>" lines: start-up says what runs.
    noisy = False

    def __init__(
        self,
        relay: Relay,
        clock: IReactorTime,
        *,
        commit_timeout: float,
        idle_timeout: float,
        max_message: int,
        max_uncommitted_bytes: int = MAX_UNCOMMITTED_BYTES,
        max_waiting_frames: int = MAX_WAITING_FRAMES,
        max_records_per_upload: int = MAX_RECORDS_PER_UPLOAD,
        max_upload_memory: int = MAX_UPLOAD_MEMORY,
        hello_timeout: float = HELLO_TIMEOUT,
        frame_timeout: float = FRAME_TIMEOUT,
        max_connections: int = MAX_CONNECTIONS,
        max_connections_per_ip: int = 0,
        device_certificates: bool = False,
    ) -> None:
        self.relay = relay
        self.clock = clock
        self.commit_timeout = commit_timeout
        self.idle_timeout = idle_timeout
        self.max_message = max_message
        self.max_uncommitted_bytes = max_uncommitted_bytes
        self.max_waiting_frames = max_waiting_frames
        # Fired once every connection is closed (drain).
        self._all_closed: list[Deferred[None]] = []
        self.max_records_per_upload = max_records_per_upload
        self.max_upload_memory = max_upload_memory
        self.hello_timeout = hello_timeout
        self.frame_timeout = frame_timeout
        self.max_connections = max_connections
        self.max_connections_per_ip = max_connections_per_ip
        #: Whether each TLS device's certificate must name its serial (mutual TLS).
        self.device_certificates = device_certificates
        self.notices = PeerNotices(clock)
        # The commit and hello deadlines of every connection, one timer per
        # timeout: a callLater per connection and upload was a heap of
        # thousands in the reactor.
        self._deadlines = DeadlineQueues(clock)
        # Open connections, oldest first; and those of them yet to say hello,
        # so the one to shed at the limit is found at once, not by a walk
        # over every connection (a flood at the limit would pay that walk
        # for each connection it makes).
        self._open: dict[DeviceProtocol, None] = {}
        self._awaiting_hello: dict[DeviceProtocol, None] = {}
        # The connections watched for idle_timeout, least recently heard
        # from first (each read moves one to the end), and the one timer
        # that sweeps them: a timer per connection, reset on every read,
        # cost 600 bytes per connection held and a heap update per read.
        self._by_last_heard: dict[DeviceProtocol, None] = {}
        self._idle_sweep = None
        self._per_address: dict[str, int] = {}

    def commit_deadlines(self) -> DeadlineQueue:
        """
        The commit deadlines new connections share (a changed
        ``commit_timeout`` starts a queue of its own).
        """
        return self._deadlines.for_timeout(self.commit_timeout)

    def hello_deadlines(self) -> DeadlineQueue:
        """The hello deadlines new connections share, likewise."""
        return self._deadlines.for_timeout(self.hello_timeout)

    @property
    def connections(self) -> int:
        """Device connections open now."""
        return len(self._open)

    def buildProtocol(self, addr: object) -> Protocol:
        if self.max_connections and len(self._open) >= self.max_connections:
            waiting = next(iter(self._awaiting_hello), None)
            if waiting is None:
                host = _host_of(addr)
                self._refuse(host, "max_connections", f"max_connections {self.max_connections} reached")
                return _Refused()
            self._open.pop(waiting)
            self._awaiting_hello.pop(waiting)
            waiting.shed()
        return DeviceProtocol(self)

    def drain(self, grace: float) -> Deferred[None]:
        """
        Ask every device connection to finish (a commit under way is answered
        or withheld first, see :meth:`DeviceSession.drain`); fire once all
        are closed.  Those still open after ``grace`` seconds are aborted:
        their uploads stay uncommitted, for the device to send again.
        """
        closed: Deferred[None] = Deferred()
        if not self._open:
            closed.callback(None)
            return closed
        self._all_closed.append(closed)
        for protocol in list(self._open):
            protocol.session.drain()
        late = self.clock.callLater(grace, self._abort_remaining, grace)
        return closed.addBoth(_cancel_timer, late)

    def _abort_remaining(self, grace: float) -> None:
        if self._open:
            log.warn(
                "{count} device connections still delivering after shutdown_grace"
                " {grace:g}s; closing them without a commit",
                count=len(self._open),
                grace=grace,
            )
        for protocol in list(self._open):
            protocol.transport.abortConnection()


    def connection_made(self, protocol: DeviceProtocol) -> None:
        """``protocol`` is connected: count it, and watch it for idle_timeout."""
        self._open[protocol] = None
        self._awaiting_hello[protocol] = None
        self.heard(protocol)

    def heard(self, protocol: DeviceProtocol) -> None:
        """``protocol``'s device sent bytes: its idle_timeout starts again."""
        protocol.last_heard = self.clock.seconds()
        by_last_heard = self._by_last_heard
        by_last_heard.pop(protocol, None)
        by_last_heard[protocol] = None
        if self._idle_sweep is None:
            self._idle_sweep = self.clock.callLater(self._sweep_interval(), self._sweep_idle)

    def not_idle_watched(self, protocol: DeviceProtocol) -> None:
        """``protocol`` is closing: no idle_timeout for it any more."""
        self._by_last_heard.pop(protocol, None)
        if not self._by_last_heard and self._idle_sweep is not None:
            if self._idle_sweep.active():
                self._idle_sweep.cancel()
            self._idle_sweep = None

    def _sweep_interval(self) -> float:
        return min(IDLE_SWEEP_INTERVAL, self.idle_timeout)

    def _sweep_idle(self) -> None:
        # Least recently heard from first: stop at the first still in time.
        self._idle_sweep = None
        silent_since = self.clock.seconds() - self.idle_timeout
        by_last_heard = self._by_last_heard
        while by_last_heard:
            protocol = next(iter(by_last_heard))
            if protocol.last_heard > silent_since:
                break
            del by_last_heard[protocol]
            protocol.idle_timed_out()
        if by_last_heard and self._idle_sweep is None:
            self._idle_sweep = self.clock.callLater(self._sweep_interval(), self._sweep_idle)

    def hello_received(self, protocol: DeviceProtocol) -> None:
        """``protocol``'s device said hello: it is never shed for a newcomer."""
        self._awaiting_hello.pop(protocol, None)

    def admit(self, protocol: DeviceProtocol, address: str) -> bool:
        """
        Whether ``protocol``, whose peer is now known to be ``address``, is
        within the per-address limit; if not, it is closed.
        """
        held = self._per_address.get(address, 0)
        if self.max_connections_per_ip and held >= self.max_connections_per_ip:
            protocol.session.outcome = "refused"
            self._refuse(
                protocol.session.peer,
                "max_connections_per_ip",
                f"max_connections_per_ip {self.max_connections_per_ip} reached",
            )
            protocol.transport.abortConnection()
            return False
        self._per_address[address] = held + 1
        protocol.address = address
        return True

    def connection_lost(self, protocol: DeviceProtocol) -> None:
        """``protocol`` is gone: it no longer counts; a drain waiting for the last one ends."""
        self._open.pop(protocol, None)
        self._awaiting_hello.pop(protocol, None)
        self.not_idle_watched(protocol)
        if protocol.address is not None:
            left = self._per_address.pop(protocol.address) - 1
            if left:
                self._per_address[protocol.address] = left
            protocol.address = None
        if not self._open:
            waiting, self._all_closed = self._all_closed, []
            for closed in waiting:
                closed.callback(None)

    def _refuse(self, peer: str, kind: str, reason: str) -> None:
        self.relay.observers.connection_refused(peer, kind)
        self.notices.tell(peer, "refusing connection from {peer}: {reason}", reason=reason)


def _cancel_timer(result: object, timer) -> object:
    if timer.active():
        timer.cancel()
    return result
