"""Prequential quality of the streamrec rankers vs the River peer, on the same data.

Run ``python -m bench.quality`` (about 2 min on 2 cores) or ``python -m bench.quality
--quick``. Every learner sees the same log in the same order, batches of 1024, scored then
learned from (``stream.offline.evaluate``):

- ``synthetic``: ``generate(SyntheticConfig(n_impressions=300_000, seed=0))`` (30k quick),
  whose true CTR jumps x1.6 half-way (the default drift). 300k, not the 1M of a
  production-sized run, keeps the full benchmark to minutes. The log carries ``true_p``,
  so each learner also gets the oracle's NE (the NE of ``true_p`` itself) and the ratio
  of its predicted to the true click mass.
- ``obd``: the Open Bandit Dataset sample at ``/work/shared/data/obd/random/all/all.csv``
  (converted with ``stream.logs.read_obd`` and its ``item_context.csv``), when present;
  skipped with a note otherwise.

Learners: ``TorchRanker`` with ``logreg``, ``dcnv2`` (bce), ``dcnv2`` (focal) and
``deepfm``, each cold at ``online=False`` (the base learning rate); on the synthetic log
also ``dcnv2`` warm-started from ``pretrain`` on the first 20% and evaluated online
(``base_lr * online_lr_scale``) on the remaining 80%; and the peer
``RiverLogisticRegression``. Every learner's quality is reported on all the rows it was
evaluated on and, on the synthetic log, on the last 80% (the warm start's window), so the
warm start compares on equal rows.

Goal (from the issue): the best streamrec model's NE at least 2% below the best peer's,
i.e. ``NE(best streamrec) / NE(best peer) <= 0.98``.
Writes ``bench/results/quality.json`` (``quality_quick.json``) and prints a table.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.run import machine, results_path, stamp, write_report
from learners.baselines import RiverLogisticRegression
from learners.ranker import RankerConfig, TorchRanker
from stream.logs import read_obd
from stream.offline import LogExamples, evaluate, log_examples, pretrain, quality
from stream.synthetic import SyntheticConfig, generate

OBD_CSV = Path("/work/shared/data/obd/random/all/all.csv")
FULL_N = 300_000
QUICK_N = 30_000
BATCH = 1024
WARM_FRACTION = 0.2
GOAL_NE_RATIO = 0.98
PEERS = ("river_logreg",)

# name -> factory of a cold learner
COLD: dict[str, Callable[[], Any]] = {
    "logreg": lambda: TorchRanker(RankerConfig(model="logreg"), seed=0, online=False),
    "dcnv2": lambda: TorchRanker(RankerConfig(model="dcnv2"), seed=0, online=False),
    "dcnv2_focal": lambda: TorchRanker(
        RankerConfig(model="dcnv2", loss="focal"), seed=0, online=False
    ),
    "deepfm": lambda: TorchRanker(RankerConfig(model="deepfm"), seed=0, online=False),
    "river_logreg": lambda: RiverLogisticRegression(seed=0),
}


def _run(examples: LogExamples, learner: Any, tail_from: int | None) -> dict[str, Any]:
    """``evaluate`` without the scores; plus ``tail`` quality from row ``tail_from`` on."""
    rep = evaluate(examples, learner, batch_size=BATCH, progress=False)
    scores = rep.pop("scores")
    if tail_from is not None:
        tp = None if examples.true_p is None else examples.true_p[tail_from:]
        rep["tail"] = quality(scores[tail_from:], examples.y[tail_from:], tp)
    return rep


def _warm_start(examples: LogExamples, split: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "dcnv2.pt"
        summary = pretrain(
            examples.slice(0, split), ckpt, config=RankerConfig(model="dcnv2"), progress=False
        )
        ranker = TorchRanker.load(ckpt, online=True)
    rep = _run(examples.slice(split), ranker, tail_from=0)
    rep["pretrain"] = {k: v for k, v in summary.items() if k != "checkpoint"}
    return rep


def run_log(examples: LogExamples, warm: bool) -> dict[str, dict[str, Any]]:
    """Every learner over one log; per-learner reports."""
    split = int(len(examples) * WARM_FRACTION) if warm else None
    out: dict[str, dict[str, Any]] = {}
    for name, factory in COLD.items():
        t = time.perf_counter()
        out[name] = _run(examples, factory(), tail_from=split)
        print(f"  {name}: {time.perf_counter() - t:.1f} s", flush=True)
    if split is not None:
        t = time.perf_counter()
        out["dcnv2_warm"] = _warm_start(examples, split)
        print(f"  dcnv2_warm: {time.perf_counter() - t:.1f} s", flush=True)
    return out


def goal(learners: dict[str, dict[str, Any]], block: str) -> dict[str, Any] | None:
    """NE of the best streamrec learner over the best peer, on quality block ``block``."""
    ne = {
        name: r[block]["normalized_entropy"]
        for name, r in learners.items()
        if block in r and math.isfinite(r[block]["normalized_entropy"])
    }
    ours = {k: v for k, v in ne.items() if k not in PEERS}
    peers = {k: v for k, v in ne.items() if k in PEERS}
    if not ours or not peers:
        return None
    best, peer = min(ours, key=ours.__getitem__), min(peers, key=peers.__getitem__)
    ratio = ours[best] / peers[peer]
    return {
        "best_streamrec": best,
        "best_streamrec_ne": ours[best],
        "best_peer": peer,
        "best_peer_ne": peers[peer],
        "ne_ratio": ratio,
        "met": ratio <= GOAL_NE_RATIO,
    }


def main(
    quick: bool = False, *, results_dir: Path | None = None, n: int | None = None
) -> dict[str, Any]:
    """Run the benchmark, write its JSON, print its table; the report."""
    n_impressions = n or (QUICK_N if quick else FULL_N)
    t0 = time.perf_counter()
    notes = [
        f"synthetic log of {n_impressions:,} impressions (not 1M: keeps the full run to minutes)",
    ]
    datasets: dict[str, Any] = {}
    cfg = SyntheticConfig(n_impressions=n_impressions, seed=0)
    print(f"synthetic ({n_impressions:,} impressions)", flush=True)
    syn = log_examples(generate(cfg))
    datasets["synthetic"] = {
        "source": f"generate(SyntheticConfig(n_impressions={n_impressions}, seed=0))",
        "drift": f"true CTR x{cfg.drift_multiplier} from {cfg.drift_at:.0%} of the log",
        "examples": len(syn),
        "ctr": float(syn.y.mean()),
        "tail_from": int(len(syn) * WARM_FRACTION),
        "learners": run_log(syn, warm=True),
    }
    if OBD_CSV.exists():
        print(f"obd ({OBD_CSV})", flush=True)
        obd = log_examples(read_obd(OBD_CSV, item_context=OBD_CSV.with_name("item_context.csv")))
        datasets["obd"] = {
            "source": str(OBD_CSV),
            "examples": len(obd),
            "ctr": float(obd.y.mean()),
            "learners": run_log(obd, warm=False),
        }
    else:
        notes.append(f"OBD skipped: {OBD_CSV} not found")
    goals: dict[str, Any] = {
        "target": f"NE(best streamrec) / NE(best peer) <= {GOAL_NE_RATIO} (2% better)"
    }
    for key, ds in datasets.items():
        if (g := goal(ds["learners"], "all")) is not None:
            goals[f"{key}/all rows (cold learners)"] = g
        if (g := goal(ds["learners"], "tail")) is not None:
            goals[f"{key}/last 80% (incl. warm start)"] = g
    report: dict[str, Any] = {
        **stamp("quality", quick),
        "machine": machine(),
        "wall_seconds": round(time.perf_counter() - t0, 1),
        "notes": notes,
        "batch": BATCH,
        "goal": goals,
        "datasets": datasets,
    }
    write_report(report, out := results_path(results_dir, "quality", quick))
    print(table(report))
    print(f"wrote {out}")
    return report


def _f(x: float | None, spec: str) -> str:
    return "-" if x is None or not math.isfinite(x) else format(x, spec)


def table(report: dict[str, Any]) -> str:
    """Markdown table: one row per (dataset, learner, rows), quality columns."""
    head = (
        "| data | learner | rows | AUC | log loss | NE | calib. ratio | ECE | ex/s "
        "| oracle NE | NE / oracle | ratio vs true_p |"
    )
    lines = [head, "|" + "---|" * 12]
    for key, ds in report["datasets"].items():
        for name, r in ds["learners"].items():
            blocks = [("all", r["all"])]
            if "tail" in r and name != "dcnv2_warm":
                blocks.append(("last 80%", r["tail"]))
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


def cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="30k synthetic impressions")
    parser.add_argument("--results-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    main(args.quick, results_dir=args.results_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(cli())
