"""The trainer side: ``labeled`` → model steps (on a training thread when
``trainer.offload``) → ``scored``; index refreshes and model-store versions announced on
``control``. Labeled records are acked once all their examples were learned from
(:class:`stream.acks.TrainedAcks`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import faust

from logs.events import InvalidEvent, decode_labeled
from stream.acks import TrainedAcks
from stream.agents.outputs import Outputs
from stream.agents.runtime import Runtime
from stream.limits import scored_records

__all__ = ["TrainerAgents"]

T = TypeVar("T")


class TrainerAgents:
    """The ``trainer`` agent, its flush timer and the indexer's timer.

    One micro-batch at a time: the agent and the flush timer both call :meth:`train_due`
    under :attr:`lock`, and the models are never saved or stepped while a step runs on
    the training thread (:attr:`thread`, ``None`` when steps run on the event loop).
    """

    def __init__(self, app: faust.App, rt: Runtime, out: Outputs) -> None:
        self.app, self.rt, self.out = app, rt, out
        self.acks = TrainedAcks()
        self.lock = asyncio.Lock()
        self.thread = (
            ThreadPoolExecutor(1, thread_name_prefix="streamrec-train")
            if rt.settings.trainer.offload
            else None
        )

    def install(self) -> None:
        """Register the agent on ``labeled``, its flush timer and the index timer."""

        async def trainer(stream: faust.StreamT[bytes]) -> None:
            await self.run(stream)

        async def trainer_flusher() -> None:
            await self.timed_flush()

        async def indexer() -> None:
            await self.timed_refresh()

        self.app.agent(self.out.labeled, name="trainer")(trainer)
        interval = max(0.05, self.rt.settings.trainer.flush_s / 2)
        self.app.timer(interval=interval)(trainer_flusher)
        self.app.timer(interval=self.rt.settings.indexer.refresh_s)(indexer)

    async def _on_thread(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on the training thread (on the loop when there is none)."""
        if self.thread is None:
            return fn(*args)
        return await asyncio.get_running_loop().run_in_executor(self.thread, fn, *args)

    async def train_due(self) -> None:
        """Step every due micro-batch, send its scores, then refresh the index,
        checkpoint and publish to the model store when each is due."""
        rt, out = self.rt, self.out
        async with self.lock:
            while rt.trainer.due():
                taken = rt.trainer.take()
                if taken is None:
                    break
                result = await self._on_thread(rt.trainer.compute, taken)
                batch = rt.trainer.finish(taken, result)
                for value in scored_records(batch, out.max_payload):  # split under the limit
                    await out.scored.send(key=b"trainer", value=value)
                self.acks.learned(len(batch.impression_ids))
            if rt.indexer.due(rt.trainer.ranker, rt.trainer.two_tower):
                await self.refresh_index()
            rt.trainer.maybe_checkpoint()
            index = rt.indexer.holder.current
            if rt.trainer.publish_due(index):
                # on the training thread (models still: the lock is held), off the loop
                manifest = await self._on_thread(rt.trainer.publish, index)
                if manifest is not None:
                    await out.announce(rt.trainer.store_announcement(manifest))

    def drop_buffer(self) -> int:
        """Drop the buffered examples after a failed step (their records are acked)."""
        dropped = self.rt.trainer.drop_buffer()
        self.acks.learned(None)
        return dropped

    async def run(self, stream: faust.StreamT[bytes]) -> None:
        rt, out = self.rt, self.out
        async for event in stream.noack().events():  # type: ignore[attr-defined]
            try:
                examples = decode_labeled(event.value)
                added = rt.trainer.add(examples, emitted_at=event.message.timestamp)
            except Exception as exc:
                if not isinstance(exc, InvalidEvent):
                    out.stage_error("trainer", out.where(event))
                    exc = InvalidEvent("processing_error", repr(exc))
                await out.dead_letter(event, exc)
                event.ack()
                continue
            self.acks.add(event, added)
            try:
                self.acks.learned(0)  # a record whose examples were all duplicates
                await self.train_due()
            except Exception as exc:
                out.stage_error("trainer", out.where(event))  # the micro-batch is dead-lettered
                self.drop_buffer()
                await out.dead_letter(event, InvalidEvent("processing_error", repr(exc)))

    async def timed_flush(self) -> None:
        """The timer: train what is due; a failure drops the buffer and is counted."""
        try:
            await self.train_due()
        except Exception:
            self.out.stage_error("trainer", "a timed flush (buffer dropped)")
            dropped = self.drop_buffer()
            self.rt.metrics.dead_letters.labels(reason="processing_error").inc(dropped)

    async def refresh_index(self) -> None:
        rt = self.rt
        msg = rt.indexer.refresh(rt.trainer.ranker, rt.trainer.catalogue, rt.trainer.two_tower)
        if msg is not None:
            await self.out.announce(msg)

    async def timed_refresh(self) -> None:
        try:
            await self.refresh_index()
        except Exception:
            self.out.stage_error("indexer", "a timed index refresh")
