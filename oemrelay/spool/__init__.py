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

from .background import BackgroundDelivery, RetryPolicy
from .store import (
    DatabaseSpool,
    DeadLetter,
    LatestSpoolFigures,
    SpooledUpload,
    SpoolError,
    SpoolFull,
    SpoolStats,
)

__all__ = [
    "BackgroundDelivery",
    "DatabaseSpool",
    "DeadLetter",
    "LatestSpoolFigures",
    "RetryPolicy",
    "SpoolError",
    "SpoolFull",
    "SpoolStats",
    "SpooledUpload",
]

