"""The typed control plane (:mod:`stream.control`): every kind round-trips through the
bytes on the topic, and the JSON layout other readers see is fixed."""

from __future__ import annotations

import json

import pytest

from logs.events import InvalidEvent
from stream.control import (
    CalibratorUpdate,
    ControlRecord,
    DriftAlarm,
    IndexRejected,
    IndexVersion,
    ModelAnnouncement,
    OtherControl,
    Recalibration,
    decode_control,
    encode_control,
)

RECORDS: list[ControlRecord] = [
    CalibratorUpdate(3, {"kind": "platt", "a": 1.2, "b": -0.1}, event_ts=5.0, reason="alarm"),
    CalibratorUpdate(4, {"kind": "shift", "b": 0.3}),
    ModelAnnouncement(
        2, path="/m/v2", digest="ab" * 32, model_version=7, index_version=1, created_at=1.5
    ),  # fmt: skip
    IndexVersion(
        4,
        items=10,
        index_kind="flat",
        recall_check=1.0,
        retrieval_model="two_tower",
        pool_users=3,
        build_s=0.01,
    ),  # fmt: skip
    IndexRejected(5, ["norms"]),
    DriftAlarm(9.0, 100, 4.5, accepted=None, proposed=True),
    DriftAlarm(9.0, 100, 4.5, accepted=False, holdout_logloss_old=0.2, holdout_logloss_new=0.3),
    Recalibration(9.0, 100, "accepted", "guarded", gain_nats=0.01, se_nats=0.002),
    Recalibration(9.0, 100, "rejected", "alarm"),
]


@pytest.mark.parametrize("record", RECORDS, ids=lambda r: type(r).__name__)
def test_every_record_round_trips_through_the_topic_bytes(record: ControlRecord) -> None:
    raw = encode_control(record)
    assert json.loads(raw)["kind"] == record.kind
    assert decode_control(raw) == record


def test_the_json_layout_keeps_its_keys_in_order_and_leaves_out_absent_options() -> None:
    guarded = json.loads(encode_control(RECORDS[5]))
    assert list(guarded) == ["kind", "event_ts", "examples_seen", "z", "accepted", "proposed"]
    judged = json.loads(encode_control(RECORDS[6]))
    assert list(judged) == ["kind", "event_ts", "examples_seen", "z", "accepted",
                            "holdout_logloss_old", "holdout_logloss_new"]  # fmt: skip
    assert list(json.loads(encode_control(RECORDS[1]))) == ["kind", "version", "params"]
    assert list(json.loads(encode_control(RECORDS[8]))) == [
        "kind", "event_ts", "examples_seen", "decision", "reason",
    ]  # fmt: skip


def test_an_unknown_kind_is_kept_whole_and_a_malformed_known_one_is_rejected() -> None:
    other = decode_control(b'{"kind": "experiment", "version": 2, "note": "x"}')
    assert isinstance(other, OtherControl) and other.fields["note"] == "x"
    assert json.loads(encode_control(other)) == {"kind": "experiment", "version": 2, "note": "x"}
    with pytest.raises(InvalidEvent, match="missing_field"):
        decode_control(b'{"kind": "model"}')
    with pytest.raises(InvalidEvent, match="non_finite"):
        decode_control(b'{"kind": "calibrator", "version": 1, "params": {"a": NaN, "b": 0}}')
