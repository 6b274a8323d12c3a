"""
The devices the registry holds: :class:`DeviceRecord`, the one place a
device's fields are declared, and :class:`DeviceStore`, their SQL.

Each field of :class:`DeviceRecord` carries a :class:`FieldDoc` (its JSON
kind, whether the API may set it, what it means).  The SELECT column list, the
row mapping, the API's JSON, its OpenAPI schema, :data:`DEVICE_SETTINGS` and
README.rst's table are all derived from them, so a new field is declared once
(plus a migration that adds its column).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from twisted.enterprise import adbapi
from twisted.internet.defer import Deferred

from ..codec import UINT32_MAX, Hello
from ..commands import iso8601
from ..relay import DeviceProfile
from .database import Database, returns_deferred
from .notify import DEVICES_CHANNEL, changes_payload

MAX_SERIAL = UINT32_MAX

#: The JSON Schema of each kind of field value (nullability aside).
FIELD_KINDS: Mapping[str, Mapping[str, Any]] = {
    "serial": {"type": "integer", "minimum": 0, "maximum": MAX_SERIAL},
    "string": {"type": "string"},
    "integer": {"type": "integer"},
    "count": {"type": "integer", "minimum": 0},
    "boolean": {"type": "boolean"},
    "time": {"type": "string", "format": "date-time", "example": "2026-11-26T09:20:02Z"},
}


@dataclass(frozen=True)
class FieldDoc:
    """What a device field holds, as the API and the docs show it."""

    #: A key of :data:`FIELD_KINDS`; a ``time`` is Unix seconds here, ISO 8601 in JSON.
    kind: str
    description: str
    nullable: bool = False
    #: Whether ``PUT /api/devices/{serial}`` and the CSV import may set it.
    writable: bool = False


def _field(kind: str, description: str, *, writable: bool = False, **options: Any) -> Any:
    """A dataclass field with its :class:`FieldDoc`; ``default=None`` makes it nullable."""
    nullable = "default" in options and options["default"] is None
    doc = FieldDoc(kind, description, nullable, writable)
    return field(metadata={"doc": doc}, **options)


@dataclass(frozen=True)
class DeviceRecord:
    """One device as the registry holds it.  Times are Unix seconds or None."""

    serial: int = _field("serial", "The device's serial number.")
    imei: str | None = _field("string", "IMEI, from the last hello.", default=None)
    iccid: str | None = _field("string", "SIM ICCID, from the last hello.", default=None)
    product_id: int | None = _field("integer", "DM product id, from the last hello.", default=None)
    hardware_rev: int | None = _field(
        "integer", "Hardware revision, from the last hello.", default=None
    )
    firmware: str | None = _field("string", "Firmware version, from the last hello.", default=None)
    first_seen: float | None = _field("time", "The first hello.", default=None)
    last_seen: float | None = _field("time", "The last time it was heard from.", default=None)
    connected: bool = _field("boolean", "Whether it is connected now.", default=False)
    node: str | None = _field("string", "The relay node it is connected to.", default=None)
    last_upload: float | None = _field("time", "The last delivered upload.", default=None)
    records_committed: int = _field(
        "count", "Records delivered and committed, in all.", default=0
    )
    last_error: str | None = _field(
        "string", "Why the last upload was not delivered; cleared by a delivery.", default=None
    )
    custom1: str = _field("string", "Custom field 1.", writable=True, default="", repr=False)
    custom2: str = _field("string", "Custom field 2.", writable=True, default="", repr=False)
    custom3: str = _field("string", "Custom field 3.", writable=True, default="", repr=False)
    connector: str | None = _field(
        "string",
        "Connector override: a [connector:NAME] name; null uses the default.",
        writable=True,
        default=None,
    )

    def profile(self) -> DeviceProfile:
        """The part connectors use."""
        return DeviceProfile(self.custom1, self.custom2, self.custom3, self.connector, known=True)


def device_fields() -> list[tuple[str, FieldDoc]]:
    """Each field of :class:`DeviceRecord` with its documentation, in order."""
    return [(f.name, f.metadata["doc"]) for f in fields(DeviceRecord)]


#: The keys :meth:`DeviceStore.update_device` and :meth:`DeviceStore.import_devices` accept.
DEVICE_SETTINGS = tuple(name for name, doc in device_fields() if doc.writable)

DEVICE_COLUMNS = tuple(name for name, _ in device_fields())
DEVICE_SELECT = ", ".join(DEVICE_COLUMNS)
_TIME_FIELDS = tuple(name for name, doc in device_fields() if doc.kind == "time")
_BOOLEAN_FIELDS = tuple(name for name, doc in device_fields() if doc.kind == "boolean")


def seconds_or_none(value: Any) -> float | None:
    """A time from the database (an int or a float) as float seconds."""
    return None if value is None else float(value)


def device_from_row(row: Iterable[Any]) -> DeviceRecord:
    """A device from a row of :data:`DEVICE_SELECT`."""
    values = dict(zip(DEVICE_COLUMNS, row, strict=True))
    for name in _TIME_FIELDS:
        values[name] = seconds_or_none(values[name])
    for name in _BOOLEAN_FIELDS:
        values[name] = bool(values[name])
    return DeviceRecord(**values)


def device_json(device: DeviceRecord) -> dict[str, Any]:
    """A device as the API shows it: every field, times in ISO 8601."""
    body = {}
    for name, doc in device_fields():
        value = getattr(device, name)
        body[name] = iso8601(value) if doc.kind == "time" and value is not None else value
    return body


def field_schema(doc: FieldDoc) -> dict[str, Any]:
    """The OpenAPI 3.0 schema of one field's JSON value."""
    schema = {**FIELD_KINDS[doc.kind], "description": doc.description}
    return {**schema, "nullable": True} if doc.nullable else schema


def device_schema() -> dict[str, Any]:
    """The OpenAPI 3.0 schema of :func:`device_json`'s properties, by name."""
    return {name: field_schema(doc) for name, doc in device_fields()}


_TABLE_KINDS = {
    "serial": "integer",
    "string": "string",
    "integer": "integer",
    "count": "integer",
    "boolean": "boolean",
    "time": "ISO 8601",
}


def device_fields_table() -> str:
    """The reST table of device fields README.rst shows (a test keeps them equal)."""
    rows = [("Field", "JSON", "Settable", "Meaning")]
    for name, doc in device_fields():
        kind = _TABLE_KINDS[doc.kind] + (" or null" if doc.nullable else "")
        rows.append((f"``{name}``", kind, "yes" if doc.writable else "", doc.description))
    widths = [max(len(row[column]) for row in rows) for column in range(4)]
    rule = "  ".join("=" * width for width in widths)

    def line(row: tuple[str, ...]) -> str:
        return "  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()

    return "\n".join([rule, line(rows[0]), rule, *map(line, rows[1:]), rule]) + "\n"


# -- input checks --------------------------------------------------------------


def check_uint32(name: str, value: object) -> int:
    """``value`` if it is a uint32; a ValueError naming ``name`` otherwise."""
    # SQLite cannot bind an int past 2**63, PostgreSQL matches nothing: refuse on both.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, not {type(value).__name__}")
    if not 0 <= value <= MAX_SERIAL:
        raise ValueError(f"{name} {value} is outside 0..{MAX_SERIAL}")
    return value


def check_serial(serial: object) -> int:
    """``serial`` if it is a uint32; a ValueError saying why not otherwise."""
    return check_uint32("serial", serial)


def check_count(name: str, value: object) -> int:
    """``value`` if it is a non-negative integer; a ValueError naming ``name`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, not {value!r}")
    return value


def unstorable_text(key: str, value: str) -> str | None:
    """
    Why ``value`` cannot be stored as the text setting ``key``, or None.

    PostgreSQL text cannot hold NUL and no database can hold a lone surrogate
    (a JSON ``"\ud800"`` escape): both are refused on every database alike.
    """
    if "\x00" in value:
        return f"{key} must not contain NUL characters"
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return f"{key} must not contain lone surrogates"
    return None


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
        problem = unstorable_text(key, value)
        if problem:
            raise ValueError(problem)
        checked[key] = (value or None) if key == "connector" else value
    return checked


def _check_import_row(row: object) -> tuple[int, dict[str, str | None]]:
    if not isinstance(row, Mapping):
        raise ValueError(f"must be an object, not {type(row).__name__}")
    if "serial" not in row:
        raise ValueError("has no serial")
    serial = check_serial(row["serial"])
    settings = _check_settings({k: v for k, v in row.items() if k != "serial"})
    return serial, settings


# -- searching -------------------------------------------------------------------

#: The text columns a search matches by prefix (the serial matches exactly).
SEARCHED_COLUMNS = ("imei", "iccid", "custom1", "custom2", "custom3")
#: Above every character a stored text may hold (the highest code point is
#: U+10FFFF; lone surrogates are refused), so ``col >= q AND col < q + this``
#: is "starts with q" written as an index range on both databases.
_PREFIX_END = "\U0010ffff"
#: ORDER BY clauses by :attr:`DeviceQuery.sort`; the serial makes each total.
_ORDER = {
    "serial": "serial",
    # Never-seen devices last, on SQLite and PostgreSQL alike.
    "last_seen": "CASE WHEN last_seen IS NULL THEN 1 ELSE 0 END, last_seen DESC, serial",
}
DEVICE_SORTS = tuple(_ORDER)


@dataclass(frozen=True)
class DeviceQuery:
    """
    Which devices :meth:`DeviceStore.search_devices` returns, and one page of them.

    Every condition given must hold.  ``search`` matches a device whose serial
    is that number, or whose IMEI, ICCID or a custom field starts with it
    (case-sensitive: IMEIs and keys are exact).
    """

    limit: int
    offset: int = 0
    #: Only serials above this (the cheap way to page in serial order).
    after: int | None = None
    search: str | None = None
    #: Only devices connected now.
    connected: bool = False
    #: Only devices whose last upload was not delivered (``last_error`` set:
    #: a delivery clears it).
    failing: bool = False
    #: Only devices last heard from before this time (Unix seconds); never-seen
    #: devices are not "silent", they have not started.
    silent_before: float | None = None
    #: A key of :data:`DEVICE_SORTS`.
    sort: str = "serial"

    def where(self) -> tuple[str, list[Any]]:
        """The WHERE clause and its parameters; a ValueError for bad values."""
        if self.sort not in _ORDER:
            raise ValueError(f"sort must be one of {', '.join(DEVICE_SORTS)}, not {self.sort!r}")
        clauses, params = ["1 = 1"], []
        if self.after is not None:
            clauses.append("serial > ?")
            params.append(check_serial(self.after))
        if self.search:
            problem = unstorable_text("search", self.search)
            if problem:
                raise ValueError(problem)
            matches = [f"({column} >= ? AND {column} < ?)" for column in SEARCHED_COLUMNS]
            params += [self.search, self.search + _PREFIX_END] * len(SEARCHED_COLUMNS)
            if self.search.isascii() and self.search.isdigit() and int(self.search) <= MAX_SERIAL:
                matches.append("serial = ?")
                params.append(int(self.search))
            clauses.append("(" + " OR ".join(matches) + ")")
        if self.connected:
            clauses.append("connected")
        if self.failing:
            clauses.append("last_error IS NOT NULL")
        if self.silent_before is not None:
            clauses.append("last_seen < ?")
            params.append(float(self.silent_before))
        return " AND ".join(clauses), params


# -- the store -------------------------------------------------------------------

#: Marks disconnected the devices a node left marked connected.
_RELEASE_NODE = "UPDATE devices SET connected = ? WHERE node = ? AND connected = ?"


#: The profile of a device the registry does not know (one, shared: held
#: per connected device by the relay's profile cache).
UNKNOWN_PROFILE = DeviceProfile()

#: Serials per query of :meth:`DeviceStore.profiles_for` (SQLite allows
#: 32,766 parameters, PostgreSQL 65,535).
PROFILES_PER_QUERY = 500


#: A device's hello recorded: its identity, connected to a node (custom
#: fields and the connector override left as they are).
_RECORD_HELLOS = """
    INSERT INTO devices (serial, imei, iccid, product_id, hardware_rev, firmware,
                         first_seen, last_seen, connected, node)
    VALUES {values}
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
"""


def _values(rows: int, width: int) -> str:
    """A VALUES list of ``rows`` rows of ``width`` placeholders each."""
    row = "(" + ", ".join(["?"] * width) + ")"
    return ", ".join([row] * rows)


@functools.lru_cache(maxsize=None)
def _hellos_statement(rows: int) -> str:
    """
    ``rows`` devices' hellos recorded (``_hello_values`` each); the same hello
    twice records it once, as ``execute_rows``' padding needs.
    """
    return _RECORD_HELLOS.format(values=_values(rows, 10))


#: One device's hello recorded.
_RECORD_HELLO = _hellos_statement(1)
#: One device marked disconnected, unless another node holds it now.
_RECORD_DISCONNECTED = "UPDATE devices SET connected = ?, last_seen = ? WHERE serial = ? AND node = ?"


@functools.lru_cache(maxsize=None)
def _disconnections_statement(rows: int) -> str:
    """
    ``rows`` devices marked disconnected as ``_RECORD_DISCONNECTED`` marks
    one, each ``(connected, last seen, serial, node)``.  One row is that
    statement itself (all PostgreSQL runs, see ``execute_rows``; and the
    sqlite3 module gives the rowcount only of a statement beginning with
    UPDATE, as ``device_disconnected`` needs).
    """
    if rows == 1:
        return _RECORD_DISCONNECTED
    return f"""
        WITH batch (connected, last_seen, serial, node) AS (VALUES {_values(rows, 4)})
        UPDATE devices SET connected = batch.connected, last_seen = batch.last_seen
        FROM batch
        WHERE devices.serial = batch.serial AND devices.node = batch.node
        """


def _hello_values(hello: Hello, node: str, first_seen: float, last_seen: float) -> tuple:
    return (
        check_serial(hello.serial),
        hello.imei,
        hello.iccid,
        hello.product_id,
        hello.hardware_rev,
        hello.firmware,
        first_seen,
        last_seen,
        True,
        node,
    )


@functools.lru_cache(maxsize=None)
def _activity_statement(rows: int) -> str:
    """
    The statement recording ``rows`` devices' activity, each ``(serial,
    records, last upload, last seen, last error)`` (see ``record_activity``).
    """
    # The CASTs: PostgreSQL types a VALUES column of NULLs as text.
    return f"""
        WITH batch (serial, records, last_upload, last_seen, last_error) AS (VALUES {_values(rows, 5)})
        UPDATE devices SET
            records_committed = records_committed + CAST(batch.records AS BIGINT),
            last_upload = COALESCE(CAST(batch.last_upload AS DOUBLE PRECISION), devices.last_upload),
            last_seen = CASE
                WHEN devices.last_seen IS NULL
                    OR devices.last_seen < CAST(batch.last_seen AS DOUBLE PRECISION)
                THEN CAST(batch.last_seen AS DOUBLE PRECISION) ELSE devices.last_seen END,
            last_error = CAST(batch.last_error AS TEXT)
        FROM batch
        WHERE devices.serial = CAST(batch.serial AS BIGINT)
        """


class DeviceStore:
    """
    The ``devices`` table: what the relay reports (hellos, commits, errors)
    and what the API reads and sets.  Every public method returns a Deferred;
    times are given by the caller as ``now`` (Unix seconds).
    """

    def __init__(self, database: Database) -> None:
        self._database = database

    def txn_release_node(self, txn: adbapi.Transaction, node: str) -> int:
        """In a pool thread: :meth:`node_started`'s statement; how many devices it marked."""
        return self._database.rowcount(txn, _RELEASE_NODE, (False, node, True))

    # -- what the relay tells the registry --

    @returns_deferred
    async def profile_for(self, hello: Hello) -> DeviceProfile:
        """The device's custom fields and connector override (empty if unknown)."""
        row = await self._database.query_one(
            "SELECT custom1, custom2, custom3, connector FROM devices WHERE serial = ?",
            hello.serial,
        )
        return DeviceProfile(*row, known=True) if row is not None else UNKNOWN_PROFILE

    @returns_deferred
    async def profiles_for(self, serials: Iterable[int]) -> dict[int, DeviceProfile]:
        """
        Many devices' profiles at once, by serial (an unknown one's is empty):
        a relay's devices reconnecting together cost one query per
        :data:`PROFILES_PER_QUERY`, not one each.
        """
        wanted = list(dict.fromkeys(serials))
        profiles = dict.fromkeys(wanted, UNKNOWN_PROFILE)
        for start in range(0, len(wanted), PROFILES_PER_QUERY):
            chunk = wanted[start : start + PROFILES_PER_QUERY]
            rows = await self._database.query_all(
                "SELECT serial, custom1, custom2, custom3, connector FROM devices"
                f" WHERE serial IN ({', '.join('?' * len(chunk))})",
                *chunk,
            )
            for serial, *profile in rows:
                profiles[serial] = DeviceProfile(*profile, known=True)
        return profiles

    @returns_deferred
    async def device_connected(self, hello: Hello, node: str, now: float) -> DeviceRecord:
        """
        Record a device's hello: its identity, connected to ``node`` since ``now``.

        Custom fields and the connector override are left as they are.

        :return: the device as it now is.
        """
        row = await self._database.query_one(
            f"{_RECORD_HELLO} RETURNING {DEVICE_SELECT}", *_hello_values(hello, node, now, now)
        )
        return device_from_row(row)

    @returns_deferred
    async def device_disconnected(self, serial: int, node: str, now: float) -> bool:
        """
        Mark a device disconnected, unless another node holds it now.

        :return: whether the device was marked.
        """
        changed = await self._database.write(_RECORD_DISCONNECTED, False, now, check_serial(serial), node)
        return changed > 0

    @returns_deferred
    async def node_started(self, node: str, now: float) -> int:
        """
        Mark disconnected every device still marked connected to ``node``
        (connections a crashed run of this node left behind).  ``last_seen``
        is left alone: it stays when each device was last heard from.

        :return: how many devices were marked.
        """
        return await self._database.write(_RELEASE_NODE, False, node, True)

    @returns_deferred
    async def upload_committed(self, serial: int, record_count: int, now: float) -> bool:
        """
        Count ``record_count`` records delivered and clear the last error.

        :return: whether the device is known.
        """
        changed = await self._database.write(
            """
            UPDATE devices SET last_upload = ?, last_seen = ?,
                records_committed = records_committed + ?, last_error = NULL
            WHERE serial = ?
            """,
            now,
            now,
            check_count("record_count", record_count),
            check_serial(serial),
        )
        return changed > 0

    def record_presence(
        self, presence: list[tuple[int, Hello | None, str, float | None, float | None, float | None]]
    ) -> Deferred[None]:
        """
        Record many devices' connections and disconnections in one
        transaction (see :class:`~oemrelay.registry.hot_path.ActivityBatch`).

        :param presence: per device ``(serial, hello or None, node, first
            connection time or None, last connection time or None,
            disconnection time or None)``: with a hello the device is recorded
            as :meth:`device_connected` does (first seen at the first time,
            last seen at the last), then, with a disconnection time, as
            :meth:`device_disconnected` does.
        """
        return self._database.interaction(self._txn_record_presence, presence)

    def _txn_record_presence(self, txn: adbapi.Transaction, presence: list) -> None:
        # Each serial is in the batch once: every hello before every
        # disconnection keeps each device's own hello before its disconnection.
        hellos = [
            _hello_values(hello, node, first_connected, connected)
            for _, hello, node, first_connected, connected, _ in presence
            if hello is not None
        ]
        disconnections = [
            (False, disconnected, serial, node)
            for serial, _, node, _, _, disconnected in presence
            if disconnected is not None
        ]
        # One statement for many devices on SQLite (see execute_rows).
        self._database.execute_rows(txn, _hellos_statement, hellos, pad_with_last=True)
        self._database.execute_rows(txn, _disconnections_statement, disconnections)

    def record_activity(
        self, activity: list[tuple[int, int, float | None, float, str | None]]
    ) -> Deferred[None]:
        """
        Record many devices' commits and errors in one transaction (see
        :class:`~oemrelay.registry.hot_path.ActivityBatch`).

        :param activity: per device ``(serial, records committed, last
            upload or None, last seen, last error or None)``.  ``last_seen``
            never moves back; unknown devices are skipped.
        """
        return self._database.interaction(self._txn_record_activity, activity)

    def _txn_record_activity(self, txn: adbapi.Transaction, activity: list) -> None:
        # One statement naming many devices (on SQLite; see execute_rows): a
        # statement per device cost the relay about 5 % of its CPU at 2,000
        # devices, the pool thread taking the GIL from the reactor per device.
        self._database.execute_rows(txn, _activity_statement, activity)

    @returns_deferred
    async def delivery_failed(self, serial: int, reason: str, now: float) -> bool:
        """
        Keep why an upload was not delivered (shown until the next delivery).

        :return: whether the device is known.
        """
        changed = await self._database.write(
            "UPDATE devices SET last_error = ?, last_seen = ? WHERE serial = ?",
            str(reason).replace("\x00", "\\x00"),
            now,
            check_serial(serial),
        )
        return changed > 0

    # -- devices, for the API --

    @returns_deferred
    async def list_devices(self, limit: int, after: int | None = None) -> list[DeviceRecord]:
        """
        Up to ``limit`` devices in serial order, those with a serial above
        ``after`` (for the next page: the last serial of this one).
        """
        limit = check_count("limit", limit)
        if after is None:
            after = -1
        elif isinstance(after, bool) or not isinstance(after, int):
            raise ValueError(f"after must be an integer, not {type(after).__name__}")
        rows = await self._database.query_all(
            f"SELECT {DEVICE_SELECT} FROM devices WHERE serial > ? ORDER BY serial LIMIT ?",
            max(after, -1),
            limit,
        )
        return [device_from_row(row) for row in rows]

    @returns_deferred
    async def search_devices(self, query: DeviceQuery) -> list[DeviceRecord]:
        """
        The devices ``query`` selects, one page of them (see :class:`DeviceQuery`).

        :raises ValueError: for a query that is not a :class:`DeviceQuery`.
        """
        if not isinstance(query, DeviceQuery):
            raise ValueError(f"query must be a DeviceQuery, not {type(query).__name__}")
        where, params = query.where()
        rows = await self._database.query_all(
            f"SELECT {DEVICE_SELECT} FROM devices WHERE {where}"
            f" ORDER BY {_ORDER[query.sort]} LIMIT ? OFFSET ?",
            *params,
            check_count("limit", query.limit),
            check_count("offset", query.offset),
        )
        return [device_from_row(row) for row in rows]

    @returns_deferred
    async def fleet_counts(self) -> dict[str, Any]:
        """
        The fleet view's registry part: devices known, connected, failing,
        and the relay nodes holding connected devices (name: how many).
        """
        (known, connected, failing), nodes = await self._database.interaction(
            self._txn_fleet_counts
        )
        return {
            "devices": int(known),
            "connected": int(connected or 0),
            "failing": int(failing or 0),
            "nodes": {node: int(count) for node, count in nodes},
        }

    def _txn_fleet_counts(self, txn: adbapi.Transaction) -> tuple[Any, list[Any]]:
        database = self._database
        totals = database.fetch_one(
            txn,
            "SELECT COUNT(*),"
            " SUM(CASE WHEN connected THEN 1 ELSE 0 END),"
            " SUM(CASE WHEN last_error IS NOT NULL THEN 1 ELSE 0 END) FROM devices",
        )
        nodes = database.fetch_all(
            txn,
            "SELECT node, COUNT(*) FROM devices WHERE connected AND node IS NOT NULL"
            " GROUP BY node ORDER BY node",
        )
        return totals, nodes

    @returns_deferred
    async def get_device(self, serial: int) -> DeviceRecord | None:
        """One device, or None if it is unknown."""
        row = await self._database.query_one(
            f"SELECT {DEVICE_SELECT} FROM devices WHERE serial = ?", check_serial(serial)
        )
        return None if row is None else device_from_row(row)

    @returns_deferred
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
        serial = check_serial(serial)
        checked = _check_settings(changes)
        return await self._database.interaction(self._txn_update_and_notify, serial, checked)

    def _txn_update_and_notify(
        self, txn: adbapi.Transaction, serial: int, changes: Mapping[str, str | None]
    ) -> tuple[DeviceRecord, bool]:
        updated = self._txn_update_device(txn, serial, changes)
        self._database.txn_notify(txn, DEVICES_CHANNEL, changes_payload([serial]))
        return updated

    def _txn_update_device(
        self, txn: adbapi.Transaction, serial: int, changes: Mapping[str, str | None]
    ) -> tuple[DeviceRecord, bool]:
        database = self._database
        created = database.fetch_one(
            txn,
            "INSERT INTO devices (serial) VALUES (?)"
            " ON CONFLICT (serial) DO NOTHING RETURNING serial",
            (serial,),
        )
        if changes:
            # The column names come from DEVICE_SETTINGS only (_check_settings).
            assignments = ", ".join(f"{key} = ?" for key in changes)
            row = database.fetch_one(
                txn,
                f"UPDATE devices SET {assignments} WHERE serial = ? RETURNING {DEVICE_SELECT}",
                (*changes.values(), serial),
            )
        else:
            row = database.fetch_one(
                txn, f"SELECT {DEVICE_SELECT} FROM devices WHERE serial = ?", (serial,)
            )
        return device_from_row(row), created is not None

    @returns_deferred
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
        return await self._database.interaction(self._txn_import, checked)

    def _txn_import(
        self, txn: adbapi.Transaction, rows: list[tuple[int, dict[str, str | None]]]
    ) -> tuple[int, int]:
        dbapi = self._database.dbapi
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
        self._database.txn_notify(
            txn, DEVICES_CHANNEL, changes_payload(serial for serial, _ in rows)
        )
        return created, len(rows) - created
