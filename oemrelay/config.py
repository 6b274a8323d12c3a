"""
The relay's INI configuration: one schema, parsed once into frozen values.

Every section and key the relay reads is listed here.  Anything else is an
error naming the file, the section and the key, so a typo never silently
falls back to a default.  :func:`config_from_string` lets tests skip files.
"""

from __future__ import annotations

import configparser
import os
import re
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from urllib.parse import urlsplit

from hyperlink import EncodedURL
from twisted.internet.endpoints import clientFromString, serverFromString
from twisted.internet.testing import MemoryReactor

from .codec import MAX_PAYLOAD
from .templates import has_placeholders


class ConfigError(Exception):
    """The configuration is unusable; the message is one line for the user."""


@dataclass(frozen=True)
class RelayConfig:
    """``[relay]``: where devices connect and how long the relay waits."""

    listen: tuple[str, ...] = ("tcp:20500",)
    connector: str = ""
    commit_timeout: float = 20.0
    idle_timeout: float = 600.0
    max_message: int = MAX_PAYLOAD
    #: Not in repr(): a PostgreSQL URL may hold a password.
    registry: str = field(default="sqlite:oemrelay.sqlite", repr=False)
    node: str = field(default_factory=socket.gethostname)


@dataclass(frozen=True)
class ApiConfig:
    """``[api]``: the management HTTP API, off unless ``listen`` is set."""

    listen: tuple[str, ...] = ()
    token: str = field(default="", repr=False)


@dataclass(frozen=True)
class HttpConnectorConfig:
    """``[connector:NAME]`` with ``type = http``."""

    name: str
    #: Not in repr(): the path and query may hold a key (``?code=...``).
    url: str = field(repr=False)
    headers: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    username: str = ""
    password: str = field(default="", repr=False)
    timeout: float = 10.0
    ca_file: str = ""
    client_cert: str = ""
    client_key: str = ""
    #: ``none``, ``basic``, ``azure-sas`` or ``oauth2``; empty: basic when
    #: there are credentials, else none (see :attr:`auth_scheme`).
    auth: str = ""
    sas_key: str = field(default="[CUSTOM3]", repr=False)
    sas_policy: str = ""
    sas_resource: str = ""
    token_ttl: int = 3600
    token_url: str = field(default="", repr=False)
    client_id: str = ""
    client_secret: str = field(default="", repr=False)
    scope: str = ""
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
    endpoint: str


@dataclass(frozen=True)
class FileConnectorConfig:
    """``[connector:NAME]`` with ``type = file``."""

    name: str
    path: str


ConnectorConfig = HttpConnectorConfig | TcpConnectorConfig | FileConnectorConfig


@dataclass(frozen=True)
class Config:
    """The whole configuration, as read from ``source``."""

    relay: RelayConfig
    connectors: Mapping[str, ConnectorConfig]
    source: str = "<string>"
    api: ApiConfig = ApiConfig()


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


# Endpoint strings are only parsed here, never listened on or connected:
# a memory reactor keeps validation free of side effects.
_VALIDATION_REACTOR = MemoryReactor()


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
        from OpenSSL import SSL

        try:
            SSL.Context(SSL.TLS_METHOD).load_verify_locations(value)
        except Exception:
            raise ValueError(f"{value!r} holds no PEM CA certificate") from None
    return value


# -- the schema: section kind -> key -> (parser, default; None = required)

_Schema = dict[str, tuple[Callable[[str], object], str | None]]

def _registry_url(value: str) -> str:
    if value.startswith("sqlite:") and value[len("sqlite:"):]:
        return value
    if value.startswith(("postgresql://", "postgres://")):
        from .registry import check_postgresql_url

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


def _optional_http_url(value: str) -> str:
    return _http_url(value) if value else ""


_RELAY_KEYS: _Schema = {
    "listen": (_server_endpoints, "tcp:20500"),
    "connector": (_text, ""),
    "commit_timeout": (_positive_number, "20"),
    "idle_timeout": (_positive_number, "600"),
    "max_message": (_message_size, str(MAX_PAYLOAD)),
    "registry": (_registry_url, "sqlite:oemrelay.sqlite"),
    "node": (_text, ""),
}

_API_KEYS: _Schema = {
    "listen": (_text, ""),
    "token": (_text, ""),
    "token_file": (_readable_file, ""),
}

# Keys shared by the two HTTP connector types.
_HTTPS_KEYS: _Schema = {
    "header1": (_header, ""),
    "header2": (_header, ""),
    "header3": (_header, ""),
    "timeout": (_positive_number, "10"),
    "ca_file": (_ca_file, ""),
    "client_cert": (_readable_file, ""),
    "client_key": (_readable_file, ""),
    "sas_key": (_text, "[CUSTOM3]"),
    "sas_policy": (_text, ""),
    "sas_resource": (_text, ""),
    "token_ttl": (_whole_seconds, "3600"),
}

_CONNECTOR_KEYS: dict[str, _Schema] = {
    "http": {
        "url": (_http_url, None),
        **_HTTPS_KEYS,
        "username": (_text, ""),
        "password": (_text, ""),
        "auth": (_auth_scheme, ""),
        "token_url": (_optional_http_url, ""),
        "client_id": (_text, ""),
        "client_secret": (_text, ""),
        "scope": (_text, ""),
    },
    "azure-iothub": {
        "hub": (_required, None),
        "device_id": (_required, "[CUSTOM1]"),
        "url": (_optional_http_url, ""),
        **_HTTPS_KEYS,
    },
    "tcp": {"endpoint": (_client_endpoint, None)},
    "file": {"path": (_appendable_path, None)},
}

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
        raise ConfigError(f"{source}: {' '.join(str(error).split())}") from None

    def fail(section: str, key: str | None, problem: str) -> ConfigError:
        where = f"[{section}] {key}" if key else f"[{section}]"
        return ConfigError(f"{source}: {where}: {problem}")

    def read(section: str, schema: _Schema) -> dict[str, object]:
        values = dict(parser[section]) if parser.has_section(section) else {}
        for key in values:
            if key not in schema:
                raise fail(section, key, f"unknown key (known: {', '.join(schema)})")
        parsed = {}
        for key, (parse, default) in schema.items():
            raw = values.get(key, default)
            if raw is None or (raw == "" and default is None):
                raise fail(section, key, "missing; this key is required")
            if "\n" in raw.strip() and key != "listen":
                # An indented line continues the value; not quoted, it may be a key.
                raise fail(section, key, "must be on one line (the next line is indented)")
            try:
                parsed[key] = parse(raw.strip())
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
        if connector_type not in _CONNECTOR_KEYS:
            raise fail(
                section,
                "type",
                f"must be one of {', '.join(_CONNECTOR_KEYS)}, got {connector_type!r}",
            )
        parser.remove_option(section, "type")
        given = frozenset(key for key, value in parser[section].items() if value)
        values = read(section, _CONNECTOR_KEYS[connector_type])
        try:
            connectors[name] = _connector_config(name, connector_type, values, given)
        except _KeyProblem as problem:
            raise fail(section, problem.key, problem.message) from None

    relay_values = read("relay", _RELAY_KEYS)
    relay_values["node"] = relay_values["node"] or socket.gethostname()
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
    try:
        api = _api_config(read("api", _API_KEYS))
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
    try:
        listen = _server_endpoints(values["listen"])
    except ValueError as error:
        raise _KeyProblem("listen", str(error)) from None
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
    return ApiConfig(listen, token)


_OAUTH2_KEYS = ("token_url", "client_id", "client_secret", "scope")
_SAS_KEYS = ("sas_key", "sas_policy", "sas_resource", "token_ttl")


def _connector_config(
    name: str, connector_type: str, values: dict, given: frozenset[str]
) -> ConnectorConfig:
    if connector_type == "tcp":
        return TcpConnectorConfig(name, **values)
    if connector_type == "file":
        return FileConnectorConfig(name, **values)
    # Imported here: auth imports templates, which must not import config.
    from .auth import SAS_PREFIX, decode_sas_key, default_sas_resource, iothub_url

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
    from twisted.internet.ssl import PrivateCertificate

    try:
        with open(cert_file, "rb") as f:
            pem = f.read()
        if key_file:
            with open(key_file, "rb") as f:
                pem += b"\n" + f.read()
        PrivateCertificate.loadPEM(pem)
    except Exception as error:
        raise _KeyProblem(
            "client_cert",
            "not a PEM certificate with its private key"
            f" ({type(error).__name__}); set client_key if the key is in another file",
        ) from None
