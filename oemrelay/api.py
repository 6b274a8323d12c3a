"""
The management HTTP API: devices, their custom fields and connector
overrides, a CSV import, and the command queue, as JSON over twisted.web.

:func:`build_api` returns one leaf resource that answers every path; the
service wraps it in a ``Site`` on the ``[api] listen`` endpoints.

Decisions:

* Every request, ``/api/openapi.json`` included, needs
  ``Authorization: Bearer <token>``.  Authentication comes before routing, so
  a client without the token learns nothing, not even which paths exist.
* A serial in a path that is not a decimal uint32 is a 400 (a malformed
  request, not a missing device); a well-formed serial the registry does not
  know is a 404.
* ``PUT /api/devices/{serial}`` is an upsert that merges; ``POST`` of a CSV
  import is all-or-nothing and a serial listed twice is a bad row.  Neither
  can conflict with the registry's state, so no request answers 409.
* The device listing leaves out ``pending_commands``: it costs a query per
  device.  ``GET /api/devices/{serial}`` has it.
* Custom fields may hold keys: request bodies and custom values are never
  logged.  Mutating requests log one line each (method, path, status).
* The token and the declared length are checked as soon as the headers
  arrive (:class:`ApiRequest`, the :func:`build_api_site` request factory):
  a request without the token is answered 401, and one declaring more than
  :data:`MAX_CSV_BODY` 413, before any of its body is read, and the
  connection is closed; a chunked body is cut off with 413 once it passes
  :data:`MAX_CSV_BODY`.  The resource then refuses bodies over
  :data:`MAX_CSV_BODY` (CSV) or :data:`MAX_JSON_BODY` (JSON) with 413.
* The console's paths (``/api/fleet``, ``/api/devices/{serial}/live``,
  recordings) answer from the :class:`~oemrelay.live.LiveHub` and
  :class:`~oemrelay.activity.FleetActivity` given to :func:`build_api`; the
  live stream is the one answer that is not JSON: server-sent events, with
  the client registered as the transport's producer, so one that falls
  behind drops events instead of growing the relay's buffers.
* Dead letters (uploads the spool gave up delivering) are listed a page at
  a time by id, optionally of one ``serial``; a retry puts one back in the
  spool with its attempts reset, a delete forgets it.  Without a spool the
  three routes answer 503.
"""

from __future__ import annotations

import csv
import hmac
import io
import json
import re
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.internet.defer import TimeoutError as CheckTimeout
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import IResource, Resource
from twisted.web.http import RESPONSES
from twisted.web.server import NOT_DONE_YET, Request, Site

from . import __version__
from .activity import WINDOW_MINUTES, FleetActivity
from .commands import COMMAND_TYPES, CommandError, iso8601, parse_command
from .console import SiteRoot
from .live import MAX_RECORDING_MINUTES, LiveClient, LiveHub, TooManyWatchers
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .oneline import one_line
from .registry import COMMAND_STATES, DEVICE_SETTINGS, Command, DeviceRecord
from .relay import connector_names
from .registry.devices import (
    DEVICE_SORTS,
    FIELD_KINDS,
    DeviceQuery,
    MAX_SERIAL,
    device_fields,
    device_json,
    device_schema,
    field_schema,
    unstorable_text,
)

log = Logger(namespace="oemrelay.api")

#: The largest JSON request body accepted, in bytes.
MAX_JSON_BODY = 1024 * 1024
#: The largest CSV import accepted, in bytes.
MAX_CSV_BODY = 10 * 1024 * 1024
#: Devices per page when the client names no ``limit``, and the most it may name.
DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
#: The furthest ``offset`` a sorted device listing may start at.
MAX_OFFSET = 10_000_000
#: The longest "silent for more than N hours" filter (a year).
MAX_SILENT_HOURS = 24 * 366
#: Events one live client may have waiting while its connection is backed up.
LIVE_MAX_PENDING = 200
_LIST_PARAMETERS = (
    "limit", "after", "offset", "q", "connected", "failing", "silent_hours", "sort",
)

_SERIAL_TEXT = re.compile(r"[0-9]{1,10}")
_SERIAL_PROBLEM = f"serial must be a decimal number from 0 to {MAX_SERIAL}"
_CUSTOM_KEYS = ("custom1", "custom2", "custom3")
_PROFILE_KEYS = DEVICE_SETTINGS
_PENDING_STATES = frozenset({"queued", "sent"})
_MUTATING = frozenset({b"POST", b"PUT", b"PATCH", b"DELETE"})
_REALM = 'Bearer realm="oemrelay"'

#: Seconds a readiness check may take before ``/readyz`` calls it failed.
READY_CHECK_TIMEOUT = 5.0

#: A readiness check: passes unless it raises or the Deferred it returns fails.
ReadyCheck = Callable[[], object]


def build_api(
    registry,
    token: str,
    connector_names: Iterable[str],
    clock: IReactorTime,
    *,
    metrics: Callable[[], bytes] | None = None,
    metrics_public: bool = False,
    ready_checks: Sequence[tuple[str, ReadyCheck]] = (),
    live: LiveHub | None = None,
    activity: FleetActivity | None = None,
    spool_stats: Callable[[], Any] | None = None,
    spool: Any = None,
) -> IResource:
    """
    The API's root resource: ``/api/...``, and ``/healthz``, ``/readyz``
    and ``/metrics`` for the operator's tools.

    :param registry: a :class:`oemrelay.registry.Registry` (or anything with
        its methods).
    :param token: the bearer token every request must carry; not empty.
    :param connector_names: the configured ``[connector:NAME]`` names a
        device's ``connector`` override may name.
    :param clock: gives "now" for commands and bounds each readiness check.
    :param metrics: the Prometheus text ``GET /metrics`` answers; None: no
        ``/metrics`` (a 404).
    :param metrics_public: ``GET /metrics`` needs no token.
    :param ready_checks: ``(name, check)`` pairs ``GET /readyz`` runs; a check
        returns (or fires with) anything when it passes and raises when not.
    :param live: the live view and recordings; without it their paths answer 404.
    :param activity: the fleet's recent figures for ``GET /api/fleet``.
    :param spool_stats: the spool's ``stats()``, shown in the fleet summary.
    :param spool: a :class:`oemrelay.spool.DatabaseSpool`, for the dead letters.
    :raises ValueError: if ``token`` is empty.
    """
    if not token:
        raise ValueError("the API token must not be empty")
    api = _ApiResource(registry, token, frozenset(connector_names), clock, spool)
    api.live, api.activity, api.spool_stats = live, activity, spool_stats
    api.ops_paths[b"/healthz"] = _Healthz()
    api.ops_paths[b"/readyz"] = _Readyz(tuple(ready_checks), clock)
    if metrics is not None:
        api.ops_paths[b"/metrics"] = _Metrics(api, metrics, metrics_public)
    return api


class ApiSite(Site):
    """
    The API's Site: requests judged at their headers (:class:`ApiRequest`);
    no line per factory start or per request (the API logs changes itself).
    """

    noisy = False

    def __init__(self, resource: IResource, token: str, open_paths: Iterable[bytes]) -> None:
        super().__init__(resource, requestFactory=ApiRequest)
        self.api_token = token.encode("utf-8")
        #: Paths answered without the token (health checks, public metrics).
        self.open_paths = frozenset(open_paths)

    def is_open(self, path: bytes) -> bool:
        """Whether ``path`` is answered without the token: the console's static files are (the page asks for it)."""
        return path in self.open_paths or path == b"/console" or path.startswith(b"/console/")

    def log(self, request) -> None:
        pass


def build_api_site(
    registry, token: str, connector_names: Iterable[str], clock: IReactorTime, **options: Any
) -> Site:
    """
    The API (:func:`build_api`, same arguments and keyword ``options``) and
    the console under ``/console/``, as a ``Site`` whose requests are refused
    from their headers (:class:`ApiRequest`) when they lack the token or
    declare too large a body.
    """
    resource = build_api(registry, token, connector_names, clock, **options)
    open_paths = [b"/healthz", b"/readyz"]
    if options.get("metrics_public"):
        open_paths.append(b"/metrics")
    return ApiSite(SiteRoot(resource), token, open_paths)


class ApiRequest(Request):
    """
    A request checked when its headers arrive, not after its body: without
    the bearer token it is answered 401, declaring a body over
    :data:`MAX_CSV_BODY` 413, and a chunked body is answered 413 once it
    passes that; then the connection closes and no more of the body is read.
    """

    #: The answer already sent from the headers; the body is not read.
    refused: _ApiError | None = None
    _received = 0

    def gotLength(self, length: int | None) -> None:  # noqa: N802 - Twisted's name
        site = self.channel.site
        # The request line's path, before requestReceived sets self.path: the
        # channel's private attribute is the only place it is known this early.
        path = self.channel._path.split(b"?", 1)[0]
        try:
            if not site.is_open(path):
                _check_bearer(self.requestHeaders, site.api_token)
            if length is not None and length > MAX_CSV_BODY:
                raise _ApiError(413, f"the body is larger than {MAX_CSV_BODY} bytes")
        except _ApiError as error:
            self._refuse(error)
            length = 0
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:  # noqa: N802 - Twisted's name
        if self.refused is not None:
            return
        self._received += len(data)
        if self._received > MAX_CSV_BODY:
            # Chunked bodies declare no length: count them as they come.
            self._refuse(_ApiError(413, f"the body is larger than {MAX_CSV_BODY} bytes"))
            return
        super().handleContentChunk(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:  # noqa: N802
        if self.refused is None:
            super().requestReceived(command, path, version)

    def _refuse(self, error: _ApiError) -> None:
        self.refused = error
        body = json.dumps({"error": error.message}).encode("utf-8")
        head = [
            b"HTTP/1.1 %d %s" % (error.status, RESPONSES[error.status]),
            b"Content-Type: application/json",
            b"Cache-Control: no-store",
            b"Connection: close",
            b"Content-Length: %d" % len(body),
        ]
        head += [name + b": " + value for name, value in error.headers.items()]
        self.channel.transport.write(b"\r\n".join(head) + b"\r\n\r\n" + body)
        # Stops reading: the rest of the body is never taken in.
        self.channel.loseConnection()


class _ApiError(Exception):
    """Answer the request with ``status`` and ``{"error": message}``."""

    def __init__(
        self, status: int, message: str, headers: dict[bytes, bytes] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


# One answer: status, JSON body, extra headers.
_Answer = tuple[int, Any, dict[bytes, bytes]]


def _ok(body: Any, status: int = 200) -> _Answer:
    return status, body, {}


@dataclass(frozen=True)
class _Stream:
    """An answer that is a stream: ``start(request)`` writes it and finishes it when done."""

    start: Callable[[Request], None]


_Endpoint = Callable[..., Coroutine[Any, Any, _Answer]]


@dataclass(frozen=True)
class Route:
    """One operation: a method on a path template as the OpenAPI document writes it."""

    method: bytes
    #: ``/api/...``; a ``{serial}`` segment matches a non-empty segment,
    #: passed to ``endpoint`` as an int (a non-uint32 is a 400); so does an
    #: ``{id}`` (anything but a decimal number is a 404).
    path: str
    endpoint: _Endpoint

    @property
    def segments(self) -> tuple[str, ...]:
        """The path template split at ``/``."""
        return tuple(self.path.split("/"))

    def literals(self) -> int:
        """How many segments are fixed text (the most specific template wins)."""
        return sum(not segment.startswith("{") for segment in self.segments)

    def matches(self, segments: list[str]) -> bool:
        """Whether a request path, split at ``/``, fits this template."""
        return len(segments) == len(self.segments) and all(
            segment == pattern or (pattern.startswith("{") and segment != "")
            for segment, pattern in zip(segments, self.segments)
        )


class _ApiResource(Resource):
    """Every path under one leaf: authentication, routing, JSON answers."""

    isLeaf = True

    def __init__(
        self,
        registry,
        token: str,
        connector_names: frozenset[str],
        clock: IReactorTime,
        spool=None,
    ) -> None:
        super().__init__()
        self._registry = registry
        self._spool = spool
        self._token = token.encode("utf-8")
        self._connector_names = connector_names
        self._clock = clock
        self.live: LiveHub | None = None
        self.activity: FleetActivity | None = None
        self.spool_stats: Callable[[], Any] | None = None
        self._openapi = json.dumps(
            openapi_document(connector_names), indent=1
        ).encode("utf-8")
        #: The operator's paths outside /api/, each answered by its own
        #: resource before authentication (``/metrics`` checks the token itself).
        self.ops_paths: dict[bytes, Resource] = {}
        #: Every operation, in the order the 405 ``Allow`` header lists methods.
        self.routes = (
            Route(b"GET", "/api/openapi.json", self._get_openapi),
            Route(b"GET", "/api/devices", self._list_devices),
            Route(b"POST", "/api/devices/import", self._import_devices),
            Route(b"GET", "/api/devices/{serial}", self._get_device),
            Route(b"PUT", "/api/devices/{serial}", self._put_device),
            Route(b"GET", "/api/devices/{serial}/commands", self._list_commands),
            Route(b"POST", "/api/devices/{serial}/commands", self._add_command),
            Route(b"GET", "/api/fleet", self._get_fleet),
            Route(b"GET", "/api/devices/{serial}/live", self._live),
            Route(b"POST", "/api/devices/{serial}/recordings", self._start_recording),
            Route(b"GET", "/api/recordings", self._list_recordings),
            Route(b"GET", "/api/recordings/{recording}", self._get_recording),
            Route(b"GET", "/api/deadletters", self._list_dead_letters),
            Route(b"POST", "/api/deadletters/{id}/retry", self._retry_dead_letter),
            Route(b"DELETE", "/api/deadletters/{id}", self._delete_dead_letter),
        )

    # -- twisted.web ---------------------------------------------------------

    def render(self, request: Request) -> int:
        ops = self.ops_paths.get(request.path)
        if ops is not None:
            return ops.render(request)
        gone: list[bool] = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))

        async def answer() -> None:
            try:
                status, body, headers = await self._answer(request)
            except _ApiError as error:
                status, body, headers = (
                    error.status, {"error": error.message}, error.headers
                )
            except Exception:
                log.failure(
                    "bug answering {method} {path}",
                    method=_text(request.method),
                    path=_text(request.path),
                )
                status, body, headers = 500, {"error": "internal error"}, {}
            if request.method in _MUTATING:
                log.info(
                    "{method} {path} -> {status}",
                    method=_text(request.method),
                    path=_text(request.path),
                    status=status,
                )
            if gone:
                return
            self._write(request, status, body, headers)

        Deferred.fromCoroutine(answer()).addErrback(
            lambda failure: log.failure("bug writing an answer", failure)
        )
        return NOT_DONE_YET

    @staticmethod
    def _write(
        request: Request, status: int, body: Any, headers: dict[bytes, bytes]
    ) -> None:
        if isinstance(body, _Stream):
            request.setResponseCode(status)
            request.setHeader(b"cache-control", b"no-store")
            request.setHeader(b"x-content-type-options", b"nosniff")
            for name, value in headers.items():
                request.setHeader(name, value)
            body.start(request)
            return
        data = body if isinstance(body, bytes) else json.dumps(body).encode("utf-8")
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"application/json")
        # Devices' custom fields may be credentials: no cache keeps them.
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"x-content-type-options", b"nosniff")
        for name, value in headers.items():
            request.setHeader(name, value)
        request.setHeader(b"content-length", str(len(data)).encode("ascii"))
        request.write(data)
        request.finish()

    # -- routing -------------------------------------------------------------

    async def _answer(self, request: Request) -> _Answer:
        self._authenticate(request)
        # Latin-1 maps every byte to one character, so no path fails to decode.
        segments = request.path.decode("latin-1").split("/")
        candidates = [route for route in self.routes if route.matches(segments)]
        if not candidates:
            raise _ApiError(404, "no such path")
        template = max(candidates, key=Route.literals).path
        on_path = [route for route in candidates if route.path == template]
        chosen = [route for route in on_path if route.method == request.method]
        if not chosen:
            raise _ApiError(
                405,
                f"method {_text(request.method)} not allowed here",
                {b"allow": b", ".join(route.method for route in on_path)},
            )
        (route,) = chosen
        arguments = [
            _PATH_ARGUMENTS[pattern](segment.encode("latin-1"))
            for segment, pattern in zip(segments, route.segments)
            if pattern in _PATH_ARGUMENTS
        ]
        return await route.endpoint(request, *arguments)

    def _authenticate(self, request: Request) -> None:
        _check_bearer(request.requestHeaders, self._token)

    # -- endpoints -----------------------------------------------------------

    async def _get_openapi(self, request: Request) -> _Answer:
        _query(request, ())
        return _ok(self._openapi)

    async def _list_devices(self, request: Request) -> _Answer:
        query = _query(request, _LIST_PARAMETERS)
        limit = _page_limit(query)
        sort = query.get("sort", "serial")
        if sort not in DEVICE_SORTS:
            raise _ApiError(400, f"sort must be one of {', '.join(DEVICE_SORTS)}")
        after = None
        if "after" in query:
            if sort != "serial":
                raise _ApiError(400, "after pages in serial order; with sort=last_seen use offset")
            after = _serial(query["after"].encode("utf-8"), "after")
        offset = 0
        if "offset" in query:
            if sort == "serial":
                raise _ApiError(400, "offset pages with sort=last_seen; in serial order use after")
            offset = _whole(query["offset"], "offset", 0, MAX_OFFSET)
        silent_before = None
        if "silent_hours" in query:
            hours = _whole(query["silent_hours"], "silent_hours", 1, MAX_SILENT_HOURS)
            silent_before = self._clock.seconds() - hours * 3600
        search = query.get("q", "").strip()
        problem = unstorable_text("q", search)
        if problem:
            raise _ApiError(400, problem)
        filters = DeviceQuery(
            limit=limit + 1,
            offset=offset,
            after=after,
            search=search or None,
            connected=_flag(query, "connected"),
            failing=_flag(query, "failing"),
            silent_before=silent_before,
            sort=sort,
        )
        # One more than asked for says whether there is a next page.
        if filters == DeviceQuery(limit=limit + 1, after=after):
            devices = await self._call(self._registry.list_devices, limit + 1, after)
        else:
            devices = await self._call(self._registry.search_devices, filters)
        page = list(devices)[:limit]
        more = len(devices) > limit
        if sort == "serial":
            following = page[-1].serial if more else None
        else:
            following = offset + limit if more else None
        return _ok({"devices": [_device_json(device) for device in page], "next": following})

    async def _get_fleet(self, request: Request) -> _Answer:
        query = _query(request, ("minutes",))
        minutes = _whole(query.get("minutes", "15"), "minutes", 1, WINDOW_MINUTES)
        counts = await self._call(self._registry.fleet_counts)
        body = {"registry": counts, "activity": None}
        if self.activity is not None:
            body["activity"] = self.activity.summary(minutes, self.spool_stats)
        return _ok(body)

    def _live_hub(self) -> LiveHub:
        if self.live is None:
            raise _ApiError(404, "the live view is not enabled")
        return self.live

    async def _live(self, request: Request, serial: int) -> _Answer:
        _query(request, ())
        hub = self._live_hub()
        await self._known_device(serial)

        def start(request: Request) -> None:
            request.setHeader(b"content-type", b"text/event-stream")
            client = LiveClient(request.write, LIVE_MAX_PENDING)
            try:
                stop = hub.watch(serial, client)
            except TooManyWatchers as error:
                request.setResponseCode(429)
                request.setHeader(b"content-type", b"application/json")
                request.write(json.dumps({"error": str(error)}).encode("utf-8"))
                request.finish()
                return
            request.registerProducer(client, True)
            # A comment line: the browser sees the stream open at once.
            request.write(b": watching\n\n")
            request.notifyFinish().addBoth(lambda _: stop())

        return 200, _Stream(start), {}

    async def _start_recording(self, request: Request, serial: int) -> _Answer:
        _query(request, ())
        hub = self._live_hub()
        body = _json_body(request)
        if not isinstance(body, dict) or set(body) - {"minutes"}:
            raise _ApiError(400, 'the body must be {"minutes": N}')
        minutes = body.get("minutes", 10)
        if (
            isinstance(minutes, bool)
            or not isinstance(minutes, (int, float))
            or not 0 < minutes <= MAX_RECORDING_MINUTES
        ):
            raise _ApiError(
                400, f"minutes must be a number above 0 and at most {MAX_RECORDING_MINUTES}"
            )
        await self._known_device(serial)
        recording = hub.start_recording(serial, minutes)
        return _ok(recording.summary(self._clock.seconds()), 201)

    async def _list_recordings(self, request: Request) -> _Answer:
        _query(request, ())
        now = self._clock.seconds()
        return _ok({"recordings": [r.summary(now) for r in self._live_hub().recordings()]})

    async def _get_recording(self, request: Request, recording_id: int | None) -> _Answer:
        _query(request, ())
        recording = None if recording_id is None else self._live_hub().recording(recording_id)
        if recording is None:
            raise _ApiError(404, "no such recording")
        return (
            200,
            recording.capture().encode("ascii"),
            {
                b"content-type": b"text/plain; charset=us-ascii",
                b"content-disposition": (
                    f'attachment; filename="device-{recording.serial}'
                    f'-recording-{recording.id}.txt"'
                ).encode("ascii"),
            },
        )

    async def _get_device(self, request: Request, serial: int) -> _Answer:
        _query(request, ())
        device = await self._known_device(serial)
        return _ok(await self._device_with_pending(device))

    async def _put_device(self, request: Request, serial: int) -> _Answer:
        _query(request, ())
        body = _json_body(request)
        if not isinstance(body, dict):
            raise _ApiError(400, "the body must be a JSON object")
        changes: dict[str, str | None] = {}
        for key, value in body.items():
            if key not in _PROFILE_KEYS:
                raise _ApiError(
                    400, f"unknown key {key!r}; allowed: {', '.join(_PROFILE_KEYS)}"
                )
            if key == "connector":
                if value is not None and not isinstance(value, str):
                    raise _ApiError(400, "connector must be a string or null")
                changes[key] = self._connector(value)
            else:
                if not isinstance(value, str):
                    raise _ApiError(400, f"{key} must be a string")
                changes[key] = _custom(key, value)
        device, created = await self._call(self._registry.update_device, serial, changes)
        return _ok(await self._device_with_pending(device), 201 if created else 200)

    async def _import_devices(self, request: Request) -> _Answer:
        _query(request, ())
        rows, lines = self._csv_rows(_body(request, MAX_CSV_BODY))
        try:
            created, updated = await self._call(
                self._registry.import_devices, rows, refused=ValueError
            )
        except ValueError as error:
            # Rows are checked here first, so only the database itself can
            # refuse one now; the registry names it by index ("row 3: ...").
            message = one_line(error)
            numbered = re.fullmatch(r"row ([0-9]+): (.*)", message)
            if numbered and int(numbered[1]) < len(lines):
                message = f"line {lines[int(numbered[1])]}: {numbered[2]}"
            raise _ApiError(400, message) from None
        return _ok({"created": created, "updated": updated})

    async def _add_command(self, request: Request, serial: int) -> _Answer:
        _query(request, ())
        body = _json_body(request)
        try:
            command_request = parse_command(body)
        except CommandError as error:
            raise _ApiError(400, str(error)) from None
        now = self._clock.seconds()
        # The registry still sends a command at its expiry instant, but one
        # expiring exactly now could never reach a later async session.
        if command_request.expires is not None and command_request.expires <= now:
            raise _ApiError(400, '"expires" is already past')
        command = await self._call(self._registry.add_command, serial, command_request, now)
        if command is None:
            raise _unknown_device(serial)
        return _ok(_command_json(command), 202)

    async def _list_dead_letters(self, request: Request) -> _Answer:
        query = _query(request, ("limit", "after", "serial"))
        limit = _page_limit(query)
        after = _dead_letter_id(query["after"].encode("utf-8"), "after") if "after" in query else None
        serial = _serial(query["serial"].encode("utf-8")) if "serial" in query else None
        letters = await self._call(
            self._dead_letters().list_dead, limit + 1, after, serial, unavailable="spool"
        )
        page = letters[:limit]
        return _ok(
            {
                "deadletters": [_dead_letter_json(letter) for letter in page],
                "next": page[-1].id if len(letters) > limit else None,
            }
        )

    async def _retry_dead_letter(self, request: Request, letter_id: int) -> _Answer:
        _query(request, ())
        if not await self._call(self._dead_letters().retry_dead, letter_id, unavailable="spool"):
            raise _unknown_dead_letter(letter_id)
        return _ok({"id": letter_id, "status": "queued"})

    async def _delete_dead_letter(self, request: Request, letter_id: int) -> _Answer:
        _query(request, ())
        if not await self._call(self._dead_letters().delete_dead, letter_id, unavailable="spool"):
            raise _unknown_dead_letter(letter_id)
        return _ok({"id": letter_id, "status": "deleted"})

    def _dead_letters(self):
        if self._spool is None:
            raise _ApiError(503, "this relay has no spool")
        return self._spool

    async def _list_commands(self, request: Request, serial: int) -> _Answer:
        _query(request, ())
        await self._known_device(serial)
        commands = await self._call(self._registry.list_commands, serial, self._clock.seconds())
        return _ok({"commands": [_command_json(command) for command in commands]})

    # -- helpers -------------------------------------------------------------

    async def _call(
        self,
        method: Callable[..., Any],
        *args: Any,
        refused: type[Exception] | tuple[()] = (),
        unavailable: str = "registry",
    ) -> Any:
        """
        Call a registry (or spool) method; its failures become 500s, logged
        without arguments (they may hold custom values).

        :param refused: exceptions passed on to the caller instead.
        :param unavailable: what the 500 and the log line say is unavailable.
        """
        try:
            return await maybeDeferred(method, *args)
        except refused:
            raise
        except Exception as error:
            log.error(
                "{what} {call} failed: {error_type}: {error}",
                what=unavailable,
                call=getattr(method, "__name__", "call"),
                error_type=type(error).__name__,
                error=one_line(error)[:500],
            )
            raise _ApiError(500, f"{unavailable} unavailable") from None

    async def _known_device(self, serial: int) -> DeviceRecord:
        device = await self._call(self._registry.get_device, serial)
        if device is None:
            raise _unknown_device(serial)
        return device

    async def _device_with_pending(self, device: DeviceRecord) -> dict[str, Any]:
        commands = await self._call(
            self._registry.list_commands, device.serial, self._clock.seconds()
        )
        body = _device_json(device)
        body["pending_commands"] = sum(
            1 for command in commands if command.status in _PENDING_STATES
        )
        return body

    def _connector(self, value: str | None) -> str | None:
        """A connector override: configured names, space separated, or None to clear it."""
        names = connector_names(value or "")
        if not names:
            return None
        for name in names:
            if name not in self._connector_names:
                known = ", ".join(sorted(self._connector_names)) or "none configured"
                raise _ApiError(400, f"unknown connector {name!r} (known: {known})")
        return " ".join(names)

    def _csv_rows(self, data: bytes) -> tuple[list[dict[str, Any]], list[int]]:
        """
        The rows of an import, checked; any bad row fails the whole import.

        A row is ``serial,custom1,custom2,custom3[,connector]``.  Every row has
        as many cells as the first (4 or 5).  With 5 an empty connector cell
        clears the override; with 4 overrides are left as they are.  A first
        row whose first cell is ``serial`` is a header.  Blank lines are skipped.

        :return: the rows for the registry, and the line each starts on.
        """
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as error:
            raise _ApiError(400, f"the CSV is not UTF-8 text (byte {error.start})") from None
        reader = csv.reader(io.StringIO(text, newline=""), strict=True)
        rows: list[dict[str, Any]] = []
        lines: dict[int, int] = {}
        width = None
        line = 1
        while True:
            try:
                cells = next(reader)
            except StopIteration:
                break
            except csv.Error as error:
                raise _ApiError(400, f"line {line}: {error}") from None
            start, line = line, reader.line_num + 1
            if not cells or cells == [""]:
                continue
            if width is None:
                width = len(cells)
                if width not in (4, 5):
                    raise _ApiError(
                        400,
                        f"line {start}: {width} columns; expected"
                        " serial,custom1,custom2,custom3[,connector]",
                    )
                if cells[0].strip().lower() == "serial":
                    continue
            elif len(cells) != width:
                raise _ApiError(
                    400, f"line {start}: {len(cells)} columns; expected {width}"
                )
            text_serial = cells[0].strip()
            if not _SERIAL_TEXT.fullmatch(text_serial) or int(text_serial) > MAX_SERIAL:
                raise _ApiError(400, f"line {start}: {_SERIAL_PROBLEM}")
            serial = int(text_serial)
            if serial in lines:
                raise _ApiError(
                    400, f"line {start}: serial {serial} is already on line {lines[serial]}"
                )
            lines[serial] = start
            row: dict[str, Any] = {"serial": serial}
            try:
                row.update((key, _custom(key, value)) for key, value in zip(_CUSTOM_KEYS, cells[1:4]))
            except _ApiError as error:
                raise _ApiError(400, f"line {start}: {error.message}") from None
            if width == 5:
                try:
                    row["connector"] = self._connector(cells[4].strip())
                except _ApiError as error:
                    raise _ApiError(400, f"line {start}: {error.message}") from None
            rows.append(row)
        if not rows:
            raise _ApiError(400, "the CSV lists no devices")
        return rows, list(lines.values())


# -- request parsing -----------------------------------------------------------


def _text(value: bytes) -> str:
    return value.decode("utf-8", "replace")


def _serial(text: bytes, name: str = "serial") -> int:
    if not _SERIAL_TEXT.fullmatch(_text(text)) or int(text) > MAX_SERIAL:
        raise _ApiError(400, _SERIAL_PROBLEM.replace("serial", name, 1))
    return int(text)


def _whole(text: str, name: str, lowest: int, highest: int) -> int:
    """A whole-number query parameter from ``lowest`` to ``highest``."""
    if not re.fullmatch(r"[0-9]{1,10}", text) or not lowest <= int(text) <= highest:
        raise _ApiError(400, f"{name} must be a whole number from {lowest} to {highest}")
    return int(text)


def _flag(query: dict[str, str], name: str) -> bool:
    """A yes/no query parameter: ``true`` or ``false``, absent meaning false."""
    value = query.get(name, "false")
    if value not in ("true", "false"):
        raise _ApiError(400, f"{name} must be true or false")
    return value == "true"


_ID_TEXT = re.compile(r"[0-9]{1,18}")


def _dead_letter_id(text: bytes, name: str = "id") -> int:
    if not _ID_TEXT.fullmatch(_text(text)) or int(text) < 1:
        raise _ApiError(400, f"{name} must be a dead letter id, a whole number from 1")
    return int(text)


def _recording_id(text: bytes) -> int | None:
    """A recording's id; None (so the endpoint answers 404) unless it is a decimal number."""
    return int(text) if _ID_TEXT.fullmatch(_text(text)) else None


#: Path template segments passed to endpoints, and how each is read.
_PATH_ARGUMENTS = {"{serial}": _serial, "{id}": _dead_letter_id, "{recording}": _recording_id}


def _page_limit(query: Mapping[str, str]) -> int:
    """The ``limit`` query parameter, or the default page size."""
    if "limit" not in query:
        return DEFAULT_LIMIT
    text = query["limit"]
    if not re.fullmatch(r"[0-9]{1,7}", text) or not 1 <= int(text) <= MAX_LIMIT:
        raise _ApiError(400, f"limit must be a whole number from 1 to {MAX_LIMIT}")
    return int(text)


def _custom(key: str, value: str) -> str:
    problem = unstorable_text(key, value)
    if problem:
        raise _ApiError(400, problem)
    return value


def _unknown_device(serial: int) -> _ApiError:
    return _ApiError(404, f"no device with serial {serial}")


def _unknown_dead_letter(letter_id: int) -> _ApiError:
    return _ApiError(404, f"no dead letter with id {letter_id}")


def _query(request: Request, known: tuple[str, ...]) -> dict[str, str]:
    """The query parameters, each given at most once and all known."""
    # Not request.args: Twisted adds form-encoded bodies to it, and curl's
    # --data-binary labels a CSV or JSON body as a form.
    _, _, raw = request.uri.partition(b"?")
    try:
        parsed = parse_qs(
            raw.decode("utf-8"), keep_blank_values=True, strict_parsing=False
        )
    except UnicodeDecodeError:
        raise _ApiError(400, "the query string is not UTF-8") from None
    query: dict[str, str] = {}
    for name, values in parsed.items():
        if name not in known:
            allowed = f"; allowed: {', '.join(known)}" if known else ""
            raise _ApiError(400, f"unknown query parameter {name!r}{allowed}")
        if len(values) != 1:
            raise _ApiError(400, f"query parameter {name!r} given more than once")
        query[name] = values[0]
    return query


def _check_bearer(headers, token: bytes) -> None:
    """
    :raises _ApiError: 401 unless ``headers`` carry exactly one
        ``Authorization: Bearer <token>``.
    """
    values = headers.getRawHeaders(b"authorization") or []
    if not values:
        raise _ApiError(
            401, "missing bearer token", {b"www-authenticate": _REALM.encode()}
        )
    scheme, _, given = values[0].strip().partition(b" ")
    # compare_digest on bytes: its time does not depend on where they differ.
    if (
        len(values) != 1
        or scheme.lower() != b"bearer"
        or not hmac.compare_digest(given.strip(), token)
    ):
        raise _ApiError(
            401,
            "invalid bearer token",
            {b"www-authenticate": (_REALM + ', error="invalid_token"').encode()},
        )


def _body(request: Request, limit: int) -> bytes:
    content = request.content
    if content is None:
        return b""
    content.seek(0, io.SEEK_END)
    if content.tell() > limit:
        raise _ApiError(413, f"the body is larger than {limit} bytes")
    content.seek(0)
    return content.read()


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise ValueError("a key appears twice in one object")
    return result


def _json_body(request: Request) -> Any:
    data = _body(request, MAX_JSON_BODY)
    try:
        return json.loads(
            data.decode("utf-8"),
            parse_constant=_reject_constant,
            object_pairs_hook=_unique_keys,
        )
    except UnicodeDecodeError:
        raise _ApiError(400, "the body is not UTF-8 text") from None
    except ValueError as error:  # JSONDecodeError is one
        raise _ApiError(400, f"the body is not valid JSON: {error}") from None
    except RecursionError:
        raise _ApiError(400, "the body is not valid JSON: nested too deeply") from None


# -- the operator's paths: /healthz, /readyz, /metrics ----------------------------


_PLAIN = b"text/plain; charset=utf-8"


def _plain(request: Request, status: int, body: bytes, content_type: bytes = _PLAIN) -> bytes:
    """``body`` with ``status``, never cached: the headers set, the body returned."""
    request.setResponseCode(status)
    request.setHeader(b"content-type", content_type)
    request.setHeader(b"cache-control", b"no-store")
    return body


class _Healthz(Resource):
    """``GET /healthz``: 200 ``ok`` while the process answers at all."""

    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        return _plain(request, 200, b"ok\n")


class _Readyz(Resource):
    """
    ``GET /readyz``: 200 ``ok`` when every check passes, else 503 naming
    each failing check and its reason, one a line.
    """

    isLeaf = True

    def __init__(self, checks: tuple[tuple[str, ReadyCheck], ...], clock: IReactorTime) -> None:
        super().__init__()
        self._checks = checks
        self._clock = clock

    def render_GET(self, request: Request) -> int:
        gone: list[bool] = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))
        runs = [
            maybeDeferred(check).addTimeout(READY_CHECK_TIMEOUT, self._clock)
            for _, check in self._checks
        ]

        def answer(results: list[tuple[bool, Any]]) -> None:
            failing = [
                f"{name}: {_check_failure(result)}"
                for (name, _), (passed, result) in zip(self._checks, results)
                if not passed
            ]
            if gone:
                return
            if failing:
                text = "".join(f"not ready: {line}\n" for line in failing)
                body = _plain(request, 503, text.encode("utf-8"))
            else:
                body = _plain(request, 200, b"ok\n")
            request.write(body)
            request.finish()

        DeferredList(runs, consumeErrors=True).addCallback(answer).addErrback(
            lambda failure: log.failure("bug answering /readyz", failure)
        )
        return NOT_DONE_YET


def _check_failure(failure: Failure) -> str:
    if failure.check(CheckTimeout):
        return f"no answer within {READY_CHECK_TIMEOUT:g}s"
    return one_line(failure.value)


class _Metrics(Resource):
    """``GET /metrics``: Prometheus' text format; the API token unless public."""

    isLeaf = True

    def __init__(self, api: _ApiResource, exposition: Callable[[], bytes], public: bool) -> None:
        super().__init__()
        self._api = api
        self._exposition = exposition
        self._public = public

    def render_GET(self, request: Request) -> bytes | int:
        if not self._public:
            try:
                self._api._authenticate(request)
            except _ApiError as error:
                self._api._write(request, error.status, {"error": error.message}, error.headers)
                return NOT_DONE_YET
        return _plain(request, 200, self._exposition(), METRICS_CONTENT_TYPE.encode("ascii"))


# -- responses -----------------------------------------------------------------


def _time(unix_seconds: float | None) -> str | None:
    return None if unix_seconds is None else iso8601(unix_seconds)


def _device_json(device: DeviceRecord) -> dict[str, Any]:
    """A device as the API shows it (without ``pending_commands``)."""
    return device_json(device)


def _dead_letter_json(letter) -> dict[str, Any]:
    return {
        "id": letter.id,
        "serial": letter.serial,
        "connector": letter.connector,
        "records": letter.records,
        "received_at": _time(letter.received_at),
        "dead_at": _time(letter.dead_at),
        "attempts": letter.attempts,
        "reason": letter.reason,
    }


def _command_json(command: Command) -> dict[str, Any]:
    return {
        "id": command.id,
        "type": command.type,
        "params": command.params,
        "status": command.status,
        "created": _time(command.created),
        "send_after": _time(command.send_after),
        "expires": _time(command.expires),
        "sent": _time(command.sent),
        "completed": _time(command.completed),
        "device_status": command.device_status,
    }


# -- the OpenAPI document ------------------------------------------------------


def _openapi_30(schema: Any) -> Any:
    """A JSON Schema made OpenAPI 3.0-compatible (``const`` -> one-value ``enum``)."""
    if isinstance(schema, Mapping):
        result = {}
        for key, value in schema.items():
            if key == "const":
                result["enum"] = [value]
            else:
                result[key] = _openapi_30(value)
        return result
    if isinstance(schema, list):
        return [_openapi_30(item) for item in schema]
    return schema


def _nullable(schema: Mapping[str, Any]) -> dict[str, Any]:
    return {**schema, "nullable": True}


_TIME = FIELD_KINDS["time"]
_SERIAL_SCHEMA = FIELD_KINDS["serial"]


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _response(description: str, schema: Mapping[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _error_response(description: str) -> dict[str, Any]:
    return _response(description, _ref("Error"))


def _json_response(description: str, ref: str) -> dict[str, Any]:
    return _response(description, _ref(ref))


def _json_body_of(ref: str) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": _ref(ref)}}}


#: The answers every operation may give.
_COMMON_RESPONSES = {
    "401": _error_response("Missing or wrong bearer token."),
    "500": _error_response('The registry is unavailable ("registry unavailable").'),
}
_BAD_SERIAL = _error_response("The serial is not a uint32.")
_NO_DEVICE = _error_response("No such device.")


def _too_large(limit: int) -> dict[str, Any]:
    return _error_response(f"The body is over {limit} bytes.")


def _operation(operation_id: str, summary: str, responses: dict[str, Any], **more: Any) -> dict:
    """One OpenAPI operation; every one may also answer 401 and 500."""
    return {
        "summary": summary,
        **more,
        "operationId": operation_id,
        "responses": {**responses, **_COMMON_RESPONSES},
    }


def _device_schemas(connector_names: list[str]) -> dict[str, Any]:
    """The Device and DeviceChanges schemas, from DeviceRecord's fields."""
    connector_schema: dict[str, Any] = {
        "type": "string",
        "nullable": True,
        "description": "Configured connector names, space separated; null or \"\""
        " clears the override (the relay's default connectors are used).",
    }
    if connector_names:
        one = "(?:" + "|".join(re.escape(name) for name in connector_names) + ")"
        connector_schema["pattern"] = f"^$|^{one}(?: {one})*$"
    changes = {name: field_schema(doc) for name, doc in device_fields() if doc.writable}
    # Unlike the other settings, its allowed values depend on the configuration.
    changes["connector"] = connector_schema
    return {
        "Device": {
            "type": "object",
            "properties": {
                **device_schema(),
                "pending_commands": {
                    "type": "integer",
                    "minimum": 0,
                    "description": "Commands queued or sent, not yet done."
                    " Only in the single-device view.",
                },
            },
        },
        "DeviceChanges": {
            "type": "object",
            "additionalProperties": False,
            "properties": changes,
        },
    }


def _plain_response(description: str, example: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"text/plain": {"schema": {"type": "string"}, "example": example}},
    }


def _ops_paths() -> dict[str, Any]:
    """/healthz, /readyz and /metrics: outside /api/, plain text."""
    return {
        "/healthz": {
            "get": {
                "summary": "Whether the process answers; no token.",
                "operationId": "getHealth",
                "security": [],
                "responses": {"200": _plain_response("The relay runs.", "ok\n")},
            }
        },
        "/readyz": {
            "get": {
                "summary": "Whether the relay can take devices; no token.",
                "operationId": "getReadiness",
                "security": [],
                "description": "Checks that every listener is bound, the registry answers"
                " a query and the spool is writable, each within"
                f" {READY_CHECK_TIMEOUT:g} seconds.",
                "responses": {
                    "200": _plain_response("Every check passed.", "ok\n"),
                    "503": _plain_response(
                        "A line per failing check, naming it.",
                        "not ready: registry: no answer within 5s\n",
                    ),
                },
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics (text format 0.0.4).",
                "operationId": "getMetrics",
                "description": "Needs the bearer token unless [api] metrics_public = true."
                " 404 when the relay serves no metrics.",
                "responses": {
                    "200": _plain_response("Every metric.", "oemrelay_records_committed_total 12.0\n"),
                    "401": _error_response("Missing or wrong bearer token."),
                },
            }
        },
    }


def openapi_document(connector_names: Iterable[str] = ()) -> dict[str, Any]:
    """The OpenAPI 3.0 description of this API (its paths are the routes' paths)."""
    serial_parameter = {
        "name": "serial",
        "in": "path",
        "required": True,
        "description": "The device serial, decimal. Anything else is a 400.",
        "schema": _SERIAL_SCHEMA,
    }
    command_types = {
        f"Command_{name}": _openapi_30(schema) for name, schema in COMMAND_TYPES.items()
    }
    limit_parameter = {
        "name": "limit",
        "in": "query",
        "description": "Devices per page.",
        "schema": {
            "type": "integer",
            "minimum": 1,
            "maximum": MAX_LIMIT,
            "default": DEFAULT_LIMIT,
        },
    }
    list_devices = _operation(
        "listDevices",
        "List devices by serial, a page at a time.",
        {
            "200": _json_response("One page of devices.", "DevicePage"),
            "400": _error_response("Bad limit, after or query parameter."),
        },
        parameters=[
            limit_parameter,
            {
                "name": "after",
                "in": "query",
                "description": "Only devices with a greater serial (the previous page's next)."
                " Only with sort=serial.",
                "schema": _SERIAL_SCHEMA,
            },
            *_SEARCH_PARAMETERS,
        ],
    )
    import_devices = _operation(
        "importDevices",
        "Create or update many devices from CSV, all or nothing.",
        {
            "200": _json_response("Imported.", "ImportResult"),
            "400": _error_response("A bad row; the message names its line."),
            "413": _too_large(MAX_CSV_BODY),
        },
        description="Rows are serial,custom1,custom2,custom3[,connector];"
        " a first row whose first cell is 'serial' is a header. Every"
        " row has as many cells as the first (4 or 5). With 5, an empty"
        " connector cell clears the override; with 4, overrides are left"
        " unchanged. A bad row (bad serial, wrong number of cells, unknown"
        " connector, serial listed twice) fails the whole import with a"
        " 400 naming its line; nothing is imported.",
        requestBody={
            "required": True,
            "content": {
                "text/csv": {
                    "schema": {"type": "string"},
                    "example": "serial,custom1,custom2,custom3,connector\n12345,key-a,,,\n",
                }
            },
        },
    )
    get_device = _operation(
        "getDevice",
        "One device.",
        {"200": _json_response("The device.", "Device"), "400": _BAD_SERIAL, "404": _NO_DEVICE},
    )
    put_device = _operation(
        "putDevice",
        "Set custom fields and the connector override, creating the device if it is unknown.",
        {
            "200": _json_response("Updated.", "Device"),
            "201": _json_response("Created.", "Device"),
            "400": _error_response(
                "Bad JSON, an unknown key, a wrong type or an unknown connector."
            ),
            "413": _too_large(MAX_JSON_BODY),
        },
        description="Keys left out keep their values.",
        requestBody=_json_body_of("DeviceChanges"),
    )
    list_commands = _operation(
        "listCommands",
        "The device's commands, whatever their status.",
        {
            "200": _json_response("The commands.", "CommandList"),
            "400": _BAD_SERIAL,
            "404": _NO_DEVICE,
        },
    )
    add_command = _operation(
        "addCommand",
        "Queue a command for the device's next async session.",
        {
            "202": _json_response("Queued.", "Command"),
            "400": _error_response(
                "Bad JSON, an unknown type, a bad parameter or an expiry already past."
            ),
            "404": _NO_DEVICE,
            "413": _too_large(MAX_JSON_BODY),
        },
        requestBody=_json_body_of("CommandBody"),
    )
    dead_letter_parameter = {
        "name": "id",
        "in": "path",
        "required": True,
        "description": "The dead letter's id, from the listing.",
        "schema": {"type": "integer", "minimum": 1},
    }
    no_spool = _error_response("This relay has no spool.")
    no_dead_letter = _error_response("No dead letter with this id.")
    list_dead_letters = _operation(
        "listDeadLetters",
        "Uploads the spool gave up delivering, by id, a page at a time.",
        {
            "200": _json_response("One page of dead letters.", "DeadLetterPage"),
            "400": _error_response("Bad limit, after, serial or query parameter."),
            "503": no_spool,
        },
        description="An upload becomes a dead letter when its end server refuses it"
        " with a status it would repeat (HTTP 4xx but 408 and 429), after the"
        " connector's max_attempts failed tries, or when it is older than"
        " spool_max_age. The 500 says the spool is unavailable.",
        parameters=[
            {**limit_parameter, "description": "Dead letters per page."},
            {
                "name": "after",
                "in": "query",
                "description": "Only greater ids (the previous page's next).",
                "schema": {"type": "integer", "minimum": 1},
            },
            {**serial_parameter, "in": "query", "required": False,
             "description": "Only this device's dead letters."},
        ],
    )

    def dead_letter_operation(operation_id: str, summary: str, done: str) -> dict:
        return _operation(
            operation_id,
            summary,
            {
                "200": _json_response(done, "DeadLetterStatus"),
                "400": _error_response("The id is not a whole number from 1."),
                "404": no_dead_letter,
                "503": no_spool,
            },
            description="The 500 says the spool is unavailable.",
        )

    retry_dead_letter = dead_letter_operation(
        "retryDeadLetter",
        "Put a dead letter back in the spool, its attempts and age starting again.",
        "Queued again.",
    )
    delete_dead_letter = dead_letter_operation(
        "deleteDeadLetter", "Forget a dead letter.", "Deleted."
    )
    get_openapi = _operation(
        "getOpenApi",
        "This document.",
        {"200": _response("The OpenAPI document.", {"type": "object"})},
    )
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "oemrelay management API",
            "version": __version__,
            "description": "Devices known to the relay, their custom fields and"
            " connector overrides, CSV import, and commands queued for devices."
            " Times are ISO 8601 UTC. Every request, this document's included,"
            " needs the bearer token.",
        },
        "security": [{"bearerAuth": []}],
        "paths": {
            "/api/devices": {"get": list_devices},
            "/api/devices/import": {"post": import_devices},
            "/api/devices/{serial}": {
                "parameters": [serial_parameter],
                "get": get_device,
                "put": put_device,
            },
            "/api/devices/{serial}/commands": {
                "parameters": [serial_parameter],
                "get": list_commands,
                "post": add_command,
            },
            "/api/deadletters": {"get": list_dead_letters},
            "/api/deadletters/{id}": {
                "parameters": [dead_letter_parameter],
                "delete": delete_dead_letter,
            },
            "/api/deadletters/{id}/retry": {
                "parameters": [dead_letter_parameter],
                "post": retry_dead_letter,
            },
            "/api/openapi.json": {"get": get_openapi},
            **_ops_paths(),
            **_console_paths(serial_parameter),
        },
        "components": {
            "securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Error": {
                    "type": "object",
                    "required": ["error"],
                    "properties": {"error": {"type": "string"}},
                },
                **_device_schemas(sorted(connector_names)),
                "DevicePage": {
                    "type": "object",
                    "required": ["devices", "next"],
                    "properties": {
                        "devices": {"type": "array", "items": _ref("Device")},
                        "next": _nullable(
                            {
                                **_SERIAL_SCHEMA,
                                "description": "Pass as after for the next page;"
                                " null on the last page.",
                            }
                        ),
                    },
                },
                "ImportResult": {
                    "type": "object",
                    "required": ["created", "updated"],
                    "properties": {
                        "created": {"type": "integer", "minimum": 0},
                        "updated": {"type": "integer", "minimum": 0},
                    },
                },
                "Command": {
                    "type": "object",
                    "properties": {
                        "id": {"type": "integer"},
                        "type": {"type": "string", "enum": list(COMMAND_TYPES)},
                        "params": {"type": "object"},
                        "status": {"type": "string", "enum": list(COMMAND_STATES)},
                        "created": _TIME,
                        "send_after": _nullable(_TIME),
                        "expires": _nullable(_TIME),
                        "sent": _nullable(_TIME),
                        "completed": _nullable(_TIME),
                        "device_status": _nullable(
                            {
                                "type": "integer",
                                "description": "The delivery status the device"
                                " answered (0x21).",
                            }
                        ),
                    },
                },
                "CommandList": {
                    "type": "object",
                    "required": ["commands"],
                    "properties": {
                        "commands": {"type": "array", "items": _ref("Command")},
                    },
                },
                "CommandBody": {
                    "oneOf": [_ref(name) for name in command_types],
                    "discriminator": {
                        "propertyName": "type",
                        "mapping": {
                            name: f"#/components/schemas/Command_{name}"
                            for name in COMMAND_TYPES
                        },
                    },
                },
                **command_types,
                **_CONSOLE_SCHEMAS,
                "DeadLetter": {
                    "type": "object",
                    "properties": {
                        "id": {"type": "integer", "minimum": 1},
                        "serial": _SERIAL_SCHEMA,
                        "connector": {"type": "string"},
                        "records": {"type": "integer", "minimum": 0},
                        "received_at": _TIME,
                        "dead_at": _TIME,
                        "attempts": {"type": "integer", "minimum": 0},
                        "reason": {"type": "string", "description": "The last failure, one line."},
                    },
                },
                "DeadLetterPage": {
                    "type": "object",
                    "required": ["deadletters", "next"],
                    "properties": {
                        "deadletters": {"type": "array", "items": _ref("DeadLetter")},
                        "next": {
                            "type": "integer",
                            "nullable": True,
                            "description": "Pass as after for the next page;"
                            " null on the last page.",
                        },
                    },
                },
                "DeadLetterStatus": {
                    "type": "object",
                    "required": ["id", "status"],
                    "properties": {
                        "id": {"type": "integer"},
                        "status": {"type": "string", "enum": ["queued", "deleted"]},
                    },
                },
            },
        },
    }


# -- the console's operations (fleet, device search, live view, recordings) -----

_SEARCH_PARAMETERS = [
    {
        "name": "q",
        "in": "query",
        "description": "Devices whose serial is this number, or whose IMEI, ICCID,"
        " custom1, custom2 or custom3 starts with this text (case-sensitive).",
        "schema": {"type": "string"},
    },
    {
        "name": "connected",
        "in": "query",
        "description": "true: only devices connected now.",
        "schema": {"type": "boolean", "default": False},
    },
    {
        "name": "failing",
        "in": "query",
        "description": "true: only devices whose last upload was not delivered"
        " (last_error set; a delivery clears it).",
        "schema": {"type": "boolean", "default": False},
    },
    {
        "name": "silent_hours",
        "in": "query",
        "description": "Only devices last heard from more than this many hours ago"
        " (never-seen devices are left out).",
        "schema": {"type": "integer", "minimum": 1, "maximum": MAX_SILENT_HOURS},
    },
    {
        "name": "sort",
        "in": "query",
        "description": "serial (pages with after) or last_seen (most recent first,"
        " never-seen last; pages with offset).",
        "schema": {"type": "string", "enum": list(DEVICE_SORTS), "default": "serial"},
    },
    {
        "name": "offset",
        "in": "query",
        "description": "With sort=last_seen: devices to skip (the previous page's next).",
        "schema": {"type": "integer", "minimum": 0, "maximum": MAX_OFFSET, "default": 0},
    },
]

_COUNTS = {"type": "object", "additionalProperties": {"type": "integer", "minimum": 0}}

_CONSOLE_SCHEMAS = {
    "Fleet": {
        "type": "object",
        "required": ["registry", "activity"],
        "properties": {
            "registry": {
                "type": "object",
                "description": "From the registry, shared by every relay node.",
                "properties": {
                    "devices": {"type": "integer", "minimum": 0},
                    "connected": {"type": "integer", "minimum": 0},
                    "failing": {"type": "integer", "minimum": 0},
                    "nodes": {**_COUNTS, "description": "Connected devices by relay node."},
                },
            },
            "activity": _nullable({
                "type": "object",
                "description": "What this relay node did in the last minutes.",
                "properties": {
                    "minutes": {"type": "integer"},
                    "connected_here": {"type": "integer", "minimum": 0},
                    "uploads_committed": {"type": "integer", "minimum": 0},
                    "records_committed": {"type": "integer", "minimum": 0},
                    "withheld": {**_COUNTS, "description": "Commits withheld, by kind."},
                    "end_server_errors": {
                        **_COUNTS,
                        "description": "Failed delivery tries (not 2xx), by connector.",
                    },
                    "spool": _nullable({
                        "type": "object",
                        "description": "The spool's stats(); null without a spool.",
                    }),
                },
            }),
        },
    },
    "Recording": {
        "type": "object",
        "properties": {
            "id": {"type": "integer", "minimum": 1},
            "serial": _SERIAL_SCHEMA,
            "started": _TIME,
            "ends": _TIME,
            "recording": {"type": "boolean", "description": "Whether frames are still kept."},
            "frames": {"type": "integer", "minimum": 0},
            "bytes": {"type": "integer", "minimum": 0},
            "truncated": {"type": "boolean", "description": "It stopped when full."},
        },
    },
    "RecordingList": {
        "type": "object",
        "required": ["recordings"],
        "properties": {"recordings": {"type": "array", "items": _ref("Recording")}},
    },
    "RecordingBody": {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "minutes": {
                "type": "number",
                "exclusiveMinimum": 0,
                "maximum": MAX_RECORDING_MINUTES,
                "default": 10,
            }
        },
    },
}


def _console_paths(serial_parameter: dict[str, Any]) -> dict[str, Any]:
    """The paths the console needs beyond the device API's."""
    no_live = _error_response("The live view is not enabled.")
    return {
        "/api/fleet": {
            "get": _operation(
                "getFleet",
                "The fleet at a glance: registry counts and this node's recent activity.",
                {"200": _json_response("The summary.", "Fleet"),
                 "400": _error_response("Bad minutes.")},
                parameters=[{
                    "name": "minutes",
                    "in": "query",
                    "description": "How many recent minutes the activity covers.",
                    "schema": {"type": "integer", "minimum": 1,
                               "maximum": WINDOW_MINUTES, "default": 15},
                }],
            )
        },
        "/api/devices/{serial}/live": {
            "parameters": [serial_parameter],
            "get": _operation(
                "watchDevice",
                "The device's traffic as it happens, as server-sent events.",
                {
                    "200": {
                        "description": "A text/event-stream of events named connected,"
                        " upload (records, first_seq and the OEM JSON), trace (a debug"
                        " line: seq, code, text), commit, withheld (kind, reason), async,"
                        " command_answered, protocol_error, closed, and dropped (count:"
                        " events left out because the device was too chatty or this"
                        " client fell behind). Each data line is one JSON object.",
                        "content": {"text/event-stream": {"schema": {"type": "string"}}},
                    },
                    "400": _BAD_SERIAL,
                    "404": _error_response("No such device, or the live view is not enabled."),
                    "429": _error_response("The device has as many live clients as allowed."),
                },
                description="Send the bearer header (use fetch() and read the body;"
                " EventSource cannot send headers).",
            ),
        },
        "/api/devices/{serial}/recordings": {
            "parameters": [serial_parameter],
            "post": _operation(
                "startRecording",
                "Keep the device's raw frames for some minutes, as a capture file.",
                {
                    "201": _json_response("Recording.", "Recording"),
                    "400": _error_response("Bad JSON or minutes."),
                    "404": _error_response("No such device, or the live view is not enabled."),
                },
                requestBody=_json_body_of("RecordingBody"),
            ),
        },
        "/api/recordings": {
            "get": _operation(
                "listRecordings",
                "The recordings kept (the last 32, in memory), oldest first.",
                {"200": _json_response("The recordings.", "RecordingList"), "404": no_live},
            )
        },
        "/api/recordings/{recording}": {
            "parameters": [{
                "name": "recording", "in": "path", "required": True,
                "schema": {"type": "integer", "minimum": 1},
            }],
            "get": _operation(
                "getRecording",
                "A recording's capture file: hex lines with # comments, as oemrelay"
                " decode and oemrelay simulate --replay read.",
                {
                    "200": {
                        "description": "The capture.",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    },
                    "404": _error_response("No such recording."),
                },
            ),
        },
    }
