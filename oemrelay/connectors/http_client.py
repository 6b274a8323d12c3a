"""
A lean HTTP/1.1 client for one job: POSTing uploads to end servers.

The HTTP connector used treq over twisted.web's Agent; a profile of the
relay under load put about 30 % of its CPU in that stack (a request
wrapper, URL parsing, a cookie and a content-decoding agent per request,
``Headers`` objects, a line-based response parser).  This client does only
what the connector needs:

- per end server (scheme, host, port) a pool of at most ``pool_size``
  persistent connections; requests beyond that wait their turn in order;
- a request is one ``transport.write`` of bytes built at once;
- the answer is read by :class:`ResponseParser`, a small sans-I/O machine
  (status, headers, a body by ``Content-Length``, chunked or until close),
  keeping at most ``max_kept_body`` bytes of the body;
- one deadline per request covers the wait for a slot, the connect, the
  answer and its body; the requests of one timeout share a
  :class:`~oemrelay.deadlines.DeadlineQueue` (one reactor timer for all).

No cookies, no redirects, no content decoding: the connector decides what
an answer means.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Callable, Mapping
from urllib.parse import quote

from twisted.internet.defer import Deferred, DeferredList, TimeoutError, succeed
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.protocol import Factory, Protocol

from ..deadlines import DeadlineQueue, DeadlineQueues, Entry
from ..oneline import one_line

#: The most bytes of a status line and headers (and of a chunked body's trailers).
MAX_HEAD = 64 * 1024
#: The most bytes of an answer's body kept; the rest is read and dropped.
MAX_KEPT_BODY = 64 * 1024
#: The longest chunk-size line of a chunked body (the size and its extensions).
_MAX_CHUNK_LINE = 1024

_DEFAULT_PORTS = {"http": 80, "https": 443}
_HEX = re.compile(rb"[0-9A-Fa-f]+")
_URL = re.compile(r"(https?)://([^/?#]*)([^#]*)", re.IGNORECASE)


#: Header names written unlike Http-Header-Case (as twisted.web writes them).
_NAME_EXCEPTIONS = {
    b"Content-Md5": b"Content-MD5",
    b"Dnt": b"DNT",
    b"Etag": b"ETag",
    b"P3p": b"P3P",
    b"Te": b"TE",
    b"Www-Authenticate": b"WWW-Authenticate",
    b"X-Xss-Protection": b"X-XSS-Protection",
}
_wire_names: dict[bytes, bytes] = {}


def wire_name(name: bytes) -> bytes:
    """
    A header name as sent: Http-Header-Case, as treq and twisted.web sent
    the relay's headers before (servers should not care; some do).
    """
    wired = _wire_names.get(name)
    if wired is None:
        wired = b"-".join([word.capitalize() for word in name.split(b"-")])
        wired = _NAME_EXCEPTIONS.get(wired, wired)
        if len(_wire_names) < 1000:  # the connector's few names; bounded anyway
            _wire_names[name] = wired
    return wired


class BadAnswer(Exception):
    """
    An end server's answer that cannot be read (or did not end).  The
    message is one line and quotes nothing the server sent.
    """


class Answer:
    """An end server's final answer: status code, headers, the start of the body."""

    __slots__ = ("code", "headers", "body", "keep_alive")

    def __init__(
        self, code: int, headers: dict[bytes, list[bytes]], body: bytes, keep_alive: bool
    ) -> None:
        self.code = code
        #: Lower-case header name -> its values, in the order received.
        self.headers = headers
        #: The body's first bytes, at most the client's ``max_kept_body``.
        self.body = body
        #: Whether the connection may carry another request.
        self.keep_alive = keep_alive

    def header(self, name: bytes) -> bytes | None:
        """The first value of header ``name`` (lower case), or None."""
        values = self.headers.get(name)
        return values[0] if values else None

    def __repr__(self) -> str:
        return f"<Answer {self.code}, {len(self.body)} body bytes kept>"


# ResponseParser states.
_HEAD, _LENGTH, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_END, _TRAILERS, _UNTIL_CLOSE, _DONE = range(8)


def _end_within(buffer: bytes, marker: bytes, limit: int, too_long: str) -> int:
    """
    Where ``marker`` (ending a head, trailers or a chunk size line) starts in
    ``buffer``, -1 if not there yet; BadAnswer (``too_long``, its ``{limit}``
    filled in) if what it ends is over ``limit`` bytes, or must be, as an
    unended one is at least all but a part of the marker.
    """
    end = buffer.find(marker)
    if (end if end >= 0 else len(buffer) - len(marker) + 1) > limit:
        raise BadAnswer(too_long.format(limit=limit))
    return end


class ResponseParser:
    """
    Reads one HTTP/1.x answer to a POST from bytes fed in any pieces.

    Interim (1xx) answers are skipped.  :meth:`feed` returns True once the
    final answer has ended (then :meth:`answer` gives it, and :attr:`extra`
    holds any bytes that came after it); :meth:`connection_closed` says the
    stream ended.  Both raise :class:`BadAnswer` for an answer that cannot
    be read.
    """

    def __init__(self, max_head: int = MAX_HEAD, max_kept_body: int = MAX_KEPT_BODY) -> None:
        self._max_head = max_head
        self._max_kept = max_kept_body
        self._state = _HEAD
        self._buffer = b""
        self._remaining = 0
        self._kept: list[bytes] = []
        self._kept_size = 0
        self._code = 0
        self._headers: dict[bytes, list[bytes]] = {}
        self._keep_alive = False
        #: Whether any byte has arrived.
        self.received_any = False
        #: Bytes received after the end of the answer.
        self.extra = b""

    @property
    def done(self) -> bool:
        return self._state == _DONE

    def answer(self) -> Answer:
        """The final answer, once :meth:`feed` or :meth:`connection_closed` said it ended."""
        assert self._state == _DONE
        return Answer(self._code, self._headers, b"".join(self._kept), self._keep_alive)

    def feed(self, data: bytes) -> bool:
        """Take the next bytes of the stream; True once the answer has ended."""
        if data:
            self.received_any = True
        buffer = self._buffer + data if self._buffer else data
        self._buffer = b""
        while True:
            state = self._state
            if state == _HEAD:
                if buffer[:2] == b"\r\n":
                    # Stray empty lines before a status line are ignored (RFC 9112 2.2).
                    buffer = buffer.lstrip(b"\r\n")
                end = _end_within(
                    buffer, b"\r\n\r\n", self._max_head,
                    "the answer's header is over {limit} bytes",
                )
                if end < 0:
                    self._buffer = buffer
                    return False
                self._read_head(buffer[:end])
                buffer = buffer[end + 4 :]
            elif state == _LENGTH or state == _CHUNK_DATA:
                remaining = self._remaining
                if len(buffer) < remaining:
                    self._keep(buffer)
                    self._remaining = remaining - len(buffer)
                    return False
                self._keep(buffer[:remaining] if remaining < len(buffer) else buffer)
                buffer = buffer[remaining:]
                self._state = _DONE if state == _LENGTH else _CHUNK_END
            elif state == _CHUNK_SIZE:
                end = _end_within(
                    buffer, b"\r\n", _MAX_CHUNK_LINE, "a chunk size line of the answer is too long"
                )
                if end < 0:
                    self._buffer = buffer
                    return False
                size = buffer[:end].split(b";", 1)[0].strip(b" \t")
                if not _HEX.fullmatch(size):
                    raise BadAnswer("the answer has an invalid chunk size")
                buffer = buffer[end + 2 :]
                self._remaining = int(size, 16)
                self._state = _CHUNK_DATA if self._remaining else _TRAILERS
            elif state == _CHUNK_END:
                if len(buffer) < 2:
                    self._buffer = buffer
                    return False
                if buffer[:2] != b"\r\n":
                    raise BadAnswer("a chunk of the answer does not end with CRLF")
                buffer = buffer[2:]
                self._state = _CHUNK_SIZE
            elif state == _TRAILERS:
                if len(buffer) < 2:
                    self._buffer = buffer
                    return False
                if buffer[:2] == b"\r\n":
                    buffer = buffer[2:]
                else:
                    # Trailer fields are read past and dropped.
                    end = _end_within(
                        buffer, b"\r\n\r\n", self._max_head,
                        "the answer's trailers are over {limit} bytes",
                    )
                    if end < 0:
                        self._buffer = buffer
                        return False
                    buffer = buffer[end + 4 :]
                self._state = _DONE
            elif state == _UNTIL_CLOSE:
                self._keep(buffer)
                return False
            else:  # _DONE
                self.extra = buffer
                return True

    def connection_closed(self) -> None:
        """
        The stream has ended.  Ends an answer read until close;
        :raises BadAnswer: if the answer had not ended.
        """
        if self._state == _UNTIL_CLOSE:
            self._state = _DONE
        elif self._state != _DONE:
            if not self.received_any:
                raise BadAnswer("the connection closed before any answer")
            if self._state == _HEAD:
                raise BadAnswer("the connection closed in the answer's header")
            raise BadAnswer("the connection closed before the answer's body ended")

    def _keep(self, data: bytes) -> None:
        room = self._max_kept - self._kept_size
        if room > 0 and data:
            kept = data[:room] if len(data) > room else data
            self._kept.append(kept)
            self._kept_size += len(kept)

    def _read_head(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        version, _, rest = lines[0].partition(b" ")
        if version == b"HTTP/1.1":
            http11 = True
        elif version == b"HTTP/1.0":
            http11 = False
        else:
            raise BadAnswer("the answer is not HTTP/1.x")
        code = rest[:3]
        if len(code) != 3 or not code.isdigit() or rest[3:4] not in (b"", b" ") or code[0] == 48:
            raise BadAnswer("the answer's status line is malformed")
        headers: dict[bytes, list[bytes]] = {}
        last: list[bytes] | None = None
        for line in lines[1:]:
            if line[:1] in (b" ", b"\t"):
                # An obsolete line folding (RFC 9112 5.2): one value on two lines.
                if last is None:
                    raise BadAnswer("the answer's header starts with a continuation line")
                last[-1] = last[-1] + b" " + line.strip(b" \t")
                continue
            name, colon, value = line.partition(b":")
            if not colon or not name or name[-1:] in (b" ", b"\t"):
                raise BadAnswer("the answer has a malformed header line")
            last = headers.setdefault(name.lower(), [])
            last.append(value.strip(b" \t"))
        status = int(code)
        if status < 200:
            if status == 101:
                raise BadAnswer("the end server switched protocols")
            return  # 100 Continue, 102, 103: the final answer follows
        self._code = status
        self._headers = headers
        connection = headers.get(b"connection")
        if connection is None:
            keep_alive = http11
        else:
            tokens = {token.strip().lower() for token in b",".join(connection).split(b",")}
            keep_alive = b"close" not in tokens if http11 else b"keep-alive" in tokens
        transfer_encoding = headers.get(b"transfer-encoding")
        length = headers.get(b"content-length")
        if status == 204 or status == 304:
            self._state = _DONE
        elif transfer_encoding is not None:
            codings = b",".join(transfer_encoding).split(b",")
            if codings[-1].strip().lower() == b"chunked":
                self._state = _CHUNK_SIZE
                # Both framings at once may be a smuggling attempt: not reused.
                if length is not None:
                    keep_alive = False
            else:
                self._state = _UNTIL_CLOSE
                keep_alive = False
        elif length is not None:
            # "5, 5" (a header repeated by a proxy) is 5; "5, 6" is unreadable.
            values = {value.strip() for value in b",".join(length).split(b",")}
            value = values.pop() if len(values) == 1 else b""
            if not value.isdigit():
                raise BadAnswer("the answer's Content-Length is invalid")
            self._remaining = int(value)
            self._state = _LENGTH if self._remaining else _DONE
        else:
            self._state = _UNTIL_CLOSE
            keep_alive = False
        self._keep_alive = keep_alive


# _Exchange states.
_WAITING, _ACTIVE, _FINISHED = range(3)


class _Exchange:
    """One request: its bytes, its deadline, and where it is (waiting, active, done)."""

    __slots__ = (
        "server",
        "request",
        "deferred",
        "deadlines",
        "deadline",
        "timeout",
        "state",
        "connection",
        "connecting",
    )

    def __init__(
        self, server: _Server, request: bytes, timeout: float, deadlines: DeadlineQueue, now: float
    ) -> None:
        self.server = server
        self.request = request
        self.timeout = timeout
        self.state = _WAITING
        self.connection: _Connection | None = None
        self.connecting: Deferred | None = None
        self.deferred: Deferred[Answer] = Deferred(self._cancelled)
        self.deadlines = deadlines
        self.deadline: Entry = deadlines.add(now + timeout, self._timed_out)

    def answered(self, answer: Answer) -> None:
        if self._finish():
            self.deferred.callback(answer)

    def failed(self, error: Exception) -> None:
        if self._finish():
            self.deferred.errback(error)

    def _finish(self) -> bool:
        """Settle the deadline and free the slot; False if already finished."""
        state = self.state
        if state == _FINISHED:
            return False
        self.state = _FINISHED
        self.connection = None
        self.deadlines.settle(self.deadline)  # nothing if it is what expired
        if state == _ACTIVE:
            self.server.release()
        else:
            self.server.waiting.remove(self)
        return True

    def _abandon(self) -> None:
        """Stop whatever this request is doing: leave the queue, the connect or the connection."""
        connection, connecting = self.connection, self.connecting
        self._finish()
        if connecting is not None:
            self.connecting = None
            connecting.cancel()
        if connection is not None:
            connection.abort()

    def _timed_out(self) -> None:
        if self.state != _FINISHED:
            self._abandon()
            self.deferred.errback(TimeoutError(f"no answer within {self.timeout:g}s"))

    def _cancelled(self, deferred: Deferred) -> None:
        # The Deferred then fails with CancelledError.
        self._abandon()


class _Connection(Protocol):
    """One persistent connection to an end server, carrying one request at a time."""

    def __init__(self, server: _Server) -> None:
        self._server = server
        self._exchange: _Exchange | None = None
        self._parser: ResponseParser | None = None
        self._reused = False

    def connectionMade(self) -> None:  # noqa: N802 - Twisted's name
        self._server.live.add(self)
        # As twisted.web's client did: a request is one write, sent at once.
        no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if no_delay is not None:
            no_delay(True)

    def send(self, exchange: _Exchange, reused: bool) -> None:
        self._exchange = exchange
        self._reused = reused
        exchange.connection = self
        self._parser = ResponseParser(self._server.max_head, self._server.max_kept_body)
        self.transport.write(exchange.request)

    def abort(self) -> None:
        """Drop the connection and its request (timed out or cancelled)."""
        self._exchange = None
        self.transport.abortConnection()

    def dataReceived(self, data: bytes) -> None:  # noqa: N802 - Twisted's name
        exchange = self._exchange
        if exchange is None:
            # Bytes nobody asked for (say a 408 before the server closes an
            # idle connection): whatever follows on it cannot be trusted.
            self._server.forget_idle(self)
            self.transport.abortConnection()
            return
        parser = self._parser
        try:
            ended = parser.feed(data)
        except BadAnswer as error:
            self._exchange = None
            self.transport.abortConnection()
            exchange.failed(error)
            return
        if ended:
            self._exchange = self._parser = None
            answer = parser.answer()
            # Back in the pool before the slot is freed, so the next request
            # waiting takes this connection rather than opening one.
            if parser.extra or not answer.keep_alive or not self._server.keep(self):
                self.transport.loseConnection()
            exchange.answered(answer)

    def connectionLost(self, reason) -> None:  # noqa: N802 - Twisted's name
        self._server.lost(self)
        exchange, parser = self._exchange, self._parser
        if exchange is None:
            return
        self._exchange = self._parser = None
        try:
            parser.connection_closed()
        except BadAnswer as error:
            if self._reused and not parser.received_any:
                # The keep-alive race: the server closed this idle connection
                # as the request was sent.  Sent again on a new connection
                # (which is not reused, so this happens once); safe, as the
                # Idempotency-Key makes the POST idempotent for the end server.
                exchange.connection = None
                self._server.connect(exchange)
                return
            cause = one_line(str(reason.value)) or reason.type.__name__
            exchange.failed(BadAnswer(f"{error} ({cause})"))
            return
        exchange.answered(parser.answer())


class _ConnectionFactory(Factory):
    # No "Starting factory" line per connection.
    noisy = False

    def __init__(self, server: _Server) -> None:
        self._server = server

    def buildProtocol(self, addr) -> _Connection:  # noqa: N802 - Twisted's name
        return _Connection(self._server)


class _Server:
    """The connections to one end server and the requests waiting for one."""

    def __init__(self, endpoint, host_header: bytes, limit: int, max_head: int, max_kept_body: int) -> None:
        self.endpoint = endpoint
        self.host_header = host_header
        self.limit = limit
        self.max_head = max_head
        self.max_kept_body = max_kept_body
        self.factory = _ConnectionFactory(self)
        #: Idle connections, the most recently used last (taken first).
        self.idle: list[_Connection] = []
        self.waiting: deque[_Exchange] = deque()
        #: Requests holding a slot: connecting or on a connection.
        self.active = 0
        #: Every open connection.
        self.live: set[_Connection] = set()
        self.closing = False
        self._closed: list[Deferred[None]] = []

    def submit(self, exchange: _Exchange) -> None:
        if self.active < self.limit:
            self._start(exchange)
        else:
            self.waiting.append(exchange)

    def _start(self, exchange: _Exchange) -> None:
        self.active += 1
        exchange.state = _ACTIVE
        if self.idle:
            # LIFO: the most recently used connection is the least likely to
            # have reached the server's keep-alive timeout, and connections
            # left unused past it are closed by the server, so the pool
            # shrinks to what the load needs.
            self.idle.pop().send(exchange, True)
        else:
            self.connect(exchange)

    def connect(self, exchange: _Exchange) -> None:
        connecting = self.endpoint.connect(self.factory)
        exchange.connecting = connecting
        connecting.addCallbacks(
            self._connected, self._connect_failed, callbackArgs=(exchange,), errbackArgs=(exchange,)
        )

    def _connected(self, connection: _Connection, exchange: _Exchange) -> None:
        exchange.connecting = None
        if exchange.state == _FINISHED:
            connection.transport.loseConnection()
        else:
            connection.send(exchange, False)

    def _connect_failed(self, failure, exchange: _Exchange) -> None:
        exchange.connecting = None
        exchange.failed(failure.value)  # nothing if it timed out or was cancelled

    def release(self) -> None:
        """A request has finished: its slot goes to the next waiting, if any."""
        self.active -= 1
        if self.waiting:
            self._start(self.waiting.popleft())

    def keep(self, connection: _Connection) -> bool:
        """Put an answered connection back as idle; False if it must close instead."""
        if self.closing:
            return False
        self.idle.append(connection)
        return True

    def forget_idle(self, connection: _Connection) -> None:
        if connection in self.idle:
            self.idle.remove(connection)

    def lost(self, connection: _Connection) -> None:
        self.forget_idle(connection)
        self.live.discard(connection)
        if self.closing and not self.live:
            closed, self._closed = self._closed, []
            for waiter in closed:
                waiter.callback(None)

    def close(self) -> Deferred[None]:
        """Close the idle connections; fires once every connection has closed."""
        self.closing = True
        idle, self.idle = self.idle, []
        for connection in idle:
            connection.transport.loseConnection()
        if not self.live:
            return succeed(None)
        closed: Deferred[None] = Deferred()
        self._closed.append(closed)
        return closed


def _host_endpoint(reactor, tls_policy) -> Callable[[str, str, int], object]:
    def endpoint(scheme: str, host: str, port: int):
        tcp = HostnameEndpoint(reactor, host, port)
        if scheme == "https":
            return wrapClientTLS(tls_policy.creatorForNetloc(host.encode("ascii"), port), tcp)
        return tcp

    return endpoint


class HttpClient:
    """
    POSTs to end servers over pooled persistent connections.

    :param reactor: connects (unless ``endpoint_for`` is given) and times
        requests.
    :param pool_size: the most connections, and requests in flight, per end
        server; more requests wait in order.
    :param tls_policy: an ``IPolicyForHTTPS`` for ``https`` URLs.
    :param endpoint_for: ``(scheme, host, port) -> endpoint`` to connect
        with instead of a ``HostnameEndpoint`` (wrapped in TLS for https).
    """

    def __init__(
        self,
        reactor,
        pool_size: int,
        tls_policy=None,
        *,
        endpoint_for: Callable[[str, str, int], object] | None = None,
        max_head: int = MAX_HEAD,
        max_kept_body: int = MAX_KEPT_BODY,
    ) -> None:
        self._clock = reactor
        self._pool_size = pool_size
        self._endpoint_for = endpoint_for or _host_endpoint(reactor, tls_policy)
        self._max_head = max_head
        self._max_kept_body = max_kept_body
        #: scheme://netloc -> its server; several may name one server.
        self._prefixes: dict[str, _Server] = {}
        self._servers: dict[tuple[str, str, int], _Server] = {}
        #: The requests' deadlines, a queue per timeout (a connector uses one).
        self._deadlines = DeadlineQueues(reactor)

    def post(
        self, url: str, headers: Mapping[bytes, list[bytes]], body: bytes, timeout: float
    ) -> Deferred[Answer]:
        """
        POST ``body`` with ``headers`` (names and values already free of CR
        and LF) to ``url``; Host and Content-Length are added.

        :return: a Deferred firing with the :class:`Answer`, whatever its
            status, or failing with :class:`BadAnswer`, a connection error,
            or ``TimeoutError`` after ``timeout`` seconds.
        """
        server, target = self._split(url)
        parts = [
            b"POST ", target, b" HTTP/1.1\r\nHost: ", server.host_header,
            b"\r\nContent-Length: %d\r\n" % len(body),
        ]
        for name, values in headers.items():
            name = _wire_names.get(name) or wire_name(name)
            for value in values:
                parts += (name, b": ", value, b"\r\n")
        parts += (b"\r\n", body)
        exchange = _Exchange(
            server, b"".join(parts), timeout, self._deadlines.for_timeout(timeout),
            self._clock.seconds(),
        )
        server.submit(exchange)
        return exchange.deferred

    def _split(self, url: str) -> tuple[_Server, bytes]:
        match = _URL.match(url)
        if match is None:
            raise ValueError("not an http:// or https:// URL")
        scheme, netloc, target = match.groups()
        scheme = scheme.lower()
        prefix = url[: match.start(3)]
        server = self._prefixes.get(prefix)
        if server is None:
            server = self._prefixes[prefix] = self._server_for(scheme, netloc)
        if not target:
            return server, b"/"
        if target[0] == "?":
            target = "/" + target
        try:
            return server, target.encode("ascii")
        except UnicodeEncodeError:
            return server, quote(target, safe="/?=&%:@!$'()*+,;~").encode("ascii")

    def _server_for(self, scheme: str, netloc: str) -> _Server:
        host, colon, port_text = netloc.rpartition(":")
        if not colon:
            host, port = netloc, _DEFAULT_PORTS[scheme]
        else:
            port = int(port_text) if port_text else _DEFAULT_PORTS[scheme]
        if not host:
            raise ValueError("the URL has no host")
        host = host.encode("idna").decode("ascii")
        key = (scheme, host.lower(), port)
        server = self._servers.get(key)
        if server is None:
            host_header = host if port == _DEFAULT_PORTS[scheme] else f"{host}:{port}"
            server = self._servers[key] = _Server(
                self._endpoint_for(scheme, host, port),
                host_header.encode("ascii"),
                self._pool_size,
                self._max_head,
                self._max_kept_body,
            )
        return server

    def in_flight(self, url: str) -> int:
        """How many requests to ``url``'s end server hold a slot now."""
        return self._split(url)[0].active

    def idle_connections(self, url: str) -> int:
        """How many idle connections to ``url``'s end server are kept."""
        return len(self._split(url)[0].idle)

    def close(self) -> Deferred[None]:
        """
        Close the idle connections; a connection in use closes once its
        answer has been read (or its request timed out).  Fires once every
        connection has closed.
        """
        closing = [server.close() for server in self._servers.values()]
        return DeferredList(closing).addCallback(lambda _: None)
