"""
Tests for the dead-letter routes of :mod:`oemrelay.api`: listing (paged, by
serial), retry and delete, over a spool double, through StubTreq.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import fail, succeed
from treq.testing import StubTreq

from oemrelay.api import DEFAULT_LIMIT, MAX_LIMIT, build_api
from oemrelay.spool import DeadLetter

from .test_api import CONNECTORS, NOW, TOKEN, _ApiTestCase


def letter(letter_id: int, serial: int = 129336) -> DeadLetter:
    return DeadLetter(letter_id, serial, "primary", 2, NOW - 60, NOW - 1, 3, "answered 400")


class FakeSpool:
    """Dead letters in a dict; ``broken`` makes every call fail."""

    def __init__(self) -> None:
        self.letters = {n: letter(n, serial=100 + n % 2) for n in range(1, 6)}
        self.requeued: list[int] = []
        self.broken = False
        self.list_calls: list[tuple] = []

    def _answer(self, value: Any):
        return fail(OSError("disk I/O error at /var/lib/x")) if self.broken else succeed(value)

    def list_dead(self, limit: int, after: int | None = None, serial: int | None = None):
        self.list_calls.append((limit, after, serial))
        found = [
            value for key, value in sorted(self.letters.items())
            if key > (after or 0) and (serial is None or value.serial == serial)
        ]
        return self._answer(found[:limit])

    def retry_dead(self, letter_id: int):
        if letter_id in self.letters:
            self.requeued.append(letter_id)
            del self.letters[letter_id]
            return self._answer(True)
        return self._answer(False)

    def delete_dead(self, letter_id: int):
        return self._answer(self.letters.pop(letter_id, None) is not None)


class DeadLetterTests(_ApiTestCase):
    """GET /api/deadletters, POST /api/deadletters/{id}/retry, DELETE /api/deadletters/{id}."""

    def setUp(self) -> None:
        super().setUp()
        self.spool = FakeSpool()
        self.resource = build_api(self.registry, TOKEN, CONNECTORS, self.clock, spool=self.spool)
        self.stub = StubTreq(self.resource)

    def test_list(self) -> None:
        """The listing shows each dead letter's fields, times in ISO 8601."""
        code, body = self.call("GET", "/api/deadletters")
        self.assertEqual((code, body["next"]), (200, None))
        self.assertEqual([item["id"] for item in body["deadletters"]], [1, 2, 3, 4, 5])
        first = body["deadletters"][0]
        self.assertEqual(
            first,
            {
                "id": 1, "serial": 101, "connector": "primary", "records": 2,
                "received_at": "2026-11-26T09:19:02Z", "dead_at": "2026-11-26T09:20:01Z",
                "attempts": 3, "reason": "answered 400",
            },
        )
        self.assertEqual(self.spool.list_calls, [(DEFAULT_LIMIT + 1, None, None)])

    def test_pages(self) -> None:
        """limit and after page through by id; next is the last id shown while more remain."""
        code, body = self.call("GET", "/api/deadletters?limit=2")
        self.assertEqual(([item["id"] for item in body["deadletters"]], body["next"]), ([1, 2], 2))
        code, body = self.call("GET", "/api/deadletters?limit=2&after=4")
        self.assertEqual(([item["id"] for item in body["deadletters"]], body["next"]), ([5], None))

    def test_exact_last_page(self) -> None:
        """A page that ends exactly at the last dead letter says there is no next."""
        code, body = self.call("GET", "/api/deadletters?limit=5")
        self.assertEqual((len(body["deadletters"]), body["next"]), (5, None))

    def test_serial_filter(self) -> None:
        """serial shows one device's dead letters only (for the console)."""
        code, body = self.call("GET", "/api/deadletters?serial=100")
        self.assertEqual([item["id"] for item in body["deadletters"]], [2, 4])

    def test_bad_query(self) -> None:
        """A bad limit, after, serial or an unknown parameter is a 400 naming it."""
        self.assertError(self.call("GET", f"/api/deadletters?limit={MAX_LIMIT + 1}"), 400, "limit")
        self.assertError(self.call("GET", "/api/deadletters?limit=0"), 400, "limit")
        self.assertError(self.call("GET", "/api/deadletters?after=0"), 400, "after")
        self.assertError(self.call("GET", "/api/deadletters?serial=4294967296"), 400, "serial")
        self.assertError(self.call("GET", "/api/deadletters?state=x"), 400, "'state'")

    def test_max_limit_accepted(self) -> None:
        """limit may be as large as MAX_LIMIT."""
        code, _ = self.call("GET", f"/api/deadletters?limit={MAX_LIMIT}")
        self.assertEqual(code, 200)

    def test_retry(self) -> None:
        """A retry puts the dead letter back in the spool."""
        self.assertEqual(
            self.call("POST", "/api/deadletters/3/retry"), (200, {"id": 3, "status": "queued"})
        )
        self.assertEqual(self.spool.requeued, [3])

    def test_delete(self) -> None:
        """A delete forgets the dead letter."""
        self.assertEqual(
            self.call("DELETE", "/api/deadletters/3"), (200, {"id": 3, "status": "deleted"})
        )
        self.assertNotIn(3, self.spool.letters)

    def test_unknown_id(self) -> None:
        """Retry or delete of an id that is no dead letter is a 404."""
        self.assertError(self.call("POST", "/api/deadletters/99/retry"), 404, "no dead letter with id 99")
        self.assertError(self.call("DELETE", "/api/deadletters/99"), 404, "99")

    def test_bad_id(self) -> None:
        """An id that is not a whole number from 1 is a 400."""
        for text in ("0", "x", "-1", "1" * 19):
            self.assertError(self.call("DELETE", f"/api/deadletters/{text}"), 400, "id")

    def test_needs_token(self) -> None:
        """Without the token the dead letters are a 401 and the spool is not asked."""
        response, _ = self.request("GET", "/api/deadletters", headers={})
        self.assertEqual(response.code, 401)
        self.assertEqual(self.spool.list_calls, [])

    def test_spool_unavailable(self) -> None:
        """A failing spool is a 500 "spool unavailable", its reason logged, not answered."""
        self.spool.broken = True
        self.assertError(self.call("GET", "/api/deadletters"), 500, "spool unavailable")
        self.assertNotIn("/var/lib", str(self.call("POST", "/api/deadletters/1/retry")))
        self.assertIn("spool list_dead failed", self.events[0]["log_format"].format(**self.events[0]))

    def test_method_not_allowed(self) -> None:
        """GET of one dead letter is a 405 allowing DELETE."""
        response, _ = self.request("GET", "/api/deadletters/1")
        self.assertEqual(
            (response.code, response.headers.getRawHeaders(b"allow")), (405, [b"DELETE"])
        )


class NoSpoolTests(_ApiTestCase):
    """An API built without a spool."""

    def test_503(self) -> None:
        """The dead-letter routes answer 503 "this relay has no spool"."""
        self.assertError(self.call("GET", "/api/deadletters"), 503, "no spool")
        self.assertError(self.call("DELETE", "/api/deadletters/1"), 503, "no spool")

