"""
relay.Upload: frames kept as received, records decoded from them only when
asked (and then once), counts from the walk, immutable to its users.
"""

from __future__ import annotations

import dataclasses

from twisted.trial.unittest import SynchronousTestCase

from oemrelay.codec import FrameDecoder, ProtocolError, parse_hello, parse_records
from oemrelay.relay import Upload
from tests.vectors import capture

HELLO = parse_hello(capture("hello-49-byte-dart")[5:])
FRAMES = tuple(
    FrameDecoder().feed(
        capture("data-0x04-12-records-2017-auckland")
        + capture("fixed64-0x10-2-records-G50")
        + capture("data-0x04-2-records-2021-denmark")
    )
)


class UploadTests(SynchronousTestCase):
    def test_records_decoded_from_frames_once(self) -> None:
        """Without records given, ``records`` is every frame's, decoded on first use and kept."""
        upload = Upload(HELLO, FRAMES, None, 1.0, record_count=16, first_seq=518)
        self.assertIsNone(upload._records)
        records = upload.records
        self.assertEqual(list(records), parse_records(FRAMES))
        self.assertIs(upload.records, records)

    def test_counts_as_given(self) -> None:
        """The session's counts are used as they are, nothing decoded."""
        upload = Upload(HELLO, FRAMES, None, 1.0, record_count=16, first_seq=518)
        self.assertEqual((upload.record_count, upload.first_seq), (16, 518))
        self.assertIsNone(upload._records)

    def test_counts_walked_when_not_given(self) -> None:
        """Neither records nor counts: the frames are walked, not decoded."""
        upload = Upload(HELLO, FRAMES, None, 1.0)
        self.assertEqual((upload.record_count, upload.first_seq), (16, 518))
        self.assertIsNone(upload._records)

    def test_first_seq_skips_empty_frames(self) -> None:
        """An empty first frame: the first record's seq comes from the next one."""
        (empty,) = FrameDecoder().feed(b"\x02\x55\x04\x00\x00")
        upload = Upload(HELLO, (empty, *FRAMES), None, 1.0)
        self.assertEqual(upload.first_seq, 518)

    def test_walk_refuses_bad_frames(self) -> None:
        """Frames that do not decode are refused when the counts are walked."""
        (bad,) = FrameDecoder().feed(b"\x02\x55\x04\x01\x00\x00")
        with self.assertRaises(ProtocolError):
            Upload(HELLO, (bad,), None, 1.0)

    def test_counts_from_given_records(self) -> None:
        """Records given: count and first seq are theirs."""
        records = tuple(parse_records(FRAMES[2:]))
        upload = Upload(HELLO, (), records, 1.0)
        self.assertEqual((upload.record_count, upload.first_seq), (2, 565))
        self.assertIs(upload.records, records)
        self.assertIsNone(Upload(HELLO, (), (), 1.0).first_seq)

    def test_immutable(self) -> None:
        """No attribute can be set or deleted, the decoded records included."""
        upload = Upload(HELLO, FRAMES, None, 1.0)
        for name in ("hello", "frames", "records", "record_count", "first_seq", "_records"):
            with self.assertRaises(dataclasses.FrozenInstanceError):
                setattr(upload, name, None)
        with self.assertRaises(dataclasses.FrozenInstanceError):
            del upload.frames

    def test_equal_and_hashable(self) -> None:
        """Equal when the same device sent the same frames at the same time, however built."""
        lazy = Upload(HELLO, FRAMES, None, 1.0)
        decoded = Upload(HELLO, FRAMES, tuple(parse_records(FRAMES)), 1.0)
        self.assertEqual(lazy, decoded)
        self.assertEqual(hash(lazy), hash(decoded))
        self.assertNotEqual(lazy, Upload(HELLO, FRAMES, None, 2.0))
        self.assertNotEqual(lazy, Upload(HELLO, FRAMES[:1], None, 1.0))

    def test_repr_decodes_nothing(self) -> None:
        """The repr names the counts and leaves the records undecoded."""
        upload = Upload(HELLO, FRAMES, None, 1.0)
        self.assertIn("record_count=16", repr(upload))
        self.assertIsNone(upload._records)
