"""Memory diagnostics of the worker (:mod:`stream.memdiag`): periodic trim, tracemalloc."""

from __future__ import annotations

import json
import time
import tracemalloc
from pathlib import Path

import pytest

from stream.memdiag import (
    MallocTrimmer,
    TracemallocDumper,
    census,
    census_from_env,
    tracemalloc_from_env,
)
from stream.settings import Settings


def _wait(cond: object, timeout_s: float = 10.0) -> None:
    t0 = time.monotonic()
    while not cond():  # type: ignore[operator]
        if time.monotonic() - t0 > timeout_s:
            raise AssertionError("timed out")
        time.sleep(0.01)


def test_trimmer_calls_trim_periodically_and_stops() -> None:
    trimmer = MallocTrimmer(0.02)
    trimmer.start()
    _wait(lambda: trimmer.trims >= 3)
    trimmer.stop()
    trimmer.join(timeout=5)
    assert not trimmer.is_alive()
    n = trimmer.trims
    time.sleep(0.1)
    assert trimmer.trims == n  # stopped means stopped


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan")])
def test_trimmer_rejects_a_non_positive_interval(bad: float) -> None:
    with pytest.raises(ValueError):
        MallocTrimmer(bad)


@pytest.mark.parametrize("bad", [-1.0, float("nan")])
def test_memory_trim_setting_is_validated(bad: float) -> None:
    assert Settings().memory_trim_s == 0.0  # off by default: the writer's trims only
    with pytest.raises(ValueError, match="memory_trim_s"):
        Settings(memory_trim_s=bad)


def _grow(keep: list[bytes]) -> None:
    keep.extend(bytes(1000) + bytes([i % 256]) for i in range(3000))  # ~3 MB


def test_tracemalloc_dump_names_the_line_that_grows(tmp_path: Path) -> None:
    was_tracing = tracemalloc.is_tracing()
    dumper = TracemallocDumper(tmp_path, interval_s=3600.0)  # ticked by hand
    dumper.start()
    try:
        dumper.tick()  # the baseline
        keep: list[bytes] = []
        _grow(keep)
        dumper.tick()
    finally:
        dumper.stop()
        dumper.join(timeout=5)
        if not was_tracing:
            tracemalloc.stop()
    files = sorted(tmp_path.glob("tm_*.txt"))
    assert len(files) == 2
    assert "baseline" in files[0].read_text()
    diff = files[1].read_text()
    top = diff.split("\n\n")[1]  # the largest difference comes first
    assert top.startswith("+") and "test_memdiag.py" in top, top
    mb = float(top.split(" MB")[0])
    assert 2.5 < mb < 10, top
    assert len(keep) == 3000


def test_tracemalloc_is_off_without_the_variable(tmp_path: Path) -> None:
    assert tracemalloc_from_env({}) is None
    assert tracemalloc_from_env({"STREAMREC_TRACEMALLOC": ""}) is None
    was_tracing = tracemalloc.is_tracing()
    dumper = tracemalloc_from_env({"STREAMREC_TRACEMALLOC": str(tmp_path / "tm"),
                                   "STREAMREC_TRACEMALLOC_EVERY_S": "0.05"})  # fmt: skip
    assert dumper is not None
    try:
        _wait(lambda: dumper.dumps >= 2)
    finally:
        dumper.stop()
        dumper.join(timeout=5)
        if not was_tracing:
            tracemalloc.stop()
    assert len(list((tmp_path / "tm").glob("tm_*.txt"))) >= 2


def test_census_counts_the_bytes_of_live_tensors(tmp_path: Path) -> None:
    import torch

    before = census()
    held = [torch.nn.Parameter(torch.zeros(1_000_000)) for _ in range(4)]  # 16 MB
    view = held[0][::2]  # a view: its bytes are held[0]'s, not counted twice
    after = census()
    assert 15.5 < after["torch_tensor_mb"] - before["torch_tensor_mb"] < 17.5
    assert after["torch_tensors"] - before["torch_tensors"] >= 4
    assert after["types"]["Parameter"] >= 4
    del held, view
    assert census()["torch_tensor_mb"] < after["torch_tensor_mb"] - 15

    c = census_from_env({"STREAMREC_CENSUS": str(tmp_path), "STREAMREC_CENSUS_EVERY_S": "0.05"})
    assert c is not None and census_from_env({}) is None
    try:
        _wait(lambda: c.rows >= 2)
    finally:
        c.stop()
        c.join(timeout=5)
    rows = [json.loads(line) for line in (tmp_path / "census.jsonl").read_text().splitlines()]
    assert len(rows) >= 2 and rows[0]["t_s"] < rows[1]["t_s"] and rows[0]["rss_mb"] > 0


def test_heap_gauges_export_the_c_heap_and_follow_an_allocation() -> None:
    """``malloc_bytes{kind}`` at start and again after 64 MB are malloc'ed and held."""
    from monitoring.metrics import StreamrecMetrics
    from stream.heap import malloc_totals
    from stream.memdiag import HeapGauges

    if malloc_totals() is None:
        pytest.skip("no mallinfo2 in this C library")
    metrics = StreamrecMetrics()

    def in_use() -> float | None:
        return metrics.registry.get_sample_value("streamrec_malloc_bytes", {"kind": "in_use"})

    gauges = HeapGauges(metrics.malloc_bytes, interval_s=0.02)
    gauges.start()
    try:
        _wait(lambda: gauges.reads >= 1)
        first = in_use()
        assert first is not None and first > 0
        held = [bytearray(64 << 10) for _ in range(1024)]  # 64 MB in malloc's arenas
        n = gauges.reads
        _wait(lambda: gauges.reads >= n + 2)
        got = in_use()
        assert got is not None and got - first > 50e6, (first, got)
        kinds = {"in_use", "free", "arenas", "mmapped"}
        for kind in kinds:
            assert (
                metrics.registry.get_sample_value("streamrec_malloc_bytes", {"kind": kind})
                is not None
            )
        del held
    finally:
        gauges.stop()
        gauges.join(timeout=5)
    assert not gauges.is_alive()
