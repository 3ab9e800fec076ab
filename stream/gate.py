"""The web views' admission gate: the recommender's calls run off the event loop, at most
``max_inflight`` at once (HTTP wiring, so it lives in ``stream``; the serving logic it
runs is the plain library :mod:`serving`)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

from serving.batching import Answer, RequestBatcher
from serving.recommender import ServingError

__all__ = ["ServingGate"]

T = TypeVar("T")


class ServingGate:
    """Runs the recommender's calls for the web views: on ``threads`` threads off the
    event loop (inline when 0), at most ``max_inflight`` at once (one more raises
    :class:`ServingError` 503 without waiting).

    The threads read the live ranker, calibrator and index while the trainer updates them
    on the loop: the models have no dropout or batch norm, the index is swapped
    atomically, and a forward pass that overlaps an optimiser step sees a mix of the two
    weight versions, as asynchronous (Hogwild-style) serving does.
    """

    def __init__(self, threads: int, max_inflight: int) -> None:
        if threads < 0 or max_inflight < 1:
            raise ValueError(
                f"need threads >= 0 and max_inflight >= 1, got {threads}, {max_inflight}"
            )
        self.max_inflight = max_inflight
        self.inflight = 0
        self._executor = (
            ThreadPoolExecutor(threads, thread_name_prefix="streamrec-serving") if threads else None
        )

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)``, off the loop when the gate has threads."""
        with self._slot():
            if self._executor is None:
                return fn(*args)
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._executor, functools.partial(fn, *args))

    async def run_future(self, submit: Callable[..., Future[T]], *args: Any) -> T:
        """The answer of ``submit(*args)`` (e.g. :meth:`RequestBatcher.submit`, which
        computes on its own thread), under the same ``max_inflight`` bound as :meth:`run`."""
        with self._slot():
            return await asyncio.wrap_future(submit(*args))

    async def run_batched(self, batcher: RequestBatcher, *request: Any) -> dict[str, Any]:
        """The answer of ``request`` (``user_id, k, context``) from ``batcher``, under the
        same ``max_inflight`` bound as :meth:`run`: the batcher hands a batch's answers
        to this loop in one ``call_soon_threadsafe`` (one wake-up per batch, where a thread
        future per request, :meth:`run_future`, costs one each)."""
        with self._slot():
            loop = asyncio.get_running_loop()
            fut: asyncio.Future[dict[str, Any]] = loop.create_future()
            batcher.submit_to(
                (request[0], request[1], request[2]),
                functools.partial(_settle, fut),
                loop.call_soon_threadsafe,
            )
            return await fut

    @contextlib.contextmanager
    def _slot(self) -> Iterator[None]:
        """One of ``max_inflight`` places for a request; :class:`ServingError` 503 when
        none is free (at once, no queueing)."""
        if self.inflight >= self.max_inflight:
            raise ServingError(
                503, f"overloaded: {self.max_inflight} requests in flight; retry shortly"
            )
        self.inflight += 1
        try:
            yield
        finally:
            self.inflight -= 1

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)


def _settle(fut: asyncio.Future[dict[str, Any]], answer: Answer) -> None:
    """Complete ``fut`` on its loop, unless its awaiter has gone (cancelled)."""
    if fut.done():
        return
    if isinstance(answer, BaseException):
        fut.set_exception(answer)
    else:
        fut.set_result(answer)
