"""Event-time merge of a log and the impression payloads the replay publishes."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from logs.events import parse_impression
from logs.io import log_impressions
from logs.log_format import LogFormatError
from logs.synthetic import SyntheticConfig, generate
from stream.replay import check_replayable, event_order


@pytest.fixture(scope="module")
def log() -> pd.DataFrame:
    return generate(SyntheticConfig(n_impressions=2000, seed=1))


def test_events_are_in_non_decreasing_event_time(log: pd.DataFrame) -> None:
    ev_ts, _, _ = event_order(log)
    assert np.all(np.diff(ev_ts) >= 0)


def test_every_impression_appears_once_and_every_click_once(log: pd.DataFrame) -> None:
    ev_ts, ev_row, ev_click = event_order(log)
    assert sorted(ev_row[~ev_click].tolist()) == list(range(len(log)))
    clicked = np.flatnonzero(log["click"].to_numpy() == 1)
    assert sorted(ev_row[ev_click].tolist()) == clicked.tolist()
    assert len(clicked) > 0
    np.testing.assert_array_equal(ev_ts[~ev_click], log["ts"].to_numpy()[ev_row[~ev_click]])
    np.testing.assert_array_equal(ev_ts[ev_click], log["click_ts"].to_numpy()[ev_row[ev_click]])


def test_each_click_comes_after_its_impression(log: pd.DataFrame) -> None:
    _, ev_row, ev_click = event_order(log)
    position = {}
    for k, (row, is_click) in enumerate(zip(ev_row.tolist(), ev_click.tolist(), strict=True)):
        if is_click:
            assert position[row] < k
        else:
            position[row] = k


T0 = 1_700_000_000.0


def tiny_log() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "ts": [T0 + 10, T0 + 10, T0 + 20, T0 + 30],
            "impression_id": ["a", "b", "c", "d"],
            "user_id": ["u"] * 4,
            "item_id": ["i"] * 4,
            "position": [1, 2, 1, 1],
            "click": [1, 0, 1, 1],
            "click_ts": [T0 + 20, np.nan, T0 + 20, np.nan],  # d: a click without a time
        }
    )


def test_impressions_come_before_clicks_at_equal_times() -> None:
    ev_ts, ev_row, ev_click = event_order(tiny_log())
    events = list(zip((ev_ts - T0).tolist(), ev_row.tolist(), ev_click.tolist(), strict=True))
    assert events == [
        (10.0, 0, False),
        (10.0, 1, False),
        (20.0, 2, False),  # the impression at 20 before the click at 20
        (20.0, 0, True),
        (20.0, 2, True),  # a click at its impression's own time still follows it
        (30.0, 3, False),
    ]


def test_clicks_without_a_finite_time_are_not_replayed() -> None:
    _, ev_row, ev_click = event_order(tiny_log())
    assert 3 not in ev_row[ev_click].tolist()


def test_impression_payloads_parse_and_carry_true_p_only_at_top_level(
    log: pd.DataFrame,
) -> None:
    payloads = [i.to_json() for i in log_impressions(log)]
    assert len(payloads) == len(log)
    for raw, (_, row) in zip(payloads, log.iterrows(), strict=True):
        obj = json.loads(raw)
        assert "true_p" not in obj["features"] and "propensity" not in obj["features"]
        imp = parse_impression(raw)
        assert imp.true_p == pytest.approx(row["true_p"])
        assert (imp.impression_id, imp.user_id, imp.item_id) == (
            row["impression_id"],
            row["user_id"],
            row["item_id"],
        )
        assert imp.ts == row["ts"] and imp.position == row["position"]
        assert set(imp.features) == {"ctx_device", "item_category", "item_price", "user_segment"}
        assert imp.features["item_price"] == pytest.approx(row["item_price"])


def test_propensity_and_missing_values_never_become_features() -> None:
    df = tiny_log().assign(
        true_p=[0.1, np.nan, 0.3, 0.4],
        propensity=[0.5, 0.5, 0.5, 0.5],
        dev=["ios", None, "web", "ios"],
        price=[1.5, 2.5, np.nan, 4.0],
    )
    imps = [parse_impression(i.to_json()) for i in log_impressions(df)]
    assert [im.features for im in imps] == [
        {"dev": "ios", "price": 1.5},
        {"price": 2.5},
        {"dev": "web"},
        {"dev": "ios", "price": 4.0},
    ]
    assert [im.true_p for im in imps] == [0.1, None, 0.3, 0.4]


def _recent_log(end: float) -> pd.DataFrame:
    df = generate(SyntheticConfig(n_impressions=200, seed=2))
    shift = end - float(np.nanmax(df["click_ts"].to_numpy()))
    df["ts"] += shift
    df["click_ts"] += shift
    return df


def test_a_log_the_worker_would_refuse_is_refused_before_anything_is_sent() -> None:
    now = 1_800_000_000.0
    ok = _recent_log(now - 3_000.0)
    check_replayable(ok, "ok.csv", final_watermark_gap_s=1_861.0, now=now)
    # relative seconds: every event would be dead-lettered as bad_timestamp
    rel = ok.copy()
    rel["ts"] -= float(rel["ts"].iloc[0])
    rel["click_ts"] -= float(ok["ts"].iloc[0])
    with pytest.raises(LogFormatError, match=r"^rel.csv: ts 0.0 \(row 1\) is before 1990-01-01"):
        check_replayable(rel, "rel.csv", final_watermark_gap_s=1_861.0, now=now)
    # the final watermark (last event + the gap) would be future_ts for the worker
    recent = _recent_log(now - 600.0)
    with pytest.raises(LogFormatError, match=r"would be 1,261 s ahead of it.*max_future_skew_s"):
        check_replayable(recent, "recent.csv", final_watermark_gap_s=1_861.0, now=now)
    # a worker configured to accept it: the replay accepts it too
    check_replayable(
        recent, "recent.csv", final_watermark_gap_s=1_861.0, max_future_skew_s=math.inf, now=now
    )
    check_replayable(recent.iloc[:0], "empty.csv", final_watermark_gap_s=1_861.0, now=now)


def test_a_log_mostly_refused_by_the_worker_is_refused_and_a_few_bad_rows_are_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = 1_800_000_000.0
    ok = _recent_log(now - 3_000.0)
    long_id = "u" * 300  # the worker's ids have 1..256 characters
    bad = ok.assign(user_id=[long_id] * len(ok))
    with pytest.raises(
        LogFormatError,
        match=r"would refuse 200 of 200 impressions checked \(row 1: bad_value: field 'user_id'",
    ):
        check_replayable(bad, "bad.csv", final_watermark_gap_s=1_861.0, now=now)
    few = ok.copy()
    few.loc[[3, 7], "user_id"] = long_id
    with caplog.at_level("WARNING", logger="stream.replay"):
        check_replayable(few, "few.csv", final_watermark_gap_s=1_861.0, now=now)
    assert "a worker would refuse 2 of 200 impressions checked (row 4: bad_value" in caplog.text


def test_a_second_outcome_is_never_a_feature_and_is_replayed_as_conversions(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = 1_800_000_000.0
    df = _recent_log(now - 3_000.0)
    clicked = (df["click"] == 1).to_numpy()
    df = df.assign(
        conversion=clicked.astype(int),
        conversion_ts=np.where(clicked, df["click_ts"] + 5.0, np.nan),
        true_cvr=0.3,
    )
    imps = [parse_impression(i.to_json()) for i in log_impressions(df)]
    assert not any({"conversion", "conversion_ts", "true_cvr"} & set(im.features) for im in imps)
    with caplog.at_level("WARNING", logger="stream.replay"):
        check_replayable(df, "two.csv", final_watermark_gap_s=1_861.0, now=now)
    assert "conversion" not in caplog.text  # replayed now, not left out
    _, _, kind = event_order(df, conversions=True)
    assert int((kind == 2).sum()) == int(clicked.sum()) > 0
