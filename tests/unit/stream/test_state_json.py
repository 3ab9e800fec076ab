"""The join state's impression JSON (msgspec's encoder) reads back as the standard
library's ``Impression.to_json`` does: the same object, every float bit for bit, and
the same impression after the restore path's parse."""

from __future__ import annotations

import json
import math

from hypothesis import given, settings
from hypothesis import strategies as st

from logs.events import (
    MAX_TS,
    MIN_TS,
    RESERVED_FEATURE_NAMES,
    Impression,
    normalize_id,
    parse_impression,
)
from stream.services.join_state import pending_value, state_json

finite = st.floats(allow_nan=False, allow_infinity=False)
ids = st.text(min_size=1, max_size=12).map(normalize_id)
features = st.dictionaries(
    st.text(min_size=1, max_size=10).filter(lambda k: k not in RESERVED_FEATURE_NAMES),
    st.text(max_size=16) | finite,
    max_size=8,
)
impressions = st.builds(
    Impression, ids, st.floats(min_value=MIN_TS, max_value=MAX_TS, exclude_max=True), ids, ids,
    st.none() | st.integers(1, 10_000), features, st.none() | finite,
    st.none() | st.integers(0, 2**53), st.none() | st.floats(0.0, 1.0),
)  # fmt: skip


def _bits(x: object) -> object:
    if isinstance(x, float):
        return ("f", x.hex(), math.copysign(1.0, x))
    if isinstance(x, dict):
        return {k: _bits(v) for k, v in x.items()}
    return x


@settings(max_examples=300, deadline=None)
@given(imp=impressions, click_ts=st.none() | st.floats(MIN_TS, MAX_TS))
def test_state_json_reads_back_as_to_json(imp: Impression, click_ts: float | None) -> None:
    got = json.loads(state_json(imp))
    assert _bits(got) == _bits(json.loads(imp.to_json()))
    value = json.loads(pending_value(imp, click_ts))
    assert value["c"] == click_ts
    # the restore path: re-dumped without escapes, then parsed and validated
    assert parse_impression(json.dumps(value["i"], ensure_ascii=False)) == imp
