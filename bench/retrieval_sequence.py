"""Does the two-tower learn the sequence? Co-occurrence reference and user-id fallback.

Run ``python -m bench.retrieval_sequence --movielens LOG`` (history world of 300k
impressions, 3 model seeds, then the MovieLens dev log ``LOG`` written by ``streamrec
convert-movielens``, 1 seed) or ``--quick`` (100k impressions, 2 seeds; MovieLens only
with ``--movielens``). Every variant is measured in the same run as the current default.

On both logs the rows are: the not-learned references ``popularity`` and ``cooccurrence``
(the items most often clicked right after the query's last 5 clicks in training,
:func:`learners.retrieval_eval.cooccurrence_top`: what a sequence signal alone reaches,
so a two-tower below it has not learned the sequence), and the two-tower variants:

- ``old_default``: the :class:`learners.two_tower.TwoTowerConfig` defaults before
  2026-12-05 (mean pool, ``user_id`` on every row, lr 0.03, temperature 0.05);
- ``old_default_user_id_fallback``: the same with ``user_id_fallback`` (``user_id`` only
  for rows without history);
- ``item_tower_fallback_tau_0.2``: item-tower pool, ``user_id_fallback``, lr 0.01,
  temperature 0.2 (the best one-pass history-world settings of
  ``bench/results/retrieval_ablation.json``, with the id kept for rows without history;
  the defaults since 2026-12-05, chosen from this benchmark);
- ``recency_fallback_tau_0.2``: the same with the ``recency`` pool.

History world: :func:`bench.retrieval_ablation.train_eval` (first 80% learned in order,
each later click a query, exact search; one pass). MovieLens:
:func:`learners.retrieval_eval.evaluate_retrieval` (time-ordered 80/20 split), with and
without ``exclude_seen``. Writes ``bench/results/retrieval_sequence.json``
(``retrieval_sequence_quick.json``).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.history_models import WorldConfig, history_world
from bench.retrieval_ablation import references, train_eval
from bench.run import bench_parser, machine, publish, stamp
from learners.retrieval_eval import evaluate_retrieval
from learners.two_tower import TwoTowerConfig, TwoTowerModel

NAME = "retrieval_sequence"
FALLBACK: dict[str, Any] = {"user_id_fallback": True}
TUNED: dict[str, Any] = {**FALLBACK, "lr": 0.01, "temperature": 0.2}
# The defaults before 2026-12-05, spelled out.
OLD: dict[str, Any] = {
    "behaviour_pool": "mean", "user_id_fallback": False, "lr": 0.03, "temperature": 0.05,
}  # fmt: skip
VARIANTS: dict[str, dict[str, Any]] = {
    "old_default": OLD,
    "old_default_user_id_fallback": {**OLD, **FALLBACK},
    "item_tower_fallback_tau_0.2": {**TUNED, "behaviour_pool": "item_tower"},
    "recency_fallback_tau_0.2": {**TUNED, "behaviour_pool": "recency"},
}


def history_rows(quick: bool) -> dict[str, Any]:
    """References and every variant on the history world, mean ± std over model seeds."""
    wc = WorldConfig(n_impressions=100_000 if quick else 300_000)
    seeds = 2 if quick else 3
    world = history_world(wc)
    out: dict[str, Any] = {"world": dataclasses.asdict(wc), "seeds": seeds}
    out["references"] = references(world, 300 if quick else 2_000)
    for name, overrides in VARIANTS.items():
        runs = [train_eval(world, overrides, 1, False, s) for s in range(seeds)]
        rec = np.array([r["recall_at_10"] for r in runs])
        out[name] = {
            "config": overrides,
            "recall_at_10": float(rec.mean()),
            "recall_at_10_std": float(rec.std(ddof=1)) if seeds > 1 else 0.0,
            "ndcg_at_10": float(np.mean([r["ndcg_at_10"] for r in runs])),
            "seeds": runs,
        }
        print(
            f"  history {name:<30} recall@10 {rec.mean():.4f} ± {rec.std(ddof=1):.4f}", flush=True
        )
    return out


def movielens_rows(log: Path, seed: int = 0) -> dict[str, Any]:
    """Every variant on the MovieLens dev log, one seed, with and without exclude_seen."""
    from logs.offline import load_examples

    examples = load_examples(str(log))
    out: dict[str, Any] = {"log": str(log), "seed": seed}
    for name, overrides in VARIANTS.items():
        t = time.perf_counter()
        model = TwoTowerModel(TwoTowerConfig(device="cpu", **overrides), seed=seed)
        r = evaluate_retrieval(examples.rows, examples.y, model, seed=seed)
        # the same trained model, queried again without the query's own recent clicks
        r_seen = evaluate_retrieval(
            examples.rows, examples.y, _Trained(model), seed=seed, exclude_seen=True
        )
        out[name] = {
            "config": overrides,
            "rows": r["rows"],
            "exclude_seen_rows": r_seen["rows"],
            "test_clicks": r["test_clicks"],
            "seconds": round(time.perf_counter() - t, 1),
        }
        m, p, c = (r["rows"][k]["recall_at_k"] for k in ("model", "popularity", "cooccurrence"))
        print(f"  movielens {name:<28} recall@10 {m:.4f} (pop {p:.4f}, co {c:.4f})", flush=True)
    return out


class _Trained:
    """A trained model that ignores further ``learn_many`` (to evaluate it twice)."""

    def __init__(self, model: TwoTowerModel) -> None:
        self.model = model

    def learn_many(self, X: Any, y: Any, w: Any = None) -> None:
        return None

    def user_vectors(self, rows_or_ids: Any) -> np.ndarray:
        return self.model.user_vectors(rows_or_ids)

    def item_vectors(self, item_ids: Any) -> np.ndarray:
        return self.model.item_vectors(item_ids)


def main(
    quick: bool = False, *, results_dir: Path | None = None, movielens: Path | None = None
) -> dict[str, Any]:
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    report: dict[str, Any] = {
        **stamp(NAME, quick),
        "machine": machine(),
        "notes": ["torch threads 1; history world: mean ± sample std over model seeds"],
    }
    print("history world", flush=True)
    report["history"] = history_rows(quick)
    if movielens is not None:
        print("movielens", flush=True)
        report["movielens"] = movielens_rows(movielens)
    report["wall_seconds"] = round(time.perf_counter() - t0, 1)
    return publish(report, results_dir, NAME, quick, table)


def table(report: dict[str, Any]) -> str:
    """Markdown: recall@10 of each row on each log."""
    h = report["history"]
    ml = report.get("movielens", {})
    lines = [
        "| row | history world recall@10 | MovieLens recall@10 | MovieLens, exclude seen |",
        "|---|---:|---:|---:|",
    ]
    first = next(iter(VARIANTS))
    for ref in ("popularity", "cooccurrence", "history_oracle"):
        cells = [f"{h['references'][ref]['recall_at_10']:.4f}" if ref in h["references"] else "-"]
        for key in ("rows", "exclude_seen_rows"):
            rows = ml.get(first, {}).get(key, {})
            cells.append(f"{rows[ref]['recall_at_k']:.4f}" if ref in rows else "-")
        lines.append(f"| {ref} | " + " | ".join(cells) + " |")
    for name in VARIANTS:
        cells = [f"{h[name]['recall_at_10']:.4f} ± {h[name]['recall_at_10_std']:.4f}"]
        for key in ("rows", "exclude_seen_rows"):
            rows = ml.get(name, {}).get(key, {})
            cells.append(f"{rows['model']['recall_at_k']:.4f}" if "model" in rows else "-")
        lines.append(f"| two-tower {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cli(argv: list[str] | None = None) -> int:
    parser = bench_parser(NAME, __doc__, "100k impressions, 2 seeds")
    parser.add_argument("--movielens", type=Path, default=None, help="MovieLens dev log")
    args = parser.parse_args(argv)
    main(args.quick, results_dir=args.results_dir, movielens=args.movielens)
    return 0


if __name__ == "__main__":
    raise SystemExit(cli())
