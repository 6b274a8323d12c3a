"""
Service wiring: configuration in, one MultiService out.

The registry starts first (schema created or migrated, devices this node left
marked connected after a crash set free), then the spool (its schema created,
background delivery started); connectors that hold resources are
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
from .relay import Relay
from .session import DeviceFactory
from .spool import BackgroundDelivery, DatabaseSpool, RetryPolicy
from .spool.background import DEFAULT_RETRY_INITIAL, DEFAULT_RETRY_MAX, Deliver
from .spool.store import DEFAULT_LEASE

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


#: What :func:`_open_or_stop` gives when the opening failed.
_NOT_OPENED = object()


async def _open_or_stop(
    what: str, url_for_logs: str, opening: Deferred, on_start_failure: Callable[[], None]
) -> object:
    """What ``opening`` fires with; if it fails, one critical line and the relay stops."""
    try:
        return await opening
    except Exception as error:
        log.critical(
            "cannot open {what} {url}: {reason}; stopping",
            what=what,
            url=url_for_logs,
            reason=one_line(error),
        )
        on_start_failure()
        return _NOT_OPENED


class RegistryService(Service):
    """Opens the registry at start-up and closes it at shutdown."""

    def __init__(self, registry: Registry, node: str, on_start_failure: Callable[[], None]) -> None:
        self.registry = registry
        self._node = node
        self._on_start_failure = on_start_failure

    def startService(self) -> None:
        super().startService()
        # Devices and API calls arriving meanwhile wait inside the registry.
        self._started = Deferred.fromCoroutine(self._start())

    async def _start(self) -> None:
        # Without its registry the relay could not honour custom fields or
        # overrides: stop, and let the supervisor retry.
        opened = await _open_or_stop(
            "registry", self.registry.url_for_logs,
            self.registry.start(self._node), self._on_start_failure,
        )
        if opened is _NOT_OPENED:
            return
        log.info(
            "registry {url} ready; {released} devices left connected to node"
            " {node} marked disconnected",
            url=self.registry.url_for_logs,
            released=opened,
            node=self._node,
        )

    def stopService(self) -> Deferred:
        super().stopService()
        return self._started.addBoth(lambda _: self.registry.close())


class SpoolService(Service):
    """Opens the spool at start-up, delivers from it in the background, closes it at shutdown."""

    def __init__(
        self,
        spool: DatabaseSpool,
        delivery: BackgroundDelivery,
        on_start_failure: Callable[[], None],
    ) -> None:
        self.spool = spool
        self._delivery = delivery
        self._on_start_failure = on_start_failure

    def startService(self) -> None:
        super().startService()
        self._started = Deferred.fromCoroutine(self._start())

    async def _start(self) -> None:
        # Without its spool the relay could lose what it promised to keep.
        opened = await _open_or_stop(
            "spool", self.spool.url_for_logs, self.spool.start(), self._on_start_failure
        )
        if opened is _NOT_OPENED:
            return
        log.info("spool {url} ready", url=self.spool.url_for_logs)
        self._delivery.start()

    def stopService(self) -> Deferred:
        super().stopService()
        stopped = self._started.addBoth(lambda _: self._delivery.stop())
        return stopped.addBoth(lambda _: self.spool.close())


def _ignore_loss(reason: str) -> None:
    # A spooled delivery learns of a lost end server from its own failure.
    pass


def spooled_delivery(connectors: dict, registry) -> Deliver:
    """
    How an upload leaving the spool reaches connector ``name``: a raw TCP
    connector on a connection of its own, any other through its link with
    the device's profile (for HTTP: its templates and credentials).
    """

    async def deliver(name: str, upload) -> None:
        connector = connectors[name]
        own_connection = getattr(connector, "deliver_on_own_connection", None)
        if own_connection is not None:
            await own_connection(upload)
            return
        profile = await registry.profile_for(upload.hello)
        link = connector.open_link(upload.hello, _ignore_loss)
        try:
            await link.deliver(upload, profile)
        finally:
            link.close()

    return lambda name, upload: Deferred.fromCoroutine(deliver(name, upload))


def _retry_policy(connector_config) -> RetryPolicy:
    # retry_initial and retry_max are the commit window's retry keys where
    # a connector type has them; the spool's own defaults otherwise.
    return RetryPolicy(
        connector_config.max_attempts,
        getattr(connector_config, "retry_initial", DEFAULT_RETRY_INITIAL),
        getattr(connector_config, "retry_max", DEFAULT_RETRY_MAX),
    )


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


def build_service(config: Config, reactor) -> MultiService:
    """Everything the relay runs, ready for ``twistd`` to start."""
    top = MultiService()
    on_start_failure = stop_after_failed_start(reactor)
    registry = Registry.from_url(config.relay.registry, reactor)
    RegistryService(registry, config.relay.node, on_start_failure).setServiceParent(top)
    observers = Observers()
    connectors = {}
    for name, connector_config in config.connectors.items():
        connector = build_connector(
            connector_config, reactor, config.relay.max_message, observers
        )
        if IService.providedBy(connector):
            connector.setServiceParent(top)
        connectors[name] = connector
    spool = DatabaseSpool.from_url(
        config.relay.spool,
        reactor,
        max_records=config.relay.spool_max_records,
        owner=config.relay.node,
        lease=DEFAULT_LEASE,
    )
    delivery = BackgroundDelivery(
        spool,
        spooled_delivery(connectors, registry),
        reactor,
        {name: _retry_policy(section) for name, section in config.connectors.items()},
        max_age=config.relay.spool_max_age,
        delivery_timeout=DEFAULT_LEASE / 2,
    )
    SpoolService(spool, delivery, on_start_failure).setServiceParent(top)
    relay = Relay(
        connectors,
        config.relay.connector,
        registry,
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
    for description in config.relay.listen:
        Listener("relay", description, devices, reactor, on_start_failure).setServiceParent(top)
    if config.api.listen:
        api = Site(build_api(registry, config.api.token, set(connectors), reactor, spool))
        for description in config.api.listen:
            Listener("api", description, api, reactor, on_start_failure).setServiceParent(top)
    return top
