"""
The registry's database: the connection pool, the two SQL dialects, the schema
and its migrations, and running statements in the pool's threads.

:class:`Database` keeps one schema with one behaviour on SQLite
(``sqlite:PATH``) and PostgreSQL (``postgresql://...``).  Every statement runs
in the thread pool of a ``twisted.enterprise.adbapi.ConnectionPool``, so none
blocks the reactor.  The SQL is written once with ``?`` placeholders (turned
into ``%s`` for psycopg); only three column types differ between the two.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any, ParamSpec, TypeVar

from twisted.enterprise import adbapi
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from ..owner_only import create_owner_only
from ..registry_url import (  # noqa: F401  (check_postgresql_url: part of this interface)
    check_postgresql_url,
    postgresql_pool_args,
    url_without_password,
)

#: The schema version this code creates and understands.
SCHEMA_VERSION = 2

#: The most rows one statement of :meth:`Database.execute_rows` carries on
#: SQLite, for rows of up to 31 values (SQLite takes at most 32,766).
ROWS_PER_STATEMENT = 1024

_log = Logger()

_P = ParamSpec("_P")
_T = TypeVar("_T")


class RegistryError(Exception):
    """The database cannot be used by this relay.  The message is one line."""


def returns_deferred(
    method: Callable[_P, Coroutine[Any, Any, _T]],
) -> Callable[_P, Deferred[_T]]:
    """Make a coroutine method return a Deferred (for ``await`` and ``addCallback``)."""

    @functools.wraps(method)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> Deferred[_T]:
        return Deferred.fromCoroutine(method(*args, **kwargs))

    return wrapper


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

#: The statements that bring the schema from version N-1 to N, by N.  They are
#: history: a new device field is a new version with an ``ALTER TABLE`` (a
#: test checks the migrated ``devices`` table has exactly DeviceRecord's fields).
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
    # The console's device search (DeviceStore.search_devices): each searched
    # column and the last-seen sort has its own index, so a search stays fast
    # at 100,000 devices.
    2: (
        "CREATE INDEX devices_imei ON devices (imei)",
        "CREATE INDEX devices_iccid ON devices (iccid)",
        "CREATE INDEX devices_custom1 ON devices (custom1)",
        "CREATE INDEX devices_custom2 ON devices (custom2)",
        "CREATE INDEX devices_custom3 ON devices (custom3)",
        "CREATE INDEX devices_last_seen ON devices (last_seen)",
    ),
}


@functools.lru_cache(maxsize=256)
def _format_paramstyle(sql: str) -> str:
    """``?`` placeholders as ``%s`` (and a literal ``%`` doubled), for psycopg."""
    return sql.replace("%", "%%").replace("?", "%s")


def sql_for(dbapi: Any) -> Callable[[str], str]:
    """Statements written with ``?`` placeholders, as ``dbapi``'s paramstyle wants them."""
    return _format_paramstyle if dbapi.paramstyle in ("format", "pyformat") else str


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


# -- the database ----------------------------------------------------------------


class Database:
    """
    A connection pool on the registry's schema.

    Use :meth:`from_url`, then :meth:`start` before anything else and
    :meth:`close` at the end.  The ``txn`` methods run in a pool thread, inside
    a function given to :meth:`interaction`; the others return Deferreds.
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
        self.pool = pool
        self._dialect = dialect
        self._url_for_logs = url_for_logs
        self._reactor = reactor
        self._closed = False
        #: Told how long each :meth:`interaction` took (a RelayObserver's
        #: ``registry_called``); None: nobody times the calls.
        self.call_observer: Any = None
        #: psycopg.connect's arguments for a connection of one's own
        #: (PostgreSQL only: LISTEN); None on SQLite.
        self.connect_args: tuple[tuple[Any, ...], dict[str, Any]] | None = None
        # Calls made before start() finished wait here; None once it has.
        self._not_started: list[Deferred[None]] | None = []
        self.sql: Callable[[str], str] = sql_for(pool.dbapi)

    @classmethod
    def from_url(cls, url: str, reactor: Any = None) -> Database:
        """
        A database for a registry URL.  Nothing is opened until :meth:`start`.

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
            dialect, url_for_logs = _POSTGRESQL, url_without_password(url)
            args, kwargs = postgresql_pool_args(url)
        else:
            shown = url if "@" not in url else url_without_password(url)
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
        database = cls(pool, dialect, url_for_logs, reactor)
        if dialect is _POSTGRESQL:
            database.connect_args = (args, kwargs)
        return database

    @property
    def url_for_logs(self) -> str:
        """The database URL with any password removed."""
        return self._url_for_logs

    @property
    def dbapi(self) -> Any:
        """The DB-API module, for its exception classes."""
        return self.pool.dbapi

    # -- in a pool thread --

    def execute(self, txn: adbapi.Transaction, sql: str, params: tuple[Any, ...] = ()) -> None:
        """Run one statement written with ``?`` placeholders."""
        txn.execute(self.sql(sql), params)

    def execute_rows(
        self,
        txn: adbapi.Transaction,
        statement_for: Callable[[int], str],
        rows: list[tuple[Any, ...]],
        pad_with_last: bool = False,
    ) -> None:
        """
        Run ``statement_for(n)``, a statement (``?`` placeholders) taking the
        values of ``n`` rows in turn, over every row of ``rows``.

        On PostgreSQL a one-row statement per row: psycopg pipelines them.
        On SQLite one statement for up to :data:`ROWS_PER_STATEMENT` rows,
        padded to a power of two (so a few statements are prepared, not one
        per batch size) with rows of NULLs, which must change nothing, or
        with ``pad_with_last`` copies of the last row, which must change
        nothing more: the sqlite3 module lets go of the GIL for each
        statement, and a statement per row (executemany) had the pool thread
        take it back from the reactor's thread once per row.
        """
        if not rows:
            return
        if self._dialect is _POSTGRESQL:
            txn.executemany(self.sql(statement_for(1)), rows)
            return
        width = len(rows[0])
        for start in range(0, len(rows), ROWS_PER_STATEMENT):
            chunk = rows[start : start + ROWS_PER_STATEMENT]
            count = 1 << (len(chunk) - 1).bit_length()
            values = [value for row in chunk for value in row]
            values += (list(chunk[-1]) if pad_with_last else [None] * width) * (count - len(chunk))
            txn.execute(statement_for(count), values)

    def fetch_all(
        self, txn: adbapi.Transaction, sql: str, params: tuple[Any, ...] = ()
    ) -> list[Any]:
        """Run one statement; its rows."""
        self.execute(txn, sql, params)
        return txn.fetchall()

    def fetch_one(self, txn: adbapi.Transaction, sql: str, params: tuple[Any, ...] = ()) -> Any:
        """Run one statement; its first row, or None."""
        rows = self.fetch_all(txn, sql, params)
        return rows[0] if rows else None

    def rowcount(self, txn: adbapi.Transaction, sql: str, params: tuple[Any, ...] = ()) -> int:
        """Run one statement; how many rows it changed."""
        self.execute(txn, sql, params)
        return txn.rowcount

    def txn_notify(self, txn: adbapi.Transaction, channel: str, payload: str) -> None:
        """Send a notification when the transaction commits (PostgreSQL; nothing on SQLite)."""
        if self._dialect is _POSTGRESQL:
            self.execute(txn, "SELECT pg_notify(?, ?)", (channel, payload))

    # -- from the reactor --

    def interaction(self, function: Callable[..., _T], *args: Any) -> Deferred[_T]:
        """
        Run ``function(txn, *args)`` in one transaction in a pool thread, once
        :meth:`start` has finished: a device or API call that arrives while the
        relay starts waits for the schema and the release of stale connections.
        """
        if self._not_started is None:
            called = self.pool.runInteraction(function, *args)
        else:
            started: Deferred[None] = Deferred()
            self._not_started.append(started)
            called = started.addCallback(lambda _: self.pool.runInteraction(function, *args))
        if self.call_observer is not None:
            called.addBoth(self._timed, function, self._reactor.seconds())
        return called

    def _timed(self, result: _T, function: Callable[..., Any], began: float) -> _T:
        name = getattr(function, "__name__", "call")
        self.call_observer.registry_called(name, self._reactor.seconds() - began)
        return result

    def query_one(self, sql: str, *params: Any) -> Deferred[Any]:
        """The first row of one statement, or None."""
        return self.interaction(self.fetch_one, sql, params)

    def query_all(self, sql: str, *params: Any) -> Deferred[list[Any]]:
        """The rows of one statement."""
        return self.interaction(self.fetch_all, sql, params)

    def write(self, sql: str, *params: Any) -> Deferred[int]:
        """Run one statement; fire with the number of rows it changed."""
        return self.interaction(self.rowcount, sql, params)

    # -- lifetime --

    @returns_deferred
    async def start(self, prepare: Callable[[adbapi.Transaction], _T] | None = None) -> _T | None:
        """
        Create the schema if it is missing and bring it up to
        :data:`SCHEMA_VERSION`, then run ``prepare(txn)`` if given, before
        any call waiting in :meth:`interaction`.

        Safe to call on every start, and from several relays at once.

        :return: what ``prepare`` returned.
        :raises RegistryError: if the database's schema is newer than this code.
        """
        prepared = None
        if self._dialect is _SQLITE:
            # Before SQLite opens it: its -wal and -shm then get the same mode.
            create_owner_only(self._url_for_logs[len("sqlite:"):])
        try:
            old = await self.pool.runInteraction(self._txn_migrate, self._reactor.seconds())
            if prepare is not None:
                prepared = await self.pool.runInteraction(prepare)
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
        return prepared

    def _txn_migrate(self, txn: adbapi.Transaction, now: float) -> int:
        self.execute(txn, self._dialect.migration_lock)
        self.execute(
            txn,
            "CREATE TABLE IF NOT EXISTS schema_version ("
            " version INTEGER NOT NULL PRIMARY KEY, applied DOUBLE PRECISION NOT NULL)",
        )
        (current,) = self.fetch_one(txn, "SELECT MAX(version) FROM schema_version")
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
                self.execute(txn, statement.format(**types))
            self.execute(
                txn, "INSERT INTO schema_version (version, applied) VALUES (?, ?)", (version, now)
            )
        return current

    @returns_deferred
    async def close(self) -> None:
        """Close the pool; calls under way finish first.  Closing twice is harmless."""
        if not self._closed:
            self._closed = True
            self.pool.close()
