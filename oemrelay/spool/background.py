"""
Background delivery: uploads leave the spool for their end servers.

Every ``interval`` seconds :class:`BackgroundDelivery` moves uploads older
than ``spool_max_age`` to the dead letters, then claims what is due (at most
one upload per device and connector, so each device's order holds) and
delivers each through ``deliver(connector_name, upload)``, which the service
provides; this module knows nothing of connectors.  Deliveries run side by
side: one device's slow end server never holds up another device's uploads.

After a failed try the upload waits ``retry_initial`` seconds, doubling up to
``retry_max``, and the time of its next try is stored, so the backoff
survives a restart.  A refusal the end server will repeat (a failure whose
``retryable`` is False, such as HTTP 400) or the ``max_attempts``-th failed
try moves it to the dead letters.  Only a refusal counts as one the end
server will repeat: a :class:`~oemrelay.relay.DeliveryFailed` of kind
``refused`` or ``request`` marked not ``retryable``; anything else (a
timeout, a lost connection, a raw TCP ``06 00``) is tried again.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from twisted.internet.defer import CancelledError, Deferred, DeferredList
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..relay import DeliveryFailed, Upload, describe_failure
from .store import DatabaseSpool, SpooledUpload

log = Logger(namespace="oemrelay.spool")

#: Seconds before the first retry of a spooled upload, and the most between two.
DEFAULT_RETRY_INITIAL = 1.0
DEFAULT_RETRY_MAX = 60.0


@dataclass(frozen=True)
class RetryPolicy:
    """How one connector's spooled uploads are retried."""

    #: Failed tries before an upload is dead-lettered; 0: no limit (spool_max_age bounds it).
    max_attempts: int = 0
    retry_initial: float = DEFAULT_RETRY_INITIAL
    retry_max: float = DEFAULT_RETRY_MAX

    def delay(self, failed_tries: int) -> float:
        """Seconds to wait after the ``failed_tries``-th failed try (1 or more)."""
        # The exponent is capped so a long outage cannot overflow the float.
        return min(self.retry_max, self.retry_initial * 2 ** min(failed_tries - 1, 64))

    def exhausted(self, failed_tries: int) -> bool:
        """Whether ``failed_tries`` failed tries use up ``max_attempts``."""
        return bool(self.max_attempts) and failed_tries >= self.max_attempts


Deliver = Callable[[str, Upload], Deferred[None]]

#: DeliveryFailed kinds that, marked not retryable, the end server would repeat.
_REFUSALS = frozenset({"refused", "request"})


def _refused_for_good(failure: Failure) -> bool:
    error = failure.value
    return (
        isinstance(error, DeliveryFailed)
        and error.kind in _REFUSALS
        and not getattr(error, "retryable", True)
    )


class BackgroundDelivery:
    """Delivers spooled uploads until stopped (see the module docstring)."""

    def __init__(
        self,
        spool: DatabaseSpool,
        deliver: Deliver,
        clock: IReactorTime,
        policies: Mapping[str, RetryPolicy],
        *,
        max_age: float,
        interval: float = 1.0,
        concurrency: int = 64,
        delivery_timeout: float = 60.0,
    ) -> None:
        """
        :param policies: by connector name; a spooled upload for a connector
            not in it (removed from the configuration) is dead-lettered.
        :param delivery_timeout: seconds one try may take; less than the
            spool's lease, so no other relay claims an upload being delivered.
        """
        self._spool = spool
        self._deliver = deliver
        self._clock = clock
        self._policies = dict(policies)
        self._max_age = max_age
        self._interval = interval
        self._concurrency = concurrency
        self._delivery_timeout = delivery_timeout
        self._in_flight: dict[int, Deferred[None]] = {}
        # The connector's own Deferred of each delivery, cancelled by stop().
        self._tries: dict[int, Deferred[None]] = {}
        self._loop = LoopingCall(self.run_round)
        self._loop.clock = clock
        self._running: Deferred | None = None

    def start(self) -> None:
        """Start the rounds, the first one now."""
        self._running = self._loop.start(self._interval, now=True)

    def stop(self) -> Deferred:
        """
        Stop claiming and cancel the deliveries under way (their uploads stay
        spooled, no try counted); fires once the round and they are done.
        """
        if self._loop.running:
            self._loop.stop()
        for attempt in list(self._tries.values()):
            attempt.cancel()
        waiting = [self._running] if self._running is not None else []
        return DeferredList(waiting + list(self._in_flight.values()), consumeErrors=True)

    def settled(self) -> Deferred:
        """Fires once the deliveries under way now are done (for tests and stop)."""
        return DeferredList(list(self._in_flight.values()), consumeErrors=True)

    def run_round(self) -> Deferred[None]:
        """
        Dead-letter expired uploads and start delivering what is due; fires
        once the deliveries are started, not finished.
        """
        # A round's own failure (the spool unavailable) is logged; the next round runs.
        return Deferred.fromCoroutine(self._round()).addErrback(self._round_failed)

    async def _round(self) -> None:
        expired = await self._spool.expire(self._max_age)
        if expired:
            log.warn(
                "spool: {count} uploads older than spool_max_age {max_age:g}s moved to"
                " the dead letters",
                count=expired,
                max_age=self._max_age,
            )
        room = self._concurrency - len(self._in_flight)
        if room <= 0:
            return
        for item in await self._spool.claim(room):
            delivery = Deferred.fromCoroutine(self._deliver_one(item))
            self._in_flight[item.id] = delivery
            delivery.addErrback(
                lambda failure: log.failure("bug in spooled delivery", failure)
            ).addBoth(self._finished, item.id)

    def _finished(self, _: object, row_id: int) -> None:
        del self._in_flight[row_id]

    def _round_failed(self, failure: Failure) -> None:
        log.warn("spool: delivery round failed: {reason}", reason=describe_failure(failure))

    async def _deliver_one(self, item: SpooledUpload) -> None:
        serial = item.upload.hello.serial
        policy = self._policies.get(item.connector)
        if policy is None:
            reason = f"connector {item.connector!r} is not configured"
            await self._spool.give_up(item.id, reason, tried=False)
            self._dead(item, serial, reason)
            return
        attempt = self._deliver(item.connector, item.upload)
        self._tries[item.id] = attempt
        try:
            await attempt.addTimeout(self._delivery_timeout, self._clock)
        except CancelledError:
            # Stopped: released at once, so a restarted relay need not wait out the lease.
            await self._spool.release(item.id)
            return
        except Exception:
            failure = Failure()
            reason = describe_failure(failure)
            tries = item.attempts + 1
            if _refused_for_good(failure):
                await self._spool.give_up(item.id, reason)
                self._dead(item, serial, reason)
            elif policy.exhausted(tries):
                reason = f"{reason} (try {tries} of max_attempts {policy.max_attempts})"
                await self._spool.give_up(item.id, reason)
                self._dead(item, serial, reason)
            else:
                delay = policy.delay(tries)
                await self._spool.retry_later(item.id, self._clock.seconds() + delay, reason)
                log.info(
                    "spool: device {serial} upload to connector {connector} failed"
                    " (try {tries}): {reason}; next try in {delay:g}s",
                    serial=serial,
                    connector=item.connector,
                    tries=tries,
                    reason=reason,
                    delay=delay,
                )
            return
        finally:
            del self._tries[item.id]
        await self._spool.delivered(item.id)

    def _dead(self, item: SpooledUpload, serial: int, reason: str) -> None:
        log.warn(
            "spool: device {serial} upload {id} for connector {connector} moved to"
            " the dead letters: {reason}",
            serial=serial,
            id=item.id,
            connector=item.connector,
            reason=reason,
        )
