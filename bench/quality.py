"""Prequential quality of the streamrec rankers vs the River and Vowpal Wabbit peers.

Run ``python -m bench.quality`` (full: about 5 min on 2 idle cores) or ``python -m
bench.quality --quick`` (20k synthetic impressions, ``QUICK_LEARNERS`` only). Every learner
sees the same log in the same order, batches of 1024, scored then learned from
(``logs.offline.evaluate``):

- ``synthetic``: ``generate(SyntheticConfig(n_impressions=1_000_000, seed=0))`` (20k
  quick), whose true CTR jumps x1.6 half-way (the default drift). The log carries
  ``true_p``, so each learner also gets the oracle's NE (the NE of ``true_p`` itself), its
  NE over the oracle's and the ratio of its predicted to the true click mass. The rows are
  cached (pickle) under ``$STREAMREC_BENCH_CACHE`` or ``~/.cache/streamrec/bench`` (a
  private 0700 directory, never the shared temp dir), keyed by the config and
  the generator's source, since turning 1M impressions into rows takes longer than most
  learners' runs.
- ``obd``: the Open Bandit Dataset sample at ``../shared/data/obd/random/all/all.csv``
  (converted with ``logs.obd.read_obd`` and its ``item_context.csv``), when present;
  skipped with a note otherwise. 10k impressions, 38 clicks. ``dcnv2_warm`` there is
  pretrained on the ``bts/all`` week (another logging policy, same items) and evaluated on
  the whole ``random/all`` log.

Learners (``LEARNERS``): ``TorchRanker`` with every model at ``RankerConfig`` defaults
(``dcnv2`` with BCE is the default ranker), ``dcnv2`` with the focal loss (corrected, the
default) and with ``loss_correction=False`` (the raw focal output, to show why), all cold
at ``online=False`` (the base learning rate); on the synthetic log also ``dcnv2``
warm-started from ``pretrain`` on the first 20% and evaluated online (``base_lr *
online_lr_scale``) on the remaining 80%; and the peers of ``learners.peers.PEERS`` at their
libraries' defaults: River logistic regression (SGD), River FTRL-Proximal, Vowpal Wabbit,
and Vowpal Wabbit with user x item quadratic features (``-q ui``).

Quality blocks: ``all`` rows, and ``tail`` rows: on the synthetic log the last 80% (the
warm start's window), on OBD every row after the first 1,024 (the cold start: the first
rows are scored before any label is seen, at each learner's prior; ``evaluate`` ramps its
first batches up from 32 rows so that a cold ranker's prior is corrected early).

Goals (from the issue), per log and block, for the default ranker (``dcnv2``):
``NE(dcnv2) / NE(best peer) <= 0.98`` (2% better than the best peer; issue #4's own bar is
beating every peer, ``beats_every_peer``) and calibration ratio within ``1 +- 0.02``, with
the clicks observed against those predicted (``clicks_z``) and the Poisson noise of the
click count (``poisson_relative_sd``): a ratio is only resolvable to +-2% with ~10k clicks.
Writes ``bench/results/quality.json`` (``quality_quick.json``) and prints a table.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import pickle
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import logs.io
import logs.log_format
import logs.synthetic
from bench.run import OBD_CSV, OBD_DIR, bench_cli, machine, results_path, stamp, write_report
from bench.run import finite_or_dash as _f
from learners.peers import PEERS
from learners.ranker import MODELS, RankerConfig, TorchRanker
from learners.util import atomic_write
from logs.obd import read_obd
from logs.offline import LogExamples, evaluate, log_examples, pretrain, quality
from logs.synthetic import SyntheticConfig, generate

OBD_HISTORY_CSV = OBD_DIR / "bts" / "all" / "all.csv"  # another policy's week: warm start
FULL_N = 1_000_000
QUICK_N = 20_000
BATCH = 1024
WARM_FRACTION = 0.2
GOAL_NE_RATIO = 0.98
GOAL_RATIO_TOLERANCE = 0.02
DEFAULT_RANKER = "dcnv2"
CACHE_VERSION = 1


def _ranker(**kw: Any) -> Callable[[], TorchRanker]:
    return lambda: TorchRanker(RankerConfig(**kw), seed=0, online=False)


def _peer(factory: Callable[[int], Any]) -> Callable[[], Any]:
    return lambda: factory(0)


# name -> factory of a cold learner
LEARNERS: dict[str, Callable[[], Any]] = {
    **{m: _ranker(model=m) for m in MODELS},
    "dcnv2_focal": _ranker(model="dcnv2", loss="focal"),
    "dcnv2_focal_raw": _ranker(model="dcnv2", loss="focal", loss_correction=False),
    **{name: _peer(factory) for name, factory in PEERS.items()},
}
PEER_NAMES = tuple(PEERS)
QUICK_LEARNERS = ("logreg", "dcnv2", "dcnv2_focal", *PEER_NAMES)


def cache_dir() -> Path:
    """``$STREAMREC_BENCH_CACHE``, else ``$XDG_CACHE_HOME/streamrec/bench`` (by default
    ``~/.cache/streamrec/bench``): never a predictable path under the shared temp
    directory, where another user could plant a pickle for us to load."""
    env = os.environ.get("STREAMREC_BENCH_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "streamrec" / "bench"


def _private(path: Path, is_dir: bool) -> bool:
    """True when ``path`` is ours alone: not a symlink, the expected kind, owned by this
    user, no group/other write (a directory: no group/other access at all)."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    import stat

    kind_ok = stat.S_ISDIR(st.st_mode) if is_dir else stat.S_ISREG(st.st_mode)
    mask = 0o077 if is_dir else 0o022
    return kind_ok and st.st_uid == os.getuid() and not st.st_mode & mask


def synthetic_examples(cfg: SyntheticConfig, cache: Path | None = None) -> LogExamples:
    """``log_examples(generate(cfg))``, cached as a pickle keyed by ``cfg`` and the source of
    the generator and the row conversion (a change to either makes a new key). The cache
    directory is created mode 0700; one that is a symlink, not ours or open to others is
    not used (the rows are computed, with a note), and only our own file is unpickled."""
    key = hashlib.sha256(repr((CACHE_VERSION, dataclasses.asdict(cfg))).encode())
    for module in (logs.synthetic, logs.io, logs.log_format):
        key.update(Path(str(module.__file__)).read_bytes())
    d = cache or cache_dir()
    try:
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError:
        pass
    if not _private(d, is_dir=True):
        print(f"note: bench cache {d} is not a private directory of this user; not used")
        return log_examples(generate(cfg))
    path = d / f"synthetic-{cfg.n_impressions}-{key.hexdigest()[:16]}.pkl"
    if _private(path, is_dir=False):
        with open(path, "rb") as f:
            examples = pickle.load(f)  # our own file in our own 0700 directory
        if isinstance(examples, LogExamples) and len(examples) == cfg.n_impressions:
            return examples
    examples = log_examples(generate(cfg))
    atomic_write(path, lambda f: pickle.dump(examples, f, protocol=pickle.HIGHEST_PROTOCOL),
                 fsync=False)  # fmt: skip
    return examples


def _run(examples: LogExamples, learner: Any, tail_from: int | None) -> dict[str, Any]:
    """``evaluate`` without the scores; plus ``tail`` quality from row ``tail_from`` on."""
    rep = evaluate(examples, learner, batch_size=BATCH, progress=False)
    scores = rep.pop("scores")
    if tail_from is not None:
        tp = None if examples.true_p is None else examples.true_p[tail_from:]
        rep["tail"] = quality(scores[tail_from:], examples.y[tail_from:], tp)
    return rep


def _warm_start(history: LogExamples, online: LogExamples) -> dict[str, Any]:
    """``dcnv2`` pretrained on ``history``, then evaluated online over ``online``."""
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "dcnv2.pt"
        summary = pretrain(history, ckpt, config=RankerConfig(model="dcnv2"), progress=False)
        ranker = TorchRanker.load(ckpt, online=True)
    rep = _run(online, ranker, tail_from=0)
    rep["pretrain"] = {k: v for k, v in summary.items() if k != "checkpoint"}
    return rep


def run_log(
    examples: LogExamples,
    tail_from: int,
    warm: bool,
    names: tuple[str, ...],
    history: LogExamples | None = None,
) -> dict[str, dict[str, Any]]:
    """The learners ``names`` over one log, plus ``dcnv2_warm`` when ``warm``: pretrained
    on ``history`` and evaluated on the whole log, or (no ``history``) pretrained on the
    rows before ``tail_from`` and evaluated on the rest."""
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        t = time.perf_counter()
        out[name] = _run(examples, LEARNERS[name](), tail_from=tail_from)
        print(f"  {name}: {time.perf_counter() - t:.1f} s", flush=True)
    if warm:
        t = time.perf_counter()
        if history is None:
            out["dcnv2_warm"] = _warm_start(examples.slice(0, tail_from), examples.slice(tail_from))
        else:
            out["dcnv2_warm"] = _warm_start(history, examples)
        print(f"  dcnv2_warm: {time.perf_counter() - t:.1f} s", flush=True)
    return out


def goal(learners: dict[str, dict[str, Any]], block: str) -> dict[str, Any] | None:
    """The default ranker vs the best peer on quality block ``block`` (NE and calibration);
    the best streamrec learner (lowest NE) for reference. None without the ranker or peers."""

    def ne(name: str) -> float:
        return float(learners[name][block]["normalized_entropy"])

    present = {k for k, r in learners.items() if block in r and math.isfinite(ne(k))}
    peers = [k for k in PEER_NAMES if k in present]
    ours = [k for k in present if k not in PEER_NAMES]
    if DEFAULT_RANKER not in present or not peers:
        return None
    peer = min(peers, key=ne)
    best = min(ours, key=ne)
    ratio = ne(DEFAULT_RANKER) / ne(peer)
    q = learners[DEFAULT_RANKER][block]
    calibration = float(q["calibration_ratio"])
    # clicks observed against clicks predicted: z of a Poisson count with mean sum(p)
    predicted = float(q["mean_p"]) * float(q["n"])
    observed = float(q["ctr"]) * float(q["n"])
    z = (observed - predicted) / math.sqrt(predicted) if predicted > 0 else math.nan
    return {
        "ranker": DEFAULT_RANKER,
        "ranker_ne": ne(DEFAULT_RANKER),
        "best_peer": peer,
        "best_peer_ne": ne(peer),
        "ne_ratio": ratio,
        "met": ratio <= GOAL_NE_RATIO,
        "beats_every_peer": ratio < 1.0,
        "calibration_ratio": calibration,
        "calibration_met": abs(calibration - 1.0) <= GOAL_RATIO_TOLERANCE,
        "clicks_observed": observed,
        "clicks_predicted": predicted,
        "clicks_z": z,
        # the noise floor: +-2% is resolvable only when sqrt(clicks) / clicks < 1%
        "poisson_relative_sd": 1.0 / math.sqrt(observed) if observed > 0 else math.inf,
        "best_streamrec": best,
        "best_streamrec_ne": ne(best),
    }


def main(
    quick: bool = False,
    *,
    results_dir: Path | None = None,
    n: int | None = None,
    learners: tuple[str, ...] | None = None,
    obd_csv: Path = OBD_CSV,
    cache: Path | None = None,
    obd_history_csv: Path = OBD_HISTORY_CSV,
) -> dict[str, Any]:
    """Run the benchmark, write its JSON, print its table; the report.

    ``n`` overrides the synthetic log size, ``learners`` the learner names, ``obd_csv`` the
    OBD sample and ``cache`` the cache folder (:func:`cache_dir`) (tests).
    """
    n_impressions = n or (QUICK_N if quick else FULL_N)
    names = learners or (QUICK_LEARNERS if quick else tuple(LEARNERS))
    t0 = time.perf_counter()
    load_start = os.getloadavg()
    notes: list[str] = []
    datasets: dict[str, Any] = {}
    cfg = SyntheticConfig(n_impressions=n_impressions, seed=0)
    print(f"synthetic ({n_impressions:,} impressions)", flush=True)
    t = time.perf_counter()
    syn = synthetic_examples(cfg, cache)
    print(f"  rows: {time.perf_counter() - t:.1f} s", flush=True)
    tail_from = int(len(syn) * WARM_FRACTION)
    datasets["synthetic"] = {
        "source": f"generate(SyntheticConfig(n_impressions={n_impressions}, seed=0))",
        "drift": f"true CTR x{cfg.drift_multiplier} from {cfg.drift_at:.0%} of the log",
        "examples": len(syn),
        "ctr": float(syn.y.mean()),
        "tail": f"rows {tail_from:,}.. (the last {1 - WARM_FRACTION:.0%})",
        "tail_label": "last 80%",
        "learners": run_log(syn, tail_from, warm=DEFAULT_RANKER in names, names=names),
    }
    if obd_csv.exists():
        print(f"obd ({obd_csv})", flush=True)
        obd = _obd(obd_csv)
        obd_history = _obd(obd_history_csv) if obd_history_csv.exists() else None
        datasets["obd"] = {
            "source": str(obd_csv),
            "examples": len(obd),
            "clicks": int(obd.y.sum()),
            "ctr": float(obd.y.mean()),
            "tail": f"rows {BATCH:,}.. (after the first {BATCH:,} rows, the cold start)",
            "tail_label": f"after {BATCH:,} rows",
            "learners": run_log(
                obd, BATCH, warm=obd_history is not None, names=names, history=obd_history
            ),  # fmt: skip
        }
        if obd_history is not None:
            datasets["obd"]["warm_start"] = (
                f"dcnv2_warm: pretrained on {obd_history_csv} ({len(obd_history):,} rows, "
                f"{int(obd_history.y.sum())} clicks, another logging policy's week)"
            )
        clicks = int(obd.y.sum())
        notes.append(
            f"OBD has {clicks} clicks: the click count alone is uncertain by about "
            f"+-{100 / math.sqrt(max(clicks, 1)):.0f}% (Poisson), so a +-2% calibration "
            "ratio is not resolvable on it"
        )
    else:
        notes.append(f"OBD skipped: {obd_csv} not found")
    goals: dict[str, Any] = {
        "target": (
            f"default ranker ({DEFAULT_RANKER}) NE / best peer NE <= {GOAL_NE_RATIO} "
            f"(2% better) and calibration ratio within 1 +- {GOAL_RATIO_TOLERANCE}"
        )
    }
    for key, ds in datasets.items():
        for block, label in (("all", "all rows"), ("tail", ds["tail_label"])):
            if (g := goal(ds["learners"], block)) is not None:
                goals[f"{key}/{label}"] = g
    load_end = os.getloadavg()[0]
    notes.append(_load_note(load_start[0], load_end))
    report: dict[str, Any] = {
        **stamp("quality", quick),
        "machine": machine(),
        "wall_seconds": round(time.perf_counter() - t0, 1),
        # Other processes on the machine slow the examples/s (not the quality numbers).
        "load_average_1m": {"start": load_start[0], "end": load_end},
        "notes": notes,
        "batch": BATCH,
        "goal": goals,
        "datasets": datasets,
    }
    write_report(report, out := results_path(results_dir, "quality", quick))
    print(table(report))
    print(goal_text(goals))
    print(f"wrote {out}")
    return report


def _obd(csv: Path) -> LogExamples:
    return log_examples(read_obd(csv, item_context=csv.with_name("item_context.csv")))


def _load_note(start: float, end: float) -> str:
    cpus = os.cpu_count() or 1
    return (
        f"1-min load average {start:.1f} at the start, {end:.1f} at the end, on {cpus} CPUs "
        "(above the CPU count, other processes slowed the examples/s; the quality numbers "
        "do not depend on it)"
    )


def table(report: dict[str, Any]) -> str:
    """Markdown table: one row per (dataset, learner, rows), quality columns."""
    head = (
        "| data | learner | rows | AUC | log loss | NE | calib. ratio | ECE | ex/s "
        "| oracle NE | NE / oracle | ratio vs true_p |"
    )
    lines = [head, "|" + "---|" * 12]
    for key, ds in report["datasets"].items():
        tail_label = ds.get("tail_label", "last 80%")
        for name, r in ds["learners"].items():
            blocks = [("all", r["all"])]
            if "tail" in r and name != "dcnv2_warm":
                blocks.append((tail_label, r["tail"]))
            for label, q in blocks:
                rows = label if name != "dcnv2_warm" else "last 80%"
                oracle = q.get("oracle_normalized_entropy")
                gap = None if oracle is None else q["normalized_entropy"] / oracle
                lines.append(
                    f"| {key} | {name} | {rows} | {_f(q['auc'], '.4f')} "
                    f"| {_f(q['log_loss'], '.5f')} | {_f(q['normalized_entropy'], '.4f')} "
                    f"| {_f(q['calibration_ratio'], '.3f')} | {_f(q['ece'], '.4f')} "
                    f"| {_f(r['examples_per_s'], ',.0f')} | {_f(oracle, '.4f')} "
                    f"| {_f(gap, '.3f')} | {_f(q.get('ratio_vs_true_p'), '.3f')} |"
                )
    return "\n".join(lines)


def goal_text(goals: dict[str, Any]) -> str:
    """The goal lines: per log and block, met / not met."""
    lines = [f"Goal: {goals['target']}."]
    for key, g in goals.items():
        if not isinstance(g, dict):
            continue
        if "ranker" not in g:  # a results file from before the calibration goal
            lines.append(f"- {key}: NE ratio {g['ne_ratio']:.4f}")
            continue
        noise = ""
        if "clicks_z" in g:
            noise = (
                f", {g['clicks_observed']:,.0f} clicks vs {g['clicks_predicted']:,.1f} "
                f"predicted (z {g['clicks_z']:+.2f}; Poisson noise alone "
                f"+-{100 * g['poisson_relative_sd']:.1f}%)"
            )
        lines.append(
            f"- {key}: `{g['ranker']}` NE {g['ranker_ne']:.4f} vs best peer `{g['best_peer']}` "
            f"NE {g['best_peer_ne']:.4f}: ratio {g['ne_ratio']:.4f} "
            f"(2% margin {'met' if g['met'] else 'not met'}"
            + (f"; beats every peer: {'yes' if g['beats_every_peer'] else 'no'}"
               if "beats_every_peer" in g else "")
            + f"); calibration ratio {g['calibration_ratio']:.4f} "
            f"(+-2% {'met' if g['calibration_met'] else 'not met'}{noise}); "
            f"best streamrec `{g['best_streamrec']}` NE {g['best_streamrec_ne']:.4f}"
        )  # fmt: skip
    return "\n".join(lines)


def cli(argv: list[str] | None = None) -> int:
    return bench_cli("quality", __doc__, "20k impressions, fewer learners", main, argv)


def markdown(report: dict[str, Any]) -> str:
    """``bench.run``'s README section: the table and the goal lines."""
    goal = report.get("goal")
    return table(report) + (f"\n\n{goal_text(goal)}" if goal else "")


if __name__ == "__main__":
    raise SystemExit(cli())
