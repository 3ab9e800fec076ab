"""Feature stage benchmark: throughput, bytes per key, and the cost of partitioning.

* **Throughput** in process: :class:`features.stage.FeatureStage` over a synthetic event
  stream (users Zipf-ish, items Zipf, one ``item_*`` attribute, positions 1..3, 5% clicks
  arriving 0..60 s after their impression, event times jittered by up to 5 s), all
  features on, as impressions (and their clicks) per second through ``process``; and the
  read-only ``peek`` (serving) per second. One process, one core. And on two cores: the
  stream split by user over two processes (as two workers of one group own their
  partitions), each part through its own stage at once.
* **Memory**: bytes per user, item and user x item key (tracemalloc, a stage holding
  only that kind of key), and the projection for 1M users x 10k items.
* **Partitions**: the worker keys impressions and clicks by ``user_id``, so per-user
  features are exact within a partition but item-level counts (item, item x position)
  see only that partition's sample of the item's traffic. For 1, 4 and 16 partitions
  (Kafka's murmur2 partition of the user id) the mean absolute error of the item-level
  ``hist_*`` values (log1p counts, CTRs) against one stage over the whole stream (the
  exact value), and that user-level features are identical.

``python -m bench.features [--quick]`` writes ``bench/results/features.json``.
"""

from __future__ import annotations

import gc
import math
import os
import time
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np

from bench.run import bench_cli, machine, results_path, stamp, write_report
from features.config import ClickEvent, FeatureConfig, ImpressionEvent
from features.kernel import APPLY, CLICK, run_events
from features.records import KeyTable
from features.stage import FeatureStage
from stream.producer import partition_of

NAME = "features"


def event_stream(n: int, n_users: int, n_items: int, seed: int = 0) -> list[Any]:
    """Impressions (and 5% clicks) in arrival order (see the module docstring)."""
    rng = np.random.default_rng(seed)
    users = (rng.zipf(1.3, n) - 1) % n_users
    items = (rng.zipf(1.2, n) - 1) % n_items
    pos = rng.integers(1, 4, n)
    ts = 1_700_000_000.0 + np.arange(n) * 0.01 + rng.uniform(0, 5, n)
    clicked = rng.random(n) < 0.05
    delay = rng.uniform(0, 60, n)
    out: list[tuple[float, int, Any]] = []
    for k in range(n):
        t = float(ts[k])
        imp = ImpressionEvent(
            f"m{k}",
            t,
            f"u{users[k]}",
            f"i{items[k]}",
            int(pos[k]),
            {"item_cat": f"c{items[k] % 50}", "dev": "ios"},
        )
        out.append((float(1_700_000_000.0 + k * 0.01), 0, imp))
        if clicked[k]:
            ct = t + float(delay[k])
            out.append((ct, 1, ClickEvent(f"m{k}", ct, f"u{users[k]}")))
    out.sort(key=lambda x: (x[0], x[1]))
    return [e for _, _, e in out]


def throughput(events: list[Any], repeats: int) -> dict[str, float]:
    n_imp = sum(1 for e in events if isinstance(e, ImpressionEvent))
    best = 0.0
    stage = FeatureStage()
    for _ in range(repeats):
        stage = FeatureStage()
        t0 = time.perf_counter()
        stage.process(events)
        best = max(best, n_imp / (time.perf_counter() - t0))
    imps = [e for e in events if isinstance(e, ImpressionEvent)][:20_000]
    t0 = time.perf_counter()
    for e in imps:
        stage.peek(e.ts, e.user_id, e.item_id, e.position, e.features)
    peek = len(imps) / (time.perf_counter() - t0)
    return {
        "impressions": float(n_imp),
        "events": float(len(events)),
        "impressions_per_s": best,
        "peek_per_s": peek,
        "approximate": float(stage.stats["approximate"]),
    }


_PARTS: list[list[Any]] = []  # the events of each process of two_processes (fork)


def _run_part(k: int) -> tuple[int, float]:
    """Child of :func:`two_processes`: impressions of part ``k`` and its seconds."""
    events = _PARTS[k]
    stage = FeatureStage()
    t0 = time.perf_counter()
    stage.process(events)
    return sum(1 for e in events if isinstance(e, ImpressionEvent)), time.perf_counter() - t0


def two_processes(events: list[Any], repeats: int) -> dict[str, float]:
    """The stream split by user (Kafka's murmur2 of the user id over 2 partitions, as two
    workers of one group would own them), one stage per part, in two processes at once
    (fork; one core each on a 2-core machine): impressions/s over the slower part's time
    (best of ``repeats``) and the sum of the parts' own rates."""
    import multiprocessing

    _PARTS[:] = [[], []]
    for e in events:
        _PARTS[partition_of(str(e.user_id).encode(), 2)].append(e)
    best_wall = best_sum = 0.0
    ctx = multiprocessing.get_context("fork")
    for _ in range(repeats):
        with ctx.Pool(2) as pool:
            got = pool.map(_run_part, [0, 1])
        n = sum(g[0] for g in got)
        best_wall = max(best_wall, n / max(g[1] for g in got))
        best_sum = max(best_sum, sum(g[0] / g[1] for g in got))
    _PARTS.clear()
    return {"impressions_per_s": best_wall, "sum_of_parts_per_s": best_sum}


def bytes_per_key(n: int) -> dict[str, float]:
    """tracemalloc bytes per tracked key of each kind (3 events per key: two impressions
    and a click), counted the way the stage keeps them: a slot in a
    :class:`features.records.KeyTable` (its array rows, including the spare capacity its
    doubling leaves, and its dict entry) written by the compiled kernel; and the bytes of a
    full click sequence per user (through the stage's public calls)."""
    out: dict[str, float] = {}
    cfg = FeatureConfig(sequence=False)
    rates = np.array([math.log(2.0) / h for h in cfg.half_lives_s])
    params = np.array([cfg.lateness_s, cfg.ttl_s, cfg.ctr_prior * cfg.ctr_strength,
                       cfg.ctr_strength, cfg.ctr_prior])  # fmt: skip
    for kind in ("user", "item", "pair"):
        gc.collect()
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        kt = KeyTable(len(cfg.half_lives_s), cfg.max_buffer)
        keys = {
            "user": (f"u\x1fu{k}" for k in range(n)),
            "item": (f"i\x1fi{k}" for k in range(n)),
            "pair": (f"p\x1fu{k}\x1fi{k}" for k in range(n)),
        }[kind]
        slots = [kt.slot(key) for key in keys]
        used = tracemalloc.get_traced_memory()[0] - before
        tracemalloc.stop()
        # the kernel writes the records in place (no new memory): 3 events per key
        m = 3 * n
        ev_slots = np.full((m, 4 + cfg.max_attributes), -2, dtype=np.int64)
        ev_slots[:, 0] = np.repeat(slots, 3)
        kinds = np.tile(np.array([APPLY, APPLY, CLICK], dtype=np.int8), n)
        ts = 1_700_000_000.0 + np.arange(m, dtype=np.float64)
        stats = np.zeros(2, dtype=np.int64)
        run_events(kt.F, kt.B, kt.BL, kinds, ts, ev_slots, rates, params, cfg.max_buffer,
                   np.empty((m, 1)), stats, 0)  # fmt: skip
        assert len(kt) == n and kt.BL[slots[0]] == 3
        out[kind] = used / n
        del kt, slots
    # a click sequence of seq_keep clicks for one user: the same calls with the sequence
    # on and off, the difference
    used_by: dict[bool, int] = {}
    for sequence in (True, False):
        gc.collect()
        tracemalloc.start()
        stage = FeatureStage(FeatureConfig(sequence=sequence))
        before = tracemalloc.get_traced_memory()[0]
        for k in range(n // 10):
            for j in range(stage.config.seq_keep):
                iid = f"m{k}_{j}"
                stage.impression(iid, 1_700_000_000.0 + j, f"u{k}", f"i{j}")
                stage.click(iid, 1_700_000_000.5 + j)
        gc.collect()
        used_by[sequence] = tracemalloc.get_traced_memory()[0] - before
        tracemalloc.stop()
        del stage
    used = used_by[True] - used_by[False]
    out["sequence_full"] = used / (n // 10)
    return out


def partitions(events: list[Any], counts: tuple[int, ...]) -> list[dict[str, Any]]:
    exact = FeatureStage().process(events)
    imp_idx = [k for k, e in enumerate(events) if isinstance(e, ImpressionEvent)]
    item_names = [n for n in exact[imp_idx[-1]] or {} if n.startswith("hist_item_")]
    user_names = [n for n in exact[imp_idx[-1]] or {} if n.startswith(("hist_user_", "hist_ui_"))]
    out = []
    for p in counts:
        stages = [FeatureStage() for _ in range(p)]
        got: list[dict[str, object] | None] = [None] * len(events)
        for k, e in enumerate(events):
            part = partition_of(str(e.user_id).encode(), p)
            got[k] = stages[part].process([e])[0]
        err: dict[str, float] = {}
        for name in item_names:
            diffs = [
                abs(float(got[k][name]) - float(exact[k][name]))  # type: ignore[index,arg-type]
                for k in imp_idx
                if exact[k] is not None and name in exact[k]  # type: ignore[operator]
            ]
            err[name] = float(np.mean(diffs))
        user_equal = all(
            got[k] is not None and all(got[k].get(n) == exact[k].get(n) for n in user_names)  # type: ignore[union-attr]
            for k in imp_idx
        )
        out.append(
            {
                "partitions": p,
                "item_mae": err,
                "item_mae_mean": float(np.mean(list(err.values()))) if err else 0.0,
                "user_features_identical": bool(user_equal),
            }
        )
    return out


def main(quick: bool = False, *, results_dir: Path | None = None) -> dict[str, Any]:
    n = 50_000 if quick else 300_000
    events = event_stream(n, n_users=20_000, n_items=2_000)
    report: dict[str, Any] = stamp(NAME, quick)
    report["machine"] = machine()
    report["load_1min_before"] = os.getloadavg()[0]  # the machine is shared
    report["throughput"] = throughput(events, repeats=1 if quick else 3)
    report["load_1min_after_throughput"] = os.getloadavg()[0]
    report["two_processes"] = two_processes(events, repeats=1 if quick else 3)
    report["load_1min_after_two_processes"] = os.getloadavg()[0]
    per_key = bytes_per_key(5_000 if quick else 20_000)
    report["bytes_per_key"] = per_key
    report["projection_1M_users_10k_items"] = {
        "users": 1_000_000,
        "items": 10_000,
        "pairs_assumed": 20_000_000,
        "bytes": per_key["user"] * 1e6 + per_key["item"] * 1e4 + per_key["pair"] * 2e7,
        "note": "20 distinct items per user kept within the TTL; user x attribute and "
        "item x position keys cost as much as a pair key each",
    }
    report["partitions"] = partitions(events[: 30_000 if quick else 100_000], (1, 4, 16))
    write_report(report, results_path(results_dir, NAME, quick))
    return report


def table(report: dict[str, Any]) -> str:
    t = report["throughput"]
    b = report["bytes_per_key"]
    lines = [
        f"In process (one core): {t['impressions_per_s']:,.0f} impressions/s through "
        f"`process` ({t['impressions']:,.0f} impressions, {t['events']:,.0f} events, all "
        f"features), {t['peek_per_s']:,.0f} `peek`/s (serving, read-only). Two "
        f"processes (split by user): {report['two_processes']['impressions_per_s']:,.0f} "
        "impressions/s over the slower part's time.",
        "",
        f"Bytes per key: user {b['user']:.0f}, item {b['item']:.0f}, user x item "
        f"{b['pair']:.0f}; a full click sequence {b['sequence_full']:.0f}. "
        f"1M users x 10k items (20M pairs): "
        f"{report['projection_1M_users_10k_items']['bytes'] / 1e9:.1f} GB.",
        "",
        "| partitions | item-level MAE (log1p / CTR, mean over features) | user features exact |",
        "|---|---|---|",
    ]
    for r in report["partitions"]:
        lines.append(
            f"| {r['partitions']} | {r['item_mae_mean']:.4f} | "
            f"{'yes' if r['user_features_identical'] else 'NO'} |"
        )
    return "\n".join(lines)


def cli(argv: list[str] | None = None) -> int:
    return bench_cli(NAME, __doc__, "50k impressions", main, argv)


if __name__ == "__main__":
    raise SystemExit(cli())
