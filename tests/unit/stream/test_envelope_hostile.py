"""#19 red team: envelopes that lie about their event count, and events at the limits."""

from __future__ import annotations

import struct

import msgspec
import pytest

from logs.events import InvalidEvent
from stream.envelope import decode_envelope, encode_envelope, encode_envelope_raw

TOPIC = "impressions"
HEADER = encode_envelope_raw(TOPIC, [])[:5]
KIND = b"\xa1k" + msgspec.msgpack.encode(TOPIC)


@pytest.mark.parametrize(
    "body",
    [
        b"\x82" + KIND + b"\xa1e\xdd" + struct.pack(">I", 0xFFFFFFFF),  # 4e9 events, none sent
        b"\x82" + KIND + b"\xa1e\x91\xc6" + struct.pack(">I", 0xFFFFFFF0),  # 4 GB event, 0 sent
    ],
)
def test_a_lying_count_or_length_is_a_bad_envelope(body: bytes) -> None:
    with pytest.raises(InvalidEvent) as exc:
        decode_envelope(HEADER + body, TOPIC)
    assert exc.value.reason == "bad_envelope"


@pytest.mark.parametrize(
    ("ts", "reason"),
    [(float("nan"), "non_finite"), (-1.0, "bad_timestamp"), (0, "bad_timestamp"),
     (4102444800.0, "bad_timestamp"), (True, "bad_type")],
)  # fmt: skip
def test_an_event_at_the_time_limits_is_rejected_alone(ts: object, reason: str) -> None:
    good = {"impression_id": "a", "user_id": "u", "item_id": "x", "ts": 1.7e9}
    decoded = decode_envelope(encode_envelope(TOPIC, [{**good, "ts": ts}, good]), TOPIC)
    bad, ok = decoded[0][0], decoded[1][0]
    assert isinstance(bad, InvalidEvent) and bad.reason == reason
    assert not isinstance(ok, InvalidEvent) and ok.ts == 1.7e9
