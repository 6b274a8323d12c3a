"""
Commands for devices: the API's JSON bodies, checked and turned into the
async message (0x20) type and data a device understands.

Each command type is declared once, in ``_COMMANDS``: its async message type,
its parameters and how they become bytes.  ``parse_command`` checks a body
against that table and ``COMMAND_TYPES`` publishes it as one JSON Schema per
type for the API's OpenAPI document.  Payload layouts follow
``docs/protocol.rst`` ("Async message types"); all integers are little-endian.

Decisions where DM's public material leaves a choice:

* ``set_digital_output`` sends uint16 ``outputs`` then uint16 ``mask``, the
  field order of DM's layout table.  DM's worked example is internally
  inconsistent (its hex ``FF FF 00 06`` and its JSON ``[15, 15, 6, 0]`` do not
  describe the same bytes), so the order of the two words is unconfirmed until
  tried on a device.
* ``set_odometer`` takes metres but the device counts in 10 m units.  A value
  that is not a multiple of 10 is refused rather than rounded, so the metres a
  client sees in the command listing are exactly what the device was sent.
* ``set_operational_mode``'s ``until`` is sent in whole seconds (fractions are
  dropped) and must lie in the uint32 range of device time, 2013-01-01 to
  2149-02-07.  It is accepted with either mode, as the wire format allows.
* Times (``until``, ``send_after``, ``expires``) are ISO 8601 strings as read
  by ``datetime.fromisoformat``, with ``Z`` or an offset; a time without one
  is UTC.  Whether a time is already past is left to the caller, which has
  the clock.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from types import MappingProxyType
from typing import Any

from oemrelay.codec import EPOCH_2013, MAX_PAYLOAD, UINT32_MAX

UINT16_MAX = 0xFFFF

#: The most data one async message can carry: a frame payload less the
#: 11-byte header (message id, CAN address, async type, flags).
MAX_ASYNC_DATA = MAX_PAYLOAD - 11

#: Keys every command body may carry besides its own parameters.
_SCHEDULE_KEYS = ("send_after", "expires")

_UNIX_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


class CommandError(ValueError):
    """A command body the relay cannot send; the message is for the API client."""


@dataclass(frozen=True)
class CommandRequest:
    """A checked command, ready to queue."""

    type: str
    params: dict[str, Any]
    message_type: int
    data: bytes
    send_after: float | None = None
    expires: float | None = None


# -- times ---------------------------------------------------------------------


def iso8601(unix_seconds: float) -> str:
    """A Unix time as ``2026-11-26T09:20:02Z`` (UTC, fractions dropped)."""
    moment = _UNIX_EPOCH + timedelta(seconds=math.floor(unix_seconds))
    return moment.replace(tzinfo=None).isoformat(timespec="seconds") + "Z"


def _parse_time(key: str, value: object) -> float:
    """Unix seconds for an ISO 8601 string; naive means UTC."""
    if isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value)
        except ValueError:
            pass
        else:
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=timezone.utc)
            try:
                # Refuses a UTC time outside years 1-9999, which iso8601 could not show.
                moment = moment.astimezone(timezone.utc)
            except OverflowError:
                raise CommandError(f'"{key}" must fall within years 1 to 9999 UTC') from None
            return (moment - _UNIX_EPOCH).total_seconds()
    raise CommandError(
        f'"{key}" must be an ISO 8601 time such as "2026-11-26T09:20:02Z"'
    )


# -- parameter kinds -----------------------------------------------------------
#
# Each kind checks one value (returning what the encoder needs) and describes
# itself as JSON Schema.


@dataclass(frozen=True)
class _Integer:
    description: str
    maximum: int = UINT32_MAX
    multiple_of: int = 1

    def check(self, key: str, value: object) -> int:
        # bool is a subclass of int, but true is not a number in JSON.
        if (
            not isinstance(value, int)
            or isinstance(value, bool)
            or not 0 <= value <= self.maximum
        ):
            raise CommandError(
                f'"{key}" must be an integer from 0 to {self.maximum}'
            )
        if value % self.multiple_of:
            raise CommandError(f'"{key}" must be a multiple of {self.multiple_of}')
        return value

    def schema(self) -> dict[str, Any]:
        schema: dict[str, Any] = {
            "type": "integer",
            "minimum": 0,
            "maximum": self.maximum,
            "description": self.description,
        }
        if self.multiple_of != 1:
            schema["multipleOf"] = self.multiple_of
        return schema


@dataclass(frozen=True)
class _Boolean:
    description: str

    def check(self, key: str, value: object) -> bool:
        if not isinstance(value, bool):
            raise CommandError(f'"{key}" must be true or false')
        return value

    def schema(self) -> dict[str, Any]:
        return {"type": "boolean", "description": self.description}


@dataclass(frozen=True)
class _Choice:
    description: str
    values: Mapping[str, int]

    def check(self, key: str, value: object) -> int:
        if not isinstance(value, str) or value not in self.values:
            choices = ", ".join(f'"{name}"' for name in self.values)
            raise CommandError(f'"{key}" must be one of {choices}')
        return self.values[value]

    def schema(self) -> dict[str, Any]:
        return {
            "type": "string",
            "enum": list(self.values),
            "description": self.description,
        }


@dataclass(frozen=True)
class _Time:
    description: str

    def check(self, key: str, value: object) -> float:
        return _parse_time(key, value)

    def schema(self) -> dict[str, Any]:
        return {
            "type": "string",
            "format": "date-time",
            "description": self.description
            + " ISO 8601; without a timezone it is UTC.",
        }


@dataclass(frozen=True)
class _Hex:
    description: str
    max_bytes: int = MAX_ASYNC_DATA

    def check(self, key: str, value: object) -> bytes:
        data = None
        if isinstance(value, str):
            try:
                data = bytes.fromhex(value)
            except ValueError:
                pass
        # fromhex also skips whitespace, which the schema's pattern does not allow.
        if data is None or len(value) != 2 * len(data):
            raise CommandError(
                f'"{key}" must be a string of hexadecimal byte pairs, e.g. "0a01"'
            )
        if len(data) > self.max_bytes:
            raise CommandError(f'"{key}" must be at most {self.max_bytes} bytes')
        return data

    def schema(self) -> dict[str, Any]:
        return {
            "type": "string",
            "pattern": "^([0-9A-Fa-f]{2})*$",
            "maxLength": 2 * self.max_bytes,
            "description": self.description,
        }


_Kind = _Integer | _Boolean | _Choice | _Time | _Hex


# -- command types -------------------------------------------------------------


@dataclass(frozen=True)
class _Command:
    """One command type: what it does, its parameters and its encoding."""

    description: str
    #: Parameter name -> (kind, required).
    params: Mapping[str, tuple[_Kind, bool]]
    #: Checked parameter values (missing optional ones absent) -> (async type, data).
    encode: Callable[[dict[str, Any]], tuple[int, bytes]]


def _fixed(message_type: int, layout: str, *keys: str) -> Callable[
    [dict[str, Any]], tuple[int, bytes]
]:
    """An encoder packing ``keys`` with a struct ``layout``."""
    packer = struct.Struct(layout)

    def encode(values: dict[str, Any]) -> tuple[int, bytes]:
        return message_type, packer.pack(*(values[key] for key in keys))

    return encode


def _encode_operational_mode(values: dict[str, Any]) -> tuple[int, bytes]:
    data = struct.pack("<B", values["mode"])
    if "until" in values:
        data += struct.pack("<I", values["until"])
    return 0x0003, data


def _encode_raw(values: dict[str, Any]) -> tuple[int, bytes]:
    return values["message_type"], values["data"]


_DEVICE_TIME_RANGE = (
    f"{iso8601(EPOCH_2013)} to {iso8601(EPOCH_2013 + UINT32_MAX)}"
)


@dataclass(frozen=True)
class _DeviceTime(_Time):
    """A time sent to the device: whole seconds since 2013, uint32."""

    def check(self, key: str, value: object) -> int:
        seconds = math.floor(_parse_time(key, value)) - EPOCH_2013
        if not 0 <= seconds <= UINT32_MAX:
            raise CommandError(f'"{key}" must be from {_DEVICE_TIME_RANGE}')
        return seconds


_COMMANDS: Mapping[str, _Command] = {
    "set_digital_output": _Command(
        "Set digital outputs (async type 0x0004): the outputs selected by"
        " mask are driven to their bit in outputs.",
        {
            "outputs": (
                _Integer("Logical output levels, bit n = output n.", UINT16_MAX),
                True,
            ),
            "mask": (
                _Integer("Outputs to change, bit n = output n.", UINT16_MAX),
                True,
            ),
        },
        _fixed(0x0004, "<HH", "outputs", "mask"),
    ),
    "set_operational_mode": _Command(
        "Set the operational mode (async type 0x0003), optionally until a time"
        " after which the device cancels it.",
        {
            "mode": (
                _Choice("The mode to enter.", {"normal": 1, "recovery": 3}),
                True,
            ),
            "until": (
                _DeviceTime(f"When the mode ends ({_DEVICE_TIME_RANGE})."),
                False,
            ),
        },
        _encode_operational_mode,
    ),
    "set_odometer": _Command(
        "Set the odometer (async type 0x0012). The device counts in 10 m units.",
        {
            "metres": (
                _Integer(
                    "The new odometer reading in metres.",
                    UINT32_MAX * 10,
                    multiple_of=10,
                ),
                True,
            ),
        },
        lambda values: (0x0012, struct.pack("<I", values["metres"] // 10)),
    ),
    "set_run_hours": _Command(
        "Set the run-hours counter (async type 0x0013).",
        {"seconds": (_Integer("The new run time in seconds."), True)},
        _fixed(0x0013, "<I", "seconds"),
    ),
    "remote_reset": _Command(
        "Reset the device (async type 0x0002).",
        {},
        lambda values: (0x0002, b""),
    ),
    "trigger_version_check": _Command(
        "Make the device check for new firmware (async type 0x0001).",
        {},
        lambda values: (0x0001, b""),
    ),
    "immobilise": _Command(
        "Switch the immobiliser on or off (async type 0x0100).",
        {"on": (_Boolean("True to immobilise, false to release."), True)},
        lambda values: (0x0100, bytes([1 if values["on"] else 0])),
    ),
    "raw": _Command(
        "Send any async message type with the given data bytes.",
        {
            "message_type": (
                _Integer("The async message type, e.g. 4 for 0x0004.", UINT16_MAX),
                True,
            ),
            "data": (
                _Hex("The message data as hexadecimal, possibly empty."),
                True,
            ),
        },
        _encode_raw,
    ),
}

_SCHEDULE_PARAMS: Mapping[str, _Time] = {
    "send_after": _Time("Do not send the command before this time."),
    "expires": _Time(
        "Drop the command if it has not been sent by this time;"
        " must be after send_after."
    ),
}


def _schema(name: str, command: _Command) -> dict[str, Any]:
    properties: dict[str, Any] = {"type": {"type": "string", "const": name}}
    properties.update((key, kind.schema()) for key, (kind, _) in command.params.items())
    properties.update((key, kind.schema()) for key, kind in _SCHEDULE_PARAMS.items())
    return {
        "type": "object",
        "description": command.description,
        "properties": properties,
        "required": ["type"]
        + [key for key, (_, required) in command.params.items() if required],
        "additionalProperties": False,
    }


#: Every command type's name -> the JSON Schema of its body (a plain,
#: JSON-ready dict whose ``description`` says what the command does), e.g.
#: for ``{"oneOf": list(COMMAND_TYPES.values())}``.  Copy a schema before
#: changing it: parse_command does not read them, but other users do.
COMMAND_TYPES: Mapping[str, dict[str, Any]] = MappingProxyType(
    {name: _schema(name, command) for name, command in _COMMANDS.items()}
)


# -- parsing -------------------------------------------------------------------


def _quote(value: object, limit: int = 40) -> str:
    """A client's value for an error message: JSON, one line, shortened."""
    text = json.dumps(value, default=repr)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def parse_command(body: object) -> CommandRequest:
    """
    Check an API command body and encode it for the device.

    :param body: the decoded JSON body.
    :raises CommandError: with a one-line message for the client if the body
        is not an object, its type is missing or unknown, a parameter is
        missing, of the wrong type or out of range, a key is not known, or
        ``expires`` is not after ``send_after``.
    """
    if not isinstance(body, dict):
        raise CommandError("the command must be a JSON object")
    if "type" not in body:
        raise CommandError('missing "type"')
    name = body["type"]
    if not isinstance(name, str) or name not in _COMMANDS:
        known = ", ".join(_COMMANDS)
        raise CommandError(
            f'unknown command "type" {_quote(name)}; known types: {known}'
        )
    command = _COMMANDS[name]

    unknown = [
        key
        for key in body
        if key != "type" and key not in command.params and key not in _SCHEDULE_KEYS
    ]
    if unknown:
        allowed = ", ".join([*command.params, *_SCHEDULE_KEYS])
        raise CommandError(
            f"unknown key {_quote(unknown[0])} for {name}; allowed: {allowed}"
        )

    values = {}
    for key, (kind, required) in command.params.items():
        if key in body:
            values[key] = kind.check(key, body[key])
        elif required:
            raise CommandError(f'missing "{key}" for {name}')

    schedule = {
        key: kind.check(key, body[key])
        for key, kind in _SCHEDULE_PARAMS.items()
        if key in body
    }
    send_after = schedule.get("send_after")
    expires = schedule.get("expires")
    if send_after is not None and expires is not None and expires <= send_after:
        raise CommandError('"expires" must be after "send_after"')

    message_type, data = command.encode(values)
    return CommandRequest(
        type=name,
        params={
            key: value
            for key, value in body.items()
            if key != "type" and key not in _SCHEDULE_KEYS
        },
        message_type=message_type,
        data=data,
        send_after=send_after,
        expires=expires,
    )
