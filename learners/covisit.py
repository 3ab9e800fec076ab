"""Item-to-item co-visitation retrieval, learned from the stream, and rank fusion.

Item-based collaborative filtering ("people who clicked this also clicked", Sarwar et al.
2001; Linden et al. 2003), kept the way a stream can keep it exactly: each click on item
``b`` whose row carries the user's point-in-time behaviour sequence ``hist_seq`` (the
feature stage's: the user's earlier clicks, most recent first, nothing from the future)
counts one co-visit of ``b`` with each distinct item among the first ``window`` items of
that sequence, both ways; a click on an item already in that window (a repeat) counts
only as a click of ``b``, so clicking the same items in turn grows no pair, and a user
counts a pair once (:class:`PairMemory`: a bot cannot grow a pair by clicking the two
items near each other again and again). A query row with history ``h_0, h_1, ...``
scores a candidate ``c`` by

    sum_j  co(h_j, c) / ((1 + j) * (sqrt(n(h_j) * n(c)) + shrink))

(``n``: the clicks of an item; the ``1 / (1 + j)`` weight favours the latest clicks;
``shrink`` damps pairs seen a few times). A row without a known history item scores
nothing, so its list is the fill order given (popularity).

:func:`rrf_fuse` merges ranked candidate lists by weighted reciprocal rank fusion
(Cormack et al. 2009): ``sum_l w_l / (c + rank_l(i))``, which needs no common scale
between the sources (cosines, co-visit scores, counts).

Memory: each item keeps at most ``max_neighbours`` co-visited items; past twice that, the
least co-visited are dropped (counted in ``pruned``), so the counts of rare pairs are
approximate. All lists together hold at most ``max_entries`` entries (~52 bytes each,
tracemalloc on the MovieLens dev log); past it the lists of the least recently clicked
items are dropped (``evicted``). The MovieLens dev log's training period makes 871k
entries in 0.6 s.

>>> cv = CoVisitation(CoVisitConfig(window=2, shrink=0.0))
>>> rows = [{"item_id": "b", "hist_seq": ["a"]}, {"item_id": "c", "hist_seq": ["b", "a"]}]
>>> cv.learn_many(rows, [1, 1])
>>> catalogue = ["a", "b", "c", "d"]
>>> cv.top([{"hist_seq": ["b"]}, {}], catalogue, 3, fill=np.array([3, 0, 1, 2])).tolist()
[[0, 2, 3], [3, 0, 1]]
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from hashlib import blake2b
from typing import Any

import numpy as np

from learners.base import Rows

__all__ = ["CoVisitConfig", "CoVisitation", "PairMemory", "history_items", "rrf_fuse"]


@dataclass(frozen=True)
class CoVisitConfig:
    """``window``: how many of a click's history items it co-visits (and how many of a
    query's history items score). ``shrink`` >= 0: added to the normaliser. ``max_neighbours``:
    co-visited items kept per item (the least co-visited are dropped past twice it).
    ``max_entries``: the budget on co-visited entries over all items (about 100 bytes
    each): past it, the lists of the least recently clicked items are dropped until 90%
    of it is left (counted in ``evicted``). ``max_items``: the items whose clicks are
    counted; past it the least recently clicked tenth is forgotten, counts and list
    (counted in ``forgotten``), so a stream of ever new item ids stays bounded.
    ``pair_memory``: slots (a power of two; 0: off) of :class:`PairMemory`, which counts a
    pair once per user (8 bytes each: 4M slots, 32 MiB)."""

    window: int = 20
    shrink: float = 10.0
    max_neighbours: int = 500
    max_entries: int = 2_000_000
    max_items: int = 1_000_000
    pair_memory: int = 1 << 22

    def __post_init__(self) -> None:
        if min(self.window, self.max_neighbours, self.max_entries, self.max_items) < 1:
            raise ValueError("window, max_neighbours, max_entries and max_items must be >= 1")
        m = self.pair_memory
        if m < 0 or (m and (m < 1024 or m & (m - 1))):
            raise ValueError(f"pair_memory must be 0 or a power of two >= 1024, got {m}")
        if not (math.isfinite(self.shrink) and self.shrink >= 0):
            raise ValueError(f"shrink must be finite and >= 0, got {self.shrink}")


def history_items(row: Mapping[str, object]) -> list[str]:
    """The items of a row's ``hist_seq`` (most recent first) as strings; [] without one."""
    hist = row.get("hist_seq")
    return [str(i) for i in hist] if isinstance(hist, list | tuple | np.ndarray) else []


class PairMemory:
    """Which ``(user, item pair)`` co-visits were counted already, so one user counts a pair
    once however often it clicks the two items near each other: a fixed table of ``slots``
    64-bit fingerprints (blake2b of the user and the unordered pair), a pair's slot given
    by its fingerprint's low bits. A pair whose slot another pair took since is counted
    again (forgotten: at ~20 pairs a click, 4M slots hold a pair for ~100k clicks); a
    wrong "counted" needs two pairs with equal 64-bit fingerprints. Not in snapshots: a
    restarted counter starts empty."""

    def __init__(self, slots: int) -> None:
        self.table = np.zeros(slots, dtype=np.uint64)  # calloc'd: pages appear when used
        self.mask = np.uint64(slots - 1)
        self.repeated = 0  # pairs not counted again

    def fresh(self, user: str, b: str, items: Sequence[str]) -> list[bool]:
        """Per item ``a`` of ``items`` (N,): whether ``user`` co-visits ``(a, b)`` for the
        first time (remembered now)."""
        fps = np.fromiter(
            (int.from_bytes(blake2b(f"{user}\x1f{min(a, b)}\x1f{max(a, b)}".encode(),
                                    digest_size=8).digest(), "little") or 1
             for a in items),
            dtype=np.uint64, count=len(items),
        )  # fmt: skip
        slot = (fps & self.mask).astype(np.intp)
        seen = self.table[slot] == fps
        self.table[slot] = fps
        self.repeated += int(seen.sum())
        return (~seen).tolist()


class CoVisitation:
    """Co-visitation counts over clicked rows (see the module docstring); state inside."""

    def __init__(self, config: CoVisitConfig | None = None) -> None:
        self.config = config or CoVisitConfig()
        self.co: dict[str, dict[str, float]] = {}
        #: item -> its clicks, in order of its latest click (least recent first)
        self.clicks: dict[str, float] = {}
        self.entries = 0  # co-visited entries over all items
        self.pruned = 0
        self.evicted = 0
        self.forgotten = 0
        m = self.config.pair_memory
        self.pairs: PairMemory | None = PairMemory(m) if m else None
        self._csr: tuple[tuple[str, ...], np.ndarray, np.ndarray, np.ndarray] | None = None

    def learn_many(self, X: Rows, y: Any) -> None:
        """Count the clicks of ``X`` (labels ``y`` (N,), > 0 = clicked) in order. A
        history item repeated within a click's window counts once, and a click
        on an item already in its own window (a repeat, e.g. a user clicking the same
        items in turn) adds no co-visits, only the item's click: one user cannot grow a
        pair by clicking it over and over."""
        window, cap = self.config.window, self.config.max_neighbours
        co, clicks = self.co, self.clicks
        for row, label in zip(X, np.asarray(y, dtype=np.float64).reshape(-1).tolist(),
                              strict=True):  # fmt: skip
            item = row.get("item_id")
            if label <= 0 or item is None:
                continue
            b = str(item)
            clicks[b] = clicks.pop(b, 0.0) + 1.0  # re-inserted: the most recent now
            hist = list(dict.fromkeys(history_items(row)[:window]))
            if not hist or b in hist:  # a repeat: its co-visits were counted before
                continue
            user = row.get("user_id")
            if self.pairs is not None and user is not None:  # once per user and pair
                hist = [a for a, new in zip(hist, self.pairs.fresh(str(user), b, hist),
                                            strict=True) if new]  # fmt: skip
                if not hist:
                    continue
            nb = co.setdefault(b, {})
            for a in hist:
                if a not in nb:
                    self.entries += 1
                nb[a] = nb.get(a, 0.0) + 1.0
                na = co.get(a)
                if na is None:
                    na = co[a] = {}
                    clicks.setdefault(a, 0.0)  # clicked before these counts began
                if b not in na:
                    self.entries += 1
                na[b] = na.get(b, 0.0) + 1.0
                if len(na) > 2 * cap:
                    self._prune(na)
            if len(nb) > 2 * cap:
                self._prune(nb)
            if self.entries > self.config.max_entries:
                self._evict()
        if len(clicks) > self.config.max_items:
            self._forget()
        self._csr = None

    def _forget(self) -> None:
        """Forget the least recently clicked items (counts and lists) down to 90% of
        ``max_items``; their entries in other items' lists stay until pruned."""
        drop = len(self.clicks) - int(0.9 * self.config.max_items)
        for item in list(self.clicks)[:drop]:
            del self.clicks[item]
            nb = self.co.pop(item, None)
            if nb is not None:
                self.entries -= len(nb)
            self.forgotten += 1

    def _prune(self, nb: dict[str, float]) -> None:
        keep = sorted(nb.items(), key=lambda kv: -kv[1])[: self.config.max_neighbours]
        self.pruned += len(nb) - len(keep)
        self.entries -= len(nb) - len(keep)
        nb.clear()
        nb.update(keep)

    def _evict(self) -> None:
        """Drop the lists of the least recently clicked items down to 90% of the budget."""
        target = int(0.9 * self.config.max_entries)
        for item in list(self.clicks):
            if self.entries <= target:
                break
            nb = self.co.pop(item, None)
            if nb is not None:
                self.entries -= len(nb)
                self.evicted += 1

    def _matrix(
        self, catalogue: Sequence[str]
    ) -> tuple[dict[str, int], np.ndarray, np.ndarray, np.ndarray]:
        """The normalised co-visit scores over ``catalogue`` as CSR arrays (indptr, indices,
        data), rows and columns in catalogue order; cached until the next learn."""
        key = tuple(catalogue)
        col = {item: c for c, item in enumerate(catalogue)}
        if self._csr is not None and self._csr[0] == key:
            return col, self._csr[1], self._csr[2], self._csr[3]
        n = np.array([self.clicks.get(item, 0.0) for item in catalogue], dtype=np.float64)
        root = np.sqrt(np.maximum(n, 1.0))
        indptr = [0]
        indices: list[int] = []
        data: list[float] = []
        for a in catalogue:
            for b, count in self.co.get(a, {}).items():
                c = col.get(b)
                if c is not None:
                    indices.append(c)
                    data.append(count)
            indptr.append(len(indices))
        ptr = np.asarray(indptr, dtype=np.int64)
        idx = np.asarray(indices, dtype=np.int64)
        val = np.asarray(data, dtype=np.float64)
        rows_of = np.repeat(np.arange(len(catalogue)), np.diff(ptr))
        val = val / (root[rows_of] * root[idx] + self.config.shrink)
        self._csr = (key, ptr, idx, val)
        return col, ptr, idx, val

    def top(
        self, queries: Rows, catalogue: Sequence[str], width: int, fill: np.ndarray
    ) -> np.ndarray:
        """int ``(Q, width)`` catalogue indices per query row, best first: the co-visit
        scores of the row's ``hist_seq``; the rest (and a row without a known history item)
        in ``fill`` order (catalogue indices, e.g. by popularity)."""
        col, ptr, idx, val = self._matrix(catalogue)
        m = len(catalogue)
        width = min(width, m)
        fill = np.asarray(fill, dtype=np.int64)
        # the fill order as a tiny tie-breaker below every co-visit score
        base = np.zeros(m, dtype=np.float64)
        base[fill] = -(np.arange(len(fill), dtype=np.float64) + 1.0) / (len(fill) + 1.0)
        base[np.setdiff1d(np.arange(m), fill)] = -1.0
        tiny = 1e-12
        out = np.empty((len(queries), width), dtype=np.int64)
        window = self.config.window
        for q, row in enumerate(queries):
            score = base * tiny
            for j, h in enumerate(history_items(row)[:window]):
                a = col.get(h)
                if a is not None:
                    s, e = ptr[a], ptr[a + 1]
                    score[idx[s:e]] += val[s:e] / (1.0 + j)
            part = np.argpartition(-score, width - 1)[:width]
            out[q] = part[np.argsort(-score[part], kind="stable")]
        return out


def rrf_fuse(
    lists: Sequence[np.ndarray], weights: Sequence[float], n_items: int, width: int,
    c: float = 60.0,
) -> np.ndarray:  # fmt: skip
    """Weighted reciprocal rank fusion: int ``(Q, width)`` indices of the largest ``sum_l
    w_l / (c + rank_l(i))`` per query. ``lists``: int ``(Q, W_l)`` ranked indices per
    query, or ``(W_l,)`` one list for every query (each list without repeats within a
    row; ``-1`` entries are skipped); ``n_items``: the index range. Ties: the first
    list's order."""
    if len(lists) != len(weights) or not lists:
        raise ValueError("need one weight per list, and at least one list")
    q = max((len(x) for x in lists if x.ndim == 2), default=1)
    width = min(width, n_items)
    out = np.empty((q, width), dtype=np.int64)
    chunk = max(1, 2_000_000 // max(n_items, 1))
    for s in range(0, q, chunk):
        e = min(q, s + chunk)
        score = np.zeros((e - s, n_items), dtype=np.float64)
        rows = np.arange(e - s)[:, None]
        for lst, w in zip(lists, weights, strict=True):
            if w == 0:
                continue
            part = lst[s:e] if lst.ndim == 2 else np.broadcast_to(lst, (e - s, len(lst)))
            add = w / (c + np.arange(part.shape[1], dtype=np.float64))
            ok = part >= 0
            np.add.at(score, (np.broadcast_to(rows, part.shape)[ok], part[ok]),
                      np.broadcast_to(add, part.shape)[ok])  # fmt: skip
        first = lists[0]
        if first.ndim == 1:
            first = np.broadcast_to(first, (e - s, len(first)))
        else:
            first = first[s:e]
        # tie-break by the first list's rank (a tiny decreasing bonus)
        tb = np.zeros_like(score)
        okf = first >= 0
        np.add.at(tb, (np.broadcast_to(rows, first.shape)[okf], first[okf]),
                  np.broadcast_to(-np.arange(first.shape[1], dtype=np.float64) * 1e-12
                                  + 1e-9, first.shape)[okf])  # fmt: skip
        score += tb
        part_k = np.argpartition(-score, width - 1, axis=1)[:, :width]
        order = np.argsort(-np.take_along_axis(score, part_k, axis=1), axis=1, kind="stable")
        out[s:e] = np.take_along_axis(part_k, order, axis=1)
    return out
