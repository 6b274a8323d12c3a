"""
The reactor the relay runs on: Twisted's epoll reactor, without a logging
context built per ready socket.

Twisted's ``EPollReactor`` hands every ready socket to its reader or writer
through ``log.callWithLogger``, which asks the protocol for its log prefix
and pushes a new legacy logging context around the call.  Under load that
wrapper was about 11 % of the relay's CPU on the raw TCP path (two socket
events per upload) and 5 % on the HTTP path.  Only ``twisted.python.log``'s
legacy calls read that context: the relay's own log lines
(``twisted.logger``) do not, so what is given up is the connection's prefix
in the ``system`` field of Twisted's own "Unhandled Error" lines, which keep
their tracebacks.

:func:`install` makes it the global reactor (twistd's plugin and the
workers call it) unless a reactor is installed already, as with
``twistd --reactor=...`` or under trial; on a system without epoll it does
nothing and Twisted's default is used.
"""

from __future__ import annotations

import sys

from twisted.python import log

try:
    from twisted.internet.epollreactor import EPollReactor
except ImportError:  # no epoll: not Linux
    EPollReactor = None


if EPollReactor is not None:

    class RelayReactor(EPollReactor):
        """``EPollReactor``, each ready socket handled without a logging context."""

        def doPoll(self, timeout: float | None) -> None:  # noqa: N802 - Twisted's name
            # As EPollReactor: at most as many events as tracked sockets.
            # (None blocks; an interrupted wait is retried by Python, PEP 475.)
            events = self._poller.poll(timeout, len(self._selectables))
            selectables = self._selectables
            handle = self._doReadOrWrite
            for fd, event in events:
                # Gone if an earlier event of this poll closed it.
                selectable = selectables.get(fd)
                if selectable is None:
                    continue
                try:
                    # Catches and logs what a read or write raises itself;
                    # this catches what losing the connection then raises.
                    handle(selectable, fd, event)
                except KeyboardInterrupt:
                    raise  # as Twisted's log.callWithLogger lets it through
                except BaseException:
                    log.err(None, "error handling a socket event")

        doIteration = doPoll


def install() -> bool:
    """
    Install :class:`RelayReactor` as the global reactor unless a reactor is
    installed already or epoll is missing; whether it was installed.
    """
    if EPollReactor is None or "twisted.internet.reactor" in sys.modules:
        return False
    from twisted.internet.main import installReactor

    installReactor(RelayReactor())
    return True
