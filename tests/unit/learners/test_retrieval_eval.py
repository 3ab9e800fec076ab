"""learners.retrieval_eval: the metrics against a naive reference, the split, the rows."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest

from learners.encoding import EncoderConfig
from learners.retrieval_eval import evaluate_retrieval, retrieval_metrics
from learners.two_tower import TwoTowerConfig, TwoTowerModel
from tests.unit.learners.test_two_tower_behaviour import drifting_taste


def naive(top: list[list[int]], truth: list[int], n_items: int) -> tuple[float, float, float]:
    hits, gains, seen = 0, 0.0, set()
    for row, t in zip(top, truth, strict=True):
        seen.update(row)
        if t in row:
            hits += 1
            gains += 1.0 / math.log2(row.index(t) + 2)
    return hits / len(truth), gains / len(truth), len(seen) / n_items


def test_metrics_equal_a_naive_count() -> None:
    rng = np.random.default_rng(0)
    top = [list(rng.choice(30, 5, replace=False)) for _ in range(200)]
    truth = [int(t) for t in rng.integers(-1, 30, 200)]
    m = retrieval_metrics(np.array(top), np.array(truth), n_items=30)
    r, n, c = naive(top, truth, 30)
    assert m["recall_at_k"] == pytest.approx(r) and m["ndcg_at_k"] == pytest.approx(n)
    assert m["coverage"] == pytest.approx(c)
    assert math.isnan(
        retrieval_metrics(np.zeros((0, 5), np.int64), np.zeros(0, np.int64), 30)["recall_at_k"]
    )


class Fixed:
    """A retrieval 'model' whose every user vector is (1, 0): it always returns i0, i1."""

    def __init__(self) -> None:
        self.learned = 0

    def learn_many(self, X: Sequence[Any], y: Any, w: Any = None) -> None:
        self.learned += len(X)

    def user_vectors(self, rows: Sequence[Any]) -> np.ndarray:
        return np.tile([1.0, 0.0], (len(rows), 1))

    def item_vectors(self, ids: Sequence[str]) -> np.ndarray:
        return np.array([[1.0 - int(i[1:]) / 10, 0.0] for i in ids])


def test_split_catalogue_unseen_items_and_reference_rows() -> None:
    rows: list[dict[str, object]] = [
        {"user_id": f"u{j % 3}", "item_id": f"i{j % 4}"} for j in range(8)
    ]
    rows += [{"user_id": "u0", "item_id": "i1"}, {"user_id": "u1", "item_id": "i9"},
             {"user_id": "u2", "item_id": "i3"}, {"user_id": "u2", "item_id": "i2"}]  # fmt: skip
    y = np.array([1, 1, 0, 1, 1, 0, 0, 0, 1, 1, 0, 1], dtype=np.float64)
    model = Fixed()

    def flat(users: list[str], items: list[str]) -> np.ndarray:
        return np.ones((len(users), len(items)))

    rep = evaluate_retrieval(rows, y, model, train_fraction=8 / 12, k=2, batch_size=3, oracle=flat)
    assert model.learned == 8 and rep["items"] == 4 and rep["test_clicks"] == 3
    assert rep["unseen_share"] == pytest.approx(1 / 3)  # i9 never seen in training
    # Fixed retrieves i0, i1: the i1 click is a hit at rank 2; i9 and i2 are misses.
    m = rep["rows"]["model"]
    assert m["recall_at_k"] == pytest.approx(1 / 3) and m["coverage"] == 0.5
    assert m["ndcg_at_k"] == pytest.approx(1 / 3 / math.log2(3))
    # popularity: training clicks i0, i1, i3, i0 -> i0 then i1 or i3
    assert set(rep["rows"]) == {"model", "popularity", "cooccurrence", "random", "oracle"}
    with pytest.raises(ValueError, match="train_fraction"):
        evaluate_retrieval(rows, y, model, train_fraction=1.0)


def test_two_tower_over_behaviour_beats_popularity_through_the_evaluation() -> None:
    rows, _ = drifting_taste(6_000, seed=4)
    enc = EncoderConfig(num_buckets=1 << 12, max_cat_fields=4, max_num_fields=2, max_seq_len=0)
    cfg = TwoTowerConfig(device="cpu", user_encoder=enc, item_encoder=enc, batch_size=256)
    rep = evaluate_retrieval(rows, np.ones(len(rows)), TwoTowerModel(cfg, seed=0), k=10)
    got = rep["rows"]
    assert (
        got["model"]["recall_at_k"]
        > got["popularity"]["recall_at_k"]
        > got["random"]["recall_at_k"]
    )
    assert 0.0 < got["model"]["ndcg_at_k"] < got["model"]["recall_at_k"]
