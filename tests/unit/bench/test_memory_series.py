"""The soak's memory series: RSS samples, their split by mapping, robust slopes."""

from __future__ import annotations

import math
import mmap
import os
import time

import numpy as np

from bench.memory_series import RssSampler, parse_smaps, rss_breakdown_mb, rss_mb, slope_fit


def test_the_split_by_mapping_adds_up_to_the_rss_of_a_live_process() -> None:
    kinds = rss_breakdown_mb(os.getpid())
    total = rss_mb(os.getpid())
    assert set(kinds) == {"heap", "anon", "file"}
    assert all(v >= 0 for v in kinds.values())
    assert kinds["file"] > 0  # the interpreter and its libraries are mapped from files
    assert math.isclose(sum(kinds.values()), total, rel_tol=0.05)


def test_a_new_anonymous_allocation_shows_in_anon_not_in_file() -> None:
    # a mapping of its own (np.ones could reuse resident heap memory freed by an earlier
    # test, and then no RSS would be new)
    size = 64 * 2**20
    before = rss_breakdown_mb(os.getpid())
    block = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    block.write(b"\x01" * size)  # touched: resident
    after = rss_breakdown_mb(os.getpid())
    assert after["anon"] - before["anon"] > 50
    assert abs(after["file"] - before["file"]) < 20
    block.close()


def test_parse_smaps_reads_a_mapping_without_a_name_as_anonymous() -> None:
    text = "7f00-7f10 rw-p 00000000 00:00 0\nRss:  4096 kB\nSize:  8192 kB\n"
    assert parse_smaps(text) == {"heap": 0.0, "anon": 4.0, "file": 0.0}


def test_the_sampler_hands_over_each_interval_once() -> None:
    s = RssSampler(os.getpid(), every_s=0.01)
    s.start()
    time.sleep(0.2)
    first = s.take()
    time.sleep(0.1)
    second = s.take()
    s.stop()
    s.join(timeout=2)
    assert len(first) >= 5 and len(second) >= 3
    assert all(v > 0 for v in first + second)
    assert not s.is_alive()


def test_theil_sen_ignores_spikes_that_bend_least_squares() -> None:
    rng = np.random.default_rng(0)
    t = np.arange(0.0, 3600.0, 60.0)  # one point a minute for an hour
    floor = 1000.0 + 10.0 * t / 3600  # 10 MB/h
    y = floor + rng.normal(0, 1, t.size)
    y[-8:] += 90  # copies in flight at the end
    fit = slope_fit(list(t), list(y))
    assert fit is not None
    assert abs(fit.theil_sen - 10.0) < 5.0
    assert fit.ols > 30.0  # least squares is pulled up by the spikes
    clean = slope_fit(list(t), list(floor + rng.normal(0, 1, t.size)))
    assert clean is not None and abs(clean.ols - 10.0) < 3 * clean.se + 1
    assert clean.resolved_below(20.0) and not clean.resolved_below(5.0)
