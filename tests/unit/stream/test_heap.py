"""Returning the C heap's free memory to the OS (:mod:`stream.heap`)."""

from __future__ import annotations

import ctypes
import platform

import pytest

import stream.heap as heap


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                    reason="malloc_trim is glibc's")  # fmt: skip
def test_freed_heap_memory_goes_back_to_the_os() -> None:
    def rss_kb() -> int:
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")

    heap.trim_heap()
    # many small blocks (below the mmap threshold: they come from the heap), touched,
    # then freed while the last one pins the top of the heap so free() cannot shrink it
    blocks = [ctypes.create_string_buffer(4096) for _ in range(40_000)]
    pin = ctypes.create_string_buffer(4096)
    del blocks
    before = rss_kb()
    assert heap.trim_heap() is True
    assert before - rss_kb() > 50_000  # of ~160 MB freed, most returned
    del pin


def test_without_malloc_trim_it_reports_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(heap, "_malloc_trim", lambda: None)
    assert heap.trim_heap() is None


def test_a_failing_trim_never_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(_pad: int) -> int:
        raise OSError("no")

    monkeypatch.setattr(heap, "_malloc_trim", lambda: boom)
    assert heap.trim_heap() is None


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                    reason="mallinfo2 is glibc's")  # fmt: skip
def test_malloc_totals_follow_what_is_allocated_and_freed() -> None:
    before = heap.malloc_totals()
    assert before is not None and set(before) == {"arenas", "in_use", "free", "mmapped"}
    blocks = [ctypes.create_string_buffer(4096) for _ in range(20_000)]  # ~82 MB
    during = heap.malloc_totals()
    assert during is not None and 60 < during["in_use"] - before["in_use"] < 120
    assert during["arenas"] >= during["in_use"]  # in use inside the arenas (mmapped apart)
    del blocks
    after = heap.malloc_totals()
    assert after is not None and during["in_use"] - after["in_use"] > 60


_THRESHOLD_PROBE = """
import ctypes, json, sys
import stream.heap as heap

def mapped_mb():
    return heap.malloc_totals()["mmapped"]

done = heap.set_mmap_threshold(2**20) if sys.argv[1] == "set" else None
big = ctypes.create_string_buffer(16 * 2**20)  # mapped; freed, it raises a moving threshold
del big
base = mapped_mb()
block = ctypes.create_string_buffer(4 * 2**20)
during = mapped_mb() - base
del block
print(json.dumps({"done": done, "during": during, "after_free": mapped_mb() - base}))
"""


def _probe(mode: str) -> dict[str, float]:
    import json
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _THRESHOLD_PROBE, mode], capture_output=True,
                         text=True, check=True, timeout=60)  # fmt: skip
    got: dict[str, float] = json.loads(out.stdout)
    return got


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                    reason="mallopt is glibc's")  # fmt: skip
def test_a_set_mmap_threshold_keeps_large_blocks_out_of_the_heap() -> None:
    """In fresh processes (mallopt changes the whole process): once a 16 MiB block was
    freed, glibc's moving threshold serves a 4 MiB block from its heap (which keeps it
    when freed); with the threshold set to 1 MiB first, the same block gets its own
    mapping and goes back to the OS when freed."""
    moving = _probe("default")
    assert moving["done"] is None and abs(moving["during"]) < 0.5  # from the heap
    fixed = _probe("set")
    assert fixed["done"] is True
    assert 4.0 <= fixed["during"] < 4.5  # its own mapping (4 MiB = 4.19 MB, plus a page)
    assert abs(fixed["after_free"]) < 0.5  # unmapped when freed


def test_set_mmap_threshold_rejects_sizes_glibc_would_refuse() -> None:
    for bad in (0, -1, heap.MAX_MMAP_THRESHOLD + 1):
        with pytest.raises(ValueError, match="mmap threshold"):
            heap.set_mmap_threshold(bad)


def test_without_mallopt_the_threshold_reports_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(heap, "_mallopt", lambda: None)
    assert heap.set_mmap_threshold(2**20) is None


def test_the_workers_setting_yields_to_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []

    def record(nbytes: int) -> bool:
        calls.append(nbytes)
        return True

    monkeypatch.setattr(heap, "set_mmap_threshold", record)
    assert heap.configure_mmap_threshold(1024, env={}) is True
    assert heap.configure_mmap_threshold(0, env={}) is None  # 0: glibc's own threshold
    env = {heap.MMAP_THRESHOLD_ENV: "65536"}  # the user's choice, read by glibc at start
    assert heap.configure_mmap_threshold(1024, env=env) is None
    assert calls == [1024 * 1024]


def test_the_setting_is_checked() -> None:
    from stream.settings import Settings

    assert Settings().malloc_mmap_threshold_kb == 1024
    for bad in (-1, 32 * 1024 + 1):
        with pytest.raises(ValueError, match="malloc_mmap_threshold_kb"):
            Settings(malloc_mmap_threshold_kb=bad)
