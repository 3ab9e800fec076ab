"""Vectors, recall and query timing that the index benchmarks share (:mod:`bench.index`,
:mod:`bench.index_scale`, :mod:`bench.serving_batching`).

:func:`clustered` draws the seeded clustered unit vectors both index sweeps search,
:func:`recall` compares retrieved ids with exact ones, :func:`search_latency` times
single-query ``IndexSnapshot.search`` calls and :func:`percentiles_ms` summarises wall
times; :func:`threads` pins torch and FAISS to ``n`` threads for a block.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import faiss
import numpy as np
import torch

from index.faiss_index import IndexSnapshot

__all__ = ["N_CENTERS", "clustered", "percentiles_ms", "recall", "search_latency", "threads"]

N_CENTERS = 1_000


@contextmanager
def threads(n: int) -> Iterator[None]:
    """Run with ``n`` torch intra-op and FAISS OpenMP threads, then restore both."""
    before = torch.get_num_threads(), faiss.omp_get_max_threads()
    torch.set_num_threads(n)
    faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before[0])
        faiss.omp_set_num_threads(before[1])


def clustered(n: int, dim: int, seed: int) -> np.ndarray:
    """(n, dim) float32 unit vectors: a random one of ``N_CENTERS`` centres plus N(0, 1)."""
    rng = np.random.default_rng(seed)
    centers = np.random.default_rng(12345).standard_normal((N_CENTERS, dim)).astype(np.float32)
    x = centers[rng.integers(0, N_CENTERS, n)]
    x += rng.standard_normal((n, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def recall(got: np.ndarray, want: np.ndarray) -> float:
    """Share of the ids in ``want`` (queries, k) that ``got`` (queries, k') also holds."""
    hits = sum(len(set(a) & set(b)) for a, b in zip(got.tolist(), want.tolist(), strict=True))
    return hits / want.size


def percentiles_ms(seconds: list[float]) -> dict[str, float]:
    """``p50_ms`` and ``p99_ms`` of wall times given in seconds."""
    ms = 1e3 * np.asarray(seconds)
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99))}


def search_latency(snap: IndexSnapshot, queries: np.ndarray, k: int) -> dict[str, float]:
    """:func:`percentiles_ms` of ``snap.search`` one query (row of ``queries``) at a time,
    top ``k``, with one thread."""
    times = []
    with threads(1):
        for q in queries:
            t = time.perf_counter()
            snap.search(q[None, :], k)
            times.append(time.perf_counter() - t)
    return percentiles_ms(times)
