"""
An :class:`~oemrelay.relay.Upload` as the spool keeps it, and back.

The spool stores only what the device sent: the hello payload and the data
frames exactly as received (concatenated in wire form), plus when the upload
arrived.  Records are decoded again with :mod:`oemrelay.codec` when the
upload leaves the spool, so a raw TCP end server gets the device's own bytes
and an HTTP one the same JSON it would have had at once.
"""

from __future__ import annotations

from ..codec import MAX_PAYLOAD, Frame, FrameDecoder, ProtocolError, parse_hello, parse_records
from ..relay import Upload


def frames_blob(frames: tuple[Frame, ...]) -> bytes:
    """The upload's frames as they travelled on the wire, one after the other."""
    return b"".join(frame.to_bytes() for frame in frames)


def rebuild_upload(hello_payload: bytes, frames: bytes, received_at: float) -> Upload:
    """
    The upload stored as ``hello_payload`` and ``frames`` (:func:`frames_blob`).

    :raises ProtocolError: if the stored bytes no longer decode (a corrupt row).
    """
    decoder = FrameDecoder(MAX_PAYLOAD)
    decoded = tuple(decoder.feed(frames))
    if decoder.buffered:
        raise ProtocolError(f"stored upload ends in {decoder.buffered} bytes of a partial frame")
    records = tuple(parse_records(decoded))
    return Upload(parse_hello(hello_payload), decoded, records, received_at)
