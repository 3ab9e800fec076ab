"""Item-to-item co-visitation and reciprocal rank fusion (learners.covisit), and their rows
in evaluate_retrieval."""

from __future__ import annotations

import numpy as np
import pytest

from learners.covisit import CoVisitation, CoVisitConfig, rrf_fuse
from learners.retrieval_eval import evaluate_retrieval
from learners.retrieval_prior import ServingPrior
from learners.two_tower import TwoTowerConfig, TwoTowerModel


def paired_world(n_users: int, seed: int) -> tuple[list[dict[str, object]], np.ndarray]:
    """Items come in pairs (2m, 2m+1): a user who clicks one item of a pair clicks its
    partner next; the pairs' first items are drawn with a popularity skew that the
    partners do not share. Each row carries the user's earlier clicks, most recent first
    (what the feature stage attaches), as ``hist_seq``."""
    rng = np.random.default_rng(seed)
    n_pairs = 40
    weights = 1.0 / np.arange(1, n_pairs + 1)
    weights /= weights.sum()
    rows: list[dict[str, object]] = []
    for u in range(n_users):
        hist: list[str] = []
        for _ in range(3):
            first = int(rng.choice(n_pairs, p=weights))
            for item in (f"i{2 * first}", f"i{2 * first + 1}"):
                rows.append({"user_id": f"u{u}", "item_id": item, "hist_seq": list(hist)})
                hist.insert(0, item)
    return rows, np.ones(len(rows))


def test_the_partner_of_the_last_click_ranks_first_and_nothing_comes_from_the_future() -> None:
    rows, y = paired_world(300, seed=0)
    cv = CoVisitation(CoVisitConfig(window=1, shrink=0.0))
    cv.learn_many(rows, y)
    catalogue = [f"i{k}" for k in range(80)]
    fill = np.arange(80)
    top = cv.top([{"hist_seq": ["i10"]}, {"hist_seq": ["i31"]}], catalogue, 1, fill)
    assert top[:, 0].tolist() == [11, 30]
    # a click whose row has no history co-visits nothing: the first clicks alone teach nothing
    cold = CoVisitation(CoVisitConfig(window=1))
    cold.learn_many([r for r in rows if not r["hist_seq"]], np.ones(300))
    assert cold.co == {} and sum(cold.clicks.values()) == 300
    # unclicked rows count nothing
    none = CoVisitation()
    none.learn_many(rows, np.zeros(len(rows)))
    assert none.co == {} and none.clicks == {}


def test_neighbours_per_item_stay_bounded() -> None:
    cv = CoVisitation(CoVisitConfig(window=50, max_neighbours=5))
    rows = [{"item_id": "hub", "hist_seq": [f"x{k}" for k in range(50)]}]
    cv.learn_many(rows * 3, np.ones(3))
    assert len(cv.co["hub"]) <= 10 and cv.pruned >= 40
    assert all(v == 3.0 for v in cv.co["hub"].values())


def test_the_entry_budget_drops_the_least_recently_clicked_items_lists() -> None:
    cv = CoVisitation(CoVisitConfig(window=1, max_entries=40))
    # 30 pairs clicked in turn: each pair adds 2 entries (a -> b and b -> a)
    rows = [{"item_id": f"b{k}", "hist_seq": [f"a{k}"]} for k in range(30)]
    cv.learn_many(rows, np.ones(30))
    assert cv.entries <= 40 and cv.evicted > 0
    assert cv.entries == sum(len(nb) for nb in cv.co.values())
    assert "b29" in cv.co and "a29" in cv.co  # the latest pair is kept
    assert "b0" not in cv.co and "a0" not in cv.co  # the oldest went first


def test_rrf_fuse_adds_weighted_reciprocal_ranks() -> None:
    a = np.array([[0, 1, 2], [2, 1, 0]])
    b = np.array([3, 2, 1])  # one list for every query
    fused = rrf_fuse([a, b], [1.0, 1.0], n_items=4, width=4, c=1.0)
    # query 0: item 2 gets 1/3 + 1/2, item 1 1/2 + 1/3 (a tie: item 1 is first in list a),
    # item 0 1/1, item 3 1/1 (a tie: item 0 is in list a)
    assert fused[0].tolist() == [0, 3, 1, 2]
    assert fused[1].tolist() == [2, 3, 1, 0]
    # a weight of 0 leaves the first list's order
    assert rrf_fuse([a, b], [1.0, 0.0], 4, 3)[:, :3].tolist() == a.tolist()
    with pytest.raises(ValueError, match="one weight per list"):
        rrf_fuse([a], [1.0, 2.0], 4, 3)


def test_evaluate_retrieval_adds_covisit_rows_picked_on_the_training_period() -> None:
    rows, y = paired_world(600, seed=1)
    model = TwoTowerModel(TwoTowerConfig(device="cpu", embedding_dim=8), seed=0)
    r = evaluate_retrieval(
        rows, y, model, batch_size=256, prior=ServingPrior(), covisit=CoVisitConfig()
    )
    recall = {name: m["recall_at_k"] for name, m in r["rows"].items()}
    assert {"covisit", "covisit_fused", "model_fused"} <= set(recall)
    # half the test clicks are partners of the last click: co-visitation finds them
    assert recall["covisit"] > recall["popularity"] + 0.1
    assert recall["covisit_fused"] >= recall["covisit"] - 0.02
    assert r["fusion"]["validation_clicks"] > 0
    assert set(r["fusion"]["validation"]["model_fused"]) and set(r["fusion"]["picks"]) == {
        "covisit_fused",
        "model_fused",
    }
