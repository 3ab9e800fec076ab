"""The second label through the real worker: does MMoE's task 1, fed by conversion events
the joiner attaches in the stream, predict "clicked and converted" (CTCVR) calibrated and
better than a constant, and does learning it cost the click task anything?

Run ``python -m bench.second_label_stream`` (150,000 impressions per arm) or ``--quick``
(40,000). Per arm, on this machine: the embedded broker (Tansu), one ``streamrec worker``
with ``ranker.model = "mmoe"``, and :func:`stream.replay.replay` publishing a two-label
synthetic log (``SyntheticConfig(conversion=True)``, 1,000 impressions a minute of event
time, so 150 minutes; ``base_cvr`` 0.2, conversions ``conversion_delay_mean_s`` 300 s after
the click) as fast as it can, conversions included, then the final watermark. The join
window is the default 1,800 s, the conversion window 1,800 s. Arms:

* ``click_only``: no conversion window (conversions counted and dropped): task 1 never
  trained; the click task's baseline.
* ``direct_fresh``: ``join.conversion_window_s`` set, the worker's default fresh labels
  (fake negatives), ``ranker.task1 = "direct"``.
* ``esmm_fresh``: the same with ``task1 = "esmm"``.
* ``direct_window``: ``delayed_feedback = "window"`` (final labels), ``task1 = "direct"``:
  every clicked impression's second label comes when its conversion window ends, up to an
  hour of event time after its impression (the log lasts 2.5 hours).
* ``ple_direct_fresh``: as ``direct_fresh`` with ``ranker.model = "ple"``.

Read back from the ``scored`` topic, each impression's FIRST record (its scores before any
of its labels were learnt): the click's served ``p`` and task 1's ``p2``. Final labels from
the log (a click within ``join.window_s``; a conversion within the conversion window of
it), truths ``true_p`` and ``true_p * true_cvr``. Reported over the second half of the log
(the models have warmed up) and over the whole log: normalised entropy (NE, log loss over
the entropy of the base rate: below 1 beats the constant) and Σp/Σtruth; the worst
|log(Σp2/Σtruth)| over 5,000-impression windows of the second half; the worker's
``streamrec_conversions_total`` against the log's; its lifetime second-label ratio; the
pipeline's wall seconds.

``--rate R`` replays a world of R impressions a minute instead (``--rate 100``: 150,000
impressions over 25 hours of event time); ``--window-s``, ``--conversion-window-s`` and
``--delay-s`` set the join window, the conversion window and the world's mean conversion
delay (a fast world needs short ones to close many windows within its log). Writes
``bench/results/second_label_stream.json`` (``second_label_stream_quick.json``;
``second_label_stream_<R>.json`` with ``--rate``).
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.run import bench_parser, machine, results_path, stamp, write_report
from bench.workers import worker_processes
from logs.batches import ScoredBatch
from logs.events import TOPIC_SCORED
from logs.io import read_log_frame, write_log
from logs.synthetic import SyntheticConfig, generate
from stream.app import create_worker_topics
from stream.broker import EmbeddedBroker
from stream.demo import read_topic
from stream.replay import replay
from stream.settings import Settings

RATE_PER_MIN = 1_000.0
WINDOW_S = 1800.0
CONVERSION_WINDOW_S = 1800.0
CONVERSION_DELAY_MEAN_S = 300.0
#: arm -> (its [join] keys besides the windows, its [ranker] keys); "conversion": a
#: conversion window is set
ARMS: dict[str, tuple[dict[str, Any], dict[str, str]]] = {
    "click_only": ({}, {"model": "mmoe"}),
    "direct_fresh": ({"conversion": True}, {"model": "mmoe", "task1": "direct"}),
    "esmm_fresh": ({"conversion": True}, {"model": "mmoe", "task1": "esmm"}),
    "direct_window": ({"conversion": True, "delayed_feedback": "window"},
                      {"model": "mmoe", "task1": "direct"}),
    "ple_direct_fresh": ({"conversion": True}, {"model": "ple", "task1": "direct"}),
}  # fmt: skip


def arm_config(name: str, window_s: float, conversion_window_s: float) -> str:
    """The worker's settings TOML of arm ``name``."""
    join, ranker = ARMS[name]
    lines = ["[join]", f"window_s = {window_s}"]
    for key, value in join.items():
        if key == "conversion":
            lines.append(f"conversion_window_s = {conversion_window_s}")
        else:
            lines.append(f'{key} = "{value}"')
    lines.append("[ranker]")
    lines += [f'{key} = "{value}"' for key, value in ranker.items()]
    return "\n".join(lines) + "\n"


WINDOW_ROWS = 5_000


def normalised_entropy(p: np.ndarray, y: np.ndarray) -> float:
    """Log loss of ``p`` over the entropy of the base rate of ``y`` (nats / nats)."""
    p = np.clip(p, 1e-7, 1 - 1e-7)
    ll = -float(np.mean(y * np.log(p) + (1 - y) * np.log1p(-p)))
    r = float(np.mean(y))
    if r in (0.0, 1.0):
        return math.nan
    return ll / -(r * math.log(r) + (1 - r) * math.log1p(-r))


def first_records(batches: list[ScoredBatch]) -> dict[str, tuple[float, float]]:
    """impression id -> (p, p2) of its first scored row (p2 NaN without a task 1)."""
    out: dict[str, tuple[float, float]] = {}
    for b in batches:
        p2 = b.p2 or [math.nan] * len(b.p)
        for iid, p, q in zip(b.impression_ids, b.p, p2, strict=True):
            if iid not in out:
                out[iid] = (p, q)
    return out


def summary(p: np.ndarray, y: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    return {
        "ne": normalised_entropy(p, y),
        "ratio_vs_truth": float(p.sum() / truth.sum()),
        "ratio_vs_outcomes": float(p.sum() / max(y.sum(), 1.0)),
        "outcomes": float(y.sum()),
    }


def run_arm(
    name: str, df_path: Path, work: Path, window_s: float = WINDOW_S,
    conversion_window_s: float = CONVERSION_WINDOW_S,
) -> dict[str, Any]:  # fmt: skip
    df = read_log_frame(df_path)
    config = work / "worker.toml"
    config.write_text(arm_config(name, window_s, conversion_window_s))
    gap = window_s + conversion_window_s + Settings().join.lateness_s + 1
    with EmbeddedBroker(log_path=work / "tansu.log") as broker:
        create_worker_topics(Settings(broker=broker.url))
        with worker_processes(broker.url, work, extra_args=("--config", str(config))) as (w,):
            t0 = time.monotonic()
            stats = replay(df_path, broker.url, progress=False, frame=df, final_watermark_gap_s=gap)
            n = len(df)
            deadline = time.monotonic() + 600
            while (m := w.metrics()).get("streamrec_monitored_total", 0.0) < n:
                w.check()
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"{name}: monitor judged {m.get('streamrec_monitored_total')}"
                    )
                time.sleep(0.5)
            seconds = time.monotonic() - t0
            time.sleep(2.0)  # the last conversion records' scored batches
            m = w.metrics()
            batches = [ScoredBatch.decode(raw) for raw in read_topic(broker.url, TOPIC_SCORED)]
    first = first_records(batches)
    ids = df["impression_id"].astype(str).to_numpy()
    p = np.array([first[i][0] for i in ids])
    p2 = np.array([first[i][1] for i in ids])
    clicked = ((df["click"] == 1) & (df["click_ts"] - df["ts"] <= window_s)).to_numpy()
    conv_in = (df["conversion_ts"] - df["click_ts"] <= conversion_window_s).to_numpy()
    y2 = (clicked & (df["conversion"] == 1).to_numpy() & conv_in).astype(np.float64)
    y = clicked.astype(np.float64)
    true_p = df["true_p"].to_numpy(np.float64)
    true_p2 = true_p * df["true_cvr"].to_numpy(np.float64)
    half = slice(len(ids) // 2, None)
    out: dict[str, Any] = {
        "arm": name,
        "impressions": len(ids),
        "conversions_expected": int(y2.sum()),
        "replay_conversions": stats.conversions,
        "pipeline_seconds": seconds,
        "impressions_per_s": len(ids) / seconds,
        "click": {
            "second_half": summary(p[half], y[half], true_p[half]),
            "all": summary(p, y, true_p),
        },  # fmt: skip
        "worker": {
            k: m.get(k)
            for k in (
                "streamrec_monitored_total",
                'streamrec_conversions_total{outcome="attached"}',
                'streamrec_conversions_total{outcome="late"}',
                'streamrec_conversions_total{outcome="orphan"}',
                'streamrec_conversions_total{outcome="ignored"}',
                "streamrec_second_label_judged_total",
                "streamrec_second_label_outcomes_total",
                "streamrec_second_label_ratio",
                "sum:streamrec_dead_letters_total",
                "sum:streamrec_stage_errors_total",
            )
        },
    }
    if np.isfinite(p2).all():
        h = p2[half]
        windows = [
            abs(math.log(h[k : k + WINDOW_ROWS].sum() / true_p2[half][k : k + WINDOW_ROWS].sum()))
            for k in range(0, h.size - WINDOW_ROWS + 1, WINDOW_ROWS)
        ]
        out["task1"] = {
            "second_half": summary(h, y2[half], true_p2[half]),
            "all": summary(p2, y2, true_p2),
            "max_abs_log_ratio_5k_windows_second_half": max(windows) if windows else math.nan,
            "truth_ne_second_half": normalised_entropy(true_p2[half], y2[half]),
        }
    return out


def main(quick: bool = False, results_dir: Path | None = None, n: int | None = None,
         arms: tuple[str, ...] = tuple(ARMS), seed: int = 5,
         rate_per_min: float = RATE_PER_MIN, window_s: float = WINDOW_S,
         conversion_window_s: float = CONVERSION_WINDOW_S,
         delay_s: float = CONVERSION_DELAY_MEAN_S) -> dict[str, Any]:  # fmt: skip
    n = n if n is not None else (40_000 if quick else 150_000)
    t0 = time.monotonic()
    runs = []
    with tempfile.TemporaryDirectory(prefix="second_label_") as tmp:
        log = Path(tmp) / "log.csv"
        df = generate(SyntheticConfig(n_impressions=n, seed=seed, drift_at=None,
                                      impressions_per_s=rate_per_min / 60.0, conversion=True,
                                      base_cvr=0.2,
                                      conversion_delay_mean_s=delay_s))  # fmt: skip
        write_log(df, log)
        for name in arms:
            work = Path(tmp) / name
            work.mkdir()
            r = run_arm(name, log, work, window_s, conversion_window_s)
            runs.append(r)
            t1 = r.get("task1", {}).get("second_half", {})
            attached = r["worker"].get('streamrec_conversions_total{outcome="attached"}')
            print(
                f"{name:>14}: {r['impressions_per_s']:,.0f} imp/s; click NE "
                f"{r['click']['second_half']['ne']:.4f} ratio "
                f"{r['click']['second_half']['ratio_vs_truth']:.3f}; task1 NE "
                f"{t1.get('ne', math.nan):.4f} ratio {t1.get('ratio_vs_truth', math.nan):.3f}; "
                f"conversions {attached} of {r['conversions_expected']}"
            )
    report = {
        **stamp("second_label_stream", quick),
        "machine": machine(),
        "load_1min_after": os.getloadavg()[0],
        "wall_seconds": time.monotonic() - t0,
        "rate_per_min": rate_per_min,
        "window_s": window_s,
        "conversion_window_s": conversion_window_s,
        "conversion_delay_mean_s": delay_s,
        "seed": seed,
        "runs": runs,
    }
    name = "second_label_stream" + ("" if rate_per_min == RATE_PER_MIN else f"_{rate_per_min:g}")
    write_report(report, results_path(results_dir, name, quick))
    return report


def cli(argv: list[str] | None = None) -> int:
    p = bench_parser("second_label_stream", __doc__, "40,000 impressions per arm")
    p.add_argument("--n", type=int, default=None, help="impressions (default 150,000)")
    p.add_argument("--arms", default=",".join(ARMS), help="comma-separated, of " + ", ".join(ARMS))
    p.add_argument("--seed", type=int, default=5)
    p.add_argument(
        "--rate",
        type=float,
        default=RATE_PER_MIN,
        help="impressions a minute of event time (results file suffixed _RATE "
        "when not the default)",
    )
    p.add_argument("--window-s", type=float, default=WINDOW_S, help="join.window_s")
    p.add_argument("--conversion-window-s", type=float, default=CONVERSION_WINDOW_S)
    p.add_argument("--delay-s", type=float, default=CONVERSION_DELAY_MEAN_S,
                   help="the world's mean conversion delay after the click")  # fmt: skip
    a = p.parse_args(argv)
    # the workers label with the default scheme unless an arm sets one (the integration
    # tests set this variable to the window scheme for their own workers)
    os.environ.pop("STREAMREC_JOIN__DELAYED_FEEDBACK", None)
    main(a.quick, a.results_dir, a.n, tuple(a.arms.split(",")), a.seed, a.rate, a.window_s,
         a.conversion_window_s, a.delay_s)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(cli())
