"""
Tests for :mod:`oemrelay.logformat` (JSON log lines), how ``[relay]
log_format`` reaches twistd, and the operations keys of the configuration:
``log_format``, ``[api] metrics_public``, a file with a byte-order mark.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from twisted.scripts._twistd_unix import ServerOptions
from twisted.trial.unittest import SynchronousTestCase

from oemrelay import logformat
from oemrelay.config import config_from_string, load_config
from oemrelay.logformat import json_line, json_observer

from .test_config import FILE_CONNECTOR, ConfigErrorAssertions


class JsonLineTests(SynchronousTestCase):
    """Each event is one JSON object on one line."""

    def logged(self, emit) -> list[dict]:
        out = io.StringIO()
        emit(Logger(namespace="oemrelay.session", observer=json_observer(out)))
        lines = out.getvalue().splitlines()
        return [json.loads(line) for line in lines]

    def test_fields(self) -> None:
        """time, level, namespace, the formatted message, then the event's own fields."""
        (record,) = self.logged(
            lambda log: log.warn(
                "device {serial} from {peer}: closing: {reason}",
                serial=129336,
                peer="10.0.0.1:4000",
                reason="bad sync bytes 0255",
            )
        )
        self.assertEqual(record["level"], "warn")
        self.assertEqual(record["namespace"], "oemrelay.session")
        self.assertEqual(
            record["message"], "device 129336 from 10.0.0.1:4000: closing: bad sync bytes 0255"
        )
        self.assertEqual(
            (record["serial"], record["peer"], record["reason"]),
            (129336, "10.0.0.1:4000", "bad sync bytes 0255"),
        )
        self.assertRegex(record["time"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+\+00:00$")
        self.assertFalse([key for key in record if key.startswith("log_")])

    def test_newline_in_a_field_stays_on_one_line(self) -> None:
        """A field holding a newline is escaped, so the event stays one line."""
        out = io.StringIO()
        Logger(observer=json_observer(out)).info("{text}", text="a\nb")
        self.assertEqual(out.getvalue().count("\n"), 1)
        self.assertEqual(json.loads(out.getvalue())["text"], "a\nb")

    def test_unserialisable_field_as_text(self) -> None:
        """A field JSON cannot hold is written as its text."""
        (record,) = self.logged(lambda log: log.info("{where}", where=Path("/tmp/x")))
        self.assertEqual(record["where"], "/tmp/x")

    def test_failure_traceback(self) -> None:
        """log.failure's traceback is in "failure", the level critical."""
        try:
            1 / 0
        except ZeroDivisionError:
            failure = Failure()
        (record,) = self.logged(lambda log: log.failure("bug", failure))
        self.assertEqual(record["level"], "critical")
        self.assertIn("ZeroDivisionError", record["failure"])

    def test_legacy_event(self) -> None:
        """A legacy log.msg event keeps its text as message and drops its bookkeeping keys."""
        line = json_line(
            {
                "message": ("DeviceFactory starting on 20500",),
                "isError": 0,
                "system": "-",
                "log_format": "{log_text}",
                "log_text": "DeviceFactory starting on 20500",
                "log_level": LogLevel.info,
                "log_namespace": "log_legacy",
                "log_time": 0.0,
            }
        )
        self.assertEqual(
            json.loads(line),
            {
                "time": "1970-01-01T00:00:00+00:00",
                "level": "info",
                "namespace": "log_legacy",
                "message": "DeviceFactory starting on 20500",
            },
        )


class TwistdLoggerTests(SynchronousTestCase):
    """[relay] log_format = json sets twistd's --logger; text leaves twistd's own."""

    def setUp(self) -> None:
        self.patch(logformat, "destination", "-")

    def parse(self, log_format: str, *twistd_args: str) -> ServerOptions:
        path = self.mktemp()
        Path(path).write_text(f"[relay]\nlog_format = {log_format}\n" + FILE_CONNECTOR)
        options = ServerOptions()
        options.parseOptions([*twistd_args, "oemrelay", "-c", path])
        return options

    def test_json_on_stdout(self) -> None:
        """json with --nodaemon: twistd's logger is the JSON observer, on stdout."""
        options = self.parse("json", "--nodaemon")
        self.assertIs(options["logger"], logformat.twistd_json_observer)
        self.assertEqual(logformat.destination, "-")

    def test_json_to_logfile(self) -> None:
        """json with --logfile: the JSON lines go to that file."""
        path = self.mktemp()
        options = self.parse("json", "--nodaemon", f"--logfile={path}")
        self.assertIs(options["logger"], logformat.twistd_json_observer)
        self.assertEqual(logformat.destination, path)

    def test_json_daemon_without_logfile(self) -> None:
        """json as a daemon without --logfile: twistd.log, where twistd itself would write."""
        self.parse("json")
        self.assertEqual(logformat.destination, "twistd.log")

    def test_text_leaves_twistd_alone(self) -> None:
        """text: no logger chosen, twistd writes its own lines."""
        self.assertIsNone(self.parse("text", "--nodaemon")["logger"])

    def test_explicit_logger_wins(self) -> None:
        """A --logger given on the command line is kept."""
        options = self.parse("json", "--nodaemon", "--logger=oemrelay.logformat.json_line")
        self.assertIs(options["logger"], json_line)


class OpsConfigTests(ConfigErrorAssertions, SynchronousTestCase):
    """log_format, metrics_public, and a byte-order mark."""

    def test_defaults(self) -> None:
        """Text logs; /metrics behind the token."""
        config = config_from_string("[api]\nlisten = tcp:8080\ntoken = t\n" + FILE_CONNECTOR)
        self.assertEqual(config.relay.log_format, "text")
        self.assertFalse(config.api.metrics_public)

    def test_metrics_public(self) -> None:
        """metrics_public = true is read as True."""
        config = config_from_string(
            "[api]\nlisten = tcp:8080\ntoken = t\nmetrics_public = true\n" + FILE_CONNECTOR
        )
        self.assertTrue(config.api.metrics_public)

    def test_bad_metrics_public(self) -> None:
        """metrics_public = maybe is one line naming section and key."""
        self.assert_error(
            "[api]\nlisten = tcp:8080\ntoken = t\nmetrics_public = maybe\n" + FILE_CONNECTOR,
            "[api] metrics_public: ",
            "true or false",
        )

    def test_bad_log_format(self) -> None:
        """log_format = xml is one line naming section, key and the choices."""
        self.assert_error(
            "[relay]\nlog_format = xml\n" + FILE_CONNECTOR, "[relay] log_format: ", "text or json"
        )

    def test_byte_order_mark(self) -> None:
        """A file saved by Notepad with a UTF-8 byte-order mark reads as without one."""
        text = "[relay]\nlog_format = json\n" + FILE_CONNECTOR
        path = self.mktemp()
        Path(path).write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
        self.assertEqual(load_config(path).relay, config_from_string(text).relay)
