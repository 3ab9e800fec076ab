"""Micro-batched serving: ``recommend_many`` answers as ``recommend`` does, and the
``RequestBatcher`` gathers concurrent requests into one FAISS search and one ranker call."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import pytest

from index.faiss_index import IndexHolder
from serving.batching import RequestBatcher
from serving.recommender import ServingError, recommend_many
from tests.unit.serving.test_recommender import Live


@pytest.fixture
def live() -> Live:
    return Live()


def _same(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert [i["item_id"] for i in a["items"]] == [i["item_id"] for i in b["items"]]
    np.testing.assert_allclose([i["score"] for i in a["items"]], [i["score"] for i in b["items"]])
    for key in ("user_id", "index_version", "model_version", "calibrator_version", "candidates"):
        assert a[key] == b[key]


def test_recommend_many_answers_like_recommend_and_a_bad_request_fails_alone(live: Live) -> None:
    rec = live.recommender()
    requests: list[Any] = [
        ("u1", 5, {"ctx_device": "ios"}),
        ("u2", 10, None),
        ("u3", 0, None),  # bad k
        ("u1", 3, {"ctx_device": "web"}),
        ("", 3, None),  # bad user
    ]
    out = recommend_many(rec, requests)
    assert isinstance(out[2], ServingError) and out[2].status == 400
    assert isinstance(out[4], ServingError) and out[4].status == 400
    for j in (0, 1, 3):
        got = out[j]
        assert isinstance(got, dict) and got["timing_ms"]["batch"] == len(requests)
        user, k, ctx = requests[j]
        assert len(got["items"]) == k
        _same(got, rec.recommend(user, k, ctx))
    calls: list[int] = []
    ranker = live.ranker
    real = ranker.predict_proba_many

    def counting(rows: Any) -> Any:
        calls.append(len(rows))
        return real(rows)

    ranker.predict_proba_many = counting  # type: ignore[method-assign,assignment]
    recommend_many(rec, [("u1", 5, None), ("u2", 5, None)])
    assert calls == [2 * rec.config.candidates]  # one ranker call for both requests


def test_recommend_many_without_an_index_fails_every_request_with_503(live: Live) -> None:
    live.holder = IndexHolder()
    out = recommend_many(live.recommender(), [("u1", 5, None), ("u2", 5, None)])
    assert all(isinstance(o, ServingError) and o.status == 503 for o in out)


def test_batcher_gathers_concurrent_requests_and_answers_each_correctly(live: Live) -> None:
    rec = live.recommender()
    batcher = RequestBatcher(rec, max_batch=16, max_wait_s=0.02)
    n = 48
    results: list[Any] = [None] * n
    start = threading.Barrier(n)

    def client(j: int) -> None:
        start.wait()
        try:
            results[j] = batcher.recommend(f"u{j % 7}", 1 + j % 10, {"ctx_device": "ios"})
        except ServingError as exc:
            results[j] = exc

    threads = [threading.Thread(target=client, args=(j,)) for j in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    bad = batcher.submit("u1", 0)
    with pytest.raises(ServingError, match="k must be"):
        bad.result(timeout=10)
    batcher.close()
    assert batcher.n_requests == n + 1
    assert batcher.n_batches < n and batcher.max_seen > 1 and batcher.max_seen <= 16
    for j, got in enumerate(results):
        assert isinstance(got, dict)
        _same(got, rec.recommend(f"u{j % 7}", 1 + j % 10, {"ctx_device": "ios"}))
    with pytest.raises(RuntimeError, match="closed"):
        batcher.submit("u1", 3)


def test_batcher_rejects_bad_settings(live: Live) -> None:
    with pytest.raises(ValueError):
        RequestBatcher(live.recommender(), max_batch=0)
    with pytest.raises(ValueError):
        RequestBatcher(live.recommender(), max_wait_s=-1.0)


def test_the_gate_answers_batched_requests_together_and_bounds_them(live: Live) -> None:
    """What the web view does: concurrent requests through ``ServingGate.run_future`` and
    one batcher are answered in fewer batches than requests, each as ``recommend`` would;
    a bad one fails alone with its status, and ``max_inflight`` still sheds load."""
    import asyncio

    from stream.gate import ServingGate

    rec = live.recommender()
    batcher = RequestBatcher(rec, max_batch=16, max_wait_s=0.02)
    gate = ServingGate(threads=0, max_inflight=12)

    async def main() -> list[Any]:
        calls = [gate.run_future(batcher.submit, f"u{j % 5}", 5, None) for j in range(10)]
        calls.append(gate.run_future(batcher.submit, "u1", 0, None))  # bad k
        return await asyncio.gather(*calls, return_exceptions=True)

    async def overload() -> int:
        blocked = [asyncio.ensure_future(gate.run_future(batcher.submit, "u1", 3, None))
                   for _ in range(12)]  # fmt: skip
        await asyncio.sleep(0)
        try:
            await gate.run_future(batcher.submit, "u2", 3, None)
        except ServingError as exc:
            status = exc.status
        else:
            status = 200
        await asyncio.gather(*blocked)
        return status

    try:
        out = asyncio.run(main())
        status = asyncio.run(overload())
    finally:
        batcher.close()
    good, bad = out[:10], out[10]
    assert isinstance(bad, ServingError) and bad.status == 400
    for j, answer in enumerate(good):
        assert isinstance(answer, dict)
        _same(answer, rec.recommend(f"u{j % 5}", 5))
    assert batcher.n_batches < batcher.n_requests and batcher.max_seen > 1
    assert status == 503 and gate.inflight == 0
