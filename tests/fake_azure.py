"""
A fake Azure IoT Hub device-to-cloud HTTPS endpoint, for tests.

:class:`FakeIoTHub` is a :class:`twisted.web.resource.Resource`: give it to
``treq.testing.StubTreq`` for in-memory tests, or serve it with
``Site(hub)`` on a loopback port for end-to-end tests.  It checks each
request's ``SharedAccessSignature`` the way IoT Hub does and keeps what it
accepted.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from base64 import b64decode, b64encode
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import unquote

from twisted.internet.interfaces import IReactorTime
from twisted.web.resource import Resource
from twisted.web.server import Request

_SAS_PREFIX = "SharedAccessSignature "
_SAS_FIELDS = {"sr", "sig", "se", "skn"}


@dataclass(frozen=True)
class HubMessage:
    """One accepted device-to-cloud message."""

    device_id: str
    body: bytes
    #: Every request header, names lower-cased, values decoded as UTF-8.
    headers: Mapping[str, tuple[str, ...]]
    #: The ``iothub-messageid`` header, if sent.
    message_id: str | None


@dataclass(frozen=True)
class HubRejection:
    """One refused request and why (for tests to tell refusals apart)."""

    device_id: str
    code: int
    reason: str


class FakeIoTHub(Resource):
    """
    ``POST /devices/{id}/messages/events?api-version=...``, authorised by a
    device SAS (signed with that device's key) or a policy SAS (``skn``
    naming one of ``policies``).

    A token is accepted when its ``se`` is not in the past, its ``sr``
    (URL-decoded, case-insensitively) is the request's ``host/devices/{id}``
    or a path prefix of it ending at a ``/`` (so a hub-wide policy token
    covers every device, but ``hub/devices/dev1`` does not cover ``dev10``),
    and its ``sig`` is the HMAC-SHA256, with the base64-decoded key, of the
    ``sr`` exactly as written in the token, a newline and ``se``.  Anything
    else is answered 401; an accepted message is kept in :attr:`messages`
    and answered 204.

    :param devices: device id -> base64 device key.
    :param policies: shared access policy name -> base64 policy key.
    :param clock: the current time as epoch seconds.
    :param hostname: the hub's host name; by default the request's ``Host``
        (without port).  Set it when serving on a loopback port.
    """

    isLeaf = True

    def __init__(
        self,
        devices: Mapping[str, str],
        policies: Mapping[str, str] | None = None,
        *,
        clock: IReactorTime,
        hostname: str | None = None,
    ) -> None:
        super().__init__()
        self.devices = dict(devices)
        self.policies = dict(policies or {})
        self.clock = clock
        self.hostname = hostname
        self.messages: list[HubMessage] = []
        self.rejections: list[HubRejection] = []
        #: How many requests arrived, accepted or not.
        self.requests = 0

    def render_POST(self, request: Request) -> bytes:  # noqa: N802 - Twisted's name
        self.requests += 1
        segments = [unquote(part.decode("utf-8")) for part in request.path.split(b"/")]
        if (
            len(segments) != 5
            or segments[0] != ""
            or segments[1] != "devices"
            or not segments[2]
            or segments[3:] != ["messages", "events"]
        ):
            return self._refuse(request, "", 404, "no such endpoint")
        device_id = segments[2]
        if not request.args.get(b"api-version"):
            return self._refuse(request, device_id, 400, "no api-version")
        host = self.hostname or request.getRequestHostname().decode("ascii")
        reason = self._check_authorization(
            request.getHeader(b"authorization"), f"{host}/devices/{device_id}", device_id
        )
        if reason is not None:
            return self._refuse(request, device_id, 401, reason)
        request.content.seek(0)
        headers = {
            name.decode("latin-1").lower(): tuple(v.decode("utf-8") for v in values)
            for name, values in request.requestHeaders.getAllRawHeaders()
        }
        message_id = headers.get("iothub-messageid", (None,))[0]
        self.messages.append(
            HubMessage(device_id, request.content.read(), headers, message_id)
        )
        request.setResponseCode(204)
        return b""

    def _check_authorization(
        self, header: bytes | None, target: str, device_id: str
    ) -> str | None:
        """Why ``header`` does not authorise a POST to ``target``, or None."""
        if header is None:
            return "no Authorization header"
        text = header.decode("latin-1")
        if not text.startswith(_SAS_PREFIX):
            return "not a SharedAccessSignature"
        fields: dict[str, str] = {}
        for pair in text[len(_SAS_PREFIX):].split("&"):
            name, equals, value = pair.partition("=")
            if not equals or name not in _SAS_FIELDS or name in fields:
                return "malformed token"
            fields[name] = value
        if not {"sr", "sig", "se"} <= set(fields):
            return "malformed token"
        if not fields["se"].isdigit():
            return "malformed expiry"
        if int(fields["se"]) < self.clock.seconds():
            return "expired"
        resource = unquote(fields["sr"]).lower()
        wanted = target.lower()
        if resource != wanted and not wanted.startswith(resource.rstrip("/") + "/"):
            return "wrong resource"
        if "skn" in fields:
            key = self.policies.get(unquote(fields["skn"]))
            if key is None:
                return "unknown policy"
        else:
            key = self.devices.get(device_id)
            if key is None:
                return "unknown device"
        if "skn" in fields and device_id not in self.devices:
            return "unknown device"
        signed = f"{fields['sr']}\n{fields['se']}".encode("utf-8")
        expected = b64encode(hmac.new(b64decode(key), signed, hashlib.sha256).digest())
        if not hmac.compare_digest(expected, unquote(fields["sig"]).encode("utf-8")):
            return "wrong signature"
        return None

    def _refuse(self, request: Request, device_id: str, code: int, reason: str) -> bytes:
        self.rejections.append(HubRejection(device_id, code, reason))
        request.setResponseCode(code)
        request.setHeader(b"Content-Type", b"application/json; charset=utf-8")
        error = "IotHubUnauthorizedAccess" if code == 401 else "BadRequest"
        return json.dumps({"Message": f"ErrorCode:{error};{reason}"}).encode("utf-8")
