"""A process's memory over a long run: frequent RSS samples, where it lives, robust slopes.

``bench.soak`` scrapes the worker once a minute, but its RSS swings by up to ±90 MB within a
minute (a model-store version's or a checkpoint's copies in flight, freed and trimmed
seconds later), so a least-squares line through one sample a minute has several %/h of
noise over 20 minutes. The memory *floor* (what stays after every transient copy is freed)
is what grows without bound if anything does. So:

- :class:`RssSampler` samples ``VmRSS`` every few seconds in a thread and hands each
  minute's samples over; the soak records their minimum and maximum per row;
- :func:`rss_breakdown_mb` splits RSS by kind of mapping (``/proc/<pid>/smaps``): the brk
  heap (glibc's main arena), other anonymous mappings (mmap'd arenas, Python's object
  arenas, large tensors), file-backed pages (libraries, RocksDB files), to attribute growth;
- :func:`slope_fit` gives the least-squares slope with its standard error and the
  Theil-Sen slope (median of pairwise slopes, robust to a few outliers), per hour, so a
  report can say whether a slope is resolved at all (bar 1 %/h: ±2 SE must be below it).
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["RssSampler", "SlopeFit", "rss_breakdown_mb", "rss_mb", "slope_fit"]


def rss_mb(pid: int | None) -> float:
    """Resident set size of a live process, MB (``/proc``); nan if unknown."""
    if pid is None:
        return math.nan
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return math.nan


def parse_smaps(text: str) -> dict[str, float]:
    """RSS in MB by kind of mapping from the text of ``/proc/<pid>/smaps``.

    Kinds: ``heap`` (the ``[heap]`` brk mapping), ``anon`` (other anonymous mappings, stacks
    included), ``file`` (mappings of a file path). Sums to the process's RSS.

    >>> text = '''55d0-55e0 rw-p 00000000 00:00 0                  [heap]
    ... Rss:                2048 kB
    ... 7f00-7f10 rw-p 00000000 00:00 0
    ... Rss:                1024 kB
    ... 7f20-7f30 r-xp 00000000 08:01 42              /usr/lib/libc.so.6
    ... Rss:                 512 kB
    ... '''
    >>> parse_smaps(text)
    {'heap': 2.0, 'anon': 1.0, 'file': 0.5}
    """
    out = {"heap": 0.0, "anon": 0.0, "file": 0.0}
    kind = "anon"
    for line in text.splitlines():
        first = line.split(maxsplit=1)[0] if line else ""
        if "-" in first and not first.endswith(":"):  # a mapping's header line
            parts = line.split(maxsplit=5)
            name = parts[5].strip() if len(parts) > 5 else ""
            kind = "heap" if name == "[heap]" else "file" if name.startswith("/") else "anon"
        elif first == "Rss:":
            out[kind] += int(line.split()[1]) / 1024
    return out


def rss_breakdown_mb(pid: int | None) -> dict[str, float]:
    """:func:`parse_smaps` of a live process; nan values if it cannot be read."""
    try:
        return parse_smaps(Path(f"/proc/{pid}/smaps").read_text())
    except (OSError, TypeError, ValueError):
        return {"heap": math.nan, "anon": math.nan, "file": math.nan}


class RssSampler(threading.Thread):
    """Samples a process's RSS every ``every_s`` seconds until :meth:`stop`.

    :meth:`take` returns the samples (MB) since the previous call and starts a new interval.
    """

    def __init__(self, pid: int | None, every_s: float = 5.0) -> None:
        super().__init__(daemon=True, name="rss-sampler")
        self.pid, self.every_s = pid, every_s
        self._samples: list[float] = []
        self._lock = threading.Lock()
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            v = rss_mb(self.pid)
            if math.isfinite(v):
                with self._lock:
                    self._samples.append(v)
            self._halt.wait(self.every_s)

    def take(self) -> list[float]:
        with self._lock:
            out, self._samples = self._samples, []
        return out

    def stop(self) -> None:
        self._halt.set()


@dataclass(frozen=True)
class SlopeFit:
    """Slopes of a series per hour (its unit per hour): least squares with its standard
    error, and Theil-Sen; ``n`` points used."""

    ols: float
    se: float
    theil_sen: float
    n: int

    def resolved_below(self, bound: float) -> bool:
        """Whether the series is shown to grow slower than ``bound`` (same unit): the
        least-squares slope plus two standard errors is below it.

        >>> SlopeFit(ols=5.0, se=1.0, theil_sen=5.0, n=10).resolved_below(10.0)
        True
        >>> SlopeFit(ols=5.0, se=3.0, theil_sen=5.0, n=10).resolved_below(10.0)
        False
        """
        return self.ols + 2 * self.se < bound


def slope_fit(t_s: list[float], y: list[float]) -> SlopeFit | None:
    """Slopes of ``y`` against ``t_s`` (seconds), per hour; None with fewer than 3 finite
    points. Theil-Sen ignores a minority of outliers that move least squares.

    >>> f = slope_fit([0, 60, 120, 180, 240], [100.0, 101.0, 102.0, 160.0, 104.0])
    >>> round(f.theil_sen, 6), f.ols > 60, f.n
    (60.0, True, 5)
    >>> slope_fit([0, 60], [1.0, 2.0]) is None
    True
    """
    pts = [(t, v) for t, v in zip(t_s, y, strict=True) if v is not None and math.isfinite(v)]
    if len(pts) < 3:
        return None
    t, v = np.asarray(pts, dtype=np.float64).T
    b, a = np.polyfit(t, v, 1)
    resid = v - (a + b * t)
    sxx = float(((t - t.mean()) ** 2).sum())
    se = math.sqrt(float((resid**2).sum()) / (len(t) - 2) / sxx) if sxx > 0 else math.inf
    i, j = np.triu_indices(len(t), k=1)
    dt = t[j] - t[i]
    ok = dt > 0
    ts = float(np.median((v[j] - v[i])[ok] / dt[ok])) if ok.any() else math.nan
    return SlopeFit(ols=float(b) * 3600, se=se * 3600, theil_sen=ts * 3600, n=len(t))
