"""Phase 1 of :mod:`bench.e2e`: the producer alone and plain consumers.

:func:`producer_alone` replays a log into an embedded broker with no worker (the
producer's own rate and CPU seconds), then reads back what it wrote with a plain aiokafka
consumer, once raw and once parsing every record (:func:`logs.events.parse_input` or the
binary envelope): the ceilings the pipeline phases of :mod:`bench.e2e` are compared with.
Rates are records (or impressions) per second of wall time.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from bench.workers import FINAL_GAP_S, self_cpu_seconds
from logs.events import TOPIC_CLICKS, TOPIC_IMPRESSIONS, parse_input
from stream.app import topic_plan
from stream.broker import EmbeddedBroker, create_topics
from stream.envelope import decode_envelope, is_envelope
from stream.replay import replay
from stream.settings import Settings

__all__ = ["producer_alone"]


async def _consume(bootstrap: str, expected: int, parse: bool) -> dict[str, Any]:
    """Read ``impressions`` and ``clicks`` from the beginning with a plain aiokafka consumer
    (no group) until ``expected`` records arrived (not up to ``end_offsets()``: Tansu
    0.6.0 under-reports it, see :func:`stream.broker.read_records`)."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False
    )
    await consumer.start()
    try:
        parts = [
            TopicPartition(t, p)
            for t in (TOPIC_IMPRESSIONS, TOPIC_CLICKS)
            for p in sorted(consumer.partitions_for_topic(t) or ())
        ]
        consumer.assign(parts)
        await consumer.seek_to_beginning(*parts)
        n = 0
        t0 = time.perf_counter()
        deadline = time.monotonic() + 300
        while n < expected and time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=200, max_records=5000)
            for tp, records in batches.items():
                n += len(records)
                if parse:
                    for r in records:
                        try:
                            if is_envelope(r.value):
                                decode_envelope(r.value, tp.topic)
                            else:
                                parse_input(r.value, tp.topic)
                        except ValueError:
                            pass
        seconds = time.perf_counter() - t0
    finally:
        await consumer.stop()
    return {"records": n, "seconds": seconds, "records_per_s": n / seconds}


def producer_alone(log_path: Path, run_dir: Path, fmt: str = "envelope") -> dict[str, Any]:
    """Replay into a broker with no worker, then the plain consumers of what it wrote."""
    with EmbeddedBroker(log_path=run_dir / f"tansu-producer-{fmt}.log") as broker:
        settings = Settings(broker=broker.url)
        create_topics(broker.url, topic_plan(settings))
        cpu0 = self_cpu_seconds()
        stats = replay(
            log_path, broker.url, progress=False, final_watermark_gap_s=FINAL_GAP_S, fmt=fmt
        )
        cpu = self_cpu_seconds() - cpu0
        records = stats.records
        raw = asyncio.run(_consume(broker.url, records, parse=False))
        parsed = asyncio.run(_consume(broker.url, records, parse=True))
    events = stats.impressions + stats.clicks
    return {
        "format": fmt,
        "impressions": stats.impressions,
        "clicks": stats.clicks,
        "records": records,
        "seconds": stats.seconds,
        "records_per_s": records / stats.seconds,
        "events_per_s": events / stats.seconds,
        "impressions_per_s": stats.impressions / stats.seconds,
        "producer_cpu_s": cpu,
        "raw_consume": {**raw, "impressions_per_s": stats.impressions / raw["seconds"]},
        "consume_parse": {**parsed, "impressions_per_s": stats.impressions / parsed["seconds"]},
    }
