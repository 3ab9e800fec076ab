"""Truth-known worlds through the worker's services: does recalibration ever make things worse?

Run ``python -m bench.calibration_worlds`` (3 rates x 3 scenarios x 3 policies x 3 seeds)
or ``--quick`` (one seed, 100 and 3,000 a minute only, 10k-impression logs).

Each run is :func:`bench.pipeline_sim.simulate`: the same ``JoinService``-side joiner
(:class:`stream.join.OnlineJoiner`), :class:`stream.services.TrainerService` and
:class:`stream.services.MonitorService` the worker drives, fed in event-time order, every
control message of the monitor applied to the trainer. Settings are the worker's defaults
(``Settings()``: fresh labels, fake negatives + FNW; the monitor judges final labels) but
for: the attribution window ``WINDOW_S`` (5 minutes; click delays ~ Exponential(mean 60 s)
capped inside it, so that the monitor's final labels come within the run at 3,000 a
minute), the monitor's warm-up (``WARMUP`` examples) and the recalibration policy:

- ``track``: ``monitor.recalibration="track"`` (the policy of issue 17's measurements);
- ``off``: no recalibration (served = raw; alarms are still counted);
- ``guarded``: a refit is proposed on an alarm, accepted only if it beats the serving
  calibrator on a forward holdout (final labels that arrive after the fit) by more than
  that holdout's noise, and rolled back when the served log loss then exceeds the raw
  ranker's by more than its noise (``stream.services.MonitorService``).

Worlds (:func:`bench.pipeline_sim.make_world`, ``true_p`` known): ``no_drift``, ``abrupt``
(CTR x1.6 at half-way) and ``gradual`` (ramp x1 -> x1.6 over the next quarter) at 100,
3,000 and 30,000 impressions a minute of event time; the ranker is pretrained on
``history`` impressions of the same world and warm-started online (``streamrec demo``).

Per run, on the score each impression was SERVED with at its impression time, against
``true_p``, for the served and the raw (uncalibrated) score: mean and worst
``|log(Σp/Σtrue_p)|`` over non-overlapping 5k-impression windows; impressions after the
abrupt drift until the trailing-5k ratio stays within ±10% (None: not by the end); drift
alarms per million monitored impressions in ``no_drift`` (false alarms); accepted refits
and rollbacks. ``summary`` holds medians over seeds; ``bars`` whether served <= raw (mean
window error) in every world, per policy. Writes ``bench/results/calibration_worlds.json``
(``calibration_worlds_quick.json``).

At 30,000 a minute the final labels of the 5-minute window lag 150,000 impressions, more
than a run: the monitor cannot act there and served = raw by construction (reported).

``--dfm`` compares the labelling schemes instead of the policies, in the same worlds and
runs (policy ``off``, so served = raw): ``default`` (the worker's fake negatives + FNW) and
``dfm`` (``join.delayed_feedback="dfm"``, loss ``dfm``, observation time
``DFM_OBSERVE_S``: one mean click delay, so 37% of the clicks come after it and the delay
head models them). Plan :data:`DFM_PLAN` (``--quick``: :data:`QUICK`); writes
``calibration_worlds_dfm.json`` (``calibration_worlds_dfm_quick.json``).

``--startup`` compares, the same way, the fake negatives with (``startup``) and without
(``default``) the joiner's start-up compensation (``join.startup_compensation``: the fake
negatives of the first window after a fresh start weigh the estimated click-delay CDF;
its prior mean delay is the mean delay of the pretraining log's clicks, as a deployment
would read it off its log). Plan :data:`STARTUP_PLAN` (``--quick``: :data:`QUICK`);
writes ``calibration_worlds_startup.json``.

``--recovery`` (issue 17: recovery after a drift) compares, all with the start-up
compensation and policy ``off``, the served score of the ranker alone (``startup``), with
the delay-aware logit offset :class:`monitoring.offset.LogitOffset` after it
(``startup+offset``, delay model: the pretraining log's mean click delay, capped at the
window) and with the same offset without a delay model (``startup+offset_nodelay``: the
plain tracked ratio), and the offset as the worker runs it (``startup+offset_worker``:
``[offset] enabled`` with the same delay model; the monitor feeds it from the scored
stream, re-estimates it every ``refresh_every`` impressions and publishes it inside the
calibrator on ``control``, which the trainer applies: later and coarser than the bench's
own offset, which sees every impression when it is served and every click at its click
time); ``startup+offset_worker_gated``: the same behind a gate of :data:`GATE_Z` null
standard deviations (``OffsetConfig.gate_z``); ``startup+offset_worker_slowprior``: the
worker's offset with a delay prior :data:`SLOW_PRIOR` times too slow, its delays learned
from the stream (``OffsetConfig.estimate_delay``, the default since 2026-12-06), and
``..._slowprior_fixed`` the same prior kept fixed; ``startup+offset_worker_hl<N>``: the
worker's offset with a half-life of ``N`` impressions (horizon scaled alike; the default
is 5,000 since 2026-12-06, 1,500 before; any ``N`` is an arm of ``--arms``). Every other
arm runs with the worker's offset off, whatever the settings' default. ``--arms A,B`` runs
a subset. Plan
:data:`RECOVERY_PLAN`; per run also the impressions to ±10% on a trailing 1k window after
the drift and the share of 1k windows beyond ±5% after that; writes
``calibration_worlds_recovery.json``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, cast

import numpy as np

from bench.fresh_labels import measure, recovery
from bench.pipeline_sim import SimResult, World, make_world, simulate, window_stats
from bench.run import bench_parser, machine, results_path, stamp, write_report
from learners.ranker import TorchRanker
from logs.offline import log_examples, pretrain
from monitoring.offset import LogitOffset, OffsetConfig
from stream.settings import Settings

POLICIES = ("track", "guarded", "off")
RATES = (100.0, 3_000.0, 30_000.0)
SCENARIOS = ("no_drift", "abrupt", "gradual")
WINDOW_S = 300.0
DELAY_MEAN_S = 60.0
WARMUP = 5_000
FULL = {"n": 30_000, "history": 5_000, "seeds": (0, 1, 2), "rates": RATES}
QUICK = {"n": 10_000, "history": 2_000, "seeds": (0,), "rates": (100.0, 3_000.0)}
DFM_PLAN = {"n": 30_000, "history": 5_000, "seeds": (0, 1), "rates": RATES}
#: ``--dfm``: the labelling schemes compared, and the DFM observation time (seconds)
LABEL_SCHEMES = ("default", "dfm")
#: ``--startup``: without / with the joiner's start-up compensation
STARTUP_SCHEMES = ("default", "startup")
#: ``--recovery``: ranker alone / + delay-aware offset / + offset without delay model /
#: + the offset as the worker runs it (``[offset] enabled``: in the monitor, fed from the
#: scored stream, published on control)
RECOVERY_SCHEMES = (
    "startup",
    "startup+offset",
    "startup+offset_nodelay",
    "startup+offset_worker",
    "startup+offset_worker_gated",
    "startup+offset_worker_slowprior",
    "startup+offset_worker_slowprior_fixed",
)
#: ``--arms``: the worker's offset at any half-life of N >= 1 impressions
_HL_ARM = re.compile(r"startup\+offset_worker_hl[1-9][0-9]*")
#: ``*_slowprior``: the worker's offset with a delay prior this many times the true mean
#: (the delays learned from the stream, the default); ``*_slowprior_fixed``: the same
#: prior with ``estimate_delay`` off (the model before 2026-12-06)
SLOW_PRIOR = 10.0
#: ``startup+offset_worker_gated``: the worker's offset behind a gate of this many null
#: standard deviations (OffsetConfig.gate_z)
GATE_Z = 3.0
RECOVERY_PLAN = {"n": 16_000, "history": 2_000, "seeds": (0, 1, 2, 3, 4), "rates": RATES}
#: seeds at 30,000 a minute (the slowest runs)
RECOVERY_SEEDS_FAST = (0, 1)
STARTUP_PLAN = {"n": 10_000, "history": 2_000, "seeds": (0, 1), "rates": RATES}
DFM_OBSERVE_S = 60.0


def scheme_settings(scheme: str, prior_delay_s: float | None = None) -> Settings:
    """``"default"``: the worker's settings; ``"dfm"``: the same with the DFM scheme (its
    loss follows: "bce" is read as "dfm") observing for :data:`DFM_OBSERVE_S`;
    ``"startup"``: with the start-up compensation, prior mean delay ``prior_delay_s``."""
    scheme = scheme.split("+")[0]
    if scheme == "default":
        return Settings()
    if scheme == "startup":
        base = Settings().join
        prior = base.startup_delay_prior_s if prior_delay_s is None else prior_delay_s
        join = dataclasses.replace(base, startup_compensation=True, startup_delay_prior_s=prior)
        return Settings(join=join)
    join = dataclasses.replace(Settings().join, delayed_feedback="dfm", dfm_observe_s=DFM_OBSERVE_S)
    return Settings(join=join)


def policy_settings(policy: str, base: Settings | None = None) -> Settings:
    """The worker's defaults with the bench's window and warm-up and ``policy``."""
    s = base or Settings()
    join = dataclasses.replace(s.join, window_s=WINDOW_S, lateness_s=0.0)
    monitor = dataclasses.replace(s.monitor, warmup=WARMUP, recalibration=policy)
    return s.replace(join=join, monitor=monitor)


def prime_rows(rate_per_min: float) -> int:
    """Impressions streamed before the measured part (clicks in flight): one mean click
    delay x 3 of event time, at least 500, at most 30,000."""
    return int(min(max(rate_per_min / 60.0 * 3 * DELAY_MEAN_S, 500), 30_000))


def run_world(
    policy: str, w: World, history: int, scheme: str = "default"
) -> tuple[SimResult, int, int | None]:
    """Simulate world ``w`` through the worker's services with ``policy`` and label
    ``scheme``, the ranker pretrained on ``history`` impressions of it: the result, the
    rows streamed before the measured part (``prime``) and the drift's row within the
    measured part (None)."""
    import torch

    torch.set_num_threads(1)
    prime = prime_rows(w.rate_per_min)
    lead = history + prime
    total = w.n + lead
    full = dataclasses.replace(
        w,
        n=total,
        drift_at=(lead + w.drift_at * w.n) / total,
        ramp=w.ramp * w.n / total,
        delay_mean_s=DELAY_MEAN_S,
        max_delay_s=WINDOW_S - 1.0,
    )
    df_all, drift = make_world(full)
    hist, df = df_all.iloc[:history], df_all.iloc[history:].reset_index(drop=True)
    delays = (hist["click_ts"] - hist["ts"]).dropna().to_numpy()
    prior = float(delays.mean()) if delays.size else None
    s = policy_settings(policy, scheme_settings(scheme, prior))
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "pretrained.pt"
        pretrain(log_examples(hist), ckpt, config=s.ranker, seed=w.seed, progress=False)
        ranker = TorchRanker.load(ckpt, online=True, loss=s.ranker.loss, fnc=s.ranker.fnc)
    offset = None
    if "+offset_worker" in scheme:  # the worker's own: the monitor runs it
        mean = prior or DELAY_MEAN_S
        half_life = int(scheme.rsplit("_hl", 1)[1]) if "_hl" in scheme else None
        ocfg = OffsetConfig(
            enabled=True,
            delay_mean_s=mean * SLOW_PRIOR if "_slowprior" in scheme else mean,
            max_delay_s=WINDOW_S,
            gate_z=GATE_Z if scheme.endswith("_gated") else None,
            estimate_delay=not scheme.endswith("_fixed"),
        )
        if half_life is not None:  # the same, remembering as many half-lives
            ratio = ocfg.horizon / ocfg.half_life
            ocfg = dataclasses.replace(ocfg, half_life=half_life, horizon=int(half_life * ratio))
        s = s.replace(offset=ocfg)
    else:  # the ranker alone, or the bench's own offset: the worker's is off
        s = s.replace(offset=dataclasses.replace(s.offset, enabled=False))
        if "+offset" in scheme:
            nodelay = scheme.endswith("_nodelay")
            cfg = OffsetConfig(
                enabled=True,
                delay_mean_s=None if nodelay else (prior or DELAY_MEAN_S),
                max_delay_s=None if nodelay else WINDOW_S,
            )
            offset = LogitOffset(cfg)
    res = simulate(df, s, seed=w.seed, ranker=ranker, offset=offset)
    return res, prime, None if drift is None else drift - history - prime


def run_one(policy: str, w: World, history: int, scheme: str = "default") -> dict[str, Any]:
    """One pipeline run: :func:`bench.fresh_labels.measure` plus monitor counts."""
    res, prime, d = run_world(policy, w, history, scheme)
    m = slice(prime, None)
    out = measure(res.p_serve[m], res.p_serve_raw[m], res.true_p[m], res.y[m], d)
    monitored = int(res.monitor["monitored"])
    out.update(
        # the summary keys on the policy: a scheme's runs are summarised apart
        policy=policy if scheme == "default" else f"{policy} ({scheme})",
        label_scheme=scheme,
        scenario=w.scenario,
        rate_per_min=w.rate_per_min,
        seed=w.seed,
        monitor=res.monitor,
        alarms_per_million=(res.monitor["alarms"] / monitored * 1e6) if monitored else math.nan,
        click_to_label_p50_s=float(np.median(res.click_latency_s)),
        click_to_label_p99_s=float(np.quantile(res.click_latency_s, 0.99)),
        label_to_update_wall_p50_s=float(np.median(res.click_update_wall_s)),
        label_to_update_wall_p99_s=float(np.quantile(res.click_update_wall_s, 0.99)),
        seconds=round(res.seconds, 1),
    )
    if d is not None:
        p_m, t_m = res.p_serve[m], res.true_p[m]
        rec = recovery(p_m, t_m, d, 0.10, step=250, window=1_000)
        out["served"]["recovery_10pct_1k"] = rec
        if rec is not None:
            post = window_stats(p_m, t_m, start=d + rec, size=1_000)
            out["served"]["post_recovery_1k_windows"] = post.get("windows", 0)
            out["served"]["post_recovery_share_beyond_5pct_1k"] = post.get(
                "share_beyond_5pct", math.nan
            )
    return out


def _median(values: list[Any]) -> Any:
    if any(v is None for v in values):
        return None  # a recovery that never happened in one seed stays visible
    vals = [float(v) for v in values if not (isinstance(v, float) and math.isnan(v))]
    return float(np.median(vals)) if vals else math.nan


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    keys = sorted({(r["scenario"], r["rate_per_min"], r["policy"]) for r in runs})
    rows = []
    for sc, rate, pol in keys:
        rs = [r for r in runs if (r["scenario"], r["rate_per_min"], r["policy"]) == (sc, rate, pol)]
        row: dict[str, Any] = {"scenario": sc, "rate_per_min": rate, "policy": pol}
        row["seeds"] = len(rs)
        for part in ("served", "raw"):
            for k in ("mean_abs_log_ratio", "max_abs_log_ratio", "recovery_10pct"):
                if k in rs[0][part]:
                    row[f"{part}_{k}"] = _median([r[part][k] for r in rs])
        row["served_le_raw_all_seeds"] = all(
            r["served"]["mean_abs_log_ratio"] <= r["raw"]["mean_abs_log_ratio"] + 1e-12 for r in rs
        )
        for k in ("alarms", "recalibrations", "rollbacks", "monitored"):
            row[k] = _median([r["monitor"].get(k, 0) for r in rs])
        row["alarms_per_million"] = _median([r["alarms_per_million"] for r in rs])
        rows.append(row)
    return rows


def bars(summary: list[dict[str, Any]]) -> dict[str, Any]:
    """Per policy: served <= raw (median mean window error) in every world, and the false
    alarms per million impressions without drift (worst rate)."""
    out: dict[str, Any] = {}
    for pol in sorted({r["policy"] for r in summary}):
        rows = [r for r in summary if r["policy"] == pol]
        fa = [r["alarms_per_million"] for r in rows if r["scenario"] == "no_drift"]
        fa = [v for v in fa if not math.isnan(v)]
        out[pol] = {
            "served_le_raw_every_world": all(
                r["served_mean_abs_log_ratio"] <= r["raw_mean_abs_log_ratio"] + 1e-12 for r in rows
            ),
            "served_le_raw_every_world_and_seed": all(r["served_le_raw_all_seeds"] for r in rows),
            "worst_served_window": max(r["served_max_abs_log_ratio"] for r in rows),
            "false_alarms_per_million_worst_rate": max(fa) if fa else math.nan,
        }
    return out


def _fmt(v: Any, spec: str = ".3f") -> str:
    if v is None:
        return "never"
    if isinstance(v, float) and math.isnan(v):
        return "-"
    return format(v, spec)


def table(report: dict[str, Any]) -> str:
    head = (
        "| scenario | rate/min | policy | served mean / worst abs log ratio (5k) "
        "| raw mean / worst | recover ±10% served / raw | alarms per M | refits / rollbacks |"
    )
    lines = [head, "|" + "---|" * 8]
    for r in report["summary"]:
        lines.append(
            f"| {r['scenario']} | {r['rate_per_min']:g} | {r['policy']} "
            f"| {_fmt(r['served_mean_abs_log_ratio'])} / {_fmt(r['served_max_abs_log_ratio'])} "
            f"| {_fmt(r['raw_mean_abs_log_ratio'])} / {_fmt(r['raw_max_abs_log_ratio'])} "
            f"| {_fmt(r.get('served_recovery_10pct', math.nan), '.0f')} / "
            f"{_fmt(r.get('raw_recovery_10pct', math.nan), '.0f')} "
            f"| {_fmt(r['alarms_per_million'], '.0f')} "
            f"| {_fmt(r['recalibrations'], '.0f')} / {_fmt(r['rollbacks'], '.0f')} |"
        )
    lines.append("")
    for pol, b in report["bars"].items():
        lines.append(f"- {pol}: {b}")
    return "\n".join(lines)


def _job(args: tuple[str, World, int, str]) -> dict[str, Any]:
    return run_one(*args)


def main(
    quick: bool = False,
    *,
    results_dir: Path | None = None,
    policies: tuple[str, ...] = POLICIES,
    workers: int = 2,
    dfm: bool = False,
    startup: bool = False,
    recovery_arms: bool = False,
    arms: tuple[str, ...] | None = None,
    plan_overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """``dfm``: the labelling schemes (:data:`LABEL_SCHEMES`) under policy ``off`` instead
    of the policies (see the module doc); ``startup``: :data:`STARTUP_SCHEMES` the same
    way; ``arms``: only these of the schemes compared (e.g. of :data:`RECOVERY_SCHEMES`);
    ``plan_overrides``: replaces keys of the plan (``n``, ``seeds``, ``rates``)."""
    full_plan = (
        RECOVERY_PLAN if recovery_arms else STARTUP_PLAN if startup else DFM_PLAN if dfm else FULL
    )
    plan = dict(cast(dict[str, Any], QUICK if quick else full_plan))
    unknown_keys = set(plan_overrides or {}) - {"n", "seeds", "rates"}
    if unknown_keys:
        raise ValueError(f"unknown plan keys {sorted(unknown_keys)}")
    plan.update(plan_overrides or {})
    schemes: tuple[str, ...] = (
        RECOVERY_SCHEMES
        if recovery_arms
        else STARTUP_SCHEMES
        if startup
        else LABEL_SCHEMES
        if dfm
        else ("default",)
    )
    if arms is not None:
        if recovery_arms:  # any half-life: startup+offset_worker_hl<N>
            schemes += tuple(a for a in arms if a not in schemes and _HL_ARM.fullmatch(a))
        unknown = set(arms) - set(schemes)
        if unknown:
            raise ValueError(f"unknown arms {sorted(unknown)}; known: {list(schemes)}")
        schemes = tuple(a for a in schemes if a in arms)
    if dfm or startup or recovery_arms:
        policies = ("off",)
    jobs = [
        (pol, World(rate_per_min=rate, n=plan["n"], scenario=sc, seed=seed), plan["history"], lab)
        for seed in plan["seeds"]
        for sc in SCENARIOS
        for rate in plan["rates"]
        for pol in policies
        for lab in schemes
        if not (recovery_arms and not quick and rate >= 30_000 and seed not in RECOVERY_SEEDS_FAST)
    ]
    t0 = time.perf_counter()
    name = (
        "calibration_worlds_recovery"
        if recovery_arms
        else "calibration_worlds_startup"
        if startup
        else "calibration_worlds_dfm"
        if dfm
        else "calibration_worlds"
    )
    path = results_path(results_dir, name, quick)
    partial = path.with_suffix(".runs.jsonl")  # each run as it ends (a long run can be cut)
    partial.parent.mkdir(parents=True, exist_ok=True)
    runs = []
    with ProcessPoolExecutor(max_workers=workers) as ex, partial.open("w") as f:
        for r in ex.map(_job, jobs):
            runs.append(r)
            f.write(json.dumps(r) + "\n")
            f.flush()
    report = build_report(runs, quick, plan, round(time.perf_counter() - t0, 1))
    if dfm:
        report["command"] += " --dfm"
        report["dfm_observe_s"] = DFM_OBSERVE_S
    if startup:
        report["command"] += " --startup"
    if recovery_arms:
        report["command"] += " --recovery"
        report["recovery"] = recovery_comparison(runs)
    if arms is not None:
        report["command"] += " --arms " + ",".join(schemes)
    shown = {
        "n": f"--impressions {plan['n']}",
        "seeds": f"--seeds {max(plan['seeds']) + 1}"
        + (f" --seed-from {min(plan['seeds'])}" if min(plan["seeds"]) else ""),
        "rates": "--rates " + ",".join(f"{r:g}" for r in plan["rates"]),
    }
    for key in plan_overrides or {}:
        report["command"] += f" {shown[key]}"
    if dfm or startup:
        report["schemes"] = scheme_comparison(runs, schemes)
    write_report(report, path)
    partial.unlink()
    print(table(report))
    if dfm or startup:
        print(scheme_table(report["schemes"], schemes))
    if recovery_arms:
        print(recovery_table(report["recovery"]))
    return report


RECOVERY_KEYS = (
    "mean_abs_log_ratio",
    "max_abs_log_ratio",
    "share_beyond_5pct",
    "recovery_10pct",
    "recovery_10pct_1k",
    "post_recovery_share_beyond_5pct_1k",
)


def recovery_comparison(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``--recovery``: per (scenario, rate, arm) the SERVED score's numbers
    (:data:`RECOVERY_KEYS`, median over seeds), the raw ranker's mean window error beside
    them and whether served <= raw in every seed (the bar)."""
    keys = sorted({(r["scenario"], r["rate_per_min"], r["label_scheme"]) for r in runs})
    rows = []
    for sc, rate, arm in keys:
        rs = [r for r in runs if (r["scenario"], r["rate_per_min"], r["label_scheme"]) ==
              (sc, rate, arm)]  # fmt: skip
        row: dict[str, Any] = {"scenario": sc, "rate_per_min": rate, "arm": arm, "seeds": len(rs)}
        for k in RECOVERY_KEYS:
            if k in rs[0]["served"] or k.startswith(("recovery", "post")) and sc != "no_drift":
                row[k] = _median([r["served"].get(k, math.nan) for r in rs])
        row["raw_mean_abs_log_ratio"] = _median([r["raw"]["mean_abs_log_ratio"] for r in rs])
        row["served_le_raw_all_seeds"] = all(
            r["served"]["mean_abs_log_ratio"] <= r["raw"]["mean_abs_log_ratio"] + 1e-12 for r in rs
        )
        rows.append(row)
    return rows


def recovery_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| scenario | rate/min | arm | served mean / worst abs log ratio (5k) | raw mean "
        "| share 5k windows > ±5% | recover ±10% (5k / 1k trailing) "
        "| post-recovery 1k windows > ±5% | served <= raw every seed |",
        "|" + "---|" * 9,
    ]
    for r in rows:
        lines.append(
            f"| {r['scenario']} | {r['rate_per_min']:g} | {r['arm']} "
            f"| {_fmt(r.get('mean_abs_log_ratio'))} / {_fmt(r.get('max_abs_log_ratio'))} "
            f"| {_fmt(r['raw_mean_abs_log_ratio'])} | {_fmt(r.get('share_beyond_5pct', math.nan))} "
            f"| {_fmt(r.get('recovery_10pct', math.nan), '.0f')} / "
            f"{_fmt(r.get('recovery_10pct_1k', math.nan), '.0f')} "
            f"| {_fmt(r.get('post_recovery_share_beyond_5pct_1k', math.nan))} "
            f"| {r['served_le_raw_all_seeds']} |"
        )
    return "\n".join(lines)


def scheme_comparison(
    runs: list[dict[str, Any]], schemes: tuple[str, ...] = LABEL_SCHEMES
) -> list[dict[str, Any]]:
    """``--dfm`` / ``--startup``: per (scenario, rate), the raw ranker's ratio over the last
    half, mean and worst ``|log ratio|`` over the 5k windows and impressions to recover
    within ±10% after a drift, of each scheme, median over seeds."""
    keys = sorted({(r["scenario"], r["rate_per_min"]) for r in runs})
    rows = []
    for sc, rate in keys:
        row: dict[str, Any] = {"scenario": sc, "rate_per_min": rate}
        for lab in schemes:
            rs = [r for r in runs if (r["scenario"], r["rate_per_min"], r.get("label_scheme",
                  "default")) == (sc, rate, lab)]  # fmt: skip
            if not rs:
                continue
            row[f"{lab}_ratio_last_half"] = _median([r["raw"]["ratio_last_half"] for r in rs])
            row[f"{lab}_mean_abs_log_ratio"] = _median(
                [r["raw"].get("mean_abs_log_ratio", math.nan) for r in rs]
            )
            row[f"{lab}_max_abs_log_ratio"] = _median(
                [r["raw"].get("max_abs_log_ratio", math.nan) for r in rs]
            )
            if "recovery_10pct" in rs[0]["raw"]:
                row[f"{lab}_recovery_10pct"] = _median([r["raw"]["recovery_10pct"] for r in rs])
            row[f"{lab}_ne_last_half"] = _median([r["raw"]["ne_last_half"] for r in rs])
            row[f"{lab}_seeds"] = len(rs)
        rows.append(row)
    return rows


def scheme_table(rows: list[dict[str, Any]], schemes: tuple[str, ...] = LABEL_SCHEMES) -> str:
    a, b = schemes
    lines = [
        f"| scenario | rate/min | raw ratio last half: {a} / {b} "
        f"| mean abs log ratio (5k): {a} / {b} | worst: {a} / {b} "
        f"| recover ±10%: {a} / {b} | NE last half: {a} / {b} |",
        "|" + "---|" * 7,
    ]
    for r in rows:
        cells = [
            ("ratio_last_half", ".3f"),
            ("mean_abs_log_ratio", ".3f"),
            ("max_abs_log_ratio", ".3f"),
            ("recovery_10pct", ".0f"),
            ("ne_last_half", ".4f"),
        ]
        parts = [
            f"{_fmt(r.get(f'{a}_{k}', math.nan), f)} / {_fmt(r.get(f'{b}_{k}', math.nan), f)}"
            for k, f in cells
        ]
        lines.append(f"| {r['scenario']} | {r['rate_per_min']:g} | " + " | ".join(parts) + " |")
    return "\n".join(lines)


def build_report(
    runs: list[dict[str, Any]], quick: bool, plan: dict[str, Any], wall: float
) -> dict[str, Any]:
    """The results file's content from the runs (also from a ``.runs.jsonl`` left by a
    cut run)."""
    summary = summarize(runs)
    return {
        **stamp("calibration_worlds", quick),
        "machine": machine(),
        "wall_seconds": wall,
        "plan": {k: list(v) if isinstance(v, tuple) else v for k, v in plan.items()},
        "window_s": WINDOW_S,
        "delay_mean_s": DELAY_MEAN_S,
        "warmup": WARMUP,
        "runs": runs,
        "summary": summary,
        "bars": bars(summary),
    }


def cli(argv: list[str] | None = None) -> int:
    parser = bench_parser("calibration_worlds", __doc__, "one seed, 2 rates, 10k impressions")
    parser.add_argument("--dfm", action="store_true", help="default vs DFM labelling, policy off")
    parser.add_argument(
        "--startup", action="store_true", help="without vs with start-up compensation, policy off"
    )
    parser.add_argument(
        "--recovery",
        action="store_true",
        help="ranker alone vs + logit offset (with / without delay model, and in the worker's "
        "monitor), start-up on, policy off",
    )
    parser.add_argument(
        "--arms",
        default=None,
        help="comma-separated subset of the compared arms (e.g. "
        "startup,startup+offset,startup+offset_worker)",
    )
    parser.add_argument("--workers", type=int, default=2, help="processes (default 2)")
    parser.add_argument(
        "--impressions", type=int, default=None, help="impressions per log (replaces the plan's)"
    )
    parser.add_argument("--seeds", type=int, default=None, help="seeds 0 .. N-1 (the plan's)")
    parser.add_argument(
        "--seed-from",
        type=int,
        default=0,
        help="with --seeds N: seeds K .. N-1 only (more seeds for an earlier run)",
    )
    parser.add_argument(
        "--rates", default=None, help="comma-separated impressions a minute (the plan's)"
    )
    args = parser.parse_args(argv)
    overrides: dict[str, Any] = {}
    if args.impressions is not None:
        overrides["n"] = args.impressions
    if args.seeds is not None:
        overrides["seeds"] = tuple(range(args.seed_from, args.seeds))
        if not overrides["seeds"]:
            parser.error(f"--seed-from {args.seed_from} leaves no seed below --seeds {args.seeds}")
    if args.rates is not None:
        overrides["rates"] = tuple(float(r) for r in args.rates.split(",") if r)
    main(
        args.quick,
        results_dir=args.results_dir,
        dfm=args.dfm,
        startup=args.startup,
        recovery_arms=args.recovery,
        arms=None if args.arms is None else tuple(a for a in args.arms.split(",") if a),
        workers=args.workers,
        plan_overrides=overrides or None,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(cli())
