"""Through the embedded broker: a feature follower (what a ``serve`` or ``trainer`` worker
runs) reads ``impressions`` and ``clicks`` outside any consumer group while a paced
producer writes them; afterwards its stages peek what a :class:`FeatureStage` fed the
same events peeks (non-empty history for every user), and a garbage record on the topic
is skipped and counted."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.follower import follow_paced
from logs.events import TOPIC_IMPRESSIONS
from stream.app import create_worker_topics
from stream.broker import EmbeddedBroker, strip_scheme
from stream.settings import Settings

pytestmark = pytest.mark.integration


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[EmbeddedBroker]:
    with EmbeddedBroker(log_path=tmp_path / "tansu.log") as b:
        yield b


def test_a_follower_peeks_the_joiners_features_through_the_broker(
    broker: EmbeddedBroker,
) -> None:
    from kafka import KafkaProducer

    bootstrap = strip_scheme(broker.url)
    create_worker_topics(Settings(broker=bootstrap, partitions=4))
    producer = KafkaProducer(bootstrap_servers=bootstrap)
    producer.send(TOPIC_IMPRESSIONS, key=b"u1", value=b"{not json").get(timeout=30)
    producer.close()
    report = asyncio.run(follow_paced(bootstrap, n=600, rate=300.0, seed=3, timeout_s=90.0))
    assert report["events_applied"] == report["events_sent"] > 600  # impressions + clicks
    assert report["skipped"] == {"bad_json": 1}
    # most users (600 impressions over 200 users) have history, and it is the reference's
    assert report["peeks_nonempty"] > report["peeks_compared"] // 2 > 100
    assert report["identical"], report
    staleness = report["staleness_s"]
    assert staleness["samples"] > 0 and math.isfinite(staleness["max"])
    print("follower staleness (s):", staleness)
