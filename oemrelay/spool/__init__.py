"""
The durable spool: uploads kept on disk (SQLite) or in PostgreSQL until their
end servers accept them, delivered in the background, and the dead letters.

* :mod:`.stored_upload`: an upload as stored, and rebuilt exactly;
* :mod:`.store`: the table, on SQLite or PostgreSQL (:class:`DatabaseSpool`,
  :class:`SpoolFull`, :class:`DeadLetter`, :class:`SpoolStats`);
* :mod:`.background`: the deliveries out of it (:class:`BackgroundDelivery`).

The route hands uploads to the spool through :meth:`DatabaseSpool.put`;
metrics and readiness read :meth:`DatabaseSpool.stats` and
:meth:`DatabaseSpool.check_writable`; the API lists, retries and deletes the
dead letters.
"""

from __future__ import annotations

from typing import Protocol

from twisted.internet.defer import Deferred

from ..relay import Upload
from .background import BackgroundDelivery, RetryPolicy
from .store import DatabaseSpool, DeadLetter, SpooledUpload, SpoolError, SpoolFull, SpoolStats

__all__ = [
    "BackgroundDelivery",
    "DatabaseSpool",
    "DeadLetter",
    "RetryPolicy",
    "Spool",
    "SpoolError",
    "SpoolFull",
    "SpoolStats",
    "SpooledUpload",
]


class Spool(Protocol):
    """What the device path asks of the spool."""

    def put(self, upload: Upload, connectors: tuple[str, ...]) -> Deferred[None]:
        """
        Durably keep ``upload`` for later delivery to each of ``connectors``;
        fires once fsync'd (SQLite) or committed (PostgreSQL); fails with
        :class:`SpoolFull` when spool_max_records is reached.
        """
