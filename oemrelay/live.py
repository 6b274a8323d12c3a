"""
The console's live view of a device, and recordings of its raw frames.

:class:`LiveHub` is a :class:`~oemrelay.events.RelayObserver`.  For a device
someone watches (``GET /api/devices/{serial}/live``) it turns the relay's
events into small JSON events (connected, upload with its records and the OEM
JSON, trace lines, commit, withheld, async, command answer, closed) and hands
them to each :class:`LiveClient`.  For a device being recorded it keeps every
frame the device sends, as a capture file ``oemrelay decode`` and ``oemrelay
simulate --replay`` read (hex lines, ``#`` comments).

Bounded by construction, so a chatty device floods neither the browser nor
the relay:

* per device, at most ``events_per_second`` events (a token bucket); the rest
  are dropped and counted;
* per client, at most ``max_pending`` events wait while its connection is
  backed up (the transport paused us as its producer); the rest are dropped
  and counted, and the client is told how many with a ``dropped`` event;
* at most ``max_watchers`` clients per device;
* a recording holds at most :data:`MAX_RECORDING_BYTES` and stops there, and
  only the last :data:`MAX_RECORDINGS` recordings are kept (in memory: a
  recording is a debugging aid, not an archive).

A device nobody watches or records costs one dictionary lookup per event.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import count
from typing import Any

from twisted.internet.interfaces import IPushProducer, IReactorTime
from zope.interface import implementer

from .codec import DebugText, Frame, Hello, MessageType, encode_frame
from .commands import iso8601
from .events import RelayObserver
from .oem_json import oem_document

#: The most bytes of frames one recording keeps.
MAX_RECORDING_BYTES = 4 * 1024 * 1024
#: How many recordings are kept, the oldest finished one forgotten first.
MAX_RECORDINGS = 32
#: The longest recording, in minutes.
MAX_RECORDING_MINUTES = 60

_ASYNC_TYPES = frozenset(
    {MessageType.ASYNC_RESPONSE, MessageType.ASYNC_SESSION_REQUEST, MessageType.ASYNC_SESSION_COMPLETE}
)


class TooManyWatchers(Exception):
    """A device already has as many live clients as allowed."""


def sse_message(event: dict[str, Any]) -> bytes:
    """One server-sent event: its ``type`` as the event name, the JSON as data."""
    # json.dumps escapes newlines, so the data is always one line.
    return f"event: {event['type']}\ndata: {json.dumps(event)}\n\n".encode("utf-8")


@implementer(IPushProducer)
class LiveClient:
    """
    One watcher's stream: events are written at once unless its transport
    paused it, then queued up to ``max_pending``, then dropped and counted.
    """

    def __init__(self, write: Callable[[bytes], None], max_pending: int) -> None:
        self._write = write
        self._max_pending = max_pending
        self._pending: deque[bytes] = deque()
        self._paused = False
        #: Events dropped and not yet reported to the client.
        self.unreported = 0
        #: Events dropped in all.
        self.dropped = 0

    def send(self, event: dict[str, Any]) -> None:
        """Pass ``event`` on, or queue it, or drop it if too many wait."""
        if self._paused:
            if len(self._pending) >= self._max_pending:
                self.count_dropped(1)
            else:
                self._pending.append(sse_message(event))
            return
        self._report_dropped()
        self._write(sse_message(event))

    def count_dropped(self, number: int) -> None:
        """``number`` events for this client were dropped (here or for the device)."""
        self.dropped += number
        self.unreported += number

    def _report_dropped(self) -> None:
        if self.unreported:
            number, self.unreported = self.unreported, 0
            self._write(sse_message({"type": "dropped", "count": number}))

    # -- IPushProducer: the HTTP transport tells us when it is backed up --

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        while self._pending and not self._paused:
            self._write(self._pending.popleft())
        if not self._paused:
            self._report_dropped()

    def stopProducing(self) -> None:
        self._paused = True
        self._pending.clear()


@dataclass
class Recording:
    """A device's frames kept from ``started`` until ``ends`` (Unix seconds)."""

    id: int
    serial: int
    started: float
    ends: float
    #: Capture lines: ``#`` comments and one hex line per frame.
    lines: list[str] = field(default_factory=list)
    frames: int = 0
    size: int = 0
    #: Set when :data:`MAX_RECORDING_BYTES` was reached and recording stopped.
    truncated: bool = False

    def recording(self, now: float) -> bool:
        """Whether frames are still being kept."""
        return now < self.ends and not self.truncated

    def add(self, frame_bytes: bytes, note: str) -> None:
        """Keep one frame, unless the recording is full (then it stops)."""
        if self.size + len(frame_bytes) > MAX_RECORDING_BYTES:
            self.truncated = True
            self.lines.append(f"# stopped: {MAX_RECORDING_BYTES} bytes reached")
            return
        self.size += len(frame_bytes)
        self.frames += 1
        self.lines.append(f"# {note}")
        self.lines.append(frame_bytes.hex(" "))

    def capture(self) -> str:
        """The capture file ``oemrelay decode`` reads."""
        head = (
            f"# oemrelay recording {self.id}: device {self.serial},"
            f" from {iso8601(self.started)} until {iso8601(self.ends)}"
        )
        return "\n".join([head, *self.lines]) + "\n"

    def summary(self, now: float) -> dict[str, Any]:
        """The recording as ``GET /api/recordings`` lists it."""
        return {
            "id": self.id,
            "serial": self.serial,
            "started": iso8601(self.started),
            "ends": iso8601(self.ends),
            "recording": self.recording(now),
            "frames": self.frames,
            "bytes": self.size,
            "truncated": self.truncated,
        }


class _Watched:
    """A watched device's clients and its event budget."""

    def __init__(self, events_per_second: float, now: float) -> None:
        self.clients: list[LiveClient] = []
        self.rate = events_per_second
        self.tokens = events_per_second
        self.refilled = now

    def take(self, now: float) -> bool:
        """Whether one more event may go out now (a token bucket of one second)."""
        self.tokens = min(self.rate, self.tokens + (now - self.refilled) * self.rate)
        self.refilled = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


class LiveHub(RelayObserver):
    """The relay's events for watched and recorded devices (see the module docstring)."""

    def __init__(
        self,
        clock: IReactorTime,
        events_per_second: float = 50,
        max_pending: int = 200,
        max_watchers: int = 4,
    ) -> None:
        self._clock = clock
        self._events_per_second = events_per_second
        self._max_pending = max_pending
        self._max_watchers = max_watchers
        self._watched: dict[int, _Watched] = {}
        #: Recordings by id, oldest first.
        self._recordings: dict[int, Recording] = {}
        #: The recordings still keeping frames, by serial.
        self._recording: dict[int, Recording] = {}
        #: The hello of each device connected now, to start a recording with.
        self._hellos: dict[int, Hello] = {}
        self._ids = count(1)

    # -- watching --

    def watch(self, serial: int, client: LiveClient) -> Callable[[], None]:
        """
        Send ``serial``'s events to ``client``; returns the call that stops.

        :raises TooManyWatchers: if the device has ``max_watchers`` already.
        """
        watched = self._watched.get(serial)
        if watched is None:
            watched = self._watched[serial] = _Watched(
                self._events_per_second, self._clock.seconds()
            )
        if len(watched.clients) >= self._max_watchers:
            raise TooManyWatchers(f"device {serial} has {self._max_watchers} live clients already")
        watched.clients.append(client)

        def stop() -> None:
            if client in watched.clients:
                watched.clients.remove(client)
            if not watched.clients and self._watched.get(serial) is watched:
                del self._watched[serial]

        return stop

    def _tell(self, serial: int, make_event: Callable[[], dict[str, Any]]) -> None:
        watched = self._watched.get(serial)
        if watched is None:
            return
        now = self._clock.seconds()
        if not watched.take(now):
            for client in watched.clients:
                client.count_dropped(1)
            return
        event = {**make_event(), "time": iso8601(now), "serial": serial}
        for client in list(watched.clients):
            client.send(event)

    # -- recording --

    def start_recording(self, serial: int, minutes: float) -> Recording:
        """
        Keep ``serial``'s frames for ``minutes`` minutes (a recording already
        running for it is ended first).

        :raises ValueError: if ``minutes`` is not above 0 and at most
            :data:`MAX_RECORDING_MINUTES`.
        """
        if not 0 < minutes <= MAX_RECORDING_MINUTES:
            raise ValueError(f"minutes must be above 0 and at most {MAX_RECORDING_MINUTES}")
        now = self._clock.seconds()
        running = self._recording.pop(serial, None)
        if running is not None:
            running.ends = min(running.ends, now)
        recording = Recording(next(self._ids), serial, now, now + minutes * 60)
        hello = self._hellos.get(serial)
        if hello is not None:
            recording.add(_hello_bytes(hello), "hello (connected when the recording started)")
        self._recordings[recording.id] = recording
        self._recording[serial] = recording
        self._forget_old(now)
        return recording

    def _forget_old(self, now: float) -> None:
        while len(self._recordings) > MAX_RECORDINGS:
            finished = next(
                (r for r in self._recordings.values() if not r.recording(now)), None
            )
            victim = finished or next(iter(self._recordings.values()))
            del self._recordings[victim.id]
            if self._recording.get(victim.serial) is victim:
                del self._recording[victim.serial]

    def recordings(self) -> list[Recording]:
        """Every recording kept, oldest first."""
        return list(self._recordings.values())

    def recording(self, recording_id: int) -> Recording | None:
        """One recording, or None if there is none (or no longer) with that id."""
        return self._recordings.get(recording_id)

    def _record(self, serial: int, frame_bytes: bytes, note: str) -> None:
        recording = self._recording.get(serial)
        if recording is None:
            return
        if recording.recording(self._clock.seconds()):
            recording.add(frame_bytes, note)
        if not recording.recording(self._clock.seconds()):
            del self._recording[serial]

    # -- the relay's events --

    def device_connected(self, hello: Hello, peer: str) -> None:
        self._hellos[hello.serial] = hello
        self._record(hello.serial, _hello_bytes(hello), "hello")
        self._tell(
            hello.serial,
            lambda: {
                "type": "connected",
                "peer": peer,
                "imei": hello.imei,
                "iccid": hello.iccid,
                "firmware": hello.firmware,
            },
        )

    def frame_received(self, hello: Hello, frame: Frame) -> None:
        # Every frame of every device passes here: build nothing unless recorded.
        if hello.serial in self._recording:
            self._record(hello.serial, frame.to_bytes(), f"type 0x{frame.type:02x}")
        if frame.type in _ASYNC_TYPES:
            self._tell(
                hello.serial,
                lambda: {
                    "type": "async",
                    "message": MessageType(frame.type).name.lower(),
                    "bytes": len(frame.payload),
                },
            )

    def upload_received(self, upload) -> None:
        serial = upload.hello.serial
        if serial not in self._watched:
            return
        self._tell(
            serial,
            lambda: {
                "type": "upload",
                "records": upload.record_count,
                "first_seq": upload.first_seq,
                "json": json.loads(oem_document(upload.hello, upload.records)),
            },
        )
        for record in upload.records:
            for item in record.fields:
                if isinstance(item, DebugText):
                    self._tell(serial, lambda item=item, record=record: {
                        "type": "trace",
                        "seq": record.seq,
                        "code": item.code,
                        "text": item.text.decode("utf-8", "replace"),
                    })

    def upload_committed(self, upload, seconds: float) -> None:
        self._tell(
            upload.hello.serial,
            lambda: {
                "type": "commit",
                "records": upload.record_count,
                "first_seq": upload.first_seq,
                "seconds": round(seconds, 3),
            },
        )

    def commit_withheld(self, upload, kind: str, reason: str) -> None:
        self._tell(
            upload.hello.serial,
            lambda: {"type": "withheld", "kind": kind, "reason": reason,
                     "first_seq": upload.first_seq},
        )

    def command_answered(self, hello: Hello, command_id: int, status: int) -> None:
        self._tell(
            hello.serial,
            lambda: {"type": "command_answered", "command": command_id, "status": status},
        )

    def protocol_error(self, hello: Hello | None, peer: str, reason: str) -> None:
        if hello is not None:
            self._tell(hello.serial, lambda: {"type": "protocol_error", "reason": reason})

    def connection_closed(self, hello: Hello | None, peer: str, outcome: str) -> None:
        if hello is None:
            return
        if self._hellos.get(hello.serial) is hello:
            del self._hellos[hello.serial]
        self._tell(hello.serial, lambda: {"type": "closed", "outcome": outcome})


def _hello_bytes(hello: Hello) -> bytes:
    return encode_frame(MessageType.HELLO, hello.payload)
