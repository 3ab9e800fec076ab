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
