"""Two-tower retrieval ablations on the history world: behaviour tower, passes, hard negatives.

Run ``python -m bench.retrieval_ablation`` (history world of 300k impressions, 3 seeds,
several minutes on 2 cores) or ``--quick`` (100k impressions, 2 seeds). The world is
:func:`bench.history_models.history_world` (drifting per-user cluster taste, repeat
consumption, fatigue; rows carry ``hist_seq`` / ``hist_seq_age`` point-in-time). Every
variant learns the first 80% of rows in order (batches of 1,024, ``passes`` times), then
each click of the last 20% is a query: recall@10 and NDCG@10 of exact search over the
world's catalogue with the row's user, context and history
(:func:`learners.retrieval_eval.retrieval_metrics`). Reported per variant: mean and
standard deviation over seeds (the model's seed; the world is fixed), and the rows
``popularity`` (the 10 most clicked training items), ``random``, ``cooccurrence`` (not
learned: the items most often clicked right after the row's last 5 clicks in training,
:func:`learners.retrieval_eval.cooccurrence_top`) and ``oracle`` (the
world's expected clicks per request, ranked; on the first 2,000 test clicks, quick 300;
it knows each user's hidden current cluster) and ``last_click_category_popularity`` (not
learned: the most clicked training items after a click in the category of the row's most
recent click, what the history says about that cluster read off directly) and
``history_oracle`` (the world's expected clicks given only what a row shows: an exact
filter of the hidden cluster over the row's clicks and their ages, plus the repeat boost;
fatigue is not in a row; on the oracle's test clicks): the ceiling of any model that
reads the history, against which the issue's bar, half-way from popularity to the
``oracle``, can be judged.

Variants:

- **behaviour tower** (section ``behaviour``): the defaults before 2026-12-04 (mean pool
  with learned age-bucket weights, ``user_id`` in the user tower, lr 0.03, temperature
  0.05, spelled out as ``MEAN``) against ``behaviour_pool="attention"`` and
  ``"item_tower"``, the id-only tower, the user tower without ``user_id`` (behaviour and
  context only), 1 / 3 / 5 passes, learning rate 0.01 and temperatures 0.02 / 0.1; then
  the candidate ``NEW`` (item-tower pool, no ``user_id``, lr 0.01, temperature 0.2)
  against temperature 0.1, ``user_id`` back in, the ``"recency"`` and ``"self_attention"``
  pools, and 5 passes with the learning rate times 0.6 each pass;
- **hard negatives** (section ``hard_negatives``): ``MEAN`` with a
  :class:`index.hard_negatives.HardNegativePool` kept fresh during training (as the
  indexer does: refreshed every 20 batches from an exact index of the model's item
  vectors, each user queried with their latest row, history included; seen-but-not-clicked
  or ranked-above-a-click items only), over the curriculum cap ``max_hard_share`` (0.1,
  0.25, 0.5) and ramp ``ramp_examples`` (0: at once, 5k and 20k clicks), against none.

Writes ``bench/results/retrieval_ablation.json`` (``retrieval_ablation_quick.json``).
"""

from __future__ import annotations

import dataclasses
import time
from collections import Counter, OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.history_models import K, World, WorldConfig, history_world
from bench.run import bench_cli, machine, publish, stamp
from index.faiss_index import IndexConfig, build_snapshot
from index.hard_negatives import HardNegativePool
from learners.retrieval_eval import cooccurrence_top, retrieval_metrics
from learners.two_tower import TwoTowerConfig, TwoTowerModel

NAME = "retrieval_ablation"
BATCH = 1_024
REFRESH_BATCHES = 20
TRAIN_FRACTION = 0.8
REFERENCES = (
    "popularity", "random", "cooccurrence", "last_click_category_popularity", "history_oracle",
    "oracle",
)  # fmt: skip

# name -> (TwoTowerConfig settings, passes, hard negatives on, lr decay per pass)
Variant = tuple[dict[str, Any], int, bool, float]
# The defaults before 2026-12-05 (mean pool, user_id in, lr 0.03, temperature 0.05).
MEAN: dict[str, Any] = {
    "behaviour_pool": "mean", "exclude_fields": ("position",), "lr": 0.03, "temperature": 0.05,
    "user_id_fallback": False,
}  # fmt: skip
ATT: dict[str, Any] = {**MEAN, "behaviour_pool": "attention"}
NO_UID: dict[str, Any] = {"exclude_fields": ("position", "user_id"), "lr": 0.01}
ITEM: dict[str, Any] = {**MEAN, "behaviour_pool": "item_tower"}
# item tower over the history, no user_id, lr 0.01, temperature 0.2
NEW: dict[str, Any] = {**ITEM, **NO_UID, "temperature": 0.2}
BEHAVIOUR: dict[str, Variant] = {
    "id_only": ({**MEAN, "behaviour_len": 0}, 1, False, 1.0),
    "mean_pool": (MEAN, 1, False, 1.0),
    "mean_pool_3_passes": (MEAN, 3, False, 1.0),
    "mean_pool_lr_0.01_3_passes": ({**MEAN, "lr": 0.01}, 3, False, 1.0),
    "mean_pool_tau_0.02": ({**MEAN, "temperature": 0.02}, 1, False, 1.0),
    "mean_pool_tau_0.1": ({**MEAN, "temperature": 0.1}, 1, False, 1.0),
    "attention_pool": (ATT, 1, False, 1.0),
    "attention_pool_lr_0.01_3_passes": ({**ATT, "lr": 0.01}, 3, False, 1.0),
    "item_tower_pool_lr_0.01_3_passes": ({**ITEM, "lr": 0.01}, 3, False, 1.0),
    "mean_pool_no_user_id_lr_0.01_3_passes": ({**MEAN, **NO_UID}, 3, False, 1.0),
    "item_tower_pool_no_user_id_lr_0.01_3_passes": ({**ITEM, **NO_UID}, 3, False, 1.0),
    "item_tower_pool_no_user_id_lr_0.01_5_passes": ({**ITEM, **NO_UID}, 5, False, 1.0),
    "item_tower_pool_no_user_id_lr_0.01_5_passes_tau_0.1": (
        {**ITEM, **NO_UID, "temperature": 0.1}, 5, False, 1.0
    ),
    "attention_pool_no_user_id_lr_0.01_5_passes": ({**ATT, **NO_UID}, 5, False, 1.0),
    # 2026-12-04: temperature 0.2, recency and sequence encoders, lr decay over passes
    "item_tower_pool_lr_0.01_tau_0.2": ({**NEW, "exclude_fields": ("position",)}, 1, False, 1.0),
    "item_tower_pool_no_user_id_lr_0.01_tau_0.1": ({**NEW, "temperature": 0.1}, 1, False, 1.0),
    "item_tower_pool_no_user_id_lr_0.01_tau_0.2": (NEW, 1, False, 1.0),
    "recency_pool_no_user_id_lr_0.01_tau_0.2": (
        {**NEW, "behaviour_pool": "recency"}, 1, False, 1.0
    ),
    "self_attention_pool_no_user_id_lr_0.01_tau_0.2": (
        {**NEW, "behaviour_pool": "self_attention"}, 1, False, 1.0
    ),
    "item_tower_pool_no_user_id_lr_0.01_tau_0.2_5_passes_decay_0.6": (NEW, 5, False, 0.6),
    "recency_pool_no_user_id_lr_0.01_tau_0.2_5_passes_decay_0.6": (
        {**NEW, "behaviour_pool": "recency"}, 5, False, 0.6
    ),
    "self_attention_pool_no_user_id_lr_0.01_tau_0.2_5_passes_decay_0.6": (
        {**NEW, "behaviour_pool": "self_attention"}, 5, False, 0.6
    ),
}  # fmt: skip
HARD: dict[str, Variant] = {
    "none": (MEAN, 1, False, 1.0),
    "cap_0.1_ramp_0": ({**MEAN, "max_hard_share": 0.1, "ramp_examples": 0}, 1, True, 1.0),
    "cap_0.25_ramp_0": ({**MEAN, "max_hard_share": 0.25, "ramp_examples": 0}, 1, True, 1.0),
    "cap_0.5_ramp_0": ({**MEAN, "max_hard_share": 0.5, "ramp_examples": 0}, 1, True, 1.0),
    "cap_0.5_ramp_5k": ({**MEAN, "max_hard_share": 0.5, "ramp_examples": 5_000}, 1, True, 1.0),
    "cap_0.25_ramp_5k": ({**MEAN, "max_hard_share": 0.25, "ramp_examples": 5_000}, 1, True, 1.0),
    "cap_0.5_ramp_20k": ({**MEAN, "max_hard_share": 0.5, "ramp_examples": 20_000}, 1, True, 1.0),
}  # fmt: skip


class PoolFeeder:
    """Keeps a hard-negative pool fresh while a two-tower model trains (as the indexer does),
    querying each user with their latest row (so the behaviour tower sees its history)."""

    def __init__(self, model: TwoTowerModel, items: list[str], seed: int) -> None:
        self.model = model
        self.items = items
        self.pool = HardNegativePool(per_user=20, max_users=5_000)
        self.rng = np.random.default_rng(seed)
        self.latest: OrderedDict[str, dict[str, object]] = OrderedDict()
        self.clicks: dict[str, set[str]] = {}
        self.seen: dict[str, set[str]] = {}
        self.version = 0
        model.hard_negatives = lambda user, n: self.pool.sample(user, n, self.rng)

    def observe(self, rows: list[dict[str, object]], y: np.ndarray) -> None:
        for row, label in zip(rows, y.tolist(), strict=True):
            user, item = str(row["user_id"]), str(row["item_id"])
            self.latest[user] = row
            self.latest.move_to_end(user)
            self.seen.setdefault(user, set()).add(item)
            if label > 0:
                self.clicks.setdefault(user, set()).add(item)

    def refresh(self) -> None:
        self.version += 1
        snap = build_snapshot(
            self.items,
            self.model.item_vectors(self.items),
            version=self.version,
            config=IndexConfig(kind="flat"),
        )
        users = list(reversed(self.latest))
        vectors = self.model.user_vectors([self.latest[u] for u in users])
        self.pool.refresh(snap, users, vectors, self.clicks, 0.0, seen=self.seen)


def train_eval(
    world: World,
    overrides: dict[str, Any],
    passes: int,
    hard: bool,
    seed: int,
    lr_decay: float = 1.0,
) -> dict[str, Any]:
    """Train one variant on the first 80% and score the clicks of the rest; pass ``p``
    (from 0) learns at ``lr * lr_decay ** p``."""
    ex = world.examples
    split = int(TRAIN_FRACTION * len(ex))
    model = TwoTowerModel(TwoTowerConfig(device="cpu", **overrides), seed=seed)
    feeder = PoolFeeder(model, world.items, seed) if hard else None
    t = time.perf_counter()
    for p in range(passes):
        for opt in (model.optimizer, model.sparse_optimizer):
            for group in opt.param_groups:
                group["lr"] = model.config.lr * lr_decay**p
        for b, s in enumerate(range(0, split, BATCH)):
            rows, y = ex.rows[s : min(s + BATCH, split)], ex.y[s : min(s + BATCH, split)]
            if feeder is not None:
                feeder.observe(rows, y)
                if b and b % REFRESH_BATCHES == 0:
                    feeder.refresh()
            model.learn_many(rows, y)
    seconds = time.perf_counter() - t
    test = [n for n, _, _, _ in world.clicks if n >= split]
    col = {item: c for c, item in enumerate(world.items)}
    truth = np.array([col[str(ex.rows[n]["item_id"])] for n in test])
    scores = model.user_vectors([ex.rows[n] for n in test]) @ model.item_vectors(world.items).T
    top = np.argsort(-scores, axis=1, kind="stable")[:, :K]
    m = retrieval_metrics(top, truth, len(world.items))
    out: dict[str, Any] = {
        "recall_at_10": m["recall_at_k"],
        "ndcg_at_10": m["ndcg_at_k"],
        "train_s": seconds,
    }
    if feeder is not None:
        out.update(
            hard_share=model.hard_share,
            mean_hard_score=model.mean_hard_score,
            mean_random_score=model.mean_random_score,
        )
    return out


def run_variants(world: World, variants: dict[str, Variant], seeds: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, (overrides, passes, hard, decay) in variants.items():
        runs = [train_eval(world, overrides, passes, hard, s, decay) for s in range(seeds)]
        rec = np.array([r["recall_at_10"] for r in runs])
        ndcg = np.array([r["ndcg_at_10"] for r in runs])
        out[name] = {
            "config": overrides,
            "passes": passes,
            "lr_decay": decay,
            "hard_negatives": hard,
            "recall_at_10": float(rec.mean()),
            "recall_at_10_std": float(rec.std(ddof=1)) if len(rec) > 1 else 0.0,
            "ndcg_at_10": float(ndcg.mean()),
            "ndcg_at_10_std": float(ndcg.std(ddof=1)) if len(ndcg) > 1 else 0.0,
            "seeds": runs,
        }
        print(
            f"  {name:<34} recall@10 {rec.mean():.4f} ± {out[name]['recall_at_10_std']:.4f}  "
            f"NDCG@10 {ndcg.mean():.4f}  ({np.mean([r['train_s'] for r in runs]):.1f} s/run)",
            flush=True,
        )
    return out


def references(world: World, oracle_rows: int) -> dict[str, Any]:
    """popularity, random and oracle rows on the same test clicks."""
    ex = world.examples
    split = int(TRAIN_FRACTION * len(ex))
    col = {item: c for c, item in enumerate(world.items)}
    test = [(n, i) for n, _, i, _ in world.clicks if n >= split]
    truth = np.array([col[i] for _, i in test])
    counts = Counter(i for n, _, i, _ in world.clicks if n < split)
    popular = np.array([col[i] for i, _ in counts.most_common(K)])
    out: dict[str, Any] = {}
    pop = retrieval_metrics(np.broadcast_to(popular, (len(test), K)), truth, len(world.items))
    out["popularity"] = {"recall_at_10": pop["recall_at_k"], "ndcg_at_10": pop["ndcg_at_k"]}
    out["random"] = {"recall_at_10": K / len(world.items)}
    # Not learned: items most often clicked right after the row's last 5 clicks in training
    train = ex.rows[:split]
    co = cooccurrence_top(train, ex.y[:split], [ex.rows[n] for n, _ in test], col, K, popular)
    c = retrieval_metrics(co, truth, len(world.items))
    out["cooccurrence"] = {"recall_at_10": c["recall_at_k"], "ndcg_at_10": c["ndcg_at_k"]}
    # Not learned: the 10 items most clicked in training after a click in the same item
    # category as this row's most recent click (popularity without history). What the
    # history can tell about the user's hidden current cluster, read off directly.
    cat = {str(r["item_id"]): str(r["item_cat"]) for r in ex.rows}
    by_cat: dict[str, Counter[str]] = {}
    for n, _, i, _ in world.clicks:
        hist = ex.rows[n]["hist_seq"]
        if n < split and isinstance(hist, list) and hist:
            by_cat.setdefault(cat[str(hist[0])], Counter())[i] += 1
    heur = []
    for n, _ in test:
        hist = ex.rows[n]["hist_seq"]
        counts_n = by_cat.get(cat[str(hist[0])]) if isinstance(hist, list) and hist else None
        picks = [col[i] for i, _ in (counts_n or counts).most_common(K)]
        heur.append(picks + [picks[-1]] * (K - len(picks)))
    h = retrieval_metrics(np.array(heur), truth, len(world.items))
    out["last_click_category_popularity"] = {
        "recall_at_10": h["recall_at_k"],
        "ndcg_at_10": h["ndcg_at_k"],
    }
    sample = test[:oracle_rows]
    top = np.stack([np.argsort(-world.propensity(n), kind="stable")[:K] for n, _ in sample])
    orc = retrieval_metrics(top, truth[: len(sample)], len(world.items))
    out["oracle"] = {
        "recall_at_10": orc["recall_at_k"],
        "ndcg_at_10": orc["ndcg_at_k"],
        "test_clicks": len(sample),
    }
    if world.history_propensity is not None:
        hp = world.history_propensity
        top = np.stack([np.argsort(-hp(n), kind="stable")[:K] for n, _ in sample])
        hor = retrieval_metrics(top, truth[: len(sample)], len(world.items))
        out["history_oracle"] = {
            "recall_at_10": hor["recall_at_k"],
            "ndcg_at_10": hor["ndcg_at_k"],
            "test_clicks": len(sample),
        }
    bar = out["popularity"]["recall_at_10"] + 0.5 * (
        out["oracle"]["recall_at_10"] - out["popularity"]["recall_at_10"]
    )
    out["bar_recall_at_10"] = bar
    for name in (n for n in REFERENCES if n in out):
        print(f"  {name:<34} recall@10 {out[name]['recall_at_10']:.4f}", flush=True)
    print(f"  bar (half-way popularity -> oracle) {bar:.4f}", flush=True)
    return out


def main(quick: bool = False, *, results_dir: Path | None = None) -> dict[str, Any]:
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    wc = WorldConfig(n_impressions=100_000 if quick else 300_000)
    seeds = 2 if quick else 3
    print(f"history world ({wc.n_impressions:,} impressions)", flush=True)
    world = history_world(wc)
    report: dict[str, Any] = {
        **stamp(NAME, quick),
        "machine": machine(),
        "world": dataclasses.asdict(wc),
        "seeds": seeds,
        "notes": ["torch threads 1; mean ± sample std over model seeds (the world is fixed)"],
    }
    print("references", flush=True)
    report["references"] = references(world, 300 if quick else 2_000)
    print("behaviour tower", flush=True)
    report["behaviour"] = run_variants(world, BEHAVIOUR, seeds)
    print("hard negatives", flush=True)
    report["hard_negatives"] = run_variants(world, HARD, seeds)
    report["wall_seconds"] = round(time.perf_counter() - t0, 1)
    return publish(report, results_dir, NAME, quick, table)


def table(report: dict[str, Any]) -> str:
    """Markdown: every variant with recall@10 and NDCG@10, then the reference rows."""
    lines = ["| section | variant | recall@10 | NDCG@10 |", "|---|---|---:|---:|"]
    for section in ("behaviour", "hard_negatives"):
        for name, r in report[section].items():
            lines.append(
                f"| {section} | {name} | {r['recall_at_10']:.4f} ± {r['recall_at_10_std']:.4f} "
                f"| {r['ndcg_at_10']:.4f} ± {r['ndcg_at_10_std']:.4f} |"
            )
    refs = report["references"]
    for name in (n for n in REFERENCES if n in refs):
        ndcg = refs[name].get("ndcg_at_10")
        lines.append(
            f"| reference | {name} | {refs[name]['recall_at_10']:.4f} | "
            f"{'-' if ndcg is None else format(ndcg, '.4f')} |"
        )
    lines.append(f"| bar | half-way popularity -> oracle | {refs['bar_recall_at_10']:.4f} | |")
    return "\n".join(lines)


def cli(argv: list[str] | None = None) -> int:
    return bench_cli(NAME, __doc__, "100k impressions, 2 seeds", main, argv)


if __name__ == "__main__":
    raise SystemExit(cli())
