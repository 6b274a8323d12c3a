"""
The device registry: what the relay knows of each device, and its command queue.

It is three parts on one database, split by job:

* :mod:`.database`: the connection pool, the SQLite/PostgreSQL dialects, the
  schema and its migrations (:class:`Database`);
* :mod:`.devices`: the device's fields, declared once (:class:`DeviceRecord`),
  and the ``devices`` table (:class:`DeviceStore`);
* :mod:`.command_queue`: the ``commands`` table (:class:`CommandQueue`).

:class:`Registry` composes them for the relay and the API.  Several relays may
share one PostgreSQL database: the registry itself keeps no cache (the relay's
profile cache in :mod:`.hot_path` is told of changes through
:meth:`Registry.on_devices_changed`: this relay's at once, other relays'
through PostgreSQL notifications, :mod:`.notify`), and a relay only marks
disconnected the devices it holds itself.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from .command_queue import COMMAND_STATES, Command, CommandQueue
from .database import (
    SCHEMA_VERSION,
    Database,
    RegistryError,
    check_postgresql_url,
    returns_deferred,
)
from .devices import DEVICE_SETTINGS, DeviceRecord, DeviceStore
from .notify import ChangeListener

__all__ = [
    "COMMAND_STATES",
    "DEVICE_SETTINGS",
    "SCHEMA_VERSION",
    "Command",
    "CommandQueue",
    "Database",
    "DeviceRecord",
    "DeviceStore",
    "Registry",
    "RegistryError",
    "check_postgresql_url",
]


class Registry:
    """
    The devices the relay has seen or been told about, and their commands.

    Use :meth:`from_url`, then :meth:`start` before anything else and
    :meth:`close` at the end.  It is the relay's
    :class:`~oemrelay.relay.DeviceLedger` and the API's registry: the methods
    of :class:`DeviceStore` and :class:`CommandQueue` are its own, bound, so
    callers need not know which part holds which table.
    """

    def __init__(self, database: Database) -> None:
        self.database = database
        self.devices = DeviceStore(database)
        self.commands = CommandQueue(database)
        devices, commands = self.devices, self.commands
        # The relay's DeviceLedger.
        self.profile_for = devices.profile_for
        self.profiles_for = devices.profiles_for
        self.device_connected = devices.device_connected
        self.device_disconnected = devices.device_disconnected
        self.node_started = devices.node_started
        self.upload_committed = devices.upload_committed
        self.delivery_failed = devices.delivery_failed
        self.due_commands = commands.due_commands
        self.command_sent = commands.command_sent
        self.command_result = commands.command_result
        # The API's.
        self.list_devices = devices.list_devices
        self.search_devices = devices.search_devices
        self.fleet_counts = devices.fleet_counts
        self.get_device = devices.get_device
        self.add_command = commands.add_command
        self.list_commands = commands.list_commands
        self.close = database.close
        self._change_listeners: list[Callable[[Iterable[int] | None], None]] = []

    def on_devices_changed(self, listener: Callable[[Iterable[int] | None], None]) -> None:
        """
        Call ``listener(serials)`` after devices' settings were changed here,
        or (through :meth:`change_listener`) by another relay; ``None``: any
        device may have changed.
        """
        self._change_listeners.append(listener)

    def devices_changed(self, serials: Iterable[int] | None) -> None:
        """Tell the change listeners that ``serials`` (None: any device) changed."""
        serials = None if serials is None else tuple(serials)
        for listener in self._change_listeners:
            listener(serials)

    def change_listener(self, reactor: Any) -> ChangeListener | None:
        """
        A service hearing other relays' changes to this registry and telling
        the change listeners; None on SQLite, which cannot notify.
        """
        if self.database.connect_args is None:
            return None
        args, kwargs = self.database.connect_args

        def connect() -> Any:
            import psycopg

            return psycopg.connect(*args, autocommit=True, **kwargs)

        return ChangeListener(connect, reactor, self.devices_changed)

    @returns_deferred
    async def update_device(self, serial: int, changes: Mapping[str, str | None]) -> Any:
        """:meth:`DeviceStore.update_device`, then the change listeners are told."""
        result = await self.devices.update_device(serial, changes)
        self.devices_changed([serial])
        return result

    @returns_deferred
    async def import_devices(self, rows: list[Mapping[str, Any]]) -> tuple[int, int]:
        """:meth:`DeviceStore.import_devices`, then the change listeners are told."""
        result = await self.devices.import_devices(rows)
        self.devices_changed(row["serial"] for row in rows)
        return result

    @classmethod
    def from_url(cls, url: str, reactor: Any = None) -> Registry:
        """A registry on :meth:`Database.from_url`; nothing is opened until :meth:`start`."""
        return cls(Database.from_url(url, reactor))

    @property
    def url_for_logs(self) -> str:
        """The database URL with any password removed."""
        return self.database.url_for_logs

    @returns_deferred
    async def start(self, node: str | None = None) -> int:
        """
        Create or migrate the schema (:meth:`Database.start`); with ``node``,
        release the connections a crashed run of that node left marked (see
        :meth:`DeviceStore.node_started`) before any other call runs.

        :return: how many devices were released.
        :raises RegistryError: if the database's schema is newer than this code.
        """
        if node is None:
            await self.database.start()
            return 0
        return await self.database.start(lambda txn: self.devices.txn_release_node(txn, node))
