"""
Tests for oemrelay.commands (API command bodies -> async messages) and the
async message encoders and parsers in oemrelay.codec.
"""

from __future__ import annotations

import json
import struct

from twisted.trial.unittest import SynchronousTestCase

from oemrelay.codec import (
    CAN_ADDRESS_SELF,
    AsyncMessage,
    AsyncStatus,
    FrameDecoder,
    MessageType,
    ProtocolError,
    encode_async_message,
    parse_async_message,
    parse_async_response,
)
from oemrelay.commands import (
    COMMAND_TYPES,
    MAX_ASYNC_DATA,
    CommandError,
    CommandRequest,
    iso8601,
    parse_command,
)

#: 2026-11-26T09:20:02Z as Unix seconds.
NOV_26 = 1795684802


class AsyncMessageTests(SynchronousTestCase):
    """encode_async_message and parse_async_message."""

    def test_encode_exact_bytes(self) -> None:
        """A 0x20 frame is header, id, CAN address, type, flags and data, little-endian."""
        frame = encode_async_message(0x01020304, 0x0012, bytes.fromhex("e8030000"))
        self.assertEqual(
            frame,
            bytes.fromhex("0255200f00" "04030201" "ffffffff" "1200" "00" "e8030000"),
        )

    def test_encode_defaults(self) -> None:
        """Without data, CAN address or flags, the message addresses the device itself with flags 0."""
        frame = encode_async_message(1, 0x0002)
        self.assertEqual(frame, bytes.fromhex("0255200b00" "01000000" "ffffffff" "0200" "00"))

    def test_can_address_self(self) -> None:
        """The device's own CAN address is 0xFFFFFFFF."""
        self.assertEqual(CAN_ADDRESS_SELF, 0xFFFFFFFF)

    def test_encode_explicit_can_address_and_flags(self) -> None:
        """An explicit CAN address and flags land at offsets 4 and 10."""
        frame = encode_async_message(2, 0x0100, b"\x01", can_address=0x10, flags=3)
        self.assertEqual(frame[5:][4:8], bytes.fromhex("10000000"))
        self.assertEqual(frame[5:][10], 3)

    def test_round_trip(self) -> None:
        """parse_async_message reads back every field encode_async_message wrote."""
        frame = encode_async_message(
            0xDEADBEEF, 0x0106, b"\x07" + bytes(12), can_address=0x1234, flags=1
        )
        [decoded] = FrameDecoder().feed(frame)
        self.assertEqual(decoded.type, MessageType.ASYNC_MESSAGE)
        self.assertEqual(
            parse_async_message(decoded.payload),
            AsyncMessage(0xDEADBEEF, 0x1234, 0x0106, 1, b"\x07" + bytes(12)),
        )

    def test_round_trip_without_data(self) -> None:
        """A message with no data parses back with empty data and the default address."""
        [decoded] = FrameDecoder().feed(encode_async_message(9, 0x0001))
        self.assertEqual(
            parse_async_message(decoded.payload),
            AsyncMessage(9, CAN_ADDRESS_SELF, 0x0001, 0, b""),
        )

    def test_parse_too_short(self) -> None:
        """A 0x20 payload shorter than its 11-byte header is a ProtocolError."""
        error = self.assertRaises(ProtocolError, parse_async_message, bytes(10))
        self.assertIn("10 bytes", str(error))

    def test_encode_out_of_range(self) -> None:
        """A message id that does not fit uint32 cannot be encoded."""
        self.assertRaises(struct.error, encode_async_message, 2**32, 1)


class AsyncResponseTests(SynchronousTestCase):
    """parse_async_response."""

    def test_parse(self) -> None:
        """A 0x21 payload is a uint32 message id and a status byte."""
        self.assertEqual(parse_async_response(bytes.fromhex("7856341201")), (0x12345678, 1))

    def test_statuses(self) -> None:
        """Failure, success and retry-later are 0, 1 and 2."""
        self.assertEqual(
            [parse_async_response(bytes(4) + bytes([s]))[1] for s in range(3)],
            [AsyncStatus.FAILURE, AsyncStatus.SUCCESS, AsyncStatus.RETRY_LATER],
        )

    def test_extra_bytes_ignored(self) -> None:
        """Bytes after the first five are ignored."""
        self.assertEqual(parse_async_response(bytes.fromhex("0500000002ffff")), (5, 2))

    def test_too_short(self) -> None:
        """A payload shorter than five bytes is a ProtocolError."""
        for length in range(5):
            self.assertRaises(ProtocolError, parse_async_response, bytes(length))


class CommandEncodingTests(SynchronousTestCase):
    """parse_command turns each command type into its async type and exact data."""

    def assertEncodes(self, body: dict, message_type: int, data_hex: str) -> CommandRequest:
        """Check ``body`` parses to ``message_type`` and the hex ``data_hex``."""
        request = parse_command(body)
        self.assertEqual((request.message_type, request.data.hex()), (message_type, data_hex))
        return request

    def test_set_digital_output(self) -> None:
        """set_digital_output is 0x0004 with uint16 outputs then uint16 mask."""
        self.assertEncodes(
            {"type": "set_digital_output", "outputs": 0x0102, "mask": 0x0304},
            0x0004,
            "02010403",
        )

    def test_set_digital_output_limits(self) -> None:
        """set_digital_output accepts 0 and 65535."""
        self.assertEncodes(
            {"type": "set_digital_output", "outputs": 65535, "mask": 0},
            0x0004,
            "ffff0000",
        )

    def test_set_operational_mode_normal(self) -> None:
        """Normal mode is 0x0003 with mode byte 1 and no expiry."""
        self.assertEncodes({"type": "set_operational_mode", "mode": "normal"}, 0x0003, "01")

    def test_set_operational_mode_recovery(self) -> None:
        """Recovery mode is 0x0003 with mode byte 3."""
        self.assertEncodes({"type": "set_operational_mode", "mode": "recovery"}, 0x0003, "03")

    def test_set_operational_mode_until_dm_vector(self) -> None:
        """Recovery until 2020-03-17T06:40:00Z is DM's 03 C0 49 8E 0D."""
        self.assertEncodes(
            {"type": "set_operational_mode", "mode": "recovery", "until": "2020-03-17T06:40:00Z"},
            0x0003,
            "03c0498e0d",
        )

    def test_set_operational_mode_until_offset_and_naive(self) -> None:
        """An offset is honoured and a naive until is UTC."""
        for until in ("2020-03-17T08:40:00+02:00", "2020-03-17T06:40:00", "2020-03-17 06:40:00.9"):
            self.assertEncodes(
                {"type": "set_operational_mode", "mode": "recovery", "until": until},
                0x0003,
                "03c0498e0d",
            )

    def test_set_operational_mode_until_range_ends(self) -> None:
        """until may be from 2013-01-01T00:00:00Z to 2149-02-07T06:28:15Z."""
        self.assertEncodes(
            {"type": "set_operational_mode", "mode": "normal", "until": "2013-01-01T00:00:00Z"},
            0x0003,
            "0100000000",
        )
        self.assertEncodes(
            {"type": "set_operational_mode", "mode": "normal", "until": "2149-02-07T06:28:15Z"},
            0x0003,
            "01ffffffff",
        )

    def test_set_odometer_dm_vector(self) -> None:
        """10 000 m is 0x0012 with DM's E8 03 00 00 (10 m units)."""
        self.assertEncodes({"type": "set_odometer", "metres": 10000}, 0x0012, "e8030000")

    def test_set_odometer_maximum(self) -> None:
        """The largest odometer is 0xFFFFFFFF tens of metres."""
        self.assertEncodes(
            {"type": "set_odometer", "metres": 0xFFFFFFFF * 10}, 0x0012, "ffffffff"
        )

    def test_set_run_hours(self) -> None:
        """set_run_hours is 0x0013 with uint32 seconds."""
        self.assertEncodes({"type": "set_run_hours", "seconds": 3600}, 0x0013, "100e0000")
        self.assertEncodes({"type": "set_run_hours", "seconds": 0xFFFFFFFF}, 0x0013, "ffffffff")

    def test_remote_reset(self) -> None:
        """remote_reset is 0x0002 with no data."""
        self.assertEncodes({"type": "remote_reset"}, 0x0002, "")

    def test_trigger_version_check(self) -> None:
        """trigger_version_check is 0x0001 with no data."""
        self.assertEncodes({"type": "trigger_version_check"}, 0x0001, "")

    def test_immobilise(self) -> None:
        """immobilise is 0x0100 with bit 0 set for on and clear for off."""
        self.assertEncodes({"type": "immobilise", "on": True}, 0x0100, "01")
        self.assertEncodes({"type": "immobilise", "on": False}, 0x0100, "00")

    def test_raw(self) -> None:
        """raw sends its message type and hex data as given, either case."""
        self.assertEncodes({"type": "raw", "message_type": 0x0106, "data": "07Aa"}, 0x0106, "07aa")

    def test_raw_empty(self) -> None:
        """raw accepts empty data."""
        self.assertEncodes({"type": "raw", "message_type": 65535, "data": ""}, 0xFFFF, "")

    def test_raw_maximum_data(self) -> None:
        """raw accepts data that exactly fills a frame."""
        request = parse_command({"type": "raw", "message_type": 8, "data": "00" * MAX_ASYNC_DATA})
        self.assertEqual(len(encode_async_message(1, request.message_type, request.data)), 5 + 0xFFFF)

    def test_request_fields(self) -> None:
        """The request keeps the type and the body's parameters, not type or schedule."""
        request = parse_command(
            {
                "type": "set_odometer",
                "metres": 20,
                "send_after": "2026-11-26T09:20:02Z",
                "expires": "2026-11-27T09:20:02Z",
            }
        )
        self.assertEqual(
            request,
            CommandRequest(
                type="set_odometer",
                params={"metres": 20},
                message_type=0x0012,
                data=bytes.fromhex("02000000"),
                send_after=NOV_26,
                expires=NOV_26 + 86400,
            ),
        )

    def test_params_keep_until_as_given(self) -> None:
        """params keep a time parameter as the client wrote it."""
        request = parse_command(
            {"type": "set_operational_mode", "mode": "recovery", "until": "2020-03-17T06:40:00Z"}
        )
        self.assertEqual(request.params, {"mode": "recovery", "until": "2020-03-17T06:40:00Z"})

    def test_params_are_a_copy(self) -> None:
        """Changing the body afterwards does not change the request's params."""
        body = {"type": "immobilise", "on": True}
        request = parse_command(body)
        body["on"] = False
        self.assertEqual(request.params, {"on": True})

    def test_no_schedule(self) -> None:
        """Without send_after and expires both are None."""
        request = parse_command({"type": "remote_reset"})
        self.assertEqual((request.send_after, request.expires), (None, None))


class ScheduleTests(SynchronousTestCase):
    """send_after and expires, on any command type."""

    def test_zulu(self) -> None:
        """A Z time is UTC, in Unix seconds."""
        request = parse_command({"type": "remote_reset", "send_after": "2026-11-26T09:20:02Z"})
        self.assertEqual(request.send_after, NOV_26)

    def test_naive_is_utc(self) -> None:
        """A time without a timezone is UTC."""
        request = parse_command({"type": "remote_reset", "expires": "2026-11-26T09:20:02"})
        self.assertEqual(request.expires, NOV_26)

    def test_offset(self) -> None:
        """An offset is applied."""
        request = parse_command({"type": "remote_reset", "expires": "2026-11-26T10:20:02+01:00"})
        self.assertEqual(request.expires, NOV_26)

    def test_fraction_kept(self) -> None:
        """Fractions of a second are kept as a float."""
        request = parse_command({"type": "remote_reset", "send_after": "2026-11-26T09:20:02.5Z"})
        self.assertEqual(request.send_after, NOV_26 + 0.5)

    def test_expires_only(self) -> None:
        """expires alone is accepted, with send_after None."""
        request = parse_command({"type": "trigger_version_check", "expires": "2026-11-26T09:20:02Z"})
        self.assertEqual((request.send_after, request.expires), (None, NOV_26))

    def test_expires_after_send_after(self) -> None:
        """expires one second after send_after is accepted."""
        request = parse_command(
            {
                "type": "remote_reset",
                "send_after": "2026-11-26T09:20:02Z",
                "expires": "2026-11-26T09:20:03Z",
            }
        )
        self.assertEqual((request.send_after, request.expires), (NOV_26, NOV_26 + 1))


class CommandErrorTests(SynchronousTestCase):
    """parse_command refuses every malformed body with a one-line CommandError."""

    def assertRefused(self, body: object, *fragments: str) -> str:
        """Check ``body`` raises a one-line CommandError containing ``fragments``."""
        error = self.assertRaises(CommandError, parse_command, body)
        message = str(error)
        self.assertNotIn("\n", message)
        for fragment in fragments:
            self.assertIn(fragment, message)
        return message

    def test_command_error_is_value_error(self) -> None:
        """CommandError is a ValueError."""
        self.assertTrue(issubclass(CommandError, ValueError))

    def test_not_an_object(self) -> None:
        """A body that is not a JSON object is refused."""
        for body in (None, [], "remote_reset", 3, [{"type": "remote_reset"}]):
            self.assertRefused(body, "JSON object")

    def test_missing_type(self) -> None:
        """A body without type is refused."""
        self.assertRefused({"metres": 10}, 'missing "type"')

    def test_unknown_type(self) -> None:
        """An unknown type is refused, naming it and the known types."""
        self.assertRefused({"type": "explode"}, '"explode"', "set_odometer", "raw")

    def test_type_not_a_string(self) -> None:
        """A type that is not a string is refused."""
        self.assertRefused({"type": 4}, "unknown command", "4")
        self.assertRefused({"type": ["raw"]}, "unknown command")

    def test_unknown_type_message_one_line(self) -> None:
        """A type with a newline and great length is quoted on one shortened line."""
        message = self.assertRefused({"type": "a\nb" * 100}, "unknown command")
        self.assertLess(len(message), 300)

    def test_unknown_key(self) -> None:
        """A key the type does not take is refused, naming it and the allowed keys."""
        self.assertRefused(
            {"type": "set_odometer", "metres": 10, "meters": 10},
            '"meters"',
            "set_odometer",
            "metres, send_after, expires",
        )

    def test_key_of_another_type(self) -> None:
        """A parameter of another command type is refused."""
        self.assertRefused({"type": "remote_reset", "on": True}, '"on"')

    def test_missing_parameters(self) -> None:
        """Each required parameter is required."""
        cases = [
            ({"type": "set_digital_output", "mask": 1}, "outputs"),
            ({"type": "set_digital_output", "outputs": 1}, "mask"),
            ({"type": "set_operational_mode"}, "mode"),
            ({"type": "set_odometer"}, "metres"),
            ({"type": "set_run_hours"}, "seconds"),
            ({"type": "immobilise"}, "on"),
            ({"type": "raw", "data": ""}, "message_type"),
            ({"type": "raw", "message_type": 1}, "data"),
        ]
        for body, key in cases:
            self.assertRefused(body, f'missing "{key}"', body["type"])

    def test_booleans_are_not_integers(self) -> None:
        """true and false are refused where an integer is wanted."""
        self.assertRefused({"type": "set_digital_output", "outputs": True, "mask": 1}, '"outputs"')
        self.assertRefused({"type": "set_run_hours", "seconds": False}, '"seconds"')
        self.assertRefused({"type": "raw", "message_type": True, "data": ""}, '"message_type"')

    def test_integers_are_not_booleans(self) -> None:
        """1 and 0 are refused for immobilise's on."""
        self.assertRefused({"type": "immobilise", "on": 1}, '"on"', "true or false")
        self.assertRefused({"type": "immobilise", "on": "true"}, '"on"')

    def test_non_integer_numbers(self) -> None:
        """Floats and numeric strings are refused where an integer is wanted."""
        self.assertRefused({"type": "set_run_hours", "seconds": 10.0}, '"seconds"', "integer")
        self.assertRefused({"type": "set_run_hours", "seconds": "10"}, '"seconds"')
        self.assertRefused({"type": "set_odometer", "metres": None}, '"metres"')

    def test_negative(self) -> None:
        """Negative integers are refused."""
        self.assertRefused({"type": "set_odometer", "metres": -10}, '"metres"')
        self.assertRefused({"type": "set_digital_output", "outputs": 1, "mask": -1}, '"mask"')

    def test_uint16_range(self) -> None:
        """Values above 65535 are refused for outputs, mask and message_type."""
        self.assertRefused(
            {"type": "set_digital_output", "outputs": 65536, "mask": 1}, '"outputs"', "65535"
        )
        self.assertRefused({"type": "set_digital_output", "outputs": 1, "mask": 65536}, '"mask"')
        self.assertRefused({"type": "raw", "message_type": 65536, "data": ""}, '"message_type"')

    def test_uint32_range(self) -> None:
        """Values that do not fit uint32 on the wire are refused."""
        self.assertRefused({"type": "set_run_hours", "seconds": 2**32}, '"seconds"', "4294967295")
        self.assertRefused(
            {"type": "set_odometer", "metres": (0xFFFFFFFF + 1) * 10}, '"metres"'
        )

    def test_odometer_not_multiple_of_ten(self) -> None:
        """Metres that are not a multiple of 10 are refused, not rounded."""
        self.assertRefused({"type": "set_odometer", "metres": 10005}, '"metres"', "multiple of 10")

    def test_unknown_mode(self) -> None:
        """A mode other than normal or recovery is refused."""
        for mode in ("shipping", "Normal", 1, None):
            self.assertRefused(
                {"type": "set_operational_mode", "mode": mode}, '"mode"', '"normal", "recovery"'
            )

    def test_until_unparsable(self) -> None:
        """An until that is not an ISO 8601 string is refused, naming the key."""
        for until in ("tomorrow", "", 1584427200, None):
            self.assertRefused(
                {"type": "set_operational_mode", "mode": "recovery", "until": until}, '"until"'
            )

    def test_until_out_of_range(self) -> None:
        """An until before 2013 or after the uint32 range of device time is refused."""
        for until in ("2012-12-31T23:59:59Z", "2149-02-07T06:28:16Z"):
            self.assertRefused(
                {"type": "set_operational_mode", "mode": "recovery", "until": until},
                '"until"',
                "2013-01-01T00:00:00Z to 2149-02-07T06:28:15Z",
            )

    def test_bad_hex(self) -> None:
        """raw data that is not whole hexadecimal byte pairs is refused."""
        for data in ("abc", "zz", "0a 0b", "0x0a", 10, None, ["0a"]):
            self.assertRefused({"type": "raw", "message_type": 1, "data": data}, '"data"')

    def test_raw_data_too_long(self) -> None:
        """raw data longer than one frame can carry is refused."""
        self.assertRefused(
            {"type": "raw", "message_type": 1, "data": "00" * (MAX_ASYNC_DATA + 1)},
            '"data"',
            str(MAX_ASYNC_DATA),
        )

    def test_schedule_unparsable(self) -> None:
        """send_after and expires that do not parse are refused, naming the key."""
        for key in ("send_after", "expires"):
            for value in ("soon", "2026-13-01T00:00:00Z", 1795684802, None):
                self.assertRefused({"type": "remote_reset", key: value}, f'"{key}"', "ISO 8601")

    def test_schedule_outside_utc_years(self) -> None:
        """A time whose UTC falls outside years 1 to 9999 (it could not be shown back) is refused."""
        for key in ("send_after", "expires"):
            for value in ("9999-12-31T23:59:59-23:59", "0001-01-01T00:00:00+23:59"):
                self.assertRefused({"type": "remote_reset", key: value}, f'"{key}"')

    def test_expires_not_after_send_after(self) -> None:
        """expires equal to or before send_after is refused."""
        for expires in ("2026-11-26T09:20:02Z", "2026-11-26T09:20:01Z"):
            self.assertRefused(
                {"type": "remote_reset", "send_after": "2026-11-26T09:20:02Z", "expires": expires},
                '"expires" must be after "send_after"',
            )


class Iso8601Tests(SynchronousTestCase):
    """iso8601 formats Unix seconds for the API."""

    def test_format(self) -> None:
        """Unix seconds become a UTC time with a Z."""
        self.assertEqual(iso8601(NOV_26), "2026-11-26T09:20:02Z")

    def test_fraction_dropped(self) -> None:
        """Fractions of a second are dropped."""
        self.assertEqual(iso8601(NOV_26 + 0.999), "2026-11-26T09:20:02Z")

    def test_epochs(self) -> None:
        """The Unix epoch and times before it format correctly."""
        self.assertEqual(iso8601(0), "1970-01-01T00:00:00Z")
        self.assertEqual(iso8601(-0.5), "1969-12-31T23:59:59Z")

    def test_round_trip(self) -> None:
        """A formatted time parses back to the same seconds as send_after."""
        request = parse_command({"type": "remote_reset", "send_after": iso8601(NOV_26)})
        self.assertEqual(request.send_after, NOV_26)


class CommandTypesTests(SynchronousTestCase):
    """COMMAND_TYPES describes every command for the API's OpenAPI document."""

    EXAMPLES = {
        "set_digital_output": {"outputs": 1, "mask": 1},
        "set_operational_mode": {"mode": "recovery"},
        "set_odometer": {"metres": 0},
        "set_run_hours": {"seconds": 0},
        "remote_reset": {},
        "trigger_version_check": {},
        "immobilise": {"on": True},
        "raw": {"message_type": 1, "data": ""},
    }

    def test_names(self) -> None:
        """COMMAND_TYPES names exactly the types parse_command accepts."""
        self.assertEqual(set(COMMAND_TYPES), set(self.EXAMPLES))
        for name, params in self.EXAMPLES.items():
            self.assertEqual(parse_command({"type": name, **params}).type, name)

    def test_schemas_list_keys(self) -> None:
        """Each schema lists the type's keys, required ones and the schedule keys."""
        for name, params in self.EXAMPLES.items():
            schema = COMMAND_TYPES[name]
            self.assertEqual(schema["properties"]["type"]["const"], name)
            self.assertEqual(set(schema["required"]), {"type", *params})
            self.assertLessEqual({"send_after", "expires"}, set(schema["properties"]))
            self.assertFalse(schema["additionalProperties"])
            self.assertTrue(schema["description"])

    def test_optional_until(self) -> None:
        """until is a listed but optional property of set_operational_mode."""
        schema = COMMAND_TYPES["set_operational_mode"]
        self.assertIn("until", schema["properties"])
        self.assertNotIn("until", schema["required"])

    def test_json_ready(self) -> None:
        """Every schema serialises to JSON as it is."""
        text = json.dumps({"oneOf": list(COMMAND_TYPES.values())})
        self.assertIn('"multipleOf": 10', text)

    def test_read_only(self) -> None:
        """COMMAND_TYPES cannot be changed by assignment."""
        with self.assertRaises(TypeError):
            COMMAND_TYPES["new"] = {}  # type: ignore[index]
