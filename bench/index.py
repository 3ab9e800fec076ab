"""Retrieval benchmark: FAISS index kinds, the serving path, and two-tower recall.

Run ``python -m bench.index`` (full, a few minutes on 2 cores) or ``python -m bench.index
--quick`` (< 60 s). Three parts, all seeded:

1. **Index kinds.** For 10k, 100k and 1M items (quick: 5k and 20k) of dimension 64,
   L2-normalised float32 vectors with cluster structure (1,000 Gaussian centres, unit
   within-cluster noise per dimension, so clusters overlap), build ``flat``, ``ivf`` and
   ``hnsw`` with the :class:`index.faiss_index.IndexConfig` defaults and measure the build
   time, recall@10 against exact (flat inner-product) search over 500 fresh queries from the
   same distribution, and the per-query latency of ``IndexSnapshot.search`` at batch 1 (p50 /
   p99 over 300 queries, Python call included, one FAISS thread as a serving worker has).
   Every size is built fully (the 1M-item HNSW build alone takes a few minutes on 2 cores);
   ``--hnsw-subset N`` builds HNSW above N items on a random N-item subset instead, measures
   recall and latency there and extrapolates the build time by ``N log N`` scaling (the row
   says so).
2. **Recommend latency.** ``serving.recommender.Recommender.recommend(k=10)`` over a 100k-item
   index (quick: 20k) of two-tower item vectors (``kind="auto"``: HNSW above 50k), 200
   candidates ranked by a small DCN-v2 ``TorchRanker`` and a Platt calibrator, 2,000
   sequential requests (quick: 300) from random users after 20 warm-up ones: p50 / p99
   wall time per request, requests/s, and the retrieve / rank split.
3. **Two-tower recall@10.** A synthetic log (``SyntheticConfig(n_impressions=1_000_000,
   n_users=2_000, n_items=1_000, drift_at=None, seed=0)``; quick: 100k impressions, 500
   users, 300 items) is learned in order, batches of 1,024 rows (``learn_many``), on the
   first 80%; then each click of the last 20% counts as a hit when its item is among the
   10 items retrieved for the row's user and context (exact search over the item vectors
   of every item seen in training). Variants: the default model (in-batch sampled softmax
   with logQ correction), ``info_nce`` (no correction) and the default plus hard negatives
   from a :class:`index.hard_negatives.HardNegativePool` refreshed every 100 batches, or
   at least 8 times (seen but not clicked, or ranked above a click; the share ramps to 0.5
   over 10k clicks), against a popularity baseline (the 10 most clicked items of the first
   80%) and random retrieval (10 / items); on the synthetic log also the ``oracle``: the
   generator's own expected clicks per request (:func:`logs.synthetic.click_propensity`,
   exposure x true click probability) ranked over the same catalogue, the ceiling for any
   retrieval model on that log; and the ``segment_oracle``, the same without each user's
   own taste (``click_propensity(..., personal=False)``: segment x category affinity, item
   bias, price and exposure), the ceiling of a model that learns nothing per user. The same
   on the Open Bandit Dataset sample
   (``random/all``, 10,000 impressions, ~40 clicks: a handful of test clicks, so only a
   sanity check) when ``../shared/data/obd`` exists.

The query-latency, serving and two-tower parts run torch and FAISS with one thread (single
queries and tiny tensors: a second thread only adds synchronisation, and under CPU
contention it costs 10x); the report records it. Index builds use every core. Writes
``bench/results/index.json`` (``index_quick.json``) and prints its tables.
"""

from __future__ import annotations

import math
import os
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bench.index_tables import index_table as table
from bench.run import (
    OBD_CSV,
    OBD_DIR,
    bench_parser,
    load_note,
    machine,
    publish,
    stamp,
)
from bench.vectors import N_CENTERS, clustered, percentiles_ms, recall, search_latency, threads
from index.faiss_index import IndexConfig, IndexHolder, build_snapshot
from index.hard_negatives import HardNegativePool
from learners.calibration import PlattCalibrator
from learners.ranker import RankerConfig, TorchRanker
from learners.two_tower import TwoTowerConfig, TwoTowerModel
from logs.obd import read_obd
from logs.offline import LogExamples, log_examples
from logs.synthetic import SyntheticConfig, click_propensity, generate
from serving.recommender import Recommender, ServingConfig

DIM = 64
FULL_SIZES = (10_000, 100_000, 1_000_000)
QUICK_SIZES = (5_000, 20_000)
KINDS = ("flat", "ivf", "hnsw")
RECALL_QUERIES = 500
LATENCY_QUERIES = 300
K = 10
FULL_RECOMMEND = (100_000, 2_000)  # items, requests
QUICK_RECOMMEND = (20_000, 300)
FULL_LOG = SyntheticConfig(
    n_impressions=1_000_000, n_users=2_000, n_items=1_000, drift_at=None, seed=0
)
QUICK_LOG = SyntheticConfig(n_impressions=100_000, n_users=500, n_items=300, drift_at=None, seed=0)
TRAIN_FRACTION = 0.8
BATCH = 1_024
POOL_REFRESH_BATCHES = 100  # at most; at least 8 refreshes in a shorter log
FULL_HNSW_SUBSET: int | None = None  # build every size fully
HARD_RAMP = 10_000  # clicks; the full log has ~32k training clicks


def index_kinds(sizes: tuple[int, ...], hnsw_subset: int | None) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for n in sizes:
        vecs = clustered(n, DIM, seed=n)
        ids = [f"i{j}" for j in range(n)]
        queries = clustered(RECALL_QUERIES + LATENCY_QUERIES, DIM, seed=n + 1)
        q_recall, q_latency = queries[:RECALL_QUERIES], queries[RECALL_QUERIES:]
        exact: dict[int, np.ndarray] = {}
        for kind in KINDS:
            cfg = IndexConfig(kind=kind)
            m = n
            if kind == "hnsw" and hnsw_subset is not None and n > hnsw_subset:
                m = hnsw_subset
            sub = np.sort(np.random.default_rng(7).choice(n, m, replace=False)) if m < n else None
            v = vecs if sub is None else vecs[sub]
            sub_ids = ids if sub is None else [ids[j] for j in sub]
            t = time.perf_counter()
            snap = build_snapshot(sub_ids, v, version=1, config=cfg)
            build_s = time.perf_counter() - t
            if m not in exact:
                exact_cfg = IndexConfig(kind="flat")
                flat = (
                    snap
                    if kind == "flat"
                    else build_snapshot(sub_ids, v, version=1, config=exact_cfg)
                )
                exact[m] = flat.search(q_recall, K)[1]
            got = snap.search(q_recall, K)[1]
            row: dict[str, Any] = {
                "n": n,
                "kind": kind,
                "measured_on": m,
                "build_s": build_s,
                "recall_at_10": recall(got, exact[m]),
                **search_latency(snap, q_latency, K),
            }
            if kind == "ivf":
                row["nlist"], row["nprobe"] = cfg.ivf_cells(m), cfg.ivf_nprobe
            if kind == "hnsw":
                row["m"], row["ef_search"] = cfg.hnsw_m, cfg.hnsw_ef_search
            if m < n:
                row["build_s"] = build_s * (n / m) * (math.log(n) / math.log(m))
                row["note"] = (
                    f"built on a random {m:,}-item subset ({build_s:.1f} s); build time "
                    "extrapolated by N log N, recall and latency measured on the subset"
                )
            rows.append(row)
            print(
                f"  n={n:>9,} {kind:<5} build {row['build_s']:7.2f} s  recall@10 "
                f"{row['recall_at_10']:.3f}  p50 {row['p50_ms']:.3f} ms  p99 "
                f"{row['p99_ms']:.3f} ms" + ("  (extrapolated)" if m < n else ""),
                flush=True,
            )
            del snap
    return rows


def recommend_latency(n_items: int, n_requests: int) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    items = [f"i{j}" for j in range(n_items)]
    users = [f"u{j}" for j in range(10_000)]
    devices = ("mobile", "desktop", "tablet")
    tower = TwoTowerModel(TwoTowerConfig(), seed=0)
    ranker = TorchRanker(
        RankerConfig(model="dcnv2", embedding_dim=16, hidden=(64, 32)), seed=0, online=False
    )
    for _ in range(20):  # some training, so the weights are not at their initial values
        rows = [
            {"user_id": users[rng.integers(len(users))], "item_id": items[rng.integers(n_items)],
             "position": int(rng.integers(1, 4)), "ctx_device": devices[rng.integers(3)]}
            for _ in range(1_024)
        ]  # fmt: skip
        y = (rng.random(1_024) < 0.05).astype(np.float64)
        ranker.learn_many(rows, y)
        tower.learn_many(rows, y)
    t = time.perf_counter()
    vectors = tower.item_vectors(items)
    holder = IndexHolder()
    holder.swap(build_snapshot(items, vectors, version=1))
    build_s = time.perf_counter() - t
    calibrator = PlattCalibrator(1.1, -0.2)
    rec = Recommender(
        holder, lambda: ranker, lambda: (calibrator, 1), tower.user_vectors, ServingConfig()
    )
    requests = [
        (users[rng.integers(len(users))], {"ctx_device": devices[rng.integers(3)]})
        for _ in range(n_requests + 20)
    ]
    for user, ctx in requests[:20]:
        rec.recommend(user, 10, ctx)
    times, retrieve, rank = [], [], []
    t0 = time.perf_counter()
    for user, ctx in requests[20:]:
        t = time.perf_counter()
        out = rec.recommend(user, 10, ctx)
        times.append(time.perf_counter() - t)
        retrieve.append(out["timing_ms"]["retrieve"])
        rank.append(out["timing_ms"]["rank"])
    total = time.perf_counter() - t0
    snap = holder.current
    assert snap is not None
    return {
        "items": n_items,
        "requests": n_requests,
        "k": 10,
        "candidates": ServingConfig().candidates,
        "index_kind": snap.kind,
        "index_build_s": build_s,
        "ranker": "dcnv2 (embedding_dim=16, hidden=(64, 32), cross_layers=2)",
        "retrieval_model": out["retrieval_model"],
        **percentiles_ms(times),
        "requests_per_s": n_requests / total,
        "retrieve_p50_ms": float(np.median(retrieve)),
        "rank_p50_ms": float(np.median(rank)),
    }


class _PoolFeeder:
    """Keeps a hard-negative pool fresh while a two-tower model trains (as the indexer does)."""

    def __init__(self, model: TwoTowerModel, seed: int) -> None:
        self.model = model
        self.pool = HardNegativePool(per_user=20, max_users=5_000)
        self.rng = np.random.default_rng(seed)
        self.clicks: OrderedDict[str, set[str]] = OrderedDict()
        self.seen: dict[str, set[str]] = {}
        self.version = 0
        model.hard_negatives = lambda user, n: self.pool.sample(user, n, self.rng)

    def observe(self, rows: list[dict[str, object]], y: np.ndarray) -> None:
        for row, label in zip(rows, y.tolist(), strict=True):
            user, item = str(row["user_id"]), str(row["item_id"])
            clicks = self.clicks.setdefault(user, set())
            self.clicks.move_to_end(user)
            self.seen.setdefault(user, set()).add(item)
            if label > 0:
                clicks.add(item)

    def refresh(self, items: list[str]) -> None:
        self.version += 1
        snap = build_snapshot(
            items, self.model.item_vectors(items), version=self.version, config=IndexConfig()
        )
        users = list(reversed(self.clicks))
        self.pool.refresh(
            snap, users, self.model.user_vectors(users), self.clicks, 0.0, seen=self.seen
        )


def _train(
    model: TwoTowerModel, ex: LogExamples, split: int, feeder: _PoolFeeder | None
) -> list[str]:
    items: dict[str, None] = {}
    refresh_every = max(5, min(POOL_REFRESH_BATCHES, split // BATCH // 8))
    for b, s in enumerate(range(0, split, BATCH)):
        rows, y = ex.rows[s : min(s + BATCH, split)], ex.y[s : min(s + BATCH, split)]
        for r in rows:
            items[str(r["item_id"])] = None
        if feeder is not None:
            feeder.observe(rows, y)
            if b and b % refresh_every == 0:
                feeder.refresh(list(items))
        model.learn_many(rows, y)
    return list(items)


def two_tower_recall(
    ex: LogExamples,
    variants: dict[str, Callable[[], TwoTowerModel]],
    oracle: Callable[[list[str], list[str]], np.ndarray] | None = None,
    segment_oracle: Callable[[list[str], list[str]], np.ndarray] | None = None,
) -> dict[str, Any]:
    """Recall@K of each variant (trained on the first ``TRAIN_FRACTION`` of the log) on the
    clicks of the tail; ``oracle(user_ids, item_ids)`` (a score matrix) adds the ceiling
    row ``oracle`` ranked over the same training catalogue, ``segment_oracle`` the row
    ``segment_oracle`` (the ceiling without per-user taste)."""
    split = int(TRAIN_FRACTION * len(ex))
    test = [i for i in range(split, len(ex)) if ex.y[i] > 0]
    clicked = Counter(str(ex.rows[i]["item_id"]) for i in range(split) if ex.y[i] > 0)
    popular = {item for item, _ in clicked.most_common(K)}
    truth = [str(ex.rows[i]["item_id"]) for i in test]
    out: dict[str, Any] = {
        "train_rows": split,
        "train_clicks": int(ex.y[:split].sum()),
        "test_clicks": len(test),
        "models": {},
    }
    n_items = 0
    for name, make in variants.items():
        t = time.perf_counter()
        model = make()
        feeder = _PoolFeeder(model, seed=1) if name.endswith("hard_negatives") else None
        items = _train(model, ex, split, feeder)
        n_items = len(items)
        snap = build_snapshot(items, model.item_vectors(items), version=1, config=IndexConfig())
        top: Any = snap.search(model.user_vectors([ex.rows[i] for i in test]), K)[1] if test else []
        hits = [t_ in set(row) for t_, row in zip(truth, top, strict=True)]
        res: dict[str, Any] = {
            "recall_at_10": float(np.mean(hits)) if hits else math.nan,
            "train_s": time.perf_counter() - t,
            "steps": model.n_updates,
        }
        if feeder is not None:
            res.update(
                hard_share=model.hard_share,
                mean_hard_score=model.mean_hard_score,
                mean_random_score=model.mean_random_score,
                pool_users=feeder.pool.n_users,
                pool_size=feeder.pool.size,
            )
        out["models"][name] = res
        print(f"  {name}: recall@10 {res['recall_at_10']:.4f} ({res['train_s']:.1f} s)")
    pop_hits = [t_ in popular for t_ in truth]
    out["models"]["popularity"] = {"recall_at_10": float(np.mean(pop_hits)) if test else math.nan}
    out["models"]["random"] = {"recall_at_10": min(1.0, K / max(n_items, 1))}
    for name, score in (("oracle", oracle), ("segment_oracle", segment_oracle)):
        if score is None or not test:
            continue
        users = sorted({str(ex.rows[i]["user_id"]) for i in test})
        top_k = np.argsort(-score(users, items), axis=1)[:, :K]
        best = {u: {items[j] for j in row} for u, row in zip(users, top_k, strict=True)}
        hits = [t_ in best[str(ex.rows[i]["user_id"])] for t_, i in zip(truth, test, strict=True)]
        out["models"][name] = {"recall_at_10": float(np.mean(hits))}
        print(f"  {name}: recall@10 {out['models'][name]['recall_at_10']:.4f}")
    out["items"] = n_items
    print(f"  popularity: recall@10 {out['models']['popularity']['recall_at_10']:.4f}")
    return out


VARIANTS: dict[str, Callable[[], TwoTowerModel]] = {
    "two_tower": lambda: TwoTowerModel(TwoTowerConfig(), seed=0),
    "two_tower_info_nce": lambda: TwoTowerModel(TwoTowerConfig(loss="info_nce"), seed=0),
    "two_tower_hard_negatives": lambda: TwoTowerModel(
        TwoTowerConfig(max_hard_share=0.5, ramp_examples=HARD_RAMP), seed=0
    ),
}


def main(
    quick: bool = False, *, results_dir: Path | None = None, hnsw_subset: int | None = -1
) -> dict[str, Any]:
    """Run the benchmark, write its JSON, print its tables; the report.

    ``hnsw_subset``: build HNSW above this many items on a subset and extrapolate its build
    time; None builds every size fully; -1 (default) means ``FULL_HNSW_SUBSET`` in a full
    run and None in a quick one.
    """
    t0 = time.perf_counter()
    load_before = os.getloadavg()[0]
    notes: list[str] = []
    sizes = QUICK_SIZES if quick else FULL_SIZES
    if hnsw_subset == -1:
        hnsw_subset = None if quick else FULL_HNSW_SUBSET
    print("index kinds", flush=True)
    kinds = index_kinds(sizes, hnsw_subset)
    if any("note" in r for r in kinds):
        notes.append(f"HNSW above {hnsw_subset:,} items: build time extrapolated (see rows)")
    with threads(1):
        n_items, n_requests = QUICK_RECOMMEND if quick else FULL_RECOMMEND
        print(f"recommend ({n_items:,} items, {n_requests:,} requests)", flush=True)
        recommend = recommend_latency(n_items, n_requests)
        print(
            f"  p50 {recommend['p50_ms']:.2f} ms  p99 {recommend['p99_ms']:.2f} ms  "
            f"{recommend['requests_per_s']:.0f} req/s",
            flush=True,
        )
        log_cfg = QUICK_LOG if quick else FULL_LOG
        print(f"two-tower recall@10, synthetic ({log_cfg.n_impressions:,})", flush=True)
        retrieval: dict[str, Any] = {
            "synthetic": {
                "source": (
                    f"generate(SyntheticConfig(n_impressions={log_cfg.n_impressions}, "
                    f"n_users={log_cfg.n_users}, n_items={log_cfg.n_items}, drift_at=None, "
                    "seed=0))"
                ),
                **two_tower_recall(
                    log_examples(generate(log_cfg)),
                    VARIANTS,
                    oracle=lambda users, items: click_propensity(log_cfg, users, items),
                    segment_oracle=lambda users, items: click_propensity(
                        log_cfg, users, items, personal=False
                    ),
                ),
            }
        }
        if OBD_CSV.exists():
            print(f"two-tower recall@10, obd ({OBD_CSV})", flush=True)
            obd = log_examples(
                read_obd(OBD_CSV, item_context=OBD_CSV.with_name("item_context.csv"))
            )
            retrieval["obd"] = {"source": str(OBD_CSV), **two_tower_recall(obd, VARIANTS)}
        else:
            notes.append(f"OBD sample not found at {OBD_DIR}: obd rows skipped")
    notes.append(
        load_note(load_before) + " (timings are wall clock; a shared machine inflates them)"
    )
    report: dict[str, Any] = {
        **stamp("index", quick),
        "machine": {**machine(), "threads_latency_serving_two_tower": 1},
        "wall_seconds": round(time.perf_counter() - t0, 1),
        "notes": notes,
        "index": {
            "dim": DIM,
            "data": f"{N_CENTERS} Gaussian centres + N(0, 1) noise per dimension, normalised",
            "recall_queries": RECALL_QUERIES,
            "latency_queries": LATENCY_QUERIES,
            "config": "IndexConfig defaults per kind",
            "results": kinds,
        },
        "recommend": recommend,
        "retrieval": retrieval,
    }
    return publish(report, results_dir, "index", quick, table)


def cli(argv: list[str] | None = None) -> int:
    parser = bench_parser("index", __doc__, "smoke sizes (< 60 s)")
    parser.add_argument(
        "--hnsw-subset",
        type=int,
        default=-1,
        help="build HNSW above this many items on a subset and extrapolate its build time "
        "(default and 0: build every size fully)",
    )
    args = parser.parse_args(argv)
    subset = None if args.hnsw_subset == 0 else args.hnsw_subset
    main(args.quick, results_dir=args.results_dir, hnsw_subset=subset)
    return 0


if __name__ == "__main__":
    raise SystemExit(cli())
