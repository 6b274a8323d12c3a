"""
TLS material read from PEM files, shared by the configuration checks and the
connectors that present it; the HTTPS connectors' trust (the platform's CAs,
``ca_file``, a client certificate); and the device listeners' TLS policy:
the lowest protocol version, the cipher suites, and device certificates
(mutual TLS) whose names are checked against the serial a device says hello
with.

Only this module imports pyOpenSSL and cryptography, and the others import it
where TLS is configured, not at their top: a worker whose relay uses no TLS
leaves them unloaded (:mod:`oemrelay.worker_main`).
"""

from __future__ import annotations

from cryptography import x509
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
# Twisted exports no public way to add one CA to the platform's; its trust-root
# interface has been stable since 14.0.
from twisted.internet._sslverify import IOpenSSLTrustRoot
from twisted.internet.ssl import (
    Certificate,
    CertificateOptions,
    PrivateCertificate,
    TLSVersion,
    optionsForClientTLS,
    platformTrust,
)
from twisted.web.client import BrowserLikePolicyForHTTPS
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from .config import TLS_MIN_VERSIONS

#: ``tls_min_version`` values (``config.TLS_MIN_VERSIONS``: "1.2" is TLSv1_2)
#: and the protocol version each stands for.
MIN_VERSIONS = {
    version: TLSVersion.lookupByName("TLSv" + version.replace(".", "_"))
    for version in TLS_MIN_VERSIONS
}


def check_ca_file(path: str) -> None:
    """
    :raises ValueError: if OpenSSL finds no PEM CA certificate in ``path``
        (the configuration's ``ca_file`` check).
    """
    try:
        SSL.Context(SSL.TLS_METHOD).load_verify_locations(path)
    except Exception:
        raise ValueError(f"{path!r} holds no PEM CA certificate") from None


def load_client_certificate(cert_file: str, key_file: str = "") -> PrivateCertificate:
    """The certificate and private key in ``cert_file`` (and ``key_file``)."""
    with open(cert_file, "rb") as f:
        pem = f.read()
    if key_file:
        with open(key_file, "rb") as f:
            pem += b"\n" + f.read()
    return PrivateCertificate.loadPEM(pem)


@implementer(IOpenSSLTrustRoot)
class PlatformTrustPlusCA:
    """Trust the system's CAs and one more, from ``ca_file`` (a private CA)."""

    def __init__(self, ca_file: str) -> None:
        self._ca_file = ca_file

    def _addCACertsToContext(self, context) -> None:  # noqa: N802 - Twisted's name
        context.set_default_verify_paths()
        context.load_verify_locations(self._ca_file)


@implementer(IPolicyForHTTPS)
class ClientCertificatePolicy:
    """Verified HTTPS that also presents a client certificate (mutual TLS)."""

    def __init__(self, trust_root, client_certificate: PrivateCertificate) -> None:
        self._trust_root = trust_root
        self._client_certificate = client_certificate

    def creatorForNetloc(self, hostname: bytes, port: int):  # noqa: N802 - Twisted's name
        return optionsForClientTLS(
            hostname.decode("ascii"),
            trustRoot=self._trust_root,
            clientCertificate=self._client_certificate,
        )


def client_tls_policy(ca_file: str, client_cert: str, client_key: str) -> IPolicyForHTTPS:
    """How HTTPS is verified: the platform's CAs plus ``ca_file``; ``client_cert`` presented."""
    trust = PlatformTrustPlusCA(ca_file) if ca_file else None
    if client_cert:
        return ClientCertificatePolicy(
            trust or platformTrust(), load_client_certificate(client_cert, client_key)
        )
    return BrowserLikePolicyForHTTPS(trustRoot=trust)


def server_tls_options(
    cert_file: str,
    key_file: str = "",
    *,
    min_version: str = "1.2",
    ciphers: str = "",
    client_ca: str = "",
) -> CertificateOptions:
    """
    The TLS settings of a device listener.

    :param min_version: ``1.2`` or ``1.3``; older clients fail the handshake.
    :param ciphers: empty for Twisted's defaults, or OpenSSL names joined by
        ``:``; those starting ``TLS_`` are TLS 1.3 suites, the others a TLS
        1.2 cipher string (``ECDHE-ECDSA-AES256-GCM-SHA384:TLS_AES_256_GCM_SHA384``).
    :param client_ca: a PEM file of the CA that signs device certificates;
        if given, a device without a certificate it signed fails the handshake.
    :raises ValueError: if a file or the cipher list is unusable; the
        message is one line.
    """
    if min_version not in MIN_VERSIONS:
        raise ValueError(f"tls_min_version must be 1.2 or 1.3, got {min_version!r}")
    certificate = load_client_certificate(cert_file, key_file)
    verify: dict = {}
    if client_ca:
        with open(client_ca, "rb") as f:
            authorities = [Certificate.loadPEM(pem).original for pem in _pem_blocks(f.read())]
        if not authorities:
            raise ValueError(f"{client_ca!r} holds no PEM certificate")
        verify = dict(verify=True, caCerts=authorities, requireCertificate=True)
    options = CertificateOptions(
        privateKey=certificate.privateKey.original,
        certificate=certificate.original,
        raiseMinimumTo=MIN_VERSIONS[min_version],
        **verify,
    )
    if ciphers:
        names = ciphers.split(":")
        tls13 = ":".join(name for name in names if name.startswith("TLS_"))
        tls12 = ":".join(name for name in names if not name.startswith("TLS_"))
        if min_version == "1.3" and not tls13:
            raise ValueError("tls_ciphers names no TLS_ suite, and tls_min_version is 1.3")
        # CertificateOptions keeps the context it makes: set the suites on it.
        context = options.getContext()
        try:
            # An empty list turns the version's suites off: none of it allowed.
            context.set_tls13_ciphersuites(tls13.encode("ascii"))
            if tls12:
                context.set_cipher_list(tls12.encode("ascii"))
            else:
                context.set_max_proto_version(SSL.TLS1_3_VERSION)
                context.set_min_proto_version(SSL.TLS1_3_VERSION)
        except SSL.Error:
            raise ValueError(f"tls_ciphers: OpenSSL knows none of {ciphers!r}") from None
    return options


def _pem_blocks(data: bytes) -> list[bytes]:
    marker = b"-----END CERTIFICATE-----"
    return [block + marker for block in data.split(marker) if b"-----BEGIN" in block]


def certificate_names(certificate: x509.Certificate) -> frozenset[str]:
    """The common names and the DNS, URI and e-mail SANs a certificate holds."""
    names = {
        attribute.value
        for attribute in certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    }
    try:
        alternatives = certificate.extensions.get_extension_for_class(
            x509.SubjectAlternativeName
        ).value
    except x509.ExtensionNotFound:
        alternatives = None
    if alternatives is not None:
        for kind in (x509.DNSName, x509.UniformResourceIdentifier, x509.RFC822Name):
            names.update(alternatives.get_values_for_type(kind))
    return frozenset(str(name) for name in names)
