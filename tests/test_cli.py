"""
Tests for the ``oemrelay`` command (oemrelay.cli): decode, check-config and
simulate, with bad input to each; one end-to-end test runs the simulator as
a subprocess against the real daemon.
"""

from __future__ import annotations

import io
import json
import os
import sys

from twisted.internet.task import Clock
from twisted.internet.protocol import ProcessProtocol
from twisted.trial.unittest import SynchronousTestCase

from oemrelay.cli import (
    SPARE_FDS,
    CommandError,
    Progress,
    build_parser,
    check_fd_budget,
    client_endpoint_factory,
    run,
    summary_text,
)
from oemrelay.codec import COMMIT_REQUEST, Hello, parse_data_records
from oemrelay.oem_json import oem_document
from oemrelay.simulator import FleetStats

from .test_end_to_end import LISTEN, PROJECT, START_TIMEOUT, _RelayTestCase, unused_port
from .vectors import capture, payload

DART = capture("hello-49-byte-dart")
DENMARK = capture("data-0x04-2-records-2021-denmark")
AUCKLAND = capture("data-0x04-12-records-2017-auckland")


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def command(*argv: str, stdin: bytes = b"") -> tuple[int, str, str]:
    """Run ``oemrelay argv``: exit status, stdout and stderr."""
    stdout, stderr = io.StringIO(), io.StringIO()
    try:
        status = run(list(argv), stdout, stderr, io.BytesIO(stdin))
    except SystemExit as exit:  # argparse
        status = exit.code
    return status, stdout.getvalue(), stderr.getvalue()


class _FileMixin:
    def write(self, data: bytes | str, name: str = "capture") -> str:
        """A new file holding ``data``; its path."""
        path = os.path.join(self.mktemp())
        os.makedirs(path)
        path = os.path.join(path, name)
        with open(path, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        return path


class DecodeTests(_FileMixin, SynchronousTestCase):
    """``oemrelay decode``."""

    def assert_one_line_error(self, result, *words: str) -> None:
        status, out, err = result
        self.assertEqual(status, 1)
        self.assertEqual(out, "")
        self.assertEqual(len(err.splitlines()), 1, err)
        self.assertTrue(err.startswith("oemrelay decode: "), err)
        for word in words:
            self.assertIn(word, err)

    def test_hex_argument_is_the_posted_document(self) -> None:
        """Hex with a hello prints exactly the document the HTTP connector would post."""
        hello = Hello(129336, "353323081669730", "89610185001824844630", 34, 2, 1, 9)
        status, out, _ = command("decode", (DART + DENMARK).hex())
        self.assertEqual(status, 0)
        expected = oem_document(hello, parse_data_records(payload("data-0x04-2-records-2021-denmark")))
        self.assertEqual(out, expected.decode() + "\n")

    def test_spaces_newlines_and_comments(self) -> None:
        """Hex split by spaces and newlines, with '#' comment lines, decodes the same."""
        text = DENMARK.hex()
        spaced = "# a capture\n" + " ".join(text[i:i + 2] for i in range(0, len(text), 2))
        spaced = spaced[:40] + "\n" + spaced[40:]
        self.assertEqual(command("decode", spaced)[1], command("decode", text)[1])

    def test_without_hello_serial_zero_or_given(self) -> None:
        """Records without a hello are under serial 0, or the --serial given."""
        self.assertEqual(json.loads(command("decode", DENMARK.hex())[1])["SerNo"], 0)
        self.assertEqual(json.loads(command("decode", DENMARK.hex(), "--serial", "77")[1])["SerNo"], 77)

    def test_one_document_per_upload(self) -> None:
        """Each commit request ends an upload: two uploads print two documents."""
        status, out, _ = command("decode", (DART + DENMARK + COMMIT_REQUEST + AUCKLAND).hex())
        documents = [json.loads(line) for line in out.splitlines()]
        self.assertEqual([len(d["Records"]) for d in documents], [2, 12])
        self.assertEqual({d["SerNo"] for d in documents}, {129336})

    def test_files_stdin_and_binary(self) -> None:
        """A hex file, a binary file and stdin ('-') give the same output."""
        expected = command("decode", DENMARK.hex())[1]
        self.assertEqual(command("decode", self.write(DENMARK.hex() + "\n"))[1], expected)
        self.assertEqual(command("decode", self.write(DENMARK))[1], expected)
        self.assertEqual(command("decode", "-", stdin=DENMARK)[1], expected)

    def test_capture_file_format(self) -> None:
        """The project's capture file decodes: every data capture in it appears."""
        status, out, _ = command("decode", str(PROJECT / "tests" / "data" / "dm-captures.txt"))
        self.assertEqual(status, 0)
        seqs = {r["SeqNo"] for line in out.splitlines() for r in json.loads(line)["Records"]}
        self.assertTrue({565, 566, 518, 529, 894124, 13, 32} <= seqs)

    def test_bad_hex(self) -> None:
        """A non-hex character is one line naming it."""
        self.assert_one_line_error(command("decode", "0255zz"), "'z'")

    def test_odd_digits(self) -> None:
        """An odd number of hex digits is one line."""
        self.assert_one_line_error(command("decode", DENMARK.hex()[:-1]), "odd")

    def test_truncated_frame(self) -> None:
        """A frame cut short is one line saying how many bytes are left over."""
        self.assert_one_line_error(command("decode", DENMARK[:-3].hex()), "incomplete")

    def test_bad_sync(self) -> None:
        """Bytes that are not frames are one line."""
        self.assert_one_line_error(command("decode", "ffff050000"), "sync")

    def test_bad_record(self) -> None:
        """A record declaring more bytes than its message has is one line naming the frame."""
        broken = bytearray(DENMARK)
        broken[5] = 0xFF  # first record's length
        self.assert_one_line_error(command("decode", bytes(broken).hex()), "frame 1", "0x04")

    def test_no_records(self) -> None:
        """Frames with no data records are an error, not an empty output."""
        self.assert_one_line_error(command("decode", DART.hex()), "no data records")

    def test_empty_and_binary_garbage(self) -> None:
        """Empty input and binary that is not frames are each one line."""
        self.assert_one_line_error(command("decode", "-", stdin=b""), "no bytes")
        self.assert_one_line_error(command("decode", "-", stdin=b"\xff\xfe\x00"), "neither")


class CheckConfigTests(_FileMixin, SynchronousTestCase):
    """``oemrelay check-config``."""

    def test_sample_config(self) -> None:
        """The sample configuration passes, naming its listener, file connector, registry and API."""
        status, out, err = command("check-config", str(PROJECT / "etc" / "relay.ini"))
        self.assertEqual((status, err), (0, ""))
        self.assertIn("devices listen on tcp:20500", out)
        self.assertIn("connector main: file uploads.jsonl (used by devices)", out)
        self.assertIn("registry sqlite:", out)
        self.assertIn("API listens on tcp:8080:interface=127.0.0.1", out)

    def test_no_secrets(self) -> None:
        """Passwords, tokens, header values and URL paths and queries never appear."""
        path = self.write(
            "[relay]\nlisten = tcp:20500\nconnector = platform\n"
            "registry = postgresql://relay:dbsecret@db.example:5432/oem\n"
            "[connector:platform]\ntype = http\n"
            "url = https://end.example:8443/dm/[SERIAL]?code=querysecret\n"
            "username = user\npassword = passsecret\n"
            "header1 = X-Key: headersecret\n"
            "[connector:raw]\ntype = tcp\nendpoint = tcp:host=127.0.0.1:port=5027\n"
            "[api]\nlisten = tcp:8080\ntoken = apisecret-apisecret-apisecret\n",
            "relay.ini",
        )
        status, out, err = command("check-config", path)
        self.assertEqual(status, 0, err)
        for secret in ("dbsecret", "passsecret", "querysecret", "headersecret", "apisecret", "/dm/"):
            self.assertNotIn(secret, out)
        self.assertIn("connector platform: http to https://end.example:8443, auth basic", out)
        self.assertIn("connector raw: tcp to tcp:host=127.0.0.1:port=5027", out)
        self.assertIn("registry postgresql://relay@db.example:5432/oem", out)
        self.assertIn("API listens on tcp:8080", out)

    def test_bad_config(self) -> None:
        """An unknown key: exit 1 and the one-line error naming file, section and key."""
        path = self.write(
            f"[relay]\nlisten = {LISTEN}\n[connector:main]\ntype = file\npath = u.jsonl\ncolour = blue\n",
            "relay.ini",
        )
        status, out, err = command("check-config", path)
        self.assertEqual((status, out), (1, ""))
        self.assertEqual(len(err.splitlines()), 1)
        for word in (path, "[connector:main]", "colour"):
            self.assertIn(word, err)

    def test_missing_file(self) -> None:
        """A file that does not exist is one line and exit 1."""
        status, _, err = command("check-config", "/nonexistent/relay.ini")
        self.assertEqual(status, 1)
        self.assertEqual(len(err.splitlines()), 1)


class SimulateArgumentTests(SynchronousTestCase):
    """``oemrelay simulate`` arguments, checked before any connection."""

    def assert_usage_error(self, *argv: str) -> str:
        status, out, err = command("simulate", *argv)
        self.assertEqual(status, 2)
        self.assertEqual(len(err.splitlines()), 1, err)
        return err

    def test_bad_address(self) -> None:
        """HOST:PORT without a port, or with port 0 or 65536, is one usage line."""
        for address in ("localhost", "localhost:0", "localhost:65536", ":20500", "h:x"):
            self.assertIn("HOST:PORT", self.assert_usage_error(address))

    def test_address_forms(self) -> None:
        """Port 1 and 65535 are accepted, and [::1] loses its brackets."""
        parse = build_parser().parse_args
        self.assertEqual(parse(["simulate", "h:1"]).address, ("h", 1))
        self.assertEqual(parse(["simulate", "[::1]:65535"]).address, ("::1", 65535))

    def test_counts_must_be_positive(self) -> None:
        """--devices 0, --records -1 and --duration 0 are usage errors; 1 is fine."""
        self.assert_usage_error("h:1", "--devices", "0")
        self.assert_usage_error("h:1", "--records", "-1")
        self.assert_usage_error("h:1", "--duration", "0")
        self.assertEqual(build_parser().parse_args(["simulate", "h:1", "--devices", "1"]).devices, 1)

    def test_uploads_or_duration(self) -> None:
        """--uploads and --duration exclude each other."""
        self.assert_usage_error("h:1", "--uploads", "2", "--duration", "5")

    def test_serial_fits_32_bits(self) -> None:
        """A serial base above 2**32-1 is refused; 2**32-1 itself is accepted."""
        self.assert_usage_error("h:1", "--serial-base", str(2**32))
        parsed = build_parser().parse_args(["simulate", "h:1", "--serial-base", str(2**32 - 1)])
        self.assertEqual(parsed.serial_base, 2**32 - 1)

    def test_tls_options(self) -> None:
        """--ca or --insecure without --tls, both together, or an unreadable CA are errors."""
        parse = build_parser().parse_args
        for argv, words in (
            (["--insecure"], "need --tls"),
            (["--tls", "--insecure", "--ca", "x.pem"], "exclude"),
            (["--tls", "--ca", "/nonexistent.pem"], "cannot load"),
        ):
            with self.assertRaises(CommandError) as caught:
                client_endpoint_factory(Clock(), parse(["simulate", "h:1", *argv]))
            self.assertIn(words, str(caught.exception))

    def test_fd_budget_boundary(self) -> None:
        """Devices plus spare descriptors up to the hard limit fit; one more is refused."""
        self.assertEqual(check_fd_budget(1000 - SPARE_FDS, (256, 1000)), 1000)
        with self.assertRaises(CommandError) as caught:
            check_fd_budget(1001 - SPARE_FDS, (256, 1000))
        self.assertIn("several simulators", str(caught.exception))
        self.assertEqual(check_fd_budget(10, (4096, 8192)), 4096)  # never lowered


class SimulateOutputTests(SynchronousTestCase):
    """What ``oemrelay simulate`` shows."""

    def test_summary_text(self) -> None:
        """The summary names every figure."""
        stats = FleetStats(devices=2, uploads=4, records=40, withheld=1, reconnects=1,
                           latencies=[0.004, 0.006])
        text = summary_text(stats.summary(2.0))
        for line in ("uploads            4", "records committed  40", "withheld           1",
                     "reconnects         1", "records/s          20.0", "p50 4.0", "p99 6.0"):
            self.assertIn(line, text)

    def test_progress_line(self) -> None:
        """The progress line is redrawn every half second with the committed rate."""

        class _Fleet:
            stats = FleetStats(devices=1)

        clock, stream = Clock(), _Tty()
        progress = Progress(_Fleet, clock, stream)
        progress.start()
        _Fleet.stats.uploads, _Fleet.stats.records = 1, 50
        clock.advance(0.5)
        self.assertEqual(stream.getvalue().count("\r"), 1)
        self.assertIn("1 uploads, 50 records committed, 0 withheld, 100 records/s", stream.getvalue())
        progress.stop()
        self.assertTrue(stream.getvalue().endswith("\n"))


class _Collect(ProcessProtocol):
    def __init__(self) -> None:
        self.out, self.err, self.status = b"", b"", None

    def outReceived(self, data: bytes) -> None:
        self.out += data

    def errReceived(self, data: bytes) -> None:
        self.err += data

    def processEnded(self, reason) -> None:
        self.status = reason.value.exitCode


class SimulateEndToEndTests(_RelayTestCase):
    """The simulator as a subprocess against the real daemon on loopback."""

    async def oemrelay(self, *argv: str) -> _Collect:
        """Run ``python -m oemrelay.cli argv`` to its end."""
        process = _Collect()
        transport = self.reactor.spawnProcess(
            process, sys.executable, [sys.executable, "-m", "oemrelay.cli", *argv],
            env=dict(os.environ, PYTHONPATH=str(PROJECT)), path=str(PROJECT),
        )
        transport.closeStdin()
        await self.wait_until(lambda: process.status is not None, "oemrelay to exit", START_TIMEOUT)
        return process

    async def test_fleet_counts_match_uploads_file(self) -> None:
        """3 devices × 2 uploads × 5 records: the JSON summary matches the file connector's lines."""
        uploads = os.path.abspath(self.mktemp()) + ".jsonl"
        port = await self.start_daemon(
            f"[relay]\nlisten = {LISTEN}\nregistry = sqlite:{uploads}.sqlite\n"
            f"[connector:main]\ntype = file\npath = {uploads}\n"
        )
        process = await self.oemrelay(
            "simulate", f"127.0.0.1:{port}", "--devices", "3", "--records", "5",
            "--uploads", "2", "--serial-base", "7000", "--json",
        )
        self.assertEqual(process.status, 0, process.err)
        summary = json.loads(process.out)
        self.assertEqual(
            (summary["uploads"], summary["records_committed"], summary["withheld"]), (6, 30, 0)
        )
        with open(uploads, encoding="utf-8") as f:
            documents = [json.loads(line) for line in f]
        self.assertEqual(len(documents), summary["uploads"])
        records = {(d["SerNo"], r["SeqNo"]) for d in documents for r in d["Records"]}
        self.assertEqual(records, {(s, q) for s in (7000, 7001, 7002) for q in range(1, 11)})

        capture_file = uploads + ".hex"
        with open(capture_file, "w") as f:
            f.write("# Denmark\n" + DENMARK.hex() + "\n")
        process = await self.oemrelay(
            "simulate", f"127.0.0.1:{port}", "--replay", capture_file, "--serial-base", "9"
        )
        self.assertEqual(process.status, 0, process.err)
        self.assertIn(b"0x06 commit response: 01 -> committed", process.out)
        with open(uploads, encoding="utf-8") as f:
            last = json.loads(f.read().splitlines()[-1])
        self.assertEqual((last["SerNo"], [r["SeqNo"] for r in last["Records"]]), (9, [565, 566]))

    async def test_unreachable_relay(self) -> None:
        """Nobody listening: exit 1, one line naming the address, no traceback."""
        port = unused_port()
        process = await self.oemrelay("simulate", f"127.0.0.1:{port}", "--devices", "2")
        self.assertEqual(process.status, 1)
        self.assertEqual(len(process.err.splitlines()), 1, process.err)
        self.assertIn(f"cannot connect to 127.0.0.1:{port}".encode(), process.err)
        self.assertNotIn(b"Traceback", process.err)
