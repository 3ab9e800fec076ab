"""Online serving as a plain object: retrieve with FAISS, rank, calibrate, cut to ``k``.

:class:`Recommender` knows nothing about HTTP or Faust; a web route calls
:meth:`Recommender.recommend` / :meth:`Recommender.score` and maps :class:`ServingError`
to its status code. The live objects are passed as getters and read once per request, so
the trainer, the monitor and the indexer can replace them underneath (a new ranker, a new
calibrator version, a new index snapshot) and each response is computed from one
consistent set, whose versions it reports.

A request flows: user vector (the two-tower user tower over the user's id, the request
context and, with historical features, the user's behaviour sequence now, read from the
feature stage as in training; or the ranker's user embedding as a fallback) -> top ``N =
max(k, candidates)`` items of the current index snapshot -> the ranker's P(click) on rows
built like :func:`logs.events.example_row` (``user_id``, ``item_id``, ``position`` =
``ServingConfig.position``, plus the request context) -> the calibrator -> the ``k`` items
with the highest calibrated pCTR.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from features.stage import FeatureStage, PeekCache
from index.faiss_index import IndexHolder, IndexSnapshot
from learners.calibration import Calibrator
from learners.covisit import history_items
from learners.encoding import CandidateRows
from learners.ranker import TorchRanker
from learners.retrieval_fusion import FusedRetrieval
from logs.events import HISTORY_PREFIX, Impression, example_row, with_history, without_history
from serving.requests import (
    Request,
    ServingError,
    check_context,
    check_items,
    check_k,
    check_user,
)

__all__ = [
    "Recommender",
    "ServingConfig",
    "ServingError",
    "recommend_many",
]

T = TypeVar("T")

UserVectors = Callable[[list[dict[str, object]]], np.ndarray]
"""``rows (U,) -> (U, D) float32`` user vectors in the index's space; each row holds the
``user_id``, the request context and, with historical features, the user's behaviour
sequence now (``hist_seq``, ``hist_seq_age``, ...): the user tower's input, as in training
(e.g. ``TwoTowerModel.user_vectors``)."""


@dataclass(frozen=True)
class ServingConfig:
    """Serving limits and settings.

    Attributes:
        max_k: largest ``k`` accepted by :meth:`Recommender.recommend`.
        candidates: items retrieved from the index before ranking (at least ``k``).
        max_candidates: most item ids accepted by :meth:`Recommender.score`.
        position: the ``position`` feature every candidate is ranked at (the slot is not
            known before ranking; a fixed one compares candidates on equal terms). None
            leaves it out.
        max_context: most context fields per request.
        threads: threads that compute answers off the worker's event loop (0: on the
            loop). On the loop, a steady stream of requests starves the joiner and trainer
            agents (bench.serving measured 4k of 60k impressions trained in 5 minutes under
            4 busy connections).
        max_inflight: requests accepted at once (computing or waiting for a thread); one
            more is answered 503 at once, so overload sheds requests instead of queueing
            them without bound.
        header_timeout_s: a connection that has not sent a complete request head this
            many seconds after it opened (or after its last answer) is closed: a client
            that sends nothing, or trickles header bytes, holds no slot longer.
        body_timeout_s: most seconds to receive a request body (``/score``); 408 after.
        max_body_bytes: largest request body accepted; 413 above.
        max_connections: open connections on the serving port; one more is answered 503
            and closed at once (see :mod:`stream.httpd`).
        batch: most concurrent ``/recommend`` requests answered together by the web view's
            :class:`RequestBatcher` (one user-tower call, one FAISS search, one ranker
            call); 1 answers each alone on the gate's threads.
        batch_wait_ms: most milliseconds the batcher waits for more requests after the
            first of a batch arrives.
        second_label: ``/score`` also returns each item's ``p_ctcvr``, the ranker's
            P(clicked and converted) (uncalibrated; a ranker with a task 1 only). Set by
            ``Settings`` when ``join.conversion_window_s`` is.
    """

    max_k: int = 100
    candidates: int = 200
    max_candidates: int = 1_000
    position: int | None = 1
    max_context: int = 64
    threads: int = 1
    max_inflight: int = 32
    header_timeout_s: float = 10.0
    body_timeout_s: float = 10.0
    max_body_bytes: int = 1024 * 1024
    max_connections: int = 256
    batch: int = 32
    batch_wait_ms: float = 2.0
    second_label: bool = False

    def __post_init__(self) -> None:
        for name in ("max_k", "candidates", "max_candidates", "max_context", "max_inflight",
                     "max_body_bytes", "max_connections", "batch"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"ServingConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("header_timeout_s", "body_timeout_s"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v > 0):
                raise ValueError(f"ServingConfig.{name} must be > 0, got {v}")
        if self.threads < 0:
            raise ValueError(f"ServingConfig.threads must be >= 0, got {self.threads}")
        if not (math.isfinite(self.batch_wait_ms) and self.batch_wait_ms >= 0):
            raise ValueError(f"ServingConfig.batch_wait_ms must be >= 0, got {self.batch_wait_ms}")


def _history_parts(
    stage: FeatureStage,
    now: float,
    user_id: str,
    items: Sequence[str],
    position: int | None,
    context: Mapping[str, str | float],
    cache: PeekCache | None = None,
) -> tuple[dict[str, object], list[dict[str, object]], dict[str, object]]:
    """:meth:`~features.stage.FeatureStage.peek_many` encoded as :func:`with_history` and
    :func:`example_row` encode an impression's features: ``(head, parts, tail)``. The
    parts are the stage's own dicts (Python floats already; with ``cache`` several
    candidates may share one): read them, never change them."""
    head, parts, tail = stage.peek_many(now, user_id, items, position, context, cache)
    # the tail (user x attribute counters, the behaviour sequence) through the very
    # encoding an impression's features get: the sequence joined, cut and split again
    enc = with_history(Impression("serve", now, user_id, "", position, {}), tail)
    tail_row = example_row(enc)
    return (
        {k: float(v) for k, v in head.items()},  # type: ignore[arg-type]
        parts,
        {k: tail_row[k] for k in enc.features},
    )


def history_candidates(
    stage: FeatureStage,
    now: float,
    user_id: str,
    items: Sequence[str],
    position: int | None,
    context: Mapping[str, str | float],
    cache: PeekCache | None = None,
) -> tuple[dict[str, object], list[dict[str, object]]]:
    """One user's candidates ``items`` (N,) at ``now`` with the stage's historical
    features, as a :class:`~learners.encoding.CandidateRows` query: ``(base, extras)``,
    where ``{**base, **extras[n], "item_id": items[n]}`` equals (as a dict) the row
    :func:`history_rows` gives: the training row of an impression arriving now. The
    user's features (and its behaviour sequence) are read and encoded once, not once per
    candidate. ``context`` must hold no ``hist_*`` name (the caller keeps the per-item
    form then). ``cache``: a :class:`~features.stage.PeekCache` of ``stage`` at ``now``
    and ``position`` shared by the queries of one batch (the extras may then share dicts:
    read-only)."""
    head, parts, tail = _history_parts(stage, now, user_id, items, position, context, cache)
    base: dict[str, object] = {**context, **head, **tail, "user_id": user_id}
    if position is not None:
        base["position"] = position
    return base, parts


def history_rows(
    stage: FeatureStage,
    now: float,
    user_id: str,
    items: Sequence[str],
    position: int | None,
    context: Mapping[str, str | float],
) -> list[dict[str, object]]:
    """The rows (N,) of one user's candidates ``items`` at ``now`` with the stage's
    historical features: equal, values and key order alike, to ``example_row(with_history(
    Impression("serve", now, user_id, item, position, context), stage.peek(now, user_id,
    item, position, context)))`` per item, with the user's features read and encoded once
    (:meth:`~features.stage.FeatureStage.peek_many`) instead of once per candidate.
    ``context`` must hold no ``hist_*`` name (the caller keeps the per-item form then)."""
    head, parts, tail = _history_parts(stage, now, user_id, items, position, context)
    rows = []
    for item, part in zip(items, parts, strict=True):
        row: dict[str, object] = {**context, **head, **part}
        for k, v in tail.items():  # a sequence list of its own per row, as example_row's
            row[k] = list(v) if isinstance(v, list) else v
        row["user_id"] = user_id
        row["item_id"] = item
        if position is not None:
            row["position"] = position
        rows.append(row)
    return rows


class Recommender:
    """Retrieve, rank and calibrate for one user.

    Args:
        index: the holder of the serving FAISS snapshot.
        ranker: returns the current ranker (read once per request).
        calibrator: returns the current ``(calibrator, version)``.
        user_vectors: ``user_ids -> (U, D)`` vectors in the index's space, e.g.
            ``two_tower.user_vectors``; None falls back to ``ranker().user_vectors`` (then
            the index must hold ``ranker.item_vectors``), reported as
            ``retrieval_model="ranker_embeddings"``.
        config: limits and the candidate count.

    The getters' objects are only read (``predict_proba_many``, ``transform``); if
    another thread trains them in place, it must not do so while a request runs (publish
    a copy instead).

    Example:
        >>> from index.faiss_index import build_snapshot
        >>> from learners.calibration import PlattCalibrator
        >>> from learners.encoding import EncoderConfig
        >>> from learners.ranker import RankerConfig
        >>> ranker = TorchRanker(RankerConfig(model="logreg", device="cpu",
        ...                      encoder=EncoderConfig(num_buckets=256)), seed=0)
        >>> items = [f"i{j}" for j in range(20)]
        >>> holder = IndexHolder()
        >>> _ = holder.swap(build_snapshot(items, ranker.item_vectors(items), version=1))
        >>> rec = Recommender(holder, lambda: ranker, lambda: (PlattCalibrator(), 0))
        >>> out = rec.recommend("u1", k=3, context={"ctx_device": "ios"})
        >>> len(out["items"]), out["index_version"], out["retrieval_model"]
        (3, 1, 'ranker_embeddings')
        >>> sorted(out["items"][0])
        ['item_id', 'p_raw', 'retrieval_score', 'score']
        >>> rec.recommend("u1", k=0)
        Traceback (most recent call last):
        ...
        serving.requests.ServingError: k must be an integer in [1, 100], got 0
    """

    def __init__(
        self,
        index: IndexHolder,
        ranker: Callable[[], TorchRanker],
        calibrator: Callable[[], tuple[Calibrator, int]],
        user_vectors: UserVectors | None = None,
        config: ServingConfig = ServingConfig(),  # noqa: B008 - frozen, immutable default
        history: Callable[[str], FeatureStage | None] | None = None,
        clock: Callable[[], float] = time.time,
        fusion: Callable[[], FusedRetrieval | None] | None = None,
        on_history_dropped: Callable[[int], None] | None = None,
    ) -> None:
        self.index = index
        self.ranker = ranker
        self.calibrator = calibrator
        self.user_vectors = user_vectors
        self.config = config
        self.history = history
        self.clock = clock
        self.fusion = fusion
        #: told how many ``hist_*`` context values a request brought for a user whose
        #: history the stage computes (they are dropped: :func:`~logs.events.without_history`)
        self.on_history_dropped = on_history_dropped

    @property
    def retrieval_model(self) -> str:
        """The retrieval source: "two_tower" with ``user_vectors``, else "ranker_embeddings"."""
        return "ranker_embeddings" if self.user_vectors is None else "two_tower"

    def _rows(
        self, user_id: str, items: Sequence[str], context: Mapping[str, str | float]
    ) -> list[dict[str, object]]:
        stage = None if self.history is None else self.history(user_id)
        if stage is not None:
            # the live feature stage of the user's partition, read only (peek), at the
            # request's time, through the same encoding as a joined impression: the rows
            # equal the training rows of an impression arriving now
            ctx = self._own_context(context)
            return history_rows(stage, self.clock(), user_id, items, self.config.position, ctx)
        base = self._base(user_id, context)
        return [{**base, "item_id": item} for item in items]

    def _own_context(self, context: Mapping[str, str | float]) -> dict[str, str | float]:
        """``context`` without the ``hist_*`` values a client brought, for a user whose
        history the stage computes (as a joined impression's are dropped: training and
        serving read the stage's alone)."""
        return without_history(context)[0]

    def _count_dropped(self, user_id: str, context: Mapping[str, str | float]) -> None:
        """Tell ``on_history_dropped`` how many ``hist_*`` values of a request's
        ``context`` are dropped (those of a user whose history the stage computes)."""
        if self.on_history_dropped is None or self.history is None:
            return
        n = sum(1 for k in context if k.startswith(HISTORY_PREFIX))
        if n and self.history(user_id) is not None:
            self.on_history_dropped(n)

    def _base(self, user_id: str, context: Mapping[str, str | float]) -> dict[str, object]:
        """A candidate's row without its ``item_id`` (no feature stage): the context (a
        client's own ``hist_seq`` string split as a training row's, :func:`example_row`),
        ``user_id`` and the position."""
        pos = self.config.position
        base = example_row(Impression("serve", 0.0, user_id, "", pos, dict(context)))
        del base["item_id"]
        return base

    def _p_raw(
        self,
        ranker: TorchRanker,
        queries: Sequence[tuple[str, Sequence[str], Mapping[str, str | float]]],
    ) -> np.ndarray:
        """The ranker's P(click) of every ``(user_id, items, context)`` query's rows
        (:meth:`_query_rows`), query after query: (N,) for N items in all."""
        rows = self._query_rows(queries)
        return np.asarray(ranker.predict_proba_many(rows)) if len(rows) else np.zeros(0)

    def _query_rows(
        self, queries: Sequence[tuple[str, Sequence[str], Mapping[str, str | float]]]
    ) -> Sequence[Mapping[str, object]]:
        """The ranker's input rows of every ``(user_id, items, context)`` query, query
        after query. Without historical features the rows differ only in ``item_id``: a
        :class:`~learners.encoding.CandidateRows`, whose encoding encodes each query's row
        once (the same values)."""
        rows: Sequence[Mapping[str, object]]
        if self.history is None:
            bases = [self._base(user_id, ctx) for user_id, _, ctx in queries]
            rows = CandidateRows(bases, [items for _, items, _ in queries])
        else:  # each query's user part encoded once; the candidates' own features apart
            now, pos = self.clock(), self.config.position
            heads: list[dict[str, object]] = []
            extras: list[list[dict[str, object]]] = []
            caches: dict[int, PeekCache] = {}  # per stage: its items' parts, once a batch
            for user_id, items, ctx in queries:
                stage = self.history(user_id)
                extra: list[dict[str, object]]
                if stage is None:
                    base, extra = self._base(user_id, ctx), [{} for _ in items]
                else:
                    cache = caches.get(id(stage))
                    if cache is None:
                        cache = caches[id(stage)] = PeekCache(stage, now, pos)
                    base, extra = history_candidates(
                        stage, now, user_id, items, pos, self._own_context(ctx), cache
                    )
                heads.append(base)
                extras.append(extra)
            rows = CandidateRows(heads, [items for _, items, _ in queries], extras)
        return rows

    def _rank(
        self, user_id: str, items: Sequence[str], context: Mapping[str, str | float]
    ) -> tuple[np.ndarray, np.ndarray, int, int]:
        """Raw and calibrated P(click) (N,) float64, model and calibrator versions."""
        ranker = self.ranker()
        calibrator, cal_version = self.calibrator()
        p_raw = np.asarray(self._p_raw(ranker, [(user_id, items, context)]))
        p = np.asarray(calibrator.transform(p_raw), dtype=np.float64).reshape(-1)
        if not (np.all(np.isfinite(p)) and np.all(np.isfinite(p_raw))):
            # never serve NaN (invalid JSON) or inf: control records are validated, but a
            # diverged model or a bad store snapshot must not reach a client either
            raise ServingError(503, "the model produced a non-finite score; not served")
        return p_raw.astype(np.float64), p, int(ranker.n_updates), int(cal_version)

    def user_rows(
        self, queries: Sequence[tuple[str, Mapping[str, str | float]]]
    ) -> list[dict[str, object]]:
        """The user tower's input of each ``(user_id, context)`` (U,): ``{**context,
        "user_id"}`` plus, with historical features, the user's features now from the
        stage (:meth:`~features.stage.FeatureStage.peek_many`'s tail through the training
        encoding: the behaviour sequence ``hist_seq`` and its ages, the user x attribute
        counters), so the tower reads at serving what it read in training; a client's own
        ``hist_*`` context values are dropped then, as a joined impression's are. Without a
        stage for the user a context's own ``hist_*`` values are kept (a ``hist_seq``
        string split at :data:`logs.events.SEQ_SEP`, as a training row's)."""
        now = self.clock()
        out = []
        for user_id, ctx in queries:
            stage = None if self.history is None else self.history(user_id)
            if stage is None:  # the client's hist_* values, decoded as in training
                row = example_row(Impression("serve", now, user_id, "", None, dict(ctx)))
                del row["item_id"]
            else:
                own = self._own_context(ctx)
                row = {**own, "user_id": user_id}
                _, _, tail = _history_parts(stage, now, user_id, (), None, own)
                row.update(tail)
            out.append(row)
        return out

    def candidates(
        self, rows: Sequence[Mapping[str, object]], scores: np.ndarray, ids: np.ndarray,
        widths: Sequence[int],
    ) -> list[tuple[list[str], np.ndarray]]:  # fmt: skip
        """Per query ``q``: the index's hits ``ids[q]`` (cosines ``scores[q]``, None past
        the last hit) cut to ``widths[q]`` -> ``(item ids, retrieval scores)``. With
        fusion (the ``fusion`` getter's :class:`~learners.retrieval_fusion.FusedRetrieval`)
        the hits are fused with co-visitation over the user row's ``hist_seq`` and recent
        popularity, and the scores are the fusion's; else they are the cosines."""
        fusion = None if self.fusion is None else self.fusion()
        out = []
        for q, width in enumerate(widths):
            found = [c for c in range(min(width, ids.shape[1])) if ids[q, c] is not None]
            items = [str(ids[q, c]) for c in found]
            cos = scores[q, found].astype(np.float64)
            if fusion is not None:
                hist = history_items(rows[q])
                items, cos = fusion.fuse([items], cos[None, :], [hist], width)[0]
            out.append((items, cos))
        return out

    def _user_vectors(self, rows: list[dict[str, object]], snapshot: IndexSnapshot) -> np.ndarray:
        """(U, dim) float32 vectors of the user rows (U,) (:meth:`user_rows`) from the
        retrieval model; a 503 when they do not fit ``snapshot`` or are not finite."""
        if self.user_vectors is None:  # the ranker's user embedding: by id
            vec = self.ranker().user_vectors([str(r["user_id"]) for r in rows])
        else:
            vec = self.user_vectors(rows)
        vec = np.asarray(vec, dtype=np.float32)
        if vec.shape != (len(rows), snapshot.dim):
            raise ServingError(
                503,
                f"user vectors of shape {vec.shape} do not fit index version "
                f"{snapshot.version} (dim {snapshot.dim}); the index is being rebuilt",
            )
        if not np.all(np.isfinite(vec)):
            raise ServingError(503, "the retrieval model produced a non-finite user vector")
        return vec

    def recommend(
        self, user_id: str, k: int, context: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        """The ``k`` best items for ``user_id`` by calibrated pCTR.

        Args:
            user_id: 1..256 characters.
            k: 1..``max_k``.
            context: request features (name -> str or finite number), given to the ranker
                with every candidate; reserved event names (``item_id``, ``position``, ...)
                are rejected.

        Returns:
            ``{"user_id", "items": [{"item_id", "score" (calibrated pCTR in [0, 1]),
            "p_raw" (the ranker's), "retrieval_score" (cosine in [-1, 1])}, ...]`` sorted by
            ``score`` descending (at most ``k``; fewer when the index holds fewer),
            ``"index_version"``, ``"model_version"`` (the ranker's update count),
            ``"calibrator_version"``, ``"retrieval_model"``, ``"fusion"`` (the candidate
            fusion's setting in use, :attr:`~learners.retrieval_fusion.FusedRetrieval.
            setting`, or None without fusion), ``"candidates"`` (items ranked) and
            ``"timing_ms"`` (``retrieve``, ``rank``, ``total``).

        Raises:
            ServingError: 400 for a bad argument, 503 before the first index snapshot or
                when the user vectors do not fit the current index.
        """
        t0 = time.perf_counter()
        user_id = check_user(user_id)
        k = check_k(k, self.config.max_k)
        ctx = check_context(context, self.config.max_context)
        self._count_dropped(user_id, ctx)
        snapshot = self.index.current
        if snapshot is None:
            raise ServingError(503, "no index yet: the first snapshot has not been built")
        n = max(k, self.config.candidates)
        rows = self.user_rows([(user_id, ctx)])
        scores, ids = snapshot.search(self._user_vectors(rows, snapshot), n)
        items, retrieval = self.candidates(rows, scores, ids, [n])[0]
        t1 = time.perf_counter()
        if items:
            p_raw, p, model_version, cal_version = self._rank(user_id, items, ctx)
        else:
            p_raw = p = np.zeros(0)
            model_version, cal_version = int(self.ranker().n_updates), self.calibrator()[1]
        t2 = time.perf_counter()
        return _answer(
            self,
            user_id,
            k,
            items,
            retrieval,
            p_raw,
            p,
            snapshot.version,
            (model_version, int(cal_version)),
            (t0, t1, t2),
        )

    def score(
        self, user_id: str, item_ids: Sequence[str], context: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        """Calibrated pCTR of given candidates, in the order given (no retrieval, so no
        index is needed).

        Returns ``{"user_id", "items": [{"item_id", "score", "p_raw"}, ...],
        "index_version"`` (None before the first snapshot), ``"model_version"``,
        ``"calibrator_version"``, ``"timing_ms": {"total"}}``. With
        ``ServingConfig.second_label`` and a ranker with a task 1, each item also has
        ``"p_ctcvr"``: P(clicked and converted), ESMM's pCTR x pCVR or the direct task's.

        Raises:
            ServingError: 400 for a bad user id, context, or item list (not a list of
                distinct strings of 1..256 characters, empty, or more than
                ``max_candidates``).
        """
        t0 = time.perf_counter()
        user_id = check_user(user_id)
        items = check_items(item_ids, self.config.max_candidates)
        ctx = check_context(context, self.config.max_context)
        self._count_dropped(user_id, ctx)
        snapshot = self.index.current
        p_raw, p, model_version, cal_version = self._rank(user_id, items, ctx)
        answers = [
            {"item_id": item, "score": float(p[j]), "p_raw": float(p_raw[j])}
            for j, item in enumerate(items)
        ]
        ranker = self.ranker()
        if self.config.second_label and ranker.has_task1:
            rows = self._query_rows([(user_id, items, ctx)])
            p2 = ranker.predict_tasks_many(rows)["task1"]
            if not np.all(np.isfinite(p2)):
                raise ServingError(503, "the model produced a non-finite score; not served")
            for answer, value in zip(answers, p2.tolist(), strict=True):
                answer["p_ctcvr"] = value
        return {
            "user_id": user_id,
            "items": answers,
            "index_version": None if snapshot is None else snapshot.version,
            "model_version": model_version,
            "calibrator_version": cal_version,
            "timing_ms": {"total": 1e3 * (time.perf_counter() - t0)},
        }


def _answer(
    rec: Recommender,
    user_id: str,
    k: int,
    items: list[str],
    retrieval: np.ndarray,
    p_raw: np.ndarray,
    p: np.ndarray,
    index_version: int,
    versions: tuple[int, int],
    times: tuple[float, float, float],
    batch: int | None = None,
) -> dict[str, Any]:
    """The answer of :meth:`Recommender.recommend`: the top ``k`` of ``items`` (N,) by
    calibrated pCTR ``p`` (N,), the ``retrieval`` score (N,) breaking ties. ``versions`` is
    ``(model_version, calibrator_version)``, ``times`` the ``perf_counter`` seconds at the
    start, after retrieval and after ranking; ``batch`` (the batch size) is added to
    ``timing_ms`` when given."""
    t0, t1, t2 = times
    fusion = None if rec.fusion is None else rec.fusion()
    order = np.lexsort((-retrieval, -p))[:k]
    timing: dict[str, float] = {"retrieve": 1e3 * (t1 - t0), "rank": 1e3 * (t2 - t1)}
    out = {
        "user_id": user_id,
        "items": [
            {
                "item_id": items[j],
                "score": float(p[j]),
                "p_raw": float(p_raw[j]),
                "retrieval_score": float(retrieval[j]),
            }
            for j in order.tolist()
        ],
        "index_version": index_version,
        "model_version": versions[0],
        "calibrator_version": versions[1],
        "retrieval_model": rec.retrieval_model,
        "fusion": None if fusion is None else fusion.setting,
        "candidates": len(items),
        "timing_ms": timing,
    }
    timing["total"] = 1e3 * (time.perf_counter() - t0)
    if batch is not None:
        timing["batch"] = batch
    return out


def recommend_many(
    rec: Recommender, requests: Sequence[Request]
) -> list[dict[str, Any] | ServingError]:
    """:meth:`Recommender.recommend` for several requests at once: one user-tower call, one
    FAISS search of all the user vectors, one ranker call over every candidate row and one
    calibrator call, then each request's top ``k``.

    Returns one entry per request, in order: the answer :meth:`Recommender.recommend` gives
    (same items and scores; ``timing_ms`` is the batch's, plus ``"batch"``: its size), or
    the :class:`ServingError` of that request (a bad request fails alone; no index or user
    vectors that do not fit the index fail every request).
    """
    t0 = time.perf_counter()
    out: list[dict[str, Any] | ServingError] = [ServingError(500, "not computed")] * len(requests)
    valid: list[tuple[int, str, int, dict[str, str | float]]] = []
    for j, (user_id, k, context) in enumerate(requests):
        try:
            valid.append(
                (
                    j,
                    check_user(user_id),
                    check_k(k, rec.config.max_k),
                    check_context(context, rec.config.max_context),
                )
            )
        except ServingError as exc:
            out[j] = exc
    if not valid:
        return out
    for _, user_id, _, ctx in valid:
        rec._count_dropped(user_id, ctx)
    snapshot = rec.index.current
    try:
        if snapshot is None:
            raise ServingError(503, "no index yet: the first snapshot has not been built")
        user_rows = rec.user_rows([(u, ctx) for _, u, _, ctx in valid])
        vecs = rec._user_vectors(user_rows, snapshot)
    except ServingError as exc:
        for j, *_ in valid:
            out[j] = exc
        return out
    widths = [max(k, rec.config.candidates) for _, _, k, _ in valid]
    scores, ids = snapshot.search(vecs, max(widths))
    per = rec.candidates(user_rows, scores, ids, widths)
    t1 = time.perf_counter()
    ranker = rec.ranker()
    calibrator, cal_version = rec.calibrator()
    queries = [
        (user_id, items, ctx) for (_, user_id, _, ctx), (items, _) in zip(valid, per, strict=True)
    ]
    p_raw_all = np.asarray(rec._p_raw(ranker, queries))
    p_all = np.asarray(calibrator.transform(p_raw_all), dtype=np.float64).reshape(-1)
    p_raw_all = p_raw_all.astype(np.float64).reshape(-1)
    t2 = time.perf_counter()
    start = 0
    for (j, user_id, k, _), (items, retrieval) in zip(valid, per, strict=True):
        p_raw = p_raw_all[start : start + len(items)]
        p = p_all[start : start + len(items)]
        start += len(items)
        out[j] = _answer(
            rec,
            user_id,
            k,
            items,
            retrieval,
            p_raw,
            p,
            snapshot.version,
            (int(ranker.n_updates), int(cal_version)),
            (t0, t1, t2),
            len(requests),
        )
    return out
