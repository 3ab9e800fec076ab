"""``replay`` into the embedded broker: envelopes land on the right partitions, and
``speedup`` paces events within a stated tolerance of their scaled event time."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from logs.events import TOPIC_CLICKS, TOPIC_IMPRESSIONS, Impression, InvalidEvent
from logs.io import read_log_frame
from logs.synthetic import SyntheticConfig, write_synthetic
from stream.app import create_worker_topics
from stream.broker import EmbeddedBroker, read_records
from stream.envelope import decode_envelope, is_envelope
from stream.producer import partition_of
from stream.replay import replay
from stream.settings import Settings

pytestmark = pytest.mark.integration

#: Pacing tolerance: an event leaves at most this long after the earliest-leaving event's
#: offset from its schedule (wall seconds; the producer lingers 5 ms, the broker stamps).
PACING_TOLERANCE_S = 0.25


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[EmbeddedBroker]:
    with EmbeddedBroker(log_path=tmp_path / "tansu.log") as b:
        create_worker_topics(Settings(broker=b.url), b.url)
        yield b


def _events(b: EmbeddedBroker, topic: str) -> list[tuple[int, float, object]]:
    out = []
    for r in read_records(b.url, topic):
        if is_envelope(r.value):
            for event, _ in decode_envelope(r.value, topic):
                assert not isinstance(event, InvalidEvent)
                out.append((r.partition, r.timestamp / 1000, event))
    return out


def test_envelopes_hold_every_event_once_on_its_key_partition(
    broker: EmbeddedBroker, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    log = tmp_path / "log.csv"
    write_synthetic(SyntheticConfig(n_impressions=3000, seed=2, drift_at=None), log)
    df = read_log_frame(log)
    caplog.set_level(logging.WARNING)
    stats = replay(log, broker.url, progress=False)
    # nothing printed at the user (kafka-python warned that acks=1 disables idempotence)
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert stats.records < (stats.impressions + stats.clicks) / 10  # batched
    n_parts = Settings().partitions
    for topic, expected in (
        (TOPIC_IMPRESSIONS, sorted(df["impression_id"])),
        (TOPIC_CLICKS, sorted(df.loc[df["click"] == 1, "impression_id"])),
    ):
        events = _events(broker, topic)
        assert sorted(e.impression_id for _, _, e in events) == expected  # type: ignore[attr-defined]
        for partition, _, e in events:
            # keyed by user_id: clicks carry it too (co-partitioned with their impression)
            assert partition == partition_of(e.user_id.encode(), n_parts)  # type: ignore[attr-defined]
    imps = [e for _, _, e in _events(broker, TOPIC_IMPRESSIONS)]
    assert all(isinstance(e, Impression) and e.true_p is not None for e in imps)


def test_speedup_paces_events_to_their_scaled_event_time(
    broker: EmbeddedBroker, tmp_path: Path
) -> None:
    log = tmp_path / "log.csv"
    # 10 impressions per event second; 40 event seconds at speedup 20 -> 2 wall seconds
    write_synthetic(
        SyntheticConfig(n_impressions=400, seed=3, drift_at=None, impressions_per_s=10), log
    )
    df = read_log_frame(log)
    ts0 = float(df["ts"].min())
    speedup = 20.0
    t_start = time.time()
    stats = replay(log, broker.url, progress=False, speedup=speedup, final_watermark_gap_s=0)
    late = np.array(
        [t - (t_start + (e.ts - ts0) / speedup) for _, t, e in _events(broker, TOPIC_IMPRESSIONS)]  # type: ignore[attr-defined]
    )
    assert len(late) == len(df)
    span = float(df["ts"].max() - ts0) / speedup
    assert stats.seconds >= span - PACING_TOLERANCE_S  # not faster than the schedule
    assert float(np.max(late - late.min())) <= PACING_TOLERANCE_S
