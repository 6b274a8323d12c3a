"""
Tests for oemrelay.simulator: simulated devices on StringTransport and task.Clock.
"""

from __future__ import annotations

import random

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from oemrelay.codec import (
    COMMIT_REQUEST,
    DebugText,
    Frame,
    FrameDecoder,
    GpsFix,
    MessageType,
    Record,
    encode_frame,
    hello_response,
    parse_data_records,
    parse_hello,
)
from oemrelay.simulator import (
    DEBUG_EVERY,
    MAX_RECORDS_PAYLOAD,
    REASON_DEBUG,
    DeviceSettings,
    DeviceTrack,
    Fleet,
    FleetStats,
    SimulatedDevice,
    SimulatorError,
    describe_answer,
    percentile,
    records_frames,
    replay,
    replay_bytes,
    simulated_hello,
)

from .vectors import capture

HELLO_RESPONSE = hello_response(simulated_hello(1), 1_700_000_000)
COMMITTED = encode_frame(MessageType.COMMIT_RESPONSE, b"\x01")
REFUSED = encode_frame(MessageType.COMMIT_RESPONSE, b"\x00")


def frames_of(data: bytes) -> list[Frame]:
    """The frames in ``data``, all complete."""
    decoder = FrameDecoder()
    frames = decoder.feed(data)
    assert decoder.buffered == 0
    return frames


def sent_seqs(data: bytes) -> list[int]:
    """Sequence numbers of every record in the 0x04 frames of ``data``."""
    return [
        record.seq
        for frame in frames_of(data)
        if frame.type == MessageType.DATA_RECORDS
        for record in parse_data_records(frame.payload)
    ]


def answer(device: SimulatedDevice, data: bytes) -> None:
    """The relay sends ``data`` to ``device``."""
    for frame in frames_of(data):
        device.frame_received(frame)


class DeviceTrackTests(SynchronousTestCase):
    """The records a simulated device logs."""

    def test_gps_moves_along_a_circle(self) -> None:
        """Consecutive fixes differ and all lie within a few kilometres of one centre."""
        track = DeviceTrack(7)
        fixes = [track.record(seq, seq * 30).fields[0] for seq in range(1, 40)]
        self.assertTrue(all(isinstance(f, GpsFix) for f in fixes))
        positions = [(f.latitude, f.longitude) for f in fixes]
        self.assertEqual(len(set(positions)), len(positions))
        lat = [p[0] / 1e7 for p in positions]
        self.assertLess(max(lat) - min(lat), 0.1)  # 0.1° ≈ 11 km: a circle, not a drift

    def test_debug_trace_now_and_then(self) -> None:
        """Exactly one record in every DEBUG_EVERY is a reason-21 debug trace."""
        track = DeviceTrack(7)
        records = [track.record(seq, 0) for seq in range(1, 2 * DEBUG_EVERY + 1)]
        debug = [r for r in records if r.reason == REASON_DEBUG]
        self.assertEqual([r.seq for r in debug], [DEBUG_EVERY - 1, 2 * DEBUG_EVERY - 1])
        self.assertIsInstance(debug[0].fields[0], DebugText)

    def test_record_has_io_and_both_analogue_widths(self) -> None:
        """A periodic record carries digital I/O and 16- and 32-bit analogues, and survives the codec."""
        record = DeviceTrack(3).record(1, 1000)
        ids = [f.FIELD_ID for f in record.fields]
        self.assertEqual(ids, [0, 2, 6, 7])
        self.assertEqual(parse_data_records(frames_of(records_frames([record]))[0].payload), [record])

    def test_same_serial_same_records(self) -> None:
        """Two tracks of one serial log the same records; another serial does not."""
        self.assertEqual(DeviceTrack(5).record(1, 0), DeviceTrack(5).record(1, 0))
        self.assertNotEqual(DeviceTrack(5).record(1, 0), DeviceTrack(6).record(1, 0))


class RecordsFramesTests(SynchronousTestCase):
    """Splitting records into 0x04 messages."""

    def test_messages_stay_within_limit(self) -> None:
        """Many records become several 0x04 messages, none over the limit, records in order."""
        track = DeviceTrack(1)
        records = [track.record(seq, 0) for seq in range(1, 101)]
        frames = frames_of(records_frames(records))
        self.assertGreater(len(frames), 1)
        self.assertTrue(all(len(f.payload) <= MAX_RECORDS_PAYLOAD for f in frames))
        self.assertEqual(sent_seqs(records_frames(records)), list(range(1, 101)))

    def test_exact_fit_stays_in_one_message(self) -> None:
        """Records totalling exactly MAX_RECORDS_PAYLOAD bytes are one message; one byte more makes two."""

        def sized(seq: int, size: int) -> Record:
            # 11 bytes of record header, 4 of (extended) field header, 2 of code.
            return Record(seq, 0, REASON_DEBUG, (DebugText(1, b"x" * (size - 17)),))

        half = MAX_RECORDS_PAYLOAD // 2
        exact = frames_of(records_frames([sized(1, half), sized(2, MAX_RECORDS_PAYLOAD - half)]))
        self.assertEqual([len(f.payload) for f in exact], [MAX_RECORDS_PAYLOAD])
        over = frames_of(records_frames([sized(1, half), sized(2, MAX_RECORDS_PAYLOAD - half + 1)]))
        self.assertEqual(len(over), 2)


class PercentileTests(SynchronousTestCase):
    """Nearest-rank percentiles of the commit latencies."""

    def test_nearest_rank(self) -> None:
        """Of 1..100, p50 is 50, p95 is 95, p99 is 99 and p100 is 100."""
        values = [float(v) for v in range(100, 0, -1)]
        self.assertEqual(
            [percentile(values, p) for p in (50, 95, 99, 100)], [50.0, 95.0, 99.0, 100.0]
        )

    def test_small_and_empty(self) -> None:
        """Of two values p50 is the lower; of one it is that one; of none it is 0."""
        self.assertEqual(percentile([2.0, 1.0], 50), 1.0)
        self.assertEqual(percentile([3.0], 99), 3.0)
        self.assertEqual(percentile([], 50), 0.0)

    def test_summary_in_milliseconds(self) -> None:
        """The summary gives latencies in ms and records per second over the run."""
        stats = FleetStats(devices=1, uploads=2, records=20, latencies=[0.010, 0.020])
        summary = stats.summary(4.0)
        self.assertEqual(summary["commit_latency_ms"], {"p50": 10.0, "p95": 20.0, "p99": 20.0})
        self.assertEqual(summary["records_per_second"], 5.0)
        self.assertEqual(stats.summary(0)["records_per_second"], 0.0)


class _Harness:
    """One device whose connections are StringTransports opened on demand."""

    def __init__(self, settings: DeviceSettings, connects: list | None = None) -> None:
        self.clock = Clock()
        self.stats = FleetStats(devices=1)
        self.transports: list[StringTransport] = []
        self.fatal: list[str] = []
        self._connects = connects  # results for the coming connects, None: succeed
        self.device = SimulatedDevice(
            1, settings, self.stats, self.clock, self._connect, self.fatal.append
        )

    def _connect(self, device: SimulatedDevice) -> Deferred:
        if self._connects:
            return self._connects.pop(0)
        transport = StringTransport()
        self.transports.append(transport)
        device.connection_made(transport)
        return succeed(None)

    @property
    def transport(self) -> StringTransport:
        return self.transports[-1]

    def sent(self) -> bytes:
        """What the device wrote since the last call, on its current connection."""
        data = self.transport.value()
        self.transport.clear()
        return data

    def close(self) -> None:
        """The connection ends."""
        self.device.connection_lost()

    def greet(self) -> bytes:
        """Answer the hello; the upload it sends."""
        self.sent()
        answer(self.device, HELLO_RESPONSE)
        return self.sent()


class SimulatedDeviceTests(SynchronousTestCase):
    """One simulated device's exchange with the relay."""

    def test_hello_first_then_waits(self) -> None:
        """On connecting the device sends its hello and nothing else until the hello response."""
        harness = _Harness(DeviceSettings(records=3))
        harness.device.start()
        frames = frames_of(harness.sent())
        self.assertEqual([f.type for f in frames], [MessageType.HELLO])
        self.assertEqual(parse_hello(frames[0].payload).serial, 1)
        harness.clock.advance(5)
        self.assertEqual(harness.sent(), b"")

    def test_upload_after_hello_response(self) -> None:
        """After the hello response come R records and then one commit request."""
        harness = _Harness(DeviceSettings(records=3))
        harness.device.start()
        upload = harness.greet()
        self.assertEqual(sent_seqs(upload), [1, 2, 3])
        self.assertTrue(upload.endswith(COMMIT_REQUEST))
        self.assertEqual(upload.count(COMMIT_REQUEST), 1)

    def test_commit_counts_and_finishes(self) -> None:
        """06 01 counts the upload, its records and latency; the last upload closes and finishes."""
        harness = _Harness(DeviceSettings(records=3, uploads=1))
        harness.device.start()
        harness.greet()
        harness.clock.advance(0.25)
        answer(harness.device, COMMITTED)
        self.assertEqual((harness.stats.uploads, harness.stats.records), (1, 3))
        self.assertEqual(harness.stats.latencies, [0.25])
        self.assertTrue(harness.transport.disconnecting)
        self.successResultOf(harness.device.finished)

    def test_next_upload_continues_sequence(self) -> None:
        """The next upload, after the interval on the same connection, has the next sequence numbers."""
        harness = _Harness(DeviceSettings(records=2, uploads=2, interval=10))
        harness.device.start()
        harness.greet()
        answer(harness.device, COMMITTED)
        harness.clock.advance(9.9)
        self.assertEqual(harness.sent(), b"")
        harness.clock.advance(0.1)
        self.assertEqual(sent_seqs(harness.sent()), [3, 4])
        self.assertEqual(len(harness.transports), 1)
        self.assertNoResult(harness.device.finished)

    def test_spread_first_upload_waits_its_phase(self) -> None:
        """
        With spread, the first upload waits the device's own part of the
        interval; each next one is due the interval after the last was sent,
        at once if its commit took longer.
        """
        harness = _Harness(DeviceSettings(records=2, uploads=0, interval=10, spread=True))
        phase = random.Random(1).random() * 10
        harness.device.start()
        self.assertEqual(harness.greet(), b"")
        harness.clock.advance(phase - 0.001)
        self.assertEqual(harness.sent(), b"")
        harness.clock.advance(0.001)
        self.assertEqual(sent_seqs(harness.sent()), [1, 2])
        harness.clock.advance(4)
        answer(harness.device, COMMITTED)  # 4 s after it was sent
        harness.clock.advance(5.9)
        self.assertEqual(harness.sent(), b"")
        harness.clock.advance(0.2)  # 10 s after the first was sent, 6 after its commit
        self.assertEqual(sent_seqs(harness.sent()), [3, 4])
        harness.clock.advance(12)
        answer(harness.device, COMMITTED)  # later than the interval: the next goes at once
        harness.clock.advance(0)
        self.assertEqual(sent_seqs(harness.sent()), [5, 6])

    def test_refused_commit_resends_same_records(self) -> None:
        """06 00: counted withheld once, the device hangs up, reconnects after the back-off and resends."""
        harness = _Harness(DeviceSettings(records=2, backoff=3))
        harness.device.start()
        first = sent_seqs(harness.greet())
        answer(harness.device, REFUSED)
        self.assertTrue(harness.transport.disconnecting)
        harness.close()
        self.assertEqual((harness.stats.withheld, harness.stats.uploads), (1, 0))
        harness.clock.advance(2.9)
        self.assertEqual(len(harness.transports), 1)
        harness.clock.advance(0.1)
        self.assertEqual(len(harness.transports), 2)
        self.assertEqual(sent_seqs(harness.greet()), first)
        self.assertEqual(harness.stats.reconnects, 1)

    def test_close_while_awaiting_commit_is_withheld(self) -> None:
        """The relay closing before the commit answer is one withheld upload, resent later."""
        harness = _Harness(DeviceSettings(records=2, backoff=1))
        harness.device.start()
        first = sent_seqs(harness.greet())
        harness.close()
        self.assertEqual(harness.stats.withheld, 1)
        harness.clock.advance(1)
        self.assertEqual(sent_seqs(harness.greet()), first)

    def test_no_answer_within_timeout(self) -> None:
        """No commit answer within reply_timeout: the device aborts the connection."""
        harness = _Harness(DeviceSettings(records=2, reply_timeout=30))
        harness.device.start()
        harness.greet()
        harness.clock.advance(29.9)
        self.assertFalse(harness.transport.disconnecting)
        harness.clock.advance(0.1)
        self.assertTrue(harness.transport.disconnecting)

    def test_commit_answer_when_not_asked_is_ignored(self) -> None:
        """A 06 01 before any commit request counts nothing."""
        harness = _Harness(DeviceSettings(records=2))
        harness.device.start()
        answer(harness.device, COMMITTED)
        self.assertEqual(harness.stats.uploads, 0)

    def test_first_connect_failure_is_fatal(self) -> None:
        """A failed connect before any device ever connected reports a fatal reason."""
        harness = _Harness(DeviceSettings(), [fail(ConnectionRefusedError("refused"))])
        harness.device.start()
        self.assertEqual(len(harness.fatal), 1)
        self.assertIn("refused", harness.fatal[0])

    def test_later_connect_failure_retries(self) -> None:
        """Once a device has connected, a failed connect is retried after the back-off."""
        harness = _Harness(DeviceSettings(backoff=2), [fail(ConnectionRefusedError())])
        harness.stats.connected = 1
        harness.device.start()
        self.assertEqual(harness.fatal, [])
        harness.clock.advance(2)
        self.assertEqual(len(harness.transports), 1)

    def test_stop_while_waiting(self) -> None:
        """Stopping between uploads aborts the connection, finishes, and sends nothing more."""
        harness = _Harness(DeviceSettings(records=2, uploads=0, interval=5))
        harness.device.start()
        harness.greet()
        answer(harness.device, COMMITTED)
        harness.device.stop()
        harness.close()
        harness.clock.advance(60)
        self.assertEqual(harness.sent(), b"")
        self.assertEqual(len(harness.transports), 1)
        self.successResultOf(harness.device.finished)


class _AnsweringTransport(StringTransport):
    """A connection to an in-memory relay that answers hellos and commits."""

    def __init__(self, device: SimulatedDevice, commit: bytes) -> None:
        super().__init__()
        self._device = device
        self._commit = commit
        self._decoder = FrameDecoder()

    def write(self, data: bytes) -> None:
        super().write(data)
        for frame in self._decoder.feed(data):
            if frame.type == MessageType.HELLO:
                answer(self._device, HELLO_RESPONSE)
            elif frame.type == MessageType.COMMIT_REQUEST:
                answer(self._device, self._commit)


class FleetTests(SynchronousTestCase):
    """A fleet of devices on an in-memory relay."""

    def fleet(self, count: int, settings: DeviceSettings, commit: bytes = COMMITTED):
        clock = Clock()
        serials = []

        def connect(device: SimulatedDevice) -> Deferred:
            serials.append(device.serial)
            device.connection_made(_AnsweringTransport(device, commit))
            return succeed(None)

        return clock, Fleet(clock, connect, count, settings, serial_base=500), serials

    def test_every_device_uploads(self) -> None:
        """Three devices of two uploads of four records: six uploads, 24 records, serials from the base."""
        clock, fleet, serials = self.fleet(3, DeviceSettings(records=4, uploads=2))
        running = Deferred.fromCoroutine(fleet.run())
        clock.advance(1)
        summary = self.successResultOf(running)
        self.assertEqual(
            (summary["devices"], summary["uploads"], summary["records_committed"]), (3, 6, 24)
        )
        self.assertEqual(summary["withheld"], 0)
        self.assertEqual(sorted(serials), [500, 501, 502])

    def test_stop_ends_the_run(self) -> None:
        """A fleet refused every commit runs until stopped, counting withheld uploads and reconnects."""
        clock, fleet, _ = self.fleet(2, DeviceSettings(records=1, uploads=0, backoff=1), REFUSED)
        running = Deferred.fromCoroutine(fleet.run())
        clock.advance(0.5)
        for device in fleet.devices:
            device.connection_lost()  # the refused devices hang up
        clock.pump([1])
        self.assertNoResult(running)
        fleet.stop()
        summary = self.successResultOf(running)
        self.assertEqual(summary["uploads"], 0)
        self.assertGreaterEqual(summary["withheld"], 2)
        self.assertGreaterEqual(summary["reconnects"], 2)

    def test_unreachable_relay_fails_the_run(self) -> None:
        """If no device can connect at all, the run fails with the reason."""
        clock = Clock()
        fleet = Fleet(
            clock, lambda device: fail(ConnectionRefusedError("nobody home")), 3, DeviceSettings()
        )
        running = Deferred.fromCoroutine(fleet.run())
        clock.advance(1)
        failure = self.failureResultOf(running, SimulatorError)
        self.assertIn("nobody home", str(failure.value))


class _FakeEndpoint:
    """Connects to a StringTransport."""

    def __init__(self, error: Exception | None = None) -> None:
        self.transport = StringTransport()
        self.protocol = None
        self._error = error

    def connect(self, factory) -> Deferred:
        if self._error:
            return fail(self._error)
        self.protocol = factory.buildProtocol(None)
        self.protocol.makeConnection(self.transport)
        return succeed(self.protocol)


class ReplayTests(SynchronousTestCase):
    """Sending captured frames once."""

    def test_hello_and_commit_added(self) -> None:
        """Frames without a hello get a simulated one first and a commit request last."""
        frames = frames_of(capture("data-0x04-2-records-2021-denmark"))
        sent = frames_of(replay_bytes(frames, 42))
        self.assertEqual(
            [f.type for f in sent],
            [MessageType.HELLO, MessageType.DATA_RECORDS, MessageType.COMMIT_REQUEST],
        )
        self.assertEqual(parse_hello(sent[0].payload).serial, 42)

    def test_capture_with_hello_and_commit_sent_as_is(self) -> None:
        """A capture that has its hello and ends in a commit request is sent unchanged."""
        data = capture("hello-49-byte-dart") + capture("data-0x04-2-records-2021-denmark") + COMMIT_REQUEST
        self.assertEqual(replay_bytes(frames_of(data), 42), data)

    def test_committed(self) -> None:
        """The relay's 01 and 06 01 are collected and the replay reports committed."""
        clock = Clock()
        endpoint = _FakeEndpoint()
        frames = frames_of(capture("data-0x04-2-records-2021-denmark"))
        done = Deferred.fromCoroutine(replay(clock, endpoint, frames, 1, 10))
        endpoint.protocol.dataReceived(HELLO_RESPONSE + COMMITTED)
        answers, committed, problem = self.successResultOf(done)
        self.assertEqual([f.type for f in answers], [MessageType.HELLO_RESPONSE, MessageType.COMMIT_RESPONSE])
        self.assertEqual((committed, problem), (True, None))
        self.assertEqual(endpoint.transport.value(), replay_bytes(frames, 1))

    def test_closed_or_silent_is_not_committed(self) -> None:
        """A close before the commit answer, or silence past the timeout, is reported, not committed."""
        clock = Clock()
        endpoint = _FakeEndpoint()
        done = Deferred.fromCoroutine(replay(clock, endpoint, [], 1, 10))
        endpoint.protocol.connectionLost(None)
        _, committed, problem = self.successResultOf(done)
        self.assertFalse(committed)
        self.assertIn("closed", problem)

        endpoint = _FakeEndpoint()
        done = Deferred.fromCoroutine(replay(clock, endpoint, [], 1, 10))
        clock.advance(9.9)
        self.assertNoResult(done)
        clock.advance(0.1)
        self.assertIn("within 10s", self.successResultOf(done)[2])

    def test_unreachable(self) -> None:
        """A failed connect is a SimulatorError with the reason."""
        done = Deferred.fromCoroutine(
            replay(Clock(), _FakeEndpoint(ConnectionRefusedError("no")), [], 1, 10)
        )
        self.failureResultOf(done, SimulatorError)

    def test_describe_answer(self) -> None:
        """Answers are named; 06 01 says committed, 06 00 withheld."""
        self.assertEqual(
            describe_answer(frames_of(COMMITTED)[0]), "0x06 commit response: 01 -> committed"
        )
        self.assertIn("withheld", describe_answer(frames_of(REFUSED)[0]))
        self.assertEqual(describe_answer(Frame(0x7E, b"")), "0x7e unknown message: (empty)")

