"""What every agent shares: the worker's raw topics, and how a stage reports a failure."""

from __future__ import annotations

import logging
from typing import Any

import faust

from logs.events import (
    TOPIC_CLICKS,
    TOPIC_CONTROL,
    TOPIC_DEAD_LETTER,
    TOPIC_IMPRESSIONS,
    TOPIC_LABELED,
    TOPIC_SCORED,
    DeadLetter,
    InvalidEvent,
)
from monitoring.metrics import StreamrecMetrics
from stream.control import ControlRecord, encode_control
from stream.limits import payload_limit

__all__ = ["Outputs"]

log = logging.getLogger(__name__)


class Outputs:
    """The worker's topics (raw bytes keys and values: a malformed record reaches
    ``dead-letter`` with a reason instead of dying in a deserialiser), the largest
    payload one record may carry (bytes), and the two ways a stage reports a failure."""

    def __init__(self, app: faust.App, metrics: StreamrecMetrics, max_message_bytes: int) -> None:
        def raw_topic(*names: str) -> faust.TopicT:
            return app.topic(*names, key_serializer="raw", value_serializer="raw")

        self.inputs = raw_topic(TOPIC_IMPRESSIONS, TOPIC_CLICKS)
        self.labeled = raw_topic(TOPIC_LABELED)
        self.scored = raw_topic(TOPIC_SCORED)
        self.control = raw_topic(TOPIC_CONTROL)
        self.dead = raw_topic(TOPIC_DEAD_LETTER)
        self.metrics = metrics
        self.max_payload = payload_limit(max_message_bytes)

    def stage_error(self, stage: str, where: str) -> None:
        """An exception a stage survived: counted and logged (with its traceback) once."""
        self.metrics.stage_errors.labels(stage=stage).inc()
        log.exception("%s failed on %s; the record is dead-lettered or skipped", stage, where)

    @staticmethod
    def where(event: Any) -> str:
        """``topic[partition]@offset`` of a Faust event, for logs."""
        m = event.message
        return f"{m.topic}[{m.partition}]@{m.offset}"

    async def dead_letter(self, event: Any, exc: InvalidEvent) -> None:
        """Send ``event``'s dead letter (a bounded prefix, size and hash of its value);
        never raises: a failure is counted and logged, and the record is skipped."""
        m = event.message
        self.metrics.dead_letters.labels(reason=exc.reason).inc()
        try:
            dl = DeadLetter.of(m.topic, m.partition, m.offset, exc, event.value)
            await self.dead.send(value=dl.to_json())
        except Exception:
            self.stage_error("dead_letter", self.where(event))

    async def announce(self, record: ControlRecord) -> None:
        """One record on ``control``, keyed by its kind (every reader validates it:
        :func:`stream.control.decode_control`)."""
        await self.control.send(key=record.kind.encode(), value=encode_control(record))
