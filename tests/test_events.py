"""
Tests for :mod:`oemrelay.events`: the observers' fan-out, and what the device
session and the HTTP connector tell them.
"""

from __future__ import annotations

from twisted.internet.defer import fail, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from oemrelay.codec import parse_hello
from oemrelay.config import config_from_string
from oemrelay.connectors.http import HttpConnector
from oemrelay.connectors.http_client import Answer
from oemrelay.events import Observers, RelayObserver
from oemrelay.relay import DeliveryFailed, DeviceProfile, Relay, Upload

from .test_session import (
    COMMIT,
    DART_HELLO,
    DATA_2,
    IDLE_TIMEOUT,
    PEER_TEXT,
    SessionTestMixin,
)


class Recorder(RelayObserver):
    """Keeps every event it is told, as (name, arguments)."""

    def __init__(self) -> None:
        self.events: list[tuple] = []

    def names(self) -> list[str]:
        return [event[0] for event in self.events]


# Every event method overridden (so Observers binds each), recording its call.
for _name in [n for n in vars(RelayObserver) if not n.startswith("_")]:
    setattr(Recorder, _name, lambda self, *args, _name=_name: self.events.append((_name, *args)))


class ObserversTests(SynchronousTestCase):
    """Events fanned out to the observers subscribed."""

    def test_each_observer_told_in_order(self) -> None:
        """Two observers each get the event, the first subscribed first."""
        order = []

        class First(RelayObserver):
            def delivery_retried(self, connector: str) -> None:
                order.append(("first", connector))

        class Second(RelayObserver):
            def delivery_retried(self, connector: str) -> None:
                order.append(("second", connector))

        observers = Observers()
        observers.subscribe(First())
        observers.subscribe(Second())
        observers.delivery_retried("main")
        self.assertEqual(order, [("first", "main"), ("second", "main")])

    def test_unsubscribed_observer_not_told(self) -> None:
        """After the call subscribe returned, the observer hears nothing more."""
        recorder = Recorder()
        observers = Observers()
        stop = observers.subscribe(recorder)
        observers.delivery_retried("a")
        stop()
        observers.delivery_retried("b")
        stop()  # a second call is harmless
        self.assertEqual(recorder.events, [("delivery_retried", "a")])

    def test_failing_observer_logged_and_others_still_told(self) -> None:
        """An observer that raises is logged as a bug; the next observer is still told and the caller is not hurt."""
        logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)

        class Broken(RelayObserver):
            def delivery_retried(self, connector: str) -> None:
                raise ZeroDivisionError()

        recorder = Recorder()
        observers = Observers()
        observers.subscribe(Broken())
        observers.subscribe(recorder)
        observers.delivery_retried("main")
        self.assertEqual(recorder.events, [("delivery_retried", "main")])
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        self.assertTrue(any("delivery_retried" in str(e.get("event")) for e in logged))

    def test_no_observer_is_a_no_op(self) -> None:
        """With nobody subscribed every event can be called and does nothing."""
        observers = Observers()
        observers.connection_closed(None, "peer", "device")
        observers.delivery_attempted("main", "2xx", 0.1)


class SessionEventTests(SessionTestMixin, SynchronousTestCase):
    """What a device connection tells the relay's observers."""

    def make_relay(self) -> Relay:
        self.recorder = Recorder()
        observers = Observers()
        observers.subscribe(self.recorder)
        return Relay({"main": self.connector}, "main", observers=observers)

    def test_commit_told_with_its_latency(self) -> None:
        """hello, frames, the upload and its commit are told in order; the latency is the clock's time from request to answer."""
        self.greet()
        self.send(DATA_2, COMMIT)
        self.clock.advance(1.5)
        self.link.answer().callback(None)
        names = self.recorder.names()
        self.assertEqual(
            names,
            [
                "connection_opened",
                "device_connected",
                "frame_received",
                "frame_received",
                "upload_received",
                "frame_received",
                "upload_committed",
            ],
        )
        upload, seconds = self.recorder.events[-1][1:]
        self.assertEqual(len(upload.records), 2)
        self.assertEqual(seconds, 1.5)

    def test_withheld_told_with_its_kind_and_outcome(self) -> None:
        """A refused delivery is told as withheld with the failure's kind; the close's outcome is withheld."""
        self.greet()
        self.send(DATA_2, COMMIT)
        self.link.answer().errback(DeliveryFailed("end server answered 503", "refused"))
        self.transport.loseConnection()
        (withheld,) = [e for e in self.recorder.events if e[0] == "commit_withheld"]
        self.assertEqual(withheld[2:], ("refused", "end server answered 503"))
        self.assertEqual(self.recorder.events[-1], ("connection_closed", self.hello_value(), PEER_TEXT, "withheld"))

    def test_timeout_kind(self) -> None:
        """A delivery that outlives commit_timeout is withheld with kind timeout."""
        self.greet()
        self.send(DATA_2, COMMIT)
        self.clock.advance(20)
        (withheld,) = [e for e in self.recorder.events if e[0] == "commit_withheld"]
        self.assertEqual(withheld[2], "timeout")

    def test_protocol_error_outcome(self) -> None:
        """Bad input is told as a protocol error and the close's outcome says so."""
        self.send(b"\x02\x55\x04\x00\x00")  # data before hello
        self.transport.loseConnection()
        self.assertIn("protocol_error", self.recorder.names())
        self.assertEqual(self.recorder.events[-1][1:], (None, PEER_TEXT, "protocol_error"))

    def test_device_closing_outcome(self) -> None:
        """A device that hangs up ends with outcome device."""
        self.greet()
        self.transport.loseConnection()
        self.assertEqual(self.recorder.events[-1][3], "device")

    def test_idle_outcome(self) -> None:
        """A connection closed for silence ends with outcome idle."""
        self.greet()
        self.clock.advance(IDLE_TIMEOUT)
        self.protocol.connectionLost(None)
        self.assertEqual(self.recorder.events[-1][3], "idle")

    def test_end_server_lost_outcome(self) -> None:
        """A link lost on its own ends the connection with outcome end_server_lost."""
        self.greet()
        self.link.on_lost("gone")
        self.transport.loseConnection()
        self.assertEqual(self.recorder.events[-1][3], "end_server_lost")

    def test_drained_outcome(self) -> None:
        """A connection drained at shutdown ends with outcome drained."""
        self.greet()
        self.protocol.session.drain()
        self.transport.loseConnection()
        self.assertEqual(self.recorder.events[-1][3], "drained")

    def hello_value(self):
        return self.protocol.session.hello


class HttpAttemptEventTests(SynchronousTestCase):
    """The HTTP connector tells each POST's outcome class and duration."""

    def deliver_with(self, answer_code: int | None, error: Exception | None = None):
        config = config_from_string(
            "[connector:main]\ntype = http\nurl = http://end.example/in\n"
        ).connectors["main"]
        clock = Clock()
        recorder = Recorder()
        observers = Observers()
        observers.subscribe(recorder)

        class Client:
            def post(self, *args, **kwargs):
                if error is not None:
                    clock.advance(0.5)
                    return fail(error)
                clock.advance(0.25)  # until the answer's body was read
                return succeed(Answer(answer_code, {}, b"", True))

        connector = HttpConnector(config, Client(), clock, observers=observers)
        upload = Upload(parse_hello(DART_HELLO[5:]), (), (), 0.0)
        result = connector.deliver(upload, DeviceProfile())
        return recorder, result

    def test_2xx(self) -> None:
        """An accepted POST is told as 2xx with the time until its body was read."""
        recorder, result = self.deliver_with(204)
        self.successResultOf(result)
        self.assertEqual(recorder.events, [("delivery_attempted", "main", "2xx", 0.25)])

    def test_5xx(self) -> None:
        """A 503 is told as 5xx (and the delivery fails)."""
        recorder, result = self.deliver_with(503)
        self.failureResultOf(result, DeliveryFailed)
        self.assertEqual(recorder.events[0][2], "5xx")

    def test_connection_error(self) -> None:
        """A POST that fails before an answer is told as error, with its kind unreachable."""
        recorder, result = self.deliver_with(None, ConnectionRefusedError("refused"))
        failure = self.failureResultOf(result, DeliveryFailed)
        self.assertEqual(failure.value.kind, "unreachable")
        self.assertEqual(recorder.events, [("delivery_attempted", "main", "error", 0.5)])
