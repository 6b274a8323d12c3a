"""
Fault injection: the real daemon on loopback against scripted end servers
that answer 5xx/429 (with and without Retry-After), 400, hang, reset, are
down, answer late; a relay stopped with SIGTERM mid-delivery (drained) and
one killed with SIGKILL mid-upload and restarted.

Every scenario counts records sent, committed to the device, accepted by
the end server, duplicated and lost, and asserts the promise: nothing is
committed to a device that the end server did not accept.  The daemon must
never crash and its memory stays bounded.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from twisted.internet.task import deferLater
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from oemrelay.codec import MessageType

from .test_end_to_end import (
    COMMIT_REQUEST,
    DART_HELLO,
    DENMARK,
    DENMARK_SEQ,
    _RelayTestCase,
    http_config,
    seq_numbers,
    unused_port,
)

#: The daemon's resident memory must stay under this (it starts near 60 MB).
MAX_RSS_KIB = 300 * 1024


@dataclass(frozen=True)
class Answer:
    """One scripted answer: a status (0: reset the connection), headers, a delay (None: hang)."""

    status: int = 200
    headers: tuple[tuple[bytes, bytes], ...] = ()
    delay: float | None = 0.0


@dataclass
class Tally:
    """What happened to the records of a run."""

    sent: list[int] = field(default_factory=list)
    committed: list[int] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)

    @property
    def duplicated(self) -> int:
        """Records the end server accepted more than once."""
        return len(self.accepted) - len(set(self.accepted))

    @property
    def lost(self) -> int:
        """Records committed to the device (deleted there) that no end server accepted."""
        return len(set(self.committed) - set(self.accepted))


class ScriptedEndServer(Resource):
    """Answers requests from a script, then with ``then``; records seqs and keys."""

    isLeaf = True

    def __init__(self, reactor, tally: Tally, script: list[Answer], then: Answer = Answer()) -> None:
        super().__init__()
        self._reactor = reactor
        self._tally = tally
        self._script = list(script)
        self._then = then
        self.requests: list[tuple[float, str, list[int]]] = []
        self.pending: list = []
        self._held: list = []

    def render(self, request):
        seqs = seq_numbers(request.content.read())
        key = (request.getHeader(b"Idempotency-Key") or b"").decode("ascii")
        self.requests.append((time.monotonic(), key, seqs))
        answer = self._script.pop(0) if self._script else self._then
        if answer.status == 0:
            request.transport.abortConnection()
            return NOT_DONE_YET
        if answer.delay is None:
            self._held.append(request)
            return NOT_DONE_YET
        if answer.delay:
            # Processed when the delay is over whether or not the relay still
            # waits, as a real end server would: a late answer is a duplicate.
            self.pending.append(
                self._reactor.callLater(answer.delay, self._finish, request, answer, seqs)
            )
            request.notifyFinish().addErrback(lambda _: None)
            return NOT_DONE_YET
        return self._respond(request, answer, seqs)

    def _respond(self, request, answer: Answer, seqs: list[int]) -> bytes:
        if 200 <= answer.status < 300:
            self._tally.accepted.extend(seqs)
        request.setResponseCode(answer.status)
        for name, value in answer.headers:
            request.setHeader(name, value)
        return b"ok"

    def _finish(self, request, answer: Answer, seqs: list[int]) -> None:
        body = self._respond(request, answer, seqs)
        if not request._disconnected:
            request.write(body)
            request.finish()

    def cancel_pending(self) -> None:
        """Drop answers not yet given."""
        for call in self.pending:
            if call.active():
                call.cancel()


def faults_config(server, commit_timeout: float = 5, timeout: float = 1) -> str:
    """A relay posting to ``server`` (anything with a ``port``) with quick retries."""
    return http_config(server, commit_timeout, timeout, retry_max=1, retry_initial=0.2)


@dataclass(frozen=True)
class Unreachable:
    """An end server that is down: a port nothing listens on."""

    port: int


class _FaultTestCase(_RelayTestCase):
    """Plays one device upload against a scripted end server and tallies it."""

    def setUp(self) -> None:
        super().setUp()
        self.tally = Tally()

    def end_server(self, script: list[Answer], then: Answer = Answer()) -> ScriptedEndServer:
        return self.serve_http(ScriptedEndServer(self.reactor, self.tally, script, then))

    async def upload(self, port: int, name: str = "device"):
        """Connect, send DENMARK and a commit request; the device, once answered or closed."""
        device = await self.connect_device(port, name)
        device.send(DART_HELLO, DENMARK, COMMIT_REQUEST)
        self.tally.sent.extend(DENMARK_SEQ)
        await self.wait_until(
            lambda: device.closed or device.got(MessageType.COMMIT_RESPONSE), f"{name}'s answer"
        )
        if device.got(MessageType.COMMIT_RESPONSE):
            self.tally.committed.extend(DENMARK_SEQ)
        return device

    def assert_promise_kept(self) -> None:
        """Nothing committed that was not accepted; the daemon alive and its memory bounded."""
        self.assertEqual(self.tally.lost, 0, self.tally)
        self.assertFalse(self.daemon.ended, f"the relay died{self._daemon_output()}")
        self.assertLess(daemon_rss_kib(self.daemon_process.pid), MAX_RSS_KIB)


def daemon_rss_kib(pid: int) -> int:
    """The resident memory of process ``pid``, in KiB."""
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


class RetriedFaultsTests(_FaultTestCase):
    """Transient end-server faults inside the commit window cost the device nothing."""

    async def assert_committed_after(self, script: list[Answer], **config) -> ScriptedEndServer:
        server = self.end_server(script)
        port = await self.start_daemon(faults_config(server, **config))
        device = await self.upload(port)
        self.assertTrue(device.got(MessageType.COMMIT_RESPONSE), self.events)
        self.assertFalse(device.closed)
        self.assertEqual(len(server.requests), len(script) + 1)
        self.assertEqual(len({key for _, key, _ in server.requests}), 1)
        self.assertEqual(sorted(set(self.tally.accepted)), DENMARK_SEQ)
        self.assert_promise_kept()
        return server

    async def test_500_and_503_retried(self) -> None:
        """A 500 then a 503 are retried; the third POST is accepted and committed, same Idempotency-Key."""
        await self.assert_committed_after([Answer(500), Answer(503)])

    async def test_429_retry_after_honoured(self) -> None:
        """A 429 with Retry-After: 1 is retried no sooner than a second later."""
        server = await self.assert_committed_after([Answer(429, ((b"Retry-After", b"1"),))])
        (first, _, _), (second, _, _) = server.requests
        self.assertGreaterEqual(second - first, 0.95)

    async def test_reset_retried(self) -> None:
        """A connection reset mid-request is retried."""
        await self.assert_committed_after([Answer(0)])

    async def test_hang_retried(self) -> None:
        """A POST left unanswered past the connector's timeout is retried within commit_timeout."""
        await self.assert_committed_after([Answer(delay=None)])

    async def test_late_answer_retried(self) -> None:
        """An answer arriving after the connector's timeout does not count; the retry's does."""
        await self.assert_committed_after([Answer(delay=1.5)])
        await self.wait_until(lambda: self.tally.duplicated, "the late answer")
        # Processed late by the end server: a duplicate it can drop by its key.
        self.assertEqual(self.tally.duplicated, len(DENMARK_SEQ))


class WithheldFaultsTests(_FaultTestCase):
    """Faults the window cannot absorb: the commit is withheld and the device closed."""

    async def assert_withheld(self, script: list[Answer], then: Answer, most_seconds: float) -> ScriptedEndServer:
        server = self.end_server(script, then)
        port = await self.start_daemon(faults_config(server))
        started = time.monotonic()
        device = await self.upload(port)
        self.assertTrue(device.closed)
        self.assertFalse(device.got(MessageType.COMMIT_RESPONSE))
        self.assertLess(time.monotonic() - started, most_seconds)
        self.assert_promise_kept()
        return server

    async def test_400_not_retried(self) -> None:
        """A 400 is final: one POST, the device closed at once."""
        server = await self.assert_withheld([], Answer(400), 2.0)
        self.assertEqual(len(server.requests), 1)

    async def test_retry_after_beyond_window_gives_up(self) -> None:
        """A 503 asking for 60 s gives up at once rather than hold the device 5 s."""
        server = await self.assert_withheld([], Answer(503, ((b"Retry-After", b"60"),)), 2.0)
        self.assertEqual(len(server.requests), 1)

    async def test_503_throughout_bounded_by_commit_timeout(self) -> None:
        """An end server answering 503 throughout is retried until commit_timeout, then the device closed."""
        server = await self.assert_withheld([], Answer(503), 7.0)
        self.assertGreater(len(server.requests), 2)

    async def test_end_server_down(self) -> None:
        """Nothing listening: retried, then withheld within commit_timeout."""
        port = await self.start_daemon(faults_config(Unreachable(unused_port())))
        device = await self.upload(port)
        self.assertTrue(device.closed)
        self.assertEqual(self.tally.committed, [])
        self.assert_promise_kept()


class StopFaultsTests(_FaultTestCase):
    """SIGTERM drains; SIGKILL loses nothing that was committed."""

    async def test_sigterm_drains_uploads_in_flight(self) -> None:
        """SIGTERM with 5 uploads in flight: all 5 are committed, then the relay stops cleanly within grace."""
        server = self.end_server([], Answer(delay=1.5))
        port = await self.start_daemon(faults_config(server, commit_timeout=5, timeout=3))
        devices = []
        for n in range(5):
            device = await self.connect_device(port, f"device{n}")
            device.send(DART_HELLO, DENMARK, COMMIT_REQUEST)
            devices.append(device)
        await self.wait_until(lambda: len(server.requests) == 5, "five POSTs")
        stopped = time.monotonic()
        self.daemon_process.signalProcess("TERM")
        await self.wait_until(lambda: self.daemon.ended, "the relay to exit", 8)
        self.assertLess(time.monotonic() - stopped, 5 + 1)
        # A clean stop: twistd then ends by the signal it got, which systemd
        # counts as success (tests.test_end_to_end's SIGTERM test).
        self.assertEqual((self.daemon.exit_code, self.daemon.signal), (None, 15))
        self.assertIn(b"Server Shut Down.", self.daemon.output)
        self.assertNotIn(b"Traceback", self.daemon.output)
        for device in devices:
            self.assertTrue(device.got(MessageType.COMMIT_RESPONSE), device.name)
            self.assertTrue(device.closed)
        self.assertEqual(len(self.tally.accepted), 5 * len(DENMARK_SEQ))

    async def test_sigkill_mid_upload_then_restart(self) -> None:
        """Killed while an upload is in flight: not committed; after restart the resend is committed; nothing lost."""
        server = self.end_server([Answer(delay=2.0)])
        config = faults_config(server, commit_timeout=5, timeout=3)
        port = await self.start_daemon(config)
        device = await self.connect_device(port)
        device.send(DART_HELLO, DENMARK, COMMIT_REQUEST)
        self.tally.sent.extend(DENMARK_SEQ)
        await self.wait_until(lambda: len(server.requests) == 1, "the first POST")
        self.daemon_process.signalProcess("KILL")
        await self.wait_until(lambda: device.closed, "the device to be cut off")
        self.assertFalse(device.got(MessageType.COMMIT_RESPONSE))
        await deferLater(self.reactor, 2.1, lambda: None)  # the end server's late answer
        port = await self.start_daemon(config)
        resent = await self.upload(port, "resend")
        self.assertTrue(resent.got(MessageType.COMMIT_RESPONSE))
        # The end server accepted the first POST after the kill: one duplicate
        # batch, carrying the same Idempotency-Key for it to drop.
        self.assertEqual(self.tally.duplicated, len(DENMARK_SEQ))
        self.assertEqual(len({key for _, key, _ in server.requests}), 1)
        self.assert_promise_kept()
