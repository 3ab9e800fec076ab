"""Python's garbage collector in the worker (:mod:`stream.collector`)."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry, Histogram

from stream.collector import PauseRecorder, configure_collector
from stream.settings import Settings


@pytest.fixture
def restored_collector() -> Iterator[None]:
    """Whatever a test does to the collector is undone after it."""
    before = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*before)


class Node:
    def __init__(self) -> None:
        self.me = self  # a reference cycle: only the collector frees it


@pytest.mark.usefixtures("restored_collector")
def test_the_threshold_is_raised_and_the_start_up_objects_are_frozen() -> None:
    gc.set_threshold(700, 10, 10)
    made_at_start = [Node() for _ in range(100)]
    assert configure_collector(10_000, freeze=True) == (700, 10, 10)
    assert gc.get_threshold() == (10_000, 10, 10)  # the older generations keep theirs
    frozen = gc.get_freeze_count()
    assert frozen >= len(made_at_start)
    # a full collection no longer walks them: it sees only what was made after the freeze
    later = [Node() for _ in range(10)]
    assert gc.is_tracked(later[0])
    del later
    assert gc.collect() >= 10  # the cycles made after the freeze are still collected
    assert gc.get_freeze_count() == frozen


@pytest.mark.usefixtures("restored_collector")
def test_zero_and_no_freeze_leave_pythons_collector_alone() -> None:
    gc.set_threshold(700, 10, 10)
    assert configure_collector(0, freeze=False) == (700, 10, 10)
    assert gc.get_threshold() == (700, 10, 10)
    assert gc.get_freeze_count() == 0
    with pytest.raises(ValueError, match="gen0_threshold"):
        configure_collector(-1, freeze=False)


def test_every_collection_is_timed_by_generation() -> None:
    registry = CollectorRegistry()
    h = Histogram("pause", "doc", ("generation",), registry=registry)
    rec = PauseRecorder(h)
    rec.install()
    rec.install()  # idempotent: one callback, one observation per collection
    try:
        for _ in range(3):
            gc.collect()
        gc.collect(0)
    finally:
        rec.remove()
        rec.remove()
    gc.collect()  # removed: not observed
    full = registry.get_sample_value("pause_count", {"generation": "2"})
    young = registry.get_sample_value("pause_count", {"generation": "0"})
    assert full == 3
    assert young is not None and young >= 1  # and any the interpreter ran by itself
    seconds = registry.get_sample_value("pause_sum", {"generation": "2"})
    assert seconds is not None and 0 < seconds < 10


def test_a_replaced_ranker_is_freed_without_the_collector() -> None:
    # the frozen start-up objects include the first models: were a model in a reference
    # cycle, a replica that swaps it for a store version would keep it for good
    import weakref

    from learners.ranker import RankerConfig, TorchRanker

    ranker = TorchRanker(RankerConfig(), seed=0, online=True)
    model, encoder = weakref.ref(ranker.model), weakref.ref(ranker.encoder)
    gc.disable()
    try:
        del ranker
        assert model() is None and encoder() is None
    finally:
        gc.enable()


def test_the_settings_are_checked() -> None:
    s = Settings()
    assert s.gc_gen0_threshold == 10_000 and s.gc_freeze
    with pytest.raises(ValueError, match="gc_gen0_threshold"):
        Settings(gc_gen0_threshold=-5)
