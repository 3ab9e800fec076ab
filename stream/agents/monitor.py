"""The monitor: ``scored`` → :class:`stream.services.MonitorService` → ``control``
(drift alarms, calibrators); and the worker's once-a-second gauges."""

from __future__ import annotations

import math
import time
from typing import Any

import faust
import numpy as np

from logs.batches import ScoredBatch
from logs.events import InvalidEvent
from stream.agents.outputs import Outputs
from stream.agents.runtime import Runtime
from stream.services import SeenKeys

__all__ = ["STATE_COUNT_EVERY_S", "Gauges", "MonitorAgent"]

#: Seconds between two counts of the join-state table for its gauge (a RocksDB store
#: counts by iterating its keys: every second it took ~4% of a busy worker).
STATE_COUNT_EVERY_S = 15.0


class MonitorAgent:
    """The ``monitor`` agent: every scored batch once (a repeated one, e.g. re-sent after
    a crash, is counted and skipped), its control messages sent on."""

    def __init__(self, app: faust.App, rt: Runtime, out: Outputs) -> None:
        self.app, self.rt, self.out = app, rt, out
        self.seen = SeenKeys(100_000)

    def install(self) -> None:
        async def monitor(stream: faust.StreamT[bytes]) -> None:
            await self.run(stream)

        self.app.agent(self.out.scored, name="monitor")(monitor)

    async def run(self, stream: faust.StreamT[bytes]) -> None:
        async for event in stream.events():
            try:
                await self.observe(event)
            except Exception as exc:  # e.g. unhashable ids, a failed send: never exit
                self.out.stage_error("monitor", self.out.where(event))
                await self.out.dead_letter(event, InvalidEvent("processing_error", repr(exc)))

    async def observe(self, event: Any) -> None:
        try:
            batch = ScoredBatch.decode(event.value)
        except InvalidEvent as exc:
            await self.out.dead_letter(event, exc)
            return
        ids = batch.impression_ids
        if ids and not self.seen.first_time((ids[0], ids[-1], len(ids), batch.label[0],
                                             batch.model_version)):  # fmt: skip
            self.rt.metrics.duplicate_examples.labels(stage="monitor").inc(len(ids))
            return
        for record in self.rt.monitor.observe(batch):
            await self.out.announce(record)


class Gauges:
    """The gauges a timer sets every second: rejected encoder fields, the hard-negative
    pools' age, the monitor's numbers, the join's state (counted every
    :data:`STATE_COUNT_EVERY_S`)."""

    def __init__(self, app: faust.App, rt: Runtime, out: Outputs) -> None:
        self.app, self.rt, self.out = app, rt, out
        self.fields_counted = {"serving": 0, "stream": 0}
        self.state_counted_at = -math.inf

    def install(self) -> None:
        async def gauges() -> None:
            try:
                self.update()
            except Exception:
                self.out.stage_error("gauges", "a gauge update")

        self.app.timer(interval=1.0)(gauges)

    def count_rejected_fields(self) -> None:
        """Encoder fields given no slot since the last call: unknown at inference (serving)
        or not admitted from the stream, over the ranker's and the two towers' encoders."""
        rt = self.rt
        tt = rt.trainer.two_tower
        encoders = [rt.trainer.ranker.encoder]
        if tt is not None:
            encoders += [tt.user_encoder, tt.item_encoder]
        totals = {"serving": sum(e.n_unknown_fields for e in encoders),
                  "stream": sum(e.n_rejected_fields for e in encoders)}  # fmt: skip
        for where, n in totals.items():
            if n > self.fields_counted[where]:
                rt.metrics.fields_rejected.labels(where=where).inc(n - self.fields_counted[where])
            self.fields_counted[where] = n  # a swapped-in model starts its own counts

    def update(self) -> None:
        rt = self.rt
        self.count_rejected_fields()
        age = rt.indexer.pool.age(time.time())
        if np.isfinite(age):
            rt.metrics.hard_negative_pool_age_seconds.set(age)
        rt.monitor.publish()
        rt.join.update_gauges()
        now = time.monotonic()
        if now - self.state_counted_at >= STATE_COUNT_EVERY_S:  # a RocksDB count scans keys
            self.state_counted_at = now
            rt.metrics.join_state_entries.set(len(rt.join.state))  # type: ignore[arg-type]
