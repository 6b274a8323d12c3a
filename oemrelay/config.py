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
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from urllib.parse import urlsplit

from hyperlink import EncodedURL
from OpenSSL import SSL
from twisted.internet.endpoints import clientFromString, serverFromString
from twisted.internet.interfaces import IReactorPluggableNameResolver
from zope.interface import implementer

from .codec import MAX_PAYLOAD
from .iothub import SAS_PREFIX, decode_sas_key, default_sas_resource, iothub_url
from .oneline import one_line
from .registry_url import check_postgresql_url
from .templates import has_placeholders
from .tls import load_client_certificate
from .workers import shareable


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
        # treq drops the password and the request fails; say what works.
        raise ValueError("must not hold user:password@; set username and password instead")
    if has_placeholders(parts.netloc):
        raise ValueError("the host part must not contain placeholders")
    if parts.netloc.startswith("["):
        # treq's URL library IDNA-encodes every host and fails on IPv6
        # literals (python-hyper/hyperlink#68), so each POST would fail.
        raise ValueError("IPv6 literal hosts are not supported; use a host name")
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port == 0:
        raise ValueError("the port must be a number from 1 to 65535")
    try:
        # What treq does to every request's URL: refused here, not per upload.
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
        try:
            SSL.Context(SSL.TLS_METHOD).load_verify_locations(value)
        except Exception:
            raise ValueError(f"{value!r} holds no PEM CA certificate") from None
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


_MAX_TOKEN_TTL = 10 * 365 * 24 * 3600


def _whole_seconds(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise ValueError(f"must be a whole number of seconds, got {value!r}") from None
    if not 0 < number <= _MAX_TOKEN_TTL:
        raise ValueError(f"must be from 1 to {_MAX_TOKEN_TTL} seconds (ten years)")
    return number


def _whole_number(value: str, unit: str, low: int, high: int, words: str = "") -> int:
    """``value`` as a whole number from ``low`` to ``high`` (of ``unit``)."""
    try:
        number = int(value)
    except ValueError:
        raise ValueError(f"must be a whole number of {unit}{words}, got {value!r}") from None
    if not low <= number <= high:
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


def _optional_http_url(value: str) -> str:
    return _http_url(value) if value else ""


def _node_name(value: str) -> str:
    return value or socket.gethostname()


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
    :ivar doc: one line saying what the key means, for the reference table.
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


@dataclass(frozen=True)
class RelayConfig:
    """``[relay]``: where devices connect and how long the relay waits."""

    listen: tuple[str, ...] = _setting(
        _server_endpoints, "tcp:20500", "Twisted server endpoint strings, space separated."
    )
    connector: str = _setting(
        _text, "", "The [connector:NAME] devices use; empty: the only connector section."
    )
    commit_timeout: float = _setting(
        _positive_number, "20", "Seconds for the connector to accept an upload."
    )
    idle_timeout: float = _setting(
        _positive_number,
        "600",
        "Seconds of silence before a device is closed; more than commit_timeout.",
    )
    max_message: int = _setting(
        _message_size, str(MAX_PAYLOAD), "Largest accepted payload, in bytes."
    )
    #: Secret: a PostgreSQL URL may hold a password.
    registry: str = _setting(
        _registry_url,
        "sqlite:oemrelay.sqlite",
        "sqlite:PATH (its directory must be writable) or postgresql://user@host/db.",
        secret=True,
    )
    node: str = _setting(
        _node_name, "", "This relay's name in the registry; empty: the host name."
    )
    workers: int = _setting(
        _workers,
        "1",
        "Processes serving devices (tcp: and haproxy:tcp: listeners); auto: one per core.",
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
        _optional_server_endpoints, "", "Twisted server endpoint strings; empty: no API."
    )
    token: str = _setting(
        _text, "", "The bearer token every request must carry.", secret=True
    )


#: ``[api]`` keys read into other fields.
_API_FILE_KEYS = {
    "token_file": Key(_readable_file, "", "A file holding the token (instead of token)."),
}


@dataclass(frozen=True)
class HttpConnectorConfig:
    """``[connector:NAME]`` with ``type = http``."""

    name: str
    #: Secret: the path and query may hold a key (``?code=...``).
    url: str = _setting(
        _http_url, None, "http:// or https:// URL; a template.", secret=True
    )
    headers: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    username: str = _setting(_text, "", "HTTP Basic user name (a template).")
    password: str = _setting(
        _text, "", "HTTP Basic password (a template).", secret=True
    )
    timeout: float = _setting(
        _positive_number, "10", "Seconds for the end server to answer one POST."
    )
    ca_file: str = _setting(_ca_file, "", "PEM file of a private CA to trust as well.")
    pool_size: int = _setting(
        _pool_size,
        "256",
        "Connections kept open to the end server, and POSTs in flight to it at most.",
    )
    client_cert: str = _setting(
        _readable_file, "", "PEM client certificate (mutual TLS), with its key."
    )
    client_key: str = _setting(
        _readable_file, "", "PEM private key, if not in client_cert."
    )
    #: ``none``, ``basic``, ``azure-sas`` or ``oauth2``; empty: basic when
    #: there are credentials, else none (see :attr:`auth_scheme`).
    auth: str = _setting(
        _auth_scheme, "", "none, basic, azure-sas or oauth2; empty: basic with credentials."
    )
    sas_key: str = _setting(
        _text, "[CUSTOM3]", "Template: the device's base64 SAS key.", secret=True
    )
    sas_policy: str = _setting(_text, "", "Shared access policy name (adds skn=).")
    sas_resource: str = _setting(
        _text, "", "Template; empty: the URL's host and path up to /messages."
    )
    token_ttl: int = _setting(
        _whole_seconds, "3600", "SAS token lifetime in seconds, at most ten years."
    )
    #: Secret: the query may hold a key.
    token_url: str = _setting(
        _optional_http_url, "", "OAuth2 token endpoint.", secret=True
    )
    client_id: str = _setting(_text, "", "OAuth2 client id.")
    client_secret: str = _setting(_text, "", "OAuth2 client secret.", secret=True)
    scope: str = _setting(_text, "", "OAuth2 scope (optional).")
    #: Azure IoT Hub: add ``iothub-messageid`` to each request.
    iothub: bool = False

    @property
    def auth_scheme(self) -> str:
        """The authentication in force, with the empty default resolved."""
        if self.auth:
            return self.auth
        return "basic" if self.username or self.password else "none"


@dataclass(frozen=True)
class TcpConnectorConfig:
    """``[connector:NAME]`` with ``type = tcp``."""

    name: str
    endpoint: str = _setting(
        _client_endpoint, None, "Twisted client endpoint string of the end server."
    )


@dataclass(frozen=True)
class FileConnectorConfig:
    """``[connector:NAME]`` with ``type = file``."""

    name: str
    path: str = _setting(
        _appendable_path, None, "JSON-lines file; its directory must be writable."
    )


ConnectorConfig = HttpConnectorConfig | TcpConnectorConfig | FileConnectorConfig


@dataclass(frozen=True)
class Config:
    """The whole configuration, as read from ``source``."""

    relay: RelayConfig
    connectors: Mapping[str, ConnectorConfig]
    source: str = "<string>"
    api: ApiConfig = field(default_factory=ApiConfig)


_Schema = Mapping[str, Key]

#: The http connector keys read into ``headers``.
_HEADER_KEYS: _Schema = {
    f"header{n}": Key(_header, "", "'Name: value' extra header; the value is a template.")
    for n in (1, 2, 3)
}

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
)

#: Every section and key the relay reads: ``[relay]``, ``[api]``, and each
#: connector ``type``.
SCHEMA: Mapping[str, _Schema] = MappingProxyType(
    {
        "relay": _keys_of(RelayConfig),
        "api": {**_keys_of(ApiConfig), **_API_FILE_KEYS},
        "http": {**_keys_of(HttpConnectorConfig), **_HEADER_KEYS},
        "azure-iothub": {
            "hub": Key(_required, None, "The hub's name (myhub) or full host name."),
            "device_id": Key(_required, "[CUSTOM1]", "The IoT Hub device id (a template)."),
            "url": Key(_optional_http_url, "", "Override the hub's URL (a test double)."),
            **_HEADER_KEYS,
            **_keys_of(HttpConnectorConfig, _IOTHUB_SHARED),
        },
        "tcp": _keys_of(TcpConnectorConfig),
        "file": _keys_of(FileConnectorConfig),
    }
)

_CONNECTOR_TYPES = tuple(kind for kind in SCHEMA if kind not in ("relay", "api"))


CONNECTOR_PREFIX = "connector:"


def load_config(path: str) -> Config:
    """
    Read and check the file at ``path``.

    :raises ConfigError: with one line naming the file, section and key.
    """
    try:
        with open(path, encoding="utf-8") as f:
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
    if relay_values["connector"] not in connectors:
        raise fail(
            "relay",
            "connector",
            f"no section [{CONNECTOR_PREFIX}{relay_values['connector']}]",
        )
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
        api = _api_config(read("api", SCHEMA["api"]))
    except _KeyProblem as problem:
        raise fail("api", problem.key, problem.message) from None
    return Config(
        RelayConfig(**relay_values), MappingProxyType(connectors), source, api
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
    return ApiConfig(values["listen"], token)


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


def _refuse_given(given: frozenset[str], keys: tuple[str, ...], context: str) -> None:
    for key in keys:
        if key in given:
            raise _KeyProblem(key, f"does not apply with {context}")


def _check_client_certificate(cert_file: str, key_file: str) -> None:
    if key_file and not cert_file:
        raise _KeyProblem("client_key", "needs client_cert")
    if not cert_file:
        return
    try:
        load_client_certificate(cert_file, key_file)
    except Exception as error:
        raise _KeyProblem(
            "client_cert",
            "not a PEM certificate with its private key"
            f" ({type(error).__name__}); set client_key if the key is in another file",
        ) from None
