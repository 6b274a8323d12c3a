"""
Service wiring: configuration in, one MultiService out.

The registry starts first (schema created or migrated, devices this node left
marked connected after a crash set free); connectors that hold resources are
child services, so their pools close on shutdown; each ``[relay] listen``
endpoint serves devices and each ``[api] listen`` endpoint the management API.
"""

from __future__ import annotations

import sys

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.logger import Logger
from twisted.web.server import Site

from .api import build_api
from .config import Config
from .connectors import build_connector
from .registry import Registry
from .relay import Relay
from .session import DeviceFactory

log = Logger(namespace="oemrelay.service")


class RegistryService(Service):
    """Opens the registry at start-up and closes it at shutdown."""

    def __init__(self, registry: Registry, node: str, reactor) -> None:
        self.registry = registry
        self._node = node
        self._reactor = reactor

    def startService(self) -> None:
        super().startService()
        # Devices and API calls arriving meanwhile wait inside the registry.
        self._started = Deferred.fromCoroutine(self._start())

    async def _start(self) -> None:
        try:
            released = await self.registry.start(self._node)
        except Exception as error:
            # Without its registry the relay could not honour custom fields
            # or overrides: stop, and let the supervisor retry.
            log.critical(
                "cannot open registry {url}: {reason}; stopping",
                url=self.registry.url_for_logs,
                reason=" ".join(str(error).split()),
            )
            self._reactor.stop()
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


class _Listener(StreamServerEndpointService):
    """A listening endpoint; one that cannot be opened stops twistd with one line."""

    def __init__(self, section: str, description: str, factory, reactor) -> None:
        super().__init__(serverFromString(reactor, description), factory)
        self._where = f"[{section}] listen: {description}"
        self._raiseSynchronously = True

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except CannotListenError as error:
            reason = error.socketError
            sys.stderr.write(f"oemrelay: {self._where}: cannot listen: {reason}\n")
            raise SystemExit(1) from None


def _listen(section: str, description: str, factory, reactor, parent: MultiService) -> None:
    _Listener(section, description, factory, reactor).setServiceParent(parent)


def build_service(config: Config, reactor) -> MultiService:
    """Everything the relay runs, ready for ``twistd`` to start."""
    top = MultiService()
    registry = Registry.from_url(config.relay.registry, reactor)
    RegistryService(registry, config.relay.node, reactor).setServiceParent(top)
    connectors = {}
    for name, connector_config in config.connectors.items():
        connector = build_connector(connector_config, reactor, config.relay.max_message)
        if IService.providedBy(connector):
            connector.setServiceParent(top)
        connectors[name] = connector
    relay = Relay(
        connectors,
        config.relay.connector,
        registry,
        node=config.relay.node,
        clock=reactor,
    )
    devices = DeviceFactory(
        relay,
        reactor,
        commit_timeout=config.relay.commit_timeout,
        idle_timeout=config.relay.idle_timeout,
        max_message=config.relay.max_message,
    )
    for description in config.relay.listen:
        _listen("relay", description, devices, reactor, top)
    if config.api.listen:
        api = Site(build_api(registry, config.api.token, set(connectors), reactor))
        for description in config.api.listen:
            _listen("api", description, api, reactor, top)
    return top
