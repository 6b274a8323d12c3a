"""
Telling the relays that share a PostgreSQL registry which devices' settings
changed, so their profile caches forget them at once (``LISTEN/NOTIFY``).

A change through any relay's API sends, in the same transaction, a
notification on :data:`DEVICES_CHANNEL` whose payload is the serials changed
(``*`` for too many to list).  :class:`ChangeListener` holds one dedicated
connection per relay, in its own thread, and passes what it hears to the
reactor.  While it is not connected changes may be missed: on every
(re)connection it reports "everything may have changed".  SQLite has no
notifications; there ``profile_cache_seconds`` bounds how stale a profile
can be when another process changed it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from ..oneline import one_line

log = Logger(namespace="oemrelay.registry")

#: The notification channel of device setting changes.
DEVICES_CHANNEL = "oemrelay_devices"

#: The longest payload listed serial by serial (PostgreSQL's limit is 8000 bytes).
MAX_PAYLOAD = 7000

#: Seconds between two attempts to (re)connect the listening connection.
RETRY_SECONDS = 5.0

#: Seconds the listening thread waits for a notification before it checks
#: whether it should stop.
_POLL_SECONDS = 1.0


def changes_payload(serials: Iterable[int]) -> str:
    """The payload announcing that ``serials`` changed."""
    payload = " ".join(str(serial) for serial in serials)
    return payload if len(payload) <= MAX_PAYLOAD else "*"


def changed_serials(payload: str) -> list[int] | None:
    """The serials a payload announces; None for "any device" (or a payload not understood)."""
    try:
        return [int(word) for word in payload.split()] if payload != "*" else None
    except ValueError:
        return None


class ChangeListener(Service):
    """
    LISTENs on :data:`DEVICES_CHANNEL` and calls ``on_change(serials)`` in
    the reactor for each notification (``None``: any device may have changed).

    :param connect: opens a new autocommit psycopg connection (called in the
        listener's thread).
    """

    def __init__(
        self,
        connect: Callable[[], object],
        reactor,
        on_change: Callable[[Iterable[int] | None], None],
        retry_seconds: float = RETRY_SECONDS,
    ) -> None:
        self._connect = connect
        self._reactor = reactor
        self._on_change = on_change
        self._retry_seconds = retry_seconds
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._ended: Deferred[None] = Deferred()

    def startService(self) -> None:
        super().startService()
        self._thread = threading.Thread(
            target=self._run, name="oemrelay-registry-listen", daemon=True
        )
        self._thread.start()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        self._stopping.set()
        return self._ended

    def _tell(self, serials: list[int] | None) -> None:
        self._reactor.callFromThread(self._on_change, serials)

    def _run(self) -> None:
        try:
            while not self._stopping.is_set():
                try:
                    self._listen()
                except Exception as error:
                    self._reactor.callFromThread(
                        log.warn,
                        "registry: cannot listen for other relays' device changes,"
                        " retrying in {seconds:g}s: {reason}",
                        seconds=self._retry_seconds,
                        reason=one_line(error),
                    )
                    self._stopping.wait(self._retry_seconds)
        finally:
            self._reactor.callFromThread(self._ended.callback, None)

    def _listen(self) -> None:
        connection = self._connect()
        try:
            connection.execute(f"LISTEN {DEVICES_CHANNEL}")
            # Whatever changed while nobody listened is unknown.
            self._tell(None)
            while not self._stopping.is_set():
                for notification in connection.notifies(timeout=_POLL_SECONDS):
                    self._tell(changed_serials(notification.payload))
        finally:
            connection.close()
