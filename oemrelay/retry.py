"""
Retrying one connector's delivery inside the commit window.

A device waits ``commit_timeout`` for its commit answer; a transient refusal
(a 503, a reset connection) need not cost it a reconnect if a second try
fits in that window.  Whether a failure is worth repeating is the failure's
own property (:attr:`~oemrelay.relay.DeliveryFailed.retryable`, and the end
server's :attr:`~oemrelay.relay.DeliveryFailed.retry_after`), so every
connector opts in the same way and the loop lives here alone, with its clock
and random source injected.

One log line per upload that needed retries; a final failure is logged by
the session, which withholds the commit, with the number of attempts in its
reason.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from . import relay  # relay imports this module: names are read at call time
from .events import RelayObserver

log = Logger(namespace="oemrelay.retry")


@dataclass(frozen=True)
class RetryPolicy:
    """
    Jittered exponential backoff: the n-th retry waits between half and all
    of ``min(maximum, initial * 2**(n-1))`` seconds.  ``maximum = 0`` turns
    retries off.
    """

    clock: IReactorTime
    initial: float = 0.5
    maximum: float = 5.0
    #: Returns a float in [0, 1); tests pass a constant.
    random: Callable[[], float] = field(default=random.random)

    @property
    def enabled(self) -> bool:
        """Whether failures are tried again at all."""
        return self.maximum > 0

    def backoff(self, retry: int) -> float:
        """Seconds to wait before retry number ``retry`` (1 for the first)."""
        ceiling = min(self.maximum, self.initial * 2 ** (retry - 1))
        return ceiling / 2 + self.random() * ceiling / 2


def deliver_with_retries(
    attempt: Callable[[], Deferred[None]],
    policy: RetryPolicy,
    deadline: float,
    *,
    connector: str,
    serial: int,
    observers: RelayObserver,
) -> Deferred[None]:
    """
    Call ``attempt`` until it succeeds, fails for good, or the next try
    would start at or after ``deadline`` (clock seconds).

    A failure's ``retry_after`` replaces the backoff; when it does not fit
    before ``deadline`` the loop gives up at once rather than hold the device
    past its commit window.

    The first attempt's Deferred is returned as it is, with one errback: the
    loop below starts only after a failure (most uploads need one try).
    Cancelling the result cancels the attempt or the wait under way.

    :return: fires when an attempt succeeded; fails with the last
        :class:`~oemrelay.relay.DeliveryFailed`, its reason saying how many
        attempts were made when there were several.
    """
    started = policy.clock.seconds()
    try:
        first = attempt()
    except Exception:
        first = fail()
    return first.addErrback(
        _retry_after_failure, attempt, policy, deadline, started, connector, serial, observers
    )


def _retry_after_failure(failure: Failure, *context: object) -> Deferred[None]:
    # ``context`` is _Retries' fields, carried as the errback's arguments so
    # the common case (the first attempt succeeds) builds nothing more.
    failure.trap(relay.DeliveryFailed)  # anything else is not retried
    return Deferred.fromCoroutine(_Retries(*context).after(failure.value))


@dataclass(frozen=True, slots=True)
class _Retries:
    """One upload's retries to one connector, once its first attempt failed."""

    attempt: Callable[[], Deferred[None]]
    policy: RetryPolicy
    deadline: float
    started: float
    connector: str
    serial: int
    observers: RelayObserver

    async def after(self, failure: relay.DeliveryFailed) -> None:
        """Retry after the first attempt failed with ``failure``."""
        clock = self.policy.clock
        attempts = 1
        while True:
            wait = _wait_before_retry(failure, self.policy, attempts)
            if wait is None or clock.seconds() + wait >= self.deadline:
                if attempts == 1:
                    raise failure
                raise failure.after_attempts(attempts) from None
            self.observers.delivery_retried(self.connector)
            await deferLater(clock, wait)
            attempts += 1
            try:
                await self.attempt()
            except relay.DeliveryFailed as error:
                failure = error
                continue
            log.info(
                "device {serial}: connector {connector} accepted the upload after"
                " {attempts} attempts in {seconds:.1f}s",
                serial=self.serial,
                connector=self.connector,
                attempts=attempts,
                seconds=clock.seconds() - self.started,
            )
            return


def _wait_before_retry(
    failure: relay.DeliveryFailed, policy: RetryPolicy, attempts: int
) -> float | None:
    """Seconds to wait before trying again, or None: do not."""
    if not (failure.retryable and policy.enabled):
        return None
    if failure.retry_after is not None:
        return failure.retry_after
    return policy.backoff(attempts)
