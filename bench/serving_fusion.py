"""What the served candidate fusion costs: ``/recommend`` with and without it, same run.

Run ``python -m bench.serving_fusion [--movielens LOG]`` (``--quick``: a smaller world).
The log (the MovieLens dev log, else the history world of
:func:`bench.history_models.history_world`) is split 80/20 in time;
a :class:`learners.retrieval_fusion.FusedRetrieval` (defaults) learns the first 80% in
512-row batches, as the trainer feeds it (its cost per row is reported); every test click
is then a request: :meth:`serving.recommender.Recommender.recommend` (k = 10, 200
candidates) for the clicking user, the row's ``hist_seq`` given as context (as a feature
stage would give it), over an index of ``--items`` (1M) item vectors (the catalogue's items
first, the rest synthetic; a two-tower model and a DCN-v2 ranker, both untrained: their
cost does not depend on their weights), once with fusion and once without, the two
alternating request by request so that machine noise hits both alike. One thread for
torch and FAISS. Writes ``bench/results/serving_fusion.json``: p50/p99 of each, their
ratio, and the fusion's own ``fuse`` time per request.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.run import bench_parser, load_note, machine, publish, stamp
from bench.vectors import threads

NAME = "serving_fusion"


def _log(quick: bool, movielens: Path | None) -> tuple[Any, np.ndarray, str]:
    if movielens is not None:
        from logs.offline import load_examples

        ex = load_examples(str(movielens))
        return ex.rows, ex.y, str(movielens)
    from bench.history_models import WorldConfig, history_world

    wc = WorldConfig(n_impressions=60_000 if quick else 300_000)
    world = history_world(wc)
    return world.examples.rows, world.examples.y, f"history_world({wc})"


def main(
    quick: bool = False,
    *,
    results_dir: Path | None = None,
    movielens: Path | None = None,
    items: int = 1_000_000,
) -> dict[str, Any]:
    from index.faiss_index import IndexConfig, IndexHolder, build_snapshot
    from learners.calibration import PlattCalibrator
    from learners.ranker import RankerConfig, TorchRanker
    from learners.retrieval_fusion import FusedRetrieval, FusionConfig
    from learners.two_tower import TwoTowerConfig, TwoTowerModel
    from logs.events import SEQ_SEP
    from serving.recommender import Recommender, ServingConfig

    load_before = os.getloadavg()[0]
    t_start = time.perf_counter()
    rows, y, source = _log(quick, movielens)
    split = int(0.8 * len(rows))
    fusion = FusedRetrieval(FusionConfig())
    t = time.perf_counter()
    for s in range(0, split, 512):
        fusion.learn_many(rows[s : min(split, s + 512)], y[s : min(split, s + 512)])
    learn_s = time.perf_counter() - t
    catalogue = list(dict.fromkeys(str(r["item_id"]) for r in rows[:split]))
    n_items = max(items // (10 if quick else 1), len(catalogue))
    ids = catalogue + [f"synthetic{j}" for j in range(n_items - len(catalogue))]
    tower = TwoTowerModel(TwoTowerConfig(device="cpu"), seed=0)
    with threads(1):
        vectors = tower.catalogue_vectors([{"item_id": i} for i in ids])
    holder = IndexHolder()
    kind = "flat" if n_items <= 20_000 else "ivf"
    holder.swap(build_snapshot(ids, vectors, version=1, config=IndexConfig(kind=kind)))
    ranker = TorchRanker(RankerConfig(model="dcnv2", device="cpu"), seed=0, online=False)
    calibrator = PlattCalibrator(1.1, -0.2)

    def recommender(fused: bool) -> Recommender:
        return Recommender(holder, lambda: ranker, lambda: (calibrator, 1),
                           user_vectors=tower.user_vectors, config=ServingConfig(),
                           fusion=(lambda: fusion) if fused else None)  # fmt: skip

    recs = {"fused": recommender(True), "plain": recommender(False)}
    test = [r for r, label in zip(rows[split:], y[split:], strict=True) if label > 0]
    n_req = min(len(test), 400 if quick else 2_000)
    rng = np.random.default_rng(0)
    picked = [test[j] for j in rng.choice(len(test), n_req, replace=False)]
    requests = []
    for r in picked:
        hist = [str(h) for h in r.get("hist_seq") or []]
        ctx = {"hist_seq": SEQ_SEP.join(hist)} if hist else {}
        requests.append((str(r["user_id"]), ctx, hist))
    times: dict[str, list[float]] = {"fused": [], "plain": []}
    fuse_s: list[float] = []
    new_items = 0
    with threads(1):
        for user, ctx, _ in requests[:20]:  # warm-up
            for rec in recs.values():
                rec.recommend(user, 10, ctx)
        for n, (user, ctx, hist) in enumerate(requests):
            order = ("fused", "plain") if n % 2 == 0 else ("plain", "fused")
            for name in order:
                t = time.perf_counter()
                out = recs[name].recommend(user, 10, ctx)
                times[name].append(time.perf_counter() - t)
                assert len(out["items"]) == 10
            # the fusion step alone, on the index's 200 hits of this request
            vec = tower.user_vectors(recs["fused"].user_rows([(user, ctx)]))
            scores, hits = holder.current.search(vec, 200)  # type: ignore[union-attr]
            t = time.perf_counter()
            fused_items, _ = fusion.fuse([[str(i) for i in hits[0]]], scores, [hist], 200)[0]
            fuse_s.append(time.perf_counter() - t)
            new_items += len(set(fused_items) - {str(i) for i in hits[0]})

    def pct(v: list[float]) -> dict[str, float]:
        ms = 1e3 * np.asarray(v)
        return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
                "max_ms": float(ms.max())}  # fmt: skip

    fused, plain = pct(times["fused"]), pct(times["plain"])
    report: dict[str, Any] = {
        **stamp(NAME, quick),
        "machine": {**machine(), "torch_and_faiss_threads": 1},
        "source": source,
        "fusion_config": dataclasses.asdict(FusionConfig()),
        "items": n_items,
        "index_kind": kind,
        "requests": n_req,
        "learn": {
            "rows": split,
            "clicks": fusion.n_clicks,
            "seconds": round(learn_s, 3),
            "us_per_row": 1e6 * learn_s / max(split, 1),
            "covisit_entries": fusion.covisit.entries,
        },
        "recommend_fused": fused,
        "recommend_plain": plain,
        "p50_ratio": fused["p50_ms"] / plain["p50_ms"],
        "p99_ratio": fused["p99_ms"] / plain["p99_ms"],
        "fuse_alone": pct(fuse_s),
        "fused_items_not_in_index_hits_per_request": new_items / max(n_req, 1),
    }
    if movielens is not None:
        report["command"] += f" --movielens {movielens}"
    if items != 1_000_000:
        report["command"] += f" --items {items}"
    report["notes"] = [load_note(load_before)]
    report["wall_seconds"] = round(time.perf_counter() - t_start, 1)
    return publish(report, results_dir, NAME, quick, table)


def table(report: dict[str, Any]) -> str:
    f, p, a = report["recommend_fused"], report["recommend_plain"], report["fuse_alone"]
    return "\n".join([
        f"{report['requests']} requests, {report['items']:,} items ({report['index_kind']}), "
        f"{report['source']}",
        "",
        "| /recommend | p50 ms | p99 ms | max ms |",
        "|---|---:|---:|---:|",
        f"| fused | {f['p50_ms']:.2f} | {f['p99_ms']:.2f} | {f['max_ms']:.2f} |",
        f"| plain | {p['p50_ms']:.2f} | {p['p99_ms']:.2f} | {p['max_ms']:.2f} |",
        f"| fuse step alone | {a['p50_ms']:.2f} | {a['p99_ms']:.2f} | {a['max_ms']:.2f} |",
        "",
        f"fused / plain: p50 {report['p50_ratio']:.2f}x, p99 {report['p99_ratio']:.2f}x; "
        f"learning: {report['learn']['us_per_row']:.2f} µs per row "
        f"({report['learn']['clicks']:,} clicks of {report['learn']['rows']:,} rows)",
    ])  # fmt: skip


def cli(argv: list[str] | None = None) -> int:
    parser = bench_parser(NAME, __doc__, "a 60k-impression world, 1/10 of the items, 400 requests")
    parser.add_argument("--movielens", type=Path, default=None, help="MovieLens dev log")
    parser.add_argument("--items", type=int, default=1_000_000, help="index size")
    args = parser.parse_args(argv)
    main(args.quick, results_dir=args.results_dir, movielens=args.movielens, items=args.items)
    return 0


if __name__ == "__main__":
    raise SystemExit(cli())
