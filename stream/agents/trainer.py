"""The trainer side: ``labeled`` → model steps (on a training thread when
``trainer.offload``) → ``scored``; index refreshes and model-store versions announced on
``control``. Labeled records are acked once all their examples were learned from
(:class:`stream.acks.TrainedAcks`). Checkpoints and model-store versions are copied under
the trainer lock and written on a writer thread, off the event loop and off the lock.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import faust

from logs.batches import decode_labeled, decode_marks
from logs.events import InvalidEvent
from modelstore.store import Manifest
from stream.acks import TrainedAcks
from stream.agents.outputs import Outputs
from stream.agents.runtime import Runtime
from stream.heap import trim_heap
from stream.limits import scored_records

__all__ = ["TrainerAgents"]

log = logging.getLogger(__name__)

T = TypeVar("T")


class TrainerAgents:
    """The ``trainer`` agent, its flush timer and the indexer's timer.

    One micro-batch at a time: the agent and the flush timer both call :meth:`train_due`
    under :attr:`lock`, and the models are never copied or stepped while a step runs on
    the training thread (:attr:`thread`, ``None`` when steps run on the event loop).

    A checkpoint or a model-store version is a copy of the models taken under the lock
    (tensors to CPU: tens of milliseconds), then serialised, written, fsynced, renamed and
    pruned on :attr:`writer` (one thread: one write at a time) while training goes on; a
    version is announced on ``control`` once it is durably in the store. One that falls
    due while the previous one of its kind is still being written waits for it (counted
    in ``streamrec_store_writes_skipped_total``) and then takes the newest models.
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
        self.writer = ThreadPoolExecutor(1, thread_name_prefix="streamrec-write")
        #: the background write of each kind ("checkpoint", "publish"), its announcement
        #: included; a finished one stays until the next replaces it
        self.writes: dict[str, asyncio.Task[None]] = {}
        self._deferred: set[str] = set()  # kinds due while their write ran (counted once)

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
        """Step every due micro-batch, send its scores, then refresh the index, and
        checkpoint and publish to the model store when each is due (the models copied
        here, under the lock; written and announced in the background)."""
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
            marks = rt.trainer.marks_batch()  # marks with no example left to follow
            if marks is not None:
                await out.scored.send(key=b"trainer", value=marks.encode())
            if rt.indexer.due(rt.trainer.ranker, rt.trainer.two_tower):
                await self.refresh_index()
            # the copies under the lock (on the training thread: the loop stays free),
            # the writes on the writer thread after it
            if rt.trainer.checkpoint_due() and self._free("checkpoint"):
                job = await self._on_thread(rt.trainer.checkpoint_snapshot)
                if job is not None:
                    self._start("checkpoint", rt.trainer.write_checkpoint, job)
            index = rt.indexer.holder.current
            if rt.trainer.publish_due(index) and self._free("publish"):
                pub = await self._on_thread(rt.trainer.publish_snapshot, index)
                if pub is not None:
                    self._start("publish", rt.trainer.write_publish, pub)

    def _free(self, kind: str) -> bool:
        """True when no write of ``kind`` is running; else the due one waits for it
        (counted once per running write) and False."""
        task = self.writes.get(kind)
        if task is None or task.done():
            self._deferred.discard(kind)
            return True
        if kind not in self._deferred:
            self._deferred.add(kind)
            self.rt.metrics.store_writes_skipped.labels(kind=kind).inc()
            log.info("%s due while the previous one is still being written: taken after it",
                     kind)  # fmt: skip
        return False

    def _start(self, kind: str, write: Callable[[Any], object], job: object) -> None:
        """``write(job)`` on the writer thread; a version is announced once written."""
        loop = asyncio.get_running_loop()
        written = loop.run_in_executor(self.writer, write, job)
        self.writes[kind] = loop.create_task(self._finish(kind, written))

    def _trim_after_write(self) -> None:
        """Queue :func:`stream.heap.trim_heap` on the writer thread: it runs after the
        write's work item, and with it the copy it wrote, was released, so the copy's
        freed memory can go back to the OS (a trim inside the write ran while the copy was
        still referenced, and could give back none of it)."""
        try:
            asyncio.get_running_loop().run_in_executor(self.writer, trim_heap)
        except RuntimeError:  # the writer is shut down (the worker is stopping)
            pass

    async def _finish(self, kind: str, written: asyncio.Future[object]) -> None:
        try:
            result = await written
        except Exception:  # the writers log and count OSError; anything else lands here
            log.exception("background %s write failed; the next one is tried on schedule",
                          kind)  # fmt: skip
            self.rt.metrics.store_failures.labels(reason=kind).inc()
            return
        finally:
            self._trim_after_write()
        if isinstance(result, Manifest):  # durably in the store: now replicas may load it
            try:
                await self.out.announce(self.rt.trainer.store_announcement(result))
            except Exception:
                self.out.stage_error("trainer", f"announcing store version {result.version}")

    async def drain(self) -> None:
        """Wait for the background writes (and their announcements) under way."""
        await asyncio.gather(*self.writes.values(), return_exceptions=True)

    async def final_writes(self) -> tuple[Path | None, Manifest | None]:
        """On shutdown: the writes under way finish, then a forced checkpoint and, when
        anything changed, a model-store version of the newest models (the restarted
        trainer resumes from them), both written before this returns (not announced)."""
        rt = self.rt
        loop = asyncio.get_running_loop()
        async with self.lock:  # not mid-step
            await self.drain()
            path = None
            if rt.trainer.checkpoint_due(force=True):
                job = rt.trainer.checkpoint_snapshot()
                if job is not None:
                    path = await loop.run_in_executor(self.writer, rt.trainer.write_checkpoint,
                                                      job)  # fmt: skip
            index = rt.indexer.holder.current
            manifest = None
            if rt.trainer.publish_due(index, force=True):
                pub = rt.trainer.publish_snapshot(index)
                if pub is not None:
                    manifest = await loop.run_in_executor(self.writer, rt.trainer.write_publish,
                                                          pub)  # fmt: skip
        return path, manifest

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
                added = rt.trainer.add(
                    examples, emitted_at=event.message.timestamp, marks=self.marks_of(event)
                )
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

    def marks_of(self, event: Any) -> dict[int, float]:
        """The event-time marks in a ``labeled`` record's headers; a bad header is counted
        as a stage error and its marks ignored (its examples are still learnt from)."""
        try:
            return decode_marks(event.headers)
        except InvalidEvent as exc:
            self.out.stage_error("trainer", f"{self.out.where(event)}: {exc}")
            return {}

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
