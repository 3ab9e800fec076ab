"""Fresh labels at a live pace: does the monitor judge every impression, promptly, on its
final label, at 100 and at 30,000 impressions a minute?

Run ``python -m bench.fresh_paced`` (100 and 30,000 a minute, 6 minutes each) or
``--quick`` (2 minutes each). Per rate, on this machine: the embedded broker (Tansu), one
``streamrec worker`` with the default settings but ``[join] window_s`` (``--window-s``,
120 s, so that windows close within the run), and :func:`stream.replay.replay` publishing
a synthetic log written at that rate (``impressions_per_s = rate / 60``) in real time
(``speedup`` 1: one event second per wall second), then the final watermark.

Every ``--sample-s`` (5 s) it records the worker's ``streamrec_monitored_total`` against
the impressions whose window had closed on the replay clock (``ts + window_s +
lateness_s <= clock``; the clock is the newest event time the replay has sent: the first
event time plus the wall seconds since the replay began, or less when the replay fell
behind (by its progress count); after the last impression the clicks still move it, and
the joiner's watermark follows them once the impressions input has been idle for
``join.idle_timeout_s``). Clicks later than the window are taken out of the log (they
never count), so the replay ends within a window of its last impression.
``judging_lag`` = closable - monitored, in impressions and in seconds of traffic (÷ the
rate). The monitor learns that a window closed from the joiner's event-time marks
(README "Event-time marks"), sent on the joiner's timed flushes and passed on by the
trainer: the lag is what that path costs, and the joiner's own wait for a quiet clicks
input (its watermark is held by the clicks input until ``join.idle_timeout_s``). After
the final watermark: seconds until every impression is judged; then whether the monitor
judged each impression once on its final label (``streamrec_monitored_total`` =
impressions and the lifetime CTR = the log's attributed clicks / impressions, to 1e-9),
the worker's stage errors and dead letters, and ``replay_pace`` (event seconds per wall
second: 1 when the replay kept pace; a busy machine slows it).

Writes ``bench/results/fresh_paced.json`` (``fresh_paced_quick.json``).
"""

from __future__ import annotations

import math
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.run import bench_parser, machine, results_path, stamp, write_report
from bench.workers import worker_processes
from logs.io import read_log_frame, write_log
from logs.synthetic import SyntheticConfig, generate
from stream.app import create_worker_topics
from stream.broker import EmbeddedBroker
from stream.replay import replay
from stream.settings import Settings

RATES_PER_MIN = (100.0, 30_000.0)
LIFETIME_CTR = 'streamrec_actual_ctr{segment="all",window="lifetime"}'


def closable(ts_sorted: np.ndarray, clock: float, window_s: float, lateness_s: float) -> int:
    """How many impressions (event times ``ts_sorted``, ascending) had their attribution
    window closed at ``clock``: ``ts + window_s + lateness_s <= clock``."""
    return int(np.searchsorted(ts_sorted, clock - window_s - lateness_s, side="right"))


def lag_summary(samples: list[dict[str, float]], rate_per_s: float) -> dict[str, Any]:
    """The judging lag over the samples taken while the replay ran and windows had begun
    to close: median and max in impressions and in seconds of traffic."""
    lags = np.array([s["closable"] - s["monitored"] for s in samples if s["closable"] > 0])
    if lags.size == 0:
        return {"samples": 0}
    return {
        "samples": int(lags.size),
        "impressions_p50": float(np.median(lags)),
        "impressions_max": float(lags.max()),
        "seconds_p50": float(np.median(lags)) / rate_per_s,
        "seconds_max": float(lags.max()) / rate_per_s,
    }


def run_rate(
    rate_per_min: float, minutes: float, window_s: float, sample_s: float, work: Path
) -> dict[str, Any]:
    """One paced run at ``rate_per_min`` (see the module docstring)."""
    rate = rate_per_min / 60.0
    n = max(1, round(rate * minutes * 60.0))
    log = work / "log.csv"
    df = generate(SyntheticConfig(n_impressions=n, seed=3, drift_at=None, impressions_per_s=rate))
    # clicks after the window never count; without them the replay ends within a window of
    # its last impression, not after the delays' tail (Exponential, capped at 25 minutes)
    late = (df["click"] == 1) & (df["click_ts"] - df["ts"] > window_s)
    df.loc[late, "click"] = 0
    df.loc[late, "click_ts"] = np.nan
    write_log(df, log)
    df = read_log_frame(log)
    ts = np.sort(df["ts"].to_numpy(dtype=np.float64))
    attributed = int(df["click"].sum())
    lateness = Settings().join.lateness_s
    config = work / "worker.toml"
    config.write_text(f"[join]\nwindow_s = {window_s}\n")
    # every event the replay sends, in its order, and how many it has sent (its progress
    # callback, every 1,000: the k+1000-th at most is out)
    event_ts = np.sort(np.concatenate([ts, df["click_ts"].dropna().to_numpy(np.float64)]))
    published = [0]
    samples: list[dict[str, float]] = []
    out: dict[str, Any] = {"rate_per_min": rate_per_min, "impressions": n, "clicks": attributed}
    with EmbeddedBroker(log_path=work / "tansu.log") as broker:
        create_worker_topics(Settings(broker=broker.url))
        with worker_processes(broker.url, work, extra_args=("--config", str(config))) as (w,):
            done = threading.Event()
            t0 = time.monotonic()

            def publish() -> None:
                try:
                    replay(log, broker.url, speedup=1.0, progress=False, frame=df,
                           final_watermark_gap_s=window_s + lateness + 1.0,
                           on_progress=lambda k: published.__setitem__(0, k))  # fmt: skip
                finally:
                    done.set()

            thread = threading.Thread(target=publish, name="replay", daemon=True)
            thread.start()
            while not done.wait(sample_s):
                w.check()
                # the newest event time sent: the wall clock, unless the replay fell behind
                sent_at_most = float(event_ts[min(published[0] + 999, len(event_ts) - 1)])
                clock = min(float(ts[0]) + (time.monotonic() - t0), sent_at_most)
                samples.append({
                    "wall_s": time.monotonic() - t0,
                    "closable": closable(ts, clock, window_s, lateness),
                    "monitored": w.metrics().get("streamrec_monitored_total", 0.0),
                })  # fmt: skip
            thread.join()
            replay_end = time.monotonic()
            deadline = replay_end + 120.0
            while (m := w.metrics()).get("streamrec_monitored_total", 0.0) < n:
                if time.monotonic() > deadline or w.proc.poll() is not None:
                    break
                time.sleep(0.25)
            all_judged_s = time.monotonic() - replay_end
            want = attributed / n
            settle = time.monotonic() + 10.0  # the gauges' 1 s timer
            while not math.isclose((m := w.metrics()).get(LIFETIME_CTR, math.nan), want,
                                   rel_tol=1e-9) and time.monotonic() < settle:  # fmt: skip
                time.sleep(0.5)
            out.update(
                replay_seconds=replay_end - t0,
                # event seconds per wall second (1: the replay kept pace)
                replay_pace=float(event_ts[-1] - event_ts[0]) / (replay_end - t0),
                monitored=m.get("streamrec_monitored_total", 0.0),
                seconds_replay_end_to_all_judged=all_judged_s,
                lifetime_ctr=m.get(LIFETIME_CTR),
                expected_ctr=want,
                every_impression_judged_once_on_final_label=bool(
                    m.get("streamrec_monitored_total") == n
                    and math.isclose(m.get(LIFETIME_CTR, math.nan), want, rel_tol=1e-9)
                ),
                late_positives=m.get("streamrec_monitor_late_positives_total", 0.0),
                dead_letters=m.get("sum:streamrec_dead_letters_total", 0.0),
                stage_errors=m.get("sum:streamrec_stage_errors_total", 0.0),
                worker_alive=w.proc.poll() is None,
                judging_lag=lag_summary(samples, rate),
                samples=samples,
            )
    return out


def main(
    quick: bool = False,
    results_dir: Path | None = None,
    rates: tuple[float, ...] = RATES_PER_MIN,
    minutes: float | None = None,
    window_s: float = 120.0,
    sample_s: float = 5.0,
) -> dict[str, Any]:
    minutes = minutes if minutes is not None else (2.0 if quick else 6.0)
    t0 = time.monotonic()
    runs = []
    for rate in rates:
        with tempfile.TemporaryDirectory(prefix="fresh_paced_") as tmp:
            r = run_rate(rate, minutes, window_s, sample_s, Path(tmp))
        runs.append(r)
        lag = r["judging_lag"]
        print(
            f"{rate:>8,.0f}/min: {r['monitored']:,.0f} of {r['impressions']:,} judged "
            f"({r['seconds_replay_end_to_all_judged']:.1f} s after the replay), CTR "
            f"{r['lifetime_ctr']} vs {r['expected_ctr']:.6f}, judging lag p50 "
            f"{lag.get('seconds_p50', math.nan):.1f} s max {lag.get('seconds_max', math.nan):.1f} s"
        )
    report = {
        **stamp("fresh_paced", quick),
        "machine": machine(),
        "load_1min_after": os.getloadavg()[0],
        "wall_seconds": time.monotonic() - t0,
        "minutes_per_rate": minutes,
        "window_s": window_s,
        "runs": runs,
    }
    write_report(report, results_path(results_dir, "fresh_paced", quick))
    return report


def cli(argv: list[str] | None = None) -> int:
    p = bench_parser("fresh_paced", __doc__, "2 minutes per rate")
    p.add_argument("--rates", default=",".join(f"{r:g}" for r in RATES_PER_MIN),
                   help="impressions per minute, comma-separated")  # fmt: skip
    p.add_argument("--minutes", type=float, default=None, help="per rate (default 6, quick 2)")
    p.add_argument("--window-s", type=float, default=120.0)
    p.add_argument("--sample-s", type=float, default=5.0)
    a = p.parse_args(argv)
    # the workers label with the default scheme, fresh labels (the integration tests set
    # this variable to the window scheme for their own workers)
    os.environ.pop("STREAMREC_JOIN__DELAYED_FEEDBACK", None)
    rates = tuple(float(x) for x in a.rates.split(","))
    main(a.quick, a.results_dir, rates, a.minutes, a.window_s, a.sample_s)
    return 0


if __name__ == "__main__":
    raise SystemExit(cli())
