from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from index.faiss_index import IndexConfig, IndexHolder, build_snapshot
from learners.calibration import Calibrator, PlattCalibrator
from learners.encoding import EncoderConfig
from learners.ranker import RankerConfig, TorchRanker
from learners.two_tower import TwoTowerConfig, TwoTowerModel
from logs.events import Impression, example_row
from serving.recommender import Recommender, ServingConfig, ServingError
from stream.gate import ServingGate

ENC = EncoderConfig(num_buckets=1 << 12, max_cat_fields=6, max_num_fields=2)
ITEMS = [f"i{j}" for j in range(300)]


def trained_ranker(seed: int = 0, steps: int = 20) -> TorchRanker:
    cfg = RankerConfig(
        model="dcnv2", device="cpu", encoder=ENC, embedding_dim=8, hidden=(16,), cross_layers=1
    )
    ranker = TorchRanker(cfg, seed=seed, online=False)
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        rows = [
            {"user_id": f"u{rng.integers(50)}", "item_id": ITEMS[rng.integers(300)],
             "position": int(rng.integers(1, 4)), "ctx_device": str(rng.choice(["ios", "web"]))}
            for _ in range(128)
        ]  # fmt: skip
        y = np.array(
            [r["ctx_device"] == "ios" and str(r["item_id"]) < "i15" for r in rows],
            dtype=np.float64,
        )
        ranker.learn_many(rows, y)
    return ranker


class Live:
    """The mutable objects a worker would swap underneath the recommender."""

    def __init__(self) -> None:
        self.ranker = trained_ranker()
        self.calibrator: Calibrator = PlattCalibrator(1.2, -0.3)
        self.calibrator_version = 4
        self.holder = IndexHolder()
        self.holder.swap(
            build_snapshot(
                ITEMS, self.ranker.item_vectors(ITEMS), version=7, config=IndexConfig(kind="flat")
            )
        )

    def recommender(self, **kw: Any) -> Recommender:
        return Recommender(
            self.holder,
            lambda: self.ranker,
            lambda: (self.calibrator, self.calibrator_version),
            **kw,
        )


@pytest.fixture
def live() -> Live:
    return Live()


def test_recommend_ranks_retrieved_candidates_by_calibrated_pctr(live: Live) -> None:
    rec = live.recommender(config=ServingConfig(candidates=50))
    out = rec.recommend("u3", k=10, context={"ctx_device": "ios"})

    snap = live.holder.current
    assert snap is not None
    scores, ids = snap.search(live.ranker.user_vectors(["u3"]), 50)
    candidates = ids[0].tolist()
    imp = [Impression("x", 1.7e9, "u3", it, 1, {"ctx_device": "ios"}) for it in candidates]
    p_raw = live.ranker.predict_proba_many([example_row(i) for i in imp])
    p = live.calibrator.transform(p_raw)
    want = [candidates[j] for j in np.argsort(-p, kind="stable")[:10]]

    got = [it["item_id"] for it in out["items"]]
    assert got == want
    by_id = dict(zip(candidates, zip(p, p_raw, scores[0], strict=True), strict=True))
    for it in out["items"]:
        cal, raw, retrieval = by_id[it["item_id"]]
        assert it["score"] == pytest.approx(cal) and it["p_raw"] == pytest.approx(raw)
        assert it["retrieval_score"] == pytest.approx(float(retrieval), abs=1e-6)
    assert [it["score"] for it in out["items"]] == sorted(
        (it["score"] for it in out["items"]), reverse=True
    )
    assert out["index_version"] == 7 and out["calibrator_version"] == 4
    assert out["model_version"] == live.ranker.n_updates == 20
    assert out["retrieval_model"] == "ranker_embeddings" and out["candidates"] == 50
    assert set(out["timing_ms"]) == {"retrieve", "rank", "total"}


def test_candidates_are_at_least_k(live: Live) -> None:
    rec = live.recommender(config=ServingConfig(candidates=5))
    out = rec.recommend("u1", k=12)
    assert len(out["items"]) == 12 and out["candidates"] == 12
    small = Recommender(
        live.holder,
        lambda: live.ranker,
        lambda: (live.calibrator, 1),
        config=ServingConfig(candidates=1_000),
    )
    assert small.recommend("u1", k=3)["candidates"] == 300  # the whole catalogue


def test_live_objects_swapped_underneath_are_picked_up(live: Live) -> None:
    rec = live.recommender()
    first = rec.recommend("u1", k=5)
    live.ranker = trained_ranker(seed=1, steps=25)
    live.calibrator, live.calibrator_version = PlattCalibrator(0.5, 1.0), 5
    live.holder.swap(build_snapshot(ITEMS, live.ranker.item_vectors(ITEMS), version=8))
    second = rec.recommend("u1", k=5)
    assert (first["index_version"], second["index_version"]) == (7, 8)
    assert (first["model_version"], second["model_version"]) == (20, 25)
    assert second["calibrator_version"] == 5
    for it in second["items"]:
        assert it["score"] == pytest.approx(float(live.calibrator.transform([it["p_raw"]])[0]))


def test_two_tower_user_vectors_retrieve_from_a_two_tower_index(live: Live) -> None:
    cfg = TwoTowerConfig(device="cpu", embedding_dim=12, user_encoder=ENC, item_encoder=ENC)
    tower = TwoTowerModel(cfg, seed=0)
    rows = [{"user_id": f"u{j % 10}", "item_id": ITEMS[j % 40]} for j in range(400)]
    tower.learn_many(rows, np.ones(400))
    live.holder.swap(build_snapshot(ITEMS, tower.item_vectors(ITEMS), version=9))
    rec = live.recommender(user_vectors=tower.user_vectors, config=ServingConfig(candidates=20))
    out = rec.recommend("u2", k=5)
    _, ids = live.holder.search(tower.user_vectors(["u2"]), 20)
    assert out["retrieval_model"] == "two_tower" and out["index_version"] == 9
    assert {it["item_id"] for it in out["items"]} <= set(ids[0].tolist())


def test_user_vectors_that_do_not_fit_the_index_answer_503(live: Live) -> None:
    rec = live.recommender(user_vectors=lambda users: np.ones((len(users), 3), np.float32))
    with pytest.raises(ServingError) as err:
        rec.recommend("u1", k=5)
    assert err.value.status == 503 and "dim" in err.value.message


def test_no_index_yet_answers_503() -> None:
    ranker = trained_ranker(steps=1)
    rec = Recommender(IndexHolder(), lambda: ranker, lambda: (PlattCalibrator(), 0))
    with pytest.raises(ServingError) as err:
        rec.recommend("u1", k=5)
    assert err.value.status == 503 and "no index" in err.value.message
    # Scoring given candidates needs no index.
    out = rec.score("u1", ["i1", "i2"])
    assert out["index_version"] is None and len(out["items"]) == 2


@pytest.mark.parametrize("k", [0, -1, 101, 2.0, "5", True, None])
def test_k_outside_1_to_max_k_or_not_an_int_is_a_bad_request(live: Live, k: Any) -> None:
    with pytest.raises(ServingError) as err:
        live.recommender().recommend("u1", k=k)
    assert err.value.status == 400 and "k must be" in err.value.message


def test_k_limits_follow_the_config(live: Live) -> None:
    rec = live.recommender(config=ServingConfig(max_k=3))
    assert len(rec.recommend("u1", k=3)["items"]) == 3
    assert len(rec.recommend("u1", k=np.int64(2))["items"]) == 2  # type: ignore[arg-type]
    with pytest.raises(ServingError):
        rec.recommend("u1", k=4)


@pytest.mark.parametrize("user_id", ["", "x" * 257, None, 17])
def test_bad_user_ids_are_bad_requests(live: Live, user_id: Any) -> None:
    rec = live.recommender()
    for call in (lambda: rec.recommend(user_id, k=3), lambda: rec.score(user_id, ["i1"])):
        with pytest.raises(ServingError) as err:
            call()
        assert err.value.status == 400 and "user_id" in err.value.message
    assert rec.recommend("x" * 256, k=1)["user_id"] == "x" * 256


@pytest.mark.parametrize(
    "context",
    [
        ["ctx_device"],
        {"item_id": "i3"},
        {"position": 2},
        {"price": float("nan")},
        {"nested": {"a": 1}},
        {"flag": True},
        {"": "x"},
        {f"f{j}": 1.0 for j in range(65)},
    ],
)
def test_bad_context_is_a_bad_request(live: Live, context: Any) -> None:
    with pytest.raises(ServingError) as err:
        live.recommender().recommend("u1", k=3, context=context)
    assert err.value.status == 400


def test_score_returns_calibrated_pctr_of_the_given_items_in_order(live: Live) -> None:
    rec = live.recommender()
    items = ["i200", "i3", "i17"]
    out = rec.score("u5", items, context={"ctx_device": "ios"})
    rows = [{"ctx_device": "ios", "user_id": "u5", "item_id": it, "position": 1} for it in items]
    p = live.calibrator.transform(live.ranker.predict_proba_many(rows))
    assert [it["item_id"] for it in out["items"]] == items
    np.testing.assert_allclose([it["score"] for it in out["items"]], p)
    assert out["index_version"] == 7 and out["calibrator_version"] == 4


@pytest.mark.parametrize(
    ("item_ids", "match"),
    [
        ([f"i{j}" for j in range(1_001)], "at most 1000"),
        ([], "empty"),
        ("i1", "list"),
        (["i1", 2], "strings"),
        (["i1", "x" * 257], "strings"),
        (["i1", ""], "strings"),
        (["i1", "i1"], "distinct"),
    ],
)
def test_bad_item_lists_are_bad_requests(live: Live, item_ids: Any, match: str) -> None:
    with pytest.raises(ServingError) as err:
        live.recommender().score("u1", item_ids)
    assert err.value.status == 400 and match in err.value.message


def test_a_full_candidate_list_is_accepted(live: Live) -> None:
    rec = live.recommender(config=ServingConfig(max_candidates=300))
    assert len(rec.score("u1", ITEMS)["items"]) == 300


def test_fewer_indexed_items_than_k_returns_what_there_is(live: Live) -> None:
    live.holder.swap(build_snapshot(ITEMS[:4], live.ranker.item_vectors(ITEMS[:4]), version=10))
    out = live.recommender().recommend("u1", k=10)
    assert len(out["items"]) == 4 and out["candidates"] == 4


def test_gate_runs_calls_off_the_event_loop_and_sheds_load_beyond_max_inflight() -> None:
    import asyncio
    import threading

    gate = ServingGate(threads=1, max_inflight=2)
    release = threading.Event()
    seen: list[str] = []

    def slow(tag: str) -> str:
        seen.append(threading.current_thread().name)
        release.wait(5)
        return tag

    async def main() -> tuple[list[object], int]:
        first = asyncio.ensure_future(gate.run(slow, "a"))
        second = asyncio.ensure_future(gate.run(slow, "b"))
        await asyncio.sleep(0.05)
        assert gate.inflight == 2
        with pytest.raises(ServingError) as exc:  # the third is refused at once
            await gate.run(slow, "c")
        refused = exc.value.status
        release.set()
        return list(await asyncio.gather(first, second)), refused

    try:
        results, refused = asyncio.run(main())
    finally:
        gate.close()
    assert results == ["a", "b"] and refused == 503
    assert gate.inflight == 0
    assert seen and all(name.startswith("streamrec-serving") for name in seen)


def test_gate_without_threads_runs_inline_and_propagates_errors() -> None:
    import asyncio
    import threading

    gate = ServingGate(threads=0, max_inflight=1)

    def boom() -> None:
        raise ServingError(400, "bad")

    async def main() -> str:
        with pytest.raises(ServingError, match="bad"):
            await gate.run(boom)
        assert gate.inflight == 0  # released after an error
        return await gate.run(lambda: threading.current_thread().name)

    assert asyncio.run(main()) == threading.main_thread().name
    with pytest.raises(ValueError, match="threads"):
        ServingGate(threads=-1, max_inflight=1)
    with pytest.raises(ValueError, match="threads"):
        ServingConfig(threads=-1)
    with pytest.raises(ValueError, match="max_inflight"):
        ServingConfig(max_inflight=0)


def test_fusion_ranks_the_fused_candidates_and_batches_answer_alike(live: Live) -> None:
    """With a :class:`FusedRetrieval`, the ranked candidates are the fusion's (the index's
    hits plus the items co-visited with the user's history and the recent favourites),
    each with its fusion score; ``recommend_many`` answers each request as ``recommend``."""
    from learners.retrieval_fusion import FusedRetrieval, FusionConfig
    from serving.recommender import recommend_many

    fusion = FusedRetrieval(FusionConfig(width=10))
    # i250..i259 co-visited with i1 (the history a client brings); i299 the favourite
    fusion.learn_many([{"item_id": f"i{250 + j}", "hist_seq": ["i1"]} for j in range(10)]
                      + [{"item_id": "i299"}] * 30, np.ones(40))  # fmt: skip
    ctx = {"ctx_device": "ios", "hist_seq": "i1"}
    rec = live.recommender(config=ServingConfig(candidates=10), fusion=lambda: fusion)
    plain = live.recommender(config=ServingConfig(candidates=10))
    out = rec.recommend("u3", k=10, context=ctx)
    hits = {it["item_id"] for it in plain.recommend("u3", k=10, context=ctx)["items"]}
    assert out["candidates"] == 10
    got = {it["item_id"] for it in out["items"]}
    assert got - hits  # fused items the index alone did not retrieve
    assert got <= hits | {f"i{250 + j}" for j in range(10)} | {"i299"}
    assert out["fusion"] == fusion.setting and plain.recommend("u3", k=1)["fusion"] is None
    rrf = [it["retrieval_score"] for it in out["items"]]
    assert all(0 <= r < 1 for r in rrf)  # reciprocal-rank sums, not cosines
    wide = live.recommender(config=ServingConfig(candidates=250), fusion=lambda: fusion)
    assert wide.recommend("u3", k=10, context=ctx)["candidates"] == 250  # padded from the hits
    batch = recommend_many(rec, [("u3", 10, ctx), ("u4", 3, {}), ("u3", 10, ctx)])
    for a in (batch[0], batch[2]):
        assert isinstance(a, dict) and a["items"] == out["items"]
    assert isinstance(batch[1], dict) and len(batch[1]["items"]) == 3
