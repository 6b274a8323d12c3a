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
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from urllib.parse import urlsplit

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


@dataclass(frozen=True)
class HttpConnectorConfig:
    """``[connector:NAME]`` with ``type = http``."""

    name: str
    url: str
    headers: tuple[tuple[str, str], ...] = ()
    username: str = ""
    password: str = field(default="", repr=False)
    timeout: float = 10.0
    ca_file: str = ""


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
    _required(value)
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"must be an http:// or https:// URL, got {value!r}")
    if has_placeholders(parts.netloc.split("@")[-1]):
        raise ValueError("the host part must not contain placeholders")
    if parts.netloc.split("@")[-1].startswith("["):
        # treq's URL library IDNA-encodes every host and fails on IPv6
        # literals (python-hyper/hyperlink#68), so each POST would fail.
        raise ValueError("IPv6 literal hosts are not supported; use a host name")
    return value


_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")


def _header(value: str) -> tuple[str, str] | None:
    if not value:
        return None
    name, colon, template = value.partition(":")
    name = name.strip()
    if not colon or not _HEADER_NAME.match(name):
        raise ValueError(f"must be 'Name: value', got {value!r}")
    return name, template.strip()


def _readable_file(value: str) -> str:
    if value and not os.access(value, os.R_OK):
        raise ValueError(f"cannot read file {value!r}")
    return value


# -- the schema: section kind -> key -> (parser, default; None = required)

_Schema = dict[str, tuple[Callable[[str], object], str | None]]

_RELAY_KEYS: _Schema = {
    "listen": (_server_endpoints, "tcp:20500"),
    "connector": (_text, ""),
    "commit_timeout": (_positive_number, "20"),
    "idle_timeout": (_positive_number, "600"),
    "max_message": (_message_size, str(MAX_PAYLOAD)),
}

_CONNECTOR_KEYS: dict[str, _Schema] = {
    "http": {
        "url": (_http_url, None),
        "header1": (_header, ""),
        "header2": (_header, ""),
        "header3": (_header, ""),
        "username": (_text, ""),
        "password": (_text, ""),
        "timeout": (_positive_number, "10"),
        "ca_file": (_readable_file, ""),
    },
    "tcp": {"endpoint": (_client_endpoint, None)},
    "file": {"path": (_required, None)},
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
            try:
                parsed[key] = parse(raw.strip())
            except ValueError as error:
                raise fail(section, key, str(error)) from None
        return parsed

    connectors: dict[str, ConnectorConfig] = {}
    for section in parser.sections():
        if section == "relay":
            continue
        if not section.startswith(CONNECTOR_PREFIX) or not section[len(CONNECTOR_PREFIX):]:
            raise fail(
                section, None, "unknown section (known: [relay], [connector:NAME])"
            )
        name = section[len(CONNECTOR_PREFIX):]
        values = dict(parser[section])
        connector_type = values.pop("type", "").strip()
        if connector_type not in _CONNECTOR_KEYS:
            raise fail(
                section,
                "type",
                f"must be one of {', '.join(_CONNECTOR_KEYS)}, got {connector_type!r}",
            )
        parser.remove_option(section, "type")
        connectors[name] = _connector_config(name, connector_type, read(section, _CONNECTOR_KEYS[connector_type]))

    relay_values = read("relay", _RELAY_KEYS)
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
    return Config(RelayConfig(**relay_values), MappingProxyType(connectors), source)


def _connector_config(name: str, connector_type: str, values: dict) -> ConnectorConfig:
    if connector_type == "http":
        headers = tuple(
            values.pop(key) for key in ("header1", "header2", "header3")
        )
        return HttpConnectorConfig(
            name, headers=tuple(h for h in headers if h is not None), **values
        )
    if connector_type == "tcp":
        return TcpConnectorConfig(name, **values)
    return FileConnectorConfig(name, **values)
