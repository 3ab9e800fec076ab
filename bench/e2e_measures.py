"""What :mod:`bench.e2e` measures of a running pipeline: the ``/metrics`` of its workers
sampled in a thread (:class:`Sampler`), rates between two levels of a counter
(:func:`slope_rate`) and the lag's trend (:func:`fit_lag_slope`), Prometheus histogram
quantiles (:func:`histogram_quantile`), latency quantiles from record timestamps
(:func:`record_times`, :func:`quantiles`), and the py-spy profile of a worker
(:func:`start_py_spy`, :func:`stop_py_spy`, :func:`summarize_profile`).
"""

from __future__ import annotations

import math
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench.workers import WorkerProc
from logs.events import InvalidEvent
from stream.envelope import decode_envelope, is_envelope

__all__ = [
    "PROFILE_RATE",
    "SAMPLE_S",
    "Sampler",
    "downsample",
    "fit_lag_slope",
    "histogram_quantile",
    "merged_metrics",
    "py_spy_binary",
    "quantiles",
    "record_times",
    "slope_rate",
    "start_py_spy",
    "stop_py_spy",
    "summarize_profile",
]


SAMPLE_S = 0.5
PROFILE_RATE = 100  # py-spy samples per second


# --- the pipeline's metrics ---------------------------------------------------------------------


@dataclass
class Sampler:
    """Scrapes ``/metrics`` of every worker every ``SAMPLE_S`` in a thread (counters summed
    over the workers); lag against replay progress."""

    workers: list[WorkerProc]
    t0: float
    progress: list[tuple[float, int]] = field(default_factory=list)  # (t, events replayed)
    samples: list[dict[str, float]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def on_progress(self, k: int) -> None:
        self.progress.append((time.monotonic() - self.t0, k))

    def sample(self) -> dict[str, float]:
        m = merged_metrics(self.workers)
        consumed = m.get("streamrec_impressions_total", 0.0) + m.get("streamrec_clicks_total", 0)
        replayed = self.progress[-1][1] if self.progress else 0
        s = {
            "t": time.monotonic() - self.t0,
            "replayed": float(replayed),
            "consumed": consumed,
            "lag": max(0.0, replayed - consumed),
            "impressions": m.get("streamrec_impressions_total", 0.0),
            "labeled": m.get("sum:streamrec_labeled_total", 0.0),
            "scored": m.get("streamrec_scored_total", 0.0),
            "pending": m.get("streamrec_pending_impressions", 0.0),
        }
        self.samples.append(s)
        return s

    def run(self) -> None:
        while not self._stop.wait(SAMPLE_S):
            try:
                self.sample()
            except OSError:
                pass  # a dropped scrape of a busy worker

    def stop(self) -> None:
        self._stop.set()


def merged_metrics(workers: list[WorkerProc]) -> dict[str, float]:
    """One scrape of every worker, each sample summed over them (counters, histogram
    buckets and the gauges read here are all additive across workers)."""
    total: Counter[str] = Counter()
    for w in workers:
        total.update(w.metrics())
    return dict(total)


def gc_pauses(final: dict[str, float]) -> dict[str, dict[str, float | None]]:
    """``streamrec_gc_pause_seconds`` of a :func:`merged_metrics` scrape, by generation:
    ``collections``, ``seconds`` (their sum) and ``longest_below_s``, the upper bound of
    the highest non-empty bucket (None: no collection, or one beyond the last bound)."""
    name = "streamrec_gc_pause_seconds"
    out: dict[str, dict[str, float | None]] = {}
    for g in ("0", "1", "2"):
        count = final.get(f'{name}_count{{generation="{g}"}}', 0.0)
        bounds = sorted(
            (float(k.split('le="')[1].split('"')[0]), v)
            for k, v in final.items()
            if k.startswith(f'{name}_bucket{{generation="{g}",')
        )
        longest = next((b for b, c in bounds if c >= count), None) if count else None
        out[g] = {
            "collections": count,
            "seconds": final.get(f'{name}_sum{{generation="{g}"}}', 0.0),
            "longest_below_s": None if longest == math.inf else longest,
        }
    return out


def _crossing(samples: list[dict[str, float]], key: str, level: float) -> float | None:
    """Time at which ``samples[key]`` first reaches ``level`` (linear between samples)."""
    prev = None
    for s in samples:
        if s[key] >= level:
            if prev is None or s[key] == prev[key]:
                return s["t"]
            f = (level - prev[key]) / (s[key] - prev[key])
            return prev["t"] + f * (s["t"] - prev["t"])
        prev = s
    return None


def slope_rate(samples: list[dict[str, float]], key: str, n: int) -> float | None:
    """Rate of ``key`` between 10% and 90% of ``n`` (per second)."""
    t10, t90 = _crossing(samples, key, 0.1 * n), _crossing(samples, key, 0.9 * n)
    if t10 is None or t90 is None or t90 <= t10:
        return None
    return 0.8 * n / (t90 - t10)


def histogram_quantile(m: dict[str, float], name: str, q: float) -> float | None:
    """PromQL ``histogram_quantile`` over one unlabelled histogram of a scrape."""
    buckets = []
    prefix = f'{name}_bucket{{le="'
    for k, v in m.items():
        if k.startswith(prefix):
            le = k[len(prefix) : -2]
            buckets.append((math.inf if le == "+Inf" else float(le), v))
    buckets.sort()
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lo_bound, lo_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return lo_bound  # as Prometheus: the highest finite bound
            if count == lo_count:
                return bound
            return lo_bound + (bound - lo_bound) * (rank - lo_count) / (count - lo_count)
        lo_bound, lo_count = bound, count
    return None


def quantiles(x: list[float]) -> dict[str, float | None]:
    if not x:
        return {"n": 0, "p50": None, "p99": None, "max": None}
    a = np.asarray(x, dtype=np.float64)
    return {
        "n": len(x),
        "p50": float(np.percentile(a, 50)),
        "p99": float(np.percentile(a, 99)),
        "max": float(a.max()),
    }


def fit_lag_slope(samples: list[dict[str, float]], t_end: float) -> float | None:
    pts = [(s["t"], s["lag"]) for s in samples if s["t"] <= t_end]
    if len(pts) < 3:
        return None
    t, lag = np.asarray(pts).T
    return float(np.polyfit(t, lag, 1)[0])


def downsample(samples: list[dict[str, float]], k: int = 60) -> list[dict[str, float]]:
    step = max(1, len(samples) // k)
    keep = samples[::step] + ([samples[-1]] if samples and (len(samples) - 1) % step else [])
    return [{key: round(v, 3) for key, v in s.items()} for s in keep]


def record_times(records: list[Any], topic: str) -> dict[str, float]:
    """impression_id -> CreateTime (s) of the record that carried it (JSON or envelope)."""
    out: dict[str, float] = {}
    for r in records:
        t = r.timestamp / 1000
        if is_envelope(r.value):
            for event, _ in decode_envelope(r.value, topic):
                if not isinstance(event, InvalidEvent):
                    out[event.impression_id] = t
        elif r.key is not None:
            out[r.key.decode()] = t
    return out


# --- the worker's profile (py-spy) --------------------------------------------------------------


def py_spy_binary() -> str | None:
    local = Path(sys.executable).with_name("py-spy")
    return str(local) if local.exists() else shutil.which("py-spy")


def start_py_spy(pid: int, out: Path, run_dir: Path) -> subprocess.Popen[bytes]:
    binary = py_spy_binary()
    assert binary is not None
    cmd = [binary, "record", "--pid", str(pid), "--format", "raw", "--output", str(out),
           "--rate", str(PROFILE_RATE), "--nonblocking", "--threads"]  # fmt: skip
    with open(run_dir / "py-spy.log", "ab") as log:
        spy = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    time.sleep(0.5)
    if spy.poll() is not None:
        raise RuntimeError(f"py-spy exited at start; see {run_dir / 'py-spy.log'}")
    return spy


def stop_py_spy(spy: subprocess.Popen[bytes]) -> None:
    spy.send_signal(signal.SIGINT)  # py-spy writes its output on Ctrl-C
    try:
        spy.wait(timeout=60)
    except subprocess.TimeoutExpired:
        spy.kill()
        spy.wait()


_LIBS = (
    ("stream/", "streamrec stream/"), ("learners/", "streamrec learners/"),
    ("monitoring/", "streamrec monitoring/"), ("index/", "streamrec index/"),
    ("faust/", "faust"), ("mode/", "mode"), ("aiokafka/", "aiokafka"), ("kafka/", "kafka"),
    ("torch/", "torch"), ("numpy/", "numpy"), ("json/", "json"), ("asyncio/", "asyncio"),
    ("selectors", "asyncio"), ("prometheus_client/", "prometheus_client"),
    ("rocksdict", "rocksdict"), ("faiss", "faiss"), ("river/", "river"),
)  # fmt: skip


def _frame_name(frame: str) -> str:
    """``func (path/file.py:123)`` -> ``func (path/file.py)``."""
    head, _, loc = frame.rpartition(" (")
    return f"{head} ({loc.rsplit(':', 1)[0]})" if head else frame


def _lib(frame: str) -> str:
    loc = frame.rpartition(" (")[2]
    for needle, name in _LIBS:
        if needle in loc:
            return name
    return "other (stdlib, C extensions, ...)"


def summarize_profile(path: Path, seconds: float, top: int = 20) -> dict[str, Any]:
    """Aggregate py-spy's raw (collapsed) stacks: thread shares, top self/inclusive frames,
    and self samples by the library of the leaf frame."""
    self_c: Counter[str] = Counter()
    incl_c: Counter[str] = Counter()
    lib_c: Counter[str] = Counter()
    thread_c: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_s = line.rpartition(" ")
        if not stack or not count_s.isdigit():
            continue
        count = int(count_s)
        frames = stack.split(";")
        if frames[0].startswith(("thread (", "process ")):
            thread_c[frames[0].split(" ")[0] + " " + frames[0].split(" ")[1]] += count
            frames = [f for f in frames[1:] if not f.startswith("process ")]
        if not frames:
            continue
        total += count
        names = [_frame_name(f) for f in frames]
        self_c[names[-1]] += count
        lib_c[_lib(frames[-1])] += count
        for name in set(names):
            incl_c[name] += count

    def share(c: Counter[str], k: int) -> list[dict[str, Any]]:
        return [
            {"frame": f, "samples": v, "share": round(v / total, 4)} for f, v in c.most_common(k)
        ]

    return {
        "samples": total,
        "rate_hz": PROFILE_RATE,
        "seconds": seconds,
        "busy_share_of_wall": round(total / (PROFILE_RATE * seconds), 3) if seconds else None,
        "threads": share(thread_c, 10),
        "by_library_self": share(lib_c, 20),
        "top_self": share(self_c, top),
        "top_inclusive": share(incl_c, top + 20),
    }
