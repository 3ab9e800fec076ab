"""Memory diagnostics of a worker process: periodic ``malloc_trim`` and opt-in tracemalloc.

- :class:`MallocTrimmer` calls glibc's ``malloc_trim(0)`` (:func:`stream.heap.trim_heap`)
  every ``interval_s`` seconds on a daemon thread, beside the trims after each background
  write: freed pages of every arena go back to the OS. Setting ``memory_trim_s`` (0: off).
- :class:`TracemallocDumper` (environment ``STREAMREC_TRACEMALLOC=<dir>``, optional
  ``STREAMREC_TRACEMALLOC_EVERY_S``, default 60) starts :mod:`tracemalloc` (10 frames) and
  every interval writes ``<dir>/tm_<n>_<seconds>s.txt``: the traced total and the top 40
  differences by traceback against the first snapshot (taken after the first interval,
  once the worker is warm). Off (no thread, no tracing, no cost) when the variable is
  unset. Tracing slows allocation-heavy code ~2x: a diagnostic, not for production.
- :class:`Census` (``STREAMREC_CENSUS=<dir>``, ``STREAMREC_CENSUS_EVERY_S``, default 60)
  appends one JSON line a interval to ``<dir>/census.jsonl`` (:func:`census`): the live
  objects by type and the bytes of the torch tensors among them, which tracemalloc does
  not see (torch allocates outside Python's allocator; numpy reports its arrays to
  tracemalloc, and the collector does not track them). It walks every
  object the garbage collector tracks (~0.1-1 s holding the GIL): a diagnostic too.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import sys
import threading
import time
import tracemalloc
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from stream.heap import malloc_totals, trim_heap

__all__ = [
    "Census",
    "HeapGauges",
    "MallocTrimmer",
    "TracemallocDumper",
    "census",
    "census_from_env",
    "tracemalloc_from_env",
]

log = logging.getLogger(__name__)

CENSUS_ENV = "STREAMREC_CENSUS"
CENSUS_EVERY_ENV = "STREAMREC_CENSUS_EVERY_S"
TRACEMALLOC_ENV = "STREAMREC_TRACEMALLOC"
TRACEMALLOC_EVERY_ENV = "STREAMREC_TRACEMALLOC_EVERY_S"
TOP_N = 40
FRAMES = 10


class _Periodic(threading.Thread):
    def __init__(self, interval_s: float, name: str) -> None:
        super().__init__(name=name, daemon=True)
        if not interval_s > 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        self.interval_s = interval_s
        self.stop_event = threading.Event()

    #: tick once as soon as the thread starts, not only after the first interval
    tick_at_start = False

    def tick(self) -> None:
        raise NotImplementedError

    def run(self) -> None:
        if self.tick_at_start:
            self._safe_tick()
        while not self.stop_event.wait(self.interval_s):
            self._safe_tick()

    def _safe_tick(self) -> None:
        try:
            self.tick()
        except Exception:  # a diagnostic must never take the worker down
            log.exception("%s failed", self.name)

    def stop(self) -> None:
        self.stop_event.set()


class MallocTrimmer(_Periodic):
    """Call :func:`stream.heap.trim_heap` every ``interval_s`` seconds; ``trims`` counts
    the calls (the writer thread also trims after each checkpoint and store version)."""

    def __init__(self, interval_s: float) -> None:
        super().__init__(interval_s, "malloc-trim")
        self.trims = 0

    def tick(self) -> None:
        trim_heap()
        self.trims += 1


class HeapGauges(_Periodic):
    """Set ``malloc_bytes{kind}`` (a :class:`monitoring.metrics.StreamrecMetrics` gauge)
    from :func:`stream.heap.malloc_totals` every ``interval_s`` seconds, on this thread:
    ``mallinfo2`` walks the free chunks (milliseconds on a fragmented heap of a few hundred
    MB), off the event loop. Does nothing where the C library has no ``mallinfo2``."""

    tick_at_start = True  # a scrape soon after the start sees the gauges

    def __init__(self, gauge: Any, interval_s: float = 60.0) -> None:
        super().__init__(interval_s, "heap-gauges")
        self.gauge = gauge
        self.reads = 0

    def tick(self) -> None:
        heap = malloc_totals()
        if heap is None:
            return
        for kind, mb in heap.items():
            self.gauge.labels(kind=kind).set(mb * 1e6)
        self.reads += 1


class TracemallocDumper(_Periodic):
    """Trace Python allocations; every ``interval_s`` write the top differences by
    traceback against the first snapshot to ``out_dir/tm_<n>_<elapsed seconds>s.txt``."""

    def __init__(self, out_dir: Path, interval_s: float = 60.0) -> None:
        super().__init__(interval_s, "tracemalloc-dump")
        self.out_dir = out_dir
        self.t0 = time.monotonic()
        self.base: tracemalloc.Snapshot | None = None
        self.dumps = 0

    def start(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if not tracemalloc.is_tracing():
            tracemalloc.start(FRAMES)
        super().start()

    def tick(self) -> None:
        snap = tracemalloc.take_snapshot().filter_traces(
            [tracemalloc.Filter(False, tracemalloc.__file__)]
        )
        elapsed = int(time.monotonic() - self.t0)
        current, peak = tracemalloc.get_traced_memory()
        lines = [f"t_s {elapsed} traced_mb {current / 1e6:.1f} peak_mb {peak / 1e6:.1f}"]
        if self.base is None:
            self.base = snap
            stats = snap.statistics("traceback")[:TOP_N]
            lines.append("baseline: top allocations by traceback")
            for s in stats:
                lines.append(f"\n{s.size / 1e6:.2f} MB in {s.count} blocks")
                lines.extend("  " + ln for ln in s.traceback.format())
        else:
            diffs = snap.compare_to(self.base, "traceback")[:TOP_N]
            lines.append("top differences against the baseline, by traceback")
            for d in diffs:
                lines.append(f"\n{d.size_diff / 1e6:+.2f} MB ({d.size / 1e6:.2f} MB now),"
                             f" {d.count_diff:+d} blocks")  # fmt: skip
                lines.extend("  " + ln for ln in d.traceback.format())
        path = self.out_dir / f"tm_{self.dumps:04d}_{elapsed:06d}s.txt"
        path.write_text("\n".join(lines) + "\n")
        self.dumps += 1


_P = TypeVar("_P", bound=_Periodic)


def _start_from_env(
    env: dict[str, str] | None,
    dir_key: str,
    every_key: str,
    make: Callable[[Path, float], _P],
    what: str,
) -> _P | None:
    """``make(folder, every_s)`` started, if ``env[dir_key]`` (default: the process's
    environment) names a folder (``every_s``: ``env[every_key]``, default 60); else None."""
    env = dict(os.environ) if env is None else env
    out = env.get(dir_key, "")
    if not out:
        return None
    thread = make(Path(out), float(env.get(every_key, "60")))
    thread.start()
    log.warning("%s on: every %gs to %s", what, thread.interval_s, out)
    return thread


def tracemalloc_from_env(env: dict[str, str] | None = None) -> TracemallocDumper | None:
    """A started :class:`TracemallocDumper` if ``STREAMREC_TRACEMALLOC`` names a folder,
    else None (nothing started)."""
    return _start_from_env(
        env, TRACEMALLOC_ENV, TRACEMALLOC_EVERY_ENV, TracemallocDumper, "tracemalloc snapshots"
    )


def _rss_mb() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def census(top: int = 25) -> dict[str, Any]:
    """Live objects the garbage collector tracks: ``types`` (the ``top`` most common type
    names and their counts), ``objects``; ``torch_tensor_mb`` / ``torch_tensors``: bytes
    (MB) of the distinct storages of live tensors (parameters, optimiser state, buffers)
    and how many tensors; ``rss_mb``: the process's RSS at the time; ``malloc_<kind>_mb``:
    :func:`stream.heap.malloc_totals` (glibc's arenas, in use, free, mmapped)."""
    counts: Counter[str] = Counter()
    torch = sys.modules.get("torch")
    storages: dict[int, int] = {}
    n_tensors = 0
    objs = gc.get_objects()
    for o in objs:
        t = type(o)
        counts[t.__qualname__] += 1
        if torch is not None and issubclass(t, torch.Tensor):  # type, not __class__: no lazy attrs
            n_tensors += 1
            try:
                st = o.untyped_storage()
                storages[st.data_ptr()] = max(storages.get(st.data_ptr(), 0), st.nbytes())
            except Exception:  # sparse, meta or otherwise storage-less tensors
                continue
    del objs
    heap = malloc_totals()
    return {
        "objects": sum(counts.values()),
        "types": dict(counts.most_common(top)),
        "torch_tensor_mb": round(sum(storages.values()) / 1e6, 2),
        "torch_tensors": n_tensors,
        "rss_mb": round(_rss_mb(), 1),
        **({f"malloc_{k}_mb": round(v, 1) for k, v in heap.items()} if heap else {}),
    }


class Census(_Periodic):
    """Append :func:`census` as one JSON line every ``interval_s`` to
    ``out_dir/census.jsonl`` (with ``t_s``, seconds since start, and tracemalloc's traced
    MB when it traces)."""

    def __init__(self, out_dir: Path, interval_s: float = 60.0) -> None:
        super().__init__(interval_s, "memory-census")
        self.out_dir = out_dir
        self.t0 = time.monotonic()
        self.rows = 0

    def start(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        super().start()

    def tick(self) -> None:
        row: dict[str, Any] = {"t_s": round(time.monotonic() - self.t0, 1)}
        if tracemalloc.is_tracing():
            row["traced_mb"] = round(tracemalloc.get_traced_memory()[0] / 1e6, 2)
        row |= census()
        with open(self.out_dir / "census.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        self.rows += 1


def census_from_env(env: dict[str, str] | None = None) -> Census | None:
    """A started :class:`Census` if ``STREAMREC_CENSUS`` names a folder, else None."""
    return _start_from_env(env, CENSUS_ENV, CENSUS_EVERY_ENV, Census, "memory census")
