"""Behaviour in the models: the rankers' sequence block and the two-tower behaviour tower.

Run ``python -m bench.history_models`` (full, a few minutes on 2 cores) or ``--quick``
(< 1 min). Everything is seeded. Rows carry the history contract's ``hist_seq`` (the user's
last 20 clicked items, most recent first) and ``hist_seq_age`` (seconds), computed here
point-in-time by :func:`attach_history` (clicks whose ``click_ts`` is before the
impression's ``ts``), standing in for the feature stage.

1. **Ranker ablation, prequential** (``logs.offline.evaluate``, batches of 1,024, offline
   learning rate, as ``bench.quality``) of DCN-v2 with neither behaviour part, with the
   hashed user x field pair crosses, with DIN target attention over ``hist_seq``, and with
   both (the default), on two logs:

   - ``history_world`` (:func:`history_world`): a world where history matters. Items fall
     in clusters; each user's current cluster drifts (it changes with probability
     ``drift`` at each of their impressions); the logit of a click is a base rate plus an
     item bias, +1.5 when the item is in the user's current cluster, +1.2 when the user
     clicked this item among their last 20 clicks (repeat consumption), and -0.5 per
     earlier unclicked exposure of the pair (fatigue). Shown items are half from the
     user's current cluster, half by global popularity. ``true_p`` is known, so the
     oracle NE is reported.
   - ``synthetic``: ``logs.synthetic`` (no history signal; the cost of the parts where
     they buy nothing), with the history attached the same way.

   AUC, NE, calibration ratio over the whole log and the last half, and the prequential
   examples/s. **Throughput** separately: ``score_and_learn`` and ``predict_proba_many``
   examples/s at batch 1,024 of the default against the no-behaviour DCN-v2 on the same
   rows (after a warm-up), one torch thread.

2. **Two-tower recall@10** of the default (user tower over behaviour) against the id-only
   user tower (``behaviour_len=0``), popularity (the 10 most clicked items of the training
   part) and random (10 / items), on the clicks of the history world (learned in order on
   the first 80% of rows, evaluated on each click of the last 20%: a hit when its item is
   among the 10 retrieved for the row's user, context and history), with the oracle: the
   world's own expected clicks per request (exposure x click probability) ranked over the
   catalogue.

Writes ``bench/results/history_models.json`` (``history_models_quick.json``).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections import Counter, deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from bench.run import bench_cli, machine, results_path, stamp, write_report
from learners.ranker import RankerConfig, TorchRanker
from learners.two_tower import TwoTowerConfig, TwoTowerModel
from logs.offline import LogExamples, evaluate, log_examples, quality
from logs.synthetic import SyntheticConfig, generate

NAME = "history_models"
BATCH = 1024
HIST_LEN = 20
K = 10

RANKERS: dict[str, dict[str, bool]] = {
    "dcnv2_no_behaviour": {"sequence_attention": False, "pair_crosses": False},
    "dcnv2_pairs": {"sequence_attention": False, "pair_crosses": True},
    "dcnv2_attention": {"sequence_attention": True, "pair_crosses": False},
    "dcnv2_default": {"sequence_attention": True, "pair_crosses": True},
}


@dataclasses.dataclass(frozen=True)
class WorldConfig:
    """The history world (see the module docstring)."""

    n_impressions: int = 300_000
    n_users: int = 3_000
    n_items: int = 600
    clusters: int = 20
    drift: float = 0.03
    base_logit: float = -3.6
    cluster_effect: float = 1.5
    repeat_effect: float = 1.2
    fatigue: float = 0.5
    impressions_per_s: float = 20.0
    seed: int = 0


@dataclasses.dataclass
class World:
    """A drawn history world: its log and what the oracle needs."""

    examples: LogExamples
    clicks: list[tuple[int, str, str, float]]  # (row, user, item, ts) of every click
    propensity: Callable[[int], np.ndarray]  # row -> expected clicks over every item (I,)
    items: list[str]
    # row -> expected clicks (I,) from what the row shows (its clicks and their ages) only;
    # see history_world
    history_propensity: Callable[[int], np.ndarray] | None = None


def _sigmoid(x: np.ndarray | float) -> Any:
    return 1.0 / (1.0 + np.exp(-x))


def history_world(c: WorldConfig) -> World:
    """Draw the history world; rows carry ``hist_seq`` / ``hist_seq_age`` point-in-time."""
    rng = np.random.default_rng(c.seed)
    cluster_of = np.arange(c.n_items) % c.clusters
    pop = 1.0 / np.arange(1, c.n_items + 1) ** 0.8
    rng.shuffle(pop)
    pop /= pop.sum()
    in_cluster = [np.flatnonzero(cluster_of == k) for k in range(c.clusters)]
    cluster_pop = [pop[idx] / pop[idx].sum() for idx in in_cluster]
    item_bias = rng.normal(0.0, 0.5, c.n_items)
    current = rng.integers(0, c.clusters, c.n_users)
    recent: list[deque[tuple[int, float]]] = [deque(maxlen=HIST_LEN) for _ in range(c.n_users)]
    unclicked: dict[tuple[int, int], int] = {}
    rows: list[dict[str, object]] = []
    y = np.zeros(c.n_impressions)
    true_p = np.zeros(c.n_impressions)
    ts = 1_700_000_000.0 + np.arange(c.n_impressions) / c.impressions_per_s
    states: list[tuple[int, int, frozenset[int]]] = []  # (user, cluster, recent items)
    clicks: list[tuple[int, str, str, float]] = []
    users = rng.integers(0, c.n_users, c.n_impressions)
    for n in range(c.n_impressions):
        u = int(users[n])
        if rng.random() < c.drift:
            current[u] = rng.integers(c.clusters)
        k = int(current[u])
        if rng.random() < 0.5:
            i = int(rng.choice(in_cluster[k], p=cluster_pop[k]))
        else:
            i = int(rng.choice(c.n_items, p=pop))
        hist = recent[u]
        seen = frozenset(j for j, _ in hist)
        logit = (
            c.base_logit
            + item_bias[i]
            + c.cluster_effect * (cluster_of[i] == k)
            + c.repeat_effect * (i in seen)
            - c.fatigue * unclicked.get((u, i), 0)
        )
        p = float(_sigmoid(logit))
        click = rng.random() < p
        rows.append(
            {
                "user_id": f"u{u}",
                "item_id": f"i{i}",
                "item_cat": f"c{cluster_of[i]}",
                "hist_seq": [f"i{j}" for j, _ in reversed(hist)],
                "hist_seq_age": [float(ts[n] - t) for _, t in reversed(hist)],
            }
        )
        states.append((u, k, seen))
        y[n], true_p[n] = float(click), p
        if click:
            clicks.append((n, f"u{u}", f"i{i}", float(ts[n])))
            # Clicked half a second after the impression: strictly before the next one.
            hist.append((i, float(ts[n]) + 0.5 / c.impressions_per_s))
        else:
            unclicked[(u, i)] = unclicked.get((u, i), 0) + 1

    def propensity(row: int) -> np.ndarray:
        u, k, seen = states[row]
        exposure = 0.5 * pop.copy()
        exposure[in_cluster[k]] += 0.5 * cluster_pop[k]
        fat = np.array([unclicked_before(u, j, row) for j in range(c.n_items)])
        logit = c.base_logit + item_bias + c.cluster_effect * (cluster_of == k) - c.fatigue * fat
        logit[list(seen)] += c.repeat_effect
        out: np.ndarray = exposure * _sigmoid(logit)
        return out

    # Unclicked exposures of (user, item) before a row, for the oracle (recomputed lazily).
    by_pair: dict[tuple[int, int], list[int]] = {}
    for n, (u, _, _) in enumerate(states):
        if not y[n]:
            i = int(str(rows[n]["item_id"])[1:])
            by_pair.setdefault((u, i), []).append(n)

    def unclicked_before(u: int, i: int, row: int) -> int:
        return sum(1 for m in by_pair.get((u, i), ()) if m < row)

    col = {f"i{i}": i for i in range(c.n_items)}
    # Exposure x click probability per hidden cluster, before the repeat boost: (clusters, I).
    on = cluster_of[None, :] == np.arange(c.clusters)[:, None]
    exposure_k = 0.5 * pop[None, :] + 0.5 * on * np.stack(
        [np.bincount(in_cluster[k], cluster_pop[k], c.n_items) for k in range(c.clusters)]
    )
    base_k = c.base_logit + item_bias[None, :] + c.cluster_effect * on
    per_user_s = c.impressions_per_s / c.n_users  # a user's impressions per second

    def history_propensity(row: int) -> np.ndarray:
        """The best a model reading only the row's history can do: an exact filter of the
        hidden cluster over the row's clicks (oldest first; each click's likelihood per
        cluster, the cluster kept between clicks with probability ``(1 - drift)`` per
        expected impression of the user in the gap, else redrawn), then the expected
        clicks with the repeat boost. Fatigue (unclicked exposures) and the evidence of
        unclicked impressions are not in a row, so they are left out."""
        r = rows[row]
        hist = [col[str(i)] for i in r["hist_seq"]][::-1]  # type: ignore[attr-defined]
        ages = [float(a) for a in r["hist_seq_age"]][::-1]  # type: ignore[attr-defined]
        post = np.full(c.clusters, 1.0 / c.clusters)
        seen: list[int] = []
        for j, (i, age) in enumerate(zip(hist, ages, strict=True)):
            p_k = exposure_k * _sigmoid(
                base_k + c.repeat_effect * np.isin(np.arange(c.n_items), seen)
            )
            post = post * p_k[:, i] / p_k.sum(1)
            post /= post.sum()
            seen.append(i)
            gap = (age - ages[j + 1]) if j + 1 < len(ages) else age
            stay = (1.0 - c.drift) ** (gap * per_user_s)
            post = stay * post + (1.0 - stay) / c.clusters
        logit = base_k + c.repeat_effect * np.isin(np.arange(c.n_items), seen)
        out: np.ndarray = post @ (exposure_k * _sigmoid(logit))
        return out

    items = [f"i{i}" for i in range(c.n_items)]
    return World(LogExamples(rows, y, ts, true_p), clicks, propensity, items, history_propensity)


def attach_history(df: pd.DataFrame, length: int = HIST_LEN) -> list[list[tuple[str, float]]]:
    """Per impression row of ``df`` (``ts, user_id, item_id, click, click_ts``): the user's
    last ``length`` clicked items with their click times, most recent first, counting only
    clicks with ``click_ts < ts`` (point-in-time)."""
    order = np.argsort(df["ts"].to_numpy(), kind="stable")
    ts = df["ts"].to_numpy(dtype=np.float64)
    users = df["user_id"].astype(str).to_numpy()
    items = df["item_id"].astype(str).to_numpy()
    clicked = df["click"].to_numpy() > 0
    cts = df["click_ts"].to_numpy(dtype=np.float64) if "click_ts" in df else ts
    click_rows = np.flatnonzero(clicked)
    click_rows = click_rows[np.argsort(cts[click_rows], kind="stable")]
    recent: dict[str, deque[tuple[str, float]]] = {}
    out: list[list[tuple[str, float]]] = [[] for _ in range(len(df))]
    c = 0
    for r in order:
        while c < len(click_rows) and cts[click_rows[c]] < ts[r]:
            j = click_rows[c]
            recent.setdefault(users[j], deque(maxlen=length)).append((items[j], cts[j]))
            c += 1
        hist = recent.get(users[r])
        if hist:
            out[r] = list(reversed(hist))
    return out


def synthetic_log(n: int) -> LogExamples:
    """``logs.synthetic`` (no drift) with point-in-time ``hist_seq`` / ``hist_seq_age``."""
    df = generate(SyntheticConfig(n_impressions=n, n_users=2_000, n_items=1_000, drift_at=None))
    ex = log_examples(df)
    for row, hist, t in zip(ex.rows, attach_history(df), ex.ts, strict=True):
        row["hist_seq"] = [i for i, _ in hist]
        row["hist_seq_age"] = [float(t - c) for _, c in hist]
    return ex


def _ranker(flags: dict[str, bool]) -> TorchRanker:
    cfg = RankerConfig(
        model="dcnv2",
        device="cpu",
        sequence_attention=flags["sequence_attention"],
        pair_crosses=flags["pair_crosses"],
    )
    return TorchRanker(cfg, seed=0, online=False)


def ranker_ablation(ex: LogExamples) -> dict[str, Any]:
    half = len(ex) // 2
    out: dict[str, Any] = {}
    for name, flags in RANKERS.items():
        rep = evaluate(ex, _ranker(flags), batch_size=BATCH, progress=False)
        scores = rep.pop("scores")
        tp = None if ex.true_p is None else ex.true_p[half:]
        rep["tail"] = quality(scores[half:], ex.y[half:], tp)
        out[name] = rep
        print(
            f"  {name}: NE {rep['all']['normalized_entropy']:.4f} AUC {rep['all']['auc']:.4f}"
            f" tail NE {rep['tail']['normalized_entropy']:.4f} ({rep['examples_per_s']:.0f} ex/s)",
            flush=True,
        )
    return out


def throughput(ex: LogExamples, n: int) -> dict[str, Any]:
    """examples/s of score_and_learn and predict_proba_many, default vs no behaviour."""
    rows, y = ex.rows[:n], ex.y[:n]
    out: dict[str, Any] = {}
    for name in ("dcnv2_no_behaviour", "dcnv2_default"):
        ranker = _ranker(RANKERS[name])
        ranker.score_and_learn(rows[:BATCH], y[:BATCH])  # warm-up
        t = time.perf_counter()
        for s in range(0, n, BATCH):
            ranker.score_and_learn(rows[s : s + BATCH], y[s : s + BATCH])
        learn = n / (time.perf_counter() - t)
        t = time.perf_counter()
        for s in range(0, n, BATCH):
            ranker.predict_proba_many(rows[s : s + BATCH])
        predict = n / (time.perf_counter() - t)
        t = time.perf_counter()
        for s in range(0, n, BATCH):
            ranker.encoder.encode(rows[s : s + BATCH])
        encode = n / (time.perf_counter() - t)
        out[name] = {
            "score_and_learn_per_s": learn,
            "predict_per_s": predict,
            "encode_per_s": encode,
        }
    base, full = out["dcnv2_no_behaviour"], out["dcnv2_default"]
    out["cost"] = {
        "score_and_learn_slowdown": base["score_and_learn_per_s"] / full["score_and_learn_per_s"],
        "predict_slowdown": base["predict_per_s"] / full["predict_per_s"],
    }
    return out


def two_tower_recall(world: World, oracle_rows: int) -> dict[str, Any]:
    ex = world.examples
    split = int(0.8 * len(ex))
    test = [(n, u, i) for n, u, i, _ in world.clicks if n >= split]
    rows = [ex.rows[n] for n, _, _ in test]
    truth = [i for _, _, i in test]
    col = {item: c for c, item in enumerate(world.items)}
    out: dict[str, Any] = {"train_rows": split, "test_clicks": len(test)}
    for name, length in (("two_tower_behaviour", HIST_LEN), ("two_tower_id_only", 0)):
        model = TwoTowerModel(TwoTowerConfig(device="cpu", behaviour_len=length), seed=0)
        t = time.perf_counter()
        for s in range(0, split, BATCH):
            model.learn_many(ex.rows[s : min(s + BATCH, split)], ex.y[s : min(s + BATCH, split)])
        seconds = time.perf_counter() - t
        scores = model.user_vectors(rows) @ model.item_vectors(world.items).T
        top = np.argsort(-scores, axis=1)[:, :K]
        hits = [col[i] in set(t_) for i, t_ in zip(truth, top, strict=True)]
        out[name] = {"recall_at_10": float(np.mean(hits)), "train_seconds": seconds}
        print(f"  {name}: recall@10 {out[name]['recall_at_10']:.4f}", flush=True)
    train_clicks = Counter(i for n, _, i, _ in world.clicks if n < split)
    popular = {i for i, _ in train_clicks.most_common(K)}
    out["popularity"] = {"recall_at_10": float(np.mean([i in popular for i in truth]))}
    out["random"] = {"recall_at_10": K / len(world.items)}
    sample = test[:oracle_rows]
    oracle_hits = []
    for n, _, i in sample:
        top = np.argsort(-world.propensity(n))[:K]
        oracle_hits.append(col[i] in set(top))
    out["oracle"] = {"recall_at_10": float(np.mean(oracle_hits)), "test_clicks": len(sample)}
    for name in ("popularity", "random", "oracle"):
        print(f"  {name}: recall@10 {out[name]['recall_at_10']:.4f}", flush=True)
    return out


def main(quick: bool = False, *, results_dir: Path | None = None) -> dict[str, Any]:
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    wc = WorldConfig(n_impressions=40_000 if quick else 300_000)
    n_synth = 30_000 if quick else 200_000
    report: dict[str, Any] = {
        **stamp(NAME, quick),
        "machine": machine(),
        "world": dataclasses.asdict(wc),
        "notes": [
            "prequential, batch 1,024, offline lr (base_lr), torch threads 1",
            "hist_seq / hist_seq_age computed point-in-time in the bench (clicks before the "
            "impression), standing in for the feature stage",
        ],
    }
    print("history world ...", flush=True)
    world = history_world(wc)
    report["history_world"] = {
        "ctr": float(world.examples.y.mean()),
        "rows_with_history": float(np.mean([bool(r["hist_seq"]) for r in world.examples.rows])),
        "rankers": ranker_ablation(world.examples),
    }
    print("synthetic ...", flush=True)
    synth = synthetic_log(n_synth)
    report["synthetic"] = {
        "ctr": float(synth.y.mean()),
        "rows_with_history": float(np.mean([bool(r["hist_seq"]) for r in synth.rows])),
        "rankers": ranker_ablation(synth),
    }
    print("throughput ...", flush=True)
    report["throughput"] = throughput(world.examples, 8_192 if quick else 65_536)
    print("two-tower ...", flush=True)
    report["two_tower"] = two_tower_recall(world, 300 if quick else 2_000)
    report["wall_seconds"] = round(time.perf_counter() - t0, 1)
    write_report(report, results_path(results_dir, NAME, quick))
    print(table(report))
    return report


def _f(x: float | None, spec: str = ".4f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def table(report: dict[str, Any]) -> str:
    lines = [
        "| log | ranker | NE | AUC | ratio | tail NE | tail AUC | oracle NE | ex/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for log in ("history_world", "synthetic"):
        for name, rep in report[log]["rankers"].items():
            a, t = rep["all"], rep["tail"]
            lines.append(
                f"| {log} | {name} | {_f(a['normalized_entropy'])} | {_f(a['auc'])} | "
                f"{_f(a['calibration_ratio'], '.3f')} | {_f(t['normalized_entropy'])} | "
                f"{_f(t['auc'])} | {_f(a.get('oracle_normalized_entropy'))} | "
                f"{_f(rep['examples_per_s'], ',.0f')} |"
            )
    tp = report["throughput"]
    lines += [
        "",
        "| ranker | score_and_learn ex/s | predict ex/s | encode ex/s |",
        "|---|---|---|---|",
    ]
    for name in ("dcnv2_no_behaviour", "dcnv2_default"):
        r = tp[name]
        lines.append(
            f"| {name} | {_f(r['score_and_learn_per_s'], ',.0f')} | "
            f"{_f(r['predict_per_s'], ',.0f')} | {_f(r['encode_per_s'], ',.0f')} |"
        )
    lines += ["", "| retrieval (history world) | recall@10 |", "|---|---|"]
    for name in ("two_tower_behaviour", "two_tower_id_only", "popularity", "random", "oracle"):
        lines.append(f"| {name} | {_f(report['two_tower'][name]['recall_at_10'])} |")
    return "\n".join(lines)


def cli(argv: list[str] | None = None) -> int:
    return bench_cli(NAME, __doc__, "smoke sizes (< 1 min)", main, argv)


if __name__ == "__main__":
    raise SystemExit(cli())
