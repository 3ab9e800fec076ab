"""Immutable, versioned FAISS snapshots of item vectors and an atomic holder for serving.

Item vectors are L2-normalised and searched by inner product, so scores are cosine
similarities in ``[-1, 1]`` (0 for a zero vector). A refresh builds a new snapshot off to the
side and swaps it in; readers never see a half-built index.
"""

from __future__ import annotations

import math
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import faiss
import numpy as np
import numpy.typing as npt

__all__ = ["IndexConfig", "IndexHolder", "IndexSnapshot", "build_snapshot"]

_KINDS = ("auto", "flat", "hnsw", "ivf")


@dataclass(frozen=True)
class IndexConfig:
    """How :func:`build_snapshot` builds the FAISS index.

    Attributes:
        kind: "auto" (flat up to ``flat_max_items`` items, HNSW above), "flat", "hnsw", "ivf".
        flat_max_items: largest catalogue "auto" serves with exact search.
        hnsw_m: HNSW graph degree.
        hnsw_ef_search: HNSW search beam (raised to ``k`` per query when ``k`` is larger).
        ivf_nlist: IVF cells; None means ~4·sqrt(N), capped at N/39 so k-means has enough
            points per centroid.
        ivf_nprobe: IVF cells visited per query.
    """

    kind: str = "auto"  # "auto" | "flat" | "hnsw" | "ivf"
    flat_max_items: int = 50_000
    hnsw_m: int = 32
    hnsw_ef_search: int = 64
    ivf_nlist: int | None = None  # None → ~4*sqrt(N)
    ivf_nprobe: int = 16


def _normalize(x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """L2-normalise rows of ``x`` in place (zero rows stay zero) and return it."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    np.divide(x, norms, out=x, where=norms > 0)
    return x


@dataclass(frozen=True)
class IndexSnapshot:
    """A built, immutable index: ``ids`` (N,) object array of item ids, ``index`` over the
    L2-normalised (N, dim) vectors, ``built_at`` in epoch seconds.

    >>> import numpy as np
    >>> snap = build_snapshot(["a", "b", "c"], np.eye(3, dtype=np.float32), version=1)
    >>> scores, ids = snap.search(np.array([[0.0, 2.0, 0.1]], dtype=np.float32), k=5)
    >>> ids.tolist(), scores.shape, len(snap)
    ([['b', 'c', 'a']], (1, 3), 3)
    """

    version: int
    ids: np.ndarray  # (N,) object/str
    index: faiss.Index
    dim: int
    built_at: float  # epoch s

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def search(
        self, queries: npt.ArrayLike, k: int
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.object_]]:
        """Top-``k`` items per query by cosine similarity.

        Args:
            queries: (Q, dim) float; normalised on a copy, never modified.
            k: results per query (>= 1); at most ``len(self)`` columns are returned.

        Returns:
            ``scores`` (Q, min(k, N)) float32, descending per row, and ``ids`` (Q, min(k, N))
            object. Where an approximate index finds fewer than ``k`` results, the missing
            slots hold id ``None`` and score ``-inf`` (never the FAISS ``-1``).
        """
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        q = np.array(queries, dtype=np.float32, copy=True, order="C")
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ValueError(f"queries must have shape (Q, {self.dim}), got {q.shape}")
        if not np.all(np.isfinite(q)):
            raise ValueError("queries must be finite")
        _normalize(q)
        kk = min(k, len(self))
        if isinstance(self.index, faiss.IndexHNSW):
            # Per-call parameters: setting efSearch on the shared index would race readers.
            params = faiss.SearchParametersHNSW()  # type: ignore[attr-defined]  # not in stubs
            params.efSearch = max(int(self.index.hnsw.efSearch), kk)
            scores, labels = self.index.search(q, kk, params=params)
        else:
            scores, labels = self.index.search(q, kk)
        missing = labels < 0
        ids = self.ids[np.where(missing, 0, labels)]
        if missing.any():
            ids[missing] = None
            scores[missing] = -np.inf
        return scores, ids


def _make_index(vectors: npt.NDArray[np.float32], config: IndexConfig) -> faiss.Index:
    n, d = vectors.shape
    kind = config.kind
    if kind == "auto":
        kind = "flat" if n <= config.flat_max_items else "hnsw"
    if kind == "flat":
        index: faiss.Index = faiss.IndexFlatIP(d)
    elif kind == "hnsw":
        hnsw = faiss.IndexHNSWFlat(d, config.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        hnsw.hnsw.efSearch = config.hnsw_ef_search
        index = hnsw
    elif kind == "ivf":
        nlist = config.ivf_nlist
        if nlist is None:
            nlist = min(round(4 * math.sqrt(n)), n // 39)
        nlist = max(1, min(nlist, n))
        quantizer = faiss.IndexFlatIP(d)
        ivf = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
        ivf.train(vectors)
        ivf.nprobe = min(config.ivf_nprobe, nlist)
        index = ivf  # faiss's Python wrapper keeps the quantizer alive via the IVF index
    else:
        raise ValueError(f"IndexConfig.kind must be one of {_KINDS}, got {config.kind!r}")
    index.add(vectors)
    return index


def build_snapshot(
    ids: Sequence[str],
    vectors: npt.ArrayLike,
    *,
    version: int,
    config: IndexConfig | None = None,
) -> IndexSnapshot:
    """Build an :class:`IndexSnapshot` over ``vectors`` (N, D) for items ``ids`` (N,).

    Normalises a float32 copy (the input is never mutated; zero vectors stay zero and score
    0 against everything). Raises ValueError on empty input, length mismatch, non-2-D or
    non-finite vectors, or duplicate ids.
    """
    cfg = config if config is not None else IndexConfig()
    id_list = list(ids)
    vecs = np.array(vectors, dtype=np.float32, copy=True, order="C")
    if len(id_list) == 0:
        raise ValueError("cannot build an index from zero items")
    if vecs.ndim != 2 or vecs.shape[1] == 0:
        raise ValueError(f"vectors must have shape (N, D) with D >= 1, got {vecs.shape}")
    if vecs.shape[0] != len(id_list):
        raise ValueError(f"got {len(id_list)} ids but {vecs.shape[0]} vectors")
    if not np.all(np.isfinite(vecs)):
        raise ValueError("vectors contain NaN or infinite values")
    if len(set(id_list)) != len(id_list):
        dups = sorted(str(i) for i, c in Counter(id_list).items() if c > 1)
        raise ValueError(f"duplicate item ids: {dups[:10]}")
    _normalize(vecs)
    index = _make_index(vecs, cfg)
    id_arr = np.empty(len(id_list), dtype=object)
    id_arr[:] = id_list
    return IndexSnapshot(
        version=version, ids=id_arr, index=index, dim=int(vecs.shape[1]), built_at=time.time()
    )


class IndexHolder:
    """Holds the serving :class:`IndexSnapshot`; swaps are atomic reference replacements.

    >>> import numpy as np
    >>> holder = IndexHolder()
    >>> holder.swap(build_snapshot(["a", "b"], np.eye(2), version=1)) is None
    True
    >>> old = holder.swap(build_snapshot(["a", "b", "c"], np.eye(3)[:, :2], version=2))
    >>> old.version, holder.current.version, holder.n_swaps
    (1, 2, 2)
    >>> holder.search(np.array([[1.0, 0.0]]), k=1)[1].tolist()
    [['a']]
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._current: IndexSnapshot | None = None
        self.n_swaps = 0

    @property
    def current(self) -> IndexSnapshot | None:
        """The serving snapshot, or None before the first swap."""
        return self._current

    def swap(self, snapshot: IndexSnapshot) -> IndexSnapshot | None:
        """Make ``snapshot`` current and return the previous one (None if there was none).

        Raises ValueError unless ``snapshot.version`` is greater than the current version.
        """
        with self._lock:
            old = self._current
            if old is not None and snapshot.version <= old.version:
                raise ValueError(
                    f"snapshot version {snapshot.version} is not newer than {old.version}"
                )
            self._current = snapshot
            self.n_swaps += 1
            return old

    def search(
        self, queries: npt.ArrayLike, k: int
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.object_]]:
        """:meth:`IndexSnapshot.search` on the current snapshot, read once.

        Raises RuntimeError before the first swap.
        """
        snap = self._current
        if snap is None:
            raise RuntimeError("no index snapshot has been swapped in yet")
        return snap.search(queries, k)
