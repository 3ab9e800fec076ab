"""Joiner benchmark: throughput, durable-state size, and labels against the offline join.

Two parts, one run:

* **In process** (no Kafka): the log's records, as the raw bytes ``replay`` sends, are
  hashed to 4 partitions by impression_id and consumed in random chunks per partition (the
  interleaving a Kafka consumer may produce), through :class:`stream.services.JoinService`
  with its durable state in memory (:class:`MemoryJoinState`, every change journalled as in
  the worker), and through a bare :class:`stream.join.OnlineJoiner` per partition (no
  parsing, no state journal) as the peer. Reported: impressions/s of each, the ratio,
  the state's peak size, and whether the labels equal :func:`stream.join.offline_join` of
  the same log (yes/no), on a synthetic log with long click delays (some beyond the window:
  they must stay negatives) and on the Open Bandit Dataset sample when ``../shared/data``
  is there.
* **Through the embedded broker**: ``streamrec worker`` (one process) with the RocksDB and
  the memory table store, the synthetic log replayed as fast as the producer goes;
  impressions labelled per second from the first record to the last label (the worker
  also trains, on the same 2 cores), the peak of ``streamrec_join_state_entries``, and
  whether ``labeled`` equals the offline join.

``python -m bench.joiner [--quick]`` writes ``bench/results/joiner.json``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bench.run import OBD_CSV, bench_cli, machine, publish, stamp
from logs.events import TOPIC_CLICKS, TOPIC_IMPRESSIONS, Click, Watermark
from logs.io import log_impressions, read_log_frame
from logs.obd import read_obd
from logs.synthetic import SyntheticConfig, write_synthetic
from monitoring.metrics import StreamrecMetrics
from stream.join import JoinConfig, OnlineJoiner, offline_join
from stream.replay import event_order
from stream.services import JoinService, MemoryJoinState
from stream.settings import Settings

PARTITIONS = 4
WATERMARK_EVERY = 2000


def records(df: pd.DataFrame, seed: int = 0) -> list[tuple[str, int, bytes]]:
    """(topic, partition, raw value) in a consumer's order: each partition in event-time
    order, partitions interleaved in random chunks of 1..500 records; producer watermarks
    on every partition every 2,000 events and a final one past every window."""
    payloads = [i.to_json() for i in log_impressions(df)]
    ids = df["impression_id"].astype(str).to_numpy()
    ev_ts, ev_row, ev_click = event_order(df)
    parts: list[list[tuple[str, int, bytes]]] = [[] for _ in range(PARTITIONS)]
    for k, (ts, row, is_click) in enumerate(
        zip(ev_ts.tolist(), ev_row.tolist(), ev_click.tolist(), strict=True)
    ):
        iid = ids[row]
        p = zlib.crc32(iid.encode()) % PARTITIONS
        if is_click:
            parts[p].append((TOPIC_CLICKS, p, Click(iid, ts).to_json()))
        else:
            parts[p].append((TOPIC_IMPRESSIONS, p, payloads[row]))
        if (k + 1) % WATERMARK_EVERY == 0 or k + 1 == len(ev_ts):
            wm_ts = ts if k + 1 < len(ev_ts) else ts + 1e6
            wm = Watermark(wm_ts).to_json()
            for q in range(PARTITIONS):
                parts[q].append((TOPIC_IMPRESSIONS, q, wm))
                parts[q].append((TOPIC_CLICKS, q, wm))
    rng = np.random.default_rng(seed)
    pos = [0] * PARTITIONS
    out: list[tuple[str, int, bytes]] = []
    while any(pos[p] < len(parts[p]) for p in range(PARTITIONS)):
        p = int(rng.integers(PARTITIONS))
        n = int(rng.integers(1, 501))
        out.extend(parts[p][pos[p] : pos[p] + n])
        pos[p] = min(pos[p] + n, len(parts[p]))
    return out


def final_labels(examples: list[Any]) -> dict[str, int]:
    """impression_id -> label (a correction turns a negative into a positive)."""
    labels: dict[str, int] = {}
    for e in examples:
        iid = e.impression.impression_id
        labels[iid] = max(labels.get(iid, 0), int(e.label))
    return labels


def offline(df: pd.DataFrame, window_s: float) -> dict[str, int]:
    from logs.events import Impression

    imps = [
        Impression(str(i), float(t), "u", "i")
        for i, t in zip(df["impression_id"], df["ts"], strict=False)
    ]
    clicked = df[df["click"] == 1]
    clicks = [
        Click(str(i), float(t))
        for i, t in zip(clicked["impression_id"], clicked["click_ts"], strict=False)
    ]
    return offline_join(imps, clicks, window_s)


def run_in_process(df: pd.DataFrame, name: str, config: JoinConfig) -> dict[str, Any]:
    recs = records(df)
    n_imp = len(df)
    settings = Settings(join=config)
    state = MemoryJoinState()
    service = JoinService(settings, StreamrecMetrics(), state)
    out: list[Any] = []
    peak = 0
    t0 = time.perf_counter()
    for k, (topic, partition, raw) in enumerate(recs):
        labels, dead = service.handle(raw, topic, partition, k)
        if dead is not None:
            raise RuntimeError(f"{name}: dead letter {dead.reason}: {dead.detail}")
        if labels:
            out.extend(labels)
        if k % 1000 == 0:
            for p, buf in service.take_outbox().items():
                service.sent(p, buf)
            peak = max(peak, len(state))
    for p, buf in service.take_outbox().items():
        service.sent(p, buf)
    service_s = time.perf_counter() - t0

    # the peer: bare joiners, events already parsed, no durable state
    from logs.events import parse_input

    parsed = [(topic, partition, parse_input(raw, topic)) for topic, partition, raw in recs]
    joiners = {p: OnlineJoiner(config) for p in range(PARTITIONS)}
    bare: list[Any] = []
    t0 = time.perf_counter()
    for topic, partition, ev in parsed:
        j = joiners[partition]
        if isinstance(ev, Watermark):
            bare.extend(j.on_watermark(ev.ts, "clicks" if topic == TOPIC_CLICKS else "impressions"))
        elif isinstance(ev, Click):
            bare.extend(j.on_click(ev))
        else:
            bare.extend(j.on_impression(ev))
    bare_s = time.perf_counter() - t0

    truth = offline(df, config.window_s)
    got = final_labels(out)
    mismatched = sum(1 for i, y in truth.items() if got.get(i) != y)
    return {
        "log": name,
        "impressions": n_imp,
        "clicks": int((df["click"] == 1).sum()),
        "records": len(recs),
        "service_impressions_per_s": n_imp / service_s,
        "bare_impressions_per_s": n_imp / bare_s,
        "service_vs_bare": (n_imp / service_s) / (n_imp / bare_s),
        "state_peak_entries": peak,
        "labels_identical_to_offline_join": mismatched == 0 and len(got) == len(truth),
        "mismatched": mismatched,
        "labelled": len(got),
        "duplicates_emitted": len(out) - len(got) - sum(e.kind == "correction" for e in out),
    }


def run_broker(log_path: Path, df: pd.DataFrame, store: str, window_s: float) -> dict[str, Any]:
    """One worker process on a fresh embedded broker; the log replayed at full speed."""
    from logs.batches import decode_labeled
    from logs.events import TOPIC_LABELED
    from stream.app import create_worker_topics
    from stream.broker import EmbeddedBroker, free_port, wait_for_port
    from stream.demo import read_topic, scrape
    from stream.replay import replay

    n = len(df)
    with tempfile.TemporaryDirectory() as tmp, EmbeddedBroker() as broker:
        settings = Settings(broker=broker.url, data_dir=str(Path(tmp) / "data"))
        create_worker_topics(settings)
        port = free_port()
        config = Path(tmp) / "worker.toml"
        config.write_text(f"[join]\nwindow_s = {window_s}\n")
        env = {**os.environ, "STREAMREC_TABLE_STORE": store,
               "STREAMREC_RECOVERY_CONSISTENCY_CHECK": "false"}  # fmt: skip
        with open(Path(tmp) / "worker.log", "wb") as wlog:
            worker = subprocess.Popen(
                [sys.executable, "-m", "stream.cli", "worker", "--broker", broker.url,
                 "--metrics-port", str(port), "--data-dir", settings.data_dir,
                 "--config", str(config)],
                stdout=wlog, stderr=subprocess.STDOUT, env=env,
            )  # fmt: skip
        try:
            wait_for_port("127.0.0.1", port, timeout_s=60)
            url = f"http://127.0.0.1:{port}/metrics"
            time.sleep(8)  # the consumer group settles (Tansu holds joins) before the clock
            stats: dict[str, Any] = {}
            t0 = time.monotonic()
            th = threading.Thread(
                target=lambda: stats.update(r=replay(
                    log_path, broker.url, progress=False, final_watermark_gap_s=window_s + 61
                )),
            )  # fmt: skip
            th.start()
            peak = 0.0
            first = None
            deadline = t0 + 600
            while True:
                if worker.poll() is not None:
                    raise RuntimeError(f"worker exited: {worker.returncode}")
                m = scrape(url)
                peak = max(peak, m.get("streamrec_join_state_entries", 0.0))
                if first is None and m.get("streamrec_impressions_total", 0) > 0:
                    first = time.monotonic()
                if m.get("sum:streamrec_labeled_total", 0) >= n:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"not labelled in time: {m}")
                time.sleep(0.25)
            wall = time.monotonic() - t0
            th.join()
            produced_s = stats["r"].seconds
            deadline = time.monotonic() + 60  # the last labels may still be in flight
            while True:
                examples = [
                    e.to_dict() for raw in read_topic(broker.url, TOPIC_LABELED)
                    for e in decode_labeled(raw)
                ]  # fmt: skip
                if len({e["impression_id"] for e in examples}) >= n:
                    break
                if time.monotonic() > deadline:
                    break
                time.sleep(1.0)
        finally:
            worker.terminate()
            try:
                worker.wait(timeout=30)
            except subprocess.TimeoutExpired:
                worker.kill()
    got: dict[str, int] = {}
    for e in examples:
        got[e["impression_id"]] = max(got.get(e["impression_id"], 0), int(e["label"]))
    truth = offline(df, window_s)
    mismatched = sum(1 for i, y in truth.items() if got.get(i) != y)
    return {
        "store": store,
        "impressions": n,
        "impressions_per_s": n / wall,
        "replay_producer_s": produced_s,
        "wall_s": wall,
        "state_peak_entries": peak,
        "labels_identical_to_offline_join": mismatched == 0 and len(got) == len(truth),
        "mismatched": mismatched,
        "duplicates": len(examples) - len(got),
    }


def main(quick: bool = False, results_dir: Path | None = None) -> dict[str, Any]:
    n = 20_000 if quick else 200_000
    window_s = 1800.0
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        log_path = Path(tmp) / "delays.csv"
        # mean click delay 10 min: about 5% of clicks land after the 30 min window
        write_synthetic(
            SyntheticConfig(n_impressions=n, seed=3, drift_at=None, click_delay_mean_s=600.0),
            log_path,
        )
        df = read_log_frame(log_path)
        late = df[(df["click"] == 1) & (df["click_ts"] - df["ts"] > window_s)]
        in_process = [run_in_process(df, f"synthetic {n:,} (delays)", JoinConfig())]
        print(_row(in_process[-1]), flush=True)
        if OBD_CSV.exists():
            obd = read_obd(OBD_CSV, item_context=OBD_CSV.parent / "item_context.csv")
            in_process.append(run_in_process(obd, "OBD random/all", JoinConfig()))
            print(_row(in_process[-1]), flush=True)
        n_broker = 10_000 if quick else 50_000
        broker_path = Path(tmp) / "broker.csv"
        write_synthetic(
            SyntheticConfig(n_impressions=n_broker, seed=4, drift_at=None,
                            click_delay_mean_s=600.0),
            broker_path,
        )  # fmt: skip
        bdf = read_log_frame(broker_path)
        broker_runs = []
        for store in ("rocksdb", "memory"):
            broker_runs.append(run_broker(broker_path, bdf, store, window_s))
            print(broker_runs[-1], flush=True)
    report = {
        **stamp("joiner", quick),
        "machine": machine(),
        "wall_seconds": round(time.perf_counter() - t_start, 1),
        "notes": [
            f"synthetic log: {len(late):,} clicks arrive after the {window_s:.0f} s window"
            " (must stay negatives)",
            "broker runs: one worker process (joiner + trainer + monitor) on the same 2 cores",
        ],
        "in_process": in_process,
        "broker": broker_runs,
    }
    return publish(report, results_dir, "joiner", quick, table)


def _row(r: dict[str, Any]) -> str:
    return (
        f"| {r['log']} | {r['impressions']:,} | {r['service_impressions_per_s']:,.0f} | "
        f"{r['bare_impressions_per_s']:,.0f} | {r['service_vs_bare']:.2f} | "
        f"{r['state_peak_entries']:,} | {'yes' if r['labels_identical_to_offline_join'] else 'NO'}"
        f" ({r['mismatched']} differ) |"
    )


def table(report: dict[str, Any]) -> str:
    lines = [
        "In process (4 partitions, random interleaving):",
        "",
        "| log | impressions | JoinService imp/s (parse + state) | bare OnlineJoiner imp/s |"
        " ratio | state peak entries | labels = offline join |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [_row(r) for r in report["in_process"]]
    lines += [
        "",
        "Through the embedded broker (one worker process, full-speed replay):",
        "",
        "| table store | impressions | labelled imp/s | state peak entries | duplicates |"
        " labels = offline join |",
        "|---|---|---|---|---|---|",
    ]
    for r in report["broker"]:
        lines.append(
            f"| {r['store']} | {r['impressions']:,} | {r['impressions_per_s']:,.0f} | "
            f"{r['state_peak_entries']:,.0f} | {r['duplicates']} | "
            f"{'yes' if r['labels_identical_to_offline_join'] else 'NO'}"
            f" ({r['mismatched']} differ) |"
        )
    return "\n".join(lines)


def cli(argv: list[str] | None = None) -> int:
    return bench_cli("joiner", __doc__, "20k in process, 10k via broker", main, argv)


if __name__ == "__main__":
    raise SystemExit(cli())
