"""Calibration statistics: pure ``compute``-style functions and a lifetime + window tracker.

Conventions shared by every function here:

- ``p``: predicted click probabilities, float array of shape ``(N,)``, values in ``[0, 1]``.
- ``y``: labels, array of shape ``(N,)``, values 0/1 (soft labels in ``[0, 1]`` are accepted).
- ``w``: optional non-negative example weights of shape ``(N,)``; ``None`` means all ones.

A statistic that is undefined for the input (empty input, a missing class, a base rate of 0
or 1) is returned as ``math.nan`` rather than raising, so a monitor can export it as-is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt

__all__ = [
    "CalibrationSnapshot",
    "CalibrationWindow",
    "auc",
    "calibration_ratio",
    "drift_z",
    "expected_calibration_error",
    "log_loss",
    "normalized_entropy",
    "reliability_bins",
]

EPS = 1e-7
"""Probabilities are clipped to ``[EPS, 1 - EPS]`` before taking logs."""

ArrayLike = npt.ArrayLike
FloatArray = npt.NDArray[np.float64]


def _validate(
    p: ArrayLike, y: ArrayLike, w: ArrayLike | None = None
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """Return ``(p, y, w)`` as float64 1-D arrays of one length, ``w`` filled with ones."""
    pa = np.asarray(p, dtype=np.float64)
    ya = np.asarray(y, dtype=np.float64)
    if pa.ndim != 1 or ya.ndim != 1:
        raise ValueError(f"p and y must be 1-D, got shapes {pa.shape} and {ya.shape}")
    if pa.shape != ya.shape:
        raise ValueError(f"p and y must have the same length, got {pa.shape} and {ya.shape}")
    if w is None:
        wa = np.ones_like(pa)
    else:
        wa = np.asarray(w, dtype=np.float64)
        if wa.shape != pa.shape:
            raise ValueError(f"w must have shape {pa.shape}, got {wa.shape}")
        if np.any(wa < 0):
            raise ValueError("weights must be non-negative")
    return pa, ya, wa


def _entropy(rate: float) -> float:
    """Binary entropy in nats of a Bernoulli(rate); nan unless ``0 < rate < 1``."""
    if not 0.0 < rate < 1.0:
        return math.nan
    return -(rate * math.log(rate) + (1.0 - rate) * math.log(1.0 - rate))


def _log_loss_terms(p: FloatArray, y: FloatArray) -> FloatArray:
    pc = np.clip(p, EPS, 1.0 - EPS)
    return -(y * np.log(pc) + (1.0 - y) * np.log1p(-pc))


def calibration_ratio(p: ArrayLike, y: ArrayLike, w: ArrayLike | None = None) -> float:
    """Predicted over actual clicks, ``Σw·p / Σw·y`` (1.0 is perfect; > 1 over-predicts).

    Returns ``math.nan`` when ``Σw·y == 0``.

    >>> calibration_ratio([0.5, 0.5], [1, 0])
    1.0
    """
    pa, ya, wa = _validate(p, y, w)
    den = float(np.dot(wa, ya))
    if den == 0.0:
        return math.nan
    return float(np.dot(wa, pa)) / den


def log_loss(p: ArrayLike, y: ArrayLike, w: ArrayLike | None = None) -> float:
    """Weighted mean binary cross-entropy in nats, ``p`` clipped to ``[1e-7, 1 - 1e-7]``.

    Returns ``math.nan`` for empty input or zero total weight.
    """
    pa, ya, wa = _validate(p, y, w)
    sw = float(wa.sum())
    if sw == 0.0:
        return math.nan
    return float(np.dot(wa, _log_loss_terms(pa, ya))) / sw


def normalized_entropy(p: ArrayLike, y: ArrayLike, w: ArrayLike | None = None) -> float:
    """Log loss divided by the entropy of the empirical (weighted) base rate ``Σw·y / Σw``.

    Below 1.0 means the model beats always predicting the base rate. Returns ``math.nan``
    when the base rate is 0 or 1 (or the input is empty).
    """
    pa, ya, wa = _validate(p, y, w)
    sw = float(wa.sum())
    if sw == 0.0:
        return math.nan
    h = _entropy(float(np.dot(wa, ya)) / sw)
    if math.isnan(h):
        return math.nan
    return log_loss(pa, ya, wa) / h


def _average_ranks(x: FloatArray) -> FloatArray:
    """1-based ranks of ``x`` with ties given their average rank."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    # Boundaries of runs of equal values in the sorted array.
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])
    ends = np.r_[starts[1:], xs.size]
    avg = (starts + ends + 1) / 2.0  # mean of the 1-based ranks starts+1 .. ends
    ranks = np.empty(x.size, dtype=np.float64)
    ranks[order] = np.repeat(avg, ends - starts)
    return ranks


def auc(p: ArrayLike, y: ArrayLike) -> float:
    """ROC AUC by the Mann-Whitney U statistic, ties counted as half (average ranks).

    Labels are thresholded at 0.5. Returns ``math.nan`` when either class is missing.

    >>> auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1])
    0.75
    """
    pa, ya, _ = _validate(p, y)
    pos = ya >= 0.5
    n_pos = int(pos.sum())
    n_neg = pa.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = _average_ranks(pa)
    u = float(ranks[pos].sum()) - n_pos * (n_pos + 1) / 2.0
    return u / (n_pos * n_neg)


def _bin_indices(p: FloatArray, n_bins: int, strategy: str) -> list[npt.NDArray[np.intp]]:
    """Index arrays of the non-empty bins of ``p`` (equal-mass or equal-width)."""
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    if strategy == "mass":
        order = np.argsort(p, kind="mergesort")
        return [b for b in np.array_split(order, n_bins) if b.size]
    if strategy == "width":
        # Bin b holds [b/n, (b+1)/n); p == 1.0 goes into the last bin.
        which = np.minimum((p * n_bins).astype(np.intp), n_bins - 1)
        which = np.maximum(which, 0)
        return [idx for b in range(n_bins) if (idx := np.flatnonzero(which == b)).size]
    raise ValueError(f"strategy must be 'mass' or 'width', got {strategy!r}")


def expected_calibration_error(
    p: ArrayLike,
    y: ArrayLike,
    n_bins: int = 10,
    strategy: Literal["mass", "width"] = "mass",
) -> float:
    """ECE: ``Σ_b (n_b / N) · |mean p_b − mean y_b|`` over ``n_bins`` bins, in ``[0, 1]``.

    ``strategy="mass"`` (default) makes equal-count bins over the sorted predictions, which
    suits CTRs concentrated near 0; ``"width"`` uses equal-width bins on ``[0, 1]``. Empty
    bins are skipped. Returns ``math.nan`` for empty input.
    """
    pa, ya, _ = _validate(p, y)
    if pa.size == 0:
        return math.nan
    total = 0.0
    for idx in _bin_indices(pa, n_bins, strategy):
        total += idx.size * abs(float(pa[idx].mean()) - float(ya[idx].mean()))
    return total / pa.size


def reliability_bins(
    p: ArrayLike, y: ArrayLike, n_bins: int = 10
) -> list[tuple[float, float, int]]:
    """Reliability diagram data: ``(mean p, mean y, count)`` per equal-mass bin, ascending p.

    Empty bins (when ``N < n_bins``) are omitted, so the list may be shorter than ``n_bins``.

    >>> reliability_bins([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1], n_bins=2)
    [(0.15000000000000002, 0.0, 2), (0.8500000000000001, 1.0, 2)]
    """
    pa, ya, _ = _validate(p, y)
    return [
        (float(pa[idx].mean()), float(ya[idx].mean()), int(idx.size))
        for idx in _bin_indices(pa, n_bins, "mass")
    ]


def drift_z(sum_y: float, sum_p: float, sum_var: float) -> float:
    """Standardised click surplus ``(Σy − Σp) / sqrt(Σp(1−p))``; 0.0 when ``sum_var <= 0``.

    Under a calibrated model it is approximately N(0, 1); positive means more clicks than
    predicted (under-prediction).

    >>> drift_z(sum_y=60.0, sum_p=40.0, sum_var=16.0)
    5.0
    """
    if sum_var <= 0.0:
        return 0.0
    return (sum_y - sum_p) / math.sqrt(sum_var)


@dataclass(frozen=True)
class CalibrationSnapshot:
    """Calibration statistics of a set of examples (a window or the lifetime).

    ``n`` is the example count; ``positives`` the weighted click count ``Σw·y``; ``mean_p``
    and ``actual_ctr`` are weighted means in ``[0, 1]``; ``ratio = Σw·p / Σw·y``; ``ece`` in
    ``[0, 1]``; ``ne`` normalised entropy (< 1 beats the base rate); ``auc`` in ``[0, 1]``;
    ``log_loss`` in nats; ``z`` the drift statistic (see :func:`drift_z`). Undefined values
    are ``nan`` (``z`` is 0.0 when undefined).
    """

    n: int
    positives: float
    mean_p: float
    actual_ctr: float
    ratio: float
    ece: float
    ne: float
    auc: float
    log_loss: float
    z: float


_EMPTY = CalibrationSnapshot(
    n=0,
    positives=0.0,
    mean_p=math.nan,
    actual_ctr=math.nan,
    ratio=math.nan,
    ece=math.nan,
    ne=math.nan,
    auc=math.nan,
    log_loss=math.nan,
    z=0.0,
)


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
        p, y, w = _validate(predictions, labels, weights)
        if not (np.all(np.isfinite(p)) and np.all(np.isfinite(y)) and np.all(np.isfinite(w))):
            raise ValueError("predictions, labels and weights must be finite")
        if np.any((p < 0.0) | (p > 1.0)) or np.any((y < 0.0) | (y > 1.0)):
            raise ValueError("predictions and labels must lie in [0, 1]")
        b = p.size
        if b == 0:
            return
        self._n += b
        self._sum_w += float(w.sum())
        self._sum_wp += float(np.dot(w, p))
        self._sum_wy += float(np.dot(w, y))
        self._sum_var += float(np.dot(w * w, p * (1.0 - p)))
        self._sum_wll += float(np.dot(w, _log_loss_terms(p, y)))

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
            return _EMPTY
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
        if self._n == 0:
            return _EMPTY
        sw = self._sum_w
        ll = self._sum_wll / sw if sw else math.nan
        h = _entropy(self._sum_wy / sw) if sw else math.nan
        return CalibrationSnapshot(
            n=self._n,
            positives=self._sum_wy,
            mean_p=self._sum_wp / sw if sw else math.nan,
            actual_ctr=self._sum_wy / sw if sw else math.nan,
            ratio=self._sum_wp / self._sum_wy if self._sum_wy else math.nan,
            ece=math.nan,
            ne=ll / h if not math.isnan(h) else math.nan,
            auc=math.nan,
            log_loss=ll,
            z=drift_z(self._sum_wy, self._sum_wp, self._sum_var),
        )

    def reset_window(self) -> None:
        """Empty the window (e.g. after a recalibration); lifetime sums are kept."""
        self._p[:] = 0.0
        self._y[:] = 0.0
        self._w[:] = 0.0
        self._head = 0
        self._count = 0
