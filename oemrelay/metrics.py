"""
The relay's Prometheus metrics, fed by the relay's events.

:class:`RelayMetrics` is a :class:`~oemrelay.events.RelayObserver`: the
service subscribes it to ``relay.observers`` and the management API serves
:meth:`RelayMetrics.exposition` at ``GET /metrics``.  No metric has a
per-device label (serial, peer): a fleet of thousands would make thousands of
series.  Labels hold only bounded values: connector names from the
configuration, fixed outcome and kind words, and protocol error reasons with
their numbers taken out, at most :data:`MAX_ERROR_REASONS` of them.

Each relay has its own :class:`~prometheus_client.CollectorRegistry`, so tests
(and two relays in one process) never share counts.  With several worker
processes the counts must be summed: :meth:`RelayMetrics.exposition` given a
``multiprocess_dir`` reads every worker's files through prometheus_client's
multiprocess collector (the workers must have ``PROMETHEUS_MULTIPROC_DIR``
set to that directory before prometheus_client is imported); gauges declare
how they add up (``livesum``: open connections of live workers).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any, Protocol

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector

from . import __version__
from .codec import Hello
from .events import RelayObserver

#: The Content-Type of :meth:`RelayMetrics.exposition`'s text: the classic
#: text format every Prometheus version scrapes (no UTF-8 metric names here).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: Distinct protocol error reasons counted by name; later ones count as ``other``.
MAX_ERROR_REASONS = 32

#: Seconds: an end server's answer, a commit, a registry call.
_DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 60)

# A number in a reason (decimal, 0x hex, or hex bytes holding a digit).
_NUMBER = re.compile(r"\b(?:0x)?[0-9a-f]*[0-9][0-9a-f]*\b", re.IGNORECASE)


def reason_label(reason: str) -> str:
    """A protocol error reason with its numbers replaced by ``N``: one label per kind of error."""
    return _NUMBER.sub("N", reason)[:80]


class SpoolSource(Protocol):
    """What the spool tells the metrics (the spool's own methods)."""

    def depth(self) -> int:
        """Uploads waiting in the spool."""

    def oldest_age(self) -> float | None:
        """Seconds the oldest waiting upload has waited; None when empty."""


class _SpoolCollector:
    """The spool's depth and oldest age, read at each scrape."""

    def __init__(self, spool: SpoolSource) -> None:
        self._spool = spool

    def collect(self) -> Iterable[GaugeMetricFamily]:
        yield GaugeMetricFamily(
            "oemrelay_spool_depth", "Uploads waiting in the spool.", value=self._spool.depth()
        )
        age = self._spool.oldest_age()
        yield GaugeMetricFamily(
            "oemrelay_spool_oldest_age_seconds",
            "Seconds the oldest upload in the spool has waited (0 when empty).",
            value=age or 0.0,
        )


class RelayMetrics(RelayObserver):
    """Counts what the relay does, for ``GET /metrics``."""

    def __init__(self, spool: SpoolSource | None = None) -> None:
        """
        :param spool: where the spool depth and oldest age are read at each
            scrape; None until the relay has a spool.
        """
        self.registry = CollectorRegistry()
        registry = self.registry
        self._open = Gauge(
            "oemrelay_device_connections_open",
            "Device connections open now.",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self._opened = Counter(
            "oemrelay_device_connections", "Device connections accepted.", registry=registry
        )
        self._sessions = Counter(
            "oemrelay_sessions",
            "Device connections ended, by how they ended.",
            ["outcome"],
            registry=registry,
        )
        self._decode_errors = Counter(
            "oemrelay_decode_errors",
            "Protocol errors from devices (each closes its connection), by reason.",
            ["reason"],
            registry=registry,
        )
        self._received = Counter(
            "oemrelay_records_received",
            "Records devices asked to commit.",
            registry=registry,
        )
        self._committed = Counter(
            "oemrelay_records_committed",
            "Records devices were told to delete after delivery.",
            registry=registry,
        )
        self._commit_seconds = Histogram(
            "oemrelay_commit_seconds",
            "Seconds from a commit request to the device being told to commit.",
            registry=registry,
            buckets=_DURATION_BUCKETS,
        )
        self._withheld = Counter(
            "oemrelay_commits_withheld",
            "Commits withheld (the device keeps and resends its records), by kind.",
            ["kind"],
            registry=registry,
        )
        self._requests = Counter(
            "oemrelay_connector_requests",
            "Tries to hand an upload to an end server, by connector and status class.",
            ["connector", "outcome"],
            registry=registry,
        )
        self._request_seconds = Histogram(
            "oemrelay_connector_request_seconds",
            "Seconds each try to an end server took, by connector.",
            ["connector"],
            registry=registry,
            buckets=_DURATION_BUCKETS,
        )
        self._retries = Counter(
            "oemrelay_connector_retries",
            "Failed tries repeated inside the commit window, by connector.",
            ["connector"],
            registry=registry,
        )
        self._registry_seconds = Histogram(
            "oemrelay_registry_call_seconds",
            "Seconds each registry call took (waiting for a pool thread included), by call.",
            ["call"],
            registry=registry,
            buckets=_DURATION_BUCKETS,
        )
        Gauge(
            "oemrelay_build_info",
            "The running oemrelay's version (always 1).",
            ["version"],
            registry=registry,
            multiprocess_mode="max",
        ).labels(__version__).set(1)
        self._reasons: set[str] = set()
        # Labelled children by label values: labels() validates and locks on
        # every call, and delivery_attempted runs once per POST.
        self._children: dict[tuple, Any] = {}
        if spool is not None:
            registry.register(_SpoolCollector(spool))

    # -- what the relay tells --------------------------------------------------

    def connection_opened(self, peer: str) -> None:
        self._opened.inc()
        self._open.inc()

    def _child(self, metric: Any, *values: str) -> Any:
        key = (metric, values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*values)
        return child

    def connection_closed(self, hello: Hello | None, peer: str, outcome: str) -> None:
        self._open.dec()
        self._child(self._sessions, outcome).inc()

    def protocol_error(self, hello: Hello | None, peer: str, reason: str) -> None:
        label = reason_label(reason)
        if label not in self._reasons:
            if len(self._reasons) >= MAX_ERROR_REASONS:
                label = "other"
            else:
                self._reasons.add(label)
        self._decode_errors.labels(label).inc()

    def upload_received(self, upload) -> None:
        self._received.inc(upload.record_count)

    def upload_committed(self, upload, seconds: float) -> None:
        self._committed.inc(upload.record_count)
        self._commit_seconds.observe(seconds)

    def commit_withheld(self, upload, kind: str, reason: str) -> None:
        self._child(self._withheld, kind).inc()

    def delivery_attempted(self, connector: str, outcome: str, seconds: float) -> None:
        self._child(self._requests, connector, outcome).inc()
        self._child(self._request_seconds, connector).observe(seconds)

    def delivery_retried(self, connector: str) -> None:
        self._child(self._retries, connector).inc()

    def registry_called(self, call: str, seconds: float) -> None:
        self._child(self._registry_seconds, call).observe(seconds)

    # -- the scrape ------------------------------------------------------------

    def exposition(self, multiprocess_dir: str | None = None) -> bytes:
        """
        Every metric in Prometheus' text format.

        :param multiprocess_dir: with workers, the ``PROMETHEUS_MULTIPROC_DIR``
            they all write to: the answer is then the whole relay's, summed.
        """
        if multiprocess_dir is None:
            return generate_latest(self.registry)
        return self.exposition_of(multiprocess_dir)

    @staticmethod
    def exposition_of(multiprocess_dir: str) -> bytes:
        """Every worker's metrics in ``multiprocess_dir``, summed, in the text format."""
        combined = CollectorRegistry()
        MultiProcessCollector(combined, path=multiprocess_dir)
        return generate_latest(combined)

