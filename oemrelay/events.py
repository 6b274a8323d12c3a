"""
What the relay does, told to whoever watches it: the metrics and the
console's live view.

The device path calls one :class:`Observers` (held by the
:class:`~oemrelay.relay.Relay`), which passes each event to every observer
subscribed.  An observer implements any of :class:`RelayObserver`'s methods
it cares about (the others are inherited no-ops), must be quick and must not
raise: it runs on the reactor, inside the device path.  With no observer an
event costs one method call.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.logger import Logger

from .codec import Frame, Hello

log = Logger(namespace="oemrelay.events")


class RelayObserver:
    """Every event the relay tells; each method does nothing unless overridden."""

    def connection_opened(self, peer: str) -> None:
        """A device connection was accepted (no hello yet)."""

    def device_connected(self, hello: Hello, peer: str) -> None:
        """A device said hello."""

    def frame_received(self, hello: Hello, frame: Frame) -> None:
        """A frame from a device after its hello, exactly as received."""

    def upload_received(self, upload) -> None:
        """A commit request turned the device's records into ``upload`` (:class:`~oemrelay.relay.Upload`)."""

    def upload_committed(self, upload, seconds: float) -> None:
        """The device was told to delete ``upload``'s records, ``seconds`` after its commit request."""

    def commit_withheld(self, upload, kind: str, reason: str) -> None:
        """
        ``upload``'s commit was withheld.  ``kind`` is a short fixed word for
        counting (``timeout``, ``refused``, ``unreachable``, ``registry``,
        ``internal``, ...); ``reason`` is the one-line text that was logged.
        """

    def delivery_attempted(self, connector: str, outcome: str, seconds: float) -> None:
        """
        One try to hand an upload to a connector's end server took
        ``seconds``; ``outcome`` is a status class (``2xx``, ``4xx``, ``5xx``)
        or ``error`` / ``timeout``.
        """

    def delivery_retried(self, connector: str) -> None:
        """A failed try is about to be repeated inside the commit window."""

    def copy_not_spooled(self, upload, connectors: tuple[str, ...], reason: str) -> None:
        """
        ``upload``'s best-effort copy for ``connectors`` could not be spooled
        (the commit went ahead: every required connector had accepted it).
        """

    def command_answered(self, hello: Hello, command_id: int, status: int) -> None:
        """A device answered a command (0x21) with ``status``."""

    def connection_closed(self, hello: Hello | None, peer: str, outcome: str) -> None:
        """
        A device connection ended.  ``outcome``: ``device`` (the device or
        the network closed it), ``protocol_error``, ``withheld``,
        ``end_server_lost``, ``idle``, ``drained``, ``hello_timeout``,
        ``frame_timeout``, ``shed`` (closed before its hello to make room at
        max_connections), ``refused`` (over max_connections_per_ip).
        """

    def connection_refused(self, peer: str, reason: str) -> None:
        """
        A connection was refused at a limit before it was read; ``reason``
        is the limit's key: ``max_connections`` or ``max_connections_per_ip``.
        """

    def protocol_error(self, hello: Hello | None, peer: str, reason: str) -> None:
        """A device broke the protocol (the connection closes); ``reason`` is one line."""

    def registry_called(self, call: str, seconds: float) -> None:
        """
        One registry call (``call`` names its transaction function, as
        ``txn_profile_for``) took ``seconds``, waiting for a pool thread included.
        """


_EVENTS = tuple(
    name for name, value in vars(RelayObserver).items()
    if callable(value) and not name.startswith("_")
)


class Observers(RelayObserver):
    """Passes every event on to the observers subscribed, in order."""

    def __init__(self) -> None:
        self._observers: list[RelayObserver] = []
        self._bind()

    def subscribe(self, observer: RelayObserver) -> Callable[[], None]:
        """Start telling ``observer``; returns the call that stops it."""
        self._observers.append(observer)
        self._bind()

        def unsubscribe() -> None:
            if observer in self._observers:
                self._observers.remove(observer)
                self._bind()

        return unsubscribe

    def _bind(self) -> None:
        # Each event becomes an instance attribute calling only the observers
        # that override it, so an event nobody watches costs one no-op call.
        for name in _EVENTS:
            targets = [
                getattr(observer, name)
                for observer in self._observers
                if getattr(type(observer), name) is not getattr(RelayObserver, name)
            ]
            setattr(self, name, _fan_out(name, targets))


def _fan_out(name: str, targets: list[Callable[..., None]]) -> Callable[..., None]:
    if not targets:
        return _nothing
    if len(targets) == 1:
        [target] = targets

        def one(*args: object) -> None:
            try:
                target(*args)
            except Exception:
                _failed(name)

        return one

    # One loop with the guard inside it: no wrapper call per observer (an
    # upload's events reach three observers; each call costs on the hot path).
    def each(*args: object) -> None:
        for target in targets:
            try:
                target(*args)
            except Exception:
                _failed(name)

    return each


def _nothing(*args: object) -> None:
    pass


def _failed(name: str) -> None:
    # An observer's bug must never break a device's path.
    log.failure("observer failed on {event}", event=name)
