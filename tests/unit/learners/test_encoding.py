from __future__ import annotations

import copy
import math
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from learners.encoding import EncoderConfig, FeatureEncoder

CFG = EncoderConfig(num_buckets=1 << 12, max_cat_fields=4, max_num_fields=2)


def expected_bucket(field: str, value: str, num_buckets: int = CFG.num_buckets) -> int:
    return 1 + zlib.crc32(f"{field}={value}".encode()) % (num_buckets - 1)


def test_user_and_item_own_slots_zero_and_one_and_buckets_use_crc32() -> None:
    enc = FeatureEncoder(CFG)
    batch = enc.encode([{"item_id": "i9", "a_seg": "s1", "user_id": "u1"}])
    assert batch.cat.dtype == np.int64 and batch.num.dtype == np.float32
    assert batch.cat[0, 0] == expected_bucket("user_id", "u1")
    assert batch.cat[0, 1] == expected_bucket("item_id", "i9")
    assert batch.cat[0, 2] == expected_bucket("a_seg", "s1")
    assert enc.cat_fields == ["user_id", "item_id", "a_seg"]


def test_slots_are_assigned_first_seen_in_sorted_key_order() -> None:
    enc = FeatureEncoder(CFG)
    enc.encode([{"zeta": "z", "beta": "b", "price": 1.0}, {"alpha": "a", "cost": 2.0}])
    assert enc.cat_fields == ["user_id", "item_id", "beta", "zeta"]
    assert enc.num_fields == ["price", "cost"]
    assert enc.n_dropped_fields == 1  # alpha arrived after the 4 categorical slots filled


def test_fields_beyond_the_maximum_are_ignored_and_counted() -> None:
    enc = FeatureEncoder(CFG)
    batch = enc.encode([{"c1": "x", "c2": "x", "c3": "x", "n1": 1.0, "n2": 2.0, "n3": 3.0}])
    assert enc.n_dropped_fields == 2  # c3 and n3
    assert enc.cat_fields == ["user_id", "item_id", "c1", "c2"]
    assert batch.cat[0, 0] == 0 and batch.cat[0, 1] == 0


def test_position_is_categorical_and_int_float_agree() -> None:
    enc = FeatureEncoder(CFG)
    batch = enc.encode([{"position": 3}, {"position": 3.0}, {"position": "3"}])
    assert enc.num_fields == []
    assert set(batch.cat[:, 2].tolist()) == {expected_bucket("position", "3")}


def test_numeric_values_are_signed_log1p_and_non_finite_is_absent() -> None:
    enc = FeatureEncoder(CFG)
    batch = enc.encode([{"x": 12.5}, {"x": -3}, {"x": float("nan")}, {"x": float("inf")}, {}])
    expected = [math.log1p(12.5), -math.log1p(3), 0.0, 0.0, 0.0]
    np.testing.assert_allclose(batch.num[:, 0], expected, rtol=1e-6)


def test_missing_and_none_values_are_absent() -> None:
    enc = FeatureEncoder(CFG)
    batch = enc.encode([{"user_id": None, "item_id": "i1", "seg": None, "x": None}])
    assert batch.cat[0, 0] == 0 and batch.cat[0, 1] != 0
    assert batch.cat[0, 2:].tolist() == [0, 0] and batch.num.tolist() == [[0.0, 0.0]]


def test_bucket_ids_match_encode() -> None:
    enc = FeatureEncoder(CFG)
    ids = ["i1", "i2", "i3"]
    batch = enc.encode([{"item_id": i} for i in ids])
    np.testing.assert_array_equal(enc.bucket_ids("item_id", ids), batch.cat[:, 1])
    assert enc.bucket_ids("item_id", []).shape == (0,)


def test_state_dict_round_trip_preserves_slots() -> None:
    enc = FeatureEncoder(CFG)
    rows = [{"b": "x", "a": 1.0}, {"c": "y", "d": 2.0}]
    enc.encode(rows)
    other = FeatureEncoder(CFG)
    other.load_state_dict(enc.state_dict())
    later = [{"d": 5.0, "c": "z", "b": "w"}]
    np.testing.assert_array_equal(other.encode(later).cat, enc.encode(later).cat)
    np.testing.assert_array_equal(other.encode(later).num, enc.encode(later).num)


def test_encode_does_not_mutate_rows_and_handles_empty_batch() -> None:
    rows = [{"user_id": "u1", "position": 2, "p": 1.5}]
    before = copy.deepcopy(rows)
    enc = FeatureEncoder(CFG)
    enc.encode(rows)
    assert rows == before
    empty = enc.encode([])
    assert empty.cat.shape == (0, 4) and empty.num.shape == (0, 2)


def test_invalid_config_is_rejected() -> None:
    with pytest.raises(ValueError, match="max_cat_fields"):
        EncoderConfig(max_cat_fields=1)
    with pytest.raises(ValueError, match="num_buckets"):
        EncoderConfig(num_buckets=1)


values = st.one_of(
    st.none(),
    st.text(max_size=5),
    st.integers(-1000, 1000),
    st.floats(allow_nan=True, allow_infinity=True),
)
rows_strategy = st.lists(
    st.dictionaries(st.sampled_from(["user_id", "item_id", "a", "b", "c", "position"]), values),
    max_size=20,
)


@settings(max_examples=40, deadline=None)
@given(rows_strategy)
def test_encode_shapes_ranges_and_row_order_invariance(rows: list) -> None:
    enc = FeatureEncoder(CFG)
    batch = enc.encode(rows)
    assert batch.cat.shape == (len(rows), 4) and batch.num.shape == (len(rows), 2)
    assert ((batch.cat >= 0) & (batch.cat < CFG.num_buckets)).all()
    assert np.isfinite(batch.num).all()
    # Each row encodes the same alone as in the batch (once slots exist).
    for i, row in enumerate(rows):
        single = enc.encode([row])
        np.testing.assert_array_equal(single.cat[0], batch.cat[i])
        np.testing.assert_array_equal(single.num[0], batch.num[i])


def naive_collision_rate(field: str, values: list[str], num_buckets: int) -> float:
    distinct = sorted(set(values))
    buckets = [expected_bucket(field, v, num_buckets) for v in distinct]
    colliding = [
        v
        for i, v in enumerate(distinct)
        if any(buckets[i] == buckets[j] for j in range(len(distinct)) if j != i)
    ]
    return len(colliding) / len(distinct) if len(distinct) > 1 else 0.0


@pytest.mark.parametrize("num_buckets", [2, 3, 5, 17, 64])
def test_collision_rate_matches_naive_count_on_tiny_bucket_space(num_buckets: int) -> None:
    enc = FeatureEncoder(EncoderConfig(num_buckets=num_buckets))
    values = [f"i{k}" for k in range(20)] + ["i3", "i3"]  # repeats are one value
    rate = enc.collision_rate("item_id", values)
    assert rate == naive_collision_rate("item_id", values, num_buckets)
    if num_buckets <= 17:  # 20 distinct values in < 20 buckets: pigeonhole
        assert rate > 0


def test_collision_rate_edge_cases() -> None:
    tiny = FeatureEncoder(EncoderConfig(num_buckets=2))  # one usable bucket
    assert tiny.collision_rate("item_id", ["a", "b", "c"]) == 1.0
    assert tiny.collision_rate("item_id", ["a", "a"]) == 0.0  # one distinct value
    assert tiny.collision_rate("item_id", []) == 0.0
    wide = FeatureEncoder(EncoderConfig(num_buckets=1 << 20))
    assert wide.collision_rate("item_id", ["a", "b", "c"]) == 0.0


@settings(max_examples=30, deadline=None)
@given(st.lists(st.text(max_size=4), max_size=30), st.integers(2, 40))
def test_collision_rate_is_a_fraction_equal_to_naive(values: list[str], num_buckets: int) -> None:
    rate = FeatureEncoder(EncoderConfig(num_buckets=num_buckets)).collision_rate("f", values)
    assert 0.0 <= rate <= 1.0
    assert rate == pytest.approx(naive_collision_rate("f", values, num_buckets))
