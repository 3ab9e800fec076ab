"""Python's cyclic garbage collector in the worker: fewer, cheaper collections.

Measured in the worker (``python -m bench.e2e --n 50000``, one worker, Python 3.11;
``bench/results/gc_ab``): with Python's defaults (a young-generation collection every 700
net container allocations) the collector ran 5 full collections in the pipeline phase,
1.4-1.8 s of the worker's 15-20 s of CPU, the longest pausing every thread up to 0.5 s.
A full collection walks every tracked object, and most of them were made at start and
live as long as the process: torch, numba, Faust and the models (~350k objects; one full
collection of them alone took 150 ms here).

:func:`configure_collector` raises the young generation's threshold (most objects of a
batch die young: fewer of them survive into the older generations whose collections are
expensive) and, once the app is built, moves every object made so far into the permanent
generation (:func:`gc.freeze`), which no collection walks again. Reference counting still
frees everything that is not in a cycle at once; a cycle among the frozen start-up objects
would be kept. The models are not in one: a ranker replaced later (a replica loading a
store version, a warm start) is freed by reference counting alone (tested).

:class:`PauseRecorder` times every collection into ``streamrec_gc_pause_seconds`` (by
generation), so a latency spike can be told apart from a slow request.
"""

from __future__ import annotations

import gc
import time
from typing import Any

__all__ = ["PauseRecorder", "configure_collector"]


def configure_collector(gen0_threshold: int, freeze: bool) -> tuple[int, int, int]:
    """Set the young generation's threshold (``0``: leave Python's) and, with ``freeze``,
    collect once then freeze every object made so far. Returns the previous thresholds
    (for :func:`gc.set_threshold`, e.g. to restore them in a test)."""
    before = gc.get_threshold()
    if gen0_threshold < 0:
        raise ValueError(f"gen0_threshold must be >= 0, got {gen0_threshold}")
    if gen0_threshold:
        gc.set_threshold(gen0_threshold, before[1], before[2])
    if freeze:
        gc.collect()
        gc.freeze()
    return before


class PauseRecorder:
    """Observe the wall time of every garbage collection into ``histogram`` (a
    prometheus_client Histogram with a ``generation`` label), seconds.

    The collector calls back on the thread that triggered the collection, with the GIL
    held: one collection at a time, so one start time is enough.
    """

    def __init__(self, histogram: Any) -> None:
        self._children = [histogram.labels(generation=str(g)) for g in range(3)]
        self._start = 0.0

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self._children[info["generation"]].observe(time.perf_counter() - self._start)

    def install(self) -> None:
        """Start observing (idempotent)."""
        if self._callback not in gc.callbacks:
            gc.callbacks.append(self._callback)

    def remove(self) -> None:
        """Stop observing (idempotent)."""
        if self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)
