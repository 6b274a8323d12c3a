"""
A minimal Digital Matter end server for the raw TCP benchmark: answers each
hello with a hello response and each commit request with "committed".  The
same sink stands behind the relay's tcp connector and behind HAProxy.

    python bench/dm_sink.py   (prints its port, serves until killed)
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from twisted.internet import reactor  # noqa: E402
from twisted.internet.protocol import Factory, Protocol  # noqa: E402

from oemrelay.codec import COMMIT_SUCCESS, FrameDecoder, MessageType, hello_response  # noqa: E402


class _Sink(Protocol):
    def connectionMade(self) -> None:  # noqa: N802
        self._decoder = FrameDecoder()

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        for message in self._decoder.feed(data):
            kind = getattr(message, "type", None)
            if kind == MessageType.COMMIT_REQUEST:
                self.transport.write(COMMIT_SUCCESS)
            elif kind == MessageType.HELLO:
                self.transport.write(hello_response_for(message))


def hello_response_for(frame) -> bytes:
    from oemrelay.codec import parse_hello

    return hello_response(parse_hello(frame.payload), reactor.seconds())


factory = Factory.forProtocol(_Sink)
factory.noisy = False
port = reactor.listenTCP(0, factory, interface="127.0.0.1", backlog=4096)
print(port.getHost().port, flush=True)
reactor.run()
