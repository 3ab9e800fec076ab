"""``streamrec demo``: the whole pipeline on the embedded broker, end to end.

Generates (or takes) a log, starts Tansu and one worker process, replays the log as fast as
possible, waits until every impression is labelled and scored, then reads the ``scored``
topic back and prints a summary (also written as JSON and Markdown under the run dir).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from logs.batches import ScoredBatch
from logs.events import TOPIC_CONTROL, TOPIC_SCORED, InvalidEvent
from logs.synthetic import SyntheticConfig, read_meta, write_synthetic
from monitoring.calibration import (
    auc,
    calibration_ratio,
    expected_calibration_error,
    log_loss,
    normalized_entropy,
)
from stream.app import create_worker_topics
from stream.broker import EmbeddedBroker, free_port, wait_for_port
from stream.control import ControlRecord, DriftAlarm, Recalibration, decode_control
from stream.replay import check_replayable, replay
from stream.settings import Settings

log = logging.getLogger(__name__)


def _control_records(values: list[bytes]) -> list[ControlRecord]:
    """The typed ``control`` records of a run (one the workers rejected is left out too)."""
    out = []
    for v in values:
        try:
            out.append(decode_control(v))
        except InvalidEvent:
            continue
    return out


def scrape(url: str, timeout: float = 5.0) -> dict[str, float]:
    """Fetch a Prometheus text endpoint; returns ``{'name{labels}': value}`` (sums too)."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310  # loopback only
        text = r.read().decode()
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
            out[f"sum:{s.name}"] = out.get(f"sum:{s.name}", 0.0) + s.value
    return out


def read_topic(bootstrap: str, topic: str, timeout_s: float = 60.0) -> list[bytes]:
    """Every record value of ``topic`` from the beginning up to its current end (see
    :func:`stream.broker.read_records`: the end is the fetch high watermark, which Tansu
    reports correctly, unlike ListOffsets)."""
    from stream.broker import read_records

    return [r.value for r in read_records(bootstrap, topic, timeout_s)]


def read_scored(bootstrap: str, timeout_s: float = 60.0) -> list[ScoredBatch]:
    """Read the whole ``scored`` topic from the beginning."""
    return [ScoredBatch.decode(v) for v in read_topic(bootstrap, TOPIC_SCORED, timeout_s)]


@dataclass
class ScoredArrays:
    ts: np.ndarray
    y: np.ndarray
    p: np.ndarray
    p_raw: np.ndarray
    true_p: np.ndarray  # nan where unknown
    ids: list[str] = field(default_factory=list)

    @staticmethod
    def of(batches: list[ScoredBatch]) -> ScoredArrays:
        def cat(name: str) -> np.ndarray:
            return np.asarray([v for b in batches for v in getattr(b, name)], dtype=np.float64)

        tp = np.asarray(
            [math.nan if v is None else v for b in batches for v in b.true_p], dtype=np.float64
        )
        ids = [i for b in batches for i in b.impression_ids]
        return ScoredArrays(cat("ts"), cat("label"), cat("p"), cat("p_raw"), tp, ids)

    def final(self) -> ScoredArrays:
        """One row per impression, in first-seen order: the scores of its first record
        (served before anything of it was learned) and its final label (1 if any record
        of it is a positive). With fresh labels (``join.delayed_feedback =
        "fake_negative"``) a clicked impression is scored twice, first as a provisional
        negative; judged as they are, those records double count every click (the
        worker's monitor makes the same reduction, :mod:`monitoring.outcomes`).

        >>> a = ScoredArrays(np.array([1.0, 2.0, 1.0]), np.array([0.0, 0.0, 1.0]),
        ...                  np.array([0.1, 0.2, 0.3]), np.array([0.1, 0.2, 0.3]),
        ...                  np.full(3, np.nan), ["a", "b", "a"])
        >>> f = a.final()
        >>> f.ids, f.y.tolist(), f.p.tolist()
        (['a', 'b'], [1.0, 0.0], [0.1, 0.2])
        """
        first: dict[str, int] = {}
        y = self.y.copy()
        for k, iid in enumerate(self.ids):
            j = first.setdefault(iid, k)
            if j != k and self.y[k] > y[j]:
                y[j] = self.y[k]
        if len(first) == len(self.ids):
            return self
        idx = np.fromiter(first.values(), dtype=np.int64, count=len(first))
        return ScoredArrays(self.ts[idx], y[idx], self.p[idx], self.p_raw[idx],
                            self.true_p[idx], [self.ids[k] for k in idx])  # fmt: skip


def summarize(arr: ScoredArrays, drift_ts: float | None) -> dict[str, Any]:
    """Quality and calibration of the progressive (test-then-train) scores."""

    def part(mask: np.ndarray) -> dict[str, float]:
        p, y, tp = arr.p[mask], arr.y[mask], arr.true_p[mask]
        d = {
            "n": int(mask.sum()),
            "clicks": int(y.sum()),
            "ctr": float(y.mean()) if len(y) else math.nan,
            "mean_p": float(p.mean()) if len(p) else math.nan,
            "calibration_ratio": calibration_ratio(p, y),
            "calibration_ratio_raw": calibration_ratio(arr.p_raw[mask], y),
        }
        known = np.isfinite(tp)
        if known.any():
            d["ratio_vs_true_p"] = float(p[known].sum() / tp[known].sum())
        return d

    everything = np.ones(len(arr.y), bool)
    out: dict[str, Any] = {
        "examples": len(arr.y),
        "auc": auc(arr.p, arr.y),
        "log_loss": log_loss(arr.p, arr.y),
        "normalized_entropy": normalized_entropy(arr.p, arr.y),
        "ece": expected_calibration_error(arr.p, arr.y),
        "all": part(everything),
    }
    known = np.isfinite(arr.true_p)
    if known.any():
        out["oracle_normalized_entropy"] = normalized_entropy(arr.true_p[known], arr.y[known])
    if drift_ts is not None:
        before = arr.ts < drift_ts
        out["before_drift"] = part(before)
        out["after_drift"] = part(~before)
        # the tail after drift: the last half of post-drift examples
        idx = np.flatnonzero(~before)
        tail = np.zeros(len(arr.y), bool)
        tail[idx[len(idx) // 2 :]] = True
        out["after_drift_second_half"] = part(tail)
    return out


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else (f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.4f}")
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def render_table(rows: list[tuple[str, Any]]) -> str:
    w = max(len(k) for k, _ in rows)
    lines = [f"{'metric'.ljust(w)}  value", f"{'-' * w}  {'-' * 12}"]
    lines += [f"{k.ljust(w)}  {_fmt(v)}" for k, v in rows]
    return "\n".join(lines)


def run_demo(
    run_dir: str | Path = "runs/demo",
    *,
    log_path: str | Path | None = None,
    n_impressions: int = 200_000,
    pretrain_impressions: int = 50_000,
    seed: int = 0,
    settings: Settings | None = None,
    timeout_s: float = 600.0,
    progress: bool = True,
    history_ablation: bool = True,
    config_path: str | Path | None = None,
) -> dict[str, Any]:
    """Run the demo; returns the report dict (also written to ``run_dir/report.json``).

    With a generated log, the synthetic world first yields ``pretrain_impressions`` of
    history that :func:`logs.offline.pretrain` learns from at the base learning rate; the
    worker warm-starts from that checkpoint and learns online from the replayed
    ``n_impressions`` (the CTR shift is half-way through those) at the reduced rate.

    ``history_ablation``: the same ranker runs prequentially in process over the replayed
    log twice, with and without the historical features
    (:func:`logs.offline.history_ablation`), and the table shows both NEs. It runs on a
    thread of this process while the worker works through the replay (the worker is
    bound to about one core by its GIL, and this process only polls it meanwhile), so
    it adds little to the demo's time.
    """
    from logs.io import read_log_frame, write_log
    from logs.offline import history_ablation as run_ablation
    from logs.offline import log_examples, pretrain

    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    t_start = time.monotonic()
    settings = settings or Settings()
    pretrain_report: dict[str, Any] | None = None
    if log_path is None:
        total = n_impressions + pretrain_impressions
        full = run / f"synthetic-{pretrain_impressions}+{n_impressions}-s{seed}.csv.gz"
        if not full.exists() or read_meta(full) is None:
            print(f"generating {total:,} synthetic impressions -> {full}", flush=True)
            drift_at = (pretrain_impressions + n_impressions / 2) / total
            write_synthetic(
                SyntheticConfig(n_impressions=total, seed=seed, drift_at=drift_at), full
            )
        drift_ts = (read_meta(full) or {}).get("drift_ts")
        df = read_log_frame(full)
        log_path = run / "replay.csv.gz"
        write_log(df.iloc[pretrain_impressions:].reset_index(drop=True), log_path)
        frame = read_log_frame(log_path)  # the log as written; replay and ablation share it
        if pretrain_impressions > 0:
            ckpt = run / "pretrained.pt"
            history = log_examples(df.iloc[:pretrain_impressions])
            pretrain_report = pretrain(
                history, ckpt, config=settings.ranker, seed=seed, progress=progress
            )
            print(
                f"pretrained on {pretrain_impressions:,} impressions of history in "
                f"{pretrain_report['seconds']:.1f}s -> {ckpt}",
                flush=True,
            )
            settings = settings.replace(
                trainer=dataclasses.replace(settings.trainer, warm_start=str(ckpt))
            )
    else:
        # a bad log fails here, before a broker and a worker were started for it
        frame = read_log_frame(log_path)
        if frame.empty:
            raise ValueError(f"{log_path}: the log has no rows; nothing to replay")
        check_replayable(
            frame, log_path, final_watermark_gap_s=_final_gap(settings),
            max_future_skew_s=settings.max_future_skew_s,
        )  # fmt: skip
        drift_ts = (read_meta(log_path) or {}).get("drift_ts")
    settings = settings.replace(
        trainer=dataclasses.replace(settings.trainer, checkpoint_dir=str(run / "checkpoints"))
    )
    # a previous demo's worker state (RocksDB tables, checkpoints) belongs to a broker that
    # is gone: restored, it held the same impression ids as pending, so a second
    # `make demo` in the same run dir labelled nothing and waited until its timeout
    for stale in ("worker-data", "checkpoints"):
        shutil.rmtree(run / stale, ignore_errors=True)
    metrics_port = free_port()
    ablation_run: Future[dict[str, dict[str, float]]] | None = None
    with (
        ThreadPoolExecutor(1, thread_name_prefix="streamrec-ablation") as pool,
        EmbeddedBroker(log_path=run / "tansu.log") as broker,
    ):
        settings = settings.replace(
            broker=broker.url, metrics_port=metrics_port, data_dir=str(run / "worker-data")
        )
        create_worker_topics(settings)
        worker = _start_worker(settings, run, config_path)
        try:
            wait_for_port("127.0.0.1", metrics_port, timeout_s=60)
            metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
            print(f"broker {broker.url} (tansu, pid {broker.pid}); worker pid {worker.pid}; "
                  f"metrics {metrics_url}", flush=True)  # fmt: skip
            t0 = time.monotonic()
            stats = replay(
                log_path,
                broker.url,
                watermark_every=settings.replay_watermark_every,
                final_watermark_gap_s=_final_gap(settings),
                progress=progress,
                max_future_skew_s=settings.max_future_skew_s,
                frame=frame,  # the log is read once
            )
            print(
                f"replayed {stats.impressions:,} impressions and {stats.clicks:,} clicks in "
                f"{stats.seconds:.1f}s ({stats.events_per_s:,.0f} events/s)",
                flush=True,
            )
            if history_ablation:
                print("history ablation (beside the pipeline): the same ranker in process, "
                      "with and without history", flush=True)  # fmt: skip
                ablation_run = pool.submit(
                    run_ablation, frame, settings.ranker, seed=seed, progress=False,
                )  # fmt: skip
            final = _wait_done(metrics_url, stats.impressions, worker, t0 + timeout_s, progress)
            t_done = time.monotonic()
            batches = read_scored(broker.url)
            controls = _control_records(read_topic(broker.url, TOPIC_CONTROL))
        finally:
            _stop(worker)
    records = ScoredArrays.of(batches)
    arr = records.final()  # one row per impression, its final label
    np.savez_compressed(
        run / "scored.npz", ts=arr.ts, y=arr.y, p=arr.p, p_raw=arr.p_raw, true_p=arr.true_p
    )
    summary = summarize(arr, drift_ts)
    alarms = [c.to_dict() for c in controls if isinstance(c, DriftAlarm)]
    # one record per counted refit (MonitorService._count_refit): the report draws these,
    # the table below reads the counters; the two agree
    refits = [c.to_dict() for c in controls if isinstance(c, Recalibration)]
    delays = []
    if drift_ts is not None and arr.ts.size:
        # post-drift impressions the monitor had taken in when it alarmed: the scored
        # stream is the monitor's input in order, and the alarm says how far it had read
        # (a batch's newest event time would overstate it by the batch's span)
        post = np.cumsum(arr.ts >= drift_ts)
        for a in alarms:
            seen = int(a.get("examples_seen", 0))
            if 0 < seen <= post.size and post[seen - 1] > 0:
                delays.append(int(post[seen - 1]))
    ablation = None
    if ablation_run is not None:
        t_wait = time.monotonic()
        ablation = ablation_run.result()  # its error, if any, is raised here
        if progress and time.monotonic() - t_wait > 1.0:
            print(f"history ablation finished {time.monotonic() - t_wait:.0f} s after the "
                  "pipeline", flush=True)  # fmt: skip
    n_ids = len(records.ids)
    distinct = len(arr.ids)
    wall = t_done - t0
    report: dict[str, Any] = {
        "log": str(log_path),
        "pretrain": pretrain_report,
        "impressions": stats.impressions,
        "clicks": stats.clicks,
        "labeled": int(final.get("sum:streamrec_labeled_total", 0)),
        "scored_records": n_ids,
        "scored_distinct_impressions": distinct,
        # impressions the calibration monitor judged on their final labels (all of them,
        # once the replay's final watermark closed the last windows)
        "monitored": int(final.get("streamrec_monitored_total", 0)),
        "drift_ts": drift_ts,
        "drift_alarms": int(final.get("streamrec_drift_alarms_total", 0)),
        "drift_alarm_events": alarms,
        "recalibration_events": refits,
        "first_alarm_after_drift_impressions": delays[0] if delays else None,
        "recalibrations": int(final.get("streamrec_recalibrations_total", 0)),
        "recalibrations_rejected": int(final.get("streamrec_recalibrations_rejected_total", 0)),
        "index_refreshes": int(final.get("streamrec_index_refreshes_total", 0)),
        "index_items": int(final.get("streamrec_index_items", 0)),
        "hard_negative_pool_users": int(final.get("streamrec_hard_negative_pool_users", 0)),
        "dead_letters": int(final.get("sum:streamrec_dead_letters_total", 0)),
        "duplicate_clicks": int(final.get("streamrec_duplicate_clicks_total", 0)),
        "late_clicks": int(final.get("streamrec_late_clicks_total", 0)),
        "replay_seconds": stats.seconds,
        "pipeline_seconds": wall,
        "events_per_s": (stats.impressions + stats.clicks) / wall,
        "impressions_per_s": stats.impressions / wall,
        "total_seconds": time.monotonic() - t_start,
        "quality": summary,
        "history_ablation": ablation,
    }
    (run / "report.json").write_text(json.dumps(report, indent=2, default=float))
    table = render_table(_rows(report))
    (run / "summary.md").write_text("# streamrec demo summary\n\n```\n" + table + "\n```\n")
    from monitoring.report import write_report

    html = write_report(run)
    print()
    print(table)
    print(f"\nreport: {html} (and report.json); logs: {run}/worker.log, {run}/tansu.log")
    return report


def _rows(r: dict[str, Any]) -> list[tuple[str, Any]]:
    q = r["quality"]
    rows: list[tuple[str, Any]] = []
    if r.get("pretrain"):
        rows.append(("pretrained on (impressions of history)", r["pretrain"]["examples"]))
    rows += [
        ("impressions replayed", r["impressions"]),
        ("clicks replayed", r["clicks"]),
        ("labelled", r["labeled"]),
        ("scored (distinct impressions)", r["scored_distinct_impressions"]),
        ("judged by the monitor (final labels)", r.get("monitored")),
        ("AUC (progressive)", q["auc"]),
        ("log loss", q["log_loss"]),
        ("normalised entropy", q["normalized_entropy"]),
    ]
    if "oracle_normalized_entropy" in q:
        rows.append(("normalised entropy of true_p (oracle)", q["oracle_normalized_entropy"]))
    rows.append(("ECE (equal-mass, 10 bins)", q["ece"]))
    ab = r.get("history_ablation")
    if ab:
        for key, name in (("with", "with history"), ("without", "without history")):
            rows.append(
                (f"NE {name} (in process, cold, prequential)", ab[key]["normalized_entropy"])
            )
            rows.append((f"AUC {name} (same run)", ab[key]["auc"]))
    rows.append(("calibration ratio sum(p)/sum(y), all", q["all"]["calibration_ratio"]))
    for key, name in (
        ("before_drift", "before drift"),
        ("after_drift", "after drift"),
        ("after_drift_second_half", "after drift, 2nd half"),
    ):
        if key in q:
            rows.append((f"CTR {name}", q[key]["ctr"]))
            rows.append((f"calibration ratio {name} (served)", q[key]["calibration_ratio"]))
            rows.append((f"calibration ratio {name} (raw)", q[key]["calibration_ratio_raw"]))
            if "ratio_vs_true_p" in q[key]:
                rows.append((f"sum(p)/sum(true_p) {name}", q[key]["ratio_vs_true_p"]))
    rows += [
        ("drift alarms", r["drift_alarms"]),
        (
            "first alarm after the drift (impressions later)",
            r["first_alarm_after_drift_impressions"],
        ),
        ("recalibrations (accepted)", r["recalibrations"]),
        ("recalibrations rejected", r["recalibrations_rejected"]),
        ("index refreshes", r["index_refreshes"]),
        ("index items", r["index_items"]),
        ("hard-negative pool users", r["hard_negative_pool_users"]),
        ("dead letters", r["dead_letters"]),
        ("replay seconds", r["replay_seconds"]),
        ("pipeline seconds (replay start -> all scored)", r["pipeline_seconds"]),
        ("events per second (end to end)", r["events_per_s"]),
        ("impressions per second (end to end)", r["impressions_per_s"]),
    ]
    return rows


def _start_worker(
    settings: Settings, run: Path, config_path: str | Path | None = None
) -> subprocess.Popen[bytes]:
    """The demo's worker: ``settings``' broker, metrics port and data dir on its command
    line, over the settings file ``config_path`` (the same file the demo read, so that the
    worker runs with it too: before 2026-12-06 it was not passed, and a worker started by
    ``streamrec demo --config FILE`` ran the defaults)."""
    cmd = [
        sys.executable, "-m", "stream.cli", "worker",
        "--broker", settings.broker,
        "--metrics-port", str(settings.metrics_port),
        "--data-dir", settings.data_dir,
    ]  # fmt: skip
    if config_path is not None:
        cmd += ["--config", str(Path(config_path).resolve())]
    if settings.trainer.warm_start:
        cmd += ["--warm-start", settings.trainer.warm_start]
    if settings.trainer.checkpoint_dir:
        cmd += ["--checkpoint-dir", settings.trainer.checkpoint_dir]
    out = open(run / "worker.log", "ab")  # noqa: SIM115  # handed to the child
    # the embedded broker's ListOffsets trips Faust's RocksDB check (see Settings)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "STREAMREC_RECOVERY_CONSISTENCY_CHECK": "0"}
    try:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    finally:
        out.close()


def _stop(proc: subprocess.Popen[bytes], timeout_s: float = 20.0) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


MONITOR_GRACE_S = 15.0


class DemoError(RuntimeError):
    """The demo's worker exited, stood still, or did not finish in time (the message says
    which, with its counts; ``streamrec demo`` prints it as an error, no traceback)."""


def _final_gap(settings: Settings) -> float:
    """The replay's final watermark gap: past the join (and conversion) window and its
    lateness."""
    return settings.final_watermark_gap_s


#: ``_wait_done`` gives up when the worker's counters (impressions and clicks read,
#: labelled, scored, dead letters) have not moved for this many seconds
STALL_S = 90.0
_PROGRESS = (
    "streamrec_impressions_total",
    "streamrec_clicks_total",
    "sum:streamrec_labeled_total",
    "streamrec_scored_total",
    "sum:streamrec_dead_letters_total",
)


def _stall_message(m: dict[str, float], impressions: int, stalled_s: float) -> str:
    """Why the demo stopped waiting: the counts, and the dead letters by reason."""
    prefix = 'streamrec_dead_letters_total{reason="'
    reasons = {k[len(prefix) : -2]: v for k, v in m.items() if k.startswith(prefix) and v > 0}
    dead = ", ".join(f"{r} {v:,.0f}" for r, v in sorted(reasons.items(), key=lambda x: -x[1]))
    return (
        f"the worker made no progress for {stalled_s:.0f} s: "
        f"{m.get('streamrec_impressions_total', 0.0):,.0f} impressions read, "
        f"{m.get('sum:streamrec_labeled_total', 0.0):,.0f} labelled and "
        f"{m.get('streamrec_scored_total', 0.0):,.0f} scored of {impressions:,} replayed; "
        + (
            f"dead letters: {dead} (the dead-letter topic has each one with its reason)"
            if dead
            else "no dead letters"
        )
        + "; see worker.log"
    )


def _wait_done(
    url: str,
    impressions: int,
    worker: subprocess.Popen[bytes],
    deadline: float,
    progress: bool,
    stall_s: float = STALL_S,
) -> dict[str, float]:
    """Wait until the worker has labelled, scored and monitored ``impressions``; returns the
    last scrape. Raises when the worker exits, at ``deadline`` (monotonic seconds), or when
    its counters stand still for ``stall_s`` (e.g. every event was dead-lettered), saying
    why."""
    from tqdm import tqdm

    bar = tqdm(total=impressions, unit="imp", desc="labelled+scored", disable=not progress)
    done = 0
    trained_at: float | None = None
    seen: tuple[float, ...] = ()
    moved_at = time.monotonic()
    while True:
        if worker.poll() is not None:
            raise DemoError(f"the worker exited with code {worker.returncode}; see worker.log")
        m = scrape(url)
        counts = tuple(m.get(k, 0.0) for k in _PROGRESS)
        if counts != seen:
            seen, moved_at = counts, time.monotonic()
        elif time.monotonic() - moved_at > stall_s:
            bar.close()
            raise DemoError(_stall_message(m, impressions, time.monotonic() - moved_at))
        labeled = m.get("sum:streamrec_labeled_total", 0.0)
        scored = m.get("streamrec_scored_total", 0.0)
        monitored = m.get("streamrec_monitored_total", 0.0)
        now_done = int(min(labeled, scored))
        bar.update(max(0, min(now_done, impressions) - done))
        done = max(done, min(now_done, impressions))
        trained = labeled >= impressions and scored >= labeled
        if trained and trained_at is None:
            trained_at = time.monotonic()
        # the monitor takes the last scored batches in a moment later: it judges every
        # impression once (with fresh labels: one per impression, not per scored row; the
        # joiner's event-time marks close the last windows). A duplicate batch after a
        # restart is never counted: do not wait for it for ever
        if trained_at is not None and (
            monitored >= min(scored, impressions) or time.monotonic() - trained_at > MONITOR_GRACE_S
        ):
            bar.close()
            time.sleep(1.5)  # one more gauge publication and index refresh
            return scrape(url)
        if time.monotonic() > deadline:
            bar.close()
            raise DemoError(
                f"not done in time (--timeout): {labeled:,.0f} labelled, {scored:,.0f} scored "
                f"of {impressions:,}; see worker.log"
            )
        time.sleep(0.5)
