"""The Faust app: thin agents over the services in :mod:`stream.services`.

``create_app(settings)`` builds a fresh app (no module-level app, nothing at import time).
Agents receive raw bytes, so that a malformed record reaches ``dead-letter`` with a
reason instead of dying in a deserialiser.

Delivery: at-least-once (Faust's default processing guarantee). The embedded broker
(Tansu) fails transactions, so exactly-once is not used here.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import faust
from faust.types import TP

from monitoring.metrics import StreamrecMetrics
from stream.events import (
    TOPIC_CLICKS,
    TOPIC_CONTROL,
    TOPIC_DEAD_LETTER,
    TOPIC_IMPRESSIONS,
    TOPIC_LABELED,
    TOPIC_SCORED,
    DeadLetter,
    InvalidEvent,
    LabeledExample,
    ScoredBatch,
    decode_labeled_batch,
    encode_labeled_batch,
)
from stream.services import (
    IndexerService,
    JoinService,
    MonitorService,
    TrainerService,
    control_bytes,
)
from stream.settings import Settings

log = logging.getLogger(__name__)


def topic_plan(settings: Settings) -> dict[str, int]:
    """Topic name -> partition count. ``impressions``/``clicks`` scale out with
    ``settings.partitions``; ``labeled`` and ``scored`` carry micro-batches for the single
    trainer and monitor; ``control`` is read by every worker."""
    return {
        TOPIC_IMPRESSIONS: settings.partitions,
        TOPIC_CLICKS: settings.partitions,
        TOPIC_LABELED: 1,
        TOPIC_SCORED: 1,
        TOPIC_CONTROL: 1,
        TOPIC_DEAD_LETTER: 1,
    }


#: Examples per ``labeled`` record (~250 bytes each: far below the 1 MB message limit) and
#: the longest a released label waits in the joiner's output buffer (wall seconds).
LABELED_FLUSH_SIZE = 1000
LABELED_FLUSH_S = 0.2


@dataclass
class Runtime:
    """The live objects of one worker, reachable from the agents and from tests."""

    settings: Settings
    metrics: StreamrecMetrics
    join: JoinService
    trainer: TrainerService
    monitor: MonitorService
    indexer: IndexerService
    out: dict[int, list[LabeledExample]] = field(default_factory=dict)
    started_at: float = field(default_factory=time.time)


def create_app(settings: Settings, metrics: StreamrecMetrics | None = None) -> faust.App:
    """Build the Faust app: joiner, trainer and monitor agents, the control listener, and
    the indexer and flush timers.

    The :class:`Runtime` is available as ``app.streamrec``.
    """
    metrics = metrics or StreamrecMetrics()
    rt = Runtime(
        settings=settings,
        metrics=metrics,
        join=JoinService(settings, metrics),
        trainer=TrainerService(settings, metrics),
        monitor=MonitorService(settings, metrics),
        indexer=IndexerService(settings, metrics),
    )
    app = faust.App(
        settings.app_id,
        broker=settings.faust_broker,
        store="memory://",
        datadir=settings.data_dir,
        web_enabled=False,
        topic_disable_leader=True,
        topic_allow_declare=False,
        topic_partitions=settings.partitions,
        consumer_auto_offset_reset="earliest",
        broker_rebalance_timeout=settings.rebalance_timeout_s,
        # Tansu holds a group join for half the session timeout: keep it short
        broker_session_timeout=settings.session_timeout_s,
        broker_heartbeat_interval=settings.session_timeout_s / 6,
        broker_max_poll_records=5000,
        stream_buffer_maxsize=20000,
        producer_linger=0.005,
    )
    app.streamrec = rt  # type: ignore[attr-defined]  # faust.App allows extra attributes

    def raw_topic(*names: str) -> faust.TopicT:
        return app.topic(*names, key_serializer="raw", value_serializer="raw")

    inputs = raw_topic(TOPIC_IMPRESSIONS, TOPIC_CLICKS)
    labeled = raw_topic(TOPIC_LABELED)
    scored = raw_topic(TOPIC_SCORED)
    control = raw_topic(TOPIC_CONTROL)
    dead = raw_topic(TOPIC_DEAD_LETTER)

    async def flush_labeled(force: bool) -> None:
        for partition, buf in list(rt.out.items()):
            if buf and (force or len(buf) >= LABELED_FLUSH_SIZE):
                rt.out[partition] = []
                key = str(partition).encode()
                # chunks keep every record far below the broker's 1 MB message limit
                for i in range(0, len(buf), LABELED_FLUSH_SIZE):
                    chunk = buf[i : i + LABELED_FLUSH_SIZE]
                    await labeled.send(key=key, value=encode_labeled_batch(chunk))

    @app.agent(inputs, name="joiner")
    async def joiner(stream: faust.StreamT[bytes]) -> None:
        async for event in stream.events():
            msg = event.message
            try:
                out, dl = rt.join.handle(event.value, msg.topic, msg.partition, msg.offset)
            except Exception as exc:  # a bug must not stall the partition: park the record
                log.exception("joiner failed on %s[%d]@%d", msg.topic, msg.partition, msg.offset)
                await dead_letter(event, InvalidEvent("processing_error", repr(exc)))
                continue
            if dl is not None:
                log.warning("dead letter from %s[%d]@%d: %s", msg.topic, msg.partition,
                            msg.offset, dl.reason)  # fmt: skip
                await dead.send(value=dl.to_json())
            if out:
                rt.out.setdefault(msg.partition, []).extend(out)
                if len(rt.out[msg.partition]) >= LABELED_FLUSH_SIZE:
                    await flush_labeled(force=False)

    def input_lags() -> dict[tuple[str, int], int]:
        """Unconsumed records per input partition (from the last fetch's high watermark)."""
        lags: dict[tuple[str, int], int] = {}
        for (topic, partition), offset in rt.join.offsets.items():
            try:
                high = app.consumer.highwater(TP(topic, partition))
            except Exception:  # no fetch yet, or a rebalance in progress
                continue
            if high is not None:
                lags[(topic, partition)] = int(high) - 1 - offset
        return lags

    @app.timer(interval=LABELED_FLUSH_S)
    async def labeled_flusher() -> None:
        rt.join.note_backlog(input_lags())
        released = rt.join.tick()
        if released:
            rt.out.setdefault(-1, []).extend(released)
        await flush_labeled(force=True)

    async def train_due() -> None:
        while rt.trainer.due():
            batch = rt.trainer.step()
            if batch is not None:
                await scored.send(key=b"trainer", value=batch.to_json())
        rt.trainer.maybe_checkpoint()

    @app.agent(labeled, name="trainer")
    async def trainer(stream: faust.StreamT[bytes]) -> None:
        async for event in stream.events():
            try:
                examples = decode_labeled_batch(event.value)
            except InvalidEvent as exc:
                await dead_letter(event, exc)
                continue
            rt.trainer.add(examples, emitted_at=event.message.timestamp)
            try:
                await train_due()
            except Exception as exc:
                log.exception("trainer step failed; the micro-batch is dead-lettered")
                rt.trainer.drop_buffer()
                await dead_letter(event, InvalidEvent("processing_error", repr(exc)))

    @app.timer(interval=max(0.05, settings.trainer.flush_s / 2))
    async def trainer_flusher() -> None:
        try:
            await train_due()
        except Exception:
            log.exception("trainer step failed on a timed flush; buffer dropped")
            dropped = rt.trainer.drop_buffer()
            rt.metrics.dead_letters.labels(reason="processing_error").inc(dropped)

    @app.agent(scored, name="monitor")
    async def monitor(stream: faust.StreamT[bytes]) -> None:
        async for event in stream.events():
            try:
                batch = ScoredBatch.from_json(event.value)
            except InvalidEvent as exc:
                await dead_letter(event, exc)
                continue
            try:
                messages = rt.monitor.observe(batch)
            except Exception as exc:
                log.exception("monitor failed on a scored batch")
                await dead_letter(event, InvalidEvent("processing_error", repr(exc)))
                continue
            for msg in messages:
                await control.send(key=str(msg["kind"]).encode(), value=control_bytes(msg))

    @app.timer(interval=1.0)
    async def gauges() -> None:
        rt.monitor.publish()
        rt.join.update_gauges()

    @app.task
    async def control_listener() -> None:
        """Every worker applies every ``control`` message, so this reads the topic outside
        the consumer group (no group id), from the beginning: a restarted worker gets the
        newest calibrator back."""
        from aiokafka import AIOKafkaConsumer, TopicPartition

        consumer = AIOKafkaConsumer(
            bootstrap_servers=settings.bootstrap.split(","),
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
        )
        await consumer.start()
        try:
            parts = consumer.partitions_for_topic(TOPIC_CONTROL) or {0}
            consumer.assign([TopicPartition(TOPIC_CONTROL, p) for p in sorted(parts)])
            await consumer.seek_to_beginning()
            while True:
                batches = await consumer.getmany(timeout_ms=500)
                for records in batches.values():
                    for record in records:
                        apply_control(record.value)
        finally:
            await consumer.stop()

    def apply_control(value: bytes | None) -> None:
        try:
            msg = json.loads(value or b"")
        except ValueError:
            log.warning("ignoring an undecodable control message")
            return
        if isinstance(msg, dict):
            rt.trainer.apply_control(msg)
            rt.monitor.apply_control(msg)

    @app.timer(interval=settings.indexer.refresh_s)
    async def indexer() -> None:
        msg = rt.indexer.refresh(rt.trainer.ranker, rt.trainer.catalogue)
        if msg is not None:
            await control.send(key=b"index", value=control_bytes(msg))

    async def dead_letter(event: Any, exc: InvalidEvent) -> None:
        m = event.message
        rt.metrics.dead_letters.labels(reason=exc.reason).inc()
        dl = DeadLetter.of(m.topic, m.partition, m.offset, exc, event.value)
        await dead.send(value=dl.to_json())

    return app
