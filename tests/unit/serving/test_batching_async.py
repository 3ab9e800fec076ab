"""The web view's path into the batcher: ``ServingGate.run_batched`` awaits a batcher's
answer on an event loop, one loop wake-up per batch."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from serving.batching import RequestBatcher
from serving.recommender import ServingError
from stream.gate import ServingGate
from tests.unit.serving.test_batching import _same
from tests.unit.serving.test_recommender import Live


def test_awaited_requests_are_batched_and_answered_like_recommend() -> None:
    rec = Live().recommender()
    batcher = RequestBatcher(rec, max_batch=16, max_wait_s=0.02)
    gate = ServingGate(threads=0, max_inflight=12)
    wakeups = 0

    async def main() -> list[Any]:
        nonlocal wakeups
        loop = asyncio.get_running_loop()
        real = loop.call_soon_threadsafe

        def counting(*args: Any, **kwargs: Any) -> Any:
            nonlocal wakeups
            wakeups += 1
            return real(*args, **kwargs)

        loop.call_soon_threadsafe = counting  # type: ignore[method-assign]
        calls = [gate.run_batched(batcher, f"u{j % 5}", 1 + j % 7, None) for j in range(10)]
        calls.append(gate.run_batched(batcher, "u1", 0, None))  # bad k
        return await asyncio.gather(*calls, return_exceptions=True)

    try:
        out = asyncio.run(main())
    finally:
        batcher.close()
    assert isinstance(out[-1], ServingError) and out[-1].status == 400
    for j, got in enumerate(out[:-1]):
        assert isinstance(got, dict)
        _same(got, rec.recommend(f"u{j % 5}", 1 + j % 7, None))
    assert batcher.n_requests == 11 and batcher.n_batches < 11
    assert wakeups == batcher.n_batches  # one per batch, not one per request
    assert gate.inflight == 0


def test_a_cancelled_awaiter_does_not_stop_the_batcher() -> None:
    rec = Live().recommender()
    batcher = RequestBatcher(rec, max_batch=8, max_wait_s=0.05)
    gate = ServingGate(threads=0, max_inflight=4)

    async def main() -> dict[str, Any]:
        gone = asyncio.ensure_future(gate.run_batched(batcher, "u1", 3, None))
        await asyncio.sleep(0)
        gone.cancel()  # the client went away while its batch gathered
        with pytest.raises(asyncio.CancelledError):
            await gone
        return await gate.run_batched(batcher, "u2", 4, None)

    try:
        got = asyncio.run(main())
        again = batcher.recommend("u3", 2)  # the thread is still answering
    finally:
        batcher.close()
    _same(got, rec.recommend("u2", 4, None))
    assert len(again["items"]) == 2
    with pytest.raises(RuntimeError, match="closed"):
        asyncio.run(gate.run_batched(batcher, "u1", 3, None))
    assert gate.inflight == 0


def test_a_cancelled_thread_future_is_skipped() -> None:
    batcher = RequestBatcher(Live().recommender(), max_batch=8, max_wait_s=0.05)
    try:
        gone = batcher.submit("u1", 3)
        assert gone.cancel()  # not yet answered: its batch must not fail setting it
        after = batcher.submit("u2", 2).result(timeout=30)
    finally:
        batcher.close()
    assert len(after["items"]) == 2 and gone.cancelled()


@pytest.mark.parametrize("adaptive", [True, False])
def test_adaptive_wait_stops_once_as_many_as_recently_came_are_in(adaptive: bool) -> None:
    import time

    batcher = RequestBatcher(Live().recommender(), max_batch=8, max_wait_s=1.0,
                             adaptive_wait=adaptive)  # fmt: skip
    try:
        batcher.recommend("u1", 3)  # a batch of one: expect one at a time from now on
        first = batcher.submit("u2", 3)
        time.sleep(0.2)  # well inside max_wait_s
        second = batcher.submit("u3", 3)
        answers = [first.result(timeout=30), second.result(timeout=30)]
    finally:
        batcher.close()
    assert [len(a["items"]) for a in answers] == [3, 3]
    # adaptive: u2 is answered alone at once; otherwise it waits and u3 joins its batch
    assert batcher.n_batches == (3 if adaptive else 2)
    assert [a["timing_ms"]["batch"] for a in answers] == ([1, 1] if adaptive else [2, 2])
