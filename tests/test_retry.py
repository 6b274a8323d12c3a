"""
Tests for :mod:`oemrelay.retry`: the backoff and the retry loop inside the
commit window, on a fake clock with a fixed random source.
"""

from __future__ import annotations

from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from oemrelay.events import RelayObserver
from oemrelay.relay import DeliveryFailed
from oemrelay.retry import RetryPolicy, deliver_with_retries


def transient(retry_after: float | None = None) -> DeliveryFailed:
    """A failure worth another try."""
    return DeliveryFailed("end answered 503", retryable=True, retry_after=retry_after)


class Retries(RelayObserver):
    """Counts delivery_retried per connector."""

    def __init__(self) -> None:
        self.connectors: list[str] = []

    def delivery_retried(self, connector: str) -> None:
        self.connectors.append(connector)


class Attempts:
    """An attempt callable answering from a script: None succeeds, a failure fails."""

    def __init__(self, *script: DeliveryFailed | None) -> None:
        self.script = list(script)
        self.times: list[float] = []

    def __call__(self) -> Deferred[None]:
        self.times.append(self.clock.seconds())
        outcome = self.script.pop(0)
        return succeed(None) if outcome is None else fail(outcome)


class BackoffTests(SynchronousTestCase):
    """RetryPolicy.backoff: doubled per retry, capped, jittered within [half, all]."""

    def test_first_retry_between_half_and_initial(self) -> None:
        """The first retry waits half of retry_initial at random 0, nearly all of it near 1."""
        self.assertEqual(RetryPolicy(Clock(), 0.5, 5, lambda: 0.0).backoff(1), 0.25)
        self.assertAlmostEqual(RetryPolicy(Clock(), 0.5, 5, lambda: 0.999).backoff(1), 0.49975)

    def test_doubles_per_retry(self) -> None:
        """Each retry's ceiling is twice the one before."""
        policy = RetryPolicy(Clock(), 0.5, 100, lambda: 1.0)
        self.assertEqual([policy.backoff(n) for n in (1, 2, 3, 4)], [0.5, 1.0, 2.0, 4.0])

    def test_capped_at_maximum(self) -> None:
        """The ceiling never passes retry_max."""
        policy = RetryPolicy(Clock(), 0.5, 5, lambda: 1.0)
        self.assertEqual(policy.backoff(4), 4.0)
        self.assertEqual(policy.backoff(5), 5.0)
        self.assertEqual(policy.backoff(30), 5.0)

    def test_zero_maximum_disables(self) -> None:
        """retry_max 0 turns retries off; any positive maximum leaves them on."""
        self.assertFalse(RetryPolicy(Clock(), 0.5, 0).enabled)
        self.assertTrue(RetryPolicy(Clock(), 0.5, 0.001).enabled)


class DeliverWithRetriesTests(SynchronousTestCase):
    """deliver_with_retries repeats retryable failures while the window lasts."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.retries = Retries()
        self.policy = RetryPolicy(self.clock, 0.5, 5, lambda: 1.0)
        self.logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)

    def deliver(self, attempts: Attempts, deadline: float = 20.0, policy: RetryPolicy | None = None) -> Deferred:
        attempts.clock = self.clock
        return deliver_with_retries(
            attempts,
            policy or self.policy,
            deadline,
            connector="web",
            serial=7,
            observers=self.retries,
        )

    def test_success_first_time(self) -> None:
        """An accepted first attempt is not repeated, counted or logged."""
        attempts = Attempts(None)
        self.successResultOf(self.deliver(attempts))
        self.assertEqual(attempts.times, [0.0])
        self.assertEqual(self.retries.connectors, [])
        self.assertEqual(len(self.logged), 0)

    def test_retryable_failure_retried_after_backoff(self) -> None:
        """A retryable failure is tried again after the backoff, counted, and logged once on success."""
        attempts = Attempts(transient(), transient(), None)
        done = self.deliver(attempts)
        self.clock.advance(0.5)
        self.assertNoResult(done)
        self.clock.advance(1.0)
        self.successResultOf(done)
        self.assertEqual(attempts.times, [0.0, 0.5, 1.5])
        self.assertEqual(self.retries.connectors, ["web", "web"])
        [line] = self.logged
        self.assertEqual((line["attempts"], line["serial"], line["connector"]), (3, 7, "web"))

    def test_not_retryable_raised_at_once(self) -> None:
        """A failure that is not retryable (a 400) is raised as it is, after one attempt."""
        refusal = DeliveryFailed("end answered 400")
        attempts = Attempts(refusal)
        failure = self.failureResultOf(self.deliver(attempts), DeliveryFailed)
        self.assertIs(failure.value, refusal)
        self.assertEqual(self.retries.connectors, [])

    def test_retries_off(self) -> None:
        """With retry_max 0 a retryable failure is raised after one attempt."""
        attempts = Attempts(transient())
        self.failureResultOf(self.deliver(attempts, policy=RetryPolicy(self.clock, 0.5, 0)))
        self.assertEqual(attempts.times, [0.0])

    def test_retry_after_replaces_backoff(self) -> None:
        """The end server's Retry-After is waited instead of the backoff."""
        attempts = Attempts(transient(retry_after=3), None)
        done = self.deliver(attempts)
        self.clock.advance(2.9)
        self.assertNoResult(done)
        self.clock.advance(0.1)
        self.successResultOf(done)
        self.assertEqual(attempts.times, [0.0, 3.0])

    def test_retry_after_past_window_gives_up_now(self) -> None:
        """A Retry-After that ends after the window gives up at once, waiting for nothing."""
        attempts = Attempts(transient(retry_after=25))
        self.failureResultOf(self.deliver(attempts, deadline=20), DeliveryFailed)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.retries.connectors, [])

    def test_retry_ending_at_deadline_not_started(self) -> None:
        """A retry due exactly at the deadline is not made; one just before it is."""
        at_deadline = Attempts(transient(retry_after=2))
        self.failureResultOf(self.deliver(at_deadline, deadline=2.0), DeliveryFailed)
        before = Attempts(transient(retry_after=2), None)
        done = self.deliver(before, deadline=2.001)
        self.clock.advance(2)
        self.successResultOf(done)

    def test_final_failure_names_attempts(self) -> None:
        """The failure raised after retries keeps its kind and says how many attempts were made."""
        attempts = Attempts(transient(), DeliveryFailed("end answered 503", "timeout", retryable=True))
        done = self.deliver(attempts, deadline=0.6)
        self.clock.advance(0.5)
        failure = self.failureResultOf(done, DeliveryFailed)
        self.assertEqual(str(failure.value), "end answered 503 (after 2 attempts)")
        self.assertEqual(failure.value.kind, "timeout")

    def test_cancel_while_waiting_stops_timer(self) -> None:
        """Cancelling (commit_timeout ran out) during a backoff leaves no timer and no further attempt."""
        attempts = Attempts(transient(), None)
        done = self.deliver(attempts)
        done.cancel()
        self.failureResultOf(done)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(attempts.times, [0.0])

    def test_first_attempt_deferred_returned_on_success(self) -> None:
        """No loop runs for an accepted first attempt: its own Deferred is the answer."""
        answer: Deferred[None] = Deferred()
        done = deliver_with_retries(
            lambda: answer, self.policy, 20.0, connector="web", serial=7, observers=self.retries
        )
        self.assertIs(done, answer)
        answer.callback(None)
        self.assertIsNone(self.successResultOf(done))

    def test_other_errors_not_retried(self) -> None:
        """A failure that is not a DeliveryFailed (a bug) passes through after one attempt."""
        calls = []

        def attempt() -> Deferred[None]:
            calls.append(self.clock.seconds())
            return fail(ZeroDivisionError("oops"))

        done = deliver_with_retries(
            attempt, self.policy, 20.0, connector="web", serial=7, observers=self.retries
        )
        self.failureResultOf(done, ZeroDivisionError)
        self.assertEqual(calls, [0.0])
        self.assertEqual(self.retries.connectors, [])

    def test_synchronous_raise_retried(self) -> None:
        """An attempt raising DeliveryFailed instead of failing its Deferred is retried alike."""
        outcomes = [transient(), None]

        def attempt() -> Deferred[None]:
            outcome = outcomes.pop(0)
            if outcome is not None:
                raise outcome
            return succeed(None)

        done = deliver_with_retries(
            attempt, self.policy, 20.0, connector="web", serial=7, observers=self.retries
        )
        self.assertNoResult(done)
        self.clock.advance(0.5)
        self.successResultOf(done)
        self.assertEqual(self.retries.connectors, ["web"])

    def test_cancel_during_first_attempt_reaches_it(self) -> None:
        """Cancelling while the first attempt is under way cancels that attempt's Deferred."""
        answer: Deferred[None] = Deferred()
        done = deliver_with_retries(
            lambda: answer, self.policy, 20.0, connector="web", serial=7, observers=self.retries
        )
        done.cancel()
        self.failureResultOf(answer, CancelledError)
        self.assertEqual(self.clock.getDelayedCalls(), [])
