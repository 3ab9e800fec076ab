"""Delayed feedback: how calibrated is each labelling scheme when clicks arrive late?

Run ``python -m bench.delayed_feedback`` (full: two 200k-impression logs, logreg and
dcnv2, 20 streamed training runs: the heaviest benchmark, 49 min when its 2 cores were
shared with other jobs at a load of ~10; far less on idle cores) or
``python -m bench.delayed_feedback --quick`` (the ``ctr 20%`` log only, 40k impressions,
logreg, no reference arm: a smoke run, under a minute; its model is still warming up, so
its numbers are noisier).

**Data.** ``generate(SyntheticConfig(n_impressions=N, base_ctr=CTR, impressions_per_s=2,
drift_at=None, seed=0))``: a stationary world with a known ``true_p`` per impression, at 2
impressions/s of event time (200k impressions span ~28 h). Two logs: ``ctr 4%`` (the
default base CTR) and ``ctr 20%`` (the fake-negative bias ``p / (1 + p)`` grows with the
CTR). The generator's own click delays are capped inside 25 min, so this benchmark
redraws them: ``delay ~ Exponential(mean 20 min)`` (seeded, ``seed + 1``), so 22% of
clicks come after 30 min and 78% after 5 min. The **eventual label** of an impression is
its click at any delay.

**Streaming.** Impressions and clicks go through :class:`stream.join.OnlineJoiner` in
event-time order (no Kafka; lateness 60 s, no wall-clock idle timeout). Every ``CHUNK``
impressions are first scored by the current model, then their events (and the clicks
up to their time) are fed to the joiner, then both producer watermarks advance to the
chunk's last impression time. The examples each scheme emits go, in emission order, to
a buffer the ranker learns from in batches of ``BATCH`` (``TorchRanker.learn_many``,
``online=False``: Adam at the base learning rate, seed 0; ``RankerConfig`` defaults but
the loss and a 2**16-bucket hash space). So a model only knows the labels its scheme has
emitted by then.

**Served prediction.** Each impression is scored ONCE, at its impression time, by the
model as it is then (before any label of that impression exists): the score a server
would have used. For FNC the served score is ``fnc_correct(score)``. Quality is computed
over those served scores on the last half of each log (the first half is warm-up; the
``ratio (all)`` column covers every impression):

- ``ratio`` = ``Σ served / Σ true_p`` (1 is calibrated; the headline),
- log loss, NE and AUC against the eventual label,
- ``latency``: mean event seconds from an impression to the emission of a training
  example for it (all examples; ``pos latency``: positives only),
- ``clicks used``: positives emitted / eventual clicks (clicks after W are lost, and
  so are those the log ends before emitting: the last W of a window arm).

**Arms.** ``window`` W=30 min + BCE (the default joiner: late clicks are lost, biased
low); ``window`` W=5 min + BCE (fresher, more clicks lost); ``fake_negative`` + BCE (no
correction: learns ``p / (1 + p)``); ``fake_negative`` + FNW; ``fake_negative`` + BCE
served through FNC (the same training run as the plain BCE arm, only the served score
differs); and, full run only, a reference ``window`` W=4 h + BCE (nearly every click
inside the window: unbiased labels, 4 h late). The fake-negative arms attribute clicks
for 4 h too (``P(delay > 4 h) = e^-12``), which costs only memory: their labels are
immediate whatever W is. ``dfm`` T=5 min and T=30 min (Chapelle 2014,
``delayed_feedback="dfm"``, loss ``dfm``): a click within T trains at once as a positive
with its delay, an impression unclicked at T trains once as "no click after T" (78% and
22% of the clicks come after T); the delay head models the rest. Clicks after T (weight-0
``late_click`` records) are not trained on.

Claim checked: ``|ratio - 1|`` of FNW and of FNC is below that of plain BCE on the
fake-negative stream, for every log and model. Writes ``bench/results/delayed_feedback.json``
(``delayed_feedback_quick.json``) and prints a table. ``--dfm`` runs only the DFM arms
beside ``fake_negative, fnw`` and ``window W=30m`` (the same logs and models) and writes
``delayed_feedback_dfm.json`` (``delayed_feedback_dfm_quick.json``).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.run import bench_parser, machine, publish, stamp
from bench.run import finite_or_dash as _f
from learners.delayed_feedback import check_loss_for_scheme, fnc_correct
from learners.encoding import EncoderConfig
from learners.ranker import RankerConfig, TorchRanker
from logs.events import Click, Impression, LabeledExample, example_row
from logs.io import frame_to_rows
from logs.offline import quality
from logs.synthetic import SyntheticConfig, generate
from stream.join import JoinConfig, OnlineJoiner

FULL_N = 200_000
QUICK_N = 40_000
IMPRESSIONS_PER_S = 2.0
DELAY_MEAN_S = 1200.0
LATENESS_S = 60.0
LONG_W = 4 * 3600.0
CHUNK = 128  # impressions scored per step of the stream (~1 min of event time)
BATCH = 512  # training batch
# The world has ~6k ids; a smaller hash space than the default 2**18 keeps the dense
# embedding update of each step cheap (collisions stay rare).
ENCODER = EncoderConfig(num_buckets=2**16)
CTRS = {"ctr 4%": 0.04, "ctr 20%": 0.20}
QUICK_CTRS = ("ctr 20%",)
FULL_MODELS = ("logreg", "dcnv2")
QUICK_MODELS = ("logreg",)


@dataclass(frozen=True)
class Run:
    """One training run: a joiner scheme and window, and a ranker loss."""

    name: str
    scheme: str
    window_s: float
    loss: str
    reference: bool = False  # full run only
    observe_s: float = 300.0  # scheme "dfm": the observation time T


@dataclass(frozen=True)
class Arm:
    """What is reported: a run's served scores, optionally through FNC."""

    name: str
    run: str
    fnc: bool = False
    control: bool = False  # biased on purpose: not passed through check_loss_for_scheme


RUNS = (
    Run("window_30m", "window", 1800.0, "bce"),
    Run("window_5m", "window", 300.0, "bce"),
    Run("fake_negative_bce", "fake_negative", LONG_W, "bce"),
    Run("fake_negative_fnw", "fake_negative", LONG_W, "fnw"),
    Run("window_4h", "window", LONG_W, "bce", reference=True),
    Run("dfm_5m", "dfm", LONG_W, "dfm", observe_s=300.0),
    Run("dfm_30m", "dfm", LONG_W, "dfm", observe_s=1800.0),
)
#: the runs of ``--dfm``
DFM_RUNS = ("window_30m", "fake_negative_fnw", "dfm_5m", "dfm_30m")
ARMS = (
    Arm("window W=30m, bce", "window_30m"),
    Arm("window W=5m, bce", "window_5m"),
    Arm("fake_negative, bce", "fake_negative_bce", control=True),
    Arm("fake_negative, fnw", "fake_negative_fnw"),
    Arm("fake_negative, bce + fnc", "fake_negative_bce", fnc=True),
    Arm("window W=4h, bce (reference)", "window_4h"),
    Arm("dfm T=5m, dfm", "dfm_5m"),
    Arm("dfm T=30m, dfm", "dfm_30m"),
)


@dataclass
class Log:
    """A synthetic log as the joiner sees it; arrays aligned with ``impressions``."""

    name: str
    impressions: list[Impression]  # in ts order
    rows: list[dict[str, object]]  # the learner's feature dicts
    clicks: list[Click]  # in ts order, delays redrawn
    y: np.ndarray  # (N,) eventual label, float64
    true_p: np.ndarray  # (N,) float64
    config: SyntheticConfig


def make_log(name: str, n: int, base_ctr: float, seed: int = 0) -> Log:
    """``generate`` a stationary log and redraw its click delays (see the module doc)."""
    cfg = SyntheticConfig(
        n_impressions=n,
        base_ctr=base_ctr,
        impressions_per_s=IMPRESSIONS_PER_S,
        drift_at=None,
        seed=seed,
    )
    df = generate(cfg)
    impressions = [
        Impression(r.impression_id, r.ts, r.user_id, r.item_id, r.position, r.features,
                   true_p=r.true_p)
        for r in frame_to_rows(df)
    ]  # fmt: skip
    y = df["click"].to_numpy(dtype=np.float64)
    delay = np.random.default_rng(seed + 1).exponential(DELAY_MEAN_S, size=n)
    clicked = np.flatnonzero(y == 1)
    clicks = sorted(
        (Click(impressions[k].impression_id, impressions[k].ts + float(delay[k])) for k in clicked),
        key=lambda c: c.ts,
    )
    return Log(
        name=name,
        impressions=impressions,
        rows=[example_row(im) for im in impressions],
        clicks=clicks,
        y=y,
        true_p=df["true_p"].to_numpy(dtype=np.float64),
        config=cfg,
    )


def stream_train(log: Log, run: Run, model: str) -> dict[str, Any]:
    """Prequential run of one scheme: served scores ``p`` (N,) and label statistics."""
    join_cfg = JoinConfig(
        window_s=run.window_s,
        lateness_s=LATENESS_S,
        idle_timeout_s=None,
        delayed_feedback=run.scheme,
        dfm_observe_s=run.observe_s,
    )
    joiner = OnlineJoiner(join_cfg)
    config = RankerConfig(model=model, loss=run.loss, encoder=ENCODER)
    ranker = TorchRanker(config, seed=0, online=False)
    index = {im.impression_id: k for k, im in enumerate(log.impressions)}
    n, clicks = len(log.impressions), log.clicks
    p = np.empty(n, dtype=np.float64)
    buf_idx: list[int] = []
    buf_y: list[float] = []
    buf_e: list[float] = []  # seconds from the impression to its label (dfm: d or T)
    lat = {"n": 0, "sum": 0.0, "pos_n": 0, "pos_sum": 0.0}

    def take(out: list[LabeledExample], now: float) -> None:
        for e in out:
            if e.weight == 0:
                continue  # a dfm late click: not trained on
            buf_idx.append(index[e.impression.impression_id])
            buf_y.append(float(e.label))
            buf_e.append(e.label_ts - e.impression.ts)
            delay = now - e.impression.ts
            lat["n"] += 1
            lat["sum"] += delay
            if e.label:
                lat["pos_n"] += 1
                lat["pos_sum"] += delay

    t0 = time.perf_counter()
    ci, n_learned = 0, 0
    for a in range(0, n, CHUNK):
        b = min(a + CHUNK, n)
        p[a:b] = ranker.predict_proba_many(log.rows[a:b])  # served: before any label
        for im in log.impressions[a:b]:
            while ci < len(clicks) and clicks[ci].ts < im.ts:
                take(joiner.on_click(clicks[ci]), clicks[ci].ts)
                ci += 1
            take(joiner.on_impression(im), im.ts)
        t_end = log.impressions[b - 1].ts
        while ci < len(clicks) and clicks[ci].ts <= t_end:
            take(joiner.on_click(clicks[ci]), clicks[ci].ts)
            ci += 1
        take(joiner.on_watermark(t_end, "impressions"), t_end)
        take(joiner.on_watermark(t_end, "clicks"), t_end)
        while len(buf_idx) - n_learned >= BATCH:
            idx = buf_idx[n_learned : n_learned + BATCH]
            part = slice(n_learned, n_learned + BATCH)
            elapsed = np.maximum(buf_e[part], 0.0) if run.loss == "dfm" else None
            ranker.learn_many([log.rows[k] for k in idx], buf_y[part], elapsed=elapsed)
            n_learned += BATCH
    seconds = time.perf_counter() - t0
    c = joiner.counters
    return {
        "p": p,
        "train_examples": n_learned,
        "emitted": lat["n"],
        "positives_emitted": int(lat["pos_n"]),
        "label_latency_s": lat["sum"] / max(lat["n"], 1),
        "positive_latency_s": lat["pos_sum"] / lat["pos_n"] if lat["pos_n"] else math.nan,
        "clicks_used": lat["pos_n"] / max(float(log.y.sum()), 1.0),
        "late_clicks": c.late_clicks,
        "corrections": c.corrections,
        "seconds": seconds,
    }


def _clean(q: dict[str, float]) -> dict[str, float | None]:
    """JSON-safe: NaN -> None."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in q.items()}


def run_log(
    log: Log, model: str, with_reference: bool, only: tuple[str, ...] | None = None
) -> list[dict[str, Any]]:
    """Every arm on ``log`` with ``model`` (``only``: those runs): one dict per arm."""
    runs: dict[str, dict[str, Any]] = {}
    for r in RUNS:
        if (r.reference and not with_reference) or (only is not None and r.name not in only):
            continue
        print(f"  {log.name} / {model} / {r.name}", flush=True)
        runs[r.name] = stream_train(log, r, model)
    by_name = {r.name: r for r in RUNS}
    n = len(log.impressions)
    tail = slice(n // 2, n)
    out = []
    for arm in ARMS:
        if arm.run not in runs:
            continue
        run, res = by_name[arm.run], runs[arm.run]
        if not arm.control:
            check_loss_for_scheme(run.scheme, run.loss, fnc=arm.fnc)
        served = fnc_correct(res["p"]) if arm.fnc else res["p"]
        stats = {k: v for k, v in res.items() if k != "p"}
        out.append(
            {
                "log": log.name,
                "model": model,
                "arm": arm.name,
                "scheme": run.scheme,
                "window_s": run.window_s,
                "observe_s": run.observe_s if run.scheme == "dfm" else None,
                "loss": run.loss,
                "fnc": arm.fnc,
                **stats,
                "tail": _clean(quality(served[tail], log.y[tail], log.true_p[tail])),
                "all": _clean(quality(served, log.y, log.true_p)),
            }
        )
    return out


def claims(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (log, model): |ratio - 1| of FNW and FNC vs plain BCE on fake negatives."""
    out = []
    keys = list(dict.fromkeys((r["log"], r["model"]) for r in results))
    for log_name, model in keys:
        ratio = {
            r["arm"]: r["tail"]["ratio_vs_true_p"]
            for r in results
            if (r["log"], r["model"]) == (log_name, model)
        }
        err = {k: abs(v - 1.0) for k, v in ratio.items()}
        if "fake_negative, bce" not in err:  # --dfm
            out.append({"log": log_name, "model": model, **dfm_claim(ratio)})
            continue
        base = err["fake_negative, bce"]
        out.append(
            {
                "log": log_name,
                "model": model,
                "fake_negative_bce_ratio": ratio["fake_negative, bce"],
                "fnw_ratio": ratio["fake_negative, fnw"],
                "fnc_ratio": ratio["fake_negative, bce + fnc"],
                "window_30m_ratio": ratio["window W=30m, bce"],
                "window_5m_ratio": ratio["window W=5m, bce"],
                "met": err["fake_negative, fnw"] < base and err["fake_negative, bce + fnc"] < base,
            }
        )
    return out


def dfm_claim(ratio: dict[str, float]) -> dict[str, Any]:
    """``--dfm``: the ratios, and whether each DFM arm's ``|ratio - 1|`` is below FNW's."""
    fnw = ratio["fake_negative, fnw"]
    out: dict[str, Any] = {"fnw_ratio": fnw, "window_30m_ratio": ratio["window W=30m, bce"]}
    for arm, key in (("dfm T=5m, dfm", "dfm_5m"), ("dfm T=30m, dfm", "dfm_30m")):
        out[f"{key}_ratio"] = ratio[arm]
        out[f"{key}_beats_fnw"] = abs(ratio[arm] - 1.0) < abs(fnw - 1.0)
    return out


def main(
    quick: bool = False,
    *,
    results_dir: Path | None = None,
    n: int | None = None,
    dfm: bool = False,
) -> dict[str, Any]:
    """Run the benchmark, write its JSON, print its table; the report.

    ``n`` overrides the number of impressions per log (tests use a tiny log). ``dfm``: only
    :data:`DFM_RUNS`, written to ``delayed_feedback_dfm.json``.
    """
    n_impressions = n or (QUICK_N if quick else FULL_N)
    models = QUICK_MODELS if quick else FULL_MODELS
    t0 = time.perf_counter()
    results: list[dict[str, Any]] = []
    logs: dict[str, Any] = {}
    for name, ctr in CTRS.items():
        if quick and name not in QUICK_CTRS:
            continue
        log = make_log(name, n_impressions, ctr)
        span_h = (log.impressions[-1].ts - log.impressions[0].ts) / 3600
        logs[name] = {
            "source": f"generate(SyntheticConfig(n_impressions={n_impressions}, base_ctr={ctr}, "
            f"impressions_per_s={IMPRESSIONS_PER_S}, drift_at=None, seed=0))",
            "click_delay": f"Exponential(mean={DELAY_MEAN_S:.0f} s), seed 1 (redrawn)",
            "impressions": n_impressions,
            "span_hours": round(span_h, 2),
            "clicks": int(log.y.sum()),
            "mean_true_p": float(log.true_p.mean()),
            "clicks_after_30m": float(np.exp(-1800.0 / DELAY_MEAN_S)),
            "clicks_after_5m": float(np.exp(-300.0 / DELAY_MEAN_S)),
        }
        for model in models:
            only = DFM_RUNS if dfm else None
            results += run_log(log, model, with_reference=not quick, only=only)
    name = "delayed_feedback_dfm" if dfm else "delayed_feedback"
    report: dict[str, Any] = {
        **stamp("delayed_feedback", quick),
        "machine": {
            **machine(),
            "device": str(TorchRanker(RankerConfig(model="logreg")).device),
        },
        "wall_seconds": round(time.perf_counter() - t0, 1),
        "notes": [
            "served = each impression scored once at impression time by the current model "
            "(fnc arm: through fnc_correct); quality over the last half of each log",
            f"stream chunks of {CHUNK} impressions, training batches of {BATCH}, lateness "
            f"{LATENESS_S:.0f} s, online=False (base lr)",
        ],
        "logs": logs,
        "claim": {
            "target": "|ratio - 1| of FNW and of FNC below that of plain BCE on the "
            "fake-negative stream",
            "results": claims(results),
        },
        "results": results,
    }
    if dfm:
        report["command"] += " --dfm"
        report["claim"]["target"] = "|ratio - 1| of DFM below that of FNW"
    return publish(report, results_dir, name, quick, table)


def table(report: dict[str, Any]) -> str:
    """Markdown table: one row per (log, model, arm)."""
    head = (
        "| log | model | arm | ratio Σp/Σtrue_p | ratio (all) | log loss | NE | AUC "
        "| latency s | pos latency s | clicks used |"
    )
    lines = [head, "|" + "---|" * 11]
    for r in report["results"]:
        q, qa = r["tail"], r["all"]
        lines.append(
            f"| {r['log']} | {r['model']} | {r['arm']} | {_f(q['ratio_vs_true_p'], '.3f')} "
            f"| {_f(qa['ratio_vs_true_p'], '.3f')} | {_f(q['log_loss'], '.5f')} "
            f"| {_f(q['normalized_entropy'], '.4f')} | {_f(q['auc'], '.4f')} "
            f"| {_f(r['label_latency_s'], ',.0f')} | {_f(r['positive_latency_s'], ',.0f')} "
            f"| {_f(r['clicks_used'], '.1%')} |"
        )
    claim = report.get("claim", {})
    for c in claim.get("results", []):
        lines.append("")
        if "dfm_5m_ratio" in c:
            lines.append(
                f"DFM ({c['log']}, {c['model']}): ratio fnw {c['fnw_ratio']:.3f}, dfm T=5m "
                f"{c['dfm_5m_ratio']:.3f}, T=30m {c['dfm_30m_ratio']:.3f}; window W=30m "
                f"{c['window_30m_ratio']:.3f}."
            )
            continue
        lines.append(
            f"Claim ({c['log']}, {c['model']}): ratio fake_negative+bce "
            f"{c['fake_negative_bce_ratio']:.3f} vs fnw {c['fnw_ratio']:.3f} and fnc "
            f"{c['fnc_ratio']:.3f} ({'met' if c['met'] else 'not met'}); window W=30m "
            f"{c['window_30m_ratio']:.3f}, W=5m {c['window_5m_ratio']:.3f}."
        )
    return "\n".join(lines)


def cli(argv: list[str] | None = None) -> int:
    quick = "40k impressions, ctr 20%% log, logreg only"
    parser = bench_parser("delayed_feedback", __doc__, quick)
    parser.add_argument("--dfm", action="store_true", help="the DFM arms beside FNW only")
    args = parser.parse_args(argv)
    main(args.quick, results_dir=args.results_dir, dfm=args.dfm)
    return 0


if __name__ == "__main__":
    raise SystemExit(cli())
