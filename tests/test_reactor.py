"""
oemrelay.reactor: the epoll reactor that handles ready sockets without a
logging context, on socket pairs (no network) and its own reactor instance.
"""

from __future__ import annotations

import socket
import subprocess
import sys

from twisted.internet.error import ConnectionDone
from twisted.trial.unittest import SynchronousTestCase

from oemrelay import reactor as relay_reactor


class _Reader:
    """An IReadDescriptor over one end of a socket pair, doing ``on_read`` when ready."""

    def __init__(self, sock: socket.socket, on_read) -> None:
        self.sock = sock
        self.on_read = on_read
        self.reads = 0
        self.lost: list = []
        #: How often the reactor asked for a log prefix (Twisted's does per event).
        self.prefixes_asked = 0

    def fileno(self) -> int:
        return self.sock.fileno()

    def doRead(self):  # noqa: N802 - Twisted's name
        self.reads += 1
        return self.on_read()

    def connectionLost(self, reason) -> None:  # noqa: N802 - Twisted's name
        self.lost.append(reason)

    def logPrefix(self) -> str:  # noqa: N802 - Twisted's name
        self.prefixes_asked += 1
        return "reader"


class RelayReactorTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = relay_reactor.RelayReactor()
        self.sockets: list[socket.socket] = []
        self.addCleanup(self.close)

    def close(self) -> None:
        self.reactor.removeAll()
        self.reactor.waker.connectionLost(None)
        self.reactor._poller.close()
        for sock in self.sockets:
            sock.close()

    def socket_pair(self) -> tuple[socket.socket, socket.socket]:
        pair = socket.socketpair()
        self.sockets += pair
        return pair

    def ready_reader(self, on_read=lambda: None) -> _Reader:
        """A reader with a byte waiting, added to the reactor."""
        ours, theirs = self.socket_pair()
        theirs.send(b"x")
        reader = _Reader(ours, on_read)
        self.reactor.addReader(reader)
        return reader

    def test_ready_reader_read(self) -> None:
        """A ready socket's reader is called once a poll, and a quiet one not at all."""
        ready = self.ready_reader()
        ours, theirs = self.socket_pair()
        quiet = _Reader(ours, lambda: None)
        self.reactor.addReader(quiet)
        self.reactor.doPoll(0)
        self.assertEqual((ready.reads, quiet.reads), (1, 0))
        # What it is for: no logging context built for the event.
        self.assertEqual(ready.prefixes_asked, 0)

    def test_blocking_poll_returns_for_a_ready_socket(self) -> None:
        """doPoll(None) waits for an event (and there is one)."""
        reader = self.ready_reader()
        self.reactor.doIteration(None)
        self.assertEqual(reader.reads, 1)

    def test_failing_read_loses_that_connection_only(self) -> None:
        """A reader that raises is logged and disconnected; the other ready readers are read."""
        def fail():
            raise ValueError("broken reader")

        broken, sound = self.ready_reader(fail), self.ready_reader()
        self.reactor.doPoll(0)
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)
        self.assertEqual(len(broken.lost), 1)
        self.assertEqual((sound.reads, sound.lost), (1, []))

    def test_failing_disconnect_logged_and_polling_goes_on(self) -> None:
        """What losing a connection raises is logged once, and the next ready reader is read."""
        closing = self.ready_reader(lambda: ConnectionDone())

        def lost_badly(reason) -> None:
            raise RuntimeError("connectionLost failed")

        closing.connectionLost = lost_badly
        sound = self.ready_reader()
        self.reactor.doPoll(0)
        errors = self.flushLoggedErrors(RuntimeError)
        self.assertEqual(len(errors), 1)
        self.assertEqual(sound.reads, 1)

    def test_reader_removed_by_an_earlier_event_not_called(self) -> None:
        """A socket an earlier event of the same poll removed is skipped."""
        readers: list[_Reader] = []

        def remove_the_other() -> None:
            for reader in readers:
                if reader.reads == 0:
                    self.reactor.removeReader(reader)

        readers += [self.ready_reader(remove_the_other), self.ready_reader(remove_the_other)]
        self.reactor.doPoll(0)
        self.assertEqual(sorted(reader.reads for reader in readers), [0, 1])


class InstallTests(SynchronousTestCase):
    def test_not_installed_over_a_reactor(self) -> None:
        """Under trial a reactor is installed: install() leaves it."""
        from twisted.internet import reactor

        before = reactor
        self.assertFalse(relay_reactor.install())
        from twisted.internet import reactor as after

        self.assertIs(after, before)

    def test_installed_where_none_is(self) -> None:
        """In a fresh process install() makes RelayReactor the global reactor."""
        shown = subprocess.run(
            [sys.executable, "-c",
             "from oemrelay import reactor as r; installed = r.install();"
             " from twisted.internet import reactor;"
             " print(installed, type(reactor).__name__)"],
            capture_output=True, text=True, check=True, timeout=60,
        ).stdout
        self.assertEqual(shown.split(), ["True", "RelayReactor"])
