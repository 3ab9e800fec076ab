"""Replay throughput: ``streamrec replay`` into the embedded broker, envelopes vs JSON.

Run ``python -m bench.replay`` (200k synthetic impressions) or ``--quick`` (20k). For each
format (``envelope``: batched MessagePack envelopes per partition, the default; ``json``:
one record per event) a fresh embedded broker (Tansu, memory storage) with the worker's
topics, then :func:`stream.replay.replay` as fast as it can (no ``--speedup``): events/s
(impressions + clicks) over the replay's wall time, records sent, and the ratio of the
two formats measured in the same run.

Pacing: a third run replays the first seconds of the log with ``speedup`` so that it should
last ``PACED_WALL_S`` wall seconds; the lateness of every event is its record's CreateTime
minus its scheduled wall time (first event time + (ts - ts0) / speedup), reported as
p50/p99/max. Goal (issue #14): >= 100,000 events/s without ``--speedup``.
Writes ``bench/results/replay.json`` (``replay_quick.json``).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.run import bench_cli, machine, publish, stamp
from logs.events import TOPIC_CLICKS, TOPIC_IMPRESSIONS, InvalidEvent
from logs.io import read_log_frame, write_log
from logs.synthetic import SyntheticConfig, write_synthetic
from stream.app import create_worker_topics
from stream.broker import EmbeddedBroker, read_records
from stream.envelope import decode_envelope, is_envelope
from stream.replay import REPLAY_FORMATS, replay
from stream.settings import Settings

FULL_N = 200_000
QUICK_N = 20_000
GOAL_EVENTS_PER_S = 100_000
PACED_WALL_S = 5.0
PACED_SPEEDUP = 50.0


def _one(log: Path, run_dir: Path, fmt: str) -> dict[str, Any]:
    with EmbeddedBroker(log_path=run_dir / f"tansu-{fmt}.log") as broker:
        create_worker_topics(Settings(broker=broker.url), broker.url)
        stats = replay(log, broker.url, progress=False, fmt=fmt)
    return {
        "format": fmt,
        "impressions": stats.impressions,
        "clicks": stats.clicks,
        "records": stats.records,
        "seconds": round(stats.seconds, 3),
        "events_per_s": stats.events_per_s,
        "events_per_record": (stats.impressions + stats.clicks) / max(stats.records, 1),
    }


def _paced(log: Path, run_dir: Path) -> dict[str, Any]:
    """Lateness of each event against its scheduled wall time under ``speedup``."""
    df = read_log_frame(log)
    ts0 = float(df["ts"].min())
    part = df[df["ts"] < ts0 + PACED_WALL_S * PACED_SPEEDUP].reset_index(drop=True)
    part = part[part["click_ts"].isna() | (part["click_ts"] < part["ts"].max())]
    paced_log = run_dir / "paced.csv"
    write_log(part.reset_index(drop=True), paced_log)
    with EmbeddedBroker(log_path=run_dir / "tansu-paced.log") as broker:
        create_worker_topics(Settings(broker=broker.url), broker.url)
        t_start = time.time()
        stats = replay(paced_log, broker.url, progress=False, speedup=PACED_SPEEDUP)
        late: list[float] = []
        for topic in (TOPIC_IMPRESSIONS, TOPIC_CLICKS):
            for r in read_records(broker.url, topic):
                if not is_envelope(r.value):
                    continue  # watermarks
                for event, _ in decode_envelope(r.value, topic):
                    if isinstance(event, InvalidEvent):
                        continue
                    due = t_start + (event.ts - ts0) / PACED_SPEEDUP
                    late.append(r.timestamp / 1000 - due)
    lateness = np.asarray(late)
    return {
        "speedup": PACED_SPEEDUP,
        "events": len(late),
        "wall_seconds": round(stats.seconds, 3),
        "scheduled_seconds": round(float(part["ts"].max() - ts0) / PACED_SPEEDUP, 3),
        "lateness_s": {
            "p50": float(np.quantile(lateness, 0.5)),
            "p99": float(np.quantile(lateness, 0.99)),
            "max": float(lateness.max()),
            "min": float(lateness.min()),
        },
        "jitter_s_p99": float(np.quantile(lateness - lateness.min(), 0.99)),
        "note": "lateness = record CreateTime - scheduled wall time; the schedule starts when "
        "replay() is called (log reading included), so a constant start-up offset is in it",
    }


def main(quick: bool = False, *, results_dir: Path | None = None) -> dict[str, Any]:
    n = QUICK_N if quick else FULL_N
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="streamrec-replay-") as tmp:
        run_dir = Path(tmp)
        log = run_dir / "log.csv"
        write_synthetic(SyntheticConfig(n_impressions=n, seed=0, drift_at=None), log)
        rows = {fmt: _one(log, run_dir, fmt) for fmt in REPLAY_FORMATS}
        paced = _paced(log, run_dir)
    env = rows["envelope"]["events_per_s"]
    report: dict[str, Any] = {
        **stamp("replay", quick),
        "machine": machine(),
        "wall_seconds": round(time.perf_counter() - t0, 1),
        "data": f"write_synthetic(SyntheticConfig(n_impressions={n}, seed=0, drift_at=None))",
        "formats": rows,
        "paced": paced,
        "ratios": {"envelope_over_json": env / rows["json"]["events_per_s"]},
        "goal": {
            "target": f">= {GOAL_EVENTS_PER_S:,} events/s (envelopes, no --speedup)",
            "events_per_s": env,
            "ratio": env / GOAL_EVENTS_PER_S,
        },
    }
    return publish(report, results_dir, "replay", quick, table)


def table(report: dict[str, Any]) -> str:
    lines = ["| format | events/s | records | events/record |", "|---|---|---|---|"]
    for r in report["formats"].values():
        lines.append(
            f"| {r['format']} | {r['events_per_s']:,.0f} | {r['records']:,} | "
            f"{r['events_per_record']:,.1f} |"
        )
    p = report["paced"]
    lat = p["lateness_s"]
    lines += [
        "",
        f"envelope / JSON: {report['ratios']['envelope_over_json']:.2f}x. "
        f"Goal {report['goal']['target']}: {report['goal']['ratio']:.2f}x.",
        f"Paced (speedup {p['speedup']:g}, {p['events']:,} events, scheduled "
        f"{p['scheduled_seconds']} s, took {p['wall_seconds']} s): lateness p50 "
        f"{lat['p50']:.3f} s, p99 {lat['p99']:.3f} s, max {lat['max']:.3f} s "
        f"(p99 over the earliest: {p['jitter_s_p99']:.3f} s).",
    ]
    return "\n".join(lines)


def cli(argv: list[str] | None = None) -> int:
    return bench_cli("replay", __doc__, f"{QUICK_N:,} impressions", main, argv)


if __name__ == "__main__":
    raise SystemExit(cli())
