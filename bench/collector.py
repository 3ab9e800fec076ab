"""Python's garbage collector in the worker's services: Python's defaults against the
worker's settings (``gc_gen0_threshold``, ``gc_freeze``; :mod:`stream.collector`).

Run ``python -m bench.collector`` (about 2 minutes on 2 cores; ``--quick``: 10k
impressions, one round). Each run is a fresh process (the collector's state is the
process's) that drives the worker's services in process, as the worker chains them:
:class:`stream.services.JoinService` → :class:`~stream.services.TrainerService` (a step
whenever one is due, as the trainer agent steps) → :class:`~stream.services.MonitorService`,
control messages fed back, on a synthetic log of 50k impressions (10 a second of event
time; ``--rate R``: R a second, e.g. 1.6667 for 100 a minute, 500 for 30,000) with default
settings (historical features, fresh labels, dcnv2, one torch thread as the worker has);
``--log PATH``: the first 50k impressions of that log instead (e.g. MovieLens, ``streamrec
convert-movielens``). The two arms alternate, three rounds. Reported per run: wall seconds, the
join's and the trainer's share, and every collection by generation (count, total and
longest pause, timed with :class:`stream.collector.PauseRecorder`'s callback); per arm the
median. The worker's arm freezes after the services are built, as ``run_worker`` freezes
after ``create_app``.

No Kafka here: ``bench.e2e`` reports the same collector figures for the worker process
(``pipeline.gc``), where the end-to-end throughput is too noisy (±15% between runs) to
show a 5-10% change.

Writes ``bench/results/collector.json``.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.run import bench_parser, machine, results_path, stamp, write_report

FULL_N, QUICK_N = 50_000, 10_000
RATE = 10.0  # impressions per second of event time (the 30-minute window holds 18,000)
ARMS = {"python_defaults": (0, False), "worker_settings": None}  # None: Settings() defaults


def one_run(n: int, arm: str, rate: float = RATE, log: str | None = None) -> dict[str, Any]:
    """Drive the services over ``n`` impressions (synthetic, ``rate`` a second of event time;
    or the first ``n`` of the log ``log``) in this process under ``arm``."""
    import gc

    import torch
    from prometheus_client import CollectorRegistry, Histogram

    from logs.events import TOPIC_CLICKS, TOPIC_IMPRESSIONS, Click, Watermark
    from logs.io import log_impressions, read_log_frame
    from logs.synthetic import SyntheticConfig, generate
    from monitoring.metrics import StreamrecMetrics
    from stream.collector import PauseRecorder, configure_collector
    from stream.replay import event_order
    from stream.services import JoinService, MonitorService, TrainerService
    from stream.settings import Settings

    settings = Settings()
    torch.set_num_threads(settings.trainer.torch_threads)
    if log is None:
        df = generate(SyntheticConfig(n_impressions=n, seed=0, impressions_per_s=rate))
    else:  # the first n impressions of a log in the streamrec format
        df = read_log_frame(log).sort_values("ts", kind="stable").head(n).reset_index(drop=True)
    imps = log_impressions(df)
    ev_ts, ev_row, is_click = event_order(df)
    events: list[tuple[float, int, bytes]] = []
    for ts, row, click in zip(ev_ts.tolist(), ev_row.tolist(), is_click.tolist(), strict=True):
        imp = imps[row]
        raw = Click(imp.impression_id, ts, user_id=imp.user_id).to_json() if click else None
        events.append((ts, int(click), raw or imp.to_json()))
    join = JoinService(settings, StreamrecMetrics())
    trainer = TrainerService(settings, StreamrecMetrics())
    monitor = MonitorService(settings, StreamrecMetrics())
    chosen = ARMS[arm]
    threshold, freeze = (
        (settings.gc_gen0_threshold, settings.gc_freeze) if chosen is None else chosen
    )
    configure_collector(threshold, freeze)
    registry = CollectorRegistry()
    hist = Histogram("pause", "", ("generation",), registry=registry,
                     buckets=(1.0, float("inf")))  # fmt: skip
    rec = PauseRecorder(hist)
    longest = [0.0, 0.0, 0.0]
    start = [0.0]

    def longest_pause(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            start[0] = time.perf_counter()
        else:
            g = info["generation"]
            longest[g] = max(longest[g], time.perf_counter() - start[0])

    seconds = {"join": 0.0, "trainer": 0.0}
    topics = (TOPIC_IMPRESSIONS, TOPIC_CLICKS)
    offsets = [0, 0]

    def route(labels: list[Any], final: bool = False) -> None:
        t = time.perf_counter()
        trainer.add(labels)
        while trainer.due() or (final and trainer.buffer):
            batch = trainer.step()
            if batch is None:
                break
            for msg in monitor.observe(batch):
                trainer.apply_control(msg)
                monitor.apply_control(msg)
        seconds["trainer"] += time.perf_counter() - t

    def handle(raw: bytes, which: int) -> list[Any]:
        t = time.perf_counter()
        out, _ = join.handle(raw, topics[which], 0, offsets[which])
        offsets[which] += 1
        seconds["join"] += time.perf_counter() - t
        return out

    rec.install()
    gc.callbacks.append(longest_pause)
    t0 = time.perf_counter()
    try:
        for i, (ts, which, raw) in enumerate(events):
            route(handle(raw, which))
            if i % 200 == 199:
                for w in (0, 1):
                    route(handle(Watermark(ts).to_json(), w))
        end = Watermark(events[-1][0] + 10_000.0).to_json()
        for w in (0, 1):
            route(handle(end, w), final=True)
        wall = time.perf_counter() - t0
    finally:
        gc.callbacks.remove(longest_pause)
        rec.remove()
    by_gen = {
        str(g): {
            "collections": registry.get_sample_value("pause_count", {"generation": str(g)}),
            "seconds": registry.get_sample_value("pause_sum", {"generation": str(g)}),
            "longest_s": longest[g],
        }
        for g in range(3)
    }
    return {
        "arm": arm,
        "impressions_per_s_event_time": None if log else rate,
        "log": log,
        "gen0_threshold": threshold,
        "freeze": freeze,
        "impressions": n,
        "examples": trainer.n_examples,
        "seconds": wall,
        "impressions_per_s": n / wall,
        "join_seconds": seconds["join"],
        "trainer_seconds": seconds["trainer"],
        "gc": by_gen,
        "gc_seconds": sum(v["seconds"] for v in by_gen.values()),
    }


def main(
    quick: bool = False,
    *,
    results_dir: Path | None = None,
    rate: float = RATE,
    log: str | None = None,
) -> dict[str, Any]:
    n = QUICK_N if quick else FULL_N
    rounds = 1 if quick else 3
    runs: list[dict[str, Any]] = []
    for r in range(rounds):
        for arm in ARMS:
            out = subprocess.run(
                [sys.executable, "-m", "bench.collector", "--one", arm, "--n", str(n),
                 "--rate", str(rate), *(["--log", log] if log else [])],
                check=True, capture_output=True, text=True,
            )  # fmt: skip
            run = json.loads(out.stdout.strip().splitlines()[-1])
            run["round"] = r + 1
            runs.append(run)
            print(f"round {r + 1} {arm}: {run['seconds']:.2f} s, collector "
                  f"{run['gc_seconds']:.2f} s", flush=True)  # fmt: skip
    medians = {}
    for arm in ARMS:
        mine = [x for x in runs if x["arm"] == arm]
        medians[arm] = {
            "seconds": statistics.median(x["seconds"] for x in mine),
            "gc_seconds": statistics.median(x["gc_seconds"] for x in mine),
            "longest_pause_s": statistics.median(
                max(v["longest_s"] for v in x["gc"].values()) for x in mine
            ),
        }
    base, new = medians["python_defaults"], medians["worker_settings"]
    report = {
        **stamp("collector", quick),
        "machine": machine(),
        "impressions": n,
        "impressions_per_s_event_time": None if log else rate,
        "log": log,
        "rounds": rounds,
        "runs": runs,
        "median": medians,
        "ratios": {
            "seconds_worker_over_defaults": new["seconds"] / base["seconds"],
            "gc_seconds_worker_over_defaults": new["gc_seconds"] / max(base["gc_seconds"], 1e-9),
        },
    }
    write_report(report, path := results_path(results_dir, "collector", quick))
    print(table(report))
    print(f"wrote {path}")
    return report


def table(report: dict[str, Any]) -> str:
    rows = [
        "| arm | seconds (median) | collector seconds | longest pause (ms) |",
        "|---|---|---|---|",
    ]
    for arm, m in report["median"].items():
        rows.append(f"| {arm} | {m['seconds']:.2f} | {m['gc_seconds']:.2f} | "
                    f"{1e3 * m['longest_pause_s']:.0f} |")  # fmt: skip
    r = report["ratios"]
    rows.append("")
    time_ratio, gc_ratio = r["seconds_worker_over_defaults"], r["gc_seconds_worker_over_defaults"]
    rows.append(f"worker settings / Python's defaults: time {time_ratio:.2f}x, "
                f"collector time {gc_ratio:.2f}x")  # fmt: skip
    return "\n".join(rows)


def cli(argv: list[str] | None = None) -> int:
    parser = bench_parser("collector", __doc__, f"{QUICK_N:,} impressions, one round")
    parser.add_argument(
        "--one",
        choices=sorted(ARMS),
        default=None,
        help="internal: one run of this arm in this process, JSON on stdout",
    )
    parser.add_argument("--n", type=int, default=FULL_N)
    parser.add_argument("--rate", type=float, default=RATE,
                        help="impressions per second of event time (traffic)")  # fmt: skip
    parser.add_argument("--log", default=None, help="a log in the streamrec format instead")
    args = parser.parse_args(argv)
    if args.one is not None:
        print(json.dumps(one_run(args.n, args.one, args.rate, args.log)))
        return 0
    main(args.quick, results_dir=args.results_dir, rate=args.rate, log=args.log)
    return 0


if __name__ == "__main__":
    raise SystemExit(cli())
