"""The trainer's and monitor's idempotency horizon (:class:`stream.services.SeenKeys`)."""

from __future__ import annotations

import random
import tracemalloc

import pytest

from logs.events import Impression, LabeledExample
from stream.services import SeenKeys


def _examples(ids: list[int], label: int = 0) -> list[LabeledExample]:
    return [LabeledExample(Impression(f"imp-{k:012d}", 0.0, "u", "i"), label, 1.0) for k in ids]


def test_batches_drop_what_was_seen_within_the_horizon_and_keep_what_is_older() -> None:
    horizon = 1_000
    seen = SeenKeys(horizon)
    rng = random.Random(7)
    order: list[int] = []  # distinct keys in the order they were first accepted
    next_id = 0
    checked = {"recent": 0, "ancient": 0}
    for _ in range(300):
        batch = []
        for _ in range(rng.randint(1, 40)):
            if order and rng.random() < 0.4:
                batch.append(order[-rng.randint(1, min(len(order), 3 * horizon))])  # replay
            else:
                batch.append(next_id)
                next_id += 1
        last = {k: i for i, k in enumerate(order)}  # a key accepted again is young again
        recent = {k for k, i in last.items() if i >= len(order) - horizon}
        ancient = {k for k, i in last.items() if i < len(order) - horizon - horizon // 4}
        fresh = [int(e.impression.impression_id[4:]) for e in seen.filter(_examples(batch))]
        for k in batch:
            if k in recent:
                assert k not in fresh  # within the newest `horizon`: a redelivery
                checked["recent"] += 1
            elif k in ancient:
                assert k in fresh  # long forgotten: new again
                checked["ancient"] += 1
        assert len(fresh) == len(set(fresh))  # a duplicate inside one batch goes too
        order.extend(fresh)
    assert min(checked.values()) > 100, checked  # both sides were exercised


def test_a_correction_is_not_a_duplicate_of_its_negative() -> None:
    seen = SeenKeys(10)
    assert len(seen.filter(_examples([1, 2], label=0))) == 2
    assert len(seen.filter(_examples([1], label=1))) == 1
    assert seen.filter(_examples([1, 2], label=0)) == []


def test_first_time_and_filter_share_one_memory() -> None:
    seen = SeenKeys(100)
    assert seen.first_time(("imp-000000000001", 0))
    assert seen.filter(_examples([1])) == []


def test_a_full_horizon_costs_bytes_not_hundreds_of_bytes_per_key() -> None:
    # the OrderedDict it replaced held ~226 B per key (bench/results/memory_probe_400k.json)
    n = 200_000
    examples = _examples(list(range(n)))
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        seen = SeenKeys(n)
        for i in range(0, n, 1_000):
            seen.filter(examples[i : i + 1_000])
        per_key = (tracemalloc.get_traced_memory()[0] - before) / n
    finally:
        tracemalloc.stop()
    assert len(seen) >= n * 7 // 8
    assert per_key < 20, per_key
    assert seen.nbytes < 20 * n


def test_a_horizon_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="horizon"):
        SeenKeys(0)
