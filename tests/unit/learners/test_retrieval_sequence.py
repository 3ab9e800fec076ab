"""The co-occurrence reference row (``cooccurrence_top``) and the two-tower's
``user_id_fallback``: against a naive count, point-in-time, and on a world where the next
click follows the recent ones."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from learners.retrieval_eval import cooccurrence_top, evaluate_retrieval
from learners.towers import user_part
from learners.two_tower import TwoTowerConfig, TwoTowerModel
from tests.unit.learners.test_two_tower_behaviour import config, drifting_taste


def naive_cooccurrence(
    train: list[dict[str, object]], query: dict[str, object], items: list[str], window: int
) -> list[str]:
    """Every item scored by hand: sum over the query's last ``window`` clicks ``h_j`` of
    (training clicks whose previous click was ``h_j``) / (1 + j); ties by popularity."""
    clicks = Counter(str(r["item_id"]) for r in train)
    scores = {}
    for c in items:
        s = 0.0
        for j, h in enumerate(list(query.get("hist_seq") or [])[:window]):  # type: ignore[call-overload]
            s += sum(
                1
                for r in train
                if r["hist_seq"] and r["hist_seq"][0] == h and r["item_id"] == c  # type: ignore[index]
            ) / (1.0 + j)
        scores[c] = s
    by_pop = sorted(items, key=lambda c: (-clicks[c], items.index(c)))
    return sorted(items, key=lambda c: (-scores[c], by_pop.index(c)))


def test_cooccurrence_equals_a_naive_count_and_reads_only_training_rows() -> None:
    rows, items = drifting_taste(900, seed=1, n_users=20, n_items=30, clusters=3)
    train, test = rows[:700], rows[700:]
    col = {c: i for i, c in enumerate(items)}
    clicks = Counter(str(r["item_id"]) for r in train)
    popular = np.array(sorted(range(len(items)), key=lambda i: (-clicks[items[i]], i)))
    top = cooccurrence_top(train, np.ones(len(train)), test[:40], col, 5, popular, window=3)
    for row, got in zip(test[:40], top.tolist(), strict=True):
        want = naive_cooccurrence(train, row, items, 3)[:5]
        assert [items[c] for c in got] == want
    # A transition seen only after the split changes nothing: the test rows are not read.
    shifted = [dict(r, item_id="i0") for r in test]
    again = cooccurrence_top(train, np.ones(len(train)), shifted[:40], col, 5, popular, window=3)
    np.testing.assert_array_equal(again, top)
    # Non-clicks do not count: all labels 0 leaves popularity.
    none = cooccurrence_top(train, np.zeros(len(train)), test[:3], col, 5, popular)
    np.testing.assert_array_equal(none, np.tile(popular[:5], (3, 1)))
    with pytest.raises(ValueError, match="window"):
        cooccurrence_top(train, np.ones(len(train)), test, col, 5, popular, window=0)


def test_user_id_fallback_keeps_the_id_only_for_rows_without_history() -> None:
    cfg = TwoTowerConfig(device="cpu", user_id_fallback=True)
    with_hist = {"user_id": "u1", "ctx": "web", "hist_seq": ["a"], "item_id": "b"}
    assert user_part(with_hist, cfg) == {"ctx": "web"}
    assert user_part({"user_id": "u1", "hist_seq": []}, cfg)["user_id"] == "u1"
    off = TwoTowerConfig(device="cpu", user_id_fallback=False)
    assert user_part(with_hist, off)["user_id"] == "u1"
    # behaviour_len 0: the tower reads no history, so the id stays
    assert (
        user_part(with_hist, TwoTowerConfig(device="cpu", behaviour_len=0, user_id_fallback=True))[
            "user_id"
        ]
        == "u1"
    )
    # the setting survives a config dict
    assert TwoTowerConfig.from_dict(cfg.to_dict()).user_id_fallback
    old = {
        k: v for k, v in TwoTowerConfig(device="cpu").to_dict().items() if k != "user_id_fallback"
    }
    assert not TwoTowerConfig.from_dict(old).user_id_fallback


def test_user_id_fallback_vectors_follow_history_not_id_once_learned() -> None:
    rows, _ = drifting_taste(2_000, seed=2)
    model = TwoTowerModel(config(user_id_fallback=True), seed=0)
    model.learn_many(rows, np.ones(len(rows)))
    hist = {"hist_seq": ["i3", "i13"], "hist_seq_age": [60.0, 120.0]}
    a, b = model.user_vectors([{"user_id": "u1", **hist}, {"user_id": "u2", **hist}])
    np.testing.assert_allclose(a, b, atol=1e-6)  # same history: the id is not read
    c, d = model.user_vectors(["u1", "u2"])  # no history: the id is the fallback
    assert np.abs(c - d).max() > 1e-3
    plain = TwoTowerModel(config(user_id_fallback=False), seed=0)
    plain.learn_many(rows, np.ones(len(rows)))
    e, f = plain.user_vectors([{"user_id": "u1", **hist}, {"user_id": "u2", **hist}])
    assert np.abs(e - f).max() > 1e-3  # without the setting the id is read with history too


def test_cooccurrence_row_and_fallback_pool_beat_popularity_when_the_sequence_matters() -> None:
    rows, _ = drifting_taste(6_000, seed=4)
    cfg = config(user_id_fallback=True, behaviour_pool="item_tower", lr=0.01, temperature=0.2)
    rep = evaluate_retrieval(rows, np.ones(len(rows)), TwoTowerModel(cfg, seed=0), k=10)
    got = {name: m["recall_at_k"] for name, m in rep["rows"].items()}
    # measured: cooccurrence 0.55, model 0.62, popularity 0.11 (seed 0)
    assert got["cooccurrence"] > got["popularity"] + 0.2
    assert got["model"] > got["popularity"] + 0.2
