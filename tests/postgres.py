"""
A fresh PostgreSQL schema per test, on the server at ``OEMRELAY_TEST_POSTGRES``
(default ``postgresql://postgres@127.0.0.1:5432/test``).

Where no server answers the tests that need one are skipped with a message
naming the URL — unless ``OEMRELAY_REQUIRE_POSTGRES=1`` (CI sets it), where a
missing server fails them instead, so CI never passes without running them.
"""

from __future__ import annotations

import os
import secrets

from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, TestCase

from oemrelay.registry_url import url_without_password

POSTGRES_URL = os.environ.get(
    "OEMRELAY_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test"
)


async def fresh_schema_url(test: TestCase) -> str:
    """
    The URL of an empty schema of ``test``'s own, dropped when it ends.

    :raises SkipTest: if no server answers and none is required.
    """
    import psycopg

    schema = f"oemrelay_test_{secrets.token_hex(6)}"

    def admin(statement: str) -> None:
        with psycopg.connect(POSTGRES_URL, autocommit=True, connect_timeout=5) as db:
            db.execute(statement)

    try:
        await deferToThread(admin, f"CREATE SCHEMA {schema}")
    except psycopg.OperationalError as e:
        reason = (str(e).strip().splitlines() or ["no reason given"])[0]
        message = (
            f"PostgreSQL at {url_without_password(POSTGRES_URL)} is not reachable"
            f" ({reason}); set OEMRELAY_TEST_POSTGRES to a server's URL"
        )
        if os.environ.get("OEMRELAY_REQUIRE_POSTGRES") == "1":
            test.fail(message)
        raise SkipTest(message) from None
    test.addCleanup(deferToThread, admin, f"DROP SCHEMA {schema} CASCADE")
    separator = "&" if "?" in POSTGRES_URL else "?"
    return f"{POSTGRES_URL}{separator}options=-csearch_path%3D{schema}"
