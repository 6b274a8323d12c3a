"""
Tests for :mod:`oemrelay.connectors.file`: uploads appended as JSON lines,
with group commit while a write is under way.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from oemrelay.codec import FrameDecoder, Hello, parse_data_records, parse_hello
from oemrelay.config import FileConnectorConfig
from oemrelay.connectors import build_connector
from oemrelay.connectors.file import FileConnector, append_and_sync
from oemrelay.oem_json import oem_document
from oemrelay.relay import DeliveryFailed, DeviceProfile, Upload

from .vectors import capture

HELLO = parse_hello(FrameDecoder().feed(capture("hello-49-byte-dart"))[0].payload)
_DATA_FRAME = FrameDecoder().feed(capture("data-0x04-2-records-2021-denmark"))[0]
UPLOAD = Upload(HELLO, (_DATA_FRAME,), tuple(parse_data_records(_DATA_FRAME.payload)), 0.0)
PROFILE = DeviceProfile()


def upload_for(serial: int) -> Upload:
    """The sample upload as if sent by device ``serial``."""
    hello = Hello(serial, HELLO.imei, HELLO.iccid, 34, 2, 1, 9)
    return Upload(hello, UPLOAD.frames, UPLOAD.records, 0.0)


def run_now(function, *args) -> Deferred:
    """A BlockingRunner that runs ``function`` at once, in this thread."""
    return defer.maybeDeferred(function, *args)


class ManualRunner:
    """A BlockingRunner whose calls wait until the test runs them."""

    def __init__(self) -> None:
        self.calls: list[tuple[object, tuple, Deferred]] = []

    def __call__(self, function, *args) -> Deferred:
        waiting: Deferred = Deferred()
        self.calls.append((function, args, waiting))
        return waiting

    def run(self, index: int) -> None:
        """Run call ``index`` for real and fire its Deferred with the outcome."""
        function, args, waiting = self.calls[index]
        try:
            result = function(*args)
        except Exception:
            waiting.errback()
        else:
            waiting.callback(result)


class FileConnectorTests(SynchronousTestCase):
    """FileConnector appends one fsync'd JSON line per upload."""

    def setUp(self) -> None:
        os.mkdir(directory := self.mktemp())
        self.path = os.path.join(directory, "uploads.jsonl")

    def connector(self, runner=run_now, path: str | None = None) -> FileConnector:
        return FileConnector(FileConnectorConfig("store", path or self.path), runner)

    def lines(self) -> list[dict]:
        text = Path(self.path).read_text(encoding="utf-8")
        self.assertTrue(text.endswith("\n"))
        return [json.loads(line) for line in text.splitlines()]

    def test_one_line(self) -> None:
        """An upload becomes one line: its OEM JSON document and a newline."""
        done = self.connector().deliver(UPLOAD, PROFILE)
        self.assertIsNone(self.successResultOf(done))
        self.assertEqual(
            Path(self.path).read_bytes(), oem_document(UPLOAD.hello, UPLOAD.records) + b"\n"
        )

    def test_document_content(self) -> None:
        """The line holds the device's serial and every record of the upload."""
        self.successResultOf(self.connector().deliver(UPLOAD, PROFILE))
        [document] = self.lines()
        self.assertEqual(document["SerNo"], 129336)
        self.assertEqual([r["SeqNo"] for r in document["Records"]], [565, 566])

    def test_appends(self) -> None:
        """Later uploads are appended after earlier ones, in order."""
        connector = self.connector()
        for serial in (1, 2, 3):
            self.successResultOf(connector.deliver(upload_for(serial), PROFILE))
        self.assertEqual([d["SerNo"] for d in self.lines()], [1, 2, 3])

    def test_keeps_existing_content(self) -> None:
        """A file that already has lines keeps them."""
        Path(self.path).write_bytes(b'{"old":1}\n')
        self.successResultOf(self.connector().deliver(UPLOAD, PROFILE))
        self.assertEqual(self.lines()[0], {"old": 1})
        self.assertEqual(len(self.lines()), 2)

    def test_not_done_before_written(self) -> None:
        """The Deferred does not fire until the write has finished."""
        runner = ManualRunner()
        done = self.connector(runner).deliver(UPLOAD, PROFILE)
        self.assertNoResult(done)
        self.assertFalse(os.path.exists(self.path))
        runner.run(0)
        self.successResultOf(done)
        self.assertEqual(len(self.lines()), 1)

    def test_writes_through_runner(self) -> None:
        """The write is handed to the blocking runner as append_and_sync(path, data)."""
        runner = ManualRunner()
        self.connector(runner).deliver(UPLOAD, PROFILE)
        [(function, args, _)] = runner.calls
        self.assertIs(function, append_and_sync)
        self.assertEqual(args, (self.path, oem_document(UPLOAD.hello, UPLOAD.records) + b"\n"))

    def test_group_commit(self) -> None:
        """Uploads queued while a write is under way are written in one batch and all fire."""
        runner = ManualRunner()
        connector = self.connector(runner)
        first = connector.deliver(upload_for(1), PROFILE)
        queued = [connector.deliver(upload_for(n), PROFILE) for n in (2, 3, 4)]
        self.assertEqual(len(runner.calls), 1)
        runner.run(0)
        self.successResultOf(first)
        for done in queued:
            self.assertNoResult(done)
        self.assertEqual(len(runner.calls), 2)
        _, (path, data), _ = runner.calls[1]
        self.assertEqual(data.count(b"\n"), 3)
        runner.run(1)
        for done in queued:
            self.successResultOf(done)
        self.assertEqual([d["SerNo"] for d in self.lines()], [1, 2, 3, 4])
        self.assertEqual(len(runner.calls), 2)

    def test_one_write_at_a_time_when_callbacks_deliver(self) -> None:
        """Uploads delivered by a batch's own callbacks share the next write; two are never under way."""
        runner = ManualRunner()
        connector = self.connector(runner)
        connector.deliver(upload_for(1), PROFILE)
        for serial in (2, 3):
            # Each device sends its next upload as soon as it is committed.
            connector.deliver(upload_for(serial), PROFILE).addCallback(
                lambda _, n=serial: connector.deliver(upload_for(n * 10), PROFILE)
            )
        runner.run(0)
        runner.run(1)
        self.assertEqual(len(runner.calls), 3)
        _, (_, data), _ = runner.calls[2]
        self.assertEqual(data.count(b"\n"), 2)
        runner.run(2)
        self.assertEqual([d["SerNo"] for d in self.lines()], [1, 2, 3, 20, 30])

    def test_idle_after_batch(self) -> None:
        """After a batch completes, the next upload starts a new write at once."""
        runner = ManualRunner()
        connector = self.connector(runner)
        connector.deliver(upload_for(1), PROFILE)
        runner.run(0)
        later = connector.deliver(upload_for(2), PROFILE)
        self.assertEqual(len(runner.calls), 2)
        runner.run(1)
        self.successResultOf(later)

    def test_write_error(self) -> None:
        """A path that cannot be written fails the upload with DeliveryFailed."""
        path = os.path.join(self.mktemp(), "missing-dir", "uploads.jsonl")
        failure = self.failureResultOf(
            self.connector(path=path).deliver(UPLOAD, PROFILE), DeliveryFailed
        )
        message = str(failure.value)
        self.assertIn("connector store", message)
        self.assertIn(path, message)
        self.assertNotIn("\n", message)

    def test_write_error_fails_whole_batch(self) -> None:
        """Every upload of a batch whose write fails gets DeliveryFailed."""
        runner = ManualRunner()
        path = os.path.join(self.mktemp(), "missing-dir", "uploads.jsonl")
        connector = self.connector(runner, path)
        first = connector.deliver(upload_for(1), PROFILE)
        batch = [connector.deliver(upload_for(n), PROFILE) for n in (2, 3)]
        runner.run(0)
        self.failureResultOf(first, DeliveryFailed)
        runner.run(1)
        for done in batch:
            self.failureResultOf(done, DeliveryFailed)

    def test_recovers_after_error(self) -> None:
        """A failed write does not stop later writes."""
        runner = ManualRunner()
        connector = self.connector(runner)
        first = connector.deliver(upload_for(1), PROFILE)
        second = connector.deliver(upload_for(2), PROFILE)
        _, _, waiting = runner.calls[0]
        waiting.errback(OSError(28, "No space left on device"))
        failure = self.failureResultOf(first, DeliveryFailed)
        self.assertIn("No space left on device", str(failure.value))
        runner.run(1)
        self.successResultOf(second)
        self.assertEqual([d["SerNo"] for d in self.lines()], [2])

    def test_partial_write_does_not_spoil_next_line(self) -> None:
        """After a write that failed part-way, the next upload still gets a line of its own."""
        connector = self.connector()
        real_write = os.write
        calls: list[int] = []

        def disk_fills(fd: int, data) -> int:
            calls.append(fd)
            if len(calls) > 1:
                raise OSError(28, "No space left on device")
            return real_write(fd, data[:40])

        self.patch(os, "write", disk_fills)
        self.failureResultOf(connector.deliver(upload_for(1), PROFILE), DeliveryFailed)
        self.patch(os, "write", real_write)
        self.successResultOf(connector.deliver(upload_for(2), PROFILE))
        last = Path(self.path).read_bytes().splitlines()[-1]
        self.assertEqual(json.loads(last)["SerNo"], 2)

    def test_link(self) -> None:
        """open_link gives a link that delivers to this file and ignores other frames."""
        connector = self.connector()
        reasons: list[str] = []
        link = connector.open_link(HELLO, reasons.append)
        link.forward(_DATA_FRAME)
        self.successResultOf(link.deliver(UPLOAD, PROFILE))
        link.close()
        self.assertEqual(len(self.lines()), 1)
        self.assertEqual(reasons, [])

    def test_name(self) -> None:
        """The connector is named after its section."""
        self.assertEqual(self.connector().name, "store")


class AppendAndSyncTests(SynchronousTestCase):
    """append_and_sync appends bytes to a file, creating it if needed."""

    def test_creates(self) -> None:
        """A missing file is created with the data."""
        path = self.mktemp()
        append_and_sync(path, b"one\n")
        self.assertEqual(Path(path).read_bytes(), b"one\n")

    def test_appends(self) -> None:
        """Data goes after what the file already holds."""
        path = self.mktemp()
        Path(path).write_bytes(b"zero\n")
        append_and_sync(path, b"one\n")
        append_and_sync(path, b"two\n")
        self.assertEqual(Path(path).read_bytes(), b"zero\none\ntwo\n")

    def test_large(self) -> None:
        """Data larger than one write is written completely."""
        path = self.mktemp()
        data = bytes(range(256)) * 8192
        append_and_sync(path, data)
        self.assertEqual(Path(path).read_bytes(), data)

    def test_empty(self) -> None:
        """Empty data leaves the file as it was."""
        path = self.mktemp()
        Path(path).write_bytes(b"x")
        append_and_sync(path, b"")
        self.assertEqual(Path(path).read_bytes(), b"x")

    def test_unfinished_line_ended_first(self) -> None:
        """A file ending in an unfinished line (a crash mid-write) gets a newline before the data."""
        path = self.mktemp()
        Path(path).write_bytes(b'{"SerNo":1,"IM')
        append_and_sync(path, b"one\n")
        self.assertEqual(Path(path).read_bytes(), b'{"SerNo":1,"IM\none\n')

    def test_unwritable(self) -> None:
        """A path in a missing directory raises OSError."""
        with self.assertRaises(OSError):
            append_and_sync(os.path.join(self.mktemp(), "no", "file"), b"x")

    def record_fsyncs(self) -> list[str]:
        """From now on, the kind ("file" or "directory") of each fsync'd descriptor."""
        synced: list[str] = []
        real_fsync = os.fsync

        def fsync(fd: int) -> None:
            synced.append("directory" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
            real_fsync(fd)

        self.patch(os, "fsync", fsync)
        return synced

    def test_fsyncs(self) -> None:
        """The data is fsync'd before append_and_sync returns."""
        synced = self.record_fsyncs()
        append_and_sync(self.mktemp(), b"x")
        self.assertEqual(synced.count("file"), 1)

    def test_new_file_directory_synced(self) -> None:
        """A file the write creates has its directory fsync'd too, so its name survives a crash."""
        os.mkdir(directory := self.mktemp())
        synced = self.record_fsyncs()
        append_and_sync(os.path.join(directory, "uploads.jsonl"), b"one\n")
        self.assertEqual(synced, ["file", "directory"])

    def test_existing_file_only_file_synced(self) -> None:
        """Appending to a file that already holds lines fsyncs only the file."""
        path = self.mktemp()
        Path(path).write_bytes(b"zero\n")
        synced = self.record_fsyncs()
        append_and_sync(path, b"one\n")
        self.assertEqual(synced, ["file"])


class FakePool:
    """Records the connector starting and stopping its thread."""

    def __init__(self) -> None:
        self.events: list[str] = []

    def start(self) -> None:
        self.events.append("start")

    def stop(self) -> None:
        self.events.append("stop")


class FileConnectorServiceTests(SynchronousTestCase):
    """The connector starts its writer thread with itself and stops it after the last write."""

    def setUp(self) -> None:
        os.mkdir(directory := self.mktemp())
        self.pool = FakePool()
        self.runner = ManualRunner()
        self.connector = FileConnector(
            FileConnectorConfig("store", os.path.join(directory, "u.jsonl")),
            self.runner,
            self.pool,
        )

    def test_start_starts_pool(self) -> None:
        """startService starts the thread pool, and nothing else does."""
        self.assertEqual(self.pool.events, [])
        self.connector.startService()
        self.assertEqual(self.pool.events, ["start"])

    def test_stop_when_idle(self) -> None:
        """stopService with no write under way stops the pool at once."""
        self.connector.startService()
        self.successResultOf(defer.maybeDeferred(self.connector.stopService))
        self.assertEqual(self.pool.events, ["start", "stop"])

    def test_stop_waits_for_pending_write(self) -> None:
        """stopService waits for the write under way and the one queued behind it."""
        self.connector.startService()
        first = self.connector.deliver(UPLOAD, PROFILE)
        second = self.connector.deliver(upload_for(2), PROFILE)
        stopped = self.connector.stopService()
        self.assertNoResult(stopped)
        self.runner.run(0)
        self.successResultOf(first)
        self.assertNoResult(stopped)
        self.assertEqual(self.pool.events, ["start"])
        self.runner.run(1)
        self.successResultOf(second)
        self.successResultOf(stopped)
        self.assertEqual(self.pool.events, ["start", "stop"])

    def test_stop_after_failed_write(self) -> None:
        """A write that fails during shutdown still lets the pool stop."""
        self.connector = FileConnector(
            FileConnectorConfig("store", "/nonexistent-dir/u.jsonl"), self.runner, self.pool
        )
        self.connector.startService()
        pending = self.connector.deliver(UPLOAD, PROFILE)
        stopped = self.connector.stopService()
        self.runner.run(0)
        self.failureResultOf(pending, DeliveryFailed)
        self.successResultOf(stopped)
        self.assertEqual(self.pool.events, ["start", "stop"])

    def test_deliver_after_stop(self) -> None:
        """An upload offered after stopService fails, nothing is written, so no commit."""
        self.connector.startService()
        self.connector.stopService()
        failure = self.failureResultOf(self.connector.deliver(UPLOAD, PROFILE), DeliveryFailed)
        self.assertIn("store", failure.getErrorMessage())
        self.assertEqual(self.runner.calls, [])


class BuildConnectorTests(SynchronousTestCase):
    """build_connector gives a file section its own writer thread, owned by the connector."""

    def test_file_connector(self) -> None:
        """A file section becomes a FileConnector; the reactor gets no start or shutdown hook."""
        reactor = MemoryReactorClock()
        connector = build_connector(FileConnectorConfig("store", "x.jsonl"), reactor, 65535)
        self.assertIsInstance(connector, FileConnector)
        self.assertEqual((connector.name, connector.path), ("store", "x.jsonl"))
        self.assertEqual(reactor.whenRunningHooks, [])
        self.assertEqual(reactor.triggers, {})

    def test_thread_lives_with_service(self) -> None:
        """The writer thread pool runs between startService and stopService, one thread at most."""
        connector = build_connector(
            FileConnectorConfig("store", "x.jsonl"), MemoryReactorClock(), 65535
        )
        pool = connector._pool
        self.assertEqual((pool.max, pool.started), (1, False))
        connector.startService()
        self.assertTrue(pool.started)
        self.successResultOf(connector.stopService())
        self.assertFalse(pool.started)
