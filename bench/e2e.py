"""End-to-end streaming throughput: embedded broker + worker process(es) + replay.

Run ``python -m bench.e2e`` (100k impressions, about 4 minutes on 2 cores) or
``python -m bench.e2e --quick`` (10k). Everything runs on this machine: Tansu (memory
storage), one ``python -m stream.cli worker`` process with default settings, and
:func:`stream.replay.replay` publishing a synthetic log as fast as it can. Five phases,
each on a fresh broker:

1. **producer alone**: ``replay`` into the broker with no worker (records/s; records are
   impressions, clicks and watermarks), then two consumers of the same ``impressions`` and
   ``clicks`` records: a plain aiokafka consumer (bytes only, no group) and the same with
   :func:`logs.events.parse_input` on every record (the validation floor of the joiner).
2. **pipeline**: a worker that has joined its group, then ``replay``; ``/metrics`` is
   sampled every 0.5 s until every impression is scored. Throughput:

   - ``impressions_per_s``: impressions / (CreateTime of the last ``scored`` record minus
     CreateTime of the first ``impressions`` record; both stamped by their producers on
     this host);
   - ``steady_impressions_per_s``: the slope of ``streamrec_scored_total`` between 10% and
     90% of the impressions scored (excludes start-up and the final release);
   - ``ingest_impressions_per_s``: the same slope of ``streamrec_impressions_total``.

   Lag: replayed events (``on_progress``) minus events the joiner counted
   (``impressions_total + clicks_total``), sampled over time; its least-squares slope
   while the replay runs (``slope_events_per_s_during_replay``; positive: the worker
   falls behind the producer).
   Latency: for every clicked impression scored with label 1, the CreateTime of its
   ``scored`` record minus that of its ``clicks`` record (wall seconds from the click
   entering the broker to the model having learned from it, p50/p99; with the default
   ``emit_positives="window_close"`` the positive leaves the joiner when its window closes
   in event time, so in a replay this includes the wall time the replay takes to move the
   watermark 30 minutes of event time on); the same from the impression; and the
   quantiles the worker's histograms give
   (``streamrec_update_freshness_seconds``: label emitted -> model updated, wall;
   ``streamrec_label_delay_seconds``: impression -> label, event time) by linear
   interpolation inside buckets, as PromQL's ``histogram_quantile``.
   CPU seconds of the worker, the broker and this process (the producer) come from
   ``/proc`` and ``getrusage``.
3. **scale-out** (``--scale-out N``, default 2; 0 skips it): phase 2 again with N workers in
   one consumer group, started together. They split the input partitions, so the joiner
   runs in N processes; ``labeled`` has one partition, so one of them trains (docs/DESIGN.md:
   "more Faust workers for joiner and monitor; the trainer is one consumer of labeled").
   Metrics are summed over the workers; the ratio to phase 2 is reported.
4. **split** (unless ``--no-split``): phase 2 again with one ``--role joiner`` and one
   ``--role trainer`` worker (separate consumer groups: the trainer's fetches never wait
   behind an input backlog).
5. **profile** (unless ``--no-profile``): the pipeline again on the first 20k impressions
   of the log, with ``py-spy record --nonblocking --threads`` attached to the worker once
   it is ready (start-up excluded).
   Reported: samples per thread, the top functions by self and by inclusive samples, and
   the share of samples by the library the leaf frame is in. Without py-spy (``pip install
   py-spy``) this phase is skipped with a note; a cProfile alternative that needs no
   change to ``stream/``: ``python -m cProfile -o worker.prof -m stream.cli worker ...``
   (main thread only, written when the worker exits on SIGTERM).

The synthetic log has 10 impressions per second of event time, so the 30-minute join
window (+60 s lateness) holds ~18,600 impressions: labels flow from about then on and the
final watermark releases the last window at once.

Goal (issue #8): >= 20,000 impressions/s end to end on 2 cores.
Writes ``bench/results/e2e.json`` (``e2e_quick.json``) and prints a table
(:mod:`bench.e2e_table`); phase 1 is :mod:`bench.e2e_producer`, the measures of the others
:mod:`bench.e2e_measures`.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench.e2e_measures import (
    Sampler,
    downsample,
    fit_lag_slope,
    gc_pauses,
    histogram_quantile,
    merged_metrics,
    py_spy_binary,
    quantiles,
    record_times,
    slope_rate,
    start_py_spy,
    stop_py_spy,
    summarize_profile,
)
from bench.e2e_producer import producer_alone
from bench.e2e_table import goal_line, table
from bench.run import machine, results_path, stamp, write_report
from bench.workers import FINAL_GAP_S, cpu_seconds, self_cpu_seconds, worker_processes
from logs.batches import ScoredBatch
from logs.events import TOPIC_CLICKS, TOPIC_IMPRESSIONS, TOPIC_SCORED
from logs.io import read_log_frame, write_log
from logs.synthetic import SyntheticConfig, write_synthetic
from stream.broker import (
    EmbeddedBroker,
    read_records,
)
from stream.replay import ReplayStats, replay
from stream.settings import Settings

FULL_N = 100_000
QUICK_N = 10_000
EVENT_RATE = 10.0  # impressions per second of event time in the synthetic log
GOAL_IMPRESSIONS_PER_S = 20_000.0
WAIT_MIN_S, WAIT_RATE = 180.0, 100.0  # after the replay: wait max(180 s, n / 100/s)
SCALE_OUT_WORKERS = 2  # workers of the scale-out phase (docs/DESIGN.md: more joiner workers)
SPLIT_ROLES = ("joiner", "trainer")  # the split phase: one worker per side
PROFILE_N = 20_000  # impressions of the profiled run (a prefix of the log)


# --- phase 2: the pipeline ----------------------------------------------------------------------


def pipeline(
    log_path: Path,
    n: int,
    run_dir: Path,
    profile_out: Path | None = None,
    torch_threads: int | None = None,
    workers: int = 1,
    roles: tuple[str, ...] | None = None,
    fmt: str = "envelope",
) -> dict[str, Any]:
    """One broker, ``workers`` ready workers in one consumer group, one replay; waits until
    all ``n`` impressions are scored. With ``profile_out``, py-spy samples the (first)
    worker meanwhile.

    Several workers split the input partitions (and so the joiner); ``labeled`` has one
    partition, so one of them trains (see ``topic_plan``). They start together so that one
    group join assigns them all; the wait after ``Ready`` covers a second rebalance.
    ``roles`` (one per worker) runs them with ``--role`` instead."""
    if roles is not None:
        workers = len(roles)
    run_dir.mkdir(parents=True, exist_ok=True)
    with (
        EmbeddedBroker(log_path=run_dir / "tansu.log") as broker,
        worker_processes(broker.url, run_dir, workers, torch_threads, roles=roles) as procs,
    ):
        if workers > 1:
            time.sleep(Settings().rebalance_timeout_s + 1.0)
        worker = procs[0]
        spy = None
        if profile_out is not None:
            spy = start_py_spy(worker.proc.pid, profile_out, run_dir)
        t0 = time.monotonic()
        sampler = Sampler(procs, t0)
        thread = threading.Thread(target=sampler.run, daemon=True)
        thread.start()

        def worker_cpu() -> float:
            return sum(cpu_seconds(w.proc.pid) for w in procs)

        cpu = {"worker": worker_cpu(), "broker": cpu_seconds(broker.pid or 0)}
        self0 = self_cpu_seconds()
        stats: ReplayStats = replay(
            log_path, broker.url, progress=False, final_watermark_gap_s=FINAL_GAP_S,
            on_progress=sampler.on_progress, fmt=fmt,
        )  # fmt: skip
        t_replayed = time.monotonic() - t0
        sampler.progress.append((t_replayed, stats.impressions + stats.clicks))
        # generous: a busy machine can slow the trainer tenfold; past it, report what got
        # scored rather than nothing
        deadline = time.monotonic() + max(WAIT_MIN_S, n / WAIT_RATE)
        complete = False
        while not complete and time.monotonic() < deadline:
            for w in procs:
                w.check()
            complete = bool(sampler.samples) and sampler.samples[-1]["scored"] >= n
            time.sleep(0.1)
        t_done = time.monotonic() - t0
        cpu = {
            "worker": worker_cpu() - cpu["worker"],
            "broker": cpu_seconds(broker.pid or 0) - cpu["broker"],
            "bench_process(producer+sampler)": self_cpu_seconds() - self0,
        }
        sampler.stop()
        thread.join()
        if spy is not None:
            stop_py_spy(spy)
        final = merged_metrics(procs)
        scored = read_records(broker.url, TOPIC_SCORED)
        clicks = read_records(broker.url, TOPIC_CLICKS)
        impressions_ts = record_times(
            read_records(broker.url, TOPIC_IMPRESSIONS), TOPIC_IMPRESSIONS
        )
    click_ts = record_times(clicks, TOPIC_CLICKS)
    first_s = min(impressions_ts.values())
    last_s = max((r.timestamp / 1000 for r in scored), default=math.nan)
    click_lat, imp_lat = [], []
    n_scored = missing = 0
    for r in scored:
        batch = ScoredBatch.decode(r.value)
        t = r.timestamp / 1000
        n_scored += len(batch.impression_ids)
        for iid, y in zip(batch.impression_ids, batch.label, strict=True):
            if iid in impressions_ts:
                imp_lat.append(t - impressions_ts[iid])
            else:
                missing += 1
            if y == 1 and iid in click_ts:
                click_lat.append(t - click_ts[iid])
    seconds = last_s - first_s if scored else math.nan
    samples = sampler.samples
    lag_slope = fit_lag_slope(samples, t_replayed)
    lags = [s["lag"] for s in samples if s["t"] <= t_replayed]
    return {
        "workers": workers,
        "roles": list(roles) if roles else None,
        "impressions": stats.impressions,
        "clicks": stats.clicks,
        "scored_examples": n_scored,
        "impression_records_read_back": len(impressions_ts),
        "scored_without_impression_record": missing,
        "seconds_first_record_to_last_scored": seconds,
        "complete": complete,
        "impressions_per_s": n_scored / seconds,
        "steady_impressions_per_s": slope_rate(samples, "scored", n),
        "ingest_impressions_per_s": slope_rate(samples, "impressions", n),
        "replay_seconds": stats.seconds,
        "replay_impressions_per_s": stats.impressions / stats.seconds,
        "seconds_replay_end_to_all_scored": t_done - t_replayed,
        "lag": {
            "max_events": max((s["lag"] for s in samples), default=None),
            "at_replay_end_events": lags[-1] if lags else None,
            "slope_events_per_s_during_replay": lag_slope,
            "grows": None if lag_slope is None else lag_slope > 0,
        },
        "latency_s": {
            "click_to_update": quantiles(click_lat),
            "impression_to_update": quantiles(imp_lat),
            "label_to_update_histogram": {
                "p50": histogram_quantile(final, "streamrec_update_freshness_seconds", 0.5),
                "p99": histogram_quantile(final, "streamrec_update_freshness_seconds", 0.99),
            },
            "impression_to_label_event_time_histogram": {
                "p50": histogram_quantile(final, "streamrec_label_delay_seconds", 0.5),
                "p99": histogram_quantile(final, "streamrec_label_delay_seconds", 0.99),
            },
        },
        "cpu_seconds": cpu,
        "train_batches": final.get("streamrec_train_batches_total"),
        "train_step_seconds_mean": (
            final.get("streamrec_train_step_seconds_sum", 0.0)
            / max(1.0, final.get("streamrec_train_step_seconds_count", 0.0))
        ),
        # Python's garbage collector in the worker(s) (stream.collector): collections and
        # their seconds by generation, and the longest pause's histogram bucket
        "gc": gc_pauses(final),
        "samples": downsample(samples),
    }


# --- the benchmark ----------------------------------------------------------------------------


def run(
    quick: bool = False,
    results_dir: Path | None = None,
    *,
    n: int | None = None,
    profile: bool = True,
    run_dir: Path | None = None,
    torch_threads: int | None = None,
    scale_out: int = SCALE_OUT_WORKERS,
    split_roles: bool = True,
    json_phase: bool = True,
) -> dict[str, Any]:
    """Run the phases, write the JSON, print the table; the report.

    ``n`` overrides the number of impressions; ``run_dir`` keeps the logs (default: a
    temporary folder, removed afterwards); ``torch_threads`` sets the worker's
    ``OMP_NUM_THREADS`` (default: unset, torch uses one thread per core); ``scale_out``
    workers run the pipeline again in one group (0 or 1: skipped); ``split_roles`` runs it
    with one ``--role joiner`` and one ``--role trainer`` worker.
    """
    n_impressions = n or (QUICK_N if quick else FULL_N)
    t_start = time.perf_counter()
    load_before = os.getloadavg()
    tmp: Path | None = None  # a temporary run dir, removed unless the run fails
    if run_dir is None:
        tmp = run_dir = Path(tempfile.mkdtemp(prefix="streamrec-e2e-"))
    try:
        log_path = run_dir / "log.csv"
        cfg = SyntheticConfig(
            n_impressions=n_impressions, seed=0, drift_at=None, impressions_per_s=EVENT_RATE
        )
        write_synthetic(cfg, log_path)
        print(f"log: {n_impressions:,} impressions ({log_path})", flush=True)
        alone = producer_alone(log_path, run_dir)
        print(f"producer alone: {alone['events_per_s']:,.0f} events/s", flush=True)
        alone_json = producer_alone(log_path, run_dir, "json") if json_phase else None
        if alone_json is not None:
            print(f"producer alone, JSON records: {alone_json['events_per_s']:,.0f} events/s",
                  flush=True)  # fmt: skip
        pipe = pipeline(log_path, n_impressions, run_dir / "pipeline", None, torch_threads)
        print(f"pipeline: {pipe['impressions_per_s']:,.0f} impressions/s", flush=True)
        pipe_json: dict[str, Any] | None = None
        if json_phase:
            pipe_json = pipeline(log_path, n_impressions, run_dir / "pipeline-json", None,
                                 torch_threads, fmt="json")  # fmt: skip
            print(f"pipeline, JSON records: {pipe_json['impressions_per_s']:,.0f} "
                  "impressions/s", flush=True)  # fmt: skip
        scaled: dict[str, Any] | None = None
        if scale_out > 1:
            scaled = pipeline(log_path, n_impressions, run_dir / f"workers-{scale_out}", None,
                              torch_threads, workers=scale_out)  # fmt: skip
            print(f"pipeline, {scale_out} workers: {scaled['impressions_per_s']:,.0f} "
                  "impressions/s", flush=True)  # fmt: skip
        split: dict[str, Any] | None = None
        if split_roles:
            split = pipeline(log_path, n_impressions, run_dir / "split", None, torch_threads,
                             roles=SPLIT_ROLES)  # fmt: skip
            print(f"pipeline, joiner + trainer workers: {split['impressions_per_s']:,.0f} "
                  "impressions/s", flush=True)  # fmt: skip
        notes = [
            "every process shares this machine's cores: the numbers are only as quiet as the "
            "machine (see load_average_1m; above the core count means other work ran)"
        ]
        prof: dict[str, Any] | None = None
        if profile and py_spy_binary() is None:
            notes.append("profile skipped: py-spy not installed (pip install py-spy)")
        elif profile:
            out = run_dir / "py-spy.txt"
            n_prof = min(n_impressions, PROFILE_N)
            prof_log = log_path
            if n_prof < n_impressions:
                prof_log = run_dir / "profile-log.csv"
                write_log(read_log_frame(log_path).iloc[:n_prof], prof_log)
            prof_run = pipeline(prof_log, n_prof, run_dir / "profiled", out, torch_threads)
            prof = summarize_profile(out, prof_run["seconds_first_record_to_last_scored"])
            prof["profiled_run_impressions"] = n_prof
            prof["profiled_run_impressions_per_s"] = prof_run["impressions_per_s"]
    except BaseException:
        if tmp is not None:  # keep the logs of a failed run
            print(f"run failed; logs kept in {run_dir}", file=sys.stderr)
            tmp = None
        raise
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    rate = pipe["impressions_per_s"]
    if not pipe["complete"]:
        notes.append(
            f"the pipeline run timed out: {pipe['scored_examples']:,} of {n_impressions:,} "
            "impressions scored; rates are over what was scored"
        )
    report: dict[str, Any] = {
        **stamp("e2e", quick),
        "machine": machine(),
        "wall_seconds": round(time.perf_counter() - t_start, 1),
        "data": f"write_synthetic(SyntheticConfig(n_impressions={n_impressions}, seed=0, "
        f"drift_at=None, impressions_per_s={EVENT_RATE}))",
        "setup": "Tansu (memory storage) + one `python -m stream.cli worker` (default settings:"
        " 4 partitions, trainer batch 1024; the scale-out phase: N of them in one group) + "
        "stream.replay.replay as fast as possible, all on this machine",
        "worker_omp_num_threads": torch_threads,
        "producer_alone": alone,
        "producer_alone_json": alone_json,
        "pipeline": pipe,
        "pipeline_json": pipe_json,
        "scale_out": scaled,
        "split": split,
        "ratios": {
            "envelope_over_json_pipeline": (
                None if pipe_json is None else rate / pipe_json["impressions_per_s"]
            ),
            "envelope_over_json_replay": (
                None if alone_json is None else alone["events_per_s"] / alone_json["events_per_s"]
            ),
            "split_over_one_worker": None if split is None else split["impressions_per_s"] / rate,
            "scale_out_over_one_worker": (
                None if scaled is None else scaled["impressions_per_s"] / rate
            ),
            "pipeline_over_producer_alone": rate / alone["impressions_per_s"],
            "pipeline_over_raw_consume": rate / alone["raw_consume"]["impressions_per_s"],
            "pipeline_over_consume_parse": rate / alone["consume_parse"]["impressions_per_s"],
        },
        "goal": {
            "target": f">= {GOAL_IMPRESSIONS_PER_S:,.0f} impressions/s end to end on 2 cores",
            "impressions_per_s": rate,
            "ratio": rate / GOAL_IMPRESSIONS_PER_S,
        },
        "profile": prof,
        "load_average_1m": {"before": load_before[0], "after": os.getloadavg()[0]},
        "notes": notes,
    }
    write_report(report, out_path := results_path(results_dir, "e2e", quick))
    print(table(report))
    print(goal_line(report["goal"]))
    print(f"wrote {out_path}")
    return report


def cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.e2e", description=__doc__)
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_N:,} impressions")
    parser.add_argument("--n", type=int, default=None, help="impressions (overrides --quick)")
    parser.add_argument("--no-profile", action="store_true", help="skip the py-spy phase")
    parser.add_argument("--results-dir", type=Path, default=None)
    parser.add_argument("--run-dir", type=Path, default=None, help="keep logs here")
    parser.add_argument(
        "--worker-threads", type=int, default=None, help="OMP_NUM_THREADS of the worker"
    )
    parser.add_argument(
        "--scale-out", type=int, default=SCALE_OUT_WORKERS,
        help="workers of the scale-out phase (0: skip it)",
    )  # fmt: skip
    parser.add_argument(
        "--no-split", action="store_true", help="skip the joiner + trainer workers phase"
    )
    parser.add_argument(
        "--no-json", action="store_true", help="skip the single-event JSON records phases"
    )
    args = parser.parse_args(argv)
    run(args.quick, args.results_dir, n=args.n, profile=not args.no_profile,
        run_dir=args.run_dir, torch_threads=args.worker_threads,
        scale_out=args.scale_out, split_roles=not args.no_split,
        json_phase=not args.no_json)  # fmt: skip
    return 0


def markdown(report: dict[str, Any]) -> str:
    """``bench.run``'s README section: the table and the goal line."""
    return table(report) + "\n\n" + goal_line(report["goal"])


if __name__ == "__main__":
    raise SystemExit(cli())
