"""bench.history_models helpers: the point-in-time history it attaches (no timing)."""

from __future__ import annotations

import pandas as pd

from bench.history_models import WorldConfig, attach_history, history_world


def test_attached_history_holds_only_earlier_clicks_most_recent_first() -> None:
    df = pd.DataFrame(
        {
            "ts": [10.0, 20.0, 30.0, 40.0, 25.0],
            "user_id": ["a", "a", "a", "a", "b"],
            "item_id": ["i1", "i2", "i3", "i4", "i9"],
            "click": [1, 1, 0, 0, 1],
            # i2's click lands after the impression at 30 s (but before 40 s)
            "click_ts": [12.0, 35.0, None, None, 26.0],
        }
    )
    hist = attach_history(df, length=5)
    assert hist[0] == [] and hist[1] == [("i1", 12.0)] and hist[2] == [("i1", 12.0)]
    assert hist[3] == [("i2", 35.0), ("i1", 12.0)]
    assert hist[4] == []  # user b's own click is not its history


def test_history_world_rows_see_only_their_users_earlier_clicks() -> None:
    world = history_world(WorldConfig(n_impressions=3_000, n_users=50, n_items=60, seed=1))
    ex = world.examples
    clicked: dict[str, list[str]] = {}
    for n, row in enumerate(ex.rows):
        user = str(row["user_id"])
        assert row["hist_seq"] == clicked.get(user, [])[::-1][:20]
        ages = row["hist_seq_age"]
        assert isinstance(ages, list) and all(a > 0 for a in ages) and ages == sorted(ages)
        if ex.y[n]:
            clicked.setdefault(user, []).append(str(row["item_id"]))
    assert 0.01 < ex.y.mean() < 0.2 and world.propensity(2_999).shape == (60,)
