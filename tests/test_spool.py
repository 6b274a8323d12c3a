"""
Tests for :mod:`oemrelay.spool`: uploads stored and rebuilt exactly, the
spool table on a real SQLite file and a real PostgreSQL schema, background
delivery, and the files it writes being owner-only.

Time is a :class:`~twisted.internet.task.Clock`; the database runs in the
real reactor's threads.
"""

from __future__ import annotations

import os
import stat

from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList, fail, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from oemrelay.codec import FrameDecoder, Hello, MessageType, ProtocolError, parse_hello
from oemrelay.registry import Registry
from oemrelay.relay import DeliveryFailed, Upload
from oemrelay.spool import BackgroundDelivery, DatabaseSpool, RetryPolicy, SpoolError, SpoolFull
from oemrelay.spool.stored_upload import frames_blob, rebuild_upload

from .postgres import fresh_schema_url
from .vectors import captures

START = 1_700_000_000.0
DATA_TYPES = (MessageType.DATA_RECORDS, MessageType.FIXED_RECORDS)


def _frames_of(name: str):
    return FrameDecoder().feed(captures()[name])


def _hello_captures() -> dict[str, Hello]:
    return {
        name: parse_hello(frame.payload)
        for name in captures()
        for frame in _frames_of(name)
        if frame.type == MessageType.HELLO
    }


def _data_captures() -> dict[str, tuple]:
    return {
        name: tuple(_frames_of(name))
        for name in captures()
        if all(frame.type in DATA_TYPES for frame in _frames_of(name))
    }


HELLOS = _hello_captures()
DATA = _data_captures()
DART = HELLOS["hello-49-byte-dart"]


def upload_of(hello: Hello, *names: str, received_at: float = START) -> Upload:
    """The upload of the data captures ``names`` from the device saying ``hello``."""
    frames = tuple(frame for name in names for frame in DATA[name])
    return rebuild_upload(hello.payload, frames_blob(frames), received_at)


DENMARK = "data-0x04-2-records-2021-denmark"  # 2 records
AUCKLAND = "data-0x04-12-records-2017-auckland"  # 12 records


def device(serial: int) -> Hello:
    """Another device's hello, with its own payload."""
    hello = Hello(serial, "353323081669730", "89610185001824844630", 34, 2, 1, 9)
    return parse_hello(hello.to_payload())


class StoredUploadTests(SynchronousTestCase):
    """An upload is stored as its hello payload and frames, and rebuilt exactly."""

    def test_captures_present(self) -> None:
        """The round trip below covers hellos and both data record types."""
        self.assertGreaterEqual(len(HELLOS), 3)
        self.assertEqual(
            {frame.type for frames in DATA.values() for frame in frames}, set(DATA_TYPES)
        )

    def test_round_trip_every_capture(self) -> None:
        """Every data capture from every hello capture comes back equal, byte for byte."""
        for hello_name, hello in HELLOS.items():
            for data_name, frames in DATA.items():
                upload = Upload(hello, frames, upload_of(hello, data_name).records, 12.5)
                again = rebuild_upload(hello.payload, frames_blob(frames), 12.5)
                where = (hello_name, data_name)
                self.assertEqual(again, upload, where)
                self.assertEqual(again.hello.payload, hello.payload, where)
                self.assertEqual(frames_blob(again.frames), frames_blob(frames), where)
                self.assertGreater(len(again.records), 0, where)

    def test_several_frames_keep_their_order(self) -> None:
        """An upload of several frames keeps them, and their records, in order."""
        upload = upload_of(DART, AUCKLAND, DENMARK)
        self.assertEqual(
            [record.seq for record in upload.records],
            list(range(518, 530)) + [565, 566],
        )

    def test_non_data_frame_refused(self) -> None:
        """A stored frame that is not data records is a ProtocolError, not a silent skip."""
        blob = captures()["async-session-request-0x22"]
        self.assertRaises(ProtocolError, rebuild_upload, DART.payload, blob, 0.0)

    def test_partial_frame_refused(self) -> None:
        """A stored blob cut inside a frame is a ProtocolError."""
        blob = frames_blob(DATA[DENMARK])[:-1]
        self.assertRaises(ProtocolError, rebuild_upload, DART.payload, blob, 0.0)


class RetryPolicyTests(SynchronousTestCase):
    """The backoff between tries and the max_attempts limit."""

    def test_delay_doubles_up_to_max(self) -> None:
        """retry_initial after the first failure, doubling, never over retry_max."""
        policy = RetryPolicy(retry_initial=0.5, retry_max=3.0)
        self.assertEqual([policy.delay(n) for n in (1, 2, 3, 4, 5)], [0.5, 1.0, 2.0, 3.0, 3.0])

    def test_huge_try_count(self) -> None:
        """A ten-thousandth failure still gives retry_max, not an overflow."""
        self.assertEqual(RetryPolicy(retry_max=7.0).delay(10_000), 7.0)

    def test_exhausted_boundary(self) -> None:
        """With max_attempts 3 the third failed try is the last, not the second."""
        policy = RetryPolicy(max_attempts=3)
        self.assertEqual([policy.exhausted(n) for n in (1, 2, 3)], [False, False, True])

    def test_no_limit(self) -> None:
        """max_attempts 0 never runs out."""
        self.assertFalse(RetryPolicy(max_attempts=0).exhausted(10**9))


class SpoolScenariosMixin:
    """
    Every behaviour of the spool table.  A class using it provides
    ``make_url()``, returning the URL of an empty database of its own.
    """

    async def make_url(self) -> str:
        raise NotImplementedError

    async def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(START)
        self.url = await self.make_url()
        self.spool = await self.open_spool()

    async def open_spool(self, max_records: int = 1000, owner: str = "a", lease: float = 100.0):
        """Another started spool on this test's database, closed at the end."""
        spool = DatabaseSpool.from_url(
            self.url, reactor, max_records=max_records, owner=owner, lease=lease, clock=self.clock
        )
        self.addCleanup(spool.close)
        await spool.start()
        return spool

    async def claim_ids(self, spool=None, limit: int = 100) -> list[tuple[int, str]]:
        claimed = await (spool or self.spool).claim(limit)
        return [(item.upload.hello.serial, item.connector) for item in claimed]

    async def test_put_then_claim_is_the_same_upload(self) -> None:
        """A claimed upload equals the one put, hello payload and frames included."""
        upload = upload_of(DART, AUCKLAND, DENMARK, received_at=START - 5)
        await self.spool.put(upload, ("main",))
        [item] = await self.spool.claim(10)
        self.assertEqual((item.connector, item.attempts), ("main", 0))
        self.assertEqual(item.upload, upload)
        self.assertEqual(item.upload.hello.payload, DART.payload)
        self.assertEqual(frames_blob(item.upload.frames), frames_blob(upload.frames))
        self.assertEqual(item.upload.received_at, START - 5)

    async def test_one_row_per_connector(self) -> None:
        """An upload put for two connectors is claimed once for each."""
        await self.spool.put(upload_of(DART, DENMARK), ("a", "b"))
        self.assertEqual(sorted(await self.claim_ids()), [(DART.serial, "a"), (DART.serial, "b")])

    async def test_order_per_device_and_connector(self) -> None:
        """A device's second upload is claimed only once its first is delivered."""
        first, second = upload_of(DART, DENMARK), upload_of(DART, AUCKLAND)
        await self.spool.put(first, ("main",))
        await self.spool.put(second, ("main",))
        [item] = await self.spool.claim(10)
        self.assertEqual(item.upload, first)
        self.clock.advance(1000)  # even once the lease is over, only the first
        [again] = await self.spool.claim(10)
        self.assertEqual(again.id, item.id)
        await self.spool.delivered(item.id)
        [after] = await self.spool.claim(10)
        self.assertEqual(after.upload, second)

    async def test_other_devices_not_blocked(self) -> None:
        """One device's upload being retried does not hold another device's back."""
        await self.spool.put(upload_of(device(1), DENMARK), ("main",))
        [stuck] = await self.spool.claim(10)
        await self.spool.retry_later(stuck.id, START + 3600, "down")
        await self.spool.put(upload_of(device(2), DENMARK), ("main",))
        self.assertEqual(await self.claim_ids(), [(2, "main")])

    async def test_claimed_row_not_claimed_again_during_lease(self) -> None:
        """A leased row is not claimed by another relay until its lease ends (boundary: at the end it is not yet)."""
        other = await self.open_spool(owner="b")
        await self.spool.put(upload_of(DART, DENMARK), ("main",))
        self.assertEqual(len(await self.spool.claim(10)), 1)
        self.assertEqual(await other.claim(10), [])
        self.clock.advance(100)  # lease 100 s: lease_until == now is still held
        self.assertEqual(await other.claim(10), [])
        self.clock.advance(0.001)
        self.assertEqual(await self.claim_ids(other), [(DART.serial, "main")])

    async def test_retry_later_boundary(self) -> None:
        """A row retried at T is not claimable just before T, and is at T."""
        await self.spool.put(upload_of(DART, DENMARK), ("main",))
        [item] = await self.spool.claim(10)
        await self.spool.retry_later(item.id, START + 10, "503")
        self.clock.advance(9.999)
        self.assertEqual(await self.spool.claim(10), [])
        self.clock.advance(0.001)
        [again] = await self.spool.claim(10)
        self.assertEqual((again.id, again.attempts), (item.id, 1))

    async def test_full_boundary(self) -> None:
        """A put is refused once the queued records reach spool_max_records, not one before."""
        spool = await self.open_spool(max_records=4)
        await spool.put(upload_of(device(1), DENMARK), ("main",))  # 2 held
        await spool.put(upload_of(device(2), DENMARK), ("main",))  # 4 held: full
        with self.assertRaises(SpoolFull):
            await spool.put(upload_of(device(3), DENMARK), ("main",))
        stats = await spool.stats()
        self.assertEqual((stats.depth, stats.records), (2, 4))

    async def test_one_below_full_accepted(self) -> None:
        """With one record of room an upload of several is still kept (the bound is checked before)."""
        spool = await self.open_spool(max_records=3)
        await spool.put(upload_of(device(1), DENMARK), ("main",))  # 2 held, 1 free
        await spool.put(upload_of(device(2), DENMARK), ("main",))
        self.assertEqual((await spool.stats()).records, 4)

    async def test_dead_letters_do_not_fill(self) -> None:
        """Dead letters do not count against spool_max_records."""
        spool = await self.open_spool(max_records=2)
        await spool.put(upload_of(device(1), DENMARK), ("main",))
        [item] = await spool.claim(10)
        await spool.give_up(item.id, "400")
        await spool.put(upload_of(device(2), DENMARK), ("main",))

    async def test_delivered_is_forgotten(self) -> None:
        """A delivered row leaves the spool."""
        await self.spool.put(upload_of(DART, DENMARK), ("main",))
        [item] = await self.spool.claim(10)
        await self.spool.delivered(item.id)
        self.assertEqual((await self.spool.stats()).depth, 0)
        self.clock.advance(1000)
        self.assertEqual(await self.spool.claim(10), [])

    async def test_stats(self) -> None:
        """stats() counts queued uploads, their records, the oldest's age and the dead letters."""
        self.assertEqual(tuple(vars(await self.spool.stats()).values()), (0, 0, 0.0, 0))
        await self.spool.put(upload_of(device(1), AUCKLAND, received_at=START - 30), ("main",))
        await self.spool.put(upload_of(device(2), DENMARK, received_at=START - 10), ("main",))
        await self.spool.put(upload_of(device(3), DENMARK), ("main",))
        [first, *_] = await self.spool.claim(1)
        await self.spool.give_up(first.id, "400")
        stats = await self.spool.stats()
        self.assertEqual(
            (stats.depth, stats.records, stats.oldest_age, stats.dead_letters), (2, 4, 10.0, 1)
        )

    async def test_expire_boundary(self) -> None:
        """An upload exactly spool_max_age old stays; a moment older it is a dead letter."""
        await self.spool.put(upload_of(DART, DENMARK, received_at=START - 60), ("main",))
        self.assertEqual(await self.spool.expire(60), 0)
        self.clock.advance(0.001)
        self.assertEqual(await self.spool.expire(60), 1)
        [letter] = await self.spool.list_dead(10)
        self.assertIn("spool_max_age 60s", letter.reason)
        self.assertEqual(await self.spool.claim(10), [])

    async def test_leased_row_not_expired(self) -> None:
        """An upload being delivered is not dead-lettered under the deliverer's feet."""
        await self.spool.put(upload_of(DART, DENMARK, received_at=START - 100), ("main",))
        await self.spool.claim(10)
        self.assertEqual(await self.spool.expire(60), 0)

    async def test_dead_letter_listed(self) -> None:
        """A given-up upload is listed with its serial, connector, records, times, tries and reason."""
        await self.spool.put(upload_of(DART, DENMARK, received_at=START - 7), ("main",))
        [item] = await self.spool.claim(10)
        await self.spool.retry_later(item.id, START, "503")
        [item] = await self.spool.claim(10)
        self.clock.advance(5)
        await self.spool.give_up(item.id, "answered 400")
        [letter] = await self.spool.list_dead(10)
        self.assertEqual(
            (letter.id, letter.serial, letter.connector, letter.records, letter.received_at,
             letter.dead_at, letter.attempts, letter.reason),
            (item.id, DART.serial, "main", 2, START - 7, START + 5, 2, "answered 400"),
        )

    async def test_dead_letter_pages_and_serial(self) -> None:
        """list_dead pages by id after ``after`` and filters by serial."""
        for serial in (1, 2, 1, 3):
            await self.spool.put(upload_of(device(serial), DENMARK), (f"c{serial}",))
        ids = []
        for item in await self.spool.claim(10):
            ids.append(item.id)
            await self.spool.give_up(item.id, "x")
        ids.sort()
        self.assertEqual([letter.id for letter in await self.spool.list_dead(2)], ids[:2])
        self.assertEqual([letter.id for letter in await self.spool.list_dead(2, ids[1])], ids[2:])
        self.assertEqual(
            [letter.serial for letter in await self.spool.list_dead(10, serial=1)], [1]
        )

    async def test_retry_dead_letter(self) -> None:
        """A retried dead letter is queued again with no tries counted and its age restarted."""
        await self.spool.put(upload_of(DART, DENMARK, received_at=START - 1000), ("main",))
        await self.spool.expire(60)
        [letter] = await self.spool.list_dead(10)
        self.assertTrue(await self.spool.retry_dead(letter.id))
        self.assertEqual(await self.spool.expire(60), 0)
        [item] = await self.spool.claim(10)
        self.assertEqual((item.id, item.attempts, item.upload.received_at), (letter.id, 0, START - 1000))
        self.assertEqual(await self.spool.list_dead(10), [])

    async def test_retry_or_delete_needs_a_dead_letter(self) -> None:
        """Retry and delete of a queued row, or of no row, change nothing and say so."""
        await self.spool.put(upload_of(DART, DENMARK), ("main",))
        [item] = await self.spool.claim(10)
        for row_id in (item.id, item.id + 1000):
            self.assertFalse(await self.spool.retry_dead(row_id))
            self.assertFalse(await self.spool.delete_dead(row_id))
        self.assertEqual((await self.spool.stats()).depth, 1)

    async def test_delete_dead_letter(self) -> None:
        """A deleted dead letter is gone."""
        await self.spool.put(upload_of(DART, DENMARK), ("main",))
        [item] = await self.spool.claim(10)
        await self.spool.give_up(item.id, "400")
        self.assertTrue(await self.spool.delete_dead(item.id))
        self.assertEqual(await self.spool.list_dead(10), [])
        self.assertEqual((await self.spool.stats()).dead_letters, 0)

    async def test_survives_reopening(self) -> None:
        """What one spool put, a spool opened later on the same database delivers."""
        upload = upload_of(DART, AUCKLAND)
        await self.spool.put(upload, ("main",))
        self.spool.close()
        later = await self.open_spool()
        [item] = await later.claim(10)
        self.assertEqual(item.upload, upload)

    async def test_check_writable(self) -> None:
        """check_writable fires on a working spool."""
        await self.spool.check_writable()

    async def test_newer_schema_refused(self) -> None:
        """A spool written by a newer relay is refused at start with a SpoolError."""
        await self.spool._pool.runOperation("UPDATE spool_version SET version = 99")
        with self.assertRaises(SpoolError) as caught:
            await self.open_spool()
        self.assertIn("schema version 99", str(caught.exception))

    async def test_start_twice_on_one_database(self) -> None:
        """Starting a second spool on the same database keeps what the first holds."""
        await self.spool.put(upload_of(DART, DENMARK), ("main",))
        other = await self.open_spool(owner="b")
        self.assertEqual((await other.stats()).depth, 1)


class SQLiteSpoolTests(SpoolScenariosMixin, TestCase):
    """The spool on an SQLite file."""

    async def make_url(self) -> str:
        return "sqlite:" + os.path.abspath(self.mktemp())

    async def test_every_commit_synced(self) -> None:
        """The connection runs synchronous=FULL (2) in WAL mode: a put that fired is on disk."""
        [(mode,)] = await self.spool._pool.runQuery("PRAGMA journal_mode")
        [(synchronous,)] = await self.spool._pool.runQuery("PRAGMA synchronous")
        self.assertEqual((mode.lower(), synchronous), ("wal", 2))

    async def test_missing_directory_fails_start(self) -> None:
        """A spool in a directory that does not exist fails at start."""
        self.url = "sqlite:/nonexistent-oemrelay-dir/spool.sqlite"
        with self.assertRaises(OSError):
            await self.open_spool()


class PostgreSQLSpoolTests(SpoolScenariosMixin, TestCase):
    """The spool on PostgreSQL, each test in a fresh schema; relays share it."""

    async def make_url(self) -> str:
        return await fresh_schema_url(self)

    async def test_concurrent_claims_never_share_a_row(self) -> None:
        """Three relays claiming at once each get different uploads, and all of them are claimed."""
        relays = [self.spool] + [await self.open_spool(owner=name) for name in "bc"]
        for serial in range(30):
            await self.spool.put(upload_of(device(serial), DENMARK), ("main",))
        results = await DeferredList([relay.claim(10) for relay in relays for _ in range(2)])
        ids = [item.id for ok, claimed in results for item in claimed]
        self.assertEqual(len(ids), len(set(ids)))
        self.assertEqual(len(ids), 30)

    async def test_dead_relay_strands_nothing(self) -> None:
        """A relay that dies: the other delivers what it spooled at once, and what it had claimed after the lease."""
        other = await self.open_spool(owner="b")
        for serial in range(4):
            await self.spool.put(upload_of(device(serial), DENMARK), ("main",))
        claimed = await self.spool.claim(2)
        self.spool.close()  # dies holding two leases
        unclaimed = await other.claim(10)
        self.assertEqual(len(unclaimed), 2)
        for item in unclaimed:
            await other.delivered(item.id)
        self.clock.advance(100.001)
        late = await other.claim(10)
        self.assertEqual({item.id for item in late}, {item.id for item in claimed})


class FilePermissionTests(TestCase):
    """The spool's and the registry's SQLite files are readable by their owner only."""

    def setUp(self) -> None:
        # A permissive umask, so the test sees the relay's own choice.
        self.addCleanup(os.umask, os.umask(0o002))

    def assert_owner_only(self, path: str) -> None:
        for suffix in ("", "-wal", "-shm"):
            mode = stat.S_IMODE(os.stat(path + suffix).st_mode)
            self.assertEqual(mode & 0o077, 0, f"{path}{suffix} has mode {mode:o}")

    async def test_spool_files(self) -> None:
        """spool.sqlite, -wal and -shm are created 0600."""
        path = os.path.abspath(self.mktemp())
        spool = DatabaseSpool.from_url(f"sqlite:{path}", reactor, max_records=10)
        self.addCleanup(spool.close)
        await spool.start()
        await spool.put(upload_of(DART, DENMARK), ("main",))
        self.assert_owner_only(path)

    async def test_registry_files(self) -> None:
        """The registry's SQLite file, -wal and -shm are created 0600."""
        path = os.path.abspath(self.mktemp())
        registry = Registry.from_url(f"sqlite:{path}", reactor)
        self.addCleanup(registry.close)
        await registry.start()
        await registry.device_connected(DART, "n", START)
        self.assert_owner_only(path)


class BackgroundDeliveryTests(TestCase):
    """Uploads leave a real SQLite spool through ``deliver``, with backoff and dead letters."""

    async def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(START)
        self.spool = DatabaseSpool.from_url(
            "sqlite:" + os.path.abspath(self.mktemp()), reactor, max_records=1000,
            lease=100.0, clock=self.clock,
        )
        self.addCleanup(self.spool.close)
        await self.spool.start()
        #: (connector, upload, its Deferred) per call of deliver.
        self.calls: list[tuple[str, Upload, Deferred]] = []
        self.policies = {"main": RetryPolicy(max_attempts=3, retry_initial=2.0, retry_max=5.0)}

    def deliver(self, connector: str, upload: Upload) -> Deferred[None]:
        answer: Deferred[None] = Deferred()
        self.calls.append((connector, upload, answer))
        return answer

    def delivery(self, **settings) -> BackgroundDelivery:
        settings.setdefault("max_age", 3600.0)
        settings.setdefault("delivery_timeout", 30.0)
        return BackgroundDelivery(self.spool, self.deliver, self.clock, self.policies, **settings)

    async def round(self, delivery: BackgroundDelivery) -> None:
        await delivery.run_round()

    async def answer(self, delivery: BackgroundDelivery, result) -> None:
        """Answer the last delivery with ``result`` (None or an exception) and let it settle."""
        _, _, answer = self.calls[-1]
        if result is None:
            answer.callback(None)
        else:
            answer.errback(result)
        await delivery.settled()

    async def test_delivered_and_forgotten(self) -> None:
        """A spooled upload is handed to deliver with its connector and leaves the spool once it fires."""
        upload = upload_of(DART, DENMARK)
        await self.spool.put(upload, ("main",))
        delivery = self.delivery()
        await self.round(delivery)
        [(connector, given, _)] = self.calls
        self.assertEqual((connector, given), ("main", upload))
        await self.answer(delivery, None)
        self.assertEqual((await self.spool.stats()).depth, 0)

    async def test_retry_after_backoff(self) -> None:
        """A retryable failure is tried again after retry_initial, then twice that."""
        await self.spool.put(upload_of(DART, DENMARK), ("main",))
        delivery = self.delivery()
        await self.round(delivery)
        await self.answer(delivery, DeliveryFailed("503", retryable=True))
        self.clock.advance(1.999)
        await self.round(delivery)
        self.assertEqual(len(self.calls), 1)
        self.clock.advance(0.001)
        await self.round(delivery)
        self.assertEqual(len(self.calls), 2)
        await self.answer(delivery, DeliveryFailed("503", retryable=True))
        self.clock.advance(3.999)
        await self.round(delivery)
        self.assertEqual(len(self.calls), 2)
        self.clock.advance(0.001)
        await self.round(delivery)
        self.assertEqual(len(self.calls), 3)

    async def test_backoff_survives_restart(self) -> None:
        """A new deliverer (a restarted relay) waits out the stored backoff too."""
        await self.spool.put(upload_of(DART, DENMARK), ("main",))
        first = self.delivery()
        await self.round(first)
        await self.answer(first, DeliveryFailed("503", retryable=True))
        await first.stop()
        second = self.delivery()
        self.clock.advance(1)
        await self.round(second)
        self.assertEqual(len(self.calls), 1)
        self.clock.advance(1)
        await self.round(second)
        self.assertEqual(len(self.calls), 2)

    async def test_not_retryable_is_dead_at_once(self) -> None:
        """A refusal that is not retryable moves the upload to the dead letters on the first try."""
        await self.spool.put(upload_of(DART, DENMARK), ("main",))
        delivery = self.delivery()
        await self.round(delivery)
        await self.answer(delivery, DeliveryFailed("answered 400: bad", retryable=False))
        [letter] = await self.spool.list_dead(10)
        self.assertEqual((letter.attempts, letter.reason), (1, "answered 400: bad"))

    async def test_only_refusals_are_final(self) -> None:
        """A not-retryable failure of another kind (a TCP 06 00, a timeout) is tried again."""
        await self.spool.put(upload_of(DART, DENMARK), ("main",))
        delivery = self.delivery()
        await self.round(delivery)
        await self.answer(delivery, DeliveryFailed("status 00", "end_server", retryable=False))
        self.assertEqual(await self.spool.list_dead(10), [])
        self.clock.advance(2)
        await self.round(delivery)
        self.assertEqual(len(self.calls), 2)

    async def test_max_attempts(self) -> None:
        """The max_attempts-th failed try dead-letters the upload; the one before does not."""
        await self.spool.put(upload_of(DART, DENMARK), ("main",))
        delivery = self.delivery()
        for _ in range(2):
            await self.round(delivery)
            await self.answer(delivery, DeliveryFailed("503", retryable=True))
            self.clock.advance(10)
        self.assertEqual(await self.spool.list_dead(10), [])
        await self.round(delivery)
        await self.answer(delivery, DeliveryFailed("503", retryable=True))
        [letter] = await self.spool.list_dead(10)
        self.assertEqual(letter.attempts, 3)
        self.assertIn("max_attempts 3", letter.reason)

    async def test_unknown_connector_dead(self) -> None:
        """An upload for a connector no longer configured is dead-lettered without a try."""
        await self.spool.put(upload_of(DART, DENMARK), ("gone",))
        delivery = self.delivery()
        await self.round(delivery)
        await delivery.settled()
        self.assertEqual(self.calls, [])
        [letter] = await self.spool.list_dead(10)
        self.assertEqual((letter.attempts, letter.reason), (0, "connector 'gone' is not configured"))

    async def test_hung_delivery_times_out(self) -> None:
        """A delivery that never answers counts as a failed try after delivery_timeout."""
        await self.spool.put(upload_of(DART, DENMARK), ("main",))
        delivery = self.delivery(delivery_timeout=30.0)
        await self.round(delivery)
        self.clock.advance(30)
        await delivery.settled()
        self.clock.advance(2)
        await self.round(delivery)
        self.assertEqual(len(self.calls), 2)

    async def test_slow_device_does_not_block_others(self) -> None:
        """While one device's delivery hangs, another device's upload is delivered."""
        await self.spool.put(upload_of(device(1), DENMARK), ("main",))
        delivery = self.delivery()
        await self.round(delivery)
        await self.spool.put(upload_of(device(2), DENMARK), ("main",))
        await self.round(delivery)
        # Device 2's delivery started while device 1's is still unanswered.
        self.assertEqual([upload.hello.serial for _, upload, _ in self.calls], [1, 2])
        for _, _, answer in reversed(self.calls):
            answer.callback(None)
        await delivery.settled()
        self.assertEqual((await self.spool.stats()).depth, 0)

    async def test_in_flight_not_claimed_twice(self) -> None:
        """A round while a delivery is under way does not start it again."""
        await self.spool.put(upload_of(DART, DENMARK), ("main",))
        delivery = self.delivery()
        await self.round(delivery)
        await self.round(delivery)
        self.assertEqual(len(self.calls), 1)

    async def test_concurrency_bound(self) -> None:
        """No more than ``concurrency`` deliveries run at once."""
        for serial in range(5):
            await self.spool.put(upload_of(device(serial), DENMARK), ("main",))
        delivery = self.delivery(concurrency=3)
        await self.round(delivery)
        await self.round(delivery)
        self.assertEqual(len(self.calls), 3)

    async def test_order_kept_through_failures(self) -> None:
        """A device's later upload waits while its earlier one is being retried."""
        first, second = upload_of(DART, DENMARK), upload_of(DART, AUCKLAND)
        await self.spool.put(first, ("main",))
        await self.spool.put(second, ("main",))
        delivery = self.delivery()
        await self.round(delivery)
        await self.answer(delivery, DeliveryFailed("503", retryable=True))
        self.clock.advance(2)
        await self.round(delivery)
        await self.answer(delivery, None)
        await self.round(delivery)
        self.assertEqual([upload for _, upload, _ in self.calls], [first, first, second])

    async def test_expired_in_a_round(self) -> None:
        """A round moves uploads older than max_age to the dead letters instead of delivering them."""
        await self.spool.put(upload_of(DART, DENMARK, received_at=START - 61), ("main",))
        delivery = self.delivery(max_age=60.0)
        await self.round(delivery)
        self.assertEqual(self.calls, [])
        self.assertEqual(len(await self.spool.list_dead(10)), 1)

    async def test_loop_runs_rounds(self) -> None:
        """Started, it runs a round at once and one every interval; stopped, no more."""
        await self.spool.put(upload_of(device(1), DENMARK), ("main",))
        delivery = self.delivery(interval=5.0)
        delivery.start()
        await self.wait_for_calls(1)
        await self.spool.put(upload_of(device(2), DENMARK), ("main",))
        self.clock.advance(5)
        await self.wait_for_calls(2)
        stopped = delivery.stop()
        for _, _, answer in self.calls:
            answer.callback(None)
        await stopped
        await self.spool.put(upload_of(device(3), DENMARK), ("main",))
        self.clock.advance(50)
        self.assertEqual(len(self.calls), 2)

    async def test_stop_releases(self) -> None:
        """Stopping cancels a hung delivery: its upload is claimable at once, no try counted."""
        await self.spool.put(upload_of(DART, DENMARK), ("main",))
        delivery = self.delivery()
        await self.round(delivery)
        await delivery.stop()
        self.assertEqual(len(self.calls), 1)
        [item] = await self.spool.claim(10)
        self.assertEqual(item.attempts, 0)

    async def wait_for_calls(self, count: int) -> None:
        from twisted.internet.task import deferLater

        for _ in range(500):
            if len(self.calls) >= count:
                return
            await deferLater(reactor, 0.01, lambda: None)
        self.fail(f"{count} deliveries never started")


class FailingSpool:
    """A spool whose every call fails, as a database that went away."""

    def expire(self, max_age: float) -> Deferred:
        return fail(OSError("database is locked"))


class RoundFailureTests(SynchronousTestCase):
    """A round that cannot reach the spool is logged and does not stop the rounds."""

    def test_round_failure_logged(self) -> None:
        """The round's Deferred succeeds and the reason is logged as a warning."""
        from oemrelay.spool import background

        events: list[dict] = []
        from twisted.logger import Logger

        self.patch(background, "log", Logger(namespace="t", observer=events.append))
        delivery = BackgroundDelivery(
            FailingSpool(), lambda c, u: succeed(None), Clock(), {}, max_age=1.0
        )
        self.successResultOf(delivery.run_round())
        [event] = events
        self.assertIn("database is locked", event["reason"])



class LatestSpoolFiguresTests(SynchronousTestCase):
    """The spool's figures for readers that cannot wait: the last answer, one question at a time."""

    def setUp(self) -> None:
        from oemrelay.spool import LatestSpoolFigures, SpoolStats

        self.stats = SpoolStats
        self.asked: list[Deferred] = []
        spool = type("FakeSpool", (), {"stats": lambda _: self.ask()})()
        self.figures = LatestSpoolFigures(spool)

    def ask(self) -> Deferred:
        self.asked.append(Deferred())
        return self.asked[-1]

    def test_nothing_known_before_the_first_answer(self) -> None:
        """Before the spool answers: None, depth 0, age 0, and one question asked however often it is read."""
        self.assertIsNone(self.figures.latest())
        self.assertEqual((self.figures.depth(), self.figures.oldest_age()), (0, 0.0))
        self.assertEqual(len(self.asked), 1)

    def test_last_answer_served_and_asked_again(self) -> None:
        """After an answer, reads return it and each read asks again."""
        self.figures.latest()
        self.asked[0].callback(self.stats(depth=3, records=30, oldest_age=12.5, dead_letters=1))
        self.assertEqual(
            self.figures.latest(),
            {"depth": 3, "records": 30, "oldest_age": 12.5, "dead_letters": 1},
        )
        self.assertEqual((self.figures.depth(), self.figures.oldest_age()), (3, 12.5))
        self.assertEqual(len(self.asked), 2)

    def test_failed_answer_keeps_the_last_figures(self) -> None:
        """A spool that fails to answer leaves the last figures, and is asked again next time."""
        self.figures.latest()
        self.asked[0].callback(self.stats(depth=2, records=4, oldest_age=1.0, dead_letters=0))
        self.figures.latest()
        self.asked[1].errback(RuntimeError("gone"))
        self.assertEqual(self.figures.depth(), 2)
        self.assertEqual(len(self.asked), 3)
