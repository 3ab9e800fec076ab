from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from logs.io import frame_to_rows, read_log_frame
from logs.log_format import RESERVED_COLUMNS
from logs.synthetic import (
    SyntheticConfig,
    click_propensity,
    generate,
    read_meta,
    write_synthetic,
)

SMALL = SyntheticConfig(n_impressions=30_000, n_users=2_000, n_items=300, seed=7)


@pytest.fixture(scope="module")
def small_log() -> pd.DataFrame:
    return generate(SMALL)


def drift_row(config: SyntheticConfig) -> int:
    assert config.drift_at is not None
    s = config.slate_size
    return round(config.drift_at * config.n_impressions / s) * s


def test_same_seed_gives_identical_frames(small_log: pd.DataFrame) -> None:
    pd.testing.assert_frame_equal(generate(SMALL), small_log)


def test_different_seed_gives_a_different_frame(small_log: pd.DataFrame) -> None:
    other = generate(dataclasses.replace(SMALL, seed=8))
    assert not other["item_id"].equals(small_log["item_id"])
    assert not np.allclose(other["true_p"], small_log["true_p"])


def test_columns_ids_and_types(small_log: pd.DataFrame) -> None:
    assert list(small_log.columns) == [
        *RESERVED_COLUMNS[:8],
        "ctx_device",
        "item_category",
        "item_price",
        "user_segment",
    ]
    assert small_log["impression_id"].iloc[0] == "imp-0000001"
    assert small_log["impression_id"].is_unique
    assert small_log["user_id"].str.fullmatch(r"u\d+").all()
    assert small_log["item_id"].str.fullmatch(r"i\d+").all()
    assert small_log["user_segment"].str.fullmatch(r"s[0-7]").all()
    assert small_log["item_category"].str.fullmatch(r"c(1?\d)").all()
    assert set(small_log["ctx_device"]) == {"mobile", "desktop", "tablet"}
    assert small_log["item_price"].dtype == np.float64 and (small_log["item_price"] > 0).all()
    row = frame_to_rows(small_log.iloc[:1])[0]
    assert set(row.features) == {"ctx_device", "item_category", "item_price", "user_segment"}
    assert row.true_p is not None


def test_true_ctr_matches_base_ctr_before_drift_and_multiplied_after(
    small_log: pd.DataFrame,
) -> None:
    k = drift_row(SMALL)
    before = small_log["true_p"].iloc[:k].mean()
    after = small_log["true_p"].iloc[k:].mean()
    assert before == pytest.approx(SMALL.base_ctr, rel=0.10)
    assert after == pytest.approx(SMALL.base_ctr * SMALL.drift_multiplier, rel=0.10)
    # realised clicks follow the true probabilities
    assert small_log["click"].iloc[:k].mean() == pytest.approx(before, rel=0.15)
    assert small_log["click"].iloc[k:].mean() == pytest.approx(after, rel=0.15)
    assert small_log["true_p"].between(0.0, 0.99).all()


def test_no_drift_keeps_base_ctr_throughout() -> None:
    df = generate(dataclasses.replace(SMALL, drift_at=None))
    half = len(df) // 2
    assert df["true_p"].mean() == pytest.approx(SMALL.base_ctr, rel=0.01)
    assert df["true_p"].iloc[half:].mean() == pytest.approx(SMALL.base_ctr, rel=0.10)


def test_position_one_is_clicked_more_than_position_three(small_log: pd.DataFrame) -> None:
    by_pos = small_log.groupby("position")[["true_p", "click"]].mean()
    assert by_pos.loc[1, "true_p"] > by_pos.loc[2, "true_p"] > by_pos.loc[3, "true_p"]
    assert by_pos.loc[1, "click"] > by_pos.loc[3, "click"]


def test_rows_are_sorted_and_slates_share_user_ts_and_context(small_log: pd.DataFrame) -> None:
    df = small_log
    assert df["ts"].is_monotonic_increasing
    assert df["ts"].iloc[0] == SMALL.start_ts
    s = SMALL.slate_size
    assert df["position"].tolist() == [1, 2, 3] * (len(df) // s)
    slates = df.groupby(np.arange(len(df)) // s)
    for col in ("ts", "user_id", "ctx_device", "user_segment"):
        assert (slates[col].nunique() == 1).all(), col
    assert (slates["item_id"].nunique() == s).all()  # distinct items within a slate
    request_ts = df["ts"].to_numpy()[::s]
    assert (np.diff(request_ts) > 0).all()
    # event time advances at about impressions_per_s
    rate = len(df) / (request_ts[-1] - request_ts[0])
    assert rate == pytest.approx(SMALL.impressions_per_s, rel=0.05)


def test_click_ts_is_inside_the_attribution_window(small_log: pd.DataFrame) -> None:
    clicked = small_log["click"] == 1
    delay = (small_log["click_ts"] - small_log["ts"])[clicked]
    assert (delay >= 0).all() and (delay < 1500).all()
    assert delay.mean() == pytest.approx(SMALL.click_delay_mean_s, rel=0.15)
    assert small_log.loc[~clicked, "click_ts"].isna().all()


def test_popular_items_and_users_are_skewed(small_log: pd.DataFrame) -> None:
    items = small_log["item_id"].value_counts()
    assert items.iloc[:30].sum() > 3 * items.iloc[-30:].sum()
    users = small_log.drop_duplicates("ts")["user_id"].value_counts()
    assert users.iloc[0] > 3 * users.median()


def test_written_log_passes_validation_and_reads_back_identically(tmp_path: Path) -> None:
    config = SyntheticConfig(n_impressions=3_000, n_users=100, n_items=50, seed=3)
    meta = write_synthetic(config, tmp_path / "syn.csv.gz")
    back = read_log_frame(tmp_path / "syn.csv.gz")
    pd.testing.assert_frame_equal(back, generate(config))
    assert meta["n_rows"] == len(back)
    assert meta["n_clicks"] == int(back["click"].sum())


def test_meta_sidecar_records_config_and_drift(tmp_path: Path) -> None:
    config = SyntheticConfig(n_impressions=3_000, n_users=100, n_items=50, seed=3)
    meta = write_synthetic(config, tmp_path / "syn.csv")
    assert (tmp_path / "syn.meta.json").is_file()
    assert read_meta(tmp_path / "syn.csv") == meta
    assert json.loads((tmp_path / "syn.meta.json").read_text()) == meta
    assert meta["config"]["seed"] == 3
    assert meta["config"]["position_bias"] == list(config.position_bias)
    df = generate(config)
    k = drift_row(config)
    assert meta["drift_ts"] == df["ts"].iloc[k]
    assert meta["mean_true_ctr_before_drift"] == pytest.approx(df["true_p"].iloc[:k].mean())
    assert meta["mean_true_ctr_after_drift"] == pytest.approx(df["true_p"].iloc[k:].mean())
    assert df["ts"].iloc[k - 1] < meta["drift_ts"]


def test_meta_without_drift_has_null_drift_ts(tmp_path: Path) -> None:
    config = SyntheticConfig(n_impressions=600, n_users=20, n_items=10, drift_at=None)
    meta = write_synthetic(config, tmp_path / "nodrift.csv.gz")
    assert meta["drift_ts"] is None and meta["mean_true_ctr_after_drift"] is None
    assert read_meta(tmp_path / "nodrift.csv.gz") == meta


def test_read_meta_returns_none_without_sidecar(tmp_path: Path) -> None:
    assert read_meta(tmp_path / "missing.csv") is None


def test_uneven_last_slate_is_cut_short() -> None:
    df = generate(SyntheticConfig(n_impressions=10, n_users=5, n_items=10, seed=2))
    assert df["position"].tolist() == [1, 2, 3, 1, 2, 3, 1, 2, 3, 1]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"n_impressions": 0}, "n_impressions"),
        ({"n_users": 0}, "n_users"),
        ({"n_items": 2}, "n_items"),
        ({"dim": 0}, "dim"),
        ({"slate_size": 4}, "position_bias"),
        ({"base_ctr": 0.0}, "base_ctr"),
        ({"base_ctr": 1.0}, "base_ctr"),
        ({"position_bias": (1.0, 0.0, 0.5)}, "position_bias"),
        ({"impressions_per_s": 0.0}, "impressions_per_s"),
        ({"click_delay_mean_s": -1.0}, "click_delay_mean_s"),
        ({"drift_at": 1.0}, "drift_at"),
        ({"drift_at": 0.0}, "drift_at"),
        ({"drift_multiplier": 0.0}, "drift_multiplier"),
        ({"start_ts": float("nan")}, "start_ts"),
        ({"seed": -1}, "seed"),
        ({"n_users": 2.5}, "n_users"),
    ],
)
def test_invalid_config_is_rejected_with_the_field_name(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        SyntheticConfig(**kwargs)


def test_config_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        SMALL.seed = 1  # type: ignore[misc]  # checking that assignment fails at runtime


def test_the_default_log_has_200k_rows_and_its_drift() -> None:
    # its generation time is bench.hot_paths' (a timed assertion here was flaky)
    df = generate(SyntheticConfig())
    assert len(df) == 200_000
    k = drift_row(SyntheticConfig())
    assert df["true_p"].iloc[:k].mean() == pytest.approx(0.04, rel=0.10)
    assert df["true_p"].iloc[k:].mean() == pytest.approx(0.064, rel=0.10)


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 200),
    slate=st.integers(1, 3),
    n_items=st.integers(3, 20),
    drift_at=st.one_of(st.none(), st.floats(0.05, 0.95)),
    seed=st.integers(0, 2**32),
)
def test_small_configs_give_valid_logs(
    n: int, slate: int, n_items: int, drift_at: float | None, seed: int
) -> None:
    config = SyntheticConfig(
        n_impressions=n,
        n_users=7,
        n_items=n_items,
        slate_size=slate,
        drift_at=drift_at,
        click_delay_mean_s=5_000.0,  # long delays exercise the 1500 s cap
        seed=seed,
    )
    df = generate(config)
    assert len(df) == n
    assert df["ts"].is_monotonic_increasing and df["impression_id"].is_unique
    assert df["position"].between(1, slate).all()
    clicked = df["click"] == 1
    delay = (df["click_ts"] - df["ts"])[clicked]
    assert ((delay >= 0) & (delay < 1500)).all()
    assert df["true_p"].between(0, 0.99).all()


def test_click_propensity_ranks_items_as_the_log_clicks_them() -> None:
    cfg = SyntheticConfig(n_impressions=60_000, n_users=50, n_items=40, drift_at=None, seed=3)
    df = generate(cfg)
    users = [f"u{i}" for i in range(cfg.n_users)]
    items = [f"i{j}" for j in range(cfg.n_items)]
    scores = click_propensity(cfg, users, items)
    assert scores.shape == (50, 40) and (scores > 0).all()
    # expected clicks per item (summed over users weighted by their traffic) against counts
    traffic = df.groupby("user_id").size().reindex(users, fill_value=0).to_numpy()
    expected = traffic @ scores
    clicks = df[df["click"] == 1].groupby("item_id").size().reindex(items, fill_value=0)
    rho = np.corrcoef(np.argsort(np.argsort(expected)), np.argsort(np.argsort(clicks)))[0, 1]
    assert rho > 0.8
    # and per user: the user's own clicks land on the items it scores high
    top = np.argsort(-scores, axis=1)[:, :10]
    clicked = df[df["click"] == 1]
    hits = np.mean([int(it[1:]) in set(top[int(u[1:])]) for u, it in
                    zip(clicked["user_id"], clicked["item_id"], strict=True)])  # fmt: skip
    assert hits > 10 / cfg.n_items * 1.5
    # without each user's own taste, users of one segment rank items alike, and the
    # personal oracle finds the users' clicks more often than the segment-level one
    flat = click_propensity(cfg, users, items, personal=False)
    assert flat.shape == scores.shape and not np.allclose(flat, scores)
    flat_top = np.argsort(-flat, axis=1)[:, :10]
    flat_hits = np.mean([int(it[1:]) in set(flat_top[int(u[1:])]) for u, it in
                         zip(clicked["user_id"], clicked["item_id"], strict=True)])  # fmt: skip
    assert hits > flat_hits
    with pytest.raises(KeyError, match="not an id"):
        click_propensity(cfg, ["u50"], items)


def test_the_second_outcome_follows_its_truth_and_leaves_the_other_columns_alone(
    tmp_path: Path,
) -> None:
    base = SyntheticConfig(n_impressions=60_000, n_users=500, n_items=200, seed=4, drift_at=None)
    plain = generate(base)
    conv = generate(dataclasses.replace(base, conversion=True, base_cvr=0.3))
    pd.testing.assert_frame_equal(conv[list(plain.columns)], plain)
    clicked = conv["click"] == 1
    assert conv.loc[~clicked, "conversion"].eq(0).all()
    assert conv["true_cvr"].mean() == pytest.approx(0.3, abs=1e-6)
    # P(conversion | click) is true_cvr: the clicked rows' conversions match their truth
    # within a few standard errors
    tc = conv.loc[clicked, "true_cvr"].to_numpy()
    n_conv = conv.loc[clicked, "conversion"].sum()
    assert abs(n_conv - tc.sum()) < 4 * np.sqrt((tc * (1 - tc)).sum())
    done = conv["conversion"] == 1
    assert (conv.loc[done, "conversion_ts"] >= conv.loc[done, "click_ts"]).all()
    assert conv.loc[~done, "conversion_ts"].isna().all()
    meta = write_synthetic(dataclasses.replace(base, conversion=True), tmp_path / "c.csv")
    back = read_log_frame(tmp_path / "c.csv")
    assert meta["n_conversions"] == int(back["conversion"].sum()) > 0
    assert write_synthetic(base, tmp_path / "p.csv")["n_conversions"] is None
