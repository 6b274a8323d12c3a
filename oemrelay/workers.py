"""
Several worker processes serving devices on the same listening addresses
(``[relay] workers``), for a relay that needs more than one core.

The process twistd runs (the parent) opens each ``[relay] listen`` socket
once per worker, all with ``SO_REUSEPORT`` on the same address, never accepts
on them, and starts the workers: each is ``python -m oemrelay.worker_main``
running the normal :func:`~oemrelay.service.build_service` on its own
sockets, inherited (``adoptStreamPort``), with its own HTTP pools and profile
cache.  The kernel spreads new device connections evenly over the sockets (by
address hash); one socket shared by all, as before, let the worker that woke
first take most (19,025, 15,945 and 13,135 of 48,105 held devices), and the
busiest reached ``max_connections`` first.  A restarted worker inherits its
predecessor's sockets, and the connections waiting in them.  An address
something already listens on is refused, as without SO_REUSEPORT.  A relay whose
devices need no TLS starts workers without pyOpenSSL
(:mod:`oemrelay.worker_main`).

The parent alone releases this node's stale registry entries at start, serves
the management API and tells every worker, over its stdin, which devices the
API changed (so their profile caches forget them at once).

A worker that ends is logged and started again after a second.  Stopping the
parent (SIGTERM) sends SIGTERM to every worker, which stops (drains) as a
single relay would, and waits for them; a worker whose parent is gone (its
stdin closed) stops too.  A worker's log lines reach the parent's log,
prefixed with its number.

Only ``tcp:``/``tcp6:`` listeners, plain or wrapped in ``haproxy:``, can be
shared this way; :func:`oemrelay.config.shareable` says which.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService, Service
from twisted.internet import tcp
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.endpoints import _WrapperServerEndpoint, serverFromString
from twisted.internet.error import CannotListenError, ProcessDone
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.internet.protocol import Factory, ProcessProtocol
from twisted.logger import Logger, eventAsText, globalLogBeginner
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure
from zope.interface import implementer

from .config import tcp_endpoint
from .oneline import one_line

if TYPE_CHECKING:
    from .config import Config

#: The exit status of a relay that failed to start (as oemrelay.service's).
START_FAILED = 1

log = Logger(namespace="oemrelay.workers")

#: Seconds before a worker that ended is started again.
RESTART_DELAY = 1.0

#: Seconds past commit_timeout a stopping worker may take before it is killed.
STOP_GRACE = 10.0

# -- in a worker -----------------------------------------------------------------


@implementer(IStreamServerEndpoint)
class _AdoptedEndpoint:
    """Listens on an inherited, already listening socket."""

    def __init__(self, reactor, fd: int, family: int) -> None:
        self._reactor = reactor
        self._fd = fd
        self._family = family

    def listen(self, factory) -> Deferred:
        port = self._reactor.adoptStreamPort(self._fd, self._family, factory)
        # adoptStreamPort dups the socket: close our copy so only the port holds it.
        os.close(self._fd)
        return succeed(port)


class AdoptedListeners:
    """
    What a worker is given: the parent's listening sockets, by the
    ``[relay] listen`` description each was opened for.

    :param sockets: description -> (file descriptor, address family).
    """

    def __init__(self, reactor, sockets: Mapping[str, tuple[int, int]]) -> None:
        self._reactor = reactor
        self._sockets = dict(sockets)

    def endpoint(self, description: str) -> IStreamServerEndpoint:
        """``description``'s endpoint, listening on the inherited socket."""
        fd, family = self._sockets[description]
        adopted = _AdoptedEndpoint(self._reactor, fd, family)
        endpoint = serverFromString(self._reactor, description)
        if isinstance(endpoint, _WrapperServerEndpoint):
            # Keep the wrapper (haproxy: reads the PROXY header), swap what it wraps.
            endpoint._wrappedEndpoint = adopted
            return endpoint
        return adopted

    def serve(self, top: MultiService, devices: Factory, ledger) -> None:
        """Serve ``devices`` on every socket; listen to the parent on stdin."""
        for description in self._sockets:
            StreamServerEndpointService(self.endpoint(description), devices).setServiceParent(top)
        _ParentChannel(self._reactor, ledger.profiles.forget).setServiceParent(top)


class _ParentLines(LineReceiver):
    delimiter = b"\n"

    def __init__(self, forget: Callable[[Iterable[int] | None], None], on_lost) -> None:
        self._forget = forget
        self._on_lost = on_lost

    def lineReceived(self, line: bytes) -> None:  # noqa: N802 - Twisted's name
        word, _, rest = line.partition(b" ")
        if word == b"forget":
            self._forget(None if rest == b"*" else [int(serial) for serial in rest.split()])

    def connectionLost(self, reason) -> None:  # noqa: N802 - Twisted's name
        self._on_lost()


class _ParentChannel(Service):
    """The worker's stdin: devices to forget; its end means the parent is gone."""

    def __init__(self, reactor, forget) -> None:
        self._reactor = reactor
        self._forget = forget

    def startService(self) -> None:
        super().startService()
        from twisted.internet.stdio import StandardIO

        StandardIO(_ParentLines(self._forget, self._parent_gone), reactor=self._reactor)

    def _parent_gone(self) -> None:
        if self.running and self._reactor.running:
            log.warn("the parent process is gone; stopping")
            self._reactor.stop()


#: The pipe buffer asked for a worker's log lines (Linux's unprivileged
#: maximum, /proc/sys/fs/pipe-max-size).  Writes to the pipe block when it is
#: full; with the default 64 KiB a parent busy for a moment during a
#: reconnect storm (a line per device) would stall the worker's reactor.
LOG_PIPE_BYTES = 1 << 20


def _widen_log_pipe(fd: int) -> None:
    try:
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, LOG_PIPE_BYTES)
    except OSError:
        pass  # not a pipe (a terminal, a file), or the limit is lower: keep the default


def _log_to_stdout(event: dict) -> None:
    text = eventAsText(event, includeTimestamp=False, includeSystem=False)
    level = event.get("log_level")
    sys.stdout.write(f"[{event.get('log_namespace', '-')}#{level.name if level else '-'}] {text}\n")
    sys.stdout.flush()


def worker_main(spec: Mapping[str, object]) -> None:
    """Run one worker (``python -m oemrelay.worker_main SPEC``, started by the parent)."""
    from twisted.application.service import Application, IService
    from twisted.internet import reactor

    from .config import load_config
    from .service import build_service

    _widen_log_pipe(sys.stdout.fileno())
    globalLogBeginner.beginLoggingTo([_log_to_stdout], redirectStandardIO=False)
    config = load_config(spec["config"])
    sockets = {description: tuple(fd_family) for description, fd_family in spec["sockets"].items()}
    application = Application("oemrelay-worker")
    build_service(config, reactor, adopted=AdoptedListeners(reactor, sockets)).setServiceParent(
        application
    )
    top = IService(application)
    top.privilegedStartService()
    top.startService()
    reactor.addSystemEventTrigger("before", "shutdown", top.stopService)
    log.info(
        "worker {index} (pid {pid}) serving, reactor {reactor}",
        index=spec["index"], pid=os.getpid(), reactor=type(reactor).__name__,
    )
    reactor.run()


# -- in the parent -----------------------------------------------------------------


class _WorkerProcess(ProcessProtocol):
    """One worker as the parent sees it: its output logged, its end reported."""

    def __init__(self, supervisor: WorkerSupervisor, index: int) -> None:
        self._supervisor = supervisor
        self.index = index
        self.ended: Deferred[None] = Deferred()
        self._partial = b""

    def outReceived(self, data: bytes) -> None:  # noqa: N802 - Twisted's name
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        for line in lines:
            log.info(
                "worker {index}: {line}", index=self.index, line=line.decode("utf-8", "replace")
            )

    errReceived = outReceived

    def processEnded(self, reason) -> None:  # noqa: N802 - Twisted's name
        self._supervisor.ended(self, reason)
        self.ended.callback(None)


class _NeverAccepts(Factory):
    """The parent's factory on the shared sockets: the workers accept, never it."""

    noisy = False

    def logPrefix(self) -> str:  # noqa: N802 - Twisted's name
        return "devices (accepted by the workers)"


_NEVER_ACCEPTS = _NeverAccepts()


class _ReusePort(tcp.Port):
    """A listening TCP port whose socket shares its address (SO_REUSEPORT)."""

    def createInternetSocket(self):  # noqa: N802 - Twisted's name
        skt = super().createInternetSocket()
        skt.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        return skt


def _refuse_if_taken(port: int, interface: str) -> None:
    """
    CannotListenError if something listens on the address already.  Another
    relay's SO_REUSEPORT sockets would otherwise let this one join them and
    split its devices, where a second relay on a port should fail to start.
    """
    family = socket.AF_INET6 if ":" in interface else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        # As Twisted's listening sockets: connections in TIME_WAIT do not count.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((interface, port))
        except OSError as error:
            raise CannotListenError(interface, port, error) from None


class _ReusePortListener:
    """
    The reactor as a TCP endpoint sees it, listening with SO_REUSEPORT; after
    the first port, on the port number that one got (``tcp:0`` picks one).
    """

    def __init__(self, reactor) -> None:
        self._reactor = reactor
        self._port_number: int | None = None

    def listenTCP(self, port: int, factory, backlog: int = 50, interface: str = ""):  # noqa: N802
        if self._port_number is None and port:
            _refuse_if_taken(port, interface)
        listening = _ReusePort(
            port if self._port_number is None else self._port_number,
            factory, backlog, interface, self._reactor,
        )
        listening.startListening()
        self._port_number = listening.getHost().port
        return listening


class WorkerSupervisor(Service):
    """
    Opens each worker's listening sockets, starts ``count`` workers and keeps
    them running; stopping it stops them.

    :param command: the worker's argv for a spec (JSON text); a test passes
        a small script.
    """

    def __init__(
        self,
        reactor,
        descriptions: tuple[str, ...],
        count: int,
        spec: Mapping[str, object],
        *,
        stop_timeout: float,
        command: Callable[[str], list[str]] | None = None,
        restart_delay: float = RESTART_DELAY,
        on_worker_exit: Callable[[int], None] = lambda pid: None,
    ) -> None:
        self._reactor = reactor
        #: Called with a worker's process id once it has ended.
        self._on_worker_exit = on_worker_exit
        self._descriptions = descriptions
        self._count = count
        self._spec = dict(spec)
        self._stop_timeout = stop_timeout
        self._command = command or (lambda spec: [sys.executable, "-m", "oemrelay.worker_main", spec])
        self._restart_delay = restart_delay
        self._ports: list = []
        #: Each worker's sockets, by index: description -> (fd, family).
        self._sockets: dict[int, dict[str, tuple[int, int]]] = {
            index: {} for index in range(1, count + 1)
        }
        #: The running workers, by index.
        self.workers: dict[int, tuple[object, _WorkerProcess]] = {}
        self._restarts: dict[int, object] = {}

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        for description in self._descriptions:
            listener = _ReusePortListener(self._reactor)
            endpoint = tcp_endpoint(serverFromString(listener, description))
            for sockets in self._sockets.values():
                port = self._listen(endpoint, description)
                self._ports.append(port)
                sockets[description] = (port.fileno(), port.addressFamily)

    @staticmethod
    def _listen(endpoint, description: str):
        outcome: list = []
        # A TCP endpoint listens at once: its Deferred has fired on return.
        endpoint.listen(_NEVER_ACCEPTS).addBoth(outcome.append)
        [port] = outcome
        if isinstance(port, Failure):
            error = port.value
            reason = error.socketError if isinstance(error, CannotListenError) else error
            sys.stderr.write(f"oemrelay: [relay] listen: {description}: cannot listen: {reason}\n")
            raise SystemExit(START_FAILED)
        # The parent never accepts: the workers do.
        port.stopReading()
        return port

    def startService(self) -> None:
        super().startService()
        if not self._ports:
            self.privilegedStartService()
        for index in range(1, self._count + 1):
            self._spawn(index)
        log.info(
            "{count} workers serving devices on {listen}",
            count=self._count,
            listen=" ".join(self._descriptions),
        )

    def _spawn(self, index: int) -> None:
        self._restarts.pop(index, None)
        sockets = self._sockets[index]
        spec = json.dumps({**self._spec, "index": index, "sockets": sockets})
        protocol = _WorkerProcess(self, index)
        fds = {0: "w", 1: "r", 2: "r", **{fd: fd for fd, _ in sockets.values()}}
        argv = self._command(spec)
        process = self._reactor.spawnProcess(
            protocol, argv[0], argv, env=dict(os.environ), childFDs=fds
        )
        self.workers[index] = (process, protocol)

    def ended(self, protocol: _WorkerProcess, reason) -> None:
        """A worker process ended: start it again unless the relay is stopping."""
        index = protocol.index
        process, current = self.workers.get(index, (None, None))
        if current is protocol:
            del self.workers[index]
            self._on_worker_exit(process.pid)
        if not self.running:
            return
        how = "exited" if reason.check(ProcessDone) else one_line(reason.value)
        log.warn(
            "worker {index} ended ({how}); starting it again in {delay:g}s",
            index=index,
            how=how,
            delay=self._restart_delay,
        )
        self._restarts[index] = self._reactor.callLater(self._restart_delay, self._spawn, index)

    def forget(self, serials: Iterable[int] | None) -> None:
        """Tell every worker to drop these devices' cached profiles (None: all)."""
        words = "*" if serials is None else " ".join(str(serial) for serial in serials)
        line = f"forget {words}\n".encode("ascii")
        for process, _ in self.workers.values():
            process.write(line)

    def stopService(self) -> Deferred:
        super().stopService()
        for restart in self._restarts.values():
            restart.cancel()
        self._restarts.clear()
        ended = []
        for process, protocol in list(self.workers.values()):
            ended.append(protocol.ended)
            try:
                process.signalProcess("TERM")
            except Exception:
                pass  # it has just ended on its own
        kill = self._reactor.callLater(self._stop_timeout, self._kill_remaining)

        def all_ended(_: object) -> None:
            if kill.active():
                kill.cancel()
            for port in self._ports:
                port.stopListening()

        return DeferredList(ended).addCallback(all_ended)

    def _kill_remaining(self) -> None:
        for process, protocol in list(self.workers.values()):
            log.warn("worker {index} did not stop in time; killing it", index=protocol.index)
            try:
                process.signalProcess(signal.SIGKILL)
            except Exception:
                pass


def build_supervisor(config: Config, reactor, on_start_failure: Callable[[], None]) -> MultiService:
    """
    The parent of ``[relay] workers`` > 1: registry, API and the workers.

    Every worker writes its metrics to one fresh directory (prometheus_client's
    multiprocess mode, set in the environment the workers inherit), and the
    parent's ``/metrics`` sums them: one answer for the whole relay.
    """
    from prometheus_client.multiprocess import mark_process_dead

    from .api import build_api_site
    from .metrics import RelayMetrics
    from .service import Listener, StartupSummary, add_registry, ready_checks

    top = MultiService()
    registry = add_registry(top, config, reactor, on_start_failure)
    metrics_dir = tempfile.mkdtemp(prefix="oemrelay-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    supervisor = WorkerSupervisor(
        reactor,
        config.relay.listen,
        config.relay.workers,
        {"config": os.path.abspath(config.source), "tls": config.devices_use_tls},
        stop_timeout=config.relay.commit_timeout + STOP_GRACE,
        on_worker_exit=lambda pid: mark_process_dead(pid, metrics_dir),
    )
    supervisor.setServiceParent(top)
    registry.on_devices_changed(supervisor.forget)
    reactor.addSystemEventTrigger("after", "shutdown", shutil.rmtree, metrics_dir, True)
    if config.api.listen:
        # The live view and the fleet's recent activity come from the device
        # path, which runs in the workers: the parent's API answers without them.
        api = build_api_site(
            registry,
            config.api.token,
            set(config.connectors),
            reactor,
            metrics=lambda: RelayMetrics.exposition_of(metrics_dir),
            metrics_public=config.api.metrics_public,
            ready_checks=ready_checks(registry, []),
        )
        for description in config.api.listen:
            Listener("api", description, api, reactor, on_start_failure).setServiceParent(top)
    StartupSummary(config, registry.url_for_logs).setServiceParent(top)
    return top
