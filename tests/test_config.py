"""
Tests for :mod:`oemrelay.config` and the ``twistd oemrelay`` command line:
the schema's values, and one-line errors naming source, section and key.
"""

from __future__ import annotations

import dataclasses
import io
import os
import sys
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from oemrelay import tap
from oemrelay.codec import MAX_PAYLOAD
from oemrelay.config import (
    Config,
    ConfigError,
    FileConnectorConfig,
    HttpConnectorConfig,
    RelayConfig,
    TcpConnectorConfig,
    config_from_string,
    load_config,
)

SAMPLE_INI = Path(__file__).parent.parent / "etc" / "relay.ini"

#: Every key of the contract, as in etc/relay.ini and its commented examples.
FULL = """\
[relay]
listen = tcp:20500 tcp:20501:interface=127.0.0.1   # two endpoints
connector = platform          # the connector section devices use
commit_timeout = 12.5
idle_timeout = 300
max_message = 4096

[connector:platform]
type = http
url = https://example.com/dm/[SERIAL]?key=[CUSTOM1]
header1 = X-Imei: [IMEI]
header2 =
header3 = X-Tenant: [CUSTOM2]
username = relay-[SERIAL]
password = s3cr3t-pw
timeout = 7
ca_file =

[connector:forward]
type = tcp
endpoint = tcp:host=127.0.0.1:port=5027

[connector:main]
type = file
path = uploads.jsonl          # one OEM JSON document per line
"""

#: A minimal valid file connector, appended to configurations under test.
FILE_CONNECTOR = "[connector:main]\ntype = file\npath = out.jsonl\n"


class FullSampleTests(SynchronousTestCase):
    """The full contract sample parses into the right frozen values."""

    def setUp(self) -> None:
        self.config = config_from_string(FULL, "full.ini")

    def test_relay(self) -> None:
        """[relay] values are typed: endpoints split, numbers parsed."""
        self.assertEqual(
            self.config.relay,
            RelayConfig(
                listen=("tcp:20500", "tcp:20501:interface=127.0.0.1"),
                connector="platform",
                commit_timeout=12.5,
                idle_timeout=300.0,
                max_message=4096,
            ),
        )

    def test_http(self) -> None:
        """The http connector keeps templates as written; empty headers are dropped."""
        self.assertEqual(
            self.config.connectors["platform"],
            HttpConnectorConfig(
                name="platform",
                url="https://example.com/dm/[SERIAL]?key=[CUSTOM1]",
                headers=(("X-Imei", "[IMEI]"), ("X-Tenant", "[CUSTOM2]")),
                username="relay-[SERIAL]",
                password="s3cr3t-pw",
                timeout=7.0,
                ca_file="",
                auth="basic",
            ),
        )

    def test_tcp(self) -> None:
        """The tcp connector keeps its endpoint string."""
        self.assertEqual(
            self.config.connectors["forward"],
            TcpConnectorConfig("forward", "tcp:host=127.0.0.1:port=5027"),
        )

    def test_file(self) -> None:
        """The file connector keeps its path, without the inline comment."""
        self.assertEqual(
            self.config.connectors["main"], FileConnectorConfig("main", "uploads.jsonl")
        )

    def test_connector_names(self) -> None:
        """Every [connector:NAME] section is present under its name."""
        self.assertEqual(set(self.config.connectors), {"platform", "forward", "main"})

    def test_source(self) -> None:
        """The configuration remembers where it came from."""
        self.assertEqual(self.config.source, "full.ini")

    def test_frozen(self) -> None:
        """Neither the configuration nor its parts can be changed."""
        with self.assertRaises(dataclasses.FrozenInstanceError):
            self.config.relay.commit_timeout = 1.0  # type: ignore[misc]
        with self.assertRaises(dataclasses.FrozenInstanceError):
            self.config.connectors["platform"].url = "http://x/"  # type: ignore[misc]
        with self.assertRaises(dataclasses.FrozenInstanceError):
            self.config.relay = None  # type: ignore[misc]
        with self.assertRaises(TypeError):
            self.config.connectors["new"] = None  # type: ignore[index]

    def test_password_not_in_repr(self) -> None:
        """The password is never shown by repr() of the configuration."""
        self.assertNotIn("s3cr3t-pw", repr(self.config))
        self.assertNotIn("s3cr3t-pw", str(self.config))
        self.assertNotIn("s3cr3t-pw", repr(self.config.connectors["platform"]))


class DefaultsTests(SynchronousTestCase):
    """Keys left out take their documented defaults."""

    def test_relay_defaults(self) -> None:
        """Without [relay] the relay listens on tcp:20500 with default timeouts."""
        config = config_from_string(FILE_CONNECTOR)
        self.assertEqual(
            config.relay,
            RelayConfig(("tcp:20500",), "main", 20.0, 600.0, MAX_PAYLOAD),
        )

    def test_single_connector_is_default(self) -> None:
        """With one connector section, [relay] connector may be left out."""
        config = config_from_string("[relay]\nlisten = tcp:1\n" + FILE_CONNECTOR)
        self.assertEqual(config.relay.connector, "main")

    def test_http_defaults(self) -> None:
        """An http connector needs only its url."""
        config = config_from_string("[connector:h]\ntype = http\nurl = http://h/\n")
        self.assertEqual(
            config.connectors["h"],
            HttpConnectorConfig("h", "http://h/", timeout=10.0, auth="none"),
        )

    def test_default_source(self) -> None:
        """A configuration from a string without a name is '<string>'."""
        self.assertEqual(config_from_string(FILE_CONNECTOR).source, "<string>")

    def test_values_stripped(self) -> None:
        """Values are stripped of surrounding spaces."""
        config = config_from_string("[connector:main]\ntype =   file  \npath =  a b  \n")
        self.assertEqual(config.connectors["main"], FileConnectorConfig("main", "a b"))

    def test_ca_file(self) -> None:
        """A readable ca_file is kept."""
        path = self.mktemp()
        Path(path).write_text("not checked here\n")
        config = config_from_string(
            f"[connector:h]\ntype = http\nurl = https://h/\nca_file = {path}\n"
        )
        self.assertEqual(config.connectors["h"].ca_file, path)

    def test_header_spaces(self) -> None:
        """Header names and values are stripped around the colon."""
        config = config_from_string(
            "[connector:h]\ntype = http\nurl = http://h/\nheader2 =  X-A :  b c \n"
        )
        self.assertEqual(config.connectors["h"].headers, (("X-A", "b c"),))

    def test_header_value_with_colon(self) -> None:
        """Only the first colon separates a header's name from its value."""
        config = config_from_string(
            "[connector:h]\ntype = http\nurl = http://h/\nheader1 = X-Time: 12:30\n"
        )
        self.assertEqual(config.connectors["h"].headers, (("X-Time", "12:30"),))


class InlineCommentTests(SynchronousTestCase):
    """Inline '# comments' after a value are not part of it."""

    def test_stripped(self) -> None:
        """A '#' comment after whitespace is removed from the value."""
        config = config_from_string(
            "[relay]\ncommit_timeout = 5    # seconds\n" + FILE_CONNECTOR
        )
        self.assertEqual(config.relay.commit_timeout, 5.0)

    def test_sample_file_comments(self) -> None:
        """etc/relay.ini's values are read without the comments that follow them."""
        config = load_config(str(SAMPLE_INI))
        self.assertEqual(config.relay.connector, "main")
        self.assertEqual(config.connectors["main"].path, "uploads.jsonl")

    def test_fragment_kept(self) -> None:
        """A '#' not preceded by whitespace (a URL fragment) stays in the value."""
        config = config_from_string("[connector:h]\ntype = http\nurl = http://h/a#b\n")
        self.assertEqual(config.connectors["h"].url, "http://h/a#b")


class SampleFileTests(SynchronousTestCase):
    """etc/relay.ini loads as shipped."""

    def test_loads(self) -> None:
        """The sample file gives a file connector on port 20500."""
        config = load_config(str(SAMPLE_INI))
        self.assertEqual(
            (config.relay, dict(config.connectors), config.source),
            (
                RelayConfig(("tcp:20500",), "main", 20.0, 600.0, 65535),
                {"main": FileConnectorConfig("main", "uploads.jsonl")},
                str(SAMPLE_INI),
            ),
        )

    def test_returns_config(self) -> None:
        """load_config returns a Config."""
        self.assertIsInstance(load_config(str(SAMPLE_INI)), Config)


class ConfigErrorTests(SynchronousTestCase):
    """Each mistake is one ConfigError line naming source, section and key."""

    def assert_error(self, text: str, *expected: str) -> str:
        """
        Parse ``text`` as ``bad.ini`` and check the error.

        :param expected: fragments the message must contain besides the source.
        :return: the message.
        """
        with self.assertRaises(ConfigError) as caught:
            config_from_string(text, "bad.ini")
        message = str(caught.exception)
        self.assertTrue(message.startswith("bad.ini: "), message)
        self.assertNotIn("\n", message)
        self.assertNotIn("\r", message)
        for fragment in expected:
            self.assertIn(fragment, message)
        return message

    def test_unknown_section(self) -> None:
        """A section that is neither [relay] nor [connector:NAME] is refused."""
        self.assert_error("[relais]\nlisten = tcp:1\n" + FILE_CONNECTOR, "[relais]", "unknown section")

    def test_connector_without_name(self) -> None:
        """[connector:] with an empty name is an unknown section."""
        self.assert_error("[connector:]\ntype = file\npath = x\n", "[connector:]", "unknown section")

    def test_unknown_relay_key(self) -> None:
        """A misspelt [relay] key names the section and the key."""
        self.assert_error("[relay]\ncomit_timeout = 5\n" + FILE_CONNECTOR, "[relay] comit_timeout", "unknown key")

    def test_unknown_connector_key(self) -> None:
        """A misspelt connector key names the connector section and the key."""
        self.assert_error(
            "[connector:h]\ntype = http\nurl = http://h/\nheader4 = X: y\n",
            "[connector:h] header4",
            "unknown key",
        )

    def test_key_of_other_type(self) -> None:
        """A key belonging to another connector type is refused."""
        self.assert_error(
            "[connector:t]\ntype = tcp\nendpoint = tcp:host=h:port=1\nurl = http://h/\n",
            "[connector:t] url",
            "unknown key",
        )
        self.assert_error(
            "[connector:f]\ntype = file\npath = x\ntimeout = 5\n",
            "[connector:f] timeout",
            "unknown key",
        )

    def test_keys_case_sensitive(self) -> None:
        """Keys are case-sensitive: 'URL' is not 'url'."""
        self.assert_error("[connector:h]\ntype = http\nURL = http://h/\n", "[connector:h] URL", "unknown key")

    def test_no_connector_section(self) -> None:
        """A configuration without any connector section is refused."""
        self.assert_error("[relay]\nlisten = tcp:20500\n", "[relay] connector", "missing")

    def test_several_connectors_none_chosen(self) -> None:
        """With several connectors, [relay] connector must name one."""
        self.assert_error(
            FILE_CONNECTOR + "[connector:other]\ntype = file\npath = y\n",
            "[relay] connector",
            "missing",
        )

    def test_connector_names_missing_section(self) -> None:
        """[relay] connector naming a section that does not exist is refused."""
        self.assert_error(
            "[relay]\nconnector = platform\n" + FILE_CONNECTOR,
            "[relay] connector",
            "[connector:platform]",
        )

    def test_bad_listen_type(self) -> None:
        """An unknown endpoint type in listen is refused."""
        self.assert_error("[relay]\nlisten = bogus:1\n" + FILE_CONNECTOR, "[relay] listen", "bogus:1")

    def test_bad_listen_port(self) -> None:
        """A non-numeric port in listen is refused."""
        self.assert_error("[relay]\nlisten = tcp:notaport\n" + FILE_CONNECTOR, "[relay] listen", "tcp:notaport")

    def test_bad_second_listen(self) -> None:
        """Every listen endpoint is checked, not only the first."""
        self.assert_error(
            "[relay]\nlisten = tcp:20500 tcp:oops\n" + FILE_CONNECTOR, "[relay] listen", "tcp:oops"
        )

    def test_empty_listen(self) -> None:
        """An empty listen is refused."""
        self.assert_error("[relay]\nlisten =\n" + FILE_CONNECTOR, "[relay] listen")

    def test_bad_tcp_endpoint(self) -> None:
        """A tcp connector endpoint that is no client endpoint string is refused."""
        self.assert_error("[connector:t]\ntype = tcp\nendpoint = nonsense\n", "[connector:t] endpoint", "nonsense")

    def test_tcp_endpoint_without_port(self) -> None:
        """A tcp connector endpoint without a port is refused."""
        self.assert_error("[connector:t]\ntype = tcp\nendpoint = tcp:host=h\n", "[connector:t] endpoint")

    def test_missing_tcp_endpoint(self) -> None:
        """A tcp connector needs an endpoint."""
        self.assert_error("[connector:t]\ntype = tcp\n", "[connector:t] endpoint", "missing")

    def test_commit_timeout_not_a_number(self) -> None:
        """commit_timeout=abc is refused."""
        self.assert_error("[relay]\ncommit_timeout = abc\n" + FILE_CONNECTOR, "[relay] commit_timeout", "abc")

    def test_commit_timeout_negative(self) -> None:
        """commit_timeout=-1 is refused."""
        self.assert_error("[relay]\ncommit_timeout = -1\n" + FILE_CONNECTOR, "[relay] commit_timeout", "-1")

    def test_commit_timeout_zero(self) -> None:
        """commit_timeout=0 is refused."""
        self.assert_error("[relay]\ncommit_timeout = 0\n" + FILE_CONNECTOR, "[relay] commit_timeout")

    def test_timeouts_not_finite(self) -> None:
        """inf and nan are no timeouts."""
        for value in ("inf", "nan"):
            self.assert_error(f"[relay]\nidle_timeout = {value}\n" + FILE_CONNECTOR, "[relay] idle_timeout")

    def test_http_timeout(self) -> None:
        """An http connector's timeout must be a positive number."""
        self.assert_error(
            "[connector:h]\ntype = http\nurl = http://h/\ntimeout = 0\n", "[connector:h] timeout"
        )

    def test_max_message_too_large(self) -> None:
        """max_message=70000 is above the protocol's limit."""
        self.assert_error("[relay]\nmax_message = 70000\n" + FILE_CONNECTOR, "[relay] max_message", "70000")

    def test_max_message_zero(self) -> None:
        """max_message=0 is refused."""
        self.assert_error("[relay]\nmax_message = 0\n" + FILE_CONNECTOR, "[relay] max_message")

    def test_max_message_not_whole(self) -> None:
        """max_message must be a whole number."""
        self.assert_error("[relay]\nmax_message = 1.5\n" + FILE_CONNECTOR, "[relay] max_message", "1.5")

    def test_missing_url(self) -> None:
        """An http connector needs a url."""
        self.assert_error("[connector:h]\ntype = http\n", "[connector:h] url", "missing")

    def test_empty_url(self) -> None:
        """An empty url counts as missing."""
        self.assert_error("[connector:h]\ntype = http\nurl =   # none yet\n", "[connector:h] url", "missing")

    def test_non_http_url(self) -> None:
        """A url with another scheme is refused."""
        self.assert_error("[connector:h]\ntype = http\nurl = ftp://h/x\n", "[connector:h] url", "http")

    def test_url_without_host(self) -> None:
        """A url without a host is refused."""
        self.assert_error("[connector:h]\ntype = http\nurl = http:///x\n", "[connector:h] url")

    def test_placeholder_in_host(self) -> None:
        """The url's host may not depend on the device."""
        self.assert_error(
            "[connector:h]\ntype = http\nurl = http://[SERIAL].example.com/\n",
            "[connector:h] url",
        )
        self.assert_error(
            "[connector:h]\ntype = http\nurl = http://example.com:[CUSTOM1]/\n",
            "[connector:h] url",
        )

    def test_ipv6_literal_host(self) -> None:
        """An IPv6 literal host, which the HTTP client cannot reach, is refused up front."""
        self.assert_error(
            "[connector:h]\ntype = http\nurl = http://[::1]:8080/dm\n", "[connector:h] url", "IPv6"
        )

    def test_header_without_colon(self) -> None:
        """A header without a colon is refused."""
        self.assert_error(
            "[connector:h]\ntype = http\nurl = http://h/\nheader1 = X-Imei [IMEI]\n",
            "[connector:h] header1",
        )

    def test_header_bad_name(self) -> None:
        """A header whose name is not an HTTP token is refused."""
        self.assert_error(
            "[connector:h]\ntype = http\nurl = http://h/\nheader3 = X Imei: 1\n",
            "[connector:h] header3",
        )

    def test_unreadable_ca_file(self) -> None:
        """A ca_file that cannot be read is refused."""
        missing = os.path.join(self.mktemp(), "ca.pem")
        self.assert_error(
            f"[connector:h]\ntype = http\nurl = https://h/\nca_file = {missing}\n",
            "[connector:h] ca_file",
            missing,
        )

    def test_unknown_type(self) -> None:
        """An unknown connector type is refused, naming the known ones."""
        self.assert_error("[connector:x]\ntype = mqtt\n", "[connector:x] type", "mqtt", "http, azure-iothub, tcp, file")

    def test_missing_type(self) -> None:
        """A connector section without a type is refused."""
        self.assert_error("[connector:x]\npath = a\n", "[connector:x] type")

    def test_missing_file_path(self) -> None:
        """A file connector needs a path."""
        self.assert_error("[connector:f]\ntype = file\n", "[connector:f] path", "missing")

    def test_duplicate_key(self) -> None:
        """A key given twice is refused, naming section and key."""
        self.assert_error(
            "[relay]\nlisten = tcp:1\nlisten = tcp:2\n" + FILE_CONNECTOR, "'relay'", "'listen'"
        )

    def test_duplicate_section(self) -> None:
        """A section given twice is refused."""
        self.assert_error("[relay]\n[relay]\n" + FILE_CONNECTOR, "'relay'")

    def test_no_section_header(self) -> None:
        """A file that starts with a key outside any section is refused on one line."""
        self.assert_error("listen = tcp:1\n" + FILE_CONNECTOR, "no section headers")

    def test_line_without_value(self) -> None:
        """A line that is not 'key = value' is refused on one line."""
        self.assert_error("[relay]\nlisten\n" + FILE_CONNECTOR, "listen")


class LoadConfigTests(SynchronousTestCase):
    """:func:`load_config` reads files and reports unreadable ones."""

    def test_missing_file(self) -> None:
        """A missing file is a one-line ConfigError naming the path."""
        path = self.mktemp()
        with self.assertRaises(ConfigError) as caught:
            load_config(path)
        message = str(caught.exception)
        self.assertTrue(message.startswith(f"{path}: "), message)
        self.assertIn("cannot read", message)
        self.assertNotIn("\n", message)

    def test_not_utf8(self) -> None:
        """A file that is not UTF-8 is a one-line ConfigError naming the path."""
        path = self.mktemp()
        Path(path).write_bytes(b"[relay]\nlisten = tcp:\xff\n")
        with self.assertRaises(ConfigError) as caught:
            load_config(path)
        self.assertTrue(str(caught.exception).startswith(f"{path}: "))

    def test_errors_name_the_file(self) -> None:
        """Errors in a loaded file name the file as the source."""
        path = self.mktemp()
        Path(path).write_text("[relay]\nmax_message = 70000\n" + FILE_CONNECTOR)
        with self.assertRaises(ConfigError) as caught:
            load_config(path)
        self.assertTrue(str(caught.exception).startswith(f"{path}: [relay] max_message: "))

    def test_source_is_path(self) -> None:
        """A loaded configuration's source is its path."""
        path = self.mktemp()
        Path(path).write_text(FILE_CONNECTOR)
        self.assertEqual(load_config(path).source, path)


class OptionsTests(SynchronousTestCase):
    """``twistd oemrelay -c FILE`` checks the configuration before starting."""

    def setUp(self) -> None:
        self.stderr = io.StringIO()
        self.patch(sys, "stderr", self.stderr)

    def test_bad_file(self) -> None:
        """A bad file exits with status 1 and exactly one line on stderr."""
        path = self.mktemp()
        Path(path).write_text("[relay]\ncommit_timeout = abc\n" + FILE_CONNECTOR)
        with self.assertRaises(SystemExit) as caught:
            tap.Options().parseOptions(["-c", path])
        self.assertEqual(caught.exception.code, 1)
        output = self.stderr.getvalue()
        self.assertEqual(output.count("\n"), 1)
        self.assertTrue(output.endswith("\n"))
        self.assertIn(f"{path}: [relay] commit_timeout: ", output)

    def test_missing_file(self) -> None:
        """A missing file exits with status 1 and one line naming it."""
        path = self.mktemp()
        with self.assertRaises(SystemExit) as caught:
            tap.Options().parseOptions(["--config", path])
        self.assertEqual(caught.exception.code, 1)
        output = self.stderr.getvalue()
        self.assertEqual(output.count("\n"), 1)
        self.assertIn(path, output)

    def test_good_file(self) -> None:
        """A good file is loaded into the options and nothing is written."""
        options = tap.Options()
        options.parseOptions(["-c", str(SAMPLE_INI)])
        self.assertEqual(options["relay_config"], load_config(str(SAMPLE_INI)))
        self.assertEqual(self.stderr.getvalue(), "")
