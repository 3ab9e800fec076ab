"""Validation of raw records into events, and dead letters (the labeled and scored
encodings: test_batch_encoding.py)."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from logs.events import (
    MAX_EVENT_BYTES,
    MAX_FEATURE_NAME_LEN,
    MAX_FEATURE_VALUE_LEN,
    MAX_FEATURES,
    MAX_ID_LEN,
    MAX_TS,
    MIN_TS,
    REASONS,
    RESERVED_FEATURE_NAMES,
    TOPIC_CLICKS,
    TOPIC_IMPRESSIONS,
    Click,
    DeadLetter,
    Impression,
    InvalidEvent,
    Watermark,
    example_row,
    parse_click,
    parse_impression,
    parse_input,
)

TS = 1_700_000_000.5


def imp_obj(**changes: Any) -> dict[str, Any]:
    d: dict[str, Any] = {
        "impression_id": "imp-1",
        "ts": TS,
        "user_id": "u1",
        "item_id": "i1",
        "position": 2,
        "features": {"dev": "ios", "price": 9.5},
    }
    d.update(changes)
    return d


def raw(obj: object) -> bytes:
    return json.dumps(obj).encode()


def reason_of(record: bytes | str, topic: str = TOPIC_IMPRESSIONS) -> str:
    with pytest.raises(InvalidEvent) as info:
        parse_input(record, topic)
    assert info.value.reason in REASONS
    return info.value.reason


# --- malformed records ------------------------------------------------------------------


@pytest.mark.parametrize(
    "record",
    [b"", b"{", b"not json", b'{"a": 1,}', b"\xff\xfe\xfa", b"[" * 60_000],
    ids=["empty", "truncated", "text", "trailing-comma", "bad-utf8", "deeply-nested"],
)
def test_undecodable_bytes_are_bad_json(record: bytes) -> None:
    assert reason_of(record) == "bad_json"


@pytest.mark.parametrize("record", [b"[]", b"1", b'"s"', b"null", b"true"])
def test_json_that_is_not_an_object_is_not_an_object(record: bytes) -> None:
    assert reason_of(record) == "not_an_object"
    assert reason_of(record, TOPIC_CLICKS) == "not_an_object"


def test_record_over_the_size_limit_is_too_large() -> None:
    record = raw(imp_obj(features={"blob": "x" * MAX_EVENT_BYTES}))
    assert reason_of(record) == "too_large"


@pytest.mark.parametrize("name", ["impression_id", "ts", "user_id", "item_id"])
def test_impression_without_a_required_field_is_missing_field(name: str) -> None:
    d = imp_obj()
    del d[name]
    assert reason_of(raw(d)) == "missing_field"
    assert reason_of(raw({**d, name: None})) == "missing_field"


@pytest.mark.parametrize("name", ["impression_id", "ts"])
def test_click_without_a_required_field_is_missing_field(name: str) -> None:
    d = {"impression_id": "a", "ts": TS}
    del d[name]
    assert reason_of(raw(d), TOPIC_CLICKS) == "missing_field"


@pytest.mark.parametrize(
    "changes",
    [
        {"ts": "soon"},
        {"ts": [TS]},
        {"ts": True},
        {"impression_id": True},
        {"user_id": 1.5},
        {"item_id": {"x": 1}},
        {"position": "2"},
        {"position": 2.0},
        {"position": True},
        {"features": ["a"]},
        {"features": {"f": [1]}},
        {"features": {"f": True}},
        {"true_p": "0.1"},
        {"served_score": False},
    ],
    ids=repr,
)
def test_wrong_types_and_bools_as_numbers_are_bad_type(changes: dict[str, Any]) -> None:
    assert reason_of(raw(imp_obj(**changes))) == "bad_type"


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e400"])
def test_non_finite_timestamps_are_non_finite(literal: str) -> None:
    record = f'{{"impression_id": "a", "ts": {literal}}}'.encode()
    assert reason_of(record, TOPIC_CLICKS) == "non_finite"


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "1" + "0" * 400])
def test_non_finite_feature_values_are_non_finite(literal: str) -> None:
    record = raw(imp_obj(features={})).replace(b"{}", f'{{"x": {literal}}}'.encode())
    assert reason_of(record) == "non_finite"


def test_an_integer_timestamp_too_large_for_a_float_is_non_finite() -> None:
    assert reason_of(b'{"impression_id": "a", "ts": 1' + b"0" * 400 + b"}", TOPIC_CLICKS) == (
        "non_finite"
    )


@pytest.mark.parametrize(
    "ts", [-1.0, 0.0, MIN_TS - 1, MAX_TS, MAX_TS + 1e6, 1e15], ids=lambda t: f"{t:g}"
)
def test_timestamps_outside_the_plausible_range_are_bad_timestamp(ts: float) -> None:
    assert reason_of(raw(imp_obj(ts=ts))) == "bad_timestamp"
    assert reason_of(raw({"impression_id": "a", "ts": ts}), TOPIC_CLICKS) == "bad_timestamp"
    assert reason_of(raw({"type": "watermark", "ts": ts})) == "bad_timestamp"


@pytest.mark.parametrize("ts", [MIN_TS, 789_652_009.0, 1_476_640_644.0], ids=lambda t: f"{t:g}")
def test_historical_logs_are_in_range(ts: float) -> None:
    # MovieLens' ratings run from 1995 (789,652,009) to 2016: `streamrec convert-movielens`
    # writes them as they are, and the worker once dead-lettered the 17% before 2000
    assert parse_input(raw(imp_obj(ts=ts)), TOPIC_IMPRESSIONS).ts == ts
    assert parse_input(raw({"impression_id": "a", "ts": ts}), TOPIC_CLICKS).ts == ts
    assert parse_input(raw({"type": "watermark", "ts": ts}), TOPIC_IMPRESSIONS) == Watermark(ts)


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"impression_id": ""}, "bad_value"),
        ({"user_id": "u" * (MAX_ID_LEN + 1)}, "bad_value"),
        ({"position": 0}, "bad_value"),
        ({"position": -3}, "bad_value"),
        ({"position": 10_001}, "bad_value"),
        ({"true_p": 1.5}, "bad_value"),
        ({"true_p": -0.1}, "bad_value"),
        ({"features": {"true_p": 0.3}}, "bad_value"),
        ({"features": {"propensity": 0.3}}, "bad_value"),
        ({"features": {"user_id": "u9"}}, "bad_value"),
        ({"features": {f"f{i}": 1 for i in range(MAX_FEATURES + 1)}}, "too_large"),
        ({"features": {"n" * (MAX_FEATURE_NAME_LEN + 1): 1}}, "too_large"),
        ({"features": {"s": "v" * (MAX_FEATURE_VALUE_LEN + 1)}}, "too_large"),
    ],
    ids=lambda v: str(v)[:40],
)
def test_bad_values_reserved_names_and_oversized_parts_are_rejected(
    changes: dict[str, Any], reason: str
) -> None:
    assert reason_of(raw(imp_obj(**changes))) == reason


def test_position_one_and_the_limits_of_ids_and_features_are_accepted() -> None:
    imp = parse_impression(
        raw(
            imp_obj(
                position=1,
                user_id="u" * MAX_ID_LEN,
                features={f"f{i}": "v" * 8 for i in range(MAX_FEATURES)},
            )
        )
    )
    assert imp.position == 1
    assert len(imp.features) == MAX_FEATURES


def test_integer_ids_become_strings_and_null_features_are_dropped() -> None:
    imp = parse_impression(raw(imp_obj(user_id=42, features={"a": None, "b": 3})))
    assert imp.user_id == "42"
    assert imp.features == {"b": 3.0}


def test_invalid_event_rejects_a_reason_outside_the_bounded_set() -> None:
    with pytest.raises(AssertionError):
        InvalidEvent("something_else", "detail")


# --- valid records and round trips ------------------------------------------------------


def test_watermark_records_parse_on_both_topics() -> None:
    record = Watermark(TS).to_json()
    assert parse_input(record, TOPIC_IMPRESSIONS) == Watermark(TS)
    assert parse_input(record, TOPIC_CLICKS) == Watermark(TS)


def test_parse_input_dispatches_on_topic() -> None:
    assert parse_input(raw({"impression_id": "a", "ts": TS}), TOPIC_CLICKS) == Click("a", TS)
    assert isinstance(parse_input(raw(imp_obj()), TOPIC_IMPRESSIONS), Impression)
    # an impression record needs more than a click record
    assert reason_of(raw({"impression_id": "a", "ts": TS}), TOPIC_IMPRESSIONS) == "missing_field"


def full_impression(**changes: Any) -> Impression:
    base: dict[str, Any] = dict(
        impression_id="imp-7",
        ts=TS,
        user_id="u7",
        item_id="i7",
        position=3,
        features={"dev": "ios", "price": 12.25},
        served_score=0.031,
        model_version=12,
        true_p=0.042,
    )
    base.update(changes)
    return Impression(**base)


@pytest.mark.parametrize(
    "imp",
    [full_impression(), Impression("a", TS, "u", "i"), full_impression(features={})],
    ids=["full", "minimal", "no-features"],
)
def test_impression_json_round_trip_is_lossless(imp: Impression) -> None:
    assert parse_impression(imp.to_json()) == imp
    assert parse_input(imp.to_json(), TOPIC_IMPRESSIONS) == imp


def test_click_json_round_trip_is_lossless() -> None:
    assert parse_click(Click("a", TS).to_json()) == Click("a", TS)


# the labeled and scored encodings: tests/unit/logs/test_batch_encoding.py


def test_dead_letter_keeps_origin_reason_and_exact_bytes() -> None:
    record = b'{"impression_id": "a", "ts": "soon"}'
    with pytest.raises(InvalidEvent) as info:
        parse_click(record)
    dl = DeadLetter.of("clicks", 3, 17, info.value, record)
    assert (dl.topic, dl.partition, dl.offset, dl.reason) == ("clicks", 3, 17, "bad_type")
    assert base64.b64decode(dl.raw_b64) == record
    assert json.loads(dl.to_json())["reason"] == "bad_type"


def test_dead_letter_detail_is_truncated() -> None:
    dl = DeadLetter.of("clicks", 0, 0, InvalidEvent("bad_value", "x" * 5000), b"")
    assert len(dl.detail) == 500


# --- example_row ------------------------------------------------------------------------


def test_example_row_holds_ids_position_and_features_but_not_true_p() -> None:
    row = example_row(full_impression())
    assert row == {"dev": "ios", "price": 12.25, "user_id": "u7", "item_id": "i7", "position": 3}


feature_names = st.text(min_size=0, max_size=12)
feature_values = st.one_of(
    st.text(max_size=20), st.floats(allow_nan=False, allow_infinity=False), st.integers(-9, 9)
)


@settings(max_examples=150, deadline=None)
@given(
    features=st.dictionaries(
        st.one_of(feature_names, st.sampled_from(["true_p", "propensity", "ts"])),
        feature_values,
        max_size=6,
    ),
    true_p=st.one_of(st.none(), st.floats(0.0, 1.0)),
)
def test_example_row_of_a_parsed_impression_never_contains_true_p(
    features: dict[str, Any], true_p: float | None
) -> None:
    try:
        imp = parse_impression(raw(imp_obj(features=features, true_p=true_p)))
    except InvalidEvent as exc:
        assert exc.reason == "bad_value"
        assert RESERVED_FEATURE_NAMES & set(features)  # e.g. true_p, propensity, position
        return
    row = example_row(imp)
    assert "true_p" not in row
    assert "propensity" not in row
    assert imp.true_p == true_p


# --- fuzz -------------------------------------------------------------------------------

json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(),  # includes NaN and +-inf, serialised as NaN/Infinity literals
    st.text(max_size=30),
    st.sampled_from([TS, MIN_TS, MAX_TS, 0, 1, "watermark", "u1", "ts"]),
)
json_any = st.recursive(
    json_leaf,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)
json_ish_object = st.fixed_dictionaries(
    {},
    optional={
        "type": st.one_of(st.just("watermark"), json_leaf),
        "impression_id": json_leaf,
        "ts": json_leaf,
        "user_id": json_leaf,
        "item_id": json_leaf,
        "position": json_leaf,
        "features": st.one_of(json_any, st.dictionaries(st.text(max_size=8), json_leaf)),
        "served_score": json_leaf,
        "model_version": json_leaf,
        "true_p": json_leaf,
    },
)
topics = st.sampled_from([TOPIC_IMPRESSIONS, TOPIC_CLICKS])


def parses_or_rejects(record: bytes | str, topic: str) -> None:
    try:
        event = parse_input(record, topic)
    except InvalidEvent as exc:
        assert exc.reason in REASONS
    else:
        assert isinstance(event, Impression | Click | Watermark)


@settings(max_examples=300, deadline=None)
@given(record=st.binary(max_size=300), topic=topics)
def test_parse_input_of_random_bytes_returns_an_event_or_raises_invalid_event(
    record: bytes, topic: str
) -> None:
    parses_or_rejects(record, topic)


@settings(max_examples=400, deadline=None)
@given(obj=st.one_of(json_ish_object, json_any), topic=topics, as_text=st.booleans())
def test_parse_input_of_random_json_returns_an_event_or_raises_invalid_event(
    obj: object, topic: str, as_text: bool
) -> None:
    text = json.dumps(obj)  # allow_nan: NaN and Infinity literals reach the parser
    parses_or_rejects(text if as_text else text.encode(), topic)


def test_parsed_ids_and_feature_strings_are_shared_across_records() -> None:
    """State keeps impressions for hours: two records of the same user, item and feature
    values decode into one copy of each string (interned), not one per record."""

    def record(iid: str, x: float) -> bytes:
        feats = {"ctx_device": "mobile-app", "x": x}
        d = {"impression_id": iid, "ts": TS, "user_id": "user-7", "item_id": "item-9",
             "features": feats}  # fmt: skip
        return json.dumps(d).encode()

    a, b = parse_impression(record("a", 1.5)), parse_impression(record("b", 2.5))
    assert a.user_id is b.user_id and a.item_id is b.item_id
    ka, kb = next(iter(a.features)), next(iter(b.features))
    assert ka == kb == "ctx_device" and ka is kb
    assert a.features["ctx_device"] is b.features["ctx_device"]
    raw = json.dumps({"impression_id": "a", "ts": TS + 1, "user_id": "user-7"}).encode()
    click = parse_input(raw, TOPIC_CLICKS)
    assert isinstance(click, Click) and click.user_id is a.user_id
