"""Soak: a worker under paced replay for a long time; is anything growing without bound?

Run ``python -m bench.soak --minutes 30`` (the issue's bar: >= 30 minutes) or
``python -m bench.soak --quick`` (5 minutes: a smoke run, NOT the soak). Everything runs on
this machine: the embedded broker (Tansu, memory storage), one ``streamrec worker`` (role
``all``: joiner, trainer, monitor, indexer, /score) with a model store (a version every 30
s, ``keep`` 5) and checkpoints (every 30 s, ``keep_checkpoints`` 5), and
:func:`stream.replay.replay` publishing a synthetic log at ``--rate`` impressions per wall
second (paced: ``speedup = rate / 10`` event seconds per wall second; the log has 10
impressions per event second, so the 30-minute join window holds ~18,000 impressions).

Every ``--sample-s`` seconds (default 60: one row per minute) it records:

- ``worker_rss_mb``, ``broker_rss_mb`` (``/proc/<pid>/status`` VmRSS; the broker keeps
  every record in memory, so its growth is the harness's, not the worker's);
  ``worker_rss_min_mb``/``max_mb``: the extremes of the worker's RSS sampled every
  ``--rss-every-s`` seconds (5) over the row's interval (:mod:`bench.memory_series`): the
  minimum is the floor left once transient copies are freed; ``rss_heap_mb``,
  ``rss_anon_mb``, ``rss_file_mb``: the RSS split by kind of mapping (brk heap, other
  anonymous, file-backed), to attribute growth; ``malloc_<kind>_mb``: glibc's own count
  (the worker's ``streamrec_malloc_bytes``: ``in_use``, ``free`` kept in its arenas,
  ``arenas``, ``mmapped``), to tell live C-heap growth from fragmentation;
- state sizes: ``join_state_bytes`` (pending + done + orphans, the joiner's estimate),
  ``pending``, ``orphans_waiting``, ``join_state_entries``, ``feature_state_bytes`` (the
  feature stages' estimate; the soak sets ``feature_max_bytes`` to 128 MiB so that the
  bound is reached within the warm-up at 200 impressions/s) and ``feature_keys_evicted``;
- disk: ``data_dir_mb`` (the worker's RocksDB tables and run files), ``store_mb``,
  ``checkpoints_mb``;
- lag: ``lag_events`` (events replayed minus events the joiner consumed) and
  ``event_time_lag_s`` (the replay clock minus the join watermark: includes the 60 s
  allowed lateness);
- latency: ``score_ms_p50``/``p99`` of ``--requests`` ``POST /score`` calls (10 items);
  ``freshness_p50_s``/``p99_s``: label emitted -> ranker learned from it, over the
  sample's interval (the worker's ``streamrec_update_freshness_seconds`` histogram,
  interpolated in its buckets as PromQL's ``histogram_quantile``).
- ``load_1m``: the machine's 1-minute load average (the report gives its mean and maximum
  after the warm-up, ``load_1m_mean`` / ``load_1m_max``: slopes measured beside other work
  are not comparable with a quiet run's).

The report (``bench/results/soak_<minutes>m.json``, and ``.png`` with matplotlib) gives the
least-squares slopes after ``--warmup-frac`` of the run (default the first third) and up to
the first row where the worker is more than a minute of input behind (``backlog_from_s``; a
backlog grows the worker's buffers with the lag, and the embedded broker, which keeps every
record in memory, slows the worker so after about two hours at 200/s): RSS in
MB/hour and % of its mean per hour (bar: < 1 %/h), disk in MB/hour; ``memory_fits``: for
RSS, its floor and each kind of mapping, the least-squares slope with its standard error,
Theil-Sen's slope and whether slope + 2 SE is below 1 % of the mean RSS per hour (the bar
resolved, not only met by a noisy estimate); ``memory_fits_after_feature_bound``: the
floor, heap and anon fits again from the first row whose feature state reached 90 % of
its byte bound (``feature_state_full_at_s``; at 100/s that is ~40 minutes in, after the
default warm-up: the slopes then include the state still filling); and label -> update
p50/p99 over everything after the warm-up (a paced rate, unlike ``bench.e2e``'s backlog).

``--hostile-per-s N`` mixes hostile input into the same run (:mod:`bench.hostile`): every
second N bad ``impressions``/``clicks`` records (random bytes, NaN, ids past the limits,
future events, broken envelopes, ...) and one bad ``control`` record; once a minute three
oversized ones (64 KiB + 1 byte, 1 MB, 1.5 MB). Each row then adds ``hostile_sent``,
``dead_letters`` (the worker's ``streamrec_dead_letters_total``, all reasons),
``control_sent`` and ``control_rejected``; the report says whether every hostile record was
dead-lettered or rejected. The file name says the world: ``soak_40m_500users_hostile.json``,
and ``_<rate>ps`` when ``--rate`` is not 200.

``python -m bench.soak --refit REPORT --warmup-frac F [--segments 37-62,64-125]``
recomputes a saved report from its rows; ``--segments`` adds the fits of those stretches
(minutes) by kind of memory (:func:`segment_fits`: the floor, glibc's in-use, free and
arena bytes, anonymous memory that is not glibc's, the RSS less glibc's free memory), to
compare the parts of one run and to tell live memory from memory glibc keeps.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bench.e2e_measures import histogram_quantile
from bench.hostile import HOSTILE_CONTROL, hostile_records
from bench.memory_series import RssSampler, SlopeFit, rss_breakdown_mb, rss_mb, slope_fit
from bench.run import RESULTS_DIR, machine, write_report
from bench.workers import worker_process
from logs.events import TOPIC_CONTROL
from logs.io import read_log_frame
from logs.synthetic import SyntheticConfig, write_synthetic
from stream.app import ROCKSDB_MEMORY, create_worker_topics
from stream.broker import EmbeddedBroker, free_port
from stream.demo import scrape
from stream.replay import replay
from stream.settings import Settings

DEFAULT_RATE = 200.0  # impressions per wall second
EVENT_RATE = 10.0  # impressions per event-time second of the synthetic log
#: the synthetic log's users (its default). Per-user state fills with each user's history:
#: the trainer's shown items (50 a user) and the click sequence every kept impression
#: carries (``seq_len`` 20) take ~3 hours at 200/s for 5,000 users, ~15 minutes for 500
DEFAULT_USERS = 5_000
FEATURE_MAX_BYTES = 128 * 2**20  # below the default (512 MiB): reached within the warm-up
FULL_FRAC = 0.9  # the feature state counts as full from this share of FEATURE_MAX_BYTES
MALLOC_KINDS = ("in_use", "free", "arenas", "mmapped")  # streamrec_malloc_bytes{kind}
#: the slopes stop where the worker falls this many seconds of input behind (a backlog)
BACKLOG_S = 60.0
FRESHNESS = "streamrec_update_freshness_seconds"  # label emitted -> ranker learned, s
CONFIG = f"""
feature_max_bytes = {FEATURE_MAX_BYTES}
[trainer]
checkpoint_every_s = 30.0
keep_checkpoints = 5
[store]
publish_every_s = 30.0
keep = 5
"""


def du_mb(path: Path) -> float:
    """Bytes of the regular files under ``path`` (symlinks not followed), MB."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total / 1e6


def slope_per_hour(t_s: list[float], y: list[float]) -> float | None:
    """Least-squares slope of ``y`` against ``t_s`` (seconds), per hour; None if < 3 points.

    >>> round(slope_per_hour([0, 60, 120], [100.0, 101.0, 102.0]), 6)
    60.0
    """
    fit = slope_fit(t_s, y)
    return None if fit is None else fit.ols


def _fit_row(fit: SlopeFit | None, mean: float) -> dict[str, Any] | None:
    if fit is None:
        return None
    return {
        "ols_mb_per_h": round(fit.ols, 2),
        "se_mb_per_h": round(fit.se, 2),
        "theil_sen_mb_per_h": round(fit.theil_sen, 2),
        "ols_pct_per_h": round(100 * fit.ols / mean, 2),
        "ols_plus_2se_pct_per_h": round(100 * (fit.ols + 2 * fit.se) / mean, 2),
        "resolved_below_1pct_per_h": fit.resolved_below(0.01 * mean),
        "points": fit.n,
    }


def _score_latencies(web: str, items: list[str], n: int) -> list[float]:
    body = json.dumps({"user_id": "u1", "item_ids": items}).encode()
    out = []
    for _ in range(n):
        req = urllib.request.Request(f"{web}/score", data=body, method="POST")
        t0 = time.perf_counter()
        try:
            with urllib.request.urlopen(req, timeout=10) as r:  # noqa: S310  # loopback
                r.read()
            out.append((time.perf_counter() - t0) * 1e3)
        except OSError:
            pass  # counted by its absence
    return out


class HostileInjector(threading.Thread):
    """Sends hostile records beside the replay (see the module docstring); counts them."""

    def __init__(self, url: str, per_s: float, ts_range: tuple[float, float]) -> None:
        super().__init__(daemon=True, name="hostile")
        self.url, self.per_s, self.ts_range = url, per_s, ts_range
        self.stop = threading.Event()
        self.sent = 0  # impressions/clicks records
        self.control_sent = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        from kafka import KafkaProducer  # the replay's client; only this mode needs it here

        rng = random.Random(19)
        producer = KafkaProducer(bootstrap_servers=[self.url], max_request_size=8 << 20,
                                 linger_ms=20, batch_size=1 << 20)  # fmt: skip
        try:
            k = 0
            while not self.stop.wait(1.0):
                n = max(1, round(self.per_s))
                for b in hostile_records(rng, self.ts_range, n, oversized=k % 60 == 0):
                    producer.send(b.topic, b.value)
                    self.sent += 1
                raw = HOSTILE_CONTROL[k % len(HOSTILE_CONTROL)][0]  # None: a tombstone
                producer.send(TOPIC_CONTROL, raw, key=b"hostile")
                self.control_sent += 1
                k += 1
            producer.flush(timeout=60)
        except BaseException as e:  # reported in the results, never silently lost
            self.error = e
            print(f"hostile injector stopped: {e!r}", flush=True)
        finally:
            producer.close(timeout=10)


def _sum(m: dict[str, float], name: str) -> float:
    """The sum of metric ``name`` over all its label sets in a scrape."""
    return sum(v for k, v in m.items() if k == name or k.startswith(name + "{"))


def run(
    minutes: float = 30.0,
    rate: float = DEFAULT_RATE,
    sample_s: float = 60.0,
    requests: int = 20,
    warmup_frac: float = 1 / 3,
    results_dir: Path | None = None,
    keep: bool = False,
    users: int = DEFAULT_USERS,
    hostile_per_s: float = 0.0,
    rss_every_s: float = 5.0,
) -> dict[str, Any]:
    duration = minutes * 60.0
    speedup = rate / EVENT_RATE
    run_dir = Path(tempfile.mkdtemp(prefix="streamrec-soak-"))  # private (0700)
    log = run_dir / "log.csv"
    n = int(rate * duration) + 500  # the replay ends with the soak (then joined)
    write_synthetic(SyntheticConfig(n_impressions=n, n_users=users, seed=0,
                                    impressions_per_s=EVENT_RATE, drift_at=None), log)  # fmt: skip
    head = read_log_frame(log).head(200)
    items = [str(i) for i in head["item_id"].unique()[:10]]
    ts0 = float(head["ts"].min())
    cfg = run_dir / "soak.toml"
    cfg.write_text(CONFIG)
    store, ckpt = run_dir / "models", run_dir / "checkpoints"
    web_port = free_port()
    web = f"http://127.0.0.1:{web_port}"
    rows: list[dict[str, Any]] = []
    hists: list[dict[str, float]] = []  # label -> update buckets, one per row
    replayed = [0]
    os.environ.setdefault("STREAMREC_RECOVERY_CONSISTENCY_CHECK", "false")  # Tansu
    with EmbeddedBroker(log_path=run_dir / "tansu.log") as broker:
        create_worker_topics(Settings(broker=broker.url))
        args = ("--config", str(cfg), "--model-store", str(store), "--checkpoint-dir",
                str(ckpt), "--web-port", str(web_port))  # fmt: skip
        with worker_process(broker.url, run_dir, extra_args=args) as worker:
            t_start = time.time()
            sampler = RssSampler(worker.proc.pid, rss_every_s)
            sampler.start()

            def produce() -> None:
                replay(log, broker.url, speedup=speedup, progress=False,
                       on_progress=lambda k: replayed.__setitem__(0, k))  # fmt: skip

            producer = threading.Thread(target=produce, daemon=True)
            producer.start()
            ts_range = (ts0, ts0 + n / EVENT_RATE)
            hostile = HostileInjector(broker.url, hostile_per_s, ts_range)
            if hostile_per_s > 0:
                hostile.start()
            next_at = time.monotonic() + sample_s
            t0 = time.monotonic()
            while time.monotonic() - t0 < duration:
                time.sleep(max(0.0, next_at - time.monotonic()))
                next_at += sample_s
                worker.check()
                m = scrape(worker.metrics_url)
                lat = _score_latencies(web, items, requests)
                consumed = m.get("streamrec_impressions_total", 0.0) + m.get(
                    "streamrec_clicks_total", 0.0
                )
                wm = m.get("streamrec_event_time_watermark_seconds", math.nan)
                replay_clock = ts0 + (time.time() - t_start) * speedup
                state = _sum(m, "streamrec_join_state_bytes")
                rss_now = rss_mb(worker.proc.pid)
                between = [*sampler.take(), rss_now]  # the interval's samples and now
                kinds = rss_breakdown_mb(worker.proc.pid)
                rows.append({
                    "t_s": round(time.monotonic() - t0, 1),
                    "worker_rss_mb": round(rss_now, 1),
                    "worker_rss_min_mb": round(min(between), 1),
                    "worker_rss_max_mb": round(max(between), 1),
                    "rss_samples": len(between),
                    "rss_heap_mb": round(kinds["heap"], 1),
                    "rss_anon_mb": round(kinds["anon"], 1),
                    "rss_file_mb": round(kinds["file"], 1),
                    "broker_rss_mb": round(rss_mb(broker.pid), 1),
                    "join_state_bytes": state,
                    "pending": m.get("streamrec_pending_impressions", math.nan),
                    "orphans_waiting": m.get("streamrec_orphan_clicks_waiting", math.nan),
                    "join_state_entries": m.get("streamrec_join_state_entries", math.nan),
                    "feature_state_bytes": m.get("streamrec_feature_state_bytes", math.nan),
                    "feature_keys_evicted": m.get(
                        'streamrec_feature_state_shed{kind="evicted_keys"}', math.nan
                    ),
                    **{f"rocksdb_{kind}_mb": round(
                        m.get(f'streamrec_rocksdb_memory_bytes{{kind="{kind}"}}', math.nan)
                        / 1e6, 2) for kind in ROCKSDB_MEMORY},  # fmt: skip
                    **{f"malloc_{kind}_mb": round(
                        m.get(f'streamrec_malloc_bytes{{kind="{kind}"}}', math.nan) / 1e6, 1)
                       for kind in MALLOC_KINDS},  # fmt: skip
                    "data_dir_mb": round(du_mb(run_dir / "worker-data"), 2),
                    "store_mb": round(du_mb(store), 2),
                    "checkpoints_mb": round(du_mb(ckpt), 2),
                    "store_versions": len(list(store.glob("v*"))) if store.exists() else 0,
                    "checkpoint_files": len(list(ckpt.glob("ranker-v*.pt"))),
                    "replayed_events": replayed[0],
                    "lag_events": max(0.0, replayed[0] - consumed),
                    "event_time_lag_s": round(replay_clock - wm, 1) if math.isfinite(wm)
                    else None,
                    "scored": m.get("streamrec_scored_total", 0.0),
                    "score_ms_p50": round(float(np.quantile(lat, 0.5)), 2) if lat else None,
                    "score_ms_p99": round(float(np.quantile(lat, 0.99)), 2) if lat else None,
                    "score_errors": requests - len(lat),
                    "stage_errors": _sum(m, "streamrec_stage_errors_total"),
                    # the machine's 1-minute load (the worker, the broker, this harness
                    # and anything else): a soak's slopes are only comparable when quiet
                    "load_1m": round(os.getloadavg()[0], 2),
                })  # fmt: skip
                buckets = {k: v for k, v in m.items() if k.startswith(FRESHNESS + "_bucket")}
                fresh = _delta(buckets, hists[-1] if hists else {})
                hists.append(buckets)
                rows[-1]["freshness_p50_s"] = histogram_quantile(fresh, FRESHNESS, 0.5)
                rows[-1]["freshness_p99_s"] = histogram_quantile(fresh, FRESHNESS, 0.99)
                if hostile_per_s > 0:
                    rows[-1] |= _hostile_row(hostile, m)
                print(json.dumps(rows[-1]), flush=True)
            sampler.stop()
            worker.check()  # it never exited
            hostile.stop.set()
            producer.join(timeout=120)  # its last records and the final watermark
            if hostile_per_s > 0:
                hostile.join(timeout=120)
                time.sleep(sample_s / 4)  # the worker reads the last hostile records
                worker.check()
                final = _hostile_row(hostile, scrape(worker.metrics_url))
    report = summarize(rows, minutes=minutes, rate=rate, warmup_frac=warmup_frac)
    report["users"] = users
    report["rss_every_s"] = rss_every_s
    report["command"] += f" --users {users}" + (
        f" --hostile-per-s {hostile_per_s:g}" if hostile_per_s > 0 else ""
    )
    if hostile_per_s > 0:
        report["hostile"] = _hostile_summary(hostile_per_s, hostile, final)
    if len(hists) >= 2:  # label -> update over the whole run after the warm-up
        after = _delta(hists[-1], hists[int(len(hists) * warmup_frac)])
        for q, key in ((0.5, "freshness_p50_s"), (0.99, "freshness_p99_s")):
            report["after_warmup"][key] = histogram_quantile(after, FRESHNESS, q)
    report["machine"] = machine()
    if keep:
        report["run_dir"] = str(run_dir)
    else:
        shutil.rmtree(run_dir, ignore_errors=True)  # ~1 GB after 5 minutes (store, ckpts)
    tag = "" if users == DEFAULT_USERS else f"_{users}users"
    tag += "" if rate == DEFAULT_RATE else f"_{rate:g}ps"
    tag += "_hostile" if hostile_per_s > 0 else ""
    out = (results_dir or RESULTS_DIR) / f"soak_{minutes:g}m{tag}.json"
    write_report(report, out)
    plot(report, out.with_suffix(".png"))
    print(f"wrote {out}")
    return report


def _hostile_row(hostile: HostileInjector, m: dict[str, float]) -> dict[str, float]:
    return {
        "hostile_sent": hostile.sent,
        "dead_letters": _sum(m, "streamrec_dead_letters_total"),
        "control_sent": hostile.control_sent,
        "control_rejected": _sum(m, "streamrec_control_rejected_total"),
    }


def _hostile_summary(
    per_s: float, hostile: HostileInjector, final: dict[str, float]
) -> dict[str, Any]:
    """Sent against dead-lettered/rejected at the end (the valid log adds no dead letters:
    the synthetic log is clean)."""
    return {
        "per_s": per_s,
        "final": final,
        "every_record_dead_lettered": final["dead_letters"] >= final["hostile_sent"],
        "every_control_rejected": final["control_rejected"] >= final["control_sent"],
        "injector_error": None if hostile.error is None else repr(hostile.error),
    }


def _delta(now: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    """Cumulative histogram buckets of ``now`` minus those of an earlier scrape."""
    return {k: v - before.get(k, 0.0) for k, v in now.items()}


def _mean_of(rows: list[dict[str, Any]], key: str) -> float | None:
    """Mean of ``key`` over the rows that have it (None when none has)."""
    values = [r[key] for r in rows if key in r]
    return round(float(np.mean(values)), 2) if values else None


def _backlog_row(rows: list[dict[str, Any]], start: int, rate: float) -> int:
    """Index of the first row from ``start`` whose lag passes :data:`BACKLOG_S` seconds of
    input (impressions and their ~5 % clicks), ``len(rows)`` if none does."""
    limit = BACKLOG_S * rate * 1.05
    return next((i for i in range(start, len(rows)) if rows[i]["lag_events"] > limit), len(rows))


def summarize(
    rows: list[dict[str, Any]], *, minutes: float, rate: float, warmup_frac: float
) -> dict[str, Any]:
    """Slopes after the warm-up and the extremes of every row series.

    The slopes stop at the first row after the warm-up whose ``lag_events`` passes
    :data:`BACKLOG_S` seconds of input (``backlog_from_s``): from there the worker holds a
    backlog (pending impressions, consumer buffers) that grows with the lag, not with time,
    and on the embedded broker that happens once its memory storage has grown for about two
    hours at 200/s. The rows after it stay in the report and its figure.
    """
    start = int(len(rows) * warmup_frac)
    end = _backlog_row(rows, start, rate)
    cut = rows[start:end]
    t = [r["t_s"] for r in cut]
    rss = [r["worker_rss_mb"] for r in cut]
    mean_rss = float(np.nanmean(rss)) if rss else math.nan
    rss_fit = slope_fit(t, rss)
    rss_slope = None if rss_fit is None else rss_fit.ols
    floor = [r.get("worker_rss_min_mb", math.nan) for r in cut]
    fits = {
        "worker_rss": _fit_row(rss_fit, mean_rss),
        # the floor: each row's minimum over its interval's samples (transient copies freed)
        "worker_rss_floor": _fit_row(slope_fit(t, floor), mean_rss),
        **{
            f"rss_{kind}": _fit_row(
                slope_fit(t, [r.get(f"rss_{kind}_mb", math.nan) for r in cut]), mean_rss
            )
            for kind in ("heap", "anon", "file")
        },
        # glibc's view (the worker's streamrec_malloc_bytes): live C-heap bytes against the
        # free ones its arenas keep (fragmentation); rows of older runs have neither
        **{
            f"malloc_{kind}": _fit_row(
                slope_fit(t, [r.get(f"malloc_{kind}_mb", math.nan) for r in cut]), mean_rss
            )
            for kind in ("in_use", "free")
            if any(math.isfinite(r.get(f"malloc_{kind}_mb", math.nan)) for r in cut)
        },
    }
    disk = [r["data_dir_mb"] + r["store_mb"] + r["checkpoints_mb"] for r in cut]
    # the feature state fills until its byte bound (then it sheds keys): until then its
    # growth is part of any slope; fitted again from the first row at 90 % of the bound
    at = FULL_FRAC * FEATURE_MAX_BYTES
    full = next((i for i, r in enumerate(rows) if (r.get("feature_state_bytes") or 0) >= at), None)
    bounded = rows[max(full, start) : end] if full is not None else []
    tb = [r["t_s"] for r in bounded]
    mean_b = float(np.nanmean([r["worker_rss_mb"] for r in bounded])) if bounded else math.nan
    fits_bounded = {
        key: _fit_row(slope_fit(tb, [r.get(col, math.nan) for r in bounded]), mean_b)
        for key, col in (("worker_rss_floor", "worker_rss_min_mb"), ("rss_heap", "rss_heap_mb"),
                         ("rss_anon", "rss_anon_mb"))
    }  # fmt: skip
    return {
        "benchmark": "soak",
        "command": f"python -m bench.soak --minutes {minutes:g} --rate {rate:g}",
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "minutes": minutes,
        "rate_impressions_per_s": rate,
        "rows": rows,
        "after_warmup": {
            "from_t_s": t[0] if t else None,
            "to_t_s": t[-1] if t else None,
            "backlog_from_s": rows[end]["t_s"] if end < len(rows) else None,
            "rows_after_backlog": len(rows) - end,
            "worker_rss_mb_mean": round(mean_rss, 1),
            "worker_rss_slope_mb_per_h": None if rss_slope is None else round(rss_slope, 2),
            "worker_rss_slope_pct_per_h": None
            if rss_slope is None
            else round(100 * rss_slope / mean_rss, 2),
            "disk_slope_mb_per_h": (
                None if (s := slope_per_hour(t, disk)) is None else round(s, 2)
            ),
            "join_state_bytes_slope_per_h": slope_per_hour(t, [r["join_state_bytes"] for r in cut]),
            "feature_state_bytes_slope_per_h": slope_per_hour(
                t, [r["feature_state_bytes"] for r in cut]
            ),
            "feature_max_bytes": FEATURE_MAX_BYTES,
            "memory_fits": fits,
            "feature_state_full_at_s": rows[full]["t_s"] if full is not None else None,
            "memory_fits_after_feature_bound": fits_bounded if len(bounded) >= 3 else None,
            "max_store_versions": max((r["store_versions"] for r in rows), default=0),
            "max_checkpoint_files": max((r["checkpoint_files"] for r in rows), default=0),
            "max_lag_events": max((r["lag_events"] for r in rows), default=None),
            # rows of runs before it was recorded have no load_1m
            "load_1m_mean": _mean_of(cut, "load_1m"),
            "load_1m_max": max((r["load_1m"] for r in cut if "load_1m" in r), default=None),
            "score_errors": sum(r["score_errors"] for r in rows),
            "stage_errors": rows[-1]["stage_errors"] if rows else None,
        },  # fmt: skip
        "bar": "RSS slope after warm-up < 1 %/h; disk bounded by retention (store keep 5, "
        "checkpoints keep 5); the issue asks for >= 30 minutes",
    }


#: the series a segment is fitted over: a row's column, or a derived one
_SEGMENT_SERIES: dict[str, Callable[[dict[str, Any]], float]] = {
    "worker_rss_floor": lambda r: r["worker_rss_min_mb"],
    "worker_rss": lambda r: r["worker_rss_mb"],
    "rss_heap": lambda r: r["rss_heap_mb"],
    "rss_anon": lambda r: r["rss_anon_mb"],
    "rss_file": lambda r: r["rss_file_mb"],
    "malloc_in_use": lambda r: r.get("malloc_in_use_mb", math.nan),
    "malloc_free": lambda r: r.get("malloc_free_mb", math.nan),
    "malloc_arenas": lambda r: r.get("malloc_arenas_mb", math.nan),
    # other anonymous memory that is not glibc's: Python's object arenas, stacks, ...
    # (anonymous RSS less the threads' arenas, i.e. all arenas but the brk heap, and the
    # mapped blocks)
    "anon_not_malloc": lambda r: (
        r["rss_anon_mb"]
        - (r.get("malloc_arenas_mb", math.nan) - r["rss_heap_mb"])
        - r.get("malloc_mmapped_mb", math.nan)
    ),
    # what the RSS would be without the free memory glibc keeps
    "rss_less_malloc_free": lambda r: r["worker_rss_mb"] - r.get("malloc_free_mb", math.nan),
}


def segment_fits(rows: list[dict[str, Any]], from_min: float, to_min: float) -> dict[str, Any]:
    """Slopes of every :data:`_SEGMENT_SERIES` over the rows from minute ``from_min`` to
    ``to_min`` (inclusive), each with % of the segment's mean RSS per hour: to compare the
    stretches of one run (e.g. before and after a change made while it ran) and to tell
    which kind of memory grows."""
    cut = [r for r in rows if from_min * 60 <= r["t_s"] <= to_min * 60]
    t = [r["t_s"] for r in cut]
    mean = float(np.nanmean([r["worker_rss_mb"] for r in cut])) if cut else math.nan
    fits = {k: _fit_row(slope_fit(t, [f(r) for r in cut]), mean)
            for k, f in _SEGMENT_SERIES.items()}  # fmt: skip
    return {"from_min": from_min, "to_min": to_min, "points": len(cut),
            "worker_rss_mb_mean": round(mean, 1), "fits": fits}  # fmt: skip


def parse_segments(text: str) -> list[tuple[float, float]]:
    """``"37-62,64-125"`` -> ``[(37.0, 62.0), (64.0, 125.0)]`` (minutes)."""
    out = []
    for part in text.split(","):
        lo, sep, hi = part.strip().partition("-")
        if not sep or float(lo) >= float(hi):
            raise ValueError(f"a segment is FROM-TO in minutes, FROM < TO; got {part!r}")
        out.append((float(lo), float(hi)))
    return out


def refit(
    path: Path, warmup_frac: float, segments: list[tuple[float, float]] | None = None
) -> dict[str, Any]:
    """Recompute a saved report's ``after_warmup`` from its rows with :func:`summarize`
    (and, given ``segments``, its ``segments``: :func:`segment_fits` of each).

    Keeps what the rows cannot give again (label -> update quantiles, from histograms not
    kept in the rows), the run's command and machine; rewrites the report and its figure.
    """
    report = json.loads(path.read_text())
    new = summarize(report["rows"], minutes=report["minutes"],
                    rate=report["rate_impressions_per_s"], warmup_frac=warmup_frac)  # fmt: skip
    after = new["after_warmup"]
    for key, value in report["after_warmup"].items():
        after.setdefault(key, value)
    report["after_warmup"] = after
    report["refit"] = {"date": new["date"], "warmup_frac": warmup_frac,
                       "by": "bench.soak.summarize: slopes stop at backlog_from_s"}  # fmt: skip
    report.pop("resummarized", None)
    if segments:
        report["segments"] = [segment_fits(report["rows"], lo, hi) for lo, hi in segments]
    write_report(report, path)
    plot(report, path.with_suffix(".png"))
    print(f"rewrote {path}: RSS slope {after['worker_rss_slope_pct_per_h']} %/h, floor "
          f"{(after['memory_fits']['worker_rss_floor'] or {}).get('ols_pct_per_h')} %/h "
          f"from {after['from_t_s']} s to {after['to_t_s']} s")  # fmt: skip
    return report


def plot(report: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = report["rows"]
    if not rows:
        return
    t = [r["t_s"] / 60 for r in rows]
    fig, axes = plt.subplots(2, 2, figsize=(10, 6), sharex=True)
    series = [
        (
            axes[0, 0],
            [
                ("worker_rss_mb", "worker RSS"),
                ("worker_rss_min_mb", "worker RSS floor"),
                ("broker_rss_mb", "broker RSS"),
            ],
            "MB",
        ),
        (
            axes[0, 1],
            [
                ("data_dir_mb", "data dir"),
                ("store_mb", "model store"),
                ("checkpoints_mb", "checkpoints"),
            ],
            "MB",
        ),  # fmt: skip
        (axes[1, 0], [("lag_events", "lag (events)")], "events"),
        (axes[1, 1], [("score_ms_p50", "/score p50"), ("score_ms_p99", "/score p99")], "ms"),
    ]
    for ax, keys, unit in series:
        for key, label in keys:
            ax.plot(t, [np.nan if r.get(key) is None else r[key] for r in rows], label=label)
        ax.set_ylabel(unit)
        ax.legend(fontsize=8)
    for ax in axes[1]:
        ax.set_xlabel("minutes")
    a = report["after_warmup"]
    fig.suptitle(f"soak {report['minutes']:g} min at {report['rate_impressions_per_s']:g} imp/s:"
                 f" RSS slope {a['worker_rss_slope_pct_per_h']} %/h after warm-up")  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def cli(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--minutes", type=float, default=30.0)
    p.add_argument("--quick", action="store_true", help="5 minutes: a smoke run, not the soak")
    p.add_argument("--rate", type=float, default=DEFAULT_RATE, help="impressions per wall second")
    p.add_argument("--sample-s", type=float, default=60.0)
    p.add_argument("--requests", type=int, default=20, help="/score calls per sample")
    p.add_argument("--warmup-frac", type=float, default=1 / 3,
                   help="share of the run left out of the slopes")  # fmt: skip
    p.add_argument(
        "--users",
        type=int,
        default=DEFAULT_USERS,
        help="users in the synthetic log (fewer: per-user state fills sooner)",
    )
    p.add_argument("--hostile-per-s", type=float, default=0.0,
                   help="hostile records per second mixed in (bench.hostile); 0: none")  # fmt: skip
    p.add_argument("--rss-every-s", type=float, default=5.0,
                   help="RSS samples between rows (each row keeps their min and max)")  # fmt: skip
    p.add_argument("--keep", action="store_true", help="keep the run directory (logs, data)")
    p.add_argument("--results-dir", type=Path, default=None, help=f"default {RESULTS_DIR}")
    p.add_argument("--refit", type=Path, default=None, metavar="REPORT",
                   help="recompute REPORT's slopes from its rows (with --warmup-frac) and "
                        "rewrite it and its figure; runs nothing")  # fmt: skip
    p.add_argument(
        "--segments",
        type=parse_segments,
        default=None,
        metavar="A-B,C-D",
        help="with --refit: also fit these stretches (minutes) by kind of memory",
    )
    a = p.parse_args(argv)
    if a.refit is not None:
        refit(a.refit, a.warmup_frac, a.segments)
        return 0
    if a.segments is not None:
        p.error("--segments needs --refit")
    run(5.0 if a.quick else a.minutes, a.rate, a.sample_s, a.requests, a.warmup_frac,
        results_dir=a.results_dir, keep=a.keep, users=a.users,
        hostile_per_s=a.hostile_per_s, rss_every_s=a.rss_every_s)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(cli())
