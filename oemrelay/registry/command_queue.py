"""
The registry's command queue: commands the API queues for a device, sent in
its next async session, and what the device answered.

A command's ``expires`` is the last moment it may be sent: one whose expiry is
exactly ``now`` is still due; only once ``now`` is past it is it marked expired.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

from twisted.enterprise import adbapi

from .database import Database, returns_deferred
from .devices import check_count, check_serial, check_uint32, seconds_or_none

if TYPE_CHECKING:
    from ..commands import CommandRequest

#: Command states, in the order a command normally goes through them.
COMMAND_STATES = ("queued", "sent", "delivered", "failed", "expired")


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


_COMMAND_COLUMNS = tuple(f.name for f in fields(Command))
_COMMAND_SELECT = ", ".join(_COMMAND_COLUMNS)


def _command_from_row(row: Iterable[Any]) -> Command:
    values = dict(zip(_COMMAND_COLUMNS, row, strict=True))
    values["params"] = json.loads(values["params"])
    values["data"] = bytes(values["data"])
    for name in ("created", "send_after", "expires", "sent", "completed"):
        values[name] = seconds_or_none(values[name])
    return Command(**values)


def _check_command_id(command_id: object) -> int:
    return check_uint32("command_id", command_id)


class CommandQueue:
    """
    The ``commands`` table.  Every public method returns a Deferred; times
    are given by the caller as ``now`` (Unix seconds).
    """

    def __init__(self, database: Database) -> None:
        self._database = database

    @returns_deferred
    async def add_command(
        self, serial: int, request: CommandRequest, now: float
    ) -> Command | None:
        """
        Queue a command for a device.

        :return: the queued command, or None if the device is unknown.
        """
        return await self._database.interaction(
            self._txn_add_command, check_serial(serial), request, now
        )

    def _txn_add_command(
        self, txn: adbapi.Transaction, serial: int, request: CommandRequest, now: float
    ) -> Command | None:
        database = self._database
        known = database.fetch_one(txn, "SELECT serial FROM devices WHERE serial = ?", (serial,))
        if known is None:
            return None
        row = database.fetch_one(
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
        # "expires < now", not "<=": a command expiring exactly now is still due.
        self._database.execute(
            txn,
            """
            UPDATE commands SET status = ?, completed = ?
            WHERE serial = ? AND status = ? AND expires IS NOT NULL AND expires < ?
            """,
            ("expired", now, serial, "queued", now),
        )

    @returns_deferred
    async def list_commands(self, serial: int, now: float) -> list[Command]:
        """
        Every command of a device in id order, queued ones past their expiry
        first marked expired (one expiring exactly ``now`` stays queued).
        """
        return await self._database.interaction(
            self._txn_list_commands, check_serial(serial), now
        )

    def _txn_list_commands(
        self, txn: adbapi.Transaction, serial: int, now: float
    ) -> list[Command]:
        self._txn_expire(txn, serial, now)
        rows = self._database.fetch_all(
            txn, f"SELECT {_COMMAND_SELECT} FROM commands WHERE serial = ? ORDER BY id", (serial,)
        )
        return [_command_from_row(row) for row in rows]

    @returns_deferred
    async def due_commands(self, serial: int, now: float) -> list[Command]:
        """
        The queued commands to send a device now, in id order: not held back
        by ``send_after``, not expired (those past expiry are marked expired;
        one expiring exactly ``now`` is still due, as is one held back until
        exactly ``now``).
        """
        return await self._database.interaction(
            self._txn_due_commands, check_serial(serial), now
        )

    def _txn_due_commands(self, txn: adbapi.Transaction, serial: int, now: float) -> list[Command]:
        self._txn_expire(txn, serial, now)
        rows = self._database.fetch_all(
            txn,
            f"""
            SELECT {_COMMAND_SELECT} FROM commands
            WHERE serial = ? AND status = ? AND (send_after IS NULL OR send_after <= ?)
            ORDER BY id
            """,
            (serial, "queued", now),
        )
        return [_command_from_row(row) for row in rows]

    @returns_deferred
    async def command_sent(self, command_id: int, now: float) -> Command | None:
        """
        Mark a queued command sent.  Await this before sending, so the
        device's answer cannot overtake it.

        :return: the command, or None if there is no queued command by that id.
        """
        row = await self._database.query_one(
            f"UPDATE commands SET status = ?, sent = ? WHERE id = ? AND status = ?"
            f" RETURNING {_COMMAND_SELECT}",
            "sent",
            now,
            _check_command_id(command_id),
            "queued",
        )
        return None if row is None else _command_from_row(row)

    @returns_deferred
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
        row = await self._database.query_one(
            f"""
            UPDATE commands SET status = ?, completed = ?, device_status = ?
            WHERE id = ? AND status IN (?, ?)
            RETURNING {_COMMAND_SELECT}
            """,
            status,
            completed,
            check_count("device_status", device_status),
            _check_command_id(command_id),
            "queued",
            "sent",
        )
        return None if row is None else _command_from_row(row)
