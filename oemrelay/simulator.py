"""
Simulated Digital Matter devices: a fleet speaking the real protocol.

Each :class:`SimulatedDevice` behaves like a tracker: it connects, sends its
hello, waits for the hello response, sends its records in 0x04 messages of
about 1 KiB and a commit request, then waits for the commit answer.
``06 01`` commits the upload; ``06 00``, a closed connection or no answer
within the commit timeout withholds it, and the device reconnects after a
back-off and sends the same records again (same sequence numbers), as
DM devices do.  A :class:`DeviceTrack` makes realistic records: a GPS fix
moving along a closed path, digital I/O, 16- and 32-bit analogues and now and
then a debug trace.

The device logic reaches the network only through a connect callable and a
transport, and time only through an injected clock, so it is unit-tested with
StringTransport and task.Clock.  :class:`Fleet` runs many devices in one
reactor; :func:`replay` sends captured frames once and reports the answers.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure

from .oneline import one_line
from .codec import (
    COMMIT_REQUEST,
    Analogues,
    DebugText,
    Digital,
    Frame,
    FrameDecoder,
    GpsFix,
    Hello,
    MessageType,
    ProtocolError,
    Record,
    encode_data_records,
    encode_frame,
    seconds_since_2013,
)

#: Devices keep each 0x04 message near 1 KiB (docs/protocol.rst, "Data records (0x04)").
MAX_RECORDS_PAYLOAD = 1000

#: Seconds between two records a simulated device logs.
LOG_INTERVAL = 30

#: Every this many records, one is a debug trace (reason 21) instead of a fix.
DEBUG_EVERY = 50

#: Log reasons used (docs/protocol.rst, "Log reasons").
REASON_PERIODIC = 11
REASON_DEBUG = 21

_EARTH_RADIUS_M = 6_371_000.0


class SimulatorError(Exception):
    """The simulation cannot go on; the message is one line for the user."""


# -- what a device logs ----------------------------------------------------------


class DeviceTrack:
    """
    What one simulated device logs: it drives round a circle of a few
    kilometres near its own centre, ignition on, battery slowly discharging.

    Values are derived from the serial, so two runs log the same records.
    """

    def __init__(self, serial: int) -> None:
        chance = random.Random(serial)
        # Centres scattered over a 2°×2° area east of Perth, WA.
        self._centre_lat = -31.0 - chance.random() * 2
        self._centre_lon = 116.0 + chance.random() * 2
        self._radius_m = 1000 + chance.random() * 4000
        self._speed_cms = chance.randint(800, 2500)
        self._angle = chance.random() * 2 * math.pi
        self._odometer_m = chance.randint(10_000_000, 90_000_000)

    def record(self, seq: int, time: int) -> Record:
        """Record ``seq`` logged at ``time`` (seconds since 2013)."""
        if seq % DEBUG_EVERY == DEBUG_EVERY - 1:
            text = f"Simulated trace: seq {seq}, odometer {self._odometer_m} m"
            return Record(seq, time, REASON_DEBUG, (DebugText(0x27, text.encode("ascii")),))
        step_m = self._speed_cms / 100 * LOG_INTERVAL
        self._angle = (self._angle + step_m / self._radius_m) % (2 * math.pi)
        self._odometer_m += int(step_m)
        north_m = self._radius_m * math.sin(self._angle)
        east_m = self._radius_m * math.cos(self._angle)
        latitude = self._centre_lat + math.degrees(north_m / _EARTH_RADIUS_M)
        longitude = self._centre_lon + math.degrees(
            east_m / (_EARTH_RADIUS_M * math.cos(math.radians(self._centre_lat)))
        )
        # Driving anticlockwise: the heading is the tangent, 0° north, clockwise.
        heading_deg = (math.degrees(-self._angle)) % 360
        battery_mv = 4200 - seq % 400
        fix = GpsFix(
            fix_time=time,
            latitude=round(latitude * 1e7),
            longitude=round(longitude * 1e7),
            altitude=20 + seq % 15,
            speed=self._speed_cms,
            speed_accuracy=2,
            heading=int(heading_deg / 2),  # the protocol's unit is 2°
            pdop=12,
            position_accuracy=5 + seq % 4,
            status=3,
        )
        return Record(
            seq,
            time,
            REASON_PERIODIC,
            (
                fix,
                Digital(inputs=0b1, outputs=0, status=0b11),
                Analogues(6, ((1, battery_mv), (3, 1380 - seq % 20), (4, 24), (5, 31))),
                Analogues(7, ((11, self._odometer_m // 10), (12, seq * LOG_INTERVAL))),
            ),
        )


def records_frames(records: Iterable[Record]) -> bytes:
    """``records`` as 0x04 messages of at most :data:`MAX_RECORDS_PAYLOAD` bytes each."""
    frames = []
    batch = b""
    for record in records:
        encoded = encode_data_records([record])
        if batch and len(batch) + len(encoded) > MAX_RECORDS_PAYLOAD:
            frames.append(encode_frame(MessageType.DATA_RECORDS, batch))
            batch = b""
        batch += encoded
    if batch:
        frames.append(encode_frame(MessageType.DATA_RECORDS, batch))
    return b"".join(frames)


def simulated_hello(serial: int) -> Hello:
    """The identity of simulated device ``serial``: a Dart (product 34) on FW 1.9."""
    return Hello(
        serial,
        imei=f"35000000{serial % 10_000_000:07d}",
        iccid=f"8999000000{serial % 10**10:010d}",
        product_id=34,
        hardware_rev=2,
        firmware_major=1,
        firmware_minor=9,
    )


# -- the fleet's figures -----------------------------------------------------------


def percentile(values: list[float], percent: float) -> float:
    """The nearest-rank ``percent`` percentile of ``values`` (0 when empty)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, math.ceil(percent / 100 * len(ordered)))
    return ordered[rank - 1]


@dataclass
class FleetStats:
    """What the fleet did, counted as it happens."""

    devices: int = 0
    uploads: int = 0
    records: int = 0
    withheld: int = 0
    reconnects: int = 0
    connected: int = 0
    #: Seconds from each commit request to its ``06 01``.
    latencies: list[float] = field(default_factory=list, repr=False)

    def summary(self, seconds: float) -> dict:
        """The end-of-run summary, as ``--json`` prints it."""
        return {
            "devices": self.devices,
            "uploads": self.uploads,
            "records_committed": self.records,
            "withheld": self.withheld,
            "reconnects": self.reconnects,
            "seconds": round(seconds, 3),
            "records_per_second": round(self.records / seconds, 1) if seconds > 0 else 0.0,
            "commit_latency_ms": {
                name: round(percentile(self.latencies, percent) * 1000, 2)
                for name, percent in (("p50", 50), ("p95", 95), ("p99", 99))
            },
        }


@dataclass(frozen=True)
class DeviceSettings:
    """How every device of a fleet behaves."""

    records: int = 10
    #: Committed uploads before the device is done; 0: until stopped.
    uploads: int = 1
    #: Seconds between a commit and the next upload on the same connection.
    interval: float = 0.0
    #: A steady rate (``--rate``): each device's first upload waits a part
    #: of ``interval`` of its own (from its serial), and each next one is
    #: due ``interval`` after the last was sent, not after its commit, so a
    #: fleet started together uploads evenly instead of in bursts.
    spread: bool = False
    #: Seconds before reconnecting after a withheld commit or failed connect.
    backoff: float = 1.0
    #: Seconds to wait for a hello response or a commit answer.
    reply_timeout: float = 30.0


# -- one device ----------------------------------------------------------------------

#: Connects a device: fires with its connection protocol, or fails.
Connect = Callable[["SimulatedDevice"], Deferred]


class SimulatedDevice:
    """
    One tracker across its connections: what it still has to upload, its
    next sequence number, and where it is in the exchange with the relay.

    States: ``idle`` (not connected), ``hello`` (awaiting the hello
    response), ``commit`` (awaiting the commit answer), ``waiting`` (between
    uploads, connected), ``done``.
    """

    def __init__(
        self,
        serial: int,
        settings: DeviceSettings,
        stats: FleetStats,
        clock: IReactorTime,
        connect: Connect,
        on_fatal: Callable[[str], None] = lambda reason: None,
    ) -> None:
        self.serial = serial
        self.state = "idle"
        self.finished: Deferred[None] = Deferred()
        self._settings = settings
        self._stats = stats
        self._clock = clock
        self._connect = connect
        self._on_fatal = on_fatal
        self._hello = simulated_hello(serial).to_frame()
        self._track = DeviceTrack(serial)
        self._next_seq = 1
        self._committed_uploads = 0
        #: The upload being attempted, kept until committed: (frames, record count).
        self._upload: tuple[bytes, int] | None = None
        self._transport = None
        self._timer = None
        self._commit_sent_at = 0.0
        self._stopping = False
        self._spread_done = False

    # -- driven by the fleet ----------------------------------------------------

    def start(self) -> None:
        """Connect and start uploading (unless stopped before its turn came)."""
        if not self._stopping:
            self._open()

    def stop(self) -> None:
        """Hang up and do nothing more; an upload under way stays uncounted."""
        self._stopping = True
        self._cancel_timer()
        if self._transport is not None:
            self._transport.abortConnection()
        self._finish()

    # -- driven by the connection ---------------------------------------------------

    def connection_made(self, transport) -> None:
        """Connected: say hello."""
        if self._stopping:
            transport.abortConnection()
            return
        self._transport = transport
        self._stats.connected += 1
        self.state = "hello"
        transport.write(self._hello)
        self._expect_reply()

    def frame_received(self, frame: Frame) -> None:
        """One message from the relay."""
        if frame.type == MessageType.HELLO_RESPONSE and self.state == "hello":
            self._cancel_timer()
            if self._settings.spread and not self._spread_done:
                self._spread_done = True
                self.state = "waiting"
                phase = random.Random(self.serial).random() * self._settings.interval
                self._timer = self._clock.callLater(phase, self._next_upload)
                return
            self._send_upload()
        elif frame.type == MessageType.COMMIT_RESPONSE and self.state == "commit":
            self._cancel_timer()
            if frame.payload[:1] == b"\x01":
                self._committed()
            else:
                self._withhold()
        # Anything else (an async message, say) a simple device ignores.

    def connection_lost(self) -> None:
        """The connection ended, by either side."""
        self._transport = None
        self._cancel_timer()
        if self._stopping or self.state == "done":
            return
        if self.state == "commit":
            self._stats.withheld += 1
        self.state = "idle"
        self._retry_later()

    def connect_failed(self, reason: str) -> None:
        """The connection could not be made."""
        if self._stopping:
            return
        if not self._stats.connected:
            # Nothing ever connected: a wrong address, not a busy relay.
            self._on_fatal(reason)
            return
        self._retry_later()

    # -- the exchange ----------------------------------------------------------------

    def _open(self) -> None:
        self.state = "idle"
        connecting = self._connect(self)
        connecting.addErrback(lambda failure: self.connect_failed(_reason(failure)))

    def _retry_later(self) -> None:
        self._stats.reconnects += 1
        self._timer = self._clock.callLater(self._settings.backoff, self._reopen)

    def _reopen(self) -> None:
        self._timer = None
        self._open()

    def _send_upload(self) -> None:
        if self._upload is None:
            now = seconds_since_2013(self._clock.seconds())
            count = self._settings.records
            records = [
                # Logged every LOG_INTERVAL up to now; never before the 2013 epoch.
                self._track.record(
                    self._next_seq + i, max(0, now - (count - 1 - i) * LOG_INTERVAL)
                )
                for i in range(count)
            ]
            self._next_seq += count
            self._upload = (records_frames(records) + COMMIT_REQUEST, count)
        self.state = "commit"
        self._commit_sent_at = self._clock.seconds()
        self._transport.write(self._upload[0])
        self._expect_reply()

    def _committed(self) -> None:
        self._stats.uploads += 1
        self._stats.records += self._upload[1]
        self._stats.latencies.append(self._clock.seconds() - self._commit_sent_at)
        self._upload = None
        self._committed_uploads += 1
        if self._settings.uploads and self._committed_uploads >= self._settings.uploads:
            self.state = "done"
            self._transport.loseConnection()
            self._finish()
            return
        self.state = "waiting"
        wait = self._settings.interval
        if self._settings.spread:
            # A cadence, as a device logging on a timer keeps: the next upload
            # is due ``interval`` after this one was sent, however long its
            # commit took (at once if longer).  Waiting the interval after
            # each commit would let devices answered together come back
            # together, and a steady rate would bunch up into bursts.
            wait = max(0.0, self._commit_sent_at + wait - self._clock.seconds())
        self._timer = self._clock.callLater(wait, self._next_upload)

    def _next_upload(self) -> None:
        self._timer = None
        self._send_upload()

    def _withhold(self) -> None:
        # Counted once, here; the close that follows finds state "idle".
        self._stats.withheld += 1
        self.state = "idle"
        self._transport.loseConnection()

    def _expect_reply(self) -> None:
        self._timer = self._clock.callLater(self._settings.reply_timeout, self._no_reply)

    def _no_reply(self) -> None:
        self._timer = None
        if self._transport is not None:
            self._transport.abortConnection()

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _finish(self) -> None:
        if not self.finished.called:
            self.finished.callback(None)


def _reason(failure: Failure) -> str:
    """One line for a connection failure, without Twisted's class prefix."""
    value = failure.value
    text = one_line(value)
    return text or type(value).__name__


class _DeviceConnection(Protocol):
    """The thin protocol of one simulated device's connection."""

    def __init__(self, device: SimulatedDevice) -> None:
        self._device = device
        self._decoder = FrameDecoder()

    def connectionMade(self) -> None:
        self._device.connection_made(self.transport)

    def dataReceived(self, data: bytes) -> None:
        try:
            frames = self._decoder.feed(data)
        except ProtocolError:
            self.transport.abortConnection()
            return
        for frame in frames:
            self._device.frame_received(frame)

    def connectionLost(self, reason=None) -> None:
        self._device.connection_lost()


def endpoint_connect(endpoint_for: Callable[[], object]) -> Connect:
    """A :data:`Connect` that opens a new connection from ``endpoint_for()``."""

    def connect(device: SimulatedDevice) -> Deferred:
        factory = Factory.forProtocol(lambda: _DeviceConnection(device))
        factory.noisy = False
        return endpoint_for().connect(factory)

    return connect


# -- the fleet --------------------------------------------------------------------------

#: Devices started per second, so thousands do not all SYN at once.
RAMP_PER_SECOND = 1000


class Fleet:
    """
    ``count`` devices with serials from ``serial_base``, started at
    :data:`RAMP_PER_SECOND`, run until each is done or :meth:`stop`.
    """

    def __init__(
        self,
        clock: IReactorTime,
        connect: Connect,
        count: int,
        settings: DeviceSettings,
        serial_base: int = 100000,
    ) -> None:
        self.stats = FleetStats(devices=count)
        self._clock = clock
        self._fatal: str | None = None
        self._started_at = 0.0
        self._ended_at: float | None = None
        self.devices = [
            SimulatedDevice(
                serial_base + index, settings, self.stats, clock, connect, self._fail
            )
            for index in range(count)
        ]

    async def run(self) -> dict:
        """
        Run every device; the summary once all are done.

        :raises SimulatorError: if no device could connect at all.
        """
        self._started_at = self._clock.seconds()
        for index, device in enumerate(self.devices):
            self._clock.callLater(index / RAMP_PER_SECOND, device.start)
        for device in self.devices:
            await device.finished
        if self._fatal is not None:
            raise SimulatorError(self._fatal)
        return self.summary()

    def stop(self) -> None:
        """Stop every device now (``--duration`` has passed)."""
        if self._ended_at is None:
            self._ended_at = self._clock.seconds()
        for device in self.devices:
            device.stop()

    def summary(self) -> dict:
        """The summary so far."""
        ended = self._ended_at if self._ended_at is not None else self._clock.seconds()
        return self.stats.summary(ended - self._started_at)

    def _fail(self, reason: str) -> None:
        if self._fatal is None:
            self._fatal = reason
            self.stop()


# -- replay --------------------------------------------------------------------------------

_COMMIT_ANSWERS = {b"\x01": "committed", b"\x00": "withheld (06 00)"}


def describe_answer(frame: Frame) -> str:
    """One line for a message the relay sent."""
    try:
        name = MessageType(frame.type).name.lower().replace("_", " ")
    except ValueError:
        name = "unknown message"
    line = f"0x{frame.type:02x} {name}: {frame.payload.hex() or '(empty)'}"
    if frame.type == MessageType.COMMIT_RESPONSE:
        line += f" -> {_COMMIT_ANSWERS.get(frame.payload, 'not committed')}"
    return line


class _ReplayConnection(Protocol):
    """Sends the captured bytes, then collects answers until the commit answer."""

    def __init__(self, data: bytes, answered: Deferred) -> None:
        self._data = data
        self._answered = answered
        self._decoder = FrameDecoder()
        self.answers: list[Frame] = []

    def connectionMade(self) -> None:
        self.transport.write(self._data)

    def dataReceived(self, data: bytes) -> None:
        try:
            frames = self._decoder.feed(data)
        except ProtocolError as error:
            self._end(f"unreadable answer: {error}")
            return
        for frame in frames:
            self.answers.append(frame)
            if frame.type == MessageType.COMMIT_RESPONSE:
                self._end(None)
                return

    def connectionLost(self, reason=None) -> None:
        self._end("the relay closed the connection before a commit answer")

    def _end(self, problem: str | None) -> None:
        if not self._answered.called:
            self._answered.callback(problem)
            self.transport.loseConnection()


def replay_bytes(frames: list[Frame], serial: int) -> bytes:
    """The captured frames, after a simulated hello if they have none, and a commit request."""
    data = b"".join(frame.to_bytes() for frame in frames)
    if not any(frame.type == MessageType.HELLO for frame in frames):
        data = simulated_hello(serial).to_frame() + data
    if not frames or frames[-1].type != MessageType.COMMIT_REQUEST:
        data += COMMIT_REQUEST
    return data


async def replay(
    clock: IReactorTime, endpoint, frames: list[Frame], serial: int, timeout: float
) -> tuple[list[Frame], bool, str | None]:
    """
    Send ``frames`` once: the relay's answers, whether it committed, and
    what went wrong if it did not answer.

    :raises SimulatorError: if the relay cannot be reached.
    """
    answered: Deferred[str | None] = Deferred()
    connection = _ReplayConnection(replay_bytes(frames, serial), answered)
    factory = Factory.forProtocol(lambda: connection)
    factory.noisy = False
    try:
        await endpoint.connect(factory)
    except Exception as error:
        raise SimulatorError(_reason(Failure(error))) from None
    timer = clock.callLater(
        timeout, lambda: connection._end(f"no commit answer within {timeout:g}s")
    )
    problem = await answered
    if timer.active():
        timer.cancel()
    committed = any(
        f.type == MessageType.COMMIT_RESPONSE and f.payload == b"\x01"
        for f in connection.answers
    )
    return connection.answers, committed, problem
