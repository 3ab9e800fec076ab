"""The feature follower task: ``impressions`` + ``clicks`` (every partition, outside any
consumer group) → :class:`stream.services.FeatureFollower`, on workers that serve
without joining (``serve`` and ``trainer`` roles), and its gauges."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import faust

from logs.events import TOPIC_CLICKS, TOPIC_IMPRESSIONS
from monitoring.metrics import StreamrecMetrics
from stream.agents.outputs import Outputs
from stream.services.follower import FeatureFollower
from stream.settings import Settings

__all__ = ["FOLLOW_BATCH", "FeatureFollowerAgent"]

log = logging.getLogger(__name__)

#: records per fetch at most: the stage runs on the event loop, so a long backlog is
#: applied in slices with the loop free for /recommend in between
FOLLOW_BATCH = 500


class FeatureFollowerAgent:
    """Reads the input topics with a group-less consumer from ``feature_follow_from`` and
    applies every record to the follower; sets the follower's gauges after each fetch."""

    def __init__(
        self,
        app: faust.App | None,
        settings: Settings,
        metrics: StreamrecMetrics,
        follower: FeatureFollower,
        out: Outputs | None = None,
    ) -> None:
        self.app, self.settings, self.metrics = app, settings, metrics
        self.follower, self.out = follower, out
        self.consumer: Any = None
        self._skipped_reported: dict[str, int] = {}
        self._events_reported = 0

    def install(self) -> None:
        assert self.app is not None

        async def feature_follower() -> None:
            await self.run()

        self.app.task(feature_follower)

    async def start(self) -> None:
        """Create the consumer and assign every input partition at the start position."""
        from aiokafka import AIOKafkaConsumer, TopicPartition

        s = self.settings
        consumer = AIOKafkaConsumer(
            bootstrap_servers=s.bootstrap.split(","),
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset=s.feature_follow_from,
            max_partition_fetch_bytes=max(s.max_message_bytes, 1024**2),
            fetch_max_wait_ms=int(s.fetch_max_wait_s * 1000),
            **s.kafka_client_options(),
        )
        await consumer.start()
        tps = [
            TopicPartition(topic, p)
            for topic in (TOPIC_IMPRESSIONS, TOPIC_CLICKS)
            for p in range(s.partitions)
        ]
        consumer.assign(tps)
        if s.feature_follow_from == "earliest":
            await consumer.seek_to_beginning()
        else:
            await consumer.seek_to_end()
        self.consumer = consumer

    async def stop(self) -> None:
        if self.consumer is not None:
            await self.consumer.stop()
            self.consumer = None

    async def poll_once(self, timeout_ms: int = 500) -> int:
        """One fetch applied to the follower (records of one partition in offset order);
        returns the records read. A failed fetch is counted and returns 0."""
        try:
            batches = await self.consumer.getmany(timeout_ms=timeout_ms, max_records=FOLLOW_BATCH)
        except Exception:  # e.g. a broker hiccup: the task must not end the worker
            if self.out is not None:
                self.out.stage_error("feature_follower", "a fetch of the inputs")
            else:
                log.exception("feature follower: fetch failed")
            await asyncio.sleep(1.0)
            return 0
        n = 0
        f = self.follower
        for tp, records in batches.items():
            for r in records:
                f.apply_record(r.value, tp.topic, tp.partition, r.offset)
                n += 1
        self.update_gauges()
        return n

    async def run(self) -> None:
        await self.start()
        try:
            while True:
                if await self.poll_once():
                    await asyncio.sleep(0)  # let requests in between slices of a backlog
        finally:
            await self.stop()

    def lags(self) -> dict[tuple[str, int], int]:
        """Records not read yet per (topic, partition), from the last fetch's highwater."""
        from aiokafka import TopicPartition

        out: dict[tuple[str, int], int] = {}
        if self.consumer is None:
            return out
        for (topic, p), pos in self.follower.positions.items():
            high = self.consumer.highwater(TopicPartition(topic, p))
            if high is not None:
                out[(topic, p)] = max(0, int(high) - pos)
        return out

    def update_gauges(self) -> None:
        f, m = self.follower, self.metrics
        st = f.staleness_s()
        if st != float("inf"):
            m.feature_follower_staleness_seconds.set(st)
        m.feature_follower_state_bytes.set(f.approx_bytes())
        if f.n_events > self._events_reported:
            m.feature_follower_events.inc(f.n_events - self._events_reported)
            self._events_reported = f.n_events
        for reason, n in f.skipped.items():
            new = n - self._skipped_reported.get(reason, 0)
            if new > 0:
                m.feature_follower_skipped.labels(reason=reason).inc(new)
                self._skipped_reported[reason] = n
        for (topic, p), lag in self.lags().items():
            m.feature_follower_lag_records.labels(topic=topic, partition=str(p)).set(lag)
