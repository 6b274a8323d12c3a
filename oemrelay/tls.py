"""
TLS material read from PEM files, shared by the configuration checks and the
connectors that present it.
"""

from __future__ import annotations

from twisted.internet.ssl import PrivateCertificate


def load_client_certificate(cert_file: str, key_file: str = "") -> PrivateCertificate:
    """The certificate and private key in ``cert_file`` (and ``key_file``)."""
    with open(cert_file, "rb") as f:
        pem = f.read()
    if key_file:
        with open(key_file, "rb") as f:
            pem += b"\n" + f.read()
    return PrivateCertificate.loadPEM(pem)
