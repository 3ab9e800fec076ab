"""Batched event envelopes: the format, the producer's partitioning and the joiner's path."""

from __future__ import annotations

import random
from typing import Any

import msgspec
import pytest
from kafka.partitioner.default import DefaultPartitioner

from learners.encoding import EncoderConfig
from learners.ranker import RankerConfig
from logs.events import (
    TOPIC_CLICKS,
    TOPIC_IMPRESSIONS,
    Click,
    Impression,
    InvalidEvent,
    Watermark,
)
from monitoring.metrics import StreamrecMetrics
from stream.envelope import (
    ENVELOPE_MAGIC,
    decode_envelope,
    encode_envelope,
    encode_envelope_raw,
    is_envelope,
)
from stream.join import JoinConfig
from stream.producer import EventProducer, partition_of
from stream.services import JoinService, MemoryJoinState
from stream.settings import Settings

T0 = 1_700_000_000.0


def imp(i: int, user: str = "u1", **extra: Any) -> dict[str, Any]:
    d: dict[str, Any] = {
        "impression_id": f"i{i}",
        "ts": T0 + i,
        "user_id": user,
        "item_id": f"it{i % 7}",
        "position": 1 + i % 3,
        "features": {"dev": "ios", "price": 1.5 * i},
    }
    d.update(extra)
    return d


def test_round_trip_keeps_every_field() -> None:
    events = [imp(i) for i in range(5)]
    decoded = decode_envelope(encode_envelope(TOPIC_IMPRESSIONS, events), TOPIC_IMPRESSIONS)
    got = [e for e, _ in decoded]
    assert all(isinstance(e, Impression) for e in got)
    assert [e.to_dict() for e in got] == [Impression(**d).to_dict() for d in events]  # type: ignore[union-attr]


def test_a_bad_event_is_rejected_alone() -> None:
    events: list[Any] = [imp(0), {"impression_id": "x", "ts": "soon"}, [1, 2], imp(3)]
    decoded = decode_envelope(encode_envelope(TOPIC_IMPRESSIONS, events), TOPIC_IMPRESSIONS)
    kinds = [type(e).__name__ if not isinstance(e, InvalidEvent) else e.reason for e, _ in decoded]
    assert kinds == ["Impression", "bad_type", "not_an_object", "Impression"]
    # the rejected event's own bytes are kept for its dead letter
    assert msgspec.msgpack.decode(decoded[1][1]) == {"impression_id": "x", "ts": "soon"}


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (ENVELOPE_MAGIC + b"\x02" + b"\x80", "unsupported_version"),
        (ENVELOPE_MAGIC + b"\x01" + b"\xc1\xc1", "bad_envelope"),
        (ENVELOPE_MAGIC + b"\x01", "bad_envelope"),
        (ENVELOPE_MAGIC + b"\x01" + msgspec.msgpack.encode({"k": "clicks"}), "bad_envelope"),
        (ENVELOPE_MAGIC + b"\x01" + msgspec.msgpack.encode([1, 2]), "bad_envelope"),
    ],
)
def test_an_undecodable_envelope_is_rejected_whole(raw: bytes, reason: str) -> None:
    with pytest.raises(InvalidEvent) as info:
        decode_envelope(raw, TOPIC_CLICKS)
    assert info.value.reason == reason


def test_an_envelope_on_the_wrong_topic_is_rejected() -> None:
    raw = encode_envelope(TOPIC_CLICKS, [{"impression_id": "a", "ts": T0}])
    with pytest.raises(InvalidEvent, match="on 'impressions'"):
        decode_envelope(raw, TOPIC_IMPRESSIONS)


def test_an_oversized_event_inside_is_rejected_alone() -> None:
    big = imp(1, features={"blob": "x" * 1000} | {f"f{k}": "y" * 1000 for k in range(80)})
    decoded = decode_envelope(encode_envelope(TOPIC_IMPRESSIONS, [big, imp(2)]), TOPIC_IMPRESSIONS)
    assert isinstance(decoded[0][0], InvalidEvent) and decoded[0][0].reason == "too_large"
    assert isinstance(decoded[1][0], Impression)


def test_json_records_are_not_envelopes() -> None:
    assert not is_envelope(Click("a", T0).to_json())
    assert not is_envelope(None)
    assert is_envelope(encode_envelope_raw(TOPIC_CLICKS, []))


def test_partition_of_agrees_with_kafka_default_partitioner() -> None:
    class Cluster:
        def topics(self) -> set[str]:
            return {"t"}

        def partitions_for_topic(self, _: str) -> set[int]:
            return set(range(7))

        def available_partitions_for_topic(self, _: str) -> set[int]:
            return set(range(7))

    kafka = DefaultPartitioner()
    rng = random.Random(0)
    for _ in range(500):
        key = f"user-{rng.randrange(10**9)}".encode()
        assert partition_of(key, 7) == kafka.partition("t", key, key, None, None, Cluster())


class RecordingProducer:
    """The two calls EventProducer makes of a kafka-python producer, recorded."""

    def __init__(self, n_partitions: int) -> None:
        self.n = n_partitions
        self.sent: list[tuple[str, int, bytes]] = []

    def partitions_for(self, topic: str) -> set[int]:
        return set(range(self.n))

    def send(self, topic: str, *, value: bytes, partition: int) -> None:
        self.sent.append((topic, partition, value))

    def flush(self, timeout: float | None = None) -> None:
        pass


def test_producer_groups_by_partition_within_limits() -> None:
    rec = RecordingProducer(4)
    p = EventProducer(rec, max_events=10, max_bytes=2000, linger_s=60.0, key_field="impression_id")
    events = [imp(i, user=f"u{i % 13}") for i in range(200)]
    for e in events:
        p.send_impression(e)
    p.flush()
    seen: list[str] = []
    for topic, partition, value in rec.sent:
        assert topic == TOPIC_IMPRESSIONS and len(value) <= 2000 + 16
        decoded = decode_envelope(value, topic)
        assert 1 <= len(decoded) <= 10
        for e, _ in decoded:
            assert isinstance(e, Impression)
            assert partition_of(e.impression_id.encode(), 4) == partition
            seen.append(e.impression_id)
    assert sorted(seen) == sorted(e["impression_id"] for e in events)  # nothing lost or doubled
    # order within a partition is the send order
    for part in range(4):
        ids = [i for i in seen if partition_of(i.encode(), 4) == part]
        assert ids == [e["impression_id"] for e in events if partition_of(
            e["impression_id"].encode(), 4) == part]  # fmt: skip


def test_producer_lingers_at_most_linger_s() -> None:
    rec = RecordingProducer(1)
    p = EventProducer(rec, max_events=1000, linger_s=0.0)
    p.send_click({"impression_id": "a", "ts": T0})
    p.poll()
    assert len(rec.sent) == 1


def _service() -> JoinService:
    settings = Settings(
        ranker=RankerConfig(model="logreg", encoder=EncoderConfig(num_buckets=2**12)),
        join=JoinConfig(window_s=60.0, lateness_s=0.0),
    )
    return JoinService(settings, StreamrecMetrics(), MemoryJoinState())


def test_joiner_labels_envelopes_like_json_records() -> None:
    events = [imp(i, user=f"u{i % 3}") for i in range(30)]
    clicks = [{"impression_id": f"i{i}", "ts": T0 + i + 5} for i in range(0, 30, 4)]
    wm = Watermark(T0 + 500).to_json()

    json_svc, env_svc = _service(), _service()
    json_out = []
    for e in events:
        json_out += json_svc.handle_record(Impression(**e).to_json(), TOPIC_IMPRESSIONS, 0, 0)[0]
    for c in clicks:
        json_out += json_svc.handle_record(Click(**c).to_json(), TOPIC_CLICKS, 0, 0)[0]
    env_out = env_svc.handle_record(
        encode_envelope(TOPIC_IMPRESSIONS, events), "impressions", 0, 0
    )[0]
    env_out += env_svc.handle_record(encode_envelope(TOPIC_CLICKS, clicks), TOPIC_CLICKS, 0, 0)[0]
    for svc, out in ((json_svc, json_out), (env_svc, env_out)):
        for topic in (TOPIC_IMPRESSIONS, TOPIC_CLICKS):
            out += svc.handle_record(wm, topic, 0, 1)[0]

    def labels(out: list[Any]) -> list[tuple[str, int]]:
        return sorted((e.impression.impression_id, e.label) for e in out)

    assert labels(env_out) == labels(json_out)
    assert len(env_out) == 30 and sum(e.label for e in env_out) == len(clicks)


def test_joiner_dead_letters_bad_events_of_an_envelope_and_keeps_the_rest() -> None:
    svc = _service()
    events: list[Any] = [imp(0), {"impression_id": "bad"}, imp(2)]
    out, dead = svc.handle_record(
        encode_envelope(TOPIC_IMPRESSIONS, events), TOPIC_IMPRESSIONS, 3, 17
    )
    assert [(d.reason, d.partition, d.offset) for d in dead] == [("missing_field", 3, 17)]
    assert set(svc.joiner(3).pending) == {"i0", "i2"}
    out, dead = svc.handle_record(ENVELOPE_MAGIC + b"\x07", TOPIC_IMPRESSIONS, 3, 18)
    assert out == [] and [d.reason for d in dead] == ["unsupported_version"]


def test_the_same_events_in_json_and_in_an_envelope_are_labelled_once() -> None:
    """A producer that retries a batch in the other form (JSON records, then an envelope
    holding the same events, and again JSON; clicks too): every impression is labelled
    once, with the label the first delivery earns, and the repeats are counted."""
    svc = _service()
    events = [imp(i, user=f"u{i % 3}") for i in range(12)]
    clicks = [{"impression_id": f"i{i}", "ts": T0 + i + 5} for i in range(0, 12, 3)]
    out = []
    for e in events[:6]:
        out += svc.handle_record(Impression(**e).to_json(), TOPIC_IMPRESSIONS, 0, 0)[0]
    out += svc.handle_record(encode_envelope(TOPIC_IMPRESSIONS, events), TOPIC_IMPRESSIONS, 0, 1)[0]
    for e in events[4:]:
        out += svc.handle_record(Impression(**e).to_json(), TOPIC_IMPRESSIONS, 0, 2)[0]
    out += svc.handle_record(encode_envelope(TOPIC_CLICKS, clicks), TOPIC_CLICKS, 0, 3)[0]
    for c in clicks:
        out += svc.handle_record(Click(**c).to_json(), TOPIC_CLICKS, 0, 4)[0]
    wm = Watermark(T0 + 5000).to_json()
    for topic in (TOPIC_IMPRESSIONS, TOPIC_CLICKS):
        out += svc.handle_record(wm, topic, 0, 5)[0]
    ids = [e.impression.impression_id for e in out]
    assert sorted(ids) == sorted(f"i{i}" for i in range(12))  # each once
    assert {e.impression.impression_id for e in out if e.label} == {
        c["impression_id"] for c in clicks
    }
    c = svc.joiner(0).counters
    assert c.duplicate_impressions == 6 + 8
    assert c.duplicate_clicks == len(clicks)


def test_envelopes_get_the_feature_stage_values_of_one_event_at_a_time() -> None:
    """The joiner runs the feature stage once per envelope (its batch path): every
    labelled example carries the same ``hist_*`` values as when the same events come as
    JSON records one by one, with duplicates inside and across envelopes, clicks between
    impression envelopes and conversions (which the stage never sees) among the clicks."""
    rng = random.Random(5)
    events = [imp(i, user=f"u{i % 4}") for i in range(60)]
    events.insert(10, dict(events[3]))  # a duplicate inside an envelope ...
    events.append(dict(events[20]))  # ... and one in a later envelope
    clicked = sorted(rng.sample(range(60), 15))
    clicks: list[dict[str, Any]] = [{"impression_id": f"i{i}", "ts": T0 + i + 2} for i in clicked]
    clicks += [
        {"impression_id": f"i{i}", "ts": T0 + i + 3, "type": "conversion"} for i in clicked[:4]
    ]
    clicks.sort(key=lambda c: c["ts"])

    def record(topic: str, e: dict[str, Any]) -> bytes:
        if topic == TOPIC_IMPRESSIONS:
            return Impression(**e).to_json()
        return Click(
            e["impression_id"], e["ts"], conversion=e.get("type") == "conversion"
        ).to_json()

    # arrival order: impressions in envelopes of 8, each followed by the clicks due by then
    batches: list[tuple[str, list[dict[str, Any]]]] = []
    k = 0
    for start in range(0, len(events), 8):
        chunk = events[start : start + 8]
        batches.append((TOPIC_IMPRESSIONS, chunk))
        due = max(e["ts"] for e in chunk)
        take = [c for c in clicks[k:] if c["ts"] <= due]
        k += len(take)
        if take:
            batches.append((TOPIC_CLICKS, take))
    batches.append((TOPIC_CLICKS, clicks[k:]))
    json_svc, env_svc = _service(), _service()
    json_out, env_out = [], []
    for topic, chunk in batches:
        for e in chunk:
            json_out += json_svc.handle_record(record(topic, e), topic, 0, 0)[0]
        env_out += env_svc.handle_record(encode_envelope(topic, chunk), topic, 0, 0)[0]
    wm = Watermark(T0 + 5000).to_json()
    for svc, out in ((json_svc, json_out), (env_svc, env_out)):
        for topic in (TOPIC_IMPRESSIONS, TOPIC_CLICKS):
            out += svc.handle_record(wm, topic, 0, 1)[0]

    def rows(out: list[Any]) -> list[tuple[str, int, list[tuple[str, object]]]]:
        return sorted(
            (e.impression.impression_id, e.label, sorted(e.impression.features.items()))
            for e in out
        )

    assert len(env_out) == 60
    assert any(k.startswith("hist_") for k in env_out[0].impression.features)
    assert rows(env_out) == rows(json_out)
    assert env_svc.features[0].stats == json_svc.features[0].stats
    assert env_svc.features[0].stats["duplicate_impressions"] == 2
    # the counters, incremented once per envelope, agree with one event at a time
    series = [("impressions", None), ("clicks", None), ("conversion_events", None),
              ("labeled", "positive"), ("labeled", "negative")]  # fmt: skip

    def counts(svc: JoinService) -> list[float | None]:
        reg = svc.metrics.registry
        return [reg.get_sample_value(f"streamrec_{name}_total", {"label": label} if label else {})
                for name, label in series]  # fmt: skip

    assert counts(env_svc) == counts(json_svc)
    assert counts(env_svc)[:3] == [62, len(clicked), 4]
