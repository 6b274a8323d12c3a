"""
Tests for the device listeners' TLS policy (:mod:`oemrelay.tls`): the lowest
version, the cipher suites and device certificates naming the hello's
serial, with real TLS handshakes over in-memory transports (iosim).
"""

from __future__ import annotations

import datetime

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL.crypto import X509, PKey
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import CertificateOptions, TLSVersion
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver, StringTransport
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.test.iosim import connectedServerAndClient
from twisted.trial.unittest import SynchronousTestCase

from oemrelay.config import ConfigError, config_from_string
from oemrelay.relay import Relay
from oemrelay.session import DeviceFactory
from oemrelay.tls import certificate_names, server_tls_options

from .fakes import FakeConnector
from .test_config import write_temp
from .test_session import DART_HELLO, DATA_2

SERIAL = "129336"
AES256_ONLY = "ECDHE-ECDSA-AES256-GCM-SHA384:TLS_AES_256_GCM_SHA384"


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def issue(
    common_name: str,
    issuer: tuple | None = None,
    *,
    dns: tuple[str, ...] = (),
    ca: bool = False,
) -> tuple:
    """A new (certificate, key) for ``common_name``, signed by ``issuer`` or self-signed."""
    key = ec.generate_private_key(ec.SECP256R1())
    issuer_certificate, issuer_key = issuer or (None, key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(issuer_certificate.subject if issuer_certificate else _name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(datetime.datetime(2020, 1, 1, tzinfo=datetime.timezone.utc))
        .not_valid_after(datetime.datetime(2100, 1, 1, tzinfo=datetime.timezone.utc))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if dns:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(name) for name in dns]), critical=False
        )
    return builder.sign(issuer_key, hashes.SHA256()), key


def pem(certificate, key=None) -> bytes:
    data = certificate.public_bytes(serialization.Encoding.PEM)
    if key is not None:
        data += key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    return data


class _Device(Protocol):
    """Says hello once connected and keeps what the relay answers."""

    def __init__(self, first: bytes = DART_HELLO) -> None:
        self.first = first
        self.received = b""
        self.lost = False

    def connectionMade(self) -> None:
        self.transport.write(self.first)

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason=None) -> None:
        self.lost = True


class TlsPolicyTests(SynchronousTestCase):
    """Handshakes against server_tls_options, in memory."""

    def setUp(self) -> None:
        self.ca = issue("device CA", ca=True)
        self.server_pem = write_temp(self, pem(*issue("relay.example")))
        self.ca_file = write_temp(self, pem(self.ca[0]))
        self.connector = FakeConnector()
        self.events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)

    def connect(
        self, server_options, client_options, first: bytes = DART_HELLO, *, mutual: bool = False
    ) -> _Device:
        """A device over TLS to a relay with ``server_options``; the device after the pumping."""
        devices = DeviceFactory(
            Relay({"main": self.connector}, "main"),
            Clock(),
            commit_timeout=20,
            idle_timeout=600,
            max_message=0xFFFF,
            device_certificates=mutual,
        )
        # TLS gathers small writes until the clock moves on.
        clock = Clock()
        server = TLSMemoryBIOFactory(server_options, False, devices, clock)
        device = _Device(first)
        client = TLSMemoryBIOFactory(
            client_options, True, Factory.forProtocol(lambda: device), clock
        )
        _, _, pump = connectedServerAndClient(
            lambda: server.buildProtocol(None), lambda: client.buildProtocol(None)
        )
        for _ in range(10):
            clock.advance(0)
            pump.flush()
        return device

    def client(self, certificate: tuple | None = None, **settings) -> CertificateOptions:
        if certificate is not None:
            settings.update(
                certificate=X509.from_cryptography(certificate[0]),
                privateKey=PKey.from_cryptography_key(certificate[1]),
            )
        return CertificateOptions(**settings)

    def answered(self, device: _Device) -> bool:
        return device.received.startswith(b"\x02\x55\x01")

    def test_tls12_accepted_by_default(self) -> None:
        """A TLS 1.2 device is served with the default tls_min_version 1.2."""
        device = self.connect(
            server_tls_options(self.server_pem),
            self.client(lowerMaximumSecurityTo=TLSVersion.TLSv1_2),
        )
        self.assertTrue(self.answered(device))

    def test_min_version_13_refuses_tls12(self) -> None:
        """With tls_min_version 1.3 a TLS 1.2 device fails the handshake and gets no answer."""
        device = self.connect(
            server_tls_options(self.server_pem, min_version="1.3"),
            self.client(lowerMaximumSecurityTo=TLSVersion.TLSv1_2),
        )
        self.assertFalse(self.answered(device))
        self.assertTrue(device.lost)

    def test_aes256_only_refuses_aes128(self) -> None:
        """tls_ciphers of AES-256-GCM suites refuses a TLS 1.2 device offering only AES-128-GCM."""
        options = server_tls_options(self.server_pem, ciphers=AES256_ONLY)
        client = self.client(lowerMaximumSecurityTo=TLSVersion.TLSv1_2)
        client.getContext().set_cipher_list(b"ECDHE-ECDSA-AES128-GCM-SHA256")
        self.assertFalse(self.answered(self.connect(options, client)))

    def test_aes256_only_accepts_aes256(self) -> None:
        """tls_ciphers of AES-256-GCM suites serves a device offering AES-256-GCM, in TLS 1.2 and 1.3."""
        options = server_tls_options(self.server_pem, ciphers=AES256_ONLY)
        tls12 = self.client(lowerMaximumSecurityTo=TLSVersion.TLSv1_2)
        tls12.getContext().set_cipher_list(b"ECDHE-ECDSA-AES256-GCM-SHA384")
        self.assertTrue(self.answered(self.connect(options, tls12)))
        self.assertTrue(self.answered(self.connect(options, self.client())))

    def test_aes256_only_refuses_tls13_aes128(self) -> None:
        """tls_ciphers of AES-256-GCM suites refuses a TLS 1.3 device offering only TLS_AES_128_GCM_SHA256."""
        options = server_tls_options(self.server_pem, ciphers=AES256_ONLY)
        client = self.client(raiseMinimumTo=TLSVersion.TLSv1_3)
        client.getContext().set_tls13_ciphersuites(b"TLS_AES_128_GCM_SHA256")
        self.assertFalse(self.answered(self.connect(options, client)))

    def mutual(self) -> object:
        return server_tls_options(self.server_pem, client_ca=self.ca_file)

    def test_device_certificate_naming_the_serial_served(self) -> None:
        """A device certificate from client_ca whose CN is the hello's serial: hello answered, records taken."""
        device = self.connect(
            self.mutual(), self.client(issue(SERIAL, self.ca)), DART_HELLO + DATA_2, mutual=True
        )
        self.assertTrue(self.answered(device))
        self.assertFalse(device.lost)

    def test_san_naming_the_serial_served(self) -> None:
        """A SAN (DNS name) equal to the serial is accepted as well as the CN."""
        device = self.connect(
            self.mutual(), self.client(issue("tracker", self.ca, dns=(SERIAL,))), mutual=True
        )
        self.assertTrue(self.answered(device))

    def test_certificate_of_another_serial_closed_after_hello(self) -> None:
        """A certificate naming another serial: closed at the hello, unanswered, logged with both identities."""
        device = self.connect(
            self.mutual(), self.client(issue("999", self.ca)), DART_HELLO + DATA_2, mutual=True
        )
        self.assertFalse(self.answered(device))
        self.assertTrue(device.lost)
        self.assertEqual(self.connector.links, [])
        warnings = [formatEvent(e) for e in self.events if e["log_level"] == LogLevel.warn]
        self.assertTrue(
            any(SERIAL in line and "999" in line for line in warnings), warnings
        )

    def test_no_certificate_fails_the_handshake(self) -> None:
        """Without a device certificate the handshake fails."""
        device = self.connect(self.mutual(), self.client(), mutual=True)
        self.assertFalse(self.answered(device))
        self.assertTrue(device.lost)

    def test_certificate_from_another_ca_fails(self) -> None:
        """A certificate naming the serial but signed by another CA fails the handshake."""
        other = issue("other CA", ca=True)
        device = self.connect(self.mutual(), self.client(issue(SERIAL, other)), mutual=True)
        self.assertFalse(self.answered(device))


class CertificateNamesTests(SynchronousTestCase):
    """The names a certificate is checked by."""

    def test_cn_and_dns_sans(self) -> None:
        """Common name and DNS SANs are the names."""
        certificate, _ = issue("a", dns=("b", "c"))
        self.assertEqual(certificate_names(certificate), {"a", "b", "c"})


class TlsConfigTests(SynchronousTestCase):
    """The [relay] TLS keys are checked before the relay starts."""

    def relay(self, lines: str) -> str:
        return f"[relay]\n{lines}[connector:f]\ntype = file\npath = out.jsonl\n"

    def refusal(self, lines: str) -> str:
        """The one-line error for a [relay] section of ``lines``."""
        with self.assertRaises(ConfigError) as raised:
            config_from_string(self.relay(lines))
        return str(raised.exception)

    def test_keys_need_tls_listen(self) -> None:
        """tls_cert without tls_listen is an error naming the key."""
        path = write_temp(self, pem(*issue("x")))
        self.assertIn("[relay] tls_cert: needs tls_listen", self.refusal(f"tls_cert = {path}\n"))

    def test_tls_listen_needs_a_certificate(self) -> None:
        """tls_listen without tls_cert is an error naming tls_cert."""
        self.assertIn("[relay] tls_cert: missing", self.refusal("tls_listen = tcp:20501\n"))

    def test_unknown_ciphers_refused(self) -> None:
        """A cipher list OpenSSL does not know is an error naming tls_ciphers."""
        path = write_temp(self, pem(*issue("x")))
        lines = f"tls_listen = tcp:20501\ntls_cert = {path}\ntls_ciphers = NOPE-CIPHER\n"
        self.assertIn("[relay] tls_ciphers", self.refusal(lines))

    def test_old_versions_refused(self) -> None:
        """tls_min_version 1.1 is refused: only 1.2 and 1.3 exist here."""
        self.assertIn("[relay] tls_min_version", self.refusal("tls_min_version = 1.1\n"))

    def test_full_tls_settings(self) -> None:
        """tls_listen with a certificate, 1.3, AES-256 suites and a client CA parses."""
        path = write_temp(self, pem(*issue("x")))
        ca = write_temp(self, pem(issue("ca", ca=True)[0]))
        config = config_from_string(
            self.relay(
                f"tls_listen = tcp:20501\ntls_cert = {path}\ntls_min_version = 1.3\n"
                f"tls_ciphers = {AES256_ONLY}\nclient_ca = {ca}\n"
            )
        )
        self.assertEqual(config.relay.tls_listen, ("tcp:20501",))
        self.assertEqual(config.relay.tls_min_version, "1.3")


class PlainListenerTests(SynchronousTestCase):
    """Device certificates are asked of TLS connections only."""

    def test_plain_tcp_device_served_with_client_ca_set(self) -> None:
        """A device on a plain listen endpoint is served when the factory checks TLS certificates."""
        devices = DeviceFactory(
            Relay({"main": FakeConnector()}, "main"),
            Clock(),
            commit_timeout=20,
            idle_timeout=600,
            max_message=0xFFFF,
            device_certificates=True,
        )
        protocol = devices.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        protocol.dataReceived(DART_HELLO)
        self.assertTrue(transport.value().startswith(b"\x02\x55\x01"))
