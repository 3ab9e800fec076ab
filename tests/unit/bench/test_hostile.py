"""The soak's hostile generator: each record gets the reason the joiner dead-letters it with."""

from __future__ import annotations

import random

from prometheus_client import CollectorRegistry

from bench.hostile import hostile_records
from monitoring.metrics import StreamrecMetrics
from stream.services import JoinService
from stream.settings import Settings

TS_RANGE = (1_700_000_000.0, 1_700_003_600.0)


def test_oversized_adds_the_three_records_over_the_size_limits() -> None:
    plain = hostile_records(random.Random(1), TS_RANGE, 50, oversized=False)
    big = hostile_records(random.Random(1), TS_RANGE, 50)
    assert len(plain) == 50 and len(big) == 53
    assert not any(b.reason == "too_large" for b in plain)
    sizes = sorted(len(b.value) for b in big if b.reason == "too_large")
    assert len(sizes) == 3 and sizes[0] > 64 * 1024 and sizes[-1] > 1_500_000


def test_every_record_is_dead_lettered_with_its_constructed_reason() -> None:
    js = JoinService(Settings(), StreamrecMetrics(CollectorRegistry()))
    bad = hostile_records(random.Random(7), TS_RANGE, 400)
    kinds = set()
    for b in bad:
        labels, dead = js.handle_record(b.value, b.topic, 0, 0)
        assert [d.reason for d in dead] == [b.reason], (b.kind, b.value[:120])
        kinds.add(b.kind)
    assert len(kinds) >= 15  # the draw covers most of the makers, not one of them
