"""
The relay's INI configuration: one schema, parsed once into frozen values.

Every section and key the relay reads is listed here.  Anything else is an
error naming the file, the section and the key, so a typo never silently
falls back to a default.  :func:`config_from_string` lets tests skip files.
"""

from __future__ import annotations

import configparser
import functools
import os
import re
import socket
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from urllib.parse import urlsplit

from hyperlink import EncodedURL
from twisted.internet.endpoints import (
    TCP4ServerEndpoint,
    TCP6ServerEndpoint,
    _WrapperServerEndpoint,
    clientFromString,
    serverFromString,
)
from twisted.internet.interfaces import IReactorPluggableNameResolver
from zope.interface import implementer

from .codec import MAX_PAYLOAD
from .iothub import SAS_PREFIX, decode_sas_key, default_sas_resource, iothub_url
from .oneline import one_line
from .registry_url import check_postgresql_url
from .templates import has_placeholders


#: ``[relay] commit_policy`` values.
COMMIT_DELIVERED = "delivered"
COMMIT_SPOOLED = "spooled"
#: ``[relay] unknown_devices`` values.
UNKNOWN_ACCEPT = "accept"
UNKNOWN_REJECT = "reject"
#: ``[connector:NAME] role`` values.
REQUIRED = "required"
BEST_EFFORT = "best_effort"


def connector_names(text: str) -> tuple[str, ...]:
    """The connector names in a space-separated list (config, registry override)."""
    return tuple(text.split())


#: The most records one upload may hold (its JSON body is about 400 bytes a record).
MAX_RECORDS_PER_UPLOAD = 5000

#: The most memory, as estimated by :func:`~oemrelay.codec.decoded_cost`, one
#: upload's decoded records may take: 5000 typical records fit.
MAX_UPLOAD_MEMORY = 8 * 1024 * 1024

#: Seconds a new connection has to send its hello.
HELLO_TIMEOUT = 30.0

#: Seconds a device has to finish a frame once its first byte arrived: a
#: 65,535-byte frame at 2G speeds (about 1.5 KB/s) takes most of a minute.
FRAME_TIMEOUT = 60.0

#: Device connections the relay serves at once; beyond, the oldest that has
#: not said hello is shed, or the new one refused if every one has.
MAX_CONNECTIONS = 1000


class ConfigError(Exception):
    """The configuration is unusable; the message is one line for the user."""


# -- value parsers: each takes the text and returns the value or raises ValueError


def _text(value: str) -> str:
    return value


def _required(value: str) -> str:
    if not value:
        raise ValueError("must not be empty")
    return value


def _positive_number(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"must be a number of seconds, got {value!r}") from None
    if not number > 0 or number == float("inf"):
        raise ValueError(f"must be a positive number of seconds, got {value!r}")
    return number


def _non_negative_number(value: str) -> float:
    if value in ("0", "0.0"):
        return 0.0
    return _positive_number(value)


def _optional_positive_number(value: str) -> float | None:
    return _positive_number(value) if value else None


def _one_of(*choices: str) -> Callable[[str], str]:
    def parse(value: str) -> str:
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}, got {value!r}")
        return value

    return parse


def _message_size(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise ValueError(f"must be a whole number of bytes, got {value!r}") from None
    if not 1 <= number <= MAX_PAYLOAD:
        raise ValueError(f"must be between 1 and {MAX_PAYLOAD}, got {number}")
    return number


@implementer(IReactorPluggableNameResolver)
class _ParseOnlyReactor:
    """
    The reactor endpoint parsers are given here: they store it and never call
    it, since config only parses endpoint strings, never listens or connects.
    """

    # HostnameEndpoint (tls:) reads this at construction, and warns if the
    # reactor does not declare it.
    nameResolver = None

    def installNameResolver(self, resolver: object) -> object:
        raise NotImplementedError("configuration never resolves names")


_VALIDATION_REACTOR = _ParseOnlyReactor()


def _server_endpoints(value: str) -> tuple[str, ...]:
    descriptions = tuple(value.split())
    if not descriptions:
        raise ValueError("needs at least one endpoint string such as tcp:20500")
    for description in descriptions:
        try:
            serverFromString(_VALIDATION_REACTOR, description)
        except Exception as error:
            raise ValueError(f"bad endpoint {description!r}: {error}") from None
    return descriptions


def _client_endpoint(value: str) -> str:
    _required(value)
    try:
        clientFromString(_VALIDATION_REACTOR, value)
    except Exception as error:
        raise ValueError(f"bad endpoint {value!r}: {error}") from None
    return value


def _http_url(value: str) -> str:
    # Messages never quote the URL: its path and query may hold a key.
    _required(value)
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        shown = f"{parts.scheme}:" if parts.scheme else "no scheme"
        raise ValueError(f"must be an http:// or https:// URL, got {shown}")
    if "@" in parts.netloc:
        # Credentials in the URL are never sent (the connector's client, and
        # treq for token endpoints, drop them); say what works.
        raise ValueError("must not hold user:password@; set username and password instead")
    if has_placeholders(parts.netloc):
        raise ValueError("the host part must not contain placeholders")
    if parts.netloc.startswith("["):
        # treq (token endpoints) IDNA-encodes every host and fails on IPv6
        # literals (python-hyper/hyperlink#68); the upload client was never
        # tried with them either.  One rule for every URL key.
        raise ValueError("IPv6 literal hosts are not supported; use a host name")
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port == 0:
        raise ValueError("the port must be a number from 1 to 65535")
    try:
        # The host as treq encodes it (token endpoints): refused here, not per request.
        EncodedURL.from_text(f"{parts.scheme}://{parts.netloc}/").to_uri()
        valid = bool(parts.hostname)
    except Exception:
        valid = False
    if not valid:
        raise ValueError(f"the host {parts.hostname or ''!r} is not a valid host name")
    return value


_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")


def _header(value: str) -> tuple[str, str] | None:
    if not value:
        return None
    name, colon, template = value.partition(":")
    name = name.strip()
    if not colon or not _HEADER_NAME.match(name):
        # Not quoted: the value may be a key.
        raise ValueError("must be 'Name: value' with a header name before the colon")
    return name, template.strip()


def _appendable_path(value: str) -> str:
    _required(value)
    directory = os.path.dirname(os.path.abspath(value))
    if not os.path.isdir(directory):
        raise ValueError(f"directory {directory!r} does not exist")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write in directory {directory!r}")
    return value


def _readable_file(value: str) -> str:
    if value and not os.access(value, os.R_OK):
        raise ValueError(f"cannot read file {value!r}")
    return value


def _ca_file(value: str) -> str:
    if _readable_file(value):
        from .tls import check_ca_file  # here only: pyOpenSSL only where TLS is configured

        check_ca_file(value)
    return value


def _registry_url(value: str) -> str:
    path = value[len("sqlite:"):] if value.startswith("sqlite:") else ""
    if path:
        # Checked now, or the relay would start and then fail to open it.
        _appendable_path(path)
        return value
    if value.startswith(("postgresql://", "postgres://")):
        check_postgresql_url(value)
        return value
    raise ValueError(
        "must be sqlite:PATH or postgresql://user@host/database,"
        f" got {value.split(':')[0]!r}:..."
    )


def _auth_scheme(value: str) -> str:
    if value not in ("", "none", "basic", "azure-sas", "oauth2"):
        raise ValueError(f"must be none, basic, azure-sas or oauth2, got {value!r}")
    return value


#: How an http connector's POST carries the OEM JSON document.
BODY_FORMATS = ("json", "form")


def _body_format(value: str) -> str:
    if value not in BODY_FORMATS:
        raise ValueError(f"must be json or form, got {value!r}")
    return value


_MAX_TOKEN_TTL = 10 * 365 * 24 * 3600


def _whole_seconds(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise ValueError(f"must be a whole number of seconds, got {value!r}") from None
    if not 0 < number <= _MAX_TOKEN_TTL:
        raise ValueError(f"must be from 1 to {_MAX_TOKEN_TTL} seconds (ten years)")
    return number


def _whole_number(
    value: str, unit: str, low: int, high: int | None = None, words: str = ""
) -> int:
    """``value`` as a whole number of ``unit`` from ``low`` to ``high`` (None: no upper bound)."""
    try:
        number = int(value)
    except ValueError:
        raise ValueError(f"must be a whole number of {unit}{words}, got {value!r}") from None
    if high is None and number < low:
        raise ValueError(f"must be {low} or more, got {number}")
    if high is not None and not low <= number <= high:
        raise ValueError(f"must be from {low} to {high}{words}, got {number}")
    return number


_MAX_WORKERS = 64


def _workers(value: str) -> int:
    if value == "auto":
        return os.cpu_count() or 1
    return _whole_number(value, "processes", 1, _MAX_WORKERS, " or auto")


def _cache_seconds(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"must be a number of seconds, got {value!r}") from None
    if not 0 <= number <= 3600:
        raise ValueError(f"must be from 0 to 3600 seconds, got {value!r}")
    return number


_MAX_POOL_SIZE = 65536


def _pool_size(value: str) -> int:
    return _whole_number(value, "connections", 1, _MAX_POOL_SIZE)


def _record_count(value: str) -> int:
    return _whole_number(value, "records", 1)


def _attempt_count(value: str) -> int:
    return _whole_number(value, "attempts", 0)


def _optional_http_url(value: str) -> str:
    return _http_url(value) if value else ""


def _node_name(value: str) -> str:
    return value or socket.gethostname()


_LOG_FORMATS = ("text", "json")


def _log_format(value: str) -> str:
    if value not in _LOG_FORMATS:
        raise ValueError(f"must be {' or '.join(_LOG_FORMATS)}, got {value!r}")
    return value


_BOOLEANS = {"true": True, "yes": True, "on": True, "false": False, "no": False, "off": False}


def _boolean(value: str) -> bool:
    try:
        return _BOOLEANS[value.lower()]
    except KeyError:
        raise ValueError(f"must be true or false, got {value!r}") from None


def _connection_limit(value: str) -> int:
    return _whole_number(value, "connections", 0, words=" (0: no limit)")


def _byte_count(value: str) -> int:
    return _whole_number(value, "bytes", 1)


#: ``tls_min_version`` values (oemrelay.tls.MIN_VERSIONS maps them to
#: protocol versions; named here so reading a configuration loads no TLS).
TLS_MIN_VERSIONS = ("1.2", "1.3")


def _tls_version(value: str) -> str:
    if value not in TLS_MIN_VERSIONS:
        raise ValueError(f"must be one of {', '.join(TLS_MIN_VERSIONS)}, got {value!r}")
    return value


def _optional_server_endpoints(value: str) -> tuple[str, ...]:
    return _server_endpoints(value) if value else ()


# -- the schema: each key declared once, with its parser, default and meaning


@dataclass(frozen=True)
class Key:
    """
    One INI key.

    :ivar parse: turns the key's text into its value, or raises
        :class:`ValueError` with a one-line reason.
    :ivar default: the text used when the key is absent; ``None``: required.
    :ivar doc: one paragraph for an operator saying what the key means and
        does (reStructuredText inline markup): ``docs/configuration.rst`` is
        generated from it by :mod:`oemrelay.config_reference`.
    """

    parse: Callable[[str], object]
    default: str | None
    doc: str


def _setting(
    parse: Callable[[str], object], default: str | None, doc: str, *, secret: bool = False
):
    """
    A dataclass field that is also an INI key: the key's one declaration.

    The field's default is ``default`` parsed, so a value built in code and a
    key left out of the file agree.  ``secret`` keeps the value out of repr().
    """
    metadata = {"key": Key(parse, default, doc)}
    if default is None:
        return field(repr=not secret, metadata=metadata)
    return field(
        default_factory=functools.partial(parse, default),
        repr=not secret,
        metadata=metadata,
    )


def _keys_of(cls: type, names: tuple[str, ...] | None = None) -> dict[str, Key]:
    """The INI keys declared by ``cls``'s fields (only ``names``, if given), in order."""
    keys = {f.name: f.metadata["key"] for f in fields(cls) if "key" in f.metadata}
    return keys if names is None else {name: keys[name] for name in names}


def _max_attempts():
    """The per-connector ``max_attempts`` key, the same in every connector type."""
    return _setting(
        _attempt_count,
        "0",
        "Failed tries of a spooled upload before it moves to the dead letters; 0: no limit.",
    )


@dataclass(frozen=True)
class RelayConfig:
    """``[relay]``: where devices connect and how long the relay waits."""

    listen: tuple[str, ...] = _setting(
        _server_endpoints,
        "tcp:20500",
        "Where devices connect: one or more Twisted server endpoint strings,"
        " space separated (this key alone may continue on indented lines)."
        " ``tcp:20500:interface=::`` listens on every IPv6 and IPv4 address,"
        " ``ssl:20501:privateKey=key.pem:certKey=cert.pem`` takes TLS,"
        " ``systemd:domain=INET:index=0`` adopts a socket systemd opened"
        " (docs/deployment.rst), ``haproxy:tcp:20510`` expects the PROXY"
        " protocol from a load balancer in front.",
    )
    connector: str = _setting(
        _text,
        "",
        "The NAME of the ``[connector:NAME]`` section devices' uploads go to,"
        " or several names, space separated (see ``role``); may be left empty"
        " when there is only one connector section.  A device's registry entry"
        " may name others (the API's ``connector`` field), which takes effect"
        " on its next upload.",
    )
    commit_timeout: float = _setting(
        _positive_number,
        "20",
        "Seconds the connector has to accept an upload (a 2xx from the HTTP"
        " end server, ``0x06 01`` from a TCP end server, the line on disk)."
        " If it does not in time, the relay withholds the commit and closes"
        " the connection: the device keeps its records and sends them again."
        " Also how long a device has to answer a command.",
    )
    idle_timeout: float = _setting(
        _positive_number,
        "600",
        "Seconds a device connection may stay silent before the relay closes"
        " it (checked once a second, so up to a second later); must be longer"
        " than ``commit_timeout``.  Devices close their own"
        " connection after an upload; this frees the connections of devices"
        " that vanished (lost coverage, lost power) without closing.",
    )
    max_message: int = _setting(
        _message_size,
        str(MAX_PAYLOAD),
        "The largest message payload accepted from a device, in bytes, from 1"
        " to 65535 (the protocol's limit).  A device that declares a longer"
        " message is disconnected with a warning; nothing is lost, since"
        " nothing of that upload was committed.",
    )
    #: Secret: a PostgreSQL URL may hold a password.
    registry: str = _setting(
        _registry_url,
        "sqlite:oemrelay.sqlite",
        "The device registry: ``sqlite:PATH`` for one relay (relative to the"
        " working directory; its directory must be writable), or"
        " ``postgresql://user:password@host:5432/database`` for several relays"
        " sharing devices and commands.  Its schema is created, or migrated,"
        " when the relay starts.  The password is never logged.",
        secret=True,
    )
    node: str = _setting(
        _node_name,
        "",
        "This relay's name in the registry, shown as a connected device's"
        " ``node``; empty: the host name.  Give each relay sharing a"
        " PostgreSQL registry its own.",
    )
    log_format: str = _setting(
        _log_format,
        "text",
        "text: twistd's lines; json: one JSON object a line (time, level, namespace,"
        " message and the event's fields) for log shippers.",
    )
    commit_policy: str = _setting(
        _one_of(COMMIT_DELIVERED, COMMIT_SPOOLED),
        COMMIT_DELIVERED,
        "delivered: commit once every required connector answered 2xx;"
        " spooled: commit once the upload is durably in the spool.",
    )
    unknown_devices: str = _setting(
        _one_of(UNKNOWN_ACCEPT, UNKNOWN_REJECT),
        UNKNOWN_ACCEPT,
        "accept: any device may upload (and is entered in the registry when it"
        " first connects); reject: only serials already in the registry (put"
        " there through the API or its CSV import) may upload, others are"
        " closed after their hello, before any record is taken, logged once"
        " per serial.",
    )
    retry_initial: float = _setting(
        _positive_number,
        "0.5",
        "Seconds before the first retry of a failed delivery inside commit_timeout;"
        " doubled per retry, jittered.",
    )
    retry_max: float = _setting(
        _non_negative_number,
        "5",
        "Longest wait between retries, in seconds; 0: no retries.",
    )
    shutdown_grace: float | None = _setting(
        _optional_positive_number,
        "",
        "Seconds a stopping relay lets deliveries in flight finish; empty: commit_timeout.",
    )

    @property
    def drain_seconds(self) -> float:
        """How long a stopping relay waits for deliveries in flight."""
        return self.shutdown_grace if self.shutdown_grace is not None else self.commit_timeout
    tls_listen: tuple[str, ...] = _setting(
        _optional_server_endpoints,
        "",
        "Endpoint strings (tcp:20501, haproxy:tcp:20501) served with TLS by the relay,"
        " under tls_cert and the TLS policy below.",
    )
    tls_cert: str = _setting(
        _readable_file, "", "PEM certificate of tls_listen, with its private key unless tls_key."
    )
    tls_key: str = _setting(_readable_file, "", "PEM private key, if not in tls_cert.")
    tls_min_version: str = _setting(
        _tls_version, "1.2", "Lowest TLS version tls_listen accepts: 1.2 or 1.3."
    )
    tls_ciphers: str = _setting(
        _text,
        "",
        "OpenSSL suites joined by ':' (TLS_* for TLS 1.3); empty: Twisted's defaults.",
    )
    client_ca: str = _setting(
        _ca_file,
        "",
        "PEM CA for device certificates on tls_listen: required, and naming the hello's serial.",
    )
    hello_timeout: float = _setting(
        _positive_number, f"{HELLO_TIMEOUT:g}", "Seconds a new connection has to send its hello."
    )
    frame_timeout: float = _setting(
        _positive_number, f"{FRAME_TIMEOUT:g}", "Seconds a device has to finish a frame it started."
    )
    max_connections: int = _setting(
        _connection_limit,
        str(MAX_CONNECTIONS),
        "Device connections at once (per worker with ``workers``); at it, the"
        " oldest without a hello is shed; 0: no limit.  At start the relay"
        " raises its open-file limit to"
        " max_connections + 256 as far as the hard limit allows, and warns"
        " once if that is not enough.",
    )
    max_connections_per_ip: int = _setting(
        _connection_limit, "0", "Device connections from one address (behind haproxy: the real one); 0: no limit."
    )
    max_records_per_upload: int = _setting(
        _record_count, str(MAX_RECORDS_PER_UPLOAD), "Records a device may send before a commit request."
    )
    max_upload_memory: int = _setting(
        _byte_count,
        str(MAX_UPLOAD_MEMORY),
        "Bytes one upload's decoded records may take (estimated); past it the device is closed.",
    )
    #: Secret: a PostgreSQL URL may hold a password.
    spool: str = _setting(
        _registry_url,
        "sqlite:oemrelay-spool.sqlite",
        "Where uploads wait for background delivery: sqlite:PATH (fsync'd on"
        " every put) or postgresql://user@host/db (shared by relays).",
        secret=True,
    )
    spool_max_records: int = _setting(
        _record_count,
        "1000000",
        "Device records the spool holds at most (dead letters not counted);"
        " when reached, uploads needing the spool are not committed.",
    )
    spool_max_age: float = _setting(
        _positive_number,
        "604800",
        "Seconds an upload waits in the spool before it moves to the dead letters.",
    )
    workers: int = _setting(
        _workers,
        "1",
        "Processes serving devices (tcp: and haproxy:tcp: listeners); auto: one per core."
        " Where no listener, connector or end server needs TLS, the workers run"
        " without pyOpenSSL loaded (13 MB less each).",
    )
    profile_cache_seconds: float = _setting(
        _cache_seconds,
        "30",
        "Seconds a device's custom fields and connector override are kept in"
        " memory; a change made elsewhere takes effect within this; 0: none kept.",
    )


@dataclass(frozen=True)
class ApiConfig:
    """``[api]``: the management HTTP API, off unless ``listen`` is set."""

    listen: tuple[str, ...] = _setting(
        _optional_server_endpoints,
        "",
        "Where the management HTTP API listens: Twisted server endpoint"
        " strings such as ``tcp:8080:interface=127.0.0.1``; empty: no API."
        " Keep it on loopback or a private interface (docs/api.rst).",
    )
    token: str = _setting(
        _text,
        "",
        "The bearer token every API request must carry"
        " (``Authorization: Bearer TOKEN``); with ``listen``, this or"
        " ``token_file`` is required.  Make it long and random, e.g."
        " ``python3 -c 'import secrets; print(secrets.token_urlsafe(32))'``.",
        secret=True,
    )
    metrics_public: bool = _setting(
        _boolean, "false", "true: GET /metrics needs no token (for a scraper on a private network)."
    )


#: ``[api]`` keys read into other fields.
_API_FILE_KEYS = {
    "token_file": Key(
        _readable_file,
        "",
        "A file holding the API token (surrounding white space ignored),"
        " instead of ``token``: relay.ini can then be readable by people who"
        " must not hold the token.",
    ),
}


@dataclass(frozen=True)
class HttpConnectorConfig:
    """``[connector:NAME]`` with ``type = http``."""

    name: str
    #: Secret: the path and query may hold a key (``?code=...``).
    url: str = _setting(
        _http_url,
        None,
        "The end server's ``http://`` or ``https://`` URL; one POST per upload."
        " A template: placeholders in the path or query are replaced per"
        " device, percent-encoded.  The host must be a name or an IPv4"
        " address, without placeholders or ``user:password@`` (use"
        " ``username`` and ``password``).  Never logged beyond its host.",
        secret=True,
    )
    headers: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    username: str = _setting(_text,
        "",
        "HTTP Basic user name, a template; setting it (or ``password``) makes"
        " ``auth`` default to ``basic``.",
    )
    password: str = _setting(
        _text, "", "HTTP Basic password, a template.  Never logged.", secret=True
    )
    timeout: float = _setting(
        _positive_number,
        "10",
        "Seconds the end server has to answer one POST; no answer in time"
        " fails that delivery and the commit is withheld.",
    )
    ca_file: str = _setting(
        _ca_file,
        "",
        "A PEM file of private CA certificates to trust besides the system's"
        " (read at start).  Certificates and host names are always verified.",
    )
    body: str = _setting(
        _body_format,
        "json",
        "``json``: the OEM JSON document is the body (``application/json``);"
        " ``form``: an ``application/x-www-form-urlencoded`` body"
        " ``DeviceData=<the same JSON>``, as older OEM Servers posted it, for"
        " end servers built for those.",
    )
    pool_size: int = _setting(
        _pool_size,
        "256",
        "Connections kept open to the end server, and POSTs in flight to it at most.",
    )
    client_cert: str = _setting(
        _readable_file,
        "",
        "Mutual TLS: a PEM file with the relay's client certificate and, unless"
        " ``client_key`` is set, its private key (both checked at start).",
    )
    client_key: str = _setting(
        _readable_file, "", "The client certificate's PEM private key, if not in ``client_cert``."
    )
    #: ``none``, ``basic``, ``azure-sas`` or ``oauth2``; empty: basic when
    #: there are credentials, else none (see :attr:`auth_scheme`).
    auth: str = _setting(
        _auth_scheme,
        "",
        "How the relay proves itself to the end server: ``none``, ``basic``"
        " (``username``, ``password``), ``azure-sas`` (an Azure SAS token per"
        " device) or ``oauth2`` (client credentials); empty: ``basic`` when"
        " ``username`` or ``password`` is set, else ``none``.",
    )
    sas_key: str = _setting(
        _text,
        "[CUSTOM3]",
        "With ``auth = azure-sas``: a template for the base64 key tokens are"
        " signed with, by default the device's custom field 3 (where OEM"
        " Server keeps IoT Hub keys); with ``sas_policy``, that policy's key."
        " A complete ``SharedAccessSignature ...`` value is sent as it is.",
        secret=True,
    )
    sas_policy: str = _setting(
        _text,
        "",
        "With ``auth = azure-sas``: a shared access policy name; tokens then"
        " end with ``&skn=NAME`` and ``sas_key`` is the policy's key.  Empty:"
        " per-device keys.",
    )
    sas_resource: str = _setting(
        _text,
        "",
        "With ``auth = azure-sas``: the resource tokens are signed for, a"
        " template such as ``myhub.azure-devices.net/devices/[CUSTOM1]``;"
        " empty: the URL's host and path up to ``/messages``.",
    )
    token_ttl: int = _setting(
        _whole_seconds,
        "3600",
        "With ``auth = azure-sas``: a token's lifetime in seconds, from 1 to"
        " 315360000 (ten years).  Tokens are cached per device and renewed"
        " before they expire.",
    )
    #: Secret: the query may hold a key.
    token_url: str = _setting(
        _optional_http_url,
        "",
        "With ``auth = oauth2``: the token endpoint (client-credentials"
        " grant).  One bearer token serves every device; it is cached until"
        " shortly before it expires, and fetched again once when the end"
        " server answers 401.",
        secret=True,
    )
    client_id: str = _setting(
        _text,
        "",
        "With ``auth = oauth2``: the client id, sent with ``client_secret`` as"
        " HTTP Basic to ``token_url``.",
    )
    client_secret: str = _setting(_text, "", "With ``auth = oauth2``: the client secret.  Never logged.", secret=True)
    scope: str = _setting(
        _text, "", "With ``auth = oauth2``: the scope to ask for; empty: none."
    )
    max_attempts: int = _max_attempts()
    #: Azure IoT Hub: add ``iothub-messageid`` to each request.
    iothub: bool = False

    @property
    def auth_scheme(self) -> str:
        """The authentication in force, with the empty default resolved."""
        if self.auth:
            return self.auth
        return "basic" if self.username or self.password else "none"

    @property
    def uses_tls(self) -> bool:
        """Whether it may speak TLS: an ``https`` URL or token URL, a CA file, a client certificate."""
        return bool(
            _is_https(self.url)
            or _is_https(self.token_url)
            or self.ca_file
            or self.client_cert
        )


def _is_https(url: str) -> bool:
    return urlsplit(url).scheme == "https"


def _is_tls_endpoint(description: str) -> bool:
    """A ``tls:``/``ssl:`` endpoint, or one wrapping it (``haproxy:ssl:...``)."""
    return not {"tls", "ssl"}.isdisjoint(description.split(":"))


@dataclass(frozen=True)
class TcpConnectorConfig:
    """``[connector:NAME]`` with ``type = tcp``."""

    name: str
    endpoint: str = _setting(
        _client_endpoint,
        None,
        "The end server, as a Twisted client endpoint string:"
        " ``tcp:host=10.0.0.5:port=5027``, or ``tls:host=example.com:port=5028``"
        " (certificate verified).  The relay opens one connection there per"
        " device connection and plays the device.",
    )
    max_attempts: int = _max_attempts()

    @property
    def uses_tls(self) -> bool:
        """Whether it may speak TLS: a ``tls:`` or ``ssl:`` endpoint."""
        return _is_tls_endpoint(self.endpoint)


@dataclass(frozen=True)
class FileConnectorConfig:
    """``[connector:NAME]`` with ``type = file``."""

    name: str
    path: str = _setting(
        _appendable_path,
        None,
        "The file each upload is appended to as one line of OEM JSON, fsync'd"
        " before the commit; relative to the working directory.  Its directory"
        " must exist and be writable when the relay starts.",
    )
    max_attempts: int = _max_attempts()

    #: A file needs no TLS.
    uses_tls = False


@dataclass(frozen=True)
class ConnectorRoleConfig:
    """The keys of every ``[connector:NAME]``, whatever its type."""

    role: str = _setting(
        _one_of(REQUIRED, BEST_EFFORT),
        REQUIRED,
        "required: the commit waits for it; best_effort: a copy goes through the"
        " spool and never holds a device back.",
    )
    max_attempts: int = _max_attempts()


ConnectorConfig = HttpConnectorConfig | TcpConnectorConfig | FileConnectorConfig


@dataclass(frozen=True)
class Config:
    """The whole configuration, as read from ``source``."""

    relay: RelayConfig
    connectors: Mapping[str, ConnectorConfig]
    source: str = "<string>"
    api: ApiConfig = field(default_factory=ApiConfig)
    #: Each connector's ``role``; a connector not listed is required.
    roles: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def devices_use_tls(self) -> bool:
        """
        Whether serving devices may need TLS (pyOpenSSL): a TLS listener, a
        ``tls:`` endpoint, an HTTPS end server.  A connector type not known
        here counts as needing it.  (The management API is the parent's.)
        """
        if self.relay.tls_listen or any(_is_tls_endpoint(d) for d in self.relay.listen):
            return True
        # A connector that does not say (another type) is taken to need it.
        return any(getattr(c, "uses_tls", True) for c in self.connectors.values())


_Schema = Mapping[str, Key]

#: The http connector keys read into ``headers``.
_HEADER_KEYS: _Schema = {
    f"header{n}": Key(
        _header,
        "",
        "``Name: value``: an extra request header, like OEM Server's three"
        " custom headers; the value is a template.  A substituted value"
        " holding CR or LF is refused: that upload is not sent and its commit"
        " is withheld.",
    )
    for n in (1, 2, 3)
}

#: The keys every connector section takes besides its type's.
_ROLE_KEYS: _Schema = _keys_of(ConnectorRoleConfig)

#: The keys an azure-iothub section shares with http, after its own.
_IOTHUB_SHARED = (
    "timeout",
    "pool_size",
    "ca_file",
    "client_cert",
    "client_key",
    "sas_key",
    "sas_policy",
    "sas_resource",
    "token_ttl",
    "max_attempts",
)

#: Every section and key the relay reads: ``[relay]``, ``[api]``, and each
#: connector ``type``.
SCHEMA: Mapping[str, _Schema] = MappingProxyType(
    {
        "relay": _keys_of(RelayConfig),
        "api": {**_keys_of(ApiConfig), **_API_FILE_KEYS},
        "http": {**_keys_of(HttpConnectorConfig), **_HEADER_KEYS, **_ROLE_KEYS},
        "azure-iothub": {
            "hub": Key(
                _required,
                None,
                "The IoT Hub's name (``myhub``, meaning"
                " ``myhub.azure-devices.net``) or its full host name.",
            ),
            "device_id": Key(
                _required,
                "[CUSTOM1]",
                "The IoT Hub device id, a template; by default the device's"
                " custom field 1.",
            ),
            "url": Key(
                _optional_http_url,
                "",
                "Replaces the URL made from ``hub`` and ``device_id`` (a test"
                " double, say); empty:"
                " ``https://HUB/devices/DEVICE_ID/messages/events?api-version=2021-04-12``.",
            ),
            **_HEADER_KEYS,
            **_keys_of(HttpConnectorConfig, _IOTHUB_SHARED),
            **_ROLE_KEYS,
        },
        "tcp": {**_keys_of(TcpConnectorConfig), **_ROLE_KEYS},
        "file": {**_keys_of(FileConnectorConfig), **_ROLE_KEYS},
    }
)

_CONNECTOR_TYPES = tuple(kind for kind in SCHEMA if kind not in ("relay", "api"))


CONNECTOR_PREFIX = "connector:"


def _origin(url: str) -> str:
    """``scheme://host[:port]`` of ``url``: no user, password, path or query."""
    parts = urlsplit(url)
    port = f":{parts.port}" if parts.port else ""
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    return f"{parts.scheme}://{host}{port}"


def connector_target(connector: ConnectorConfig) -> str:
    """A connector's type and where it delivers, with no secret (no URL path, query or user)."""
    if isinstance(connector, HttpConnectorConfig):
        return f"http to {_origin(connector.url)}, auth {connector.auth_scheme}"
    if isinstance(connector, TcpConnectorConfig):
        return f"tcp to {connector.endpoint}"
    if isinstance(connector, FileConnectorConfig):
        return f"file {connector.path}"
    return type(connector).__name__


def holds_secrets(config: Config) -> bool:
    """Whether ``config`` sets any value declared secret (a token, a password, a key)."""
    sections = [config.relay, config.api, *config.connectors.values()]
    for section in sections:
        for f in fields(section):
            value = getattr(section, f.name)
            key = f.metadata.get("key")
            if f.repr or (key is not None and value == key.default):
                continue  # not secret, or left as shipped ([CUSTOM3], sqlite:...)
            if _SECRET_WHEN.get(f.name, bool)(value):
                return True
    return False


#: Secret fields whose usual values hold no secret: when one does.
_SECRET_WHEN: Mapping[str, Callable[[object], bool]] = {
    "registry": lambda url: urlsplit(url).password is not None,
    "url": lambda url: bool(urlsplit(url).query),
    "token_url": lambda url: bool(urlsplit(url).query),
}


def exposed_secrets_warning(config: Config) -> str | None:
    """
    One line if ``config`` was read from a file that users other than its
    owner and group may read and that holds secrets; else ``None``.
    """
    try:
        mode = os.stat(config.source).st_mode
    except OSError:
        return None  # read from a string, or gone since
    if not mode & stat.S_IROTH or not holds_secrets(config):
        return None
    return (
        f"{config.source} holds secrets and every user may read it;"
        f" chmod o-r {config.source}"
    )


_TCP_ENDPOINTS = (TCP4ServerEndpoint, TCP6ServerEndpoint)


def tcp_endpoint(endpoint: object) -> object | None:
    """The TCP endpoint ``endpoint`` listens with (under a haproxy: wrapper), or None."""
    if isinstance(endpoint, _WrapperServerEndpoint):
        # Twisted keeps the wrapped endpoint private; haproxy: is such a wrapper.
        endpoint = endpoint._wrappedEndpoint
    return endpoint if isinstance(endpoint, _TCP_ENDPOINTS) else None


def shareable(reactor, description: str) -> bool:
    """Whether worker processes can share the listener ``description``."""
    return tcp_endpoint(serverFromString(reactor, description)) is not None


def load_config(path: str) -> Config:
    """
    Read and check the file at ``path``.

    :raises ConfigError: with one line naming the file, section and key.
    """
    try:
        # utf-8-sig: Windows Notepad starts the file with a byte-order mark.
        with open(path, encoding="utf-8-sig") as f:
            text = f.read()
    except OSError as error:
        raise ConfigError(f"{path}: cannot read: {error.strerror}") from None
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: not UTF-8 text: {error}") from None
    return config_from_string(text, path)


def config_from_string(text: str, source: str = "<string>") -> Config:
    """
    Parse and check a configuration held in a string.

    :raises ConfigError: with one line naming ``source``, section and key.
    """
    parser = configparser.ConfigParser(
        interpolation=None,
        inline_comment_prefixes=("#", ";"),
        default_section="\x00no default section",
    )
    parser.optionxform = str  # keys are case-sensitive, like the schema
    try:
        parser.read_string(text, source)
    except configparser.ParsingError as error:
        # Line numbers only: a malformed line may hold a password.
        if isinstance(error, configparser.MissingSectionHeaderError):
            lines = [error.lineno]
            problem = "no section headers; a key comes before the first [section]"
        else:
            lines, problem = [n for n, _ in error.errors], "not 'key = value'"
        where = ", ".join(f"line {n}" for n in lines)
        raise ConfigError(f"{source}: {where}: {problem}") from None
    except configparser.Error as error:
        raise ConfigError(f"{source}: {one_line(error)}") from None

    def fail(section: str, key: str | None, problem: str) -> ConfigError:
        where = f"[{section}] {key}" if key else f"[{section}]"
        return ConfigError(f"{source}: {where}: {problem}")

    def read(section: str, schema: _Schema) -> dict[str, object]:
        values = dict(parser[section]) if parser.has_section(section) else {}
        for key in values:
            if key not in schema:
                raise fail(section, key, f"unknown key (known: {', '.join(schema)})")
        parsed = {}
        for key, spec in schema.items():
            raw = values.get(key, spec.default)
            if raw is None or (raw == "" and spec.default is None):
                raise fail(section, key, "missing; this key is required")
            if "\n" in raw.strip() and key != "listen":
                # An indented line continues the value; not quoted, it may be a key.
                raise fail(section, key, "must be on one line (the next line is indented)")
            try:
                parsed[key] = spec.parse(raw.strip())
            except ValueError as error:
                raise fail(section, key, str(error)) from None
        return parsed

    connectors: dict[str, ConnectorConfig] = {}
    roles: dict[str, str] = {}
    for section in parser.sections():
        if section in ("relay", "api"):
            continue
        if not section.startswith(CONNECTOR_PREFIX) or not section[len(CONNECTOR_PREFIX):]:
            raise fail(
                section, None, "unknown section (known: [relay], [api], [connector:NAME])"
            )
        name = section[len(CONNECTOR_PREFIX):]
        connector_type = parser[section].get("type", "").strip()
        if connector_type not in _CONNECTOR_TYPES:
            raise fail(
                section,
                "type",
                f"must be one of {', '.join(_CONNECTOR_TYPES)}, got {connector_type!r}",
            )
        parser.remove_option(section, "type")
        given = frozenset(key for key, value in parser[section].items() if value)
        values = read(section, SCHEMA[connector_type])
        roles[name] = values.pop("role")
        try:
            connectors[name] = _connector_config(name, connector_type, values, given)
        except _KeyProblem as problem:
            raise fail(section, problem.key, problem.message) from None

    relay_values = read("relay", SCHEMA["relay"])
    if not relay_values["connector"]:
        if len(connectors) != 1:
            raise fail(
                "relay",
                "connector",
                "missing; name the [connector:NAME] section devices use",
            )
        relay_values["connector"] = next(iter(connectors))
    for name in connector_names(relay_values["connector"]):
        if name not in connectors:
            raise fail("relay", "connector", f"no section [{CONNECTOR_PREFIX}{name}]")
    if relay_values["retry_max"] and relay_values["retry_initial"] > relay_values["retry_max"]:
        raise fail("relay", "retry_initial", "must not be longer than retry_max")
    if relay_values["idle_timeout"] <= relay_values["commit_timeout"]:
        raise fail(
            "relay",
            "idle_timeout",
            "must be longer than commit_timeout, or silent waits for the end"
            " server would close devices",
        )
    if relay_values["workers"] > 1:
        for description in relay_values["listen"]:
            if not shareable(_VALIDATION_REACTOR, description):
                raise fail(
                    "relay",
                    "workers",
                    f"workers can share tcp: and haproxy:tcp: listeners only, not {description!r}",
                )
    try:
        _check_tls(relay_values)
    except _KeyProblem as problem:
        raise fail("relay", problem.key, problem.message) from None
    try:
        api = _api_config(read("api", SCHEMA["api"]))
    except _KeyProblem as problem:
        raise fail("api", problem.key, problem.message) from None
    return Config(
        RelayConfig(**relay_values),
        MappingProxyType(connectors),
        source,
        api,
        MappingProxyType(roles),
    )


class _KeyProblem(Exception):
    """A value that is wrong given the section's other keys."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key
        self.message = message


def _api_config(values: dict) -> ApiConfig:
    if not values["listen"]:
        if values["token"] or values["token_file"]:
            raise _KeyProblem("listen", "missing; the API needs an endpoint to listen on")
        return ApiConfig()
    if values["token"] and values["token_file"]:
        raise _KeyProblem("token_file", "set token or token_file, not both")
    token = values["token"]
    if values["token_file"]:
        try:
            with open(values["token_file"], encoding="utf-8") as f:
                token = f.read().strip()
        except OSError as error:
            raise _KeyProblem(
                "token_file", f"cannot read file {values['token_file']!r}: {error.strerror}"
            ) from None
        except UnicodeDecodeError:
            raise _KeyProblem(
                "token_file", f"{values['token_file']} is not UTF-8 text"
            ) from None
        if not token:
            raise _KeyProblem("token_file", f"{values['token_file']} is empty")
    if not token:
        raise _KeyProblem("token", "missing; the API never runs without a bearer token")
    return ApiConfig(values["listen"], token, values["metrics_public"])


_OAUTH2_KEYS = ("token_url", "client_id", "client_secret", "scope")
_SAS_KEYS = ("sas_key", "sas_policy", "sas_resource", "token_ttl")


def _connector_config(
    name: str, connector_type: str, values: dict, given: frozenset[str]
) -> ConnectorConfig:
    if connector_type == "tcp":
        return TcpConnectorConfig(name, **values)
    if connector_type == "file":
        return FileConnectorConfig(name, **values)
    header_keys = ("header1", "header2", "header3")
    headers = {key: values.pop(key) for key in header_keys}
    if connector_type == "azure-iothub":
        hub, device_id = values.pop("hub"), values.pop("device_id")
        if not values["url"]:
            try:
                values["url"] = _http_url(iothub_url(hub, device_id))
            except ValueError as error:
                raise _KeyProblem("hub", str(error)) from None
        values.update(auth="azure-sas", iothub=True)
    values["auth"] = auth = HttpConnectorConfig(name, **values).auth_scheme
    if auth == "basic" and not values["username"]:
        raise _KeyProblem("username", "missing; auth = basic needs a username")
    if auth != "basic":
        _refuse_given(given, ("username", "password"), f"auth = {auth}")
    if auth == "oauth2":
        for key in ("token_url", "client_id", "client_secret"):
            if not values[key]:
                raise _KeyProblem(key, "missing; auth = oauth2 needs it")
    else:
        _refuse_given(given, _OAUTH2_KEYS, f"auth = {auth}")
    if auth == "azure-sas":
        key = values["sas_key"]
        if not has_placeholders(key) and not key.startswith(SAS_PREFIX):
            # A key written out would otherwise fail every upload.
            try:
                decode_sas_key(key)
            except ValueError as error:
                raise _KeyProblem("sas_key", str(error)) from None
        if not values["sas_resource"]:
            try:
                values["sas_resource"] = default_sas_resource(values["url"])
            except ValueError as error:
                raise _KeyProblem("url", str(error)) from None
    else:
        _refuse_given(given, _SAS_KEYS, f"auth = {auth}")
    for key, header in headers.items():
        if header and header[0].lower() == "authorization" and auth != "none":
            raise _KeyProblem(key, f"an Authorization header conflicts with auth = {auth}")
    _check_client_certificate(values["client_cert"], values["client_key"])
    return HttpConnectorConfig(
        name, headers=tuple(h for h in headers.values() if h is not None), **values
    )


_TLS_POLICY_KEYS = ("tls_cert", "tls_key", "tls_ciphers", "client_ca")


def _check_tls(values: dict) -> None:
    """tls_listen has what it needs, and OpenSSL takes it, before the relay starts."""
    if not values["tls_listen"]:
        for key in _TLS_POLICY_KEYS:
            if values[key]:
                raise _KeyProblem(key, "needs tls_listen")
        return
    if not values["tls_cert"]:
        raise _KeyProblem("tls_cert", "missing; tls_listen needs a certificate")
    from .tls import load_client_certificate, server_tls_options

    try:
        load_client_certificate(values["tls_cert"], values["tls_key"])
    except Exception as error:
        raise _KeyProblem(
            "tls_cert",
            "not a PEM certificate with its private key"
            f" ({type(error).__name__}); set tls_key if the key is in another file",
        ) from None
    try:
        server_tls_options(
            values["tls_cert"],
            values["tls_key"],
            min_version=values["tls_min_version"],
            ciphers=values["tls_ciphers"],
            client_ca=values["client_ca"],
        )
    except ValueError as error:
        raise _KeyProblem("tls_ciphers", str(error)) from None


def _refuse_given(given: frozenset[str], keys: tuple[str, ...], context: str) -> None:
    for key in keys:
        if key in given:
            raise _KeyProblem(key, f"does not apply with {context}")


def _check_client_certificate(cert_file: str, key_file: str) -> None:
    if key_file and not cert_file:
        raise _KeyProblem("client_key", "needs client_cert")
    if not cert_file:
        return
    from .tls import load_client_certificate

    try:
        load_client_certificate(cert_file, key_file)
    except Exception as error:
        raise _KeyProblem(
            "client_cert",
            "not a PEM certificate with its private key"
            f" ({type(error).__name__}); set client_key if the key is in another file",
        ) from None
