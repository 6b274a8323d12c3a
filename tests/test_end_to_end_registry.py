"""
End-to-end tests of the registry, the management API, commands and
per-device authentication: the real ``twistd oemrelay`` daemon in a
subprocess, driven over its API with treq and by scripted devices.

The daemon harness, the scripted device and the plain HTTP end server come
from :mod:`tests.test_end_to_end`.  Every relay here has a registry (SQLite in
the test's temporary directory, or a PostgreSQL schema of the test's own) and
an API on a loopback port read from its log.  Every test ends by stopping its
relays and checking that their whole output holds none of the secrets the
test used (API token, device keys, SAS signatures, OAuth client secret and
access tokens, Basic passwords).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import struct
import time
from base64 import b64encode
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any
from urllib.parse import quote, unquote

from treq.client import HTTPClient
from twisted.internet import ssl
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.task import deferLater
from twisted.protocols.policies import WrappingFactory
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.server import Site

from oemrelay.codec import MessageType

from .fake_azure import FakeIoTHub
from .fake_oauth import FakeOAuth
from .postgres import fresh_schema_url
from .test_end_to_end import (
    AUCKLAND,
    AUCKLAND_SEQ,
    COMMIT_OK,
    device_hello,
    COMMIT_REQUEST,
    DART_HELLO,
    DART_IMEI,
    DART_SERIAL,
    DENMARK,
    DENMARK_SEQ,
    FIXED,
    FIXED_SEQ,
    LISTEN,
    LOOPBACK,
    REPLY_TIMEOUT,
    START_TIMEOUT,
    STOP_TIMEOUT,
    _Daemon,
    _Device,
    _RelayTestCase,
    seq_numbers,
)

# Written out, not taken from the codec: these are the protocol's bytes.
ASYNC_SESSION_REQUEST = bytes.fromhex("0255220000")
ASYNC_SESSION_COMPLETE = bytes.fromhex("0255230000")
DART_ICCID = "89610185001824844630"
DART_FIRMWARE = "34.2.1.9"

HUB_HOST = "myhub.azure-devices.net"

_SITE_LISTENING = re.compile(rb"Site starting on (\d+)")
_REGISTRY_READY = re.compile(rb"registry \S+ ready;")


def async_response(message_id: int, status: int) -> bytes:
    """A device's 0x21: the message id it answers and its delivery status."""
    return bytes.fromhex("0255210500") + struct.pack("<IB", message_id, status)


def gather(*coroutines) -> Deferred:
    """Run coroutines concurrently; fire with their results in order."""
    return gatherResults([Deferred.fromCoroutine(c) for c in coroutines], consumeErrors=True)


def device_key() -> str:
    """A new random Azure device key, base64 as the portal shows it."""
    return b64encode(secrets.token_bytes(32)).decode("ascii")


def iso_in(seconds: float) -> str:
    """The ISO 8601 UTC time ``seconds`` from now."""
    moment = datetime.now(timezone.utc) + timedelta(seconds=seconds)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_iso(text: str) -> float:
    """Unix seconds of an API time such as ``2026-11-26T09:20:02Z``."""
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


# -- a test PKI: a CA, a server certificate for the hub, a client certificate --


def make_pki(directory: str) -> dict[str, str]:
    """
    Write a CA, a server certificate for ``localhost``/127.0.0.1 and a client
    certificate, both signed by the CA, as PEM files in ``directory``.

    :return: paths by name: ``ca``, ``server_cert``, ``server_key``,
        ``client_cert``, ``client_key``, and ``other_ca`` (an unrelated CA).
    """
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.now(timezone.utc)

    def name(common_name: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])

    def usage(**allowed: bool) -> x509.KeyUsage:
        flags = dict.fromkeys(
            (
                "digital_signature",
                "content_commitment",
                "key_encipherment",
                "data_encipherment",
                "key_agreement",
                "key_cert_sign",
                "crl_sign",
                "encipher_only",
                "decipher_only",
            ),
            False,
        )
        flags.update(allowed)
        return x509.KeyUsage(**flags)

    def builder(subject: str, issuer: x509.Name, public_key) -> x509.CertificateBuilder:
        return (
            x509.CertificateBuilder()
            .subject_name(name(subject))
            .issuer_name(issuer)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + timedelta(days=1))
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False
            )
        )

    def make_ca(common_name: str):
        key = ec.generate_private_key(ec.SECP256R1())
        certificate = (
            builder(common_name, name(common_name), key.public_key())
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(usage(key_cert_sign=True, crl_sign=True), critical=True)
            .sign(key, hashes.SHA256())
        )
        return key, certificate

    ca_key, ca = make_ca("oemrelay test CA")
    _, other_ca = make_ca("unrelated test CA")

    def leaf(common_name: str, purpose, names: list) -> tuple:
        key = ec.generate_private_key(ec.SECP256R1())
        certificate = (
            builder(common_name, ca.subject, key.public_key())
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(usage(digital_signature=True), critical=True)
            .add_extension(x509.ExtendedKeyUsage([purpose]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                critical=False,
            )
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        return key, certificate

    server_key, server = leaf(
        "localhost",
        ExtendedKeyUsageOID.SERVER_AUTH,
        [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(LOOPBACK))],
    )
    client_key, client = leaf(
        "oemrelay test relay", ExtendedKeyUsageOID.CLIENT_AUTH, [x509.DNSName("relay.test")]
    )

    def certificate_pem(certificate) -> bytes:
        return certificate.public_bytes(serialization.Encoding.PEM)

    def key_pem(key) -> bytes:
        return key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    files = {
        "ca": certificate_pem(ca),
        "other_ca": certificate_pem(other_ca),
        "server_cert": certificate_pem(server),
        "server_key": key_pem(server_key),
        "client_cert": certificate_pem(client),
        "client_key": key_pem(client_key),
    }
    paths = {}
    for file_name, data in files.items():
        paths[file_name] = os.path.join(directory, f"{file_name}.pem")
        with open(paths[file_name], "wb") as f:
            f.write(data)
    return paths


class _RecordingIoTHub(FakeIoTHub):
    """A FakeIoTHub that also keeps every Authorization header it was sent."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.authorizations: list[str] = []

    def render_POST(self, request):  # noqa: N802 - Twisted's name
        header = request.getHeader(b"authorization")
        if header is not None:
            self.authorizations.append(header.decode("latin-1"))
        return super().render_POST(request)


class _CountingFactory(WrappingFactory):
    """Counts the connections it accepts (TLS handshakes attempted)."""

    noisy = False

    def __init__(self, wrapped) -> None:
        super().__init__(wrapped)
        self.accepted = 0

    def buildProtocol(self, addr):  # noqa: N802 - Twisted's name
        self.accepted += 1
        return super().buildProtocol(addr)


# -- the relays --------------------------------------------------------------------


@dataclass
class _RelayProcess:
    """One running relay: its output, ports and API token."""

    name: str
    daemon: _Daemon
    transport: Any
    device_port: int
    api_port: int
    token: str


class _RegistryTestCase(_RelayTestCase):
    """Relays with a registry and an API; secrets remembered and looked for in logs."""

    def setUp(self) -> None:
        super().setUp()
        self.relays: list[_RelayProcess] = []
        #: Secret values this test used, by what they are.
        self.secrets: dict[str, str] = {}
        self.workdir = os.path.abspath(self.mktemp())
        os.makedirs(self.workdir)
        pool = HTTPConnectionPool(self.reactor, persistent=False)
        self.http = HTTPClient(Agent(self.reactor, pool=pool, connectTimeout=5))
        self.addCleanup(pool.closeCachedConnections)


    async def start_platform_relay(self, server, archive: str) -> _RelayProcess:
        """A relay (SQLite registry) posting to ``server`` by default, with an ``archive`` file connector."""
        config, token = self.relay_config(
            templated_http_connector("platform", server.port) + "\n" + file_connector("archive", archive),
            registry=self.sqlite_registry(),
            default="platform",
        )
        return await self.start_relay(config, token)

    async def start_archive_relay(self, registry: str) -> _RelayProcess:
        """A relay with ``registry`` whose devices' uploads go to a file connector."""
        config, token = self.relay_config(
            file_connector("archive", self.path("uploads.jsonl")),
            registry=registry,
            default="archive",
        )
        return await self.start_relay(config, token)
    def _daemon_output(self) -> str:
        return "".join(
            f"\n--- {relay.name} output ---\n"
            + relay.daemon.output.decode("utf-8", "replace")[-4000:]
            for relay in self.relays
        ) or super()._daemon_output()

    def secret(self, what: str, value: str) -> str:
        """Remember ``value`` as a secret the relays must never log; return it."""
        self.secrets[what] = value
        return value

    def path(self, name: str) -> str:
        """A path in this test's directory."""
        return os.path.join(self.workdir, name)

    def sqlite_registry(self) -> str:
        """A registry URL for a new SQLite file in this test's directory."""
        return f"sqlite:{self.path('registry.sqlite')}"

    def relay_config(
        self, connectors: str, *, registry: str, default: str, node: str = "node-a",
        profile_cache_seconds: float = 5, workers: int = 1,
    ) -> tuple[str, str]:
        """A whole configuration with ``connectors``, and its new API token."""
        token = self.secret(f"API token of {node}", secrets.token_urlsafe(24))
        return (
            f"""\
[relay]
listen = {LISTEN}
connector = {default}
commit_timeout = 5
idle_timeout = 30
registry = {registry}
node = {node}
profile_cache_seconds = {profile_cache_seconds}
workers = {workers}

[api]
listen = {LISTEN}
token = {token}

{connectors}""",
            token,
        )

    async def start_relay(
        self, config: str, token: str, name: str = "relay", *, registry_ready: bool = True
    ) -> _RelayProcess:
        """
        Start a relay; return once it listens and, if ``registry_ready``, once
        its registry is ready and its API answers.
        """
        config_path = self.path(f"{name}.ini")
        with open(config_path, "w", encoding="utf-8") as f:
            f.write(config)
        daemon, transport = self.spawn_twistd(config_path)
        self.daemon = daemon
        await self.wait_until(
            lambda: daemon.ended
            or (
                daemon.port is not None
                and _SITE_LISTENING.search(daemon.output) is not None
                and (not registry_ready or _REGISTRY_READY.search(daemon.output) is not None)
            ),
            f"{name} to listen and open its registry",
            START_TIMEOUT,
        )
        if daemon.ended:
            self.fail(f"{name} exited with status {daemon.exit_code}{self._daemon_output()}")
        api_port = int(_SITE_LISTENING.search(daemon.output).group(1))
        relay = _RelayProcess(name, daemon, transport, daemon.port, api_port, token)
        self.relays.append(relay)
        if registry_ready:
            code, body = await self.api(relay, "GET", "/api/devices")
            self.assertEqual(code, 200, body)
        return relay

    async def api(
        self,
        relay: _RelayProcess,
        method: str,
        path: str,
        body: Any = None,
        *,
        csv: str | None = None,
        token: str | None = None,
    ) -> tuple[int, Any]:
        """One API request over real HTTP: the status and the decoded JSON answer."""
        headers = {b"Authorization": [f"Bearer {token or relay.token}".encode("ascii")]}
        data = None
        if body is not None:
            data = json.dumps(body).encode("utf-8")
            headers[b"Content-Type"] = [b"application/json"]
        elif csv is not None:
            data = csv.encode("utf-8")
            headers[b"Content-Type"] = [b"text/csv"]
        url = f"http://{LOOPBACK}:{relay.api_port}{path}"
        request = self.http.request(method, url, data=data, headers=headers)
        response = await request.addTimeout(REPLY_TIMEOUT, self.reactor)
        content = await response.content().addTimeout(REPLY_TIMEOUT, self.reactor)
        return response.code, json.loads(content)

    async def api_until(
        self,
        relay: _RelayProcess,
        path: str,
        predicate: Callable[[Any], bool],
        what: str,
    ) -> Any:
        """GET ``path`` until its answer is a 200 ``predicate`` accepts; that answer."""
        deadline = time.monotonic() + REPLY_TIMEOUT
        while True:
            code, body = await self.api(relay, "GET", path)
            if code == 200 and predicate(body):
                return body
            if time.monotonic() > deadline:
                self.fail(
                    f"timed out waiting for {what}; last answer {code}"
                    f" {json.dumps(body)[:1500]}{self._daemon_output()}"
                )
            await deferLater(self.reactor, 0.05, lambda: None)

    def listen_tls(self, factory, options: ssl.CertificateOptions) -> tuple[int, _CountingFactory]:
        """Serve ``factory`` over TLS on a loopback port; closed in cleanup."""
        wrapper = _CountingFactory(factory)
        port = self.reactor.listenSSL(0, wrapper, options, interface=LOOPBACK)
        self.close_in_cleanup(port, wrapper, "TLS connections")
        return port.getHost().port, wrapper

    async def upload(self, device: _Device, *frames: bytes) -> None:
        """Send ``frames`` and a commit request; wait for one more 0x06."""
        commits = device.types().count(MessageType.COMMIT_RESPONSE)
        device.send(*frames, COMMIT_REQUEST)
        await self.wait_until(
            lambda: device.types().count(MessageType.COMMIT_RESPONSE) > commits or device.closed,
            "the commit answer",
        )
        self.assertEqual(device.frames[-1].to_bytes(), COMMIT_OK)

    async def hello(self, relay: _RelayProcess, name: str = "device", hello: bytes = DART_HELLO) -> _Device:
        """A device connected to ``relay`` that has had its hello answered."""
        device = await self.connect_device(relay.device_port, name)
        device.send(hello)
        await self.wait_until(lambda: device.got(MessageType.HELLO_RESPONSE), f"{name}'s 0x01")
        return device

    async def assert_secrets_not_logged(self) -> None:
        """Stop every relay, then check no secret is anywhere in its whole output."""
        for relay in self.relays:
            if not relay.daemon.ended:
                try:
                    relay.transport.signalProcess("TERM")
                except ProcessExitedAlready:
                    pass
        await self.wait_until(
            lambda: all(relay.daemon.ended for relay in self.relays),
            "the relays to stop",
            STOP_TIMEOUT,
        )
        self.assertTrue(self.relays)
        self.assertTrue(self.secrets)
        for relay in self.relays:
            output = relay.daemon.output.decode("utf-8", "replace")
            self.assertIn("Server Shut Down.", output)
            leaked = [what for what, value in self.secrets.items() if value in output]
            self.assertEqual(leaked, [], f"secrets in {relay.name}'s output")


def file_connector(name: str, path: str) -> str:
    """A ``[connector:NAME]`` section appending uploads to ``path``."""
    return f"[connector:{name}]\ntype = file\npath = {path}\n"


def read_lines(path: str) -> list[dict]:
    """The JSON documents of a file connector's output (none if absent)."""
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f.read().splitlines()]


# -- the scenarios -----------------------------------------------------------------


class CommandEndToEndTests(_RegistryTestCase):
    """Commands queued through the API and sent in the device's async session."""

    async def test_commands_sent_one_at_a_time_and_results_recorded(self) -> None:
        """On 0x22 each due command goes out as 0x20 after the previous 0x21, then 0x23; the API shows the results."""
        relay = await self.start_archive_relay(self.sqlite_registry())
        device = await self.hello(relay)
        await self.api_until(relay, f"/api/devices/{DART_SERIAL}", lambda d: d["connected"], "the hello")
        commands = f"/api/devices/{DART_SERIAL}/commands"

        code, odometer = await self.api(relay, "POST", commands, {"type": "set_odometer", "metres": 10000})
        self.assertEqual((code, odometer["status"]), (202, "queued"))
        code, immobilise = await self.api(relay, "POST", commands, {"type": "immobilise", "on": True})
        self.assertEqual((code, immobilise["status"]), (202, "queued"))
        code, later = await self.api(
            relay,
            "POST",
            commands,
            {"type": "set_run_hours", "seconds": 3600, "send_after": iso_in(86400)},
        )
        self.assertEqual((code, later["status"]), (202, "queued"))
        first_id, second_id = odometer["id"], immobilise["id"]

        device.send(ASYNC_SESSION_REQUEST)
        await self.wait_until(lambda: device.got(MessageType.ASYNC_MESSAGE), "the first 0x20")
        # The second command waits for the device's answer to the first.
        await deferLater(self.reactor, 0.3, lambda: None)
        self.assertEqual(device.types().count(MessageType.ASYNC_MESSAGE), 1)
        self.assertEqual(
            device.frames[-1].to_bytes(),
            bytes.fromhex("0255200f00")
            + struct.pack("<I", first_id)
            + bytes.fromhex("ffffffff 1200 00 e8030000"),
        )
        listed = (await self.api(relay, "GET", commands))[1]["commands"]
        self.assertEqual([c["status"] for c in listed], ["sent", "queued", "queued"])

        device.send(async_response(first_id, 1))
        await self.wait_until(
            lambda: device.types().count(MessageType.ASYNC_MESSAGE) == 2, "the second 0x20"
        )
        self.assertEqual(
            device.frames[-1].to_bytes(),
            bytes.fromhex("0255200c00")
            + struct.pack("<I", second_id)
            + bytes.fromhex("ffffffff 0001 00 01"),
        )
        device.send(async_response(second_id, 0))
        await self.wait_until(
            lambda: device.got(MessageType.ASYNC_SESSION_COMPLETE), "the 0x23"
        )
        self.assertEqual(device.frames[-1].to_bytes(), ASYNC_SESSION_COMPLETE)
        self.assertEqual(
            device.types(),
            [
                MessageType.HELLO_RESPONSE,
                MessageType.ASYNC_MESSAGE,
                MessageType.ASYNC_MESSAGE,
                MessageType.ASYNC_SESSION_COMPLETE,
            ],
        )

        listed = (
            await self.api_until(
                relay,
                commands,
                lambda body: [c["status"] for c in body["commands"]]
                == ["delivered", "failed", "queued"],
                "the command results",
            )
        )["commands"]
        delivered, failed, held = listed
        self.assertEqual(
            (delivered["id"], delivered["type"], delivered["params"], delivered["device_status"]),
            (first_id, "set_odometer", {"metres": 10000}, 1),
        )
        self.assertEqual(
            (failed["id"], failed["type"], failed["params"], failed["device_status"]),
            (second_id, "immobilise", {"on": True}, 0),
        )
        for done in (delivered, failed):
            self.assertLessEqual(parse_iso(done["created"]), parse_iso(done["sent"]))
            self.assertLessEqual(parse_iso(done["sent"]), parse_iso(done["completed"]))
            self.assertLess(abs(parse_iso(done["completed"]) - time.time()), 60)
        self.assertEqual((held["sent"], held["completed"]), (None, None))
        self.assertIsNotNone(held["send_after"])
        code, shown = await self.api(relay, "GET", f"/api/devices/{DART_SERIAL}")
        self.assertEqual((code, shown["pending_commands"]), (200, 1))
        self.assertFalse(device.closed)
        await self.assert_secrets_not_logged()

    async def test_device_view_follows_the_connection(self) -> None:
        """GET /api/devices/{serial} shows the hello's identity, connected, records committed, then disconnected."""
        relay = await self.start_archive_relay(self.sqlite_registry())
        path = f"/api/devices/{DART_SERIAL}"
        code, body = await self.api(relay, "GET", path)
        self.assertEqual((code, body), (404, {"error": f"no device with serial {DART_SERIAL}"}))

        device = await self.hello(relay)
        shown = await self.api_until(relay, path, lambda d: d["connected"], "the hello")
        self.assertEqual(
            {key: shown[key] for key in ("serial", "imei", "iccid", "product_id", "hardware_rev", "firmware", "node")},
            {
                "serial": DART_SERIAL,
                "imei": DART_IMEI,
                "iccid": DART_ICCID,
                "product_id": 34,
                "hardware_rev": 2,
                "firmware": DART_FIRMWARE,
                "node": "node-a",
            },
        )
        self.assertEqual((shown["records_committed"], shown["last_upload"]), (0, None))

        await self.upload(device, DENMARK)
        shown = await self.api_until(
            relay, path, lambda d: d["records_committed"] == len(DENMARK_SEQ), "the commit count"
        )
        self.assertTrue(shown["connected"])
        self.assertIsNotNone(shown["last_upload"])
        self.assertIsNone(shown["last_error"])

        device.transport.loseConnection()
        shown = await self.api_until(relay, path, lambda d: not d["connected"], "the disconnection")
        self.assertEqual(shown["records_committed"], len(DENMARK_SEQ))
        self.assertEqual(shown["imei"], DART_IMEI)
        await self.assert_secrets_not_logged()


class ConnectionStateEndToEndTests(_RegistryTestCase):
    """Whether the registry shows a device connected, as connections come and go."""

    async def test_reconnect_before_old_connection_closes(self) -> None:
        """A device connecting again before its old connection closes stays shown connected until the new one closes."""
        relay = await self.start_archive_relay(self.sqlite_registry())
        path = f"/api/devices/{DART_SERIAL}"
        old = await self.hello(relay, "old connection")
        await self.api_until(relay, path, lambda d: d["connected"], "the first connection")
        new = await self.hello(relay, "new connection")
        await self.upload(new, DENMARK)

        old.transport.loseConnection()
        await self.wait_until(
            lambda: relay.daemon.output.count(f"device {DART_SERIAL} from".encode()) == 1,
            "the relay to notice the old connection closed",
        )
        # SQLite runs registry calls one at a time, in order: once the
        # batched commit count is written, anything the old connection's end
        # wrote is in too.
        shown = await self.api_until(
            relay, path, lambda d: d["records_committed"] == 2, "the batched commit count"
        )
        self.assertTrue(shown["connected"])

        new.transport.loseConnection()
        await self.api_until(relay, path, lambda d: not d["connected"], "the disconnection")
        await self.assert_secrets_not_logged()


def templated_http_connector(name: str, port: int) -> str:
    """An http connector posting to ``/dm/[CUSTOM1]`` with ``X-Key: [CUSTOM2]``."""
    return f"""\
[connector:{name}]
type = http
url = http://{LOOPBACK}:{port}/dm/[CUSTOM1]
header1 = X-Key: [CUSTOM2]
timeout = 5
"""


class DeviceSettingsEndToEndTests(_RegistryTestCase):
    """Custom fields and connector overrides set through the API of a running relay."""

    async def test_settings_apply_to_next_upload_without_restart(self) -> None:
        """PUT custom fields, then a connector override: each changes the very next upload on the same connection."""
        server = self.start_http_server()
        archive = self.path("archive.jsonl")
        relay = await self.start_platform_relay(server, archive)
        device = await self.hello(relay)
        # Connections reach the registry within a second: the PUT below
        # changes the device the hello entered, rather than creating it.
        await self.api_until(relay, f"/api/devices/{DART_SERIAL}", lambda d: d["connected"], "the hello")

        await self.upload(device, DENMARK)
        self.assertEqual(len(server.requests), 1)
        self.assertEqual(server.requests[0].uri, "/dm/")
        self.assertEqual(server.requests[0].headers.get("x-key"), [""])
        self.assertEqual(seq_numbers(server.requests[0].body), DENMARK_SEQ)

        key = self.secret("X-Key header value", secrets.token_urlsafe(18))
        code, shown = await self.api(
            relay,
            "PUT",
            f"/api/devices/{DART_SERIAL}",
            {"custom1": "depot 4/truck-17", "custom2": key},
        )
        self.assertEqual(code, 200, shown)
        self.assertEqual((shown["custom1"], shown["custom2"]), ("depot 4/truck-17", key))
        await self.upload(device, AUCKLAND)
        self.assertEqual(len(server.requests), 2)
        self.assertEqual(server.requests[1].uri, "/dm/depot%204%2Ftruck-17")
        self.assertEqual(server.requests[1].headers["x-key"], [key])
        self.assertEqual(seq_numbers(server.requests[1].body), AUCKLAND_SEQ)

        code, shown = await self.api(relay, "PUT", f"/api/devices/{DART_SERIAL}", {"connector": "archive"})
        self.assertEqual((code, shown["connector"], shown["custom1"]), (200, "archive", "depot 4/truck-17"))
        await self.upload(device, FIXED)
        self.assertEqual(
            [[record["SeqNo"] for record in doc["Records"]] for doc in read_lines(archive)],
            [FIXED_SEQ],
        )
        self.assertEqual(len(server.requests), 2)
        self.assertFalse(device.closed)
        await self.assert_secrets_not_logged()

    async def test_csv_import_is_all_or_nothing(self) -> None:
        """A CSV with a bad row imports nothing; a good one creates every device, which its next upload uses."""
        server = self.start_http_server()
        archive = self.path("archive.jsonl")
        relay = await self.start_platform_relay(server, archive)
        keys = [self.secret(f"imported key {n}", secrets.token_urlsafe(18)) for n in range(3)]

        bad = (
            "serial,custom1,custom2,custom3,connector\n"
            f"700001,alpha,{keys[0]},,\n"
            f"700002,bravo,{keys[1]},,archive\n"
            f"700003,charlie,{keys[2]},,nowhere\n"
        )
        code, body = await self.api(relay, "POST", "/api/devices/import", csv=bad)
        self.assertEqual(code, 400)
        self.assertIn("line 4", body["error"])
        self.assertIn("nowhere", body["error"])
        code, listing = await self.api(relay, "GET", "/api/devices")
        self.assertEqual((code, listing), (200, {"devices": [], "next": None}))

        good = bad.replace("nowhere", "")
        code, body = await self.api(relay, "POST", "/api/devices/import", csv=good)
        self.assertEqual((code, body), (200, {"created": 3, "updated": 0}))
        code, listing = await self.api(relay, "GET", "/api/devices?limit=2")
        self.assertEqual(code, 200)
        self.assertEqual(
            [(d["serial"], d["custom1"], d["custom2"], d["connector"]) for d in listing["devices"]],
            [(700001, "alpha", keys[0], None), (700002, "bravo", keys[1], "archive")],
        )
        self.assertEqual(listing["next"], 700002)
        code, listing = await self.api(relay, "GET", "/api/devices?after=700002")
        self.assertEqual(
            [(d["serial"], d["custom1"], d["connector"]) for d in listing["devices"]],
            [(700003, "charlie", None)],
        )
        code, body = await self.api(
            relay, "POST", "/api/devices/import", csv="700003,delta,,\n700004,echo,,\n"
        )
        self.assertEqual((code, body), (200, {"created": 1, "updated": 1}))

        first = await self.hello(relay, "alpha", device_hello(700001))
        await self.upload(first, DENMARK)
        second = await self.hello(relay, "bravo", device_hello(700002))
        await self.upload(second, FIXED)
        self.assertEqual([post.uri for post in server.requests], ["/dm/alpha"])
        self.assertEqual(server.requests[0].headers["x-key"], [keys[0]])
        self.assertEqual([doc["SerNo"] for doc in read_lines(archive)], [700002])
        await self.assert_secrets_not_logged()


class AzureIoTHubEndToEndTests(_RegistryTestCase):
    """An azure-iothub connector against a fake hub over HTTPS with mutual TLS."""

    async def start_hub_relay(self) -> tuple[_RecordingIoTHub, _CountingFactory, _RelayProcess]:
        """A fake hub requiring client certificates, and a relay with a connector to it with and one without a certificate."""
        pki = make_pki(self.workdir)
        with open(pki["server_cert"], "rb") as f, open(pki["server_key"], "rb") as g:
            server = ssl.PrivateCertificate.loadPEM(f.read() + g.read())
        with open(pki["ca"], "rb") as f:
            ca = ssl.Certificate.loadPEM(f.read())
        options = ssl.CertificateOptions(
            privateKey=server.privateKey.original,
            certificate=server.original,
            verify=True,
            caCerts=[ca.original],
            requireCertificate=True,
        )
        hub = _RecordingIoTHub({}, clock=self.reactor, hostname=HUB_HOST)
        site = Site(hub)
        site.noisy = False
        port, handshakes = self.listen_tls(site, options)
        url = f"https://localhost:{port}/devices/[CUSTOM1]/messages/events?api-version=2021-04-12"
        common = f"""\
type = azure-iothub
hub = myhub
url = {url}
sas_resource = {HUB_HOST}/devices/[CUSTOM1]
ca_file = {pki["ca"]}
timeout = 5
"""
        connectors = (
            f"[connector:hub]\n{common}client_cert = {pki['client_cert']}\n"
            f"client_key = {pki['client_key']}\n\n[connector:nocert]\n{common}"
        )
        config, token = self.relay_config(connectors, registry=self.sqlite_registry(), default="hub")
        relay = await self.start_relay(config, token)
        return hub, handshakes, relay

    async def load_device(self, relay: _RelayProcess, serial: int, device_id: str, key: str, **more: str) -> None:
        """Load a device's IoT Hub id and key through the API."""
        code, shown = await self.api(
            relay, "PUT", f"/api/devices/{serial}", {"custom1": device_id, "custom3": key, **more}
        )
        self.assertEqual(code, 201, shown)

    def remember_signatures(self, hub: _RecordingIoTHub) -> None:
        """Every SAS signature the hub saw, URL-encoded and decoded, as secrets."""
        self.assertTrue(hub.authorizations)
        for number, header in enumerate(hub.authorizations):
            self.assertTrue(header.startswith("SharedAccessSignature "), header)
            (signature,) = re.findall(r"sig=([^&]+)", header)
            self.secret(f"SAS signature {number}", signature)
            self.secret(f"SAS signature {number} decoded", unquote(signature))

    async def test_signed_upload_accepted_over_mutual_tls(self) -> None:
        """A device whose id and key came through the API uploads; the hub checks its SAS, answers 204, the device gets 0x06 01."""
        hub, handshakes, relay = await self.start_hub_relay()
        key = self.secret("device key", device_key())
        hub.devices["truck-1"] = key
        await self.load_device(relay, DART_SERIAL, "truck-1", key)

        device = await self.hello(relay)
        await self.upload(device, DENMARK)

        self.assertEqual(hub.rejections, [])
        self.assertEqual(len(hub.messages), 1)
        message = hub.messages[0]
        self.assertEqual(message.device_id, "truck-1")
        self.assertEqual(message.message_id, f"dm-{DART_SERIAL}-{DENMARK_SEQ[0]}")
        self.assertEqual(seq_numbers(message.body), DENMARK_SEQ)
        self.assertIn(f"sr={quote(HUB_HOST + '/devices/truck-1', safe='')}", hub.authorizations[0])
        self.assertGreaterEqual(handshakes.accepted, 1)
        shown = await self.api_until(
            relay, f"/api/devices/{DART_SERIAL}", lambda d: d["records_committed"] == 2, "the commit"
        )
        self.assertIsNone(shown["last_error"])
        self.remember_signatures(hub)
        await self.assert_secrets_not_logged()

    async def test_wrong_key_is_refused_and_not_committed(self) -> None:
        """A device with a wrong key: the hub answers 401, the device gets no 0x06 and is disconnected."""
        hub, _, relay = await self.start_hub_relay()
        hub.devices["truck-2"] = self.secret("hub's device key", device_key())
        wrong = self.secret("wrong device key", device_key())
        await self.load_device(relay, 700002, "truck-2", wrong)

        device = await self.hello(relay, "truck-2", device_hello(700002))
        device.send(DENMARK, COMMIT_REQUEST)
        await self.wait_until(lambda: device.closed, "the relay to close the device")

        self.assertEqual(device.types(), [MessageType.HELLO_RESPONSE])
        self.assertEqual(hub.messages, [])
        self.assertEqual(
            [(r.device_id, r.code, r.reason) for r in hub.rejections],
            [("truck-2", 401, "wrong signature")],
        )
        shown = await self.api_until(
            relay, "/api/devices/700002", lambda d: d["last_error"] is not None, "the delivery error"
        )
        self.assertEqual(shown["records_committed"], 0)
        self.assertIn("answered 401", shown["last_error"])
        self.remember_signatures(hub)
        await self.assert_secrets_not_logged()

    async def test_no_client_certificate_fails_the_handshake(self) -> None:
        """A connector without client_cert cannot complete TLS with the hub: nothing reaches it, nothing is committed."""
        hub, handshakes, relay = await self.start_hub_relay()
        key = self.secret("device key", device_key())
        hub.devices["truck-3"] = key
        await self.load_device(relay, 700003, "truck-3", key, connector="nocert")

        device = await self.hello(relay, "truck-3", device_hello(700003))
        device.send(DENMARK, COMMIT_REQUEST)
        await self.wait_until(lambda: device.closed, "the relay to close the device")

        self.assertEqual(device.types(), [MessageType.HELLO_RESPONSE])
        self.assertGreaterEqual(handshakes.accepted, 1)
        self.assertEqual((hub.requests, hub.messages, hub.authorizations), (0, [], []))
        shown = await self.api_until(
            relay, "/api/devices/700003", lambda d: d["last_error"] is not None, "the delivery error"
        )
        self.assertEqual(shown["records_committed"], 0)
        self.assertIn("connector nocert: POST to localhost:", shown["last_error"])
        await self.assert_secrets_not_logged()


class OAuth2EndToEndTests(_RegistryTestCase):
    """An http connector with auth = oauth2 against a fake authorization server."""

    async def test_one_token_reused_then_renewed_after_revocation(self) -> None:
        """Two uploads share one token; after revocation the next upload gets 401, fetches one new token and is committed."""
        client_secret = self.secret("OAuth client secret", secrets.token_urlsafe(24))
        fake = FakeOAuth({"oemrelay-test": client_secret}, clock=self.reactor)
        site = Site(fake)
        site.noisy = False
        port = self._listen(site)
        self.secret(
            "OAuth Basic credentials",
            b64encode(f"oemrelay-test:{client_secret}".encode()).decode("ascii"),
        )
        connector = f"""\
[connector:platform]
type = http
url = http://{LOOPBACK}:{port}/api/dm/[SERIAL]
auth = oauth2
token_url = http://{LOOPBACK}:{port}/token
client_id = oemrelay-test
client_secret = {client_secret}
scope = telemetry.write
timeout = 5
"""
        config, token = self.relay_config(connector, registry=self.sqlite_registry(), default="platform")
        relay = await self.start_relay(config, token)
        device = await self.hello(relay)

        await self.upload(device, DENMARK)
        await self.upload(device, AUCKLAND)
        self.assertEqual(len(fake.token_requests), 1)
        request = fake.token_requests[0]
        self.assertEqual(
            (request.client_id, request.auth_method, request.grant_type, request.scope),
            ("oemrelay-test", "basic", "client_credentials", "telemetry.write"),
        )
        self.assertEqual([a.path for a in fake.accepted], [f"/api/dm/{DART_SERIAL}"] * 2)
        self.assertEqual([a.token for a in fake.accepted], [fake.issued[0]] * 2)

        fake.revoke_all()
        await self.upload(device, FIXED)
        self.assertEqual(fake.refused, 1)
        self.assertEqual(len(fake.token_requests), 2)
        self.assertEqual(len(fake.issued), 2)
        self.assertEqual(fake.accepted[-1].token, fake.issued[1])
        self.assertEqual(
            [seq_numbers(a.body) for a in fake.accepted], [DENMARK_SEQ, AUCKLAND_SEQ, FIXED_SEQ]
        )
        self.assertFalse(device.closed)
        await self.api_until(
            relay,
            f"/api/devices/{DART_SERIAL}",
            lambda d: d["records_committed"] == len(DENMARK_SEQ + AUCKLAND_SEQ + FIXED_SEQ),
            "the commit count",
        )
        for number, issued in enumerate(fake.issued):
            self.secret(f"access token {number}", issued)
        await self.assert_secrets_not_logged()


class WorkersEndToEndTests(_RegistryTestCase):
    """A relay with two worker processes behind one port and one API."""

    async def test_devices_served_and_changes_seen_by_workers(self) -> None:
        """Two workers share the port; an API change reaches a worker's cached profile at once."""
        server = self.start_http_server()
        config, token = self.relay_config(
            templated_http_connector("platform", server.port),
            registry=self.sqlite_registry(),
            default="platform",
            profile_cache_seconds=600,
            workers=2,
        )
        relay = await self.start_relay(config, token)
        for pid in await self.worker_pids(relay):
            # No TLS configured: the workers never loaded pyOpenSSL and cryptography.
            self.assertNotIn("cryptography", self.mapped_files(pid))
        # The parent and both workers run on the relay's own reactor.
        self.assertIn(b"reactor class: oemrelay.reactor.RelayReactor", relay.daemon.output)
        self.assertEqual(len(re.findall(rb"serving, reactor RelayReactor", relay.daemon.output)), 2)
        code, _ = await self.api(relay, "PUT", f"/api/devices/{DART_SERIAL}", {"custom1": "truck-9"})
        self.assertEqual(code, 201)
        device = await self.hello(relay)
        await self.upload(device, DENMARK)
        code, _ = await self.api(relay, "PUT", f"/api/devices/{DART_SERIAL}", {"custom1": "truck-10"})
        self.assertEqual(code, 200)
        # The worker learns of the change over its stdin, not in step with
        # the device's socket: give the line a moment to arrive.
        await deferLater(self.reactor, 0.5, lambda: None)
        await self.upload(device, AUCKLAND)
        self.assertEqual([post.uri for post in server.requests], ["/dm/truck-9", "/dm/truck-10"])
        await self.assert_secrets_not_logged()

    async def test_workers_load_tls_where_an_end_server_needs_it(self) -> None:
        """With an https:// connector configured the workers have pyOpenSSL's cryptography loaded."""
        server = self.start_http_server()
        config, token = self.relay_config(
            templated_http_connector("platform", server.port)
            + "\n[connector:secure]\ntype = http\nurl = https://127.0.0.1:9/dm\n",
            registry=self.sqlite_registry(),
            default="platform",
            workers=2,
        )
        relay = await self.start_relay(config, token)
        for pid in await self.worker_pids(relay):
            self.assertIn("cryptography", self.mapped_files(pid))

    async def worker_pids(self, relay) -> list[int]:
        """The pids of ``relay``'s two workers, once both serve."""
        serving = rb"worker (\d) \(pid (\d+)\) serving"
        await self.wait_until(
            lambda: {index for index, _ in re.findall(serving, relay.daemon.output)} == {b"1", b"2"},
            "both workers to serve",
        )
        return [int(pid) for _, pid in re.findall(serving, relay.daemon.output)]

    @staticmethod
    def mapped_files(pid: int) -> str:
        with open(f"/proc/{pid}/maps") as maps:
            return maps.read()


class SharedRegistryEndToEndTests(_RegistryTestCase):
    """Two relays sharing one PostgreSQL registry."""

    async def test_settings_and_state_shared_between_relays(self) -> None:
        """custom1 PUT through relay A is used by relay B's upload; A's API shows the device connected to node-b."""
        registry = await fresh_schema_url(self)
        server = self.start_http_server()
        connector = templated_http_connector("platform", server.port)
        config_a, token_a = self.relay_config(connector, registry=registry, default="platform", node="node-a")
        # B caches profiles for long: A's changes reach it by NOTIFY.
        config_b, token_b = self.relay_config(
            connector, registry=registry, default="platform", node="node-b",
            profile_cache_seconds=600,
        )
        relay_a, relay_b = await gather(
            self.start_relay(config_a, token_a, "relay-a"),
            self.start_relay(config_b, token_b, "relay-b"),
        )
        key = self.secret("X-Key header value", secrets.token_urlsafe(18))

        code, shown = await self.api(
            relay_a, "PUT", f"/api/devices/{DART_SERIAL}", {"custom1": "truck-9", "custom2": key}
        )
        self.assertEqual(code, 201, shown)
        device = await self.hello(relay_b)
        await self.upload(device, DENMARK)
        self.assertEqual([post.uri for post in server.requests], ["/dm/truck-9"])
        self.assertEqual(server.requests[0].headers["x-key"], [key])

        shown = await self.api_until(
            relay_a,
            f"/api/devices/{DART_SERIAL}",
            lambda d: d["records_committed"] == len(DENMARK_SEQ),
            "the commit seen through relay A",
        )
        self.assertEqual((shown["connected"], shown["node"]), (True, "node-b"))
        self.assertEqual((shown["imei"], shown["firmware"]), (DART_IMEI, DART_FIRMWARE))

        # A change made through A reaches B's next upload on the same connection.
        code, _ = await self.api(relay_a, "PUT", f"/api/devices/{DART_SERIAL}", {"custom1": "truck-10"})
        self.assertEqual(code, 200)
        # The notification reaches B apart from the device's socket: a moment.
        await deferLater(self.reactor, 0.5, lambda: None)
        await self.upload(device, AUCKLAND)
        self.assertEqual([post.uri for post in server.requests], ["/dm/truck-9", "/dm/truck-10"])

        device.transport.loseConnection()
        # Commit counts are written in batches, up to a second after the commit.
        await self.api_until(
            relay_a,
            f"/api/devices/{DART_SERIAL}",
            lambda d: not d["connected"]
            and d["records_committed"] == len(DENMARK_SEQ + AUCKLAND_SEQ),
            "the disconnection and the batched commit count",
        )
        await self.assert_secrets_not_logged()


    async def test_devices_leaving_at_once_shown_disconnected(self) -> None:
        """Devices that send a hello and leave at once are all shown disconnected."""
        registry = await fresh_schema_url(self)
        relay = await self.start_archive_relay(registry)
        serials = list(range(800000, 800020))
        for serial in serials:
            device = await self.connect_device(relay.device_port, f"device {serial}")
            device.send(device_hello(serial))
            device.transport.loseConnection()

        listing = await self.api_until(
            relay,
            "/api/devices",
            lambda body: len(body["devices"]) == len(serials)
            and not any(d["connected"] for d in body["devices"]),
            "every device shown disconnected",
        )
        self.assertEqual([d["serial"] for d in listing["devices"]], serials)
        self.assertTrue(all(d["node"] == "node-a" for d in listing["devices"]))
        await self.assert_secrets_not_logged()

    async def test_calls_during_start_wait_for_the_registry(self) -> None:
        """A device and an API call arriving while the schema is still being created wait for it, and are recorded."""
        import psycopg
        from twisted.internet.threads import deferToThread

        registry = await fresh_schema_url(self)
        # Hold the relay's migration: it must read schema_version first.
        holder = await deferToThread(psycopg.connect, registry, connect_timeout=5)
        self.addCleanup(deferToThread, holder.close)
        await deferToThread(
            holder.execute,
            "CREATE TABLE schema_version (version INTEGER NOT NULL PRIMARY KEY,"
            " applied DOUBLE PRECISION NOT NULL)",
        )
        await deferToThread(holder.commit)
        await deferToThread(holder.execute, "LOCK TABLE schema_version IN ACCESS EXCLUSIVE MODE")
        server = self.start_http_server()
        config, token = self.relay_config(
            templated_http_connector("platform", server.port), registry=registry, default="platform"
        )
        relay = await self.start_relay(config, token, registry_ready=False)
        device = await self.hello(relay)
        early = Deferred.fromCoroutine(
            self.api(relay, "PUT", f"/api/devices/{DART_SERIAL}", {"custom1": "early"})
        )
        await deferLater(self.reactor, 0.3, lambda: None)
        self.assertIsNone(_REGISTRY_READY.search(relay.daemon.output))
        self.assertFalse(early.called)

        await deferToThread(holder.commit)
        code, shown = await early
        self.assertIn(code, (200, 201), shown)
        self.assertEqual(shown["custom1"], "early")
        await self.upload(device, DENMARK)
        self.assertEqual([post.uri for post in server.requests], ["/dm/early"])
        shown = await self.api_until(
            relay,
            f"/api/devices/{DART_SERIAL}",
            lambda d: d["records_committed"] == len(DENMARK_SEQ),
            "the commit",
        )
        self.assertEqual((shown["connected"], shown["imei"]), (True, DART_IMEI))
        self.assertNotIn(b"could not record", relay.daemon.output)
        await self.assert_secrets_not_logged()


class SecretLoggingEndToEndTests(_RegistryTestCase):
    """Failures are logged without the secrets they involve."""

    async def test_refusals_logged_without_credentials(self) -> None:
        """A refused Basic-authenticated upload and a wrong API token are logged, without password or tokens."""
        server = self.start_http_server(status=401)
        password = self.secret("Basic password", secrets.token_urlsafe(18))
        connector = f"""\
[connector:platform]
type = http
url = http://{LOOPBACK}:{server.port}/dm/[SERIAL]
username = relay-[SERIAL]
password = {password}
timeout = 5
"""
        config, token = self.relay_config(connector, registry=self.sqlite_registry(), default="platform")
        relay = await self.start_relay(config, token)
        credentials = f"relay-{DART_SERIAL}:{password}".encode()
        self.secret("Basic credentials", b64encode(credentials).decode("ascii"))
        wrong_token = self.secret("wrong API token", secrets.token_urlsafe(24))

        code, body = await self.api(relay, "GET", "/api/devices", token=wrong_token)
        self.assertEqual((code, body), (401, {"error": "invalid bearer token"}))
        device = await self.hello(relay)
        device.send(DENMARK, COMMIT_REQUEST)
        await self.wait_until(lambda: device.closed, "the relay to close the device")

        self.assertEqual(device.types(), [MessageType.HELLO_RESPONSE])
        self.assertEqual(
            server.requests[0].headers["authorization"],
            ["Basic " + b64encode(credentials).decode("ascii")],
        )
        output = relay.daemon.output.decode("utf-8", "replace")
        self.assertIn(f"connector platform: {LOOPBACK}:{server.port} answered 401", output)
        await self.assert_secrets_not_logged()

