"""The feature follower's staleness under a paced stream, through the embedded broker.

A producer thread sends impressions (and a click right after 20% of them) stamped with
the wall clock when sent, in envelopes (``EventProducer``, 5 ms
linger), at ``rate`` impressions/s to a 4-partition ``impressions``/``clicks`` pair. A
:class:`stream.agents.FeatureFollowerAgent` in this process reads them outside any group
(what a ``serve`` or ``trainer`` worker runs) and, after every fetch that applied events,
the staleness ``now - newest event time applied`` is sampled (seconds; the gauge
``streamrec_feature_follower_staleness_seconds``): how long after an event was created
its effect is visible to ``/recommend`` on a worker that does not join (the producer's
envelope linger, the broker, the fetch wait and the stage).

``serving_cost``: milliseconds (wall and CPU) a replica's ranking step takes per answer
with the follower's history (the user's features read and encoded once per answer, each
candidate's own features apart: ``peek_many`` and ``CandidateRows`` extras), the same 8
answers per step (as the request batcher groups them), without history (one row encoded
once for all candidates) and ``per_candidate`` (history served the way it was before: one
``peek`` and one row per candidate), alternated in the same process.

Afterwards each partition's peek over every user x item must equal that of a
:class:`features.stage.FeatureStage` fed the partition's events (impressions, then clicks,
in the order produced): ``identical`` in the report (within :data:`TOLERANCE`: the two
apply impressions and clicks in different interleavings, which rounds decayed sums
differently in the last bits; ``peeks_bit_identical`` counts the exact ones).

    python -m bench.follower            # 20 s at 500 impressions/s
    python -m bench.follower --quick    # 5 s at 200 impressions/s
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.run import bench_cli, load_note, machine, publish, stamp
from features.stage import FeatureStage
from logs.events import (
    TOPIC_CLICKS,
    TOPIC_IMPRESSIONS,
    Click,
    Impression,
    example_row,
    with_history,
)
from monitoring.metrics import StreamrecMetrics
from stream.agents import FeatureFollowerAgent
from stream.app import create_worker_topics
from stream.broker import EmbeddedBroker, strip_scheme
from stream.producer import EventProducer, partition_of
from stream.services import FeatureFollower
from stream.services.follower import feature_config
from stream.settings import Settings

__all__ = ["follow_paced", "main", "table"]

PARTITIONS = 4
#: the follower and the reference apply a partition's impressions and clicks in different
#: interleavings (each consumer's fetches), and decayed sums round differently by order:
#: equal means the same keys, the same sequences, numbers within this (absolute, log1p
#: units)
TOLERANCE = 1e-9


def peek_diff(a: dict[str, object], b: dict[str, object]) -> float:
    """The largest absolute difference of two peeks' numbers; inf when their keys or
    non-numeric values (the click sequence) differ."""
    if a.keys() != b.keys():
        return float("inf")
    worst = 0.0
    for k, v in a.items():
        w = b[k]
        if isinstance(v, float) and isinstance(w, float):
            worst = max(worst, abs(v - w))
        elif v != w:
            return float("inf")
    return worst


N_USERS, N_ITEMS = 200, 50


def _produce(
    bootstrap: str, n: int, rate: float, seed: int, sent: list[tuple[str, int, Any]]
) -> None:
    """Send ``n`` impressions at ``rate``/s (and clicks); ``sent``: (topic, partition, event)."""
    from kafka import KafkaProducer

    rng = np.random.default_rng(seed)
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
    ep = EventProducer(producer, linger_s=0.005)
    start = time.monotonic()
    try:
        for i in range(n):
            due = start + i / rate
            wait = due - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            user = f"u{int(rng.integers(N_USERS))}"
            p = partition_of(user.encode(), PARTITIONS)
            imp = Impression(f"imp-{i}", time.time(), user, f"i{int(rng.integers(N_ITEMS))}",
                             position=int(rng.integers(1, 4)),
                             features={"item_cat": f"c{i % 5}"})  # fmt: skip
            ep.send_impression(imp.to_dict())
            sent.append((TOPIC_IMPRESSIONS, p, imp))
            if rng.random() < 0.2:
                click = Click(imp.impression_id, time.time(), user)  # clicked at once
                ep.send_click({"impression_id": click.impression_id, "ts": click.ts,
                               "user_id": user})  # fmt: skip
                sent.append((TOPIC_CLICKS, p, click))
            ep.poll()
        ep.flush()
        producer.flush()
    finally:
        producer.close()


async def follow_paced(
    bootstrap: str, n: int, rate: float, seed: int = 0, timeout_s: float = 120.0
) -> dict[str, Any]:
    """Produce ``n`` paced impressions while a follower reads them; returns the staleness
    samples' summary, the follower, and ``identical`` (peeks equal to the reference)."""
    settings = Settings(broker=bootstrap, partitions=PARTITIONS)
    create_worker_topics(settings)
    follower = FeatureFollower.from_settings(settings)
    agent = FeatureFollowerAgent(None, settings, StreamrecMetrics(), follower)
    await agent.start()
    sent: list[tuple[str, int, Any]] = []
    thread = threading.Thread(target=_produce, args=(bootstrap, n, rate, seed, sent))
    samples: list[float] = []
    deadline = time.monotonic() + timeout_s
    thread.start()
    try:
        while time.monotonic() < deadline:
            before = follower.n_events
            await agent.poll_once(timeout_ms=100)
            if follower.n_events > before:
                samples.append(follower.staleness_s())
            if not thread.is_alive() and follower.n_events >= len(sent):
                break
    finally:
        thread.join()
        await agent.stop()
    ref: dict[int, FeatureStage] = {}
    for topic in (TOPIC_IMPRESSIONS, TOPIC_CLICKS):
        for t, p, e in sent:
            if t != topic:
                continue
            st = ref.setdefault(p, FeatureStage(feature_config(settings)))
            if t == TOPIC_IMPRESSIONS:
                st.impression(e.impression_id, e.ts, e.user_id, e.item_id, e.position, e.features)
            else:
                st.click(e.impression_id, e.ts)
    at = time.time() + 60.0
    compared = nonempty = exact = 0
    max_diff = 0.0
    identical = follower.n_events == len(sent)
    for u in range(N_USERS):
        user = f"u{u}"
        mine, theirs = follower.stage_for(user), ref.get(partition_of(user.encode(), PARTITIONS))
        if mine is None or theirs is None:
            identical = identical and mine is theirs
            continue
        for it in range(0, N_ITEMS, 5):
            got = mine.peek(at, user, f"i{it}", 1, {"item_cat": "c1"})
            want = theirs.peek(at, user, f"i{it}", 1, {"item_cat": "c1"})
            exact += got == want
            d = peek_diff(got, want)
            identical = identical and d <= TOLERANCE
            max_diff = max(max_diff, d)
            compared += 1
            nonempty += float(got.get("hist_user_imp_1h", 0.0)) > 0  # type: ignore[arg-type]
    s = np.asarray(samples) if samples else np.asarray([np.nan])
    return {
        "impressions": n,
        "events_sent": len(sent),
        "events_applied": follower.n_events,
        "skipped": dict(follower.skipped),
        "rate_per_s": rate,
        "staleness_s": {
            "samples": len(samples),
            "p50": float(np.percentile(s, 50)),
            "p99": float(np.percentile(s, 99)),
            "max": float(np.max(s)),
        },
        "state_bytes": follower.approx_bytes(),
        "peeks_compared": compared,
        "peeks_nonempty": nonempty,
        "peeks_bit_identical": exact,
        "max_abs_diff": max_diff,
        "identical": bool(identical and compared > 0),
        "_follower": follower,  # for serving_cost; main drops it from the report
    }


BATCH = 8  # answers per ranking step in the batched row (serving.batch groups up to 32)


def serving_cost(follower: FeatureFollower, repeats: int = 3, users: int = 24) -> dict[str, Any]:
    """Milliseconds per answer of a replica's ranking step (``Recommender._p_raw``: rows,
    encoding, the worker's default ranker over 200 candidates) with the follower's history
    (the user's part read and encoded once per answer), without history, and
    ``per_candidate`` (history the way it was served before: one ``peek`` and one row per
    candidate), and ``with_history_batch8`` (8 answers per step, as the request batcher
    groups concurrent requests: their users share each item's part,
    :class:`features.stage.PeekCache`), alternated ``repeats`` times in this process (the
    ranker untrained: the cost is the same); wall and CPU milliseconds per answer."""
    from index.faiss_index import IndexHolder
    from learners.calibration import PlattCalibrator
    from learners.ranker import TorchRanker
    from serving.recommender import Recommender

    settings = Settings(partitions=PARTITIONS)
    if settings.trainer.torch_threads > 0:  # as a worker runs (stream.worker): 1 by default
        import torch

        torch.set_num_threads(settings.trainer.torch_threads)
    ranker = TorchRanker(settings.ranker, seed=0, online=False)
    cal = PlattCalibrator(1.0, 0.0)
    n_cand = settings.serving.candidates
    items = [f"i{k % N_ITEMS}" for k in range(n_cand)]
    ctx = {"item_cat": "c1"}
    recs = {
        "with_history": Recommender(IndexHolder(), lambda: ranker, lambda: (cal, 1),
                                    config=settings.serving, history=follower.stage_for),
        "without": Recommender(IndexHolder(), lambda: ranker, lambda: (cal, 1),
                               config=settings.serving),
    }  # fmt: skip
    pos = settings.serving.position

    def per_candidate(user: str) -> None:
        """The form before ``peek_many``: one peek and one row per candidate."""
        stage = follower.stage_for(user)
        assert stage is not None
        now = time.time()
        ranker.predict_proba_many(
            [
                example_row(
                    with_history(
                        Impression("serve", now, user, it, pos, dict(ctx)),
                        stage.peek(now, user, it, pos, ctx),
                    )
                )
                for it in items
            ]
        )

    def one_by_one(rec: Recommender) -> Any:
        return lambda names: [rec._p_raw(ranker, [(u, items, ctx)]) for u in names]

    def batched(names: list[str]) -> None:
        """``BATCH`` answers per ranking step, as the request batcher groups them."""
        for k in range(0, len(names), BATCH):
            recs["with_history"]._p_raw(ranker, [(u, items, ctx) for u in names[k : k + BATCH]])

    runs: dict[str, Any] = {name: one_by_one(rec) for name, rec in recs.items()}

    def per_candidate_all(names: list[str]) -> None:
        for u in names:
            per_candidate(u)

    runs["per_candidate"] = per_candidate_all
    runs[f"with_history_batch{BATCH}"] = batched
    ms: dict[str, list[float]] = {k: [] for k in runs}
    cpu: dict[str, list[float]] = {k: [] for k in runs}
    names = [f"u{u}" for u in range(users)]
    for _ in range(repeats):
        for name, run in runs.items():
            t0, c0 = time.perf_counter(), time.process_time()
            run(names)
            ms[name].append((time.perf_counter() - t0) * 1000 / users)
            cpu[name].append((time.process_time() - c0) * 1000 / users)
    return {
        "candidates": n_cand,
        "answers_per_run": users,
        "ms_per_answer": {k: [round(x, 3) for x in v] for k, v in ms.items()},
        # this process's CPU time (all its threads) per answer: less sensitive to a busy
        # machine than the wall clock
        "cpu_ms_per_answer": {k: [round(x, 3) for x in v] for k, v in cpu.items()},
        "ratio_median": float(np.median(ms["with_history"]) / np.median(ms["without"])),
        "per_candidate_over_with_history": float(
            np.median(ms["per_candidate"]) / np.median(ms["with_history"])
        ),
        f"with_history_over_batch{BATCH}": float(
            np.median(cpu["with_history"]) / np.median(cpu[f"with_history_batch{BATCH}"])
        ),
    }


def main(quick: bool = False, *, results_dir: Path | None = None) -> dict[str, Any]:
    load_before = os.getloadavg()[0]
    n, rate = (1000, 200.0) if quick else (10_000, 500.0)
    with EmbeddedBroker() as broker:
        result = asyncio.run(follow_paced(strip_scheme(broker.url), n, rate))
    result["serving_cost"] = serving_cost(result.pop("_follower"))
    report = {
        **stamp("follower", quick),
        "machine": machine(),
        "note": load_note(load_before),
        **result,
    }
    return publish(report, results_dir, "follower", quick, table)


def table(report: dict[str, Any]) -> str:
    s = report["staleness_s"]
    return "\n".join([
        "| rate (impr/s) | events | staleness p50 / p99 / max (s) | state bytes "
        "| peeks identical |",
        "|---|---|---|---|---|",
        f"| {report['rate_per_s']:g} | {report['events_applied']}/{report['events_sent']} | "
        f"{s['p50']:.3f} / {s['p99']:.3f} / {s['max']:.3f} | {report['state_bytes']:,} | "
        f"{report['identical']} (max diff {report['max_abs_diff']:.1e}; "
        f"{report['peeks_nonempty']}/{report['peeks_compared']} non-empty) |",
        "",
        f"ranking one answer ({report['serving_cost']['candidates']} candidates), ms, "
        f"alternated: {report['serving_cost']['ms_per_answer']} (with/without "
        f"{report['serving_cost']['ratio_median']:.2f}x; per candidate/with "
        f"{report['serving_cost']['per_candidate_over_with_history']:.2f}x)",
    ])  # fmt: skip


def cli(argv: list[str] | None = None) -> int:
    return bench_cli("follower", __doc__, "5 s at 200 impressions/s", main, argv)


if __name__ == "__main__":
    raise SystemExit(cli())
