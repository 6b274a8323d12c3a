"""
Service wiring: configuration in, one MultiService out.

The registry starts first (schema created or migrated, devices this node left
marked connected after a crash set free); connectors that hold resources are
child services, so their pools close on shutdown; each ``[relay] listen``
endpoint serves devices and each ``[api] listen`` endpoint the management API.

A failure at start-up (a port in use, a registry that cannot be opened) is
one line, and the process exits with status 1, so a supervisor such as
systemd sees a failed start rather than a clean stop.
"""

from __future__ import annotations

import atexit
import os
import sys
from collections.abc import Callable

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import Site
from zope.interface import implementer

from .api import build_api
from .config import Config
from .connectors import build_connector
from .events import Observers
from .oneline import one_line
from .registry import Registry
from .registry.hot_path import RelayLedger
from .relay import Relay
from .session import DeviceFactory

log = Logger(namespace="oemrelay.service")

#: The exit status of a relay that failed to start.
START_FAILED = 1


def _exit_now(status: int) -> None:
    # twistd has shut down and removed its pid file by now; only the status
    # it would end with (0) is wrong.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def stop_after_failed_start(reactor) -> Callable[[], None]:
    """
    What a service calls when it cannot start: the reactor stops, then the
    process exits with :data:`START_FAILED` instead of twistd's 0.
    """

    def stop() -> None:
        atexit.register(_exit_now, START_FAILED)
        if reactor.running:
            reactor.stop()
        else:
            reactor.callWhenRunning(reactor.stop)

    return stop


class RegistryService(Service):
    """Opens the registry at start-up and closes it at shutdown."""

    def __init__(
        self, registry: Registry, node: str, on_start_failure: Callable[[], None],
        *, release_node: bool = True,
    ) -> None:
        self.registry = registry
        self._node = node
        self._on_start_failure = on_start_failure
        # A worker leaves releasing the node's stale devices to its parent.
        self._release_node = release_node

    def startService(self) -> None:
        super().startService()
        # Devices and API calls arriving meanwhile wait inside the registry.
        self._started = Deferred.fromCoroutine(self._start())

    async def _start(self) -> None:
        try:
            released = await self.registry.start(self._node if self._release_node else None)
        except Exception as error:
            # Without its registry the relay could not honour custom fields
            # or overrides: stop, and let the supervisor retry.
            log.critical(
                "cannot open registry {url}: {reason}; stopping",
                url=self.registry.url_for_logs,
                reason=one_line(error),
            )
            self._on_start_failure()
            return
        if not self._release_node:
            log.info("registry {url} ready", url=self.registry.url_for_logs)
            return
        log.info(
            "registry {url} ready; {released} devices left connected to node"
            " {node} marked disconnected",
            url=self.registry.url_for_logs,
            released=released,
            node=self._node,
        )

    def stopService(self) -> Deferred:
        super().stopService()
        return self._started.addBoth(lambda _: self.registry.close())


@implementer(IStreamServerEndpoint)
class _ReportingEndpoint:
    """An endpoint whose failure to listen is kept as one line, not logged as a traceback."""

    def __init__(self, endpoint, where: str, on_failure: Callable[[str], None]) -> None:
        self._endpoint = endpoint
        self._where = where
        self._on_failure = on_failure

    def listen(self, factory) -> Deferred:
        return self._endpoint.listen(factory).addErrback(self._cannot_listen)

    def _cannot_listen(self, failure: Failure) -> Failure | None:
        if failure.check(CancelledError):
            return failure  # stopped before it listened: not a failure to start
        error = failure.value
        reason = error.socketError if isinstance(error, CannotListenError) else error
        self._on_failure(f"{self._where}: cannot listen: {reason}")


class Listener(StreamServerEndpointService):
    """
    A listening endpoint.  One that cannot be opened is one line on stderr
    and exit status 1: at once if it fails while twistd starts services
    (tcp:, ssl:, unix: do), else by stopping the reactor.
    """

    def __init__(
        self, section: str, description: str, factory, reactor,
        on_start_failure: Callable[[], None],
    ) -> None:
        where = f"[{section}] listen: {description}"
        endpoint = _ReportingEndpoint(serverFromString(reactor, description), where, self._failed)
        super().__init__(endpoint, factory)
        self._on_start_failure = on_start_failure
        self._starting = False
        self._failure_now: str | None = None

    def privilegedStartService(self) -> None:
        self._starting = True
        try:
            super().privilegedStartService()
        finally:
            self._starting = False
        if self._failure_now is not None:
            sys.stderr.write(f"oemrelay: {self._failure_now}\n")
            raise SystemExit(START_FAILED)

    def _failed(self, line: str) -> None:
        if self._starting:
            # Raised by privilegedStartService, outside the Deferred's callbacks.
            self._failure_now = line
            return
        sys.stderr.write(f"oemrelay: {line}\n")
        self._on_start_failure()


def add_registry(
    top: MultiService, config: Config, reactor, on_start_failure: Callable[[], None],
    *, main: bool = True,
) -> Registry:
    """
    The registry, opened and closed by a child of ``top``.  The ``main``
    process of a relay (not a worker) also releases the node's stale devices
    and listens for other relays' changes (PostgreSQL).
    """
    registry = Registry.from_url(config.relay.registry, reactor)
    RegistryService(
        registry, config.relay.node, on_start_failure, release_node=main
    ).setServiceParent(top)
    listener = registry.change_listener(reactor) if main else None
    if listener is not None:
        listener.setServiceParent(top)
    return registry


def build_service(config: Config, reactor, *, adopted=None) -> MultiService:
    """
    Everything the relay runs, ready for ``twistd`` to start.

    :param adopted: in a worker process (:mod:`oemrelay.workers`), the
        parent's listening sockets; with ``[relay] workers`` above 1 and no
        ``adopted``, the parent that starts the workers.
    """
    on_start_failure = stop_after_failed_start(reactor)
    if adopted is None and config.relay.workers > 1:
        from .workers import build_supervisor

        return build_supervisor(config, reactor, on_start_failure)
    top = MultiService()
    registry = add_registry(top, config, reactor, on_start_failure, main=adopted is None)
    # Profiles cached, commit counters batched: no query per upload.
    ledger = RelayLedger(registry, reactor, config.relay.profile_cache_seconds)
    ledger.activity.setServiceParent(top)
    observers = Observers()
    connectors = {}
    for name, connector_config in config.connectors.items():
        connector = build_connector(
            connector_config, reactor, config.relay.max_message, observers
        )
        if IService.providedBy(connector):
            connector.setServiceParent(top)
        connectors[name] = connector
    relay = Relay(
        connectors,
        config.relay.connector,
        ledger,
        node=config.relay.node,
        clock=reactor,
        observers=observers,
    )
    devices = DeviceFactory(
        relay,
        reactor,
        commit_timeout=config.relay.commit_timeout,
        idle_timeout=config.relay.idle_timeout,
        max_message=config.relay.max_message,
    )
    if adopted is not None:
        # A worker: the parent listens, serves the API and tells it of changes.
        adopted.serve(top, devices, ledger)
        return top
    for description in config.relay.listen:
        Listener("relay", description, devices, reactor, on_start_failure).setServiceParent(top)
    if config.api.listen:
        api = Site(build_api(registry, config.api.token, set(connectors), reactor))
        for description in config.api.listen:
            Listener("api", description, api, reactor, on_start_failure).setServiceParent(top)
    return top
