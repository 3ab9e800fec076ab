"""Recalibration after a CTR drift: streamrec's monitor vs peers that adapt on their own.

Run ``python -m bench.calibration`` (full, about 3 min on 2 cores) or ``--quick`` (< 1 min).
In process, no Kafka: for each (scenario, seed) a synthetic log with known ``true_p``
(:mod:`logs.synthetic`) is split into a history segment and an online segment.

- **streamrec**: a ``TorchRanker`` with the default ``RankerConfig`` (DCN-v2), warm-started
  by :func:`logs.offline.pretrain` on the history at the base learning rate (as
  ``streamrec demo`` does), then learning online (``base_lr * online_lr_scale``) inside a
  :class:`stream.services.TrainerService`, micro-batches of 1024: each step scores the
  batch, learns from it and returns the :class:`logs.batches.ScoredBatch` the worker
  publishes. A :class:`stream.services.MonitorService` (``Settings()`` defaults, a fresh
  registry) observes every batch; every ``calibrator`` control message it returns is
  applied to the trainer at once (``TrainerService.apply_control``), so the next batch is
  served through it. ``streamrec (recalibrated)`` is the served score ``p`` (the default
  ``monitor.recalibration="track"``: armed by a drift alarm); ``streamrec raw`` is
  ``p_raw`` of the same run, observed by a second monitor whose calibrators are not
  applied; ``streamrec (continuous)`` is ``p_raw`` served through the calibrators of a
  third monitor with ``recalibration="continuous"`` (armed from the end of its warm-up),
  applied as the trainer applies them. Calibration never changes what the model learns, so
  one ranker run serves all three.
- **peers**, adapting on their own (their monitors' calibrators are not applied):
  ``river_logreg`` (:class:`learners.river_peers.RiverLogisticRegression`, SGD lr 0.05) and
  ``vw_logistic`` (:class:`learners.vw_peer.VowpalWabbitLogistic`, VW's defaults), each
  trained on the history first, then test-then-train on the same micro-batches.

Scenarios: ``abrupt`` (the generator's default drift: every ``true_p`` x1.6 from the middle
of the online segment, 4.0% -> 6.4%), ``gradual`` (no drift in the generator; the bench
ramps the multiplier linearly from 1 to 1.6 over ``RAMP`` impressions from the middle of
the online segment and redraws those clicks) and ``no_drift``.

Measured per learner (impressions are counted in the online segment; the drift is at
online row ``D``; ratios are ``Σp / Σtrue_p`` over the trailing ``WINDOW`` impressions,
evaluated at the end of every micro-batch from ``D`` on):

- ``detection delay``: impressions from ``D`` to the end of the batch on which the
  learner's monitor raised its first drift alarm (alarms count after the monitor's
  warm-up, as in the worker);
- ``false alarms / M``: alarms per million monitored impressions before any drift (after
  the warm-up), over the no-drift logs and the pre-drift parts of the others;
- ``back within ±10% / ±5%``: impressions from ``D`` to the end of the first batch after
  which the windowed ratio stays within the band to the end of the log (0: it never left;
  ``never``: still outside at the end).

Goal (issue #8): streamrec (recalibrated) back within ±10% and staying there, in fewer
impressions than the fastest peer (median over the abrupt seeds).
Writes ``bench/results/calibration.json`` (``calibration_quick.json``) and prints a table.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from prometheus_client import CollectorRegistry

from bench.calibration_summary import (
    BANDS,
    CONTINUOUS,
    PEERS,
    RAW,
    RECAL,
    goal,
    goal_line,
    summarise,
    table,
)
from bench.run import bench_parser, machine, results_path, stamp, write_report
from learners.calibration import Calibrator, PlattCalibrator, calibrator_from_dict
from learners.ranker import TorchRanker
from learners.river_peers import RiverLogisticRegression
from logs.batches import ScoredBatch
from logs.events import LabeledExample, example_row
from logs.io import frame_to_rows
from logs.offline import log_examples, pretrain
from logs.synthetic import SyntheticConfig, generate
from monitoring.calibration import log_loss
from monitoring.metrics import StreamrecMetrics
from stream.control import CalibratorUpdate
from stream.join import JoinConfig
from stream.services import MonitorService, TrainerService, segment_of
from stream.settings import MonitorConfig, Settings

BATCH = 1024
WINDOW = 5_000
RAMP = 50_000
SHIFT = 1.6
SCENARIOS = ("abrupt", "gradual", "no_drift")


@dataclass(frozen=True)
class Plan:
    """Sizes of one run; ``warmup``: the monitor's warm-up (``MonitorConfig.warmup``) when
    it differs from the default (the quick logs are too short for 50k)."""

    history: int
    online: int
    seeds: dict[str, tuple[int, ...]]
    warmup: int | None = None


FULL = Plan(
    history=50_000,
    online=200_000,
    seeds={"abrupt": (0, 1, 2), "gradual": (0, 1), "no_drift": (0, 1)},
)
QUICK = Plan(
    history=10_000,
    online=50_000,
    seeds={"abrupt": (0,), "gradual": (), "no_drift": (0,)},
    warmup=10_000,
)


def settings_for(plan: Plan) -> Settings:
    """``Settings()`` with final labels (the window scheme: this bench feeds them) and the
    tracking recalibration it measures, with the plan's monitor warm-up when it sets one."""
    settings = Settings(join=JoinConfig(), monitor=MonitorConfig(recalibration="track"))
    if plan.warmup is not None:
        settings = settings.replace(
            monitor=MonitorConfig(warmup=plan.warmup, recalibration="track")
        )
    return settings


# --- data ---------------------------------------------------------------------------------


def make_log(scenario: str, seed: int, plan: Plan) -> tuple[pd.DataFrame, int | None]:
    """The log (history then online rows) and the online row ``D`` of the drift (None)."""
    total = plan.history + plan.online
    middle = plan.online // 2
    if scenario == "abrupt":
        cfg = SyntheticConfig(
            n_impressions=total, seed=seed, drift_at=(plan.history + middle) / total
        )
        # The generator starts the drift at a request (slate) boundary.
        assert cfg.drift_at is not None
        first = round(cfg.drift_at * total / cfg.slate_size) * cfg.slate_size
        return generate(cfg), first - plan.history
    df = generate(SyntheticConfig(n_impressions=total, seed=seed, drift_at=None))
    if scenario == "no_drift":
        return df, None
    start = plan.history + middle
    t = np.arange(total) - start
    mult = 1.0 + (SHIFT - 1.0) * np.clip(t / RAMP, 0.0, 1.0)
    true_p = np.minimum(df["true_p"].to_numpy() * mult, 0.99)
    rng = np.random.default_rng([seed, 7])
    click = df["click"].to_numpy().copy()
    after = t >= 0
    click[after] = (rng.random(int(after.sum())) < true_p[after]).astype(np.int64)
    ts = df["ts"].to_numpy()
    delay = rng.exponential(60.0, size=total)
    df = df.assign(true_p=true_p, click=click, click_ts=np.where(click == 1, ts + delay, np.nan))
    return df, middle


def labelled(df: pd.DataFrame) -> list[LabeledExample]:
    """Every row as the joiner would emit it: a positive at its click, else a negative."""
    out = []
    for r in frame_to_rows(df):
        imp = r.impression()
        if r.click:
            out.append(LabeledExample(imp, 1, r.click_ts or r.ts, kind="positive"))
        else:
            out.append(LabeledExample(imp, 0, r.ts + 1800.0, kind="negative"))
    return out


def _monitor(settings: Settings) -> MonitorService:
    return MonitorService(settings, StreamrecMetrics(registry=CollectorRegistry()))


def _peer_batch(examples: list[LabeledExample], p: np.ndarray) -> ScoredBatch:
    imps = [e.impression for e in examples]
    return ScoredBatch(
        model_version=0,
        calibrator_version=0,
        impression_ids=[i.impression_id for i in imps],
        ts=[i.ts for i in imps],
        label=[int(e.label) for e in examples],
        p_raw=[float(x) for x in p],
        p=[float(x) for x in p],
        segment=[segment_of(i.position) for i in imps],
        true_p=[i.true_p for i in imps],
    )


def _alarm_rows(monitor: MonitorService) -> list[int]:
    """Online rows at which the monitor's drift alarms fired (end of the alarming batch)."""
    return [int(e.examples_seen or 0) for e in monitor.events]


def run_streamrec(
    settings: Settings, history: Any, online: list[LabeledExample], seed: int
) -> dict[str, dict[str, Any]]:
    """The trainer + monitor loop of the worker, in process; served and raw scores."""
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "pretrained.pt"
        pretrain(history, ckpt, config=settings.ranker, seed=seed, progress=False)
        ranker = TorchRanker.load(ckpt, device=settings.ranker.device, online=True,
                                  fnc=settings.ranker.fnc)  # fmt: skip
    trainer = TrainerService(settings, StreamrecMetrics(registry=CollectorRegistry()), ranker)
    monitor, raw_monitor = _monitor(settings), _monitor(settings)
    continuous = settings.replace(
        monitor=dataclasses.replace(settings.monitor, recalibration="continuous")
    )
    cont_monitor = _monitor(continuous)
    cont_calibrator: Calibrator = PlattCalibrator()
    p, p_raw, p_cont = (np.empty(len(online)) for _ in range(3))
    t0 = time.perf_counter()
    for s in range(0, len(online), BATCH):
        trainer.add(online[s : s + BATCH])
        batch = trainer.step()
        assert batch is not None
        rows = slice(s, s + len(batch.p))
        p[rows], p_raw[rows] = batch.p, batch.p_raw
        for msg in monitor.observe(batch):
            trainer.apply_control(msg)
        raw_monitor.observe(dataclasses.replace(batch, p=batch.p_raw, calibrator_version=0))
        # The continuous policy on the same raw scores: what the trainer would serve with
        # its calibrators (calibration never changes what the model learns).
        p_cont[rows] = served = cont_calibrator.transform(p_raw[rows])
        for msg in cont_monitor.observe(dataclasses.replace(batch, p=served.tolist())):
            if isinstance(msg, CalibratorUpdate):
                cont_calibrator = calibrator_from_dict(msg.params)
    seconds = time.perf_counter() - t0

    def served_by(m: MonitorService, scores: np.ndarray) -> dict[str, Any]:
        return {
            "p": scores,
            "alarms": _alarm_rows(m),
            "seconds": seconds,
            "recalibrations": m.n_recalibrations,
            "rejected": m.n_rejected,
            "calibrator_versions": m.calibrator_version,
        }

    return {
        RECAL: served_by(monitor, p),
        CONTINUOUS: served_by(cont_monitor, p_cont),
        RAW: {"p": p_raw, "alarms": _alarm_rows(raw_monitor), "seconds": seconds},
    }


def _peer(name: str, seed: int) -> Any:
    if name == "river_logreg":
        return RiverLogisticRegression(seed=seed)
    from learners.vw_peer import VowpalWabbitLogistic

    return VowpalWabbitLogistic(seed=seed)


def run_peer(
    name: str, settings: Settings, history: Any, online: list[LabeledExample], seed: int
) -> dict[str, Any]:
    """A peer learns the history, then test-then-train on the online micro-batches."""
    learner = _peer(name, seed)
    for s in range(0, len(history), BATCH):
        learner.learn_many(history.rows[s : s + BATCH], history.y[s : s + BATCH])
    monitor = _monitor(settings)
    p = np.empty(len(online))
    t0 = time.perf_counter()
    for s in range(0, len(online), BATCH):
        chunk = online[s : s + BATCH]
        rows = [example_row(e.impression) for e in chunk]
        y = np.array([e.label for e in chunk], dtype=np.float64)
        p[s : s + len(chunk)] = scores = learner.score_and_learn(rows, y)
        monitor.observe(_peer_batch(chunk, scores))
    return {"p": p, "alarms": _alarm_rows(monitor), "seconds": time.perf_counter() - t0}


# --- measures -----------------------------------------------------------------------------


TRAJECTORY_EVERY = 2  # batch ends between two trajectory points (2,048 impressions)


def windowed_ratio(p: np.ndarray, true_p: np.ndarray, window: int = WINDOW) -> np.ndarray:
    """``Σp / Σtrue_p`` over the trailing ``window`` rows ending at each row (N,); nan
    before the first full window."""
    cp = np.concatenate(([0.0], np.cumsum(p)))
    ct = np.concatenate(([0.0], np.cumsum(true_p)))
    out = np.full(p.size, np.nan)
    if p.size >= window:
        out[window - 1 :] = (cp[window:] - cp[:-window]) / (ct[window:] - ct[:-window])
    return out


def batch_ends(n: int, start: int) -> np.ndarray:
    """Rows (0-based, inclusive) ending a micro-batch at or after ``start``."""
    ends = np.arange(BATCH, n + BATCH, BATCH).clip(max=n) - 1
    return ends[ends >= start]


def recovery(ratio: np.ndarray, ends: np.ndarray, start: int, band: float) -> int | None:
    """Rows from ``start`` to the end of the batch after which ``|ratio − 1| <= band`` holds
    at every later batch end: 0 if it never left the band, None if it is out at the end."""
    out = ~(np.abs(ratio[ends] - 1.0) <= band)  # nan counts as out
    if not out.any():
        return 0
    last = int(np.flatnonzero(out)[-1])
    if last == ends.size - 1:
        return None
    return int(ends[last + 1] + 1 - start)


def measure(
    p: np.ndarray,
    true_p: np.ndarray,
    y: np.ndarray,
    alarms: list[int],
    drift: int | None,
    warmup: int,
) -> dict[str, Any]:
    """The per-run numbers of one learner (see the module docstring)."""
    ratio = windowed_ratio(p, true_p)
    n = p.size
    stop = n if drift is None else drift
    every = batch_ends(n, 0)[::TRAJECTORY_EVERY]
    out: dict[str, Any] = {
        "alarms_before_drift": sum(1 for a in alarms if a <= stop),
        "monitored_before_drift": max(0, stop - warmup),
        # for plots: the windowed ratio at every TRAJECTORY_EVERY-th batch end (online rows)
        "trajectory": {
            "row": [int(e) + 1 for e in every],
            "ratio": [_finite(float(v)) for v in ratio[every]],
        },
    }
    settled = max(warmup, WINDOW)
    ends = batch_ends(stop, settled)
    pre = ratio[ends] if ends.size else np.array([np.nan])
    out["max_abs_dev_before_drift"] = _finite(np.nanmax(np.abs(pre - 1.0)))
    for band in BANDS:
        out[f"share_within_{round(band * 100)}_before_drift"] = float(
            np.mean(np.abs(pre - 1.0) <= band)
        )
    if drift is None:
        return out
    after = [a for a in alarms if a > drift]
    out["detection_delay"] = after[0] - drift if after else None
    ends = batch_ends(n, drift)
    for band in BANDS:
        out[f"recovery_{round(band * 100)}"] = recovery(ratio, ends, drift, band)
    post = slice(drift, None)
    half = slice(drift + (n - drift) // 2, None)
    out["ratio_after"] = float(p[post].sum() / true_p[post].sum())
    out["ratio_after_second_half"] = float(p[half].sum() / true_p[half].sum())
    late = ends[ends >= drift + 30_000]
    out["max_abs_dev_from_30k"] = (
        _finite(np.nanmax(np.abs(ratio[late] - 1.0))) if late.size else None
    )
    out["log_loss_after"] = log_loss(np.clip(p[post], 0.0, 1.0), y[post])
    return out


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def run_task(scenario: str, seed: int, plan: Plan) -> dict[str, Any]:
    """One log: every learner over it; per-learner measures."""
    import torch

    torch.set_num_threads(1)  # one task per core
    t0, c0 = time.perf_counter(), time.process_time()
    settings = settings_for(plan)
    df, drift = make_log(scenario, seed, plan)
    history = log_examples(df.iloc[: plan.history])
    online_df = df.iloc[plan.history :].reset_index(drop=True)
    online = labelled(online_df)
    true_p = online_df["true_p"].to_numpy(dtype=np.float64)
    y = online_df["click"].to_numpy(dtype=np.float64)
    runs = run_streamrec(settings, history, online, seed)
    for name in PEERS:
        runs[name] = run_peer(name, settings, history, online, seed)
    warmup = settings.monitor.warmup
    out: dict[str, Any] = {"scenario": scenario, "seed": seed, "drift_row": drift, "learners": {}}
    for name, r in runs.items():
        m = measure(r["p"], true_p, y, r["alarms"], drift, warmup)
        m["alarms"] = r["alarms"]
        m["seconds"] = round(float(r["seconds"]), 2)
        for key in ("recalibrations", "rejected", "calibrator_versions"):
            if key in r:
                m[key] = r[key]
        out["learners"][name] = m
    out["seconds"] = round(time.perf_counter() - t0, 1)
    out["cpu_seconds"] = round(time.process_time() - c0, 1)
    return out


def _run_task_args(args: tuple[str, int, Plan]) -> dict[str, Any]:
    return run_task(*args)


def main(
    quick: bool = False, *, results_dir: Path | None = None, workers: int | None = None
) -> dict[str, Any]:
    """Run the benchmark, write its JSON, print its table; the report."""
    plan = QUICK if quick else FULL
    tasks = [(sc, seed, plan) for sc in SCENARIOS for seed in plan.seeds[sc]]
    workers = max(1, min(workers or os.cpu_count() or 1, len(tasks)))
    t0 = time.perf_counter()
    with ProcessPoolExecutor(max_workers=workers) as pool:
        runs = list(pool.map(_run_task_args, tasks))
    for r in runs:
        print(
            f"  {r['scenario']} seed {r['seed']}: {r['seconds']:.1f} s ({r['cpu_seconds']} s CPU)",
            flush=True,
        )
    summary = summarise(runs)
    settings = settings_for(plan)
    report: dict[str, Any] = {
        **stamp("calibration", quick),
        "machine": {**machine(), "workers": workers},
        "wall_seconds": round(time.perf_counter() - t0, 1),
        "notes": [
            f"history {plan.history:,} + online {plan.online:,} impressions per log; "
            f"drift at online row ~{plan.online // 2:,}; ratio window {WINDOW:,} impressions",
        ],
        "plan": dataclasses.asdict(plan),
        "monitor": dataclasses.asdict(settings.monitor),
        "drift_test": dataclasses.asdict(settings.drift),
        "goal": goal(summary),
        "learners": summary,
        "runs": runs,
    }
    write_report(report, out := results_path(results_dir, "calibration", quick))
    print(table(report))
    if report["goal"]:
        print(goal_line(report["goal"]))
    print(f"wrote {out}")
    return report


def run(quick: bool = False, results_dir: Path | None = None) -> dict[str, Any]:
    """``bench.run``'s entry point."""
    return main(quick, results_dir=results_dir)


def cli(argv: list[str] | None = None) -> int:
    parser = bench_parser("calibration", __doc__, "smoke sizes (< 60 s)")
    parser.add_argument("--workers", type=int, default=None, help="default os.cpu_count()")
    args = parser.parse_args(argv)
    main(args.quick, results_dir=args.results_dir, workers=args.workers)
    return 0


def markdown(report: dict[str, Any]) -> str:
    """``bench.run``'s README section: the table and the goal line."""
    goal = report.get("goal")
    return table(report) + (f"\n\n{goal_line(goal)}" if goal else "")


if __name__ == "__main__":
    raise SystemExit(cli())
