"""
Tests for :mod:`oemrelay.live` (the live view's events, its bounds, and
recordings) and :mod:`oemrelay.activity` (the fleet's recent figures), fed
the relay's events directly, on a fake clock.
"""

from __future__ import annotations

import json

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from oemrelay import live as live_module
from oemrelay.activity import WINDOW_MINUTES, FleetActivity
from oemrelay.cli import capture_frames, decode_documents
from oemrelay.codec import (
    DebugText,
    Frame,
    MessageType,
    Record,
    encode_data_records,
    parse_hello,
)
from oemrelay.events import Observers
from oemrelay.live import (
    MAX_RECORDINGS,
    LiveClient,
    LiveHub,
    TooManyWatchers,
    sse_message,
)
from oemrelay.relay import Upload
from oemrelay.simulator import simulated_hello

#: 2026-11-26T09:20:02Z
NOW = 1795684802.0
SERIAL = 4242
HELLO = parse_hello(simulated_hello(SERIAL).to_payload())
HOSTILE = b"<img src=x onerror=alert(1)>"


def upload(records: int = 1, trace: bytes | None = None, hello=HELLO) -> Upload:
    fields = (DebugText(7, trace),) if trace is not None else ()
    found = tuple(Record(100 + n, 400_000_000, 21, fields) for n in range(records))
    frame = Frame(MessageType.DATA_RECORDS, encode_data_records(list(found)))
    return Upload(hello, (frame,), found, NOW)


def events_of(written: list[bytes]) -> list[dict]:
    """The JSON events in what a client was written (comments left out)."""
    events = []
    for message in b"".join(written).decode("utf-8").split("\n\n"):
        for line in message.splitlines():
            if line.startswith("data: "):
                events.append(json.loads(line[len("data: "):]))
    return events


class _HubTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        self.hub = LiveHub(self.clock, events_per_second=10, max_pending=3, max_watchers=2)
        self.observers = Observers()
        self.observers.subscribe(self.hub)

    def watch(self, serial: int = SERIAL) -> tuple[LiveClient, list[bytes]]:
        written: list[bytes] = []
        client = LiveClient(written.append, max_pending=3)
        self.hub.watch(serial, client)
        return client, written


class SseMessageTests(SynchronousTestCase):
    """The wire form of one event."""

    def test_one_data_line(self) -> None:
        """An event with a newline in its text is still one data line, named by its type."""
        data = sse_message({"type": "trace", "text": "a\nb"})
        self.assertEqual(data, b'event: trace\ndata: {"type": "trace", "text": "a\\nb"}\n\n')


class LiveEventsTests(_HubTestCase):
    """What a watcher is told."""

    def test_upload_commit_and_trace(self) -> None:
        """An upload, its hostile trace line (as plain text) and its commit reach the watcher."""
        _, written = self.watch()
        sent = upload(trace=HOSTILE)
        self.observers.upload_received(sent)
        self.observers.upload_committed(sent, 0.25)
        events = events_of(written)
        self.assertEqual([e["type"] for e in events], ["upload", "trace", "commit"])
        self.assertEqual(events[0]["json"]["SerNo"], SERIAL)
        self.assertEqual(events[0]["first_seq"], 100)
        self.assertEqual(events[1]["text"], HOSTILE.decode())
        self.assertEqual((events[2]["records"], events[2]["seconds"]), (1, 0.25))
        self.assertEqual(events[2]["time"], "2026-11-26T09:20:02Z")

    def test_withheld_with_reason(self) -> None:
        """A withheld commit says its kind and reason."""
        _, written = self.watch()
        self.observers.commit_withheld(upload(), "refused", "end server answered 500")
        (event,) = events_of(written)
        self.assertEqual(
            (event["type"], event["kind"], event["reason"]),
            ("withheld", "refused", "end server answered 500"),
        )

    def test_other_devices_not_told(self) -> None:
        """A watcher of one device hears nothing of another."""
        _, written = self.watch(SERIAL + 1)
        self.observers.upload_received(upload())
        self.assertEqual(written, [])

    def test_async_session_frames(self) -> None:
        """An async session request from the device is an async event; a data frame is not."""
        _, written = self.watch()
        self.observers.frame_received(HELLO, Frame(MessageType.ASYNC_SESSION_REQUEST, b""))
        self.observers.frame_received(HELLO, Frame(MessageType.DATA_RECORDS, b""))
        self.assertEqual(
            [(e["type"], e["message"]) for e in events_of(written)],
            [("async", "async_session_request")],
        )

    def test_stop_watching(self) -> None:
        """After its stop call a client is told nothing more."""
        written: list[bytes] = []
        stop = self.hub.watch(SERIAL, LiveClient(written.append, 3))
        stop()
        self.observers.upload_received(upload())
        self.assertEqual(written, [])

    def test_watchers_per_device_bounded(self) -> None:
        """A device takes max_watchers clients; one more is refused, and a place frees on stop."""
        self.watch()
        stop = self.hub.watch(SERIAL, LiveClient(lambda data: None, 3))
        with self.assertRaises(TooManyWatchers):
            self.hub.watch(SERIAL, LiveClient(lambda data: None, 3))
        stop()
        self.hub.watch(SERIAL, LiveClient(lambda data: None, 3))


class LiveBoundsTests(_HubTestCase):
    """A chatty device or a slow browser is dropped-and-counted, not buffered."""

    def test_device_rate_bounded(self) -> None:
        """Past events_per_second in one second, events are dropped and the count reported."""
        _, written = self.watch()
        for _ in range(12):
            self.observers.commit_withheld(upload(), "timeout", "no answer")
        self.assertEqual(len(events_of(written)), 10)
        self.clock.advance(1)
        self.observers.commit_withheld(upload(), "timeout", "no answer")
        events = events_of(written)
        self.assertEqual(events[10], {"type": "dropped", "count": 2})
        self.assertEqual(len(events), 12)

    def test_rate_refills_gradually(self) -> None:
        """0.15 s after the budget is spent (1.5 events earned at 10/s), exactly one more goes out."""
        _, written = self.watch()
        for _ in range(10):
            self.observers.commit_withheld(upload(), "timeout", "no answer")
        self.clock.advance(0.15)
        self.observers.commit_withheld(upload(), "timeout", "no answer")
        self.observers.commit_withheld(upload(), "timeout", "no answer")
        self.assertEqual(len(events_of(written)), 11)

    def test_paused_client_queues_then_drops(self) -> None:
        """A paused client keeps max_pending events, drops the rest, and reports them on resume."""
        client, written = self.watch()
        client.pauseProducing()
        for seq in range(5):
            self.observers.upload_committed(upload(), seq)
        self.assertEqual(written, [])
        client.resumeProducing()
        events = events_of(written)
        self.assertEqual([e.get("seconds") for e in events[:3]], [0, 1, 2])
        self.assertEqual(events[3], {"type": "dropped", "count": 2})
        self.assertEqual(client.dropped, 2)

    def test_stopped_client_keeps_nothing(self) -> None:
        """A client whose connection stopped holds no queued events."""
        client, written = self.watch()
        client.pauseProducing()
        self.observers.upload_committed(upload(), 1)
        client.stopProducing()
        client.resumeProducing()
        self.assertEqual(written, [])


class RecordingTests(_HubTestCase):
    """Recordings: the device's frames, as a capture file the CLI decodes."""

    def test_capture_decodes(self) -> None:
        """A recorded session (hello, records, commit) decodes with oemrelay decode's reader."""
        recording = self.hub.start_recording(SERIAL, 5)
        self.observers.device_connected(HELLO, "127.0.0.1:5000")
        sent = upload(records=2, trace=HOSTILE)
        for frame in sent.frames:
            self.observers.frame_received(HELLO, frame)
        self.observers.frame_received(HELLO, Frame(MessageType.COMMIT_REQUEST, b""))
        capture = recording.capture()
        self.assertTrue(capture.startswith("# oemrelay recording 1: device 4242,"))
        frames = capture_frames(capture.encode("ascii"))
        self.assertEqual(
            [f.type for f in frames],
            [MessageType.HELLO, MessageType.DATA_RECORDS, MessageType.COMMIT_REQUEST],
        )
        (document,) = decode_documents(frames)
        decoded = json.loads(document)
        self.assertEqual(decoded["SerNo"], SERIAL)
        self.assertEqual([r["SeqNo"] for r in decoded["Records"]], [100, 101])
        self.assertEqual(recording.summary(NOW)["frames"], 3)

    def test_connected_device_hello_first(self) -> None:
        """A recording started while the device is connected opens with its hello."""
        self.observers.device_connected(HELLO, "127.0.0.1:5000")
        recording = self.hub.start_recording(SERIAL, 1)
        self.assertEqual(capture_frames(recording.capture().encode())[0].type, MessageType.HELLO)

    def test_stops_at_the_end_time(self) -> None:
        """A frame just before the end is kept; one at the end is not."""
        recording = self.hub.start_recording(SERIAL, 1)
        self.clock.advance(59.9)
        self.observers.frame_received(HELLO, Frame(MessageType.COMMIT_REQUEST, b""))
        self.clock.advance(0.1)
        self.observers.frame_received(HELLO, Frame(MessageType.COMMIT_REQUEST, b""))
        self.assertEqual(recording.frames, 1)
        self.assertFalse(recording.summary(self.clock.seconds())["recording"])

    def test_size_bounded(self) -> None:
        """A frame filling MAX_RECORDING_BYTES exactly is kept; the next stops the recording."""
        self.patch(live_module, "MAX_RECORDING_BYTES", 10)
        recording = self.hub.start_recording(SERIAL, 5)
        # A frame is 5 header bytes and its payload.
        self.observers.frame_received(HELLO, Frame(MessageType.COMMIT_REQUEST, b"12345"))
        self.assertFalse(recording.truncated)
        self.observers.frame_received(HELLO, Frame(MessageType.COMMIT_REQUEST, b""))
        self.observers.frame_received(HELLO, Frame(MessageType.COMMIT_REQUEST, b""))
        self.assertEqual((recording.frames, recording.size), (1, 10))
        self.assertTrue(recording.truncated)
        self.assertIn("# stopped", recording.capture())

    def test_minutes_bounds(self) -> None:
        """0 minutes and more than 60 are refused; 60 is accepted."""
        for minutes in (0, 60.5):
            with self.assertRaises(ValueError):
                self.hub.start_recording(SERIAL, minutes)
        self.assertEqual(self.hub.start_recording(SERIAL, 60).ends, NOW + 3600)

    def test_only_the_last_recordings_kept(self) -> None:
        """Past MAX_RECORDINGS, the oldest finished recording is forgotten."""
        for serial in range(MAX_RECORDINGS + 1):
            self.hub.start_recording(serial, 1)
        ids = [r.id for r in self.hub.recordings()]
        self.assertEqual(len(ids), MAX_RECORDINGS)
        self.assertIsNone(self.hub.recording(1))
        self.assertEqual(ids[-1], MAX_RECORDINGS + 1)

    def test_not_recorded_device_costs_nothing(self) -> None:
        """Frames of a device that is not recorded are not kept anywhere."""
        self.hub.start_recording(SERIAL + 1, 1)
        self.observers.frame_received(HELLO, Frame(MessageType.COMMIT_REQUEST, b""))
        self.assertEqual(self.hub.recordings()[0].frames, 0)


class FleetActivityTests(SynchronousTestCase):
    """The fleet's recent figures."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(NOW - NOW % 60)
        self.activity = FleetActivity(self.clock)

    def test_counts(self) -> None:
        """Uploads, records, withheld kinds and non-2xx tries by connector are counted."""
        self.activity.upload_committed(upload(records=3), 0.1)
        self.activity.upload_committed(upload(records=2), 0.1)
        self.activity.commit_withheld(upload(), "timeout", "x")
        self.activity.delivery_attempted("primary", "5xx", 1.0)
        self.activity.delivery_attempted("primary", "2xx", 1.0)
        self.activity.delivery_attempted("backup", "timeout", 1.0)
        summary = self.activity.summary(15)
        self.assertEqual(
            (summary["uploads_committed"], summary["records_committed"]), (2, 5)
        )
        self.assertEqual(summary["withheld"], {"timeout": 1})
        self.assertEqual(summary["end_server_errors"], {"backup": 1, "primary": 1})
        self.assertIsNone(summary["spool"])

    def test_window_edge(self) -> None:
        """An upload 4 minutes back counts in a 5-minute summary, not in a 4-minute one."""
        self.activity.upload_committed(upload(), 0.1)
        self.clock.advance(4 * 60)
        self.assertEqual(self.activity.summary(5)["uploads_committed"], 1)
        self.assertEqual(self.activity.summary(4)["uploads_committed"], 0)

    def test_old_minutes_forgotten(self) -> None:
        """Minutes older than the window are dropped from memory."""
        self.activity.upload_committed(upload(), 0.1)
        self.clock.advance(WINDOW_MINUTES * 60)
        self.activity.upload_committed(upload(), 0.1)
        self.assertEqual(len(self.activity._minutes), 1)
        self.assertEqual(self.activity.summary(WINDOW_MINUTES)["uploads_committed"], 1)

    def test_minutes_bounds(self) -> None:
        """0 and more than WINDOW_MINUTES minutes are refused."""
        for minutes in (0, WINDOW_MINUTES + 1, True):
            with self.assertRaises(ValueError):
                self.activity.summary(minutes)

    def test_connected_here(self) -> None:
        """A device connected twice then closed once is still connected; closed twice it is not."""
        self.activity.device_connected(HELLO, "peer")
        self.activity.device_connected(HELLO, "peer")
        self.activity.connection_closed(HELLO, "peer", "device")
        self.assertEqual(self.activity.summary(1)["connected_here"], 1)
        self.activity.connection_closed(HELLO, "peer", "device")
        self.activity.connection_closed(None, "peer", "protocol_error")
        self.assertEqual(self.activity.summary(1)["connected_here"], 0)

    def test_spool_stats_passed_on(self) -> None:
        """The spool's stats() answer is shown as spool."""
        summary = self.activity.summary(1, lambda: {"depth": 3})
        self.assertEqual(summary["spool"], {"depth": 3})
