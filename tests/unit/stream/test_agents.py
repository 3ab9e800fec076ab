"""The agents of :mod:`stream.agents` as objects: fake topics and events, real services
(no broker). What each must guarantee: labels reach the broker before their impressions
leave the state and before their inputs are acked; a record that breaks a stage is
dead-lettered and acked, never retried forever; a control record is validated before
anything is applied; a labeled record is acked only once its examples were learned."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import faust
import pytest

from learners.calibration import PlattCalibrator
from learners.encoding import EncoderConfig
from learners.ranker import RankerConfig
from logs.batches import (
    MARKS_HEADER,
    ScoredBatch,
    decode_labeled,
    decode_marks,
    encode_labeled,
    encode_marks,
)
from logs.events import (
    MIN_TS,
    TOPIC_CLICKS,
    TOPIC_IMPRESSIONS,
    TOPIC_LABELED,
    Click,
    Impression,
    LabeledExample,
    Watermark,
)
from monitoring.metrics import StreamrecMetrics
from stream.agents import ControlAgent, JoinerAgents, MonitorAgent, Outputs, TrainerAgents
from stream.agents.runtime import Runtime
from stream.join import JoinConfig
from stream.services import IndexerService, JoinService, MonitorService, TrainerService
from stream.settings import Settings, TrainerConfig

T0 = 1_700_000_000.0
BATCH = 8


class FakeTopic:
    """Records what was sent; ``send`` returns a done future like Faust's."""

    def __init__(self) -> None:
        self.sent: list[tuple[bytes | None, bytes]] = []
        self.headers: list[dict | None] = []  # parallel to sent

    async def send(
        self, key: bytes | None = None, value: bytes = b"", headers: dict | None = None
    ) -> asyncio.Future[None]:
        self.sent.append((key, value))
        self.headers.append(headers)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        fut.set_result(None)
        return fut


class FakeEvent:
    def __init__(self, topic: str, partition: int, offset: int, value: bytes) -> None:
        self.message = SimpleNamespace(
            topic=topic, partition=partition, offset=offset, timestamp=time.time()
        )
        self.value = value
        self.headers: dict[str, bytes] = {}
        self.acks = 0

    def ack(self) -> None:
        self.acks += 1


class FakeStream:
    def __init__(self, events: list[FakeEvent]) -> None:
        self._events = events

    def noack(self) -> FakeStream:
        return self

    async def events(self) -> AsyncIterator[FakeEvent]:
        for e in self._events:
            yield e


def sample(metrics: StreamrecMetrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


@pytest.fixture
def wired(tmp_path: Path) -> tuple[faust.App, Runtime, Outputs]:
    settings = Settings(
        broker="127.0.0.1:1",
        data_dir=str(tmp_path / "data"),
        ranker=RankerConfig(model="logreg", encoder=EncoderConfig(num_buckets=2**10)),
        # flush_s long: a first train step slower than the default 0.5 s (a loaded machine)
        # must not flush the rest of the buffer; the tests move buffer_since to flush
        trainer=TrainerConfig(batch_size=BATCH, flush_s=60.0, offload=False, checkpoint_dir=""),
        join=JoinConfig(window_s=60.0, lateness_s=0.0),  # labels when the window closes
    )
    metrics = StreamrecMetrics()
    app = faust.App("agents-test", broker="kafka://127.0.0.1:1", web_enabled=False)
    rt = Runtime(
        settings=settings,
        metrics=metrics,
        join=JoinService(settings, metrics),
        trainer=TrainerService(settings, metrics),
        monitor=MonitorService(settings, metrics),
        indexer=IndexerService(settings, metrics),
    )
    out = Outputs(app, metrics, settings.max_message_bytes)
    for name in ("labeled", "scored", "control", "dead"):
        setattr(out, name, FakeTopic())
    return app, rt, out


def imp(iid: str, ts: float) -> bytes:
    return Impression(iid, T0 + ts, "u1", "i1", position=1).to_json()


def test_labels_reach_the_broker_before_state_or_acks_let_go(wired: Any) -> None:
    app, rt, out = wired
    agents = JoinerAgents(app, rt, out)
    wm = Watermark(T0 + 100).to_json()
    events = [
        FakeEvent(TOPIC_IMPRESSIONS, 0, 0, imp("a", 0)),
        FakeEvent(TOPIC_IMPRESSIONS, 0, 1, imp("b", 1)),
        FakeEvent(TOPIC_CLICKS, 0, 0, Click("a", T0 + 5).to_json()),
        FakeEvent(TOPIC_IMPRESSIONS, 0, 2, wm),
        FakeEvent(TOPIC_CLICKS, 0, 1, wm),
    ]
    sent_when_marked: list[int] = []
    mark = rt.join.sent

    def spy(partition: int, buf: Any) -> None:
        sent_when_marked.append(len(out.labeled.sent))
        mark(partition, buf)

    rt.join.sent = spy  # type: ignore[method-assign]

    async def go() -> None:
        await agents.run(FakeStream(events))
        # released, but under a full batch and under STATE_FLUSH_RECORDS: nothing yet
        assert out.labeled.sent == [] and all(e.acks == 0 for e in events)
        await agents.timed_flush()

    asyncio.run(go())
    assert len(out.labeled.sent) == 2
    # the partition's first labels follow a mark that closes nothing (the monitor then
    # waits for marks from the start); its event-time mark rides on its last record
    assert out.labeled.sent[0] == (b"0", encode_labeled([]))
    assert decode_marks(out.labeled.headers[0]) == {0: MIN_TS}
    key, value = out.labeled.sent[1]
    labels = sorted((e.impression.impression_id, e.label) for e in decode_labeled(value))
    assert (key, labels) == (b"0", [("a", 1), ("b", 0)])
    assert decode_marks(out.labeled.headers[1]) == {0: T0 + 100}
    assert sent_when_marked == [2]  # the state let go only once the labels were sent
    assert [e.acks for e in events] == [1] * len(events)  # each input acked exactly once


def test_a_revoked_partitions_queued_labels_are_sent_not_dropped(wired: Any) -> None:
    """Labels still queued when their input partition is revoked leave before it is
    dropped (the next owner re-emits only what the state says is due, and a click-time
    positive's click record may be acked already); the state is not touched (the
    partition is no longer this worker's), and other partitions keep theirs."""
    from faust.types import TP

    app, rt, out = wired
    agents = JoinerAgents(app, rt, out)
    wm = Watermark(T0 + 100).to_json()
    events = [
        FakeEvent(TOPIC_IMPRESSIONS, 0, 0, imp("a", 0)),
        FakeEvent(TOPIC_IMPRESSIONS, 1, 0, imp("b", 0)),
        *[FakeEvent(t, p, 1, wm) for t in (TOPIC_IMPRESSIONS, TOPIC_CLICKS) for p in (0, 1)],
    ]
    let_go: list[int] = []
    rt.join.sent = lambda partition, buf: let_go.append(partition)  # type: ignore[method-assign]

    async def go() -> None:
        await agents.run(FakeStream(events))
        rt.join.tick()
        assert out.labeled.sent == [] and set(rt.join.outbox) == {0, 1}
        await agents.send_revoked({TP(TOPIC_IMPRESSIONS, 0), TP(TOPIC_CLICKS, 0)})
        agents.revoked({TP(TOPIC_IMPRESSIONS, 0), TP(TOPIC_CLICKS, 0)})
        await agents.send_revoked(set())  # nothing revoked: nothing sent

    asyncio.run(go())
    assert [(k, [e.impression.impression_id for e in decode_labeled(v)])
            for k, v in out.labeled.sent] == [(b"0", ["a"])]  # fmt: skip
    assert let_go == [] and set(rt.join.outbox) == {1} and 0 not in rt.join.joiners


def test_a_record_handled_while_a_flush_awaits_the_broker_is_acked_by_the_next(
    wired: Any,
) -> None:
    """A forced flush acks only the records whose labels it took: one handled while it
    awaited the broker has its labels still queued (acked and the worker killed, they
    would be lost), so it waits for the next flush."""
    app, rt, out = wired
    agents = JoinerAgents(app, rt, out)
    held: list[asyncio.Future[None]] = []
    send = out.labeled.send

    async def gated(*args: Any, **kwargs: Any) -> asyncio.Future[None]:
        await send(*args, **kwargs)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        held.append(fut)
        return fut

    out.labeled.send = gated
    wm = Watermark(T0 + 100).to_json()
    first = [FakeEvent(TOPIC_IMPRESSIONS, 0, 0, imp("a", 0)),
             FakeEvent(TOPIC_IMPRESSIONS, 0, 1, wm), FakeEvent(TOPIC_CLICKS, 0, 0, wm)]  # fmt: skip
    late = FakeEvent(TOPIC_IMPRESSIONS, 0, 2, imp("b", 90))

    async def go() -> None:
        await agents.run(FakeStream(first))
        flush = asyncio.create_task(agents.timed_flush())
        while not held:  # the flush took a's label and awaits the broker
            await asyncio.sleep(0)
        await agents.run(FakeStream([late]))
        for fut in held:
            fut.set_result(None)
        await flush
        assert [e.acks for e in first] == [1, 1, 1] and late.acks == 0
        out.labeled.send = send
        await agents.timed_flush()
        assert late.acks == 1

    asyncio.run(go())


def test_a_moved_mark_is_sent_once_alone_after_the_labels(wired: Any) -> None:
    app, rt, out = wired
    agents = JoinerAgents(app, rt, out)

    def marks(value: int) -> list[FakeEvent]:
        wm = Watermark(T0 + value).to_json()
        return [FakeEvent(TOPIC_IMPRESSIONS, 0, value, wm), FakeEvent(TOPIC_CLICKS, 0, value, wm)]

    async def go() -> None:
        await agents.run(FakeStream([FakeEvent(TOPIC_IMPRESSIONS, 0, 0, imp("a", 0))]))
        await agents.timed_flush()  # no watermark yet: the first mark says "nothing"
        await agents.run(FakeStream(marks(30)))  # inside a's window: no label, a mark
        await agents.timed_flush()
        await agents.timed_flush()  # not moved: not sent again
        await agents.run(FakeStream(marks(90)))  # closes a's window: its label, then mark
        await agents.timed_flush()

    asyncio.run(go())
    sent = [(decode_labeled(v), decode_marks(h)) for (_, v), h in
            zip(out.labeled.sent, out.labeled.headers, strict=True)]  # fmt: skip
    assert [([e.impression.impression_id for e in ex], m) for ex, m in sent] == [
        ([], {0: MIN_TS}),  # a joiner that sends marks: the monitor waits for them
        ([], {0: T0 + 30}),
        (["a"], {0: T0 + 90}),
    ]


def test_a_record_that_breaks_the_joiner_is_dead_lettered_and_acked(wired: Any) -> None:
    app, rt, out = wired
    agents = JoinerAgents(app, rt, out)
    handle = rt.join.handle_record

    def breaks_on_offset_1(value: bytes, topic: str, partition: int, offset: int) -> Any:
        if offset == 1:
            raise RuntimeError("a bug")
        return handle(value, topic, partition, offset)

    rt.join.handle_record = breaks_on_offset_1  # type: ignore[method-assign]
    events = [FakeEvent(TOPIC_IMPRESSIONS, 0, i, imp(str(i), i)) for i in range(3)]
    events.append(FakeEvent(TOPIC_IMPRESSIONS, 0, 3, b"{oops"))

    async def go() -> None:
        await agents.run(FakeStream(events))
        await agents.timed_flush()

    asyncio.run(go())
    reasons = [json.loads(v)["reason"] for _, v in out.dead.sent]
    assert sorted(reasons) == ["bad_json", "processing_error"]
    assert sample(rt.metrics, "streamrec_stage_errors_total", stage="joiner") == 1
    assert [e.acks for e in events] == [1, 1, 1, 1]  # nothing is retried forever
    rt.join.update_gauges()
    assert sample(rt.metrics, "streamrec_pending_impressions") == 2  # offsets 0 and 2 wait


def test_control_records_are_validated_before_anything_is_applied(wired: Any) -> None:
    app, rt, out = wired
    control = ControlAgent(app, rt, out, None)
    for bad in (b'{"kind":"calibrator"}', b"[]", b"\xff", b'{"kind":"calibrator","version'):
        control.apply(bad)
    assert rt.trainer.served_calibrator.version == 0 and rt.monitor.calibrator_version == 0
    rejected = sum(
        sample(rt.metrics, "streamrec_control_rejected_total", reason=r)
        for r in ("missing_field", "bad_json", "not_an_object")
    )
    assert rejected == 4
    params = PlattCalibrator(a=1.5, b=-0.2).to_dict()
    control.apply(json.dumps({"kind": "calibrator", "version": 3, "params": params}).encode())
    assert rt.trainer.served_calibrator.version == 3 and rt.monitor.calibrator_version == 3
    # a model record naming a file outside any model store is refused, not applied
    control.apply(b'{"kind":"model","version":9,"path":"/etc/passwd"}')
    assert rt.trainer.model_version != 9


def test_a_labeled_record_is_acked_once_its_examples_were_learned(wired: Any) -> None:
    app, rt, out = wired
    agents = TrainerAgents(app, rt, out)
    examples = [
        LabeledExample(
            Impression(f"x{i}", T0 + i, f"u{i % 3}", f"i{i % 4}", position=1), i % 2, T0 + 99
        )
        for i in range(BATCH + 3)
    ]
    first = FakeEvent(TOPIC_LABELED, 0, 0, encode_labeled(examples[:3]))
    second = FakeEvent(TOPIC_LABELED, 0, 1, encode_labeled(examples[3:]))
    broken = FakeEvent(TOPIC_LABELED, 0, 2, b"not a batch")

    async def go() -> None:
        await agents.run(FakeStream([first]))
        assert first.acks == 0 and out.scored.sent == []  # buffered, not learned yet
        await agents.run(FakeStream([second, broken]))

    asyncio.run(go())
    assert len(out.scored.sent) == 1 and first.acks == 1  # one micro-batch of BATCH
    assert second.acks == 0  # 3 of its examples still wait in the buffer
    assert broken.acks == 1 and json.loads(out.dead.sent[0][1])["reason"] != ""
    assert len(rt.trainer.buffer) == 3
    rt.trainer.buffer_since = time.monotonic() - 3600  # the flush interval has passed
    asyncio.run(agents.timed_flush())
    assert len(out.scored.sent) == 2 and second.acks == 1 and rt.trainer.buffer == []


def test_marks_reach_scored_after_every_example_before_them(wired: Any) -> None:
    app, rt, out = wired
    agents = TrainerAgents(app, rt, out)
    examples = [
        LabeledExample(Impression(f"x{i}", T0 + i, "u", "i", position=1), i % 2, T0 + 99)
        for i in range(BATCH + 3)
    ]
    first = FakeEvent(TOPIC_LABELED, 0, 0, encode_labeled(examples[:3]))
    second = FakeEvent(TOPIC_LABELED, 0, 1, encode_labeled(examples[3:]))
    second.headers = {MARKS_HEADER: encode_marks({0: T0 + 50})}
    alone = FakeEvent(TOPIC_LABELED, 0, 2, encode_labeled([]))
    alone.headers = {MARKS_HEADER: encode_marks({1: T0 + 60})}
    bad = FakeEvent(TOPIC_LABELED, 0, 3, encode_labeled([]))
    bad.headers = {MARKS_HEADER: b"not json"}
    asyncio.run(agents.run(FakeStream([first, second])))
    (one,) = [ScoredBatch.decode(v) for _, v in out.scored.sent]
    # BATCH examples left, 3 of the mark's record still wait: the mark waits with them
    assert len(one.impression_ids) == BATCH and one.marks == {}
    rt.trainer.buffer_since = time.monotonic() - 3600
    asyncio.run(agents.timed_flush())
    two = ScoredBatch.decode(out.scored.sent[1][1])
    assert len(two.impression_ids) == 3 and two.marks == {0: T0 + 50}
    # a record of marks alone, nothing buffered: an empty scored batch carries them
    asyncio.run(agents.run(FakeStream([alone, bad])))
    three = ScoredBatch.decode(out.scored.sent[2][1])
    assert three.impression_ids == [] and three.marks == {1: T0 + 60}
    assert len(out.scored.sent) == 3 and alone.acks == 1 and bad.acks == 1
    # a bad header is counted; the record's examples (none here) are not dead-lettered
    assert sample(rt.metrics, "streamrec_stage_errors_total", stage="trainer") == 1
    assert out.dead.sent == []


def test_a_repeated_scored_batch_is_counted_and_skipped(wired: Any) -> None:
    app, rt, out = wired
    trainer = TrainerAgents(app, rt, out)
    examples = [
        LabeledExample(Impression(f"x{i}", T0 + i, "u", "i", position=1), i % 2, T0 + 99)
        for i in range(BATCH)
    ]
    asyncio.run(trainer.run(FakeStream([FakeEvent(TOPIC_LABELED, 0, 0,
                                                   encode_labeled(examples))])))  # fmt: skip
    ((_, scored),) = out.scored.sent
    monitor = MonitorAgent(app, rt, out)
    events = [FakeEvent("scored", 0, i, scored) for i in range(2)]
    asyncio.run(monitor.run(FakeStream(events)))  # type: ignore[arg-type]
    assert sample(rt.metrics, "streamrec_duplicate_examples_total", stage="monitor") == BATCH
