"""Micro-batching of concurrent :meth:`serving.recommender.Recommender.recommend` calls
(:class:`RequestBatcher`): one FAISS search and one ranker call for every request that
arrives within a few milliseconds (``bench.serving_batching`` measures the gain)."""

from __future__ import annotations

import math
import queue
import threading
import time
from collections.abc import Mapping
from concurrent.futures import Future
from typing import Any

from serving.recommender import Recommender, recommend_many
from serving.requests import Request, ServingError

__all__ = ["RequestBatcher"]


class RequestBatcher:
    """Micro-batches concurrent :meth:`Recommender.recommend` calls: requests submitted
    from any thread queue up; one worker thread takes the first waiting request, gathers
    more for at most ``max_wait_s`` (or until ``max_batch``), answers them all with
    :func:`recommend_many` (one FAISS search, one ranker call) and completes each future.

    ``n_batches`` / ``n_requests`` / ``max_seen`` count what it did. A web view awaits
    ``asyncio.wrap_future(batcher.submit(...))``; :meth:`recommend` blocks instead.

    Example:
        >>> from index.faiss_index import IndexHolder, build_snapshot
        >>> from learners.calibration import PlattCalibrator
        >>> from learners.encoding import EncoderConfig
        >>> from learners.ranker import RankerConfig, TorchRanker
        >>> ranker = TorchRanker(RankerConfig(model="logreg", device="cpu",
        ...                      encoder=EncoderConfig(num_buckets=256)), seed=0)
        >>> items = [f"i{j}" for j in range(20)]
        >>> holder = IndexHolder()
        >>> _ = holder.swap(build_snapshot(items, ranker.item_vectors(items), version=1))
        >>> rec = Recommender(holder, lambda: ranker, lambda: (PlattCalibrator(), 0))
        >>> batcher = RequestBatcher(rec, max_batch=8, max_wait_s=0.001)
        >>> len(batcher.recommend("u1", 3)["items"]), batcher.n_requests
        (3, 1)
        >>> batcher.close()
    """

    def __init__(
        self, recommender: Recommender, max_batch: int = 32, max_wait_s: float = 0.002
    ) -> None:
        if max_batch < 1 or not (math.isfinite(max_wait_s) and max_wait_s >= 0):
            raise ValueError(
                f"need max_batch >= 1 and max_wait_s >= 0, got {max_batch}, {max_wait_s}"
            )
        self.recommender = recommender
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.n_batches = 0
        self.n_requests = 0
        self.max_seen = 0
        self._queue: queue.SimpleQueue[tuple[Request, Future[dict[str, Any]]] | None] = (
            queue.SimpleQueue()
        )
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="streamrec-batcher", daemon=True)
        self._thread.start()

    def submit(
        self, user_id: str, k: int, context: Mapping[str, Any] | None = None
    ) -> Future[dict[str, Any]]:
        """Queue one request; the future holds its answer or its :class:`ServingError`."""
        if self._closed:
            raise RuntimeError("the batcher is closed")
        fut: Future[dict[str, Any]] = Future()
        self._queue.put(((user_id, k, context), fut))
        return fut

    def recommend(
        self, user_id: str, k: int, context: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        """:meth:`submit` and wait for the answer (raises its :class:`ServingError`)."""
        return self.submit(user_id, k, context).result()

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            deadline = time.perf_counter() + self.max_wait_s
            stop = False
            while len(batch) < self.max_batch:
                try:
                    nxt = self._queue.get(timeout=max(0.0, deadline - time.perf_counter()))
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                batch.append(nxt)
            self._answer(batch)
            if stop:
                return

    def _answer(self, batch: list[tuple[Request, Future[dict[str, Any]]]]) -> None:
        self.n_batches += 1
        self.n_requests += len(batch)
        self.max_seen = max(self.max_seen, len(batch))
        try:
            answers = recommend_many(self.recommender, [r for r, _ in batch])
        except Exception as exc:  # noqa: BLE001 - a model failure fails its batch, not the thread
            for _, fut in batch:
                fut.set_exception(exc)
            return
        for (_, fut), answer in zip(batch, answers, strict=True):
            if isinstance(answer, ServingError):
                fut.set_exception(answer)
            else:
                fut.set_result(answer)

    def close(self) -> None:
        """Answer what is queued, then stop the worker thread."""
        if not self._closed:
            self._closed = True
            self._queue.put(None)
            self._thread.join(timeout=5.0)
