"""Fresh labels: which labelling scheme keeps served predictions calibrated in the pipeline?

Run ``python -m bench.fresh_labels`` (full: 3 rates x 3 scenarios x 4 arms x 3 seeds) or
``--quick`` (one seed, 100k impressions, no-drift and abrupt only).

Each run is the worker's pipeline in process (:mod:`bench.pipeline_sim`: joiner -> trainer
-> monitor, every control message applied; no broker) over a truth-known log
(:func:`bench.pipeline_sim.make_world`: ``n`` online impressions at 100, 3,000 or 30,000
impressions a minute of event time, click delays ~ Exponential(mean 2 min) capped inside
the 30-minute window, ``abrupt`` x1.6 at half-way, ``gradual`` ramp x1 -> x1.6 over the
next quarter, or ``no_drift``). The ranker (the default ``RankerConfig``, DCN-v2) is first
pretrained on ``history`` impressions of the same world before the log
(:func:`logs.offline.pretrain`, final labels, BCE), then warm-started online, as
``streamrec demo`` does. Settings are ``Settings()`` but for the arm:

- ``window``: ``delayed_feedback="window"``, positives at window close (the old default);
- ``click_pos``: ``emit_positives="click"``, negatives at window close, BCE;
- ``fn_fnw``: ``delayed_feedback="fake_negative"``, loss ``fnw`` (Ktena et al. 2019);
- ``fn_fnc``: ``delayed_feedback="fake_negative"``, BCE, scores through FNC.

Measured on the score each impression was served with at its impression time (the ranker
and calibrator of that moment), against ``true_p``: ``Σp/Σtrue_p`` over the last half;
over non-overlapping 5k-impression windows the mean and max ``|log(Σp/Σtrue_p)|``; NE of
the served scores against the final labels over the last half; and the label latency
(event seconds from a click to the emission of its positive, p50 / p99). Writes
``bench/results/fresh_labels.json`` (``fresh_labels_quick.json``); medians over seeds.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, cast

import numpy as np

from bench.pipeline_sim import World, make_world, simulate, window_stats
from bench.run import bench_cli, machine, results_path, stamp, write_report
from learners.ranker import TorchRanker
from logs.offline import log_examples, pretrain
from monitoring.calibration import normalized_entropy
from stream.settings import Settings

ARMS = ("window", "click_pos", "fn_fnw", "fn_fnc")
RATES = (100.0, 3_000.0, 30_000.0)
FULL = {
    "n": 200_000,
    "history": 50_000,
    "seeds": (0, 1, 2),
    "scenarios": ("no_drift", "abrupt", "gradual"),
}
QUICK = {"n": 100_000, "history": 30_000, "seeds": (0,), "scenarios": ("no_drift", "abrupt")}


def arm_settings(arm: str, base: Settings | None = None) -> Settings:
    """``base`` (default ``Settings()``) with the arm's join, loss and FNC settings."""
    s = base or Settings()
    join = s.join
    ranker = s.ranker
    trainer = s.trainer
    if arm == "window":
        join = dataclasses.replace(join, delayed_feedback="window", emit_positives="window_close")
        ranker = dataclasses.replace(ranker, loss="bce")
        trainer = dataclasses.replace(trainer, fnc=False)
    elif arm == "click_pos":
        join = dataclasses.replace(join, delayed_feedback="window", emit_positives="click")
        ranker = dataclasses.replace(ranker, loss="bce")
        trainer = dataclasses.replace(trainer, fnc=False)
    elif arm == "fn_fnw":
        join = dataclasses.replace(join, delayed_feedback="fake_negative")
        ranker = dataclasses.replace(ranker, loss="fnw")
        trainer = dataclasses.replace(trainer, fnc=False)
    elif arm == "fn_fnc":
        join = dataclasses.replace(join, delayed_feedback="fake_negative")
        ranker = dataclasses.replace(ranker, loss="bce")
        trainer = dataclasses.replace(trainer, fnc=True)
    else:
        raise ValueError(f"unknown arm {arm!r}")
    return s.replace(join=join, ranker=ranker, trainer=trainer)


PRIME_S = 600.0  # event seconds of stream before the measured part (10 min)
MAX_PRIME = 150_000


def prime_rows(w: World) -> int:
    """Impressions streamed before the measured part: ``PRIME_S`` of event time, at most
    ``MAX_PRIME``. A stream that starts empty has no positives in flight: for the first
    click delays the fake-negative stream under-counts clicks (a transient no running
    worker sees: its joiner state holds the impressions whose clicks are on their way)."""
    return min(int(w.rate_per_min / 60.0 * PRIME_S), MAX_PRIME)


def world_with_history(w: World, history: int) -> tuple[Any, Any, int | None, int]:
    """The log of ``history + prime + n`` rows: the history frame (pretraining), the
    streamed frame (prime + online), the drift row and the first measured row of it."""
    prime = prime_rows(w)
    lead = history + prime
    total = w.n + lead
    full = dataclasses.replace(
        w, n=total, drift_at=(lead + w.drift_at * w.n) / total, ramp=w.ramp * w.n / total
    )
    df, drift = make_world(full)
    online = df.iloc[history:].reset_index(drop=True)
    return df.iloc[:history], online, None if drift is None else drift - history, prime


def run_one(arm: str, w: World, history: int, settings: Settings | None = None) -> dict[str, Any]:
    """One pipeline run; the numbers of :func:`measure`."""
    import torch

    torch.set_num_threads(1)
    s = arm_settings(arm, settings)
    hist, df, drift, prime = world_with_history(w, history)
    ranker = None
    if history:
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = Path(tmp) / "pretrained.pt"
            pretrain(log_examples(hist), ckpt, config=s.ranker, seed=w.seed, progress=False)
            ranker = TorchRanker.load(ckpt, online=True, loss=s.ranker.loss, fnc=s.ranker.fnc)
    res = simulate(df, s, seed=w.seed, ranker=ranker)
    m = slice(prime, None)
    out = measure(res.p_serve[m], res.p_serve_raw[m], res.true_p[m], res.y[m],
                  None if drift is None else drift - prime)  # fmt: skip
    lat = res.click_latency_s
    out.update(
        arm=arm,
        world=w.name,
        scenario=w.scenario,
        rate_per_min=w.rate_per_min,
        seed=w.seed,
        label_latency_p50_s=float(np.median(lat)) if lat.size else math.nan,
        label_latency_p99_s=float(np.quantile(lat, 0.99)) if lat.size else math.nan,
        examples_trained=res.examples_trained,
        seconds=res.seconds,
        monitor=res.monitor,
        prime=prime,
        alarm_rows=[a - prime for a in res.alarm_rows],
        refit_rows=[a - prime for a in res.refit_rows],
        rollback_rows=[a - prime for a in res.rollback_rows],
    )
    return out


def recovery(p: np.ndarray, true_p: np.ndarray, start: int, band: float, step: int = 500,
             window: int = 5_000) -> int | None:  # fmt: skip
    """Impressions from ``start`` until the trailing-``window`` ratio stays within ``band``
    of 1 at every later ``step`` (0: never left; None: out at the end)."""
    cp = np.concatenate(([0.0], np.cumsum(p)))
    ct = np.concatenate(([0.0], np.cumsum(true_p)))
    ends = np.arange(start + step, p.size + 1, step)
    ends = ends[ends >= window]
    if ends.size == 0:
        return None
    ratio = (cp[ends] - cp[ends - window]) / (ct[ends] - ct[ends - window])
    out = ~(np.abs(ratio - 1.0) <= band)
    if not out.any():
        return 0
    last = int(np.flatnonzero(out)[-1])
    if last == ends.size - 1:
        return None
    return int(ends[last + 1] - start)


def measure(
    p: np.ndarray, p_raw: np.ndarray, true_p: np.ndarray, y: np.ndarray, drift: int | None
) -> dict[str, Any]:
    """Served and raw numbers of one run (see the module doc)."""
    n = p.size
    h = n // 2
    out: dict[str, Any] = {}
    for name, q in (("served", p), ("raw", p_raw)):
        block: dict[str, Any] = {
            "ratio_last_half": float(q[h:].sum() / true_p[h:].sum()),
            "ratio_all": float(q.sum() / true_p.sum()),
            "ne_last_half": normalized_entropy(np.clip(q[h:], 1e-6, 1 - 1e-6), y[h:]),
            **window_stats(q, true_p),
        }
        if drift is not None:
            block["ratio_after_drift"] = float(q[drift:].sum() / true_p[drift:].sum())
            for band in (0.10, 0.05):
                block[f"recovery_{int(band * 100)}pct"] = recovery(q, true_p, drift, band)
            pre = window_stats(q[:drift], true_p[:drift])
            block["max_abs_log_ratio_before_drift"] = pre.get("max_abs_log_ratio")
        out[name] = block
    out["oracle_ne_last_half"] = normalized_entropy(true_p[h:], y[h:])
    return out


def _median(values: list[Any]) -> Any:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if len(vals) < len(values):
        # a None recovery means "never": the median of the others would hide it
        return None if any(v is None for v in values) else math.nan
    return float(np.median(vals))


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Median over seeds per (scenario, rate, arm)."""
    keys = sorted({(r["scenario"], r["rate_per_min"], r["arm"]) for r in runs})
    rows = []
    for sc, rate, arm in keys:
        rs = [r for r in runs if (r["scenario"], r["rate_per_min"], r["arm"]) == (sc, rate, arm)]
        row: dict[str, Any] = {"scenario": sc, "rate_per_min": rate, "arm": arm, "seeds": len(rs)}
        for part in ("served", "raw"):
            for k in rs[0][part]:
                row[f"{part}_{k}"] = _median([r[part][k] for r in rs])
        for k in ("label_latency_p50_s", "label_latency_p99_s", "oracle_ne_last_half"):
            row[k] = _median([r[k] for r in rs])
        row["alarms"] = _median([r["monitor"]["alarms"] for r in rs])
        row["recalibrations"] = _median([r["monitor"]["recalibrations"] for r in rs])
        rows.append(row)
    return rows


def table(report: dict[str, Any]) -> str:
    head = (
        "| scenario | rate/min | arm | served Σp/Σtrue_p last half | mean abs log ratio (5k) "
        "| max abs log ratio | NE last half (oracle) | click->label p50 / p99 s |"
    )
    lines = [head, "|" + "---|" * 8]
    for r in report["summary"]:
        lines.append(
            f"| {r['scenario']} | {r['rate_per_min']:g} | {r['arm']} "
            f"| {r['served_ratio_last_half']:.3f} | {r['served_mean_abs_log_ratio']:.3f} "
            f"| {r['served_max_abs_log_ratio']:.3f} "
            f"| {r['served_ne_last_half']:.3f} ({r['oracle_ne_last_half']:.3f}) "
            f"| {r['label_latency_p50_s']:.0f} / {r['label_latency_p99_s']:.0f} |"
        )
    return "\n".join(lines)


def _job(args: tuple[str, World, int]) -> dict[str, Any]:
    return run_one(*args)


def main(quick: bool = False, *, results_dir: Path | None = None,
         arms: tuple[str, ...] = ARMS, workers: int = 2) -> dict[str, Any]:  # fmt: skip
    plan = cast(dict[str, Any], QUICK if quick else FULL)
    jobs = [
        (arm, World(rate_per_min=rate, n=plan["n"], scenario=sc, seed=seed), plan["history"])
        for sc in plan["scenarios"]
        for rate in RATES
        for seed in plan["seeds"]
        for arm in arms
    ]
    t0 = time.perf_counter()
    with ProcessPoolExecutor(max_workers=workers) as ex:
        runs = list(ex.map(_job, jobs))
    report: dict[str, Any] = {
        **stamp("fresh_labels", quick),
        "machine": machine(),
        "wall_seconds": round(time.perf_counter() - t0, 1),
        "plan": {k: list(v) if isinstance(v, tuple) else v for k, v in plan.items()},
        "rates_per_min": list(RATES),
        # the worker's join settings (Settings().join, e.g. align_fake_negatives on) that
        # every arm starts from before its own changes
        "join": dataclasses.asdict(Settings().join),
        "runs": runs,
        "summary": summarize(runs),
    }
    write_report(report, results_path(results_dir, "fresh_labels", quick))
    print(table(report))
    return report


if __name__ == "__main__":
    raise SystemExit(
        bench_cli("fresh_labels", __doc__, "one seed, 100k impressions, 2 scenarios", main, None)
    )
