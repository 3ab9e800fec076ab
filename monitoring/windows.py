"""Running calibration statistics over a stream: :class:`CalibrationWindow` (the last N
examples, and lifetime sums) and :class:`TimeCalibrationWindow` (the last ``span_s``
seconds of event time, in buckets). Both report :class:`~monitoring.calibration.
CalibrationSnapshot` s computed by the functions of :mod:`monitoring.calibration`."""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

from monitoring.calibration import (
    DEFAULT_RELIABILITY_EDGES,
    EMPTY_SNAPSHOT,
    ArrayLike,
    CalibrationSnapshot,
    FloatArray,
    Reliability,
    auc,
    binned_sums,
    check_edges,
    compute_reliability,
    compute_snapshot,
    drift_z,
    expected_calibration_error,
    log_loss,
    log_loss_terms,
    normalized_entropy,
    validate_arrays,
)

__all__ = ["CalibrationWindow", "TimeCalibrationWindow"]


def _check_batch(
    predictions: ArrayLike, labels: ArrayLike, weights: ArrayLike | None
) -> tuple[FloatArray, FloatArray, FloatArray]:
    p, y, w = validate_arrays(predictions, labels, weights)
    if not (np.all(np.isfinite(p)) and np.all(np.isfinite(y)) and np.all(np.isfinite(w))):
        raise ValueError("predictions, labels and weights must be finite")
    if np.any((p < 0.0) | (p > 1.0)) or np.any((y < 0.0) | (y > 1.0)):
        raise ValueError("predictions and labels must lie in [0, 1]")
    return p, y, w


class CalibrationWindow:
    """Lifetime running sums plus a ring buffer of the last ``size`` examples.

    ``update`` is O(batch); ``lifetime()`` is O(1) from the running sums (Σw, Σw·p, Σw·y,
    Σw²·p(1−p), Σw·logloss), and its ``auc`` and ``ece`` are ``nan`` because they need the
    examples themselves. ``window()`` computes everything from the buffer, O(size log size).
    The drift variance uses ``Σw²·p(1−p)`` (the variance of ``Σw·y`` under calibration),
    which is ``Σp(1−p)`` for unit weights. Window ``auc`` and ``ece`` ignore the weights.

    Args:
        size: number of most recent examples kept for ``window()`` (>= 1).

    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> cw = CalibrationWindow(size=1_000)
    >>> p = np.full(5_000, 0.1)
    >>> cw.update(predictions=p, labels=(rng.random(5_000) < p).astype(float))
    >>> cw.window().n, cw.lifetime().n
    (1000, 5000)
    >>> 0.8 < cw.lifetime().ratio < 1.25
    True
    """

    def __init__(self, size: int = 20_000) -> None:
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        self.size = size
        self._p = np.zeros(size, dtype=np.float64)
        self._y = np.zeros(size, dtype=np.float64)
        self._w = np.zeros(size, dtype=np.float64)
        self._head = 0  # next write position
        self._count = 0  # examples currently in the window
        self._n = 0
        self._sum_w = 0.0
        self._sum_wp = 0.0
        self._sum_wy = 0.0
        self._sum_var = 0.0
        self._sum_wll = 0.0

    def update(
        self,
        *,
        predictions: ArrayLike,
        labels: ArrayLike,
        weights: ArrayLike | None = None,
    ) -> None:
        """Add a batch: ``predictions`` (B,) in [0, 1], ``labels`` (B,) 0/1, ``weights`` (B,).

        Raises ValueError on mismatched shapes, non-finite or out-of-range values; a rejected
        batch leaves the state unchanged.
        """
        p, y, w = _check_batch(predictions, labels, weights)
        b = p.size
        if b == 0:
            return
        self._n += b
        self._sum_w += float(w.sum())
        self._sum_wp += float(np.dot(w, p))
        self._sum_wy += float(np.dot(w, y))
        self._sum_var += float(np.dot(w * w, p * (1.0 - p)))
        self._sum_wll += float(np.dot(w, log_loss_terms(p, y)))

        if b >= self.size:
            # Only the tail survives; lay it out from position 0.
            self._p[:] = p[-self.size :]
            self._y[:] = y[-self.size :]
            self._w[:] = w[-self.size :]
            self._head = 0
            self._count = self.size
            return
        idx = (self._head + np.arange(b)) % self.size
        self._p[idx] = p
        self._y[idx] = y
        self._w[idx] = w
        self._head = (self._head + b) % self.size
        self._count = min(self._count + b, self.size)

    def _window_index(self) -> npt.NDArray[np.intp]:
        start = (self._head - self._count) % self.size
        return (start + np.arange(self._count)) % self.size

    def window_arrays(self) -> tuple[FloatArray, FloatArray]:
        """``(p, y)`` of the window, each (n,) float64, oldest first (copies)."""
        idx = self._window_index()
        return self._p[idx], self._y[idx]

    def window(self) -> CalibrationSnapshot:
        """All statistics over the last ``size`` examples (fewer before the buffer fills)."""
        if self._count == 0:
            return EMPTY_SNAPSHOT
        idx = self._window_index()
        p, y, w = self._p[idx], self._y[idx], self._w[idx]
        sw = float(w.sum())
        swp = float(np.dot(w, p))
        swy = float(np.dot(w, y))
        return CalibrationSnapshot(
            n=int(p.size),
            positives=swy,
            mean_p=swp / sw if sw else math.nan,
            actual_ctr=swy / sw if sw else math.nan,
            ratio=swp / swy if swy else math.nan,
            ece=expected_calibration_error(p, y),
            ne=normalized_entropy(p, y, w),
            auc=auc(p, y),
            log_loss=log_loss(p, y, w),
            z=drift_z(swy, swp, float(np.dot(w * w, p * (1.0 - p)))),
        )

    def lifetime(self) -> CalibrationSnapshot:
        """O(1) statistics over every example seen; ``auc`` and ``ece`` are ``nan``."""
        return compute_snapshot(
            self._n, self._sum_w, self._sum_wp, self._sum_wy, self._sum_var, self._sum_wll
        )

    def reliability(self, n_bins: int = 10, edges: ArrayLike | None = None) -> Reliability:
        """Reliability bins of the window: ``n_bins`` equal-mass bins (``edges=None``, weighted
        means, bins of equally many examples) or the fixed bins ``edges``. Empty window: all
        ``n_bins`` (or ``len(edges) − 1``) bins empty."""
        if n_bins < 1:
            raise ValueError(f"n_bins must be >= 1, got {n_bins}")
        idx = self._window_index()
        p, y, w = self._p[idx], self._y[idx], self._w[idx]
        if edges is not None:
            return compute_reliability(*binned_sums(p, y, w, edges=edges), edges=edges)
        count, sum_p, sum_y = np.zeros(n_bins), np.zeros(n_bins), np.zeros(n_bins)
        if p.size:
            for k, b in enumerate(np.array_split(np.argsort(p, kind="mergesort"), n_bins)):
                count[k] = w[b].sum()
                sum_p[k] = np.dot(w[b], p[b])
                sum_y[k] = np.dot(w[b], y[b])
        return compute_reliability(count, sum_p, sum_y)

    def reset_window(self) -> None:
        """Empty the window (e.g. after a recalibration); lifetime sums are kept."""
        self._p[:] = 0.0
        self._y[:] = 0.0
        self._w[:] = 0.0
        self._head = 0
        self._count = 0


_N_SUMS = 6  # per bucket: n, Σw, Σw·p, Σw·y, Σw²·p(1−p), Σw·logloss


class TimeCalibrationWindow:
    """Lifetime running sums plus the sums of the last ``span_s`` seconds of event time.

    Event time is cut into buckets of ``bucket_s`` seconds (bucket ``k`` holds
    ``k·bucket_s <= ts < (k+1)·bucket_s``); each bucket keeps the running sums of
    :class:`CalibrationWindow` plus per-bin sums for the fixed reliability ``edges``. The
    window is the newest ``ceil(span_s / bucket_s)`` buckets up to the newest event seen
    (the :attr:`watermark`), so it spans between ``span_s − bucket_s`` and ``span_s``
    seconds of elapsed event time plus the current bucket. Memory is O(buckets x bins),
    whatever the traffic. An example older than the window when it arrives counts towards
    :meth:`lifetime` and :attr:`n_late` only.

    Everything is computed from sums, so ``window().auc`` is ``nan`` and ``window().ece``
    uses the fixed bins (the equal-mass ECE of :class:`CalibrationWindow` needs examples).

    Args:
        span_s: window length in seconds (> 0).
        bucket_s: bucket length in seconds (> 0, at most ``span_s``); the window's
            resolution.
        edges: fixed reliability-bin edges, ``K + 1`` increasing values in ``[0, 1]``.

    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> tw = TimeCalibrationWindow(span_s=600.0, bucket_s=60.0)
    >>> ts = 1_699_999_980.0 + np.arange(20_000) * 0.1  # 2,000 s of events, 10 per second
    >>> p = np.full(20_000, 0.05)
    >>> tw.update(predictions=p, labels=rng.random(20_000) < p, ts=ts)
    >>> tw.window().n, tw.lifetime().n  # 9 whole one-minute buckets and the newest 20 s
    (5600, 20000)
    >>> 0.8 < tw.window().ratio < 1.25
    True
    """

    def __init__(
        self,
        span_s: float = 3600.0,
        bucket_s: float = 60.0,
        edges: ArrayLike = DEFAULT_RELIABILITY_EDGES,
    ) -> None:
        if not (math.isfinite(span_s) and span_s > 0):
            raise ValueError(f"span_s must be > 0, got {span_s}")
        if not (math.isfinite(bucket_s) and 0 < bucket_s <= span_s):
            raise ValueError(f"bucket_s must be in (0, span_s], got {bucket_s}")
        self.span_s = float(span_s)
        self.bucket_s = float(bucket_s)
        self.edges = check_edges(edges)
        self.n_buckets = math.ceil(self.span_s / self.bucket_s - 1e-9)
        k = self.edges.size - 1
        self._ids = np.full(self.n_buckets, np.iinfo(np.int64).min, dtype=np.int64)
        self._sums = np.zeros((self.n_buckets, _N_SUMS))
        self._bins = np.zeros((self.n_buckets, 3, k))
        self._life = np.zeros(_N_SUMS)
        self._life_bins = np.zeros((3, k))
        self._newest: int | None = None
        self._watermark = -math.inf
        self.n_late = 0

    @property
    def watermark(self) -> float:
        """Newest event time seen, epoch seconds (``-inf`` before the first example)."""
        return self._watermark

    @staticmethod
    def _sums_of(p: FloatArray, y: FloatArray, w: FloatArray) -> FloatArray:
        return np.array(
            [
                float(p.size),
                float(w.sum()),
                float(np.dot(w, p)),
                float(np.dot(w, y)),
                float(np.dot(w * w, p * (1.0 - p))),
                float(np.dot(w, log_loss_terms(p, y))),
            ]
        )

    def update(
        self,
        *,
        predictions: ArrayLike,
        labels: ArrayLike,
        ts: ArrayLike,
        weights: ArrayLike | None = None,
    ) -> None:
        """Add a batch: ``predictions`` (B,) in [0, 1], ``labels`` (B,) 0/1, ``ts`` (B,) event
        times in epoch seconds (any order), ``weights`` (B,) or None.

        Raises ValueError on mismatched shapes, non-finite or out-of-range values; a rejected
        batch leaves the state unchanged.
        """
        p, y, w = _check_batch(predictions, labels, weights)
        t = np.asarray(ts, dtype=np.float64).reshape(-1)
        if t.shape != p.shape:
            raise ValueError(f"ts must have shape {p.shape}, got {t.shape}")
        if not np.all(np.isfinite(t)):
            raise ValueError("ts must be finite")
        if p.size == 0:
            return
        self._life += self._sums_of(p, y, w)
        self._life_bins += np.stack(binned_sums(p, y, w, edges=self.edges))
        self._watermark = max(self._watermark, float(t.max()))
        ids = np.floor(t / self.bucket_s).astype(np.int64)
        newest = int(ids.max()) if self._newest is None else max(self._newest, int(ids.max()))
        self._newest = newest
        oldest = newest - self.n_buckets + 1
        live = ids >= oldest
        self.n_late += int(p.size - live.sum())
        for k in np.unique(ids[live]).tolist():
            slot = k % self.n_buckets
            if self._ids[slot] != k:  # an expired bucket (or never used): start afresh
                self._ids[slot] = k
                self._sums[slot] = 0.0
                self._bins[slot] = 0.0
            m = ids == k
            self._sums[slot] += self._sums_of(p[m], y[m], w[m])
            self._bins[slot] += np.stack(binned_sums(p[m], y[m], w[m], edges=self.edges))

    def _live(self) -> npt.NDArray[np.bool_]:
        if self._newest is None:
            return np.zeros(self.n_buckets, dtype=bool)
        return self._ids > self._newest - self.n_buckets

    def window(self) -> CalibrationSnapshot:
        """Statistics over the window's buckets; ``auc`` ``nan``, ``ece`` on the fixed bins."""
        live = self._live()
        n, sw, swp, swy, svar, swll = self._sums[live].sum(axis=0).tolist()
        return compute_snapshot(int(n), sw, swp, swy, svar, swll, ece=self.reliability().ece)

    def lifetime(self) -> CalibrationSnapshot:
        """Statistics over every example seen; ``auc`` ``nan``, ``ece`` on the fixed bins."""
        n, sw, swp, swy, svar, swll = self._life.tolist()
        count, sum_p, sum_y = self._life_bins
        ece = compute_reliability(count, sum_p, sum_y, edges=self.edges).ece
        return compute_snapshot(int(n), sw, swp, swy, svar, swll, ece=ece)

    def reliability(self) -> Reliability:
        """Fixed-bin reliability of the window (bins of :attr:`edges`)."""
        count, sum_p, sum_y = self._bins[self._live()].sum(axis=0)
        return compute_reliability(count, sum_p, sum_y, edges=self.edges)
