"""Immutable, versioned FAISS snapshots of item vectors and an atomic holder for serving.

Item vectors are L2-normalised and searched by inner product, so scores are cosine
similarities in ``[-1, 1]`` (0 for a zero vector). A refresh builds a new snapshot off to the
side and swaps it in; readers never see a half-built index.

The index kind follows the catalogue size (``IndexConfig.kind="auto"``): exact flat inner
product up to ``exact_max_items`` items, an approximate index above (``auto_approx``: IVF-flat
by default, or HNSW). :func:`verify_snapshot` checks a built snapshot (size, unit norms,
recall@k of its search against exact search on a seeded sample of queries), and
:meth:`IndexHolder.swap_if_valid` swaps in only a snapshot that passes. The settings
(:class:`IndexConfig`) and the FAISS index factory live in :mod:`index.faiss_factory`.
"""

from __future__ import annotations

import math
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import faiss
import numpy as np
import numpy.typing as npt

from index.faiss_factory import IndexConfig, kind_of, make_index, normalize_rows

__all__ = [
    "IndexConfig",
    "IndexHolder",
    "IndexSnapshot",
    "SnapshotCheck",
    "build_snapshot",
    "verify_snapshot",
]

_VERIFY_CHUNK = 65_536  # vectors read back per step of verify_snapshot


@dataclass(frozen=True)
class IndexSnapshot:
    """A built, immutable index: ``ids`` (N,) object array of item ids, ``index`` over the
    L2-normalised (N, dim) vectors, ``built_at`` in epoch seconds, and the ``config`` it was
    built with (its verification settings are the defaults of :func:`verify_snapshot`).

    >>> import numpy as np
    >>> snap = build_snapshot(["a", "b", "c"], np.eye(3, dtype=np.float32), version=1)
    >>> scores, ids = snap.search(np.array([[0.0, 2.0, 0.1]], dtype=np.float32), k=5)
    >>> ids.tolist(), scores.shape, len(snap), snap.kind
    ([['b', 'c', 'a']], (1, 3), 3, 'flat')
    """

    version: int
    ids: np.ndarray  # (N,) object/str
    index: faiss.Index
    dim: int
    built_at: float  # epoch s
    config: IndexConfig = field(default_factory=IndexConfig)

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    @property
    def kind(self) -> str:
        """The FAISS index kind: "flat", "hnsw" or "ivf"."""
        return kind_of(self.index)

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
        normalize_rows(q)
        scores, labels = self._search_labels(q, min(k, len(self)))
        missing = labels < 0
        ids = self.ids[np.where(missing, 0, labels)]
        if missing.any():
            ids[missing] = None
            scores[missing] = -np.inf
        return scores, ids

    def _search_labels(
        self, q: npt.NDArray[np.float32], kk: int
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
        """FAISS search of normalised queries: scores (Q, kk) and int labels (-1: none)."""
        if isinstance(self.index, faiss.IndexHNSW):
            # Per-call parameters: setting efSearch on the shared index would race readers.
            params = faiss.SearchParametersHNSW()  # type: ignore[attr-defined]  # not in stubs
            params.efSearch = max(int(self.index.hnsw.efSearch), kk)
            scores, labels = self.index.search(q, kk, params=params)
        else:
            scores, labels = self.index.search(q, kk)
        return scores, labels


def build_snapshot(
    ids: Sequence[str],
    vectors: npt.ArrayLike,
    *,
    version: int,
    config: IndexConfig | None = None,
) -> IndexSnapshot:
    """Build an :class:`IndexSnapshot` over ``vectors`` (N, D) for items ``ids`` (N,).

    Normalises a float32 copy (the input is never mutated; zero vectors stay zero and score
    0 against everything). The kind is ``config.resolve_kind(N)``. Raises ValueError on
    empty input, length mismatch, non-2-D or non-finite vectors, or duplicate ids.
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
    normalize_rows(vecs)
    index = make_index(vecs, cfg)
    id_arr = np.empty(len(id_list), dtype=object)
    id_arr[:] = id_list
    return IndexSnapshot(
        version=version,
        ids=id_arr,
        index=index,
        dim=int(vecs.shape[1]),
        built_at=time.time(),
        config=cfg,
    )


@dataclass(frozen=True)
class SnapshotCheck:
    """What :func:`verify_snapshot` found. ``ok`` is True when every check passed.

    Attributes:
        version: the snapshot's version.
        ok: size, norms and recall all passed.
        n_items: ``len(snapshot)``.
        size_ok: the FAISS index holds exactly one vector of the snapshot's ``dim`` per id.
        norm_checked: vectors whose norm was read back (every one when the index allows).
        max_norm_error: largest ``| ||v|| - 1 |`` seen (``inf`` for a non-finite vector).
        recall: mean recall@``k`` of the snapshot's search against exact search, in [0, 1]
            (NaN when it could not be measured).
        k: the ``k`` of the recall check.
        n_queries: queries used for the recall check.
        reasons: why it failed, one short line per failed check (empty when ``ok``).
        seconds: wall time of the check.
    """

    version: int
    ok: bool
    n_items: int
    size_ok: bool
    norm_checked: int
    max_norm_error: float
    recall: float
    k: int
    n_queries: int
    reasons: tuple[str, ...]
    seconds: float


def _read_vectors(index: faiss.Index, start: int, n: int) -> npt.NDArray[np.float32]:
    return np.asarray(index.reconstruct_n(start, n), dtype=np.float32).reshape(n, -1)


def verify_snapshot(
    snapshot: IndexSnapshot,
    sample: int | None = None,
    *,
    k: int | None = None,
    min_recall: float | None = None,
    seed: int | None = None,
) -> SnapshotCheck:
    """Check ``snapshot`` before it serves; arguments left as None come from
    ``snapshot.config`` (``verify_queries``, ``verify_k``, ``min_recall``, ``seed``).

    Checks, reading every stored vector back in chunks (O(N·D) memory per chunk only):

    - size: the FAISS index holds ``len(snapshot.ids)`` vectors of dimension ``dim`` and
      the ids are distinct;
    - norms: every vector has norm within ``config.norm_tolerance`` of 1 (zero or
      non-finite vectors fail);
    - recall: ``sample`` queries (stored vectors of seeded random items plus Gaussian noise
      of norm ~0.5, then normalised) are searched with :meth:`IndexSnapshot.search`; recall
      @``k`` against exact inner-product search over the stored vectors must be at least
      ``min_recall``. Exact search costs ``sample * N * D`` multiply-adds.

    >>> import numpy as np
    >>> vecs = np.random.default_rng(0).standard_normal((500, 8))
    >>> snap = build_snapshot([str(i) for i in range(500)], vecs, version=1)
    >>> check = verify_snapshot(snap, sample=50)
    >>> check.ok, check.size_ok, check.recall, check.reasons
    (True, True, 1.0, ())
    """
    t0 = time.perf_counter()
    cfg = snapshot.config
    n_queries = cfg.verify_queries if sample is None else sample
    k = cfg.verify_k if k is None else k
    min_recall = cfg.min_recall if min_recall is None else min_recall
    seed = cfg.seed if seed is None else seed
    if n_queries < 1 or k < 1:
        raise ValueError(f"sample and k must be >= 1, got {n_queries}, {k}")
    index = snapshot.index
    n = len(snapshot)
    reasons: list[str] = []

    size_ok = int(index.ntotal) == n and int(index.d) == snapshot.dim and n > 0
    if not size_ok:
        reasons.append(
            f"size: index holds {int(index.ntotal)} vectors of dim {int(index.d)}, "
            f"snapshot has {n} ids of dim {snapshot.dim}"
        )
    elif len(set(snapshot.ids.tolist())) != n:
        size_ok = False
        reasons.append("size: duplicate ids")

    max_err = math.nan
    norm_checked = 0
    recall = math.nan
    kk = min(k, n)
    n_q = 0
    if size_ok:
        rng = np.random.default_rng(seed)
        q_items = rng.choice(n, size=min(n_queries, n), replace=False)
        n_q = len(q_items)
        try:
            base = np.stack([np.asarray(index.reconstruct(int(i)), np.float32) for i in q_items])
        except RuntimeError as exc:  # e.g. an IVF index without a direct map
            reasons.append(f"vectors: cannot read stored vectors back ({str(exc)[:80]})")
            base = None
        if base is not None:
            noise = rng.standard_normal(base.shape).astype(np.float32)
            queries = np.nan_to_num(base) + noise * (0.5 / math.sqrt(snapshot.dim))
            normalize_rows(queries)
            best_s = np.full((n_q, kk), -np.inf, dtype=np.float32)
            best_i = np.full((n_q, kk), -1, dtype=np.int64)
            max_err = 0.0
            for start in range(0, n, _VERIFY_CHUNK):
                m = min(_VERIFY_CHUNK, n - start)
                x = _read_vectors(index, start, m)
                err = np.abs(np.linalg.norm(x.astype(np.float64), axis=1) - 1.0)
                max_err = max(max_err, float(np.max(np.where(np.isfinite(err), err, np.inf))))
                norm_checked += m
                sims = queries @ np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0).T
                cand_s = np.concatenate([best_s, sims], axis=1)
                cand_i = np.concatenate(
                    [best_i, np.broadcast_to(np.arange(start, start + m), sims.shape)], axis=1
                )
                top = np.argpartition(-cand_s, kk - 1, axis=1)[:, :kk]
                best_s = np.take_along_axis(cand_s, top, axis=1)
                best_i = np.take_along_axis(cand_i, top, axis=1)
            if max_err > cfg.norm_tolerance:
                reasons.append(f"norms: max | ||v|| - 1 | = {max_err:.3g} > {cfg.norm_tolerance:g}")
            _, got = snapshot._search_labels(queries, kk)
            hits = sum(
                len(set(a.tolist()) & set(b.tolist())) for a, b in zip(got, best_i, strict=True)
            )
            recall = hits / (n_q * kk)
            if recall < min_recall:
                reasons.append(f"recall@{kk}: {recall:.3f} < {min_recall:g}")
    return SnapshotCheck(
        version=snapshot.version,
        ok=not reasons,
        n_items=n,
        size_ok=size_ok,
        norm_checked=norm_checked,
        max_norm_error=max_err,
        recall=recall,
        k=kk,
        n_queries=n_q,
        reasons=tuple(reasons),
        seconds=time.perf_counter() - t0,
    )


class IndexHolder:
    """Holds the serving :class:`IndexSnapshot`; swaps are atomic reference replacements.

    ``n_swaps`` counts swaps; ``n_rejected`` counts snapshots :meth:`swap_if_valid`
    refused, and ``last_check`` is its latest :class:`SnapshotCheck`.

    >>> import numpy as np
    >>> holder = IndexHolder()
    >>> holder.swap(build_snapshot(["a", "b"], np.eye(2), version=1)) is None
    True
    >>> old = holder.swap(build_snapshot(["a", "b", "c"], np.eye(3)[:, :2], version=2))
    >>> old.version, holder.current.version, holder.n_swaps
    (1, 2, 2)
    >>> holder.search(np.array([[1.0, 0.0]]), k=1)[1].tolist()
    [['a']]
    >>> bad = build_snapshot(["a", "b", "c"], np.eye(3)[:, :2], version=3)  # a zero vector
    >>> holder.swap_if_valid(bad).reasons
    ('norms: max | ||v|| - 1 | = 1 > 0.001',)
    >>> holder.current.version, holder.n_rejected
    (2, 1)
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._current: IndexSnapshot | None = None
        self.n_swaps = 0
        self.n_rejected = 0
        self.last_check: SnapshotCheck | None = None

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

    def swap_if_valid(
        self,
        snapshot: IndexSnapshot,
        sample: int | None = None,
        *,
        min_recall: float | None = None,
    ) -> SnapshotCheck:
        """Verify ``snapshot`` (:func:`verify_snapshot`, outside the lock; readers keep
        searching the current one meanwhile), then swap it in atomically if it passed.

        A failed check, or a version not newer than the current one at swap time, leaves the
        current snapshot serving, increments ``n_rejected`` and returns a check with
        ``ok=False`` (a stale version adds a ``version:`` reason). Returns the check.
        """
        check = verify_snapshot(snapshot, sample, min_recall=min_recall)
        if check.ok:
            with self._lock:
                old = self._current
                if old is not None and snapshot.version <= old.version:
                    check = _failed(
                        check, f"version: {snapshot.version} is not newer than {old.version}"
                    )
                else:
                    self._current = snapshot
                    self.n_swaps += 1
        if not check.ok:
            self.n_rejected += 1
        self.last_check = check
        return check

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


def _failed(check: SnapshotCheck, reason: str) -> SnapshotCheck:
    return replace(check, ok=False, reasons=(*check.reasons, reason))
