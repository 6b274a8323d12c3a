"""
The file connector: each upload becomes one JSON line appended to ``path``.

An upload counts as accepted only once its line is written and fsync'd.
Writing happens off the reactor thread.  Uploads that arrive while a write is
under way are written together with one fsync (group commit), so throughput
does not fall to one upload per disk flush.

The connector is a Service that owns its writer thread: started with the
service, stopped once the writes under way at shutdown have finished.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Protocol

from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..codec import Hello
from ..config import FileConnectorConfig
from ..oem_json import oem_document_of_frames
from ..relay import DeliveryFailed, DeviceProfile, StatelessLink, Upload

log = Logger(namespace="oemrelay.connectors.file")

#: Runs a blocking callable elsewhere and fires with its result.
BlockingRunner = Callable[..., Deferred]


class Startable(Protocol):
    """What the connector starts and stops with itself (a ``ThreadPool``)."""

    def start(self) -> None: ...

    def stop(self) -> None: ...


def append_and_sync(path: str, data: bytes) -> None:
    """
    Append ``data`` to ``path`` and flush it to disk before returning.

    A last line left unfinished (a write that failed part-way, a crash) is
    ended first, so that ``data`` never continues it.
    """
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o640)
    try:
        end = os.lseek(fd, 0, os.SEEK_END)
        if data and end and os.pread(fd, 1, end - 1) != b"\n":
            data = b"\n" + data
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
        if not end:
            # A file just created survives a crash only once its name does.
            directory = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)
    finally:
        os.close(fd)


class FileConnector(Service):
    """
    Appends uploads to a JSON-lines file.

    :param run_blocking: runs each write off the reactor thread.
    :param pool: what ``run_blocking`` runs on, started in
        :meth:`startService` and stopped in :meth:`stopService`.
    """

    def __init__(
        self,
        config: FileConnectorConfig,
        run_blocking: BlockingRunner,
        pool: Startable | None = None,
    ) -> None:
        self.name = config.name
        self.path = config.path
        self._run_blocking = run_blocking
        self._pool = pool
        self._link = StatelessLink(self.deliver)
        self._queued: list[tuple[bytes, Deferred[None]]] = []
        self._writing = False
        self._stopping = False
        self._drain_waiters: list[Deferred[None]] = []

    def startService(self) -> None:
        super().startService()
        self._stopping = False
        if self._pool is not None:
            self._pool.start()

    def stopService(self) -> Deferred[None]:
        """Refuse new uploads, finish the writes under way, then stop the thread."""
        super().stopService()
        self._stopping = True
        drained: Deferred[None] = Deferred()
        if self._writing:
            self._drain_waiters.append(drained)
        else:
            drained.callback(None)
        if self._pool is not None:
            drained.addCallback(lambda _: self._pool.stop())
        return drained

    def open_link(self, hello: Hello, on_lost) -> StatelessLink:
        return self._link

    def deliver(self, upload: Upload, profile: DeviceProfile) -> Deferred[None]:
        if self._stopping:
            # The writer thread is going; the device keeps its records.
            return fail(DeliveryFailed(f"connector {self.name}: shutting down", "stopping"))
        done: Deferred[None] = Deferred()
        self._queued.append((oem_document_of_frames(upload.hello, upload.frames) + b"\n", done))
        if not self._writing:
            self._write_queued()
        return done

    def _write_queued(self) -> None:
        batch, self._queued = self._queued, []
        self._writing = True
        written = self._run_blocking(
            append_and_sync, self.path, b"".join(line for line, _ in batch)
        )
        written.addBoth(self._written, batch)

    def _written(self, result: object, batch: list[tuple[bytes, Deferred[None]]]) -> None:
        # Still "writing" while the batch's callbacks run: uploads they deliver
        # queue for the next write together, rather than starting writes of their own.
        if isinstance(result, Failure):
            error = DeliveryFailed(
                f"connector {self.name}: cannot write {self.path}:"
                f" {result.getErrorMessage()}",
                "storage",
            )
            for _, done in batch:
                done.errback(error)
        else:
            for _, done in batch:
                done.callback(None)
        self._writing = False
        if self._queued:
            self._write_queued()
        else:
            waiters, self._drain_waiters = self._drain_waiters, []
            for waiter in waiters:
                waiter.callback(None)
