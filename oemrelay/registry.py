"""
The device registry: what the relay knows of each device, and its command queue.

:class:`Registry` keeps one schema with one behaviour on SQLite
(``sqlite:PATH``) and PostgreSQL (``postgresql://...``).  Every database call
runs in the thread pool of a ``twisted.enterprise.adbapi.ConnectionPool``, so
none blocks the reactor; every public method returns a Deferred.

The SQL is written once with ``?`` placeholders (turned into ``%s`` for
psycopg); only three column types in the schema differ between the two.
Several relays may share one PostgreSQL database: the registry keeps no cache,
and a relay only marks disconnected the devices it holds itself.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

from twisted.enterprise import adbapi
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from .codec import Hello
from .relay import DeviceProfile

if TYPE_CHECKING:
    from .commands import CommandRequest

#: Command states, in the order a command normally goes through them.
COMMAND_STATES = ("queued", "sent", "delivered", "failed", "expired")


@dataclass(frozen=True)
class DeviceRecord:
    """One device as the registry holds it.  Times are Unix seconds or None."""

    serial: int
    imei: str | None = None
    iccid: str | None = None
    product_id: int | None = None
    hardware_rev: int | None = None
    firmware: str | None = None
    first_seen: float | None = None
    last_seen: float | None = None
    connected: bool = False
    node: str | None = None
    last_upload: float | None = None
    records_committed: int = 0
    last_error: str | None = None
    custom1: str = field(default="", repr=False)
    custom2: str = field(default="", repr=False)
    custom3: str = field(default="", repr=False)
    connector: str | None = None

    def profile(self) -> DeviceProfile:
        """The part connectors use."""
        return DeviceProfile(self.custom1, self.custom2, self.custom3, self.connector)


@dataclass(frozen=True)
class Command:
    """A command queued for a device, as sent in an async message (0x20)."""

    id: int
    serial: int
    type: str
    params: dict[str, Any]
    message_type: int
    data: bytes
    status: str
    created: float
    send_after: float | None = None
    expires: float | None = None
    sent: float | None = None
    completed: float | None = None
    device_status: int | None = None


#: The schema version this code creates and understands.
SCHEMA_VERSION = 1

#: The keys :meth:`Registry.update_device` and :meth:`Registry.import_devices` accept.
DEVICE_SETTINGS = ("custom1", "custom2", "custom3", "connector")

_MAX_SERIAL = 0xFFFFFFFF

_log = Logger()

_P = ParamSpec("_P")
_T = TypeVar("_T")


class RegistryError(Exception):
    """The database cannot be used by this relay.  The message is one line."""


def _returns_deferred(
    method: Callable[_P, Coroutine[Any, Any, _T]],
) -> Callable[_P, Deferred[_T]]:
    """Make a coroutine method return a Deferred (for ``await`` and ``addCallback``)."""

    @functools.wraps(method)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> Deferred[_T]:
        return Deferred.fromCoroutine(method(*args, **kwargs))

    return wrapper


# -- schema ------------------------------------------------------------------

#: Marks disconnected the devices a node left marked connected.
_RELEASE_NODE = "UPDATE devices SET connected = ? WHERE node = ? AND connected = ?"



@dataclass(frozen=True)
class _Dialect:
    """What differs between the two databases: three column types and a lock."""

    name: str
    module: str
    serial_type: str
    command_id: str
    blob_type: str
    #: Run first in the migration transaction, so two relays never migrate at once.
    migration_lock: str
    pool_options: Mapping[str, Any] = field(default_factory=dict)


_SQLITE = _Dialect(
    name="sqlite",
    module="sqlite3",
    # Exactly "INTEGER PRIMARY KEY": the serial is the rowid, one b-tree.
    serial_type="INTEGER",
    # AUTOINCREMENT: an id is never reused, so a late reply cannot hit another command.
    command_id="INTEGER PRIMARY KEY AUTOINCREMENT",
    blob_type="BLOB",
    migration_lock="BEGIN IMMEDIATE",
    pool_options={"cp_min": 1, "cp_max": 1},
)

_POSTGRESQL = _Dialect(
    name="postgresql",
    module="psycopg",
    serial_type="BIGINT",
    command_id=(
        "BIGINT GENERATED ALWAYS AS IDENTITY (MINVALUE 1 MAXVALUE 4294967295) PRIMARY KEY"
    ),
    blob_type="BYTEA",
    # Any constant will do; it only has to be the same in every relay.
    migration_lock="SELECT pg_advisory_xact_lock(5139884137)",
    pool_options={"cp_min": 1, "cp_max": 5, "cp_reconnect": True},
)

#: The statements that bring the schema from version N-1 to N, by N.
_MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: (
        """
        CREATE TABLE devices (
            serial {serial_type} NOT NULL PRIMARY KEY
                CHECK (serial BETWEEN 0 AND 4294967295),
            imei TEXT,
            iccid TEXT,
            product_id INTEGER,
            hardware_rev INTEGER,
            firmware TEXT,
            first_seen DOUBLE PRECISION,
            last_seen DOUBLE PRECISION,
            connected BOOLEAN NOT NULL DEFAULT FALSE,
            node TEXT,
            last_upload DOUBLE PRECISION,
            records_committed BIGINT NOT NULL DEFAULT 0,
            last_error TEXT,
            custom1 TEXT NOT NULL DEFAULT '',
            custom2 TEXT NOT NULL DEFAULT '',
            custom3 TEXT NOT NULL DEFAULT '',
            connector TEXT
        )
        """,
        "CREATE INDEX devices_node ON devices (node)",
        """
        CREATE TABLE commands (
            id {command_id},
            serial {serial_type} NOT NULL REFERENCES devices (serial) ON DELETE CASCADE,
            type TEXT NOT NULL,
            params TEXT NOT NULL,
            message_type INTEGER NOT NULL,
            data {blob_type} NOT NULL,
            status TEXT NOT NULL
                CHECK (status IN ('queued', 'sent', 'delivered', 'failed', 'expired')),
            created DOUBLE PRECISION NOT NULL,
            send_after DOUBLE PRECISION,
            expires DOUBLE PRECISION,
            sent DOUBLE PRECISION,
            completed DOUBLE PRECISION,
            device_status INTEGER,
            CHECK (id BETWEEN 1 AND 4294967295)
        )
        """,
        "CREATE INDEX commands_serial_status ON commands (serial, status, id)",
    ),
}

_DEVICE_COLUMNS = tuple(f.name for f in fields(DeviceRecord))
_DEVICE_SELECT = ", ".join(_DEVICE_COLUMNS)
_COMMAND_COLUMNS = tuple(f.name for f in fields(Command))
_COMMAND_SELECT = ", ".join(_COMMAND_COLUMNS)


@functools.lru_cache(maxsize=256)
def _format_paramstyle(sql: str) -> str:
    """``?`` placeholders as ``%s`` (and a literal ``%`` doubled), for psycopg."""
    return sql.replace("%", "%%").replace("?", "%s")


def _time(value: Any) -> float | None:
    return None if value is None else float(value)


def _device_from_row(row: Iterable[Any]) -> DeviceRecord:
    values = dict(zip(_DEVICE_COLUMNS, row, strict=True))
    for name in ("first_seen", "last_seen", "last_upload"):
        values[name] = _time(values[name])
    values["connected"] = bool(values["connected"])
    return DeviceRecord(**values)


def _command_from_row(row: Iterable[Any]) -> Command:
    values = dict(zip(_COMMAND_COLUMNS, row, strict=True))
    values["params"] = json.loads(values["params"])
    values["data"] = bytes(values["data"])
    for name in ("created", "send_after", "expires", "sent", "completed"):
        values[name] = _time(values[name])
    return Command(**values)


# -- input checks --------------------------------------------------------------


def _check_serial(serial: object) -> int:
    if isinstance(serial, bool) or not isinstance(serial, int):
        raise ValueError(f"serial must be an integer, not {type(serial).__name__}")
    if not 0 <= serial <= _MAX_SERIAL:
        raise ValueError(f"serial {serial} is outside 0..{_MAX_SERIAL}")
    return serial


def _check_settings(
    changes: object, allowed: Iterable[str] = DEVICE_SETTINGS
) -> dict[str, str | None]:
    """
    Check device settings and normalise them (an empty connector clears the override).

    :raises ValueError: for a key not in ``allowed`` or a value of the wrong type.
    """
    if not isinstance(changes, Mapping):
        raise ValueError(f"device settings must be an object, not {type(changes).__name__}")
    allowed = tuple(allowed)
    checked: dict[str, str | None] = {}
    for key, value in changes.items():
        if key not in allowed:
            raise ValueError(f"unknown key {key!r} (known: {', '.join(allowed)})")
        if key == "connector" and value is None:
            checked[key] = None
            continue
        if not isinstance(value, str):
            raise ValueError(f"{key} must be a string, not {type(value).__name__}")
        if "\x00" in value:
            # PostgreSQL cannot store it, SQLite can: refuse it on both.
            raise ValueError(f"{key} contains a NUL character")
        checked[key] = (value or None) if key == "connector" else value
    return checked


def _check_import_row(row: object) -> tuple[int, dict[str, str | None]]:
    if not isinstance(row, Mapping):
        raise ValueError(f"must be an object, not {type(row).__name__}")
    if "serial" not in row:
        raise ValueError("has no serial")
    serial = _check_serial(row["serial"])
    settings = _check_settings({k: v for k, v in row.items() if k != "serial"})
    return serial, settings


def _check_command_id(command_id: object) -> int:
    # SQLite cannot bind an int past 2**63, PostgreSQL matches nothing: refuse on both.
    if isinstance(command_id, bool) or not isinstance(command_id, int):
        raise ValueError(f"command_id must be an integer, not {type(command_id).__name__}")
    if not 0 <= command_id <= _MAX_SERIAL:
        raise ValueError(f"command_id {command_id} is outside 0..{_MAX_SERIAL}")
    return command_id


def _check_count(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, not {value!r}")
    return value


# -- URLs ----------------------------------------------------------------------


def _url_without_password(url: str) -> str:
    """``url`` with the password removed from its user part and its query."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        netloc = userinfo.split(":", 1)[0] + "@" + host
    query = parts.query
    if query:
        query = urlencode(
            [
                (key, value)
                for key, value in parse_qsl(query, keep_blank_values=True)
                if key not in ("password", "sslpassword")
            ]
        )
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def _passwords(url: str) -> list[str]:
    """The passwords in ``url`` (user part and query), raw and decoded."""
    try:
        parts = urlsplit(url)
        found = [parts.password or ""]
    except ValueError:
        return []
    for pair in parts.query.split("&"):
        key, _, value = pair.partition("=")
        if unquote(key) in ("password", "sslpassword"):
            found.append(value)
    found += [unquote(secret) for secret in found]
    return sorted({secret for secret in found if secret}, key=len, reverse=True)


def check_postgresql_url(url: str) -> None:
    """
    Check a ``postgresql://`` registry URL without connecting.

    :raises ValueError: as :meth:`Registry.from_url` would; one line, no password.
    """
    _postgresql_pool_args(url)


def _sqlite_pool_args(path: str) -> tuple[tuple[Any, ...], dict[str, Any]]:
    def open_connection(connection: Any) -> None:
        # WAL: readers never wait for the writer; this sticks to the file.
        connection.execute("PRAGMA journal_mode=WAL")
        # In WAL mode NORMAL syncs at checkpoints, not on every commit: a
        # crash loses nothing, a power cut at most the last moments of
        # bookkeeping.  Per-commit fsyncs would cap uploads per second.
        connection.execute("PRAGMA synchronous=NORMAL")
        connection.execute("PRAGMA foreign_keys=ON")

    return (path,), {
        "check_same_thread": False,
        # The busy timeout, in seconds: wait this long for another process's lock.
        "timeout": 10.0,
        "cp_openfun": open_connection,
    }


def _postgresql_pool_args(url: str) -> tuple[tuple[Any, ...], dict[str, Any]]:
    try:
        from psycopg import ProgrammingError
        from psycopg.conninfo import conninfo_to_dict
    except ImportError:
        raise ValueError(
            "a postgresql:// registry needs the psycopg package (pip install 'psycopg[binary]')"
        ) from None
    try:
        given = conninfo_to_dict(url)
    except ProgrammingError as e:
        reason = (str(e).strip().splitlines() or ["cannot parse it"])[0]
        # libpq quotes the token it cannot parse, which may be the password.
        for secret in _passwords(url):
            reason = reason.replace(secret, "***")
        raise ValueError(f"bad PostgreSQL URL {_url_without_password(url)}: {reason}") from None
    defaults = {"connect_timeout": 10, "application_name": "oemrelay"}
    return (url,), {k: v for k, v in defaults.items() if k not in given}


# -- the registry ----------------------------------------------------------------


class Registry:
    """
    The devices the relay has seen or been told about, and their commands.

    Use :meth:`from_url`, then :meth:`start` before anything else and
    :meth:`close` at the end.  Every other public method returns a Deferred
    and takes the current time as ``now`` (Unix seconds) from the caller.

    It is the relay's :class:`~oemrelay.relay.DeviceLedger`.
    """

    def __init__(
        self, pool: adbapi.ConnectionPool, dialect: _Dialect, url_for_logs: str, reactor: Any
    ) -> None:
        """
        :param pool: a connection pool on ``dialect.module``.
        :param dialect: :data:`_SQLITE` or :data:`_POSTGRESQL`.
        :param url_for_logs: where the database is, with no password.
        :param reactor: the pool's reactor.
        """
        self._pool = pool
        self._dialect = dialect
        self._url_for_logs = url_for_logs
        self._reactor = reactor
        self._closed = False
        # Calls made before start() finished wait here; None once it has.
        self._not_started: list[Deferred[None]] | None = []
        if pool.dbapi.paramstyle in ("format", "pyformat"):
            self._sql: Callable[[str], str] = _format_paramstyle
        else:
            self._sql = str

    @classmethod
    def from_url(cls, url: str, reactor: Any = None) -> Registry:
        """
        A registry for a database URL.  Nothing is opened until :meth:`start`.

        :param url: ``sqlite:PATH`` (a relative path is taken relative to the
            current directory, now) or ``postgresql://user[:password]@host[:port]/db[?params]``
            (libpq's URL form; ``postgres://`` is accepted too).
        :param reactor: provides ``IReactorCore``, ``IReactorThreads`` and
            ``IReactorTime``; the global reactor if None.
        :raises ValueError: for any other URL; the message is one line.
        """
        if reactor is None:
            from twisted.internet import reactor  # type: ignore[no-redef]
        if not isinstance(url, str):
            raise ValueError(f"registry URL must be a string, not {type(url).__name__}")
        if url.startswith("sqlite:"):
            path = url[len("sqlite:"):]
            if not path:
                raise ValueError(
                    "registry URL sqlite: needs a path, as in sqlite:/var/lib/oemrelay/registry.db"
                )
            path = os.path.abspath(path)
            dialect, url_for_logs = _SQLITE, f"sqlite:{path}"
            args, kwargs = _sqlite_pool_args(path)
        elif url.startswith(("postgresql://", "postgres://")):
            dialect, url_for_logs = _POSTGRESQL, _url_without_password(url)
            args, kwargs = _postgresql_pool_args(url)
        else:
            shown = url if "@" not in url else _url_without_password(url)
            raise ValueError(
                f"registry URL {shown!r} is neither sqlite:PATH nor postgresql://..."
            )
        pool = adbapi.ConnectionPool(
            dialect.module,
            *args,
            cp_reactor=reactor,
            cp_noisy=False,
            **dialect.pool_options,
            **kwargs,
        )
        return cls(pool, dialect, url_for_logs, reactor)

    @property
    def url_for_logs(self) -> str:
        """The database URL with any password removed."""
        return self._url_for_logs

    # -- plumbing (the _txn_ methods run in a pool thread) --

    def _execute(self, txn: adbapi.Transaction, sql: str, params: tuple[Any, ...] = ()) -> None:
        txn.execute(self._sql(sql), params)

    def _fetch_all(
        self, txn: adbapi.Transaction, sql: str, params: tuple[Any, ...] = ()
    ) -> list[Any]:
        self._execute(txn, sql, params)
        return txn.fetchall()

    def _fetch_one(self, txn: adbapi.Transaction, sql: str, params: tuple[Any, ...] = ()) -> Any:
        rows = self._fetch_all(txn, sql, params)
        return rows[0] if rows else None

    def _interaction(self, function: Callable[..., _T], *args: Any) -> Deferred[_T]:
        """
        Run ``function(txn, *args)`` in one transaction in a pool thread, once
        :meth:`start` has finished: a device or API call that arrives while the
        relay starts waits for the schema and the release of stale connections.
        """
        if self._not_started is None:
            return self._pool.runInteraction(function, *args)
        started: Deferred[None] = Deferred()
        self._not_started.append(started)
        return started.addCallback(lambda _: self._pool.runInteraction(function, *args))

    def _query_one(self, sql: str, *params: Any) -> Deferred[Any]:
        return self._interaction(self._fetch_one, sql, params)

    def _query_all(self, sql: str, *params: Any) -> Deferred[list[Any]]:
        return self._interaction(self._fetch_all, sql, params)

    def _txn_rowcount(self, txn: adbapi.Transaction, sql: str, params: tuple[Any, ...]) -> int:
        self._execute(txn, sql, params)
        return txn.rowcount

    def _write(self, sql: str, *params: Any) -> Deferred[int]:
        """Run one statement; fire with the number of rows it changed."""
        return self._interaction(self._txn_rowcount, sql, params)

    # -- lifetime --

    @_returns_deferred
    async def start(self, node: str | None = None) -> int:
        """
        Create the schema if it is missing and bring it up to
        :data:`SCHEMA_VERSION`; with ``node``, release the connections a
        crashed run of that node left marked (see :meth:`node_started`).
        Other calls wait until this is done.

        Safe to call on every start, and from several relays at once.

        :return: how many devices were released.
        :raises RegistryError: if the database's schema is newer than this code.
        """
        released = 0
        try:
            old = await self._pool.runInteraction(self._txn_migrate, self._reactor.seconds())
            if node is not None:
                released = await self._pool.runInteraction(
                    self._txn_rowcount, _RELEASE_NODE, (False, node, True)
                )
        finally:
            waiting, self._not_started = self._not_started or [], None
            for started in waiting:
                started.callback(None)
        if old != SCHEMA_VERSION:
            _log.info(
                "Registry schema at {url} migrated from version {old} to {new}",
                url=self._url_for_logs,
                old=old,
                new=SCHEMA_VERSION,
            )
        return released

    def _txn_migrate(self, txn: adbapi.Transaction, now: float) -> int:
        self._execute(txn, self._dialect.migration_lock)
        self._execute(
            txn,
            "CREATE TABLE IF NOT EXISTS schema_version ("
            " version INTEGER NOT NULL PRIMARY KEY, applied DOUBLE PRECISION NOT NULL)",
        )
        (current,) = self._fetch_one(txn, "SELECT MAX(version) FROM schema_version")
        current = current or 0
        if current > SCHEMA_VERSION:
            raise RegistryError(
                f"registry {self._url_for_logs} has schema version {current}; "
                f"this relay knows versions up to {SCHEMA_VERSION}"
            )
        types = {
            "serial_type": self._dialect.serial_type,
            "command_id": self._dialect.command_id,
            "blob_type": self._dialect.blob_type,
        }
        for version in range(current + 1, SCHEMA_VERSION + 1):
            for statement in _MIGRATIONS[version]:
                self._execute(txn, statement.format(**types))
            self._execute(
                txn, "INSERT INTO schema_version (version, applied) VALUES (?, ?)", (version, now)
            )
        return current

    @_returns_deferred
    async def close(self) -> None:
        """Close the pool; calls under way finish first.  Closing twice is harmless."""
        if not self._closed:
            self._closed = True
            self._pool.close()

    # -- what the relay tells the registry --

    @_returns_deferred
    async def profile_for(self, hello: Hello) -> DeviceProfile:
        """The device's custom fields and connector override (empty if unknown)."""
        row = await self._query_one(
            "SELECT custom1, custom2, custom3, connector FROM devices WHERE serial = ?",
            hello.serial,
        )
        return DeviceProfile(*row) if row is not None else DeviceProfile()

    @_returns_deferred
    async def device_connected(self, hello: Hello, node: str, now: float) -> DeviceRecord:
        """
        Record a device's hello: its identity, connected to ``node`` since ``now``.

        Custom fields and the connector override are left as they are.

        :return: the device as it now is.
        """
        row = await self._query_one(
            f"""
            INSERT INTO devices (serial, imei, iccid, product_id, hardware_rev, firmware,
                                 first_seen, last_seen, connected, node)
            VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
            ON CONFLICT (serial) DO UPDATE SET
                imei = excluded.imei,
                iccid = excluded.iccid,
                product_id = excluded.product_id,
                hardware_rev = excluded.hardware_rev,
                firmware = excluded.firmware,
                first_seen = COALESCE(devices.first_seen, excluded.first_seen),
                last_seen = excluded.last_seen,
                connected = excluded.connected,
                node = excluded.node
            RETURNING {_DEVICE_SELECT}
            """,
            _check_serial(hello.serial),
            hello.imei,
            hello.iccid,
            hello.product_id,
            hello.hardware_rev,
            hello.firmware,
            now,
            now,
            True,
            node,
        )
        return _device_from_row(row)

    @_returns_deferred
    async def device_disconnected(self, serial: int, node: str, now: float) -> bool:
        """
        Mark a device disconnected, unless another node holds it now.

        :return: whether the device was marked.
        """
        changed = await self._write(
            "UPDATE devices SET connected = ?, last_seen = ? WHERE serial = ? AND node = ?",
            False,
            now,
            _check_serial(serial),
            node,
        )
        return changed > 0

    @_returns_deferred
    async def node_started(self, node: str, now: float) -> int:
        """
        Mark disconnected every device still marked connected to ``node``
        (connections a crashed run of this node left behind).  ``last_seen``
        is left alone: it stays when each device was last heard from.

        :return: how many devices were marked.
        """
        return await self._write(_RELEASE_NODE, False, node, True)

    @_returns_deferred
    async def upload_committed(self, serial: int, record_count: int, now: float) -> bool:
        """
        Count ``record_count`` records delivered and clear the last error.

        :return: whether the device is known.
        """
        changed = await self._write(
            """
            UPDATE devices SET last_upload = ?, last_seen = ?,
                records_committed = records_committed + ?, last_error = NULL
            WHERE serial = ?
            """,
            now,
            now,
            _check_count("record_count", record_count),
            _check_serial(serial),
        )
        return changed > 0

    @_returns_deferred
    async def delivery_failed(self, serial: int, reason: str, now: float) -> bool:
        """
        Keep why an upload was not delivered (shown until the next delivery).

        :return: whether the device is known.
        """
        changed = await self._write(
            "UPDATE devices SET last_error = ?, last_seen = ? WHERE serial = ?",
            str(reason).replace("\x00", "\\x00"),
            now,
            _check_serial(serial),
        )
        return changed > 0

    # -- devices, for the API --

    @_returns_deferred
    async def list_devices(self, limit: int, after: int | None = None) -> list[DeviceRecord]:
        """
        Up to ``limit`` devices in serial order, those with a serial above
        ``after`` (for the next page: the last serial of this one).
        """
        limit = _check_count("limit", limit)
        if after is None:
            after = -1
        elif isinstance(after, bool) or not isinstance(after, int):
            raise ValueError(f"after must be an integer, not {type(after).__name__}")
        rows = await self._query_all(
            f"SELECT {_DEVICE_SELECT} FROM devices WHERE serial > ? ORDER BY serial LIMIT ?",
            max(after, -1),
            limit,
        )
        return [_device_from_row(row) for row in rows]

    @_returns_deferred
    async def get_device(self, serial: int) -> DeviceRecord | None:
        """One device, or None if it is unknown."""
        row = await self._query_one(
            f"SELECT {_DEVICE_SELECT} FROM devices WHERE serial = ?", _check_serial(serial)
        )
        return None if row is None else _device_from_row(row)

    @_returns_deferred
    async def update_device(
        self, serial: int, changes: Mapping[str, str | None]
    ) -> tuple[DeviceRecord, bool]:
        """
        Set some of a device's custom fields and connector override, creating
        the device if it is unknown (so settings can be loaded before it first
        connects).  A connector of None or ``""`` clears the override.

        :param changes: keys among :data:`DEVICE_SETTINGS`, string values.
        :return: the device as it now is, and whether it was created.
        :raises ValueError: for another key or a value that is not a string.
        """
        serial = _check_serial(serial)
        checked = _check_settings(changes)
        return await self._interaction(self._txn_update_device, serial, checked)

    def _txn_update_device(
        self, txn: adbapi.Transaction, serial: int, changes: Mapping[str, str | None]
    ) -> tuple[DeviceRecord, bool]:
        created = self._fetch_one(
            txn,
            "INSERT INTO devices (serial) VALUES (?)"
            " ON CONFLICT (serial) DO NOTHING RETURNING serial",
            (serial,),
        )
        if changes:
            # The column names come from DEVICE_SETTINGS only (_check_settings).
            assignments = ", ".join(f"{key} = ?" for key in changes)
            row = self._fetch_one(
                txn,
                f"UPDATE devices SET {assignments} WHERE serial = ? RETURNING {_DEVICE_SELECT}",
                (*changes.values(), serial),
            )
        else:
            row = self._fetch_one(
                txn, f"SELECT {_DEVICE_SELECT} FROM devices WHERE serial = ?", (serial,)
            )
        return _device_from_row(row), created is not None

    @_returns_deferred
    async def import_devices(self, rows: list[Mapping[str, Any]]) -> tuple[int, int]:
        """
        Create or update many devices in one transaction: all of them or none.

        Each row has ``serial`` and any keys of :data:`DEVICE_SETTINGS`, as in
        :meth:`update_device`.  Every row is checked before the database is
        touched; a row the database refuses undoes the rows before it.

        :return: how many devices were created and how many updated.
        :raises ValueError: naming the first bad row (counted from 0).
        """
        if not isinstance(rows, (list, tuple)):
            raise ValueError(f"devices must be a list, not {type(rows).__name__}")
        checked = []
        for index, row in enumerate(rows):
            try:
                checked.append(_check_import_row(row))
            except ValueError as e:
                raise ValueError(f"row {index}: {e}") from None
        return await self._interaction(self._txn_import, checked)

    def _txn_import(
        self, txn: adbapi.Transaction, rows: list[tuple[int, dict[str, str | None]]]
    ) -> tuple[int, int]:
        dbapi = self._pool.dbapi
        created = 0
        # In serial order: concurrent imports then lock rows in the same
        # order, which PostgreSQL would otherwise abort as a deadlock.
        for index, (serial, changes) in sorted(enumerate(rows), key=lambda row: row[1][0]):
            try:
                _, new = self._txn_update_device(txn, serial, changes)
            except (dbapi.IntegrityError, dbapi.DataError) as e:
                reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                # Raising makes adbapi roll the whole import back.
                raise ValueError(f"row {index}: the database refused it: {reason}") from e
            created += new
        return created, len(rows) - created

    # -- commands --

    @_returns_deferred
    async def add_command(
        self, serial: int, request: CommandRequest, now: float
    ) -> Command | None:
        """
        Queue a command for a device.

        :return: the queued command, or None if the device is unknown.
        """
        return await self._interaction(
            self._txn_add_command, _check_serial(serial), request, now
        )

    def _txn_add_command(
        self, txn: adbapi.Transaction, serial: int, request: CommandRequest, now: float
    ) -> Command | None:
        if self._fetch_one(txn, "SELECT serial FROM devices WHERE serial = ?", (serial,)) is None:
            return None
        row = self._fetch_one(
            txn,
            f"""
            INSERT INTO commands (serial, type, params, message_type, data, status,
                                  created, send_after, expires)
            VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
            RETURNING {_COMMAND_SELECT}
            """,
            (
                serial,
                request.type,
                json.dumps(request.params, sort_keys=True, separators=(",", ":")),
                request.message_type,
                bytes(request.data),
                "queued",
                now,
                request.send_after,
                request.expires,
            ),
        )
        return _command_from_row(row)

    def _txn_expire(self, txn: adbapi.Transaction, serial: int, now: float) -> None:
        self._execute(
            txn,
            """
            UPDATE commands SET status = ?, completed = ?
            WHERE serial = ? AND status = ? AND expires IS NOT NULL AND expires < ?
            """,
            ("expired", now, serial, "queued", now),
        )

    @_returns_deferred
    async def list_commands(self, serial: int, now: float) -> list[Command]:
        """
        Every command of a device in id order, queued ones past their expiry
        first marked expired.
        """
        return await self._interaction(self._txn_list_commands, _check_serial(serial), now)

    def _txn_list_commands(
        self, txn: adbapi.Transaction, serial: int, now: float
    ) -> list[Command]:
        self._txn_expire(txn, serial, now)
        rows = self._fetch_all(
            txn, f"SELECT {_COMMAND_SELECT} FROM commands WHERE serial = ? ORDER BY id", (serial,)
        )
        return [_command_from_row(row) for row in rows]

    @_returns_deferred
    async def due_commands(self, serial: int, now: float) -> list[Command]:
        """
        The queued commands to send a device now, in id order: not held back
        by ``send_after``, not expired (those past expiry are marked expired).
        """
        return await self._interaction(self._txn_due_commands, _check_serial(serial), now)

    def _txn_due_commands(self, txn: adbapi.Transaction, serial: int, now: float) -> list[Command]:
        self._txn_expire(txn, serial, now)
        rows = self._fetch_all(
            txn,
            f"""
            SELECT {_COMMAND_SELECT} FROM commands
            WHERE serial = ? AND status = ? AND (send_after IS NULL OR send_after <= ?)
            ORDER BY id
            """,
            (serial, "queued", now),
        )
        return [_command_from_row(row) for row in rows]

    @_returns_deferred
    async def command_sent(self, command_id: int, now: float) -> Command | None:
        """
        Mark a queued command sent.  Await this before sending, so the
        device's answer cannot overtake it.

        :return: the command, or None if there is no queued command by that id.
        """
        row = await self._query_one(
            f"UPDATE commands SET status = ?, sent = ? WHERE id = ? AND status = ?"
            f" RETURNING {_COMMAND_SELECT}",
            "sent",
            now,
            _check_command_id(command_id),
            "queued",
        )
        return None if row is None else _command_from_row(row)

    @_returns_deferred
    async def command_result(
        self, command_id: int, device_status: int, now: float
    ) -> Command | None:
        """
        Record a device's answer to a command: 1 delivered, 2 queued again
        (retry later), anything else failed.

        Only a queued or sent command changes, so a repeated or late answer
        cannot bring a finished command back to the queue.

        :return: the command, or None if there is no such pending command.
        """
        if device_status == 1:
            status, completed = "delivered", now
        elif device_status == 2:
            status, completed = "queued", None
        else:
            status, completed = "failed", now
        row = await self._query_one(
            f"""
            UPDATE commands SET status = ?, completed = ?, device_status = ?
            WHERE id = ? AND status IN (?, ?)
            RETURNING {_COMMAND_SELECT}
            """,
            status,
            completed,
            _check_count("device_status", device_status),
            _check_command_id(command_id),
            "queued",
            "sent",
        )
        return None if row is None else _command_from_row(row)
