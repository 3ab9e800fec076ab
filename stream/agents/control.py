"""The control listener: every worker applies every ``control`` record.

It reads the topic outside the consumer group (no group id), from the beginning, so a
restarted worker gets the newest calibrator back; records are validated by
:func:`stream.control.parse_control` first, and a rejected one is counted and skipped
(a record that raised would stop every worker on every restart).
"""

from __future__ import annotations

import asyncio
import logging

import faust

from logs.events import TOPIC_CONTROL, InvalidEvent
from stream.agents.outputs import Outputs
from stream.agents.replica import ReplicaAgents
from stream.agents.runtime import Runtime
from stream.control import ModelAnnouncement, check_model_record, decode_control

__all__ = ["ControlAgent"]

log = logging.getLogger(__name__)


class ControlAgent:
    """The listener task and :meth:`apply`, the one place a record reaches the trainer,
    the monitor and (on a serve worker) the replica."""

    def __init__(
        self, app: faust.App, rt: Runtime, out: Outputs, replica: ReplicaAgents | None
    ) -> None:
        self.app, self.rt, self.out, self.replica = app, rt, out, replica

    def install(self) -> None:
        async def control_listener() -> None:
            await self.listen()

        self.app.task(control_listener)

    async def listen(self) -> None:
        from aiokafka import AIOKafkaConsumer, TopicPartition

        settings = self.rt.settings
        consumer = AIOKafkaConsumer(
            bootstrap_servers=settings.bootstrap.split(","),
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_partition_fetch_bytes=max(settings.max_message_bytes, 1024**2),
            **settings.kafka_client_options(),
        )
        await consumer.start()
        try:
            parts = consumer.partitions_for_topic(TOPIC_CONTROL) or {0}
            consumer.assign([TopicPartition(TOPIC_CONTROL, p) for p in sorted(parts)])
            await consumer.seek_to_beginning()
            while True:
                try:
                    batches = await consumer.getmany(timeout_ms=500)
                except Exception:  # e.g. a broker hiccup: the task must not end the worker
                    self.out.stage_error("control", "a fetch of control")
                    await asyncio.sleep(1.0)
                    continue
                for records in batches.values():
                    for record in records:
                        try:
                            self.apply(record.value)
                        except Exception:  # validated, yet a consumer failed: skip it
                            at = f"{TOPIC_CONTROL}[{record.partition}]@{record.offset}"
                            self.out.stage_error("control", at)
        finally:
            await consumer.stop()

    def apply(self, value: bytes | None) -> None:
        """Apply one ``control`` record that :func:`stream.control.decode_control`
        accepts; a rejected one is counted and skipped."""
        rt = self.rt
        try:
            record = decode_control(value, max(rt.settings.max_message_bytes, 1024**2))
        except InvalidEvent as exc:
            rt.metrics.control_rejected.labels(reason=exc.reason).inc()
            log.warning("control record rejected and skipped: %s", exc)
            return
        if isinstance(record, ModelAnnouncement):
            # only a version of the model store with its manifest's digest, on every
            # worker: a legacy record naming a file elsewhere is refused and counted
            refused = check_model_record(record, rt.settings.model_store)
            if refused is not None:
                rt.metrics.control_rejected.labels(reason=refused).inc()
                log.warning("control 'model' record refused (%s): version %r, path %r",
                            refused, record.version, record.path)  # fmt: skip
            if self.replica is not None:  # refused ones count in store_failures too
                self.replica.announce(record, refused=refused is not None)
            if refused is not None:
                return
        rt.trainer.apply_control(record)
        rt.monitor.apply_control(record)
