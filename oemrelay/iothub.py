"""
Azure IoT Hub addresses and SAS keys: the checks and defaults that need no
clock, no network and no oemrelay module but the template placeholders.

:mod:`oemrelay.config` uses them to refuse a bad ``[connector:NAME]`` section
at load time; :mod:`oemrelay.auth` signs requests with the same definitions.
Messages never quote key material.
"""

from __future__ import annotations

import binascii
import re
from base64 import b64decode
from urllib.parse import quote, unquote

from .templates import PLACEHOLDERS

#: The IoT Hub REST API version :func:`iothub_url` asks for.
IOTHUB_API_VERSION = "2021-04-12"

#: The DNS suffix added to a bare hub name (Azure's public cloud).
IOTHUB_DOMAIN = "azure-devices.net"

#: How a complete SAS, sent as it is, begins.
SAS_PREFIX = "SharedAccessSignature "
_PLACEHOLDER_SPLIT = re.compile(r"(\[(?:" + "|".join(PLACEHOLDERS) + r")\])")


def decode_sas_key(key_base64: str) -> bytes:
    """The raw bytes of a base64 SAS key; the error names no key material."""
    try:
        key = b64decode(key_base64.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("the SAS key is not valid base64") from None
    if not key:
        raise ValueError("the SAS key is empty")
    return key


def _split_url_template(url_template: str) -> tuple[str, str]:
    """
    The host (no user info, no port) and raw path of a URL template.

    Parsed by hand: :func:`urllib.parse.urlsplit` refuses a bracketed
    placeholder in the host as a malformed IPv6 literal.
    """
    scheme, separator, rest = url_template.partition("://")
    if not separator or not scheme:
        raise ValueError("the URL has no scheme (expected https://...)")
    end = len(rest)
    for stop in "/?#":
        index = rest.find(stop)
        if index != -1:
            end = min(end, index)
    authority, remainder = rest[:end], rest[end:]
    host = authority.rpartition("@")[2]
    # Drop a port, but not the inside of an IPv6 literal or a placeholder.
    head, colon, port = host.rpartition(":")
    if colon and "]" not in port and port.isdigit():
        host = head
    if not host:
        raise ValueError("the URL has no host")
    path = remainder
    for stop in "?#":
        path = path.split(stop, 1)[0]
    return host, path


def default_sas_resource(url_template: str) -> str:
    """
    The SAS scope implied by an IoT Hub URL: its host and its path up to,
    and not including, ``/messages``.

    ``https://myhub.azure-devices.net/devices/[CUSTOM1]/messages/events?api-version=2021-04-12``
    gives ``myhub.azure-devices.net/devices/[CUSTOM1]``.  Placeholders are
    kept for :class:`AzureSas` to fill in; percent-escapes in the template's
    path are decoded (the resource is signed unescaped, then encoded as a
    whole).  A path without a ``/messages`` segment is taken whole, less
    a trailing ``/``.

    :raises ValueError: if the URL has no scheme or no host.
    """
    host, path = _split_url_template(url_template)
    match = re.search(r"/messages(?=/|$)", path, re.IGNORECASE)
    if match is not None:
        path = path[: match.start()]
    return unquote(host + path.rstrip("/"))


def iothub_url(hub: str, device_id_template: str) -> str:
    """
    The IoT Hub HTTPS URL a device's telemetry is POSTed to.

    :param hub: the hub's name (``myhub``, completed with
        ``.azure-devices.net``) or, if it contains a dot, its full host name
        (``myhub.azure-devices.net``, or a national cloud's such as
        ``myhub.azure-devices.cn``), taken as written.
    :param device_id_template: the device id, usually a placeholder such as
        ``[CUSTOM1]``; literal text around placeholders is percent-encoded
        here, the placeholders' values when the URL is expanded.
    :raises ValueError: if ``hub`` is empty or is not a bare host name.
    """
    hub = hub.strip()
    if not hub or re.search(r"[/:@?#\s\[\]]", hub):
        raise ValueError(
            "the IoT Hub must be a hub name or host name, such as myhub"
            f" or myhub.{IOTHUB_DOMAIN}"
        )
    host = hub if "." in hub else f"{hub}.{IOTHUB_DOMAIN}"
    if not device_id_template:
        raise ValueError("the IoT Hub device id template is empty")
    device = "".join(
        part if _PLACEHOLDER_SPLIT.fullmatch(part) else quote(part, safe="")
        for part in _PLACEHOLDER_SPLIT.split(device_id_template)
    )
    return f"https://{host}/devices/{device}/messages/events?api-version={IOTHUB_API_VERSION}"
