"""
Service wiring: configuration in, one MultiService out.

Connectors that hold resources are child services (so their pools close on
shutdown); each ``listen`` endpoint string becomes a server endpoint service
with the device factory.
"""

from __future__ import annotations

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IService, MultiService
from twisted.internet.endpoints import serverFromString

from .config import Config
from .connectors import build_connector
from .relay import Relay
from .session import DeviceFactory


def build_service(config: Config, reactor) -> MultiService:
    """Everything the relay runs, ready for ``twistd`` to start."""
    top = MultiService()
    connectors = {}
    for name, connector_config in config.connectors.items():
        connector = build_connector(connector_config, reactor, config.relay.max_message)
        if IService.providedBy(connector):
            connector.setServiceParent(top)
        connectors[name] = connector
    relay = Relay(connectors, config.relay.connector)
    factory = DeviceFactory(
        relay,
        reactor,
        commit_timeout=config.relay.commit_timeout,
        idle_timeout=config.relay.idle_timeout,
        max_message=config.relay.max_message,
    )
    for description in config.relay.listen:
        listener = StreamServerEndpointService(
            serverFromString(reactor, description), factory
        )
        # A port that cannot be opened stops twistd instead of idling.
        listener._raiseSynchronously = True
        listener.setServiceParent(top)
    return top
