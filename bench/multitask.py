"""A second label: does one multi-task model learn click and conversion better than a
single-task model per label?

Run ``python -m bench.multitask`` (5 seeds, 100k impressions; ``--n``, ``--seeds``) or
``--quick`` (1 seed, 40k).

The log: the synthetic world with its second outcome (``SyntheticConfig(conversion=True,
base_cvr=0.2, drift_at=None)``; :func:`logs.synthetic._add_conversions`): a clicked
impression converts with a known ``true_cvr``, whose taste is partly shared with the
click's, so ``P(click and conversion) = true_p * true_cvr`` is known for every row.
Task 0 is the click (label ``click``); task 1 is CTCVR, "clicked and converted" (label
``conversion``, 0 on every unclicked impression), ESMM's entire-space label.

Arms, each run through :func:`logs.offline.evaluate` as ``streamrec evaluate`` runs a
model (prequential: every batch is scored, then learnt from; offline rate), features as
the log has them (no historical features: this world has no history effects):

- ``dcnv2_ctr`` / ``dcnv2_ctcvr``: the default ranker (DCN-v2) on one label;
- ``mmoe_ctr`` / ``mmoe_ctcvr``: MMoE with one task (``num_tasks=1``): the single-task
  model of the multi-task arms;
- ``mmoe_direct``: MMoE, two tasks, task 1 learns CTCVR directly (``task1="direct"``);
- ``mmoe_esmm``: MMoE, two tasks, task 1 learns P(conversion | click) through the ESMM
  loss on ``pCTR * pCVR`` (``task1="esmm"``); its task-1 score is pCTCVR.
- ``ple_direct`` / ``ple_esmm``: PLE (Tang et al. 2020; ``model="ple"``, two extraction
  levels, 4 shared experts and 2 of each task's own), task 1 as in the MMoE arms.

Task 0 is scored as served (:meth:`TorchRanker.predict_proba_many`), task 1 by
:meth:`TorchRanker.predict_tasks_many` (the report's ``task1`` block of ``evaluate``). Per
arm and task: :func:`logs.offline.quality` (NE, AUC, Σp/Σy, Σp/Σtruth, ...).
The issue's bar (#17): on the two-label log each task's NE below its single-task model's,
median of >= 5 seeds: each two-task arm against ``mmoe_ctr`` / ``mmoe_ctcvr`` (the same
model with one task) and against the default ranker on that label alone (``dcnv2_ctr`` /
``dcnv2_ctcvr``), per seed and in the median. Writes
``bench/results/multitask.json`` (``multitask_quick.json``).
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.run import bench_parser, load_note, machine, or_dash, publish, stamp
from learners.ranker import RankerConfig, TorchRanker
from logs.offline import LogExamples, evaluate, log_examples
from logs.synthetic import SyntheticConfig, generate

TASKS = ("ctr", "ctcvr")
#: arm -> (RankerConfig keywords, which labels it learns: "ctr", "ctcvr" or "both")
ARMS: dict[str, tuple[dict[str, Any], str]] = {
    "dcnv2_ctr": ({}, "ctr"),
    "dcnv2_ctcvr": ({}, "ctcvr"),
    "mmoe_ctr": ({"model": "mmoe", "num_tasks": 1}, "ctr"),
    "mmoe_ctcvr": ({"model": "mmoe", "num_tasks": 1}, "ctcvr"),
    "mmoe_direct": ({"model": "mmoe", "num_tasks": 2, "task1": "direct"}, "both"),
    "mmoe_esmm": ({"model": "mmoe", "num_tasks": 2, "task1": "esmm"}, "both"),
    # PLE (Tang et al. 2020): each task owns experts beside the shared ones
    "ple_direct": ({"model": "ple", "num_tasks": 2, "task1": "direct"}, "both"),
    "ple_esmm": ({"model": "ple", "num_tasks": 2, "task1": "esmm"}, "both"),
}
#: per task: its single-task model of the multi-task arms, and the default ranker's arm
SINGLE = {"ctr": "mmoe_ctr", "ctcvr": "mmoe_ctcvr"}
DEFAULT = {"ctr": "dcnv2_ctr", "ctcvr": "dcnv2_ctcvr"}
NE = "normalized_entropy"


def run_arm(arm: str, examples: LogExamples, seed: int) -> dict[str, dict[str, float]]:
    """One arm's prequential run (:func:`logs.offline.evaluate`): task name -> its quality
    block (:func:`logs.offline.quality`, against the task's truth)."""
    kw, learns = ARMS[arm]
    ranker = TorchRanker(RankerConfig(**kw), seed=seed, online=False)
    if learns == "ctcvr":  # the second label as the only one
        assert examples.y2 is not None
        ex = dataclasses.replace(examples, y=examples.y2, true_p=examples.true_p2, delay=None,
                                 y2=None, true_p2=None)  # fmt: skip
    elif learns == "ctr":
        ex = dataclasses.replace(examples, y2=None, true_p2=None)
    else:
        ex = examples
    report = evaluate(ex, ranker, progress=False)
    if learns == "both":
        return {"ctr": report["all"], "ctcvr": report["task1"]}
    return {learns: report["all"]}


def run_seed(seed: int, n: int) -> dict[str, Any]:
    """Every arm on the log of ``seed``: per arm and task, its quality block."""
    cfg = SyntheticConfig(n_impressions=n, seed=seed, drift_at=None, conversion=True,
                          base_cvr=0.2)  # fmt: skip
    examples = log_examples(generate(cfg))
    assert examples.y2 is not None
    arms: dict[str, Any] = {}
    for arm in ARMS:
        t0 = time.perf_counter()
        arms[arm] = run_arm(arm, examples, seed)
        arms[arm]["seconds"] = time.perf_counter() - t0
        print(f"  seed {seed} {arm}: " + ", ".join(
            f"{t} NE {q['normalized_entropy']:.4f}" for t, q in arms[arm].items()
            if isinstance(q, dict)
        ))  # fmt: skip
    return {"seed": seed, "impressions": n, "clicks": int(examples.y.sum()),
            "conversions": int(examples.y2.sum()), "arms": arms}  # fmt: skip


def bars(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per multi-task arm and task, against its single-task model (``SINGLE``) and against
    the default ranker on that label alone (``DEFAULT``): the NE differences (multi -
    reference) per seed, their median, and whether the arm is below the reference in
    every seed and in the median (the issue's bar: "median of >= 5 seeds")."""
    out: dict[str, Any] = {}
    for arm in (a for a, (_, learns) in ARMS.items() if learns == "both"):
        for task in TASKS:
            entry: dict[str, Any] = {}
            for name, ref in (("single", SINGLE[task]), ("default", DEFAULT[task])):
                diffs = [r["arms"][arm][task][NE] - r["arms"][ref][task][NE] for r in runs]
                med = float(np.median(diffs))
                entry |= {
                    f"against_{name}": ref,
                    f"ne_minus_{name}": diffs,
                    f"median_ne_minus_{name}": med,
                    f"below_{name}_every_seed": all(d < 0 for d in diffs),
                    f"below_{name}_median": med < 0,
                }
            out[f"{arm}.{task}"] = entry
    return out


def table(report: dict[str, Any]) -> str:
    lines = ["| arm | task | NE (median) | AUC | Σp/Σy | Σp/Σtruth |", "|---|---|---|---|---|---|"]
    for arm in ARMS:
        for task in TASKS:
            qs = [r["arms"][arm][task] for r in report["runs"] if task in r["arms"][arm]]
            if not qs:
                continue
            med = {k: float(np.median([q[k] for q in qs])) for k in qs[0]}
            lines.append(
                f"| {arm} | {task} | {med[NE]:.4f} | {med['auc']:.4f} | "
                f"{or_dash(med['calibration_ratio'], '.3f')} | {med['ratio_vs_true_p']:.3f} |"
            )
    for key, b in report["bars"].items():
        for name in ("single", "default"):
            diffs = ", ".join(f"{d:+.4f}" for d in b[f"ne_minus_{name}"])
            lines.append(
                f"{key} vs {b[f'against_{name}']}: median {b[f'median_ne_minus_{name}']:+.4f}, "
                f"below in every seed: {b[f'below_{name}_every_seed']} (NE differences {diffs})"
            )
    return "\n".join(lines)


def main(
    quick: bool = False,
    results_dir: Path | None = None,
    n: int | None = None,
    seeds: int | None = None,
) -> dict[str, Any]:
    n = n if n is not None else (40_000 if quick else 100_000)
    seeds = seeds if seeds is not None else (1 if quick else 5)
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    runs = [run_seed(s, n) for s in range(seeds)]
    report = {
        **stamp("multitask", quick),
        "machine": machine(),
        "wall_seconds": time.perf_counter() - t0,
        "world": "SyntheticConfig(n_impressions=n, seed=seed, drift_at=None, conversion=True, "
        "base_cvr=0.2)",
        "runs": runs,
        "bars": bars(runs),
        "notes": [load_note(load)],
    }
    return publish(report, results_dir, "multitask", quick, table)


def cli(argv: list[str] | None = None) -> int:
    p = bench_parser("multitask", __doc__, "1 seed, 40k impressions")
    p.add_argument("--n", type=int, default=None, help="impressions per log")
    p.add_argument("--seeds", type=int, default=None)
    a = p.parse_args(argv)
    main(a.quick, a.results_dir, a.n, a.seeds)
    return 0


if __name__ == "__main__":
    raise SystemExit(cli())
