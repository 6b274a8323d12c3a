"""
The durable spool on SQLite (``sqlite:PATH``) or PostgreSQL (``postgresql://...``).

One table, ``spooled``, holds one row per upload and connector still to be
delivered, and the dead letters (``dead`` set).  Every statement runs in an
``adbapi`` pool thread, so none blocks the reactor.

* **Durable**: :meth:`DatabaseSpool.put` fires once its transaction is
  committed; the SQLite connection runs ``synchronous=FULL``, so a commit is
  fsync'd.  The SQLite file (and its ``-wal``/``-shm``) is created owner-only.
* **Shared**: several relays may deliver from one PostgreSQL spool.  A row is
  claimed with ``FOR UPDATE SKIP LOCKED`` and leased to one relay until
  ``lease_until``; a relay that dies leaves only a lease, which expires, so
  nothing it claimed or spooled is stranded.
* **Ordered**: per device and connector only the oldest row still queued
  can be claimed, so uploads reach each end server in the order the device
  sent them; another device's rows are claimed independently.
* **Bounded**: a put is refused with :class:`SpoolFull` once the queued rows
  hold ``max_records`` device records; dead letters do not count.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from twisted.enterprise import adbapi
from twisted.internet.defer import Deferred

from ..owner_only import create_owner_only
from ..registry.database import sql_for
from ..relay import SpoolFull as RelaySpoolFull
from ..registry_url import postgresql_pool_args, url_without_password
from ..relay import Upload
from .stored_upload import frames_blob, rebuild_upload

#: The spool schema version this code creates.
SPOOL_SCHEMA_VERSION = 1

#: Seconds a claimed row stays with the relay that claimed it.
DEFAULT_LEASE = 120.0


class SpoolFull(RelaySpoolFull):
    """The spool holds ``spool_max_records`` records; the upload was not kept."""


class SpoolError(Exception):
    """The spool database cannot be used.  The message is one line."""


@dataclass(frozen=True)
class SpooledUpload:
    """A claimed row: deliver ``upload`` to ``connector``, then report by ``id``."""

    id: int
    connector: str
    upload: Upload
    #: Deliveries tried before this one.
    attempts: int


@dataclass(frozen=True)
class DeadLetter:
    """An upload the spool gave up delivering to one connector, and why."""

    id: int
    serial: int
    connector: str
    records: int
    received_at: float
    dead_at: float
    attempts: int
    reason: str


@dataclass(frozen=True)
class SpoolStats:
    """What metrics and readiness show of the spool."""

    #: Uploads (one per connector) waiting for delivery.
    depth: int
    #: Device records in them (the figure ``spool_max_records`` bounds).
    records: int
    #: Seconds since the oldest waiting upload was received (or retried from
    #: the dead letters); 0 if none waits.
    oldest_age: float
    dead_letters: int


@dataclass(frozen=True)
class _Dialect:
    """What differs between the two databases."""

    id_column: str
    blob_type: str
    #: Run first in a transaction that counts and then writes, so two writers
    #: never both see room for one more.
    write_lock: str
    #: Appended to the claim's SELECT.
    claim_lock: str
    pool_options: Mapping[str, Any] = field(default_factory=dict)


_SQLITE = _Dialect(
    id_column="INTEGER PRIMARY KEY AUTOINCREMENT",
    blob_type="BLOB",
    write_lock="BEGIN IMMEDIATE",
    claim_lock="",
    # One connection: SQLite has one writer anyway.
    pool_options={"cp_min": 1, "cp_max": 1},
)

_POSTGRESQL = _Dialect(
    id_column="BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY",
    blob_type="BYTEA",
    # Any constant will do; it only has to be the same in every relay.
    write_lock="SELECT pg_advisory_xact_lock(5139884138)",
    claim_lock=" FOR UPDATE SKIP LOCKED",
    pool_options={"cp_min": 1, "cp_max": 5, "cp_reconnect": True},
)

_SCHEMA = (
    """
    CREATE TABLE IF NOT EXISTS spool_version (
        version INTEGER NOT NULL PRIMARY KEY,
        checked DOUBLE PRECISION NOT NULL
    )
    """,
    """
    CREATE TABLE IF NOT EXISTS spooled (
        id {id_column},
        serial BIGINT NOT NULL,
        connector TEXT NOT NULL,
        hello {blob_type} NOT NULL,
        frames {blob_type} NOT NULL,
        records INTEGER NOT NULL,
        received_at DOUBLE PRECISION NOT NULL,
        -- What spool_max_age is counted from: received_at, or a retry's time.
        age_from DOUBLE PRECISION NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt DOUBLE PRECISION NOT NULL,
        lease_until DOUBLE PRECISION,
        lease_owner TEXT,
        dead BOOLEAN NOT NULL DEFAULT FALSE,
        dead_at DOUBLE PRECISION,
        last_error TEXT
    )
    """,
    "CREATE INDEX IF NOT EXISTS spooled_order ON spooled (dead, serial, connector, id)",
)

# The oldest queued row of each device and connector that is due and not leased.
_CLAIMABLE = """
    SELECT id, connector, hello, frames, received_at, attempts FROM spooled AS s
    WHERE NOT s.dead AND s.next_attempt <= ? AND (s.lease_until IS NULL OR s.lease_until < ?)
    AND NOT EXISTS (
        SELECT 1 FROM spooled AS older
        WHERE NOT older.dead AND older.serial = s.serial
        AND older.connector = s.connector AND older.id < s.id
    )
    ORDER BY id LIMIT ?
"""

_DEAD_COLUMNS = "id, serial, connector, records, received_at, dead_at, attempts, last_error"


def _sqlite_connection_setup(connection: Any) -> None:
    connection.execute("PRAGMA journal_mode=WAL")
    # FULL: every commit is fsync'd, so a put that fired survives a power cut.
    connection.execute("PRAGMA synchronous=FULL")


class DatabaseSpool:
    """
    The spool (see the module docstring).  Use :meth:`from_url`, then
    :meth:`start` before anything else and :meth:`close` at the end.
    """

    def __init__(
        self,
        pool: adbapi.ConnectionPool,
        dialect: _Dialect,
        url_for_logs: str,
        clock: Any,
        *,
        max_records: int,
        owner: str = "",
        lease: float = DEFAULT_LEASE,
        prepare: Callable[[], None] = lambda: None,
    ) -> None:
        self._pool = pool
        self._dialect = dialect
        self.url_for_logs = url_for_logs
        self._clock = clock
        self._max_records = max_records
        self._owner = owner
        self._lease = lease
        self._prepare = prepare
        self._closed = False
        self._sql: Callable[[str], str] = sql_for(pool.dbapi)

    @classmethod
    def from_url(
        cls, url: str, reactor: Any, *, max_records: int, owner: str = "",
        lease: float = DEFAULT_LEASE, clock: Any = None,
    ) -> DatabaseSpool:
        """
        A spool at ``sqlite:PATH`` or ``postgresql://...``; nothing is opened until :meth:`start`.

        :param reactor: runs the pool's threads; also the clock unless ``clock`` is given.
        :param owner: this relay's name, written on the rows it leases.

        :raises ValueError: for any other URL.
        """
        prepare: Callable[[], None] = lambda: None
        if url.startswith("sqlite:") and url[len("sqlite:"):]:
            path = os.path.abspath(url[len("sqlite:"):])
            dialect, module, url_for_logs = _SQLITE, "sqlite3", f"sqlite:{path}"
            args: tuple[Any, ...] = (path,)
            kwargs: dict[str, Any] = {
                "check_same_thread": False,
                "timeout": 10.0,
                "cp_openfun": _sqlite_connection_setup,
            }
            prepare = functools.partial(create_owner_only, path)
        elif url.startswith(("postgresql://", "postgres://")):
            dialect, module, url_for_logs = _POSTGRESQL, "psycopg", url_without_password(url)
            args, kwargs = postgresql_pool_args(url)
        else:
            raise ValueError("spool must be sqlite:PATH or postgresql://user@host/database")
        pool = adbapi.ConnectionPool(
            module, *args, cp_reactor=reactor, cp_noisy=False, **dialect.pool_options, **kwargs
        )
        return cls(
            pool, dialect, url_for_logs, clock or reactor, max_records=max_records, owner=owner,
            lease=lease, prepare=prepare,
        )

    # -- in a pool thread ----------------------------------------------------

    def _execute(self, txn: adbapi.Transaction, sql: str, params: tuple[Any, ...] = ()) -> None:
        txn.execute(self._sql(sql), params)

    def _rows(self, txn: adbapi.Transaction, sql: str, params: tuple[Any, ...] = ()) -> list:
        self._execute(txn, sql, params)
        return txn.fetchall()

    def _changed(self, txn: adbapi.Transaction, sql: str, params: tuple[Any, ...] = ()) -> int:
        self._execute(txn, sql, params)
        return txn.rowcount

    def _txn_create(self, txn: adbapi.Transaction, now: float) -> None:
        self._execute(txn, self._dialect.write_lock)
        types = {"id_column": self._dialect.id_column, "blob_type": self._dialect.blob_type}
        for statement in _SCHEMA:
            self._execute(txn, statement.format(**types))
        versions = self._rows(txn, "SELECT MAX(version) FROM spool_version")
        version = versions[0][0] if versions else None
        if version is None:
            self._execute(
                txn, "INSERT INTO spool_version (version, checked) VALUES (?, ?)",
                (SPOOL_SCHEMA_VERSION, now),
            )
        elif version > SPOOL_SCHEMA_VERSION:
            raise SpoolError(
                f"spool {self.url_for_logs} has schema version {version}; this relay"
                f" knows versions up to {SPOOL_SCHEMA_VERSION}"
            )

    def _txn_put(
        self, txn: adbapi.Transaction, upload: Upload, connectors: tuple[str, ...], now: float
    ) -> None:
        self._execute(txn, self._dialect.write_lock)
        ((held,),) = self._rows(
            txn, "SELECT COALESCE(SUM(records), 0) FROM spooled WHERE NOT dead"
        )
        if held >= self._max_records:
            raise SpoolFull(
                f"spool holds {held} records, spool_max_records is {self._max_records}"
            )
        hello = upload.hello.payload or upload.hello.to_payload()
        frames = frames_blob(upload.frames)
        for connector in connectors:
            self._execute(
                txn,
                "INSERT INTO spooled (serial, connector, hello, frames, records,"
                " received_at, age_from, next_attempt) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (upload.hello.serial, connector, hello, frames, upload.record_count,
                 upload.received_at, upload.received_at, now),
            )

    def _txn_claim(self, txn: adbapi.Transaction, now: float, limit: int) -> list[SpooledUpload]:
        if self._dialect.claim_lock:
            rows = self._rows(txn, _CLAIMABLE + self._dialect.claim_lock, (now, now, limit))
        else:
            self._execute(txn, self._dialect.write_lock)
            rows = self._rows(txn, _CLAIMABLE, (now, now, limit))
        claimed = []
        for row_id, connector, hello, frames, received_at, attempts in rows:
            self._execute(
                txn, "UPDATE spooled SET lease_until = ?, lease_owner = ? WHERE id = ?",
                (now + self._lease, self._owner, row_id),
            )
            upload = rebuild_upload(bytes(hello), bytes(frames), received_at)
            claimed.append(SpooledUpload(row_id, connector, upload, attempts))
        return claimed

    def _txn_stats(self, txn: adbapi.Transaction, now: float) -> SpoolStats:
        ((depth, records, oldest),) = self._rows(
            txn,
            "SELECT COUNT(*), COALESCE(SUM(records), 0), MIN(age_from)"
            " FROM spooled WHERE NOT dead",
        )
        ((dead,),) = self._rows(txn, "SELECT COUNT(*) FROM spooled WHERE dead")
        oldest_age = max(0.0, now - oldest) if oldest is not None else 0.0
        return SpoolStats(depth, records, oldest_age, dead)

    # -- from the reactor ----------------------------------------------------

    def _run(self, function: Callable[..., Any], *args: Any) -> Deferred:
        return self._pool.runInteraction(function, *args)

    def start(self) -> Deferred[None]:
        """Open the pool and create the schema if it is missing."""
        self._prepare()
        self._pool.start()
        return self._run(self._txn_create, self._clock.seconds())

    def close(self) -> None:
        """Close the pool; calls under way finish first."""
        if not self._closed:
            self._closed = True
            self._pool.close()

    def put(self, upload: Upload, connectors: tuple[str, ...]) -> Deferred[None]:
        """
        Durably keep ``upload`` for later delivery to each of ``connectors``;
        fires once committed (fsync'd on SQLite).

        :raises SpoolFull: (as the Deferred's failure) when the queued rows
            already hold ``max_records`` records.
        """
        return self._run(self._txn_put, upload, tuple(connectors), self._clock.seconds())

    def claim(self, limit: int) -> Deferred[list[SpooledUpload]]:
        """Lease up to ``limit`` due uploads, at most one per device and connector."""
        return self._run(self._txn_claim, self._clock.seconds(), limit)

    def delivered(self, row_id: int) -> Deferred[int]:
        """``row_id`` reached its end server: forget it."""
        return self._run(self._changed, "DELETE FROM spooled WHERE id = ?", (row_id,))

    def retry_later(self, row_id: int, at: float, reason: str) -> Deferred[int]:
        """A try failed: count it, release the lease, try again at ``at``."""
        return self._run(
            self._changed,
            "UPDATE spooled SET attempts = attempts + 1, next_attempt = ?,"
            " lease_until = NULL, lease_owner = NULL, last_error = ? WHERE id = ?",
            (at, reason, row_id),
        )

    def release(self, row_id: int) -> Deferred[int]:
        """Give up the lease on ``row_id`` without counting a try (the relay is stopping)."""
        return self._run(
            self._changed,
            "UPDATE spooled SET lease_until = NULL, lease_owner = NULL WHERE id = ?",
            (row_id,),
        )

    def give_up(self, row_id: int, reason: str, *, tried: bool = True) -> Deferred[int]:
        """Move ``row_id`` to the dead letters with ``reason``."""
        return self._run(
            self._changed,
            "UPDATE spooled SET dead = TRUE, dead_at = ?, attempts = attempts + ?,"
            " lease_until = NULL, lease_owner = NULL, last_error = ? WHERE id = ?",
            (self._clock.seconds(), int(tried), reason, row_id),
        )

    def expire(self, max_age: float) -> Deferred[int]:
        """Move every queued upload received more than ``max_age`` seconds ago to the dead letters."""
        now = self._clock.seconds()
        return self._run(
            self._changed,
            "UPDATE spooled SET dead = TRUE, dead_at = ?, lease_until = NULL,"
            " lease_owner = NULL, last_error = ? WHERE NOT dead AND age_from < ?"
            " AND (lease_until IS NULL OR lease_until < ?)",
            (now, f"older than spool_max_age {max_age:g}s", now - max_age, now),
        )

    def stats(self) -> Deferred[SpoolStats]:
        """Depth, records held, the oldest upload's age and the dead letters."""
        return self._run(self._txn_stats, self._clock.seconds())

    def check_writable(self) -> Deferred[int]:
        """Fire if the spool accepts a write now (for readiness); fail otherwise."""
        return self._run(
            self._changed, "UPDATE spool_version SET checked = ?", (self._clock.seconds(),)
        )

    def list_dead(
        self, limit: int, after: int | None = None, serial: int | None = None
    ) -> Deferred[list[DeadLetter]]:
        """Dead letters by id, ``limit`` at a time, after id ``after``, of one ``serial`` if given."""
        sql = f"SELECT {_DEAD_COLUMNS} FROM spooled WHERE dead AND id > ?"
        params: tuple[Any, ...] = (after or 0,)
        if serial is not None:
            sql += " AND serial = ?"
            params += (serial,)
        return self._run(self._rows, sql + " ORDER BY id LIMIT ?", params + (limit,)).addCallback(
            lambda rows: [DeadLetter(*row[:-1], reason=row[-1] or "") for row in rows]
        )

    def retry_dead(self, row_id: int) -> Deferred[bool]:
        """Put dead letter ``row_id`` back in the queue, attempts reset; False if there is none."""
        return self._run(
            self._changed,
            "UPDATE spooled SET dead = FALSE, dead_at = NULL, attempts = 0,"
            " next_attempt = ?, age_from = ? WHERE id = ? AND dead",
            # Its age starts again, or spool_max_age would kill it at once.
            (self._clock.seconds(), self._clock.seconds(), row_id),
        ).addCallback(bool)

    def delete_dead(self, row_id: int) -> Deferred[bool]:
        """Forget dead letter ``row_id``; False if there is none."""
        return self._run(
            self._changed, "DELETE FROM spooled WHERE id = ? AND dead", (row_id,)
        ).addCallback(bool)


class LatestSpoolFigures:
    """
    The spool's figures as of its last answer, for readers that cannot wait
    (a Prometheus scrape, the fleet summary): each read asks the spool
    again, at most one question at a time, so what a read returns is at
    most one read old.
    """

    def __init__(self, spool: DatabaseSpool) -> None:
        self._spool = spool
        self._latest: SpoolStats | None = None
        self._asking = False

    def _ask(self) -> None:
        if self._asking:
            return
        self._asking = True

        def answered(result: object) -> None:
            self._asking = False
            if isinstance(result, SpoolStats):
                self._latest = result

        self._spool.stats().addBoth(answered)

    def latest(self) -> dict[str, float] | None:
        """The last figures (depth, records, oldest_age, dead_letters), or None before the first answer."""
        self._ask()
        return None if self._latest is None else dataclasses.asdict(self._latest)

    def depth(self) -> int:
        """Uploads waiting in the spool, as last known (0 before the first answer)."""
        self._ask()
        return 0 if self._latest is None else self._latest.depth

    def oldest_age(self) -> float:
        """The oldest waiting upload's age in seconds, as last known."""
        return 0.0 if self._latest is None else self._latest.oldest_age
