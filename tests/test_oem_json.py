"""
Tests for ``oemrelay.oem_json``: the OEM "traditional" JSON body, checked
against the real OEM sample and the hand-decoded capture values of
``tests/data/README.rst`` (layouts: ``docs/protocol.rst``).
"""

from __future__ import annotations

import json
import struct
from base64 import b64decode

from twisted.trial.unittest import SynchronousTestCase

from oemrelay.codec import (
    Analogues,
    DebugText,
    Digital,
    DriverId,
    FixedRecordExtras,
    GpsFix,
    Hello,
    OdometerRunHours,
    RawField,
    Record,
    ShortField,
    TripSummary,
    decode_field,
    fletcher8,
    parse_data_records,
    parse_fixed_records,
    parse_hello,
)
from oemrelay.oem_json import (
    FIXED_EXTRAS_FTYPE,
    SHORT_FIELD_FTYPE,
    degrees,
    device_time,
    field_json,
    oem_document,
    record_json,
)

from .vectors import (
    HAND_DECODED_DEGREES,
    HAND_DECODED_RECORDS,
    oem_sample,
    oem_sample_text,
    payload,
    since_2013,
)
from .zones import use_time_zone

DATA_CAPTURES = (
    "data-0x04-2-records-2021-denmark",
    "data-0x04-12-records-2017-auckland",
    "data-0x04-20-records-dart-after-reset",
)
FIXED_CAPTURES = ("fixed64-0x10-1-record-G50", "fixed64-0x10-2-records-G50")

DART = Hello(129336, "353323081669730", "89610185001824844630", 34, 2, 1, 9)




def _reject_constant(name: str) -> None:
    raise ValueError(f"non-standard JSON constant {name}")


def _pairs(pairs: list[tuple[str, object]]) -> list[tuple[str, object]]:
    keys = [key for key, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError(f"duplicate keys in {keys}")
    return pairs


def ordered(text: str | bytes) -> object:
    """Strictly parse JSON keeping every object as its list of (key, value) pairs."""
    return json.loads(text, object_pairs_hook=_pairs, parse_constant=_reject_constant)


def keys(pairs: list[tuple[str, object]]) -> list[str]:
    """The keys of an ordered object, in order."""
    return [key for key, _ in pairs]


def strict(text: str | bytes) -> dict:
    """Parse JSON strictly (no NaN/Infinity, no duplicate keys) into dicts."""
    return json.loads(
        text,
        object_pairs_hook=lambda pairs: dict(_pairs(pairs)),
        parse_constant=_reject_constant,
    )


def sample_hello() -> Hello:
    """The hello behind the OEM sample: FW 33.4.1.27 for ProdId 33."""
    return Hello(131693, "356692063643328", "8944538523010771676", 33, 4, 1, 27)


def sample_records() -> list[Record]:
    """Records equal to the two of ``oem-http-sample.json``."""
    fix_time = since_2013("2017-05-08 18:04:57")
    gps = GpsFix(fix_time, 437370138, -793462607, 197, 0, 13, 66, 18, 37, 7)
    digital = Digital(2, 0, 2)
    return [
        Record(
            125,
            since_2013("2017-05-11 05:58:44"),
            11,
            (
                gps,
                digital,
                Analogues(6, ((1, 14641), (3, 2484), (4, 26), (5, 10868))),
                Analogues(7, ((11, 34), (12, 0), (13, 309), (14, 9921), (15, 3))),
            ),
        ),
        Record(
            128,
            since_2013("2017-05-11 17:59:45"),
            11,
            (
                gps,
                digital,
                Analogues(6, ((1, 14607), (3, 2752), (4, 26), (5, 11062))),
                Analogues(7, ((11, 34), (12, 1), (13, 325), (14, 10881), (15, 3))),
            ),
        ),
    ]


class DegreesTests(SynchronousTestCase):
    """degrees() prints raw × 1e-7 exactly, as a JSON number."""

    def test_sample_values(self) -> None:
        """The OEM sample's coordinates come out as in the sample."""
        self.assertEqual(degrees(437370138), "43.7370138")
        self.assertEqual(degrees(-793462607), "-79.3462607")

    def test_no_float_noise(self) -> None:
        """Values that float arithmetic would spoil are printed exactly."""
        # Raw * 1e-7 in floats gives 9.934394099999999 for the Denmark
        # longitude; the expected texts are written out by hand.
        self.assertEqual(len(HAND_DECODED_DEGREES), 6)
        self.assertEqual(
            {raw: degrees(raw) for raw in HAND_DECODED_DEGREES}, HAND_DECODED_DEGREES
        )

    def test_trailing_zeros_dropped(self) -> None:
        """Trailing zeros of the fraction are dropped, but one decimal stays."""
        self.assertEqual(degrees(1526421500), "152.64215")
        self.assertEqual(degrees(1000000), "0.1")
        self.assertEqual(degrees(10000000), "1.0")
        self.assertEqual(degrees(-1800000000), "-180.0")

    def test_negative(self) -> None:
        """Negative values carry one minus sign, including below one degree."""
        self.assertEqual(degrees(-294937869), "-29.4937869")
        self.assertEqual(degrees(-5000000), "-0.5")
        self.assertEqual(degrees(-1), "-0.0000001")

    def test_zero(self) -> None:
        """Zero is printed as the number 0.0."""
        self.assertEqual(degrees(0), "0.0")

    def test_tiny(self) -> None:
        """The smallest steps keep their leading zeros."""
        self.assertEqual(degrees(1), "0.0000001")
        self.assertEqual(degrees(10), "0.000001")
        self.assertEqual(degrees(12345), "0.0012345")

    def test_int32_extremes(self) -> None:
        """The int32 limits are printed exactly."""
        self.assertEqual(degrees(2**31 - 1), "214.7483647")
        self.assertEqual(degrees(-(2**31)), "-214.7483648")

    def test_parses_to_the_exact_decimal(self) -> None:
        """Every output is a JSON number equal to raw / 10**7."""
        from decimal import Decimal

        for raw in (0, 1, -1, 9, 10, 99999999, 100000000, -100000001, 437370138, 2**31 - 1, -(2**31)):
            text = degrees(raw)
            self.assertEqual(json.loads(text, parse_float=Decimal), Decimal(raw).scaleb(-7), raw)
            self.assertNotIn("e", text.lower())


class DeviceTimeTests(SynchronousTestCase):
    """device_time() writes device times as OEM does, in UTC."""

    def test_zero(self) -> None:
        """Time 0 is the 2013 epoch."""
        self.assertEqual(device_time(0), "2013-01-01 00:00:00")

    def test_known_times(self) -> None:
        """Times from the captures format as the hand decode states."""
        self.assertEqual(device_time(255505915), "2021-02-05 05:51:55")
        self.assertEqual(device_time(347068800), "2024-01-01 00:00:00")
        self.assertEqual(device_time(59), "2013-01-01 00:00:59")

    def test_leap_day(self) -> None:
        """A leap day is formatted correctly."""
        self.assertEqual(device_time(since_2013("2016-02-29 23:59:59")), "2016-02-29 23:59:59")

    def test_uint32_max(self) -> None:
        """The largest device time is still formatted."""
        self.assertEqual(device_time(2**32 - 1), "2149-02-07 06:28:15")


class FieldJsonTests(SynchronousTestCase):
    """Each field type has its own JSON object, with FType last."""

    def test_gps(self) -> None:
        """A GPS fix is written with raw integers and exact degrees."""
        fix = GpsFix(0, -1, 10000000, -12, 2330, 1, 148, 12, 7, 3)
        self.assertEqual(
            field_json(fix),
            '{"GpsUTC":"2013-01-01 00:00:00","Lat":-0.0000001,"Long":1.0,"Alt":-12,'
            '"Spd":2330,"SpdAcc":1,"Head":148,"PDOP":12,"PosAcc":7,"GpsStat":3,"FType":0}',
        )

    def test_digital(self) -> None:
        """Digital data is DIn, DOut, DevStat."""
        self.assertEqual(
            field_json(Digital(2**32 - 1, 65535, 7)),
            '{"DIn":4294967295,"DOut":65535,"DevStat":7,"FType":2}',
        )

    def test_analogues_keep_device_order(self) -> None:
        """Analogue keys are strings in the device's order, values as decoded."""
        self.assertEqual(
            field_json(Analogues(6, ((4, 26), (3, -5), (2, 1248)))),
            '{"AnalogueData":{"4":26,"3":-5,"2":1248},"FType":6}',
        )
        self.assertEqual(
            field_json(Analogues(7, ((17, 65793), (18, -(2**31))))),
            '{"AnalogueData":{"17":65793,"18":-2147483648},"FType":7}',
        )

    def test_empty_analogues(self) -> None:
        """An empty analogue field gives an empty AnalogueData object."""
        self.assertEqual(field_json(Analogues(6, ())), '{"AnalogueData":{},"FType":6}')

    def test_driver_id_g60(self) -> None:
        """The G60 driver id sample is reproduced from its six bytes."""
        field = decode_field(3, bytes.fromhex("02000009b6e139"))
        self.assertEqual(field, DriverId(2, bytes.fromhex("000009b6e139")))
        self.assertEqual(field_json(field), '{"DType":2,"Data":"AAAJtuE5","FType":3}')

    def test_debug_text(self) -> None:
        """Debug text gives Code, Text and FType 1."""
        self.assertEqual(
            field_json(DebugText(0x27, b"RESET Dart 34.2.1.9 flags=1 WD=0")),
            '{"Code":39,"Text":"RESET Dart 34.2.1.9 flags=1 WD=0","FType":1}',
        )

    def test_debug_text_any_bytes(self) -> None:
        """Debug text with every byte value is still valid JSON, one char per byte."""
        text = bytes(range(256)) + b'"\\'
        parsed = strict(field_json(DebugText(65535, text)))
        self.assertEqual(parsed, {"Code": 65535, "Text": text.decode("latin-1"), "FType": 1})
        self.assertEqual(keys(ordered(field_json(DebugText(0, text)))), ["Code", "Text", "FType"])

    def test_trip_and_odometer(self) -> None:
        """Fields 26 and 27 use the relay's own documented keys."""
        self.assertEqual(
            field_json(TripSummary(1500, 3600)), '{"TripDist":1500,"TripDur":3600,"FType":26}'
        )
        self.assertEqual(
            field_json(OdometerRunHours(123456, 7200)), '{"Odo":123456,"RunHrs":7200,"FType":27}'
        )

    def test_unknown_field_raw(self) -> None:
        """An unknown field is its base64 bytes and its id."""
        data = b"\x01\x0b\x02\xca\x0a\x14\x00\xff"
        self.assertEqual(field_json(RawField(24, data)), '{"Raw":"AQsCygoUAP8=","FType":24}')
        self.assertEqual(b64decode(strict(field_json(RawField(24, data)))["Raw"]), data)

    def test_known_id_too_short_not_standard(self) -> None:
        """A known id too short for its layout is raw under FType 257, never its own."""
        field = decode_field(0, bytes(range(20)))
        self.assertEqual(
            ordered(field_json(field)),
            [("Raw", "AAECAwQFBgcICQoLDA0ODxAREhM="), ("ShortOf", 0), ("FType", 257)],
        )
        self.assertEqual(SHORT_FIELD_FTYPE, 257)

    def test_empty_raw(self) -> None:
        """An empty unknown field has an empty Raw string."""
        self.assertEqual(field_json(RawField(200, b"")), '{"Raw":"","FType":200}')

    def test_fixed_extras(self) -> None:
        """G50 values use FType 256 and their own keys, in G50 units."""
        self.assertEqual(FIXED_EXTRAS_FTYPE, 256)
        (record,) = parse_fixed_records(payload("fixed64-0x10-1-record-G50"))
        self.assertEqual(
            ordered(field_json(record.fields[-1])),
            [
                ("Lat", -29.4937869),
                ("Long", 31.2025029),
                ("Alt", 66),
                ("Spd", 0),
                ("Head", 126),
                ("PosAccRaw", 2449),
                ("SpdAccRaw", 9),
                ("GpsStat", 7),
                ("DIn", 1),
                ("DOut", 0),
                ("Analogues", [4235, 13925, 0, 0, 0]),
                ("Temp", 127),
                ("AccX", 468),
                ("AccY", -828),
                ("AccZ", -270),
                ("DevId", "ffffffffffffffff"),
                ("PDOP100", 238),
                ("ChecksumOk", True),
                ("FType", 256),
            ],
        )

    def test_fixed_extras_bad_checksum(self) -> None:
        """A failed checksum is written as false."""
        extras = FixedRecordExtras(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, (0,) * 5, -5, (0, 0, 0), bytes(8), 0, False)
        self.assertIs(strict(field_json(extras))["ChecksumOk"], False)

    def test_ftype_last_everywhere(self) -> None:
        """Every field kind puts FType last and equal to its id."""
        fields = [
            GpsFix(0, 0, 0, 0, 0, 0, 0, 0, 0, 0),
            DebugText(1, b"x"),
            Digital(0, 0, 0),
            DriverId(1, b"\x01\x02\x03\x04\x05"),
            Analogues(6, ((1, 2),)),
            Analogues(7, ((11, 2),)),
            TripSummary(0, 0),
            OdometerRunHours(0, 0),
            RawField(99, b"\x00"),
            ShortField(0, b"\x00"),
            FixedRecordExtras(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, (0,) * 5, 0, (0, 0, 0), bytes(8), 0, True),
            GpsFix(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, extra=b"\x01"),
        ]
        ftypes = []
        for field in fields:
            pairs = ordered(field_json(field))
            self.assertEqual(pairs[-1][0], "FType", field)
            self.assertEqual(keys(pairs).count("FType"), 1, field)
            ftypes.append(pairs[-1][1])
        self.assertEqual(ftypes, [0, 1, 2, 3, 6, 7, 26, 27, 99, 257, 256, 0])


class LongFieldJsonTests(SynchronousTestCase):
    """A field longer than its layout keeps its standard keys, then ExtraRaw, then FType."""

    def test_gps_22_bytes(self) -> None:
        """A 22-byte GPS field gives every standard GPS key and the extra byte as ExtraRaw."""
        layout = struct.pack("<IiihHBBBBB", 0, 10, 20, 1, 2, 3, 4, 5, 6, 7)
        pairs = ordered(field_json(decode_field(0, layout + b"\xfe")))
        self.assertEqual(
            keys(pairs),
            ["GpsUTC", "Lat", "Long", "Alt", "Spd", "SpdAcc", "Head", "PDOP", "PosAcc",
             "GpsStat", "ExtraRaw", "FType"],
        )
        self.assertEqual(dict(pairs)["ExtraRaw"], "/g==")
        self.assertEqual(dict(pairs)["FType"], 0)

    def test_no_extra_key_when_exact(self) -> None:
        """A field of exactly its layout's length has no ExtraRaw key."""
        for field in (GpsFix(0, 0, 0, 0, 0, 0, 0, 0, 0, 0), Digital(1, 2, 3),
                      Analogues(6, ((1, 2),)), TripSummary(1, 2), OdometerRunHours(1, 2)):
            self.assertNotIn("ExtraRaw", strict(field_json(field)))

    def test_every_packed_field_extra(self) -> None:
        """Digital, analogue, trip and odometer fields write their extra bytes before FType."""
        cases = [
            (Digital(1, 2, 3, extra=b"\x01"), ["DIn", "DOut", "DevStat", "ExtraRaw", "FType"]),
            (Analogues(6, ((1, 2),), extra=b"\x01"), ["AnalogueData", "ExtraRaw", "FType"]),
            (TripSummary(1, 2, extra=b"\x01"), ["TripDist", "TripDur", "ExtraRaw", "FType"]),
            (OdometerRunHours(1, 2, extra=b"\x01"), ["Odo", "RunHrs", "ExtraRaw", "FType"]),
        ]
        for field, expected in cases:
            pairs = ordered(field_json(field))
            self.assertEqual(keys(pairs), expected)
            self.assertEqual(b64decode(dict(pairs)["ExtraRaw"]), b"\x01")

    def test_consumer_accepts_long_gps(self) -> None:
        """A consumer reading FType 0 gets the fix from a 22-byte GPS field."""
        gps = struct.pack("<IiihHBBBBB", 5, 557000000, 99000000, 30, 2330, 1, 148, 12, 7, 3) + b"\x00"
        body = record_bytes_for([(0, gps), (2, struct.pack("<IHH", 1, 0, 3))])
        (position,) = OemConsumer().read(oem_document(DART, parse_data_records(body)))
        self.assertEqual((position["lat"], position["lon"], position["course"]), (55.7, 9.9, 296))


def record_bytes_for(fields: list[tuple[int, bytes]]) -> bytes:
    """One 0x04 record (seq 1, time 0, reason 3) holding ``fields``."""
    body = b"".join(bytes([field_id, len(data)]) + data for field_id, data in fields)
    return struct.pack("<HIIB", 11 + len(body), 1, 0, 3) + body


class OemSampleTests(SynchronousTestCase):
    """The relay's document has the exact shape of OEM's own sample."""

    def test_reproduces_sample_byte_for_byte(self) -> None:
        """Records equal to the sample's give the sample's text exactly."""
        document = oem_document(sample_hello(), sample_records())
        self.assertIsInstance(document, bytes)
        self.assertEqual(document.decode("utf-8"), oem_sample_text())

    def test_sample_parses_equal(self) -> None:
        """The document parses to the same value as the sample."""
        self.assertEqual(strict(oem_document(sample_hello(), sample_records())), oem_sample())

    def test_top_level_keys_in_order(self) -> None:
        """Top-level keys match the sample, in order, for every capture."""
        expected = keys(ordered(oem_sample_text()))
        self.assertEqual(expected, ["SerNo", "IMEI", "ICCID", "ProdId", "FW", "Records"])
        for name in DATA_CAPTURES:
            document = oem_document(DART, parse_data_records(payload(name)))
            self.assertEqual(keys(ordered(document)), expected, name)

    def test_record_and_field_keys_in_order(self) -> None:
        """Record keys and each FType's keys follow the sample's order."""
        sample = dict(ordered(oem_sample_text()))
        sample_record = sample["Records"][0]
        record_keys = keys(sample_record)
        field_keys = {dict(f)["FType"]: keys(f) for f in dict(sample_record)["Fields"]}
        self.assertEqual(sorted(field_keys), [0, 2, 6, 7])
        seen = set()
        for name in DATA_CAPTURES:
            document = dict(ordered(oem_document(DART, parse_data_records(payload(name)))))
            for record in document["Records"]:
                self.assertEqual(keys(record), record_keys, name)
                for field in dict(record)["Fields"]:
                    ftype = dict(field)["FType"]
                    if ftype in field_keys:
                        seen.add(ftype)
                        self.assertEqual(keys(field), field_keys[ftype], name)
                    self.assertEqual(keys(field)[-1], "FType", name)
        self.assertEqual(seen, {0, 2, 6, 7})


class OemDocumentTests(SynchronousTestCase):
    """oem_document() writes valid JSON with the capture values."""

    def test_worked_example(self) -> None:
        """Record 565 of the Denmark capture gives its hand-decoded fields as OEM JSON."""
        records = parse_data_records(payload("data-0x04-2-records-2021-denmark"))
        self.assertEqual(
            record_json(records[0]),
            '{"SeqNo":565,"Reason":3,"DateUTC":"2021-02-05 05:51:55","Fields":['
            '{"GpsUTC":"2021-02-05 05:51:55","Lat":55.457414,"Long":9.9343941,"Alt":30,'
            '"Spd":2330,"SpdAcc":1,"Head":148,"PDOP":12,"PosAcc":7,"GpsStat":3,"FType":0},'
            '{"DIn":3,"DOut":0,"DevStat":3,"FType":2},'
            '{"AnalogueData":{"1":4125,"3":2112,"4":24,"5":4072,"6":7214},"FType":6}]}',
        )

    def test_worked_example_document(self) -> None:
        """The whole Denmark worked-example document (header aside) parses to its values."""
        hello = Hello(0, "?", "?")
        records = parse_data_records(payload("data-0x04-2-records-2021-denmark"))[:1]
        document = strict(oem_document(hello, records))
        example = strict(
            '{"SerNo":0,"IMEI":"?","ICCID":"?","ProdId":0,"FW":"0.0.0.0","Records":['
            '{"SeqNo":565,"Reason":3,"DateUTC":"2021-02-05 05:51:55","Fields":['
            '{"GpsUTC":"2021-02-05 05:51:55","Lat":55.457414,"Long":9.9343941,"Alt":30,"Spd":2330,'
            '"SpdAcc":1,"Head":148,"PDOP":12,"PosAcc":7,"GpsStat":3,"FType":0},'
            '{"DIn":3,"DOut":0,"DevStat":3,"FType":2},'
            '{"AnalogueData":{"1":4125,"3":2112,"4":24,"5":4072,"6":7214},"FType":6}]}]}'
        )
        self.assertEqual(document, example)

    def test_denmark_second_record(self) -> None:
        """Record 566 has its own time, position and heading."""
        records = parse_data_records(payload("data-0x04-2-records-2021-denmark"))
        record = strict(record_json(records[1]))
        self.assertEqual(record["DateUTC"], "2021-02-05 06:07:02")
        gps = record["Fields"][0]
        self.assertEqual(
            (gps["Lat"], gps["Long"], gps["Head"], gps["Spd"]), (55.5500261, 9.6395707, 165, 2499)
        )

    def test_every_capture_is_valid_json(self) -> None:
        """Each data capture gives a strict JSON body with the hand-decoded SeqNo, Reason, DateUTC."""
        count = 0
        for name in DATA_CAPTURES:
            document = strict(oem_document(DART, parse_data_records(payload(name))))
            self.assertEqual(
                [(r["SeqNo"], r["DateUTC"], r["Reason"]) for r in document["Records"]],
                [(seq, t, reason) for seq, t, reason, _ in HAND_DECODED_RECORDS[name]],
                name,
            )
            count += len(document["Records"])
        self.assertEqual(count, 2 + 12 + 20)

    def test_header_from_hello(self) -> None:
        """SerNo, IMEI, ICCID, ProdId and FW come from the hello capture."""
        hello = parse_hello(payload("hello-49-byte-dart"))
        document = strict(oem_document(hello, []))
        self.assertEqual(
            document,
            {
                "SerNo": 129336,
                "IMEI": "353323081669730",
                "ICCID": "89610185001824844630",
                "ProdId": 34,
                "FW": "34.2.1.9",
                "Records": [],
            },
        )

    def test_auckland_values(self) -> None:
        """The first Auckland record has its negative latitude and 32-bit analogues."""
        records = parse_data_records(payload("data-0x04-12-records-2017-auckland"))
        document = strict(oem_document(DART, records))
        first = document["Records"][0]
        self.assertEqual(first["DateUTC"], "2017-06-12 07:14:26")
        self.assertEqual(first["Fields"][0]["Lat"], -36.7399358)
        self.assertEqual(first["Fields"][0]["Long"], 174.7199418)
        self.assertEqual(
            first["Fields"][3],
            {"AnalogueData": {"11": 48, "12": 3, "13": 488, "14": 3785, "15": 7}, "FType": 7},
        )
        self.assertEqual(document["Records"][-1]["DateUTC"], "2017-06-12 07:19:01")

    def test_dart_debug_records(self) -> None:
        """Dart debug records become Code/Text objects; no-clock times are 2013."""
        records = parse_data_records(payload("data-0x04-20-records-dart-after-reset"))
        document = strict(oem_document(DART, records))
        by_seq = {r["SeqNo"]: r for r in document["Records"]}
        self.assertEqual(
            by_seq[13]["Fields"],
            [{"Code": 39, "Text": "RESET Dart 34.2.1.9 flags=1 WD=0", "FType": 1}],
        )
        self.assertEqual(
            by_seq[26]["Fields"], [{"Code": 11, "Text": "GSM: TCP bad SYNC chars", "FType": 1}]
        )
        self.assertEqual(by_seq[13]["DateUTC"], "2013-01-01 00:00:00")
        self.assertEqual(by_seq[15]["Fields"][0]["GpsUTC"], "2013-01-01 00:00:00")
        self.assertEqual(by_seq[15]["Fields"][0]["Lat"], 0)

    def test_fixed_records(self) -> None:
        """G50 fixed records give DM-unit analogues and every G50 value under FType 256."""
        hello = parse_hello(payload("hello-51-byte-G50"))
        document = strict(oem_document(hello, parse_fixed_records(payload("fixed64-0x10-1-record-G50"))))
        self.assertEqual(document["SerNo"], 6912)
        (record,) = document["Records"]
        self.assertEqual(
            (record["SeqNo"], record["Reason"], record["DateUTC"]), (894124, 3, "2018-03-14 11:46:24")
        )
        analogues, extras = record["Fields"]
        self.assertEqual(analogues, {"AnalogueData": {"1": 4235, "2": 1393}, "FType": 6})
        self.assertEqual((extras["Lat"], extras["Long"]), (-29.4937869, 31.2025029))
        self.assertEqual(extras["PosAccRaw"], 2449)
        self.assertEqual(extras["FType"], 256)
        self.assertIs(extras["ChecksumOk"], True)

    def test_record_without_fields(self) -> None:
        """A record with no fields has an empty Fields array."""
        self.assertEqual(
            record_json(Record(3, 0, 28)),
            '{"SeqNo":3,"Reason":28,"DateUTC":"2013-01-01 00:00:00","Fields":[]}',
        )

    def test_no_records(self) -> None:
        """An upload without records gives an empty Records array."""
        self.assertTrue(oem_document(DART, []).endswith(b'"Records":[]}'))

    def test_records_from_generator(self) -> None:
        """Records may be any iterable, consumed once."""
        records = parse_data_records(payload("data-0x04-2-records-2021-denmark"))
        self.assertEqual(oem_document(DART, iter(records)), oem_document(DART, records))

    def test_unknown_fields_in_document(self) -> None:
        """Unknown fields appear as Raw base64 under their id, short ones under FType 257."""
        record = Record(1, 0, 46, (RawField(24, b"\x0b\x01"), decode_field(2, b"\x01")))
        fields = strict(oem_document(DART, [record]))["Records"][0]["Fields"]
        self.assertEqual(
            fields, [{"Raw": "CwE=", "FType": 24}, {"Raw": "AQ==", "ShortOf": 2, "FType": 257}]
        )

    def test_odd_identity_characters(self) -> None:
        """Quotes, backslashes, control and non-ASCII characters still give valid JSON."""
        imei = 'a"b\\c\x00\x01\x1f\n\t\x7f'
        iccid = "é€😀\u2028\u2029</script>"
        document = oem_document(Hello(1, imei, iccid), [])
        parsed = strict(document)
        self.assertEqual((parsed["IMEI"], parsed["ICCID"]), (imei, iccid))
        document.decode("utf-8")

    def test_identity_from_bad_hello_bytes(self) -> None:
        """A hello with non-ASCII identity bytes still gives valid JSON."""
        data = b"\x01\x00\x00\x00" + b'3"\\\xff\x01'.ljust(16, b"\x00") + b"\x80\x1f".ljust(21, b"\x00")
        hello = parse_hello(data + bytes(8))
        parsed = strict(oem_document(hello, []))
        self.assertEqual(parsed["IMEI"], '3"\\\ufffd\x01')
        self.assertEqual(parsed["ICCID"], "\ufffd\x1f")

    def test_debug_text_any_bytes_in_document(self) -> None:
        """A debug record with arbitrary bytes keeps the whole body valid JSON."""
        text = bytes(range(255, -1, -1))
        record = Record(1, 0, 21, (DebugText(0x13, text),))
        parsed = strict(oem_document(DART, [record]))
        self.assertEqual(parsed["Records"][0]["Fields"][0]["Text"], text.decode("latin-1"))


class PayloadDocReader:
    """
    A reader written from docs/payload.rst alone (not from the encoder): it
    turns each record of a body back into the device's bytes, a 0x04 record or
    a G50 64-byte record, so a round trip shows no value was lost or changed.
    """

    TIME = "%Y-%m-%d %H:%M:%S"

    def since_2013(self, text: str) -> int:
        return since_2013(text)

    def degrees_raw(self, number: float) -> int:
        from decimal import Decimal

        return int(Decimal(repr(number)).scaleb(7))

    def field_bytes(self, field: dict) -> bytes:
        ftype = field["FType"]
        extra = b64decode(field.get("ExtraRaw", ""))
        if ftype == 0:
            data = struct.pack(
                "<IiihHBBBBB", self.since_2013(field["GpsUTC"]), self.degrees_raw(field["Lat"]),
                self.degrees_raw(field["Long"]), field["Alt"], field["Spd"], field["SpdAcc"],
                field["Head"], field["PDOP"], field["PosAcc"], field["GpsStat"],
            )
        elif ftype == 1:
            data = struct.pack("<H", field["Code"]) + field["Text"].encode("latin-1")
        elif ftype == 2:
            data = struct.pack("<IHH", field["DIn"], field["DOut"], field["DevStat"])
        elif ftype == 3:
            data = bytes([field["DType"]]) + b64decode(field["Data"])
        elif ftype in (6, 7):
            item = "<BH" if ftype == 6 else "<Bi"
            data = b"".join(
                struct.pack(item, int(number), value & 0xFFFF if ftype == 6 else value)
                for number, value in field["AnalogueData"].items()
            )
        elif ftype == 26:
            data = struct.pack("<II", field["TripDist"], field["TripDur"])
        elif ftype == 27:
            data = struct.pack("<II", field["Odo"], field["RunHrs"])
        elif ftype == 257:
            ftype, data = field["ShortOf"], b64decode(field["Raw"])
        else:
            data = b64decode(field["Raw"])
        data += extra
        return bytes([ftype, len(data)]) + data

    def data_records(self, body: bytes) -> bytes:
        """The 0x04 payload the body's records came from."""
        out = []
        for record in json.loads(body)["Records"]:
            fields = b"".join(self.field_bytes(f) for f in record["Fields"])
            out.append(struct.pack("<HIIB", 11 + len(fields), record["SeqNo"],
                                   self.since_2013(record["DateUTC"]), record["Reason"]) + fields)
        return b"".join(out)

    def fixed_records(self, body: bytes) -> bytes:
        """The 0x10 payload the body's G50 records came from (type 0x0E, checksum redone)."""
        from datetime import datetime

        out = []
        for record in json.loads(body)["Records"]:
            (g50,) = [f for f in record["Fields"] if f["FType"] == 256]
            t = datetime.strptime(record["DateUTC"], self.TIME)
            packed = (t.year - 2000) | t.month << 6 | t.day << 10 | t.hour << 15 | t.minute << 20 | t.second << 26
            chunk = struct.pack(
                "<BIIiiHBhHBBBIH5Hb3h8sH2x", 0x0E, record["SeqNo"], packed,
                self.degrees_raw(g50["Long"]), self.degrees_raw(g50["Lat"]), g50["Spd"], g50["Head"],
                g50["Alt"], g50["PosAccRaw"], g50["SpdAccRaw"], record["Reason"], g50["GpsStat"],
                g50["DIn"], g50["DOut"], *g50["Analogues"], g50["Temp"], g50["AccX"], g50["AccY"],
                g50["AccZ"], bytes.fromhex(g50["DevId"]), g50["PDOP100"],
            )
            out.append(chunk + fletcher8(chunk))
        return b"".join(out)


class PayloadRoundTripTests(SynchronousTestCase):
    """Every capture, through OEM JSON and the payload doc's reader, gives back its bytes."""

    def test_data_captures(self) -> None:
        """Each 0x04 capture's records come back byte for byte."""
        for name in DATA_CAPTURES:
            body = oem_document(DART, parse_data_records(payload(name)))
            self.assertEqual(PayloadDocReader().data_records(body), payload(name), name)

    def test_fixed_captures(self) -> None:
        """Each G50 0x10 capture comes back byte for byte from FType 256 alone."""
        for name in FIXED_CAPTURES:
            body = oem_document(DART, parse_fixed_records(payload(name)))
            self.assertEqual(PayloadDocReader().fixed_records(body), payload(name), name)

    def test_odd_fields(self) -> None:
        """Long, short, unknown and signed-analogue fields come back byte for byte."""
        gps = struct.pack("<IiihHBBBBB", 1, -2, 3, -4, 5, 6, 7, 8, 9, 10) + b"\x01\x02"
        records = record_bytes_for([
            (0, gps), (2, bytes(7)), (6, b"\x03\x00\x80\x01\xff\xff\x02"), (15, b"\x02\x2c\x01"),
            (27, bytes(9)), (24, b""),
        ])
        body = oem_document(DART, parse_data_records(records))
        self.assertEqual(PayloadDocReader().data_records(body), records)


class OemConsumer:
    """
    A consumer written against the OEM traditional format alone, the way the
    public ones read it (traccar's DmtHttpProtocolDecoder, gps-tags' typed
    structs): every key it needs present with its JSON type, times in
    ``YYYY-MM-DD HH:MM:SS``, unknown FTypes skipped.  It raises on anything else.
    """

    TIME = "%Y-%m-%d %H:%M:%S"

    def read(self, body: bytes) -> list[dict]:
        from datetime import datetime

        document = json.loads(body)
        assert isinstance(document["SerNo"], int)
        assert isinstance(document["IMEI"], str) and isinstance(document["ICCID"], str)
        assert isinstance(document["ProdId"], int)
        assert all(part.isdigit() for part in document["FW"].split(".")), document["FW"]
        assert len(document["FW"].split(".")) == 4
        positions = []
        for record in document["Records"]:
            assert isinstance(record["SeqNo"], int) and isinstance(record["Reason"], int)
            position = {"seq": record["SeqNo"], "time": datetime.strptime(record["DateUTC"], self.TIME)}
            for field in record["Fields"]:
                ftype = field["FType"]
                assert isinstance(ftype, int)
                if ftype == 0:
                    position["fix"] = datetime.strptime(field["GpsUTC"], self.TIME)
                    for key in ("Lat", "Long"):
                        assert isinstance(field[key], (int, float))
                    assert -90 <= field["Lat"] <= 90 and -180 <= field["Long"] <= 180
                    for key in ("Alt", "Spd", "SpdAcc", "Head", "PDOP", "PosAcc", "GpsStat"):
                        assert isinstance(field[key], int), key
                    position.update(lat=field["Lat"], lon=field["Long"], speed_ms=field["Spd"] / 100,
                                    course=field["Head"] * 2)
                elif ftype == 2:
                    for key in ("DIn", "DOut", "DevStat"):
                        assert isinstance(field[key], int), key
                    position["ignition"] = bool(field["DIn"] & 1)
                elif ftype in (6, 7):
                    values = field["AnalogueData"]
                    assert all(k.isdigit() and isinstance(v, int) for k, v in values.items())
                    position.setdefault("analogues", {}).update(
                        {int(k): v for k, v in values.items()}
                    )
            positions.append(position)
        return positions


class OemConsumerTests(SynchronousTestCase):
    """Bodies made from the shared captures are accepted by a consumer of the OEM format."""

    def test_sample_accepted(self) -> None:
        """The consumer accepts DM's own sample, so it is a fair judge."""
        positions = OemConsumer().read(oem_sample_text().encode())
        self.assertEqual([p["seq"] for p in positions], [125, 128])

    def test_every_capture_accepted(self) -> None:
        """Every 0x04 and 0x10 capture's body is accepted, one position per record."""
        for name in DATA_CAPTURES:
            records = parse_data_records(payload(name))
            positions = OemConsumer().read(oem_document(DART, records))
            self.assertEqual([p["seq"] for p in positions], [r.seq for r in records])
        for name in FIXED_CAPTURES:
            records = parse_fixed_records(payload(name))
            positions = OemConsumer().read(oem_document(DART, records))
            self.assertEqual([p["seq"] for p in positions], [r.seq for r in records])

    def test_consumer_reads_the_right_values(self) -> None:
        """The consumer gets the Denmark capture's first fix: position, speed and course."""
        records = parse_data_records(payload("data-0x04-2-records-2021-denmark"))
        first = OemConsumer().read(oem_document(DART, records))[0]
        self.assertEqual((first["lat"], first["lon"]), (55.457414, 9.9343941))
        self.assertEqual(first["speed_ms"], 23.3)
        self.assertEqual(first["course"], 296)
        self.assertEqual(first["analogues"][1], 4125)
        self.assertTrue(first["ignition"])


class DeviceTimeZoneTests(SynchronousTestCase):
    """Device times are written in UTC whatever the host's time zone."""

    def setUp(self) -> None:
        use_time_zone(self)

    def test_device_time_in_utc(self) -> None:
        """Under Auckland time, hand-decoded capture times still format as UTC."""
        for moment in ("2021-02-05 05:51:55", "2017-06-12 07:14:26", "2013-01-01 00:00:00"):
            self.assertEqual(device_time(since_2013(moment)), moment)

    def test_record_dates_in_utc(self) -> None:
        """Under Auckland time a record's DateUTC and GpsUTC are its UTC times."""
        (first, _) = parse_data_records(payload("data-0x04-2-records-2021-denmark"))
        record = strict(record_json(first))
        self.assertEqual(
            (record["DateUTC"], record["Fields"][0]["GpsUTC"]),
            ("2021-02-05 05:51:55", "2021-02-05 05:51:55"),
        )
