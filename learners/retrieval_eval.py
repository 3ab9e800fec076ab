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

With ``prior`` (:class:`learners.retrieval_prior.ServingPrior`) two more rows: ``model_prior``,
the model's cosine plus ``temperature * beta * log q(i)`` (:func:`~learners.retrieval_prior.
prior_bias`; ``q`` the decayed click share of the training period's clicks,
:class:`~learners.retrieval_prior.DecayedClicks`, point-in-time at the end of training), and
``popularity_decayed``, the ``k`` items of largest decayed click count. ``beta`` and both
half-lives are picked on the last ``validation_fraction`` of the training period: the model
learns the rows before it, its clicks are scored against the catalogue so far and the
counts of the clicks before it, then the model learns them too (the ``model`` row trains
exactly as without ``prior``). The ``prior`` key of the result records the picks and the
validation recall of every grid point (``test_by_beta``: the test recall of each ``beta`` at
the picked half-life, for reference only, not for picking).

With ``covisit`` (:class:`learners.covisit.CoVisitConfig`) a ``covisit`` row: item-to-item
co-visitation over the training clicks' point-in-time ``hist_seq``
(:class:`~learners.covisit.CoVisitation`; a query without known history gets popularity).
With ``prior`` too, two fused rows, by weighted reciprocal rank fusion of the top
:data:`FUSION_WIDTH` of each source (:func:`~learners.covisit.rrf_fuse`):
``covisit_fused`` (co-visitation + decayed popularity) and ``model_fused`` (the
``model_prior`` list + co-visitation + decayed popularity); their weights and the fusion
constant are picked on the same validation clicks (co-visitation then counts only the
rows before them), recorded under ``fusion``.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple, Protocol

import numpy as np

from learners.base import Rows
from learners.covisit import CoVisitation, CoVisitConfig, history_items, rrf_fuse
from learners.retrieval_fusion import FusedRetrieval, FusionConfig
from learners.retrieval_prior import DecayedClicks, ServingPrior, prior_bias

__all__ = ["RetrievalModel", "cooccurrence_top", "evaluate_retrieval", "retrieval_metrics"]

_CHUNK = 4096  # queries per exact-search matrix product
#: candidates of each source that reciprocal rank fusion merges
FUSION_WIDTH = 100
#: the fusion grid: RRF constant, decayed popularity's and co-visitation's weights (the
#: first source, co-visitation or the model, weighs 1)
FUSION_C = (10.0, 60.0)
FUSION_POPULARITY = (0.0, 0.5, 1.0, 2.0)
FUSION_COVISIT = (0.5, 1.0, 2.0)


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
        hist = history_items(row)
        if label > 0 and item is not None and str(item) in col and hist:
            after.setdefault(hist[0], Counter())[col[str(item)]] += 1
    fill = np.asarray(popular, dtype=np.int64).tolist()
    rank = {c: r for r, c in enumerate(fill)}
    tail = len(rank)
    out = np.full((len(queries), width), -2, dtype=np.int64)
    for q, row in enumerate(queries):
        score: dict[int, float] = {}
        for j, prev in enumerate(history_items(row)[:window]):
            for c, n in after.get(prev, Counter()).items():
                score[c] = score.get(c, 0.0) + n / (1.0 + j)
        ranked = sorted(score, key=lambda c: (-score[c], rank.get(c, tail), c))[:width]
        taken = set(ranked)
        ranked += [c for c in fill[: width + len(ranked)] if c not in taken][: width - len(ranked)]
        out[q, : len(ranked)] = ranked
    return out


def _top_k(
    users: np.ndarray, items: np.ndarray, k: int, bias: np.ndarray | None = None
) -> np.ndarray:
    """int ``(Q, k)`` indices of the largest ``users @ items.T (+ bias)`` per query, best
    first; ``bias``: optional float ``(M,)`` added to every query's item scores."""
    return _top_k_scored(users, items, k, bias)[0]


def _top_k_scored(
    users: np.ndarray, items: np.ndarray, k: int, bias: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_top_k` and the scores ``(Q, k)`` of the indices it gives."""
    out = np.empty((len(users), k), dtype=np.int64)
    val = np.empty((len(users), k), dtype=np.float64)
    for s in range(0, len(users), _CHUNK):
        scores = users[s : s + _CHUNK] @ items.T
        if bias is not None:
            scores = scores + bias[None, :]
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        best = np.take_along_axis(scores, part, axis=1)
        order = np.argsort(-best, axis=1, kind="stable")
        out[s : s + _CHUNK] = np.take_along_axis(part, order, axis=1)
        val[s : s + _CHUNK] = np.take_along_axis(best, order, axis=1)
    return out, val


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
    prior: ServingPrior | None = None,
    covisit: CoVisitConfig | None = None,
    serving: FusionConfig | None = None,
    candidates: int = 200,
) -> dict[str, Any]:
    """Train ``model`` on the first ``train_fraction`` of ``rows`` (time-ordered, labels
    ``y`` (N,) 0/1), then score each click of the rest (see the module docstring).

    ``oracle(user_ids, item_ids) -> (U, I)`` scores of the world that generated the log
    (e.g. :func:`logs.synthetic.click_propensity`) adds the ``oracle`` row. Returns
    ``{"train_rows", "test_clicks", "items", "unseen_share", "k", "exclude_seen",
    "rows": {name: metrics}}`` (and ``"prior"`` with ``prior``). ``exclude_seen`` and
    ``prior`` and ``covisit``: see the module docstring. ``serving`` adds the ``served``
    row: what ``/recommend`` retrieves with it (``candidates`` items by exact cosine, fused
    by :class:`~learners.retrieval_fusion.FusedRetrieval` fed the training rows in order).
    """
    if not 0.0 < train_fraction < 1.0:
        raise ValueError(f"train_fraction must be in (0, 1), got {train_fraction}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    if len(y) != len(rows):
        raise ValueError(f"len(y)={len(y)} does not match len(rows)={len(rows)}")
    split = int(train_fraction * len(rows))
    start = 0
    chosen: dict[str, Any] | None = None
    fusion: dict[str, Any] | None = None
    cv = None if covisit is None else CoVisitation(covisit)
    served = None if serving is None else FusedRetrieval(serving, _temperature(model))
    seen_items: dict[str, None] = {}  # the catalogue so far, for the served row's observe

    def learn(s: int, e: int) -> None:
        """The model learns ``rows[s:e]``; the served fusion first observes (some of) its
        clicks against the model and catalogue so far, then learns them, as a trainer."""
        if served is not None and seen_items:
            catalogue = list(seen_items)

            def retrieve(queries: Rows) -> tuple[list[list[str]], np.ndarray]:
                top, cos = _top_k_scored(model.user_vectors(queries),
                                         model.item_vectors(catalogue),
                                         min(candidates, len(catalogue)))  # fmt: skip
                return [[catalogue[j] for j in row] for row in top.tolist()], cos

            served.observe_batch(rows[s:e], y[s:e], retrieve)
        if served is not None:
            served.learn_many(rows[s:e], y[s:e])
            seen_items.update((str(r["item_id"]), None) for r in rows[s:e] if "item_id" in r)
        model.learn_many(rows[s:e], y[s:e])

    if prior is not None:  # learn up to the validation rows (on a batch edge), pick, go on
        val = int(split * (1.0 - prior.validation_fraction)) // batch_size * batch_size
        for s in range(0, val, batch_size):
            learn(s, min(s + batch_size, val))
        chosen = _pick_prior(rows, y, model, val, split, k, prior, exclude_seen)
        if cv is not None:
            cv.learn_many(rows[:val], y[:val])
            fusion = _pick_fusion(rows, y, model, cv, val, split, k, chosen, exclude_seen)
        start = val
    for s in range(start, split, batch_size):
        learn(s, min(s + batch_size, split))
    if cv is not None:
        cv.learn_many(rows[start:split], y[start:split])
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
    u_vec, items = model.user_vectors(queries), model.item_vectors(catalogue)
    top = _top_k(u_vec, items, wide)
    out["rows"]["model"] = retrieval_metrics(_drop_seen(top, seen, kk), truth, n_items)
    if served is not None:
        out["served_setting"] = served.setting
        out["rows"]["served"] = retrieval_metrics(
            _drop_seen(_served_top(served, u_vec, items, catalogue, col, queries,
                                   min(candidates, n_items), wide), seen, kk),
            truth, n_items,
        )  # fmt: skip
    if chosen is not None:
        train_clicks = _clicked_items(rows[:split], y[:split])
        counts = _decayed(train_clicks, chosen["half_life_fraction"])
        tau = _temperature(model)
        by_beta = {}
        for beta in chosen["betas"]:
            bias = prior_bias(counts.log_q(catalogue), beta, tau)
            m = retrieval_metrics(_drop_seen(_top_k(u_vec, items, wide, bias), seen, kk),
                                  truth, n_items)  # fmt: skip
            by_beta[str(beta)] = m["recall_at_k"]
            if beta == chosen["beta"]:
                out["rows"]["model_prior"] = m
        pop_counts = _decayed(train_clicks, chosen["popularity_half_life_fraction"])
        pop_top = _popular_top(pop_counts, catalogue, wide)
        out["rows"]["popularity_decayed"] = retrieval_metrics(
            _drop_seen(np.broadcast_to(pop_top, (len(test), wide)), seen, kk), truth, n_items
        )
        out["prior"] = {**chosen, "test_by_beta": by_beta}
        if cv is not None and fusion is not None:
            beta_bias = prior_bias(counts.log_q(catalogue), chosen["beta"], tau)
            lists = _fusion_lists(
                u_vec, items, beta_bias, pop_counts, catalogue, cv, queries, extra
            )
            for name, (weights, c) in fusion["picks"].items():
                fused = rrf_fuse(_sources(lists, name), weights, n_items, wide, c)
                out["rows"][name] = retrieval_metrics(_drop_seen(fused, seen, kk), truth, n_items)
            out["fusion"] = fusion
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
        if cv is not None:
            cv_top = cv.top(queries, catalogue, wide, popular)
            out["rows"]["covisit"] = retrieval_metrics(_drop_seen(cv_top, seen, kk), truth, n_items)
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


def _clicked_items(rows: Rows, y: np.ndarray) -> list[str]:
    return [str(r["item_id"]) for r, t in zip(rows, np.asarray(y).tolist(), strict=True)
            if t > 0 and r.get("item_id") is not None]  # fmt: skip


def _decayed(
    clicks: list[str], half_life_fraction: float, n_period: int | None = None
) -> DecayedClicks:
    """The decayed counts of ``clicks`` (oldest first); the half-life is
    ``half_life_fraction`` of ``n_period`` clicks (default: ``len(clicks)``)."""
    n = len(clicks) if n_period is None else n_period
    counts = DecayedClicks(max(1.0, half_life_fraction * n))
    counts.update(clicks)
    return counts


def _popular_top(counts: DecayedClicks, catalogue: list[str], width: int) -> np.ndarray:
    """int ``(width,)`` catalogue indices of the largest decayed counts (ties: catalogue
    order)."""
    lq = counts.log_q(catalogue)
    return np.argsort(-lq, kind="stable")[: min(width, len(catalogue))].astype(np.int64)


def _served_top(
    served: FusedRetrieval,
    u_vec: np.ndarray,
    items: np.ndarray,
    catalogue: Sequence[str],
    col: Mapping[str, int],
    queries: Rows,
    candidates: int,
    wide: int,
) -> np.ndarray:
    """int ``(Q, wide)`` catalogue indices of what ``/recommend`` retrieves: each query's
    ``candidates`` best items by cosine (the index's exact search), fused with the user's
    history by ``served``; -2 pads (and stands for an item outside the catalogue)."""
    out = np.full((len(queries), wide), -2, dtype=np.int64)
    top, cos = _top_k_scored(u_vec, items, candidates)
    ids = [[catalogue[j] for j in row] for row in top.tolist()]
    hist = [history_items(q) for q in queries]
    for q, (fused, _) in enumerate(served.fuse(ids, cos, hist, wide)):
        out[q, : len(fused)] = [col.get(i, -2) for i in fused]
    return out


def _temperature(model: RetrievalModel) -> float:
    """The model's softmax temperature (``model.config.temperature``), 1 without one."""
    config = getattr(model, "config", None)
    return float(getattr(config, "temperature", 1.0))


class _Validation(NamedTuple):
    """The validation clicks of ``rows[val:split]`` scored against the catalogue of
    ``rows[:val]`` (see :func:`_validation`)."""

    n_period: int  # clicks of the whole training period
    history: list[str]  # clicked items before ``val``, oldest first
    catalogue: list[str]
    queries: Rows
    truth: np.ndarray  # (Q,) catalogue column of each query's item, -1 when unseen
    seen: list[set[int]] | None
    extra: int  # the most seen items a query may drop
    kk: int
    wide: int


def _validation(
    rows: Rows, y: np.ndarray, val: int, split: int, k: int, exclude_seen: bool
) -> _Validation | None:
    """The validation split both pickers score on; None when it has no click, catalogue
    or earlier click to pick with."""
    history = _clicked_items(rows[:val], y[:val])
    catalogue = list(dict.fromkeys(str(r["item_id"]) for r in rows[:val] if "item_id" in r))
    queries = [
        rows[i] for i in range(val, split) if y[i] > 0 and rows[i].get("item_id") is not None
    ]
    if not queries or not catalogue or not history:
        return None
    col = {item: c for c, item in enumerate(catalogue)}
    truth = np.array([col.get(str(q["item_id"]), -1) for q in queries], dtype=np.int64)
    seen = _seen_columns(queries, col) if exclude_seen else None
    extra = max((len(s) for s in seen), default=0) if seen is not None else 0
    kk = min(k, len(catalogue))
    n_period = len(_clicked_items(rows[:split], y[:split]))
    return _Validation(n_period, history, catalogue, queries, truth, seen, extra, kk,
                       min(kk + extra, len(catalogue)))  # fmt: skip


def _pick_prior(
    rows: Rows,
    y: np.ndarray,
    model: RetrievalModel,
    val: int,
    split: int,
    k: int,
    prior: ServingPrior,
    exclude_seen: bool,
) -> dict[str, Any]:
    """Pick ``beta`` and the half-lives on the clicks of ``rows[val:split]`` with the model
    as it is after learning ``rows[:val]`` and the counts of the clicks before ``val``."""
    picks: dict[str, Any] = {
        "betas": list(prior.betas),
        "half_life_fractions": list(prior.half_lives),
        "validation_rows": split - val,
        "validation_clicks": 0,
        "beta": 0.0,
        "half_life_fraction": prior.half_lives[0],
        "popularity_half_life_fraction": prior.half_lives[0],
        "validation": {"model": {}, "popularity_decayed": {}},
    }
    v = _validation(rows, y, val, split, k, exclude_seen)
    if v is None:
        return picks
    catalogue, queries, truth, seen, kk, wide = (
        v.catalogue,
        v.queries,
        v.truth,
        v.seen,
        v.kk,
        v.wide,
    )
    users, items = model.user_vectors(queries), model.item_vectors(catalogue)
    tau = _temperature(model)
    best, best_pop = (-1.0, 0.0, 0.0), (-1.0, 0.0)
    for h in prior.half_lives:
        counts = _decayed(v.history, h, v.n_period)
        pop = np.broadcast_to(_popular_top(counts, catalogue, wide), (len(queries), wide))
        r_pop = retrieval_metrics(_drop_seen(pop, seen, kk), truth, len(catalogue))["recall_at_k"]
        picks["validation"]["popularity_decayed"][str(h)] = r_pop
        if r_pop > best_pop[0]:
            best_pop = (r_pop, h)
        lq = counts.log_q(catalogue)
        for beta in prior.betas:
            top = _top_k(users, items, wide, prior_bias(lq, beta, tau))
            r = retrieval_metrics(_drop_seen(top, seen, kk), truth, len(catalogue))["recall_at_k"]
            picks["validation"]["model"][f"beta={beta},half_life={h}"] = r
            if r > best[0]:
                best = (r, beta, h)
    picks.update(
        validation_clicks=len(queries),
        beta=best[1],
        half_life_fraction=best[2],
        popularity_half_life_fraction=best_pop[1],
    )
    return picks


#: the sources each fused row merges, as indices into :func:`_fusion_lists`'s lists
_FUSED_SOURCES = {"covisit_fused": (1, 2), "model_fused": (0, 1, 2)}


def _sources(lists: list[np.ndarray], name: str) -> list[np.ndarray]:
    return [lists[i] for i in _FUSED_SOURCES[name]]


def _fusion_lists(
    users: np.ndarray,
    items: np.ndarray,
    bias: np.ndarray,
    pop_counts: DecayedClicks,
    catalogue: list[str],
    cv: CoVisitation,
    queries: Rows,
    extra: int,
) -> list[np.ndarray]:
    """The sources fusion merges, ``FUSION_WIDTH`` (+ ``extra``, the most seen items a
    query may drop) each: the model with its prior ``bias`` (Q, W), co-visitation (Q, W)
    and decayed popularity (W,)."""
    width = min(FUSION_WIDTH + extra, len(catalogue))
    pop = _popular_top(pop_counts, catalogue, width)
    return [_top_k(users, items, width, bias), cv.top(queries, catalogue, width, pop), pop]


def _pick_fusion(
    rows: Rows,
    y: np.ndarray,
    model: RetrievalModel,
    cv: CoVisitation,
    val: int,
    split: int,
    k: int,
    chosen: Mapping[str, Any],
    exclude_seen: bool,
) -> dict[str, Any]:
    """Pick the fusion weights and constant (``FUSION_*`` grids) of ``covisit_fused`` and
    ``model_fused`` on the clicks of ``rows[val:split]``, the model and ``cv`` as they are
    after ``rows[:val]``, the popularity counts of the clicks before ``val`` at the
    half-lives :func:`_pick_prior` chose."""
    picks: dict[str, Any] = {
        "picks": {"covisit_fused": ([1.0, 0.0], FUSION_C[0]),
                  "model_fused": ([1.0, FUSION_COVISIT[0], 0.0], FUSION_C[0])},
        "validation": {"covisit_fused": {}, "model_fused": {}},
    }  # fmt: skip
    v = _validation(rows, y, val, split, k, exclude_seen)
    if v is None:
        return picks
    n = len(v.catalogue)
    lq = _decayed(v.history, chosen["half_life_fraction"], v.n_period).log_q(v.catalogue)
    bias = prior_bias(lq, chosen["beta"], _temperature(model))
    pop_counts = _decayed(v.history, chosen["popularity_half_life_fraction"], v.n_period)
    lists = _fusion_lists(
        model.user_vectors(v.queries), model.item_vectors(v.catalogue), bias, pop_counts,
        v.catalogue, cv, v.queries, v.extra,
    )  # fmt: skip

    def recall(name: str, weights: list[float], c: float) -> float:
        fused = rrf_fuse(_sources(lists, name), weights, n, v.wide, c)
        return float(retrieval_metrics(_drop_seen(fused, v.seen, v.kk), v.truth, n)["recall_at_k"])

    best: dict[str, tuple[float, list[float], float]] = {}
    for c in FUSION_C:
        for wp in FUSION_POPULARITY:
            r = recall("covisit_fused", [1.0, wp], c)
            picks["validation"]["covisit_fused"][f"pop={wp},c={c}"] = r
            if r > best.get("covisit_fused", (-1.0, [], 0.0))[0]:
                best["covisit_fused"] = (r, [1.0, wp], c)
            for wc in FUSION_COVISIT:
                r = recall("model_fused", [1.0, wc, wp], c)
                picks["validation"]["model_fused"][f"covisit={wc},pop={wp},c={c}"] = r
                if r > best.get("model_fused", (-1.0, [], 0.0))[0]:
                    best["model_fused"] = (r, [1.0, wc, wp], c)
    picks["picks"] = {name: (w, c) for name, (_, w, c) in best.items()}
    picks["validation_clicks"] = len(v.queries)
    return picks
