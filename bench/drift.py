"""Drift-detector benchmark: false alarms and detection delays on synthetic click streams.

Run ``python -m bench.drift`` (full, about 1 min on 2 cores) or ``python -m bench.drift --quick``.
Every stream has known truth: predictions ``p`` are logit-normal with mean 4% (a realistic
CTR spread) and, before any drift, perfectly calibrated (clicks ~ Bernoulli(p)). Streams are
fed in batches of 1024, as :class:`stream.services.MonitorService` does, and a detector is
``reset()`` after each alarm, as the monitor does after a recalibration.

Scenarios (all detectors see the same streams, per seed):

- ``no_drift``: false alarms per million impressions at each detector's default threshold.
- ``abrupt``: after a calibrated warm-up the true CTR jumps to ``1.6 · p`` (4% → 6.4%) at a
  random point inside a batch, predictions unchanged. Delay = impressions from the change to
  the end of the batch that raised the first alarm.
- ``gradual``: the multiplier ramps linearly from 1 to 1.6 over 50k impressions, then stays;
  delay from the ramp start.

Writes ``bench/results/drift.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from monitoring.drift import DETECTOR_NAMES, DriftDetector, make_detector
from monitoring.drift_sequential import RiverDriftDetector

BATCH = 1024
MEAN_CTR = 0.04
LOGIT_SD = 0.5
SHIFT = 1.6
RAMP = 50_000
WARMUP_BATCHES = 50  # 51,200 calibrated impressions before any drift
RESULTS = Path(__file__).resolve().parent / "results" / "drift.json"


# The benchmarked detectors: every factory name at its defaults, plus River's stock settings
# to show why the adapter's defaults differ from them.
def _default(name: str) -> Callable[[], DriftDetector]:
    return lambda: make_detector(name)


DETECTORS: dict[str, Callable[[], DriftDetector]] = {
    **{name: _default(name) for name in DETECTOR_NAMES},
    "adwin[river stock]": lambda: RiverDriftDetector("adwin", delta=0.002),
    "river_page_hinkley[river stock]": lambda: RiverDriftDetector(
        "page_hinkley", delta=0.005, threshold=50.0, alpha=0.9999
    ),
}


@dataclass(frozen=True)
class Plan:
    """Sizes of one benchmark run."""

    fa_seeds: int  # no-drift streams
    fa_impressions: int  # impressions per no-drift stream
    delay_seeds: int  # streams per drift scenario
    horizon: int  # impressions after the change before a run counts as missed


FULL = Plan(fa_seeds=10, fa_impressions=1_000_000, delay_seeds=40, horizon=200_000)
QUICK = Plan(fa_seeds=2, fa_impressions=200_000, delay_seeds=6, horizon=100_000)


def logit_mean_offset(mean: float, sd: float) -> float:
    """Location ``mu`` with ``E[sigmoid(mu + sd·Z)] = mean`` (Gauss-Hermite + bisection)."""
    nodes, weights = np.polynomial.hermite_e.hermegauss(64)
    weights = weights / weights.sum()
    lo, hi = -15.0, 15.0
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        m = float(np.dot(weights, 1.0 / (1.0 + np.exp(-(mid + sd * nodes)))))
        lo, hi = (mid, hi) if m < mean else (lo, mid)
    return 0.5 * (lo + hi)


MU = logit_mean_offset(MEAN_CTR, LOGIT_SD)


def make_stream(
    rng: np.random.Generator, n: int, multiplier: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``(p, y)``, each (n,): predictions in (0, 1) and 0/1 clicks ~ Bernoulli(min(1, m·p))."""
    p = 1.0 / (1.0 + np.exp(-(MU + LOGIT_SD * rng.standard_normal(n))))
    truth = p if multiplier is None else np.minimum(1.0, p * multiplier)
    return p, (rng.random(n) < truth).astype(np.float64)


def count_false_alarms(det: DriftDetector, p: np.ndarray, y: np.ndarray) -> int:
    for s in range(0, p.size, BATCH):
        det.update_many(p[s : s + BATCH], y[s : s + BATCH])
        if det.drift_detected:
            det.reset()
    return det.n_alarms


def first_alarm_after(
    det: DriftDetector, p: np.ndarray, y: np.ndarray, change: int
) -> tuple[int | None, int]:
    """Feed until an alarm at or after ``change``; ``(delay or None, alarms before change)``."""
    early = 0
    for s in range(0, p.size, BATCH):
        end = min(p.size, s + BATCH)
        det.update_many(p[s:end], y[s:end])
        if det.drift_detected:
            if end > change:
                return end - change, early
            early += 1
            det.reset()
    return None, early


def run_task(scenario: str, seed: int, plan: Plan) -> dict[str, dict[str, Any]]:
    """One stream of one scenario, fed to every detector; per-detector raw results."""
    rng = np.random.default_rng([("no_drift", "abrupt", "gradual").index(scenario), seed])
    out: dict[str, dict[str, Any]] = {}
    if scenario == "no_drift":
        p, y = make_stream(rng, plan.fa_impressions)
        for name, factory in DETECTORS.items():
            t0 = time.perf_counter()
            alarms = count_false_alarms(factory(), p, y)
            out[name] = {"alarms": alarms, "seconds": time.perf_counter() - t0}
        return out
    change = WARMUP_BATCHES * BATCH + int(rng.integers(0, BATCH))
    n = change + plan.horizon
    t = np.arange(n, dtype=np.float64) - change
    if scenario == "abrupt":
        mult = np.where(t >= 0, SHIFT, 1.0)
    else:
        mult = 1.0 + (SHIFT - 1.0) * np.clip(t / RAMP, 0.0, 1.0)
    p, y = make_stream(rng, n, mult)
    for name, factory in DETECTORS.items():
        t0 = time.perf_counter()
        delay, early = first_alarm_after(factory(), p, y, change)
        out[name] = {"delay": delay, "early": early, "seconds": time.perf_counter() - t0}
    return out


def _run_task_args(args: tuple[str, int, Plan]) -> tuple[str, int, dict[str, dict[str, Any]]]:
    scenario, seed, plan = args
    return scenario, seed, run_task(scenario, seed, plan)


def summarise(
    raw: dict[str, list[dict[str, dict[str, Any]]]], plan: Plan
) -> dict[str, dict[str, Any]]:
    """Per-detector numbers from the per-task raw results."""
    summary: dict[str, dict[str, Any]] = {}
    for name in DETECTORS:
        fa = [r[name]["alarms"] for r in raw["no_drift"]]
        impressions = plan.fa_seeds * plan.fa_impressions
        row: dict[str, Any] = {
            "no_drift": {
                "impressions": impressions,
                "false_alarms": int(sum(fa)),
                "false_alarms_per_million": sum(fa) / impressions * 1e6,
            }
        }
        for scenario in ("abrupt", "gradual"):
            runs = [r[name] for r in raw[scenario]]
            found = np.array([r["delay"] for r in runs if r["delay"] is not None], dtype=float)
            delays = np.concatenate([found, np.full(len(runs) - found.size, np.inf)])
            row[scenario] = {
                "seeds": len(runs),
                "detected": int(found.size),
                "delay_median": _finite(np.median(delays)),
                "delay_p90": _finite(np.quantile(delays, 0.9, method="higher")),
                "delay_mean_detected": _finite(found.mean()) if found.size else None,
                "false_alarms_before_change": int(sum(r["early"] for r in runs)),
            }
        row["seconds"] = sum(r[name]["seconds"] for runs in raw.values() for r in runs)
        summary[name] = row
    return summary


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def _fmt(x: float | None) -> str:
    return "missed" if x is None else f"{x:,.0f}"


def table(summary: dict[str, dict[str, Any]], plan: Plan) -> str:
    """Markdown table of the summary."""
    head = (
        f"| detector | false alarms / M (count in {plan.fa_seeds * plan.fa_impressions / 1e6:g}M)"
        " | abrupt median | abrupt p90 | abrupt detected | gradual median | gradual p90"
        " | gradual detected | CPU s |"
    )
    lines = [head, "|" + "---|" * 9]
    for name, row in summary.items():
        nd, ab, gr = row["no_drift"], row["abrupt"], row["gradual"]
        lines.append(
            f"| {name} | {nd['false_alarms_per_million']:.2f} ({nd['false_alarms']}) "
            f"| {_fmt(ab['delay_median'])} | {_fmt(ab['delay_p90'])} "
            f"| {ab['detected']}/{ab['seeds']} | {_fmt(gr['delay_median'])} "
            f"| {_fmt(gr['delay_p90'])} | {gr['detected']}/{gr['seeds']} | {row['seconds']:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.drift", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small run (~20 s)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument(
        "--out", type=Path, default=None, help=f"default {RESULTS} (drift_quick.json if --quick)"
    )
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    out: Path = args.out or (RESULTS.with_name("drift_quick.json") if args.quick else RESULTS)
    tasks = [("no_drift", s, plan) for s in range(plan.fa_seeds)]
    tasks += [(sc, s, plan) for sc in ("abrupt", "gradual") for s in range(plan.delay_seeds)]
    raw: dict[str, list[dict[str, dict[str, Any]]]] = {"no_drift": [], "abrupt": [], "gradual": []}
    t0 = time.perf_counter()
    with ProcessPoolExecutor(max_workers=max(1, args.workers)) as pool:
        for scenario, _seed, result in pool.map(_run_task_args, tasks):
            raw[scenario].append(result)
    wall = time.perf_counter() - t0
    summary = summarise(raw, plan)
    report = {
        "benchmark": "drift",
        "command": " ".join([Path(sys.executable).name, "-m", "bench.drift", *sys.argv[1:]])
        if argv is None
        else " ".join(["python", "-m", "bench.drift", *argv]),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpu_count": os.cpu_count(),
            "workers": args.workers,
            "numpy": np.__version__,
        },
        "wall_seconds": round(wall, 1),
        "plan": plan.__dict__,
        "stream": {
            "batch": BATCH,
            "predictions": f"logit-normal, sd {LOGIT_SD} on the logit scale, mean {MEAN_CTR}",
            "shift": SHIFT,
            "ramp_impressions": RAMP,
            "warmup_impressions": WARMUP_BATCHES * BATCH,
            "delay": "impressions from the change (ramp start) to the end of the alarming batch",
        },
        "detectors": summary,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(table(summary, plan))
    print(f"\nwall {wall:.0f} s on {args.workers} workers; wrote {out}")
    return 0


def run(quick: bool = False, results_dir: Path | None = None) -> dict[str, Any]:
    """``bench.run``'s entry point: :func:`main` with ``--quick`` (and ``--out`` under
    ``results_dir`` when given); the report it wrote."""
    name = "drift_quick.json" if quick else "drift.json"
    out = (results_dir or RESULTS.parent) / name
    argv = ["--quick"] if quick else []
    if results_dir is not None:
        argv += ["--out", str(out)]
    main(argv)
    report: dict[str, Any] = json.loads(out.read_text())
    return report


def markdown(report: dict[str, Any]) -> str:
    """``bench.run``'s README section."""
    return table(report["detectors"], Plan(**report["plan"]))


if __name__ == "__main__":
    raise SystemExit(main())
