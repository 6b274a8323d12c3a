"""
write_now: a device's answer sent at once, on a real socket pair (no
network, no reactor turn: MemoryReactor records what would be watched).
"""

from __future__ import annotations

import socket

from twisted.internet import tcp
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactor, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from oemrelay.writes import write_now


class WriteNowTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = MemoryReactor()
        ours, self.peer = socket.socketpair()
        self.peer.setblocking(False)
        self.addCleanup(self.peer.close)
        self.transport = tcp.Server(ours, Protocol(), ("127.0.0.1", 1), None, 0, self.reactor)
        self.transport.repstr = "<test transport>"  # set by a listening port's transport
        self.addCleanup(self.lose)

    def lose(self) -> None:
        if self.transport.connected:
            self.transport.connectionLost(Failure(ConnectionDone()))

    def received(self) -> bytes:
        try:
            return self.peer.recv(1 << 20)
        except BlockingIOError:
            return b""

    def test_sent_before_the_reactor_turns(self) -> None:
        """With nothing queued the data is on the socket at once and nothing waits to be written."""
        write_now(self.transport, b"\x02\x55\x06\x01\x00\x01")
        self.assertEqual(self.received(), b"\x02\x55\x06\x01\x00\x01")
        self.assertEqual(self.reactor.getWriters(), [])
        self.assertEqual(self.transport._tempDataLen, 0)

    def test_queued_behind_a_queued_write(self) -> None:
        """After a write still queued, it is queued too: the device gets them in order."""
        self.transport.write(b"first ")
        write_now(self.transport, b"second")
        self.assertEqual(self.received(), b"")
        self.assertEqual(self.reactor.getWriters(), [self.transport])
        self.transport.doWrite()
        self.assertEqual(self.received(), b"first second")

    def test_rest_queued_when_the_socket_takes_part(self) -> None:
        """What the socket does not take now is queued, the part it took already sent."""
        self.peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        data = bytes(range(256)) * 4096  # 1 MiB: more than both buffers
        write_now(self.transport, data)
        queued = self.transport._tempDataLen
        self.assertGreater(queued, 0)
        self.assertEqual(self.reactor.getWriters(), [self.transport])
        received = self.received()
        self.assertEqual(len(received) + queued, len(data))
        self.assertEqual(received, data[: len(received)])
        # Part of the rest now in the transport's send buffer, none in its list:
        # a later answer still goes behind it.
        self.transport.doWrite()
        self.assertGreater(len(self.transport.dataBuffer), self.transport.offset)
        received += self.received()  # the socket has room again
        write_now(self.transport, b"tail")
        while self.reactor.getWriters():
            received += self.received()
            self.transport.doWrite()
        received += self.received()
        self.assertEqual(received, data + b"tail")

    def test_lost_connection_queued_without_raising(self) -> None:
        """A peer gone makes the send fail: the data is queued, no exception, and the reactor finds the loss."""
        self.peer.close()
        write_now(self.transport, b"answer")
        self.assertEqual(self.transport._tempDataLen, len(b"answer"))
        self.assertEqual(self.reactor.getWriters(), [self.transport])

    def test_nothing_once_the_connection_is_lost(self) -> None:
        """After the connection is lost (its socket gone) the write is dropped, as Twisted's is."""
        self.lose()
        write_now(self.transport, b"late")
        self.assertEqual(self.received(), b"")
        # Dropped, not queued for a writer that will never run.
        self.assertEqual(self.reactor.getWriters(), [])
        self.assertEqual(self.transport._tempDataLen, 0)

    def test_other_transports_use_their_write(self) -> None:
        """A transport that is no plain TCP connection (TLS, a test's) gets an ordinary write."""
        transport = StringTransport()
        write_now(transport, b"\x02\x55")
        self.assertEqual(transport.value(), b"\x02\x55")
