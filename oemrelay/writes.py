"""
Writes on the hot path sent at once: answers to devices, and uploads passed
on to a raw TCP end server.

Twisted's TCP transport queues every ``write`` for the reactor's next turn:
the socket is registered for writability, the reactor wakes for it and
dispatches it, sends, and unregisters it.  Each of these writes is the only
one of its turn, and the other side waits for it: :func:`write_now` sends it
straight away when nothing is queued before it, and leaves anything unsent,
and every other transport, to the transport's own buffer.

Measured with ``bench/run`` (500 devices x 10 records, relay CPU per
upload): device answers at once took the raw TCP path from 73 to 62 µs, and
uploads passed on at once from 56-58 to 54 (three rounds each way).  POSTs
sent at once made the HTTP path slower, 136-150 -> 157-160 µs (three
rounds; nginx's answers then come back over more reactor turns, fewer to
each): they keep Twisted's buffer.
"""

from __future__ import annotations

from twisted.internet.tcp import Connection


def write_now(transport, data: bytes) -> None:
    """Write ``data`` on ``transport``, sending at once what the socket takes now."""
    if (
        # Plain TCP (and UNIX) sockets; TLS over one has its own buffer.
        isinstance(transport, Connection)
        and not transport.TLS
        # Once lost, the transport has no socket left.
        and transport.connected
        # Nothing queued before it: the order of writes is kept.
        and not transport.dataBuffer
        and not transport._tempDataLen
    ):
        sent = transport.writeSomeData(data)
        if sent.__class__ is not int:
            # The connection is lost: queued like any write; the reactor
            # reports the loss.
            sent = 0
        if sent == len(data):
            return
        data = data[sent:]
    transport.write(data)
