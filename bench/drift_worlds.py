"""Drift alarms of a learning model: false alarms per million and detection delay, per rate.

Run ``python -m bench.drift_worlds`` (or ``--quick``). ``bench/drift.py`` feeds detectors
prediction streams of a *fixed* model; in the worker the model keeps learning and its
calibration wanders (issue 17). Here every stream is what the worker's monitor judges: the
served score of each impression at its impression time against its final label, from
:func:`bench.calibration_worlds.run_world` (the worker's joiner, trainer and monitor
services in event-time order; the worker's defaults: fresh labels, fake negatives + FNW,
recalibration off, so the detector does not change what is served), on truth-known worlds
at 100, 3,000 and 30,000 impressions a minute:

- ``no_drift``: long logs; every alarm is false. Alarms per million monitored impressions.
- ``abrupt``: the CTR x1.6 at half-way: impressions from the drift to the first alarm,
  and alarms before it.

Each stream is fed to every detector in batches of 1,024 in impression order (the monitor
resolves final labels in that order, one attribution window later). Detectors: the
worker's ``window_z`` (``Settings().drift``: z 4 over 2,500 examples), the library's
``window_z`` default (z 5 over 20,000), ``wander_z`` (:mod:`monitoring.drift_wander`) and
``cusum``. Also per run: the served model's own wander, mean and worst
``|log(Σp/Σtrue_p)|`` over 5k-impression windows. Writes ``bench/results/drift_worlds.json``
(``drift_worlds_quick.json``). With ``STREAMREC_DRIFT_STREAMS=DIR`` each run's monitored
stream is also saved to ``DIR`` (``.npz``: ``p``, ``y``, ``true_p``, ``drift``), so that
detectors can be compared again without simulating (:func:`judge`).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.calibration_worlds import run_world
from bench.pipeline_sim import World, window_stats
from bench.run import bench_cli, machine, results_path, stamp, write_report
from monitoring.drift import CalibrationDriftDetector, DriftDetector, make_detector
from stream.settings import Settings

DETECTORS: dict[str, Callable[[], DriftDetector]] = {
    "window_z_worker": lambda: CalibrationDriftDetector(Settings().drift),
    "window_z_default": lambda: make_detector("window_z"),
    "wander_z": lambda: make_detector("wander_z"),
    "cusum": lambda: make_detector("cusum"),
}
RATES = (100.0, 3_000.0, 30_000.0)


@dataclass(frozen=True)
class Plan:
    """Impressions per no-drift log at each of :data:`RATES` (100/min simulates slowest:
    one event-time step per 10 s), its seeds; impressions per abrupt log, its seeds;
    pretraining impressions."""

    no_drift_n: tuple[int, ...]
    no_drift_seeds: tuple[int, ...]
    abrupt_n: int
    abrupt_seeds: tuple[int, ...]
    history: int


FULL = Plan((100_000, 500_000, 500_000), (0,), 60_000, (0, 1), 5_000)
QUICK = Plan((60_000, 60_000, 60_000), (0,), 30_000, (0,), 2_000)
BATCH = 1_024
#: environment variable: a folder to save each run's monitored stream in (``.npz``)
SAVE_ENV = "STREAMREC_DRIFT_STREAMS"


def alarms_of(make: Callable[[], DriftDetector], p: np.ndarray, y: np.ndarray) -> list[int]:
    """Rows (end of the batch) at which ``make()`` alarmed on ``(p, y)`` fed in batches."""
    det = make()
    out = []
    for s in range(0, p.size, BATCH):
        det.update_many(p[s : s + BATCH], y[s : s + BATCH])
        if det.drift_detected:
            out.append(min(s + BATCH, p.size))
    return out


def run_task(task: tuple[str, float, int, int, int]) -> dict[str, Any]:
    scenario, rate, seed, n, history = task
    t0 = time.perf_counter()
    res, prime, drift = run_world(
        "off", World(rate_per_min=rate, n=n, scenario=scenario, seed=seed), history
    )
    p, y, tp = res.p_serve[prime:], res.y[prime:], res.true_p[prime:]
    if save := os.environ.get(SAVE_ENV):  # the monitored streams, to study detectors offline
        Path(save).mkdir(parents=True, exist_ok=True)
        np.savez(Path(save) / f"{scenario}_{rate:g}_{seed}.npz", p=p, y=y, true_p=tp,
                 drift=-1 if drift is None else drift)  # fmt: skip
    out = judge(p, y, tp, drift)
    out.update(scenario=scenario, rate_per_min=rate, seed=seed,
               seconds=round(time.perf_counter() - t0, 1))  # fmt: skip
    return out


def judge(p: np.ndarray, y: np.ndarray, tp: np.ndarray, drift: int | None) -> dict[str, Any]:
    """Every detector of :data:`DETECTORS` on one monitored stream: served scores ``p``,
    final labels ``y``, truth ``tp`` (all (N,)), the drift's row (None: no drift)."""
    out: dict[str, Any] = {
        "impressions": int(p.size),
        "served_wander": window_stats(p, tp),
        "detectors": {},
    }
    for name, make in DETECTORS.items():
        rows = alarms_of(make, p, y)
        d: dict[str, Any] = {"alarms": len(rows)}
        if drift is None:
            d["alarms_per_million"] = len(rows) / p.size * 1e6
        else:
            d["alarms_before_drift"] = sum(r <= drift for r in rows)
            after = [r - drift for r in rows if r > drift]
            d["delay_impressions"] = after[0] if after else None
        out["detectors"][name] = d
    return out


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per detector and rate: false alarms per million over all no-drift impressions, the
    median delay after the abrupt drift, alarms before it."""
    out: dict[str, Any] = {}
    for name in DETECTORS:
        per: dict[str, Any] = {}
        for rate in sorted({r["rate_per_min"] for r in runs}):
            nd = [r for r in runs if r["rate_per_min"] == rate and r["scenario"] == "no_drift"]
            ab = [r for r in runs if r["rate_per_min"] == rate and r["scenario"] == "abrupt"]
            n_imp = sum(r["impressions"] for r in nd)
            n_al = sum(r["detectors"][name]["alarms"] for r in nd)
            delays = [r["detectors"][name]["delay_impressions"] for r in ab]
            per[f"{rate:g}"] = {
                "no_drift_impressions": n_imp,
                "false_alarms": n_al,
                "false_alarms_per_million": n_al / n_imp * 1e6 if n_imp else math.nan,
                "abrupt_delays": delays,
                "abrupt_alarms_before_drift": sum(
                    r["detectors"][name]["alarms_before_drift"] for r in ab
                ),
            }
        out[name] = per
    return out


def table(report: dict[str, Any]) -> str:
    lines = [
        "| detector | rate/min | false alarms (per M, no drift) | abrupt x1.6: delays |",
        "|---|---|---|---|",
    ]
    for name, per in report["summary"].items():
        for rate, r in per.items():
            delays = ", ".join("never" if d is None else f"{d:,}" for d in r["abrupt_delays"])
            lines.append(
                f"| {name} | {rate} | {r['false_alarms']} in {r['no_drift_impressions']:,} "
                f"({r['false_alarms_per_million']:.1f}) | {delays} |"
            )
    return "\n".join(lines)


def main(
    quick: bool = False, *, results_dir: Path | None = None, workers: int = 2
) -> dict[str, Any]:
    plan = QUICK if quick else FULL
    tasks = [
        ("no_drift", rate, seed, n, plan.history)
        for rate, n in zip(RATES, plan.no_drift_n, strict=True)
        for seed in plan.no_drift_seeds
    ] + [
        ("abrupt", rate, seed, plan.abrupt_n, plan.history)
        for rate in RATES
        for seed in plan.abrupt_seeds
    ]
    tasks.sort(key=lambda t: -t[3] * (6.0 if t[1] == RATES[0] else 1.0))  # longest first
    t0 = time.perf_counter()
    with ProcessPoolExecutor(max_workers=workers) as pool:
        runs = list(pool.map(run_task, tasks))
    report: dict[str, Any] = {
        **stamp("drift_worlds", quick),
        "machine": machine(),
        "plan": asdict(plan),
        "rates": list(RATES),
        "detectors": list(DETECTORS),
        "runs": runs,
        "summary": summarize(runs),
        "wall_seconds": round(time.perf_counter() - t0, 1),
    }
    out = results_path(results_dir, "drift_worlds", quick)
    write_report(report, out)
    print(table(report))
    print(f"wrote {out}")
    return report


def rejudge(report: dict[str, Any], streams: Path) -> dict[str, Any]:
    """``report`` with every run's detectors judged again on its saved stream (from a run
    with ``STREAMREC_DRIFT_STREAMS=streams``): detectors can change without simulating."""
    runs = []
    for r in report["runs"]:
        d = np.load(streams / f"{r['scenario']}_{r['rate_per_min']:g}_{r['seed']}.npz")
        drift = int(d["drift"])
        again = judge(d["p"], d["y"], d["true_p"], None if drift < 0 else drift)
        runs.append({**r, **again})
    return {**report, "runs": runs, "summary": summarize(runs), "detectors": list(DETECTORS)}


def cli(argv: list[str] | None = None) -> int:
    return bench_cli("drift_worlds", __doc__, "60k/30k-impression logs, one seed", main, argv)


if __name__ == "__main__":
    raise SystemExit(cli())
