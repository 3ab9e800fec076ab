"""Micro-batching of concurrent :meth:`serving.recommender.Recommender.recommend` calls
(:class:`RequestBatcher`): one FAISS search and one ranker call for every request that
arrives within a few milliseconds (``bench.serving_batching`` measures the gain)."""

from __future__ import annotations

import collections
import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from typing import Any

from serving.recommender import Recommender, recommend_many
from serving.requests import Request

__all__ = ["Answer", "RequestBatcher", "Settle", "Via"]

Answer = dict[str, Any] | BaseException
"""A request's answer, or the exception (a :class:`ServingError`) it fails with."""
Settle = Callable[[Answer], None]
"""Hands one request its answer."""
log = logging.getLogger(__name__)

Via = Callable[[Callable[[list[tuple[Settle, Answer]]], None], list[tuple[Settle, Answer]]], Any]
"""How a batch's answers are handed over: ``via(fn, pairs)`` makes ``fn(pairs)`` run, e.g.
an event loop's ``call_soon_threadsafe``."""


class RequestBatcher:
    """Micro-batches concurrent :meth:`Recommender.recommend` calls: requests submitted
    from any thread queue up; one worker thread takes the first waiting request, gathers
    more for at most ``max_wait_s`` (or until ``max_batch``), answers them all with
    :func:`recommend_many` (one FAISS search, one ranker call) and completes each future.

    With ``adaptive_wait`` it stops waiting once the batch holds as many requests as the
    largest of the last ``WINDOW`` batches (what is already queued is still taken, up to
    ``max_batch``): under a steady number of concurrent clients the batch is complete when
    they have all arrived, and waiting out ``max_wait_s`` would only add latency.

    ``n_batches`` / ``n_requests`` / ``max_seen`` count what it did. :meth:`submit` returns
    a thread future, :meth:`recommend` blocks, and :meth:`submit_to` hands a batch's
    answers over in one call per ``via`` (a web view's event loop is woken once per batch,
    not once per request: :meth:`stream.gate.ServingGate.run_batched`).

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

    WINDOW = 16

    def __init__(
        self,
        recommender: Recommender,
        max_batch: int = 32,
        max_wait_s: float = 0.002,
        adaptive_wait: bool = True,
    ) -> None:
        if max_batch < 1 or not (math.isfinite(max_wait_s) and max_wait_s >= 0):
            raise ValueError(
                f"need max_batch >= 1 and max_wait_s >= 0, got {max_batch}, {max_wait_s}"
            )
        self.recommender = recommender
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.adaptive_wait = adaptive_wait
        #: sizes of the last WINDOW batches (adaptive_wait)
        self._recent: collections.deque[int] = collections.deque(maxlen=self.WINDOW)
        self.n_batches = 0
        self.n_requests = 0
        self.max_seen = 0
        self._queue: queue.SimpleQueue[tuple[Request, Settle, Via | None] | None] = (
            queue.SimpleQueue()
        )
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="streamrec-batcher", daemon=True)
        self._thread.start()

    def submit(
        self, user_id: str, k: int, context: Mapping[str, Any] | None = None
    ) -> Future[dict[str, Any]]:
        """Queue one request; the future holds its answer or its :class:`ServingError`."""
        fut: Future[dict[str, Any]] = Future()
        self.submit_to((user_id, k, context), lambda answer: _set(fut, answer))
        return fut

    def submit_to(self, request: Request, settle: Settle, via: Via | None = None) -> None:
        """Queue ``request``; once its batch is computed, ``settle(answer)`` runs: called
        directly on the batcher thread when ``via`` is None, else through
        ``via(fn, pairs)``, called once per distinct ``via`` in the batch with all of that
        batch's ``(settle, answer)`` pairs for it."""
        if self._closed:
            raise RuntimeError("the batcher is closed")
        self._queue.put((request, settle, via))

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
            # with adaptive_wait: no waiting once as many as recently came together are in
            expect = max(self._recent, default=self.max_batch) if self.adaptive_wait else None
            while len(batch) < self.max_batch:
                try:
                    if expect is not None and len(batch) >= expect:
                        nxt = self._queue.get_nowait()
                    else:
                        nxt = self._queue.get(timeout=max(0.0, deadline - time.perf_counter()))
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                batch.append(nxt)
            self._recent.append(len(batch))
            self._answer(batch)
            if stop:
                return

    def _answer(self, batch: list[tuple[Request, Settle, Via | None]]) -> None:
        self.n_batches += 1
        self.n_requests += len(batch)
        self.max_seen = max(self.max_seen, len(batch))
        answers: list[Answer]
        try:
            answers = list(recommend_many(self.recommender, [r for r, _, _ in batch]))
        except Exception as exc:  # noqa: BLE001 - a model failure fails its batch, not the thread
            answers = [exc] * len(batch)
        grouped: dict[Via, list[tuple[Settle, Answer]]] = {}
        for (_, settle, via), answer in zip(batch, answers, strict=True):
            if via is None:
                _settle_all([(settle, answer)])
            else:
                grouped.setdefault(via, []).append((settle, answer))
        for via, pairs in grouped.items():
            try:
                via(_settle_all, pairs)
            except Exception:  # noqa: BLE001 - e.g. its event loop closed: nobody is waiting
                log.debug("a batch's answers could not be handed over", exc_info=True)

    def close(self) -> None:
        """Answer what is queued, then stop the worker thread."""
        if not self._closed:
            self._closed = True
            self._queue.put(None)
            self._thread.join(timeout=5.0)


def _settle_all(pairs: list[tuple[Settle, Answer]]) -> None:
    for settle, answer in pairs:
        settle(answer)


def _set(fut: Future[dict[str, Any]], answer: Answer) -> None:
    """Complete a thread future with its answer, unless it was cancelled."""
    if fut.done():
        return
    if isinstance(answer, BaseException):
        fut.set_exception(answer)
    else:
        fut.set_result(answer)
