"""Ids are compared as Unicode NFC strings everywhere an id enters (issue 19): a precomposed
``é`` and ``e`` + combining acute accent name the same user, item and impression on the
JSON path, in envelopes, in serving requests and in offline logs; integers are their
decimal strings."""

from __future__ import annotations

import json
import unicodedata

import pandas as pd
import pytest
from hypothesis import given
from hypothesis import strategies as st

from logs.events import MAX_ID_LEN, InvalidEvent, normalize_id, parse_click, parse_impression
from logs.io import frame_to_rows
from serving.requests import ServingError, check_items, check_user
from stream.envelope import decode_envelope, encode_envelope

PRECOMPOSED = "caf\u00e9"
DECOMPOSED = "cafe\u0301"


def _imp(user: str, item: str = "i", iid: str = "a") -> dict[str, object]:
    return {"impression_id": iid, "ts": 1.7e9, "user_id": user, "item_id": item}


def test_json_events_normalise_every_id() -> None:
    a = parse_impression(json.dumps(_imp(PRECOMPOSED, PRECOMPOSED, PRECOMPOSED)))
    b = parse_impression(json.dumps(_imp(DECOMPOSED, DECOMPOSED, DECOMPOSED)))
    assert DECOMPOSED != PRECOMPOSED
    assert (a.user_id, a.item_id, a.impression_id) == (b.user_id, b.item_id, b.impression_id)
    assert a.user_id == PRECOMPOSED
    c = parse_click(json.dumps({"impression_id": DECOMPOSED, "ts": 1.7e9, "user_id": DECOMPOSED}))
    assert (c.impression_id, c.user_id) == (PRECOMPOSED, PRECOMPOSED)


def test_envelope_events_normalise_ids() -> None:
    raw = encode_envelope("impressions", [_imp(DECOMPOSED, iid="x"), _imp(PRECOMPOSED, iid="y")])
    (e1, _), (e2, _) = decode_envelope(raw, "impressions")
    assert not isinstance(e1, InvalidEvent) and not isinstance(e2, InvalidEvent)
    assert e1.user_id == e2.user_id == PRECOMPOSED


def test_integer_ids_are_their_decimal_string() -> None:
    assert parse_impression(json.dumps(_imp(12))).user_id == "12"  # type: ignore[arg-type]


def test_length_limit_applies_after_normalisation() -> None:
    # 256 decomposed characters (512 code points) compose to 256: accepted
    long = "e\u0301" * MAX_ID_LEN
    assert parse_impression(json.dumps(_imp(long))).user_id == "\u00e9" * MAX_ID_LEN
    with pytest.raises(InvalidEvent) as exc:
        parse_impression(json.dumps(_imp("e\u0301" * (MAX_ID_LEN + 1))))
    assert exc.value.reason == "bad_value"


def test_serving_requests_normalise_ids() -> None:
    assert check_user(DECOMPOSED) == PRECOMPOSED
    assert check_items([DECOMPOSED, "b"], 10) == [PRECOMPOSED, "b"]
    with pytest.raises(ServingError) as exc:  # the same item spelled twice
        check_items([DECOMPOSED, PRECOMPOSED], 10)
    assert exc.value.status == 400


def test_offline_logs_read_ids_as_the_stream_does() -> None:
    df = pd.DataFrame(
        {"ts": [1.0, 2.0], "impression_id": ["a", "b"], "user_id": [DECOMPOSED, PRECOMPOSED],
         "item_id": ["i", "i"], "click": [0, 1]}
    )  # fmt: skip
    rows = frame_to_rows(df)
    assert rows[0].user_id == rows[1].user_id == PRECOMPOSED


@given(st.text(min_size=1, max_size=40))
def test_normalize_id_is_nfc_and_idempotent(s: str) -> None:
    n = normalize_id(s)
    assert n == unicodedata.normalize("NFC", s)
    assert normalize_id(n) == n
    if s.isascii():
        assert n is s
