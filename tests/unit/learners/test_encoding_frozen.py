"""Serving cannot change the model: encoder slots are frozen at inference, and new field
names from the stream are admitted by a count threshold under a cap (issue 19)."""

from __future__ import annotations

import copy
import threading

import numpy as np
import pytest

from index.faiss_index import IndexConfig, IndexHolder, build_snapshot
from learners.calibration import PlattCalibrator
from learners.encoding import EncoderConfig, FeatureEncoder, frozen_fields
from learners.ranker import RankerConfig, TorchRanker
from learners.two_tower import TwoTowerConfig, TwoTowerModel
from serving.recommender import Recommender
from stream.settings import Settings

ENC = EncoderConfig(num_buckets=1 << 12, max_cat_fields=6, max_num_fields=2)
ITEMS = [f"i{j}" for j in range(50)]


def rows(n: int, seed: int = 0) -> list[dict[str, object]]:
    rng = np.random.default_rng(seed)
    return [
        {"user_id": f"u{rng.integers(20)}", "item_id": ITEMS[rng.integers(50)], "position": 1}
        for _ in range(n)
    ]


def junk_context(k: int) -> dict[str, object]:
    return {f"junk{k}_{j}": ("x" if j % 2 else float(j)) for j in range(8)}


def test_frozen_encoding_assigns_no_slot_and_counts_unknown_fields() -> None:
    enc = FeatureEncoder(ENC)
    enc.encode([{"user_id": "u", "item_id": "i", "device": "ios"}])
    before = copy.deepcopy(enc.state_dict())
    with frozen_fields():
        batch = enc.encode([{"user_id": "u", "item_id": "i", "device": "ios", "evil": "x",
                             "evil_num": 3.0}])  # fmt: skip
    assert enc.state_dict() == before
    assert enc.n_unknown_fields == 2
    assert np.count_nonzero(batch.cat[0]) == 3 and not batch.num.any()  # known fields only
    enc.encode([{"evil": "x"}])  # learning again outside the context
    assert "evil" in enc.cat_fields


def test_frozen_is_per_thread_so_training_beside_serving_still_learns_fields() -> None:
    enc = FeatureEncoder(ENC)
    inside, go = threading.Event(), threading.Event()

    def serve() -> None:
        with frozen_fields():
            inside.set()
            go.wait(5)
            enc.encode([{"served_only": "x"}])

    t = threading.Thread(target=serve)
    t.start()
    inside.wait(5)
    enc.encode([{"trained": "y"}])  # this thread is not frozen
    go.set()
    t.join(5)
    assert "trained" in enc.cat_fields and "served_only" not in enc.cat_fields


def test_two_hundred_score_requests_with_junk_context_leave_the_ranker_unchanged() -> None:
    cfg = RankerConfig(model="dcnv2", device="cpu", encoder=ENC, embedding_dim=8, hidden=(16,),
                       cross_layers=1)  # fmt: skip
    ranker = TorchRanker(cfg, seed=0, online=False)
    ranker.learn_many(rows(256), np.zeros(256))
    holder = IndexHolder()
    holder.swap(build_snapshot(ITEMS, ranker.item_vectors(ITEMS), version=1,
                               config=IndexConfig(kind="flat")))  # fmt: skip
    rec = Recommender(holder, lambda: ranker, lambda: (PlattCalibrator(), 0))
    before = copy.deepcopy(ranker.encoder.state_dict())
    for k in range(200):
        rec.score("u1", ITEMS[:5], junk_context(k))
    rec.recommend("u1", 5, junk_context(999))
    assert ranker.encoder.state_dict() == before  # was: 1,600 junk names, slots filled
    assert ranker.encoder.n_unknown_fields >= 200
    # the real feature still gets its slot when the stream brings it
    ranker.learn_many([{**r, "device": "ios"} for r in rows(64)], np.zeros(64))
    assert "device" in ranker.encoder.cat_fields


def test_two_tower_vectors_and_scores_assign_no_slots() -> None:
    cfg = TwoTowerConfig(
        embedding_dim=8, hidden=(16,), device="cpu",
        user_encoder=EncoderConfig(num_buckets=1 << 10, max_cat_fields=4, max_num_fields=2),
        item_encoder=EncoderConfig(num_buckets=1 << 10, max_cat_fields=4, max_num_fields=2),
    )  # fmt: skip
    tt = TwoTowerModel(cfg, seed=0)
    tt.learn_many(rows(64), np.ones(64))
    before = (copy.deepcopy(tt.user_encoder.state_dict()),
              copy.deepcopy(tt.item_encoder.state_dict()))  # fmt: skip
    tt.user_vectors([{"user_id": "u1", **junk_context(1)}])
    tt.predict_proba_many([{**r, **junk_context(2)} for r in rows(4)])
    after = (tt.user_encoder.state_dict(), tt.item_encoder.state_dict())
    assert after == before


def test_new_field_names_are_admitted_after_the_count_threshold() -> None:
    enc = FeatureEncoder(EncoderConfig(num_buckets=1 << 10, admit_after=3))
    enc.encode([{"device": "ios"}, {"device": "web"}])
    assert "device" not in enc.cat_fields and enc.n_rejected_fields == 2
    enc.encode([{"device": "ios"}])
    assert "device" in enc.cat_fields


def test_candidates_and_remembered_dropped_names_are_capped() -> None:
    enc = FeatureEncoder(EncoderConfig(num_buckets=1 << 10, max_cat_fields=4, admit_after=2,
                                       max_candidates=10))  # fmt: skip
    enc.encode([{f"junk{j}": "x"} for j in range(5000)])  # each seen once: none admitted
    assert enc.cat_fields == ["user_id", "item_id"]
    assert len(enc._candidates) == 10 and enc.n_rejected_fields == 5000
    # with admission at once, names past full slots are remembered (dropped) up to the cap
    enc = FeatureEncoder(EncoderConfig(num_buckets=1 << 10, max_cat_fields=4, max_candidates=10))
    enc.encode([{f"junk{j:05d}": "x"} for j in range(5000)])
    state = enc.state_dict()
    assert len(state["cat_slots"]) == 4 + 10  # was 5,000 names in every checkpoint
    assert enc.cat_fields == ["user_id", "item_id", "junk00000", "junk00001"]


def test_the_worker_admits_new_fields_after_a_threshold_by_default() -> None:
    assert Settings().ranker.encoder.admit_after > 1
    with pytest.raises(ValueError, match="admit_after"):
        EncoderConfig(admit_after=0)
