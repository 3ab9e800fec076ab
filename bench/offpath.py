"""How long checkpointing and model-store publishing hold the trainer (the trainer lock,
and the event loop for a checkpoint): the default model config, a few micro-batches, then
each write timed whole and, split, its snapshot (what holds the lock) and its write (on
the writer thread).

    python -m bench.offpath [--batches 4] [--repeat 3]

Then the same through :class:`stream.agents.TrainerAgents` (topics faked, the default
``trainer.offload``): with a checkpoint and a store version due, how long
``train_due`` holds the trainer lock, and the longest the event loop went without
running a 1 ms heartbeat until both were written (and the version announced).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TypeVar

from logs.events import Impression, LabeledExample
from modelstore.store import StoreConfig
from monitoring.metrics import StreamrecMetrics
from stream.services import IndexerService, TrainerService
from stream.settings import Settings, TrainerConfig

T0 = 1_700_000_000.0
R = TypeVar("R")


def _timed(fn: Callable[[], R], repeat: int) -> tuple[float, R]:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


class _Topic:
    async def send(self, key: bytes | None = None, value: bytes = b"") -> None:
        return None


def agent_stall(trainer: TrainerService, settings: Settings, repeat: int) -> None:
    """Lock hold and event-loop stall of a due checkpoint + store version, in the agent."""
    import asyncio

    import faust

    from stream.agents import Outputs, TrainerAgents
    from stream.agents.runtime import Runtime
    from stream.services import JoinService, MonitorService

    metrics = trainer.metrics
    app = faust.App("offpath-bench", broker="kafka://127.0.0.1:1", web_enabled=False)
    indexer = IndexerService(settings, metrics)
    rt = Runtime(settings=settings, metrics=metrics, join=JoinService(settings, metrics),
                 trainer=trainer, monitor=MonitorService(settings, metrics),
                 indexer=indexer)  # fmt: skip
    out = Outputs(app, metrics, settings.max_message_bytes)
    for name in ("labeled", "scored", "control", "dead"):
        setattr(out, name, _Topic())
    agents = TrainerAgents(app, rt, out)
    imps = [Impression(f"s{k}", T0 + k, f"u{k % 97}", f"x{k % 301}", position=1)
            for k in range(256 * repeat)]  # fmt: skip
    holds, stalls, totals = [], [], []

    async def go() -> None:
        for r in range(repeat):
            trainer.add([LabeledExample(m, k % 7 == 0, m.ts + 1) for k, m in
                         enumerate(imps[256 * r : 256 * (r + 1)])])  # fmt: skip
            trainer.step()  # outside the measure: the models changed, both writes are due
            gaps: list[float] = []
            done = asyncio.Event()

            async def beat(gaps: list[float], done: asyncio.Event) -> None:
                while not done.is_set():
                    t = time.perf_counter()
                    await asyncio.sleep(0.001)
                    gaps.append(time.perf_counter() - t - 0.001)

            hb = asyncio.create_task(beat(gaps, done))
            await asyncio.sleep(0.01)
            t0 = time.perf_counter()
            await agents.train_due()
            holds.append(time.perf_counter() - t0)
            drain = getattr(agents, "drain", None)
            if drain is not None:
                await drain()
            totals.append(time.perf_counter() - t0)
            done.set()
            await hb
            stalls.append(max(gaps))

    asyncio.run(go())
    med = statistics.median
    print(f"agent: lock held {med(holds) * 1000:.1f} ms, event loop stalled at most "
          f"{med(stalls) * 1000:.1f} ms, written in {med(totals) * 1000:.1f} ms "
          f"(medians of {repeat}; max stall {max(stalls) * 1000:.1f} ms)")  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="offpath-"))
    settings = Settings(
        role="trainer",
        model_store=str(root / "store"),
        trainer=TrainerConfig(checkpoint_dir=str(root / "ckpt"), batch_size=256),
    )
    trainer = TrainerService(settings, StreamrecMetrics())
    n = 256 * args.batches
    imps = [Impression(f"i{k}", T0 + k, f"u{k % 97}", f"x{k % 301}", position=1 + k % 5)
            for k in range(n)]  # fmt: skip
    trainer.add([LabeledExample(m, k % 7 == 0, m.ts + 1) for k, m in enumerate(imps)])
    while trainer.step() is not None:
        pass
    indexer = IndexerService(settings, StreamrecMetrics())
    indexer.refresh(trainer.ranker, trainer.catalogue, trainer.two_tower)
    index = indexer.holder.current
    rows: list[tuple[str, float]] = []
    t, _ = _timed(lambda: trainer.maybe_checkpoint(force=True), args.repeat)
    rows.append(("checkpoint, whole (snapshot + write)", t))
    t, _ = _timed(lambda: trainer.publish(index), args.repeat)
    rows.append(("publish, whole (snapshot + write)", t))
    if hasattr(trainer, "checkpoint_snapshot"):  # split: snapshot then write, alternated
        times: dict[str, list[float]] = {}

        def lap(name: str, fn: Callable[[], R]) -> R:
            t0 = time.perf_counter()
            out = fn()
            times.setdefault(name, []).append(time.perf_counter() - t0)
            return out

        for _ in range(args.repeat):
            job = lap("checkpoint snapshot (lock held)", trainer.checkpoint_snapshot)
            assert job is not None
            lap("checkpoint write (writer thread)", partial(trainer.write_checkpoint, job))
            pub = lap("publish snapshot (lock held)", lambda: trainer.publish_snapshot(index))
            assert pub is not None
            lap("publish write (writer thread)", partial(trainer.write_publish, pub))
        rows += [(name, statistics.median(ts)) for name, ts in times.items()]
    for name, t in rows:
        print(f"{name:40s} {t * 1000:9.1f} ms (median of {args.repeat})")
    sizes = sorted(p.stat().st_size for p in (root / "ckpt").glob("*.pt"))
    newest = sorted((root / "store").glob("v*"))[-1]
    version_mb = sum(p.stat().st_size for p in newest.iterdir()) / 1e6
    print(f"checkpoint file {sizes[-1] / 1e6:.1f} MB; store version {version_mb:.1f} MB")
    settings = Settings(
        role="trainer",
        model_store=str(root / "store"),
        store=StoreConfig(publish_every_s=1e-9),
        trainer=TrainerConfig(
            checkpoint_dir=str(root / "ckpt"), checkpoint_every_s=0.0, batch_size=256
        ),  # fmt: skip
    )
    trainer.settings = settings  # the same models and store, both writes due at once
    agent_stall(trainer, settings, args.repeat)
    trainer.close()


if __name__ == "__main__":
    main()
