"""Where a worker's Python memory grows: its services in process, with tracemalloc.

Run ``python -m bench.memory_probe`` (150k impressions, about 8 minutes on 2 cores). No
broker: the worker's join, trainer and monitor services (shipped defaults: historical
features, fake negatives, the two-tower) are fed a synthetic log at 10 impressions per
second of event time, in event-time order, the way the agents drive them (labels taken
from the outbox and marked sent, the join ticked and its feature journal saved every 200
events). The join remembers labelled impressions for ``dedup_horizon_s`` (2 h) after
their 30-minute window, so its state is full after 2.5 h of event time (90k impressions):
the ``early`` snapshot is taken just after that, the ``late`` one at the end. What still
grows between them (by allocating source line) is what a soak would see as a slope.

Reported: RSS and tracemalloc's traced bytes every 10 % of the events, the sizes of the
bounded structures at both snapshots, and the 15 source lines whose live bytes grew most
between them. tracemalloc sees Python allocations only (not torch's tensors, not
RocksDB), and taking a snapshot itself raises RSS. Writes ``bench/results/memory_probe.json``.

Where tracemalloc names an allocation site shared by many owners (``json/decoder.py``:
everything parsed from a record), ``--holders`` counts, at each snapshot, who keeps those
objects (the holder's type and its own allocation site); ``--depth N`` records N frames
per allocation and reports the call stacks behind the largest growth (much slower).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
import tracemalloc
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from logs.events import TOPIC_CLICKS, TOPIC_IMPRESSIONS, Click, Impression, Watermark
from logs.synthetic import SyntheticConfig, generate
from monitoring.metrics import StreamrecMetrics
from stream.services import JoinService, MonitorService, TrainerService
from stream.settings import Settings

RESULTS = Path(__file__).parent / "results" / "memory_probe.json"
EVENT_RATE = 10.0  # impressions per second of event time (as bench.soak)


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    return float("nan")


def holders(site: str = "json/decoder.py", top: int = 12) -> list[dict[str, Any]]:
    """Who keeps the objects allocated at ``site``: for every object the garbage collector
    tracks, its direct referents that were allocated there, counted by the holder's type
    and the holder's own allocation site (a str inside a parsed dict is held by that dict,
    allocated at ``site`` too; the dict's holder is the next row). Slow: one pass over
    every object."""
    count: Counter[str] = Counter()
    size: Counter[str] = Counter()
    for obj in gc.get_objects():
        held = [
            r for r in gc.get_referents(obj)
            if (tb := tracemalloc.get_object_traceback(r)) is not None
            and tb[0].filename.endswith(site)
        ]  # fmt: skip
        if not held:
            continue
        tb = tracemalloc.get_object_traceback(obj)
        where = f"{tb[0].filename.rsplit('/', 2)[-1]}:{tb[0].lineno}" if tb else "untraced"
        owner = f"{type(obj).__module__}.{type(obj).__qualname__} (allocated at {where})"
        count[owner] += len(held)
        size[owner] += sum(sys.getsizeof(r) for r in held)
    return [{"holder": h, "objects": n, "mb": size[h] / 1e6} for h, n in count.most_common(top)]


def _events(n: int, seed: int) -> list[tuple[float, int, bytes]]:
    df = generate(SyntheticConfig(n_impressions=n, seed=seed, impressions_per_s=EVENT_RATE))
    cols = [c for c in df.columns if c.startswith(("ctx_", "item_", "user_"))]
    cols = [c for c in cols if c not in ("user_id", "item_id")]
    out: list[tuple[float, int, bytes]] = []
    for row in df.itertuples(index=False):
        feats: dict[str, str | float] = {}
        for c in cols:
            v = getattr(row, c)
            feats[c] = float(v) if isinstance(v, int | float | np.integer | np.floating) else str(v)
        imp = Impression(row.impression_id, float(row.ts), row.user_id, row.item_id,
                         position=int(row.position), features=feats)  # fmt: skip
        out.append((float(row.ts), 0, imp.to_json()))
        if int(row.click):
            out.append(
                (float(row.click_ts), 1, Click(row.impression_id, float(row.click_ts)).to_json())
            )
    out.sort(key=lambda e: (e[0], e[1]))
    return out


def run(
    n: int = 150_000, seed: int = 3, top: int = 15, depth: int = 1, census: bool = False
) -> dict[str, Any]:
    settings = Settings()
    events = _events(n, seed)
    join = JoinService(settings, StreamrecMetrics())
    trainer = TrainerService(settings, StreamrecMetrics())
    monitor = MonitorService(settings, StreamrecMetrics())
    offsets = [0, 0]

    def train(labels: list[Any]) -> None:
        trainer.add(labels)
        while (batch := trainer.step()) is not None:
            for msg in monitor.observe(batch):
                trainer.apply_control(msg)
                monitor.apply_control(msg)

    def flush() -> None:  # as JoinerAgents.timed_flush + flush_labeled
        join.tick()
        for partition, buf in join.take_ready(None).items():
            train(buf)
            join.sent(partition, buf)
        join.orphans.clear()
        join.save_features()
        join.state.flush()

    def sizes() -> dict[str, int]:
        tt = trainer.two_tower
        js = list(join.joiners.values())
        return {
            "join_state_entries": len(join.state),  # type: ignore[arg-type]
            "join_pending": sum(len(j.pending) for j in js),
            "join_done": sum(len(j.done) for j in js),
            "feature_state_bytes": sum(st.approx_bytes() for st in join.features.values()),
            "catalogue_users": len(trainer.catalogue.users),
            "catalogue_items": len(trainer.catalogue.items),
            "two_tower_items": 0 if tt is None else tt.n_remembered,
        }

    early_at = int(len(events) * 0.62)  # 2.6 h of event time: the join's state is full
    trace: list[dict[str, float]] = []
    snaps: dict[str, Any] = {}
    marks: dict[str, dict[str, Any]] = {}
    t0 = time.time()
    tracemalloc.start(depth)
    for i, (ts, which, payload) in enumerate(events):
        topic = TOPIC_CLICKS if which else TOPIC_IMPRESSIONS
        join.handle_record(payload, topic, 0, offsets[which])
        offsets[which] += 1
        if i % 200 == 199:
            for w, t in enumerate((TOPIC_IMPRESSIONS, TOPIC_CLICKS)):
                join.handle_record(Watermark(ts).to_json(), t, 0, offsets[w])
                offsets[w] += 1
            flush()
        if i % max(1, len(events) // 10) == 0:
            traced = tracemalloc.get_traced_memory()[0] / 1e6
            hours = (ts - events[0][0]) / 3600
            row = {"events": i, "event_hours": hours, "seconds": time.time() - t0,
                   "rss_mb": rss_mb(), "traced_mb": traced}  # fmt: skip
            trace.append(row)
            print(f"  {i:,} events ({hours:.1f} h of event time): RSS {row['rss_mb']:.0f} MB,"
                  f" traced {traced:.0f} MB", flush=True)  # fmt: skip
        if i in (early_at, len(events) - 1):
            name = "early" if i == early_at else "late"
            flush()
            gc.collect()
            traced = tracemalloc.get_traced_memory()[0] / 1e6
            marks[name] = {"events": i, "rss_mb": rss_mb(), "traced_mb": traced, **sizes()}
            snaps[name] = tracemalloc.take_snapshot()
            print(f"{name}: {marks[name]}", flush=True)
            if census:
                marks[name]["json_holders"] = holders()
                for h in marks[name]["json_holders"]:
                    print(f"  {h['objects']:9,d} parsed-JSON objects ({h['mb']:.1f} MB) held by "
                          f"{h['holder']}", flush=True)  # fmt: skip
    diff = snaps["late"].compare_to(snaps["early"], "lineno")
    growth = [
        {"where": str(s.traceback[0]), "mb": s.size_diff / 1e6, "blocks": s.count_diff}
        for s in diff[:top]
    ]
    stacks = []
    if depth > 1:  # the call stacks behind the largest growth (who keeps what)
        for s in snaps["late"].compare_to(snaps["early"], "traceback")[:top]:
            frames = [f"{f.filename}:{f.lineno}" for f in s.traceback]
            stacks.append({"mb": s.size_diff / 1e6, "blocks": s.count_diff, "stack": frames})
    per_k = 1e3 / max(1, marks["late"]["events"] - marks["early"]["events"])
    return {
        "benchmark": "memory_probe",
        "command": f"python -m bench.memory_probe --n {n} --depth {depth}"
        + (" --holders" if census else ""),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "impressions": n,
        "event_rate_per_s": EVENT_RATE,
        "trace": trace,
        "marks": marks,
        "after_full_state": {
            "traced_mb_per_1k_events": (marks["late"]["traced_mb"] - marks["early"]["traced_mb"])
            * per_k,
            "rss_mb_per_1k_events": (marks["late"]["rss_mb"] - marks["early"]["rss_mb"]) * per_k,
        },  # fmt: skip
        "top_growth": growth,
        "traceback_depth": depth,
        "top_growth_stacks": stacks,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.memory_probe", description=__doc__)
    p.add_argument("--n", type=int, default=150_000, help="impressions")
    p.add_argument("--depth", type=int, default=1,
                   help="frames kept per allocation; > 1 also reports the stacks behind the "
                   "largest growth (slower)")  # fmt: skip
    p.add_argument("--holders", action="store_true",
                   help="at each snapshot, count who keeps the objects parsed from JSON "
                   "(one slow pass over every object)")  # fmt: skip
    p.add_argument("--results", type=Path, default=RESULTS)
    a = p.parse_args(argv)
    report = run(a.n, depth=a.depth, census=a.holders)
    a.results.parent.mkdir(parents=True, exist_ok=True)
    a.results.write_text(json.dumps(report, indent=2, default=float))
    print("growth after the join's state is full:", report["after_full_state"])
    for g in report["top_growth"]:
        print(f"  {g['mb']:+7.1f} MB {g['blocks']:+9d} blocks  {g['where']}")
    for st in report["top_growth_stacks"]:
        print(f"  {st['mb']:+7.1f} MB {st['blocks']:+9d} blocks, most recent call last:")
        for frame in st["stack"]:
            print(f"      {frame}")
    print(f"wrote {a.results}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
