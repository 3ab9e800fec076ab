"""Served candidate generation: the model's list, co-visitation and recent popularity, fused.

What :mod:`learners.retrieval_eval` measured as ``model_fused`` (MovieLens dev log: 1.32x
the popularity row's recall@10, against 1.05x for the two-tower model alone), as one
object a trainer feeds and a recommender reads, with fixed defaults instead of a
validation pick (:class:`FusionConfig`):

1. the model's candidates (e.g. a FAISS top ``N`` by cosine) re-scored by ``cosine +
   temperature * beta * log q(i)`` (:func:`learners.retrieval_prior.prior_bias`, ``q`` the
   decayed click share, :class:`~learners.retrieval_prior.DecayedClicks`), best ``width``
   kept;
2. the user's behaviour sequence (``hist_seq``, most recent first) through item-to-item
   co-visitation (:class:`~learners.covisit.CoVisitation`, scored sparsely from each
   history item's cached top ``neighbours`` co-visited items, so a query costs O(window x
   neighbours), not O(catalogue));
3. the ``width`` items with the most decayed clicks;

merged by weighted reciprocal rank fusion, ``sum_l w_l / (rrf_c + rank_l(i))``
(:func:`learners.covisit.rrf_fuse`'s rule on item ids).

State: the co-visit counts and the decayed clicks, fed in stream order by
:meth:`FusedRetrieval.learn_many` (point-in-time: a query reads only the clicks learnt
before it). One lock guards them: a trainer thread learns while serving threads fuse.

**Floods.** Popularity and co-visits are what one user's clicks could push into everyone's
candidates, so three rules bound one user's say (each counted: ``repeats``,
``throttled``, ``covisit.pairs.repeated``): a click on an item already in the user's own
window (``hist_seq``) makes neither popularity nor co-visits; a user's clicks count in
popularity (the list and the prior's ``q``) only up to ``max_user_share`` of the recent
(decayed) credited clicks plus ``user_share_floor`` (:meth:`FusedRetrieval._credit`);
and a user co-visits a pair once (:class:`~learners.covisit.PairMemory`), however often
it clicks the two near each other. (The share is not applied to co-visits: at 2% it cost
2.4% of the MovieLens dev log's served recall and did not keep a bot out of its targets'
lists; the pair memory does.) Not bounded: many accounts acting together, whose clicks
look like a real trend.

>>> fr = FusedRetrieval(FusionConfig(width=3), temperature=0.1)
>>> fr.learn_many([{"item_id": "b", "hist_seq": ["a"]}, {"item_id": "c", "hist_seq": ["a"]},
...                {"item_id": "c"}], [1, 1, 1])
>>> [items for items, _ in fr.fuse([["d", "a"]], np.array([[0.9, 0.1]]), [["a"]], 4)]
[['b', 'c', 'd', 'a']]
"""

from __future__ import annotations

import copy
import dataclasses
import heapq
import math
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from learners.base import Rows
from learners.covisit import CoVisitation, CoVisitConfig, history_items
from learners.retrieval_prior import DecayedClicks, prior_bias

#: the key under which rows without ``user_id`` move the users' clock
_ANONYMOUS = "\x00"

__all__ = ["GRID_BETA", "GRID_C", "GRID_WEIGHTS", "FusedRetrieval", "FusionConfig"]


#: the online pick's grid (``adapt``): the prior's ``beta``, the RRF constant, and the
#: ``(model, covisit, popularity)`` weights
GRID_BETA = (0.0, 1.0, 2.0)
GRID_C = (10.0, 60.0)
GRID_WEIGHTS = tuple(
    (m, cv, p)
    for m in (1.0, 0.0)
    for cv in (0.0, 0.5, 1.0, 2.0)
    for p in (0.0, 0.5, 1.0, 2.0)
    if m or cv or p
)


def _grid_index(setting: tuple[float, float, tuple[float, ...]]) -> tuple[int, int, int] | None:
    """The grid indices of ``(beta, rrf_c, weights)``; None off the grid."""
    beta, c, w = setting
    try:
        return GRID_BETA.index(beta), GRID_C.index(c), GRID_WEIGHTS.index(tuple(w))
    except ValueError:
        return None


@dataclass(frozen=True)
class FusionConfig:
    """Served candidate fusion (see the module docstring).

    Attributes:
        enabled: fuse the three sources; False serves the model's list alone.
        beta: weight of ``log q`` in the model list's re-scoring (0: plain cosine; 1:
            the sampled-softmax logQ correction undone in full).
        half_life_clicks: clicks after which a click counts half in ``q`` and in the
            popularity list (> 0).
        width: candidates of each source fused (>= 1).
        weights: ``(model, covisit, popularity)`` fusion weights (each finite, >= 0, not
            all 0).
        rrf_c: the reciprocal rank fusion constant (> 0).
        covisit_window: history items a click co-visits and a query reads.
        covisit_shrink: added to the co-visit normaliser (>= 0).
        covisit_max_neighbours: co-visited items kept per item.
        covisit_max_entries: the budget on co-visited entries over all items (~52 bytes
            each).
        covisit_max_items: the items whose clicks co-visitation counts (the least recently
            clicked are forgotten past it; decayed counts below 0.5 are dropped at each
            refresh), so ever new item ids cannot grow the state without bound.
        covisit_pair_memory: slots of the memory that counts a co-visited pair once per
            user (:class:`~learners.covisit.PairMemory`, 8 bytes each; a power of two, 0:
            off).
        neighbours: a history item's co-visited items read per query, the best first.
        refresh_clicks: clicks after which the cached neighbour lists and the popularity
            list are recomputed (an item's own list is recomputed as soon as it changes).
        adapt: pick ``beta``, ``rrf_c`` and ``weights`` online from a grid
            (:data:`GRID_BETA`, :data:`GRID_C`, :data:`GRID_WEIGHTS`) by the DCG@``adapt_k``
            each setting would have given the clicks :meth:`FusedRetrieval.observe` sees
            (prequential: scored before they are learnt), decayed with a half-life of
            ``adapt_half_life`` observed clicks; the configured setting serves until
            ``adapt_min_clicks`` clicks are observed, and after only while no grid setting
            beats it by ``adapt_z`` standard errors (the decayed sum of the per-click gain
            differences against ``adapt_z`` times the root of their decayed sum of
            squares): the pick leaves it only on evidence. False: the configured setting
            always. With ``adapt``, ``beta``, ``rrf_c`` and ``weights`` must be a grid point.
        observe_per_batch: clicks of a micro-batch the trainer observes (each costs a
            user-tower row and an index search).
        max_user_share: the share of the recent (decayed) clicks one ``user_id`` may hold
            in the popularity counts, in (0, 1]: a user's click counts in full while the
            user's decayed credited clicks are below ``max_user_share`` times everyone's
            plus ``user_share_floor``, then only up to that room (0 past it), and the
            decay clock moves by what it counts. So one user (a bot, a click flood)
            cannot make an item popular for everyone: its share of the counts stays near
            ``max_user_share / (1 - max_user_share)`` of the others'. Rows without
            ``user_id`` count in full. 1 turns it off.
        user_share_floor: decayed clicks every user may hold whatever the share (>= 1, so
            a user's first click always counts in full).

    The starting setting is what ``evaluate-retrieval --prior --covisit`` picked on the
    MovieLens dev log's validation clicks (weights 1, 2, 0.5, constant 10; half-life ~5%
    of its 36k training clicks), except ``beta``, 1 (the principled value; the pick, 2,
    sat at the grid's edge). It is not right everywhere (the history world's pick was
    weights 1, 0.5, 0 and ``beta`` 0), hence ``adapt``.
    """

    enabled: bool = True
    beta: float = 1.0
    half_life_clicks: float = 2_000.0
    width: int = 100
    weights: tuple[float, float, float] = (1.0, 2.0, 0.5)
    rrf_c: float = 10.0
    covisit_window: int = 20
    covisit_shrink: float = 10.0
    covisit_max_neighbours: int = 500
    covisit_max_entries: int = 2_000_000
    covisit_max_items: int = 1_000_000
    covisit_pair_memory: int = 1 << 22
    neighbours: int = 100
    refresh_clicks: int = 1_000
    adapt: bool = True
    adapt_min_clicks: int = 200
    adapt_half_life: float = 2_000.0
    adapt_k: int = 10
    adapt_z: float = 2.0
    observe_per_batch: int = 8
    max_user_share: float = 0.02
    user_share_floor: float = 20.0

    def __post_init__(self) -> None:
        for name in ("beta", "covisit_shrink"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"FusionConfig.{name} must be finite and >= 0, got {v}")
        for name in ("half_life_clicks", "rrf_c", "adapt_half_life"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v > 0):
                raise ValueError(f"FusionConfig.{name} must be finite and > 0, got {v}")
        for name in ("width", "covisit_window", "covisit_max_neighbours",
                     "covisit_max_entries", "covisit_max_items", "neighbours", "refresh_clicks",
                     "adapt_min_clicks", "adapt_k", "observe_per_batch"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"FusionConfig.{name} must be >= 1, got {getattr(self, name)}")
        w = tuple(float(x) for x in self.weights)
        if len(w) != 3 or any(not (math.isfinite(x) and x >= 0) for x in w) or not any(w):
            raise ValueError(f"FusionConfig.weights must be 3 finite values >= 0, not all 0, "
                             f"got {self.weights}")  # fmt: skip
        object.__setattr__(self, "weights", w)
        try:
            self.covisit  # noqa: B018 - validates the co-visit settings
        except ValueError as exc:
            raise ValueError(f"FusionConfig.covisit_*: {exc}") from None
        if not (0 < self.max_user_share <= 1):
            raise ValueError(f"FusionConfig.max_user_share must be in (0, 1], got "
                             f"{self.max_user_share}")  # fmt: skip
        if not (math.isfinite(self.user_share_floor) and self.user_share_floor >= 1):
            raise ValueError(f"FusionConfig.user_share_floor must be finite and >= 1, got "
                             f"{self.user_share_floor}")  # fmt: skip
        if not (math.isfinite(self.adapt_z) and self.adapt_z >= 0):
            raise ValueError(f"FusionConfig.adapt_z must be finite and >= 0, got {self.adapt_z}")
        if self.adapt and _grid_index((self.beta, self.rrf_c, w)) is None:
            raise ValueError(
                f"FusionConfig: with adapt, beta must be one of {GRID_BETA}, rrf_c one of "
                f"{GRID_C} and weights a (model, covisit, popularity) triple of "
                f"{{0, 0.5, 1, 2}} with model in {{0, 1}} (got beta={self.beta}, "
                f"rrf_c={self.rrf_c}, weights={w}); or set adapt = false"
            )

    @property
    def covisit(self) -> CoVisitConfig:
        return CoVisitConfig(window=self.covisit_window, shrink=self.covisit_shrink,
                             max_neighbours=self.covisit_max_neighbours,
                             max_entries=self.covisit_max_entries,
                             max_items=self.covisit_max_items,
                             pair_memory=self.covisit_pair_memory)  # fmt: skip


class FusedRetrieval:
    """Co-visitation and decayed clicks learnt from the stream; :meth:`fuse` merges them with
    a model's candidates. ``temperature``: the retrieval model's softmax temperature (the
    prior is in its cosine units)."""

    def __init__(self, config: FusionConfig | None = None, temperature: float = 0.05) -> None:
        self.config = config or FusionConfig()
        if not (math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature must be a positive finite number, got {temperature}")
        self.temperature = float(temperature)
        self.covisit = CoVisitation(self.config.covisit)
        self.clicks = DecayedClicks(self.config.half_life_clicks)
        #: each user's credited clicks, aged by everyone's credited clicks
        #: (``max_user_share``; a repeat moves this clock, not the popularity's)
        self.users = DecayedClicks(self.config.half_life_clicks)
        self.throttled = 0.0  # clicks not credited (the uncounted parts of clicks)
        self.repeats = 0  # clicks on an item already in the user's own window (not counted)
        self.seen = 0  # clicks learnt, all of them
        self._lock = threading.Lock()
        #: item -> (neighbour ids, normalised scores), best first; dropped when the item's
        #: list changes, all of it every ``refresh_clicks`` clicks
        self._rows: dict[str, tuple[list[str], np.ndarray]] = {}
        self._popular: list[str] | None = None
        self._since_refresh = 0
        #: the online pick: decayed sums of each grid setting's DCG gain minus the
        #: configured setting's, per (beta, c, weights), and of their squares
        shape = (len(GRID_BETA), len(GRID_C), len(GRID_WEIGHTS))
        self._d1 = np.zeros(shape)
        self._d2 = np.zeros(shape)
        self.n_observed = 0
        self._w = np.array(GRID_WEIGHTS, dtype=np.float64).T  # (3, G)
        cfg = self.config
        self._setting = (cfg.beta, cfg.rrf_c, cfg.weights)
        self._default = _grid_index(self._setting) if cfg.adapt else None

    @property
    def setting(self) -> dict[str, Any]:
        """The setting :meth:`fuse` uses now: ``beta``, ``rrf_c``, ``weights`` and whether
        it is the online pick (``adapted``), with the clicks observed."""
        beta, c, w = self._setting
        cfg = self.config
        return {"beta": beta, "rrf_c": c, "weights": w, "observed": self.n_observed,
                "adapted": (beta, c, w) != (cfg.beta, cfg.rrf_c, cfg.weights)}  # fmt: skip

    def observe(self, rows: Rows, items: Sequence[Sequence[str]], cosines: np.ndarray) -> None:
        """Score clicks before they are learnt, for the online pick: ``rows`` (Q,) clicked
        rows (``item_id``, ``hist_seq``), ``items[q]`` (N_q,) and ``cosines[q]`` the
        model's candidates for row ``q`` as serving would retrieve them now. Each grid
        setting gains ``1 / log2(rank + 2)`` when its fused list ranks the clicked item
        within ``adapt_k``. Call it before :meth:`learn_many` of the same rows."""
        cfg = self.config
        if not cfg.adapt:
            return
        cos = np.asarray(cosines, dtype=np.float64)
        decay = 0.5 ** (1.0 / cfg.adapt_half_life)
        pop = self.popular_top(cfg.width)
        for q, row in enumerate(rows):
            truth = row.get("item_id")
            if truth is None:
                continue
            truth = str(truth)
            lists_by_beta = [self._model_top(items[q], cos[q, : len(items[q])], b, cfg.width)
                             for b in GRID_BETA]  # fmt: skip
            cov = self.covisit_top(history_items(row), cfg.width)
            gain = np.zeros_like(self._d1)
            for bi, model_list in enumerate(lists_by_beta):
                union = list(dict.fromkeys([*model_list, *cov, *pop]))
                if truth not in union:
                    continue
                pos = {item: j for j, item in enumerate(union)}
                rank = np.full((len(union), 3), np.inf)
                for col, lst in enumerate((model_list, cov, pop)):
                    for r, item in enumerate(lst):
                        rank[pos[item], col] = r
                t = pos[truth]
                for ci, c in enumerate(GRID_C):
                    score = (1.0 / (c + rank)) @ self._w  # (U, G); an absent item adds 0
                    mine = score[t]
                    # ties share the ranks they span; a setting that gives the item no
                    # score (it is in no list it weighs) does not retrieve it
                    above = (score > mine).sum(axis=0) + 0.5 * ((score == mine).sum(axis=0) - 1)
                    hit = (above < cfg.adapt_k) & (mine > 0)
                    gain[bi, ci] = np.where(hit, 1.0 / np.log2(above + 2.0), 0.0)
            assert self._default is not None
            d = gain - gain[self._default]
            self._d1 = self._d1 * decay + d
            self._d2 = self._d2 * decay + d * d
            self.n_observed += 1
        self._pick()

    def observe_batch(
        self,
        rows: Rows,
        y: np.ndarray,
        retrieve: Callable[[list[Mapping[str, object]]], tuple[list[list[str]], np.ndarray] | None],
    ) -> None:
        """:meth:`observe` of up to ``observe_per_batch`` clicks of a micro-batch ``rows``
        (labels ``y`` (N,)), evenly spaced; ``retrieve(clicked rows)`` gives each one's
        model candidates and cosines as serving would retrieve them now (None: nothing to
        compare with). Call it before :meth:`learn_many` of the batch."""
        if not self.config.adapt:
            return
        clicked = np.flatnonzero(np.asarray(y) > 0)
        if not len(clicked):
            return
        n = min(self.config.observe_per_batch, len(clicked))
        pick = clicked[np.linspace(0, len(clicked) - 1, n).astype(int)]
        queries = [rows[int(j)] for j in pick]
        got = retrieve(queries)
        if got is not None:
            self.observe(queries, *got)

    def _pick(self) -> None:
        """The setting with the largest lower confidence bound ``d1 - z sqrt(d2)`` on its
        gain over the configured one, when that bound is above 0; else the configured."""
        cfg = self.config
        if self._default is None or self.n_observed < cfg.adapt_min_clicks:
            return
        lcb = self._d1 - cfg.adapt_z * np.sqrt(self._d2)
        flat = int(np.argmax(lcb))
        b, c, w = (int(x) for x in np.unravel_index(flat, lcb.shape))
        if lcb[b, c, w] > 0:
            self._setting = (GRID_BETA[b], GRID_C[c], GRID_WEIGHTS[w])
        else:
            self._setting = (cfg.beta, cfg.rrf_c, cfg.weights)

    @property
    def n_clicks(self) -> int:
        """Clicks learnt (repeats and throttled ones included)."""
        return self.seen

    def learn_many(self, X: Rows, y: Any) -> None:
        """Count the clicks of ``X`` (labels ``y`` (N,), > 0 = clicked), in order: their
        co-visits with each row's ``hist_seq`` and their decayed click counts, repeats and
        one user's clicks past its share left out (module docstring, "Floods")."""
        y = np.asarray(y, dtype=np.float64).reshape(-1)
        clicked = [r for r, label in zip(X, y.tolist(), strict=True)
                   if label > 0 and r.get("item_id") is not None]  # fmt: skip
        if not clicked:
            return
        window = self.config.covisit_window
        items = [str(r["item_id"]) for r in clicked]
        hists = [history_items(r)[:window] for r in clicked]
        # a repeat (the item already in the user's own window) makes neither popularity
        # nor co-visits (CoVisitation skips them too): clicking the same items over and
        # over promotes nothing; it still counts in the item's clicks (the co-visit
        # normaliser) and against the user's share
        repeat = [b in h for b, h in zip(items, hists, strict=True)]
        with self._lock:
            self.seen += len(clicked)
            self.repeats += sum(repeat)
            weights = self._credit(clicked)
            self.covisit.learn_many(clicked, np.ones(len(clicked)))
            self.clicks.update(items, [0.0 if r else w for r, w in zip(repeat, weights,
                                                                       strict=True)])  # fmt: skip
            self._since_refresh += len(clicked)
            if self._since_refresh >= self.config.refresh_clicks:
                self._rows.clear()
                self._popular = None
                self._since_refresh = 0
                self.clicks.prune()  # items decayed below log_q's floor: bounded memory
                self.users.prune()
            else:
                for b, hist in zip(items, hists, strict=True):  # the lists these clicks changed
                    self._rows.pop(b, None)
                    for h in hist:
                        self._rows.pop(h, None)

    def _credit(self, clicked: Rows) -> list[float]:
        """What each clicked row (in order) counts in popularity, in [0, 1]
        (``max_user_share``), its user's credited clicks counted (under the lock)."""
        cfg, users = self.config, self.users
        if cfg.max_user_share >= 1.0:
            return [1.0] * len(clicked)
        share, floor = cfg.max_user_share, cfg.user_share_floor
        out: list[float] = []
        for r in clicked:
            user = r.get("user_id")
            if user is None:  # counted in full, on the same clock
                key, w = _ANONYMOUS, 1.0
            else:
                key = str(user)
                w = min(1.0, max(0.0, share * users.total + floor - users.count(key)))
            users.update((key,), (w,))
            if w < 1.0:
                self.throttled += 1.0 - w
            out.append(w)
        return out

    def _neighbours(self, item: str) -> tuple[list[str], np.ndarray]:
        """``item``'s best ``neighbours`` co-visited items and their normalised scores
        ``co(a, c) / (sqrt(n(a) n(c)) + shrink)``, best first (under the lock)."""
        cached = self._rows.get(item)
        if cached is not None:
            return cached
        nb = self.covisit.co.get(item)
        if not nb:
            out: tuple[list[str], np.ndarray] = ([], np.zeros(0))
        else:
            n = self.covisit.clicks
            ids = list(nb)
            co = np.fromiter(nb.values(), dtype=np.float64, count=len(ids))
            nc = np.fromiter((n.get(c, 0.0) for c in ids), dtype=np.float64, count=len(ids))
            na = max(n.get(item, 0.0), 1.0)
            val = co / (np.sqrt(na * np.maximum(nc, 1.0)) + self.config.covisit_shrink)
            m = self.config.neighbours
            keep = np.argsort(-val, kind="stable")[:m]
            out = ([ids[j] for j in keep.tolist()], val[keep])
        self._rows[item] = out
        return out

    def covisit_top(self, history: Sequence[str], width: int) -> list[str]:
        """The ``width`` items with the largest ``sum_j score(h_j, c) / (1 + j)`` over the
        first ``covisit_window`` items of ``history`` (most recent first); fewer when the
        history's items have fewer co-visited items."""
        score: dict[str, float] = {}
        with self._lock:
            for j, h in enumerate(history[: self.config.covisit_window]):
                ids, val = self._neighbours(str(h))
                for c, v in zip(ids, (val / (1.0 + j)).tolist(), strict=True):
                    score[c] = score.get(c, 0.0) + v
        return heapq.nlargest(width, score, key=score.__getitem__)

    def popular_top(self, width: int) -> list[str]:
        """The ``width`` items with the most decayed clicks (cached between refreshes)."""
        with self._lock:
            if self._popular is None or len(self._popular) < width:
                raw = self.clicks._raw
                self._popular = heapq.nlargest(max(width, self.config.width), raw,
                                               key=raw.__getitem__)  # fmt: skip
            return self._popular[:width]

    def model_top(self, items: Sequence[str], cosines: np.ndarray, width: int) -> list[str]:
        """``items`` (N,) re-ranked by ``cosine + temperature * beta * log q`` (``beta`` of
        the :attr:`setting` in use), best ``width``."""
        return self._model_top(items, cosines, self._setting[0], width)

    def _model_top(
        self, items: Sequence[str], cosines: np.ndarray, beta: float, width: int
    ) -> list[str]:
        if not len(items):
            return []
        cos = np.asarray(cosines, dtype=np.float64).reshape(-1)
        if beta > 0:
            with self._lock:
                lq = self.clicks.log_q(items)
            cos = cos + prior_bias(lq, beta, self.temperature)
        order = np.argsort(-cos, kind="stable")[:width]
        return [items[j] for j in order.tolist()]

    def fuse(
        self,
        items: Sequence[Sequence[str]],
        cosines: np.ndarray,
        histories: Sequence[Sequence[str]],
        width: int,
    ) -> list[tuple[list[str], np.ndarray]]:
        """Per query: the model's candidates ``items[q]`` (N_q,) with their cosines
        ``cosines[q]`` (the first N_q of a row), the user's ``histories[q]`` (most recent
        first) -> ``(ids, fused scores)``, the ``width`` best by weighted reciprocal rank
        fusion (ties: the model's order, then co-visitation's, then popularity's); when
        the fused lists hold fewer than ``width`` items, the rest of ``items[q]`` follows
        in the model's order with score 0 (the ranker sees as many candidates as without
        fusion).
        Disabled, the model's list alone (its first ``width``, scores the cosines)."""
        cos = np.asarray(cosines, dtype=np.float64)
        out: list[tuple[list[str], np.ndarray]] = []
        if not self.config.enabled:
            for q, its in enumerate(items):
                out.append((list(its)[:width], cos[q, : min(len(its), width)].copy()))
            return out
        cfg = self.config
        beta, c, weights = self._setting
        pop = self.popular_top(cfg.width) if weights[2] > 0 else []
        for q, its in enumerate(items):
            lists = [
                self._model_top(its, cos[q, : len(its)], beta, cfg.width) if weights[0] > 0 else [],
                self.covisit_top(histories[q], cfg.width) if weights[1] > 0 else [],
                pop,
            ]
            score: dict[str, float] = {}
            for lst, w in zip(lists, weights, strict=True):
                for rank, item in enumerate(lst):
                    score[item] = score.get(item, 0.0) + w / (c + rank)
            best = sorted(score, key=lambda i: -score[i])[:width]  # stable: first-seen order
            fused = [score[i] for i in best]
            if len(best) < width:  # the rest of the model's candidates, in its order, so
                taken = set(best)  # the ranker still sees ``width`` of them
                rest = [i for i in its if i not in taken][: width - len(best)]
                best += rest
                fused += [0.0] * len(rest)
            out.append((best, np.array(fused, dtype=np.float64)))
        return out

    def state_dict(self) -> dict[str, Any]:
        """A copy of the learnt state of plain types only (dicts, str, float, int, tuples:
        ``torch.load(weights_only=True)`` reads it); the caches are rebuilt on load."""
        with self._lock:
            return copy.deepcopy(self._state())

    def save(self, path: str | Path) -> None:
        """``torch.save`` the :meth:`state_dict` to ``path`` without a copy first: the
        live counts are written with the lock held (learning and fusing wait meanwhile;
        ~0.7 s for 1M co-visit entries), so a writer thread can save while the event loop
        goes on."""
        with self._lock:
            torch.save(self._state(), path)

    def _state(self) -> dict[str, Any]:
        """The state, its containers the live ones (hold the lock)."""
        cv = self.covisit
        return {
            "config": dataclasses.asdict(self.config),
            "temperature": self.temperature,
            "co": cv.co,
            "covisit_clicks": cv.clicks,
            "counters": (cv.entries, cv.pruned, cv.evicted),
            "decayed": self.clicks.state(),
            "credit": (*self.users.state(), self.throttled, self.repeats, self.seen),
            "adapt": (self._d1.tolist(), self._d2.tolist(), self.n_observed),
        }

    @classmethod
    def from_state_dict(
        cls, state: Mapping[str, Any], config: FusionConfig | None = None
    ) -> FusedRetrieval:
        """The object :meth:`state_dict` copied; ``config`` (None: the saved one) replaces
        its settings, the counts kept (a trainer resumed under new settings)."""
        fr = cls(config or FusionConfig(**state["config"]), state["temperature"])
        cv = fr.covisit
        cv.co = {a: dict(nb) for a, nb in state["co"].items()}
        cv.clicks = dict(state["covisit_clicks"])
        cv.entries, cv.pruned, cv.evicted = state["counters"]
        fr.clicks.load_state(state["decayed"])
        if "credit" in state:
            credit = state["credit"]
            fr.users.load_state(credit)
            fr.throttled, fr.repeats, fr.seen = credit[3:]
        else:  # saved before the user share: it starts empty
            fr.seen = fr.clicks.n_clicks
        d1, d2, n_observed = state["adapt"]
        saved = FusionConfig(**state["config"])
        same = (saved.beta, saved.rrf_c, saved.weights) == fr._setting  # the same reference
        if fr.config.adapt and same and np.shape(d1) == fr._d1.shape:
            fr._d1 = np.asarray(d1, dtype=np.float64)
            fr._d2 = np.asarray(d2, dtype=np.float64)
            fr.n_observed = int(n_observed)
            fr._pick()
        return fr
