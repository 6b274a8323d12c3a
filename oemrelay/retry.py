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

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger

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


async def deliver_with_retries(
    attempt: Callable[[], Deferred[None]],
    policy: RetryPolicy,
    deadline: float,
    *,
    connector: str,
    serial: int,
    observers: RelayObserver,
) -> None:
    """
    Call ``attempt`` until it succeeds, fails for good, or the next try
    would start at or after ``deadline`` (clock seconds).

    A failure's ``retry_after`` replaces the backoff; when it does not fit
    before ``deadline`` the loop gives up at once rather than hold the device
    past its commit window.

    :raises DeliveryFailed: the last failure, its reason saying how many
        attempts were made when there were several.
    """
    clock = policy.clock
    started = clock.seconds()
    attempts = 1
    while True:
        try:
            await attempt()
        except relay.DeliveryFailed as failure:
            wait = _wait_before_retry(failure, policy, attempts)
            if wait is None or clock.seconds() + wait >= deadline:
                if attempts == 1:
                    raise
                raise failure.after_attempts(attempts) from None
            observers.delivery_retried(connector)
            await deferLater(clock, wait)
            attempts += 1
            continue
        if attempts > 1:
            log.info(
                "device {serial}: connector {connector} accepted the upload after"
                " {attempts} attempts in {seconds:.1f}s",
                serial=serial,
                connector=connector,
                attempts=attempts,
                seconds=clock.seconds() - started,
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
