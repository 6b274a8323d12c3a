"""
Tests for :mod:`oemrelay.config` and the ``twistd oemrelay`` command line:
the schema's values, and one-line errors naming source, section and key.
"""

from __future__ import annotations

import dataclasses
import datetime
import io
import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.trial.unittest import SynchronousTestCase

from oemrelay import tap
from oemrelay.codec import MAX_PAYLOAD
from oemrelay.config import (
    ApiConfig,
    Config,
    ConfigError,
    FileConnectorConfig,
    HttpConnectorConfig,
    SCHEMA,
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


def client_certificate_pem(common_name: str = "oemrelay-test-client") -> tuple[bytes, bytes]:
    """A new self-signed certificate and its private key, both PEM."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(datetime.datetime(2020, 1, 1, tzinfo=datetime.timezone.utc))
        .not_valid_after(datetime.datetime(2100, 1, 1, tzinfo=datetime.timezone.utc))
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return certificate.public_bytes(serialization.Encoding.PEM), key_pem


def write_temp(case: SynchronousTestCase, data: bytes) -> str:
    """The path of a new temporary file of ``case`` holding ``data``."""
    path = case.mktemp()
    Path(path).write_bytes(data)
    return path


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
        """A readable ca_file of PEM certificates is kept."""
        path = write_temp(self, client_certificate_pem()[0])
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

    def test_api_on_loopback(self) -> None:
        """The sample's API listens on 127.0.0.1 only, with a token."""
        api = load_config(str(SAMPLE_INI)).api
        self.assertEqual(api.listen, ("tcp:8080:interface=127.0.0.1",))
        self.assertTrue(api.token)

    def test_returns_config(self) -> None:
        """load_config returns a Config."""
        self.assertIsInstance(load_config(str(SAMPLE_INI)), Config)


class ConfigErrorAssertions:
    """A mixin for test cases that check one-line configuration errors."""

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


class ConfigErrorTests(ConfigErrorAssertions, SynchronousTestCase):
    """Each mistake is one ConfigError line naming source, section and key."""

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

    def test_idle_timeout_equal_to_commit_timeout(self) -> None:
        """idle_timeout equal to commit_timeout is refused, naming [relay] idle_timeout."""
        self.assert_error(
            "[relay]\ncommit_timeout = 30\nidle_timeout = 30\n" + FILE_CONNECTOR,
            "[relay] idle_timeout",
            "longer than commit_timeout",
        )

    def test_idle_timeout_below_commit_timeout(self) -> None:
        """idle_timeout shorter than commit_timeout is refused, naming [relay] idle_timeout."""
        self.assert_error(
            "[relay]\ncommit_timeout = 30\nidle_timeout = 29.5\n" + FILE_CONNECTOR,
            "[relay] idle_timeout",
            "longer than commit_timeout",
        )

    def test_idle_timeout_just_above_commit_timeout(self) -> None:
        """idle_timeout a little longer than commit_timeout loads."""
        config = config_from_string(
            "[relay]\ncommit_timeout = 30\nidle_timeout = 30.5\n" + FILE_CONNECTOR
        )
        self.assertEqual((config.relay.commit_timeout, config.relay.idle_timeout), (30.0, 30.5))

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

    def test_profile_cache_seconds_bounds(self) -> None:
        """profile_cache_seconds is 0 (no cache) to 3600 seconds."""
        for value in ("-0.1", "3600.5", "nan", "soon"):
            self.assert_error(
                f"[relay]\nprofile_cache_seconds = {value}\n" + FILE_CONNECTOR,
                "[relay] profile_cache_seconds",
            )
        for value in (0.0, 3600.0):
            config = config_from_string(
                f"[relay]\nprofile_cache_seconds = {value}\n" + FILE_CONNECTOR
            )
            self.assertEqual(config.relay.profile_cache_seconds, value)

    def test_pool_size_bounds(self) -> None:
        """An http connector's pool_size is 1 to 65536 connections."""
        for value in ("0", "65537", "ten", "1.5"):
            self.assert_error(
                f"[connector:h]\ntype = http\nurl = http://h/\npool_size = {value}\n",
                "[connector:h] pool_size",
            )
        for value in (1, 65536):
            config = config_from_string(
                f"[connector:h]\ntype = http\nurl = http://h/\npool_size = {value}\n"
            )
            self.assertEqual(config.connectors["h"].pool_size, value)

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
        """A line that is not 'key = value' is refused on one line naming its line."""
        self.assert_error("[relay]\nlisten\n" + FILE_CONNECTOR, "line 2")

    def test_value_continued_on_next_line(self) -> None:
        """An indented line continuing a value (a header, the token, a key) is refused without quoting it."""
        for text, where in (
            ("[connector:h]\ntype = http\nurl = http://h/\nheader1 = X-Key: abc\n  s3cr3t\n", "[connector:h] header1"),
            ("[connector:h]\ntype = azure-iothub\nhub = h\nsas_key = abc\n  s3cr3t\n", "[connector:h] sas_key"),
            ("[api]\nlisten = tcp:8080\ntoken = abc\n  s3cr3t\n" + FILE_CONNECTOR, "[api] token"),
            ("[relay]\nconnector = main\n  s3cr3t\n" + FILE_CONNECTOR, "[relay] connector"),
            ("[relay]\nnode = a\n  s3cr3t\n" + FILE_CONNECTOR, "[relay] node"),
            ("[connector:f]\ntype = file\npath = a\n  s3cr3t\n", "[connector:f] path"),
        ):
            message = self.assert_error(text, where, "one line")
            self.assertNotIn("s3cr3t", message)

    def test_listen_on_several_lines(self) -> None:
        """listen, a list of endpoints, may continue on indented lines."""
        config = config_from_string("[relay]\nlisten = tcp:1\n  tcp:2\n" + FILE_CONNECTOR)
        self.assertEqual(config.relay.listen, ("tcp:1", "tcp:2"))

    def test_bad_line_not_quoted(self) -> None:
        """A malformed line, which may hold a secret, is named by number, not quoted."""
        message = self.assert_error(
            "[connector:h]\ntype = http\nurl = http://h/\npassword s3cr3t-pw\n", "line 4"
        )
        self.assertNotIn("s3cr3t-pw", message)
        message = self.assert_error("password = s3cr3t-pw\n" + FILE_CONNECTOR, "line 1")
        self.assertNotIn("s3cr3t-pw", message)

    def test_header_error_hides_value(self) -> None:
        """A header without a colon is refused without quoting its value."""
        message = self.assert_error(
            "[connector:h]\ntype = http\nurl = http://h/\nheader1 = X-Api-Key s3cr3t-key\n",
            "[connector:h] header1",
        )
        self.assertNotIn("s3cr3t-key", message)

    def test_url_error_hides_query(self) -> None:
        """A refused url is not quoted: its path and query may hold a key."""
        message = self.assert_error(
            "[connector:h]\ntype = http\nurl = ftp://h/x?code=s3cr3t-code\n", "[connector:h] url"
        )
        self.assertNotIn("s3cr3t-code", message)

    def test_url_with_credentials(self) -> None:
        """user:password@ in the url, which the HTTP client cannot send, is refused."""
        message = self.assert_error(
            "[connector:h]\ntype = http\nurl = https://relay:s3cr3t-pw@h/dm\n",
            "[connector:h] url",
            "username",
        )
        self.assertNotIn("s3cr3t-pw", message)

    def test_url_bad_port(self) -> None:
        """A url port that is not a number from 1 to 65535 is refused up front."""
        for port in ("abc", "99999", "0"):
            self.assert_error(
                f"[connector:h]\ntype = http\nurl = http://h:{port}/dm\n", "[connector:h] url", "port"
            )

    def test_url_bad_host(self) -> None:
        """A host name the HTTP client would refuse at every upload is refused up front."""
        for host in ("-bad-.example.com", "a..example.com", "my_host", ":80"):
            self.assert_error(
                f"[connector:h]\ntype = http\nurl = http://{host}/dm\n", "[connector:h] url", "host"
            )
        self.assert_error(
            HTTP_X + "auth = oauth2\n" + OAUTH2_KEYS.replace("login.example.com", "login_server"),
            "[connector:x] token_url",
        )
        self.assert_error("[connector:x]\ntype = azure-iothub\nhub = -myhub-\n", "[connector:x] hub")

    def test_ca_file_not_pem(self) -> None:
        """A ca_file that holds no PEM certificate is refused, not found at the first upload."""
        path = write_temp(self, b"not a certificate\n")
        self.assert_error(
            f"[connector:h]\ntype = http\nurl = https://h/\nca_file = {path}\n",
            "[connector:h] ca_file",
            "PEM",
        )
        self.assert_error(
            f"[connector:h]\ntype = http\nurl = https://h/\nca_file = {self.mktemp()}x\n",
            "[connector:h] ca_file",
        )
        os.mkdir(path + ".d")
        self.assert_error(
            f"[connector:h]\ntype = http\nurl = https://h/\nca_file = {path}.d\n",
            "[connector:h] ca_file",
        )


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


#: An http connector section named x, for the authentication tests to extend.
HTTP_X = "[connector:x]\ntype = http\nurl = https://end.example.com/dm/[SERIAL]\n"

#: The IoT Hub URL of hub 'myhub', as an http connector's url.
IOTHUB_URL = (
    "https://myhub.azure-devices.net/devices/[CUSTOM1]/messages/events?api-version=2021-04-12"
)

#: OAuth2 settings complete but for auth = oauth2.
OAUTH2_KEYS = (
    "token_url = https://login.example.com/oauth2/token\n"
    "client_id = relay\n"
    "client_secret = cl1ent-s3cret\n"
)


def connector_x(text: str) -> HttpConnectorConfig:
    """The [connector:x] section of the configuration ``text``."""
    return config_from_string(text).connectors["x"]


class RelayRegistryTests(ConfigErrorAssertions, SynchronousTestCase):
    """[relay] registry names the device registry's database; node names this relay."""

    def test_registry_default(self) -> None:
        """Without registry the relay uses sqlite:oemrelay.sqlite."""
        self.assertEqual(config_from_string(FILE_CONNECTOR).relay.registry, "sqlite:oemrelay.sqlite")

    def test_sqlite_path(self) -> None:
        """sqlite: followed by a path in a writable directory is kept as written."""
        directory = self.mktemp()
        os.makedirs(directory)
        url = f"sqlite:{os.path.abspath(directory)}/registry.sqlite"
        config = config_from_string(f"[relay]\nregistry = {url}\n" + FILE_CONNECTOR)
        self.assertEqual(config.relay.registry, url)

    def test_sqlite_missing_directory(self) -> None:
        """A SQLite registry in a directory that does not exist is a [relay] registry error."""
        self.assert_error(
            "[relay]\nregistry = sqlite:/nonexistent-dir/registry.sqlite\n" + FILE_CONNECTOR,
            "[relay] registry",
            "directory '/nonexistent-dir' does not exist",
        )

    def test_sqlite_unwritable_directory(self) -> None:
        """A SQLite registry in a directory the relay cannot write is a [relay] registry error."""
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        os.chmod(directory, 0o555)
        self.addCleanup(os.chmod, directory, 0o700)
        if os.geteuid() == 0:
            # Root may write anywhere: let the kernel answer as it would a service user.
            real_access = os.access

            def access(path, mode, **kwargs):
                if os.path.abspath(path) == directory and mode & os.W_OK:
                    return False
                return real_access(path, mode, **kwargs)

            self.patch(os, "access", access)
        self.assert_error(
            f"[relay]\nregistry = sqlite:{directory}/registry.sqlite\n" + FILE_CONNECTOR,
            "[relay] registry",
            f"cannot write in directory {directory!r}",
        )

    def test_postgresql(self) -> None:
        """A postgresql:// URL is kept as written."""
        url = "postgresql://relay@db.example.com:5432/oemrelay"
        config = config_from_string(f"[relay]\nregistry = {url}\n" + FILE_CONNECTOR)
        self.assertEqual(config.relay.registry, url)

    def test_other_refused(self) -> None:
        """Another database, a bare path or sqlite: without a path is a one-line error."""
        for value in ("mysql://relay@db/oemrelay", "oemrelay.sqlite", "sqlite:"):
            self.assert_error(
                f"[relay]\nregistry = {value}\n" + FILE_CONNECTOR, "[relay] registry", "sqlite:PATH"
            )

    def test_error_hides_password(self) -> None:
        """A refused database URL's password is not repeated in the error."""
        message = self.assert_error(
            "[relay]\nregistry = mysql://relay:hunter2@db/oemrelay\n" + FILE_CONNECTOR,
            "[relay] registry",
        )
        self.assertNotIn("hunter2", message)
        message = self.assert_error(
            "[relay]\nregistry = postgresql:/relay:hunter2@db/oemrelay\n" + FILE_CONNECTOR,
            "[relay] registry",
        )
        self.assertNotIn("hunter2", message)

    def test_bad_postgresql_url(self) -> None:
        """A postgresql:// URL libpq cannot parse is refused here, not with a traceback at start."""
        for url in (
            "postgresql://relay:hunter2@db/oemrelay?bogus=1",
            "postgresql://relay:hun%zzter2@db/oemrelay",
            "postgresql://relay:hun ter2@db/oemrelay",
        ):
            message = self.assert_error(f"[relay]\nregistry = {url}\n" + FILE_CONNECTOR, "[relay] registry")
            self.assertNotIn("hun", message)

    def test_password_not_in_repr(self) -> None:
        """The registry URL, which may hold a password, is not in repr()."""
        config = config_from_string(
            "[relay]\nregistry = postgresql://relay:hunter2@db/oemrelay\n" + FILE_CONNECTOR
        )
        self.assertNotIn("hunter2", repr(config))

    def test_node_defaults_to_host_name(self) -> None:
        """Without node the relay is named after its host."""
        self.patch(socket, "gethostname", lambda: "relay-host-7")
        self.assertEqual(config_from_string(FILE_CONNECTOR).relay.node, "relay-host-7")

    def test_node_given(self) -> None:
        """A node name given is kept instead of the host name."""
        self.patch(socket, "gethostname", lambda: "relay-host-7")
        config = config_from_string("[relay]\nnode = relay-a\n" + FILE_CONNECTOR)
        self.assertEqual(config.relay.node, "relay-a")


class ApiConfigTests(ConfigErrorAssertions, SynchronousTestCase):
    """[api] turns on the management API; it never runs without a token."""

    def token_file(self, data: bytes) -> str:
        return write_temp(self, data)

    def test_absent(self) -> None:
        """Without [api] the API is off: ApiConfig() with nothing to listen on."""
        config = config_from_string(FILE_CONNECTOR)
        self.assertEqual(config.api, ApiConfig())
        self.assertEqual(config.api.listen, ())

    def test_empty_section(self) -> None:
        """An [api] section without listen leaves the API off."""
        self.assertEqual(config_from_string("[api]\n" + FILE_CONNECTOR).api, ApiConfig())

    def test_listen_and_token(self) -> None:
        """listen (one or more endpoints) and token are kept."""
        config = config_from_string(
            "[api]\nlisten = tcp:8080:interface=127.0.0.1 unix:/run/oemrelay.sock\n"
            "token = t0ken-abc\n" + FILE_CONNECTOR
        )
        self.assertEqual(
            config.api,
            ApiConfig(("tcp:8080:interface=127.0.0.1", "unix:/run/oemrelay.sock"), "t0ken-abc"),
        )

    def test_token_file(self) -> None:
        """token_file is read and its contents stripped of surrounding whitespace."""
        path = self.token_file(b"  file-t0ken-xyz \n\n")
        config = config_from_string(
            f"[api]\nlisten = tcp:8080\ntoken_file = {path}\n" + FILE_CONNECTOR
        )
        self.assertEqual(config.api, ApiConfig(("tcp:8080",), "file-t0ken-xyz"))

    def test_empty_token_file(self) -> None:
        """A token_file holding only whitespace is refused."""
        path = self.token_file(b" \n\t\n")
        self.assert_error(
            f"[api]\nlisten = tcp:8080\ntoken_file = {path}\n" + FILE_CONNECTOR,
            "[api] token_file",
            "empty",
        )

    def test_missing_token_file(self) -> None:
        """A token_file that does not exist is refused, naming the file."""
        path = os.path.join(self.mktemp(), "token")
        self.assert_error(
            f"[api]\nlisten = tcp:8080\ntoken_file = {path}\n" + FILE_CONNECTOR,
            "[api] token_file",
            "cannot read",
            path,
        )

    def test_token_file_directory(self) -> None:
        """A token_file that is a directory is a one-line error, not a traceback."""
        path = self.mktemp()
        os.mkdir(path)
        self.assert_error(
            f"[api]\nlisten = tcp:8080\ntoken_file = {path}\n" + FILE_CONNECTOR,
            "[api] token_file",
            "cannot read",
        )

    def test_token_file_not_utf8(self) -> None:
        """A token_file that is not UTF-8 text is a one-line error."""
        path = self.token_file(b"\xff\xfe\x00t")
        self.assert_error(
            f"[api]\nlisten = tcp:8080\ntoken_file = {path}\n" + FILE_CONNECTOR,
            "[api] token_file",
            "UTF-8",
        )

    def test_token_and_token_file(self) -> None:
        """token and token_file together are refused without quoting either token."""
        path = self.token_file(b"file-t0ken-xyz\n")
        message = self.assert_error(
            f"[api]\nlisten = tcp:8080\ntoken = t0ken-abc\ntoken_file = {path}\n"
            + FILE_CONNECTOR,
            "[api] token_file",
            "not both",
        )
        self.assertNotIn("t0ken-abc", message)
        self.assertNotIn("file-t0ken-xyz", message)

    def test_listen_without_token(self) -> None:
        """listen without token or token_file is refused, naming token."""
        self.assert_error("[api]\nlisten = tcp:8080\n" + FILE_CONNECTOR, "[api] token", "missing")

    def test_token_without_listen(self) -> None:
        """A token without listen is refused, naming listen."""
        message = self.assert_error(
            "[api]\ntoken = t0ken-abc\n" + FILE_CONNECTOR, "[api] listen", "missing"
        )
        self.assertNotIn("t0ken-abc", message)

    def test_token_file_without_listen(self) -> None:
        """A token_file without listen is refused, naming listen."""
        path = self.token_file(b"file-t0ken-xyz\n")
        self.assert_error(f"[api]\ntoken_file = {path}\n" + FILE_CONNECTOR, "[api] listen", "missing")

    def test_bad_endpoint(self) -> None:
        """A listen value that is no server endpoint string is refused, quoting it."""
        self.assert_error(
            "[api]\nlisten = bogus:8080\ntoken = t0ken-abc\n" + FILE_CONNECTOR,
            "[api] listen",
            "bogus:8080",
        )

    def test_unknown_key(self) -> None:
        """A misspelt [api] key is refused, naming it."""
        self.assert_error("[api]\nlisten = tcp:8080\ntokn = x\n" + FILE_CONNECTOR, "[api] tokn", "unknown key")


class HttpAuthConfigTests(ConfigErrorAssertions, SynchronousTestCase):
    """An http connector's auth and the keys that belong to each scheme."""

    def test_username_means_basic(self) -> None:
        """auth left empty with a username resolves to basic."""
        config = connector_x(HTTP_X + "username = relay-[SERIAL]\npassword = pw\n")
        self.assertEqual((config.auth, config.auth_scheme), ("basic", "basic"))
        self.assertEqual((config.username, config.password), ("relay-[SERIAL]", "pw"))

    def test_no_credentials_means_none(self) -> None:
        """auth left empty without credentials resolves to none."""
        self.assertEqual(connector_x(HTTP_X).auth, "none")

    def test_explicit_basic(self) -> None:
        """auth = basic with a username is basic."""
        self.assertEqual(connector_x(HTTP_X + "auth = basic\nusername = relay\n").auth, "basic")

    def test_basic_without_username(self) -> None:
        """auth = basic without a username is refused, naming username."""
        self.assert_error(HTTP_X + "auth = basic\n", "[connector:x] username", "missing")

    def test_password_without_username(self) -> None:
        """A password alone (auth empty) needs a username too."""
        self.assert_error(HTTP_X + "password = pw\n", "[connector:x] username", "missing")

    def test_none_with_username(self) -> None:
        """auth = none with a username is refused rather than silently sending Basic."""
        self.assert_error(
            HTTP_X + "auth = none\nusername = relay\n", "[connector:x] username", "does not apply"
        )

    def test_unknown_auth(self) -> None:
        """An unknown auth scheme is refused, quoting it."""
        self.assert_error(HTTP_X + "auth = digest\n", "[connector:x] auth", "digest")

    def test_azure_sas_default_resource(self) -> None:
        """auth = azure-sas takes sas_resource from the URL: host and path up to /messages."""
        config = connector_x(f"[connector:x]\ntype = http\nurl = {IOTHUB_URL}\nauth = azure-sas\n")
        self.assertEqual(
            (config.auth, config.sas_resource, config.sas_key, config.iothub),
            ("azure-sas", "myhub.azure-devices.net/devices/[CUSTOM1]", "[CUSTOM3]", False),
        )

    def test_azure_sas_explicit_resource(self) -> None:
        """An explicit sas_resource is kept instead of the URL's."""
        config = connector_x(
            f"[connector:x]\ntype = http\nurl = {IOTHUB_URL}\nauth = azure-sas\n"
            "sas_resource = myhub.azure-devices.net\n"
        )
        self.assertEqual(config.sas_resource, "myhub.azure-devices.net")

    def test_azure_sas_keys(self) -> None:
        """sas_key, sas_policy and token_ttl are kept with auth = azure-sas."""
        config = connector_x(
            f"[connector:x]\ntype = http\nurl = {IOTHUB_URL}\nauth = azure-sas\n"
            "sas_key = [CUSTOM2]\nsas_policy = device\ntoken_ttl = 600\n"
        )
        self.assertEqual(
            (config.sas_key, config.sas_policy, config.token_ttl), ("[CUSTOM2]", "device", 600)
        )

    def test_literal_sas_key_checked(self) -> None:
        """A sas_key written out (no placeholder) that is not base64 is refused without quoting it."""
        message = self.assert_error(
            f"[connector:x]\ntype = http\nurl = {IOTHUB_URL}\nauth = azure-sas\n"
            "sas_key = n0t-base64!s3cr3t\nsas_policy = device\n",
            "[connector:x] sas_key",
            "base64",
        )
        self.assertNotIn("s3cr3t", message)
        for key in ("c2FzLWtleQ==", "SharedAccessSignature sr=h&sig=s&se=1", "[CUSTOM3]"):
            connector_x(f"[connector:x]\ntype = azure-iothub\nhub = myhub\nsas_key = {key}\n")

    def test_oauth2(self) -> None:
        """auth = oauth2 keeps token_url, client_id, client_secret and scope."""
        config = connector_x(HTTP_X + "auth = oauth2\n" + OAUTH2_KEYS + "scope = telemetry.write\n")
        self.assertEqual(
            (config.auth, config.token_url, config.client_id, config.client_secret, config.scope),
            (
                "oauth2",
                "https://login.example.com/oauth2/token",
                "relay",
                "cl1ent-s3cret",
                "telemetry.write",
            ),
        )

    def test_oauth2_needs_each_key(self) -> None:
        """auth = oauth2 without token_url, client_id or client_secret is refused, naming it."""
        for key in ("token_url", "client_id", "client_secret"):
            keys = "".join(
                line + "\n" for line in OAUTH2_KEYS.splitlines() if not line.startswith(key)
            )
            self.assert_error(HTTP_X + "auth = oauth2\n" + keys, f"[connector:x] {key}", "missing")

    def test_bad_token_url(self) -> None:
        """A token_url that is not an http(s) URL is refused."""
        self.assert_error(
            HTTP_X + "auth = oauth2\n" + OAUTH2_KEYS.replace("https://", "ftp://"),
            "[connector:x] token_url",
        )

    def test_oauth2_keys_with_other_auth(self) -> None:
        """OAuth2 keys given with another auth are refused: they do not apply."""
        others = ("", "auth = none\n", "auth = basic\nusername = u\n", "auth = azure-sas\n")
        for auth in others:
            for line in OAUTH2_KEYS.splitlines() + ["scope = telemetry.write"]:
                key = line.split(" ")[0]
                self.assert_error(
                    HTTP_X + auth + line + "\n", f"[connector:x] {key}", "does not apply"
                )

    def test_sas_keys_with_other_auth(self) -> None:
        """sas_* keys and token_ttl given with auth other than azure-sas are refused."""
        others = ("", "auth = basic\nusername = u\n", "auth = oauth2\n" + OAUTH2_KEYS)
        for auth in others:
            for line in ("sas_key = [CUSTOM2]", "sas_policy = device", "sas_resource = h", "token_ttl = 60"):
                key = line.split(" ")[0]
                self.assert_error(
                    HTTP_X + auth + line + "\n", f"[connector:x] {key}", "does not apply"
                )

    def test_username_with_oauth2(self) -> None:
        """A username with auth = oauth2 is refused."""
        self.assert_error(
            HTTP_X + "auth = oauth2\n" + OAUTH2_KEYS + "username = relay\n",
            "[connector:x] username",
            "does not apply",
        )

    def test_password_with_azure_sas(self) -> None:
        """A password with auth = azure-sas is refused."""
        self.assert_error(
            HTTP_X + "auth = azure-sas\npassword = pw\n", "[connector:x] password", "does not apply"
        )

    def test_authorization_header_with_auth(self) -> None:
        """A header named Authorization (any case) conflicts with every auth scheme."""
        schemes = ("username = relay\n", "auth = azure-sas\n", "auth = oauth2\n" + OAUTH2_KEYS)
        for scheme in schemes:
            for name in ("Authorization", "authorization"):
                self.assert_error(
                    HTTP_X + scheme + f"header2 = {name}: Bearer [CUSTOM2]\n",
                    "[connector:x] header2",
                    "Authorization",
                )

    def test_authorization_header_without_auth(self) -> None:
        """Without auth an Authorization header is sent as configured."""
        config = connector_x(HTTP_X + "header1 = Authorization: Bearer [CUSTOM2]\n")
        self.assertEqual(config.headers, (("Authorization", "Bearer [CUSTOM2]"),))

    def test_token_ttl_positive_whole(self) -> None:
        """token_ttl must be a positive whole number of seconds, at most ten years."""
        for value in ("0", "-60", "1.5", "soon", "315360001", "9" * 400):
            self.assert_error(
                f"[connector:x]\ntype = http\nurl = {IOTHUB_URL}\nauth = azure-sas\n"
                f"token_ttl = {value}\n",
                "[connector:x] token_ttl",
            )


class ClientCertificateConfigTests(ConfigErrorAssertions, SynchronousTestCase):
    """client_cert (and client_key) must hold a PEM certificate and its key."""

    def setUp(self) -> None:
        self.cert_pem, self.key_pem = client_certificate_pem()

    def test_combined_file(self) -> None:
        """A file holding certificate and key loads as client_cert alone."""
        path = write_temp(self, self.cert_pem + self.key_pem)
        config = connector_x(HTTP_X + f"client_cert = {path}\n")
        self.assertEqual((config.client_cert, config.client_key), (path, ""))

    def test_two_files(self) -> None:
        """Certificate and key in two files load as client_cert and client_key."""
        cert, key = write_temp(self, self.cert_pem), write_temp(self, self.key_pem)
        config = connector_x(HTTP_X + f"client_cert = {cert}\nclient_key = {key}\n")
        self.assertEqual((config.client_cert, config.client_key), (cert, key))

    def test_key_without_cert(self) -> None:
        """client_key without client_cert is refused."""
        key = write_temp(self, self.key_pem)
        self.assert_error(HTTP_X + f"client_key = {key}\n", "[connector:x] client_key", "client_cert")

    def test_not_pem(self) -> None:
        """A client_cert that is not PEM is refused, naming client_cert."""
        path = write_temp(self, b"hello, not a certificate\n")
        self.assert_error(HTTP_X + f"client_cert = {path}\n", "[connector:x] client_cert", "PEM")

    def test_certificate_without_key(self) -> None:
        """A certificate without its private key is refused."""
        path = write_temp(self, self.cert_pem)
        self.assert_error(HTTP_X + f"client_cert = {path}\n", "[connector:x] client_cert", "client_key")

    def test_key_of_another_certificate(self) -> None:
        """A private key that does not match the certificate is refused."""
        _, other_key = client_certificate_pem("other")
        cert, key = write_temp(self, self.cert_pem), write_temp(self, other_key)
        self.assert_error(
            HTTP_X + f"client_cert = {cert}\nclient_key = {key}\n", "[connector:x] client_cert"
        )

    def test_missing_files(self) -> None:
        """A client_cert or client_key that cannot be read is refused, naming the key."""
        missing = os.path.join(self.mktemp(), "client.pem")
        self.assert_error(HTTP_X + f"client_cert = {missing}\n", "[connector:x] client_cert", missing)
        cert = write_temp(self, self.cert_pem)
        self.assert_error(
            HTTP_X + f"client_cert = {cert}\nclient_key = {missing}\n", "[connector:x] client_key"
        )

    def test_error_hides_key(self) -> None:
        """The error for a bad pair quotes nothing of the files."""
        path = write_temp(self, self.key_pem)
        message = self.assert_error(HTTP_X + f"client_cert = {path}\n", "[connector:x] client_cert")
        self.assertNotIn("PRIVATE KEY", message)
        self.assertNotIn(self.key_pem.splitlines()[1].decode(), message)


class AzureIotHubConfigTests(ConfigErrorAssertions, SynchronousTestCase):
    """type = azure-iothub is an http connector preset for Azure IoT Hub."""

    def test_hub_name(self) -> None:
        """hub = myhub gives the hub's URL, azure-sas auth, message ids and the device's resource."""
        config = connector_x("[connector:x]\ntype = azure-iothub\nhub = myhub\n")
        self.assertIsInstance(config, HttpConnectorConfig)
        self.assertEqual(
            (config.url, config.auth, config.iothub, config.sas_resource, config.sas_key),
            (IOTHUB_URL, "azure-sas", True, "myhub.azure-devices.net/devices/[CUSTOM1]", "[CUSTOM3]"),
        )
        self.assertEqual(config.auth_scheme, "azure-sas")

    def test_hub_host_name(self) -> None:
        """A hub given as a full host name is used as written."""
        config = connector_x("[connector:x]\ntype = azure-iothub\nhub = myhub.azure-devices.cn\n")
        self.assertTrue(config.url.startswith("https://myhub.azure-devices.cn/devices/[CUSTOM1]/"))

    def test_device_id_template(self) -> None:
        """device_id is a template in both the URL and the SAS resource."""
        config = connector_x(
            "[connector:x]\ntype = azure-iothub\nhub = myhub\ndevice_id = dm-[SERIAL]\n"
        )
        self.assertEqual(
            (config.url, config.sas_resource),
            (
                "https://myhub.azure-devices.net/devices/dm-[SERIAL]/messages/events"
                "?api-version=2021-04-12",
                "myhub.azure-devices.net/devices/dm-[SERIAL]",
            ),
        )

    def test_url_override(self) -> None:
        """An explicit url (a test double, say) is kept and gives the SAS resource."""
        url = "http://127.0.0.1:8080/devices/[CUSTOM1]/messages/events?api-version=2021-04-12"
        config = connector_x(f"[connector:x]\ntype = azure-iothub\nhub = myhub\nurl = {url}\n")
        self.assertEqual(
            (config.url, config.sas_resource, config.auth, config.iothub),
            (url, "127.0.0.1/devices/[CUSTOM1]", "azure-sas", True),
        )

    def test_sas_keys(self) -> None:
        """sas_key, sas_policy, sas_resource and token_ttl apply to an IoT Hub connector."""
        config = connector_x(
            "[connector:x]\ntype = azure-iothub\nhub = myhub\nsas_key = [CUSTOM2]\n"
            "sas_policy = device\nsas_resource = myhub.azure-devices.net\ntoken_ttl = 900\n"
        )
        self.assertEqual(
            (config.sas_key, config.sas_policy, config.sas_resource, config.token_ttl),
            ("[CUSTOM2]", "device", "myhub.azure-devices.net", 900),
        )

    def test_bad_hub(self) -> None:
        """A hub that is not a hub or host name is refused, naming hub."""
        for hub in ("my/hub", "https://myhub.azure-devices.net", "myhub:443"):
            self.assert_error(f"[connector:x]\ntype = azure-iothub\nhub = {hub}\n", "[connector:x] hub")

    def test_hub_missing(self) -> None:
        """An IoT Hub connector needs hub."""
        self.assert_error("[connector:x]\ntype = azure-iothub\n", "[connector:x] hub", "missing")

    def test_empty_device_id(self) -> None:
        """An empty device_id is refused."""
        self.assert_error(
            "[connector:x]\ntype = azure-iothub\nhub = myhub\ndevice_id =\n", "[connector:x] device_id"
        )

    def test_http_only_keys(self) -> None:
        """Keys of the http type that do not belong to azure-iothub are unknown keys."""
        for line in ("username = relay", "password = pw", "auth = oauth2", "token_url = https://l/t", "client_id = relay"):
            key = line.split(" ")[0]
            self.assert_error(
                f"[connector:x]\ntype = azure-iothub\nhub = myhub\n{line}\n",
                f"[connector:x] {key}",
                "unknown key",
            )


class SecretsReprTests(SynchronousTestCase):
    """No secret of the configuration shows in its repr()."""

    def test_not_in_repr(self) -> None:
        """password, client_secret, a literal sas_key, the API token and header values are hidden."""
        config = config_from_string(
            "[relay]\nconnector = basic\n"
            "[api]\nlisten = tcp:8080\ntoken = api-t0ken-1\n"
            "[connector:basic]\ntype = http\nurl = https://h/\nusername = relay\n"
            "password = pass-w0rd-2\nheader1 = X-Api-Key: head3r-val-3\n"
            "[connector:oauth]\ntype = http\nurl = https://h/\nauth = oauth2\n"
            "token_url = https://h/token\nclient_id = relay\nclient_secret = cl1ent-s3cret-4\n"
            "[connector:hub]\ntype = azure-iothub\nhub = myhub\n"
            "sas_key = c2FzLWtleS01LXNlY3JldA==\nsas_policy = device\n"
        )
        self.assertEqual(config.api.token, "api-t0ken-1")
        self.assertEqual(config.connectors["hub"].sas_key, "c2FzLWtleS01LXNlY3JldA==")
        for secret in (
            "api-t0ken-1",
            "pass-w0rd-2",
            "head3r-val-3",
            "cl1ent-s3cret-4",
            "c2FzLWtleS01LXNlY3JldA==",
        ):
            self.assertNotIn(secret, repr(config))
            self.assertNotIn(secret, str(config))

    def test_urls_not_in_repr(self) -> None:
        """The url and token_url, whose query may hold a key, are not in repr()."""
        config = config_from_string(
            "[connector:f]\ntype = http\nurl = https://h/api?code=funct10n-key-6\n"
            "auth = oauth2\ntoken_url = https://h/token?key=t0ken-url-key-7\n"
            "client_id = relay\nclient_secret = x\n"
        )
        for secret in ("funct10n-key-6", "t0ken-url-key-7"):
            self.assertNotIn(secret, repr(config))


class FilePathTests(ConfigErrorAssertions, SynchronousTestCase):
    """A file connector's path must be somewhere the relay can create it."""

    def test_missing_directory(self) -> None:
        """A path in a directory that does not exist is an error naming [connector:x] path."""
        self.assert_error(
            "[connector:x]\ntype = file\npath = /nonexistent-dir/uploads.jsonl\n",
            "[connector:x] path",
            "does not exist",
        )

    def test_existing_directory(self) -> None:
        """A path in an existing, writable directory loads."""
        directory = self.mktemp()
        os.makedirs(directory)
        path = os.path.join(directory, "uploads.jsonl")
        config = config_from_string(f"[connector:x]\ntype = file\npath = {path}\n")
        self.assertEqual(config.connectors["x"].path, path)


class SchemaTests(SynchronousTestCase):
    """The schema is declared once, by the config dataclasses' fields."""

    def test_field_defaults_are_the_keys_defaults(self) -> None:
        """A RelayConfig built in code equals one read from a file that sets no [relay] key."""
        loaded = config_from_string(FILE_CONNECTOR).relay
        self.assertEqual(dataclasses.replace(RelayConfig(), connector="main"), loaded)

    def test_every_key_documented(self) -> None:
        """Every key of every section has a one-line description for the reference."""
        for kind, keys in SCHEMA.items():
            for name, key in keys.items():
                self.assertTrue(key.doc and "\n" not in key.doc, f"{kind} {name}")

    def test_sections(self) -> None:
        """The schema lists [relay], [api] and each connector type, no more."""
        self.assertEqual(list(SCHEMA), ["relay", "api", "http", "azure-iothub", "tcp", "file"])

    def test_iothub_keys(self) -> None:
        """An azure-iothub section takes its own keys, headers and the shared HTTPS keys only."""
        self.assertEqual(
            set(SCHEMA["azure-iothub"]),
            {"hub", "device_id", "url", "header1", "header2", "header3", "timeout", "pool_size",
             "ca_file", "client_cert", "client_key", "sas_key", "sas_policy",
             "sas_resource", "token_ttl", "role", "max_attempts"},
        )

    def test_tls_client_endpoint_without_warning(self) -> None:
        """Parsing a tls: endpoint at load time emits no reactor deprecation warning."""
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            config = config_from_string(
                "[connector:x]\ntype = tcp\nendpoint = tls:host=example.com:port=5028\n"
            )
        self.assertEqual(config.connectors["x"].endpoint, "tls:host=example.com:port=5028")

    def test_leaf_module(self) -> None:
        """Importing oemrelay.config loads neither auth, registry nor twisted.internet.testing."""
        probe = (
            "import sys, oemrelay.config;"
            "print(sorted(m for m in ('oemrelay.auth', 'oemrelay.registry',"
            " 'twisted.internet.testing', 'twisted.internet.reactor') if m in sys.modules))"
        )
        output = subprocess.run(
            [sys.executable, "-c", probe], capture_output=True, text=True, check=True
        ).stdout
        self.assertEqual(output.strip(), "[]")


class HttpBodyConfigTests(ConfigErrorAssertions, SynchronousTestCase):
    """``body`` of an http connector: json (the default) or form."""

    SECTION = "[connector:main]\ntype = http\nurl = http://end.example/in\n"

    def test_default_json(self) -> None:
        """Without the key the body is JSON."""
        self.assertEqual(config_from_string(self.SECTION).connectors["main"].body, "json")

    def test_form(self) -> None:
        """body = form is taken."""
        config = config_from_string(self.SECTION + "body = form\n")
        self.assertEqual(config.connectors["main"].body, "form")

    def test_other_value_refused(self) -> None:
        """Any other body format is one line naming the section and key."""
        self.assert_error(self.SECTION + "body = xml\n", "[connector:main]", "body", "json or form")

    def test_not_for_iothub(self) -> None:
        """An azure-iothub connector always posts JSON: body is an unknown key there."""
        self.assert_error(
            "[connector:hub]\ntype = azure-iothub\nhub = myhub\nbody = form\n",
            "[connector:hub]",
            "body",
        )


TWO_CONNECTORS = FILE_CONNECTOR + "[connector:copy]\ntype = file\npath = copy.jsonl\n"


class DeliveryKeysTests(SynchronousTestCase):
    """[relay] connector lists, roles, commit_policy, retries and shutdown_grace."""

    def load(self, relay: str = "", connectors: str = TWO_CONNECTORS):
        return config_from_string(connectors + "[relay]\n" + relay, "relay.ini")

    def refused(self, relay: str, connectors: str = TWO_CONNECTORS) -> str:
        with self.assertRaises(ConfigError) as raised:
            self.load(relay, connectors)
        return str(raised.exception)

    def test_several_connectors(self) -> None:
        """connector = main copy names both sections."""
        self.assertEqual(self.load("connector = main copy\n").relay.connector, "main copy")

    def test_unknown_connector_in_list(self) -> None:
        """An unknown name anywhere in the list is refused, naming it."""
        self.assertEqual(
            self.refused("connector = main nope\n"),
            "relay.ini: [relay] connector: no section [connector:nope]",
        )

    def test_role_default_required(self) -> None:
        """A connector without role is required."""
        self.assertEqual(dict(self.load("connector = main\n").roles), {"main": "required", "copy": "required"})

    def test_role_best_effort(self) -> None:
        """role = best_effort is read per connector and is not passed to the connector's own config."""
        config = self.load("connector = main copy\n", TWO_CONNECTORS + "role = best_effort\n")
        self.assertEqual(config.roles["copy"], "best_effort")
        self.assertEqual(config.connectors["copy"].path, "copy.jsonl")

    def test_bad_role(self) -> None:
        """An unknown role names file, section and key."""
        message = self.refused("connector = main\n", TWO_CONNECTORS + "role = maybe\n")
        self.assertEqual(
            message,
            "relay.ini: [connector:copy] role: must be one of required, best_effort, got 'maybe'",
        )

    def test_commit_policy(self) -> None:
        """commit_policy defaults to delivered, takes spooled, refuses anything else."""
        self.assertEqual(self.load("connector = main\n").relay.commit_policy, "delivered")
        self.assertEqual(self.load("connector = main\ncommit_policy = spooled\n").relay.commit_policy, "spooled")
        self.assertIn("[relay] commit_policy: must be one of", self.refused("connector = main\ncommit_policy = later\n"))

    def test_retry_defaults(self) -> None:
        """retry_initial defaults to 0.5 s and retry_max to 5 s."""
        relay = self.load("connector = main\n").relay
        self.assertEqual((relay.retry_initial, relay.retry_max), (0.5, 5.0))

    def test_retry_initial_up_to_max(self) -> None:
        """retry_initial equal to retry_max is accepted; a bit longer is refused."""
        self.assertEqual(self.load("connector = main\nretry_initial = 2\nretry_max = 2\n").relay.retry_initial, 2.0)
        self.assertEqual(
            self.refused("connector = main\nretry_initial = 2.01\nretry_max = 2\n"),
            "relay.ini: [relay] retry_initial: must not be longer than retry_max",
        )

    def test_retry_max_zero_turns_retries_off(self) -> None:
        """retry_max = 0 is accepted (no retries) whatever retry_initial; a negative one is refused."""
        self.assertEqual(self.load("connector = main\nretry_max = 0\n").relay.retry_max, 0.0)
        self.assertIn("[relay] retry_max: must be a positive", self.refused("connector = main\nretry_max = -1\n"))

    def test_shutdown_grace_defaults_to_commit_timeout(self) -> None:
        """Without shutdown_grace a stopping relay waits commit_timeout; with it, that many seconds."""
        self.assertEqual(self.load("connector = main\ncommit_timeout = 12\n").relay.drain_seconds, 12.0)
        self.assertEqual(self.load("connector = main\nshutdown_grace = 3\n").relay.drain_seconds, 3.0)
        self.assertIn("[relay] shutdown_grace:", self.refused("connector = main\nshutdown_grace = 0\n"))


class ExposedSecretsTests(SynchronousTestCase):
    """A configuration file with secrets that every user may read draws one warning."""

    SECRET = b"[relay]\n[api]\nlisten = tcp:8080\ntoken = t0ken\n[connector:f]\ntype = file\npath = out.jsonl\n"
    PLAIN = b"[relay]\n[connector:f]\ntype = file\npath = out.jsonl\n"

    def config_with_mode(self, data: bytes, mode: int):
        from oemrelay.config import load_config

        path = write_temp(self, data)
        os.chmod(path, mode)
        return load_config(path)

    def test_world_readable_with_secrets_warned(self) -> None:
        """Mode 0644 and an API token: a warning naming the file and the fix."""
        from oemrelay.config import exposed_secrets_warning

        config = self.config_with_mode(self.SECRET, 0o644)
        warning = exposed_secrets_warning(config)
        self.assertIn(config.source, warning)
        self.assertIn("chmod o-r", warning)
        self.assertNotIn("t0ken", warning)

    def test_owner_and_group_only_not_warned(self) -> None:
        """Mode 0640 with secrets: no warning."""
        from oemrelay.config import exposed_secrets_warning

        self.assertIsNone(exposed_secrets_warning(self.config_with_mode(self.SECRET, 0o640)))

    def test_no_secrets_not_warned(self) -> None:
        """A world-readable file without secrets (the default sqlite registry, a file connector): no warning."""
        from oemrelay.config import exposed_secrets_warning

        self.assertIsNone(exposed_secrets_warning(self.config_with_mode(self.PLAIN, 0o644)))

    def test_what_counts_as_a_secret(self) -> None:
        """A password, a PostgreSQL URL with a password, a URL query count; a plain URL does not."""
        from oemrelay.config import holds_secrets

        base = "[relay]\n{relay}[connector:h]\ntype = http\nurl = {url}\n{extra}"
        cases = {
            ("", "http://h.example/p", ""): False,
            ("", "http://h.example/p?code=k", ""): True,
            ("", "http://h.example/p", "username = u\npassword = p\n"): True,
            ("registry = postgresql://u:pw@db/x\n", "http://h.example/p", ""): True,
            ("registry = postgresql://u@db/x\n", "http://h.example/p", ""): False,
        }
        for (relay, url, extra), expected in cases.items():
            config = config_from_string(base.format(relay=relay, url=url, extra=extra))
            self.assertEqual(holds_secrets(config), expected, (relay, url, extra))


class SpoolConfigTests(ConfigErrorAssertions, SynchronousTestCase):
    """[relay] spool, spool_max_records, spool_max_age and per-connector max_attempts."""

    def test_defaults(self) -> None:
        """Without the keys: sqlite:oemrelay-spool.sqlite, a million records, seven days, no attempt limit."""
        config = config_from_string(FILE_CONNECTOR)
        self.assertEqual(
            (config.relay.spool, config.relay.spool_max_records, config.relay.spool_max_age),
            ("sqlite:oemrelay-spool.sqlite", 1_000_000, 604800.0),
        )
        self.assertEqual(next(iter(config.connectors.values())).max_attempts, 0)

    def test_postgresql_spool(self) -> None:
        """A postgresql:// spool is kept as written and kept out of repr()."""
        url = "postgresql://relay:s3cret@db.example.com/oemrelay"
        config = config_from_string(f"[relay]\nspool = {url}\n" + FILE_CONNECTOR)
        self.assertEqual(config.relay.spool, url)
        self.assertNotIn("s3cret", repr(config.relay))

    def test_bad_spool(self) -> None:
        """A spool that is neither sqlite:PATH nor postgresql:// is a [relay] spool error."""
        self.assert_error(
            "[relay]\nspool = redis://x\n" + FILE_CONNECTOR, "[relay] spool", "must be sqlite:PATH"
        )

    def test_max_records_boundary(self) -> None:
        """spool_max_records 1 is accepted, 0 is an error naming the key."""
        config = config_from_string("[relay]\nspool_max_records = 1\n" + FILE_CONNECTOR)
        self.assertEqual(config.relay.spool_max_records, 1)
        self.assert_error(
            "[relay]\nspool_max_records = 0\n" + FILE_CONNECTOR,
            "[relay] spool_max_records",
            "must be 1 or more, got 0",
        )

    def test_max_records_not_a_number(self) -> None:
        """A spool_max_records that is not a whole number is an error."""
        self.assert_error(
            "[relay]\nspool_max_records = 1e6\n" + FILE_CONNECTOR,
            "[relay] spool_max_records",
            "must be a whole number",
        )

    def test_max_age_positive(self) -> None:
        """spool_max_age must be a positive number of seconds."""
        self.assert_error(
            "[relay]\nspool_max_age = 0\n" + FILE_CONNECTOR, "[relay] spool_max_age", "positive"
        )

    def test_max_attempts_per_connector(self) -> None:
        """max_attempts is read per connector for every type; 0 is allowed, -1 is not."""
        config = config_from_string(
            "[connector:a]\ntype = tcp\nendpoint = tcp:host=h:port=1\nmax_attempts = 3\n"
            "[connector:b]\ntype = http\nurl = http://h/\nmax_attempts = 0\n"
            "[relay]\nconnector = a\n"
        )
        self.assertEqual(
            (config.connectors["a"].max_attempts, config.connectors["b"].max_attempts), (3, 0)
        )
        self.assert_error(
            "[connector:a]\ntype = tcp\nendpoint = tcp:host=h:port=1\nmax_attempts = -1\n",
            "[connector:a] max_attempts",
            "must be 0 or more, got -1",
        )


class UnknownDevicesConfigTests(ConfigErrorAssertions, SynchronousTestCase):
    """[relay] unknown_devices: accept (the default) or reject."""

    def test_default_accept(self) -> None:
        """Without the key every device may upload."""
        self.assertEqual(config_from_string(FILE_CONNECTOR).relay.unknown_devices, "accept")

    def test_reject(self) -> None:
        """unknown_devices = reject is taken."""
        config = config_from_string("[relay]\nunknown_devices = reject\n" + FILE_CONNECTOR)
        self.assertEqual(config.relay.unknown_devices, "reject")

    def test_other_refused(self) -> None:
        """Any other value names the key."""
        self.assert_error(
            "[relay]\nunknown_devices = maybe\n" + FILE_CONNECTOR, "[relay] unknown_devices"
        )


class DevicesUseTlsTests(SynchronousTestCase):
    """devices_use_tls: whether workers must load pyOpenSSL (oemrelay.worker_main)."""

    def uses(self, text: str, relay: str = "") -> bool:
        return config_from_string(f"[relay]\nconnector = x\n{relay}" + text).devices_use_tls

    def test_plain_connectors_and_listeners(self) -> None:
        """http://, a tcp: endpoint and a file connector need no TLS."""
        self.assertFalse(
            self.uses(
                "[connector:x]\ntype = http\nurl = http://end.example.com/dm/[SERIAL]\n"
                "[connector:t]\ntype = tcp\nendpoint = tcp:host=127.0.0.1:port=5027\n"
                + FILE_CONNECTOR,
                "listen = tcp:20500 haproxy:tcp:20501\n",
            )
        )

    def test_each_tls_use(self) -> None:
        """An https URL (any case), token URL, ca_file, client_cert, IoT Hub, tls: endpoint or tls_listen each do."""
        cert = write_temp(self, b"".join(client_certificate_pem()))
        plain = "[connector:x]\ntype = http\nurl = http://end.example.com/dm\n"
        for text, relay in [
            (HTTP_X, ""),
            ("[connector:x]\ntype = http\nurl = HTTPS://end.example.com/dm\n", ""),
            (plain + "auth = oauth2\ntoken_url = https://id.example.com/token\n"
             "client_id = relay\nclient_secret = s\n", ""),
            (plain + f"ca_file = {cert}\n", ""),
            (plain + f"client_cert = {cert}\n", ""),
            ("[connector:x]\ntype = azure-iothub\nhub = myhub\nsas_key = c2VjcmV0\n", ""),
            (plain + "[connector:t]\ntype = tcp\nendpoint = tls:host=127.0.0.1:port=5028\n", ""),
            (plain, f"listen = ssl:20500:privateKey={cert}\n"),
            (plain, f"tls_listen = tcp:20501\ntls_cert = {cert}\n"),
        ]:
            with self.subTest(text=text, relay=relay):
                self.assertTrue(self.uses(text, relay))

    def test_unknown_connector_type_counts_as_tls(self) -> None:
        """A connector type the check does not know (a future broker's) counts as needing TLS."""
        config = config_from_string("[relay]\nconnector = main\n" + FILE_CONNECTOR)
        self.assertFalse(config.devices_use_tls)

        @dataclasses.dataclass(frozen=True)
        class BrokerConnectorConfig:
            name: str = "broker"

        self.assertTrue(
            dataclasses.replace(config, connectors={"main": BrokerConnectorConfig()}).devices_use_tls
        )

    def test_tls_versions_named_alike(self) -> None:
        """The versions the configuration accepts are the ones oemrelay.tls maps."""
        from oemrelay import config, tls

        self.assertEqual(tuple(tls.MIN_VERSIONS), config.TLS_MIN_VERSIONS)
