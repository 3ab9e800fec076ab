"""Offline retrieval evaluation: time-ordered split, recall@k, NDCG@k, coverage.

A retrieval model (anything with ``learn_many(rows, y)``, ``user_vectors(rows)`` and
``item_vectors(item_ids)``, e.g. :class:`learners.two_tower.TwoTowerModel`) learns the
first ``train_fraction`` of a time-ordered log in batches; each click of the rest is then
a query: the row (user, context and ``hist_seq`` behaviour as the row carries them)
retrieves the ``k`` items of the training catalogue (every item of a training row) with
the largest inner product, by exact search. One relevant item per query, so

- ``recall_at_k``: the share of test clicks whose item is retrieved;
- ``ndcg_at_k``: the mean of ``1 / log2(rank + 2)`` over test clicks (0 when missed; the
  ideal DCG of one relevant item is 1);
- ``coverage``: the share of the catalogue retrieved for at least one query.

A clicked item outside the catalogue counts as a miss (``unseen_share`` reports how many).
With ``exclude_seen``, every row (model and references alike) skips the items of the
query's own ``hist_seq`` (the user's recent clicks), as a recommender that does not
re-offer what was just consumed would (right for films, wrong where repeat clicks are
the norm, so it is off by default).
Reference rows: ``popularity`` (the ``k`` most clicked training items for every query),
``random`` (``k`` catalogue items drawn per query, seeded), ``cooccurrence`` (not learned:
the items most often clicked right after the query's last ``window`` clicked items in
training, :func:`cooccurrence_top`; what a sequence signal alone reaches, so a model below
it has not learned the sequence) and, given a score function of the world that made the
log, ``oracle``.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from learners.base import Rows

__all__ = ["RetrievalModel", "cooccurrence_top", "evaluate_retrieval", "retrieval_metrics"]

_CHUNK = 4096  # queries per exact-search matrix product


class RetrievalModel(Protocol):
    def learn_many(self, X: Rows, y: Any, w: Any = None) -> None: ...

    def user_vectors(self, rows_or_ids: Any) -> np.ndarray: ...

    def item_vectors(self, item_ids: Sequence[str]) -> np.ndarray: ...


def retrieval_metrics(top: np.ndarray, truth: np.ndarray, n_items: int) -> dict[str, float]:
    """``top``: int ``(Q, k)`` catalogue indices per query, best first; ``truth``: int
    ``(Q,)`` the clicked item's catalogue index (-1: not in the catalogue) ->
    ``recall_at_k``, ``ndcg_at_k``, ``coverage`` (all in [0, 1]; NaN without queries).

    Example:
        >>> top = np.array([[3, 1], [0, 2], [1, 0]])
        >>> m = retrieval_metrics(top, np.array([1, 3, 1]), n_items=5)
        >>> round(m["recall_at_k"], 4), round(m["ndcg_at_k"], 4), m["coverage"]
        (0.6667, 0.5436, 0.8)
    """
    if len(truth) == 0:
        return {"recall_at_k": math.nan, "ndcg_at_k": math.nan, "coverage": math.nan}
    hit = top == truth[:, None]  # (Q, k); -1 never matches (top holds indices or -2 pads)
    rank = np.argmax(hit, axis=1)
    found = hit.any(axis=1)
    gain = np.where(found, 1.0 / np.log2(rank + 2.0), 0.0)
    return {
        "recall_at_k": float(found.mean()),
        "ndcg_at_k": float(gain.mean()),
        "coverage": float(len(np.unique(top[top >= 0])) / n_items) if n_items else math.nan,
    }


def _seen_columns(queries: Rows, col: Mapping[str, int]) -> list[set[int]]:
    out = []
    for q in queries:
        hist = q.get("hist_seq")
        ids = hist if isinstance(hist, list | tuple | np.ndarray) else ()
        out.append({col[str(i)] for i in ids if str(i) in col})
    return out


def _drop_seen(top: np.ndarray, seen: list[set[int]] | None, k: int) -> np.ndarray:
    """The first ``k`` columns of each row of ``top`` (Q, W) not in its ``seen`` set,
    padded with -2 (never a hit, not counted in coverage) where fewer are left."""
    if seen is None:
        return top[:, :k]
    out = np.full((len(top), k), -2, dtype=np.int64)
    for r, (row, s) in enumerate(zip(top.tolist(), seen, strict=True)):
        keep = [c for c in row if c not in s][:k]
        out[r, : len(keep)] = keep
    return out


def _history(row: Mapping[str, object]) -> list[str]:
    hist = row.get("hist_seq")
    return [str(i) for i in hist] if isinstance(hist, list | tuple | np.ndarray) else []


def cooccurrence_top(
    train: Rows,
    train_y: np.ndarray,
    queries: Rows,
    col: Mapping[str, int],
    width: int,
    popular: np.ndarray,
    *,
    window: int = 5,
) -> np.ndarray:
    """Item-to-item co-occurrence retrieval, not learned: int ``(Q, width)`` catalogue
    indices per query, best first.

    Transitions come from the clicked ``train`` rows (labels ``train_y`` (N,)) alone: each
    click on item ``b`` whose row's ``hist_seq`` (the user's earlier clicks, most recent
    first, point-in-time) starts with ``a`` counts one ``a -> b`` ("clicked right after";
    no future: a row's history precedes it). A query scores item ``c`` by
    ``sum_j count(h_j -> c) / (1 + j)`` over its ``hist_seq`` items ``h_j``, ``j <
    window``; ties and the rest are filled in ``popular`` order (catalogue indices, most
    clicked first), so a query without history gets popularity.

    Example:
        >>> rows = [{"item_id": "b", "hist_seq": ["a"]}, {"item_id": "c", "hist_seq": ["a"]},
        ...         {"item_id": "c", "hist_seq": ["b", "a"]}]
        >>> col = {"a": 0, "b": 1, "c": 2}
        >>> q = [{"hist_seq": ["a"]}, {"hist_seq": ["b"]}, {}]
        >>> cooccurrence_top(rows, np.ones(3), q, col, 2, np.array([2, 1, 0])).tolist()
        [[2, 1], [2, 1], [2, 1]]
        >>> cooccurrence_top(rows[:2], np.ones(2), q[:1], col, 3, np.array([0, 2, 1])).tolist()
        [[2, 1, 0]]
    """
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    after: dict[str, Counter[int]] = {}
    for row, label in zip(train, np.asarray(train_y).tolist(), strict=True):
        item = row.get("item_id")
        hist = _history(row)
        if label > 0 and item is not None and str(item) in col and hist:
            after.setdefault(hist[0], Counter())[col[str(item)]] += 1
    fill = np.asarray(popular, dtype=np.int64).tolist()
    rank = {c: r for r, c in enumerate(fill)}
    tail = len(rank)
    out = np.full((len(queries), width), -2, dtype=np.int64)
    for q, row in enumerate(queries):
        score: dict[int, float] = {}
        for j, prev in enumerate(_history(row)[:window]):
            for c, n in after.get(prev, Counter()).items():
                score[c] = score.get(c, 0.0) + n / (1.0 + j)
        ranked = sorted(score, key=lambda c: (-score[c], rank.get(c, tail), c))[:width]
        taken = set(ranked)
        ranked += [c for c in fill[: width + len(ranked)] if c not in taken][: width - len(ranked)]
        out[q, : len(ranked)] = ranked
    return out


def _top_k(users: np.ndarray, items: np.ndarray, k: int) -> np.ndarray:
    out = np.empty((len(users), k), dtype=np.int64)
    for s in range(0, len(users), _CHUNK):
        scores = users[s : s + _CHUNK] @ items.T
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1, kind="stable")
        out[s : s + _CHUNK] = np.take_along_axis(part, order, axis=1)
    return out


def evaluate_retrieval(
    rows: Rows,
    y: np.ndarray,
    model: RetrievalModel,
    *,
    train_fraction: float = 0.8,
    k: int = 10,
    batch_size: int = 1024,
    oracle: Callable[[list[str], list[str]], np.ndarray] | None = None,
    seed: int = 0,
    exclude_seen: bool = False,
) -> dict[str, Any]:
    """Train ``model`` on the first ``train_fraction`` of ``rows`` (time-ordered, labels
    ``y`` (N,) 0/1), then score each click of the rest (see the module docstring).

    ``oracle(user_ids, item_ids) -> (U, I)`` scores of the world that generated the log
    (e.g. :func:`logs.synthetic.click_propensity`) adds the ``oracle`` row. Returns
    ``{"train_rows", "test_clicks", "items", "unseen_share", "k", "exclude_seen",
    "rows": {name: metrics}}``. ``exclude_seen``: see the module docstring.
    """
    if not 0.0 < train_fraction < 1.0:
        raise ValueError(f"train_fraction must be in (0, 1), got {train_fraction}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    if len(y) != len(rows):
        raise ValueError(f"len(y)={len(y)} does not match len(rows)={len(rows)}")
    split = int(train_fraction * len(rows))
    for s in range(0, split, batch_size):
        e = min(s + batch_size, split)
        model.learn_many(rows[s:e], y[s:e])
    catalogue = list(dict.fromkeys(str(r["item_id"]) for r in rows[:split] if "item_id" in r))
    col = {item: c for c, item in enumerate(catalogue)}
    test = [i for i in range(split, len(rows)) if y[i] > 0 and rows[i].get("item_id") is not None]
    truth = np.array([col.get(str(rows[i]["item_id"]), -1) for i in test], dtype=np.int64)
    n_items = len(catalogue)
    out: dict[str, Any] = {
        "train_rows": split,
        "test_clicks": len(test),
        "items": n_items,
        "unseen_share": float((truth < 0).mean()) if len(test) else math.nan,
        "k": k,
        "exclude_seen": exclude_seen,
        "rows": {},
    }
    if not test or not n_items:
        return out
    queries = [rows[i] for i in test]
    seen = _seen_columns(queries, col) if exclude_seen else None
    extra = max((len(s) for s in seen), default=0) if seen is not None else 0
    kk = min(k, n_items)
    wide = min(kk + extra, n_items)  # candidates per query before the seen items go
    top = _top_k(model.user_vectors(queries), model.item_vectors(catalogue), wide)
    out["rows"]["model"] = retrieval_metrics(_drop_seen(top, seen, kk), truth, n_items)
    clicked = Counter(str(r["item_id"]) for r, t in zip(rows[:split], y[:split], strict=True)
                      if t > 0 and "item_id" in r)  # fmt: skip
    popular = np.array([col[i] for i, _ in clicked.most_common(wide)], dtype=np.int64)
    if len(popular):
        pop_top = np.broadcast_to(popular, (len(test), len(popular)))
        out["rows"]["popularity"] = retrieval_metrics(
            _drop_seen(pop_top, seen, min(kk, len(popular))), truth, n_items
        )
        co_top = cooccurrence_top(rows[:split], y[:split], queries, col, wide, popular)
        out["rows"]["cooccurrence"] = retrieval_metrics(
            _drop_seen(co_top, seen, kk), truth, n_items
        )
    rng = np.random.default_rng(seed)
    rand_top = np.stack([rng.choice(n_items, wide, replace=False) for _ in test])
    out["rows"]["random"] = retrieval_metrics(_drop_seen(rand_top, seen, kk), truth, n_items)
    known = [j for j, q in enumerate(queries) if q.get("user_id") is not None]
    if oracle is not None and known:  # over the queries with a user id
        users = sorted({str(queries[j]["user_id"]) for j in known})
        best = np.argsort(-oracle(users, catalogue), axis=1)[:, :wide]
        by_user = {u: best[n] for n, u in enumerate(users)}
        oracle_top = np.stack([by_user[str(queries[j]["user_id"])] for j in known])
        known_seen = None if seen is None else [seen[j] for j in known]
        out["rows"]["oracle"] = retrieval_metrics(
            _drop_seen(oracle_top, known_seen, kk), truth[known], n_items
        )
    return out
