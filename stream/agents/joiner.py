"""The joiner: ``impressions`` + ``clicks`` → :class:`stream.services.JoinService` →
``labeled``, with the input acks of at-least-once delivery (:class:`stream.acks.InputAcks`).
"""

from __future__ import annotations

import asyncio
import logging
import math
from typing import Any

import faust
from faust.types import TP

from logs.batches import MARKS_HEADER, encode_labeled, encode_marks
from logs.events import (
    MIN_TS,
    TOPIC_CLICKS,
    TOPIC_IMPRESSIONS,
    TOPIC_LABELED,
    DeadLetter,
    InvalidEvent,
    LabeledExample,
)
from stream.acks import InputAcks
from stream.agents.outputs import Outputs
from stream.agents.runtime import Runtime
from stream.limits import labeled_records

__all__ = ["LABELED_FLUSH_S", "LABELED_FLUSH_SIZE", "STATE_FLUSH_RECORDS", "JoinerAgents"]

log = logging.getLogger(__name__)

#: Examples per ``labeled`` record (~250 bytes each: far below the 1 MB message limit) and
#: the longest a released label waits in the joiner's output buffer (wall seconds).
LABELED_FLUSH_SIZE = 1000
LABELED_FLUSH_S = 0.2
#: input records between two flushes of the join state by the joiner itself (the labels'
#: flusher flushes it every LABELED_FLUSH_S too)
STATE_FLUSH_RECORDS = 2000
#: seconds a revocation waits for the revoked partitions' queued labels to be sent
REVOKE_SEND_S = 10.0
#: input records the joiner handles before it lets the event loop run the other tasks: a
#: buffered stream never suspends it, so without this a backlog starves the trainer agent
#: (its finished training steps wait to be resumed), the timers and the web requests
YIELD_EVERY = 64


class JoinerAgents:
    """The ``joiner`` agent, the labels' flush timer and the revocation handler.

    An input record is acked only after the join-state segment holding its changes reached
    the broker (:meth:`commit_state`); released labels go out before their
    impressions leave the state (:meth:`flush_labeled`).
    """

    def __init__(self, app: faust.App, rt: Runtime, out: Outputs) -> None:
        self.app, self.rt, self.out = app, rt, out
        errors = rt.metrics.stage_errors.labels(stage="join_state_write")
        self.acks = InputAcks(lambda event: event.message.partition, on_failed=errors.inc)
        self._taken_to = 0  # acks position up to which a forced flush took the labels
        #: flushes sending now -> their start (a mark is read only when none is)
        self._sending: dict[object, int] = {}
        self._sent_marks: dict[int, float] = {}  # input partition -> the last mark sent

    def install(self) -> None:
        """Register the agent on the input topics and the flush timer."""

        async def joiner(stream: faust.StreamT[bytes]) -> None:
            await self.run(stream)

        async def labeled_flusher() -> None:
            await self.timed_flush()

        self.app.agent(self.out.inputs, name="joiner")(joiner)
        self.app.timer(interval=LABELED_FLUSH_S)(labeled_flusher)

    def connect_revocation(self) -> None:
        """Drop revoked input partitions (on every role: the signal is the app's)."""

        async def on_revoked(sender: Any, /, *args: Any, signal: Any, **kwargs: Any) -> None:
            revoked: set[TP] = args[0] if args else kwargs.get("revoked", set())
            await self.send_revoked(revoked)
            self.revoked(revoked)

        self.app.on_partitions_revoked.connect(on_revoked)

    async def run(self, stream: faust.StreamT[bytes]) -> None:
        rt, out = self.rt, self.out
        since_yield = 0
        async for event in stream.noack().events():  # type: ignore[attr-defined]
            since_yield += 1
            if since_yield >= YIELD_EVERY:
                since_yield = 0
                await asyncio.sleep(0)
            msg = event.message
            try:
                labels, dls = rt.join.handle_record(
                    event.value, msg.topic, msg.partition, msg.offset
                )
            except Exception as exc:  # a bug must not stall the partition: park the record
                self.acks.add(event)
                out.stage_error("joiner", out.where(event))
                await out.dead_letter(event, InvalidEvent("processing_error", repr(exc)))
                continue
            self.acks.add(event)
            try:
                for dl in dls:
                    log.warning("dead letter from %s[%d]@%d: %s", msg.topic, msg.partition,
                                msg.offset, dl.reason)  # fmt: skip
                    await out.dead.send(value=dl.to_json())
                if labels and len(rt.join.outbox.get(msg.partition, ())) >= LABELED_FLUSH_SIZE:
                    await self.flush_labeled(force=False)
                elif len(self.acks) >= STATE_FLUSH_RECORDS and not self._sending:
                    # not while a flush awaits the broker: it holds acks back, and every
                    # further record would start one more flush
                    await self.flush_labeled(force=True)
            except Exception:  # producing failed: the labels stay pending in the state
                out.stage_error("joiner", out.where(event))

    async def flush_labeled(self, force: bool) -> None:
        """Send queued labels; then (and only then) their impressions leave the state.

        A forced flush that no other flush overlaps also sends each partition's
        event-time mark when it moved (:meth:`stream.services.JoinService.marks`): as a
        header of the partition's last record, or of an empty record (same key, so after
        its labels), so the monitor can close windows no later impression passes.

        Only a forced flush commits the state and acks input records, and only the
        records whose labels have left: those handled before its take, less those whose
        labels an overlapping flush may still be sending. A record handled while a
        flush awaits the broker has its labels queued (a click-time positive, a fake
        negative); acked then, and the worker killed, they were lost, since its state
        (the impression, the click) says nothing about them being sent."""
        rt, out = self.rt, self.out
        # taken in one go: the other flusher (timer or agent) runs while this one awaits
        ready = rt.join.take_ready(None if force else LABELED_FLUSH_SIZE)
        # marks read with the take: an overlapping flush may still be sending older labels
        marks = self._moved_marks() if force and not self._sending else {}
        # a forced take holds the labels of the records in [start, end) (acks positions);
        # a partial one some of those of the records from start on
        start, end = self._taken_to, self.acks.mark()
        token = object()
        self._sending[token] = start
        if force:
            self._taken_to = end
        try:
            await self._send_labeled(ready, marks)
        finally:
            self._sending.pop(token, None)
        while rt.join.orphans:
            await out.dead.send(value=rt.join.orphans.pop().to_json())
        if force:
            self.commit_state(upto=min([end, *self._sending.values()]))

    def _moved_marks(self) -> dict[int, float]:
        """The partitions' marks (every assigned input partition's, also one without
        events yet) that moved since they were last sent."""
        try:
            assigned = [
                tp.partition for tp in self.app.consumer.assignment()
                if tp.topic == TOPIC_IMPRESSIONS
            ]  # fmt: skip
        except Exception:  # no consumer yet, or a rebalance in progress
            assigned = []
        sent = self._sent_marks
        marks = self.rt.join.marks(assigned)
        return {p: w for p, w in marks.items() if w > sent.get(p, -math.inf)}

    async def _send_labeled(
        self, ready: dict[int, list[LabeledExample]], marks: dict[int, float]
    ) -> None:
        rt, out = self.rt, self.out
        for partition in sorted(marks.keys() - ready.keys()):
            ready[partition] = []  # a mark alone: an empty record carries it
        for partition, buf in ready.items():
            key = str(partition).encode()
            if buf and partition not in self._sent_marks:
                # a partition's first labels follow a mark that closes nothing (MIN_TS,
                # safe ahead of anything): the monitor then waits for marks from its
                # first record on, instead of closing windows by impression times
                self._sent_marks[partition] = MIN_TS
                await out.labeled.send(
                    key=key, value=encode_labeled([]), headers=_mark_header(partition, MIN_TS)
                )
            mark = marks.get(partition)
            # the broker has the labels before the state says so: a RocksDB store is
            # local and durable at once, so marking them earlier could lose them
            await self._send_records(partition, buf, mark)
            rt.join.sent(partition, buf)
            if mark is not None:
                self._sent_marks[partition] = mark

    async def _send_records(
        self, partition: int, buf: list[LabeledExample], mark: float | None
    ) -> None:
        """Send one input partition's labels (``mark``, when given, in the header of the
        last record, an empty one if there are no labels) and wait for the broker; a
        label too large for a record goes to the dead letters."""
        out = self.out
        key = str(partition).encode()
        # split by bytes (and count) under the record limit: valid but large impressions
        # in one batch must not make the producer refuse it
        records, too_large = labeled_records(buf, out.max_payload, LABELED_FLUSH_SIZE)
        if mark is not None and not records:
            records = [encode_labeled([])]
        last = len(records) - 1
        sending = [
            await out.labeled.send(
                key=key,
                value=value,
                headers=_mark_header(partition, mark) if mark is not None and k == last else None,
            )
            for k, value in enumerate(records)
        ]
        for e in too_large:  # cannot happen with a limit >= 64 KiB events; kept safe
            exc = InvalidEvent("too_large", "labelled example over max_message_bytes")
            self.rt.metrics.dead_letters.labels(reason=exc.reason).inc()
            letter = DeadLetter.of(TOPIC_LABELED, partition, -1, exc, e.impression.to_json())
            await out.dead.send(value=letter.to_json())
        await asyncio.gather(*sending)

    def commit_state(self, upto: int | None = None) -> None:
        """Flush the join state (and the feature state) to the producer; the inputs (all,
        or those before the :meth:`stream.acks.InputAcks.mark` ``upto``) are acked once
        the broker has every changelog write made since the last commit."""
        self.acks.commit(self._flush_state, upto)

    def _flush_state(self) -> list[Any]:
        self.rt.join.save_features()
        self.rt.join.state.flush()
        return self.rt.join.take_in_flight()

    def input_lags(self) -> dict[tuple[str, int], int]:
        """Unconsumed records per input partition (from the last fetch's high watermark)."""
        lags: dict[tuple[str, int], int] = {}
        for (topic, partition), offset in self.rt.join.offsets.items():
            try:
                high = self.app.consumer.highwater(TP(topic, partition))
            except Exception:  # no fetch yet, or a rebalance in progress
                continue
            if high is not None:
                lags[(topic, partition)] = int(high) - 1 - offset
        return lags

    async def timed_flush(self) -> None:
        """The timer: stall and backlog notes, release due labels, send them; never
        raises."""
        try:
            self.rt.join.beat()
            self.rt.join.note_backlog(self.input_lags())
            self.rt.join.tick()
            await self.flush_labeled(force=True)
        except Exception:  # a timer that raises stops the worker: count it, retry next tick
            self.out.stage_error("labeled_flusher", "a timed flush")

    async def send_revoked(self, revoked: set[TP]) -> None:
        """Send the queued labels of revoked input partitions before they are dropped.

        The next owner reads again the input records not acked (those whose labels are
        queued, see :meth:`flush_labeled`), but re-emits a label only where the restored
        state says it is due: a window's label or a click's positive, not a fake
        negative, whose impression it restores as pending and then reads as a
        duplicate. Dropped with the outbox, that fake negative was lost. Sent here
        instead, at least once (the trainer drops the duplicates the new owner may
        emit), and without touching the state: the partition is no longer this
        worker's. Bounded by :data:`REVOKE_SEND_S`; a failure is counted as a stage
        error."""
        gone = {tp.partition for tp in revoked if tp.topic in (TOPIC_IMPRESSIONS, TOPIC_CLICKS)}
        outbox, out = self.rt.join.outbox, self.out
        ready = {p: outbox.pop(p) for p in sorted(gone) if outbox.get(p)}

        async def send() -> None:
            for partition, buf in ready.items():
                await self._send_records(partition, buf, None)

        if not ready:
            return
        try:
            await asyncio.wait_for(send(), timeout=REVOKE_SEND_S)
        except Exception:  # the rebalance must go on: counted and logged
            out.stage_error("labeled_flusher", f"the labels of revoked partitions {gone}")

    def revoked(self, revoked: set[TP]) -> None:
        """A revoked input partition's joiner is dropped: the next owner rebuilds it from
        the table, and re-emits the labels this worker had not sent yet."""
        gone = {tp.partition for tp in revoked if tp.topic in (TOPIC_IMPRESSIONS, TOPIC_CLICKS)}
        # Faust waited for every input record to be acked, so what they changed is flushed;
        # anything unacked left is uncommitted and goes to the next owner with its inputs
        self.acks.drop_partitions(gone)
        self.rt.join.drop(gone)
        for p in gone:
            self._sent_marks.pop(p, None)


def _mark_header(partition: int, mark: float) -> dict[str, bytes]:
    """The headers of a ``labeled`` record carrying ``partition``'s event-time mark."""
    return {MARKS_HEADER: encode_marks({partition: mark})}
