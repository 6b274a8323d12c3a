"""
Tests for :mod:`oemrelay.registry` on a real SQLite file and a real PostgreSQL.

The scenarios are written once in :class:`RegistryScenariosMixin` and run on
both databases.  They use the real reactor, because adbapi runs every query
in a thread.  PostgreSQL is found at ``OEMRELAY_TEST_POSTGRES`` (default
``postgresql://postgres@127.0.0.1:5432/test``); each test gets a schema of
its own, dropped afterwards.
"""

from __future__ import annotations

import os
from dataclasses import fields as dataclass_fields

from twisted.internet import reactor
from twisted.internet.defer import DeferredList
from twisted.internet.task import deferLater
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from oemrelay.registry import devices as devices_module
from oemrelay.codec import Hello
from oemrelay.commands import CommandRequest
from oemrelay.registry import (
    DEVICE_SETTINGS,
    SCHEMA_VERSION,
    Command,
    DeviceRecord,
    Registry,
    RegistryError,
)
from oemrelay.relay import DeviceProfile

from oemrelay.registry.database import _POSTGRESQL, _SQLITE, ROWS_PER_STATEMENT, Database
from oemrelay.registry.devices import device_fields_table, device_json, device_schema

from .postgres import fresh_schema_url

API_DOC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "api.rst")

NOW = 1_700_000_000  # an int on purpose: times must come back as floats
#: A step in time small next to a second, exact in a double near NOW.
EPSILON = 1 / 1024



def hello(serial: int = 123456, **changes) -> Hello:
    """A device's hello, with ``changes`` to its fields."""
    fields = dict(
        serial=serial,
        imei="352625090000001",
        iccid="89610185002000000001",
        product_id=58,
        hardware_rev=3,
        firmware_major=1,
        firmware_minor=24,
    )
    fields.update(changes)
    return Hello(**fields)


def request(**changes) -> CommandRequest:
    """A command request, with ``changes`` to its fields."""
    fields = dict(
        type="set_output",
        params={"output": 1, "state": True},
        message_type=0x01,
        data=b"\x01\x00\xff",
    )
    fields.update(changes)
    return CommandRequest(**fields)


class RegistryScenariosMixin:
    """
    Every behaviour of the registry.  A class using it provides
    ``make_database()``, returning the URL of an empty database of its own.
    """

    async def make_database(self) -> str:
        raise NotImplementedError

    async def setUp(self) -> None:
        self.url = await self.make_database()
        self.registry = await self.open_registry()

    async def open_registry(self) -> Registry:
        """Another started registry on this test's database, closed at the end."""
        registry = Registry.from_url(self.url, reactor=reactor)
        self.addCleanup(registry.close)
        await registry.start()
        return registry

    # -- schema --

    async def device_table_columns(self) -> list[str]:
        raise NotImplementedError

    async def test_devices_table_is_the_dataclass(self) -> None:
        """The migrated devices table has exactly DeviceRecord's fields, in order."""
        self.assertEqual(
            await self.device_table_columns(), [f.name for f in dataclass_fields(DeviceRecord)]
        )

    async def test_start_is_idempotent(self) -> None:
        """start() again on a started registry changes nothing and keeps the data."""
        await self.registry.update_device(1, {"custom1": "kept"})
        await self.registry.start()
        device = await self.registry.get_device(1)
        self.assertEqual(device.custom1, "kept")

    async def test_reopen(self) -> None:
        """A registry opened later on the same database finds the schema and data."""
        await self.registry.update_device(1, {"custom1": "kept"})
        await self.registry.close()
        reopened = await self.open_registry()
        device = await reopened.get_device(1)
        self.assertEqual(device.custom1, "kept")

    async def test_schema_version_recorded(self) -> None:
        """The first start creates the schema and records its version."""
        rows = await self.registry.database.pool.runQuery("SELECT MAX(version) FROM schema_version")
        self.assertEqual(rows[0][0], SCHEMA_VERSION)

    async def test_newer_schema_refused(self) -> None:
        """start() fails with RegistryError on a schema newer than the code."""
        await self.registry.database.pool.runOperation(
            self.registry.database.sql("INSERT INTO schema_version (version, applied) VALUES (?, ?)"),
            (SCHEMA_VERSION + 1, NOW),
        )
        later = Registry.from_url(self.url, reactor=reactor)
        self.addCleanup(later.close)
        with self.assertRaises(RegistryError) as caught:
            await later.start()
        self.assertIn(f"schema version {SCHEMA_VERSION + 1}", str(caught.exception))
        self.assertNotIn("\n", str(caught.exception))

    # -- profiles --

    async def test_profile_of_unknown_device(self) -> None:
        """An unknown device has the empty profile."""
        self.assertEqual(await self.registry.profile_for(hello()), DeviceProfile())

    async def test_profile_from_settings(self) -> None:
        """profile_for returns the custom fields and connector override set."""
        await self.registry.update_device(
            123456, {"custom1": "a", "custom2": "b", "custom3": "c", "connector": "fleet"}
        )
        profile = await self.registry.profile_for(hello())
        self.assertEqual(profile, DeviceProfile("a", "b", "c", "fleet", known=True))

    async def test_two_registries_share_the_database(self) -> None:
        """An update through one registry is seen by another on the same database."""
        other = await self.open_registry()
        await other.profile_for(hello())
        await self.registry.update_device(123456, {"custom2": "shared", "connector": "b"})
        profile = await other.profile_for(hello())
        self.assertEqual(profile, DeviceProfile(custom2="shared", connector="b", known=True))

    # -- connections --

    async def test_device_connected_new(self) -> None:
        """A first hello creates the device, connected to the node, first seen now."""
        device = await self.registry.device_connected(hello(), "node-a", NOW)
        self.assertEqual(await self.registry.get_device(123456), device)
        self.assertEqual(
            device,
            DeviceRecord(
                serial=123456,
                imei="352625090000001",
                iccid="89610185002000000001",
                product_id=58,
                hardware_rev=3,
                firmware="58.3.1.24",
                first_seen=float(NOW),
                last_seen=float(NOW),
                connected=True,
                node="node-a",
            ),
        )
        self.assertIs(device.connected, True)
        self.assertIsInstance(device.first_seen, float)

    async def test_device_reconnected(self) -> None:
        """A later hello updates identity, node and last_seen but keeps first_seen."""
        await self.registry.device_connected(hello(), "node-a", NOW)
        await self.registry.device_disconnected(123456, "node-a", NOW + 5)
        device = await self.registry.device_connected(
            hello(firmware_minor=25, iccid="89610185002000000002"), "node-b", NOW + 60
        )
        self.assertEqual(
            (device.first_seen, device.last_seen, device.node, device.connected),
            (NOW, NOW + 60, "node-b", True),
        )
        self.assertEqual((device.firmware, device.iccid), ("58.3.1.25", "89610185002000000002"))

    async def test_custom_fields_survive_connection(self) -> None:
        """device_connected leaves custom fields and the connector override alone."""
        await self.registry.update_device(
            123456, {"custom1": "a", "custom2": "b", "custom3": "c", "connector": "fleet"}
        )
        await self.registry.device_connected(hello(), "node-a", NOW)
        device = await self.registry.get_device(123456)
        self.assertEqual(device.profile(), DeviceProfile("a", "b", "c", "fleet", known=True))
        self.assertEqual(device.first_seen, NOW)

    async def test_device_disconnected(self) -> None:
        """device_disconnected from the device's node marks it disconnected."""
        await self.registry.device_connected(hello(), "node-a", NOW)
        self.assertTrue(await self.registry.device_disconnected(123456, "node-a", NOW + 9))
        device = await self.registry.get_device(123456)
        self.assertEqual((device.connected, device.last_seen), (False, NOW + 9))
        self.assertIs(device.connected, False)

    async def test_device_disconnected_other_node(self) -> None:
        """device_disconnected from another node leaves the device connected."""
        await self.registry.device_connected(hello(), "node-b", NOW + 1)
        self.assertFalse(await self.registry.device_disconnected(123456, "node-a", NOW + 2))
        device = await self.registry.get_device(123456)
        self.assertEqual(
            (device.connected, device.node, device.last_seen), (True, "node-b", NOW + 1)
        )

    async def test_profiles_for_many(self) -> None:
        """profiles_for answers every serial asked, known or not, across query chunks."""
        self.patch(devices_module, "PROFILES_PER_QUERY", 2)
        for serial in (1, 3, 4):
            await self.registry.update_device(serial, {"custom1": f"c{serial}"})
        profiles = await self.registry.profiles_for([1, 2, 3, 4, 5, 1])
        self.assertEqual(sorted(profiles), [1, 2, 3, 4, 5])
        self.assertEqual(
            {serial: (p.custom1, p.known) for serial, p in profiles.items()},
            {1: ("c1", True), 2: ("", False), 3: ("c3", True), 4: ("c4", True), 5: ("", False)},
        )
        self.assertEqual(profiles[4], await self.registry.profile_for(hello(4)))
        self.assertEqual(profiles[2], await self.registry.profile_for(hello(2)))

    async def test_profiles_for_none(self) -> None:
        """Asked for no serial, profiles_for answers nothing, without a query."""
        self.assertEqual(await self.registry.profiles_for([]), {})

    async def test_record_presence_as_the_single_writes(self) -> None:
        """
        record_presence writes what device_connected and device_disconnected
        would, in one transaction: a new device connected and gone, one
        reconnected keeping first_seen, one disconnected only if still held
        by this node.
        """
        await self.registry.device_connected(hello(2), "node-a", NOW - 100)
        await self.registry.device_connected(hello(3), "node-b", NOW - 100)
        await self.registry.devices.record_presence([
            (1, hello(1), "node-a", NOW, NOW + 1, NOW + 2),
            (2, hello(2, firmware_minor=25), "node-a", NOW + 3, NOW + 4, None),
            (3, None, "node-a", None, None, NOW + 5),
        ])
        one, two, three = [await self.registry.get_device(serial) for serial in (1, 2, 3)]
        self.assertEqual(
            (one.first_seen, one.last_seen, one.connected, one.node), (NOW, NOW + 2, False, "node-a")
        )
        self.assertEqual(
            (two.first_seen, two.last_seen, two.connected, two.firmware),
            (NOW - 100, NOW + 4, True, "58.3.1.25"),
        )
        self.assertEqual((three.connected, three.node, three.last_seen), (True, "node-b", NOW - 100))

    async def test_record_presence_then_activity_counts_a_new_device(self) -> None:
        """A device first recorded by record_presence has its commits counted after it."""
        await self.registry.devices.record_presence([(9, hello(9), "node-a", NOW, NOW, None)])
        await self.registry.devices.record_activity([(9, 12, NOW + 1, NOW + 1, None)])
        self.assertEqual((await self.registry.get_device(9)).records_committed, 12)

    async def test_record_presence_of_more_devices_than_one_statement_takes(self) -> None:
        """
        record_presence records every hello and disconnection of a batch
        larger than one statement carries, each once (a padded statement
        repeats a hello).
        """
        count = ROWS_PER_STATEMENT + 300
        await self.registry.devices.record_presence(
            [(serial, hello(serial), "node-a", NOW, NOW + 1, NOW + 2 if serial % 3 == 0 else None)
             for serial in range(1, count + 1)]
        )
        devices = await self.registry.list_devices(count + 1)
        self.assertEqual(
            [(d.serial, d.first_seen, d.last_seen, d.connected, d.node) for d in devices],
            [(serial, NOW, NOW + 2 if serial % 3 == 0 else NOW + 1, serial % 3 != 0, "node-a")
             for serial in range(1, count + 1)],
        )

    async def test_record_activity_of_more_devices_than_one_statement_takes(self) -> None:
        """
        record_activity records every device of a batch larger than one
        statement carries (ROWS_PER_STATEMENT on SQLite), with its own figures.
        """
        count = ROWS_PER_STATEMENT + 300
        await self.registry.devices.record_presence(
            [(serial, hello(serial), "node-a", NOW, NOW, None) for serial in range(1, count + 1)]
        )
        await self.registry.devices.record_activity(
            [(serial, serial, NOW + serial, NOW + serial, None if serial % 7 else f"error {serial}")
             for serial in range(1, count + 1)]
        )
        devices = await self.registry.list_devices(count + 1)
        self.assertEqual(
            [(d.serial, d.records_committed, d.last_upload, d.last_seen, d.last_error)
             for d in devices],
            [(serial, serial, NOW + serial, NOW + serial, None if serial % 7 else f"error {serial}")
             for serial in range(1, count + 1)],
        )

    async def test_node_started(self) -> None:
        """node_started disconnects this node's devices and no other node's."""
        await self.registry.device_connected(hello(1), "node-a", NOW)
        await self.registry.device_connected(hello(2), "node-a", NOW)
        await self.registry.device_connected(hello(3), "node-b", NOW)
        await self.registry.device_connected(hello(4), "node-a", NOW)
        await self.registry.device_disconnected(4, "node-a", NOW)
        self.assertEqual(await self.registry.node_started("node-a", NOW + 10), 2)
        devices = await self.registry.list_devices(10)
        self.assertEqual([d.connected for d in devices], [False, False, True, False])

    # -- uploads --

    async def test_upload_committed(self) -> None:
        """upload_committed adds up records, sets the times and clears the error."""
        await self.registry.device_connected(hello(), "node-a", NOW)
        await self.registry.delivery_failed(123456, "HTTP 503", NOW + 1)
        self.assertTrue(await self.registry.upload_committed(123456, 10, NOW + 2))
        await self.registry.upload_committed(123456, 5, NOW + 3)
        device = await self.registry.get_device(123456)
        self.assertEqual(
            (device.records_committed, device.last_upload, device.last_seen, device.last_error),
            (15, NOW + 3, NOW + 3, None),
        )

    async def test_delivery_failed(self) -> None:
        """delivery_failed keeps the reason and the time."""
        await self.registry.device_connected(hello(), "node-a", NOW)
        self.assertTrue(await self.registry.delivery_failed(123456, "connection refused", NOW + 4))
        device = await self.registry.get_device(123456)
        self.assertEqual((device.last_error, device.last_seen), ("connection refused", NOW + 4))

    async def test_upload_for_unknown_device(self) -> None:
        """upload_committed and delivery_failed on an unknown device create nothing."""
        self.assertFalse(await self.registry.upload_committed(9, 1, NOW))
        self.assertFalse(await self.registry.delivery_failed(9, "down", NOW))
        self.assertIsNone(await self.registry.get_device(9))

    async def test_record_activity(self) -> None:
        """record_activity adds counts, keeps the newest last_seen and sets the error, per device."""
        await self.registry.device_connected(hello(), "node-a", NOW)
        await self.registry.device_connected(hello(serial=7), "node-a", NOW)
        await self.registry.device_disconnected(7, "node-a", NOW + 9)
        await self.registry.upload_committed(123456, 4, NOW)
        await self.registry.devices.record_activity(
            [
                (123456, 10, NOW + 2, NOW + 3, "HTTP 503"),
                (7, 5, NOW + 2, NOW + 2, None),  # last_seen NOW + 9 stays
                (9, 1, NOW, NOW, None),  # unknown: skipped, not created
            ]
        )
        device = await self.registry.get_device(123456)
        self.assertEqual(
            (device.records_committed, device.last_upload, device.last_seen, device.last_error),
            (14, NOW + 2, NOW + 3, "HTTP 503"),
        )
        other = await self.registry.get_device(7)
        self.assertEqual((other.records_committed, other.last_seen), (5, NOW + 9))
        self.assertIsNone(await self.registry.get_device(9))

    async def test_failure_only_keeps_last_upload(self) -> None:
        """Activity with no commit leaves last_upload as it was."""
        await self.registry.device_connected(hello(), "node-a", NOW)
        await self.registry.upload_committed(123456, 1, NOW + 1)
        await self.registry.devices.record_activity([(123456, 0, None, NOW + 5, "down")])
        device = await self.registry.get_device(123456)
        self.assertEqual((device.last_upload, device.last_error), (NOW + 1, "down"))

    async def test_changes_told(self) -> None:
        """update_device and import_devices tell the change listeners which serials changed."""
        told: list = []
        self.registry.on_devices_changed(told.append)
        await self.registry.update_device(5, {"custom1": "one"})
        await self.registry.import_devices([{"serial": 6}, {"serial": 8, "custom2": "x"}])
        with self.assertRaises(ValueError):
            await self.registry.update_device(5, {"nonsense": "x"})
        self.assertEqual(told, [(5,), (6, 8)])

    # -- listing --

    async def test_list_devices_pages(self) -> None:
        """list_devices pages through devices in serial order with limit and after."""
        for serial in (0xFFFFFFFF, 7, 0, 300, 12):
            await self.registry.update_device(serial, {})
        first = await self.registry.list_devices(2)
        self.assertEqual([d.serial for d in first], [0, 7])
        second = await self.registry.list_devices(2, after=first[-1].serial)
        self.assertEqual([d.serial for d in second], [12, 300])
        third = await self.registry.list_devices(2, after=second[-1].serial)
        self.assertEqual([d.serial for d in third], [0xFFFFFFFF])
        self.assertEqual(await self.registry.list_devices(2, after=0xFFFFFFFF), [])
        self.assertEqual(await self.registry.list_devices(0), [])

    async def test_list_devices_bad_limit(self) -> None:
        """A negative limit is a ValueError."""
        with self.assertRaises(ValueError):
            await self.registry.list_devices(-1)

    async def test_get_unknown_device(self) -> None:
        """get_device of an unknown serial is None."""
        self.assertIsNone(await self.registry.get_device(42))

    # -- settings --

    async def test_update_device_creates_then_merges(self) -> None:
        """update_device creates an unknown device, then changes only the keys given."""
        device, created = await self.registry.update_device(5, {"custom1": "one"})
        self.assertEqual(
            (device.serial, device.custom1, device.first_seen, created), (5, "one", None, True)
        )
        self.assertIs(device.connected, False)
        device, created = await self.registry.update_device(5, {"custom2": "two"})
        self.assertEqual((device.custom1, device.custom2, created), ("one", "two", False))
        self.assertEqual(await self.registry.get_device(5), device)

    async def test_first_seen_on_preloaded_device(self) -> None:
        """A device created by update_device gets first_seen at its first hello."""
        await self.registry.update_device(123456, {"custom1": "x"})
        device = await self.registry.device_connected(hello(), "node-a", NOW)
        self.assertEqual((device.first_seen, device.custom1), (NOW, "x"))

    async def test_update_device_clears_connector(self) -> None:
        """A connector of "" or None removes the override."""
        await self.registry.update_device(5, {"connector": "fleet"})
        device, _ = await self.registry.update_device(5, {"connector": ""})
        self.assertIsNone(device.connector)
        await self.registry.update_device(5, {"connector": "fleet"})
        device, _ = await self.registry.update_device(5, {"connector": None})
        self.assertIsNone(device.connector)

    async def test_update_device_unknown_key(self) -> None:
        """An unknown key is a ValueError naming it, and creates nothing."""
        with self.assertRaises(ValueError) as caught:
            await self.registry.update_device(5, {"custom1": "a", "colour": "red"})
        self.assertIn("'colour'", str(caught.exception))
        self.assertIsNone(await self.registry.get_device(5))

    async def test_update_device_bad_values(self) -> None:
        """Values that are not strings, NULs and bad serials are ValueErrors."""
        for serial, changes in [
            (5, {"custom1": 3}),
            (5, {"connector": 1}),
            (5, {"custom2": "a\x00b"}),
            (5, ["custom1"]),
            (-1, {}),
            (0x100000000, {}),
            ("5", {}),
            (True, {}),
        ]:
            with self.assertRaises(ValueError):
                await self.registry.update_device(serial, changes)
        self.assertEqual(await self.registry.list_devices(10), [])

    # -- import --

    async def test_import_devices(self) -> None:
        """import_devices creates new devices, updates known ones and counts both."""
        await self.registry.device_connected(hello(1), "node-a", NOW)
        created, updated = await self.registry.import_devices(
            [
                {"serial": 1, "custom1": "one", "connector": "fleet"},
                {"serial": 2, "custom2": "two"},
                {"serial": 3},
            ]
        )
        self.assertEqual((created, updated), (2, 1))
        devices = await self.registry.list_devices(10)
        self.assertEqual(
            [(d.serial, d.custom1, d.custom2, d.connector, d.connected) for d in devices],
            [(1, "one", "", "fleet", True), (2, "", "two", None, False), (3, "", "", None, False)],
        )

    async def test_import_unknown_key_imports_nothing(self) -> None:
        """A row with an unknown key fails the import, naming the row, before any write."""
        with self.assertRaises(ValueError) as caught:
            await self.registry.import_devices(
                [{"serial": 1, "custom1": "a"}, {"serial": 2, "connectr": "fleet"}]
            )
        self.assertIn("row 1", str(caught.exception))
        self.assertEqual(await self.registry.list_devices(10), [])

    async def test_import_bad_serial_imports_nothing(self) -> None:
        """A row whose serial is not an integer, or missing, fails the whole import."""
        for bad in ({"serial": "2"}, {"custom1": "no serial"}, {"serial": 2.0}, "2"):
            with self.assertRaises(ValueError):
                await self.registry.import_devices([{"serial": 1}, bad])
        self.assertEqual(await self.registry.list_devices(10), [])

    async def test_import_database_refusal_undoes_all(self) -> None:
        """A row the database refuses undoes the rows before it in the same import."""
        await self.registry.update_device(1, {"custom1": "old"})
        # Let an out-of-range serial past the checks, so the database refuses it.
        self.patch(devices_module, "check_serial", lambda serial: serial)
        with self.assertRaises(ValueError) as caught:
            await self.registry.import_devices(
                [
                    {"serial": 1, "custom1": "new"},
                    {"serial": 2, "custom1": "two"},
                    {"serial": 0x100000000, "custom1": "too big"},
                ]
            )
        self.assertIn("row 2", str(caught.exception))
        devices = await self.registry.list_devices(10)
        self.assertEqual([(d.serial, d.custom1) for d in devices], [(1, "old")])

    async def test_concurrent_imports_in_opposite_orders(self) -> None:
        """Imports running at once over the same devices in opposite orders all succeed."""
        rows = [{"serial": serial, "custom1": "x"} for serial in range(1, 301)]
        await self.registry.import_devices(rows)
        for _ in range(3):
            results = await DeferredList(
                [self.registry.import_devices(order) for order in (rows, rows[::-1]) * 2],
                consumeErrors=True,
            )
            self.assertEqual([ok for ok, _ in results], [True] * 4, results)

    # -- commands --

    async def test_add_command(self) -> None:
        """add_command queues a command with a uint32 id, JSON params and bytes data."""
        await self.registry.device_connected(hello(), "node-a", NOW)
        command = await self.registry.add_command(
            123456, request(send_after=NOW + 10, expires=NOW + 100), NOW
        )
        self.assertIsInstance(command.id, int)
        self.assertTrue(0 < command.id <= 0xFFFFFFFF)
        self.assertEqual(
            command,
            Command(
                id=command.id,
                serial=123456,
                type="set_output",
                params={"output": 1, "state": True},
                message_type=0x01,
                data=b"\x01\x00\xff",
                status="queued",
                created=NOW,
                send_after=NOW + 10,
                expires=NOW + 100,
            ),
        )
        self.assertIsInstance(command.data, bytes)
        self.assertEqual(await self.registry.list_commands(123456, NOW), [command])

    async def test_add_command_unknown_device(self) -> None:
        """add_command for an unknown device is None and queues nothing."""
        self.assertIsNone(await self.registry.add_command(9, request(), NOW))
        self.assertEqual(await self.registry.list_commands(9, NOW), [])

    async def test_command_ids_increase(self) -> None:
        """Command ids grow across devices, and list_commands keeps id order."""
        await self.registry.update_device(1, {})
        await self.registry.update_device(2, {})
        a = await self.registry.add_command(1, request(), NOW)
        b = await self.registry.add_command(2, request(), NOW)
        c = await self.registry.add_command(1, request(type="reboot", params={}), NOW)
        self.assertLess(a.id, b.id)
        self.assertLess(b.id, c.id)
        self.assertEqual([x.id for x in await self.registry.list_commands(1, NOW)], [a.id, c.id])

    async def test_list_commands_expires(self) -> None:
        """list_commands marks queued commands past their expiry as expired."""
        await self.registry.update_device(1, {})
        old = await self.registry.add_command(1, request(expires=NOW + 10), NOW)
        fresh = await self.registry.add_command(1, request(expires=NOW + 100), NOW)
        forever = await self.registry.add_command(1, request(), NOW)
        commands = await self.registry.list_commands(1, NOW + 50)
        self.assertEqual(
            [(c.id, c.status, c.completed) for c in commands],
            [
                (old.id, "expired", NOW + 50),
                (fresh.id, "queued", None),
                (forever.id, "queued", None),
            ],
        )

    async def test_due_commands(self) -> None:
        """due_commands leaves out held-back, expired and already sent commands."""
        await self.registry.update_device(1, {})
        await self.registry.update_device(2, {})
        now_cmd = await self.registry.add_command(1, request(), NOW)
        later = await self.registry.add_command(1, request(send_after=NOW + 60), NOW)
        expired = await self.registry.add_command(1, request(expires=NOW + 5), NOW)
        held_until_now = await self.registry.add_command(1, request(send_after=NOW + 30), NOW)
        sent = await self.registry.add_command(1, request(), NOW)
        await self.registry.add_command(2, request(), NOW)
        await self.registry.command_sent(sent.id, NOW + 1)
        due = await self.registry.due_commands(1, NOW + 30)
        self.assertEqual([c.id for c in due], [now_cmd.id, held_until_now.id])
        statuses = {c.id: c.status for c in await self.registry.list_commands(1, NOW + 30)}
        self.assertEqual(
            [statuses[c.id] for c in (now_cmd, later, expired, held_until_now, sent)],
            ["queued", "queued", "expired", "queued", "sent"],
        )

    async def test_due_at_expiry(self) -> None:
        """A command is due until and at its expiry instant, and expired just after."""
        await self.registry.update_device(1, {})
        command = await self.registry.add_command(1, request(expires=NOW + 10), NOW)
        for now in (NOW + 10 - EPSILON, NOW + 10):
            self.assertEqual([c.id for c in await self.registry.due_commands(1, now)], [command.id])
        self.assertEqual(await self.registry.due_commands(1, NOW + 10 + EPSILON), [])
        (expired,) = await self.registry.list_commands(1, NOW + 20)
        self.assertEqual((expired.status, expired.completed), ("expired", NOW + 10 + EPSILON))

    async def test_listed_at_expiry(self) -> None:
        """Listing at a command's expiry instant leaves it queued; just after marks it expired."""
        await self.registry.update_device(1, {})
        command = await self.registry.add_command(1, request(expires=NOW + 10), NOW)
        for now in (NOW + 10 - EPSILON, NOW + 10):
            (listed,) = await self.registry.list_commands(1, now)
            self.assertEqual(
                (listed.id, listed.status, listed.completed), (command.id, "queued", None)
            )
        (listed,) = await self.registry.list_commands(1, NOW + 10 + EPSILON)
        self.assertEqual((listed.status, listed.completed), ("expired", NOW + 10 + EPSILON))

    async def test_command_sent(self) -> None:
        """command_sent marks a queued command sent, and only a queued one."""
        await self.registry.update_device(1, {})
        command = await self.registry.add_command(1, request(), NOW)
        sent = await self.registry.command_sent(command.id, NOW + 1)
        self.assertEqual((sent.status, sent.sent), ("sent", NOW + 1))
        self.assertIsNone(await self.registry.command_sent(command.id, NOW + 2))
        self.assertIsNone(await self.registry.command_sent(command.id + 1000, NOW + 2))

    async def test_command_delivered(self) -> None:
        """Device status 1 makes a sent command delivered, with its time and status."""
        await self.registry.update_device(1, {})
        command = await self.registry.add_command(1, request(), NOW)
        await self.registry.command_sent(command.id, NOW + 1)
        done = await self.registry.command_result(command.id, 1, NOW + 2)
        self.assertEqual(
            (done.status, done.completed, done.device_status, done.sent),
            ("delivered", NOW + 2, 1, NOW + 1),
        )
        self.assertEqual(await self.registry.list_commands(1, NOW + 3), [done])

    async def test_command_retry_later(self) -> None:
        """Device status 2 puts the command back in the queue, due again."""
        await self.registry.update_device(1, {})
        command = await self.registry.add_command(1, request(), NOW)
        await self.registry.command_sent(command.id, NOW + 1)
        again = await self.registry.command_result(command.id, 2, NOW + 2)
        self.assertEqual((again.status, again.completed, again.device_status), ("queued", None, 2))
        due = await self.registry.due_commands(1, NOW + 3)
        self.assertEqual([c.id for c in due], [command.id])

    async def test_command_failed(self) -> None:
        """Any other device status fails the command."""
        await self.registry.update_device(1, {})
        for device_status in (0, 3, 255):
            command = await self.registry.add_command(1, request(), NOW)
            await self.registry.command_sent(command.id, NOW + 1)
            failed = await self.registry.command_result(command.id, device_status, NOW + 2)
            self.assertEqual(
                (failed.status, failed.completed, failed.device_status),
                ("failed", NOW + 2, device_status),
            )

    async def test_command_id_outside_uint32(self) -> None:
        """A command id outside uint32, which no command has, is a ValueError on either database."""
        for command_id in (-1, 0x100000000, 2**64):
            with self.assertRaises(ValueError):
                await self.registry.command_sent(command_id, NOW)
            with self.assertRaises(ValueError):
                await self.registry.command_result(command_id, 1, NOW)

    async def test_late_result_ignored(self) -> None:
        """A result for a finished command changes nothing and is None."""
        await self.registry.update_device(1, {})
        command = await self.registry.add_command(1, request(), NOW)
        await self.registry.command_sent(command.id, NOW + 1)
        done = await self.registry.command_result(command.id, 1, NOW + 2)
        self.assertIsNone(await self.registry.command_result(command.id, 2, NOW + 3))
        self.assertEqual(await self.registry.list_commands(1, NOW + 4), [done])


class SQLiteRegistryTests(RegistryScenariosMixin, TestCase):
    """The registry on an SQLite file."""

    async def make_database(self) -> str:
        return "sqlite:" + self.mktemp()

    async def device_table_columns(self) -> list[str]:
        rows = await self.registry.database.pool.runQuery("PRAGMA table_info(devices)")
        return [row[1] for row in rows]

    async def test_wal_mode(self) -> None:
        """The database file is in WAL journal mode."""
        rows = await self.registry.database.pool.runQuery("PRAGMA journal_mode")
        self.assertEqual(rows[0][0].lower(), "wal")

    async def test_no_fsync_per_commit(self) -> None:
        """Commits do not fsync one by one (synchronous NORMAL, safe with WAL)."""
        rows = await self.registry.database.pool.runQuery("PRAGMA synchronous")
        self.assertEqual(rows[0][0], 1)


class PostgreSQLRegistryTests(RegistryScenariosMixin, TestCase):
    """The registry on PostgreSQL, each test in a fresh schema."""

    async def make_database(self) -> str:
        return await fresh_schema_url(self)

    async def device_table_columns(self) -> list[str]:
        rows = await self.registry.database.pool.runQuery(
            "SELECT column_name FROM information_schema.columns"
            " WHERE table_name = 'devices' AND table_schema = current_schema()"
            " ORDER BY ordinal_position"
        )
        return [row[0] for row in rows]

    async def test_tables_in_own_schema(self) -> None:
        """The registry creates its tables in the schema named in the URL."""
        rows = await self.registry.database.pool.runQuery(
            "SELECT table_schema FROM information_schema.tables WHERE table_name = 'devices'"
        )
        schemas = [row[0] for row in rows]
        self.assertIn(self.url.rsplit("%3D", 1)[1], schemas)


    async def until(self, what: str, condition) -> None:
        for _ in range(200):
            if condition():
                return
            await deferLater(reactor, 0.05, lambda: None)
        self.fail(f"timed out waiting for {what}")

    async def listening_registry(self) -> list:
        """Another registry listening for changes; the serials it is told, once connected."""
        other = await self.open_registry()
        told: list = []
        other.on_devices_changed(told.append)
        listener = other.change_listener(reactor)
        listener.startService()
        self.addCleanup(listener.stopService)
        await self.until("the listener to connect", lambda: None in told)
        return told

    async def test_changes_notified_to_other_relays(self) -> None:
        """A change through one registry reaches another's listeners by NOTIFY, with its serials."""
        told = await self.listening_registry()
        await self.registry.update_device(5, {"custom1": "one"})
        await self.registry.import_devices([{"serial": 6}, {"serial": 8}])
        await self.until("the notifications", lambda: (6, 8) in told)
        # Only this test's serials (other tests may notify on the same database).
        mine = [change for change in told if change is None or {5, 6, 8} & set(change)]
        self.assertEqual(mine, [None, (5,), (6, 8)])

    async def test_refused_change_not_notified(self) -> None:
        """A change refused as invalid notifies nothing."""
        told = await self.listening_registry()
        with self.assertRaises(ValueError):
            await self.registry.import_devices([{"serial": 6}, {"serial": 7, "nonsense": "x"}])
        await self.registry.update_device(9, {})
        await self.until("the later notification", lambda: (9,) in told)
        # Only this test's serials: the channel is the whole database's, and
        # tests running beside this one (trial -j) notify on it too.
        self.assertEqual([change for change in told if change and {6, 7} & set(change)], [])


class _RecordingTransaction:
    """A transaction that keeps the statements it was given."""

    def __init__(self) -> None:
        self.statements: list[tuple[str, str, list]] = []

    def execute(self, sql: str, params) -> None:
        self.statements.append(("execute", sql, list(params)))

    def executemany(self, sql: str, rows) -> None:
        self.statements.append(("executemany", sql, list(rows)))


class _Pool:
    def __init__(self, dbapi) -> None:
        self.dbapi = dbapi


class ExecuteRowsTests(SynchronousTestCase):
    """Database.execute_rows: how a batch of rows becomes statements on each database."""

    @staticmethod
    def statement_for(rows: int) -> str:
        return f"statement of {rows} rows ?"

    def run_rows(self, dialect, rows: list, pad_with_last: bool = False) -> list:
        import sqlite3

        import psycopg

        dbapi = sqlite3 if dialect is _SQLITE else psycopg
        database = Database(_Pool(dbapi), dialect, "test", reactor)
        txn = _RecordingTransaction()
        database.execute_rows(txn, self.statement_for, rows, pad_with_last)
        return txn.statements

    def test_sqlite_one_statement_padded_to_a_power_of_two(self) -> None:
        """Three rows on SQLite: one statement of four rows, the fourth all NULLs."""
        self.assertEqual(
            self.run_rows(_SQLITE, [(1, "a"), (2, "b"), (3, "c")]),
            [("execute", "statement of 4 rows ?", [1, "a", 2, "b", 3, "c", None, None])],
        )

    def test_sqlite_single_row_not_padded(self) -> None:
        self.assertEqual(
            self.run_rows(_SQLITE, [(1, "a")]), [("execute", "statement of 1 rows ?", [1, "a"])]
        )

    def test_sqlite_statement_boundary(self) -> None:
        """ROWS_PER_STATEMENT rows are one statement; one more starts a second."""
        rows = [(serial,) for serial in range(ROWS_PER_STATEMENT + 1)]
        whole = self.run_rows(_SQLITE, rows[:-1])
        self.assertEqual([(kind, sql) for kind, sql, _ in whole],
                         [("execute", f"statement of {ROWS_PER_STATEMENT} rows ?")])
        self.assertEqual(whole[0][2], list(range(ROWS_PER_STATEMENT)))
        split = self.run_rows(_SQLITE, rows)
        self.assertEqual(
            [(sql, values) for _, sql, values in split],
            [(f"statement of {ROWS_PER_STATEMENT} rows ?", list(range(ROWS_PER_STATEMENT))),
             ("statement of 1 rows ?", [ROWS_PER_STATEMENT])],
        )

    def test_sqlite_padded_with_the_last_row(self) -> None:
        """With pad_with_last the padding repeats the chunk's last row instead of NULLs."""
        self.assertEqual(
            self.run_rows(_SQLITE, [(1, "a"), (2, "b"), (3, "c")], pad_with_last=True),
            [("execute", "statement of 4 rows ?", [1, "a", 2, "b", 3, "c", 3, "c"])],
        )

    def test_postgresql_one_row_statement_per_row(self) -> None:
        """On PostgreSQL each row is the one-row statement, pipelined by executemany."""
        self.assertEqual(
            self.run_rows(_POSTGRESQL, [(1, "a"), (2, "b"), (3, "c")]),
            [("executemany", "statement of 1 rows %s", [(1, "a"), (2, "b"), (3, "c")])],
        )

    def test_no_rows_no_statement(self) -> None:
        for dialect in (_SQLITE, _POSTGRESQL):
            self.assertEqual(self.run_rows(dialect, []), [])


class DeviceFieldsTests(SynchronousTestCase):
    """What is derived from DeviceRecord's fields."""

    def test_api_doc_table(self) -> None:
        """docs/api.rst's device field table is the one the fields give."""
        with open(API_DOC, encoding="utf-8") as page:
            text = page.read()
        self.assertIn(device_fields_table(), text)

    def test_table_lists_every_field(self) -> None:
        """The table has a row per field, naming it and marking the settable ones."""
        rows = device_fields_table().splitlines()[3:-1]
        self.assertEqual(
            [(row.split()[0], " yes " in row) for row in rows],
            [(f"``{f.name}``", f.name in DEVICE_SETTINGS) for f in dataclass_fields(DeviceRecord)],
        )

    def test_settings_are_the_writable_fields(self) -> None:
        """Only the custom fields and the connector override can be set."""
        self.assertEqual(DEVICE_SETTINGS, ("custom1", "custom2", "custom3", "connector"))

    def test_json(self) -> None:
        """A device's JSON has every field; times are ISO 8601, other values as they are."""
        device = DeviceRecord(7, first_seen=NOW, records_committed=3, connected=True)
        body = device_json(device)
        self.assertEqual(list(body), [f.name for f in dataclass_fields(DeviceRecord)])
        self.assertEqual(
            (body["first_seen"], body["last_seen"], body["records_committed"], body["connected"]),
            ("2023-11-14T22:13:20Z", None, 3, True),
        )

    def test_nullable_from_default(self) -> None:
        """A field defaulting to None is nullable in the schema; the others are not."""
        schema = device_schema()
        self.assertEqual(
            {name: field.get("nullable", False) for name, field in schema.items()},
            {f.name: f.default is None for f in dataclass_fields(DeviceRecord)},
        )
        self.assertEqual((schema["imei"]["type"], schema["imei"]["nullable"]), ("string", True))


class RegistryURLTests(SynchronousTestCase):
    """Registry.from_url and url_for_logs, with no database opened."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()

    def test_unknown_scheme(self) -> None:
        """A URL that is neither sqlite: nor postgresql:// is a one-line ValueError."""
        for url in ("mysql://u@h/db", "registry.db", "", "sqlite3:x.db"):
            with self.assertRaises(ValueError) as caught:
                Registry.from_url(url, reactor=self.reactor)
            self.assertNotIn("\n", str(caught.exception))

    def test_sqlite_needs_path(self) -> None:
        """sqlite: with no path is a ValueError."""
        self.assertRaises(ValueError, Registry.from_url, "sqlite:", reactor=self.reactor)

    def test_sqlite_relative_path(self) -> None:
        """A relative SQLite path is taken relative to the working directory."""
        registry = Registry.from_url("sqlite:data/registry.db", reactor=self.reactor)
        self.assertEqual(
            registry.url_for_logs, "sqlite:" + os.path.join(os.getcwd(), "data", "registry.db")
        )

    def test_postgresql_password_hidden(self) -> None:
        """url_for_logs drops the password from the user part and the query."""
        registry = Registry.from_url(
            "postgresql://relay:s3cret@db.example:6432/relay?password=other&sslmode=require",
            reactor=self.reactor,
        )
        self.assertEqual(
            registry.url_for_logs, "postgresql://relay@db.example:6432/relay?sslmode=require"
        )

    def test_bad_postgresql_url(self) -> None:
        """A postgresql:// URL libpq cannot parse is a ValueError without the password."""
        with self.assertRaises(ValueError) as caught:
            Registry.from_url("postgresql://u:s3cret@h/db?bogus=1", reactor=self.reactor)
        self.assertNotIn("s3cret", str(caught.exception))
        self.assertNotIn("\n", str(caught.exception))

    def test_bad_postgresql_url_quoting_password(self) -> None:
        """libpq's reason quoting the password (a bad escape, a space) does not carry it out."""
        for url in ("postgresql://u:s3%zzcret@h/db", "postgresql://u:s3 cret@h/db?password=x"):
            with self.assertRaises(ValueError) as caught:
                Registry.from_url(url, reactor=self.reactor)
            self.assertNotIn("s3", str(caught.exception))
