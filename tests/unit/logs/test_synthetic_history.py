"""The history-aware synthetic world: fatigue, drifting taste and popularity waves are planted."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from logs.synthetic import SyntheticConfig, generate

BASE = SyntheticConfig(
    n_impressions=30_000, n_users=400, n_items=300, drift_at=None, base_ctr=0.08, seed=4
)
HIST = dataclasses.replace(BASE, history=True)


def _earlier_unclicked(df: pd.DataFrame) -> np.ndarray:
    """Per row: unclicked exposures of its (user, item) in earlier requests (independent)."""
    out = np.zeros(len(df), dtype=np.int64)
    count: dict[tuple[str, str], int] = {}
    for _ts, rows in df.groupby("ts", sort=True).groups.items():
        idx = list(rows)
        for j in idx:
            out[j] = count.get((df.at[j, "user_id"], df.at[j, "item_id"]), 0)
        for j in idx:
            if df.at[j, "click"] == 0:
                key = (df.at[j, "user_id"], df.at[j, "item_id"])
                count[key] = count.get(key, 0) + 1
    return out


def test_default_world_unchanged_by_the_switch() -> None:
    """history=False draws exactly what it drew before (the history rng is separate)."""
    a = generate(dataclasses.replace(BASE, n_impressions=3_000))
    b = generate(dataclasses.replace(BASE, n_impressions=3_000, fatigue=2.0, taste_drift=0.5))
    pd.testing.assert_frame_equal(a, b)


def test_fatigue_lowers_true_p_after_unclicked_exposures() -> None:
    on = generate(HIST)
    off = generate(dataclasses.replace(HIST, fatigue=0.0))
    assert on["item_id"].equals(off["item_id"])  # exposure does not depend on clicks
    k = _earlier_unclicked(on)
    assert (k >= 1).mean() > 0.1  # items are shown again
    p_on, p_off = on["true_p"].to_numpy(), off["true_p"].to_numpy()
    np.testing.assert_allclose(p_on[k == 0], p_off[k == 0])
    assert np.all(p_on[k >= 1] < p_off[k >= 1])
    # and more exposures lower it further
    ratio = np.log(p_on / p_off)
    assert ratio[k == 2].mean() < ratio[k == 1].mean() < 0


def _same_category_lift(df: pd.DataFrame) -> float:
    """CTR on items of the category of the user's last click / CTR otherwise."""
    last: dict[str, str] = {}
    same = np.zeros(len(df), dtype=bool)
    has = np.zeros(len(df), dtype=bool)
    for j, (u, cat, clk) in enumerate(
        zip(df["user_id"], df["item_category"], df["click"], strict=True)
    ):
        if u in last:
            has[j] = True
            same[j] = last[u] == cat
        if clk:
            last[u] = cat
    y = df["click"].to_numpy()
    return float(y[has & same].mean() / y[has & ~same].mean())


def test_recent_clicks_show_a_drifting_taste() -> None:
    assert _same_category_lift(generate(HIST)) > 1.5 * _same_category_lift(generate(BASE))


def test_item_popularity_rises_and_decays() -> None:
    def wave(df: pd.DataFrame) -> float:
        q = pd.qcut(df["ts"], 4, labels=False)
        per = df.assign(q=q).groupby(["item_id", "q"])["true_p"].mean().unstack()
        return float(np.nanmean(np.abs(np.log(per[3] / per[0]))))

    no_taste = dataclasses.replace(HIST, taste_effect=0.0, fatigue=0.0)
    flat = dataclasses.replace(no_taste, popularity_wave=0.0)  # same exposures, no wave
    assert wave(generate(no_taste)) > 0.2 + wave(generate(flat))


def test_history_settings_are_validated() -> None:
    with pytest.raises(ValueError, match="repeat_exposure"):
        SyntheticConfig(repeat_exposure=1.5)
    with pytest.raises(ValueError, match="fatigue"):
        SyntheticConfig(fatigue=-1.0)


def test_cli_generate_history(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from logs.synthetic import read_meta
    from stream.cli import main

    out = tmp_path / "h.csv"
    res = CliRunner().invoke(main, ["generate", str(out), "--impressions", "300", "--history"])
    assert res.exit_code == 0, res.output
    meta = read_meta(out)
    assert meta is not None and meta["config"]["history"] is True
