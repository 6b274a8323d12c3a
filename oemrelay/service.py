"""
Service wiring: configuration in, one MultiService out.

The registry starts first (schema created or migrated, devices this node left
marked connected after a crash set free), then the spool (its schema created,
background delivery started); connectors that hold resources are
child services, so their pools close on shutdown; each ``[relay] listen``
endpoint serves devices and each ``[api] listen`` endpoint the management API.

The relay's events feed one :class:`~oemrelay.metrics.RelayMetrics`, served
with ``/healthz`` and ``/readyz`` on the API listeners; once every listener
has started, one line says what runs.

A failure at start-up (a port in use, a registry that cannot be opened) is
one line, and the process exits with status 1, so a supervisor such as
systemd sees a failed start rather than a clean stop.
"""

from __future__ import annotations

import atexit
import gc
import os
import resource
import sys
from collections.abc import Callable

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import CancelledError, Deferred, maybeDeferred
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols.haproxy._wrapper import HAProxyWrappingFactory
from twisted.python.failure import Failure
from zope.interface import implementer

from . import __version__
from .activity import FleetActivity
from .api import build_api_site
from .config import Config, RelayConfig, connector_target, exposed_secrets_warning
from .connectors import build_connector
from .events import Observers
from .live import LiveHub
from .metrics import RelayMetrics
from .oneline import one_line
from .registry import Registry
from .registry.hot_path import RelayLedger
from .relay import Relay, connector_names
from .retry import RetryPolicy
from .session import DeviceFactory
from .spool import BackgroundDelivery, DatabaseSpool, LatestSpoolFigures
from .spool import RetryPolicy as SpooledRetryPolicy
from .spool.background import Deliver
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
        # Without its registry the relay could not honour custom fields or
        # overrides: stop, and let the supervisor retry.
        opened = await _open_or_stop(
            "registry", self.registry.url_for_logs,
            self.registry.start(self._node if self._release_node else None),
            self._on_start_failure,
        )
        if opened is _NOT_OPENED:
            return
        if not self._release_node:
            log.info("registry {url} ready", url=self.registry.url_for_logs)
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
        if not self.running:
            # Stopped while opening (another service failed to start): the
            # reactor is shutting down and the spool's threads with it.
            return
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


def _retry_policy(connector_config) -> SpooledRetryPolicy:
    # Spooled uploads wait out long outages: the spool's own backoff (1 s
    # doubling to 60 s), not the commit window's seconds.
    return SpooledRetryPolicy(connector_config.max_attempts)


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


class _QuietHAProxyFactory(HAProxyWrappingFactory):
    """The PROXY protocol wrapper without its "Starting factory <... at 0x...>" line."""

    noisy = False


def _quiet_wrappers(endpoint):
    """``endpoint``, its ``haproxy:`` wrapper (if any) made quiet."""
    # haproxy: endpoints wrap the factory at listen time with the class held
    # here; Twisted offers no other way to choose it.
    if getattr(endpoint, "_wrapperFactory", None) is HAProxyWrappingFactory:
        endpoint._wrapperFactory = _QuietHAProxyFactory
    return endpoint


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
        endpoint = _ReportingEndpoint(
            _quiet_wrappers(serverFromString(reactor, description)), where, self._failed
        )
        super().__init__(endpoint, factory)
        self.description = description
        self._on_start_failure = on_start_failure
        self._starting = False
        self._failure_now: str | None = None
        #: The listening port once the endpoint is bound (for /readyz).
        self.port = None

    def privilegedStartService(self) -> None:
        self._starting = True
        try:
            super().privilegedStartService()
        finally:
            self._starting = False
        self._waitingForPort.addCallback(self._bound)
        if self._failure_now is not None:
            sys.stderr.write(f"oemrelay: {self._failure_now}\n")
            raise SystemExit(START_FAILED)

    def _bound(self, port):
        self.port = port
        return port

    def _failed(self, line: str) -> None:
        if self._starting:
            # Raised by privilegedStartService, outside the Deferred's callbacks.
            self._failure_now = line
            return
        sys.stderr.write(f"oemrelay: {line}\n")
        self._on_start_failure()


#: The start-up line; :func:`startup_fields` fills it.
STARTUP_FORMAT = (
    "oemrelay {version} running: devices on {listen}; {connectors};"
    " registry {registry}; API {api}; workers {workers}"
)


#: The collector's thresholds while a relay serves devices (Python's: 700,
#: 10, 10).  Uploads in flight live for hundreds of milliseconds under load,
#: long enough to be promoted past the young generations, so the default
#: thresholds ran full collections over every object the relay holds ever
#: more often as devices grew: at 2,000 devices the relay committed 46,500
#: records/s with them and 55,500 with these (500 devices: 55,200 and
#: 59,400; bench/run's rows, docs/performance.rst).
GC_THRESHOLDS = (10_000, 20, 100)


class CollectorTuning(Service):
    """Sets :data:`GC_THRESHOLDS` while running; puts the previous ones back when stopped."""

    def __init__(self) -> None:
        self._previous: tuple[int, int, int] | None = None

    def startService(self) -> None:
        super().startService()
        self._previous = gc.get_threshold()
        gc.set_threshold(*GC_THRESHOLDS)

    def stopService(self) -> None:
        super().stopService()
        if self._previous is not None:
            gc.set_threshold(*self._previous)
            self._previous = None


class StartupSummary(Service):
    """Logs, once every listener has been started, the one line saying what runs."""

    def __init__(self, config: Config, registry_url: str) -> None:
        self._config = config
        self._registry_url = registry_url

    def startService(self) -> None:
        super().startService()
        log.info(STARTUP_FORMAT, **startup_fields(self._config, self._registry_url))


def startup_fields(config: Config, registry_url: str) -> dict[str, object]:
    """
    What is in force, as the start-up line's fields, with no secret.

    :param registry_url: the registry's URL without its password.
    """
    relay = config.relay
    names = connector_names(relay.connector) or (next(iter(config.connectors)),)
    return {
        "version": __version__,
        "listen": " ".join(
            [*relay.listen, *(f"{description} (TLS)" for description in relay.tls_listen)]
        ),
        "connectors": "; ".join(
            f"connector {name}: {connector_target(config.connectors[name])}"
            for name in names
        ),
        "registry": registry_url,
        "api": " ".join(config.api.listen) if config.api.listen else "off",
        "workers": relay.workers,
    }


def ready_checks(
    registry: Registry, listeners: list[Listener], spool: DatabaseSpool | None = None
) -> list[tuple[str, Callable]]:
    """
    What ``GET /readyz`` checks: every listener bound, the registry answering
    a query, the spool taking a write.
    """

    def listening() -> None:
        unbound = [listener.description for listener in listeners if listener.port is None]
        if unbound:
            raise RuntimeError(f"not bound: {' '.join(unbound)}")

    checks = [
        ("listeners", listening),
        ("registry", lambda: registry.database.query_one("SELECT 1")),
    ]
    if spool is not None:
        checks.append(("spool", spool.check_writable))
    return checks
class StopInOrder(MultiService):
    """
    Stops its children one after the other, the last added first, each once
    the one before has finished: devices drain before the connectors, the
    spool and the registry they need are closed.
    """

    def stopService(self) -> Deferred:
        Service.stopService(self)
        return Deferred.fromCoroutine(self._stop_each())

    async def _stop_each(self) -> None:
        for service in reversed(list(self)):
            try:
                await maybeDeferred(service.stopService)
            except Exception:
                log.failure("stopping a service failed")


class DeviceService(MultiService):
    """
    The device listeners and the connections they accepted.  Stopping it
    stops listening first, then lets deliveries in flight finish for up to
    ``shutdown_grace``, answers their commits and closes every device.  The
    spool's own service stops after it (:class:`StopInOrder`): its background
    deliveries end and release their claims before the spool closes.
    """

    def __init__(self, devices: DeviceFactory, relay: Relay, shutdown_grace: float) -> None:
        super().__init__()
        self._devices = devices
        self._relay = relay
        self._grace = shutdown_grace

    def stopService(self) -> Deferred:
        listeners = super().stopService()
        return Deferred.fromCoroutine(self._drain(listeners))

    async def _drain(self, listeners: Deferred) -> None:
        await listeners
        if self._devices.connections:
            log.info(
                "stopping: {count} device connections to finish, for up to {grace:g}s",
                count=self._devices.connections,
                grace=self._grace,
            )
        await self._devices.drain(self._grace)


#: File descriptors the relay needs besides one per device connection
#: (listeners, registry, spool, end-server connections, logs).
SPARE_FILES = 256


def fit_file_limit(
    max_connections: int,
    getrlimit: Callable[[int], tuple[int, int]] = resource.getrlimit,
    setrlimit: Callable[[int, tuple[int, int]], None] = resource.setrlimit,
) -> str | None:
    """
    Raise the process's open-file limit to what ``max_connections`` devices
    need, as far as the hard limit allows; a one-line warning if it cannot.
    """
    if not max_connections:
        return None  # no limit configured: nothing to fit
    needed = max_connections + SPARE_FILES
    soft, hard = getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return None
    reachable = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    if reachable > soft:
        try:
            setrlimit(resource.RLIMIT_NOFILE, (reachable, hard))
            soft = reachable
        except (OSError, ValueError):
            pass
    if soft >= needed:
        return None
    return (
        f"[relay] max_connections {max_connections} needs {needed} open files, but the"
        f" limit is {soft}: lower max_connections or raise LimitNOFILE"
    )


def tls_devices(relay: RelayConfig, devices: Factory) -> Factory:
    """``devices`` behind the TLS policy of ``[relay] tls_listen``, from its keys."""
    # Imported here: a relay without TLS loads no pyOpenSSL (see oemrelay.tls).
    from twisted.protocols.tls import TLSMemoryBIOFactory

    from .tls import server_tls_options

    options = server_tls_options(
        relay.tls_cert,
        relay.tls_key,
        min_version=relay.tls_min_version,
        ciphers=relay.tls_ciphers,
        client_ca=relay.client_ca,
    )
    factory = TLSMemoryBIOFactory(options, False, devices)
    factory.noisy = False
    return factory


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
    top = StopInOrder()
    if adopted is None:
        for warning in (
            exposed_secrets_warning(config),
            fit_file_limit(config.relay.max_connections),
        ):
            if warning is not None:
                log.warn("{warning}", warning=warning)
    registry = add_registry(top, config, reactor, on_start_failure, main=adopted is None)
    # Profiles cached, commit counters batched: no query per upload.
    ledger = RelayLedger(registry, reactor, config.relay.profile_cache_seconds)
    ledger.activity.setServiceParent(top)
    observers = Observers()
    registry.database.call_observer = observers
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
    spool_figures = LatestSpoolFigures(spool)
    metrics = RelayMetrics(spool_figures)
    observers.subscribe(metrics)
    relay = Relay(
        connectors,
        config.relay.connector,
        ledger,
        node=config.relay.node,
        clock=reactor,
        observers=observers,
        retry=RetryPolicy(reactor, config.relay.retry_initial, config.relay.retry_max),
        commit_timeout=config.relay.commit_timeout,
        roles=config.roles,
        commit_policy=config.relay.commit_policy,
        spool=spool,
        unknown_devices=config.relay.unknown_devices,
    )
    devices = DeviceFactory(
        relay,
        reactor,
        commit_timeout=config.relay.commit_timeout,
        idle_timeout=config.relay.idle_timeout,
        max_message=config.relay.max_message,
        max_records_per_upload=config.relay.max_records_per_upload,
        max_upload_memory=config.relay.max_upload_memory,
        hello_timeout=config.relay.hello_timeout,
        frame_timeout=config.relay.frame_timeout,
        max_connections=config.relay.max_connections,
        max_connections_per_ip=config.relay.max_connections_per_ip,
        device_certificates=bool(config.relay.client_ca),
    )
    device_service = DeviceService(devices, relay, config.relay.drain_seconds)
    device_service.setServiceParent(top)
    if adopted is not None:
        # A worker: the parent listens, serves the API and tells it of changes.
        adopted.serve(device_service, devices, ledger)
        return top
    listeners = []
    for description in config.relay.listen:
        listener = Listener("relay", description, devices, reactor, on_start_failure)
        listener.setServiceParent(device_service)
        listeners.append(listener)
    if config.relay.tls_listen:
        over_tls = tls_devices(config.relay, devices)
        for description in config.relay.tls_listen:
            listener = Listener("relay", description, over_tls, reactor, on_start_failure)
            listener.setServiceParent(device_service)
            listeners.append(listener)
    if config.api.listen:
        live, activity = LiveHub(reactor), FleetActivity(reactor)
        observers.subscribe(live)
        observers.subscribe(activity)
        api = build_api_site(
            registry,
            config.api.token,
            set(connectors),
            reactor,
            metrics=metrics.exposition,
            metrics_public=config.api.metrics_public,
            # Read at each check: the API's own listeners are added below.
            ready_checks=ready_checks(registry, listeners, spool),
            live=live,
            activity=activity,
            spool_stats=spool_figures.latest,
            spool=spool,
        )
        for description in config.api.listen:
            listener = Listener("api", description, api, reactor, on_start_failure)
            listener.setServiceParent(top)
            listeners.append(listener)
    CollectorTuning().setServiceParent(top)
    StartupSummary(config, registry.url_for_logs).setServiceParent(top)
    return top
