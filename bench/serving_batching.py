"""Request micro-batching in process: concurrent ``/recommend`` answers, batched or not.

Run ``python -m bench.serving_batching`` (1M-item index, ~3 min on 2 cores) or ``--quick``
(100k items). The catalogue, the two-tower model and the ranker are those of
``bench.index_scale`` (IVF index at the :class:`index.faiss_index.IndexConfig` defaults, a
small DCN-v2 ranker, a Platt calibrator, 200 candidates, k = 10). ``CLIENTS`` threads each
send requests back to back (closed loop), in three modes:

- ``sequential``: one client, ``Recommender.recommend`` (the floor for latency);
- ``unbatched``: ``CLIENTS`` clients each calling ``Recommender.recommend`` themselves
  (threads contend for the GIL and the cores, as a thread-pool server does);
- ``batched``: the same clients through one :class:`serving.recommender.RequestBatcher`
  (``max_batch`` 32, ``max_wait_s`` 1 ms): one user-tower call, one FAISS search and one
  ranker call per batch.

Per mode: per-request latency p50 / p99 (client side, queueing included), answers per
second, and for ``batched`` the mean batch size. One torch and one FAISS thread.
Run with ``OMP_NUM_THREADS=1`` (FAISS threads of the client and batcher threads).
Writes ``bench/results/serving_batching.json`` (``serving_batching_quick.json``).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bench.index_scale import catalogue_rows, train_tower
from bench.run import bench_cli, load_note, machine, publish, stamp
from bench.vectors import percentiles_ms, threads
from index.faiss_index import IndexHolder, build_snapshot
from learners.calibration import PlattCalibrator
from learners.ranker import RankerConfig, TorchRanker
from serving.batching import RequestBatcher
from serving.recommender import Recommender, ServingConfig

NAME = "serving_batching"
CLIENTS = 8
FULL = (1_000_000, 250)  # items, requests per client
QUICK = (100_000, 60)
MAX_BATCH = 32
MAX_WAIT_S = 0.001
DEVICES = ("mobile", "desktop", "tablet")


def closed_loop(
    call: Callable[[str, dict[str, Any]], Any], users: list[str], clients: int, per_client: int
) -> dict[str, Any]:
    """``clients`` threads, each sending ``per_client`` requests back to back."""
    times: list[list[float]] = [[] for _ in range(clients)]
    barrier = threading.Barrier(clients + 1)

    def client(c: int) -> None:
        rng = np.random.default_rng(100 + c)
        barrier.wait()
        for _ in range(per_client):
            user = users[rng.integers(len(users))]
            t = time.perf_counter()
            call(user, {"ctx_device": DEVICES[rng.integers(3)]})
            times[c].append(time.perf_counter() - t)

    workers = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for w in workers:
        w.start()
    barrier.wait()
    t0 = time.perf_counter()
    for w in workers:
        w.join()
    wall = time.perf_counter() - t0
    flat = [t for ts in times for t in ts]
    return {
        "clients": clients,
        "requests": len(flat),
        **percentiles_ms(flat),
        "answers_per_s": len(flat) / wall,
    }


def main(quick: bool = False, *, results_dir: Path | None = None) -> dict[str, Any]:
    t0 = time.perf_counter()
    load_before = os.getloadavg()[0]
    n_items, per_client = QUICK if quick else FULL
    print(f"tower, catalogue of {n_items:,} items, index", flush=True)
    model, user_rows, known = train_tower()
    rows = catalogue_rows(n_items, known)
    ids = [str(r["item_id"]) for r in rows]
    vectors = model.catalogue_vectors(rows)
    del rows
    holder = IndexHolder()
    holder.swap(build_snapshot(ids, vectors, version=1))
    by_user = {str(r["user_id"]): r for r in user_rows}
    users = list(by_user)

    def user_vectors(rows: list[dict[str, object]]) -> np.ndarray:
        # the user's stored row (its behaviour) stands in for a feature stage's
        return model.user_vectors([by_user.get(str(r["user_id"]), r) for r in rows])

    rng = np.random.default_rng(1)
    ranker = TorchRanker(
        RankerConfig(model="dcnv2", embedding_dim=16, hidden=(64, 32)), seed=0, online=False
    )
    for _ in range(20):
        batch = [
            {"user_id": users[rng.integers(len(users))], "item_id": ids[rng.integers(n_items)],
             "position": int(rng.integers(1, 4)), "ctx_device": DEVICES[rng.integers(3)]}
            for _ in range(1_024)
        ]  # fmt: skip
        ranker.learn_many(batch, (rng.random(1_024) < 0.05).astype(np.float64))
    calibrator = PlattCalibrator(1.1, -0.2)
    rec = Recommender(
        holder, lambda: ranker, lambda: (calibrator, 1), user_vectors, ServingConfig()
    )
    report: dict[str, Any] = {
        **stamp(NAME, quick),
        "machine": {**machine(), "torch_and_faiss_threads": 1},
        "items": n_items,
        "index_kind": holder.current.kind if holder.current else None,
        "k": 10,
        "candidates": ServingConfig().candidates,
        "max_batch": MAX_BATCH,
        "max_wait_s": MAX_WAIT_S,
        "modes": {},
    }
    with threads(1):
        for _ in range(20):  # warm-up
            rec.recommend(users[0], 10, {"ctx_device": "mobile"})

        def direct(user: str, ctx: dict[str, Any]) -> Any:
            return rec.recommend(user, 10, ctx)

        report["modes"]["sequential"] = closed_loop(direct, users, 1, per_client * 2)
        report["modes"]["unbatched"] = closed_loop(direct, users, CLIENTS, per_client)
        batcher = RequestBatcher(rec, max_batch=MAX_BATCH, max_wait_s=MAX_WAIT_S)

        def batched(user: str, ctx: dict[str, Any]) -> Any:
            return batcher.recommend(user, 10, ctx)

        report["modes"]["batched"] = closed_loop(batched, users, CLIENTS, per_client)
        batcher.close()
        report["modes"]["batched"]["mean_batch"] = batcher.n_requests / max(batcher.n_batches, 1)
        report["modes"]["batched"]["max_batch_seen"] = batcher.max_seen
    report["notes"] = [
        load_note(load_before) + " (wall clock on a shared machine)",
        "closed loop: each client sends its next request when the previous one is answered",
    ]
    report["wall_seconds"] = round(time.perf_counter() - t0, 1)
    return publish(report, results_dir, NAME, quick, table)


def table(report: dict[str, Any]) -> str:
    lines = [
        "| mode | clients | p50 ms | p99 ms | answers/s | mean batch |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, m in report["modes"].items():
        mean = m.get("mean_batch")
        lines.append(
            f"| {name} | {m['clients']} | {m['p50_ms']:.2f} | {m['p99_ms']:.2f} | "
            f"{m['answers_per_s']:.0f} | {'-' if mean is None else format(mean, '.1f')} |"
        )
    return "\n".join(lines)


def cli(argv: list[str] | None = None) -> int:
    return bench_cli(NAME, __doc__, "100k items, 60 requests per client", main, argv)


if __name__ == "__main__":
    raise SystemExit(cli())
