"""The embedded broker's fetch cost against the record batches a partition holds.

Tansu 0.6's memory storage keeps every record batch as one object and never deletes one
(no retention), and each Fetch lists *every* batch object of the partition to find the
offsets it needs (``fetch`` in ``tansu-storage/src/dynostore.rs`` at v0.6.0: an
``object_store`` list of the partition's ``records/`` prefix into a ``BTreeSet``, then
``split_off(offset)``). So a consumer at the tail pays for the whole history on every
fetch, and a long run at a steady rate sees the broker's CPU and the consumers' latency
grow with time: what the 100- to 145-minute soaks (``bench.soak``) saw as label -> update
p99 creeping from ~1 s to ~10 s while the worker's own state was bounded. A harness limit,
not the worker's (Apache Kafka finds an offset in a segment index and drops old segments by
retention).

Run ``python -m bench.broker_fetch`` (levels up to 40,000 batches, ~1-2 minutes) or
``--quick`` (up to 4,000). A level whose last record does not come back within 30 s is
reported as not fetched and ends the run. One topic with one partition on a fresh broker;
batches of one 200-byte record are produced (``batch_size=0``: no batching) up to each
level, and at each level ``REPEATS`` fetches at the tail are timed: a consumer assigned to
the partition seeks to the last offset and polls until that record comes back (median and
p90, ms), with the broker's CPU seconds over those fetches from ``/proc/<pid>/stat``. The
fit: milliseconds per fetch per 10,000 batches held (least squares over the levels). Writes
``bench/results/broker_fetch.json`` (``broker_fetch_quick.json``).
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.run import bench_cli, load_note, machine, publish, stamp
from stream.broker import EmbeddedBroker, create_topics

LEVELS = (1_000, 5_000, 10_000, 20_000, 40_000)
QUICK_LEVELS = (500, 2_000, 4_000)
REPEATS = 30
TOPIC = "fetch-probe"
VALUE = b"x" * 200


def broker_cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (``/proc/<pid>/stat``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _produce(producer: Any, n: int) -> float:
    """Produce ``n`` one-record batches; returns the wall seconds."""
    t0 = time.perf_counter()
    futures = [producer.send(TOPIC, VALUE, partition=0) for _ in range(n)]
    producer.flush()
    if futures:
        futures[-1].get(timeout=60)  # the last one acknowledged: all are (one partition)
    return time.perf_counter() - t0


def _fetches(consumer: Any, tp: Any, last: int, repeats: int) -> list[float]:
    """Seconds for each of ``repeats`` seek-to-``last``-then-poll round trips."""
    out = []
    for _ in range(repeats):
        consumer.seek(tp, last)
        t0 = time.perf_counter()
        got = False
        while not got and time.perf_counter() - t0 < 30:
            for records in consumer.poll(timeout_ms=1_000, max_records=1).values():
                got = got or any(r.offset == last for r in records)
        if not got:
            raise TimeoutError(f"offset {last} not fetched within 30 s")
        out.append(time.perf_counter() - t0)
    return out


def measure(levels: tuple[int, ...], repeats: int = REPEATS) -> list[dict[str, Any]]:
    """One row per level: batches held, fetch latency quantiles (ms) and broker CPU."""
    from kafka import KafkaConsumer, KafkaProducer, TopicPartition

    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="streamrec-fetch-") as tmp:
        with EmbeddedBroker(log_path=Path(tmp) / "tansu.log") as broker:
            assert broker.pid is not None
            create_topics(broker.url, {TOPIC: 1})
            producer = KafkaProducer(bootstrap_servers=broker.url, batch_size=0, linger_ms=0,
                                     acks=1)  # fmt: skip
            consumer = KafkaConsumer(bootstrap_servers=broker.url, enable_auto_commit=False,
                                     group_id=None, fetch_max_wait_ms=10)  # fmt: skip
            tp = TopicPartition(TOPIC, 0)
            consumer.assign([tp])
            held = 0
            try:
                for level in levels:
                    produce_s = _produce(producer, level - held)
                    produced = level - held
                    held = level
                    cpu0 = broker_cpu_s(broker.pid)
                    try:
                        lat = _fetches(consumer, tp, held - 1, repeats)
                    except TimeoutError as exc:  # seen at 40,000 batches here: reported
                        rate = round(produced / produce_s, 1)
                        rows.append({"batches_held": held, "fetched": False, "error": str(exc),
                                     "produce_batches_per_s": rate})  # fmt: skip
                        print(rows[-1], flush=True)
                        break
                    cpu = broker_cpu_s(broker.pid) - cpu0
                    rows.append({
                        "batches_held": held,
                        "fetched": True,
                        "fetch_ms_p50": round(1e3 * float(np.median(lat)), 3),
                        "fetch_ms_p90": round(1e3 * float(np.quantile(lat, 0.9)), 3),
                        "broker_cpu_ms_per_fetch": round(1e3 * cpu / repeats, 3),
                        "produce_batches_per_s": round(produced / produce_s, 1),
                    })  # fmt: skip
                    print(rows[-1], flush=True)
            finally:
                producer.close(timeout=5)
                consumer.close()
    return rows


def fit_ms_per_10k(rows: list[dict[str, Any]], key: str = "fetch_ms_p50") -> float | None:
    """Least-squares slope of ``key`` against batches held, ms per 10,000 batches."""
    rows = [r for r in rows if r.get("fetched", True)]
    if len(rows) < 2:
        return None
    x = np.asarray([r["batches_held"] for r in rows], dtype=np.float64)
    y = np.asarray([r[key] for r in rows], dtype=np.float64)
    return round(float(np.polyfit(x, y, 1)[0]) * 1e4, 3)


def main(quick: bool = False, *, results_dir: Path | None = None) -> dict[str, Any]:
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    rows = measure(QUICK_LEVELS if quick else LEVELS)
    report: dict[str, Any] = {
        **stamp("broker_fetch", quick),
        "machine": machine(),
        "note": load_note(load_before),
        "wall_seconds": round(time.perf_counter() - t0, 1),
        "record_bytes": len(VALUE),
        "repeats": REPEATS,
        "levels": rows,
        "fit": {
            "fetch_ms_p50_per_10k_batches": fit_ms_per_10k(rows),
            "broker_cpu_ms_per_fetch_per_10k_batches": fit_ms_per_10k(
                rows, "broker_cpu_ms_per_fetch"
            ),
        },
        "source": "tansu-storage/src/dynostore.rs (v0.6.0), fn fetch: lists every batch "
        "object of the partition on each Fetch",
    }
    return publish(report, results_dir, "broker_fetch", quick, table)


def table(report: dict[str, Any]) -> str:
    lines = [
        "| batches held | fetch p50 ms | fetch p90 ms | broker CPU ms/fetch | produce batches/s |",
        "|---|---|---|---|---|",
    ]
    for r in report["levels"]:
        if not r.get("fetched", True):
            lines.append(f"| {r['batches_held']:,} | not fetched within 30 s | - | - | "
                         f"{r['produce_batches_per_s']:,.0f} |")  # fmt: skip
            continue
        lines.append(
            f"| {r['batches_held']:,} | {r['fetch_ms_p50']:.2f} | {r['fetch_ms_p90']:.2f} | "
            f"{r['broker_cpu_ms_per_fetch']:.2f} | {r['produce_batches_per_s']:,.0f} |"
        )
    fit = report["fit"]
    lines += ["", f"Fitted: fetch p50 +{fit['fetch_ms_p50_per_10k_batches']} ms and broker CPU "
              f"+{fit['broker_cpu_ms_per_fetch_per_10k_batches']} ms per fetch for every "
              "10,000 batches the partition holds."]  # fmt: skip
    return "\n".join(lines)


def cli(argv: list[str] | None = None) -> int:
    return bench_cli("broker_fetch", __doc__, "levels up to 4,000 batches", main, argv)


if __name__ == "__main__":
    raise SystemExit(cli())
