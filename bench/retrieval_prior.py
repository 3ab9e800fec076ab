"""Serving-time popularity prior for the two-tower, on three logs, against decayed popularity.

Run ``python -m bench.retrieval_prior --movielens LOG`` (``LOG`` from ``streamrec
convert-movielens``; without it the MovieLens rows are skipped) or ``--quick`` (smaller
worlds, 2 seeds). On each log, for each model seed, one default
:class:`learners.two_tower.TwoTowerModel` is trained by
:func:`learners.retrieval_eval.evaluate_retrieval` with
``prior=ServingPrior()`` (time-ordered 80/20 split, one pass): the ``model`` row is the
default retrieval (``beta = 0``), ``model_prior`` adds ``beta * log q`` with ``beta`` and
the half-life picked on the last 20% of the training period
(:mod:`learners.retrieval_prior`), ``popularity`` is the all-time training popularity (the
MovieLens bar's reference, as defined before), ``popularity_decayed`` the decayed one with
its half-life picked on the same validation split. ``covisit`` is item-to-item
co-visitation over the training clicks' point-in-time histories
(:mod:`learners.covisit`); ``covisit_fused`` fuses it with decayed popularity and
``model_fused`` the ``model_prior`` list with both, by weighted reciprocal rank fusion,
weights and constant picked on the same validation split (``fusion`` per seed).
``served`` is what ``/recommend`` retrieves (:mod:`learners.retrieval_fusion` with its
fixed defaults, no validation pick: the model's 200 best by cosine re-scored with the
prior, fused with co-visitation and decayed popularity).

Logs: the MovieLens dev log; the history world (:func:`bench.history_models.history_world`,
300k impressions); a log without history (``logs.synthetic`` defaults but 200k impressions,
500 users, 300 items, no drift). Writes ``bench/results/retrieval_prior.json``.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.run import bench_parser, load_note, machine, publish, stamp
from learners.covisit import CoVisitConfig
from learners.retrieval_eval import evaluate_retrieval
from learners.retrieval_fusion import FusionConfig
from learners.retrieval_prior import ServingPrior
from learners.two_tower import TwoTowerConfig, TwoTowerModel

NAME = "retrieval_prior"
ROWS = (
    "model", "model_prior", "popularity", "popularity_decayed", "cooccurrence", "covisit",
    "covisit_fused", "model_fused", "served",
)  # fmt: skip


def logs(quick: bool, movielens: Path | None) -> dict[str, Any]:
    """name -> (rows, y, source)."""
    from bench.history_models import WorldConfig, history_world
    from logs.offline import load_examples, log_examples
    from logs.synthetic import SyntheticConfig, generate

    out: dict[str, Any] = {}
    if movielens is not None:
        ex = load_examples(str(movielens))
        out["movielens"] = (ex.rows, ex.y, str(movielens))
    wc = WorldConfig(n_impressions=100_000 if quick else 300_000)
    world = history_world(wc)
    out["history_world"] = (world.examples.rows, world.examples.y, f"history_world({wc})")
    sc = SyntheticConfig(
        n_impressions=100_000 if quick else 200_000, n_users=500, n_items=300, drift_at=None
    )
    ex = log_examples(generate(sc))
    out["synthetic"] = (ex.rows, ex.y, f"generate({sc})")
    return out


def run_log(rows: Any, y: Any, seeds: int) -> dict[str, Any]:
    runs = []
    for seed in range(seeds):
        t = time.perf_counter()
        model = TwoTowerModel(TwoTowerConfig(device="cpu"), seed=seed)
        r = evaluate_retrieval(
            rows, y, model, seed=seed, prior=ServingPrior(), covisit=CoVisitConfig(),
            serving=FusionConfig(),
        )  # fmt: skip
        runs.append({
            "recall_at_10": {k: r["rows"][k]["recall_at_k"] for k in ROWS if k in r["rows"]},
            "prior": r["prior"],
            "fusion": {"picks": r["fusion"]["picks"],
                       "validation_clicks": r["fusion"].get("validation_clicks", 0)},
            "served_setting": r["served_setting"],
            "unseen_share": r["unseen_share"],
            "seconds": round(time.perf_counter() - t, 1),
        })  # fmt: skip
        recall = {k: round(v, 4) for k, v in runs[-1]["recall_at_10"].items()}
        recall["served/popularity"] = round(recall["served"] / recall["popularity"], 3)
        st = r["served_setting"]
        recall["served setting"] = (
            f"beta {st['beta']:g}, c {st['rrf_c']:g}, w {list(st['weights'])}"
        )
        pick = (r["prior"]["beta"], r["prior"]["half_life_fraction"])
        print(f"   seed {seed} {recall} beta, half-life {pick}", flush=True)
    summary = {}
    for k in ROWS:
        v = np.array([run["recall_at_10"][k] for run in runs if k in run["recall_at_10"]])
        if len(v):
            summary[k] = {
                "mean": float(v.mean()),
                "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
            }
    return {"recall_at_10": summary, "seeds": runs}


def main(
    quick: bool = False, *, results_dir: Path | None = None, movielens: Path | None = None
) -> dict[str, Any]:
    torch.set_num_threads(1)
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    seeds = 2 if quick else 3
    report: dict[str, Any] = {
        **stamp(NAME, quick),
        "machine": machine(),
        "seeds": seeds,
        "prior_config": ServingPrior().__dict__,
        "covisit_config": CoVisitConfig().__dict__,
        "fusion_config": dataclasses.asdict(FusionConfig()),
    }
    if movielens is not None:
        report["command"] += f" --movielens {movielens}"
    report["logs"] = {}
    for name, (rows, y, source) in logs(quick, movielens).items():
        print(name, flush=True)
        report["logs"][name] = {"source": source, **run_log(rows, y, seeds)}
    report["notes"] = [
        "torch threads 1; mean ± sample std over model seeds; " + load_note(load_before)
    ]
    report["wall_seconds"] = round(time.perf_counter() - t0, 1)
    return publish(report, results_dir, NAME, quick, table)


def table(report: dict[str, Any]) -> str:
    """Markdown: recall@10 of each row on each log."""
    names = list(report["logs"])
    lines = ["| row | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for k in ROWS:
        cells = []
        for n in names:
            s = report["logs"][n]["recall_at_10"].get(k)
            cells.append(f"{s['mean']:.4f} ± {s['std']:.4f}" if s else "-")
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cli(argv: list[str] | None = None) -> int:
    parser = bench_parser(NAME, __doc__, "100k-impression worlds, 2 seeds")
    parser.add_argument("--movielens", type=Path, default=None, help="MovieLens dev log")
    args = parser.parse_args(argv)
    main(args.quick, results_dir=args.results_dir, movielens=args.movielens)
    return 0


if __name__ == "__main__":
    raise SystemExit(cli())
