"""The binary encodings of the internal topics ``labeled`` and ``scored``: bit-exact round
trips, the same objects as the JSON form they replace, hostile bytes rejected with the JSON
form's reasons, and the JSON form of older writers still read."""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from logs.batches import (
    BATCH_VERSION,
    LABELED_MAGIC,
    MARKS_HEADER,
    SCORED_MAGIC,
    ScoredBatch,
    decode_labeled,
    decode_marks,
    encode_labeled,
    encode_marks,
)
from logs.events import (
    MAX_FEATURE_NAME_LEN,
    MAX_FEATURE_VALUE_LEN,
    MAX_ID_LEN,
    MAX_STORED_FEATURES,
    MAX_TS,
    MIN_TS,
    REASONS,
    RESERVED_FEATURE_NAMES,
    Impression,
    InvalidEvent,
    LabeledExample,
    normalize_id,
)
from stream.envelope import encode_envelope

TS = 1_700_000_000.5
NAN, INF = math.nan, math.inf
#: the documented order of an example's fields on ``labeled`` (README, logs/events.py)
LABELED_FIELDS = ("impression_id", "ts", "user_id", "item_id", "position", "features",
                  "served_score", "model_version", "true_p", "label", "label_ts", "weight",
                  "kind")  # fmt: skip
SCORED_FIELDS = tuple(f.name for f in dataclasses.fields(ScoredBatch))


def canon(x: object) -> object:
    """``x`` with every float as its exact hex and every value tagged with its type: equal
    only if bit-identical (``-0.0 != 0.0``, ``nan == nan``) and of the same types."""
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return canon([getattr(x, f.name) for f in dataclasses.fields(x)])
    if isinstance(x, float):
        return ("float", x.hex())
    if isinstance(x, dict):
        return ("dict", [(canon(k), canon(v)) for k, v in x.items()])
    if isinstance(x, list | tuple):
        return ("seq", [canon(v) for v in x])
    return (type(x).__name__, x)


def example(**changes: Any) -> LabeledExample:
    imp = Impression("imp-7", TS, "u7", "i7", position=3,
                     features={"dev": "ios", "price": 12.25, "hist_n": 0.0, "neg": -0.0},
                     served_score=0.031, model_version=12, true_p=0.042)  # fmt: skip
    e = LabeledExample(imp, 1, TS + 30, 1.0, "positive")
    row = dict(zip(LABELED_FIELDS, wire_row(e), strict=True))
    row.update(changes)
    return from_row(list(row.values()))


def wire_row(e: LabeledExample) -> list[object]:
    i = e.impression
    return [i.impression_id, i.ts, i.user_id, i.item_id, i.position, i.features,
            i.served_score, i.model_version, i.true_p, e.label, e.label_ts, e.weight,
            e.kind]  # fmt: skip


def from_row(row: list[Any]) -> LabeledExample:
    return LabeledExample(Impression(*row[:9]), *row[9:])


def labeled_record(rows: object, version: int = BATCH_VERSION) -> bytes:
    """A ``labeled`` record written by hand, as another implementation would."""
    return LABELED_MAGIC + bytes([version]) + msgspec.msgpack.encode(rows)


def json_record(examples: list[LabeledExample]) -> bytes:
    """The JSON form older joiners wrote (``encode_labeled_batch`` before the binary form)."""
    return json.dumps(
        {"examples": [e.to_dict() for e in examples]}, separators=(",", ":"), allow_nan=False
    ).encode()


def reason(fn: Any, raw: bytes | None) -> str:
    with pytest.raises(InvalidEvent) as info:
        fn(raw)
    assert info.value.reason in REASONS
    return info.value.reason


# --- labeled: round trips --------------------------------------------------------------------

finite = st.floats(allow_nan=False, allow_infinity=False)
ts = st.floats(min_value=MIN_TS, max_value=MAX_TS, exclude_max=True)
# ids as the joiner writes them: already in Unicode NFC (logs.events.normalize_id)
ids = st.text(min_size=1, max_size=12).map(normalize_id)
features = st.dictionaries(
    st.text(max_size=10).filter(lambda k: k not in RESERVED_FEATURE_NAMES),
    st.text(max_size=16) | finite,
    max_size=8,
)
examples = st.builds(
    LabeledExample,
    st.builds(Impression, ids, ts, ids, ids, st.none() | st.integers(1, 10_000), features,
              st.none() | finite, st.none() | st.integers(-(2**63), 2**64 - 1),
              st.none() | st.floats(0.0, 1.0)),
    st.sampled_from([0, 1]), ts, finite,
    st.sampled_from(["positive", "negative", "correction", "fake_negative"]),
)  # fmt: skip


@settings(max_examples=200, deadline=None)
@given(batch=st.lists(examples, max_size=6))
def test_labeled_round_trip_is_bit_exact_and_reads_like_the_json_form(
    batch: list[LabeledExample],
) -> None:
    back = decode_labeled(encode_labeled(batch))
    assert back == batch
    assert canon(back) == canon(batch)  # floats bit for bit, str stays str, order kept
    # the trainer gets exactly the objects the JSON form gave it: behaviour is unchanged
    assert canon(back) == canon(decode_labeled(json_record(batch)))


def test_labeled_round_trip_keeps_str_and_float_features_none_fields_and_extremes() -> None:
    tiny = 5e-324  # the smallest subnormal
    imp = Impression("a", MIN_TS, "u", "i", None,
                     {"s": "1.5", "f": 1.5, "z": -0.0, "big": sys.float_info.max, "t": tiny,
                      "e": "", "u": "é\x1f✓"},
                     None, None, None)  # fmt: skip
    batch = [LabeledExample(imp, 0, math.nextafter(MAX_TS, 0.0), -tiny, "negative"),
             example(weight=0.1 + 0.2, ts=TS + 1e-6)]  # fmt: skip
    back = decode_labeled(encode_labeled(batch))
    assert canon(back) == canon(batch)
    assert back[0].impression.features["s"] == "1.5" and back[0].impression.position is None
    assert math.copysign(1.0, back[0].impression.features["z"]) == -1.0  # type: ignore[arg-type]
    assert decode_labeled(encode_labeled([])) == []


def test_the_labeled_layout_is_the_documented_one() -> None:
    e = example()
    assert encode_labeled([e]) == labeled_record([wire_row(e)])
    assert encode_labeled([e])[:5] == b"\xffSRL\x01"


def test_decoded_user_and_item_ids_are_interned_like_parsed_ones() -> None:
    uid, iid = "".join(["user-", "4711"]), "".join(["item-", "99"])  # built, not literals
    (back,) = decode_labeled(encode_labeled([example(user_id=uid, item_id=iid)]))
    assert back.impression.user_id is sys.intern(uid)
    assert back.impression.item_id is sys.intern(iid)


# --- labeled: hostile bytes ------------------------------------------------------------------

# (field, value, reason of the binary form, reason of the JSON form or None where JSON
# accepted it: the binary form is stricter, since only our joiner writes it)
BAD_FIELDS = [
    ("impression_id", "", "bad_value", "bad_value"),
    ("impression_id", None, "missing_field", "missing_field"),
    ("impression_id", "x" * (MAX_ID_LEN + 1), "bad_value", "bad_value"),
    ("impression_id", 7, "bad_type", None),
    ("user_id", ["u"], "bad_type", "bad_type"),
    ("ts", "soon", "bad_type", "bad_type"),
    ("ts", NAN, "non_finite", "non_finite"),
    ("ts", INF, "non_finite", "non_finite"),
    ("ts", 10.0, "bad_timestamp", "bad_timestamp"),
    ("position", 0, "bad_value", "bad_value"),
    ("position", "3", "bad_type", "bad_type"),
    ("position", 2.0, "bad_type", "bad_type"),
    ("features", [1.0], "bad_type", "bad_type"),
    ("features", {"f": NAN}, "non_finite", "non_finite"),
    ("features", {"f": -INF}, "non_finite", "non_finite"),
    ("features", {"f": [1]}, "bad_type", "bad_type"),
    ("features", {"f": True}, "bad_type", "bad_type"),
    ("features", {"f": None}, "bad_type", None),
    ("features", {"f": "v" * (MAX_FEATURE_VALUE_LEN + 1)}, "too_large", "too_large"),
    ("features", {"k" * (MAX_FEATURE_NAME_LEN + 1): 1.0}, "too_large", "too_large"),
    ("features", {f"f{k}": 1.0 for k in range(MAX_STORED_FEATURES + 1)}, "too_large", "too_large"),
    ("features", {"ok": 1.0, "true_p": 0.5}, "bad_value", "bad_value"),
    ("served_score", NAN, "non_finite", "non_finite"),
    ("model_version", "12", "bad_type", None),
    ("true_p", 1.5, "bad_value", "bad_value"),
    ("true_p", NAN, "non_finite", "non_finite"),
    ("label", 2, "bad_value", "bad_value"),
    ("label", "1", "bad_value", "bad_value"),
    ("label", None, "bad_value", "bad_value"),
    ("label", True, "bad_type", None),
    ("label_ts", NAN, "non_finite", "non_finite"),
    ("label_ts", 5e9, "bad_timestamp", "bad_timestamp"),
    ("weight", INF, "non_finite", "non_finite"),
    ("weight", "1", "bad_type", "bad_type"),
    ("weight", None, "bad_type", None),
    ("kind", 3, "bad_type", None),
]


@pytest.mark.parametrize(("field", "value", "want", "want_json"), BAD_FIELDS,
                         ids=[f"{f}={str(v)[:12]}" for f, v, _, _ in BAD_FIELDS])  # fmt: skip
def test_a_bad_field_rejects_the_record_with_the_json_forms_reason(
    field: str, value: object, want: str, want_json: str | None
) -> None:
    good, bad = wire_row(example()), wire_row(example(impression_id="b"))
    bad[LABELED_FIELDS.index(field)] = value
    assert reason(decode_labeled, labeled_record([good, bad])) == want
    d = dict(zip(LABELED_FIELDS, bad, strict=True))
    raw_json = json.dumps({"examples": [d]}).encode()  # NaN/Infinity as Python writes them
    if want_json is None:
        decode_labeled(raw_json)  # the JSON form accepted it
    else:
        assert reason(decode_labeled, raw_json) == want_json


@pytest.mark.parametrize(
    ("raw", "want"),
    [
        (None, "bad_json"),  # a tombstone
        (b"", "bad_json"),
        (b"not a batch", "bad_json"),  # no magic: read as the old JSON form
        (LABELED_MAGIC, "bad_envelope"),  # no version
        (labeled_record([], version=2), "unsupported_version"),
        (labeled_record([], version=0), "unsupported_version"),
        (SCORED_MAGIC + b"\x01\x90", "bad_envelope"),  # a scored record on labeled
        (encode_envelope("clicks", [{"impression_id": "a", "ts": TS}]), "bad_envelope"),
        (b"\xff\xfe{}", "bad_envelope"),
        (LABELED_MAGIC + b"\x01", "bad_envelope"),  # no body
        (LABELED_MAGIC + b"\x01\xc1", "bad_envelope"),  # a byte MessagePack never uses
        (LABELED_MAGIC + b"\x01\x90\x90", "bad_envelope"),  # trailing bytes
        (labeled_record({"examples": []}), "bad_type"),
        (labeled_record([1]), "bad_type"),
        (labeled_record([["a", TS, "u"]]), "missing_field"),
        (labeled_record([[{"a": 1}] * 13]), "bad_type"),
        (labeled_record([[[]] * 13]), "bad_type"),
        (LABELED_MAGIC + b"\x01\x91\x9d" + b"\x91" * 100_000, "bad_type"),  # deep nesting
        (LABELED_MAGIC + b"\x01\xdd\xff\xff\xff\xff", "bad_envelope"),  # 4G examples, no data
    ],
)
def test_undecodable_labeled_records_are_rejected_whole(raw: bytes | None, want: str) -> None:
    assert reason(decode_labeled, raw) == want


def test_every_truncation_of_a_labeled_record_is_bad_envelope() -> None:
    raw = encode_labeled([example(), example(impression_id="b", features={"x": "y" * 40})])
    assert reason(decode_labeled, raw[:0]) == "bad_json"
    for cut in range(1, len(raw)):
        assert reason(decode_labeled, raw[:cut]) == "bad_envelope", cut


@settings(max_examples=400, deadline=None)
@given(tail=st.binary(max_size=200), prefix=st.sampled_from([b"", LABELED_MAGIC, b"\xff"]))
def test_random_bytes_on_labeled_raise_only_invalid_event(tail: bytes, prefix: bytes) -> None:
    for raw in (prefix + tail, LABELED_MAGIC + bytes([BATCH_VERSION]) + tail):
        try:
            decode_labeled(raw)
        except InvalidEvent as exc:
            assert exc.reason in REASONS


@settings(max_examples=400, deadline=None)
@given(data=st.data())
def test_a_corrupted_labeled_record_decodes_or_raises_invalid_event(data: st.DataObject) -> None:
    raw = bytearray(encode_labeled([example(), example(impression_id="b", position=None)]))
    for _ in range(data.draw(st.integers(1, 4))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    try:
        for e in decode_labeled(bytes(raw)):  # what decodes is valid by the JSON form's rules
            assert canon(LabeledExample.from_dict(e.to_dict())) == canon(e)
    except InvalidEvent as exc:
        assert exc.reason in REASONS


# --- labeled: the JSON form of older joiners -------------------------------------------------


def test_the_json_form_of_older_joiners_is_still_read() -> None:
    batch = [example(), example(impression_id="b", position=None, served_score=None)]
    assert canon(decode_labeled(json_record(batch))) == canon(batch)


@pytest.mark.parametrize(
    ("record", "want"),
    [
        (b'{"examples": 1}', "missing_field"),
        (b"{}", "missing_field"),
        (b'{"examples": [1]}', "not_an_object"),
        (b"[]", "not_an_object"),
    ],
)
def test_a_malformed_json_labeled_batch_is_rejected_as_before(record: bytes, want: str) -> None:
    assert reason(decode_labeled, record) == want


# --- scored ----------------------------------------------------------------------------------


def scored_batch() -> ScoredBatch:
    return ScoredBatch(
        model_version=3,
        calibrator_version=1,
        impression_ids=["a", "b", "c"],
        ts=[TS, TS + 1, TS + 1e-6],
        label=[0, 1, 0],
        p_raw=[0.01, 0.2, 5e-324],
        p=[0.015, 0.25, 0.1 + 0.2],
        segment=["1", "10+", ""],
        true_p=[None, 0.3, -0.0],
    )


def scored_record(fields: object, version: int = BATCH_VERSION) -> bytes:
    return SCORED_MAGIC + bytes([version]) + msgspec.msgpack.encode(fields)


def scored_fields(batch: ScoredBatch, **changes: object) -> list[object]:
    """The documented layout: the nine fields, then the marks only when there are any
    (the second label's three, then with the marks however empty, only when set)."""
    d = {**dataclasses.asdict(batch), **changes}
    second = ("p2", "label2_ids", "label2")
    if any(d[k] for k in second):
        return [d[k] for k in SCORED_FIELDS]
    return [d[k] for k in SCORED_FIELDS if k not in second and (k != "marks" or d[k])]


@pytest.mark.parametrize(
    "batch",
    [scored_batch(), ScoredBatch(0, 0, [], [], [], [], [], [], []),
     dataclasses.replace(scored_batch(), p=[NAN, INF, -INF]),
     dataclasses.replace(scored_batch(), p2=[0.01, NAN, 0.5], label2_ids=["x"], label2=[1])],
    ids=["values", "empty", "non-finite-scores", "second-label"],
)  # fmt: skip
def test_scored_round_trip_is_bit_exact(batch: ScoredBatch) -> None:
    raw = batch.encode()
    assert raw == scored_record(scored_fields(batch))  # the documented layout
    assert canon(ScoredBatch.decode(raw)) == canon(batch)


def test_scored_marks_round_trip_and_older_records_decode_without_them() -> None:
    batch = dataclasses.replace(scored_batch(), marks={0: TS + 5.0, 7: TS - 0.25})
    raw = batch.encode()
    assert raw == scored_record(scored_fields(batch))
    assert len(msgspec.msgpack.decode(raw[5:])) == 10
    assert ScoredBatch.decode(raw).marks == {0: TS + 5.0, 7: TS - 0.25}
    # a record of a trainer from before marks: nine fields, no marks
    old = scored_record(scored_fields(scored_batch())[:9])
    assert ScoredBatch.decode(old).marks == {}
    # an empty batch carrying only marks is valid
    only = ScoredBatch(0, 0, [], [], [], [], [], [], [], {2: TS})
    assert ScoredBatch.decode(only.encode()) == only

    # a reader from before marks (nine fields) ignores the trailing element
    class OldWire(msgspec.Struct, array_like=True):
        model_version: int
        calibrator_version: int
        impression_ids: list[str]
        ts: list[float]
        label: list[int]
        p_raw: list[float]
        p: list[float]
        segment: list[str]
        true_p: list[float | None]

    assert msgspec.msgpack.decode(raw[5:], type=OldWire).impression_ids == ["a", "b", "c"]


@pytest.mark.parametrize("marks", [{0: NAN}, {0: -1.0}, {-1: TS}, {0: "x"}])
def test_bad_scored_marks_are_refused_with_a_reason(marks: dict) -> None:
    raw = scored_record([*scored_fields(scored_batch())[:9], marks])
    with pytest.raises(InvalidEvent, match=r"\$\[9\]") as exc:
        ScoredBatch.decode(raw)
    assert exc.value.reason == "bad_type"


@pytest.mark.parametrize(
    "raw",
    [b"[1]", b'{"x": 1700000000}', b'{"1": NaN}', b'{"1": 1e300}', b'{"-1": 1.7e9}', b"zz",
     b'{"1": "1700000000"}', b'{"1234567890": 1.7e9}'],
)  # fmt: skip
def test_a_bad_marks_header_is_refused_with_a_reason(raw: bytes) -> None:
    with pytest.raises(InvalidEvent, match=MARKS_HEADER) as exc:
        decode_marks({MARKS_HEADER: raw})
    assert exc.value.reason == "bad_value"


def test_marks_header_round_trip() -> None:
    marks = {0: TS, 5: TS + 0.125}
    assert decode_marks({MARKS_HEADER: encode_marks(marks), "other": b"x"}) == marks
    assert decode_marks({}) == {} and decode_marks(None) == {}


def test_the_json_form_of_older_trainers_is_still_read() -> None:
    batch = scored_batch()
    assert canon(ScoredBatch.decode(json.dumps(dataclasses.asdict(batch)).encode())) == canon(batch)


def test_a_json_scored_batch_with_a_missing_or_short_array_is_rejected_as_before() -> None:
    d = dataclasses.asdict(scored_batch())
    short = {**d, "p": [0.1]}
    missing = {k: v for k, v in d.items() if k != "segment"}
    for obj, want in ((short, "bad_value"), (missing, "missing_field")):
        assert reason(ScoredBatch.decode, json.dumps(obj).encode()) == want


@pytest.mark.parametrize(
    ("raw", "want"),
    [
        (None, "bad_json"),
        (b"garbage", "bad_json"),
        (SCORED_MAGIC, "bad_envelope"),
        (scored_record(scored_fields(scored_batch()), version=2), "unsupported_version"),
        (encode_labeled([example()]), "bad_envelope"),  # a labeled record on scored
        (SCORED_MAGIC + b"\x01\xc1", "bad_envelope"),
        (scored_record({"model_version": 1}), "bad_type"),
        (scored_record(scored_fields(scored_batch())[:-1]), "missing_field"),
        (scored_record(scored_fields(scored_batch(), label=[0, 2, 1])), "bad_value"),
        (scored_record(scored_fields(scored_batch(), label=[0, True, 1])), "bad_type"),
        (scored_record(scored_fields(scored_batch(), ts=[TS, NAN, TS])), "non_finite"),
        (scored_record(scored_fields(scored_batch(), ts=[TS, "x", TS])), "bad_type"),
        (scored_record(scored_fields(scored_batch(), impression_ids=[1, 2, 3])), "bad_type"),
        (scored_record(scored_fields(scored_batch(), p=[0.1])), "bad_value"),
        (scored_record(scored_fields(scored_batch(), model_version="3")), "bad_type"),
        (scored_record(scored_fields(scored_batch(), true_p=[None, "x", 1.0])), "bad_type"),
    ],
)
def test_a_bad_scored_record_is_rejected_with_its_reason(raw: bytes | None, want: str) -> None:
    assert reason(ScoredBatch.decode, raw) == want


def test_every_truncation_of_a_scored_record_is_bad_envelope() -> None:
    raw = scored_batch().encode()
    for cut in range(1, len(raw)):
        assert reason(ScoredBatch.decode, raw[:cut]) == "bad_envelope", cut


@settings(max_examples=400, deadline=None)
@given(tail=st.binary(max_size=200), prefix=st.sampled_from([b"", SCORED_MAGIC + b"\x01"]))
def test_random_bytes_on_scored_raise_only_invalid_event(tail: bytes, prefix: bytes) -> None:
    try:
        ScoredBatch.decode(prefix + tail)
    except InvalidEvent as exc:
        assert exc.reason in REASONS
