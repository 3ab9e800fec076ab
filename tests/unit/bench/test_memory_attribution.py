"""bench.memory_attribution reads what stream.memdiag wrote and names what grew."""

from __future__ import annotations

import gc
import time
import tracemalloc
from pathlib import Path

from bench.memory_attribution import census_summary, tracemalloc_summary
from stream.memdiag import Census, TracemallocDumper


class Grower:
    pass


def _grow(keep: list[bytes]) -> None:
    keep.extend(bytes(2000) + bytes([i % 256]) for i in range(2000))  # ~4 MB


def test_the_growing_line_is_the_top_site(tmp_path: Path) -> None:
    was_tracing = tracemalloc.is_tracing()
    dumper = TracemallocDumper(tmp_path, interval_s=3600.0)
    dumper.start()
    keep: list[bytes] = []
    try:
        dumper.tick()
        _grow(keep)
        dumper.tick()
    finally:
        dumper.stop()
        if not was_tracing:
            tracemalloc.stop()
    s = tracemalloc_summary(tmp_path, root=str(Path(__file__).parent) + "/")
    assert len(s["series_t_s_traced_mb"]) == 2
    site, mb, blocks = s["top_sites_mb"][0]
    assert site.startswith("test_memory_attribution.py:"), s["top_sites_mb"][:3]
    assert 3.5 < mb < 8 and blocks >= 2000
    assert len(keep) == 2000


def test_census_summary_sees_objects_grow(tmp_path: Path) -> None:
    # the census counts every live object of the process: garbage left by earlier tests,
    # collected between two ticks, made the total shrink under CI's test order
    gc.collect()
    c = Census(tmp_path, interval_s=3600.0)
    c.start()
    keep: list[object] = []
    gc.disable()
    try:
        for _ in range(4):
            keep.extend(Grower() for _ in range(5000))
            time.sleep(0.2)  # the census stamps rows to 0.1 s: distinct times for the fit
            c.tick()
    finally:
        gc.enable()
        c.stop()
    s = census_summary(tmp_path / "census.jsonl", warmup_frac=0.0)
    assert s["rows"] == 4
    assert s["slopes"]["objects"]["per_h"] > 0
    grown = dict(s["types_grown_after_warmup"])
    assert grown.get("Grower", 0) >= 15_000
