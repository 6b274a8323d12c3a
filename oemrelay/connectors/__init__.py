"""
Connectors: where uploads go.  One module per ``type``; :func:`build_connector`
turns a ``[connector:NAME]`` section into a connector.
"""

from __future__ import annotations

import functools

from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

from ..config import (
    ConnectorConfig,
    FileConnectorConfig,
    HttpConnectorConfig,
    TcpConnectorConfig,
)
from ..events import RelayObserver
from ..relay import Connector
from .file import FileConnector
from .http import HttpConnector, build_http_client, build_token_client
from .tcp import TcpConnector


def build_connector(
    config: ConnectorConfig,
    reactor,
    max_message: int,
    observers: RelayObserver | None = None,
) -> Connector:
    """The connector for one configured section, using ``reactor``, telling ``observers``."""
    if isinstance(config, HttpConnectorConfig):
        token_client = (
            build_token_client(reactor, config) if config.auth_scheme == "oauth2" else None
        )
        return HttpConnector(
            config, build_http_client(reactor, config), reactor, observers, token_client
        )
    if isinstance(config, TcpConnectorConfig):
        return TcpConnector.from_config(config, reactor, max_message)
    if isinstance(config, FileConnectorConfig):
        # One thread keeps appends in order; the connector starts and stops it.
        pool = ThreadPool(minthreads=1, maxthreads=1, name=f"oemrelay-file-{config.name}")
        return FileConnector(config, functools.partial(deferToThreadPool, reactor, pool), pool)
    raise TypeError(f"no connector for {config!r}")
