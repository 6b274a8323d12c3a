"""
Tests for :mod:`oemrelay.workers`: the worker's side (inherited sockets,
the parent's messages) in memory, and the supervisor with real, small,
short-lived subprocesses on loopback.
"""

from __future__ import annotations

import io
import os
import socket
import sys
import textwrap

from twisted.internet import reactor, task
from twisted.internet.endpoints import _WrapperServerEndpoint
from twisted.internet.error import ConnectionDone
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from oemrelay.config import config_from_string
from oemrelay.workers import AdoptedListeners, WorkerSupervisor, _AdoptedEndpoint, _ParentLines

from .test_config import FILE_CONNECTOR, ConfigErrorAssertions


class WorkersConfigTests(ConfigErrorAssertions, SynchronousTestCase):
    """[relay] workers: a count of 1 to 64 or auto, with shareable listeners only."""

    def test_default_one(self) -> None:
        """Without the key the relay runs one process."""
        self.assertEqual(config_from_string(FILE_CONNECTOR).relay.workers, 1)

    def test_auto(self) -> None:
        """auto means one worker per core."""
        config = config_from_string("[relay]\nworkers = auto\n" + FILE_CONNECTOR)
        self.assertEqual(config.relay.workers, os.cpu_count())

    def test_bounds(self) -> None:
        """0, 65 and words other than auto are refused; 64 loads."""
        for value in ("0", "65", "many", "2.5"):
            self.assert_error(f"[relay]\nworkers = {value}\n" + FILE_CONNECTOR, "[relay] workers")
        config = config_from_string("[relay]\nworkers = 64\n" + FILE_CONNECTOR)
        self.assertEqual(config.relay.workers, 64)

    def test_unshareable_listener(self) -> None:
        """Workers cannot share a unix: listener: refused naming [relay] workers."""
        self.assert_error(
            "[relay]\nworkers = 2\nlisten = tcp:20500 unix:/tmp/x.sock\n" + FILE_CONNECTOR,
            "[relay] workers",
            "unix:/tmp/x.sock",
        )

    def test_shareable_listeners(self) -> None:
        """tcp:, tcp6: and haproxy:tcp: listeners can be shared."""
        config = config_from_string(
            "[relay]\nworkers = 2\nlisten = tcp:20500 tcp6:20501 haproxy:tcp:20502\n"
            + FILE_CONNECTOR
        )
        self.assertEqual(config.relay.workers, 2)

    def test_one_worker_any_listener(self) -> None:
        """With one worker any endpoint is fine."""
        config = config_from_string("[relay]\nlisten = unix:/tmp/x.sock\n" + FILE_CONNECTOR)
        self.assertEqual(config.relay.listen, ("unix:/tmp/x.sock",))


class _AdoptingReactor:
    def __init__(self) -> None:
        self.adopted: list = []

    def adoptStreamPort(self, fd, family, factory):  # noqa: N802 - Twisted's name
        self.adopted.append((fd, family, factory))
        return "port"


class AdoptedListenersTests(SynchronousTestCase):
    """A worker listens on the sockets it inherited, keeping a haproxy: wrapper."""

    def setUp(self) -> None:
        self.reactor = _AdoptingReactor()
        self.fd = os.dup(0)

    def test_tcp(self) -> None:
        """A tcp: listener adopts the inherited socket, then closes its own copy."""
        listeners = AdoptedListeners(self.reactor, {"tcp:20500": (self.fd, socket.AF_INET)})
        endpoint = listeners.endpoint("tcp:20500")
        self.assertEqual(self.successResultOf(endpoint.listen("factory")), "port")
        self.assertEqual(self.reactor.adopted, [(self.fd, socket.AF_INET, "factory")])
        self.assertRaises(OSError, os.fstat, self.fd)

    def test_haproxy(self) -> None:
        """A haproxy:tcp: listener keeps its PROXY-header wrapper around the adopted socket."""
        listeners = AdoptedListeners(
            self.reactor, {"haproxy:tcp:20500": (self.fd, socket.AF_INET6)}
        )
        endpoint = listeners.endpoint("haproxy:tcp:20500")
        self.assertIsInstance(endpoint, _WrapperServerEndpoint)
        self.assertIsInstance(endpoint._wrappedEndpoint, _AdoptedEndpoint)
        endpoint.listen("factory")
        [(fd, family, factory)] = self.reactor.adopted
        self.assertEqual((fd, family), (self.fd, socket.AF_INET6))
        self.assertEqual(type(factory).__name__, "HAProxyWrappingFactory")


class ParentLinesTests(SynchronousTestCase):
    """The parent's lines on a worker's stdin."""

    def setUp(self) -> None:
        self.forgotten: list = []
        self.lost: list = []
        self.lines = _ParentLines(self.forgotten.append, lambda: self.lost.append(True))

    def test_forget(self) -> None:
        """forget with serials drops those; forget * drops all; other words are ignored."""
        self.lines.dataReceived(b"forget 5 6\nforget *\nhello there\n")
        self.assertEqual(self.forgotten, [[5, 6], None])

    def test_parent_gone(self) -> None:
        """The end of stdin is reported: the parent is gone."""
        self.lines.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.lost, [True])


#: A stand-in worker: records its start, the inherited socket (descriptor,
#: port, whether it has SO_REUSEPORT) and what the parent sends; worker 1's
#: first start exits at once with status 3.
_FAKE_WORKER = textwrap.dedent(
    """
    import json, os, signal, socket, sys
    spec = json.loads(sys.argv[1])
    out = spec["out"]
    index = spec["index"]
    first = not os.path.exists(f"{out}.{index}")
    open(f"{out}.{index}", "w").close()
    [(fd, family)] = spec["sockets"].values()
    listening = socket.socket(fileno=fd)
    port = listening.getsockname()[1]
    shared = listening.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT)
    listening.detach()
    with open(out, "a") as f:
        f.write(f"started {index} {fd} {port} {shared}\\n")
    if first and index == 1:
        sys.exit(3)
    def stop(signum, frame):
        with open(out, "a") as f:
            f.write("terminated\\n")
        sys.exit(0)
    signal.signal(signal.SIGTERM, stop)
    for line in sys.stdin:
        with open(out, "a") as f:
            f.write("got " + line)
    """
)


class WorkerSupervisorTests(TestCase):
    """The supervisor passes the socket, restarts a dead worker, relays forget and stops all."""

    timeout = 30

    async def wait_for(self, what: str, condition) -> None:
        for _ in range(200):
            if condition():
                return
            await task.deferLater(reactor, 0.05, lambda: None)
        self.fail(f"timed out waiting for {what}")

    def lines(self) -> list[str]:
        if not os.path.exists(self.out):
            return []
        with open(self.out) as f:
            return f.read().splitlines()

    async def test_lifecycle(self) -> None:
        """Each worker has its own socket on the port; one that exits is restarted on it and logged; forget reaches them; stopping ends them."""
        self.out = os.path.abspath(self.mktemp())
        events: list = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        supervisor = WorkerSupervisor(
            reactor,
            ("tcp:0:interface=127.0.0.1",),
            2,
            {"out": self.out},
            stop_timeout=10,
            command=lambda spec: [sys.executable, "-c", _FAKE_WORKER, spec],
            restart_delay=0.1,
        )
        supervisor.startService()
        self.addCleanup(lambda: supervisor.stopService() if supervisor.running else None)
        await self.wait_for("the restart", lambda: len(self.started()) >= 3)
        listening = supervisor._ports[0].getHost().port
        starts = [line.split()[1:] for line in self.started()]
        by_worker = {index: {tuple(rest) for i, *rest in starts if i == index} for index in "12"}
        # One socket each, SO_REUSEPORT on the same port; the restart inherits worker 1's.
        [(fd_1, port_1, shared_1)] = by_worker["1"]
        [(fd_2, port_2, shared_2)] = by_worker["2"]
        self.assertNotEqual(fd_1, fd_2)
        self.assertEqual((port_1, port_2), (str(listening), str(listening)))
        self.assertEqual((shared_1, shared_2), ("1", "1"))
        self.assertEqual(len([start for start in starts if start[0] == "1"]), 2)
        self.assertTrue(
            any(e.get("log_format", "").startswith("worker {index} ended") for e in events)
        )
        await self.wait_for("the worker to run", lambda: 1 in supervisor.workers)
        supervisor.forget([5, 6])
        supervisor.forget(None)
        await self.wait_for(
            "the forget lines", lambda: self.lines().count("got forget *") == 2
        )
        self.assertEqual(self.lines().count("got forget 5 6"), 2)
        await supervisor.stopService()
        self.assertEqual(self.lines().count("terminated"), 2)
        self.assertEqual(supervisor.workers, {})
        self.assertEqual(len(self.started()), 3)

    def test_port_taken_by_another_relay(self) -> None:
        """A port another relay's SO_REUSEPORT workers listen on is refused, not shared."""
        other = socket.socket()
        self.addCleanup(other.close)
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        other.bind(("127.0.0.1", 0))
        other.listen(5)
        port = other.getsockname()[1]
        supervisor = WorkerSupervisor(
            reactor, (f"tcp:{port}:interface=127.0.0.1",), 2, {}, stop_timeout=10,
            command=lambda spec: [sys.executable, "-c", "pass"],
        )
        errors = io.StringIO()
        self.patch(sys, "stderr", errors)
        with self.assertRaises(SystemExit):
            supervisor.privilegedStartService()
        self.assertIn(f"tcp:{port}:interface=127.0.0.1: cannot listen", errors.getvalue())
        self.assertIn("Address already in use", errors.getvalue())
        self.assertEqual(supervisor._ports, [])

    def started(self) -> list[str]:
        return [line for line in self.lines() if line.startswith("started")]


class LogPipeTests(SynchronousTestCase):
    """A worker's log pipe is widened so a briefly busy parent does not stall it."""

    def test_pipe_widened(self) -> None:
        """The pipe to the parent holds LOG_PIPE_BYTES, not the default 64 KiB."""
        import fcntl

        from oemrelay.workers import LOG_PIPE_BYTES, _widen_log_pipe

        read_end, write_end = os.pipe()
        self.addCleanup(os.close, read_end)
        self.addCleanup(os.close, write_end)
        self.assertLess(fcntl.fcntl(write_end, fcntl.F_GETPIPE_SZ), LOG_PIPE_BYTES)
        _widen_log_pipe(write_end)
        self.assertEqual(fcntl.fcntl(write_end, fcntl.F_GETPIPE_SZ), LOG_PIPE_BYTES)

    def test_not_a_pipe(self) -> None:
        """On a file (twistd's stdout redirected) it changes nothing and raises nothing."""
        from oemrelay.workers import _widen_log_pipe

        with open(os.devnull, "w") as f:
            _widen_log_pipe(f.fileno())
